"""GPU reranker throughput: pairs/s for a MiniLM-L6-sized cross-encoder (and, with --decoder, a Qwen3-Reranker-0.6B-shaped decoder reranker), batch-size sweep.

Command (on a machine with a CUDA GPU)::

    python -m benchmarks.gpu_rerank                          # fp16, lengths 128,256, batch 32..2048
    python -m benchmarks.gpu_rerank --dtype bfloat16 --compile
    python -m benchmarks.gpu_rerank --dtype bfloat16 --lengths 128,256,512 --decoder   # both families

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

``--decoder`` adds a decoder reranker of Qwen3-Reranker-0.6B's published shape (28 layers,
hidden 1024, 16 query / 8 key-value heads, vocabulary 151,669) with random weights, built from
its config on the device: the same cost per token as the real model. What is timed is
serve_app's own score module for decoder rerankers (the decoder without its LM head, the last
real token's hidden state projected on the two answer tokens), on batches of ``--decoder-batch-sizes``.
"""

from __future__ import annotations

import time
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


def build_decoder(args: Any, device: str, dtype: Any) -> tuple[Any, str]:
    """serve_app's decoder score module over a random Qwen3 decoder of Qwen3-Reranker-0.6B's shape
    (``--tiny``: 2 layers, hidden 32)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from benchmarks.common import QWEN3_RERANKER_0_6B
    from serve_app.rerank.causal_lm import _last_token_score_class

    shape = dict(QWEN3_RERANKER_0_6B)
    desc = "random-init Qwen3ForCausalLM, Qwen3-Reranker-0.6B shape (28 layers, hidden 1024)"
    if args.tiny:
        shape.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=1000)
        desc = "random-init Qwen3ForCausalLM, tiny shape (check only)"
    torch.manual_seed(0)
    with torch.device(device):
        lm = Qwen3ForCausalLM(Qwen3Config(**shape)).to(dtype=dtype).eval()
    head = lm.get_output_embeddings().weight
    module = _last_token_score_class()(lm.get_decoder(), head[[0, 1]], None, None)
    return module.eval(), desc


def time_model(model: Any, device: str, length: int, batch: int, iters: int, warmup: int, repeats: int, decoder: bool = False) -> dict[str, float]:
    """pairs/s of forward passes on a fixed (batch, length) input."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(1, 1000 if decoder else 30000, (batch, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if not decoder:
        types = torch.zeros_like(ids)
        types[:, length // 4 :] = 1
        inputs["token_type_ids"] = types
    rates = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(**inputs)
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    model(**inputs)
                end.record()
                torch.cuda.synchronize()
                seconds = start.elapsed_time(end) / 1000.0
            else:
                t = time.perf_counter()
                for _ in range(iters):
                    model(**inputs)
                seconds = time.perf_counter() - t
            rates.append(batch * iters / seconds)
    return summarize(rates)


def sweep(model: Any, device: str, lengths: list[int], batches: list[int], args: Any, decoder: bool = False) -> dict[str, dict[str, Any]]:
    """pairs/s by length and batch size (out-of-memory sizes left out)."""
    import torch

    out: dict[str, dict[str, Any]] = {}
    for length in lengths:
        out[str(length)] = {}
        for b in batches:
            try:
                r = time_model(model, device, length, b, args.iters, args.warmup, args.repeats, decoder)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f"{'decoder ' if decoder else ''}length {length} batch {b}: out of memory")
                continue
            out[str(length)][str(b)] = r
            print(f"{'decoder ' if decoder else ''}length {length} batch {b}: {r['median']:.0f} pairs/s")
    return out


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
    p.add_argument("--decoder", action="store_true", help="also time a decoder reranker of Qwen3-Reranker-0.6B's shape (random weights)")
    p.add_argument("--decoder-batch-sizes", default="8,16,32,64,128,256", help="prompts per forward pass of the decoder")
    p.add_argument("--tiny", action="store_true", help="a seconds-long check: lengths 16,32, batches 2,4, 2 iterations")
    args = p.parse_args(argv)
    if args.tiny:
        args.lengths, args.batch_sizes, args.decoder_batch_sizes, args.iters, args.warmup, args.repeats, args.scorer_pairs = "16,32", "2,4", "2,4", 2, 1, 2, 16
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
    results["model_only"] = sweep(model, device, lengths, batches, args)
    if args.decoder:
        del model
        decoder, decoder_desc = build_decoder(args, device, dtype)
        if args.compile:
            decoder = torch.compile(decoder)
        results["decoder"] = {"model": decoder_desc, "model_only": sweep(decoder, device, lengths, [int(x) for x in args.decoder_batch_sizes.split(",")], args, decoder=True)}
        del decoder
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
    if "decoder" in results:
        d = results["decoder"]
        md += f"\nDecoder reranker ({d['model']}), serve_app's score module, {dtype}:\n\n"
        md += md_table(["tokens", "batch", "prompts/s"], [(L, b, fmt_spread(r, 0)) for L, per in d["model_only"].items() for b, r in per.items()])
        d["best_pairs_per_s"] = {L: max((v["median"] for v in per.values()), default=None) for L, per in d["model_only"].items()}
    if results["scorer"]:
        md += "\nCrossEncoderScorer.score (tokenisation, padding, copies included):\n\n" + md_table(["tokens", "batch", "pairs/s"], [(L, r["batch"], fmt_spread(r["pairs_per_s"], 0)) for L, r in results["scorer"].items()])
    run.write(results, md, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
