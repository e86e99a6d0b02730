"""Reliability: overload shedding, request deadlines, replica death, a retriever down, client retries.

The first part drives the ingress in process (fake stages, no Ray). The second part runs on the
module's local Ray + Serve (``serve_stack``, tiny models, loopback only) with an application
``rel`` that has small queue limits, two reranker replicas and requires an API key:

* overload: a burst against a deliberately slow reranker (fault injection ``delay``) gets only
  200 or 503, the rejections come back fast with ``Retry-After``, never a 500;
* deadline: a stage slower than ``timeouts.request_timeout_s`` gives 504 ``deadline_exceeded``,
  and the same replicas serve the next request normally;
* a reranker replica killed (``ray.kill``) during a bounded load: zero failed client requests
  (the client retries 5xx with backoff, the ingress retries a call whose replica died), and the
  replica count recovers;
* the dense retriever's replica killed: degraded answers, flagged, until it is back;
* the API key over real HTTP, and that it appears in no Ray log.

Every load is bounded in requests and seconds; faults and apps are reset in ``finally``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import pytest
from serve_fakes import FakeBackends, asgi_request, service_app, small_corpus, wait_until

from serve_app.client import AsyncServeAppClient, ServeAppClient, ServeAppError, _delay
from serve_app.errors import StageOverloaded
from serve_app.serve.resilience import call_stage

CORPUS = small_corpus(60)
KEY_ENV = "SERVE_APP_TEST_API_KEY"
API_KEY = secrets.token_urlsafe(32)
SEARCH = {"query": "protein gene study", "top_k": 10, "rerank_top_m": 4, "top_n": 4}
DOCS = ["protein cell gene dna", "ocean sea river water", "football team player", "space star planet moon"]
RERANK = {"query": "gene protein", "documents": DOCS}


# =========================================================================== in process (no Ray)


class SlowOrFullBackends(FakeBackends):
    """Fake stages with two more faults: ``overloaded`` (queue full) and ``slow`` (sleeps ``slow_s``)."""

    slow_s: float = 1.0

    async def _fault(self, stage: str) -> None:
        mode = self.faults.get(stage)
        if mode == "overloaded":
            raise StageOverloaded(stage, 2.5)
        if mode == "slow":
            await asyncio.sleep(self.slow_s)
            return
        await super()._fault(stage)


def make_app(faults: Optional[dict[str, str]] = None, **timeouts: float):
    t = {"retriever_timeout_s": 5.0, "rerank_timeout_s": 5.0, "health_timeout_s": 1.0, "request_timeout_s": 5.0, **timeouts}
    app, backends, _ = service_app(SlowOrFullBackends(CORPUS, dict(faults or {})), CORPUS, api_keys=(), timeouts=t)
    return app, backends


def call(app, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = asgi_request(app, method, path, **kwargs)
    return r, time.perf_counter() - t0


def error_of(r: httpx.Response, status: int, error_type: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    keys = {"error", "message"} if r.request.url.path.endswith("/rerank") else {"error"}  # Cohere-shaped routes repeat the message
    assert set(body) == keys and body["error"]["type"] == error_type, body
    return body["error"]["message"]


@pytest.mark.parametrize("stage", ["reranker", "bm25", "dense"])
@pytest.mark.parametrize("path,body", [("/search", SEARCH), ("/rerank", RERANK)])
def test_a_full_stage_queue_sheds_the_request_with_503_and_retry_after(stage, path, body):
    app, _ = make_app({stage: "overloaded"})
    r, _ = call(app, "POST", path, json=body)
    if path == "/rerank" and stage != "reranker":
        assert r.status_code == 200  # /rerank does not use the retrievers
        return
    message = error_of(r, 429 if path == "/rerank" else 503, "overloaded")  # the rerank routes answer 429, as Cohere, Jina and TEI do
    assert r.headers["retry-after"] == "3"  # the stage's 2.5 s, rounded up
    assert stage in message and "retry after 3 s" in message


def test_request_deadline_gives_504_then_the_next_request_is_served():
    app, backends = make_app({"reranker": "slow"}, request_timeout_s=0.4)
    backends.slow_s = 3.0
    for path, body in (("/rerank", RERANK), ("/search", SEARCH)):
        r, elapsed = call(app, "POST", path, json=body)
        assert "0.4" in error_of(r, 504, "deadline_exceeded")
        assert 0.35 < elapsed < 2.0, elapsed  # the deadline, not the stage's 3 s
    backends.faults.clear()
    r, _ = call(app, "POST", "/search", json=SEARCH)
    assert r.status_code == 200 and r.json()["degraded"] is False
    r, _ = call(app, "POST", "/rerank", json=RERANK)
    assert r.status_code == 200 and len(r.json()["results"]) == len(DOCS)


def test_stage_timeouts_shorter_than_the_deadline_still_degrade():
    app, _ = make_app({"reranker": "slow"}, rerank_timeout_s=0.2, request_timeout_s=3.0)
    r, elapsed = call(app, "POST", "/search", json=SEARCH)
    assert r.status_code == 200 and r.json()["degraded"] is True and r.json()["stages"]["rerank"]["status"] == "timeout"
    assert elapsed < 2.0


def test_every_retriever_timing_out_is_a_504():
    app, _ = make_app({"bm25": "hang", "dense": "hang"}, retriever_timeout_s=0.2)
    r, _ = call(app, "POST", "/search", json=SEARCH)
    assert "no requested retriever answered in time" in error_of(r, 504, "stage_timeout")


# --------------------------------------------------------------------------- call_stage


def test_call_stage_translates_back_pressure_and_retries_a_dead_replica():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    async def run(outcomes: list[Any]) -> tuple[Any, int]:
        attempts = 0

        async def once() -> Any:
            nonlocal attempts
            attempts += 1
            out = outcomes[min(attempts, len(outcomes)) - 1]
            if isinstance(out, BaseException):
                raise out
            return out

        try:
            return await call_stage("reranker", once), attempts
        except Exception as exc:
            return exc, attempts

    out, attempts = asyncio.run(run([BackPressureError(4, 2, 503, 2.2)]))
    assert isinstance(out, StageOverloaded) and out.stage == "reranker" and out.retry_after_header() == "3" and attempts == 1
    out, attempts = asyncio.run(run([BackPressureError(4, 2)]))
    assert isinstance(out, StageOverloaded) and out.retry_after_header() == "1"  # no retry_after_s configured
    out, attempts = asyncio.run(run([ActorDiedError(), "scores"]))
    assert out == "scores" and attempts == 2  # the replica died: retried once, elsewhere
    out, attempts = asyncio.run(run([ActorDiedError(), ActorDiedError(), "never"]))
    assert isinstance(out, ActorDiedError) and attempts == 2  # only once
    out, attempts = asyncio.run(run([ValueError("bad input"), "never"]))
    assert isinstance(out, ValueError) and attempts == 1  # other failures are not retried


# --------------------------------------------------------------------------- client retries


def test_client_retries_retryable_answers_with_backoff():
    answers = {"n": 0}
    script = [503, 502, 504, 200]

    def handler(request: httpx.Request) -> httpx.Response:
        status = script[answers["n"]]
        answers["n"] += 1
        if status == 200:
            return httpx.Response(200, json={"results": []})
        return httpx.Response(status, json={"error": {"type": "x", "message": "y"}}, headers={"Retry-After": "0"})

    with ServeAppClient("http://test", transport=httpx.MockTransport(handler), retries=3, backoff_s=0.001) as c:
        assert c.search("q") == {"results": []}
    assert answers["n"] == 4

    answers["n"] = 0
    with ServeAppClient("http://test", transport=httpx.MockTransport(handler), retries=1, backoff_s=0.001) as c:
        with pytest.raises(ServeAppError) as info:
            c.search("q")
    assert info.value.status_code == 502 and answers["n"] == 2  # retries exhausted: the last answer

    for status in (400, 401, 404, 422, 500):
        answers["n"] = 0
        script[:] = [status, 200]
        with ServeAppClient("http://test", transport=httpx.MockTransport(handler), retries=3, backoff_s=0.001) as c:
            with pytest.raises(ServeAppError):
                c.search("q")
        assert answers["n"] == 1, status  # not retryable


def test_async_client_retries_connection_errors():
    attempts = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, json={"status": "ok", "stages": {}})

    async def go() -> dict:
        async with AsyncServeAppClient("http://test", transport=httpx.MockTransport(handler), retries=2, backoff_s=0.001) as c:
            return await c.health()

    assert asyncio.run(go())["status"] == "ok" and attempts["n"] == 3


def test_backoff_honours_retry_after_and_is_capped():
    r = httpx.Response(503, headers={"Retry-After": "2"})
    assert 2.0 <= _delay(0, r, 0.1) <= 2.1
    assert _delay(0, httpx.Response(503, headers={"Retry-After": "9999"}), 0.1) == 30.0
    assert 0.05 <= _delay(0, None, 0.1) <= 0.15 and 0.2 <= _delay(2, None, 0.1) <= 0.6
    assert _delay(20, None, 0.1) == 30.0


# =========================================================================== over real HTTP (Ray Serve)


@pytest.fixture(scope="module", autouse=True)
def _api_key_in_ray_environment():
    """The ``rel`` app's key, in the environment that Ray's processes inherit (set before Ray starts)."""
    saved = {k: os.environ.get(k) for k in (KEY_ENV, "SERVE_APP_API_KEY")}
    os.environ[KEY_ENV] = API_KEY
    os.environ.pop("SERVE_APP_API_KEY", None)  # the main app stays open
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


REL_TIMEOUTS = {"request_timeout_s": 6.0, "rerank_timeout_s": 30.0}
SLOW_S = 2.0


def rel_app(stack, fault: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``rel``: BM25 + 2 reranker replicas with small queues (2 running + 2 queued per replica set), key required."""
    user_config: dict[str, Any] = {"max_batch_size": 2, "batch_wait_timeout_s": 0.01}
    if fault:
        user_config["fault"] = fault
    return stack.app_config(
        "rel",
        args={"retrievers": ["bm25"], "auth": {"api_key_env": KEY_ENV}, "timeouts": REL_TIMEOUTS},
        deployments={
            "SearchIngress": {"max_ongoing_requests": 16, "max_queued_requests": 8, "backpressure_config": {"status_code": 503, "retry_after_s": 1}},
            "CrossEncoderReranker": {"num_replicas": 2, "max_ongoing_requests": 2, "max_queued_requests": 2, "backpressure_config": {"retry_after_s": 1}, "user_config": user_config},
        },
    )


def replica_actors(app: str, deployment: str) -> list[str]:
    """Names of the live Ray actors of a deployment's replicas."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def rel(serve_stack):
    serve_stack.deploy(rel_app(serve_stack), timeout_s=300)
    yield serve_stack
    serve_stack.remove("rel")


def set_reranker_fault(stack, fault: Optional[dict[str, Any]]) -> None:
    """Reconfigure the ``rel`` rerankers' fault live and wait until a call shows it."""
    stack.deploy(rel_app(stack, fault))
    delay = min((fault or {}).get("delay_s", 0.0), REL_TIMEOUTS["request_timeout_s"])  # the deadline cuts longer delays
    url = stack.url("rel") + "/rerank"

    def applied() -> bool:
        t0 = time.perf_counter()
        r = httpx.post(url, json=RERANK, headers=auth_headers(), timeout=60)
        took = time.perf_counter() - t0
        return (took >= delay * 0.9) if delay else (r.status_code == 200 and took < 1.5)

    wait_until(lambda: all(applied() for _ in range(2)), 90, f"reranker fault {fault} applied on both replicas", poll_s=0.2)


async def timed_posts(url: str, bodies: list[tuple[str, dict[str, Any]]], headers: dict[str, str]) -> list[tuple[httpx.Response, float]]:
    async def one(c: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[httpx.Response, float]:
        t0 = time.perf_counter()
        r = await c.post(url + path, json=body, headers=headers)
        return r, time.perf_counter() - t0

    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        return await asyncio.gather(*(one(c, p, b) for p, b in bodies))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


@pytest.mark.slow
@pytest.mark.serve
def test_overload_sheds_fast_with_503_and_retry_after(rel):
    set_reranker_fault(rel, {"mode": "delay", "delay_s": SLOW_S})
    try:
        burst = [("/rerank", RERANK) if i % 2 else ("/search", SEARCH) for i in range(40)]
        t0 = time.perf_counter()
        out = asyncio.run(timed_posts(rel.url("rel"), burst, auth_headers()))
        wall = time.perf_counter() - t0
    finally:
        set_reranker_fault(rel, None)
    statuses = [r.status_code for r, _ in out]
    assert set(statuses) <= {200, 429, 503}, statuses
    # The rerank routes answer a shed request with 429 (as Cohere, Jina and TEI do), /search with 503.
    assert all(r.status_code != 429 or r.request.url.path.endswith("/rerank") for r, _ in out), statuses
    ok = [t for r, t in out if r.status_code == 200]
    rejected = [(r, t) for r, t in out if r.status_code in (429, 503)]
    ours = [(r, t) for r, t in rejected if r.headers.get("content-type", "").startswith("application/json")]
    proxy = [(r, t) for r, t in rejected if (r, t) not in ours]
    assert ok and ours, statuses  # 2 replicas x (2 running + 2 queued) accepted at a time; the ingress sheds the rest
    for r, _ in ours:
        assert r.json()["error"]["type"] == "overloaded" and r.headers["retry-after"] == "1", r.text
    for r, _ in proxy:  # Serve's proxy sheds a full ingress queue itself: plain text, our envelope cannot apply
        assert "backpressure" in r.text and r.headers["retry-after"] == "1", r.text
    latencies = [t for _, t in rejected]
    print(
        f"\noverload burst of {len(burst)} (reranker {SLOW_S}s per call): {len(ok)} x 200, {len(ours)} x 503 by the ingress, "
        f"{len(proxy)} x 503 by the proxy; rejection latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
        f"p95 {pct(latencies, 0.95) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms; accepted max {max(ok):.2f} s; wall {wall:.2f} s"
    )
    assert max(latencies) < SLOW_S, latencies  # shed at once, never queued behind the slow stage
    assert max(ok) < REL_TIMEOUTS["request_timeout_s"] + 2.0  # bounded: at most two waves of the slow stage


@pytest.mark.slow
@pytest.mark.serve
def test_deadline_gives_504_and_the_same_replicas_serve_the_next_request(rel):
    before = {d: replica_actors("rel", d) for d in ("SearchIngress", "CrossEncoderReranker")}
    deadline = REL_TIMEOUTS["request_timeout_s"]
    set_reranker_fault(rel, {"mode": "delay", "delay_s": deadline + 4})
    try:
        for path, body in (("/rerank", RERANK), ("/search", SEARCH)):
            t0 = time.perf_counter()
            r = httpx.post(rel.url("rel") + path, json=body, headers=auth_headers(), timeout=60)
            elapsed = time.perf_counter() - t0
            assert r.status_code == 504, r.text
            assert r.json()["error"]["type"] == "deadline_exceeded"
            assert deadline - 0.5 < elapsed < deadline + 3.0, elapsed
    finally:
        set_reranker_fault(rel, None)
    r = httpx.post(rel.url("rel") + "/search", json=SEARCH, headers=auth_headers(), timeout=60)
    assert r.status_code == 200 and r.json()["degraded"] is False and r.json()["stages"]["rerank"]["status"] == "ok"
    assert {d: replica_actors("rel", d) for d in before} == before  # no replica was restarted


@pytest.mark.slow
@pytest.mark.serve
def test_killing_a_reranker_replica_under_load_fails_no_request(rel):
    import ray

    deployment = "CrossEncoderReranker"
    before = replica_actors("rel", deployment)
    assert len(before) == 2 and rel.replicas("rel", deployment) == 2
    stop = threading.Event()
    lock = threading.Lock()
    tally = {"sent": 0, "failed": 0, "degraded": 0, "attempts_5xx": 0}
    failures: list[str] = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = super().handle_request(request)
            if response.status_code >= 500:
                with lock:
                    tally["attempts_5xx"] += 1
            return response

    def worker(i: int) -> None:
        with ServeAppClient(rel.url("rel"), api_key=API_KEY, timeout=30, retries=5, backoff_s=0.2, transport=Counting()) as c:
            n = 0
            while not stop.is_set() and n < 2000:
                n += 1
                try:
                    if n % 2:
                        degraded = c.search(SEARCH["query"], top_k=10, rerank_top_m=4, top_n=4)["degraded"]
                    else:
                        degraded = False
                        c.rerank(RERANK["query"], DOCS)
                    with lock:
                        tally["sent"] += 1
                        tally["degraded"] += int(degraded)
                except ServeAppError as exc:
                    with lock:
                        tally["sent"] += 1
                        tally["failed"] += 1
                        failures.append(str(exc)[:200])

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(3.0)
        victim = before[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.perf_counter()
        at_kill = tally["sent"]
        wait_until(lambda: victim not in replica_actors("rel", deployment), 30, "the killed replica to disappear")
        wait_until(lambda: len(replica_actors("rel", deployment)) == 2 and rel.replicas("rel", deployment) == 2, 120, "the reranker to be back at 2 replicas", poll_s=0.5)
        recovered_s = time.perf_counter() - killed_at
        time.sleep(3.0)  # keep the load on the recovered set for a moment
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    after = replica_actors("rel", deployment)
    print(
        f"\nkill test: {tally['sent']} requests sent ({at_kill} before the kill), {tally['failed']} failed, "
        f"{tally['degraded']} degraded, {tally['attempts_5xx']} 5xx attempts retried; replicas back to 2 after {recovered_s:.1f} s"
    )
    assert not any(t.is_alive() for t in threads)
    assert tally["failed"] == 0, failures[:3]
    assert tally["sent"] > at_kill + 10  # requests did go through during and after the recovery
    assert victim not in after and len(set(after) - set(before)) == 1


@pytest.mark.slow
@pytest.mark.serve
def test_dense_replica_down_degrades_flagged_then_recovers(serve_stack):
    import ray

    url = serve_stack.url() + "/search"
    body = {"query": "space star planet", "top_k": 10, "rerank_top_m": 3, "top_n": 5}
    assert httpx.post(url, json=body, timeout=60).json()["degraded"] is False
    (victim,) = replica_actors("main", "DenseRetriever")
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    degraded = []

    def is_degraded() -> bool:
        out = httpx.post(url, json=body, timeout=60).json()
        if out["degraded"]:
            degraded.append(out)
        return out["degraded"]

    wait_until(is_degraded, 30, "a degraded answer while the dense replica is down", poll_s=0.1)
    out = degraded[0]
    assert out["stages"]["dense"]["status"] in ("error", "timeout") and out["stages"]["bm25"]["status"] == "ok"
    assert out["results"] and all(set(x["retrievers"]) == {"bm25"} for x in out["results"])
    def healthy() -> Optional[dict[str, Any]]:
        out = httpx.post(url, json=body, timeout=60).json()
        return None if out["degraded"] else out

    recovered = wait_until(healthy, 120, "recovery of the dense retriever", poll_s=0.5)
    assert {recovered["stages"][s]["status"] for s in ("bm25", "dense", "rerank")} == {"ok"}
    assert any("dense" in x["retrievers"] for x in recovered["results"])
    (replacement,) = replica_actors("main", "DenseRetriever")
    assert replacement != victim
    print(f"\ndense replica killed: {len(degraded)} degraded answer(s) seen (dense {out['stages']['dense']['status']}), then recovered")


@pytest.mark.slow
@pytest.mark.serve
def test_api_key_over_http_and_never_in_ray_logs(rel):
    import ray

    base = rel.url("rel")
    wrong = secrets.token_urlsafe(32)
    assert httpx.get(base + "/healthz", timeout=60).status_code == 200  # probes need no key
    for headers, invalid in (({}, False), ({"Authorization": f"Bearer {wrong}"}, True)):
        r = httpx.post(base + "/search", json=SEARCH, headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", r.text
        assert r.headers["www-authenticate"].startswith("Bearer") and ('invalid_token' in r.headers["www-authenticate"]) is invalid
    assert httpx.post(base + "/search", json=SEARCH, headers=auth_headers(), timeout=60).status_code == 200
    with ServeAppClient(base, api_key=API_KEY) as c:
        info = c.info()
    assert info["auth"] == {"api_key_required": True, "api_key_env": KEY_ENV, "key": "api_key"} and API_KEY not in str(info)  # the name of the key that asked
    assert httpx.post(rel.url() + "/search", json=SEARCH, timeout=60).status_code == 200  # the main app has no key
    time.sleep(2.0)  # let the replicas flush their logs
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    hits = []
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_size < 200 * 1024 * 1024:
            data = path.read_bytes()
            if API_KEY.encode() in data or wrong.encode() in data:
                hits.append(str(path))
    assert list(logs.rglob("*.log")), logs
    assert hits == [], hits
