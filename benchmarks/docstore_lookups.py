"""Document store lookups on a store larger than 1 GiB, by memory-mapped window.

Command::

    python -m benchmarks.docstore_lookups                      # 1,300,000 synthetic documents (~1.3 GiB store)
    python -m benchmarks.docstore_lookups --documents 20000 --lookups 500 --repeats 1   # a smoke run

The store is synthetic (generated words, seeded; sizes and speeds only) and written once into
``--work``. Each measurement runs in a fresh child process that opens the store with one
``mmap_size`` and then makes the lookups the ingress makes: ``get_many`` of 200 random ids
(one ``/search``'s fused candidates), timed one call at a time. Windows compared, interleaved
in each repeat:

* ``1 GiB``: the fixed window readers had before (the file's tail read with ``read()``);
* ``file size``: the default now (``SqliteDocumentStore``: the whole file, within SQLite's
  compile-time ceiling, which ``mmap_bytes_effective`` reports);
* ``0``: no memory mapping (every page through SQLite's page cache).

The file's pages are in the OS page cache after it is written (a warm node); the figures do
not describe a cold disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from benchmarks.common import DEFAULT_CACHE, BenchRun, base_parser, md_table, summarize, write_corpus

CHILD = r"""
import json, random, sys, time
from serve_app.index.docstore import SqliteDocumentStore
path, n_docs, lookups, mmap_bytes, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
store = SqliteDocumentStore(path, mmap_bytes=None if mmap_bytes == "file" else int(mmap_bytes))
rng = random.Random(seed)
lat = []
for _ in range(lookups):
    ids = [f"doc{rng.randrange(n_docs):08d}" for _ in range(200)]
    t = time.perf_counter()
    docs = store.get_many(ids)
    lat.append(time.perf_counter() - t)
    assert all(d is not None for d in docs)
lat.sort()
print(json.dumps({"mmap_bytes": store.mmap_bytes, "mmap_bytes_effective": store.mmap_bytes_effective,
                  "p50_ms": lat[len(lat) // 2] * 1e3, "p95_ms": lat[int(len(lat) * 0.95)] * 1e3, "mean_ms": sum(lat) / len(lat) * 1e3}))
"""

WINDOWS = (("1 GiB (before)", str(1 << 30)), ("file size (now)", "file"), ("0 (no mmap)", "0"))


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--documents", type=int, default=1_300_000)
    p.add_argument("--doc-bytes", type=int, default=1000, help="approximate text bytes per document")
    p.add_argument("--lookups", type=int, default=2000, help="get_many calls of 200 ids per child")
    p.add_argument("--work", default=str(DEFAULT_CACHE / "bench" / "docstore"), help="where the synthetic files are written")
    args = p.parse_args(argv)
    run = BenchRun("docstore_lookups", args, args.out)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src, sqlite = work / f"corpus-{args.documents}.jsonl", work / f"documents-{args.documents}.sqlite"

    from serve_app.corpus import load_corpus
    from serve_app.index.docstore import write_document_store

    if not src.is_file():
        write_corpus(src, args.documents, args.doc_bytes, args.seed)
    if not sqlite.is_file():
        write_document_store(load_corpus(src), sqlite)
    size = sqlite.stat().st_size
    print(f"store {sqlite}: {size / 2**30:.2f} GiB, {args.documents} documents")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")) if x)}
    runs: dict[str, list[dict]] = {name: [] for name, _ in WINDOWS}
    for r in range(args.repeats):
        for name, window in WINDOWS:  # interleaved: each repeat runs every window once
            out = subprocess.run([sys.executable, "-c", CHILD, str(sqlite), str(args.documents), str(args.lookups), window, str(args.seed + r)], capture_output=True, text=True, env=env, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1])

    rows, results = [], {"documents": args.documents, "store_bytes": size, "lookups_per_child": args.lookups, "ids_per_lookup": 200, "windows": {}}
    base = summarize(x["p50_ms"] for x in runs[WINDOWS[0][0]])["median"]
    for name, _ in WINDOWS:
        p50 = summarize(x["p50_ms"] for x in runs[name])
        p95 = summarize(x["p95_ms"] for x in runs[name])
        eff = runs[name][0]["mmap_bytes_effective"]
        results["windows"][name] = {"runs": runs[name], "p50_ms": p50, "p95_ms": p95, "mmap_bytes_effective": eff}
        rows.append((name, f"{eff / 2**20:.0f}", f"{p50['median']:.2f} ({p50['min']:.2f}-{p50['max']:.2f})", f"{p95['median']:.2f} ({p95['min']:.2f}-{p95['max']:.2f})", f"{p50['median'] / base:.2f}x"))
    md = run.header_markdown("Document store lookups on a store larger than 1 GiB")
    md += (
        f"{args.documents:,} synthetic documents in a {size / 2**30:.2f} GiB `documents.sqlite`; each child process opens it with one memory-map window and makes "
        f"{args.lookups:,} `get_many` calls of 200 random ids (one `/search`'s candidates), timed one at a time; {args.repeats} repeats, windows interleaved; "
        "median of the repeats (min-max). The file's pages are in the OS page cache (a warm node).\n\n"
    )
    md += md_table(["mmap window", "mapped by SQLite MiB", "get_many(200) p50 ms", "p95 ms", "p50 vs 1 GiB"], rows)
    md += "\n`mapped by SQLite` is `PRAGMA mmap_size` after the request: SQLite caps the window at its compile-time `SQLITE_MAX_MMAP_SIZE`; beyond it pages are read with `read()`.\n"
    run.write(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
