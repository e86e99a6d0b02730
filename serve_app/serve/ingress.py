"""The ingress: :class:`SearchIngress` (the FastAPI app over :class:`~serve_app.serve.service.SearchService`)
and :class:`HandleBackends`, the stage calls over deployment handles."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Optional

from serve_app.funnel import CascadeNames
from serve_app.serve.config import DEFAULT_MODEL, AppConfig, model_key
from serve_app.serve.replica import load_or_explain
from serve_app.serve.resilience import call_stage
from serve_app.serve.shards import QUERY_ENCODER_KEY
from serve_app.types import Hit, RerankOutcome, RerankRequest


async def call_writer(make_call: Any) -> Any:
    """A call to the DocumentWriter: a refused batch is the client's error (its message, not a
    remote traceback); the writer unreachable is ``StageUnavailable`` (503). A write is not
    retried on replica death: the batch may have been logged, and the client decides."""
    from serve_app.errors import StageError, StageUnavailable
    from serve_app.funnel import describe_exception, input_rejected

    try:
        return await call_stage("writer", make_call, retries=0)
    except StageError:
        raise
    except Exception as exc:
        rejected = input_rejected(exc)
        if rejected is not None:
            raise rejected from None
        raise StageUnavailable("writer", f"the document writer failed: {describe_exception(exc)}") from None


class HandleBackends:
    """:class:`~serve_app.serve.service.Backends` over deployment handles.

    Each call goes through :func:`~serve_app.serve.resilience.call_stage`: a full queue
    (``BackPressureError``) becomes ``StageOverloaded``, a replica that died under the call is
    retried once (all stage calls are idempotent).

    A sharded retriever is a list of handles, one per shard: its calls go to every shard
    concurrently and the lists are merged (:func:`~serve_app.serve.shards.scatter_gather`);
    ``shard_deadline_s`` (``ping_deadline_s`` for pings) bounds the wait for the shards so that
    late ones can be named before the stage's own timeout fires. A sharded dense retriever with
    a query encoder (``handles["dense_encoder"]``) encodes each query once there and sends the
    vector to its shards.
    """

    def __init__(self, handles: dict[str, Any], shard_deadline_s: float = 4.5, ping_deadline_s: float = 1.8) -> None:
        self.handles = handles
        self.shard_deadline_s = shard_deadline_s
        self.ping_deadline_s = ping_deadline_s

    def _handle(self, stage: str) -> Any:
        h = self.handles.get(stage)
        if h is None:
            raise LookupError(f"stage {stage} is not deployed")
        return h

    async def retrieve(self, name: str, query: str, k: int, at_seq: Optional[int] = None, where: Any = None) -> list[Hit]:
        """Top-``k`` hits of retriever ``name``; with live writes as of batch ``at_seq`` (every
        shard reads the same batch); with a filter ``where``, applied inside every shard's search."""
        handle = self._handle(name)
        extra: tuple[Any, ...] = () if at_seq is None and where is None else (at_seq,) if where is None else (at_seq, where)
        if isinstance(handle, list):
            from serve_app.serve.shards import scatter_gather

            encoder = self.handles.get(QUERY_ENCODER_KEY) if name == "dense" else None
            if encoder is not None:  # encoded once, the vector sent to every shard
                vector = await call_stage(f"{name} query encoder", lambda: encoder.encode.remote(query))
                calls = [functools.partial(call_stage, f"{name} shard {i}", functools.partial(lambda h: h.search_vector.remote(vector, k, *extra), h)) for i, h in enumerate(handle)]
            else:
                calls = [functools.partial(call_stage, f"{name} shard {i}", functools.partial(lambda h: h.search.remote(query, k, *extra), h)) for i, h in enumerate(handle)]
            return await scatter_gather(name, calls, k, self.shard_deadline_s)
        return await call_stage(name, lambda: handle.search.remote(query, k, *extra))

    async def write(self, op: str, payload: list[Any], refresh: str, guard: Any = None) -> dict[str, Any]:
        """A write batch through the DocumentWriter (``op``: upsert or delete); ``guard``: the
        writing key's bound filter."""
        h = self._handle("writer")
        method = h.upsert if op == "upsert" else h.delete
        return await call_writer(lambda: method.remote(payload, refresh, guard))

    async def get_document(self, doc_id: str) -> Any:
        h = self._handle("writer")
        return await call_writer(lambda: h.get.remote(doc_id))

    async def rerank(self, request: RerankRequest, stage: Optional[str] = None) -> RerankOutcome:
        if stage is not None:  # a cascade stage: its own deployment, its default model
            key = CascadeNames(stage).handle
            h = self._handle(key)
            return await call_stage(key, lambda: h.rerank.remote(request))
        handle = self._handle(CascadeNames(None).handle)
        if model_key(request.model) != DEFAULT_MODEL:  # route to a replica that holds the model
            handle = handle.options(multiplexed_model_id=request.model)
        return await call_stage("reranker", lambda: handle.rerank.remote(request))

    async def ping(self, stage: str) -> dict[str, Any]:
        handle = self._handle(stage)
        if isinstance(handle, list):
            from serve_app.serve.shards import ping_all

            return await ping_all(stage, [functools.partial(call_stage, f"{stage} shard {i}", functools.partial(lambda h: h.ping.remote(), h)) for i, h in enumerate(handle)], self.ping_deadline_s)
        return await call_stage(stage, lambda: handle.ping.remote())


def _live_documents(index_dir: str, info: dict[str, Any]) -> Any:
    from serve_app.index import load_document_store
    from serve_app.live.documents import LiveDocuments

    return LiveDocuments(load_document_store(index_dir)[0], base_seq=info["base_seq"])


def _collection_service(cfg: AppConfig, collection: str, *, bm25: Any, dense: Any, reranker: Any, cascade: Optional[list[Any]] = None, dense_encoder: Any = None, writer: Any = None) -> Any:
    """The :class:`~serve_app.serve.service.SearchService` of one collection over its stages' handles."""
    from serve_app.index import load_document_store
    from serve_app.serve.service import SearchService
    from serve_app.serve.shards import shard_deadline

    # Texts are looked up in the on-disk store (SQLite, memory-mapped), not held here.
    corpus, manifest = load_or_explain("SearchIngress", load_document_store, cfg.index_dir)
    handles = {name: h for name, h in (("bm25", bm25), ("dense", dense), ("reranker", reranker)) if h is not None}
    for stage, h in zip(cfg.cascade, cascade or []):
        handles[CascadeNames(stage.name).handle] = h
    if dense_encoder is not None:
        handles[QUERY_ENCODER_KEY] = dense_encoder
    live = None
    if writer is not None and cfg.writes.enabled:
        from serve_app.serve.live_replica import LiveReplica, source_of

        handles["writer"] = writer
        live = LiveReplica("SearchIngress" if collection == "default" else f"SearchIngress[{collection}]", cfg.index_dir, source_of(writer), functools.partial(_live_documents, cfg.index_dir), cfg.writes, stage="ingress")
    index_info = {
        "chunks": manifest.corpus.num_chunks,
        "built_at": manifest.created_at,
        "dense_model": (manifest.dense or {}).get("model"),
        "bm25_engine": (manifest.bm25 or {}).get("engine"),
    }
    if cfg.sharding.bm25 > 1 or cfg.sharding.dense > 1:
        index_info["shards"] = {r: getattr(cfg.sharding, r) for r in cfg.retrievers}
    backends = HandleBackends(handles, shard_deadline(cfg.timeouts.retriever_timeout_s), shard_deadline(cfg.timeouts.health_timeout_s))
    return SearchService(cfg, backends, corpus, index_info, live=live, collection=collection)


class SearchIngress:
    """HTTP ingress: validates requests, runs the funnel over the stages' handles, answers.

    ``bm25`` / ``dense``: the retriever's handle, or one handle per shard when sharded (None when
    not deployed); ``dense_encoder``: the query encoder of a sharded dense retriever;
    ``collections``: each named collection's stage handles (the same keys), served under
    ``/collections/{name}/``. The builder wraps this class with ``serve.ingress``; Serve then
    serves the FastAPI app :meth:`__serve_build_asgi_app__` returns.
    """

    def __init__(self, cfg: AppConfig, bm25: Any, dense: Any, reranker: Any, cascade: Optional[list[Any]] = None, dense_encoder: Any = None, writer: Any = None, collections: Optional[dict[str, dict[str, Any]]] = None) -> None:
        self.service = _collection_service(cfg, "default", bm25=bm25, dense=dense, reranker=reranker, cascade=cascade, dense_encoder=dense_encoder, writer=writer)
        configs = cfg.collection_configs()
        #: The named collections' services (``/collections/{name}/...``), each over its own stages.
        self.collections = {name: _collection_service(configs[name], name, **handles) for name, handles in (collections or {}).items()}

    def __serve_build_asgi_app__(self) -> Any:
        from serve_app.serve.http import create_app

        return create_app(self.service, collections=self.collections)

    async def check_health(self) -> None:
        """The document store answers: its file is in place and a real row is read (the SQLite
        store's ``check``); an in-memory corpus (an index without a store) must not be empty."""
        for service in (self.service, *self.collections.values()):
            store = service.documents
            check = getattr(store, "check", None)
            if check is not None:
                await asyncio.to_thread(check)
            elif len(store) == 0:
                raise RuntimeError(f"the document store of collection {service.collection} is empty")
