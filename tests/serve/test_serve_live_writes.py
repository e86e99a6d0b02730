"""Live writes in the running Serve application (one Ray session, tiny models, sharded
retrievers): writes through HTTP visible on every shard, the writer's replica killed during
writes, a retriever replica added after writes, concurrent writes and searches."""

from __future__ import annotations

import concurrent.futures
import copy
import shutil
import time
from typing import Any

import httpx
import pytest
from serve_fakes import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.serve]

SHARDS = {"bm25": 2, "dense": 2}


def live_app(stack, name: str, index_dir: str, log_dir: str, bm25_shard0_replicas: int = 1) -> dict[str, Any]:
    app = stack.app_config(name, args={"index_dir": index_dir, "sharding": SHARDS, "writes": {"enabled": True, "log_dir": log_dir, "refresh_interval_s": 0.5}})
    deployments = {d["name"]: d for d in app["deployments"]}
    for retriever, base in (("bm25", "BM25Retriever"), ("dense", "DenseRetriever")):
        opts = deployments.pop(base)
        for i in range(SHARDS[retriever]):
            deployments[f"{base}-shard{i}"] = {**copy.deepcopy(opts), "name": f"{base}-shard{i}"}
    deployments["BM25Retriever-shard0"]["num_replicas"] = bm25_shard0_replicas
    deployments["DenseQueryEncoder"] = {"name": "DenseQueryEncoder", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}
    deployments["DocumentWriter"] = {"name": "DocumentWriter", "ray_actor_options": {"num_cpus": 0.1}}
    app["deployments"] = list(deployments.values())
    return app


@pytest.fixture(scope="module")
def live(serve_stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    index_dir = root / "index"
    shutil.copytree(serve_stack.base_args["index_dir"], index_dir)
    app = live_app(serve_stack, "live", str(index_dir), str(root / "log"))
    serve_stack.deploy(app, timeout_s=300)
    url = serve_stack.url("live")
    wait_until(lambda: httpx.get(url + "/healthz", timeout=10).status_code == 200, 120, "the live app to be ready")
    yield {"url": url, "index_dir": str(index_dir), "log_dir": str(root / "log")}
    serve_stack.remove("live")


def search_ids(url: str, q: str, **kw: Any) -> list[str]:
    r = httpx.post(url + "/search", json={"query": q, "rerank_top_m": 0, "top_k": 60, "top_n": 60, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return [x["id"] for x in r.json()["results"]]


def test_writes_are_visible_on_every_shard_and_deletes_leave(live):
    url = live["url"]
    docs = [{"id": f"live-{i}", "text": f"xylophone{i} quartz meadow", "title": "Live"} for i in range(12)]
    r = httpx.post(url + "/documents", json={"documents": docs, "refresh": "wait_for"}, timeout=60)
    assert r.status_code == 200 and r.json()["visible"] is True, r.text
    for i in (0, 5, 11):
        assert search_ids(url, f"xylophone{i} quartz", retrievers=["bm25"])[0] == f"live-{i}"
        assert f"live-{i}" in search_ids(url, f"xylophone{i} quartz meadow Live", retrievers=["dense"])  # the dense shards hold the writer's vectors
    from serve_app.live.changes import owner_shard

    assert {owner_shard(d["id"], None, 2) for d in docs} == {0, 1}  # both shards took writes
    r = httpx.request("DELETE", url + "/documents", json={"ids": ["live-5", "nope"], "refresh": "wait_for"}, timeout=60)
    assert r.json()["deleted"] == ["live-5"] and r.json()["absent"] == ["nope"]
    assert "live-5" not in search_ids(url, "xylophone5 quartz", retrievers=["bm25"])
    assert httpx.get(url + "/documents/live-5", timeout=10).status_code == 404
    assert httpx.get(url + "/documents/live-6", timeout=10).json()["text"] == "xylophone6 quartz meadow"
    info = httpx.get(url + "/info", timeout=10).json()
    assert info["writes"]["live"]["applied_seq"] >= 2 and info["writes"]["enabled"] is True
    bad = httpx.post(url + "/documents", json={"documents": [{"id": "d", "text": "x"}, {"id": "d", "text": "y"}]}, timeout=10)
    assert bad.status_code == 422 and "documents[1]" in bad.json()["error"]["message"]


def test_killing_the_writer_replica_loses_no_acknowledged_write(live, serve_stack):
    import ray

    url = live["url"]
    acked: list[str] = []
    errors: list[int] = []

    def write(i: int) -> None:
        r = httpx.post(url + "/documents", json={"documents": [{"id": f"kill-{i}-{j}", "text": f"kestrel{i} batch {j}"} for j in range(5)]}, timeout=60)
        if r.status_code == 200:
            acked.extend(r.json()["upserted"])
        else:
            errors.append(r.status_code)

    for i in range(5):
        write(i)
    tag = serve_stack.call("live", "DocumentWriter", "ping")["replica"]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::live#DocumentWriter#{tag}", namespace="serve"), no_restart=True)
    for i in range(5, 40):  # writes while Serve replaces the writer: refused (503) or acknowledged
        write(i)
        time.sleep(0.1)
    wait_until(lambda: httpx.post(url + "/documents", json={"documents": [{"id": "kill-probe", "text": "probe"}], "refresh": "wait_for"}, timeout=30).status_code == 200, 120, "the writer to come back")
    assert set(errors) <= {503}, errors
    missing = [i for i in acked if httpx.get(url + f"/documents/{i}", timeout=10).status_code != 200]
    assert not missing, missing[:5]
    assert f"kill-{4}-0" in search_ids(url, "kestrel4 batch", retrievers=["bm25"])


def test_a_replica_added_after_writes_catches_up(live, serve_stack):
    url = live["url"]
    httpx.post(url + "/documents", json={"documents": [{"id": "before-scale", "text": "wombat tundra"}], "refresh": "wait_for"}, timeout=60)
    serve_stack.deploy(live_app(serve_stack, "live", live["index_dir"], live["log_dir"], bm25_shard0_replicas=2), timeout_s=300)
    wait_until(lambda: serve_stack.replicas("live", "BM25Retriever-shard0") == 2, 120, "a second replica of shard 0")
    for _ in range(20):  # whichever replica answers has followed the log
        assert "before-scale" in search_ids(url, "wombat tundra", retrievers=["bm25"])


def test_concurrent_writes_and_searches_have_no_5xx(live):
    url = live["url"]

    def writer(w: int) -> list[int]:
        out = []
        for i in range(10):
            out.append(httpx.post(url + "/documents", json={"documents": [{"id": f"c{w}-{i % 4}", "text": f"load {i} protein ocean"}]}, timeout=60).status_code)
        out.append(httpx.request("DELETE", url + "/documents", json={"ids": [f"c{w}-0"]}, timeout=60).status_code)
        return out

    def searcher(_: int) -> list[int]:
        return [httpx.post(url + "/search", json={"query": "protein ocean load", "rerank_top_m": 5}, timeout=60).status_code for _ in range(15)]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(writer, range(3))) + list(pool.map(searcher, range(3)))
    statuses = {s for r in results for s in r}
    assert statuses == {200}, statuses


def test_the_write_metrics_are_exported(live, serve_stack):
    import re
    import urllib.request

    from serve_app.serve import metrics

    wanted = [f"ray_{s.name}" + ("_bucket" if s.kind == "histogram" else "") for s in metrics.SPECS.values() if s.feature == "writes"]
    assert wanted

    def missing() -> list[str]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{serve_stack.metrics_port}/metrics", timeout=10).read().decode()
        return [n for n in wanted if not re.search(rf"^{n}{{", text, re.M)]

    wait_until(lambda: not missing(), 60, f"the write metrics to be exported ({missing()})")
