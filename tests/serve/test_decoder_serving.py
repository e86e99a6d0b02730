"""A decoder reranker (kind causal_lm) served over HTTP in process: /v1/rerank, /v2/rerank, the
TEI shape and /search, with per-request instructions, next to a classification cross-encoder
in the same application; /info shows each model's family, runtime and drift."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from serve_fakes import ServerBackends, asgi_request, small_corpus

from serve_app.rerank import Reranker, RerankRequest
from serve_app.serve.config import RerankerServerConfig, parse_app_config
from serve_app.serve.deployments import RerankerServer
from serve_app.serve.http import create_app
from serve_app.serve.service import SearchService

pytestmark = pytest.mark.slow

CORPUS = small_corpus(30)
QUERY = "protein gene study"
DOCS = ["protein cell gene dna study", "ocean sea river water", "football team player", "space star planet moon"]
MINE = "Find passages about sport"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_cross_encoder_dir):
    from serve_app.testing import build_tiny_decoder_reranker

    decoder = str(build_tiny_decoder_reranker(tmp_path_factory.mktemp("dec"), seed=0))
    reranker = {
        "model": decoder,
        "kind": "causal_lm",
        "device": "cpu",
        "max_length": 160,
        "activation": "sigmoid",
        "models": {"ce": {"model": str(tiny_cross_encoder_dir), "device": "cpu"}, "dec-onnx": {"model": decoder, "backend": "onnx", "activation": "sigmoid"}},
    }
    cfg = parse_app_config({"index_dir": "/nonexistent", "reranker": reranker}, use_env=False)
    backends = ServerBackends(CORPUS)
    backends.server = RerankerServer(RerankerServerConfig(reranker=cfg.reranker))
    direct = {name: Reranker.from_config(c) for name, c in cfg.reranker.catalog().items()}
    return create_app(SearchService(cfg, backends, CORPUS, {}), api_keys=[]), backends, direct


def call(app, method: str, path: str, body=None) -> httpx.Response:
    return asgi_request(app, method, path, json=body, base_url="http://t")


def test_v1_rerank_serves_the_decoder_with_its_instruction(stack):
    app, _, direct = stack
    for body_extra, instruction in (({}, None), ({"instruction": MINE}, MINE)):
        r = call(app, "POST", "/v1/rerank", {"query": QUERY, "documents": DOCS, **body_extra})
        assert r.status_code == 200, r.text
        want = direct["default"].rerank_many([RerankRequest(QUERY, DOCS, instruction=instruction)])[0]
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        np.testing.assert_allclose([got[i] for i in range(len(DOCS))], want, atol=1e-5)
        assert all(0 < s < 1 for s in got.values())  # P(yes)
        assert [x["index"] for x in r.json()["results"]] == list(np.argsort(-want, kind="stable"))
    default = call(app, "POST", "/v1/rerank", {"query": QUERY, "documents": DOCS}).json()["results"]
    custom = call(app, "POST", "/v1/rerank", {"query": QUERY, "documents": DOCS, "instruction": MINE}).json()["results"]
    assert [x["relevance_score"] for x in default] != [x["relevance_score"] for x in custom]


def test_v2_and_tei_shapes_take_the_instruction(stack):
    app, _, direct = stack
    want = direct["default"].rerank_many([RerankRequest(QUERY, DOCS, instruction=MINE)])[0]
    v2 = call(app, "POST", "/v2/rerank", {"model": "default", "query": QUERY, "documents": DOCS, "instruction": MINE}).json()
    np.testing.assert_allclose(sorted(x["relevance_score"] for x in v2["results"]), sorted(want), atol=1e-5)
    tei = call(app, "POST", "/rerank", {"query": QUERY, "texts": DOCS, "instruction": MINE, "raw_scores": True}).json()
    np.testing.assert_allclose([x["score"] for x in sorted(tei, key=lambda x: x["index"])], want, atol=1e-5)


def test_exported_decoder_serves_the_same_scores(stack):
    app, _, direct = stack
    r = call(app, "POST", "/v1/rerank", {"model": "dec-onnx", "query": QUERY, "documents": DOCS, "instruction": MINE})
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    want = direct["default"].rerank_many([RerankRequest(QUERY, DOCS, instruction=MINE)])[0]
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], want, atol=1e-4)


def test_search_reranks_with_the_decoder(stack):
    app, backends, direct = stack
    r = call(app, "POST", "/search", {"query": QUERY, "top_k": 10, "rerank_top_m": 6, "top_n": 6, "instruction": MINE})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["degraded"] is False
    sent = backends.requests[-1]
    assert sent.instruction == MINE and sent.model is None and len(sent.documents) == 6
    want = direct["default"].rerank_many([RerankRequest(QUERY, list(sent.documents), instruction=MINE)])[0]
    served = [h["rerank_score"] for h in out["results"]]
    np.testing.assert_allclose(served, sorted(want, reverse=True), atol=1e-5)  # every reranked head, best first


def test_instruction_for_a_model_without_a_prompt_is_a_422(stack):
    app, _, _ = stack
    for path, body in (
        ("/v1/rerank", {"model": "ce", "query": QUERY, "documents": DOCS, "instruction": MINE}),
        ("/v2/rerank", {"model": "ce", "query": QUERY, "documents": DOCS, "instruction": MINE}),
        ("/search", {"query": QUERY, "reranker": "ce", "instruction": MINE}),
    ):
        r = call(app, "POST", path, body)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["type"] == "validation_error" and "decoder rerankers" in r.json()["error"]["message"]
    r = call(app, "POST", "/v1/rerank", {"query": QUERY, "documents": DOCS, "instruction": "   "})
    assert r.status_code == 422 and "instruction" in r.json()["error"]["message"]
    # without an instruction the cross-encoder answers as before
    assert call(app, "POST", "/v1/rerank", {"model": "ce", "query": QUERY, "documents": DOCS}).status_code == 200


def test_info_shows_family_runtime_and_drift(stack):
    app, _, _ = stack
    call(app, "POST", "/v1/rerank", {"model": "dec-onnx", "query": QUERY, "documents": DOCS})  # loads it
    info = call(app, "GET", "/info").json()["rerankers"]
    assert info["models"]["default"]["kind"] == "causal_lm" and info["models"]["dec-onnx"]["backend"] == "onnx"
    runtime = info["runtime"]
    assert runtime["default"]["kind"] == "causal_lm" and runtime["default"]["backend"] == "torch" and runtime["default"]["drift"] is None
    onnx = runtime["dec-onnx"]
    assert onnx["backend"] == "onnx" and onnx["dtype"] == "float32" and onnx["drift"]["runtime"] == "onnx-float32"
    assert onnx["drift"]["max_abs_diff"] < 1e-4 and onnx["drift"]["kendall_tau"] == 1.0


def test_a_query_too_long_for_the_prompt_is_a_413(stack):
    app, _, _ = stack
    long_query = " ".join(["protein gene cell study results"] * 20)  # 100 tokens + the prompt > max_length 160
    r = call(app, "POST", "/v1/rerank", {"query": long_query, "documents": DOCS})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "input_too_long" and "never cut" in r.json()["error"]["message"]


def test_python_client_sends_the_instruction(stack):
    from serve_app.client import AsyncServeAppClient, ServeAppError

    app, backends, direct = stack
    want = direct["default"].rerank_many([RerankRequest(QUERY, DOCS, instruction=MINE)])[0]

    async def go():
        async with AsyncServeAppClient("http://t", transport=httpx.ASGITransport(app=app)) as c:
            v1 = await c.rerank(QUERY, DOCS, instruction=MINE)
            v2 = await c.rerank_v2(QUERY, DOCS, instruction=MINE)
            tei = await c.rerank_tei(QUERY, DOCS, raw_scores=True, instruction=MINE)
            await c.search(QUERY, rerank_top_m=3, instruction=MINE)
            with pytest.raises(ServeAppError) as bad:
                await c.rerank(QUERY, DOCS, model="ce", instruction=MINE)
            return v1, v2, tei, bad.value

    v1, v2, tei, bad = asyncio.run(go())
    for got in ({r["index"]: r["relevance_score"] for r in v1["results"]}, {r["index"]: r["relevance_score"] for r in v2["results"]}):
        np.testing.assert_allclose([got[i] for i in range(len(DOCS))], want, atol=1e-5)
    np.testing.assert_allclose([r["score"] for r in sorted(tei, key=lambda r: r["index"])], want, atol=1e-5)
    assert backends.requests[-2].instruction == MINE  # the /search call (the refused one came after it)
    assert bad.status_code == 422 and bad.type == "validation_error" and "decoder rerankers" in bad.message
