"""Index files under a running service: damaged files fail the loaders the deployments use, fast
and with a clear error; rebuilding an index in place does not break retrievers already loaded
from it (they keep answering from the old index), and a fresh load sees the new one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
from serve_app.corpus import Corpus
from serve_app.errors import IndexLoadError
from serve_app.index import build_index, load_bm25, load_dense, load_documents, load_index
from serve_app.types import Document

CHUNKING = ChunkingConfig(enabled=True, size=8, stride=6)
QUERIES = ["protein gene cells", "ocean climate rain", "football team goal", "star planet moon orbit"]
TOPICS = [
    "protein gene cells dna expression in mouse brain",
    "ocean climate rain snow weather over the sea",
    "football team goal season player cup match",
    "star planet moon orbit telescope galaxy light",
    "bread cheese coffee recipe kitchen garden",
]


def corpus(tag: str, n: int = 30) -> Corpus:
    """``tag`` prefixes the ids, so results tell which build answered."""
    docs = [Document(f"{tag}-{i}", f"{TOPICS[(i + len(tag)) % len(TOPICS)]} {tag} note {i} " + "word " * (i % 9), title=f"{tag} {i}") for i in range(n)]
    return Corpus(docs)


@pytest.fixture(scope="module")
def dense_cfg(tiny_bi_encoder_dir) -> DenseConfig:
    return DenseConfig(model=str(tiny_bi_encoder_dir))


@pytest.fixture(scope="module")
def encoder(dense_cfg):
    from serve_app.retrieval.dense import BiEncoder

    return BiEncoder(dense_cfg)


def build(c: Corpus, out: Path, dense_cfg: DenseConfig, encoder) -> None:
    build_index(c, out, bm25=BM25Config(), dense=dense_cfg, chunking=CHUNKING, encoder=encoder, show_progress=False)


def results(bm25, dense) -> dict[str, list[tuple[str, float]]]:
    out = {}
    for q in QUERIES:
        out[f"bm25:{q}"] = [(h.doc_id, round(h.score, 5)) for h in bm25.search(q, 10)]
        out[f"dense:{q}"] = [(h.doc_id, round(h.score, 5)) for h in dense.search(q, 10)]
    return out


# --------------------------------------------------------------------------- rebuild under running retrievers


def test_rebuild_in_place_keeps_loaded_retrievers_on_the_old_index(tmp_path, dense_cfg, encoder):
    index_dir = tmp_path / "index"
    build(corpus("old"), index_dir, dense_cfg, encoder)
    # Loaded the way the deployments load them (BM25 memory-mapped).
    bm25 = load_bm25(index_dir)
    dense = load_dense(index_dir, dense_cfg)
    docs, _ = load_documents(index_dir)
    mapped = bm25._engine.model.scores["data"]
    assert isinstance(mapped, np.memmap)  # the case that matters: arrays read lazily from the files
    old_inode = os.stat(index_dir / "bm25" / "data.csc.index.npy").st_ino
    before = results(bm25, dense)
    assert all(h[0].startswith("old-") for hits in before.values() for h in hits) and any(before.values())

    build(corpus("newer", 40), index_dir, dense_cfg, encoder)  # same directory, other documents
    assert os.stat(index_dir / "bm25" / "data.csc.index.npy").st_ino != old_inode  # really replaced
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # the old files are unlinked, not kept aside

    assert results(bm25, dense) == before  # the loaded retrievers still answer, from the old index
    assert docs.get("old-3") is not None and docs.get("newer-3") is None
    fresh_bm25, fresh_dense = load_bm25(index_dir), load_dense(index_dir, dense_cfg)
    after = results(fresh_bm25, fresh_dense)
    assert all(h[0].startswith("newer-") for hits in after.values() for h in hits) and any(after.values())
    assert load_documents(index_dir)[0].get("newer-39") is not None
    assert len(load_index(index_dir, encoder=encoder).corpus) == 40


def test_queries_during_repeated_rebuilds_never_fail(tmp_path, dense_cfg, encoder):
    """A reader that (re)loads while builds swap directories sees a complete index every time."""
    import threading

    index_dir = tmp_path / "index"
    build(corpus("v0"), index_dir, dense_cfg, encoder)
    stop = threading.Event()
    errors: list[BaseException] = []
    loads = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                b = load_bm25(index_dir)
                hits = b.search("protein gene", 5)
                assert hits and len({h.doc_id.split("-")[0] for h in hits}) == 1  # one build, never a mix
                loads[0] += 1
            except BaseException as exc:  # noqa: BLE001 - any failure (e.g. a false "sha256 differs") is a bug
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 7):
            build_index(corpus(f"v{i}"), index_dir, bm25=BM25Config(), dense=None, chunking=CHUNKING, show_progress=False)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:3]
    assert loads[0] > 0


@pytest.mark.parametrize("hook", ["verify_files", "load_files"])
def test_a_swap_in_the_middle_of_a_load_is_retried_not_mixed(tmp_path, monkeypatch, hook):
    """Deterministic version of the race above: the rebuild lands between two steps of a load.

    verify_files: the manifest was read before the swap and the files are checked after it (a
    false "sha256 differs"). load_files: the files were verified before the swap and opened
    after it (a silent mix of two builds).
    """
    import serve_app.index.load as stores
    from serve_app.retrieval.bm25 import BM25Retriever

    index_dir = tmp_path / "index"
    build_index(corpus("old"), index_dir, bm25=BM25Config(), dense=None, chunking=CHUNKING, show_progress=False)
    swaps = []

    def rebuild_once() -> None:
        if not swaps:
            swaps.append(1)
            build_index(corpus("newer", 40), index_dir, bm25=BM25Config(), dense=None, chunking=CHUNKING, show_progress=False)

    if hook == "verify_files":
        real = stores.verify_files

        def hooked(*args, **kwargs):
            rebuild_once()
            return real(*args, **kwargs)

        monkeypatch.setattr(stores, "verify_files", hooked)
    else:
        real_load = BM25Retriever.load.__func__

        def hooked_load(cls, *args, **kwargs):
            rebuild_once()
            return real_load(cls, *args, **kwargs)

        monkeypatch.setattr(BM25Retriever, "load", classmethod(hooked_load))
    bm25 = load_bm25(index_dir)
    assert swaps == [1]
    assert bm25.doc_ids == corpus("newer", 40).ids  # the whole load is of the new build
    assert all(h.doc_id.startswith("newer-") for h in bm25.search("protein gene", 10))


def test_a_damaged_index_is_not_retried(tmp_path, monkeypatch):
    import serve_app.index.consistency as ic

    index_dir = tmp_path / "index"
    build_index(corpus("old"), index_dir, bm25=BM25Config(), dense=None, chunking=CHUNKING, show_progress=False)
    (index_dir / "bm25" / "vocab.index.json").write_text("{}")
    calls = []
    real = ic._identity
    monkeypatch.setattr(ic, "_identity", lambda d: calls.append(d) or real(d))
    with pytest.raises(IndexLoadError, match="truncated"):
        load_bm25(index_dir)
    assert len(calls) == 2  # one attempt: identity before and after, no retry


# --------------------------------------------------------------------------- damaged files at deployment load


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, dense_cfg, encoder) -> Path:
    d = tmp_path_factory.mktemp("pristine") / "index"
    build(corpus("p"), d, dense_cfg, encoder)
    return d


DAMAGES = ["truncate", "flip", "delete"]
FILES = {
    "documents.jsonl": ("documents",),  # the dense retriever keeps its own ids: it never reads the document store
    "bm25/data.csc.index.npy": ("bm25",),
    "bm25/vocab.index.json": ("bm25",),
    "dense/index.faiss": ("dense",),
    "dense/chunk_owner.npy": ("dense",),
    "dense/doc_ids.json": ("dense",),
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("rel", list(FILES))
def test_damaged_file_fails_the_loaders_that_read_it(tmp_path, pristine, dense_cfg, rel, damage):
    index_dir = tmp_path / "index"
    shutil.copytree(pristine, index_dir)
    path = index_dir / rel
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        b = bytearray(raw)
        b[len(b) // 2] ^= 0x55
        path.write_bytes(bytes(b))
    else:
        path.unlink()
    loaders = {
        "documents": lambda: load_documents(index_dir),
        "bm25": lambda: load_bm25(index_dir),
        # A model that does not exist: the index is checked before any model is loaded, so the
        # damaged file is reported (not a model error), without paying for the model load.
        "dense": lambda: load_dense(index_dir, DenseConfig(model=str(tmp_path / "no-such-model"))),
    }
    expected = {"truncate": "truncated", "flip": "sha256", "delete": "missing"}[damage]
    for name, load in loaders.items():
        if name in FILES[rel]:
            with pytest.raises(IndexLoadError) as info:
                load()
            assert str(path) in str(info.value) and expected in str(info.value), str(info.value)
        elif name != "dense":
            load()  # loaders that do not read the damaged file are unaffected
