"""Fixed rerank depth vs SLO-aware depth under a step load of /search requests, against real bounds.

Command::

    python -m benchmarks.adaptive_depth --model $BENCH_CACHE/scifact-reranker
    python -m benchmarks.adaptive_depth --model $BENCH_CACHE/scifact-reranker --high 32 --slo-ms 8000

The served application: SciFact index (BM25 + dense), hybrid top-100 per retriever, the trained
reranker (``serve-app train-reranker``'s output, the service's default runtime) reranks the
fused top ``--rerank-top-m``, one reranker replica with all the cores. The bounds are the
shipped ones, read from ``--limits`` (``deployments.yaml``): the ingress's and the reranker's
``max_ongoing_requests``, ``max_queued_requests`` and ``backpressure_config``, and the
application's ``timeouts`` (retriever, rerank, whole request). So a configuration that falls
behind sheds (503) or times out (504) as the service would, and the target can be missed.

Step load, the same requests for both configurations: ``--low`` client(s) for
``--low-requests`` requests, then ``--high`` closed-loop clients for ``--high-requests``, then
``--low`` again (SciFact test queries in order, each phase its own).

1. **fixed depth**: every request reranks ``--rerank-top-m``;
2. **SLO-aware depth**: ``slo.search_p95_ms`` = ``--slo-ms``, or ``--slo-factor`` x the fixed
   run's p95 in the first low phase, floor ``--min-depth``.

Per phase: p50/p95 latency of the answered requests, requests/s, 503s, 504s and other errors,
mean depth used, the share of requests whose depth was lowered, and the quality of the answers
actually served: nDCG@10 of each answered request on the test qrels (mean over the answered,
and over all requests with an unanswered one counted 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from benchmarks.common import DEFAULT_CACHE, REPO_ROOT, BenchRun, base_parser, load_scifact, md_table, target_line
from benchmarks.common import ensure_scifact_index
from benchmarks.loadgen import closed_loop
from benchmarks.serving import serve_stack


def shipped_bounds(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(per-deployment bounds, application timeouts) of a Serve config such as deployments.yaml:
    ``max_ongoing_requests``, ``max_queued_requests`` and ``backpressure_config`` of each
    deployment that sets them, and the first application's ``args.timeouts``."""
    config = yaml.safe_load(Path(path).read_text())
    app = config["applications"][0]
    keys = ("max_ongoing_requests", "max_queued_requests", "backpressure_config")
    bounds = {d["name"]: {k: d[k] for k in keys if k in d} for d in app.get("deployments", [])}
    timeouts = dict(app.get("args", {}).get("timeouts") or {})
    if not timeouts or "CrossEncoderReranker" not in bounds:
        raise SystemExit(f"{path}: no timeouts or no CrossEncoderReranker bounds to run against")
    return bounds, timeouts


def answer_ndcg(qrels: dict[str, dict[str, int]], qid: str, ids: Sequence[str]) -> float:
    """nDCG@10 of one served answer (ranked document ids) for one judged query."""
    from serve_app.eval import evaluate

    return evaluate({qid: {d: float(len(ids) - i) for i, d in enumerate(ids)}}, {qid: qrels[qid]}, ["nDCG@10"])["nDCG@10"]


def phase_summary(res: Any, qids: Sequence[str], qrels: dict[str, dict[str, int]]) -> dict[str, Any]:
    s = res.summary()
    ok = res.ok
    depths = [r.info["depth"] for r in ok]
    scores = [answer_ndcg(qrels, qids[r.index], r.info["ids"]) for r in ok]
    s["nDCG@10_answered"] = float(np.mean(scores)) if scores else float("nan")
    s["nDCG@10_all"] = float(np.sum(scores)) / len(res.records) if res.records else float("nan")
    s["status_503"] = sum(1 for r in res.records if r.status == 503)
    s["status_504"] = sum(1 for r in res.records if r.status == 504)
    s["degraded"] = sum(1 for r in ok if r.info["degraded"])  # answered without a stage that timed out
    s["mean_depth"] = float(np.mean(depths)) if depths else float("nan")
    s["min_depth"] = int(min(depths)) if depths else None
    s["reduced_share"] = float(np.mean([r.info["reduced"] for r in ok])) if ok else float("nan")
    s["depths"] = depths
    return s


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0], repeats=False)
    p.add_argument("--scifact", default=None, help="SciFact BEIR directory")
    p.add_argument("--index", default=str(DEFAULT_CACHE / "bench" / "scifact-index"), help="index directory (built if missing)")
    p.add_argument("--model", default=str(DEFAULT_CACHE / "scifact-reranker"), help="the trained reranker (serve-app train-reranker; docs/TRAINING.md)")
    p.add_argument("--limits", default=str(REPO_ROOT / "deployments.yaml"), help="Serve config whose queue bounds and timeouts the run uses")
    p.add_argument("--rerank-top-m", type=int, default=100, help="depth a request asks for")
    p.add_argument("--min-depth", type=int, default=10, help="slo.min_rerank_top_m")
    p.add_argument("--max-length", type=int, default=256, help="cross-encoder tokens per pair")
    p.add_argument("--low", type=int, default=1, help="clients of the low phases")
    p.add_argument("--high", type=int, default=32, help="clients of the high phase")
    p.add_argument("--low-requests", type=int, default=8)
    p.add_argument("--high-requests", type=int, default=64)
    p.add_argument("--slo-factor", type=float, default=2.0, help="objective = this x the fixed run's p95 in the first low phase")
    p.add_argument("--slo-ms", type=float, default=None, help="a fixed objective instead of --slo-factor")
    args = p.parse_args(argv)
    run = BenchRun("adaptive_depth", args, args.out)

    index = ensure_scifact_index(Path(args.index), args.scifact)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"no trained reranker at {model_dir}: train one first (docs/TRAINING.md, `serve-app train-reranker`)")
    bounds, timeouts = shipped_bounds(Path(args.limits))
    ds = load_scifact(args.scifact)
    qids = [q for q in sorted(ds.queries) if q in ds.qrels]
    queries = [ds.queries[q] for q in qids]
    phases = [("low", args.low, args.low_requests), ("high", args.high, args.high_requests), ("low again", args.low, args.low_requests)]

    def extract(j: dict[str, Any]) -> dict[str, Any]:
        rr = j["stages"]["rerank"]
        return {"depth": j["funnel"]["rerank_top_m"], "reduced": bool(rr.get("depth_reduced", False)), "ids": [r["id"] for r in j["results"]], "degraded": bool(j.get("degraded"))}

    results: dict[str, Any] = {"phases": [list(x) for x in phases], "bounds": bounds, "timeouts": timeouts, "configs": {}}
    objective = args.slo_ms
    for name in ("fixed", "slo"):
        slo = {"search_p95_ms": objective, "min_rerank_top_m": args.min_depth} if name == "slo" else {}
        app_args = {
            "index_dir": str(index),
            "build_index_if_missing": False,
            "retrievers": ["bm25", "dense"],
            "reranker": {"model": str(model_dir), "max_length": args.max_length, "device": "cpu"},
            "funnel": {"default_rerank_top_m": args.rerank_top_m, "max_rerank_top_m": max(200, args.rerank_top_m)},
            "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.01},
            "timeouts": timeouts,
            "slo": slo,
        }
        deployments = {
            "SearchIngress": {"num_replicas": 1, **bounds.get("SearchIngress", {}), "ray_actor_options": {"num_cpus": 0.25}},
            "BM25Retriever": {"num_replicas": 1, **bounds.get("BM25Retriever", {}), "ray_actor_options": {"num_cpus": 0.25}},
            "DenseRetriever": {"num_replicas": 1, **bounds.get("DenseRetriever", {}), "ray_actor_options": {"num_cpus": 0.25}},
            "CrossEncoderReranker": {"num_replicas": 1, **bounds["CrossEncoderReranker"], "ray_actor_options": {"num_cpus": 2.0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}}}},
        }
        print(f"== {name}" + (f": objective p95 {objective:.0f} ms, floor {args.min_depth}" if name == "slo" else f": depth {args.rerank_top_m}"))
        out = []
        with serve_stack(app_args, deployments, num_cpus=4.0, timeout_s=900) as base:
            url = base + "/search"
            closed_loop(url, [{"query": q, "top_k": 100} for q in queries[-4:]], 1)  # warm-up
            start = 0
            for label, clients, n in phases:
                phase_qids = qids[start : start + n]
                bodies = [{"query": q, "top_k": 100, "top_n": 10} for q in queries[start : start + n]]
                start += n
                res = closed_loop(url, bodies, clients, max_seconds=900, timeout_s=120, extract=extract)
                s = phase_summary(res, phase_qids, ds.qrels)
                s.update(phase=label, clients=clients)
                out.append(s)
                print(f"  {label} ({clients} clients): p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, {s['requests_per_s']:.2f} req/s, 503s {s['status_503']}, 504s {s['status_504']}, mean depth {s['mean_depth']:.1f}, nDCG@10 {s['nDCG@10_all']:.4f}")
        results["configs"][name] = out
        if name == "fixed" and objective is None:
            objective = round(args.slo_factor * out[0]["p95_ms"], -1)
    results["objective_ms"] = objective

    rows = []
    for name, phases_out in results["configs"].items():
        for s in phases_out:
            rows.append((
                name, s["phase"], s["clients"], f"{s['p50_ms']:.0f}", f"{s['p95_ms']:.0f}", "yes" if s["p95_ms"] <= objective else "no", f"{s['requests_per_s']:.2f}",
                s["status_503"], s["status_504"], s["errors"] - s["status_503"] - s["status_504"], s["degraded"], f"{s['mean_depth']:.1f}", s["min_depth"], f"{s['reduced_share']:.2f}",
                f"{s['nDCG@10_answered']:.4f}", f"{s['nDCG@10_all']:.4f}",
            ))
            s.pop("depths")
    failed = {name: sum(s["errors"] + s["degraded"] for s in phases_out) for name, phases_out in results["configs"].items()}
    fixed_high, slo_high = results["configs"]["fixed"][1], results["configs"]["slo"][1]
    targets = [
        target_line("fixed depth sheds, times out or degrades requests under the shipped bounds (503s + 504s + errors + degraded, all phases)", float(failed["fixed"]), 1.0, unit=""),
        target_line("SLO-aware depth meets the objective at the high phase (p95 of the answered / objective)", slo_high["p95_ms"] / objective, 1.0, unit="x", higher_is_better=False),
        target_line("SLO-aware depth sheds, times out or degrades no request (all phases)", float(failed["slo"]), 0.0, unit="", higher_is_better=False),
    ]
    md = run.header_markdown("Fixed vs SLO-aware rerank depth under a step load, against the shipped bounds")
    md += (
        f"/search on SciFact test queries (hybrid top-100), the trained reranker `{model_dir.name}` at max_length {args.max_length} (the service's default runtime), one reranker replica with 2 CPUs; "
        f"requests ask for depth {args.rerank_top_m}. Bounds from `{Path(args.limits).name}`: timeouts {timeouts}; reranker {bounds['CrossEncoderReranker']}; ingress {bounds.get('SearchIngress', {})}. "
        f"Step load: {' -> '.join(f'{c} client(s) x {n} requests' for _, c, n in phases)}. "
        f"Objective p95 {objective:.0f} ms ({'--slo-ms' if args.slo_ms else f'{args.slo_factor} x the fixed run p95 in the first low phase'}), floor {args.min_depth}. "
        f"Fixed depth at the high phase: p95 {fixed_high['p95_ms']:.0f} ms of the answered, {fixed_high['errors']} of {fixed_high['requests']} not answered, {fixed_high['degraded']} answered without the reranker (its stage timed out).\n\n"
    )
    md += md_table(["config", "phase", "clients", "p50 ms", "p95 ms", "meets objective", "requests/s", "503s", "504s", "other errors", "degraded (a stage timed out)", "mean depth", "min depth", "share reduced", "nDCG@10 answered", "nDCG@10 all (unanswered = 0)"], rows)
    run.write(results, md, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
