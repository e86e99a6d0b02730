"""The application builder: ``import_path: serve_app.serve.app:build_app`` in ``deployments.yaml``.

``build_app(args)`` validates the args once (:class:`~serve_app.serve.config.AppConfig`,
environment overrides applied), builds the index first when ``build_index_if_missing`` asks
for it and it is absent (:func:`serve_app.index.ensure_index`, here, never in a replica), then
wires the deployments (:func:`build_application`, which touches no file)::

    SearchIngress --+--> BM25Retriever  ---+
                    +--> DenseRetriever ---+--> DocumentWriter (writes.enabled: the one
                    +--> CrossEncoderReranker  |    writer; everyone left of it follows its log)
                    +--------------------------+

Each stage is its own deployment with its own replicas and autoscaling. The plain classes of
:mod:`serve_app.serve.deployments` become deployments here, with the options of
:data:`DEPLOYMENT_DEFAULTS` (the one place for them; ``deployments.yaml`` and the ``options``
argument override them per deployment), bound to typed config objects cut from the validated
``AppConfig``, and with their ``user_config`` (the reranker's batching, fault injection)
from it, so that ``serve deploy`` with a changed ``user_config`` still reconfigures live.

A rerank cascade (``cascade: [{name: small, ...}]``) adds one reranker deployment per stage,
``CrossEncoderReranker-<name>``, with the reranker's default options (overridable by that
name), so that each stage scales on its own (the cheap stage on CPUs, the last on GPUs).

With ``sharding: {bm25: N}`` (N > 1) the BM25 stage is N deployments, ``BM25Retriever-shard0``
... ``-shard{N-1}``, each serving one shard of the index, and the ingress merges their results
(likewise ``dense``; see :mod:`serve_app.serve.shards`). In a Serve config file the shard
deployments are listed under their own names.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ray import serve
from ray.serve import Application

from serve_app.funnel import CascadeNames
from serve_app.serve.config import AppConfig, BM25ServerConfig, DenseServerConfig, QueryEncoderServerConfig, RerankerServerConfig, RerankerUserConfig, ShardRef, WriterServerConfig, parse_app_config
from serve_app.serve.deployments import BM25Server, DenseServer, QueryEncoderServer, RerankerServer, SearchIngress, WriterServer
from serve_app.serve.shards import QUERY_ENCODER, RETRIEVER_DEPLOYMENTS, deployment_names, encodes_queries_once, shard_deployment_name

#: Serve retries a failing constructor this often before DEPLOY_FAILED (a missing model or a
#: damaged index will not fix itself; one retry covers a transient failure).
CONSTRUCTOR_RETRIES = 2

#: Each deployment's default options; deployments.yaml (or ``options``) overrides them.
DEPLOYMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "SearchIngress": {"ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 256},
    "BM25Retriever": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 32},
    "DenseRetriever": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 64},
    # max_ongoing_requests must exceed max_batch_size so that batches can fill.
    "CrossEncoderReranker": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 64},
}
DEPLOYMENT_NAMES = tuple(DEPLOYMENT_DEFAULTS)
#: Default options of the deployments only some configurations deploy: the query encoder of a
#: sharded dense retriever (sharding.dense > 1), which encodes each query once for every shard.
CONDITIONAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "DenseQueryEncoder": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 64},
    # The one writer of the index (writes.enabled): exactly one replica; every follower (each
    # retriever replica and shard, each ingress replica) holds one long poll open on it.
    "DocumentWriter": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 1024, "num_replicas": 1},
}
WRITER = "DocumentWriter"


def _deployment(cls: type, name: str, base: str, options: Mapping[str, Mapping[str, Any]], user_config: Optional[dict[str, Any]] = None, prefix: str = "") -> Any:
    """``cls`` as the deployment ``prefix + name``: the defaults of ``base``, then ``options[base]``,
    then ``options[name]`` (a shard's own options win over those of its retriever), then, for a
    collection's deployment, ``options[prefix + base]`` and ``options[prefix + name]``."""
    opts: dict[str, Any] = {"max_constructor_retry_count": CONSTRUCTOR_RETRIES, **{**DEPLOYMENT_DEFAULTS, **CONDITIONAL_DEFAULTS}[base]}
    if user_config is not None:
        opts["user_config"] = user_config
    for key in dict.fromkeys([base, name, prefix + base, prefix + name]):
        opts.update(options.get(key, {}))
    return serve.deployment(cls, name=prefix + name, **opts)


def collection_prefix(collection: Optional[str]) -> str:
    """The prefix of a named collection's deployment names (``papers.BM25Retriever``); none for the default one."""
    return "" if collection is None else f"{collection}."


def stage_deployment_names(cfg: AppConfig, collection: Optional[str] = None) -> list[str]:
    """The names of the stage deployments ``cfg`` deploys for one collection (all but the ingress)."""
    prefix = collection_prefix(collection)
    names = [*deployment_names(cfg), *([QUERY_ENCODER] if encodes_queries_once(cfg) else []), CascadeNames(None).deployment, *(c.deployment_name() for c in cfg.cascade), *([WRITER] if cfg.writes.enabled else [])]
    return [prefix + n for n in names]


def _bind_stages(cfg: AppConfig, options: Mapping[str, Mapping[str, Any]], collection: Optional[str] = None) -> dict[str, Any]:
    """The bound stage deployments of one collection: bm25, dense, reranker, cascade, dense_encoder, writer."""
    prefix = collection_prefix(collection)
    w_opts = {**options.get(WRITER, {}), **options.get(prefix + WRITER, {})}
    if w_opts.get("autoscaling_config") or w_opts.get("num_replicas", 1) != 1:
        raise ValueError(f"{prefix}{WRITER} runs exactly one replica (it serialises the index's writes): remove num_replicas/autoscaling_config from its options")

    writer = None
    if cfg.writes.enabled:
        shards = {r: getattr(cfg.sharding, r) for r in cfg.retrievers if getattr(cfg.sharding, r) > 1}
        writer = _deployment(WriterServer, WRITER, WRITER, options, prefix=prefix).bind(
            WriterServerConfig(index_dir=cfg.index_dir, writes=cfg.writes, dense=cfg.dense if "dense" in cfg.retrievers else None, shards=shards)
        )
    follow = cfg.writes if cfg.writes.enabled else None
    follows = (writer,) if writer is not None else ()  # the writer's handle, bound only with live writes
    fields = dict(cfg.fields)

    def retriever(name: str, cls: type, make_config: Any) -> Any:
        n = getattr(cfg.sharding, name)
        base = RETRIEVER_DEPLOYMENTS[name]
        uc = cfg.retriever_user_config(name)
        if n == 1:
            return _deployment(cls, base, base, options, uc, prefix).bind(make_config(None), *follows)
        return [_deployment(cls, shard_deployment_name(name, i), base, options, uc, prefix).bind(make_config(ShardRef(index=i, num_shards=n)), *follows) for i in range(n)]

    bm25 = dense = encoder = None
    if "bm25" in cfg.retrievers:
        bm25 = retriever("bm25", BM25Server, lambda shard: BM25ServerConfig(index_dir=cfg.index_dir, shard=shard, writes=follow, fields=fields))
    if "dense" in cfg.retrievers:
        sharded = encodes_queries_once(cfg)  # the shards get vectors from one query encoder
        dense = retriever("dense", DenseServer, lambda shard: DenseServerConfig(index_dir=cfg.index_dir, dense=cfg.dense, fields=fields, batching=cfg.dense_batching, shard=shard, encode_queries=not sharded, writes=follow))
        if sharded:
            encoder = _deployment(QueryEncoderServer, QUERY_ENCODER, QUERY_ENCODER, options, cfg.retriever_user_config("dense"), prefix).bind(
                QueryEncoderServerConfig(index_dir=cfg.index_dir, dense=cfg.dense, batching=cfg.dense_batching)
            )
    reranker = _deployment(RerankerServer, CascadeNames(None).deployment, "CrossEncoderReranker", options, cfg.reranker_user_config(), prefix).bind(
        RerankerServerConfig(reranker=cfg.reranker, batching=cfg.batching)
    )
    cascade = [
        _deployment(RerankerServer, c.deployment_name(), "CrossEncoderReranker", options, RerankerUserConfig(**c.batching.model_dump()).model_dump(), prefix).bind(
            RerankerServerConfig(reranker=c.reranker_config(), batching=c.batching, stage=c.name)
        )
        for c in cfg.cascade
    ]
    return {"bm25": bm25, "dense": dense, "reranker": reranker, "cascade": cascade, "dense_encoder": encoder, "writer": writer}


def build_application(cfg: AppConfig, options: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Application:
    """Bind the deployments for ``cfg``; ``options`` maps deployment names to deployment options.

    Each named collection (``cfg.collections``) gets its own stage deployments, named
    ``{collection}.{deployment}``; one ingress serves them all. Pure wiring: no file is read or
    written (the indexes are :func:`build_app`'s business).
    """
    options = dict(options or {})
    collections = cfg.collection_configs()
    known = ["SearchIngress", *stage_deployment_names(cfg)]
    for name, c in collections.items():
        known += stage_deployment_names(c, name)
    bases = {f"{collection_prefix(n)}{b}" for n in collections for b in (*DEPLOYMENT_NAMES[1:], *CONDITIONAL_DEFAULTS)}
    unknown = sorted(set(options) - set(DEPLOYMENT_NAMES) - set(CONDITIONAL_DEFAULTS) - bases - set(known))
    if unknown:
        raise ValueError(f"unknown deployment name(s) {unknown}; expected among {known}")
    stages = _bind_stages(cfg, options)
    named = {name: _bind_stages(c, options, name) for name, c in collections.items()}
    ingress = _deployment(serve.ingress()(SearchIngress), "SearchIngress", "SearchIngress", options)
    follows = (stages["writer"],) if stages["writer"] is not None else ()  # bound only with live writes
    return ingress.bind(cfg, stages["bm25"], stages["dense"], stages["reranker"], stages["cascade"], stages["dense_encoder"], *follows, **({"collections": named} if named else {}))


def build_app(args: Optional[dict[str, Any]] = None) -> Application:
    """Serve application builder: validate ``args``, build the index if asked and absent, bind the deployments."""
    from serve_app.index import ensure_index

    cfg = parse_app_config(args)
    ensure_index(cfg.index_dir, **cfg.index_build_args())
    for c in cfg.collection_configs().values():
        ensure_index(c.index_dir, **c.index_build_args())
    return build_application(cfg)
