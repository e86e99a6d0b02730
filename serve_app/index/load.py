"""Loading index directories: the whole index in process, or only the part one replica needs.

:func:`load_index` opens everything (library use, evaluation, training). The Serve replicas
load their share only: the ingress the on-disk document store (:func:`load_document_store`;
:func:`load_documents` reads the whole corpus into memory), a BM25 replica
its ``bm25/`` files (:func:`load_bm25`), a dense replica its ``dense/`` files and the query
encoder (:func:`load_dense`); a shard replica first finds its shard (:func:`open_shard`). Each
checks the manifest's sizes and sha256 of the files it reads, so a damaged index fails at
start with ``IndexLoadError`` naming the file, and each runs through
:func:`~serve_app.index.consistency.load_consistent`, so a replica that starts while the index
is rebuilt in place loads one build, never a mix of two. Nothing is read with pickle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from serve_app.config import DenseConfig
from serve_app.corpus import Corpus, load_corpus
from serve_app.errors import CorpusError, IndexLoadError, UserFacingError
from serve_app.filters import MetadataColumns
from serve_app.index.consistency import load_consistent
from serve_app.index.files import BM25_DIR, DENSE_DIR, DOCUMENTS, Manifest, log_version_changes, read_manifest, verify_files, verify_once
from serve_app.index.shards import read_shards_manifest, shard_dir, shard_set_dir
from serve_app.retrieval.bm25 import BM25Retriever
from serve_app.retrieval.sharding import ShardedRetriever


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


# --------------------------------------------------------------------------- parts


def _documents(d: Path, manifest: Manifest, checksums: bool = True) -> Corpus:
    verify_files(d, manifest, [DOCUMENTS], checksums=checksums)
    try:
        corpus = load_corpus(d / DOCUMENTS)
    except CorpusError as exc:
        raise IndexLoadError(f"{d}: unreadable document store: {exc}") from None
    if len(corpus) != manifest.corpus.num_documents:
        raise IndexLoadError(f"{d / DOCUMENTS}: {len(corpus)} documents, the manifest says {manifest.corpus.num_documents}")
    return corpus


def _bm25(d: Path, manifest: Manifest, checksums: bool = True, mmap: bool = True) -> BM25Retriever:
    if manifest.bm25 is None:
        raise IndexLoadError(f"{d}: the index has no BM25 retriever; rebuild it with BM25 or remove bm25 from `retrievers`")
    _refuse_shards_only(d, "bm25", manifest.bm25)
    verify_files(d, manifest, [BM25_DIR + "/"], checksums=checksums)
    retriever = BM25Retriever.load(d / BM25_DIR, manifest.bm25, mmap=mmap)
    if retriever.num_documents != manifest.corpus.num_documents:
        raise IndexLoadError(f"{d / BM25_DIR}: {retriever.num_documents} documents, the manifest says {manifest.corpus.num_documents}")
    return retriever


def _check_dense_model(d: Path, section: Optional[dict[str, Any]], expected: Optional[str]) -> None:
    if expected is None:
        return
    if section is None:
        raise IndexLoadError(f"{d}: the index has no dense retriever, but the dense model {expected!r} is configured")
    from serve_app.models import same_model

    built = section.get("model")
    if not (isinstance(built, str) and same_model(built, expected)):
        raise IndexLoadError(f"{d}: dense index built with model {built!r}, but {expected!r} is configured; rebuild the index or configure {built!r}")


def _refuse_shards_only(d: Path, retriever: str, section: dict[str, Any]) -> None:
    """A shards-only index (``serve-app index --ray --shards-only``) holds a retriever only as a
    shard set: loading it whole is refused, saying how to serve it."""
    n = section.get("shards_only")
    if n:
        raise IndexLoadError(f"{d}: a shards-only index: its {retriever} retriever exists only as the shard set {retriever}-{n} (built with --shards-only); serve it sharded (shards: {{{retriever}: {n}}}) or build the index without --shards-only")


def _dense_section(d: Path, manifest: Manifest) -> dict[str, Any]:
    """The manifest's dense section; ``IndexLoadError`` when the index has no dense retriever."""
    if manifest.dense is None:
        raise IndexLoadError(f"{d}: the index has no dense retriever; rebuild it with one or remove dense from `retrievers`")
    return manifest.dense


def dense_config_of(d: str | os.PathLike[str], manifest: Manifest) -> DenseConfig:
    """The dense settings an index was built with (model, FAISS factory, length, prefixes)."""
    section = _dense_section(Path(d), manifest)
    try:
        return DenseConfig(
            model=section["model"],
            factory=section.get("factory", DenseConfig.model_fields["factory"].default),
            max_length=section.get("max_length", DenseConfig.model_fields["max_length"].default),
            query_prefix=section.get("query_prefix", ""),
            document_prefix=section.get("document_prefix", ""),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexLoadError(f"{d}: invalid dense manifest section ({exc})") from None


def _dense(d: Path, manifest: Manifest, cfg: Optional[DenseConfig], *, encoder: Any = None, load_encoder: bool = True, checksums: bool = True) -> Any:
    from serve_app.retrieval.dense import BiEncoder, DenseRetriever

    section = _dense_section(d, manifest)
    _refuse_shards_only(d, "dense", section)
    verify_files(d, manifest, [DENSE_DIR + "/"], checksums=checksums)
    if encoder is None and load_encoder:
        encoder = BiEncoder(cfg if cfg is not None else dense_config_of(d, manifest))  # ModelLoadError names the model and how to provide it
    try:
        retriever = DenseRetriever.load(d / DENSE_DIR, section, encoder, cfg=cfg)
    except UserFacingError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise IndexLoadError(f"{d / DENSE_DIR}: cannot load the dense index ({type(exc).__name__}: {exc})") from exc
    if len(retriever.doc_ids) != manifest.corpus.num_documents:
        raise IndexLoadError(f"{d / DENSE_DIR}: {len(retriever.doc_ids)} documents, the manifest says {manifest.corpus.num_documents}")
    return retriever


def load_documents(index_dir: str | os.PathLike[str]) -> tuple[Corpus, Manifest]:
    """The document store of an index and its manifest."""

    def load(d: Path) -> tuple[Corpus, Manifest]:
        manifest = read_manifest(d)
        return _documents(d, manifest), manifest

    return load_consistent(index_dir, load)


def load_document_store(index_dir: str | os.PathLike[str], *, checksums: bool = True) -> tuple[Any, Manifest]:
    """The index's document store for lookups by id, and its manifest: the SQLite store
    (``serve_app.index.docstore``, read from disk, not held in memory) when the index has one,
    else the corpus from ``documents.jsonl`` in memory (indexes built before the store existed).
    A store whose size or sha256 differs from the manifest is refused naming the file; the
    sha256 is computed once per file identity on this node (:func:`~serve_app.index.files.verify_once`:
    a replica start does not read the whole store again)."""
    from serve_app.index.docstore import DOCSTORE, SqliteDocumentStore

    def load(d: Path) -> tuple[Any, Manifest]:
        manifest = read_manifest(d)
        if DOCSTORE not in manifest.files:
            return _documents(d, manifest, checksums=checksums), manifest
        verify_files(d, manifest, [DOCSTORE], checksums=False)  # present, in place, its size
        if checksums:
            verify_once(d / DOCSTORE, manifest.files[DOCSTORE])
        store = SqliteDocumentStore(d / DOCSTORE)
        if len(store) != manifest.corpus.num_documents:
            raise IndexLoadError(f"{d / DOCSTORE}: {len(store)} documents, the manifest says {manifest.corpus.num_documents}")
        return store, manifest

    return load_consistent(index_dir, load)


def load_metadata_columns(index_dir: str | os.PathLike[str], doc_ids: list[str], fields: dict[str, str]) -> Optional[MetadataColumns]:
    """The declared ``fields`` of the documents ``doc_ids`` (a retriever's, in its order), read
    from the index's documents (None without declared fields). A document whose value has the
    wrong type for a field has no value for it (the writer refuses such writes)."""
    if not fields:
        return None
    corpus = load_documents(index_dir)[0]
    metadata = {doc.id: doc.metadata for doc in corpus}
    return MetadataColumns(fields, [metadata.get(i) or {} for i in doc_ids])


def load_bm25(index_dir: str | os.PathLike[str]) -> BM25Retriever:
    """The index's BM25 retriever (memory-mapped)."""
    return load_consistent(index_dir, lambda d: _bm25(d, read_manifest(d)))


def load_dense(index_dir: str | os.PathLike[str], cfg: DenseConfig, *, load_encoder: bool = True) -> Any:
    """The index's dense retriever with a query encoder built from ``cfg`` (checked against the
    index); ``load_encoder=False``: without one (a shard that receives query vectors). The
    document store is not read: the dense files hold their own document ids."""
    return load_consistent(index_dir, lambda d: _dense(d, read_manifest(d), cfg, load_encoder=load_encoder))


def load_query_encoder(index_dir: str | os.PathLike[str], cfg: DenseConfig) -> Any:
    """The bi-encoder ``cfg`` names, checked against the index's dense section (model, dimension,
    prefixes): what encodes queries once for every shard of a sharded dense retriever."""
    from serve_app.retrieval.dense import BiEncoder, check_encoder

    d = Path(index_dir)
    section = _dense_section(d, read_manifest(d))
    encoder = BiEncoder(cfg)
    check_encoder(d / DENSE_DIR, section, encoder)
    return encoder


def open_shard(index_dir: str | os.PathLike[str], retriever: str, index: int, num_shards: int) -> Path:
    """The index directory of one shard, checked against the index it was cut from (same
    corpus, expected shard count, the shard's document count)."""
    corpus_sha = read_manifest(index_dir).corpus.sha256
    set_dir = shard_set_dir(index_dir, retriever, num_shards)
    d = shard_dir(set_dir, index, num_shards=num_shards, corpus_sha256=corpus_sha, retriever=retriever)
    info = read_shards_manifest(set_dir).shards[index]
    found = read_manifest(d).corpus.num_documents
    if found != info.end - info.start:
        raise IndexLoadError(f"{d}: {found} documents, the shard set says {info.end - info.start}; rebuild the shards")
    return d


# --------------------------------------------------------------------------- whole index


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
    """Open a whole index written by :func:`serve_app.index.build_index`.

    Refused (``IndexLoadError``): a directory without a valid manifest, an unknown format
    version, a missing, truncated or modified file (``verify_checksums=False`` checks presence
    and sizes only), retrievers whose document ids differ from the document store, and a dense
    model other than ``expected_dense_model`` (a Hub id and the local directory it resolves to
    count as the same). ``mmap`` memory-maps the BM25 arrays.

    Dense side: the query encoder is ``encoder`` when given, else a ``BiEncoder`` built from
    ``dense_config`` when given, else one built from the manifest (model, max_length, prefixes);
    ``DenseRetriever.load`` then checks its model, embedding dimension and prefixes against the
    index. ``load_dense_encoder=False`` (and no ``encoder``) loads the vectors only: the dense
    retriever can then only ``search_vectors``. ``dense_config`` also supplies the search-time
    settings (efSearch, nprobe, device, GPU).
    """
    d = Path(directory)
    manifest = read_manifest(d)
    _check_dense_model(d, manifest.dense, expected_dense_model)
    verify_files(d, manifest, checksums=verify_checksums)
    corpus = _documents(d, manifest, checksums=False)  # checked just above
    bm25 = dense = None
    if manifest.bm25 is not None:
        bm25 = _bm25(d, manifest, checksums=False, mmap=mmap)
        if bm25.doc_ids != corpus.ids:
            raise IndexLoadError(f"{d / BM25_DIR}: document ids differ from the document store")
    if manifest.dense is not None:
        dense = _dense(d, manifest, dense_config, encoder=encoder, load_encoder=load_dense_encoder, checksums=False)
        if dense.doc_ids != corpus.ids:
            raise IndexLoadError(f"{d / DENSE_DIR}: document ids differ from the document store")
    log_version_changes(d, manifest)
    return LoadedIndex(manifest=manifest, corpus=corpus, bm25=bm25, dense=dense)


def load_shards(set_dir: str | os.PathLike[str], **load_kwargs: Any) -> dict[str, ShardedRetriever]:
    """Open every shard of a set in process (``load_kwargs`` go to :func:`load_index`); returns
    one :class:`~serve_app.retrieval.sharding.ShardedRetriever` per retriever the set holds."""
    d = Path(set_dir)
    m = read_shards_manifest(d)
    loaded = [load_index(shard_dir(d, i), **load_kwargs) for i in range(m.num_shards)]
    for info, part in zip(m.shards, loaded):
        if len(part.corpus) != info.end - info.start:
            raise IndexLoadError(f"{d / info.directory}: {len(part.corpus)} documents, the shard set says {info.end - info.start}")
    return {name: ShardedRetriever([part.retrievers[name] for part in loaded]) for name in m.retrievers}
