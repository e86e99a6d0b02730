"""Configuration of the Serve application: one validated model for the application's ``args``.

``AppConfig`` composes the core stage configs (``serve_app.config``) with what only the service
needs: where the index and corpus live, HTTP request limits, per-stage timeouts and the
reranker's batching. ``deployments.yaml`` passes it as the application's ``args``; an invalid
value fails the deploy with the field named (:func:`parse_app_config`).

Environment overrides (read where the application is built, i.e. where ``serve run`` runs or in
the cluster's ``runtime_env``), for machines without internet:

* ``SERVE_APP_RERANKER_MODEL``: replaces ``reranker.model`` (Hub id or local directory);
* ``SERVE_APP_DENSE_MODEL``: replaces ``dense.model`` (must be the encoder the index was built with);
* ``SERVE_APP_MODEL_PATH__<ID>`` (see :func:`serve_app.models.env_override_name`): maps one Hub id
  to a local directory without touching the configuration.

Batching and fault injection are also *deployment* ``user_config`` values
(:class:`RerankerUserConfig`, :class:`RetrieverUserConfig`): ``deployments.yaml`` may set them per
deployment, and ``serve deploy`` with a changed ``user_config`` applies them live (``reconfigure``)
without restarting replicas. The application args give their defaults.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from serve_app.config import BM25Config, CascadeStage, ChunkingConfig, RerankerModelConfig, DenseConfig, FunnelLimits, FusionConfig, ScoreCacheConfig, SloConfig, WritesConfig
from serve_app.corpus import BUILTIN_PREFIX
from serve_app.errors import UserFacingError
from serve_app.filters import FilterLimits
from serve_app.funnel import DEFAULT_MODEL, CascadeNames, FunnelTimeouts

RetrieverName = Literal["bm25", "dense"]

ENV_RERANKER_MODEL = "SERVE_APP_RERANKER_MODEL"
ENV_DENSE_MODEL = "SERVE_APP_DENSE_MODEL"
#: Default environment variable of the ingress holding the HTTP API key(s) (serve_app.serve.auth).
ENV_API_KEY = "SERVE_APP_API_KEY"


class ConfigError(UserFacingError, ValueError):
    """The application's args are invalid; the message names every offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RequestLimits(_Strict):
    """Limits on what one HTTP request may carry. Violations get a 4xx with the error envelope."""

    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body in bytes (413 payload_too_large above it).")
    max_query_chars: int = Field(2048, ge=1, description="Longest query in characters (/search and /rerank).")
    max_documents: int = Field(1000, ge=1, description="Most documents in one /rerank request.")
    max_document_chars: int = Field(32768, ge=1, description="Longest document in characters in a /rerank request.")
    max_tokens_per_doc: int = Field(4096, ge=1, description="Largest max_tokens_per_doc a /rerank request may ask for.")


class BatchingConfig(_Strict):
    """How a deployment gathers concurrent requests into one model call (Serve's ``@serve.batch``)."""

    max_batch_size: int = Field(16, ge=1, le=1024, description="Most requests (for the reranker: each a query and its documents) in one model call.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10, description="Longest wait for a batch to fill before running what has arrived.")


#: The dense retriever's query batching: short waits, since one query costs milliseconds.
DENSE_BATCHING = BatchingConfig(max_batch_size=32, batch_wait_timeout_s=0.002)


class FaultInjection(_Strict):
    """Deliberate failures of one stage, for tests and drills of the degraded paths. Off by default."""

    mode: Literal["none", "error", "delay", "slow_model"] = Field("none", description="none: normal. error: every call raises. delay: every call sleeps delay_s first. slow_model (reranker): every model call takes delay_s longer, so requests queue behind it as behind a slow forward pass.")
    delay_s: float = Field(0.0, ge=0, le=600, description="Seconds a call sleeps in mode delay.")


class RetrieverUserConfig(_Strict):
    """``user_config`` of a retriever deployment (changed live by ``reconfigure``)."""

    fault: FaultInjection = Field(default_factory=FaultInjection, description="Fault injection for drills and tests.")


class RerankerUserConfig(BatchingConfig):
    """``user_config`` of the reranker deployment (changed live by ``reconfigure``)."""

    fault: FaultInjection = Field(default_factory=FaultInjection, description="Fault injection for drills and tests.")


def model_key(name: Optional[str]) -> str:
    """The one spelling of a configured model's name inside the reranker: ``default`` for the
    default model (a request that names none, or names ``default``), the name otherwise."""
    return DEFAULT_MODEL if name is None or name == DEFAULT_MODEL else name


#: Model names a request may use: letters, digits and ``. _ - : /``, up to 128 characters.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


class RerankerConfig(RerankerModelConfig):
    """The reranker deployment: its default model (the fields of ``RerankerModelConfig``) and,
    optionally, more named models served by the same deployment (Ray Serve model multiplexing).

    A request picks a model by name (``model`` on the rerank routes, ``reranker`` on /search);
    an absent name, or ``default``, is the default model. Only the names configured here (and
    their ``aliases``) can be chosen: a request never makes a replica load a path or Hub id it
    names itself.
    """

    models: dict[str, RerankerModelConfig] = Field(default_factory=dict, description="More rerankers by name, each with its own model, max_length, dtype, activation, long-document handling (e.g. {small: {model: /models/ce-small, max_length: 256}}).")
    aliases: dict[str, str] = Field(default_factory=dict, description="Other names for configured models (e.g. {rerank-v3.5: small}), for integrations that hard-code a provider's model name.")
    max_models_per_replica: int = Field(2, ge=1, le=64, description="Named models loaded at once in one reranker replica besides the default one; the least recently used is unloaded past it (Serve routes a request to a replica that holds its model).")
    score_cache: ScoreCacheConfig = Field(default_factory=ScoreCacheConfig, description="Pair-score cache of each replica, shared by its models (exact: a hit is the score a miss computes; emptied for a model when it is unloaded).")

    @model_validator(mode="after")
    def _check_names(self) -> "RerankerConfig":
        import re

        for name in [*self.models, *self.aliases]:
            if not re.match(MODEL_NAME_PATTERN, name):
                raise ValueError(f"reranker model name {name!r}: use letters, digits and . _ - : / (at most 128 characters)")
        if DEFAULT_MODEL in self.models or DEFAULT_MODEL in self.aliases:
            raise ValueError(f"{DEFAULT_MODEL!r} names the default model (the reranker's own fields); give the others another name")
        for alias, target in self.aliases.items():
            if alias in self.models:
                raise ValueError(f"reranker.aliases: {alias!r} is already a model name")
            if target != DEFAULT_MODEL and target not in self.models:
                raise ValueError(f"reranker.aliases: {alias!r} points to {target!r}, which is not a configured model ({', '.join(self.names())})")
        return self

    def names(self) -> list[str]:
        """The model names, ``default`` first."""
        return [DEFAULT_MODEL, *self.models]

    def default_model(self) -> RerankerModelConfig:
        """The default model's settings."""
        return RerankerModelConfig(**{k: getattr(self, k) for k in RerankerModelConfig.model_fields})

    def catalog(self) -> dict[str, RerankerModelConfig]:
        """Every model by name, ``default`` first."""
        return {DEFAULT_MODEL: self.default_model(), **self.models}

    def resolve(self, name: Optional[str]) -> str:
        """The configured model a request's ``name`` means (None: the default); ``ModelNotFound`` otherwise."""
        if model_key(name) == DEFAULT_MODEL:
            return DEFAULT_MODEL
        if name in self.models:
            return name
        if name in self.aliases:
            return self.aliases[name]
        from serve_app.errors import ModelNotFound

        raise ModelNotFound(name, [*self.names(), *self.aliases])


class ServeCascadeStage(CascadeStage):
    """A cascade stage of the Serve app: its own deployment, ``CrossEncoderReranker-<name>``."""

    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="The stage's @serve.batch settings.")
    score_cache: ScoreCacheConfig = Field(default_factory=ScoreCacheConfig, description="Pair-score cache of each of the stage's replicas.")

    def deployment_name(self) -> str:
        return CascadeNames(self.name).deployment

    def reranker_config(self) -> "RerankerConfig":
        return RerankerConfig(**self.reranker.model_dump(), score_cache=self.score_cache)


class StageTimeouts(_Strict):
    """How long the ingress waits for each stage before treating it as failed."""

    retriever_timeout_s: float = Field(5.0, gt=0, le=600, description="Per retriever call. A retriever past it is marked degraded (timeout) and the others' results are used.")
    rerank_timeout_s: float = Field(30.0, gt=0, le=600, description="Per reranker call. /search then returns the fused order marked degraded; /rerank answers 504.")
    health_timeout_s: float = Field(2.0, gt=0, le=60, description="Per stage readiness probe of GET /healthz.")
    request_timeout_s: float = Field(45.0, gt=0, le=600, description="Overall deadline of one /search or /rerank request in the ingress: past it the pending stage calls are cancelled and the answer is 504 deadline_exceeded. Keep it below http_options.request_timeout_s (the proxy's own limit, answered 408 without the envelope).")

    def funnel(self) -> FunnelTimeouts:
        """The funnel's timeouts (``serve_app.funnel``)."""
        return FunnelTimeouts(retriever_s=self.retriever_timeout_s, rerank_s=self.rerank_timeout_s, request_s=self.request_timeout_s)


ENV_SCOPED_KEYS = "SERVE_APP_SCOPED_KEYS"


class AuthConfig(_Strict):
    """HTTP API key authentication (serve_app.serve.auth): the key itself never goes in the config."""

    api_key_env: str = Field(ENV_API_KEY, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable of the ingress replicas holding the API key (several: comma-separated, for rotation). Unset or empty: no authentication. Every request but GET /healthz then needs Authorization: Bearer <key>. Such a key may do everything.")
    scoped_keys_file: Optional[str] = Field(None, description="A file (a mounted secret) holding scoped API keys: a YAML/JSON list of {name, key, operations: [search, rerank, write, admin], collections: [names] or ['*'], filter: {...}} (docs/API.md#scoped-api-keys). null: none.")
    scoped_keys_env: str = Field(ENV_SCOPED_KEYS, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable holding scoped API keys in the same format as scoped_keys_file (unset or empty: none).")


class ShardingConfig(_Strict):
    """Shards per retriever (``serve_app.serve.shards``): 1 serves the whole index from one deployment."""

    bm25: int = Field(1, ge=1, le=64, description="BM25 shards: N > 1 deploys BM25Retriever-shard0..N-1, each holding the postings of 1/N of the documents (whole-corpus statistics, exact merge). Needs bm25.engine bm25s.")
    dense: int = Field(1, ge=1, le=64, description="Dense shards: N > 1 deploys DenseRetriever-shard0..N-1, each holding the vectors of 1/N of the documents.")


FieldType = Literal["keyword", "keywords", "integer", "float", "datetime", "boolean"]


class FilterLimitsConfig(_Strict):
    """How large a /search filter may be (422 invalid_filter beyond)."""

    max_conditions: int = Field(64, ge=1, le=4096, description="Most field conditions in one filter (an API key's bound filter included).")
    max_depth: int = Field(8, ge=1, le=64, description="Deepest nesting of and/or/not.")
    max_in_values: int = Field(1024, ge=1, le=65536, description="Most values in one `in` list.")

    def limits(self) -> FilterLimits:
        return FilterLimits(self.max_conditions, self.max_depth, self.max_in_values)


#: A collection's name (also a part of its deployments' names and of its URL path).
COLLECTION_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
#: The sections a collection may set (the rest is the application's: auth, limits, timeouts).
COLLECTION_KEYS = frozenset({"index_dir", "corpus", "build_index_if_missing", "retrievers", "bm25", "dense", "reranker", "fusion", "funnel", "chunking", "batching", "dense_batching", "sharding", "cascade", "slo", "writes", "fields", "filters", "faults"})


class AppConfig(_Strict):
    """Application args: everything the deployments need, validated once when the app is built."""

    index_dir: str = Field(..., min_length=1, description="Index directory (serve-app index --out). Built from `corpus` when absent and build_index_if_missing is true.")
    corpus: Optional[str] = Field(None, description="Corpus to index when the index is absent: a BEIR dataset directory (corpus.jsonl[.gz]), a JSONL file, or builtin:demo (the demo dataset shipped with the package).")
    build_index_if_missing: bool = Field(True, description="Build the index from `corpus` once, when the app is built, if index_dir holds none.")
    retrievers: tuple[RetrieverName, ...] = Field(("bm25", "dense"), min_length=1, description="First-stage retrievers deployed (the index must hold each).")
    bm25: BM25Config = Field(default_factory=BM25Config, description="BM25 settings (used when building the index).")
    dense: DenseConfig = Field(default_factory=DenseConfig, description="Bi-encoder and FAISS settings (the query encoder must be the index's encoder).")
    reranker: RerankerConfig = Field(default_factory=RerankerConfig, description="Cross-encoder reranker settings (the default model), and more named models served by the same deployment (models, aliases).")
    fusion: FusionConfig = Field(default_factory=FusionConfig, description="How retriever lists are fused.")
    funnel: FunnelLimits = Field(default_factory=FunnelLimits, description="Default and maximum top_k, rerank_top_m and top_n.")
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig, description="Index-time chunking (used when building the index).")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="HTTP request limits.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Reranker batching defaults; the reranker deployment's user_config overrides them live.")
    dense_batching: BatchingConfig = Field(DENSE_BATCHING, description="Query batching of the dense retriever: concurrent queries share one encoder forward pass.")
    timeouts: StageTimeouts = Field(default_factory=StageTimeouts, description="Per-stage timeouts and the per-request deadline of the ingress.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API key authentication of the HTTP API (the environment variable holding the key).")
    faults: dict[Literal["bm25", "dense", "reranker"], FaultInjection] = Field(default_factory=dict, description="Fault injection per stage at start-up (tests and drills); deployment user_config overrides it.")
    sharding: ShardingConfig = Field(default_factory=ShardingConfig, description="Shards per retriever ({bm25: N, dense: M}); shard sets are built under index_dir/shards/ and the ingress merges the shards' results exactly.")
    cascade: tuple[ServeCascadeStage, ...] = Field((), max_length=8, description="Cheaper rerank stages run before the reranker, in order, each its own deployment CrossEncoderReranker-<name> (e.g. [{name: small, reranker: {model: /models/ce-2l}, default_top_m: 100}] with funnel.default_rerank_top_m 20).")
    slo: SloConfig = Field(default_factory=SloConfig, description="SLO-aware rerank depth: with search_p95_ms set, the ingress lowers a request's rerank_top_m (never below min_rerank_top_m) when its predicted latency would exceed the objective. Off by default.")
    writes: WritesConfig = Field(default_factory=WritesConfig, description="Live writes (POST/DELETE/GET /documents): off by default; enabled deploys the DocumentWriter deployment, which every retriever replica and the ingress follow.")
    fields: dict[Annotated[str, StringConstraints(min_length=1, max_length=128)], FieldType] = Field(default_factory=dict, description="Filterable metadata fields and their types (keyword, keywords, integer, float, datetime, boolean), e.g. {tenant: keyword, year: integer}: /search's `filter` may name these; every retriever replica holds their columns; writes refuse a value of the wrong type.")
    filters: FilterLimitsConfig = Field(default_factory=FilterLimitsConfig, description="Size limits of /search filters.")
    collections: dict[Annotated[str, StringConstraints(pattern=COLLECTION_NAME)], dict[str, Any]] = Field(
        default_factory=dict,
        description="More named corpora in the same application, each served under /collections/{name}/ with its own index, retrievers and reranker deployments ({name}.BM25Retriever ...): {papers: {index_dir: ..., corpus: ..., fields: ..., reranker: ...}}. A collection's key replaces the top-level section whole; what it does not give is inherited. The top-level settings are the `default` collection (the routes at the root). Keys it may set: " + ", ".join(sorted(COLLECTION_KEYS)) + ".",
    )

    @field_validator("index_dir")
    @classmethod
    def _expand_index_dir(cls, v: str) -> str:
        return os.path.expanduser(v)

    @field_validator("corpus")
    @classmethod
    def _expand_corpus(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None or v.startswith(BUILTIN_PREFIX) else os.path.expanduser(v)

    @model_validator(mode="after")
    def _unique_retrievers(self) -> "AppConfig":
        if len(set(self.retrievers)) != len(self.retrievers):
            raise ValueError(f"retrievers must not repeat a name: {list(self.retrievers)}")
        for name in ("bm25", "dense"):
            if getattr(self.sharding, name) > 1 and name not in self.retrievers:
                raise ValueError(f"sharding.{name} is {getattr(self.sharding, name)} but {name} is not in retrievers")
        if self.sharding.bm25 > 1 and self.bm25.engine != "bm25s":
            raise ValueError("sharding.bm25 > 1 needs bm25.engine: bm25s (rank_bm25 cannot share corpus statistics across shards)")
        names = [c.name for c in self.cascade]
        if len(set(names)) != len(names):
            raise ValueError(f"cascade stage names must be unique: {names}")
        reserved = sorted(set(self.fields) & {"and", "or", "not"})
        if reserved:
            raise ValueError(f"fields: {reserved} are operators of the filter language and cannot name a field")
        self.collection_configs()  # each collection's configuration is valid
        return self

    def collection_configs(self) -> dict[str, "AppConfig"]:
        """The configuration of each named collection: the application's, with the sections the
        collection gives replacing the top-level ones whole."""
        if not self.collections:
            return {}
        base = self.model_dump(exclude={"collections"})
        out: dict[str, AppConfig] = {}
        dirs = {os.path.abspath(self.index_dir): "default"}
        for name, over in self.collections.items():
            if name == "default":
                raise ValueError("collections: 'default' is the top-level collection; give another name")
            unknown = sorted(set(over) - COLLECTION_KEYS)
            if unknown:
                raise ValueError(f"collections.{name}: unknown or application-wide key(s) {unknown}; a collection may set {sorted(COLLECTION_KEYS)}")
            if "index_dir" not in over:
                raise ValueError(f"collections.{name}: needs its own index_dir")
            try:
                cfg = AppConfig.model_validate({**base, **over, "collections": {}})
            except ValidationError as exc:
                first = exc.errors()[0]
                loc = ".".join(str(p) for p in first.get("loc", ()))
                raise ValueError(f"collections.{name}.{loc}: {first.get('msg')}") from None
            d = os.path.abspath(cfg.index_dir)
            if d in dirs:
                raise ValueError(f"collections.{name}: index_dir {cfg.index_dir} is already the index of collection {dirs[d]!r}")
            dirs[d] = name
            out[name] = cfg
        return out

    def index_build_args(self) -> dict[str, Any]:
        """Keyword arguments of :func:`serve_app.index.ensure_index` for this application."""
        return {
            "corpus": self.corpus,
            "bm25": self.bm25 if "bm25" in self.retrievers else None,
            "dense": self.dense if "dense" in self.retrievers else None,
            "chunking": self.chunking,
            "shards": {r: getattr(self.sharding, r) for r in self.retrievers},
            "build_if_missing": self.build_index_if_missing,
        }

    def reranker_user_config(self) -> dict[str, Any]:
        """The reranker deployment's default ``user_config``."""
        fault = self.faults.get("reranker", FaultInjection())
        return RerankerUserConfig(**self.batching.model_dump(), fault=fault).model_dump()

    def retriever_user_config(self, name: RetrieverName) -> dict[str, Any]:
        """A retriever deployment's default ``user_config``."""
        return RetrieverUserConfig(fault=self.faults.get(name, FaultInjection())).model_dump()


# --------------------------------------------------------------------------- per-deployment configs
# What the builder binds to each deployment: typed, already validated (a replica never parses a dict).


class ShardRef(_Strict):
    """The shard a retriever deployment serves."""

    index: int = Field(..., ge=0)
    num_shards: int = Field(..., ge=2)


class BM25ServerConfig(_Strict):
    index_dir: str
    shard: Optional[ShardRef] = None
    fields: dict[str, str] = Field(default_factory=dict, description="The declared metadata fields (filters).")
    writes: Optional[WritesConfig] = Field(None, description="Follow the DocumentWriter's log (live writes), or None.")


class DenseServerConfig(_Strict):
    index_dir: str
    dense: DenseConfig
    fields: dict[str, str] = Field(default_factory=dict, description="The declared metadata fields (filters).")
    batching: BatchingConfig = DENSE_BATCHING
    shard: Optional[ShardRef] = None
    encode_queries: bool = Field(True, description="Whether the replica encodes queries itself (unsharded dense); the shards of a sharded dense retriever receive vectors from DenseQueryEncoder and load no model.")
    writes: Optional[WritesConfig] = Field(None, description="Follow the DocumentWriter's log (live writes), or None.")


class WriterServerConfig(_Strict):
    """The DocumentWriter deployment: the one writer of the index."""

    index_dir: str
    writes: WritesConfig
    dense: Optional[DenseConfig] = Field(None, description="The index's bi-encoder, which encodes new documents (None: the index has no dense retriever).")
    shards: dict[str, int] = Field(default_factory=dict, description="Shards of each sharded retriever (their owners are recorded with every change).")


class QueryEncoderServerConfig(_Strict):
    """The query encoder of a sharded dense retriever: one encoding per query for every shard."""

    index_dir: str
    dense: DenseConfig
    batching: BatchingConfig = DENSE_BATCHING


class RerankerServerConfig(_Strict):
    reranker: RerankerConfig
    stage: Optional[str] = Field(None, description="The cascade stage this deployment serves (None: the final reranker).")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Starting batching; user_config reconfigures it live.")


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per error: ``field.path: message`` (input values are never echoed)."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        lines.append(f"{prefix}{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(lines)


def apply_env_overrides(args: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``args`` with ``reranker.model`` / ``dense.model`` replaced by their environment overrides."""
    env = os.environ if environ is None else environ
    out = dict(args)
    for var, section in ((ENV_RERANKER_MODEL, "reranker"), (ENV_DENSE_MODEL, "dense")):
        value = env.get(var, "").strip()
        if value:
            sub = out.get(section) or {}
            if isinstance(sub, BaseModel):
                sub = sub.model_dump()
            if not isinstance(sub, Mapping):
                raise ConfigError(f"{section}: must be a mapping, got {type(sub).__name__}")
            out[section] = {**sub, "model": value}
    return out


def parse_app_config(args: Mapping[str, Any] | AppConfig | None, *, use_env: bool = True) -> AppConfig:
    """Validate application args (after environment overrides) or raise :class:`ConfigError` naming the fields."""
    if isinstance(args, AppConfig):
        args = args.model_dump()
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"application args must be a mapping, got {type(args).__name__}")
    if use_env:
        args = apply_env_overrides(args)
    try:
        return AppConfig.model_validate(dict(args))
    except ValidationError as exc:
        raise ConfigError(f"invalid application config: {format_validation_error(exc)}") from None


def parse_user_config(model: type[BaseModel], user_config: Mapping[str, Any] | None, deployment: str) -> Any:
    """Validate a deployment's ``user_config`` (``reconfigure`` fails naming the field when invalid)."""
    try:
        return model.model_validate(dict(user_config or {}))
    except ValidationError as exc:
        raise ConfigError(f"invalid user_config of {deployment}: {format_validation_error(exc)}") from None
