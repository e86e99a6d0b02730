"""Rerank less for the same answer: cascades, SLO-aware depth, the score cache and query-hash routing.

Everything here runs without Ray: the funnel over in-process stages with tiny random-weight
cross-encoders (two seeds: a "small" and a "large" model), the depth controller on a fake
clock, the cache on its own and inside the Reranker, the router's ranking on fake replicas.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from serve_app.config import CascadeStage, CrossEncoderConfig, FunnelLimits, FusionConfig, SloConfig
from serve_app.errors import FunnelError
from serve_app.funnel import CascadeDepths, Funnel, FunnelRequest, order_by_scores, resolve_funnel
from serve_app.pipeline import SearchPipeline
from serve_app.rerank.cache import ENTRY_OVERHEAD_BYTES, ScoreCache, entry_bytes
from serve_app.slo import DepthController
from serve_app.types import Hit, RerankOutcome, RerankRequest
from tests.test_pipeline import CORPUS, DOCS, FakeRetriever

LIMITS = FunnelLimits(default_top_k=10, max_top_k=20, default_rerank_top_m=4, max_rerank_top_m=20, default_top_n=10, max_top_n=20)
QUERIES = ["protein cell", "cancer tumor heart", "music film city", "water energy"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from serve_app.rerank import CrossEncoderScorer, Reranker
    from serve_app.testing import build_tiny_cross_encoder

    out = {}
    for name, seed in (("small", 11), ("large", 22)):
        d = build_tiny_cross_encoder(tmp_path_factory.mktemp(name), seed=seed)
        cfg = CrossEncoderConfig(model=str(d), device="cpu")
        out[name] = Reranker(CrossEncoderScorer(cfg), cfg)
    return out


class Failing:
    def rerank_many(self, requests):
        raise RuntimeError("the small stage is down")


class Counting:
    """A reranker wrapper that counts the documents it is sent."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.documents = 0

    def rerank_many(self, requests):
        self.documents += sum(len(r.documents) for r in requests)
        return self.inner.rerank_many(requests)


def pipeline(large, small=None, *, default_top_m=12, max_top_m=16, fusion=None):
    retrievers = {"bm25": FakeRetriever("bm25", 1), "dense": FakeRetriever("dense", 2)}
    cascade = [(CascadeStage(name="small", reranker=CrossEncoderConfig(model="unused"), default_top_m=default_top_m, max_top_m=max_top_m), small)] if small is not None else []
    return SearchPipeline(CORPUS, retrievers, large, fusion or FusionConfig(), LIMITS, cascade=cascade)


# --------------------------------------------------------------------------- cascades


def test_a_cascade_returns_the_large_models_order_on_the_small_models_shortlist(models):
    small, large = Counting(models["small"]), Counting(models["large"])
    pipe = pipeline(large, small)
    flat = pipeline(models["large"])
    for q in QUERIES:
        res = pipe.search(q, rerank_top_m=4)
        fused = [h.doc_id for h in flat.search(q, rerank_top_m=0, top_n=20).results]
        texts = {d.id: d.content for d in DOCS}
        s = models["small"].rerank(q, [texts[d] for d in fused[:12]])
        shortlist = [fused[i] for i in sorted(range(12), key=lambda i: -s[i])][:4]
        big = models["large"].rerank(q, [texts[d] for d in shortlist])
        expected = [shortlist[i] for i in sorted(range(4), key=lambda i: -big[i])]
        got = [it.doc_id for it in res.results]
        assert got[:4] == expected
        # then the rest of the small stage's order, then the fused order
        rest_small = [fused[i] for i in sorted(range(12), key=lambda i: -s[i])][4:]
        assert got[4:12] == rest_small[: len(got[4:12])]
        assert res.stages["rerank.small"].status == "ok" and res.stages["rerank.small"].candidates == 12
        assert res.stages["rerank"].candidates == 4 and not res.degraded
        assert res.funnel.sizes()["cascade"] == {"small": 12}
        assert res.results[0].rerank_score == pytest.approx(float(max(big)))
    assert (small.documents, large.documents) == (12 * len(QUERIES), 4 * len(QUERIES))


def test_a_blended_stage_keeps_the_order_it_received_in_the_blend(models):
    from serve_app.funnel import apply_rerank

    retrievers = {"bm25": FakeRetriever("bm25", 1), "dense": FakeRetriever("dense", 2)}
    stage = CascadeStage(name="small", reranker=CrossEncoderConfig(model="unused"), default_top_m=12, max_top_m=16, blend="rrf", blend_weight=0.5)
    pipe = SearchPipeline(CORPUS, retrievers, models["large"], FusionConfig(rrf_k=5), LIMITS, cascade=[(stage, models["small"])])
    flat = pipeline(models["large"], fusion=FusionConfig(rrf_k=5))
    texts = {d.id: d.content for d in DOCS}
    differs = []
    for q in QUERIES:
        fused = flat.search(q, rerank_top_m=0, top_n=20).results
        head = [FusedLike(it.doc_id) for it in fused[:12]]
        s = models["small"].rerank(q, [texts[h.doc_id] for h in head])
        blended = [c.hit.doc_id for c in apply_rerank(head, s, FusionConfig(rerank_blend="rrf", rrf_k=5, rerank_weight=0.5))]
        by_score = [head[i].doc_id for i in sorted(range(12), key=lambda i: -s[i])]
        res = pipe.search(q, rerank_top_m=0, top_n=12)  # the stage alone decides the order
        assert [it.doc_id for it in res.results] == blended
        differs.append(blended != by_score)
    assert any(differs)  # the received rank changed the order somewhere


class FusedLike:
    def __init__(self, doc_id: str) -> None:
        self.doc_id = doc_id


def test_a_batch_through_a_cascade_equals_one_query_at_a_time(models):
    pipe = pipeline(models["large"], models["small"])
    one = [[it.doc_id for it in pipe.search(q, rerank_top_m=4).results] for q in QUERIES]
    many = [[it.doc_id for it in r.results] for r in pipe.search_batch(QUERIES, rerank_top_m=4, rerank_queries_per_call=3)]
    assert one == many


def test_a_failed_small_stage_degrades_to_the_fused_order_flagged(models):
    pipe = pipeline(models["large"], Failing())
    flat = pipeline(models["large"])
    for q in QUERIES[:2]:
        res = pipe.search(q, rerank_top_m=4)
        ref = flat.search(q, rerank_top_m=4)  # the large model on the fused head: what is left
        assert [i.doc_id for i in res.results] == [i.doc_id for i in ref.results]
        assert res.degraded == ["rerank.small"] and res.stages["rerank.small"].status == "error"
        assert "the small stage is down" in res.stages["rerank.small"].error
        assert res.stages["rerank"].status == "ok"


def test_cascade_depths_come_from_the_request_within_limits():
    cascade = [CascadeDepths("small", 12, 16)]
    r = resolve_funnel(FunnelRequest("q"), LIMITS, ["bm25", "dense"], cascade=cascade)
    assert r.cascade == (("small", 12),) and r.rerank_top_m == 4
    r = resolve_funnel(FunnelRequest("q", cascade={"small": 6}, rerank_top_m=6), LIMITS, ["bm25", "dense"], cascade=cascade)
    assert r.cascade == (("small", 6),) and r.rerank_top_m == 6
    # a default final depth above the stage's is lowered to it; an explicit one is refused
    assert resolve_funnel(FunnelRequest("q", cascade={"small": 3}), LIMITS, ["bm25", "dense"], cascade=cascade).rerank_top_m == 3
    # a stage's default is lowered to the pool
    assert resolve_funnel(FunnelRequest("q", top_k=2, rerank_top_m=0), LIMITS, ["bm25", "dense"], cascade=cascade).cascade == (("small", 4),)
    # 0 skips the stage
    r = resolve_funnel(FunnelRequest("q", cascade={"small": 0}, rerank_top_m=8), LIMITS, ["bm25", "dense"], cascade=cascade)
    assert r.cascade == (("small", 0),) and r.rerank_top_m == 8


@pytest.mark.parametrize(
    "request_fields, message",
    [
        ({"cascade": {"tiny": 5}}, "cascade: unknown stage 'tiny'"),
        ({"cascade": {"small": 17}}, "cascade.small=17 exceeds cascade stage small's max_top_m=16"),
        ({"cascade": {"small": -1}}, "cascade.small=-1 is below the minimum 0"),
        ({"cascade": {"small": 2.5}}, "cascade.small must be an integer"),
        ({"cascade": {"small": 3}, "rerank_top_m": 4}, "rerank_top_m=4 exceeds cascade.small=3"),
        ({"cascade": {"small": 12}, "top_k": 5}, r"cascade.small=12 exceeds the candidate pool \(10\)"),
        ({"cascade": ["small"]}, "cascade must map stage names to depths"),
    ],
)
def test_cascade_depth_overrides_are_validated(request_fields, message):
    with pytest.raises(FunnelError, match=message):
        resolve_funnel(FunnelRequest("q", **request_fields), LIMITS, ["bm25", "dense"], cascade=[CascadeDepths("small", 12, 16)])


def test_depths_never_grow_along_a_cascade():
    cascade = [CascadeDepths("a", 12, 20), CascadeDepths("b", 16, 20)]
    r = resolve_funnel(FunnelRequest("q"), LIMITS, ["bm25", "dense"], cascade=cascade)
    assert r.cascade == (("a", 12), ("b", 12))  # b's default lowered to a's depth
    with pytest.raises(FunnelError, match="cascade.b=14 exceeds cascade.a=12"):
        resolve_funnel(FunnelRequest("q", cascade={"b": 14}), LIMITS, ["bm25", "dense"], cascade=cascade)
    with pytest.raises(FunnelError, match="this pipeline has no cascade stages"):
        resolve_funnel(FunnelRequest("q", cascade={"a": 1}), LIMITS, ["bm25", "dense"])


def test_order_by_scores_is_stable_and_puts_nan_last():
    assert order_by_scores(["a", "b", "c", "d"], [1.0, float("nan"), 1.0, 2.0]) == ["d", "a", "c", "b"]


# --------------------------------------------------------------------------- SLO-aware depth


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


SLO = SloConfig(search_p95_ms=1000, min_rerank_top_m=10, headroom=1.0, window=16, window_s=10, min_samples=3)


def test_the_depth_controller_lowers_depth_under_load_and_restores_it():
    clock = FakeClock()
    c = DepthController(SLO, clock=clock)
    assert c.plan(50, 0).depth == 50  # too few observations: as asked
    for _ in range(3):
        c.observe(depth=50, pairs_ahead=0, rerank_ms=500.0, total_ms=600.0)  # 10 ms per pair, 100 ms else
    assert c.plan(50, 0).depth == 50  # 600 ms predicted
    plan = c.plan(50, 30)  # 100 + 10 * (30 + m) <= 1000 -> m <= 60: 50 fits
    assert plan.depth == 50 and not plan.reduced
    plan = c.plan(50, 60)  # m <= 90 - 60 = 30
    assert (plan.depth, plan.reduced, plan.requested) == (30, True, 50)
    assert plan.predicted_ms == pytest.approx(100 + 10 * 110)
    assert c.plan(50, 500).depth == 10  # never below the floor
    assert c.plan(5, 500).depth == 5  # nor above what was asked
    assert c.plan(50, 0).depth == 50  # the load fell: depth recovers at once
    assert c.reduced_total == 2
    # slower observations raise the per-pair estimate, old ones expire with the window
    clock.t = 1.0
    for _ in range(3):
        c.observe(depth=20, pairs_ahead=0, rerank_ms=800.0, total_ms=900.0)  # 40 ms per pair
    assert c.plan(50, 0).reduced
    clock.t = 20.0  # every observation is older than window_s
    assert c.estimate() is None and c.plan(50, 0).depth == 50


def test_observed_latencies_past_the_objective_tighten_the_budget():
    c = DepthController(SLO, clock=FakeClock())
    for _ in range(4):  # 10 ms per pair of 140 pairs that shared the reranker, 100 ms else: 1.5 s seen
        c.observe(depth=50, pairs_ahead=90, rerank_ms=1400.0, total_ms=1500.0)
    assert c.plan(50, 0).depth == 50  # 600 ms predicted, within the tightened budget 1000 * 1000 / 1500
    assert c.plan(50, 10).depth == 46  # 700 ms predicted > 667: (667 - 100) / 10 - 10 -> 46 (50 without the feedback)
    assert c.stats()["observed_p95_ms"] == 1500.0


def test_the_depth_controller_is_off_without_an_objective():
    c = DepthController(SloConfig(), clock=FakeClock())
    for _ in range(10):
        c.observe(depth=50, pairs_ahead=0, rerank_ms=1e6, total_ms=1e6)
    assert not c.enabled and c.plan(50, 10**6).depth == 50


class SlowStages:
    """Funnel stages whose reranker takes ``ms_per_pair`` per pair of everything in flight."""

    def __init__(self, ms_per_pair: float) -> None:
        self.ms_per_pair = ms_per_pair
        self.depths: list[int] = []

    def documents(self, ids):
        texts = {d.id: d for d in DOCS}
        return [texts.get(i) for i in ids]

    async def retrieve(self, name, queries, k):
        return [[Hit(d.id, float(len(DOCS) - i)) for i, d in enumerate(DOCS[:k])] for _ in queries]

    async def rerank(self, requests, stage=None):
        n = sum(len(r.documents) for r in requests)
        self.depths.extend(len(r.documents) for r in requests)
        await asyncio.sleep(n * self.ms_per_pair / 1000)
        return [RerankOutcome([float(-i) for i in range(len(r.documents))]) for r in requests]


def test_the_funnel_reranks_fewer_under_a_burst_and_reports_it():
    """Real funnel, fake latencies: with many requests in flight, depths drop (never below the
    floor), the burst shares what the objective leaves (its first requests do not take full
    depth ahead of the others), the answers say so, and a lone request afterwards gets its full depth."""
    slo = SloConfig(search_p95_ms=200, min_rerank_top_m=4, headroom=1.0, window=64, window_s=60, min_samples=3)
    clock = FakeClock()
    controller = DepthController(slo, clock=clock)
    stages = SlowStages(ms_per_pair=2.0)  # a lone request of 16 pairs: ~32 ms
    funnel = Funnel(stages, retrievers=["bm25"], rerank_available=True, limits=LIMITS, fusion=FusionConfig(), depth=controller)

    async def run():
        for _ in range(4):  # warm-up, one at a time: depth as asked
            r = await funnel.search(FunnelRequest("q", top_k=16, rerank_top_m=16, top_n=16))
            assert r.funnel.rerank_top_m == 16 and not r.stages["rerank"].depth_reduced
        burst = await asyncio.gather(*(funnel.search(FunnelRequest("q", top_k=16, rerank_top_m=16, top_n=16)) for _ in range(12)))
        after = await funnel.search(FunnelRequest("q", top_k=16, rerank_top_m=16, top_n=16))
        return burst, after

    burst, after = asyncio.run(run())
    used = [r.funnel.rerank_top_m for r in burst]
    reduced = [r for r in burst if r.stages["rerank"].depth_reduced]
    assert reduced, used
    assert min(used) >= 4 and max(used) < 16
    assert max(used) - min(used) <= 2, used  # shared, not first-come full depth and the rest at the floor
    assert sum(used) * stages.ms_per_pair <= 1.1 * slo.search_p95_ms, used  # the burst's pairs fit the objective
    for r in reduced:
        d = r.stages["rerank"].to_dict()
        assert d["depth_reduced"] is True and d["requested_top_m"] == 16 and d["candidates"] == r.funnel.rerank_top_m
        assert len([it for it in r.results if it.rerank_score is not None]) == r.funnel.rerank_top_m
    assert after.funnel.rerank_top_m == 16 and "depth_reduced" not in after.stages["rerank"].to_dict()
    assert funnel.pairs_in_flight == 0


def test_the_controller_shares_the_budget_among_waiting_requests():
    c = DepthController(SloConfig(search_p95_ms=1000, min_rerank_top_m=5, headroom=0.9), clock=lambda: 0.0)
    for _ in range(8):
        c.observe(depth=50, pairs_ahead=0, rerank_ms=500.0, total_ms=600.0)  # 10 ms a pair, 100 ms besides
    assert c.plan(50, 0, waiting=1).depth == 50  # alone: 600 ms fits 900
    assert c.plan(50, 0, waiting=2).depth == 40  # 100 + 10 * 2m <= 900
    assert c.plan(50, 20, waiting=3).depth == 20  # (80 - 20) / 3
    assert c.plan(50, 0, waiting=100).depth == 5  # never below the floor
    assert c.plan(50, 0, waiting=0).depth == 50  # counted as itself


# --------------------------------------------------------------------------- the score cache


def test_cached_scores_equal_uncached_ones_exactly(models):
    from serve_app.rerank import Reranker

    plain = models["large"]
    cache = ScoreCache(1 << 20)
    cached = Reranker(plain.scorer, plain.cfg, cache, "large")
    texts = [d.content for d in DOCS]
    requests = [RerankRequest(q, texts[i : i + 7]) for i, q in enumerate(QUERIES)]
    first = cached.rerank_many(requests)
    assert cache.stats()["misses"] == 28 and cache.stats()["hits"] == 0
    again = cached.rerank_many(requests)
    assert cache.stats()["hits"] == 28
    reference = plain.rerank_many(requests)
    for a, b, c in zip(first, again, reference):
        assert a.dtype == c.dtype and np.array_equal(a, c) and np.array_equal(b, c)
    # partly cached: only the new documents are scored, the answer is still exact
    mixed = RerankRequest(QUERIES[0], [texts[3], texts[15], texts[0], texts[16]])
    before = cached.scorer.pairs_scored
    (scores, pairs, _), = cached.rerank_many_detailed([mixed])
    assert pairs == 2 and cached.scorer.pairs_scored - before == 2
    # the hits are the stored bits; the misses are what scoring them (alone) computes
    assert scores[0] == first[0][3] and scores[2] == first[0][0]
    assert np.array_equal(scores[[1, 3]], plain.rerank_many([RerankRequest(QUERIES[0], [texts[15], texts[16]])])[0])
    # scored in another batch, a pair differs at most in its last bits (padding), with or without a cache
    assert np.allclose(scores, plain.rerank_many([mixed])[0], rtol=0, atol=1e-5)
    assert cached.cached(mixed) == [float(x) for x in scores]


def test_what_the_score_depends_on_is_in_the_key(models):
    from serve_app.rerank import Reranker

    plain = models["large"]
    cache = ScoreCache(1 << 20)
    a = Reranker(plain.scorer, plain.cfg, cache, "a")
    b = Reranker(models["small"].scorer, models["small"].cfg, cache, "b")
    doc = " ".join(["protein"] * 200)
    req = RerankRequest("protein", [doc])
    sa = a.rerank_many([req])[0]
    assert b.cached(req) == [None]  # models never share entries
    assert np.array_equal(b.rerank_many([req])[0], models["small"].rerank_many([req])[0])
    short = RerankRequest("protein", [doc], max_tokens_per_doc=8)  # another effective max length
    assert a.cached(short) == [None]
    assert not np.array_equal(a.rerank_many([short])[0], sa)
    assert a.cached(RerankRequest("protein", [doc], truncation_direction="left")) == [None]
    assert a.cached(RerankRequest("Protein", [doc])) == [None]
    assert a.cached(req) == [float(sa[0])]
    # a reloaded model starts empty; the other model keeps its entries
    assert cache.drop_model("a") >= 1
    assert a.cached(req) == [None] and b.cached(req) != [None]


def test_the_byte_bound_holds_and_evicts_least_recently_used():
    cache = ScoreCache(max_bytes=entry_bytes("q") * 10)
    ctx = cache.context("m", 512)
    cache.put(ctx, "q", [f"d{i}" for i in range(8)], range(8))
    assert len(cache) == 8
    assert cache.get(ctx, "q", ["d0"]) == [0.0]  # d0 is now the most recently used
    cache.put(ctx, "q", [f"e{i}" for i in range(5)], range(5))
    assert cache.bytes <= cache.max_bytes and len(cache) == 10
    assert cache.get(ctx, "q", ["d0", "d1", "d3", "d4", "e4"]) == [0.0, None, None, 4.0, 4.0]  # d1-d3 were the least recently used
    assert cache.stats()["evictions"] == 3
    huge = ScoreCache(max_bytes=ENTRY_OVERHEAD_BYTES)
    huge.put(huge.context("m", 1), "q" * 100, ["d"], [1.0])  # an entry larger than the bound is not kept
    assert len(huge) == 0 and huge.bytes == 0
    off = ScoreCache(0)
    off.put(off.context("m", 1), "q", ["d"], [1.0])
    assert len(off) == 0


def test_the_charged_bytes_cover_the_memory_entries_take():
    import tracemalloc

    cache = ScoreCache(1 << 30)
    ctx = cache.context("m", 512)
    docs = [f"document number {i}" for i in range(5000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, 5000, 10):
            cache.put(ctx, f"query {i} " + "x" * 40, docs[i : i + 10], [float(j) + 0.25 for j in range(10)])
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == 5000
    assert used <= cache.bytes, (used, cache.bytes)


# --------------------------------------------------------------------------- query-hash routing


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


def test_the_core_pieces_import_no_ray():
    import serve_app.funnel as f
    import serve_app.rerank.cache as c
    import serve_app.slo as s

    for mod in (f, c, s):
        assert "import ray" not in open(mod.__file__).read()
