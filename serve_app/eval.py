"""Retrieval evaluation with ir-measures (BEIR style: nDCG@10, R@100, RR@10 by default).

Metrics are computed by ``ir_measures`` (which runs pytrec_eval / trec_eval underneath); this
module only converts the pipeline's output into a run, averages through the library, and
writes reports.

Averaging convention (the library's): the mean is taken over the queries of ``qrels``; a query
with judgements but no ranking in the run scores 0, and run queries without judgements are
ignored.

**Fidelity** (:func:`fidelity`) measures a cheaper configuration against a reference ranking
(the full-depth reranker) rather than against relevance labels, the way approximate nearest
neighbour search is measured against exact search: the share of the reference's top k that the
cheaper run also returns in its top k (``overlap@k``), and Kendall's tau-b between the two
orders of the reference's top k (``kendall_tau@k``). Both hold whatever the reference's own
quality: a configuration that answers "the same" scores 1.0 even where the reference is wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import ir_measures
from scipy.stats import kendalltau

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


def ranked_ids(docs: Mapping[str, float]) -> list[str]:
    """Document ids of one query's run, best first: by descending score, ties by doc id
    (trec_eval's order, so the order is the one :func:`evaluate` scores)."""
    return [d for d, _ in sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))]


def query_fidelity(ranking: Sequence[str], reference: Sequence[str], k: int = 10) -> tuple[float, float]:
    """(overlap@k, kendall_tau@k) of one ranking against the reference ranking, both best first.

    ``overlap@k``: the share of the reference's first k documents found in the ranking's first
    k (divided by how many the reference has, at most k). ``kendall_tau@k``: Kendall's tau-b
    between the reference's order of its first k documents and their positions in the
    ranking's first k, where every one missing from it ties below position k; 1.0 for the
    same top k in the same order, lower for reordering or for documents lost, -1.0 for the
    reversed order. A reference with one document has no order to compare: tau is then 1.0 when
    the ranking's first k hold it and 0.0 when not.

    >>> query_fidelity(["a", "b", "c"], ["a", "b", "c"], k=3)
    (1.0, 1.0)
    >>> query_fidelity(["a", "c", "x"], ["a", "b", "c"], k=3)[0]
    0.6666666666666666
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ref = list(dict.fromkeys(reference))[:k]
    if not ref:
        raise ValueError("the reference ranking is empty: fidelity to it is undefined")
    top = list(dict.fromkeys(ranking))[:k]
    position = {d: i for i, d in enumerate(top)}
    overlap = sum(d in position for d in ref) / len(ref)
    if len(ref) == 1:
        return overlap, float(ref[0] in position)
    placed = [position.get(d, k) for d in ref]
    if len(set(placed)) == 1:  # every reference document missing: no order kept at all
        return overlap, 0.0
    tau = kendalltau(list(range(len(ref))), placed, variant="b").statistic
    return overlap, round(float(tau), 12)  # scipy may leave 1 - 1e-16 for an identical order


def fidelity(run: Mapping[str, Mapping[str, float]], reference: Mapping[str, Mapping[str, float]], k: int = 10) -> dict[str, float]:
    """Mean ``overlap@k`` and ``kendall_tau@k`` of ``run`` against ``reference`` (both runs as
    :func:`evaluate` takes them), over the reference's queries that have a ranking; a query the
    run lacks scores 0 overlap and tau 0 (nothing of the answer kept)."""
    queries = [q for q, docs in reference.items() if docs]
    if not queries:
        raise ValueError("the reference run has no ranked query: fidelity to it is undefined")
    overlap = tau = 0.0
    for q in queries:
        mine = run.get(q) or {}
        if not mine:
            continue
        o, t = query_fidelity(ranked_ids(mine), ranked_ids(reference[q]), k)
        overlap += o
        tau += t
    return {f"overlap@{k}": overlap / len(queries), f"kendall_tau@{k}": tau / len(queries)}


def read_trec_run(path: str | Path) -> Run:
    """A TREC run file (``qid Q0 doc rank score tag``) as the run dict :func:`evaluate` takes."""
    run: Run = {}
    for item in ir_measures.read_trec_run(str(path)):
        run.setdefault(str(item.query_id), {})[str(item.doc_id)] = float(item.score)
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
