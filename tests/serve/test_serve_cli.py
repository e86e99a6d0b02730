"""``serve-app demo --once`` and ``serve-app serve --config deployments.yaml --once`` end to end.

Each runs the command in a subprocess with its own local Ray instance (tiny models through the
documented environment overrides, so no download and no training), and checks what a user sees.
"""

from __future__ import annotations

import os
import re
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


class Running:
    """A long-running ``serve-app`` command: its output lines as they come, the processes it started."""

    def __init__(self, args: list[str], env_extra: dict[str, str]) -> None:
        env = dict(os.environ, **env_extra, HF_HUB_OFFLINE="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "serve_app.cli", *args], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []

    def wait_for(self, pattern: str, timeout_s: float = 600) -> "re.Match[str]":
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            line = self.proc.stdout.readline()
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        pytest.fail(f"no line matching {pattern!r}; output:\n{self.output()[-4000:]}")

    def output(self) -> str:
        return "".join(self.lines)

    def descendants(self) -> list:
        import psutil

        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, sig: int, timeout_s: float) -> tuple[int, float]:
        """Send ``sig``; (exit status, seconds it took), the rest of the output read."""
        import time

        t0 = time.monotonic()
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=timeout_s)
        self.lines.append(out)
        return self.proc.returncode, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def assert_gone(processes: list, timeout_s: float = 60) -> None:
    """Every process in ``processes`` (Ray's: raylet, GCS, dashboard, agents, workers) has exited."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in alive]


def test_serve_stops_cleanly_on_sigterm(tmp_path, model_env):
    """What ``docker stop``, systemd and Kubernetes send: Serve shut down, the local Ray instance
    stopped, exit status 0, no trace, no Ray process left behind."""
    import signal

    import httpx

    port = free_port()
    run = Running(["serve", "--config", str(_yaml_for(tmp_path)), "--port", str(port), "--num-cpus", "2"], model_env)
    try:
        run.wait_for(r"Serving\. Press Ctrl-C")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=60).status_code == 200
        ray_processes = run.descendants()
        assert any("raylet" in " ".join(p.cmdline()) for p in ray_processes), [p.cmdline() for p in ray_processes]
        status, seconds = run.stop(signal.SIGTERM, timeout_s=120)
    finally:
        run.kill()
    out = run.output()
    assert status == 0, out[-4000:]
    assert seconds < 90, seconds
    assert "SIGTERM received: stopping" in out
    assert "Traceback" not in out and "Fatal Python error" not in out and "*** SIG" not in out, out[-4000:]
    assert_gone(ray_processes)


def test_demo_with_an_api_key_dashboard_and_sigterm(tmp_path, model_env):
    """The demo secured with SERVE_APP_API_KEY: its own example query carries the key, the printed
    curl shows the header; the Ray dashboard is on 127.0.0.1 behind Ray's token; SIGTERM stops it."""
    import signal

    import httpx

    from serve_app.serve.runner import token_path

    key = "demo-key-" + "x" * 24
    port, dash = free_port(), free_port()
    run = Running(["demo", "--port", str(port), "--index-dir", str(tmp_path / "demo-index"), "--replica-cpus", "0.1", "--num-cpus", "2", "--dashboard-port", str(dash)], {**model_env, "SERVE_APP_API_KEY": key})
    try:
        url = run.wait_for(r"Ray dashboard: (http://\S+)").group(1)
        run.wait_for(r"Serving\. Press Ctrl-C")
        out = run.output()
        assert url == f"http://127.0.0.1:{dash}" and "ray get-auth-token" in out
        assert "Answer (top 5" in out and "degraded=False" in out
        assert '-H "Authorization: Bearer $SERVE_APP_API_KEY"' in out and key not in out
        body = {"query": "why does the sun shine", "top_n": 2}
        assert httpx.post(f"http://127.0.0.1:{port}/search", json=body, timeout=60).status_code == 401
        assert httpx.post(f"http://127.0.0.1:{port}/search", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 200
        token = token_path().read_text().strip()
        assert httpx.get(f"{url}/api/version", timeout=30).status_code == 401  # token authentication is on
        assert httpx.get(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200
        ray_processes = run.descendants()
        status, seconds = run.stop(signal.SIGTERM, timeout_s=120)
    finally:
        run.kill()
    assert status == 0 and seconds < 90, run.output()[-4000:]
    assert "Traceback" not in run.output()
    assert_gone(ray_processes)


def test_demo_once_builds_the_index_and_answers_the_example(tmp_path, model_env):
    index_dir = tmp_path / "demo-index"
    port = free_port()
    proc = run_cli(["demo", "--once", "--port", str(port), "--index-dir", str(index_dir), "--replica-cpus", "0.1", "--num-cpus", "2", "--dashboard-port", "0"], model_env)
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
