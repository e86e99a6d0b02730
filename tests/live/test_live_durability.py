"""kill -9 of the writer during write batches and during merges, repeated: every acknowledged
write is there after a restart, every logged batch is whole, and the index loads."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve_app.config import BM25Config, ChunkingConfig, WritesConfig

REPO = Path(__file__).resolve().parents[2]


def _kill_after(index_dir: Path, run: str, seconds: float, merge_every: int = 0) -> list[dict]:
    """Run the writer process for ``seconds`` (after it printed its first acknowledgement), SIGKILL it, return what it acknowledged."""
    args = [sys.executable, "-m", "tests.live.crash_writer", str(index_dir), run] + (["--merge-every", str(merge_every)] if merge_every else [])
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines: list[str] = []
    first = proc.stdout.readline()
    assert first, "the writer process printed nothing"
    lines.append(first.decode())
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    lines += out.decode().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]  # a line cut by the kill is not an acknowledgement


def _check(index_dir: Path, acked: list[dict]) -> None:
    from serve_app.index import load_index
    from serve_app.live.writer import DocumentWriter

    load_index(index_dir, verify_checksums=True)  # the base (old or merged) is whole
    w = DocumentWriter(index_dir, WritesConfig())  # restarts: finishes a half-recorded merge
    try:
        state: dict[str, bool] = {}
        for a in acked:
            if a["op"] in ("upsert", "delete"):
                for i in a["ids"]:
                    state[i] = a["op"] == "upsert"
        missing = [i for i, live in state.items() if live and w.get(i) is None]
        resurrected = [i for i, live in state.items() if not live and w.get(i) is not None]
        assert not missing, f"acknowledged writes lost: {missing[:5]}"
        assert not resurrected, f"acknowledged deletes undone: {resurrected[:5]}"
        for b in w.log.batches_since(w.base_seq):  # every logged batch is whole: 20 upserts or 10 deletes
            ops = {c.op for c in b.changes}
            assert (ops, len(b.changes)) in (({"upsert"}, 20), ({"delete"}, 10)), (b.seq, ops, len(b.changes))
    finally:
        w.close()


@pytest.mark.slow
def test_kill_9_during_writes_loses_no_acknowledged_write(tmp_path):
    from tests.live.conftest import build, docs

    idx = build(tmp_path / "idx", docs(60), None)
    rng = random.Random(0)
    acked: list[dict] = []
    for run in range(6):
        got = _kill_after(idx, f"r{run}", rng.uniform(0.05, 0.6))
        assert any(a["op"] == "upsert" for a in got)
        acked += got
        _check(idx, acked)


@pytest.mark.slow
@pytest.mark.scifact
def test_kill_9_during_merges_leaves_a_loadable_index_and_every_acknowledged_write(tmp_path, scifact_dir):
    from serve_app.corpus import load_beir
    from serve_app.index import build_index

    corpus = list(load_beir(scifact_dir, "test").corpus)
    idx = tmp_path / "idx"
    build_index(corpus, idx, bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), show_progress=False)
    rng = random.Random(1)
    acked: list[dict] = []
    killed_in_merge = 0
    for run in range(5):
        got = _kill_after(idx, f"m{run}", rng.uniform(0.5, 4.0), merge_every=3)
        acked += got
        ops = [a["op"] for a in got]
        killed_in_merge += bool(ops) and ops[-1] == "merge-start"
        _check(idx, acked)
    assert any(a["op"] == "merged" for a in acked), "no merge completed: the kills came too early to test anything"
    assert killed_in_merge >= 1, "no kill landed inside a merge"
