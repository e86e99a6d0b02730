"""The ingress's HTTP layer and logic in process (no Ray): validation, error envelope, degradation."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_fakes import FakeBackends, asgi_request, fake_rerank_score, service_app, small_corpus

from serve_app.client import AsyncServeAppClient, ServeAppError
from serve_app.serve.api import ERROR_TYPES, build_request_models
from serve_app.serve.config import parse_app_config
from serve_app.serve.http import strict_json_loads

CORPUS = small_corpus(60)


def make_app(faults: dict[str, str] | None = None, **overrides: Any):
    args = {"timeouts": {"retriever_timeout_s": 0.3, "rerank_timeout_s": 0.3, "health_timeout_s": 0.3}, **overrides}
    return service_app(FakeBackends(CORPUS, dict(faults or {}), hang_s=5.0), CORPUS, **args)


call = asgi_request


def assert_envelope(r: httpx.Response, status: int, error_type: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    if r.request.url.path.endswith("/rerank"):  # the rerank routes repeat the message where Cohere's clients read it
        assert set(body) == {"error", "message"} and body["message"] == body["error"]["message"], body
    else:
        assert set(body) == {"error"}, body
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type, body
    assert ERROR_TYPES[error_type][0] == status
    assert body["error"]["message"]
    return body["error"]


# --------------------------------------------------------------------------- happy paths


def test_search_fuses_reranks_and_reports_stages():
    app, backends, cfg = make_app()
    r = call(app, "POST", "/search", json={"query": "protein gene study", "top_k": 20, "rerank_top_m": 5, "top_n": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["degraded"] is False
    assert body["funnel"] == {"top_k": 20, "rerank_top_m": 5, "top_n": 8, "retrievers": ["bm25", "dense"]}
    assert {s: body["stages"][s]["status"] for s in ("bm25", "dense", "fusion", "rerank")} == dict.fromkeys(("bm25", "dense", "fusion", "rerank"), "ok")
    results = body["results"]
    assert len(results) == 8
    head, tail = results[:5], results[5:]
    # The reranked head is ordered by the (fake) cross-encoder score of each document's content.
    for item in head:
        assert item["rerank_score"] == pytest.approx(fake_rerank_score("protein gene study", CORPUS.get(item["id"]).content))
        assert item["score"] == item["rerank_score"]
    assert [x["rerank_score"] for x in head] == sorted((x["rerank_score"] for x in head), reverse=True)
    # The rest keeps the fused order, unreranked.
    assert all(x["rerank_score"] is None and x["score"] == x["fused_score"] for x in tail)
    assert [x["fused_score"] for x in tail] == sorted((x["fused_score"] for x in tail), reverse=True)
    for item in results:
        assert item["retrievers"], item
        assert all(ev["rank"] >= 1 for ev in item["retrievers"].values())
        assert "text" not in item  # return_documents defaults to false
    assert set(body["timings_ms"]) >= {"bm25", "dense", "fusion", "rerank", "total"}
    assert ("reranker", ("protein gene study", 5, None)) in backends.calls


def test_search_return_documents_and_retriever_subset():
    app, backends, _ = make_app()
    r = call(app, "POST", "/search", json={"query": "ocean water", "retrievers": ["bm25"], "rerank_top_m": 0, "top_n": 3, "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stages"]["dense"]["status"] == "skipped"
    assert body["stages"]["rerank"]["status"] == "skipped"
    assert not any(c[0] == "dense" for c in backends.calls)
    for item in body["results"]:
        doc = CORPUS.get(item["id"])
        assert (item["title"], item["text"]) == (doc.title, doc.text)
        assert set(item["retrievers"]) == {"bm25"}
        assert "ocean" in doc.content or "water" in doc.content


def test_rerank_is_cohere_compatible():
    app, backends, _ = make_app(reranker={"aliases": {"rerank-v3.5": "default"}})  # the name Cohere's clients send, mapped to the local model
    docs = ["protein cell gene", {"text": "ocean sea water"}, "football team", {"text": "music album"}]
    texts = [d if isinstance(d, str) else d["text"] for d in docs]
    for path in ("/rerank", "/v1/rerank"):
        r = call(app, "POST", path, json={"query": "gene", "documents": docs, "top_n": 3, "return_documents": True, "model": "rerank-v3.5", "max_tokens_per_doc": 64})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"id", "results", "meta", "model", "usage"}  # Cohere v1, and Jina's model and usage
        expected = sorted(range(4), key=lambda i: -fake_rerank_score("gene", texts[i]))[:3]
        assert [x["index"] for x in body["results"]] == expected
        for x in body["results"]:
            assert x["relevance_score"] == pytest.approx(fake_rerank_score("gene", texts[x["index"]]))
            assert x["document"] == {"text": texts[x["index"]]}
        assert body["meta"]["api_version"] == {"version": "1"} and body["model"] == "rerank-v3.5"
    assert backends.calls[-1] == ("reranker", ("gene", 4, 64))
    # top_k is accepted as an alias; without return_documents there is no document key.
    r = call(app, "POST", "/v1/rerank", json={"query": "gene", "documents": docs, "top_k": 2})
    assert [set(x) for x in r.json()["results"]] == [{"index", "relevance_score"}] * 2
    # top_n beyond the number of documents returns them all.
    r = call(app, "POST", "/rerank", json={"query": "gene", "documents": docs, "top_n": 50})
    assert sorted(x["index"] for x in r.json()["results"]) == [0, 1, 2, 3]


def test_healthz_and_info():
    app, _, cfg = make_app()
    r = call(app, "GET", "/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "stages": {"bm25": "ok", "dense": "ok", "reranker": "ok"}}
    info = call(app, "GET", "/info").json()
    assert info["limits"] == cfg.limits.model_dump()
    assert info["funnel"] == cfg.funnel.model_dump()
    assert info["index"]["documents"] == len(CORPUS)
    assert info["models"]["reranker"] == cfg.reranker.model
    app, _, _ = make_app(faults={"dense": "error"})
    err = assert_envelope(call(app, "GET", "/healthz"), 503, "not_ready")
    assert "dense" in err["message"] and "bm25" not in err["message"]


def test_openapi_schema_carries_the_configured_limits():
    app, _, _ = make_app(limits={"max_query_chars": 77, "max_documents": 9})
    spec = call(app, "GET", "/openapi.json").json()
    assert {"/search", "/rerank", "/v1/rerank", "/healthz", "/info"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert schemas["SearchRequest"]["properties"]["query"]["maxLength"] == 77
    for name in ("CohereRerankRequest", "CohereV2RerankRequest", "TEIRerankRequest"):
        prop = "texts" if name.startswith("TEI") else "documents"
        assert schemas[name]["properties"][prop]["maxItems"] == 9, name
    assert {"/v2/rerank"} <= set(spec["paths"])
    assert call(app, "GET", "/docs").status_code == 200


# --------------------------------------------------------------------------- degradation


@pytest.mark.parametrize("mode,status", [("error", "error"), ("hang", "timeout")])
def test_failing_retriever_degrades_to_the_other(mode, status):
    app, _, cfg = make_app(faults={"dense": mode})
    t0 = time.perf_counter()
    r = call(app, "POST", "/search", json={"query": "space star planet", "top_n": 5})
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["degraded"] is True
    assert body["stages"]["dense"]["status"] == status
    assert body["stages"]["bm25"]["status"] == "ok"
    assert body["results"] and all(set(x["retrievers"]) == {"bm25"} for x in body["results"])
    # The hung retriever is abandoned at its timeout, not awaited (it would sleep 5 s).
    assert elapsed < cfg.timeouts.retriever_timeout_s + 2.0


def test_every_retriever_down_is_503():
    app, _, _ = make_app(faults={"dense": "error", "bm25": "hang"})
    err = assert_envelope(call(app, "POST", "/search", json={"query": "space"}), 503, "service_unavailable")
    assert "bm25" in err["message"] and "dense" in err["message"]


@pytest.mark.parametrize("mode,status", [("error", "error"), ("hang", "timeout")])
def test_failing_reranker_keeps_the_fused_order_for_search(mode, status):
    app, _, _ = make_app(faults={"reranker": mode})
    body = call(app, "POST", "/search", json={"query": "music band", "top_n": 5}).json()
    assert body["degraded"] is True and body["stages"]["rerank"]["status"] == status
    assert all(x["rerank_score"] is None for x in body["results"])
    assert [x["fused_score"] for x in body["results"]] == sorted((x["fused_score"] for x in body["results"]), reverse=True)


@pytest.mark.parametrize("mode,status,error_type", [("error", 503, "service_unavailable"), ("hang", 504, "stage_timeout")])
def test_failing_reranker_fails_rerank_with_envelope(mode, status, error_type):
    app, _, _ = make_app(faults={"reranker": mode})
    assert_envelope(call(app, "POST", "/v1/rerank", json={"query": "q", "documents": ["a", "b"]}), status, error_type)


# --------------------------------------------------------------------------- error matrix

SECRET = "do-not-echo-7f3a"
LONG = "x" * 2100  # beyond the default max_query_chars (2048)

ERROR_MATRIX = [
    # (name, method, path, body bytes or None, content type, status, type)
    ("malformed json", "POST", "/search", b'{"query": "a",', "application/json", 400, "invalid_json"),
    ("NaN", "POST", "/search", b'{"query": "a", "top_k": NaN}', "application/json", 400, "invalid_json"),
    ("Infinity", "POST", "/rerank", b'{"query": "a", "documents": ["x"], "top_n": Infinity}', "application/json", 400, "invalid_json"),
    ("-Infinity", "POST", "/v1/rerank", b'{"query": "a", "documents": ["x"], "top_n": -Infinity}', "application/json", 400, "invalid_json"),
    ("float overflow", "POST", "/search", b'{"query": "a", "top_k": 1e400}', "application/json", 400, "invalid_json"),
    ("non-utf8", "POST", "/search", b'{"query": "\xff\xfe"}', "application/json", 400, "invalid_json"),
    ("binary", "POST", "/rerank", bytes(range(256)), "application/json", 400, "invalid_json"),
    ("deep nesting", "POST", "/search", b"[" * 100000 + b"]" * 100000, "application/json", 400, "invalid_json"),
    ("wrong content type", "POST", "/search", b'{"query": "a"}', "text/plain", 415, "unsupported_media_type"),
    ("no content type", "POST", "/rerank", b'{"query": "a", "documents": ["x"]}', None, 415, "unsupported_media_type"),
    ("form body", "POST", "/v1/rerank", b"query=a", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ("latin-1 charset", "POST", "/search", b'{"query": "a"}', "application/json; charset=latin-1", 415, "unsupported_media_type"),
    ("empty body", "POST", "/search", b"", "application/json", 422, "validation_error"),
    ("json array", "POST", "/search", b"[1, 2]", "application/json", 422, "validation_error"),
    ("missing query", "POST", "/search", b'{"top_k": 5}', "application/json", 422, "validation_error"),
    ("query wrong type", "POST", "/search", b'{"query": 5}', "application/json", 422, "validation_error"),
    ("blank query", "POST", "/search", b'{"query": "   "}', "application/json", 422, "validation_error"),
    ("query too long", "POST", "/search", json.dumps({"query": LONG}).encode(), "application/json", 422, "validation_error"),
    ("top_k as string", "POST", "/search", b'{"query": "a", "top_k": "5"}', "application/json", 422, "validation_error"),
    ("top_k zero", "POST", "/search", b'{"query": "a", "top_k": 0}', "application/json", 422, "validation_error"),
    ("top_k above max", "POST", "/search", b'{"query": "a", "top_k": 1000000}', "application/json", 422, "validation_error"),
    ("top_n beyond pool", "POST", "/search", b'{"query": "a", "top_k": 2, "top_n": 50}', "application/json", 422, "validation_error"),
    ("unknown retriever", "POST", "/search", b'{"query": "a", "retrievers": ["splade"]}', "application/json", 422, "validation_error"),
    ("empty retrievers", "POST", "/search", b'{"query": "a", "retrievers": []}', "application/json", 422, "validation_error"),
    ("unknown field", "POST", "/search", b'{"query": "a", "topk": 5}', "application/json", 422, "validation_error"),
    ("bool as int", "POST", "/search", b'{"query": "a", "return_documents": 1}', "application/json", 422, "validation_error"),
    ("empty documents", "POST", "/rerank", b'{"query": "a", "documents": []}', "application/json", 422, "validation_error"),
    ("documents not a list", "POST", "/rerank", b'{"query": "a", "documents": "abc"}', "application/json", 422, "validation_error"),
    ("document wrong type", "POST", "/rerank", b'{"query": "a", "documents": [3]}', "application/json", 422, "validation_error"),
    ("document object without text", "POST", "/rerank", b'{"query": "a", "documents": [{"body": "x"}]}', "application/json", 422, "validation_error"),
    ("document too long", "POST", "/rerank", json.dumps({"query": "a", "documents": ["y" * 40000]}).encode(), "application/json", 422, "validation_error"),
    ("too many documents", "POST", "/rerank", json.dumps({"query": "a", "documents": ["d"] * 1001}).encode(), "application/json", 422, "validation_error"),
    ("top_n and top_k disagree", "POST", "/rerank", b'{"query": "a", "documents": ["x"], "top_n": 1, "top_k": 2}', "application/json", 422, "validation_error"),
    ("top_n zero", "POST", "/v1/rerank", b'{"query": "a", "documents": ["x"], "top_n": 0}', "application/json", 422, "validation_error"),
    ("max_tokens_per_doc zero", "POST", "/v1/rerank", b'{"query": "a", "documents": ["x"], "max_tokens_per_doc": 0}', "application/json", 422, "validation_error"),
    ("secret in wrong field", "POST", "/rerank", json.dumps({"query": "a", "documents": [{"text": 1, "note": SECRET}]}).encode(), "application/json", 422, "validation_error"),
    ("body too large", "POST", "/rerank", b'{"query": "' + b"a" * (9 * 1024 * 1024) + b'"}', "application/json", 413, "payload_too_large"),
    ("unknown path", "GET", "/nope", None, None, 404, "not_found"),
    ("wrong method", "GET", "/search", None, None, 405, "method_not_allowed"),
    ("wrong method rerank", "PUT", "/v1/rerank", b"{}", "application/json", 405, "method_not_allowed"),
]


@pytest.mark.parametrize("name,method,path,body,ctype,status,etype", ERROR_MATRIX, ids=[m[0] for m in ERROR_MATRIX])
def test_error_matrix(name, method, path, body, ctype, status, etype):
    app, backends, _ = make_app()
    headers = {"content-type": ctype} if ctype else {}
    r = call(app, method, path, content=body, headers=headers)
    assert_envelope(r, status, etype)
    assert SECRET not in r.text
    assert not backends.calls  # rejected before any stage is called


def test_body_limit_is_checked_while_streaming_without_content_length():
    app, _, _ = make_app(limits={"max_body_bytes": 2048})

    async def chunks():
        for _ in range(10):
            yield b" " * 1024  # whitespace: valid JSON padding, 10 KiB in total

    assert_envelope(call(app, "POST", "/search", content=chunks(), headers={"content-type": "application/json"}), 413, "payload_too_large")


def test_strict_json_loads_accepts_plain_json_and_rejects_constants():
    assert strict_json_loads(b'{"a": [1, 2.5, -3e2, "\xc3\xa9"]}') == {"a": [1, 2.5, -300.0, "é"]}
    for bad in (b"NaN", b"[Infinity]", b'{"x": -Infinity}', b"1e309", b"\xef\xbb\xbf{}", b"\x00"):
        with pytest.raises(Exception) as info:
            strict_json_loads(bad)
        assert getattr(info.value, "error_type", None) == "invalid_json"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(["query", "documents", "top_n", "top_k", "text", "retrievers", "return_documents", "x"]), c, max_size=5), max_leaves=12), path=st.sampled_from(["/search", "/rerank", "/v1/rerank"]))
def test_fuzzed_json_never_gets_a_5xx(payload, path):
    app = FUZZ_APP
    r = call(app, "POST", path, content=json.dumps(payload).encode(), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"type", "message"}


FUZZ_APP = make_app()[0]


# --------------------------------------------------------------------------- request models and client


def test_request_models_take_their_limits_from_config():
    cfg = parse_app_config({"index_dir": "/x", "limits": {"max_documents": 3, "max_query_chars": 10, "max_document_chars": 5}, "funnel": {"max_top_k": 7, "default_top_k": 5}}, use_env=False)
    models = build_request_models(cfg.limits, cfg.funnel)
    for model in (models.cohere_v1, models.cohere_v2):
        ok = model.model_validate({"query": "q", "documents": ["abcde", {"text": "fghij"}]})
        assert ok.texts() == ["abcde", "fghij"] and ok.limit() == 2
        for bad in ({"query": "q" * 11, "documents": ["a"]}, {"query": "q", "documents": ["a"] * 4}, {"query": "q", "documents": ["abcdef"]}):
            with pytest.raises(Exception):
                model.model_validate(bad)
    assert models.tei.model_validate({"query": "q", "texts": ["abcde"]}).texts() == ["abcde"]
    with pytest.raises(Exception):
        models.tei.model_validate({"query": "q", "texts": ["abcdef"]})
    assert models.search.model_validate({"query": "q", "top_k": 7}).top_k == 7
    with pytest.raises(Exception):
        models.search.model_validate({"query": "q", "top_k": 8})


def test_async_client_raises_typed_errors_with_the_envelope():
    app, _, _ = make_app()

    async def go() -> None:
        async with AsyncServeAppClient("http://test", api_key="k", transport=httpx.ASGITransport(app=app)) as c:
            assert (await c.health())["status"] == "ok"
            out = await c.rerank("gene", ["protein gene", "ocean"], top_n=1, return_documents=True)
            assert len(out["results"]) == 1 and "document" in out["results"][0]
            hits = await c.search("protein", top_n=2)
            assert len(hits["results"]) == 2
            with pytest.raises(ServeAppError) as info:
                await c.rerank("gene", [])
            assert info.value.status_code == 422 and info.value.type == "validation_error"
            assert info.value.envelope["error"]["type"] == "validation_error"

    asyncio.run(go())


class SlowStore:
    """A document store whose lookups of one query's candidates block their thread for a while."""

    def __init__(self, corpus, slow_ids, delay_s: float) -> None:
        self.corpus, self.slow_ids, self.delay_s = corpus, set(slow_ids), delay_s

    def get(self, doc_id):
        return self.corpus.get(doc_id)

    def get_many(self, doc_ids):
        if self.slow_ids & set(doc_ids):
            time.sleep(self.delay_s)  # a slow disk: blocks the calling thread
        return [self.corpus.get(d) for d in doc_ids]

    def __len__(self):
        return len(self.corpus)


def test_store_lookups_do_not_block_the_event_loop():
    """A request whose document lookup is slow does not hold up a concurrent request."""
    football = [d.id for d in CORPUS if "football" in d.content]
    store = SlowStore(CORPUS, football, delay_s=1.5)
    app, _, _ = service_app(FakeBackends(CORPUS), store)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            await c.post("/search", json={"query": "ocean", "retrievers": ["bm25"], "rerank_top_m": 0, "top_k": 5})  # warm-up (first-call imports)
            start = time.perf_counter()

            async def timed(query):
                r = await c.post("/search", json={"query": query, "retrievers": ["bm25"], "rerank_top_m": 0, "top_k": 5})
                return r, time.perf_counter() - start  # when it finished, from the start of both

            slow = asyncio.create_task(timed("football team"))
            await asyncio.sleep(0.2)  # the slow lookup is running
            fast, fast_s = await timed("ocean river")
            slow_r, slow_s = await slow
            return fast, fast_s, slow_r, slow_s

    fast, fast_s, slow_r, slow_s = asyncio.run(run())
    assert fast.status_code == 200 and slow_r.status_code == 200
    assert slow_s >= 1.5
    assert fast_s < 1.0 and fast_s < slow_s, f"a concurrent request finished after {fast_s:.2f} s, behind a slow lookup ({slow_s:.2f} s)"
