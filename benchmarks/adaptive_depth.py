"""Fixed rerank depth vs SLO-aware depth under a step load of /search requests.

Command::

    python -m benchmarks.adaptive_depth --quality /path/to/eval/metrics.json
    python -m benchmarks.adaptive_depth --rerank-top-m 50 --high 8 --slo-factor 2.0

The served application: SciFact index (BM25 + dense), hybrid top-100 per retriever, the
MiniLM-L6 speed cross-encoder (random weights, the cost of ms-marco-MiniLM-L-6-v2; the
quality figures come from the project's trained MiniLM-L6 reranker of the same shape) reranks
the top ``--rerank-top-m`` (float32, max_length ``--max-length``), one reranker replica with
all the cores.

Step load, the same for both configurations: ``--low`` client(s) for ``--low-requests``
requests, then ``--high`` closed-loop clients for ``--high-requests``, then ``--low`` again.

1. **fixed depth**: every request reranks ``--rerank-top-m``;
2. **SLO-aware depth**: ``slo.search_p95_ms`` = ``--slo-factor`` x the fixed run's p95 in the
   first low phase (so the objective is one a quiet machine meets with room), floor
   ``--min-depth``.

Per phase: p50/p95 latency, requests/s, 503s and other errors, mean depth used, the share of
requests whose depth was lowered. The quality each depth costs comes from ``--quality``: a
``serve-app eval`` metrics.json with rows ``hybrid+rerank@M`` (``--rerank-top-m 50,100,20,10``),
interpolated linearly between the evaluated depths at each request's depth.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import DEFAULT_CACHE, BenchRun, base_parser, load_scifact, md_table, speed_model_dir, target_line
from benchmarks.common import ensure_scifact_index
from benchmarks.loadgen import closed_loop
from benchmarks.serving import serve_stack


def quality_by_depth(path: str | None, metric: str = "nDCG@10") -> dict[int, float]:
    """``{depth: metric}`` from a multi-depth eval's metrics.json (rows ``hybrid+rerank@M``)."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    rows = data.get("results", data)
    out = {}
    for name, metrics in rows.items():
        if name.startswith("hybrid+rerank@") and "(" not in name:
            out[int(name.split("@")[1])] = float(metrics[metric])
    return dict(sorted(out.items()))


def interpolate(quality: dict[int, float], depth: float) -> float | None:
    """The metric at ``depth``, linear between the evaluated depths (clamped at the ends)."""
    if not quality:
        return None
    xs, ys = list(quality), list(quality.values())
    return float(np.interp(depth, xs, ys))


def phase_summary(res: Any) -> dict[str, Any]:
    s = res.summary()
    ok = res.ok
    depths = [r.info["depth"] for r in ok]
    s["status_503"] = sum(1 for r in res.records if r.status == 503)
    s["mean_depth"] = float(np.mean(depths)) if depths else float("nan")
    s["min_depth"] = int(min(depths)) if depths else None
    s["reduced_share"] = float(np.mean([r.info["reduced"] for r in ok])) if ok else float("nan")
    s["depths"] = depths
    return s


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--scifact", default=None, help="SciFact BEIR directory")
    p.add_argument("--index", default=str(DEFAULT_CACHE / "bench" / "scifact-index"), help="index directory (built if missing)")
    p.add_argument("--model", default=None, help="cross-encoder directory (default: the MiniLM-L6 speed model)")
    p.add_argument("--rerank-top-m", type=int, default=50, help="depth a request asks for")
    p.add_argument("--min-depth", type=int, default=10, help="slo.min_rerank_top_m")
    p.add_argument("--max-length", type=int, default=256, help="cross-encoder tokens per pair")
    p.add_argument("--low", type=int, default=1, help="clients of the low phases")
    p.add_argument("--high", type=int, default=8, help="clients of the high phase")
    p.add_argument("--low-requests", type=int, default=8)
    p.add_argument("--high-requests", type=int, default=40)
    p.add_argument("--slo-factor", type=float, default=2.0, help="objective = this x the fixed run's p95 in the first low phase")
    p.add_argument("--slo-ms", type=float, default=None, help="a fixed objective instead of --slo-factor")
    p.add_argument("--quality", default=None, help="metrics.json of `serve-app eval --rerank-top-m 50,100,20,10` (nDCG@10 per depth)")
    args = p.parse_args(argv)
    run = BenchRun("adaptive_depth", args, args.out)

    index = ensure_scifact_index(Path(args.index), args.scifact)
    model_dir = speed_model_dir(args.model)
    ds = load_scifact(args.scifact)
    queries = [ds.queries[q] for q in sorted(ds.queries)]
    quality = quality_by_depth(args.quality)
    phases = [("low", args.low, args.low_requests), ("high", args.high, args.high_requests), ("low again", args.low, args.low_requests)]

    def extract(j: dict[str, Any]) -> dict[str, Any]:
        rr = j["stages"]["rerank"]
        return {"depth": j["funnel"]["rerank_top_m"], "reduced": bool(rr.get("depth_reduced", False))}

    results: dict[str, Any] = {"phases": [list(x) for x in phases], "quality_by_depth": quality, "configs": {}}
    objective = args.slo_ms
    for name in ("fixed", "slo"):
        slo = {"search_p95_ms": objective, "min_rerank_top_m": args.min_depth} if name == "slo" else {}
        app_args = {
            "index_dir": str(index),
            "build_index_if_missing": False,
            "retrievers": ["bm25", "dense"],
            "reranker": {"model": str(model_dir), "max_length": args.max_length, "device": "cpu", "dtype": "float32"},
            "funnel": {"default_rerank_top_m": args.rerank_top_m, "max_rerank_top_m": max(200, args.rerank_top_m)},
            "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.01},
            "timeouts": {"retriever_timeout_s": 60, "rerank_timeout_s": 600, "request_timeout_s": 600},
            "slo": slo,
        }
        deployments = {
            "SearchIngress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
            "BM25Retriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
            "DenseRetriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
            "CrossEncoderReranker": {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 2.0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}}}},
        }
        print(f"== {name}" + (f": objective p95 {objective:.0f} ms, floor {args.min_depth}" if name == "slo" else f": depth {args.rerank_top_m}"))
        out = []
        with serve_stack(app_args, deployments, num_cpus=4.0, timeout_s=900) as base:
            url = base + "/search"
            closed_loop(url, [{"query": q, "top_k": 100} for q in queries[-4:]], 1)  # warm-up
            start = 0
            for label, clients, n in phases:
                bodies = [{"query": q, "top_k": 100, "top_n": 10} for q in queries[start : start + n]]
                start += n
                res = closed_loop(url, bodies, clients, max_seconds=600, timeout_s=600, extract=extract)
                s = phase_summary(res)
                s.update(phase=label, clients=clients)
                out.append(s)
                print(f"  {label} ({clients} clients): p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, {s['requests_per_s']:.2f} req/s, 503s {s['status_503']}, mean depth {s['mean_depth']:.1f}")
        results["configs"][name] = out
        if name == "fixed" and objective is None:
            objective = round(args.slo_factor * out[0]["p95_ms"], -1)
    results["objective_ms"] = objective

    rows = []
    for name, phases_out in results["configs"].items():
        for s in phases_out:
            q = [interpolate(quality, d) for d in s["depths"]]
            s["quality_nDCG@10"] = float(np.mean(q)) if q and quality else None
            rows.append((
                name, s["phase"], s["clients"], f"{s['p50_ms']:.0f}", f"{s['p95_ms']:.0f}", "yes" if s["p95_ms"] <= objective else "no", f"{s['requests_per_s']:.2f}",
                s["status_503"], s["errors"], f"{s['mean_depth']:.1f}", s["min_depth"], f"{s['reduced_share']:.2f}", "-" if s["quality_nDCG@10"] is None else f"{s['quality_nDCG@10']:.4f}",
            ))
            s.pop("depths")
    fixed_high, slo_high = results["configs"]["fixed"][1], results["configs"]["slo"][1]
    targets = [
        target_line("fixed depth misses the objective at the high phase (p95 / objective)", fixed_high["p95_ms"] / objective, 1.0),
        target_line("SLO-aware depth meets it at the high phase (p95 / objective)", slo_high["p95_ms"] / objective, 1.0, higher_is_better=False),
        target_line("SLO-aware depth sheds no request (503s + errors, all phases)", float(sum(s["status_503"] + s["errors"] for s in results["configs"]["slo"])), 0.0, unit="", higher_is_better=False),
    ]
    md = run.header_markdown("Fixed vs SLO-aware rerank depth under a step load")
    md += (
        f"/search on SciFact (hybrid top-100), the MiniLM-L6 speed cross-encoder at max_length {args.max_length}, float32, one reranker replica with 2 CPUs; "
        f"requests ask for depth {args.rerank_top_m}. Step load: {' -> '.join(f'{c} client(s) x {n} requests' for _, c, n in phases)}. "
        f"Objective p95 {objective:.0f} ms ({'--slo-ms' if args.slo_ms else f'{args.slo_factor} x the fixed run p95 in the first low phase'}), floor {args.min_depth}.\n\n"
    )
    md += md_table(["config", "phase", "clients", "p50 ms", "p95 ms", "meets objective", "requests/s", "503s", "other errors", "mean depth", "min depth", "share reduced", "nDCG@10 at the depths used"], rows)
    if quality:
        md += "\nnDCG@10 by depth (SciFact test, trained MiniLM-L6 reranker, from --quality): " + ", ".join(f"{d}: {v:.4f}" for d, v in quality.items()) + "\n"
    run.write(results, md, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
