"""Reranker on a CPU: the same model and batches on every runtime and precision serve_app offers.

Command::

    python -m benchmarks.cpu_runtimes --model $BENCH_CACHE/scifact-reranker      # the fine-tuned SciFact cross-encoder
    python -m benchmarks.cpu_runtimes --decoder --queries 2 --depth 8           # Qwen3-Reranker-0.6B's shape, random weights

Why: on a CPU every server in ``rerank_peers`` runs at the model's speed, so beating another
server by a wide margin needs less work per pair, not less serving overhead. This measures
what each of serve_app's runtimes gives on this machine, on identical inputs: SciFact test
queries with their BM25 top-``--depth`` documents, tokenised once by the model's encoder (the
scorer's own ``pairs.features``: only documents are cut) and cut into the service's
length-sorted token-budget batches (``plan_batches``). Rows are the scorers that
``serve_app.rerank.load_scorer`` builds for ``reranker.backend`` / ``dtype`` / ``quantize``:

* ``torch-float32``: the reference; ``torch-bfloat16``: ``dtype: bfloat16`` (fast on CPUs with
  AVX512-BF16 or AMX, slower elsewhere);
* ``onnx-float32`` / ``onnx-int8``: ``backend: onnx`` (the score module's ONNX export, run by
  ONNX Runtime with all graph optimisations), ``quantize: int8`` (dynamic int8 weights);
* ``openvino-float32`` / ``openvino-bfloat16``: ``backend: openvino`` on the same export;
* ``torch-int8-dynamic`` (not a serve_app runtime, kept for comparison with earlier runs):
  ``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear``.

Reported per runtime: pairs/s (median [min-max] over interleaved repeats, the runtime's batch
calls only), pairs per CPU-second, the largest absolute score difference to ``torch-float32``,
how rankings move (the mean Kendall tau of each query's document order against
``torch-float32``, the share of queries whose top document stays the same), and the drift the
load-time check measured on its fixed probe (``reranker.drift_check``), to see whether the probe
tells what the workload sees. Use a trained reranker (``--model``) for the ranking figures: a
random head's near-equal scores make any numerical change reorder documents.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.common import NO_DRIFT_TOLERANCE, RERANKER_RUNTIMES, BenchRun, base_parser, bm25_candidates, decoder_model_dir, fmt_spread, load_scifact, md_table, measure, set_threads, speed_model_dir, summarize

REFERENCE = "torch-float32"


def ranking_agreement(ref: np.ndarray, other: np.ndarray, groups: list[list[int]]) -> tuple[float, float]:
    """(mean Kendall tau of each group's order, share of groups whose top item is unchanged)."""
    from serve_app.rerank.drift import kendall_tau

    taus, same_top = [], []
    for g in groups:
        taus.append(kendall_tau(ref[g], other[g]))
        same_top.append(int(np.argmax(ref[g])) == int(np.argmax(other[g])))
    return float(np.mean(taus)), float(np.mean(same_top))


def batch_runner(runtime: Callable[[dict[str, Any]], np.ndarray], padded: list[dict[str, Any]], batches: list[list[int]], n: int) -> Callable[[], np.ndarray]:
    """Scores of every pair, batch by batch, on one runtime (the same padded batches for all)."""

    def run() -> np.ndarray:
        out = np.empty(n, dtype=np.float32)
        for b, enc in zip(batches, padded):
            out[b] = np.asarray(runtime(enc), dtype=np.float32).reshape(-1)
        return out

    return run


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from serve_app.config import CrossEncoderConfig
    from serve_app.rerank import load_scorer
    from serve_app.rerank.batching import plan_batches
    from serve_app.rerank.runtimes import TorchRuntime

    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--scifact", default=None, help="SciFact BEIR directory")
    p.add_argument("--model", default=None, help="reranker directory, any family (default: the MiniLM-L6 speed model; pass a trained one for meaningful ranking agreement)")
    p.add_argument("--decoder", action="store_true", help="a decoder reranker of Qwen3-Reranker-0.6B's shape with random weights (speed only) instead of --model")
    p.add_argument("--queries", type=int, default=8, help="SciFact test queries")
    p.add_argument("--depth", type=int, default=20, help="BM25 documents per query")
    p.add_argument("--max-length", type=int, default=512, help="tokens per pair")
    p.add_argument("--threads", type=int, default=None, help="torch, ONNX Runtime and OpenVINO threads (default: torch's)")
    p.add_argument("--runtimes", default=",".join(RERANKER_RUNTIMES) + ",torch-int8-dynamic", help="rows to run")
    p.set_defaults(repeats=3)
    args = p.parse_args(argv)
    set_threads(args.threads)
    threads = torch.get_num_threads()
    run = BenchRun("cpu_runtimes", args, args.out)
    wanted = args.runtimes.split(",")

    model_dir = decoder_model_dir() if args.decoder else speed_model_dir(args.model)
    cands = bm25_candidates(load_scifact(args.scifact), args.queries, args.depth)
    pairs = [(q, d) for q, docs in cands for d in docs]
    groups, start = [], 0
    for _, docs in cands:
        groups.append(list(range(start, start + len(docs))))
        start += len(docs)

    runners: dict[str, Callable[[], np.ndarray]] = {}
    probe_drift: dict[str, Any] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(model=str(model_dir), max_length=args.max_length, device="cpu", runtime_dir=f"{tmp}/export", drift_tolerance=NO_DRIFT_TOLERANCE)
        ref_scorer = load_scorer(CrossEncoderConfig(**base, dtype="float32"))
        features = ref_scorer.pairs.features(pairs, ref_scorer.pairs.limits(len(pairs), None))
        lengths = [len(f["input_ids"]) for f in features]
        batches = plan_batches(lengths, ref_scorer.cfg.max_batch_tokens, ref_scorer.cfg.max_batch_pairs)
        padded = [ref_scorer.pairs.pad([features[i] for i in b]) for b in batches]
        print(f"{ref_scorer.kind} reranker {model_dir}: {len(pairs)} pairs in {len(batches)} token-budget batches, tokens mean {np.mean(lengths):.0f}, max {max(lengths)}; {threads} threads")
        for name, settings in RERANKER_RUNTIMES.items():
            if name not in wanted:
                continue
            try:
                scorer = ref_scorer if name == REFERENCE else load_scorer(CrossEncoderConfig(**base, **settings))
            except Exception as exc:  # noqa: BLE001 - a runtime this machine lacks is reported, not fatal
                notes.append(f"{name}: not run ({type(exc).__name__}: {exc})")
                print(notes[-1])
                continue
            runners[name] = batch_runner(scorer.runtime, padded, batches, len(pairs))
            probe_drift[name] = scorer.runtime_info.get("drift")
        if "torch-int8-dynamic" in wanted and ref_scorer.module is not None:
            quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(ref_scorer.module), {torch.nn.Linear}, dtype=torch.qint8)
            runners["torch-int8-dynamic"] = batch_runner(TorchRuntime(quantized, "cpu"), padded, batches, len(pairs))
        for r in runners.values():  # warm-up (first-call allocations, kernel selection)
            r()
        times: dict[str, list[float]] = {n: [] for n in runners}
        cpu: dict[str, list[float]] = {n: [] for n in runners}
        scores: dict[str, np.ndarray] = {}
        for rep in range(args.repeats):
            order = list(runners) if rep % 2 == 0 else list(reversed(runners))
            for name in order:
                m = measure(runners[name])
                scores[name] = m.value
                times[name].append(m.wall)
                cpu[name].append(m.cpu)
            print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{n} {len(pairs) / times[n][-1]:.1f}" for n in runners) + " pairs/s")

    ref = scores[REFERENCE]
    results: dict[str, Any] = {"pairs": len(pairs), "queries": len(cands), "depth": args.depth, "model": str(model_dir), "kind": ref_scorer.kind, "threads": threads, "forward_passes": len(batches), "runtimes": {}}
    for name in runners:
        tau, top = ranking_agreement(ref, scores[name], groups)
        results["runtimes"][name] = {
            "pairs_per_s": summarize(len(pairs) / t for t in times[name]),
            "pairs_per_cpu_s": summarize(len(pairs) / c for c in cpu[name]),
            "max_abs_score_diff": float(np.max(np.abs(scores[name] - ref))),
            "mean_kendall_tau": tau,
            "same_top1_share": top,
            "load_time_probe_drift": probe_drift.get(name),
        }
    base_rate = results["runtimes"][REFERENCE]["pairs_per_s"]["median"]
    base_cpu = results["runtimes"][REFERENCE]["pairs_per_cpu_s"]["median"]
    rows = []
    for name, r in results["runtimes"].items():
        r["speedup"] = r["pairs_per_s"]["median"] / base_rate
        r["cpu_speedup"] = r["pairs_per_cpu_s"]["median"] / base_cpu
        d = r["load_time_probe_drift"]
        probe = f"{d['max_abs_diff']:.1e} / {d['kendall_tau']:.3f} / {d['top1_agreement']:.2f}" if d else "-"
        rows.append((name, fmt_spread(r["pairs_per_s"]), f"{r['speedup']:.2f}x", fmt_spread(r["pairs_per_cpu_s"], 2), f"{r['cpu_speedup']:.2f}x", f"{r['max_abs_score_diff']:.1e}", f"{r['mean_kendall_tau']:.3f}", f"{r['same_top1_share']:.2f}", probe))

    md = run.header_markdown("Reranker runtimes and precisions on a CPU")
    md += (
        f"Model: {model_dir} ({ref_scorer.kind}); {len(pairs)} pairs = {len(cands)} SciFact test queries x BM25 top-{args.depth}; tokens per pair mean {np.mean(lengths):.0f}, "
        f"max {max(lengths)} (max_length {args.max_length}); {len(batches)} length-sorted token-budget batches (max_batch_tokens {ref_scorer.cfg.max_batch_tokens}), the same for every runtime; "
        f"{threads} threads; torch {torch.__version__}. pairs/s: median [min-max] over {args.repeats} interleaved repeats of the runtime's batch calls. "
        f"Kendall tau and top-1: each query's document order against {REFERENCE}. Probe drift: what the load-time drift check measured on its fixed 32 pairs (max |diff| / tau / top-1).\n\n"
    )
    md += md_table(["runtime", "pairs/s", f"vs {REFERENCE}", "pairs per CPU-s", "vs (CPU)", f"max |score diff| vs {REFERENCE}", "mean Kendall tau", "same top-1", "probe drift at load"], rows)
    for note in notes:
        md += f"\n{note}\n"
    results["notes"] = notes
    run.write(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
