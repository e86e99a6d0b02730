"""Filtered search by selectivity: the retrievers filtering inside their search against brute
force over the admitted documents and against post-filtering, and where exact search should take
over from HNSW (the ``dense.filter_exact_*`` switch).

Command::

    python -m benchmarks.filtered_search                   # SciFact test queries + a 100,000-vector HNSW set, 3 repeats
    python -m benchmarks.filtered_search --synthetic 0 --repeats 1   # SciFact only, a quick look

**SciFact** (5,183 abstracts, the 300 test queries, all-MiniLM-L6-v2 vectors): every document
gets a synthetic ``bucket`` (its rank in a seeded random permutation), and the filter
``bucket < s x N`` admits exactly ``s`` of the corpus for ``s`` = 50 %, 10 %, 1 %, 0.1 % and
0.01 % (at least one document). For each selectivity and each retriever (BM25; dense ``Flat``;
dense ``HNSW32``, built from the same vectors):

* *filtered* (what /search does): the retriever's own filtered top-10, with the default switch;
* *in the index only* (HNSW): FAISS with the ``IDSelector`` and no exact fallback, which shows
  what HNSW alone gives at that selectivity;
* *post-filter*: the unfiltered top-10, then the filter (the naive way), and the unfiltered
  top-100 then the filter (post-filtering with 10x oversampling);

each against the truth, the brute-force top-10 over the admitted documents (BM25: the
unfiltered scores of every document restricted to the admitted ones; dense: exact inner
products). Reported: exact-list agreement (BM25, Flat), recall@10 (HNSW), how often fewer than
``min(10, admitted)`` documents came back, and the median latency per query (one query per call,
as /search sends them; modes interleaved per repeat, median and spread over repeats).

**Synthetic** (``--synthetic`` vectors, clustered as MiniLM embeddings are, ``HNSW32``): the same
selectivities on an index large enough for the choice to matter: HNSW with the selector (recall,
latency) next to exact scoring of the admitted vectors (latency). The switch point is where HNSW's
recall@10 drops under 0.99 or exact scoring becomes the faster of the two.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from benchmarks.common import DEFAULT_CACHE, BenchRun, base_parser, clustered_vectors, ensure_scifact_index, load_scifact, md_table

SELECTIVITIES = (0.5, 0.1, 0.01, 0.001, 0.0001)
#: The synthetic part also looks between 10 % and 1 %, where the switch falls.
SYNTHETIC_SELECTIVITIES = (0.5, 0.1, 0.05, 0.02, 0.01, 0.001, 0.0001)
K = 10


def _admitted(n: int, s: float, order: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[order < max(1, int(round(s * n)))] = True
    return mask


def _timed(fn: Callable[[Any], Any], items: Sequence[Any]) -> tuple[list[Any], float]:
    """Results of ``fn`` over ``items`` one by one, and the median seconds per call."""
    out, times = [], []
    for it in items:
        t0 = time.perf_counter()
        out.append(fn(it))
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _ms(s: dict[str, float]) -> str:
    return f"{s['median'] * 1000:.3f} ({s['min'] * 1000:.3f}-{s['max'] * 1000:.3f})"


def scifact_part(args: Any) -> dict[str, Any]:
    from serve_app.config import DenseConfig
    from serve_app.filters import MetadataColumns, parse_filter
    from serve_app.index import load_bm25, load_dense, load_documents
    from serve_app.retrieval.dense import DenseRetriever
    from serve_app.retrieval.filtered import BitmapSelector, reconstruct, search_parameters

    dense_cfg = DenseConfig(device="cpu", **({"model": args.dense_model} if args.dense_model else {}))
    if args.docs:  # a quick check on the first documents, its own index
        from serve_app.config import BM25Config, ChunkingConfig
        from serve_app.index import build_index

        index = Path(args.index)
        build_index(load_scifact(args.scifact).corpus[: args.docs], index, bm25=BM25Config(), dense=dense_cfg, chunking=ChunkingConfig(), show_progress=False)
    else:
        index = ensure_scifact_index(Path(args.index), args.scifact)
    docs = list(load_documents(index)[0])
    queries = list(load_scifact(args.scifact).queries.values())[: args.queries]
    bm25 = load_bm25(index)
    flat = load_dense(index, dense_cfg)
    vectors = reconstruct(flat._cpu_index, np.arange(flat.num_vectors))
    hnsw = DenseRetriever.from_vectors(vectors, flat.doc_ids, DenseConfig(factory="HNSW32", device="cpu", use_gpu_index=False), chunk_owner=flat.chunk_owner)
    qv = flat.encoder.encode_queries(queries)
    n = len(docs)
    order = np.random.default_rng(args.seed).permutation(n)
    fields = {"bucket": "integer"}
    metas = [{"bucket": int(order[i])} for i in range(n)]
    by_id = {d.id: m for d, m in zip(docs, metas)}
    for r in (bm25, flat, hnsw):
        r.columns = MetadataColumns(fields, [by_id[i] for i in r.doc_ids])
    # truths: BM25 from the full unfiltered score lists, dense from exact inner products
    bm25_full = [bm25.search(q, n) for q in queries]
    exact_scores = qv @ vectors.T
    out: dict[str, Any] = {"documents": n, "queries": len(queries), "rows": []}
    for s in SELECTIVITIES:
        node = parse_filter({"bucket": {"lt": max(1, int(round(s * n)))}}, fields)
        allowed_ids = {d for d, m in by_id.items() if m["bucket"] < max(1, int(round(s * n)))}
        admitted = len(allowed_ids)
        want = min(K, admitted)
        truth_bm25 = [[h.doc_id for h in full if h.doc_id in allowed_ids][:K] for full in bm25_full]
        dmask = np.array([d in allowed_ids for d in flat.doc_ids])
        truth_dense = []
        for row in exact_scores:
            sc = np.where(dmask[flat.chunk_owner], row, -np.inf)
            top = np.lexsort((np.arange(sc.size), -sc))[:want]
            truth_dense.append([flat.doc_ids[flat.chunk_owner[i]] for i in top])
        sel = BitmapSelector(dmask[hnsw.chunk_owner])
        params = search_parameters(hnsw._cpu_index, sel.selector, ef_search=hnsw.cfg.hnsw_ef_search, nprobe=1, live_fraction=admitted / n)
        modes: dict[str, Callable[[int], list[str]]] = {
            "bm25 filtered": lambda i: [h.doc_id for h in bm25.search(queries[i], K, node)],
            "bm25 post-filter top-10": lambda i: [h.doc_id for h in bm25.search(queries[i], K) if h.doc_id in allowed_ids],
            "bm25 post-filter top-100": lambda i: [h.doc_id for h in bm25.search(queries[i], 10 * K) if h.doc_id in allowed_ids][:K],
            "flat filtered": lambda i: [h.doc_id for h in flat.search_vectors(qv[i : i + 1], K, node)[0]],
            "hnsw filtered": lambda i: [h.doc_id for h in hnsw.search_vectors(qv[i : i + 1], K, node)[0]],
            "hnsw in the index only": lambda i: [hnsw.doc_ids[hnsw.chunk_owner[j]] for j in hnsw._cpu_index.search(qv[i : i + 1], want, params=params)[1][0] if j >= 0],
            "hnsw post-filter top-10": lambda i: [h.doc_id for h in hnsw.search_vectors(qv[i : i + 1], K)[0] if h.doc_id in allowed_ids],
            "hnsw post-filter top-100": lambda i: [h.doc_id for h in hnsw.search_vectors(qv[i : i + 1], 10 * K)[0] if h.doc_id in allowed_ids][:K],
        }
        times: dict[str, list[float]] = {m: [] for m in modes}
        answers: dict[str, list[list[str]]] = {}
        for _ in range(args.repeats):
            for name, fn in modes.items():  # interleaved: every mode once per repeat
                answers[name], t = _timed(fn, range(len(queries)))
                times[name].append(t)
        for name in modes:
            truth = truth_bm25 if name.startswith("bm25") else truth_dense
            got = answers[name]
            recall = sum(len(set(g) & set(t)) for g, t in zip(got, truth)) / max(1, sum(len(t) for t in truth))
            row = {
                "selectivity": s,
                "admitted": admitted,
                "mode": name,
                "exact_lists": sum(g == t for g, t in zip(got, truth)) / len(truth),
                "recall_at_10": recall,
                "short_answers": sum(len(g) < len(t) for g, t in zip(got, truth)) / len(truth),
                "mean_returned": sum(len(g) for g in got) / len(got),
                "latency_s": _spread(times[name]),
            }
            out["rows"].append(row)
            print(f"s={s:g} admitted={admitted} {name}: exact {row['exact_lists']:.3f} recall {recall:.4f} short {row['short_answers']:.3f} {_ms(row['latency_s'])} ms", flush=True)
    return out


def synthetic_part(args: Any) -> dict[str, Any]:
    import faiss

    from serve_app.config import DenseConfig
    from serve_app.filters import MetadataColumns, parse_filter
    from serve_app.retrieval.dense import DenseRetriever
    from serve_app.retrieval.filtered import BitmapSelector, flat_storage, search_parameters

    n = args.synthetic
    allv = clustered_vectors(n + args.queries, 384, clusters=200, latent_dim=64, noise=0.3, seed=args.seed, anisotropy=0.5)
    x, q = allv[:n], allv[n:]
    t0 = time.perf_counter()
    r = DenseRetriever.from_vectors(x, [f"v{i}" for i in range(n)], DenseConfig(factory="HNSW32", device="cpu", use_gpu_index=False))
    build_s = time.perf_counter() - t0
    order = np.random.default_rng(args.seed + 1).permutation(n)
    fields = {"bucket": "integer"}
    r.columns = MetadataColumns(fields, [{"bucket": int(o)} for o in order])
    storage = flat_storage(r._cpu_index)
    out: dict[str, Any] = {"vectors": n, "queries": len(q), "hnsw_build_s": build_s, "config": {"filter_exact_max_vectors": r.cfg.filter_exact_max_vectors, "filter_exact_fraction": r.cfg.filter_exact_fraction, "hnsw_ef_search": r.cfg.hnsw_ef_search}, "rows": []}
    for s in SYNTHETIC_SELECTIVITIES:
        mask = _admitted(n, s, order)
        node = parse_filter({"bucket": {"lt": max(1, int(round(s * n)))}}, fields)
        ids = np.flatnonzero(mask)
        want = min(K, ids.size)
        truth = []
        for row in q:
            sc = x[ids] @ row
            truth.append(set(ids[np.lexsort((ids, -sc))[:want]].tolist()))
        sel = BitmapSelector(mask)
        params = search_parameters(r._cpu_index, sel.selector, ef_search=r.cfg.hnsw_ef_search, nprobe=1, live_fraction=ids.size / n)
        scan = faiss.SearchParameters(sel=sel.selector)
        modes = {
            "hnsw + selector (in the index only)": lambda i: [int(j) for j in r._cpu_index.search(q[i : i + 1], want, params=params)[1][0] if j >= 0],
            "exact (flat scan of the admitted)": lambda i: [int(j) for j in storage.search(q[i : i + 1], want, params=scan)[1][0] if j >= 0],
            "filtered (default switch)": lambda i: [int(h.doc_id[1:]) for h in r.search_vectors(q[i : i + 1], K, node)[0]],
        }
        times: dict[str, list[float]] = {m: [] for m in modes}
        answers: dict[str, list[list[int]]] = {}
        for _ in range(args.repeats):
            for name, fn in modes.items():
                answers[name], t = _timed(fn, range(len(q)))
                times[name].append(t)
        for name in modes:
            got = answers[name]
            recall = sum(len(set(g) & t) for g, t in zip(got, truth)) / max(1, sum(len(t) for t in truth))
            row = {"selectivity": s, "admitted": int(ids.size), "mode": name, "recall_at_10": recall, "short_answers": sum(len(g) < want for g in got) / len(got), "latency_s": _spread(times[name])}
            out["rows"].append(row)
            print(f"synthetic s={s:g} admitted={ids.size} {name}: recall {recall:.4f} short {row['short_answers']:.3f} {_ms(row['latency_s'])} ms", flush=True)
    return out


def markdown(run: BenchRun, results: dict[str, Any]) -> str:
    md = run.header_markdown("Filtered search by selectivity")
    sf = results["scifact"]
    md += f"## SciFact ({sf['documents']} documents, {sf['queries']} test queries, top-{K})\n\n"
    md += "Exact lists: share of queries whose top-10 equals the brute-force top-10 over the admitted documents. Short: share of queries answered with fewer than min(10, admitted) documents. Latency: median per query over the queries, median (min-max) over repeats.\n\n"
    rows = [(f"{r['selectivity'] * 100:g} %", r["admitted"], r["mode"], f"{r['exact_lists']:.3f}", f"{r['recall_at_10']:.4f}", f"{r['short_answers']:.3f}", f"{r['mean_returned']:.2f}", _ms(r["latency_s"])) for r in sf["rows"]]
    md += md_table(["selectivity", "admitted", "mode", "exact lists", "recall@10", "short", "mean returned", "ms/query"], rows) + "\n"
    sy = results.get("synthetic")
    if sy:
        md += f"\n## Synthetic HNSW32 ({sy['vectors']} vectors, {sy['queries']} queries): where exact search takes over\n\n"
        md += f"Settings of the run: {sy['config']}.\n\n"
        rows = [(f"{r['selectivity'] * 100:g} %", r["admitted"], r["mode"], f"{r['recall_at_10']:.4f}", f"{r['short_answers']:.3f}", _ms(r["latency_s"])) for r in sy["rows"]]
        md += md_table(["selectivity", "admitted", "mode", "recall@10", "short", "ms/query"], rows) + "\n"
    return md


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--scifact", default=None, help="SciFact directory (default: $SCIFACT_DIR or ../shared/datasets/scifact)")
    p.add_argument("--index", default=str(DEFAULT_CACHE / "bench" / "scifact-index"), help="the SciFact index (BM25 + MiniLM Flat; built when missing)")
    p.add_argument("--queries", type=int, default=300, help="queries per selectivity")
    p.add_argument("--synthetic", type=int, default=100_000, help="vectors of the synthetic HNSW part (0: skip it)")
    p.add_argument("--docs", type=int, default=None, help="the first N SciFact documents only, indexed into --index (a quick check)")
    p.add_argument("--dense-model", default=None, help="bi-encoder (default: all-MiniLM-L6-v2, the index's)")
    args = p.parse_args(argv)
    run = BenchRun("filtered_search", args, args.out)
    results: dict[str, Any] = {"scifact": scifact_part(args)}
    if args.synthetic:
        results["synthetic"] = synthetic_part(args)
    run.write(results, markdown(run, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
