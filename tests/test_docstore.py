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
    with pytest.raises(sqlite3.OperationalError):
        store._con().execute("DELETE FROM documents")
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
