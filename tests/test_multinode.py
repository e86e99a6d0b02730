"""The application on a local multi-node Ray cluster (cluster/local/start.sh, deploy.sh, stop.sh).

One cluster for the module: a head and two worker nodes on 127.0.0.1 with token auth, each
node type advertising its custom resource; the application is deployed with
cluster/local/deployments.local.yaml (tiny models, a five-document corpus whose index the app
builder writes once into a directory every node reads). Checks:

* replicas of the pinned deployments run on the node type they are pinned to, so the
  reranker, the retrievers and the ingress sit on three different nodes (Ray state API);
* a query over HTTP gets ranked results;
* every metric the Grafana dashboard queries is exported by the running app, read from the
  endpoints Ray lists in its Prometheus service-discovery file.

All Ray client work runs in subprocesses, so this test process never connects to the cluster
(other tests may hold their own Ray session). The cluster is stopped even when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


pytestmark = [pytest.mark.slow, pytest.mark.serve]

LOCAL = REPO / "cluster" / "local"
PINNED = {"SearchIngress": "head_node", "BM25Retriever": "retriever_node", "DenseRetriever": "retriever_node", "CrossEncoderReranker": "reranker_node"}
CORPUS = [
    ("d1", "Ocean currents", "the ocean and the sea move water and heat around the earth"),
    ("d2", "Football", "the team won the cup after a long season in the league"),
    ("d3", "Protein folding", "a protein folds into a shape that decides what the cell can do"),
    ("d4", "Solar power", "solar panels turn light from the sun into energy"),
    ("d5", "Coffee and tea", "a recipe for coffee and tea with bread and cheese"),
]


def dashboard_metric_names() -> set[str]:
    """Metric names queried by the committed Grafana dashboard (cluster/monitoring)."""
    import importlib.util

    path = REPO / "cluster" / "monitoring" / "grafana_dashboard.py"
    spec = importlib.util.spec_from_file_location("grafana_dashboard", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.queried_metric_names(json.loads((path.parent / "grafana-serve-app.json").read_text()))


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_ports(rng_seed: int) -> dict[str, int]:
    """Ports outside Ray's worker range (10002-19999) and the kernel's ephemeral range."""
    import random

    rnd = random.Random(rng_seed)
    for _ in range(200):
        base = rnd.randrange(20000, 31000, 50)
        singles = {"gcs": base + 40, "dashboard": base + 41, "client": base + 42, "http": base + 43}
        per_node = [base + 10 * i + j for i in range(3) for j in range(2)] + [base + 2, base + 3]
        if all(_port_free(p) for p in [*singles.values(), *per_node]):
            return {"base": base, **singles}
    raise RuntimeError("no free port range found")


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _ray_script(cluster: dict, code: str, timeout: float = 120) -> dict:
    """Run ``code`` (prints one JSON line) as a Ray client of the cluster; return that JSON."""
    env = {**cluster["env"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster["state"] / "auth_token"), "RAY_ADDRESS": f"127.0.0.1:{cluster['ports']['gcs']}"}
    proc = _run([sys.executable, "-c", code], env, timeout)
    assert proc.returncode == 0, f"client script failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _logs_tail(state: Path) -> str:
    out = []
    for log in sorted((state / "logs").glob("*.log")):
        out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(out)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from serve_app.testing import build_tiny_bi_encoder, build_tiny_cross_encoder

    work = tmp_path_factory.mktemp("multinode")
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in CORPUS))
    bi = build_tiny_bi_encoder(work / "bi", seed=0)
    ce = build_tiny_cross_encoder(work / "ce", seed=0)
    # Short path: Ray's Unix socket paths must stay under 108 bytes.
    state = Path(tempfile.mkdtemp(prefix="sa-mn-", dir="/tmp"))
    ports = _free_ports(os.getpid())
    overlay = work / "test-overlay.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "serve": {"http_options": {"port": ports["http"]}},
                "app_args": {
                    "index_dir": str(work / "index"),
                    "corpus": str(corpus),
                    "build_index_if_missing": True,
                    "dense": {"model": str(bi)},
                    "reranker": {"model": str(ce)},
                },
            }
        )
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHON": sys.executable,
        "SERVE_APP_CLUSTER_DIR": str(state),
        "SERVE_APP_GCS_PORT": str(ports["gcs"]),
        "SERVE_APP_DASHBOARD_PORT": str(ports["dashboard"]),
        "SERVE_APP_CLIENT_PORT": str(ports["client"]),
        "SERVE_APP_PORT_BASE": str(ports["base"]),
        "SERVE_APP_START_TIMEOUT_S": "150",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(var, None)
    info = {"state": state, "ports": ports, "env": env, "overlay": overlay, "work": work, "url": f"http://127.0.0.1:{ports['http']}"}
    try:
        started = _run(["bash", str(LOCAL / "start.sh")], env, timeout=240)
        assert started.returncode == 0, f"start.sh failed:\n{started.stdout}\n{started.stderr}"
        deployed = _run(["bash", str(LOCAL / "deploy.sh"), "--overlay", str(overlay), "--timeout", "300"], env, timeout=360)
        assert deployed.returncode == 0, f"deploy.sh failed:\n{deployed.stdout[-3000:]}\n{deployed.stderr[-3000:]}\n{_logs_tail(state)}"
        yield info
    finally:
        stopped = _run(["bash", str(LOCAL / "stop.sh")], env, timeout=120)
        leftovers = list((state / "pids").glob("*.pid")) if (state / "pids").exists() else []
        shutil.rmtree(state, ignore_errors=True)
        assert stopped.returncode == 0 and not leftovers, f"stop.sh failed:\n{stopped.stdout}\n{stopped.stderr}"


PLACEMENT_SCRIPT = r"""
import json
import ray
from ray import serve
from ray.util.state import list_actors, list_nodes

ray.init(logging_level="ERROR", log_to_driver=False)
nodes = {n.node_id: n for n in list_nodes(filters=[("state", "=", "ALIVE")])}
replicas = []
for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10000):
    if a.class_name.startswith("ServeReplica:"):
        markers = sorted(k for k in nodes[a.node_id].resources_total if k.endswith("_node"))
        replicas.append({"deployment": a.class_name.split(":")[-1], "node_id": a.node_id, "markers": markers})
status = serve.status()
apps = {name: {"status": str(app.status), "deployments": {d: str(s.status) for d, s in app.deployments.items()}} for name, app in status.applications.items()}
print(json.dumps({"nodes": len(nodes), "replicas": replicas, "apps": apps}))
"""


@pytest.mark.timeout(900)
def test_stages_run_on_their_own_node_types(cluster):
    info = _ray_script(cluster, PLACEMENT_SCRIPT)
    assert info["nodes"] == 3
    (app,) = info["apps"].values()
    assert app["status"].endswith("RUNNING"), app
    assert all(s.endswith("HEALTHY") for s in app["deployments"].values()), app
    by_deployment: dict[str, set[str]] = {}
    for r in info["replicas"]:
        assert PINNED[r["deployment"]] in r["markers"], f"{r['deployment']} runs on a node with {r['markers']}"
        by_deployment.setdefault(r["deployment"], set()).add(r["node_id"])
    assert set(by_deployment) == set(PINNED), by_deployment
    ingress, bm25, dense, rerank = (by_deployment[d] for d in ("SearchIngress", "BM25Retriever", "DenseRetriever", "CrossEncoderReranker"))
    assert bm25 == dense, "both retrievers share the retriever node"
    assert not (rerank & bm25) and not (rerank & ingress) and not (bm25 & ingress), "reranker, retrievers and ingress on three different nodes"


@pytest.mark.timeout(900)
def test_query_over_http(cluster):
    r = httpx.post(cluster["url"] + "/search", json={"query": "energy from the sun", "top_n": 3}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["degraded"] is False
    ids = [hit["id"] for hit in body["results"]]
    assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
    assert set(ids) <= {d[0] for d in CORPUS}
    assert all(stage["status"] == "ok" for stage in body["stages"].values()), body["stages"]


def _scrape_all(state: Path) -> str:
    """Text of every metrics endpoint listed in Ray's Prometheus service-discovery file."""
    sd = json.loads((state / "ray" / "prom_metrics_service_discovery.json").read_text())
    targets = [t for group in sd for t in group["targets"]]
    assert targets, "no metrics endpoint in the service-discovery file"
    texts = []
    for t in targets:
        try:
            texts.append(httpx.get(f"http://{t}/metrics", timeout=10).text)
        except httpx.HTTPError:
            pass  # a node's agent may be restarting; the others still count
    return "\n".join(texts)


def _exported(text: str) -> set[str]:
    """Metric names with a sample labelled application="serve_app"."""
    return {m.group(1) for m in re.finditer(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{[^}]*application="serve_app"', text, re.MULTILINE)}


@pytest.mark.timeout(900)
def test_every_dashboard_metric_is_exported(cluster):
    url = cluster["url"]
    # Traffic for every panel: searches, a rerank call, an invalid body (errors_total) ...
    for q in ("the sun and solar energy", "football league", "protein in a cell"):
        assert httpx.post(url + "/search", json={"query": q}, timeout=60).status_code == 200
    # (an unknown field, which /rerank ignores as TEI, infinity and vLLM do: ignored_fields_total)
    assert httpx.post(url + "/rerank", json={"query": "tea", "documents": ["coffee and tea", "the ocean"], "colour": "x"}, timeout=60).status_code == 200
    bad = httpx.post(url + "/search", content=b'{"query": ', headers={"content-type": "application/json"}, timeout=30)
    assert bad.status_code == 400, bad.text
    # ... and a degraded answer (degraded_total): the documented drill, a fault injected into
    # the BM25 deployment through its user_config (applied live by reconfigure).
    fault = cluster["work"] / "fault-overlay.yaml"
    # The reranker's slow_model drill makes a request queue behind a slow model call, so that a
    # client hanging up has queued pairs to drop (cancelled_total, cancelled_pairs_total).
    fault.write_text(yaml.safe_dump({"deployments": {"BM25Retriever": {"user_config": {"fault": {"mode": "error"}}}, "CrossEncoderReranker": {"user_config": {"fault": {"mode": "slow_model", "delay_s": 3.0}}}}}))
    deployed = _run(["bash", str(LOCAL / "deploy.sh"), "--overlay", str(cluster["overlay"]), "--overlay", str(fault), "--timeout", "180"], cluster["env"], timeout=240)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    deadline = time.monotonic() + 120
    degraded = False
    while time.monotonic() < deadline and not degraded:
        r = httpx.post(url + "/search", json={"query": "ocean water"}, timeout=60)
        assert r.status_code == 200, r.text
        degraded = r.json()["degraded"]
        time.sleep(0 if degraded else 2)
    assert degraded, "the injected BM25 fault never showed up as a degraded answer"
    waited = threading.Thread(target=lambda: httpx.post(url + "/search", json={"query": "solar wind"}, timeout=120))
    waited.start()
    time.sleep(0.5)  # its model call holds the reranker for 3 s
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/search", json={"query": "tides of the ocean"}, timeout=1.5)
    waited.join()

    from serve_app.serve.metrics import SPECS

    # metrics of a feature this cluster's app does not run (writes: tests/serve/test_serve_live_writes.py)
    featured = {"ray_" + n + sfx for n, spec in SPECS.items() if spec.feature for sfx in ("", "_bucket", "_sum", "_count", "_total")}
    wanted = dashboard_metric_names() - featured
    missing: set[str] = set(wanted)
    deadline = time.monotonic() + 90  # Ray exports on an interval of a few seconds
    while missing and time.monotonic() < deadline:
        missing = wanted - _exported(_scrape_all(cluster["state"]))
        if missing:
            time.sleep(5)
    assert not missing, f"dashboard queries metrics the running app does not export: {sorted(missing)}"
