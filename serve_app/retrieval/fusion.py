"""Merging the ranked lists of several retrievers into one list (pure functions).

Inputs are keyed by retriever name: ``{"bm25": [Hit, ...], "dense": [Hit, ...]}``, each
list best first. Outputs are :class:`FusedHit` objects that keep, for every retriever that
returned the document, its 1-based rank and raw score (the HTTP API returns this provenance).

Conventions shared by both methods:

* A document is identified by ``doc_id``; it appears once in the output. Should a retriever
  list the same document twice, its first (best) position counts and later ones are ignored.
* A document a retriever did not return contributes nothing from that retriever (RRF), or that
  retriever's lowest normalised score (weighted fusion, see :func:`weighted_score_fusion`).
* Ties are broken deterministically: higher fused score first, then the better (smaller) best
  rank over all retrievers, then ``doc_id`` in ascending string order. Fused scores are summed
  with :func:`math.fsum`, so equal contributions in a different order give exactly equal sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

from serve_app.config import FusionConfig
from serve_app.types import Hit

Normalization = Literal["minmax", "zscore"]


@dataclass(frozen=True, slots=True)
class FusedHit:
    """One document of a fused list.

    ``ranks`` (1-based) and ``scores`` (raw retriever scores) hold one entry per retriever
    that returned the document; a retriever that missed it has no key.
    """

    doc_id: str
    score: float
    ranks: dict[str, int] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def best_rank(self) -> int:
        """The smallest rank over the retrievers that returned the document."""
        return min(self.ranks.values())


def _provenance(ranked: Mapping[str, Sequence[Hit]]) -> dict[str, tuple[dict[str, int], dict[str, float]]]:
    """doc_id -> (ranks, scores) per retriever, first occurrence wins; keys in first-seen order."""
    out: dict[str, tuple[dict[str, int], dict[str, float]]] = {}
    for name, hits in ranked.items():
        for position, hit in enumerate(hits, start=1):
            ranks, scores = out.setdefault(hit.doc_id, ({}, {}))
            if name not in ranks:
                ranks[name] = position
                scores[name] = float(hit.score)
    return out


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")


def _sorted(hits: list[FusedHit], limit: int | None) -> list[FusedHit]:
    hits.sort(key=lambda h: (-h.score, h.best_rank, h.doc_id))
    return hits if limit is None else hits[:limit]


def reciprocal_rank_fusion(ranked: Mapping[str, Sequence[Hit]], k: int = 60, limit: int | None = None) -> list[FusedHit]:
    """Reciprocal rank fusion (Cormack et al., 2009): ``score(d) = sum_r 1 / (k + rank_r(d))``.

    Only ranks matter; the retrievers' scores are carried along as provenance.
    ``limit`` keeps the best ``limit`` documents (None: all of them).
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0:
        raise ValueError(f"RRF k must be a positive number, got {k!r}")
    _check_limit(limit)
    fused = [
        FusedHit(doc_id, math.fsum(1.0 / (k + r) for r in ranks.values()), ranks, scores)
        for doc_id, (ranks, scores) in _provenance(ranked).items()
    ]
    return _sorted(fused, limit)


def normalize_scores(scores: Sequence[float], method: Normalization) -> tuple[list[float], float]:
    """Normalise one retriever's scores; also return the value given to documents it missed.

    * ``minmax``: ``(s - min) / (max - min)`` into [0, 1]; a list whose scores are all equal
      (including a single hit) maps every score to 1.0 (nothing ranks below anything else).
      Missed documents get 0.0.
    * ``zscore``: ``(s - mean) / std`` (population std); equal scores map to 0.0. Missed
      documents get the list's lowest z-score (they rank below everything it returned).
    """
    values = [float(s) for s in scores]
    if not values:
        return [], 0.0
    if any(not math.isfinite(v) for v in values):
        raise ValueError("retriever scores must be finite numbers to be normalised")
    if method == "minmax":
        lo, hi = min(values), max(values)
        if hi == lo:
            return [1.0] * len(values), 0.0
        return [(v - lo) / (hi - lo) for v in values], 0.0
    if method == "zscore":
        mean = math.fsum(values) / len(values)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
        if std == 0.0:
            return [0.0] * len(values), 0.0
        z = [(v - mean) / std for v in values]
        return z, min(z)
    raise ValueError(f"unknown normalization {method!r}; expected 'minmax' or 'zscore'")


def weighted_score_fusion(
    ranked: Mapping[str, Sequence[Hit]],
    weights: Mapping[str, float],
    normalization: Normalization = "minmax",
    limit: int | None = None,
) -> list[FusedHit]:
    """Weighted sum of per-retriever normalised scores (see :func:`normalize_scores`).

    Every retriever in ``ranked`` needs a finite, non-negative weight in ``weights``; weights of
    retrievers absent from ``ranked`` are ignored (e.g. a request that uses BM25 alone).
    A document's contribution from a retriever that missed it is that retriever's floor
    value (0.0 for minmax, the lowest z-score for zscore), times the weight.
    """
    _check_limit(limit)
    for name in ranked:
        if name not in weights:
            raise ValueError(f"weighted fusion has no weight for retriever {name!r} (weights given for: {sorted(weights)})")
        w = weights[name]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of retriever {name!r} must be a finite number >= 0, got {w!r}")
    provenance = _provenance(ranked)
    normalised: dict[str, dict[str, float]] = {}
    floors: dict[str, float] = {}
    for name, hits in ranked.items():
        # Normalise over the documents as deduplicated (first occurrence of each).
        first = [(doc_id, sc[name]) for doc_id, (rk, sc) in provenance.items() if name in rk]
        values, floors[name] = normalize_scores([s for _, s in first], normalization)
        normalised[name] = {doc_id: v for (doc_id, _), v in zip(first, values)}
    fused = []
    for doc_id, (ranks, scores) in provenance.items():
        total = math.fsum(
            float(weights[name]) * normalised[name].get(doc_id, floors[name]) for name in ranked
        )
        fused.append(FusedHit(doc_id, total, ranks, scores))
    return _sorted(fused, limit)


def fuse(ranked: Mapping[str, Sequence[Hit]], cfg: FusionConfig, limit: int | None = None) -> list[FusedHit]:
    """Fuse with the method, constant, weights and normalisation configured in ``cfg``."""
    if cfg.method == "rrf":
        return reciprocal_rank_fusion(ranked, k=cfg.rrf_k, limit=limit)
    if cfg.method == "weighted":
        return weighted_score_fusion(ranked, cfg.weights, cfg.normalization, limit=limit)
    raise ValueError(f"unknown fusion method {cfg.method!r}")
