"""What the ingress does for each HTTP request, as a plain class (no Ray, testable in process).

:class:`SearchService` runs the funnel steps of :mod:`serve_app.pipeline` around calls to the
stages, which it reaches through a :class:`Backends` object: deployment handles in the Serve
application (:mod:`serve_app.serve.deployments`), or in-process objects in tests. Each stage
call has its own timeout; a retriever that fails or times out is left out and the answer is
marked degraded, a reranker that fails or times out leaves /search with the fused order
(degraded) and /rerank with a 503/504. A stage whose request queue is full sheds the request
(503 ``overloaded`` with ``Retry-After``), and every request has an overall deadline,
``timeouts.request_timeout_s`` (504 ``deadline_exceeded``); see :mod:`serve_app.serve.resilience`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Optional, Protocol

from serve_app.errors import FunnelError
from serve_app.pipeline import FunnelRequest, apply_rerank, assemble, fuse_candidates, resolve_funnel, select_for_rerank
from serve_app.serve import metrics
from serve_app.serve.api import ApiError, RequestModels, build_request_models
from serve_app.serve.config import AppConfig
from serve_app.serve.resilience import DeadlineExceeded, StageOverloaded, overloaded_headers, run_with_deadline
from serve_app.types import Document, Hit

logger = logging.getLogger(__name__)

STAGES = ("bm25", "dense", "reranker")


@dataclass(frozen=True)
class RerankOutcome:
    """What the reranker deployment answers for one request."""

    scores: list[float]
    batch_size: int = 1  # requests that shared the cross-encoder call
    batch_pairs: int = 0  # pairs scored by that call


class Backends(Protocol):
    """The stages as the ingress sees them."""

    async def retrieve(self, name: str, query: str, k: int) -> list[Hit]:
        """Top-``k`` hits of retriever ``name``."""
        ...

    async def rerank(self, query: str, documents: list[str], max_tokens_per_doc: Optional[int]) -> RerankOutcome:
        """Cross-encoder scores of ``documents`` (request order)."""
        ...

    async def ping(self, stage: str) -> Mapping[str, Any]:
        """Answers once ``stage`` (bm25, dense, reranker) has loaded its index or model."""
        ...


class DocumentStore(Protocol):
    def get(self, doc_id: str) -> Optional[Document]: ...

    def __len__(self) -> int: ...


@dataclass
class _StageResult:
    status: str = "ok"
    candidates: int = 0
    ms: float = 0.0
    error: Optional[str] = None
    batch_size: Optional[int] = None

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "candidates": self.candidates, "ms": round(self.ms, 3)}
        if self.error is not None:
            out["error"] = self.error
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        return out


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


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _finite(x: float, what: str) -> float:
    v = float(x)
    if not math.isfinite(v):
        raise ApiError("internal_error", f"{what} is not a finite number")
    return v


@dataclass
class SearchService:
    """The ingress logic: /search, /rerank, /healthz and /info over :class:`Backends`."""

    cfg: AppConfig
    backends: Backends
    documents: DocumentStore
    index_info: dict[str, Any] = field(default_factory=dict)
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self) -> None:
        self.models: RequestModels = build_request_models(self.cfg.limits, self.cfg.funnel)
        self.retrievers: tuple[str, ...] = tuple(n for n in ("bm25", "dense") if n in self.cfg.retrievers)

    # ------------------------------------------------------------------ stages

    async def _call(self, stage: str, coro: Awaitable[Any], timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            metrics.count_degraded(stage, "timeout")
            raise
        except StageOverloaded:
            raise  # shed by _bounded (503 overloaded), not degraded
        except Exception:
            metrics.count_degraded(stage, "error")
            raise

    async def _retrieve(self, name: str, query: str, k: int) -> tuple[Optional[list[Hit]], _StageResult]:
        t0 = time.perf_counter()
        try:
            hits = await self._call(name, self.backends.retrieve(name, query, k), self.cfg.timeouts.retriever_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            logger.warning("retriever %s timed out after %.3gs", name, self.cfg.timeouts.retriever_timeout_s)
            return None, _StageResult("timeout", ms=_ms(t0), error=f"no answer within retriever_timeout_s={self.cfg.timeouts.retriever_timeout_s}")
        except StageOverloaded:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one retriever degrades to the others
            logger.warning("retriever %s failed: %s", name, describe_exception(exc))
            return None, _StageResult("error", ms=_ms(t0), error=describe_exception(exc))
        ms = _ms(t0)
        metrics.observe_latency(name, ms)
        metrics.observe_candidates(name, len(hits))
        return list(hits), _StageResult("ok", candidates=len(hits), ms=ms)

    # ------------------------------------------------------------------ /search

    async def _bounded(self, coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        """Run one request's handler within ``timeouts.request_timeout_s``; shed it when a stage is overloaded."""
        try:
            return await run_with_deadline(coro, self.cfg.timeouts.request_timeout_s)
        except DeadlineExceeded as exc:
            logger.warning("request deadline exceeded (%s)", exc)
            raise ApiError("deadline_exceeded", f"the request did not complete within request_timeout_s={exc.timeout_s:g}") from None
        except StageOverloaded as exc:
            raise ApiError("overloaded", f"{exc}; retry after {exc.retry_after_header()} s", headers=overloaded_headers(exc)) from None

    async def search(self, req: Any) -> dict[str, Any]:
        """Answer a validated search request (``self.models.search``) within the request deadline."""
        return await self._bounded(self._search(req))

    async def _search(self, req: Any) -> dict[str, Any]:
        t_start = time.perf_counter()
        try:
            funnel = resolve_funnel(
                FunnelRequest(req.query, req.top_k, req.rerank_top_m, req.top_n, req.retrievers),
                self.cfg.funnel,
                self.retrievers,
                rerank_available=True,
            )
        except FunnelError as exc:
            raise ApiError("validation_error", str(exc)) from None

        stages: dict[str, _StageResult] = {name: _StageResult("skipped") for name in self.retrievers}
        outcomes = await asyncio.gather(*(self._retrieve(name, funnel.query, funnel.top_k) for name in funnel.retrievers))
        ranked: dict[str, list[Hit]] = {}
        for name, (hits, result) in zip(funnel.retrievers, outcomes):
            stages[name] = result
            if hits is not None:
                ranked[name] = hits
        if not ranked:
            detail = "; ".join(f"{n}: {stages[n].error}" for n in funnel.retrievers)
            if all(stages[n].status == "timeout" for n in funnel.retrievers):
                raise ApiError("stage_timeout", f"no requested retriever answered in time ({detail})")
            raise ApiError("service_unavailable", f"every requested retriever failed ({detail})")

        t0 = time.perf_counter()
        fused = [h for h in fuse_candidates(ranked, self.cfg.fusion) if self.documents.get(h.doc_id) is not None]
        stages["fusion"] = _StageResult("ok", candidates=len(fused), ms=_ms(t0))
        metrics.observe_latency("fusion", stages["fusion"].ms)
        metrics.observe_candidates("fused", len(fused))

        head = select_for_rerank(fused, funnel)
        scores: list[float] = []
        if head:
            t0 = time.perf_counter()
            texts = [self.documents.get(h.doc_id).content for h in head]  # type: ignore[union-attr]
            try:
                outcome = await self._call("reranker", self.backends.rerank(funnel.query, texts, None), self.cfg.timeouts.rerank_timeout_s)
                scores = [_finite(s, "a rerank score") for s in outcome.scores]
                if len(scores) != len(head):
                    raise RuntimeError(f"the reranker returned {len(scores)} scores for {len(head)} documents")
                stages["rerank"] = _StageResult("ok", candidates=len(scores), ms=_ms(t0), batch_size=outcome.batch_size)
                metrics.observe_latency("rerank", stages["rerank"].ms)
                metrics.observe_candidates("reranked", len(scores))
            except (asyncio.TimeoutError, TimeoutError):
                scores = []
                stages["rerank"] = _StageResult("timeout", ms=_ms(t0), error=f"no answer within rerank_timeout_s={self.cfg.timeouts.rerank_timeout_s}")
            except (ApiError, StageOverloaded):
                raise
            except Exception as exc:  # noqa: BLE001 - fall back to the fused order
                scores = []
                logger.warning("reranker failed: %s", describe_exception(exc))
                stages["rerank"] = _StageResult("error", ms=_ms(t0), error=describe_exception(exc))
        else:
            stages["rerank"] = _StageResult("skipped")

        final = apply_rerank(fused, scores, self.cfg.fusion)
        timings = {name: round(r.ms, 3) for name, r in stages.items() if r.status != "skipped"}
        timings["total"] = round(_ms(t_start), 3)
        degraded = [n for n, r in stages.items() if r.status in ("timeout", "error")]
        result = assemble(final, funnel, documents=self.documents.get if req.return_documents else None, timings_ms=timings, degraded=degraded)
        metrics.observe_latency("total", timings["total"])
        metrics.observe_candidates("returned", len(result.results))

        items = []
        for it in result.results:
            item: dict[str, Any] = {
                "id": it.doc_id,
                "score": _finite(it.score, "a score"),
                "rerank_score": it.rerank_score,
                "fused_score": _finite(it.fused_score, "a fused score"),
                "retrievers": {n: {"rank": it.retriever_ranks[n], "score": _finite(it.retriever_scores[n], f"a {n} score")} for n in it.retriever_ranks},
            }
            if it.document is not None:
                item.update(title=it.document.title, text=it.document.text, metadata=dict(it.document.metadata))
            items.append(item)
        return {
            "query": funnel.query,
            "results": items,
            "degraded": bool(degraded),
            "stages": {name: r.report() for name, r in stages.items()},
            "timings_ms": timings,
            "funnel": {"top_k": funnel.top_k, "rerank_top_m": funnel.rerank_top_m, "top_n": funnel.top_n, "retrievers": list(funnel.retrievers)},
        }

    # ------------------------------------------------------------------ /rerank

    async def rerank(self, req: Any) -> dict[str, Any]:
        """Answer a validated Cohere-style rerank request (``self.models.rerank``) within the request deadline."""
        return await self._bounded(self._rerank(req))

    async def _rerank(self, req: Any) -> dict[str, Any]:
        texts = req.texts()
        t0 = time.perf_counter()
        timeout = self.cfg.timeouts.rerank_timeout_s
        try:
            outcome = await self._call("reranker", self.backends.rerank(req.query, texts, req.max_tokens_per_doc), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise ApiError("stage_timeout", f"the reranker did not answer within rerank_timeout_s={timeout}") from None
        except StageOverloaded:
            raise
        except Exception as exc:  # noqa: BLE001
            logger.warning("reranker failed: %s", describe_exception(exc))
            raise ApiError("service_unavailable", f"the reranker failed: {describe_exception(exc)}") from None
        scores = [_finite(s, "a relevance score") for s in outcome.scores]
        if len(scores) != len(texts):
            raise ApiError("internal_error", f"the reranker returned {len(scores)} scores for {len(texts)} documents")
        ms = _ms(t0)
        metrics.observe_latency("rerank", ms)
        metrics.observe_candidates("rerank_request", len(texts))
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: req.limit()]
        results = []
        for i in order:
            r: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if req.return_documents:
                r["document"] = {"text": texts[i]}
            results.append(r)
        meta = {
            "api_version": {"version": "2"},
            "billed_units": {"search_units": 1},
            "model": self.cfg.reranker.model,
            "batch_size": outcome.batch_size,
            "timings_ms": {"rerank": round(ms, 3)},
        }
        return {"id": str(uuid.uuid4()), "results": results, "meta": meta}

    # ------------------------------------------------------------------ /healthz, /info

    def stages(self) -> tuple[str, ...]:
        """The deployed stages."""
        return (*self.retrievers, "reranker")

    async def health(self) -> tuple[bool, dict[str, str]]:
        """(ready, per-stage state): ready when every stage answers a ping within its timeout."""

        async def probe(stage: str) -> str:
            try:
                await asyncio.wait_for(self.backends.ping(stage), self.cfg.timeouts.health_timeout_s)
                return "ok"
            except (asyncio.TimeoutError, TimeoutError):
                return f"not ready: no answer within health_timeout_s={self.cfg.timeouts.health_timeout_s}"
            except Exception as exc:  # noqa: BLE001
                return f"not ready: {describe_exception(exc)}"

        names = self.stages()
        states = dict(zip(names, await asyncio.gather(*(probe(s) for s in names))))
        return all(v == "ok" for v in states.values()), states

    async def info(self) -> dict[str, Any]:
        """Models, index sizes, limits and funnel defaults; the reranker's live batching when it answers."""
        c = self.cfg
        batching: dict[str, Any] = c.batching.model_dump()
        try:
            live = await asyncio.wait_for(self.backends.ping("reranker"), self.cfg.timeouts.health_timeout_s)
            batching = dict(live.get("batching", batching))
        except Exception:  # noqa: BLE001 - /info still answers with the configured defaults
            pass
        return {
            "models": {"reranker": c.reranker.model, **({"dense": c.dense.model} if "dense" in self.retrievers else {})},
            "retrievers": list(self.retrievers),
            "index": {"dir": c.index_dir, "documents": len(self.documents), **self.index_info},
            "limits": c.limits.model_dump(),
            "funnel": c.funnel.model_dump(),
            "fusion": c.fusion.model_dump(),
            "batching": batching,
            "timeouts": c.timeouts.model_dump(),
            "reranker": {k: v for k, v in c.reranker.model_dump().items() if k != "model"},
        }
