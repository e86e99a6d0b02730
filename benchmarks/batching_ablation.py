"""Padding and batching ablation of the cross-encoder: length-sorted token-budget batches vs naive ones.

Command::

    python -m benchmarks.batching_ablation                       # 2 SciFact queries x BM25 top-100
    python -m benchmarks.batching_ablation --queries 10 --batch-sizes 8,16,32,64 --repeats 5

The same (query, document) pairs (SciFact test queries with their BM25 top-``--depth``
documents, so lengths vary naturally) are tokenised once (``truncation="only_second"``, the
serve_app scorer's rule) and scored with the same model under each batching strategy:

* ``naive-B``: consecutive slices of B pairs in input order, each padded to its longest pair
  (a plain transformers loop);
* ``sorted-B``: the same fixed size B after sorting by length (isolates the effect of sorting);
* ``token-budget``: ``serve_app.rerank.batching.plan_batches`` (length-sorted, at most
  ``--max-batch-tokens`` padded tokens and ``--max-batch-pairs`` pairs per batch), the
  service's strategy;
* ``CrossEncoder.predict``: sentence-transformers itself (``batch_size`` = the first of
  ``--batch-sizes``); since sentence-transformers 6 it sorts the pairs of one call by character
  length, so it is a ``sorted-B`` with tokenisation included. Its padded fraction is computed
  from our token lengths in its order.

Reported per strategy: pairs/s (median [min-max] of the repeats, forward passes only; the
strategies are interleaved within each repeat so machine noise hits them alike), the padded
token fraction, the number of forward passes, and the whole ``CrossEncoderScorer.score`` call
(tokenisation included) for reference.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from benchmarks.common import BenchRun, base_parser, bm25_candidates, fmt_spread, load_scifact, md_table, measure, pair_features, set_threads, speed_model_dir, summarize

STRATEGIES = ("naive", "sorted", "token-budget")


def make_batches(strategy: str, lengths: list[int], batch_size: int, max_tokens: int, max_pairs: int) -> list[list[int]]:
    from serve_app.rerank.batching import naive_batches, plan_batches

    if strategy == "naive":
        return naive_batches(len(lengths), batch_size)
    if strategy == "sorted":
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    return plan_batches(lengths, max_tokens, max_pairs)


def run_batches(model: Any, tokenizer: Any, features: list[dict[str, list[int]]], batches: list[list[int]]) -> np.ndarray:
    import torch

    out = np.empty(len(features), dtype=np.float32)
    with torch.inference_mode():
        for b in batches:
            enc = tokenizer.pad([features[i] for i in b], padding=True, return_tensors="pt")
            out[b] = model(**enc).logits[:, 0].float().numpy()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from serve_app.config import CrossEncoderConfig
    from serve_app.rerank import CrossEncoderScorer
    from serve_app.rerank.batching import padded_token_fraction

    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--scifact", default=None, help="SciFact BEIR directory")
    p.add_argument("--model", default=None, help="cross-encoder directory (default: the MiniLM-L6 speed model in $BENCH_CACHE/minilm-ce, built if missing)")
    p.add_argument("--queries", type=int, default=2, help="SciFact test queries")
    p.add_argument("--depth", type=int, default=100, help="BM25 documents per query")
    p.add_argument("--max-length", type=int, default=512, help="tokens per pair")
    p.add_argument("--batch-sizes", default="32", help="fixed batch sizes of the naive and sorted strategies (32: CrossEncoder.predict's default)")
    p.add_argument("--max-batch-tokens", type=int, default=CrossEncoderConfig().max_batch_tokens, help="token budget of plan_batches")
    p.add_argument("--max-batch-pairs", type=int, default=CrossEncoderConfig().max_batch_pairs, help="pair cap of plan_batches")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(repeats=2)
    args = p.parse_args(argv)
    set_threads(args.threads)
    run = BenchRun("batching_ablation", args, args.out)

    model_dir = speed_model_dir(args.model)
    cands = bm25_candidates(load_scifact(args.scifact), args.queries, args.depth)
    pairs = [(q, d) for q, docs in cands for d in docs]
    cfg = CrossEncoderConfig(model=str(model_dir), max_length=args.max_length, max_batch_tokens=args.max_batch_tokens, max_batch_pairs=args.max_batch_pairs, device="cpu")
    scorer = CrossEncoderScorer(cfg)
    tok, model = scorer.tokenizer, scorer.model
    features, lengths = pair_features(tok, pairs, scorer.max_length)
    print(f"{len(pairs)} pairs, tokens mean {np.mean(lengths):.0f}, max {max(lengths)}; torch threads {__import__('torch').get_num_threads()}")

    plans: dict[str, list[list[int]]] = {}
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        plans[f"naive-{bs}"] = make_batches("naive", lengths, bs, 0, 0)
        plans[f"sorted-{bs}"] = make_batches("sorted", lengths, bs, 0, 0)
    plans["token-budget"] = make_batches("token-budget", lengths, 0, args.max_batch_tokens, args.max_batch_pairs)
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(model_dir), device="cpu", max_length=scorer.max_length)
    ce_bs = int(args.batch_sizes.split(",")[0])
    char_len = getattr(ce, "_input_length", lambda pair: sum(len(t) for t in pair))
    ce_order = [int(i) for i in np.argsort([-char_len(p) for p in pairs], kind="stable")]
    ce_plan = [ce_order[s : s + ce_bs] for s in range(0, len(ce_order), ce_bs)]
    identity = __import__("torch").nn.Identity()

    run_batches(model, tok, features, plans["naive-" + args.batch_sizes.split(",")[0]][:2])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in plans}
    cpu: dict[str, list[float]] = {name: [] for name in [*plans, "scorer.score", "CrossEncoder.predict"]}
    times["scorer.score"] = []
    times["CrossEncoder.predict"] = []
    scores: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        calls = {name: (lambda b=batches: run_batches(model, tok, features, b)) for name, batches in plans.items()}
        calls["scorer.score"] = lambda: scorer.score(pairs)
        calls["CrossEncoder.predict"] = lambda: np.asarray(ce.predict(pairs, batch_size=ce_bs, activation_fn=identity, show_progress_bar=False), dtype=np.float32)
        for name, call in calls.items():
            m = measure(call)
            scores[name] = m.value
            times[name].append(m.wall)
            cpu[name].append(m.cpu)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {len(pairs) / v[-1]:.1f} ({len(pairs) / cpu[n][-1]:.1f}/CPU-s)" for n, v in times.items()) + " pairs/s")

    base = scores["naive-" + args.batch_sizes.split(",")[0]]
    results: dict[str, Any] = {"pairs": len(pairs), "queries": len(cands), "depth": args.depth, "mean_tokens": float(np.mean(lengths)), "max_tokens": int(max(lengths)), "model": str(model_dir), "strategies": {}}
    naive_key = "naive-" + args.batch_sizes.split(",")[-1]
    for name, ts in times.items():
        batches = ce_plan if name == "CrossEncoder.predict" else plans.get(name, plans["token-budget"])
        results["strategies"][name] = {
            "pairs_per_s": summarize(len(pairs) / t for t in ts),
            "pairs_per_cpu_s": summarize(len(pairs) / c for c in cpu[name]),
            "forward_passes": len(batches),
            "padded_token_fraction": padded_token_fraction(lengths, batches),
            "padded_tokens": int(sum(max(lengths[i] for i in b) * len(b) for b in batches)),
            "max_abs_score_diff_vs_naive": float(np.max(np.abs(scores[name] - base))),
        }
    naive_rate = results["strategies"][naive_key]["pairs_per_s"]["median"]
    naive_cpu = results["strategies"][naive_key]["pairs_per_cpu_s"]["median"]
    for r in results["strategies"].values():
        r["speedup_vs_" + naive_key] = r["pairs_per_s"]["median"] / naive_rate
        r["cpu_speedup_vs_" + naive_key] = r["pairs_per_cpu_s"]["median"] / naive_cpu

    rows = [
        (name, fmt_spread(r["pairs_per_s"]), f"{r['speedup_vs_' + naive_key]:.2f}x", fmt_spread(r["pairs_per_cpu_s"], 2), f"{r['cpu_speedup_vs_' + naive_key]:.2f}x", f"{r['padded_token_fraction']:.3f}", r["forward_passes"], f"{r['padded_tokens']:,}", f"{r['max_abs_score_diff_vs_naive']:.1e}")
        for name, r in results["strategies"].items()
    ]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(results["strategies"])
    meds = [results["strategies"][n]["pairs_per_s"]["median"] for n in names]
    lo = [results["strategies"][n]["pairs_per_s"]["min"] for n in names]
    hi = [results["strategies"][n]["pairs_per_s"]["max"] for n in names]
    ax[0].bar(names, meds, yerr=[np.subtract(meds, lo), np.subtract(hi, meds)], color="tab:blue", capsize=3)
    ax[0].set_ylabel("pairs/s (median, min-max)")
    ax[1].bar(names, [results["strategies"][n]["padded_token_fraction"] for n in names], color="tab:orange")
    ax[1].set_ylabel("padded token fraction")
    for a in ax:
        a.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{len(pairs)} SciFact pairs (BM25 top-{args.depth}), max_length {args.max_length}")
    run.save_figure(fig, "batching_ablation.png")

    md = run.header_markdown("Padding and batching ablation (cross-encoder)")
    md += (
        f"Model: MiniLM-L6 sequence classifier ({model_dir}); {len(pairs)} pairs = {len(cands)} SciFact test queries x BM25 top-{args.depth}; "
        f"tokens per pair mean {np.mean(lengths):.0f}, max {max(lengths)} (max_length {args.max_length}). "
        f"token-budget: max_batch_tokens {args.max_batch_tokens}, max_batch_pairs {args.max_batch_pairs}. "
        f"pairs/s: median [min-max] over {args.repeats} interleaved repeats; forward passes only except `scorer.score` and `CrossEncoder.predict` (tokenisation included; "
        f"sentence-transformers {__import__('sentence_transformers').__version__} sorts each call's pairs by character length).\n\n"
    )
    md += md_table(["strategy", "pairs/s", f"vs {naive_key}", "pairs per CPU-s", f"vs {naive_key} (CPU)", "padded fraction", "forward passes", "padded tokens", "max |score diff|"], rows)
    run.write(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
