"""The driver's memory in a Ray build: ``serve-app index --ray`` (the driver loads the corpus and
assembles the whole index, then cuts its shards) next to ``--ray --shards-only`` (the driver
streams the corpus into the document store, the workers read it and write the shards), on the
same synthetic corpus, side by side.

Command::

    python -m benchmarks.shards_only_build                       # 50,000 and 200,000 documents, bm25=4, 2 repeats
    python -m benchmarks.shards_only_build --documents 20000 --repeats 1   # a quick look

The corpus of each size is generated once and written as JSONL. Each build runs in a fresh
process (the driver) that starts a local Ray instance with ``--workers`` CPUs and builds from
that file as the command line does; it reports its resident memory before the build and its
peak (``VmHWM``) at the end. The two ways alternate (ABAB...). Two corpus sizes give each way's
driver memory per added document (the slope between them), what grows with the corpus and
decides the head's size. Both indexes must hold the same shards: the benchmark loads every shard
of both and compares the BM25 top 100 of ``--queries`` queries, and fails if any differs. BM25
only (the dense side's vectors follow the same path, and encoding a corpus this size on CPU
takes hours); synthetic text as in ``benchmarks.sizing`` (sizes and speeds, no relevance).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import DEFAULT_CACHE, PROC_MEMORY_SNIPPET, BenchRun, base_parser, md_table

CHILD = PROC_MEMORY_SNIPPET + r"""
import json, sys, time
mode, corpus_file, out, shards, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
import ray
from serve_app.config import BM25Config, ChunkingConfig
from serve_app.corpus import read_corpus_source
from serve_app.index.ray_build import RayBuildOptions, build_index_ray
from serve_app.index.ray_shards import build_index_ray_shards_only
from serve_app.serve.runner import start_ray
start_ray(num_cpus=workers, log_to_driver=False)
before = mem()
options = RayBuildOptions(workers=workers, batch_documents=2048, show_progress=False)
t0 = time.perf_counter()
if mode == "shards-only":  # what `serve-app index --ray --shards-only` does: the corpus is streamed
    _, report = build_index_ray_shards_only(corpus_file, out, bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), shards={"bm25": shards}, options=options)
else:  # what `serve-app index --ray` does: the corpus is loaded, the whole index assembled
    corpus = read_corpus_source(corpus_file).corpus
    _, report = build_index_ray(corpus, out, bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), shards={"bm25": shards}, options=options)
wall = time.perf_counter() - t0
ray.shutdown()
end = mem()
print("RESULT " + json.dumps({"mode": mode, "wall_s": wall, "peak_rss_mib": end["VmHWM"], "rss_before_mib": before["VmRSS"], "stages_s": report.stage_seconds}))
"""


def _run(mode: str, corpus_file: Path, out: Path, n: int, args: Any) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(corpus_file), str(out), str(args.shards), str(args.workers)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{mode} build failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    r = json.loads(lines[-1][len("RESULT "):])
    r["documents"] = n
    r["build_peak_mib"] = r["peak_rss_mib"] - r["rss_before_mib"]
    print(f"{mode} ({n} documents): {r['wall_s']:.0f} s, driver peak {r['peak_rss_mib']:.0f} MiB ({r['build_peak_mib']:.0f} above the driver before the build)", flush=True)
    return r


def _write_corpus(path: Path, n: int, seed: int) -> None:
    """The synthetic corpus of ``benchmarks.sizing`` as a JSONL file (generated here, read by the builds)."""
    from benchmarks.sizing import synthetic_corpus, vocabulary
    from serve_app.corpus import write_documents_jsonl

    write_documents_jsonl(synthetic_corpus(n, vocabulary(100_000, seed), 140, 1.07, seed), path)


def _same_shards(a: Path, b: Path, shards: int, n_queries: int, seed: int) -> int:
    """How many queries' top 100 differ between the two indexes' shard sets (0 expected)."""
    import random

    from serve_app.index import load_shards, shard_set_dir

    sa = load_shards(shard_set_dir(a, "bm25", shards))["bm25"]
    sb = load_shards(shard_set_dir(b, "bm25", shards))["bm25"]
    rng = random.Random(seed)
    vocab = list(sa.shards[0]._engine.model.vocab_dict)
    differ = 0
    for _ in range(n_queries):
        q = " ".join(rng.sample(vocab, rng.randint(2, 5)))
        if sa.search(q, 100) != sb.search(q, 100):
            differ += 1
    return differ


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.set_defaults(repeats=2)
    p.add_argument("--documents", default="50000,200000", help="corpus sizes, comma-separated (the largest is also checked for equal shards)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--work", default=str(DEFAULT_CACHE / "bench" / "shards_only_build"))
    args = p.parse_args(argv)
    sizes = sorted(int(x) for x in str(args.documents).split(","))
    run = BenchRun("shards_only_build", args, args.out)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    modes = ("whole", "shards-only")
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {n: {m: [] for m in modes} for n in sizes}
    for n in sizes:
        corpus_file = work / f"corpus-{n}.jsonl"
        _write_corpus(corpus_file, n, args.seed)
        for _ in range(args.repeats):
            for mode in modes:
                runs[n][mode].append(_run(mode, corpus_file, work / mode, n, args))
    largest = sizes[-1]
    differ = _same_shards(work / "whole", work / "shards-only", args.shards, args.queries, args.seed)
    bm25_bytes = sum(f.stat().st_size for f in (work / "whole" / "bm25").rglob("*") if f.is_file())

    def med(n: int, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[n][mode])

    def spread(n: int, mode: str, key: str) -> str:
        vals = [r[key] for r in runs[n][mode]]
        return f"{statistics.median(vals):.0f} ({min(vals):.0f}-{max(vals):.0f})"

    per_doc: dict[str, float] = {}
    if len(sizes) > 1:
        for mode in modes:  # KiB of driver peak per added document, between the smallest and the largest corpus
            per_doc[mode] = (med(largest, mode, "peak_rss_mib") - med(sizes[0], mode, "peak_rss_mib")) * 1024 / (largest - sizes[0])
    results = {
        "sizes": sizes, "shards": args.shards, "workers": args.workers, "runs": {str(n): v for n, v in runs.items()},
        "whole_bm25_index_mib": bm25_bytes / 2**20, "queries_compared": args.queries, "queries_differing": differ,
        "driver_peak_kib_per_document": per_doc,
        "ratios": {
            str(n): {
                "driver_build_peak_shards_only_over_whole": med(n, "shards-only", "build_peak_mib") / med(n, "whole", "build_peak_mib"),
                "driver_peak_shards_only_over_whole": med(n, "shards-only", "peak_rss_mib") / med(n, "whole", "peak_rss_mib"),
                "wall_shards_only_over_whole": med(n, "shards-only", "wall_s") / med(n, "whole", "wall_s"),
            } for n in sizes
        },
    }
    rows = [[f"{n:,}", mode, spread(n, mode, "wall_s"), spread(n, mode, "peak_rss_mib"), spread(n, mode, "rss_before_mib"), spread(n, mode, "build_peak_mib")] for n in sizes for mode in modes]
    md = run.header_markdown("Ray build: the driver's memory, whole index vs shards only")
    md += (
        f"Synthetic documents, BM25 only, `--shards bm25={args.shards}`, {args.workers} Ray workers on this machine; "
        f"each build in a fresh driver process, the two ways alternating, {args.repeats} repeats (median, min-max).\n\n"
        + md_table(["documents", "build", "wall s", "driver peak RSS MiB", "driver RSS before the build MiB", "driver peak above that MiB"], rows)
        + "\n\n"
    )
    r = results["ratios"][str(largest)]
    md += (
        f"At {largest:,} documents (whole-corpus BM25 index on disk: {bm25_bytes / 2**20:.0f} MiB), shards-only / whole: driver peak above its start "
        f"{r['driver_build_peak_shards_only_over_whole']:.2f}x, driver peak {r['driver_peak_shards_only_over_whole']:.2f}x, wall time {r['wall_shards_only_over_whole']:.2f}x. "
    )
    if per_doc:
        md += f"Driver peak per added document ({sizes[0]:,} -> {largest:,}): whole {per_doc['whole']:.2f} KiB, shards-only {per_doc['shards-only']:.2f} KiB. "
    md += f"Same shards: {args.queries - differ} of {args.queries} queries have the same BM25 top 100 on both shard sets.\n"
    run.write(results, md)
    if differ:
        print(f"{differ} queries differ between the two shard sets", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
