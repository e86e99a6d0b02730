"""Write batches: validation (refused whole), the durable log (atomic, ordered, fsynced), shard owners."""

from __future__ import annotations

import sqlite3

import pytest

from serve_app.config import WritesConfig
from serve_app.live.changes import DELETE, UPSERT, Change, StatsDelta, WriteRejected, check_deletes, check_upserts, owner_shard
from serve_app.live.log import WriteLog
from serve_app.types import Document

CFG = WritesConfig(max_batch_documents=3, max_document_chars=50, max_id_chars=8, max_metadata_bytes=30)


@pytest.mark.parametrize(
    "batch, message",
    [
        ([], "empty"),
        ([{"id": f"d{i}", "text": "x"} for i in range(4)], "max_batch_documents=3"),
        ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "also documents\\[0\\]"),
        ([{"id": "a", "text": "   "}], "non-empty"),
        ([{"id": "a", "text": ""}], "non-empty"),
        ([{"id": "a", "text": 5}], "non-empty string"),
        ([{"id": "a", "text": "x" * 51}], "max_document_chars=50"),
        ([{"id": "a", "text": "x" * 40, "title": "y" * 11}], "max_document_chars=50"),
        ([{"id": "toolongid", "text": "x"}], "max_id_chars=8"),
        ([{"id": "", "text": "x"}], "non-empty string"),
        ([{"id": 7, "text": "x"}], "non-empty string"),
        ([{"id": "a", "text": "x", "metadata": [1, 2]}], "JSON object"),
        ([{"id": "a", "text": "x", "metadata": {"k": "v" * 40}}], "max_metadata_bytes=30"),
        ([{"id": "a", "text": "x", "metadata": {"k": float("nan")}}], "plain JSON"),
        ([{"id": "a", "text": "x", "title": 3}], "title must be a string"),
        (["just a string"], "object with id and text"),
    ],
)
def test_bad_upsert_batches_are_refused_whole_naming_the_problem(batch, message):
    with pytest.raises(WriteRejected, match=message):
        check_upserts(batch, CFG)


def test_good_upserts_become_documents():
    docs = check_upserts([{"id": "a", "text": "x", "title": "t", "metadata": {"k": 1}}, Document("b", "y")], CFG)
    assert docs == [Document("a", "x", "t", {"k": 1}), Document("b", "y", "", {})]


@pytest.mark.parametrize("ids, message", [([], "empty"), (["a", "a"], "repeated"), (["a", ""], "non-empty"), (["a"] * 0 + ["x" * 9], "max_id_chars"), (["a", "b", "c", "d"], "max_batch_documents")])
def test_bad_delete_batches_are_refused(ids, message):
    with pytest.raises(WriteRejected, match=message):
        check_deletes(ids, CFG)


def test_owner_shard_is_where_a_document_lives_else_a_stable_hash():
    assert owner_shard("x", 3, 4) == 3
    spread = {owner_shard(f"id{i}", None, 4) for i in range(200)}
    assert spread == {0, 1, 2, 3}
    import zlib

    assert owner_shard("id7", None, 4) == zlib.crc32(b"id7") % 4  # the same on every process


def test_stats_delta_round_trips_and_drops_zero_terms():
    d = StatsDelta(2, 10, {"a": 1, "b": 0, "c": -2})
    back = StatsDelta.from_json(d.to_json())
    assert (back.chunks, back.length, dict(back.df)) == (2, 10, {"a": 1, "c": -2})


def test_log_is_wal_with_full_sync_and_numbers_batches_in_order(tmp_path):
    log = WriteLog(tmp_path)
    con = sqlite3.connect(str(log.path))
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log._con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: the WAL is fsynced at every commit
    doc = Document("a", "text", "t", {"k": 1})
    b1 = log.append(lambda r: ([Change(UPSERT, "a", doc)], StatsDelta(1, 1, {"text": 1})))
    b2 = log.append(lambda r: ([Change(DELETE, "a")], StatsDelta(-1, -1, {"text": -1})))
    assert (b1.seq, b2.seq) == (1, 2) and log.last_seq == 2
    got = log.batches_since(0)
    assert [b.seq for b in got] == [1, 2]
    assert got[0].changes[0].document == doc and got[1].changes[0].op == DELETE
    assert [b.seq for b in log.batches_since(1)] == [2] and log.batches_since(2) == []
    assert log.reader().current(["a"]) == {"a": (2, True, {})}
    # a second process (serve-app ingest beside the writer deployment) sees the same log
    other = WriteLog(tmp_path)
    assert [b.seq for b in other.batches_since(0)] == [1, 2]


def test_a_batch_that_fails_while_prepared_leaves_no_trace(tmp_path):
    log = WriteLog(tmp_path)
    log.append(lambda r: ([Change(UPSERT, "a", Document("a", "x"))], StatsDelta()))

    def broken(reader):
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError):
        log.append(broken)

    def half(reader):  # a change that cannot be stored (its vectors are not an array) after a good one
        return [Change(UPSERT, "b", Document("b", "y")), Change(UPSERT, "c", Document("c", "z"), vectors="not an array")], StatsDelta()

    with pytest.raises(Exception):
        log.append(half)
    assert log.last_seq == 1 and [c.doc_id for b in log.batches_since(0) for c in b.changes] == ["a"]
    assert log.reader().current(["b", "c"]) == {}
