"""Query-hash routing for the reranker: send a query to the replica likely to hold its scores.

Each reranker replica keeps its own pair-score cache (``serve_app.rerank.cache``). Serve's
default router (power of two choices) spreads the repeats of a query over every replica, so
with R replicas each one scores the pairs of a popular query once: R times the misses.
:class:`QueryHashRouter` ranks the replicas by rendezvous (highest random weight) hashing of
the query (and model) instead, so repeats of a query go to one replica while distinct queries
spread evenly; when that replica's queue is full, or much longer than the shortest queue
(``imbalance_threshold`` requests), the next replica in the query's ranking takes the request.
Replicas that join or leave move only the queries they win or held (rendezvous hashing).

Enable it per deployment (``deployments.yaml``)::

    deployments:
      - name: CrossEncoderReranker
        request_router_config:
          request_router_class: serve_app.serve.routing.QueryHashRouter
          request_router_kwargs: {imbalance_threshold: 16}

The pure piece, :func:`rendezvous_order`, needs no Ray.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, List, Optional, Sequence

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica


def rendezvous_order(key: str, replica_ids: Sequence[str]) -> list[str]:
    """``replica_ids`` ordered by their rendezvous weight for ``key``, highest first.

    >>> rendezvous_order("q", ["a", "b", "c"]) == rendezvous_order("q", ["c", "a", "b"])
    True
    """

    def weight(rid: str) -> bytes:
        return hashlib.blake2b(f"{rid}\x00{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


def routing_key(args: Sequence[Any], kwargs: dict[str, Any], model: str = "") -> Optional[str]:
    """The key of a reranker call: its request's model and query (None when the call has none)."""
    request = args[0] if args else kwargs.get("request")
    query = getattr(request, "query", None)
    if not isinstance(query, str):
        return None
    return f"{model or getattr(request, 'model', None) or ''}\x00{query}"


class QueryHashRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Serve request router: replicas ranked by rendezvous hashing of the request's query."""

    def initialize_state(self, imbalance_threshold: int = 16, **kwargs: Any) -> None:
        self.imbalance_threshold = int(imbalance_threshold)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica], pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
            candidates = [r for r in candidate_replicas if r.replica_id in ids] or list(candidate_replicas)
        else:
            candidates = list(candidate_replicas)
        if not candidates:
            return []
        key = None
        if pending_request is not None:
            key = routing_key(pending_request.args, pending_request.kwargs, pending_request.metadata.multiplexed_model_id)
        if key is None:
            return [random.sample(candidates, len(candidates))]  # no query: the lowest queue, ties at random
        by_id = {r.replica_id.unique_id: r for r in candidates}
        ranked = [by_id[i] for i in rendezvous_order(key, list(by_id))]
        cache = getattr(self, "replica_queue_len_cache", None)  # RequestRouter's public property
        if cache is not None and len(ranked) > 1:
            lens = [cache.get(r.replica_id) for r in ranked]
            known = [n for n in lens if n is not None]
            if lens[0] is not None and known and lens[0] - min(known) > getattr(self, "imbalance_threshold", 16):
                return [ranked[1:], ranked[:1]]  # the query's replica is swamped: the least loaded of the rest first
        return [[r] for r in ranked]
