"""One local Ray + Serve instance for the integration tests (tiny models, small corpus).

It is started once and stopped after the module that uses it (tests/serve/test_serve_integration.py),
not at the end of the session: Ray lives in the pytest process, and other test modules start
and check their own Ray instances (e.g. tests/test_training_ray.py asserts that none is left).

The stack is deployed the way ``serve run deployments.yaml`` does it: a Serve config whose
application args go through ``serve_app.serve.app:build_app`` on the controller (which builds
the index on first run). Tests change the config (``stack.deploy``) to reconfigure deployments
live or to add an application variant; the config is declarative, so every deploy lists all the
applications that should keep running.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from serve_fakes import small_corpus, wait_until  # noqa: F401 - re-exported for tests

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeStack:
    """The running instance: HTTP base URL, current Serve config, helpers to change it."""

    def __init__(self, http_port: int, metrics_port: int, base_args: dict[str, Any], spans_dir: Optional[Path] = None) -> None:
        self.spans_dir = spans_dir
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.base_args = base_args
        self.apps: dict[str, dict[str, Any]] = {}

    def url(self, app: str = "main") -> str:
        return f"http://127.0.0.1:{self.http_port}/{app}"

    def config(self) -> dict[str, Any]:
        return {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": self.http_port},
            "applications": [copy.deepcopy(a) for a in self.apps.values()],
            # Every request traced, each process writing its spans to $SERVE_APP_TRACE_DIR
            # (tests/serve/test_serve_integration.py reads the span tree of a /search).
            "tracing_config": {"enabled": True, "exporter_import_path": "serve_app.serve.tracing:jsonl_span_processors", "sampling_ratio": 1.0},
        }

    def deploy(self, app: dict[str, Any], *, wait: bool = True, timeout_s: float = 240) -> None:
        """Add or replace ``app`` (a Serve application config) and submit the whole config."""
        from serve_app.serve.runner import deploy_config, load_serve_config, wait_for_apps

        self.apps[app["name"]] = app
        deploy_config(load_serve_config(self.config()))
        if wait:
            time.sleep(1.0)  # let the controller pick the new target up before polling its status
            wait_for_apps([app["name"]], timeout_s=timeout_s)

    def remove(self, name: str) -> None:
        from serve_app.serve.runner import deploy_config, load_serve_config

        self.apps.pop(name, None)
        deploy_config(load_serve_config(self.config()))

    def app_config(self, name: str, *, args: Optional[dict[str, Any]] = None, deployments: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
        """An application on the session's index and tiny models, small replicas, ``/<name>``."""
        merged = copy.deepcopy(self.base_args)
        for key, value in (args or {}).items():
            merged[key] = {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        base = {
            "SearchIngress": {"num_replicas": 1, "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.1}},
            "BM25Retriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}},
            "DenseRetriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}},
            "CrossEncoderReranker": {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.1}, "user_config": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05}},
        }
        for dep, opts in (deployments or {}).items():
            base[dep] = {**base.get(dep, {}), **opts}
            if "autoscaling_config" in opts:
                base[dep].pop("num_replicas", None)
        if "retrievers" in merged and "dense" not in merged["retrievers"]:
            base.pop("DenseRetriever")
        if "retrievers" in merged and "bm25" not in merged["retrievers"]:
            base.pop("BM25Retriever")
        return {
            "name": name,
            "route_prefix": f"/{name}",
            "import_path": "serve_app.serve.app:build_app",
            "args": merged,
            "deployments": [{"name": n, **o} for n, o in base.items()],
        }

    def replicas(self, app: str, deployment: str) -> int:
        """RUNNING replicas of a deployment."""
        from ray import serve

        dep = serve.status().applications[app].deployments[deployment]
        return sum(n for state, n in dep.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")

    def call(self, app: str, deployment: str, method: str, *args: Any) -> Any:
        """A replica method's result through a Serve handle (works in either Serve mode)."""
        from serve_app.serve.runner import handle_call

        return handle_call(app, deployment, method, *args)


_ENV = {
    # Autoscaling decisions on a test's time scale (defaults push metrics every 10 s).
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


@pytest.fixture(scope="module")
def serve_stack(tmp_path_factory, tiny_cross_encoder_dir, tiny_bi_encoder_dir):
    """Ray + Serve on 127.0.0.1 with the ``main`` application deployed; everything stopped and the
    environment restored after the module."""
    from serve_app.corpus import write_documents_jsonl
    from serve_app.serve.runner import start_ray

    root = tmp_path_factory.mktemp("serve-stack")
    corpus = root / "corpus.jsonl"
    write_documents_jsonl(small_corpus(60), corpus)
    import ray

    assert not ray.is_initialized(), "another test left Ray initialized in this process"
    # Replicas and the controller's build task must import serve_app and run offline; Ray's
    # processes inherit this environment.
    env = {**_ENV, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p), "SERVE_APP_TRACE_DIR": str(root / "spans")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    metrics_port = free_port()
    try:
        start_ray(num_cpus=4, metrics_export_port=metrics_port, system_config={"metrics_report_interval_ms": 1000})
        stack = ServeStack(
            free_port(),
            metrics_port,
            {
                "index_dir": str(root / "index"),
                "corpus": str(corpus),
                "dense": {"model": str(tiny_bi_encoder_dir)},
                "reranker": {"model": str(tiny_cross_encoder_dir)},
                "timeouts": {"retriever_timeout_s": 2.0, "rerank_timeout_s": 30.0, "health_timeout_s": 5.0},
            },
            spans_dir=root / "spans",
        )
        stack.deploy(stack.app_config("main"), timeout_s=300)
        yield stack
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
