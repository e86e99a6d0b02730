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

dtype (``cfg.dtype``): see :func:`serve_app.models.resolve_dtype` (``auto`` is bfloat16 or
float16 on CUDA, float32 elsewhere). Scores are always computed from float32 logits and
returned as ``np.float32``.

Pairs are tokenised by :class:`PairTokenizer`, which training uses too
(``serve_app.training.reranker``), so a model is trained on the very inputs it is served.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from serve_app.config import CrossEncoderConfig
from serve_app.models import ModelLoadError, effective_max_length, load_pretrained, pick_device, resolve_dtype
from serve_app.rerank.batching import plan_batches

logger = logging.getLogger(__name__)



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


class PairTokenizer:
    """(query, document) pairs -> token ids, with the document side truncated to fit.

    ``max_length`` is the pair limit (special tokens included). A query so long that it leaves
    no room for a single document token falls back to ``longest_first`` (both sides cut).
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.special_tokens: int = tokenizer.num_special_tokens_to_add(pair=True)
        # Smallest pair limit: the special tokens plus one query and one document token.
        self.min_pair_length: int = self.special_tokens + 2

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` alone (no special tokens)."""
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def query_overhead(self, query: str) -> int:
        """Tokens a pair spends before its first document token: the query and the special tokens."""
        return len(self.token_ids(query)) + self.special_tokens

    def limits(self, n: int, max_length: int | Sequence[int] | None) -> list[int]:
        """Per-pair limits: ``max_length`` (one int or one per pair) capped to :attr:`max_length`."""
        if max_length is None:
            return [self.max_length] * n
        values = [max_length] * n if isinstance(max_length, (int, np.integer)) else list(max_length)
        if len(values) != n:
            raise ValueError(f"max_length has {len(values)} values for {n} pairs")
        for v in values:
            if v < self.min_pair_length:
                raise ValueError(
                    f"max_length={v} is too small: a pair needs its {self.special_tokens} special tokens "
                    f"and at least one query and one document token ({self.min_pair_length})"
                )
        return [min(int(v), self.max_length) for v in values]

    def features(self, pairs: Sequence[tuple[str, str]], limits: Sequence[int]) -> list[dict[str, list[int]]]:
        """Unpadded features of every pair, in input order."""
        query_tokens: dict[str, int] = {}
        groups: dict[tuple[int, str], list[int]] = {}
        for i, pair in enumerate(pairs):
            if len(pair) != 2 or not isinstance(pair[0], str) or not isinstance(pair[1], str):
                raise TypeError(f"pairs[{i}] must be a (query, document) tuple of two strings, got {pair!r}")
            q = pair[0]
            if q not in query_tokens:
                query_tokens[q] = len(self.token_ids(q))
            # only_second must leave at least one document token, else the tokenizer refuses.
            fits = query_tokens[q] + self.special_tokens < limits[i]
            groups.setdefault((limits[i], "only_second" if fits else "longest_first"), []).append(i)
        features: list[dict[str, list[int]]] = [{} for _ in pairs]
        for (limit, strategy), idx in groups.items():
            enc = self.tokenizer([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], truncation=strategy, max_length=limit, padding=False)
            for k, i in enumerate(idx):
                features[i] = {name: enc[name][k] for name in enc.keys()}
        return features

    def pad(self, features: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        """One padded batch of features, as torch tensors."""
        return dict(self.tokenizer.pad(list(features), padding=True, return_tensors="pt"))

    def batch(self, pairs: Sequence[tuple[str, str]], max_length: int | None = None) -> dict[str, Any]:
        """The padded tensors of ``pairs`` in input order (a training batch)."""
        return self.pad(self.features(pairs, self.limits(len(pairs), max_length)))


class CrossEncoderScorer:
    """Scores (query, document) pairs with a sequence-classification cross-encoder.

    ``num_threads`` calls ``torch.set_num_threads`` (process-wide) when given; by default
    torch's own thread count is left alone. :meth:`from_model` wraps a model already in memory.
    """

    def __init__(self, cfg: CrossEncoderConfig, *, num_threads: int | None = None) -> None:
        import torch

        device = pick_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)
        tokenizer, model = load_pretrained(cfg.model, "cross-encoder", head="sequence_classification", dtype=dtype)
        # .to(dtype=...) as well: transformers releases before `dtype=` existed ignore that keyword.
        self._setup(cfg, tokenizer, model.to(device=device, dtype=dtype).eval(), device, dtype)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, cfg: CrossEncoderConfig) -> "CrossEncoderScorer":
        """A scorer over ``model`` as it is (its device, dtype and mode are left alone): how
        training evaluates the cross-encoder it is fitting."""
        self = cls.__new__(cls)
        param = next(model.parameters())
        self._setup(cfg, tokenizer, model, str(param.device), param.dtype)
        return self

    def _setup(self, cfg: CrossEncoderConfig, tokenizer: Any, model: Any, device: str, dtype: Any) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.num_labels: int = int(model.config.num_labels)
        if self.num_labels not in (1, 2):
            raise ModelLoadError(
                f"The cross-encoder model {cfg.model!r} has {self.num_labels} output labels; "
                f"a reranker needs a sequence classifier with 1 (relevance logit) or 2 (irrelevant, relevant) labels"
            )
        self.model = model
        self.max_length: int = effective_max_length(cfg.max_length, tokenizer, model.config, what="reranker.max_length")
        self.pairs = PairTokenizer(tokenizer, self.max_length)
        self.min_pair_length: int = self.pairs.min_pair_length
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
        return self.pairs.query_overhead(query)

    # --------------------------------------------------------------- scoring
    def score(self, pairs: Sequence[tuple[str, str]], max_length: int | Sequence[int] | None = None) -> np.ndarray:
        """One relevance score per (query, document) pair, float32, in input order.

        ``max_length`` lowers the token limit of the pairs for this call only: one int for
        every pair or one per pair (values above the configured limit are capped to it).
        """
        return self.score_with_lengths(pairs, max_length)[0]

    def score_with_lengths(self, pairs: Sequence[tuple[str, str]], max_length: int | Sequence[int] | None = None) -> tuple[np.ndarray, list[int]]:
        """:meth:`score`, and the number of tokens the model read for each pair."""
        limits = self.pairs.limits(len(pairs), max_length)
        out = np.empty(len(pairs), dtype=np.float32)
        if not pairs:
            self.last_stats = ScoreStats()
            return out, []
        features = self.pairs.features(pairs, limits)
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
        return out, lengths

    def _forward(self, batch_features: list[dict[str, list[int]]]) -> np.ndarray:
        import torch

        inputs = {name: tensor.to(self.device) for name, tensor in self.pairs.pad(batch_features).items()}
        with torch.inference_mode():
            logits = self.model(**inputs).logits.float()
        scores = logits[:, 0] if self.num_labels == 1 else logits[:, 1] - logits[:, 0]
        if self.cfg.activation == "sigmoid":
            scores = torch.sigmoid(scores)
        return scores.cpu().numpy().astype(np.float32, copy=False)
