"""Shards-only Ray builds: every shard written by a Ray task, the driver holding no posting and
no vector (``serve-app index --ray --shards-only``, :func:`build_index_ray_shards_only`; the
building blocks are :mod:`serve_app.index.ray_build`'s)::

    driver: documents.jsonl, documents.sqlite, each shard's documents.jsonl (from the corpus)
      BM25   tokenise, statistics (as a whole build: vocabulary, df, chunk lengths on the driver)
             score postings (actor pool), chunks numbered within their shard
             -> Ray Data shuffle by shard -> one task per shard: its bm25s matrix, saved
      dense  encode (actor pool) -> shuffle by shard -> one task per shard: its FAISS index, saved
    driver: the sections and file checksums the shard tasks return -> every manifest; swap

A shard's scores are the whole corpus's (statistics gathered first, as in a whole build), so
its index equals the one :func:`serve_app.index.build.build_shard_set` cuts from a whole build,
posting for posting. The shard tasks write into the staging directory: it must be on storage
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
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from serve_app.config import BM25Config, ChunkingConfig, DenseConfig
from serve_app.corpus import Corpus
from serve_app.index.ray_build import (
    EncodeBatch,
    RayBuildOptions,
    RayBuildReport,
    RayIndexBuildError,
    _actor_retries,
    _actors,
    _build_bm25,
    _encoded,
    check_ray_buildable,
    _input_dataset,
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

    @classmethod
    def of(cls, retriever: str, set_dir: Path, num_documents: int, num_shards: int, assignment: Optional[Sequence[Sequence[int]]]) -> "_ShardLayout":
        from serve_app.retrieval.sharding import shard_bounds

        if assignment is not None:
            positions = [np.asarray(p, dtype=np.int64) for p in assignment]
        else:
            positions = [np.arange(a, b, dtype=np.int64) for a, b in shard_bounds(num_documents, num_shards)]
        shard_of = np.full(num_documents, -1, dtype=np.int32)
        for i, p in enumerate(positions):
            shard_of[p] = i
        if len(positions) != num_shards or np.any(shard_of < 0) or sum(p.size for p in positions) != num_documents or any(p.size == 0 or np.any(np.diff(p) <= 0) for p in positions):
            raise ValueError(f"the {retriever} assignment must place each of the {num_documents} documents in exactly one of {num_shards} non-empty shards, in ascending order")
        return cls(retriever, set_dir, positions, shard_of)

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


def _write_bm25_shard(group: Any, *, stats_ref: list, ids_refs: list, positions_refs: list, tokenizer: Mapping[str, Any], cfg: Mapping[str, Any], chunking: Mapping[str, Any], set_dir: str) -> Any:
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
    ids = ray.get(ids_refs[shard])
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
    directory = Path(set_dir) / str(shard)
    section = retriever.save(directory / BM25_DIR)
    cpu = float(pc.sum(group.column("cpu_s")).as_py() or 0.0) + time.process_time() - start
    return _finish_shard_part(directory, BM25_DIR, section, cpu, shard)


def _with_shard(batch: dict[str, np.ndarray], *, shard_of_ref: list) -> dict[str, np.ndarray]:
    """Task: tag each encoded chunk with its document's dense shard."""
    import ray

    shard_of = ray.get(shard_of_ref[0])
    return {**batch, "shard": shard_of[np.asarray(batch["owner"], dtype=np.int64)].astype(np.int32)}


def _write_dense_shard(group: dict[str, np.ndarray], *, ids_refs: list, positions_refs: list, dense: Mapping[str, Any], set_dir: str) -> Any:
    """Shard writer (task, one per shard): the shard's vectors, in document then chunk order, into
    its FAISS index (trained here for IVF), saved in the shard's directory."""
    import ray

    from serve_app.index.files import DENSE_DIR
    from serve_app.retrieval.dense import DenseRetriever

    start = time.process_time()
    shard = int(np.asarray(group["shard"])[0])
    positions = ray.get(positions_refs[shard])
    ids = ray.get(ids_refs[shard])
    owner = np.asarray(group["owner"], dtype=np.int64)
    order = _check_shard_chunks(owner, np.asarray(group["seq"]), positions)
    vectors = np.ascontiguousarray(np.asarray(group["vector"], dtype=np.float32)[order])
    retriever = DenseRetriever.from_vectors(vectors, ids, DenseConfig(**dense), chunk_owner=np.searchsorted(positions, owner[order]))
    directory = Path(set_dir) / str(shard)
    section = retriever.save(directory / DENSE_DIR)
    cpu = float(np.sum(group["cpu_s"])) + time.process_time() - start
    return _finish_shard_part(directory, DENSE_DIR, section, cpu, shard)


def _shard_refs(corpus: Corpus, layout: _ShardLayout) -> tuple[list, list]:
    """One object per shard: its document ids, and its positions (each worker fetches its own)."""
    import ray

    ids = corpus.ids
    return [ray.put([ids[j] for j in p.tolist()]) for p in layout.positions], [ray.put(p) for p in layout.positions]


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


def write_bm25_shards(tokens: Any, stats: dict[str, Any], chunk_owner: np.ndarray, tokenizer: Any, retry: Mapping[str, Any], *, corpus: Corpus, cfg: BM25Config, chunking: ChunkingConfig, options: RayBuildOptions, batch: int, report: RayBuildReport, layout: _ShardLayout) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Score every posting on the actor pool (chunks numbered within their shard), group the
    postings by shard and let one task per shard assemble and save it: the driver never holds
    a posting."""
    import ray

    t0 = time.perf_counter()
    stats_ref = ray.put({**stats, "chunk_offset": layout.local_chunk_offsets(chunk_owner), "shard_of": layout.shard_of})
    scored = _map_batches(
        tokens, _ScoreBatch, batch_size=batch, batch_format="pyarrow", compute=_actors(options), num_cpus=1,
        fn_constructor_args=([stats_ref],), ray_remote_args_fn=_actor_retries(options),
    )
    ids_refs, positions_refs = _shard_refs(corpus, layout)
    with _quiet_remote_args():
        written = scored.groupby("shard", num_partitions=len(layout.positions)).map_groups(
            _write_bm25_shard, batch_format="pyarrow", num_cpus=1,
            fn_kwargs={"stats_ref": [stats_ref], "ids_refs": ids_refs, "positions_refs": positions_refs, "tokenizer": tokenizer.to_json(), "cfg": cfg.model_dump(), "chunking": chunking.model_dump(), "set_dir": str(layout.set_dir)},
            **retry,
        )
        sections, files, cpu = _collect_parts(written, layout, "BM25")
    report.stage_seconds["bm25_score_and_write_shards"] = time.perf_counter() - t0
    report.worker_cpu_seconds["bm25_score_and_write_shards"] = cpu
    return sections, files


def _write_dense_shards(ds: Any, corpus: Corpus, cfg: DenseConfig, chunking: ChunkingConfig, options: RayBuildOptions, batch: int, report: RayBuildReport, udf: type, layout: _ShardLayout) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Encode on the actor pool, group the vectors by shard and let one task per shard build and
    save its FAISS index: the driver never holds a vector."""
    import ray

    t0 = time.perf_counter()
    encoded = _encoded(ds, cfg, chunking, options, batch, udf)
    retry = {"ray_remote_args_fn": functools.partial(dict, max_retries=options.max_retries, retry_exceptions=True)}
    tagged = _map_batches(encoded, _with_shard, batch_format="numpy", compute=_tasks(options), num_cpus=1, fn_kwargs={"shard_of_ref": [ray.put(layout.shard_of)]}, **retry)
    ids_refs, positions_refs = _shard_refs(corpus, layout)
    with _quiet_remote_args():
        written = tagged.groupby("shard", num_partitions=len(layout.positions)).map_groups(
            _write_dense_shard, batch_format="numpy", num_cpus=1,
            fn_kwargs={"ids_refs": ids_refs, "positions_refs": positions_refs, "dense": cfg.model_dump(), "set_dir": str(layout.set_dir)},
            **retry,
        )
        sections, files, cpu = _collect_parts(written, layout, "dense")
    report.stage_seconds["dense_encode_and_write_shards"] = time.perf_counter() - t0
    report.worker_cpu_seconds["dense_encode_and_write_shards"] = cpu
    return sections, files


def build_index_ray_shards_only(
    corpus: Sequence[Document],
    out_dir: str | os.PathLike[str],
    *,
    bm25: BM25Config | None,
    dense: DenseConfig | None,
    chunking: ChunkingConfig,
    shards: Mapping[str, int],
    options: RayBuildOptions = RayBuildOptions(),
    encode_udf: Optional[type] = None,
    assignments: Optional[Mapping[str, Sequence[Sequence[int]]]] = None,
    writes: Optional[dict[str, Any]] = None,
) -> tuple[Any, RayBuildReport]:
    """Build on Ray an index whose every retriever exists only as its shard set (``shards`` must
    give each built retriever a count above 1), each shard written by a worker (see the module
    docstring). Returns the manifest written and a :class:`RayBuildReport`.

    The driver writes the document store and each shard's ``documents.jsonl``, gathers the BM25
    statistics (vocabulary, document frequencies, chunk lengths) and, at the end, the sections
    and file checksums the shard tasks return, from which it writes every manifest; then the
    atomic swap. ``out_dir`` must be on storage every node mounts at the same path.
    ``assignments`` (a merge of live writes) gives each shard's document positions instead of
    contiguous ranges; ``writes`` is the manifest's record of that merge. ``encode_udf`` as in
    :func:`~serve_app.index.ray_build.build_index_ray`.

    Example (on the cluster this process is connected to, or a local instance)::

        manifest, report = build_index_ray_shards_only(
            load_corpus("corpus.jsonl"), "/mnt/shared/idx", bm25=BM25Config(), dense=DenseConfig(),
            chunking=ChunkingConfig(), shards={"bm25": 20, "dense": 10}, options=RayBuildOptions(workers=64),
        )
    """
    from serve_app.corpus import write_documents_jsonl
    from serve_app.fsutil import staging_dir, swap_into_place
    from serve_app.index.build import check_build_request
    from serve_app.index.docstore import DOCSTORE, write_document_store
    from serve_app.index.files import BM25_DIR, DOCUMENTS, file_entries
    from serve_app.index.shards import shard_set_dir
    from serve_app.retrieval.bm25 import Tokenizer

    check_ray_buildable(bm25)
    corpus, out, wanted = check_build_request(corpus, out_dir, bm25=bm25, dense=dense, shards=shards)
    unsharded = [r for r, c in (("bm25", bm25), ("dense", dense)) if c is not None and r not in wanted]
    if unsharded:
        raise ValueError(f"a shards-only build needs a shard count above 1 for every retriever it builds (none for {', '.join(unsharded)})")
    encode_udf = encode_udf or EncodeBatch

    encoder_facts: dict[str, Any] = {}
    if dense is not None:  # fail here, not in every actor, when the model cannot be loaded
        from serve_app.retrieval.dense import BiEncoder

        enc = BiEncoder(dense.model_copy(update={"device": "cpu"}))
        encoder_facts = {"model": enc.model_name, "max_length": enc.max_length, "query_prefix": enc.cfg.query_prefix, "document_prefix": enc.cfg.document_prefix}
    batch = options.batch_documents or 8 * (dense.batch_size if dense is not None else 64)
    report = RayBuildReport(documents=len(corpus), workers=options.workers)
    num_cpus = None if options.address else max(os.cpu_count() or 1, math.ceil(options.workers * options.cpus_per_worker))
    with staging_dir(out) as tmp:
        t0 = time.perf_counter()
        write_documents_jsonl(corpus, tmp / DOCUMENTS)
        write_document_store(corpus, tmp / DOCSTORE)
        if bm25 is not None:  # the tokenizer, for the writer of live writes and for tools
            (tmp / BM25_DIR).mkdir()
            with open(tmp / BM25_DIR / "tokenizer.json", "w", encoding="utf-8") as f:
                json.dump(Tokenizer.from_config(bm25).to_json(), f)
        top_files = file_entries(tmp)
        layouts = {r: _ShardLayout.of(r, shard_set_dir(tmp, r, n), len(corpus), n, (assignments or {}).get(r)) for r, n in wanted.items()}
        shard_docs: dict[str, list[Any]] = {}
        for r, layout in layouts.items():
            for i, p in enumerate(layout.positions):
                d = layout.set_dir / str(i)
                d.mkdir(parents=True)
                write_documents_jsonl(Corpus([corpus[j] for j in p.tolist()]), d / DOCUMENTS)
                shard_docs.setdefault(r, []).append(file_entries(d)[DOCUMENTS])
        report.stage_seconds["write_documents"] = time.perf_counter() - t0
        parts: dict[str, tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]] = {}
        with ray_session(options.address, num_cpus=num_cpus, log_to_driver=False):
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = options.show_progress
            ds = _input_dataset(corpus, batch, options.workers)
            try:
                if bm25 is not None:
                    then = functools.partial(write_bm25_shards, corpus=corpus, cfg=bm25, chunking=chunking, options=options, batch=batch, report=report, layout=layouts["bm25"])
                    parts["bm25"] = _build_bm25(ds, corpus, bm25, chunking, options, batch, report, then)
                if dense is not None:
                    sections, files = _write_dense_shards(ds, corpus, dense, chunking, options, batch, report, encode_udf, layouts["dense"])
                    parts["dense"] = ({i: {**s, **encoder_facts} for i, s in sections.items()}, files)  # as the driver's encoder names them
            except (ValueError, RayIndexBuildError):
                raise
            except Exception as exc:  # RayTaskError, ActorDiedError, ... after Ray's retries
                raise RayIndexBuildError(f"the Ray index build failed after retries: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}") from exc
        t0 = time.perf_counter()
        manifest = write_shards_only(
            tmp, corpus, layouts, parts, shard_docs, top_files, chunking=chunking, writes=writes, assignments=assignments,
        )
        swap_into_place(tmp, out)
    report.chunks = manifest.corpus.num_chunks
    report.stage_seconds["write"] = time.perf_counter() - t0
    logger.info("shards-only index written to %s by Ray (%d documents, %s, %d workers, %.1f s)", out, len(corpus), ", ".join(f"{r}-{n}" for r, n in wanted.items()), options.workers, report.seconds)
    return manifest, report


def write_shards_only(
    tmp: Path,
    corpus: Corpus,
    layouts: Mapping[str, _ShardLayout],
    parts: Mapping[str, tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]],
    shard_docs: Mapping[str, list[Any]],
    top_files: Mapping[str, Any],
    *,
    chunking: ChunkingConfig,
    writes: Optional[dict[str, Any]],
    assignments: Optional[Mapping[str, Sequence[Sequence[int]]]],
) -> Any:
    """Every manifest of a shards-only index from what the shard writers returned: each shard's
    ``manifest.json``, each set's ``shards.json``, and the top-level manifest, whose retriever
    sections describe the whole index (documents, chunks, vocabulary) and say ``shards_only``
    (the number of shards): loading the retriever whole is refused with that explanation."""
    import serve_app
    from serve_app.index.files import FORMAT_VERSION, MANIFEST, CorpusInfo, FileEntry, Manifest, library_versions, write_json_durably
    from serve_app.index.shards import SHARDS_FORMAT_VERSION, SHARDS_MANIFEST, ShardInfo, ShardSetManifest

    from serve_app.index.build import _now

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
            contiguous = assignments is None or r not in assignments
            infos.append(ShardInfo(index=i, directory=str(i), start=int(p[0]) if contiguous else 0, end=int(p[-1]) + 1 if contiguous else int(p.size)))
        write_json_durably(layout.set_dir / SHARDS_MANIFEST, ShardSetManifest(
            format_version=SHARDS_FORMAT_VERSION, created_at=created, assignment="contiguous" if assignments is None or r not in assignments else "owner",
            num_shards=len(layout.positions), num_documents=len(corpus), corpus_sha256=corpus_sha, retrievers=[r],  # type: ignore[list-item]
            bm25_statistics="global" if r == "bm25" else None, shards=infos,
        ))
        total = sum(int(s["num_chunks"] if r == "bm25" else s["num_vectors"]) for s in sections.values())
        num_chunks = total
        whole = {**sections[0], "num_documents": len(corpus), "shards_only": len(layout.positions)}
        whole["num_chunks" if r == "bm25" else "num_vectors"] = total
        if r == "dense":
            whole["files"] = []
        top_sections[r] = whole
    manifest = Manifest(
        format_version=FORMAT_VERSION, created_at=created, serve_app_version=serve_app.__version__,
        corpus=CorpusInfo(num_documents=len(corpus), num_chunks=num_chunks, sha256=corpus_sha),
        chunking=chunking, bm25=top_sections["bm25"], dense=top_sections["dense"], libraries=library_versions(),
        writes=writes, files=dict(top_files),
    )
    write_json_durably(tmp / MANIFEST, manifest)
    return manifest
