"""Build the Grafana dashboard ``grafana-serve-app.json`` (import it, or provision it).

``python cluster/monitoring/grafana_dashboard.py`` rewrites the JSON; ``--check`` exits 1 when
the committed file differs from what this script builds (``tests/test_cluster_configs.py``
checks the same). Panels are declared below as data, one line of PromQL each.

Metric names are as Prometheus sees them: Ray prefixes every metric with ``ray_``, counters end
in ``_total`` and histograms are queried through their ``_bucket`` / ``_sum`` / ``_count``
series. The application's own metrics (``serve_app/serve/metrics.py``, docs/METRICS.md) are
``ray_serve_app_*``; the rest are Ray Serve's built-in metrics. Every panel filters on the
``$application`` variable (the Serve application name, ``serve_app`` by default).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "grafana-serve-app.json"
APP = 'application=~"$application"'
RATE = "$__rate_interval"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    width: int = 12


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def quantile(q: float, bucket: str, by: str = "") -> str:
    """PromQL for the ``q`` quantile of a histogram, aggregated over replicas."""
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({bucket}{{{APP}}}[{RATE}])))"


def mean(metric: str, by: str = "") -> str:
    """PromQL for the mean observation of a histogram (``_sum`` / ``_count`` rates)."""
    grp = f" by ({by})" if by else ""
    return f"sum{grp} (rate({metric}_sum{{{APP}}}[{RATE}])) / sum{grp} (rate({metric}_count{{{APP}}}[{RATE}]))"


def rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}{{{APP}}}[{RATE}]))"


ROWS: tuple[Row, ...] = (
    Row(
        "Ray Serve: traffic and latency",
        (
            Panel("Requests per second by deployment", "Requests handled by each deployment's replicas (HTTP and handle calls).", (Query(rate("ray_serve_deployment_request_counter_total", "deployment"), "{{deployment}}"),), "reqps"),
            Panel("HTTP requests per second by status code", "Requests answered by the Serve HTTP proxy, by status code (4xx: client errors, 5xx: must stay at zero).", (Query(rate("ray_serve_num_http_requests_total", "status_code"), "{{status_code}}"),), "reqps"),
            Panel("HTTP latency (proxy)", "End-to-end latency measured by the Serve HTTP proxy.", tuple(Query(quantile(q, "ray_serve_http_request_latency_ms_bucket"), f"p{int(q * 100)}") for q in (0.5, 0.95, 0.99)), "ms"),
            Panel("Processing latency p95 by deployment", "Time a replica spends on one request, per deployment.", (Query(quantile(0.95, "ray_serve_deployment_processing_latency_ms_bucket", "deployment"), "{{deployment}}"),), "ms"),
        ),
    ),
    Row(
        "Ray Serve: replicas and queues",
        (
            Panel("Healthy replicas by deployment", "Running replicas passing their health check. Each stage scales on its own: the reranker should move without the retrievers.", (Query(f'sum by (deployment) (ray_serve_deployment_replica_healthy{{{APP}}})', "{{deployment}}"),)),
            Panel("Autoscaling target replicas", "The replica count Serve autoscaling currently wants per deployment.", (Query(f'max by (deployment) (ray_serve_autoscaling_target_replicas{{{APP}}})', "{{deployment}}"),)),
            Panel("Queued requests by deployment", "Requests waiting in callers' handles for a replica slot (max_ongoing_requests reached everywhere).", (Query(f'sum by (deployment) (ray_serve_deployment_queued_queries{{{APP}}})', "{{deployment}}"),)),
            Panel("Ongoing requests at replicas", "Requests being processed by replicas, per deployment (what autoscaling's target_ongoing_requests compares against).", (Query(f'sum by (deployment) (ray_serve_replica_processing_queries{{{APP}}})', "{{deployment}}"),)),
        ),
    ),
    Row(
        "serve_app: search funnel",
        (
            Panel("Stage latency p95", "Wall time per funnel stage (ingress view: bm25, dense, fusion, rerank, total; stage deployments: bm25_search, dense_search, rerank_batch).", (Query(quantile(0.95, "ray_serve_app_stage_latency_ms_bucket", "stage"), "{{stage}}"),), "ms"),
            Panel("Stage latency p50", "Median wall time per funnel stage.", (Query(quantile(0.5, "ray_serve_app_stage_latency_ms_bucket", "stage"), "{{stage}}"),), "ms"),
            Panel("Candidates per request by stage (mean)", "Documents leaving each stage per request: retrievers, fused, reranked, returned.", (Query(mean("ray_serve_app_candidates", "stage"), "{{stage}}"),)),
            Panel("Requests per second by endpoint and status", "Requests answered by the ingress.", (Query(rate("ray_serve_app_requests_total", "endpoint, status"), "{{endpoint}} {{status}}"),), "reqps"),
            Panel("Errors per second by type", "Error responses by endpoint and error envelope type (docs/API.md).", (Query(rate("ray_serve_app_errors_total", "endpoint, type"), "{{endpoint}} {{type}}"),), "reqps"),
            Panel("Degraded stages per second", "Stages the ingress skipped because they failed or timed out; the answer was flagged degraded.", (Query(rate("ray_serve_app_degraded_total", "stage, reason"), "{{stage}} {{reason}}"),), "reqps"),
        ),
    ),
    Row(
        "serve_app: reranker batching",
        (
            Panel("Rerank batch size (requests per cross-encoder call)", "Above 1: concurrent requests shared a forward pass (@serve.batch); per reranker model.", (Query(mean("ray_serve_app_rerank_batch_size", "model"), "mean {{model}}"), Query(quantile(0.95, "ray_serve_app_rerank_batch_size_bucket"), "p95")), "short", 8),
            Panel("Pairs per cross-encoder call", "(query, document) pairs scored by one call.", (Query(mean("ray_serve_app_rerank_batch_pairs"), "mean"), Query(quantile(0.95, "ray_serve_app_rerank_batch_pairs_bucket"), "p95")), "short", 8),
            Panel("Pairs scored per second", "Cross-encoder throughput over all reranker replicas, per reranker model.", (Query(rate("ray_serve_app_rerank_pairs_total", "model"), "{{model}}"),), "short", 8),
        ),
    ),
    Row(
        "serve_app: reranking fewer pairs (score cache, SLO-aware depth)",
        (
            Panel(
                "Score cache hit rate",
                "Share of reranked documents answered from the replicas' pair-score caches, per model (or cascade stage).",
                (Query(f'sum by (model) (rate(ray_serve_app_score_cache_total{{{APP}, result="hit"}}[{RATE}])) / sum by (model) (rate(ray_serve_app_score_cache_total{{{APP}}}[{RATE}]))', "{{model}}"),),
                "percentunit",
                8,
            ),
            Panel("Requests reranked at a lowered depth", "/search requests per second whose rerank_top_m the ingress lowered to meet slo.search_p95_ms.", (Query(f'sum (rate(ray_serve_app_rerank_depth_decisions_total{{{APP}, decision="reduced"}}[{RATE}]))', "depth reduced"),), "reqps", 8),
            Panel("Rerank depth", "rerank_top_m used per /search request, after any SLO-aware reduction.", (Query(mean("ray_serve_app_rerank_depth"), "mean"), Query(quantile(0.05, "ray_serve_app_rerank_depth_bucket"), "p5")), "short", 8),
        ),
    ),
    Row(
        "serve_app: abandoned work and compatibility routes",
        (
            Panel("Cancelled stage calls per second", "Stage calls abandoned because the client disconnected or the request's deadline passed, by stage.", (Query(rate("ray_serve_app_cancelled_total", "stage"), "{{stage}}"),), "reqps", 8),
            Panel("Pairs dropped unscored per second", "Pairs a reranker replica removed from its queue because their request was cancelled (work saved).", (Query(rate("ray_serve_app_cancelled_pairs_total", "model"), "{{model}}"),), "short", 8),
            Panel("Ignored request fields per second", "Unknown top-level fields the compatibility routes ignored (as their reference servers do), by API.", (Query(rate("ray_serve_app_ignored_fields_total", "api"), "{{api}}"),), "short", 8),
        ),
    ),
    Row(
        "serve_app: live writes (writes.enabled)",
        (
            Panel("Documents written per second", "Documents acknowledged by the DocumentWriter (durable in its log), by operation.", (Query(rate("ray_serve_app_documents_written_total", "op"), "{{op}}"),), "short", 8),
            Panel("Write latency (acknowledged)", "A batch validated, encoded and fsynced by the DocumentWriter.", tuple(Query(f'histogram_quantile({q}, sum by (le) (rate(ray_serve_app_stage_latency_ms_bucket{{{APP}, stage="write"}}[{RATE}])))', f"p{int(q * 100)}") for q in (0.5, 0.95)), "ms", 8),
            Panel("Followers' lag (batches behind the writer) p95", "Batches a replica had not applied yet when it polled the writer, by stage; it should stay near 0 (visible within refresh_interval_s).", (Query(quantile(0.95, "ray_serve_app_write_lag_batches_bucket", "stage"), "{{stage}}"),), "short", 8),
        ),
    ),
)


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit, "min": 0}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}, "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr, "legendFormat": q.legend} for i, q in enumerate(panel.queries)],
    }


def build_dashboard() -> dict:
    """The dashboard as a JSON-ready dict (deterministic)."""
    panels: list[dict] = []
    panel_id, y = 1, 0
    for row in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y, x = panel_id + 1, y + 1, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(panel_json(panel, panel_id, x, y))
            panel_id, x = panel_id + 1, x + panel.width
        y += 8
    return {
        "title": "serve_app: hybrid search and reranking",
        "uid": "serve-app-overview",
        "description": "Ray Serve traffic, latency, replicas and queues, and serve_app's funnel and reranker batching metrics. Built by cluster/monitoring/grafana_dashboard.py.",
        "tags": ["ray", "serve", "serve_app"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [
                {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
                {
                    "name": "application",
                    "label": "Serve application",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "definition": "label_values(ray_serve_deployment_replica_healthy, application)",
                    "query": {"query": "label_values(ray_serve_deployment_replica_healthy, application)", "refId": "application"},
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def queried_metric_names(dashboard: dict) -> set[str]:
    """Metric names (``ray_...``) used by the PromQL of a dashboard's panels and variables."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    return {m for e in exprs for m in re.findall(r"\bray_[a-z0-9_]+", e)}


def render() -> str:
    return json.dumps(build_dashboard(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write cluster/monitoring/grafana-serve-app.json.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT}: differs; run `python cluster/monitoring/grafana_dashboard.py`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
