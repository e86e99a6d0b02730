"""Retrieval evaluation with ir-measures (BEIR style: nDCG@10, R@100, RR@10 by default).

Metrics are computed by ``ir_measures`` (which runs pytrec_eval / trec_eval underneath); this
module only converts the pipeline's output into a run, averages through the library, and
writes reports.

Averaging convention (the library's): the mean is taken over the queries of ``qrels``; a query
with judgements but no ranking in the run scores 0, and run queries without judgements are
ignored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import ir_measures

DEFAULT_MEASURES: tuple[str, ...] = ("nDCG@10", "R@100", "RR@10")

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]


def parse_measures(names: Iterable[str]) -> list[Any]:
    """ir-measures objects for measure names such as ``nDCG@10``; ValueError naming a bad one."""
    out = []
    for name in names:
        try:
            out.append(ir_measures.parse_measure(name))
        except Exception as exc:  # the library raises various types for unparsable names
            raise ValueError(f"unknown evaluation measure {name!r} (ir-measures syntax, e.g. nDCG@10, R@100, RR@10): {exc}") from None
    if not out:
        raise ValueError("no evaluation measures given")
    return out


def evaluate(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]], measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, float]:
    """Mean of each measure over the judged queries; keys are the names as given, in order.

    ``run`` maps query id -> {doc id: score} (higher is better; trec_eval breaks score ties by
    doc id, see :func:`run_from_results` to keep an exact order); ``qrels`` maps query id ->
    {doc id: graded relevance}.
    """
    if not qrels:
        raise ValueError("qrels are empty: nothing to evaluate against")
    parsed = parse_measures(measures)
    clean_run = {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items()}
    clean_qrels = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    agg = ir_measures.calc_aggregate(parsed, clean_qrels, clean_run)
    # A measure with no defined value (e.g. every run query unjudged) counts as 0.
    return {name: float(agg.get(m, 0.0)) for name, m in zip(measures, parsed)}


def _doc_ids(ranking: Any) -> list[str]:
    items = getattr(ranking, "results", ranking)  # a SearchResult or a plain sequence of hits
    return [str(getattr(item, "doc_id")) for item in items]


def run_from_results(results: Mapping[str, Any]) -> Run:
    """Run dict from ranked results per query id, keeping the given order exactly.

    Values may be ``SearchResult`` objects or sequences of anything with a ``doc_id`` (``Hit``,
    ``FusedHit``, ``SearchResultItem``). trec_eval re-sorts by score, so the scores of the run
    are the descending ranks ``n, n-1, ..., 1`` rather than the pipeline's scores, which may
    tie or (when only the head of a list is reranked) not be monotone. Repeated documents keep
    their first position.
    """
    run: Run = {}
    for qid, ranking in results.items():
        ids = list(dict.fromkeys(_doc_ids(ranking)))
        run[str(qid)] = {d: float(len(ids) - i) for i, d in enumerate(ids)}
    return run


def write_trec_run(run: Run, path: str | Path, tag: str) -> Path:
    """Write ``run`` as a TREC run file (``qid Q0 doc rank score tag``, best first per query).

    The file is what ``trec_eval``, ``ir_measures`` and ``ranx`` read, for significance tests
    or for comparing runs later without running the pipeline again.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = "_".join(tag.split()) or "run"
    lines = []
    for qid, docs in run.items():
        for rank, (doc, score) in enumerate(sorted(docs.items(), key=lambda kv: -kv[1]), start=1):
            lines.append(f"{qid} Q0 {doc} {rank} {score:g} {tag}\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


def markdown_table(results: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """A markdown table: one row per system (e.g. pipeline), one column per measure."""
    columns: list[str] = []
    for metrics in results.values():
        columns.extend(m for m in metrics if m not in columns)
    lines = ["| system | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for system, metrics in results.items():
        cells = [f"{metrics[c]:.{digits}f}" if c in metrics and math.isfinite(metrics[c]) else "" for c in columns]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    results: Mapping[str, Mapping[str, float]],
    json_path: str | Path,
    md_path: str | Path,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write ``results`` (system -> measure -> value) as JSON and as a markdown table.

    ``meta`` (dataset, split, settings...) goes into the JSON under ``"meta"`` and above the
    markdown table as a bullet list.
    """
    json_path, md_path = Path(json_path), Path(md_path)
    for p in (json_path, md_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": dict(meta or {}), "results": {s: dict(m) for s, m in results.items()}}
    json_path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    header = "".join(f"- {k}: {v}\n" for k, v in (meta or {}).items())
    md_path.write_text((header + "\n" if header else "") + markdown_table(results), encoding="utf-8")
