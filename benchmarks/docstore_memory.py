"""Document store memory: the corpus held in memory (documents.jsonl) vs the SQLite store on disk.

Command::

    python -m benchmarks.docstore_memory                       # 1,000,000 synthetic documents of ~1 KB
    python -m benchmarks.docstore_memory --documents 100000

The corpus is synthetic (generated words, seeded; sizes and speeds only, no relevance): each
document about ``--doc-bytes`` bytes of text and a short title. Each measurement runs in a fresh
child process, whose peak RSS (``ru_maxrss``) is reported:

* **in memory** (what an ingress replica did before the store): ``load_corpus(documents.jsonl)``,
  then ``--lookups`` random lookups by id;
* **SQLite store**: ``SqliteDocumentStore(documents.sqlite)``, the same lookups (single thread),
  then the same again from 8 threads;

plus the time to write each file, bytes on disk per document, and lookup latency (p50/p99).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence


from benchmarks.common import write_corpus  # noqa: F401 - shared with other benchmarks (tests import them from here too)
from benchmarks.common import DEFAULT_CACHE, PROC_MEMORY_SNIPPET, BenchRun, base_parser, md_table


CHILD = r"""
import json, os, random, sys, time
from concurrent.futures import ThreadPoolExecutor
mode, path, n_docs, lookups = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(0)
ids = [f"doc{rng.randrange(n_docs):08d}" for _ in range(lookups)]
base = mem()
t0 = time.perf_counter()
if mode == "memory":
    from serve_app.corpus import load_corpus
    store = load_corpus(path)
else:
    from serve_app.index.docstore import SqliteDocumentStore
    store = SqliteDocumentStore(path)
open_s = time.perf_counter() - t0
lat = []
for i in ids:
    t = time.perf_counter()
    d = store.get(i)
    lat.append(time.perf_counter() - t)
    assert d is not None and d.id == i
def chunk(part):
    return sum(1 for i in part if store.get(i).id == i)
t = time.perf_counter()
with ThreadPoolExecutor(8) as pool:
    ok = sum(pool.map(chunk, [ids[k::8] for k in range(8)]))
threads_s = time.perf_counter() - t
assert ok == len(ids)
lat.sort()
end = mem()
print(json.dumps({"mode": mode, "open_s": open_s, "peak_rss_mib": end["VmHWM"], "rss_before_mib": base["VmRSS"], "rss_mib": end["VmRSS"], "anon_mib": end["RssAnon"], "file_mib": end["RssFile"], "anon_added_mib": end["RssAnon"] - base["RssAnon"],
                  "p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6, "threads_lookups_per_s": len(ids) / threads_s}))
"""




def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0], repeats=False)
    p.add_argument("--documents", type=int, default=1_000_000)
    p.add_argument("--doc-bytes", type=int, default=1000, help="approximate text bytes per document")
    p.add_argument("--lookups", type=int, default=20_000)
    p.add_argument("--work", default=str(DEFAULT_CACHE / "bench" / "docstore"), help="where the synthetic files are written")
    args = p.parse_args(argv)
    run = BenchRun("docstore_memory", args, args.out)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src, jsonl, sqlite = work / f"corpus-{args.documents}.jsonl", work / f"documents-{args.documents}.jsonl", work / f"documents-{args.documents}.sqlite"

    from serve_app.corpus import load_corpus, write_documents_jsonl
    from serve_app.index.docstore import write_document_store

    t0 = time.perf_counter()
    if not src.is_file():
        write_corpus(src, args.documents, args.doc_bytes, args.seed)
    gen_s = time.perf_counter() - t0
    corpus = load_corpus(src)
    t0 = time.perf_counter()
    write_documents_jsonl(corpus, jsonl)
    jsonl_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_document_store(corpus, sqlite)
    sqlite_s = time.perf_counter() - t0
    text_bytes = sum(len(d.content.encode()) for d in corpus)
    del corpus
    print(f"{args.documents} documents, {text_bytes / args.documents:.0f} text bytes each; jsonl {jsonl_s:.1f} s, sqlite {sqlite_s:.1f} s")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")) if x)}
    measured = {}
    for mode, path in (("memory", jsonl), ("sqlite", sqlite)):
        out = subprocess.run([sys.executable, "-c", PROC_MEMORY_SNIPPET + CHILD, mode, str(path), str(args.documents), str(args.lookups)], capture_output=True, text=True, env=env, check=True)
        measured[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(mode, measured[mode])

    results = {
        "documents": args.documents, "text_bytes_per_document": text_bytes / args.documents, "generate_s": gen_s,
        "jsonl": {"bytes": jsonl.stat().st_size, "bytes_per_document": jsonl.stat().st_size / args.documents, "write_s": jsonl_s, **measured["memory"]},
        "sqlite": {"bytes": sqlite.stat().st_size, "bytes_per_document": sqlite.stat().st_size / args.documents, "write_s": sqlite_s, "write_documents_per_s": args.documents / sqlite_s, **measured["sqlite"]},
    }
    rows = [
        (name, f"{r['bytes'] / 2**20:.0f}", f"{r['bytes_per_document']:.0f}", f"{r['write_s']:.1f}", f"{r['open_s']:.2f}", f"{r['peak_rss_mib']:.0f}", f"{r['rss_mib']:.0f}", f"{r['anon_added_mib']:.0f}", f"{r['file_mib']:.0f}", f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}", f"{r['threads_lookups_per_s']:.0f}")
        for name, r in (("documents.jsonl held in memory (before)", results["jsonl"]), ("documents.sqlite on disk (after)", results["sqlite"]))
    ]
    md = run.header_markdown("Document store memory: corpus in memory vs SQLite on disk")
    md += (
        f"{args.documents:,} synthetic documents (generated words, seeded: sizes and speeds only), {results['text_bytes_per_document']:.0f} bytes of title + text each; "
        f"{args.lookups:,} random lookups by id in a fresh process per row, then the same from 8 threads. Memory from the child's /proc/self/status after the lookups: "
        "peak RSS (VmHWM), RSS, private memory added since the interpreter started (RssAnon growth: what the store costs the replica alone) and file pages mapped "
        "(RssFile: SQLite's memory-mapped pages, shared with every process on the node through the page cache and dropped by the kernel under pressure).\n\n"
    )
    md += md_table(["store", "file MiB", "bytes per document", "write s", "open s", "peak RSS MiB", "RSS MiB", "private memory added MiB", "file pages MiB", "lookup p50 us", "lookup p99 us", "lookups/s, 8 threads"], rows)
    md += "\nThe dense retriever's replicas do not read the document store at all (their index holds its own id list, index format 2), so their RSS does not depend on it.\n"
    run.write(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
