"""Sharded retrievers in the Serve application: shard sets under the index, scatter-gather at the ingress.

With ``sharding: {bm25: N, dense: M}`` in the application args (N or M > 1), the application
deploys one retriever deployment per shard (``BM25Retriever-shard0`` ... ``-shard{N-1}``, each
with its own replicas and options in ``deployments.yaml``) instead of ``BM25Retriever``. Each
shard replica loads only its shard. The ingress asks every shard of a retriever concurrently
and merges their lists into the exact global top-k (:func:`scatter_gather`, see
:mod:`serve_app.retrieval.sharding` for why the merge is exact, BM25 included).

Shard sets live inside the index directory, one per retriever and shard count
(:mod:`serve_app.index.shards`). The application builder builds a missing or stale set once
(:func:`serve_app.index.ensure_index`) from the index's own document store, so the shards and the
ingress's documents always come from the same corpus; a shard replica refuses a set built from
another corpus (``IndexLoadError`` -> ``DEPLOY_FAILED``). Rebuilding the index (``serve-app
index``) replaces the whole directory, shard sets included; the next deploy builds them again.

A shard that fails or does not answer within the shard deadline (90% of
``timeouts.retriever_timeout_s``, so that the ingress still reports which shard it was) fails
its whole retriever for that request: the answer is degraded (the other retriever's results),
and ``stages.<retriever>.error`` names the shard(s). A retriever with a missing shard would
silently lose documents, so partial shard results are never used.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Sequence

from serve_app.errors import StageOverloaded
from serve_app.funnel import describe_exception
from serve_app.retrieval.sharding import merge_top_k
from serve_app.serve.config import AppConfig
from serve_app.types import Hit

logger = logging.getLogger(__name__)

#: Deployment name of each retriever (and the prefix of its shard deployments).
RETRIEVER_DEPLOYMENTS = {"bm25": "BM25Retriever", "dense": "DenseRetriever"}
#: The query encoder of a sharded dense retriever (one encoding per query for every shard): its
#: deployment, and its key among the ingress's stage handles (and /healthz's stages).
QUERY_ENCODER = "DenseQueryEncoder"
QUERY_ENCODER_KEY = "dense_encoder"
#: Fraction of the retriever timeout the ingress waits for shards before naming the late ones.
SHARD_DEADLINE_FRACTION = 0.9


class ShardFailure(RuntimeError):
    """Some shards of a retriever failed or were late; the message names them."""


def shard_deployment_name(retriever: str, index: int) -> str:
    """``BM25Retriever-shard0``, ``DenseRetriever-shard2``, ..."""
    return f"{RETRIEVER_DEPLOYMENTS[retriever]}-shard{index}"


def deployment_names(cfg: AppConfig) -> list[str]:
    """Names of the retriever deployments ``cfg`` deploys (one per shard when sharded)."""
    names = []
    for r in cfg.retrievers:
        n = getattr(cfg.sharding, r)
        names.extend([RETRIEVER_DEPLOYMENTS[r]] if n == 1 else [shard_deployment_name(r, i) for i in range(n)])
    return names


def encodes_queries_once(cfg: AppConfig) -> bool:
    """Whether ``cfg`` deploys a query encoder (:data:`QUERY_ENCODER`): a sharded dense retriever."""
    return "dense" in cfg.retrievers and cfg.sharding.dense > 1


def shard_deadline(timeout_s: float) -> float:
    """How long the ingress waits for the shards of one call whose stage timeout is ``timeout_s``."""
    return timeout_s * SHARD_DEADLINE_FRACTION


async def _all_shards(retriever: str, calls: Sequence[Callable[[], Awaitable[Any]]], deadline_s: float, failed: str) -> list[Any]:
    """Every shard's answer, in shard order; :class:`ShardFailure` names each shard that failed
    or missed ``deadline_s`` (a full queue, ``StageOverloaded``, propagates: it sheds the request)."""
    tasks = [asyncio.ensure_future(call()) for call in calls]
    try:
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        raise
    for t in pending:
        t.cancel()
    for t in done:
        if isinstance(t.exception(), StageOverloaded):
            raise t.exception()  # type: ignore[misc]
    problems = []
    for i, t in enumerate(tasks):
        if t in pending:
            problems.append(f"shard {i}: no answer within {deadline_s:.3g}s")
        elif t.exception() is not None:
            problems.append(f"shard {i}: {describe_exception(t.exception())}")  # type: ignore[arg-type]
    if problems:
        raise ShardFailure(f"{len(problems)} of {len(tasks)} {retriever} shards {failed} ({'; '.join(problems)})")
    return [t.result() for t in tasks]


async def scatter_gather(retriever: str, calls: Sequence[Callable[[], Awaitable[list[Hit]]]], k: int, deadline_s: float) -> list[Hit]:
    """Call every shard concurrently and merge their top-``k`` lists into the global top-``k``."""
    return merge_top_k(await _all_shards(retriever, calls, deadline_s, "failed"), k)


async def ping_all(retriever: str, calls: Sequence[Callable[[], Awaitable[Any]]], deadline_s: float) -> dict[str, Any]:
    """Ping every shard; :class:`ShardFailure` names those that do not answer within ``deadline_s``."""
    return {"stage": retriever, "shards": await _all_shards(retriever, calls, deadline_s, "not ready")}

