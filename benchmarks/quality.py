"""Quality on SciFact test: nDCG@10, Recall@100, MRR@10 of bm25, dense, hybrid (and hybrid+rerank), next to published numbers.

Command::

    python -m benchmarks.quality                                       # bm25, dense, hybrid
    python -m benchmarks.quality --reranker $BENCH_CACHE/scifact-reranker --rerank-top-m 100

It runs the project's own evaluation CLI, exactly as a user would::

    serve-app eval --dataset ../shared/datasets/scifact --split test \\
        --pipeline bm25,dense,hybrid[,hybrid+rerank] --index INDEX --out DIR -q

``hybrid+rerank`` (plain and with ``--rerank-blend rrf``) is added when ``--reranker`` names a
real fine-tuned cross-encoder directory; scoring 30,000 pairs takes about 50 minutes on two CPU
cores, so the default run (a minute) leaves it out. The MiniLM speed model of
the speed benchmarks has a random classification head and is never used here. Published
numbers (BEIR paper, MTEB; ``../shared/README.md``) are listed next to ours; they are nDCG@10
(and Recall@100 where published), computed elsewhere with other implementations, so they are a
reference, not a target of equality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import DEFAULT_CACHE, DEFAULT_SCIFACT, BenchRun, base_parser, md_table

PUBLISHED: dict[str, dict[str, Any]] = {
    "bm25": {"nDCG@10": 0.665, "R@100": 0.925, "source": "BEIR paper (Anserini BM25, k1=0.9 b=0.4) nDCG@10; R@100 Pyserini flat"},
    "dense": {"nDCG@10": 0.645, "R@100": 0.925, "source": "MTEB all-MiniLM-L6-v2"},
    "bm25+CE": {"nDCG@10": 0.688, "source": "BEIR paper: BM25 top-100 reranked by a MiniLM-L6 MS MARCO cross-encoder"},
}


def has_model(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))


def main(argv: Sequence[str] | None = None) -> int:
    from serve_app.cli import main as cli_main

    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--scifact", default=str(DEFAULT_SCIFACT), help="SciFact BEIR directory")
    p.add_argument("--index", default=str(DEFAULT_CACHE / "bench" / "scifact-index"), help="index directory (built by the CLI when missing)")
    p.add_argument("--reranker", default=None, help="fine-tuned cross-encoder directory, e.g. $BENCH_CACHE/scifact-reranker (hybrid+rerank runs only when given and it holds a model; ~50 min on 2 CPU cores)")
    p.add_argument("--rerank-top-m", type=int, default=100, help="fused candidates reranked by hybrid+rerank")
    p.set_defaults(repeats=1)
    args = p.parse_args(argv)
    run = BenchRun("quality", args, args.out)

    pipelines = ["bm25", "dense", "hybrid"]
    reranker = Path(args.reranker) if args.reranker else None
    if reranker is not None and has_model(reranker):
        pipelines.append("hybrid+rerank")
    out_dir = run.raw / "eval"
    cmd = ["eval", "--dataset", args.scifact, "--split", "test", "--pipeline", ",".join(pipelines), "--index", args.index, "--out", str(out_dir), "-q"]
    if "hybrid+rerank" in pipelines:
        cmd += ["--reranker", str(reranker), "--rerank-top-m", str(args.rerank_top_m), "--rerank-blend", "none,rrf"]
    print("serve-app " + " ".join(cmd))
    rc = cli_main(cmd)
    if rc != 0:
        raise SystemExit(f"serve-app eval failed with exit code {rc}")
    report = json.loads((out_dir / "metrics.json").read_text())
    ours = report["results"]
    results = {"cli": "serve-app " + " ".join(cmd), "pipelines": ours, "meta": report.get("meta", {}), "published": PUBLISHED, "reranker": str(reranker) if "hybrid+rerank" in pipelines else None}

    pub_for = {"bm25": "bm25", "dense": "dense", "hybrid+rerank": "bm25+CE"}
    rows = []
    for name, m in ours.items():
        pub = PUBLISHED.get(pub_for.get(name, ""), {})
        rows.append((name, f"{m['nDCG@10']:.4f}", f"{m['R@100']:.4f}", f"{m['RR@10']:.4f}", f"{pub['nDCG@10']:.3f}" if pub else "-", f"{pub['R@100']:.3f}" if "R@100" in pub else "-", pub.get("source", "")))
    md = run.header_markdown("Quality on SciFact test (300 queries)")
    md += f"Command run: `{results['cli']}`\n\n"
    md += md_table(["pipeline", "nDCG@10", "R@100", "MRR@10", "published nDCG@10", "published R@100", "published source"], rows)
    if "hybrid+rerank" not in pipelines:
        why = f"no fine-tuned cross-encoder at {reranker}" if reranker is not None else "no --reranker given"
        md += f"\nhybrid+rerank not run: {why} (the published BM25+CE figure is {PUBLISHED['bm25+CE']['nDCG@10']}; our measured rows are in docs/TRAINING.md).\n"
    run.write(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
