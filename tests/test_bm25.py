"""BM25Retriever: chunk collapsing, persistence, tokenisation, and parity of the bm25s and rank_bm25 engines.

Engine differences (see the docstring of serve_app.retrieval.bm25): for ``robertson`` rank_bm25's
BM25Okapi scores are ``k1 + 1`` times bm25s's, and its default ``epsilon`` floors negative idfs
(terms in more than half of the chunks) to ``epsilon * mean idf`` where bm25s uses 0 (the engine
passes ``epsilon=0``); ``bm25+`` agrees exactly; ``bm25l`` differs (rank_bm25 multiplies by tf once
more and scores absent terms 0).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from serve_app.chunking import split_documents
from serve_app.config import BM25Config, ChunkingConfig
from serve_app.corpus import Corpus
from serve_app.errors import IndexLoadError
from serve_app.retrieval.bm25 import BM25Retriever
from serve_app.types import Document, Hit, Retriever

FILLER = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()


def filler(n: int, offset: int = 0) -> str:
    return " ".join(FILLER[(offset + i) % len(FILLER)] for i in range(n))


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.from_documents(
        [
            Document("cats", "Cats chase mice. A cat sleeps all day long.", title="Cats"),
            Document("dogs", "Dogs chase cats and bark at the mailman.", title="Dogs"),
            Document("space", "The telescope observed a distant galaxy and its stars."),
            Document("bread", "Baking bread needs flour, water and patience."),
            Document("long", f"{filler(40)} zebra zebra zebra stripes {filler(40, 3)} zebra {filler(30, 5)}", title="Savanna"),
            Document("rivers", "Rivers carry water to the sea; a zebra drinks."),
        ]
    )


def ids(hits: list[Hit]) -> list[str]:
    return [h.doc_id for h in hits]


# --------------------------------------------------------------------------- basics


def test_retriever_protocol_and_ranking(corpus):
    r = BM25Retriever.build(corpus)
    assert isinstance(r, Retriever) and r.name == "bm25"
    hits = r.search("cats chasing mice", 10)
    assert ids(hits)[:2] == ["cats", "dogs"]  # "mice" only in the cats document
    assert set(ids(hits)) == {"cats", "dogs"}  # only documents with a query token come back
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    assert r.search("water", 10)[0].doc_id in {"bread", "rivers"}


def test_no_known_token_returns_empty(corpus):
    r = BM25Retriever.build(corpus)
    assert r.search("xylophone quux", 5) == []
    assert r.search("the and of", 5) == []  # stopwords only
    assert r.search("", 5) == []
    assert r.search("cats", 0) == []
    assert r.search_batch(["zzz", "bread"], 3) == [[], r.search("bread", 3)]
    with pytest.raises(ValueError, match="k must be >= 0"):
        r.search("cats", -1)
    with pytest.raises(TypeError, match="sequence of queries"):
        r.search_batch("cats", 3)  # type: ignore[arg-type]


def test_search_batch_matches_search(corpus):
    r = BM25Retriever.build(corpus, chunking=ChunkingConfig(enabled=True, size=12, stride=8))
    queries = ["zebra stripes", "galaxy stars", "bread flour water", "nothing-known"]
    assert r.search_batch(queries, 4) == [r.search(q, 4) for q in queries]


def test_tokenisation_settings(corpus):
    default = BM25Retriever.build(corpus)
    assert set(ids(default.search("chased", 10))) == {"cats", "dogs"}  # stemming: chased -> chase
    assert default.search("THE", 10) == []  # lowercased, then dropped as a stopword
    keep_all = BM25Retriever.build(corpus, BM25Config(stopwords=None, stemmer=None))
    assert "space" in ids(keep_all.search("the", 10))
    assert keep_all.search("chased", 10) == []
    case = BM25Retriever.build(corpus, BM25Config(lowercase=False))
    assert ids(case.search("Dogs", 10)) == ["dogs"]
    assert case.search("dogs", 10) == []  # "Dogs" only appears capitalised
    assert ids(default.search("dogs", 10)) == ["dogs"]


def test_build_errors(corpus):
    with pytest.raises(ValueError, match="rank_bm25 engine supports the methods robertson, bm25l, bm25\\+, not 'lucene'"):
        BM25Retriever.build(corpus, BM25Config(engine="rank_bm25", method="lucene"))
    with pytest.raises(ValueError, match="not 'atire'"):
        BM25Retriever.build(corpus, BM25Config(engine="rank_bm25", method="atire"))
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Retriever.build([])
    with pytest.raises(ValueError, match="no document has an indexable token"):
        BM25Retriever.build([Document("a", "the a of"), Document("b", "x y")])


# --------------------------------------------------------------------------- chunks


@pytest.mark.parametrize("engine,method", [("bm25s", "lucene"), ("rank_bm25", "robertson")])
def test_chunked_document_scored_by_best_chunk(corpus, engine, method):
    chunking = ChunkingConfig(enabled=True, size=10, stride=10)
    cfg = BM25Config(engine=engine, method=method)
    chunked = BM25Retriever.build(corpus, cfg, chunking)
    texts, owner = split_documents(list(corpus), chunking)
    assert chunked.num_chunks == len(texts) > len(corpus)
    # The same windows indexed as stand-alone documents give every chunk's own score.
    as_docs = BM25Retriever.build([Document(f"{i}", t) for i, t in enumerate(texts)], cfg)
    for query in ("zebra", "zebra stripes", "alpha zebra water"):
        hits = chunked.search(query, 10)
        assert len(ids(hits)) == len(set(ids(hits)))  # each document once
        chunk_scores = {int(h.doc_id): h.score for h in as_docs.search(query, len(texts))}
        for h in hits:
            pos = corpus.position(h.doc_id)
            best = max(s for c, s in chunk_scores.items() if owner[c] == pos)
            assert h.score == pytest.approx(best, rel=1e-6)
        expected = sorted({corpus[int(owner[c])].id for c in chunk_scores})
        assert sorted(ids(hits)) == expected


def test_fetches_enough_chunks_to_fill_k():
    # "zebra" fills every window of the long document, so the best chunks all belong to it.
    docs = [Document("long", " ".join(["zebra"] * 200)), Document("a", f"zebra {filler(30)}"), Document("b", f"zebra {filler(60)}"), Document("c", "lion")]
    r = BM25Retriever.build(docs, chunking=ChunkingConfig(enabled=True, size=8, stride=8))
    hits = r.search("zebra", 3)
    assert ids(hits) == ["long", "a", "b"]
    assert ids(r.search("zebra", 10)) == ["long", "a", "b"]  # fewer than k match


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("engine,method", [("bm25s", "lucene"), ("bm25s", "bm25+"), ("rank_bm25", "robertson"), ("rank_bm25", "bm25l")])
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(corpus, tmp_path, engine, method, mmap):
    cfg = BM25Config(engine=engine, method=method, k1=1.2, b=0.6, delta=0.7, stemmer="porter")
    chunking = ChunkingConfig(enabled=True, size=16, stride=12)
    r = BM25Retriever.build(corpus, cfg, chunking)
    section = r.save(tmp_path / "bm25")
    assert json.loads(json.dumps(section)) == section  # JSON-serialisable manifest section
    assert {k: section[k] for k in cfg.model_dump()} == cfg.model_dump()
    assert (section["num_documents"], section["num_chunks"]) == (len(corpus), r.num_chunks)
    assert section["chunking"] == chunking.model_dump()
    loaded = BM25Retriever.load(tmp_path / "bm25", section, mmap=mmap)
    assert loaded.config == cfg and loaded.chunking == chunking
    queries = ["zebra stripes", "cats chase", "water", "alpha golf", "unknownword"]
    assert loaded.search_batch(queries, 5) == r.search_batch(queries, 5)


@pytest.mark.parametrize("engine,method", [("bm25s", "bm25l"), ("rank_bm25", "robertson")])
def test_saved_files_are_json_or_plain_npy(corpus, tmp_path, engine, method):
    BM25Retriever.build(corpus, BM25Config(engine=engine, method=method)).save(tmp_path)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert files and {p.suffix for p in files} <= {".json", ".npy"}
    for p in files:
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)  # raises for object (pickled) arrays
            assert arr.dtype != object
        else:
            json.loads(p.read_text(encoding="utf-8"))


def test_load_errors(corpus, tmp_path):
    r = BM25Retriever.build(corpus)
    section = r.save(tmp_path / "bm25")
    with pytest.raises(IndexLoadError, match="unsupported BM25 index format 99"):
        BM25Retriever.load(tmp_path / "bm25", {**section, "format_version": 99})
    with pytest.raises(IndexLoadError, match="chunks: found 6, the manifest says 7"):
        BM25Retriever.load(tmp_path / "bm25", {**section, "num_chunks": 7})
    with pytest.raises(IndexLoadError, match="invalid BM25 manifest section"):
        BM25Retriever.load(tmp_path / "bm25", {**section, "k1": -1})
    with pytest.raises(IndexLoadError, match="directory missing"):
        BM25Retriever.load(tmp_path / "nope", section)
    (tmp_path / "bm25" / "doc_ids.json").unlink()
    with pytest.raises(IndexLoadError, match="doc_ids.json: missing file"):
        BM25Retriever.load(tmp_path / "bm25", section)


def test_load_reports_missing_engine_file(corpus, tmp_path):
    r = BM25Retriever.build(corpus)
    section = r.save(tmp_path)
    next(tmp_path.glob("data.csc.index.npy")).unlink()
    with pytest.raises(IndexLoadError, match="cannot load the bm25s index"):
        BM25Retriever.load(tmp_path, section)


# --------------------------------------------------------------------------- engine parity (small corpus)


def _scores(r: BM25Retriever, query: str) -> dict[str, float]:
    return {h.doc_id: h.score for h in r.search(query, 1000)}


@pytest.mark.parametrize("method,scale", [("robertson", "k1+1"), ("bm25+", 1.0)])
def test_engines_agree_on_small_corpus(corpus, method, scale):
    cfg = BM25Config(method=method, k1=1.3, b=0.7, delta=0.6)
    a = BM25Retriever.build(corpus, cfg)
    b = BM25Retriever.build(corpus, cfg.model_copy(update={"engine": "rank_bm25"}))
    factor = cfg.k1 + 1 if scale == "k1+1" else scale
    for q in ("cats chase mice", "zebra water", "bread galaxy stars", "zebra"):
        sa, sb = _scores(a, q), _scores(b, q)
        assert sa.keys() == sb.keys() and sa
        for d in sa:
            assert sa[d] == pytest.approx(sb[d] / factor, rel=1e-5, abs=1e-6)


def test_okapi_idf_floor_matches_bm25s():
    # "common" is in 4 of 5 documents: its Robertson idf log((N-df+.5)/(df+.5)) is negative.
    docs = [Document(str(i), t) for i, t in enumerate(["common rare", "common", "common other", "common thing", "lonely"])]
    cfg = BM25Config(method="robertson")
    a = BM25Retriever.build(docs, cfg)
    b = BM25Retriever.build(docs, cfg.model_copy(update={"engine": "rank_bm25"}))
    sa, sb = _scores(a, "common"), _scores(b, "common")
    assert set(sa) == set(sb) == {"0", "1", "2", "3"}
    assert all(v == 0.0 for v in sa.values()) and all(v == 0.0 for v in sb.values())  # both floor the idf at 0
    # rank_bm25's default (epsilon=0.25) would instead give the term 0.25 * mean idf > 0:
    import rank_bm25

    tokens = b.tokenizer([d.content for d in docs])
    default_okapi = rank_bm25.BM25Okapi(tokens, k1=cfg.k1, b=cfg.b)
    assert default_okapi.get_scores(["common"])[1] > 0


def test_bm25l_engines_differ_as_documented():
    docs = [Document("twice", "apple apple pie"), Document("once", "apple tart"), Document("banana", "banana split")]
    cfg = BM25Config(method="bm25l")
    a = BM25Retriever.build(docs, cfg)
    b = BM25Retriever.build(docs, cfg.model_copy(update={"engine": "rank_bm25"}))
    sa, sb = _scores(a, "apple banana"), _scores(b, "apple banana")
    assert sa.keys() == sb.keys() == {"twice", "once", "banana"}
    ratios = {d: sb[d] / sa[d] for d in sa}
    assert max(ratios.values()) - min(ratios.values()) > 0.1  # not a common scale: the engines disagree


# --------------------------------------------------------------------------- SciFact parity


@pytest.fixture(scope="module")
def scifact(scifact_dir):
    from serve_app.corpus import load_beir

    return load_beir(scifact_dir, split="test")


def assert_same_top(a: list[Hit], b_full: list[Hit], k: int, scale: float, tol: float) -> int:
    """``a`` (top-k of one engine) equals ``b_full[:k]`` (other engine) up to exact-score ties; returns #tie swaps."""
    b = b_full[:k]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.score == pytest.approx(y.score / scale, abs=tol)
    b_scores = {h.doc_id: h.score / scale for h in b_full}
    swaps = 0
    for x, y in zip(a, b):
        if x.doc_id != y.doc_id:  # allowed only when x is tied, in the other engine, with the doc at this rank
            swaps += 1
            assert x.doc_id in b_scores and b_scores[x.doc_id] == pytest.approx(y.score / scale, abs=tol)
    return swaps


@pytest.mark.slow
@pytest.mark.scifact
@pytest.mark.parametrize("method", ["robertson", "bm25+"])
def test_engine_parity_on_scifact(scifact, method):
    cfg = BM25Config(method=method)  # k1=0.9, b=0.4, delta=0.5, English stopwords + stemmer
    a = BM25Retriever.build(scifact.corpus, cfg)
    b = BM25Retriever.build(scifact.corpus, cfg.model_copy(update={"engine": "rank_bm25"}))
    qids = list(scifact.queries)[::10][:30]
    # "we" is in more than half of SciFact's documents (negative Robertson idf): exercises the idf floor.
    queries = [scifact.queries[q] for q in qids] + ["we show that obesity increases the risk of cancer"]
    assert len(queries) == 31
    scale = cfg.k1 + 1 if method == "robertson" else 1.0
    swaps = 0
    for q in queries:
        ha = a.search(q, 10)
        hb = b.search(q, 50)
        assert len(ha) == 10
        swaps += assert_same_top(ha, hb, 10, scale, tol=1e-4)
    assert swaps <= 4  # ties are rare; many swaps would mean a real ranking difference


@pytest.mark.slow
@pytest.mark.scifact
def test_default_lucene_retrieves_sensibly(scifact):
    import ir_measures
    from ir_measures import R, nDCG

    r = BM25Retriever.build(scifact.corpus)  # bm25s, lucene, k1=0.9, b=0.4
    qids = list(scifact.queries)
    run = {q: {h.doc_id: h.score for h in hits} for q, hits in zip(qids, r.search_batch([scifact.queries[q] for q in qids], 100))}
    agg = ir_measures.calc_aggregate([nDCG @ 10, R @ 100], scifact.qrels, run)
    # Published BM25 results on SciFact test are ~0.66-0.69 nDCG@10 and ~0.9 R@100.
    assert agg[nDCG @ 10] > 0.62
    assert agg[R @ 100] > 0.85
