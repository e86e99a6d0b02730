"""The span exporters that ``tracing_config.exporter_import_path`` names, without Ray: OTLP/HTTP
to a collector endpoint (a loopback receiver here), and JSON lines. The span tree of a real
request through a real Serve app is checked in test_serve_integration.py."""

from __future__ import annotations

import http.server
import threading
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from serve_app.serve import tracing


class Receiver(http.server.BaseHTTPRequestHandler):
    bodies: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        n = int(self.headers.get("content-length", 0))
        Receiver.bodies.append((self.path, self.rfile.read(n)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_otlp_processors_post_spans_to_the_configured_endpoint(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        provider = TracerProvider()
        for p in tracing.otlp_span_processors():
            provider.add_span_processor(p)
        with provider.get_tracer("test").start_as_current_span("serve_app.search", attributes={"serve_app.used.rerank_depth": 50}):
            pass
        assert provider.force_flush(10_000)
        provider.shutdown()
    finally:
        server.shutdown()
    assert Receiver.bodies, "nothing reached the collector"
    path, body = Receiver.bodies[-1]
    assert path == "/v1/traces" and b"serve_app.search" in body and b"serve_app.used.rerank_depth" in body


def test_jsonl_processors_write_one_line_per_span_with_its_parent(tmp_path, monkeypatch):
    monkeypatch.setenv(tracing.ENV_TRACE_DIR, str(tmp_path))
    provider = TracerProvider()
    for p in tracing.jsonl_span_processors():
        provider.add_span_processor(p)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("outer"):
        with tracer.start_as_current_span("inner", attributes={"serve_app.hits": 3}):
            pass
    spans = {s["name"]: s for s in tracing.read_spans(tmp_path)}
    assert spans["inner"]["parent_id"] == spans["outer"]["span_id"] and spans["outer"]["parent_id"] is None
    assert spans["inner"]["trace_id"] == spans["outer"]["trace_id"] and spans["inner"]["attributes"] == {"serve_app.hits": 3}
    monkeypatch.delenv(tracing.ENV_TRACE_DIR)
    with pytest.raises(RuntimeError, match=tracing.ENV_TRACE_DIR):
        tracing.jsonl_span_processors()


def test_with_tracing_off_spans_cost_nothing_and_no_header_is_added():
    with tracing.span("serve_app.search", **{"serve_app.asked.top_n": 3, "skipped": None}) as s:
        tracing.annotate(s, **{"serve_app.results": 3})
        assert not s.is_recording()
        assert tracing.current_trace_id() is None
