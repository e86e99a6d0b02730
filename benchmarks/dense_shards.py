"""Sharded dense retrieval: CPU per query when every shard encodes the query vs when it is encoded once.

Command::

    python -m benchmarks.dense_shards                          # 200k vectors, HNSW32, 1/2/4 shards, 300 queries
    python -m benchmarks.dense_shards --vectors 20000 --queries 20 --shards 1,2 --repeats 1   # a smoke run

What each sharded dense query costs, in CPU seconds of the processes that serve it, with the
code the deployments run:

* **every shard encodes** (before): each ``DenseRetriever-shard<i>`` replica encodes the query
  with its own bi-encoder, then searches its shard (``BiEncoder.encode_queries`` +
  ``DenseRetriever.search_vectors``, one query per call as under light load);
* **encoded once** (now): ``DenseQueryEncoder`` encodes the query once, every shard searches
  that vector.

The query encoder is the real all-MiniLM-L6-v2 (the packaged weights) on the SciFact test
queries; the shards hold synthetic vectors with the structure of sentence embeddings
(``clustered_vectors``, as ``benchmarks.faiss_indexes``: encoding a large real corpus takes
hours on a small CPU), split into contiguous shards, each its own HNSW32 index (efSearch 128),
top 100 per shard. torch and FAISS run one thread each, as in a one-CPU replica. CPU time is
``time.process_time`` of this process around the calls (serialisation between replicas is not
counted in either mode). Repeats interleave the two modes at every shard count.
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

import numpy as np

from benchmarks.common import BenchRun, base_parser, clustered_vectors, load_scifact, md_table, set_threads, summarize


def build_shards(vectors: np.ndarray, n: int, factory: str, ef_search: int) -> list[Any]:
    from serve_app.config import DenseConfig
    from serve_app.retrieval.dense import DenseRetriever
    from serve_app.retrieval.sharding import shard_bounds

    cfg = DenseConfig(factory=factory, hnsw_ef_search=ef_search, device="cpu")
    ids = [f"d{i}" for i in range(len(vectors))]
    return [DenseRetriever.from_vectors(vectors[s:e], ids[s:e], cfg) for s, e in shard_bounds(len(vectors), n)]


def run_mode(mode: str, encoder: Any, shards: list[Any], queries: list[str], k: int) -> dict[str, float]:
    """CPU seconds per query (total, encoding, search) of ``mode`` over ``queries``."""
    enc = search = 0.0
    for q in queries:
        if mode == "encoded once":
            t = time.process_time()
            v = encoder.encode_queries([q])
            enc += time.process_time() - t
            t = time.process_time()
            for s in shards:
                s.search_vectors(v, k)
            search += time.process_time() - t
        else:
            for s in shards:
                t = time.process_time()
                v = encoder.encode_queries([q])  # what each shard replica did with its own encoder
                enc += time.process_time() - t
                t = time.process_time()
                s.search_vectors(v, k)
                search += time.process_time() - t
    n = len(queries)
    return {"cpu_ms": (enc + search) / n * 1e3, "encode_ms": enc / n * 1e3, "search_ms": search / n * 1e3}


MODES = ("every shard encodes", "encoded once")


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--vectors", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=300, help="SciFact test queries used")
    p.add_argument("--shards", default="1,2,4")
    p.add_argument("--factory", default="HNSW32")
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--scifact", default=None)
    args = p.parse_args(argv)
    run = BenchRun("dense_shards", args, args.out)
    set_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    from serve_app.config import DenseConfig
    from serve_app.retrieval.dense import BiEncoder

    encoder = BiEncoder(DenseConfig(device="cpu"))
    queries = list(load_scifact(args.scifact).queries.values())[: args.queries]
    vectors = clustered_vectors(args.vectors, encoder.dim, clusters=200, latent_dim=64, noise=0.3, seed=args.seed, anisotropy=0.5)
    counts = [int(x) for x in args.shards.split(",")]
    t0 = time.perf_counter()
    shard_sets = {n: build_shards(vectors, n, args.factory, args.ef_search) for n in counts}
    print(f"indexes built in {time.perf_counter() - t0:.0f} s")
    encoder.encode_queries(queries[:8])  # warm-up
    runs: dict[str, dict[str, list[dict[str, float]]]] = {str(n): {m: [] for m in MODES} for n in counts}
    for r in range(args.repeats):
        for n in counts:
            for m in (MODES if r % 2 == 0 else tuple(reversed(MODES))):
                runs[str(n)][m].append(run_mode(m, encoder, shard_sets[n], queries, args.k))
                print(f"repeat {r + 1}: {n} shard(s), {m}: {json.dumps(runs[str(n)][m][-1])}")

    rows, results = [], {"vectors": args.vectors, "dim": encoder.dim, "factory": args.factory, "ef_search": args.ef_search, "k": args.k, "queries": len(queries), "model": encoder.model_name, "shards": {}}
    for n in counts:
        entry = {}
        for m in MODES:
            entry[m] = {key: summarize(x[key] for x in runs[str(n)][m]) for key in ("cpu_ms", "encode_ms", "search_ms")} | {"runs": runs[str(n)][m]}
        ratio = entry["encoded once"]["cpu_ms"]["median"] / entry["every shard encodes"]["cpu_ms"]["median"]
        share = entry["every shard encodes"]["encode_ms"]["median"] / entry["every shard encodes"]["cpu_ms"]["median"]
        entry["ratio"] = ratio
        results["shards"][str(n)] = entry
        for m in MODES:
            c = entry[m]["cpu_ms"]
            rows.append((n, m, f"{c['median']:.2f} ({c['min']:.2f}-{c['max']:.2f})", f"{entry[m]['encode_ms']['median']:.2f}", f"{entry[m]['search_ms']['median']:.2f}", f"{share:.0%}" if m == MODES[0] else "", f"{ratio:.2f}x" if m == MODES[1] else ""))
    md = run.header_markdown("Sharded dense retrieval: CPU per query, every shard encoding vs encoded once")
    md += (
        f"all-MiniLM-L6-v2 query encoder (1 thread) on {len(queries)} SciFact test queries, one query per call; {args.vectors:,} synthetic {encoder.dim}-d vectors "
        f"split into contiguous shards, each an {args.factory} index (efSearch {args.ef_search}, 1 FAISS thread), top {args.k} per shard. "
        f"CPU ms per query = process CPU time of the encoder and shard calls; {args.repeats} repeats, modes interleaved; median (min-max).\n\n"
    )
    md += md_table(["shards", "mode", "dense CPU ms per query", "encoding ms", "search ms", "encoding share (before)", "now vs before"], rows)
    run.write(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
