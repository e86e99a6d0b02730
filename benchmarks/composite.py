"""The do-less-work features together against the pipeline a user would assemble from peers.

Command::

    python -m benchmarks.composite --model $BENCH_CACHE/scifact-reranker
    python -m benchmarks.composite --model $BENCH_CACHE/scifact-reranker --cheap-depth 30 --cheap-blend none

Workload: a stream of SciFact test queries with Zipf(``--zipf``) popularity (real traffic
repeats: the query of popularity rank r is drawn with probability proportional to 1 / r^s, a
seeded permutation decides which query has which rank), sent as /search requests by
closed-loop clients on loopback, ``--requests`` per client count in ``--clients``. Both
systems answer the same requests in the same order. Before the measured segments the cheap
system is sent the ``--warmup`` requests that precede them in the stream (a service under
steady traffic has seen them; they are not measured, and the fixed system, which has nothing
to warm, is not sent them).

Systems, each a fresh application on this machine with the same retrievers, fusion, reranker
checkpoint and replica resources, interleaved in every repeat (their order alternates):

* ``fixed``: what the peers offer (a rerank server that scores every pair it is sent, such as
  TEI or infinity-emb, behind the same retrievers and fusion): the reranker scores the fused
  top ``--full-depth`` of every request, no score cache. Its answers are the reference.
* ``infinity``: the same pipeline assembled from peers: serve_app's retrievers and fusion
  answer /search without reranking (``rerank_top_m`` 0, the fused top ``--full-depth``), and
  infinity-emb (``--infinity-venv``, as ``benchmarks.rerank_peers`` runs it) serving the same
  checkpoint reranks them, every pair it is sent, no cache; two HTTP calls per answer, made by
  the load generator's clients.
* ``cheap``: serve_app's cheapest configuration whose offline fidelity to the full-depth
  reranker is at least 0.95 overlap@10 (chosen on the Pareto results, ``--cheap-*``): the
  depth, blend and cascade given, and the exact score cache.

Reported per system and client count (median and spread over ``--repeats``): answers/s,
p50/p95 latency, errors; per system: nDCG@10 of the answers on the qrels (each distinct query's
first answer), and the cheap system's fidelity to the fixed system's answer to the same query
(overlap@10 and Kendall's tau of the top 10, ``serve_app.eval.query_fidelity``). Target: cheap
>= 3x the answers/s of fixed at fidelity >= 0.95.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.common import DEFAULT_CACHE, BenchRun, base_parser, fmt_spread, load_scifact, md_table, summarize, target_line
from benchmarks.common import ensure_scifact_index
from benchmarks.loadgen import LoadResult, check_loopback, closed_loop, run_closed_loop
from benchmarks.score_cache import zipf_stream
from benchmarks.serving import free_port, serve_stack


def _cascade(spec: str | None) -> list[dict[str, Any]]:
    """``MODEL=TOP_M[:MAX_LENGTH]`` as a one-stage ``cascade`` section (blend rrf), or none."""
    if not spec:
        return []
    model, _, rest = spec.rpartition("=")
    top_m, _, max_length = rest.partition(":")
    reranker: dict[str, Any] = {"model": model, "device": "cpu"}
    if max_length:
        reranker["max_length"] = int(max_length)
    return [{"name": "small", "reranker": reranker, "blend": "rrf", "default_top_m": int(top_m), "max_top_m": int(top_m)}]


def system_config(args: Any, index: Path, name: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(application args, deployment options, rerank depth per request) of one system."""
    cheap = name == "cheap"
    reranker = {"model": str(args.model), "device": "cpu", "max_length": args.max_length, "score_cache": {"max_bytes": (256 << 20) if cheap else 0}}
    app_args: dict[str, Any] = {
        "index_dir": str(index),
        "build_index_if_missing": False,
        "retrievers": ["bm25", "dense"],
        "reranker": reranker,
        "fusion": {"method": "rrf", "rerank_blend": args.cheap_blend if cheap else "none"},
        "funnel": {"default_top_k": 100, "default_rerank_top_m": max(args.full_depth, args.cheap_depth), "max_rerank_top_m": max(args.full_depth, args.cheap_depth)},
        "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.01},
        "timeouts": {"retriever_timeout_s": 60, "rerank_timeout_s": 600, "request_timeout_s": 600},
    }
    if args.dense_model:
        app_args["dense"] = {"model": str(args.dense_model)}
    stages = _cascade(args.cheap_cascade) if cheap else []
    if stages:
        app_args["cascade"] = stages
    threads = "2"
    deployments: dict[str, Any] = {
        "SearchIngress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        "BM25Retriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        "DenseRetriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        "CrossEncoderReranker": {
            "num_replicas": 1, "max_ongoing_requests": 64,
            "ray_actor_options": {"num_cpus": 1.0 if stages else 2.0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}},
        },
    }
    if stages:
        deployments["CrossEncoderReranker-small"] = {
            "num_replicas": 1, "max_ongoing_requests": 64,
            "ray_actor_options": {"num_cpus": 1.0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}},
        }
    return app_args, deployments, (args.cheap_depth if cheap else args.full_depth)


def _peer_send(search_url: str, rerank_url: str, depth: int, content: Any, model: str) -> Any:
    """One request of the peers' pipeline: /search without reranking, then /rerank of its top ``depth``."""

    async def send(client: Any, i: int, q: str) -> tuple[int, dict[str, Any], Optional[str]]:
        found = await client.post(search_url, json={"query": q, "top_k": 100, "rerank_top_m": 0, "top_n": depth})
        found.raise_for_status()
        ids = [r["id"] for r in found.json()["results"]]
        ranked = await client.post(rerank_url, json={"model": model, "query": q, "documents": [content(d) for d in ids]})
        ranked.raise_for_status()
        order = sorted(ranked.json()["results"], key=lambda r: -r["relevance_score"])
        return 200, {"ids": [ids[r["index"]] for r in order][:10]}, None

    return send


def peer_closed_loop(search_url: str, rerank_url: str, queries: Sequence[str], concurrency: int, depth: int, content: Any, model: str) -> LoadResult:
    """Closed loop over the peers' pipeline: retrieval and fusion from ``search_url`` without
    reranking, then the fused top ``depth`` reranked by ``rerank_url`` (a Cohere-style /rerank)."""
    for url in (search_url, rerank_url):
        check_loopback(url)
    return asyncio.run(run_closed_loop(queries, concurrency, _peer_send(search_url, rerank_url, depth, content, model), max_seconds=1e9, timeout_s=600))


def infinity_model_dir(model: Path, max_length: int, cache: Path) -> Path:
    """A copy of the checkpoint whose tokenizer reads at most ``max_length`` tokens, so that
    infinity-emb (which takes the tokenizer's limit) scores the pairs serve_app scores."""
    import json
    import shutil

    out = cache / f"{model.name}-infinity-{max_length}"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model, tmp)
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        cfg["model_max_length"] = max_length
        cfg_path.write_text(json.dumps(cfg, indent=2))
        tmp.rename(out)
    return out


def ndcg_of_answers(answers: dict[str, list[str]], qrels: dict[str, dict[str, int]], qid_of: dict[str, str]) -> float:
    """nDCG@10 of one answer per distinct query, over the judged queries answered."""
    from serve_app.eval import evaluate

    run = {qid_of[q]: {d: float(len(ids) - i) for i, d in enumerate(ids)} for q, ids in answers.items()}
    judged = {q: qrels[q] for q in run if q in qrels}
    return evaluate(run, judged, ["nDCG@10"])["nDCG@10"] if judged else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.set_defaults(repeats=2)
    p.add_argument("--scifact", default=None, help="SciFact BEIR directory")
    p.add_argument("--index", default=str(DEFAULT_CACHE / "bench" / "scifact-index"), help="index directory (built if missing)")
    p.add_argument("--model", required=True, help="the reranker checkpoint both systems serve (serve-app train-reranker's output)")
    p.add_argument("--max-length", type=int, default=256, help="reranker tokens per pair")
    p.add_argument("--dense-model", default=None, help="bi-encoder of the index (default: all-MiniLM-L6-v2)")
    p.add_argument("--infinity-bfloat16", action="store_true", help="infinity-emb in bfloat16 (serve_app's dtype auto is bfloat16 on CPUs with native bf16)")
    p.add_argument("--full-depth", type=int, default=100, help="fixed system: fused candidates reranked per request (the reference depth)")
    p.add_argument("--cheap-depth", type=int, default=50, help="cheap system: fused candidates reranked per request")
    p.add_argument("--cheap-blend", choices=["none", "rrf"], default="none", help="cheap system: rerank blend")
    p.add_argument("--cheap-cascade", default=None, metavar="MODEL=TOP_M[:MAX_LENGTH]", help="cheap system: a first rerank stage (blend rrf) before the reranker")
    p.add_argument("--clients", default="2,8", help="closed-loop client counts, one measured segment each")
    p.add_argument("--requests", type=int, default=32, help="requests per measured segment")
    p.add_argument("--warmup", type=int, default=150, help="stream requests sent to the cheap system before the measured segments")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of query popularity")
    p.add_argument("--systems", default="fixed,infinity,cheap", help="systems to run (comma-separated): fixed, infinity, cheap")
    p.add_argument("--infinity-venv", default=str(DEFAULT_CACHE / "infinity-venv"), help="virtualenv with infinity-emb[torch,server] (see benchmarks.rerank_peers)")
    args = p.parse_args(argv)
    run = BenchRun("composite", args, args.out)

    index = ensure_scifact_index(Path(args.index), args.scifact)
    ds = load_scifact(args.scifact)
    qids = sorted(ds.queries)
    queries = [ds.queries[q] for q in qids]
    qid_of = dict(zip(queries, qids))
    content = lambda doc_id: ds.corpus.get(doc_id).content  # noqa: E731 - the text serve_app's reranker reads
    clients = [int(c) for c in args.clients.split(",")]
    stream = zipf_stream(len(queries), args.warmup + args.requests * len(clients), args.zipf, args.seed)
    warm_part, measured = stream[: args.warmup], stream[args.warmup:]
    segments = {c: [queries[i] for i in measured[j * args.requests:(j + 1) * args.requests]] for j, c in enumerate(clients)}
    seen = set(warm_part)
    repeats_in_segments = 0
    for i in measured:
        repeats_in_segments += i in seen
        seen.add(i)
    print(f"stream: {args.warmup} warm-up + {len(measured)} measured requests; {repeats_in_segments} of the measured repeat an earlier query")
    systems = args.systems.split(",")

    per_run: list[dict[str, Any]] = []
    answers: dict[str, dict[str, list[str]]] = {s: {} for s in systems}
    for rep in range(args.repeats):
        order = systems if rep % 2 == 0 else systems[::-1]
        for name in order:
            app_args, deployments, depth = system_config(args, index, "fixed" if name == "infinity" else name)
            body = lambda q: {"query": q, "top_k": 100, "rerank_top_m": depth, "top_n": 10}  # noqa: E731
            print(f"== repeat {rep + 1}/{args.repeats}: {name} (depth {depth})")
            infinity = None
            if name == "infinity":
                from benchmarks.rerank_peers import SERVED_NAME, InfinityServer

                infinity = InfinityServer(Path(args.infinity_venv), infinity_model_dir(Path(args.model), args.max_length, run.raw), free_port(), run.raw / "infinity.log", None, "bfloat16" if args.infinity_bfloat16 else "float32")
                if not infinity.start(600):
                    raise SystemExit(f"infinity-emb did not start: {infinity.error}")
                deployments["CrossEncoderReranker"]["ray_actor_options"]["num_cpus"] = 0.25  # loaded, never called
            try:
                with serve_stack(app_args, deployments, num_cpus=4.0, timeout_s=900) as base:
                    url = base + "/search"
                    warm = closed_loop(url, [body("warm up the stages")] * 2, 1)
                    assert warm.ok, warm.records[0].error
                    if infinity is not None:
                        peer_closed_loop(url, infinity.url + "/rerank", ["warm up the reranker"] * 2, 1, args.full_depth, content, SERVED_NAME)
                    if name == "cheap" and warm_part:
                        closed_loop(url, [body(queries[i]) for i in warm_part], max(clients), max_seconds=3600, timeout_s=600)
                    for c in clients:
                        if infinity is not None:
                            res = peer_closed_loop(url, infinity.url + "/rerank", segments[c], c, args.full_depth, content, SERVED_NAME)
                        else:
                            res = closed_loop(url, [body(q) for q in segments[c]], c, max_seconds=3600, timeout_s=600, extract=lambda j: {"ids": [r["id"] for r in j["results"]]})
                        s = res.summary()
                        for q, rec in zip(segments[c], res.records):
                            if rec.status == 200:
                                answers[name].setdefault(q, rec.info["ids"])
                        per_run.append({"repeat": rep, "system": name, "clients": c, **{k: s[k] for k in ("requests", "ok", "errors", "error_examples", "requests_per_s", "p50_ms", "p95_ms", "span_s")}})
                        print(f"  {c} clients: {s['requests_per_s']:.2f} answers/s, p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, {s['errors']} errors")
            finally:
                if infinity is not None:
                    infinity.stop()

    from serve_app.eval import query_fidelity

    agg: dict[str, Any] = {}
    for name in systems:
        for c in clients:
            rows = [r for r in per_run if r["system"] == name and r["clients"] == c]
            agg[f"{name}@{c}"] = {k: summarize(r[k] for r in rows) for k in ("requests_per_s", "p50_ms", "p95_ms")} | {"errors": sum(r["errors"] for r in rows)}
    quality: dict[str, Any] = {name: {"nDCG@10": ndcg_of_answers(answers[name], ds.qrels, qid_of), "distinct_queries": len(answers[name])} for name in systems}
    if "fixed" in answers:
        quality["fixed"]["overlap@10"] = quality["fixed"]["kendall_tau@10"] = 1.0
        for name in (n for n in systems if n != "fixed"):
            common = [q for q in answers[name] if q in answers["fixed"]]
            fid = [query_fidelity(answers[name][q], answers["fixed"][q], 10) for q in common]
            quality[name]["overlap@10"] = sum(o for o, _ in fid) / len(fid) if fid else float("nan")
            quality[name]["kendall_tau@10"] = sum(t for _, t in fid) / len(fid) if fid else float("nan")

    rows_md = []
    ratios = {}
    baselines = [n for n in systems if n != "cheap"]
    for c in clients:
        # the strongest baseline at this client count: the faster of the fixed-depth pipelines
        best = max(baselines, key=lambda n: agg[f"{n}@{c}"]["requests_per_s"]["median"]) if baselines else None
        for name in systems:
            a = agg[f"{name}@{c}"]
            ratio = ""
            if name == "cheap" and best is not None:
                ratio_v = a["requests_per_s"]["median"] / agg[f"{best}@{c}"]["requests_per_s"]["median"]
                ratios[c] = ratio_v
                ratio = f"{ratio_v:.2f}x {best}"
            rows_md.append((c, name, fmt_spread(a["requests_per_s"], 2), ratio, fmt_spread(a["p50_ms"], 0), fmt_spread(a["p95_ms"], 0), a["errors"]))
    q_rows = [(n, f"{q['nDCG@10']:.4f}", f"{q.get('overlap@10', float('nan')):.3f}", f"{q.get('kendall_tau@10', float('nan')):.3f}", q["distinct_queries"]) for n, q in quality.items()]
    cheap_fid = quality.get("cheap", {}).get("overlap@10")
    worst = min(ratios.values()) if ratios else None
    targets = [
        target_line("cheap / the faster fixed-depth pipeline, answers/s, lowest over the client counts", worst, 3.0),
        target_line("cheap fidelity to fixed, overlap@10", cheap_fid, 0.95, "overlap@10"),
    ]
    md = run.header_markdown("Do-less-work features together vs a fixed-depth pipeline (Zipf SciFact stream)")
    cascade = f", cascade stage {args.cheap_cascade} (blend rrf)" if args.cheap_cascade else ""
    md += (
        f"Stream: Zipf({args.zipf}) over the {len(queries)} SciFact test queries; {args.requests} measured requests per client count "
        f"({', '.join(map(str, clients))} closed-loop clients), {repeats_in_segments} of the {len(measured)} measured requests repeat an earlier query; "
        f"the cheap system first answers the {args.warmup} requests before them (not measured). Reranker `{Path(args.model).name}` at max_length {args.max_length}, "
        f"one replica with 2 CPUs and 2 torch threads; hybrid top-100 per retriever, RRF. Repeats: {args.repeats}, systems interleaved (order alternating).\n\n"
        f"* fixed: serve_app reranks the fused top {args.full_depth} of every request, blend none, no score cache.\n"
        f"* infinity: serve_app's /search without reranking, then infinity-emb ({'bfloat16' if args.infinity_bfloat16 else 'float32'}, the same checkpoint, pairs cut at {args.max_length} tokens) reranks the fused top {args.full_depth}; two HTTP calls per answer.\n"
        f"* cheap: rerank the fused top {args.cheap_depth}, blend {args.cheap_blend}{cascade}, score cache 256 MiB.\n\n"
    )
    md += md_table(["clients", "system", "answers/s", "cheap vs the faster baseline", "p50 ms", "p95 ms", "errors"], rows_md)
    md += "\nAnswers (each distinct query's first answer; fidelity: the cheap answer against the fixed answer to the same query):\n\n"
    md += md_table(["system", "nDCG@10", "overlap@10 vs fixed", "Kendall tau@10 vs fixed", "distinct queries"], q_rows)
    run.write({"per_run": per_run, "aggregate": agg, "quality": quality, "ratios": {str(k): v for k, v in ratios.items()}, "stream": {"warmup": args.warmup, "measured": len(measured), "repeats_in_measured": repeats_in_segments}}, md, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
