"""Quality and fidelity against cross-encoder cost on SciFact test: which configurations pay off.

Command::

    python -m benchmarks.pareto --reranker $BENCH_CACHE/scifact-reranker

Runs ``serve-app eval`` on the 300 SciFact test queries (hybrid top-100 per retriever, RRF),
in process, with every row's fidelity to the reference, the large reranker at the full depth
(``hybrid+rerank@100``, blend none):

* ``fixed``: hybrid alone (depth 0) and the reranker on the fused top ``--depths``, each with
  and without the rrf blend (one eval: each pair scored once, at the deepest depth first);
* ``cascade-L`` for each ``--cascade-lengths`` L: a first stage, the same reranker reading
  pairs cut to L tokens, scores the fused top 100 and reorders them blended with the fused
  rank (``--cascade-blend``, default rrf); the reranker then reads the first ``--cascade-depths`` of that order (one
  eval per L, fidelity against the fixed eval's reference run).

Cost per query counts every stage: cross-encoder pairs, and cross-encoder CPU-seconds
(pairs x the stage's CPU-seconds per pair, measured on the eval's first row, the one that
scores every pair it sends; later rows of the same eval reuse those scores). Retrieval and
fusion cost the same in every row and are left out. A configuration is on the frontier of a
measure when no other is at least as good on it for at most the CPU (one strictly better).
``--from-existing`` rebuilds the table and picture from the eval outputs already in ``--out``.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from benchmarks.common import DEFAULT_CACHE, DEFAULT_SCIFACT, BenchRun, base_parser, md_table, public_command, target_line

REFERENCE = "hybrid+rerank@100"


def stage_costs(meta: Mapping[str, Any]) -> dict[str, float]:
    """CPU-seconds per pair of each rerank stage of one eval: the largest measured ratio over its
    rows (the first row scores every pair it sends; later rows reuse those scores)."""
    queries = meta["queries"]
    out: dict[str, float] = {}
    for stages in meta.get("rerank_cost", {}).values():
        for stage, c in stages.items():
            pairs = c["pairs_per_query"] * queries
            if pairs > 0 and c["cpu_s"] > 0:
                out[stage] = max(out.get(stage, 0.0), c["cpu_s"] / pairs)
    return out


def stage_pairs(name: str, meta: Mapping[str, Any]) -> dict[str, float]:
    """Pairs per query each rerank stage of a row scores, from its configuration: every cascade
    stage its ``top_m``, the final reranker the row's depth (``hybrid+rerank@M``, or the eval's
    one depth), each capped by the most any row sent that stage (the candidates there were). Counted from the configuration, not
    from the eval's meters: evals before the meters counted reused scores gave a row that
    reused an earlier row's scores 0 pairs."""
    if not name.startswith("hybrid+rerank"):
        return {}
    # the most any row of the eval sent a stage: what the candidate pool allowed
    most: dict[str, float] = {}
    for stages in meta.get("rerank_cost", {}).values():
        for stage, c in stages.items():
            most[stage] = max(most.get(stage, 0.0), c["pairs_per_query"])
    depth = int(name.split("@")[1].split(" ")[0]) if "@" in name else int(meta["rerank_top_m"])
    out = {f"rerank.{st['name']}": float(st["top_m"]) for st in meta.get("cascade", [])}
    out["rerank"] = float(depth)
    return {stage: min(n, most.get(stage, n)) for stage, n in out.items()}


def rows_of(label: str, report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per eval result: measures, fidelity, pairs and CPU-seconds per query."""
    meta = report["meta"]
    per_pair = stage_costs(meta)
    out = []
    for name, metrics in report["results"].items():
        stages = stage_pairs(name, meta)
        pairs = sum(stages.values())
        cpu = sum(n * per_pair.get(stage, 0.0) for stage, n in stages.items())
        out.append({
            "config": f"{label}: {name}", "eval": label, "row": name,
            "nDCG@10": metrics["nDCG@10"], "overlap@10": metrics.get("overlap@10"), "kendall_tau@10": metrics.get("kendall_tau@10"),
            "pairs_per_query": round(pairs, 2), "stage_pairs": stages, "ce_cpu_s_per_query": cpu,
        })
    return out


def frontier(rows: Sequence[Mapping[str, Any]], measure: str) -> list[str]:
    """Configurations no other beats: at most the CPU and at least the measure, one strictly."""
    on = []
    for r in rows:
        if r.get(measure) is None:
            continue
        dominated = any(
            o is not r and o.get(measure) is not None and o["ce_cpu_s_per_query"] <= r["ce_cpu_s_per_query"] and o[measure] >= r[measure]
            and (o["ce_cpu_s_per_query"] < r["ce_cpu_s_per_query"] or o[measure] > r[measure])
            for o in rows
        )
        if not dominated:
            on.append(r["config"])
    return on


def cheapest_at(rows: Sequence[Mapping[str, Any]], measure: str, floor: float) -> Mapping[str, Any] | None:
    """The lowest-CPU configuration whose ``measure`` is at least ``floor`` (ties: fewer pairs)."""
    ok = [r for r in rows if r.get(measure) is not None and r[measure] >= floor]
    return min(ok, key=lambda r: (r["ce_cpu_s_per_query"], r["pairs_per_query"])) if ok else None


def plot(run: BenchRun, rows: Sequence[Mapping[str, Any]], fronts: Mapping[str, Sequence[str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, measure in zip(axes, ("nDCG@10", "overlap@10")):
        for r in rows:
            if r.get(measure) is None:
                continue
            marker = {"fixed": "o"}.get(r["eval"], "s")
            color = "tab:red" if r["config"] in fronts[measure] else "tab:gray"
            ax.scatter(r["ce_cpu_s_per_query"], r[measure], marker=marker, color=color, s=28, zorder=3)
            ax.annotate(r["config"].replace("hybrid+rerank", "rr").replace(" blend)", ")"), (r["ce_cpu_s_per_query"], r[measure]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        pts = sorted((r["ce_cpu_s_per_query"], r[measure]) for r in rows if r["config"] in fronts[measure])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:red", lw=1, zorder=2, label="frontier")
        ax.set_xlabel("cross-encoder CPU-seconds per query (every stage)")
        ax.set_ylabel(measure + (" on the qrels" if measure == "nDCG@10" else f" vs {REFERENCE}"))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("SciFact test, 300 queries: circles fixed depth, squares cascades (first stage: the reranker on pairs cut short)", fontsize=9)
    run.save_figure(fig, "pareto.png")


def main(argv: Sequence[str] | None = None) -> int:
    from serve_app.cli import main as cli_main

    p = base_parser(__doc__.split("\n")[0], repeats=False)
    p.add_argument("--scifact", default=str(DEFAULT_SCIFACT), help="SciFact BEIR directory")
    p.add_argument("--index", default=str(DEFAULT_CACHE / "bench" / "scifact-index"), help="index directory (built by the CLI when missing)")
    p.add_argument("--reranker", default=str(DEFAULT_CACHE / "scifact-reranker"), help="the trained reranker (serve-app train-reranker's output)")
    p.add_argument("--depths", default="100,70,50,30,20,10", help="fixed depths (the first is the reference depth and must be 100)")
    p.add_argument("--cascade-lengths", default="64,128", help="first-stage pair lengths of the cascades (tokens; empty: no cascade)")
    p.add_argument("--cascade-depths", default="20,10", help="final-stage depths behind each cascade")
    p.add_argument("--cascade-blend", choices=["none", "rrf"], default="rrf", help="how the first stage reorders its candidates (rrf: blended with the fused rank)")
    p.add_argument("--split", default="test", help="qrels split")
    p.add_argument("--dense-model", default=None, help="bi-encoder of the index (default: the index's own, all-MiniLM-L6-v2)")
    p.add_argument("--from-existing", action="store_true", help="rebuild the table and picture from the eval outputs in --out")
    args = p.parse_args(argv)
    if not args.depths.startswith("100"):
        raise SystemExit(f"--depths must start with 100, the reference depth ({REFERENCE})")
    run = BenchRun("pareto", args, args.out)
    evals_run: dict[str, Any] = {"started": run.started, "loadavg_start": run.machine["loadavg"][0], "git_commit": None}
    previous = run.dir / "pareto.json"
    if args.from_existing and previous.is_file():  # the evals ran then: keep when, on what and under which load
        before = json.loads(previous.read_text())
        evals_run = before["results"].get("evals_run") or {"started": before["started"], "loadavg_start": before["machine"]["loadavg"][0], "loadavg_end": before["loadavg_end"][0], "elapsed_s": before["elapsed_s"], "git_commit": before["git_commit"]}
    common = ["--dataset", args.scifact, "--split", args.split, "--index", args.index, "--top-k", "100", "--reranker", args.reranker, "-q"]
    if args.dense_model:
        common += ["--dense-model", args.dense_model]
    evals: dict[str, list[str]] = {
        "fixed": ["--pipeline", "hybrid,hybrid+rerank", "--rerank-top-m", args.depths, "--rerank-blend", "none,rrf", "--reference", REFERENCE],
    }
    reference_file = run.dir / "fixed" / "runs" / f"{REFERENCE}.trec"
    for length in (x for x in args.cascade_lengths.split(",") if x):
        evals[f"cascade-{length}"] = [
            "--pipeline", "hybrid+rerank", "--rerank-top-m", args.cascade_depths, "--rerank-blend", "none,rrf",
            "--cascade", f"{args.reranker}=100", "--cascade-max-length", length, "--cascade-blend", args.cascade_blend, "--reference", str(reference_file),
        ]
    commands = {}
    for label, extra in evals.items():
        cmd = ["eval", *common, *extra, "--out", str(run.dir / label)]
        commands[label] = public_command("serve-app " + " ".join(cmd))
        if not args.from_existing:
            print(commands[label])
            if cli_main(cmd) != 0:
                raise SystemExit(f"serve-app eval ({label}) failed")
    reports = {label: json.loads((run.dir / label / "metrics.json").read_text()) for label in evals}
    rows = [r for label, report in reports.items() for r in rows_of(label, report)]
    fronts = {m: frontier(rows, m) for m in ("nDCG@10", "overlap@10")}
    ref_ndcg = reports["fixed"]["results"][REFERENCE]["nDCG@10"]
    picks = {label: cheapest_at(rows, m, f) for label, m, f in (
        ("overlap@10 >= 0.95", "overlap@10", 0.95), ("overlap@10 >= 0.9", "overlap@10", 0.9), ("overlap@10 >= 0.8", "overlap@10", 0.8),
        (f"nDCG@10 >= the reference's ({ref_ndcg:.4f})", "nDCG@10", ref_ndcg),
    )}
    plot(run, rows, fronts)

    table = [(
        r["config"], f"{r['nDCG@10']:.4f}", "-" if r["overlap@10"] is None else f"{r['overlap@10']:.3f}", "-" if r["kendall_tau@10"] is None else f"{r['kendall_tau@10']:.3f}",
        f"{r['pairs_per_query']:g}", f"{r['ce_cpu_s_per_query']:.3f}", ", ".join(m for m in fronts if r["config"] in fronts[m]) or "-",
    ) for r in sorted(rows, key=lambda r: r["ce_cpu_s_per_query"])]
    if not args.from_existing:
        import os

        from benchmarks.common import git_commit

        evals_run.update(loadavg_end=os.getloadavg()[0], git_commit=git_commit())
    md = run.header_markdown("Pareto: nDCG@10 and fidelity against cross-encoder cost (SciFact test)")
    if args.from_existing:
        md += f"Rebuilt from the outputs of the evaluations run at {evals_run['started']} (git {evals_run['git_commit']}, load average {evals_run['loadavg_start']:.2f} at their start, {evals_run.get('loadavg_end', float('nan')):.2f} at their end).\n\n"
    md += "Evaluations run (in process, one after another, alone on the machine):\n\n" + "".join(f"* `{c}`\n" for c in commands.values())
    md += (
        f"\nFidelity: overlap@10 and Kendall's tau@10 against `{REFERENCE}` (the reranker on the fused top 100, its own order). "
        "Cross-encoder CPU-s per query: pairs x the stage's measured CPU-s per pair, every stage counted; retrieval left out.\n\n"
    )
    md += md_table(["configuration", "nDCG@10", "overlap@10", "Kendall tau@10", "CE pairs / query", "CE CPU-s / query", "on the frontier of"], table)
    md += "\nCheapest configuration reaching:\n\n"
    md += md_table(["floor", "configuration", "CE CPU-s / query", "vs the reference"], [
        (k, v["config"] if v else "none", f"{v['ce_cpu_s_per_query']:.3f}" if v else "-",
         f"{v['ce_cpu_s_per_query'] / next(r for r in rows if r['config'] == 'fixed: ' + REFERENCE)['ce_cpu_s_per_query']:.2f}x" if v else "-") for k, v in picks.items()
    ])
    ref_cpu = next(r for r in rows if r["config"] == "fixed: " + REFERENCE)["ce_cpu_s_per_query"]
    cascades = [r for r in rows if r["eval"] != "fixed" and r["ce_cpu_s_per_query"] <= 0.6 * ref_cpu and r["overlap@10"] is not None]
    fixed_cheap = [r for r in rows if r["eval"] == "fixed" and r["ce_cpu_s_per_query"] <= 0.6 * ref_cpu and r["overlap@10"] is not None]
    targets = [
        target_line("rerank cascade: best overlap@10 at <= 0.6x the full-depth reranker's CE CPU", max((r["overlap@10"] for r in cascades), default=None), 0.95, "overlap@10"),
        target_line("fixed depth: best overlap@10 at <= 0.6x the full-depth reranker's CE CPU", max((r["overlap@10"] for r in fixed_cheap), default=None), 0.95, "overlap@10"),
    ]
    run.write({"evals_run": evals_run, "rows": rows, "frontier": fronts, "cheapest": {k: (v["config"] if v else None) for k, v in picks.items()}, "eval_commands": commands, "eval_meta": {k: r["meta"] for k, r in reports.items()}}, md, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
