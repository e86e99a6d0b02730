"""SciFact with 10 % of the documents changed, 5 % deleted and 5 % added through the writer:
BM25, dense (Flat) and hybrid top-100 for all 300 test queries equal a fresh build of the final
corpus, unsharded and with 2 + 2 shards, before and after a merge."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from serve_app.config import BM25Config, ChunkingConfig, FusionConfig, WritesConfig
from serve_app.testing import rankings_agree

K = 100


@pytest.fixture(scope="module")
def scifact(scifact_dir):
    from serve_app.corpus import load_beir

    return load_beir(scifact_dir, "test")


def _writes(corpus, rng: random.Random) -> list[tuple[str, list]]:
    """The batches: 10 % of the documents changed, 5 % deleted, 5 % added, interleaved, 100 per batch."""
    ids = [d.id for d in corpus]
    picked = rng.sample(ids, int(0.15 * len(ids)))
    changed, deleted = picked[: int(0.10 * len(ids))], picked[int(0.10 * len(ids)) :]
    by_id = {d.id: d for d in corpus}
    donors = list(corpus)
    ops: list[tuple[str, object]] = []
    for i in changed:  # a changed abstract: half of it, and a passage of another
        d, other = by_id[i], rng.choice(donors)
        ops.append(("upsert", {"id": i, "title": d.title, "text": d.text[: len(d.text) // 2] + " " + other.text[: 300]}))
    for j in range(int(0.05 * len(ids))):
        a, b = rng.choice(donors), rng.choice(donors)
        ops.append(("upsert", {"id": f"added-{j}", "title": b.title, "text": a.text[len(a.text) // 3 :] + " " + b.text[:200]}))
    ops += [("delete", i) for i in deleted]
    rng.shuffle(ops)
    batches = []
    for start in range(0, len(ops), 100):
        part = ops[start : start + 100]
        batches.append(("upsert", [p for k, p in part if k == "upsert"]))
        batches.append(("delete", [p for k, p in part if k == "delete"]))
    return [(k, b) for k, b in batches if b]


def test_scifact_after_writes_equals_a_fresh_build(scifact, tmp_path_factory, tiny_dense, tiny_encoder):
    from serve_app.index import build_index, load_bm25, load_dense, load_documents, load_index, open_shard
    from serve_app.live.bm25 import LiveBM25
    from serve_app.live.dense import LiveDense
    from serve_app.live.follower import Follower, LocalSource
    from serve_app.live.merge import live_documents, merge
    from serve_app.live.writer import DocumentWriter
    from serve_app.retrieval.bm25 import BM25Retriever
    from serve_app.retrieval.dense import DenseRetriever
    from serve_app.retrieval.fusion import fuse
    from serve_app.retrieval.sharding import merge_top_k

    corpus = list(scifact.corpus)
    idx = tmp_path_factory.mktemp("scifact-live") / "idx"
    build_index(corpus, idx, bm25=BM25Config(), dense=tiny_dense, chunking=ChunkingConfig(), encoder=tiny_encoder, show_progress=False, shards={"bm25": 2, "dense": 2})
    writer = DocumentWriter(idx, WritesConfig(), encoder=tiny_encoder, shards={"bm25": 2, "dense": 2})
    base_docs = list(load_documents(idx)[0])
    stats = writer.base_stats()
    bm25 = LiveBM25(load_bm25(idx), base_docs, None)
    dense = LiveDense(load_dense(idx, tiny_dense, load_encoder=False))
    bm25_shards = [LiveBM25(load_bm25(open_shard(idx, "bm25", i, 2)), list(load_documents(open_shard(idx, "bm25", i, 2))[0]), stats, shard=i) for i in range(2)]
    dense_shards = [LiveDense(load_dense(open_shard(idx, "dense", i, 2), tiny_dense, load_encoder=False), shard=i) for i in range(2)]

    batches = _writes(corpus, random.Random(7))
    for kind, batch in batches:
        (writer.upsert if kind == "upsert" else writer.delete)(batch)
    follower = Follower([bm25, dense, *bm25_shards, *dense_shards], LocalSource(writer), base_seq=0, refresh_interval_s=1.0)
    asyncio.run(follower.catch_up())
    assert follower.applied_seq == writer.last_seq == len(batches)

    final, sources = live_documents(writer, writer.last_seq)
    n = len(corpus)
    assert len(final) == n - int(0.05 * n) + int(0.05 * n)
    queries = list(scifact.queries.values())
    qv = tiny_encoder.encode_queries(queries)

    fresh_bm25 = BM25Retriever.build(final)
    fresh_vectors = tiny_encoder.encode_documents([d.content for d in final])
    log_vectors = np.concatenate([writer.log.reader().change(a, b).vectors if kind == "log" else dense.base._cpu_index.reconstruct(a)[None, :] for kind, a, b in sources])
    assert np.abs(fresh_vectors - log_vectors).max() < 1e-5  # the writer's vectors are what a fresh encoding gives
    fresh_dense = DenseRetriever.from_vectors(log_vectors, [d.id for d in final], tiny_dense)
    fresh_reencoded = DenseRetriever.from_vectors(fresh_vectors, [d.id for d in final], tiny_dense)

    want_bm25 = fresh_bm25.search_batch(queries, K)
    want_dense = fresh_dense.search_vectors(qv, K)
    want_hybrid = [fuse({"bm25": b, "dense": d}, FusionConfig(), K) for b, d in zip(want_bm25, want_dense)]

    def check(bm25_lists, dense_lists, exact: bool, what: str) -> None:
        """BM25: bit for bit (unsharded), or the same ranking up to the order of equal scores
        (shards break ties by shard). Dense: the same ranking with scores within 1e-6 (FAISS's
        inner-product kernels differ in the last bits with the batch size and with a selector,
        so near-ties can swap). Hybrid: equal wherever both inputs are equal, and the same
        documents for every query."""
        same_bm25 = (lambda a, b: a == b) if exact else (lambda a, b: rankings_agree(a, b))
        assert sum(same_bm25(a, b) for a, b in zip(bm25_lists, want_bm25)) == len(queries), f"{what}: bm25"
        assert sum(rankings_agree(a, b, tol=1e-6) for a, b in zip(dense_lists, want_dense)) == len(queries), f"{what}: dense"
        hybrid = [fuse({"bm25": b, "dense": d}, FusionConfig(), K) for b, d in zip(bm25_lists, dense_lists)]
        for h, w, b, d, wb, wd in zip(hybrid, want_hybrid, bm25_lists, dense_lists, want_bm25, want_dense):
            if b == wb and d == wd:
                assert h == w, f"{what}: hybrid"
        if exact:  # (shards order equal BM25 scores by shard, so fused ranks of ties differ)
            exact_hybrid = sum(h == w for h, w in zip(hybrid, want_hybrid))
            assert exact_hybrid >= 0.9 * len(queries), f"{what}: hybrid equal for {exact_hybrid} queries"

    check(bm25.search_batch(queries, K), dense.search_vectors(qv, K), True, "unsharded, live")
    assert all(rankings_agree(a, b, tol=1e-5) for a, b in zip(dense.search_vectors(qv, K), fresh_reencoded.search_vectors(qv, K)))
    sharded_bm25 = [merge_top_k([s.search(q, K) for s in bm25_shards], K) for q in queries]
    sharded_dense = [merge_top_k([s.search_vectors(qv[i : i + 1], K)[0] for s in dense_shards], K) for i in range(len(queries))]
    check(sharded_bm25, sharded_dense, False, "sharded, live")

    # merge: the new base (and its shard sets) answers the same; the live views still do
    report = merge(writer)
    assert report.base_seq == len(batches) and report.vectors_encoded == 0
    merged = load_index(idx, encoder=tiny_encoder)
    check(merged.bm25.search_batch(queries, K), merged.dense.search_vectors(qv, K), True, "merged")
    merged_bm25 = [merge_top_k([load_bm25(open_shard(idx, "bm25", i, 2)).search(q, K) for i in range(2)], K) for q in queries]
    merged_dense_shards = [load_dense(open_shard(idx, "dense", i, 2), tiny_dense, load_encoder=False) for i in range(2)]
    merged_dense = [merge_top_k([s.search_vectors(qv[i : i + 1], K)[0] for s in merged_dense_shards], K) for i in range(len(queries))]
    check(merged_bm25, merged_dense, False, "merged shards")
    check(bm25.search_batch(queries, K), dense.search_vectors(qv, K), True, "live after the merge")
    writer.close()
