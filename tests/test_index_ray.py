"""`serve-app index --ray`: the Ray-built index equals the local build.

A local Ray instance with 2 CPUs (2 workers) builds the same corpora as ``build_index``; the two
directories must hold the same index: BM25 postings and scores bit for bit (whole-corpus
statistics aggregated across blocks), dense vectors within 1e-5, the same document store and
shard sets. A worker killed mid-build is restarted and the result is still equal; a build that
fails leaves the previous index loadable.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from serve_app.config import BM25Config, ChunkingConfig, DenseConfig, FusionConfig
from serve_app.corpus import Corpus
from serve_app.index import build_index, load_index, load_shards, read_manifest, shard_set_dir
from serve_app.index.ray_build import RayBuildOptions, RayIndexBuildError, build_index_ray
from serve_app.index.ray_shards import build_index_ray_shards_only
from serve_app.types import Document

pytestmark = pytest.mark.slow

WORDS = (
    "protein cell gene dna virus vaccine disease cancer tumor patients clinical trial study result effect risk treatment "
    "ocean sea river water climate weather rain snow football soccer team player goal music song album band space star planet moon "
    "the of and a in is"
).split()
QUERIES = ["gene cancer", "ocean climate rain", "football goal", "music band album", "the", "planet moon star", "zzz unknown"]


def make_corpus(n: int = 97, seed: int = 3) -> Corpus:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 40))]
        docs.append(Document(id=f"d{i}", title=rng.choice(["", "Title " + rng.choice(WORDS)]), text=" ".join(words)))
    return Corpus.from_documents(docs)


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """One local Ray instance (127.0.0.1, 2 CPUs) for the module; the crash marker's path is in
    the environment before Ray starts, so its workers inherit it."""
    import ray

    from serve_app.serve.runner import start_ray

    marker = tmp_path_factory.mktemp("crash") / "crashed"
    os.environ["SERVE_APP_TEST_CRASH_MARKER"] = str(marker)
    assert not ray.is_initialized(), "another test left Ray initialized in this process"
    start_ray(num_cpus=2, log_to_driver=False)
    try:
        yield marker
    finally:
        ray.shutdown()
        os.environ.pop("SERVE_APP_TEST_CRASH_MARKER", None)


OPTIONS = RayBuildOptions(workers=2, batch_documents=16, show_progress=False)


# --------------------------------------------------------------------------- comparisons


def assert_same_bm25(a, b) -> None:
    """Same documents, chunks, vocabulary, and every term's postings with bit-identical scores."""
    assert a.doc_ids == b.doc_ids
    np.testing.assert_array_equal(a.chunk_owner, b.chunk_owner)
    ma, mb = a._engine.model, b._engine.model
    assert ma.scores["num_docs"] == mb.scores["num_docs"]
    assert set(ma.vocab_dict) == set(mb.vocab_dict)
    for name in ("data", "indices", "indptr"):
        assert np.asarray(ma.scores[name]).dtype == np.asarray(mb.scores[name]).dtype, name
    pa_, pb = ma.scores["indptr"], mb.scores["indptr"]
    for term, ia in ma.vocab_dict.items():
        ib = mb.vocab_dict[term]
        sa, sb = slice(pa_[ia], pa_[ia + 1]), slice(pb[ib], pb[ib + 1])
        np.testing.assert_array_equal(ma.scores["indices"][sa], mb.scores["indices"][sb], err_msg=term)
        np.testing.assert_array_equal(ma.scores["data"][sa], mb.scores["data"][sb], err_msg=term)
    if ma.nonoccurrence_array is not None or mb.nonoccurrence_array is not None:
        for term, ia in ma.vocab_dict.items():
            assert ma.nonoccurrence_array[ia] == mb.nonoccurrence_array[mb.vocab_dict[term]], term
    for q in QUERIES:
        tokens = a.tokenizer([q])[0]
        got, want = a._engine.match(tokens), b._engine.match(tokens)
        assert (got is None) == (want is None), q
        if got is not None:
            np.testing.assert_array_equal(got[0], want[0], err_msg=q)  # every chunk's score, bit for bit
            np.testing.assert_array_equal(got[1], want[1], err_msg=q)
        assert a.search(q, 50) == b.search(q, 50), q


def assert_same_dense(a, b) -> None:
    assert a.doc_ids == b.doc_ids
    np.testing.assert_array_equal(a.chunk_owner, b.chunk_owner)
    va = a._cpu_index.reconstruct_n(0, a.num_vectors)
    vb = b._cpu_index.reconstruct_n(0, b.num_vectors)
    assert va.shape == vb.shape
    assert float(np.abs(va - vb).max()) <= 1e-5


def assert_same_index(ray_dir, local_dir, encoder, shards=()) -> None:
    mr, ml = read_manifest(ray_dir), read_manifest(local_dir)
    assert mr.corpus == ml.corpus and mr.chunking == ml.chunking
    assert mr.files["documents.jsonl"].sha256 == ml.files["documents.jsonl"].sha256
    assert mr.files["documents.sqlite"].size > 0
    drop = {"libraries"}
    if mr.bm25 is not None or ml.bm25 is not None:
        assert {k: v for k, v in mr.bm25.items() if k not in drop} == {k: v for k, v in ml.bm25.items() if k not in drop}
    if mr.dense is not None or ml.dense is not None:
        assert mr.dense == ml.dense
    r = load_index(ray_dir, encoder=encoder, load_dense_encoder=encoder is not None)
    lo = load_index(local_dir, encoder=encoder, load_dense_encoder=encoder is not None)
    assert list(r.corpus) == list(lo.corpus)
    if lo.bm25 is not None:
        assert_same_bm25(r.bm25, lo.bm25)
    if lo.dense is not None:
        assert_same_dense(r.dense, lo.dense)
    for retriever, n in shards:
        sr = load_shards(shard_set_dir(ray_dir, retriever, n), encoder=encoder)[retriever]
        sl = load_shards(shard_set_dir(local_dir, retriever, n), encoder=encoder)[retriever]
        assert len(sr.shards) == len(sl.shards) == n
        for x, y in zip(sr.shards, sl.shards):
            (assert_same_bm25 if retriever == "bm25" else assert_same_dense)(x, y)


@pytest.fixture(scope="module")
def encoder(tiny_bi_encoder_dir):
    from serve_app.retrieval.dense import BiEncoder

    return BiEncoder(DenseConfig(model=str(tiny_bi_encoder_dir), batch_size=8))


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize(
    "method,chunking",
    [("lucene", ChunkingConfig()), ("bm25+", ChunkingConfig(enabled=True, size=8, stride=6)), ("robertson", ChunkingConfig(enabled=True, size=10, stride=10))],
    ids=["lucene-docs", "bm25plus-chunks", "robertson-chunks"],
)
def test_ray_build_equals_local_build(tmp_path, ray_instance, encoder, method, chunking):
    corpus = make_corpus()
    bm25 = BM25Config(method=method)
    shards = {"bm25": 2, "dense": 3}
    local = build_index(corpus, tmp_path / "local", bm25=bm25, dense=encoder.cfg, chunking=chunking, encoder=encoder, show_progress=False, shards=shards)
    manifest, report = build_index_ray(corpus, tmp_path / "ray", bm25=bm25, dense=encoder.cfg, chunking=chunking, shards=shards, options=OPTIONS)
    assert manifest.corpus == local.corpus
    assert report.documents == len(corpus) and report.chunks == local.corpus.num_chunks
    assert {"bm25_tokenize", "bm25_score", "dense_encode"} <= set(report.stage_seconds)
    assert report.worker_cpu_seconds["dense_encode"] > 0
    assert_same_index(tmp_path / "ray", tmp_path / "local", encoder, shards=[("bm25", 2), ("dense", 3)])


def test_ray_build_of_one_retriever(tmp_path, ray_instance):
    corpus = make_corpus(n=30, seed=5)
    build_index(corpus, tmp_path / "local", bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), show_progress=False)
    manifest, _ = build_index_ray(corpus, tmp_path / "ray", bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), options=OPTIONS)
    assert manifest.dense is None and not (tmp_path / "ray" / "dense").exists()
    assert_same_index(tmp_path / "ray", tmp_path / "local", None)


# --------------------------------------------------------------------------- shards only


def assert_same_shard_sets(ray_dir, local_dir, encoder, shards) -> None:
    """The shard sets of the two directories hold the same shards (documents, postings and
    scores bit for bit, vectors within 1e-5) with the same shard manifests."""
    from serve_app.index.shards import read_shards_manifest

    for retriever, n in shards:
        mr, ml = read_shards_manifest(shard_set_dir(ray_dir, retriever, n)), read_shards_manifest(shard_set_dir(local_dir, retriever, n))
        assert mr.model_dump(exclude={"created_at"}) == ml.model_dump(exclude={"created_at"})
        for i in range(n):
            a, b = read_manifest(shard_set_dir(ray_dir, retriever, n) / str(i)), read_manifest(shard_set_dir(local_dir, retriever, n) / str(i))
            assert a.corpus == b.corpus and a.files["documents.jsonl"] == b.files["documents.jsonl"]
            drop = {"libraries"}
            sa, sb = getattr(a, retriever), getattr(b, retriever)
            assert {k: v for k, v in sa.items() if k not in drop} == {k: v for k, v in sb.items() if k not in drop}
        sr = load_shards(shard_set_dir(ray_dir, retriever, n), encoder=encoder)[retriever]
        sl = load_shards(shard_set_dir(local_dir, retriever, n), encoder=encoder)[retriever]
        for x, y in zip(sr.shards, sl.shards):
            (assert_same_bm25 if retriever == "bm25" else assert_same_dense)(x, y)
        if retriever == "bm25":  # whole-corpus statistics in every shard: the merged top 20 are equal
            for q in QUERIES:
                assert sr.search(q, 20) == sl.search(q, 20), q


@pytest.mark.parametrize("method", ["lucene", "bm25+"])
def test_shards_only_build_writes_the_local_shards_from_the_workers(tmp_path, ray_instance, encoder, method, monkeypatch):
    """Every shard equals the local build's, and the driver assembled no posting and no vector:
    the functions that do are made to fail in this (the driver's) process; the workers, other
    processes, run them unchanged."""
    from serve_app.errors import IndexLoadError
    from serve_app.retrieval import bm25s_engine, dense

    corpus = make_corpus(n=90, seed=7)
    chunking = ChunkingConfig(enabled=True, size=10, stride=8)
    shards = {"bm25": 3, "dense": 2}
    build_index(corpus, tmp_path / "local", bm25=BM25Config(method=method), dense=encoder.cfg, chunking=chunking, encoder=encoder, show_progress=False, shards=shards)

    from serve_app import corpus as corpus_module
    from serve_app.corpus import write_documents_jsonl
    from serve_app.index import ray_build

    src = tmp_path / "corpus.jsonl"
    write_documents_jsonl(corpus, src)

    def refuse(*a, **k):
        raise AssertionError("the driver assembled an index or held the corpus: a shards-only build must leave that to the workers")

    monkeypatch.setattr(bm25s_engine.Bm25sEngine, "from_postings", classmethod(refuse))
    monkeypatch.setattr(dense.DenseRetriever, "from_vectors", classmethod(refuse))
    monkeypatch.setattr(corpus_module.Corpus, "__init__", refuse)  # the corpus is streamed, never loaded
    monkeypatch.setattr(ray_build, "_input_dataset", refuse)  # nor turned into blocks on the driver
    manifest, report = build_index_ray_shards_only(str(src), tmp_path / "ray", bm25=BM25Config(method=method), dense=encoder.cfg, chunking=chunking, shards=shards, options=OPTIONS)
    monkeypatch.undo()
    assert report.documents == len(corpus) and report.skipped == [] and report.empty == []
    local = read_manifest(tmp_path / "local")
    assert manifest.corpus == local.corpus
    assert manifest.bm25["shards_only"] == 3 and manifest.dense["shards_only"] == 2
    assert {k: v for k, v in manifest.bm25.items() if k not in ("libraries", "shards_only")} == {k: v for k, v in local.bm25.items() if k != "libraries"}
    assert {k: v for k, v in manifest.dense.items() if k not in ("files", "shards_only")} == {k: v for k, v in local.dense.items() if k != "files"}
    assert {"bm25_score_and_write_shards", "dense_encode_and_write_shards"} <= set(report.stage_seconds)
    assert report.worker_cpu_seconds["dense_encode_and_write_shards"] > 0
    assert not (tmp_path / "ray" / "dense").exists() and sorted(p.name for p in (tmp_path / "ray" / "bm25").iterdir()) == ["tokenizer.json"]
    assert_same_shard_sets(tmp_path / "ray", tmp_path / "local", encoder, shards.items())
    from serve_app.index import load_bm25, load_dense, load_document_store, load_query_encoder

    store, _ = load_document_store(tmp_path / "ray")
    assert [d.text for d in store.get_many(corpus.ids)] == [d.text for d in corpus]
    assert load_query_encoder(tmp_path / "ray", encoder.cfg).dim == encoder.dim
    with pytest.raises(IndexLoadError, match=r"shards-only index: its bm25 retriever exists only as the shard set bm25-3"):
        load_bm25(tmp_path / "ray")
    with pytest.raises(IndexLoadError, match=r"shards-only .* dense-2"):
        load_dense(tmp_path / "ray", encoder.cfg)
    with pytest.raises(IndexLoadError, match=r"shards-only"):
        load_index(tmp_path / "ray", encoder=encoder)


def test_shards_only_refusals_and_explicit_assignments(tmp_path, ray_instance):
    corpus = make_corpus(n=40, seed=4)
    with pytest.raises(ValueError, match="shard count above 1 for every retriever .*dense"):
        build_index_ray_shards_only(corpus, tmp_path / "x", bm25=BM25Config(), dense=DenseConfig(), chunking=ChunkingConfig(), shards={"bm25": 2}, options=OPTIONS)
    with pytest.raises(ValueError, match="one of 2 shards for each of the 40 documents"):
        build_index_ray_shards_only(corpus, tmp_path / "x", bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), shards={"bm25": 2}, options=OPTIONS, shard_of={"bm25": [0, 1, 2]})
    with pytest.raises(ValueError, match=r"shard\(s\) \[1\] would hold no document"):
        build_index_ray_shards_only(corpus, tmp_path / "x", bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), shards={"bm25": 2}, options=OPTIONS, shard_of={"bm25": [0] * 40})
    from serve_app.corpus import CorpusError

    with pytest.raises(CorpusError, match="repeats a document id"):
        build_index_ray_shards_only([*corpus, corpus[3]], tmp_path / "x", bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), shards={"bm25": 2}, options=OPTIONS)
    assert not (tmp_path / "x").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".x.building")]
    sets = [list(range(0, 40, 3)), [i for i in range(40) if i % 3]]  # interleaved: as a merge of live writes keeps owners
    from serve_app.index import build_shard_set

    build_shard_set(corpus, tmp_path / "local", 2, bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), assignment=sets)
    build_index_ray_shards_only(iter(corpus), tmp_path / "ray", bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), shards={"bm25": 2}, options=OPTIONS, shard_of={"bm25": [0 if i % 3 == 0 else 1 for i in range(40)]})
    from serve_app.index.shards import read_shards_manifest

    mr, ml = read_shards_manifest(shard_set_dir(tmp_path / "ray", "bm25", 2)), read_shards_manifest(tmp_path / "local")
    assert mr.assignment == ml.assignment == "owner"
    assert mr.model_dump(exclude={"created_at", "corpus_sha256"}) == ml.model_dump(exclude={"created_at", "corpus_sha256"})
    a = load_shards(shard_set_dir(tmp_path / "ray", "bm25", 2))["bm25"]
    b = load_shards(tmp_path / "local")["bm25"]
    for x, y in zip(a.shards, b.shards):
        assert_same_bm25(x, y)


# --------------------------------------------------------------------------- failures


def test_a_worker_killed_mid_build_is_restarted_and_the_index_is_still_equal(tmp_path, ray_instance, encoder):
    from serve_app.testing import CrashOnceEncodeBatch

    marker = ray_instance
    assert not marker.exists()
    corpus = make_corpus(n=80, seed=11)
    build_index(corpus, tmp_path / "local", bm25=BM25Config(), dense=encoder.cfg, chunking=ChunkingConfig(), encoder=encoder, show_progress=False)
    build_index_ray(corpus, tmp_path / "ray", bm25=BM25Config(), dense=encoder.cfg, chunking=ChunkingConfig(), options=OPTIONS, encode_udf=CrashOnceEncodeBatch)
    assert marker.exists(), "no worker died: the test did not test a crash"
    assert int(marker.read_text()) != os.getpid()  # it was a worker process, not this one
    assert_same_index(tmp_path / "ray", tmp_path / "local", encoder)


def test_a_failed_build_leaves_the_previous_index_loadable(tmp_path, ray_instance, encoder):
    from serve_app.testing import AlwaysFailingEncodeBatch

    out = tmp_path / "idx"
    old = make_corpus(n=20, seed=1)
    build_index(old, out, bm25=BM25Config(), dense=encoder.cfg, chunking=ChunkingConfig(), encoder=encoder, show_progress=False)
    before = read_manifest(out)
    with pytest.raises(RayIndexBuildError, match="failed after retries"):
        build_index_ray(make_corpus(n=40, seed=2), out, bm25=BM25Config(), dense=encoder.cfg, chunking=ChunkingConfig(), options=RayBuildOptions(workers=2, batch_documents=16, max_retries=1, show_progress=False), encode_udf=AlwaysFailingEncodeBatch)
    assert read_manifest(out) == before
    loaded = load_index(out, encoder=encoder)
    assert [d.id for d in loaded.corpus] == [d.id for d in old]
    assert loaded.bm25.search("gene cancer", 5) is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx.building")]


def test_options_and_refusals_before_any_work(tmp_path):
    for bad in ({"workers": 0}, {"cpus_per_worker": 0}, {"gpus_per_worker": -1}, {"batch_documents": 0}, {"max_retries": -1}):
        with pytest.raises(ValueError):
            RayBuildOptions(**bad)
    with pytest.raises(ValueError, match="bm25s only"):
        build_index_ray(make_corpus(n=5), tmp_path / "x", bm25=BM25Config(engine="rank_bm25", method="robertson"), dense=None, chunking=ChunkingConfig())
    with pytest.raises(ValueError, match="empty corpus"):
        build_index_ray([], tmp_path / "x", bm25=BM25Config(), dense=None, chunking=ChunkingConfig())
    with pytest.raises(ValueError, match="shards: dense"):
        build_index_ray(make_corpus(n=5), tmp_path / "x", bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), shards={"dense": 2})
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- command line


def test_cli_index_ray(tmp_path, ray_instance, tiny_bi_encoder_dir, capsys):
    from serve_app.cli import main

    corpus = make_corpus(n=25, seed=9)
    src = tmp_path / "corpus.jsonl"
    from serve_app.corpus import write_documents_jsonl

    write_documents_jsonl(corpus, src)
    args = ["index", "--corpus", str(src), "--dense-model", str(tiny_bi_encoder_dir), "-q"]
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "2", "--ray-batch-documents", "8", "--shards", "bm25=2"]) == 0
    out = capsys.readouterr().out
    assert "ray: 2 workers" in out and "dense_encode" in out
    assert main([*args, "--out", str(tmp_path / "local"), "--shards", "bm25=2"]) == 0
    from serve_app.retrieval.dense import BiEncoder

    assert_same_index(tmp_path / "ray", tmp_path / "local", BiEncoder(DenseConfig(model=str(tiny_bi_encoder_dir))), shards=[("bm25", 2)])
    assert main([*args, "--out", str(tmp_path / "y"), "--ray-workers", "2"]) == 2  # a Ray flag without --ray
    assert "add --ray" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "y"), "--shards", "bm25=x"]) == 2
    assert main([*args, "--out", str(tmp_path / "y"), "--ray", "--bm25-engine", "rank_bm25"]) == 2
    assert not (tmp_path / "y").exists()


def test_cli_shards_only_index_takes_writes_and_merges_on_ray(tmp_path, ray_instance, tiny_bi_encoder_dir, capsys):
    """serve-app index --ray --shards-only, ingest (upserts, replacements, deletes), merge: the
    merge of a shards-only index runs on Ray and stays shards-only, every document stays in its
    shard, and the shards answer as a fresh build of the live documents."""
    import json

    from serve_app.cli import main
    from serve_app.corpus import write_documents_jsonl
    from serve_app.index.load import open_shard
    from serve_app.index.shards import read_shards_manifest
    from serve_app.live.merge import live_documents
    from serve_app.live.commands import open_writer
    from serve_app.retrieval.bm25 import BM25Retriever
    from serve_app.retrieval.dense import BiEncoder
    from serve_app.testing import rankings_agree

    corpus = make_corpus(n=60, seed=21)
    src = tmp_path / "corpus.jsonl"
    write_documents_jsonl(corpus, src)
    idx = tmp_path / "idx"
    base = ["--dense-model", str(tiny_bi_encoder_dir), "-q"]
    assert main(["index", "--corpus", str(src), "--out", str(idx), "--shards-only", "--shards", "bm25=2", *base]) == 2
    assert "add --ray" in capsys.readouterr().err
    assert main(["index", "--corpus", str(src), "--out", str(idx), "--ray", "--shards-only", "--shards", "bm25=2", *base]) == 2
    assert "count above 1 for dense" in capsys.readouterr().err and not idx.exists()
    with open(src, "a", encoding="utf-8") as f:  # a bad line and an empty document: skipped and counted, as a local build does
        f.write("{not json\n" + json.dumps({"id": "blank", "title": "", "text": "  "}) + "\n")
    assert main(["index", "--corpus", str(src), "--out", str(idx), "--ray", "--shards-only", "--shards", "bm25=2,dense=2", *base]) == 2
    assert "line 61" in capsys.readouterr().err and not idx.exists()
    assert main(["index", "--corpus", str(src), "--out", str(idx), "--ray", "--ray-workers", "2", "--ray-batch-documents", "16", "--shards-only", "--shards", "bm25=2,dense=2", "--skip-bad-lines", *base]) == 0
    out = capsys.readouterr().out
    assert "documents: 60," in out and "1 bad line(s) skipped" in out and "1 empty document(s) left out (no title and no text: blank)" in out
    owners_before = {r: [set(json.loads((open_shard(idx, r, i, 2) / r / "doc_ids.json").read_text())) for i in range(2)] for r in ("bm25", "dense")}

    new = tmp_path / "new.jsonl"
    rng = random.Random(5)
    written = [Document(id=f"d{i}", text="replaced " + " ".join(rng.choice(WORDS) for _ in range(12))) for i in range(0, 60, 7)]
    written += [Document(id=f"n{i}", text=" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))) for i in range(9)]
    write_documents_jsonl(written, new)
    (tmp_path / "gone.txt").write_text("\n".join(["d3", "d40", "d59", "absent"]) + "\n")
    assert main(["ingest", "--index", str(idx), str(new), "--batch-size", "5", "--ray", "-q"]) == 2  # --ray without --merge
    assert main(["ingest", "--index", str(idx), str(new), "--batch-size", "5", "-q"]) == 0
    assert main(["ingest", "--index", str(idx), str(tmp_path / "gone.txt"), "--delete", "-q"]) == 0
    assert "1 ids were absent" in capsys.readouterr().out
    writer = open_writer(str(idx), None, None)
    live, _ = live_documents(writer, writer.last_seq)
    writer.close()
    assert main(["merge", "--index", str(idx), "--ray", "--ray-workers", "2", "--ray-batch-documents", "16", "-q"]) == 0
    out = capsys.readouterr().out
    assert "merged up to batch 5" in out and f"{len(live)} documents" in out

    m = read_manifest(idx)
    assert m.bm25["shards_only"] == 2 and m.dense["shards_only"] == 2 and m.writes["base_seq"] == 5
    assert m.corpus.num_documents == len(live) == 60 + 9 - 3
    for r in ("bm25", "dense"):
        assert read_shards_manifest(shard_set_dir(idx, r, 2)).assignment == "owner"
        held = [set(json.loads((open_shard(idx, r, i, 2) / r / "doc_ids.json").read_text())) for i in range(2)]
        assert held[0].isdisjoint(held[1]) and held[0] | held[1] == {d.id for d in live}
        for i in range(2):  # base documents stayed where they were
            assert owners_before[r][i] - {"d3", "d40", "d59"} <= held[i]
    fresh = BM25Retriever.build(Corpus(live), BM25Config(), ChunkingConfig(), show_progress=False)
    merged = load_shards(shard_set_dir(idx, "bm25", 2))["bm25"]
    for q in QUERIES:
        assert rankings_agree(merged.search(q, 20), fresh.search(q, 20)), q
    enc = BiEncoder(DenseConfig(model=str(tiny_bi_encoder_dir)))
    dense_shards = load_shards(shard_set_dir(idx, "dense", 2), encoder=enc)["dense"]
    vectors = enc.encode_documents([d.content for d in live])
    by_id = {d.id: v for d, v in zip(live, vectors)}
    for shard in dense_shards.shards:
        got = shard._cpu_index.reconstruct_n(0, shard.num_vectors)
        want = np.stack([by_id[i] for i in shard.doc_ids])
        assert float(np.abs(got - want).max()) <= 1e-5


def test_a_shards_only_index_serves_writes_and_the_writer_merges_it_on_ray(tmp_path, ray_instance, encoder):
    """The serving stack (real servers and app, in process) on a shards-only index: writes are
    searchable on every shard, and passing merge_deleted_fraction makes the writer merge on
    the Ray this process runs; every replica moves to the merged base, which is still
    shards-only and answers as a fresh build of the live documents."""
    import asyncio
    import time

    from serve_app.live.merge import live_documents
    from serve_app.retrieval.bm25 import BM25Retriever
    from serve_app.retrieval.sharding import merge_top_k
    from serve_app.testing import rankings_agree
    from tests.live.conftest import docs
    from tests.live.stack import live_stack, until_ready

    idx = tmp_path / "idx"
    build_index_ray_shards_only(docs(60), idx, bm25=BM25Config(), dense=encoder.cfg, chunking=ChunkingConfig(), shards={"bm25": 2, "dense": 2}, options=OPTIONS)

    async def main():
        async with live_stack(idx, encoder.cfg, shards={"bm25": 2, "dense": 2}, merge_deleted_fraction=0.05) as (c, ns):
            await until_ready(c)
            replicas = [ns.live, *(s.live for s in ns.bm25 + ns.dense)]
            r = await c.post("/documents", json={"documents": [{"id": "w1", "text": "narwhal tusk arctic"}, {"id": "doc004", "text": "narwhal replaced"}], "refresh": "wait_for"})
            assert r.status_code == 200, r.text
            got = (await c.post("/search", json={"query": "narwhal", "rerank_top_m": 0, "retrievers": ["bm25"]})).json()
            assert {h["id"] for h in got["results"]} == {"w1", "doc004"}
            await c.request("DELETE", "/documents", json={"ids": ["doc001", "doc002", "doc003"], "refresh": "wait_for"})  # 5 % of 60
            deadline = time.monotonic() + 240
            while ns.writer.last_merge is None:
                assert time.monotonic() < deadline, "no merge after passing merge_deleted_fraction"
                await asyncio.sleep(0.2)
            merged = read_manifest(idx)
            assert merged.writes["base_seq"] == 2 and merged.bm25["shards_only"] == 2 and merged.dense["shards_only"] == 2
            while {x.generation for x in replicas} != {merged.writes["generation"]}:
                assert time.monotonic() < deadline, f"replicas still on {[x.generation for x in replicas]}"
                await asyncio.sleep(0.1)
            final, _ = live_documents(ns.writer.writer, ns.writer.writer.last_seq)
            fresh = BM25Retriever.build(Corpus(final))
            for q in ("ocean sea river study", "protein gene", "narwhal tusk"):
                got = merge_top_k([s.live.view.search(q, 30) for s in ns.bm25], 30)
                assert rankings_agree(got, fresh.search(q, 30)), q
            got = (await c.post("/search", json={"query": "narwhal", "rerank_top_m": 0, "retrievers": ["bm25", "dense"], "top_k": 60, "top_n": 60})).json()
            assert {"w1", "doc004"} <= {h["id"] for h in got["results"]} and not {"doc001", "doc002", "doc003"} & {h["id"] for h in got["results"]}

    asyncio.run(main())


# --------------------------------------------------------------------------- SciFact


@pytest.mark.scifact
def test_scifact_ray_build_gives_the_local_top_100(tmp_path, ray_instance, scifact_dir, tiny_bi_encoder_dir):
    """SciFact (5,183 documents), BM25 + dense (a tiny random bi-encoder: the build is under
    test, not the model), unsharded and sharded: the same top 100 for every test query with
    bm25, dense and hybrid."""
    from serve_app.corpus import load_beir
    from serve_app.retrieval.dense import BiEncoder
    from serve_app.retrieval.fusion import fuse

    data = load_beir(scifact_dir, split="test")
    enc = BiEncoder(DenseConfig(model=str(tiny_bi_encoder_dir), batch_size=32))
    shards = {"bm25": 2, "dense": 2}
    build_index(data.corpus, tmp_path / "local", bm25=BM25Config(), dense=enc.cfg, chunking=ChunkingConfig(), encoder=enc, show_progress=False, shards=shards)
    build_index_ray(data.corpus, tmp_path / "ray", bm25=BM25Config(), dense=enc.cfg, chunking=ChunkingConfig(), shards=shards, options=RayBuildOptions(workers=2, batch_documents=256, show_progress=False))
    assert_same_index(tmp_path / "ray", tmp_path / "local", enc, shards=[("bm25", 2), ("dense", 2)])
    queries = list(data.queries.values())
    assert len(queries) == 300
    fusion = FusionConfig()

    def top100(retrievers):
        b = retrievers["bm25"].search_batch(queries, 100)
        d = retrievers["dense"].search_batch(queries, 100)
        h = [[f.doc_id for f in fuse({"bm25": x, "dense": y}, fusion, limit=100)] for x, y in zip(b, d)]
        return [[x.doc_id for x in r] for r in b], [[x.doc_id for x in r] for r in d], h

    want = top100(load_index(tmp_path / "local", encoder=enc).retrievers)
    got = top100(load_index(tmp_path / "ray", encoder=enc).retrievers)
    for name, w, g in zip(("bm25", "dense", "hybrid"), want, got):
        assert g == w, name
    # Sharded: the Ray-built shard sets against the locally built ones (a sharded merge may
    # order near-tied dense scores unlike the whole index: FAISS computes them in other blocks).
    def shard_sets(root):
        return {r: load_shards(shard_set_dir(root, r, 2), encoder=enc)[r] for r in ("bm25", "dense")}

    want_sharded, got_sharded = top100(shard_sets(tmp_path / "local")), top100(shard_sets(tmp_path / "ray"))
    for name, w, g in zip(("bm25", "dense", "hybrid"), want_sharded, got_sharded):
        assert g == w, f"{name} (2 shards)"
    assert want_sharded[0] == want[0]  # BM25 shards merge exactly
