"""Margin-MSE distillation: triples, the fitted scale, margins moving toward the teacher's, the saved student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serve_app.training.config import DistillConfig, LoopConfig, MiningConfig
from training_fixtures import write_tiny_beir


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory) -> Path:
    return write_tiny_beir(tmp_path_factory.mktemp("tiny-beir"))


def _settings(dataset: Path, teacher: Path, student: Path, out: Path, *, dev_fraction: float = 0.2, student_scale: float | None = None, **loop) -> DistillConfig:
    loop_cfg = {"epochs": 4, "batch_size": 8, "lr": 1e-3, "max_length": 64, "show_progress": False, **loop}
    return DistillConfig(
        dataset=str(dataset), teacher=str(teacher), student=str(student), out=str(out), triples_per_positive=3, student_scale=student_scale,
        teacher_max_length=64, mining=MiningConfig(dev_fraction=dev_fraction, hard_negative_depth=10), loop=LoopConfig(**loop_cfg),
    )


def test_fit_scale_is_the_clipped_least_squares_slope():
    from serve_app.training.distill import FALLBACK_SCALE, fit_scale

    m = np.array([0.1, -0.2, 0.3])
    assert fit_scale(m, 7.0 * m) == pytest.approx(7.0)
    assert fit_scale(m, -5.0 * m) == 1.0  # clipped below
    assert fit_scale(m, 500.0 * m) == 100.0  # clipped above
    assert fit_scale(np.zeros(3), m) == FALLBACK_SCALE


def test_config_needs_negatives():
    with pytest.raises(ValueError, match="negatives"):
        DistillConfig(dataset="d", teacher="t", out="o", mining=MiningConfig(hard_negatives_from="none", random_negatives=0))


def test_triples_never_pair_a_positive_as_negative(tiny_beir):
    from serve_app.corpus import load_beir
    from serve_app.training.data import prepare_queries
    from serve_app.training.distill import build_triples

    ds = load_beir(tiny_beir, "train")
    data = prepare_queries(ds, dev_fraction=0.2, seed=0, max_queries=None, hard_negatives_from="bm25", hard_negative_depth=10, random_pool_size=8)
    triples = build_triples(data, 3, 1, seed=0)
    assert len(triples) == 3 * sum(len(r.positives) for r in data.train)
    for r, p, n in triples:
        assert p in data.train[r].positives and n not in data.train[r].positives
    assert build_triples(data, 3, 1, seed=0) == triples


@pytest.mark.slow
def test_student_margins_move_toward_the_teacher(tiny_beir, tiny_cross_encoder_dir, tiny_bi_encoder_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from serve_app.training.data import PreparedData
    from serve_app.training.distill import student_margins
    from serve_app.training.jobs import RunOptions, distill

    out = tmp_path / "student"
    # No dev split: the exported weights are the last ones, whose margins the loss has fitted.
    outcome = distill(_settings(tiny_beir, tiny_cross_encoder_dir, tiny_bi_encoder_dir, out, dev_fraction=0.0, epochs=5), RunOptions(keep_work_dir=True))
    assert outcome.status == "completed"
    prepared = json.loads((outcome.work_dir / "prepared.json").read_text())
    data = PreparedData.from_json(prepared["data"])
    triples = [(r, p, n) for r, p, n, _ in prepared["triples"]]
    teacher = np.asarray([t for *_, t in prepared["triples"]])
    scale = prepared["scale"]
    assert json.loads((out / "training_config.json").read_text())["student_scale"] == scale

    def mse(model_dir: Path) -> float:
        model = AutoModel.from_pretrained(model_dir).eval()
        m = student_margins(model, AutoTokenizer.from_pretrained(model_dir), data, triples, 64)
        return float(np.mean((scale * m - teacher) ** 2))

    before, after = mse(tiny_bi_encoder_dir), mse(out)
    assert after < 0.5 * before, (before, after)
    losses = [h["loss"] for h in json.loads((out / "training_summary.json").read_text())["history"] if "loss" in h]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


@pytest.mark.slow
def test_student_loads_in_bi_encoder_and_sentence_transformers(tiny_beir, tiny_cross_encoder_dir, tiny_bi_encoder_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    from serve_app.config import DenseConfig
    from serve_app.retrieval.dense import BiEncoder
    from serve_app.training.jobs import RunOptions, distill

    out = tmp_path / "student"
    distill(_settings(tiny_beir, tiny_cross_encoder_dir, tiny_bi_encoder_dir, out, epochs=1), RunOptions())
    texts = ["football goal league", "the moon and the stars", "protein gene cancer study of patients"]
    ours = BiEncoder(DenseConfig(model=str(out), max_length=64)).encode(texts)
    st = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]
    theirs = st.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    base = BiEncoder(DenseConfig(model=str(tiny_bi_encoder_dir), max_length=64)).encode(texts)
    assert not np.allclose(base, ours, atol=1e-4)  # the weights did change


@pytest.mark.slow
def test_distill_cli_with_fixed_scale(tiny_beir, tiny_cross_encoder_dir, tiny_bi_encoder_dir, tmp_path, capsys):
    from serve_app.cli import main

    out = tmp_path / "cli-student"
    code = main([
        "distill", "--teacher", str(tiny_cross_encoder_dir), "--student", str(tiny_bi_encoder_dir), "--dataset", str(tiny_beir),
        "--out", str(out), "--student-scale", "12.5", "--epochs", "1", "--max-length", "64", "--teacher-max-length", "64",
        "--triples-per-positive", "2", "--no-progress",
    ])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["status"] == "completed"
    assert json.loads((out / "training_config.json").read_text())["student_scale"] == 12.5
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()


@pytest.mark.slow
def test_a_decoder_reranker_can_be_the_teacher(tmp_path):
    """teacher_margins scores with any reranker family: a decoder teacher's margins are its own
    score differences (logit(yes) - logit(no)), as load_scorer computes them."""
    from serve_app.config import CrossEncoderConfig
    from serve_app.rerank import load_scorer
    from serve_app.testing import build_tiny_decoder_reranker
    from serve_app.training.data import PreparedData, QueryRecord
    from serve_app.training.distill import teacher_margins

    teacher = str(build_tiny_decoder_reranker(tmp_path / "dec", seed=4))
    data = PreparedData(train=[QueryRecord("q1", "what powers the sun", ["d1"]), QueryRecord("q2", "football match", ["d2"])], dev=[], docs={"d1": "the sun fuses hydrogen", "d2": "the team won the cup", "d3": "ocean water"})
    triples = [(0, "d1", "d3"), (1, "d2", "d3"), (1, "d2", "d1")]
    margins = teacher_margins(data, triples, teacher, max_length=256, batch_tokens=4096, device="cpu")
    scorer = load_scorer(CrossEncoderConfig(model=teacher, max_length=256, device="cpu", dtype="float32"))
    assert scorer.kind == "causal_lm"
    for (r, p, n), m in zip(triples, margins):
        q = data.train[r].text
        want = scorer.score([(q, data.docs[p]), (q, data.docs[n])])
        assert m == pytest.approx(float(want[0] - want[1]), abs=1e-5)
    assert len({round(m, 6) for m in margins}) == 3
