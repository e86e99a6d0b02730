"""The retriever servers: :class:`BM25Server` and :class:`DenseServer` (one shard each when
sharded), plain classes the builder (:mod:`serve_app.serve.app`) turns into deployments."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from serve_app.serve import metrics
from serve_app.serve.config import ENV_DENSE_MODEL, BM25ServerConfig, DenseServerConfig, FaultInjection, RetrieverUserConfig, parse_user_config
from serve_app.serve.replica import apply_fault, index_dir_of, load_or_explain, replica_id, serve_batch
from serve_app.types import Hit


class BM25Server:
    """Top-k BM25 documents for a query."""

    def __init__(self, cfg: BM25ServerConfig) -> None:
        from serve_app.index import load_bm25

        self.shard = cfg.shard  # this replica serves one shard of the index (serve_app.serve.shards)
        self.retriever = load_or_explain("BM25Retriever", load_bm25, index_dir_of("BM25Retriever", cfg.index_dir, "bm25", cfg.shard))
        self.fault = FaultInjection()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.fault = parse_user_config(RetrieverUserConfig, user_config, "BM25Retriever").fault

    async def search(self, query: str, k: int) -> list[Hit]:
        await apply_fault(self.fault, "bm25")
        t0 = time.perf_counter()
        hits = await asyncio.to_thread(self.retriever.search, query, k)
        metrics.observe_latency("bm25_search", (time.perf_counter() - t0) * 1000)
        return hits

    async def ping(self) -> dict[str, Any]:
        await apply_fault(self.fault, "bm25")
        return {"stage": "bm25", "documents": self.retriever.num_documents, "replica": replica_id(), "shard": self.shard.model_dump() if self.shard else None}

    async def check_health(self) -> None:
        """The memory-mapped index answers: a term lookup over its postings runs."""
        await asyncio.to_thread(self.retriever.search, "health", 1)


class DenseServer:
    """Top-k documents by embedding similarity; concurrent queries are encoded together."""

    def __init__(self, cfg: DenseServerConfig) -> None:
        from serve_app.index import load_dense

        self.shard = cfg.shard
        index_dir = index_dir_of("DenseRetriever", cfg.index_dir, "dense", cfg.shard)
        self.retriever = load_or_explain("DenseRetriever", load_dense, index_dir, cfg.dense, hint=f"For the Serve app, {ENV_DENSE_MODEL}=/path/to/model also overrides dense.model.")
        self.fault = FaultInjection()
        self._search_batched = serve_batch(self._search_many_async, cfg.batching)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.fault = parse_user_config(RetrieverUserConfig, user_config, "DenseRetriever").fault

    async def search(self, query: str, k: int) -> list[Hit]:
        await apply_fault(self.fault, "dense")
        return await self._search_batched((query, k))

    async def _search_many_async(self, requests: list[tuple[str, int]]) -> list[list[Hit]]:
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self._search_many, requests)
        metrics.observe_latency("dense_search", (time.perf_counter() - t0) * 1000)
        return out

    def _search_many(self, requests: list[tuple[str, int]]) -> list[list[Hit]]:
        """One encoder call for all queries, then one FAISS search per distinct k."""
        vectors = self.retriever.encoder.encode_queries([q for q, _ in requests])
        out: list[list[Hit]] = [[] for _ in requests]
        by_k: dict[int, list[int]] = collections.defaultdict(list)
        for i, (_, k) in enumerate(requests):
            by_k[int(k)].append(i)
        for k, rows in by_k.items():
            for i, hits in zip(rows, self.retriever.search_vectors(vectors[rows], k)):
                out[i] = hits
        return out

    async def ping(self) -> dict[str, Any]:
        await apply_fault(self.fault, "dense")
        return {"stage": "dense", "model": self.retriever.encoder.model_name, "vectors": self.retriever.num_vectors, "replica": replica_id(), "shard": self.shard.model_dump() if self.shard else None}

    async def check_health(self) -> None:
        """The encoder and the FAISS index answer: one query is encoded and searched."""
        hits = await asyncio.to_thread(self._search_many, [("health", 1)])
        if not hits[0]:
            raise RuntimeError("the dense index returned no document for the health probe")
