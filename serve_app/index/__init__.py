"""Everything an index is on disk: manifest and checksums, atomic builds, loading, shard sets.

* :mod:`~serve_app.index.files`: the manifest (``manifest.json``) and the checksums of every file;
* :mod:`~serve_app.index.build`: :func:`build_index`, the one entry point that writes an index
  (and the shard sets it is asked for), and :func:`ensure_index`, which builds a missing one;
* :mod:`~serve_app.index.load`: :func:`load_index` (the whole index in process) and the loaders
  of the part one Serve replica needs, consistent under in-place rebuilds
  (:mod:`~serve_app.index.consistency`);
* :mod:`~serve_app.index.shards`: shard sets (one index directory per shard);
* :mod:`~serve_app.index.docstore`: the SQLite document store the ingress reads texts from;
* :mod:`~serve_app.index.ray_build`: :func:`~serve_app.index.ray_build.build_index_ray`, the
  same index built on a Ray cluster with Ray Data (``serve-app index --ray``; imported on use,
  so that reading an index never imports Ray).

Each retriever writes and reads only its own sub-directory (``bm25/``, ``dense/``), its document
ids included; this package never looks inside them.
"""

from serve_app.index.build import IndexBuildError, build_index, build_shard_set, ensure_index, index_is_current
from serve_app.index.files import BM25_DIR, DENSE_DIR, DOCUMENTS, FORMAT_VERSION, MANIFEST, Manifest, read_manifest, verify_files
from serve_app.index.docstore import DOCSTORE, SqliteDocumentStore, write_document_store
from serve_app.index.load import LoadedIndex, load_bm25, load_dense, load_document_store, load_documents, load_index, load_metadata_columns, load_query_encoder, load_shards, open_shard
from serve_app.index.shards import SHARDS_MANIFEST, ShardSetManifest, read_shards_manifest, shard_dir, shard_set_dir

__all__ = [
    "BM25_DIR",
    "DENSE_DIR",
    "DOCSTORE",
    "DOCUMENTS",
    "FORMAT_VERSION",
    "IndexBuildError",
    "LoadedIndex",
    "MANIFEST",
    "Manifest",
    "SHARDS_MANIFEST",
    "SqliteDocumentStore",
    "ShardSetManifest",
    "build_index",
    "build_shard_set",
    "ensure_index",
    "index_is_current",
    "load_bm25",
    "load_dense",
    "load_query_encoder",
    "load_document_store",
    "load_documents",
    "load_metadata_columns",
    "load_index",
    "load_shards",
    "open_shard",
    "read_manifest",
    "read_shards_manifest",
    "shard_dir",
    "shard_set_dir",
    "verify_files",
    "write_document_store",
]
