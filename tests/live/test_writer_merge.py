"""The writer (one batch per write, acknowledged durable), followers and merges, in process."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.config import WritesConfig
from serve_app.errors import IndexLoadError
from serve_app.live.changes import WriteRejected
from serve_app.live.documents import LiveDocuments
from serve_app.live.follower import Follower, LocalSource
from serve_app.live.writer import DocumentWriter
from serve_app.types import Document

from tests.live.conftest import build, docs


def test_upsert_replace_delete_and_read_back(writer):
    r = writer.upsert([{"id": "n1", "text": "quasar galaxy", "title": "Astro", "metadata": {"k": 1}}, {"id": "doc001", "text": "replaced text"}])
    assert r.seq == 1 and r.ids == ("n1", "doc001")
    assert writer.get("n1") == Document("n1", "quasar galaxy", "Astro", {"k": 1})
    assert writer.get("doc001").text == "replaced text" and writer.get("doc002").id == "doc002"
    d = writer.delete(["n1", "doc002", "never"])
    assert (d.seq, d.ids, d.absent) == (2, ("n1", "doc002"), ("never",))
    assert writer.get("n1") is None and writer.get("doc002") is None
    again = writer.delete(["n1", "never"])  # idempotent: nothing to delete, no batch
    assert (again.seq, again.ids, again.absent) == (None, (), ("n1", "never")) and writer.last_seq == 2
    (b1, b2) = writer.log.batches_since(0)
    assert b1.changes[0].vectors.shape == (1, 32)  # the writer encoded the new document
    assert b1.stats.chunks == 1 and b2.stats.chunks == -2  # doc001 replaced in place; two deletions


def test_a_refused_batch_writes_nothing(writer):
    with pytest.raises(WriteRejected):
        writer.upsert([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    with pytest.raises(WriteRejected):
        writer.upsert([{"id": "ok", "text": "fine"}, {"id": "b", "text": ""}])
    assert writer.last_seq == 0 and writer.get("ok") is None


def test_a_dense_index_needs_the_encoder(index_dir):
    with pytest.raises(IndexLoadError, match="bi-encoder"):
        DocumentWriter(index_dir, WritesConfig())


def test_visible_is_what_every_live_follower_applied(index_dir, tiny_encoder):
    now = [0.0]
    w = DocumentWriter(index_dir, WritesConfig(follower_timeout_s=5), encoder=tiny_encoder, clock=lambda: now[0])
    assert w.visible_seq == 0
    w.upsert([{"id": "a", "text": "x"}])
    w.upsert([{"id": "b", "text": "y"}])
    assert w.visible_seq == 2  # nobody follows yet
    w.report("r1", 2, 0)
    w.report("r2", 1, 0)
    assert w.visible_seq == 1 and not w.wait_visible(2, timeout_s=0.05)
    now[0] = 10.0  # r2 stopped reporting (a dead replica): it no longer holds searches back
    w.report("r1", 2, 0)
    assert w.visible_seq == 2 and w.wait_visible(2, timeout_s=0.05)


def test_followers_catch_up_and_long_polls_wake_on_writes(writer, index_dir):
    from serve_app.index import load_document_store

    async def main():
        source = LocalSource(writer)
        writer.upsert([{"id": "early", "text": "written before the replica started"}])
        docs_view = LiveDocuments(load_document_store(index_dir)[0])
        f = Follower([docs_view], source, base_seq=0, refresh_interval_s=5.0, name="ingress")
        await f.catch_up()
        assert f.caught_up and docs_view.get("early").text.startswith("written")
        await f.poll_once(wait_s=0)  # reports what it applied: the visible batch moves to 1
        assert f.visible_seq == 1 and writer.visible_seq == 1
        task = asyncio.get_running_loop().create_task(f.poll_once())
        await asyncio.sleep(0.1)
        assert not task.done()  # a long poll: waiting for a batch
        writer.upsert([{"id": "late", "text": "after"}])
        await source.notifier.notify()
        await asyncio.wait_for(task, 2.0)  # woken by the write, not after refresh_interval_s
        assert docs_view.get("late").text == "after" and docs_view.get("late", at_seq=1) is None
        assert docs_view.get("doc001", at_seq=0).id == "doc001"

    asyncio.run(main())


def test_merge_folds_the_log_into_an_equal_new_base(writer, index_dir, tiny_encoder):
    from serve_app.index import load_index, read_manifest
    from serve_app.live.merge import live_documents, merge
    from serve_app.retrieval.bm25 import BM25Retriever

    writer.upsert([{"id": "n1", "text": "protein quasar"}, {"id": "doc005", "text": "protein replaced"}])
    writer.delete(["doc006", "doc007"])
    expected, _ = live_documents(writer, writer.last_seq)
    report = merge(writer)
    assert report.base_seq == 2 and report.documents == 59 and report.vectors_encoded == 0 and report.vectors_reused == 59
    m = read_manifest(index_dir)
    assert m.writes["base_seq"] == 2 and m.writes["previous_generation"] != m.writes["generation"]
    loaded = load_index(index_dir, encoder=tiny_encoder)
    assert loaded.corpus.ids == [d.id for d in expected]
    fresh = BM25Retriever.build(expected)
    for q in ("protein", "quasar", "ocean water"):
        assert loaded.bm25.search(q, 20) == fresh.search(q, 20)
    # the writer reads the new base: the log's ids up to the merge now live there
    assert writer.base_seq == 2 and writer.get("n1").text == "protein quasar" and writer.get("doc006") is None
    assert writer.log.reader().current(["n1", "doc005", "doc006"]) == {}
    r = writer.upsert([{"id": "after", "text": "post merge"}])
    assert r.seq == 3
    # a second writer (a restart) agrees with the log
    writer.close()
    again = DocumentWriter(index_dir, WritesConfig(), encoder=tiny_encoder)
    assert (again.base_seq, again.last_seq, again.get("after").text) == (2, 3, "post merge")
    again.close()


def test_a_crash_between_the_swap_and_the_log_record_is_finished_at_restart(writer, index_dir, tiny_encoder, monkeypatch):
    from serve_app.live import merge as merge_mod

    writer.upsert([{"id": "n1", "text": "protein quasar"}])
    monkeypatch.setattr(writer, "adopt_base", lambda: (_ for _ in ()).throw(SystemExit("killed after the swap")))
    with pytest.raises(SystemExit):
        merge_mod.merge(writer)
    writer.close()
    again = DocumentWriter(index_dir, WritesConfig(), encoder=tiny_encoder)  # finishes the merge
    assert again.base_seq == 1 and again.log.meta("generation") == again.generation
    assert again.get("n1").text == "protein quasar" and again.log.reader().current(["n1"]) == {}
    again.close()


def test_a_log_of_another_build_is_refused(writer, index_dir, tiny_dense, tiny_encoder):
    writer.upsert([{"id": "n1", "text": "x"}])
    writer.close()
    build(index_dir, docs(30, "other"), tiny_dense, tiny_encoder)  # rebuilt from another corpus, log left behind
    with pytest.raises(IndexLoadError, match="another build"):
        DocumentWriter(index_dir, WritesConfig(), encoder=tiny_encoder)


def test_merge_thresholds(writer):
    from serve_app.live.merge import merge_due

    assert merge_due(writer) is None
    writer.upsert([{"id": f"n{i}", "text": "x"} for i in range(11)])  # 11 of 60: the default 20 % is not reached
    assert merge_due(writer) is None
    writer.cfg = WritesConfig(merge_delta_fraction=0.1)
    assert "merge_delta_fraction" in merge_due(writer)
    writer.cfg = WritesConfig(merge_deleted_fraction=0.1)
    writer.delete([f"doc{i:03d}" for i in range(3)])
    assert merge_due(writer) is None
    writer.delete([f"doc{i:03d}" for i in range(3, 6)])
    assert "merge_deleted_fraction" in merge_due(writer)


def test_sharded_merge_keeps_every_document_in_its_shard(tmp_path, tiny_dense, tiny_encoder):
    from serve_app.index import load_bm25, load_dense, open_shard, read_shards_manifest, shard_set_dir
    from serve_app.live.merge import merge

    idx = build(tmp_path / "idx", docs(40), tiny_dense, tiny_encoder, shards={"bm25": 2, "dense": 2})
    w = DocumentWriter(idx, WritesConfig(), encoder=tiny_encoder, shards={"bm25": 2, "dense": 2})
    w.upsert([{"id": f"n{i}", "text": f"protein zebra {i}"} for i in range(10)] + [{"id": "doc001", "text": "moved? no: replaced in place"}])
    w.delete(["doc030"])
    owners = {c.doc_id: c.owners for b in w.log.batches_since(0) for c in b.changes}
    assert owners["doc001"] == {"bm25": 0, "dense": 0} and owners["doc030"] == {"bm25": 1, "dense": 1}
    merge(w)
    for r in ("bm25", "dense"):
        m = read_shards_manifest(shard_set_dir(idx, r, 2))
        assert m.assignment == "owner"
        held = [set((load_bm25 if r == "bm25" else (lambda d: load_dense(d, tiny_dense, load_encoder=False)))(open_shard(idx, r, i, 2)).doc_ids) for i in range(2)]
        assert "doc001" in held[0] and "doc030" not in held[1] and held[0].isdisjoint(held[1])
        for i in range(10):
            assert f"n{i}" in held[owners[f"n{i}"][r]]
    w.close()


def test_base_info_never_pairs_a_new_base_with_the_previous_statistics(tmp_path, tiny_dense, tiny_encoder, monkeypatch):
    """The race behind a sharded search seeing half a batch after a merge: a replica asking for
    the base while the writer adopted a merged one got the new generation with the previous
    base's cached statistics (every term written between the two bases missing). base_info is
    asked while adopt_base is held half-way; it must answer one base's facts."""
    import threading

    from serve_app.index import load_document_store
    from serve_app.live.merge import merge

    idx = build(tmp_path / "idx", docs(40), tiny_dense, tiny_encoder, shards={"bm25": 2, "dense": 2})
    w = DocumentWriter(idx, WritesConfig(), encoder=tiny_encoder, shards={"bm25": 2, "dense": 2})
    before = w.base_info(with_stats=True)  # the previous base's statistics, cached
    assert "narwhal" not in before["stats"].df
    w.upsert([{"id": "n1", "text": "narwhal tusk"}])
    halfway, release = threading.Event(), threading.Event()

    def slow_store(*args, **kwargs):  # adopt_base has set the new generation and waits here
        halfway.set()
        assert release.wait(10)
        return load_document_store(*args, **kwargs)

    import serve_app.index as index_module

    monkeypatch.setattr(index_module, "load_document_store", slow_store)
    merger = threading.Thread(target=merge, args=(w,))
    merger.start()
    assert halfway.wait(60), "the merge never reached adopt_base"
    answers: list = []
    asker = threading.Thread(target=lambda: answers.append(w.base_info(with_stats=True)))
    asker.start()
    asker.join(0.5)
    release.set()
    merger.join(60)
    asker.join(60)
    (info,) = answers
    assert info["generation"] != before["generation"] and info["base_seq"] == 1
    assert info["stats"].df.get("narwhal") == 1, "the merged base's generation came with the previous base's statistics"
    monkeypatch.undo()
    w.close()
