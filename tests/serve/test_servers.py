"""The server classes without Ray, and the builder's wiring: what each deployment is made of.

The classes of serve_app.serve.deployments are plain; the builder (serve_app.serve.app) makes
them deployments with the options of DEPLOYMENT_DEFAULTS and binds typed config objects."""

from __future__ import annotations

import asyncio

import pytest
from serve_fakes import small_corpus

from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
from serve_app.index import build_index, load_index
from serve_app.serve.config import BatchingConfig, BM25ServerConfig, DenseServerConfig, RerankerConfig, RerankerServerConfig, ShardRef, parse_app_config
from serve_app.serve.deployments import BM25Server, DenseServer, InjectedFault, RerankerServer
from serve_app.types import RerankRequest

CORPUS = small_corpus(40)
QUERIES = ["protein gene", "space planet moon", "music band", "ocean water", "football team", "food bread"]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_bi_encoder_dir):
    d = tmp_path_factory.mktemp("servers") / "index"
    build_index(CORPUS, d, bm25=BM25Config(), dense=DenseConfig(model=str(tiny_bi_encoder_dir)), chunking=ChunkingConfig(), show_progress=False, shards={"bm25": 2})
    return d


@pytest.fixture(scope="module")
def reranker_cfg(tiny_cross_encoder_dir):
    return RerankerConfig(model=str(tiny_cross_encoder_dir), device="cpu")


def test_reranker_server_merges_concurrent_requests_and_scores_as_the_reranker(reranker_cfg):
    from serve_app.rerank import Reranker

    server = RerankerServer(RerankerServerConfig(reranker=reranker_cfg, batching=BatchingConfig(max_batch_size=4)))
    docs = [d.content for d in CORPUS][:5]

    async def all_at_once():
        return await asyncio.gather(*(server.rerank(RerankRequest(q, docs)) for q in QUERIES))

    outcomes = asyncio.run(all_at_once())
    direct = Reranker.from_config(reranker_cfg.default_model())
    for q, out in zip(QUERIES, outcomes):
        assert out.scores == pytest.approx([float(x) for x in direct.rerank(q, docs)], abs=1e-5)
    sizes = [n for _, n in server.coalescer.calls]
    assert sum(sizes) == len(QUERIES) and max(sizes) > 1 and max(sizes) <= 4  # merged, never above max_batch_size
    assert max(o.batch_size for o in outcomes) > 1
    stats = asyncio.run(server.stats())
    assert stats["serve_batching"] is False and stats["pairs_scored"] == len(QUERIES) * len(docs)


def test_reranker_server_reconfigures_faults_and_checks_its_model(reranker_cfg):
    server = RerankerServer(RerankerServerConfig(reranker=reranker_cfg))
    server.reconfigure({"max_batch_size": 3, "batch_wait_timeout_s": 0.0, "fault": {"mode": "error"}})
    assert server.coalescer.max_items == 3 and server.batching == BatchingConfig(max_batch_size=3, batch_wait_timeout_s=0.0)
    with pytest.raises(InjectedFault):
        asyncio.run(server.rerank(RerankRequest("q", ["d"])))
    server.reconfigure({})
    asyncio.run(server.check_health())  # never scored yet: the probe pair is scored now
    assert server.reranker.scorer.pairs_scored == 1
    asyncio.run(server.check_health())  # it just answered: no second probe
    assert server.reranker.scorer.pairs_scored == 1
    server.reranker.scorer.score = lambda pairs: [float("nan")]
    server._last_scored = 0.0
    with pytest.raises(RuntimeError, match="health probe"):
        asyncio.run(server.check_health())


def test_retriever_servers_answer_as_the_index_and_check_their_index(index_dir, tiny_bi_encoder_dir):
    loaded = load_index(index_dir)
    bm25 = BM25Server(BM25ServerConfig(index_dir=str(index_dir)))
    dense = DenseServer(DenseServerConfig(index_dir=str(index_dir), dense=DenseConfig(model=str(tiny_bi_encoder_dir))))
    for q in QUERIES:
        assert asyncio.run(bm25.search(q, 5)) == loaded.bm25.search(q, 5)
        got, want = asyncio.run(dense.search(q, 5)), loaded.dense.search(q, 5)
        assert [h.doc_id for h in got] == [h.doc_id for h in want]
    asyncio.run(bm25.check_health())
    asyncio.run(dense.check_health())
    shards = [BM25Server(BM25ServerConfig(index_dir=str(index_dir), shard=ShardRef(index=i, num_shards=2))) for i in range(2)]
    assert sum(s.retriever.num_documents for s in shards) == len(CORPUS)
    assert asyncio.run(shards[1].ping())["shard"] == {"index": 1, "num_shards": 2}


def test_builder_applies_the_defaults_then_the_overrides_and_binds_typed_configs(tmp_path):
    from ray.serve._private.build_app import build_app as serve_build_app

    from serve_app.serve.app import DEPLOYMENT_DEFAULTS, build_application

    cfg = parse_app_config({"index_dir": str(tmp_path), "batching": {"max_batch_size": 6}}, use_env=False)
    built = serve_build_app(build_application(cfg, {"DenseRetriever": {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 7}}), name="t")
    deps = {d.name: d for d in built.deployments}
    assert set(deps) == set(DEPLOYMENT_DEFAULTS)
    for name, defaults in DEPLOYMENT_DEFAULTS.items():
        d = deps[name]
        if name == "DenseRetriever":
            assert d.ray_actor_options["num_cpus"] == 0.25 and d.max_ongoing_requests == 7
        else:
            assert d.ray_actor_options["num_cpus"] == defaults["ray_actor_options"]["num_cpus"] and d.max_ongoing_requests == defaults["max_ongoing_requests"]
    # Typed, validated configs are bound: replicas never parse a dict.
    (rr_cfg,) = deps["CrossEncoderReranker"].init_args
    assert isinstance(rr_cfg, RerankerServerConfig) and rr_cfg.reranker == cfg.reranker and rr_cfg.batching.max_batch_size == 6
    assert deps["CrossEncoderReranker"].user_config["max_batch_size"] == 6  # the live knob starts from the same default
    (dense_cfg,) = deps["DenseRetriever"].init_args
    assert isinstance(dense_cfg, DenseServerConfig) and dense_cfg.batching == cfg.dense_batching and dense_cfg.shard is None
    assert deps["SearchIngress"].init_args[0] is cfg or deps["SearchIngress"].init_args[0] == cfg


def test_the_ingress_health_check_reads_the_store_and_fails_without_it(tmp_path):
    """SearchIngress.check_health does a real read of its document store, and fails once the
    store's file is gone or is no longer a store."""
    from serve_app.serve.deployments import SearchIngress

    d = tmp_path / "index"
    build_index(CORPUS, d, bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), show_progress=False)
    ingress = SearchIngress(parse_app_config({"index_dir": str(d), "retrievers": ["bm25"]}, use_env=False), object(), None, object())
    asyncio.run(ingress.check_health())
    store = d / "documents.sqlite"
    store.rename(tmp_path / "moved.sqlite")
    with pytest.raises(Exception, match="cannot be read"):
        asyncio.run(ingress.check_health())
    (tmp_path / "moved.sqlite").rename(store)
    asyncio.run(ingress.check_health())
    store.write_bytes(b"\0" * 4096)
    with pytest.raises(Exception, match="no longer an SQLite database"):
        asyncio.run(ingress.check_health())
