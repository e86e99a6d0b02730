"""Dense retrieval: a transformers bi-encoder (mean pooling, L2) and a FAISS inner-product index.

``BiEncoder`` reproduces sentence-transformers' encoding of mean-pooling models
(``Transformer -> Pooling(mean) -> Normalize``) with plain transformers, so the
service does not depend on sentence-transformers at run time.

``DenseRetriever`` indexes chunk embeddings and answers with documents: a
document's score is its best chunk's cosine similarity to the query.

Files written by :meth:`DenseRetriever.save` (inside the retriever's own directory)::

    index.faiss       the CPU FAISS index (faiss.write_index)
    chunk_owner.npy   int64 position of each vector's document (np.save, no pickle)
    doc_ids.json      the document id of each position (the retriever never reads the
                      document store)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import faiss
import numpy as np

from serve_app.chunking import collapse_to_documents, split_documents
from serve_app.config import ChunkingConfig, DenseConfig
from serve_app.errors import IndexLoadError
from serve_app.fsutil import read_json
from serve_app.models import effective_max_length, load_pretrained, mean_pool, pick_device, same_model, tokenize_texts
from serve_app.filters import MetadataColumns, Node
from serve_app.retrieval.filtered import BitmapSelector, allowed_documents, exact_documents, fill_short, flat_storage, reconstruct, search_parameters, use_exact
from serve_app.retrieval.faiss_index import (
    GPU_MAX_K,
    DenseIndexError,
    create_index,
    maybe_to_gpu,
    set_search_params,
    train_and_add,
)
from serve_app.types import Document, Hit

__all__ = ["BiEncoder", "DenseIndexError", "DenseRetriever", "collect_documents", "order_hits"]

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
OWNER_FILE = "chunk_owner.npy"
IDS_FILE = "doc_ids.json"
POOLING = "mean"


def _check_texts(texts: Iterable[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a sequence of strings, not a single string")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, expected str")
    return out


def collect_documents(search: Any, q: np.ndarray, k_docs: int, owner: np.ndarray, total: int, max_chunks_per_doc: int) -> list[list[tuple[int, float]]]:
    """The best ``k_docs`` documents (position, best chunk's score) of each query row, from
    ``search(rows, fetch) -> (scores, vector ids)`` over ``total`` vectors whose documents are
    ``owner``: a first fetch of ``k_docs x min(chunks per document, 4)`` vectors, doubled for the
    queries whose vectors filled every slot (more may exist) but not ``k_docs`` documents."""
    fetch = min(total, k_docs * min(max_chunks_per_doc, 4))
    results: list[list[tuple[int, float]]] = [[] for _ in range(q.shape[0])]
    pending = np.arange(q.shape[0])
    while pending.size and fetch > 0:
        scores, ids = search(q[pending], fetch)
        again = []
        for row, qi in enumerate(pending.tolist()):
            hits = collapse_to_documents(ids[row], scores[row], owner, k_docs)
            results[qi] = hits
            if len(hits) < k_docs and fetch < total and ids[row][-1] >= 0:
                again.append(qi)
        pending = np.asarray(again, dtype=np.int64)
        fetch = min(total, fetch * 2)
    return results


def order_hits(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's hits of each query ordered by score, then by vector id for equal scores (FAISS's
    heap leaves the order of ties unspecified; a fixed one makes equal indexes answer equally),
    padding (id -1) last."""
    key_missing = ids < 0
    order = np.lexsort((np.where(key_missing, np.iinfo(np.int64).max, ids), -np.where(key_missing, -np.inf, scores)), axis=1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


class BiEncoder:
    """Sentence embeddings from a transformers encoder: mean pooling over the attention mask, then L2.

    ``cfg.model`` is a Hugging Face id or a local directory, resolved with
    :func:`serve_app.models.resolve_model` (the default MiniLM id resolves offline to the
    packaged weights). ``fp16`` runs the model in half precision on CUDA (ignored on CPU).
    :meth:`from_model` wraps a model already in memory (training evaluates its student so).
    """

    def __init__(self, cfg: DenseConfig, *, fp16: bool = False) -> None:
        import torch

        tokenizer, model = load_pretrained(cfg.model, "dense encoder", head="encoder")
        device = torch.device(pick_device(cfg.device))
        model.to(device).eval()
        if fp16 and device.type == "cuda":
            model.half()
        self._setup(cfg, tokenizer, model, device)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, cfg: DenseConfig) -> "BiEncoder":
        """An encoder over ``model`` as it is (its device and mode are left alone)."""
        self = cls.__new__(cls)
        self._setup(cfg, tokenizer, model, next(model.parameters()).device)
        return self

    def _setup(self, cfg: DenseConfig, tokenizer: Any, model: Any, device: Any) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.max_length = effective_max_length(cfg.max_length, tokenizer, model.config, what="dense max_length")
        hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model", None)
        self._dim = int(hidden) if hidden else int(self.encode(["dimension probe"]).shape[1])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self._dim

    @property
    def model_name(self) -> str:
        """The configured model name (Hub id or path), as recorded in index manifests."""
        return self.cfg.model

    def encode_queries(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """Embeddings of queries, ``cfg.query_prefix`` prepended."""
        texts = _check_texts(texts, "queries")
        return self.encode([self.cfg.query_prefix + t for t in texts], show_progress=show_progress)

    def encode_documents(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """Embeddings of documents (or chunks), ``cfg.document_prefix`` prepended."""
        texts = _check_texts(texts, "documents")
        return self.encode([self.cfg.document_prefix + t for t in texts], show_progress=show_progress)

    def encode(self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings, shape ``(len(texts), dim)``, in input order.

        Texts are batched longest first (by characters) so each batch pads little;
        texts longer than ``max_length`` tokens are truncated.
        """
        import torch

        from serve_app.progress import progress

        texts = _check_texts(texts, "texts")
        bs = int(batch_size or self.cfg.batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        width = getattr(self, "_dim", None)
        if not texts:
            return np.zeros((0, width or 0), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks: list[np.ndarray] = []
        with torch.inference_mode(), progress(len(texts), "encoding", "text", enabled=show_progress) as bar:
            for start in range(0, len(texts), bs):
                idx = order[start : start + bs]
                batch = tokenize_texts(self.tokenizer, [texts[i] for i in idx], self.max_length, self.device)
                pooled = mean_pool(self.model(**batch).last_hidden_state, batch["attention_mask"])
                chunks.append(pooled.cpu().numpy())
                bar.update(len(idx))
        sorted_emb = np.concatenate(chunks, axis=0).astype(np.float32, copy=False)
        out = np.empty_like(sorted_emb)
        out[order] = sorted_emb
        return out


class DenseRetriever:
    """Top-k documents by cosine similarity of bi-encoder embeddings, served by FAISS.

    The FAISS index holds one vector per chunk (per document when chunking is off);
    ``chunk_owner[i]`` is the position in ``doc_ids`` of vector ``i``'s document.
    ``encoder`` may be None for a retriever queried only through :meth:`search_vectors`.
    """

    name = "dense"

    def __init__(
        self,
        index: faiss.Index,
        chunk_owner: np.ndarray,
        doc_ids: Sequence[str],
        cfg: DenseConfig,
        encoder: BiEncoder | None = None,
        *,
        factory: str | None = None,
    ) -> None:
        owner = np.asarray(chunk_owner, dtype=np.int64)
        if owner.shape != (index.ntotal,):
            raise ValueError(f"chunk_owner has shape {owner.shape}, expected ({index.ntotal},): one entry per indexed vector")
        if owner.size and (owner.min() < 0 or owner.max() >= len(doc_ids)):
            raise ValueError(f"chunk_owner refers to documents outside 0..{len(doc_ids) - 1}")
        self.cfg = cfg
        self.encoder = encoder
        self.factory = factory or cfg.factory
        self.doc_ids = list(doc_ids)
        self.chunk_owner = owner
        self._cpu_index = index
        set_search_params(index, ef_search=cfg.hnsw_ef_search, nprobe=cfg.ivf_nprobe)
        self._index, self._gpu_resources = maybe_to_gpu(index, enabled=cfg.use_gpu_index, device=cfg.device)
        counts = np.bincount(owner, minlength=len(self.doc_ids)) if owner.size else np.zeros(0, dtype=np.int64)
        #: The declared metadata fields of the documents (filters), in ``doc_ids`` order; None: none declared.
        self.columns: Optional[MetadataColumns] = None
        self._max_chunks_per_doc = int(counts.max()) if counts.size else 0

    # ----------------------------------------------------------------- build

    @classmethod
    def build(
        cls,
        corpus: Sequence[Document],
        cfg: DenseConfig,
        chunking: ChunkingConfig,
        encoder: BiEncoder | None = None,
        show_progress: bool = False,
    ) -> DenseRetriever:
        """Encode the corpus (chunked per ``chunking``) and index it with ``cfg.factory``.

        ``corpus`` is a :class:`serve_app.corpus.Corpus` (or any sequence of Documents);
        its ``ids`` give the document ids of the hits.
        """
        docs = list(corpus)
        if not docs:
            raise DenseIndexError("cannot build a dense index over an empty corpus")
        doc_ids = list(getattr(corpus, "ids", [d.id for d in docs]))
        if len(doc_ids) != len(docs):
            raise ValueError(f"corpus.ids has {len(doc_ids)} entries for {len(docs)} documents")
        encoder = encoder or BiEncoder(cfg)
        texts, owner = split_documents(docs, chunking)
        log.info("dense: encoding %d texts of %d documents with %s", len(texts), len(docs), encoder.model_name)
        vectors = encoder.encode_documents(texts, show_progress=show_progress)
        return cls.from_vectors(vectors, doc_ids, cfg, chunk_owner=owner, encoder=encoder)

    @classmethod
    def from_vectors(
        cls,
        vectors: np.ndarray,
        doc_ids: Sequence[str],
        cfg: DenseConfig,
        chunk_owner: np.ndarray | None = None,
        encoder: BiEncoder | None = None,
    ) -> DenseRetriever:
        """Index precomputed (L2-normalised) vectors; ``chunk_owner`` defaults to one vector per document."""
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"vectors must be a non-empty 2-D array, got shape {x.shape}")
        owner = np.arange(len(doc_ids), dtype=np.int64) if chunk_owner is None else np.asarray(chunk_owner, dtype=np.int64)
        if owner.shape != (x.shape[0],):
            raise ValueError(f"{x.shape[0]} vectors but chunk_owner has shape {owner.shape}")
        if encoder is not None and encoder.dim != x.shape[1]:
            raise ValueError(f"vectors have dimension {x.shape[1]}, the encoder {encoder.dim}")
        index = create_index(x.shape[1], cfg.factory)
        train_and_add(index, x, cfg.factory)
        return cls(index, owner, doc_ids, cfg, encoder, factory=cfg.factory)

    # ---------------------------------------------------------------- search

    @property
    def dim(self) -> int:
        """Dimension of the indexed vectors."""
        return int(self._cpu_index.d)

    @property
    def num_vectors(self) -> int:
        """Indexed vectors (chunks)."""
        return int(self._cpu_index.ntotal)

    def search(self, query: str, k: int, where: Optional[Node] = None) -> list[Hit]:
        """Top-``k`` documents for one query, best first (among those ``where`` admits)."""
        return self.search_batch([query], k, where)[0]

    def search_batch(self, queries: Sequence[str], k: int, where: Optional[Node] = None) -> list[list[Hit]]:
        """Top-``k`` documents for each query, best first (among those ``where`` admits)."""
        if self.encoder is None:
            raise RuntimeError("this DenseRetriever has no encoder: pass one to build/load, or use search_vectors")
        queries = _check_texts(queries, "queries")
        if not queries:
            return []
        return self.search_vectors(self.encoder.encode_queries(queries), k, where)

    def search_vectors(self, query_vectors: np.ndarray, k: int, where: Optional[Node] = None) -> list[list[Hit]]:
        """Top-``k`` documents for each row of ``query_vectors`` (shape ``(n, dim)``, L2-normalised);
        with a filter ``where``, among the documents it admits, searched inside FAISS or exactly
        (:mod:`serve_app.retrieval.filtered`)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = np.ascontiguousarray(np.asarray(query_vectors, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (n, {self.dim}), got {q.shape}")
        if q.shape[0] == 0:
            return []
        if where is not None:
            results = self._filtered(q, int(k), where)
        else:
            k_docs = min(int(k), len(self.doc_ids))
            results = collect_documents(self._raw_search, q, k_docs, self.chunk_owner, self.num_vectors, self._max_chunks_per_doc)
        return [[Hit(self.doc_ids[d], s) for d, s in hits] for hits in results]

    def _filtered(self, q: np.ndarray, k: int, where: Node) -> list[list[tuple[int, float]]]:
        allowed = allowed_documents(self.columns, where, len(self.doc_ids))
        assert allowed is not None
        k_docs = min(k, int(allowed.sum()))
        if k_docs == 0:
            return [[] for _ in range(q.shape[0])]
        vmask = allowed[self.chunk_owner]
        ids = np.flatnonzero(vmask)
        owner = self.chunk_owner

        sel = BitmapSelector(vmask)
        flat = flat_storage(self._cpu_index)

        def exact(rows: np.ndarray) -> list[list[tuple[int, float]]]:
            if flat is None:
                return exact_documents(q[rows], reconstruct(self._cpu_index, ids), ids, owner, k_docs)
            scan = faiss.SearchParameters(sel=sel.selector)
            return collect_documents(lambda r, fetch: order_hits(*flat.search(r, fetch, params=scan)), q[rows], k_docs, owner, int(ids.size), self._max_chunks_per_doc)

        if use_exact(ids.size, self.num_vectors, self.cfg):
            return exact(np.arange(q.shape[0]))
        params = search_parameters(self._cpu_index, sel.selector, ef_search=self.cfg.hnsw_ef_search, nprobe=self.cfg.ivf_nprobe, live_fraction=ids.size / max(self.num_vectors, 1))

        def search(rows: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
            scores, found = self._cpu_index.search(rows, fetch, params=params)
            return order_hits(scores, found)

        results = collect_documents(search, q, k_docs, owner, int(ids.size), self._max_chunks_per_doc)
        return fill_short(results, k_docs, exact)

    def _raw_search(self, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._index
        if self._gpu_resources is not None and fetch > GPU_MAX_K:
            index = self._cpu_index
        scores, ids = index.search(q, fetch)
        return order_hits(scores, ids)

    # ------------------------------------------------------------ save, load

    def section(self) -> dict[str, Any]:
        """The manifest section describing this index (no file contents)."""
        enc = self.encoder
        return {
            "model": enc.model_name if enc else self.cfg.model,
            "dim": self.dim,
            "factory": self.factory,
            "normalize": True,
            "pooling": POOLING,
            "max_length": enc.max_length if enc else self.cfg.max_length,
            "query_prefix": enc.cfg.query_prefix if enc else self.cfg.query_prefix,
            "document_prefix": enc.cfg.document_prefix if enc else self.cfg.document_prefix,
            "num_vectors": self.num_vectors,
            "num_documents": len(self.doc_ids),
            "files": [INDEX_FILE, OWNER_FILE, IDS_FILE],
        }

    def save(self, directory: str | Path) -> dict[str, Any]:
        """Write the CPU index and the chunk -> document map into ``directory``; return the manifest section.

        ``files`` in the section are relative to ``directory``.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._cpu_index, str(out / INDEX_FILE))
        np.save(out / OWNER_FILE, self.chunk_owner, allow_pickle=False)
        (out / IDS_FILE).write_text(json.dumps(self.doc_ids, ensure_ascii=False), encoding="utf-8")
        return self.section()

    @classmethod
    def load(
        cls,
        directory: str | Path,
        section: Mapping[str, Any],
        encoder: BiEncoder | None,
        cfg: DenseConfig | None = None,
    ) -> DenseRetriever:
        """Open an index written by :meth:`save`, checking it against ``section`` and ``encoder``.

        ``cfg`` supplies the search-time settings (efSearch, nprobe, GPU); it defaults to
        the encoder's config. Raises :class:`IndexLoadError` on any mismatch or damage.
        """
        d = Path(directory)
        missing = [key for key in ("model", "dim", "factory", "num_vectors", "num_documents") if key not in section]
        if missing:
            raise IndexLoadError(f"dense manifest section in {d} lacks {', '.join(missing)}")
        if section.get("normalize", True) is not True or section.get("pooling", POOLING) != POOLING:
            raise IndexLoadError(f"dense index in {d} was built with pooling={section.get('pooling')!r}, normalize={section.get('normalize')!r}; this version supports mean pooling with L2 normalisation only")
        if encoder is not None:
            check_encoder(d, section, encoder)
        doc_ids = _read_ids(d / IDS_FILE)
        if len(doc_ids) != int(section["num_documents"]):
            raise IndexLoadError(f"{d / IDS_FILE} holds {len(doc_ids)} document ids, the manifest says {section['num_documents']}")
        index = _read_index(d / INDEX_FILE)
        if index.d != int(section["dim"]) or index.ntotal != int(section["num_vectors"]):
            raise IndexLoadError(
                f"{d / INDEX_FILE} holds {index.ntotal} vectors of dimension {index.d}, the manifest says "
                f"{section['num_vectors']} of dimension {section['dim']}"
            )
        owner = _read_owner(d / OWNER_FILE, index.ntotal, len(doc_ids))
        if cfg is None:
            cfg = encoder.cfg if encoder is not None else DenseConfig(model=str(section["model"]), factory=str(section["factory"]))
        return cls(index, owner, doc_ids, cfg, encoder, factory=str(section["factory"]))


def check_encoder(d: Path, section: Mapping[str, Any], encoder: BiEncoder) -> None:
    if encoder.dim != int(section["dim"]):
        raise IndexLoadError(f"dense index in {d} has {section['dim']}-dimensional vectors but the encoder {encoder.model_name!r} gives {encoder.dim}")
    if not same_model(encoder.model_name, str(section["model"])):
        raise IndexLoadError(f"dense index in {d} was built with model {section['model']!r}, not {encoder.model_name!r}; rebuild the index or configure that model")
    for key in ("query_prefix", "document_prefix"):
        if key in section and section[key] != getattr(encoder.cfg, key):
            raise IndexLoadError(f"dense index in {d} was built with {key}={section[key]!r}, the encoder uses {getattr(encoder.cfg, key)!r}")


def _read_index(path: Path) -> faiss.Index:
    if not path.is_file():
        raise IndexLoadError(f"dense index file {path} is missing")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise IndexLoadError(f"cannot read FAISS index {path}: {detail}") from None


def _read_ids(path: Path) -> list[str]:
    ids = read_json(path, "file of the dense index (document ids)")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise IndexLoadError(f"{path}: expected a JSON list of document ids")
    return ids


def _read_owner(path: Path, num_vectors: int, num_docs: int) -> np.ndarray:
    if not path.is_file():
        raise IndexLoadError(f"chunk -> document map {path} is missing")
    try:
        owner = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise IndexLoadError(f"cannot read {path}: {exc}") from None
    if owner.shape != (num_vectors,) or not np.issubdtype(owner.dtype, np.integer):
        raise IndexLoadError(f"{path} holds {owner.dtype} array of shape {owner.shape}, expected {num_vectors} integers")
    if owner.size and (owner.min() < 0 or owner.max() >= num_docs):
        raise IndexLoadError(f"{path} refers to documents outside 0..{num_docs - 1}")
    return owner.astype(np.int64, copy=False)
