"""The same train function as a Ray Train job (TorchTrainer, 2 CPU workers, DDP over gloo).

Two workers with batches of 2 see, step by step, the same examples as one process with
batches of 4 (the DistributedSampler deals examples round-robin and DDP averages the
gradients), so both runs must end with the same weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serve_app.training.config import LoopConfig, MiningConfig, RerankerTrainingConfig
from training_fixtures import write_tiny_beir

pytestmark = pytest.mark.slow


def _settings(dataset: Path, base: Path, out: Path, batch_size: int) -> RerankerTrainingConfig:
    return RerankerTrainingConfig(
        # bce: every parameter but the attention key bias gets a real gradient (listwise softmax
        # is blind to the classifier bias too).
        dataset=str(dataset), base=str(base), out=str(out), negatives_per_query=3, loss="bce",
        mining=MiningConfig(dev_fraction=0.2, hard_negative_depth=10),
        loop=LoopConfig(epochs=2, batch_size=batch_size, lr=1e-3, max_length=64, show_progress=False, eval_every=5),
    )


def test_ray_train_with_two_workers_matches_a_local_run(tmp_path, tiny_cross_encoder_dir, monkeypatch):
    import ray
    import torch
    from safetensors.torch import load_file

    from serve_app.config import CrossEncoderConfig
    from serve_app.rerank.cross_encoder import CrossEncoderScorer
    from serve_app.training.jobs import RunOptions, train_reranker

    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "1")
    dataset = write_tiny_beir(tmp_path / "data")
    local = train_reranker(_settings(dataset, tiny_cross_encoder_dir, tmp_path / "local", batch_size=4), RunOptions())
    assert local.status == "completed"
    try:
        distributed = train_reranker(
            _settings(dataset, tiny_cross_encoder_dir, tmp_path / "ray", batch_size=2),
            RunOptions(ray_workers=2, cpus_per_worker=1, keep_work_dir=True),
        )
    finally:
        assert not ray.is_initialized()  # the job shut down the Ray instance it started
    assert distributed.status == "completed"
    assert (distributed.work_dir / "ray").is_dir()  # checkpoints went through ray.train.report

    a = load_file(str(tmp_path / "local" / "model.safetensors"))
    b = load_file(str(tmp_path / "ray" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        # The attention key bias cancels in the softmax: its gradient is rounding noise, which
        # Adam's normalisation turns into steps of full size, so it differs between any two runs.
        if not k.endswith("attention.self.key.bias"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    assert local.summary["best_step"] == distributed.summary["best_step"]
    pairs = [("moon", "planet moon orbit"), ("moon", "bread cheese"), ("football goal", "soccer league cup"), ("music", "ocean sea")]
    ours = CrossEncoderScorer(CrossEncoderConfig(model=str(tmp_path / "local"))).score(pairs)
    theirs = CrossEncoderScorer(CrossEncoderConfig(model=str(tmp_path / "ray"))).score(pairs)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)


def test_distillation_runs_as_a_ray_train_job(tmp_path, tiny_cross_encoder_dir, tiny_bi_encoder_dir, monkeypatch):
    import json

    import ray
    from sentence_transformers import SentenceTransformer

    from serve_app.training.config import DistillConfig
    from serve_app.training.jobs import RunOptions, distill

    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "1")
    dataset = write_tiny_beir(tmp_path / "data")
    settings = DistillConfig(
        dataset=str(dataset), teacher=str(tiny_cross_encoder_dir), student=str(tiny_bi_encoder_dir), out=str(tmp_path / "student"),
        triples_per_positive=2, teacher_max_length=64, mining=MiningConfig(dev_fraction=0.2, hard_negative_depth=10),
        loop=LoopConfig(epochs=2, batch_size=4, lr=1e-3, max_length=64, show_progress=False),
    )
    outcome = distill(settings, RunOptions(ray_workers=2))
    assert not ray.is_initialized()
    assert outcome.status == "completed"
    summary = json.loads((tmp_path / "student" / "training_summary.json").read_text())
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert len(losses) == summary["total_steps"] and np.isfinite(losses).all()
    vectors = SentenceTransformer(str(tmp_path / "student"), device="cpu").encode(["moon and stars", "football"])
    assert vectors.shape == (2, 32)
