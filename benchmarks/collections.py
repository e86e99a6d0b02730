"""Memory and start time per added collection: the same application deployed with 0, 1, 2 ...
named collections besides the default one, each with its own index and stage deployments.

Command::

    python -m benchmarks.collections                        # 0..3 added collections, 3 repeats
    python -m benchmarks.collections --max-added 1 --repeats 1 --dense-model DIR   # a quick look

Every collection (the default one included) is the packaged demo corpus (324 documents) with BM25,
dense (all-MiniLM-L6-v2, ``Flat``) and a cross-encoder with the shape and cost of
ms-marco-MiniLM-L-6-v2 (random weights: cost, not quality), each on its own copy of one built
index; so a collection here costs what a small collection costs (a large index adds its own
size). One local Ray instance (``--num-cpus`` logical CPUs, replicas at 0.1 CPU) for the whole
run; for each count of added collections, in an interleaved order per repeat (0, 1, 2, 3, then
3, 2, 1, 0 ...), the application is deployed from nothing and timed until every deployment runs
and ``/healthz`` of every collection answers 200; then the proportional set size (PSS, from
``/proc/PID/smaps_rollup``: shared pages split between the processes that map them) of each of
its replica processes is summed, by collection, and the application is removed.

Per added collection = the least-squares slope over the counts (medians over repeats). 10 and
100 collections are that slope times 10 and 100 added to the 0-collection figures: a linear
extrapolation from what was measured, not a measurement (a real 100-collection application
needs a cluster: 300 replicas).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from benchmarks.common import DEFAULT_CACHE, REPO_ROOT, BenchRun, base_parser, md_table, speed_model_dir

APP = "colls"


def _pss_mib(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return 0.0
    return 0.0


def _replica_memory(app: str) -> dict[str, float]:
    """PSS (MiB) of the application's replica processes by collection ("default" for the root's)."""
    out: dict[str, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace").replace("\0", " ")
        except OSError:
            continue
        marker = f"ServeReplica:{app}:"
        if marker not in cmd:
            continue
        deployment = cmd.split(marker, 1)[1].split()[0].split(".")
        collection = deployment[0] if len(deployment) > 1 and deployment[0].startswith("c") and deployment[0][1:].isdigit() else "default"
        out[collection] = out.get(collection, 0.0) + _pss_mib(int(entry))
    return out


def _config(port: int, app_args: dict[str, Any], added: int) -> dict[str, Any]:
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    deps = [{"name": n, "num_replicas": 1, **small} for n in ("SearchIngress", "BM25Retriever", "DenseRetriever", "CrossEncoderReranker")]
    for i in range(added):
        deps += [{"name": f"c{i}.{n}", "num_replicas": 1, **small} for n in ("BM25Retriever", "DenseRetriever", "CrossEncoderReranker")]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 600},
        "applications": [{"name": APP, "route_prefix": "/", "import_path": "serve_app.serve.app:build_app", "args": app_args, "deployments": deps}],
    }


def _deploy_once(port: int, base_args: dict[str, Any], indexes: list[Path], added: int, timeout_s: float) -> dict[str, Any]:
    import httpx
    from ray import serve

    from benchmarks.loadgen import wait_ready
    from serve_app.serve.runner import deploy_config, load_serve_config, wait_for_apps

    args = {**base_args, "index_dir": str(indexes[0]), "collections": {f"c{i}": {"index_dir": str(indexes[i + 1])} for i in range(added)}}
    t0 = time.perf_counter()
    deploy_config(load_serve_config(_config(port, args, added)))
    time.sleep(0.5)
    wait_for_apps([APP], timeout_s=timeout_s)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/healthz", timeout_s=timeout_s)
    for i in range(added):
        wait_ready(f"{base}/collections/c{i}/healthz", timeout_s=timeout_s)
    start_s = time.perf_counter() - t0
    answer = httpx.post(base + (f"/collections/c{added - 1}" if added else "") + "/search", json={"query": "why does the sun shine", "top_n": 3}, timeout=120)
    assert answer.status_code == 200 and answer.json()["results"], answer.text
    memory = _replica_memory(APP)
    serve.delete(APP)
    deadline = time.monotonic() + 120
    while _replica_memory(APP) and time.monotonic() < deadline:
        time.sleep(0.5)
    return {"added": added, "start_s": start_s, "pss_mib": memory, "pss_total_mib": sum(memory.values())}


def _slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    a, b = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    return float(a), float(b)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--max-added", type=int, default=3, help="most collections added to the default one")
    p.add_argument("--num-cpus", type=float, default=4, help="logical CPUs of the local Ray instance")
    p.add_argument("--work", default=str(DEFAULT_CACHE / "bench" / "collections"), help="scratch directory (index copies)")
    p.add_argument("--dense-model", default=None, help="bi-encoder (default: all-MiniLM-L6-v2)")
    p.add_argument("--reranker", default=None, help="reranker (default: the MiniLM-L6-shaped speed model)")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for one deployment")
    args = p.parse_args(argv)
    run = BenchRun("collections", args, args.out)

    import ray

    from benchmarks.serving import free_port
    from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
    from serve_app.corpus import read_corpus_source
    from serve_app.index import build_index
    from serve_app.serve.runner import start_ray

    work = Path(args.work)
    dense = DenseConfig(device="cpu", **({"model": args.dense_model} if args.dense_model else {}))
    reranker = args.reranker or str(speed_model_dir())
    first = work / "index-0"
    if not (first / "manifest.json").exists():
        build_index(read_corpus_source("builtin:demo").corpus, first, bm25=BM25Config(), dense=dense, chunking=ChunkingConfig(), show_progress=False)
    indexes = [first]
    for i in range(1, args.max_added + 1):
        d = work / f"index-{i}"
        if not (d / "manifest.json").exists():
            shutil.copytree(first, d)
        indexes.append(d)
    base_args = {"corpus": None, "build_index_if_missing": False, "dense": dense.model_dump(), "reranker": {"model": reranker, "device": "cpu"}, "timeouts": {"request_timeout_s": 120, "retriever_timeout_s": 60, "rerank_timeout_s": 60, "health_timeout_s": 30}}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAY_worker_niceness"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if x)
    start_ray(num_cpus=args.num_cpus, log_to_driver=False)
    port = free_port()
    samples: list[dict[str, Any]] = []
    try:
        counts = list(range(args.max_added + 1))
        for r in range(args.repeats):
            for added in counts if r % 2 == 0 else counts[::-1]:  # interleaved, direction alternating
                s = _deploy_once(port, base_args, indexes, added, args.timeout)
                s["repeat"] = r
                samples.append(s)
                print(f"repeat {r}: {added} added collections: ready in {s['start_s']:.1f} s, replicas {s['pss_total_mib']:.0f} MiB PSS", flush=True)
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    by: dict[int, dict[str, Any]] = {}
    for added in range(args.max_added + 1):
        ss = [s for s in samples if s["added"] == added]
        by[added] = {
            "start_s": {"median": statistics.median(s["start_s"] for s in ss), "min": min(s["start_s"] for s in ss), "max": max(s["start_s"] for s in ss)},
            "pss_total_mib": {"median": statistics.median(s["pss_total_mib"] for s in ss), "min": min(s["pss_total_mib"] for s in ss), "max": max(s["pss_total_mib"] for s in ss)},
            "pss_per_added_collection_mib": statistics.median([statistics.mean([v for k, v in s["pss_mib"].items() if k != "default"]) for s in ss]) if added else None,
        }
    xs = sorted(by)
    mem_slope, mem0 = _slope(xs, [by[x]["pss_total_mib"]["median"] for x in xs])
    time_slope, time0 = _slope(xs, [by[x]["start_s"]["median"] for x in xs])
    results = {
        "collection": "builtin:demo (324 documents), BM25 + MiniLM Flat + MiniLM-L6-shaped cross-encoder",
        "by_added": by,
        "samples": samples,
        "per_added_collection": {"pss_mib": mem_slope, "start_s": time_slope},
        "extrapolated": {str(n): {"pss_gib": (mem0 + mem_slope * (n - 1)) / 1024, "start_s_one_node": time0 + time_slope * (n - 1)} for n in (10, 100)},
    }
    md = run.header_markdown("Memory and start time per added collection")
    md += f"Each collection: {results['collection']}, its three stage deployments one replica each; one ingress for all.\n\n"
    rows = [(x, f"{by[x]['start_s']['median']:.1f} ({by[x]['start_s']['min']:.1f}-{by[x]['start_s']['max']:.1f})", f"{by[x]['pss_total_mib']['median']:.0f} ({by[x]['pss_total_mib']['min']:.0f}-{by[x]['pss_total_mib']['max']:.0f})", "" if by[x]["pss_per_added_collection_mib"] is None else f"{by[x]['pss_per_added_collection_mib']:.0f}") for x in xs]
    md += md_table(["added collections", "deploy to ready, s (median, min-max)", "replicas PSS, MiB", "PSS of one added collection's replicas, MiB"], rows) + "\n\n"
    md += f"Per added collection (least-squares slope over the medians): **{mem_slope:.0f} MiB** and **{time_slope:.1f} s** of start on this one node.\n\n"
    md += "Linear extrapolation (not measured): " + "; ".join(f"{n} collections ≈ {v['pss_gib']:.1f} GiB of replicas, ≈ {v['start_s_one_node']:.0f} s to start on one such node" for n, v in results["extrapolated"].items()) + ". Replicas of different collections start in parallel on a cluster, so the start time there is bounded by the slowest node, not the sum.\n"
    run.write(results, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
