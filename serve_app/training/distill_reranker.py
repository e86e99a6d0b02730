"""Cross-encoder to small cross-encoder distillation: the cheap first stage of a rerank cascade.

``serve-app distill-reranker --teacher CE --out DIR`` trains a student cross-encoder to
order the funnel's candidates as the teacher does:

* the candidates are the project's own: for each training query, its judged positives and
  the top documents of the retrievers (``mining``: BM25, dense or both, from ``--index`` or a
  fresh build), topped up with random documents to ``candidates_per_query``;
* the teacher (any reranker family, through :func:`serve_app.rerank.load_scorer`, float32 on
  a CPU) scores every pair once; those scores are the labels, no relevance judgment is used;
* the student starts from the teacher's lower ``student_layers`` transformer layers (its
  embeddings, first layers and head are copied, the upper layers dropped), or from another
  checkpoint (``--student``, e.g. a 2-layer encoder, which then gets a new head);
* the loss is ``listwise_kl`` (KL divergence between the softmax of the teacher's and the
  student's scores over a query's candidates, at ``temperature``) or ``margin_mse`` (mean
  squared error between the student's and the teacher's score differences of every candidate
  to the query's best-scored one, Hofstätter et al. 2020).

The dev evaluation ranks each dev query's positives among its hard negatives by nDCG@10
(the same as ``train-reranker``), and the output is a normal cross-encoder directory that
``reranker.model``, a cascade stage or ``serve-app eval --reranker`` loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from serve_app.training.config import DistillRerankerConfig
from serve_app.training.data import PreparedData, epoch_order
from serve_app.training.reranker import CONFIG_FILE, RerankerTask, load_sequence_classifier

logger = logging.getLogger(__name__)

#: One training list: (index of its query in ``data.train``, document ids, teacher scores).
ScoredList = tuple[int, list[str], list[float]]


def candidate_lists(data: PreparedData, per_query: int, seed: int) -> list[tuple[int, list[str]]]:
    """Each training query's candidates: positives, then its retrieved (hard) documents, then
    random ones, ``per_query`` distinct documents (fewer only when the pools run out)."""
    rng = np.random.default_rng([seed, 14])
    out = []
    for r, record in enumerate(data.train):
        docs: list[str] = []
        for d in [*record.positives, *record.hard, *rng.permutation(record.random).tolist()]:
            if d not in docs:
                docs.append(d)
            if len(docs) == per_query:
                break
        if len(docs) >= 2:
            out.append((r, docs))
    return out


def teacher_scores(data: PreparedData, lists: Sequence[tuple[int, list[str]]], teacher: str, *, max_length: int, batch_tokens: int, device: str | None = None) -> list[ScoredList]:
    """The teacher's score of every candidate (every pair scored once, in one scorer call)."""
    from serve_app.config import RerankerModelConfig
    from serve_app.models import pick_device
    from serve_app.rerank import load_scorer

    dtype = "auto" if pick_device(device).startswith("cuda") else "float32"
    scorer = load_scorer(RerankerModelConfig(model=teacher, max_length=max_length, max_batch_tokens=batch_tokens, device=device, dtype=dtype))
    pairs = [(data.train[r].text, data.docs[d]) for r, docs in lists for d in docs]
    logger.info("teacher %s scores %d pairs of %d queries", teacher, len(pairs), len(lists))
    scores = scorer.score(pairs).tolist()
    out, i = [], 0
    for r, docs in lists:
        out.append((r, list(docs), [float(s) for s in scores[i : i + len(docs)]]))
        i += len(docs)
    return out


def truncate_layers(model: Any, layers: int) -> Any:
    """Keep the first ``layers`` transformer layers of ``model`` (a ``*ForSequenceClassification``)."""
    import torch

    base = model.base_model
    holder = next((m for m in (getattr(base, "encoder", None), base) if m is not None and isinstance(getattr(m, "layer", getattr(m, "layers", None)), torch.nn.ModuleList)), None)
    if holder is None:
        raise ValueError(f"cannot find the transformer layers of {type(model).__name__}; pass --student with a small checkpoint instead")
    attr = "layer" if isinstance(getattr(holder, "layer", None), torch.nn.ModuleList) else "layers"
    stack = getattr(holder, attr)
    if layers > len(stack):
        raise ValueError(f"student_layers={layers} but the teacher has only {len(stack)} layers")
    setattr(holder, attr, torch.nn.ModuleList(list(stack)[:layers]))
    model.config.num_hidden_layers = layers
    return model


def listwise_kl(student: Any, teacher: Any, temperature: float) -> Any:
    """KL(teacher || student) of the softmax over each row, times temperature² (rows: queries)."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher / temperature, dim=-1)
    s = F.log_softmax(student / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def margin_mse(student: Any, teacher: Any) -> Any:
    """MSE between student and teacher margins of every candidate to the teacher's best one."""
    import torch

    best = teacher.argmax(dim=-1, keepdim=True)
    tm = teacher.gather(-1, best) - teacher
    sm = student.gather(-1, best) - student
    return torch.mean((sm - tm) ** 2)


class DistillRerankerTask(RerankerTask):
    """:class:`serve_app.training.engine.Task` of cross-encoder distillation (see the module docstring)."""

    def __init__(self, settings: DistillRerankerConfig, data: PreparedData, lists: Sequence[ScoredList], student_path: str, from_teacher: bool) -> None:
        from serve_app.models import effective_max_length, load_config, load_tokenizer
        from serve_app.rerank.pairs import PairTokenizer

        self.settings = settings  # type: ignore[assignment]
        self.data = data
        self.base_path = student_path
        self.from_teacher = from_teacher
        self.tokenizer = load_tokenizer(student_path, "student")
        length = effective_max_length(settings.loop.max_length, self.tokenizer, load_config(student_path, "student"), what="max_length")
        self.pairs = PairTokenizer(self.tokenizer, length)
        size = settings.candidates_per_query
        self.lists = [(r, docs, scores) for r, docs, scores in lists if len(docs) == size]
        if len(self.lists) < len(lists):
            logger.info("%d of %d queries have fewer than %d candidates and are left out", len(lists) - len(self.lists), len(lists), size)
        if not self.lists:
            raise ValueError(f"no training query has {size} candidates; lower --candidates-per-query")
        self.group_size = size
        self.new_parameters: set[str] = set()

    def build_model(self) -> Any:
        model, self.new_parameters = load_sequence_classifier(self.base_path)
        if self.from_teacher:
            model = truncate_layers(model, self.settings.student_layers)
        return model

    def lr_scale(self, name: str) -> float:
        return self.settings.head_lr_scale if name in self.new_parameters else 1.0

    def num_examples(self) -> int:
        return len(self.lists)

    def train_examples(self, epoch: int) -> list[tuple[str, list[str], list[float]]]:
        order = epoch_order(len(self.lists), self.settings.loop.seed, epoch).tolist()
        out = []
        for k in order:
            r, docs, scores = self.lists[k]
            out.append((self.data.train[r].text, [self.data.docs[d] for d in docs], scores))
        return out

    def collate(self, examples: list[tuple[str, list[str], list[float]]]) -> dict[str, Any]:
        import torch

        return {
            "features": self.pairs.batch([(q, d) for q, docs, _ in examples for d in docs]),
            "teacher": torch.tensor([s for _, _, s in examples], dtype=torch.float32),
        }

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        logits = model(**batch["features"]).logits.float().view(-1, self.group_size)
        teacher = batch["teacher"].to(logits.device)
        if self.settings.loss == "margin_mse":
            return margin_mse(logits, teacher)
        return listwise_kl(logits, teacher, self.settings.temperature)

    def export(self, model: Any, directory: Path) -> None:
        model.config.num_labels = 1
        model.save_pretrained(str(directory))
        self.tokenizer.model_max_length = self.settings.loop.max_length
        self.tokenizer.save_pretrained(str(directory))
        (directory / CONFIG_FILE).write_text(json.dumps({"job": "distill-reranker", **self.settings.model_dump()}, indent=1))

