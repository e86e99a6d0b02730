"""Failures between the ingress and its stages' replicas: back-pressure and replica death.

* Back-pressure: Serve raises ``BackPressureError`` on a deployment handle once
  ``max_queued_requests`` requests wait for that deployment's replicas; :func:`call_stage` turns
  it into the core :class:`serve_app.errors.StageOverloaded` (its ``retry_after_s`` from the
  deployment's ``backpressure_config``), which sheds the request: **503 overloaded** with
  ``Retry-After``, so that clients back off instead of receiving worse results while the stage
  is saturated.
* :func:`call_stage`: one call to a stage through a deployment handle, retried once when the
  replica died under it (``RayActorError``: killed, crashed, node lost) or had just been
  removed (``ReplicaUnavailableError``). Every stage call is idempotent (retrieval, scoring,
  ping), so a retry is safe; Serve routes it to another replica, or queues it until the
  replacement replica is up (still within the stage's timeout).

The request deadline and the stage timeouts are the funnel's (``serve_app.funnel``).

Ray is imported lazily, so the plain-class tests of the ingress run without it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Optional, TypeVar

from serve_app.errors import StageOverloaded
from serve_app.serve import metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Retries of a stage call after its replica died (at most this many extra attempts).
REPLICA_DEATH_RETRIES = 1
_RETRY_BACKOFF_S = 0.05


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
        except asyncio.CancelledError:
            # The request's client went away or its deadline passed: awaiting a Serve handle
            # call, the cancellation reaches the stage's replica too (its queued work is dropped).
            metrics.count_cancelled(stage)
            raise
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
