"""Shard sets on disk: one ordinary index directory per shard, and ``shards.json`` to tie them.

A shard set of ``n`` shards of one retriever lives inside the index it was cut from::

    INDEX_DIR/shards/bm25-2/{shards.json, 0/, 1/}
    INDEX_DIR/shards/dense-3/{shards.json, 0/, 1/, 2/}

Each numbered directory is an index of its shard's documents, written like any index (manifest,
sizes, sha256), so the usual loaders check it. ``shards.json`` records the assignment (shard
``i`` holds the documents ``[i*N//n, (i+1)*N//n)``, :func:`serve_app.retrieval.sharding.shard_bounds`;
or, after a merge of live writes, ``owner``: each document stays in the shard that held it)
and the sha256 of the whole corpus's document store, so a shard replica refuses a set cut from
another corpus than its index. Building is :func:`serve_app.index.build.build_shard_set`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.errors import IndexLoadError
from serve_app.fsutil import read_json
from serve_app.retrieval.sharding import shard_bounds

SHARDS_FORMAT_VERSION = 1
SHARDS_MANIFEST = "shards.json"
SHARDS_SUBDIR = "shards"


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
    assignment: Literal["contiguous", "owner"] = Field(description="contiguous: shard i holds documents [i*N//n, (i+1)*N//n). owner: each document stays in the shard that held it when it was written (a merge of live writes); start is 0 and end the shard's document count.")
    num_shards: int = Field(ge=1)
    num_documents: int = Field(ge=1)
    corpus_sha256: str = Field(description="sha256 of the whole corpus written as documents.jsonl.")
    retrievers: list[Literal["bm25", "dense"]]
    bm25_statistics: Optional[Literal["global"]] = Field(None, description="global: BM25 scores use whole-corpus idf and average length.")
    shards: list[ShardInfo]


def shard_set_dir(index_dir: str | os.PathLike[str], retriever: str, num_shards: int) -> Path:
    """Where the ``num_shards``-shard set of ``retriever`` lives inside ``index_dir``."""
    return Path(index_dir) / SHARDS_SUBDIR / f"{retriever}-{num_shards}"


def read_shards_manifest(set_dir: str | os.PathLike[str]) -> ShardSetManifest:
    """The validated ``shards.json`` of a shard set; ``IndexLoadError`` when absent or invalid."""
    d = Path(set_dir)
    path = d / SHARDS_MANIFEST
    if not path.is_file():
        raise IndexLoadError(f"{d}: not a shard set (no {SHARDS_MANIFEST}); build it with serve_app.index.build_shard_set")
    raw = read_json(path, "shard set manifest")
    if not isinstance(raw, dict) or raw.get("format_version") != SHARDS_FORMAT_VERSION:
        raise IndexLoadError(f"{path}: unknown shard set format {raw.get('format_version') if isinstance(raw, dict) else raw!r}; rebuild the shards")
    try:
        manifest = ShardSetManifest.model_validate(raw)
    except ValidationError as exc:
        raise IndexLoadError(f"{path}: invalid shard set manifest: {exc}") from None
    if manifest.assignment == "owner":
        if [s.index for s in manifest.shards] != list(range(manifest.num_shards)) or sum(s.end - s.start for s in manifest.shards) != manifest.num_documents:
            raise IndexLoadError(f"{path}: the shards' document counts do not add up to the {manifest.num_documents} documents of the set")
        return manifest
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


def is_current(set_dir: Path, num_shards: int, corpus_sha256: str, retriever: str) -> Optional[str]:
    """None when ``set_dir`` holds a usable set of ``num_shards`` shards of ``retriever`` cut from
    the corpus ``corpus_sha256``; else why not."""
    if not (set_dir / SHARDS_MANIFEST).is_file():
        return "missing"
    try:
        shard_dir(set_dir, 0, num_shards=num_shards, corpus_sha256=corpus_sha256, retriever=retriever)
    except IndexLoadError as exc:
        return str(exc)
    return None
