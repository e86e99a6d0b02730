"""The reranker server: :class:`RerankerServer`, one model family's :class:`~serve_app.rerank.reranker.Reranker`
per configured model, concurrent requests merged into model calls (Serve's batching and the
:class:`~serve_app.rerank.coalesce.Coalescer`), the score cache consulted once per request."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import time
from typing import Any, Optional

from serve_app.funnel import CascadeNames
from serve_app.rerank.coalesce import Coalescer
from serve_app.serve import metrics, tracing
from serve_app.serve.config import DEFAULT_MODEL, ENV_RERANKER_MODEL, BatchingConfig, FaultInjection, RerankerServerConfig, RerankerUserConfig, model_key, parse_user_config
from serve_app.serve.replica import ModelSlot, OneByOne, apply_fault, load_or_explain, replica_id, serve_batch, serve_multiplexed
from serve_app.types import RerankOutcome, RerankRequest

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


@dataclasses.dataclass
class Pending:
    """A request waiting for a model call, with its cache lookup when the replica has a cache.

    ``cancelled`` is set when its caller is cancelled (the client went away, or the request's
    deadline passed: Serve cancels the handle call and the replica sees ``CancelledError``); the
    model call then leaves its pairs out, or stops scoring them between forward passes.
    ``started``: its model call has begun."""

    request: RerankRequest
    lookup: Any = None
    cancelled: bool = False
    started: bool = False


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
        self.metric_model = CascadeNames(cfg.stage).metric_model  # the model label of its default model's metrics
        #: Pair scores of this replica's models (serve_app.rerank.cache); max_bytes 0: none.
        self.cache = ScoreCache(cfg.reranker.score_cache.max_bytes)
        hint = f"For the Serve app, {ENV_RERANKER_MODEL}=/path/to/model also overrides reranker.model." if cfg.stage is None else f"(cascade stage {cfg.stage})"
        self.reranker = load_or_explain("CrossEncoderReranker", Reranker.from_config, self.catalog[DEFAULT_MODEL], self.cache, DEFAULT_MODEL, hint=hint)
        self._named = serve_multiplexed(self._load_named, cfg.reranker.max_models_per_replica)
        self.loaded: set[str] = set()
        #: Family, runtime and drift of each loaded model (what /info shows).
        self.runtimes: dict[str, dict[str, Any]] = {DEFAULT_MODEL: self.reranker.scorer.describe()}
        self.loads: collections.Counter[str] = collections.Counter()
        self.batching = cfg.batching
        self.fault = FaultInjection()
        self.coalescer = Coalescer(self._score_requests, max_items=self.batching.max_batch_size)
        # Serve forms batches eagerly, also while the model is busy; the coalescer merges those
        # that wait into the next model call (serve_app.rerank.coalesce).
        self._rerank_batched = serve_batch(self.coalescer.submit, self.batching, RERANK_CONCURRENT_BATCHES)
        self._last_scored = 0.0
        self.cancelled_requests = 0  # requests whose caller was cancelled while they waited or ran
        self.cancelled_pairs = 0  # their pairs never scored (the work saved)

    async def _load_named(self, name: str) -> ModelSlot:
        from serve_app.rerank.reranker import Reranker

        reranker = await asyncio.to_thread(load_or_explain, "CrossEncoderReranker", Reranker.from_config, self.catalog[name], self.cache, name)
        self.loaded.add(name)
        self.loads[name] += 1
        self.runtimes[name] = reranker.scorer.describe()
        logger.info("reranker model %r loaded (%s)", name, self.catalog[name].model)
        return ModelSlot(name, reranker, self._unloaded)

    def _unloaded(self, name: str) -> None:
        self.loaded.discard(name)
        self.runtimes.pop(name, None)
        self.cache.drop_model(name)  # a reload must not answer from the old model's scores

    async def reranker_for(self, name: Optional[str]) -> Any:
        """The loaded reranker of the configured model ``name`` (None: the default one)."""
        name = model_key(name)
        if name == DEFAULT_MODEL:
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
        attrs = {"serve_app.rerank.model": model_key(request.model), "serve_app.rerank.documents": len(request.documents), "serve_app.rerank.cascade_stage": self.stage}
        with tracing.span("serve_app.reranker.score", **attrs) as sp:
            try:
                outcome = await self._rerank(request)
            except asyncio.CancelledError:
                tracing.annotate(sp, **{"serve_app.cancelled": True})
                raise
            tracing.annotate(sp, **{"serve_app.rerank.pairs_scored": outcome.pairs, "serve_app.rerank.cache_hits": outcome.cached, "serve_app.rerank.batch_size": outcome.batch_size, "serve_app.rerank.batch_pairs": outcome.batch_pairs, "serve_app.rerank.tokens": outcome.tokens})
            return outcome

    async def _rerank(self, request: RerankRequest) -> RerankOutcome:
        await apply_fault(self.fault, "reranker")
        reranker = await self.reranker_for(request.model)
        reranker.check(request)  # refused on its own, before it joins (and fails) a batch
        if not request.truncate:
            too_long = await asyncio.to_thread(reranker.too_long, request)
            if too_long:
                from serve_app.errors import InputTooLong

                shown = ", ".join(str(i) for i in too_long[:10]) + (", ..." if len(too_long) > 10 else "")
                raise InputTooLong(f"{len(too_long)} document(s) ({shown}) with the query exceed the {reranker.scorer.max_length} tokens the model reads; send truncate: true to cut them")
        lookup = reranker.lookup(request)  # the request's one cache lookup (None without a cache)
        if lookup is None:
            return await self._wait(Pending(request))
        metrics.count_score_cache(self._metric_label(request.model), lookup.hits, len(lookup.found) - lookup.hits)
        if lookup.found and lookup.complete:  # every score is known: answer without waiting for the model
            return RerankOutcome([float(x) for x in lookup.found], 0, 0, 0, 0, cached=lookup.hits)  # type: ignore[arg-type]
        outcome = await self._wait(Pending(request, lookup))
        return dataclasses.replace(outcome, cached=lookup.hits)

    async def _wait(self, pending: Pending) -> RerankOutcome:
        """``pending``'s outcome from its model call; cancelled, it is marked so that no pair of
        it starts from now on (those that never start are counted as saved here, those skipped
        inside a running call when it ends)."""
        try:
            return await self._rerank_batched(pending)
        except asyncio.CancelledError:
            pending.cancelled = True
            self.cancelled_requests += 1
            if not pending.started:
                lookup = pending.lookup
                self._count_saved(pending, len(pending.request.documents) if lookup is None else sum(1 for f in lookup.found if f is None))
            raise

    def _count_saved(self, pending: Pending, pairs: int) -> None:
        if pairs:
            self.cancelled_pairs += pairs
            metrics.count_cancelled_pairs(self._metric_label(pending.request.model), pairs)

    def _metric_label(self, model: Optional[str]) -> str:
        """The ``model`` label of a model's metrics (its stage's label for the default model)."""
        name = model_key(model)
        return self.metric_model if name == DEFAULT_MODEL else name

    async def _score_requests(self, pending: list[Pending]) -> list[RerankOutcome]:
        """One ``rerank_many`` call (in a worker thread) per model for the requests the coalescer
        merged: batches never mix models. The documents a request's cache lookup found are not
        looked up or scored again."""
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, p in enumerate(pending):
            if not p.cancelled:  # cancelled while it waited: never scored (counted when cancelled)
                groups[model_key(p.request.model)].append(i)
        out: list[Any] = [None] * len(pending)
        for name, rows in groups.items():
            reranker = await self.reranker_for(name)
            if self.fault.mode == "slow_model":  # a drill: the model call holds the queue this much longer
                await asyncio.sleep(self.fault.delay_s)
            rows = [i for i in rows if not pending[i].cancelled]  # also those cancelled during an earlier call or load
            if not rows:
                continue
            group = [pending[i].request for i in rows]
            lookups = [pending[i].lookup for i in rows]
            members = [pending[i] for i in rows]
            for p in members:
                p.started = True
            t0 = time.perf_counter()
            detailed = await asyncio.to_thread(reranker.rerank_many_detailed, group, lookups, lambda r: not members[r].cancelled)
            self._last_scored = time.monotonic()
            pairs = sum(p for _, p, _ in detailed)
            metrics.observe_latency("rerank_batch", (time.perf_counter() - t0) * 1000)
            metrics.observe_rerank_batch(len(group), pairs, self._metric_label(name))
            for i, p, (scores, n_pairs, tokens) in zip(rows, members, detailed):
                if p.cancelled:  # skipped between forward passes: what it did not read was saved
                    self._count_saved(p, int(sum(1 for x in scores if x != x)))
                out[i] = RerankOutcome([float(x) for x in scores], len(group), pairs, n_pairs, tokens)
        return out

    async def ping(self) -> dict[str, Any]:
        await apply_fault(self.fault, "reranker")
        return {
            "stage": "reranker",
            "model": self.reranker.scorer.model_name,
            "models": list(self.catalog),
            "loaded": [DEFAULT_MODEL, *sorted(self.loaded)],
            "runtime": dict(self.runtimes),
            "batching": self.batching.model_dump(),
            "replica": replica_id(),
            "cascade_stage": self.stage,
            "score_cache": self.cache.stats(),
        }

    async def stats(self) -> dict[str, Any]:
        """Batch sizes seen by this replica (most recent last), its live batching settings and models."""
        return {
            "replica": replica_id(),
            "batch_sizes": [n for _, n in self.coalescer.calls],
            "batching": self.batching.model_dump(),
            "pairs_scored": self.reranker.scorer.pairs_scored,
            "cancelled": {"requests": self.cancelled_requests, "pairs_saved": self.cancelled_pairs},
            "fault": self.fault.model_dump(),
            "serve_batching": not isinstance(self._rerank_batched, OneByOne),
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
