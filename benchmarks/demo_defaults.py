"""The demo's default rerank configuration, chosen on the demo's train queries and reported on its test queries.

Command::

    python -m benchmarks.demo_defaults

Runs ``serve-app eval`` on the packaged demo dataset (``serve_app/demo``: 324 documents, train
and test qrels) with the demo reranker (``serve_app.training.ensure_demo_reranker``, trained
on first use), hybrid top-100 per retriever, the reranker on the fused top ``--depths`` with
and without the rrf blend, once on the train split and once on the test split. The choice:
among the configurations whose train nDCG@10 beats hybrid's by more than ``MARGIN``, the one with
the highest train nDCG@10 (ties: fewer pairs); hybrid alone when none does. The test split only
reports it.
``serve_app.serve.commands.DEMO_RERANK`` is what ``serve-app demo`` ships;
``tests/test_demo_defaults.py`` checks that it is this run's choice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from benchmarks.common import BenchRun, base_parser, md_table, public_command
from serve_app.serve.commands import DEFAULT_QUERY

DEMO = Path(__file__).resolve().parent.parent / "serve_app" / "demo"


def parse_row(name: str) -> tuple[int, str]:
    """(depth, blend) of an eval row: ``hybrid`` is depth 0; ``hybrid+rerank@M[ (rrf blend)]``."""
    if name == "hybrid":
        return 0, "none"
    depth = int(name.split("@")[1].split(" ")[0])
    return depth, "rrf" if "(rrf blend)" in name else "none"


#: How much a rerank configuration must beat hybrid alone on the train queries to replace it.
#: The demo reranker is trained on those queries, so on them every configuration nearly ties
#: (nDCG@10 within 0.002 of each other); a difference that small says nothing about new queries.
MARGIN = 0.005


def choose(train: Mapping[str, Mapping[str, float]], margin: float = MARGIN) -> dict[str, Any]:
    """The configuration to ship: the best train nDCG@10 among those that beat hybrid alone by
    more than ``margin`` (ties: the smaller depth), else hybrid alone (depth 0: no reranking)."""
    floor = train["hybrid"]["nDCG@10"]
    candidates = [(m["nDCG@10"], -parse_row(n)[0], n) for n, m in train.items() if n == "hybrid" or m["nDCG@10"] > floor + margin]
    _, _, name = max(candidates)
    depth, blend = parse_row(name)
    return {"row": name, "rerank_top_m": depth, "rerank_blend": blend}


def demo_answer(index_dir: Path, model: Path, depth: int, blend: str, top_n: int = 5) -> list[dict[str, Any]]:
    """The top ``top_n`` of the demo's example query with the given rerank settings."""
    from serve_app.config import FusionConfig, RerankerModelConfig
    from serve_app.index import load_index
    from serve_app.pipeline import SearchPipeline
    from serve_app.rerank import Reranker

    loaded = load_index(index_dir)
    reranker = Reranker.from_config(RerankerModelConfig(model=str(model), device="cpu")) if depth else None
    pipe = SearchPipeline(loaded.corpus, loaded.retrievers, reranker, FusionConfig(rerank_blend=blend))
    out = pipe.search(DEFAULT_QUERY, top_k=100, rerank_top_m=depth, top_n=top_n, return_documents=True)
    return [{"id": r.doc_id, "title": r.document.title if r.document else "", "ranks": dict(r.retriever_ranks)} for r in out.results]


def main(argv: Sequence[str] | None = None) -> int:
    from serve_app.cli import main as cli_main
    from serve_app.training.demo_reranker import ensure_demo_reranker

    p = base_parser(__doc__.split("\n")[0], repeats=False)
    p.add_argument("--depths", default="100,50,20,10", help="rerank depths evaluated")
    p.add_argument("--work", default=None, help="index and eval cache (default: the results directory's raw/)")
    args = p.parse_args(argv)
    run = BenchRun("demo_defaults", args, args.out)
    work = Path(args.work) if args.work else run.raw
    model = ensure_demo_reranker()
    reports: dict[str, Any] = {}
    commands = {}
    for split in ("train", "test"):
        cmd = ["eval", "--dataset", str(DEMO), "--split", split, "--pipeline", "hybrid,hybrid+rerank", "--rerank-top-m", args.depths,
               "--rerank-blend", "none,rrf", "--reranker", str(model), "--work-dir", str(work), "--out", str(work / split), "-q"]
        commands[split] = public_command("serve-app " + " ".join(cmd)).replace(str(model), "$DEMO_RERANKER")
        print(commands[split])
        if cli_main(cmd) != 0:
            raise SystemExit(f"serve-app eval ({split}) failed")
        reports[split] = json.loads((work / split / "metrics.json").read_text())["results"]
    chosen = choose(reports["train"])
    answers = {label: demo_answer(work / "indexes" / DEMO.name, model, depth, blend) for label, depth, blend in (
        ("service default (rerank_top_m 50, blend none)", 50, "none"), (f"shipped (rerank_top_m {chosen['rerank_top_m']}, blend {chosen['rerank_blend']})", chosen["rerank_top_m"], chosen["rerank_blend"]),
    )}
    rows = [(n, f"{reports['train'][n]['nDCG@10']:.4f}", f"{reports['test'][n]['nDCG@10']:.4f}", "shipped" if n == chosen["row"] else "") for n in reports["train"]]
    md = run.header_markdown("The demo's default rerank configuration")
    md += "Evaluations (the demo reranker at `$DEMO_RERANKER`, i.e. `ensure_demo_reranker()`):\n\n" + "".join(f"* `{c}`\n" for c in commands.values())
    md += f"\nChosen on train: `{chosen['row']}` (rerank_top_m {chosen['rerank_top_m']}, rerank_blend {chosen['rerank_blend']}); test reports it.\n\n"
    md += md_table(["configuration", "train nDCG@10", "test nDCG@10", ""], rows)
    test_chosen, test_hybrid = reports["test"][chosen["row"]]["nDCG@10"], reports["test"]["hybrid"]["nDCG@10"]
    md += f"\nOn test the shipped configuration scores {test_chosen:.4f} against hybrid alone's {test_hybrid:.4f}.\n"
    md += f"\nThe answer to `serve-app demo`'s query \"{DEFAULT_QUERY}\" (top 5; in process, the same funnel the service runs):\n\n"
    for label, items in answers.items():
        md += f"{label}:\n\n" + md_table(["#", "document", "title", "bm25 rank", "dense rank"], [(i + 1, x["id"], x["title"], x["ranks"].get("bm25", "-"), x["ranks"].get("dense", "-")) for i, x in enumerate(items)]) + "\n"
    run.write({"chosen": chosen, "answers": answers, "train": reports["train"], "test": reports["test"], "commands": commands}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
