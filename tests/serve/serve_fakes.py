"""Deterministic in-process stand-ins for the stages, for fast tests of the ingress without Ray."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest

from serve_app.corpus import Corpus
from serve_app.testing import asgi_request  # noqa: F401 - the tests import it from here with the fakes
from serve_app.types import RerankOutcome, RerankRequest
from serve_app.types import Document, Hit

TOPICS = [
    "protein cell gene dna",
    "ocean sea river water",
    "football soccer team player",
    "music song album band",
    "space star planet moon",
    "food bread coffee cheese",
]


def small_corpus(n: int = 60) -> Corpus:
    """``n`` short documents over a few topics, words from the tiny models' vocabulary."""
    docs = []
    for i in range(n):
        words = TOPICS[i % len(TOPICS)].split()
        text = f"{' '.join(words[: 2 + i % 3])} study {i} about the {words[i % len(words)]} and results of the {words[-1]}"
        docs.append(Document(f"doc{i:03d}", text, title=f"{words[0]} {i}"))
    return Corpus(docs)


def _h(*parts: str) -> float:
    return int(hashlib.sha256("|".join(parts).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


@dataclass
class FakeBackends:
    """Word-overlap retrievers and a hash-based reranker; faults set per stage."""

    corpus: Corpus
    faults: dict[str, str] = field(default_factory=dict)  # stage -> "error" | "hang"
    calls: list[tuple[str, Any]] = field(default_factory=list)
    requests: list[RerankRequest] = field(default_factory=list)  # every rerank request received
    hang_s: float = 30.0
    #: the reranker models the fake serves (None: the default) and the offset each adds to the scores
    models: dict[Optional[str], float] = field(default_factory=lambda: {None: 0.0})

    async def _fault(self, stage: str) -> None:
        mode = self.faults.get(stage)
        if mode == "error":
            raise ConnectionError(f"{stage} replica unavailable")
        if mode == "hang":
            await asyncio.sleep(self.hang_s)

    async def retrieve(self, name: str, query: str, k: int, where: Any = None) -> list[Hit]:
        from serve_app.filters import matches

        self.calls.append((name, (query, k)))
        await self._fault(name)
        q = set(query.lower().split())
        scored = []
        for d in self.corpus:
            if not matches(where, d.metadata):  # filtered before the top-k, as the real retrievers do
                continue
            overlap = len(q & set(d.content.lower().split()))
            score = overlap + (_h(name, d.id) * 0.5 if name == "dense" else 0.0)
            if overlap or name == "dense":
                scored.append(Hit(d.id, float(score)))
        scored.sort(key=lambda h: (-h.score, h.doc_id))
        return scored[:k]

    async def rerank(self, request: RerankRequest, stage: Optional[str] = None) -> RerankOutcome:
        query, documents = request.query, list(request.documents)
        if stage is not None:  # a cascade stage: its own fake model (another hash)
            self.calls.append((f"reranker.{stage}", (query, len(documents))))
            await self._fault(f"reranker.{stage}")
            return RerankOutcome([fake_rerank_score(f"{stage}:{query}", d) for d in documents], 1, len(documents), len(documents))
        self.calls.append(("reranker", (query, len(documents), request.max_tokens_per_doc)))
        self.requests.append(request)
        await self._fault("reranker")
        if request.model not in self.models:
            from serve_app.errors import ModelNotFound

            raise ModelNotFound(str(request.model), [str(m) for m in self.models])
        offset = self.models[request.model]
        return RerankOutcome([fake_rerank_score(query, d) + offset for d in documents], 1, len(documents), len(documents), sum(len(query.split()) + len(d.split()) + 3 for d in documents))

    async def ping(self, stage: str) -> dict[str, Any]:
        await self._fault(stage)
        return {"stage": stage}


class ServerBackends(FakeBackends):
    """Fake retrievers in front of a real :class:`~serve_app.serve.deployments.RerankerServer`
    (``server``, in process); ``faults["reranker"] = "overloaded"`` makes its queue full."""

    server: Any = None

    async def rerank(self, request: RerankRequest) -> RerankOutcome:
        self.requests.append(request)
        if self.faults.get("reranker") == "overloaded":
            from serve_app.errors import StageOverloaded

            raise StageOverloaded("reranker", 2.0)
        return await self.server.rerank(request)

    async def ping(self, stage: str) -> dict[str, Any]:
        if stage == "reranker":
            return await self.server.ping()
        return await super().ping(stage)


_FROM_ENV = object()


def service_app(backends: Any = None, store: Any = None, *, api_keys: Any = _FROM_ENV, **config: Any) -> tuple[Any, Any, Any]:
    """(FastAPI app, backends, AppConfig) of a :class:`~serve_app.serve.service.SearchService` over
    ``backends`` (default: :class:`FakeBackends` over :func:`small_corpus`) and a document
    ``store`` (default: that corpus); ``config`` overrides the app's arguments; ``api_keys`` as
    ``create_app`` takes them (default: from the environment, as ``create_app`` does)."""
    from serve_app.serve.config import parse_app_config
    from serve_app.serve.http import create_app
    from serve_app.serve.service import SearchService

    args = {"index_dir": "/nonexistent/index", **config}
    cfg = parse_app_config(args, use_env=False)
    corpus = store if store is not None else small_corpus(60)
    backends = backends if backends is not None else FakeBackends(corpus if isinstance(corpus, Corpus) else small_corpus(60))
    service = SearchService(cfg, backends, corpus, {"chunks": len(corpus)})
    return (create_app(service) if api_keys is _FROM_ENV else create_app(service, api_keys=api_keys)), backends, cfg


def fake_rerank_score(query: str, document: str) -> float:
    return round(4.0 * _h(query, document) - 2.0, 6)


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.25) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_exc: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error
            last_exc = exc
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))
