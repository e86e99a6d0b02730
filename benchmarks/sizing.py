"""Sizing figures at 1,000,000 synthetic documents: bytes per document, per-shard latency, build
throughput per worker, and replica memory with the on-disk document store.

Command::

    python -m benchmarks.sizing                              # 1,000,000 documents, 2 Ray workers
    python -m benchmarks.sizing --documents 100000           # a quicker look

Synthetic data (sizes and speeds only; no relevance): a vocabulary of ``--vocabulary`` generated
words with Zipf(``--zipf``) frequencies, documents of about ``--words`` words (~1 KB of text), a
short title; dense vectors from :func:`benchmarks.faiss_indexes.clustered_vectors` (the
structure of sentence embeddings, 384 dimensions), since encoding a million texts with MiniLM
takes days on 2 cores (the encoder's own throughput is measured by ``benchmarks.index_build``).

What it measures:

1. ``serve-app index --ray`` (BM25 only, ``--workers`` workers) of the corpus: wall time per stage
   and the workers' CPU-seconds, hence documents per worker CPU-second for tokenising and scoring;
2. bytes per document on disk: the BM25 index, ``documents.sqlite``, ``documents.jsonl``, and a
   FAISS Flat index of the vectors with its id map (HNSW32 and IVF-PQ come from
   ``benchmarks.faiss_indexes --vectors 1000000``);
3. BM25 query latency of one shard holding all the documents (``--queries`` queries of 2-5 words
   drawn from mid-frequency terms, top 100, one thread, memory-mapped index);
4. replica memory, each in a fresh process (``/proc/self/status``): the ingress holding
   documents.jsonl in memory (before) vs reading documents.sqlite (after), the dense replica
   with the corpus in memory (before) vs only its index and id map (after), and a BM25 shard.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import DEFAULT_CACHE, PROC_MEMORY_SNIPPET, BenchRun, base_parser, latency_percentiles, md_table

CHILD = r"""
import json, random, sys, time
mode, index_dir, n_docs = sys.argv[1], sys.argv[2], int(sys.argv[3])
import numpy as np  # every replica imports it; not counted as the store's memory
base = mem()
from pathlib import Path
d = Path(index_dir)
rng = random.Random(0)
ids = [f"doc{rng.randrange(n_docs):08d}" for _ in range(2000)]
if mode in ("ingress-before", "dense-before"):
    from serve_app.corpus import load_corpus
    corpus = load_corpus(d / "documents.jsonl")
    if mode == "ingress-before":
        assert all(corpus.get(i).id == i for i in ids)
if mode == "ingress-after":
    from serve_app.index.docstore import SqliteDocumentStore
    store = SqliteDocumentStore(d / "documents.sqlite")
    assert all(store.get(i).id == i for i in ids)
if mode.startswith("dense"):
    from serve_app.retrieval.dense import DenseRetriever
    section = json.loads((d / "dense-flat" / "section.json").read_text())
    dense = DenseRetriever.load(d / "dense-flat", section, encoder=None)
    q = np.load(d / "dense-flat" / "queries.npy")
    hits = dense.search_vectors(q[:20], 10)
    assert all(len(h) == 10 for h in hits)
if mode == "bm25":
    from serve_app.index import read_manifest
    from serve_app.retrieval.bm25 import BM25Retriever
    bm = BM25Retriever.load(d / "bm25", read_manifest(d).bm25, mmap=True)
    for line in (d / "queries.txt").read_text().splitlines()[:50]:
        bm.search(line, 100)
end = mem()
print(json.dumps({"mode": mode, "rss_mib": end["VmRSS"], "peak_rss_mib": end["VmHWM"], "anon_added_mib": end["RssAnon"] - base["RssAnon"], "file_mib": end["RssFile"]}))
"""


def vocabulary(n: int, seed: int) -> list[str]:
    """``n`` distinct lowercase pseudo-words of 3-10 letters."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        lengths = rng.integers(3, 11, size=n)
        for k in lengths:
            w = "".join(letters[rng.integers(0, 26, size=k)])
            if w not in seen:
                seen.add(w)
                out.append(w)
                if len(out) == n:
                    break
    return out


def synthetic_corpus(n: int, vocab: list[str], words: int, zipf: float, seed: int) -> Any:
    from serve_app.corpus import Corpus
    from serve_app.types import Document

    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(vocab) + 1) ** zipf
    cdf = np.cumsum(p / p.sum())
    arr = np.array(vocab, dtype=object)
    docs = []
    for start in range(0, n, 20_000):
        m = min(20_000, n - start)
        lengths = np.clip(rng.normal(words, words / 4, size=m).astype(int), 10, 4 * words)
        picks = arr[np.searchsorted(cdf, rng.random(int(lengths.sum())))]
        ends = np.cumsum(lengths)
        for j in range(m):
            ws = picks[ends[j] - lengths[j] : ends[j]]
            docs.append(Document(id=f"doc{start + j:08d}", title=" ".join(ws[:3]), text=" ".join(ws[3:])))
    return Corpus.from_documents(docs)


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0], repeats=False)
    p.add_argument("--documents", type=int, default=1_000_000)
    p.add_argument("--vocabulary", type=int, default=200_000)
    p.add_argument("--words", type=int, default=140, help="mean words per document (~1 KB of text)")
    p.add_argument("--zipf", type=float, default=1.07, help="exponent of the word frequencies")
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-documents", type=int, default=2048)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--work", default=str(DEFAULT_CACHE / "bench" / "sizing"))
    p.add_argument("--reuse-index", action="store_true", help="keep the corpus and BM25 index an earlier run left in --work (same --documents) and measure the rest again; the build figures are then the earlier run's")
    args = p.parse_args(argv)
    run = BenchRun("sizing", args, args.out)
    work = Path(args.work)
    n = args.documents
    previous = Path(run.dir / "sizing.json")
    if args.reuse_index:
        old = json.loads(previous.read_text())["results"] if previous.is_file() else None
        if old is None or old["documents"] != n or not (work / "index" / "manifest.json").is_file():
            raise SystemExit(f"--reuse-index: no earlier run of {n} documents in {work} / {previous}")
        return _measure(args, run, work, n, old)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    t0 = time.perf_counter()
    vocab = vocabulary(args.vocabulary, args.seed)
    corpus = synthetic_corpus(n, vocab, args.words, args.zipf, args.seed)
    text_bytes = sum(len(d.content.encode()) for d in corpus)
    print(f"generated {n} documents ({text_bytes / n:.0f} bytes of text each) in {time.perf_counter() - t0:.0f} s", flush=True)

    # 1. the Ray build (BM25 + document store)
    import ray

    from serve_app.config import BM25Config, ChunkingConfig
    from serve_app.index.ray_build import RayBuildOptions, build_index_ray
    from serve_app.serve.runner import start_ray

    idx = work / "index"
    start_ray(num_cpus=max(2, args.workers), log_to_driver=False)
    try:
        t0 = time.perf_counter()
        _, report = build_index_ray(corpus, idx, bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), options=RayBuildOptions(workers=args.workers, batch_documents=args.batch_documents, show_progress=False))
        build_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    print(f"ray build: {build_s:.0f} s, stages {report.stage_seconds}, worker CPU {report.worker_cpu_seconds}", flush=True)
    del corpus
    build = {"wall_s": build_s, "stages_s": report.stage_seconds, "worker_cpu_s": report.worker_cpu_seconds, "workers": args.workers}
    return _measure(args, run, work, n, {"ray_build": build, "text_bytes_per_document": text_bytes / n}, vocab)


def _measure(args: Any, run: BenchRun, work: Path, n: int, earlier: dict[str, Any], vocab: list[str] | None = None) -> int:
    """Everything after the build: dense Flat, sizes, BM25 latency, replica memory; the report."""
    from serve_app.config import DenseConfig
    from serve_app.index import read_manifest

    idx = work / "index"
    manifest = read_manifest(idx)
    vocab = vocab if vocab is not None else vocabulary(args.vocabulary, args.seed)
    build = earlier["ray_build"]
    build_s, workers_cpu = build["wall_s"], build["worker_cpu_s"]
    text_bytes = earlier["text_bytes_per_document"] * n

    # 2. dense: a Flat index of synthetic vectors, saved as the dense retriever saves it
    from benchmarks.common import clustered_vectors
    from serve_app.retrieval.dense import DenseRetriever

    t0 = time.perf_counter()
    allv = clustered_vectors(n + args.queries, args.dim, 2000, 48, 0.15, args.seed, 0.4)
    ids = [f"doc{i:08d}" for i in range(n)]
    dense = DenseRetriever.from_vectors(allv[:n], ids, DenseConfig(model="synthetic", factory="Flat", use_gpu_index=False))
    section = dense.save(idx / "dense-flat")
    (idx / "dense-flat" / "section.json").write_text(json.dumps(section))
    np.save(idx / "dense-flat" / "queries.npy", allv[n:])
    del dense, allv
    dense_s = time.perf_counter() - t0

    sizes = {
        "bm25": dir_bytes(idx / "bm25"),
        "documents.sqlite": (idx / "documents.sqlite").stat().st_size,
        "documents.jsonl": (idx / "documents.jsonl").stat().st_size,
        "dense Flat index.faiss": (idx / "dense-flat" / "index.faiss").stat().st_size,
        "dense id map (doc_ids.json + chunk_owner.npy)": (idx / "dense-flat" / "doc_ids.json").stat().st_size + (idx / "dense-flat" / "chunk_owner.npy").stat().st_size,
    }

    # 3. BM25 latency of one shard with every document
    from serve_app.retrieval.bm25 import BM25Retriever

    rng = np.random.default_rng(args.seed + 1)
    mid = vocab[100:20_000]
    queries = [" ".join(rng.choice(mid, size=int(rng.integers(2, 6)), replace=False)) for _ in range(args.queries)]
    (idx / "queries.txt").write_text("\n".join(queries) + "\n")
    bm = BM25Retriever.load(idx / "bm25", manifest.bm25, mmap=True)
    for q in queries[:20]:
        bm.search(q, 100)
    lat = []
    for q in queries:
        t = time.perf_counter()
        bm.search(q, 100)
        lat.append(time.perf_counter() - t)
    bm25_latency = {**latency_percentiles(lat), "mean": float(np.mean(lat) * 1e3)}
    del bm
    print("bm25 latency", bm25_latency, flush=True)

    # 3b. the dense replica's own cost per query besides FAISS: encoding it (every dense shard
    # replica encodes the queries it gets), MiniLM on one thread, alone and in batches of 16
    import torch

    from serve_app.retrieval.dense import BiEncoder

    torch.set_num_threads(1)
    enc = BiEncoder(DenseConfig(device="cpu"))
    enc.encode_queries(queries[:8])
    c0 = time.process_time()
    for q in queries:
        enc.encode_queries([q])
    encode_one_ms = (time.process_time() - c0) / len(queries) * 1e3
    c0 = time.process_time()
    for i in range(0, len(queries), 16):
        enc.encode_queries(queries[i : i + 16])
    encode_batch_ms = (time.process_time() - c0) / len(queries) * 1e3
    del enc
    print(f"query encoding: {encode_one_ms:.2f} CPU-ms alone, {encode_batch_ms:.2f} in batches of 16", flush=True)

    # 4. replica memory, each in a fresh process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")) if x), "OMP_NUM_THREADS": "1"}
    memory = {}
    for mode in ("ingress-before", "ingress-after", "dense-before", "dense-after", "bm25"):
        out = subprocess.run([sys.executable, "-c", PROC_MEMORY_SNIPPET + CHILD, mode, str(idx), str(n)], capture_output=True, text=True, env=env, check=True)
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(memory[mode], flush=True)

    results = {
        "documents": n, "text_bytes_per_document": text_bytes / n, "vocabulary": manifest.bm25["vocab_size"],
        "ray_build": {**build, "documents_per_worker_cpu_s": {k: n / v for k, v in workers_cpu.items() if v}},
        "dense_flat_build_s": dense_s,
        "bytes": sizes, "bytes_per_document": {k: v / n for k, v in sizes.items()},
        "bm25_latency_ms": bm25_latency, "memory_mib": memory,
        "query_encoding_cpu_ms": {"one_at_a_time": encode_one_ms, "batches_of_16": encode_batch_ms, "model": DenseConfig().model},
    }
    md = run.header_markdown(f"Sizing at {n:,} synthetic documents")
    md += (
        f"{n:,} synthetic documents ({text_bytes / n:.0f} bytes of title + text each; {args.vocabulary:,} generated words, Zipf {args.zipf}; "
        f"BM25 vocabulary after stemming {manifest.bm25['vocab_size']:,}); dense vectors synthetic (clustered, {args.dim} dimensions). Sizes and speeds only.\n\n"
        "## Bytes per document on disk\n\n"
    )
    md += md_table(["file", "total MiB", "bytes per document"], [(k, f"{v / 2**20:.0f}", f"{v / n:.0f}") for k, v in sizes.items()])
    md += "\n## Ray build (BM25 + document store), " + f"{build['workers']} workers" + (" (the earlier run's: --reuse-index)" if args.reuse_index else "") + "\n\n"
    md += md_table(
        ["stage", "wall s", "worker CPU-s", "documents per worker CPU-s"],
        [(k, f"{v:.1f}", f"{workers_cpu.get(k, 0):.1f}" if k in workers_cpu else "-", f"{n / workers_cpu[k]:.0f}" if k in workers_cpu else "-") for k, v in build["stages_s"].items()],
    )
    md += f"\nWhole build {build_s:.0f} s wall ({n / build_s:.0f} documents/s).\n\n## BM25 latency, one shard of {n:,} documents\n\n"
    md += md_table(["queries", "top k", "mean ms", "p50 ms", "p95 ms", "p99 ms"], [(len(queries), 100, f"{bm25_latency['mean']:.2f}", f"{bm25_latency['p50']:.1f}", f"{bm25_latency['p95']:.1f}", f"{bm25_latency['p99']:.1f}")])
    md += (
        f"\nQuery encoding by the dense replica ({DenseConfig().model}, one thread, the same queries): {encode_one_ms:.2f} CPU-ms per query alone, "
        f"{encode_batch_ms:.2f} in batches of 16 (every dense shard replica encodes the queries it is sent).\n"
    )
    md += "\n## Replica memory (fresh process each, MiB)\n\n"
    labels = {
        "ingress-before": "ingress, documents.jsonl in memory (before)", "ingress-after": "ingress, documents.sqlite (after)",
        "dense-before": "dense replica + corpus in memory (before)", "dense-after": "dense replica, index + id map only (after)", "bm25": "BM25 shard (memory-mapped), 50 queries",
    }
    md += md_table(["process", "RSS", "peak RSS", "private memory added", "file pages"], [(labels[k], f"{v['rss_mib']:.0f}", f"{v['peak_rss_mib']:.0f}", f"{v['anon_added_mib']:.0f}", f"{v['file_mib']:.0f}") for k, v in memory.items()])
    md += "\nFile pages are the memory-mapped files (page cache, shared by the processes of a node, reclaimable); private memory is what the process alone holds.\n"
    run.write(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
