"""The on-disk document store: text lookup by id without holding the corpus in memory.

``documents.jsonl`` is the index's portable copy of the corpus, but reading it means holding
every document in the reader's memory (about the corpus size in each ingress replica). The
index build also writes ``documents.sqlite``: one table ``documents(pos INTEGER PRIMARY KEY,
id TEXT UNIQUE, title, text, metadata)`` in document order: a lookup by id walks the id index,
then the table by position. (A ``WITHOUT ROWID`` table keyed by id would save that second
search, but SQLite keeps only a small part of a row on such a B-tree page and spills the rest to
overflow pages of their own: with ~1 KB documents that tripled the file, 3,340 bytes per
document of 1,094 bytes of text, measured by ``benchmarks.sizing``. Stores written that way
are still read.) :class:`SqliteDocumentStore` opens it read-only and immutable (no locks, no journal:
several replicas on a node share the file and the page cache), with SQLite's memory-mapped
I/O sized to the file, so a replica's memory holds only the pages it touched, and keeps the
connections it opened at load, so it reads one build however often the index is rebuilt.

Why SQLite: it is in Python's standard library (no new dependency), its file format is stable
and documented, a read-only immutable open is safe for any number of processes, and a primary
key lookup is one B-tree search (microseconds once the pages are cached). LMDB would be
marginally faster per lookup but needs a binding package and a fixed map size; a hand-made
offset file would need its own format and tests. The file is covered by the manifest's sha256
like every other index file; since hashing it is linear in its size (133 GB at 100 million
documents), a replica start hashes it once per file identity and node
(:func:`serve_app.index.files.verify_once`), then trusts the size, inode and mtime.

Example:

>>> import tempfile, pathlib
>>> from serve_app.types import Document
>>> path = pathlib.Path(tempfile.mkdtemp()) / "documents.sqlite"
>>> write_document_store([Document("d1", "the sun shines", "Sun")], path)
1
>>> store = SqliteDocumentStore(path)
>>> store.get("d1").content, store.get("nope"), len(store)
('Sun the sun shines', None, 1)
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from serve_app.errors import IndexLoadError
from serve_app.types import Document

DOCSTORE = "documents.sqlite"
#: Connections a reader opens at load (lookups running at once; the rest wait for one).
DEFAULT_POOL = 8
_BATCH = 10_000


def write_document_store(documents: Iterable[Document], path: str | os.PathLike[str]) -> int:
    """Write ``documents`` (in order) to a new SQLite store at ``path``; returns how many.

    Refuses a repeated id (``ValueError``). The file is written and closed completely before
    this returns (the index build then renames its directory into place).
    """
    p = Path(path)
    if p.exists():
        p.unlink()
    con = sqlite3.connect(str(p))
    try:
        con.execute("PRAGMA journal_mode = OFF")
        con.execute("PRAGMA synchronous = OFF")
        con.execute("CREATE TABLE documents (pos INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, title TEXT NOT NULL, text TEXT NOT NULL, metadata TEXT)")
        n = 0
        batch: list[tuple[int, str, str, str, Optional[str]]] = []
        try:
            for d in documents:
                batch.append((n, d.id, d.title, d.text, json.dumps(dict(d.metadata), ensure_ascii=False, separators=(",", ":")) if d.metadata else None))
                n += 1
                if len(batch) >= _BATCH:
                    con.executemany("INSERT INTO documents VALUES (?, ?, ?, ?, ?)", batch)
                    batch.clear()
            con.executemany("INSERT INTO documents VALUES (?, ?, ?, ?, ?)", batch)
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"{p}: repeated document id ({exc})") from None
        con.execute("CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID")
        con.execute("INSERT INTO info VALUES ('documents', ?)", (str(n),))
        con.commit()
        con.execute("VACUUM")
    finally:
        con.close()
    return n


class SqliteDocumentStore:
    """Read-only documents by id from a store written by :func:`write_document_store`.

    **One build, pinned.** The connections are opened when the store is opened (``pool``
    of them, default :data:`DEFAULT_POOL`), each reading the file once, and lookups borrow one:
    an open SQLite connection keeps reading the file it opened even after an index rebuild
    renames another build into the same path, so every lookup of this store reads the build
    the load resolved (a connection opened later, by path, could read the next one).

    **Memory-mapped I/O** of ``mmap_bytes`` per connection (default: the file's size, so the
    whole store is mapped), within SQLite's compile-time ceiling ``SQLITE_MAX_MMAP_SIZE``
    (commonly 2 GiB, 0x7fff0000): :attr:`mmap_bytes_effective` is what SQLite accepted; past
    it the rest of the file is read with ``read()`` through SQLite's page cache, which is
    correct, only slower per lookup (``benchmarks/docstore_lookups.py`` measures both).

    Thread-safe: lookups may run in any thread (the ingress runs them in worker threads, off
    its event loop); at most ``pool`` run at once, the others wait for a connection.
    """

    def __init__(self, path: str | os.PathLike[str], *, mmap_bytes: Optional[int] = None, pool: int = DEFAULT_POOL) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise IndexLoadError(f"{self.path}: no such document store")
        self.size = self.path.stat().st_size
        self.mmap_bytes = int(mmap_bytes) if mmap_bytes is not None else max(self.size, 1 << 20)
        self._pool: "queue.SimpleQueue[sqlite3.Connection]" = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        try:
            for _ in range(max(1, int(pool))):
                con = self._open()
                self._all.append(con)
                self._pool.put(con)
            row = self._all[0].execute("SELECT value FROM info WHERE key = 'documents'").fetchone()
            self.mmap_bytes_effective = int(self._all[0].execute("PRAGMA mmap_size").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            self.close()
            raise IndexLoadError(f"{self.path}: not a readable document store ({exc}); rebuild the index") from None
        if row is None:
            self.close()
            raise IndexLoadError(f"{self.path}: the document store has no document count; rebuild the index")
        self._len = int(row[0])
        self._st_ino = os.stat(self.path).st_ino

    def _open(self) -> sqlite3.Connection:
        con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        con.execute(f"PRAGMA mmap_size = {self.mmap_bytes}")
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the file is open and read now: pinned
        return con

    @contextlib.contextmanager
    def _con(self) -> Iterator[sqlite3.Connection]:
        con = self._pool.get()
        try:
            yield con
        finally:
            self._pool.put(con)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, doc_id: object) -> bool:
        if not isinstance(doc_id, str):
            return False
        with self._con() as con:
            return con.execute("SELECT 1 FROM documents WHERE id = ?", (doc_id,)).fetchone() is not None

    @staticmethod
    def _doc(row: Sequence) -> Document:
        """A (id, title, text, metadata) row as a Document."""
        return Document(row[0], row[2], row[1], json.loads(row[3]) if row[3] else {})

    def get(self, doc_id: str) -> Optional[Document]:
        """The document with id ``doc_id``, None when the store has none."""
        with self._con() as con:
            row = con.execute("SELECT id, title, text, metadata FROM documents WHERE id = ?", (doc_id,)).fetchone()
        return None if row is None else self._doc(row)

    def get_many(self, doc_ids: Sequence[str]) -> list[Optional[Document]]:
        """The documents of ``doc_ids`` in that order (None for an unknown id), one query per 500."""
        found: dict[str, Document] = {}
        ids = list(dict.fromkeys(doc_ids))
        with self._con() as con:
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                rows = con.execute(f"SELECT id, title, text, metadata FROM documents WHERE id IN ({','.join('?' * len(part))})", part).fetchall()
                for row in rows:
                    found[row[0]] = self._doc(row)
        return [found.get(d) for d in doc_ids]

    def positions(self, doc_ids: Sequence[str]) -> dict[str, int]:
        """Index positions of those of ``doc_ids`` the store holds."""
        out: dict[str, int] = {}
        ids = list(dict.fromkeys(doc_ids))
        with self._con() as con:
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                out.update((r[0], int(r[1])) for r in con.execute(f"SELECT id, pos FROM documents WHERE id IN ({','.join('?' * len(part))})", part))
        return out

    def check(self) -> None:
        """Raise unless the store answers: its file is still at its path and still an SQLite
        file, and a real row is read through a pinned connection (the health check)."""
        try:
            with open(self.path, "rb") as f:
                header = f.read(16)
        except OSError as exc:
            raise IndexLoadError(f"{self.path}: the document store cannot be read ({exc.strerror or exc})") from None
        if header != b"SQLite format 3\x00":
            raise IndexLoadError(f"{self.path}: the file at the document store's path is no longer an SQLite database")
        if self._len:
            with self._con() as con:
                row = con.execute("SELECT id FROM documents WHERE pos = (SELECT max(pos) FROM documents)").fetchone()
            if row is None:
                raise IndexLoadError(f"{self.path}: the document store returned no row for its last document")

    @property
    def ids(self) -> list[str]:
        """Every id in document order (reads the whole id column: for checks, not for serving)."""
        with self._con() as con:
            return [r[0] for r in con.execute("SELECT id FROM documents ORDER BY pos")]

    def __iter__(self) -> Iterator[Document]:
        after = -1
        while True:
            with self._con() as con:  # a page at a time: the connection goes back between pages
                rows = con.execute("SELECT pos, id, title, text, metadata FROM documents WHERE pos > ? ORDER BY pos LIMIT ?", (after, _BATCH)).fetchall()
            if not rows:
                return
            for row in rows:
                yield self._doc(row[1:])
            after = rows[-1][0]

    def close(self) -> None:
        for con in self._all:
            con.close()
        self._all.clear()
        self._pool = queue.SimpleQueue()
