"""A writer process for the crash tests: writes batches (and merges) until it is killed, and
prints each acknowledged batch on stdout the moment the writer returns it.

    python -m tests.live.crash_writer INDEX_DIR RUN [--merge-every N]
"""

from __future__ import annotations

import json
import sys

from serve_app.config import WritesConfig
from serve_app.live.merge import merge
from serve_app.live.writer import DocumentWriter


def main() -> None:
    index_dir, run = sys.argv[1], sys.argv[2]
    merge_every = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--merge-every" else 0
    w = DocumentWriter(index_dir, WritesConfig())
    i = 0
    while True:
        i += 1
        if i % 5 == 0:  # delete half of the batch written two batches ago
            ids = [f"{run}-{i - 2}-{j}" for j in range(0, 20, 2)]
            r = w.delete(ids)
            op = "delete"
        else:
            docs = [{"id": f"{run}-{i}-{j}", "text": f"crash test {run} batch {i} document {j} protein"} for j in range(20)]
            r = w.upsert(docs)
            ids = [d["id"] for d in docs]
            op = "upsert"
        print(json.dumps({"op": op, "seq": r.seq, "ids": list(r.ids), "text": f"crash test {run} batch {i}"}), flush=True)
        if merge_every and i % merge_every == 0:
            print(json.dumps({"op": "merge-start", "seq": w.last_seq}), flush=True)
            merge(w)
            print(json.dumps({"op": "merged", "seq": w.base_seq}), flush=True)


if __name__ == "__main__":
    main()
