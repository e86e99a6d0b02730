"""Custom application metrics (``ray.serve.metrics``), exported by Ray's metrics agent.

Ray prefixes custom metric names with ``ray_`` on the Prometheus endpoint and Serve adds the
``deployment``, ``replica`` and ``application`` tags. docs/METRICS.md lists them; the names
below (``METRIC_NAMES``) are the single source for that page and for the tests.

Metrics are created lazily, once per process (a replica), so importing this module is cheap
and the plain-class tests can record into them without a Ray cluster (values then go nowhere).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

PREFIX = "serve_app_"

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]
COUNT_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH_SIZE_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024]


@dataclass(frozen=True)
class MetricSpec:
    """What a metric is: name (without Ray's ``ray_`` prefix), kind, tags and meaning."""

    name: str
    kind: str  # counter | histogram
    tags: tuple[str, ...]
    description: str
    boundaries: tuple[float, ...] = ()
    #: The feature that records it, when not every application does ("writes": writes.enabled).
    feature: str = ""


SPECS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        MetricSpec(PREFIX + "stage_latency_ms", "histogram", ("stage",), "Wall time of one funnel stage in milliseconds, as seen by the ingress (stage: bm25, dense, fusion, rerank, total) or by a stage's own deployment (stage: bm25_search, dense_search, dense_encode (the query encoder of a sharded dense retriever), rerank_batch, write (a batch validated, encoded and fsynced by the DocumentWriter)).", tuple(LATENCY_BOUNDARIES_MS)),
        MetricSpec(PREFIX + "candidates", "histogram", ("stage",), "Documents per request leaving a stage (stage: bm25, dense, fused, reranked, returned, rerank_request).", tuple(COUNT_BOUNDARIES)),
        MetricSpec(PREFIX + "rerank_batch_size", "histogram", ("model",), "Rerank requests gathered into one cross-encoder call by @serve.batch and the coalescer that merges batches formed while the model was busy (values above 1 mean concurrent requests shared a call).", tuple(BATCH_SIZE_BOUNDARIES)),
        MetricSpec(PREFIX + "rerank_batch_pairs", "histogram", ("model",), "(query, document) pairs scored by one cross-encoder call.", tuple(COUNT_BOUNDARIES)),
        MetricSpec(PREFIX + "rerank_pairs_total", "counter", ("model",), "(query, document) pairs scored by the cross-encoder."),
        MetricSpec(PREFIX + "requests_total", "counter", ("endpoint", "status"), "HTTP requests answered by the ingress, by endpoint (search, rerank, documents, healthz, info, other) and status code."),
        MetricSpec(PREFIX + "errors_total", "counter", ("endpoint", "type"), "Error responses by endpoint and error type (the envelope's error.type)."),
        MetricSpec(PREFIX + "degraded_total", "counter", ("stage", "reason"), "Stages left out of an answer because they failed (reason: error) or timed out (reason: timeout); stage: bm25, dense, rerank.<name> (a cascade stage), rerank."),
        MetricSpec(PREFIX + "score_cache_total", "counter", ("model", "result"), "Documents of rerank calls looked up in a reranker replica's score cache (result: hit, answered without scoring; miss, scored). model: the configured model name, or cascade.<stage> for a cascade stage."),
        MetricSpec(PREFIX + "rerank_depth_decisions_total", "counter", ("decision",), "/search requests that reranked, by the depth they got: decision as_requested, or reduced (the ingress lowered rerank_top_m to meet slo.search_p95_ms)."),
        MetricSpec(PREFIX + "rerank_depth", "histogram", (), "rerank_top_m used per /search request that reranked, after any SLO-aware reduction.", tuple(COUNT_BOUNDARIES)),
        MetricSpec(PREFIX + "ignored_fields_total", "counter", ("api",), "Top-level request fields a compatibility route ignored because its reference server ignores fields it does not know (api: rerank, the shared /rerank path, or a flavour prefix: tei, infinity, vllm, jina). Their names are logged at debug level, never their values."),
        MetricSpec(PREFIX + "cancelled_total", "counter", ("stage",), "Stage calls the ingress abandoned because their request's client disconnected or its deadline (timeouts.request_timeout_s) passed; Serve cancels the handle call, so the stage's replica drops the work it has not started (stage: bm25, dense, dense_query_encoder, reranker, a cascade stage's reranker key, writer)."),
        MetricSpec(PREFIX + "cancelled_pairs_total", "counter", ("model",), "(query, document) pairs a reranker replica dropped from its queue because their request was cancelled before they were scored."),
        MetricSpec(PREFIX + "documents_written_total", "counter", ("op",), "Documents acknowledged by the DocumentWriter (op: upsert, delete; a delete of an absent id is not counted). With writes.enabled.", feature="writes"),
        MetricSpec(PREFIX + "write_lag_batches", "histogram", ("stage",), "Batches a follower had not applied yet when it polled the writer (stage: bm25, dense, ingress); a current follower counts 0 (first bucket). With writes.enabled.", tuple(COUNT_BOUNDARIES), feature="writes"),
    )
}
METRIC_NAMES: tuple[str, ...] = tuple(SPECS)

_lock = threading.Lock()
_instances: dict[str, Any] = {}


def _metric(name: str) -> Any:
    inst = _instances.get(name)
    if inst is not None:
        return inst
    with _lock:
        inst = _instances.get(name)
        if inst is None:
            from ray.serve.metrics import Counter, Histogram

            spec = SPECS[name]
            if spec.kind == "counter":
                inst = Counter(spec.name, description=spec.description, tag_keys=spec.tags)
            else:
                inst = Histogram(spec.name, description=spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tags)
            _instances[name] = inst
    return inst


def observe_latency(stage: str, ms: float) -> None:
    """Record a stage's wall time."""
    _metric(PREFIX + "stage_latency_ms").observe(max(float(ms), 0.0), tags={"stage": stage})


def observe_candidates(stage: str, count: int) -> None:
    """Record how many documents a stage produced for one request."""
    _metric(PREFIX + "candidates").observe(int(count), tags={"stage": stage})


def observe_rerank_batch(requests: int, pairs: int, model: str = "default") -> None:
    """Record one cross-encoder call of ``model`` (its configured name): requests gathered and pairs scored."""
    tags = {"model": model}
    _metric(PREFIX + "rerank_batch_size").observe(int(requests), tags=tags)
    _metric(PREFIX + "rerank_batch_pairs").observe(int(pairs), tags=tags)
    if pairs:
        _metric(PREFIX + "rerank_pairs_total").inc(int(pairs), tags=tags)


def count_request(endpoint: str, status: int) -> None:
    """Count one answered HTTP request."""
    _metric(PREFIX + "requests_total").inc(tags={"endpoint": endpoint, "status": str(int(status))})


def count_error(endpoint: str, error_type: str) -> None:
    """Count one error response."""
    _metric(PREFIX + "errors_total").inc(tags={"endpoint": endpoint, "type": error_type})


def count_score_cache(model: str, hits: int, misses: int) -> None:
    """Count a rerank call's score-cache hits and misses."""
    if hits:
        _metric(PREFIX + "score_cache_total").inc(int(hits), tags={"model": model, "result": "hit"})
    if misses:
        _metric(PREFIX + "score_cache_total").inc(int(misses), tags={"model": model, "result": "miss"})


def observe_rerank_depth(depth: int, reduced: bool) -> None:
    """Record the rerank depth one /search request used, and whether the SLO lowered it."""
    _metric(PREFIX + "rerank_depth").observe(int(depth))
    _metric(PREFIX + "rerank_depth_decisions_total").inc(tags={"decision": "reduced" if reduced else "as_requested"})


def count_degraded(stage: str, reason: str) -> None:
    """Count one stage dropped from a request (failed or timed out)."""
    _metric(PREFIX + "degraded_total").inc(tags={"stage": stage, "reason": reason})


def count_documents_written(op: str, n: int) -> None:
    """Count documents a write batch acknowledged."""
    if n:
        _metric(PREFIX + "documents_written_total").inc(int(n), tags={"op": op})


def observe_write_lag(stage: str, batches: int) -> None:
    """Record how many batches a follower was behind when it polled."""
    _metric(PREFIX + "write_lag_batches").observe(max(0, int(batches)), tags={"stage": stage})


def count_ignored_fields(api: str, n: int) -> None:
    """Count top-level fields a compatibility route ignored."""
    if n:
        _metric(PREFIX + "ignored_fields_total").inc(int(n), tags={"api": api})


def count_cancelled(stage: str) -> None:
    """Count one stage call abandoned for a cancelled request."""
    _metric(PREFIX + "cancelled_total").inc(tags={"stage": stage.replace(" ", "_")})


def count_cancelled_pairs(model: str, pairs: int) -> None:
    """Count pairs a reranker replica dropped, unscored, for cancelled requests."""
    if pairs:
        _metric(PREFIX + "cancelled_pairs_total").inc(int(pairs), tags={"model": model})
