"""FAISS helpers of the dense retriever: build from a factory string, tune, move to the GPU.

Everything here works on inner-product indexes over L2-normalised vectors (so the
scores are cosine similarities). The CPU index is the one that is saved; a GPU copy
is only ever a search-time accelerator.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from serve_app.errors import UserFacingError

log = logging.getLogger(__name__)

# FAISS GPU indexes answer at most this many neighbours per query.
GPU_MAX_K = 2048


class DenseIndexError(UserFacingError, ValueError):
    """A FAISS index cannot be built with the configured factory and the given vectors."""


def _unwrap(index: faiss.Index) -> tuple[list[faiss.VectorTransform], faiss.Index]:
    """The pre-transforms (OPQ, PCA, ...) and the downcast core index of ``index``."""
    idx = faiss.downcast_index(index)
    transforms: list[faiss.VectorTransform] = []
    if isinstance(idx, faiss.IndexPreTransform):
        transforms = [faiss.downcast_VectorTransform(idx.chain.at(i)) for i in range(idx.chain.size())]
        idx = faiss.downcast_index(idx.index)
    return transforms, idx


def min_training_vectors(index: faiss.Index) -> int:
    """Fewest training vectors FAISS accepts for ``index`` (k-means needs one point per centroid)."""
    transforms, core = _unwrap(index)
    need = 1
    for vt in transforms:
        if isinstance(vt, faiss.OPQMatrix):
            need = max(need, 256)  # OPQ trains an 8-bit product quantizer
    if isinstance(core, faiss.IndexIVF):
        need = max(need, int(core.nlist))
    pq = getattr(core, "pq", None)
    if pq is not None:
        need = max(need, int(pq.ksub))
    return need


def create_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index from a FAISS factory string, with a clear error for bad strings."""
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1]
        raise DenseIndexError(
            f"invalid FAISS factory string {factory!r} for {dim}-dimensional vectors ({detail}). "
            f"Examples: 'Flat', 'HNSW32', 'IVF256,Flat', 'IVF256,PQ16' (the PQ size must divide the dimension)"
        ) from None


def train_and_add(index: faiss.Index, vectors: np.ndarray, factory: str) -> None:
    """Train ``index`` on ``vectors`` if it needs training, then add them (in order)."""
    if not index.is_trained:
        need = min_training_vectors(index)
        if len(vectors) < need:
            raise DenseIndexError(
                f"FAISS factory {factory!r} needs at least {need} vectors to train, but the corpus gives only "
                f"{len(vectors)}; use fewer IVF lists / PQ bits, or 'Flat' or 'HNSW32' for small corpora"
            )
        try:
            index.train(vectors)
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()[-1]
            raise DenseIndexError(f"training FAISS index {factory!r} on {len(vectors)} vectors failed: {detail}") from None
    index.add(vectors)


def set_search_params(index: faiss.Index, *, ef_search: int, nprobe: int) -> None:
    """Set HNSW ``efSearch`` and IVF ``nprobe`` (capped at the number of lists) where they apply."""
    _, core = _unwrap(index)
    if isinstance(core, faiss.IndexIVF):
        core.nprobe = min(int(nprobe), int(core.nlist))
        quantizer = faiss.downcast_index(core.quantizer)
        if hasattr(quantizer, "hnsw"):
            quantizer.hnsw.efSearch = int(ef_search)
    if hasattr(core, "hnsw"):
        core.hnsw.efSearch = int(ef_search)


def gpu_device_number(device: str | None) -> int:
    """GPU number named by a torch device string (``cuda:1`` -> 1); 0 otherwise."""
    if device and device.startswith("cuda:"):
        try:
            return int(device.split(":", 1)[1])
        except ValueError:
            return 0
    return 0


def maybe_to_gpu(index: faiss.Index, *, enabled: bool, device: str | None) -> tuple[faiss.Index, object | None]:
    """A GPU copy of ``index`` when FAISS sees a GPU and ``enabled``; else ``index`` itself.

    Returns ``(index, resources)``; keep ``resources`` alive as long as the GPU index.
    Index types without a GPU implementation (e.g. HNSW) stay on the CPU with a log line.
    """
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    if not enabled or get_num_gpus is None or get_num_gpus() <= 0:
        return index, None
    try:
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, gpu_device_number(device), index)
    except (RuntimeError, AttributeError) as exc:
        log.info("FAISS index stays on the CPU (no GPU version: %s)", str(exc).strip().splitlines()[-1])
        return index, None
    return gpu, res
