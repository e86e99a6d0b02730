"""Dense retrieval that takes writes: the base FAISS index, an exact delta index of new vectors,
and deleted or replaced vectors excluded inside the search.

New and replaced documents' chunk vectors (computed once by the writer and carried in the
log) go to a small exact ``IndexFlatIP``. Vectors of deleted or replaced documents stay in the
base index but are excluded *inside* FAISS's search through an ``IDSelector`` in the search
parameters (``SearchParametersHNSW``/``SearchParametersIVF``/``SearchParameters``), so HNSW and
IVF return k live neighbours when k exist, unlike filtering a top-k afterwards; efSearch and
nprobe widen with the excluded fraction (:func:`search_parameters`). Both indexes
are searched and their hits merged by score; a document's score is its best live chunk's.

Versions work as in :mod:`serve_app.live.bm25`: each vector has ``born``/``died`` sequence
numbers and a search reads as of one. With a ``Flat`` base every search equals exact search
over the live documents (what a fresh build gives); with HNSW or IVF the base part is as
approximate as the base index is (``benchmarks/live_writes.py`` measures recall).

A GPU copy of the base index cannot take an ``IDSelector``: once a base vector is excluded,
searches use the CPU index.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import faiss
import numpy as np

from serve_app.live.bm25 import ALIVE, _Grow
from serve_app.live.changes import UPSERT, Batch
from serve_app.filters import MetadataColumns, Node
from serve_app.retrieval.dense import collect_documents, order_hits
from serve_app.retrieval.filtered import MAX_WIDENING, BitmapSelector, allowed_documents, exact_documents, fill_short, flat_storage, reconstruct, search_parameters, use_exact
from serve_app.types import Hit


class LiveDense:
    """A dense retriever over a base :class:`~serve_app.retrieval.dense.DenseRetriever` plus the
    batches applied to it (see the module docstring). ``shard``: this replica's shard when the
    dense retriever is sharded (it keeps only the changes it owns); ``columns``: the declared
    metadata of the base's documents in their order (filters), extended by every upsert."""

    name = "dense"

    def __init__(self, base: Any, *, base_seq: int = 0, shard: Optional[int] = None, columns: Optional[MetadataColumns] = None) -> None:
        self.base = base
        self.columns = columns
        if columns is not None:
            base.columns = columns  # the base's documents are the first positions
        self.encoder = base.encoder
        self.shard = shard
        self.base_seq = base_seq
        self.applied_seq = base_seq
        self.dim = base.dim
        nb = base.num_vectors
        self._nb = nb
        self.doc_ids: list[str] = list(base.doc_ids)
        self._pos = {d: i for i, d in enumerate(self.doc_ids)}
        owner = base.chunk_owner
        starts = np.searchsorted(owner, np.arange(len(self.doc_ids) + 1), side="left") if nb else np.zeros(len(self.doc_ids) + 1, dtype=np.int64)
        self._doc_vectors = [(int(starts[i]), int(starts[i + 1])) for i in range(len(self.doc_ids))]
        self._owner = _Grow(np.asarray(owner, dtype=np.int64))
        self._born = _Grow(np.full(nb, base_seq, dtype=np.int64))
        self._died = _Grow(np.full(nb, ALIVE, dtype=np.int64))
        self._delta = faiss.IndexFlatIP(self.dim)
        self._lock = threading.Lock()
        self._excluded_cache: tuple[int, int, Optional[np.ndarray]] = (-1, -1, None)
        self.max_chunks_per_doc = max(1, int(np.bincount(owner).max()) if owner.size else 1)

    @property
    def num_vectors(self) -> int:
        return int((self._died.view() == ALIVE).sum())

    # ----------------------------------------------------------------- writes

    def apply(self, batch: Batch) -> None:
        if batch.seq <= self.applied_seq:
            return
        with self._lock:
            mine = [c for c in batch.changes if self.shard is None or c.owners.get("dense") == self.shard]
            for c in mine:
                pos = self._pos.get(c.doc_id)
                if pos is not None:
                    v0, v1 = self._doc_vectors[pos]
                    d = self._died.a[v0:v1]
                    d[d == ALIVE] = batch.seq
            for c in mine:
                if c.op != UPSERT:
                    continue
                if c.vectors is None:
                    raise ValueError(f"batch {batch.seq}: document {c.doc_id!r} has no vectors; the writer must run with the dense encoder")
                vec = np.ascontiguousarray(c.vectors, dtype=np.float32).reshape(-1, self.dim)
                pos = len(self.doc_ids)
                self.doc_ids.append(c.doc_id)
                self._pos[c.doc_id] = pos
                first = self._owner.n
                self._doc_vectors.append((first, first + len(vec)))
                self._delta.add(vec)
                if self.columns is not None:
                    self.columns.append([c.document.metadata if c.document is not None else {}])
                self._owner.extend([pos] * len(vec))
                self._born.extend([batch.seq] * len(vec))
                self._died.extend([ALIVE] * len(vec))
                self.max_chunks_per_doc = max(self.max_chunks_per_doc, len(vec))
            self.applied_seq = batch.seq

    # ----------------------------------------------------------------- search

    def search(self, query: str, k: int, at_seq: Optional[int] = None, where: Optional[Node] = None) -> list[Hit]:
        return self.search_batch([query], k, at_seq, where)[0]

    def search_batch(self, queries: list[str], k: int, at_seq: Optional[int] = None, where: Optional[Node] = None) -> list[list[Hit]]:
        if self.encoder is None:
            raise RuntimeError("this dense retriever has no encoder: use search_vectors")
        if not queries:
            return []
        return self.search_vectors(self.encoder.encode_queries(list(queries)), k, at_seq, where)

    def _base_excluded(self, seq: int, n: int) -> Optional[np.ndarray]:
        cached_seq, cached_n, ids = self._excluded_cache
        if cached_seq == seq and cached_n == n:
            return ids
        died = self._died.a[: self._nb]
        out = np.flatnonzero(died <= seq).astype(np.int64)
        ids = out if out.size else None
        self._excluded_cache = (seq, n, ids)
        return ids

    def search_vectors(self, query_vectors: np.ndarray, k: int, at_seq: Optional[int] = None, where: Optional[Node] = None) -> list[list[Hit]]:
        """Top-``k`` live documents for each query vector as of batch ``at_seq`` (default: latest);
        with a filter ``where``, among the live documents it admits (inside FAISS or exactly, as
        :mod:`serve_app.retrieval.filtered` decides)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = np.ascontiguousarray(np.asarray(query_vectors, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (n, {self.dim}), got {q.shape}")
        seq = self.applied_seq if at_seq is None else max(min(int(at_seq), self.applied_seq), self.base_seq)
        n = self._owner.n
        if seq == self.base_seq and self.applied_seq == self.base_seq:
            return self.base.search_vectors(q, k, where)
        owner, born, died = self._owner.a[:n], self._born.a[:n], self._died.a[:n]
        if where is not None:
            allowed = allowed_documents(self.columns, where, len(self.doc_ids))
            assert allowed is not None
            return self._filtered(q, int(k), (born <= seq) & (died > seq) & allowed[owner], owner)
        nd = n - self._nb
        live_delta = np.flatnonzero((born[self._nb :] <= seq) & (died[self._nb :] > seq)) if nd else np.zeros(0, dtype=np.int64)
        excluded = self._base_excluded(seq, n)
        live_base = self._nb - (0 if excluded is None else excluded.size)
        total_live = live_base + live_delta.size
        base_sel = None if excluded is None else faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded))
        live_fraction = 1.0 - (0 if excluded is None else excluded.size) / max(self._nb, 1)
        results = collect_documents(lambda rows, fetch: self._search(rows, fetch, base_sel, live_fraction, live_delta), q, int(k), owner, total_live, self.max_chunks_per_doc)
        return [[Hit(self.doc_ids[d], s) for d, s in hits] for hits in results]

    def _filtered(self, q: np.ndarray, k: int, admitted: np.ndarray, owner: np.ndarray) -> list[list[Hit]]:
        """Top-``k`` of the ``admitted`` vectors (live at the search's batch and passing its filter)."""
        nb = self._nb
        ids = np.flatnonzero(admitted)
        k_docs = min(k, int(np.unique(owner[ids]).size))
        if k_docs == 0:
            return [[] for _ in range(q.shape[0])]

        sel = BitmapSelector(admitted[:nb])
        live_delta = ids[ids >= nb] - nb
        fraction = float(admitted[:nb].sum()) / max(nb, 1)
        flat = flat_storage(self.base._cpu_index)

        def exact(rows: np.ndarray) -> list[list[tuple[int, float]]]:
            if flat is not None:  # a flat scan of the admitted base vectors, and the (flat) delta
                search = lambda r, fetch: self._search(r, fetch, sel.selector, fraction, live_delta, base_index=flat)  # noqa: E731
                return collect_documents(search, q[rows], k_docs, owner, int(ids.size), self.max_chunks_per_doc)
            parts = [reconstruct(self.base._cpu_index, ids[ids < nb])]
            if live_delta.size:
                parts.append(self._delta.reconstruct_batch(np.ascontiguousarray(live_delta, dtype=np.int64)))
            return exact_documents(q[rows], np.concatenate(parts), ids, owner, k_docs)

        if use_exact(int(ids.size), int(admitted.size), self.base.cfg):
            results = exact(np.arange(q.shape[0]))
        else:
            results = collect_documents(lambda rows, fetch: self._search(rows, fetch, sel.selector, fraction, live_delta), q, k_docs, owner, int(ids.size), self.max_chunks_per_doc)
            results = fill_short(results, k_docs, exact)
        return [[Hit(self.doc_ids[d], s) for d, s in hits] for hits in results]

    def _search(self, q: np.ndarray, fetch: int, base_sel: Optional[Any], live_fraction: float, live_delta: np.ndarray, base_index: Optional[Any] = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``fetch`` best vectors per query over the base (those ``base_sel`` selects; None:
        all) and the ``live_delta`` vectors of the delta: (scores, vector ids in one numbering,
        base first), padded with -1. ``base_index``: a flat index of the base's vectors to scan
        exactly instead of searching the base index."""
        cfg = self.base.cfg
        parts_s, parts_i = [], []
        if self._nb and base_index is not None:
            s, i = base_index.search(q, min(fetch, self._nb), params=faiss.SearchParameters(sel=base_sel))
            parts_s.append(s)
            parts_i.append(i)
        elif self._nb:
            if base_sel is None:
                s, i = self.base._raw_search(q, min(fetch, self._nb))
            else:
                params = search_parameters(self.base._cpu_index, base_sel, ef_search=cfg.hnsw_ef_search, nprobe=cfg.ivf_nprobe, live_fraction=live_fraction)
                s, i = self.base._cpu_index.search(q, min(fetch, self._nb), params=params)
            parts_s.append(s)
            parts_i.append(i)
        if live_delta.size:
            sel = faiss.IDSelectorBatch(live_delta)
            s, i = self._delta.search(q, min(fetch, int(live_delta.size)), params=faiss.SearchParameters(sel=sel))
            parts_s.append(s)
            parts_i.append(np.where(i >= 0, i + self._nb, -1))
        scores, ids = order_hits(np.concatenate(parts_s, axis=1), np.concatenate(parts_i, axis=1))
        return scores[:, :fetch], ids[:, :fetch]


__all__ = ["MAX_WIDENING", "LiveDense", "search_parameters"]
