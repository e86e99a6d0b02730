"""CrossEncoderScorer: (query, document) pairs -> one relevance score per pair, in input order.

How a call runs:

1. every pair is tokenised once, without padding, with ``truncation="only_second"`` so only
   the document is cut to the length limit. A query so long that it leaves no room for a
   single document token would make ``only_second`` fail; those pairs fall back to
   ``longest_first`` (query and document are both cut);
2. ``plan_batches`` groups the pairs by length under ``max_batch_tokens`` /
   ``max_batch_pairs``; each batch is padded on its own (``tokenizer.pad``);
3. batches run under ``torch.inference_mode()`` and the scores are put back in input order.

Score of a pair:

* 1-label models: the logit;
* 2-label models: the logit difference ``logit[1] - logit[0]`` (positive minus negative
  class). ``sigmoid(logit[1] - logit[0]) == softmax(logits)[1]``, so with
  ``activation="sigmoid"`` the score is exactly the positive-class probability that
  ``sentence_transformers.CrossEncoder.predict(..., apply_softmax=True)[:, 1]`` returns
  (``predict`` itself returns both raw logits for 2-label models).

``activation="sigmoid"`` maps the score through a sigmoid; for 1-label models this is what
``CrossEncoder.predict`` applies by default.

dtype (``cfg.dtype``): ``auto`` is bfloat16 on CUDA devices that support it, else float16 on
CUDA, and float32 elsewhere. ``float16`` on a CPU falls back to float32 with a
``RuntimeWarning`` (CPU half-precision kernels are slow or missing, and one config file is
often shared by GPU and CPU replicas); ``bfloat16`` is honoured everywhere. Scores are
always computed from float32 logits and returned as ``np.float32``.
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from serve_app.config import CrossEncoderConfig
from serve_app.models import ModelLoadError, load_error, pick_device, resolve_model
from serve_app.rerank.batching import plan_batches

logger = logging.getLogger(__name__)

# Tokenizers without a real limit report a huge model_max_length (int(1e30)).
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class ScoreStats:
    """What one ``score`` call did: pairs, forward passes, their sizes and their padding."""

    pairs: int = 0
    batches: int = 0
    batch_sizes: tuple[int, ...] = ()
    tokens: int = 0
    padded_tokens: int = 0


@dataclass
class _Counters:
    pairs_scored: int = 0
    batches_run: int = 0
    tokens_scored: int = 0
    padded_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def resolve_dtype(requested: str, device: str) -> "Any":
    """The torch dtype ``requested`` means on ``device`` (see the module docstring)."""
    import torch

    on_cuda = device.startswith("cuda")
    if requested == "auto":
        if on_cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if requested == "float16" and not on_cuda:
        warnings.warn(
            f"reranker.dtype=float16 is not supported on device {device!r}; using float32 instead "
            f"(set dtype to auto, float32 or bfloat16 to silence this warning)",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[requested]


class CrossEncoderScorer:
    """Scores (query, document) pairs with a sequence-classification cross-encoder.

    ``num_threads`` calls ``torch.set_num_threads`` (process-wide) when given; by default
    torch's own thread count is left alone.
    """

    def __init__(self, cfg: CrossEncoderConfig, *, num_threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.cfg = cfg
        self.device: str = pick_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)
        path = resolve_model(cfg.model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=self.dtype)
        except Exception as exc:  # noqa: BLE001 - any loading failure gets the same explanation
            raise load_error(cfg.model, "cross-encoder", exc) from exc
        self.num_labels: int = int(model.config.num_labels)
        if self.num_labels not in (1, 2):
            raise ModelLoadError(
                f"The cross-encoder model {cfg.model!r} has {self.num_labels} output labels; "
                f"a reranker needs a sequence classifier with 1 (relevance logit) or 2 (irrelevant, relevant) labels"
            )
        # .to(dtype=...) as well: transformers releases before `dtype=` existed ignore that keyword.
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.max_length: int = self._effective_max_length(cfg.max_length)
        self._special_pair_tokens = self.tokenizer.num_special_tokens_to_add(pair=True)
        # Smallest pair limit: the special tokens plus one query and one document token.
        self.min_pair_length: int = self._special_pair_tokens + 2
        self._counters = _Counters()
        self.last_stats = ScoreStats()

    # ------------------------------------------------------------------ info
    @property
    def model_name(self) -> str:
        """The configured model name (Hub id or directory)."""
        return self.cfg.model

    @property
    def pairs_scored(self) -> int:
        """Pairs scored since the scorer was built."""
        return self._counters.pairs_scored

    @property
    def batches_run(self) -> int:
        """Forward passes run since the scorer was built."""
        return self._counters.batches_run

    @property
    def tokens_scored(self) -> int:
        """Real (non-padding) tokens fed to the model since the scorer was built."""
        return self._counters.tokens_scored

    @property
    def padded_tokens(self) -> int:
        """Padding tokens added to batches since the scorer was built."""
        return self._counters.padded_tokens

    def query_overhead(self, query: str) -> int:
        """Tokens a pair spends before its first document token: the query and the special tokens."""
        return len(self._token_ids(query)) + self._special_pair_tokens

    def _token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _effective_max_length(self, requested: int) -> int:
        """``requested`` capped by what the tokenizer and the position embeddings allow."""
        limits = [requested]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < _NO_LIMIT:
            limits.append(tok_max)
        pos_max = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(pos_max, int) and pos_max > 0:
            limits.append(pos_max)
        effective = min(limits)
        if effective < requested:
            logger.info("reranker.max_length %d capped to %d by model %s", requested, effective, self.cfg.model)
        return effective

    # --------------------------------------------------------------- scoring
    def score(self, pairs: Sequence[tuple[str, str]], max_length: int | Sequence[int] | None = None) -> np.ndarray:
        """One relevance score per (query, document) pair, float32, in input order.

        ``max_length`` lowers the token limit of the pairs for this call only: one int for
        every pair or one per pair (values above the configured limit are capped to it).
        """
        limits = self._limits(len(pairs), max_length)
        out = np.empty(len(pairs), dtype=np.float32)
        if not pairs:
            self.last_stats = ScoreStats()
            return out
        features = self._tokenize(pairs, limits)
        lengths = [len(f["input_ids"]) for f in features]
        batches = plan_batches(lengths, self.cfg.max_batch_tokens, self.cfg.max_batch_pairs)
        padded = 0
        for batch in batches:
            out[batch] = self._forward([features[i] for i in batch])
            padded += lengths[batch[0]] * len(batch) - sum(lengths[i] for i in batch)
        stats = ScoreStats(len(pairs), len(batches), tuple(len(b) for b in batches), sum(lengths), padded)
        with self._counters.lock:
            self._counters.pairs_scored += stats.pairs
            self._counters.batches_run += stats.batches
            self._counters.tokens_scored += stats.tokens
            self._counters.padded_tokens += stats.padded_tokens
        self.last_stats = stats
        return out

    def _limits(self, n: int, max_length: int | Sequence[int] | None) -> list[int]:
        if max_length is None:
            return [self.max_length] * n
        values = [max_length] * n if isinstance(max_length, (int, np.integer)) else list(max_length)
        if len(values) != n:
            raise ValueError(f"max_length has {len(values)} values for {n} pairs")
        for v in values:
            if v < self.min_pair_length:
                raise ValueError(
                    f"max_length={v} is too small: a pair needs its {self._special_pair_tokens} special tokens "
                    f"and at least one query and one document token ({self.min_pair_length})"
                )
        return [min(int(v), self.max_length) for v in values]

    def _tokenize(self, pairs: Sequence[tuple[str, str]], limits: list[int]) -> list[dict[str, list[int]]]:
        """Unpadded features of every pair, in input order."""
        query_tokens: dict[str, int] = {}
        groups: dict[tuple[int, str], list[int]] = {}
        for i, pair in enumerate(pairs):
            if len(pair) != 2 or not isinstance(pair[0], str) or not isinstance(pair[1], str):
                raise TypeError(f"pairs[{i}] must be a (query, document) tuple of two strings, got {pair!r}")
            q = pair[0]
            if q not in query_tokens:
                query_tokens[q] = len(self._token_ids(q))
            # only_second must leave at least one document token, else the tokenizer refuses.
            fits = query_tokens[q] + self._special_pair_tokens < limits[i]
            groups.setdefault((limits[i], "only_second" if fits else "longest_first"), []).append(i)
        features: list[dict[str, list[int]]] = [{} for _ in pairs]
        for (limit, strategy), idx in groups.items():
            enc = self.tokenizer(
                [pairs[i][0] for i in idx],
                [pairs[i][1] for i in idx],
                truncation=strategy,
                max_length=limit,
                padding=False,
            )
            for k, i in enumerate(idx):
                features[i] = {name: enc[name][k] for name in enc.keys()}
        return features

    def _forward(self, batch_features: list[dict[str, list[int]]]) -> np.ndarray:
        import torch

        batch = self.tokenizer.pad(batch_features, padding=True, return_tensors="pt")
        inputs = {name: tensor.to(self.device) for name, tensor in batch.items()}
        with torch.inference_mode():
            logits = self.model(**inputs).logits.float()
        scores = logits[:, 0] if self.num_labels == 1 else logits[:, 1] - logits[:, 0]
        if self.cfg.activation == "sigmoid":
            scores = torch.sigmoid(scores)
        return scores.cpu().numpy().astype(np.float32, copy=False)
