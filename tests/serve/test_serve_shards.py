"""Sharded retrievers behind the ingress, in process (no Ray): config, shard sets under the index,
the ingress's scatter-gather over stand-in deployment handles (equal to unsharded; a failing or
late shard degrades its retriever and is named)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any, Optional

import httpx
import pytest
from serve_fakes import asgi_request, fake_rerank_score, small_corpus

from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
from serve_app.errors import IndexLoadError, StageOverloaded
from serve_app.index import SHARDS_MANIFEST, build_index, ensure_index, load_bm25, open_shard, read_shards_manifest, shard_dir, shard_set_dir
from serve_app.retrieval.bm25 import BM25Retriever
from serve_app.retrieval.sharding import shard_bounds, split_corpus
from serve_app.serve.config import ConfigError, ShardRef, parse_app_config
from serve_app.serve.deployments import HandleBackends
from serve_app.serve.http import create_app
from serve_app.serve.service import SearchService
from serve_app.serve.shards import ShardFailure, deployment_names, scatter_gather, shard_deadline
from serve_app.types import Hit, RerankOutcome, RerankRequest

CORPUS = small_corpus(60)
QUERIES = ["protein gene study", "space planet moon", "music band album", "ocean water results", "football 7"]


# --------------------------------------------------------------------------- config


def test_sharding_config_defaults_and_validation():
    cfg = parse_app_config({"index_dir": "/x"}, use_env=False)
    assert (cfg.sharding.bm25, cfg.sharding.dense) == (1, 1)
    assert deployment_names(cfg) == ["BM25Retriever", "DenseRetriever"]
    cfg = parse_app_config({"index_dir": "/x", "sharding": {"bm25": 3, "dense": 2}}, use_env=False)
    assert deployment_names(cfg) == ["BM25Retriever-shard0", "BM25Retriever-shard1", "BM25Retriever-shard2", "DenseRetriever-shard0", "DenseRetriever-shard1"]
    for bad, where in (
        ({"sharding": {"bm25": 0}}, "sharding.bm25"),
        ({"sharding": {"dense": 2}, "retrievers": ["bm25"]}, "sharding.dense is 2 but dense is not in retrievers"),
        ({"sharding": {"bm25": 2}, "bm25": {"engine": "rank_bm25", "method": "robertson"}}, "bm25s"),
        ({"sharding": {"shards": 2}}, "sharding.shards"),
    ):
        with pytest.raises(ConfigError, match=where):
            parse_app_config({"index_dir": "/x", **bad}, use_env=False)


def test_build_application_binds_one_deployment_per_shard(tmp_path):
    from ray.serve._private.build_app import build_app as serve_build_app

    from serve_app.serve.app import build_application

    cfg = parse_app_config({"index_dir": str(tmp_path), "sharding": {"bm25": 2}}, use_env=False)
    app = build_application(cfg, {"BM25Retriever": {"num_replicas": 2}, "BM25Retriever-shard1": {"num_replicas": 3}})
    built = serve_build_app(app, name="t")
    deps = {d.name: d for d in built.deployments}
    assert set(deps) == {"SearchIngress", "BM25Retriever-shard0", "BM25Retriever-shard1", "DenseRetriever", "CrossEncoderReranker"}
    assert deps["BM25Retriever-shard0"].num_replicas == 2 and deps["BM25Retriever-shard1"].num_replicas == 3
    assert deps["BM25Retriever-shard1"].init_args[0].shard == ShardRef(index=1, num_shards=2)
    assert deps["BM25Retriever-shard0"].init_args[0].index_dir == cfg.index_dir
    assert list(tmp_path.iterdir()) == []  # wiring touches no file
    with pytest.raises(ValueError, match="unknown deployment"):
        build_application(cfg, {"BM25Retriever-shard2": {}})


# --------------------------------------------------------------------------- shard sets under the index


def ensure_shards(cfg) -> list:
    """The shard sets the application builder builds for ``cfg`` (``ensure_index`` names them ``bm25-2``...)."""
    built = []
    for name in ensure_index(cfg.index_dir, **cfg.index_build_args()):
        retriever, n = name.split("-")
        built.append(shard_set_dir(cfg.index_dir, retriever, int(n)))
    return built


def test_ensure_shards_builds_once_from_the_index_and_rebuilds_when_stale(tmp_path, tiny_bi_encoder_dir):
    index_dir = tmp_path / "index"
    dense = DenseConfig(model=str(tiny_bi_encoder_dir))
    build_index(CORPUS, index_dir, bm25=BM25Config(), dense=dense, chunking=ChunkingConfig(), show_progress=False)
    cfg = parse_app_config({"index_dir": str(index_dir), "dense": dense.model_dump(), "sharding": {"bm25": 2, "dense": 3}}, use_env=False)
    built = ensure_shards(cfg)
    assert built == [shard_set_dir(index_dir, "bm25", 2), shard_set_dir(index_dir, "dense", 3)]
    assert read_shards_manifest(built[0]).retrievers == ["bm25"] and read_shards_manifest(built[1]).retrievers == ["dense"]
    assert ensure_shards(cfg) == []  # current: nothing rebuilt
    d = open_shard(index_dir, "dense", 2, 3)
    assert d == built[1] / "2"
    with pytest.raises(IndexLoadError, match="no shards.json"):
        open_shard(index_dir, "dense", 0, 2)  # no 2-shard dense set was built
    with pytest.raises(IndexLoadError, match="3 shards, 2 expected"):
        shard_dir(shard_set_dir(index_dir, "dense", 3), 0, num_shards=2)
    # A set from another corpus (as after the index was rebuilt): replicas refuse it, the builder replaces it.
    (built[0] / SHARDS_MANIFEST).write_text(
        json.dumps({**json.loads((built[0] / SHARDS_MANIFEST).read_text()), "corpus_sha256": "0" * 64})
    )
    with pytest.raises(IndexLoadError, match="another corpus"):
        open_shard(index_dir, "bm25", 0, 2)
    assert ensure_shards(cfg) == [built[0]]
    assert open_shard(index_dir, "bm25", 1, 2) == built[0] / "1"


def test_index_built_with_sharding_holds_its_shard_sets(tmp_path):
    """A fresh machine: the builder builds the index and its shard sets in one atomic build."""
    from serve_app.corpus import write_documents_jsonl

    write_documents_jsonl(CORPUS, tmp_path / "corpus.jsonl")
    cfg = parse_app_config({"index_dir": str(tmp_path / "index"), "corpus": str(tmp_path / "corpus.jsonl"), "retrievers": ["bm25"], "sharding": {"bm25": 2}}, use_env=False)
    assert ensure_index(cfg.index_dir, **cfg.index_build_args()) == ["index", "bm25-2"]
    whole = load_bm25(cfg.index_dir)
    parts = [load_bm25(open_shard(cfg.index_dir, "bm25", i, 2)) for i in range(2)]
    assert sum(p.num_documents for p in parts) == whole.num_documents == len(CORPUS)
    assert ensure_index(cfg.index_dir, **cfg.index_build_args()) == []


def test_shard_replica_loader_refuses_a_damaged_shard(tmp_path):
    index_dir = tmp_path / "index"
    build_index(CORPUS, index_dir, bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), show_progress=False)
    cfg = parse_app_config({"index_dir": str(index_dir), "retrievers": ["bm25"], "sharding": {"bm25": 2}}, use_env=False)
    (set_dir,) = ensure_shards(cfg)
    data = set_dir / "1" / "bm25" / "data.csc.index.npy"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert load_bm25(open_shard(index_dir, "bm25", 0, 2)).num_documents == 30
    with pytest.raises(IndexLoadError, match="sha256"):
        load_bm25(open_shard(index_dir, "bm25", 1, 2))


# --------------------------------------------------------------------------- scatter-gather


def _hits(prefix: str, scores: list[float]) -> list[Hit]:
    return [Hit(f"{prefix}{i}", s) for i, s in enumerate(scores)]


def test_scatter_gather_merges_and_names_failed_or_late_shards():
    async def ok(hits):
        return hits

    async def boom():
        raise ConnectionError("replica unavailable")

    async def late():
        await asyncio.sleep(5)
        return []

    async def overloaded():
        raise StageOverloaded("bm25 shard 0", 2.0)

    a, b = _hits("a", [5, 3, 1]), _hits("b", [4, 2])
    got = asyncio.run(scatter_gather("bm25", [lambda: ok(a), lambda: ok(b)], 3, 1.0))
    assert [h.doc_id for h in got] == ["a0", "b0", "a1"]
    with pytest.raises(ShardFailure, match=r"1 of 3 bm25 shards failed \(shard 1: ConnectionError: replica unavailable\)"):
        asyncio.run(scatter_gather("bm25", [lambda: ok(a), boom, lambda: ok(b)], 3, 1.0))
    with pytest.raises(ShardFailure, match=r"shard 0: no answer within 0.2s"):
        asyncio.run(scatter_gather("dense", [late, lambda: ok(b)], 3, 0.2))
    with pytest.raises(StageOverloaded):  # a full queue sheds the request (503), it does not degrade it
        asyncio.run(scatter_gather("bm25", [overloaded, lambda: ok(b)], 3, 1.0))
    assert shard_deadline(2.0) == pytest.approx(1.8)


# --------------------------------------------------------------------------- the ingress over stand-in handles


class LocalStage:
    """What a deployment replica does, in process: a retriever (or the fake reranker), with faults."""

    def __init__(self, retriever: Any = None, fault: Optional[str] = None) -> None:
        self.retriever = retriever
        self.fault = fault

    async def _fault(self) -> None:
        if self.fault == "error":
            raise RuntimeError("injected failure")
        if self.fault == "hang":
            await asyncio.sleep(10)

    async def search(self, query: str, k: int) -> list[Hit]:
        await self._fault()
        return self.retriever.search(query, k)

    async def rerank(self, request: RerankRequest) -> RerankOutcome:
        return RerankOutcome([fake_rerank_score(request.query, d) for d in request.documents], 1, len(request.documents))

    async def ping(self) -> dict[str, Any]:
        await self._fault()
        return {"ok": True}


class FakeHandle:
    """A DeploymentHandle stand-in: ``handle.method.remote(*args)`` returns an awaitable."""

    def __init__(self, stage: LocalStage) -> None:
        self.stage = stage

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.stage, name)
        return SimpleNamespace(remote=lambda *a: method(*a))


@pytest.fixture(scope="module")
def retrievers(tiny_bi_encoder_dir):
    """Whole-corpus BM25 and dense retrievers and their 3-shard counterparts."""
    from serve_app.retrieval.dense import BiEncoder, DenseRetriever

    cfg = DenseConfig(model=str(tiny_bi_encoder_dir))
    encoder = BiEncoder(cfg)
    bm25 = BM25Retriever.build(CORPUS, BM25Config())
    dense = DenseRetriever.build(CORPUS, cfg, ChunkingConfig(), encoder)
    bounds = shard_bounds(len(CORPUS), 3)
    return {
        "bm25": bm25,
        "dense": dense,
        "bm25_shards": bm25.split(bounds),
        "dense_shards": [DenseRetriever.build(part, cfg, ChunkingConfig(), encoder) for part in split_corpus(CORPUS, 3)],
    }


def make_app(handles: dict[str, Any], timeout_s: float = 1.0):
    cfg = parse_app_config({"index_dir": "/nonexistent", "timeouts": {"retriever_timeout_s": timeout_s, "health_timeout_s": timeout_s}}, use_env=False)
    service = SearchService(cfg, HandleBackends(handles, shard_deadline(timeout_s), shard_deadline(timeout_s)), CORPUS, {})
    return create_app(service, api_keys=[])


def post(app, path: str, body: dict[str, Any], method: str = "POST") -> httpx.Response:
    return asgi_request(app, method, path, json=body if method == "POST" else None, raise_app_exceptions=True, base_url="http://t")


def sharded_handles(retrievers, faults: Optional[dict[tuple[str, int], str]] = None) -> dict[str, Any]:
    faults = faults or {}
    return {
        "bm25": [FakeHandle(LocalStage(r, faults.get(("bm25", i)))) for i, r in enumerate(retrievers["bm25_shards"])],
        "dense": [FakeHandle(LocalStage(r, faults.get(("dense", i)))) for i, r in enumerate(retrievers["dense_shards"])],
        "reranker": FakeHandle(LocalStage()),
    }


def test_ingress_over_shards_answers_like_the_unsharded_ingress(retrievers):
    whole = make_app({"bm25": FakeHandle(LocalStage(retrievers["bm25"])), "dense": FakeHandle(LocalStage(retrievers["dense"])), "reranker": FakeHandle(LocalStage())})
    sharded = make_app(sharded_handles(retrievers))
    for q in QUERIES:
        body = {"query": q, "top_k": 15, "rerank_top_m": 5, "top_n": 12}
        want, got = post(whole, "/search", body).json(), post(sharded, "/search", body).json()
        assert got["degraded"] is False
        assert [r["id"] for r in got["results"]] == [r["id"] for r in want["results"]]
        for g, w in zip(got["results"], want["results"]):
            assert g["fused_score"] == pytest.approx(w["fused_score"], abs=1e-9)
            assert g["rerank_score"] == w["rerank_score"]
            assert g["retrievers"].keys() == w["retrievers"].keys()
            for name in g["retrievers"]:
                assert g["retrievers"][name]["rank"] == w["retrievers"][name]["rank"]
                assert g["retrievers"][name]["score"] == pytest.approx(w["retrievers"][name]["score"], abs=1e-5)
        assert got["stages"]["bm25"]["candidates"] == want["stages"]["bm25"]["candidates"]
    health = post(sharded, "/healthz", {}, method="GET")
    assert health.status_code == 200, health.text


@pytest.mark.parametrize("fault,expected", [("error", "shard 2: RuntimeError: injected failure"), ("hang", "shard 2: no answer within 0.45s")])
def test_a_failing_or_late_shard_degrades_its_retriever_and_is_named(retrievers, fault, expected):
    app = make_app(sharded_handles(retrievers, {("bm25", 2): fault}), timeout_s=0.5)
    body = post(app, "/search", {"query": "space planet moon", "top_n": 5}).json()
    assert body["degraded"] is True
    assert body["stages"]["bm25"]["status"] == "error"
    assert expected in body["stages"]["bm25"]["error"] and "1 of 3 bm25 shards failed" in body["stages"]["bm25"]["error"]
    assert body["stages"]["dense"]["status"] == "ok"
    assert body["results"] and all(set(r["retrievers"]) == {"dense"} for r in body["results"])
    health = post(app, "/healthz", {}, method="GET")
    assert health.status_code == 503 and "bm25" in health.json()["error"]["message"] and "shard 2" in health.json()["error"]["message"]


class CountingHandle:
    """A handle stand-in over a real server object, counting the calls of each method."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.server, name)

        def remote(*a: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return method(*a)

        return SimpleNamespace(remote=remote)


def test_a_sharded_dense_retriever_encodes_each_query_once(tmp_path, tiny_bi_encoder_dir):
    """The shards load no model and search the vector the query encoder computed once per query;
    the answers equal the unsharded dense retriever's."""
    from serve_app.index import build_index
    from serve_app.serve.config import DenseServerConfig, QueryEncoderServerConfig, ShardRef
    from serve_app.serve.deployments import DenseServer, QueryEncoderServer

    cfg = DenseConfig(model=str(tiny_bi_encoder_dir))
    d = tmp_path / "index"
    build_index(CORPUS, d, bm25=BM25Config(), dense=cfg, chunking=ChunkingConfig(), show_progress=False, shards={"dense": 3})
    whole = DenseServer(DenseServerConfig(index_dir=str(d), dense=cfg))
    shards = [DenseServer(DenseServerConfig(index_dir=str(d), dense=cfg, shard=ShardRef(index=i, num_shards=3), encode_queries=False)) for i in range(3)]
    assert all(s.retriever.encoder is None for s in shards)  # no model in a shard replica
    encoder = CountingHandle(QueryEncoderServer(QueryEncoderServerConfig(index_dir=str(d), dense=cfg)))
    shard_handles = [CountingHandle(s) for s in shards]
    backends = HandleBackends({"dense": shard_handles, "dense_encoder": encoder}, 2.0, 2.0)
    for q in QUERIES:
        got = asyncio.run(backends.retrieve("dense", q, 8))
        want = asyncio.run(whole.search(q, 8))
        assert [h.doc_id for h in got] == [h.doc_id for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
    assert encoder.calls == {"encode": len(QUERIES)}
    assert all(h.calls == {"search_vector": len(QUERIES)} for h in shard_handles)
    with pytest.raises(RuntimeError, match="no query encoder"):
        asyncio.run(shards[0].search("protein", 3))
    asyncio.run(shards[0].check_health())
    asyncio.run(encoder.server.check_health())
    assert asyncio.run(encoder.server.ping())["model"] == str(tiny_bi_encoder_dir)


def test_the_builder_deploys_a_query_encoder_only_for_sharded_dense(tmp_path):
    from ray.serve._private.build_app import build_app as serve_build_app

    from serve_app.serve.app import build_application

    def names(sharding):
        cfg = parse_app_config({"index_dir": str(tmp_path), "sharding": sharding}, use_env=False)
        return {d.name: d for d in serve_build_app(build_application(cfg), name="t").deployments}

    assert "DenseQueryEncoder" not in names({})
    assert "DenseQueryEncoder" not in names({"bm25": 2})
    deps = names({"dense": 2})
    assert "DenseQueryEncoder" in deps
    assert deps["DenseRetriever-shard0"].init_args[0].encode_queries is False
    ingress_args = deps["SearchIngress"].init_args
    assert len(ingress_args) == 6 and ingress_args[5] is not None  # the encoder's handle reaches the ingress
