"""Sharded retrieval: sharded results equal unsharded results (ids and scores), BM25 and dense."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
from serve_app.corpus import Corpus
from serve_app.errors import IndexLoadError
from serve_app.index import SHARDS_MANIFEST, build_index, build_shard_set, load_index, load_shards, read_manifest, read_shards_manifest, shard_dir
from serve_app.retrieval.bm25 import BM25Retriever
from serve_app.retrieval.sharding import ShardedRetriever, merge_top_k, shard_bounds, split_corpus
from serve_app.types import Document, Hit

WORDS = (
    "protein cell gene dna virus vaccine disease cancer tumor patients clinical trial study result effect risk treatment "
    "ocean sea river water climate weather rain snow football soccer team player goal music song album band space star planet moon"
).split()
CHUNKING = ChunkingConfig(enabled=True, size=8, stride=6)


def make_corpus(n: int = 41, seed: int = 7, duplicates: bool = True) -> Corpus:
    """Documents of varied length (some longer than a chunk); with ``duplicates``, some texts repeat (tied scores)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 22)))
        if duplicates and i % 10 == 9:
            text = docs[i - 7].text  # an exact copy of an earlier document, often in another shard
        docs.append(Document(f"d{i:03d}", text, title=f"t{i}"))
    return Corpus(docs)


def queries(n: int = 25, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(n)] + ["zzz nothing matches"]


def assert_same_hits(got: list[Hit], want: list[Hit], what: str) -> None:
    assert [h.doc_id for h in got] == [h.doc_id for h in want], what
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=0, atol=1e-5, err_msg=what)


# --------------------------------------------------------------------------- assignment and merge


def test_shard_bounds_are_contiguous_balanced_and_deterministic():
    assert shard_bounds(10, 1) == [(0, 10)]
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    for n, s in ((41, 2), (41, 3), (7, 7), (1000, 13)):
        b = shard_bounds(n, s)
        assert b[0][0] == 0 and b[-1][1] == n and all(b[i][1] == b[i + 1][0] for i in range(s - 1))
        sizes = [e - st for st, e in b]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(ValueError, match="non-empty"):
        shard_bounds(2, 3)
    with pytest.raises(ValueError):
        shard_bounds(5, 0)
    corpus = make_corpus()
    parts = split_corpus(corpus, 3)
    assert [d.id for p in parts for d in p] == corpus.ids


def test_merge_top_k_keeps_best_and_breaks_ties_by_shard_then_rank():
    a = [Hit("a1", 5.0), Hit("a2", 3.0), Hit("a3", 1.0)]
    b = [Hit("b1", 4.0), Hit("b2", 3.0)]
    assert [h.doc_id for h in merge_top_k([a, b], 4)] == ["a1", "b1", "a2", "b2"]
    assert [h.doc_id for h in merge_top_k([b, a], 4)] == ["a1", "b1", "b2", "a2"]
    assert merge_top_k([[], []], 3) == []
    assert len(merge_top_k([a, b], 10)) == 5
    with pytest.raises(ValueError, match="more than one shard"):
        merge_top_k([a, [Hit("a1", 9.0)]], 3)


# --------------------------------------------------------------------------- BM25


@pytest.mark.parametrize("method", ["lucene", "robertson", "bm25+"])
@pytest.mark.parametrize("chunking", [ChunkingConfig(), CHUNKING], ids=["docs", "chunks"])
@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_bm25_split_scores_equal_unsharded(num_shards, chunking, method):
    corpus = make_corpus()
    cfg = BM25Config(method=method)
    whole = BM25Retriever.build(corpus, cfg, chunking)
    sharded = ShardedRetriever(whole.split(shard_bounds(len(corpus), num_shards)))
    for k in (1, 5, 17, 100):
        for q in queries():
            want = whole.search(q, k)
            got = sharded.search(q, k)
            assert_same_hits(got, want, f"{q!r} k={k}")
            # BM25 shard scores are the very same float32 sums: equal, not merely close.
            assert [h.score for h in got] == [h.score for h in want]
    # The tie case exists in this corpus (duplicate texts in different shards), so tie order is checked.
    hits = whole.search(corpus[2].text, 50)
    assert any(a.score == b.score for a, b in zip(hits, hits[1:]))


def test_bm25_built_per_shard_would_not_be_comparable():
    """Why the postings are split from one whole-corpus index: per-shard statistics change scores."""
    corpus = make_corpus()
    whole = BM25Retriever.build(corpus, BM25Config())
    parts = split_corpus(corpus, 2)
    naive = ShardedRetriever([BM25Retriever.build(p, BM25Config()) for p in parts])
    differs = sum(naive.search(q, 10) != whole.search(q, 10) for q in queries())
    assert differs > 0


def test_rank_bm25_engine_is_refused_for_sharding(tmp_path):
    corpus = make_corpus()
    ref = BM25Retriever.build(corpus, BM25Config(engine="rank_bm25", method="robertson"))
    with pytest.raises(ValueError, match="bm25s"):
        ref.split(shard_bounds(len(corpus), 2))
    with pytest.raises(ValueError, match="bm25s"):
        build_shard_set(corpus, tmp_path / "s", 2, bm25=BM25Config(engine="rank_bm25", method="robertson"), dense=None, chunking=ChunkingConfig())


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_bm25_shard_set_on_disk_equals_unsharded_index(tmp_path, num_shards):
    corpus = make_corpus()
    manifest = build_index(corpus, tmp_path / "whole", bm25=BM25Config(), dense=None, chunking=CHUNKING, show_progress=False)
    sm = build_shard_set(corpus, tmp_path / "shards", num_shards, bm25=BM25Config(), dense=None, chunking=CHUNKING)
    assert sm.corpus_sha256 == manifest.corpus.sha256  # same corpus fingerprint as the unsharded index
    assert sm.num_shards == num_shards and sm.bm25_statistics == "global"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards", "whole"]  # no temporary directory left
    whole = load_index(tmp_path / "whole").bm25
    sharded = load_shards(tmp_path / "shards")["bm25"]
    assert len(sharded.shards) == num_shards
    for q in queries():
        for k in (3, 40):
            got, want = sharded.search(q, k), whole.search(q, k)
            assert [h.doc_id for h in got] == [h.doc_id for h in want]
            assert [h.score for h in got] == [h.score for h in want]
    assert sharded.search_batch(queries()[:4], 5) == [whole.search(q, 5) for q in queries()[:4]]
    # Each shard is an ordinary, checksummed index holding only its documents.
    for info in sm.shards:
        m = read_manifest(shard_dir(tmp_path / "shards", info.index))
        assert m.corpus.num_documents == info.end - info.start


@pytest.mark.slow
@pytest.mark.scifact
def test_bm25_sharded_equals_unsharded_on_scifact(scifact_dir):
    from serve_app.corpus import load_beir

    data = load_beir(scifact_dir, split="test")
    corpus = data.corpus  # all 5183 documents
    whole = BM25Retriever.build(corpus, BM25Config())
    qs = list(data.queries.values())  # the 300 test queries
    for num_shards in (2, 3):
        sharded = ShardedRetriever(whole.split(shard_bounds(len(corpus), num_shards)))
        for q in qs:
            want = whole.search(q, 100)
            got = sharded.search(q, 100)
            assert [h.doc_id for h in got] == [h.doc_id for h in want], q
            assert np.allclose([h.score for h in got], [h.score for h in want], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- dense


@pytest.fixture(scope="module")
def encoder(tiny_bi_encoder_dir):
    from serve_app.retrieval.dense import BiEncoder

    return BiEncoder(DenseConfig(model=str(tiny_bi_encoder_dir)))


@pytest.mark.parametrize("chunking", [ChunkingConfig(), CHUNKING], ids=["docs", "chunks"])
def test_dense_shard_sets_equal_unsharded(tmp_path, encoder, chunking):
    corpus = make_corpus(duplicates=False)  # identical texts would tie; FAISS does not define tie order
    cfg = encoder.cfg
    build_index(corpus, tmp_path / "whole", bm25=None, dense=cfg, chunking=chunking, encoder=encoder, show_progress=False)
    whole = load_index(tmp_path / "whole", encoder=encoder).dense
    for num_shards in (1, 2, 3):
        set_dir = tmp_path / f"shards{num_shards}"
        sm = build_shard_set(corpus, set_dir, num_shards, bm25=None, dense=cfg, chunking=chunking, encoder=encoder)
        assert sm.retrievers == ["dense"] and sm.bm25_statistics is None
        sharded = load_shards(set_dir, encoder=encoder)["dense"]
        qs = queries()
        for k in (1, 7, 41):
            for q, got, want in zip(qs, sharded.search_batch(qs, k), whole.search_batch(qs, k)):
                assert_same_hits(got, want, f"{num_shards} shards {q!r} k={k}")
        assert_same_hits(sharded.search(qs[0], 5), whole.search(qs[0], 5), "single query")


def test_hybrid_shard_set_holds_both_retrievers(tmp_path, encoder):
    corpus = make_corpus()
    sm = build_shard_set(corpus, tmp_path / "s", 2, bm25=BM25Config(), dense=encoder.cfg, chunking=ChunkingConfig(), encoder=encoder)
    assert sm.retrievers == ["bm25", "dense"]
    loaded = load_shards(tmp_path / "s", encoder=encoder)
    assert set(loaded) == {"bm25", "dense"}
    whole = BM25Retriever.build(corpus, BM25Config())
    assert loaded["bm25"].search("gene cancer", 10) == whole.search("gene cancer", 10)


# --------------------------------------------------------------------------- shard set checks


def test_shard_set_is_checked_when_opened(tmp_path):
    corpus = make_corpus()
    set_dir = tmp_path / "s"
    sm = build_shard_set(corpus, set_dir, 2, bm25=BM25Config(), dense=None, chunking=ChunkingConfig())
    assert shard_dir(set_dir, 1, num_shards=2, corpus_sha256=sm.corpus_sha256, retriever="bm25") == set_dir / "1"
    with pytest.raises(IndexLoadError, match="2 shards, 3 expected"):
        shard_dir(set_dir, 0, num_shards=3)
    with pytest.raises(IndexLoadError, match="another corpus"):
        shard_dir(set_dir, 0, corpus_sha256="0" * 64)
    with pytest.raises(IndexLoadError, match="no dense"):
        shard_dir(set_dir, 0, retriever="dense")
    with pytest.raises(IndexLoadError, match="no shard 2"):
        shard_dir(set_dir, 2)
    raw = json.loads((set_dir / SHARDS_MANIFEST).read_text())
    raw["shards"][0]["end"] += 1
    (set_dir / SHARDS_MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(IndexLoadError, match="bounds"):
        read_shards_manifest(set_dir)
    (set_dir / SHARDS_MANIFEST).write_text("{not json")
    with pytest.raises(IndexLoadError, match="not valid JSON"):
        read_shards_manifest(set_dir)
    with pytest.raises(IndexLoadError, match="not a shard set"):
        read_shards_manifest(tmp_path)


def test_rebuilding_a_shard_set_replaces_it_atomically(tmp_path):
    set_dir = tmp_path / "s"
    build_shard_set(make_corpus(seed=1), set_dir, 3, bm25=BM25Config(), dense=None, chunking=ChunkingConfig())
    sm = build_shard_set(make_corpus(seed=2), set_dir, 2, bm25=BM25Config(), dense=None, chunking=ChunkingConfig())
    assert read_shards_manifest(set_dir) == sm
    assert sorted(p.name for p in set_dir.iterdir()) == ["0", "1", SHARDS_MANIFEST]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="refusing"):
        build_shard_set(make_corpus(), tmp_path / "other", 2, bm25=BM25Config(), dense=None, chunking=ChunkingConfig())
