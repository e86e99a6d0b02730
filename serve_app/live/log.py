"""The write log: every acknowledged batch, durable, in sequence order (SQLite, WAL, full sync).

One SQLite database (``log.sqlite`` in ``writes.log_dir``) in write-ahead-log mode with
``synchronous=FULL``: a commit returns only once the WAL is fsynced, so a batch the writer
acknowledged survives a crash of the process or the machine, and a batch is one transaction, so
it is applied whole or not at all (SQLite's atomic commit). Tables:

* ``batches(seq, created, stats)``: one row per batch; ``seq`` is its sequence number;
* ``changes(seq, pos, op, id, title, text, metadata, vectors, owners)``: the batch's changes in
  request order, each document with its chunk vectors (float32) when the index is dense;
* ``current(id, seq, pos, deleted, owners)``: the last change of each id written since the base
  index (what the next write of that id replaces, and which shard holds it);
* ``meta(key, value)``: the base generation this log applies to and its ``base_seq`` (batches up
  to it are folded into the base by a merge).

Why SQLite: the project already stores documents in it, it is in Python's standard library, its
WAL gives durable atomic commits and readers that never block the writer, and several processes
(the writer deployment, ``serve-app ingest``) may append safely: an append takes the write lock
before it reads what it replaces (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from serve_app.live.changes import DELETE, UPSERT, Batch, Change, StatsDelta
from serve_app.types import Document

LOG_FILE = "log.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (seq INTEGER PRIMARY KEY, created REAL NOT NULL, stats TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER NOT NULL, pos INTEGER NOT NULL, op TEXT NOT NULL, id TEXT NOT NULL,
    title TEXT, text TEXT, metadata TEXT, vectors BLOB, dim INTEGER, owners TEXT,
    PRIMARY KEY (seq, pos)
);
CREATE TABLE IF NOT EXISTS current (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, pos INTEGER NOT NULL, deleted INTEGER NOT NULL, owners TEXT);
"""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class WriteLog:
    """The durable log of one index's writes (see the module docstring).

    Thread-safe: one connection guarded by a lock (appends are serialised anyway). ``append``
    runs a caller's function inside the write transaction, so what the batch replaces is read
    under the same lock that commits it.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / LOG_FILE
        self._con = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=60.0)
        self._lock = threading.RLock()
        with self._lock:
            self._con.execute("PRAGMA journal_mode = WAL")
            self._con.execute("PRAGMA synchronous = FULL")
            self._con.executescript(_SCHEMA)

    # ----------------------------------------------------------------- meta

    def meta(self, key: str, default: Optional[str] = None) -> Optional[str]:
        with self._lock:
            row = self._con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def set_meta(self, **values: Any) -> None:
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                for k, v in values.items():
                    self._con.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (k, str(v)))
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise

    @property
    def last_seq(self) -> int:
        with self._lock:
            row = self._con.execute("SELECT max(seq) FROM batches").fetchone()
        return int(row[0] or 0) if row[0] is not None else int(self.meta("base_seq", "0") or 0)

    # ----------------------------------------------------------------- writes

    def append(self, prepare: Callable[["LogReader"], tuple[list[Change], StatsDelta]]) -> Batch:
        """Append one batch atomically and durably: ``prepare`` reads what the batch replaces
        (through the reader it is given, inside the write lock) and returns its changes and
        statistics; the commit is fsynced before this returns the batch with its sequence number."""
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                changes, stats = prepare(LogReader(self._con))
                row = self._con.execute("SELECT max(seq) FROM batches").fetchone()
                base = int(self._meta_in(self._con, "base_seq") or 0)
                seq = max(int(row[0] or 0), base) + 1
                self._con.execute("INSERT INTO batches VALUES (?, ?, ?)", (seq, time.time(), stats.to_json()))
                for pos, c in enumerate(changes):
                    d = c.document
                    vec = None if c.vectors is None else np.ascontiguousarray(c.vectors, dtype=np.float32)
                    self._con.execute(
                        "INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (seq, pos, c.op, c.doc_id, d.title if d else None, d.text if d else None, _dumps(dict(d.metadata)) if d and d.metadata else None,
                         None if vec is None else vec.tobytes(), None if vec is None else int(vec.shape[1]), _dumps(dict(c.owners)) if c.owners else None),
                    )
                    self._con.execute(
                        "INSERT INTO current VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, pos = excluded.pos, deleted = excluded.deleted, owners = excluded.owners",
                        (c.doc_id, seq, pos, int(c.op == DELETE), _dumps(dict(c.owners)) if c.owners else None),
                    )
                self._con.execute("COMMIT")  # synchronous=FULL: the WAL is fsynced here
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
        return Batch(seq, tuple(changes), stats)

    @staticmethod
    def _meta_in(con: sqlite3.Connection, key: str) -> Optional[str]:
        row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # ----------------------------------------------------------------- reads

    def batches_since(self, seq: int, limit: int = 256, upto: Optional[int] = None) -> list[Batch]:
        """The batches after ``seq`` (at most ``limit``, none past ``upto``), in order."""
        upto = upto if upto is not None else 1 << 62
        with self._lock:
            heads = self._con.execute("SELECT seq, stats FROM batches WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?", (seq, upto, limit)).fetchall()
            if not heads:
                return []
            rows = self._con.execute(
                "SELECT seq, op, id, title, text, metadata, vectors, dim, owners FROM changes WHERE seq >= ? AND seq <= ? ORDER BY seq, pos", (heads[0][0], heads[-1][0])
            ).fetchall()
        by_seq: dict[int, list[Change]] = {int(s): [] for s, _ in heads}
        for r in rows:
            by_seq[int(r[0])].append(_change(r[1:]))
        return [Batch(int(s), tuple(by_seq[int(s)]), StatsDelta.from_json(st)) for s, st in heads]

    def reader(self) -> "LogReader":
        return LogReader(self._con, self._lock)

    def prune(self, upto_seq: int) -> int:
        """Drop the batches up to ``upto_seq`` (folded into a base every follower has); returns how many."""
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                n = self._con.execute("DELETE FROM batches WHERE seq <= ?", (upto_seq,)).rowcount
                self._con.execute("DELETE FROM changes WHERE seq <= ?", (upto_seq,))
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
        return int(n)

    def adopt(self, generation: str, base_seq: int) -> None:
        """After a merge up to ``base_seq``: the log now applies to the base ``generation``, and
        the ids last written up to it live in that base (one transaction)."""
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                for k, v in (("generation", generation), ("base_seq", str(base_seq))):
                    self._con.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (k, v))
                self._con.execute("DELETE FROM current WHERE seq <= ?", (base_seq,))
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._con.close()


def _change(r: Sequence[Any]) -> Change:
    op, doc_id, title, text, metadata, vectors, dim, owners = r
    doc = None
    vec = None
    if op == UPSERT:
        doc = Document(doc_id, text, title or "", json.loads(metadata) if metadata else {})
        if vectors is not None:
            vec = np.frombuffer(vectors, dtype=np.float32).reshape(-1, int(dim))
    return Change(op, doc_id, doc, vec, json.loads(owners) if owners else {})


class LogReader:
    """Reads of the log's current state (inside an append's transaction, or on their own)."""

    def __init__(self, con: sqlite3.Connection, lock: Optional[threading.RLock] = None) -> None:
        self._con = con
        self._lock = lock or threading.RLock()

    def current(self, ids: Sequence[str]) -> dict[str, tuple[int, bool, dict[str, int]]]:
        """``{id: (seq, deleted, owners)}`` of the ids written since the base."""
        out: dict[str, tuple[int, bool, dict[str, int]]] = {}
        with self._lock:
            for i in range(0, len(ids), 500):
                part = list(ids[i : i + 500])
                for doc_id, seq, deleted, owners in self._con.execute(f"SELECT id, seq, deleted, owners FROM current WHERE id IN ({','.join('?' * len(part))})", part):
                    out[doc_id] = (int(seq), bool(deleted), json.loads(owners) if owners else {})
        return out

    def document_at(self, doc_id: str, seq: int) -> Optional[Document]:
        """The document ``doc_id`` as the change at ``seq`` wrote it (None for a delete)."""
        with self._lock:
            row = self._con.execute("SELECT op, id, title, text, metadata, vectors, dim, owners FROM changes WHERE seq = ? AND id = ?", (seq, doc_id)).fetchone()
        return None if row is None else _change(row).document

    def last_changes_upto(self, seq: int) -> list[tuple[str, int, int, str]]:
        """(id, seq, pos, op) of each id's last change up to batch ``seq``, in log order."""
        with self._lock:
            rows = self._con.execute(
                "SELECT c.id, c.seq, c.pos, c.op FROM changes c JOIN (SELECT id, max(seq) AS s FROM changes WHERE seq <= ? GROUP BY id) m "
                "ON c.id = m.id AND c.seq = m.s ORDER BY c.seq, c.pos",
                (seq,),
            ).fetchall()
        return [(str(r[0]), int(r[1]), int(r[2]), str(r[3])) for r in rows]

    def change(self, seq: int, pos: int) -> Change:
        with self._lock:
            row = self._con.execute("SELECT op, id, title, text, metadata, vectors, dim, owners FROM changes WHERE seq = ? AND pos = ?", (seq, pos)).fetchone()
        if row is None:
            raise KeyError(f"no change ({seq}, {pos}) in the log")
        return _change(row)

    def counts(self) -> tuple[int, int]:
        """(ids live in the log, ids deleted in the log) since the base."""
        with self._lock:
            row = self._con.execute("SELECT count(*) - coalesce(sum(deleted), 0), coalesce(sum(deleted), 0) FROM current").fetchone()
        return int(row[0]), int(row[1])

    def changed_since_base(self) -> Iterator[tuple[str, int, bool]]:
        """(id, seq, deleted) of every id written since the base, in sequence order."""
        with self._lock:
            rows = self._con.execute("SELECT id, seq, deleted FROM current ORDER BY seq, pos").fetchall()
        for doc_id, seq, deleted in rows:
            yield str(doc_id), int(seq), bool(deleted)


__all__ = ["LOG_FILE", "LogReader", "WriteLog"]
