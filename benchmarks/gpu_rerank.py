"""GPU reranker throughput: pairs/s at fp16 for a MiniLM-L6-sized cross-encoder, 128 and 256 tokens, batch-size sweep.

Command (on a machine with a CUDA GPU)::

    python -m benchmarks.gpu_rerank                          # fp16, lengths 128,256, batch 32..2048
    python -m benchmarks.gpu_rerank --dtype bfloat16 --compile

Check that it runs anywhere (CPU, seconds)::

    python -m benchmarks.gpu_rerank --device cpu --tiny

Two measurements per (length, batch size):

* ``model``: the forward pass alone on pre-built, already-on-device batches of exactly ``length``
  tokens (random token ids): the GPU's ceiling, what the target is about;
* ``scorer`` (``--with-scorer``): ``serve_app.rerank.CrossEncoderScorer.score`` on SciFact-like
  text pairs truncated to ``length`` tokens, tokenisation, padding and host-device copies
  included: what the service gets per replica.

Model: the MiniLM-L6 speed model (``--model``, default built from the packaged all-MiniLM-L6-v2
weights) or, with ``--random-init`` (or when those weights are not installed), a
``BertForSequenceClassification`` with the same shape built from its config (6 layers, hidden 384,
12 heads, intermediate 1536, 512 positions): identical cost. Timing uses CUDA events around
``--iters`` forward passes after ``--warmup`` passes, repeated ``--repeats`` times.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import RESULTS_ROOT, BenchRun, base_parser, fmt_spread, md_table, summarize, target_line

MINILM_L6 = dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512, vocab_size=30522, num_labels=1)


def build_model(args: Any, device: str, dtype: Any) -> Any:
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if not args.random_init:
        try:
            from benchmarks.common import speed_model_dir

            model = AutoModelForSequenceClassification.from_pretrained(str(speed_model_dir(args.model)), dtype=dtype)
            return model.to(device=device, dtype=dtype).eval(), "MiniLM-L6 speed model (packaged all-MiniLM-L6-v2 weights)"
        except (SystemExit, OSError, ImportError) as exc:
            print(f"speed model unavailable ({exc}); using a randomly initialised model of the same shape")
    model = BertForSequenceClassification(BertConfig(**MINILM_L6))
    return model.to(device=device, dtype=dtype).eval(), "random-init BertForSequenceClassification, MiniLM-L6 shape"


def time_model(model: Any, device: str, length: int, batch: int, iters: int, warmup: int, repeats: int) -> dict[str, float]:
    """pairs/s of forward passes on a fixed (batch, length) input."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    types[:, length // 4 :] = 1
    rates = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    model(input_ids=ids, attention_mask=mask, token_type_ids=types)
                end.record()
                torch.cuda.synchronize()
                seconds = start.elapsed_time(end) / 1000.0
            else:
                t = time.perf_counter()
                for _ in range(iters):
                    model(input_ids=ids, attention_mask=mask, token_type_ids=types)
                seconds = time.perf_counter() - t
            rates.append(batch * iters / seconds)
    return summarize(rates)


def time_scorer(args: Any, device: str, length: int, batch: int, pairs: list[tuple[str, str]], repeats: int) -> dict[str, float]:
    """pairs/s of CrossEncoderScorer.score (tokenisation and padding included)."""
    from benchmarks.common import speed_model_dir
    from serve_app.config import CrossEncoderConfig
    from serve_app.rerank import CrossEncoderScorer

    cfg = CrossEncoderConfig(model=str(speed_model_dir(args.model)), max_length=length, max_batch_pairs=batch, max_batch_tokens=batch * length, dtype=args.dtype if device.startswith("cuda") else "float32", device=device)
    scorer = CrossEncoderScorer(cfg)
    scorer.score(pairs[: min(len(pairs), batch)])
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        scorer.score(pairs)
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        rates.append(len(pairs) / (time.perf_counter() - t))
    return summarize(rates)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="torch device (cuda, cuda:1, cpu)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None, help="compute dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--lengths", default="128,256", help="tokens per pair")
    p.add_argument("--batch-sizes", default="32,64,128,256,512,1024,2048", help="pairs per forward pass")
    p.add_argument("--iters", type=int, default=20, help="timed forward passes per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed forward passes first")
    p.add_argument("--model", default=None, help="cross-encoder directory (default: the MiniLM-L6 speed model)")
    p.add_argument("--random-init", action="store_true", help="use a randomly initialised model of the MiniLM-L6 shape")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--with-scorer", action="store_true", help="also time CrossEncoderScorer.score on SciFact pairs")
    p.add_argument("--scorer-pairs", type=int, default=8192, help="pairs per CrossEncoderScorer.score call")
    p.add_argument("--tiny", action="store_true", help="a seconds-long check: lengths 16,32, batches 2,4, 2 iterations")
    args = p.parse_args(argv)
    if args.tiny:
        args.lengths, args.batch_sizes, args.iters, args.warmup, args.repeats, args.scorer_pairs = "16,32", "2,4", 2, 1, 2, 16
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch: run on a GPU machine, or pass --device cpu (with --tiny for a quick check)")
    if args.dtype is None:
        args.dtype = "float16" if device.startswith("cuda") else "float32"
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    out = args.out or (RESULTS_ROOT / "gpu_rerank" / ("cpu-check" if not device.startswith("cuda") else ""))
    run = BenchRun("gpu_rerank", args, out)

    model, model_desc = build_model(args, device, dtype)
    if args.compile:
        model = torch.compile(model)
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batch_sizes.split(",")]
    results: dict[str, Any] = {"device": device, "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu", "dtype": str(dtype), "model": model_desc, "compile": args.compile, "model_only": {}, "scorer": {}}
    for length in lengths:
        results["model_only"][str(length)] = {}
        for b in batches:
            try:
                r = time_model(model, device, length, b, args.iters, args.warmup, args.repeats)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"length {length} batch {b}: out of memory")
                continue
            results["model_only"][str(length)][str(b)] = r
            print(f"length {length} batch {b}: {r['median']:.0f} pairs/s")
    if args.with_scorer:
        from benchmarks.common import bm25_candidates, load_scifact

        cands = bm25_candidates(load_scifact(), None, 100)
        pairs = [(q, d) for q, docs in cands for d in docs][: args.scorer_pairs]
        for length in lengths:
            b = max(results["model_only"][str(length)], key=lambda k: results["model_only"][str(length)][k]["median"])
            results["scorer"][str(length)] = {"batch": int(b), "pairs_per_s": time_scorer(args, device, length, int(b), pairs, args.repeats)}
            print(f"scorer length {length} batch {b}: {results['scorer'][str(length)]['pairs_per_s']['median']:.0f} pairs/s")

    best = {L: max((v["median"] for v in results["model_only"][str(L)].values()), default=None) for L in lengths}
    results["best_pairs_per_s"] = best
    on_h100 = "H100" in results["device_name"]
    targets = []
    if 256 in best:
        targets.append(target_line(f"pairs/s at 256 tokens, {args.dtype} on {results['device_name']}" + ("" if on_h100 else " (target is for an H100: not measured there)"), best[256] if on_h100 else None, 20000, "pairs/s"))

    rows = [(L, b, fmt_spread(r, 0)) for L, per in results["model_only"].items() for b, r in per.items()]
    md = run.header_markdown("GPU reranker throughput (MiniLM-L6 cross-encoder)")
    md += f"Device: {results['device_name']}, dtype {dtype}, model: {model_desc}{', torch.compile' if args.compile else ''}. Forward passes only on fixed-length batches; pairs/s median [min-max] over {args.repeats} repeats of {args.iters} passes.\n\n"
    if not device.startswith("cuda"):
        md += "**This is a CPU check that the script runs (`--device cpu`), not the GPU figure: the GPU target was not measured.**\n\n"
    md += md_table(["tokens", "batch", "pairs/s"], rows)
    if results["scorer"]:
        md += "\nCrossEncoderScorer.score (tokenisation, padding, copies included):\n\n" + md_table(["tokens", "batch", "pairs/s"], [(L, r["batch"], fmt_spread(r["pairs_per_s"], 0)) for L, r in results["scorer"].items()])
    run.write(results, md, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
