"""Rerank behind the gateways RAG stacks use: LiteLLM's ``rerank()`` over real HTTP, unmodified,
for every provider whose reference API serve_app serves, and each flavour's exact answer.

The application runs in uvicorn on 127.0.0.1 (no Ray: the reranker server is in process); the
LiteLLM version is part of every test id and printed, so a failure names the client it broke.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import threading
import time
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM would fetch its price list at import

import numpy as np
import pytest
import uvicorn
from conftest import free_port
from serve_fakes import ServerBackends, asgi_request, small_corpus

from serve_app.rerank import Reranker
from serve_app.serve import metrics
from serve_app.serve.auth import operation_of
from serve_app.serve.config import RerankerServerConfig, parse_app_config
from serve_app.serve.deployments import RerankerServer
from serve_app.serve.flavours import FLAVOURS
from serve_app.serve.http import create_app
from serve_app.serve.service import SearchService

LITELLM = importlib.metadata.version("litellm")
CORPUS = small_corpus(20)
QUERY = "protein gene study"
DOCS = ["protein cell gene dna study", "ocean sea river water", "football team player", "space star planet moon", "music song album band"]
KEY = "gateway-test-key"


class Served:
    """The application in uvicorn on a free loopback port, stopped on close."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.base = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def stack(tiny_cross_encoder_dir):
    cfg = parse_app_config({"index_dir": "/nonexistent", "reranker": {"model": str(tiny_cross_encoder_dir), "device": "cpu"}}, use_env=False)
    backends = ServerBackends(CORPUS)
    backends.server = RerankerServer(RerankerServerConfig(reranker=cfg.reranker))
    service = SearchService(cfg, backends, CORPUS, {})
    open_app, keyed_app = create_app(service, api_keys=[]), create_app(service, api_keys=[KEY])
    servers = {"open": Served(open_app), "keyed": Served(keyed_app)}
    direct = Reranker.from_config(cfg.reranker.catalog()["default"])
    yield {"servers": servers, "app": open_app, "raw": [float(x) for x in direct.rerank(QUERY, DOCS)]}
    for s in servers.values():
        s.close()


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# provider, path appended to the application's URL for api_base, scores answered (raw: the
# model's; relevance: in (0, 1)); every provider of LiteLLM whose reference API serve_app speaks.
PROVIDERS = [
    ("cohere", "", "raw"),
    ("cohere", "/cohere", "relevance"),
    ("azure_ai", "/cohere", "relevance"),
    ("together_ai", "/v1", "raw"),
    ("together_ai", "/cohere/v1", "relevance"),
    ("jina_ai", "", "raw"),
    ("infinity", "/infinity", "relevance"),
    ("huggingface", "", "relevance"),
    ("huggingface", "/tei", "relevance"),
    ("hosted_vllm", "", "raw"),
    ("hosted_vllm", "/vllm", "relevance"),
    ("hosted_vllm", "/vllm/v1", "relevance"),
]


def _litellm_rerank(provider: str, api_base: str, api_key: str, top_n: int = 3) -> Any:
    import litellm

    litellm.suppress_debug_info = True
    return litellm.rerank(model=f"{provider}/default", api_base=api_base, api_key=api_key, query=QUERY, documents=DOCS, top_n=top_n, return_documents=True)


@pytest.mark.parametrize("auth", ["no-key", "key"])
@pytest.mark.parametrize("provider,path,scores", PROVIDERS, ids=[f"{p}{path or '@base'}-litellm-{LITELLM}" for p, path, _ in PROVIDERS])
def test_litellm_rerank_through_every_provider(stack, provider, path, scores, auth):
    print(f"litellm {LITELLM}: {provider} -> {path or '/'}")
    server = stack["servers"]["keyed" if auth == "key" else "open"]
    out = _litellm_rerank(provider, server.base + path, KEY if auth == "key" else "unused-locally")
    raw = stack["raw"]
    order = sorted(range(len(DOCS)), key=lambda i: (-raw[i], i))[:3]
    want = [raw[i] if scores == "raw" else sigmoid(raw[i]) for i in order]
    results = list(out.results)
    assert [r["index"] for r in results] == order
    assert [r["relevance_score"] for r in results] == pytest.approx(want, abs=1e-4)
    assert [r["document"]["text"] for r in results] == [DOCS[i] for i in order]
    if auth == "key":  # the same call with a wrong key is refused, as the client expects (401)
        with pytest.raises(Exception) as refused:
            _litellm_rerank(provider, server.base + path, "wrong-key")
        assert getattr(refused.value, "status_code", None) == 401, refused.value


# --------------------------------------------------------------------------- each flavour's exact answer


def post(app: Any, path: str, body: Any) -> Any:
    return asgi_request(app, "POST", path, json=body, base_url="http://t")


def _order(stack: Any) -> list[int]:
    raw = stack["raw"]
    return sorted(range(len(DOCS)), key=lambda i: (-raw[i], i))


def test_infinity_answers_document_as_a_string(stack):
    app, order = stack["app"], _order(stack)
    out = post(app, "/infinity/rerank", {"query": QUERY, "documents": DOCS, "return_documents": True, "top_n": 2}).json()
    assert set(out) == {"object", "results", "model", "usage", "id", "created"} and out["object"] == "rerank"
    assert isinstance(out["created"], int) and out["id"].startswith("infinity-") and out["model"] == "default"
    assert set(out["usage"]) == {"prompt_tokens", "total_tokens"} and out["usage"]["total_tokens"] > 0
    assert [(r["index"], r["document"]) for r in out["results"]] == [(i, DOCS[i]) for i in order[:2]]
    assert all(set(r) == {"relevance_score", "index", "document"} for r in out["results"])
    assert [r["relevance_score"] for r in out["results"]] == pytest.approx([sigmoid(stack["raw"][i]) for i in order[:2]], abs=1e-5)
    bare = post(app, "/infinity/v1/rerank", {"query": QUERY, "documents": DOCS, "raw_scores": True}).json()
    assert [r["document"] for r in bare["results"]] == [None] * len(DOCS)  # null, as infinity answers
    assert [r["relevance_score"] for r in bare["results"]] == pytest.approx([stack["raw"][i] for i in order], abs=1e-4)


def test_vllm_answers_every_document_as_an_object(stack):
    app, order = stack["app"], _order(stack)
    for path in ("/vllm/rerank", "/vllm/v1/rerank", "/vllm/v2/rerank"):
        out = post(app, path, {"model": "default", "query": QUERY, "documents": DOCS, "top_n": 0}).json()
        assert set(out) == {"id", "model", "usage", "results"} and set(out["usage"]) == {"total_tokens"}, path
        assert [(r["index"], r["document"]) for r in out["results"]] == [(i, {"text": DOCS[i]}) for i in order]  # top_n 0: all
        assert all(set(r) == {"index", "document", "relevance_score"} for r in out["results"])
    assert len(post(app, "/vllm/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2}).json()["results"]) == 2


def test_jina_returns_documents_by_default(stack):
    app, order = stack["app"], _order(stack)
    out = post(app, "/jina/v1/rerank", {"model": "default", "query": QUERY, "documents": [DOCS[0], {"text": DOCS[1]}, *DOCS[2:]], "top_n": 2}).json()
    assert set(out) == {"model", "usage", "results"} and set(out["usage"]) == {"total_tokens"}
    assert [(r["index"], r["document"]) for r in out["results"]] == [(i, {"text": DOCS[i]}) for i in order[:2]]
    without = post(app, "/jina/v1/rerank", {"query": QUERY, "documents": DOCS, "return_documents": False}).json()
    assert all(set(r) == {"index", "relevance_score"} for r in without["results"])


def test_cohere_prefix_answers_without_extensions(stack):
    app, order = stack["app"], _order(stack)
    for version in ("1", "2"):
        out = post(app, f"/cohere/v{version}/rerank", {"model": "default", "query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": True}).json()
        assert set(out) == {"id", "results", "meta"} and out["meta"] == {"api_version": {"version": version}, "billed_units": {"search_units": 1}}
        assert [(r["index"], r["document"]) for r in out["results"]] == [(i, {"text": DOCS[i]}) for i in order[:2]]
    strict = post(app, "/cohere/v2/rerank", {"query": QUERY, "documents": DOCS, "colour": "red"})
    assert strict.status_code == 422 and "colour" in strict.json()["message"]  # Cohere's routes stay strict


def test_tei_honours_top_n_and_ignores_what_it_does_not_know(stack, monkeypatch, caplog):
    app, order = stack["app"], _order(stack)
    counted: list[tuple[str, int]] = []
    monkeypatch.setattr(metrics, "count_ignored_fields", lambda api, n: counted.append((api, n)))
    caplog.set_level(logging.DEBUG, logger="serve_app.serve.http")
    secret = "value-never-logged"
    for path, api in (("/rerank", "rerank"), ("/tei/rerank", "tei")):
        r = post(app, path, {"query": QUERY, "texts": DOCS, "top_n": 2, "colour": secret, "documents": DOCS, "raw_scores": False})
        assert r.status_code == 200, r.text
        assert [x["index"] for x in r.json()] == order[:2]
        assert counted[-1] == (api, 2)  # colour and documents
    assert "colour" in caplog.text and secret not in caplog.text
    for path in ("/infinity/rerank", "/vllm/rerank", "/jina/v1/rerank", "/rerank"):  # a Cohere-shaped body too
        assert post(app, path, {"query": QUERY, "documents": DOCS, "colour": secret}).status_code == 200, path
    assert [api for api, _ in counted[-4:]] == ["infinity", "vllm", "jina", "rerank"]
    assert post(app, "/search", {"query": QUERY, "colour": 1}).status_code == 422  # serve_app's own API stays strict


@pytest.mark.parametrize(
    "path,body,where",
    [
        ("/tei/rerank", {"query": QUERY, "texts": DOCS, "top_n": 0}, "top_n"),
        ("/tei/rerank", {"query": QUERY, "texts": [1]}, "texts"),
        ("/infinity/rerank", {"query": QUERY, "documents": [{"text": "a"}]}, "documents"),
        ("/infinity/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0}, "top_n"),
        ("/vllm/rerank", {"query": QUERY, "documents": DOCS, "top_n": -1}, "top_n"),
        ("/vllm/v1/rerank", {"query": "  ", "documents": DOCS}, "query"),
        ("/jina/v1/rerank", {"query": QUERY, "documents": []}, "documents"),
        ("/jina/v1/rerank", {"query": QUERY, "documents": DOCS, "return_documents": "yes"}, "return_documents"),
        ("/infinity/rerank", {"query": QUERY, "documents": DOCS, "model": "nope"}, "available models"),
    ],
)
def test_flavours_refuse_wrong_types_with_the_envelope(stack, path, body, where):
    r = post(stack["app"], path, body)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()
    assert set(err) == {"error", "message"} and where in err["error"]["message"], err


def test_flavour_routes_need_the_rerank_scope():
    for f in FLAVOURS:
        for path, _ in f.routes:
            assert operation_of("POST", f.prefix + path) == "rerank"
    assert operation_of("POST", "/nowhere/rerank") is None
