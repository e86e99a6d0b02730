"""Where serve_app starts or joins a Ray instance: the one module that does.

Every command that needs Ray (``serve``, ``demo``, ``index --ray``, ``train-reranker`` /
``distill --ray-workers``) and the tests call :func:`start_ray` (start a local instance on
127.0.0.1 or join a cluster) or :func:`ray_session` (the same, stopped afterwards when this
call started it). Ray is imported inside the functions: importing this module does not import
Ray, so the core stays importable without it.

Ray token authentication (Ray >= 2.5x): a new local instance started here enables it and
creates ``~/.ray/auth_token`` when missing. Connecting to an existing cluster needs its token
in ``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``; an
``AuthenticationError`` is turned into a :class:`RayStartError` saying so.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from serve_app.errors import UserFacingError

SERVE_NAMESPACE = "serve"
THROUGHPUT_OPTIMIZED_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"


class RayStartError(UserFacingError):
    """Ray could not be started or joined; the message says why and what to do."""


def start_ray(
    address: Optional[str] = None,
    *,
    num_cpus: Optional[float] = None,
    env_vars: Optional[Mapping[str, str]] = None,
    metrics_export_port: Optional[int] = None,
    system_config: Optional[Mapping[str, Any]] = None,
    log_to_driver: bool = True,
    throughput_optimized: bool = False,
    dashboard_port: Optional[int] = None,
) -> Optional[str]:
    """Connect to ``address`` (e.g. ``auto`` or ``ray://host:10001``), or start a local instance on 127.0.0.1.

    ``dashboard_port`` starts the local instance's Ray dashboard on 127.0.0.1 at that port (None:
    no dashboard); the dashboard's URL is returned (None without one, or on a cluster, whose
    dashboard is the cluster's).

    ``log_to_driver=False`` keeps the replicas' logs out of this terminal (they stay in
    ``/tmp/ray/session_latest/logs``).

    ``throughput_optimized`` starts the local instance with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``
    (Serve's high-throughput mode, Ray >= 2.55): gRPC between deployments instead of Ray actor
    calls, user code and the request router on each replica's own event loop, and direct
    ingress (the ingress replica serves HTTP itself, see :func:`direct_ingress_url`). Serve
    reads the variable when its processes start, so on an existing cluster (``address``) it has
    to be in the environment of ``ray start`` on every node instead; this raises if asked there.
    """
    import ray

    if ray.is_initialized():
        return None
    if throughput_optimized:
        if address:
            raise RayStartError(
                "--throughput-optimized applies to a local Ray instance; on a cluster set RAY_SERVE_THROUGHPUT_OPTIMIZED=1 "
                "in the environment of `ray start` on every node (see docs/DEPLOYING.md)"
            )
        os.environ[THROUGHPUT_OPTIMIZED_ENV] = "1"
    kwargs: dict[str, Any] = {"namespace": SERVE_NAMESPACE, "logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": dict(env_vars)}
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(address="local", include_dashboard=dashboard_port is not None, _node_ip_address="127.0.0.1")
        if dashboard_port is not None:
            kwargs.update(dashboard_host="127.0.0.1", dashboard_port=int(dashboard_port))
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if metrics_export_port is not None:
            kwargs["_metrics_export_port"] = metrics_export_port
        if system_config:
            kwargs["_system_config"] = dict(system_config)
    try:
        ray.init(**kwargs)
    except Exception as exc:  # AuthenticationError, ConnectionError...
        if type(exc).__name__ == "AuthenticationError":
            raise RayStartError(
                f"Ray refused the connection: {exc}. This cluster uses token authentication: put its token in "
                f"~/.ray/auth_token (or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH); for a cluster started with "
                f"`ray start --head`, run `ray get-auth-token --generate` on the head first."
            ) from None
        if address:
            raise RayStartError(f"could not connect to Ray at {address!r}: {type(exc).__name__}: {exc}") from exc
        raise
    return f"http://127.0.0.1:{dashboard_port}" if dashboard_port is not None and not address else None


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, **kwargs: Any) -> Iterator[bool]:
    """:func:`start_ray` for the duration of a job; yields whether this call started (or joined)
    Ray, in which case it is shut down afterwards. A Ray already initialised in this process
    is used as it is and left running."""
    import ray

    started = not ray.is_initialized()
    if started:
        start_ray(address, **kwargs)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


def token_path() -> Path:
    """Where Ray keeps its authentication token: ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
