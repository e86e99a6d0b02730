"""The funnel's run: :class:`Funnel` over a set of stage adapters (see :mod:`serve_app.funnel`
for the steps and every decision it takes)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Optional, Sequence, TypeVar

from serve_app.config import FunnelLimits, FusionConfig
from serve_app.errors import StageOutputError, StageOverloaded, StageTimeout, StageUnavailable
from serve_app.filters import matches
from serve_app.funnel.request import KNOWN_RETRIEVERS, CascadeDepths, FunnelRequest, ModelResolver, ResolvedFunnel, resolve_funnel, single_model
from serve_app.funnel.results import FUSION, RERANK, SKIPPED, SearchResult, StageReport, apply_rerank, assemble, order_by_scores, stage_key
from serve_app.funnel.stages import FunnelStages, FunnelTimeouts, check_hits, check_scores, describe_exception, elapsed_ms, gather_all, input_rejected, run_with_deadline
from serve_app.retrieval.fusion import FusedHit, fuse
from serve_app.types import Document, Hit, RerankOutcome, RerankRequest

logger = logging.getLogger("serve_app.funnel")

T = TypeVar("T")


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
    pairs_ahead: Optional[int] = None  # candidates that shared the final reranker with this query's
    admission: Any = None  # its serve_app.slo.Admission (a single request with an SLO controller)



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
        #: It also counts the pairs in flight to the reranker and the requests waiting to plan.
        self.depth = depth

    @property
    def pairs_in_flight(self) -> int:
        """Candidates sent to the final reranker and not yet answered (counted by the SLO controller)."""
        return self.depth.pairs_in_flight if self.depth is not None else 0

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
            return None, StageReport("timeout", ms=elapsed_ms(t0), error=f"no answer within {setting}={timeout_s}")
        except Exception as exc:  # noqa: BLE001 - any failure of one stage is decided below
            rejected = input_rejected(exc)
            if rejected is not None:
                raise rejected from None
            logger.warning("%s failed: %s", stage, describe_exception(exc))
            return None, StageReport("error", ms=elapsed_ms(t0), error=describe_exception(exc))
        return value, StageReport("ok", ms=elapsed_ms(t0))

    async def _retrieve(self, name: str, group: list[_Query]) -> None:
        queries = [q.funnel.query for q in group]
        where = group[0].funnel.where
        call = self.stages.retrieve(name, queries, group[0].funnel.top_k) if where is None else self.stages.retrieve(name, queries, group[0].funnel.top_k, where=where)  # type: ignore[call-arg]
        lists, report = await self._stage(name, call, self.timeouts.retriever_s, "retriever_timeout_s")
        problem = check_hits(lists, len(group)) if report.status == "ok" else None
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
            problem = check_scores(outcome, len(head))
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
            plan = q.admission.plan(len(head))
            if plan.reduced:
                q.requested_top_m = plan.requested
                q.funnel = replace(q.funnel, rerank_top_m=plan.depth)
                todo = [(q, head[: plan.depth])]
        if self.depth is None:
            results = await self._rerank_heads(todo)
            shared = None
        else:
            with self.depth.in_flight(sum(len(head) for _, head in todo)) as flight:
                results = await self._rerank_heads(todo)
            shared = flight.shared
        for (q, _), scores in zip(todo, results):
            if scores is not None:
                q.scores = scores
            if q.requested_top_m is not None and RERANK in q.reports:
                q.reports[RERANK] = replace(q.reports[RERANK], requested=q.requested_top_m)
        if adaptive and shared is not None and len(todo) == 1:
            q = todo[0][0]
            report = q.reports.get(RERANK)
            if report is not None and report.status == "ok":
                q.pairs_ahead = shared

    async def _rerank_only(self, request: RerankRequest) -> RerankOutcome:
        outcomes, report = await self._stage(RERANK, self.stages.rerank([request]), self.timeouts.rerank_s, "rerank_timeout_s")
        if report.status == "timeout":
            raise StageTimeout(RERANK, f"the reranker did not answer within rerank_timeout_s={self.timeouts.rerank_s}", {RERANK: report})
        if report.status == "error":
            raise StageUnavailable(RERANK, f"the reranker failed: {report.error}", {RERANK: report})
        if not isinstance(outcomes, list) or len(outcomes) != 1:
            raise StageOutputError(RERANK, "the reranker answered no result for the request")
        problem = check_scores(outcomes[0], len(request.documents))
        if problem is not None:
            raise StageOutputError(RERANK, problem, {RERANK: StageReport("error", ms=report.ms, error=problem)})
        return outcomes[0]

    # ------------------------------------------------------------------ the funnel

    async def _run(self, funnels: list[ResolvedFunnel], *, amortize: bool) -> list[SearchResult]:
        queries = [_Query(f) for f in funnels]
        if amortize or self.depth is None:
            return await self._run_queries(queries, amortize=amortize)
        (q,) = queries  # a single request: admitted by the SLO controller until it plans its depth
        with self.depth.admit(reranks=q.funnel.rerank) as q.admission:
            return await self._run_queries(queries, amortize=amortize)

    async def _run_queries(self, queries: list[_Query], *, amortize: bool) -> list[SearchResult]:
        t_start = time.perf_counter()
        n = len(queries)

        # Retrieval: one call per retriever and group of queries sharing retrievers, top_k and filter.
        groups: dict[tuple[tuple[str, ...], int, Any], list[_Query]] = {}
        for q in queries:
            groups.setdefault((q.funnel.retrievers, q.funnel.top_k, q.funnel.where), []).append(q)
        for (names, _, _), group in groups.items():
            await gather_all(self._retrieve(name, group) for name in names)
            failed = [q for q in group if not q.hits]
            if failed:
                self._raise_retrieval_failure(failed[0])

        # Fusion, and the documents of the fused candidates (absent ones are dropped; with a
        # filter, so is any document whose stored metadata it does not admit: the retrievers
        # filtered already, and this check keeps the reranker and the answer to admitted
        # documents whatever a retriever returned).
        t0 = time.perf_counter()
        for q in queries:
            fused = fuse(q.hits, self.fusion)
            stored = self.stages.documents([h.doc_id for h in fused])
            if inspect.isawaitable(stored):  # the ingress looks documents up off its event loop
                stored = await stored
            q.docs = {h.doc_id: d for h, d in zip(fused, stored) if d is not None and (q.funnel.where is None or matches(q.funnel.where, d.metadata))}
            q.fused = [h for h in fused if h.doc_id in q.docs]
        fusion_ms = elapsed_ms(t0) / n
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

        total_ms = elapsed_ms(t_start) / (n if amortize else 1)
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
