"""The one module that touches bm25s's internals.

bm25s keeps an index as a CSC matrix of precomputed posting scores (``idf x tf-component``,
the average length baked in) with its vocabulary and, for BM25L/BM25+, the scores of terms a
document lacks. Serving it needs only bm25s's public API (``BM25.index``, ``save``, ``load``,
``get_scores_from_ids``), but two things serve_app does reach below it:

* cutting a built index into document-range shards that keep the whole corpus's statistics
  (:meth:`Bm25sEngine.split`), and
* building an index from statistics aggregated across Ray Data blocks
  (:func:`corpus_statistics`, :func:`score_postings`, :meth:`Bm25sEngine.from_postings`):
  the same scoring functions a local ``BM25.index`` runs, fed the whole corpus's ``N``,
  ``df`` and average length.

Both use private names (``bm25s.scoring._build_*``, ``_select_*_scorer``, ``BM25._np_csc``)
and the layout of ``BM25.scores``. They are here alone so that a bm25s release that moves them
breaks one file; ``pyproject.toml`` pins bm25s to the minor release range these are tested
with, and ``tests/test_index_ray.py`` (a Ray build equal to a local one, bit for bit) and
``tests/test_sharding.py`` (shards equal to the whole index) catch a drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from serve_app.config import BM25Config


def _new_model(cfg: BM25Config) -> Any:
    import bm25s

    return bm25s.BM25(k1=cfg.k1, b=cfg.b, delta=cfg.delta, method=cfg.method, backend="numpy")


class Bm25sEngine:
    """A bm25s index: the score matrix, its vocabulary, lookups of a query's terms."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.vocab: dict[str, int] = model.vocab_dict

    @classmethod
    def build(cls, tokens: list[list[str]], cfg: BM25Config, show_progress: bool) -> "Bm25sEngine":
        model = _new_model(cfg)
        model.index(tokens, create_empty_token=False, show_progress=show_progress)
        return cls(model)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def num_chunks(self) -> int:
        return int(self.model.scores["num_docs"])

    def match(self, tokens: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """(scores of every chunk, ids of the chunks containing a query token), or None without known tokens."""
        ids = [self.vocab[t] for t in tokens if t in self.vocab]
        if not ids:
            return None
        scores = self.model.get_scores_from_ids(ids)
        indptr, indices = self.model.scores["indptr"], self.model.scores["indices"]
        postings = [indices[indptr[t] : indptr[t + 1]] for t in set(ids)]
        return scores, np.unique(np.concatenate(postings))

    def save(self, directory: Path) -> None:
        self.model.save(str(directory), allow_pickle=False, show_progress=False)

    @classmethod
    def load(cls, directory: Path, mmap: bool) -> "Bm25sEngine":
        import bm25s

        return cls(bm25s.BM25.load(str(directory), mmap=mmap, allow_pickle=False, load_corpus=False))

    def split(self, chunk_sets: Sequence[Any]) -> list["Bm25sEngine"]:
        """One engine per set of chunks (a ``(c0, c1)`` range or a sorted array of chunk ids):
        that set's postings (chunks renumbered from 0 in their order) with the whole vocabulary
        and non-occurrence scores, so every score stays the whole index's, bit for bit."""
        model = self.model
        data = np.asarray(model.scores["data"])
        indices = np.asarray(model.scores["indices"])
        indptr = np.asarray(model.scores["indptr"])
        vocab_size = indptr.size - 1
        term_of_entry = np.repeat(np.arange(vocab_size, dtype=np.int64), np.diff(indptr).astype(np.int64))
        out = []
        for chunks in chunk_sets:
            if isinstance(chunks, tuple):
                c0, c1 = chunks
                keep = (indices >= c0) & (indices < c1)
                renumbered = indices[keep] - c0
                n_chunks = int(c1 - c0)
            else:
                chunks = np.asarray(chunks, dtype=np.int64)
                keep = np.isin(indices, chunks)
                renumbered = np.searchsorted(chunks, indices[keep])
                n_chunks = int(chunks.size)
            counts = np.bincount(term_of_entry[keep], minlength=vocab_size)
            shard = type(model)(
                k1=model.k1, b=model.b, delta=model.delta, method=model.method, idf_method=model.idf_method,
                dtype=model.dtype, int_dtype=model.int_dtype, backend="numpy",
            )
            shard.scores = {
                "data": np.ascontiguousarray(data[keep]),
                "indices": np.ascontiguousarray(renumbered.astype(indices.dtype)),
                "indptr": np.concatenate([[0], np.cumsum(counts)]).astype(indptr.dtype),
                "num_docs": n_chunks,
            }
            shard.vocab_dict = dict(model.vocab_dict)
            shard.unique_token_ids_set = set(shard.vocab_dict.values())
            nonocc = getattr(model, "nonoccurrence_array", None)
            shard.nonoccurrence_array = None if nonocc is None else np.array(nonocc)
            out.append(Bm25sEngine(shard))
        return out

    @classmethod
    def from_postings(cls, cfg: BM25Config, stats: Mapping[str, Any], data: np.ndarray, rows: np.ndarray, cols: np.ndarray, n_chunks: int) -> "Bm25sEngine":
        """The index whose postings ``(rows[i] = chunk, cols[i] = term, data[i] = score)`` were
        scored by :func:`score_postings` with ``stats`` (:func:`corpus_statistics`)."""
        model = _new_model(cfg)
        vocab = stats["vocab"]
        data, indices, indptr = model._np_csc(data=data, rows=rows.astype(model.int_dtype), cols=cols, shape=(n_chunks, len(vocab)))
        model.scores = {"data": data.astype(model.dtype), "indices": indices, "indptr": indptr, "num_docs": n_chunks}
        model.vocab_dict = vocab
        model.unique_token_ids_set = set(vocab.values())
        model.nonoccurrence_array = stats["nonoccurrence"]
        return cls(model)


def corpus_statistics(cfg: BM25Config, vocab: dict[str, int], df: np.ndarray, lengths: np.ndarray) -> dict[str, Any]:
    """What scoring a posting needs of the whole corpus, as ``BM25.index`` computes it: the idf
    of each term (``df[i]``: chunks holding term ``i``), the non-occurrence scores (BM25L/BM25+),
    the average chunk length (over every chunk, in corpus order: ``lengths``), the parameters."""
    from bm25s.scoring import _build_idf_array, _build_nonoccurrence_array, _select_idf_scorer, _select_tfc_scorer

    model = _new_model(cfg)
    n_chunks = int(lengths.size)
    avg_doc_len = lengths.mean()
    df_dict = dict(enumerate(np.asarray(df).tolist()))
    idf = _build_idf_array(df_dict, n_docs=n_chunks, compute_idf_fn=_select_idf_scorer(model.idf_method), dtype=model.dtype)
    nonocc = None
    if model.method in model.methods_requiring_nonoccurrence:
        nonocc = _build_nonoccurrence_array(
            df_dict, n_docs=n_chunks, compute_idf_fn=_select_idf_scorer(model.idf_method), calculate_tfc_fn=_select_tfc_scorer(model.method),
            l_d=avg_doc_len, l_avg=avg_doc_len, k1=model.k1, b=model.b, delta=model.delta, dtype=model.dtype,
        )
    params = {"k1": model.k1, "b": model.b, "delta": model.delta, "method": model.method, "dtype": model.dtype, "int_dtype": model.int_dtype}
    return {"vocab": vocab, "idf": idf, "nonoccurrence": nonocc, "avg_doc_len": avg_doc_len, "params": params}


def score_postings(ids: list[list[int]], stats: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, chunk rows, term columns) of every posting of the chunks ``ids`` (term ids per
    chunk, rows numbered from 0 in that order), by bm25s's own scoring function."""
    from bm25s.scoring import _build_scores_and_indices_for_matrix

    p = stats["params"]
    total = sum(len(set(x)) for x in ids)
    scores, rows, cols = _build_scores_and_indices_for_matrix(
        corpus_token_ids=ids, idf_array=stats["idf"], avg_doc_len=stats["avg_doc_len"],
        doc_frequencies={0: total},  # read for the size of its output arrays only
        k1=p["k1"], b=p["b"], delta=p["delta"], nonoccurrence_array=stats["nonoccurrence"],
        method=p["method"], dtype=p["dtype"], int_dtype=p["int_dtype"], show_progress=False,
    )
    return scores, rows, cols



def scoring_functions(method: str) -> tuple[Any, Any]:
    """bm25s's own ``(idf(df, N), tfc(tf_array, l_d, l_avg, k1, b, delta))`` of a BM25 variant:
    what the live index (:mod:`serve_app.live.bm25`) scores postings with at query time, so
    that its scores are the ones a fresh bm25s build gives."""
    from bm25s.scoring import _select_idf_scorer, _select_tfc_scorer

    return _select_idf_scorer(method), _select_tfc_scorer(method)


#: The variants whose scores add a non-occurrence part for query terms a document lacks.
NONOCCURRENCE_METHODS = ("bm25l", "bm25+")
