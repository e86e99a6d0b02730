"""Index builds on a Ray cluster: Ray Data blocks, an encoder actor pool, exact BM25 statistics.

:func:`build_index_ray` writes the very index directory :func:`serve_app.index.build_index`
writes (same layout, manifest, checksums, document store, shard sets), with the costly parts
spread over the cluster::

    driver: read + validate the corpus -> Ray Data blocks of (position, content)
      BM25   1. tokenise (tasks)                -> tokens of each chunk
             2. per-batch document frequencies (tasks), summed by term on the workers
                -> driver: vocabulary, df, N, avgdl
             3. score postings (actor pool, one copy of the statistics per actor)
             -> driver: CSC score matrix (bm25s's own layout)
      dense  encode chunks (actor pool: the bi-encoder loaded once per actor, ``num_gpus`` per
             actor on GPU nodes) -> driver: vectors in corpus order -> FAISS (as a local build)
    driver: write everything into a staging directory, swap it into place

**Exact BM25.** A block cannot score its postings alone: idf needs every document frequency and
length normalisation the average chunk length of the whole corpus. Step 2 aggregates those
across blocks, step 3 scores with them through bm25s's own scoring functions, so every posting
holds the float a local :meth:`BM25Retriever.build` computes (tests compare them bit for bit).
The vocabulary is numbered in sorted order (a local build numbers it in set order: the numbering
differs, the scores do not).

**Dense.** Each actor encodes its batches exactly as :meth:`BiEncoder.encode_documents` does
(longest first within the batch); vectors match a local build's within float rounding (1e-5).

**Failures.** Tasks are retried up to ``max_retries`` times and a dead actor is restarted
and its batch retried as often; a build that still fails raises :class:`RayIndexBuildError`
before anything is written, and the previous index stays in place (the swap is the last step).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from serve_app.chunking import split_documents
from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
from serve_app.corpus import Corpus
from serve_app.ray_session import ray_session
from serve_app.errors import UserFacingError
from serve_app.types import Document

logger = logging.getLogger(__name__)

__all__ = ["RayBuildOptions", "RayBuildReport", "RayIndexBuildError", "build_index_ray", "check_ray_buildable"]


class RayIndexBuildError(UserFacingError, RuntimeError):
    """The distributed build failed (after Ray's retries); nothing was written."""


@dataclass(frozen=True)
class RayBuildOptions:
    """How :func:`build_index_ray` uses the cluster.

    ``address``: the Ray cluster (``auto``, ``ray://head:10001``); None starts a local instance
    on 127.0.0.1 (or uses the one this process has already started). ``workers``: actors of each
    pool and the concurrency of the tokenising tasks. ``cpus_per_worker`` / ``gpus_per_worker``:
    resources of each encoder actor (``gpus_per_worker=None``: 1 when the cluster has GPUs, else 0).
    ``batch_documents``: documents per Ray Data batch (None: 8 × the encoder's ``batch_size``).
    ``max_retries``: retries of a failed task, and restarts of a dead actor.
    """

    address: Optional[str] = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: Optional[float] = None
    batch_documents: Optional[int] = None
    max_retries: int = 3
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.batch_documents is not None and self.batch_documents < 1:
            raise ValueError(f"batch_documents must be >= 1, got {self.batch_documents}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


@dataclass
class RayBuildReport:
    """What a distributed build did: wall seconds per stage and the CPU seconds its workers spent."""

    documents: int = 0
    chunks: int = 0
    workers: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    worker_cpu_seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[Any] = field(default_factory=list)  # bad corpus lines skipped (a build that read the corpus file itself)
    empty: list[str] = field(default_factory=list)  # ids of empty documents left out (idem)

    @property
    def seconds(self) -> float:
        return float(sum(self.stage_seconds.values()))


# --------------------------------------------------------------------------- worker functions
# Module-level so that workers import them by name (serve_app is installed on every node).


def _chunk_texts(positions: np.ndarray, contents: Sequence[str], chunking: Mapping[str, Any]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The texts a local build indexes for these documents (:func:`split_documents` itself), with
    each text's document position and its number within the document."""
    docs = [Document(id=str(pos), text=str(content)) for pos, content in zip(positions.tolist(), contents)]  # content = text without a title
    texts, local = split_documents(docs, ChunkingConfig(**chunking))
    seq = np.arange(local.size, dtype=np.int64) - np.searchsorted(local, local, side="left")  # chunks come in document order
    return texts, np.asarray(positions, dtype=np.int64)[local], seq.astype(np.int32)


def _tokenize_batch(batch: dict[str, np.ndarray], *, tokenizer: Mapping[str, Any], chunking: Mapping[str, Any]) -> Any:
    """Stage 1 (task): the tokens of every chunk of the batch's documents."""
    import pyarrow as pa

    from serve_app.retrieval.bm25 import Tokenizer

    start = time.process_time()
    texts, owner, seq = _chunk_texts(batch["position"], batch["content"], chunking)
    tokens = Tokenizer.from_json(tokenizer)(texts)
    cpu = np.zeros(len(texts), dtype=np.float64)
    if len(texts):
        cpu[0] = time.process_time() - start
    return pa.table({
        "owner": pa.array(owner, pa.int64()),
        "seq": pa.array(seq, pa.int32()),
        "length": pa.array([len(t) for t in tokens], pa.int64()),
        "tokens": pa.array(tokens, pa.list_(pa.string())),
        "cpu_s": pa.array(cpu, pa.float64()),
    })


def _document_frequencies(batch: Any) -> Any:
    """Stage 2 (task): in how many of the batch's chunks each term occurs (one row per term),
    computed in Arrow: the distinct (term, chunk) pairs, counted per term."""
    import pyarrow as pa
    import pyarrow.compute as pc

    start = time.process_time()
    tokens = batch.column("tokens")
    pairs = pa.table({"term": pc.list_flatten(tokens), "chunk": pc.list_parent_indices(tokens)})
    counts = pairs.group_by(["term", "chunk"]).aggregate([]).group_by("term").aggregate([("chunk", "count")])
    cpu = np.zeros(counts.num_rows, dtype=np.float64)
    if counts.num_rows:
        cpu[0] = time.process_time() - start
    return pa.table({"term": counts.column("term"), "df": counts.column("chunk_count").cast(pa.int64()), "cpu_s": pa.array(cpu, pa.float64())})


class _ScoreBatch:
    """Stage 3 (actor): every posting of the batch scored with the whole corpus's statistics,
    by bm25s's own scoring function (the one a local build runs)."""

    def __init__(self, stats_ref: Any) -> None:
        import ray

        self.stats: dict[str, Any] = ray.get(stats_ref[0])
        self.vocab: dict[str, int] = self.stats["vocab"]
        self.chunk_offset: np.ndarray = self.stats["chunk_offset"]
        self.shard_of: Optional[np.ndarray] = self.stats.get("shard_of")

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from serve_app.retrieval.bm25s_engine import score_postings

        start = time.process_time()
        vocab = self.vocab
        ids = [[vocab[t] for t in tokens] for tokens in batch.column("tokens").to_pylist()]
        scores, rows, cols = score_postings(ids, self.stats)
        owner = batch.column("owner").to_numpy()
        seq = batch.column("seq").to_numpy()
        # One row per chunk: its global position, its terms and their scores (postings in the
        # order bm25s produced them; the driver's CSC sort orders them).
        rows = np.asarray(rows, dtype=np.int64)
        bounds = np.r_[0, np.flatnonzero(np.diff(rows)) + 1, rows.size] if rows.size else np.zeros(1, dtype=np.int64)
        per_chunk = np.zeros(len(ids), dtype=np.int64)
        if rows.size:
            per_chunk[rows[bounds[:-1]]] = np.diff(bounds)
        offsets = np.r_[0, np.cumsum(per_chunk)].astype(np.int64)
        cpu = np.zeros(len(ids), dtype=np.float64)
        if len(ids):
            cpu[0] = time.process_time() - start
        columns = {
            "chunk": pa.array(self.chunk_offset[owner] + seq.astype(np.int64), pa.int64()),
            "terms": pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(np.asarray(cols, dtype=np.int32))),
            "scores": pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(np.asarray(scores))),
            "cpu_s": pa.array(cpu, pa.float64()),
        }
        if self.shard_of is not None:  # shards written by workers: chunk numbers are the shard's own
            columns["owner"] = pa.array(owner, pa.int64())
            columns["shard"] = pa.array(self.shard_of[owner], pa.int32())
        return pa.table(columns)


class EncodeBatch:
    """Dense stage (actor): chunk embeddings of the batch's documents; the bi-encoder is loaded
    once per actor, on the GPU Ray gave it if any. Subclassed by tests (a worker that dies)."""

    def __init__(self, dense: Mapping[str, Any], chunking: Mapping[str, Any], threads: int) -> None:
        import torch

        from serve_app.retrieval.dense import BiEncoder

        torch.set_num_threads(max(1, int(threads)))
        self.chunking = dict(chunking)
        self.encoder = BiEncoder(DenseConfig(**dense))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.process_time()
        texts, owner, seq = _chunk_texts(batch["position"], batch["content"], self.chunking)
        vectors = self.encoder.encode_documents(texts)
        cpu = np.zeros(len(texts), dtype=np.float64)
        if len(texts):
            cpu[0] = time.process_time() - start
        return {"owner": owner, "seq": seq, "vector": vectors, "cpu_s": cpu}


# --------------------------------------------------------------------------- driver


def check_ray_buildable(bm25: BM25Config | None) -> None:
    """Refuse (:class:`~serve_app.index.build.IndexBuildError`) what the Ray build cannot do,
    before any work: BM25 with the rank_bm25 engine, which keeps every token in one process."""
    from serve_app.index.build import IndexBuildError

    if bm25 is not None and bm25.engine != "bm25s":
        raise IndexBuildError(f"--ray builds BM25 with engine bm25s only (got {bm25.engine!r}): rank_bm25 keeps every token of the corpus in one process")


def _input_dataset(corpus: Corpus, batch_documents: int, workers: int) -> Any:
    """The corpus as Ray Data blocks of ``(position, content)`` rows (the text the indexes read)."""
    import pyarrow as pa
    import ray

    n = len(corpus)
    # At least a few blocks per worker so that the pool stays busy; whole batches per block.
    per_block = max(batch_documents, math.ceil(n / max(1, 4 * workers) / batch_documents) * batch_documents)
    tables = []
    for start in range(0, n, per_block):
        docs = corpus[start : start + per_block]
        tables.append(pa.table({"position": pa.array(range(start, start + len(docs)), pa.int64()), "content": pa.array([d.content for d in docs], pa.string())}))
    return ray.data.from_arrow(tables)


@contextlib.contextmanager
def _quiet_remote_args() -> Any:
    """Ray 2.60 takes retry settings only through ``ray_remote_args_fn`` (or
    ``**ray_remote_args``), both deprecated for removal in 2.64 without a replacement yet; the
    warning is silenced here alone (revisit with Ray 2.64)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args(_fn)?` is deprecated")
        yield


def _map_batches(ds: Any, fn: Any, **kwargs: Any) -> Any:
    """``ds.map_batches`` with bounded retries (:func:`_quiet_remote_args`)."""
    with _quiet_remote_args():
        return ds.map_batches(fn, **kwargs)


def _tasks(options: RayBuildOptions) -> Any:
    from ray.data import TaskPoolStrategy

    return TaskPoolStrategy(size=options.workers)


def _actors(options: RayBuildOptions) -> Any:
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=options.workers)


def _actor_retries(options: RayBuildOptions) -> Any:
    """Actor options: a dead actor is restarted, and its batch retried, ``max_retries`` times
    (Ray Data's default is forever, which would hide a worker that always dies)."""
    return functools.partial(dict, max_restarts=options.max_retries, max_task_retries=options.max_retries)


def _gpus_per_worker(options: RayBuildOptions) -> float:
    if options.gpus_per_worker is not None:
        return float(options.gpus_per_worker)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _chunk_order(owner: np.ndarray, seq: np.ndarray, num_documents: int) -> tuple[np.ndarray, np.ndarray]:
    """(order of the rows in corpus chunk order, first chunk of each document); checks that every
    document arrived with all its chunks once."""
    order = np.lexsort((seq, owner))
    o, s = owner[order], seq[order]
    counts = np.bincount(o, minlength=num_documents)
    offset = np.zeros(num_documents + 1, dtype=np.int64)
    np.cumsum(counts, out=offset[1:])
    expected_seq = np.arange(o.size, dtype=np.int64) - offset[o]
    if o.size and (counts.size != num_documents or np.any(counts == 0) or np.any(s != expected_seq)):
        raise RayIndexBuildError("the workers returned an incomplete or duplicated set of chunks")
    return order, offset[:-1]


@dataclass
class _BM25Statistics:
    """What the statistics stage leaves: the tokenised chunks (a materialised dataset), the
    whole corpus's scoring statistics, every chunk's document and each document's first chunk
    (corpus chunk order), the tokenizer and the retry options of the tasks."""

    tokens: Any
    stats: dict[str, Any]
    chunk_owner: np.ndarray
    chunk_offset: np.ndarray
    tokenizer: Any
    retry: dict[str, Any]


def _bm25_statistics(ds: Any, num_documents: int, cfg: BM25Config, chunking: ChunkingConfig, options: RayBuildOptions, batch: int, report: RayBuildReport) -> _BM25Statistics:
    """Tokenise every chunk (tasks), then gather the statistics exact BM25 needs on the driver:
    the vocabulary, each term's document frequency (counted per batch by tasks, summed here)
    and every chunk's length."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    from serve_app.retrieval.bm25 import Tokenizer
    from serve_app.retrieval.bm25s_engine import corpus_statistics

    tokenizer = Tokenizer.from_config(cfg)
    retry = {"ray_remote_args_fn": functools.partial(dict, max_retries=options.max_retries, retry_exceptions=True)}

    t0 = time.perf_counter()
    tokens = _map_batches(
        ds, _tokenize_batch, batch_size=batch, batch_format="numpy", compute=_tasks(options), num_cpus=1,
        fn_kwargs={"tokenizer": tokenizer.to_json(), "chunking": chunking.model_dump()}, **retry,
    ).materialize()
    report.stage_seconds["bm25_tokenize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    meta = tokens.select_columns(["owner", "seq", "length", "cpu_s"]).to_arrow_refs()
    meta_table = pa.concat_tables(ray.get(meta))
    owner = meta_table.column("owner").to_numpy()
    seq = meta_table.column("seq").to_numpy()
    lengths = meta_table.column("length").to_numpy()
    report.worker_cpu_seconds["bm25_tokenize"] = float(pc.sum(meta_table.column("cpu_s")).as_py() or 0.0)
    del meta_table
    order, chunk_offset = _chunk_order(owner, seq, num_documents)
    lengths = np.asarray(lengths[order], dtype=np.int64)
    if not lengths.any():
        raise ValueError("no document has an indexable token (every word is a stopword or shorter than 2 characters)")
    dfs = _map_batches(tokens, _document_frequencies, batch_size=batch, batch_format="pyarrow", compute=_tasks(options), num_cpus=1, **retry).materialize()
    report.worker_cpu_seconds["bm25_statistics"] = float(dfs.sum("cpu_s") or 0.0)
    # the per-batch counts are summed by term on the workers (a shuffle): the driver receives
    # one row per term of the vocabulary, however many batches the corpus has
    summed = dfs.select_columns(["term", "df"]).groupby("term", num_partitions=max(1, options.workers)).sum("df")
    parts = [t for t in ray.get(summed.to_arrow_refs()) if t.num_rows]
    merged = pa.concat_tables(parts).sort_by("term")
    del dfs, summed, parts
    terms = merged.column("term").to_pylist()
    df = merged.column("sum(df)").to_numpy().astype(np.int64)
    vocab = {t: i for i, t in enumerate(terms)}
    stats = corpus_statistics(cfg, vocab, df, lengths)
    report.stage_seconds["bm25_statistics"] = time.perf_counter() - t0
    return _BM25Statistics(tokens, stats, owner[order], chunk_offset, tokenizer, retry)


def _build_bm25(ds: Any, corpus: Corpus, cfg: BM25Config, chunking: ChunkingConfig, options: RayBuildOptions, batch: int, report: RayBuildReport) -> Any:
    """The whole-corpus BM25 retriever: postings scored by an actor pool with the whole
    corpus's statistics, assembled on the driver."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    from serve_app.retrieval.bm25 import BM25Retriever
    from serve_app.retrieval.bm25s_engine import Bm25sEngine

    st = _bm25_statistics(ds, len(corpus), cfg, chunking, options, batch, report)
    tokens, stats, chunk_offset, tokenizer = st.tokens, st.stats, st.chunk_offset, st.tokenizer
    n_chunks = int(st.chunk_owner.size)
    vocab = stats["vocab"]

    t0 = time.perf_counter()
    stats_ref = ray.put({**stats, "chunk_offset": chunk_offset})
    scored = _map_batches(
        tokens, _ScoreBatch, batch_size=batch, batch_format="pyarrow", compute=_actors(options), num_cpus=1,
        fn_constructor_args=([stats_ref],), ray_remote_args_fn=_actor_retries(options),
    )
    parts = pa.concat_tables(ray.get(scored.to_arrow_refs()))
    report.stage_seconds["bm25_score"] = time.perf_counter() - t0
    report.worker_cpu_seconds["bm25_score"] = float(pc.sum(parts.column("cpu_s")).as_py() or 0.0)
    del tokens
    st.tokens = None

    t0 = time.perf_counter()
    lengths_per_chunk = pc.list_value_length(parts.column("terms")).to_numpy(zero_copy_only=False)
    rows = np.repeat(parts.column("chunk").to_numpy(), lengths_per_chunk)
    cols = pc.list_flatten(parts.column("terms")).to_numpy()
    data = pc.list_flatten(parts.column("scores")).to_numpy()
    del parts
    engine = Bm25sEngine.from_postings(cfg, stats, data, rows, cols, n_chunks)
    report.stage_seconds["bm25_assemble"] = time.perf_counter() - t0
    logger.info("BM25 (ray, %s): %d documents, %d chunks, %d terms", cfg.method, len(corpus), n_chunks, len(vocab))
    return BM25Retriever(engine, tokenizer, cfg, chunking, corpus.ids, st.chunk_owner)


def _encoded(ds: Any, cfg: DenseConfig, chunking: ChunkingConfig, options: RayBuildOptions, batch: int, udf: type) -> Any:
    """The dataset of encoded chunks (``owner``, ``seq``, ``vector``, ``cpu_s``): ``udf`` on an
    actor pool of ``options.workers`` actors, each with its CPUs and GPUs."""
    gpus = _gpus_per_worker(options)
    return _map_batches(
        ds, udf, batch_size=batch, batch_format="numpy", compute=_actors(options),
        num_cpus=options.cpus_per_worker, num_gpus=gpus or None,
        fn_constructor_kwargs={"dense": cfg.model_dump(), "chunking": chunking.model_dump(), "threads": max(1, int(options.cpus_per_worker))},
        ray_remote_args_fn=_actor_retries(options),
    )


def _encode(ds: Any, corpus: Corpus, cfg: DenseConfig, chunking: ChunkingConfig, options: RayBuildOptions, batch: int, report: RayBuildReport, udf: type) -> tuple[np.ndarray, np.ndarray]:
    """Every chunk's vector in corpus chunk order, and each vector's document position."""
    t0 = time.perf_counter()
    encoded = _encoded(ds, cfg, chunking, options, batch, udf)
    owners, seqs, vectors, cpu = [], [], [], 0.0
    for part in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        owners.append(part["owner"])
        seqs.append(part["seq"])
        vectors.append(np.asarray(part["vector"], dtype=np.float32))
        cpu += float(np.sum(part["cpu_s"]))
    owner = np.concatenate(owners)
    order, _ = _chunk_order(owner, np.concatenate(seqs), len(corpus))
    report.stage_seconds["dense_encode"] = time.perf_counter() - t0
    report.worker_cpu_seconds["dense_encode"] = cpu
    return np.ascontiguousarray(np.concatenate(vectors)[order]), owner[order]


def build_index_ray(
    corpus: Sequence[Document],
    out_dir: str | os.PathLike[str],
    *,
    bm25: BM25Config | None,
    dense: DenseConfig | None,
    chunking: ChunkingConfig,
    shards: Optional[Mapping[str, int]] = None,
    options: RayBuildOptions = RayBuildOptions(),
    encode_udf: Optional[type] = None,
    assignments: Optional[Mapping[str, Sequence[Sequence[int]]]] = None,
    writes: Optional[dict[str, Any]] = None,
) -> tuple[Any, RayBuildReport]:
    """Build the index :func:`serve_app.index.build_index` would, with the work on Ray.

    Returns the manifest written and a :class:`RayBuildReport`. ``encode_udf`` replaces
    :class:`EncodeBatch` (same constructor and call; tests use it to kill a worker).

    The whole index passes through the driver here; :func:`serve_app.index.ray_shards.build_index_ray_shards_only`
    has the workers write the shards instead (what a 100M-document build needs).
    ``assignments`` (a merge of live writes) gives each shard's document positions instead of
    contiguous ranges; ``writes`` is the manifest's record of that merge.

    Example (on the cluster this process is connected to, or a local instance)::

        from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
        from serve_app.corpus import load_corpus

        manifest, report = build_index_ray(
            load_corpus("corpus.jsonl"), "/data/idx", bm25=BM25Config(), dense=DenseConfig(),
            chunking=ChunkingConfig(), shards={"bm25": 4}, options=RayBuildOptions(workers=8),
        )
        print(report.stage_seconds, report.worker_cpu_seconds)
    """
    from serve_app.index.build import check_build_request, write_index_atomically

    check_ray_buildable(bm25)
    corpus, out, wanted = check_build_request(corpus, out_dir, bm25=bm25, dense=dense, shards=shards)
    encoder = None
    if dense is not None:  # fail here, not in every actor, when the model cannot be loaded
        from serve_app.retrieval.dense import BiEncoder

        encoder = BiEncoder(dense.model_copy(update={"device": "cpu"}))
    batch = options.batch_documents or 8 * (dense.batch_size if dense is not None else 64)
    report = RayBuildReport(documents=len(corpus), workers=options.workers)
    num_cpus = None if options.address else max(os.cpu_count() or 1, math.ceil(options.workers * options.cpus_per_worker))
    with ray_session(options.address, num_cpus=num_cpus, log_to_driver=False):
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = options.show_progress
        ds = _input_dataset(corpus, batch, options.workers)
        try:
            bm25_retriever = _build_bm25(ds, corpus, bm25, chunking, options, batch, report) if bm25 is not None else None
            vectors = owner = None
            if dense is not None:
                vectors, owner = _encode(ds, corpus, dense, chunking, options, batch, report, encode_udf or EncodeBatch)
        except (ValueError, RayIndexBuildError):
            raise
        except Exception as exc:  # RayTaskError, ActorDiedError, ... after Ray's retries
            raise RayIndexBuildError(f"the Ray index build failed after retries: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}") from exc
    t0 = time.perf_counter()
    dense_retriever = None
    if dense is not None:
        from serve_app.retrieval.dense import DenseRetriever

        dense_retriever = DenseRetriever.from_vectors(vectors, corpus.ids, dense, chunk_owner=owner, encoder=encoder)
    manifest = write_index_atomically(
        out, corpus, wanted, bm25=bm25, dense=dense, chunking=chunking, encoder=encoder,
        bm25_retriever=bm25_retriever, dense_retriever=dense_retriever, whole_vectors=(vectors, owner) if dense is not None else None,
        writes=writes, assignments=assignments,
    )
    report.chunks = manifest.corpus.num_chunks
    report.stage_seconds["write"] = time.perf_counter() - t0
    logger.info("index written to %s by Ray (%d documents, %d workers, %.1f s)", out, len(corpus), options.workers, report.seconds)
    return manifest, report

