"""Cross-encoder fine-tuning: the model, the batches, the two losses and the dev evaluation.

The model is ``AutoModelForSequenceClassification`` with one output logit, loaded from any
encoder or cross-encoder checkpoint; a checkpoint without a matching 1-logit head (a plain
encoder such as all-MiniLM-L6-v2, or a 2-class classifier) gets a freshly initialised head.
An example is one query with one judged positive and ``negatives_per_query`` negatives:

* ``bce``: binary cross-entropy with logits on each of its pairs (label 1 for the positive);
* ``listwise``: softmax cross-entropy over its ``1 + n`` logits, the positive being the target.

Pairs are tokenised as (query, document) with ``truncation=True`` (longest first: with a short
query only the document is cut), as ``serve_app.rerank.CrossEncoderScorer`` and
``sentence_transformers.CrossEncoder`` read them. The exported directory is a plain
``save_pretrained`` checkpoint (``num_labels=1``) plus its tokenizer, whose
``model_max_length`` is set to the training ``max_length`` so that readers truncate as in
training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from serve_app.training.config import RerankerTrainingConfig
from serve_app.training.data import PreparedData, QueryRecord, epoch_order, example_keys, example_rng, sample_negatives

logger = logging.getLogger(__name__)

CONFIG_FILE = "training_config.json"


def dev_candidates(record: QueryRecord, limit: int) -> list[str]:
    """Documents ranked for a dev query: its positives and its first ``limit`` hard negatives (random ones without hard)."""
    negatives = record.hard or record.random
    seen = set(record.positives)
    return list(record.positives) + [d for d in negatives if d not in seen][:limit]


def load_sequence_classifier(path: str) -> tuple[Any, set[str]]:
    """A 1-logit ``AutoModelForSequenceClassification`` from ``path`` and the names of its new parameters.

    New parameters are those the checkpoint lacks or holds with another shape: the head of a
    plain encoder, or of a classifier with another number of labels.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    mismatched_head = int(getattr(config, "num_labels", 2)) != 1 and any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if mismatched_head:
        logger.warning("%s is a %d-label classifier; its head is replaced by a new 1-logit head", path, config.num_labels)
    model, info = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, ignore_mismatched_sizes=mismatched_head, output_loading_info=True)
    new = set(info.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())}
    return model, new


def score_pairs(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int, batch_size: int = 64) -> list[float]:
    """Relevance logits of ``pairs`` (input order), batched by length, without gradients."""
    import torch

    if not pairs:
        return []
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = [0.0] * len(pairs)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
            logits = model(**enc).logits.float()[:, 0].cpu().tolist()
            for i, v in zip(idx, logits):
                out[i] = float(v)
    return out


class RerankerTask:
    """:class:`serve_app.training.engine.Task` of cross-encoder fine-tuning."""

    def __init__(self, settings: RerankerTrainingConfig, data: PreparedData, base_path: str) -> None:
        from transformers import AutoTokenizer

        self.settings = settings
        self.data = data
        self.base_path = base_path
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        self.keys = example_keys(data.train)
        self.group_size = 1 + settings.negatives_per_query
        self.new_parameters: set[str] = set()

    def build_model(self) -> Any:
        model, self.new_parameters = load_sequence_classifier(self.base_path)
        if self.new_parameters:
            logger.info("new parameters (learning rate x%g): %s", self.settings.head_lr_scale, ", ".join(sorted(self.new_parameters)))
        return model

    def lr_scale(self, name: str) -> float:
        """``head_lr_scale`` for the parameters the base checkpoint did not have, else 1."""
        return self.settings.head_lr_scale if name in self.new_parameters else 1.0

    def num_examples(self) -> int:
        return len(self.keys)

    def train_examples(self, epoch: int) -> list[tuple[str, list[str]]]:
        s = self.settings
        out = []
        for k in epoch_order(len(self.keys), s.loop.seed, epoch).tolist():
            r, j = self.keys[k]
            record = self.data.train[r]
            negs = sample_negatives(record, s.negatives_per_query, s.mining.random_negatives, example_rng(s.loop.seed, epoch, k))
            out.append((record.text, [self.data.docs[d] for d in [record.positives[j], *negs]]))
        return out

    def collate(self, examples: list[tuple[str, list[str]]]) -> dict[str, Any]:
        queries = [q for q, docs in examples for _ in docs]
        docs = [d for _, ds in examples for d in ds]
        enc = self.tokenizer(queries, docs, truncation=True, max_length=self.settings.loop.max_length, padding=True, return_tensors="pt")
        return {"features": dict(enc)}

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch
        import torch.nn.functional as F

        logits = model(**batch["features"]).logits.float().view(-1, self.group_size)
        if self.settings.loss == "listwise":
            target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
            return F.cross_entropy(logits, target)
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(logits, labels)

    def evaluate(self, model: Any) -> Optional[dict[str, float]]:
        from serve_app.eval import evaluate

        dev = self.data.dev
        if not dev:
            return None
        pairs, owners = [], []
        for record in dev:
            for d in dev_candidates(record, self.settings.mining.dev_candidates):
                pairs.append((record.text, self.data.docs[d]))
                owners.append((record.qid, d))
        scores = score_pairs(model, self.tokenizer, pairs, self.settings.loop.max_length)
        run: dict[str, dict[str, float]] = {}
        for (qid, d), s in zip(owners, scores):
            run.setdefault(qid, {})[d] = s
        return evaluate(run, {r.qid: r.judged for r in dev}, ["nDCG@10", "RR@10"])

    def export(self, model: Any, directory: Path) -> None:
        model.config.num_labels = 1
        model.save_pretrained(str(directory))
        self.tokenizer.model_max_length = self.settings.loop.max_length
        self.tokenizer.save_pretrained(str(directory))
        (directory / CONFIG_FILE).write_text(json.dumps({"job": "train-reranker", **self.settings.model_dump()}, indent=1))
