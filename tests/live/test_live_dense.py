"""Dense search under writes: new vectors in an exact delta, deleted ones excluded inside FAISS."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.config import DenseConfig
from serve_app.live.changes import DELETE, UPSERT, Batch, Change
from serve_app.live.dense import LiveDense
from serve_app.retrieval.dense import DenseRetriever
from serve_app.types import Document


def unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def setup(factory: str, n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    vecs = unit(rng, n)
    ids = [f"d{i}" for i in range(n)]
    base = DenseRetriever.from_vectors(vecs, ids, DenseConfig(factory=factory, hnsw_ef_search=64))
    return rng, dict(zip(ids, vecs)), LiveDense(base)


def apply(live: LiveDense, vectors: dict, seq: int, upserts: dict, deletes=()) -> None:
    for d in deletes:
        vectors.pop(d, None)
    for k, v in upserts.items():
        vectors.pop(k, None)
        vectors[k] = v  # re-inserted at the end: the live order
    changes = [Change(UPSERT, k, Document(k, "t"), v[None, :]) for k, v in upserts.items()] + [Change(DELETE, d) for d in deletes]
    live.apply(Batch(seq, tuple(changes)))


def test_flat_results_equal_a_fresh_build_of_the_live_vectors():
    rng, vectors, live = setup("Flat")
    for seq in range(1, 5):
        keys = list(vectors)
        picks = rng.choice(len(keys), 60, replace=False)
        ups = {keys[i]: unit(rng, 1)[0] for i in picks[:20]} | {f"n{seq}-{j}": unit(rng, 1)[0] for j in range(20)}
        apply(live, vectors, seq, ups, [keys[i] for i in picks[20:]])
        fresh = DenseRetriever.from_vectors(np.stack(list(vectors.values())), list(vectors), DenseConfig(factory="Flat"))
        q = unit(rng, 25)
        assert live.search_vectors(q, 50) == fresh.search_vectors(q, 50)
    assert live.num_vectors == len(vectors)


@pytest.mark.parametrize("factory", ["HNSW16", "IVF8,Flat"])
def test_approximate_bases_return_k_live_results_with_most_documents_deleted(factory):
    """90 % of the base deleted: the selector inside FAISS still finds k live documents (a
    post-filtered top-k would come back nearly empty)."""
    rng, vectors, live = setup(factory, n=500)
    keys = list(vectors)
    doomed = keys[:450]
    apply(live, vectors, 1, {}, doomed)
    q = unit(rng, 20)
    for hits in live.search_vectors(q, 10):
        assert len(hits) == 10
        assert not {h.doc_id for h in hits} & set(doomed)
    exact = DenseRetriever.from_vectors(np.stack(list(vectors.values())), list(vectors), DenseConfig(factory="Flat"))
    recall = np.mean([len({h.doc_id for h in a} & {h.doc_id for h in b}) / 10 for a, b in zip(live.search_vectors(q, 10), exact.search_vectors(q, 10))])
    assert recall >= 0.9


def test_a_search_as_of_an_earlier_batch_ignores_later_vectors():
    rng, vectors, live = setup("Flat", n=50)
    before = dict(vectors)
    new = unit(rng, 1)[0]
    apply(live, vectors, 1, {"d3": new, "fresh": new}, ["d4"])
    q = np.stack([new])
    now = live.search_vectors(q, 3)[0]
    assert {h.doc_id for h in now[:2]} == {"d3", "fresh"}
    then = live.search_vectors(q, 3, at_seq=0)[0]
    old = DenseRetriever.from_vectors(np.stack(list(before.values())), list(before), DenseConfig(factory="Flat")).search_vectors(q, 3)[0]
    assert then == old


def test_an_upsert_without_vectors_is_refused_loudly():
    _, _, live = setup("Flat", n=20)
    with pytest.raises(ValueError, match="no vectors"):
        live.apply(Batch(1, (Change(UPSERT, "x", Document("x", "t")),)))


def test_sharded_dense_keeps_only_owned_changes():
    rng, vectors, _ = setup("Flat", n=40)
    keys = list(vectors)
    shards = [LiveDense(DenseRetriever.from_vectors(np.stack([vectors[k] for k in keys[i * 20 : (i + 1) * 20]]), keys[i * 20 : (i + 1) * 20], DenseConfig()), shard=i) for i in range(2)]
    v = unit(rng, 1)
    batch = Batch(1, (Change(UPSERT, "new", Document("new", "t"), v, {"dense": 1}), Change(DELETE, "d5", None, None, {"dense": 0})))
    for s in shards:
        s.apply(batch)
    assert [s.num_vectors for s in shards] == [19, 21]
    assert shards[1].search_vectors(v, 1)[0][0].doc_id == "new"


def test_the_search_widens_with_the_excluded_fraction():
    import faiss

    from serve_app.live.dense import MAX_WIDENING, search_parameters

    hnsw = faiss.index_factory(8, "HNSW16", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.index_factory(8, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    sel = faiss.IDSelectorBatch(np.arange(3, dtype=np.int64))
    assert search_parameters(hnsw, None, ef_search=64, nprobe=4) is None
    assert search_parameters(hnsw, sel, ef_search=64, nprobe=4).efSearch == 64
    assert search_parameters(hnsw, sel, ef_search=64, nprobe=4, live_fraction=0.5).efSearch == 128
    assert search_parameters(hnsw, sel, ef_search=64, nprobe=4, live_fraction=0.01).efSearch == 64 * MAX_WIDENING
    assert search_parameters(ivf, sel, ef_search=64, nprobe=4, live_fraction=0.5).nprobe == 8
    assert search_parameters(ivf, sel, ef_search=64, nprobe=12, live_fraction=0.25).nprobe == 16  # capped at nlist
