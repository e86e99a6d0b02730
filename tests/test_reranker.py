"""Reranker: truncate and max_chunk modes, max_tokens_per_doc, many requests in one scorer call."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.config import CrossEncoderConfig
from serve_app.rerank import CrossEncoderScorer, Reranker, RerankRequest

WORDS = "protein cell gene cancer tumor blood heart brain immune infection vaccine drug dose study".split()
CHUNK, STRIDE, CAP = 12, 8, 3


def _doc(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words))


def _cfg(model_dir, **kw) -> CrossEncoderConfig:
    base = dict(model=str(model_dir), device="cpu", max_length=64, max_batch_tokens=512,
                chunk_tokens=CHUNK, chunk_stride=STRIDE, max_chunks_per_doc=CAP)
    base.update(kw)
    return CrossEncoderConfig(**base)


@pytest.fixture(scope="module")
def scorer(tiny_cross_encoder_dir) -> CrossEncoderScorer:
    return CrossEncoderScorer(_cfg(tiny_cross_encoder_dir))


@pytest.fixture(scope="module")
def truncating(scorer, tiny_cross_encoder_dir) -> Reranker:
    return Reranker(scorer, _cfg(tiny_cross_encoder_dir, long_documents="truncate"))


@pytest.fixture(scope="module")
def chunking(scorer, tiny_cross_encoder_dir) -> Reranker:
    return Reranker(scorer, _cfg(tiny_cross_encoder_dir, long_documents="max_chunk"))


class CountingScorer:
    """Wraps a scorer and records each scoring call."""

    def __init__(self, inner: CrossEncoderScorer) -> None:
        self.inner = inner
        self.calls: list[int] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score_with_lengths(self, pairs, max_length=None):
        self.calls.append(len(pairs))
        return self.inner.score_with_lengths(pairs, max_length=max_length)


def _tokens(scorer, text: str) -> list[int]:
    return scorer.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_windows_follow_chunk_tokens_and_stride(chunking, scorer):
    doc = _doc(22, seed=1)  # one token per word: windows start at words 0, 8, then 10 reaches the end
    wins = chunking.windows(doc)
    words = doc.split()
    assert wins == [" ".join(words[0:12]), " ".join(words[8:20]), " ".join(words[10:22])]
    assert all(len(_tokens(scorer, w)) == CHUNK for w in wins)


def test_window_cap_respected(chunking):
    doc = _doc(200, seed=2)
    wins = chunking.windows(doc)
    assert len(wins) == CAP
    words = doc.split()
    assert wins[0] == " ".join(words[:CHUNK])
    assert wins[-1] == " ".join(words[STRIDE * (CAP - 1) : STRIDE * (CAP - 1) + CHUNK])  # the tail is ignored


def test_windows_are_slices_of_the_original_text(chunking):
    doc = "Protein   CELL gene, zebra-like  tumour!  " * 6  # case, punctuation, odd spaces, unknown words
    wins = chunking.windows(doc)
    assert len(wins) > 1
    for w in wins:
        assert w in doc


def test_max_chunk_score_is_max_over_windows(chunking, scorer):
    query = "immune cell"
    docs = [_doc(40, seed=3), _doc(5, seed=4), _doc(200, seed=5)]
    got = chunking.rerank(query, docs)
    for doc, score in zip(docs, got):
        wins = chunking.windows(doc)
        alone = [scorer.score([(query, w)])[0] for w in wins]
        assert score == pytest.approx(max(alone), abs=1e-5)
    assert len(chunking.windows(docs[0])) > 1


def test_max_chunk_differs_from_truncate_on_long_documents(chunking, truncating):
    query = "brain tumor"
    docs = [_doc(60, seed=s) for s in range(6)]
    assert not np.allclose(chunking.rerank(query, docs), truncating.rerank(query, docs), atol=1e-4)


def test_short_document_same_score_in_both_modes(chunking, truncating):
    query = "protein gene"
    docs = [_doc(n, seed=n) for n in (1, 4, CHUNK)]
    np.testing.assert_allclose(chunking.rerank(query, docs), truncating.rerank(query, docs), atol=1e-6, rtol=0)


def test_scores_in_input_order(truncating):
    query = "vaccine dose"
    docs = [_doc(n, seed=10 + n) for n in (3, 30, 7, 90, 1)]
    scores = truncating.rerank(query, docs)
    assert scores.dtype == np.float32 and scores.shape == (5,)
    np.testing.assert_allclose(truncating.rerank(query, docs[::-1]), scores[::-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["truncate", "max_chunk"])
def test_rerank_many_equals_each_request_alone(mode, scorer, tiny_cross_encoder_dir):
    counting = CountingScorer(scorer)
    reranker = Reranker(counting, _cfg(tiny_cross_encoder_dir, long_documents=mode))
    requests = [
        RerankRequest("protein cell", [_doc(n, seed=n) for n in (2, 30, 9)]),
        RerankRequest("heart blood dose", []),
        RerankRequest("cancer", [_doc(n, seed=100 + n) for n in (50, 1, 14, 3)], max_tokens_per_doc=10),
        RerankRequest("immune infection study", [_doc(70, seed=7)]),
    ]
    together = reranker.rerank_many(requests)
    n_pairs = sum(
        len(reranker.windows(d, r.max_tokens_per_doc)) if mode == "max_chunk" else 1
        for r in requests
        for d in r.documents
    )
    assert counting.calls == [n_pairs]  # one scorer call for all pairs of all requests
    assert n_pairs > 8 if mode == "max_chunk" else n_pairs == 8
    assert [len(s) for s in together] == [3, 0, 4, 1]
    for req, scores in zip(requests, together):
        alone = reranker.rerank(req.query, req.documents, req.max_tokens_per_doc)
        np.testing.assert_allclose(scores, alone, atol=1e-5, rtol=0)


def test_empty_documents(truncating, chunking):
    for r in (truncating, chunking):
        out = r.rerank("query", [])
        assert out.shape == (0,) and out.dtype == np.float32
    assert truncating.rerank_many([]) == []


def test_max_tokens_per_doc_truncate_reads_only_the_head(truncating):
    query = "gene"
    doc = _doc(50, seed=20)  # one token per word
    head = " ".join(doc.split()[:7])
    got = truncating.rerank(query, [doc], max_tokens_per_doc=7)
    assert got[0] == pytest.approx(truncating.rerank(query, [head])[0], abs=1e-5)
    assert got[0] != pytest.approx(truncating.rerank(query, [doc])[0], abs=1e-4)
    # Larger than the scorer's limit: the same as no limit.
    assert truncating.rerank(query, [doc], max_tokens_per_doc=4096)[0] == pytest.approx(
        truncating.rerank(query, [doc])[0], abs=1e-6
    )


def test_max_tokens_per_doc_limits_windows(chunking):
    doc = _doc(200, seed=21)
    words = doc.split()
    wins = chunking.windows(doc, max_tokens=20)
    assert wins == [" ".join(words[0:12]), " ".join(words[8:20])]
    got = chunking.rerank("cell", [doc], max_tokens_per_doc=20)
    first_20 = " ".join(words[:20])
    assert got[0] == pytest.approx(chunking.rerank("cell", [first_20])[0], abs=1e-5)


@pytest.mark.parametrize(
    "request_, error, message",
    [
        (RerankRequest("q", "a single string"), TypeError, "sequence of strings"),
        (RerankRequest("q", ["ok", 3]), TypeError, r"documents\[1\]"),
        (RerankRequest(None, ["ok"]), TypeError, "query"),
        (RerankRequest("q", ["ok"], max_tokens_per_doc=0), ValueError, "max_tokens_per_doc"),
    ],
)
def test_bad_requests_are_named(truncating, request_, error, message):
    with pytest.raises(error, match=message):
        truncating.rerank_many([request_])
