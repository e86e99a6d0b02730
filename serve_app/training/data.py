"""Training examples from a BEIR dataset: query selection, dev split, negative mining and sampling.

Preparation (:func:`prepare_queries`) runs once, in the driver process, and produces plain
JSON-serialisable records, so that the same data reaches a local loop and Ray Train workers
(inside the loop's config dict) and is stored with the checkpoints of a run:

* the split's judged queries with at least one positive (relevance > 0) are shuffled with
  the seed, optionally subsampled (``max_queries``), and ``dev_fraction`` of them is held out;
* every query gets a ranked pool of *hard* negatives, the top documents of the project's own
  retrievers (BM25 and/or dense) with every judged positive removed, and a pool of *random*
  negatives drawn once from the rest of the corpus (judged positives and hard ones excluded);
* optionally (``title_queries``), documents' titles become extra *training* queries whose one
  positive is their own document: weak supervision for corpora with few judged queries;
* ``docs`` holds the text (``Document.content``) of every document any record names.

Sampling (:func:`sample_negatives`) draws an example's negatives from those pools with a
generator seeded by (seed, epoch, example), so an epoch's examples do not depend on what ran
before it: a resumed run sees exactly the examples an uninterrupted one would.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from serve_app.errors import UserFacingError

logger = logging.getLogger(__name__)


class TrainingDataError(UserFacingError, ValueError):
    """The dataset cannot give training examples (no positives, no negatives, bad split sizes)."""


@dataclass
class QueryRecord:
    """One training or dev query: its positives and its negative pools (document ids)."""

    qid: str
    text: str
    positives: list[str]
    hard: list[str] = field(default_factory=list)
    random: list[str] = field(default_factory=list)
    judged: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "QueryRecord":
        return cls(**obj)


@dataclass
class PreparedData:
    """Everything a training loop reads: train and dev queries, and the texts they name."""

    train: list[QueryRecord]
    dev: list[QueryRecord]
    docs: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"train": [r.to_json() for r in self.train], "dev": [r.to_json() for r in self.dev], "docs": self.docs}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "PreparedData":
        return cls(
            train=[QueryRecord.from_json(r) for r in obj["train"]],
            dev=[QueryRecord.from_json(r) for r in obj["dev"]],
            docs=dict(obj["docs"]),
        )


def positives_of(judged: Mapping[str, int]) -> list[str]:
    """Judged documents with relevance > 0, in a stable (sorted) order."""
    return sorted(d for d, rel in judged.items() if int(rel) > 0)


def split_queries(qids: Sequence[str], dev_fraction: float, seed: int, max_queries: int | None = None) -> tuple[list[str], list[str]]:
    """Seeded shuffle, optional subsample, then (train, dev) with ``round(n * dev_fraction)`` dev queries.

    A positive ``dev_fraction`` always holds out at least one query and leaves at least one
    for training.
    """
    if not 0 <= dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    order = sorted(qids)
    rng = np.random.default_rng([seed, 1])
    order = [order[i] for i in rng.permutation(len(order))]
    if max_queries is not None:
        order = order[:max_queries]
    n = len(order)
    n_dev = int(round(n * dev_fraction))
    if dev_fraction > 0:
        n_dev = max(1, n_dev)
    if n - n_dev < 1:
        raise TrainingDataError(f"{n} usable quer{'y' if n == 1 else 'ies'}: too few to hold out {n_dev} for dev and still train (lower --dev-fraction)")
    return order[n_dev:], order[:n_dev]


def merge_rankings(rankings: Iterable[Sequence[str]]) -> list[str]:
    """Interleave several ranked lists (first of each, then second of each, ...), without duplicates."""
    lists = [list(r) for r in rankings]
    out: list[str] = []
    seen: set[str] = set()
    for i in range(max((len(r) for r in lists), default=0)):
        for r in lists:
            if i < len(r) and r[i] not in seen:
                seen.add(r[i])
                out.append(r[i])
    return out


def hard_negative_pool(ranked: Sequence[str], judged: Mapping[str, int], skip: int = 0) -> list[str]:
    """``ranked`` without the judged positives (relevance > 0), minus its first ``skip`` entries."""
    pos = {d for d, rel in judged.items() if int(rel) > 0}
    return [d for d in ranked if d not in pos][skip:]


def mine_rankings(
    corpus: Any,
    queries: Sequence[str],
    source: str,
    depth: int,
    *,
    dense_model: str = "sentence-transformers/all-MiniLM-L6-v2",
    dense_max_length: int = 256,
    index: str | None = None,
    show_progress: bool = False,
) -> list[list[str]]:
    """Top-``depth`` document ids of each query from BM25, dense, or both (interleaved).

    The retrievers are built over ``corpus``, or loaded from ``index`` (a ``serve-app index``
    directory); ids the corpus does not hold are dropped from the rankings.
    """
    from serve_app.config import BM25Config, ChunkingConfig, DenseConfig

    if source not in ("bm25", "dense", "both", "none"):
        raise ValueError(f"unknown hard-negative source {source!r} (bm25, dense, both, none)")
    if source == "none" or not queries:
        return [[] for _ in queries]
    wanted = ["bm25", "dense"] if source == "both" else [source]
    retrievers: dict[str, Any] = {}
    if index is not None:
        from serve_app.index import load_index

        loaded = load_index(index, load_dense_encoder="dense" in wanted)
        retrievers = loaded.retrievers
        missing = [name for name in wanted if name not in retrievers]
        if missing:
            raise TrainingDataError(f"{index}: the index has no {' and no '.join(missing)} retriever, needed by hard_negatives_from={source!r}")
    else:
        if "bm25" in wanted:
            from serve_app.retrieval.bm25 import BM25Retriever

            retrievers["bm25"] = BM25Retriever.build(corpus, BM25Config(), ChunkingConfig())
        if "dense" in wanted:
            from serve_app.retrieval.dense import DenseRetriever

            cfg = DenseConfig(model=dense_model, max_length=dense_max_length, use_gpu_index=False)
            retrievers["dense"] = DenseRetriever.build(corpus, cfg, ChunkingConfig(), show_progress=show_progress)
    per_source = []
    for name in wanted:
        hits = retrievers[name].search_batch(list(queries), depth)
        per_source.append([[h.doc_id for h in row if corpus.get(h.doc_id) is not None] for row in hits])
    return [merge_rankings(lists) for lists in zip(*per_source)]


def draw_random_pool(all_ids: Sequence[str], exclude: set[str], size: int, rng: np.random.Generator) -> list[str]:
    """Up to ``size`` distinct ids of ``all_ids`` not in ``exclude``, uniformly at random."""
    if size <= 0:
        return []
    out: list[str] = []
    seen = set(exclude)
    n = len(all_ids)
    # Rejection sampling: cheap when (as usual) the excluded set is a small part of the corpus.
    attempts = 0
    while len(out) < size and attempts < 20 * size + 100:
        attempts += 1
        d = all_ids[int(rng.integers(n))]
        if d not in seen:
            seen.add(d)
            out.append(d)
    if len(out) < size:  # a tiny corpus: enumerate what is left
        rest = [d for d in all_ids if d not in seen]
        take = rng.permutation(len(rest))[: size - len(out)]
        out.extend(rest[i] for i in take)
    return out


def prepare_queries(
    dataset: Any,
    *,
    dev_fraction: float,
    seed: int,
    max_queries: int | None,
    hard_negatives_from: str,
    hard_negative_depth: int,
    hard_negative_skip: int = 0,
    random_pool_size: int = 0,
    dense_model: str = "sentence-transformers/all-MiniLM-L6-v2",
    dense_max_length: int = 256,
    index: str | None = None,
    show_progress: bool = False,
    title_queries: int = 0,
) -> PreparedData:
    """Select, split and mine the queries of a loaded BEIR split (see the module docstring).

    ``dataset`` has ``corpus`` (a ``Corpus``), ``queries`` (id -> text) and ``qrels``
    (id -> {doc id: relevance}), as :func:`serve_app.corpus.load_beir` returns. Judged documents
    missing from the corpus are ignored.
    """
    corpus = dataset.corpus
    usable: dict[str, dict[str, int]] = {}
    for qid, judged in dataset.qrels.items():
        if qid not in dataset.queries:
            continue
        present = {d: int(r) for d, r in judged.items() if corpus.get(d) is not None}
        if positives_of(present):
            usable[qid] = present
    if not usable:
        raise TrainingDataError("no query of the split has a judged positive document (relevance > 0) in the corpus")
    train_ids, dev_ids = split_queries(list(usable), dev_fraction, seed, max_queries)
    query_text = {q: dataset.queries[q] for q in train_ids + dev_ids}
    titled = title_query_pairs(corpus, title_queries, seed, taken=set(dataset.queries))
    for qid, (doc_id, title) in titled.items():
        usable[qid] = {doc_id: 1}
        query_text[qid] = title
    train_ids = train_ids + list(titled)
    chosen = train_ids + dev_ids
    texts = [query_text[q] for q in chosen]
    logger.info("mining hard negatives for %d queries (%s, top %d)", len(chosen), hard_negatives_from, hard_negative_depth)
    rankings = mine_rankings(
        corpus, texts, hard_negatives_from, hard_negative_depth,
        dense_model=dense_model, dense_max_length=dense_max_length, index=index, show_progress=show_progress,
    )
    rng = np.random.default_rng([seed, 2])
    all_ids = corpus.ids
    records: dict[str, QueryRecord] = {}
    for qid, ranked in zip(chosen, rankings):
        judged = usable[qid]
        hard = hard_negative_pool(ranked, judged, hard_negative_skip)
        exclude = set(positives_of(judged)) | set(hard)
        rand = draw_random_pool(all_ids, exclude, random_pool_size, rng)
        records[qid] = QueryRecord(qid, query_text[qid], positives_of(judged), hard, rand, judged)
    train = [records[q] for q in train_ids]
    dev = [records[q] for q in dev_ids]
    if not any(r.hard or r.random for r in train):
        raise TrainingDataError("no negative document could be found for any training query (the corpus holds only positives?)")
    needed: set[str] = set()
    for r in train + dev:
        needed.update(r.positives, r.hard, r.random)
    docs = {d: corpus.get(d).content for d in sorted(needed)}
    return PreparedData(train=train, dev=dev, docs=docs)


def title_query_pairs(corpus: Any, n: int, seed: int, taken: set[str] = frozenset()) -> dict[str, tuple[str, str]]:
    """Up to ``n`` synthetic queries ``{"title:<doc id>": (doc id, title)}`` from documents with a title.

    The documents are a seeded random sample of those whose title has at least two words;
    query ids already in ``taken`` are skipped.
    """
    if n <= 0:
        return {}
    candidates = []
    for doc_id in corpus.ids:
        title = (corpus.get(doc_id).title or "").strip()
        if len(title.split()) >= 2 and f"title:{doc_id}" not in taken:
            candidates.append((doc_id, title))
    order = np.random.default_rng([seed, 5]).permutation(len(candidates))[:n]
    return {f"title:{candidates[i][0]}": candidates[i] for i in sorted(order)}


def sample_negatives(record: QueryRecord, n: int, n_random: int, rng: np.random.Generator) -> list[str]:
    """``n`` negatives for one example: ``min(n_random, n)`` random ones, the rest hard ones.

    Missing hard negatives are replaced by random ones and vice versa; when the pools hold fewer
    than ``n`` distinct documents in all, some are repeated (with replacement) so every example
    has exactly ``n``. Never returns a positive. Raises ``TrainingDataError`` when both pools are
    empty.
    """
    hard, rand = record.hard, record.random
    if not hard and not rand:
        raise TrainingDataError(f"query {record.qid!r} has no negative document")
    want_rand = min(n_random, n, len(rand))
    want_hard = min(n - want_rand, len(hard))
    want_rand = min(n - want_hard, len(rand))
    picked = [hard[i] for i in sorted(rng.choice(len(hard), size=want_hard, replace=False))] if want_hard else []
    picked += [rand[i] for i in rng.choice(len(rand), size=want_rand, replace=False)] if want_rand else []
    if len(picked) < n:
        pool = hard + rand
        picked += [pool[i] for i in rng.integers(len(pool), size=n - len(picked))]
    return picked


def example_keys(records: Sequence[QueryRecord]) -> list[tuple[int, int]]:
    """(record index, positive index) for every judged positive of every record."""
    return [(i, j) for i, r in enumerate(records) for j in range(len(r.positives))]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of ``n`` examples in ``epoch`` (a pure function of seed and epoch)."""
    return np.random.default_rng([seed, 3, epoch]).permutation(n)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Generator of one example's negatives in one epoch."""
    return np.random.default_rng([seed, 4, epoch, index])
