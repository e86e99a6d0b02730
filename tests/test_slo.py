"""SLO-aware rerank depth: the depth controller on a fake clock, and the real funnel with fake
latencies under a burst (serve_app.slo)."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.config import FusionConfig, SloConfig
from serve_app.funnel import Funnel, FunnelRequest
from serve_app.slo import DepthController
from serve_app.types import Hit, RerankOutcome
from tests.test_cascade import LIMITS
from tests.test_pipeline import DOCS


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
