"""Retrieval quality on the real BEIR SciFact test split (BM25 only: the dense encode is too slow for CI)."""

from __future__ import annotations

import json

import pytest

from serve_app import cli


@pytest.mark.slow
@pytest.mark.scifact
def test_bm25_scifact_test_quality(scifact_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("serve_app.commands.core",))
    rc = cli.main(["eval", "--dataset", str(scifact_dir), "--split", "test", "--pipeline", "bm25", "--work-dir", str(tmp_path), "-q"])
    assert rc == 0
    payload = json.loads((tmp_path / "results" / "scifact-test" / "metrics.json").read_text())
    metrics = payload["results"]["bm25"]
    assert payload["meta"]["queries"] == 300 and payload["meta"]["documents"] == 5183
    # Published BM25 on SciFact is ~0.665-0.69 nDCG@10 depending on tokenisation.
    assert metrics["nDCG@10"] >= 0.66, metrics
    assert metrics["R@100"] >= 0.88, metrics
    assert metrics["RR@10"] >= 0.60, metrics
    assert "| bm25 |" in capsys.readouterr().out
