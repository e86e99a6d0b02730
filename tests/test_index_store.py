"""Index directories: round trips, refusal of damaged or mismatched indexes, atomic replacement."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

import serve_app.fsutil as fsutil
import serve_app.index.build as store
from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
from serve_app.corpus import Corpus
from serve_app.errors import IndexLoadError
from serve_app.index import IndexBuildError, build_index, load_index, read_manifest
from serve_app.retrieval.bm25 import BM25Retriever
from serve_app.types import Document

CHUNKING = ChunkingConfig(enabled=True, size=8, stride=6)
QUERIES = ["protein expression in cells", "ocean climate temperature", "football team goal", "zzz-unknown"]


def make_corpus(tag: str = "v1") -> Corpus:
    texts = [
        "protein expression in mouse brain cells increases after treatment with the new drug",
        "ocean temperature and climate change affect rain and snow in the city",
        "the football team scored a late goal in the cup match of the season",
        "a telescope observed a distant galaxy, its stars and a planet orbit",
        "bread, cheese and wine: recipes from a small kitchen garden",
        "gene expression and cancer risk in a clinical trial of patients",
    ]
    return Corpus.from_documents(
        [Document(f"{tag}-{i}", t, title=f"Doc {i}", metadata={"n": i, "tag": tag}) for i, t in enumerate(texts)]
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_bm25(corpus: Corpus, out: Path, **kw):
    return build_index(corpus, out, bm25=BM25Config(), dense=None, chunking=CHUNKING, show_progress=False, **kw)


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


# --------------------------------------------------------------------------- round trips


def test_bm25_round_trip(tmp_path):
    corpus = make_corpus()
    out = tmp_path / "idx"
    manifest = build_bm25(corpus, out)
    assert (out / "manifest.json").is_file() and (out / "documents.jsonl").is_file() and (out / "bm25").is_dir()
    assert siblings(out) == []  # no temporary or old directories left behind

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest.files) == files
    for rel, entry in manifest.files.items():
        assert entry.sha256 == sha256(out / rel) and entry.size == (out / rel).stat().st_size
    assert manifest.corpus.sha256 == sha256(out / "documents.jsonl")
    assert manifest.corpus.num_documents == len(corpus)
    assert manifest.corpus.num_chunks == manifest.bm25["num_chunks"] > len(corpus)
    assert manifest.chunking == CHUNKING and manifest.dense is None
    assert manifest.bm25["engine"] == "bm25s" and manifest.bm25["k1"] == BM25Config().k1
    assert {"bm25s", "rank_bm25", "faiss", "torch", "transformers", "numpy"} <= set(manifest.libraries)
    assert manifest.libraries["numpy"] == np.__version__
    assert read_manifest(out) == manifest

    loaded = load_index(out)
    assert loaded.manifest == manifest
    assert loaded.corpus == corpus  # the document store keeps title, text and metadata
    assert loaded.dense is None and set(loaded.retrievers) == {"bm25"}
    fresh = BM25Retriever.build(corpus, BM25Config(), CHUNKING)
    assert loaded.bm25.search_batch(QUERIES, 4) == fresh.search_batch(QUERIES, 4)
    assert load_index(out, verify_checksums=False, mmap=False).bm25.search_batch(QUERIES, 4) == fresh.search_batch(QUERIES, 4)


def test_nothing_to_build(tmp_path):
    with pytest.raises(ValueError, match="nothing to build"):
        build_index(make_corpus(), tmp_path / "idx", bm25=None, dense=None, chunking=CHUNKING)
    with pytest.raises(ValueError, match="empty corpus"):
        build_index([], tmp_path / "idx", bm25=BM25Config(), dense=None, chunking=CHUNKING)
    assert list(tmp_path.iterdir()) == []


def test_no_pickle_in_index(tmp_path):
    build_bm25(make_corpus(), tmp_path / "idx")
    for p in (tmp_path / "idx").rglob("*"):
        if p.suffix == ".npy":
            assert np.load(p, allow_pickle=False).dtype != object
        elif p.suffix == ".sqlite":  # the document store: text and integers only, no blob to unpickle
            import sqlite3

            con = sqlite3.connect(f"{p.as_uri()}?mode=ro", uri=True)
            kinds = {k for row in con.execute("SELECT typeof(id), typeof(pos), typeof(title), typeof(text), typeof(metadata) FROM documents") for k in row}
            con.close()
            assert kinds <= {"text", "integer", "null"}, kinds
        elif p.is_file():
            assert p.suffix in {".json", ".jsonl"}
            text = p.read_text(encoding="utf-8")
            [json.loads(line) for line in text.splitlines()] if p.suffix == ".jsonl" else json.loads(text)


# --------------------------------------------------------------------------- refusing damaged indexes


@pytest.fixture()
def built(tmp_path) -> Path:
    out = tmp_path / "idx"
    build_bm25(make_corpus(), out)
    return out


def _a_bm25_array(out: Path) -> Path:
    return out / "bm25" / "data.csc.index.npy"


def test_corrupted_file(built):
    target = _a_bm25_array(built)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(data))
    with pytest.raises(IndexLoadError, match=r"data\.csc\.index\.npy: sha256 mismatch"):
        load_index(built)


@pytest.mark.parametrize("rel", ["documents.jsonl", "bm25/data.csc.index.npy", "bm25/vocab.index.json"])
@pytest.mark.parametrize("verify", [True, False])
def test_truncated_file(built, rel, verify):
    target = built / rel
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(IndexLoadError, match=r"size \d+ bytes, the manifest says \d+ \(truncated or modified\)"):
        load_index(built, verify_checksums=verify)


@pytest.mark.parametrize("rel", ["documents.jsonl", "bm25/indptr.csc.index.npy", "bm25/chunk_owner.npy"])
def test_missing_file(built, rel):
    (built / rel).unlink()
    with pytest.raises(IndexLoadError, match=f"file {rel} listed in the manifest is missing"):
        load_index(built)


def test_missing_or_invalid_manifest(built, tmp_path):
    with pytest.raises(IndexLoadError, match="no such index directory"):
        load_index(tmp_path / "nowhere")
    manifest = built / "manifest.json"
    raw = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(IndexLoadError, match="unknown index format version 99"):
        load_index(built)
    manifest.write_text(json.dumps({**raw, "files": {**raw["files"], "../escape": {"sha256": "0", "size": 0}}}))
    with pytest.raises(IndexLoadError, match="invalid file entry '../escape'"):
        load_index(built)
    manifest.write_text(json.dumps({k: v for k, v in raw.items() if k != "corpus"}))
    with pytest.raises(IndexLoadError, match="invalid manifest"):
        load_index(built)
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(IndexLoadError, match="not valid JSON"):
        load_index(built)
    manifest.unlink()
    with pytest.raises(IndexLoadError, match=r"not an index \(no manifest\.json\)"):
        load_index(built)


def test_manifest_counts_checked_against_files(built):
    manifest = built / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["corpus"]["num_documents"] += 1
    manifest.write_text(json.dumps(raw))
    with pytest.raises(IndexLoadError, match="6 documents, the manifest says 7"):
        load_index(built)


def test_dense_expected_but_absent(built):
    with pytest.raises(IndexLoadError, match="has no dense retriever"):
        load_index(built, expected_dense_model="sentence-transformers/all-MiniLM-L6-v2")


# --------------------------------------------------------------------------- atomic replacement


def test_rebuild_replaces_index(built):
    v2 = make_corpus("v2")
    build_bm25(v2, built)
    assert load_index(built).corpus == v2
    assert siblings(built) == []


def _boom(*args, **kwargs):
    raise RuntimeError("simulated crash")


def test_crash_mid_build_keeps_previous_index(built, monkeypatch):
    original_save = BM25Retriever.save

    def save_then_crash(self, directory):
        original_save(self, directory)  # files are half written when the crash comes
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(BM25Retriever, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_bm25(make_corpus("v2"), built)
    assert siblings(built) == []  # the temporary directory is gone
    assert load_index(built).corpus == make_corpus("v1")


def test_crash_before_manifest_keeps_previous_index(built, monkeypatch):
    monkeypatch.setattr(store, "write_json_durably", _boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_bm25(make_corpus("v2"), built)
    assert siblings(built) == []
    assert load_index(built).corpus.ids == make_corpus("v1").ids


def test_hard_crash_leftover_never_loads(built, monkeypatch):
    # A killed process cannot clean up: keep the temporary directory as it was when the crash came.
    monkeypatch.setattr(store, "write_json_durably", _boom)
    monkeypatch.setattr(fsutil.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(RuntimeError):
        build_bm25(make_corpus("v2"), built)
    (leftover,) = [built.parent / n for n in siblings(built)]
    assert leftover.name.startswith(".idx.building-") and (leftover / "bm25").is_dir()
    with pytest.raises(IndexLoadError, match="not an index"):
        load_index(leftover)
    assert load_index(built).corpus.ids == make_corpus("v1").ids


def test_failed_swap_restores_previous_index(built, monkeypatch):
    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old index moved away; moving the new one in fails
            raise OSError("simulated rename failure")
        return real_rename(src, dst)

    monkeypatch.setattr(fsutil.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated rename failure"):
        build_bm25(make_corpus("v2"), built)
    monkeypatch.undo()
    assert calls[0][0] == "idx" and calls[0][1].startswith(".idx.old-")
    assert siblings(built) == []
    assert load_index(built).corpus.ids == make_corpus("v1").ids


def test_refuses_to_replace_a_non_index_directory(tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(IndexBuildError, match="holds no manifest.json; refusing to replace it"):
        build_bm25(make_corpus(), precious)
    assert (precious / "thesis.txt").read_text() == "do not delete"
    assert siblings(precious) == []
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(IndexBuildError, match="not a directory"):
        build_bm25(make_corpus(), a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    build_bm25(make_corpus(), empty)
    assert load_index(empty).bm25 is not None


# --------------------------------------------------------------------------- dense side


@pytest.fixture(scope="module")
def dense_cfg(tiny_bi_encoder_dir) -> DenseConfig:
    return DenseConfig(model=str(tiny_bi_encoder_dir), device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def encoder(dense_cfg):
    from serve_app.retrieval.dense import BiEncoder

    return BiEncoder(dense_cfg)


@pytest.fixture()
def hybrid(tmp_path, dense_cfg, encoder) -> Path:
    out = tmp_path / "hybrid"
    build_index(make_corpus(), out, bm25=BM25Config(), dense=dense_cfg, chunking=CHUNKING, encoder=encoder, show_progress=False)
    return out


@pytest.mark.slow
def test_hybrid_round_trip(hybrid, dense_cfg, encoder):
    from serve_app.retrieval.dense import DenseRetriever

    corpus = make_corpus()
    manifest = read_manifest(hybrid)
    assert manifest.dense["model"] == dense_cfg.model and manifest.dense["dim"] == encoder.dim
    assert any(rel.startswith("dense/") for rel in manifest.files)
    fresh = DenseRetriever.build(corpus, dense_cfg, CHUNKING, encoder)
    expected = fresh.search_batch(QUERIES, 3)
    for kwargs in ({"encoder": encoder}, {}, {"dense_config": dense_cfg}, {"expected_dense_model": dense_cfg.model}):
        loaded = load_index(hybrid, **kwargs)
        assert set(loaded.retrievers) == {"bm25", "dense"}
        got = loaded.dense.search_batch(QUERIES, 3)
        assert [[h.doc_id for h in hits] for hits in got] == [[h.doc_id for h in hits] for hits in expected]
        for g, e in zip(got, expected):
            assert [h.score for h in g] == pytest.approx([h.score for h in e], abs=1e-5)
    vectors_only = load_index(hybrid, load_dense_encoder=False)
    assert vectors_only.dense.encoder is None and vectors_only.dense.num_vectors == manifest.dense["num_vectors"]


@pytest.mark.slow
def test_different_dense_model_is_refused(hybrid, tmp_path):
    from serve_app.retrieval.dense import BiEncoder
    from serve_app.testing import build_tiny_bi_encoder

    with pytest.raises(IndexLoadError, match="built with model .* but 'sentence-transformers/all-MiniLM-L6-v2' is configured"):
        load_index(hybrid, expected_dense_model="sentence-transformers/all-MiniLM-L6-v2")
    other_dir = build_tiny_bi_encoder(tmp_path / "other-encoder", seed=1)  # same architecture, other weights
    other = BiEncoder(DenseConfig(model=str(other_dir), device="cpu"))
    with pytest.raises(IndexLoadError, match="built with model"):
        load_index(hybrid, encoder=other)
    with pytest.raises(IndexLoadError, match="built with model"):
        load_index(hybrid, dense_config=DenseConfig(model=str(other_dir), device="cpu"))


@pytest.mark.slow
def test_different_embedding_dim_is_refused(hybrid, dense_cfg, encoder):
    class NarrowEncoder:  # claims the index's model but produces other-sized vectors
        cfg = dense_cfg
        model_name = dense_cfg.model
        max_length = encoder.max_length
        dim = encoder.dim // 2

    with pytest.raises(IndexLoadError, match=rf"{encoder.dim}-dimensional vectors but the encoder .* gives {encoder.dim // 2}"):
        load_index(hybrid, encoder=NarrowEncoder())


@pytest.mark.slow
def test_corrupted_dense_file(hybrid):
    target = hybrid / "dense" / "index.faiss"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(IndexLoadError, match=r"index\.faiss: sha256 mismatch"):
        load_index(hybrid, load_dense_encoder=False)


@pytest.mark.slow
def test_crash_in_dense_build_keeps_previous_index(hybrid, dense_cfg, encoder, monkeypatch):
    from serve_app.retrieval.dense import DenseRetriever

    monkeypatch.setattr(DenseRetriever, "save", _boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(make_corpus("v2"), hybrid, bm25=BM25Config(), dense=dense_cfg, chunking=CHUNKING, encoder=encoder, show_progress=False)
    monkeypatch.undo()
    assert siblings(hybrid) == []
    loaded = load_index(hybrid, encoder=encoder)
    assert loaded.corpus.ids == make_corpus("v1").ids and loaded.dense is not None
