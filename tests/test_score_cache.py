"""The pair-score cache (serve_app.rerank.cache): exact hits, what the key holds, the byte bound,
and one lookup per request in the reranker replica."""

from __future__ import annotations

import numpy as np

from serve_app.rerank.cache import ENTRY_OVERHEAD_BYTES, ScoreCache, entry_bytes
from serve_app.types import RerankRequest
from tests.test_cascade import QUERIES, models  # noqa: F401 - models: the two tiny rerankers (a fixture)
from tests.test_pipeline import DOCS


# --------------------------------------------------------------------------- the score cache


def test_cached_scores_equal_uncached_ones_exactly(models):
    from serve_app.rerank import Reranker

    plain = models["large"]
    cache = ScoreCache(1 << 20)
    cached = Reranker(plain.scorer, plain.cfg, cache, "large")
    texts = [d.content for d in DOCS]
    requests = [RerankRequest(q, texts[i : i + 7]) for i, q in enumerate(QUERIES)]
    first = cached.rerank_many(requests)
    assert cache.stats()["misses"] == 28 and cache.stats()["hits"] == 0
    again = cached.rerank_many(requests)
    assert cache.stats()["hits"] == 28
    reference = plain.rerank_many(requests)
    for a, b, c in zip(first, again, reference):
        assert a.dtype == c.dtype and np.array_equal(a, c) and np.array_equal(b, c)
    # partly cached: only the new documents are scored, the answer is still exact
    mixed = RerankRequest(QUERIES[0], [texts[3], texts[15], texts[0], texts[16]])
    before = cached.scorer.pairs_scored
    (scores, pairs, _), = cached.rerank_many_detailed([mixed])
    assert pairs == 2 and cached.scorer.pairs_scored - before == 2
    # the hits are the stored bits; the misses are what scoring them (alone) computes
    assert scores[0] == first[0][3] and scores[2] == first[0][0]
    assert np.array_equal(scores[[1, 3]], plain.rerank_many([RerankRequest(QUERIES[0], [texts[15], texts[16]])])[0])
    # scored in another batch, a pair differs at most in its last bits (padding), with or without a cache
    assert np.allclose(scores, plain.rerank_many([mixed])[0], rtol=0, atol=1e-5)
    assert cached.cached(mixed) == [float(x) for x in scores]


def test_what_the_score_depends_on_is_in_the_key(models):
    from serve_app.rerank import Reranker

    plain = models["large"]
    cache = ScoreCache(1 << 20)
    a = Reranker(plain.scorer, plain.cfg, cache, "a")
    b = Reranker(models["small"].scorer, models["small"].cfg, cache, "b")
    doc = " ".join(["protein"] * 200)
    req = RerankRequest("protein", [doc])
    sa = a.rerank_many([req])[0]
    assert b.cached(req) == [None]  # models never share entries
    assert np.array_equal(b.rerank_many([req])[0], models["small"].rerank_many([req])[0])
    short = RerankRequest("protein", [doc], max_tokens_per_doc=8)  # another effective max length
    assert a.cached(short) == [None]
    assert not np.array_equal(a.rerank_many([short])[0], sa)
    assert a.cached(RerankRequest("protein", [doc], truncation_direction="left")) == [None]
    assert a.cached(RerankRequest("Protein", [doc])) == [None]
    # the key holds a digest of the document's text: a document replaced by a live write never
    # meets the score of its old text
    assert a.cached(RerankRequest("protein", [doc + " replaced"])) == [None]
    assert a.cached(req) == [float(sa[0])]
    # a reloaded model starts empty; the other model keeps its entries
    assert cache.drop_model("a") >= 1
    assert a.cached(req) == [None] and b.cached(req) != [None]


def test_the_byte_bound_holds_and_evicts_least_recently_used():
    cache = ScoreCache(max_bytes=entry_bytes("q") * 10)
    ctx = cache.context("m", 512)
    cache.put(ctx, "q", [f"d{i}" for i in range(8)], range(8))
    assert len(cache) == 8
    assert cache.get(ctx, "q", ["d0"]) == [0.0]  # d0 is now the most recently used
    cache.put(ctx, "q", [f"e{i}" for i in range(5)], range(5))
    assert cache.bytes <= cache.max_bytes and len(cache) == 10
    assert cache.get(ctx, "q", ["d0", "d1", "d3", "d4", "e4"]) == [0.0, None, None, 4.0, 4.0]  # d1-d3 were the least recently used
    assert cache.stats()["evictions"] == 3
    huge = ScoreCache(max_bytes=ENTRY_OVERHEAD_BYTES)
    huge.put(huge.context("m", 1), "q" * 100, ["d"], [1.0])  # an entry larger than the bound is not kept
    assert len(huge) == 0 and huge.bytes == 0
    off = ScoreCache(0)
    off.put(off.context("m", 1), "q", ["d"], [1.0])
    assert len(off) == 0


def test_the_charged_bytes_cover_the_memory_entries_take():
    import tracemalloc

    cache = ScoreCache(1 << 30)
    ctx = cache.context("m", 512)
    docs = [f"document number {i}" for i in range(5000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, 5000, 10):
            cache.put(ctx, f"query {i} " + "x" * 40, docs[i : i + 10], [float(j) + 0.25 for j in range(10)])
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == 5000
    assert used <= cache.bytes, (used, cache.bytes)


# --------------------------------------------------------------------------- query-hash routing


def test_the_reranker_replica_looks_the_cache_up_once_per_request(tiny_cross_encoder_dir):
    """A partly cached request is looked up once (its hits and misses counted once), only its
    misses are scored, and a fully cached one is answered without a model call."""
    import asyncio

    from serve_app.serve.config import RerankerConfig, RerankerServerConfig
    from serve_app.serve.deployments import RerankerServer

    cfg = RerankerConfig(model=str(tiny_cross_encoder_dir), device="cpu", score_cache={"max_bytes": 1 << 20})
    server = RerankerServer(RerankerServerConfig(reranker=cfg))
    texts = [d.content for d in DOCS]

    async def run():
        first = await server.rerank(RerankRequest("protein cell", texts[:4]))
        stats = server.cache.stats()
        assert (stats["hits"], stats["misses"]) == (0, 4)
        before = server.reranker.scorer.pairs_scored
        mixed = await server.rerank(RerankRequest("protein cell", [texts[1], texts[9], texts[2], texts[10]]))
        stats = server.cache.stats()
        assert (stats["hits"], stats["misses"]) == (2, 6)  # one lookup of 4 documents: 2 hits, 2 misses
        assert server.reranker.scorer.pairs_scored - before == 2 and mixed.cached == 2
        assert mixed.scores[0] == first.scores[1] and mixed.scores[2] == first.scores[2]
        again = await server.rerank(RerankRequest("protein cell", texts[:4]))
        stats = server.cache.stats()
        assert (stats["hits"], stats["misses"]) == (6, 6) and again.cached == 4 and again.batch_size == 0
        assert again.scores == first.scores

    asyncio.run(run())
