"""Live writes on SciFact: how fast writes are acknowledged, how soon they are visible under
search load, what a delta costs searches, merge against a full rebuild, HNSW recall under writes.

    python -m benchmarks.live_writes --scifact $SCIFACT_DIR            # the full run (~15 min on 2 CPUs)
    python -m benchmarks.live_writes --docs 300 --dense-model DIR --no-serve   # a quick check

Parts (each on its own copy of the SciFact index, BM25 + all-MiniLM-L6-v2 ``Flat``):

1. **Acknowledged documents/s** at batch sizes 1, 10, 100, 1000: the writer (in process) validates,
   encodes (MiniLM, when the index is dense), computes the batch's BM25 statistics and commits with
   fsync; BM25-only and BM25 + dense indexes side by side, batch sizes interleaved per repeat.
2. **Acknowledgement to visible** under a steady /search load: the Serve application with
   ``writes.enabled``; an open-loop generator sends /search at ``--search-rps``; batches of 10
   documents go to POST /documents with ``refresh=wait_for``; the writer's own timings give
   ``durable`` (acknowledged) and ``visible`` (from acknowledged until every replica serves it).
   /search latency is measured with and without the writes running, interleaved phases.
3. **/search cost of a delta** of 1 %, 5 % and 20 % of the base (documents replaced): BM25 and
   dense retrieval per query in process (the retrievers' own work, Ray excluded), against the base
   with no delta (bm25s's precomputed index; FAISS alone); levels interleaved per repeat.
4. **Merge next to a full rebuild**: folding a 20 % delta (+5 % deleted, +5 % added) into a new
   base, reusing the vectors, against building the same final corpus from scratch (encoding it).
5. **HNSW recall@10 under writes**: HNSW32 base + the same writes, against exact search over the
   live documents, next to a fresh HNSW32 build of the final vectors.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from benchmarks.common import DEFAULT_CACHE, BenchRun, base_parser, ensure_scifact_index, fmt_spread, latency_percentiles, load_scifact, md_table, summarize, target_line


def _copy_index(src: Path, dst: Path, log: bool = True) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    shutil.rmtree(dst.parent / f"{dst.name}.writes", ignore_errors=True)
    return dst


def _changed(doc: Any, rng: random.Random, donors: Sequence[Any]) -> dict[str, Any]:
    other = rng.choice(donors)
    return {"id": doc.id, "title": doc.title, "text": doc.text[: max(1, len(doc.text) // 2)] + " " + other.text[:300]}


def _added(j: int, rng: random.Random, donors: Sequence[Any]) -> dict[str, Any]:
    a, b = rng.choice(donors), rng.choice(donors)
    return {"id": f"added-{j}", "title": b.title, "text": a.text[len(a.text) // 3 :] + " " + b.text[:200]}


# --------------------------------------------------------------------------- 1. throughput


def part_throughput(base: Path, work: Path, corpus: list, encoder: Any, batch_sizes: Sequence[int], docs_per_size: dict[str, int], repeats: int, seed: int) -> dict[str, Any]:
    from serve_app.config import WritesConfig
    from serve_app.index import build_index
    from serve_app.config import BM25Config, ChunkingConfig
    from serve_app.live.writer import DocumentWriter

    rng = random.Random(seed)
    bm25_only = work / "bm25-only"
    if not (bm25_only / "manifest.json").is_file():
        build_index(corpus, bm25_only, bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), show_progress=False)
    out: dict[str, Any] = {}
    for kind, src, enc in (("bm25", bm25_only, None), ("bm25+dense", base, encoder)):
        per_size: dict[int, list[float]] = {b: [] for b in batch_sizes}
        for r in range(repeats):
            idx = _copy_index(src, work / f"tp-{kind}")
            w = DocumentWriter(idx, WritesConfig(max_batch_documents=max(batch_sizes)), encoder=enc)
            for b in batch_sizes:  # interleaved: every size once per repeat
                n = max(b, docs_per_size[kind])
                docs = [_changed(d, rng, corpus) | {"id": f"tp{r}-{b}-{i}"} for i, d in enumerate(rng.sample(corpus, n))]
                t0 = time.perf_counter()
                for i in range(0, n, b):
                    w.upsert(docs[i : i + b])
                per_size[b].append(n / (time.perf_counter() - t0))
            w.close()
        out[kind] = {str(b): summarize(v) for b, v in per_size.items()}
    return out


# --------------------------------------------------------------------------- 2. visibility under load


def part_visibility(base: Path, work: Path, corpus: list, dense_cfg: Any, args: Any) -> dict[str, Any]:
    import httpx

    from benchmarks.serving import serve_stack

    idx = _copy_index(base, work / "serve-index")
    rng = random.Random(args.seed)
    queries = [q for q in load_scifact(args.scifact).queries.values()]
    reranker = args.reranker
    if not reranker:  # not called at rerank_top_m 0; the deployment still loads one
        from serve_app.testing import build_tiny_cross_encoder

        reranker = str(work / "tiny-reranker")
        if not (Path(reranker) / "config.json").is_file():
            build_tiny_cross_encoder(reranker, num_labels=1, seed=0)
    app_args = {
        "index_dir": str(idx), "corpus": None, "build_index_if_missing": False,
        "dense": dense_cfg.model_dump(), "reranker": {"model": reranker},
        "writes": {"enabled": True, "refresh_interval_s": 1.0},
        "timeouts": {"request_timeout_s": 120, "retriever_timeout_s": 60, "rerank_timeout_s": 60},
    }
    deployments = {
        "SearchIngress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        "BM25Retriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        "DenseRetriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
        "CrossEncoderReranker": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        "DocumentWriter": {"ray_actor_options": {"num_cpus": 0.5}},
    }
    results: dict[str, Any] = {"search_rps": args.search_rps, "batches": args.visibility_batches, "batch_documents": 10}
    with serve_stack(app_args, deployments, num_cpus=4, timeout_s=900) as url:
        client = httpx.Client(base_url=url, timeout=120)
        stop = threading.Event()
        search_lat: dict[str, list[float]] = {"without writes": [], "with writes": []}
        phase = ["without writes"]
        statuses: list[int] = []

        def load() -> None:  # open loop: one search every 1/rps seconds, each on its own thread
            period = 1.0 / args.search_rps
            nxt = time.perf_counter()

            def one(q: str, ph: str) -> None:
                t0 = time.perf_counter()
                r = client.post("/search", json={"query": q, "rerank_top_m": args.rerank_top_m})
                statuses.append(r.status_code)
                search_lat[ph].append(time.perf_counter() - t0)

            while not stop.is_set():
                threading.Thread(target=one, args=(rng.choice(queries), phase[0]), daemon=True).start()
                nxt += period
                time.sleep(max(0.0, nxt - time.perf_counter()))

        gen = threading.Thread(target=load, daemon=True)
        gen.start()
        durable, visible, client_ms = [], [], []
        try:
            for rep in range(args.repeats):  # phases interleaved: quiet, writing, quiet, writing, ...
                phase[0] = "without writes"
                time.sleep(args.phase_s)
                phase[0] = "with writes"
                t_end = time.perf_counter() + args.phase_s
                b = 0
                while time.perf_counter() < t_end or b < args.visibility_batches // args.repeats:
                    docs = [_changed(d, rng, corpus) | {"id": f"vis{rep}-{b}-{i}"} for i, d in enumerate(rng.sample(corpus, 10))]
                    t0 = time.perf_counter()
                    r = client.post("/documents", json={"documents": docs, "refresh": "wait_for"})
                    client_ms.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 200 and r.json()["visible"], r.text
                    durable.append(r.json()["timings_ms"]["durable"])
                    visible.append(r.json()["timings_ms"]["visible"])
                    b += 1
                    time.sleep(0.25)
        finally:
            stop.set()
            gen.join(timeout=5)
            time.sleep(2)
        results.update(
            durable_ms=latency_percentiles([x / 1000 for x in durable]), visible_ms=latency_percentiles([x / 1000 for x in visible]),
            wait_for_client_ms=latency_percentiles([x / 1000 for x in client_ms]),
            search={k: {"n": len(v), **latency_percentiles(v)} for k, v in search_lat.items()},
            search_statuses={str(s): statuses.count(s) for s in sorted(set(statuses))},
        )
    return results


# --------------------------------------------------------------------------- 3-5. in process


def _encode_writes(corpus: list, encoder: Any, seed: int, changed_frac: float, deleted_frac: float, added_frac: float) -> tuple[list[dict], list[str], list[dict]]:
    rng = random.Random(seed)
    n = len(corpus)
    picked = rng.sample(corpus, int((changed_frac + deleted_frac) * n))
    changed = [_changed(d, rng, corpus) for d in picked[: int(changed_frac * n)]]
    deleted = [d.id for d in picked[int(changed_frac * n) :]]
    added = [_added(j, rng, corpus) for j in range(int(added_frac * n))]
    return changed, deleted, added


def part_delta_and_merge(base: Path, work: Path, corpus: list, queries: list[str], encoder: Any, dense_cfg: Any, args: Any) -> dict[str, Any]:
    from serve_app.config import BM25Config, ChunkingConfig, WritesConfig
    from serve_app.index import build_index, load_bm25, load_dense, load_documents
    from serve_app.live.bm25 import LiveBM25
    from serve_app.live.dense import LiveDense
    from serve_app.live.merge import live_documents, merge
    from serve_app.live.writer import DocumentWriter

    n = len(corpus)
    changed, deleted, added = _encode_writes(corpus, encoder, args.seed, 0.20, 0.05, 0.05)
    idx = _copy_index(base, work / "delta-index")
    w = DocumentWriter(idx, WritesConfig(max_batch_documents=1000), encoder=encoder)
    # the delta levels: 1 %, 5 %, 20 % of the base replaced (written in batches of 100, in order)
    level_seq: dict[str, int] = {"0%": 0}
    levels = {"1%": int(0.01 * n), "5%": int(0.05 * n), "20%": int(0.20 * n)}
    done = 0
    t_enc = time.perf_counter()
    for name, count in levels.items():
        while done < count:
            part = changed[done : min(count, done + 100)]
            w.upsert(part)
            done += len(part)
        level_seq[name] = w.last_seq
    write_s = time.perf_counter() - t_enc
    base_docs = list(load_documents(idx)[0])
    bm25 = LiveBM25(load_bm25(idx), base_docs)
    dense = LiveDense(load_dense(idx, dense_cfg, load_encoder=False))
    for batch in w.log.batches_since(0):
        bm25.apply(batch)
        dense.apply(batch)
    qv = encoder.encode_queries(queries)
    # 0 % is the base itself (its fast path): separate objects that have applied nothing
    base_bm25 = LiveBM25(load_bm25(idx), base_docs)
    base_dense = LiveDense(load_dense(idx, dense_cfg, load_encoder=False))
    per_level: dict[str, dict[str, list[float]]] = {lv: {"bm25": [], "dense": []} for lv in level_seq}
    for _ in range(args.repeats):
        for lv, seq in level_seq.items():  # interleaved
            b, d = (base_bm25, base_dense) if lv == "0%" else (bm25, dense)
            at = None if lv == "0%" else seq
            t0 = time.perf_counter()
            for q in queries:
                b.search(q, 100, at_seq=at)
            per_level[lv]["bm25"].append((time.perf_counter() - t0) / len(queries) * 1000)
            t0 = time.perf_counter()
            for i in range(len(queries)):
                d.search_vectors(qv[i : i + 1], 100, at_seq=at)
            per_level[lv]["dense"].append((time.perf_counter() - t0) / len(queries) * 1000)
    delta = {lv: {k: summarize(v) for k, v in parts.items()} for lv, parts in per_level.items()}

    # the rest of the writes (5 % deleted, 5 % added), then merge against a full rebuild
    w.delete(deleted)
    for i in range(0, len(added), 100):
        w.upsert(added[i : i + 100])
    final, _ = live_documents(w, w.last_seq)
    t0 = time.perf_counter()
    report = merge(w)
    merge_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_index(final, work / "rebuild", bm25=BM25Config(), dense=dense_cfg, chunking=ChunkingConfig(), encoder=encoder, show_progress=False)
    rebuild_s = time.perf_counter() - t0
    w.close()
    return {
        "documents": n, "delta_levels": levels, "writes_s": round(write_s, 1), "delta_search_ms": delta,
        "merge": {"seconds": round(merge_s, 2), "documents": report.documents, "vectors_reused": report.vectors_reused, "vectors_encoded": report.vectors_encoded},
        "full_rebuild_s": round(rebuild_s, 2), "final_documents": len(final),
    }


def part_hnsw_recall(base: Path, corpus: list, queries: list[str], encoder: Any, dense_cfg: Any, args: Any) -> dict[str, Any]:
    from serve_app.config import DenseConfig
    from serve_app.index import load_dense
    from serve_app.live.changes import DELETE, UPSERT, Batch, Change
    from serve_app.live.dense import LiveDense
    from serve_app.live.merge import base_vectors
    from serve_app.retrieval.dense import DenseRetriever
    from serve_app.types import Document

    flat = load_dense(base, dense_cfg, load_encoder=False)
    vectors = base_vectors(flat)
    ids = list(flat.doc_ids)
    changed, deleted, added = _encode_writes(corpus, encoder, args.seed + 1, 0.20, 0.05, 0.05)
    new_docs = changed + added
    new_vecs = encoder.encode_documents([f"{d['title']} {d['text']}" if d["title"] else d["text"] for d in new_docs])
    cfg = DenseConfig(model=dense_cfg.model, factory="HNSW32", hnsw_ef_search=args.ef_search)
    live = LiveDense(DenseRetriever.from_vectors(vectors, ids, cfg))
    live.apply(Batch(1, tuple(Change(UPSERT, d["id"], Document(d["id"], d["text"]), v[None, :]) for d, v in zip(new_docs, new_vecs)) + tuple(Change(DELETE, i) for i in deleted)))
    gone = set(deleted) | {d["id"] for d in new_docs}
    final_ids = [i for i in ids if i not in gone] + [d["id"] for d in new_docs]
    by_id = dict(zip(ids, vectors))
    by_id.update({d["id"]: v for d, v in zip(new_docs, new_vecs)})
    final_vecs = np.stack([by_id[i] for i in final_ids])
    exact = DenseRetriever.from_vectors(final_vecs, final_ids, DenseConfig(model=dense_cfg.model, factory="Flat"))
    fresh = DenseRetriever.from_vectors(final_vecs, final_ids, cfg)
    qv = encoder.encode_queries(queries)
    truth = exact.search_vectors(qv, 10)

    def recall(got: list) -> float:
        return float(np.mean([len({h.doc_id for h in g} & {h.doc_id for h in t}) / 10 for g, t in zip(got, truth)]))

    got_live = live.search_vectors(qv, 10)
    return {
        "ef_search": args.ef_search, "live_recall@10": recall(got_live), "fresh_recall@10": recall(fresh.search_vectors(qv, 10)),
        "live_results_per_query_min": min(len(g) for g in got_live), "deleted": len(deleted), "replaced": len(changed), "added": len(added),
    }


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--scifact", default=None, help="SciFact directory (default: $SCIFACT_DIR or ../shared/datasets/scifact)")
    p.add_argument("--index", default=str(DEFAULT_CACHE / "bench" / "scifact-index"), help="the SciFact index (BM25 + MiniLM Flat; built when missing)")
    p.add_argument("--work", default=str(DEFAULT_CACHE / "bench" / "live-writes"), help="scratch directory for index copies")
    p.add_argument("--docs", type=int, default=None, help="use the first N SciFact documents only (a quick check; builds its own index)")
    p.add_argument("--dense-model", default=None, help="bi-encoder for --docs runs (default: all-MiniLM-L6-v2)")
    p.add_argument("--reranker", default=None, help="reranker of the Serve part (default: a tiny random one: the load's searches do not rerank unless --rerank-top-m)")
    p.add_argument("--rerank-top-m", type=int, default=0, help="rerank depth of the searches of the load (default 0: retrieval and fusion only, the stages writes touch)")
    p.add_argument("--no-serve", action="store_true", help="skip part 2 (the Serve application)")
    p.add_argument("--search-rps", type=float, default=4.0, help="search load of part 2")
    p.add_argument("--phase-s", type=float, default=20.0, help="seconds of each quiet and each writing phase of part 2")
    p.add_argument("--visibility-batches", type=int, default=60, help="write batches of part 2 (at least; spread over the writing phases)")
    p.add_argument("--ef-search", type=int, default=128, help="HNSW efSearch of part 5")
    args = p.parse_args(argv)

    from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
    from serve_app.index import build_index, read_manifest
    from serve_app.index.load import dense_config_of
    from serve_app.retrieval.dense import BiEncoder

    run = BenchRun("live_writes", args, args.out)
    ds = load_scifact(args.scifact)
    corpus = list(ds.corpus)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.docs:
        corpus = corpus[: args.docs]
        dense_cfg = DenseConfig(model=args.dense_model) if args.dense_model else DenseConfig()
        base = work / f"base-{args.docs}"
        encoder = BiEncoder(dense_cfg)
        if not (base / "manifest.json").is_file():
            build_index(corpus, base, bm25=BM25Config(), dense=dense_cfg, chunking=ChunkingConfig(), encoder=encoder, show_progress=False)
    else:
        base = ensure_scifact_index(Path(args.index), args.scifact)
        dense_cfg = dense_config_of(base, read_manifest(base))
        encoder = BiEncoder(dense_cfg)
    queries = list(ds.queries.values())
    batch_sizes = [1, 10, 100, 1000] if not args.docs else [1, 10]
    docs_per_size = {"bm25": 1000 if not args.docs else 20, "bm25+dense": 200 if not args.docs else 20}
    results: dict[str, Any] = {"corpus_documents": len(corpus), "queries": len(queries), "dense_model": dense_cfg.model}
    print("1. acknowledged documents/s")
    results["throughput_docs_per_s"] = part_throughput(base, work, corpus, encoder, batch_sizes, docs_per_size, args.repeats, args.seed)
    print("3-4. delta cost, merge vs rebuild")
    results["delta_and_merge"] = part_delta_and_merge(base, work, corpus, queries, encoder, dense_cfg, args)
    print("5. HNSW recall under writes")
    results["hnsw"] = part_hnsw_recall(base, corpus, queries, encoder, dense_cfg, args)
    if not args.no_serve:
        print("2. acknowledgement to visible under search load")
        results["visibility"] = part_visibility(base, work, corpus, dense_cfg, args)

    # ------------------------------------------------------------------ summary
    md = run.header_markdown("Live writes")
    md += f"SciFact: {len(corpus)} documents, {len(queries)} test queries; dense model {dense_cfg.model} (Flat). {args.repeats} repeats, median [min, max].\n\n"
    md += "## 1. Acknowledged documents/s (writer in process: validate, encode, statistics, fsync)\n\n"
    tp = results["throughput_docs_per_s"]
    md += md_table(["batch size", "BM25 only", "BM25 + dense (with encoding)"], [(b, fmt_spread(tp["bm25"][str(b)], 0), fmt_spread(tp["bm25+dense"][str(b)], 1)) for b in batch_sizes]) + "\n\n"
    dm = results["delta_and_merge"]
    md += "## 3. /search cost of a delta (per query, retriever work in process, top 100)\n\n"
    base0 = dm["delta_search_ms"]["0%"]
    rows = []
    for lv, v in dm["delta_search_ms"].items():
        rows.append((lv, fmt_spread(v["bm25"], 2), f"{v['bm25']['median'] / base0['bm25']['median']:.2f}x", fmt_spread(v["dense"], 2), f"{v['dense']['median'] / base0['dense']['median']:.2f}x"))
    md += md_table(["delta (documents replaced)", "BM25 ms", "vs base", "dense ms", "vs base"], rows) + "\n\n"
    md += "0 %: the base as built (bm25s's precomputed scores; FAISS alone). With a delta, BM25 scores each query term's postings at query time with the current statistics (exact), and dense search runs the base with an IDSelector plus the exact delta index.\n\n"
    md += "## 4. Merge next to a full rebuild\n\n"
    md += md_table(["", "seconds", "documents", "vectors reused", "vectors encoded"], [
        ("merge (20 % replaced, 5 % deleted, 5 % added)", dm["merge"]["seconds"], dm["merge"]["documents"], dm["merge"]["vectors_reused"], dm["merge"]["vectors_encoded"]),
        ("full rebuild of the same documents", dm["full_rebuild_s"], dm["final_documents"], 0, dm["final_documents"]),
    ]) + f"\n\nOne run each (a merge changes the index it runs on). Ratio: merge takes {dm['merge']['seconds'] / dm['full_rebuild_s']:.3f}x the rebuild's time.\n\n"
    h = results["hnsw"]
    md += f"## 5. HNSW32 under writes (efSearch {h['ef_search']})\n\n"
    md += md_table(["", "recall@10 vs exact"], [("live: HNSW32 base + delta, deletes excluded in the search", f"{h['live_recall@10']:.4f}"), ("fresh HNSW32 build of the final vectors", f"{h['fresh_recall@10']:.4f}")])
    md += f"\n\nFewest results any query got: {h['live_results_per_query_min']} of 10 ({h['replaced']} replaced, {h['deleted']} deleted, {h['added']} added).\n\n"
    targets = [target_line("HNSW live recall@10 minus a fresh build's", h["live_recall@10"] - h["fresh_recall@10"], 0.0, "")]
    if "visibility" in results:
        v = results["visibility"]
        md += f"## 2. Acknowledgement to visible, /search at {v['search_rps']} requests/s (Serve, rerank_top_m {args.rerank_top_m})\n\n"
        md += md_table(["", "p50 ms", "p95 ms"], [
            ("durable (writer: validate, encode 10 documents, fsync)", f"{v['durable_ms']['p50']:.1f}", f"{v['durable_ms']['p95']:.1f}"),
            ("visible after durable (every replica serves the batch)", f"{v['visible_ms']['p50']:.1f}", f"{v['visible_ms']['p95']:.1f}"),
            ("POST /documents with refresh=wait_for, at the client", f"{v['wait_for_client_ms']['p50']:.1f}", f"{v['wait_for_client_ms']['p95']:.1f}"),
        ]) + "\n\n"
        md += md_table(["/search", "requests", "p50 ms", "p95 ms"], [(k, s["n"], f"{s['p50']:.1f}", f"{s['p95']:.1f}") for k, s in v["search"].items()])
        md += f"\n\n/search statuses: {v['search_statuses']}.\n\n"
        targets.append(target_line("acknowledged-to-visible p95 (refresh_interval_s 1 s)", v["visible_ms"]["p95"] / 1000, 1.0, "s", higher_is_better=False))
    run.write(results, md, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
