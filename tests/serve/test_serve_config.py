"""AppConfig validation, environment overrides, deployments.yaml against Serve's schema, index build once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml
from serve_fakes import small_corpus

import serve_app.index.build as index_build
from serve_app import index as stores
from serve_app.corpus import read_corpus_source, write_documents_jsonl
from serve_app.errors import CorpusError, IndexLoadError
from serve_app.serve.app import DEPLOYMENT_NAMES
from serve_app.serve.config import (
    ENV_DENSE_MODEL,
    ENV_RERANKER_MODEL,
    ConfigError,
    RerankerUserConfig,
    RetrieverUserConfig,
    apply_env_overrides,
    parse_app_config,
    parse_user_config,
)
from serve_app.serve.runner import IMPORT_PATH, direct_ingress_target, load_serve_config, on_handle_loop

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "args,field",
    [
        ({}, "index_dir"),
        ({"index_dir": "/x", "reranker": {"max_length": 3}}, "reranker.max_length"),
        ({"index_dir": "/x", "limits": {"max_documents": 0}}, "limits.max_documents"),
        ({"index_dir": "/x", "batching": {"max_batch_size": "many"}}, "batching.max_batch_size"),
        ({"index_dir": "/x", "retrievers": ["bm25", "splade"]}, "retrievers.1"),
        ({"index_dir": "/x", "retrievers": []}, "retrievers"),
        ({"index_dir": "/x", "timeouts": {"retriever_timeout_s": 0}}, "timeouts.retriever_timeout_s"),
        ({"index_dir": "/x", "unknown_knob": 1}, "unknown_knob"),
        ({"index_dir": "/x", "funnel": {"default_top_n": 500}}, "funnel"),
    ],
)
def test_invalid_app_config_names_the_field(args, field):
    with pytest.raises(ConfigError) as info:
        parse_app_config(args, use_env=False)
    assert field in str(info.value)


def test_env_overrides_replace_the_models(monkeypatch):
    monkeypatch.setenv(ENV_RERANKER_MODEL, "/models/my-reranker")
    monkeypatch.setenv(ENV_DENSE_MODEL, "/models/my-encoder")
    cfg = parse_app_config({"index_dir": "~/idx", "reranker": {"model": "hub/x", "max_length": 256}})
    assert cfg.reranker.model == "/models/my-reranker" and cfg.reranker.max_length == 256
    assert cfg.dense.model == "/models/my-encoder"
    assert cfg.index_dir == str(Path.home() / "idx")
    assert parse_app_config({"index_dir": "/i"}, use_env=False).reranker.model != "/models/my-reranker"
    assert apply_env_overrides({"index_dir": "/i"}, environ={}) == {"index_dir": "/i"}


def test_user_configs_validate_and_default_from_args():
    cfg = parse_app_config({"index_dir": "/i", "batching": {"max_batch_size": 4}, "faults": {"dense": {"mode": "error"}}}, use_env=False)
    assert cfg.reranker_user_config()["max_batch_size"] == 4
    assert cfg.retriever_user_config("dense")["fault"]["mode"] == "error"
    assert cfg.retriever_user_config("bm25")["fault"]["mode"] == "none"
    assert parse_user_config(RerankerUserConfig, {"max_batch_size": 3}, "R").max_batch_size == 3
    with pytest.raises(ConfigError, match="max_batch_size"):
        parse_user_config(RerankerUserConfig, {"max_batch_size": 0}, "CrossEncoderReranker")
    with pytest.raises(ConfigError, match="fault.mode"):
        parse_user_config(RetrieverUserConfig, {"fault": {"mode": "explode"}}, "BM25Retriever")


def test_deployments_yaml_is_a_valid_serve_config():
    config = load_serve_config(REPO_ROOT / "deployments.yaml")  # ServeDeploySchema + AppConfig of the args
    assert config.http_options.host == "127.0.0.1" and config.http_options.port == 8000
    (app,) = config.applications
    assert app.import_path == IMPORT_PATH
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == set(DEPLOYMENT_NAMES)
    for d in deployments.values():
        auto = d.autoscaling_config
        assert auto and auto["min_replicas"] >= 1 and auto["max_replicas"] > auto["min_replicas"], d.name
        assert d.ray_actor_options.num_cpus is not None, d.name
    # At min_replicas the reservations fit a 2-core machine, so `serve run deployments.yaml` works locally.
    assert sum(d.ray_actor_options.num_cpus * d.autoscaling_config["min_replicas"] for d in deployments.values()) <= 2
    rr = deployments["CrossEncoderReranker"]
    assert rr.ray_actor_options.num_gpus is not None  # the GPU knob is explicit
    uc = RerankerUserConfig.model_validate(rr.user_config)
    assert rr.max_ongoing_requests >= uc.max_batch_size  # else batches can never fill
    # The reranker scales further and faster than the cheap retrievers.
    assert rr.autoscaling_config["max_replicas"] >= deployments["BM25Retriever"].autoscaling_config["max_replicas"]
    assert rr.autoscaling_config["target_ongoing_requests"] < deployments["BM25Retriever"].autoscaling_config["target_ongoing_requests"]


def test_load_serve_config_reports_bad_args_and_bad_schema(tmp_path):
    raw = yaml.safe_load((REPO_ROOT / "deployments.yaml").read_text())
    raw["applications"][0]["args"]["limits"]["max_documents"] = -1
    with pytest.raises(ConfigError, match="limits.max_documents"):
        load_serve_config(raw)
    raw = yaml.safe_load((REPO_ROOT / "deployments.yaml").read_text())
    raw["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"] = "lots"
    with pytest.raises(ConfigError, match="min_replicas"):
        load_serve_config(raw)
    raw = yaml.safe_load((REPO_ROOT / "deployments.yaml").read_text())
    raw["applications"][0]["deployments"][1]["max_ongoing_requests"] = "lots"
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        load_serve_config(raw)
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_serve_config(bad)


# --------------------------------------------------------------------------- index build


def _corpus_file(tmp_path: Path, n: int = 12) -> Path:
    path = tmp_path / "corpus.jsonl"
    write_documents_jsonl(small_corpus(n), path)
    return path


def ensure(cfg):
    """What the application builder does before wiring the deployments."""
    return stores.ensure_index(cfg.index_dir, **cfg.index_build_args())


def test_ensure_index_builds_once_under_concurrency(tmp_path, monkeypatch):
    calls = []
    real = index_build.build_index

    def slow_build(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(index_build, "build_index", slow_build)
    cfg = parse_app_config({"index_dir": str(tmp_path / "idx"), "corpus": str(_corpus_file(tmp_path)), "retrievers": ["bm25"]}, use_env=False)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure(cfg))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(results) == [[], [], [], ["index"]]
    assert stores.load_bm25(cfg.index_dir).num_documents == 12
    corpus, manifest = stores.load_documents(cfg.index_dir)
    assert len(corpus) == 12 and manifest.dense is None
    with pytest.raises(IndexLoadError, match="no dense retriever"):
        stores.load_dense(cfg.index_dir, cfg.dense)


def test_ensure_index_rebuilds_an_index_of_an_older_format(tmp_path):
    import json

    cfg = parse_app_config({"index_dir": str(tmp_path / "idx"), "corpus": str(_corpus_file(tmp_path)), "retrievers": ["bm25"]}, use_env=False)
    assert ensure(cfg) == ["index"]
    manifest = Path(cfg.index_dir) / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 1}))
    with pytest.raises(IndexLoadError, match="unknown index format version 1"):
        stores.load_bm25(cfg.index_dir)
    assert ensure(cfg) == ["index"]
    assert stores.read_manifest(cfg.index_dir).format_version == stores.FORMAT_VERSION
    stop = parse_app_config({**cfg.model_dump(), "build_index_if_missing": False}, use_env=False)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 1}))
    with pytest.raises(stores.IndexBuildError, match="format 1 .*build_index_if_missing is false"):
        ensure(stop)


def test_ensure_index_refuses_without_a_source(tmp_path):
    with pytest.raises(stores.IndexBuildError, match="no `corpus`"):
        ensure(parse_app_config({"index_dir": str(tmp_path / "a")}, use_env=False))
    with pytest.raises(stores.IndexBuildError, match="build_index_if_missing"):
        ensure(parse_app_config({"index_dir": str(tmp_path / "b"), "corpus": "/c.jsonl", "build_index_if_missing": False}, use_env=False))
    with pytest.raises(CorpusError, match="no such corpus file"):
        ensure(parse_app_config({"index_dir": str(tmp_path / "c"), "corpus": str(tmp_path / "missing.jsonl")}, use_env=False))
    with pytest.raises(CorpusError, match="unknown built-in"):
        read_corpus_source("builtin:nothing")


def test_builtin_demo_corpus_is_readable():
    corpus = read_corpus_source("builtin:demo").corpus
    assert len(corpus) >= 100


def test_damaged_index_files_fail_loading(tmp_path):
    cfg = parse_app_config({"index_dir": str(tmp_path / "idx"), "corpus": str(_corpus_file(tmp_path)), "retrievers": ["bm25"]}, use_env=False)
    ensure(cfg)
    victim = next(p for p in sorted((Path(cfg.index_dir) / "bm25").iterdir()) if p.is_file() and p.stat().st_size > 4)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(IndexLoadError, match="sha256"):
        stores.load_bm25(cfg.index_dir)
    stores.load_documents(cfg.index_dir)  # the document store is intact and still loads
    victim.write_bytes(bytes(data[:-3]))
    with pytest.raises(IndexLoadError, match="truncated"):
        stores.load_bm25(cfg.index_dir)


def test_generated_doc_tables_are_up_to_date():
    from serve_app.serve.docs import stale_sections

    assert stale_sections() == [], "run: python -m serve_app.serve.docs"


def _details(targets: list[dict], *, host: str = "127.0.0.1", port: int = 8000, protocol: str = "HTTP", app: str = "serve_app") -> dict:
    return {"http_options": {"host": host, "port": port}, "target_groups": [{"app_name": app, "protocol": protocol, "route_prefix": "/", "targets": targets}]}


def test_direct_ingress_target_names_the_replica_port_not_the_proxy():
    replica = {"ip": "10.0.0.5", "port": 30000, "instance_id": "r1", "name": "SearchIngress"}
    proxy = {"ip": "10.0.0.5", "port": 8000, "instance_id": "p1", "name": "proxy"}
    # Direct ingress: the replica's own port, on the configured loopback host (it binds there).
    assert direct_ingress_target(_details([replica]), "serve_app") == "http://127.0.0.1:30000"
    # Bound to every interface: the node's IP from the target.
    assert direct_ingress_target(_details([replica], host="0.0.0.0"), "serve_app") == "http://10.0.0.5:30000"
    # Standard mode: the target groups name the proxy; another app or protocol does not count.
    assert direct_ingress_target(_details([proxy]), "serve_app") is None
    assert direct_ingress_target(_details([replica], app="other"), "serve_app") is None
    assert direct_ingress_target(_details([replica], protocol="gRPC"), "serve_app") is None
    assert direct_ingress_target({"http_options": {"port": 8000}}, "serve_app") is None


def test_handle_loop_runs_every_call_on_one_background_loop():
    """Serve handles made on this loop stay usable across calls (Serve's high-throughput mode needs that)."""
    import asyncio

    async def where() -> tuple[int, str]:
        await asyncio.sleep(0)
        return id(asyncio.get_running_loop()), threading.current_thread().name

    first, second = on_handle_loop(where()), on_handle_loop(where())
    assert first == second
    assert first[1] == "serve-handles" != threading.current_thread().name

