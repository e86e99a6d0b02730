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
I/O, so a replica's memory holds only the pages it touched.

Why SQLite: it is in Python's standard library (no new dependency), its file format is stable
and documented, a read-only immutable open is safe for any number of processes, and a primary
key lookup is one B-tree search (microseconds once the pages are cached). LMDB would be
marginally faster per lookup but needs a binding package and a fixed map size; a hand-made
offset file would need its own format and tests. The file is covered by the manifest's sha256
like every other index file, so a damaged store is refused at load naming the file.

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

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from serve_app.errors import IndexLoadError
from serve_app.types import Document

DOCSTORE = "documents.sqlite"
#: Memory-mapped I/O window of a reader (SQLite's mmap_size); pages are mapped on first use.
DEFAULT_MMAP_BYTES = 1 << 30
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

    Thread-safe: each thread gets its own connection (SQLite connections are not shared).
    """

    def __init__(self, path: str | os.PathLike[str], *, mmap_bytes: int = DEFAULT_MMAP_BYTES) -> None:
        self.path = Path(path)
        self.mmap_bytes = int(mmap_bytes)
        self._local = threading.local()
        try:
            row = self._con().execute("SELECT value FROM info WHERE key = 'documents'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise IndexLoadError(f"{self.path}: not a readable document store ({exc}); rebuild the index") from None
        if row is None:
            raise IndexLoadError(f"{self.path}: the document store has no document count; rebuild the index")
        self._len = int(row[0])

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            if not self.path.is_file():
                raise IndexLoadError(f"{self.path}: no such document store")
            con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False)
            con.execute(f"PRAGMA mmap_size = {self.mmap_bytes}")
            self._local.con = con
        return con

    def __len__(self) -> int:
        return self._len

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and self._con().execute("SELECT 1 FROM documents WHERE id = ?", (doc_id,)).fetchone() is not None

    @staticmethod
    def _doc(row: Sequence) -> Document:
        """A (id, title, text, metadata) row as a Document."""
        return Document(row[0], row[2], row[1], json.loads(row[3]) if row[3] else {})

    def get(self, doc_id: str) -> Optional[Document]:
        """The document with id ``doc_id``, None when the store has none."""
        row = self._con().execute("SELECT id, title, text, metadata FROM documents WHERE id = ?", (doc_id,)).fetchone()
        return None if row is None else self._doc(row)

    def get_many(self, doc_ids: Sequence[str]) -> list[Optional[Document]]:
        """The documents of ``doc_ids`` in that order (None for an unknown id), one query per 500."""
        found: dict[str, Document] = {}
        con = self._con()
        ids = list(dict.fromkeys(doc_ids))
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            rows = con.execute(f"SELECT id, title, text, metadata FROM documents WHERE id IN ({','.join('?' * len(part))})", part).fetchall()
            for row in rows:
                found[row[0]] = self._doc(row)
        return [found.get(d) for d in doc_ids]

    @property
    def ids(self) -> list[str]:
        """Every id in document order (reads the whole id column: for checks, not for serving)."""
        return [r[0] for r in self._con().execute("SELECT id FROM documents ORDER BY pos")]

    def __iter__(self) -> Iterator[Document]:
        for row in self._con().execute("SELECT id, title, text, metadata FROM documents ORDER BY pos"):
            yield self._doc(row)

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
