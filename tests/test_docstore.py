"""The SQLite document store: round trip, lookups (also concurrent), the index build that writes
it, the manifest's checksum over it, and the fallback for indexes built without one."""

from __future__ import annotations

import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_app.config import BM25Config, ChunkingConfig
from serve_app.corpus import Corpus
from serve_app.errors import IndexLoadError
from serve_app.index import DOCSTORE, SqliteDocumentStore, build_index, load_document_store, read_manifest, write_document_store
from serve_app.types import Document

DOCS = [Document(f"d{i:04d}", f"text of document {i} " + "ünïcode " * (i % 3), title=f"Title {i}" if i % 4 else "", metadata={"n": i, "tags": ["a", "b"][: i % 3]} if i % 5 else {}) for i in range(300)]


def test_a_store_returns_what_was_written(tmp_path):
    path = tmp_path / DOCSTORE
    assert write_document_store(DOCS, path) == 300
    store = SqliteDocumentStore(path)
    assert len(store) == 300 and store.ids == [d.id for d in DOCS]
    for d in DOCS:
        got = store.get(d.id)
        assert (got.id, got.title, got.text, dict(got.metadata)) == (d.id, d.title, d.text, dict(d.metadata))
        assert got.content == d.content
    assert store.get("nope") is None and "nope" not in store and "d0001" in store
    assert [x.id if x else None for x in store.get_many(["d0003", "x", "d0001", "d0003"])] == ["d0003", None, "d0001", "d0003"]
    assert [d.id for d in store] == [d.id for d in DOCS]


def test_repeated_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="repeated document id"):
        write_document_store([DOCS[0], DOCS[1], DOCS[0]], tmp_path / DOCSTORE)


def test_lookups_under_concurrent_load_are_correct(tmp_path):
    path = tmp_path / DOCSTORE
    write_document_store(DOCS, path)
    store = SqliteDocumentStore(path)
    expected = {d.id: d.content for d in DOCS}

    def work(seed: int) -> int:
        bad = 0
        for k in range(400):
            i = (seed * 7919 + k * 104729) % 320  # some ids do not exist
            doc_id = f"d{i:04d}"
            got = store.get(doc_id)
            bad += (got.content if got else None) != expected.get(doc_id)
        return bad

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(work, range(16))) == 0


def test_the_store_is_opened_read_only(tmp_path):
    path = tmp_path / DOCSTORE
    write_document_store(DOCS[:3], path)
    store = SqliteDocumentStore(path)
    with pytest.raises(sqlite3.OperationalError), store._con() as con:
        con.execute("DELETE FROM documents")
    assert len(SqliteDocumentStore(path)) == 3


@pytest.fixture()
def index(tmp_path):
    out = tmp_path / "idx"
    build_index(Corpus.from_documents(DOCS), out, bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), show_progress=False)
    return out


def test_the_index_build_writes_the_store_and_the_ingress_loader_reads_it(index):
    manifest = read_manifest(index)
    assert DOCSTORE in manifest.files
    store, m = load_document_store(index)
    assert isinstance(store, SqliteDocumentStore) and m == manifest
    assert len(store) == 300 and store.get("d0042").content == DOCS[42].content


def test_a_corrupted_store_is_refused_naming_the_file(index):
    path = index / DOCSTORE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexLoadError, match=r"documents\.sqlite: sha256 mismatch"):
        load_document_store(index)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(IndexLoadError, match=r"documents\.sqlite: size 100 bytes"):
        load_document_store(index)


def test_an_index_without_a_store_falls_back_to_the_jsonl_corpus(index):
    manifest = json.loads((index / "manifest.json").read_text())
    del manifest["files"][DOCSTORE]
    (index / "manifest.json").write_text(json.dumps(manifest))
    (index / DOCSTORE).unlink()
    store, _ = load_document_store(index)
    assert isinstance(store, Corpus) and store.get("d0042").content == DOCS[42].content


# --------------------------------------------------------------------------- at scale: issue items


def test_a_replica_start_hashes_the_store_once_per_file_identity(index, monkeypatch):
    """The sha256 is computed on the first load of a file on this node, trusted afterwards, and
    computed again (and refused) when the file changed in place with its size kept."""
    from serve_app.index import files

    hashed = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: (hashed.append(p.name), real(p))[1])
    load_document_store(index)
    load_document_store(index)
    load_document_store(index)
    assert hashed.count(DOCSTORE) == 1
    path = index / DOCSTORE
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same size, other contents, written in place (mtime moves)
    with open(path, "r+b") as f:
        f.write(bytes(data))
    with pytest.raises(IndexLoadError, match=r"documents\.sqlite: sha256 mismatch"):
        load_document_store(index)
    assert hashed.count(DOCSTORE) == 2


def test_the_check_cannot_see_a_change_that_keeps_size_and_mtime(index):
    """What verify_once says it does not catch, shown: after a verified load, a same-size write
    whose mtime is put back is trusted (the full check at build and on each new node is what
    covers it)."""
    import os

    load_document_store(index)
    path = index / DOCSTORE
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    with open(path, "r+b") as f:
        f.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    load_document_store(index)  # trusted: same inode, size and mtime as the verified file


def test_the_mmap_window_covers_the_file_and_says_what_sqlite_accepted(tmp_path):
    path = tmp_path / DOCSTORE
    write_document_store(DOCS, path)
    store = SqliteDocumentStore(path)
    assert store.mmap_bytes >= path.stat().st_size
    assert 0 < store.mmap_bytes_effective <= store.mmap_bytes
    small = SqliteDocumentStore(path, mmap_bytes=4096)
    assert small.mmap_bytes_effective == 4096 and small.get("d0007").content == DOCS[7].content


def test_the_health_check_reads_and_fails_when_the_file_is_gone_or_not_a_store(tmp_path):
    path = tmp_path / DOCSTORE
    write_document_store(DOCS[:20], path)
    store = SqliteDocumentStore(path)
    store.check()
    calls = []
    real = store._con

    def counting():
        calls.append(1)
        return real()

    store._con = counting
    store.check()
    assert calls, "the health check must read a row, not a cached count"
    store._con = real
    path.rename(tmp_path / "elsewhere")
    with pytest.raises(IndexLoadError, match="cannot be read"):
        store.check()
    (tmp_path / "elsewhere").rename(path)
    store.check()
    path.write_bytes(b"garbage" * 100)  # replaced by something unreadable as a store
    with pytest.raises(IndexLoadError, match="no longer an SQLite database"):
        store.check()


def test_a_swap_during_lookups_never_mixes_builds(tmp_path):
    """Lookups from threads that start after a rebuild swapped the index still read the build the
    store was opened on (pinned connections), while a new load reads the new one."""
    import threading

    out = tmp_path / "idx"
    old = [Document(f"d{i:04d}", f"old text {i}", "") for i in range(200)]
    new = [Document(f"d{i:04d}", f"new text {i}", "") for i in range(200)]
    build_index(Corpus.from_documents(old), out, bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), show_progress=False)
    store, _ = load_document_store(out)
    seen: set[str] = set()
    stop = threading.Event()

    def reader(k):
        while not stop.is_set():
            for d in store.get_many([f"d{(k * 7 + j) % 200:04d}" for j in range(20)]):
                seen.add(d.text.split()[0])

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    build_index(Corpus.from_documents(new), out, bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), show_progress=False)
    with ThreadPoolExecutor(4) as pool:  # threads that never read before the swap
        later = list(pool.map(lambda i: store.get(f"d{i:04d}").text, range(0, 200, 9)))
    stop.set()
    for t in threads:
        t.join()
    assert seen == {"old"}
    assert all(t.startswith("old") for t in later)
    fresh, _ = load_document_store(out)
    assert fresh.get("d0001").text == "new text 1"


def test_without_a_writable_record_directory_the_store_is_hashed_every_time(index, monkeypatch, tmp_path):
    """A read-only place for the records does not stop a replica from starting: it hashes the
    store on every load instead (and still refuses a damaged one)."""
    from serve_app.index import files

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the record directory would be")
    monkeypatch.setenv("SERVE_APP_VERIFIED_DIR", str(blocked / "verified"))
    hashed = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: (hashed.append(p.name), real(p))[1])
    load_document_store(index)
    load_document_store(index)
    assert hashed.count(DOCSTORE) == 2
    path = index / DOCSTORE
    data = bytearray(path.read_bytes())
    data[7] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(bytes(data))
    with pytest.raises(IndexLoadError, match="sha256 mismatch"):
        load_document_store(index)
