"""The reranker's pair-score cache on popular queries: hit rate, requests/s, p95, equal answers.

Command::

    python -m benchmarks.score_cache                      # 240 requests, Zipf(1.1) over SciFact test queries
    python -m benchmarks.score_cache --requests 400 --concurrency 8 --rerank-top-m 20

Workload: ``--requests`` /search requests whose queries are drawn from SciFact's 300 test
queries with a Zipf(``--zipf``) popularity (the query of popularity rank r is drawn with
probability proportional to 1 / r^s; a seeded permutation decides which query has which
rank), sent by ``--concurrency`` closed-loop clients on loopback; hybrid retrieval (top-100
per retriever), the MiniLM-L6 speed cross-encoder reranks the top ``--rerank-top-m``.

Configurations, each a fresh application on this machine, the same request stream:

* no cache, one reranker replica (all cores);
* cache, one replica;
* cache, two replicas (half the cores each), Serve's default routing (power of two choices);
* cache, two replicas, query-hash routing (``serve_app.serve.routing.QueryHashRouter``).

Reported per configuration: requests/s, p50/p95 latency, errors, the cache's hit rate (from
each replica's ``stats``), and whether every answer equals the no-cache answer to the same
request (same documents in the same order; scores within 1e-5, since a pair scored in another
batch differs in its last bits). Target (issue 14): at least 2x requests/s with the cache at
one replica.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import DEFAULT_CACHE, BenchRun, base_parser, load_scifact, md_table, speed_model_dir, target_line
from benchmarks.common import ensure_scifact_index
from benchmarks.loadgen import closed_loop
from benchmarks.serving import handle_call, serve_stack


def zipf_stream(n_items: int, n: int, s: float, seed: int) -> list[int]:
    """``n`` draws of item indices with Zipf(``s``) popularity over ``n_items`` items (ranks permuted by ``seed``)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_items + 1) ** s
    ranks = rng.choice(n_items, size=n, p=weights / weights.sum())
    return rng.permutation(n_items)[ranks].tolist()


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0], repeats=False)
    p.add_argument("--scifact", default=None, help="SciFact BEIR directory")
    p.add_argument("--index", default=str(DEFAULT_CACHE / "bench" / "scifact-index"), help="index directory (built if missing)")
    p.add_argument("--model", default=None, help="cross-encoder directory (default: the MiniLM-L6 speed model)")
    p.add_argument("--requests", type=int, default=240, help="requests in the stream")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of query popularity")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    p.add_argument("--rerank-top-m", type=int, default=20, help="fused candidates reranked per request")
    p.add_argument("--max-length", type=int, default=256, help="cross-encoder tokens per pair")
    p.add_argument("--cache-mb", type=int, default=256, help="score cache per replica (MiB)")
    p.add_argument("--max-seconds", type=float, default=600, help="a configuration stops sending after this")
    p.add_argument("--configs", default="off-1,on-1,on-2-default,on-2-hash", help="configurations to run (comma-separated)")
    args = p.parse_args(argv)
    run = BenchRun("score_cache", args, args.out)

    index = ensure_scifact_index(Path(args.index), args.scifact)
    model_dir = speed_model_dir(args.model)
    ds = load_scifact(args.scifact)
    queries = [ds.queries[q] for q in sorted(ds.queries)]
    stream = zipf_stream(len(queries), args.requests, args.zipf, args.seed)
    bodies = [{"query": queries[i], "top_k": 100, "rerank_top_m": args.rerank_top_m, "top_n": 10} for i in stream]
    distinct = len(set(stream))
    print(f"{args.requests} requests over {distinct} distinct queries (Zipf {args.zipf}); best possible hit rate {1 - distinct / args.requests:.2f}")

    answers: dict[str, list[Any]] = {}
    results: dict[str, Any] = {"stream": {"requests": args.requests, "distinct_queries": distinct, "zipf": args.zipf, "seed": args.seed}, "configs": {}}
    for name in args.configs.split(","):
        cache, replicas, routing = name.split("-")[0] == "on", int(name.split("-")[1]), (name.split("-")[2] if name.count("-") == 2 else "default")
        cpus = 2.0 / replicas
        threads = str(max(1, int(cpus)))
        app_args = {
            "index_dir": str(index),
            "build_index_if_missing": False,
            "retrievers": ["bm25", "dense"],
            "reranker": {"model": str(model_dir), "max_length": args.max_length, "device": "cpu", "dtype": "float32", "score_cache": {"max_bytes": args.cache_mb << 20 if cache else 0}},
            "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.01},
            "timeouts": {"retriever_timeout_s": 60, "rerank_timeout_s": 600, "request_timeout_s": 600},
        }
        reranker_opts: dict[str, Any] = {
            "num_replicas": replicas,
            "max_ongoing_requests": 64,
            "ray_actor_options": {"num_cpus": cpus, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}},
        }
        if routing == "hash":
            reranker_opts["request_router_config"] = {"request_router_class": "serve_app.serve.routing.QueryHashRouter", "request_router_kwargs": {"imbalance_threshold": 16}}
        deployments = {
            "SearchIngress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
            "BM25Retriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
            "DenseRetriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
            "CrossEncoderReranker": reranker_opts,
        }
        print(f"== {name}: cache {'on' if cache else 'off'}, {replicas} replica(s), {routing} routing")
        with serve_stack(app_args, deployments, num_cpus=4.0, timeout_s=900) as base:
            url = base + "/search"
            warm = closed_loop(url, [{"query": "warm up the stages", "top_k": 100, "rerank_top_m": args.rerank_top_m, "top_n": 10}] * 2, 1)
            assert warm.ok, warm.records[0].error
            res = closed_loop(url, bodies, args.concurrency, max_seconds=args.max_seconds, timeout_s=600, extract=lambda j: {"ids": [r["id"] for r in j["results"]], "scores": [r["score"] for r in j["results"]]})
            stats = [handle_call("CrossEncoderReranker", "stats") for _ in range(4 * replicas)]
        by_replica = {s["replica"]: s["score_cache"] for s in stats}
        hits = sum(c["hits"] for c in by_replica.values())
        misses = sum(c["misses"] for c in by_replica.values())
        summary = res.summary()
        answers[name] = [r.info if r.status == 200 else None for r in res.records]
        results["configs"][name] = {
            "cache": cache, "replicas": replicas, "routing": routing, "replicas_seen": len(by_replica),
            "hit_rate": hits / (hits + misses) if hits + misses else None, "cache_per_replica": by_replica, **summary,
        }
        print(f"  {summary['requests_per_s']:.2f} req/s, p50 {summary['p50_ms']:.0f} ms, p95 {summary['p95_ms']:.0f} ms, {summary['errors']} errors, hit rate {results['configs'][name]['hit_rate']}")

    ref = answers.get("off-1")
    rows = []
    for name, r in results["configs"].items():
        same = None
        if ref is not None and name != "off-1":
            pairs = [(a, b) for a, b in zip(ref, answers[name]) if a is not None and b is not None]
            same_ids = all(a["ids"] == b["ids"] for a, b in pairs)
            diff = max((abs(x - y) for a, b in pairs for x, y in zip(a["scores"], b["scores"])), default=0.0)
            r["answers_equal"] = {"compared": len(pairs), "same_ids": same_ids, "max_score_diff": diff}
            same = f"{'yes' if same_ids and diff <= 1e-5 else 'NO'} ({len(pairs)} compared, max abs diff {diff:.1e})"
        base_rps = results["configs"].get("off-1", {}).get("requests_per_s")
        rows.append((
            name, "on" if r["cache"] else "off", r["replicas"], r["routing"], f"{r['requests_per_s']:.2f}", f"{r['requests_per_s'] / base_rps:.2f}x" if base_rps else "-",
            f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}", r["errors"], "-" if r["hit_rate"] is None else f"{r['hit_rate']:.2f}", same or "(reference)",
        ))
    on1, off1 = results["configs"].get("on-1"), results["configs"].get("off-1")
    targets = [target_line("cache on / off requests/s, one replica", on1["requests_per_s"] / off1["requests_per_s"] if on1 and off1 else None, 2.0)]
    h2, d2 = results["configs"].get("on-2-hash"), results["configs"].get("on-2-default")

    md = run.header_markdown("Score cache on a Zipf query stream")
    md += (
        f"Workload: {args.requests} /search requests, queries drawn from the {len(queries)} SciFact test queries with Zipf({args.zipf}) popularity "
        f"({distinct} distinct: at most {1 - distinct / args.requests:.0%} of requests can be answered from the cache), {args.concurrency} closed-loop clients on loopback; "
        f"hybrid top-100 per retriever, the MiniLM-L6 speed cross-encoder (random weights, ms-marco-MiniLM-L-6-v2's cost) reranks the top {args.rerank_top_m} at max_length {args.max_length}, float32; "
        f"score cache {args.cache_mb} MiB per replica; two replicas get 1 CPU and 1 torch thread each, one replica 2 and 2.\n\n"
    )
    md += md_table(["config", "cache", "reranker replicas", "routing", "requests/s", "vs no cache", "p50 ms", "p95 ms", "errors", "hit rate", "answers equal to no cache"], rows)
    if h2 and d2:
        md += f"\nQuery-hash routing vs Serve's default routing at two replicas: hit rate {h2['hit_rate']:.2f} vs {d2['hit_rate']:.2f}, requests/s {h2['requests_per_s'] / d2['requests_per_s']:.2f}x.\n"
    run.write(results, md, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
