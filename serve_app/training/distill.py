"""Margin-MSE distillation of a cross-encoder teacher into a bi-encoder student.

Triples (query, positive, negative) are built from the training queries (negatives: hard
ones from the retrievers plus random ones, as for the reranker) and scored once by the
teacher (any reranker family, :func:`serve_app.rerank.load_scorer`) before training. The student is
``transformers.AutoModel`` with mean pooling over the attention mask and L2 normalisation,
exactly what :class:`serve_app.retrieval.dense.BiEncoder` computes at serving time, and is
trained to reproduce the teacher's margins:

    loss = MSE( scale * (cos(q, p) - cos(q, n)),  teacher(q, p) - teacher(q, n) )

Scale: a cosine margin lies in [-2, 2] while the teacher's logit margins are often 5 to 20,
so the student's margin is multiplied by a fixed factor ``scale``. Training the unnormalised
dot product instead would make the student's training score differ from the cosine the
dense index ranks by, so the student keeps its serving-time geometry and only the factor
adapts the units. By default the factor is fitted once, before training, as the least-squares
slope between the untrained student's margins and the teacher's on up to 256 triples
(``sum(t*m) / sum(m*m)``, clipped to [1, 100]); ``student_scale`` fixes it instead. A fixed
factor does not change which documents the student ranks first; it only sets how far apart
the student must push scores to match the teacher, and the fitted one starts training with
margins on the teacher's scale.

The output directory holds the transformers checkpoint and tokenizer that ``DenseConfig(model=
OUT)`` loads, plus sentence-transformers' module files (``modules.json``, ``1_Pooling``,
``2_Normalize``, ``sentence_bert_config.json``), so ``SentenceTransformer(OUT)`` encodes the
same vectors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from serve_app.models import mean_pool, tokenize_texts
from serve_app.training.config import DistillConfig
from serve_app.training.data import PreparedData, epoch_order

logger = logging.getLogger(__name__)

CONFIG_FILE = "training_config.json"
SCALE_SAMPLE = 256
SCALE_BOUNDS = (1.0, 100.0)
FALLBACK_SCALE = 20.0

# A triple: (train record index, positive id, negative id, teacher margin).
Triple = tuple[int, str, str, float]


def embed(model: Any, features: dict[str, Any]) -> Any:
    """Sentence embeddings of a tokenised batch, with gradients (the serving pooling,
    :func:`serve_app.models.mean_pool`)."""
    return mean_pool(model(**features).last_hidden_state, features["attention_mask"])


def student_encoder(model: Any, tokenizer: Any, student: str, max_length: int) -> Any:
    """The serving bi-encoder over the student being trained (its device and mode left alone)."""
    from serve_app.config import DenseConfig
    from serve_app.retrieval.dense import BiEncoder

    return BiEncoder.from_model(model, tokenizer, DenseConfig(model=student, max_length=max_length))


def build_triples(data: PreparedData, triples_per_positive: int, random_negatives: int, seed: int) -> list[tuple[int, str, str]]:
    """(record index, positive, negative) triples: ``triples_per_positive`` negatives per judged positive."""
    from serve_app.training.data import sample_negatives

    out = []
    for r, record in enumerate(data.train):
        for j, pos in enumerate(record.positives):
            rng = np.random.default_rng([seed, 5, r, j])
            for neg in sample_negatives(record, triples_per_positive, random_negatives, rng):
                out.append((r, pos, neg))
    return out


def teacher_margins(data: PreparedData, triples: Sequence[tuple[int, str, str]], teacher: str, *, max_length: int, batch_tokens: int, device: Optional[str] = None) -> list[float]:
    """Teacher score of (q, positive) minus teacher score of (q, negative), per triple.

    Every distinct (query, document) pair is scored once, by any reranker family
    (``load_scorer``: a cross-encoder, a pooling cross-encoder or a decoder reranker), in
    bfloat16/float16 on a GPU and float32 on a CPU (the labels the student learns from).
    """
    from serve_app.config import RerankerModelConfig
    from serve_app.models import pick_device
    from serve_app.rerank import load_scorer

    dtype = "auto" if pick_device(device).startswith("cuda") else "float32"
    scorer = load_scorer(RerankerModelConfig(model=teacher, max_length=max_length, max_batch_tokens=batch_tokens, device=device, dtype=dtype))
    keys = sorted({(r, d) for r, p, n in triples for d in (p, n)})
    logger.info("teacher %s scores %d pairs", teacher, len(keys))
    scores = scorer.score([(data.train[r].text, data.docs[d]) for r, d in keys])
    by_key = {k: float(s) for k, s in zip(keys, scores.tolist())}
    return [by_key[(r, p)] - by_key[(r, n)] for r, p, n in triples]


def fit_scale(student_margins: np.ndarray, teacher: np.ndarray) -> float:
    """Least-squares slope ``sum(t*m)/sum(m*m)`` clipped to ``SCALE_BOUNDS`` (see the module docstring)."""
    m = np.asarray(student_margins, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    denom = float((m * m).sum())
    if denom < 1e-12:
        return FALLBACK_SCALE
    return float(np.clip((t * m).sum() / denom, *SCALE_BOUNDS))


def student_margins(model: Any, tokenizer: Any, data: PreparedData, triples: Sequence[tuple[int, str, str]], max_length: int) -> np.ndarray:
    """cos(q, p) - cos(q, n) of the student for each triple, encoded as serving encodes."""
    if not triples:
        return np.zeros(0, dtype=np.float32)
    encoder = student_encoder(model, tokenizer, str(getattr(model.config, "name_or_path", "") or "student"), max_length)
    q = encoder.encode([data.train[r].text for r, _, _ in triples])
    p = encoder.encode([data.docs[d] for _, d, _ in triples])
    n = encoder.encode([data.docs[d] for _, _, d in triples])
    return (q * p).sum(1) - (q * n).sum(1)


def write_sentence_transformers_files(directory: Path, dim: int, max_seq_length: int) -> None:
    """The module files with which ``SentenceTransformer(directory)`` rebuilds Transformer -> mean Pooling -> Normalize."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2))
    (directory / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None}, indent=2))
    pooling = directory / "1_Pooling"
    pooling.mkdir(exist_ok=True)
    (pooling / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))
    (directory / "2_Normalize").mkdir(exist_ok=True)


class DistillTask:
    """:class:`serve_app.training.engine.Task` of Margin-MSE distillation."""

    def __init__(self, settings: DistillConfig, data: PreparedData, triples: Sequence[Triple], scale: float, student_path: str) -> None:
        from serve_app.models import effective_max_length, load_config, load_tokenizer

        self.settings = settings
        self.data = data
        self.triples = [tuple(t) for t in triples]
        self.scale = float(scale)
        self.student_path = student_path
        self.tokenizer = load_tokenizer(student_path, "student")
        self.max_length = effective_max_length(settings.loop.max_length, self.tokenizer, load_config(student_path, "student"), what="max_length")

    def build_model(self) -> Any:
        from serve_app.models import load_pretrained

        _, model = load_pretrained(self.student_path, "student", head="encoder")
        for name, param in model.named_parameters():
            if name.startswith("pooler."):  # unused by mean pooling (and DDP rejects unused trainable parameters)
                param.requires_grad_(False)
        return model

    def num_examples(self) -> int:
        return len(self.triples)

    def train_examples(self, epoch: int) -> list[tuple[str, str, str, float]]:
        out = []
        for k in epoch_order(len(self.triples), self.settings.loop.seed, epoch).tolist():
            r, p, n, margin = self.triples[k]
            out.append((self.data.train[r].text, self.data.docs[p], self.data.docs[n], float(margin)))
        return out

    def collate(self, examples: list[tuple[str, str, str, float]]) -> dict[str, Any]:
        import torch

        def tok(texts: list[str]) -> dict[str, Any]:
            return dict(tokenize_texts(self.tokenizer, texts, self.max_length))

        return {
            "q": tok([e[0] for e in examples]),
            "p": tok([e[1] for e in examples]),
            "n": tok([e[2] for e in examples]),
            "margin": torch.tensor([e[3] for e in examples], dtype=torch.float32),
        }

    def margins(self, model: Any, batch: dict[str, Any]) -> Any:
        """Scaled student margins of a batch."""
        q, p, n = embed(model, batch["q"]), embed(model, batch["p"]), embed(model, batch["n"])
        return self.scale * ((q * p).sum(-1) - (q * n).sum(-1))

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        return F.mse_loss(self.margins(model, batch), batch["margin"].float())

    def evaluate(self, model: Any) -> Optional[dict[str, float]]:
        from serve_app.eval import evaluate
        from serve_app.training.reranker import dev_candidates

        dev = self.data.dev
        if not dev:
            return None
        limit = self.settings.mining.dev_candidates
        doc_ids = sorted({d for r in dev for d in dev_candidates(r, limit)})
        encoder = student_encoder(model, self.tokenizer, self.student_path, self.max_length)
        docs = encoder.encode([self.data.docs[d] for d in doc_ids])
        queries = encoder.encode([r.text for r in dev])
        row = {d: i for i, d in enumerate(doc_ids)}
        run = {}
        for qi, r in enumerate(dev):
            cands = dev_candidates(r, limit)
            sims = docs[[row[d] for d in cands]] @ queries[qi]
            run[r.qid] = {d: float(s) for d, s in zip(cands, sims)}
        return evaluate(run, {r.qid: r.judged for r in dev}, ["nDCG@10", "RR@10"])

    def export(self, model: Any, directory: Path) -> None:
        model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        write_sentence_transformers_files(directory, int(model.config.hidden_size), self.settings.loop.max_length)
        (directory / CONFIG_FILE).write_text(json.dumps({"job": "distill", **self.settings.model_dump(), "student_scale": self.scale}, indent=1))
