"""Cascades, SLO-aware depth and the score cache at the service's HTTP edge and in the reranker
server (in process, no Ray), and the builder's deployments for a cascade."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from serve_fakes import FakeBackends, asgi_request, fake_rerank_score, service_app, small_corpus

from serve_app.serve.config import parse_app_config

CORPUS = small_corpus(60)
CASCADE = [{"name": "small", "reranker": {"model": "/models/small"}, "default_top_m": 12, "max_top_m": 30}]


def make_app(faults: dict[str, str] | None = None, backends: Any = None, **overrides: Any):
    args = {"cascade": CASCADE, "timeouts": {"retriever_timeout_s": 0.5, "rerank_timeout_s": 0.5, "health_timeout_s": 0.5}, **overrides}
    app, backends, _ = service_app(backends or FakeBackends(CORPUS, dict(faults or {}), hang_s=5.0), CORPUS, **args)
    return app, backends


call = asgi_request


def test_search_through_a_cascade_reports_every_stage():
    app, backends = make_app()
    q = "protein gene study"
    r = call(app, "POST", "/search", json={"query": q, "top_k": 20, "rerank_top_m": 5, "top_n": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["funnel"]["cascade"] == {"small": 12} and body["funnel"]["rerank_top_m"] == 5
    assert body["stages"]["rerank.small"]["status"] == "ok" and body["stages"]["rerank.small"]["candidates"] == 12
    assert body["stages"]["rerank"]["candidates"] == 5 and "rerank.small" in body["timings_ms"]
    small_calls = [c for c in backends.calls if c[0] == "reranker.small"]
    large_calls = [c for c in backends.calls if c[0] == "reranker"]
    assert [c[1][1] for c in small_calls] == [12] and [c[1][1] for c in large_calls] == [5]
    ids = [x["id"] for x in body["results"]]
    # the large (fake) model's order of the small model's top 5, then the small model's order
    small_order = sorted(ids, key=lambda d: -fake_rerank_score(f"small:{q}", CORPUS.get(d).content))
    assert set(ids[:5]) == set(small_order[:5])
    assert ids[:5] == sorted(ids[:5], key=lambda d: -fake_rerank_score(q, CORPUS.get(d).content))
    assert ids[5:12] == small_order[5:12]


def test_cascade_depths_are_validated_with_the_error_envelope():
    app, _ = make_app()
    for body, words in (
        ({"cascade": {"tiny": 3}}, "unknown stage 'tiny'"),
        ({"cascade": {"small": 31}}, "max_top_m=30"),
        ({"cascade": {"small": 4}, "rerank_top_m": 5}, "rerank_top_m=5 exceeds cascade.small=4"),
        ({"cascade": {"small": -1}}, "greater than or equal to 0"),
        ({"cascade": {"small": "ten"}}, "valid integer"),
    ):
        r = call(app, "POST", "/search", json={"query": "protein", "top_k": 20, **body})
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["type"] == "validation_error" and words in r.json()["error"]["message"], r.text


def test_a_failed_small_stage_leaves_the_fused_order_flagged():
    app, _ = make_app({"reranker.small": "error"})
    ref_app, _ = make_app(cascade=[])
    body = {"query": "ocean river water", "top_k": 20, "rerank_top_m": 5, "top_n": 8}
    r, ref = call(app, "POST", "/search", json=body).json(), call(ref_app, "POST", "/search", json=body).json()
    assert r["degraded"] is True and r["stages"]["rerank.small"]["status"] == "error"
    assert "unavailable" in r["stages"]["rerank.small"]["error"]
    assert [x["id"] for x in r["results"]] == [x["id"] for x in ref["results"]]  # large model on the fused head


def test_health_and_info_name_the_cascade_and_slo():
    app, _ = make_app(slo={"search_p95_ms": 800, "min_rerank_top_m": 3})
    h = call(app, "GET", "/healthz").json()
    assert h["stages"]["reranker.small"] == "ok"
    info = call(app, "GET", "/info").json()
    assert info["cascade"][0]["name"] == "small" and info["cascade"][0]["default_top_m"] == 12
    assert info["slo"]["search_p95_ms"] == 800 and "live" in info["slo"]
    assert info["rerankers"]["score_cache"] == {"max_bytes": 0}


class SlowBackends(FakeBackends):
    """The final reranker takes 3 ms per document of everything in flight (a saturated replica)."""

    inflight: int = 0

    async def rerank(self, request, stage=None):
        self.inflight += len(request.documents)
        try:
            await asyncio.sleep(0.003 * self.inflight)
            return await super().rerank(request, stage)
        finally:
            self.inflight -= len(request.documents)


def test_slo_aware_depth_at_the_http_edge():
    backends = SlowBackends(CORPUS, {})
    app, _ = make_app(backends=backends, cascade=[], slo={"search_p95_ms": 150, "min_rerank_top_m": 4, "min_samples": 3, "headroom": 1.0})

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            body = {"query": "music song band", "top_k": 20, "rerank_top_m": 20, "top_n": 20}
            warm = [await c.post("/search", json=body) for _ in range(4)]
            burst = await asyncio.gather(*(c.post("/search", json=body) for _ in range(16)))
            return warm, burst

    warm, burst = asyncio.run(go())
    assert all(r.json()["funnel"]["rerank_top_m"] == 20 for r in warm)
    reduced = [r.json() for r in burst if r.json()["stages"]["rerank"].get("depth_reduced")]
    assert reduced, [r.json()["funnel"] for r in burst]
    for b in reduced:
        assert b["stages"]["rerank"]["requested_top_m"] == 20 and 4 <= b["funnel"]["rerank_top_m"] < 20
        assert b["stages"]["rerank"]["candidates"] == b["funnel"]["rerank_top_m"]
        assert sum(1 for x in b["results"] if x["rerank_score"] is not None) == b["funnel"]["rerank_top_m"]


def test_the_builder_deploys_each_cascade_stage_on_its_own(tmp_path):
    from serve_app.serve.app import build_application

    cfg = parse_app_config({"index_dir": str(tmp_path), "cascade": CASCADE}, use_env=False)
    app = build_application(cfg, {"CrossEncoderReranker-small": {"num_replicas": 3, "ray_actor_options": {"num_cpus": 0.5}}})
    ingress = app._bound_deployment
    stages = ingress.init_args[4]
    assert [s._bound_deployment.name for s in stages] == ["CrossEncoderReranker-small"]
    small = stages[0]._bound_deployment
    assert small._deployment_config.num_replicas == 3 and small.ray_actor_options["num_cpus"] == 0.5
    assert small.init_args[0].stage == "small" and small.init_args[0].reranker.model == "/models/small"
    assert ingress.init_args[3]._bound_deployment.name == "CrossEncoderReranker"
    with pytest.raises(ValueError, match="unknown deployment name"):
        build_application(cfg, {"CrossEncoderReranker-big": {}})
    with pytest.raises(Exception, match="unique"):
        parse_app_config({"index_dir": str(tmp_path), "cascade": CASCADE * 2}, use_env=False)


@pytest.fixture(scope="module")
def cached_server(tiny_cross_encoder_dir):
    from serve_app.serve.config import RerankerConfig, RerankerServerConfig
    from serve_app.serve.deployments import RerankerServer

    cfg = RerankerServerConfig(reranker=RerankerConfig(model=str(tiny_cross_encoder_dir), device="cpu", score_cache={"max_bytes": 1 << 20}, models={"other": {"model": str(tiny_cross_encoder_dir), "device": "cpu", "max_length": 32}}))
    return RerankerServer(cfg)


def test_the_reranker_server_answers_repeats_from_its_cache(cached_server):
    from serve_app.types import RerankRequest

    docs = [d.content for d in list(CORPUS)[:6]]
    req = RerankRequest("protein gene", docs)
    first = asyncio.run(cached_server.rerank(req))
    again = asyncio.run(cached_server.rerank(req))
    assert first.pairs == 6 and first.cached == 0
    assert again.scores == first.scores and again.pairs == 0 and again.cached == 6 and again.batch_size == 0
    partial = asyncio.run(cached_server.rerank(RerankRequest("protein gene", docs[:3] + [d.content for d in list(CORPUS)[6:8]])))
    assert partial.cached == 3 and partial.pairs == 2 and partial.scores[:3] == first.scores[:3]
    stats = asyncio.run(cached_server.stats())["score_cache"]
    assert stats["hits"] >= 9 and stats["entries"] == 8
    # another model never reads these entries; unloading it drops only its own
    other = asyncio.run(cached_server.rerank(RerankRequest("protein gene", docs, model="other")))
    assert other.cached == 0 and other.pairs == 6
    cached_server._unloaded("other")
    assert asyncio.run(cached_server.rerank(RerankRequest("protein gene", docs))).cached == 6
    assert asyncio.run(cached_server.stats())["score_cache"]["entries"] == 8
