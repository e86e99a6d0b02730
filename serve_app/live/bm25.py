"""BM25 that takes writes and stays exact: raw term frequencies, statistics net of deletes,
scores computed at query time (the way Lucene reads its statistics at search time).

bm25s stores ``idf x tf-component`` per posting with the average length baked in, so any write
makes every stored score stale. :class:`LiveBM25` keeps what a score is made of instead: each
chunk's term frequencies and length, and the corpus statistics (chunks ``N``, total length,
each term's document frequency), and scores a query's terms with bm25s's own functions
(:func:`serve_app.retrieval.bm25s_engine.scoring_functions`) in the same float32 order as a
bm25s index sums them. A search after any write therefore returns the scores a fresh bm25s build
of the same live documents gives. Before the first write, the bm25s index answers (its fast
path, exact while nothing changed).

**Versions (MVCC).** Every chunk has the sequence number of the batch that added it (``born``)
and of the batch that replaced or deleted it (``died``); the statistics keep their value after
each batch. A search reads "as of" a sequence number ``S``: exactly the chunks with
``born <= S < died`` and the statistics after batch ``S``. So a search sees a batch entirely or
not at all, and every shard and the document lookups of one request read the same ``S``.

**Statistics.** The writer computes each batch's change of ``N``, total length and document
frequencies (:class:`~serve_app.live.changes.StatsDelta`) from the old and new text of every
document it touches, so shards, which hold only their own postings, keep the whole corpus's
statistics: an upsert of an existing id subtracts the old version before adding the new one
(never counted twice), a term whose frequency falls to 0 is unknown again (no ``log(N/0)``),
and the average length follows deletes at once.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from serve_app.arrays import GrowingArray
from serve_app.chunking import split_documents
from serve_app.filters import MetadataColumns, Node
from serve_app.live.changes import UPSERT, Batch, StatsDelta
from serve_app.retrieval.bm25 import BM25Retriever, _top_documents
from serve_app.retrieval.bm25s_engine import NONOCCURRENCE_METHODS, scoring_functions
from serve_app.retrieval.filtered import allowed_documents
from serve_app.types import Document, Hit

ALIVE = np.iinfo(np.int64).max


@dataclass(frozen=True)
class CorpusStats:
    """Whole-corpus BM25 statistics: chunks, total token length, document frequency per term."""

    chunks: int
    length: int
    df: Mapping[str, int]

    @classmethod
    def of_tokens(cls, chunk_tokens: Sequence[Sequence[str]]) -> "CorpusStats":
        n, length, df = StatsDelta.of_chunks(chunk_tokens, +1)
        return cls(n, length, dict(df))


def batch_stats(removed: Sequence[Document], added: Sequence[Document], tokenizer: object, chunking: object) -> StatsDelta:
    """The statistics change of a batch that removes the live versions ``removed`` (replaced or
    deleted) and adds ``added``, tokenised and chunked as the index is."""
    chunks = 0
    length = 0
    df: Counter = Counter()
    for docs, sign in ((removed, -1), (added, +1)):
        if not docs:
            continue
        texts, _ = split_documents(list(docs), chunking)  # type: ignore[arg-type]
        n, ln, d = StatsDelta.of_chunks(tokenizer(texts), sign)  # type: ignore[operator]
        chunks += n
        length += ln
        df.update(d)
    return StatsDelta(chunks, length, {t: v for t, v in df.items() if v})


class VersionedStats:
    """:class:`CorpusStats` as of any sequence number since the base (the base's at ``base_seq``)."""

    def __init__(self, base: CorpusStats, base_seq: int) -> None:
        self.base = base
        self.seqs = [base_seq]
        self.chunks = [base.chunks]
        self.length = [base.length]
        self.df_hist: dict[str, tuple[list[int], list[int]]] = {}

    def apply(self, seq: int, delta: StatsDelta) -> None:
        self.seqs.append(seq)
        self.chunks.append(self.chunks[-1] + delta.chunks)
        self.length.append(self.length[-1] + delta.length)
        for term, d in delta.df.items():
            seqs, values = self.df_hist.setdefault(term, ([], []))
            prev = values[-1] if values else self.base.df.get(term, 0)
            seqs.append(seq)
            values.append(prev + d)

    def totals(self, seq: int) -> tuple[int, int]:
        i = bisect.bisect_right(self.seqs, seq) - 1
        return self.chunks[max(i, 0)], self.length[max(i, 0)]

    def df(self, term: str, seq: int) -> int:
        hist = self.df_hist.get(term)
        if hist is not None:
            i = bisect.bisect_right(hist[0], seq) - 1
            if i >= 0:
                return hist[1][i]
        return self.base.df.get(term, 0)


#: The live structures' growable arrays (``live.dense`` imports it from here too).
_Grow = GrowingArray


class LiveBM25:
    """A BM25 retriever over a base index plus the batches applied to it (see the module docstring).

    ``base``: the bm25s retriever of the base (its fast path); ``documents``: the base's
    documents in index order (their term frequencies are counted at load); ``stats``: the whole
    corpus's statistics at ``base_seq`` (a shard's own documents are only part of them);
    ``shard``: this replica's shard index when the retriever is sharded (changes owned by other
    shards only move the statistics).
    """

    name = "bm25"

    def __init__(self, base: BM25Retriever, documents: Sequence[Document], stats: Optional[CorpusStats] = None, *, base_seq: int = 0, shard: Optional[int] = None, fields: Optional[Mapping[str, str]] = None) -> None:
        if len(documents) != base.num_documents:
            raise ValueError(f"{len(documents)} documents for a BM25 index of {base.num_documents}")
        self.base = base
        self.tokenizer = base.tokenizer
        self.config = base.config
        self.chunking = base.chunking
        self.shard = shard
        self.base_seq = base_seq
        self.applied_seq = base_seq
        self._idf, self._tfc = scoring_functions(self.config.method)
        texts, owner = split_documents(list(documents), self.chunking)
        tokens = self.tokenizer(texts)
        self.doc_ids: list[str] = [d.id for d in documents]
        self._pos: dict[str, int] = {d: i for i, d in enumerate(self.doc_ids)}
        starts = np.searchsorted(owner, np.arange(len(documents) + 1), side="left")
        self._doc_chunks = [(int(starts[i]), int(starts[i + 1])) for i in range(len(documents))]
        self._length = _Grow(np.asarray([len(t) for t in tokens], dtype=np.int64))
        self._owner = _Grow(np.asarray(owner, dtype=np.int64))
        self._born = _Grow(np.full(len(tokens), base_seq, dtype=np.int64))
        self._died = _Grow(np.full(len(tokens), ALIVE, dtype=np.int64))
        postings: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for c, toks in enumerate(tokens):
            for term, tf in Counter(toks).items():
                chunks_, tfs = postings[term]
                chunks_.append(c)
                tfs.append(tf)
        self._base_postings = {t: (np.asarray(c, dtype=np.int64), np.asarray(f, dtype=np.int64)) for t, (c, f) in postings.items()}
        self._delta_postings: dict[str, tuple[list[int], list[int]]] = {}
        self.stats = VersionedStats(stats if stats is not None else CorpusStats.of_tokens(tokens), base_seq)
        self.columns: Optional[MetadataColumns] = MetadataColumns(fields, [d.metadata for d in documents]) if fields else None
        base.columns = self.columns
        self._lock = threading.Lock()

    @property
    def num_documents(self) -> int:
        """Live documents of this retriever (its shard's) at the latest applied batch."""
        died = self._died.view()
        owner = self._owner.view()
        return int(np.unique(owner[died == ALIVE]).size)

    # ----------------------------------------------------------------- writes

    def apply(self, batch: Batch) -> None:
        """Apply one acknowledged batch (in sequence order; an old one is ignored)."""
        if batch.seq <= self.applied_seq:
            return
        with self._lock:
            mine = [c for c in batch.changes if self.shard is None or c.owners.get("bm25") == self.shard]
            for c in mine:
                self._retire(c.doc_id, batch.seq)
            upserts = [c.document for c in mine if c.op == UPSERT and c.document is not None]
            if upserts:
                texts, owner = split_documents(upserts, self.chunking)
                tokens = self.tokenizer(texts)
                first_chunk = self._length.n
                first_doc = len(self.doc_ids)
                for i, d in enumerate(upserts):
                    self._pos[d.id] = first_doc + i
                    self.doc_ids.append(d.id)
                if self.columns is not None:
                    self.columns.append([d.metadata for d in upserts])
                starts = np.searchsorted(owner, np.arange(len(upserts) + 1), side="left")
                self._doc_chunks.extend((first_chunk + int(starts[i]), first_chunk + int(starts[i + 1])) for i in range(len(upserts)))
                for j, toks in enumerate(tokens):
                    c = first_chunk + j
                    for term, tf in Counter(toks).items():
                        chunks_, tfs = self._delta_postings.setdefault(term, ([], []))
                        chunks_.append(c)
                        tfs.append(tf)
                self._length.extend([len(t) for t in tokens])
                self._owner.extend((first_doc + np.asarray(owner)).tolist())
                self._born.extend([batch.seq] * len(tokens))
                self._died.extend([ALIVE] * len(tokens))
            self.stats.apply(batch.seq, batch.stats)
            self.applied_seq = batch.seq

    def _retire(self, doc_id: str, seq: int) -> None:
        pos = self._pos.get(doc_id)
        if pos is None:
            return
        c0, c1 = self._doc_chunks[pos]
        died = self._died.a
        live = died[c0:c1] == ALIVE
        died[c0:c1][live] = seq

    # ----------------------------------------------------------------- search

    def search(self, query: str, k: int, at_seq: Optional[int] = None, where: Optional[Node] = None) -> list[Hit]:
        return self.search_batch([query], k, at_seq, where)[0]

    def search_batch(self, queries: Sequence[str], k: int, at_seq: Optional[int] = None, where: Optional[Node] = None) -> list[list[Hit]]:
        """Top-``k`` documents for each query as of batch ``at_seq`` (default: the latest applied);
        with a filter ``where``, only the documents it admits are candidates (before the top-k)."""
        if isinstance(queries, str):
            raise TypeError("search_batch takes a sequence of queries, not a string")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        seq = self.applied_seq if at_seq is None else max(min(int(at_seq), self.applied_seq), self.base_seq)
        if seq == self.base_seq and self.applied_seq == self.base_seq:
            return self.base.search_batch(queries, k, where)  # nothing written yet: bm25s's own index is exact
        n_chunks = self._length.n
        length, owner, born, died = self._length.a[:n_chunks], self._owner.a[:n_chunks], self._born.a[:n_chunks], self._died.a[:n_chunks]
        allowed = allowed_documents(self.columns, where, len(self.doc_ids))
        n_total, total_length = self.stats.totals(seq)
        avg = np.float64(total_length) / np.float64(n_total) if n_total else np.float64(0)
        cfg = self.config
        out: list[list[Hit]] = []
        for tokens in self.tokenizer(list(queries)):
            known = [(t, self.stats.df(t, seq)) for t in tokens]
            known = [(t, df) for t, df in known if df > 0]
            if k == 0 or not known:
                out.append([])
                continue
            scores = np.zeros(n_chunks, dtype=np.float32)
            hit_chunks = []
            nonocc = []
            for term, df in known:
                idf_py = self._idf(df, N=n_total)
                idf = np.float32(idf_py)
                sub = None
                if cfg.method in NONOCCURRENCE_METHODS:
                    sub = np.float32(idf_py * self._tfc(tf_array=0, l_d=avg, l_avg=avg, k1=cfg.k1, b=cfg.b, delta=cfg.delta))
                    nonocc.append(sub)
                for chunks_, tfs in self._postings(term, n_chunks):
                    visible = (born[chunks_] <= seq) & (died[chunks_] > seq)
                    c = chunks_[visible]
                    if not c.size:
                        continue
                    tfc = self._tfc(tf_array=tfs[visible].astype(np.float32), l_d=length[c], l_avg=avg, k1=cfg.k1, b=cfg.b, delta=cfg.delta)
                    s = idf * tfc
                    if sub is not None:
                        s = s - sub
                    np.add.at(scores, c, s.astype(np.float32))
                    hit_chunks.append(c)
            if nonocc:
                scores += np.asarray(nonocc, dtype=np.float32).sum()
            if not hit_chunks:
                out.append([])
                continue
            candidates = np.unique(np.concatenate(hit_chunks))
            if allowed is not None:
                candidates = candidates[allowed[owner[candidates]]]
            top = _top_documents(scores, candidates, owner, k)
            out.append([Hit(self.doc_ids[d], s) for d, s in top])
        return out

    def _postings(self, term: str, n_chunks: int) -> list[tuple[np.ndarray, np.ndarray]]:
        parts = []
        base = self._base_postings.get(term)
        if base is not None:
            parts.append(base)
        delta = self._delta_postings.get(term)
        if delta is not None:
            m = len(delta[0])
            c = np.asarray(delta[0][:m], dtype=np.int64)
            f = np.asarray(delta[1][:m], dtype=np.int64)
            keep = c < n_chunks
            parts.append((c[keep], f[keep]))
        return parts


__all__ = ["ALIVE", "CorpusStats", "LiveBM25", "VersionedStats", "batch_stats"]
