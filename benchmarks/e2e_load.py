"""End-to-end /search under load: latency percentiles, throughput, stage breakdown, serving overhead.

Command::

    python -m benchmarks.e2e_load                                   # SciFact, rerank top-10, N = 1, 4, 16
    python -m benchmarks.e2e_load --rerank-top-m 50 --concurrency 1,2,4,8,16,32 --min-requests 64
    python -m benchmarks.e2e_load --throughput-optimized --via direct   # Serve's high-throughput mode, no proxy

The served application: SciFact index (BM25 + dense Flat over all-MiniLM-L6-v2), one replica of
each stage (the reranker with all the machine's cores), hybrid retrieval (top-``--top-k`` from
each retriever, RRF) and cross-encoder reranking of the top-``--rerank-top-m`` fused documents,
top-10 returned. The cross-encoder is the MiniLM-L6 speed model (same cost as
ms-marco-MiniLM-L-6-v2). The in-process reference is ``serve_app.pipeline.SearchPipeline`` over
the same index and models, in this process.

Three phases (each repeated ``--repeats`` times, medians and spread reported):

1. **Serving overhead at 1 client**: (a) retrieval-only requests (top-10, no reranking), where
   compute is a few ms so the difference is measured with little noise: client latency minus the
   in-process critical path, the in-process pipeline and the served request run back to back;
   (b) full requests: for each query, the in-process pipeline and the served
   /search run back to back (so machine noise hits both alike), with the CPU time of the serving
   processes (HTTP proxy and replicas, from /proc) and of the in-process call. Overhead per query =
   client latency minus the in-process compute critical path
   (``max(bm25, dense) + fusion + rerank``: the service runs the retrievers concurrently). Two
   other views are kept: client latency minus the response's own stage times (same critical
   path, times seen by the ingress, so Ray handle calls are inside them) and client latency minus
   the response's ``total`` (HTTP, proxy and JSON only). The verdict uses the time outside the
   stages plus two Ray handle round trips (measured with ``ping`` calls), the part of the stage
   times that is serving rather than compute.
2. **Concurrency sweep**: N closed-loop clients (loopback, bounded in count and time), p50/p95/p99
   latency, requests/s and the per-stage p50 from the responses' ``timings_ms``. A level sends
   max(N x ``--requests-per-client``, ``--min-requests``) requests: with one request per client
   the top level would be a single burst, whose first and last reranker calls run nearly empty.
``--throughput-optimized`` starts Ray with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (gRPC between
deployments, user code and router on the replicas' own loops, direct ingress); ``--via direct``
then sends every request to the ingress replica's own HTTP port instead of the proxy, the path
a load balancer in front of direct ingress (Serve's HAProxy mode) takes.

3. **In-process saturation**: ``SearchPipeline.search`` one query after another, and
   ``search_batch`` (batched retrieval, ``rerank_many`` over 16 queries per call), on the same
   queries. Saturation throughput of the service = its best requests/s over the sweep.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import DEFAULT_CACHE, BenchRun, base_parser, ensure_scifact_index, fmt_spread, load_scifact, md_table, pyspy_record, speed_model_dir, summarize, summarize_profile, target_line
from benchmarks.loadgen import closed_loop
from benchmarks.serving import add_serve_mode_args, cpu_seconds, handle_round_trips, serve_mode, serve_pids, serve_stack

STAGES = ("bm25", "dense", "fusion", "rerank")
#: Where the HTTP proxy and the ingress may spend their time (substrings of py-spy frames).
FRONT_FRAMES = ("uvicorn", "h11", "httptools", "starlette", "fastapi", "pydantic", "json", "serve_app/serve", "serve_app/pipeline", "ray/serve/_private/proxy", "ray/serve/_private/router", "ray/serve/_private/replica", "ray/serve/handle", "asyncio", "_raylet", "grpc", "Worker.main_loop")




def critical_path(t: dict[str, float]) -> float:
    """Compute time of one request when the retrievers run concurrently: max(retrievers) + fusion + rerank."""
    return max(t.get("bm25", 0.0), t.get("dense", 0.0)) + t.get("fusion", 0.0) + t.get("rerank", 0.0)


def main(argv: Sequence[str] | None = None) -> int:
    import httpx

    from serve_app.config import CrossEncoderConfig
    from serve_app.pipeline import SearchPipeline

    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--scifact", default=None, help="SciFact BEIR directory")
    p.add_argument("--index", default=str(DEFAULT_CACHE / "bench" / "scifact-index"), help="index directory (built if missing)")
    p.add_argument("--model", default=None, help="cross-encoder directory (default: the MiniLM-L6 speed model)")
    p.add_argument("--top-k", type=int, default=100, help="candidates per retriever")
    p.add_argument("--rerank-top-m", type=int, default=10, help="fused candidates reranked per request")
    p.add_argument("--max-length", type=int, default=512, help="cross-encoder tokens per pair")
    p.add_argument("--concurrency", default="1,4,16", help="client counts of the sweep")
    p.add_argument("--min-requests", type=int, default=16, help="requests per sweep level at least")
    p.add_argument("--requests-per-client", type=int, default=3, help="a level with N clients sends max(N x this, --min-requests) requests, so that it runs in steady state rather than as one burst")
    p.add_argument("--overhead-queries", type=int, default=12, help="queries of the 1-client overhead phase")
    p.add_argument("--light-queries", type=int, default=30, help="retrieval-only requests of the 1-client overhead phase")
    p.add_argument("--max-seconds", type=float, default=180, help="a sweep level stops sending after this")
    p.add_argument("--replica-cpus", type=float, default=2.0, help="num_cpus (and torch threads) of the reranker replica")
    p.add_argument("--max-batch-size", type=int, default=16, help="reranker @serve.batch max_batch_size")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01, help="reranker batch_wait_timeout_s")
    p.add_argument("--profile", action="store_true", help="py-spy the HTTP proxy and the ingress during the retrieval-only requests of the first repeat")
    p.add_argument("--ray-worker-niceness", type=int, default=0, help="nice value of Ray's worker processes (Ray's own default is 15; -1 keeps it)")
    add_serve_mode_args(p)
    p.set_defaults(repeats=2)
    args = p.parse_args(argv)
    mode = serve_mode(p, args)
    run = BenchRun("e2e_load", args, args.out)
    levels = [int(x) for x in args.concurrency.split(",")]

    index = ensure_scifact_index(Path(args.index), args.scifact)
    model_dir = speed_model_dir(args.model)
    ds = load_scifact(args.scifact)
    queries = [ds.queries[q] for q in sorted(ds.queries)]
    body = lambda q: {"query": q, "top_k": args.top_k, "rerank_top_m": args.rerank_top_m, "top_n": 10}  # noqa: E731

    rcfg = CrossEncoderConfig(model=str(model_dir), max_length=args.max_length, device="cpu")
    pipe = SearchPipeline.from_index(index, reranker_cfg=rcfg, verify_checksums=False)
    pipe.search(queries[0], top_k=args.top_k, rerank_top_m=args.rerank_top_m)  # warm-up

    app_args = {
        "index_dir": str(index),
        "build_index_if_missing": False,
        "retrievers": ["bm25", "dense"],
        "reranker": {"model": str(model_dir), "max_length": args.max_length, "device": "cpu"},
        "batching": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
        "timeouts": {"retriever_timeout_s": 60, "rerank_timeout_s": 600, "request_timeout_s": 600},
    }
    threads = str(max(1, int(args.replica_cpus)))
    deployments = {
        "SearchIngress": {"num_replicas": 1, "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.5}},
        "BM25Retriever": {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.5}},
        "DenseRetriever": {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.5}},
        "CrossEncoderReranker": {
            "num_replicas": 1,
            "max_ongoing_requests": 128,
            "ray_actor_options": {"num_cpus": args.replica_cpus, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}},
            "user_config": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
        },
    }

    cpu_ms: dict[str, list[float]] = {"served_per_request": [], "in_process_per_query": [], "idle_serving_cores": []}
    light: dict[str, list[float]] = {"client_ms": [], "in_process_ms": [], "overhead_ms": [], "served_cpu_ms": [], "in_process_cpu_ms": [], "front_cpu_ms": [], "vs_response_stages_ms": []}
    profiles: dict[str, Any] = {}
    overhead: dict[str, list[float]] = {"vs_in_process_compute": [], "vs_response_stages": [], "vs_response_total": [], "vs_response_stage_sum": [], "client_ms": [], "in_process_ms": []}
    sweep: dict[str, list[dict[str, Any]]] = {str(n): [] for n in levels}
    inproc: dict[str, list[float]] = {"search_qps": [], "search_batch_qps": []}
    stage_p50: dict[str, dict[str, list[float]]] = {str(n): {s: [] for s in (*STAGES, "total")} for n in levels}
    batch_sizes: dict[str, list[float]] = {str(n): [] for n in levels}

    niceness = None if args.ray_worker_niceness < 0 else args.ray_worker_niceness
    with serve_stack(app_args, deployments, num_cpus=max(4.0, args.replica_cpus + 2), timeout_s=900, worker_niceness=niceness, throughput_optimized=args.throughput_optimized, via=args.via) as base:
        url = base + "/search"
        with httpx.Client(timeout=600) as client:
            for q in queries[:2]:  # warm-up of every stage
                r = client.post(url, json=body(q))
                r.raise_for_status()
            handle_rtt = handle_round_trips("BM25Retriever", 20)
            pids = serve_pids()
            front = {k: v for k, v in pids.items() if k.split(":")[0] in ("ProxyActor", "SearchIngress")}
            print(f"serving processes: {sorted(k.split(':')[0] for k in pids)}")
            for rep in range(args.repeats):
                print(f"repeat {rep + 1}/{args.repeats}")
                # Background CPU of the idle serving processes (metrics, health checks, event loops),
                # subtracted from the CPU time of each served request.
                c0, t0 = cpu_seconds(pids), time.perf_counter()
                time.sleep(5)
                idle_cores = (cpu_seconds(pids) - c0) / (time.perf_counter() - t0)
                cpu_ms["idle_serving_cores"].append(idle_cores)
                # Phase 1: 1-client overhead, served and in-process back to back.
                for i, q in enumerate(queries[: args.overhead_queries]):
                    order = ("local", "served") if (i + rep) % 2 == 0 else ("served", "local")
                    for which in order:
                        if which == "local":
                            c0 = time.process_time()
                            res = pipe.search(q, top_k=args.top_k, rerank_top_m=args.rerank_top_m, top_n=10)
                            cpu_ms["in_process_per_query"].append((time.process_time() - c0) * 1000)
                            local_cp = critical_path(res.timings_ms)
                            local_total = res.timings_ms["total"]
                        else:
                            c0 = cpu_seconds(pids)
                            t0 = time.perf_counter()
                            r = client.post(url, json=body(q))
                            client_ms = (time.perf_counter() - t0) * 1000
                            cpu_ms["served_per_request"].append((cpu_seconds(pids) - c0) * 1000 - idle_cores * client_ms)
                            r.raise_for_status()
                            tm = r.json()["timings_ms"]
                    overhead["client_ms"].append(client_ms)
                    overhead["in_process_ms"].append(local_total)
                    overhead["vs_in_process_compute"].append(client_ms - local_cp)
                    overhead["vs_response_stages"].append(client_ms - critical_path(tm))
                    overhead["vs_response_stage_sum"].append(client_ms - sum(tm.get(s, 0.0) for s in STAGES))
                    overhead["vs_response_total"].append(client_ms - tm["total"])
                print(f"  overhead p50: {np.median(overhead['vs_in_process_compute']):.1f} ms vs in-process compute, {np.median(overhead['vs_response_stages']):.1f} ms vs response stages")
                # Phase 1b: light requests (retrieval only, top-10): compute is small, so the wall-clock
                # difference to the in-process pipeline is the serving overhead with little noise.
                spies = {}
                if args.profile and rep == 0:
                    for k, pid in front.items():
                        spies[k.split(":")[0]] = (pyspy_record(pid, 30, run.raw / f"{k.split(':')[0]}.pyspy.txt"), run.raw / f"{k.split(':')[0]}.pyspy.txt")
                    time.sleep(1)
                t_light = time.perf_counter()
                for i, q in enumerate(queries[100 : 100 + args.light_queries] * (4 if spies else 1)):
                    if spies and time.perf_counter() - t_light > 28:
                        break
                    order = ("local", "served") if (i + rep) % 2 == 0 else ("served", "local")
                    for which in order:
                        if which == "local":
                            c0 = time.process_time()
                            res = pipe.search(q, top_k=10, rerank_top_m=0, top_n=10)
                            light["in_process_cpu_ms"].append((time.process_time() - c0) * 1000)
                            lcp = critical_path(res.timings_ms)
                            light["in_process_ms"].append(res.timings_ms["total"])
                        else:
                            c0, f0 = cpu_seconds(pids), cpu_seconds(front)
                            t0 = time.perf_counter()
                            r = client.post(url, json={"query": q, "top_k": 10, "rerank_top_m": 0, "top_n": 10})
                            lms = (time.perf_counter() - t0) * 1000
                            light["served_cpu_ms"].append((cpu_seconds(pids) - c0) * 1000 - idle_cores * lms)
                            light["front_cpu_ms"].append((cpu_seconds(front) - f0) * 1000)
                            r.raise_for_status()
                            light["vs_response_stages_ms"].append(lms - critical_path(r.json()["timings_ms"]))
                    light["client_ms"].append(lms)
                    light["overhead_ms"].append(lms - lcp)
                print(f"  light requests: overhead p50 {np.median(light['overhead_ms']):.1f} ms (client {np.median(light['client_ms']):.1f} ms), "
                      f"{np.median(light['vs_response_stages_ms']):.1f} ms outside the stages, proxy+ingress CPU {np.median(light['front_cpu_ms']):.1f} ms")
                for name, (proc, path) in spies.items():
                    proc.wait(120)
                    if path.is_file():
                        profiles[name] = summarize_profile(path, top=15, inclusive=FRONT_FRAMES)

                # Phase 2: concurrency sweep.
                for n in levels:
                    bodies = [body(queries[(rep * 97 + i) % len(queries)]) for i in range(max(n * args.requests_per_client, args.min_requests))]
                    res = closed_loop(url, bodies, n, max_seconds=args.max_seconds, timeout_s=args.max_seconds + 600,
                                      extract=lambda j: {"timings": j["timings_ms"], "batch": (j["stages"].get("rerank") or {}).get("batch_size")})
                    s = res.summary()
                    sweep[str(n)].append(s)
                    ok = res.ok
                    for st in (*STAGES, "total"):
                        vals = [r.info["timings"].get(st) for r in ok if r.info["timings"].get(st) is not None]
                        if vals:
                            stage_p50[str(n)][st].append(float(np.median(vals)))
                    bs = [r.info["batch"] for r in ok if r.info.get("batch")]
                    if bs:
                        batch_sizes[str(n)].append(float(np.mean(bs)))
                    print(f"  N={n}: {s['requests_per_s']:.2f} req/s, p50 {s['p50_ms']:.0f} p95 {s['p95_ms']:.0f} p99 {s['p99_ms']:.0f} ms, {s['ok']}/{s['requests']} ok")

                # Phase 3: in-process saturation on the same number of queries.
                qs = [queries[(rep * 97 + i) % len(queries)] for i in range(args.min_requests)]
                t = time.perf_counter()
                for q in qs:
                    pipe.search(q, top_k=args.top_k, rerank_top_m=args.rerank_top_m, top_n=10)
                inproc["search_qps"].append(len(qs) / (time.perf_counter() - t))
                t = time.perf_counter()
                pipe.search_batch(qs, top_k=args.top_k, rerank_top_m=args.rerank_top_m, top_n=10, rerank_queries_per_call=args.max_batch_size)
                inproc["search_batch_qps"].append(len(qs) / (time.perf_counter() - t))
                print(f"  in process: search {inproc['search_qps'][-1]:.2f} q/s, search_batch {inproc['search_batch_qps'][-1]:.2f} q/s")

    results: dict[str, Any] = {
        "index": str(index),
        "model": str(model_dir),
        "top_k": args.top_k,
        "rerank_top_m": args.rerank_top_m,
        "overhead_1_client_ms": {k: summarize(v) for k, v in overhead.items()},
        "handle_round_trip_ms": summarize(handle_rtt[5:]),
        "light_requests_1_client_ms": {k: summarize(v) for k, v in light.items()},
        "cpu_ms": {k: summarize(v) for k, v in cpu_ms.items()},
        "profiles_front": profiles,
        "sweep": {},
        "in_process": {k: summarize(v) for k, v in inproc.items()},
    }
    for n in levels:
        runs = sweep[str(n)]
        results["sweep"][str(n)] = {
            "requests_per_s": summarize(r["requests_per_s"] for r in runs),
            **{f"{k}_ms": summarize(r[f"{k}_ms"] for r in runs) for k in ("p50", "p95", "p99")},
            "stage_p50_ms": {st: summarize(v) for st, v in stage_p50[str(n)].items() if v},
            "mean_rerank_batch_requests": summarize(batch_sizes[str(n)]),
            "errors": sum(r["errors"] for r in runs),
            "runs": runs,
        }
    best_n = max(levels, key=lambda n: results["sweep"][str(n)]["requests_per_s"]["median"])
    sat = results["sweep"][str(best_n)]["requests_per_s"]["median"]
    results["saturation"] = {
        "served_requests_per_s": sat,
        "at_concurrency": best_n,
        "vs_in_process_search": sat / results["in_process"]["search_qps"]["median"],
        "vs_in_process_search_batch": sat / results["in_process"]["search_batch_qps"]["median"],
    }
    ov = results["overhead_1_client_ms"]
    # Outside the stages (HTTP, proxy, ingress, JSON) plus the two sequential handle hops hidden
    # inside the stage times (retrievers, in parallel; then the reranker).
    estimate = ov["vs_response_stages"]["median"] + 2 * results["handle_round_trip_ms"]["median"]
    results["overhead_estimate_ms"] = estimate
    light_ov = results["light_requests_1_client_ms"]["overhead_ms"]["median"]
    cpu_overhead = results["cpu_ms"]["served_per_request"]["median"] - results["cpu_ms"]["in_process_per_query"]["median"]
    results["cpu_overhead_ms_per_request"] = cpu_overhead
    targets = [
        target_line("serving overhead p50 at 1 client, retrieval-only requests (client latency - in-process compute)", light_ov, 15, "ms", higher_is_better=False),
        target_line("serving overhead p50 at 1 client, full requests (outside the stages + 2 handle round trips)", estimate, 15, "ms", higher_is_better=False),
        target_line("serving overhead p50 at 1 client (client latency - in-process compute critical path)", ov["vs_in_process_compute"]["median"], 15, "ms", higher_is_better=False),
        target_line("serving overhead p50 at 1 client (client latency - response stage times)", ov["vs_response_stages"]["median"], 15, "ms", higher_is_better=False),
        target_line(f"saturation throughput vs in-process SearchPipeline.search (served at N={best_n})", results["saturation"]["vs_in_process_search"], 0.8),
        target_line(f"saturation throughput vs in-process SearchPipeline.search_batch (served at N={best_n})", results["saturation"]["vs_in_process_search_batch"], 0.8),
    ]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    xs = levels
    for k, m in (("p50_ms", "o-"), ("p95_ms", "s--"), ("p99_ms", "x:")):
        ax[0].plot(xs, [results["sweep"][str(n)][k]["median"] for n in xs], m, label=k.replace("_ms", ""))
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("concurrent clients")
    ax[0].set_ylabel("latency (ms)")
    ax[0].legend()
    ax[0].set_title("/search latency")
    ax[1].plot(xs, [results["sweep"][str(n)]["requests_per_s"]["median"] for n in xs], "o-", label="served /search")
    ax[1].axhline(results["in_process"]["search_qps"]["median"], color="grey", ls="--", label="in process: search()")
    ax[1].axhline(results["in_process"]["search_batch_qps"]["median"], color="black", ls=":", label="in process: search_batch()")
    ax[1].set_xscale("log", base=2)
    ax[1].set_xlabel("concurrent clients")
    ax[1].set_ylabel("requests/s")
    ax[1].legend(fontsize=8)
    ax[1].set_title("throughput")
    bottom = np.zeros(len(xs))
    for st in STAGES:
        vals = np.array([results["sweep"][str(n)]["stage_p50_ms"].get(st, {}).get("median", 0.0) for n in xs])
        ax[2].bar([str(n) for n in xs], vals, bottom=bottom, label=st)
        bottom += vals
    ax[2].plot([str(n) for n in xs], [results["sweep"][str(n)]["p50_ms"]["median"] for n in xs], "k_", markersize=30, label="client p50")
    ax[2].set_xlabel("concurrent clients")
    ax[2].set_ylabel("ms (p50 per stage, as seen by the ingress)")
    ax[2].legend(fontsize=8)
    ax[2].set_title("stage breakdown (stacked; retrievers run concurrently)")
    fig.suptitle(f"SciFact /search: hybrid top-{args.top_k} + rerank top-{args.rerank_top_m} (MiniLM-L6, max_length {args.max_length})")
    run.save_figure(fig, "e2e_load.png")

    rows = []
    for n in levels:
        r = results["sweep"][str(n)]
        st = r["stage_p50_ms"]
        rows.append((n, fmt_spread(r["requests_per_s"], 2), fmt_spread(r["p50_ms"], 0), fmt_spread(r["p95_ms"], 0), fmt_spread(r["p99_ms"], 0),
                     *(f"{st[s]['median']:.1f}" if s in st else "-" for s in (*STAGES, "total")), f"{r['mean_rerank_batch_requests']['median']:.1f}", r["errors"]))
    results["serve_mode"] = mode
    md = run.header_markdown("End-to-end /search under load")
    md += (
        f"SciFact index ({index}): BM25 + dense Flat (all-MiniLM-L6-v2), hybrid RRF, rerank top-{args.rerank_top_m} with the MiniLM-L6 speed cross-encoder "
        f"(max_length {args.max_length}), top-10 returned. One replica per stage; reranker num_cpus {args.replica_cpus} ({threads} torch threads), "
        f"@serve.batch max_batch_size {args.max_batch_size}; Ray worker niceness {niceness if niceness is not None else '15 (Ray default)'}; {mode}. A level with N clients sends max({args.requests_per_client}N, {args.min_requests}) requests. Medians [min-max] over {args.repeats} repeats.\n\n"
        "## Concurrency sweep\n\n"
    )
    md += md_table(["N", "requests/s", "p50 ms", "p95 ms", "p99 ms", "bm25 p50", "dense p50", "fusion p50", "rerank p50", "ingress total p50", "rerank batch (requests)", "errors"], rows)
    md += "\n## Serving overhead at 1 client (ms, p50 over queries)\n\n"
    md += md_table(["definition", "p50 [min-max]"], [
        ("client latency", fmt_spread(ov["client_ms"])),
        ("in-process pipeline total (sequential retrievers)", fmt_spread(ov["in_process_ms"])),
        ("client - in-process compute critical path", fmt_spread(ov["vs_in_process_compute"])),
        ("client - response stage times (critical path)", fmt_spread(ov["vs_response_stages"])),
        ("client - response stage times (plain sum)", fmt_spread(ov["vs_response_stage_sum"])),
        ("client - response total (HTTP, proxy, JSON)", fmt_spread(ov["vs_response_total"])),
        ("Ray handle round trip driver -> BM25 replica ping (p50 of 15)", fmt_spread(results["handle_round_trip_ms"])),
        ("estimate: outside the stages + 2 handle round trips", f"{estimate:.1f}"),
        ("retrieval-only requests (top-10, no rerank): client latency", fmt_spread(results["light_requests_1_client_ms"]["client_ms"])),
        ("retrieval-only requests: in-process pipeline total", fmt_spread(results["light_requests_1_client_ms"]["in_process_ms"])),
        ("retrieval-only requests: client - in-process compute critical path", fmt_spread(results["light_requests_1_client_ms"]["overhead_ms"])),
        ("retrieval-only requests: CPU time of the serving processes (minus idle background)", fmt_spread(results["light_requests_1_client_ms"]["served_cpu_ms"])),
        ("retrieval-only requests: CPU time in process", fmt_spread(results["light_requests_1_client_ms"]["in_process_cpu_ms"])),
        ("retrieval-only requests: client - response stage times (critical path)", fmt_spread(results["light_requests_1_client_ms"]["vs_response_stages_ms"])),
        ("retrieval-only requests: CPU time of the HTTP proxy + ingress", fmt_spread(results["light_requests_1_client_ms"]["front_cpu_ms"])),
    ])
    md += (
        f"\nCPU time per full request (immune to waiting for a core): served {results['cpu_ms']['served_per_request']['median']:.0f} ms "
        f"(HTTP proxy + every replica, minus their idle background of {results['cpu_ms']['idle_serving_cores']['median']:.3f} cores over the request), "
        f"in process {results['cpu_ms']['in_process_per_query']['median']:.0f} ms: serving adds {cpu_overhead:.0f} ms of CPU per request.\n"
    )
    md += (
        "\nThe response's stage times are measured by the ingress around each deployment call, so they include the Ray handle round trip; "
        "the estimate adds two of them back (the retrievers run concurrently, then the reranker). The in-process comparison counts "
        "everything but is as noisy as the compute itself on a shared machine.\n"
    )
    for name, prof in profiles.items():
        md += f"\n### py-spy of {name} during retrieval-only requests ({prof['samples']} samples)\n\n"
        md += md_table(["stacks containing", "share of samples"], [(f"`{k}`", f"{v:.1%}") for k, v in prof["inclusive"].items() if v > 0])
        md += "\n" + md_table(["top leaf frame", "share"], [(f"`{k[:120]}`", f"{v:.1%}") for k, v in prof["top_leaves"]])
    md += "\n## Saturation\n\n"
    md += md_table(["", "queries/s"], [
        (f"served /search (best over the sweep, N={best_n})", f"{sat:.2f}"),
        ("in process: SearchPipeline.search, one after another", fmt_spread(results["in_process"]["search_qps"], 2)),
        (f"in process: SearchPipeline.search_batch ({args.max_batch_size} queries per rerank call)", fmt_spread(results["in_process"]["search_batch_qps"], 2)),
    ])
    run.write(results, md, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
