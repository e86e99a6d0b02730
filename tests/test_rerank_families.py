"""Reranker families beside the classification cross-encoder: decoder LLM rerankers
(``kind: causal_lm``, Qwen3-Reranker style) and Sentence-Transformers' modular pooling
cross-encoders (``kind: pooling``), each against a direct computation by the reference library.

The decoder models are tiny random-weight Qwen3 and Llama checkpoints built here
(``serve_app.testing.build_tiny_decoder_reranker``: a byte-level BPE tokenizer in which "yes"
and "no" are single tokens and the prompt's chat markers are added tokens).
"""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.config import CrossEncoderConfig, PromptConfig
from serve_app.errors import InputRejected, InputTooLong
from serve_app.models import ModelLoadError
from serve_app.rerank import Reranker, RerankRequest, load_scorer
from serve_app.rerank.loading import detect_kind

pytestmark = pytest.mark.slow

PAIRS = [
    ("what powers the sun", "The sun fuses hydrogen into helium in its core, and that energy reaches earth as light."),
    ("what powers the sun", "football team player"),
    ("football match", "The team won the cup in a great season: the player scored a goal in the last game of the league."),
    ("protein gene study", "protein"),
    ("why is the sea salty", "Rain and rivers carry salts from rocks on land into the ocean, where water evaporates and the salt stays."),
]
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from serve_app.testing import build_tiny_decoder_reranker

    return str(build_tiny_decoder_reranker(tmp_path_factory.mktemp("qwen3"), architecture="qwen3", seed=0))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from serve_app.testing import build_tiny_decoder_reranker

    return str(build_tiny_decoder_reranker(tmp_path_factory.mktemp("llama"), architecture="llama", seed=1))


def cfg(model: str, **kw) -> CrossEncoderConfig:
    return CrossEncoderConfig(model=model, device="cpu", dtype="float32", **kw)


def reference_scores(model_dir: str, pairs, instruction: str = INSTRUCTION, prompt: PromptConfig = PromptConfig()) -> np.ndarray:
    """The Qwen3-Reranker recipe written out with transformers: prefix + filled template + suffix
    token ids, one left-padded batch, logits at the last position, logit(yes) - logit(no)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prefix = tok(prompt.prefix, add_special_tokens=False)["input_ids"]
    suffix = tok(prompt.suffix, add_special_tokens=False)["input_ids"]
    rows = [prefix + tok(prompt.template.format(instruction=instruction, query=q, document=d), add_special_tokens=False)["input_ids"] + suffix for q, d in pairs]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    yes, no = tok.convert_tokens_to_ids(prompt.yes_token), tok.convert_tokens_to_ids(prompt.no_token)
    with torch.inference_mode():
        last = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    return (last[:, yes] - last[:, no]).numpy()


# ---------------------------------------------------------------------------- decoders


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_decoder_scores_equal_the_transformers_computation(arch, qwen3_dir, llama_dir):
    model = qwen3_dir if arch == "qwen3" else llama_dir
    scorer = load_scorer(cfg(model))
    assert scorer.kind == "causal_lm" and detect_kind(cfg(model))[0] == "causal_lm"
    got = scorer.score(PAIRS)
    want = reference_scores(model, PAIRS)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.ptp(got) > 1e-3  # the pairs get different scores: there is something to compare


def test_decoder_sigmoid_is_p_yes(qwen3_dir):
    raw = load_scorer(cfg(qwen3_dir)).score(PAIRS)
    prob = load_scorer(cfg(qwen3_dir, activation="sigmoid")).score(PAIRS)
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-raw)), atol=1e-6)


def test_decoder_scores_do_not_depend_on_batch_or_padding(qwen3_dir):
    alone = np.array([load_scorer(cfg(qwen3_dir)).score([p])[0] for p in PAIRS])
    for kw in ({}, {"padding_side": "left"}, {"max_batch_pairs": 2}, {"max_batch_tokens": 64}):
        scorer = load_scorer(cfg(qwen3_dir, **kw))
        np.testing.assert_allclose(scorer.score(PAIRS), alone, atol=1e-5, err_msg=str(kw))
        np.testing.assert_allclose(scorer.score(PAIRS[::-1])[::-1], alone, atol=1e-5, err_msg=str(kw))
    assert load_scorer(cfg(qwen3_dir, max_batch_pairs=2)).score(PAIRS) is not None


def test_decoder_truncation_cuts_only_the_document(qwen3_dir):
    scorer = load_scorer(cfg(qwen3_dir, max_length=96))
    tok, p = scorer.tokenizer, scorer.pairs
    query, doc = "why is the sea salty", " ".join(["ocean water salt rock river rain"] * 30)
    ids = p.features([(query, doc)], p.limits(1, None))[0]["input_ids"]
    assert len(ids) == 96
    prompt = PromptConfig()
    head, tail = prompt.template.format(instruction=INSTRUCTION, query=query, document="\x00").split("\x00")
    text = tok.decode(ids)  # byte-level BPE decodes exactly
    # prefix, the whole template head (instruction and query) and the suffix are all there ...
    assert text.startswith(prompt.prefix + head) and text.endswith(tail + prompt.suffix)
    assert ids[: len(p.prefix_ids)] == p.prefix_ids and ids[-len(p.suffix_ids) :] == p.suffix_ids
    # ... and what is left of the document is its start
    kept = text[len(prompt.prefix + head) : len(text) - len(tail + prompt.suffix)]
    assert doc.startswith(kept) and 0 < len(kept) < len(doc) // 2
    # the truncated prompt scores as the prompt of the kept document text
    assert scorer.score([(query, doc)])[0] == pytest.approx(reference_scores(qwen3_dir, [(query, kept)])[0], abs=1e-4)


def test_decoder_never_cuts_the_query(qwen3_dir):
    scorer = load_scorer(cfg(qwen3_dir, max_length=100))
    reranker = Reranker(scorer, scorer.cfg)
    long_query = " ".join(["protein gene cell study"] * 20)
    with pytest.raises(InputTooLong, match="never cut|no document token"):
        reranker.check(RerankRequest(long_query, ["protein"]))
    with pytest.raises(InputTooLong):
        scorer.score([(long_query, "protein")])
    # max_tokens_per_doc limits the document and leaves the query whole
    req = RerankRequest("why is the sea salty", [" ".join(["ocean water salt"] * 50)], max_tokens_per_doc=5)
    (scores, _, tokens) = reranker.rerank_many_detailed([req])[0]
    assert tokens == scorer.query_overhead(req.query) + 5 and np.isfinite(scores[0])
    with pytest.raises(ModelLoadError, match="leaves no room"):
        load_scorer(cfg(qwen3_dir, max_length=32))  # the Qwen3-Reranker prompt alone is longer


def test_decoder_max_chunk_scores_the_best_window(qwen3_dir):
    c = cfg(qwen3_dir, long_documents="max_chunk", chunk_tokens=24, chunk_stride=16, max_chunks_per_doc=8)
    reranker = Reranker.from_config(c)
    long_doc = " ".join(["football team player goal season"] * 8) + " The sun fuses hydrogen into helium in its core."
    windows = reranker.windows(long_doc)
    assert len(windows) > 2
    want = reference_scores(qwen3_dir, [("what powers the sun", w) for w in windows]).max()
    assert reranker.rerank("what powers the sun", [long_doc])[0] == pytest.approx(want, abs=1e-4)


def test_decoder_instruction_per_request(qwen3_dir):
    reranker = Reranker.from_config(cfg(qwen3_dir))
    docs = [d for _, d in PAIRS]
    mine = "Find passages about sport"
    default = reranker.rerank_many([RerankRequest("football match", docs)])[0]
    custom = reranker.rerank_many([RerankRequest("football match", docs, instruction=mine)])[0]
    np.testing.assert_allclose(default, reference_scores(qwen3_dir, [("football match", d) for d in docs]), atol=1e-4)
    np.testing.assert_allclose(custom, reference_scores(qwen3_dir, [("football match", d) for d in docs], instruction=mine), atol=1e-4)
    assert not np.allclose(default, custom)
    # mixed instructions in one call equal each request alone
    both = reranker.rerank_many([RerankRequest("football match", docs, instruction=mine), RerankRequest("football match", docs)])
    np.testing.assert_allclose(both[0], custom, atol=1e-5)
    np.testing.assert_allclose(both[1], default, atol=1e-5)


def test_instruction_is_refused_by_models_without_a_prompt(tiny_cross_encoder_dir):
    reranker = Reranker.from_config(cfg(str(tiny_cross_encoder_dir)))
    with pytest.raises(InputRejected, match="decoder rerankers"):
        reranker.check(RerankRequest("q", ["d"], instruction="do this"))
    with pytest.raises(InputRejected):
        reranker.rerank_many([RerankRequest("q", ["d"], instruction="do this")])


def test_custom_prompt_and_yes_only_scoring(qwen3_dir):
    prompt = PromptConfig(prefix="", template="A: {query}\nB: {document}\n", suffix="Relevant:", yes_token="yes", no_token=None)
    got = load_scorer(cfg(qwen3_dir, prompt=prompt)).score(PAIRS[:3])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen3_dir)
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).eval()
    yes = tok.convert_tokens_to_ids("yes")
    for (q, d), score in zip(PAIRS[:3], got):
        ids = tok(f"A: {q}\nB: {d}\n", add_special_tokens=False)["input_ids"] + tok("Relevant:", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            want = model(input_ids=torch.tensor([ids])).logits[0, -1, yes].item()
        assert score == pytest.approx(want, abs=1e-4)


def test_prompt_config_is_validated():
    with pytest.raises(ValueError, match="exactly once"):
        PromptConfig(template="{query} only")
    with pytest.raises(ValueError, match="unknown fields"):
        PromptConfig(template="{query} {document} {title}")


def test_answer_tokens_must_be_single_tokens(qwen3_dir):
    with pytest.raises(ModelLoadError, match="exactly one"):
        load_scorer(cfg(qwen3_dir, prompt=PromptConfig(yes_token="definitely relevant")))


def test_architectures_that_post_process_logits_are_refused(tmp_path, qwen3_dir):
    """Granite divides its logits by logits_scaling: reading W[yes] - W[no] off the hidden state
    would not be the model's own score, so the load refuses it instead of scoring wrongly."""
    import torch
    from transformers import AutoTokenizer, GraniteConfig, GraniteForCausalLM

    tok = AutoTokenizer.from_pretrained(qwen3_dir)
    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0, initializer_range=0.2, tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    GraniteForCausalLM(config).save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    with pytest.raises(ModelLoadError, match="post-processes its logits"):
        load_scorer(cfg(str(tmp_path)))


def test_final_logit_softcapping_is_reproduced(tmp_path, qwen3_dir):
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tok = AutoTokenizer.from_pretrained(qwen3_dir)
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        final_logit_softcapping=0.5, initializer_range=0.2, pad_token_id=tok.pad_token_id, sliding_window=64, query_pre_attn_scalar=8,
    )
    Gemma2ForCausalLM(config).save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    got = load_scorer(cfg(str(tmp_path))).score(PAIRS)
    np.testing.assert_allclose(got, reference_scores(str(tmp_path), PAIRS), atol=1e-4)
    assert np.all(np.abs(got) < 1.0)  # capped logits: |yes - no| < 2 * 0.5


# ---------------------------------------------------------------------- pooling heads


def build_modular(out, encoder_dir: str, modes, hidden: int = 0, seed: int = 0) -> str:
    """A Sentence-Transformers cross-encoder: Transformer -> Pooling(modes) -> [Dense(tanh)] -> Dense(1), saved."""
    import torch
    from sentence_transformers import CrossEncoder
    from sentence_transformers.base.modules import Dense, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(seed)
    transformer = Transformer(encoder_dir)
    dim = transformer.get_embedding_dimension()
    pooling = Pooling(dim, pooling_mode=modes)
    width = pooling.pooling_output_dimension
    modules = [transformer, pooling]
    if hidden:
        modules.append(Dense(width, hidden, activation_function=torch.nn.Tanh()))
        width = hidden
    modules.append(Dense(width, 1, activation_function=torch.nn.Identity(), module_output_name="scores"))
    CrossEncoder(modules=modules).save(str(out))
    return str(out)


@pytest.mark.parametrize("modes,hidden", [("mean", 0), ("max", 0), ("cls", 0), ("lasttoken", 0), ("weightedmean", 0), ("mean_sqrt_len_tokens", 0), (("mean", "max"), 8)])
def test_modular_cross_encoder_equals_sentence_transformers(modes, hidden, tmp_path, tiny_bi_encoder_dir):
    import torch
    from sentence_transformers import CrossEncoder

    path = build_modular(tmp_path / "ce", str(tiny_bi_encoder_dir), modes, hidden)
    scorer = load_scorer(cfg(path))
    assert scorer.kind == "pooling"
    want = CrossEncoder(path, device="cpu").predict(PAIRS, activation_fn=torch.nn.Identity(), batch_size=2)
    np.testing.assert_allclose(scorer.score(PAIRS), want, atol=1e-4, rtol=0)
    sig = CrossEncoder(path, device="cpu").predict(PAIRS)  # its saved default activation: sigmoid
    np.testing.assert_allclose(load_scorer(cfg(path, activation="sigmoid")).score(PAIRS), sig, atol=1e-4)


def test_modular_layout_with_unknown_modules_is_refused(tmp_path, tiny_bi_encoder_dir):
    import json

    path = build_modular(tmp_path / "ce", str(tiny_bi_encoder_dir), "mean")
    modules = json.loads((tmp_path / "ce" / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.base.modules.normalize.Normalize"})
    (tmp_path / "ce" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Normalize"):
        load_scorer(cfg(path))


def test_kind_detection(tmp_path, tiny_cross_encoder_dir, tiny_bi_encoder_dir, qwen3_dir):
    assert detect_kind(cfg(str(tiny_cross_encoder_dir)))[0] == "sequence_classification"
    assert detect_kind(cfg(qwen3_dir))[0] == "causal_lm"
    assert detect_kind(cfg(build_modular(tmp_path / "p", str(tiny_bi_encoder_dir), "max")))[0] == "pooling"
    with pytest.raises(ModelLoadError, match="set reranker.kind"):
        detect_kind(cfg(str(tiny_bi_encoder_dir)))  # a plain encoder: no head to score with
    with pytest.raises(ModelLoadError, match="modular cross-encoder"):
        detect_kind(cfg(str(tiny_cross_encoder_dir), kind="pooling"))
