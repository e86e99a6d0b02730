"""Cross-encoder on a CPU: the same model and batches under other runtimes and precisions.

Command::

    python -m benchmarks.cpu_runtimes                                   # 8 SciFact queries x BM25 top-20
    python -m benchmarks.cpu_runtimes --model /path/to/fine-tuned-cross-encoder --queries 20

Why: on a CPU every server in ``rerank_peers`` runs at the model's speed, so beating another
server by a wide margin needs less work per pair, not less serving overhead. This measures
what the alternatives give on this machine, on identical inputs: SciFact test queries with
their BM25 top-``--depth`` documents, tokenised once (``truncation="only_second"``, the
scorer's rule) and cut into the service's length-sorted token-budget batches
(``serve_app.rerank.batching.plan_batches``). Runtimes:

* ``torch-fp32``: the model as the service loads it (``dtype: float32``), the reference;
* ``torch-bf16``: the same weights in bfloat16 (``reranker.dtype: bfloat16``, which the
  service honours on CPUs too);
* ``torch-int8-dynamic``: ``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear``
  (int8 weights, activations quantised per batch);
* ``onnxruntime-fp32``: the model exported to ONNX (``torch.onnx.export``), run by ONNX Runtime's
  CPU provider with all graph optimisations; ``onnxruntime-fp32-fused``: the same after
  ``onnxruntime.transformers.optimizer`` (fused attention, LayerNorm, GELU). Both only when
  ``onnxruntime`` is installed.

Reported per runtime: pairs/s (median [min-max] over interleaved repeats, forward passes only),
pairs per CPU-second, the largest absolute score difference to ``torch-fp32`` and how rankings
move: the mean Kendall tau of each query's document order against ``torch-fp32``, and the share
of queries whose top document stays the same. Use a trained cross-encoder (``--model``) for the
ranking figures: the default speed model has a random head, whose near-equal scores make any
numerical change reorder documents.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.common import BenchRun, base_parser, bm25_candidates, fmt_spread, load_scifact, md_table, measure, pair_features, set_threads, speed_model_dir, summarize

REFERENCE = "torch-fp32"
ORT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def torch_runner(model: Any, tokenizer: Any, features: list[dict[str, list[int]]], batches: list[list[int]]) -> Callable[[], np.ndarray]:
    """Scores of every pair, batch by batch, with a torch model (any dtype; scores as float32)."""
    import torch

    padded = [tokenizer.pad([features[i] for i in b], padding=True, return_tensors="pt") for b in batches]

    def run() -> np.ndarray:
        out = np.empty(len(features), dtype=np.float32)
        with torch.inference_mode():
            for b, enc in zip(batches, padded):
                out[b] = model(**enc).logits[:, 0].float().numpy()
        return out

    return run


def onnx_runners(model: Any, tokenizer: Any, features: list[dict[str, list[int]]], batches: list[list[int]], workdir: Path, threads: int) -> dict[str, Callable[[], np.ndarray]]:
    """ONNX Runtime runners (plain export, and after the BERT fusion pass); {} without onnxruntime."""
    try:
        import onnxruntime as ort
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError:
        return {}
    import torch

    padded = [tokenizer.pad([features[i] for i in b], padding=True, return_tensors="np") for b in batches]
    names = [k for k in ORT_INPUTS if k in padded[0]]
    sample = tokenizer.pad(features[:2], padding=True, return_tensors="pt")
    plain = workdir / "model.onnx"
    axes = {k: {0: "batch", 1: "sequence"} for k in names}
    torch.onnx.export(model, tuple(sample[k] for k in names), str(plain), input_names=names, output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    fused = workdir / "model.fused.onnx"
    cfg = model.config
    optimize_model(str(plain), model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size).save_model_to_file(str(fused))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    runners = {}
    for name, path in (("onnxruntime-fp32", plain), ("onnxruntime-fp32-fused", fused)):
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def run(session: Any = session) -> np.ndarray:
            out = np.empty(len(features), dtype=np.float32)
            for b, enc in zip(batches, padded):
                out[b] = session.run(None, {k: enc[k].astype(np.int64) for k in names})[0][:, 0]
            return out

        runners[name] = run
    return runners


def ranking_agreement(ref: np.ndarray, other: np.ndarray, groups: list[list[int]]) -> tuple[float, float]:
    """(mean Kendall tau of each group's order, share of groups whose top item is unchanged)."""
    from scipy.stats import kendalltau

    taus, same_top = [], []
    for g in groups:
        taus.append(float(kendalltau(ref[g], other[g]).statistic))
        same_top.append(int(np.argmax(ref[g])) == int(np.argmax(other[g])))
    return float(np.mean(taus)), float(np.mean(same_top))


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from serve_app.config import CrossEncoderConfig
    from serve_app.rerank import CrossEncoderScorer
    from serve_app.rerank.batching import plan_batches

    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--scifact", default=None, help="SciFact BEIR directory")
    p.add_argument("--model", default=None, help="cross-encoder directory (default: the MiniLM-L6 speed model; pass a trained one for meaningful ranking agreement)")
    p.add_argument("--queries", type=int, default=8, help="SciFact test queries")
    p.add_argument("--depth", type=int, default=20, help="BM25 documents per query")
    p.add_argument("--max-length", type=int, default=512, help="tokens per pair")
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)")
    p.add_argument("--skip-onnx", action="store_true", help="leave out the ONNX Runtime rows")
    p.set_defaults(repeats=3)
    args = p.parse_args(argv)
    set_threads(args.threads)
    threads = torch.get_num_threads()
    run = BenchRun("cpu_runtimes", args, args.out)

    model_dir = speed_model_dir(args.model)
    cands = bm25_candidates(load_scifact(args.scifact), args.queries, args.depth)
    pairs = [(q, d) for q, docs in cands for d in docs]
    groups, start = [], 0
    for _, docs in cands:
        groups.append(list(range(start, start + len(docs))))
        start += len(docs)
    cfg = CrossEncoderConfig(model=str(model_dir), max_length=args.max_length, device="cpu", dtype="float32")
    scorer = CrossEncoderScorer(cfg)
    tok, model = scorer.tokenizer, scorer.model
    features, lengths = pair_features(tok, pairs, scorer.max_length)
    batches = plan_batches(lengths, cfg.max_batch_tokens, cfg.max_batch_pairs)
    print(f"{len(pairs)} pairs in {len(batches)} token-budget batches, tokens mean {np.mean(lengths):.0f}, max {max(lengths)}; {threads} threads")

    runners: dict[str, Callable[[], np.ndarray]] = {REFERENCE: torch_runner(model, tok, features, batches)}
    runners["torch-bf16"] = torch_runner(copy.deepcopy(model).to(torch.bfloat16), tok, features, batches)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    runners["torch-int8-dynamic"] = torch_runner(quantized, tok, features, batches)
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_onnx:
            ort_runners = onnx_runners(model, tok, features, batches, Path(tmp), threads)
            runners.update(ort_runners)
            if not ort_runners:
                notes.append("onnxruntime is not installed: no ONNX Runtime rows (`pip install onnxruntime onnxscript`).")
        for r in runners.values():  # warm-up (first-call allocations, oneDNN kernel selection)
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
    results: dict[str, Any] = {"pairs": len(pairs), "queries": len(cands), "depth": args.depth, "model": str(model_dir), "threads": threads, "forward_passes": len(batches), "runtimes": {}}
    for name in runners:
        tau, top = ranking_agreement(ref, scores[name], groups)
        results["runtimes"][name] = {
            "pairs_per_s": summarize(len(pairs) / t for t in times[name]),
            "pairs_per_cpu_s": summarize(len(pairs) / c for c in cpu[name]),
            "max_abs_score_diff": float(np.max(np.abs(scores[name] - ref))),
            "mean_kendall_tau": tau,
            "same_top1_share": top,
        }
    base_rate = results["runtimes"][REFERENCE]["pairs_per_s"]["median"]
    base_cpu = results["runtimes"][REFERENCE]["pairs_per_cpu_s"]["median"]
    rows = []
    for name, r in results["runtimes"].items():
        r["speedup"] = r["pairs_per_s"]["median"] / base_rate
        r["cpu_speedup"] = r["pairs_per_cpu_s"]["median"] / base_cpu
        rows.append((name, fmt_spread(r["pairs_per_s"]), f"{r['speedup']:.2f}x", fmt_spread(r["pairs_per_cpu_s"], 2), f"{r['cpu_speedup']:.2f}x", f"{r['max_abs_score_diff']:.1e}", f"{r['mean_kendall_tau']:.3f}", f"{r['same_top1_share']:.2f}"))

    md = run.header_markdown("Cross-encoder runtimes and precisions on a CPU")
    md += (
        f"Model: {model_dir}; {len(pairs)} pairs = {len(cands)} SciFact test queries x BM25 top-{args.depth}; tokens per pair mean {np.mean(lengths):.0f}, "
        f"max {max(lengths)} (max_length {args.max_length}); {len(batches)} length-sorted token-budget batches (max_batch_tokens {cfg.max_batch_tokens}), the same for every runtime; "
        f"{threads} threads; torch {torch.__version__}. pairs/s: median [min-max] over {args.repeats} interleaved repeats, forward passes only. "
        f"Kendall tau and top-1: each query's document order against {REFERENCE}.\n\n"
    )
    md += md_table(["runtime", "pairs/s", f"vs {REFERENCE}", "pairs per CPU-s", "vs (CPU)", f"max |score diff| vs {REFERENCE}", "mean Kendall tau", "same top-1"], rows)
    for note in notes:
        md += f"\n{note}\n"
    run.write(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
