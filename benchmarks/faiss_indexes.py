"""Dense index: FAISS Flat vs HNSW32 vs IVF-PQ on >= 100k vectors: queries/s and recall@10.

Command::

    python -m benchmarks.faiss_indexes                  # 100k vectors, dim 384
    python -m benchmarks.faiss_indexes --vectors 1000000 --ef-search 32,64,128,256

Vectors: encoding 100k real texts with MiniLM takes hours on a 2-core CPU, so the base is
synthetic with the structure of sentence embeddings: points of a Gaussian mixture
(``--clusters`` centres) in a ``--latent-dim``-dimensional space, mapped to 384 dimensions by a
random linear map, plus isotropic noise, L2-normalised (inner product = cosine, as in the
service). Queries are held-out draws from the same distribution. ``--scifact-embeddings
FILE.npy`` adds real vectors (e.g. SciFact documents encoded by all-MiniLM-L6-v2) to the base.

Indexes are built with the service's own helpers (``serve_app.retrieval.faiss_index``):
``Flat`` (exact, the ground truth), ``HNSW32`` with an efSearch sweep, and ``IVF1024,PQ48``
(``--ivfpq``) with an nprobe sweep. FAISS runs on ``--threads`` threads (default 1: on a shared
2-core machine OpenMP spin-waiting makes multi-threaded timings erratic). Two timing modes:

* ``single``: one query per ``search`` call, as the service's dense deployment does per request;
* ``batch``: all queries in one ``search`` call (throughput of offline search).

recall@10 = |top-10 of the index & exact top-10| / 10, averaged over queries.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.common import clustered_vectors  # noqa: F401 - shared with other benchmarks (tests import them from here too)
from benchmarks.common import DEFAULT_CACHE, BenchRun, base_parser, fmt_spread, md_table, measure, summarize, target_line

K = 10




def neighbour_stats(x: np.ndarray, queries: int = 300, seed: int = 0) -> dict[str, float]:
    """Mean cosine of the 1st/10th/100th nearest neighbour and of all pairs, for points of ``x``
    used as queries (leave-one-out): a summary of how hard the data is for approximate search."""
    rng = np.random.default_rng(seed)
    qi = rng.choice(len(x), min(queries, len(x)), replace=False)
    s = x[qi] @ x.T
    s[np.arange(len(qi)), qi] = -np.inf
    top = -np.sort(-s, axis=1)
    finite = s[np.isfinite(s)]
    return {"nn1": float(top[:, 0].mean()), "nn10": float(top[:, 9].mean()), "nn100": float(top[:, 99].mean()), "mean": float(finite.mean()), "std": float(finite.std())}


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = K) -> float:
    return float(np.mean([len(set(f[:k].tolist()) & set(e[:k].tolist())) / k for f, e in zip(found, exact)]))


def time_search(index: Any, q: np.ndarray, mode: str, repeats: int, single_queries: int) -> tuple[dict[str, float], dict[str, float], np.ndarray]:
    """queries/s by wall clock and by process CPU time (summaries over repeats), and the ids found for all of ``q``."""
    ids = index.search(q, K)[1]  # also warms up
    wall, cpu = [], []
    for _ in range(repeats):
        if mode == "batch":
            n = len(q)
            m = measure(lambda: index.search(q, K))
        else:
            sub = q[:single_queries]
            n = len(sub)
            m = measure(lambda: [index.search(sub[i : i + 1], K) for i in range(len(sub))])
        wall.append(n / m.wall)
        cpu.append(n / max(m.cpu, 1e-9))
    return summarize(wall), summarize(cpu), ids


def main(argv: Sequence[str] | None = None) -> int:
    import faiss

    from serve_app.retrieval.faiss_index import create_index, set_search_params, train_and_add

    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--vectors", type=int, default=100_000, help="base vectors")
    p.add_argument("--dim", type=int, default=384, help="dimension (all-MiniLM-L6-v2: 384)")
    p.add_argument("--queries", type=int, default=1000, help="query vectors (batch mode and recall)")
    p.add_argument("--single-queries", type=int, default=300, help="queries timed one per call (single mode)")
    p.add_argument("--clusters", type=int, default=2000, help="mixture components of the synthetic vectors")
    p.add_argument("--latent-dim", type=int, default=48, help="intrinsic dimension of the synthetic vectors")
    p.add_argument("--noise", type=float, default=0.15, help="isotropic noise added in the full dimension")
    p.add_argument("--anisotropy", type=float, default=0.4, help="weight of the direction shared by all vectors (0.4 gives SciFact's mean pairwise cosine, about 0.13)")
    p.add_argument("--real-index", default=str(DEFAULT_CACHE / "bench" / "scifact-index" / "dense" / "index.faiss"), help="a FAISS index of real MiniLM embeddings (SciFact) to compare the synthetic data's neighbour statistics with (skipped when absent)")
    p.add_argument("--ef-search", default="8,12,16,24,32,64,128,256", help="HNSW efSearch values")
    p.add_argument("--nprobe", default="8,16,32,64", help="IVF-PQ nprobe values")
    p.add_argument("--ivfpq", default="IVF1024,PQ48", help="IVF-PQ factory string")
    p.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (0: FAISS default; 1 keeps shared machines from OpenMP spin-wait stalls and makes the index types comparable)")
    p.add_argument("--scifact-embeddings", default=None, help="optional .npy of real embeddings added to the base")
    p.set_defaults(repeats=5)
    args = p.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    run = BenchRun("faiss_indexes", args, args.out)

    n_synth = args.vectors
    real = None
    if args.scifact_embeddings:
        real = np.load(args.scifact_embeddings, allow_pickle=False).astype(np.float32)
        n_synth = max(0, args.vectors - len(real))
    allv = clustered_vectors(n_synth + args.queries, args.dim, args.clusters, args.latent_dim, args.noise, args.seed, args.anisotropy)
    rng = np.random.default_rng(args.seed + 7)
    perm = rng.permutation(len(allv))
    q = np.ascontiguousarray(allv[perm[: args.queries]])
    base = allv[perm[args.queries :]]
    if real is not None:
        base = np.ascontiguousarray(np.vstack([base, real]))
    print(f"base {base.shape}, queries {q.shape}, faiss threads {faiss.omp_get_max_threads()}")
    calibration: dict[str, Any] = {}
    if Path(args.real_index).is_file():
        real_idx = faiss.read_index(args.real_index)
        real_x = real_idx.reconstruct_n(0, real_idx.ntotal)
        calibration[f"real SciFact MiniLM embeddings ({len(real_x)})"] = neighbour_stats(real_x, seed=args.seed)
        calibration[f"synthetic, same count ({len(real_x)})"] = neighbour_stats(base[: len(real_x)], seed=args.seed)
    calibration["synthetic, 20,000"] = neighbour_stats(base[:20000], seed=args.seed)

    results: dict[str, Any] = {"base_vectors": int(len(base)), "dim": args.dim, "queries": args.queries, "faiss_threads": faiss.omp_get_max_threads(), "data": "synthetic clustered" + (" + real embeddings" if real is not None else ""), "neighbour_stats": calibration, "indexes": {}}
    built: dict[str, Any] = {}
    for factory in ("Flat", "HNSW32", args.ivfpq):
        t = time.perf_counter()
        index = create_index(args.dim, factory)
        train_and_add(index, base, factory)
        build_s = time.perf_counter() - t
        built[factory] = index
        results["indexes"][factory] = {"build_s": build_s, "memory_mb": faiss.serialize_index(index).nbytes / 1e6, "settings": []}
        print(f"{factory}: built in {build_s:.1f} s")

    exact = None
    for factory, index in built.items():
        if factory == "Flat":
            sweep: list[tuple[str, int]] = [("exact", 0)]
        elif factory.startswith("HNSW"):
            sweep = [("efSearch", int(v)) for v in args.ef_search.split(",")]
        else:
            sweep = [("nprobe", int(v)) for v in args.nprobe.split(",")]
        for pname, value in sweep:
            if pname == "efSearch":
                set_search_params(index, ef_search=value, nprobe=1)
            elif pname == "nprobe":
                set_search_params(index, ef_search=16, nprobe=value)
            entry: dict[str, Any] = {"param": pname, "value": value}
            for mode in ("single", "batch"):
                rate, rate_cpu, ids = time_search(index, q, mode, args.repeats, args.single_queries)
                entry[f"{mode}_qps"] = rate
                entry[f"{mode}_qps_cpu"] = rate_cpu
                if exact is None:
                    exact = ids
                entry["recall@10"] = recall_at_k(ids, exact)
            results["indexes"][factory]["settings"].append(entry)
            print(f"{factory} {pname}={value}: recall@10 {entry['recall@10']:.3f}, single {entry['single_qps']['median']:.0f} q/s, batch {entry['batch_qps']['median']:.0f} q/s")

    flat = results["indexes"]["Flat"]["settings"][0]
    for factory, r in results["indexes"].items():
        for e in r["settings"]:
            for mode in ("single", "batch"):
                e[f"{mode}_speedup_vs_flat"] = e[f"{mode}_qps"]["median"] / flat[f"{mode}_qps"]["median"]
                e[f"{mode}_speedup_vs_flat_cpu"] = e[f"{mode}_qps_cpu"]["median"] / flat[f"{mode}_qps_cpu"]["median"]

    # Best HNSW setting reaching recall >= 0.95, per mode.
    targets = []
    hnsw = results["indexes"]["HNSW32"]["settings"]
    for mode in ("single", "batch"):
        for clock, suffix in (("CPU time", "_cpu"), ("wall clock", "")):
            ok = [e for e in hnsw if e["recall@10"] >= 0.95]
            best = max(ok, key=lambda e: e[f"{mode}_speedup_vs_flat{suffix}"]) if ok else None
            results[f"hnsw_best_{mode}{suffix}"] = best
            label = f"HNSW32 speed vs Flat at recall@10 >= 0.95 ({mode}-query calls, {clock}" + (f", efSearch={best['value']}" if best else ", no efSearch reached 0.95") + ")"
            targets.append(target_line(label, best[f"{mode}_speedup_vs_flat{suffix}"] if best else 0.0, 10))

    rows = []
    for factory, r in results["indexes"].items():
        for e in r["settings"]:
            setting = "exact" if e["param"] == "exact" else f"{e['param']}={e['value']}"
            rows.append((factory, setting, f"{e['recall@10']:.3f}", fmt_spread(e["single_qps"], 0), f"{e['single_speedup_vs_flat']:.1f}x", f"{e['single_speedup_vs_flat_cpu']:.1f}x",
                         fmt_spread(e["batch_qps"], 0), f"{e['batch_speedup_vs_flat']:.1f}x", f"{e['batch_speedup_vs_flat_cpu']:.1f}x"))
    build_rows = [(f, f"{r['build_s']:.1f}", f"{r['memory_mb']:.0f}") for f, r in results["indexes"].items()]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("single", "batch")):
        for factory, r in results["indexes"].items():
            xs = [e["recall@10"] for e in r["settings"]]
            ys = [e[f"{mode}_qps"]["median"] for e in r["settings"]]
            ax.plot(xs, ys, "o-" if len(xs) > 1 else "s", label=factory)
            for e, x, y in zip(r["settings"], xs, ys):
                if e["param"] != "exact":
                    ax.annotate(str(e["value"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(0.95, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 vs exact")
        ax.set_ylabel("queries/s")
        ax.set_title(f"{mode}: {'1 query per call' if mode == 'single' else f'{args.queries} queries per call'}")
        ax.legend(fontsize=8)
    fig.suptitle(f"FAISS on {len(base):,} x {args.dim} vectors ({results['data']})")
    run.save_figure(fig, "recall_vs_qps.png")

    md = run.header_markdown("Dense index: FAISS Flat vs HNSW32 vs IVF-PQ")
    md += (
        f"{len(base):,} base vectors, dim {args.dim} ({results['data']}: {args.clusters} clusters, latent dim {args.latent_dim}, noise {args.noise}, anisotropy {args.anisotropy}); "
        f"{args.queries} held-out queries ({args.single_queries} for single-query timing); FAISS threads {results['faiss_threads']}. "
        "queries/s: median [min-max] of the repeats, wall clock; speed-ups also from process CPU time, the steadier figure for "
        "single-threaded code on a shared machine (time the process waited for a core is not counted).\n\n"
    )
    md += md_table(["index", "setting", "recall@10", "queries/s (1 per call, wall)", "vs Flat (wall)", "vs Flat (CPU)", "queries/s (batch, wall)", "vs Flat (wall)", "vs Flat (CPU)"], rows)
    md += "\n" + md_table(["index", "build s", "size MB"], build_rows)
    md += "\nHow hard the data is (mean cosine of the k-th nearest neighbour of 300 points, and over all pairs):\n\n"
    md += md_table(["data", "nn1", "nn10", "nn100", "all pairs mean", "all pairs std"], [(k, *(f"{v[x]:.3f}" for x in ("nn1", "nn10", "nn100", "mean", "std"))) for k, v in calibration.items()])
    run.write(results, md, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
