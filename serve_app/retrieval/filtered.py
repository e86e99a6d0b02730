"""Filtered dense search: the allowed documents passed *into* FAISS, and exact search over
them when the filter is too selective for an approximate index.

A filter (:mod:`serve_app.filters`) becomes a mask over a retriever's documents, then over
its vectors (``allowed[chunk_owner]``). Two ways to search only those vectors:

* **in the index**: the mask as an ``IDSelectorBitmap`` in the search parameters, so HNSW and
  IVF skip other vectors while they search and return k allowed neighbours when k exist (not
  a top-k filtered afterwards, which returns fewer than k: the post-filtering failure users of
  other engines meet); efSearch and nprobe widen with the excluded fraction
  (:func:`search_parameters`);
* **exact**: a flat scan of the stored vectors that computes only the allowed ones (the index
  itself when it is ``Flat``, the flat storage of an ``HNSW...Flat`` index, with the same
  selector: one SIMD inner product per allowed vector, no graph, no BLAS or OpenMP start-up);
  other indexes (IVF, PQ) have the allowed vectors decoded (``reconstruct_batch``) and scored
  with one matrix product. Exact, and cheap when few vectors are allowed.

:func:`use_exact` picks: exact when at most ``filter_exact_max_vectors`` vectors are allowed
(scoring them costs less than a graph search) or when they are under ``filter_exact_fraction``
of the index (an HNSW graph restricted to so few nodes falls apart and misses neighbours;
``benchmarks/filtered_search.py`` measured where). An in-index search that still returns fewer
than k documents while k are allowed is redone exactly, so a filtered search never answers
fewer than ``min(k, allowed documents)``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import faiss
import numpy as np

from serve_app.chunking import collapse_to_documents
from serve_app.filters import FilterError, MetadataColumns, Node
from serve_app.retrieval.faiss_index import _unwrap

#: Most a selector may widen efSearch / nprobe (see :func:`search_parameters`).
MAX_WIDENING = 4.0

DocHits = list[list[tuple[int, float]]]


def search_parameters(index: faiss.Index, selector: Optional[faiss.IDSelector], *, ef_search: int, nprobe: int, live_fraction: float = 1.0) -> Optional[Any]:
    """FAISS search parameters for ``index`` carrying ``selector`` and the configured efSearch /
    nprobe (which per-call parameters would otherwise reset); None without a selector.

    With a fraction ``1 - live_fraction`` of the vectors excluded, HNSW's candidate list and
    IVF's probed lists hold that much fewer allowed vectors, so efSearch and nprobe are widened by
    ``1 / live_fraction`` (at most :data:`MAX_WIDENING` times) to keep the recall of the same
    search over the allowed vectors alone."""
    if selector is None:
        return None
    widen = min(MAX_WIDENING, 1.0 / max(live_fraction, 1e-9))
    transforms, core = _unwrap(index)
    if isinstance(core, faiss.IndexIVF):
        params: Any = faiss.SearchParametersIVF(sel=selector, nprobe=min(int(round(nprobe * widen)), int(core.nlist)))
    elif hasattr(core, "hnsw"):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=int(round(ef_search * widen)))
    else:
        params = faiss.SearchParameters(sel=selector)
    if transforms:
        params = faiss.SearchParametersPreTransform(index_params=params)
        params.sel = selector
    return params


def allowed_documents(columns: Optional[MetadataColumns], where: Optional[Node], n: int) -> Optional[np.ndarray]:
    """The mask of the first ``n`` documents that ``where`` admits (None: no filter)."""
    if where is None:
        return None
    if columns is None:
        raise FilterError("filter: this index declares no filterable fields (fields: in the configuration)")
    mask = columns.mask(where, min(n, len(columns)))
    if mask.size < n:  # documents without metadata columns (none expected) are not admitted
        mask = np.concatenate([mask, np.zeros(n - mask.size, dtype=bool)])
    return mask


class BitmapSelector:
    """An ``IDSelectorBitmap`` over a boolean mask of vector ids, keeping its bits alive."""

    def __init__(self, mask: np.ndarray) -> None:
        self.bits = np.packbits(np.asarray(mask, dtype=np.uint8), bitorder="little")
        self.selector = faiss.IDSelectorBitmap(int(mask.size), faiss.swig_ptr(self.bits))


def use_exact(allowed_vectors: int, total_vectors: int, cfg: Any) -> bool:
    """Whether a filtered search scores the allowed vectors exactly instead of searching the index
    (see the module docstring); ``cfg``: a :class:`~serve_app.config.DenseConfig`."""
    if allowed_vectors <= cfg.filter_exact_max_vectors:
        return True
    return total_vectors > 0 and allowed_vectors < cfg.filter_exact_fraction * total_vectors


def flat_storage(index: faiss.Index) -> Optional[faiss.Index]:
    """The flat index holding ``index``'s vectors as stored: ``index`` itself when it is flat, the
    storage of an HNSW index over flat vectors; None for others (IVF, PQ, pre-transforms)."""
    transforms, core = _unwrap(index)
    if transforms:
        return None
    if isinstance(core, faiss.IndexFlat):
        return core
    storage = getattr(core, "storage", None)
    if storage is not None:
        storage = faiss.downcast_index(storage)
        if isinstance(storage, faiss.IndexFlat):
            return storage
    return None


def reconstruct(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """The stored vectors ``ids`` of ``index`` (exact for flat and HNSW storage, the decoded
    codes for IVF-PQ, which first gets its direct map)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.size == 0:
        return np.zeros((0, index.d), dtype=np.float32)
    try:
        return index.reconstruct_batch(ids)
    except RuntimeError:
        ivf = faiss.extract_index_ivf(index)
        ivf.make_direct_map()
        return index.reconstruct_batch(ids)


def exact_documents(q: np.ndarray, vectors: np.ndarray, vector_ids: np.ndarray, owner: np.ndarray, k_docs: int) -> DocHits:
    """The best ``k_docs`` documents (position, best vector's score) of each query row over the
    given ``vectors`` (their ids ``vector_ids``, whose documents are ``owner[vector_ids]``); ties
    broken by vector id as :func:`~serve_app.retrieval.dense.order_hits` does."""
    if vector_ids.size == 0:
        return [[] for _ in range(q.shape[0])]
    scores = q @ vectors.T
    out: DocHits = []
    for row in scores:
        order = np.lexsort((vector_ids, -row))
        out.append(collapse_to_documents(vector_ids[order], row[order], owner, k_docs))
    return out


def fill_short(results: DocHits, k_docs: int, exact: Callable[[np.ndarray], DocHits]) -> DocHits:
    """Redo exactly (``exact(rows)``) the queries that got fewer than ``k_docs`` documents."""
    short = np.asarray([i for i, hits in enumerate(results) if len(hits) < k_docs], dtype=np.int64)
    if short.size:
        for i, hits in zip(short.tolist(), exact(short)):
            results[i] = hits
    return results


__all__ = ["BitmapSelector", "MAX_WIDENING", "allowed_documents", "exact_documents", "fill_short", "flat_storage", "reconstruct", "search_parameters", "use_exact"]
