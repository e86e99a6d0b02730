"""scripts/soak.py without Ray: paced, bounded load against the in-process app; memory report; report files."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serve_fakes import FakeBackends, small_corpus

from serve_app.serve.config import parse_app_config
from serve_app.serve.http import create_app
from serve_app.serve.service import SearchService

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"
spec = importlib.util.spec_from_file_location("soak_script", SCRIPT)
soak = importlib.util.module_from_spec(spec)
sys.modules["soak_script"] = soak
spec.loader.exec_module(soak)


def asgi(faults=None, keys=()):
    corpus = small_corpus(40)
    cfg = parse_app_config({"index_dir": "/nonexistent"}, use_env=False)
    app = create_app(SearchService(cfg, FakeBackends(corpus, dict(faults or {})), corpus, {}), api_keys=keys)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    async def warm_up() -> None:  # the first request imports Ray's metrics (seconds on a busy machine)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            await c.get("/healthz")

    asyncio.run(warm_up())
    return transport


def test_load_is_paced_bounded_and_counts_errors():
    tally = asyncio.run(soak.run_load("http://test", duration_s=1.0, rate=20, concurrency=2, max_requests=1000, timeout_s=5, api_key=None, transport=asgi()))
    assert 12 <= tally.sent <= 21, tally.sent  # at most rate x duration (+1 for the first of each client)
    assert tally.errors == 0 and tally.ok == tally.sent
    assert tally.latencies["search"] and tally.latencies["rerank"]

    capped = asyncio.run(soak.run_load("http://test", duration_s=5.0, rate=100, concurrency=2, max_requests=7, timeout_s=5, api_key=None, transport=asgi()))
    assert capped.sent <= 8  # bounded in count too

    failing = asyncio.run(soak.run_load("http://test", duration_s=0.5, rate=20, concurrency=2, max_requests=100, timeout_s=5, api_key=None, transport=asgi({"reranker": "error"})))
    assert failing.errors > 0 and set(failing.by_status) == {"503"} and failing.error_examples  # /rerank fails, /search degrades
    assert failing.degraded > 0


def test_api_key_is_sent():
    key = "k" * 32
    denied = asyncio.run(soak.run_load("http://test", duration_s=0.3, rate=20, concurrency=1, max_requests=3, timeout_s=5, api_key=None, transport=asgi(keys=(key,))))
    assert denied.errors == denied.sent and set(denied.by_status) == {"401"}
    allowed = asyncio.run(soak.run_load("http://test", duration_s=0.3, rate=20, concurrency=1, max_requests=3, timeout_s=5, api_key=key, transport=asgi(keys=(key,))))
    assert allowed.errors == 0 and allowed.ok == allowed.sent > 0


def test_memory_report_growth_and_trend():
    mib = soak.MIB
    grow = soak.ReplicaTrace("CrossEncoderReranker", 11, [(t, int((500 + t / 60 * 2) * mib)) for t in range(0, 301, 10)])
    flat = soak.ReplicaTrace("SearchIngress", 12, [(t, 250 * mib) for t in range(0, 301, 10)])
    rows = {r["deployment"]: r for r in soak.memory_report({11: grow, 12: flat}, warmup_s=30)}
    g = rows["CrossEncoderReranker"]
    assert g["first_s"] == 30 and g["last_s"] == 300 and g["samples"] == 31
    assert g["rss_start_mib"] == pytest.approx(501.0) and g["growth_mib"] == pytest.approx(9.0, abs=0.1)
    assert g["trend_mib_per_min"] == pytest.approx(2.0, abs=0.01)
    assert rows["SearchIngress"]["growth_mib"] == 0 and rows["SearchIngress"]["trend_mib_per_min"] == pytest.approx(0, abs=1e-6)


def test_replica_processes_are_found_by_title(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import time\ntime.sleep(30)\n")
    # A process whose argv[0] is a Ray replica title (what setproctitle gives real replicas).
    proc = subprocess.Popen(["ray::ServeReplica:soaktest:CrossEncoderReranker", str(probe)], executable=sys.executable)
    try:
        deadline = time.monotonic() + 10
        found = {}
        while time.monotonic() < deadline and not found:
            found = soak.replica_processes("soaktest")
            time.sleep(0.1)
        assert found == {proc.pid: "CrossEncoderReranker"}
        assert soak.replica_processes("soaktes") == {}  # the app name must match exactly
        traces: dict = {}
        assert soak.sample_memory("soaktest", 1.0, traces) == 1 and traces[proc.pid].samples[0][1] > 0
    finally:
        proc.kill()
        proc.wait()


def test_markdown_and_cli_guard(tmp_path):
    with pytest.raises(SystemExit):
        soak.parse_args(["--url", "http://10.0.0.5:8000"])  # loopback only
    with pytest.raises(SystemExit):
        soak.parse_args(["--url", "http://127.0.0.1:8000", "--rate", "0"])
    args = soak.parse_args(["--url", "http://127.0.0.1:8000/", "--duration-s", "5"])
    assert args.url == "http://127.0.0.1:8000/" and args.duration_s == 5
    report = {
        "target": "http://127.0.0.1:8000", "app": "serve_app", "started": "t", "wall_s": 5.0,
        "config": {"duration_s": 5.0, "rate": 4.0, "concurrency": 2, "warmup_s": 1.0},
        "requests": {"sent": 10, "ok": 9, "errors": 1, "degraded_search": 0, "errors_by_status": {"503": 1}, "error_examples": ["rerank: 503"], "throughput_rps": 1.8},
        "latency": {"search": {"n": 5, "p50_ms": 1, "p95_ms": 2, "p99_ms": 3, "max_ms": 4}, "rerank": {"n": 0}},
        "replicas": [{"deployment": "SearchIngress", "pid": 1, "samples": 2, "rss_start_mib": 1, "rss_end_mib": 2, "rss_max_mib": 2, "growth_mib": 1, "growth_pct": 100, "trend_mib_per_min": 0.5}],
        "load_average": {"cpus": os.cpu_count(), "mean_1min": 1.0, "max_1min": 2.0},
    }
    md = soak.markdown(report, "python scripts/soak.py ...")
    assert "| 10 | 9 | **1** | 0 | 1.8 |" in md and "| SearchIngress | 1 | 2 |" in md and "Errors by status" in md
