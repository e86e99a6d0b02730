"""Starting Ray and Serve locally and deploying a Serve config file, as ``serve run`` does.

Used by ``serve-app serve`` / ``serve-app demo`` and by the integration tests. Deploying a
config (rather than ``serve.run`` of a bound app) is what ``serve run/deploy deployments.yaml``
do: the controller imports the builder, applies the per-deployment overrides, and a later
config that changes only a deployment's ``user_config`` reconfigures its replicas in place.
Like Serve's own CLI this uses ``ray.serve._private.api.serve_start`` and the client's
``deploy_apps``; they are confined to this module.

Ray itself is started or joined by :mod:`serve_app.ray_session` (``start_ray`` is re-exported
here for the commands and tests that deploy right after).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Coroutine, Iterable, Mapping, Optional, TypeVar

import yaml

from serve_app.errors import UserFacingError
from serve_app.ray_session import SERVE_NAMESPACE, THROUGHPUT_OPTIMIZED_ENV, RayStartError, start_ray, token_path  # noqa: F401 - re-exported: serve's callers start Ray through here
from serve_app.serve.config import ConfigError, format_validation_error, parse_app_config

logger = logging.getLogger(__name__)

IMPORT_PATH = "serve_app.serve.app:build_app"
TERMINAL_FAILURES = ("DEPLOY_FAILED", "UNHEALTHY")
T = TypeVar("T")
_HANDLE_LOOP: Optional[asyncio.AbstractEventLoop] = None
_HANDLE_LOOP_LOCK = threading.Lock()


class DeployError(UserFacingError):
    """An application did not reach RUNNING; the message holds Serve's status message."""


def load_serve_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> Any:
    """A Serve config file (or dict) validated as ``ServeDeploySchema``; our apps' args checked too."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    if isinstance(source, Mapping):
        raw, where = dict(source), "config"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{path}: no such Serve config file")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        where = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a Serve config must be a mapping with `applications`")
    try:
        config = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: invalid Serve config: {format_validation_error(exc)}") from None
    from ray.serve.config import AutoscalingConfig

    for app in config.applications:
        for dep in app.deployments:
            auto = dep.autoscaling_config
            if isinstance(auto, Mapping):  # Serve's schema keeps it a plain dict until deploy time
                try:
                    AutoscalingConfig.model_validate(dict(auto))
                except ValidationError as exc:
                    raise ConfigError(f"{where}: application {app.name!r}, deployment {dep.name!r}: autoscaling_config: {format_validation_error(exc)}") from None
        if app.import_path == IMPORT_PATH:
            try:
                parse_app_config(app.args)
            except ConfigError as exc:
                raise ConfigError(f"{where}: application {app.name!r}: {exc}") from None
    return config


def deploy_config(config: Any) -> None:
    """Start Serve with the config's HTTP options (if not yet running) and submit the config."""
    from ray.serve._private import api as _private_api
    from ray.serve.config import gRPCOptions

    client = _private_api.serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        controller_options=config.controller_options,
    )
    client.deploy_apps(config, _blocking=False)


def app_statuses() -> dict[str, Any]:
    """``serve.status()`` applications by name."""
    from ray import serve

    return dict(serve.status().applications)


def summarize(message: str) -> str:
    """Serve's status message without the traceback it embeds: its first line and the final
    exception (where our errors say what is wrong and how to fix it)."""
    lines = [line for line in message.splitlines() if line.strip()]
    if not any("Traceback (most recent call last)" in line for line in lines):
        return message.strip()
    exc_line = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\w*(\(\w+\))?: ")
    starts = [i for i, line in enumerate(lines) if exc_line.match(line)]
    tail = " ".join(line.strip() for line in lines[starts[-1]:]) if starts else lines[-1].strip()
    return f"{lines[0].strip()} {tail}".strip()


def status_message(app: Any) -> str:
    """The application's message and its failing deployments' messages (tracebacks removed)."""
    parts = [summarize(app.message)] if getattr(app, "message", "") else []
    for name, dep in getattr(app, "deployments", {}).items():
        if str(getattr(dep.status, "value", dep.status)) != "HEALTHY" and dep.message:
            parts.append(f"{name}: {summarize(dep.message)}")
    return "\n".join(p for p in parts if p)


def wait_for_apps(names: Iterable[str], timeout_s: float = 300.0, *, poll_s: float = 0.5) -> dict[str, Any]:
    """Wait until every named application is RUNNING; raise :class:`DeployError` on failure or timeout."""
    names = list(names)
    deadline = time.monotonic() + timeout_s
    while True:
        apps = app_statuses()
        states = {n: str(getattr(apps[n].status, "value", apps[n].status)) if n in apps else "NOT_STARTED" for n in names}
        failed = [n for n, s in states.items() if s in TERMINAL_FAILURES]
        if failed:
            raise DeployError("\n".join(f"application {n!r} {states[n]}: {status_message(apps[n])}" for n in failed))
        if all(s == "RUNNING" for s in states.values()):
            return {n: apps[n] for n in names}
        if time.monotonic() > deadline:
            raise DeployError(f"applications not RUNNING after {timeout_s:.0f}s: {states}")
        time.sleep(poll_s)


def http_base_url(config: Any, route_prefix: str = "/") -> str:
    """``http://host:port`` + route prefix of a config's HTTP options."""
    host = config.http_options.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{host}:{config.http_options.port}{route_prefix.rstrip('/')}"


def on_handle_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on this process's background event loop for Serve handles; return its result.

    Synchronous code (a CLI, a benchmark, a test) can call Serve handles through this in either
    Serve mode: in the high-throughput mode a handle's router runs on the caller's event loop
    (``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0``), so ``handle.method.remote().result()``
    outside a loop fails, and the loop must keep running as long as the handle lives (up to
    ``serve.shutdown()``). This loop runs in a daemon thread until the process exits."""
    global _HANDLE_LOOP
    with _HANDLE_LOOP_LOCK:
        if _HANDLE_LOOP is None:
            _HANDLE_LOOP = asyncio.new_event_loop()
            threading.Thread(target=_HANDLE_LOOP.run_forever, name="serve-handles", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coro, _HANDLE_LOOP).result()


def handle_call(app: str, deployment: str, method: str, *args: Any, **kwargs: Any) -> Any:
    """``await handle.<method>.remote(*args, **kwargs)`` on ``deployment`` of ``app``, from synchronous code."""
    from ray import serve

    async def call() -> Any:
        return await getattr(serve.get_deployment_handle(deployment, app_name=app), method).remote(*args, **kwargs)

    return on_handle_loop(call())


def direct_ingress_url(app: str) -> Optional[str]:
    """``http://HOST:PORT`` of the first ingress replica of ``app`` that serves HTTP itself
    (Serve's direct ingress, on in high-throughput mode), else None.

    Read from the controller's target groups, what a load balancer such as Serve's HAProxy
    registers. (The controller call is Serve-internal, like ``serve_start`` above; the same
    target groups are public in the dashboard's ``/api/serve/applications/``.)"""
    import ray
    from ray.serve.context import _get_global_client

    details = ray.get(_get_global_client()._controller.get_serve_instance_details.remote())
    return direct_ingress_target(details, app)


def direct_ingress_target(details: Mapping[str, Any], app: str) -> Optional[str]:
    """The direct-ingress URL of ``app`` in Serve's instance details (``ServeInstanceDetails`` as a dict).

    Without direct ingress the target groups name the proxies (the ``http_options`` port), and
    this returns None. A replica binds to ``http_options.host`` but its target carries the
    node's IP, so a specific host from the config (127.0.0.1 for a local instance) wins."""
    http = details.get("http_options") or {}
    proxy_port = int(http.get("port") or 0)
    host = http.get("host") if http.get("host") not in (None, "", "0.0.0.0", "::") else None
    for group in details.get("target_groups") or []:
        if group.get("app_name") != app or "HTTP" not in str(group.get("protocol")).upper():
            continue
        for target in group.get("targets") or []:
            if int(target["port"]) != proxy_port:
                return f"http://{host or target['ip']}:{target['port']}"
    return None
