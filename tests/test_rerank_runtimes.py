"""Reranker runtimes (torch, ONNX Runtime, OpenVINO), dtypes, int8, the export cache and the
drift check, over every model family (tiny test-built models)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from serve_app.config import CrossEncoderConfig, DriftTolerance
from serve_app.models import ModelLoadError
from serve_app.rerank import Reranker, load_scorer
from serve_app.rerank import device
from serve_app.rerank.drift import drift_report, kendall_tau, probe, violations
from serve_app.rerank.runtimes import EXPORT_META, ONNX_FILE, ONNX_INT8_FILE
from tests.capabilities import openvino_runs_bf16

pytestmark = pytest.mark.slow

PAIRS = [
    ("what powers the sun", "The sun fuses hydrogen into helium in its core."),
    ("what powers the sun", "football team player"),
    ("football match", "The team won the cup in a great season: the player scored a goal."),
    ("protein gene study", "protein"),
]
LOOSE = {"min_kendall_tau": None, "min_top1_agreement": None}  # random-weight models: near-equal scores reorder easily


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_bi_encoder_dir):
    """One checkpoint of each family, each in its own (writable) directory."""
    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from serve_app.testing import build_tiny_cross_encoder, build_tiny_decoder_reranker

    ce = build_tiny_cross_encoder(tmp_path_factory.mktemp("ce"), seed=2)
    decoder = build_tiny_decoder_reranker(tmp_path_factory.mktemp("dec"), seed=2)
    torch.manual_seed(0)
    t = Transformer(str(tiny_bi_encoder_dir))
    pooling_dir = tmp_path_factory.mktemp("pool")
    CrossEncoder(modules=[t, Pooling(t.get_embedding_dimension(), pooling_mode="max"), Dense(t.get_embedding_dimension(), 1, activation_function=torch.nn.Identity(), module_output_name="scores")]).save(str(pooling_dir))
    return {"sequence_classification": str(ce), "causal_lm": str(decoder), "pooling": str(pooling_dir)}


def cfg(model: str, **kw) -> CrossEncoderConfig:
    return CrossEncoderConfig(model=model, device="cpu", **kw)


@pytest.mark.parametrize("kind", ["sequence_classification", "pooling", "causal_lm"])
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_exported_float32_runtimes_equal_torch(kind, backend, models):
    ref = load_scorer(cfg(models[kind], dtype="float32"))
    fast = load_scorer(cfg(models[kind], backend=backend, dtype="float32"))
    assert fast.kind == kind and fast.runtime_info["backend"] == backend and fast.module is None
    np.testing.assert_allclose(fast.score(PAIRS), ref.score(PAIRS), atol=1e-4, rtol=0)
    drift = fast.runtime_info["drift"]
    assert drift["runtime"] == f"{backend}-float32" and drift["max_abs_diff"] < 1e-4 and drift["kendall_tau"] == 1.0 and drift["top1_agreement"] == 1.0
    assert fast.pairs_scored == len(PAIRS)  # the load's probe is not counted as traffic


@pytest.mark.parametrize("kind", ["sequence_classification", "pooling", "causal_lm"])
def test_exports_equal_torch_where_a_negative_index_would_show(kind, models, tmp_path):
    """The exported graph indexes the padding mask (transformers' mask builders gather it with
    aranges, so never a negative index). What a wrong index would break is the rows whose padding
    differs from the export's example: one batch mixing a 1-token document with documents cut at
    the limit, batch sizes other than the example's 2, and the padding side of each family
    (left for decoders). Every exported score must equal torch's."""
    import warnings

    docs = ["x", "protein", "the sun " * 200, "a team " * 3, "gene cell dna " * 40, "moon"]
    pairs = [(q, d) for q in ("what powers the sun", "p") for d in docs]
    one_batch = {"max_batch_tokens": 1 << 20, "max_batch_pairs": 256}  # all lengths padded together
    ref = load_scorer(cfg(models[kind], dtype="float32", **one_batch))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fast = load_scorer(cfg(models[kind], backend="onnx", dtype="float32", runtime_dir=str(tmp_path / "rt"), **one_batch))
    assert not [w for w in seen if "negative values" in str(w.message)], "the export's advanced-indexing warning must be handled where it is raised"
    for n in (1, 3, len(pairs)):
        np.testing.assert_allclose(fast.score(pairs[:n]), ref.score(pairs[:n]), atol=1e-4, rtol=0)
    assert fast.last_stats.batches == 1 and fast.last_stats.padded_tokens > 0  # really one padded batch
    np.testing.assert_allclose(fast.score(pairs[::-1]), ref.score(pairs[::-1]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["sequence_classification", "causal_lm"])
def test_int8_and_bfloat16_runtimes_report_their_drift(kind, models):
    ref = load_scorer(cfg(models[kind], dtype="float32")).score(probe()[0])
    for kw, label in ((dict(backend="onnx", quantize="int8"), "onnx-int8"), (dict(backend="openvino", dtype="bfloat16"), "openvino-bfloat16"), (dict(dtype="bfloat16"), "torch-bfloat16")):
        scorer = load_scorer(cfg(models[kind], drift_tolerance=LOOSE, **kw))
        drift = scorer.runtime_info["drift"]
        got = scorer.score(list(probe()[0]))
        want = drift_report(label, ref, got, probe()[1])
        assert drift["runtime"] == label and drift["pairs"] == len(probe()[0])
        assert drift["max_abs_diff"] == pytest.approx(want.max_abs_diff, rel=1e-5, abs=1e-7)
        if label == "openvino-bfloat16" and not openvino_runs_bf16():
            assert drift["max_abs_diff"] < 1e-4  # OpenVINO runs float32 on a CPU without bf16
        else:
            assert drift["max_abs_diff"] > 1e-5  # a real, lower-precision run
        assert drift["kendall_tau"] == pytest.approx(want.kendall_tau)


def test_drift_past_the_tolerance_refuses_the_runtime(models):
    strict = {"max_abs_diff": 1e-6, "min_kendall_tau": None, "min_top1_agreement": None}
    with pytest.raises(ModelLoadError, match="onnx-int8 drifts from torch float32 past reranker.drift_tolerance: max"):
        load_scorer(cfg(models["sequence_classification"], backend="onnx", quantize="int8", drift_tolerance=strict))
    with pytest.raises(ModelLoadError, match="torch-bfloat16 drifts"):
        load_scorer(cfg(models["sequence_classification"], dtype="bfloat16", drift_tolerance=strict))
    # an auto dtype falls back to float32 instead, and says so
    os.environ["SERVE_APP_RERANKER_CPU_DTYPE"] = "bfloat16"
    try:
        scorer = load_scorer(cfg(models["sequence_classification"], drift_tolerance=strict))
    finally:
        os.environ["SERVE_APP_RERANKER_CPU_DTYPE"] = "float32"
    assert scorer.runtime_info["dtype"] == "float32" and "torch-bfloat16 drifted past the tolerance" in scorer.runtime_info["auto_fallback"]
    np.testing.assert_allclose(scorer.score(PAIRS), load_scorer(cfg(models["sequence_classification"], dtype="float32")).score(PAIRS), atol=1e-6)
    # the check can be turned off
    unchecked = load_scorer(cfg(models["sequence_classification"], dtype="bfloat16", drift_check=False, drift_tolerance=strict))
    assert unchecked.runtime_info["drift"] is None and unchecked.runtime_info["dtype"] == "bfloat16"


def test_cpu_auto_dtype(monkeypatch, models):
    import torch

    monkeypatch.delenv("SERVE_APP_RERANKER_CPU_DTYPE", raising=False)
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda native=native: native)
        assert device.target_dtype(cfg("m"), "cpu") == want
    assert device.target_dtype(cfg("m", backend="onnx"), "cpu") == torch.float32
    assert device.target_dtype(cfg("m", dtype="float32"), "cpu") == torch.float32
    monkeypatch.setenv("SERVE_APP_RERANKER_CPU_DTYPE", "float32")
    assert device.target_dtype(cfg("m"), "cpu") == torch.float32
    monkeypatch.setenv("SERVE_APP_RERANKER_CPU_DTYPE", "bfloat16")
    scorer = load_scorer(cfg(models["sequence_classification"], drift_tolerance=LOOSE))
    assert scorer.runtime_info["dtype"] == "bfloat16" and scorer.runtime_info["drift"]["runtime"] == "torch-bfloat16"
    assert next(scorer.module.parameters()).dtype == torch.bfloat16
    monkeypatch.setenv("SERVE_APP_RERANKER_CPU_DTYPE", "float64")
    with pytest.raises(ModelLoadError, match="float32 or bfloat16"):
        device.cpu_auto_dtype()


def test_export_is_cached_and_rebuilt_when_the_checkpoint_changes(tmp_path, caplog):
    from serve_app.testing import build_tiny_cross_encoder

    model = str(build_tiny_cross_encoder(tmp_path / "ce", seed=5))
    runtime = tmp_path / "runtime"
    c = cfg(model, backend="onnx", runtime_dir=str(runtime))
    first = load_scorer(c).score(PAIRS)
    meta = json.loads((runtime / EXPORT_META).read_text())
    assert meta["module"]["kind"] == "sequence_classification" and "model.safetensors" in meta["source"]
    stamp = (runtime / ONNX_FILE).stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="serve_app.rerank.runtimes"):
        again = load_scorer(c).score(PAIRS)
    assert (runtime / ONNX_FILE).stat().st_mtime_ns == stamp and "using the export" in caplog.text
    np.testing.assert_array_equal(first, again)
    # int8 is added to the same export
    load_scorer(cfg(model, backend="onnx", quantize="int8", runtime_dir=str(runtime), drift_tolerance=LOOSE))
    assert (runtime / ONNX_INT8_FILE).is_file() and (runtime / ONNX_FILE).stat().st_mtime_ns == stamp
    # new weights in the same directory: the export is made again and scores follow the weights
    build_tiny_cross_encoder(tmp_path / "ce", seed=6)
    changed = load_scorer(c).score(PAIRS)
    np.testing.assert_allclose(changed, load_scorer(cfg(model, dtype="float32")).score(PAIRS), atol=1e-4)
    assert not np.allclose(changed, first)
    assert not (runtime / ONNX_INT8_FILE).exists()  # the old quantised file went with the old export
    # an unreadable export.json is exported again, not trusted
    (runtime / EXPORT_META).write_text("{not json")
    np.testing.assert_allclose(load_scorer(c).score(PAIRS), changed, atol=1e-6)
    assert json.loads((runtime / EXPORT_META).read_text())["format"] == meta["format"]


def test_default_export_dir_is_inside_a_writable_model_dir(models):
    scorer = load_scorer(cfg(models["pooling"], backend="onnx"))
    assert scorer.runtime_info["export"].startswith(os.path.join(models["pooling"], "serve_app-runtime"))


def test_reranker_on_an_exported_runtime(models):
    ref = Reranker.from_config(cfg(models["causal_lm"], dtype="float32"))
    fast = Reranker.from_config(cfg(models["causal_lm"], backend="onnx", long_documents="max_chunk", chunk_tokens=16, chunk_stride=8))
    docs = [d for _, d in PAIRS] + [" ".join(["football team"] * 20) + " the sun fuses hydrogen"]
    np.testing.assert_allclose(fast.rerank("what powers the sun", docs), Reranker(ref.scorer, fast.cfg).rerank("what powers the sun", docs), atol=1e-4)
    assert fast.scorer.describe()["backend"] == "onnx" and fast.scorer.describe()["kind"] == "causal_lm"


def test_config_refuses_impossible_runtime_combinations():
    with pytest.raises(ValueError, match="onnx runs float32"):
        CrossEncoderConfig(backend="onnx", dtype="bfloat16")
    with pytest.raises(ValueError, match="needs backend onnx"):
        CrossEncoderConfig(quantize="int8")
    with pytest.raises(ValueError, match="runs on the CPU"):
        CrossEncoderConfig(backend="openvino", device="cuda")


# ------------------------------------------------------------------------------ drift


def test_kendall_tau_matches_scipy():
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        for _ in range(25):
            a = rng.integers(0, 4, n).astype(float)  # ties on purpose
            b = a + rng.normal(0, 1.0, n) * rng.integers(0, 2)
            ref = kendalltau(a, b).statistic
            if np.isnan(ref):
                continue
            assert kendall_tau(a, b) == pytest.approx(ref, abs=1e-12)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0 and kendall_tau([1, 1], [1, 1]) == 1.0


def test_probe_is_fixed():
    pairs, groups = probe()
    assert len(pairs) == 32 and len(groups) == 8 and all(len(g) == 4 for g in groups)
    assert len({q for q, _ in pairs}) == 8 and len(set(pairs)) == 32
    assert sorted(i for g in groups for i in g) == list(range(32))


def test_violations_name_each_broken_bound():
    ref = np.array([3.0, 2.0, 1.0, 0.0, 3.0, 2.0, 1.0, 0.0])
    swapped = np.array([2.0, 3.0, 1.0, 0.0, 3.0, 2.0, 1.0, 0.0])
    report = drift_report("x", ref, swapped, [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert report.top1_agreement == 0.5 and report.kendall_tau == pytest.approx((4 / 6 + 1) / 2) and report.max_abs_diff == 1.0
    broken = violations(report, DriftTolerance(max_abs_diff=0.5, min_kendall_tau=0.9, min_top1_agreement=0.75))
    assert len(broken) == 3 and "max |score difference| 1" in broken[0] and "Kendall tau 0.833" in broken[1] and "top-1 agreement 0.50" in broken[2]
    assert violations(report, DriftTolerance(max_abs_diff=None, min_kendall_tau=None, min_top1_agreement=None)) == []


@pytest.mark.parametrize("kind,backend", [("sequence_classification", "torch"), ("pooling", "torch"), ("causal_lm", "torch"), ("sequence_classification", "onnx")])
def test_a_load_resolves_the_checkpoint_once(kind, backend, models, monkeypatch, tmp_path):
    """The configured model is resolved (directory / override / packaged / Hub id) once per load:
    family detection, the weights, the tokenizer and the export all read that one source."""
    from serve_app import models as model_module
    from serve_app.rerank import checkpoint, runtimes

    calls = []
    real = model_module.resolve_model

    def counting(name):
        calls.append(name)
        return real(name)

    for module in (model_module, checkpoint, runtimes):
        monkeypatch.setattr(module, "resolve_model", counting)
    extra = {"runtime_dir": str(tmp_path / "rt"), "dtype": "float32"} if backend == "onnx" else {}
    scorer = load_scorer(cfg(models[kind], backend=backend, **extra))
    assert calls == [models[kind]], calls
    assert scorer.kind == kind and np.isfinite(scorer.score(PAIRS)).all()
