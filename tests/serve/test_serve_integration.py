"""The Serve application over real HTTP: one local Ray + Serve for the session, tiny models.

Covers both endpoints against the core run in process, the error matrix, batching (sizes above
1 under concurrency, each answer equal to the same request sent alone), live reconfigure of the
batch size, degraded answers when a retriever fails or hangs, autoscaling of the reranker alone,
and a model that cannot load failing its deployment with the explanation.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.request
from typing import Any

import httpx
import numpy as np
import pytest
from serve_fakes import TOPICS, wait_until

from serve_app.client import ServeAppClient, ServeAppError

pytestmark = [pytest.mark.slow, pytest.mark.serve]

DOCS = [
    "protein cell gene dna study about the results",
    "ocean sea river water and the climate",
    "football soccer team player in the league",
    "music song album band concert",
    "space star planet moon orbit telescope",
    "food bread coffee cheese recipe",
    "the gene expression of cancer cells in mice",
    "rain snow and weather over the sea",
]


def queries(n: int) -> list[str]:
    words = " ".join(TOPICS).split()
    return [f"{words[i % len(words)]} {words[(3 * i + 1) % len(words)]} {i}" for i in range(n)]


async def post_many(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as c:
        return await asyncio.gather(*(c.post(url, json=b) for b in bodies))


# --------------------------------------------------------------------------- endpoints


def test_health_and_info(serve_stack):
    with ServeAppClient(serve_stack.url()) as c:
        assert c.health() == {"status": "ok", "stages": {"bm25": "ok", "dense": "ok", "reranker": "ok"}}
        info = c.info()
    assert info["retrievers"] == ["bm25", "dense"]
    assert info["index"]["documents"] == 60
    assert info["limits"]["max_documents"] == 1000
    assert info["batching"]["max_batch_size"] == 16  # live value, from the reranker's user_config


def test_search_equals_the_in_process_pipeline(serve_stack, tiny_cross_encoder_dir, tiny_bi_encoder_dir):
    from serve_app.config import CrossEncoderConfig, DenseConfig
    from serve_app.pipeline import SearchPipeline

    pipeline = SearchPipeline.from_index(
        serve_stack.base_args["index_dir"],
        reranker_cfg=CrossEncoderConfig(model=str(tiny_cross_encoder_dir)),
        dense_config=DenseConfig(model=str(tiny_bi_encoder_dir)),
    )
    with ServeAppClient(serve_stack.url(), timeout=60) as c:
        for q in ("protein gene study", "space planet moon", "music band album"):
            got = c.search(q, top_k=20, rerank_top_m=10, top_n=12, return_documents=True)
            want = pipeline.search(q, top_k=20, rerank_top_m=10, top_n=12)
            assert got["degraded"] is False
            assert [r["id"] for r in got["results"]] == [r.doc_id for r in want.results]
            for g, w in zip(got["results"], want.results):
                assert g["fused_score"] == pytest.approx(w.fused_score, rel=1e-6)
                if w.rerank_score is None:
                    assert g["rerank_score"] is None
                else:
                    assert g["rerank_score"] == pytest.approx(w.rerank_score, abs=1e-4)
                assert {k: v["rank"] for k, v in g["retrievers"].items()} == w.retriever_ranks
                assert g["text"] == pipeline.corpus.get(g["id"]).text
            assert got["stages"]["rerank"]["candidates"] == 10


def test_rerank_endpoints_return_the_cross_encoder_scores(serve_stack, tiny_cross_encoder_dir):
    from serve_app.config import CrossEncoderConfig
    from serve_app.rerank import CrossEncoderScorer, Reranker

    cfg = CrossEncoderConfig(model=str(tiny_cross_encoder_dir))
    local = Reranker(CrossEncoderScorer(cfg), cfg).rerank("gene cancer cells", DOCS)
    body = {"query": "gene cancer cells", "documents": [d if i % 2 else {"text": d} for i, d in enumerate(DOCS)], "top_n": 5, "return_documents": True, "model": "default"}
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = httpx.post(serve_stack.url() + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        assert [x["index"] for x in out["results"]] == list(np.argsort(-local, kind="stable")[:5])
        for x in out["results"]:
            assert x["relevance_score"] == pytest.approx(float(local[x["index"]]), abs=1e-4)
            assert x["document"]["text"] == DOCS[x["index"]]
        assert out["meta"]["model"] == str(tiny_cross_encoder_dir)


ERRORS = [
    # (path, body, content type, status, type)
    ("/search", b'{"query": "a",', "application/json", 400, "invalid_json"),
    ("/search", b'{"query": "a", "top_k": NaN}', "application/json", 400, "invalid_json"),
    ("/rerank", b'{"query": "a", "documents": ["x"], "top_n": Infinity}', "application/json", 400, "invalid_json"),
    ("/v1/rerank", b"\x89PNG\r\n\x1a\n\x00\x00binary", "application/json", 400, "invalid_json"),
    ("/search", b'{"query": "a"}', "text/plain", 415, "unsupported_media_type"),
    ("/search", b'{"query": 1}', "application/json", 422, "validation_error"),
    ("/search", b'{"query": "a", "top_k": 100000}', "application/json", 422, "validation_error"),
    ("/rerank", b'{"query": "a", "documents": []}', "application/json", 422, "validation_error"),
    ("/v1/rerank", json.dumps({"query": "a", "documents": ["d"] * 1001}).encode(), "application/json", 422, "validation_error"),
    ("/v1/rerank", json.dumps({"query": "q" * 3000, "documents": ["d"]}).encode(), "application/json", 422, "validation_error"),
    ("/rerank", b'{"query": "' + b"a" * (9 * 1024 * 1024) + b'"}', "application/json", 413, "payload_too_large"),
    ("/nowhere", b"{}", "application/json", 404, "not_found"),
]


@pytest.mark.parametrize("path,body,ctype,status,etype", ERRORS, ids=[f"{e[0]}-{e[4]}-{i}" for i, e in enumerate(ERRORS)])
def test_error_matrix_over_http(serve_stack, path, body, ctype, status, etype):
    r = httpx.post(serve_stack.url() + path, content=body, headers={"content-type": ctype}, timeout=60)
    assert r.status_code == status, r.text[:300]
    assert r.json()["error"]["type"] == etype
    assert set(r.json()["error"]) == {"type", "message"}


def test_client_raises_the_envelope(serve_stack):
    with ServeAppClient(serve_stack.url()) as c:
        with pytest.raises(ServeAppError) as info:
            c.search("a", top_k=0)
    assert info.value.status_code == 422 and info.value.type == "validation_error" and "top_k" in info.value.message


# --------------------------------------------------------------------------- batching


def scrape_histogram(port: int, name: str) -> tuple[float, float]:
    """(observations, observations <= 1) of a histogram summed over its series."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    count = sum(float(m) for m in re.findall(rf"^{name}_count{{[^}}]*}} ([0-9.e+]+)$", text, re.M))
    le1 = sum(float(m) for m in re.findall(rf'^{name}_bucket{{[^}}]*le="1(?:\.0)?"[^}}]*}} ([0-9.e+]+)$', text, re.M))
    return count, le1


def test_concurrent_requests_share_batches_and_get_their_own_scores(serve_stack):
    url = serve_stack.url() + "/v1/rerank"
    qs = queries(24)
    bodies = [{"query": q, "documents": DOCS} for q in qs]
    alone = []
    for b in bodies:
        r = httpx.post(url, json=b, timeout=60)
        assert r.status_code == 200
        alone.append({x["index"]: x["relevance_score"] for x in r.json()["results"]})
    together = asyncio.run(post_many(url, bodies))
    sizes = []
    for b, r, want in zip(bodies, together, alone):
        assert r.status_code == 200, r.text
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert got.keys() == want.keys()
        for i in got:  # padding inside a shared batch changes scores only by float noise
            assert got[i] == pytest.approx(want[i], abs=1e-4), (b["query"], i)
        sizes.append(r.json()["meta"]["batch_size"])
    # Distinct queries give distinct score vectors, so a mix-up between requests would show above.
    assert len({tuple(round(a[i], 3) for i in sorted(a)) for a in alone}) == len(alone)
    assert max(sizes) > 1, sizes
    stats = serve_stack.call("main", "CrossEncoderReranker", "stats")
    assert max(stats["batch_sizes"]) > 1 and stats["serve_batching"] is True  # Serve's @serve.batch, then the coalescer
    print(f"\nobserved rerank batch sizes (per response) for 24 concurrent requests: {sorted(sizes)}")
    # The same evidence through the metric on Ray's Prometheus endpoint.
    name = "ray_serve_app_rerank_batch_size"
    count, le1 = wait_until(lambda: (lambda c: c if c[0] > c[1] else None)(scrape_histogram(serve_stack.metrics_port, name)), 60, f"{name} observations above 1")
    assert count > le1


def test_search_concurrency_matches_sequential(serve_stack):
    url = serve_stack.url() + "/search"
    bodies = [{"query": q, "top_k": 15, "rerank_top_m": 8, "top_n": 8} for q in queries(12)]
    alone = [httpx.post(url, json=b, timeout=60).json() for b in bodies]
    together = [r.json() for r in asyncio.run(post_many(url, bodies))]
    for a, t in zip(alone, together):
        assert [x["id"] for x in t["results"]] == [x["id"] for x in a["results"]]
        assert [x["score"] for x in t["results"]] == pytest.approx([x["score"] for x in a["results"]], abs=1e-4)


def test_reconfigure_batch_size_live(serve_stack):
    def stats() -> dict[str, Any]:
        return serve_stack.call("main", "CrossEncoderReranker", "stats")

    before = stats()
    app = serve_stack.app_config("main", deployments={"CrossEncoderReranker": {"user_config": {"max_batch_size": 2, "batch_wait_timeout_s": 0.05}}})
    try:
        serve_stack.deploy(app)
        wait_until(lambda: stats()["batching"]["max_batch_size"] == 2, 60, "max_batch_size 2 applied")
        after = stats()
        assert after["replica"] == before["replica"]  # reconfigured in place, not restarted
        out = asyncio.run(post_many(serve_stack.url() + "/rerank", [{"query": q, "documents": DOCS[:4]} for q in queries(16)]))
        sizes = [r.json()["meta"]["batch_size"] for r in out]
        assert max(sizes) == 2, sizes
    finally:
        serve_stack.deploy(serve_stack.app_config("main"))
    wait_until(lambda: stats()["batching"]["max_batch_size"] == 16, 60, "max_batch_size 16 restored")


# --------------------------------------------------------------------------- degradation


def _with_faults(stack, faults: dict[str, dict[str, Any]]) -> dict[str, Any]:
    deployments = {name: {"user_config": {"fault": f}} for name, f in faults.items()}
    return stack.app_config("main", deployments=deployments)


def test_retriever_down_or_hanging_gives_degraded_results_then_recovers(serve_stack):
    url = serve_stack.url() + "/search"
    body = {"query": "space star planet", "top_n": 5}
    timeout = serve_stack.base_args["timeouts"]["retriever_timeout_s"]
    try:
        serve_stack.deploy(_with_faults(serve_stack, {"DenseRetriever": {"mode": "error"}}))
        out = wait_until(lambda: (lambda j: j if j["stages"]["dense"]["status"] == "error" else None)(httpx.post(url, json=body, timeout=60).json()), 60, "dense failing")
        assert out["degraded"] is True and out["stages"]["bm25"]["status"] == "ok"
        assert out["results"] and all(set(x["retrievers"]) == {"bm25"} for x in out["results"])
        assert "injected failure" in out["stages"]["dense"]["error"]

        serve_stack.deploy(_with_faults(serve_stack, {"DenseRetriever": {"mode": "delay", "delay_s": 60}}))
        wait_until(lambda: httpx.post(url, json=body, timeout=60).json()["stages"]["dense"]["status"] == "timeout", 60, "dense hanging")
        t0 = time.perf_counter()
        out = httpx.post(url, json=body, timeout=60).json()
        elapsed = time.perf_counter() - t0
        assert out["degraded"] is True and out["stages"]["dense"]["status"] == "timeout" and out["results"]
        assert elapsed < timeout + 3.0, elapsed  # the ingress does not wait for the hung retriever
        r = httpx.get(serve_stack.url() + "/healthz", timeout=60)
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready" and "dense" in r.json()["error"]["message"]

        serve_stack.deploy(_with_faults(serve_stack, {"DenseRetriever": {"mode": "delay", "delay_s": 60}, "BM25Retriever": {"mode": "error"}}))
        r = wait_until(lambda: (lambda r: r if r.status_code == 503 else None)(httpx.post(url, json=body, timeout=60)), 60, "both retrievers down")
        assert r.json()["error"]["type"] == "service_unavailable"
    finally:
        serve_stack.deploy(serve_stack.app_config("main"))
    out = wait_until(lambda: (lambda j: j if not j["degraded"] else None)(httpx.post(url, json=body, timeout=60).json()), 60, "recovery")
    assert {out["stages"][s]["status"] for s in ("bm25", "dense", "rerank")} == {"ok"}


# --------------------------------------------------------------------------- autoscaling


def test_reranker_autoscales_alone_under_load(serve_stack):
    fast = {"upscale_delay_s": 0.5, "downscale_delay_s": 3, "look_back_period_s": 2, "metrics_interval_s": 0.5}
    app = serve_stack.app_config(
        "scale",
        args={"retrievers": ["bm25"]},
        deployments={
            # A delay fault makes each rerank call last 0.3 s without burning CPU.
            "CrossEncoderReranker": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, **fast}, "user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01, "fault": {"mode": "delay", "delay_s": 0.3}}},
            "BM25Retriever": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 50, **fast}},
        },
    )
    serve_stack.deploy(app)
    try:
        assert serve_stack.replicas("scale", "CrossEncoderReranker") == 1
        stop = threading.Event()
        errors: list[str] = []
        sent = [0]

        def load() -> None:
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    r = c.post(serve_stack.url("scale") + "/search", json={"query": "gene protein", "top_k": 5, "rerank_top_m": 3, "top_n": 3})
                    sent[0] += 1
                    if r.status_code != 200 or r.json()["degraded"]:
                        errors.append(r.text[:200])

        threads = [threading.Thread(target=load, daemon=True) for _ in range(10)]
        for t in threads:
            t.start()
        bm25_counts = []
        try:
            def scaled() -> bool:
                bm25_counts.append(serve_stack.replicas("scale", "BM25Retriever"))
                return serve_stack.replicas("scale", "CrossEncoderReranker") >= 2

            wait_until(scaled, 90, "the reranker to scale to 2 replicas", poll_s=0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert set(bm25_counts) == {1}, bm25_counts
        assert not errors, errors[:3]
        print(f"\nautoscaling: reranker reached 2 replicas after {sent[0]} requests; BM25 stayed at 1")
        wait_until(lambda: serve_stack.replicas("scale", "CrossEncoderReranker") == 1, 90, "the reranker to scale back to 1", poll_s=0.5)
        assert serve_stack.replicas("scale", "BM25Retriever") == 1
    finally:
        serve_stack.remove("scale")


# --------------------------------------------------------------------------- several rerankers (model multiplexing)


def test_named_rerankers_are_multiplexed_in_a_replica(serve_stack, tmp_path):
    """Two more test-built models of other sizes, at most one loaded beside the default: each
    request gets its own model's scores, and Serve's multiplexing evicts and reloads."""
    from serve_app.config import CrossEncoderConfig
    from serve_app.rerank import Reranker
    from serve_app.testing import build_tiny_cross_encoder

    small = str(build_tiny_cross_encoder(tmp_path / "small", seed=5, hidden_size=16, num_hidden_layers=1))
    large = str(build_tiny_cross_encoder(tmp_path / "large", seed=6, hidden_size=48, num_hidden_layers=3))
    app = serve_stack.app_config("multi", args={"retrievers": ["bm25"], "reranker": {"models": {"small": {"model": small}, "large": {"model": large}}, "aliases": {"rerank-v3.5": "large"}, "max_models_per_replica": 1}})
    serve_stack.deploy(app)
    try:
        url = serve_stack.url("multi")
        direct = {"small": Reranker.from_config(CrossEncoderConfig(model=small, device="cpu")), "large": Reranker.from_config(CrossEncoderConfig(model=large, device="cpu"))}
        for name in ("small", "rerank-v3.5", "small"):
            r = httpx.post(url + "/v2/rerank", json={"model": name, "query": "protein gene", "documents": DOCS}, timeout=120)
            assert r.status_code == 200, r.text
            want = direct["large" if name == "rerank-v3.5" else name].rerank("protein gene", DOCS)
            assert {x["index"]: x["relevance_score"] for x in r.json()["results"]} == pytest.approx({i: float(w) for i, w in enumerate(want)}, abs=1e-4), name
        stats = serve_stack.call("multi", "CrossEncoderReranker", "stats")
        assert stats["model_loads"] == {"small": 2, "large": 1} and stats["models_loaded"] == ["default", "small"]
        r = httpx.post(url + "/v2/rerank", json={"model": "medium", "query": "q", "documents": ["d"]}, timeout=60)
        assert r.status_code == 404 and "available models: default, small, large, rerank-v3.5" in r.json()["message"]
        hit = httpx.post(url + "/search", json={"query": "protein gene", "reranker": "large", "top_n": 3}, timeout=120).json()
        assert hit["funnel"]["reranker"] == "large" and hit["degraded"] is False
    finally:
        serve_stack.remove("multi")


# --------------------------------------------------------------------------- cascade, cache, query-hash routing


def test_a_cascade_stage_deploys_on_its_own_and_repeats_meet_their_cached_scores(serve_stack, tmp_path):
    """A cascade stage is its own deployment; two final reranker replicas behind the query-hash
    router: the repeats of a query all land on one replica, which answers them from its cache."""
    from serve_app.testing import build_tiny_cross_encoder

    small = str(build_tiny_cross_encoder(tmp_path / "small", seed=5, hidden_size=16, num_hidden_layers=1))
    app = serve_stack.app_config(
        "cascade",
        args={
            "retrievers": ["bm25"],
            "reranker": {"score_cache": {"max_bytes": 1 << 22}},
            "cascade": [{"name": "small", "reranker": {"model": small, "device": "cpu"}, "default_top_m": 8}],
        },
        deployments={
            "CrossEncoderReranker": {"num_replicas": 2, "request_router_config": {"request_router_class": "serve_app.serve.routing.QueryHashRouter"}},
            "CrossEncoderReranker-small": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}},
        },
    )
    serve_stack.deploy(app)
    try:
        assert serve_stack.replicas("cascade", "CrossEncoderReranker-small") == 1
        assert serve_stack.replicas("cascade", "CrossEncoderReranker") == 2
        url = serve_stack.url("cascade")
        body = {"query": "protein gene dna", "top_k": 10, "rerank_top_m": 4, "top_n": 6}
        answers = [httpx.post(url + "/search", json=body, timeout=120).json() for _ in range(4)]
        for a in answers:
            assert a["degraded"] is False and a["stages"]["rerank.small"]["candidates"] == 8 and a["stages"]["rerank"]["candidates"] == 4, a
            assert a["funnel"]["cascade"] == {"small": 8}
        assert all([x["id"] for x in a["results"]] == [x["id"] for x in answers[0]["results"]] for a in answers)
        assert all([x["score"] for x in a["results"]] == [x["score"] for x in answers[0]["results"]] for a in answers)
        stats = {}
        for _ in range(12):
            s = serve_stack.call("cascade", "CrossEncoderReranker", "stats")
            stats[s["replica"]] = s["score_cache"]
        assert len(stats) == 2, stats
        by_hits = sorted(stats.values(), key=lambda c: c["hits"])
        assert by_hits[0]["hits"] == 0 and by_hits[0]["misses"] == 0  # the other replica never saw the query
        assert by_hits[1]["misses"] == 4 and by_hits[1]["hits"] == 3 * 4  # scored once, then answered from the cache
        health = httpx.get(url + "/healthz", timeout=30).json()
        assert health["stages"]["reranker.small"] == "ok"
    finally:
        serve_stack.remove("cascade")


# --------------------------------------------------------------------------- model load failure


def test_unloadable_model_fails_the_deployment_with_the_explanation(serve_stack):
    from serve_app.serve.runner import DeployError, wait_for_apps

    app = serve_stack.app_config("broken", args={"retrievers": ["bm25"], "reranker": {"model": "acme/no-such-reranker"}})
    serve_stack.deploy(app, wait=False)
    try:
        with pytest.raises(DeployError) as info:
            wait_for_apps(["broken"], timeout_s=240)
        message = str(info.value)
        assert "DEPLOY_FAILED" in message
        assert "acme/no-such-reranker" in message
        assert "SERVE_APP_MODEL_PATH__ACME_NO_SUCH_RERANKER" in message  # how to provide it offline
        assert "SERVE_APP_RERANKER_MODEL" in message
        assert "Traceback" not in message
        from ray import serve

        dep = serve.status().applications["broken"].deployments["CrossEncoderReranker"]
        assert str(getattr(dep.status, "value", dep.status)) == "DEPLOY_FAILED"  # terminal, not retrying forever
        assert "ModelLoadError: Could not load the reranker model 'acme/no-such-reranker'" in dep.message
        print(f"\nDEPLOY_FAILED message as the CLI shows it:\n{message}")
    finally:
        serve_stack.remove("broken")
    with ServeAppClient(serve_stack.url()) as c:  # the main application is untouched
        assert c.health()["status"] == "ok"


# --------------------------------------------------------------------------- abandoned work, compatibility routes, tracing


def test_a_client_that_hangs_up_has_its_queued_pairs_dropped(serve_stack):
    """Serve cancels the handle calls of a request whose client went away: the reranker drops
    its pairs from the queue (the model call ahead of it made slow by the slow_model drill)."""
    url = serve_stack.url()

    def stats() -> dict[str, Any]:
        return serve_stack.call("main", "CrossEncoderReranker", "stats")

    before = stats()
    try:
        serve_stack.deploy(_with_faults(serve_stack, {"CrossEncoderReranker": {"mode": "slow_model", "delay_s": 4.0}}))
        wait_until(lambda: stats()["fault"]["mode"] == "slow_model", 60, "slow_model drill applied")
        before = stats()

        async def scenario() -> Any:
            async with httpx.AsyncClient(timeout=120) as waiting, httpx.AsyncClient() as leaving:
                waited = asyncio.create_task(waiting.post(url + "/search", json={"query": "protein gene cell", "top_n": 3, "rerank_top_m": 6}))
                await asyncio.sleep(0.5)  # its model call has begun (and holds the reranker for 4 s)
                with pytest.raises(httpx.TimeoutException):
                    await leaving.post(url + "/search", json={"query": "ocean sea river", "top_n": 3, "rerank_top_m": 8}, timeout=2.0)
                return await waited

        answer = asyncio.run(scenario())
        assert answer.status_code == 200 and answer.json()["stages"]["rerank"]["candidates"] == 6
        after = wait_until(lambda: (lambda s: s if s["cancelled"]["requests"] > before["cancelled"]["requests"] else None)(stats()), 60, "the cancellation reaching the reranker")
        assert after["cancelled"]["pairs_saved"] - before["cancelled"]["pairs_saved"] == 8
        time.sleep(5.0)  # past the abandoned request's turn at the model
        scored = stats()["pairs_scored"] - before["pairs_scored"]
        assert 6 <= scored <= 6 + 2, scored  # the waited request's pairs (and at most a health probe or two), none of the 8
    finally:
        serve_stack.deploy(serve_stack.app_config("main"))
    wait_until(lambda: stats()["fault"]["mode"] == "none", 60, "drill removed")
    # A compatibility route ignores (and counts) what its reference ignores.
    r = httpx.post(url + "/tei/rerank", json={"query": "protein", "texts": DOCS[:3], "top_n": 2, "colour": "red"}, timeout=60)
    assert r.status_code == 200 and len(r.json()) == 2


def test_a_search_is_one_trace_across_the_deployments(serve_stack):
    """Serve's tracing (tracing_config) with serve_app's spans: one trace per /search, the
    retrievers' and the reranker's spans in their replicas under the ingress's stage spans."""
    from serve_app.serve.tracing import read_spans

    r = httpx.post(serve_stack.url() + "/search", json={"query": "protein gene cell", "top_n": 3, "rerank_top_m": 5}, timeout=60)
    assert r.status_code == 200, r.text
    trace_id = r.headers["x-trace-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    wanted = {"serve_app.http", "serve_app.search", "serve_app.retrieve.bm25", "serve_app.retrieve.dense", "serve_app.bm25.search", "serve_app.dense.search", "serve_app.rerank", "serve_app.reranker.score", "serve_app.documents"}

    def spans() -> Any:
        got = [s for s in read_spans(serve_stack.spans_dir) if s["trace_id"] == trace_id]
        return got if wanted <= {s["name"] for s in got} else None

    trace = wait_until(spans, 60, "the trace's spans exported")
    by_id = {s["span_id"]: s for s in trace}
    named = {s["name"]: s for s in trace}

    def chain(s: dict[str, Any]) -> list[str]:
        out = []
        while s.get("parent_id") in by_id:
            s = by_id[s["parent_id"]]
            out.append(s["name"])
        return out

    roots = [s for s in trace if s.get("parent_id") not in by_id]
    assert len(roots) == 1, [s["name"] for s in roots]  # one tree, rooted in Serve's span of the ingress replica
    print("\n" + "\n".join(f"{'  ' * len(chain(s))}{s['name']} (pid {s['pid']}) {json.dumps({k: v for k, v in s['attributes'].items() if k.startswith('serve_app')}, sort_keys=True)}" for s in sorted(trace, key=lambda s: s["start_ns"])))
    for child, parent in (("serve_app.search", "serve_app.http"), ("serve_app.retrieve.bm25", "serve_app.search"), ("serve_app.retrieve.dense", "serve_app.search"), ("serve_app.rerank", "serve_app.search"), ("serve_app.documents", "serve_app.search"), ("serve_app.bm25.search", "serve_app.retrieve.bm25"), ("serve_app.dense.search", "serve_app.retrieve.dense"), ("serve_app.reranker.score", "serve_app.rerank")):
        assert parent in chain(named[child]), (child, chain(named[child]))
    ingress_pid = named["serve_app.search"]["pid"]
    assert len({ingress_pid, named["serve_app.bm25.search"]["pid"], named["serve_app.dense.search"]["pid"], named["serve_app.reranker.score"]["pid"]}) == 4  # four replicas
    search = named["serve_app.search"]["attributes"]
    assert search["serve_app.asked.rerank_top_m"] == 5 and search["serve_app.used.rerank_depth"] == 5 and search["serve_app.degraded"] is False
    assert search["serve_app.stage.rerank"] == "ok" and search["serve_app.results"] == 3
    assert named["serve_app.rerank"]["attributes"]["serve_app.rerank.pairs_scored"] == 5 == named["serve_app.reranker.score"]["attributes"]["serve_app.rerank.pairs_scored"]
    assert named["serve_app.reranker.score"]["attributes"]["serve_app.rerank.model"] == "default"
    assert named["serve_app.http"]["attributes"]["http.response.status_code"] == 200
    assert not any("protein" in json.dumps(s["attributes"]) for s in trace if s["name"].startswith("serve_app"))  # no request text


# --------------------------------------------------------------------------- metrics (after the tests above recorded them)


def test_every_documented_metric_is_exported(serve_stack):
    from serve_app.serve import metrics

    def exported() -> list[str]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{serve_stack.metrics_port}/metrics", timeout=10).read().decode()
        missing = []
        for spec in metrics.SPECS.values():
            if spec.feature:  # recorded only by applications with that feature (writes: test_serve_live_writes.py)
                continue
            name = f"ray_{spec.name}" + ("_bucket" if spec.kind == "histogram" else "")
            if not re.search(rf"^{name}{{", text, re.M):
                missing.append(name)
        return missing

    deadline = time.monotonic() + 60
    while True:
        missing = exported()
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert missing == [], f"documented in docs/METRICS.md but not exported: {missing}"


def test_every_dashboard_query_returns_data_from_a_real_prometheus(serve_stack, tmp_path):
    """Debian's prometheus, with the shipped scrape config (Ray's service-discovery file) at a
    1 s interval, scrapes the running app under a little load; then every PromQL expression of
    the shipped Grafana dashboard, evaluated by Prometheus, returns series. The live-writes row
    needs writes.enabled (its queries are checked by name in test_cluster_configs.py)."""
    import shutil
    import subprocess

    import yaml

    from conftest import REPO_ROOT, free_port

    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus is needed (apt-get install prometheus; scripts/system-packages.sh installs it)"
    cfg = yaml.safe_load((REPO_ROOT / "cluster" / "monitoring" / "prometheus.yml").read_text())
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    # Ray's head writes the service-discovery file when its dashboard runs; this instance runs
    # none, so the same file is written here, naming the node's metrics export port.
    sd_file = tmp_path / "prom_metrics_service_discovery.json"
    sd_file.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{serve_stack.metrics_port}"]}]))
    for job in cfg["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["refresh_interval"] = "1s"
            sd["files"] = [str(sd_file)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    prom = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=5).status_code == 200, 60, "prometheus ready")
        wait_until(lambda: any(t["health"] == "up" for t in httpx.get(api + "/targets", timeout=5).json()["data"]["activeTargets"]), 60, "the Ray node scraped")
        # An application whose traffic reaches every panel: a failing retriever (degraded
        # answers), a score cache (repeated queries hit it), an objective no request meets (the
        # SLO-aware depth lowers every depth).
        serve_stack.deploy(serve_stack.app_config("monitor", args={"reranker": {"score_cache": {"max_bytes": 1 << 20}}, "slo": {"search_p95_ms": 1.0, "min_rerank_top_m": 2}}, deployments={"BM25Retriever": {"user_config": {"fault": {"mode": "error"}}}}))
        for i in range(12):  # a little load while it scrapes
            for app in ("main", "monitor"):
                url = serve_stack.url(app)
                httpx.post(url + "/search", json={"query": f"protein gene {i % 3}", "top_n": 3}, timeout=60)
                httpx.post(url + "/rerank", json={"query": "ocean", "documents": DOCS[:3], "colour": "ignored"}, timeout=60)
                httpx.post(url + "/search", json={"query": ""}, timeout=60)  # an error response
            time.sleep(0.5)
        dashboard = json.loads((REPO_ROOT / "cluster" / "monitoring" / "grafana-serve-app.json").read_text())
        row, exprs = "", []
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                row = panel["title"]
                continue
            if "writes.enabled" not in row:
                exprs += [t["expr"] for t in panel["targets"]]
        assert len(exprs) >= 25
        empty: list[str] = []

        def evaluate() -> list[str]:
            empty.clear()
            for expr in exprs:
                q = expr.replace("$application", "main|monitor").replace("$__rate_interval", "30s")
                r = httpx.get(api + "/query", params={"query": q}, timeout=10).json()
                assert r["status"] == "success", (expr, r)
                if not r["data"]["result"]:
                    empty.append(expr)
            return empty

        deadline = time.monotonic() + 60
        while evaluate() and time.monotonic() < deadline:
            time.sleep(2)
    finally:
        prom.terminate()
        prom.wait(20)
        serve_stack.remove("monitor")
    assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)


def test_rerank_metrics_carry_the_model(serve_stack):
    """After the multiplexing test: the pairs counter is split by the model that scored them."""

    def by_model() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{serve_stack.metrics_port}/metrics", timeout=10).read().decode()
        out: dict[str, float] = {}
        for m in re.finditer(r'^ray_serve_app_rerank_pairs_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
            model = re.search(r'model="([^"]*)"', m.group(1))
            if model:
                out[model.group(1)] = out.get(model.group(1), 0.0) + float(m.group(2))
        return out

    seen = wait_until(lambda: (lambda d: d if {"default", "small", "large"} <= set(d) else None)(by_model()), 60, "rerank pairs by model")
    assert all(v > 0 for v in seen.values()), seen


def test_the_default_dtype_auto_serves_end_to_end(serve_stack, tiny_cross_encoder_dir):
    """The served default ``dtype: auto`` without the suite's float32 override: the replica makes
    the CPU's choice (bfloat16 where the CPU computes it natively, checked against float32 on the
    drift probe; float32 otherwise, or when bfloat16 drifts past the tolerance, said so), and
    answers within that precision of float32."""
    from serve_app.config import CrossEncoderConfig
    from serve_app.rerank import Reranker
    from serve_app.rerank.device import cpu_has_native_bf16

    app = serve_stack.app_config(
        "auto",
        args={"retrievers": ["bm25"]},
        deployments={"CrossEncoderReranker": {"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": {"SERVE_APP_RERANKER_CPU_DTYPE": ""}}}}},
    )
    assert "dtype" not in app["args"]["reranker"]  # the configured default: auto
    serve_stack.deploy(app)
    try:
        runtime = serve_stack.call("auto", "CrossEncoderReranker", "ping")["runtime"]["default"]
        if cpu_has_native_bf16() and "auto_fallback" not in runtime:
            assert runtime["dtype"] == "bfloat16" and runtime["drift"]["runtime"] == "torch-bfloat16"
            tolerance = 0.05
        else:
            assert runtime["dtype"] == "float32"
            assert "auto_fallback" in runtime or not cpu_has_native_bf16()
            tolerance = 1e-4
        r = httpx.post(serve_stack.url("auto") + "/rerank", json={"query": "protein gene", "documents": DOCS}, timeout=120)
        assert r.status_code == 200, r.text
        want = Reranker.from_config(CrossEncoderConfig(model=str(tiny_cross_encoder_dir), device="cpu", dtype="float32")).rerank("protein gene", DOCS)
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert got == pytest.approx({i: float(w) for i, w in enumerate(want)}, abs=tolerance)
    finally:
        serve_stack.remove("auto")


# --------------------------------------------------------------------------- collections


def test_two_collections_answer_as_each_corpus_alone(serve_stack, tmp_path, tiny_bi_encoder_dir):
    """A second collection with its own corpus, fields and reranker in the same application: its
    own deployments; each collection's answers equal the in-process pipeline over its index alone."""
    from serve_app.config import CrossEncoderConfig, DenseConfig
    from serve_app.corpus import write_documents_jsonl
    from serve_app.pipeline import SearchPipeline
    from serve_app.testing import build_tiny_cross_encoder
    from serve_app.types import Document

    other = str(build_tiny_cross_encoder(tmp_path / "other-ce", seed=7, hidden_size=16, num_hidden_layers=1))
    papers = [Document(f"p{i}", DOCS[i % len(DOCS)] + f" paper {i}", metadata={"tenant": ["acme", "globex"][i % 2]}) for i in range(24)]
    write_documents_jsonl(papers, tmp_path / "papers.jsonl")
    app = serve_stack.app_config(
        "colls",
        args={"retrievers": ["bm25"], "collections": {"papers": {"index_dir": str(tmp_path / "papers-index"), "corpus": str(tmp_path / "papers.jsonl"), "fields": {"tenant": "keyword"}, "reranker": {"model": other}}}},
        deployments={"papers.BM25Retriever": {"ray_actor_options": {"num_cpus": 0.1}}, "papers.CrossEncoderReranker": {"ray_actor_options": {"num_cpus": 0.1}}},
    )
    serve_stack.deploy(app)
    try:
        assert serve_stack.replicas("colls", "papers.BM25Retriever") == 1 and serve_stack.replicas("colls", "papers.CrossEncoderReranker") == 1
        url = serve_stack.url("colls")
        alone = {
            "": SearchPipeline.from_index(serve_stack.base_args["index_dir"], reranker_cfg=CrossEncoderConfig(model=serve_stack.base_args["reranker"]["model"]), dense_config=DenseConfig(model=str(tiny_bi_encoder_dir)), retrievers=["bm25"]),
            "/collections/papers": SearchPipeline.from_index(str(tmp_path / "papers-index"), reranker_cfg=CrossEncoderConfig(model=other), retrievers=["bm25"]),
        }
        for prefix, pipeline in alone.items():
            for q in ("protein gene study", "space planet moon"):
                got = httpx.post(url + prefix + "/search", json={"query": q, "top_k": 12, "rerank_top_m": 6, "top_n": 8}, timeout=120).json()
                want = pipeline.search(q, top_k=12, rerank_top_m=6, top_n=8)
                assert [r["id"] for r in got["results"]] == [r.doc_id for r in want.results], prefix
                assert [r["rerank_score"] for r in got["results"][:6]] == pytest.approx([r.rerank_score for r in want.results[:6]], abs=1e-4)
        flt = httpx.post(url + "/collections/papers/search", json={"query": "ocean music food rain", "filter": {"tenant": "globex"}, "rerank_top_m": 0, "return_documents": True, "top_n": 20}, timeout=60).json()
        assert len(flt["results"]) == 12 and all(r["metadata"]["tenant"] == "globex" for r in flt["results"])  # every globex paper has one of the words
        assert httpx.post(url + "/search", json={"query": "x", "filter": {"tenant": "globex"}}, timeout=60).status_code == 422  # the default collection declares no fields
        assert httpx.post(url + "/collections/nope/search", json={"query": "x"}, timeout=60).status_code == 404
        assert httpx.get(url + "/info", timeout=60).json()["collections"] == ["default", "papers"]
        assert httpx.get(url + "/collections/papers/healthz", timeout=60).json()["status"] == "ok"
    finally:
        serve_stack.remove("colls")
