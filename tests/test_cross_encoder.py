"""CrossEncoderScorer: parity with sentence-transformers, batching independence, order, limits, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_app.config import CrossEncoderConfig
from serve_app.models import ModelLoadError
from serve_app.rerank import CrossEncoderScorer
from serve_app.rerank.batching import plan_batches

MAX_LEN = 40

WORDS = "protein cell gene cancer tumor blood heart brain immune infection vaccine drug dose study".split()


def _pairs() -> list[tuple[str, str]]:
    """Short queries (so longest_first and only_second truncate alike) and documents of varied length."""
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(30):
        q = " ".join(rng.choice(WORDS, size=1 + i % 4))
        n = int(rng.choice([1, 3, 8, 15, 30, 80]))  # 30 and 80 words exceed MAX_LEN tokens
        d = " ".join(rng.choice(WORDS, size=n)) + (" zebra" if i % 5 == 0 else "")  # out-of-vocabulary word
        pairs.append((q, d))
    return pairs


PAIRS = _pairs()


def _cfg(model_dir, **kw) -> CrossEncoderConfig:
    kw.setdefault("max_length", MAX_LEN)
    kw.setdefault("max_batch_tokens", 256)
    return CrossEncoderConfig(model=str(model_dir), device="cpu", **kw)


@pytest.fixture(scope="module")
def scorer(tiny_cross_encoder_dir) -> CrossEncoderScorer:
    return CrossEncoderScorer(_cfg(tiny_cross_encoder_dir))


@pytest.fixture(scope="module")
def st_model(tiny_cross_encoder_dir):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(tiny_cross_encoder_dir), max_length=MAX_LEN, device="cpu")


@pytest.fixture(scope="module")
def st_model_2label(tiny_cross_encoder_2label_dir):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(tiny_cross_encoder_2label_dir), max_length=MAX_LEN, device="cpu")


def test_pairs_need_truncation_and_several_batches(scorer):
    lengths = [len(scorer.tokenizer(q, d)["input_ids"]) for q, d in PAIRS]
    assert max(lengths) > MAX_LEN, "the parity data must include pairs that are truncated"
    scorer.score(PAIRS)
    assert scorer.last_stats.batches >= 3
    assert len(set(scorer.last_stats.batch_sizes)) > 1


def test_parity_one_label_raw_logit(scorer, st_model):
    expected = st_model.predict(PAIRS, activation_fn=torch.nn.Identity(), batch_size=7)
    got = scorer.score(PAIRS)
    assert got.dtype == np.float32 and got.shape == (len(PAIRS),)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.ptp(got) > 1e-2, "scores must differ between pairs for the comparison to mean anything"


def test_parity_one_label_sigmoid(tiny_cross_encoder_dir, st_model):
    scorer = CrossEncoderScorer(_cfg(tiny_cross_encoder_dir, activation="sigmoid"))
    expected = st_model.predict(PAIRS, activation_fn=torch.nn.Sigmoid())
    got = scorer.score(PAIRS)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert ((got > 0) & (got < 1)).all()


def test_parity_two_labels_logit_difference(tiny_cross_encoder_2label_dir, st_model_2label):
    scorer = CrossEncoderScorer(_cfg(tiny_cross_encoder_2label_dir))
    logits = st_model_2label.predict(PAIRS, activation_fn=torch.nn.Identity())
    assert logits.shape == (len(PAIRS), 2), "sentence-transformers returns both logits for 2-label models"
    got = scorer.score(PAIRS)
    np.testing.assert_allclose(got, logits[:, 1] - logits[:, 0], atol=1e-4, rtol=0)


def test_parity_two_labels_sigmoid_is_positive_class_probability(tiny_cross_encoder_2label_dir, st_model_2label):
    scorer = CrossEncoderScorer(_cfg(tiny_cross_encoder_2label_dir, activation="sigmoid"))
    probs = st_model_2label.predict(PAIRS, activation_fn=torch.nn.Identity(), apply_softmax=True)
    np.testing.assert_allclose(scorer.score(PAIRS), probs[:, 1], atol=1e-4, rtol=0)


def test_independent_of_batching(tiny_cross_encoder_dir):
    tiny = CrossEncoderScorer(_cfg(tiny_cross_encoder_dir, max_batch_tokens=64, max_batch_pairs=2))
    huge = CrossEncoderScorer(_cfg(tiny_cross_encoder_dir, max_batch_tokens=1_000_000, max_batch_pairs=4096))
    a, b = tiny.score(PAIRS), huge.score(PAIRS)
    assert tiny.last_stats.batches > 10 and huge.last_stats.batches == 1
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_input_order_preserved(scorer):
    full = scorer.score(PAIRS)
    perm = np.random.default_rng(3).permutation(len(PAIRS))
    np.testing.assert_allclose(scorer.score([PAIRS[i] for i in perm]), full[perm], atol=1e-5, rtol=0)
    for i in (0, 7, 29):
        np.testing.assert_allclose(scorer.score([PAIRS[i]]), full[i : i + 1], atol=1e-5, rtol=0)


def test_query_longer_than_limit_falls_back_to_longest_first(scorer, st_model):
    long_q = " ".join(WORDS * 4)  # 56 tokens > MAX_LEN: only_second cannot fit it
    pairs = [(long_q, "protein cell gene"), (long_q, " ".join(WORDS * 3)), ("cell", "the gene")]
    got = scorer.score(pairs)
    expected = st_model.predict(pairs, activation_fn=torch.nn.Identity())  # sentence-transformers uses longest_first
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_only_the_document_side_is_truncated(scorer):
    """With only_second, a query of 20 tokens survives whole where longest_first would cut it."""
    q = " ".join(WORDS[:10] * 2)
    d = " ".join(WORDS * 4)
    features = scorer.pairs.features([(q, d)], [MAX_LEN])[0]
    expected = scorer.tokenizer(q, d, truncation="only_second", max_length=MAX_LEN)["input_ids"]
    longest_first = scorer.tokenizer(q, d, truncation="longest_first", max_length=MAX_LEN)["input_ids"]
    assert features["input_ids"] == expected != longest_first
    assert len(expected) == MAX_LEN


def test_per_call_max_length(scorer, tiny_cross_encoder_dir):
    from sentence_transformers import CrossEncoder

    short = CrossEncoder(str(tiny_cross_encoder_dir), max_length=16, device="cpu")
    expected = short.predict(PAIRS, activation_fn=torch.nn.Identity())
    np.testing.assert_allclose(scorer.score(PAIRS, max_length=16), expected, atol=1e-4, rtol=0)
    # Above the configured limit: capped, same as the default.
    np.testing.assert_allclose(scorer.score(PAIRS, max_length=10_000), scorer.score(PAIRS), atol=1e-6, rtol=0)
    # One limit per pair: each pair as if scored alone with its own limit.
    limits = [16 if i % 2 else MAX_LEN for i in range(len(PAIRS))]
    mixed = scorer.score(PAIRS, max_length=limits)
    full = scorer.score(PAIRS)
    np.testing.assert_allclose(mixed[1::2], expected[1::2], atol=1e-4, rtol=0)
    np.testing.assert_allclose(mixed[0::2], full[0::2], atol=1e-5, rtol=0)


def test_bad_max_length(scorer):
    with pytest.raises(ValueError, match="3 values for 2 pairs"):
        scorer.score(PAIRS[:2], max_length=[20, 20, 20])
    with pytest.raises(ValueError, match="too small"):
        scorer.score(PAIRS[:2], max_length=2)


def test_empty_and_malformed_pairs(scorer):
    out = scorer.score([])
    assert out.shape == (0,) and out.dtype == np.float32
    with pytest.raises(TypeError, match=r"pairs\[1\]"):
        scorer.score([("q", "d"), ("q", None)])


def test_counters_and_stats_match_the_plan(tiny_cross_encoder_dir):
    s = CrossEncoderScorer(_cfg(tiny_cross_encoder_dir, max_batch_tokens=128, max_batch_pairs=5))
    assert (s.pairs_scored, s.batches_run, s.padded_tokens) == (0, 0, 0)
    s.score(PAIRS)
    s.score(PAIRS[:4])
    lengths = [len(s.tokenizer(q, d, truncation="only_second", max_length=MAX_LEN)["input_ids"]) for q, d in PAIRS]
    plan = plan_batches(lengths, 128, 5)
    padded = sum(lengths[b[0]] * len(b) - sum(lengths[i] for i in b) for b in plan)
    assert s.pairs_scored == len(PAIRS) + 4
    assert s.batches_run == len(plan) + s.last_stats.batches
    assert s.last_stats.pairs == 4 and sum(s.last_stats.batch_sizes) == 4
    assert s.tokens_scored == sum(lengths) + s.last_stats.tokens
    assert s.padded_tokens == padded + s.last_stats.padded_tokens
    assert padded > 0


def test_model_info(scorer, tiny_cross_encoder_dir):
    assert scorer.model_name == str(tiny_cross_encoder_dir)
    assert scorer.device == "cpu"
    assert scorer.dtype == torch.float32
    assert scorer.num_labels == 1


def test_max_length_capped_by_position_embeddings(tiny_cross_encoder_dir):
    s = CrossEncoderScorer(CrossEncoderConfig(model=str(tiny_cross_encoder_dir), device="cpu", max_length=1024))
    assert s.max_length == 128  # the tiny model has 128 positions
    long_doc = " ".join(WORDS * 20)
    assert np.isfinite(s.score([("protein", long_doc)])).all()


def test_float16_on_cpu_falls_back_with_warning(tiny_cross_encoder_dir, scorer):
    with pytest.warns(RuntimeWarning, match="float16"):
        s = CrossEncoderScorer(_cfg(tiny_cross_encoder_dir, dtype="float16"))
    assert s.dtype == torch.float32
    assert next(s.model.parameters()).dtype == torch.float32
    np.testing.assert_allclose(s.score(PAIRS[:5]), scorer.score(PAIRS[:5]), atol=1e-6, rtol=0)


def test_bfloat16_on_cpu(tiny_cross_encoder_dir, scorer):
    s = CrossEncoderScorer(_cfg(tiny_cross_encoder_dir, dtype="bfloat16"))
    assert next(s.model.parameters()).dtype == torch.bfloat16
    got = s.score(PAIRS)
    assert got.dtype == np.float32
    # bf16 keeps ~3 significant digits: close to fp32, not equal.
    np.testing.assert_allclose(got, scorer.score(PAIRS), atol=0.1, rtol=0)


def test_missing_model_explains_how_to_provide_it(tmp_path):
    with pytest.raises(ModelLoadError, match="(?s)cross-encoder model 'no-such-org/no-such-model'.*SERVE_APP_MODEL_PATH__"):
        CrossEncoderScorer(CrossEncoderConfig(model="no-such-org/no-such-model", device="cpu"))
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        CrossEncoderScorer(CrossEncoderConfig(model=str(tmp_path), device="cpu"))  # empty directory


def test_three_label_model_rejected(tmp_path):
    from serve_app.testing import build_tiny_cross_encoder

    d = build_tiny_cross_encoder(tmp_path / "ce3", num_labels=3)
    with pytest.raises(ModelLoadError, match="3 output labels"):
        CrossEncoderScorer(CrossEncoderConfig(model=str(d), device="cpu"))


def test_num_threads_only_when_asked(tiny_cross_encoder_dir):
    before = torch.get_num_threads()
    CrossEncoderScorer(_cfg(tiny_cross_encoder_dir))
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        CrossEncoderScorer(_cfg(tiny_cross_encoder_dir), num_threads=0)


@pytest.mark.parametrize(
    "requested, device, bf16_ok, expected",
    [
        ("auto", "cpu", True, torch.float32),
        ("auto", "cuda", True, torch.bfloat16),
        ("auto", "cuda:1", False, torch.float16),
        ("float16", "cuda", True, torch.float16),
        ("bfloat16", "cpu", False, torch.bfloat16),
        ("float32", "cuda", True, torch.float32),
    ],
)
def test_resolve_dtype(monkeypatch, requested, device, bf16_ok, expected):
    from serve_app.models import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert resolve_dtype(requested, device) == expected
