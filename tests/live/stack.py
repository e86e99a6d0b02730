"""An in-process serving stack with live writes (no Ray): the real servers (WriterServer,
BM25Server and DenseServer, one per shard when sharded, the ingress's LiveReplica and
SearchService) wired by a backends object that calls them directly, behind the real FastAPI app."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, AsyncIterator, Optional

import httpx

from serve_app.retrieval.sharding import merge_top_k
from serve_app.types import RerankOutcome, RerankRequest


class InProcessBackends:
    def __init__(self, writer: Any, retrievers: dict[str, list[Any]]) -> None:
        self.w = writer
        self.retrievers = retrievers
        self.searches = 0
        self.filters: list[Any] = []  # the filter of every retriever call
        self.reranked: list[RerankRequest] = []  # every request the reranker got

    async def retrieve(self, name: str, query: str, k: int, at_seq: Optional[int] = None, where: Any = None) -> list:
        self.searches += 1
        self.filters.append(where)
        servers = self.retrievers[name]
        if len(servers) == 1:
            return await servers[0].search(query, k, at_seq, where)
        if name == "dense":  # shards get vectors, as from the query encoder
            vec = servers[0]._encoder.encode_queries([query])[0]
            return merge_top_k([await s.search_vector(vec, k, at_seq, where) for s in servers], k)
        return merge_top_k([await s.search(query, k, at_seq, where) for s in servers], k)

    async def rerank(self, request: RerankRequest, stage: Optional[str] = None) -> RerankOutcome:
        self.reranked.append(request)
        scores = [float(len(set(request.query.split()) & set(d.split()))) for d in request.documents]
        return RerankOutcome(scores, 1, len(scores), len(scores))

    async def write(self, op: str, payload: list, refresh: str, guard: Any = None) -> dict:
        from serve_app.serve.ingress import call_writer

        return await call_writer(lambda: (self.w.upsert if op == "upsert" else self.w.delete)(payload, refresh, guard))

    async def get_document(self, doc_id: str) -> Any:
        return await self.w.get(doc_id)

    async def ping(self, stage: str) -> dict:
        if stage == "writer":
            return await self.w.ping()
        if stage in self.retrievers:
            return {"shards": [await s.ping() for s in self.retrievers[stage]]}
        return {"stage": stage}


@contextlib.asynccontextmanager
async def live_stack(index_dir: Any, dense: Any, *, shards: Optional[dict[str, int]] = None, refresh_interval_s: float = 0.2, api_keys: Any = (), fields: Optional[dict[str, str]] = None, **writes: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """(client of the app, namespace with writer, servers, source, service) inside a running loop."""
    from types import SimpleNamespace

    from serve_app.config import WritesConfig
    from serve_app.serve.config import BM25ServerConfig, DenseServerConfig, ShardRef, WriterServerConfig, parse_app_config
    from serve_app.serve.http import create_app
    from serve_app.serve.ingress import _live_documents
    from serve_app.serve.live_replica import LiveReplica, LocalWriterSource
    from serve_app.serve.retrievers import BM25Server, DenseServer
    from serve_app.serve.service import SearchService
    from serve_app.index import load_document_store

    shards = {r: n for r, n in (shards or {}).items() if n > 1}
    wcfg = WritesConfig(enabled=True, refresh_interval_s=refresh_interval_s, **writes)
    idx = str(index_dir)
    writer = await _in_thread(WriterServer_of, WriterServerConfig(index_dir=idx, writes=wcfg, dense=dense, shards=shards))
    source = LocalWriterSource(writer.writer, writer.notifier)

    def refs(r: str) -> list:
        n = shards.get(r, 1)
        return [None] if n == 1 else [ShardRef(index=i, num_shards=n) for i in range(n)]

    fields = dict(fields or {})
    bm25 = [BM25Server(BM25ServerConfig(index_dir=idx, shard=s, writes=wcfg, fields=fields), source) for s in refs("bm25")]
    dense_servers = [DenseServer(DenseServerConfig(index_dir=idx, dense=dense, shard=s, encode_queries=s is None, writes=wcfg, fields=fields), source) for s in refs("dense")]
    if len(dense_servers) > 1:
        dense_servers[0]._encoder = writer.writer.encoder
    cfg = parse_app_config({"index_dir": idx, "dense": dense.model_dump(), "writes": wcfg.model_dump(), "sharding": {"bm25": shards.get("bm25", 1), "dense": shards.get("dense", 1)}, "fields": fields}, use_env=False)
    live = LiveReplica("SearchIngress", idx, source, functools.partial(_live_documents, idx), wcfg, stage="ingress")
    backends = InProcessBackends(writer, {"bm25": bm25, "dense": dense_servers})
    service = SearchService(cfg, backends, load_document_store(idx)[0], {}, live=live)
    app = create_app(service, api_keys=list(api_keys))
    ns = SimpleNamespace(writer=writer, bm25=bm25, dense=dense_servers, source=source, service=service, live=live, backends=backends, wcfg=wcfg)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client, ns
    finally:
        for r in [live, *(s.live for s in bm25 + dense_servers)]:
            await r.stop()


def WriterServer_of(cfg: Any) -> Any:
    from serve_app.serve.writer_server import WriterServer

    return WriterServer(cfg)


async def _in_thread(fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)


async def until_ready(client: httpx.AsyncClient, timeout_s: float = 20.0) -> None:
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        r = await client.get("/healthz")
        if r.status_code == 200:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not ready: {r.json()}")
        await asyncio.sleep(0.05)
