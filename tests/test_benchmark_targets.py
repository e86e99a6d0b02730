"""The targets table of benchmarks/README.md is generated from the results files, and stays so."""

from __future__ import annotations

import json

import pytest

from benchmarks import targets
from benchmarks.targets import Target, TargetsError, row, table


def write_run(root, rel, started, lines, results=None, repeats=2):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "benchmark": path.stem, "started": started, "git_commit": "abc1234", "args": {"repeats": repeats},
        "machine": {"loadavg": [0.5, 0.5, 0.5]}, "targets": lines, "results": results or {},
    }))
    return path


def line(name, value, goal, met, higher=True):
    return {"name": name, "value": value, "target": goal, "unit": "x", "higher_is_better": higher, "met": met}


def test_the_committed_table_is_what_the_results_files_say():
    readme = targets.README.read_text()
    assert targets.render(readme, table()) == readme, "run: python -m benchmarks.targets"
    assert targets.main(["--check"]) == 0


def test_a_figure_without_a_results_file_fails(tmp_path):
    with pytest.raises(TargetsError, match="no results file"):
        row(Target("9", "a claim", ("nothing/here.json",), lines=""), tmp_path)
    with pytest.raises(TargetsError, match="names no results file"):
        row(Target("9", "a claim with a number but no file"), tmp_path)
    # a results file that lacks the target's lines does not stand in for it
    write_run(tmp_path, "bench/bench.json", "2026-01-01T00:00:00", [line("other figure", 2.0, 1.0, True)])
    with pytest.raises(TargetsError, match="no results file"):
        row(Target("9", "claim", ("bench/bench.json",), lines="the figure"), tmp_path)
    # a reported figure the file does not hold
    with pytest.raises(TargetsError, match="lacks the figure"):
        row(Target("9", "claim", ("bench/bench.json",), reported=lambda r: f"{r['missing']:.2f}"), tmp_path)


def test_the_newest_run_gives_the_figures_and_its_own_verdict(tmp_path):
    write_run(tmp_path, "peers/peers.json", "2026-01-01T10:00:00", [line("a vs b, N=16", 1.06, 1.0, True)])
    write_run(tmp_path, "peers/later/peers.json", "2026-01-02T10:00:00", [line("a vs b, N=16", 0.94, 1.0, False)], repeats=3)
    cells = row(Target("1", "a >= 1.0x b", ("peers/peers.json", "peers/*/peers.json"), lines="a vs b"), tmp_path)
    assert "0.94x" in cells[2] and cells[3].startswith("missed") and "repeats 3" in cells[4] and "peers/later/peers.json" in cells[5]
    # the older, met run alone
    cells = row(Target("1", "a >= 1.0x b", ("peers/peers.json",), lines="a vs b"), tmp_path)
    assert "1.06x" in cells[2] and cells[3] == "met" and "2026-01-01 10:00" in cells[4]


def test_declared_unmeasured_rows_and_caveats(tmp_path):
    cells = row(Target("8", "GPU claim", not_measured="no GPU"), tmp_path)
    assert cells[2] == "not measured" and "no GPU" in cells[3]
    write_run(tmp_path, "slo/slo.json", "2026-01-01T00:00:00", [line("p95 / objective", 0.9, 1.0, True, higher=False)])
    cells = row(Target("10", "SLO", ("slo/slo.json",), lines="", caveat="nothing could be shed"), tmp_path)
    assert cells[3].startswith("met (but: nothing could be shed")
    # single-run benchmarks say so whatever their parser recorded
    write_run(tmp_path, "score_cache/score_cache.json", "2026-01-01T00:00:00", [line("cache on / off", 2.4, 2.0, True)], repeats=3)
    assert "repeats 1" in row(Target("11", "cache", ("score_cache/score_cache.json",), lines="cache"), tmp_path)[4]


def test_render_needs_the_markers():
    with pytest.raises(TargetsError):
        targets.render("no markers here", "| table |\n")
    text = f"before\n{targets.START}\nold\n{targets.END}\nafter\n"
    assert targets.render(text, "new\n") == f"before\n{targets.START}\nnew\n{targets.END}\nafter\n"
