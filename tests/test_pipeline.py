"""The funnel steps and the in-process SearchPipeline, with fake retrievers and the tiny cross-encoder."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pytest

from serve_app.config import CrossEncoderConfig, FunnelLimits, FusionConfig
from serve_app.corpus import Corpus
from serve_app.errors import FunnelError, StageUnavailable
from serve_app.pipeline import (
    FunnelRequest,
    SearchPipeline,
    apply_rerank,
    assemble,
    resolve_funnel,
)
from serve_app.retrieval.fusion import FusedHit, fuse, reciprocal_rank_fusion
from serve_app.types import Document, Hit

WORDS = "protein cell gene virus vaccine cancer tumor heart brain blood water energy music film city food".split()
DOCS = [Document(f"d{i}", " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(6)), title=f"title {i}") for i in range(20)]
CORPUS = Corpus(DOCS)


class FakeRetriever:
    """Deterministic ranking: documents ordered by a per-retriever permutation; records every call."""

    def __init__(self, name: str, seed: int, fail: bool = False) -> None:
        self.name = name
        self.order = [DOCS[i].id for i in np.random.default_rng(seed).permutation(len(DOCS))]
        self.fail = fail
        self.calls: list[tuple[str, int]] = []
        self.batch_calls: list[tuple[int, int]] = []

    def _hits(self, query: str, k: int) -> list[Hit]:
        shift = sum(map(ord, query)) % len(self.order)
        order = self.order[shift:] + self.order[:shift]
        return [Hit(d, float(len(order) - i)) for i, d in enumerate(order[:k])]

    def search(self, query: str, k: int) -> list[Hit]:
        self.calls.append((query, k))
        if self.fail:
            raise ConnectionError("index unavailable")
        return self._hits(query, k)

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        self.batch_calls.append((len(queries), k))
        return [self.search(q, k) for q in queries]


class SpyReranker:
    """Wraps a real Reranker and records the documents it is asked to score."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.rerank_calls: list[int] = []
        self.many_calls: list[int] = []

    def rerank(self, query, documents):
        self.rerank_calls.append(len(documents))
        return self.inner.rerank(query, documents)

    def rerank_many(self, requests):
        self.many_calls.append(len(requests))
        return self.inner.rerank_many(requests)


@pytest.fixture(scope="module")
def reranker(tiny_cross_encoder_dir):
    from serve_app.rerank import CrossEncoderScorer, Reranker

    cfg = CrossEncoderConfig(model=str(tiny_cross_encoder_dir), device="cpu")
    return Reranker(CrossEncoderScorer(cfg), cfg)


LIMITS = FunnelLimits(default_top_k=8, max_top_k=20, default_rerank_top_m=5, max_rerank_top_m=10, default_top_n=3, max_top_n=15)


def make_pipeline(reranker=None, fail_dense=False, limits=LIMITS, fusion=None):
    retrievers = {"bm25": FakeRetriever("bm25", 1), "dense": FakeRetriever("dense", 2, fail=fail_dense)}
    return SearchPipeline(CORPUS, retrievers, reranker, fusion or FusionConfig(), limits)


# --------------------------------------------------------------------------- resolve_funnel


def test_resolve_defaults():
    f = resolve_funnel(FunnelRequest("q"), LIMITS, ["bm25", "dense"])
    assert (f.top_k, f.rerank_top_m, f.top_n, f.retrievers) == (8, 5, 3, ("bm25", "dense"))
    assert f.rerank and f.pool_size == 16
    f = resolve_funnel(FunnelRequest("q", rerank_top_m=0, retrievers=["dense", "bm25", "dense"]), LIMITS, ["bm25", "dense"])
    assert not f.rerank and f.retrievers == ("bm25", "dense")


def test_resolve_defaults_are_lowered_to_the_pool_but_explicit_values_are_not():
    f = resolve_funnel(FunnelRequest("q", top_k=2, retrievers=["bm25"]), LIMITS, ["bm25", "dense"])
    assert (f.top_k, f.rerank_top_m, f.top_n) == (2, 2, 2)
    # top_n above top_k but within top_k * retrievers is fine.
    assert resolve_funnel(FunnelRequest("q", top_k=2, top_n=4, rerank_top_m=4), LIMITS, ["bm25", "dense"]).top_n == 4
    with pytest.raises(FunnelError, match=r"top_n=5 exceeds the candidate pool top_k \* retrievers = 2 \* 2 = 4"):
        resolve_funnel(FunnelRequest("q", top_k=2, top_n=5), LIMITS, ["bm25", "dense"])
    with pytest.raises(FunnelError, match=r"rerank_top_m=3 exceeds the candidate pool .* = 2"):
        resolve_funnel(FunnelRequest("q", top_k=2, rerank_top_m=3, retrievers=["dense"]), LIMITS, ["bm25", "dense"])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"top_k": 21}, "top_k=21 exceeds max_top_k=20"),
        ({"top_k": 0}, "top_k=0 is below the minimum 1"),
        ({"top_k": 2.5}, "top_k must be an integer, got 2.5"),
        ({"top_k": True}, "top_k must be an integer"),
        ({"rerank_top_m": 11}, "rerank_top_m=11 exceeds max_rerank_top_m=10"),
        ({"rerank_top_m": -1}, "rerank_top_m=-1 is below the minimum 0"),
        ({"top_n": 16}, "top_n=16 exceeds max_top_n=15"),
        ({"top_n": 0}, "top_n=0 is below the minimum 1"),
        ({"retrievers": ["splade"]}, "unknown retriever 'splade'"),
        ({"retrievers": []}, "retrievers must name at least one"),
        ({"query": "   "}, "query must be a non-empty string"),
    ],
)
def test_resolve_rejects_bad_requests(fields, message):
    request = FunnelRequest(**{"query": "q", **fields})
    with pytest.raises(FunnelError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        resolve_funnel(request, LIMITS, ["bm25", "dense"])


def test_resolve_retriever_not_in_index_and_no_reranker():
    with pytest.raises(FunnelError, match="retriever not available in this index 'dense'; available: \\['bm25'\\]"):
        resolve_funnel(FunnelRequest("q", retrievers=["dense"]), LIMITS, ["bm25"])
    f = resolve_funnel(FunnelRequest("q"), LIMITS, ["bm25"], rerank_available=False)
    assert f.rerank_top_m == 0
    with pytest.raises(FunnelError, match="rerank_top_m=4 but this pipeline has no reranker"):
        resolve_funnel(FunnelRequest("q", rerank_top_m=4), LIMITS, ["bm25"], rerank_available=False)


# --------------------------------------------------------------------------- steps


def test_apply_rerank_orders_head_and_keeps_tail():
    fused = [FusedHit(d, 1.0 / (i + 1), {"bm25": i + 1}, {"bm25": 0.0}) for i, d in enumerate("abcde")]
    out = apply_rerank(fused, np.array([0.1, 0.9, 0.1], dtype=np.float32))
    assert [c.hit.doc_id for c in out] == ["b", "a", "c", "d", "e"]  # a before c: tie keeps fused order
    assert [c.rerank_score for c in out][3:] == [None, None]
    out = apply_rerank(fused[:3], [float("nan"), -5.0, 2.0])
    assert [c.hit.doc_id for c in out] == ["c", "b", "a"]
    assert [c.hit.doc_id for c in apply_rerank(fused, [])] == list("abcde")
    with pytest.raises(ValueError, match="3 rerank scores for 2 candidates"):
        apply_rerank(fused[:2], [1.0, 2.0, 3.0])


def test_apply_rerank_rrf_blend_mixes_rerank_rank_with_fused_rank():
    fused = [FusedHit(d, 1.0 / (i + 1), {"bm25": i + 1}, {"bm25": 0.0}) for i, d in enumerate("abcdef")]
    scores = [0.0, 0.1, 0.2, 0.3, 5.0]  # the reranker reverses the fused order of a..e
    plain = apply_rerank(fused, scores)
    assert [c.hit.doc_id for c in plain] == ["e", "d", "c", "b", "a", "f"]
    cfg = FusionConfig(rerank_blend="rrf", rrf_k=1)
    blended = apply_rerank(fused, scores, cfg)
    # fused ranks a..e = 1..5, rerank ranks 5..1: with k=1 every sum is 1/(1+r) + 1/(1+6-r)
    expected = {d: 1 / (1 + (5 - i)) + 1 / (1 + i + 1) for i, d in enumerate("abcde")}
    assert {c.hit.doc_id: c.blended_score for c in blended[:5]} == pytest.approx(expected)
    assert [c.hit.doc_id for c in blended] == ["a", "e", "b", "d", "c", "f"]  # equal sums keep the fused order
    assert blended[-1].blended_score is None and blended[-1].rerank_score is None
    assert [c.rerank_score for c in blended[:2]] == [0.0, 5.0]
    heavy = apply_rerank(fused, scores, FusionConfig(rerank_blend="rrf", rrf_k=1, rerank_weight=100))
    assert [c.hit.doc_id for c in heavy] == [c.hit.doc_id for c in plain]  # a dominant reranker weight = no blend
    assert [c.hit.doc_id for c in apply_rerank(fused, scores, FusionConfig())] == [c.hit.doc_id for c in plain]
    funnel = resolve_funnel(FunnelRequest("q", top_k=6, rerank_top_m=5, top_n=6), LIMITS, ["bm25"])
    items = assemble(blended, funnel).results
    assert items[0].score == pytest.approx(expected["a"]) and items[0].rerank_score == 0.0 and items[-1].score == pytest.approx(1 / 6)


def test_assemble_scores_and_documents():
    funnel = resolve_funnel(FunnelRequest("q", top_k=3, rerank_top_m=1, top_n=2), LIMITS, ["bm25"])
    fused = fuse({"bm25": [Hit("d1", 3.0), Hit("d2", 2.0), Hit("d3", 1.0)]}, FusionConfig())
    result = assemble(apply_rerank(fused, [7.5]), funnel, documents=CORPUS.get, timings_ms={"total": 1.0}, degraded=["dense"])
    first, second = result.results
    assert (first.doc_id, first.score, first.rerank_score, first.fused_score) == ("d1", 7.5, 7.5, pytest.approx(1 / 61))
    assert (second.doc_id, second.rerank_score, second.score) == ("d2", None, pytest.approx(1 / 62))
    assert second.retriever_ranks == {"bm25": 2} and second.retriever_scores == {"bm25": 2.0}
    assert first.document == CORPUS.get("d1")
    assert result.degraded == ["dense"] and result.timings_ms == {"total": 1.0} and result.funnel == funnel


# --------------------------------------------------------------------------- SearchPipeline


def test_search_respects_funnel_sizes_and_reranks(reranker):
    spy = SpyReranker(reranker)
    pipe = make_pipeline(spy)
    result = pipe.search("protein cancer", top_k=6, rerank_top_m=4, top_n=4)
    assert pipe.retrievers["bm25"].calls == [("protein cancer", 6)]
    assert pipe.retrievers["dense"].calls == [("protein cancer", 6)]
    assert spy.many_calls == [1]
    assert len(result.results) == 4
    # The reranked head is the fused top 4, ordered by the cross-encoder's own scores.
    expected_fused = reciprocal_rank_fusion({n: r._hits("protein cancer", 6) for n, r in pipe.retrievers.items()})
    head_ids = [h.doc_id for h in expected_fused[:4]]
    assert sorted(r.doc_id for r in result.results) == sorted(head_ids)
    direct = reranker.rerank("protein cancer", [CORPUS.get(d).content for d in head_ids])
    expected_order = [head_ids[i] for i in np.argsort(-direct, kind="stable")]
    assert [r.doc_id for r in result.results] == expected_order
    scores = [r.rerank_score for r in result.results]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) > 1  # the tiny model does discriminate
    for r in result.results:
        assert r.rerank_score == pytest.approx(float(direct[head_ids.index(r.doc_id)]), abs=1e-5)
        assert r.score == r.rerank_score and r.document is None
    assert result.degraded == []


def test_top_n_beyond_rerank_head_appends_fused_order(reranker):
    pipe = make_pipeline(reranker)
    result = pipe.search("gene", top_k=5, rerank_top_m=2, top_n=6)
    fused = reciprocal_rank_fusion({n: r._hits("gene", 5) for n, r in pipe.retrievers.items()})
    assert len(result.results) == 6
    assert sorted(r.doc_id for r in result.results[:2]) == sorted(h.doc_id for h in fused[:2])
    assert all(r.rerank_score is not None for r in result.results[:2])
    assert [r.doc_id for r in result.results[2:]] == [h.doc_id for h in fused[2:6]]
    assert all(r.rerank_score is None and r.score == r.fused_score for r in result.results[2:])


def test_no_rerank_returns_fused_order_and_documents():
    pipe = make_pipeline(None, fusion=FusionConfig(method="weighted"))
    result = pipe.search("heart", top_k=5, top_n=7, return_documents=True)
    fused = fuse({n: r._hits("heart", 5) for n, r in pipe.retrievers.items()}, FusionConfig(method="weighted"))
    assert [r.doc_id for r in result.results] == [h.doc_id for h in fused[:7]]
    assert all(r.document is CORPUS.get(r.doc_id) for r in result.results)
    assert "rerank" not in result.timings_ms


def test_single_retriever_request():
    pipe = make_pipeline(None)
    result = pipe.search("water", top_k=4, top_n=4, retrievers=["dense"])
    assert pipe.retrievers["bm25"].calls == []
    assert [r.doc_id for r in result.results] == [h.doc_id for h in pipe.retrievers["dense"]._hits("water", 4)]
    assert all(set(r.retriever_ranks) == {"dense"} for r in result.results)
    assert set(result.timings_ms) == {"dense", "fusion", "total"}


def test_failed_retriever_degrades(reranker):
    pipe = make_pipeline(reranker, fail_dense=True)
    result = pipe.search("music", top_k=5, rerank_top_m=3, top_n=5)
    assert result.degraded == ["dense"]
    bm25_ids = {h.doc_id for h in pipe.retrievers["bm25"]._hits("music", 5)}
    assert {r.doc_id for r in result.results} == bm25_ids
    assert all(set(r.retriever_ranks) == {"bm25"} for r in result.results)
    assert "dense" in result.timings_ms


def test_every_retriever_failing_raises():
    pipe = SearchPipeline(CORPUS, {"dense": FakeRetriever("dense", 2, fail=True)}, None, FusionConfig(), LIMITS)
    with pytest.raises(StageUnavailable, match=r"every requested retriever failed \(dense: ConnectionError: index unavailable\)") as err:
        pipe.search("x")
    assert err.value.stages["dense"].status == "error"


def test_timings_present(reranker):
    result = make_pipeline(reranker).search("brain blood")
    t = result.timings_ms
    assert set(t) == {"bm25", "dense", "fusion", "rerank", "total"}
    assert all(math.isfinite(v) and v >= 0 for v in t.values())
    assert t["total"] >= max(t["bm25"], t["dense"], t["fusion"], t["rerank"])
    assert (len(result.results), result.funnel.top_k, result.funnel.rerank_top_m) == (3, 8, 5)


def test_validation_errors_surface_from_search():
    with pytest.raises(FunnelError, match="top_k=50 exceeds max_top_k=20"):
        make_pipeline(None).search("q", top_k=50)
    with pytest.raises(FunnelError, match="no reranker"):
        make_pipeline(None).search("q", rerank_top_m=3)


def test_search_batch_matches_search(reranker):
    queries = ["protein", "cancer tumor", "energy water", "film music", "city food"]
    spy = SpyReranker(reranker)
    pipe = make_pipeline(spy)
    batch = pipe.search_batch(queries, top_k=6, rerank_top_m=4, top_n=5, rerank_queries_per_call=2)
    assert pipe.retrievers["bm25"].batch_calls == [(5, 6)]
    assert spy.many_calls == [2, 2, 1]
    single = make_pipeline(reranker)
    for q, b in zip(queries, batch):
        s = single.search(q, top_k=6, rerank_top_m=4, top_n=5)
        assert [r.doc_id for r in b.results] == [r.doc_id for r in s.results]
        for rb, rs in zip(b.results, s.results):
            assert rb.fused_score == rs.fused_score
            assert rb.rerank_score == pytest.approx(rs.rerank_score, abs=1e-5) if rs.rerank_score is not None else rb.rerank_score is None
        assert set(b.timings_ms) == {"bm25", "dense", "fusion", "rerank", "total"}
    assert make_pipeline(None).search_batch([]) == []


def test_pipeline_rejects_unknown_retriever_names():
    with pytest.raises(ValueError, match="unknown retriever name"):
        SearchPipeline(CORPUS, {"splade": FakeRetriever("splade", 0)})
    with pytest.raises(ValueError, match="at least one retriever"):
        SearchPipeline(CORPUS, {})


def test_from_index(tmp_path, tiny_bi_encoder_dir, tiny_cross_encoder_dir):
    from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
    from serve_app.index import build_index

    build_index(CORPUS, tmp_path / "idx", bm25=BM25Config(), dense=DenseConfig(model=str(tiny_bi_encoder_dir), device="cpu"), chunking=ChunkingConfig(), show_progress=False)
    pipe = SearchPipeline.from_index(tmp_path / "idx", CrossEncoderConfig(model=str(tiny_cross_encoder_dir), device="cpu"), limits=LIMITS)
    assert pipe.available_retrievers == ["bm25", "dense"] and pipe.reranker is not None
    result = pipe.search("protein cancer", top_k=5, rerank_top_m=3, top_n=3, return_documents=True)
    assert len(result.results) == 3 and result.degraded == []
    assert all(r.document == CORPUS.get(r.doc_id) and r.rerank_score is not None for r in result.results)
    bm25_hits = pipe.retrievers["bm25"].search("protein cancer", 5)
    assert bm25_hits and all("protein" in CORPUS.get(h.doc_id).content or "cancer" in CORPUS.get(h.doc_id).content for h in bm25_hits)

    only_bm25 = SearchPipeline.from_index(tmp_path / "idx", retrievers=["bm25"], limits=LIMITS)
    assert only_bm25.available_retrievers == ["bm25"] and only_bm25.reranker is None

    build_index(CORPUS, tmp_path / "sparse", bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), show_progress=False)
    with pytest.raises(FunnelError, match="has no dense retriever"):
        SearchPipeline.from_index(tmp_path / "sparse", retrievers=["dense"])
