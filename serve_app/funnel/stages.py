"""The stages as the funnel sees them (:class:`FunnelStages`), how long it waits for them, and
the checks of what they answer (see :mod:`serve_app.funnel`)."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Iterable, Optional, Protocol, Sequence, TypeVar

from serve_app.errors import DeadlineExceeded, InputRejected
from serve_app.types import Document, Hit, RerankOutcome, RerankRequest

T = TypeVar("T")


def input_rejected(exc: BaseException) -> Optional[InputRejected]:
    """The client-side error ``exc`` is or carries. Ray raises a replica's exception wrapped (a
    ``RayTaskError`` that subclasses it, its text a remote traceback): the original, in
    ``.cause``, is the one answered."""
    for candidate in (getattr(exc, "cause", None), exc):
        if isinstance(candidate, InputRejected):
            return candidate
    return None


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """A short, single-line description of a stage failure (no traceback, no request data)."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    cause = getattr(exc, "cause", None)  # Ray wraps a remote exception in RayTaskError(.cause)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    first = next((line.strip() for line in text if line.strip() and not line.startswith("Traceback")), "")
    msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --------------------------------------------------------------------------- adapters


class FunnelStages(Protocol):
    """The stages as the funnel sees them. Every method may raise; :class:`StageOverloaded`
    sheds the request, anything else leaves the stage out (see the module docstring)."""

    def documents(self, doc_ids: Sequence[str]) -> list[Optional[Document]] | Awaitable[list[Optional[Document]]]:
        """The stored document of each id (None for an id the store does not hold); a coroutine
        when the lookup reads from disk (the ingress runs it in a worker thread)."""
        ...

    async def retrieve(self, name: str, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-``k`` hits of retriever ``name`` for each query, best first. A request with a
        metadata filter calls it with ``where=`` (the parsed filter) as well: the stages that
        serve filtered requests take that keyword and search only the documents it admits."""
        ...

    async def rerank(self, requests: Sequence[RerankRequest], stage: Optional[str] = None) -> list[RerankOutcome]:
        """The scores of each request's documents (request order) by the final reranker, or by
        the cascade stage ``stage``."""
        ...


@dataclass(frozen=True)
class FunnelTimeouts:
    """How long the funnel waits; None waits as long as it takes (the in-process default)."""

    retriever_s: Optional[float] = None
    rerank_s: Optional[float] = None
    request_s: Optional[float] = None


def elapsed_ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


async def run_with_deadline(coro: Awaitable[T], timeout_s: Optional[float]) -> T:
    """Await ``coro`` for at most ``timeout_s`` seconds (None: no limit); past it, cancel it and
    raise :class:`DeadlineExceeded`."""
    if timeout_s is None:
        return await coro
    try:
        return await asyncio.wait_for(coro, timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        raise DeadlineExceeded(timeout_s) from None


async def gather_all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Run ``coros`` concurrently; the first exception cancels the others and propagates."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


def check_hits(lists: Any, n_queries: int) -> Optional[str]:
    """Why a retriever's answer is unusable, or None when it is fine."""
    if not isinstance(lists, list) or len(lists) != n_queries:
        return f"returned {len(lists) if isinstance(lists, list) else type(lists).__name__} result lists for {n_queries} queries"
    for hits in lists:
        for h in hits:
            if not math.isfinite(float(h.score)):
                return f"returned a non-finite score for {h.doc_id!r}"
    return None


def check_scores(outcome: Any, n_documents: int) -> Optional[str]:
    """Why a reranker's answer for one request is unusable, or None when it is fine."""
    scores = getattr(outcome, "scores", None)
    if scores is None or len(scores) != n_documents:
        return f"the reranker returned {len(scores) if scores is not None else 'no'} scores for {n_documents} documents"
    if not all(math.isfinite(float(s)) for s in scores):
        return "the reranker returned a non-finite score"
    return None

