"""Query-hash routing of the reranker (serve_app.serve.routing): rendezvous hashing, and the
Serve request router's ranking on fake replicas."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from serve_app.types import RerankRequest




def test_rendezvous_routing_sends_repeats_to_one_replica_and_spreads_queries():
    from serve_app.serve.routing import rendezvous_order

    replicas = [f"replica-{i}" for i in range(4)]
    first = {q: rendezvous_order(q, replicas)[0] for q in (f"query {i}" for i in range(400))}
    assert all(rendezvous_order(q, list(reversed(replicas)))[0] == r for q, r in first.items())
    counts = {r: list(first.values()).count(r) for r in replicas}
    assert min(counts.values()) > 60, counts  # about 100 each
    # a replica leaving moves only its own queries
    gone = "replica-2"
    for q, r in first.items():
        after = rendezvous_order(q, [x for x in replicas if x != gone])[0]
        assert after == r or r == gone


def _replica(rid: str):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid), name=rid)


def _router(queue_lens=None, threshold=4):
    from serve_app.serve.routing import QueryHashRouter

    router = object.__new__(QueryHashRouter)
    router._replica_queue_len_cache = SimpleNamespace(get=lambda rid: (queue_lens or {}).get(rid.unique_id))
    router.initialize_state(imbalance_threshold=threshold)
    router.apply_multiplex_routing = lambda pending_request: None
    return router


def _pending(query: str):
    return SimpleNamespace(args=[RerankRequest(query, ["d"])], kwargs={}, metadata=SimpleNamespace(multiplexed_model_id=""))


def test_the_router_ranks_replicas_by_the_query_and_avoids_a_swamped_one():
    pytest.importorskip("ray.serve.request_router")
    replicas = [_replica(f"r{i}") for i in range(3)]
    router = _router()
    chosen = {q: asyncio.run(router.choose_replicas(replicas, _pending(q)))[0][0].name for q in ("a", "b", "c", "d", "e", "f")}
    for q, r in chosen.items():
        for _ in range(3):
            assert asyncio.run(router.choose_replicas(replicas, _pending(q)))[0][0].name == r
    assert len(set(chosen.values())) > 1
    ranked = asyncio.run(router.choose_replicas(replicas, _pending("a")))
    assert [len(g) for g in ranked] == [1, 1, 1] and ranked[0][0].name == chosen["a"]
    # the query's replica holds a much longer queue than the others: the rest come first
    swamped = _router({chosen["a"]: 10, **{r.name: 0 for r in replicas if r.name != chosen["a"]}})
    groups = asyncio.run(swamped.choose_replicas(replicas, _pending("a")))
    assert chosen["a"] not in [r.name for r in groups[0]] and [r.name for r in groups[-1]] == [chosen["a"]]
    # a call without a query: every replica, lowest queue first (Serve's choice)
    assert len(asyncio.run(router.choose_replicas(replicas, SimpleNamespace(args=[], kwargs={}, metadata=SimpleNamespace(multiplexed_model_id=""))))[0]) == 3


def test_a_named_model_routes_among_the_replicas_that_hold_it():
    """The multiplexed branch: with a model id, only the replicas Serve's multiplex routing names
    are ranked (all of them when none holds the model yet), and the model is part of the key."""
    pytest.importorskip("ray.serve.request_router")
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class ReplicaId:  # hashable, as Serve's ReplicaID is
        unique_id: str

    replicas = [SimpleNamespace(replica_id=ReplicaId(f"r{i}"), name=f"r{i}") for i in range(4)]
    holders = {"r1", "r3"}
    router = _router()
    seen = []

    def multiplex(pending_request):
        seen.append(pending_request.metadata.multiplexed_model_id)
        return {r.replica_id for r in replicas if r.name in holders}

    router.apply_multiplex_routing = multiplex

    def pending(query, model):
        return SimpleNamespace(args=[RerankRequest(query, ["d"], model=model)], kwargs={}, metadata=SimpleNamespace(multiplexed_model_id=model))

    for q in ("a", "b", "c", "d", "e", "f", "g", "h"):
        ranked = asyncio.run(router.choose_replicas(replicas, pending(q, "small")))
        assert {r.name for group in ranked for r in group} == holders  # never a replica without the model
        assert asyncio.run(router.choose_replicas(replicas, pending(q, "small")))[0][0].name == ranked[0][0].name  # repeats stay
    assert seen and set(seen) == {"small"}
    # the model is part of the key: one query under two models is ranked independently
    from serve_app.serve.routing import rendezvous_order, routing_key

    ids = [r.name for r in replicas]
    keys = {m: routing_key([RerankRequest("q", ["d"], model=m)], {}, m) for m in ("small", "large")}
    assert keys["small"] != keys["large"]
    orders = {m: [rendezvous_order(routing_key([RerankRequest(f"q{i}", ["d"])], {}, m), ids)[0] for i in range(40)] for m in ("small", "large")}
    assert orders["small"] != orders["large"]
    # no replica holds the model yet: every replica is a candidate
    router.apply_multiplex_routing = lambda pending_request: set()
    ranked = asyncio.run(router.choose_replicas(replicas, pending("a", "new")))
    assert {r.name for group in ranked for r in group} == {r.name for r in replicas}


def test_the_router_reads_queue_lengths_through_the_public_property():
    pytest.importorskip("ray.serve.request_router")
    from serve_app.serve.routing import QueryHashRouter

    assert isinstance(QueryHashRouter.__dict__.get("replica_queue_len_cache") or getattr(QueryHashRouter, "replica_queue_len_cache"), property)
    import inspect

    assert "_replica_queue_len_cache" not in inspect.getsource(QueryHashRouter)
