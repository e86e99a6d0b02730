"""Every rerank API clients speak, over HTTP in process (no Ray), against real (tiny) models.

The ingress runs as in production (SearchService behind the FastAPI app); its reranker is the
real RerankerServer, with three test-built cross-encoders of different sizes: the default, a
``small`` and a ``large`` one (``rerank-v3.5`` is an alias of ``large``). Cohere's v1 and v2
shapes are driven through the ``cohere`` SDK itself; Jina's and Text Embeddings Inference's
through requests built from their published API references.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Optional

import httpx
import numpy as np
import pytest
from serve_fakes import ServerBackends, asgi_request, small_corpus

from serve_app.config import CrossEncoderConfig
from serve_app.rerank import Reranker
from serve_app.serve.config import RerankerServerConfig, parse_app_config
from serve_app.serve.deployments import RerankerServer
from serve_app.serve.http import create_app
from serve_app.serve.service import SearchService
from serve_app.testing import build_tiny_cross_encoder
from serve_app.types import RerankRequest

CORPUS = small_corpus(40)
QUERY = "protein gene study"
DOCS = ["protein cell gene dna study", "ocean sea river water", "football team player", "space star planet moon", "music song album band"]
LONG = " ".join(["protein gene cell study results"] * 40) + " ocean water"  # ~200 tokens, beyond the tiny models' 128


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_cross_encoder_dir) -> dict[str, str]:
    small = build_tiny_cross_encoder(tmp_path_factory.mktemp("ce-small"), seed=3, hidden_size=16, num_hidden_layers=1)
    large = build_tiny_cross_encoder(tmp_path_factory.mktemp("ce-large"), seed=4, hidden_size=48, num_hidden_layers=3)
    return {"default": str(tiny_cross_encoder_dir), "small": str(small), "large": str(large)}


def reranker_args(model_dirs: dict[str, str], max_models: int = 2) -> dict[str, Any]:
    return {
        "model": model_dirs["default"],
        "device": "cpu",
        "chunk_tokens": 48,  # windows that fit the tiny models' 128 positions (max_chunks_per_doc)
        "chunk_stride": 32,
        "models": {"small": {"model": model_dirs["small"], "device": "cpu", "max_length": 64}, "large": {"model": model_dirs["large"], "device": "cpu", "activation": "sigmoid"}},
        "aliases": {"rerank-v3.5": "large"},
        "max_models_per_replica": max_models,
    }


@pytest.fixture(scope="module")
def stack(model_dirs):
    cfg = parse_app_config({"index_dir": "/nonexistent", "reranker": reranker_args(model_dirs), "limits": {"max_documents": 20}}, use_env=False)
    backends = ServerBackends(CORPUS)
    backends.server = RerankerServer(RerankerServerConfig(reranker=cfg.reranker))
    return create_app(SearchService(cfg, backends, CORPUS, {}), api_keys=[]), backends, cfg


@pytest.fixture(scope="module")
def direct(stack) -> dict[str, Reranker]:
    """Each configured model on its own, as a library user would load it."""
    cfg = stack[2]
    return {name: Reranker.from_config(c) for name, c in cfg.reranker.catalog().items()}


def post(app, path: str, body: Any) -> httpx.Response:
    return asgi_request(app, "POST", path, json=body, base_url="http://t")


def cohere_client(app, version: int) -> Any:
    """The cohere SDK's async client, pointed at the app (base URL swapped, as a user would)."""
    import cohere

    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t")
    cls = cohere.AsyncClientV2 if version == 2 else cohere.AsyncClient
    return cls(api_key="unused-locally", base_url="http://t", httpx_client=http)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- Cohere v2


def test_cohere_v2_sdk_reranks_with_the_named_model(stack, direct):
    app, _, _ = stack

    async def go():
        client = cohere_client(app, 2)
        return [await client.rerank(model=m, query=QUERY, documents=DOCS, top_n=3) for m in ("large", "rerank-v3.5", "small")]

    large, alias, small = asyncio.run(go())
    for response, name in ((large, "large"), (alias, "large"), (small, "small")):
        want = direct[name].rerank(QUERY, DOCS)
        order = list(np.argsort(-want, kind="stable")[:3])
        assert [r.index for r in response.results] == order
        assert [r.relevance_score for r in response.results] == pytest.approx([float(want[i]) for i in order], abs=1e-4)
        assert response.meta.api_version.version == "2" and response.meta.billed_units.search_units == 1
        assert isinstance(response.id, str) and response.id
    assert all(0 < r.relevance_score < 1 for r in large.results)  # activation: sigmoid, as Cohere scores
    assert [r.index for r in large.results] != [r.index for r in small.results] or large.results[0].relevance_score != small.results[0].relevance_score


def test_cohere_v2_sdk_sees_the_documented_errors(stack):
    import cohere

    app, backends, _ = stack

    async def call(**kwargs):
        return await cohere_client(app, 2).rerank(**{"model": "small", "query": QUERY, "documents": DOCS, **kwargs})

    with pytest.raises(cohere.NotFoundError) as nf:
        asyncio.run(call(model="rerank-english-v2.0"))
    assert nf.value.status_code == 404 and "available models: default, small, large, rerank-v3.5" in nf.value.body["message"]
    assert nf.value.body["error"]["type"] == "model_not_found"
    with pytest.raises(cohere.UnprocessableEntityError) as bad:
        asyncio.run(call(documents=[]))
    assert "documents" in bad.value.body["message"] and bad.value.body["error"]["type"] == "validation_error"
    with pytest.raises(cohere.UnprocessableEntityError):
        asyncio.run(call(documents=["x"] * 21))  # beyond limits.max_documents
    backends.faults["reranker"] = "overloaded"
    try:
        with pytest.raises(cohere.TooManyRequestsError) as busy:
            asyncio.run(call())
        assert busy.value.headers["retry-after"] == "2" and busy.value.body["error"]["type"] == "overloaded"
    finally:
        backends.faults.clear()


@pytest.mark.parametrize(
    "body,where",
    [
        ({"query": QUERY, "documents": [3]}, "documents.0"),
        ({"query": QUERY, "documents": DOCS, "top_n": "2"}, "top_n"),
        ({"query": QUERY, "documents": [{"text": "a", "title": "b"}]}, "title"),  # v2 objects carry `text` only
        ({"query": "", "documents": DOCS}, "query"),
        ({"documents": DOCS}, "query"),
        ({"query": QUERY, "documents": DOCS, "max_tokens_per_doc": 0}, "max_tokens_per_doc"),
    ],
)
def test_cohere_v2_rejects_bad_requests_with_the_envelope_and_a_top_level_message(stack, body, where):
    r = post(stack[0], "/v2/rerank", body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert set(err) == {"error", "message"} and err["error"]["type"] == "validation_error" and where in err["message"]


# --------------------------------------------------------------------------- Cohere v1 and Jina


def test_cohere_v1_sdk_ranks_object_documents_on_their_rank_fields(stack, direct):
    app, _, _ = stack
    docs = [{"title": "Gene study", "text": "protein cell dna", "year": 2021}, {"title": "Tides", "text": "ocean sea water", "year": 1999}, {"title": "Cup final", "text": "football team", "year": 2010}]

    async def go():
        return await cohere_client(app, 1).rerank(model="small", query=QUERY, documents=docs, rank_fields=["title", "text"], return_documents=True, top_n=2)

    response = asyncio.run(go())
    ranked = [f"title: {d['title']}\ntext: {d['text']}" for d in docs]
    want = direct["small"].rerank(QUERY, ranked)
    order = list(np.argsort(-want, kind="stable")[:2])
    assert [r.index for r in response.results] == order
    assert [r.relevance_score for r in response.results] == pytest.approx([float(want[i]) for i in order], abs=1e-4)
    assert [r.document.text for r in response.results] == [docs[i]["text"] for i in order]  # the document as sent
    assert response.meta.api_version.version == "1"
    # One rank field: that field's text alone.
    only_title = post(app, "/v1/rerank", {"query": QUERY, "documents": docs, "rank_fields": ["title"], "model": "small"}).json()
    want = direct["small"].rerank(QUERY, [d["title"] for d in docs])
    assert {r["index"]: r["relevance_score"] for r in only_title["results"]} == pytest.approx({i: float(want[i]) for i in range(3)}, abs=1e-4)
    # A ranked field that is missing or not a string is the client's mistake.
    for bad, message in (({"rank_fields": ["author"]}, "documents[0] has no field 'author'"), ({"rank_fields": ["year"]}, "documents[0].year must be a string")):
        r = post(app, "/v1/rerank", {"query": QUERY, "documents": docs, **bad})
        assert r.status_code == 422 and message in r.json()["message"], r.text


def test_cohere_v1_max_chunks_per_doc_scores_the_best_window(stack, direct):
    app, _, _ = stack
    doc = " ".join(["ocean sea river water"] * 30) + " " + " ".join(["protein gene cell"] * 4)  # the match is in the tail
    body = {"query": "protein gene", "documents": [doc, "ocean water"]}
    chunked = post(app, "/v1/rerank", {**body, "max_chunks_per_doc": 8}).json()
    plain = post(app, "/v1/rerank", body).json()
    want = direct["default"].rerank_many([RerankRequest("protein gene", [doc, "ocean water"], max_chunks=8)])[0]
    got = {r["index"]: r["relevance_score"] for r in chunked["results"]}
    assert got == pytest.approx({0: float(want[0]), 1: float(want[1])}, abs=1e-4)
    assert got[0] != pytest.approx({r["index"]: r["relevance_score"] for r in plain["results"]}[0], abs=1e-4)
    assert chunked["meta"]["billed_units"]["search_units"] == 1


def test_jina_clients_get_model_and_usage(stack, direct):
    """Jina's rerank API (POST /v1/rerank): model, query, documents (strings or {text}), top_n,
    return_documents; the answer carries model, usage.total_tokens and results with document."""
    app, _, _ = stack
    body = {"model": "small", "query": QUERY, "documents": [DOCS[0], {"text": DOCS[1]}, DOCS[2]], "top_n": 2, "return_documents": True}
    r = post(app, "/v1/rerank", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "small"
    texts = DOCS[:3]
    want = direct["small"].rerank(QUERY, texts)
    order = list(np.argsort(-want, kind="stable")[:2])
    assert [(x["index"], x["document"]) for x in out["results"]] == [(i, {"text": texts[i]}) for i in order]
    scorer = direct["small"].scorer
    tokens = sum(len(f["input_ids"]) for f in scorer.pairs.features([(QUERY, t) for t in texts], scorer.pairs.limits(3, None)))
    assert out["usage"] == {"total_tokens": tokens}
    assert post(app, "/v1/rerank", {**body, "model": None})  # model omitted: the default one answers
    assert post(app, "/v1/rerank", {k: v for k, v in body.items() if k != "model"}).json()["model"] == "default"


# --------------------------------------------------------------------------- Text Embeddings Inference


def test_tei_shape_on_rerank(stack, direct):
    """TEI's POST /rerank: {query, texts, raw_scores, return_text, truncate, truncation_direction} ->
    [{index, score, text?}] best first, a sigmoid over the raw score unless raw_scores."""
    app, _, _ = stack
    raw = direct["default"].rerank(QUERY, DOCS)
    order = list(np.argsort(-raw, kind="stable"))
    r = post(app, "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True})
    assert r.status_code == 200, r.text
    ranks = r.json()
    assert isinstance(ranks, list) and [x["index"] for x in ranks] == order
    assert [x["score"] for x in ranks] == pytest.approx([sigmoid(float(raw[i])) for i in order], abs=1e-5)
    assert [x["text"] for x in ranks] == [DOCS[i] for i in order]
    plain = post(app, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    assert [x["score"] for x in plain] == pytest.approx([float(raw[i]) for i in order], abs=1e-4) and all(set(x) == {"index", "score"} for x in plain)
    # A Cohere-shaped body on /rerank keeps working.
    cohere = post(app, "/rerank", {"query": QUERY, "documents": DOCS}).json()
    assert set(cohere) == {"id", "results", "meta", "model", "usage"} and [x["index"] for x in cohere["results"]] == order


def test_tei_truncation_as_tei_does(stack, direct):
    app, _, _ = stack
    body = {"query": QUERY, "texts": [LONG, DOCS[1]]}
    refused = post(app, "/rerank", body)  # truncate defaults to false, as in TEI
    assert refused.status_code == 413, refused.text
    err = refused.json()
    assert err["error"]["type"] == "input_too_long" and "1 document(s) (0)" in err["message"] and "truncate: true" in err["message"]
    right = post(app, "/rerank", {**body, "truncate": True, "raw_scores": True}).json()
    left = post(app, "/rerank", {**body, "truncate": True, "raw_scores": True, "truncation_direction": "Left"}).json()
    score = lambda ranks: {x["index"]: x["score"] for x in ranks}[0]  # noqa: E731
    head = direct["default"].rerank(QUERY, [LONG])[0]
    tail = direct["default"].rerank_many([RerankRequest(QUERY, [LONG], truncation_direction="left")])[0][0]
    assert score(right) == pytest.approx(float(head), abs=1e-4) and score(left) == pytest.approx(float(tail), abs=1e-4)
    assert score(left) != pytest.approx(score(right), abs=1e-4)  # another part of the text was read


@pytest.mark.parametrize(
    "body,status,where",
    [
        ({"query": QUERY, "texts": []}, 422, "texts"),
        ({"query": QUERY, "texts": "one text"}, 422, "texts"),
        ({"query": QUERY, "texts": [1]}, 422, "texts.0"),
        ({"query": QUERY, "texts": DOCS, "raw_scores": "yes"}, 422, "raw_scores"),
        ({"query": QUERY, "texts": DOCS, "truncation_direction": "Up"}, 422, "truncation_direction"),
        ({"query": QUERY, "texts": DOCS, "truncate": 1}, 422, "truncate"),
        ({"query": QUERY, "texts": ["x"] * 21}, 422, "texts"),
        ({"query": QUERY, "texts": DOCS, "model": "nope"}, 404, "available models"),
    ],
)
def test_tei_bad_requests(stack, body, status, where):
    r = post(stack[0], "/rerank", body)
    assert r.status_code == status, r.text
    assert where in r.json()["error"]["message"] and "tei" not in r.json()["error"]["message"].split(":")[0]


# --------------------------------------------------------------------------- several models in one app


def test_each_model_answers_with_its_own_scores_and_info_lists_them(stack, direct):
    app, _, cfg = stack
    for name in ("default", "small", "large", "rerank-v3.5"):
        r = post(app, "/v2/rerank", {"model": name, "query": QUERY, "documents": DOCS})
        want = direct[cfg.reranker.resolve(name)].rerank(QUERY, DOCS)
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert got == pytest.approx({i: float(want[i]) for i in range(len(DOCS))}, abs=1e-4), name
    info = asyncio.run(_get(app, "/info"))
    assert list(info["rerankers"]["models"]) == ["default", "small", "large"] and info["rerankers"]["aliases"] == {"rerank-v3.5": "large"}
    assert info["rerankers"]["models"]["small"]["max_length"] == 64 and info["rerankers"]["models"]["large"]["activation"] == "sigmoid"


async def _get(app, path: str) -> Any:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return (await c.get(path)).json()


def test_search_picks_its_reranker(stack, direct):
    app, _, _ = stack
    body = {"query": "protein gene study", "top_k": 10, "rerank_top_m": 4, "top_n": 4, "return_documents": True}
    out = post(app, "/search", {**body, "reranker": "small"}).json()
    assert out["funnel"]["reranker"] == "small" and out["degraded"] is False
    texts = [CORPUS.get(x["id"]).content for x in out["results"]]
    want = direct["small"].rerank(body["query"], texts)
    assert [x["rerank_score"] for x in out["results"]] == pytest.approx([float(w) for w in want], abs=1e-4)
    assert "reranker" not in post(app, "/search", body).json()["funnel"]  # the default model
    r = post(app, "/search", {**body, "reranker": "gpt-rerank"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found" and set(r.json()) == {"error"}


def test_a_request_cannot_make_a_replica_load_what_it_names(stack, model_dirs):
    """Only configured names: a path or Hub id in the request is an unknown model, never loaded."""
    app, backends, _ = stack
    server = backends.server
    before = dict(server.loads)
    for name in (model_dirs["small"], "cross-encoder/ms-marco-MiniLM-L-6-v2", "../small", "default/../small"):
        r = post(app, "/v2/rerank", {"model": name, "query": QUERY, "documents": DOCS})
        assert r.status_code in (404, 422) and r.json()["error"]["type"] in ("model_not_found", "validation_error"), name
    assert dict(server.loads) == before
    with pytest.raises(Exception, match="not served here"):
        asyncio.run(server.rerank(RerankRequest(QUERY, DOCS, model=model_dirs["large"])))  # asked directly, the replica refuses too
    assert dict(server.loads) == before


def test_concurrent_requests_for_several_models_are_never_batched_together(model_dirs):
    cfg = parse_app_config({"index_dir": "/x", "reranker": reranker_args(model_dirs, max_models=2)}, use_env=False)
    server = RerankerServer(RerankerServerConfig(reranker=cfg.reranker))
    calls: list[tuple[str, list[Optional[str]]]] = []

    async def mixed():
        for name in ("small", "large"):  # load both first, then record
            await server.rerank(RerankRequest(QUERY, DOCS[:2], model=name))
        for name in (None, "small", "large"):
            reranker = await server.reranker_for(name)
            inner = reranker.rerank_many_detailed
            reranker.rerank_many_detailed = lambda reqs, *rest, inner=inner, name=name: (calls.append((str(name), [r.model for r in reqs])), inner(reqs, *rest))[1]
        models = [None, "small", "large"] * 4
        return models, await asyncio.gather(*(server.rerank(RerankRequest(f"{QUERY} {i}", DOCS, model=m)) for i, m in enumerate(models)))

    models, outcomes = asyncio.run(mixed())
    assert sum(len(reqs) for _, reqs in calls) == len(models)
    for name, reqs in calls:
        assert set(reqs) == {None if name == "None" else name}, calls  # one model per cross-encoder call
    assert any(len(reqs) > 1 for _, reqs in calls)  # and the same model's requests still share calls
    for m, out in zip(models, outcomes):
        assert out.batch_size <= models.count(m)


def test_models_beyond_the_per_replica_bound_are_evicted_and_reloaded(model_dirs):
    cfg = parse_app_config({"index_dir": "/x", "reranker": reranker_args(model_dirs, max_models=1)}, use_env=False)
    server = RerankerServer(RerankerServerConfig(reranker=cfg.reranker))
    direct_small = Reranker.from_config(CrossEncoderConfig(model=model_dirs["small"], device="cpu", max_length=64))

    async def seq(names):
        return [await server.rerank(RerankRequest(QUERY, DOCS, model=n)) for n in names]

    first, _, again = asyncio.run(seq(["small", "large", "small"]))
    stats = asyncio.run(server.stats())
    assert stats["model_loads"] == {"small": 2, "large": 1}  # small was evicted by large, then loaded again
    assert stats["models_loaded"] == ["default", "small"]
    want = direct_small.rerank(QUERY, DOCS)
    assert first.scores == pytest.approx([float(x) for x in want], abs=1e-4) and again.scores == pytest.approx(first.scores, abs=1e-6)
    asyncio.run(seq([None, None]))
    assert asyncio.run(server.stats())["model_loads"] == {"small": 2, "large": 1}  # the default model is always held


def test_a_replica_side_rejection_is_answered_with_its_own_message(stack):
    """Ray raises a replica's exception as a RayTaskError subclass of it whose text is the remote
    traceback: the answer carries the original's message, never the traceback."""
    from serve_app.errors import InputTooLong

    app, backends, _ = stack

    class RayWrapped(InputTooLong):  # what ray.exceptions.RayTaskError.as_instanceof_cause builds
        def __init__(self, cause: BaseException) -> None:
            super().__init__("ray::ServeReplica.handle_request()\n  File replica.py, line 1\nTraceback (most recent call last): ...")
            self.cause = cause

    real = backends.server.rerank

    async def wrapped(request):
        try:
            return await real(request)
        except InputTooLong as exc:
            raise RayWrapped(exc) from None

    backends.server.rerank = wrapped
    try:
        r = post(app, "/rerank", {"query": QUERY, "texts": [LONG]})
    finally:
        backends.server.rerank = real
    assert r.status_code == 413 and r.json()["error"]["type"] == "input_too_long"
    assert r.json()["message"].startswith("1 document(s) (0) with the query exceed") and "Traceback" not in r.text and "ray::" not in r.text
