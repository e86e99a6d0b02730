"""OpenTelemetry spans of a request's way through the funnel, in Ray Serve's traces.

Ray Serve traces requests when the Serve config's ``tracing_config`` enables it (deployments.yaml;
off by default): a span in the HTTP proxy, one per replica call and one per handle call, joined
across processes by the trace context Serve carries with each request. serve_app adds spans
inside those, with the attributes that explain an answer: the request's span (``serve_app.http``,
whose trace id the response carries in ``X-Trace-Id``), ``serve_app.search`` (depths asked and
used, degraded stages), one per retriever call (``serve_app.retrieve.<name>``), per rerank stage
(``serve_app.rerank``, ``serve_app.rerank.<cascade stage>``) and document lookup
(``serve_app.documents``) in the ingress, and in the stages' replicas ``serve_app.bm25.search``,
``serve_app.dense.search`` (with the shard they serve) and ``serve_app.reranker.score`` (pairs
scored, cache hits, batch size, model).

With tracing off no tracer provider is installed and the OpenTelemetry API hands out
non-recording spans: a few function calls per request, nothing exported. Spans are exported by
the span processors that ``tracing_config.exporter_import_path`` names: :func:`otlp_span_processors`
(OTLP over HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT``, the standard variable; an OpenTelemetry
Collector, Jaeger or Tempo), or :func:`jsonl_span_processors` (one JSON line per span in
``SERVE_APP_TRACE_DIR``, for a look without a collector; the tests read it).

Attributes never hold request text (queries, documents): only sizes, names and decisions.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

try:  # ray[serve] installs the OpenTelemetry API and SDK; without them spans are no-ops
    from opentelemetry import trace
except ImportError:  # pragma: no cover - depends on the installation
    trace = None  # type: ignore[assignment]

TRACER_NAME = "serve_app"
#: Response header holding the request's trace id (32 hex digits) when it is traced.
TRACE_ID_HEADER = "X-Trace-Id"
#: Where :func:`jsonl_span_processors` writes (one file per process).
ENV_TRACE_DIR = "SERVE_APP_TRACE_DIR"


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OpenTelemetry attribute values: None dropped, sequences as lists of str/int/float/bool."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple, set, frozenset)):
            value = [v if isinstance(v, (bool, int, float, str)) else str(v) for v in value]
        elif not isinstance(value, (bool, int, float, str)):
            value = str(value)
        out[key] = value
    return out


class _NoSpan:
    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def is_recording(self) -> bool:
        return False


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span named ``name`` as a child of the current one (Serve's replica span, or one of
    ours); ``annotate(s, ...)`` adds attributes once they are known."""
    if trace is None:
        yield _NoSpan()
        return
    with trace.get_tracer(TRACER_NAME).start_as_current_span(name, attributes=_clean(attributes), record_exception=False, set_status_on_exception=True) as s:
        yield s


def annotate(s: Any, **attributes: Any) -> None:
    """Add ``attributes`` to span ``s`` (a no-op when it does not record)."""
    if s.is_recording():
        s.set_attributes(_clean(attributes))


def current_trace_id() -> Optional[str]:
    """The current span's trace id (32 hex digits) when it records, else None."""
    if trace is None:
        return None
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid and ctx.trace_flags.sampled else None


# --------------------------------------------------------------------------- exporters


def otlp_span_processors() -> list[Any]:
    """``tracing_config.exporter_import_path: serve_app.serve.tracing:otlp_span_processors``:
    spans in batches over OTLP/HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT`` (default
    ``http://localhost:4318``; ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``..._HEADERS`` as the
    OpenTelemetry specification defines them). Needs the ``tracing`` extra."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return [BatchSpanProcessor(OTLPSpanExporter())]


class JsonLinesSpanExporter:
    """Writes each finished span as one JSON line (name, ids, parent, times, attributes)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"spans-{os.getpid()}.jsonl"
        self._lock = threading.Lock()

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = []
        for s in spans:
            ctx, parent = s.get_span_context(), s.parent
            lines.append(json.dumps({
                "name": s.name,
                "trace_id": format(ctx.trace_id, "032x"),
                "span_id": format(ctx.span_id, "016x"),
                "parent_id": format(parent.span_id, "016x") if parent is not None else None,
                "kind": str(s.kind.name),
                "start_ns": s.start_time,
                "end_ns": s.end_time,
                "status": str(s.status.status_code.name),
                "attributes": dict(s.attributes or {}),
                "pid": os.getpid(),
            }, default=str))
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def jsonl_span_processors() -> list[Any]:
    """``tracing_config.exporter_import_path: serve_app.serve.tracing:jsonl_span_processors``:
    every span written when it ends, one JSON line, to ``$SERVE_APP_TRACE_DIR/spans-<pid>.jsonl``."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    directory = os.environ.get(ENV_TRACE_DIR)
    if not directory:
        raise RuntimeError(f"{ENV_TRACE_DIR} is not set: the directory jsonl_span_processors writes spans to")
    return [SimpleSpanProcessor(JsonLinesSpanExporter(directory))]


def read_spans(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every span :func:`jsonl_span_processors` wrote to ``directory``."""
    out = []
    for path in sorted(Path(directory).glob("spans-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out
