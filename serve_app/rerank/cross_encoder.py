"""Encoder cross-encoders: ``kind: sequence_classification`` ([CLS] -> classification head).

How a call runs (:class:`~serve_app.rerank.scorer.PairScorer` does the batching):

1. every pair is tokenised once, without padding, with ``truncation="only_second"`` so only
   the document is cut to the length limit. A query so long that it leaves no room for a
   single document token would make ``only_second`` fail; those pairs fall back to
   ``longest_first`` (query and document are both cut);
2. ``plan_batches`` groups the pairs by length under ``max_batch_tokens`` /
   ``max_batch_pairs``; each batch is padded on its own (``tokenizer.pad``);
3. batches run in the configured runtime and the scores are put back in input order.

Score of a pair:

* 1-label models: the logit;
* 2-label models: the logit difference ``logit[1] - logit[0]`` (positive minus negative
  class). ``sigmoid(logit[1] - logit[0]) == softmax(logits)[1]``, so with
  ``activation="sigmoid"`` the score is exactly the positive-class probability that
  ``sentence_transformers.CrossEncoder.predict(..., apply_softmax=True)[:, 1]`` returns
  (``predict`` itself returns both raw logits for 2-label models).

``activation="sigmoid"`` maps the score through a sigmoid; for 1-label models this is what
``CrossEncoder.predict`` applies by default.

dtype (``cfg.dtype``): see :func:`serve_app.rerank.loading.reranker_dtype`. Scores are always
computed from float32 logits and returned as ``np.float32``.

Pairs are tokenised by :class:`PairTokenizer`, which training uses too
(``serve_app.training.reranker``), so a model is trained on the very inputs it is served.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from serve_app.config import CrossEncoderConfig
from serve_app.models import ModelLoadError, effective_max_length, load_pretrained, pick_device
from serve_app.rerank.scorer import PairScorer, ScoreStats, check_pairs, limits_for

logger = logging.getLogger(__name__)

__all__ = ["CrossEncoderScorer", "ClassificationScore", "PairTokenizer", "ScoreStats"]


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
        return limits_for(n, max_length, self.max_length, self.min_pair_length)

    def features(self, pairs: Sequence[tuple[str, str]], limits: Sequence[int]) -> list[dict[str, list[int]]]:
        """Unpadded features of every pair, in input order."""
        check_pairs(pairs)
        query_tokens: dict[str, int] = {}
        groups: dict[tuple[int, str], list[int]] = {}
        for i, (q, _) in enumerate(pairs):
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


def _classification_score_class() -> Any:
    import torch

    class _ClassificationScore(torch.nn.Module):
        """A sequence classifier's raw score: ``logit`` (1 label) or ``logit[1] - logit[0]`` (2 labels)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model
            self.num_labels = int(model.config.num_labels)

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.float()
            return logits[:, 0] if self.num_labels == 1 else logits[:, 1] - logits[:, 0]

    return _ClassificationScore


def ClassificationScore(model: Any) -> Any:  # noqa: N802 - a module factory (torch is imported lazily)
    """The score module of a sequence classifier with 1 or 2 labels."""
    return _classification_score_class()(model)


class CrossEncoderScorer(PairScorer):
    """Scores (query, document) pairs with a sequence-classification cross-encoder.

    ``num_threads`` calls ``torch.set_num_threads`` (process-wide) when given; by default
    torch's own thread count is left alone. :meth:`from_model` wraps a model already in memory.
    Use :func:`serve_app.rerank.load_scorer` to load any reranker family with its configured
    runtime; this constructor loads a classifier in torch at ``dtype`` (default: float32).
    """

    kind = "sequence_classification"

    def __init__(self, cfg: CrossEncoderConfig, *, num_threads: int | None = None, dtype: Any = None) -> None:
        from serve_app.rerank.loading import reranker_dtype, set_threads

        device = pick_device(cfg.device)
        dtype = dtype if dtype is not None else reranker_dtype(cfg, device)
        set_threads(num_threads)
        tokenizer, model = load_pretrained(cfg.model, "cross-encoder", head="sequence_classification", dtype=dtype)
        # .to(dtype=...) as well: transformers releases before `dtype=` existed ignore that keyword.
        self._init_from(cfg, tokenizer, model.to(device=device, dtype=dtype).eval(), device, dtype)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, cfg: CrossEncoderConfig) -> "CrossEncoderScorer":
        """A scorer over ``model`` as it is (its device, dtype and mode are left alone): how
        training evaluates the cross-encoder it is fitting."""
        self = cls.__new__(cls)
        param = next(model.parameters())
        self._init_from(cfg, tokenizer, model, str(param.device), param.dtype)
        return self

    def _init_from(self, cfg: CrossEncoderConfig, tokenizer: Any, model: Any, device: str, dtype: Any) -> None:
        self.num_labels: int = int(model.config.num_labels)
        if self.num_labels not in (1, 2):
            raise ModelLoadError(
                f"The cross-encoder model {cfg.model!r} has {self.num_labels} output labels; "
                f"a reranker needs a sequence classifier with 1 (relevance logit) or 2 (irrelevant, relevant) labels"
            )
        max_length = effective_max_length(cfg.max_length, tokenizer, model.config, what="reranker.max_length")
        self._setup(cfg, tokenizer, PairTokenizer(tokenizer, max_length), ClassificationScore(model), device, dtype)

    @property
    def model(self) -> Any:
        """The transformers sequence classifier (None once an ONNX/OpenVINO export runs the batches)."""
        return self.module.model if self.module is not None else None

    def export_key(self) -> dict[str, Any]:
        """What the exported score module depends on besides the checkpoint's files."""
        return {"kind": self.kind, "num_labels": self.num_labels}
