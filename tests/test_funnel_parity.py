"""One funnel, two callers: the in-process SearchPipeline and the Serve ingress's code (SearchService
behind the FastAPI app, no Ray) answer the same requests identically, healthy or not.

Both run over the same fake stages: retrievers and a reranker that can fail, hang, answer garbage
or be at capacity. The pipeline calls them in process; the ingress reaches them through a
``Backends`` object, as it reaches deployment handles. Results, scores, stage reports, degraded
flags and error kinds (the pipeline's exception mapped by the HTTP edge's one table, against the
envelope's ``error.type``) must agree.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any, Optional, Sequence

import httpx
import pytest

from serve_app.config import FunnelLimits, FusionConfig
from serve_app.corpus import Corpus
from serve_app.errors import StageOverloaded
from serve_app.testing import asgi_request
from serve_app.funnel import FunnelTimeouts
from serve_app.pipeline import SearchPipeline
from serve_app.serve.config import parse_app_config
from serve_app.serve.http import core_error_type, create_app
from serve_app.serve.service import SearchService
from serve_app.types import Document, Hit, RerankOutcome, RerankRequest

WORDS = "protein cell gene virus vaccine cancer tumor heart brain blood water energy music film city food star moon".split()
CORPUS = Corpus([Document(f"d{i:02d}", " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(7)), title=f"title {i}") for i in range(40)])
LIMITS = {"default_top_k": 10, "max_top_k": 30, "default_rerank_top_m": 6, "max_rerank_top_m": 20, "default_top_n": 5, "max_top_n": 30}
TIMEOUTS = {"retriever_timeout_s": 0.3, "rerank_timeout_s": 0.3, "request_timeout_s": 2.0, "health_timeout_s": 0.5}
HANG_S = 1.0


def _h(*parts: str) -> float:
    return int(hashlib.sha256("|".join(parts).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


class FakeRetriever:
    """Word overlap (bm25) or overlap plus a hash (dense); ``fault`` set per test."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fault: Optional[str] = None

    def search(self, query: str, k: int) -> list[Hit]:
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        if self.fault == "error":
            raise ConnectionError(f"{self.name} replica unavailable")
        if self.fault == "hang":
            time.sleep(HANG_S)
        if self.fault == "overloaded":
            raise StageOverloaded(self.name, 2.0)
        out = []
        for q in queries:
            words = set(q.lower().split())
            scored = [Hit(d.id, len(words & set(d.content.split())) + (0.5 * _h(self.name, d.id) if self.name == "dense" else 0.0)) for d in CORPUS]
            hits = sorted((h for h in scored if h.score > 0), key=lambda h: (-h.score, h.doc_id))[:k]
            if self.fault == "ghost":  # an id the document store does not hold, at the top
                hits = [Hit("ghost-doc", 99.0), *hits[: k - 1]]
            if self.fault == "nan":
                hits = [Hit(hits[0].doc_id, float("nan")), *hits[1:]]
            out.append(hits)
        return out


class FakeReranker:
    """A hash of (query, document) as the score; ``fault`` set per test."""

    def __init__(self) -> None:
        self.fault: Optional[str] = None

    def rerank_many(self, requests: Sequence[RerankRequest]) -> list[list[float]]:
        if self.fault == "error":
            raise RuntimeError("CUDA error: device-side assert")
        if self.fault == "hang":
            time.sleep(HANG_S)
        if self.fault == "overloaded":
            raise StageOverloaded("reranker", 1.0)
        out = [[round(4 * _h(r.query, d) - 2, 6) for d in r.documents] for r in requests]
        if self.fault == "short":
            out = [s[:-1] for s in out]
        if self.fault == "inf":
            out = [[float("inf"), *s[1:]] for s in out]
        return out


class InProcessBackends:
    """The ingress's view of the same fakes: one awaitable call per query, as deployment handles give."""

    def __init__(self, retrievers: dict[str, FakeRetriever], reranker: FakeReranker) -> None:
        self.retrievers = retrievers
        self.reranker = reranker

    async def retrieve(self, name: str, query: str, k: int) -> list[Hit]:
        return await asyncio.to_thread(self.retrievers[name].search, query, k)

    async def rerank(self, request: RerankRequest) -> RerankOutcome:
        (scores,) = await asyncio.to_thread(self.reranker.rerank_many, [request])
        return RerankOutcome(list(scores), 1, len(request.documents))

    async def ping(self, stage: str) -> dict[str, Any]:
        return {"stage": stage}


@pytest.fixture()
def stages():
    retrievers = {"bm25": FakeRetriever("bm25"), "dense": FakeRetriever("dense")}
    return retrievers, FakeReranker()


def both(retrievers, reranker, fusion: Optional[dict] = None):
    fusion_cfg = FusionConfig(**(fusion or {}))
    pipe = SearchPipeline(
        CORPUS, retrievers, reranker, fusion_cfg, FunnelLimits(**LIMITS),
        FunnelTimeouts(retriever_s=TIMEOUTS["retriever_timeout_s"], rerank_s=TIMEOUTS["rerank_timeout_s"], request_s=TIMEOUTS["request_timeout_s"]),
    )
    cfg = parse_app_config({"index_dir": "/nonexistent", "funnel": LIMITS, "timeouts": TIMEOUTS, "fusion": fusion_cfg.model_dump()}, use_env=False)
    app = create_app(SearchService(cfg, InProcessBackends(retrievers, reranker), CORPUS, {}), api_keys=[])
    return pipe, app


def post(app, body: dict[str, Any]) -> httpx.Response:
    return asgi_request(app, "POST", "/search", json=body, base_url="http://t")


def in_process(pipe: SearchPipeline, body: dict[str, Any]) -> tuple[Optional[Any], Optional[str]]:
    """(result, None) or (None, the error type the HTTP edge gives the exception raised)."""
    try:
        return pipe.search(**body), None
    except Exception as exc:  # noqa: BLE001 - the kind is what is compared
        kind = core_error_type(exc)
        assert kind is not None, f"the pipeline raised a non-core exception: {exc!r}"
        return None, kind


def assert_same(pipe: SearchPipeline, app, body: dict[str, Any]) -> dict[str, Any]:
    result, kind = in_process(pipe, body)
    r = post(app, body)
    if kind is not None:
        assert r.status_code >= 400 and r.json()["error"]["type"] == kind, (kind, r.text)
        return {"error": kind}
    assert r.status_code == 200, r.text
    served = r.json()
    assert [x["id"] for x in served["results"]] == [x.doc_id for x in result.results]
    for s, p in zip(served["results"], result.results):
        assert (s["score"], s["rerank_score"], s["fused_score"]) == (p.score, p.rerank_score, p.fused_score)
        assert {n: (v["rank"], v["score"]) for n, v in s["retrievers"].items()} == {n: (p.retriever_ranks[n], p.retriever_scores[n]) for n in p.retriever_ranks}
        if body.get("return_documents"):
            assert (s["title"], s["text"]) == (p.document.title, p.document.text)
    assert served["degraded"] == bool(result.degraded)
    assert {n: (v["status"], v["candidates"], v.get("error"), v.get("batch_size")) for n, v in served["stages"].items()} == {
        n: (v.status, v.candidates, v.error, v.batch_size) for n, v in result.stages.items()
    }
    assert served["funnel"] == result.funnel.sizes()
    assert set(served["timings_ms"]) == set(result.timings_ms)
    return served


REQUESTS = [
    {"query": "protein gene cancer"},
    {"query": "music film", "top_k": 20, "rerank_top_m": 12, "top_n": 15, "return_documents": True},
    {"query": "water energy", "retrievers": ["dense"], "rerank_top_m": 0, "top_n": 8},
    {"query": "star moon city", "top_k": 4, "top_n": 8},  # top_n beyond the reranked head: fused order after it
]


@pytest.mark.parametrize("fusion", [{}, {"method": "weighted"}, {"rerank_blend": "rrf"}], ids=["rrf", "weighted", "blend"])
def test_healthy_stages_give_identical_answers(stages, fusion):
    pipe, app = both(*stages, fusion=fusion)
    for body in REQUESTS:
        served = assert_same(pipe, app, body)
        assert served["degraded"] is False and served["results"]


FAULTS = [
    # (stage, fault, what the answer must be)
    ("dense", "error", "degraded dense"),
    ("dense", "hang", "degraded dense"),
    ("bm25", "nan", "degraded bm25"),
    ("bm25", "ghost", "ok"),  # the absent document is dropped by both
    ("reranker", "error", "degraded rerank"),
    ("reranker", "hang", "degraded rerank"),
    ("reranker", "short", "degraded rerank"),
    ("reranker", "inf", "degraded rerank"),
    ("reranker", "overloaded", "overloaded"),
    ("bm25", "overloaded", "overloaded"),
]


@pytest.mark.parametrize("stage,fault,expected", FAULTS, ids=[f"{s}-{f}" for s, f, _ in FAULTS])
def test_failing_stages_are_decided_once_for_both_callers(stages, stage, fault, expected):
    retrievers, reranker = stages
    (reranker if stage == "reranker" else retrievers[stage]).fault = fault
    pipe, app = both(retrievers, reranker)
    for body in REQUESTS[:2]:
        served = assert_same(pipe, app, body)
        if expected == "overloaded":
            assert served == {"error": "overloaded"}
        elif expected == "ok":
            assert served["degraded"] is False and "ghost-doc" not in [x["id"] for x in served["results"]]
        else:
            failed = expected.split()[1]
            assert served["degraded"] is True and served["stages"][failed]["status"] in ("error", "timeout")
            assert served["stages"][failed]["status"] == ("timeout" if fault == "hang" else "error")
            if failed == "rerank":  # the fused order stands in for the reranked one
                assert all(x["rerank_score"] is None and x["score"] == x["fused_score"] for x in served["results"])


@pytest.mark.parametrize("faults,kind", [({"bm25": "error", "dense": "error"}, "service_unavailable"), ({"bm25": "hang", "dense": "hang"}, "stage_timeout"), ({"bm25": "hang", "dense": "error"}, "service_unavailable")])
def test_every_retriever_failing_is_the_same_error_for_both(stages, faults, kind):
    retrievers, reranker = stages
    for name, fault in faults.items():
        retrievers[name].fault = fault
    pipe, app = both(retrievers, reranker)
    assert assert_same(pipe, app, REQUESTS[0]) == {"error": kind}


def test_the_request_deadline_is_the_same_for_both(stages):
    retrievers, reranker = stages
    reranker.fault = "hang"
    pipe, app = both(retrievers, reranker)
    pipe.timeouts = FunnelTimeouts(retriever_s=1.0, rerank_s=5.0, request_s=0.4)
    service_cfg = parse_app_config({"index_dir": "/x", "funnel": LIMITS, "timeouts": {**TIMEOUTS, "rerank_timeout_s": 5.0, "request_timeout_s": 0.4}}, use_env=False)
    app = create_app(SearchService(service_cfg, InProcessBackends(retrievers, reranker), CORPUS, {}), api_keys=[])
    assert assert_same(pipe, app, REQUESTS[0]) == {"error": "deadline_exceeded"}


@pytest.mark.parametrize("body", [{"query": "x", "top_k": 31}, {"query": "x", "top_k": 2, "top_n": 5}, {"query": "x", "rerank_top_m": 21}])
def test_funnel_sizes_out_of_their_limits_are_the_same_error(stages, body):
    pipe, app = both(*stages)
    # The HTTP layer's schema may catch a size first; either way the answer is a 422 validation_error.
    assert assert_same(pipe, app, body) == {"error": "validation_error"}
