"""Run the serve_app Ray Serve application locally for a benchmark, and stop it afterwards.

``serve_stack(app_args, deployments, ...)`` starts Ray on 127.0.0.1 (logical CPUs given by
``num_cpus``), deploys one application the way ``serve run deployments.yaml`` does (through
``serve_app.serve.runner``), waits until it is RUNNING and ``/healthz`` answers, yields the
application's base URL, and shuts Serve and Ray down on exit, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from benchmarks.common import REPO_ROOT
from benchmarks.loadgen import wait_ready

APP = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def app_config(app_args: Mapping[str, Any], deployments: Mapping[str, Mapping[str, Any]], port: int) -> dict[str, Any]:
    """A Serve config with one application ``bench`` at ``/`` over ``app_args``."""
    deps = []
    for name, opts in deployments.items():
        d = {"name": name, **copy.deepcopy(dict(opts))}
        if "autoscaling_config" in d:
            d.pop("num_replicas", None)
        deps.append(d)
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 600},
        "applications": [{"name": APP, "route_prefix": "/", "import_path": "serve_app.serve.app:build_app", "args": dict(app_args), "deployments": deps}],
    }


@contextlib.contextmanager
def serve_stack(
    app_args: Mapping[str, Any],
    deployments: Mapping[str, Mapping[str, Any]],
    *,
    num_cpus: float = 4,
    port: Optional[int] = None,
    timeout_s: float = 600,
    env: Optional[Mapping[str, str]] = None,
    worker_niceness: Optional[int] = 0,
    fast_autoscaling_metrics: bool = False,
    throughput_optimized: bool = False,
    via: str = "proxy",
) -> Iterator[str]:
    """Ray + Serve with the application deployed; yields ``http://127.0.0.1:PORT``.

    ``worker_niceness``: Ray starts its worker processes (every replica) at ``nice 15`` by
    default, so on a machine shared with other work they get a small fraction of the CPU that a
    normal process (nice 0, e.g. an in-process library or another server) gets. Benchmarks
    compare with such processes, so the default here is 0 (``RAY_worker_niceness``); None keeps
    Ray's default.

    ``throughput_optimized``: Serve's high-throughput mode (see
    ``serve_app.serve.runner.start_ray``); the ingress replica also serves HTTP itself, on
    127.0.0.1 here (``serve_app.serve.runner.direct_ingress_url`` finds it). Its drain period at
    shutdown is cut from 30 s to 1 s, since no load balancer has to deregister it here.
    ``via="direct"`` (needs ``throughput_optimized``) yields that replica's URL instead of the
    proxy's.

    ``fast_autoscaling_metrics``: replicas and handles push autoscaling metrics every second
    instead of Serve's default 10 s (for autoscaling traces; it costs background CPU).
    """
    from serve_app.serve.runner import deploy_config, direct_ingress_url, load_serve_config, start_ray, wait_for_apps

    port = port or free_port()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if fast_autoscaling_metrics:
        os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
        os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    if throughput_optimized:
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    if worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(worker_niceness)
    for k, v in (env or {}).items():
        os.environ[k] = v
    config = app_config(app_args, deployments, port)
    import ray
    from ray import serve

    t0 = time.perf_counter()
    start_ray(num_cpus=num_cpus, log_to_driver=False, throughput_optimized=throughput_optimized)
    try:
        deploy_config(load_serve_config(config))
        time.sleep(1.0)
        wait_for_apps([APP], timeout_s=timeout_s)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/healthz", timeout_s=timeout_s)
        print(f"serve_app ready at {base} after {time.perf_counter() - t0:.0f} s")
        if via == "direct":
            base = direct_ingress_url(APP) or ""
            if not base:
                raise SystemExit("direct ingress: the ingress replica published no HTTP port")
            print(f"sending to the ingress replica directly at {base}")
        yield base
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def add_serve_mode_args(p: argparse.ArgumentParser) -> None:
    """``--throughput-optimized`` and ``--via`` of the benchmarks that start the application."""
    p.add_argument("--throughput-optimized", action="store_true", help="start Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (gRPC between deployments, user code and router on the replicas' own event loop, direct ingress)")
    p.add_argument("--via", choices=("proxy", "direct"), default="proxy", help="send requests to Serve's HTTP proxy, or straight to the ingress replica's own HTTP port (direct ingress; needs --throughput-optimized): the path a load balancer such as Serve's HAProxy takes")


def serve_mode(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The Serve mode ``args`` ask for, in words for a summary; a parser error for ``--via direct`` alone."""
    if args.via == "direct" and not args.throughput_optimized:
        p.error("--via direct needs --throughput-optimized (direct ingress is part of that mode)")
    if not args.throughput_optimized:
        return "Serve's standard mode (HTTP proxy, Ray actor calls between deployments)"
    path = "straight to the ingress replica (direct ingress)" if args.via == "direct" else "through the HTTP proxy"
    return f"Serve's high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1), requests {path}"


def handle_call(deployment: str, method: str, *args: Any, app: str = APP) -> Any:
    """``await handle.<method>.remote(*args)`` on ``deployment`` of the benchmark application, from synchronous code."""
    from serve_app.serve.runner import handle_call as call

    return call(app, deployment, method, *args)


def handle_round_trips(deployment: str, n: int, app: str = APP) -> list[float]:
    """Milliseconds of ``n`` ``ping`` calls from this process to ``deployment`` through a Serve handle."""
    from ray import serve

    from serve_app.serve.runner import on_handle_loop

    async def pings() -> list[float]:
        handle = serve.get_deployment_handle(deployment, app_name=app)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await handle.ping.remote()
            out.append((time.perf_counter() - t0) * 1000)
        return out

    return on_handle_loop(pings())


def _process_titles() -> Iterator[tuple[int, str]]:
    """(pid, command line) of every readable process in /proc (Ray workers show their title there)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        yield int(d.name), cmd


def find_replica_pid(deployment: str, app: str = APP) -> int | None:
    """PID of the Ray worker running ``ServeReplica:<app>:<deployment>`` (first one found).

    Ray sets the process title to ``ray::ServeReplica:<app>:<deployment>``, with the running
    method appended (``.handle_request...``) while the replica is busy."""
    tag = f"ServeReplica:{app}:{deployment}"
    for pid, cmd in _process_titles():
        if cmd == f"ray::{tag}" or cmd.startswith(f"ray::{tag}."):
            return pid
    return None


def serve_pids(app: str = APP) -> dict[str, int]:
    """PIDs of the processes that serve a request: the HTTP proxy and every replica of ``app``."""
    out: dict[str, int] = {}
    for pid, cmd in _process_titles():
        if cmd.startswith("ray::ProxyActor"):
            out[f"ProxyActor:{pid}"] = pid
        elif cmd.startswith(f"ray::ServeReplica:{app}:"):
            out[f"{cmd.split(':')[-1].split('.')[0]}:{pid}"] = pid
    return out


def cpu_seconds(pids: "dict[str, int]") -> float:
    """Total CPU seconds used so far by ``pids`` (processes that exited count as 0)."""
    total = 0.0
    for pid in pids.values():
        try:
            total += proc_stat(pid)[0]
        except (OSError, IndexError, ValueError):
            pass
    return total


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far by all threads of ``pid``, its nice value), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[16])


def replica_counts(app: str = APP, states: tuple[str, ...] = ("RUNNING",)) -> dict[str, int]:
    """Replicas of each deployment of ``app`` in one of ``states`` (from ``serve.status()``)."""
    from ray import serve

    deps = serve.status().applications[app].deployments
    return {name: sum(n for state, n in d.replica_states.items() if str(getattr(state, "value", state)) in states) for name, d in deps.items()}
