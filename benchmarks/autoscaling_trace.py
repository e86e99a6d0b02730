"""Autoscaling trace: a step load (low -> high -> low) on /search; replicas per deployment and latency over time.

Command::

    python -m benchmarks.autoscaling_trace                       # 1 -> 12 -> 1 clients, 40/90/80 s
    python -m benchmarks.autoscaling_trace --steps 1:60,32:180,1:240 --max-replicas 8

The application: the demo corpus index (BM25 + dense, small, so start-up is quick) and the
MiniLM-L6 speed cross-encoder reranking the top-``--rerank-top-m`` fused documents, so the
reranker is the expensive stage. Every deployment autoscales (Serve's
``autoscaling_config``): the reranker on few ongoing requests per replica, the retrievers on
many (they answer in milliseconds). Each replica is given 1 torch thread, so extra reranker
replicas add compute on a multi-core machine.

A closed-loop load generator (loopback only, bounded by the step durations and
``--max-requests``) runs ``clients`` concurrent clients per step; a sampler records the RUNNING
replicas of each deployment (``serve.status()``) every ``--sample-s`` seconds. One PNG shows
replicas per deployment, client count and request latency (each request and a rolling p50)
over time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Sequence

import numpy as np

from benchmarks.common import DEFAULT_CACHE, BenchRun, base_parser, md_table, speed_model_dir
from benchmarks.loadgen import check_loopback
from benchmarks.serving import replica_counts, serve_stack

DEPLOYMENTS = ("SearchIngress", "BM25Retriever", "DenseRetriever", "CrossEncoderReranker")


def parse_steps(text: str) -> list[tuple[int, float]]:
    """``"1:40,12:90,1:80"`` -> [(clients, seconds), ...]."""
    out = []
    for part in text.split(","):
        c, _, s = part.partition(":")
        out.append((int(c), float(s)))
    if not out or any(c < 1 or s <= 0 for c, s in out):
        raise ValueError(f"--steps must look like 1:40,12:90,1:80 (clients:seconds), got {text!r}")
    return out


async def step_load(url: str, bodies: list[dict[str, Any]], steps: list[tuple[int, float]], max_requests: int, t0: float) -> list[dict[str, Any]]:
    """Closed-loop clients whose number follows ``steps``; returns one record per request."""
    import httpx

    check_loopback(url)
    records: list[dict[str, Any]] = []
    counter = 0
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=max(c for c, _ in steps))) as client:

        async def worker(end: float) -> None:
            nonlocal counter
            while time.perf_counter() < end and counter < max_requests:
                body = bodies[counter % len(bodies)]
                counter += 1
                s = time.perf_counter()
                try:
                    r = await client.post(url, json=body)
                    status = r.status_code
                except Exception:  # noqa: BLE001 - a failed request is a data point too
                    status = 0
                records.append({"t": s - t0, "latency_ms": (time.perf_counter() - s) * 1000, "status": status})

        for clients, seconds in steps:
            end = time.perf_counter() + seconds
            await asyncio.gather(*(worker(end) for _ in range(clients)))
    return records


def main(argv: Sequence[str] | None = None) -> int:
    from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
    from serve_app.corpus import load_queries
    from serve_app.demo import demo_queries_path
    from serve_app.corpus import read_corpus_source
    from serve_app.index import build_index, index_is_current

    p = base_parser(__doc__.split("\n")[0], repeats=False)
    p.add_argument("--steps", default="1:40,12:90,1:80", help="clients:seconds of each step")
    p.add_argument("--rerank-top-m", type=int, default=10, help="documents reranked per request")
    p.add_argument("--max-length", type=int, default=256, help="cross-encoder tokens per pair")
    p.add_argument("--max-replicas", type=int, default=4, help="reranker max_replicas")
    p.add_argument("--target-ongoing", type=float, default=2, help="reranker target_ongoing_requests per replica")
    p.add_argument("--sample-s", type=float, default=1.0, help="replica sampling period")
    p.add_argument("--tail-s", type=float, default=30, help="sampling continues this long after the load ends (downscaling)")
    p.add_argument("--max-requests", type=int, default=5000, help="requests sent at most")
    p.add_argument("--model", default=None, help="cross-encoder directory (default: the MiniLM-L6 speed model)")
    args = p.parse_args(argv)
    steps = parse_steps(args.steps)
    run = BenchRun("autoscaling_trace", args, args.out)

    index = DEFAULT_CACHE / "bench" / "demo-index"
    if not index_is_current(index):
        build_index(read_corpus_source("builtin:demo").corpus, index, bm25=BM25Config(), dense=DenseConfig(), chunking=ChunkingConfig(), show_progress=False)
    model_dir = speed_model_dir(args.model)
    queries = list(load_queries(demo_queries_path()).values())
    bodies = [{"query": q, "top_k": 50, "rerank_top_m": args.rerank_top_m, "top_n": 10} for q in queries]

    one_thread = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}}
    fast = {"upscale_delay_s": 3, "downscale_delay_s": 15, "metrics_interval_s": 1, "look_back_period_s": 5}
    deployments = {
        "SearchIngress": {"max_ongoing_requests": 256, "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64, **fast}, "ray_actor_options": {"num_cpus": 0.25}},
        "BM25Retriever": {"max_ongoing_requests": 64, "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 16, **fast}, "ray_actor_options": {"num_cpus": 0.25, **one_thread}},
        "DenseRetriever": {"max_ongoing_requests": 64, "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 16, **fast}, "ray_actor_options": {"num_cpus": 0.25, **one_thread}},
        "CrossEncoderReranker": {
            "max_ongoing_requests": 16,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": args.max_replicas, "target_ongoing_requests": args.target_ongoing, **fast},
            "ray_actor_options": {"num_cpus": 0.25, **one_thread},
            "user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01},
        },
    }
    app_args = {
        "index_dir": str(index),
        "build_index_if_missing": False,
        "retrievers": ["bm25", "dense"],
        "reranker": {"model": str(model_dir), "max_length": args.max_length, "device": "cpu"},
        "timeouts": {"retriever_timeout_s": 60, "rerank_timeout_s": 300, "request_timeout_s": 600},
    }

    samples: list[dict[str, Any]] = []
    with serve_stack(app_args, deployments, num_cpus=8, timeout_s=900, fast_autoscaling_metrics=True) as base:
        stop = threading.Event()
        t0 = time.perf_counter()

        def sampler() -> None:
            while not stop.is_set():
                try:
                    starting = replica_counts(states=("STARTING", "UPDATING", "RECOVERING"))
                    samples.append({"t": time.perf_counter() - t0, **replica_counts(), **{f"{d}:starting": n for d, n in starting.items()}})
                except Exception as exc:  # noqa: BLE001 - keep sampling through transient status errors
                    samples.append({"t": time.perf_counter() - t0, "error": str(exc)[:200]})
                stop.wait(args.sample_s)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        time.sleep(5)
        t_load = time.perf_counter() - t0
        records = asyncio.run(step_load(base + "/search", bodies, steps, args.max_requests, t0))
        t_end = time.perf_counter() - t0
        time.sleep(args.tail_s)
        stop.set()
        th.join(10)

    # ---------------------------------------------------------------- summary
    bounds = []
    t = t_load
    for clients, seconds in steps:
        bounds.append((t, t + seconds, clients))
        t += seconds
    phases = []
    for i, (a, b, clients) in enumerate(bounds):
        rs = [r for r in records if a <= r["t"] < b and r["status"] == 200]
        ss = [s for s in samples if a <= s["t"] < b and "error" not in s]
        lat = np.array([r["latency_ms"] for r in rs])
        phases.append({
            "step": i + 1, "clients": clients, "start_s": a, "end_s": b, "requests_ok": len(rs),
            "errors": sum(1 for r in records if a <= r["t"] < b and r["status"] != 200),
            "requests_per_s": len(rs) / (b - a),
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p95_ms": float(np.percentile(lat, 95)) if lat.size else None,
            "max_replicas": {d: max((s.get(d, 0) for s in ss), default=None) for d in DEPLOYMENTS},
            "replicas_at_end": {d: ss[-1].get(d) for d in DEPLOYMENTS} if ss else {},
        })
    tail = [s for s in samples if s["t"] >= t_end and "error" not in s]
    # Reaction times of the reranker to the high step: first STARTING replica, first extra RUNNING replica.
    reaction: dict[str, float | None] = {}
    if len(bounds) >= 2:
        hi_start = bounds[1][0]
        after = [s for s in samples if s["t"] >= hi_start and "error" not in s]
        first_start = next((s["t"] for s in after if s.get("CrossEncoderReranker:starting", 0) > 0 or s.get("CrossEncoderReranker", 0) > 1), None)
        first_run = next((s["t"] for s in after if s.get("CrossEncoderReranker", 0) > 1), None)
        reaction = {"decision_s": None if first_start is None else first_start - hi_start, "extra_replica_running_s": None if first_run is None else first_run - hi_start}
    results = {"steps": steps, "load_start_s": t_load, "load_end_s": t_end, "phases": phases, "reranker_reaction": reaction, "replicas_after_tail": tail[-1] if tail else None, "samples": samples, "requests": len(records)}
    (run.raw / "requests.json").write_text(__import__("json").dumps(records))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    ts = [s["t"] for s in samples if "error" not in s]
    colors = dict(zip(DEPLOYMENTS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for d in DEPLOYMENTS:
        ax1.step(ts, [s.get(d, 0) for s in samples if "error" not in s], where="post", label=f"{d} RUNNING", lw=2 if d == "CrossEncoderReranker" else 1.2, color=colors[d])
        ax1.step(ts, [s.get(d, 0) + s.get(f"{d}:starting", 0) for s in samples if "error" not in s], where="post", ls="--", lw=1, color=colors[d], label=f"{d} RUNNING + STARTING" if d == "CrossEncoderReranker" else None)
    ax1.set_ylabel("replicas")
    ax1b = ax1.twinx()
    ax1b.step([a for a, _, _ in bounds] + [bounds[-1][1]], [c for _, _, c in bounds] + [bounds[-1][2]], where="post", color="grey", ls=":", label="clients")
    ax1b.set_ylabel("clients (dotted)")
    ax1.legend(loc="upper left", fontsize=8)
    ok = [r for r in records if r["status"] == 200]
    ax2.scatter([r["t"] for r in ok], [r["latency_ms"] for r in ok], s=4, alpha=0.4, label="request latency")
    if ok:
        order = np.argsort([r["t"] for r in ok])
        tt = np.array([ok[i]["t"] for i in order])
        ll = np.array([ok[i]["latency_ms"] for i in order])
        win = 5.0
        centres = np.arange(tt.min(), tt.max(), 1.0)
        med = [np.median(ll[(tt >= c - win) & (tt < c + win)]) if np.any((tt >= c - win) & (tt < c + win)) else np.nan for c in centres]
        ax2.plot(centres, med, color="black", lw=1.5, label="rolling p50 (10 s window)")
    bad = [r for r in records if r["status"] != 200]
    if bad:
        ax2.scatter([r["t"] for r in bad], [r["latency_ms"] for r in bad], s=10, color="red", marker="x", label="errors")
    for a, b, c in bounds:
        ax2.axvspan(a, b, alpha=0.06 if c == bounds[0][2] else 0.15, color="tab:orange")
    ax2.set_yscale("log")
    ax2.set_ylabel("latency (ms)")
    ax2.set_xlabel("time (s)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"Step load {args.steps} on /search (rerank top-{args.rerank_top_m}): replicas per deployment and latency")
    run.save_figure(fig, "autoscaling_trace.png")

    rows = [(ph["step"], ph["clients"], f"{ph['start_s']:.0f}-{ph['end_s']:.0f}", ph["requests_ok"], ph["errors"], f"{ph['requests_per_s']:.2f}",
             f"{ph['p50_ms']:.0f}" if ph["p50_ms"] else "-", f"{ph['p95_ms']:.0f}" if ph["p95_ms"] else "-",
             ", ".join(f"{d.replace('Retriever', '').replace('CrossEncoder', 'CE')} {ph['max_replicas'][d]}" for d in DEPLOYMENTS)) for ph in phases]
    md = run.header_markdown("Autoscaling trace (step load)")
    md += (
        f"Demo corpus index (BM25 + dense), rerank top-{args.rerank_top_m} with the MiniLM-L6 speed cross-encoder (max_length {args.max_length}); "
        f"every deployment autoscales (reranker: target_ongoing_requests {args.target_ongoing}, max {args.max_replicas} replicas; retrievers: target 16, max 3; "
        f"upscale_delay_s 3, downscale_delay_s 15), 1 torch thread per replica. Steps (clients:seconds): {args.steps}.\n\n"
    )
    md += md_table(["step", "clients", "time s", "requests ok", "errors", "requests/s", "p50 ms", "p95 ms", "max RUNNING replicas"], rows)
    if reaction:
        md += (f"\nReranker reaction to the high step: first new replica STARTING after {reaction['decision_s']:.0f} s, "
               f"first extra replica RUNNING after {reaction['extra_replica_running_s']:.0f} s (process start, imports and model load on this machine).\n"
               if reaction.get("decision_s") is not None and reaction.get("extra_replica_running_s") is not None else "\nThe reranker did not scale up during the high step.\n")
    if tail:
        md += f"\nReplicas {args.tail_s:.0f} s after the load ended: " + ", ".join(f"{d} {tail[-1].get(d)}" for d in DEPLOYMENTS) + "\n"
    run.write(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
