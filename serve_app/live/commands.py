"""``serve-app ingest`` and ``serve-app merge``: live writes from the command line.

``ingest`` appends documents (or deletions) to an index's write log as durable batches, the
same batches the ``DocumentWriter`` deployment writes: a running service on the same log picks
them up within its refresh interval (its followers read the log through the writer), a stopped
one when it starts. ``merge`` folds the log into a new base index (atomic swap).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

from serve_app.commands.core import UsageError, _shards as parse_shards, add_ray_options, ray_options
from serve_app.config import WritesConfig


def _shards(index_dir: Path, spec: Optional[str]) -> dict[str, int]:
    """The shard counts of the sharded retrievers: ``--shards`` when given, else the one shard
    set of each retriever the index holds."""
    if spec:
        return {k: v for k, v in parse_shards(spec).items() if v > 1}
    found: dict[str, list[int]] = {}
    for d in sorted((index_dir / "shards").glob("*-*")):
        name, _, n = d.name.rpartition("-")
        if name in ("bm25", "dense") and n.isdigit():
            found.setdefault(name, []).append(int(n))
    many = {k: v for k, v in found.items() if len(v) > 1}
    if many:
        raise UsageError(f"{index_dir} holds several shard sets ({many}): say which the service uses with --shards")
    return {k: v[0] for k, v in found.items()}


def open_writer(index_dir: str, log_dir: Optional[str], shards: Optional[str]) -> Any:
    """A :class:`~serve_app.live.writer.DocumentWriter` of ``index_dir`` with the index's own encoder."""
    from serve_app.index import read_manifest
    from serve_app.index.load import dense_config_of, load_query_encoder
    from serve_app.live.writer import DocumentWriter

    d = Path(index_dir).expanduser().absolute()
    manifest = read_manifest(d)
    encoder = load_query_encoder(d, dense_config_of(d, manifest)) if manifest.dense is not None else None
    return DocumentWriter(d, WritesConfig(log_dir=log_dir), encoder=encoder, shards=_shards(d, shards))


def cmd_ingest(args: argparse.Namespace) -> int:
    """Append a JSONL file of documents (``id``/``_id``, ``text``, ``title``, ``metadata``) to an
    index's write log as durable batches; with --delete, the file lists ids to delete."""
    from serve_app.corpus import read_corpus

    options = ray_options(args)
    if options is not None and not args.merge:
        raise UsageError("--ray applies to the merge: add --merge")
    writer = open_writer(args.index, args.log_dir, args.shards)
    t0 = time.perf_counter()
    n = absent = 0
    try:
        if args.delete:
            ids = []
            with open(args.file, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        obj = json.loads(line) if line.startswith("{") else line
                        ids.append(obj.get("id", obj.get("_id")) if isinstance(obj, dict) else obj)
            for i in range(0, len(ids), args.batch_size):
                r = writer.delete(ids[i : i + args.batch_size])
                n += len(r.ids)
                absent += len(r.absent)
        else:
            docs = list(read_corpus(args.file).corpus)
            for i in range(0, len(docs), args.batch_size):
                r = writer.upsert(docs[i : i + args.batch_size])
                n += len(r.ids)
        seconds = time.perf_counter() - t0
        what = "deleted" if args.delete else "written"
        print(f"{n} documents {what} in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f}/s), log at batch {writer.last_seq}" + (f"; {absent} ids were absent" if absent else "") + f" ({writer.log.path})")
        if args.merge:
            from serve_app.live.merge import merge

            report = merge(writer, show_progress=not args.quiet, ray=options)
            print(f"merged up to batch {report.base_seq}: {report.documents} documents in {report.seconds:.1f} s")
    finally:
        writer.close()
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold an index's write log into a new base index (atomic swap; writes after it stay in the log).
    With --ray, the new base is a Ray build of the live documents; a shards-only index always
    merges on Ray and stays shards-only."""
    from serve_app.live.merge import merge

    options = ray_options(args)
    writer = open_writer(args.index, args.log_dir, args.shards)
    try:
        report = merge(writer, show_progress=not args.quiet, ray=options)
    finally:
        writer.close()
    print(f"merged up to batch {report.base_seq} into {args.index}: {report.documents} documents in {report.seconds:.1f} s ({report.vectors_reused} vectors reused, {report.vectors_encoded} encoded)")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``ingest`` and ``merge`` sub-commands."""
    for name, func, help_ in (("ingest", cmd_ingest, "append documents (or deletions) to an index's write log"), ("merge", cmd_merge, "fold an index's write log into a new base index")):
        p = subparsers.add_parser(name, help=help_, description=func.__doc__)
        p.add_argument("--index", required=True, help="the index directory")
        if name == "ingest":
            p.add_argument("file", help="JSONL documents (corpus format), or with --delete ids (one per line or {\"id\": ...})")
            p.add_argument("--delete", action="store_true", help="the file lists ids to delete")
            p.add_argument("--batch-size", type=int, default=500, help="documents per batch (default: 500)")
            p.add_argument("--merge", action="store_true", help="merge the log into a new base afterwards")
        p.add_argument("--log-dir", default=None, help="the write log's directory (default: INDEX.writes beside the index; as writes.log_dir)")
        p.add_argument("--shards", default=None, metavar="RETRIEVER=N[,...]", help="the shard counts the service uses (default: the index's shard sets)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        add_ray_options(p, "the merge writes the new base as `serve-app index --ray` does" + (" (with --merge)" if name == "ingest" else ""))
        p.set_defaults(func=func)
