"""Cross-encoder throughput: our /rerank endpoint vs CrossEncoder.predict vs the infinity-emb server.

Command::

    python -m benchmarks.rerank_peers                          # BM25 top-10 per request, N = 1, 4, 16, 64 (~9 min on 2 cores)
    python -m benchmarks.rerank_peers --throughput-optimized --via direct   # Serve's high-throughput mode, no proxy
    python -m benchmarks.rerank_peers --runtime torch-bfloat16  # every system in bfloat16
    python -m benchmarks.rerank_peers --runtime onnx-int8       # every system on ONNX Runtime, int8 weights
    python -m benchmarks.rerank_peers --concurrency 16,64 --min-requests 16 --profile   # py-spy of the replica
    python -m benchmarks.rerank_peers --docs 100 --concurrency 1,4,16 --min-requests 16   # full-size requests

Same model (a MiniLM-L6 sequence classifier: ``--model``, default the speed model built from
the packaged all-MiniLM-L6-v2 weights), same pairs (SciFact test queries with their BM25
top-``--docs`` documents, so lengths vary naturally), same max_length (512), same machine, one run:

* ``CrossEncoder.predict``: sentence-transformers in this process, all pairs of the workload in
  one call (``batch_size=32``, its default): the library's best throughput;
* ``serve_app Reranker (in process)``: our core (``Reranker.rerank_many``, length-sorted
  token-budget batches) on the same pairs, without any serving: separates compute from serving;
* ``infinity``: the infinity-emb server (``infinity_emb v2 --engine torch``), run from its own
  virtualenv (``--infinity-venv``; it pins transformers 4.x), driven by N concurrent clients;
* ``serve_app /rerank``: our Ray Serve application (one CrossEncoderReranker replica with all the
  machine's cores, ``@serve.batch`` cross-request batching), driven by N concurrent clients.

``--runtime`` runs every system on the same runtime and precision, each with its own best tool
for it available here (:data:`PEER_SETTINGS`): torch float32 / bfloat16 for all three; ONNX
Runtime float32 / int8 for serve_app (``backend: onnx``, ``quantize``) and infinity (its
``optimum`` engine on an ONNX export made with optimum in infinity's venv, quantised with
optimum's ``ORTQuantizer`` for int8); OpenVINO for serve_app only. A peer without a way to
run a setting here is left out of that run, with the reason in the summary.

Each client sends one request (a query and its documents) at a time (closed loop); a level
sends ``max(N, --min-requests)`` requests, bounded by ``--max-seconds``. pairs/s is documents
scored per second over the level's span; latency is per request. Each repeat runs every system
once (in alternating order across repeats, so slow drifts of a shared machine hit them alike);
medians and spread over the repeats are reported. ``--profile`` records py-spy samples of the
reranker replica at the highest concurrency and lists where its time goes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks.common import pyspy_record, summarize_profile  # noqa: F401 - shared with other benchmarks (tests import them from here too)
from benchmarks.common import DEFAULT_CACHE, NO_DRIFT_TOLERANCE, RERANKER_RUNTIMES, BenchRun, base_parser, bm25_candidates, fmt_spread, load_scifact, machine_cpu_seconds, md_table, summarize, target_line
from benchmarks.loadgen import closed_loop, wait_ready
from benchmarks.serving import add_serve_mode_args, cpu_seconds, find_replica_pid, free_port, handle_call, proc_stat, serve_mode, serve_pids, serve_stack

SERVED_NAME = "minilm-ce"

#: What each peer runs for a --runtime (None: not available on this machine, with why).
PEER_SETTINGS: dict[str, dict[str, Any]] = {
    "torch-float32": {"ce": {"dtype": "float32"}, "infinity": {"engine": "torch", "dtype": "float32"}},
    "torch-bfloat16": {"ce": {"dtype": "bfloat16"}, "infinity": {"engine": "torch", "dtype": "bfloat16"}},
    "onnx-float32": {"ce": None, "infinity": {"engine": "optimum", "quantize": False}},
    "onnx-int8": {"ce": None, "infinity": {"engine": "optimum", "quantize": True}},
    "openvino-float32": {"ce": None, "infinity": None},
    "openvino-bfloat16": {"ce": None, "infinity": None},
}
WHY_NOT = {
    "ce": "CrossEncoder.predict's ONNX and OpenVINO backends need optimum-onnx (transformers < 4.58) or optimum-intel (it replaces torch 2.13+cpu by a CUDA torch 2.14), neither installable beside this project's transformers 5",
    "infinity": "infinity 0.0.78 has no OpenVINO engine (its engines: torch, optimum = ONNX Runtime, ctranslate2 = embeddings only, neuron)",
}
#: Exports infinity's optimum engine runs: optimum's own exporter and quantiser, in infinity's venv.
INFINITY_EXPORT = """
import sys
from pathlib import Path
from optimum.onnxruntime import ORTModelForSequenceClassification, ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig
from transformers import AutoTokenizer
src, out, quantize = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
ORTModelForSequenceClassification.from_pretrained(src, export=True).save_pretrained(out)
AutoTokenizer.from_pretrained(src).save_pretrained(out)
if quantize:
    ORTQuantizer.from_pretrained(out).quantize(save_dir=out, quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False))
    (out / "model.onnx").unlink()  # infinity then runs the quantised file
"""


def infinity_onnx_model(venv: Path, model_dir: Path, quantize: bool, cache: Path) -> Path:
    """An ONNX export of ``model_dir`` for infinity's optimum engine (made once, cached)."""
    out = cache / f"{model_dir.name}-infinity-onnx{'-int8' if quantize else ''}"
    if any(out.glob("*.onnx")):
        return out
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run([str(venv / "bin" / "python"), "-c", INFINITY_EXPORT, str(model_dir), str(out), "1" if quantize else "0"], check=True, env=env)
    return out


# --------------------------------------------------------------------------- infinity


class InfinityServer:
    """infinity_emb v2 in its own virtualenv, on 127.0.0.1; records why it failed when it does."""

    def __init__(self, venv: Path, model_dir: Path, port: int, log_path: Path, batch_size: int | None, dtype: str = "float32", engine: str = "torch") -> None:
        self.cmd = [str(venv / "bin" / "infinity_emb"), "v2", "--model-id", str(model_dir), "--served-model-name", SERVED_NAME, "--engine", engine, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--no-model-warmup"]
        if batch_size:
            self.cmd += ["--batch-size", str(batch_size)]
        if engine == "torch" and dtype != "float32":  # float32 is what infinity's default (auto) gives on a CPU
            self.cmd += ["--dtype", dtype]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None
        self.version: str | None = None

    def start(self, timeout_s: float) -> bool:
        exe = Path(self.cmd[0])
        if not exe.is_file():
            self.error = f"{exe} not found: create the venv (python3 -m venv DIR; DIR/bin/pip install torch==2.13.0 'infinity-emb[torch,server]') or pass --infinity-venv"
            return False
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
        env.pop("PYTHONPATH", None)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_ready(self.url + "/models", timeout_s=timeout_s, alive=lambda: self.proc is not None and self.proc.poll() is None)
        except TimeoutError as exc:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            self.error = f"{exc}; exit code {self.proc.poll()}; log tail:\n{tail}"
            self.stop()
            return False
        out = subprocess.run([str(exe.parent / "python"), "-c", "import importlib.metadata as m; print(m.version('infinity-emb'), m.version('transformers'), m.version('torch'))"], capture_output=True, text=True)
        self.version = out.stdout.strip()
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


# --------------------------------------------------------------------------- py-spy








# --------------------------------------------------------------------------- systems


def in_process_ce(model_dir: Path, max_length: int, batch_size: int, dtype: str = "float32") -> Callable[[list[tuple[str, str]]], np.ndarray]:
    import torch
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(model_dir), device="cpu", max_length=max_length, model_kwargs={"dtype": getattr(torch, dtype)})
    return lambda pairs: np.asarray(ce.predict(pairs, batch_size=batch_size, show_progress_bar=False), dtype=np.float32)


def in_process_ours(model_dir: Path, max_length: int, runtime: dict[str, Any], runtime_dir: Path) -> tuple[Callable[[list[tuple[str, list[str]]]], list[np.ndarray]], dict[str, Any]]:
    """Our Reranker on ``runtime`` (reranker settings), and what load_scorer reports of it."""
    from serve_app.config import CrossEncoderConfig
    from serve_app.rerank import Reranker
    from serve_app.rerank.reranker import RerankRequest

    cfg = CrossEncoderConfig(model=str(model_dir), max_length=max_length, device="cpu", activation="sigmoid", runtime_dir=str(runtime_dir), drift_tolerance=NO_DRIFT_TOLERANCE, **runtime)
    rr = Reranker.from_config(cfg)
    return (lambda reqs: rr.rerank_many([RerankRequest(q, d) for q, d in reqs])), rr.scorer.describe()


def ensure_bm25_demo_index(path: Path) -> Path:
    """A BM25-only index of the demo corpus: the /rerank benchmark needs the app, not its retrieval."""
    from serve_app.config import BM25Config, ChunkingConfig
    from serve_app.corpus import read_corpus_source
    from serve_app.index import build_index, index_is_current

    if not index_is_current(path):
        build_index(read_corpus_source("builtin:demo").corpus, path, bm25=BM25Config(), dense=None, chunking=ChunkingConfig(), show_progress=False)
    return path


def level_bodies(requests: list[tuple[str, list[str]]], n: int, min_requests: int, model_field: str | None) -> list[dict[str, Any]]:
    count = max(n, min_requests)
    out = []
    for i in range(count):
        q, docs = requests[i % len(requests)]
        body: dict[str, Any] = {"query": q, "documents": docs, "return_documents": False}
        if model_field:
            body["model"] = model_field
        out.append(body)
    return out


def by_process_after(pids: dict[str, int], before: dict[str, float]) -> dict[str, float]:
    """CPU-seconds each process of ``pids`` used since ``before``."""
    return {k: cpu_seconds({k: v}) - before.get(k, 0.0) for k, v in pids.items()}


def run_level(name: str, url: str, bodies: list[dict[str, Any]], n: int, max_seconds: float, server_pid: int | None = None, all_pids: dict[str, int] | None = None) -> dict[str, Any]:
    """One closed-loop level; with ``server_pid``, also the CPU cores that process used and its nice
    value; with ``all_pids`` (every process that serves a request), the pairs scored per CPU-second."""
    before = proc_stat(server_pid) if server_pid else None
    pids = all_pids or ({"server": server_pid} if server_pid else {})
    by_process0 = {k: cpu_seconds({k: v}) for k, v in pids.items()}
    cpu0 = sum(by_process0.values())  # the same reading, not a second one a moment later
    machine0 = machine_cpu_seconds()
    t0 = time.perf_counter()
    res = closed_loop(url, bodies, n, max_seconds=max_seconds, timeout_s=max_seconds + 600, units=lambda b: len(b["documents"]))
    s = res.summary()
    if before is not None and server_pid:
        after = proc_stat(server_pid)
        s["server_cores_used"] = (after[0] - before[0]) / (time.perf_counter() - t0)
        s["server_nice"] = after[1]
    if pids:
        s["units_per_cpu_s"] = s["units"] / max(cpu_seconds(pids) - cpu0, 1e-9)
        # CPU-seconds per 1,000 pairs of each serving process (the proxy, the ingress, the replica
        # that runs the model) and of the whole machine: where the serving's extra work goes
        role = lambda key: key.rsplit(":", 1)[0]  # noqa: E731
        by_role: dict[str, float] = {}
        for key, cpu in by_process_after(pids, by_process0).items():
            by_role[role(key)] = by_role.get(role(key), 0.0) + cpu
        s["cpu_s_per_1000_pairs"] = {k: 1000 * v / max(s["units"], 1) for k, v in by_role.items()}
        s["cpu_s_per_1000_pairs"]["machine"] = 1000 * (machine_cpu_seconds() - machine0) / max(s["units"], 1)
    print(f"  {name} N={n}: {s['units_per_s']:.1f} pairs/s ({s.get('units_per_cpu_s', float('nan')):.2f} per CPU-s), p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, {s['ok']}/{s['requests']} ok"
          + (f", server used {s['server_cores_used']:.2f} cores (nice {s['server_nice']})" if "server_cores_used" in s else "") + (f" errors {s['error_examples']}" if s["errors"] else ""))
    return s


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.common import speed_model_dir

    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--scifact", default=None, help="SciFact BEIR directory")
    p.add_argument("--model", default=None, help="cross-encoder directory (default: the MiniLM-L6 speed model, $BENCH_CACHE/minilm-ce)")
    p.add_argument("--docs", type=int, default=10, help="BM25 documents per request (the issue's full size is 100)")
    p.add_argument("--concurrency", default="1,4,16,64", help="client counts N")
    p.add_argument("--min-requests", type=int, default=8, help="requests per level at least (a level sends max(N, this))")
    p.add_argument("--max-seconds", type=float, default=240, help="a level stops sending new requests after this")
    p.add_argument("--max-length", type=int, default=512, help="tokens per pair, for every system")
    p.add_argument("--ce-batch-size", type=int, default=32, help="CrossEncoder.predict batch_size")
    p.add_argument("--infinity-venv", default=str(DEFAULT_CACHE / "infinity-venv"), help="virtualenv with infinity-emb")
    p.add_argument("--infinity-batch-size", type=int, default=None, help="infinity --batch-size (default: infinity's own, 32)")
    p.add_argument("--skip-infinity", action="store_true")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--max-batch-size", type=int, default=16, help="our reranker's @serve.batch max_batch_size (requests per call)")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01, help="our reranker's batch_wait_timeout_s")
    p.add_argument("--replica-cpus", type=float, default=float(os.cpu_count() or 2), help="num_cpus (and torch threads) of our reranker replica")
    p.add_argument("--ray-worker-niceness", type=int, default=0, help="nice value of Ray's worker processes (Ray's own default is 15; -1 keeps it)")
    p.add_argument("--profile", action="store_true", help="py-spy the reranker replica at the highest concurrency")
    p.add_argument("--runtime", choices=list(RERANKER_RUNTIMES), default="torch-float32", help="runtime and precision of every system (see PEER_SETTINGS; bfloat16 is fast on CPUs with AVX512-BF16 or AMX, see cpu_runtimes)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="same as --runtime torch-DTYPE (kept for earlier commands)")
    add_serve_mode_args(p)
    p.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for a server to start")
    p.set_defaults(repeats=2)
    args = p.parse_args(argv)
    if args.dtype:
        args.runtime = f"torch-{args.dtype}"
    runtime, peers = RERANKER_RUNTIMES[args.runtime], PEER_SETTINGS[args.runtime]
    mode = serve_mode(p, args)
    run = BenchRun("rerank_peers", args, args.out)
    levels = [int(x) for x in args.concurrency.split(",")]

    model_dir = speed_model_dir(args.model)
    n_queries = max(max(levels), args.min_requests)
    requests = bm25_candidates(load_scifact(args.scifact), n_queries, args.docs)
    all_pairs = [(q, d) for q, docs in requests for d in docs]
    # The in-process systems score the first requests (their throughput does not depend on the count).
    inproc = requests[: max(args.min_requests, args.max_batch_size)]
    inproc_pairs = [(q, d) for q, docs in inproc for d in docs]
    print(f"{len(requests)} requests x {args.docs} docs = {len(all_pairs)} pairs ({len(inproc_pairs)} in process); model {model_dir}")

    results: dict[str, Any] = {"model": str(model_dir), "runtime": args.runtime, "docs_per_request": args.docs, "pairs": len(all_pairs), "levels": levels, "systems": {}, "not_run": {}}
    runtime_dir = DEFAULT_CACHE / "bench" / f"{model_dir.name}-runtime"
    ce = in_process_ce(model_dir, args.max_length, args.ce_batch_size, peers["ce"]["dtype"]) if peers["ce"] else None
    if ce is None:
        results["not_run"]["CrossEncoder.predict"] = WHY_NOT["ce"]
    reference = ce or in_process_ce(model_dir, args.max_length, args.ce_batch_size, "float32")  # scores to agree with
    ours_local, ours_runtime = in_process_ours(model_dir, args.max_length, runtime, runtime_dir)
    results["serve_app_runtime"] = ours_runtime
    reference(all_pairs[:8])
    ours_local(requests[:1])

    infinity: InfinityServer | None = None
    if not args.skip_infinity and peers["infinity"] is None:
        results["not_run"]["infinity"] = WHY_NOT["infinity"]
    elif not args.skip_infinity:
        inf = peers["infinity"]
        inf_model = model_dir if inf["engine"] == "torch" else infinity_onnx_model(Path(args.infinity_venv), model_dir, inf["quantize"], DEFAULT_CACHE / "bench")
        infinity = InfinityServer(Path(args.infinity_venv), inf_model, free_port(), run.raw / "infinity.log", args.infinity_batch_size, inf.get("dtype", "float32"), inf["engine"])
        print("starting infinity:", " ".join(infinity.cmd))
        if not infinity.start(args.start_timeout):
            print("infinity failed:", infinity.error)
            results["infinity_error"] = {"command": " ".join(infinity.cmd), "error": infinity.error}
            infinity = None
        else:
            results["infinity_version"] = infinity.version

    app_args = {
        "index_dir": str(DEFAULT_CACHE / "bench" / "demo-bm25-index"),
        "build_index_if_missing": False,
        "retrievers": ["bm25"],
        "reranker": {"model": str(model_dir), "max_length": args.max_length, "device": "cpu", "activation": "sigmoid", "runtime_dir": str(runtime_dir), "drift_tolerance": NO_DRIFT_TOLERANCE, **runtime},
        "batching": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
        "timeouts": {"rerank_timeout_s": 600, "request_timeout_s": 600},
        "limits": {"max_document_chars": 1_000_000},
    }
    threads = str(max(1, int(args.replica_cpus)))
    deployments = {
        "SearchIngress": {"num_replicas": 1, "max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.5}},
        "BM25Retriever": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
        "CrossEncoderReranker": {
            "num_replicas": 1,
            "max_ongoing_requests": max(64, max(levels)),
            "ray_actor_options": {"num_cpus": args.replica_cpus, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}},
            "user_config": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s},
        },
    }
    series: dict[str, dict[str, list[dict[str, Any]]]] = {"ce": {"all": []}, "local": {"all": []}, "infinity": {str(n): [] for n in levels}, "serve": {str(n): [] for n in levels}}
    agreement: dict[str, float] = {}
    profile: dict[str, Any] | None = None

    def stack():
        if args.skip_serve:
            import contextlib

            return contextlib.nullcontext(None)
        ensure_bm25_demo_index(Path(app_args["index_dir"]))
        return serve_stack(app_args, deployments, num_cpus=max(4.0, args.replica_cpus + 1), timeout_s=args.start_timeout, worker_niceness=None if args.ray_worker_niceness < 0 else args.ray_worker_niceness, throughput_optimized=args.throughput_optimized, via=args.via)

    try:
        with stack() as base:
            serve_url = f"{base}/rerank" if base else None
            if serve_url:  # warm-up and a correctness check against the library
                import httpx

                q, docs = requests[0]
                r = httpx.post(serve_url, json={"query": q, "documents": docs}, timeout=600).json()
                ours = np.zeros(len(docs))
                for item in r["results"]:
                    ours[item["index"]] = item["relevance_score"]
                agreement["serve_vs_crossencoder_float32_max_abs_diff" if ce is None else "serve_vs_crossencoder_max_abs_diff"] = float(np.max(np.abs(ours - reference([(q, d) for d in docs]))))
            if infinity is not None:
                import httpx

                q, docs = requests[0]
                r = httpx.post(infinity.url + "/rerank", json={"query": q, "documents": docs, "model": SERVED_NAME}, timeout=600).json()
                theirs = np.zeros(len(docs))
                for item in r["results"]:
                    theirs[item["index"]] = item["relevance_score"]
                agreement["infinity_vs_crossencoder_float32_max_abs_diff" if ce is None else "infinity_vs_crossencoder_max_abs_diff"] = float(np.max(np.abs(theirs - reference([(q, d) for d in docs]))))
            print("score agreement:", agreement)

            for rep in range(args.repeats):
                order = ["ce", "local", "infinity", "serve"]
                if rep % 2:
                    order.reverse()
                print(f"repeat {rep + 1}/{args.repeats}: {order}")
                for system in order:
                    if system == "ce" and ce is not None:
                        c0 = time.process_time()
                        t = time.perf_counter()
                        ce(inproc_pairs)
                        dt = time.perf_counter() - t
                        series["ce"]["all"].append({"units_per_s": len(inproc_pairs) / dt, "units_per_cpu_s": len(inproc_pairs) / (time.process_time() - c0)})
                        print(f"  CrossEncoder.predict: {len(inproc_pairs) / dt:.1f} pairs/s")
                    elif system == "local":
                        c0 = time.process_time()
                        t = time.perf_counter()
                        for s in range(0, len(inproc), args.max_batch_size):
                            ours_local(inproc[s : s + args.max_batch_size])
                        dt = time.perf_counter() - t
                        series["local"]["all"].append({"units_per_s": len(inproc_pairs) / dt, "units_per_cpu_s": len(inproc_pairs) / (time.process_time() - c0)})
                        print(f"  serve_app Reranker in process: {len(inproc_pairs) / dt:.1f} pairs/s")
                    elif system == "infinity" and infinity is not None:
                        for n in levels:
                            series["infinity"][str(n)].append(run_level("infinity", infinity.url + "/rerank", level_bodies(requests, n, args.min_requests, SERVED_NAME), n, args.max_seconds, infinity.proc.pid if infinity.proc else None))
                    elif system == "serve" and serve_url:
                        for n in levels:
                            prof_proc = None
                            pid = find_replica_pid("CrossEncoderReranker")
                            if args.profile and rep == 0 and n == max(levels):
                                if pid:
                                    prof_path = run.raw / "reranker_replica.pyspy.txt"
                                    prof_proc = pyspy_record(pid, int(min(args.max_seconds, 60)), prof_path)
                            seen = len(handle_call("CrossEncoderReranker", "stats")["batch_sizes"])
                            lvl = run_level("serve_app", serve_url, level_bodies(requests, n, args.min_requests, None), n, args.max_seconds, pid, serve_pids())
                            sizes = handle_call("CrossEncoderReranker", "stats")["batch_sizes"][seen:]
                            lvl["rerank_calls"] = len(sizes)
                            lvl["requests_per_rerank_call"] = float(np.mean(sizes)) if sizes else float("nan")
                            print(f"    reranker calls: {len(sizes)}, requests per call {sizes}")
                            series["serve"][str(n)].append(lvl)
                            if prof_proc is not None:
                                prof_proc.wait(120)
                                if prof_path.is_file():
                                    profile = summarize_profile(prof_path)
    finally:
        if infinity is not None:
            infinity.stop()

    # ---------------------------------------------------------------- summary
    def agg(runs: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"pairs_per_s": summarize(r["units_per_s"] for r in runs), "runs": runs}
        for key in ("p50_ms", "p99_ms", "server_cores_used", "units_per_cpu_s", "requests_per_rerank_call"):
            if runs and key in runs[0]:
                out[key] = summarize(r[key] for r in runs)
        if runs and "server_nice" in runs[0]:
            out["server_nice"] = runs[0]["server_nice"]
        return out

    systems = results["systems"]
    if series["ce"]["all"]:
        systems["CrossEncoder.predict (in process)"] = {"all": agg(series["ce"]["all"])}
    systems["serve_app Reranker (in process)"] = {"all": agg(series["local"]["all"])}
    if infinity is not None or series["infinity"][str(levels[0])]:
        systems["infinity /rerank"] = {str(n): agg(v) for n, v in series["infinity"].items() if v}
    if series["serve"][str(levels[0])]:
        systems["serve_app /rerank"] = {str(n): agg(v) for n, v in series["serve"].items() if v}
    results["score_agreement"] = agreement
    if profile:
        results["profile_reranker_replica"] = profile

    ce_row = systems.get("CrossEncoder.predict (in process)")
    ce_rate = ce_row["all"]["pairs_per_s"]["median"] if ce_row else float("nan")
    targets = []
    for n in levels:
        ours = systems.get("serve_app /rerank", {}).get(str(n))
        inf = systems.get("infinity /rerank", {}).get(str(n))
        if ours:
            if ce_row:
                ours["vs_crossencoder"] = ours["pairs_per_s"]["median"] / ce_rate
            if inf:
                ours["vs_infinity"] = ours["pairs_per_s"]["median"] / inf["pairs_per_s"]["median"]
        if n >= 16:
            targets.append(target_line(f"serve_app /rerank vs CrossEncoder.predict pairs/s, N={n}", ours.get("vs_crossencoder") if ours else None, 1.0))
            targets.append(target_line(f"serve_app /rerank vs infinity pairs/s, N={n}", ours.get("vs_infinity") if ours else None, 1.2))
            ce_cpu = ce_row["all"].get("units_per_cpu_s", {}).get("median") if ce_row else None
            if ours and "units_per_cpu_s" in ours and ce_cpu:
                ours["cpu_efficiency_vs_crossencoder"] = ours["units_per_cpu_s"]["median"] / ce_cpu
                if inf and "units_per_cpu_s" in inf:
                    ours["cpu_efficiency_vs_infinity"] = ours["units_per_cpu_s"]["median"] / inf["units_per_cpu_s"]["median"]

    rows = []
    for name, by_level in systems.items():
        for lvl, r in by_level.items():
            rows.append((
                name, "-" if lvl == "all" else lvl, fmt_spread(r["pairs_per_s"]), f"{r['pairs_per_s']['median'] / ce_rate:.2f}x" if ce_row else "-",
                fmt_spread(r["p50_ms"], 0) if "p50_ms" in r else "-", fmt_spread(r["p99_ms"], 0) if "p99_ms" in r else "-",
                f"{r['server_cores_used']['median']:.2f} (nice {r.get('server_nice')})" if "server_cores_used" in r else "-",
                fmt_spread(r["units_per_cpu_s"], 2) if "units_per_cpu_s" in r else "-",
                fmt_spread(r["requests_per_rerank_call"], 1) if "requests_per_rerank_call" in r else "-",
            ))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, by_level in systems.items():
        if "all" in by_level:
            ax[0].axhline(by_level["all"]["pairs_per_s"]["median"], ls="--", lw=1, label=name, color="grey" if "CrossEncoder" in name else "tab:green")
            continue
        xs = [int(n) for n in by_level]
        med = [by_level[str(n)]["pairs_per_s"]["median"] for n in xs]
        lo = [by_level[str(n)]["pairs_per_s"]["min"] for n in xs]
        hi = [by_level[str(n)]["pairs_per_s"]["max"] for n in xs]
        color = "tab:orange" if name.startswith("serve_app") else "tab:blue"
        ax[0].errorbar(xs, med, yerr=[np.subtract(med, lo), np.subtract(hi, med)], marker="o", capsize=3, label=name, color=color)
        ax[1].plot(xs, [by_level[str(n)]["p50_ms"]["median"] for n in xs], marker="o", label=f"{name} p50", color=color)
        ax[1].plot(xs, [by_level[str(n)]["p99_ms"]["median"] for n in xs], marker="x", ls=":", label=f"{name} p99", color=color)
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent clients N")
        a.legend(fontsize=7)
    ax[0].set_ylabel("pairs/s")
    ax[1].set_ylabel("latency per request (ms)")
    ax[1].set_yscale("log")
    fig.suptitle(f"Reranking {args.docs} SciFact BM25 documents per request, MiniLM-L6 cross-encoder, max_length {args.max_length}")
    run.save_figure(fig, "rerank_peers.png")

    results["serve_mode"] = mode
    md = run.header_markdown("Cross-encoder serving throughput vs peers")
    md += (
        f"Model: MiniLM-L6 sequence classifier ({model_dir}), max_length {args.max_length}, CPU, runtime {args.runtime} in every system that offers it "
        f"(serve_app: {ours_runtime['backend']} {ours_runtime['dtype']}{' int8' if ours_runtime['quantize'] == 'int8' else ''}; infinity: {' '.join(infinity.cmd[infinity.cmd.index('--engine'):infinity.cmd.index('--engine') + 2]) if infinity else 'not run'}). Workload: {len(requests)} SciFact test queries, "
        f"each with its BM25 top-{args.docs} documents ({len(all_pairs)} pairs); a level with N clients sends max(N, {args.min_requests}) requests; "
        f"the in-process rows score the first {len(inproc)} requests ({len(inproc_pairs)} pairs; ours {args.max_batch_size} requests per rerank_many call). "
        f"serve_app: one CrossEncoderReranker replica (num_cpus {args.replica_cpus}, {threads} torch threads), @serve.batch max_batch_size {args.max_batch_size}, "
        f"batch_wait_timeout_s {args.batch_wait_timeout_s}, Ray worker niceness {args.ray_worker_niceness if args.ray_worker_niceness >= 0 else '15 (Ray default)'}, {mode}. infinity: {results.get('infinity_version') or 'not run'} (infinity-emb, transformers, torch), default batch size"
        f"{'' if not args.infinity_batch_size else ' ' + str(args.infinity_batch_size)}. "
        f"pairs/s and latencies: median [min-max] over {args.repeats} repeats.\n\n"
    )
    md += md_table(["system", "N", "pairs/s", "vs CrossEncoder.predict", "p50 ms", "p99 ms", "server process CPU cores used", "pairs per CPU-second", "requests per reranker call"], rows)
    md += (
        "\npairs per CPU-second: pairs scored divided by the CPU time of every process doing the work (this process for the in-process rows; "
        "the infinity process; for serve_app the HTTP proxy and every replica of the application), a figure that does not depend on how much of "
        "the machine other processes took during the run.\n"
    )
    cpu_rows = [(n, f"{r['cpu_efficiency_vs_crossencoder']:.2f}x", f"{r['cpu_efficiency_vs_infinity']:.2f}x" if "cpu_efficiency_vs_infinity" in r else "-")
                for n, r in systems.get("serve_app /rerank", {}).items() if "cpu_efficiency_vs_crossencoder" in r]
    if cpu_rows:
        md += "\nCPU-time view (a diagnostic, not the target): serve_app /rerank pairs per CPU-second relative to\n\n"
        md += md_table(["N", "CrossEncoder.predict", "infinity"], cpu_rows)
    cpu_split = []
    for n in levels:
        runs = [lvl["cpu_s_per_1000_pairs"] for lvl in series["serve"][str(n)] if "cpu_s_per_1000_pairs" in lvl]
        if runs:
            roles = sorted({k for r in runs for k in r})
            cpu_split.append((n, "; ".join(f"{k} {np.median([r.get(k, 0.0) for r in runs]):.1f}" for k in roles)))
    if cpu_split:
        results["cpu_s_per_1000_pairs_by_process"] = {str(n): text for n, text in cpu_split}
        ce_cpu = ce_row["all"].get("units_per_cpu_s") if ce_row else None
        md += "\nCPU-seconds per 1,000 pairs by process, serve_app /rerank (median over repeats; `machine`: every process on the machine, the load generator and Ray's own included)"
        md += (f"; CrossEncoder.predict in process: {1000 / ce_cpu['median']:.1f}" if ce_cpu else "") + ":\n\n"
        md += md_table(["N", "CPU-s per 1,000 pairs"], cpu_split)
    if agreement:
        md += "\nScore agreement with CrossEncoder.predict (sigmoid scores, first request): " + ", ".join(f"{k} {v:.2e}" for k, v in agreement.items()) + "\n"
    if ours_runtime.get("drift"):
        d = ours_runtime["drift"]
        md += f"\nserve_app's load-time drift check ({d['runtime']} vs torch float32 on its {d['pairs']}-pair probe): max |diff| {d['max_abs_diff']:.2e}, Kendall tau {d['kendall_tau']:.3f}, top-1 agreement {d['top1_agreement']:.2f}.\n"
    for peer, why in results["not_run"].items():
        md += f"\n**{peer} not run at {args.runtime}**: {why}.\n"
    if "infinity_error" in results:
        md += f"\n**infinity could not be run**: `{results['infinity_error']['command']}`\n\n```\n{results['infinity_error']['error']}\n```\n"
    if profile:
        md += f"\n## py-spy profile of the reranker replica (N={max(levels)}, {profile['samples']} samples)\n\n"
        md += md_table(["where", "share of samples"], [(k, f"{v:.1%}") for k, v in profile["buckets"].items()])
        md += "\nTop leaf frames:\n\n" + md_table(["frame", "share"], [(f"`{k[:110]}`", f"{v:.1%}") for k, v in profile["top_leaves"]])
    run.write(results, md, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
