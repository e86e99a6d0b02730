"""Merges: fold the base index and the log up to a batch into a new base index.

A merge reads the live documents as of batch ``S`` (the writer's last batch when it starts):
the base's documents that no batch up to ``S`` replaced or deleted, in base order, then each
document's last version up to ``S``, in log order (the order replicas append them, so ties
keep breaking the same way). It writes a new index of them with the build's atomic swap
(staging directory, manifest last, rename; the shard sets of a sharded index inside the same
build), reusing every vector it can: the log's vectors for written documents and the base index's
own vectors where FAISS stores them exactly (``Flat``, ``HNSW..``, ``IVF..,Flat``); only a lossy
base (PQ) is encoded again. Searches and writes continue meanwhile: writes after ``S`` stay in
the log and apply on top of the new base.

The new manifest records ``writes: {generation, base_seq: S, previous_generation}``; the log's
own record follows in one transaction. A crash between the two is finished at the writer's next
start (the index names the log's generation as its previous one).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

from serve_app.config import BM25Config
from serve_app.corpus import Corpus
from serve_app.types import Document

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeReport:
    base_seq: int
    generation: str
    documents: int
    seconds: float
    vectors_reused: int
    vectors_encoded: int


def _exact_storage(index: Any) -> bool:
    import faiss

    from serve_app.retrieval.faiss_index import _unwrap

    transforms, core = _unwrap(index)
    if transforms:
        return False
    if isinstance(core, faiss.IndexFlat):
        return True
    if isinstance(core, faiss.IndexHNSW):
        return isinstance(faiss.downcast_index(core.storage), faiss.IndexFlat)
    return isinstance(core, faiss.IndexIVFFlat)


def base_vectors(dense: Any) -> Optional[np.ndarray]:
    """Every vector of a base dense index in id order, or None when FAISS stores them lossily."""
    import faiss

    index = dense._cpu_index
    if not _exact_storage(index):
        return None
    core = faiss.downcast_index(index)
    if isinstance(core, faiss.IndexIVF):
        core.make_direct_map()
    return core.reconstruct_n(0, core.ntotal)


def live_documents(writer: Any, seq: int) -> tuple[list[Document], list[tuple[str, int, int]]]:
    """The live documents as of batch ``seq`` in merge order, and where each comes from:
    ``("base", position, 0)`` or ``("log", seq, pos)``."""
    docs, sources, _ = _live_at(writer, seq)
    return docs, sources


def _live(writer: Any, seq: int) -> Iterator[tuple[Document, tuple[str, int, int], Any]]:
    """The live documents as of batch ``seq`` in merge order, one at a time (the base read from
    the document store page by page, each written document from the log when its turn comes),
    with where each comes from and its logged change (None for a base document)."""
    reader = writer.log.reader()
    last = reader.last_changes_upto(seq)
    changed = {doc_id for doc_id, _, _, _ in last}
    for pos, d in enumerate(writer.base):
        if d.id not in changed:
            yield d, ("base", pos, 0), None
    for _doc_id, s, p, op in last:
        if op == "upsert":
            change = reader.change(s, p)
            assert change.document is not None
            yield change.document, ("log", s, p), change


def _owner(writer: Any, retriever: str, doc: Document, change: Any) -> int:
    """The shard of ``retriever`` a merged document stays in: the one that held it (base
    documents) or the one the writer assigned it (written ones)."""
    return writer._owners_of_base[retriever][doc.id] if change is None else change.owners[retriever]


def _live_at(writer: Any, seq: int) -> tuple[list[Document], list[tuple[str, int, int]], dict[tuple[int, int], Any]]:
    """:func:`live_documents` and the log's changes they come from, each read once."""
    docs: list[Document] = []
    sources: list[tuple[str, int, int]] = []
    logged = {}
    for doc, source, change in _live(writer, seq):
        docs.append(doc)
        sources.append(source)
        if change is not None:
            logged[source[1:]] = change
    return docs, sources, logged


def _assignments(writer: Any, docs: list[Document], sources: list[tuple[str, int, int]], logged: dict[tuple[int, int], Any]) -> dict[str, list[list[int]]]:
    """Each sharded retriever's shards as lists of merged positions (:func:`_owner`)."""
    assignments = {}
    for r, n in writer.shards.items():
        sets: list[list[int]] = [[] for _ in range(n)]
        for i, ((kind, a, b), d) in enumerate(zip(sources, docs)):
            sets[_owner(writer, r, d, logged.get((a, b)) if kind == "log" else None)].append(i)
        empty = [j for j, p in enumerate(sets) if not p]
        if empty:
            raise ValueError(f"{r} shard(s) {empty} would hold no document after the merge; an index shard cannot be empty")
        assignments[r] = sets
    return assignments


def is_shards_only(manifest: Any) -> bool:
    """Whether an index holds its retrievers only as shard sets (``serve-app index --ray --shards-only``)."""
    return any(bool((getattr(manifest, r) or {}).get("shards_only")) for r in ("bm25", "dense"))


def _iter_live(writer: Any, seq: int, shard_of: dict[str, Any]) -> Iterator[Document]:
    """:func:`_live`'s documents, appending each one's shard per sharded retriever to
    ``shard_of`` as it goes: what a shards-only merge streams."""
    for doc, _source, change in _live(writer, seq):
        for r, out in shard_of.items():
            out.append(_owner(writer, r, doc, change))
        yield doc


def _finish_ray_merge(writer: Any, seq: int, generation: str, documents: int, built: Any, encoded_dense: bool, t0: float) -> MergeReport:
    """The writer adopts the base a Ray build wrote; the merge's report (every vector encoded)."""
    writer.adopt_base()
    encoded = built.corpus.num_chunks if encoded_dense else 0
    report = MergeReport(seq, generation, documents, time.perf_counter() - t0, 0, encoded)
    logger.info("merged the log up to batch %d into %s on Ray: %d documents in %.1f s (%d vectors encoded)", seq, writer.index_dir, documents, report.seconds, encoded)
    return report


def _merge_shards_only(writer: Any, seq: int, manifest: Any, bm25: Optional[BM25Config], ray: Any, writes: dict[str, Any], t0: float, generation: str) -> MergeReport:
    """The merge of a shards-only base: a shards-only Ray build that streams the live documents
    (never all in memory), every document kept in its shard."""
    from array import array

    from serve_app.index.load import dense_config_of
    from serve_app.index.ray_shards import build_index_ray_shards_only

    dense_cfg = dense_config_of(writer.index_dir, manifest) if manifest.dense is not None else None
    shard_of = {r: array("i") for r in writer.shards}
    built, report = build_index_ray_shards_only(
        _iter_live(writer, seq, shard_of), writer.index_dir, bm25=bm25, dense=dense_cfg, chunking=manifest.chunking, shards=writer.shards,
        options=ray, shard_of=shard_of, writes=writes,
    )
    return _finish_ray_merge(writer, seq, generation, report.documents, built, dense_cfg is not None, t0)


def merge(writer: Any, *, show_progress: bool = False, ray: Optional[Any] = None) -> MergeReport:
    """Fold the log up to the writer's last batch into a new base index at the writer's index
    directory (see the module docstring); the writer then reads the new base.

    ``ray`` (:class:`~serve_app.index.ray_build.RayBuildOptions`) runs the merge as a Ray build
    of the live documents (every vector encoded again, on the encoder actors). A shards-only
    base always merges that way (on the Ray this process is connected to, else a local
    instance), and stays shards-only: the live documents are streamed to the build one at a
    time and its workers write the shards, so no process holds the live corpus, the whole BM25
    matrix or all vectors.
    """
    from serve_app.chunking import split_documents
    from serve_app.index import load_dense
    from serve_app.index.build import check_build_request, write_index_atomically

    t0 = time.perf_counter()
    seq = writer.last_seq
    manifest = writer.manifest
    bm25 = BM25Config(**{k: manifest.bm25[k] for k in BM25Config.model_fields}) if manifest.bm25 else None
    generation = uuid.uuid4().hex[:16]
    writes = {"generation": generation, "base_seq": seq, "previous_generation": writer.generation}
    if is_shards_only(manifest):  # an empty result is refused by the build (nothing is replaced)
        if ray is None:
            from serve_app.index.ray_build import RayBuildOptions

            ray = RayBuildOptions(show_progress=show_progress)
        return _merge_shards_only(writer, seq, manifest, bm25, ray, writes, t0, generation)
    docs, sources, logged = _live_at(writer, seq)
    if not docs:
        raise ValueError("every document is deleted: an index cannot be empty; add documents before merging")
    dense_cfg = None
    dense_retriever = None
    whole_vectors = None
    reused = encoded = 0
    corpus = Corpus(docs)
    assignments = _assignments(writer, docs, sources, logged)
    if ray is not None:
        from serve_app.index.load import dense_config_of
        from serve_app.index.ray_build import build_index_ray

        dense_cfg = dense_config_of(writer.index_dir, manifest) if manifest.dense is not None else None
        built, _ = build_index_ray(
            corpus, writer.index_dir, bm25=bm25, dense=dense_cfg, chunking=manifest.chunking, shards=writer.shards, options=ray,
            assignments=assignments, writes=writes,
        )
        return _finish_ray_merge(writer, seq, generation, len(docs), built, dense_cfg is not None, t0)
    if manifest.dense is not None:
        from serve_app.retrieval.dense import DenseRetriever

        from serve_app.index.load import dense_config_of

        dense_cfg = dense_config_of(writer.index_dir, manifest)
        base_dense = load_dense(writer.index_dir, dense_cfg, load_encoder=False)
        stored = base_vectors(base_dense)
        base_starts = np.searchsorted(base_dense.chunk_owner, np.arange(len(base_dense.doc_ids) + 1), side="left")
        parts: list[np.ndarray] = []
        owner: list[np.ndarray] = []
        to_encode: list[int] = []
        for i, (kind, a, b) in enumerate(sources):
            if kind == "log":
                v = logged[(a, b)].vectors
            elif stored is not None:
                v = stored[base_starts[a] : base_starts[a + 1]]
            else:
                v = None
            if v is None:
                to_encode.append(i)
                parts.append(np.zeros((0, base_dense.dim), dtype=np.float32))
            else:
                parts.append(np.asarray(v, dtype=np.float32))
                reused += len(v)
        if to_encode:
            if writer.encoder is None:
                raise ValueError("the base index stores its vectors lossily and the writer has no encoder to encode them again")
            texts, own = split_documents([docs[i] for i in to_encode], manifest.chunking)
            vecs = writer.encoder.encode_documents(texts, show_progress=show_progress)
            for j, i in enumerate(to_encode):
                parts[i] = vecs[own == j]
            encoded = len(texts)
        for i, p in enumerate(parts):
            owner.append(np.full(len(p), i, dtype=np.int64))
        vectors = np.concatenate(parts, axis=0)
        chunk_owner = np.concatenate(owner)
        dense_retriever = DenseRetriever.from_vectors(vectors, corpus.ids, dense_cfg, chunk_owner=chunk_owner, encoder=writer.encoder)
        whole_vectors = (vectors, chunk_owner)
    corpus, out, wanted = check_build_request(corpus, writer.index_dir, bm25=bm25, dense=dense_cfg, shards=writer.shards)
    write_index_atomically(
        out, corpus, wanted, bm25=bm25, dense=dense_cfg, chunking=manifest.chunking, encoder=writer.encoder, show_progress=show_progress,
        dense_retriever=dense_retriever, whole_vectors=whole_vectors, writes=writes, assignments=assignments,
    )
    writer.adopt_base()
    report = MergeReport(seq, generation, len(docs), time.perf_counter() - t0, reused, encoded)
    logger.info("merged the log up to batch %d into %s: %d documents in %.1f s (%d vectors reused, %d encoded)", seq, writer.index_dir, len(docs), report.seconds, reused, encoded)
    return report


def merge_due(writer: Any) -> Optional[str]:
    """Why a merge is due now (a threshold of ``writes`` passed), or None."""
    base = max(1, len(writer.base))
    live, deleted = writer.log.reader().counts()
    cfg = writer.cfg
    if live >= cfg.merge_delta_fraction * base:
        return f"{live} documents written since the base ({live / base:.0%} of it; merge_delta_fraction={cfg.merge_delta_fraction})"
    if deleted >= cfg.merge_deleted_fraction * base:
        return f"{deleted} documents deleted since the base ({deleted / base:.0%} of it; merge_deleted_fraction={cfg.merge_deleted_fraction})"
    return None


__all__ = ["MergeReport", "base_vectors", "is_shards_only", "live_documents", "merge", "merge_due"]
