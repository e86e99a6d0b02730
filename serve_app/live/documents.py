"""Document lookups that follow writes: the base document store plus every version written since.

The ingress reads the text of the documents the retrievers scored. :class:`LiveDocuments`
keeps each id's versions since the base (``(seq, document or None for a delete)``) over the
base store (:class:`~serve_app.index.docstore.SqliteDocumentStore`), and answers "as of" a
sequence number, the one the request's retrievers read: the text a hit carries is always the
text its scores came from, never a newer or an older one.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any, Optional, Sequence

from serve_app.live.changes import UPSERT, Batch
from serve_app.types import Document


class LiveDocuments:
    """The base store (anything with ``get_many`` and ``len``) plus the versions of the batches applied."""

    def __init__(self, base: Any, *, base_seq: int = 0) -> None:
        self.base = base
        self.base_seq = base_seq
        self.applied_seq = base_seq
        self._versions: dict[str, tuple[list[int], list[Optional[Document]]]] = {}
        self._live_delta = 0  # live documents added minus base documents removed
        self._lock = threading.Lock()

    def apply(self, batch: Batch) -> None:
        if batch.seq <= self.applied_seq:
            return
        with self._lock:
            new_ids = [c.doc_id for c in batch.changes if c.doc_id not in self._versions]
            in_base = dict(zip(new_ids, (d is not None for d in self.base.get_many(new_ids)))) if new_ids else {}
            for c in batch.changes:
                seqs, docs = self._versions.get(c.doc_id, ([], []))
                was_live = (docs[-1] is not None) if docs else in_base.get(c.doc_id, False)
                doc = c.document if c.op == UPSERT else None
                seqs.append(batch.seq)
                docs.append(doc)
                self._versions[c.doc_id] = (seqs, docs)
                self._live_delta += int(doc is not None) - int(was_live)
            self.applied_seq = batch.seq

    def __len__(self) -> int:
        return len(self.base) + self._live_delta

    def get(self, doc_id: str, at_seq: Optional[int] = None) -> Optional[Document]:
        return self.get_many([doc_id], at_seq)[0]

    def get_many(self, doc_ids: Sequence[str], at_seq: Optional[int] = None) -> list[Optional[Document]]:
        """The documents of ``doc_ids`` as of batch ``at_seq`` (default: the latest applied); None
        for an id that did not exist then or was deleted."""
        seq = self.applied_seq if at_seq is None else int(at_seq)
        out: list[Optional[Document]] = [None] * len(doc_ids)
        from_base: list[int] = []
        for i, doc_id in enumerate(doc_ids):
            hist = self._versions.get(doc_id)
            j = bisect.bisect_right(hist[0], seq) - 1 if hist else -1
            if j >= 0:
                out[i] = hist[1][j]  # type: ignore[index]
            else:
                from_base.append(i)
        if from_base:
            for i, doc in zip(from_base, self.base.get_many([doc_ids[i] for i in from_base])):
                out[i] = doc
        return out

    def check(self) -> None:
        check = getattr(self.base, "check", None)
        if check is not None:
            check()


__all__ = ["LiveDocuments"]
