"""``serve-app demo`` and ``serve-app serve``: run the Serve application locally.

``serve-app demo`` starts Ray and Serve on 127.0.0.1 with the demo corpus shipped with the
package, builds its index under ``~/.cache/serve_app/demo-index`` on first run, prints an example
``curl`` with its answer, and serves until Ctrl-C (``--once``: one query, then exit).

``serve-app serve --config deployments.yaml`` validates the Serve config (and the application
args), starts a local Ray instance (or joins ``--address``), deploys it and serves until Ctrl-C;
``--once`` waits until it is ready, calls ``/healthz`` and exits (a smoke test of the config).

Ray's token authentication: a local instance started here enables it and creates
``~/.ray/auth_token`` if missing; to join a cluster, its token must be in that file or in
``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` (see :mod:`serve_app.serve.runner`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any, Optional

from serve_app.serve.config import ENV_RERANKER_MODEL

logger = logging.getLogger(__name__)

DEFAULT_QUERY = "why does the sun shine"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/serve_app`` (default ``~/.cache/serve_app``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "serve_app"


def demo_reranker_model(cache: Path) -> Optional[str]:
    """The reranker for the demo: ``$SERVE_APP_RERANKER_MODEL``, else the fine-tuned demo reranker
    (trained once on first use), else None (the configured default is used)."""
    if os.environ.get(ENV_RERANKER_MODEL, "").strip():
        return os.environ[ENV_RERANKER_MODEL].strip()
    try:
        from serve_app.training.demo_reranker import ensure_demo_reranker
    except ImportError:
        logger.warning("serve_app.training.demo_reranker is not available; using the configured reranker model")
        return None
    print("Preparing the demo reranker (fine-tuned once from all-MiniLM-L6-v2 on the demo data; a few minutes on first run)...", flush=True)
    return str(ensure_demo_reranker())


def demo_config(*, host: str, port: int, index_dir: str, reranker_model: Optional[str], num_cpus_per_replica: float = 0.5) -> dict[str, Any]:
    """The Serve config of the demo: one application on the demo corpus, small CPU replicas."""
    args: dict[str, Any] = {"index_dir": index_dir, "corpus": "builtin:demo"}
    if reranker_model:
        args["reranker"] = {"model": reranker_model}
    small = {"ray_actor_options": {"num_cpus": num_cpus_per_replica}}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": "serve_app",
                "route_prefix": "/",
                "import_path": "serve_app.serve.app:build_app",
                "args": args,
                "deployments": [
                    {"name": "SearchIngress", "num_replicas": 1, **small},
                    {"name": "BM25Retriever", "num_replicas": 1, **small},
                    {"name": "DenseRetriever", "num_replicas": 1, **small},
                    {"name": "CrossEncoderReranker", "num_replicas": 1, **small},
                ],
            }
        ],
    }


def _block_until_interrupted() -> None:
    print("Serving. Press Ctrl-C to stop.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nStopping...", flush=True)


def _shutdown() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def _show_example(base_url: str, query: str, top_n: int = 5) -> None:
    from serve_app.client import ServeAppClient

    body = {"query": query, "top_n": top_n, "return_documents": True}
    print("\nExample query:\n")
    print(f"  curl -s -X POST {base_url}/search -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}\n")
    with ServeAppClient(base_url, timeout=120) as client:
        answer = client.search(**body)
    print(f"Answer (top {len(answer['results'])} of the funnel {answer['funnel']}, degraded={answer['degraded']}):\n")
    for rank, r in enumerate(answer["results"], 1):
        title = (r.get("title") or r.get("text") or "")[:70]
        ranks = ", ".join(f"{k} #{v['rank']}" for k, v in r["retrievers"].items())
        print(f"  {rank}. [{r['id']}] {title}  score={r['score']:.3f} ({ranks})")
    print(f"\n  timings_ms: {answer['timings_ms']}\n")
    print(f"OpenAPI docs: {base_url}/docs   health: {base_url}/healthz   info: {base_url}/info\n", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    from serve_app.serve.config import parse_app_config
    from serve_app.serve.runner import deploy_config, load_serve_config, start_ray, wait_for_apps
    from serve_app.serve.stores import ensure_index

    cache = cache_dir()
    index_dir = str(Path(args.index_dir).expanduser()) if args.index_dir else str(cache / "demo-index")
    model = demo_reranker_model(cache)
    raw = demo_config(host=args.host, port=args.port, index_dir=index_dir, reranker_model=model, num_cpus_per_replica=args.replica_cpus)
    config = load_serve_config(raw)
    app_cfg = parse_app_config(raw["applications"][0]["args"])
    if ensure_index(app_cfg):  # here, so that the build's progress shows in this terminal
        print(f"Built the demo index in {index_dir}", flush=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    start_ray(num_cpus=args.num_cpus, log_to_driver=args.verbose)
    try:
        deploy_config(config)
        print("Deploying (model loading takes a little while; replica logs: /tmp/ray/session_latest/logs/serve)...", flush=True)
        wait_for_apps(["serve_app"], timeout_s=args.timeout)
        base_url = f"http://{args.host}:{args.port}"
        _show_example(base_url, args.query)
        if not args.once:
            _block_until_interrupted()
    finally:
        _shutdown()
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from serve_app.serve.runner import deploy_config, direct_ingress_url, http_base_url, load_serve_config, start_ray, wait_for_apps

    config = load_serve_config(args.config)
    if args.port is not None:
        config = config.model_copy(update={"http_options": config.http_options.model_copy(update={"port": args.port})})
    start_ray(args.address, num_cpus=args.num_cpus, throughput_optimized=args.throughput_optimized)
    try:
        deploy_config(config)
        names = [a.name for a in config.applications]
        print(f"Deploying {', '.join(names)}...", flush=True)
        wait_for_apps(names, timeout_s=args.timeout)
        bases = {}
        for app in config.applications:
            bases[app.name] = [http_base_url(config, app.route_prefix or "/")]
            print(f"  {app.name}: {bases[app.name][0]}  (docs: /docs)", flush=True)
            direct = direct_ingress_url(app.name) if args.throughput_optimized else None
            if direct:
                bases[app.name].append(direct + (app.route_prefix or "/").rstrip("/"))
                print(f"  {app.name}, direct ingress (the ingress replica itself, no proxy): {bases[app.name][1]}", flush=True)
        if args.once:
            import httpx

            for app_bases in bases.values():
                for base in app_bases:
                    url = base + "/healthz"
                    r = httpx.get(url, timeout=30)
                    print(f"GET {url} -> {r.status_code} {r.text}", flush=True)
                    if r.status_code != 200:
                        return 1
        elif args.address:
            print("Deployed to the cluster; it keeps serving after this command exits.", flush=True)
            return 0
        else:
            _block_until_interrupted()
    finally:
        if args.once or not args.address:
            _shutdown()
    return 0


def register(subparsers: Any) -> None:
    """Add ``demo`` and ``serve`` to the ``serve-app`` command line."""
    p = subparsers.add_parser("demo", help="serve the packaged demo corpus locally and show an example query")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--index-dir", default=None, help="index directory (default ~/.cache/serve_app/demo-index; built if absent)")
    p.add_argument("--query", default=DEFAULT_QUERY, help="example query to run")
    p.add_argument("--once", action="store_true", help="run the example query and exit (for tests and CI)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs given to the local Ray instance (default: all)")
    p.add_argument("--replica-cpus", type=float, default=0.5, help="CPUs reserved per replica (default 0.5)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the deployment (default 600)")
    p.set_defaults(func=run_demo)

    s = subparsers.add_parser("serve", help="deploy a Serve config file (deployments.yaml) locally or to a cluster")
    s.add_argument("--config", default="deployments.yaml", help="Serve config file (default deployments.yaml)")
    s.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto) instead of starting a local instance")
    s.add_argument("--port", type=int, default=None, help="override http_options.port")
    s.add_argument("--num-cpus", type=float, default=None, help="CPUs of a local Ray instance (default: all)")
    s.add_argument("--once", action="store_true", help="deploy, check /healthz, shut down")
    s.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="start the local Ray instance in Serve's high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: gRPC between "
        "deployments, direct ingress on the ingress replica's own port); on a cluster, set that variable for `ray start` instead",
    )
    s.add_argument("--timeout", type=float, default=900, help="seconds to wait for the deployment (default 900)")
    s.set_defaults(func=run_serve)
