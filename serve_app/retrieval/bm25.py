"""BM25 retriever over (optionally chunked) documents, with two scoring engines.

* ``bm25s`` (default): eager sparse score matrix; saved with bm25s's own ``save`` (``.npy``
  arrays written with ``allow_pickle=False`` and JSON vocabulary/parameters) and loaded
  memory-mapped with ``allow_pickle=False``.
* ``rank_bm25``: the pure-Python reference. The tokenised chunks are stored as JSON and the
  rank_bm25 object is rebuilt at load time. Methods: ``robertson`` -> ``BM25Okapi``,
  ``bm25l`` -> ``BM25L``, ``bm25+`` -> ``BM25Plus``; other methods raise ``ValueError``.

Both engines read the same tokens: ``bm25s.tokenize`` with the configured lowercasing,
stopword list and PyStemmer stemmer (the stopword list actually used is stored with the
index, so a later bm25s release cannot change the tokenisation of a saved index).

Hits are the documents containing at least one query token (so fewer than ``k`` may come
back, and a query without any indexed token returns ``[]``), best first; a document's score is
its best chunk's score, ties broken by corpus position.

Where the engines differ (measured on SciFact, see ``tests/test_bm25.py``):

* ``robertson``: bm25s's term-frequency part is ``tf / (tf + k1 * norm)`` while BM25Okapi's
  is ``tf * (k1 + 1) / (tf + k1 * norm)``: rank_bm25 scores are exactly ``k1 + 1`` times the
  bm25s scores (same ranking). The idf is ``log((N - df + 0.5) / (df + 0.5))`` in both,
  but for terms in more than half of the chunks (negative idf) bm25s uses 0 while
  BM25Okapi uses ``epsilon * mean idf`` (``epsilon=0.25`` by default). This engine builds
  BM25Okapi with ``epsilon=0`` so that both floor at 0 (on SciFact, "we" is such a term).
* ``bm25+``: same formula in both (including ``delta * idf`` for query terms absent from a
  document); scores agree to float32 precision.
* ``bm25l``: NOT equivalent. rank_bm25's BM25L multiplies the term-frequency part by ``tf``
  once more, and gives query terms absent from a document 0, where bm25s gives them
  ``idf * (k1 + 1) * delta / (k1 + delta)``. Rankings differ; prefer bm25s for BM25L.
* ``lucene`` and ``atire`` exist only in bm25s.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

import numpy as np

from serve_app.chunking import collapse_to_documents, split_documents
from serve_app.config import BM25Config, ChunkingConfig
from serve_app.errors import IndexLoadError
from serve_app.filters import MetadataColumns, Node
from serve_app.fsutil import read_json
from serve_app.progress import is_terminal
from serve_app.retrieval.bm25s_engine import Bm25sEngine
from serve_app.retrieval.filtered import allowed_documents
from serve_app.types import Document, Hit

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
RANK_BM25_CLASSES = {"robertson": "BM25Okapi", "bm25l": "BM25L", "bm25+": "BM25Plus"}
RANK_BM25_OKAPI_EPSILON = 0.0

_DOC_IDS = "doc_ids.json"
_CHUNK_OWNER = "chunk_owner.npy"
_TOKENIZER = "tokenizer.json"
_TOKENS = "tokens.json"

__all__ = ["BM25Retriever", "Tokenizer", "RANK_BM25_CLASSES"]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class Tokenizer:
    """The tokenisation shared by both engines (bm25s.tokenize + PyStemmer)."""

    lowercase: bool
    stopwords: tuple[str, ...]
    stemmer: str | None
    token_pattern: str = TOKEN_PATTERN

    @classmethod
    def from_config(cls, cfg: BM25Config) -> "Tokenizer":
        from bm25s.stopwords import STOPWORDS_EN

        stopwords = {"en": tuple(STOPWORDS_EN), None: ()}[cfg.stopwords]
        return cls(lowercase=cfg.lowercase, stopwords=stopwords, stemmer=cfg.stemmer)

    def __call__(self, texts: Sequence[str]) -> list[list[str]]:
        """Tokens of each text."""
        import bm25s

        stemmer = None
        if self.stemmer is not None:
            import Stemmer  # PyStemmer; stemmer objects are not thread-safe, so one per call

            stemmer = Stemmer.Stemmer(self.stemmer)
        return bm25s.tokenize(
            list(texts),
            lower=self.lowercase,
            token_pattern=self.token_pattern,
            stopwords=list(self.stopwords),
            stemmer=stemmer,
            return_ids=False,
            show_progress=False,
        )

    def to_json(self) -> dict[str, Any]:
        return {"lowercase": self.lowercase, "stopwords": list(self.stopwords), "stemmer": self.stemmer, "token_pattern": self.token_pattern}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Tokenizer":
        return cls(lowercase=bool(obj["lowercase"]), stopwords=tuple(obj["stopwords"]), stemmer=obj["stemmer"], token_pattern=str(obj["token_pattern"]))


# --------------------------------------------------------------------------- engines


class _Engine(Protocol):
    def match(self, tokens: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """(scores of every chunk, ids of the chunks containing a query token), or None without known tokens."""
        ...

    def save(self, directory: Path) -> None: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def num_chunks(self) -> int: ...


class _RankBm25Engine:
    def __init__(self, tokens: list[list[str]], cfg: BM25Config) -> None:
        import rank_bm25

        if cfg.method not in RANK_BM25_CLASSES:
            raise ValueError(
                f"the rank_bm25 engine supports the methods {', '.join(RANK_BM25_CLASSES)}, not {cfg.method!r}; use engine 'bm25s' for {cfg.method!r}"
            )
        model_cls = getattr(rank_bm25, RANK_BM25_CLASSES[cfg.method])
        extra = {"epsilon": RANK_BM25_OKAPI_EPSILON} if cfg.method == "robertson" else {"delta": cfg.delta}
        self.tokens = tokens
        self.model = model_cls(tokens, k1=cfg.k1, b=cfg.b, **extra)
        postings: dict[str, list[int]] = defaultdict(list)
        for i, toks in enumerate(tokens):
            for t in set(toks):
                postings[t].append(i)
        self.postings = {t: np.asarray(p, dtype=np.int64) for t, p in postings.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.postings)

    @property
    def num_chunks(self) -> int:
        return len(self.tokens)

    def match(self, tokens: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        known = [t for t in tokens if t in self.postings]
        if not known:
            return None
        scores = np.asarray(self.model.get_scores(known), dtype=np.float64)
        return scores, np.unique(np.concatenate([self.postings[t] for t in set(known)]))

    def save(self, directory: Path) -> None:
        _write_json(directory / _TOKENS, self.tokens)

    @classmethod
    def load(cls, directory: Path, cfg: BM25Config) -> "_RankBm25Engine":
        tokens = _read_json(directory / _TOKENS)
        if not isinstance(tokens, list) or not all(isinstance(t, list) for t in tokens):
            raise IndexLoadError(f"{directory / _TOKENS}: expected a JSON list of token lists")
        return cls(tokens, cfg)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def _read_json(path: Path) -> Any:
    return read_json(path, "file of the BM25 index")


# --------------------------------------------------------------------------- retriever


def _top_documents(scores: np.ndarray, candidates: np.ndarray, owner: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Best ``k`` documents among the ``candidates`` chunks, fetching more chunks until ``k`` documents are filled."""
    cand_scores = scores[candidates]
    fetch = k
    while True:
        if fetch >= candidates.size:
            sel = candidates
        else:  # the `fetch` best chunks, plus any tied with the last of them
            threshold = np.partition(cand_scores, candidates.size - fetch)[candidates.size - fetch]
            sel = candidates[cand_scores >= threshold]
        sel_scores = scores[sel]
        order = np.lexsort((sel, -sel_scores))  # score descending, then chunk position
        docs = collapse_to_documents(sel[order], sel_scores[order], owner, k)
        if len(docs) == k or sel.size == candidates.size:
            return docs
        fetch *= 4


class BM25Retriever:
    """Lexical retriever (``name == "bm25"``) answering with documents; see the module docstring."""

    name = "bm25"

    def __init__(self, engine: _Engine, tokenizer: Tokenizer, cfg: BM25Config, chunking: ChunkingConfig, doc_ids: Sequence[str], chunk_owner: np.ndarray) -> None:
        self._engine = engine
        self.tokenizer = tokenizer
        self.config = cfg
        self.chunking = chunking
        self.doc_ids = list(doc_ids)
        self.chunk_owner = np.asarray(chunk_owner, dtype=np.int64)
        #: The declared metadata fields of the documents (filters), in ``doc_ids`` order; None: none declared.
        self.columns: Optional[MetadataColumns] = None

    @property
    def num_documents(self) -> int:
        return len(self.doc_ids)

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_owner.size)

    @classmethod
    def build(
        cls,
        corpus: Sequence[Document],
        cfg: BM25Config | None = None,
        chunking: ChunkingConfig | None = None,
        *,
        show_progress: bool = False,
    ) -> "BM25Retriever":
        """Tokenise the corpus (chunked as configured) and index it with the configured engine."""
        cfg = cfg or BM25Config()
        chunking = chunking or ChunkingConfig()
        if cfg.engine == "rank_bm25" and cfg.method not in RANK_BM25_CLASSES:
            raise ValueError(f"the rank_bm25 engine supports the methods {', '.join(RANK_BM25_CLASSES)}, not {cfg.method!r}; use engine 'bm25s' for {cfg.method!r}")
        docs = list(corpus)
        if not docs:
            raise ValueError("cannot build a BM25 index of an empty corpus")
        texts, owner = split_documents(docs, chunking)
        tokenizer = Tokenizer.from_config(cfg)
        tokens = tokenizer(texts)
        if not any(tokens):
            raise ValueError("no document has an indexable token (every word is a stopword or shorter than 2 characters)")
        engine: _Engine
        if cfg.engine == "bm25s":
            # bm25s draws its own bars: on a terminal only (a log gets no carriage-return redraws;
            # building BM25 takes seconds per 100k documents, so it logs no progress lines)
            engine = Bm25sEngine.build(tokens, cfg, show_progress and is_terminal(sys.stderr))
        else:
            engine = _RankBm25Engine(tokens, cfg)
        logger.info("BM25 (%s, %s): %d documents, %d chunks, %d terms", cfg.engine, cfg.method, len(docs), len(texts), engine.vocab_size)
        return cls(engine, tokenizer, cfg, chunking, [d.id for d in docs], owner)

    # ----------------------------------------------------------------- search

    def search(self, query: str, k: int, where: Optional[Node] = None) -> list[Hit]:
        """Top-``k`` documents containing a token of ``query``, best first (among those ``where`` admits)."""
        return self.search_batch([query], k, where)[0]

    def search_batch(self, queries: Sequence[str], k: int, where: Optional[Node] = None) -> list[list[Hit]]:
        """Top-``k`` documents for each query, best first. With a filter ``where``, only the
        chunks of the documents it admits are candidates, before the top-k is taken (so k
        documents come back whenever k admitted documents match)."""
        if isinstance(queries, str):
            raise TypeError("search_batch takes a sequence of queries, not a string")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if not queries:
            return []
        allowed = allowed_documents(self.columns, where, self.num_documents)
        results: list[list[Hit]] = []
        for tokens in self.tokenizer(list(queries)):
            matched = self._engine.match(tokens) if k > 0 else None
            if matched is None:
                results.append([])
                continue
            scores, candidates = matched
            if allowed is not None:
                candidates = candidates[allowed[self.chunk_owner[candidates]]]
            top = _top_documents(scores, candidates, self.chunk_owner, k)
            results.append([Hit(self.doc_ids[d], s) for d, s in top])
        return results

    # ----------------------------------------------------------------- persistence

    def save(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """Write the index into ``directory`` (created if needed); returns its manifest section."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._engine.save(d)
        _write_json(d / _DOC_IDS, self.doc_ids)
        np.save(d / _CHUNK_OWNER, self.chunk_owner, allow_pickle=False)
        _write_json(d / _TOKENIZER, self.tokenizer.to_json())
        section: dict[str, Any] = {"format_version": FORMAT_VERSION, **self.config.model_dump()}
        section.update(
            token_pattern=self.tokenizer.token_pattern,
            num_documents=self.num_documents,
            num_chunks=self.num_chunks,
            vocab_size=self._engine.vocab_size,
            chunking=self.chunking.model_dump(),
            libraries={"bm25s": _version("bm25s"), "rank_bm25": _version("rank-bm25"), "PyStemmer": _version("PyStemmer")},
        )
        if self.config.engine == "rank_bm25":
            section["rank_bm25_class"] = RANK_BM25_CLASSES[self.config.method]
            if self.config.method == "robertson":
                section["rank_bm25_epsilon"] = RANK_BM25_OKAPI_EPSILON
        return section

    @classmethod
    def load(cls, directory: str | os.PathLike[str], section: Mapping[str, Any], mmap: bool = True) -> "BM25Retriever":
        """Open an index written by :meth:`save`; ``section`` is what ``save`` returned.

        Raises :class:`IndexLoadError` for missing or inconsistent files or an unknown format.
        """
        d = Path(directory)
        if not d.is_dir():
            raise IndexLoadError(f"{d}: BM25 index directory missing")
        if section.get("format_version") != FORMAT_VERSION:
            raise IndexLoadError(f"{d}: unsupported BM25 index format {section.get('format_version')!r} (this version reads {FORMAT_VERSION})")
        try:
            cfg = BM25Config(**{k: section[k] for k in BM25Config.model_fields})
            chunking = ChunkingConfig(**section["chunking"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexLoadError(f"{d}: invalid BM25 manifest section ({exc})") from None
        tokenizer = Tokenizer.from_json(_read_json(d / _TOKENIZER))
        if (tokenizer.lowercase, tokenizer.stemmer) != (cfg.lowercase, cfg.stemmer):
            raise IndexLoadError(f"{d}: tokenizer settings disagree with the manifest")
        doc_ids = _read_json(d / _DOC_IDS)
        try:
            owner = np.load(d / _CHUNK_OWNER, allow_pickle=False)
        except FileNotFoundError:
            raise IndexLoadError(f"{d / _CHUNK_OWNER}: missing file of the BM25 index") from None
        except ValueError as exc:
            raise IndexLoadError(f"{d / _CHUNK_OWNER}: unreadable ({exc})") from None
        try:
            engine: _Engine = Bm25sEngine.load(d, mmap) if cfg.engine == "bm25s" else _RankBm25Engine.load(d, cfg)
        except IndexLoadError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexLoadError(f"{d}: cannot load the {cfg.engine} index ({type(exc).__name__}: {exc})") from exc
        counts = {"documents": (len(doc_ids), section.get("num_documents")), "chunks": (owner.size, section.get("num_chunks")), "engine chunks": (engine.num_chunks, section.get("num_chunks"))}
        for what, (found, expected) in counts.items():
            if found != expected:
                raise IndexLoadError(f"{d}: {what}: found {found}, the manifest says {expected}")
        if owner.size and (owner.min() < 0 or owner.max() >= len(doc_ids)):
            raise IndexLoadError(f"{d / _CHUNK_OWNER}: chunk owner out of range")
        return cls(engine, tokenizer, cfg, chunking, doc_ids, owner)

    # ----------------------------------------------------------------- sharding

    def split(self, bounds: Sequence[tuple[int, int]]) -> list["BM25Retriever"]:
        """Shard this retriever by document: shard ``i`` holds the documents ``bounds[i]``
        (``[start, end)`` positions), with scores bit-identical to this retriever's.

        Each shard keeps the postings (chunk, precomputed score) of its own chunks, renumbered
        from 0, with the whole vocabulary and the non-occurrence scores, so the whole corpus's
        statistics stay in every score (see :mod:`serve_app.retrieval.sharding`). Only the
        bm25s engine can be split: rank_bm25 recomputes statistics from its own documents.
        """
        engine = self._engine
        if not isinstance(engine, Bm25sEngine):
            raise ValueError(f"sharded BM25 needs the bm25s engine; {self.config.engine!r} recomputes corpus statistics per shard (use engine: bm25s)")
        owner = self.chunk_owner
        if owner.size and np.any(np.diff(owner) < 0):
            raise ValueError("chunks are not in document order; cannot shard by document range")
        chunk_bounds = []
        for start, end in bounds:
            if not 0 <= start < end <= self.num_documents:
                raise ValueError(f"invalid shard bounds [{start}, {end}) for {self.num_documents} documents")
            chunk_bounds.append(tuple(int(x) for x in np.searchsorted(owner, [start, end], side="left")))
        out = []
        for (start, end), (c0, c1), shard in zip(bounds, chunk_bounds, engine.split(chunk_bounds)):
            out.append(BM25Retriever(shard, self.tokenizer, self.config, self.chunking, self.doc_ids[start:end], owner[c0:c1] - start))
            if self.columns is not None:
                out[-1].columns = self.columns.take(range(start, end))
        return out

    def split_by_documents(self, positions: Sequence[Sequence[int]]) -> list["BM25Retriever"]:
        """Shard by explicit document sets: shard ``i`` holds the documents at ``positions[i]``
        (ascending), with scores bit-identical to this retriever's (as :meth:`split`). A merge
        of live writes keeps every document in the shard that already held it this way."""
        engine = self._engine
        if not isinstance(engine, Bm25sEngine):
            raise ValueError(f"sharded BM25 needs the bm25s engine; {self.config.engine!r} recomputes corpus statistics per shard (use engine: bm25s)")
        out = []
        for pos in positions:
            pos = np.asarray(pos, dtype=np.int64)
            if pos.size == 0 or np.any(np.diff(pos) <= 0) or pos[0] < 0 or pos[-1] >= self.num_documents:
                raise ValueError("each shard needs a non-empty ascending list of document positions inside the index")
            chunks = np.flatnonzero(np.isin(self.chunk_owner, pos))
            (shard,) = engine.split([chunks])
            out.append(BM25Retriever(shard, self.tokenizer, self.config, self.chunking, [self.doc_ids[i] for i in pos], np.searchsorted(pos, self.chunk_owner[chunks])))
            if self.columns is not None:
                out[-1].columns = self.columns.take(pos)
        return out
