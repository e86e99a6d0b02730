"""``serve-app index`` (build an index directory) and ``serve-app eval`` (BEIR evaluation).

Examples::

    serve-app index --corpus data/corpus.jsonl.gz --out /tmp/idx
    serve-app index --corpus data/corpus.jsonl.gz --out /tmp/idx --ray --ray-workers 4 --shards bm25=2
    serve-app eval --dataset shared/datasets/scifact --pipeline bm25,dense,hybrid
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import ValidationError

from serve_app.config import BM25Config, ChunkingConfig, RerankerModelConfig, DenseConfig, FunnelLimits, FusionConfig
from serve_app.errors import UserFacingError
from serve_app.types import Hit

logger = logging.getLogger(__name__)

PIPELINES: dict[str, tuple[tuple[str, ...], bool]] = {
    # name -> (retrievers, rerank)
    "bm25": (("bm25",), False),
    "dense": (("dense",), False),
    "hybrid": (("bm25", "dense"), False),
    "hybrid+rerank": (("bm25", "dense"), True),
}


class UsageError(UserFacingError, ValueError):
    """A command-line option or option combination that cannot work; the message says which."""


def _config(model: Callable[..., Any], what: str, /, **kwargs: Any) -> Any:
    """Build a pydantic config, turning validation errors into one-line UsageErrors."""
    try:
        return model(**kwargs)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or what}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"invalid {what} options: {problems}") from None


def default_work_dir() -> Path:
    """``$XDG_CACHE_HOME/serve_app`` (default ``~/.cache/serve_app``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "serve_app"


# --------------------------------------------------------------------------- index


def _add_dense_options(p: argparse.ArgumentParser) -> None:
    d = DenseConfig()
    p.add_argument("--dense-model", default=d.model, help=f"bi-encoder: Hub id or local directory (default: {d.model})")
    p.add_argument("--dense-batch-size", type=int, default=d.batch_size, help=f"texts per encoder forward pass (default: {d.batch_size})")
    p.add_argument("--dense-max-length", type=int, default=d.max_length, help=f"tokens per text for the bi-encoder (default: {d.max_length})")
    p.add_argument("--faiss-factory", default=d.factory, help=f"FAISS index factory string, e.g. Flat, HNSW32 (default: {d.factory})")
    p.add_argument("--device", default=None, help="torch device for the models (default: CUDA when available, else CPU)")


def _dense_config(args: argparse.Namespace) -> DenseConfig:
    return _config(
        DenseConfig, "dense", model=args.dense_model, batch_size=args.dense_batch_size, max_length=args.dense_max_length,
        factory=args.faiss_factory, device=args.device,
    )


def _chunking_config(args: argparse.Namespace) -> ChunkingConfig:
    if args.chunk_size is None and args.chunk_stride is None:
        return ChunkingConfig()
    d = ChunkingConfig()
    size = args.chunk_size if args.chunk_size is not None else d.size
    stride = args.chunk_stride if args.chunk_stride is not None else min(d.stride, size)
    return _config(ChunkingConfig, "chunking", enabled=True, size=size, stride=stride)


def _left_out(skipped: Sequence[Any], empty: Sequence[str]) -> str:
    """What a corpus read left out, for the command's summary ("" when nothing)."""
    parts = [f"{len(skipped)} bad line(s) skipped"] if skipped else []
    if empty:
        parts.append(f"{len(empty)} empty document(s) left out (no title and no text: {', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''})")
    return "; ".join(parts)


def _summary(manifest: Any, out: Path, seconds: float, left_out: str = "") -> str:
    lines = [f"index written to {out}", f"  documents: {manifest.corpus.num_documents}, chunks: {manifest.corpus.num_chunks}"]
    if left_out:
        lines.append(f"  corpus: {left_out}")
    if manifest.chunking.enabled:
        lines.append(f"  chunking: {manifest.chunking.size} words, stride {manifest.chunking.stride}")
    if manifest.bm25:
        b = manifest.bm25
        lines.append(f"  bm25: engine {b.get('engine')}, method {b.get('method')}, k1={b.get('k1')}, b={b.get('b')}, vocabulary {b.get('vocab_size')}")
    if manifest.dense:
        d = manifest.dense
        lines.append(f"  dense: model {d.get('model')}, dim {d.get('dim')}, FAISS {d.get('factory')}, {d.get('num_vectors')} vectors")
    size = sum(f.size for f in manifest.files.values())
    lines.append(f"  size: {size / 1e6:.1f} MB, built in {seconds:.1f} s")
    return "\n".join(lines)


def cmd_index(args: argparse.Namespace) -> int:
    """Build an index directory from a corpus file or a BEIR dataset directory."""
    from serve_app.corpus import read_corpus_source
    from serve_app.index import build_index

    if args.no_bm25 and args.no_dense:
        raise UsageError("--no-bm25 and --no-dense together leave nothing to index")
    bm25 = None if args.no_bm25 else _config(BM25Config, "bm25", **{k: v for k, v in (("engine", args.bm25_engine), ("method", args.method), ("k1", args.k1), ("b", args.b)) if v is not None})
    dense = None if args.no_dense else _dense_config(args)
    chunking = _chunking_config(args)
    shards = _shards(args.shards)
    options = ray_options(args)
    if options is not None:
        from serve_app.index.ray_build import check_ray_buildable

        check_ray_buildable(bm25)  # before the corpus is read
        if args.shards_only:
            unsharded = [r for r, c in (("bm25", bm25), ("dense", dense)) if c is not None and shards.get(r, 1) < 2]
            if unsharded:
                raise UsageError(f"--shards-only writes every retriever as a shard set only: give --shards a count above 1 for {', '.join(unsharded)}")
    elif args.shards_only:
        raise UsageError("--shards-only applies to a Ray build: add --ray")
    on_error = "skip" if args.skip_bad_lines else "raise"
    start = time.perf_counter()
    if options is not None:
        from serve_app.index.ray_build import build_index_ray
        from serve_app.index.ray_shards import build_index_ray_shards_only

        if args.shards_only:  # the corpus is streamed, never loaded here
            manifest, report = build_index_ray_shards_only(args.corpus, args.out, bm25=bm25, dense=dense, chunking=chunking, shards=shards, options=options, on_error=on_error)
            skipped, empty = report.skipped, report.empty
        else:
            loaded = read_corpus_source(args.corpus, on_error=on_error)
            manifest, report = build_index_ray(loaded.corpus, args.out, bm25=bm25, dense=dense, chunking=chunking, shards=shards, options=options)
            skipped, empty = loaded.skipped, loaded.empty
        print(_summary(manifest, Path(args.out).absolute(), time.perf_counter() - start, _left_out(skipped, empty)))
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in report.stage_seconds.items())
        cpu = ", ".join(f"{k} {v:.1f} CPU-s" for k, v in report.worker_cpu_seconds.items())
        print(f"  ray: {report.workers} workers; {stages}; workers spent {cpu}")
        return 0
    loaded = read_corpus_source(args.corpus, on_error=on_error)
    manifest = build_index(loaded.corpus, args.out, bm25=bm25, dense=dense, chunking=chunking, shards=shards, show_progress=not args.quiet)
    print(_summary(manifest, Path(args.out).absolute(), time.perf_counter() - start, _left_out(loaded.skipped, loaded.empty)))
    return 0


def add_ray_options(parser: Any, what: str) -> None:
    """The ``--ray`` flags of a command that builds an index (``index``, ``merge``)."""
    r = parser.add_argument_group("distributed build (Ray Data)", f"tokenise, score BM25 postings and encode on a Ray cluster; {what} (docs/DEPLOYING.md)")
    r.add_argument("--ray", action="store_true", help="build on Ray: a local instance on 127.0.0.1, or the cluster at --address")
    r.add_argument("--address", default=None, help="Ray cluster to build on, e.g. auto or ray://head:10001 (default: a local instance)")
    r.add_argument("--ray-workers", type=int, default=None, help="encoder actors, and concurrent tokenising tasks (default: 2)")
    r.add_argument("--ray-cpus-per-worker", type=float, default=None, help="CPUs per encoder actor, also its torch threads (default: 1)")
    r.add_argument("--ray-gpus-per-worker", type=float, default=None, help="GPUs per encoder actor (default: 1 when the cluster has GPUs, else 0)")
    r.add_argument("--ray-batch-documents", type=int, default=None, help="documents per Ray Data batch (default: 8 x the dense batch size)")


def ray_options(args: argparse.Namespace) -> Any:
    """The :class:`~serve_app.index.ray_build.RayBuildOptions` of ``--ray`` and its flags, or
    None without ``--ray`` (a Ray flag without it is a usage error)."""
    ray_flags = [f for f, v in (("--address", args.address), ("--ray-workers", args.ray_workers), ("--ray-cpus-per-worker", args.ray_cpus_per_worker), ("--ray-gpus-per-worker", args.ray_gpus_per_worker), ("--ray-batch-documents", args.ray_batch_documents)) if v is not None]
    if not args.ray:
        if ray_flags:
            raise UsageError(f"{', '.join(ray_flags)} apply to a Ray build: add --ray")
        return None
    from serve_app.index.ray_build import RayBuildOptions

    try:
        return RayBuildOptions(
            address=args.address, workers=2 if args.ray_workers is None else args.ray_workers,
            cpus_per_worker=1.0 if args.ray_cpus_per_worker is None else args.ray_cpus_per_worker,
            gpus_per_worker=args.ray_gpus_per_worker, batch_documents=args.ray_batch_documents, show_progress=not args.quiet,
        )
    except ValueError as exc:
        raise UsageError(f"invalid Ray build options: {exc}") from None


def _shards(value: str | None) -> dict[str, int]:
    """``bm25=2,dense=3`` -> {"bm25": 2, "dense": 3}."""
    out: dict[str, int] = {}
    for part in (value or "").split(","):
        if not part.strip():
            continue
        name, _, count = part.partition("=")
        name = name.strip()
        if name not in ("bm25", "dense") or not count.strip().isdigit() or int(count) < 1:
            raise UsageError(f"--shards: expected RETRIEVER=N with RETRIEVER bm25 or dense and N >= 1, got {part.strip()!r}")
        if name in out:
            raise UsageError(f"--shards: {name} given twice")
        out[name] = int(count)
    return out


# --------------------------------------------------------------------------- eval


def _pipelines(values: Sequence[str]) -> list[str]:
    names: list[str] = []
    for value in values:
        for name in (v.strip() for v in value.split(",")):
            if name not in PIPELINES:
                raise UsageError(f"--pipeline: unknown pipeline {name!r}; choose from {', '.join(PIPELINES)}")
            if name not in names:
                names.append(name)
    return names


def _weights(value: str | None) -> dict[str, float] | None:
    if value is None:
        return None
    out: dict[str, float] = {}
    for part in value.split(","):
        name, sep, w = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(w)
        except ValueError:
            raise UsageError(f"--weights: expected NAME=WEIGHT[,NAME=WEIGHT], e.g. bm25=0.4,dense=0.6; got {value!r}") from None
    return out


class _MemoRetriever:
    """Remembers ``search_batch`` answers so several pipelines of one eval run share retrieval."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self._memo: dict[tuple[tuple[str, ...], int], list[list[Hit]]] = {}

    def search(self, query: str, k: int) -> list[Hit]:
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        key = (tuple(queries), k)
        if key not in self._memo:
            self._memo[key] = self.inner.search_batch(list(queries), k)
        return self._memo[key]


class _MemoReranker:
    """Remembers ``rerank_many`` scores so several rerank blends of one eval run score each pair once."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._memo: dict[tuple[str, tuple[str, ...], int | None], Any] = {}

    def rerank_many(self, requests: Sequence[Any]) -> list[Any]:
        keys = [(r.query, tuple(r.documents), r.max_tokens_per_doc) for r in requests]
        todo = {k: r for k, r in zip(keys, requests) if k not in self._memo}
        if todo:
            for k, scores in zip(todo, self.inner.rerank_many(list(todo.values()))):
                self._memo[k] = scores
        return [self._memo[k] for k in keys]


class _Metered:
    """Counts the documents a row sends to a reranker (scores reused from an earlier row
    included: the row's cost as a configuration) and the process CPU and wall seconds the calls
    take (eval runs its stages one after another, so the process's CPU time is the stage's;
    reused scores cost next to none, so only the first row that scores a pair pays for it)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.documents = 0
        self.cpu_s = 0.0
        self.wall_s = 0.0

    def rerank_many(self, requests: Sequence[Any]) -> list[Any]:
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            return self.inner.rerank_many(requests)
        finally:
            self.cpu_s += time.process_time() - c0
            self.wall_s += time.perf_counter() - w0
            self.documents += sum(len(r.documents) for r in requests)

    def snapshot(self) -> tuple[int, float, float]:
        return self.documents, self.cpu_s, self.wall_s


def _cascade_stages(values: Sequence[str], runtime: dict[str, Any], device: Any, blend: str = "none", max_length: int | None = None) -> list[tuple[Any, RerankerModelConfig]]:
    """``--cascade MODEL=TOP_M`` values as (CascadeStage, model config), named stage1, stage2, ...;
    ``max_length`` (``--cascade-max-length``) replaces the runtime's for these stages."""
    if max_length is not None:
        runtime = {**runtime, "max_length": max_length}
    from serve_app.config import CascadeStage

    out = []
    for i, value in enumerate(values, start=1):
        model, sep, depth = value.rpartition("=")
        if not sep or not model or not depth.isdigit() or int(depth) < 1:
            raise UsageError(f"--cascade {value!r}: expected MODEL=TOP_M with TOP_M >= 1 (e.g. /models/ce-2l=100)")
        cfg = _config(RerankerModelConfig, f"cascade stage {i}", model=model, device=device, **{k: v for k, v in runtime.items() if k != "kind"})
        out.append((_config(CascadeStage, f"cascade stage {i}", name=f"stage{i}", reranker=cfg, default_top_m=int(depth), max_top_m=int(depth), blend=blend), cfg))
    return out


def _depths(value: str) -> list[int]:
    """``--rerank-top-m`` values: one depth or several, comma-separated (each >= 1), in order."""
    out: list[int] = []
    for part in str(value).split(","):
        part = part.strip()
        if not part.lstrip("-").isdigit() or int(part) < 1:
            raise UsageError(f"--rerank-top-m must be >= 1 (or several, comma-separated), got {value!r}")
        if int(part) not in out:
            out.append(int(part))
    return out


def _blends(value: str) -> list[str]:
    out: list[str] = []
    for name in (v.strip() for v in value.split(",")):
        if name not in ("none", "rrf"):
            raise UsageError(f"--rerank-blend: unknown blend {name!r}; choose from none, rrf (comma-separated for several)")
        if name not in out:
            out.append(name)
    return out


def _open_index(args: argparse.Namespace, dataset: Any, needed: set[str], dense_cfg: DenseConfig) -> Any:
    """Load the evaluation index, building it first when it does not exist."""
    from serve_app.index import MANIFEST, build_index, load_index, read_manifest

    explicit = args.index is not None
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir()
    index_dir = Path(args.index) if explicit else work_dir / "indexes" / Path(args.dataset).resolve().name
    have: set[str] = set()
    if (index_dir / MANIFEST).is_file():
        manifest = read_manifest(index_dir)
        have = {n for n in ("bm25", "dense") if getattr(manifest, n) is not None}
        missing = needed - have
        if missing and explicit:
            raise UsageError(f"--index {index_dir} has no {' or '.join(sorted(missing))} retriever; rebuild it with `serve-app index` or drop --index")
        if missing:
            logger.info("cached index %s lacks %s: rebuilding it", index_dir, ", ".join(sorted(missing)))
    if not (index_dir / MANIFEST).is_file() or not needed <= have:
        build = needed | have
        print(f"building index {index_dir} ({', '.join(sorted(build))}) over {len(dataset.corpus)} documents")
        build_index(
            dataset.corpus, index_dir,
            bm25=BM25Config() if "bm25" in build else None,
            dense=dense_cfg if "dense" in build else None,
            chunking=ChunkingConfig(), show_progress=not args.quiet,
        )
    loaded = load_index(index_dir, expected_dense_model=dense_cfg.model if "dense" in needed else None, dense_config=dense_cfg if "dense" in needed else None, load_dense_encoder="dense" in needed)
    if loaded.corpus.ids != dataset.corpus.ids:
        raise UsageError(f"index {index_dir} was built over another corpus ({len(loaded.corpus)} documents) than {args.dataset} ({len(dataset.corpus)}); use another --index or --work-dir")
    print(f"index: {index_dir}")
    return loaded


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate pipelines on a BEIR dataset split; write metrics.json and metrics.md."""
    from serve_app.corpus import load_beir
    from serve_app.eval import DEFAULT_MEASURES, evaluate, fidelity, markdown_table, parse_measures, read_trec_run, run_from_results, write_report, write_trec_run
    from serve_app.pipeline import SearchPipeline

    started, load_start = datetime.now(timezone.utc).isoformat(timespec="seconds"), os.getloadavg()[0]
    pipelines = _pipelines(args.pipeline or ["hybrid"])
    measures = tuple(m.strip() for m in args.measures.split(",")) if args.measures else DEFAULT_MEASURES
    try:
        parse_measures(measures)
    except ValueError as exc:
        raise UsageError(f"--measures: {exc}") from None
    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    depths = _depths(args.rerank_top_m)
    blends = _blends(args.rerank_blend)
    fusion_kwargs: dict[str, Any] = {"method": args.fusion}
    if args.rrf_k is not None:
        fusion_kwargs["rrf_k"] = args.rrf_k
    if args.weights is not None:
        fusion_kwargs["weights"] = _weights(args.weights)
    if args.normalization is not None:
        fusion_kwargs["normalization"] = args.normalization
    if args.rerank_weight is not None:
        fusion_kwargs["rerank_weight"] = args.rerank_weight
    fusion = _config(FusionConfig, "fusion", **fusion_kwargs)
    dense_cfg = _dense_config(args)
    reranker_cfg = None
    if any(PIPELINES[p][1] for p in pipelines):
        runtime = {k: v for k, v in (("kind", args.reranker_kind), ("backend", args.reranker_backend), ("dtype", args.reranker_dtype), ("quantize", args.reranker_quantize), ("max_length", args.reranker_max_length)) if v is not None}
        if args.no_reranker_drift_check:
            runtime["drift_check"] = False
        reranker_cfg = _config(RerankerModelConfig, "reranker", model=args.reranker, device=args.device, **runtime)
    needed = {r for p in pipelines for r in PIPELINES[p][0]}
    cascade_cfgs = _cascade_stages(args.cascade or [], runtime if reranker_cfg is not None else {}, args.device, args.cascade_blend, args.cascade_max_length) if reranker_cfg is not None else []
    if args.cascade and reranker_cfg is None:
        raise UsageError("--cascade needs a pipeline that reranks (hybrid+rerank)")
    for stage, _ in cascade_cfgs:
        if stage.default_top_m < max(depths):
            raise UsageError(f"--cascade: {stage.reranker.model} keeps {stage.default_top_m} candidates, fewer than --rerank-top-m {max(depths)}")

    dataset = load_beir(args.dataset, args.split, on_error="skip" if args.skip_bad_lines else "raise")
    left_out = _left_out(dataset.skipped, dataset.empty_documents)
    if left_out:
        print(f"corpus: {left_out}")
    loaded = _open_index(args, dataset, needed, dense_cfg)
    retrievers = {name: _MemoRetriever(r) for name, r in loaded.retrievers.items() if name in needed}
    reranker = None
    if reranker_cfg is not None:
        from serve_app.rerank import Reranker

        from serve_app.rerank.cache import ScoreCache

        # Several depths share their pairs: each is scored once (a cache hit is the stored score).
        loaded_reranker = Reranker.from_config(reranker_cfg, cache=ScoreCache(1 << 31) if len(depths) > 1 else None)
        info = loaded_reranker.scorer.runtime_info
        print(f"reranker: {loaded_reranker.scorer.kind} on {info['backend']} {info['dtype']}{' int8' if info['quantize'] == 'int8' else ''}")
        reranker = _Metered(_MemoReranker(loaded_reranker))  # counts every pair a row sends, reused or not
    cascade = []
    for stage, cfg in cascade_cfgs:
        from serve_app.rerank import Reranker

        r = Reranker.from_config(cfg)
        print(f"cascade {stage.name}: {cfg.model}, top {stage.default_top_m}, {r.scorer.kind} on {r.scorer.runtime_info['backend']} {r.scorer.runtime_info['dtype']}")
        cascade.append((stage, _Metered(_MemoReranker(r))))
    meters = {**{f"rerank.{st.name}": m for st, m in cascade}, **({"rerank": reranker} if reranker is not None else {})}
    pool = args.top_k * 2
    limits = _config(
        FunnelLimits, "funnel", default_top_k=args.top_k, max_top_k=args.top_k, default_rerank_top_m=0,
        max_rerank_top_m=max(depths), default_top_n=args.top_k, max_top_n=max(args.top_k, pool),
    )
    qids, texts = list(dataset.queries), list(dataset.queries.values())
    out_dir = Path(args.out) if args.out else (Path(args.work_dir) if args.work_dir else default_work_dir()) / "results" / f"{Path(args.dataset).resolve().name}-{args.split}"

    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    cost: dict[str, dict[str, dict[str, float]]] = {}
    runs = [(p, blend, m) for p in pipelines for m in (depths if PIPELINES[p][1] else [0]) for blend in (blends if PIPELINES[p][1] else ["none"])]

    def row_name(pipeline: str, blend: str, depth: int) -> tuple[str, str]:
        tag = pipeline if len(depths) == 1 or not PIPELINES[pipeline][1] else f"{pipeline}@{depth}"
        return tag, (tag if blend == "none" else f"{tag} ({blend} blend)")

    row_names = [row_name(*r)[1] for r in runs]
    reference_run = None
    if args.reference is not None and args.reference not in row_names:
        if not Path(args.reference).is_file():
            raise UsageError(f"--reference {args.reference!r} is neither a row of this run ({', '.join(row_names)}) nor a TREC run file")
        reference_run = read_trec_run(args.reference)
        if not any(reference_run.values()):
            raise UsageError(f"--reference {args.reference}: the TREC run file has no ranked query")
    if args.fidelity_k < 1:
        raise UsageError(f"--fidelity-k must be >= 1, got {args.fidelity_k}")
    trec_runs: dict[str, dict[str, dict[str, float]]] = {}
    for pipeline, blend, depth in runs:
        names, rerank = PIPELINES[pipeline]
        tag, name = row_name(pipeline, blend, depth)
        pipe = SearchPipeline(loaded.corpus, retrievers, reranker, fusion.model_copy(update={"rerank_blend": blend}), limits, cascade=cascade if rerank else ())
        start = time.perf_counter()
        before = {k: m.snapshot() for k, m in meters.items()}
        out = pipe.search_batch(texts, top_k=args.top_k, rerank_top_m=min(depth, pool) if rerank else 0, top_n=args.top_k, retrievers=list(names), show_progress=not args.quiet)
        seconds[name] = round(time.perf_counter() - start, 3)
        if rerank:
            cost[name] = {}
            for k, m in meters.items():
                d, c, w = (a - b for a, b in zip(m.snapshot(), before[k]))
                cost[name][k] = {"pairs_per_query": round(d / max(1, len(texts)), 2), "cpu_s": round(c, 2), "wall_s": round(w, 2)}
            print(f"{name}: " + "; ".join(f"{k} {v['pairs_per_query']} pairs/query, {v['cpu_s']} CPU-s" for k, v in cost[name].items()))
        degraded = sorted({stage for r in out for stage in r.degraded})
        if degraded:
            problems = "; ".join(sorted({f"{stage}: {r.stages[stage].error}" for r in out for stage in r.degraded}))
            raise UsageError(f"{name}: the {', '.join(degraded)} stage failed, so the run would not measure the pipeline ({problems})")
        run = run_from_results(dict(zip(qids, out)))
        results[name] = evaluate(run, dataset.qrels, measures)
        if args.reference is not None:
            trec_runs[name] = run
        write_trec_run(run, out_dir / "runs" / (f"{tag}.trec" if blend == "none" else f"{tag}-{blend}-blend.trec"), name)
        logger.info("%s: %s (%.1f s)", name, results[name], seconds[name])

    if args.reference is not None:
        reference_run = trec_runs[args.reference] if reference_run is None else reference_run
        for name, run in trec_runs.items():
            results[name].update(fidelity(run, reference_run, args.fidelity_k))
    meta = {
        "started": started, "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0],
        "fidelity_reference": args.reference, "fidelity_k": args.fidelity_k if args.reference is not None else None,
        "dataset": str(Path(args.dataset).resolve()), "split": args.split, "queries": len(qids), "documents": len(dataset.corpus),
        "top_k": args.top_k, "fusion": fusion.model_dump(), "dense_model": dense_cfg.model if "dense" in needed else None,
        "rerank_top_m": (depths[0] if len(depths) == 1 else depths) if reranker_cfg else None, "reranker": reranker_cfg.model if reranker_cfg else None,
        "reranker_runtime": reranker.inner.inner.scorer.describe() if reranker is not None else None,  # _Metered(_MemoReranker(Reranker))
        "rerank_blends": blends if reranker_cfg else None,
        "cascade": [{"name": st.name, "model": cfg.model, "top_m": st.default_top_m, "blend": st.blend, "max_length": cfg.max_length} for st, cfg in cascade_cfgs],
        "rerank_cost": cost,
        "skipped_corpus_lines": len(dataset.skipped),
        "empty_documents_left_out": dataset.empty_documents,
        "seconds": seconds,
    }
    write_report(results, out_dir / "metrics.json", out_dir / "metrics.md", meta=meta)
    print(markdown_table(results), end="")
    print(f"written: {out_dir / 'metrics.json'}, {out_dir / 'metrics.md'}, TREC runs in {out_dir / 'runs'}")
    return 0


# --------------------------------------------------------------------------- registration


def register(subparsers: Any) -> None:
    """Add the ``index`` and ``eval`` sub-commands."""
    p = subparsers.add_parser("index", help="build an index directory (BM25 and/or dense) from a corpus", description=cmd_index.__doc__)
    p.add_argument("--corpus", required=True, help="corpus .jsonl / .jsonl.gz (plain or BEIR records), a BEIR dataset directory, or builtin:demo")
    p.add_argument("--out", required=True, help="index directory to create or replace")
    p.add_argument("--no-bm25", action="store_true", help="skip the BM25 index")
    p.add_argument("--no-dense", action="store_true", help="skip the dense index")
    bm = BM25Config()
    p.add_argument("--bm25-engine", choices=["bm25s", "rank_bm25"], default=None, help=f"BM25 engine (default: {bm.engine})")
    p.add_argument("--method", choices=["lucene", "robertson", "atire", "bm25l", "bm25+"], default=None, help=f"BM25 variant (default: {bm.method})")
    p.add_argument("--k1", type=float, default=None, help=f"BM25 k1 (default: {bm.k1})")
    p.add_argument("--b", type=float, default=None, help=f"BM25 b (default: {bm.b})")
    _add_dense_options(p)
    ch = ChunkingConfig()
    p.add_argument("--chunk-size", type=int, default=None, help=f"split documents into windows of N words (enables chunking; default size {ch.size})")
    p.add_argument("--chunk-stride", type=int, default=None, help=f"words between window starts (enables chunking; default {ch.stride})")
    p.add_argument("--shards", default=None, metavar="RETRIEVER=N[,...]", help="also write shard sets, e.g. bm25=2,dense=4 (what a deployment's `sharding` asks for; default: none)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed corpus lines (with a warning) instead of stopping at the first")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_ray_options(p, "same index directory as a local build")
    p.add_argument("--shards-only", action="store_true", help="with --ray: write every retriever only as its --shards set, each shard by a worker (the driver never holds the BM25 matrix or a vector; the index directory must be on storage every node mounts at the same path); served sharded only")
    p.set_defaults(func=cmd_index)

    fu = FusionConfig()
    e = subparsers.add_parser("eval", help="evaluate retrieval pipelines on a BEIR dataset (nDCG@10, R@100, RR@10)", description=cmd_eval.__doc__)
    e.add_argument("--dataset", required=True, help="BEIR dataset directory (corpus.jsonl[.gz], queries.jsonl, qrels/SPLIT.tsv)")
    e.add_argument("--split", default="test", help="qrels split (default: test)")
    e.add_argument("--pipeline", action="append", metavar="NAME[,NAME]", help=f"pipeline(s) to evaluate, repeatable or comma-separated: {', '.join(PIPELINES)} (default: hybrid)")
    e.add_argument("--index", default=None, help="index directory (built there when missing; default: WORK_DIR/indexes/DATASET_NAME)")
    e.add_argument("--work-dir", default=None, help=f"cache of indexes and results (default: {default_work_dir()})")
    e.add_argument("--top-k", type=int, default=100, help="candidates per retriever, also the evaluated ranking depth (default: 100)")
    e.add_argument("--rerank-top-m", default="100", metavar="M[,M]", help="fused candidates reranked by hybrid+rerank (default: 100); several depths (e.g. 50,100,20,10) give one row each, named hybrid+rerank@M, and score each pair once, so the first depth's rerank cost is the only one measured whole")
    ce = RerankerModelConfig()
    e.add_argument("--reranker", default=ce.model, help="reranker for hybrid+rerank: Hub id or local directory (any kind: cross-encoder, pooling, decoder)")
    e.add_argument("--reranker-kind", choices=["auto", "sequence_classification", "pooling", "causal_lm"], default=None, help=f"reranker model family (default: {ce.kind}, read from the checkpoint)")
    e.add_argument("--reranker-backend", choices=["torch", "onnx", "openvino"], default=None, help=f"reranker runtime (default: {ce.backend})")
    e.add_argument("--reranker-dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None, help=f"reranker dtype (default: {ce.dtype}: bfloat16 on CPUs with native bf16, see docs/RERANKERS.md)")
    e.add_argument("--reranker-quantize", choices=["none", "int8"], default=None, help="onnx: int8 dynamic quantisation (default: none)")
    e.add_argument("--reranker-max-length", type=int, default=None, help=f"tokens per reranked pair (default: {ce.max_length})")
    e.add_argument("--no-reranker-drift-check", action="store_true", help="load the reranker's runtime without the drift check against torch float32 (to evaluate a runtime the default tolerance refuses)")
    e.add_argument("--fusion", choices=["rrf", "weighted"], default=fu.method, help=f"fusion method (default: {fu.method})")
    e.add_argument("--rrf-k", type=int, default=None, help=f"RRF constant (default: {fu.rrf_k})")
    e.add_argument("--weights", default=None, help="weighted fusion weights, e.g. bm25=0.4,dense=0.6 (default: " + ",".join(f"{k}={v}" for k, v in fu.weights.items()) + ")")
    e.add_argument("--normalization", choices=["minmax", "zscore"], default=None, help=f"weighted fusion score normalisation (default: {fu.normalization})")
    e.add_argument("--cascade", action="append", metavar="MODEL=TOP_M", help="a cheaper rerank stage before --reranker: it scores the first TOP_M fused candidates and --reranker reads the first --rerank-top-m of its order (repeat for more stages, in order; same runtime flags). Reports the pairs and CPU time of each stage.")
    e.add_argument("--cascade-max-length", type=int, default=None, help="tokens per pair for the --cascade stages (default: --reranker-max-length): a cheap stage may read shorter pairs than the final reranker")
    e.add_argument("--cascade-blend", choices=["none", "rrf"], default="none", help="how each --cascade stage reorders its candidates: by its scores (none) or by RRF of its rank and the rank it received (rrf)")
    e.add_argument("--rerank-blend", default="none", metavar="BLEND[,BLEND]", help="order of the reranked candidates, one result row per value: none (cross-encoder score alone), rrf (RRF of the cross-encoder rank and the fused rank); e.g. none,rrf (default: none)")
    e.add_argument("--rerank-weight", type=float, default=None, help=f"rrf blend: weight of the cross-encoder rank (default: {fu.rerank_weight})")
    e.add_argument("--measures", default=None, help="comma-separated ir-measures names (default: nDCG@10,R@100,RR@10)")
    e.add_argument("--reference", default=None, metavar="ROW|TREC_FILE", help="also report each row's fidelity to a reference ranking (overlap@K and kendall_tau@K of the top K, see serve_app.eval.fidelity): a row of this run (e.g. 'hybrid+rerank@100') or a TREC run file an earlier eval wrote (its runs/ directory); measures 'the same answer' as the full reranker whatever its quality")
    e.add_argument("--fidelity-k", type=int, default=10, help="depth K of the fidelity measures (default: 10)")
    _add_dense_options(e)
    e.add_argument("--out", default=None, help="directory for metrics.json and metrics.md (default: WORK_DIR/results/DATASET-SPLIT)")
    e.add_argument("--skip-bad-lines", action="store_true", help="skip malformed corpus lines (with a warning) instead of stopping at the first")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval, chunk_size=None, chunk_stride=None)
