"""Fusion of ranked lists: RRF parity with ranx, weighted fusion, ties, missing documents."""

from __future__ import annotations

import math
import random

import pytest

from serve_app.config import FusionConfig
from serve_app.retrieval.fusion import (
    FusedHit,
    fuse,
    normalize_scores,
    reciprocal_rank_fusion,
    weighted_score_fusion,
)
from serve_app.types import Hit


def hits(*pairs: tuple[str, float]) -> list[Hit]:
    return [Hit(d, s) for d, s in pairs]


def random_runs(rng: random.Random, n_queries: int, pool: int, depth: int) -> list[dict[str, dict[str, list[Hit]]]]:
    """Per query, two retriever lists over an overlapping pool with distinct scores."""
    out = []
    for _ in range(n_queries):
        per = {}
        for name in ("bm25", "dense"):
            docs = rng.sample([f"d{i}" for i in range(pool)], depth)
            scores = sorted(rng.sample(range(1, 100_000), depth), reverse=True)
            per[name] = [Hit(d, s / 100.0) for d, s in zip(docs, scores)]
        out.append(per)
    return out


def to_ranx(queries: list[dict[str, list[Hit]]], name: str):
    from ranx import Run

    return Run({f"q{i}": {h.doc_id: h.score for h in q[name]} for i, q in enumerate(queries)}, name=name)


def test_rrf_matches_ranx_on_random_runs():
    from ranx import fuse as ranx_fuse

    rng = random.Random(7)
    queries = random_runs(rng, n_queries=25, pool=40, depth=15)
    for k in (1, 60):
        reference = ranx_fuse([to_ranx(queries, "bm25"), to_ranx(queries, "dense")], norm=None, method="rrf", params={"k": k})
        ref = reference.to_dict()
        for i, q in enumerate(queries):
            ours = reciprocal_rank_fusion(q, k=k)
            expected = ref[f"q{i}"]
            assert {h.doc_id for h in ours} == set(expected)
            for h in ours:
                assert h.score == pytest.approx(expected[h.doc_id], rel=1e-12)
            # Our order is non-increasing in the reference's scores (ties may be ordered differently).
            ref_scores = [expected[h.doc_id] for h in ours]
            assert all(a >= b - 1e-12 for a, b in zip(ref_scores, ref_scores[1:]))


def test_weighted_minmax_matches_ranx_wsum():
    from ranx import fuse as ranx_fuse

    rng = random.Random(3)
    queries = random_runs(rng, n_queries=20, pool=30, depth=10)
    weights = {"bm25": 0.3, "dense": 0.7}
    reference = ranx_fuse(
        [to_ranx(queries, "bm25"), to_ranx(queries, "dense")], norm="min-max", method="wsum", params={"weights": [0.3, 0.7]}
    ).to_dict()
    for i, q in enumerate(queries):
        ours = {h.doc_id: h.score for h in weighted_score_fusion(q, weights, "minmax")}
        assert set(ours) == set(reference[f"q{i}"])
        for d, s in ours.items():
            assert s == pytest.approx(reference[f"q{i}"][d], abs=1e-9)


def test_rrf_provenance_and_missing_document():
    ranked = {"bm25": hits(("a", 9.0), ("b", 5.0)), "dense": hits(("b", 0.9), ("c", 0.8))}
    fused = reciprocal_rank_fusion(ranked, k=60)
    by_id = {h.doc_id: h for h in fused}
    assert [h.doc_id for h in fused][0] == "b"  # in both lists
    assert by_id["b"].ranks == {"bm25": 2, "dense": 1}
    assert by_id["b"].scores == {"bm25": 5.0, "dense": 0.9}
    assert by_id["b"].score == pytest.approx(1 / 62 + 1 / 61)
    assert by_id["a"].ranks == {"bm25": 1} and "dense" not in by_id["a"].scores
    assert by_id["c"].ranks == {"dense": 2}
    assert by_id["a"].score == pytest.approx(1 / 61)


def test_rrf_deduplicates_within_a_list_keeping_first():
    fused = reciprocal_rank_fusion({"bm25": hits(("a", 3.0), ("b", 2.0), ("a", 1.0))}, k=10)
    assert [h.doc_id for h in fused] == ["a", "b"]
    assert fused[0].ranks == {"bm25": 1} and fused[0].scores == {"bm25": 3.0}
    assert fused[1].ranks == {"bm25": 2}


def test_ties_broken_by_best_rank_then_doc_id():
    # x: rank 1 in bm25 only; y: rank 1 in dense only -> equal RRF score and best rank: doc_id decides.
    # z and w: rank 2 in one list each -> below; w < z alphabetically.
    ranked = {"dense": hits(("y", 1.0), ("z", 0.5)), "bm25": hits(("x", 1.0), ("w", 0.5))}
    fused = reciprocal_rank_fusion(ranked)
    assert [h.doc_id for h in fused] == ["x", "y", "w", "z"]
    # Same inputs, retrievers in the other order: identical output.
    swapped = reciprocal_rank_fusion({"bm25": ranked["bm25"], "dense": ranked["dense"]})
    assert fused == swapped


def test_rrf_sums_are_order_independent_with_three_lists():
    # Three contributions whose naive float sums differ with the order; fsum makes them equal.
    ranked = {
        "a": hits(("p", 1), ("q", 1), ("r", 1)),
        "b": hits(("q", 1), ("r", 1), ("p", 1)),
        "c": hits(("r", 1), ("p", 1), ("q", 1)),
    }
    fused = reciprocal_rank_fusion(ranked, k=1)
    assert len({h.score for h in fused}) == 1
    assert [h.doc_id for h in fused] == ["p", "q", "r"]


def test_limit_and_empty_inputs():
    ranked = {"bm25": hits(("a", 3.0), ("b", 2.0), ("c", 1.0))}
    assert [h.doc_id for h in reciprocal_rank_fusion(ranked, limit=2)] == ["a", "b"]
    assert reciprocal_rank_fusion(ranked, limit=0) == []
    assert reciprocal_rank_fusion({}) == []
    assert reciprocal_rank_fusion({"bm25": [], "dense": []}) == []
    assert weighted_score_fusion({"bm25": []}, {"bm25": 1.0}) == []
    with pytest.raises(ValueError, match="limit"):
        reciprocal_rank_fusion(ranked, limit=-1)
    with pytest.raises(ValueError, match="k must be"):
        reciprocal_rank_fusion(ranked, k=0)


def test_minmax_constant_scores_do_not_divide_by_zero():
    values, floor = normalize_scores([2.5, 2.5, 2.5], "minmax")
    assert values == [1.0, 1.0, 1.0] and floor == 0.0
    values, floor = normalize_scores([4.0], "minmax")
    assert values == [1.0]
    fused = weighted_score_fusion(
        {"bm25": hits(("a", 2.0), ("b", 2.0)), "dense": hits(("b", 0.9), ("c", 0.1))}, {"bm25": 0.5, "dense": 0.5}
    )
    assert all(math.isfinite(h.score) for h in fused)
    by_id = {h.doc_id: h.score for h in fused}
    assert by_id == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.0})
    assert [h.doc_id for h in fused] == ["b", "a", "c"]


def test_zscore_normalisation_and_missing_floor():
    values, floor = normalize_scores([3.0, 1.0], "zscore")
    assert values == pytest.approx([1.0, -1.0]) and floor == pytest.approx(-1.0)
    assert normalize_scores([5.0, 5.0], "zscore") == ([0.0, 0.0], 0.0)
    fused = weighted_score_fusion(
        {"bm25": hits(("a", 3.0), ("b", 1.0)), "dense": hits(("c", 0.7), ("a", 0.1))}, {"bm25": 1.0, "dense": 2.0}, "zscore"
    )
    by_id = {h.doc_id: h.score for h in fused}
    # b is missing from dense: gets dense's floor (-1); c is missing from bm25: gets bm25's floor (-1).
    assert by_id == pytest.approx({"a": 1.0 + 2.0 * -1.0, "b": -1.0 + 2.0 * -1.0, "c": -1.0 + 2.0 * 1.0})
    assert [h.doc_id for h in fused] == ["c", "a", "b"]


def test_weighted_fusion_validates_weights():
    ranked = {"bm25": hits(("a", 1.0)), "dense": hits(("a", 1.0))}
    with pytest.raises(ValueError, match="no weight for retriever 'dense'"):
        weighted_score_fusion(ranked, {"bm25": 1.0})
    with pytest.raises(ValueError, match="'bm25' must be a finite number >= 0"):
        weighted_score_fusion(ranked, {"bm25": -1.0, "dense": 1.0})
    with pytest.raises(ValueError, match="normalization"):
        weighted_score_fusion(ranked, {"bm25": 1.0, "dense": 1.0}, "softmax")  # type: ignore[arg-type]
    # Weights of retrievers not in the request are ignored.
    assert [h.doc_id for h in weighted_score_fusion({"bm25": ranked["bm25"]}, {"bm25": 1.0, "dense": 1.0})] == ["a"]


def test_fuse_dispatches_on_config():
    ranked = {"bm25": hits(("a", 10.0), ("b", 9.9)), "dense": hits(("b", 0.9), ("a", 0.1))}
    rrf = fuse(ranked, FusionConfig(method="rrf", rrf_k=5))
    assert rrf == reciprocal_rank_fusion(ranked, k=5)
    weighted = fuse(ranked, FusionConfig(method="weighted", weights={"bm25": 1.0, "dense": 2.0}), limit=1)
    assert weighted == weighted_score_fusion(ranked, {"bm25": 1.0, "dense": 2.0}, limit=1)
    assert [h.doc_id for h in weighted] == ["b"]  # minmax: a = 1*1 + 2*0, b = 1*0 + 2*1
    # Equal weights tie a and b (1.0 each, both ranked first once): doc_id decides.
    tied = fuse(ranked, FusionConfig(method="weighted", weights={"bm25": 1.0, "dense": 1.0}))
    assert [h.doc_id for h in tied] == ["a", "b"]


def test_fused_hit_best_rank():
    assert FusedHit("d", 0.1, {"bm25": 4, "dense": 2}, {"bm25": 1.0, "dense": 0.5}).best_rank == 2
