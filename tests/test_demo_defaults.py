"""The demo ships the rerank settings its measurement chose (benchmarks/demo_defaults.py)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.demo_defaults import choose, parse_row
from serve_app.serve.commands import DEMO_RERANK, demo_config

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "demo_defaults" / "demo_defaults.json"


def test_the_shipped_demo_settings_are_the_measured_choice():
    payload = json.loads(RESULTS.read_text())
    chosen = payload["results"]["chosen"]
    assert DEMO_RERANK == {"rerank_top_m": chosen["rerank_top_m"], "rerank_blend": chosen["rerank_blend"]}
    assert chosen == choose(payload["results"]["train"])  # the recorded choice follows the rule from the recorded figures
    train = payload["results"]["train"]
    assert train[chosen["row"]]["nDCG@10"] >= train["hybrid"]["nDCG@10"]
    # shipped: no worse than hybrid alone on the held-out test queries
    test = payload["results"]["test"]
    assert test[chosen["row"]]["nDCG@10"] >= test["hybrid"]["nDCG@10"]


def test_the_choice_rule_on_hand_made_figures():
    train = {
        "hybrid": {"nDCG@10": 0.80},
        "hybrid+rerank@50": {"nDCG@10": 0.70},
        "hybrid+rerank@50 (rrf blend)": {"nDCG@10": 0.85},
        "hybrid+rerank@20 (rrf blend)": {"nDCG@10": 0.85},
    }
    assert choose(train) == {"row": "hybrid+rerank@20 (rrf blend)", "rerank_top_m": 20, "rerank_blend": "rrf"}  # a tie goes to less work
    worse = {"hybrid": {"nDCG@10": 0.80}, "hybrid+rerank@50": {"nDCG@10": 0.70}}
    assert choose(worse) == {"row": "hybrid", "rerank_top_m": 0, "rerank_blend": "none"}
    # a win inside the margin is no win: the reranker was trained on these queries
    barely = {"hybrid": {"nDCG@10": 0.980}, "hybrid+rerank@50 (rrf blend)": {"nDCG@10": 0.982}}
    assert choose(barely)["row"] == "hybrid" and choose(barely, margin=0.001)["row"] == "hybrid+rerank@50 (rrf blend)"
    assert parse_row("hybrid+rerank@100") == (100, "none") and parse_row("hybrid+rerank@10 (rrf blend)") == (10, "rrf")


def test_demo_config_applies_the_settings_only_to_the_demo_reranker():
    own = demo_config(host="127.0.0.1", port=8000, index_dir="/x", reranker_model="/models/demo", demo_reranker=True)["applications"][0]["args"]
    assert own["fusion"]["rerank_blend"] == DEMO_RERANK["rerank_blend"] and own["funnel"]["default_rerank_top_m"] == DEMO_RERANK["rerank_top_m"]
    other = demo_config(host="127.0.0.1", port=8000, index_dir="/x", reranker_model="/models/mine")["applications"][0]["args"]
    assert "fusion" not in other and "funnel" not in other
