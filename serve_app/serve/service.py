"""What the ingress does for each HTTP request, as a plain class (no Ray, testable in process).

:class:`SearchService` is a thin caller of the core :class:`serve_app.funnel.Funnel`: it turns a
validated request into a funnel request, records the metrics of what the funnel did, and shapes
the JSON answer. The stages are reached through a :class:`Backends` object (deployment handles
in the Serve application, :class:`serve_app.serve.deployments.HandleBackends`; in-process fakes
in tests) wrapped in :class:`IngressStages`, the funnel's adapter. Every decision about a stage
that fails, times out or is overloaded is the funnel's; its exceptions (``serve_app.errors``) go
up unchanged and ``serve_app.serve.http`` answers them with their status codes.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence

from serve_app.errors import StageError
from serve_app.filters import all_of, matches, parse_filter
from serve_app.funnel import FUSION, RERANK, CascadeDepths, CascadeNames, Funnel, FunnelRequest, StageReport, gather_all, describe_exception
from serve_app.serve import metrics, tracing
from serve_app.serve.api import RequestModels, build_request_models
from serve_app.serve.config import DEFAULT_MODEL, AppConfig
from serve_app.serve.flavours import Flavour, FlavourModels, Ranked, build_flavour_models, cohere_answer, tei_answer
from serve_app.serve.shards import QUERY_ENCODER_KEY, encodes_queries_once
from serve_app.slo import DepthController
from serve_app.types import Document, Hit, RerankOutcome, RerankRequest

logger = logging.getLogger(__name__)

#: ``candidates`` metric label of each stage report (the labels of docs/METRICS.md).
_CANDIDATE_LABELS = {FUSION: "fused", RERANK: "reranked"}


class Backends(Protocol):
    """The stages as the ingress reaches them, one call per query."""

    async def retrieve(self, name: str, query: str, k: int) -> list[Hit]:
        """Top-``k`` hits of retriever ``name``."""
        ...

    async def rerank(self, request: RerankRequest, stage: Optional[str] = None) -> RerankOutcome:
        """Scores of the request's documents (request order) by the reranker, or by cascade stage ``stage``."""
        ...

    async def ping(self, stage: str) -> Mapping[str, Any]:
        """Answers once ``stage`` (bm25, dense, reranker) has loaded its index or model."""
        ...


class DocumentStore(Protocol):
    def get(self, doc_id: str) -> Optional[Document]: ...

    def get_many(self, doc_ids: Sequence[str]) -> list[Optional[Document]]: ...

    def __len__(self) -> int: ...


#: The batch of live writes the current /search reads as of (None: live writes are off). Every
#: retriever, shard and document lookup of one request reads this same batch, so an answer sees
#: a batch entirely or not at all, and each hit's text is the text its scores came from.
READ_SEQ: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("serve_app_read_seq", default=None)


class IngressStages:
    """:class:`serve_app.funnel.FunnelStages` over :class:`Backends` and a document store:
    one backend call per query (Serve batches the reranker's calls across requests). With live
    writes (``live``: the ingress's :class:`~serve_app.serve.live_replica.LiveReplica`) every
    call reads as of the request's :data:`READ_SEQ`."""

    def __init__(self, backends: Backends, documents: DocumentStore, live: Any = None) -> None:
        self.backends = backends
        self.store = documents
        self.live = live

    async def documents(self, doc_ids: Sequence[str]) -> list[Optional[Document]]:
        # One SQLite query for a request's candidates, not one per id, in a worker thread: the
        # event loop keeps serving other requests while the store reads from disk.
        seq = READ_SEQ.get()
        with tracing.span("serve_app.documents", **{"serve_app.documents.requested": len(doc_ids), "serve_app.seq": seq}) as sp:
            if self.live is not None and seq is not None:
                view = await self.live.view_at(seq)
                docs = await asyncio.to_thread(view.get_many, doc_ids, seq)
            else:
                docs = await asyncio.to_thread(self.store.get_many, doc_ids)
            tracing.annotate(sp, **{"serve_app.documents.found": sum(d is not None for d in docs)})
            return docs

    async def retrieve(self, name: str, queries: Sequence[str], k: int, where: Any = None) -> list[list[Hit]]:
        seq = READ_SEQ.get()
        pin: dict[str, Any] = {} if seq is None else {"at_seq": seq}
        if where is not None:
            pin["where"] = where
        with tracing.span(f"serve_app.retrieve.{name}", **{"serve_app.retriever": name, "serve_app.top_k": k, "serve_app.filtered": where is not None, "serve_app.seq": seq}) as sp:
            lists = [list(hits) for hits in await gather_all(self.backends.retrieve(name, q, k, **pin) for q in queries)]
            tracing.annotate(sp, **{"serve_app.hits": sum(len(h) for h in lists)})
            return lists

    async def rerank(self, requests: Sequence[RerankRequest], stage: Optional[str] = None) -> list[RerankOutcome]:
        name = "serve_app.rerank" if stage is None else f"serve_app.rerank.{stage}"
        attrs = {"serve_app.rerank.stage": stage or "final", "serve_app.rerank.depth": sum(len(r.documents) for r in requests), "serve_app.rerank.model": requests[0].model if requests else None}
        with tracing.span(name, **attrs) as sp:
            if stage is None:
                out = await gather_all(self.backends.rerank(r) for r in requests)
            else:
                out = await gather_all(self.backends.rerank(r, stage) for r in requests)  # type: ignore[call-arg]
            tracing.annotate(sp, **{"serve_app.rerank.pairs_scored": sum(o.pairs for o in out), "serve_app.rerank.cache_hits": sum(o.cached for o in out), "serve_app.rerank.batch_size": max((o.batch_size for o in out), default=0), "serve_app.rerank.tokens": sum(o.tokens for o in out)})
            return out


def record_stages(stages: Mapping[str, StageReport]) -> None:
    """Metrics of one request's stage reports: latency and candidates of the stages that
    answered, a ``degraded_total`` count for each stage left out."""
    for name, report in stages.items():
        if report.status == "ok":
            metrics.observe_latency(name, report.ms)
            metrics.observe_candidates(_CANDIDATE_LABELS.get(name, name), report.candidates)
        elif report.degraded:
            metrics.count_degraded(name, report.status)


def _trace_search(sp: Any, result: Any) -> None:
    """The decisions of one /search on its span: sizes used, each stage's status, degraded."""
    if not sp.is_recording():
        return
    sizes = result.funnel.sizes() if result.funnel is not None else {}
    attrs: dict[str, Any] = {"serve_app.used.top_k": sizes.get("top_k"), "serve_app.used.rerank_top_m": sizes.get("rerank_top_m"), "serve_app.used.top_n": sizes.get("top_n"), "serve_app.retrievers": sizes.get("retrievers"), "serve_app.degraded": bool(result.degraded), "serve_app.results": len(result.results)}
    for name, r in result.stages.items():
        attrs[f"serve_app.stage.{name}"] = r.status
        if name == RERANK and r.status == "ok":
            attrs["serve_app.used.rerank_depth"] = r.candidates  # after any SLO-aware reduction
            attrs["serve_app.rerank.depth_reduced"] = bool(r.depth_reduced)
    tracing.annotate(sp, **attrs)


def _timings(answer: Mapping[str, Any]) -> dict[str, Any]:
    return {"timings_ms": dict(answer["timings_ms"])} if answer.get("timings_ms") else {}


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


@dataclass
class SearchService:
    """The ingress logic: /search, /rerank, /healthz and /info over :class:`Backends`."""

    cfg: AppConfig
    backends: Backends
    documents: DocumentStore
    index_info: dict[str, Any] = field(default_factory=dict)
    #: The ingress's LiveReplica when live writes are on (its view: the document lookups).
    live: Any = None
    #: The collection this service answers for (``default``: the routes at the root).
    collection: str = "default"

    def __post_init__(self) -> None:
        self.models: RequestModels = build_request_models(self.cfg.limits, self.cfg.funnel)
        self.flavour_models: FlavourModels = build_flavour_models(self.cfg.limits)
        self.retrievers: tuple[str, ...] = tuple(n for n in ("bm25", "dense") if n in self.cfg.retrievers)
        self.depth = DepthController(self.cfg.slo) if self.cfg.slo.search_p95_ms is not None else None
        self.funnel = Funnel(
            IngressStages(self.backends, self.documents, self.live),
            retrievers=self.retrievers,
            rerank_available=True,
            limits=self.cfg.funnel,
            fusion=self.cfg.fusion,
            timeouts=self.cfg.timeouts.funnel(),
            models=self.model_name,
            cascade=[CascadeDepths(c.name, c.default_top_m, c.max_top_m, c.blend, c.blend_weight) for c in self.cfg.cascade],
            depth=self.depth,
        )

    def model_name(self, requested: Optional[str]) -> Optional[str]:
        """The configured reranker a request names (None: the default; ``ModelNotFound`` for others)."""
        name = self.cfg.reranker.resolve(requested)
        return None if name == DEFAULT_MODEL else name

    # ------------------------------------------------------------------ /search

    async def read_seq(self) -> Optional[int]:
        """The batch a search reads as of: the last one every replica has applied (None: no live writes)."""
        if self.live is None:
            return None
        await self.live.view_at(None)
        return self.live.follower.visible_seq

    def where(self, requested: Optional[Mapping[str, Any]], bound: Any = None) -> Any:
        """The filter a search runs with: the request's (checked against the declared fields;
        ``FilterError`` names what is wrong) ANDed with the API key's ``bound`` one, which the
        request therefore cannot widen."""
        parsed = None if requested is None else parse_filter(requested, self.cfg.fields, self.cfg.filters.limits())
        return all_of(bound, parsed)

    async def search(self, req: Any, bound: Any = None) -> dict[str, Any]:
        """Answer a validated search request (``self.models.search``); ``bound``: the API key's
        filter in this collection (parsed), ANDed to the request's."""
        where = self.where(getattr(req, "filter", None), bound)
        seq = await self.read_seq()
        token = READ_SEQ.set(seq)
        asked = {"serve_app.collection": self.collection, "serve_app.asked.top_k": req.top_k, "serve_app.asked.rerank_top_m": req.rerank_top_m, "serve_app.asked.top_n": req.top_n, "serve_app.reranker": req.reranker, "serve_app.filtered": where is not None, "serve_app.seq": seq}
        with tracing.span("serve_app.search", **asked) as sp:
            try:
                result = await self.funnel.search(FunnelRequest(req.query, req.top_k, req.rerank_top_m, req.top_n, req.retrievers, req.return_documents, req.reranker, req.instruction, req.cascade, where))
            except StageError as exc:
                record_stages(exc.stages)
                tracing.annotate(sp, **{f"serve_app.stage.{n}": r.status for n, r in exc.stages.items()})
                raise
            finally:
                READ_SEQ.reset(token)
            _trace_search(sp, result)
        record_stages(result.stages)
        rerank = result.stages.get(RERANK)
        if rerank is not None and rerank.status == "ok":
            metrics.observe_rerank_depth(rerank.candidates, rerank.depth_reduced)
        timings = {name: round(ms, 3) for name, ms in result.timings_ms.items()}
        metrics.observe_latency("total", timings["total"])
        metrics.observe_candidates("returned", len(result.results))
        items = []
        for it in result.results:
            item: dict[str, Any] = {
                "id": it.doc_id,
                "score": it.score,
                "rerank_score": it.rerank_score,
                "fused_score": it.fused_score,
                "retrievers": {n: {"rank": it.retriever_ranks[n], "score": it.retriever_scores[n]} for n in it.retriever_ranks},
            }
            if it.document is not None:
                item.update(title=it.document.title, text=it.document.text, metadata=dict(it.document.metadata))
            items.append(item)
        assert result.funnel is not None
        return {
            **({"seq": seq} if seq is not None else {}),
            "query": result.funnel.query,
            "results": items,
            "degraded": bool(result.degraded),
            "stages": {name: r.to_dict() for name, r in result.stages.items()},
            "timings_ms": timings,
            "funnel": result.funnel.sizes(),
        }

    # ------------------------------------------------------------------ /rerank, /v1/rerank, /v2/rerank

    async def rank(self, req: Any) -> Ranked:
        """Score a validated rerank request (any shape or flavour) and order its results."""
        texts = req.texts()
        t0 = time.perf_counter()
        try:
            outcome = await self.funnel.rerank(req.core())
        except StageError as exc:
            record_stages(exc.stages)
            raise
        ms = _ms(t0)
        metrics.observe_latency(RERANK, ms)
        metrics.observe_candidates("rerank_request", len(texts))
        scores = [float(s) for s in outcome.scores]
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: req.limit()]
        name = self.cfg.reranker.resolve(getattr(req, "model", None))
        model = self.cfg.reranker.catalog()[name]
        return Ranked(req, texts, scores, order, name, model.model, model.activation, outcome.tokens, outcome.pairs, outcome.batch_size, ms)

    async def rerank(self, req: Any, flavour: Optional[Flavour] = None) -> Any:
        """Answer a validated rerank request as ``flavour`` answers it, or, on the unprefixed
        routes, in its own shape (``req.shape``): Cohere v1 (also Jina, infinity, vLLM), Cohere
        v2, or Text Embeddings Inference."""
        r = await self.rank(req)
        if flavour is not None:
            return flavour.answer(r)
        if req.shape == "tei":
            return tei_answer(r)
        # Cohere's answer with the model's own scores and the extensions clients of the
        # unprefixed routes read: the model, batch size and timing in meta; Jina's model and usage.
        answer = cohere_answer(r, raw=True)
        answer["meta"].update(model=r.model_id, batch_size=r.batch_size, timings_ms={"rerank": round(r.ms, 3)})
        if req.shape == "cohere-v1":  # Jina's clients read these
            answer.update(model=r.requested_model(), usage={"total_tokens": r.tokens})
        return answer

    # ------------------------------------------------------------------ /documents

    async def upsert_documents(self, req: Any, guard: Any = None) -> dict[str, Any]:
        """POST /documents: one batch through the writer; acknowledged once durable. ``guard``:
        the API key's bound filter (each document and the version it replaces must pass it)."""
        docs = [d.model_dump(exclude_none=True) for d in req.documents]
        answer = await self._write("upsert", docs, req.refresh, guard)
        self._saw_visible(answer)
        return {"seq": answer["seq"], "upserted": answer["ids"], "refresh": req.refresh, **({"visible": answer["visible"]} if req.refresh == "wait_for" else {}), **_timings(answer)}

    async def delete_documents(self, req: Any, guard: Any = None) -> dict[str, Any]:
        """DELETE /documents: one batch; ids that were not there (or are outside ``guard``) are listed, not an error."""
        answer = await self._write("delete", list(req.ids), req.refresh, guard)
        self._saw_visible(answer)
        return {"seq": answer["seq"], "deleted": answer["ids"], "absent": answer["absent"], "refresh": req.refresh, **({"visible": answer["visible"]} if req.refresh == "wait_for" else {}), **_timings(answer)}

    async def _write(self, op: str, payload: list[Any], refresh: str, guard: Any) -> dict[str, Any]:
        if guard is None:
            return await self.backends.write(op, payload, refresh)  # type: ignore[attr-defined]
        return await self.backends.write(op, payload, refresh, guard)  # type: ignore[attr-defined]

    def _saw_visible(self, answer: Mapping[str, Any]) -> None:
        """A wait_for answer says every follower, this ingress included, applied the batch: the
        next search here reads it (other ingress replicas learn it with their next poll, which
        the change of the visible batch wakes)."""
        if answer.get("visible") and answer.get("seq") is not None and self.live is not None and self.live.follower is not None:
            f = self.live.follower
            f.visible_seq = max(f.visible_seq, min(int(answer["seq"]), f.applied_seq))

    async def get_document(self, doc_id: str, bound: Any = None) -> Optional[dict[str, Any]]:
        """GET /documents/{id}: the latest acknowledged version (read from the writer), or None
        (also when the API key's ``bound`` filter does not admit it: not found, as if absent)."""
        doc = await self.backends.get_document(doc_id)  # type: ignore[attr-defined]
        if doc is None or not matches(bound, doc.metadata):
            return None
        return {"id": doc.id, "title": doc.title, "text": doc.text, "metadata": dict(doc.metadata)}

    # ------------------------------------------------------------------ /healthz, /info

    def stages(self) -> tuple[str, ...]:
        """The deployed stages (a cascade stage is ``reranker.<name>``; a sharded dense retriever's
        query encoder is ``dense_encoder``)."""
        encoder = (QUERY_ENCODER_KEY,) if encodes_queries_once(self.cfg) else ()
        writer = ("writer",) if self.live is not None else ()
        return (*self.retrievers, *encoder, *(CascadeNames(c.name).handle for c in self.cfg.cascade), CascadeNames(None).handle, *writer)

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
        if self.live is not None:
            states["documents"] = "ok" if self.live.ready else f"not ready: catching up with the writer's log ({self.live.error or 'starting'})"
        return all(v == "ok" for v in states.values()), states

    async def info(self) -> dict[str, Any]:
        """Models, index sizes, limits and funnel defaults; the reranker's live batching when it answers."""
        c = self.cfg
        batching: dict[str, Any] = c.batching.model_dump()
        runtime: dict[str, Any] = {}
        try:
            live = await asyncio.wait_for(self.backends.ping("reranker"), self.cfg.timeouts.health_timeout_s)
            batching = dict(live.get("batching", batching))
            runtime = dict(live.get("runtime", {}))
        except Exception:  # noqa: BLE001 - /info still answers with the configured defaults
            pass
        return {
            "models": {"reranker": c.reranker.model, **({"dense": c.dense.model} if "dense" in self.retrievers else {})},
            "retrievers": list(self.retrievers),
            "index": {"dir": c.index_dir, "documents": len(self.live.view) if self.live is not None and self.live.view is not None else len(self.documents), **self.index_info},
            "writes": {**c.writes.model_dump(), **({"live": self.live.state()} if self.live is not None else {})},
            "fields": dict(c.fields),
            "limits": c.limits.model_dump(),
            "funnel": c.funnel.model_dump(),
            "fusion": c.fusion.model_dump(),
            "batching": batching,
            "timeouts": c.timeouts.model_dump(),
            "cascade": [{"name": st.name, "model": st.reranker.model, "default_top_m": st.default_top_m, "max_top_m": st.max_top_m, "max_length": st.reranker.max_length} for st in c.cascade],
            "slo": {**c.slo.model_dump(), **({"live": self.depth.stats()} if self.depth is not None else {})},
            "reranker": {k: v for k, v in c.reranker.default_model().model_dump().items() if k != "model"},
            "rerankers": {
                "default": DEFAULT_MODEL,
                "models": {
                    name: {"model": m.model, "kind": m.kind, "backend": m.backend, "max_length": m.max_length, "dtype": m.dtype, "quantize": m.quantize, "activation": m.activation, "long_documents": m.long_documents}
                    for name, m in c.reranker.catalog().items()
                },
                "aliases": dict(c.reranker.aliases),
                "max_models_per_replica": c.reranker.max_models_per_replica,
                "score_cache": c.reranker.score_cache.model_dump(),
                # As loaded by the replica that answered: family, runtime, dtype and drift from torch float32.
                "runtime": runtime,
            },
        }
