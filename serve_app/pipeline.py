"""The retrieval funnel: retrieve (BM25, dense) -> fuse -> rerank the head -> return the top.

The funnel is exposed as small steps that both the in-process :class:`SearchPipeline` and the
Ray Serve ingress (which runs retrieval and reranking through deployment handles) call:

1. :func:`resolve_funnel` applies defaults and validates sizes against :class:`FunnelLimits`;
2. each retriever returns its top ``top_k`` documents;
3. :func:`fuse_candidates` merges them (RRF or weighted fusion, ``FusionConfig``);
4. :func:`select_for_rerank` takes the first ``rerank_top_m`` fused candidates;
5. :func:`apply_rerank` orders those by cross-encoder score (or blends it with the fused rank);
6. :func:`assemble` keeps ``top_n`` results, attaches documents and timings.

Sizes. ``top_k`` is per retriever, so the fused pool has at most ``top_k * len(retrievers)``
documents. An explicit ``rerank_top_m`` or ``top_n`` larger than that pool is an error; a
*default* larger than the pool is lowered to the pool size. ``rerank_top_m = 0`` disables
reranking (as does a pipeline without a reranker, where an explicit ``rerank_top_m > 0`` is an
error). When ``top_n > rerank_top_m > 0`` the results are the reranked ``rerank_top_m``
candidates in rerank order, followed by the remaining fused candidates in fused order (their
``rerank_score`` is None); a result's ``score`` is its rerank score when it was reranked (its
blended score under ``FusionConfig.rerank_blend = "rrf"``), its fused score otherwise.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Sequence

import numpy as np

from serve_app.config import CrossEncoderConfig, FunnelLimits, FusionConfig
from serve_app.errors import FunnelError
from serve_app.retrieval.fusion import FusedHit, fuse
from serve_app.types import Document, Hit, Retriever

if TYPE_CHECKING:  # the reranker pulls in torch; imported only where used
    from serve_app.rerank.reranker import Reranker

logger = logging.getLogger(__name__)

KNOWN_RETRIEVERS: tuple[str, ...] = ("bm25", "dense")


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class FunnelRequest:
    """A search request as received; None means "use the configured default"."""

    query: str
    top_k: int | None = None
    rerank_top_m: int | None = None
    top_n: int | None = None
    retrievers: Sequence[str] | None = None


@dataclass(frozen=True)
class ResolvedFunnel:
    """A validated request with every size decided."""

    query: str
    top_k: int
    rerank_top_m: int
    top_n: int
    retrievers: tuple[str, ...]

    @property
    def rerank(self) -> bool:
        """Whether the cross-encoder runs for this request."""
        return self.rerank_top_m > 0

    @property
    def pool_size(self) -> int:
        """Most candidates the fused list can hold."""
        return self.top_k * len(self.retrievers)


def _check_int(name: str, value: Any, lo: int, hi: int, hi_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise FunnelError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise FunnelError(f"{name}={value} is below the minimum {lo}")
    if value > hi:
        raise FunnelError(f"{name}={value} exceeds {hi_name}={hi}")
    return int(value)


def _resolve_retrievers(requested: Sequence[str] | None, available: Sequence[str]) -> tuple[str, ...]:
    if not available:
        raise FunnelError("no retriever is available in this pipeline")
    if requested is None:
        return tuple(available)
    if isinstance(requested, str):
        requested = [requested]
    names = list(requested)
    if not names:
        raise FunnelError(f"retrievers must name at least one of {list(available)}")
    for name in names:
        if name not in available:
            what = "unknown retriever" if name not in KNOWN_RETRIEVERS else "retriever not available in this index"
            raise FunnelError(f"retrievers: {what} {name!r}; available: {list(available)}")
    return tuple(n for n in available if n in names)  # canonical order, duplicates dropped


def resolve_funnel(
    request: FunnelRequest,
    limits: FunnelLimits,
    available_retrievers: Sequence[str],
    *,
    rerank_available: bool = True,
) -> ResolvedFunnel:
    """Apply defaults to ``request`` and validate it; raises :class:`FunnelError` naming the field.

    See the module docstring for how defaults interact with the pool size.
    """
    if not isinstance(request.query, str) or not request.query.strip():
        raise FunnelError(f"query must be a non-empty string, got {request.query!r}")
    retrievers = _resolve_retrievers(request.retrievers, list(available_retrievers))

    if request.top_k is None:
        top_k = limits.default_top_k
    else:
        top_k = _check_int("top_k", request.top_k, 1, limits.max_top_k, "max_top_k")
    pool = top_k * len(retrievers)

    if request.rerank_top_m is None:
        rerank_top_m = min(limits.default_rerank_top_m, pool) if rerank_available else 0
    else:
        rerank_top_m = _check_int("rerank_top_m", request.rerank_top_m, 0, limits.max_rerank_top_m, "max_rerank_top_m")
        if rerank_top_m > 0 and not rerank_available:
            raise FunnelError(f"rerank_top_m={rerank_top_m} but this pipeline has no reranker (use 0)")
        if rerank_top_m > pool:
            raise FunnelError(f"rerank_top_m={rerank_top_m} exceeds the candidate pool top_k * retrievers = {top_k} * {len(retrievers)} = {pool}")

    if request.top_n is None:
        top_n = min(limits.default_top_n, pool)
    else:
        top_n = _check_int("top_n", request.top_n, 1, limits.max_top_n, "max_top_n")
        if top_n > pool:
            raise FunnelError(f"top_n={top_n} exceeds the candidate pool top_k * retrievers = {top_k} * {len(retrievers)} = {pool}")
    return ResolvedFunnel(request.query, top_k, rerank_top_m, top_n, retrievers)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RankedCandidate:
    """A fused candidate in final order, with its rerank score when it was reranked."""

    hit: FusedHit
    rerank_score: float | None = None
    blended_score: float | None = None


@dataclass(frozen=True)
class SearchResultItem:
    """One returned document with the scores of every stage that saw it."""

    doc_id: str
    score: float
    rerank_score: float | None
    fused_score: float
    retriever_ranks: dict[str, int]
    retriever_scores: dict[str, float]
    document: Document | None = None


@dataclass(frozen=True)
class SearchResult:
    """Results best first, per-stage wall times in milliseconds, and the retrievers that failed."""

    results: list[SearchResultItem]
    timings_ms: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    funnel: ResolvedFunnel | None = None


# --------------------------------------------------------------------------- steps


def fuse_candidates(ranked: Mapping[str, Sequence[Hit]], cfg: FusionConfig) -> list[FusedHit]:
    """All candidates of the retrievers that answered, fused into one deduplicated list."""
    return fuse(ranked, cfg)


def select_for_rerank(fused: Sequence[FusedHit], funnel: ResolvedFunnel) -> list[FusedHit]:
    """The head of the fused list that the cross-encoder scores (empty when reranking is off)."""
    return list(fused[: funnel.rerank_top_m])


def apply_rerank(fused: Sequence[FusedHit], scores: Sequence[float] | np.ndarray, cfg: FusionConfig | None = None) -> list[RankedCandidate]:
    """Order the first ``len(scores)`` fused candidates by rerank score; the rest keep fused order.

    ``scores[i]`` belongs to ``fused[i]``. Equal rerank scores keep their fused order (stable).
    A NaN score ranks below every number. With ``cfg.rerank_blend == "rrf"`` the head is ordered
    by ``rerank_weight / (rrf_k + rerank rank) + 1 / (rrf_k + fused rank)`` instead (ranks from 1;
    ties keep the fused order), and each candidate carries that sum as ``blended_score``.
    """
    values = [float(s) for s in np.asarray(scores, dtype=np.float64).reshape(-1)]
    if len(values) > len(fused):
        raise ValueError(f"{len(values)} rerank scores for {len(fused)} candidates")
    head = sorted(range(len(values)), key=lambda i: -values[i] if not math.isnan(values[i]) else math.inf)
    if cfg is not None and cfg.rerank_blend == "rrf" and values:
        k, w = cfg.rrf_k, cfg.rerank_weight
        blended = [0.0] * len(values)
        for rerank_rank, i in enumerate(head, start=1):
            blended[i] = w / (k + rerank_rank) + 1.0 / (k + i + 1)
        order = sorted(range(len(values)), key=lambda i: -blended[i])
        out = [RankedCandidate(fused[i], values[i], blended[i]) for i in order]
    else:
        out = [RankedCandidate(fused[i], values[i]) for i in head]
    out.extend(RankedCandidate(h) for h in fused[len(values) :])
    return out


def assemble(
    ranked: Sequence[RankedCandidate],
    funnel: ResolvedFunnel,
    *,
    documents: Callable[[str], Document | None] | None = None,
    timings_ms: Mapping[str, float] | None = None,
    degraded: Sequence[str] = (),
) -> SearchResult:
    """The first ``funnel.top_n`` candidates as a :class:`SearchResult`.

    ``documents`` (e.g. ``corpus.get``) attaches each result's document when given.
    """
    items = []
    for c in ranked[: funnel.top_n]:
        h = c.hit
        items.append(
            SearchResultItem(
                doc_id=h.doc_id,
                score=c.blended_score if c.blended_score is not None else c.rerank_score if c.rerank_score is not None else h.score,
                rerank_score=c.rerank_score,
                fused_score=h.score,
                retriever_ranks=dict(h.ranks),
                retriever_scores=dict(h.scores),
                document=documents(h.doc_id) if documents is not None else None,
            )
        )
    return SearchResult(items, dict(timings_ms or {}), list(degraded), funnel)


# --------------------------------------------------------------------------- in-process runner


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class SearchPipeline:
    """The whole funnel in one process (library use, evaluation, tests).

    ``retrievers`` maps names (``"bm25"``, ``"dense"``) to objects of the ``Retriever``
    protocol; ``reranker`` may be None (no reranking). ``corpus`` provides the document texts
    for the reranker and for ``return_documents`` (anything with ``get(doc_id)``).
    """

    def __init__(
        self,
        corpus: Any,
        retrievers: Mapping[str, Retriever],
        reranker: "Reranker | None" = None,
        fusion: FusionConfig | None = None,
        limits: FunnelLimits | None = None,
    ) -> None:
        if not retrievers:
            raise ValueError("SearchPipeline needs at least one retriever")
        unknown = [n for n in retrievers if n not in KNOWN_RETRIEVERS]
        if unknown:
            raise ValueError(f"unknown retriever name(s) {unknown}; expected names among {list(KNOWN_RETRIEVERS)}")
        self.corpus = corpus
        self.retrievers = dict(retrievers)
        self.reranker = reranker
        self.fusion = fusion or FusionConfig()
        self.limits = limits or FunnelLimits()

    @property
    def available_retrievers(self) -> list[str]:
        """Retriever names in canonical order (bm25 before dense)."""
        return [n for n in KNOWN_RETRIEVERS if n in self.retrievers]

    def resolve(self, request: FunnelRequest) -> ResolvedFunnel:
        """Validate ``request`` against this pipeline's limits, retrievers and reranker."""
        return resolve_funnel(request, self.limits, self.available_retrievers, rerank_available=self.reranker is not None)

    def _content(self, doc_id: str) -> str:
        doc = self.corpus.get(doc_id)
        if doc is None:
            raise KeyError(f"retrieved document {doc_id!r} is not in the corpus")
        return doc.content

    def search(
        self,
        query: str,
        top_k: int | None = None,
        rerank_top_m: int | None = None,
        top_n: int | None = None,
        retrievers: Sequence[str] | None = None,
        return_documents: bool = False,
    ) -> SearchResult:
        """Run the funnel for one query.

        A retriever that raises is logged and listed in ``degraded``; the others' results are
        used. If every requested retriever fails, the first error is raised.
        """
        t0 = time.perf_counter()
        funnel = self.resolve(FunnelRequest(query, top_k, rerank_top_m, top_n, retrievers))
        timings: dict[str, float] = {}
        ranked: dict[str, list[Hit]] = {}
        errors: dict[str, BaseException] = {}
        for name in funnel.retrievers:
            t = time.perf_counter()
            try:
                ranked[name] = self.retrievers[name].search(funnel.query, funnel.top_k)
            except Exception as exc:  # noqa: BLE001 - degrade to the other retriever
                logger.warning("retriever %s failed: %s: %s", name, type(exc).__name__, exc)
                errors[name] = exc
            timings[name] = _ms(t)
        if not ranked:
            first = next(iter(errors.values()))
            raise RuntimeError("every retriever failed: " + "; ".join(f"{n}: {type(e).__name__}: {e}" for n, e in errors.items())) from first

        t = time.perf_counter()
        fused = fuse_candidates(ranked, self.fusion)
        timings["fusion"] = _ms(t)

        head = select_for_rerank(fused, funnel)
        scores: np.ndarray = np.zeros(0, dtype=np.float32)
        if head:
            assert self.reranker is not None  # resolve() guarantees it
            t = time.perf_counter()
            scores = self.reranker.rerank(funnel.query, [self._content(h.doc_id) for h in head])
            timings["rerank"] = _ms(t)
        final = apply_rerank(fused, scores, self.fusion)
        timings["total"] = _ms(t0)
        return assemble(final, funnel, documents=self.corpus.get if return_documents else None, timings_ms=timings, degraded=list(errors))

    def search_batch(
        self,
        queries: Sequence[str],
        top_k: int | None = None,
        rerank_top_m: int | None = None,
        top_n: int | None = None,
        retrievers: Sequence[str] | None = None,
        return_documents: bool = False,
        rerank_queries_per_call: int = 8,
        show_progress: bool = False,
    ) -> list[SearchResult]:
        """Run the funnel for many queries (evaluation): batched retrieval and reranking.

        Retrievers run ``search_batch`` over all queries; reranking goes through
        ``reranker.rerank_many`` with ``rerank_queries_per_call`` queries per call. Errors are
        raised, not degraded. Each result's ``timings_ms`` holds the batch's stage times
        divided by the number of queries (amortised per query).
        """
        if rerank_queries_per_call < 1:
            raise ValueError(f"rerank_queries_per_call must be >= 1, got {rerank_queries_per_call}")
        queries = list(queries)
        if not queries:
            return []
        t0 = time.perf_counter()
        funnels = [self.resolve(FunnelRequest(q, top_k, rerank_top_m, top_n, retrievers)) for q in queries]
        names, k = funnels[0].retrievers, funnels[0].top_k
        timings: dict[str, float] = {}
        per_retriever: dict[str, list[list[Hit]]] = {}
        for name in names:
            t = time.perf_counter()
            per_retriever[name] = self.retrievers[name].search_batch(queries, k)
            timings[name] = _ms(t)
            if len(per_retriever[name]) != len(queries):
                raise RuntimeError(f"retriever {name} returned {len(per_retriever[name])} result lists for {len(queries)} queries")

        t = time.perf_counter()
        fused_all = [fuse_candidates({n: per_retriever[n][i] for n in names}, self.fusion) for i in range(len(queries))]
        timings["fusion"] = _ms(t)

        heads = [select_for_rerank(f, fn) for f, fn in zip(fused_all, funnels)]
        scores_all: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * len(queries)
        if any(heads):
            from serve_app.rerank.reranker import RerankRequest

            assert self.reranker is not None
            t = time.perf_counter()
            todo = [i for i, h in enumerate(heads) if h]
            chunks = [todo[s : s + rerank_queries_per_call] for s in range(0, len(todo), rerank_queries_per_call)]
            progress = _progress(len(todo), "rerank", show_progress)
            for chunk in chunks:
                requests = [RerankRequest(queries[i], [self._content(h.doc_id) for h in heads[i]]) for i in chunk]
                for i, s in zip(chunk, self.reranker.rerank_many(requests)):
                    scores_all[i] = s
                progress(len(chunk))
            timings["rerank"] = _ms(t)
        finals = [apply_rerank(f, s, self.fusion) for f, s in zip(fused_all, scores_all)]
        timings["total"] = _ms(t0)
        per_query = {key: v / len(queries) for key, v in timings.items()}
        getter = self.corpus.get if return_documents else None
        return [assemble(f, fn, documents=getter, timings_ms=per_query) for f, fn in zip(finals, funnels)]

    @classmethod
    def from_index(
        cls,
        index_dir: str | Path,
        reranker_cfg: CrossEncoderConfig | None = None,
        fusion: FusionConfig | None = None,
        limits: FunnelLimits | None = None,
        retrievers: Collection[str] | None = None,
        **load_kwargs: Any,
    ) -> "SearchPipeline":
        """A pipeline over an index built by ``serve_app.index_store.build_index``.

        ``retrievers`` limits which of the index's retrievers are used (default: all it has);
        ``reranker_cfg`` loads a cross-encoder reranker; ``load_kwargs`` go to ``load_index``.
        """
        from serve_app.index_store import load_index

        loaded = load_index(index_dir, **load_kwargs)
        found: dict[str, Retriever] = {}
        for name in KNOWN_RETRIEVERS:
            r = getattr(loaded, name, None)
            if r is not None and (retrievers is None or name in retrievers):
                found[name] = r
        if retrievers is not None:
            missing = [n for n in retrievers if n not in found]
            if missing:
                raise FunnelError(f"the index at {index_dir} has no {', '.join(missing)} retriever (it has: {[n for n in KNOWN_RETRIEVERS if getattr(loaded, n, None) is not None]})")
        if not found:
            raise FunnelError(f"the index at {index_dir} has no retriever")
        reranker = None
        if reranker_cfg is not None:
            from serve_app.rerank import CrossEncoderScorer, Reranker

            reranker = Reranker(CrossEncoderScorer(reranker_cfg), reranker_cfg)
        return cls(loaded.corpus, found, reranker, fusion, limits)


def _progress(total: int, desc: str, enabled: bool) -> Callable[[int], None]:
    """A callback advancing a tqdm bar (a no-op when disabled)."""
    if not enabled:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="query")

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance
