"""Metadata filters: the language (parse errors name their path), the columnar evaluation
against the per-document reference (property-based), and filtered retrieval equal to brute
force over the admitted documents for BM25, dense (flat, HNSW, exact switch), their shards and
their live versions."""

from __future__ import annotations

import random

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_app.config import BM25Config, DenseConfig
from serve_app.filters import FilterError, MetadataColumns, all_of, check_metadata, matches, parse_fields, parse_filter
from serve_app.live.bm25 import LiveBM25
from serve_app.live.changes import UPSERT, Batch, Change, StatsDelta
from serve_app.live.dense import LiveDense
from serve_app.retrieval.bm25 import BM25Retriever
from serve_app.retrieval.dense import DenseRetriever
from serve_app.retrieval.sharding import ShardedRetriever
from serve_app.types import Document

FIELDS = {"tenant": "keyword", "year": "integer", "score": "float", "published": "datetime", "open": "boolean", "tags": "keywords"}
TENANTS = ["acme", "globex", "initech"]
TAGS = ["a", "b", "c", "d"]


def meta_strategy() -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {},
        optional={
            "tenant": st.sampled_from(TENANTS),
            "year": st.integers(1990, 2030),
            "score": st.floats(-5, 5, allow_nan=False),
            "published": st.sampled_from(["2019-05-01", "2020-01-01T00:00:00Z", "2021-06-30T12:00:00+02:00"]),
            "open": st.booleans(),
            "tags": st.lists(st.sampled_from(TAGS), max_size=3),
        },
    )


def condition_strategy() -> st.SearchStrategy:
    return st.one_of(
        st.builds(lambda v: {"tenant": v}, st.sampled_from(TENANTS + ["nobody"])),
        st.builds(lambda vs: {"tenant": {"in": vs}}, st.lists(st.sampled_from(TENANTS), min_size=1, max_size=3)),
        st.builds(lambda op, v: {"year": {op: v}}, st.sampled_from(["gt", "gte", "lt", "lte", "eq"]), st.integers(1990, 2030)),
        st.builds(lambda op, v: {"score": {op: v}}, st.sampled_from(["gt", "lt"]), st.floats(-5, 5, allow_nan=False)),
        st.builds(lambda op, v: {"published": {op: v}}, st.sampled_from(["gte", "lt"]), st.sampled_from(["2020-01-01", "2021-06-30T10:00:00Z"])),
        st.builds(lambda v: {"open": v}, st.booleans()),
        st.builds(lambda v: {"tags": v}, st.sampled_from(TAGS)),
        st.builds(lambda vs: {"tags": {"in": vs}}, st.lists(st.sampled_from(TAGS), min_size=1, max_size=2)),
        st.builds(lambda f, v: {f: {"exists": v}}, st.sampled_from(sorted(FIELDS)), st.booleans()),
    )


def filter_strategy() -> st.SearchStrategy:
    return st.recursive(
        condition_strategy(),
        lambda inner: st.one_of(
            st.builds(lambda xs: {"and": xs}, st.lists(inner, min_size=1, max_size=3)),
            st.builds(lambda xs: {"or": xs}, st.lists(inner, min_size=1, max_size=3)),
            st.builds(lambda x: {"not": x}, inner),
        ),
        max_leaves=6,
    )


# --------------------------------------------------------------------------- the language


def test_fields_refuse_unknown_types_and_reserved_names() -> None:
    assert parse_fields({"tenant": "keyword"}) == {"tenant": "keyword"}
    with pytest.raises(ValueError, match="unknown type"):
        parse_fields({"tenant": "string"})
    with pytest.raises(ValueError, match="operator"):
        parse_fields({"and": "keyword"})


@pytest.mark.parametrize(
    ("flt", "path"),
    [
        ({"owner": "x"}, "filter.owner: unknown field 'owner'"),
        ({"and": [{"tenant": "a"}, {"year": {"gte": "2019"}}]}, "filter.and[1].year.gte"),
        ({"year": {"between": [1, 2]}}, "filter.year.between"),
        ({"open": {"in": [True]}}, "filter.open.in"),
        ({"tenant": 3}, "filter.tenant.eq"),
        ({"published": {"gte": "yesterday"}}, "filter.published.gte"),
        ({"tags": {"in": []}}, "filter.tags.in"),
        ({"or": []}, "filter.or"),
        ({}, "filter:"),
        ([{"tenant": "a"}], "filter:"),
        ({"score": {"exists": "yes"}}, "filter.score.exists"),
    ],
)
def test_a_bad_filter_names_its_path(flt, path) -> None:
    with pytest.raises(FilterError) as info:
        parse_filter(flt, FIELDS)
    assert path in str(info.value)


def test_filters_have_bounded_size() -> None:
    deep: dict = {"tenant": "a"}
    for _ in range(10):
        deep = {"not": deep}
    with pytest.raises(FilterError, match="levels deep"):
        parse_filter(deep, FIELDS)
    with pytest.raises(FilterError, match="at most 64 conditions"):
        parse_filter({"or": [{"year": i} for i in range(65)]}, FIELDS)


def test_metadata_of_the_wrong_type_is_refused_at_write() -> None:
    check_metadata({"tenant": "acme", "tags": ["x"], "other": object()}, FIELDS)
    with pytest.raises(FilterError, match="metadata.year"):
        check_metadata({"year": "2019"}, FIELDS)
    with pytest.raises(FilterError, match="metadata.tags"):
        check_metadata({"tags": "x"}, FIELDS)
    with pytest.raises(FilterError, match="metadata.open"):
        check_metadata({"open": 1}, FIELDS)


def test_all_of_ands_filters_and_skips_none() -> None:
    a, b = parse_filter({"tenant": "acme"}, FIELDS), parse_filter({"year": 2020}, FIELDS)
    assert all_of(None, None) is None
    assert all_of(a, None) == a
    both = all_of(a, b)
    assert matches(both, {"tenant": "acme", "year": 2020})
    assert not matches(both, {"tenant": "acme", "year": 2021})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metas=st.lists(meta_strategy(), min_size=1, max_size=30), flt=filter_strategy(), split=st.integers(0, 30))
def test_columns_agree_with_the_per_document_reference(metas, flt, split) -> None:
    """The vectorised mask equals the per-document evaluation, also after appends and take()."""
    node = parse_filter(flt, FIELDS)
    split = min(split, len(metas))
    cols = MetadataColumns(FIELDS, metas[:split])
    cols.append(metas[split:])
    expected = [matches(node, m) for m in metas]
    assert cols.mask(node).tolist() == expected
    assert cols.mask(node, split).tolist() == expected[:split]
    picked = list(range(0, len(metas), 2))
    assert cols.take(picked).mask(node).tolist() == [expected[i] for i in picked]


# --------------------------------------------------------------------------- retrieval

WORDS = "cell gene protein cancer virus immune brain drug trial dose blood heart lung liver risk".split()


def corpus(n: int, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        meta = {"tenant": TENANTS[i % 3], "year": 1990 + (i * 7) % 40, "bucket": i % 10000}
        if i % 5:
            meta["tags"] = [TAGS[i % 4]]
        out.append(Document(f"d{i}", text, metadata=meta))
    return out


FIELDS_B = {**FIELDS, "bucket": "integer"}


def brute_bm25(full: BM25Retriever, docs: list[Document], query: str, k: int, node) -> list[str]:
    """Top-k by the unfiltered retriever's scores among the admitted documents: exact reference."""
    scored = full.search(query, len(docs))
    return [h.doc_id for h in scored if matches(node, docs[int(h.doc_id[1:])].metadata)][:k]


@pytest.mark.parametrize("selectivity", [0.5, 0.1, 0.01, 0.001])
def test_bm25_filtered_equals_brute_force(selectivity) -> None:
    docs = corpus(3000)
    r = BM25Retriever.build(docs, BM25Config())
    r.columns = MetadataColumns(FIELDS_B, [d.metadata for d in docs])
    node = parse_filter({"bucket": {"lt": max(1, int(10000 * selectivity))}}, FIELDS_B) if selectivity < 0.5 else parse_filter({"tenant": {"in": ["acme", "globex"]}}, FIELDS_B)
    admitted = int(r.columns.mask(node).sum())
    for q in ["cancer gene", "immune virus dose", "heart"]:
        hits = r.search(q, 10, node)
        assert [h.doc_id for h in hits] == brute_bm25(r, docs, q, 10, node)
        assert all(matches(node, docs[int(h.doc_id[1:])].metadata) for h in hits)
        assert len(hits) == min(10, len(brute_bm25(r, docs, q, 10_000, node)))
    assert admitted >= 1


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def dense_fixture(n: int, factory: str, **cfg):
    rng = np.random.default_rng(0)
    vecs = unit(rng.standard_normal((n, 32)))
    docs = corpus(n)
    r = DenseRetriever.from_vectors(vecs, [d.id for d in docs], DenseConfig(factory=factory, use_gpu_index=False, **cfg))
    r.columns = MetadataColumns(FIELDS_B, [d.metadata for d in docs])
    return r, docs, vecs


def brute_dense(vecs: np.ndarray, q: np.ndarray, mask: np.ndarray, k: int) -> list[str]:
    scores = vecs @ q
    idx = [i for i in np.lexsort((np.arange(len(scores)), -scores)) if mask[i]]
    return [f"d{i}" for i in idx[:k]]


@pytest.mark.parametrize("selectivity", [0.5, 0.1, 0.01, 0.001])
@pytest.mark.parametrize("exact_below", [0, 20000])
@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_dense_flat_filtered_equals_brute_force_in_the_index_and_exactly(selectivity, exact_below, factory) -> None:
    """Flat: the selector in the index, or the exact scan; IVF-Flat (all lists probed): the
    selector in the index, or its vectors decoded and scored: each equals brute force."""
    r, docs, vecs = dense_fixture(4000, factory, filter_exact_max_vectors=exact_below, filter_exact_fraction=0.0, ivf_nprobe=8)
    node = parse_filter({"bucket": {"lt": int(10000 * selectivity)}}, FIELDS_B)
    mask = r.columns.mask(node)
    qs = unit(np.random.default_rng(1).standard_normal((5, 32)))
    for q, hits in zip(qs, r.search_vectors(qs, 10, node)):
        assert [h.doc_id for h in hits] == brute_dense(vecs, q, mask, 10)
        assert len(hits) == min(10, int(mask.sum()))


@pytest.mark.parametrize("selectivity", [0.5, 0.1, 0.01, 0.001])
def test_dense_hnsw_filtered_recall_and_never_fewer_than_k(selectivity) -> None:
    """HNSW with the default switch: recall@10 >= 0.99 against brute force, k results when k admitted."""
    r, docs, vecs = dense_fixture(4000, "HNSW16", filter_exact_max_vectors=200)
    node = parse_filter({"bucket": {"lt": int(10000 * selectivity)}}, FIELDS_B)
    mask = r.columns.mask(node)
    qs = unit(np.random.default_rng(2).standard_normal((20, 32)))
    found = hits_total = 0
    for q, hits in zip(qs, r.search_vectors(qs, 10, node)):
        truth = brute_dense(vecs, q, mask, 10)
        assert len(hits) == len(truth) == min(10, int(mask.sum()))
        assert all(mask[int(h.doc_id[1:])] for h in hits)
        found += len(set(truth) & {h.doc_id for h in hits})
        hits_total += len(truth)
    assert found / hits_total >= 0.99


def test_hnsw_in_index_search_that_comes_back_short_is_redone_exactly(monkeypatch) -> None:
    """Force the in-index path at 0.1 % (where HNSW alone misses): still k results, exact."""
    r, docs, vecs = dense_fixture(4000, "HNSW8", filter_exact_max_vectors=0, filter_exact_fraction=0.0, hnsw_ef_search=8)
    node = parse_filter({"bucket": {"lt": 10}}, FIELDS_B)
    mask = r.columns.mask(node)
    q = unit(np.random.default_rng(3).standard_normal((4, 32)))
    for row, hits in zip(q, r.search_vectors(q, 5, node)):
        assert [h.doc_id for h in hits] == brute_dense(vecs, row, mask, 5)


def test_a_filter_on_an_index_without_fields_is_refused() -> None:
    r = BM25Retriever.build(corpus(50))
    with pytest.raises(FilterError, match="declares no filterable fields"):
        r.search("cell", 3, parse_filter({"tenant": "acme"}, FIELDS))


def test_sharded_bm25_filters_in_each_shard() -> None:
    docs = corpus(900)
    full = BM25Retriever.build(docs)
    full.columns = MetadataColumns(FIELDS_B, [d.metadata for d in docs])
    sharded = ShardedRetriever(full.split([(0, 300), (300, 600), (600, 900)]))
    node = parse_filter({"and": [{"tenant": "initech"}, {"year": {"gte": 2010}}]}, FIELDS_B)
    for q in ["cancer gene", "lung risk drug"]:
        assert [h.doc_id for h in sharded.search(q, 10, node)] == [h.doc_id for h in full.search(q, 10, node)]


def test_live_bm25_and_dense_filters_follow_metadata_updates() -> None:
    """A metadata update changes what a filter admits at the batch that carries it (and not before)."""
    from serve_app.live.bm25 import batch_stats

    docs = corpus(300)
    base = BM25Retriever.build(docs)
    live = LiveBM25(base, docs, fields=FIELDS_B)
    moved = Document("d5", docs[5].text, metadata={**docs[5].metadata, "tenant": "newco"})
    live.apply(Batch(1, (Change(UPSERT, "d5", document=moved),), batch_stats([docs[5]], [moved], live.tokenizer, live.chunking)))
    newco = parse_filter({"tenant": "newco"}, FIELDS_B)
    old = parse_filter({"tenant": docs[5].metadata["tenant"]}, FIELDS_B)
    q = docs[5].text
    assert [h.doc_id for h in live.search(q, 5, None, newco)] == ["d5"]
    assert "d5" not in [h.doc_id for h in live.search(q, 300, None, old)]
    assert "d5" in [h.doc_id for h in live.search(q, 300, 0, old)]  # as of before the update
    assert live.search(q, 5, 0, newco) == []

    rng = np.random.default_rng(0)
    vecs = unit(rng.standard_normal((300, 32)))
    dense = DenseRetriever.from_vectors(vecs, [d.id for d in docs], DenseConfig(factory="Flat", use_gpu_index=False))
    ld = LiveDense(dense, columns=MetadataColumns(FIELDS_B, [d.metadata for d in docs]))
    new_vec = vecs[5:6].copy()
    ld.apply(Batch(1, (Change(UPSERT, "d5", document=moved, vectors=new_vec),), StatsDelta()))
    assert [h.doc_id for h in ld.search_vectors(new_vec, 3, None, newco)[0]] == ["d5"]
    assert "d5" not in [h.doc_id for h in ld.search_vectors(new_vec, 300, None, old)[0]]
    hits = ld.search_vectors(new_vec, 10, None, old)[0]
    mask = np.array([matches(old, d.metadata) and d.id != "d5" for d in docs])
    assert [h.doc_id for h in hits] == brute_dense(vecs, new_vec[0], mask, 10)
