"""Evaluation through ir-measures: parity with pytrec_eval, perfect/empty runs, run conversion, reports."""

from __future__ import annotations

import json
import random

import pytest

from serve_app.eval import evaluate, markdown_table, run_from_results, write_report
from serve_app.retrieval.fusion import FusedHit
from serve_app.types import Hit


def toy_data(seed: int = 0):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(30)]
    qrels, run = {}, {}
    for q in range(12):
        qid = f"q{q}"
        qrels[qid] = {d: rng.choice([1, 1, 2]) for d in rng.sample(docs, 3)}
        qrels[qid][rng.choice(docs)] = 0  # a judged non-relevant document
        # Ten documents (RR@10 == reciprocal rank), distinct scores.
        run[qid] = {d: float(s) for d, s in zip(rng.sample(docs, 10), rng.sample(range(1000), 10))}
    return qrels, run


def test_matches_pytrec_eval_directly():
    import pytrec_eval

    qrels, run = toy_data()
    ours = evaluate(run, qrels)
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "recip_rank"})
    per_query = evaluator.evaluate(run)
    assert set(per_query) == set(qrels)
    mean = lambda key: sum(v[key] for v in per_query.values()) / len(per_query)  # noqa: E731
    assert ours["nDCG@10"] == pytest.approx(mean("ndcg_cut_10"), abs=1e-9)
    assert ours["R@100"] == pytest.approx(mean("recall_100"), abs=1e-9)
    assert ours["RR@10"] == pytest.approx(mean("recip_rank"), abs=1e-9)
    assert 0.0 < ours["nDCG@10"] < 1.0


def test_perfect_and_empty_runs():
    qrels = {"q1": {"a": 1, "b": 1, "z": 0}, "q2": {"c": 2}}
    perfect = {"q1": {"a": 2.0, "b": 1.0}, "q2": {"c": 1.0}}
    assert evaluate(perfect, qrels) == {"nDCG@10": 1.0, "R@100": 1.0, "RR@10": 1.0}
    assert evaluate({}, qrels) == {"nDCG@10": 0.0, "R@100": 0.0, "RR@10": 0.0}
    useless = {"q1": {"x": 1.0, "z": 0.5}, "q2": {"y": 3.0}}
    assert evaluate(useless, qrels) == {"nDCG@10": 0.0, "R@100": 0.0, "RR@10": 0.0}


def test_missing_query_counts_as_zero_and_unjudged_query_is_ignored():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    assert evaluate({"q1": {"a": 1.0}}, qrels)["RR@10"] == pytest.approx(0.5)
    assert evaluate({"q1": {"a": 1.0}, "q2": {"b": 1.0}, "q9": {"x": 1.0}}, qrels)["RR@10"] == 1.0


def test_custom_measures_and_bad_names():
    qrels = {"q1": {"a": 1, "b": 1}}
    run = {"q1": {"x": 3.0, "a": 2.0, "b": 1.0}}
    out = evaluate(run, qrels, measures=("P@1", "R@2", "RR@10"))
    assert list(out) == ["P@1", "R@2", "RR@10"]
    assert out == pytest.approx({"P@1": 0.0, "R@2": 0.5, "RR@10": 0.5})
    with pytest.raises(ValueError, match="unknown evaluation measure 'nDCG@@10'"):
        evaluate(run, qrels, measures=("nDCG@@10",))
    with pytest.raises(ValueError, match="qrels are empty"):
        evaluate(run, {})


def test_run_from_results_keeps_the_given_order():
    # Scores that are tied or not monotone would be re-sorted by trec_eval; ranks are kept instead.
    ranking = [FusedHit("b", 0.1), FusedHit("a", 0.1), FusedHit("c", 5.0), FusedHit("b", 9.0)]
    run = run_from_results({"q1": ranking, "q2": [Hit("x", 1.0)]})
    assert run == {"q1": {"b": 3.0, "a": 2.0, "c": 1.0}, "q2": {"x": 1.0}}
    qrels = {"q1": {"b": 1}}
    assert evaluate(run, qrels)["RR@10"] == 1.0


def test_write_report(tmp_path):
    results = {"bm25": {"nDCG@10": 0.66512, "R@100": 0.9}, "dense": {"nDCG@10": 0.64, "R@100": 0.93}}
    write_report(results, tmp_path / "out" / "m.json", tmp_path / "out" / "m.md", meta={"dataset": "toy", "split": "test"})
    payload = json.loads((tmp_path / "out" / "m.json").read_text())
    assert payload == {"meta": {"dataset": "toy", "split": "test"}, "results": results}
    md = (tmp_path / "out" / "m.md").read_text()
    assert "- dataset: toy" in md
    assert "| system | nDCG@10 | R@100 |" in md
    assert "| bm25 | 0.6651 | 0.9000 |" in md
    assert markdown_table({"a": {"x": 1.0}, "b": {"y": 0.5}}).splitlines()[2:] == ["| a | 1.0000 |  |", "| b |  | 0.5000 |"]


# --------------------------------------------------------------------------- fidelity


def test_query_fidelity_on_hand_made_rankings():
    from serve_app.eval import query_fidelity

    ref = [f"d{i}" for i in range(10)]
    assert query_fidelity(ref, ref) == (1.0, 1.0)
    # the same ten documents, reversed: everything kept, order inverted
    assert query_fidelity(ref[::-1], ref) == (1.0, pytest.approx(-1.0))
    # one adjacent swap among ten: 1 discordant pair of 45 -> tau = (44 - 1) / 45
    swapped = ref[:]
    swapped[3], swapped[4] = swapped[4], swapped[3]
    assert query_fidelity(swapped, ref) == (1.0, pytest.approx(43 / 45))
    # two of the reference's ten replaced by outsiders: 0.8 overlap, tau below the swap's
    lost = ref[:8] + ["x1", "x2"]
    o, t = query_fidelity(lost, ref)
    assert o == pytest.approx(0.8) and 0.0 < t < 1.0
    # documents beyond the first k do not count, whatever their order
    assert query_fidelity(ref + ["y"], ref + ["z"], k=10) == (1.0, 1.0)
    assert query_fidelity(["x", "y", "z"] + ref, ref, k=3)[0] == 0.0
    # nothing of the answer kept
    assert query_fidelity([f"n{i}" for i in range(10)], ref) == (0.0, 0.0)
    # a short reference: overlap over what it has
    assert query_fidelity(["a", "q"], ["a", "b"], k=10)[0] == 0.5
    assert query_fidelity(["z", "a"], ["a"], k=10) == (1.0, 1.0) and query_fidelity(["z"], ["a"], k=10) == (0.0, 0.0)
    with pytest.raises(ValueError):
        query_fidelity(ref, [], k=10)
    with pytest.raises(ValueError):
        query_fidelity(ref, ref, k=0)


def test_query_fidelity_tau_matches_scipy_on_random_lists():
    from scipy.stats import kendalltau

    from serve_app.eval import query_fidelity

    rng = random.Random(3)
    for _ in range(50):
        ref = rng.sample(range(40), 10)
        mine = rng.sample(range(40), 15)
        pos = {d: i for i, d in enumerate(mine[:10])}
        expected = kendalltau(range(10), [pos.get(d, 10) for d in ref]).statistic
        o, t = query_fidelity([str(d) for d in mine], [str(d) for d in ref])
        assert o == len(set(ref) & set(mine[:10])) / 10
        if len({pos.get(d, 10) for d in ref}) > 1:
            assert t == pytest.approx(expected)


def test_run_fidelity_averages_over_the_reference_queries_and_orders_by_score():
    from serve_app.eval import fidelity, ranked_ids

    reference = {"q1": {"a": 3.0, "b": 2.0, "c": 1.0}, "q2": {"d": 2.0, "e": 1.0}, "q3": {}}
    assert ranked_ids({"b": 1.0, "a": 1.0, "c": 2.0}) == ["c", "a", "b"]  # ties by doc id, as trec_eval
    same = {"q1": {"a": 30.0, "b": 20.0, "c": 10.0}, "q2": {"d": 1.0, "e": 0.5}}
    assert fidelity(same, reference, k=3) == {"overlap@3": 1.0, "kendall_tau@3": 1.0}
    # q2 missing from the run scores 0; q3 (no reference ranking) is not averaged
    half = {"q1": {"a": 3.0, "b": 2.0, "c": 1.0}}
    assert fidelity(half, reference, k=3) == {"overlap@3": 0.5, "kendall_tau@3": 0.5}
    with pytest.raises(ValueError):
        fidelity(same, {"q": {}}, k=3)


def test_trec_run_round_trip(tmp_path):
    from serve_app.eval import read_trec_run, write_trec_run

    run = {"q1": {"a": 3.0, "b": 2.0}, "q2": {"c": 1.0}}
    assert read_trec_run(write_trec_run(run, tmp_path / "r.trec", "x")) == run
