"""The application builder: ``import_path: serve_app.serve.app:build_app`` in ``deployments.yaml``.

``build_app(args)`` validates the args (:class:`~serve_app.serve.config.AppConfig`, environment
overrides applied), builds the index once if it is absent (here, not in every replica), and
binds the deployments into one application::

    SearchIngress --+--> BM25Retriever
                    +--> DenseRetriever
                    +--> CrossEncoderReranker

Each stage is its own deployment with its own replicas and autoscaling (set per deployment in
``deployments.yaml``). ``build_application(cfg, options)`` is the same with per-deployment
``.options(...)`` overrides, for Python callers and tests.

With ``sharding: {bm25: N}`` (N > 1) the BM25 stage is N deployments, ``BM25Retriever-shard0``
... ``-shard{N-1}``, each serving one shard of the index, and the ingress merges their results
(likewise ``dense``; see :mod:`serve_app.serve.shards`). In a Serve config file the shard
deployments are listed under their own names.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ray.serve import Application

from serve_app.serve.config import AppConfig, parse_app_config
from serve_app.serve.deployments import BM25Deployment, DenseDeployment, RerankerDeployment, SearchIngress
from serve_app.serve.shards import deployment_names, ensure_shards, shard_deployment_name
from serve_app.serve.stores import ensure_index

DEPLOYMENT_NAMES = ("SearchIngress", "BM25Retriever", "DenseRetriever", "CrossEncoderReranker")


def build_application(cfg: AppConfig, options: Optional[Mapping[str, Mapping[str, Any]]] = None, *, build_index: bool = True) -> Application:
    """Bind the deployments for ``cfg``; ``options`` maps deployment names to ``.options()`` kwargs."""
    options = dict(options or {})
    known = ["SearchIngress", *deployment_names(cfg), "CrossEncoderReranker"]
    unknown = sorted(set(options) - set(DEPLOYMENT_NAMES) - set(known))
    if unknown:
        raise ValueError(f"unknown deployment name(s) {unknown}; expected among {known}")
    if build_index:
        ensure_index(cfg)
        ensure_shards(cfg)

    def opts(deployment: Any, name: str, user_config: dict[str, Any]) -> Any:
        return deployment.options(**{"user_config": user_config, **options.get(name, {})})

    def shards(deployment: Any, retriever: str, *args: Any) -> Any:
        n = getattr(cfg.sharding, retriever)
        uc = cfg.retriever_user_config(retriever)
        if n == 1:
            return opts(deployment, deployment.name, uc).bind(*args)
        out = []
        for i in range(n):  # options of the unsharded name apply to every shard, a shard's own name overrides them
            name = shard_deployment_name(retriever, i)
            kwargs = {"user_config": uc, **options.get(deployment.name, {}), **options.get(name, {}), "name": name}
            out.append(deployment.options(**kwargs).bind(*args, {"index": i, "num_shards": n}))
        return out

    bm25 = dense = None
    if "bm25" in cfg.retrievers:
        bm25 = shards(BM25Deployment, "bm25", cfg.index_dir)
    if "dense" in cfg.retrievers:
        dense = shards(DenseDeployment, "dense", cfg.index_dir, cfg.dense.model_dump(mode="json"))
    reranker = opts(RerankerDeployment, "CrossEncoderReranker", cfg.reranker_user_config()).bind(cfg.reranker.model_dump(mode="json"))
    ingress = SearchIngress.options(**options.get("SearchIngress", {})) if options.get("SearchIngress") else SearchIngress
    return ingress.bind(cfg.model_dump(mode="json"), bm25, dense, reranker)


def build_app(args: Optional[dict[str, Any]] = None) -> Application:
    """Serve application builder: validate ``args``, build the index if absent, bind the deployments."""
    return build_application(parse_app_config(args))
