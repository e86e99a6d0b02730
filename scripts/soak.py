"""Soak test: minutes of bounded loopback load against a Serve app, with per-replica memory.

Sends a steady mix of ``POST /search`` and ``POST /v1/rerank`` (demo queries and documents)
from ``--concurrency`` clients, each paced so that the total stays at or under ``--rate``
requests per second, for ``--duration-s`` seconds (and at most ``--max-requests``; every request
has a timeout). Every ``--sample-s`` seconds it records the resident memory (RSS) of each Serve
replica process of the application, found on this machine by its process title
(``ray::ServeReplica:<app>:<deployment>``), and the load average. At the end it writes
``soak.json`` and ``soak.md`` to ``--out``: requests, errors (any non-200 answer or transport
failure; the target is zero), degraded answers, latency percentiles, and per replica the RSS at
the first sample after the warm-up, at the end, the growth and its linear trend (MiB/min).

Targets must be on the loopback interface. Three ways to run it::

    # against a running app (e.g. `serve-app demo` on port 8000, application "serve_app")
    python scripts/soak.py --url http://127.0.0.1:8000 --app serve_app --duration-s 300

    # start a local Ray + the demo app (demo reranker, MiniLM dense), soak it, shut it down
    python scripts/soak.py --start demo --duration-s 300

    # same with tiny random models (cheap; for CI-sized runs)
    python scripts/soak.py --start tiny --duration-s 60

The API key, when the app requires one, is read from ``$SERVE_APP_API_KEY`` (``--api-key-env``).
Exit status: 0 when errors <= ``--max-errors`` (default 0), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MIB = 1024 * 1024


# --------------------------------------------------------------------------- replicas and memory


@dataclass
class ReplicaTrace:
    """RSS samples of one replica process (a restarted replica is a new trace)."""

    deployment: str
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, RSS bytes)


def replica_processes(app: str) -> dict[int, str]:
    """pid -> deployment name of this machine's Serve replica processes of ``app``."""
    import psutil

    pattern = re.compile(rf"^ray::ServeReplica:{re.escape(app)}:([A-Za-z0-9_\-]+)")
    found: dict[int, str] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        m = pattern.match(cmdline[0]) if cmdline else None
        if m:
            found[proc.info["pid"]] = m.group(1).split(".")[0]  # the title may end with .method
    return found


def sample_memory(app: str, t: float, traces: dict[int, ReplicaTrace]) -> int:
    """Append one RSS sample per live replica of ``app``; returns how many were sampled."""
    import psutil

    n = 0
    for pid, deployment in replica_processes(app).items():
        try:
            rss = psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        traces.setdefault(pid, ReplicaTrace(deployment, pid)).samples.append((t, rss))
        n += 1
    return n


def memory_report(traces: dict[int, ReplicaTrace], warmup_s: float) -> list[dict[str, Any]]:
    """Per replica: RSS after warm-up, at the end, growth and trend."""
    rows = []
    for tr in sorted(traces.values(), key=lambda r: (r.deployment, r.pid)):
        after = [(t, rss) for t, rss in tr.samples if t >= warmup_s] or tr.samples
        first_t, first = after[0]
        last_t, last = after[-1]
        slope = 0.0
        if len(after) >= 3 and last_t > first_t:
            ts = np.array([t for t, _ in after]) / 60.0
            ys = np.array([rss for _, rss in after], dtype=float) / MIB
            slope = float(np.polyfit(ts, ys, 1)[0])
        rows.append({
            "deployment": tr.deployment,
            "pid": tr.pid,
            "samples": len(tr.samples),
            "first_s": round(first_t, 1),
            "last_s": round(last_t, 1),
            "rss_start_mib": round(first / MIB, 1),
            "rss_end_mib": round(last / MIB, 1),
            "rss_max_mib": round(max(r for _, r in tr.samples) / MIB, 1),
            "growth_mib": round((last - first) / MIB, 1),
            "growth_pct": round(100.0 * (last - first) / first, 2) if first else 0.0,
            "trend_mib_per_min": round(slope, 3),
        })
    return rows


# --------------------------------------------------------------------------- load


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    degraded: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"search": [], "rerank": []})

    def error(self, key: str, example: str) -> None:
        self.errors += 1
        self.by_status[key] = self.by_status.get(key, 0) + 1
        if len(self.error_examples) < 10:
            self.error_examples.append(example[:300])


def workload(seed: int = 0) -> tuple[list[str], list[str]]:
    """Demo queries and document texts (the mix's material)."""
    from serve_app.corpus import load_corpus
    from serve_app.demo import demo_corpus_path, demo_queries_path

    queries = [json.loads(line)["text"] for line in demo_queries_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = [d.content[:1500] for d in load_corpus(demo_corpus_path())]
    random.Random(seed).shuffle(queries)
    return queries, docs


async def run_load(base_url: str, *, duration_s: float, rate: float, concurrency: int, max_requests: int, timeout_s: float, api_key: Optional[str], seed: int = 0, transport: Optional[httpx.AsyncBaseTransport] = None) -> Tally:
    """``concurrency`` clients, each paced to ``rate / concurrency`` requests per second; bounded in time and count."""
    queries, docs = workload(seed)
    tally = Tally()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    period = concurrency / rate if rate > 0 else 0.0
    deadline = time.perf_counter() + duration_s
    rng = random.Random(seed)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        k = i
        next_at = time.perf_counter() + (period * i / concurrency)
        while time.perf_counter() < deadline and tally.sent < max_requests:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            next_at += period
            if time.perf_counter() >= deadline:
                break
            q = queries[k % len(queries)]
            k += concurrency
            if k % 2 == 0:
                endpoint, path, body = "search", "/search", {"query": q}
            else:
                endpoint, path = "rerank", "/v1/rerank"
                body = {"query": q, "documents": rng.sample(docs, 10), "top_n": 3}
            tally.sent += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(base_url + path, json=body, headers=headers)
            except httpx.HTTPError as exc:
                tally.error(type(exc).__name__, f"{endpoint}: {type(exc).__name__}: {exc}")
                continue
            took = time.perf_counter() - t0
            if r.status_code != 200:
                tally.error(str(r.status_code), f"{endpoint}: {r.status_code} {r.text}")
                continue
            tally.ok += 1
            tally.latencies[endpoint].append(took)
            if endpoint == "search" and r.json().get("degraded"):
                tally.degraded += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, transport=transport) as http:
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
    return tally


async def soak(base_url: str, app: str, args: argparse.Namespace, api_key: Optional[str]) -> dict[str, Any]:
    traces: dict[int, ReplicaTrace] = {}
    loads: list[tuple[float, float, float, float]] = []
    t_start = time.perf_counter()
    stop = asyncio.Event()

    async def sampler() -> None:
        while True:
            t = time.perf_counter() - t_start
            sample_memory(app, t, traces)
            loads.append((round(t, 1), *os.getloadavg()))
            try:
                await asyncio.wait_for(stop.wait(), args.sample_s)
                break
            except asyncio.TimeoutError:
                pass

    task = asyncio.create_task(sampler())
    try:
        tally = await run_load(base_url, duration_s=args.duration_s, rate=args.rate, concurrency=args.concurrency, max_requests=args.max_requests, timeout_s=args.timeout_s, api_key=api_key, seed=args.seed)
    finally:
        stop.set()
        await task
    wall = time.perf_counter() - t_start
    sample_memory(app, wall, traces)
    if not traces:
        raise SystemExit(f"no Serve replica process of application {app!r} found on this machine (titles ray::ServeReplica:{app}:...)")

    def lat(xs: list[float]) -> dict[str, Any]:
        if not xs:
            return {"n": 0}
        a = np.array(xs) * 1000
        return {"n": len(xs), "p50_ms": round(float(np.percentile(a, 50)), 1), "p95_ms": round(float(np.percentile(a, 95)), 1), "p99_ms": round(float(np.percentile(a, 99)), 1), "max_ms": round(float(a.max()), 1)}

    by_dep: dict[str, list[int]] = {}
    for tr in traces.values():
        by_dep.setdefault(tr.deployment, []).append(tr.pid)
    return {
        "target": base_url,
        "app": app,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - wall)),
        "config": {k: getattr(args, k) for k in ("duration_s", "rate", "concurrency", "max_requests", "timeout_s", "sample_s", "warmup_s", "start")},
        "wall_s": round(wall, 1),
        "requests": {"sent": tally.sent, "ok": tally.ok, "errors": tally.errors, "degraded_search": tally.degraded, "errors_by_status": tally.by_status, "error_examples": tally.error_examples, "throughput_rps": round(tally.ok / wall, 2)},
        "latency": {k: lat(v) for k, v in tally.latencies.items()},
        "replicas": memory_report(traces, args.warmup_s),
        "replica_pids_by_deployment": by_dep,
        "load_average": {"samples": loads, "mean_1min": round(float(np.mean([x[1] for x in loads])), 2), "max_1min": round(max(x[1] for x in loads), 2), "cpus": os.cpu_count()},
        "host": {"python": platform.python_version(), "platform": platform.platform()},
    }


# --------------------------------------------------------------------------- report


def markdown(report: dict[str, Any], command: str) -> str:
    req, la = report["requests"], report["load_average"]
    lines = [
        f"# Soak run: {report['config']['duration_s']:.0f} s against `{report['target']}` (app `{report['app']}`)",
        "",
        f"Command: `{command}`",
        "",
        f"Started {report['started']}, wall {report['wall_s']} s; load: {report['config']['concurrency']} clients, at most {report['config']['rate']} req/s in total (half /search, half /v1/rerank with 10 documents).",
        f"Machine: {la['cpus']} CPUs shared with other work; load average (1 min) mean {la['mean_1min']}, max {la['max_1min']}.",
        "",
        "## Requests",
        "",
        "| sent | ok | errors | degraded /search | throughput (req/s) |",
        "|---|---|---|---|---|",
        f"| {req['sent']} | {req['ok']} | **{req['errors']}** | {req['degraded_search']} | {req['throughput_rps']} |",
        "",
    ]
    if req["errors_by_status"]:
        lines += [f"Errors by status: {req['errors_by_status']}; examples: {req['error_examples'][:3]}", ""]
    lines += ["| endpoint | n | p50 ms | p95 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    for ep, s in report["latency"].items():
        if s.get("n"):
            lines.append(f"| {ep} | {s['n']} | {s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | {s['max_ms']} |")
    lines += [
        "",
        f"## Memory per replica (RSS; growth from the first sample after {report['config']['warmup_s']:.0f} s of warm-up to the end)",
        "",
        "| deployment | pid | samples | RSS start MiB | RSS end MiB | max MiB | growth MiB | growth % | trend MiB/min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["replicas"]:
        lines.append(f"| {r['deployment']} | {r['pid']} | {r['samples']} | {r['rss_start_mib']} | {r['rss_end_mib']} | {r['rss_max_mib']} | {r['growth_mib']} | {r['growth_pct']} | {r['trend_mib_per_min']} |")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- starting an app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started_app(kind: str, workdir: Path) -> Iterator[tuple[str, str]]:
    """Start a local Ray + Serve with the demo (or a tiny-model) app on a free port; yields (url, app)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    from serve_app.serve.commands import cache_dir, demo_config, demo_reranker_model
    from serve_app.serve.config import parse_app_config
    from serve_app.serve.runner import (
        deploy_config,
        load_serve_config,
        start_ray,
        wait_for_apps,
    )
    from serve_app.index import ensure_index

    port = free_port()
    if kind == "demo":
        raw = demo_config(host="127.0.0.1", port=port, index_dir=str(cache_dir() / "demo-index"), reranker_model=demo_reranker_model(cache_dir()), num_cpus_per_replica=0.25)
    else:
        from serve_app.testing import build_tiny_bi_encoder, build_tiny_cross_encoder

        ce = build_tiny_cross_encoder(workdir / "tiny-ce", num_labels=1, seed=0)
        bi = build_tiny_bi_encoder(workdir / "tiny-bi", seed=0)
        raw = demo_config(host="127.0.0.1", port=port, index_dir=str(workdir / "index"), reranker_model=str(ce), num_cpus_per_replica=0.25)
        raw["applications"][0]["args"]["dense"] = {"model": str(bi)}
    app = raw["applications"][0]["name"] = "soak"  # its own name: replicas of other apps on this machine are not sampled
    app_cfg = parse_app_config(raw["applications"][0]["args"])
    ensure_index(app_cfg.index_dir, **app_cfg.index_build_args())
    start_ray(num_cpus=2, log_to_driver=False)
    try:
        deploy_config(load_serve_config(raw))
        wait_for_apps([app], timeout_s=900)
        yield f"http://127.0.0.1:{port}", app
    finally:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running app on this machine (loopback only)")
    where.add_argument("--start", choices=("demo", "tiny"), help="start a local Ray + app for the run, stop it after")
    p.add_argument("--app", default="serve_app", help="Serve application name, to find its replica processes (default serve_app)")
    p.add_argument("--duration-s", type=float, default=300.0, help="load duration in seconds (default 300)")
    p.add_argument("--rate", type=float, default=4.0, help="at most this many requests per second in total (default 4)")
    p.add_argument("--concurrency", type=int, default=2, help="concurrent clients (default 2)")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests (default 100000)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per-request timeout (default 60)")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples (default 10)")
    p.add_argument("--warmup-s", type=float, default=30.0, help="growth is measured from the first sample after this (default 30)")
    p.add_argument("--api-key-env", default="SERVE_APP_API_KEY", help="environment variable holding the API key, if the app needs one")
    p.add_argument("--max-errors", type=int, default=0, help="exit 1 when more errors than this (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO_ROOT / "results" / "soak"), help="directory for soak.json and soak.md (default results/soak)")
    args = p.parse_args(argv)
    if args.duration_s <= 0 or args.rate <= 0 or args.concurrency < 1 or args.sample_s <= 0:
        p.error("--duration-s, --rate and --sample-s must be positive and --concurrency at least 1")
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"the soak only sends to the loopback interface, not {urlparse(args.url).hostname!r}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    command = "python scripts/soak.py " + " ".join(sys.argv[1:] if argv is None else argv)
    api_key = os.environ.get(args.api_key_env, "").split(",")[0].strip() or None
    with contextlib.ExitStack() as stack:
        if args.start:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
            url, app = stack.enter_context(started_app(args.start, workdir))
        else:
            url, app = args.url.rstrip("/"), args.app
        report = asyncio.run(soak(url, app, args, api_key))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps({"command": command, **report}, indent=2) + "\n", encoding="utf-8")
    (out / "soak.md").write_text(markdown(report, command), encoding="utf-8")
    req = report["requests"]
    print(markdown(report, command))
    print(f"wrote {out / 'soak.json'} and {out / 'soak.md'}", file=sys.stderr)
    return 0 if req["errors"] <= args.max_errors else 1


if __name__ == "__main__":
    sys.exit(main())
