"""``serve-app demo`` and ``serve-app serve``: run the Serve application locally;
``serve-app export-reranker``: prepare its rerankers' runtimes ahead of time.

``serve-app demo`` starts Ray (with its dashboard on 127.0.0.1:8265) and Serve on 127.0.0.1 with
the demo corpus shipped with the package, builds its index under
``~/.cache/serve_app/demo-index`` on first run, prints an example ``curl`` with its answer, and
serves until Ctrl-C or SIGTERM (``--once``: one query, then exit).

``serve-app serve --config deployments.yaml`` validates the Serve config (and the application
args), starts a local Ray instance (or joins ``--address``), deploys it and serves until Ctrl-C
or SIGTERM; ``--once`` waits until it is ready, calls ``/healthz`` and exits (a smoke test of the
config).

``serve-app export-reranker --config deployments.yaml`` loads each reranker with ``backend: onnx``
or ``openvino`` as a replica would, so its ONNX export is made (and cached in ``runtime_dir``)
before deployment, and prints its family, runtime and drift from torch float32.

Stopping: SIGINT (Ctrl-C) and SIGTERM (what ``docker stop``, systemd and Kubernetes send) both
shut Serve down, stop the local Ray instance and exit with status 0; a second signal during
the shutdown is ignored.

The application's API key (``SERVE_APP_API_KEY``, see SECURITY.md): the demo's own calls carry
it, and the printed ``curl`` shows the header.

Ray's token authentication: a local instance started here enables it and creates
``~/.ray/auth_token`` if missing; to join a cluster, its token must be in that file or in
``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` (see :mod:`serve_app.serve.runner`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from serve_app.serve.config import ENV_API_KEY, ENV_RERANKER_MODEL, parse_app_config

logger = logging.getLogger(__name__)

DEFAULT_QUERY = "why does the sun shine"
#: Ray's default dashboard port.
DASHBOARD_PORT = 8265


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived: stop serving and shut down cleanly."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`StopRequested` in the main thread for the ``with``
    block (entered after ``ray.init``, whose own SIGTERM handler exits with status 1 and leaves
    the shutdown half done), and ignore both once it ends, while the caller shuts down."""

    def handler(signum: int, frame: Any) -> None:
        raise StopRequested(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/serve_app`` (default ``~/.cache/serve_app``): the demo's index lives there."""
    from serve_app.commands.core import default_work_dir

    return default_work_dir()


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


#: How the demo reranks with its own reranker: chosen by measurement on the demo's train queries
#: and reported on its test queries (``python -m benchmarks.demo_defaults``;
#: ``tests/test_demo_defaults.py`` keeps this equal to that run's choice).
DEMO_RERANK: dict[str, Any] = {"rerank_top_m": 0, "rerank_blend": "none"}


def demo_config(*, host: str, port: int, index_dir: str, reranker_model: Optional[str], num_cpus_per_replica: float = 0.5, demo_reranker: bool = False) -> dict[str, Any]:
    """The Serve config of the demo: one application on the demo corpus, small CPU replicas.
    ``demo_reranker``: the model is the demo's own, so the demo's measured rerank settings apply
    (:data:`DEMO_RERANK`); another model keeps the service defaults."""
    args: dict[str, Any] = {"index_dir": index_dir, "corpus": "builtin:demo", "fields": {"topic": "keyword"}}  # the demo documents carry a topic
    if reranker_model:
        args["reranker"] = {"model": reranker_model}
    if demo_reranker:
        args["fusion"] = {"rerank_blend": DEMO_RERANK["rerank_blend"]}
        args["funnel"] = {"default_rerank_top_m": DEMO_RERANK["rerank_top_m"]}
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


def _block_until_stopped() -> None:
    print("Serving. Press Ctrl-C (or send SIGTERM) to stop.", flush=True)
    while True:
        time.sleep(3600)


def _serve_until_stopped(serve_fn: Any) -> int:
    """Run ``serve_fn()`` (deploy, then serve or check) until it returns or a signal stops it;
    shut Serve and the local Ray instance down in either case. Exit status 0 on a signal."""
    status = 0
    try:
        with stop_on_signals():
            status = serve_fn()
    except StopRequested as stop:
        print(f"\n{stop.args[0]} received: stopping...", flush=True)
    finally:
        _shutdown()
    return status


def _shutdown() -> None:
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()


def demo_api_key(environ: Optional[dict[str, str]] = None) -> Optional[str]:
    """The API key the demo's own calls send: the first key of ``SERVE_APP_API_KEY`` (None when unset)."""
    from serve_app.serve.auth import load_api_keys

    keys = load_api_keys(ENV_API_KEY, environ)
    return keys[0] if keys else None


def _show_example(base_url: str, query: str, top_n: int = 5, api_key: Optional[str] = None) -> None:
    from serve_app.client import ServeAppClient

    body = {"query": query, "top_n": top_n, "return_documents": True}
    auth = f' -H "Authorization: Bearer ${ENV_API_KEY}"' if api_key else ""
    print("\nExample query:\n")
    print(f"  curl -s -X POST {base_url}/search -H 'Content-Type: application/json'{auth} -d {shlex.quote(json.dumps(body))}\n")
    with ServeAppClient(base_url, api_key=api_key, timeout=120) as client:
        answer = client.search(**body)
        _print_answer(answer)
        if answer["funnel"].get("rerank_top_m") == 0:
            print(
                "Reranking is off by default in this demo: its small reranker, trained on 70 judged queries, ranks the demo's\n"
                "held-out queries below the fused hybrid order (benchmarks/results/demo_defaults/summary.md). The reranker is\n"
                "deployed all the same; asking for it (\"rerank_top_m\": 50) gives:\n"
            )
            _print_answer(client.search(**body, rerank_top_m=50))
    print(f"OpenAPI docs: {base_url}/docs   health: {base_url}/healthz   info: {base_url}/info\n", flush=True)


def _print_answer(answer: dict[str, Any]) -> None:
    print(f"Answer (top {len(answer['results'])} of the funnel {answer['funnel']}, degraded={answer['degraded']}):\n")
    for rank, r in enumerate(answer["results"], 1):
        title = (r.get("title") or r.get("text") or "")[:70]
        ranks = ", ".join(f"{k} #{v['rank']}" for k, v in r["retrievers"].items())
        print(f"  {rank}. [{r['id']}] {title}  score={r['score']:.3f} ({ranks})")
    print(f"\n  timings_ms: {answer['timings_ms']}\n")


def _show_dashboard(url: Optional[str]) -> None:
    if url:
        from serve_app.serve.runner import token_path

        print(
            f"Ray dashboard: {url}  (token authentication: paste the token printed by `ray get-auth-token`, "
            f"kept in {token_path()}, into its login page; Serve tab: {url}/#/serve)\n",
            flush=True,
        )


def run_demo(args: argparse.Namespace) -> int:
    from serve_app.index import ensure_index
    from serve_app.serve.runner import deploy_config, load_serve_config, start_ray, wait_for_apps

    api_key = demo_api_key()  # a malformed key fails here, before anything starts
    cache = cache_dir()
    index_dir = str(Path(args.index_dir).expanduser()) if args.index_dir else str(cache / "demo-index")
    model = demo_reranker_model(cache)
    own = model is not None and not os.environ.get(ENV_RERANKER_MODEL, "").strip()
    raw = demo_config(host=args.host, port=args.port, index_dir=index_dir, reranker_model=model, num_cpus_per_replica=args.replica_cpus, demo_reranker=own)
    config = load_serve_config(raw)
    app_cfg = parse_app_config(raw["applications"][0]["args"])
    if ensure_index(app_cfg.index_dir, **app_cfg.index_build_args(), show_progress=True):  # here, so that the build's progress shows in this terminal
        print(f"Built the demo index in {index_dir}", flush=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    dashboard = start_ray(num_cpus=args.num_cpus, log_to_driver=args.verbose, dashboard_port=args.dashboard_port or None)

    def serve_demo() -> int:
        deploy_config(config)
        print("Deploying (model loading takes a little while; replica logs: /tmp/ray/session_latest/logs/serve)...", flush=True)
        wait_for_apps(["serve_app"], timeout_s=args.timeout)
        _show_example(f"http://{args.host}:{args.port}", args.query, api_key=api_key)
        _show_dashboard(dashboard)
        if not args.once:
            _block_until_stopped()
        return 0

    return _serve_until_stopped(serve_demo)


def run_serve(args: argparse.Namespace) -> int:
    from serve_app.serve.runner import deploy_config, direct_ingress_url, http_base_url, load_serve_config, start_ray, wait_for_apps

    config = load_serve_config(args.config)
    if args.port is not None:
        config = config.model_copy(update={"http_options": config.http_options.model_copy(update={"port": args.port})})
    dashboard = start_ray(args.address, num_cpus=args.num_cpus, throughput_optimized=args.throughput_optimized, dashboard_port=args.dashboard_port)

    def serve_config() -> int:
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
        _show_dashboard(dashboard)
        if args.once:
            import httpx

            for app_bases in bases.values():
                for base in app_bases:
                    url = base + "/healthz"
                    r = httpx.get(url, timeout=30)
                    print(f"GET {url} -> {r.status_code} {r.text}", flush=True)
                    if r.status_code != 200:
                        return 1
            return 0
        if args.address:
            print("Deployed to the cluster; it keeps serving after this command exits.", flush=True)
            return 0
        _block_until_stopped()
        return 0

    if args.address and not args.once:
        return serve_config()  # the cluster keeps serving after this command: nothing to shut down
    return _serve_until_stopped(serve_config)


def run_export_reranker(args: argparse.Namespace) -> int:
    """Load rerankers as a replica would (family, runtime, export, drift check) and report them:
    makes the ONNX export of ``backend: onnx`` / ``openvino`` models ahead of time (a container
    image build), and shows the drift of each runtime from torch float32 before any traffic."""
    import json

    from serve_app.config import RerankerModelConfig
    from serve_app.rerank import load_scorer

    targets: dict[str, RerankerModelConfig] = {}
    if args.config:
        from serve_app.serve.runner import load_serve_config

        for app in load_serve_config(args.config).applications:
            if not str(app.import_path).startswith("serve_app."):
                continue
            app_cfg = parse_app_config(dict(app.args or {}))
            for name, cfg in app_cfg.reranker.catalog().items():
                if args.all or cfg.backend != "torch":
                    targets[f"{app.name}/{name}"] = cfg
        if not targets:
            print(f"{args.config}: no reranker with backend onnx or openvino (pass --all to load every reranker)")
            return 0
    else:
        settings = {k: v for k, v in (("kind", args.kind), ("backend", args.backend), ("dtype", args.dtype), ("quantize", args.quantize), ("runtime_dir", args.runtime_dir), ("max_length", args.max_length)) if v is not None}
        targets[args.model] = RerankerModelConfig(model=args.model, **settings)
    for name, cfg in targets.items():
        scorer = load_scorer(cfg)
        print(json.dumps({"name": name, **scorer.describe()}, indent=None if args.compact else 1, default=str), flush=True)
    return 0


def run_collections(args: argparse.Namespace) -> int:
    """List the collections of a Serve config file's serve_app applications (each one's index
    directory, corpus, declared fields and whether its index is built); with --build, build the
    indexes that are missing from their corpus and settings (what deploying would do, ahead of
    it: in a Job, or before a rolling update). Search and writes of a collection go to
    /collections/{name}/...; `serve-app eval --index DIR --reranker MODEL` evaluates one."""
    import json

    from serve_app.index import ensure_index
    from serve_app.index.files import MANIFEST
    from serve_app.serve.runner import load_serve_config

    for app in load_serve_config(args.config).applications:
        if not str(app.import_path).startswith("serve_app."):
            continue
        app_cfg = parse_app_config(dict(app.args or {}))
        for name, cfg in {"default": app_cfg, **app_cfg.collection_configs()}.items():
            if args.collection and name not in args.collection:
                continue
            built = ensure_index(cfg.index_dir, **{**cfg.index_build_args(), "build_if_missing": True}, show_progress=not args.quiet) if args.build else []
            present = os.path.exists(os.path.join(cfg.index_dir, MANIFEST))
            print(json.dumps({"application": app.name, "collection": name, "index_dir": cfg.index_dir, "corpus": cfg.corpus, "index": "built now" if built else ("present" if present else "missing"), "retrievers": list(cfg.retrievers), "fields": cfg.fields, "reranker": cfg.reranker.model}), flush=True)
    return 0


def register(subparsers: Any) -> None:
    """Add ``demo``, ``serve``, ``collections`` and ``export-reranker`` to the ``serve-app`` command line."""
    p = subparsers.add_parser("demo", help="serve the packaged demo corpus locally and show an example query")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--index-dir", default=None, help="index directory (default ~/.cache/serve_app/demo-index; built if absent)")
    p.add_argument("--query", default=DEFAULT_QUERY, help="example query to run")
    p.add_argument("--once", action="store_true", help="run the example query and exit (for tests and CI)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs given to the local Ray instance (default: all)")
    p.add_argument("--replica-cpus", type=float, default=0.5, help="CPUs reserved per replica (default 0.5)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the deployment (default 600)")
    p.add_argument("--dashboard-port", type=int, default=DASHBOARD_PORT, help=f"port of the Ray dashboard on 127.0.0.1 (default {DASHBOARD_PORT}; 0: no dashboard)")
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
    s.add_argument("--dashboard-port", type=int, default=None, help=f"start the local Ray instance's dashboard on 127.0.0.1 at this port (e.g. {DASHBOARD_PORT}; default: no dashboard)")
    s.set_defaults(func=run_serve)

    c = subparsers.add_parser("collections", help="list the collections of a Serve config file and build their missing indexes", description=run_collections.__doc__)
    c.add_argument("--config", default="deployments.yaml", help="Serve config file (default deployments.yaml)")
    c.add_argument("--collection", action="append", default=None, help="only this collection (repeatable; `default` is the top-level one)")
    c.add_argument("--build", action="store_true", help="build each listed collection's index when it is missing")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=run_collections)

    x = subparsers.add_parser("export-reranker", help="load rerankers as a replica would: make ONNX/OpenVINO exports ahead of time and show each runtime's drift", description=run_export_reranker.__doc__)
    src = x.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", default=None, help="Serve config file: every reranker of its serve_app applications with backend onnx or openvino")
    src.add_argument("--model", default=None, help="one reranker checkpoint (Hub id or directory)")
    x.add_argument("--all", action="store_true", help="with --config: load the torch rerankers too (their drift check, if any)")
    x.add_argument("--kind", choices=["auto", "sequence_classification", "pooling", "causal_lm"], default=None, help="with --model: model family (default auto)")
    x.add_argument("--backend", choices=["torch", "onnx", "openvino"], default=None, help="with --model: runtime (default torch)")
    x.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None, help="with --model: dtype (default auto)")
    x.add_argument("--quantize", choices=["none", "int8"], default=None, help="with --model: onnx int8 (default none)")
    x.add_argument("--runtime-dir", default=None, help="with --model: where the export goes (default: inside the model directory, else ~/.cache/serve_app/runtimes/)")
    x.add_argument("--max-length", type=int, default=None, help="with --model: tokens per pair")
    x.add_argument("--compact", action="store_true", help="one JSON line per model")
    x.set_defaults(func=run_export_reranker)
