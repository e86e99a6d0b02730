"""The servers behind the Serve deployments: plain classes, one core object each.

Nothing here is decorated: :mod:`serve_app.serve.app` (the builder) turns each class into a
deployment with the options of the validated :class:`~serve_app.serve.config.AppConfig`, and
binds it to a typed config object (``BM25ServerConfig``...), so a replica never re-validates a
dict. Tests construct these classes directly, without Ray.

* :class:`BM25Server`: :class:`serve_app.retrieval.bm25.BM25Retriever` over the index's bm25/ files;
* :class:`DenseServer`: bi-encoder + FAISS; concurrent queries share one encoder forward pass
  (Serve's batching, ``dense_batching``);
* :class:`RerankerServer`: :class:`serve_app.rerank.reranker.Reranker`; concurrent requests
  share cross-encoder calls through Serve's batching and the :class:`~serve_app.rerank.coalesce.Coalescer`,
  with ``max_batch_size`` and ``batch_wait_timeout_s`` from ``user_config`` (changed live by
  ``reconfigure``);
* :class:`SearchIngress`: the FastAPI app (:mod:`serve_app.serve.http`) over
  :class:`~serve_app.serve.service.SearchService`, calling the stages through deployment handles
  (:class:`HandleBackends`).

A constructor that cannot load its model or index raises the core's ``ModelLoadError`` /
``IndexLoadError``; Serve retries it ``max_constructor_retry_count`` times and then marks the
deployment ``DEPLOY_FAILED`` with that message. ``check_health`` checks something real: the
index answers a lookup, the model answered recently or answers a probe pair.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import math
import time
from typing import Any, Optional

from serve_app.rerank.coalesce import Coalescer
from serve_app.serve import metrics
from serve_app.serve.config import (
    DEFAULT_MODEL,
    ENV_DENSE_MODEL,
    ENV_RERANKER_MODEL,
    AppConfig,
    BatchingConfig,
    BM25ServerConfig,
    DenseServerConfig,
    FaultInjection,
    RerankerServerConfig,
    RerankerUserConfig,
    RetrieverUserConfig,
    parse_user_config,
)
from serve_app.serve.resilience import call_stage
from serve_app.types import Hit, RerankOutcome, RerankRequest

logger = logging.getLogger("ray.serve")

# @serve.batch calls of the reranker that may wait in its Coalescer at once (which merges them
# into model calls of at most max_batch_size requests). Under steady load requests reach the
# reranker one by one (the retrievers space them out), so Serve's batches hold one or two
# requests each and this bound, not max_batch_size, capped the merged calls: 4 gave 3.6-3.9
# requests per call with 16 clients in benchmarks/e2e_load. 16 lets a call fill up to the
# default max_batch_size. Serve then logs that max_batch_size x max_concurrent_batches exceeds
# max_ongoing_requests; with the coalescer merging batches that product is not a limit, only
# max_ongoing_requests >= max_batch_size matters (deployments.yaml, tests/serve/test_serve_config.py).
RERANK_CONCURRENT_BATCHES = 16
#: A reranker that scored a batch this recently is healthy without a probe forward pass.
HEALTH_RECENT_S = 30.0
_PROBE_PAIR = ("health probe", "a short document")


class InjectedFault(RuntimeError):
    """Raised by a stage whose fault injection is set to ``error``."""


async def _apply_fault(fault: FaultInjection, stage: str) -> None:
    """Simulate an unresponsive or failing stage (every call: search, rerank and ping)."""
    if fault.mode == "error":
        raise InjectedFault(f"{stage}: injected failure (fault.mode=error)")
    if fault.mode == "delay" and fault.delay_s > 0:
        await asyncio.sleep(fault.delay_s)


def _load(what: str, loader: Any, *args: Any, hint: str = "") -> Any:
    """Run ``loader``; a user-facing failure (missing model, damaged index) is logged and
    re-raised without its chain, so that Serve's DEPLOY_FAILED message stays short and leads
    with the explanation instead of a long library traceback."""
    from serve_app.errors import UserFacingError

    try:
        return loader(*args)
    except UserFacingError as exc:
        from serve_app.models import ModelLoadError

        text = f"{exc} {hint}" if hint and isinstance(exc, ModelLoadError) else str(exc)
        logger.error("%s: %s", what, text)
        try:
            clean = type(exc)(text)
        except Exception:  # noqa: BLE001 - an exception type with another signature: keep it as is
            raise exc from None
    raise clean from None


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - outside a replica
        return "local"


class _OneByOne:
    """Outside a Serve replica (tests, scripts) each call is a batch of one: Serve's batching needs
    a replica, the server's own merging (the reranker's Coalescer) still works."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    async def __call__(self, item: Any) -> Any:
        return (await self.fn([item]))[0]

    def set_max_batch_size(self, n: int) -> None:
        pass

    def set_batch_wait_timeout_s(self, s: float) -> None:
        pass


def _serve_batch(fn: Any, cfg: BatchingConfig, max_concurrent_batches: int = 1) -> Any:
    """``fn`` (an async function of a list) behind Serve's request batching, sized by ``cfg``."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        return _OneByOne(fn)
    return serve.batch(max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s, max_concurrent_batches=max_concurrent_batches)(fn)


def _index_dir(name: str, index_dir: str, retriever: str, shard: Any) -> str:
    """The directory a retriever replica loads: the index itself, or its shard's index."""
    if shard is None:
        return index_dir
    from serve_app.index import open_shard

    return str(_load(name, open_shard, index_dir, retriever, shard.index, shard.num_shards))


class BM25Server:
    """Top-k BM25 documents for a query."""

    def __init__(self, cfg: BM25ServerConfig) -> None:
        from serve_app.index import load_bm25

        self.shard = cfg.shard  # this replica serves one shard of the index (serve_app.serve.shards)
        self.retriever = _load("BM25Retriever", load_bm25, _index_dir("BM25Retriever", cfg.index_dir, "bm25", cfg.shard))
        self.fault = FaultInjection()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.fault = parse_user_config(RetrieverUserConfig, user_config, "BM25Retriever").fault

    async def search(self, query: str, k: int) -> list[Hit]:
        await _apply_fault(self.fault, "bm25")
        t0 = time.perf_counter()
        hits = await asyncio.to_thread(self.retriever.search, query, k)
        metrics.observe_latency("bm25_search", (time.perf_counter() - t0) * 1000)
        return hits

    async def ping(self) -> dict[str, Any]:
        await _apply_fault(self.fault, "bm25")
        return {"stage": "bm25", "documents": self.retriever.num_documents, "replica": _replica_id(), "shard": self.shard.model_dump() if self.shard else None}

    async def check_health(self) -> None:
        """The memory-mapped index answers: a term lookup over its postings runs."""
        await asyncio.to_thread(self.retriever.search, "health", 1)


class DenseServer:
    """Top-k documents by embedding similarity; concurrent queries are encoded together."""

    def __init__(self, cfg: DenseServerConfig) -> None:
        from serve_app.index import load_dense

        self.shard = cfg.shard
        index_dir = _index_dir("DenseRetriever", cfg.index_dir, "dense", cfg.shard)
        self.retriever = _load("DenseRetriever", load_dense, index_dir, cfg.dense, hint=f"For the Serve app, {ENV_DENSE_MODEL}=/path/to/model also overrides dense.model.")
        self.fault = FaultInjection()
        self._search_batched = _serve_batch(self._search_many_async, cfg.batching)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.fault = parse_user_config(RetrieverUserConfig, user_config, "DenseRetriever").fault

    async def search(self, query: str, k: int) -> list[Hit]:
        await _apply_fault(self.fault, "dense")
        return await self._search_batched((query, k))

    async def _search_many_async(self, requests: list[tuple[str, int]]) -> list[list[Hit]]:
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self._search_many, requests)
        metrics.observe_latency("dense_search", (time.perf_counter() - t0) * 1000)
        return out

    def _search_many(self, requests: list[tuple[str, int]]) -> list[list[Hit]]:
        """One encoder call for all queries, then one FAISS search per distinct k."""
        vectors = self.retriever.encoder.encode_queries([q for q, _ in requests])
        out: list[list[Hit]] = [[] for _ in requests]
        by_k: dict[int, list[int]] = collections.defaultdict(list)
        for i, (_, k) in enumerate(requests):
            by_k[int(k)].append(i)
        for k, rows in by_k.items():
            for i, hits in zip(rows, self.retriever.search_vectors(vectors[rows], k)):
                out[i] = hits
        return out

    async def ping(self) -> dict[str, Any]:
        await _apply_fault(self.fault, "dense")
        return {"stage": "dense", "model": self.retriever.encoder.model_name, "vectors": self.retriever.num_vectors, "replica": _replica_id(), "shard": self.shard.model_dump() if self.shard else None}

    async def check_health(self) -> None:
        """The encoder and the FAISS index answer: one query is encoded and searched."""
        hits = await asyncio.to_thread(self._search_many, [("health", 1)])
        if not hits[0]:
            raise RuntimeError("the dense index returned no document for the health probe")


class _ModelSlot:
    """A loaded named model. Serve's multiplexing calls ``__del__`` when it evicts one (and the
    garbage collector may call it again later): it reports the unload once."""

    def __init__(self, name: str, reranker: Any, on_unload: Any) -> None:
        self.name = name
        self.reranker = reranker
        self._on_unload = on_unload

    def __del__(self) -> None:
        on_unload, self._on_unload = self._on_unload, None
        if on_unload is not None:
            on_unload(self.name)


class _LocalModels:
    """Outside a Serve replica: the same least-recently-used bound as ``@serve.multiplexed``."""

    def __init__(self, load: Any, max_models: int) -> None:
        self.load = load
        self.max_models = max_models
        self.models: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = asyncio.Lock()

    async def __call__(self, name: str) -> Any:
        async with self._lock:
            if name in self.models:
                self.models.move_to_end(name)
                return self.models[name]
            if len(self.models) >= self.max_models:
                _, evicted = self.models.popitem(last=False)
                evicted.__del__()
            self.models[name] = await self.load(name)
            return self.models[name]


def _serve_multiplexed(load: Any, max_models: int) -> Any:
    """``load(name)`` behind Serve's model multiplexing (LRU, at most ``max_models`` per replica,
    model-aware routing), or :class:`_LocalModels` outside a replica."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        return _LocalModels(load, max_models)

    async def load_model(name: str) -> Any:  # a plain function: Serve keeps its cache on it
        return await load(name)

    return serve.multiplexed(max_num_models_per_replica=max_models)(load_model)


class RerankerServer:
    """Cross-encoder scores; concurrent requests share ``rerank_many`` calls, one per model.

    The default model is loaded at start and always held; the other configured models
    (``reranker.models``) are loaded on first use through Serve's model multiplexing, at most
    ``reranker.max_models_per_replica`` at once (least recently used unloaded first). A request
    names a configured model only: a name outside the catalog is ``ModelNotFound``.
    """

    def __init__(self, cfg: RerankerServerConfig) -> None:
        from serve_app.rerank.cache import ScoreCache
        from serve_app.rerank.reranker import Reranker

        self.catalog = cfg.reranker.catalog()
        self.stage = cfg.stage
        self.metric_model = DEFAULT_MODEL if cfg.stage is None else f"cascade.{cfg.stage}"  # the model label of its metrics
        #: Pair scores of this replica's models (serve_app.rerank.cache); max_bytes 0: none.
        self.cache = ScoreCache(cfg.reranker.score_cache.max_bytes)
        hint = f"For the Serve app, {ENV_RERANKER_MODEL}=/path/to/model also overrides reranker.model." if cfg.stage is None else f"(cascade stage {cfg.stage})"
        self.reranker = _load("CrossEncoderReranker", Reranker.from_config, self.catalog[DEFAULT_MODEL], self.cache, DEFAULT_MODEL, hint=hint)
        self._named = _serve_multiplexed(self._load_named, cfg.reranker.max_models_per_replica)
        self.loaded: set[str] = set()
        #: Family, runtime and drift of each loaded model (what /info shows).
        self.runtimes: dict[str, dict[str, Any]] = {DEFAULT_MODEL: self.reranker.scorer.describe()}
        self.loads: collections.Counter[str] = collections.Counter()
        self.batching = cfg.batching
        self.fault = FaultInjection()
        self.coalescer = Coalescer(self._score_requests, max_items=self.batching.max_batch_size)
        # Serve forms batches eagerly, also while the model is busy; the coalescer merges those
        # that wait into the next model call (serve_app.rerank.coalesce).
        self._rerank_batched = _serve_batch(self.coalescer.submit, self.batching, RERANK_CONCURRENT_BATCHES)
        self._last_scored = 0.0

    async def _load_named(self, name: str) -> _ModelSlot:
        from serve_app.rerank.reranker import Reranker

        reranker = await asyncio.to_thread(_load, "CrossEncoderReranker", Reranker.from_config, self.catalog[name], self.cache, name)
        self.loaded.add(name)
        self.loads[name] += 1
        self.runtimes[name] = reranker.scorer.describe()
        logger.info("reranker model %r loaded (%s)", name, self.catalog[name].model)
        return _ModelSlot(name, reranker, self._unloaded)

    def _unloaded(self, name: str) -> None:
        self.loaded.discard(name)
        self.runtimes.pop(name, None)
        self.cache.drop_model(name)  # a reload must not answer from the old model's scores

    async def reranker_for(self, name: Optional[str]) -> Any:
        """The loaded reranker of the configured model ``name`` (None: the default one)."""
        if name is None or name == DEFAULT_MODEL:
            return self.reranker
        if name not in self.catalog:
            from serve_app.errors import ModelNotFound

            raise ModelNotFound(name, list(self.catalog))
        return (await self._named(name)).reranker

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        uc = parse_user_config(RerankerUserConfig, user_config, "CrossEncoderReranker")
        self._rerank_batched.set_max_batch_size(uc.max_batch_size)
        self._rerank_batched.set_batch_wait_timeout_s(uc.batch_wait_timeout_s)
        self.batching = BatchingConfig(max_batch_size=uc.max_batch_size, batch_wait_timeout_s=uc.batch_wait_timeout_s)
        self.coalescer.max_items = uc.max_batch_size  # the most requests per cross-encoder call
        self.fault = uc.fault
        logger.info("reranker batching: max_batch_size=%d batch_wait_timeout_s=%g", uc.max_batch_size, uc.batch_wait_timeout_s)

    async def rerank(self, request: RerankRequest) -> RerankOutcome:
        """Scores of one request's documents (batched with the concurrent requests of its model)."""
        await _apply_fault(self.fault, "reranker")
        reranker = await self.reranker_for(request.model)
        reranker.check(request)  # refused on its own, before it joins (and fails) a batch
        if not request.truncate:
            too_long = await asyncio.to_thread(reranker.too_long, request)
            if too_long:
                from serve_app.errors import InputTooLong

                shown = ", ".join(str(i) for i in too_long[:10]) + (", ..." if len(too_long) > 10 else "")
                raise InputTooLong(f"{len(too_long)} document(s) ({shown}) with the query exceed the {reranker.scorer.max_length} tokens the model reads; send truncate: true to cut them")
        if reranker.cache is not None:
            found = reranker.cached(request, count=False)
            hits = sum(1 for x in found if x is not None)
            metrics.count_score_cache(request.model or self.metric_model, hits, len(found) - hits)
            if found and hits == len(found):  # every score is known: answer without waiting for the model
                reranker.cache.record(hits)  # the look above was the lookup: count its hits once
                return RerankOutcome([float(x) for x in found], 0, 0, 0, 0, cached=hits)  # type: ignore[arg-type]
            outcome = await self._rerank_batched(request)
            return dataclasses.replace(outcome, cached=hits)
        return await self._rerank_batched(request)

    async def _score_requests(self, requests: list[RerankRequest]) -> list[RerankOutcome]:
        """One ``rerank_many`` call (in a worker thread) per model for the requests the coalescer
        merged: batches never mix models."""
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, r in enumerate(requests):
            groups[r.model or DEFAULT_MODEL].append(i)
        out: list[Any] = [None] * len(requests)
        for name, rows in groups.items():
            reranker = await self.reranker_for(name)
            group = [requests[i] for i in rows]
            t0 = time.perf_counter()
            detailed = await asyncio.to_thread(reranker.rerank_many_detailed, group)
            self._last_scored = time.monotonic()
            pairs = sum(p for _, p, _ in detailed)
            metrics.observe_latency("rerank_batch", (time.perf_counter() - t0) * 1000)
            metrics.observe_rerank_batch(len(group), pairs, self.metric_model if name == DEFAULT_MODEL else name)
            for i, (scores, n_pairs, tokens) in zip(rows, detailed):
                out[i] = RerankOutcome([float(x) for x in scores], len(group), pairs, n_pairs, tokens)
        return out

    async def ping(self) -> dict[str, Any]:
        await _apply_fault(self.fault, "reranker")
        return {
            "stage": "reranker",
            "model": self.reranker.scorer.model_name,
            "models": list(self.catalog),
            "loaded": [DEFAULT_MODEL, *sorted(self.loaded)],
            "runtime": dict(self.runtimes),
            "batching": self.batching.model_dump(),
            "replica": _replica_id(),
            "cascade_stage": self.stage,
            "score_cache": self.cache.stats(),
        }

    async def stats(self) -> dict[str, Any]:
        """Batch sizes seen by this replica (most recent last), its live batching settings and models."""
        return {
            "replica": _replica_id(),
            "batch_sizes": [n for _, n in self.coalescer.calls],
            "batching": self.batching.model_dump(),
            "pairs_scored": self.reranker.scorer.pairs_scored,
            "serve_batching": not isinstance(self._rerank_batched, _OneByOne),
            "models_loaded": [DEFAULT_MODEL, *sorted(self.loaded)],
            "model_loads": dict(self.loads),
            "score_cache": self.cache.stats(),
        }

    async def check_health(self) -> None:
        """The model answers: it scored a batch within HEALTH_RECENT_S, or scores a probe pair now."""
        if time.monotonic() - self._last_scored < HEALTH_RECENT_S:
            return
        score = (await asyncio.to_thread(self.reranker.scorer.score, [_PROBE_PAIR]))[0]
        if not math.isfinite(float(score)):
            raise RuntimeError(f"the reranker scored the health probe {score}")
        self._last_scored = time.monotonic()


class HandleBackends:
    """:class:`~serve_app.serve.service.Backends` over deployment handles.

    Each call goes through :func:`~serve_app.serve.resilience.call_stage`: a full queue
    (``BackPressureError``) becomes ``StageOverloaded``, a replica that died under the call is
    retried once (all stage calls are idempotent).

    A sharded retriever is a list of handles, one per shard: its calls go to every shard
    concurrently and the lists are merged (:func:`~serve_app.serve.shards.scatter_gather`);
    ``shard_deadline_s`` (``ping_deadline_s`` for pings) bounds the wait for the shards so that
    late ones can be named before the stage's own timeout fires.
    """

    def __init__(self, handles: dict[str, Any], shard_deadline_s: float = 4.5, ping_deadline_s: float = 1.8) -> None:
        self.handles = handles
        self.shard_deadline_s = shard_deadline_s
        self.ping_deadline_s = ping_deadline_s

    def _handle(self, stage: str) -> Any:
        h = self.handles.get(stage)
        if h is None:
            raise LookupError(f"stage {stage} is not deployed")
        return h

    async def retrieve(self, name: str, query: str, k: int) -> list[Hit]:
        handle = self._handle(name)
        if isinstance(handle, list):
            from serve_app.serve.shards import scatter_gather

            calls = [functools.partial(call_stage, f"{name} shard {i}", functools.partial(lambda h: h.search.remote(query, k), h)) for i, h in enumerate(handle)]
            return await scatter_gather(name, calls, k, self.shard_deadline_s)
        return await call_stage(name, lambda: handle.search.remote(query, k))

    async def rerank(self, request: RerankRequest, stage: Optional[str] = None) -> RerankOutcome:
        if stage is not None:  # a cascade stage: its own deployment, its default model
            h = self._handle(f"reranker.{stage}")
            return await call_stage(f"reranker.{stage}", lambda: h.rerank.remote(request))
        handle = self._handle("reranker")
        if request.model not in (None, DEFAULT_MODEL):  # route to a replica that holds the model
            handle = handle.options(multiplexed_model_id=request.model)
        return await call_stage("reranker", lambda: handle.rerank.remote(request))

    async def ping(self, stage: str) -> dict[str, Any]:
        handle = self._handle(stage)
        if isinstance(handle, list):
            from serve_app.serve.shards import ping_all

            return await ping_all(stage, [functools.partial(call_stage, f"{stage} shard {i}", functools.partial(lambda h: h.ping.remote(), h)) for i, h in enumerate(handle)], self.ping_deadline_s)
        return await call_stage(stage, lambda: handle.ping.remote())


class SearchIngress:
    """HTTP ingress: validates requests, runs the funnel over the stages' handles, answers.

    ``bm25`` / ``dense``: the retriever's handle, or one handle per shard when sharded (None when
    not deployed). The builder wraps this class with ``serve.ingress``; Serve then serves the
    FastAPI app :meth:`__serve_build_asgi_app__` returns.
    """

    def __init__(self, cfg: AppConfig, bm25: Any, dense: Any, reranker: Any, cascade: Optional[list[Any]] = None) -> None:
        from serve_app.index import load_document_store
        from serve_app.serve.service import SearchService
        from serve_app.serve.shards import shard_deadline

        # Texts are looked up in the on-disk store (SQLite, memory-mapped), not held here.
        corpus, manifest = _load("SearchIngress", load_document_store, cfg.index_dir)
        handles = {name: h for name, h in (("bm25", bm25), ("dense", dense), ("reranker", reranker)) if h is not None}
        for stage, h in zip(cfg.cascade, cascade or []):
            handles[f"reranker.{stage.name}"] = h
        index_info = {
            "chunks": manifest.corpus.num_chunks,
            "built_at": manifest.created_at,
            "dense_model": (manifest.dense or {}).get("model"),
            "bm25_engine": (manifest.bm25 or {}).get("engine"),
        }
        if cfg.sharding.bm25 > 1 or cfg.sharding.dense > 1:
            index_info["shards"] = {r: getattr(cfg.sharding, r) for r in cfg.retrievers}
        backends = HandleBackends(handles, shard_deadline(cfg.timeouts.retriever_timeout_s), shard_deadline(cfg.timeouts.health_timeout_s))
        self.service = SearchService(cfg, backends, corpus, index_info)

    def __serve_build_asgi_app__(self) -> Any:
        from serve_app.serve.http import create_app

        return create_app(self.service)

    async def check_health(self) -> None:
        """The document store is loaded and answers a lookup."""
        if len(self.service.documents) == 0:
            raise RuntimeError("the document store is empty")
