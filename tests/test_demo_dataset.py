"""The demo dataset shipped in serve_app/demo: format, integrity, shape, and real ranking signal."""

from __future__ import annotations

import fnmatch
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from serve_app.corpus import load_beir, load_corpus, load_demo, load_qrels, load_queries
from serve_app.demo import (
    DEMO_DIR,
    SPLITS,
    demo_corpus_path,
    demo_qrels_path,
    demo_queries_path,
    example_queries,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
LONG_WORDS = 600  # a "long" document has at least this many words (and at most 1200)


def _words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(demo_corpus_path())


@pytest.fixture(scope="module")
def queries() -> dict[str, str]:
    return load_queries(demo_queries_path())


@pytest.fixture(scope="module")
def qrels() -> dict[str, dict[str, dict[str, int]]]:
    return {split: load_qrels(demo_qrels_path(split)) for split in SPLITS}


# --------------------------------------------------------------------------- files and format


def test_paths_point_into_the_package():
    assert DEMO_DIR == Path(__file__).resolve().parent.parent / "serve_app" / "demo"
    for path in (demo_corpus_path(), demo_queries_path(), *(demo_qrels_path(s) for s in SPLITS)):
        assert path.is_file(), path
        assert DEMO_DIR in path.parents


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="dev"):
        demo_qrels_path("dev")
    with pytest.raises(ValueError, match="dev"):
        load_demo("dev")


def test_raw_corpus_lines_are_beir_records_with_unique_ids():
    ids, titles = [], []
    with open(demo_corpus_path(), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            rec = json.loads(line)
            assert set(rec) == {"_id", "title", "text", "metadata"}, f"line {lineno}"
            assert re.fullmatch(r"d\d{4}", rec["_id"]), f"line {lineno}: {rec['_id']!r}"
            assert rec["title"].strip() and rec["text"].strip(), f"line {lineno}"
            assert set(rec["metadata"]) == {"topic"} and rec["metadata"]["topic"], f"line {lineno}"
            ids.append(rec["_id"])
            titles.append(rec["title"])
    assert len(ids) == len(set(ids))
    assert len(titles) == len(set(titles))


def test_raw_query_lines_have_unique_ids_and_texts():
    ids, texts = [], []
    with open(demo_queries_path(), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            rec = json.loads(line)
            assert set(rec) == {"_id", "text"}, f"line {lineno}"
            assert re.fullmatch(r"q\d{3}", rec["_id"]), f"line {lineno}: {rec['_id']!r}"
            ids.append(rec["_id"])
            texts.append(rec["text"].strip().lower())
    assert len(ids) == len(set(ids))
    assert len(texts) == len(set(texts))


@pytest.mark.parametrize("split", SPLITS)
def test_loads_with_load_beir(split):
    ds = load_beir(DEMO_DIR, split)
    assert 300 <= len(ds.corpus) <= 360
    assert set(ds.queries) == set(ds.qrels)
    same = load_demo(split)
    assert same.corpus == ds.corpus and same.queries == ds.queries and same.qrels == ds.qrels


# --------------------------------------------------------------------------- judgements


def test_every_judged_id_exists(corpus, queries, qrels):
    for split, judged in qrels.items():
        for qid, docs in judged.items():
            assert qid in queries, f"{split}: query {qid} not in queries.jsonl"
            for did in docs:
                assert corpus.get(did) is not None, f"{split}: {qid} judges unknown document {did}"


def test_splits_are_disjoint_and_cover_every_query(queries, qrels):
    train, test = set(qrels["train"]), set(qrels["test"])
    assert not train & test
    assert train | test == set(queries)
    assert 60 <= len(train) <= 80
    assert 25 <= len(test) <= 35


def test_grades_and_number_of_relevant_documents(qrels):
    for split, judged in qrels.items():
        for qid, docs in judged.items():
            assert 1 <= len(docs) <= 4, f"{split} {qid}: {len(docs)} relevant documents"
            assert set(docs.values()) <= {1, 2}, f"{split} {qid}: grades {sorted(docs.values())}"
            assert 2 in docs.values(), f"{split} {qid}: no document fully answers it"


def test_qrels_files_are_well_formed_tsv():
    for split in SPLITS:
        lines = demo_qrels_path(split).read_text(encoding="utf-8").splitlines()
        assert lines[0] == "query-id\tcorpus-id\tscore"
        pairs = [tuple(line.split("\t")[:2]) for line in lines[1:]]
        assert all(len(line.split("\t")) == 3 for line in lines[1:])
        assert len(pairs) == len(set(pairs)), f"{split}: a pair is judged twice"


# --------------------------------------------------------------------------- shape of the corpus


def test_topics(corpus):
    topics = Counter(d.metadata["topic"] for d in corpus)
    assert 10 <= len(topics) <= 12, topics
    assert all(20 <= n <= 40 for n in topics.values()), topics


def test_document_lengths_and_long_documents(corpus):
    long_docs = [d for d in corpus if _words(d.text) >= LONG_WORDS]
    assert 8 <= len(long_docs) <= 14
    assert all(_words(d.text) <= 1200 for d in long_docs)
    assert len({d.metadata["topic"] for d in long_docs}) >= 8, "long documents should span topics"
    for d in corpus:
        if d not in long_docs:
            assert 40 <= _words(d.text) <= 120, f"{d.id}: {_words(d.text)} words"


def test_long_documents_are_split_by_default_chunking(corpus):
    from serve_app.chunking import word_windows
    from serve_app.config import ChunkingConfig

    cfg = ChunkingConfig(enabled=True)
    for d in corpus:
        n_windows = len(word_windows(d.content, cfg.size, cfg.stride))
        assert (n_windows > 1) == (_words(d.text) >= LONG_WORDS), d.id


def test_long_documents_are_judged(corpus, qrels):
    judged = {did for split in qrels.values() for docs in split.values() for did in docs}
    long_ids = {d.id for d in corpus if _words(d.text) >= LONG_WORDS}
    assert len(long_ids & judged) >= 8


def test_no_near_duplicate_documents(corpus):
    """Written text, not templates: no two documents share most of their vocabulary."""
    vocab = {d.id: set(re.findall(r"[a-z]+", d.text.lower())) for d in corpus}
    worst = max(
        (len(vocab[a] & vocab[b]) / len(vocab[a] | vocab[b]), a, b)
        for a, b in itertools.combinations(vocab, 2)
    )
    assert worst[0] < 0.35, worst


@pytest.mark.parametrize("word", ["bank", "batch", "pitch", "model", "stream", "seed"])
def test_ambiguous_words_span_topics(corpus, word):
    """Words with several senses occur in several topics, so lexical matching alone is fooled."""
    pattern = re.compile(rf"\b{word}", re.IGNORECASE)
    topics = {d.metadata["topic"] for d in corpus if pattern.search(d.content)}
    assert len(topics) >= 2, (word, topics)


# --------------------------------------------------------------------------- examples and packaging


def test_example_queries_are_judged_queries(queries, qrels):
    examples = example_queries()
    assert 3 <= len(examples) <= 8
    by_text = {t: q for q, t in queries.items()}
    for text in examples:
        assert text in by_text, text
        assert any(by_text[text] in judged for judged in qrels.values()), text
    examples.append("mutated")
    assert "mutated" not in example_queries()


def test_package_data_globs_cover_every_data_file():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["serve_app"]
    package_root = DEMO_DIR.parent
    data_files = [p for p in DEMO_DIR.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert data_files
    for path in data_files:
        rel = path.relative_to(package_root).as_posix()
        # setuptools globs do not cross "/" with "*"; compare segment by segment
        assert any(
            len(g.split("/")) == len(rel.split("/")) and all(fnmatch.fnmatch(s, p) for s, p in zip(rel.split("/"), g.split("/")))
            for g in globs
        ), f"{rel} is not covered by package-data {globs}"


# --------------------------------------------------------------------------- ranking signal


def _bm25_run(split: str, k: int = 10):
    from serve_app.retrieval.bm25 import BM25Retriever

    ds = load_beir(DEMO_DIR, split)
    retriever = BM25Retriever.build(ds.corpus)
    qids = list(ds.queries)
    hits = retriever.search_batch([ds.queries[q] for q in qids], k)
    run = {q: {h.doc_id: float(k - i) for i, h in enumerate(hs)} for q, hs in zip(qids, hits)}
    return ds, run


def test_bm25_ranks_the_demo_test_split_sensibly():
    from serve_app.eval import evaluate

    ds, run = _bm25_run("test")
    scores = evaluate(run, ds.qrels, ["nDCG@10", "R@10"])
    assert scores["nDCG@10"] > 0.5, scores
    assert scores["R@10"] > 0.6, scores


def test_bm25_is_far_from_perfect_on_the_paraphrased_examples():
    """The first two README examples share almost no words with their answers."""
    ds = {split: load_beir(DEMO_DIR, split) for split in SPLITS}
    judged = {q: docs for d in ds.values() for q, docs in d.qrels.items()}
    text_to_qid = {t: q for d in ds.values() for q, t in d.queries.items()}
    from serve_app.retrieval.bm25 import BM25Retriever

    retriever = BM25Retriever.build(ds["test"].corpus)
    for text in example_queries()[:2]:
        top = retriever.search(text, 1)
        assert not top or top[0].doc_id not in judged[text_to_qid[text]], text


@pytest.mark.slow
def test_bi_encoder_finds_the_paraphrased_examples(minilm_dir):
    """all-MiniLM-L6-v2 (reference: sentence-transformers) puts an answer first where BM25 does not."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    ds = {split: load_beir(DEMO_DIR, split) for split in SPLITS}
    judged = {q: docs for d in ds.values() for q, docs in d.qrels.items()}
    text_to_qid = {t: q for d in ds.values() for q, t in d.queries.items()}
    docs = list(ds["test"].corpus)
    model = SentenceTransformer(str(minilm_dir), device="cpu")
    doc_emb = model.encode([d.content for d in docs], normalize_embeddings=True, batch_size=32)
    texts = example_queries()[:2]
    sims = model.encode(texts, normalize_embeddings=True) @ doc_emb.T
    for text, row in zip(texts, sims):
        best = docs[int(np.argmax(row))].id
        assert judged[text_to_qid[text]].get(best) == 2, (text, best)
