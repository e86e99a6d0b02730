"""Rerank cascades: a small cross-encoder shortlists for the large one.

Everything here runs without Ray: the funnel over in-process stages with tiny random-weight
cross-encoders (two seeds: a "small" and a "large" model). SLO-aware depth, the score cache and
query-hash routing have their own files (tests/test_slo.py, test_score_cache.py, test_query_router.py).
"""

from __future__ import annotations


import pytest

from serve_app.config import CascadeStage, CrossEncoderConfig, FunnelLimits, FusionConfig
from serve_app.errors import FunnelError
from serve_app.funnel import CascadeDepths, FunnelRequest, order_by_scores, resolve_funnel
from serve_app.pipeline import SearchPipeline
from tests.test_pipeline import CORPUS, DOCS, FakeRetriever

LIMITS = FunnelLimits(default_top_k=10, max_top_k=20, default_rerank_top_m=4, max_rerank_top_m=20, default_top_n=10, max_top_n=20)
QUERIES = ["protein cell", "cancer tumor heart", "music film city", "water energy"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from serve_app.rerank import CrossEncoderScorer, Reranker
    from serve_app.testing import build_tiny_cross_encoder

    out = {}
    for name, seed in (("small", 11), ("large", 22)):
        d = build_tiny_cross_encoder(tmp_path_factory.mktemp(name), seed=seed)
        cfg = CrossEncoderConfig(model=str(d), device="cpu")
        out[name] = Reranker(CrossEncoderScorer(cfg), cfg)
    return out


class Failing:
    def rerank_many(self, requests):
        raise RuntimeError("the small stage is down")


class Counting:
    """A reranker wrapper that counts the documents it is sent."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.documents = 0

    def rerank_many(self, requests):
        self.documents += sum(len(r.documents) for r in requests)
        return self.inner.rerank_many(requests)


def pipeline(large, small=None, *, default_top_m=12, max_top_m=16, fusion=None):
    retrievers = {"bm25": FakeRetriever("bm25", 1), "dense": FakeRetriever("dense", 2)}
    cascade = [(CascadeStage(name="small", reranker=CrossEncoderConfig(model="unused"), default_top_m=default_top_m, max_top_m=max_top_m), small)] if small is not None else []
    return SearchPipeline(CORPUS, retrievers, large, fusion or FusionConfig(), LIMITS, cascade=cascade)


# --------------------------------------------------------------------------- cascades


def test_a_cascade_returns_the_large_models_order_on_the_small_models_shortlist(models):
    small, large = Counting(models["small"]), Counting(models["large"])
    pipe = pipeline(large, small)
    flat = pipeline(models["large"])
    for q in QUERIES:
        res = pipe.search(q, rerank_top_m=4)
        fused = [h.doc_id for h in flat.search(q, rerank_top_m=0, top_n=20).results]
        texts = {d.id: d.content for d in DOCS}
        s = models["small"].rerank(q, [texts[d] for d in fused[:12]])
        shortlist = [fused[i] for i in sorted(range(12), key=lambda i: -s[i])][:4]
        big = models["large"].rerank(q, [texts[d] for d in shortlist])
        expected = [shortlist[i] for i in sorted(range(4), key=lambda i: -big[i])]
        got = [it.doc_id for it in res.results]
        assert got[:4] == expected
        # then the rest of the small stage's order, then the fused order
        rest_small = [fused[i] for i in sorted(range(12), key=lambda i: -s[i])][4:]
        assert got[4:12] == rest_small[: len(got[4:12])]
        assert res.stages["rerank.small"].status == "ok" and res.stages["rerank.small"].candidates == 12
        assert res.stages["rerank"].candidates == 4 and not res.degraded
        assert res.funnel.sizes()["cascade"] == {"small": 12}
        assert res.results[0].rerank_score == pytest.approx(float(max(big)))
    assert (small.documents, large.documents) == (12 * len(QUERIES), 4 * len(QUERIES))


def test_a_blended_stage_keeps_the_order_it_received_in_the_blend(models):
    from serve_app.funnel import apply_rerank

    retrievers = {"bm25": FakeRetriever("bm25", 1), "dense": FakeRetriever("dense", 2)}
    stage = CascadeStage(name="small", reranker=CrossEncoderConfig(model="unused"), default_top_m=12, max_top_m=16, blend="rrf", blend_weight=0.5)
    pipe = SearchPipeline(CORPUS, retrievers, models["large"], FusionConfig(rrf_k=5), LIMITS, cascade=[(stage, models["small"])])
    flat = pipeline(models["large"], fusion=FusionConfig(rrf_k=5))
    texts = {d.id: d.content for d in DOCS}
    differs = []
    for q in QUERIES:
        fused = flat.search(q, rerank_top_m=0, top_n=20).results
        head = [FusedLike(it.doc_id) for it in fused[:12]]
        s = models["small"].rerank(q, [texts[h.doc_id] for h in head])
        blended = [c.hit.doc_id for c in apply_rerank(head, s, FusionConfig(rerank_blend="rrf", rrf_k=5, rerank_weight=0.5))]
        by_score = [head[i].doc_id for i in sorted(range(12), key=lambda i: -s[i])]
        res = pipe.search(q, rerank_top_m=0, top_n=12)  # the stage alone decides the order
        assert [it.doc_id for it in res.results] == blended
        differs.append(blended != by_score)
    assert any(differs)  # the received rank changed the order somewhere


class FusedLike:
    def __init__(self, doc_id: str) -> None:
        self.doc_id = doc_id


def test_a_batch_through_a_cascade_equals_one_query_at_a_time(models):
    pipe = pipeline(models["large"], models["small"])
    one = [[it.doc_id for it in pipe.search(q, rerank_top_m=4).results] for q in QUERIES]
    many = [[it.doc_id for it in r.results] for r in pipe.search_batch(QUERIES, rerank_top_m=4, rerank_queries_per_call=3)]
    assert one == many


def test_a_failed_small_stage_degrades_to_the_fused_order_flagged(models):
    pipe = pipeline(models["large"], Failing())
    flat = pipeline(models["large"])
    for q in QUERIES[:2]:
        res = pipe.search(q, rerank_top_m=4)
        ref = flat.search(q, rerank_top_m=4)  # the large model on the fused head: what is left
        assert [i.doc_id for i in res.results] == [i.doc_id for i in ref.results]
        assert res.degraded == ["rerank.small"] and res.stages["rerank.small"].status == "error"
        assert "the small stage is down" in res.stages["rerank.small"].error
        assert res.stages["rerank"].status == "ok"


def test_cascade_depths_come_from_the_request_within_limits():
    cascade = [CascadeDepths("small", 12, 16)]
    r = resolve_funnel(FunnelRequest("q"), LIMITS, ["bm25", "dense"], cascade=cascade)
    assert r.cascade == (("small", 12),) and r.rerank_top_m == 4
    r = resolve_funnel(FunnelRequest("q", cascade={"small": 6}, rerank_top_m=6), LIMITS, ["bm25", "dense"], cascade=cascade)
    assert r.cascade == (("small", 6),) and r.rerank_top_m == 6
    # a default final depth above the stage's is lowered to it; an explicit one is refused
    assert resolve_funnel(FunnelRequest("q", cascade={"small": 3}), LIMITS, ["bm25", "dense"], cascade=cascade).rerank_top_m == 3
    # a stage's default is lowered to the pool
    assert resolve_funnel(FunnelRequest("q", top_k=2, rerank_top_m=0), LIMITS, ["bm25", "dense"], cascade=cascade).cascade == (("small", 4),)
    # 0 skips the stage
    r = resolve_funnel(FunnelRequest("q", cascade={"small": 0}, rerank_top_m=8), LIMITS, ["bm25", "dense"], cascade=cascade)
    assert r.cascade == (("small", 0),) and r.rerank_top_m == 8


@pytest.mark.parametrize(
    "request_fields, message",
    [
        ({"cascade": {"tiny": 5}}, "cascade: unknown stage 'tiny'"),
        ({"cascade": {"small": 17}}, "cascade.small=17 exceeds cascade stage small's max_top_m=16"),
        ({"cascade": {"small": -1}}, "cascade.small=-1 is below the minimum 0"),
        ({"cascade": {"small": 2.5}}, "cascade.small must be an integer"),
        ({"cascade": {"small": 3}, "rerank_top_m": 4}, "rerank_top_m=4 exceeds cascade.small=3"),
        ({"cascade": {"small": 12}, "top_k": 5}, r"cascade.small=12 exceeds the candidate pool \(10\)"),
        ({"cascade": ["small"]}, "cascade must map stage names to depths"),
    ],
)
def test_cascade_depth_overrides_are_validated(request_fields, message):
    with pytest.raises(FunnelError, match=message):
        resolve_funnel(FunnelRequest("q", **request_fields), LIMITS, ["bm25", "dense"], cascade=[CascadeDepths("small", 12, 16)])


def test_depths_never_grow_along_a_cascade():
    cascade = [CascadeDepths("a", 12, 20), CascadeDepths("b", 16, 20)]
    r = resolve_funnel(FunnelRequest("q"), LIMITS, ["bm25", "dense"], cascade=cascade)
    assert r.cascade == (("a", 12), ("b", 12))  # b's default lowered to a's depth
    with pytest.raises(FunnelError, match="cascade.b=14 exceeds cascade.a=12"):
        resolve_funnel(FunnelRequest("q", cascade={"b": 14}), LIMITS, ["bm25", "dense"], cascade=cascade)
    with pytest.raises(FunnelError, match="this pipeline has no cascade stages"):
        resolve_funnel(FunnelRequest("q", cascade={"a": 1}), LIMITS, ["bm25", "dense"])


def test_order_by_scores_is_stable_and_puts_nan_last():
    assert order_by_scores(["a", "b", "c", "d"], [1.0, float("nan"), 1.0, 2.0]) == ["d", "a", "c", "b"]


# --------------------------------------------------------------------------- SLO-aware depth
