"""Reranker: scores the documents of one or many queries with a reranker model (any family:
:func:`serve_app.rerank.load_scorer`).

Long documents (``cfg.long_documents``):

* ``truncate``: one (query, document) pair per document; the scorer cuts the document
  side to the pair limit, so only the head of a long document is read;
* ``max_chunk``: the document is cut into windows of ``cfg.chunk_tokens`` tokens of the
  cross-encoder's tokenizer, one every ``cfg.chunk_stride`` tokens (the last window ends at
  the document's end, as in ``serve_app.chunking.word_windows``), at most
  ``cfg.max_chunks_per_doc`` windows from the start; each window is the original text
  between its first and last token's character offsets. A document's score is its best
  window's score. A document that fits one window is scored whole, exactly as ``truncate``
  scores it.

``max_tokens_per_doc`` (Cohere's rerank parameter) limits the document tokens read per
document: in ``truncate`` mode the pair limit becomes query + special tokens +
``max_tokens_per_doc`` (never above the scorer's limit); in ``max_chunk`` mode windows
only cover the first ``max_tokens_per_doc`` tokens and pairs get the same limit.

Per request (:class:`serve_app.types.RerankRequest`): ``max_chunks`` scores up to that many
windows of each document (``max_chunk`` for this request alone, whatever ``long_documents``
says); ``truncation_direction="left"`` keeps the *end* of a document that does not fit instead
of its start; ``truncate=False`` refuses (:meth:`Reranker.too_long`) a pair that would be cut;
``instruction`` replaces a decoder reranker's configured instruction (:meth:`Reranker.check`
refuses it for other families, and a query whose prompt leaves no room for a document).

``rerank_many`` expands all pairs of all requests and scores them in ONE scorer call, so
concurrent requests gathered by Ray Serve's ``@serve.batch`` share forward passes.

With a :class:`~serve_app.rerank.cache.ScoreCache` (``cache``), a document whose score for the
query is cached under the same model, effective pair limit and reading (truncation side,
chunk windows, instruction) is not scored again: :meth:`Reranker.cached` answers those, and
``rerank_many`` scores only the rest and stores their scores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from serve_app.config import RerankerModelConfig
from serve_app.errors import InputRejected
from serve_app.rerank.cache import CacheContext, ScoreCache, doc_digest
from serve_app.rerank.loading import load_scorer
from serve_app.rerank.scorer import PairScorer
from serve_app.types import RerankRequest

__all__ = ["CacheLookup", "RerankRequest", "Reranker"]


@dataclass(frozen=True)
class CacheLookup:
    """One request's cache lookup: its key context, its documents' digests and the scores found
    (None: a miss)."""

    context: CacheContext
    digests: list[bytes]
    found: list[float | None]

    @property
    def hits(self) -> int:
        return sum(1 for s in self.found if s is not None)

    @property
    def complete(self) -> bool:
        """Whether every document's score was found (no model call needed)."""
        return all(s is not None for s in self.found)


def _validate(request: RerankRequest, where: str) -> None:
    if not isinstance(request.query, str):
        raise TypeError(f"{where}query must be a string, got {type(request.query).__name__}")
    if isinstance(request.documents, (str, bytes)):
        raise TypeError(f"{where}documents must be a sequence of strings, not a single string")
    for i, doc in enumerate(request.documents):
        if not isinstance(doc, str):
            raise TypeError(f"{where}documents[{i}] must be a string, got {type(doc).__name__}")
    for name in ("max_tokens_per_doc", "max_chunks"):
        m = getattr(request, name)
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1):
            raise ValueError(f"{where}{name} must be a positive integer or null, got {m!r}")
    if request.truncation_direction not in ("right", "left"):
        raise ValueError(f"{where}truncation_direction must be 'right' or 'left', got {request.truncation_direction!r}")
    if request.instruction is not None and not isinstance(request.instruction, str):
        raise TypeError(f"{where}instruction must be a string or null, got {type(request.instruction).__name__}")


class Reranker:
    """Reranking of documents, one request or many in one scorer call."""

    def __init__(self, scorer: PairScorer, cfg: RerankerModelConfig, cache: ScoreCache | None = None, name: str = "default") -> None:
        self.scorer = scorer
        self.cfg = cfg
        #: Pair scores kept across calls (None: none); ``name`` keys this model's entries.
        self.cache = cache if cache is not None and cache.enabled else None
        self.name = name
        if cfg.long_documents == "max_chunk":
            self._need_offsets("reranker.long_documents=max_chunk")

    def _need_offsets(self, what: str) -> None:
        if not getattr(self.scorer.tokenizer, "is_fast", False):
            raise ValueError(
                f"{what} needs a fast (Rust) tokenizer for character offsets; "
                f"the tokenizer of {self.scorer.model_name!r} is not one (use long_documents=truncate)"
            )

    @classmethod
    def from_config(cls, cfg: RerankerModelConfig, cache: ScoreCache | None = None, name: str = "default") -> "Reranker":
        """Load the model ``cfg`` names (its family, runtime and drift check: ``load_scorer``) and rerank with it."""
        return cls(load_scorer(cfg), cfg, cache, name)

    def pair_limit(self, req: RerankRequest) -> int:
        """Tokens per pair for ``req``: the model's limit, lowered by ``max_tokens_per_doc``."""
        limit = self.scorer.max_length
        if req.max_tokens_per_doc is not None:
            wanted = self.scorer.query_overhead(req.query, req.instruction) + int(req.max_tokens_per_doc)
            limit = min(limit, max(wanted, self.scorer.min_pair_length))
        return limit

    def _reading(self, req: RerankRequest) -> tuple:
        """How ``req``'s documents are read, besides the pair limit (part of the cache key)."""
        if req.max_chunks is not None or self.cfg.long_documents == "max_chunk":
            how: tuple = ("chunks", req.max_tokens_per_doc, req.max_chunks or self.cfg.max_chunks_per_doc, self.cfg.chunk_tokens, self.cfg.chunk_stride)
        else:
            how = (req.truncation_direction,)
        return (*how, req.instruction)

    def _context(self, req: RerankRequest) -> CacheContext:
        assert self.cache is not None
        return self.cache.context(self.name, self.pair_limit(req), self._reading(req))

    def cached(self, req: RerankRequest, *, count: bool = True) -> list[float | None]:
        """Each document's cached score for ``req`` (None: not cached; all None without a cache)."""
        if self.cache is None:
            return [None] * len(req.documents)
        _validate(req, "")
        return self.cache.get(self._context(req), req.query, req.documents, count=count)

    def lookup(self, req: RerankRequest) -> CacheLookup | None:
        """The request's one cache lookup (hits and misses counted here), to hand to
        :meth:`rerank_many_detailed` so that the documents it found are not looked up again;
        None without a cache."""
        if self.cache is None:
            return None
        _validate(req, "")
        ctx = self._context(req)
        digests = [doc_digest(d) for d in req.documents]
        return CacheLookup(ctx, digests, self.cache.get(ctx, req.query, req.documents, digests))

    def check(self, request: RerankRequest) -> None:
        """:class:`~serve_app.errors.InputRejected` for a request this model cannot take: an
        instruction sent to a model without a prompt, or (decoder rerankers) a query whose
        prompt alone leaves no room for a document (``InputTooLong``)."""
        if request.instruction is None and not self.scorer.accepts_instruction:
            return
        if not self.scorer.accepts_instruction:
            raise InputRejected(f"instruction applies only to decoder rerankers (kind causal_lm); this model ({self.scorer.model_name}) is {self.scorer.kind}: leave instruction out")
        self.scorer.pairs.check_fits(request.query, request.instruction)

    def _offsets(self, document: str) -> list[tuple[int, int]]:
        return self.scorer.tokenizer(document, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]

    def windows(self, document: str, max_tokens: int | None = None, max_chunks: int | None = None) -> list[str]:
        """The texts ``max_chunk`` scores for ``document`` (the document itself when it fits one
        window), at most ``max_chunks`` of them (default ``cfg.max_chunks_per_doc``)."""
        size, stride = self.cfg.chunk_tokens, self.cfg.chunk_stride
        offsets = self._offsets(document)
        n = len(offsets) if max_tokens is None else min(len(offsets), max_tokens)
        if n <= size:
            return [document]
        starts = list(range(0, n - size + 1, stride))
        if starts[-1] + size < n:
            starts.append(n - size)
        starts = starts[: max_chunks or self.cfg.max_chunks_per_doc]
        return [document[offsets[s][0] : offsets[s + size - 1][1]] for s in starts]

    def tail(self, document: str, tokens: int) -> str:
        """The end of ``document`` that holds its last ``tokens`` tokens (the whole document when shorter)."""
        offsets = self._offsets(document)
        if len(offsets) <= tokens:
            return document
        return document[offsets[len(offsets) - tokens][0] :]

    def too_long(self, request: RerankRequest) -> list[int]:
        """Positions of the documents whose pair with the query exceeds the model's ``max_length``
        (what ``truncate=False`` refuses)."""
        overhead = self.scorer.query_overhead(request.query, request.instruction)
        limit = self.scorer.max_length
        return [i for i, doc in enumerate(request.documents) if overhead + len(self.scorer.pairs.token_ids(doc)) > limit]

    def _texts_of(self, req: RerankRequest, limit: int) -> Any:
        """A function giving what is scored for one document of ``req``: its windows, its tail
        (``truncation_direction=left``), or itself."""
        if req.max_chunks is not None or self.cfg.long_documents == "max_chunk":
            if req.max_chunks is not None:
                self._need_offsets("max_chunks (max_chunks_per_doc)")
            return lambda doc: self.windows(doc, req.max_tokens_per_doc, req.max_chunks)
        if req.truncation_direction == "left":
            self._need_offsets("truncation_direction=left")
            budget = max(1, limit - self.scorer.query_overhead(req.query, req.instruction))
            return lambda doc: [self.tail(doc, budget)]
        return lambda doc: [doc]

    def rerank(self, query: str, documents: Sequence[str], max_tokens_per_doc: int | None = None) -> np.ndarray:
        """Scores of ``documents`` for ``query`` (float32, input order, higher is more relevant)."""
        return self.rerank_many([RerankRequest(query, documents, max_tokens_per_doc)])[0]

    def rerank_many(self, requests: Sequence[RerankRequest]) -> list[np.ndarray]:
        """Each request's document scores, all pairs scored in one ``scorer.score`` call."""
        return [scores for scores, _, _ in self.rerank_many_detailed(requests)]

    def rerank_many_detailed(self, requests: Sequence[RerankRequest], lookups: Sequence[CacheLookup | None] | None = None, wanted: Callable[[int], bool] | None = None) -> list[tuple[np.ndarray, int, int]]:
        """(document scores, pairs scored, tokens read) of each request, all pairs in one scorer call
        (only the documents the cache does not answer are scored). ``lookups``: each request's
        :meth:`lookup` when it was made already (None entries are looked up here). ``wanted(r)``,
        asked before each forward pass: False drops request ``r``'s pairs not scored yet (it was
        cancelled); its unscored documents get NaN and nothing of it is cached."""
        if self.cache is not None:
            return self._rerank_many_cached(requests, lookups, wanted)
        return self._rerank_many_uncached(requests, wanted)

    def _rerank_many_cached(self, requests: Sequence[RerankRequest], lookups: Sequence[CacheLookup | None] | None, wanted: Callable[[int], bool] | None = None) -> list[tuple[np.ndarray, int, int]]:
        assert self.cache is not None
        for r, req in enumerate(requests):
            _validate(req, f"requests[{r}]." if len(requests) > 1 else "")
        done = [lk if lk is not None else self.lookup(req) for req, lk in zip(requests, lookups or [None] * len(requests))]
        contexts = [lk.context for lk in done]  # type: ignore[union-attr]
        digests = [lk.digests for lk in done]  # type: ignore[union-attr]
        found = [lk.found for lk in done]  # type: ignore[union-attr]
        misses = [[i for i, s in enumerate(f) if s is None] for f in found]
        todo = [replace(req, documents=[req.documents[i] for i in miss]) for req, miss in zip(requests, misses)]
        scored = self._rerank_many_uncached(todo, wanted)
        out = []
        for r, (ctx, req, dg, f, miss, (scores, pairs, tokens)) in enumerate(zip(contexts, requests, digests, found, misses, scored)):
            if wanted is None or wanted(r):
                self.cache.put(ctx, req.query, [req.documents[i] for i in miss], scores.tolist(), [dg[i] for i in miss])
            full = np.asarray([np.nan if s is None else s for s in f], dtype=np.float32)
            if miss:
                full[np.asarray(miss, dtype=np.int64)] = scores
            out.append((full, pairs, tokens))
        return out

    def _rerank_many_uncached(self, requests: Sequence[RerankRequest], wanted: Callable[[int], bool] | None = None) -> list[tuple[np.ndarray, int, int]]:
        pairs: list[tuple[str, str]] = []
        instructions: list[str | None] = []
        limits: list[int] = []
        owner: list[int] = []  # pair -> document position across all requests
        asker: list[int] = []  # pair -> request
        n_docs: list[int] = []
        doc_pos = 0
        for r, req in enumerate(requests):
            _validate(req, f"requests[{r}]." if len(requests) > 1 else "")
            self.check(req)
            limit = self.pair_limit(req)
            texts_of = self._texts_of(req, limit)
            for doc in req.documents:
                for text in texts_of(doc):
                    pairs.append((req.query, text))
                    instructions.append(req.instruction)
                    limits.append(limit)
                    owner.append(doc_pos)
                    asker.append(r)
                doc_pos += 1
            n_docs.append(len(req.documents))
        doc_scores = np.full(doc_pos, -np.inf, dtype=np.float32)
        lengths: list[int] = []
        done = np.ones(len(pairs), dtype=bool)
        if pairs:
            extra = {"instructions": instructions} if any(i is not None for i in instructions) else {}
            if wanted is not None:
                extra["wanted"] = lambda i: wanted(asker[i])
            scores, lengths = self.scorer.score_with_lengths(pairs, max_length=limits, **extra)
            if wanted is not None:
                done = ~np.isnan(scores)
            np.maximum.at(doc_scores, np.asarray(owner, dtype=np.int64)[done], scores[done])
            if not done.all():  # documents of cancelled requests left unscored: no pair of theirs ran
                doc_scores[np.isneginf(doc_scores)] = np.nan
        bounds = np.cumsum([0, *n_docs])
        pair_owner = np.searchsorted(bounds, np.asarray(owner, dtype=np.int64), side="right") - 1  # pair -> request
        pairs_of = np.bincount(pair_owner, weights=done, minlength=len(requests)) if pairs else np.zeros(len(requests), dtype=np.int64)
        tokens_of = np.bincount(pair_owner, weights=lengths, minlength=len(requests)) if pairs else np.zeros(len(requests))
        return [(doc_scores[bounds[i] : bounds[i + 1]].copy(), int(pairs_of[i]), int(tokens_of[i])) for i in range(len(requests))]
