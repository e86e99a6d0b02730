"""The ``DocumentWriter`` deployment: the one writer of the index (one replica).

A plain class over :class:`serve_app.live.writer.DocumentWriter`: batches are validated, encoded
and logged (fsynced) in a worker thread, one at a time; followers long-poll :meth:`changes`;
``refresh=wait_for`` waits until every live follower has the batch; a merge runs in the
background when a threshold of ``writes`` is passed (``auto_merge``) or on :meth:`merge`
(``serve-app merge --app``), while writes and searches continue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import asdict
from typing import Any, Optional

from serve_app.live.follower import Notifier, long_poll
from serve_app.serve import metrics
from serve_app.serve.config import ENV_DENSE_MODEL, WriterServerConfig
from serve_app.serve.replica import load_or_explain, replica_id

logger = logging.getLogger("ray.serve")

REFRESH_MODES = ("false", "wait_for")


def _open_writer(cfg: WriterServerConfig) -> Any:
    from serve_app.live.writer import DocumentWriter

    encoder = None
    if cfg.dense is not None:
        from serve_app.index import load_query_encoder

        encoder = load_query_encoder(cfg.index_dir, cfg.dense)  # the index's bi-encoder, checked against it
    return DocumentWriter(cfg.index_dir, cfg.writes, encoder=encoder, shards=cfg.shards)


class WriterServer:
    """Writes, reads by id, the followers' long polls, merges."""

    def __init__(self, cfg: WriterServerConfig) -> None:
        hint = f"For the Serve app, {ENV_DENSE_MODEL}=/path/to/model also overrides dense.model."
        self.cfg = cfg
        self.writer = load_or_explain("DocumentWriter", _open_writer, cfg, hint=hint)
        self.notifier = Notifier()
        self._write_lock: Optional[asyncio.Lock] = None
        self._merge: Optional[asyncio.Task] = None
        self.last_merge: Optional[dict[str, Any]] = None

    def _lock(self) -> asyncio.Lock:
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        return self._write_lock

    async def _after_write(self, result: Any, refresh: str, t0: float) -> dict[str, Any]:
        durable_ms = (time.perf_counter() - t0) * 1000
        await self.notifier.notify()
        visible = None
        timings = {"durable": round(durable_ms, 3)}
        if refresh == "wait_for" and result.seq is not None:
            visible = await self.wait_visible(result.seq)
            timings["visible"] = round((time.perf_counter() - t0) * 1000 - durable_ms, 3)
        self._maybe_merge()
        return {"seq": result.seq, "ids": list(result.ids), "absent": list(result.absent), "visible": visible, "timings_ms": timings}

    async def upsert(self, documents: list[dict[str, Any]], refresh: str = "false", guard: Any = None) -> dict[str, Any]:
        """Add or replace documents: one batch, answered once durable (and visible, with wait_for).
        ``guard``: the writing API key's bound filter (see :meth:`DocumentWriter.upsert`)."""
        return await self._write("upsert", functools.partial(self.writer.upsert, guard=guard), documents, refresh)

    async def delete(self, ids: list[str], refresh: str = "false", guard: Any = None) -> dict[str, Any]:
        """Delete documents by id: one batch; absent ids (and, with ``guard``, ids outside it) are listed, not refused."""
        return await self._write("delete", functools.partial(self.writer.delete, guard=guard), ids, refresh)

    async def _write(self, op: str, write: Any, payload: list[Any], refresh: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        async with self._lock():  # one batch at a time, in a worker thread (encoding, fsync)
            result = await asyncio.to_thread(write, payload)
        metrics.observe_latency("write", (time.perf_counter() - t0) * 1000)
        metrics.count_documents_written(op, len(result.ids))
        return await self._after_write(result, refresh, t0)

    async def get(self, doc_id: str) -> Any:
        return await asyncio.to_thread(self.writer.get, doc_id)

    async def wait_visible(self, seq: int) -> bool:
        deadline = time.monotonic() + self.cfg.writes.wait_for_timeout_s
        while True:
            version = self.notifier.version
            if self.writer.visible_seq >= seq:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self.notifier.wait(version, min(left, 0.5))

    async def changes(self, since: int, follower: str, applied: int, base_seq: int, wait_s: float, known_visible: int) -> Any:
        return await long_poll(self.writer, self.notifier, since, follower, applied, base_seq, wait_s, known_visible)

    async def base_info(self, with_stats: bool = False) -> dict[str, Any]:
        return await asyncio.to_thread(self.writer.base_info, with_stats)

    # ----------------------------------------------------------------- merges

    def _maybe_merge(self) -> None:
        if not self.cfg.writes.auto_merge or (self._merge is not None and not self._merge.done()):
            return
        from serve_app.live.merge import merge_due

        reason = merge_due(self.writer)
        if reason is not None:
            logger.info("DocumentWriter: merging (%s)", reason)
            self._merge = asyncio.get_running_loop().create_task(self._run_merge())

    async def _run_merge(self) -> dict[str, Any]:
        from serve_app.live.merge import merge

        report = await asyncio.to_thread(merge, self.writer, ray=self._ray_options())
        self.last_merge = asdict(report)
        await self.notifier.notify()
        return self.last_merge

    def _ray_options(self) -> Any:
        """How a shards-only base merges: a Ray build on this replica's cluster (``writes.merge_ray_*``);
        None for other bases (merged in this process, reusing their vectors)."""
        from serve_app.live.merge import is_shards_only

        if not is_shards_only(self.writer.manifest):
            return None
        from serve_app.index.ray_build import RayBuildOptions

        w = self.cfg.writes
        return RayBuildOptions(workers=w.merge_ray_workers, gpus_per_worker=w.merge_ray_gpus_per_worker, show_progress=False)

    async def merge(self) -> dict[str, Any]:
        """Merge now (or wait for the merge already running); returns its report."""
        if self._merge is None or self._merge.done():
            self._merge = asyncio.get_running_loop().create_task(self._run_merge())
        return await self._merge

    # ----------------------------------------------------------------- health

    async def ping(self) -> dict[str, Any]:
        w = self.writer
        live, deleted = w.log.reader().counts()
        return {
            "stage": "writer", "replica": replica_id(), "base_seq": w.base_seq, "generation": w.generation, "last_seq": w.last_seq,
            "visible_seq": w.visible_seq, "followers": len(w.live_followers()), "written_since_base": live, "deleted_since_base": deleted,
            "merging": self._merge is not None and not self._merge.done(), "last_merge": self.last_merge,
        }

    async def check_health(self) -> None:
        """The log answers: its last sequence number is read."""
        await asyncio.to_thread(lambda: self.writer.log.last_seq)


__all__ = ["REFRESH_MODES", "WriterServer"]
