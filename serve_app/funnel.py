"""The search funnel, written once: retrieve -> fuse -> select -> rerank -> blend -> assemble.

:class:`Funnel` runs the funnel over a set of stage adapters (:class:`FunnelStages`) and owns
every decision about a stage that fails, times out or is overloaded. Two thin callers give it
their adapters: :class:`serve_app.pipeline.SearchPipeline` (the retrievers and the reranker as
objects in this process) and the Serve ingress (``serve_app.serve.service``, the stages behind
deployment handles). Nothing here imports Ray or knows about HTTP: outcomes are values
(:class:`SearchResult` with per-stage :class:`StageReport`) or core exceptions
(``serve_app.errors``), which only ``serve_app.serve.http`` maps to status codes.

Steps:

1. :func:`resolve_funnel` applies defaults and validates sizes against :class:`FunnelLimits`
   (``FunnelError``);
2. each requested retriever returns its top ``top_k`` documents, all retrievers concurrently;
3. their lists are fused (RRF or weighted fusion, ``FusionConfig``) and candidates missing from
   the document store are dropped;
4. each cascade stage, if any (``CascadeStage``: cheaper rerankers first), scores the first
   ``cascade[name]`` candidates of the order it receives and reorders them; then the first
   ``rerank_top_m`` candidates of that order are scored by the (final) reranker;
5. :func:`apply_rerank` orders those by score (or blends it with their rank in the order the
   reranker received: the fused rank without a cascade);
6. :func:`assemble` keeps ``top_n`` results with documents, timings and stage reports.

Decisions (the same for one query and for a batch):

* a retriever that raises, times out (``FunnelTimeouts.retriever_s``) or answers something
  unusable (a wrong number of lists, a non-finite score) is left out: the answer is *degraded*,
  its report says why; if every requested retriever is left out, :class:`StageTimeout` (all
  timed out) or :class:`StageUnavailable` is raised;
* a reranker that raises, times out (``rerank_s``) or answers unusable scores leaves the fused
  order in place, flagged degraded;
* a stage whose queue is full (:class:`StageOverloaded`) sheds the whole request: the other
  stage calls are cancelled and the exception propagates; so does a stage that finds the
  request's own input unusable (:class:`~serve_app.errors.InputRejected`: an unknown model, a
  document too long to read whole with ``truncate=False``);
* past ``request_s`` the request's pending calls are cancelled and :class:`DeadlineExceeded`
  is raised.

Cascades. A stage orders its candidates by its scores, or (``blend: rrf``) by the RRF blend of
its rank and the rank it received, as ``FusionConfig.rerank_blend`` does for the reranker. A
stage's depth comes from the request (``cascade: {name: depth}``, at most the
stage's ``max_top_m``) or its ``default_top_m``; depths never grow along the cascade (an explicit
depth above the previous stage's is an error, a default is lowered to it), and neither does the
final ``rerank_top_m``. A cascade stage that fails or times out leaves the order it received in
place and is flagged degraded (``rerank.<name>`` in the reports); the next stage and the final
reranker still run. The request's ``instruction`` goes to the final reranker only.

SLO-aware depth. With a depth controller (``serve_app.slo.DepthController``), a single request's
final ``rerank_top_m`` may be lowered, before the call, to what the latency objective allows
given the candidates already in flight to the reranker; the answer's ``funnel.rerank_top_m`` is
the depth used and ``stages.rerank`` says ``depth_reduced`` with the ``requested_top_m``.

Sizes. ``top_k`` is per retriever, so the fused pool has at most ``top_k * len(retrievers)``
documents. An explicit ``rerank_top_m`` or ``top_n`` larger than that pool is an error; a
*default* larger than the pool is lowered to the pool size. ``rerank_top_m = 0`` disables
reranking (as does a funnel without a reranker, where an explicit ``rerank_top_m > 0`` is an
error). When ``top_n > rerank_top_m > 0`` the results are the reranked ``rerank_top_m``
candidates in rerank order, followed by the remaining fused candidates in fused order (their
``rerank_score`` is None); a result's ``score`` is its rerank score when it was reranked (its
blended score under ``FusionConfig.rerank_blend = "rrf"``), its fused score otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional, Protocol, Sequence, TypeVar

import numpy as np

from serve_app.config import FunnelLimits, FusionConfig
from serve_app.errors import DeadlineExceeded, FunnelError, InputRejected, ModelNotFound, StageOutputError, StageOverloaded, StageTimeout, StageUnavailable
from serve_app.retrieval.fusion import FusedHit, fuse
from serve_app.types import Document, Hit, RerankOutcome, RerankRequest

logger = logging.getLogger(__name__)

T = TypeVar("T")

KNOWN_RETRIEVERS: tuple[str, ...] = ("bm25", "dense")
#: Name of the rerank stage in reports, timings and metrics.
RERANK = "rerank"
FUSION = "fusion"


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class FunnelRequest:
    """A search request as received; None means "use the configured default"."""

    query: str
    top_k: int | None = None
    rerank_top_m: int | None = None
    top_n: int | None = None
    retrievers: Sequence[str] | None = None
    return_documents: bool = False
    reranker: str | None = None
    instruction: str | None = None  # decoder rerankers: the prompt's instruction for this request
    cascade: Mapping[str, int] | None = None  # depth of each cascade stage by name (absent: its default)


@dataclass(frozen=True)
class CascadeDepths:
    """A cascade stage as the funnel sees it: its name, depth limits and how it reorders
    (``CascadeStage``: ``blend`` none or rrf, with ``blend_weight``)."""

    name: str
    default_top_m: int
    max_top_m: int
    blend: str = "none"
    blend_weight: float = 1.0


@dataclass(frozen=True)
class ResolvedFunnel:
    """A validated request with every size decided."""

    query: str
    top_k: int
    rerank_top_m: int
    top_n: int
    retrievers: tuple[str, ...]
    return_documents: bool = False
    reranker: str | None = None  # the configured model's name (None: the only/default one)
    instruction: str | None = None
    cascade: tuple[tuple[str, int], ...] = ()  # (stage, depth) of each cascade stage, in order

    @property
    def rerank(self) -> bool:
        """Whether the reranker runs for this request."""
        return self.rerank_top_m > 0

    @property
    def pool_size(self) -> int:
        """Most candidates the fused list can hold."""
        return self.top_k * len(self.retrievers)

    def sizes(self) -> dict[str, Any]:
        """The sizes as a plain dict (what ``/search`` reports as ``funnel``; ``reranker`` when one was named)."""
        out: dict[str, Any] = {"top_k": self.top_k, "rerank_top_m": self.rerank_top_m, "top_n": self.top_n, "retrievers": list(self.retrievers)}
        if self.reranker is not None:
            out["reranker"] = self.reranker
        if self.cascade:
            out["cascade"] = {name: depth for name, depth in self.cascade}
        return out


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


ModelResolver = Callable[[Optional[str]], Optional[str]]


def single_model(name: Optional[str]) -> Optional[str]:
    """The model resolver of a funnel with one reranker: only its default name is known."""
    if name is None or name == "default":
        return None
    raise ModelNotFound(name, ["default"])


def resolve_funnel(
    request: FunnelRequest,
    limits: FunnelLimits,
    available_retrievers: Sequence[str],
    *,
    rerank_available: bool = True,
    models: ModelResolver = single_model,
    cascade: Sequence[CascadeDepths] = (),
) -> ResolvedFunnel:
    """Apply defaults to ``request`` and validate it; raises :class:`FunnelError` naming the field
    (``ModelNotFound`` for a reranker that ``models`` does not know).

    See the module docstring for how defaults interact with the pool size, and for the
    cascade's depths (each at most the one before; defaults are lowered to fit).
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
    if request.instruction is not None and (not isinstance(request.instruction, str) or not request.instruction.strip()):
        raise FunnelError(f"instruction must be a non-empty string or null, got {request.instruction!r}")
    reranker = models(request.reranker)
    stages, rerank_top_m = _resolve_cascade(request, cascade, pool, rerank_top_m)
    return ResolvedFunnel(request.query, top_k, rerank_top_m, top_n, retrievers, bool(request.return_documents), reranker, request.instruction, stages)


def _resolve_cascade(request: FunnelRequest, cascade: Sequence[CascadeDepths], pool: int, rerank_top_m: int) -> tuple[tuple[tuple[str, int], ...], int]:
    """The depth of each cascade stage and the final reranker's (see :func:`resolve_funnel`)."""
    wanted = request.cascade
    if wanted is None:
        wanted = {}
    if not isinstance(wanted, Mapping):
        raise FunnelError(f"cascade must map stage names to depths, got {type(wanted).__name__}")
    names = [c.name for c in cascade]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise FunnelError(f"cascade: unknown stage {unknown[0]!r}; stages: {names}" if names else "cascade: this pipeline has no cascade stages")
    out: list[tuple[str, int]] = []
    above: tuple[str, int] | None = None  # the deepest limit so far: (what, depth)
    for c in cascade:
        if c.name in wanted:
            depth = _check_int(f"cascade.{c.name}", wanted[c.name], 0, c.max_top_m, f"cascade stage {c.name}'s max_top_m")
            if depth > pool:
                raise FunnelError(f"cascade.{c.name}={depth} exceeds the candidate pool ({pool})")
            if above is not None and depth > above[1]:
                raise FunnelError(f"cascade.{c.name}={depth} exceeds {above[0]}={above[1]}: a stage reranks at most what the stage before it kept")
        else:
            depth = min(c.default_top_m, pool, above[1] if above is not None else pool)
        out.append((c.name, depth))
        if depth > 0:
            above = (f"cascade.{c.name}", depth)
    if above is not None and rerank_top_m > above[1]:
        if request.rerank_top_m is not None:
            raise FunnelError(f"rerank_top_m={rerank_top_m} exceeds {above[0]}={above[1]}: the reranker reads at most what the cascade kept")
        rerank_top_m = above[1]
    return tuple(out), rerank_top_m


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class StageReport:
    """What one stage did for one request.

    ``status``: ``ok``; ``timeout`` or ``error`` (the stage was left out: the answer is
    degraded); ``skipped`` (not requested, or nothing to do). ``ms`` is the stage's wall time
    (a batch's time divided by its queries), ``candidates`` the documents it produced.
    """

    status: str = "ok"
    candidates: int = 0
    ms: float = 0.0
    error: Optional[str] = None
    batch_size: Optional[int] = None
    requested: Optional[int] = None  # the depth asked for, when the SLO controller lowered it

    @property
    def depth_reduced(self) -> bool:
        """Whether fewer candidates were reranked than the request asked (SLO-aware depth)."""
        return self.requested is not None and self.requested > self.candidates

    @property
    def degraded(self) -> bool:
        """Whether the stage was left out of the answer."""
        return self.status in ("timeout", "error")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "candidates": self.candidates, "ms": round(self.ms, 3)}
        if self.error is not None:
            out["error"] = self.error
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        if self.requested is not None:
            out["depth_reduced"] = self.depth_reduced
            out["requested_top_m"] = self.requested
        return out


SKIPPED = StageReport("skipped")


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
    """Results best first, per-stage wall times (ms), the stages left out, and every stage's report."""

    results: list[SearchResultItem]
    timings_ms: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    funnel: ResolvedFunnel | None = None
    stages: dict[str, StageReport] = field(default_factory=dict)


# --------------------------------------------------------------------------- pure steps


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
    documents: Any = None,
    timings_ms: Mapping[str, float] | None = None,
    degraded: Sequence[str] = (),
    stages: Mapping[str, StageReport] | None = None,
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
    return SearchResult(items, dict(timings_ms or {}), list(degraded), funnel, dict(stages or {}))


def input_rejected(exc: BaseException) -> Optional[InputRejected]:
    """The client-side error ``exc`` is or carries. Ray raises a replica's exception wrapped (a
    ``RayTaskError`` that subclasses it, its text a remote traceback): the original, in
    ``.cause``, is the one answered."""
    for candidate in (getattr(exc, "cause", None), exc):
        if isinstance(candidate, InputRejected):
            return candidate
    return None


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """A short, single-line description of a stage failure (no traceback, no request data)."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    cause = getattr(exc, "cause", None)  # Ray wraps a remote exception in RayTaskError(.cause)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    first = next((line.strip() for line in text if line.strip() and not line.startswith("Traceback")), "")
    msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --------------------------------------------------------------------------- adapters


class FunnelStages(Protocol):
    """The stages as the funnel sees them. Every method may raise; :class:`StageOverloaded`
    sheds the request, anything else leaves the stage out (see the module docstring)."""

    def documents(self, doc_ids: Sequence[str]) -> list[Optional[Document]]:
        """The stored document of each id (None for an id the store does not hold)."""
        ...

    async def retrieve(self, name: str, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-``k`` hits of retriever ``name`` for each query, best first."""
        ...

    async def rerank(self, requests: Sequence[RerankRequest], stage: Optional[str] = None) -> list[RerankOutcome]:
        """The scores of each request's documents (request order) by the final reranker, or by
        the cascade stage ``stage``."""
        ...


@dataclass(frozen=True)
class FunnelTimeouts:
    """How long the funnel waits; None waits as long as it takes (the in-process default)."""

    retriever_s: Optional[float] = None
    rerank_s: Optional[float] = None
    request_s: Optional[float] = None


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


async def run_with_deadline(coro: Awaitable[T], timeout_s: Optional[float]) -> T:
    """Await ``coro`` for at most ``timeout_s`` seconds (None: no limit); past it, cancel it and
    raise :class:`DeadlineExceeded`."""
    if timeout_s is None:
        return await coro
    try:
        return await asyncio.wait_for(coro, timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        raise DeadlineExceeded(timeout_s) from None


async def gather_all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Run ``coros`` concurrently; the first exception cancels the others and propagates."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


def _check_hits(lists: Any, n_queries: int) -> Optional[str]:
    """Why a retriever's answer is unusable, or None when it is fine."""
    if not isinstance(lists, list) or len(lists) != n_queries:
        return f"returned {len(lists) if isinstance(lists, list) else type(lists).__name__} result lists for {n_queries} queries"
    for hits in lists:
        for h in hits:
            if not math.isfinite(float(h.score)):
                return f"returned a non-finite score for {h.doc_id!r}"
    return None


def _check_scores(outcome: Any, n_documents: int) -> Optional[str]:
    """Why a reranker's answer for one request is unusable, or None when it is fine."""
    scores = getattr(outcome, "scores", None)
    if scores is None or len(scores) != n_documents:
        return f"the reranker returned {len(scores) if scores is not None else 'no'} scores for {n_documents} documents"
    if not all(math.isfinite(float(s)) for s in scores):
        return "the reranker returned a non-finite score"
    return None


@dataclass
class _Query:
    """One request's state through the funnel."""

    funnel: ResolvedFunnel
    hits: dict[str, list[Hit]] = field(default_factory=dict)
    reports: dict[str, StageReport] = field(default_factory=dict)
    fused: list[FusedHit] = field(default_factory=list)
    docs: dict[str, Document] = field(default_factory=dict)
    order: list[FusedHit] = field(default_factory=list)  # the fused order, reordered by each cascade stage
    scores: list[float] = field(default_factory=list)  # the final reranker's, for order[:len(scores)]
    requested_top_m: Optional[int] = None  # set when the SLO controller lowered rerank_top_m
    pairs_ahead: Optional[int] = None  # candidates in flight to the final reranker when this query's were sent
    unplanned: bool = False  # counted in Funnel.requests_unplanned until its depth is planned


def stage_key(stage: Optional[str]) -> str:
    """The report, timing and metric name of a rerank stage: ``rerank`` for the final reranker,
    ``rerank.<name>`` for a cascade stage."""
    return RERANK if stage is None else f"{RERANK}.{stage}"


def order_by_scores(head: Sequence[FusedHit], scores: Sequence[float]) -> list[FusedHit]:
    """``head`` by descending score; equal scores keep their order, NaN goes last."""
    idx = sorted(range(len(head)), key=lambda i: -scores[i] if not math.isnan(scores[i]) else math.inf)
    return [head[i] for i in idx]


class Funnel:
    """The funnel over ``stages``; see the module docstring.

    ``retrievers``: the retriever names the stages provide (canonical order is kept);
    ``rerank_available``: whether there is a reranker; ``models`` turns the reranker a request
    names into a configured model's name (or raises ``ModelNotFound``).
    """

    def __init__(
        self,
        stages: FunnelStages,
        *,
        retrievers: Sequence[str],
        rerank_available: bool,
        limits: FunnelLimits,
        fusion: FusionConfig,
        timeouts: FunnelTimeouts = FunnelTimeouts(),
        models: ModelResolver = single_model,
        cascade: Sequence[CascadeDepths] = (),
        depth: Any = None,
    ) -> None:
        unknown = [n for n in retrievers if n not in KNOWN_RETRIEVERS]
        if unknown:
            raise ValueError(f"unknown retriever name(s) {unknown}; expected names among {list(KNOWN_RETRIEVERS)}")
        self.stages = stages
        self.retrievers: tuple[str, ...] = tuple(n for n in KNOWN_RETRIEVERS if n in retrievers)
        self.rerank_available = rerank_available
        self.limits = limits
        self.fusion = fusion
        self.timeouts = timeouts
        self.models = models
        self.cascade: tuple[CascadeDepths, ...] = tuple(cascade)
        #: SLO-aware depth (``serve_app.slo.DepthController``) of the final reranker; None: fixed depth.
        self.depth = depth
        self.pairs_in_flight = 0  # candidates sent to the final reranker and not yet answered
        #: single requests in the funnel that will rerank and whose depth is not planned yet
        #: (the SLO controller shares what the objective leaves among them and this one)
        self.requests_unplanned = 0

    def resolve(self, request: FunnelRequest) -> ResolvedFunnel:
        """Validate ``request`` against this funnel's limits, retrievers, rerankers and cascade."""
        return resolve_funnel(request, self.limits, self.retrievers, rerank_available=self.rerank_available, models=self.models, cascade=self.cascade)

    # ------------------------------------------------------------------ entry points

    async def search(self, request: FunnelRequest) -> SearchResult:
        """Run the funnel for one request within ``timeouts.request_s``."""
        funnel = self.resolve(request)  # validation errors are immediate, never a deadline
        return (await run_with_deadline(self._run([funnel], amortize=False), self.timeouts.request_s))[0]

    async def search_many(self, requests: Sequence[FunnelRequest]) -> list[SearchResult]:
        """Run the funnel for many requests, each stage called once per group of requests that
        share retrievers and ``top_k`` (evaluation, batch jobs). Stage times in the results are
        the batch's divided by its requests. ``timeouts.request_s`` bounds the whole call."""
        funnels = [self.resolve(r) for r in requests]
        if not funnels:
            return []
        return await run_with_deadline(self._run(funnels, amortize=True), self.timeouts.request_s)

    async def rerank(self, request: RerankRequest) -> RerankOutcome:
        """Scores of one rerank-only request (``/rerank``), within ``timeouts.request_s``.

        Raises ``ModelNotFound`` for a model the funnel does not know, :class:`StageTimeout` /
        :class:`StageUnavailable` when the reranker times out or fails, :class:`StageOutputError`
        when its answer is unusable.
        """
        request = replace(request, model=self.models(request.model))
        return await run_with_deadline(self._rerank_only(request), self.timeouts.request_s)

    # ------------------------------------------------------------------ stage calls

    async def _stage(self, stage: str, coro: Awaitable[T], timeout_s: Optional[float], setting: str) -> tuple[Optional[T], StageReport]:
        """(value, report) of one stage call; a failure or timeout is a report, overload propagates."""
        t0 = time.perf_counter()
        try:
            value = await (asyncio.wait_for(coro, timeout_s) if timeout_s is not None else coro)
        except StageOverloaded:
            raise
        except (asyncio.TimeoutError, TimeoutError):
            logger.warning("%s: no answer within %s=%s", stage, setting, timeout_s)
            return None, StageReport("timeout", ms=_ms(t0), error=f"no answer within {setting}={timeout_s}")
        except Exception as exc:  # noqa: BLE001 - any failure of one stage is decided below
            rejected = input_rejected(exc)
            if rejected is not None:
                raise rejected from None
            logger.warning("%s failed: %s", stage, describe_exception(exc))
            return None, StageReport("error", ms=_ms(t0), error=describe_exception(exc))
        return value, StageReport("ok", ms=_ms(t0))

    async def _retrieve(self, name: str, group: list[_Query]) -> None:
        queries = [q.funnel.query for q in group]
        lists, report = await self._stage(name, self.stages.retrieve(name, queries, group[0].funnel.top_k), self.timeouts.retriever_s, "retriever_timeout_s")
        problem = _check_hits(lists, len(group)) if report.status == "ok" else None
        if problem is not None:
            logger.warning("retriever %s %s", name, problem)
            report = StageReport("error", ms=report.ms, error=problem)
        share = report.ms / len(group)
        for i, q in enumerate(group):
            if report.status == "ok":
                q.hits[name] = list(lists[i])  # type: ignore[index]
                q.reports[name] = replace(report, candidates=len(q.hits[name]), ms=share)
            else:
                q.reports[name] = replace(report, ms=share)

    async def _rerank_heads(self, todo: list[tuple[_Query, list[FusedHit]]], stage: Optional[str] = None) -> list[Optional[list[float]]]:
        """Scores of each query's head by the final reranker (``stage`` None) or a cascade stage,
        all heads in one call; None for a query whose scores are unusable (its report says why)."""
        key = stage_key(stage)
        requests = [RerankRequest(q.funnel.query, [q.docs[h.doc_id].content for h in head], model=q.funnel.reranker if stage is None else None, instruction=q.funnel.instruction if stage is None else None) for q, head in todo]
        call = self.stages.rerank(requests) if stage is None else self.stages.rerank(requests, stage)
        outcomes, report = await self._stage(key, call, self.timeouts.rerank_s, "rerank_timeout_s")
        if report.status == "ok" and (not isinstance(outcomes, list) or len(outcomes) != len(requests)):
            report = StageReport("error", ms=report.ms, error=f"the reranker answered {len(outcomes) if isinstance(outcomes, list) else 'nothing'} results for {len(requests)} requests")
        share = report.ms / len(todo)
        out: list[Optional[list[float]]] = []
        for i, (q, head) in enumerate(todo):
            if report.status != "ok":
                q.reports[key] = replace(report, ms=share)
                out.append(None)
                continue
            outcome = outcomes[i]  # type: ignore[index]
            problem = _check_scores(outcome, len(head))
            if problem is not None:
                logger.warning("%s: %s", key, problem)
                q.reports[key] = StageReport("error", ms=share, error=problem)
                out.append(None)
                continue
            scores = [float(x) for x in outcome.scores]
            q.reports[key] = StageReport("ok", candidates=len(scores), ms=share, batch_size=outcome.batch_size)
            out.append(scores)
        return out

    async def _cascade(self, queries: list[_Query]) -> None:
        """Each cascade stage reorders the head of each query's order (one call per stage); a
        stage that fails leaves the order as it was, flagged degraded."""
        for i, c in enumerate(self.cascade):
            todo = [(q, q.order[: q.funnel.cascade[i][1]]) for q in queries if q.funnel.cascade and q.funnel.cascade[i][1] > 0 and q.order]
            if not todo:
                continue
            blend = FusionConfig(rerank_blend="rrf", rrf_k=self.fusion.rrf_k, rerank_weight=c.blend_weight) if c.blend == "rrf" else None
            for (q, head), scores in zip(todo, await self._rerank_heads(todo, c.name)):
                if scores is None:
                    continue
                reordered = [r.hit for r in apply_rerank(head, scores, blend)] if blend is not None else order_by_scores(head, scores)
                q.order = reordered + q.order[len(head) :]

    async def _final(self, todo: list[tuple[_Query, list[FusedHit]]], *, adaptive: bool) -> None:
        """The final reranker over each query's head; with an SLO controller (one request at a
        time, ``adaptive``) the depth is first lowered to what the objective allows."""
        if adaptive and self.depth is not None and self.depth.enabled:
            q, head = todo[0]
            self._planned(q)
            plan = self.depth.plan(len(head), self.pairs_in_flight, waiting=self.requests_unplanned + 1)
            if plan.reduced:
                q.requested_top_m = plan.requested
                q.funnel = replace(q.funnel, rerank_top_m=plan.depth)
                todo = [(q, head[: plan.depth])]
        pairs = sum(len(head) for _, head in todo)
        ahead = others = self.pairs_in_flight
        self.pairs_in_flight += pairs
        try:
            results = await self._rerank_heads(todo)
            # Requests sent after this one may have joined its batches: what shared the
            # reranker with it is the larger of what was in flight when it was sent and when it ended.
            others = max(ahead, self.pairs_in_flight - pairs)
        finally:
            self.pairs_in_flight -= pairs
        for (q, _), scores in zip(todo, results):
            if scores is not None:
                q.scores = scores
            if q.requested_top_m is not None and RERANK in q.reports:
                q.reports[RERANK] = replace(q.reports[RERANK], requested=q.requested_top_m)
        if adaptive and self.depth is not None and len(todo) == 1:
            q = todo[0][0]
            report = q.reports.get(RERANK)
            if report is not None and report.status == "ok":
                q.pairs_ahead = others

    async def _rerank_only(self, request: RerankRequest) -> RerankOutcome:
        outcomes, report = await self._stage(RERANK, self.stages.rerank([request]), self.timeouts.rerank_s, "rerank_timeout_s")
        if report.status == "timeout":
            raise StageTimeout(RERANK, f"the reranker did not answer within rerank_timeout_s={self.timeouts.rerank_s}", {RERANK: report})
        if report.status == "error":
            raise StageUnavailable(RERANK, f"the reranker failed: {report.error}", {RERANK: report})
        if not isinstance(outcomes, list) or len(outcomes) != 1:
            raise StageOutputError(RERANK, "the reranker answered no result for the request")
        problem = _check_scores(outcomes[0], len(request.documents))
        if problem is not None:
            raise StageOutputError(RERANK, problem, {RERANK: StageReport("error", ms=report.ms, error=problem)})
        return outcomes[0]

    # ------------------------------------------------------------------ the funnel

    def _planned(self, q: _Query) -> None:
        if q.unplanned:
            q.unplanned = False
            self.requests_unplanned -= 1

    async def _run(self, funnels: list[ResolvedFunnel], *, amortize: bool) -> list[SearchResult]:
        queries = [_Query(f) for f in funnels]
        if not amortize and self.depth is not None and self.depth.enabled:
            for q in queries:
                if q.funnel.rerank:
                    q.unplanned = True
                    self.requests_unplanned += 1
        try:
            return await self._run_queries(queries, amortize=amortize)
        finally:
            for q in queries:
                self._planned(q)  # a request that failed, timed out or reranked nothing

    async def _run_queries(self, queries: list[_Query], *, amortize: bool) -> list[SearchResult]:
        t_start = time.perf_counter()
        n = len(queries)

        # Retrieval: one call per retriever and group of queries sharing retrievers and top_k.
        groups: dict[tuple[tuple[str, ...], int], list[_Query]] = {}
        for q in queries:
            groups.setdefault((q.funnel.retrievers, q.funnel.top_k), []).append(q)
        for (names, _), group in groups.items():
            await gather_all(self._retrieve(name, group) for name in names)
            failed = [q for q in group if not q.hits]
            if failed:
                self._raise_retrieval_failure(failed[0])

        # Fusion, and the documents of the fused candidates (absent ones are dropped).
        t0 = time.perf_counter()
        for q in queries:
            fused = fuse(q.hits, self.fusion)
            stored = self.stages.documents([h.doc_id for h in fused])
            q.docs = {h.doc_id: d for h, d in zip(fused, stored) if d is not None}
            q.fused = [h for h in fused if h.doc_id in q.docs]
        fusion_ms = _ms(t0) / n
        for q in queries:
            q.reports[FUSION] = StageReport("ok", candidates=len(q.fused), ms=fusion_ms)

        # The cascade's stages, then the final reranker over each query's head, all heads of a
        # stage in one call.
        for q in queries:
            q.order = list(q.fused)
        if self.cascade:
            await self._cascade(queries)
        todo = [(q, q.order[: q.funnel.rerank_top_m]) for q in queries if q.funnel.rerank and q.order]
        if todo:
            await self._final(todo, adaptive=not amortize)

        total_ms = _ms(t_start) / (n if amortize else 1)
        if not amortize and self.depth is not None:
            for q in queries:
                if q.pairs_ahead is not None:
                    self.depth.observe(depth=q.funnel.rerank_top_m, pairs_ahead=q.pairs_ahead, rerank_ms=q.reports[RERANK].ms, total_ms=total_ms)
        return [self._result(q, total_ms) for q in queries]

    def _raise_retrieval_failure(self, q: _Query) -> None:
        reports = {name: q.reports[name] for name in q.funnel.retrievers}
        detail = "; ".join(f"{name}: {r.error}" for name, r in reports.items())
        if all(r.status == "timeout" for r in reports.values()):
            raise StageTimeout("retrieval", f"no requested retriever answered in time ({detail})", reports)
        raise StageUnavailable("retrieval", f"every requested retriever failed ({detail})", reports)

    def _result(self, q: _Query, total_ms: float) -> SearchResult:
        stages: dict[str, StageReport] = {name: q.reports.get(name, SKIPPED) for name in self.retrievers}
        stages[FUSION] = q.reports[FUSION]
        for c in self.cascade:
            stages[stage_key(c.name)] = q.reports.get(stage_key(c.name), SKIPPED)
        stages[RERANK] = q.reports.get(RERANK, SKIPPED)
        timings = {name: r.ms for name, r in stages.items() if r.status != "skipped"}
        timings["total"] = total_ms
        degraded = [name for name, r in stages.items() if r.degraded]
        final = apply_rerank(q.order, q.scores, self.fusion)
        return assemble(final, q.funnel, documents=q.docs.get if q.funnel.return_documents else None, timings_ms=timings, degraded=degraded, stages=stages)
