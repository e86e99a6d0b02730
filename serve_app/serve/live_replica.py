"""The live side of a replica that follows the writer: its view (a live retriever or the
ingress's document lookups), built once the writer answers, kept current, reloaded after a merge.

:class:`LiveReplica` wraps a :class:`~serve_app.live.follower.Follower`. The replica's base is
loaded from its index directory; the batches come through the ``DocumentWriter`` deployment's
handle (:class:`HandleSource`), so replicas on other nodes need no shared filesystem for writes.
After a merge the writer reports a new generation: the replica loads the new base from its
index directory in the background (when the directory holds it: shared storage, or a copy),
catches it up with the batches since the merge, and swaps it in between two polls, keeping the
old view for searches pinned below the merged base (:meth:`LiveReplica.view_for`) until every
replica has passed it, and a grace after that (``wait_for_timeout_s`` by default): the new base
cannot show an older state; a replica
that cannot see the new base keeps its old one and the log (the writer keeps the batches any
live follower's base still needs).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Optional

from serve_app.config import WritesConfig
from serve_app.errors import StageUnavailable
from serve_app.live.follower import Follower
from serve_app.serve import metrics

logger = logging.getLogger("ray.serve")


class HandleSource:
    """The writer deployment as a :class:`~serve_app.live.follower.ChangeSource`."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def changes(self, since: int, follower: str, applied: int, base_seq: int, wait_s: float, known_visible: int) -> Any:
        return await self.handle.changes.remote(since, follower, applied, base_seq, wait_s, known_visible)

    async def base_info(self, with_stats: bool) -> dict[str, Any]:
        return await self.handle.base_info.remote(with_stats)


class LocalWriterSource:
    """A :class:`~serve_app.live.writer.DocumentWriter` in this process as a replica's source
    (tests drive the servers without Ray this way)."""

    def __init__(self, writer: Any, notifier: Any = None) -> None:
        from serve_app.live.follower import LocalSource

        self.writer = writer
        self._local = LocalSource(writer, notifier)
        self.notifier = self._local.notifier

    async def changes(self, since: int, follower: str, applied: int, base_seq: int, wait_s: float, known_visible: int) -> Any:
        return await self._local.changes(since, follower, applied, base_seq, wait_s, known_visible)

    async def base_info(self, with_stats: bool) -> dict[str, Any]:
        return await asyncio.to_thread(self.writer.base_info, with_stats)


def source_of(writer: Any) -> Any:
    """The change source of a replica given the writer: a :class:`LocalWriterSource` as it is,
    else the deployment handle wrapped in :class:`HandleSource`."""
    return writer if isinstance(writer, LocalWriterSource) else HandleSource(writer)


def index_writes(index_dir: str) -> tuple[int, str]:
    """(base_seq, generation) of the base in ``index_dir``."""
    from serve_app.index import read_manifest

    m = read_manifest(index_dir)
    w = m.writes or {}
    return int(w.get("base_seq", 0)), str(w.get("generation", m.corpus.sha256[:16]))


class LiveReplica:
    """Keeps ``build_view(info)``'s view current (see the module docstring). ``build_view`` loads
    the base from disk and returns an object with ``apply``, ``base_seq`` and ``applied_seq``;
    ``info`` is the writer's :meth:`~serve_app.live.writer.DocumentWriter.base_info`."""

    def __init__(self, what: str, index_dir: str, source: Any, build_view: Callable[[dict[str, Any]], Any], cfg: WritesConfig, *, needs_stats: bool = False, stage: str = "") -> None:
        self.what = what
        self.stage = stage or what
        self.index_dir = index_dir
        self.source = source
        self.build_view = build_view
        self.cfg = cfg
        self.needs_stats = needs_stats
        self.view: Any = None
        # views from before the last merges' swaps, oldest first, each kept until no search can
        # still read below the base that replaced it (several when merges come in quick succession)
        self.previous: list[Any] = []
        self._previous_until: Optional[float] = None
        self.generation = ""
        self.follower: Optional[Follower] = None
        self.error: Optional[str] = None
        self.started_at = time.monotonic()
        self._task: Optional[asyncio.Task] = None
        self._ready: Optional[asyncio.Event] = None
        self._reload: Optional[asyncio.Task] = None
        try:
            asyncio.get_running_loop()
            self.start()
        except RuntimeError:  # constructed outside an event loop (tests): started on first use
            pass

    def start(self) -> None:
        if self._task is None:
            self._ready = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        for t in (self._task, self._reload):
            if t is not None:
                t.cancel()

    async def _load(self) -> tuple[Any, str]:
        for _ in range(5):
            info = await self.source.base_info(self.needs_stats)
            base_seq, generation = await asyncio.to_thread(index_writes, self.index_dir)
            if (base_seq, generation) == (info["base_seq"], info["generation"]):
                return await asyncio.to_thread(self.build_view, info), generation
            await asyncio.sleep(self.cfg.refresh_interval_s)  # a merge is being swapped in: read again
        raise RuntimeError(f"{self.index_dir} holds base {generation} at batch {base_seq}, the writer's is {info['generation']} at {info['base_seq']}; the replica cannot read the writer's base (is the index directory shared?)")

    async def _run(self) -> None:
        assert self._ready is not None
        while self.follower is None:
            try:
                view, generation = await self._load()
                follower = Follower([view], self.source, base_seq=view.base_seq, refresh_interval_s=self.cfg.refresh_interval_s, name=f"{self.what}-{id(self):x}")
                await follower.catch_up()
                self.view, self.generation, self.follower = view, generation, follower
                self._ready.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the writer not up yet: retried
                self.error = f"{type(exc).__name__}: {exc}"
                logger.warning("%s: cannot follow the writer yet (%s); retrying", self.what, self.error)
                await asyncio.sleep(self.cfg.refresh_interval_s)
        self.error = None
        while True:
            try:
                before = self.follower.applied_seq
                answer = await self.follower.poll_once()
                metrics.observe_write_lag(self.stage, answer.last_seq - before)
                self.error = None
                if answer.generation != self.generation and self._reload is None:
                    self._reload = asyncio.get_running_loop().create_task(self._prepare_reload(answer.generation))
                if self._reload is not None and self._reload.done():
                    await self._swap(self._reload)
                self._maybe_drop_previous()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the writer restarting, a network blip
                self.error = f"{type(exc).__name__}: {exc}"
                logger.warning("%s: polling the writer failed (%s); retrying", self.what, self.error)
                await asyncio.sleep(self.cfg.refresh_interval_s)

    def _maybe_drop_previous(self) -> None:
        """Drop the views from before the merges once every replica has passed the newest merged
        base and a grace of ``max(2 s, 4 refresh intervals, wait_for_timeout_s)`` has gone by
        since (a search pinned below that base just before may still be on its way: pins come
        from the ingress's own follower, which learns the visible batch on its next poll). A
        search delayed past the grace would read the merged base on this replica: newer than its
        pin."""
        if not self.previous or self.follower is None:
            return
        if self.follower.visible_seq < self.view.base_seq:
            self._previous_until = None
            return
        now = time.monotonic()
        if self._previous_until is None:
            self._previous_until = now + max(2.0, 4 * self.cfg.refresh_interval_s, self.cfg.wait_for_timeout_s)
        elif now >= self._previous_until:
            self.previous, self._previous_until = [], None

    async def _prepare_reload(self, generation: str) -> Optional[tuple[Any, str]]:
        base_seq, on_disk = await asyncio.to_thread(index_writes, self.index_dir)
        if on_disk != generation:
            logger.warning("%s: the writer merged into base %s but %s holds %s; following the log on the old base", self.what, generation, self.index_dir, on_disk)
            return None
        return await self._load()

    async def _swap(self, task: asyncio.Task) -> None:
        self._reload = None
        result = task.result() if not task.exception() else None
        if result is None:
            return
        view, generation = result
        assert self.follower is not None
        # catch the new base up to what the follower applied, then swap between two polls
        while view.applied_seq < self.follower.applied_seq:
            answer = await self.source.changes(view.applied_seq, "", view.applied_seq, view.base_seq, 0, -1)
            for batch in answer.batches:
                if batch.seq <= self.follower.applied_seq:
                    await asyncio.to_thread(view.apply, batch)
            if not answer.batches:
                break
        if view.applied_seq == self.follower.applied_seq:
            self.follower.targets = [view]
            self.follower.base_seq = view.base_seq
            # Searches pinned below the new base (the ingress pins the batch every replica has
            # applied: some may not have reached the merge's batch yet) read the old view, which
            # holds every batch up to here; the new base cannot show an older state.
            self.previous.append(self.view)
            self._previous_until = None
            self.view, self.generation = view, generation
            logger.info("%s: now on the merged base %s (batch %d)", self.what, generation, view.base_seq)

    async def view_at(self, at_seq: Optional[int]) -> Any:
        """The view, once it has applied batch ``at_seq`` (a search's pin); StageUnavailable when
        the replica cannot reach it within ``wait_for_timeout_s``."""
        self.start()
        assert self._ready is not None
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self.cfg.wait_for_timeout_s)
            except asyncio.TimeoutError:
                raise StageUnavailable(self.what, f"not following the writer yet ({self.error or 'starting'})") from None
        assert self.follower is not None
        if at_seq is not None and at_seq > self.follower.applied_seq:
            if not await self.follower.wait_applied(at_seq, self.cfg.wait_for_timeout_s):
                raise StageUnavailable(self.what, f"behind the writer: batch {at_seq} not applied within {self.cfg.wait_for_timeout_s:g} s")
        return self.view_for(at_seq)

    def view_for(self, at_seq: Optional[int]) -> Any:
        """The view that shows batch ``at_seq``: the current one, or, for a search pinned below a
        merged base swapped in since, the newest earlier view whose base is not above the pin."""
        view = self.view
        if at_seq is None or view is None or at_seq >= view.base_seq:
            return view
        for older in reversed(self.previous):
            if at_seq >= older.base_seq:
                return older
        return self.previous[0] if self.previous else view

    @property
    def ready(self) -> bool:
        return self.follower is not None and self.follower.caught_up

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"generation": self.generation, "ready": self.ready}
        if self.follower is not None:
            out.update(self.follower.state())
        if self.error:
            out["error"] = self.error
        return out


__all__ = ["HandleSource", "LiveReplica", "LocalWriterSource", "index_writes", "source_of"]
