"""Work nobody waits for is dropped: a reranker replica (in process, its forward pass made slow)
never starts pairs of a request whose caller was cancelled, and the next request finds an idle
model. The Serve path (client disconnects, deadlines) is measured by benchmarks/cancellation.py."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from serve_app.serve import metrics
from serve_app.serve.config import RerankerServerConfig, parse_app_config
from serve_app.serve.deployments import RerankerServer
from serve_app.serve.resilience import call_stage
from serve_app.types import RerankRequest

QUERY = "protein gene study"


class SlowForward:
    """Wraps a scorer's runtime: every forward pass sleeps ``delay`` seconds and records its size."""

    def __init__(self, runtime: Any, delay: float) -> None:
        self.runtime = runtime
        self.delay = delay
        self.batches: list[int] = []
        self.started = threading.Event()

    def __call__(self, batch: Any) -> Any:
        self.started.set()
        self.batches.append(int(batch["input_ids"].shape[0]))
        time.sleep(self.delay)
        return self.runtime(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runtime, name)


class ServeLikeBatch:
    """What ``@serve.batch`` does in a replica: callers' items are gathered for ``wait`` seconds
    and handed to ``fn`` by a task of its own, so cancelling a caller does not cancel the batch
    call (Serve only leaves out callers already cancelled when the batch is formed)."""

    def __init__(self, fn: Any, wait: float = 0.02) -> None:
        self.fn = fn
        self.wait = wait
        self.queue: list[tuple[Any, asyncio.Future]] = []
        self.tasks: set[asyncio.Task] = set()

    async def __call__(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((item, future))
        if len(self.queue) == 1:  # the first of a new batch: it is handed over after `wait`
            task = asyncio.ensure_future(self._flush())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(self.wait)
        batch, self.queue = [(i, f) for i, f in self.queue if not f.cancelled()], []
        if batch:
            results = await self.fn([i for i, _ in batch])
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)


def make_server(model_dir: Any, delay: float, max_batch_pairs: int = 256, cache_bytes: int = 0, batching: str = "one-by-one") -> tuple[RerankerServer, SlowForward]:
    cfg = parse_app_config({"index_dir": "/nonexistent", "reranker": {"model": str(model_dir), "device": "cpu", "max_batch_pairs": max_batch_pairs, "score_cache": {"max_bytes": cache_bytes}}}, use_env=False)
    server = RerankerServer(RerankerServerConfig(reranker=cfg.reranker))
    slow = SlowForward(server.reranker.scorer.runtime, delay)
    server.reranker.scorer.runtime = slow
    if batching == "serve-like":
        server._rerank_batched = ServeLikeBatch(server.coalescer.submit)
    return server, slow


def docs(tag: str, n: int) -> list[str]:
    return [f"{tag} document number {i} about proteins" for i in range(n)]


@pytest.fixture
def saved(monkeypatch) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    monkeypatch.setattr(metrics, "count_cancelled_pairs", lambda model, n: out.append((model, n)))
    return out


BATCHING = ["one-by-one", "serve-like"]


@pytest.mark.parametrize("batching", BATCHING)
@pytest.mark.parametrize("cache_bytes", [0, 1 << 20], ids=["no-cache", "score-cache"])
def test_a_request_cancelled_while_it_waits_is_never_scored(tiny_cross_encoder_dir, saved, cache_bytes, batching):
    server, slow = make_server(tiny_cross_encoder_dir, delay=0.3, cache_bytes=cache_bytes, batching=batching)

    async def scenario():
        first = asyncio.create_task(server.rerank(RerankRequest(QUERY, docs("first", 5))))
        await asyncio.to_thread(slow.started.wait, 5)  # the model is busy with the first request
        abandoned = [asyncio.create_task(server.rerank(RerankRequest(QUERY, docs(f"gone{k}", 7)))) for k in range(3)]
        await asyncio.sleep(0.05)
        for t in abandoned:
            t.cancel()
        for t in abandoned:
            with pytest.raises(asyncio.CancelledError):
                await t
        out = await first
        # The next request finds the model idle: its answer takes one forward pass, not four.
        t0 = time.perf_counter()
        nxt = await server.rerank(RerankRequest(QUERY, docs("next", 5)))
        return out, nxt, time.perf_counter() - t0

    out, nxt, next_s = asyncio.run(scenario())
    assert len(out.scores) == 5 and len(nxt.scores) == 5
    assert slow.batches == [5, 5]  # no pair of the abandoned requests ever reached the model
    assert server.cancelled_requests == 3 and server.cancelled_pairs == 21
    assert sum(n for _, n in saved) == 21
    assert next_s < 2 * slow.delay + 0.25, next_s
    assert server.cache.stats()["entries"] == (10 if cache_bytes else 0)  # nothing of the abandoned ones cached


@pytest.mark.parametrize("batching", BATCHING)
def test_a_request_cancelled_during_its_model_call_stops_between_forward_passes(tiny_cross_encoder_dir, saved, batching):
    server, slow = make_server(tiny_cross_encoder_dir, delay=0.2, max_batch_pairs=2, batching=batching)

    async def scenario():
        task = asyncio.create_task(server.rerank(RerankRequest(QUERY, docs("long", 10))))
        await asyncio.to_thread(slow.started.wait, 5)  # its first forward pass (2 of 10 pairs) runs
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(3 * slow.delay)  # let the model call wind down
        return await server.rerank(RerankRequest(QUERY, docs("after", 2)))

    after = asyncio.run(scenario())
    assert len(after.scores) == 2
    scored_for_cancelled = sum(slow.batches[:-1])
    assert scored_for_cancelled < 10  # the passes after the cancellation did not run
    assert server.cancelled_pairs == 10 - scored_for_cancelled and sum(n for _, n in saved) == 10 - scored_for_cancelled


@pytest.mark.parametrize("batching", BATCHING)
def test_a_cancelled_request_does_not_fail_the_requests_that_share_its_call(tiny_cross_encoder_dir, saved, batching):
    server, slow = make_server(tiny_cross_encoder_dir, delay=0.2, max_batch_pairs=4, batching=batching)

    async def scenario():
        blocker = asyncio.create_task(server.rerank(RerankRequest(QUERY, docs("block", 2))))
        await asyncio.to_thread(slow.started.wait, 5)
        kept = asyncio.create_task(server.rerank(RerankRequest(QUERY, docs("kept", 4))))
        gone = asyncio.create_task(server.rerank(RerankRequest(QUERY, docs("gone", 4))))
        await blocker
        await asyncio.sleep(0.05)  # kept and gone now share a model call
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await kept

    kept = asyncio.run(scenario())
    assert len(kept.scores) == 4 and all(s == s for s in kept.scores)  # scored, no NaN


def test_the_ingress_counts_stage_calls_abandoned_by_cancellation(monkeypatch):
    counted: list[str] = []
    monkeypatch.setattr(metrics, "count_cancelled", counted.append)

    async def scenario():
        task = asyncio.create_task(call_stage("reranker", lambda: asyncio.sleep(10)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert counted == ["reranker"]
