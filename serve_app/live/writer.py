"""The one writer of an index: validates batches, logs them durably, tells followers about them.

:class:`DocumentWriter` is the core of the ``DocumentWriter`` Serve deployment (one replica)
and of ``serve-app ingest``; it runs without Ray. For each batch it

1. validates the whole batch (:func:`~serve_app.live.changes.check_upserts`,
   :func:`~serve_app.live.changes.check_deletes`): a bad batch is refused before anything is
   written;
2. encodes the new documents' chunks with the index's bi-encoder (when the index is dense), so
   that replicas and shards receive vectors and load no model for writes;
3. inside the log's write transaction, reads what the batch replaces (the live version of each
   id: the log's last change of it, or the base document store), computes the batch's effect on
   the BM25 statistics (:func:`~serve_app.live.bm25.batch_stats`) and which shard holds each
   document, and commits with ``fsync`` (:class:`~serve_app.live.log.WriteLog`); only then is
   the batch acknowledged with its sequence number.

Followers (every retriever replica and shard, every ingress replica) pull batches with
:meth:`changes_since`, report the sequence number they have applied, and learn
:attr:`visible_seq`: the highest batch every live follower has applied, which searches read as
of. ``refresh=wait_for`` waits until the batch's number is visible (:meth:`wait_visible`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from serve_app.config import WritesConfig
from serve_app.errors import Forbidden, IndexLoadError
from serve_app.filters import Node, matches
from serve_app.live.bm25 import CorpusStats, batch_stats
from serve_app.live.changes import DELETE, UPSERT, Batch, Change, StatsDelta, check_deletes, check_upserts, owner_shard
from serve_app.live.log import LogReader, WriteLog
from serve_app.types import Document

logger = logging.getLogger(__name__)


def default_log_dir(index_dir: str | os.PathLike[str]) -> Path:
    """Where the write log lives unless ``writes.log_dir`` says: ``<index_dir>.writes`` beside the index
    (outside it: a merge replaces the index directory, never the log)."""
    d = Path(index_dir).expanduser().absolute()
    return d.parent / f"{d.name}.writes"


@dataclass(frozen=True)
class WriteResult:
    """What a write batch did: its sequence number (None when nothing changed), the ids it
    changed, and for deletes the ids that were not there."""

    seq: Optional[int]
    ids: tuple[str, ...]
    absent: tuple[str, ...] = ()
    visible: Optional[bool] = None


@dataclass
class _Follower:
    applied: int
    seen: float
    base_seq: int


@dataclass(frozen=True)
class Changes:
    """The answer to a follower's poll."""

    batches: tuple[Batch, ...]
    last_seq: int
    visible_seq: int
    base_seq: int
    generation: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)


class DocumentWriter:
    """Writes of one index (see the module docstring).

    ``encoder``: the index's bi-encoder (required when the index has a dense retriever);
    ``shards``: shard counts of the sharded retrievers (``{"bm25": 4}``), whose owners are
    recorded with every change.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike[str],
        cfg: WritesConfig,
        *,
        encoder: Any = None,
        shards: Optional[Mapping[str, int]] = None,
        clock: Any = time.monotonic,
    ) -> None:
        from serve_app.fsutil import read_json
        from serve_app.index import BM25_DIR, load_document_store, read_manifest
        from serve_app.retrieval.bm25 import Tokenizer

        self.index_dir = Path(index_dir).expanduser().absolute()
        self.cfg = cfg
        self.clock = clock
        manifest = read_manifest(self.index_dir)
        self.manifest = manifest
        self.chunking = manifest.chunking
        self.tokenizer = Tokenizer.from_json(read_json(self.index_dir / BM25_DIR / "tokenizer.json", "BM25 tokenizer")) if manifest.bm25 else None
        if manifest.dense is not None and encoder is None:
            raise IndexLoadError(f"{self.index_dir}: the index has a dense retriever; the writer needs its bi-encoder ({manifest.dense.get('model')}) to encode new documents")
        self.encoder = encoder
        self.base, _ = load_document_store(self.index_dir)
        self.log = WriteLog(Path(cfg.log_dir).expanduser() if cfg.log_dir else default_log_dir(self.index_dir))
        writes = manifest.writes or {}
        self.base_seq = int(writes.get("base_seq", 0))
        self.generation = str(writes.get("generation", manifest.corpus.sha256[:16]))
        self._check_log_base()
        self.shards = {r: int(n) for r, n in (shards or {}).items() if int(n) > 1}
        self._owners_of_base = {r: self._shard_owners(r, n) for r, n in self.shards.items()}
        self._followers: dict[str, _Follower] = {}
        self._lock = threading.Lock()
        self._visible_changed = threading.Condition()
        self._base_stats: Optional[CorpusStats] = None

    # ----------------------------------------------------------------- setup

    def _check_log_base(self) -> None:
        log_gen = self.log.meta("generation")
        log_base = int(self.log.meta("base_seq", "0") or 0)
        if log_gen is None:
            self.log.set_meta(generation=self.generation, base_seq=self.base_seq, index_dir=str(self.index_dir))
            return
        if log_gen != self.generation and log_gen == (self.manifest.writes or {}).get("previous_generation"):
            # a merge swapped the new base in and stopped before the log recorded it: finish it
            self.log.adopt(self.generation, self.base_seq)
            log_gen, log_base = self.generation, self.base_seq
        if log_gen != self.generation:
            raise IndexLoadError(
                f"{self.log.path}: this write log belongs to another build of {self.index_dir} (generation {log_gen}, the index is {self.generation}); "
                "the index was rebuilt without its log: move the log away to start a new one, or rebuild from the log's documents with serve-app merge"
            )
        if log_base != self.base_seq:
            self.log.set_meta(base_seq=self.base_seq)

    def _shard_owners(self, retriever: str, n: int) -> dict[str, int]:
        """The shard of every base document of a sharded retriever (from the shard set's own id lists)."""
        from serve_app.index import shard_dir, shard_set_dir
        from serve_app.index.files import BM25_DIR, DENSE_DIR
        from serve_app.fsutil import read_json

        set_dir = shard_set_dir(self.index_dir, retriever, n)
        out: dict[str, int] = {}
        sub = BM25_DIR if retriever == "bm25" else DENSE_DIR
        for i in range(n):
            for doc_id in read_json(shard_dir(set_dir, i) / sub / "doc_ids.json", "shard document ids"):
                out[doc_id] = i
        return out

    def adopt_base(self) -> None:
        """Read the base a merge just wrote (under the write lock: no batch interleaves) and
        record it in the log; batches folded into the previous base are pruned unless a
        follower still reads an older one."""
        from serve_app.index import load_document_store, read_manifest

        with self._lock:
            manifest = read_manifest(self.index_dir)
            writes = manifest.writes or {}
            previous = self.base_seq
            self.manifest = manifest
            self.base_seq = int(writes.get("base_seq", 0))
            self.generation = str(writes.get("generation"))
            self.base, _ = load_document_store(self.index_dir)
            self._owners_of_base = {r: self._shard_owners(r, n) for r, n in self.shards.items()}
            self._base_stats = None
            self.log.adopt(self.generation, self.base_seq)
            now = self.clock()
            oldest = min((f.base_seq for f in self._followers.values() if now - f.seen <= self.cfg.follower_timeout_s), default=previous)
            self.log.prune(min(previous, oldest))

    def base_stats(self) -> Optional[CorpusStats]:
        """The whole base's BM25 statistics (chunks, length, document frequencies), counted once."""
        if self.tokenizer is None:
            return None
        if self._base_stats is None:
            from serve_app.chunking import split_documents

            texts, _ = split_documents(list(self.base), self.chunking)
            self._base_stats = CorpusStats.of_tokens(self.tokenizer(texts))
        return self._base_stats

    # ----------------------------------------------------------------- reads

    def _live(self, reader: LogReader, ids: Sequence[str]) -> dict[str, tuple[Optional[Document], dict[str, int]]]:
        """The live version of each id and the shards that hold it (absent ids left out)."""
        current = reader.current(ids)
        out: dict[str, tuple[Optional[Document], dict[str, int]]] = {}
        from_base = [i for i in ids if i not in current]
        positions = self.base.positions(from_base) if from_base else {}
        if positions:
            for doc in self.base.get_many(list(positions)):
                if doc is not None:
                    out[doc.id] = (doc, {r: owners[doc.id] for r, owners in self._owners_of_base.items()})
        for doc_id, (seq, deleted, owners) in current.items():
            if not deleted:
                out[doc_id] = (reader.document_at(doc_id, seq), owners)
        return out

    def base_info(self, with_stats: bool = False) -> dict[str, Any]:
        """What a follower needs to start: the base's sequence number and generation, the last
        batch, and (``with_stats``: shards) the whole base's BM25 statistics, all of one base:
        read under the write lock, so a merge's :meth:`adopt_base` cannot pair the new base's
        generation with the previous base's statistics (a shard replica that loaded such a pair
        missed every term written between the two bases)."""
        with self._lock:
            return {"base_seq": self.base_seq, "generation": self.generation, "last_seq": self.last_seq, "stats": self.base_stats() if with_stats else None}

    def get(self, doc_id: str) -> Optional[Document]:
        """The live document ``doc_id`` (None when absent or deleted)."""
        found = self._live(self.log.reader(), [doc_id]).get(doc_id)
        return None if found is None else found[0]

    @property
    def last_seq(self) -> int:
        return max(self.log.last_seq, self.base_seq)

    # ----------------------------------------------------------------- writes

    def upsert(self, items: Sequence[Any], guard: Optional[Node] = None) -> WriteResult:
        """Add or replace documents (one batch); returns once the batch is durable.

        ``guard``: the bound filter of the API key that writes (:mod:`serve_app.filters`): every
        document written, and the version it replaces, must pass it, else :class:`Forbidden`
        and nothing is written (a key bound to one tenant cannot overwrite another's document)."""
        docs = check_upserts(items, self.cfg)
        if guard is not None:
            for i, d in enumerate(docs):
                if not matches(guard, d.metadata):
                    raise Forbidden(f"documents[{i}]: its metadata is outside the API key's filter; nothing was written")
        vectors: list[Any] = [None] * len(docs)
        if self.encoder is not None:
            from serve_app.chunking import split_documents

            texts, owner = split_documents(docs, self.chunking)
            encoded = self.encoder.encode_documents(texts)
            for i in range(len(docs)):
                vectors[i] = encoded[owner == i]

        def prepare(reader: LogReader) -> tuple[list[Change], StatsDelta]:
            live = self._live(reader, [d.id for d in docs])
            if guard is not None:
                for i, d in enumerate(docs):
                    old = live.get(d.id)
                    if old is not None and old[0] is not None and not matches(guard, old[0].metadata):
                        raise Forbidden(f"documents[{i}]: the id is held by a document outside the API key's filter; nothing was written")
            changes = [Change(UPSERT, d.id, d, v, self._owners(d.id, live.get(d.id))) for d, v in zip(docs, vectors)]
            return changes, self._stats([live[d.id][0] for d in docs if d.id in live], docs)

        with self._lock:
            batch = self.log.append(prepare)
        return WriteResult(batch.seq, tuple(d.id for d in docs))

    def delete(self, ids: Sequence[Any], guard: Optional[Node] = None) -> WriteResult:
        """Delete documents by id (one batch; idempotent): the answer lists the ids that were
        absent. ``guard``: the writing key's bound filter: a document outside it is neither
        deleted nor revealed (it is listed as absent, as an id never written is)."""
        wanted = check_deletes(ids, self.cfg)
        absent: list[str] = []

        def visible(reader: LogReader) -> dict[str, tuple[Optional[Document], dict[str, int]]]:
            live = self._live(reader, wanted)
            if guard is None:
                return live
            return {i: v for i, v in live.items() if v[0] is not None and matches(guard, v[0].metadata)}

        def prepare(reader: LogReader) -> tuple[list[Change], StatsDelta]:
            live = visible(reader)
            absent.extend(i for i in wanted if i not in live)
            changes = [Change(DELETE, i, None, None, live[i][1]) for i in wanted if i in live]
            return changes, self._stats([live[i][0] for i in wanted if i in live], [])

        with self._lock:
            # nothing to delete: no batch (a delete of absent ids changes nothing)
            live_now = visible(self.log.reader())
            if not live_now:
                return WriteResult(None, (), tuple(wanted))
            batch = self.log.append(prepare)
        return WriteResult(batch.seq, tuple(c.doc_id for c in batch.changes), tuple(absent))

    def _owners(self, doc_id: str, live: Optional[tuple[Optional[Document], dict[str, int]]]) -> dict[str, int]:
        current = live[1] if live is not None else {}
        return {r: owner_shard(doc_id, current.get(r), n) for r, n in self.shards.items()}

    def _stats(self, removed: Sequence[Optional[Document]], added: Sequence[Document]) -> StatsDelta:
        if self.tokenizer is None:
            return StatsDelta()
        return batch_stats([d for d in removed if d is not None], added, self.tokenizer, self.chunking)

    # ----------------------------------------------------------------- followers

    def changes_since(self, since: int, *, follower: Optional[str] = None, applied: Optional[int] = None, base_seq: Optional[int] = None, limit: int = 256) -> Changes:
        """Batches after ``since`` for a follower, which reports what it has applied."""
        if follower:  # a reloading replica reads without reporting
            self.report(follower, applied if applied is not None else since, base_seq if base_seq is not None else self.base_seq)
        batches = tuple(self.log.batches_since(since, limit))
        return Changes(batches, self.last_seq, self.visible_seq, self.base_seq, self.generation)

    def report(self, follower: str, applied: int, base_seq: int) -> None:
        with self._visible_changed:
            before = self.visible_seq
            self._followers[follower] = _Follower(int(applied), self.clock(), int(base_seq))
            if self.visible_seq != before:
                self._visible_changed.notify_all()

    def forget(self, follower: str) -> None:
        with self._visible_changed:
            self._followers.pop(follower, None)
            self._visible_changed.notify_all()

    def live_followers(self) -> dict[str, int]:
        now = self.clock()
        return {k: f.applied for k, f in self._followers.items() if now - f.seen <= self.cfg.follower_timeout_s}

    @property
    def visible_seq(self) -> int:
        """The last batch every live follower has applied (the last batch when none follows)."""
        live = self.live_followers()
        return min(live.values()) if live else self.last_seq

    def wait_visible(self, seq: int, timeout_s: Optional[float] = None) -> bool:
        """Block until batch ``seq`` is visible to every live follower, or ``timeout_s`` passes."""
        deadline = time.monotonic() + (self.cfg.wait_for_timeout_s if timeout_s is None else timeout_s)
        with self._visible_changed:
            while self.visible_seq < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._visible_changed.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        self.log.close()


__all__ = ["Changes", "DocumentWriter", "WriteResult", "default_log_dir"]
