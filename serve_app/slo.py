"""SLO-aware rerank depth: rerank fewer candidates instead of queueing past a latency objective.

The reranker's cost grows with the pairs it is sent. When load rises, a fixed depth makes
every request wait behind the pairs of the others until the latency objective is missed or
the queue fills and requests are shed (503). :class:`DepthController` trades a little
quality for time instead: before the rerank step of each request it predicts the request's
latency at the depth asked for and, when that would exceed the objective, lowers the depth
to what fits (never below ``min_rerank_top_m``). Depth recovers by itself as the load falls.

The prediction, from what the ingress sees (no call to the reranker):

* ``ms_per_pair``: the recent rerank stage time divided by the pairs that shared the reranker
  with the request (the larger of the pairs in flight when it was sent and when it ended, since
  later requests join its batches) plus its own, a mean over a sliding window of recent
  requests; it folds in batching, the number of replicas and their speed;
* ``other_ms``: the recent mean time of everything else (retrieval, fusion, assembly);
* predicted latency at depth ``m`` = ``other_ms + ms_per_pair * (pairs_in_flight + waiting * m)``,
  where ``waiting`` counts this request and the ones already in the ingress (retrieving) whose
  depth is not planned yet: they will send their pairs right behind, so a burst shares what the
  objective leaves instead of its first requests taking full depth and the rest queueing
  behind them at the floor.

The depth used is the largest ``m`` whose prediction fits the budget, clamped to
``[min_rerank_top_m, requested]``. The budget is ``headroom * objective``, scaled down by
``objective / observed p95`` while the window's observed 95th percentile of whole-request
latency exceeds the objective (feedback for what the prediction misses, such as queueing in
front of the ingress). With fewer than ``min_samples`` observations the
requested depth is used. Each ingress replica has its own controller and sees only the pairs
it has in flight itself (with several ingress replicas, each one's share of the load).

Example (a fake clock and latencies; no Ray, no model):

>>> from serve_app.config import SloConfig
>>> c = DepthController(SloConfig(search_p95_ms=1000, min_rerank_top_m=10), clock=lambda: 0.0)
>>> for _ in range(8):
...     c.observe(depth=50, pairs_ahead=0, rerank_ms=500.0, total_ms=600.0)
>>> c.plan(requested=50, pairs_in_flight=0).depth   # 100 + 10 ms/pair * 50 = 600 ms: fits
50
>>> plan = c.plan(requested=50, pairs_in_flight=40)  # 100 + 10 * (40 + m) <= 900 -> m = 40
>>> plan.depth, plan.reduced
(40, True)
>>> c.plan(requested=50, pairs_in_flight=1000).depth  # never below the floor
10
>>> c.plan(requested=50, pairs_in_flight=0, waiting=4).depth  # a burst of 4: 100 + 10 * 4m <= 900
20

The controller also keeps the ingress's accounting that the prediction reads: the pairs in
flight to the reranker and the requests waiting to plan. A request enters with :meth:`admit`
(counted as waiting until it plans its depth or leaves), plans with :meth:`Admission.plan`,
and sends its pairs inside :meth:`DepthController.in_flight`:

>>> with c.admit() as a:
...     plan = a.plan(50)               # as c.plan(50, c.pairs_in_flight, waiting=c.waiting)
...     with c.in_flight(plan.depth) as flight:
...         c.pairs_in_flight
50
>>> flight.shared, c.pairs_in_flight, c.waiting   # pairs that shared the reranker with it; all released
(0, 0, 0)
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from serve_app.config import SloConfig


@dataclass(frozen=True)
class DepthPlan:
    """The depth a request gets: ``depth`` (<= requested), whether it was ``reduced``, and the
    latency predicted at the requested depth (None before enough observations)."""

    depth: int
    requested: int
    reduced: bool
    predicted_ms: Optional[float] = None


class DepthController:
    """Chooses each request's rerank depth from recent stage latencies (see the module docstring).

    ``clock`` (seconds, monotonic) is injectable for tests; observations older than
    ``cfg.window_s`` are forgotten, and at most ``cfg.window`` are kept.
    """

    def __init__(self, cfg: SloConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self._samples: collections.deque[tuple[float, float, float, float]] = collections.deque(maxlen=cfg.window)  # (t, ms per pair, other ms, total ms)
        self._lock = threading.Lock()
        self.reduced_total = 0
        self.planned_total = 0
        self.last_depth: Optional[int] = None
        #: pairs sent to the reranker by this ingress and not yet answered
        self.pairs_in_flight = 0
        #: requests admitted that will rerank and have not planned their depth yet
        self.waiting = 0

    @property
    def enabled(self) -> bool:
        return self.cfg.search_p95_ms is not None

    def _fresh(self) -> list[tuple[float, float, float, float]]:
        horizon = self.clock() - self.cfg.window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        return list(self._samples)

    def observe(self, *, depth: int, pairs_ahead: int, rerank_ms: float, total_ms: float) -> None:
        """Record one request that reranked ``depth`` candidates with ``pairs_ahead`` pairs in
        flight when it was sent, its rerank stage time and its whole time."""
        if depth <= 0 or not (math.isfinite(rerank_ms) and math.isfinite(total_ms)):
            return
        with self._lock:
            self._samples.append((self.clock(), rerank_ms / (pairs_ahead + depth), max(0.0, total_ms - rerank_ms), total_ms))

    def estimate(self) -> Optional[tuple[float, float]]:
        """(ms per pair, other ms) from the recent window; None with too few observations."""
        est = self._estimate()
        return None if est is None else est[:2]

    def _estimate(self) -> Optional[tuple[float, float, float]]:
        """(ms per pair, other ms, observed p95 of total ms) of the recent window."""
        with self._lock:
            fresh = self._fresh()
        if len(fresh) < self.cfg.min_samples:
            return None
        totals = sorted(s[3] for s in fresh)
        p95 = totals[min(len(totals) - 1, math.ceil(0.95 * len(totals)) - 1)]
        return (sum(s[1] for s in fresh) / len(fresh), sum(s[2] for s in fresh) / len(fresh), p95)

    def plan(self, requested: int, pairs_in_flight: int, waiting: int = 1) -> DepthPlan:
        """The depth of a request that asks for ``requested`` with ``pairs_in_flight`` pairs
        already sent to the reranker by this ingress and ``waiting`` requests (itself included)
        about to send theirs."""
        if not self.enabled or requested <= 0:
            return DepthPlan(requested, requested, False)
        est = self._estimate()
        if est is None:
            return DepthPlan(requested, requested, False)
        per_pair, other, observed_p95 = est
        objective = float(self.cfg.search_p95_ms)  # type: ignore[arg-type]
        waiting = max(1, int(waiting))
        predicted = other + per_pair * (pairs_in_flight + waiting * requested)
        budget = self.cfg.headroom * objective * min(1.0, objective / observed_p95 if observed_p95 > 0 else 1.0)
        depth = requested
        if predicted > budget:
            fits = math.floor(((budget - other) / per_pair - pairs_in_flight) / waiting) if per_pair > 0 else requested
            depth = max(min(self.cfg.min_rerank_top_m, requested), min(requested, fits))
        with self._lock:
            self.planned_total += 1
            if depth < requested:
                self.reduced_total += 1
            self.last_depth = depth
        return DepthPlan(depth, requested, depth < requested, predicted)

    @contextlib.contextmanager
    def admit(self, reranks: bool = True) -> Iterator["Admission"]:
        """A single request's passage: while it has not planned (:meth:`Admission.plan`), it counts
        in :attr:`waiting` (only when it ``reranks`` and the controller is enabled); released
        however the request ends."""
        admission = Admission(self, reranks and self.enabled)
        if admission.waiting:
            self.waiting += 1
        try:
            yield admission
        finally:
            admission.planned()

    @contextlib.contextmanager
    def in_flight(self, pairs: int) -> Iterator["Flight"]:
        """Count ``pairs`` in :attr:`pairs_in_flight` while they are with the reranker; on a normal
        exit, ``flight.shared`` is how many other pairs shared the reranker with them: the larger
        of those in flight when they were sent and when they came back (requests sent later join
        their batches)."""
        flight = Flight(ahead=self.pairs_in_flight)
        self.pairs_in_flight += pairs
        try:
            yield flight
            flight.shared = max(flight.ahead, self.pairs_in_flight - pairs)
        finally:
            self.pairs_in_flight -= pairs

    def stats(self) -> dict[str, object]:
        est = self._estimate()
        return {
            "objective_ms": self.cfg.search_p95_ms,
            "min_rerank_top_m": self.cfg.min_rerank_top_m,
            "ms_per_pair": None if est is None else round(est[0], 3),
            "other_ms": None if est is None else round(est[1], 3),
            "observed_p95_ms": None if est is None else round(est[2], 3),
            "planned": self.planned_total,
            "reduced": self.reduced_total,
            "last_depth": self.last_depth,
        }


@dataclass
class Flight:
    """Pairs sent to the reranker (:meth:`DepthController.in_flight`)."""

    ahead: int
    shared: Optional[int] = None


class Admission:
    """One request admitted by :meth:`DepthController.admit`."""

    def __init__(self, controller: DepthController, waiting: bool) -> None:
        self.controller = controller
        self.waiting = waiting

    def planned(self) -> None:
        """Leave the waiting count (once)."""
        if self.waiting:
            self.waiting = False
            self.controller.waiting -= 1

    def plan(self, requested: int) -> DepthPlan:
        """The depth of this request, sharing the budget with the requests still waiting."""
        c = self.controller
        others = c.waiting - (1 if self.waiting else 0)
        self.planned()
        return c.plan(requested, c.pairs_in_flight, waiting=others + 1)
