"""Screenshots of the Ray dashboard's Serve views with serve_app running, for docs/MONITORING.md.

    python scripts/dashboard_screenshots.py [--out docs/images]

Starts a local Ray instance with its dashboard on 127.0.0.1, deploys the serve_app application
on the built-in demo corpus (the packaged all-MiniLM-L6-v2 bi-encoder; a small random-weight
cross-encoder as the reranker, since the views show deployments, replicas and traffic, not
answers), sends a little /search and /rerank traffic, and photographs the dashboard with
Debian's headless ``chromium`` (scripts/system-packages.sh installs it). Ray's token
authentication is on for local instances: the script reads the token Ray created and puts it
in front of the dashboard with a loopback proxy that adds the ``Authorization`` header, so the
browser is authenticated as a user who pasted the token would be. Everything binds to
127.0.0.1 and stops when the script ends.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
APP = "serve_app"
VIEWS = {
    "ray-dashboard-serve.png": "#/serve",
    "ray-dashboard-serve-app.png": f"#/serve/applications/{APP}",
    "ray-dashboard-cluster.png": "#/cluster",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def auth_proxy(target: str, token: str, port: int) -> threading.Thread:
    """A loopback HTTP proxy to ``target`` that adds ``Authorization: Bearer <token>``."""
    from aiohttp import ClientSession, web

    async def forward(request: "web.Request") -> "web.StreamResponse":
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "authorization", "accept-encoding")}
        headers["Authorization"] = f"Bearer {token}"
        async with ClientSession() as session:
            async with session.request(request.method, target + request.rel_url.path_qs, headers=headers, data=await request.read(), allow_redirects=False) as r:
                body = await r.read()
                out = web.Response(status=r.status, body=body)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "content-encoding", "transfer-encoding", "connection"):
                        out.headers[k] = v
                return out

    def serve() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def screenshot(chromium: str, url: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1440,1000", "--virtual-time-budget=15000", f"--screenshot={out}", url]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    print(f"wrote {out} ({url.split('#', 1)[-1]})")


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "docs" / "images"), help="where the PNG files go")
    p.add_argument("--work", default=None, help="scratch directory (index, models; default: a temporary one)")
    args = p.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("Debian's chromium is needed: bash scripts/system-packages.sh")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="serve-app-shots-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)

    from serve_app.ray_session import token_path
    from serve_app.serve.runner import deploy_config, load_serve_config, start_ray, wait_for_apps
    from serve_app.testing import build_tiny_cross_encoder

    reranker = build_tiny_cross_encoder(work / "reranker", seed=0)
    http_port, dash_port, proxy_port = free_port(), free_port(), free_port()
    dashboard = start_ray(num_cpus=4, dashboard_port=dash_port, log_to_driver=False)
    assert dashboard, "the local Ray instance started no dashboard"
    import ray
    from ray import serve

    try:
        config = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": http_port},
            "applications": [{
                "name": APP, "route_prefix": "/", "import_path": "serve_app.serve.app:build_app",
                "args": {"index_dir": str(work / "index"), "corpus": "builtin:demo", "build_index_if_missing": True, "reranker": {"model": str(reranker), "device": "cpu"}},
                "deployments": [{"name": n, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}} for n in ("SearchIngress", "BM25Retriever", "DenseRetriever", "CrossEncoderReranker")],
            }],
        }
        deploy_config(load_serve_config(config))
        time.sleep(1.0)
        wait_for_apps([APP], timeout_s=900)
        base = f"http://127.0.0.1:{http_port}"
        for i in range(40):
            httpx.post(base + "/search", json={"query": f"why does the sun shine {i}", "top_n": 5}, timeout=120)
            httpx.post(base + "/v2/rerank", json={"query": "stars", "documents": ["The Sun is a star.", "Tides follow the Moon."]}, timeout=120)
        token = token_path().read_text().strip() if token_path().is_file() else os.environ.get("RAY_AUTH_TOKEN", "")
        auth_proxy(dashboard.rstrip("/"), token, proxy_port)
        time.sleep(5.0)  # the dashboard's Serve views poll the controller every few seconds
        for name, view in VIEWS.items():
            screenshot(chromium, f"http://127.0.0.1:{proxy_port}/{view}", out / name)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
