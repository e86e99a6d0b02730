"""Index directories: build them atomically, load them only when complete and unchanged.

Layout (see docs/ARCHITECTURE.md)::

    INDEX_DIR/
      manifest.json     Manifest: format, corpus fingerprint, chunking, retriever sections,
                        library versions, sha256 and size of every other file
      documents.jsonl   the document store (serve_app.corpus.write_documents_jsonl)
      bm25/             BM25Retriever.save
      dense/            DenseRetriever.save

Atomicity: :func:`build_index` writes everything into a temporary sibling directory
(``.NAME.building-*``), fsyncs every file, writes ``manifest.json`` last, and renames the
directory into place. An existing index is first renamed away (``.NAME.old-*``), the new one
renamed in, then the old one deleted. An exception during the build removes the temporary
directory and leaves the previous index untouched; a hard crash can leave a
``.NAME.building-*`` directory behind (never loaded, safe to delete). Only a crash between the
two renames leaves ``NAME`` missing, with the previous index complete under ``.NAME.old-*``.

:func:`load_index` refuses (``IndexLoadError``) a directory without a valid manifest, an
unknown format version, a missing, truncated or modified file, and a dense model other than
the expected one. Nothing is read with pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import serve_app
from serve_app.chunking import split_documents
from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
from serve_app.corpus import Corpus, load_corpus, write_documents_jsonl
from serve_app.errors import CorpusError, IndexLoadError, UserFacingError
from serve_app.retrieval.bm25 import BM25Retriever
from serve_app.types import Document

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl"
BM25_DIR = "bm25"
DENSE_DIR = "dense"

# Distributions whose versions are recorded; the first installed of each group is used.
_LIBRARIES: dict[str, tuple[str, ...]] = {
    "bm25s": ("bm25s",),
    "rank_bm25": ("rank-bm25",),
    "faiss": ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu", "faiss"),
    "torch": ("torch",),
    "transformers": ("transformers",),
    "numpy": ("numpy",),
}

__all__ = ["IndexBuildError", "LoadedIndex", "Manifest", "build_index", "load_index", "read_manifest"]


class IndexBuildError(UserFacingError):
    """The index cannot be written where asked (e.g. the target is not an index directory)."""


# --------------------------------------------------------------------------- manifest


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorpusInfo(_Model):
    num_documents: int = Field(ge=0, description="Documents in the document store.")
    num_chunks: int = Field(ge=0, description="Indexed chunks (equal to num_documents when chunking is off).")
    sha256: str = Field(description="sha256 of documents.jsonl.")


class FileEntry(_Model):
    sha256: str
    size: int = Field(ge=0)


class Manifest(_Model):
    """Contents of ``manifest.json``."""

    format_version: int
    created_at: str = Field(description="UTC build time, ISO 8601.")
    serve_app_version: str
    corpus: CorpusInfo
    chunking: ChunkingConfig
    bm25: Optional[dict[str, Any]] = Field(None, description="BM25Retriever.save section, or null when not built.")
    dense: Optional[dict[str, Any]] = Field(None, description="DenseRetriever.save section, or null when not built.")
    libraries: dict[str, Optional[str]] = Field(description="Versions of the libraries that wrote the index.")
    files: dict[str, FileEntry] = Field(description="Every file of the index except manifest.json, by relative POSIX path.")


@dataclass(frozen=True)
class LoadedIndex:
    """An opened index: the manifest, the document store and the retrievers it holds (None when not built)."""

    manifest: Manifest
    corpus: Corpus
    bm25: Optional[BM25Retriever]
    dense: Optional[Any]  # serve_app.retrieval.dense.DenseRetriever (imported lazily: torch, FAISS)

    @property
    def retrievers(self) -> dict[str, Any]:
        """The retrievers present, by name."""
        return {r.name: r for r in (self.bm25, self.dense) if r is not None}


def _library_versions() -> dict[str, Optional[str]]:
    versions: dict[str, Optional[str]] = {}
    for name, dists in _LIBRARIES.items():
        versions[name] = None
        for dist in dists:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems do not support fsync on directories
        pass


# --------------------------------------------------------------------------- build


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise IndexBuildError(f"{out}: exists and is not a directory")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise IndexBuildError(f"{out}: exists, is not empty and holds no {MANIFEST}; refusing to replace it with an index")


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    path = directory / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        f.write(manifest.model_dump_json(indent=2))
        f.flush()
        os.fsync(f.fileno())


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        _fsync_dir(out.parent)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def build_index(
    corpus: Sequence[Document],
    out_dir: str | os.PathLike[str],
    *,
    bm25: BM25Config | None,
    dense: DenseConfig | None,
    chunking: ChunkingConfig,
    encoder: Any = None,
    show_progress: bool = True,
    bm25_retriever: Optional[BM25Retriever] = None,
) -> Manifest:
    """Build the configured retrievers over ``corpus`` and (re)place the index at ``out_dir`` atomically.

    ``encoder`` (a ``BiEncoder``) is used for the dense side when given, else one is built from
    ``dense``. ``bm25_retriever``, when given, is saved as the BM25 side instead of building one
    from ``bm25``: it must index exactly ``corpus`` (used for index shards whose BM25 statistics
    are those of the whole corpus, :mod:`serve_app.retrieval.sharding`). Returns the manifest written.
    """
    if bm25 is None and dense is None and bm25_retriever is None:
        raise ValueError("nothing to build: give a BM25 config, a dense config, or both")
    corpus = corpus if isinstance(corpus, Corpus) else Corpus.from_documents(corpus)
    if len(corpus) == 0:
        raise ValueError("cannot index an empty corpus")
    if bm25_retriever is not None and bm25_retriever.doc_ids != corpus.ids:
        raise ValueError("bm25_retriever must index exactly the documents of `corpus`, in order")
    out = Path(out_dir).absolute()
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the index is an ordinary directory
        write_documents_jsonl(corpus, tmp / DOCUMENTS)
        sections: dict[str, Optional[dict[str, Any]]] = {"bm25": None, "dense": None}
        if bm25_retriever is not None:
            sections["bm25"] = bm25_retriever.save(tmp / BM25_DIR)
        elif bm25 is not None:
            sections["bm25"] = BM25Retriever.build(corpus, bm25, chunking, show_progress=show_progress).save(tmp / BM25_DIR)
        if dense is not None:
            from serve_app.retrieval.dense import BiEncoder, DenseRetriever

            enc = encoder if encoder is not None else BiEncoder(dense)
            retriever = DenseRetriever.build(corpus, dense, chunking, enc, show_progress)
            sections["dense"] = retriever.save(tmp / DENSE_DIR)
            del retriever
        files: dict[str, FileEntry] = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(path)
            files[path.relative_to(tmp).as_posix()] = FileEntry(sha256=_sha256(path), size=path.stat().st_size)
        for sub in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            _fsync_dir(sub)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            serve_app_version=serve_app.__version__,
            corpus=CorpusInfo(num_documents=len(corpus), num_chunks=len(split_documents(list(corpus), chunking)[1]), sha256=files[DOCUMENTS].sha256),
            chunking=chunking,
            bm25=sections["bm25"],
            dense=sections["dense"],
            libraries=_library_versions(),
            files=files,
        )
        _write_manifest(tmp, manifest)
        _fsync_dir(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("index written to %s (%d documents, %d chunks, %s)", out, manifest.corpus.num_documents, manifest.corpus.num_chunks, ", ".join(k for k, v in sections.items() if v))
    return manifest


# --------------------------------------------------------------------------- load


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """The validated manifest of an index directory; raises ``IndexLoadError`` when there is none."""
    d = Path(directory)
    if not d.is_dir():
        raise IndexLoadError(f"{d}: no such index directory (build one with `serve-app index`)")
    path = d / MANIFEST
    if not path.is_file():
        raise IndexLoadError(f"{d}: not an index (no {MANIFEST}); an interrupted build never leaves a manifest, rebuild the index")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexLoadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise IndexLoadError(f"{path}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexLoadError(f"{path}: unknown index format version {version!r}; this serve_app ({serve_app.__version__}) reads version {FORMAT_VERSION}. Rebuild the index.")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise IndexLoadError(f"{path}: invalid manifest: {exc}") from None


def _check_files(d: Path, manifest: Manifest, verify_checksums: bool) -> None:
    for rel, entry in manifest.files.items():
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts or rel == MANIFEST:
            raise IndexLoadError(f"{d / MANIFEST}: invalid file entry {rel!r}")
        path = d.joinpath(*parts)
        if not path.is_file():
            raise IndexLoadError(f"{d}: file {rel} listed in the manifest is missing; the index is incomplete, rebuild it")
        size = path.stat().st_size
        if size != entry.size:
            raise IndexLoadError(f"{path}: size {size} bytes, the manifest says {entry.size} (truncated or modified); rebuild the index")
        if verify_checksums and _sha256(path) != entry.sha256:
            raise IndexLoadError(f"{path}: sha256 mismatch (corrupted or modified since the build); rebuild the index")
    for required in [DOCUMENTS] + [f"{sub}/" for sub, sec in ((BM25_DIR, manifest.bm25), (DENSE_DIR, manifest.dense)) if sec]:
        if not any(rel == required or rel.startswith(required) for rel in manifest.files):
            raise IndexLoadError(f"{d / MANIFEST}: lists no file for {required}")


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    from serve_app.models import resolve_model

    try:
        return resolve_model(a) == resolve_model(b)
    except UserFacingError:
        return False


def _check_expected_model(d: Path, section: Optional[dict[str, Any]], expected: Optional[str]) -> None:
    if expected is None:
        return
    if section is None:
        raise IndexLoadError(f"{d}: the index has no dense retriever, but the dense model {expected!r} is configured")
    built = section.get("model")
    if not (isinstance(built, str) and _same_model(built, expected)):
        raise IndexLoadError(f"{d}: dense index built with model {built!r}, but {expected!r} is configured; rebuild the index or configure {built!r}")


def load_index(
    directory: str | os.PathLike[str],
    *,
    expected_dense_model: str | None = None,
    verify_checksums: bool = True,
    encoder: Any = None,
    dense_config: DenseConfig | None = None,
    load_dense_encoder: bool = True,
    mmap: bool = True,
) -> LoadedIndex:
    """Open an index written by :func:`build_index` (see the module docstring for what is refused).

    ``verify_checksums=False`` skips hashing (file presence and sizes are still checked).
    ``mmap`` memory-maps the BM25 arrays.

    Dense side: ``expected_dense_model`` must name the model the index was built with (a Hub id
    and the local directory it resolves to count as the same). The query encoder is ``encoder``
    when given, else a ``BiEncoder`` built from ``dense_config`` when given, else one built from
    the manifest (model, max_length, prefixes); ``DenseRetriever.load`` then checks its model,
    embedding dimension and prefixes against the index. ``load_dense_encoder=False`` (and no
    ``encoder``) loads the vectors only: the dense retriever can then only ``search_vectors``.
    ``dense_config`` also supplies the search-time settings (efSearch, nprobe, device, GPU).
    """
    d = Path(directory)
    manifest = read_manifest(d)
    _check_expected_model(d, manifest.dense, expected_dense_model)
    _check_files(d, manifest, verify_checksums)
    try:
        corpus = load_corpus(d / DOCUMENTS)
    except CorpusError as exc:
        raise IndexLoadError(f"{d}: unreadable document store: {exc}") from None
    if len(corpus) != manifest.corpus.num_documents:
        raise IndexLoadError(f"{d / DOCUMENTS}: {len(corpus)} documents, the manifest says {manifest.corpus.num_documents}")

    bm25 = None
    if manifest.bm25 is not None:
        bm25 = BM25Retriever.load(d / BM25_DIR, manifest.bm25, mmap=mmap)
        if bm25.doc_ids != corpus.ids:
            raise IndexLoadError(f"{d / BM25_DIR}: document ids differ from the document store")
    dense = None
    if manifest.dense is not None:
        dense = _load_dense(d / DENSE_DIR, manifest.dense, corpus, encoder, dense_config, load_dense_encoder)
    _log_version_changes(d, manifest)
    return LoadedIndex(manifest=manifest, corpus=corpus, bm25=bm25, dense=dense)


def _load_dense(d: Path, section: dict[str, Any], corpus: Corpus, encoder: Any, cfg: DenseConfig | None, load_encoder: bool) -> Any:
    from serve_app.retrieval.dense import BiEncoder, DenseRetriever

    if encoder is None and load_encoder:
        if cfg is None:
            try:
                cfg = DenseConfig(
                    model=section["model"],
                    max_length=section.get("max_length", DenseConfig.model_fields["max_length"].default),
                    query_prefix=section.get("query_prefix", ""),
                    document_prefix=section.get("document_prefix", ""),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise IndexLoadError(f"{d}: invalid dense manifest section ({exc})") from None
        encoder = BiEncoder(cfg)
    try:
        return DenseRetriever.load(d, section, encoder, corpus.ids, cfg=cfg)
    except UserFacingError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise IndexLoadError(f"{d}: cannot load the dense index ({type(exc).__name__}: {exc})") from exc


def _log_version_changes(d: Path, manifest: Manifest) -> None:
    now = _library_versions()
    changed = {k: (v, now.get(k)) for k, v in manifest.libraries.items() if v is not None and now.get(k) not in (None, v)}
    if changed:
        logger.warning("%s was built with other library versions: %s", d, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
