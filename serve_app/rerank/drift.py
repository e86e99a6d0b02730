"""How far a runtime moves a reranker's scores from torch float32, on a fixed probe.

The probe (:func:`probe_pairs`) is fixed: the first :data:`PROBE_QUERIES` judged test queries
of the packaged demo dataset, each with :data:`PROBE_DOCS` documents (its judged documents
first, then others picked by a fixed stride through the corpus), so every load of every model
compares the same pairs. :func:`drift_report` compares two score vectors over it:

* ``max_abs_diff``: the largest absolute score difference (raw score units);
* ``kendall_tau``: the mean over probe queries of Kendall's tau-b between the two document
  orders (:func:`kendall_tau`);
* ``top1_agreement``: the share of probe queries whose best document is the same.

:func:`violations` checks a report against ``reranker.drift_tolerance``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from serve_app.config import DriftTolerance

PROBE_QUERIES = 8
PROBE_DOCS = 4
#: Probe pairs of encoder rerankers are cut to this many tokens (or the model's limit): the
#: check must stay cheap.
PROBE_MAX_LENGTH = 256


@dataclass(frozen=True)
class DriftReport:
    """Drift of one runtime from torch float32 on the probe."""

    runtime: str
    pairs: int
    queries: int
    max_abs_diff: float
    kendall_tau: float
    top1_agreement: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=1)
def probe() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[int, ...], ...]]:
    """(pairs, groups): the probe's (query, document) pairs and, per query, its pair positions."""
    from serve_app.demo import demo_corpus_path, demo_qrels_path, demo_queries_path

    queries = {}
    with open(demo_queries_path(), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            queries[row["_id"]] = row["text"]
    corpus = []
    with open(demo_corpus_path(), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            corpus.append((row["_id"], (row.get("title", "") + ". " + row["text"]).strip(". ")))
    text_of = dict(corpus)
    judged: dict[str, list[str]] = {}
    with open(demo_qrels_path("test"), encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            judged.setdefault(row["query-id"], []).append(row["corpus-id"])
    pairs: list[tuple[str, str]] = []
    groups: list[tuple[int, ...]] = []
    for k, qid in enumerate(sorted(judged)[:PROBE_QUERIES]):
        docs = [d for d in judged[qid] if d in text_of][: PROBE_DOCS - 1]
        step = 0
        while len(docs) < PROBE_DOCS:
            doc_id = corpus[(37 * k + 61 * step + 11) % len(corpus)][0]
            step += 1
            if doc_id not in docs:
                docs.append(doc_id)
        groups.append(tuple(range(len(pairs), len(pairs) + len(docs))))
        pairs.extend((queries[qid], text_of[d]) for d in docs)
    return tuple(pairs), tuple(groups)


def probe_pairs() -> list[tuple[str, str]]:
    """The probe's (query, document) pairs."""
    return list(probe()[0])


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b of two score vectors (ties counted as scipy.stats.kendalltau does);
    1.0 when either vector is constant and both are (no order to compare), 0.0 when only one is."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"kendall_tau needs two vectors of one length, got {x.shape} and {y.shape}")
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    n0 = len(i)
    tx, ty = int(np.sum(dx == 0)), int(np.sum(dy == 0))
    if tx == n0 or ty == n0:
        return 1.0 if tx == ty == n0 else 0.0
    return float(np.sum(dx * dy) / np.sqrt((n0 - tx) * (n0 - ty)))


def drift_report(runtime: str, reference: np.ndarray, scores: np.ndarray, groups: Sequence[Sequence[int]]) -> DriftReport:
    """Drift of ``scores`` from ``reference`` (both over the probe's pairs)."""
    ref, new = np.asarray(reference, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    taus = [kendall_tau(ref[list(g)], new[list(g)]) for g in groups]
    tops = [int(np.argmax(ref[list(g)])) == int(np.argmax(new[list(g)])) for g in groups]
    return DriftReport(runtime, len(ref), len(groups), float(np.max(np.abs(ref - new))), float(np.mean(taus)), float(np.mean(tops)))


def violations(report: DriftReport, tolerance: DriftTolerance) -> list[str]:
    """The bounds of ``tolerance`` that ``report`` breaks, as sentences (empty: within tolerance)."""
    out = []
    if tolerance.max_abs_diff is not None and report.max_abs_diff > tolerance.max_abs_diff:
        out.append(f"max |score difference| {report.max_abs_diff:.3g} > max_abs_diff {tolerance.max_abs_diff:g}")
    if tolerance.min_kendall_tau is not None and report.kendall_tau < tolerance.min_kendall_tau:
        out.append(f"mean Kendall tau {report.kendall_tau:.3f} < min_kendall_tau {tolerance.min_kendall_tau:g}")
    if tolerance.min_top1_agreement is not None and report.top1_agreement < tolerance.min_top1_agreement:
        out.append(f"top-1 agreement {report.top1_agreement:.2f} < min_top1_agreement {tolerance.min_top1_agreement:g}")
    return out
