"""BM25 engines: bm25s vs rank-bm25 queries/s, on SciFact and on a synthetic Zipfian corpus.

Command::

    python -m benchmarks.bm25_engines                    # SciFact (300 test queries) + 100k synthetic docs
    python -m benchmarks.bm25_engines --synthetic-docs 500000 --rank-bm25-queries 50

Engines (same tokens for all, BM25 "robertson" k1=0.9 b=0.4, top-10, one thread):

* ``rank_bm25``: ``BM25Okapi(epsilon=0).get_scores`` + ``np.argpartition`` top-10, one query at
  a time (what users of rank-bm25 write). On the synthetic corpus only ``--rank-bm25-queries``
  queries are timed (it is slow); every figure is per query, so this does not bias the ratio.
* ``bm25s``: ``bm25s.BM25(backend="numpy").retrieve`` over all queries in one call;
* ``bm25s-numba``: the same with ``backend="numba"`` (JIT-compiled scoring and top-k), when
  numba is installed;
* ``serve_app``: ``serve_app.retrieval.bm25.BM25Retriever.search_batch`` (bm25s engine), the
  service's BM25 stage, including its query tokenisation and document-level top-k.

Query tokenisation is outside the timing of the library rows and inside the ``serve_app`` row.
Each repeat runs every engine once, interleaved, so the noise of a shared machine hits them
alike; wall-clock and process-CPU queries/s are both reported (CPU time is the steadier
figure when other processes compete for the cores). Top-10 agreement is the mean overlap of the
top-10 document sets with rank_bm25's, over the queries rank_bm25 ran.

The synthetic corpus: ``--synthetic-docs`` documents whose lengths are log-normal (median
``--doc-len`` tokens) over a ``--vocab`` word vocabulary with Zipf(1.1) frequencies, seeded;
each query is 2-6 distinct words sampled from one random document, never one of the 100 most
frequent words (the synthetic stopwords, which a real tokenizer drops).
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.common import BenchRun, base_parser, fmt_spread, load_scifact, md_table, measure, summarize, target_line

K = 10
K1, B = 0.9, 0.4


def zipf_corpus(n_docs: int, vocab: int, doc_len: int, seed: int) -> list[list[str]]:
    """``n_docs`` token lists over ``vocab`` words with Zipf(1.1) frequencies; log-normal lengths."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = ranks**-1.1
    p /= p.sum()
    lengths = np.clip(rng.lognormal(np.log(doc_len), 0.5, n_docs).astype(np.int64), 5, doc_len * 8)
    ids = rng.choice(vocab, size=int(lengths.sum()), p=p)
    words = np.array([f"w{i}" for i in range(vocab)], dtype=object)
    toks = words[ids]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [toks[bounds[i] : bounds[i + 1]].tolist() for i in range(n_docs)]


def zipf_queries(docs: list[list[str]], n: int, seed: int, stop_ranks: int = 100) -> list[list[str]]:
    """``n`` queries of 2-6 distinct words, each taken from one random document (never a stop rank)."""
    rng = np.random.default_rng(seed + 1)
    stop = {f"w{i}" for i in range(stop_ranks)}
    out = []
    for d in rng.integers(0, len(docs), n):
        uniq = [w for w in dict.fromkeys(docs[d]) if w not in stop] or list(dict.fromkeys(docs[d]))
        size = min(len(uniq), int(rng.integers(2, 7)))
        out.append([uniq[i] for i in rng.choice(len(uniq), size, replace=False)])
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best scores, best first (ties by index)."""
    k = min(k, scores.size)
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.lexsort((part, -scores[part]))]


def agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Mean |top-10(a) & top-10(b)| / 10 over the pairs of lists."""
    return float(np.mean([len(set(map(int, x)) & set(map(int, y))) / K for x, y in zip(a, b)]))


Engine = Callable[[], list[list[int]]]


def make_engines(tokens: list[list[str]], queries: list[list[str]], n_rank: int, serve_docs: Any, serve_queries: list[str], serve_cfg: Any) -> tuple[dict[str, Engine], dict[str, int], dict[str, float]]:
    """Engines to time (each returns top-10 document positions per query), queries each runs, build times."""
    import bm25s
    import rank_bm25

    from serve_app.retrieval.bm25 import BM25Retriever

    engines: dict[str, Engine] = {}
    counts: dict[str, int] = {}
    build: dict[str, float] = {}

    t = time.perf_counter()
    rb = rank_bm25.BM25Okapi(tokens, k1=K1, b=B, epsilon=0.0)
    build["rank_bm25"] = time.perf_counter() - t
    sub = queries[:n_rank]
    engines["rank_bm25"] = lambda: [top_k(np.asarray(rb.get_scores(q)), K).tolist() for q in sub]
    counts["rank_bm25"] = len(sub)

    backends = ["numpy"]
    try:
        import numba  # noqa: F401

        backends.append("numba")
    except ImportError:
        pass
    for be in backends:
        name = "bm25s" if be == "numpy" else "bm25s-numba"
        t = time.perf_counter()
        bm = bm25s.BM25(k1=K1, b=B, method="robertson", backend=be)
        bm.index(tokens, create_empty_token=False, show_progress=False)
        build[name] = time.perf_counter() - t
        engines[name] = (lambda m: lambda: np.asarray(m.retrieve(queries, k=K, show_progress=False, n_threads=1).documents).tolist())(bm)
        counts[name] = len(queries)

    t = time.perf_counter()
    retriever = BM25Retriever.build(serve_docs, serve_cfg)
    build["serve_app"] = time.perf_counter() - t
    pos = {d: i for i, d in enumerate(retriever.doc_ids)}
    engines["serve_app"] = lambda: [[pos[h.doc_id] for h in hits] for hits in retriever.search_batch(serve_queries, K)]
    counts["serve_app"] = len(serve_queries)
    return engines, counts, build


def bench_corpus(label: str, engines: dict[str, Engine], counts: dict[str, int], build: dict[str, float], repeats: int, n_docs: int) -> dict[str, Any]:
    for name, fn in engines.items():  # warm-up (numba compiles here)
        t = time.perf_counter()
        fn()
        print(f"[{label}] warm-up {name}: {time.perf_counter() - t:.1f} s")
    wall: dict[str, list[float]] = {n: [] for n in engines}
    cpu: dict[str, list[float]] = {n: [] for n in engines}
    tops: dict[str, list[list[int]]] = {}
    for r in range(repeats):
        for name, fn in engines.items():
            m = measure(fn)
            wall[name].append(counts[name] / m.wall)
            cpu[name].append(counts[name] / max(m.cpu, 1e-9))
            tops[name] = m.value
        print(f"[{label}] repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {wall[n][-1]:.1f}" for n in engines) + " queries/s")
    n_rank = counts["rank_bm25"]
    out: dict[str, Any] = {"documents": n_docs, "build_s": build, "engines": {}}
    base_wall = summarize(wall["rank_bm25"])["median"]
    base_cpu = summarize(cpu["rank_bm25"])["median"]
    for name in engines:
        w, c = summarize(wall[name]), summarize(cpu[name])
        out["engines"][name] = {
            "queries_timed": counts[name],
            "qps_wall": w,
            "qps_cpu": c,
            "ms_per_query_wall": 1000.0 / w["median"],
            "speedup_wall": w["median"] / base_wall,
            "speedup_cpu": c["median"] / base_cpu,
            "top10_agreement_vs_rank_bm25": agreement(tops[name][:n_rank], tops["rank_bm25"]),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from serve_app.config import BM25Config
    from serve_app.retrieval.bm25 import Tokenizer
    from serve_app.types import Document

    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--scifact", default=None, help="SciFact BEIR directory (default: ../shared/datasets/scifact)")
    p.add_argument("--scifact-queries", type=int, default=None, help="SciFact test queries used (default: all 300)")
    p.add_argument("--synthetic-docs", type=int, default=100_000, help="documents of the synthetic corpus (0 skips it)")
    p.add_argument("--vocab", type=int, default=200_000, help="synthetic vocabulary size")
    p.add_argument("--doc-len", type=int, default=100, help="median synthetic document length in tokens")
    p.add_argument("--synthetic-queries", type=int, default=300, help="queries timed with the fast engines on the synthetic corpus")
    p.add_argument("--rank-bm25-queries", type=int, default=30, help="of those, queries timed with rank_bm25 (slow at 100k docs)")
    args = p.parse_args(argv)
    run = BenchRun("bm25_engines", args, args.out)
    results: dict[str, Any] = {}

    # SciFact: the service's tokenizer (stopwords, Snowball stemmer) for every engine.
    ds = load_scifact(args.scifact)
    cfg = BM25Config(method="robertson", k1=K1, b=B)
    tok = Tokenizer.from_config(cfg)
    tokens = tok([d.content for d in ds.corpus])
    qtexts = [ds.queries[q] for q in sorted(ds.queries)][: args.scifact_queries]
    engines, counts, build = make_engines(tokens, tok(qtexts), len(qtexts), ds.corpus, qtexts, cfg)
    results["scifact"] = bench_corpus("scifact", engines, counts, build, args.repeats, len(ds.corpus))
    del engines
    gc.collect()

    if args.synthetic_docs > 0:
        t = time.perf_counter()
        docs = zipf_corpus(args.synthetic_docs, args.vocab, args.doc_len, args.seed)
        queries = zipf_queries(docs, args.synthetic_queries, args.seed)
        print(f"synthetic corpus generated in {time.perf_counter() - t:.1f} s")
        plain = BM25Config(method="robertson", k1=K1, b=B, stopwords=None, stemmer=None, lowercase=False)
        serve_docs = [Document(id=str(i), text=" ".join(d)) for i, d in enumerate(docs)]
        engines, counts, build = make_engines(docs, queries, args.rank_bm25_queries, serve_docs, [" ".join(q) for q in queries], plain)
        results["synthetic"] = bench_corpus("synthetic", engines, counts, build, args.repeats, len(docs))
        results["synthetic"]["generator"] = {"vocab": args.vocab, "zipf_exponent": 1.1, "median_doc_len": args.doc_len, "mean_doc_len": float(np.mean([len(d) for d in docs])), "seed": args.seed, "queries": len(queries)}
        del engines, serve_docs
        gc.collect()

    targets = []
    for key, goal in (("scifact", 20), ("synthetic", 100)):
        if key not in results:
            continue
        r = results[key]
        for name in ("bm25s", "bm25s-numba", "serve_app"):
            if name in r["engines"]:
                e = r["engines"][name]
                targets.append(target_line(f"{name} vs rank_bm25 queries/s (wall), {key} {r['documents']:,} docs", e["speedup_wall"], goal))

    rows = []
    for key, r in results.items():
        for name, e in r["engines"].items():
            rows.append((
                f"{key} ({r['documents']:,} docs)", name, e["queries_timed"], fmt_spread(e["qps_wall"]), f"{e['ms_per_query_wall']:.3f}",
                f"{e['speedup_wall']:.1f}x", f"{e['speedup_cpu']:.1f}x", f"{e['top10_agreement_vs_rank_bm25']:.3f}", f"{r['build_s'][name]:.1f}",
            ))
    md = run.header_markdown("BM25 engines: bm25s vs rank-bm25")
    md += (
        "BM25 robertson, k1=0.9, b=0.4, top-10, one thread; engines interleaved within each repeat. "
        "queries/s: median [min-max] of the repeats (wall clock); speed-ups from medians, wall clock and process CPU time.\n\n"
    )
    md += md_table(["corpus", "engine", "queries timed", "queries/s (wall)", "ms/query", "speed-up (wall)", "speed-up (CPU)", "top-10 agreement", "index build s"], rows)
    if "synthetic" in results:
        g = results["synthetic"]["generator"]
        md += f"\nSynthetic corpus: vocabulary {g['vocab']:,}, Zipf exponent 1.1, mean length {g['mean_doc_len']:.0f} tokens, seed {g['seed']}.\n"
    run.write(results, md, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
