"""The servers behind the Serve deployments: plain classes, one core object each.

Nothing here is decorated: :mod:`serve_app.serve.app` (the builder) turns each class into a
deployment with the options of the validated :class:`~serve_app.serve.config.AppConfig`, and
binds it to a typed config object (``BM25ServerConfig``...), so a replica never re-validates a
dict. Tests construct these classes directly, without Ray.

* :class:`BM25Server`: :class:`serve_app.retrieval.bm25.BM25Retriever` over the index's bm25/ files;
* :class:`DenseServer`: bi-encoder + FAISS; concurrent queries share one encoder forward pass
  (Serve's batching, ``dense_batching``); the shards of a sharded dense retriever search vectors
  that :class:`QueryEncoderServer` (``DenseQueryEncoder``) computes once per query;
* :class:`RerankerServer`: :class:`serve_app.rerank.reranker.Reranker`; concurrent requests
  share cross-encoder calls through Serve's batching and the :class:`~serve_app.rerank.coalesce.Coalescer`,
  with ``max_batch_size`` and ``batch_wait_timeout_s`` from ``user_config`` (changed live by
  ``reconfigure``);
* :class:`WriterServer`: the ``DocumentWriter`` deployment (live writes,
  :mod:`serve_app.serve.writer_server`), which every retriever replica and the ingress follow;
* :class:`SearchIngress`: the FastAPI app (:mod:`serve_app.serve.http`) over
  :class:`~serve_app.serve.service.SearchService`, calling the stages through deployment handles
  (:class:`HandleBackends`).

The classes live in :mod:`~serve_app.serve.retrievers`, :mod:`~serve_app.serve.reranker_server`
and :mod:`~serve_app.serve.ingress`, over the helpers of :mod:`~serve_app.serve.replica`; this
module gathers them (the builder and the tests import them from here).

A constructor that cannot load its model or index raises the core's ``ModelLoadError`` /
``IndexLoadError``; Serve retries it ``max_constructor_retry_count`` times and then marks the
deployment ``DEPLOY_FAILED`` with that message. ``check_health`` checks something real: the
index answers a lookup, the model answered recently or answers a probe pair.
"""

from serve_app.serve.ingress import HandleBackends, SearchIngress
from serve_app.serve.reranker_server import HEALTH_RECENT_S, RERANK_CONCURRENT_BATCHES, RerankerServer
from serve_app.serve.replica import InjectedFault, LocalModels, ModelSlot, OneByOne
from serve_app.serve.retrievers import BM25Server, DenseServer, QueryEncoderServer
from serve_app.serve.writer_server import WriterServer

__all__ = [
    "BM25Server",
    "DenseServer",
    "HEALTH_RECENT_S",
    "HandleBackends",
    "InjectedFault",
    "LocalModels",
    "ModelSlot",
    "OneByOne",
    "QueryEncoderServer",
    "RERANK_CONCURRENT_BATCHES",
    "RerankerServer",
    "SearchIngress",
    "WriterServer",
]
