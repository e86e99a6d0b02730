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

dtype (``cfg.dtype``): see :func:`serve_app.rerank.device.reranker_dtype`. Scores are always
computed from float32 logits and returned as ``np.float32``.

Pairs are tokenised by :class:`PairTokenizer`, which training uses too
(``serve_app.training.reranker``), so a model is trained on the very inputs it is served.
"""

from __future__ import annotations

import logging
from typing import Any

from serve_app.config import RerankerModelConfig
from serve_app.models import ModelLoadError, effective_max_length, load_pretrained, pick_device
from serve_app.rerank.checkpoint import Checkpoint
from serve_app.rerank.device import reranker_dtype, set_threads
from serve_app.rerank.pairs import PairTokenizer
from serve_app.rerank.scorer import PairScorer, ScoreStats

logger = logging.getLogger(__name__)

__all__ = ["CrossEncoderScorer", "ClassificationScore", "PairTokenizer", "ScoreStats"]


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

    def __init__(self, cfg: RerankerModelConfig, *, num_threads: int | None = None, dtype: Any = None, checkpoint: Checkpoint | None = None) -> None:
        device = pick_device(cfg.device)
        dtype = dtype if dtype is not None else reranker_dtype(cfg, device)
        set_threads(num_threads)
        source = checkpoint.source if checkpoint is not None else None
        tokenizer, model = load_pretrained(cfg.model, "cross-encoder", head="sequence_classification", dtype=dtype, source=source)
        # .to(dtype=...) as well: transformers releases before `dtype=` existed ignore that keyword.
        self._init_from(cfg, tokenizer, model.to(device=device, dtype=dtype).eval(), device, dtype)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, cfg: RerankerModelConfig) -> "CrossEncoderScorer":
        """A scorer over ``model`` as it is (its device, dtype and mode are left alone): how
        training evaluates the cross-encoder it is fitting."""
        self = cls.__new__(cls)
        param = next(model.parameters())
        self._init_from(cfg, tokenizer, model, str(param.device), param.dtype)
        return self

    def _init_from(self, cfg: RerankerModelConfig, tokenizer: Any, model: Any, device: str, dtype: Any) -> None:
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
