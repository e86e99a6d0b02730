"""BiEncoder (parity with sentence-transformers) and DenseRetriever (FAISS vs numpy brute force)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from serve_app.chunking import split_documents
from serve_app.config import ChunkingConfig, DenseConfig
from serve_app.corpus import Corpus
from serve_app.errors import IndexLoadError
from serve_app.models import ModelLoadError, resolve_model
from serve_app.retrieval.dense import BiEncoder, DenseIndexError, DenseRetriever
from serve_app.types import Document, Hit, Retriever

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"

TEXTS = [
    "What causes cancer in human cells?",
    "protein expression in mouse brain",
    "",
    "a",
    "The vaccine trial reported a decrease in infection risk.",
    "   leading and trailing spaces   ",
    "UPPER CASE TEXT ABOUT GENES",
    "Ünïcödé, accents: café, naïve, Zürich — and an em dash.",
    "numbers 12345 and 3.14159 and 10^6",
    "punctuation!!! ??? ... ;;; (brackets) [more] {curly}",
    "Ray Serve batches requests on the GPU server.",
    "football match: the team scored a late goal",
    "climate, weather and ocean temperature",
    "retrieval with dense vectors and a sparse bm25 index",
    "日本語のテキスト",
    "tab\tseparated\tand\nnew\nlines",
    "short",
    "the the the the the the the the",
    "Solar power and wind energy in the city",
    # longer than 256 word pieces: truncation must match
    " ".join(f"gene{i} protein cell study" for i in range(150)),
]


def docs_corpus(n: int, words_per_doc: int = 12, seed: int = 0) -> Corpus:
    rng = np.random.default_rng(seed)
    vocab = ["protein", "cell", "gene", "cancer", "tumor", "patients", "clinical", "trial", "vaccine", "virus", "ocean", "climate", "football", "music", "film", "space", "star", "planet"]
    docs = [Document(f"d{i}", " ".join(rng.choice(vocab, size=words_per_doc)), title=f"title {i}" if i % 3 == 0 else "") for i in range(n)]
    return Corpus(docs)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_topk(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy brute force: (ids, scores) of the top-k inner products per query row."""
    s = q @ x.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, axis=1)


@pytest.fixture(scope="module")
def tiny_cfg(tiny_bi_encoder_dir: Path) -> DenseConfig:
    return DenseConfig(model=str(tiny_bi_encoder_dir), batch_size=4)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_cfg: DenseConfig) -> BiEncoder:
    return BiEncoder(tiny_cfg)


# ------------------------------------------------------------------ BiEncoder


def test_encode_shape_norm_and_input_order(tiny_encoder: BiEncoder) -> None:
    emb = tiny_encoder.encode(TEXTS, batch_size=3)
    assert emb.shape == (len(TEXTS), tiny_encoder.dim) == (len(TEXTS), 32)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Each row is the text's own embedding, whatever batch (and padding) it went through.
    for i in (0, 2, 7, len(TEXTS) - 1):
        np.testing.assert_allclose(emb[i], tiny_encoder.encode([TEXTS[i]])[0], atol=1e-5)
    np.testing.assert_allclose(emb, tiny_encoder.encode(TEXTS, batch_size=64), atol=1e-5)
    assert not np.allclose(emb[0], emb[1], atol=1e-3), "different texts should get different embeddings"


def test_encode_matches_sentence_transformers_on_tiny_model(tiny_bi_encoder_dir: Path, tiny_encoder: BiEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_bi_encoder_dir), device="cpu")  # Transformer + mean pooling
    assert st.max_seq_length == tiny_encoder.max_length == 128
    ref = st.encode(TEXTS, normalize_embeddings=True, batch_size=5)
    assert np.abs(ref - tiny_encoder.encode(TEXTS)).max() < 1e-4


def test_prefixes_are_prepended(tiny_bi_encoder_dir: Path, tiny_encoder: BiEncoder) -> None:
    enc = BiEncoder(DenseConfig(model=str(tiny_bi_encoder_dir), query_prefix="query: ", document_prefix="passage: "))
    q = enc.encode_queries(["gene therapy"])
    d = enc.encode_documents(["gene therapy"])
    np.testing.assert_allclose(q, tiny_encoder.encode(["query: gene therapy"]), atol=1e-6)
    np.testing.assert_allclose(d, tiny_encoder.encode(["passage: gene therapy"]), atol=1e-6)
    assert not np.allclose(q, d, atol=1e-3)


def test_encode_edge_cases(tiny_encoder: BiEncoder) -> None:
    assert tiny_encoder.encode([]).shape == (0, tiny_encoder.dim)
    with pytest.raises(TypeError, match="single string"):
        tiny_encoder.encode("not a list")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tiny_encoder.encode(["ok", 3])  # type: ignore[list-item]
    assert tiny_encoder.model_name == tiny_encoder.cfg.model


@pytest.mark.slow
def test_minilm_parity_with_sentence_transformers(minilm_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    config = json.loads((minilm_dir / "sentence_bert_config.json").read_text())
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    assert st.max_seq_length == config["max_seq_length"] == 256
    enc = BiEncoder(DenseConfig(model=MINILM_ID, max_length=config["max_seq_length"], batch_size=7, device="cpu"))
    assert enc.dim == 384 and enc.max_length == 256
    long_text = TEXTS[-1]
    assert len(enc.tokenizer(long_text)["input_ids"]) > 256, "the long text must exercise truncation"
    ref = st.encode(TEXTS, normalize_embeddings=True, batch_size=8)
    ours = enc.encode(TEXTS)
    assert np.abs(ref - ours).max() < 1e-4


@pytest.mark.slow
def test_hub_id_resolves_offline_to_packaged_weights(minilm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Path(resolve_model(MINILM_ID)) == minilm_dir
    enc = BiEncoder(DenseConfig(model=MINILM_ID, device="cpu"))
    assert enc.model_name == MINILM_ID and enc.dim == 384


@pytest.mark.parametrize("name", ["no-such-org/no-such-bi-encoder-xyz", "/nonexistent/path/to/bi-encoder"])
def test_unknown_model_gives_helpful_error(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        BiEncoder(DenseConfig(model=name))
    msg = str(info.value)
    assert name in msg and "dense encoder" in msg and "SERVE_APP_MODEL_PATH__" in msg


# ------------------------------------------------------------ DenseRetriever


def test_flat_equals_numpy_on_random_vectors() -> None:
    rng = np.random.default_rng(1)
    x, q = unit_rows(rng, 500, 24), unit_rows(rng, 20, 24)
    ids = [f"doc-{i}" for i in range(len(x))]
    r = DenseRetriever.from_vectors(x, ids, DenseConfig(factory="Flat"))
    assert isinstance(r, Retriever) and r.name == "dense"
    got = r.search_vectors(q, 10)
    want_ids, want_scores = exact_topk(q, x, 10)
    for hits, wi, ws in zip(got, want_ids, want_scores):
        assert [h.doc_id for h in hits] == [ids[i] for i in wi]
        np.testing.assert_allclose([h.score for h in hits], ws, atol=1e-5)


def test_flat_on_tiny_encoder_equals_numpy(tiny_cfg: DenseConfig, tiny_encoder: BiEncoder) -> None:
    corpus = docs_corpus(40)
    r = DenseRetriever.build(corpus, tiny_cfg, ChunkingConfig(), encoder=tiny_encoder)
    queries = ["cancer trial patients", "football music", "space planet star", "virus vaccine"]
    x = tiny_encoder.encode_documents([d.content for d in corpus])
    q = tiny_encoder.encode_queries(queries)
    want_ids, want_scores = exact_topk(q, x, 7)
    got = r.search_batch(queries, 7)
    assert len(got) == len(queries)
    for query, hits, wi, ws in zip(queries, got, want_ids, want_scores):
        assert all(isinstance(h, Hit) for h in hits)
        assert [h.doc_id for h in hits] == [corpus.ids[i] for i in wi]
        np.testing.assert_allclose([h.score for h in hits], ws, atol=1e-5)
        single = r.search(query, 7)  # one query alone: same documents, scores up to float error
        assert [h.doc_id for h in single] == [h.doc_id for h in hits]
        np.testing.assert_allclose([h.score for h in single], [h.score for h in hits], atol=1e-5)
    # k beyond the corpus returns every document once
    assert sorted(h.doc_id for h in r.search(queries[0], 1000)) == sorted(corpus.ids)


def test_hnsw_recall_at_10() -> None:
    rng = np.random.default_rng(2)
    x, q = unit_rows(rng, 3000, 32), unit_rows(rng, 100, 32)
    ids = [str(i) for i in range(len(x))]
    r = DenseRetriever.from_vectors(x, ids, DenseConfig(factory="HNSW32", hnsw_ef_search=128))
    got = r.search_vectors(q, 10)
    want_ids, _ = exact_topk(q, x, 10)
    recall = np.mean([len({h.doc_id for h in hits} & {ids[i] for i in wi}) / 10 for hits, wi in zip(got, want_ids)])
    assert recall >= 0.95, recall


def test_ivf_pq_builds_and_searches() -> None:
    rng = np.random.default_rng(3)
    x = unit_rows(rng, 1000, 32)
    ids = [str(i) for i in range(len(x))]
    # 4-bit PQ codes keep k-means training cheap (16 centroids per sub-quantizer)
    r = DenseRetriever.from_vectors(x, ids, DenseConfig(factory="IVF8,PQ8x4", ivf_nprobe=8))
    assert r.num_vectors == len(x)
    q = x[:50]  # database vectors: each should find itself
    got = r.search_vectors(q, 10)
    assert all(len(h) == 10 and len({hit.doc_id for hit in h}) == 10 for h in got)
    assert all(all(a.score >= b.score for a, b in itertools.pairwise(h)) for h in got)
    self_at_1 = np.mean([hits[0].doc_id == ids[i] for i, hits in enumerate(got)])
    assert self_at_1 >= 0.8, self_at_1


def test_ivf_with_too_few_vectors_says_how_many_are_needed() -> None:
    x = unit_rows(np.random.default_rng(4), 100, 32)
    with pytest.raises(DenseIndexError, match=r"at least 256 vectors.*only 100"):
        DenseRetriever.from_vectors(x, [str(i) for i in range(100)], DenseConfig(factory="IVF16,PQ16"))
    with pytest.raises(DenseIndexError, match=r"at least 200 vectors.*only 100"):
        DenseRetriever.from_vectors(x, [str(i) for i in range(100)], DenseConfig(factory="IVF200,Flat"))


def test_invalid_factory_is_a_clear_error() -> None:
    x = unit_rows(np.random.default_rng(5), 10, 32)
    with pytest.raises(DenseIndexError, match="invalid FAISS factory string 'NoSuchIndex'"):
        DenseRetriever.from_vectors(x, [str(i) for i in range(10)], DenseConfig(factory="NoSuchIndex"))


def test_chunked_corpus_returns_each_document_once_with_best_chunk(tiny_cfg: DenseConfig, tiny_encoder: BiEncoder) -> None:
    corpus = docs_corpus(12, words_per_doc=40, seed=6)
    chunking = ChunkingConfig(enabled=True, size=8, stride=4)
    r = DenseRetriever.build(corpus, tiny_cfg, chunking, encoder=tiny_encoder)
    texts, owner = split_documents(list(corpus), chunking)
    assert r.num_vectors == len(texts) > 4 * len(corpus)
    x = tiny_encoder.encode_documents(texts)
    for query in ["cancer tumor", "ocean climate film"]:
        s = tiny_encoder.encode_queries([query])[0] @ x.T
        best = {corpus.ids[d]: float(s[owner == d].max()) for d in range(len(corpus))}
        for k in (3, len(corpus)):
            hits = r.search(query, k)
            assert len(hits) == k  # over-fetching chunks yields k distinct documents
            assert len({h.doc_id for h in hits}) == k
            want = sorted(best, key=lambda i: -best[i])[:k]
            assert [h.doc_id for h in hits] == want
            np.testing.assert_allclose([h.score for h in hits], [best[i] for i in want], atol=1e-5)


def test_save_load_round_trip(tmp_path: Path, tiny_cfg: DenseConfig, tiny_encoder: BiEncoder) -> None:
    corpus = docs_corpus(30, words_per_doc=20, seed=7)
    chunking = ChunkingConfig(enabled=True, size=10, stride=5)
    r = DenseRetriever.build(corpus, tiny_cfg.model_copy(update={"factory": "HNSW16"}), chunking, encoder=tiny_encoder)
    section = r.save(tmp_path / "dense")
    assert section["model"] == tiny_cfg.model and section["dim"] == 32 and section["factory"] == "HNSW16"
    assert section["num_vectors"] == r.num_vectors and section["num_documents"] == len(corpus)
    assert section["max_length"] == tiny_encoder.max_length and section["normalize"] is True
    assert sorted(p.name for p in (tmp_path / "dense").iterdir()) == sorted(section["files"])
    json.dumps(section)  # the manifest is JSON
    np.load(tmp_path / "dense" / "chunk_owner.npy", allow_pickle=False)

    loaded = DenseRetriever.load(tmp_path / "dense", section, tiny_encoder)
    queries = ["gene protein", "star planet", "music film football"]
    assert loaded.search_batch(queries, 8) == r.search_batch(queries, 8)


def test_load_rejects_mismatched_encoder(tmp_path: Path, tiny_cfg: DenseConfig, tiny_encoder: BiEncoder, tiny_bi_encoder_dir: Path) -> None:
    from transformers import BertConfig, BertModel

    from serve_app.testing import build_tiny_bi_encoder, tiny_vocab

    corpus = docs_corpus(10)
    section = DenseRetriever.build(corpus, tiny_cfg, ChunkingConfig(), encoder=tiny_encoder).save(tmp_path / "dense")

    other = build_tiny_bi_encoder(tmp_path / "other-model", seed=1)
    with pytest.raises(IndexLoadError, match="built with model"):
        DenseRetriever.load(tmp_path / "dense", section, BiEncoder(DenseConfig(model=str(other))))

    narrow = tmp_path / "narrow-model"
    shutil.copytree(tiny_bi_encoder_dir, narrow)
    cfg16 = BertConfig(vocab_size=len(tiny_vocab()), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=128)
    BertModel(cfg16, add_pooling_layer=False).save_pretrained(str(narrow))
    with pytest.raises(IndexLoadError, match="32-dimensional.*gives 16"):
        DenseRetriever.load(tmp_path / "dense", section, BiEncoder(DenseConfig(model=str(narrow))))

    prefixed = BiEncoder(tiny_cfg.model_copy(update={"query_prefix": "query: "}))
    with pytest.raises(IndexLoadError, match="query_prefix"):
        DenseRetriever.load(tmp_path / "dense", section, prefixed)


def test_load_rejects_damaged_or_inconsistent_index(tmp_path: Path, tiny_cfg: DenseConfig, tiny_encoder: BiEncoder) -> None:
    corpus = docs_corpus(10)
    d = tmp_path / "dense"
    section = DenseRetriever.build(corpus, tiny_cfg, ChunkingConfig(), encoder=tiny_encoder).save(d)

    assert DenseRetriever.load(d, section, tiny_encoder).doc_ids == corpus.ids  # its own ids, not the document store's
    with pytest.raises(IndexLoadError, match="holds 10 document ids, the manifest says 9"):
        DenseRetriever.load(d, {**section, "num_documents": 9}, tiny_encoder)
    ids = (d / "doc_ids.json").read_text()
    (d / "doc_ids.json").write_text('{"not": "a list"}')
    with pytest.raises(IndexLoadError, match="expected a JSON list of document ids"):
        DenseRetriever.load(d, section, tiny_encoder)
    (d / "doc_ids.json").write_text(ids)
    with pytest.raises(IndexLoadError, match="lacks dim"):
        DenseRetriever.load(d, {k: v for k, v in section.items() if k != "dim"}, tiny_encoder)
    with pytest.raises(IndexLoadError, match="manifest says 11"):
        DenseRetriever.load(d, {**section, "num_vectors": 11}, tiny_encoder)

    owner = d / "chunk_owner.npy"
    np.save(owner, np.arange(10, dtype=np.int64) + 5, allow_pickle=False)
    with pytest.raises(IndexLoadError, match="outside 0..9"):
        DenseRetriever.load(d, section, tiny_encoder)
    np.save(owner, np.array([{"a": 1}] * 10, dtype=object), allow_pickle=True)
    with pytest.raises(IndexLoadError, match="cannot read"):
        DenseRetriever.load(d, section, tiny_encoder)

    (d / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexLoadError, match="cannot read FAISS index"):
        DenseRetriever.load(d, section, tiny_encoder)
    (d / "index.faiss").unlink()
    with pytest.raises(IndexLoadError, match="is missing"):
        DenseRetriever.load(d, section, tiny_encoder)


def test_search_argument_errors(tiny_cfg: DenseConfig, tiny_encoder: BiEncoder) -> None:
    corpus = docs_corpus(5)
    r = DenseRetriever.build(corpus, tiny_cfg, ChunkingConfig(), encoder=tiny_encoder)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        r.search("gene", 0)
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        r.search_vectors(np.zeros((2, 8), dtype=np.float32), 3)
    assert r.search_batch([], 3) == []
    with pytest.raises(DenseIndexError, match="empty corpus"):
        DenseRetriever.build(Corpus([]), tiny_cfg, ChunkingConfig(), encoder=tiny_encoder)
    vector_only = DenseRetriever.from_vectors(tiny_encoder.encode(["a", "b"]), ["a", "b"], tiny_cfg)
    with pytest.raises(RuntimeError, match="no encoder"):
        vector_only.search("a", 1)
    assert vector_only.search_vectors(tiny_encoder.encode(["b"]), 1)[0][0].doc_id == "b"
