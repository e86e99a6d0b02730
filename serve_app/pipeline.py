"""The funnel in one process: :class:`SearchPipeline` (library use, evaluation, tests).

It is a thin caller of :class:`serve_app.funnel.Funnel` with in-process stage adapters
(:class:`LocalStages`): the retrievers and the reranker are plain objects, the document store is
anything with ``get(doc_id)``. Every decision about failing stages is the funnel's, so the
pipeline answers exactly as the Serve ingress does for the same stages (tested side by side):
a retriever that raises is left out (``degraded``), a failing reranker leaves the fused order,
and when every retriever fails the funnel's ``StageUnavailable`` is raised.

>>> from serve_app.corpus import Corpus
>>> from serve_app.retrieval.bm25 import BM25Retriever
>>> from serve_app.types import Document
>>> corpus = Corpus([Document("a", "the sun is a star"), Document("b", "the moon orbits the earth")])
>>> pipe = SearchPipeline(corpus, {"bm25": BM25Retriever.build(corpus)})
>>> [r.doc_id for r in pipe.search("what is the sun", top_k=2, top_n=1).results]
['a']
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Coroutine, Mapping, Optional, Sequence, TypeVar

from serve_app.config import CascadeStage, RerankerModelConfig, FunnelLimits, FusionConfig
from serve_app.errors import FunnelError
from serve_app.funnel import (
    CascadeDepths,
    KNOWN_RETRIEVERS,
    Funnel,
    FunnelRequest,
    FunnelTimeouts,
    RankedCandidate,
    ResolvedFunnel,
    SearchResult,
    SearchResultItem,
    StageReport,
    apply_rerank,
    assemble,
    resolve_funnel,
)
from serve_app.types import Document, Hit, RerankOutcome, RerankRequest, Retriever

if TYPE_CHECKING:  # the reranker pulls in torch; imported only where used
    from serve_app.rerank.reranker import Reranker

__all__ = [
    "FunnelRequest",
    "LocalStages",
    "RankedCandidate",
    "ResolvedFunnel",
    "SearchPipeline",
    "SearchResult",
    "SearchResultItem",
    "StageReport",
    "apply_rerank",
    "assemble",
    "resolve_funnel",
]

T = TypeVar("T")
_POOL: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _stage_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for stage calls that may time out. Not the event loop's default executor, which
    ``asyncio.run`` waits for on exit: a stage left behind by its timeout must not hold the
    caller up."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="serve_app-stage")
    return _POOL


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, also when this thread already runs an
    event loop (a notebook, an async application): then in a helper thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


class LocalStages:
    """:class:`serve_app.funnel.FunnelStages` over objects in this process.

    Calls run inline (one after another, in the caller's thread), or in worker threads when
    ``threads`` is set: only then can a stage timeout interrupt the wait for a slow stage.
    ``rerank_queries_per_call`` cuts a batch's reranking into calls of that many queries;
    ``show_progress`` shows a progress bar over them.
    """

    def __init__(
        self,
        documents: Any,
        retrievers: Mapping[str, Retriever],
        reranker: Any = None,
        *,
        threads: bool = False,
        rerank_queries_per_call: Optional[int] = None,
        show_progress: bool = False,
        cascade: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self._documents = documents
        self.retrievers = dict(retrievers)
        self.reranker = reranker
        self.cascade = dict(cascade or {})
        self.threads = threads
        self.rerank_queries_per_call = rerank_queries_per_call
        self.show_progress = show_progress

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.threads:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(_stage_pool(), functools.partial(fn, *args))

    def documents(self, doc_ids: Sequence[str]) -> list[Optional[Document]]:
        return [self._documents.get(d) for d in doc_ids]

    async def retrieve(self, name: str, queries: Sequence[str], k: int, where: Any = None) -> list[list[Hit]]:
        if where is None:
            return await self._call(self.retrievers[name].search_batch, list(queries), k)
        return await self._call(self.retrievers[name].search_batch, list(queries), k, where)

    async def rerank(self, requests: Sequence[RerankRequest], stage: Optional[str] = None) -> list[RerankOutcome]:
        from serve_app.progress import progress

        reranker = self.reranker if stage is None else self.cascade[stage]
        step = self.rerank_queries_per_call or len(requests)
        out: list[RerankOutcome] = []
        with progress(len(requests), "rerank" if stage is None else f"rerank.{stage}", "query", enabled=self.show_progress) as bar:
            for start in range(0, len(requests), step):
                chunk = list(requests[start : start + step])
                scores = await self._call(reranker.rerank_many, chunk)
                pairs = sum(len(r.documents) for r in chunk)
                out.extend(RerankOutcome([float(x) for x in s], len(chunk), pairs) for s in scores)
                bar.update(len(chunk))
        return out


class SearchPipeline:
    """The whole funnel in one process.

    ``retrievers`` maps names (``"bm25"``, ``"dense"``) to objects of the ``Retriever``
    protocol; ``reranker`` (anything with ``rerank_many``, e.g. :class:`serve_app.rerank.Reranker`)
    may be None (no reranking). ``corpus`` provides the document texts for the reranker and for
    ``return_documents`` (anything with ``get(doc_id)``). ``timeouts`` (default: none) bounds
    each stage as the service does; with any timeout set the stages run in worker threads.
    ``cascade``: cheaper rerank stages run before ``reranker``, each a (:class:`CascadeStage`,
    reranker object) pair in order (see :mod:`serve_app.funnel`).
    """

    def __init__(
        self,
        corpus: Any,
        retrievers: Mapping[str, Retriever],
        reranker: "Reranker | None" = None,
        fusion: FusionConfig | None = None,
        limits: FunnelLimits | None = None,
        timeouts: FunnelTimeouts | None = None,
        cascade: Sequence[tuple[CascadeStage, Any]] = (),
    ) -> None:
        if not retrievers:
            raise ValueError("SearchPipeline needs at least one retriever")
        unknown = [n for n in retrievers if n not in KNOWN_RETRIEVERS]
        if unknown:
            raise ValueError(f"unknown retriever name(s) {unknown}; expected names among {list(KNOWN_RETRIEVERS)}")
        self.corpus = corpus
        self.retrievers = dict(retrievers)
        self.reranker = reranker
        self.fusion = fusion or FusionConfig()
        self.limits = limits or FunnelLimits()
        self.timeouts = timeouts or FunnelTimeouts()
        self.cascade = list(cascade)

    @property
    def available_retrievers(self) -> list[str]:
        """Retriever names in canonical order (bm25 before dense)."""
        return [n for n in KNOWN_RETRIEVERS if n in self.retrievers]

    def funnel(self, **stage_options: Any) -> Funnel:
        """The :class:`~serve_app.funnel.Funnel` over this pipeline's objects."""
        threaded = any(t is not None for t in (self.timeouts.retriever_s, self.timeouts.rerank_s, self.timeouts.request_s))
        stages = LocalStages(self.corpus, self.retrievers, self.reranker, threads=threaded, cascade={c.name: r for c, r in self.cascade}, **stage_options)
        return Funnel(
            stages, retrievers=self.available_retrievers, rerank_available=self.reranker is not None, limits=self.limits, fusion=self.fusion, timeouts=self.timeouts, cascade=self.cascade_depths()
        )

    def cascade_depths(self) -> list[CascadeDepths]:
        """The cascade's stages as the funnel sees them."""
        return [CascadeDepths(c.name, c.default_top_m, c.max_top_m, c.blend, c.blend_weight) for c, _ in self.cascade]

    def resolve(self, request: FunnelRequest) -> ResolvedFunnel:
        """Validate ``request`` against this pipeline's limits, retrievers, reranker and cascade."""
        return resolve_funnel(request, self.limits, self.available_retrievers, rerank_available=self.reranker is not None, cascade=self.cascade_depths())

    def search(
        self,
        query: str,
        top_k: int | None = None,
        rerank_top_m: int | None = None,
        top_n: int | None = None,
        retrievers: Sequence[str] | None = None,
        return_documents: bool = False,
        instruction: str | None = None,
        cascade: Mapping[str, int] | None = None,
    ) -> SearchResult:
        """Run the funnel for one query (see :mod:`serve_app.funnel` for what a failing stage does);
        ``instruction``: a decoder reranker's prompt instruction for this query; ``cascade``: the
        depth of cascade stages by name (absent: their defaults)."""
        return run_sync(self.funnel().search(FunnelRequest(query, top_k, rerank_top_m, top_n, retrievers, return_documents, instruction=instruction, cascade=cascade)))

    def search_batch(
        self,
        queries: Sequence[str],
        top_k: int | None = None,
        rerank_top_m: int | None = None,
        top_n: int | None = None,
        retrievers: Sequence[str] | None = None,
        return_documents: bool = False,
        rerank_queries_per_call: int = 8,
        show_progress: bool = False,
        instruction: str | None = None,
        cascade: Mapping[str, int] | None = None,
    ) -> list[SearchResult]:
        """Run the funnel for many queries (evaluation): each retriever answers them all in one
        ``search_batch`` call, the reranker ``rerank_queries_per_call`` queries per
        ``rerank_many`` call. Each result's ``timings_ms`` holds the batch's stage times divided
        by the number of queries (amortised per query)."""
        if rerank_queries_per_call < 1:
            raise ValueError(f"rerank_queries_per_call must be >= 1, got {rerank_queries_per_call}")
        requests = [FunnelRequest(q, top_k, rerank_top_m, top_n, retrievers, return_documents, instruction=instruction, cascade=cascade) for q in queries]
        if not requests:
            return []
        return run_sync(self.funnel(rerank_queries_per_call=rerank_queries_per_call, show_progress=show_progress).search_many(requests))

    @classmethod
    def from_index(
        cls,
        index_dir: str | Path,
        reranker_cfg: RerankerModelConfig | None = None,
        fusion: FusionConfig | None = None,
        limits: FunnelLimits | None = None,
        retrievers: Collection[str] | None = None,
        **load_kwargs: Any,
    ) -> "SearchPipeline":
        """A pipeline over an index built by :func:`serve_app.index.build_index`.

        ``retrievers`` limits which of the index's retrievers are used (default: all it has);
        ``reranker_cfg`` loads a cross-encoder reranker; ``load_kwargs`` go to ``load_index``.
        """
        from serve_app.index import load_index

        loaded = load_index(index_dir, **load_kwargs)
        found: dict[str, Retriever] = {}
        for name in KNOWN_RETRIEVERS:
            r = getattr(loaded, name, None)
            if r is not None and (retrievers is None or name in retrievers):
                found[name] = r
        if retrievers is not None:
            missing = [n for n in retrievers if n not in found]
            if missing:
                raise FunnelError(f"the index at {index_dir} has no {', '.join(missing)} retriever (it has: {[n for n in KNOWN_RETRIEVERS if getattr(loaded, n, None) is not None]})")
        if not found:
            raise FunnelError(f"the index at {index_dir} has no retriever")
        reranker = None
        if reranker_cfg is not None:
            from serve_app.rerank import Reranker

            reranker = Reranker.from_config(reranker_cfg)
        return cls(loaded.corpus, found, reranker, fusion, limits)

