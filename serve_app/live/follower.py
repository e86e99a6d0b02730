"""A replica's side of live writes: pull batches from the writer, apply them, report.

:class:`Follower` holds the live views of one replica (a :class:`~serve_app.live.bm25.LiveBM25`,
a :class:`~serve_app.live.dense.LiveDense` or the ingress's
:class:`~serve_app.live.documents.LiveDocuments`) and keeps them current: :meth:`run` long-polls
the writer (``changes(since, ...)``: answers at once when batches are waiting, else when one is
written or ``refresh_interval_s`` passes), applies each batch in order in a worker thread, and
reports the last applied batch with the next poll; the writer's answer carries
``visible_seq``, the batch every live follower has applied, which the ingress reads searches as
of. A replica that starts after writes loads the base and catches up from the log before it
says it is ready (:attr:`caught_up`); a search pinned to a batch this replica has not applied
yet waits for it (:meth:`wait_applied`). The source is the writer deployment's handle in a Serve
application, or a :class:`LocalSource` over a :class:`~serve_app.live.writer.DocumentWriter` in
process. Batches cross between nodes as Ray objects: no shared filesystem is assumed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Optional, Protocol, Sequence

from serve_app.live.changes import Batch

logger = logging.getLogger(__name__)


class Applies(Protocol):
    applied_seq: int

    def apply(self, batch: Batch) -> None: ...


class ChangeSource(Protocol):
    async def changes(self, since: int, follower: str, applied: int, base_seq: int, wait_s: float, known_visible: int) -> Any: ...


class Notifier:
    """Wakes long polls: a version number bumped by every write and every report that moves
    what is visible; a poll waits for the version to move past the one it saw before reading.
    (One event per version: waking is a ``set`` that every waiter of that version sees, and a
    waiter that times out leaves nothing behind.)"""

    def __init__(self) -> None:
        self.version = 0
        self._event: Optional[asyncio.Event] = None

    def _current(self) -> asyncio.Event:
        if self._event is None:
            self._event = asyncio.Event()
        return self._event

    async def notify(self) -> None:
        self.version += 1
        event, self._event = self._current(), asyncio.Event()
        event.set()

    async def wait(self, version: int, timeout_s: float) -> None:
        """Return once the version differs from ``version`` or ``timeout_s`` passes."""
        if self.version != version or timeout_s <= 0:
            return
        try:
            await asyncio.wait_for(self._current().wait(), timeout_s)
        except asyncio.TimeoutError:
            pass


async def long_poll(writer: Any, notifier: Notifier, since: int, follower: str, applied: int, base_seq: int, wait_s: float, known_visible: int) -> Any:
    """The writer's answer to a poll: at once when batches after ``since`` wait or the visible
    batch moved past ``known_visible``, else once either happens or ``wait_s`` passes. The
    poll's report may move the visible batch: the other polls are woken then."""
    deadline = time.monotonic() + wait_s
    while True:
        version = notifier.version
        before = writer.visible_seq
        answer = await asyncio.to_thread(writer.changes_since, since, follower=follower, applied=applied, base_seq=base_seq)
        if answer.visible_seq != before:
            await notifier.notify()
        left = deadline - time.monotonic()
        if answer.batches or answer.visible_seq != known_visible or left <= 0:
            return answer
        await notifier.wait(version, left)


class LocalSource:
    """:class:`ChangeSource` over a writer in this process (tests, benchmarks)."""

    def __init__(self, writer: Any, notifier: Optional[Notifier] = None) -> None:
        self.writer = writer
        self.notifier = notifier or Notifier()

    async def changes(self, since: int, follower: str, applied: int, base_seq: int, wait_s: float, known_visible: int) -> Any:
        return await long_poll(self.writer, self.notifier, since, follower, applied, base_seq, wait_s, known_visible)


class Follower:
    """Keeps ``targets`` current with the writer's log (see the module docstring)."""

    def __init__(self, targets: Sequence[Applies], source: ChangeSource, *, base_seq: int, refresh_interval_s: float, name: str = "") -> None:
        self.targets = list(targets)
        self.source = source
        self.base_seq = base_seq
        self.applied_seq = base_seq
        self.visible_seq = base_seq
        self.refresh_interval_s = refresh_interval_s
        self.name = name or uuid.uuid4().hex[:12]
        self.caught_up = False
        self.last_error: Optional[str] = None
        self._applied_event = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        """Run :meth:`run` in the background of the current event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping
                pass
            self._task = None

    def apply(self, batches: Sequence[Batch]) -> None:
        for batch in batches:
            if batch.seq <= self.applied_seq:
                continue
            for t in self.targets:
                t.apply(batch)
            self.applied_seq = batch.seq

    async def poll_once(self, wait_s: Optional[float] = None) -> Any:
        """One poll: report, receive, apply. Returns the writer's answer."""
        answer = await self.source.changes(self.applied_seq, self.name, self.applied_seq, self.base_seq, self.refresh_interval_s if wait_s is None else wait_s, self.visible_seq)
        if answer.batches:
            await asyncio.to_thread(self.apply, answer.batches)
        self.visible_seq = max(self.visible_seq, min(answer.visible_seq, self.applied_seq))
        if not self.caught_up and self.applied_seq >= answer.last_seq:
            self.caught_up = True
            logger.info("follower %s caught up at batch %d", self.name, self.applied_seq)
        self._applied_event.set()
        self._applied_event = asyncio.Event()
        return answer

    async def run(self) -> None:
        """Poll forever; a failed poll is logged and retried after ``refresh_interval_s``."""
        while True:
            try:
                answer = await self.poll_once()
                self.last_error = None
                if not answer.batches and answer.last_seq > self.applied_seq:
                    await asyncio.sleep(self.refresh_interval_s / 10)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the writer restarting, a network blip
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.warning("follower %s: polling the writer failed (%s); retrying", self.name, self.last_error)
                await asyncio.sleep(self.refresh_interval_s)

    async def catch_up(self) -> None:
        """Poll until every batch logged when this began is applied."""
        while True:
            answer = await self.poll_once(wait_s=0)
            if self.applied_seq >= answer.last_seq:
                return

    async def wait_applied(self, seq: int, timeout_s: float) -> bool:
        """Wait until batch ``seq`` is applied here (a search pinned to it); False past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.applied_seq < seq:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            event = self._applied_event
            try:
                await asyncio.wait_for(event.wait(), min(left, self.refresh_interval_s))
            except asyncio.TimeoutError:
                pass
        return True

    def state(self) -> dict[str, Any]:
        return {"applied_seq": self.applied_seq, "visible_seq": self.visible_seq, "caught_up": self.caught_up, "follower": self.name, **({"error": self.last_error} if self.last_error else {})}


__all__ = ["Follower", "LocalSource", "Notifier", "long_poll"]
