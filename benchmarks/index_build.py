"""Index build throughput: `serve-app index` (one process) vs `serve-app index --ray` (N workers).

Command::

    python -m benchmarks.index_build                        # SciFact, BM25 + MiniLM dense, 2 workers
    python -m benchmarks.index_build --workers 2 --no-dense

Both builds index the same corpus with the same settings into fresh directories, one after the
other on a quiet machine. For each: wall seconds, documents/s, and documents per CPU-second
(local: the process's CPU time, every torch thread included; Ray: the CPU time the workers spent
in the build's functions plus the driver's own). The local build uses every core through torch's
threads; the Ray build runs ``--workers`` actors of ``--cpus-per-worker`` CPUs each (torch
threads = CPUs), so on one machine the two use the same cores and the comparison is the cost of
distributing, not a speed-up; on a cluster the Ray build adds nodes.

The two indexes are then compared: max |difference| of the dense vectors and the BM25 top-100
of every test query (identical is expected).
"""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import DEFAULT_CACHE, BenchRun, base_parser, load_scifact, machine_cpu_seconds, md_table


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0], repeats=False)
    p.add_argument("--dataset", default=None, help="BEIR dataset directory (default: ../shared/datasets/scifact)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--batch-documents", type=int, default=256, help="documents per Ray Data batch")
    p.add_argument("--dense-model", default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--dense-max-length", type=int, default=256)
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--work", default=str(DEFAULT_CACHE / "bench" / "index_build"))
    args = p.parse_args(argv)
    run = BenchRun("index_build", args, args.out)

    from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
    from serve_app.index import build_index, load_index
    from serve_app.index.ray_build import RayBuildOptions, build_index_ray
    from serve_app.retrieval.dense import BiEncoder

    data = load_scifact(args.dataset)
    corpus = data.corpus
    dense = None if args.no_dense else DenseConfig(model=args.dense_model, max_length=args.dense_max_length, device="cpu")
    bm25, chunking = BM25Config(), ChunkingConfig()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    encoder = BiEncoder(dense) if dense is not None else None  # loaded before the clock starts, as the Ray driver's is

    rows: dict[str, dict[str, Any]] = {}
    c0, m0, t0 = _cpu(), machine_cpu_seconds(), time.perf_counter()
    build_index(corpus, work / "local", bm25=bm25, dense=dense, chunking=chunking, encoder=encoder, show_progress=False)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    rows["local (1 process)"] = {"wall_s": wall, "cpu_s": cpu, "machine_cpu_s": machine_cpu_seconds() - m0}
    print(f"local: {wall:.1f} s, {cpu:.1f} CPU-s")

    import ray

    from serve_app.serve.runner import start_ray

    start_ray(num_cpus=max(2, int(args.workers * args.cpus_per_worker)), log_to_driver=False)
    try:
        c0, m0, t0 = _cpu(), machine_cpu_seconds(), time.perf_counter()
        _, report = build_index_ray(
            corpus, work / "ray", bm25=bm25, dense=dense, chunking=chunking,
            options=RayBuildOptions(workers=args.workers, cpus_per_worker=args.cpus_per_worker, batch_documents=args.batch_documents, show_progress=False),
        )
        wall, driver_cpu, machine_cpu = time.perf_counter() - t0, _cpu() - c0, machine_cpu_seconds() - m0
    finally:
        ray.shutdown()
    worker_cpu = sum(report.worker_cpu_seconds.values())
    rows[f"--ray, {args.workers} workers"] = {"wall_s": wall, "cpu_s": worker_cpu + driver_cpu, "machine_cpu_s": machine_cpu, "driver_cpu_s": driver_cpu, "worker_cpu_s": dict(report.worker_cpu_seconds), "stages_s": dict(report.stage_seconds)}
    print(f"ray: {wall:.1f} s, workers {worker_cpu:.1f} CPU-s, driver {driver_cpu:.1f} CPU-s; stages {report.stage_seconds}")
    n = len(corpus)
    for r in rows.values():
        r["documents_per_s"] = n / r["wall_s"]
        r["documents_per_cpu_s"] = n / r["cpu_s"]
        r["documents_per_machine_cpu_s"] = n / r["machine_cpu_s"]  # Ray's own processes counted too

    a = load_index(work / "local", encoder=encoder, load_dense_encoder=encoder is not None)
    b = load_index(work / "ray", encoder=encoder, load_dense_encoder=encoder is not None)
    queries = list(data.queries.values())
    same_bm25 = sum(
        [h.doc_id for h in x] == [h.doc_id for h in y] for x, y in zip(a.bm25.search_batch(queries, 100), b.bm25.search_batch(queries, 100))
    )
    check: dict[str, Any] = {"bm25_identical_top100_queries": same_bm25, "queries": len(queries)}
    if encoder is not None:
        va = a.dense._cpu_index.reconstruct_n(0, a.dense.num_vectors)
        vb = b.dense._cpu_index.reconstruct_n(0, b.dense.num_vectors)
        check["dense_max_abs_diff"] = float(np.abs(va - vb).max())
        check["dense_identical_top100_queries"] = sum(
            [h.doc_id for h in x] == [h.doc_id for h in y] for x, y in zip(a.dense.search_batch(queries, 100), b.dense.search_batch(queries, 100))
        )
    print(check)
    results = {"documents": n, "dense_model": args.dense_model if encoder is not None else None, "builds": rows, "equality": check}
    base = rows["local (1 process)"]
    md = run.header_markdown("Index build throughput: local vs Ray")
    md += (
        f"SciFact corpus ({n:,} documents), BM25 (bm25s, lucene){' + dense (' + args.dense_model + f', max_length {args.dense_max_length}, Flat)' if encoder else ''}, no chunking. "
        f"Local: one process, torch on every core. Ray: a local instance, {args.workers} workers × {args.cpus_per_worker:g} CPU "
        f"(BM25 tokenising tasks, scoring and encoder actor pools), batches of {args.batch_documents} documents. CPU-seconds: the local process's "
        "(all threads); for Ray the workers' time in the build functions plus the driver's. Machine CPU-s: every process on the machine during the build (/proc/stat), "
        "which for Ray counts its own processes (raylet, GCS, dashboard, idle workers) too; the per-CPU-second comparison uses it.\n\n"
    )
    md += md_table(
        ["build", "wall s", "documents/s", "CPU-s (build processes)", "machine CPU-s", "documents per machine CPU-s", "vs local (documents/s)", "vs local (per machine CPU-s)"],
        [(k, f"{r['wall_s']:.1f}", f"{r['documents_per_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['machine_cpu_s']:.1f}", f"{r['documents_per_machine_cpu_s']:.1f}", f"{r['documents_per_s'] / base['documents_per_s']:.2f}x", f"{r['documents_per_machine_cpu_s'] / base['documents_per_machine_cpu_s']:.2f}x") for k, r in rows.items()],
    )
    ray_row = rows[f"--ray, {args.workers} workers"]
    md += "\nRay stages (wall s): " + ", ".join(f"{k} {v:.1f}" for k, v in ray_row["stages_s"].items()) + "; worker CPU-s: " + ", ".join(f"{k} {v:.1f}" for k, v in ray_row["worker_cpu_s"].items()) + "\n\n"
    md += f"Equality: BM25 top-100 identical for {same_bm25}/{len(queries)} test queries"
    if encoder is not None:
        md += f"; dense vectors max |diff| {check['dense_max_abs_diff']:.2e}, dense top-100 identical for {check['dense_identical_top100_queries']}/{len(queries)}"
    md += ".\n"
    run.write(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
