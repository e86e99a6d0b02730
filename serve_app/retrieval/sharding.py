"""Sharded retrieval: split a corpus over N index shards, search each, merge into one exact top-k.

For a corpus whose index does not fit one node, each shard replica holds the index of a part of
the corpus; the caller (the Serve ingress, or :class:`ShardedRetriever` in process) asks every
shard for its top-k and keeps the k best of the union (scatter-gather). The merged list is the
one an unsharded index returns: same documents, same order, same scores.

**Assignment.** Shard ``i`` of ``n`` holds the documents at positions
``[i * N // n, (i + 1) * N // n)`` of the corpus (:func:`shard_bounds`): contiguous, balanced
to within one document, deterministic for a given corpus order, and all chunks of a document
stay in the document's shard. Contiguity also makes ties exact: an unsharded index breaks equal
scores by document position, and position order is (shard, position inside the shard), which
is how :func:`merge_top_k` breaks them.

**Why the merge is exact.**

* Dense: a document's score is the inner product of the query vector with its best chunk's
  vector (FAISS, ``Flat`` for exactness; approximate factories are approximate per shard as
  they are globally). It does not depend on the other documents, so scores from different
  shards are comparable as they are. (Shards encode their own documents; batching changes
  embeddings only by float rounding, ~1e-7.)
* BM25: a score depends on corpus statistics (idf of each term: document frequency and corpus
  size; the average document length). BM25 built separately on each shard would use the
  shard's statistics and scores from different shards would not be comparable. We therefore
  build **one** bm25s index over the whole corpus and shard its postings by document
  (:func:`split_bm25`): bm25s stores, per term, the list of (chunk, precomputed score) pairs,
  the scores already computed with the whole corpus's idf and average length; shard ``i``
  keeps the pairs of its own chunks (renumbered), the whole vocabulary, and the per-term
  non-occurrence scores of BM25L/BM25+ (term-dependent only). A query's score for a document
  is then the same float32 sum of the same values in the same order as in the unsharded index
  (bit-identical). The alternative, re-implementing BM25 with injected global idf/avgdl, would
  mean a second scoring implementation to keep in sync with bm25s; splitting the postings
  reuses bm25s unchanged. The cost: the builder tokenises the whole corpus once (the postings
  of a whole-corpus index must fit the building machine; the serving replicas hold only their
  shard). The ``rank_bm25`` reference engine recomputes statistics from the documents it is
  given at load, so it cannot be sharded exactly and is refused.

**On disk** (:func:`build_shards`), a shard set is one directory, written atomically (temporary
sibling, then rename, like :func:`serve_app.index_store.build_index`)::

    SET_DIR/
      shards.json      ShardSetManifest: assignment, shard bounds, corpus sha256, retrievers
      0/ 1/ ...        one ordinary index directory per shard (manifest.json, documents.jsonl,
                       bm25/, dense/), built with index_store.build_index, so every shard is
                       checked (sizes, sha256) by the usual loaders

``corpus_sha256`` is the sha256 of the whole corpus as ``documents.jsonl`` (the value an
unsharded index of the same corpus records in its manifest), so a server can check that its
document store and the shards come from the same corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
from serve_app.corpus import Corpus, write_documents_jsonl
from serve_app.errors import IndexLoadError
from serve_app.retrieval.bm25 import BM25Retriever, _Bm25sEngine
from serve_app.types import Document, Hit

__all__ = [
    "SHARDS_MANIFEST",
    "ShardSetManifest",
    "ShardedRetriever",
    "build_shards",
    "load_shards",
    "merge_top_k",
    "read_shards_manifest",
    "shard_bounds",
    "shard_dir",
    "split_bm25",
    "split_corpus",
]

SHARDS_FORMAT_VERSION = 1
SHARDS_MANIFEST = "shards.json"


# --------------------------------------------------------------------------- assignment and merge


def shard_bounds(num_documents: int, num_shards: int) -> list[tuple[int, int]]:
    """``[start, end)`` document positions of each shard: contiguous, sizes differ by at most one."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_documents < num_shards:
        raise ValueError(f"cannot split {num_documents} documents into {num_shards} non-empty shards")
    return [(i * num_documents // num_shards, (i + 1) * num_documents // num_shards) for i in range(num_shards)]


def split_corpus(corpus: Sequence[Document], num_shards: int) -> list[Corpus]:
    """The documents of each shard (see :func:`shard_bounds`)."""
    docs = list(corpus)
    return [Corpus(docs[s:e]) for s, e in shard_bounds(len(docs), num_shards)]


def merge_top_k(per_shard: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The ``k`` best hits of the shards' lists (each best first, given in shard order).

    Equal scores keep shard order, then each shard's own order: for contiguous shards this is
    document-position order, the tie order of an unsharded index. A document id found in two
    shards is a broken shard set and raises ``ValueError``.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    pooled = [h for hits in per_shard for h in hits]
    ids = [h.doc_id for h in pooled]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"document {dup!r} returned by more than one shard: the shards overlap")
    return sorted(pooled, key=lambda h: -h.score)[:k]  # sorted() is stable


class ShardedRetriever:
    """A retriever over shards (any objects of the ``Retriever`` protocol), merged exactly.

    In-process counterpart of the Serve fan-out; ``name`` is the shards' name.
    """

    def __init__(self, shards: Sequence[Any]) -> None:
        if not shards:
            raise ValueError("ShardedRetriever needs at least one shard")
        names = {s.name for s in shards}
        if len(names) != 1:
            raise ValueError(f"shards of different retrievers: {sorted(names)}")
        self.shards = list(shards)
        self.name: str = names.pop()

    def search(self, query: str, k: int) -> list[Hit]:
        """Top-``k`` documents over all shards, best first."""
        return merge_top_k([s.search(query, k) for s in self.shards], k)

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-``k`` documents for each query over all shards."""
        per_shard = [s.search_batch(queries, k) for s in self.shards]
        return [merge_top_k([lists[q] for lists in per_shard], k) for q in range(len(queries))]


# --------------------------------------------------------------------------- BM25 postings split


def split_bm25(retriever: BM25Retriever, bounds: Sequence[tuple[int, int]]) -> list[BM25Retriever]:
    """Shard a whole-corpus bm25s retriever by document: shard ``i`` holds documents ``bounds[i]``.

    Each shard keeps the postings (chunk, precomputed score) of its own chunks, renumbered from
    0, with the whole vocabulary and the non-occurrence scores, so its scores equal the
    unsharded retriever's (see the module docstring).
    """
    engine = retriever._engine  # noqa: SLF001 - sharding works on the engine's postings by design
    if not isinstance(engine, _Bm25sEngine):
        raise ValueError(f"sharded BM25 needs the bm25s engine; {retriever.config.engine!r} recomputes corpus statistics per shard (use engine: bm25s)")
    model = engine.model
    owner = np.asarray(retriever.chunk_owner, dtype=np.int64)
    if owner.size and np.any(np.diff(owner) < 0):
        raise ValueError("chunks are not in document order; cannot shard by document range")
    data = np.asarray(model.scores["data"])
    indices = np.asarray(model.scores["indices"])
    indptr = np.asarray(model.scores["indptr"])
    vocab_size = indptr.size - 1
    term_of_entry = np.repeat(np.arange(vocab_size, dtype=np.int64), np.diff(indptr).astype(np.int64))
    out = []
    for start, end in bounds:
        if not 0 <= start < end <= retriever.num_documents:
            raise ValueError(f"invalid shard bounds [{start}, {end}) for {retriever.num_documents} documents")
        c0, c1 = (int(x) for x in np.searchsorted(owner, [start, end], side="left"))
        keep = (indices >= c0) & (indices < c1)
        counts = np.bincount(term_of_entry[keep], minlength=vocab_size)
        shard_model = type(model)(
            k1=model.k1, b=model.b, delta=model.delta, method=model.method, idf_method=model.idf_method,
            dtype=model.dtype, int_dtype=model.int_dtype, backend="numpy",
        )
        shard_model.scores = {
            "data": np.ascontiguousarray(data[keep]),
            "indices": np.ascontiguousarray((indices[keep] - c0).astype(indices.dtype)),
            "indptr": np.concatenate([[0], np.cumsum(counts)]).astype(indptr.dtype),
            "num_docs": int(c1 - c0),
        }
        shard_model.vocab_dict = dict(model.vocab_dict)
        shard_model.unique_token_ids_set = set(shard_model.vocab_dict.values())
        nonocc = getattr(model, "nonoccurrence_array", None)
        shard_model.nonoccurrence_array = None if nonocc is None else np.array(nonocc)
        out.append(
            BM25Retriever(_Bm25sEngine(shard_model), retriever.tokenizer, retriever.config, retriever.chunking, retriever.doc_ids[start:end], owner[c0:c1] - start)
        )
    return out


# --------------------------------------------------------------------------- shard sets on disk


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardInfo(_Model):
    index: int = Field(ge=0)
    directory: str = Field(description="Sub-directory holding the shard's index (relative).")
    start: int = Field(ge=0, description="Position of the shard's first document in the corpus.")
    end: int = Field(ge=1, description="One past the position of its last document.")


class ShardSetManifest(_Model):
    """Contents of ``shards.json``."""

    format_version: int
    created_at: str
    assignment: Literal["contiguous"] = Field(description="Shard i holds documents [i*N//n, (i+1)*N//n).")
    num_shards: int = Field(ge=1)
    num_documents: int = Field(ge=1)
    corpus_sha256: str = Field(description="sha256 of the whole corpus written as documents.jsonl.")
    retrievers: list[Literal["bm25", "dense"]]
    bm25_statistics: Optional[Literal["global"]] = Field(None, description="global: BM25 scores use whole-corpus idf and average length.")
    shards: list[ShardInfo]


def _corpus_sha256(corpus: Corpus, scratch: Path) -> str:
    path = scratch / "corpus.jsonl"
    write_documents_jsonl(corpus, path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    path.unlink()
    return h.hexdigest()


def build_shards(
    corpus: Sequence[Document],
    out_dir: str | os.PathLike[str],
    num_shards: int,
    *,
    bm25: BM25Config | None,
    dense: DenseConfig | None,
    chunking: ChunkingConfig,
    encoder: Any = None,
    show_progress: bool = False,
) -> ShardSetManifest:
    """Build a shard set of ``corpus`` at ``out_dir`` (replacing one there atomically).

    Each shard is an ordinary index (:func:`serve_app.index_store.build_index`) of its
    documents; its BM25 side is cut from one whole-corpus index (:func:`split_bm25`), its dense
    side encodes only its documents (``encoder`` is shared by the shards when given).
    """
    from serve_app.index_store import _swap_into_place, build_index

    if bm25 is None and dense is None:
        raise ValueError("nothing to build: give a BM25 config, a dense config, or both")
    if bm25 is not None and bm25.engine != "bm25s":
        raise ValueError(f"sharded BM25 needs engine 'bm25s' (got {bm25.engine!r}): rank_bm25 recomputes corpus statistics per shard")
    corpus = corpus if isinstance(corpus, Corpus) else Corpus.from_documents(corpus)
    bounds = shard_bounds(len(corpus), num_shards)
    bm25_parts: list[Optional[BM25Retriever]] = [None] * num_shards
    if bm25 is not None:
        whole = BM25Retriever.build(corpus, bm25, chunking, show_progress=show_progress)
        bm25_parts = list(split_bm25(whole, bounds))
        del whole
    if dense is not None and encoder is None:
        from serve_app.retrieval.dense import BiEncoder

        encoder = BiEncoder(dense)
    out = Path(out_dir).absolute()
    if out.exists() and not (out / SHARDS_MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and holds no {SHARDS_MANIFEST}; refusing to replace it with a shard set")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        infos = []
        for i, ((start, end), part) in enumerate(zip(bounds, bm25_parts)):
            build_index(corpus[start:end], tmp / str(i), bm25=bm25, dense=dense, chunking=chunking, encoder=encoder, show_progress=show_progress, bm25_retriever=part)
            infos.append(ShardInfo(index=i, directory=str(i), start=start, end=end))
        manifest = ShardSetManifest(
            format_version=SHARDS_FORMAT_VERSION,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            assignment="contiguous",
            num_shards=num_shards,
            num_documents=len(corpus),
            corpus_sha256=_corpus_sha256(corpus, tmp),
            retrievers=[n for n, c in (("bm25", bm25), ("dense", dense)) if c is not None],
            bm25_statistics="global" if bm25 is not None else None,
            shards=infos,
        )
        with open(tmp / SHARDS_MANIFEST, "w", encoding="utf-8") as f:
            f.write(manifest.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_shards_manifest(set_dir: str | os.PathLike[str]) -> ShardSetManifest:
    """The validated ``shards.json`` of a shard set; ``IndexLoadError`` when absent or invalid."""
    d = Path(set_dir)
    path = d / SHARDS_MANIFEST
    if not path.is_file():
        raise IndexLoadError(f"{d}: not a shard set (no {SHARDS_MANIFEST}); build it with serve_app.retrieval.sharding.build_shards")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexLoadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format_version") != SHARDS_FORMAT_VERSION:
        raise IndexLoadError(f"{path}: unknown shard set format {raw.get('format_version') if isinstance(raw, dict) else raw!r}; rebuild the shards")
    try:
        manifest = ShardSetManifest.model_validate(raw)
    except ValidationError as exc:
        raise IndexLoadError(f"{path}: invalid shard set manifest: {exc}") from None
    expected = shard_bounds(manifest.num_documents, manifest.num_shards)
    if [(s.index, s.start, s.end) for s in manifest.shards] != [(i, s, e) for i, (s, e) in enumerate(expected)]:
        raise IndexLoadError(f"{path}: shard bounds do not match the contiguous assignment of {manifest.num_documents} documents to {manifest.num_shards} shards")
    return manifest


def shard_dir(
    set_dir: str | os.PathLike[str],
    index: int,
    *,
    num_shards: int | None = None,
    corpus_sha256: str | None = None,
    retriever: str | None = None,
) -> Path:
    """The index directory of shard ``index``, after checking the set against what the caller expects.

    Raises ``IndexLoadError`` when the set has another number of shards, was built from another
    corpus (``corpus_sha256``), or lacks ``retriever``.
    """
    d = Path(set_dir)
    m = read_shards_manifest(d)
    if num_shards is not None and m.num_shards != num_shards:
        raise IndexLoadError(f"{d}: a set of {m.num_shards} shards, {num_shards} expected; rebuild the shards")
    if corpus_sha256 is not None and m.corpus_sha256 != corpus_sha256:
        raise IndexLoadError(f"{d}: built from another corpus than the document store (sha256 differs); rebuild the shards")
    if retriever is not None and retriever not in m.retrievers:
        raise IndexLoadError(f"{d}: the shards hold no {retriever} index (they hold {m.retrievers})")
    if not 0 <= index < m.num_shards:
        raise IndexLoadError(f"{d}: no shard {index} (the set has {m.num_shards})")
    info = m.shards[index]
    if Path(info.directory).is_absolute() or ".." in Path(info.directory).parts:
        raise IndexLoadError(f"{d / SHARDS_MANIFEST}: invalid shard directory {info.directory!r}")
    return d / info.directory


def load_shards(set_dir: str | os.PathLike[str], **load_kwargs: Any) -> dict[str, ShardedRetriever]:
    """Open every shard of a set in process (``load_kwargs`` go to ``index_store.load_index``);
    returns one :class:`ShardedRetriever` per retriever the set holds."""
    from serve_app.index_store import load_index

    d = Path(set_dir)
    m = read_shards_manifest(d)
    loaded = [load_index(shard_dir(d, i), **load_kwargs) for i in range(m.num_shards)]
    for info, part in zip(m.shards, loaded):
        if len(part.corpus) != info.end - info.start:
            raise IndexLoadError(f"{d / info.directory}: {len(part.corpus)} documents, the shard set says {info.end - info.start}")
    return {name: ShardedRetriever([part.retrievers[name] for part in loaded]) for name in m.retrievers}
