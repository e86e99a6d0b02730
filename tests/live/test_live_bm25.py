"""BM25 under writes: after every batch, the scores of a fresh bm25s build of the same live
documents (bit for bit), and the bookkeeping bugs other engines shipped, as regressions."""

from __future__ import annotations

import random

import pytest

from serve_app.config import BM25Config, ChunkingConfig
from serve_app.live.bm25 import CorpusStats, LiveBM25, batch_stats
from serve_app.live.changes import DELETE, UPSERT, Batch, Change
from serve_app.retrieval.bm25 import BM25Retriever
from serve_app.types import Document

from tests.live.conftest import docs

QUERIES = ["protein gene", "ocean water study", "football team results", "music album", "planet moon star", "bread cheese", "zebra", "study about", "results of the sea"]


class Mirror:
    """A live BM25 and the list of live documents in live order, kept in step."""

    def __init__(self, corpus, cfg=BM25Config(), chunking=ChunkingConfig()) -> None:
        self.cfg, self.chunking = cfg, chunking
        self.base = BM25Retriever.build(corpus, cfg, chunking)
        self.live = LiveBM25(self.base, corpus)
        self.order = list(corpus)
        self.seq = 0

    def batch(self, upserts=(), deletes=()) -> None:
        self.seq += 1
        by_id = {d.id: d for d in self.order}
        removed = [by_id[d.id] for d in upserts if d.id in by_id] + [by_id[i] for i in deletes if i in by_id]
        gone = {d.id for d in upserts} | set(deletes)
        self.order = [d for d in self.order if d.id not in gone] + list(upserts)
        changes = [Change(UPSERT, d.id, d) for d in upserts] + [Change(DELETE, i) for i in deletes if i in by_id]
        self.last = (changes, batch_stats(removed, list(upserts), self.base.tokenizer, self.chunking))
        self.live.apply(Batch(self.seq, tuple(changes), self.last[1]))

    def fresh(self) -> BM25Retriever:
        return BM25Retriever.build(self.order, self.cfg, self.chunking)


def random_batches(m: Mirror, rng: random.Random, n: int) -> None:
    for b in range(n):
        ids = rng.sample([d.id for d in m.order], 12)
        by_id = {d.id: d for d in m.order}
        ups = [Document(i, by_id[i].text + " zebra protein", by_id[i].title) for i in ids[:5]]
        ups += [Document(f"new{m.seq}-{j}", f"zebra {QUERIES[j % len(QUERIES)]} {j}", "Z") for j in range(4)]
        m.batch(ups, [i for i in ids[5:9] if i not in {d.id for d in ups}])


@pytest.mark.parametrize("method", ["lucene", "robertson", "atire", "bm25l", "bm25+"])
@pytest.mark.parametrize("chunked", [False, True])
def test_scores_equal_a_fresh_build_after_every_batch(method, chunked):
    m = Mirror(docs(60), BM25Config(method=method), ChunkingConfig(enabled=chunked, size=8, stride=5))
    rng = random.Random(1)
    for _ in range(4):
        random_batches(m, rng, 1)
        fresh = m.fresh()
        for q in QUERIES:
            assert m.live.search(q, 30) == fresh.search(q, 30), (method, chunked, q)


def test_a_search_as_of_an_earlier_batch_reads_that_batch_exactly():
    m = Mirror(docs(40))
    rng = random.Random(2)
    snapshots = {0: [d for d in m.order]}
    for _ in range(3):
        random_batches(m, rng, 1)
        snapshots[m.seq] = list(m.order)
    for seq, order in snapshots.items():
        fresh = BM25Retriever.build(order)
        for q in QUERIES:
            assert m.live.search(q, 20, at_seq=seq) == fresh.search(q, 20), (seq, q)


def test_an_upsert_of_an_existing_id_is_not_counted_twice():
    corpus = docs(10)
    m = Mirror(corpus)
    for _ in range(3):  # the same id replaced three times
        m.batch([Document("doc003", "protein protein gene", "x")])
    n, length = m.live.stats.totals(m.seq)
    expected = CorpusStats.of_tokens(m.base.tokenizer([d.content for d in m.order]))
    assert (n, length) == (expected.chunks, expected.length) == (10, expected.length)
    assert m.live.stats.df("protein", m.seq) == expected.df["protein"]
    assert m.live.search("protein", 10) == m.fresh().search("protein", 10)


def test_a_term_whose_documents_are_all_deleted_is_unknown_again():
    corpus = docs(12) + [Document("rare", "quokka marsupial", "")]
    m = Mirror(corpus, BM25Config(method="atire"))  # atire's idf is log(N / df): df 0 must never reach it
    assert m.live.search("quokka", 5)[0].doc_id == "rare"
    m.batch(deletes=["rare"])
    assert m.live.stats.df("quokka", m.seq) == 0
    assert m.live.search("quokka", 5) == [] == m.fresh().search("quokka", 5)
    assert m.live.search("quokka protein", 5) == m.fresh().search("quokka protein", 5)


def test_deletes_lower_the_average_length_at_once():
    corpus = docs(10) + [Document("long", " ".join(["ocean"] * 200), "")]
    m = Mirror(corpus)
    before = m.live.stats.totals(m.seq)
    m.batch(deletes=["long"])
    after = m.live.stats.totals(m.seq)
    assert after[1] / after[0] < before[1] / before[0]
    assert m.live.search("ocean water", 10) == m.fresh().search("ocean water", 10)


def test_delete_then_readd_and_replace_twice_in_one_history():
    m = Mirror(docs(20))
    m.batch(deletes=["doc001"])
    m.batch([Document("doc001", "back again with protein", "")])
    m.batch([Document("doc001", "and replaced protein protein", ""), Document("doc002", "new text gene", "")])
    for q in QUERIES + ["protein"]:
        assert m.live.search(q, 20) == m.fresh().search(q, 20)
    assert m.live.num_documents == 20


def test_sharded_live_bm25_keeps_whole_corpus_statistics():
    """Two shards fed the same batches, each keeping only the documents it owns, answer the
    unsharded scores: the statistics come with each batch, not from the shard's documents."""
    from serve_app.live.changes import owner_shard
    from serve_app.retrieval.sharding import merge_top_k
    from serve_app.testing import rankings_agree

    corpus = docs(40)
    whole = BM25Retriever.build(corpus)
    stats = CorpusStats.of_tokens(whole.tokenizer([d.content for d in corpus]))
    shards = [LiveBM25(p, corpus[i * 20 : (i + 1) * 20], stats, shard=i) for i, p in enumerate(whole.split([(0, 20), (20, 40)]))]
    m = Mirror(corpus)
    rng = random.Random(3)
    for b in range(3):
        random_batches(m, rng, 1)
        changes, delta = m.last
        owned = tuple(Change(c.op, c.doc_id, c.document, None, {"bm25": owner_shard(c.doc_id, next((i for i, s in enumerate(shards) if s._pos.get(c.doc_id) is not None), None), 2)}) for c in changes)
        for s in shards:
            s.apply(Batch(m.seq, owned, delta))
        for q in QUERIES:
            assert rankings_agree(merge_top_k([s.search(q, 25) for s in shards], 25), m.live.search(q, 25)), (b, q)
        assert sum(s.num_documents for s in shards) == len(m.order)
