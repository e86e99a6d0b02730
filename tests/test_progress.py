"""Long jobs report progress in logs too (serve_app.progress): lines with rate and time left at a
steady interval when the stream is not a terminal, tqdm's bar on a terminal."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from serve_app.progress import LineProgress, interval_from_env, is_terminal, progress


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_lines_come_at_the_interval_with_rate_and_time_left():
    clock, out = Clock(), io.StringIO()
    bar = progress(1000, "encoding", "text", stream=out, interval_s=30, clock=clock)
    assert isinstance(bar, LineProgress)
    for _ in range(100):  # 10 texts a second for 100 s
        clock.t += 1.0
        bar.update(10)
    bar.set_postfix(loss="0.1234")
    clock.t += 0.5
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # at 30, 60 and 90 s, then the last one
    assert lines[0] == "encoding: 300/1000 texts (30%), 10.00 texts/s, about 1 min 10 s left"
    assert lines[2].startswith("encoding: 900/1000 texts (90%), 10.00 texts/s, about 10 s left")
    assert re.fullmatch(r"encoding: done, 1000 texts in 1 min 40 s \(9\.95 texts/s\), loss 0\.1234", lines[3]), lines[3]
    bar.close()
    assert len(out.getvalue().splitlines()) == 4  # closed once


def test_a_resumed_job_counts_its_rate_from_where_it_resumed():
    clock, out = Clock(), io.StringIO()
    bar = LineProgress(100, "training", "step", initial=50, stream=out, interval_s=10, clock=clock)
    clock.t = 10.0
    bar.update(10)
    assert out.getvalue().strip() == "training: 60/100 steps (60%), 1.00 steps/s, about 40 s left"


def test_a_terminal_gets_the_bar_and_disabled_gets_nothing():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    assert is_terminal(tty) and not is_terminal(io.StringIO())
    bar = progress(10, "training", "step", stream=tty)
    from tqdm import tqdm

    assert isinstance(bar, tqdm)
    bar.update(10)
    bar.close()
    assert "training" in tty.getvalue() and "10/10" in tty.getvalue()
    silent, quiet = progress(10, "training", "step", enabled=False, stream=io.StringIO()), io.StringIO()
    silent.update(5)
    silent.close()
    assert quiet.getvalue() == ""


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("SERVE_APP_PROGRESS_INTERVAL_S", raising=False)
    assert interval_from_env() == 30.0
    monkeypatch.setenv("SERVE_APP_PROGRESS_INTERVAL_S", "2.5")
    assert interval_from_env() == 2.5
    for bad in ("soon", "-1"):
        monkeypatch.setenv("SERVE_APP_PROGRESS_INTERVAL_S", bad)
        with pytest.raises(ValueError, match="SERVE_APP_PROGRESS_INTERVAL_S"):
            interval_from_env()


@pytest.mark.slow
def test_serve_app_index_logs_progress_when_its_output_is_a_file(tmp_path, tiny_bi_encoder_dir):
    """`serve-app index` with its output redirected (as in CI or nohup) writes progress lines."""
    from serve_app.corpus import write_documents_jsonl
    from serve_app.types import Document

    corpus = tmp_path / "corpus.jsonl"
    write_documents_jsonl([Document(f"d{i}", f"document number {i} about protein and gene {i % 7}") for i in range(300)], corpus)
    env = {**os.environ, "SERVE_APP_PROGRESS_INTERVAL_S": "0", "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "serve_app.cli", "index", "--corpus", str(corpus), "--out", str(tmp_path / "index"), "--dense-model", str(tiny_bi_encoder_dir), "--dense-batch-size", "16"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300)
    text = (tmp_path / "log").read_text()
    assert done.returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("encoding: ")]
    assert len(lines) >= 3, text[-3000:]
    assert re.search(r"encoding: \d+/300 texts \(\d+%\), [\d.]+ texts/s, about .+ left", lines[0]), lines[0]
    assert re.search(r"encoding: done, 300 texts in .+ \([\d.]+ texts/s\)", lines[-1]), lines[-1]
    assert not [part for part in text.split("\n") if "encoding:" in part and "\r" in part]  # plain lines, no bar redrawn
