"""Shards-only Ray builds: every shard written by a Ray task, the corpus read by the workers, the
driver holding no posting, no vector and not the corpus (``serve-app index --ray --shards-only``,
:func:`build_index_ray_shards_only`; the building blocks are :mod:`serve_app.index.ray_build`'s)::

    driver: the corpus streamed once into documents.jsonl and documents.sqlite (one document at
            a time; the store refuses a repeated id), then each shard's documents.jsonl
    workers: byte ranges of documents.jsonl -> (position, content) blocks
      BM25   tokenise, statistics (as a whole build: vocabulary, df, chunk lengths on the driver)
             score postings (actor pool), chunks numbered within their shard
             -> Ray Data shuffle by shard -> one task per shard: its bm25s matrix, saved
      dense  encode (actor pool) -> shuffle by shard -> one task per shard: its FAISS index, saved
    driver: the sections and file checksums the shard tasks return -> every manifest; swap

A shard's scores are the whole corpus's (statistics gathered first, as in a whole build), so
its index equals the one :func:`serve_app.index.build.build_shard_set` cuts from a whole build,
posting for posting. The workers read and write the staging directory: it must be on storage
every node mounts at the same path. The top-level manifest's retriever sections describe the
whole index and carry ``shards_only`` (the number of shards); loading a retriever whole is
refused with that explanation (:mod:`serve_app.index.load`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np

from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
from serve_app.index.ray_build import (
    EncodeBatch,
    RayBuildOptions,
    RayBuildReport,
    RayIndexBuildError,
    _actor_retries,
    _actors,
    _bm25_statistics,
    _encoded,
    check_ray_buildable,
    _map_batches,
    _quiet_remote_args,
    _ScoreBatch,
    _tasks,
)
from serve_app.ray_session import ray_session
from serve_app.types import Document

logger = logging.getLogger(__name__)

__all__ = ["build_index_ray_shards_only", "write_shards_only"]


@dataclass(frozen=True)
class _ShardLayout:
    """Where each document goes in one retriever's shard set: ``positions[i]`` (ascending) are
    shard ``i``'s documents, ``shard_of[p]`` is document ``p``'s shard, ``set_dir`` the set's
    directory in the staging directory (on storage every worker mounts at the same path)."""

    retriever: str
    set_dir: Path
    positions: list[np.ndarray]
    shard_of: np.ndarray

    contiguous: bool

    @classmethod
    def of(cls, retriever: str, set_dir: Path, num_documents: int, num_shards: int, shard_of: Any = None) -> "_ShardLayout":
        """Contiguous ranges of positions (``shard_of`` None), or each document in the shard
        ``shard_of[p]`` names (a merge of live writes keeps documents in their shards)."""
        from serve_app.retrieval.sharding import shard_bounds

        if shard_of is None:
            positions = [np.arange(a, b, dtype=np.int64) for a, b in shard_bounds(num_documents, num_shards)]
            of = np.empty(num_documents, dtype=np.int32)
            for i, p in enumerate(positions):
                of[p] = i
            return cls(retriever, set_dir, positions, of, True)
        of = np.asarray(shard_of, dtype=np.int32)
        if of.shape != (num_documents,) or (of.size and (of.min() < 0 or of.max() >= num_shards)):
            raise ValueError(f"the {retriever} assignment must name one of {num_shards} shards for each of the {num_documents} documents")
        positions = [np.flatnonzero(of == i).astype(np.int64) for i in range(num_shards)]
        empty = [i for i, p in enumerate(positions) if not p.size]
        if empty:
            raise ValueError(f"{retriever} shard(s) {empty} would hold no document; an index shard cannot be empty")
        return cls(retriever, set_dir, positions, of, False)

    def local_chunk_offsets(self, chunk_owner: np.ndarray) -> np.ndarray:
        """The number, within its shard, of each document's first chunk (``chunk_owner``: every
        chunk's document, in corpus chunk order)."""
        counts = np.bincount(chunk_owner, minlength=self.shard_of.size).astype(np.int64)
        offsets = np.zeros(self.shard_of.size, dtype=np.int64)
        for p in self.positions:
            c = counts[p]
            offsets[p] = np.cumsum(c) - c
        return offsets


def _check_shard_chunks(owner: np.ndarray, seq: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The order putting a shard's chunk rows in document, then chunk order; raises when a
    document of the shard is missing, foreign or has a gap or a repeat in its chunks."""
    order = np.lexsort((seq, owner))
    o, q = owner[order], seq[order]
    firsts = np.r_[True, o[1:] != o[:-1]] if o.size else np.zeros(0, dtype=bool)
    starts = np.flatnonzero(firsts)
    expected = np.arange(o.size, dtype=np.int64) - np.repeat(starts, np.diff(np.r_[starts, o.size]))
    if not np.array_equal(o[firsts], positions) or not np.array_equal(q.astype(np.int64), expected):
        raise RayIndexBuildError("a shard's workers returned an incomplete or duplicated set of chunks")
    return order


def _finish_shard_part(directory: Path, sub: str, section: dict[str, Any], cpu: float, shard: int) -> Any:
    """The one-row answer of a shard writer: the section it saved and the size and sha256 of
    every file under ``directory/sub`` (fsynced), for the driver's manifest of the shard."""
    import json

    import pyarrow as pa

    from serve_app.index.files import file_entries

    entries = {f"{sub}/{rel}": e.model_dump() for rel, e in file_entries(directory / sub).items()}
    return pa.table({"shard": pa.array([shard], pa.int32()), "section": [json.dumps(section)], "files": [json.dumps(entries)], "cpu_s": pa.array([cpu], pa.float64())})


def _shard_ids(directory: Path) -> list[str]:
    """The document ids of a shard, in order, from the ``documents.jsonl`` the driver wrote there."""
    with open(directory / "documents.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["id"] for line in f if line.strip()]


def _write_bm25_shard(group: Any, *, stats_ref: list, positions_refs: list, tokenizer: Mapping[str, Any], cfg: Mapping[str, Any], chunking: Mapping[str, Any], set_dir: str) -> Any:
    """Shard writer (task, one per shard): assemble the shard's postings, already scored with the
    whole corpus's statistics, into its bm25s index and save it in the shard's directory."""
    import pyarrow.compute as pc
    import ray

    from serve_app.index.files import BM25_DIR
    from serve_app.retrieval.bm25 import BM25Retriever, Tokenizer
    from serve_app.retrieval.bm25s_engine import Bm25sEngine

    start = time.process_time()
    shard = int(group.column("shard")[0].as_py())
    stats = ray.get(stats_ref[0])
    positions = ray.get(positions_refs[shard])
    directory = Path(set_dir) / str(shard)
    ids = _shard_ids(directory)
    chunk = group.column("chunk").to_numpy()
    order = np.argsort(chunk, kind="stable")
    n = chunk.size
    if not np.array_equal(chunk[order], np.arange(n)):
        raise RayIndexBuildError(f"BM25 shard {shard}: the workers returned an incomplete or duplicated set of chunks")
    per_row = pc.list_value_length(group.column("terms")).to_numpy(zero_copy_only=False)
    rows = np.repeat(chunk, per_row)
    cols = pc.list_flatten(group.column("terms")).to_numpy()
    data = pc.list_flatten(group.column("scores")).to_numpy()
    bm25_cfg = BM25Config(**cfg)
    engine = Bm25sEngine.from_postings(bm25_cfg, stats, data, rows, cols, n)
    chunk_owner = np.searchsorted(positions, group.column("owner").to_numpy()[order])
    retriever = BM25Retriever(engine, Tokenizer.from_json(tokenizer), bm25_cfg, ChunkingConfig(**chunking), ids, chunk_owner)
    section = retriever.save(directory / BM25_DIR)
    cpu = float(pc.sum(group.column("cpu_s")).as_py() or 0.0) + time.process_time() - start
    return _finish_shard_part(directory, BM25_DIR, section, cpu, shard)


def _with_shard(batch: dict[str, np.ndarray], *, shard_of_ref: list) -> dict[str, np.ndarray]:
    """Task: tag each encoded chunk with its document's dense shard."""
    import ray

    shard_of = ray.get(shard_of_ref[0])
    return {**batch, "shard": shard_of[np.asarray(batch["owner"], dtype=np.int64)].astype(np.int32)}


def _write_dense_shard(group: dict[str, np.ndarray], *, positions_refs: list, dense: Mapping[str, Any], set_dir: str) -> Any:
    """Shard writer (task, one per shard): the shard's vectors, in document then chunk order, into
    its FAISS index (trained here for IVF), saved in the shard's directory."""
    import ray

    from serve_app.index.files import DENSE_DIR
    from serve_app.retrieval.dense import DenseRetriever

    start = time.process_time()
    shard = int(np.asarray(group["shard"])[0])
    positions = ray.get(positions_refs[shard])
    directory = Path(set_dir) / str(shard)
    ids = _shard_ids(directory)
    owner = np.asarray(group["owner"], dtype=np.int64)
    order = _check_shard_chunks(owner, np.asarray(group["seq"]), positions)
    vectors = np.ascontiguousarray(np.asarray(group["vector"], dtype=np.float32)[order])
    retriever = DenseRetriever.from_vectors(vectors, ids, DenseConfig(**dense), chunk_owner=np.searchsorted(positions, owner[order]))
    section = retriever.save(directory / DENSE_DIR)
    cpu = float(np.sum(group["cpu_s"])) + time.process_time() - start
    return _finish_shard_part(directory, DENSE_DIR, section, cpu, shard)


def _positions_refs(layout: _ShardLayout) -> list:
    """One object per shard: its document positions (each shard's task fetches its own)."""
    import ray

    return [ray.put(p) for p in layout.positions]


def _collect_parts(written: Any, layout: _ShardLayout, what: str) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]], float]:
    """The sections and file entries the shard writers returned, by shard; all must be there."""
    import json

    import pyarrow as pa
    import ray

    tables = [t for t in ray.get(written.to_arrow_refs()) if t.num_rows]  # partitions without a shard come back empty
    table = pa.concat_tables(tables) if tables else pa.table({"shard": pa.array([], pa.int32())})
    shards = table.column("shard").to_pylist()
    if sorted(shards) != list(range(len(layout.positions))):
        raise RayIndexBuildError(f"{what} shards written: {sorted(shards)}, expected 0..{len(layout.positions) - 1}")
    sections = {int(i): json.loads(x) for i, x in zip(shards, table.column("section").to_pylist())}
    files = {int(i): json.loads(x) for i, x in zip(shards, table.column("files").to_pylist())}
    return sections, files, float(sum(table.column("cpu_s").to_pylist()))


def write_bm25_shards(ds: Any, num_documents: int, cfg: BM25Config, chunking: ChunkingConfig, options: RayBuildOptions, batch: int, report: RayBuildReport, layout: _ShardLayout) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Score every posting on the actor pool (chunks numbered within their shard), group the
    postings by shard and let one task per shard assemble and save it: the driver never holds
    a posting."""
    import ray

    st = _bm25_statistics(ds, num_documents, cfg, chunking, options, batch, report)
    t0 = time.perf_counter()
    stats_ref = ray.put({**st.stats, "chunk_offset": layout.local_chunk_offsets(st.chunk_owner), "shard_of": layout.shard_of})
    positions_refs = _positions_refs(layout)
    scored = _map_batches(
        st.tokens, _ScoreBatch, batch_size=batch, batch_format="pyarrow", compute=_actors(options), num_cpus=1,
        fn_constructor_args=([stats_ref],), ray_remote_args_fn=_actor_retries(options),
    )
    with _quiet_remote_args():
        written = scored.groupby("shard", num_partitions=len(layout.positions)).map_groups(
            _write_bm25_shard, batch_format="pyarrow", num_cpus=1,
            fn_kwargs={"stats_ref": [stats_ref], "positions_refs": positions_refs, "tokenizer": st.tokenizer.to_json(), "cfg": cfg.model_dump(), "chunking": chunking.model_dump(), "set_dir": str(layout.set_dir)},
            **st.retry,
        )
        sections, files, cpu = _collect_parts(written, layout, "BM25")
    report.stage_seconds["bm25_score_and_write_shards"] = time.perf_counter() - t0
    report.worker_cpu_seconds["bm25_score_and_write_shards"] = cpu
    return sections, files


def _write_dense_shards(ds: Any, cfg: DenseConfig, chunking: ChunkingConfig, options: RayBuildOptions, batch: int, report: RayBuildReport, udf: type, layout: _ShardLayout) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Encode on the actor pool, group the vectors by shard and let one task per shard build and
    save its FAISS index: the driver never holds a vector."""
    import ray

    t0 = time.perf_counter()
    encoded = _encoded(ds, cfg, chunking, options, batch, udf)
    retry = {"ray_remote_args_fn": functools.partial(dict, max_retries=options.max_retries, retry_exceptions=True)}
    tagged = _map_batches(encoded, _with_shard, batch_format="numpy", compute=_tasks(options), num_cpus=1, fn_kwargs={"shard_of_ref": [ray.put(layout.shard_of)]}, **retry)
    positions_refs = _positions_refs(layout)
    with _quiet_remote_args():
        written = tagged.groupby("shard", num_partitions=len(layout.positions)).map_groups(
            _write_dense_shard, batch_format="numpy", num_cpus=1,
            fn_kwargs={"positions_refs": positions_refs, "dense": cfg.model_dump(), "set_dir": str(layout.set_dir)},
            **retry,
        )
        sections, files, cpu = _collect_parts(written, layout, "dense")
    report.stage_seconds["dense_encode_and_write_shards"] = time.perf_counter() - t0
    report.worker_cpu_seconds["dense_encode_and_write_shards"] = cpu
    return sections, files


def _read_part(batch: dict[str, np.ndarray], *, path: str) -> Any:
    """Task: the ``(position, content)`` rows of the documents stored in byte ranges of the
    staging ``documents.jsonl`` (one range per input item): the workers read the corpus, the
    driver never turns it into blocks."""
    import pyarrow as pa

    positions: list[int] = []
    contents: list[str] = []
    with open(path, "rb") as f:
        for offset, length, start in zip(batch["offset"].tolist(), batch["length"].tolist(), batch["start"].tolist()):
            f.seek(offset)
            for i, line in enumerate(f.read(length).splitlines()):
                obj = json.loads(line)
                positions.append(start + i)
                contents.append(Document(id=obj["id"], text=obj["text"], title=obj["title"]).content)
    return pa.table({"position": pa.array(positions, pa.int64()), "content": pa.array(contents, pa.string())})


def _stream_documents(documents: Iterable[Document], tmp: Path, part_documents: int) -> tuple[int, list[dict[str, int]]]:
    """Write ``documents`` once, as they come, into the staging directory's ``documents.jsonl``
    and ``documents.sqlite`` (which refuses a repeated id); returns their count and the byte
    range of every ``part_documents`` of them in ``documents.jsonl`` (the workers' input)."""
    from serve_app.corpus import CorpusError
    from serve_app.index.docstore import DOCSTORE, write_document_store
    from serve_app.index.files import DOCUMENTS

    parts: list[dict[str, int]] = []
    state = {"n": 0, "offset": 0, "part_start": 0, "part_offset": 0}
    with open(tmp / DOCUMENTS, "wb") as out:

        def close_part() -> None:
            if state["n"] > state["part_start"]:
                parts.append({"offset": state["part_offset"], "length": state["offset"] - state["part_offset"], "start": state["part_start"]})
            state["part_start"], state["part_offset"] = state["n"], state["offset"]

        def tee() -> Iterator[Document]:
            for d in documents:
                record = {"id": d.id, "title": d.title, "text": d.text, "metadata": dict(d.metadata)}
                try:
                    line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
                except (TypeError, ValueError) as exc:
                    raise CorpusError(f"document {d.id!r}: metadata is not JSON-serialisable ({exc})") from exc
                out.write(line)
                state["offset"] += len(line)
                state["n"] += 1
                if state["n"] - state["part_start"] >= part_documents:
                    close_part()
                yield d

        try:
            write_document_store(tee(), tmp / DOCSTORE)
        except ValueError as exc:
            if "repeated document id" in str(exc):
                raise CorpusError(f"the corpus repeats a document id ({str(exc).split('(', 1)[-1].rstrip(')')})") from None
            raise
        close_part()
        out.flush()
        os.fsync(out.fileno())
    return state["n"], parts


def _write_shard_documents(tmp: Path, layouts: Mapping[str, _ShardLayout]) -> dict[str, list[Any]]:
    """Each shard's ``documents.jsonl``: the staging ``documents.jsonl`` read once more, every
    line copied to its shard's file; returns each file's size and sha256, by retriever and shard."""
    from serve_app.index.files import DOCUMENTS, file_entries

    files: dict[str, list[Any]] = {}
    for layout in layouts.values():
        for i in range(len(layout.positions)):
            (layout.set_dir / str(i)).mkdir(parents=True)
    handles = {r: [open(layout.set_dir / str(i) / DOCUMENTS, "wb") for i in range(len(layout.positions))] for r, layout in layouts.items()}
    try:
        with open(tmp / DOCUMENTS, "rb") as f:
            for p, line in enumerate(f):
                for r, layout in layouts.items():
                    handles[r][int(layout.shard_of[p])].write(line)
    finally:
        for hs in handles.values():
            for h in hs:
                h.close()
    for r, layout in layouts.items():
        files[r] = [file_entries(layout.set_dir / str(i))[DOCUMENTS] for i in range(len(layout.positions))]
    return files


def build_index_ray_shards_only(
    corpus: Iterable[Document] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    bm25: BM25Config | None,
    dense: DenseConfig | None,
    chunking: ChunkingConfig,
    shards: Mapping[str, int],
    options: RayBuildOptions = RayBuildOptions(),
    encode_udf: Optional[type] = None,
    shard_of: Optional[Mapping[str, Any]] = None,
    writes: Optional[dict[str, Any]] = None,
    on_error: str = "raise",
) -> tuple[Any, RayBuildReport]:
    """Build on Ray an index whose every retriever exists only as its shard set (``shards`` must
    give each built retriever a count above 1), each shard written by a worker, the corpus read
    by the workers (see the module docstring). Returns the manifest written and a
    :class:`RayBuildReport` (with the bad lines skipped and the empty documents left out when
    ``corpus`` is a source).

    ``corpus``: a corpus source (a JSONL file, a BEIR directory, ``builtin:demo``: read one
    document at a time, ``on_error`` as in :func:`serve_app.corpus.read_corpus`) or documents.
    The driver streams them once into the document store and ``documents.jsonl``, whose byte
    ranges the workers then read; it holds the BM25 statistics (a few bytes per chunk) and the
    manifests, not the corpus. ``out_dir`` must be on storage every node mounts at the same
    path. ``shard_of`` (a merge of live writes) maps a retriever to each document's shard, in
    corpus order, instead of contiguous ranges; it is read once the documents are consumed, so
    a generator of documents may fill it. ``writes`` is the manifest's record of that merge.
    ``encode_udf`` as in :func:`~serve_app.index.ray_build.build_index_ray`.

    Example (on the cluster this process is connected to, or a local instance)::

        manifest, report = build_index_ray_shards_only(
            "/mnt/shared/corpus.jsonl.gz", "/mnt/shared/idx", bm25=BM25Config(), dense=DenseConfig(),
            chunking=ChunkingConfig(), shards={"bm25": 20, "dense": 10}, options=RayBuildOptions(workers=64),
        )
    """
    from serve_app.corpus import SkippedLine, corpus_path, iter_corpus, no_documents
    from serve_app.fsutil import staging_dir, swap_into_place
    from serve_app.index.build import IndexBuildError, _check_target
    from serve_app.index.files import BM25_DIR, MANIFEST, file_entries
    from serve_app.index.shards import shard_set_dir
    from serve_app.retrieval.bm25 import Tokenizer

    check_ray_buildable(bm25)
    if bm25 is None and dense is None:
        raise ValueError("nothing to build: give a BM25 config, a dense config, or both")
    wanted = {r: n for r, n in shards.items() if n > 1}
    for r in wanted:
        if {"bm25": bm25, "dense": dense}.get(r) is None:
            raise ValueError(f"shards: {r} is not built in this index")
    unsharded = [r for r, c in (("bm25", bm25), ("dense", dense)) if c is not None and r not in wanted]
    if unsharded:
        raise ValueError(f"a shards-only build needs a shard count above 1 for every retriever it builds (none for {', '.join(unsharded)})")
    out = Path(out_dir).absolute()
    _check_target(out, MANIFEST)
    skipped: list[SkippedLine] = []
    empty: list[str] = []
    source = None
    if isinstance(corpus, (str, os.PathLike)):
        source = corpus_path(corpus)
        documents: Iterable[Document] = iter_corpus(source, on_error=on_error, skipped=skipped, empty=empty)  # type: ignore[arg-type]
    else:
        documents = corpus
    encode_udf = encode_udf or EncodeBatch
    encoder_facts: dict[str, Any] = {}
    if dense is not None:  # fail here, not in every actor, when the model cannot be loaded
        from serve_app.retrieval.dense import BiEncoder

        enc = BiEncoder(dense.model_copy(update={"device": "cpu"}))
        encoder_facts = {"model": enc.model_name, "max_length": enc.max_length, "query_prefix": enc.cfg.query_prefix, "document_prefix": enc.cfg.document_prefix}
    batch = options.batch_documents or 8 * (dense.batch_size if dense is not None else 64)
    report = RayBuildReport(workers=options.workers, skipped=skipped, empty=empty)
    num_cpus = None if options.address else max(os.cpu_count() or 1, math.ceil(options.workers * options.cpus_per_worker))
    with staging_dir(out) as tmp:
        t0 = time.perf_counter()
        n, parts_in = _stream_documents(documents, tmp, batch)
        if n == 0:
            if source is not None:
                raise no_documents(source, skipped, empty)
            raise ValueError("cannot index an empty corpus")
        report.documents = n
        if bm25 is not None:  # the tokenizer, for the writer of live writes and for tools
            (tmp / BM25_DIR).mkdir()
            with open(tmp / BM25_DIR / "tokenizer.json", "w", encoding="utf-8") as f:
                json.dump(Tokenizer.from_config(bm25).to_json(), f)
        top_files = file_entries(tmp)
        try:
            layouts = {r: _ShardLayout.of(r, shard_set_dir(tmp, r, k), n, k, (shard_of or {}).get(r)) for r, k in wanted.items()}
        except ValueError as exc:
            raise IndexBuildError(str(exc)) from None
        shard_docs = _write_shard_documents(tmp, layouts)
        report.stage_seconds["write_documents"] = time.perf_counter() - t0
        parts: dict[str, tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]] = {}
        with ray_session(options.address, num_cpus=num_cpus, log_to_driver=False):
            import ray
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = options.show_progress
            retry = {"ray_remote_args_fn": functools.partial(dict, max_retries=options.max_retries, retry_exceptions=True)}
            # read once, by tasks, into the cluster's object stores (the workers' nodes): the
            # BM25 and dense stages both read these blocks, and the encoder pool's actors, which
            # hold their CPUs, never wait on reading tasks that have none left
            ds = _map_batches(
                ray.data.from_items(parts_in), _read_part, batch_size=1, batch_format="numpy", compute=_tasks(options), num_cpus=1,
                fn_kwargs={"path": str(tmp / "documents.jsonl")}, **retry,
            ).materialize()
            try:
                if bm25 is not None:
                    parts["bm25"] = write_bm25_shards(ds, n, bm25, chunking, options, batch, report, layouts["bm25"])
                if dense is not None:
                    sections, files = _write_dense_shards(ds, dense, chunking, options, batch, report, encode_udf, layouts["dense"])
                    parts["dense"] = ({i: {**s, **encoder_facts} for i, s in sections.items()}, files)  # as the driver's encoder names them
            except (ValueError, RayIndexBuildError):
                raise
            except Exception as exc:  # RayTaskError, ActorDiedError, ... after Ray's retries
                raise RayIndexBuildError(f"the Ray index build failed after retries: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}") from exc
        t0 = time.perf_counter()
        manifest = write_shards_only(tmp, n, layouts, parts, shard_docs, top_files, chunking=chunking, writes=writes)
        swap_into_place(tmp, out)
    report.chunks = manifest.corpus.num_chunks
    report.stage_seconds["write"] = time.perf_counter() - t0
    logger.info("shards-only index written to %s by Ray (%d documents, %s, %d workers, %.1f s)", out, n, ", ".join(f"{r}-{k}" for r, k in wanted.items()), options.workers, report.seconds)
    return manifest, report


def write_shards_only(
    tmp: Path,
    num_documents: int,
    layouts: Mapping[str, _ShardLayout],
    parts: Mapping[str, tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]],
    shard_docs: Mapping[str, list[Any]],
    top_files: Mapping[str, Any],
    *,
    chunking: ChunkingConfig,
    writes: Optional[dict[str, Any]],
) -> Any:
    """Every manifest of a shards-only index from what the shard writers returned: each shard's
    ``manifest.json``, each set's ``shards.json``, and the top-level manifest, whose retriever
    sections describe the whole index (documents, chunks, vocabulary) and say ``shards_only``
    (the number of shards): loading the retriever whole is refused with that explanation."""
    import serve_app
    from serve_app.index.build import _now
    from serve_app.index.files import FORMAT_VERSION, MANIFEST, CorpusInfo, FileEntry, Manifest, library_versions, write_json_durably
    from serve_app.index.shards import SHARDS_FORMAT_VERSION, SHARDS_MANIFEST, ShardInfo, ShardSetManifest

    created = _now()
    corpus_sha = top_files["documents.jsonl"].sha256
    top_sections: dict[str, Optional[dict[str, Any]]] = {"bm25": None, "dense": None}
    num_chunks = 0
    for r, layout in layouts.items():
        sections, files = parts[r]
        infos = []
        for i, p in enumerate(layout.positions):
            section = sections[i]
            shard_files = {"documents.jsonl": shard_docs[r][i], **{k: FileEntry(**v) for k, v in files[i].items()}}
            chunks = int(section["num_chunks"] if r == "bm25" else section["num_vectors"])
            write_json_durably(layout.set_dir / str(i) / MANIFEST, Manifest(
                format_version=FORMAT_VERSION, created_at=created, serve_app_version=serve_app.__version__,
                corpus=CorpusInfo(num_documents=int(p.size), num_chunks=chunks, sha256=shard_docs[r][i].sha256),
                chunking=chunking, bm25=section if r == "bm25" else None, dense=section if r == "dense" else None,
                libraries=library_versions(), files=shard_files,
            ))
            infos.append(ShardInfo(index=i, directory=str(i), start=int(p[0]) if layout.contiguous else 0, end=int(p[-1]) + 1 if layout.contiguous else int(p.size)))
        write_json_durably(layout.set_dir / SHARDS_MANIFEST, ShardSetManifest(
            format_version=SHARDS_FORMAT_VERSION, created_at=created, assignment="contiguous" if layout.contiguous else "owner",
            num_shards=len(layout.positions), num_documents=num_documents, corpus_sha256=corpus_sha, retrievers=[r],  # type: ignore[list-item]
            bm25_statistics="global" if r == "bm25" else None, shards=infos,
        ))
        num_chunks = sum(int(s["num_chunks"] if r == "bm25" else s["num_vectors"]) for s in sections.values())
        whole = {**sections[0], "num_documents": num_documents, "shards_only": len(layout.positions)}
        whole["num_chunks" if r == "bm25" else "num_vectors"] = num_chunks
        if r == "dense":
            whole["files"] = []
        top_sections[r] = whole
    manifest = Manifest(
        format_version=FORMAT_VERSION, created_at=created, serve_app_version=serve_app.__version__,
        corpus=CorpusInfo(num_documents=num_documents, num_chunks=num_chunks, sha256=corpus_sha),
        chunking=chunking, bm25=top_sections["bm25"], dense=top_sections["dense"], libraries=library_versions(),
        writes=writes, files=dict(top_files),
    )
    write_json_durably(tmp / MANIFEST, manifest)
    return manifest
