"""Opening the parts of an index that one deployment needs, and building the index once.

Each deployment loads only its share of the index directory (``serve_app.index_store`` layout):
the ingress the document store, the BM25 retriever its ``bm25/`` files, the dense retriever its
``dense/`` files and the query encoder. Each first checks the manifest's sizes and sha256 of the
files it reads, so a damaged index fails the deployment at start with ``IndexLoadError``.
Each load runs through :func:`serve_app.index_consistency.load_consistent`, so a replica that
starts while the index is being rebuilt in place loads one build, never a mix of two.

:func:`ensure_index` builds a missing index from the configured corpus, under an exclusive file
lock next to the index directory, so concurrent builders (several app builds, replicas) build
it once; the build itself is atomic (``build_index``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Sequence

from serve_app.config import DenseConfig
from serve_app.corpus import Corpus, load_corpus
from serve_app.errors import CorpusError, IndexLoadError
from serve_app.index_consistency import load_consistent
from serve_app.index_store import BM25_DIR, DENSE_DIR, DOCUMENTS, MANIFEST, Manifest, build_index, read_manifest
from serve_app.serve.config import BUILTIN_PREFIX, AppConfig, ConfigError

logger = logging.getLogger(__name__)


def verify_files(index_dir: str | os.PathLike[str], manifest: Manifest, prefixes: Sequence[str]) -> None:
    """Check size and sha256 of the manifest's files under ``prefixes`` (e.g. ``"bm25/"``)."""
    d = Path(index_dir)
    selected = {rel: e for rel, e in manifest.files.items() if any(rel == p or rel.startswith(p) for p in prefixes)}
    if not selected:
        raise IndexLoadError(f"{d / MANIFEST}: lists no file for {', '.join(prefixes)}")
    for rel, entry in selected.items():
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts:
            raise IndexLoadError(f"{d / MANIFEST}: invalid file entry {rel!r}")
        path = d.joinpath(*parts)
        if not path.is_file():
            raise IndexLoadError(f"{path}: listed in the manifest but missing; rebuild the index")
        if path.stat().st_size != entry.size:
            raise IndexLoadError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry.size} (truncated or modified); rebuild the index")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != entry.sha256:
            raise IndexLoadError(f"{path}: sha256 differs from the manifest (corrupted or modified); rebuild the index")


def load_documents(index_dir: str | os.PathLike[str]) -> tuple[Corpus, Manifest]:
    """The document store of an index and its manifest."""
    return load_consistent(index_dir, _load_documents)


def load_bm25(index_dir: str | os.PathLike[str]) -> Any:
    """The index's BM25 retriever (memory-mapped)."""
    return load_consistent(index_dir, _load_bm25)


def load_dense(index_dir: str | os.PathLike[str], cfg: DenseConfig) -> Any:
    """The index's dense retriever with a query encoder built from ``cfg`` (checked against the index)."""
    return load_consistent(index_dir, lambda d: _load_dense(d, cfg))


def _load_documents(index_dir: Path) -> tuple[Corpus, Manifest]:
    d = Path(index_dir)
    manifest = read_manifest(d)
    verify_files(d, manifest, [DOCUMENTS])
    try:
        corpus = load_corpus(d / DOCUMENTS)
    except CorpusError as exc:
        raise IndexLoadError(f"{d}: unreadable document store: {exc}") from None
    if len(corpus) != manifest.corpus.num_documents:
        raise IndexLoadError(f"{d / DOCUMENTS}: {len(corpus)} documents, the manifest says {manifest.corpus.num_documents}")
    return corpus, manifest


def _load_bm25(index_dir: Path) -> Any:
    from serve_app.retrieval.bm25 import BM25Retriever

    d = Path(index_dir)
    manifest = read_manifest(d)
    if manifest.bm25 is None:
        raise IndexLoadError(f"{d}: the index has no BM25 retriever; rebuild it with BM25 or remove bm25 from `retrievers`")
    verify_files(d, manifest, [BM25_DIR + "/"])
    retriever = BM25Retriever.load(d / BM25_DIR, manifest.bm25, mmap=True)
    if retriever.num_documents != manifest.corpus.num_documents:
        raise IndexLoadError(f"{d / BM25_DIR}: {retriever.num_documents} documents, the manifest says {manifest.corpus.num_documents}")
    return retriever


def _load_dense(index_dir: Path, cfg: DenseConfig) -> Any:
    from serve_app.retrieval.dense import BiEncoder, DenseRetriever

    d = Path(index_dir)
    manifest = read_manifest(d)
    if manifest.dense is None:
        raise IndexLoadError(f"{d}: the index has no dense retriever; rebuild it with one or remove dense from `retrievers`")
    verify_files(d, manifest, [DENSE_DIR + "/", DOCUMENTS])
    ids = load_corpus(d / DOCUMENTS).ids
    encoder = BiEncoder(cfg)  # ModelLoadError names the model and how to provide it
    return DenseRetriever.load(d / DENSE_DIR, manifest.dense, encoder, ids, cfg=cfg)


def read_corpus_source(path: str | os.PathLike[str]) -> Corpus:
    """A corpus from a JSONL file, a BEIR dataset directory (its corpus.jsonl[.gz]) or ``builtin:demo``."""
    if str(path).startswith(BUILTIN_PREFIX):
        name = str(path)[len(BUILTIN_PREFIX) :]
        if name != "demo":
            raise ConfigError(f"corpus: unknown built-in corpus {name!r} (available: builtin:demo)")
        path = demo_dir()
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("corpus.jsonl", "corpus.jsonl.gz"):
            if (p / name).is_file():
                return load_corpus(p / name)
        raise ConfigError(f"corpus: {p} is a directory without corpus.jsonl or corpus.jsonl.gz (not a BEIR dataset)")
    if not p.is_file():
        raise ConfigError(f"corpus: {p} does not exist")
    return load_corpus(p)


def demo_dir() -> Path:
    """The demo dataset shipped with the package (BEIR layout)."""
    try:
        from serve_app.demo import DEMO_DIR

        return Path(DEMO_DIR)
    except ImportError:
        import serve_app

        return Path(serve_app.__file__).parent / "demo"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed), held for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def index_exists(index_dir: str | os.PathLike[str]) -> bool:
    """Whether ``index_dir`` holds a (complete) index: builds write the manifest last."""
    return (Path(index_dir) / MANIFEST).is_file()


def ensure_index(cfg: AppConfig) -> bool:
    """Build the configured index if absent; True when this call built it."""
    d = Path(cfg.index_dir).expanduser()
    if index_exists(d):
        return False
    if not cfg.build_index_if_missing:
        raise ConfigError(f"index_dir: {d} holds no index and build_index_if_missing is false; build it with `serve-app index`")
    if not cfg.corpus:
        raise ConfigError(f"index_dir: {d} holds no index and no `corpus` is configured to build it from")
    with file_lock(d.parent / f".{d.name}.lock"):
        if index_exists(d):  # another process built it while we waited
            return False
        logger.info("building the index %s from %s", d, cfg.corpus)
        corpus = read_corpus_source(cfg.corpus)
        build_index(
            corpus,
            d,
            bm25=cfg.bm25 if "bm25" in cfg.retrievers else None,
            dense=cfg.dense if "dense" in cfg.retrievers else None,
            chunking=cfg.chunking,
            show_progress=False,
        )
    return True
