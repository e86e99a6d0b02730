"""What the funnel answers: per-stage reports, ranked candidates, and their assembly into a
:class:`SearchResult` (pure functions; see :mod:`serve_app.funnel`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from serve_app.config import FusionConfig
from serve_app.funnel.request import DEFAULT_MODEL, ResolvedFunnel
from serve_app.retrieval.fusion import FusedHit
from serve_app.types import Document

#: Name of the rerank stage in reports, timings and metrics.
RERANK = "rerank"
FUSION = "fusion"


@dataclass(frozen=True)
class StageReport:
    """What one stage did for one request.

    ``status``: ``ok``; ``timeout`` or ``error`` (the stage was left out: the answer is
    degraded); ``skipped`` (not requested, or nothing to do). ``ms`` is the stage's wall time
    (a batch's time divided by its queries), ``candidates`` the documents it produced.
    """

    status: str = "ok"
    candidates: int = 0
    ms: float = 0.0
    error: Optional[str] = None
    batch_size: Optional[int] = None
    requested: Optional[int] = None  # the depth asked for, when the SLO controller lowered it

    @property
    def depth_reduced(self) -> bool:
        """Whether fewer candidates were reranked than the request asked (SLO-aware depth)."""
        return self.requested is not None and self.requested > self.candidates

    @property
    def degraded(self) -> bool:
        """Whether the stage was left out of the answer."""
        return self.status in ("timeout", "error")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "candidates": self.candidates, "ms": round(self.ms, 3)}
        if self.error is not None:
            out["error"] = self.error
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        if self.requested is not None:
            out["depth_reduced"] = self.depth_reduced
            out["requested_top_m"] = self.requested
        return out


SKIPPED = StageReport("skipped")


@dataclass(frozen=True)
class RankedCandidate:
    """A fused candidate in final order, with its rerank score when it was reranked."""

    hit: FusedHit
    rerank_score: float | None = None
    blended_score: float | None = None


@dataclass(frozen=True)
class SearchResultItem:
    """One returned document with the scores of every stage that saw it."""

    doc_id: str
    score: float
    rerank_score: float | None
    fused_score: float
    retriever_ranks: dict[str, int]
    retriever_scores: dict[str, float]
    document: Document | None = None


@dataclass(frozen=True)
class SearchResult:
    """Results best first, per-stage wall times (ms), the stages left out, and every stage's report."""

    results: list[SearchResultItem]
    timings_ms: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    funnel: ResolvedFunnel | None = None
    stages: dict[str, StageReport] = field(default_factory=dict)


# --------------------------------------------------------------------------- pure steps


def apply_rerank(fused: Sequence[FusedHit], scores: Sequence[float] | np.ndarray, cfg: FusionConfig | None = None) -> list[RankedCandidate]:
    """Order the first ``len(scores)`` fused candidates by rerank score; the rest keep fused order.

    ``scores[i]`` belongs to ``fused[i]``. Equal rerank scores keep their fused order (stable).
    A NaN score ranks below every number. With ``cfg.rerank_blend == "rrf"`` the head is ordered
    by ``rerank_weight / (rrf_k + rerank rank) + 1 / (rrf_k + fused rank)`` instead (ranks from 1;
    ties keep the fused order), and each candidate carries that sum as ``blended_score``.
    """
    values = [float(s) for s in np.asarray(scores, dtype=np.float64).reshape(-1)]
    if len(values) > len(fused):
        raise ValueError(f"{len(values)} rerank scores for {len(fused)} candidates")
    head = sorted(range(len(values)), key=lambda i: -values[i] if not math.isnan(values[i]) else math.inf)
    if cfg is not None and cfg.rerank_blend == "rrf" and values:
        k, w = cfg.rrf_k, cfg.rerank_weight
        blended = [0.0] * len(values)
        for rerank_rank, i in enumerate(head, start=1):
            blended[i] = w / (k + rerank_rank) + 1.0 / (k + i + 1)
        order = sorted(range(len(values)), key=lambda i: -blended[i])
        out = [RankedCandidate(fused[i], values[i], blended[i]) for i in order]
    else:
        out = [RankedCandidate(fused[i], values[i]) for i in head]
    out.extend(RankedCandidate(h) for h in fused[len(values) :])
    return out


def assemble(
    ranked: Sequence[RankedCandidate],
    funnel: ResolvedFunnel,
    *,
    documents: Any = None,
    timings_ms: Mapping[str, float] | None = None,
    degraded: Sequence[str] = (),
    stages: Mapping[str, StageReport] | None = None,
) -> SearchResult:
    """The first ``funnel.top_n`` candidates as a :class:`SearchResult`.

    ``documents`` (e.g. ``corpus.get``) attaches each result's document when given.
    """
    items = []
    for c in ranked[: funnel.top_n]:
        h = c.hit
        items.append(
            SearchResultItem(
                doc_id=h.doc_id,
                score=c.blended_score if c.blended_score is not None else c.rerank_score if c.rerank_score is not None else h.score,
                rerank_score=c.rerank_score,
                fused_score=h.score,
                retriever_ranks=dict(h.ranks),
                retriever_scores=dict(h.scores),
                document=documents(h.doc_id) if documents is not None else None,
            )
        )
    return SearchResult(items, dict(timings_ms or {}), list(degraded), funnel, dict(stages or {}))


@dataclass(frozen=True)
class CascadeNames:
    """Every name of one rerank stage, from one definition (``stage`` None: the final reranker).

    >>> n = CascadeNames("small")
    >>> n.report, n.handle, n.metric_model, n.deployment
    ('rerank.small', 'reranker.small', 'cascade.small', 'CrossEncoderReranker-small')
    >>> CascadeNames(None).report, CascadeNames(None).deployment
    ('rerank', 'CrossEncoderReranker')
    """

    stage: Optional[str]

    @property
    def report(self) -> str:
        """Its key in ``stages``, ``timings_ms`` and ``degraded`` of an answer."""
        return RERANK if self.stage is None else f"{RERANK}.{self.stage}"

    @property
    def handle(self) -> str:
        """Its key among the ingress's stage handles (and ``/healthz``'s stages)."""
        return "reranker" if self.stage is None else f"reranker.{self.stage}"

    @property
    def metric_model(self) -> str:
        """The ``model`` label of its default model's metrics."""
        return DEFAULT_MODEL if self.stage is None else f"cascade.{self.stage}"

    @property
    def deployment(self) -> str:
        """Its Serve deployment's name."""
        return "CrossEncoderReranker" if self.stage is None else f"CrossEncoderReranker-{self.stage}"


def stage_key(stage: Optional[str]) -> str:
    """The report, timing and metric name of a rerank stage: ``rerank`` for the final reranker,
    ``rerank.<name>`` for a cascade stage (:attr:`CascadeNames.report`)."""
    return CascadeNames(stage).report


def order_by_scores(head: Sequence[FusedHit], scores: Sequence[float]) -> list[FusedHit]:
    """``head`` by descending score; equal scores keep their order, NaN goes last."""
    idx = sorted(range(len(head)), key=lambda i: -scores[i] if not math.isnan(scores[i]) else math.inf)
    return [head[i] for i in idx]

