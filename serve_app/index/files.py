"""Index files on disk: the manifest and the checksums of every file.

Every index directory (and every shard of a shard set) holds a ``manifest.json`` written last,
listing the size and sha256 of every other file; builds write into a temporary sibling and
rename it into place (:mod:`serve_app.fsutil`), so a reader never sees a half-written index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import serve_app
from serve_app.config import ChunkingConfig
from serve_app.fsutil import file_lock, fsync_dir, fsync_file, read_json, sha256_file
from serve_app.errors import IndexLoadError

logger = logging.getLogger(__name__)

#: Version 2: each retriever section stores its own document ids (the dense retriever no
#: longer reads the document store to learn them).
FORMAT_VERSION = 2
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
    writes: Optional[dict[str, Any]] = Field(None, description="Set by a merge of live writes: the write log's generation this base starts and base_seq, the last batch folded in.")
    files: dict[str, FileEntry] = Field(description="Every file of the index except manifest.json, by relative POSIX path.")


# --------------------------------------------------------------------------- files


def library_versions() -> dict[str, Optional[str]]:
    """Installed versions of the libraries that write index files."""
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


def log_version_changes(directory: Path, manifest: Manifest) -> None:
    """Warn when the index was written by other library versions than the installed ones."""
    now = library_versions()
    changed = {k: (v, now.get(k)) for k, v in manifest.libraries.items() if v is not None and now.get(k) not in (None, v)}
    if changed:
        logger.warning("%s was built with other library versions: %s", directory, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))


def file_entries(directory: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file below ``directory`` (fsync'ed first), by relative POSIX path."""
    files: dict[str, FileEntry] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        fsync_file(path)
        files[path.relative_to(directory).as_posix()] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    for sub in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        fsync_dir(sub)
    return files


def write_json_durably(path: Path, model: BaseModel) -> None:
    """Write a pydantic model as JSON and fsync it (the last file a build writes)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(model.model_dump_json(indent=2))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """The validated manifest of an index directory; raises ``IndexLoadError`` when there is none."""
    d = Path(directory)
    if not d.is_dir():
        raise IndexLoadError(f"{d}: no such index directory (build one with `serve-app index`)")
    path = d / MANIFEST
    if not path.is_file():
        raise IndexLoadError(f"{d}: not an index (no {MANIFEST}); an interrupted build never leaves a manifest, rebuild the index")
    raw = read_json(path, "manifest")
    if not isinstance(raw, dict):
        raise IndexLoadError(f"{path}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexLoadError(f"{path}: unknown index format version {version!r}; this serve_app ({serve_app.__version__}) reads version {FORMAT_VERSION}. Rebuild the index.")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise IndexLoadError(f"{path}: invalid manifest: {exc}") from None


def manifest_format(directory: str | os.PathLike[str]) -> Optional[int]:
    """The format version a directory's manifest declares (None without a readable manifest)."""
    try:
        raw = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    return version if isinstance(version, int) else None


def verify_files(directory: str | os.PathLike[str], manifest: Manifest, prefixes: Optional[Sequence[str]] = None, *, checksums: bool = True) -> None:
    """Check presence, size and (``checksums``) sha256 of the manifest's files under ``prefixes``
    (e.g. ``"bm25/"``; None: every file); ``IndexLoadError`` names the first bad file."""
    d = Path(directory)
    selected = {rel: e for rel, e in manifest.files.items() if prefixes is None or any(rel == p or rel.startswith(p) for p in prefixes)}
    if prefixes is not None and not selected:
        raise IndexLoadError(f"{d / MANIFEST}: lists no file for {', '.join(prefixes)}")
    for rel, entry in selected.items():
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts or rel == MANIFEST:
            raise IndexLoadError(f"{d / MANIFEST}: invalid file entry {rel!r}")
        path = d.joinpath(*parts)
        if not path.is_file():
            raise IndexLoadError(f"{path}: file {rel} listed in the manifest is missing; the index is incomplete, rebuild it")
        size = path.stat().st_size
        if size != entry.size:
            raise IndexLoadError(f"{path}: size {size} bytes, the manifest says {entry.size} (truncated or modified); rebuild the index")
        if checksums and sha256_file(path) != entry.sha256:
            raise IndexLoadError(f"{path}: sha256 mismatch (corrupted or modified since the build); rebuild the index")


#: Where a node records the files it has hashed (``SERVE_APP_VERIFIED_DIR`` overrides it).
ENV_VERIFIED_DIR = "SERVE_APP_VERIFIED_DIR"


def verified_dir() -> Path:
    return Path(os.environ.get(ENV_VERIFIED_DIR) or Path.home() / ".cache" / "serve_app" / "verified").expanduser()


def verify_once(path: Path, entry: FileEntry) -> bool:
    """Check ``path`` against its manifest entry, hashing it at most once per file identity on
    this node; returns whether it was hashed now.

    The size is checked every time. The sha256 (linear in the file's size) is computed the first
    time a given file (device, inode, size, mtime) is seen with this expected digest, under a
    lock so that replicas starting together hash it once, and recorded in :func:`verified_dir`;
    later loads of the same file trust the record. What this catches: a file replaced (new
    inode), truncated or extended (size), or written in place (mtime), before its first load
    on a node or afterwards. What it cannot: a change that keeps size and mtime (a write
    followed by resetting the mtime, or the storage corrupting bytes silently) after the file
    was verified on that node.
    """
    st = path.stat()
    if st.st_size != entry.size:
        raise IndexLoadError(f"{path}: size {st.st_size} bytes, the manifest says {entry.size} (truncated or modified); rebuild the index")
    identity = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{entry.sha256}"
    record = verified_dir() / hashlib.sha256(identity.encode()).hexdigest()[:32]
    if record.is_file():
        return False

    def check() -> None:
        if sha256_file(path) != entry.sha256:
            raise IndexLoadError(f"{path}: sha256 mismatch (corrupted or modified since the build); rebuild the index")

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(record.with_suffix(".lock")))
        except OSError as exc:  # no writable place for the records (a read-only home): hash every time
            logger.warning("cannot record verified files in %s (%s); set %s to a writable directory, or every start hashes %s", record.parent, exc, ENV_VERIFIED_DIR, path.name)
            check()
            return True
        if record.is_file():  # another replica hashed it while this one waited
            return False
        check()
        try:
            record.write_text(f"{path}\n{identity}\n", encoding="utf-8")
        except OSError as exc:
            logger.warning("cannot record %s as verified (%s)", path, exc)
    return True
