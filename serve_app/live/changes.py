"""What a write is: validated batches of upserts and deletes, their statistics, who owns them.

Pure pieces, no I/O: :func:`check_upserts` and :func:`check_deletes` refuse a bad batch
whole (:class:`WriteRejected`, answered 422 at the HTTP edge) before anything is logged;
:class:`Change` and :class:`Batch` are what the write log stores and every replica applies;
:class:`StatsDelta` carries a batch's effect on the BM25 corpus statistics (chunks, total length,
document frequency of each term), computed once by the writer so that every shard keeps the
whole corpus's statistics; :func:`owner_shard` says which shard holds a document.

Example:

>>> from serve_app.config import WritesConfig
>>> docs = check_upserts([{"id": "d1", "text": "the sun shines"}], WritesConfig())
>>> docs[0].id, docs[0].text
('d1', 'the sun shines')
>>> owner_shard("d1", None, 4) == owner_shard("d1", None, 4)
True
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from serve_app.config import WritesConfig
from serve_app.errors import InputRejected
from serve_app.types import Document

UPSERT = "upsert"
DELETE = "delete"


class WriteRejected(InputRejected):
    """A write batch is invalid (duplicate ids, empty or oversized documents, malformed metadata,
    too many documents); nothing of it was applied."""


@dataclass(frozen=True)
class StatsDelta:
    """A batch's change of the BM25 corpus statistics: chunks, their total token length, and
    each term's document (chunk) frequency. Integers: summed in any order they are exact."""

    chunks: int = 0
    length: int = 0
    df: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"chunks": self.chunks, "length": self.length, "df": {t: d for t, d in self.df.items() if d}}, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "StatsDelta":
        obj = json.loads(text)
        return cls(int(obj["chunks"]), int(obj["length"]), {str(t): int(d) for t, d in obj["df"].items()})

    @staticmethod
    def of_chunks(chunk_tokens: Sequence[Sequence[str]], sign: int) -> tuple[int, int, Counter]:
        """(chunks, length, df) of tokenised chunks, times ``sign`` (+1 added, -1 removed)."""
        df: Counter = Counter()
        for toks in chunk_tokens:
            df.update(set(toks))
        if sign < 0:
            df = Counter({t: -c for t, c in df.items()})
        return sign * len(chunk_tokens), sign * sum(len(t) for t in chunk_tokens), df


@dataclass(frozen=True)
class Change:
    """One document's change inside a batch: an upsert carries the document (and its chunk
    vectors when the index has a dense retriever), a delete only the id. ``owners`` names the
    shard of each sharded retriever that holds the document."""

    op: str
    doc_id: str
    document: Optional[Document] = None
    vectors: Optional[np.ndarray] = None
    owners: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Batch:
    """An acknowledged batch: its sequence number, its changes in request order, its statistics."""

    seq: int
    changes: tuple[Change, ...]
    stats: StatsDelta = field(default_factory=StatsDelta)


def owner_shard(doc_id: str, current: Optional[int], num_shards: int) -> int:
    """The shard that holds ``doc_id``: where it already lives (``current``), else a stable hash
    of the id (crc32, the same on every node and Python process)."""
    if current is not None:
        return int(current)
    return zlib.crc32(doc_id.encode("utf-8")) % int(num_shards)


def _reject(index: int, message: str) -> WriteRejected:
    return WriteRejected(f"documents[{index}]: {message}; nothing was written")


def _check_id(value: Any, where: str, cfg: WritesConfig) -> str:
    if not isinstance(value, str) or not value.strip():
        raise WriteRejected(f"{where}: a document id must be a non-empty string; nothing was written")
    if len(value) > cfg.max_id_chars:
        raise WriteRejected(f"{where}: the id has {len(value)} characters; the limit is writes.max_id_chars={cfg.max_id_chars}; nothing was written")
    return value


def _check_metadata(value: Any, i: int, cfg: WritesConfig) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _reject(i, f"metadata must be a JSON object, not {type(value).__name__}")
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _reject(i, f"metadata is not plain JSON ({exc})") from None
    if len(text.encode("utf-8")) > cfg.max_metadata_bytes:
        raise _reject(i, f"metadata has {len(text.encode('utf-8'))} bytes as JSON; the limit is writes.max_metadata_bytes={cfg.max_metadata_bytes}")
    return json.loads(text)


def check_upserts(items: Sequence[Mapping[str, Any] | Document], cfg: WritesConfig) -> list[Document]:
    """The documents of an upsert batch, or :class:`WriteRejected` naming the first problem:
    no documents, more than ``max_batch_documents``, an id repeated in the batch, an empty or
    too long text, a title that is not a string, metadata that is not a small JSON object."""
    if not items:
        raise WriteRejected("documents: the batch is empty; send at least one document")
    if len(items) > cfg.max_batch_documents:
        raise WriteRejected(f"documents: {len(items)} documents; the limit is writes.max_batch_documents={cfg.max_batch_documents}; nothing was written")
    docs: list[Document] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if isinstance(item, Document):
            item = {"id": item.id, "text": item.text, "title": item.title, "metadata": dict(item.metadata)}
        if not isinstance(item, Mapping):
            raise _reject(i, "each document must be an object with id and text")
        doc_id = _check_id(item.get("id"), f"documents[{i}].id", cfg)
        if doc_id in seen:
            raise _reject(i, f"the id {doc_id!r} is also documents[{seen[doc_id]}]: one change per id in a batch")
        seen[doc_id] = i
        text, title = item.get("text"), item.get("title") or ""
        if not isinstance(text, str) or not text.strip():
            raise _reject(i, "text must be a non-empty string")
        if not isinstance(title, str):
            raise _reject(i, "title must be a string")
        if len(text) + len(title) > cfg.max_document_chars:
            raise _reject(i, f"the document has {len(text) + len(title)} characters; the limit is writes.max_document_chars={cfg.max_document_chars}")
        metadata = _check_metadata(item.get("metadata"), i, cfg)
        docs.append(Document(doc_id, text, title, metadata))
    return docs


def check_deletes(ids: Sequence[Any], cfg: WritesConfig) -> list[str]:
    """The ids of a delete batch (duplicates refused, as in upserts)."""
    if not ids:
        raise WriteRejected("ids: the batch is empty; send at least one id")
    if len(ids) > cfg.max_batch_documents:
        raise WriteRejected(f"ids: {len(ids)} ids; the limit is writes.max_batch_documents={cfg.max_batch_documents}; nothing was written")
    out: list[str] = []
    seen: set[str] = set()
    for i, value in enumerate(ids):
        doc_id = _check_id(value, f"ids[{i}]", cfg)
        if doc_id in seen:
            raise WriteRejected(f"ids[{i}]: the id {doc_id!r} is repeated in the batch; nothing was written")
        seen.add(doc_id)
        out.append(doc_id)
    return out
