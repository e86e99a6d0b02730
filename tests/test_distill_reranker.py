"""serve-app distill-reranker: candidates, teacher scores, the two losses, the truncated student, the saved model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serve_app.training.config import DistillRerankerConfig, LoopConfig, MiningConfig
from training_fixtures import write_tiny_beir


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory) -> Path:
    return write_tiny_beir(tmp_path_factory.mktemp("tiny-beir"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from serve_app.testing import build_tiny_cross_encoder

    return build_tiny_cross_encoder(tmp_path_factory.mktemp("teacher"), seed=5, num_hidden_layers=3)


def _settings(dataset: Path, teacher: Path, out: Path, **top) -> DistillRerankerConfig:
    loop = {"epochs": 6, "batch_size": 4, "lr": 2e-3, "max_length": 64, "show_progress": False, **top.pop("loop", {})}
    return DistillRerankerConfig(
        dataset=str(dataset), teacher=str(teacher), out=str(out), student_layers=1, candidates_per_query=6, teacher_max_length=64,
        mining=MiningConfig(dev_fraction=0.2, hard_negative_depth=10), loop=LoopConfig(**loop), **top,
    )


def test_the_losses_are_zero_when_the_student_agrees():
    import torch

    from serve_app.training.distill_reranker import listwise_kl, margin_mse

    t = torch.tensor([[3.0, 1.0, -2.0], [0.5, 0.0, 4.0]])
    assert listwise_kl(t.clone(), t, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert listwise_kl(t + 7.0, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)  # softmax ignores a shift
    assert margin_mse(t - 1.0, t).item() == pytest.approx(0.0, abs=1e-6)  # margins ignore a shift
    assert listwise_kl(-t, t, 1.0).item() > 0.1 and margin_mse(-t, t).item() > 1.0


def test_candidates_are_positives_then_retrieved_then_random(tiny_beir):
    from serve_app.corpus import load_beir
    from serve_app.training.data import prepare_queries
    from serve_app.training.distill_reranker import candidate_lists

    data = prepare_queries(load_beir(tiny_beir, "train"), dev_fraction=0.2, seed=0, max_queries=None, hard_negatives_from="bm25", hard_negative_depth=10, random_pool_size=8)
    lists = candidate_lists(data, 6, seed=0)
    assert len(lists) == len(data.train)
    for r, docs in lists:
        rec = data.train[r]
        assert len(docs) == len(set(docs)) == 6
        assert docs[: len(rec.positives)] == rec.positives
        hard = [d for d in rec.hard if d not in rec.positives]
        assert docs[len(rec.positives) : len(rec.positives) + len(hard[: 6 - len(rec.positives)])] == hard[: 6 - len(rec.positives)]


def test_truncate_layers_keeps_the_lower_layers(teacher_dir):
    import torch
    from transformers import AutoModelForSequenceClassification

    from serve_app.training.distill_reranker import truncate_layers

    full = AutoModelForSequenceClassification.from_pretrained(str(teacher_dir))
    small = truncate_layers(AutoModelForSequenceClassification.from_pretrained(str(teacher_dir)), 1)
    assert len(small.bert.encoder.layer) == 1 and small.config.num_hidden_layers == 1
    for a, b in zip(small.bert.encoder.layer[0].parameters(), full.bert.encoder.layer[0].parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="only 3 layers"):
        truncate_layers(full, 4)


def _agreement(scorer_a, scorer_b, pairs) -> float:
    from serve_app.rerank.drift import kendall_tau

    a, b = scorer_a.score(pairs), scorer_b.score(pairs)
    return float(np.mean([kendall_tau(a[i : i + 6], b[i : i + 6]) for i in range(0, len(pairs), 6)]))


@pytest.mark.slow
def test_distill_reranker_trains_a_smaller_cross_encoder_that_follows_the_teacher(tiny_beir, teacher_dir, tmp_path):
    from serve_app.config import CrossEncoderConfig
    from serve_app.corpus import load_beir
    from serve_app.rerank import load_scorer
    from serve_app.training.distill_reranker import truncate_layers
    from serve_app.training.jobs import distill_reranker

    out = tmp_path / "student"
    outcome = distill_reranker(_settings(tiny_beir, teacher_dir, out))
    assert outcome.status in ("completed", "early_stopped")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and len(cfg.get("id2label", {0: "LABEL_0"})) == 1
    assert json.loads((out / "training_config.json").read_text())["job"] == "distill-reranker"

    # the saved student is a normal cross-encoder directory
    student = load_scorer(CrossEncoderConfig(model=str(out), device="cpu", max_length=64, dtype="float32"))
    teacher = load_scorer(CrossEncoderConfig(model=str(teacher_dir), device="cpu", max_length=64, dtype="float32"))
    assert student.kind == "sequence_classification"

    # it ranks held-out queries' candidates more like the teacher than the untrained truncated student
    from transformers import AutoModelForSequenceClassification

    from serve_app.rerank.cross_encoder import CrossEncoderScorer

    ds = load_beir(tiny_beir, "train")
    texts = {d.id: d.content for d in ds.corpus}
    ids = sorted(texts)
    rng = np.random.default_rng(3)
    pairs = [(q, texts[d]) for q in list(ds.queries.values())[:8] for d in rng.choice(ids, 6, replace=False)]
    base = truncate_layers(AutoModelForSequenceClassification.from_pretrained(str(teacher_dir)), 1).eval()
    untrained = CrossEncoderScorer.from_model(base, teacher.tokenizer, CrossEncoderConfig(model=str(teacher_dir), max_length=64))
    before, after = _agreement(untrained, teacher, pairs), _agreement(student, teacher, pairs)
    print("agreement before", before, "after", after)
    assert after > before + 0.1, (before, after)


def test_the_command_is_registered_with_its_settings():
    import argparse

    from serve_app.training import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["distill-reranker", "--dataset", "d", "--teacher", "t", "--out", "o", "--student-layers", "3", "--loss", "margin_mse", "--candidates-per-query", "20"])
    settings = commands._settings(DistillRerankerConfig, args)
    assert (settings.student_layers, settings.loss, settings.candidates_per_query, settings.student) == (3, "margin_mse", 20, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["distill-reranker", "--dataset", "d", "--teacher", "t", "--out", "o", "--loss", "mse"])
