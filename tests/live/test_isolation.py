"""Isolation of scoped API keys, property-based: hypothesis writes documents across tenants,
then every key with a bound filter sends adversarial requests (filters that try to widen, other
collections' names, other tenants' ids on every route, writes over other tenants' documents).
No answer may contain or count a document the key may not see, and no write may touch one.

The stack is the real one in process (WriterServer, sharded BM25Server and DenseServer, the
ingress's SearchService and FastAPI app with its auth middleware), kept open across examples
on a background event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_app.filters import matches, parse_filter
from serve_app.serve.auth import parse_scoped_keys
from tests.live.conftest import build, docs
from tests.live.stack import live_stack, until_ready

FIELDS = {"tenant": "keyword", "year": "integer", "tags": "keywords"}
TENANTS = ["acme", "globex", "initech"]
ADMIN = "admin-key-0123456789abcdef"
KEYS_YAML = """
- {name: acme, key: acme-key-0123456789abcdef, operations: [search, write, rerank], filter: {tenant: acme}}
- {name: globex-recent, key: globex-key-0123456789abcdef, operations: [search, write], filter: {and: [{tenant: globex}, {year: {gte: 2015}}]}}
- {name: two-tenants, key: two-key-0123456789abcdef, operations: [search], filter: {tenant: {in: [acme, initech]}}}
- {name: reader-elsewhere, key: other-key-0123456789abcdef, operations: [search], collections: [papers], filter: {tenant: acme}}
"""
SCOPED = parse_scoped_keys(KEYS_YAML, "test", {"default": FIELDS, "papers": FIELDS})
BOUND = {scope.name: (key, scope.bound_filter("default")) for key, scope in SCOPED}
WIDENING = [
    None,
    {"not": {"tenant": "acme"}},
    {"or": [{"tenant": "globex"}, {"tenant": "initech"}, {"tenant": "acme"}]},
    {"tenant": {"exists": False}},
    {"tenant": {"in": TENANTS}},
    {"year": {"gte": 0}},
    {"or": [{"year": {"lt": 3000}}, {"not": {"year": {"lt": 3000}}}]},
]
WORDS = "protein cell gene ocean sea river football team music song space star planet food coffee".split()


class Stack:
    """The live stack on a background loop, called synchronously from hypothesis examples."""

    def __init__(self, index_dir: Any, dense: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cm = live_stack(index_dir, dense, shards={"bm25": 2, "dense": 2}, api_keys=[ADMIN, *SCOPED], fields=FIELDS)
        self.client, self.ns = self.run(self.cm.__aenter__())
        self.run(until_ready(self.client, 60))

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def call(self, method: str, path: str, key: str, **kw: Any) -> Any:
        return self.run(self.client.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kw))

    def close(self) -> None:
        self.run(self.cm.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_dense, tiny_encoder):
    base = [d.__class__(d.id, d.text, d.title, {"tenant": TENANTS[i % 3], "year": 1995 + i}) if i % 4 else d for i, d in enumerate(docs(30))]
    s = Stack(build(tmp_path_factory.mktemp("iso") / "idx", base, tiny_dense, tiny_encoder, shards={"bm25": 2, "dense": 2}), tiny_dense)
    s.truth = {d.id: dict(d.metadata) for d in base}  # id -> metadata of every live document
    yield s
    s.close()


document = st.fixed_dictionaries(
    {"id": st.sampled_from([f"w{i}" for i in range(12)] + ["doc001", "doc002", "doc005"]), "text": st.lists(st.sampled_from(WORDS), min_size=2, max_size=6).map(" ".join)},
    optional={"metadata": st.fixed_dictionaries({}, optional={"tenant": st.sampled_from(TENANTS), "year": st.integers(1990, 2030), "tags": st.lists(st.sampled_from(["x", "y"]), max_size=2)})},
)


def visible(truth: dict, bound: Any) -> set[str]:
    return {i for i, m in truth.items() if matches(bound, m)}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(batch=st.lists(document, min_size=1, max_size=5, unique_by=lambda d: d["id"]), query=st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join), widen=st.sampled_from(WIDENING), data=st.data())
def test_no_answer_contains_or_counts_a_document_the_key_may_not_see(stack, batch, query, widen, data):
    r = stack.call("POST", "/documents", ADMIN, json={"documents": batch, "refresh": "wait_for"})
    assert r.status_code == 200, r.text
    for d in batch:
        stack.truth[d["id"]] = dict(d.get("metadata") or {})
    all_ids = sorted(stack.truth)

    for name, (key, bound) in BOUND.items():
        mine = visible(stack.truth, bound)
        body: dict[str, Any] = {"query": query, "top_k": 40, "top_n": 20, "rerank_top_m": 10, "return_documents": True}
        if widen is not None:
            body["filter"] = widen
        reranked_before = len(stack.ns.backends.reranked)
        r = stack.call("POST", "/search", key, json=body)
        if name == "reader-elsewhere":  # sees only the papers collection: the default one does not exist for it
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
            continue
        assert r.status_code == 200, r.text
        answer = r.json()
        returned = {h["id"] for h in answer["results"]}
        assert returned <= mine, f"{name} saw {returned - mine}"
        for h in answer["results"]:
            assert matches(bound, h["metadata"])
        for stage in ("bm25", "dense", "fusion"):
            assert answer["stages"][stage]["candidates"] <= len(mine)
        # the reranker read admitted documents only (the head it reranks is within top_n here)
        contents = {f"{h['title']} {h['text']}" if h["title"] else h["text"] for h in answer["results"]}
        for request in stack.ns.backends.reranked[reranked_before:]:
            assert set(request.documents) <= contents
        # the whole search ran with the key's filter: every retriever call carried it
        for f in stack.ns.backends.filters[-2:]:
            assert f is not None and all(matches(bound, m) for m in stack.truth.values() if matches(f, m))

        # GET /documents/{id} of every id: another tenant's document is "not found", as an absent one
        for doc_id in data.draw(st.lists(st.sampled_from(all_ids), min_size=3, max_size=6, unique=True)) + ["never-written"]:
            g = stack.call("GET", f"/documents/{doc_id}", key)
            if doc_id in mine:
                assert g.status_code == 200 and g.json()["id"] == doc_id
            else:
                assert g.status_code == 404 and g.json() == {"error": {"type": "document_not_found", "message": "no document with this id (it was never written, or it was deleted)"}}

        # other collections: the same 404 as a collection that does not exist
        for path in ("/collections/papers/search", "/collections/nope/search"):
            p = stack.call("POST", path, key, json={"query": query})
            assert p.status_code == 404 and p.json()["error"]["type"] == "not_found"

        # writes over other tenants' documents: refused or reported absent, never applied
        others = sorted(set(stack.truth) - mine)
        if "write" in next(s for _, s in SCOPED if s.name == name).operations and others:
            target = data.draw(st.sampled_from(others))
            before = stack.call("GET", f"/documents/{target}", ADMIN).json()
            w = stack.call("POST", "/documents", key, json={"documents": [{"id": target, "text": "overwritten", "metadata": {"tenant": "acme", "year": 2020}}], "refresh": "wait_for"})
            assert w.status_code == 403 and w.json()["error"]["type"] == "forbidden"
            d = stack.call("DELETE", "/documents", key, json={"ids": [target], "refresh": "wait_for"})
            assert d.status_code == 200 and d.json()["absent"] == [target] and d.json()["deleted"] == []
            assert stack.call("GET", f"/documents/{target}", ADMIN).json() == before
            # a document written outside the key's own filter is refused
            w = stack.call("POST", "/documents", key, json={"documents": [{"id": "escape", "text": "x y", "metadata": {"tenant": "initech"}}]})
            assert w.status_code == 403


def test_rerank_routes_return_only_the_documents_sent(stack):
    key, _ = BOUND["acme"]
    sent = ["protein cell", "ocean sea", "music song"]
    r = stack.call("POST", "/v2/rerank", key, json={"query": "protein", "documents": sent, "return_documents": True})
    assert r.status_code == 200 and {x["document"]["text"] for x in r.json()["results"]} <= set(sent)
    r = stack.call("POST", "/v1/rerank", BOUND["two-tenants"][0], json={"query": "protein", "documents": sent})
    assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden"  # not in its operations


def test_operations_outside_the_scope_are_forbidden_and_admin_sees_all(stack):
    reader, _ = BOUND["two-tenants"]
    assert stack.call("POST", "/documents", reader, json={"documents": [{"id": "r", "text": "a b", "metadata": {"tenant": "acme"}}]}).status_code == 403
    assert stack.call("GET", "/info", reader).status_code == 403
    info = stack.call("GET", "/info", ADMIN).json()
    assert info["auth"]["key"] == "api_key" and info["collections"] == ["default"]
    r = stack.call("POST", "/search", reader, json={"query": "protein", "filter": {"owner": "x"}})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_filter" and "filter.owner" in r.json()["error"]["message"]
    bad = stack.call("POST", "/documents", ADMIN, json={"documents": [{"id": "b", "text": "a b", "metadata": {"year": "2019"}}]})
    assert bad.status_code == 422 and "documents[0].metadata.year" in bad.json()["error"]["message"]
    assert stack.call("GET", "/documents/b", ADMIN).status_code == 404  # nothing was written


def test_filtered_search_equals_the_same_search_over_the_admitted_documents(stack):
    """A filter narrows without changing scores: the filtered bm25 list is the unfiltered
    list (deep enough) restricted to the admitted documents."""
    flt = {"tenant": "globex"}
    node = parse_filter(flt, FIELDS)
    full = stack.call("POST", "/search", ADMIN, json={"query": "protein cell gene", "retrievers": ["bm25"], "top_k": 100, "top_n": 100, "rerank_top_m": 0, "return_documents": True}).json()
    narrowed = stack.call("POST", "/search", ADMIN, json={"query": "protein cell gene", "retrievers": ["bm25"], "top_k": 5, "top_n": 5, "rerank_top_m": 0, "filter": flt}).json()
    expected = [h["id"] for h in full["results"] if matches(node, h["metadata"])][:5]
    assert [h["id"] for h in narrowed["results"]] == expected and len(expected) == min(5, sum(matches(node, h["metadata"]) for h in full["results"]))
