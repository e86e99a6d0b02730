"""Sharded retrieval and index files in the running Serve application (one Ray session, tiny models).

* ``sharding: {bm25: 2, dense: 2}`` over real HTTP answers exactly like the unsharded in-process
  ``SearchPipeline`` and like the unsharded application; each shard replica holds its half.
* A failing or hanging shard degrades its retriever and the answer names the shard; recovery.
* Rebuilding the index in place under the running application leaves its answers unchanged.
* A corrupted index fails its deployment (DEPLOY_FAILED) with the file and the reason.
* Bad request bodies sent over HTTP never show up in any Ray or Serve log file.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import pytest
from serve_fakes import wait_until

from serve_app.client import ServeAppClient
from serve_app.serve.runner import handle_call

pytestmark = [pytest.mark.slow, pytest.mark.serve]

SHARDS = {"bm25": 2, "dense": 2}
QUERIES = ("protein gene study", "space planet moon", "music band album", "ocean water results")
MARK = "zq9-http-marker-77c1"


def sharded_app(stack, name: str, index_dir: str, faults: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """The stack's application config with sharded retrievers: one deployment entry per shard."""
    app = stack.app_config(name, args={"index_dir": index_dir, "sharding": SHARDS})
    deployments = {d["name"]: d for d in app["deployments"]}
    for retriever, base in (("bm25", "BM25Retriever"), ("dense", "DenseRetriever")):
        opts = deployments.pop(base)
        for i in range(SHARDS[retriever]):
            deployments[f"{base}-shard{i}"] = {**copy.deepcopy(opts), "name": f"{base}-shard{i}"}
    for dep, fault in (faults or {}).items():
        deployments[dep]["user_config"] = {"fault": fault}
    app["deployments"] = list(deployments.values())
    return app


def search(url: str, q: str) -> dict[str, Any]:
    r = httpx.post(url + "/search", json={"query": q, "top_k": 20, "rerank_top_m": 10, "top_n": 15, "return_documents": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def sharded(serve_stack, tmp_path_factory):
    """The ``sharded`` application on its own copy of the index (it is rebuilt by a test below)."""
    index_dir = tmp_path_factory.mktemp("sharded") / "index"
    shutil.copytree(serve_stack.base_args["index_dir"], index_dir)
    serve_stack.deploy(sharded_app(serve_stack, "sharded", str(index_dir)), timeout_s=300)
    yield str(index_dir)
    serve_stack.remove("sharded")


def test_sharded_search_equals_unsharded(serve_stack, sharded, tiny_cross_encoder_dir, tiny_bi_encoder_dir):
    from serve_app.config import CrossEncoderConfig, DenseConfig
    from serve_app.pipeline import SearchPipeline

    pipeline = SearchPipeline.from_index(
        serve_stack.base_args["index_dir"],
        reranker_cfg=CrossEncoderConfig(model=str(tiny_cross_encoder_dir)),
        dense_config=DenseConfig(model=str(tiny_bi_encoder_dir)),
    )
    url = serve_stack.url("sharded")
    for q in QUERIES:
        got = search(url, q)
        want = pipeline.search(q, top_k=20, rerank_top_m=10, top_n=15)
        unsharded = search(serve_stack.url(), q)
        assert got["degraded"] is False
        assert [r["id"] for r in got["results"]] == [r.doc_id for r in want.results] == [r["id"] for r in unsharded["results"]]
        for g, w, u in zip(got["results"], want.results, unsharded["results"]):
            assert g["fused_score"] == pytest.approx(w.fused_score, rel=1e-6)
            assert (g["rerank_score"] is None) == (w.rerank_score is None)
            if w.rerank_score is not None:
                assert g["rerank_score"] == pytest.approx(w.rerank_score, abs=1e-4)
            assert {k: v["rank"] for k, v in g["retrievers"].items()} == w.retriever_ranks
            for name, ev in g["retrievers"].items():
                assert ev["score"] == pytest.approx(w.retriever_scores[name], abs=1e-5)
                assert ev["score"] == pytest.approx(u["retrievers"][name]["score"], abs=1e-5)
            assert g["text"] == pipeline.corpus.get(g["id"]).text
        assert got["stages"]["bm25"]["candidates"] == len(pipeline.retrievers["bm25"].search(q, 20))
    # Each shard replica holds its half of the corpus, and the ingress reports the layout.
    docs = [handle_call("sharded", f"BM25Retriever-shard{i}", "ping")["documents"] for i in range(2)]
    assert docs == [30, 30]
    vectors = [handle_call("sharded", f"DenseRetriever-shard{i}", "ping")["vectors"] for i in range(2)]
    assert sum(vectors) == len(pipeline.corpus) and min(vectors) > 0
    with ServeAppClient(url) as c:
        assert c.health()["status"] == "ok"
        assert c.info()["index"]["shards"] == SHARDS


def test_a_failing_or_hanging_shard_is_named_and_degrades_its_retriever(serve_stack, sharded):
    url = serve_stack.url("sharded")
    body = {"query": "space star planet", "top_n": 5}
    timeout = serve_stack.base_args["timeouts"]["retriever_timeout_s"]
    try:
        serve_stack.deploy(sharded_app(serve_stack, "sharded", sharded, {"BM25Retriever-shard1": {"mode": "error"}}))
        out = wait_until(lambda: (lambda j: j if j["stages"]["bm25"]["status"] == "error" else None)(httpx.post(url + "/search", json=body, timeout=60).json()), 60, "bm25 shard 1 failing")
        assert out["degraded"] is True and out["stages"]["dense"]["status"] == "ok"
        assert "1 of 2 bm25 shards failed (shard 1: " in out["stages"]["bm25"]["error"] and "injected failure" in out["stages"]["bm25"]["error"]
        assert out["results"] and all(set(r["retrievers"]) == {"dense"} for r in out["results"])

        serve_stack.deploy(sharded_app(serve_stack, "sharded", sharded, {"DenseRetriever-shard0": {"mode": "delay", "delay_s": 6}}))
        out = wait_until(lambda: (lambda j: j if j["stages"]["dense"]["status"] == "error" else None)(httpx.post(url + "/search", json=body, timeout=60).json()), 60, "dense shard 0 hanging")
        assert f"shard 0: no answer within {0.9 * timeout:.3g}s" in out["stages"]["dense"]["error"], out["stages"]["dense"]
        assert out["stages"]["bm25"]["status"] == "ok" and out["results"]
        r = httpx.get(url + "/healthz", timeout=60)
        assert r.status_code == 503 and "dense" in r.json()["error"]["message"] and "shard 0" in r.json()["error"]["message"]
    finally:
        serve_stack.deploy(sharded_app(serve_stack, "sharded", sharded))
    out = wait_until(lambda: (lambda j: j if not j["degraded"] else None)(httpx.post(url + "/search", json=body, timeout=60).json()), 60, "recovery")
    assert {out["stages"][s]["status"] for s in ("bm25", "dense", "rerank")} == {"ok"}


def test_rebuilding_the_index_under_the_running_app_keeps_it_answering(serve_stack, sharded, tiny_bi_encoder_dir):
    from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
    from serve_app.corpus import Corpus
    from serve_app.index import build_index
    from serve_app.types import Document

    url = serve_stack.url("sharded")
    before = {q: search(url, q) for q in QUERIES}
    other = Corpus([Document(f"new{i}", f"completely different text number {i} about gene planet music") for i in range(12)])
    build_index(other, sharded, bm25=BM25Config(), dense=DenseConfig(model=str(tiny_bi_encoder_dir)), chunking=ChunkingConfig(), show_progress=False)
    assert not (Path(sharded) / "shards").exists()  # the old files, shard sets included, are gone from disk
    for q in QUERIES:
        after = search(url, q)
        assert after["degraded"] is False
        assert [r["id"] for r in after["results"]] == [r["id"] for r in before[q]["results"]]
        assert [r["score"] for r in after["results"]] == pytest.approx([r["score"] for r in before[q]["results"]], abs=1e-4)


def test_a_corrupted_index_fails_its_deployment_with_the_reason(serve_stack, tmp_path):
    from ray import serve

    from serve_app.serve.runner import DeployError, wait_for_apps

    index_dir = tmp_path / "index"
    shutil.copytree(serve_stack.base_args["index_dir"], index_dir, ignore=shutil.ignore_patterns("shards"))
    damaged = index_dir / "bm25" / "data.csc.index.npy"
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    damaged.write_bytes(bytes(raw))
    app = serve_stack.app_config("corrupt", args={"index_dir": str(index_dir), "retrievers": ["bm25"]})
    serve_stack.deploy(app, wait=False)
    try:
        with pytest.raises(DeployError) as info:
            wait_for_apps(["corrupt"], timeout_s=240)
        message = str(info.value)
        assert "DEPLOY_FAILED" in message
        dep = serve.status().applications["corrupt"].deployments["BM25Retriever"]
        assert str(getattr(dep.status, "value", dep.status)) == "DEPLOY_FAILED"
        assert "IndexLoadError" in dep.message and str(damaged) in dep.message and "sha256" in dep.message, dep.message
        print(f"\nDEPLOY_FAILED message of the damaged index:\n{dep.message[:600]}")
    finally:
        serve_stack.remove("corrupt")
    with ServeAppClient(serve_stack.url()) as c:  # the other applications are untouched
        assert c.health()["status"] == "ok"


def test_request_bodies_never_reach_the_logs(serve_stack, sharded):
    import ray

    bodies = [
        ("/search", b'{"query": "' + MARK.encode() + b'",', "application/json", 400),
        ("/search", b'{"query": "' + MARK.encode() + b'", "top_k": NaN}', "application/json", 400),
        ("/rerank", b"\x89PNG" + MARK.encode() + bytes(range(256)), "application/json", 400),
        ("/v1/rerank", b'{"query": "' + MARK.encode() + b'"}', "text/plain", 415),
        ("/v1/rerank", b'{"query": "' + MARK.encode() + b'", "documents": [{"text": 1, "note": "' + MARK.encode() + b'"}]}', "application/json", 422),
        ("/rerank", b'{"query": "' + MARK.encode() + b'", "documents": []}', "application/json", 422),
        ("/search", b'{"query": "' + MARK.encode() + b'"}', "application/json", 200),
        ("/v1/rerank", b'{"query": "' + MARK.encode() + b'", "documents": ["' + MARK.encode() + b' gene"]}', "application/json", 200),
    ]
    for app in ("main", "sharded"):
        for path, body, ctype, status in bodies:
            r = httpx.post(serve_stack.url(app) + path, content=body, headers={"content-type": ctype}, timeout=60)
            assert r.status_code == status, (app, path, r.text[:200])
            assert MARK not in r.text or status == 200  # a 200 /search echoes the query by design; errors never do
    time.sleep(3)  # let the replicas and the proxy flush their log files
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs_dir.rglob("*") if p.is_file()]
    assert any("serve" in str(p) for p in files)  # the Serve logs (proxy access log, replicas) are there
    leaked = [str(p) for p in files if MARK.encode() in p.read_bytes()]
    assert leaked == [], leaked
