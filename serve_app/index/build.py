"""Building index directories: the one entry point, :func:`build_index`, and :func:`ensure_index`.

Layout (see docs/ARCHITECTURE.md)::

    INDEX_DIR/
      manifest.json     Manifest: format, corpus fingerprint, chunking, retriever sections,
                        library versions, sha256 and size of every file below (shards/ aside)
      documents.jsonl   the corpus as written (serve_app.corpus.write_documents_jsonl)
      documents.sqlite  the document store the ingress looks texts up in (serve_app.index.docstore)
      bm25/             BM25Retriever.save (its own document ids included)
      dense/            DenseRetriever.save (its own document ids included)
      shards/           shard sets, when sharding asks for them (serve_app.index.shards)

Atomicity: a build writes everything into a temporary sibling directory (``.NAME.building-*``),
fsyncs every file, writes ``manifest.json`` last, and renames the directory into place
(:mod:`serve_app.fsutil`). An exception during the build removes the temporary directory and
leaves the previous index untouched; a hard crash can leave a ``.NAME.building-*`` directory
behind (never loaded, safe to delete).

Who builds: ``serve-app index`` and ``serve-app eval`` call :func:`build_index`; the demo and
the Serve application builder (``build_index_if_missing``) call :func:`ensure_index`, which
builds a missing or outdated index once (under a file lock: concurrent builders build once),
and the shard sets it lacks, before any deployment is wired.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import serve_app
from serve_app.fsutil import file_lock, staging_dir, swap_into_place
from serve_app.chunking import split_documents
from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
from serve_app.corpus import Corpus, read_corpus_source, write_documents_jsonl
from serve_app.errors import UserFacingError
from serve_app.index.files import BM25_DIR, DENSE_DIR, DOCUMENTS, FORMAT_VERSION, MANIFEST, CorpusInfo, Manifest, file_entries, library_versions, manifest_format, read_manifest, sha256_file, write_json_durably
from serve_app.index.shards import SHARDS_FORMAT_VERSION, SHARDS_MANIFEST, SHARDS_SUBDIR, ShardInfo, ShardSetManifest, is_current, shard_set_dir
from serve_app.retrieval.bm25 import BM25Retriever
from serve_app.retrieval.sharding import shard_bounds
from serve_app.types import Document

logger = logging.getLogger(__name__)


class IndexBuildError(UserFacingError, ValueError):
    """The index cannot be written or built where asked (the target is not an index directory,
    no corpus to build it from, building is turned off)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_target(out: Path, marker: str) -> None:
    if out.exists() and not out.is_dir():
        raise IndexBuildError(f"{out}: exists and is not a directory")
    if out.is_dir() and not (out / marker).is_file() and any(out.iterdir()):
        raise IndexBuildError(f"{out}: exists, is not empty and holds no {marker}; refusing to replace it")


def _write_index(
    directory: Path,
    corpus: Corpus,
    *,
    bm25: Optional[BM25Config],
    dense: Optional[DenseConfig],
    chunking: ChunkingConfig,
    encoder: Any,
    show_progress: bool,
    bm25_retriever: Optional[BM25Retriever] = None,
    dense_retriever: Any = None,
    docstore: bool = True,
    writes: Optional[dict[str, Any]] = None,
) -> Manifest:
    """Write an index of ``corpus`` into the empty ``directory``; ``bm25_retriever`` (cut from a
    whole-corpus index, or built on Ray) and ``dense_retriever`` (from vectors encoded elsewhere)
    are saved instead of building them from ``bm25`` / ``dense``. ``docstore`` also writes the
    SQLite document store (not in shards: their replicas never look documents up)."""
    from serve_app.index.docstore import DOCSTORE, write_document_store

    write_documents_jsonl(corpus, directory / DOCUMENTS)
    if docstore:
        write_document_store(corpus, directory / DOCSTORE)
    sections: dict[str, Optional[dict[str, Any]]] = {"bm25": None, "dense": None}
    if bm25_retriever is not None:
        sections["bm25"] = bm25_retriever.save(directory / BM25_DIR)
    elif bm25 is not None:
        sections["bm25"] = BM25Retriever.build(corpus, bm25, chunking, show_progress=show_progress).save(directory / BM25_DIR)
    if dense_retriever is not None:
        sections["dense"] = dense_retriever.save(directory / DENSE_DIR)
    elif dense is not None:
        from serve_app.retrieval.dense import BiEncoder, DenseRetriever

        enc = encoder if encoder is not None else BiEncoder(dense)
        retriever = DenseRetriever.build(corpus, dense, chunking, enc, show_progress)
        sections["dense"] = retriever.save(directory / DENSE_DIR)
        del retriever
    files = file_entries(directory)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        created_at=_now(),
        serve_app_version=serve_app.__version__,
        corpus=CorpusInfo(num_documents=len(corpus), num_chunks=len(split_documents(list(corpus), chunking)[1]), sha256=files[DOCUMENTS].sha256),
        chunking=chunking,
        bm25=sections["bm25"],
        dense=sections["dense"],
        libraries=library_versions(),
        writes=writes,
        files=files,
    )
    write_json_durably(directory / MANIFEST, manifest)
    return manifest


def check_build_request(
    corpus: Sequence[Document],
    out_dir: str | os.PathLike[str],
    *,
    bm25: BM25Config | None,
    dense: DenseConfig | None,
    shards: Optional[Mapping[str, int]],
) -> tuple[Corpus, Path, dict[str, int]]:
    """What every build checks before any work: something to build, a non-empty corpus, shard
    sets only of built retrievers, a target that is an index directory or absent. Returns the
    corpus as a :class:`Corpus`, the absolute target and the shard counts above 1."""
    if bm25 is None and dense is None:
        raise ValueError("nothing to build: give a BM25 config, a dense config, or both")
    corpus = corpus if isinstance(corpus, Corpus) else Corpus.from_documents(corpus)
    if len(corpus) == 0:
        raise ValueError("cannot index an empty corpus")
    wanted = {r: n for r, n in (shards or {}).items() if n > 1}
    for retriever in wanted:
        if {"bm25": bm25, "dense": dense}.get(retriever) is None:
            raise ValueError(f"shards: {retriever} is not built in this index")
    out = Path(out_dir).absolute()
    _check_target(out, MANIFEST)
    return corpus, out, wanted


def write_index_atomically(
    out: Path,
    corpus: Corpus,
    wanted: Mapping[str, int],
    *,
    bm25: BM25Config | None,
    dense: DenseConfig | None,
    chunking: ChunkingConfig,
    encoder: Any,
    show_progress: bool = False,
    bm25_retriever: Optional[BM25Retriever] = None,
    dense_retriever: Any = None,
    whole_vectors: Optional[tuple[Any, Any]] = None,
    writes: Optional[dict[str, Any]] = None,
    assignments: Optional[Mapping[str, Sequence[Sequence[int]]]] = None,
) -> Manifest:
    """Write the index and its ``wanted`` shard sets into a staging directory and swap it into
    place (the previous index stays if anything fails). Retrievers built elsewhere
    (``bm25_retriever``, ``dense_retriever`` with its ``whole_vectors``) are saved and cut into
    shards instead of being built again; ``writes`` is the manifest's record of a merge of live
    writes (:mod:`serve_app.live.merge`)."""
    with staging_dir(out) as tmp:
        manifest = _write_index(
            tmp, corpus, bm25=bm25, dense=dense, chunking=chunking, encoder=encoder, show_progress=show_progress,
            bm25_retriever=bm25_retriever, dense_retriever=dense_retriever, writes=writes,
        )
        for retriever, n in wanted.items():
            build_shard_set(
                corpus, shard_set_dir(tmp, retriever, n), n, corpus_sha256=manifest.corpus.sha256,
                bm25=bm25 if retriever == "bm25" else None, dense=dense if retriever == "dense" else None,
                chunking=chunking, encoder=encoder, show_progress=show_progress,
                whole_bm25=bm25_retriever if retriever == "bm25" else None, whole_vectors=whole_vectors if retriever == "dense" else None,
                assignment=(assignments or {}).get(retriever),
            )
        swap_into_place(tmp, out)
    return manifest


def build_index(
    corpus: Sequence[Document],
    out_dir: str | os.PathLike[str],
    *,
    bm25: BM25Config | None,
    dense: DenseConfig | None,
    chunking: ChunkingConfig,
    encoder: Any = None,
    show_progress: bool = True,
    shards: Optional[Mapping[str, int]] = None,
) -> Manifest:
    """Build the configured retrievers over ``corpus`` and (re)place the index at ``out_dir`` atomically.

    ``encoder`` (a ``BiEncoder``) is used for the dense side when given, else one is built from
    ``dense``. ``shards`` maps a retriever to a shard count: each count above 1 also writes that
    shard set under ``shards/`` (inside the same atomic build). Returns the manifest written.
    """
    corpus, out, wanted = check_build_request(corpus, out_dir, bm25=bm25, dense=dense, shards=shards)
    if dense is not None and encoder is None:
        from serve_app.retrieval.dense import BiEncoder

        encoder = BiEncoder(dense)
    manifest = write_index_atomically(out, corpus, wanted, bm25=bm25, dense=dense, chunking=chunking, encoder=encoder, show_progress=show_progress)
    logger.info("index written to %s (%d documents, %d chunks, %s)", out, manifest.corpus.num_documents, manifest.corpus.num_chunks, ", ".join(k for k in ("bm25", "dense") if getattr(manifest, k)))
    return manifest


def build_shard_set(
    corpus: Sequence[Document],
    out_dir: str | os.PathLike[str],
    num_shards: int,
    *,
    bm25: BM25Config | None,
    dense: DenseConfig | None,
    chunking: ChunkingConfig,
    encoder: Any = None,
    show_progress: bool = False,
    corpus_sha256: Optional[str] = None,
    whole_bm25: Optional[BM25Retriever] = None,
    whole_vectors: Optional[tuple[Any, Any]] = None,
    assignment: Optional[Sequence[Sequence[int]]] = None,
) -> ShardSetManifest:
    """Build a shard set of ``corpus`` at ``out_dir`` (replacing one there atomically).

    Each shard is an ordinary index of its documents; its BM25 side is cut from one
    whole-corpus index (:meth:`BM25Retriever.split`, whole-corpus statistics), its dense side
    encodes only its documents (``encoder`` is shared by the shards when given).
    ``corpus_sha256`` is the whole corpus's document-store checksum (its index manifest's;
    computed from ``corpus`` when not given). ``whole_bm25`` (a whole-corpus BM25 index) and
    ``whole_vectors`` (every chunk's vector and document position, corpus order) are cut instead
    of indexing or encoding again (the Ray build passes what it computed). ``assignment`` gives
    each shard's document positions explicitly (ascending) instead of contiguous ranges: a merge
    of live writes keeps every document in its shard.
    """
    if bm25 is None and dense is None:
        raise ValueError("nothing to build: give a BM25 config, a dense config, or both")
    if bm25 is not None and bm25.engine != "bm25s":
        raise ValueError(f"sharded BM25 needs engine 'bm25s' (got {bm25.engine!r}): rank_bm25 recomputes corpus statistics per shard")
    import numpy as np

    corpus = corpus if isinstance(corpus, Corpus) else Corpus.from_documents(corpus)
    if assignment is not None:
        sets = [np.asarray(p, dtype=np.int64) for p in assignment]
        if len(sets) != num_shards or sum(p.size for p in sets) != len(corpus) or np.unique(np.concatenate(sets)).size != len(corpus):
            raise ValueError(f"assignment must place each of the {len(corpus)} documents in exactly one of {num_shards} shards")
    else:
        sets = [np.arange(s, e, dtype=np.int64) for s, e in shard_bounds(len(corpus), num_shards)]
    parts: list[Optional[BM25Retriever]] = [None] * num_shards
    if bm25 is not None:
        whole = whole_bm25 if whole_bm25 is not None else BM25Retriever.build(corpus, bm25, chunking, show_progress=show_progress)
        parts = list(whole.split_by_documents(sets) if assignment is not None else whole.split(shard_bounds(len(corpus), num_shards)))
    dense_parts: list[Any] = [None] * num_shards
    if dense is not None and whole_vectors is not None:
        from serve_app.retrieval.dense import DenseRetriever

        vectors, owner = whole_vectors
        for i, pos in enumerate(sets):
            rows = np.flatnonzero(np.isin(owner, pos))
            dense_parts[i] = DenseRetriever.from_vectors(vectors[rows], [corpus.ids[j] for j in pos], dense, chunk_owner=np.searchsorted(pos, owner[rows]), encoder=encoder)
    if dense is not None and encoder is None and whole_vectors is None:
        from serve_app.retrieval.dense import BiEncoder

        encoder = BiEncoder(dense)
    out = Path(out_dir).absolute()
    _check_target(out, SHARDS_MANIFEST)
    with staging_dir(out) as tmp:
        if corpus_sha256 is None:
            write_documents_jsonl(corpus, tmp / DOCUMENTS)
            corpus_sha256 = sha256_file(tmp / DOCUMENTS)
            (tmp / DOCUMENTS).unlink()
        infos = []
        for i, (pos, part, dense_part) in enumerate(zip(sets, parts, dense_parts)):
            (tmp / str(i)).mkdir()
            start, end = (int(pos[0]), int(pos[-1]) + 1) if assignment is None else (0, int(pos.size))
            _write_index(
                tmp / str(i), Corpus([corpus[j] for j in pos]), bm25=bm25, dense=dense, chunking=chunking, encoder=encoder, show_progress=show_progress,
                bm25_retriever=part, dense_retriever=dense_part, docstore=False,
            )
            infos.append(ShardInfo(index=i, directory=str(i), start=start, end=end))
        manifest = ShardSetManifest(
            format_version=SHARDS_FORMAT_VERSION,
            created_at=_now(),
            assignment="contiguous" if assignment is None else "owner",
            num_shards=num_shards,
            num_documents=len(corpus),
            corpus_sha256=corpus_sha256,
            retrievers=[n for n, c in (("bm25", bm25), ("dense", dense)) if c is not None],
            bm25_statistics="global" if bm25 is not None else None,
            shards=infos,
        )
        write_json_durably(tmp / SHARDS_MANIFEST, manifest)
        swap_into_place(tmp, out)
    return manifest


def index_is_current(index_dir: str | os.PathLike[str]) -> bool:
    """Whether ``index_dir`` holds a complete index of the format this version reads (builds
    write the manifest last)."""
    return manifest_format(index_dir) == FORMAT_VERSION


def ensure_index(
    index_dir: str | os.PathLike[str],
    *,
    corpus: Optional[str],
    bm25: BM25Config | None,
    dense: DenseConfig | None,
    chunking: ChunkingConfig,
    shards: Optional[Mapping[str, int]] = None,
    build_if_missing: bool = True,
    show_progress: bool = False,
) -> list[str]:
    """Make ``index_dir`` hold the configured index and shard sets; returns what it built.

    A missing index, or one of an older format, is built from the corpus source ``corpus``
    (:func:`serve_app.corpus.read_corpus_source`) unless ``build_if_missing`` is false
    (:class:`IndexBuildError`). Missing or stale shard sets of an existing index are cut from its
    own document store, so shards and documents always come from the same corpus. Concurrent
    callers (several app builds) wait on a file lock next to the index and build once.
    """
    d = Path(index_dir).expanduser().absolute()
    wanted = {r: n for r, n in (shards or {}).items() if n > 1}
    built: list[str] = []
    if not index_is_current(d):
        what = "holds no index" if manifest_format(d) is None else f"holds an index of format {manifest_format(d)} (this version reads {FORMAT_VERSION})"
        if not build_if_missing:
            raise IndexBuildError(f"index_dir: {d} {what} and build_index_if_missing is false; build it with `serve-app index`")
        if not corpus:
            raise IndexBuildError(f"index_dir: {d} {what} and no `corpus` is configured to build it from")
        with file_lock(d.parent / f".{d.name}.lock"):
            if not index_is_current(d):  # else another process built it while we waited
                logger.info("building the index %s from %s", d, corpus)
                if d.is_dir() and manifest_format(d) is not None:
                    logger.info("%s %s: rebuilding it", d, what)
                build_index(read_corpus_source(corpus).corpus, d, bm25=bm25, dense=dense, chunking=chunking, shards=wanted, show_progress=show_progress)
                return ["index", *(f"{r}-{n}" for r, n in wanted.items())]
    if not wanted:
        return built
    manifest = read_manifest(d)
    stale = {r: n for r, n in wanted.items() if is_current(shard_set_dir(d, r, n), n, manifest.corpus.sha256, r) is not None}
    if not stale:
        return built
    from serve_app.corpus import load_corpus

    with file_lock(d.parent / f".{d.name}.shards.lock"):
        documents = None
        for retriever, n in stale.items():
            set_dir = shard_set_dir(d, retriever, n)
            reason = is_current(set_dir, n, manifest.corpus.sha256, retriever)
            if reason is None:  # built by another process while we waited
                continue
            logger.info("building %d %s shards in %s (%s)", n, retriever, set_dir, reason)
            documents = documents if documents is not None else load_corpus(d / DOCUMENTS)
            build_shard_set(
                documents, set_dir, n, corpus_sha256=manifest.corpus.sha256,
                bm25=bm25 if retriever == "bm25" else None, dense=dense if retriever == "dense" else None,
                chunking=manifest.chunking, show_progress=show_progress,
            )
            built.append(f"{retriever}-{n}")
    return built


__all__ = ["IndexBuildError", "SHARDS_SUBDIR", "build_index", "build_shard_set", "ensure_index", "index_is_current"]
