"""Collections without Ray: their configuration (inherited and replaced sections, refusals),
their deployments' names, and one app routing each collection to its own service, limits and
keys (a collection outside a key's scope answers as one that does not exist)."""

from __future__ import annotations

import pytest
from serve_fakes import FakeBackends, asgi_request, small_corpus

from serve_app.corpus import Corpus
from serve_app.serve.config import ConfigError, parse_app_config
from serve_app.serve.service import SearchService
from serve_app.types import Document

KEY = "admin-key-0123456789abcdef"
PAPERS_KEY = "papers-key-0123456789abcdef"


def app_args(**more):
    return {"index_dir": "/idx/default", "retrievers": ["bm25"], "collections": {"papers": {"index_dir": "/idx/papers", "funnel": {"max_top_k": 7, "default_top_k": 5, "default_rerank_top_m": 5, "default_top_n": 5}, "fields": {"tenant": "keyword"}, "reranker": {"model": "/models/other"}}}, **more}


def test_a_collection_inherits_what_it_does_not_replace():
    cfg = parse_app_config(app_args(fusion={"method": "rrf", "rrf_k": 10}), use_env=False)
    papers = cfg.collection_configs()["papers"]
    assert papers.index_dir == "/idx/papers" and papers.fields == {"tenant": "keyword"} and papers.reranker.model == "/models/other"
    assert papers.fusion.rrf_k == 10 and papers.retrievers == ("bm25",)  # inherited
    assert papers.funnel.max_top_k == 7 and cfg.funnel.max_top_k != 7  # replaced, for this collection only
    assert cfg.fields == {}


@pytest.mark.parametrize(
    ("collections", "message"),
    [
        ({"papers": {"fields": {}}}, "needs its own index_dir"),
        ({"papers": {"index_dir": "/idx/default"}}, "already the index of collection 'default'"),
        ({"papers": {"index_dir": "/a", "auth": {}}}, "application-wide"),
        ({"default": {"index_dir": "/a"}}, "top-level collection"),
        ({"Papers": {"index_dir": "/a"}}, "pattern"),
        ({"papers": {"index_dir": "/a", "fields": {"year": "date"}}}, "collections.papers.fields.year"),
    ],
)
def test_bad_collections_are_refused_naming_them(collections, message):
    with pytest.raises(ConfigError, match=message):
        parse_app_config({"index_dir": "/idx/default", "collections": collections}, use_env=False)


def test_each_collection_gets_its_own_deployments():
    from ray.serve._private.build_app import build_app as serve_build_app

    from serve_app.serve.app import build_application, stage_deployment_names

    cfg = parse_app_config(app_args(writes={"enabled": True}), use_env=False)
    papers = cfg.collection_configs()["papers"]
    assert stage_deployment_names(papers, "papers") == ["papers.BM25Retriever", "papers.CrossEncoderReranker", "papers.DocumentWriter"]
    built = build_application(cfg, {"papers.BM25Retriever": {"num_replicas": 2}, "CrossEncoderReranker": {"num_replicas": 3}})
    deps = {d.name: d for d in serve_build_app(built, name="t").deployments}
    assert set(deps) == {"SearchIngress", "BM25Retriever", "CrossEncoderReranker", "DocumentWriter", "papers.BM25Retriever", "papers.CrossEncoderReranker", "papers.DocumentWriter"}
    assert deps["papers.BM25Retriever"].num_replicas == 2 and deps["BM25Retriever"].num_replicas == 1
    assert deps["papers.CrossEncoderReranker"].num_replicas == 3  # the options of the kind apply to every collection's
    assert deps["papers.BM25Retriever"].init_args[0].index_dir == "/idx/papers" and deps["papers.BM25Retriever"].init_args[0].fields == {"tenant": "keyword"}
    assert set(deps["SearchIngress"].init_kwargs["collections"]) == {"papers"}
    with pytest.raises(ValueError, match="unknown deployment name"):
        build_application(cfg, {"other.BM25Retriever": {}})


def two_collections(api_keys):
    from serve_app.serve.http import create_app

    cfg = parse_app_config(app_args(), use_env=False)
    papers_cfg = cfg.collection_configs()["papers"]
    default_corpus = small_corpus(30)
    papers_corpus = Corpus([Document(f"p{i}", f"protein gene paper {i}", metadata={"tenant": ["acme", "globex"][i % 2]}) for i in range(20)])
    default = SearchService(cfg, FakeBackends(default_corpus), default_corpus, {})
    papers = SearchService(papers_cfg, FakeBackends(papers_corpus), papers_corpus, {}, collection="papers")
    return create_app(default, api_keys=api_keys, collections={"papers": papers})


def test_one_app_routes_each_collection_to_its_own_corpus_and_limits():
    app = two_collections(api_keys=())
    d = asgi_request(app, "POST", "/search", json={"query": "protein gene", "rerank_top_m": 0})
    p = asgi_request(app, "POST", "/collections/papers/search", json={"query": "protein gene", "rerank_top_m": 0, "top_k": 5, "top_n": 5})
    assert d.status_code == p.status_code == 200
    assert all(r["id"].startswith("doc") for r in d.json()["results"]) and all(r["id"].startswith("p") for r in p.json()["results"])
    too_deep = asgi_request(app, "POST", "/collections/papers/search", json={"query": "protein", "top_k": 8})
    assert too_deep.status_code == 422 and "top_k" in too_deep.json()["error"]["message"]  # papers' own max_top_k
    assert asgi_request(app, "POST", "/search", json={"query": "protein", "top_k": 8}).status_code == 200
    missing = asgi_request(app, "POST", "/collections/nope/search", json={"query": "protein"})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    info = asgi_request(app, "GET", "/info").json()
    assert info["collections"] == ["default", "papers"] and info["collection"] == "default"
    papers_info = asgi_request(app, "GET", "/collections/papers/info").json()
    assert papers_info["collection"] == "papers" and papers_info["fields"] == {"tenant": "keyword"} and info["fields"] == {}


def test_the_client_filters_and_reaches_a_collection_by_its_base_url():
    import asyncio

    import httpx

    from serve_app.client import AsyncServeAppClient

    app = two_collections(api_keys=())

    async def main():
        async with AsyncServeAppClient("http://test/collections/papers", transport=httpx.ASGITransport(app=app)) as c:
            return (await c.search("protein gene", rerank_top_m=0, top_k=5, top_n=5, return_documents=True, filter={"tenant": "globex"}))["results"]

    hits = asyncio.run(main())
    assert hits and all(h["id"].startswith("p") and h["metadata"]["tenant"] == "globex" for h in hits)


def test_a_key_scoped_to_one_collection_sees_no_other():
    from serve_app.serve.auth import parse_scoped_keys

    scoped = parse_scoped_keys(f"[{{name: papers-acme, key: {PAPERS_KEY}, operations: [search, admin], collections: [papers], filter: {{tenant: acme}}}}]", "test", {"default": {}, "papers": {"tenant": "keyword"}})
    app = two_collections(api_keys=[KEY, *scoped])
    auth = {"Authorization": f"Bearer {PAPERS_KEY}"}
    hidden = asgi_request(app, "POST", "/search", json={"query": "protein"}, headers=auth)
    absent = asgi_request(app, "POST", "/collections/nope/search", json={"query": "protein"}, headers=auth)
    assert hidden.status_code == absent.status_code == 404
    assert hidden.json()["error"]["type"] == absent.json()["error"]["type"] == "not_found"
    r = asgi_request(app, "POST", "/collections/papers/search", json={"query": "protein gene", "rerank_top_m": 0, "return_documents": True}, headers=auth)
    assert r.status_code == 200 and r.json()["results"] and all(x["metadata"]["tenant"] == "acme" for x in r.json()["results"])
    assert asgi_request(app, "GET", "/info", headers=auth).status_code == 404  # the root is the default collection's
    assert asgi_request(app, "GET", "/collections/papers/info", headers=auth).json()["collection"] == "papers"
    assert asgi_request(app, "GET", "/info", headers={"Authorization": f"Bearer {KEY}"}).json()["collections"] == ["default", "papers"]
    with pytest.raises(ConfigError, match="unknown collection"):
        parse_scoped_keys(f"[{{name: x, key: {PAPERS_KEY}, operations: [search], collections: [nope]}}]", "test", {"default": {}})
    with pytest.raises(ConfigError, match="filter.owner") as info:
        parse_scoped_keys(f"[{{name: x, key: {PAPERS_KEY}, operations: [search], filter: {{owner: a}}}}]", "test", {"default": {"owner": "keyword"}, "papers": {}})
    assert PAPERS_KEY not in str(info.value)


def test_the_collections_command_lists_and_builds_each_collections_index(tmp_path, capsys):
    import json

    import yaml

    from serve_app.cli import main
    from serve_app.corpus import write_documents_jsonl

    write_documents_jsonl(small_corpus(12), tmp_path / "a.jsonl")
    write_documents_jsonl([Document(f"p{i}", f"protein gene paper {i}") for i in range(8)], tmp_path / "b.jsonl")
    args = {"index_dir": str(tmp_path / "ia"), "corpus": str(tmp_path / "a.jsonl"), "retrievers": ["bm25"], "collections": {"papers": {"index_dir": str(tmp_path / "ib"), "corpus": str(tmp_path / "b.jsonl"), "fields": {"tenant": "keyword"}}}}
    config = tmp_path / "deployments.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "app", "route_prefix": "/", "import_path": "serve_app.serve.app:build_app", "args": args}]}))
    assert main(["collections", "--config", str(config)]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["collection"], x["index"]) for x in listed] == [("default", "missing"), ("papers", "missing")]
    assert main(["collections", "--config", str(config), "--build", "--collection", "papers", "-q"]) == 0
    built = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["collection"], x["index"], x["fields"]) for x in built] == [("papers", "built now", {"tenant": "keyword"})]
    assert (tmp_path / "ib" / "manifest.json").exists() and not (tmp_path / "ia").exists()
