"""Cross-encoder fine-tuning: the model, the batches, the two losses and the dev evaluation.

The model is ``AutoModelForSequenceClassification`` with one output logit, loaded from any
encoder or cross-encoder checkpoint; a checkpoint without a matching 1-logit head (a plain
encoder such as all-MiniLM-L6-v2, or a 2-class classifier) gets a freshly initialised head.
An example is one query with one judged positive and ``negatives_per_query`` negatives:

* ``bce``: binary cross-entropy with logits on each of its pairs (label 1 for the positive);
* ``listwise``: softmax cross-entropy over its ``1 + n`` logits, the positive being the target.

Pairs are tokenised by the serving code's :class:`serve_app.rerank.pairs.PairTokenizer`
(only the document is cut to fit), and the dev evaluation scores through
:class:`~serve_app.rerank.cross_encoder.CrossEncoderScorer`, so the model is trained and
evaluated on exactly the inputs it is served. The exported directory is a plain
``save_pretrained`` checkpoint (``num_labels=1``) plus its tokenizer, whose
``model_max_length`` is set to the training ``max_length`` so that readers truncate as in
training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

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
    from serve_app.models import load_config, load_pretrained

    config = load_config(path, "base")
    mismatched_head = int(getattr(config, "num_labels", 2)) != 1 and any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if mismatched_head:
        logger.warning("%s is a %d-label classifier; its head is replaced by a new 1-logit head", path, config.num_labels)
    _, (model, info) = load_pretrained(path, "base", head="sequence_classification", num_labels=1, ignore_mismatched_sizes=mismatched_head, output_loading_info=True)
    new = set(info.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())}
    return model, new


class RerankerTask:
    """:class:`serve_app.training.engine.Task` of cross-encoder fine-tuning."""

    def __init__(self, settings: RerankerTrainingConfig, data: PreparedData, base_path: str) -> None:
        from serve_app.models import effective_max_length, load_config, load_tokenizer
        from serve_app.rerank.pairs import PairTokenizer

        self.settings = settings
        self.data = data
        self.base_path = base_path
        self.tokenizer = load_tokenizer(base_path, "base")
        length = effective_max_length(settings.loop.max_length, self.tokenizer, load_config(base_path, "base"), what="max_length")
        self.pairs = PairTokenizer(self.tokenizer, length)
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
        return {"features": self.pairs.batch([(q, d) for q, docs in examples for d in docs])}

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
        scores = self.scorer(model).score(pairs)
        run: dict[str, dict[str, float]] = {}
        for (qid, d), s in zip(owners, scores.tolist()):
            run.setdefault(qid, {})[d] = s
        return evaluate(run, {r.qid: r.judged for r in dev}, ["nDCG@10", "RR@10"])

    def scorer(self, model: Any) -> Any:
        """The serving scorer over the model being trained (as it is: device, dtype, mode)."""
        from serve_app.config import RerankerModelConfig
        from serve_app.rerank.cross_encoder import CrossEncoderScorer

        return CrossEncoderScorer.from_model(model, self.tokenizer, RerankerModelConfig(model=self.base_path, max_length=self.pairs.max_length))

    def export(self, model: Any, directory: Path) -> None:
        model.config.num_labels = 1
        model.save_pretrained(str(directory))
        self.tokenizer.model_max_length = self.settings.loop.max_length
        self.tokenizer.save_pretrained(str(directory))
        (directory / CONFIG_FILE).write_text(json.dumps({"job": "train-reranker", **self.settings.model_dump()}, indent=1))
