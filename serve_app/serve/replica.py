"""What every server behind a deployment shares: loading with a short error, fault injection,
the replica's id, Serve's request batching and model multiplexing (with stand-ins outside a
replica, so the servers run in tests without Ray)."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from serve_app.serve.config import BatchingConfig, FaultInjection

logger = logging.getLogger("ray.serve")


class InjectedFault(RuntimeError):
    """Raised by a stage whose fault injection is set to ``error``."""


async def apply_fault(fault: FaultInjection, stage: str) -> None:
    """Simulate an unresponsive or failing stage (every call: search, rerank and ping)."""
    if fault.mode == "error":
        raise InjectedFault(f"{stage}: injected failure (fault.mode=error)")
    if fault.mode == "delay" and fault.delay_s > 0:
        await asyncio.sleep(fault.delay_s)


def load_or_explain(what: str, loader: Any, *args: Any, hint: str = "") -> Any:
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


def replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - outside a replica
        return "local"


class OneByOne:
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


def serve_batch(fn: Any, cfg: BatchingConfig, max_concurrent_batches: int = 1) -> Any:
    """``fn`` (an async function of a list) behind Serve's request batching, sized by ``cfg``."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        return OneByOne(fn)
    return serve.batch(max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s, max_concurrent_batches=max_concurrent_batches)(fn)


def index_dir_of(name: str, index_dir: str, retriever: str, shard: Any) -> str:
    """The directory a retriever replica loads: the index itself, or its shard's index."""
    if shard is None:
        return index_dir
    from serve_app.index import open_shard

    return str(load_or_explain(name, open_shard, index_dir, retriever, shard.index, shard.num_shards))


class ModelSlot:
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


class LocalModels:
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


def serve_multiplexed(load: Any, max_models: int) -> Any:
    """``load(name)`` behind Serve's model multiplexing (LRU, at most ``max_models`` per replica,
    model-aware routing), or :class:`LocalModels` outside a replica."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        return LocalModels(load, max_models)

    async def load_model(name: str) -> Any:  # a plain function: Serve keeps its cache on it
        return await load(name)

    return serve.multiplexed(max_num_models_per_replica=max_models)(load_model)
