"""A bounded, loopback-only, closed-loop HTTP load generator (asyncio + httpx).

``closed_loop`` runs ``concurrency`` clients; each sends the next request body of a shared list
as soon as its previous answer arrives (a closed loop, like N users without think time). It
stops taking new requests when the list is exhausted or ``max_seconds`` have passed, and every
request has ``timeout_s``: a run is bounded in count and in time. Targets must be on the loopback
interface (127.0.0.1 / localhost / ::1); anything else is refused.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Sequence
from urllib.parse import urlparse

import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_loopback(url: str) -> None:
    """Refuse any target that is not on this machine's loopback interface."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"load generators only send to the loopback interface, not {host!r} ({url})")


@dataclass
class Record:
    """One request: when it was sent and answered (perf_counter seconds), its status, its units."""

    index: int
    start: float
    end: float
    status: int
    units: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class LoadResult:
    """Records of one closed-loop run and its summary figures."""

    concurrency: int
    records: list[Record]
    wall_s: float

    @property
    def ok(self) -> list[Record]:
        return [r for r in self.records if r.status == 200]

    def summary(self) -> dict[str, Any]:
        ok = self.ok
        lat = np.array([r.latency for r in ok]) * 1000.0
        span = (max(r.end for r in ok) - min(r.start for r in ok)) if ok else float("nan")
        units = sum(r.units for r in ok)
        out: dict[str, Any] = {
            "concurrency": self.concurrency,
            "requests": len(self.records),
            "ok": len(ok),
            "errors": len(self.records) - len(ok),
            "error_examples": sorted({r.error or str(r.status) for r in self.records if r.status != 200})[:3],
            "span_s": span,
            "requests_per_s": len(ok) / span if ok and span > 0 else float("nan"),
            "units": units,
            "units_per_s": units / span if ok and span > 0 else float("nan"),
        }
        for q in (50, 95, 99):
            out[f"p{q}_ms"] = float(np.percentile(lat, q)) if lat.size else float("nan")
        out["mean_ms"] = float(lat.mean()) if lat.size else float("nan")
        return out


#: One request of a closed loop: (client, index, item) -> (status, info, error or None).
Send = Callable[[Any, int, Any], Awaitable[tuple[int, dict[str, Any], Optional[str]]]]


async def run_closed_loop(items: Sequence[Any], concurrency: int, send: Send, *, max_seconds: float = 120.0, timeout_s: float = 300.0, units: Callable[[Any], int] = lambda item: 1, headers: Optional[dict[str, str]] = None) -> LoadResult:
    """``concurrency`` clients, each sending the next of ``items`` as soon as its previous answer
    came back, until the items or ``max_seconds`` run out; ``send`` makes one request (one or
    more HTTP calls) with the shared ``httpx.AsyncClient``. An exception is a result too."""
    import httpx

    records: list[Record] = []
    next_i = 0
    t_start = time.perf_counter()
    deadline = t_start + max_seconds
    limits = httpx.Limits(max_connections=2 * concurrency, max_keepalive_connections=2 * concurrency)

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, headers=headers) as client:

        async def worker() -> None:
            nonlocal next_i
            while next_i < len(items) and time.perf_counter() <= deadline:
                i = next_i
                next_i += 1
                t0 = time.perf_counter()
                try:
                    status, info, error = await send(client, i, items[i])
                    records.append(Record(i, t0, time.perf_counter(), status, units(items[i]), info, error))
                except Exception as exc:  # noqa: BLE001 - timeouts and refused connections are results too
                    records.append(Record(i, t0, time.perf_counter(), 0, units(items[i]), {}, f"{type(exc).__name__}: {exc}"[:200]))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(concurrency, sorted(records, key=lambda r: r.index), time.perf_counter() - t_start)


def post_json(url: str, extract: Optional[Callable[[Any], dict[str, Any]]] = None) -> Send:
    """A :data:`Send` that POSTs the item as JSON to ``url`` (``extract`` reads a 200 answer)."""

    async def send(client: Any, i: int, body: Any) -> tuple[int, dict[str, Any], Optional[str]]:
        resp = await client.post(url, json=body)
        if resp.status_code != 200:
            return resp.status_code, {}, resp.text[:200]
        return 200, (extract(resp.json()) if extract is not None else {}), None

    return send


def closed_loop(
    url: str,
    bodies: Sequence[Any],
    concurrency: int,
    *,
    max_seconds: float = 120.0,
    timeout_s: float = 300.0,
    units: Callable[[Any], int] = lambda body: 1,
    extract: Optional[Callable[[Any], dict[str, Any]]] = None,
    headers: Optional[dict[str, str]] = None,
) -> LoadResult:
    """POST ``bodies`` (JSON) to ``url`` with ``concurrency`` closed-loop clients.

    ``units(body)`` counts the work of a request (e.g. documents to rerank) for units/s;
    ``extract(response_json)`` keeps what is needed from each answer (e.g. stage timings).
    """
    check_loopback(url)
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    return asyncio.run(run_closed_loop(bodies, concurrency, post_json(url, extract), max_seconds=max_seconds, timeout_s=timeout_s, units=units, headers=headers))


def wait_ready(url: str, timeout_s: float = 300.0, *, ok: Callable[[Any], bool] = lambda r: r.status_code == 200, poll_s: float = 1.0, alive: Callable[[], bool] = lambda: True) -> float:
    """Poll GET ``url`` until ``ok(response)``; return the seconds waited (TimeoutError past
    ``timeout_s``, or as soon as ``alive()`` says the server process has exited)."""
    import httpx

    check_loopback(url)
    t0 = time.perf_counter()
    last = ""
    while time.perf_counter() - t0 < timeout_s:
        if not alive():
            raise TimeoutError(f"{url}: the server exited before it was ready (last: {last})")
        try:
            r = httpx.get(url, timeout=10)
            if ok(r):
                return time.perf_counter() - t0
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except Exception as exc:  # noqa: BLE001
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(poll_s)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s (last: {last})")
