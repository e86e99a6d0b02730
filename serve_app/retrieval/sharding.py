"""Sharded retrieval: split a corpus over N index shards, search each, merge into one exact top-k.

For a corpus whose index does not fit one node, each shard replica holds the index of a part of
the corpus; the caller (the Serve ingress, or :class:`ShardedRetriever` in process) asks every
shard for its top-k and keeps the k best of the union (scatter-gather). The merged list is the
one an unsharded index returns: same documents, same order, same scores.

**Assignment.** Shard ``i`` of ``n`` holds the documents at positions
``[i * N // n, (i + 1) * N // n)`` of the corpus (:func:`shard_bounds`): contiguous, balanced
to within one document, deterministic for a given corpus order, and all chunks of a document
stay in the document's shard. Contiguity also makes ties exact: an unsharded index breaks equal
scores by document position, and position order is (shard, position inside the shard), which
is how :func:`merge_top_k` breaks them.

**Why the merge is exact.**

* Dense: a document's score is the inner product of the query vector with its best chunk's
  vector (FAISS, ``Flat`` for exactness; approximate factories are approximate per shard as
  they are globally). It does not depend on the other documents, so scores from different
  shards are comparable as they are. (Shards encode their own documents; batching changes
  embeddings only by float rounding, ~1e-7.) A query is encoded once and its vector searched
  in every shard (in process here; by the ``DenseQueryEncoder`` deployment in Serve).
* BM25: a score depends on corpus statistics (idf of each term: document frequency and corpus
  size; the average document length). BM25 built separately on each shard would use the
  shard's statistics and scores from different shards would not be comparable. We therefore
  build **one** bm25s index over the whole corpus and shard its postings by document
  (:meth:`serve_app.retrieval.bm25.BM25Retriever.split`): bm25s stores, per term, the list of (chunk, precomputed score) pairs,
  the scores already computed with the whole corpus's idf and average length; shard ``i``
  keeps the pairs of its own chunks (renumbered), the whole vocabulary, and the per-term
  non-occurrence scores of BM25L/BM25+ (term-dependent only). A query's score for a document
  is then the same float32 sum of the same values in the same order as in the unsharded index
  (bit-identical). The alternative, re-implementing BM25 with injected global idf/avgdl, would
  mean a second scoring implementation to keep in sync with bm25s; splitting the postings
  reuses bm25s unchanged. The cost: the builder tokenises the whole corpus once (the postings
  of a whole-corpus index must fit the building machine; the serving replicas hold only their
  shard). The ``rank_bm25`` reference engine recomputes statistics from the documents it is
  given at load, so it cannot be sharded exactly and is refused.

Shard sets on disk (one index directory per shard, built and checked like any index) are
:mod:`serve_app.index.shards`; the BM25 postings split is :meth:`BM25Retriever.split`.
"""

from __future__ import annotations

from typing import Any, Sequence

from serve_app.corpus import Corpus
from serve_app.types import Document, Hit

__all__ = ["ShardedRetriever", "merge_top_k", "shard_bounds", "split_corpus"]


# --------------------------------------------------------------------------- assignment and merge


def shard_bounds(num_documents: int, num_shards: int) -> list[tuple[int, int]]:
    """``[start, end)`` document positions of each shard: contiguous, sizes differ by at most one."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_documents < num_shards:
        raise ValueError(f"cannot split {num_documents} documents into {num_shards} non-empty shards")
    return [(i * num_documents // num_shards, (i + 1) * num_documents // num_shards) for i in range(num_shards)]


def split_corpus(corpus: Sequence[Document], num_shards: int) -> list[Corpus]:
    """The documents of each shard (see :func:`shard_bounds`)."""
    docs = list(corpus)
    return [Corpus(docs[s:e]) for s, e in shard_bounds(len(docs), num_shards)]


def merge_top_k(per_shard: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The ``k`` best hits of the shards' lists (each best first, given in shard order).

    Equal scores keep shard order, then each shard's own order: for contiguous shards this is
    document-position order, the tie order of an unsharded index. A document id found in two
    shards is a broken shard set and raises ``ValueError``.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    pooled = [h for hits in per_shard for h in hits]
    ids = [h.doc_id for h in pooled]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"document {dup!r} returned by more than one shard: the shards overlap")
    return sorted(pooled, key=lambda h: -h.score)[:k]  # sorted() is stable


class ShardedRetriever:
    """A retriever over shards (any objects of the ``Retriever`` protocol), merged exactly.

    In-process counterpart of the Serve fan-out; ``name`` is the shards' name.
    """

    def __init__(self, shards: Sequence[Any]) -> None:
        if not shards:
            raise ValueError("ShardedRetriever needs at least one shard")
        names = {s.name for s in shards}
        if len(names) != 1:
            raise ValueError(f"shards of different retrievers: {sorted(names)}")
        self.shards = list(shards)
        self.name: str = names.pop()

    def search(self, query: str, k: int, where: Any = None) -> list[Hit]:
        """Top-``k`` documents over all shards, best first."""
        return self.search_batch([query], k, where)[0]

    def search_batch(self, queries: Sequence[str], k: int, where: Any = None) -> list[list[Hit]]:
        """Top-``k`` documents for each query over all shards. Dense shards share one encoding of
        the queries (the first shard's encoder; every shard of an index was built with one model).
        A filter ``where`` is applied by each shard inside its own search (each holds the metadata
        of its documents), so each shard's top-k, and the merge, hold only admitted documents."""
        extra = () if where is None else (where,)
        encoder = getattr(self.shards[0], "encoder", None)
        if encoder is not None and all(hasattr(s, "search_vectors") for s in self.shards):
            vectors = encoder.encode_queries(list(queries))
            per_shard = [s.search_vectors(vectors, k, *extra) for s in self.shards]
        else:
            per_shard = [s.search_batch(queries, k, *extra) for s in self.shards]
        return [merge_top_k([lists[q] for lists in per_shard], k) for q in range(len(queries))]
