"""Cross-encoder fine-tuning: data preparation, the loop, checkpoints/resume, the exported model, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serve_app.training.config import LoopConfig, MiningConfig, RerankerTrainingConfig
from serve_app.training.data import (
    QueryRecord,
    TrainingDataError,
    hard_negative_pool,
    merge_rankings,
    prepare_queries,
    sample_negatives,
    split_queries,
)
from training_fixtures import write_tiny_beir


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory) -> Path:
    return write_tiny_beir(tmp_path_factory.mktemp("tiny-beir"))


def _settings(dataset: Path, base: Path, out: Path, *, loss: str = "listwise", mining: dict | None = None, **loop) -> RerankerTrainingConfig:
    loop_cfg = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "max_length": 64, "show_progress": False, **loop}
    mining_cfg = {"dev_fraction": 0.2, "hard_negative_depth": 10, **(mining or {})}
    return RerankerTrainingConfig(dataset=str(dataset), base=str(base), out=str(out), loss=loss, negatives_per_query=3, mining=MiningConfig(**mining_cfg), loop=LoopConfig(**loop_cfg))


def _history(out: Path) -> list[dict]:
    return json.loads((out / "training_summary.json").read_text())["history"]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# --------------------------------------------------------------------------- data


def test_split_queries_is_seeded_and_disjoint():
    ids = [f"q{i}" for i in range(50)]
    train, dev = split_queries(ids, 0.2, seed=3)
    assert len(dev) == 10 and len(train) == 40
    assert not set(train) & set(dev) and set(train) | set(dev) == set(ids)
    assert split_queries(list(reversed(ids)), 0.2, seed=3) == (train, dev)  # input order does not matter
    assert split_queries(ids, 0.2, seed=4) != (train, dev)
    sub_train, sub_dev = split_queries(ids, 0.1, seed=3, max_queries=20)
    assert len(sub_train) + len(sub_dev) == 20 and len(sub_dev) == 2
    assert split_queries(ids, 0.0, seed=3)[1] == []
    with pytest.raises(TrainingDataError, match="too few"):
        split_queries(["only"], 0.5, seed=0)


def test_merge_rankings_interleaves_without_duplicates():
    assert merge_rankings([["a", "b", "c"], ["b", "d"]]) == ["a", "b", "d", "c"]


def test_hard_negative_pool_drops_positives_then_skips():
    assert hard_negative_pool(["p", "a", "z", "b"], {"p": 1, "z": 2, "a": 0}, skip=1) == ["b"]


def test_prepared_negatives_exclude_positives_and_follow_bm25(tiny_beir):
    from serve_app.config import BM25Config, ChunkingConfig
    from serve_app.corpus import load_beir
    from serve_app.retrieval.bm25 import BM25Retriever

    ds = load_beir(tiny_beir, "train")
    data = prepare_queries(ds, dev_fraction=0.25, seed=0, max_queries=None, hard_negatives_from="bm25", hard_negative_depth=8, random_pool_size=6)
    assert data.train and data.dev
    bm25 = BM25Retriever.build(ds.corpus, BM25Config(), ChunkingConfig())
    for record in data.train + data.dev:
        positives = {d for d, rel in ds.qrels[record.qid].items() if rel > 0}
        assert set(record.positives) == positives
        assert not positives & set(record.hard)
        assert not positives & set(record.random)
        assert not set(record.hard) & set(record.random)
        expected = [h.doc_id for h in bm25.search(record.text, 8) if h.doc_id not in positives]
        assert record.hard == expected
        assert len(record.random) == 6
        for epoch in range(3):
            negs = sample_negatives(record, 5, 2, np.random.default_rng(epoch))
            assert len(negs) == 5 and not positives & set(negs)
        for d in record.positives + record.hard + record.random:
            assert data.docs[d] == ds.corpus.get(d).content


@pytest.mark.slow
def test_mining_from_a_saved_index_matches_building_the_retrievers(tiny_beir, tiny_bi_encoder_dir, tmp_path):
    from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
    from serve_app.corpus import load_beir
    from serve_app.index import build_index
    from serve_app.training.data import mine_rankings

    ds = load_beir(tiny_beir, "train")
    dense = DenseConfig(model=str(tiny_bi_encoder_dir), max_length=64, use_gpu_index=False)
    build_index(ds.corpus, tmp_path / "index", bm25=BM25Config(), dense=dense, chunking=ChunkingConfig(), show_progress=False)
    queries = list(ds.queries.values())[:6]
    built = mine_rankings(ds.corpus, queries, "both", 7, dense_model=str(tiny_bi_encoder_dir), dense_max_length=64)
    loaded = mine_rankings(ds.corpus, queries, "both", 7, index=str(tmp_path / "index"))
    assert loaded == built and all(len(r) >= 7 for r in built)
    build_index(ds.corpus, tmp_path / "bm25-only", bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), show_progress=False)
    with pytest.raises(TrainingDataError, match="no dense retriever"):
        mine_rankings(ds.corpus, queries, "dense", 5, index=str(tmp_path / "bm25-only"))


def test_sample_negatives_mixes_and_tops_up():
    rec = QueryRecord("q", "text", ["p"], hard=["h1", "h2", "h3"], random=["r1", "r2"])
    negs = sample_negatives(rec, 4, 1, np.random.default_rng(0))
    assert sum(n.startswith("r") for n in negs) == 1 and sum(n.startswith("h") for n in negs) == 3
    negs = sample_negatives(rec, 4, 0, np.random.default_rng(0))  # 3 hard + 1 random to top up
    assert set(negs) >= {"h1", "h2", "h3"} and len(negs) == 4
    negs = sample_negatives(rec, 9, 1, np.random.default_rng(0))  # more than the pools hold: repeats
    assert len(negs) == 9 and set(negs) <= {"h1", "h2", "h3", "r1", "r2"}
    with pytest.raises(TrainingDataError, match="no negative"):
        sample_negatives(QueryRecord("q", "t", ["p"]), 2, 1, np.random.default_rng(0))


# --------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["listwise", "bce"])
def test_training_lowers_the_loss(tiny_beir, tiny_cross_encoder_dir, tmp_path, loss):
    from serve_app.training.jobs import RunOptions, train_reranker

    out = tmp_path / "model"
    outcome = train_reranker(_settings(tiny_beir, tiny_cross_encoder_dir, out, loss=loss, epochs=6), RunOptions())
    assert outcome.status == "completed"
    losses = [h["loss"] for h in _history(out) if "loss" in h]
    per_epoch = len(losses) // 6
    first, last = np.mean(losses[:per_epoch]), np.mean(losses[-per_epoch:])
    assert last < 0.8 * first, (first, last)
    assert not outcome.work_dir.exists()  # removed after a finished run


@pytest.mark.slow
def test_resume_reaches_the_same_weights(tiny_beir, tiny_cross_encoder_dir, tmp_path):
    import torch

    from serve_app.training.jobs import RunOptions, train_reranker

    kw = dict(epochs=3, eval_every=4, checkpoint_every=1)
    full = train_reranker(_settings(tiny_beir, tiny_cross_encoder_dir, tmp_path / "full", **kw), RunOptions())
    assert full.status == "completed"

    out = tmp_path / "resumed"
    first = train_reranker(_settings(tiny_beir, tiny_cross_encoder_dir, out, stop_after_steps=5, **kw), RunOptions())
    assert first.status == "interrupted" and not out.exists()
    assert (first.work_dir / "checkpoints" / "step-00000005" / "optimizer.pt").is_file()
    # A run started again without --resume refuses to clobber the checkpoints.
    from serve_app.training.jobs import TrainingSetupError

    with pytest.raises(TrainingSetupError, match="--resume"):
        train_reranker(_settings(tiny_beir, tiny_cross_encoder_dir, out, **kw), RunOptions())
    second = train_reranker(_settings(tiny_beir, tiny_cross_encoder_dir, out, **kw), RunOptions(resume=True))
    assert second.status == "completed"

    a, b = _weights(tmp_path / "full"), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [h.get("loss") for h in _history(tmp_path / "full")] == pytest.approx([h.get("loss") for h in _history(out)], abs=1e-6)
    assert full.summary["best_step"] == second.summary["best_step"]


@pytest.mark.slow
def test_resume_refuses_changed_settings(tiny_beir, tiny_cross_encoder_dir, tmp_path):
    from serve_app.training.jobs import RunOptions, TrainingSetupError, train_reranker

    out = tmp_path / "m"
    assert train_reranker(_settings(tiny_beir, tiny_cross_encoder_dir, out, stop_after_steps=2), RunOptions()).status == "interrupted"
    with pytest.raises(TrainingSetupError, match="other settings"):
        train_reranker(_settings(tiny_beir, tiny_cross_encoder_dir, out, lr=5e-4), RunOptions(resume=True))


@pytest.mark.slow
def test_output_loads_in_scorer_and_sentence_transformers(tiny_beir, tiny_cross_encoder_dir, tmp_path):
    import torch
    from sentence_transformers import CrossEncoder

    from serve_app.config import CrossEncoderConfig
    from serve_app.rerank.cross_encoder import CrossEncoderScorer
    from serve_app.training.jobs import RunOptions, train_reranker

    out = tmp_path / "model"
    train_reranker(_settings(tiny_beir, tiny_cross_encoder_dir, out, epochs=1), RunOptions())
    config = json.loads((out / "config.json").read_text())
    assert config["num_labels"] == 1 if "num_labels" in config else len(config["id2label"]) == 1
    pairs = [("football goal", "soccer team player goal league"), ("music", "song album band"), ("cancer gene", "ocean sea river"), ("moon", "planet orbit moon rocket")]
    ours = CrossEncoderScorer(CrossEncoderConfig(model=str(out))).score(pairs)
    theirs = CrossEncoder(str(out), device="cpu").predict(pairs, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(ours, np.asarray(theirs, dtype=np.float32), atol=1e-4)
    probs = CrossEncoderScorer(CrossEncoderConfig(model=str(out), activation="sigmoid")).score(pairs)
    np.testing.assert_allclose(probs, CrossEncoder(str(out), device="cpu").predict(pairs), atol=1e-4)  # default: sigmoid
    assert np.ptp(ours) > 1e-3  # a trained model tells the pairs apart
    before = CrossEncoderScorer(CrossEncoderConfig(model=str(tiny_cross_encoder_dir))).score(pairs)
    assert not np.allclose(before, ours)


@pytest.mark.slow
def test_plain_encoder_gets_a_new_one_logit_head(tiny_beir, tiny_bi_encoder_dir, tmp_path):
    from transformers import AutoConfig

    from serve_app.config import CrossEncoderConfig
    from serve_app.rerank.cross_encoder import CrossEncoderScorer
    from serve_app.training.jobs import RunOptions, train_reranker

    out = tmp_path / "model"
    train_reranker(_settings(tiny_beir, tiny_bi_encoder_dir, out, epochs=1, loss="bce", mining={"dev_fraction": 0.0}), RunOptions())
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.num_labels == 1 and cfg.architectures == ["BertForSequenceClassification"]
    scores = CrossEncoderScorer(CrossEncoderConfig(model=str(out))).score([("moon", "planet moon"), ("moon", "bread cheese")])
    assert scores.shape == (2,) and np.isfinite(scores).all()


def test_two_label_checkpoint_gets_a_new_one_logit_head(tiny_cross_encoder_2label_dir):
    from serve_app.training.reranker import load_sequence_classifier

    model, new = load_sequence_classifier(str(tiny_cross_encoder_2label_dir))
    assert model.config.num_labels == 1 and model.classifier.out_features == 1
    assert new == {"classifier.weight", "classifier.bias"}


def test_new_head_parameters_get_the_head_learning_rate(tiny_beir, tiny_bi_encoder_dir, tiny_cross_encoder_dir):
    from serve_app.training.data import PreparedData
    from serve_app.training.engine import _param_groups
    from serve_app.training.reranker import RerankerTask

    data = PreparedData(train=[], dev=[], docs={})
    settings = _settings(tiny_beir, tiny_bi_encoder_dir, Path("unused")).model_copy(update={"head_lr_scale": 10.0})
    task = RerankerTask(settings, data, str(tiny_bi_encoder_dir))
    model = task.build_model()
    # the tiny encoder was saved without BERT's pooler: it is new as well
    assert task.new_parameters == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    groups = _param_groups(model, 1e-3, 0.01, task.lr_scale)
    head = {id(p) for n, p in model.named_parameters() if n in task.new_parameters}
    for g in groups:
        expected = 1e-2 if {id(p) for p in g["params"]} <= head else 1e-3
        assert g["lr"] == pytest.approx(expected)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # a checkpoint that already has a 1-logit head has no new parameters
    task = RerankerTask(settings, data, str(tiny_cross_encoder_dir))
    task.build_model()
    assert task.new_parameters == set() and task.lr_scale("classifier.weight") == 1.0


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_trains_and_reports(tiny_beir, tiny_cross_encoder_dir, tmp_path, capsys):
    from serve_app.cli import main

    out = tmp_path / "cli-model"
    argv = [
        "train-reranker", "--dataset", str(tiny_beir), "--base", str(tiny_cross_encoder_dir), "--out", str(out),
        "--epochs", "1", "--batch-size", "4", "--max-length", "64", "--negatives-per-query", "2",
        "--hard-negatives-from", "bm25", "--hard-negative-depth", "5", "--dev-fraction", "0.2", "--no-progress",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "completed" and report["out"] == str(out)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["negatives_per_query"] == 2 and saved["mining"]["hard_negative_depth"] == 5 and saved["loop"]["max_length"] == 64
    # A second run into the same directory is refused with a one-line error.
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_rejects_bad_settings(tiny_beir, tiny_cross_encoder_dir, tmp_path, capsys):
    from serve_app.cli import main

    code = main(["train-reranker", "--dataset", str(tiny_beir), "--base", str(tiny_cross_encoder_dir), "--out", str(tmp_path / "o"), "--dev-fraction", "1.5"])
    assert code == 2
    assert "dev_fraction" in capsys.readouterr().err


def test_cli_names_a_missing_base_model(tiny_beir, tmp_path, capsys):
    from serve_app.cli import main

    code = main(["train-reranker", "--dataset", str(tiny_beir), "--base", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err


def test_title_queries_add_training_queries_whose_positive_is_their_document(tmp_path):
    from serve_app.corpus import load_beir
    from serve_app.training.data import title_query_pairs

    (tmp_path / "qrels").mkdir()
    words = ["comet", "orbit", "glacier", "ice", "volcano", "lava", "coral", "reef", "desert", "dune"]
    docs = [{"_id": f"d{i}", "title": f"{words[i]} {words[(i + 1) % 10]}" if i != 3 else "single", "text": f"{words[i]} text number {i}"} for i in range(10)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "comet orbit"}) + "\n" + json.dumps({"_id": "q2", "text": "coral reef"}) + "\n")
    (tmp_path / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t1\nq2\td8\t1\n")
    ds = load_beir(tmp_path, "train")

    pairs = title_query_pairs(ds.corpus, 5, seed=1)
    assert len(pairs) == 5 and pairs == title_query_pairs(ds.corpus, 5, seed=1)
    assert all(qid == f"title:{doc}" and title == ds.corpus.get(doc).title for qid, (doc, title) in pairs.items())
    assert "title:d3" not in title_query_pairs(ds.corpus, 100, seed=1)  # one-word titles are not queries
    assert len(title_query_pairs(ds.corpus, 100, seed=1)) == 9 and title_query_pairs(ds.corpus, 0, seed=1) == {}

    data = prepare_queries(ds, dev_fraction=0.5, seed=0, max_queries=None, hard_negatives_from="bm25", hard_negative_depth=4, random_pool_size=2, title_queries=4)
    assert len(data.dev) == 1 and not data.dev[0].qid.startswith("title:")  # synthetic queries never reach dev
    synthetic = [r for r in data.train if r.qid.startswith("title:")]
    assert len(synthetic) == 4 and len(data.train) == 5
    for r in synthetic:
        doc = r.qid.removeprefix("title:")
        assert r.text == ds.corpus.get(doc).title and r.positives == [doc]
        assert doc not in r.hard and doc not in r.random and r.hard
