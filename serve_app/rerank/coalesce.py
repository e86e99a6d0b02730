"""Merge request batches that arrive while the model is busy into its next call.

Ray Serve's ``@serve.batch`` forms a batch as soon as its first request has waited
``batch_wait_timeout_s``, even while the previous batch is still computing; with
``max_concurrent_batches=1`` the new batch then waits for the model holding only the one or
two requests that arrived in that short window. Under load a cross-encoder replica therefore
ran many small batches one after another (a mean of 2.2 requests per batch with 16 concurrent
clients in ``benchmarks/e2e_load``) instead of one large, length-sorted one.

:class:`Coalescer` sits between the two: ``@serve.batch`` runs up to
``max_concurrent_batches`` batch calls at once, each hands its requests to
:meth:`Coalescer.submit`, and one model call at a time takes *every* group waiting by then
(first come, first served, up to ``max_items`` items). A group that does not fit waits for the
next call, never longer than one call behind.

>>> import asyncio
>>> async def double(items):
...     return [2 * x for x in items]
>>> asyncio.run(Coalescer(double, max_items=8).submit([1, 2, 3]))
[2, 4, 6]
"""

from __future__ import annotations

import asyncio
import collections
from typing import Awaitable, Callable, Generic, Optional, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Runs ``fn`` over the items of every group submitted while the previous call ran.

    ``fn`` takes a list of items and returns one result per item, in order. An exception from
    ``fn`` is raised in every submitter whose items were in that call; other calls go on.
    ``calls`` records the number of groups and items of each call (the last 10,000).

    One runner task makes the calls, one at a time; submitters only wait for their results. A
    submitter that is cancelled (its client went away) before its group's call starts takes the
    group out of the queue (``cancelled_groups``, ``cancelled_items`` count them); one cancelled
    during the call leaves the call running for the other groups in it.
    """

    def __init__(self, fn: Callable[[list[T]], Awaitable[Sequence[R]]], max_items: int) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.fn = fn
        self.max_items = max_items
        self.calls: collections.deque[tuple[int, int]] = collections.deque(maxlen=10000)
        self.cancelled_groups = 0
        self.cancelled_items = 0
        self._pending: collections.deque[tuple[list[T], asyncio.Future]] = collections.deque()
        self._runner: Optional[asyncio.Task] = None

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Results for ``items``, computed in the next model call that has room for them."""
        items = list(items)
        if not items:
            return []
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((items, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if not future.done():  # still queued: _take drops it; in a running call: its result is discarded
                future.cancel()
            raise

    def _take(self) -> list[tuple[list[T], asyncio.Future]]:
        groups: list[tuple[list[T], asyncio.Future]] = []
        size = 0
        while self._pending:
            items, future = self._pending[0]
            if future.done():  # its submitter was cancelled while it waited
                self._pending.popleft()
                self.cancelled_groups += 1
                self.cancelled_items += len(items)
                continue
            if groups and size + len(items) > self.max_items:
                break  # the oldest group always goes, even when oversized
            groups.append(self._pending.popleft())
            size += len(items)
        return groups

    async def _run(self) -> None:
        while self._pending:
            groups = self._take()
            if groups:
                await self._call(groups)

    async def _call(self, groups: list[tuple[list[T], asyncio.Future]]) -> None:
        merged = [item for items, _ in groups for item in items]
        self.calls.append((len(groups), len(merged)))
        try:
            results = list(await self.fn(merged))
            if len(results) != len(merged):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(merged)} items")
        except BaseException as exc:  # noqa: BLE001 - delivered to every caller of this call
            for _, future in groups:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for items, future in groups:
            if not future.done():  # a submitter cancelled during the call leaves a done future
                future.set_result(results[start : start + len(items)])
            start += len(items)
