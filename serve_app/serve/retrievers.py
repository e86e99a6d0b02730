"""The retriever servers: :class:`BM25Server` and :class:`DenseServer` (one shard each when
sharded) and, for a sharded dense retriever, :class:`QueryEncoderServer`; plain classes the
builder (:mod:`serve_app.serve.app`) turns into deployments."""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from typing import Any, Optional

import numpy as np

from serve_app.serve import metrics, tracing
from serve_app.serve.config import ENV_DENSE_MODEL, BM25ServerConfig, DenseServerConfig, FaultInjection, QueryEncoderServerConfig, RetrieverUserConfig, parse_user_config
from serve_app.serve.replica import apply_fault, index_dir_of, load_or_explain, replica_id, serve_batch
from serve_app.serve.shards import QUERY_ENCODER_KEY
from serve_app.types import Hit


def _follows_log(cfg: Any, writer: Any) -> bool:
    """Whether the replica follows the writer's log (live writes): its searches then read a live
    view, never the base retriever loaded at start."""
    return cfg.writes is not None and writer is not None


def _follow(what: str, stage: str, cfg: Any, writer: Any, build_view: Any, *, needs_stats: bool = False) -> Any:
    """The replica's :class:`~serve_app.serve.live_replica.LiveReplica` when live writes are on, else None."""
    if not _follows_log(cfg, writer):
        return None
    from serve_app.serve.live_replica import LiveReplica, source_of

    return LiveReplica(what, cfg.index_dir, source_of(writer), build_view, cfg.writes, needs_stats=needs_stats, stage=stage)


def _span_attrs(shard: Any, k: int, at_seq: Optional[int], where: Any) -> dict[str, Any]:
    """Attributes of a retriever replica's search span: its shard, k, the batch it reads, filtered."""
    return {"serve_app.shard": None if shard is None else f"{shard.index}/{shard.num_shards}", "serve_app.top_k": k, "serve_app.seq": at_seq, "serve_app.filtered": where is not None}


class BM25Server:
    """Top-k BM25 documents for a query.

    With live writes (``cfg.writes`` and the ``DocumentWriter``'s handle) the replica follows the
    writer's log: searches read a :class:`~serve_app.live.bm25.LiveBM25` as of the batch the
    ingress pins (``at_seq``), exact after every write."""

    def __init__(self, cfg: BM25ServerConfig, writer: Any = None) -> None:
        from serve_app.index import load_bm25, load_metadata_columns

        self.shard = cfg.shard  # this replica serves one shard of the index (serve_app.serve.shards)
        self.index_dir = index_dir_of("BM25Retriever", cfg.index_dir, "bm25", cfg.shard)
        self.retriever = load_or_explain("BM25Retriever", load_bm25, self.index_dir)
        self.fields = dict(cfg.fields)
        if not _follows_log(cfg, writer):  # a live replica's view builds the columns from the documents it loads anyway
            self.retriever.columns = load_or_explain("BM25Retriever", load_metadata_columns, self.index_dir, self.retriever.doc_ids, self.fields)
        self.fault = FaultInjection()
        self.live = _follow("BM25Retriever", "bm25", cfg, writer, self._live_view, needs_stats=cfg.shard is not None)

    def _live_view(self, info: dict[str, Any]) -> Any:
        from serve_app.index import load_bm25, load_documents
        from serve_app.live.bm25 import LiveBM25

        d = self.index_dir
        return LiveBM25(load_bm25(d), list(load_documents(d)[0]), info.get("stats"), base_seq=info["base_seq"], shard=self.shard.index if self.shard else None, fields=self.fields)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.fault = parse_user_config(RetrieverUserConfig, user_config, "BM25Retriever").fault

    async def search(self, query: str, k: int, at_seq: Optional[int] = None, where: Any = None) -> list[Hit]:
        """Top-``k`` documents; with live writes as of batch ``at_seq`` (default: the latest
        applied); with a filter ``where`` (:mod:`serve_app.filters`), among the documents it admits."""
        await apply_fault(self.fault, "bm25")
        t0 = time.perf_counter()
        with tracing.span("serve_app.bm25.search", **_span_attrs(self.shard, k, at_seq, where)) as sp:
            if self.live is not None:
                view = await self.live.view_at(at_seq)
                hits = await asyncio.to_thread(view.search, query, k, at_seq, where)
            else:
                hits = await asyncio.to_thread(self.retriever.search, query, k, where)
            tracing.annotate(sp, **{"serve_app.hits": len(hits)})
        metrics.observe_latency("bm25_search", (time.perf_counter() - t0) * 1000)
        return hits

    async def ping(self) -> dict[str, Any]:
        await apply_fault(self.fault, "bm25")
        out = {"stage": "bm25", "documents": self.retriever.num_documents, "replica": replica_id(), "shard": self.shard.model_dump() if self.shard else None}
        if self.live is not None:
            out["writes"] = self.live.state()
            if not self.live.ready:
                raise RuntimeError(f"catching up with the writer's log ({self.live.error or 'starting'})")
        return out

    async def check_health(self) -> None:
        """The memory-mapped index answers: a term lookup over its postings runs."""
        await asyncio.to_thread(self.retriever.search, "health", 1)


class DenseServer:
    """Top-k documents by embedding similarity; concurrent queries share one encoder call and
    one FAISS search per distinct k.

    Unsharded (``encode_queries``), a replica encodes the queries it is sent (``search``): one
    hop. A shard of a sharded dense retriever loads no model: it searches the vectors that
    :class:`QueryEncoderServer` computed once per query for every shard (``search_vector``).
    """

    def __init__(self, cfg: DenseServerConfig, writer: Any = None) -> None:
        from serve_app.index import load_dense, load_metadata_columns

        self.shard = cfg.shard
        self.encodes = cfg.encode_queries
        self.cfg = cfg
        self.index_dir = index_dir_of("DenseRetriever", cfg.index_dir, "dense", cfg.shard)
        hint = f"For the Serve app, {ENV_DENSE_MODEL}=/path/to/model also overrides dense.model."
        self.retriever = load_or_explain("DenseRetriever", functools.partial(load_dense, load_encoder=cfg.encode_queries), self.index_dir, cfg.dense, hint=hint)
        if not _follows_log(cfg, writer):  # a live replica's view loads the columns for its own base
            self.retriever.columns = load_or_explain("DenseRetriever", load_metadata_columns, self.index_dir, self.retriever.doc_ids, dict(cfg.fields))
        self.model_name = cfg.dense.model
        self.fault = FaultInjection()
        self._search_batched = serve_batch(self._search_many_async, cfg.batching)
        self.live = _follow("DenseRetriever", "dense", cfg, writer, self._live_view)

    def _live_view(self, info: dict[str, Any]) -> Any:
        from serve_app.index import load_dense, load_metadata_columns
        from serve_app.live.dense import LiveDense

        base = load_dense(self.index_dir, self.cfg.dense, load_encoder=False)
        columns = load_metadata_columns(self.index_dir, base.doc_ids, dict(self.cfg.fields))
        return LiveDense(base, base_seq=info["base_seq"], shard=self.shard.index if self.shard else None, columns=columns)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.fault = parse_user_config(RetrieverUserConfig, user_config, "DenseRetriever").fault

    async def search(self, query: str, k: int, at_seq: Optional[int] = None, where: Any = None) -> list[Hit]:
        """Top-``k`` documents for ``query`` (encoded here); with live writes as of batch ``at_seq``;
        with a filter ``where``, among the documents it admits."""
        if not self.encodes:
            raise RuntimeError("this dense shard loads no query encoder: send it vectors (search_vector)")
        await apply_fault(self.fault, "dense")
        with tracing.span("serve_app.dense.search", **_span_attrs(self.shard, k, at_seq, where), **{"serve_app.encodes_query": True}) as sp:
            await self._pin(at_seq)
            hits = await self._search_batched((query, k, at_seq, where))
            tracing.annotate(sp, **{"serve_app.hits": len(hits)})
            return hits

    async def search_vector(self, vector: Any, k: int, at_seq: Optional[int] = None, where: Any = None) -> list[Hit]:
        """Top-``k`` documents for a query vector (from :class:`QueryEncoderServer`)."""
        await apply_fault(self.fault, "dense")
        with tracing.span("serve_app.dense.search", **_span_attrs(self.shard, k, at_seq, where), **{"serve_app.encodes_query": False}) as sp:
            await self._pin(at_seq)
            hits = await self._search_batched((np.asarray(vector, dtype=np.float32).reshape(-1), k, at_seq, where))
            tracing.annotate(sp, **{"serve_app.hits": len(hits)})
            return hits

    async def _pin(self, at_seq: Optional[int]) -> None:
        if self.live is not None:
            await self.live.view_at(at_seq)  # the batch this search reads is applied here

    async def _search_many_async(self, requests: list[tuple[Any, int, Optional[int]]]) -> list[list[Hit]]:
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self._search_many, requests)
        metrics.observe_latency("dense_search", (time.perf_counter() - t0) * 1000)
        return out

    def _search_many(self, requests: list[tuple[Any, ...]]) -> list[list[Hit]]:
        """One encoder call for the queries sent as text, then one FAISS search per distinct
        (k, batch read as of, filter)."""
        texts = [i for i, r in enumerate(requests) if isinstance(r[0], str)]
        vectors = np.empty((len(requests), self.retriever.dim), dtype=np.float32)
        if texts:
            vectors[texts] = self.retriever.encoder.encode_queries([requests[i][0] for i in texts])
        for i, r in enumerate(requests):
            if not isinstance(r[0], str):
                vectors[i] = r[0]
        out: list[list[Hit]] = [[] for _ in requests]
        groups: dict[tuple[int, Optional[int], Any], list[int]] = collections.defaultdict(list)
        for i, r in enumerate(requests):
            groups[(int(r[1]), r[2] if len(r) > 2 else None, r[3] if len(r) > 3 else None)].append(i)
        for (k, at_seq, where), rows in groups.items():
            view = self.live.view_for(at_seq) if self.live is not None else None
            found = view.search_vectors(vectors[rows], k, at_seq, where) if view is not None else self.retriever.search_vectors(vectors[rows], k, where)
            for i, hits in zip(rows, found):
                out[i] = hits
        return out

    async def ping(self) -> dict[str, Any]:
        await apply_fault(self.fault, "dense")
        out = {"stage": "dense", "model": self.model_name, "encodes_queries": self.encodes, "vectors": self.retriever.num_vectors, "replica": replica_id(), "shard": self.shard.model_dump() if self.shard else None}
        if self.live is not None:
            out["writes"] = self.live.state()
            if not self.live.ready:
                raise RuntimeError(f"catching up with the writer's log ({self.live.error or 'starting'})")
        return out

    async def check_health(self) -> None:
        """The FAISS index answers (and the encoder, when the replica has one): a probe is searched."""
        probe: Any = "health" if self.encodes else np.full(self.retriever.dim, 1.0 / np.sqrt(self.retriever.dim), dtype=np.float32)
        hits = await asyncio.to_thread(self._search_many, [(probe, 1)])
        if not hits[0]:
            raise RuntimeError("the dense index returned no document for the health probe")


class QueryEncoderServer:
    """Query vectors for the shards of a sharded dense retriever: each query is encoded once,
    however many shards search it (each shard encoding it again was most of the dense stage's
    CPU at 10 shards). Its own deployment (``DenseQueryEncoder``), so it scales with the query
    rate and batches concurrent queries into one encoder call (``dense_batching``), while the
    shards scale with the index; the ingress stays free of models."""

    def __init__(self, cfg: QueryEncoderServerConfig) -> None:
        from serve_app.index import load_query_encoder

        hint = f"For the Serve app, {ENV_DENSE_MODEL}=/path/to/model also overrides dense.model."
        self.encoder = load_or_explain("DenseQueryEncoder", load_query_encoder, cfg.index_dir, cfg.dense, hint=hint)
        self.fault = FaultInjection()
        self._encode_batched = serve_batch(self._encode_many, cfg.batching)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.fault = parse_user_config(RetrieverUserConfig, user_config, "DenseQueryEncoder").fault

    async def encode(self, query: str) -> np.ndarray:
        """The query's vector (float32, L2-normalised)."""
        await apply_fault(self.fault, "dense")
        return await self._encode_batched(query)

    async def _encode_many(self, queries: list[str]) -> list[np.ndarray]:
        t0 = time.perf_counter()
        vectors = await asyncio.to_thread(self.encoder.encode_queries, list(queries))
        metrics.observe_latency("dense_encode", (time.perf_counter() - t0) * 1000)
        return [v for v in vectors]

    async def ping(self) -> dict[str, Any]:
        await apply_fault(self.fault, "dense")
        return {"stage": QUERY_ENCODER_KEY, "model": self.encoder.model_name, "dim": self.encoder.dim, "replica": replica_id()}

    async def check_health(self) -> None:
        """The encoder answers: a probe query is encoded to a finite vector."""
        v = (await asyncio.to_thread(self.encoder.encode_queries, ["health"]))[0]
        if not np.all(np.isfinite(v)):
            raise RuntimeError("the query encoder returned a non-finite vector for the health probe")
