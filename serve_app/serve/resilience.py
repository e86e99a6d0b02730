"""Failures between the ingress and its stages: back-pressure, replica death, request deadlines.

* :class:`StageOverloaded`: a stage's queue is full. Serve raises ``BackPressureError`` on a
  deployment handle once ``max_queued_requests`` requests wait for that deployment's replicas;
  :func:`call_stage` turns it into this exception, which the ingress answers with
  **503 overloaded** and ``Retry-After`` (the request is shed, not degraded, so that clients
  back off instead of receiving worse results while the stage is saturated).
* :func:`call_stage`: one call to a stage through a deployment handle, retried once when the
  replica died under it (``RayActorError``: killed, crashed, node lost) or had just been
  removed (``ReplicaUnavailableError``). Every stage call is idempotent (retrieval, scoring,
  ping), so a retry is safe; Serve routes it to another replica, or queues it until the
  replacement replica is up (still within the stage's timeout).
* :func:`run_with_deadline`: the overall deadline of one request in the ingress
  (``timeouts.request_timeout_s``): past it the pending stage calls are cancelled and the
  answer is **504 deadline_exceeded**.

Ray is imported lazily, so the plain-class tests of the ingress run without it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Awaitable, Callable, Optional, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a client is told to wait (``Retry-After``) when the stage did not say (Serve's
#: ``backpressure_config.retry_after_s`` of the overloaded deployment wins when set).
DEFAULT_RETRY_AFTER_S = 1.0
#: Retries of a stage call after its replica died (at most this many extra attempts).
REPLICA_DEATH_RETRIES = 1
_RETRY_BACKOFF_S = 0.05


class StageOverloaded(RuntimeError):
    """A stage rejected the call because its request queue is full (back-pressure)."""

    def __init__(self, stage: str, retry_after_s: Optional[float] = None) -> None:
        self.stage = stage
        self.retry_after_s = DEFAULT_RETRY_AFTER_S if retry_after_s is None else float(retry_after_s)
        super().__init__(f"the {stage} stage is at capacity (its request queue is full)")

    def retry_after_header(self) -> str:
        """``Retry-After`` value: whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


def _serve_exceptions() -> tuple[Optional[type], Optional[type]]:
    try:
        from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
    except ImportError:  # pragma: no cover - Ray is a dependency; keep the plain class usable without it
        return None, None
    return BackPressureError, ReplicaUnavailableError


def as_overloaded(exc: BaseException, stage: str) -> Optional[StageOverloaded]:
    """The :class:`StageOverloaded` equivalent of ``exc`` if it is Serve's back-pressure, else None."""
    if isinstance(exc, StageOverloaded):
        return exc
    back_pressure, _ = _serve_exceptions()
    if back_pressure is not None and isinstance(exc, back_pressure):
        return StageOverloaded(stage, getattr(exc, "retry_after_s", None))
    return None


def is_replica_death(exc: BaseException) -> bool:
    """Whether ``exc`` means the replica serving the call went away (worth one retry elsewhere)."""
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # pragma: no cover
        return False
    _, replica_unavailable = _serve_exceptions()
    return isinstance(exc, RayActorError) or (replica_unavailable is not None and isinstance(exc, replica_unavailable))


async def call_stage(stage: str, make_call: Callable[[], Awaitable[T]], *, retries: int = REPLICA_DEATH_RETRIES) -> T:
    """Await ``make_call()``; back-pressure raises :class:`StageOverloaded`, a dead replica is retried.

    ``make_call`` must start a new call each time (e.g. ``lambda: handle.method.remote(...)``).
    """
    attempt = 0
    while True:
        try:
            return await make_call()
        except Exception as exc:
            overloaded = as_overloaded(exc, stage)
            if overloaded is not None:
                raise overloaded from None
            if attempt < retries and is_replica_death(exc):
                attempt += 1
                logger.warning("%s: the replica died during the call (%s); retrying (%d/%d)", stage, type(exc).__name__, attempt, retries)
                await asyncio.sleep(_RETRY_BACKOFF_S * attempt)
                continue
            raise


class DeadlineExceeded(TimeoutError):
    """The request's overall deadline passed before its answer was ready."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(f"no answer within request_timeout_s={timeout_s:g}")


async def run_with_deadline(coro: Awaitable[T], timeout_s: float) -> T:
    """Await ``coro`` for at most ``timeout_s`` seconds; past it, cancel it and raise :class:`DeadlineExceeded`.

    Timeouts raised *inside* ``coro`` before the deadline (e.g. an unhandled stage timeout)
    propagate unchanged; only the deadline itself becomes :class:`DeadlineExceeded`.
    """
    t0 = time.monotonic()
    try:
        return await asyncio.wait_for(coro, timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        if time.monotonic() - t0 >= timeout_s * 0.999:
            raise DeadlineExceeded(timeout_s) from None
        raise


def overloaded_headers(exc: StageOverloaded) -> dict[str, Any]:
    """Response headers of a 503 overloaded answer."""
    return {"Retry-After": exc.retry_after_header()}
