"""``serve-app demo --once`` and ``serve-app serve --config deployments.yaml --once`` end to end.

Each runs the command in a subprocess with its own local Ray instance (tiny models through the
documented environment overrides, so no download and no training), and checks what a user sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from serve_fakes import small_corpus

from serve_app.corpus import write_documents_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.serve]

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], env_extra: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "serve_app.cli", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def model_env(tiny_cross_encoder_dir, tiny_bi_encoder_dir) -> dict[str, str]:
    return {"SERVE_APP_RERANKER_MODEL": str(tiny_cross_encoder_dir), "SERVE_APP_DENSE_MODEL": str(tiny_bi_encoder_dir)}


def test_demo_once_builds_the_index_and_answers_the_example(tmp_path, model_env):
    index_dir = tmp_path / "demo-index"
    port = free_port()
    proc = run_cli(["demo", "--once", "--port", str(port), "--index-dir", str(index_dir), "--replica-cpus", "0.1", "--num-cpus", "2"], model_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert (index_dir / "manifest.json").is_file()
    assert f"curl -s -X POST http://127.0.0.1:{port}/search" in out
    assert "Answer (top 5" in out and "1. [d" in out  # demo document ids look like d0001
    assert "degraded=False" in out


def test_serve_runs_deployments_yaml(tmp_path, model_env):
    """The repository's deployments.yaml, with only the paths changed, fits a 2-CPU local instance."""
    port = free_port()
    proc = run_cli(["serve", "--config", str(_yaml_for(tmp_path)), "--once", "--port", str(port), "--num-cpus", "2"], model_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"GET http://127.0.0.1:{port}/healthz -> 200" in proc.stdout
    assert (tmp_path / "index" / "manifest.json").is_file()


def _yaml_for(tmp_path: Path) -> Path:
    """The repository's deployments.yaml with the index and corpus paths moved under ``tmp_path``."""
    raw = yaml.safe_load((REPO_ROOT / "deployments.yaml").read_text())
    app = raw["applications"][0]
    corpus = tmp_path / "corpus.jsonl"
    write_documents_jsonl(small_corpus(30), corpus)
    app["args"]["index_dir"] = str(tmp_path / "index")
    app["args"]["corpus"] = str(corpus)
    config = tmp_path / "deployments.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def test_serve_throughput_optimized_answers_through_the_proxy_and_the_ingress_replica(tmp_path, model_env):
    """``--throughput-optimized``: Serve's gRPC + direct-ingress mode; both HTTP paths give the same
    answers and the same error envelope, and the replica's own port is on 127.0.0.1."""
    import re
    import signal
    import time

    import httpx

    port = free_port()
    env = dict(os.environ, **model_env, HF_HUB_OFFLINE="1", RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "serve_app.cli", "serve", "--config", str(_yaml_for(tmp_path)), "--port", str(port), "--num-cpus", "2", "--throughput-optimized"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 600
        direct = None
        while direct is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            lines.append(line)
            m = re.search(r"direct ingress \(the ingress replica itself, no proxy\): (http://\S+)", line)
            direct = m.group(1) if m else None
        assert direct, "".join(lines)[-3000:]
        assert direct.startswith("http://127.0.0.1:") and not direct.endswith(f":{port}")
        proxy = f"http://127.0.0.1:{port}"
        body = {"query": "what helps plants grow", "top_n": 3}
        answers = {}
        for base in (proxy, direct):
            r = httpx.post(base + "/search", json=body, timeout=120)
            assert r.status_code == 200, r.text
            answers[base] = [hit["id"] for hit in r.json()["results"]]
            bad = httpx.post(base + "/search", json={"query": "x", "top_n": "many"}, timeout=60)
            assert bad.status_code == 422
            assert bad.json()["error"]["type"] == "validation_error"
        assert answers[proxy] == answers[direct] and len(answers[proxy]) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_throughput_optimized_is_refused_for_an_existing_cluster(tmp_path):
    """Serve reads the mode when its processes start, so it cannot be switched on when joining a cluster."""
    proc = run_cli(["serve", "--config", str(REPO_ROOT / "deployments.yaml"), "--address", "auto", "--throughput-optimized", "--once"], {}, timeout=120)
    assert proc.returncode != 0
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_rejects_an_invalid_config_before_starting_ray(tmp_path):
    raw = yaml.safe_load((REPO_ROOT / "deployments.yaml").read_text())
    raw["applications"][0]["args"]["timeouts"]["rerank_timeout_s"] = -1
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = run_cli(["serve", "--config", str(config), "--once"], {}, timeout=120)
    assert proc.returncode == 2
    assert "timeouts.rerank_timeout_s" in proc.stderr
    assert "Traceback" not in proc.stderr
