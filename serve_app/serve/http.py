"""The FastAPI application of the ingress: routes, strict JSON bodies, one error envelope.

:func:`create_app` turns a :class:`~serve_app.serve.service.SearchService` into an ASGI app.
The Serve ingress returns it from ``__serve_build_asgi_app__``; tests can drive it in process.

Bodies of POST endpoints are read by :class:`StrictJSONRequest`: ``Content-Type`` must be JSON
(415), the body at most ``limits.max_body_bytes`` (413, checked on ``Content-Length`` and while
reading), valid UTF-8 JSON without NaN/Infinity or non-finite numbers (400). Every error, from
FastAPI's validation to unknown routes, is answered as ``{"error": {"type", "message"}}``.
Request bodies are never logged nor echoed.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations, which
# name request models created at run time (limits come from the configuration).

import json
import logging
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

import serve_app
from serve_app.serve import metrics, tracing
from serve_app.serve.api import (
    DOCUMENT_TAGS,
    ERROR_TYPES,
    RERANK_OVERLOADED_STATUS,
    ApiError,
    DocumentOut,
    ErrorEnvelope,
    HealthResponse,
    WriteResponse,
    build_document_models,
    RerankResponse,
    SearchResponse,
    TEIRankOut,
    V1RerankResponse,
    envelope,
    ignored_fields,
    is_rerank_path,
)
from serve_app.errors import DeadlineExceeded, Forbidden, FunnelError, InputRejected, InputTooLong, ModelNotFound, StageError, StageOutputError, StageOverloaded, StageTimeout, StageUnavailable
from serve_app.filters import FilterError, check_metadata
from serve_app.serve.auth import COLLECTIONS_PREFIX, DEFAULT_COLLECTION, install_api_key_auth, key_scope, load_api_keys, load_scoped_keys
from serve_app.serve.flavours import FLAVOURS, Flavour
from serve_app.serve.service import SearchService

logger = logging.getLogger(__name__)

_STATUS_TYPES = {status: name for name, (status, _) in reversed(list(ERROR_TYPES.items()))}


# --------------------------------------------------------------------------- strict JSON


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (NaN and Infinity are rejected)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def strict_json_loads(body: bytes) -> Any:
    """Parse a UTF-8 JSON document, rejecting NaN, Infinity and numbers that overflow a float.

    Raises :class:`ApiError` (``invalid_json``) with the position of the problem, never the body.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError("invalid_json", f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ApiError("invalid_json", f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError("invalid_json", f"the body is not acceptable JSON: {str(exc)[:200]}") from None


def _is_json_content_type(value: Optional[str]) -> bool:
    if not value:
        return False
    media, _, params = value.partition(";")
    media = media.strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        return False
    for param in params.split(";"):
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset" and val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


class StrictJSONRequest(Request):
    """A request whose body is size-limited and whose JSON is parsed strictly."""

    max_body_bytes: int = 0

    async def body(self) -> bytes:
        if not hasattr(self, "_limited_body"):
            limit = self.max_body_bytes
            declared = self.headers.get("content-length")
            if declared is not None and declared.strip().isdigit() and int(declared) > limit:
                raise ApiError("payload_too_large", f"the body has {int(declared)} bytes; the limit is {limit} bytes")
            chunks, size = [], 0
            async for chunk in self.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError("payload_too_large", f"the body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
            self._limited_body = b"".join(chunks)
        return self._limited_body

    async def json(self) -> Any:
        if not hasattr(self, "_strict_json"):
            self._strict_json = strict_json_loads(await self.body())
        return self._strict_json


def json_route_class(max_body_bytes: int) -> type:
    """An ``APIRoute`` whose body endpoints read JSON through :class:`StrictJSONRequest`."""

    class JSONRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()
            if self.body_field is None:
                return handler

            async def strict_handler(request: Request) -> Response:
                if not _is_json_content_type(request.headers.get("content-type")):
                    raise ApiError("unsupported_media_type", "send the body as JSON with Content-Type: application/json (UTF-8)")
                strict = StrictJSONRequest(request.scope, request.receive)
                strict.max_body_bytes = max_body_bytes
                await strict.body()
                return await handler(strict)

            return strict_handler

    return JSONRoute


# --------------------------------------------------------------------------- errors


def _endpoint(request: Request) -> str:
    return _endpoint_of_path(request.url.path)


def _endpoint_of_path(path: str) -> str:
    path = path.rstrip("/")
    for name in ("search", "rerank", "healthz", "info"):
        if path.endswith("/" + name):
            return name
    if path.endswith("/documents") or "/documents/" in path:
        return "documents"
    return "other"


def _format_validation(exc: RequestValidationError) -> tuple[str, str]:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return "invalid_json", "the body is not valid JSON"
    parts = []
    for e in errors[:8]:
        loc = [str(p) for p in e.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path"):
            loc = loc[1:]
        loc = [p for i, p in enumerate(loc) if not (p in DOCUMENT_TAGS and (i == 0 or loc[i - 1].isdigit()))]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    if len(errors) > 8:
        parts.append(f"({len(errors) - 8} more errors)")
    return "validation_error", "; ".join(parts)


#: The core's outcomes (``serve_app.errors``) and the error type each is answered with; the one
#: place where they meet HTTP. Order matters: the first matching class wins.
CORE_ERROR_TYPES: tuple[tuple[type[Exception], str], ...] = (
    (FunnelError, "validation_error"),
    (FilterError, "invalid_filter"),
    (Forbidden, "forbidden"),
    (ModelNotFound, "model_not_found"),
    (InputTooLong, "input_too_long"),
    (InputRejected, "validation_error"),  # after its subclasses above
    (StageOverloaded, "overloaded"),
    (DeadlineExceeded, "deadline_exceeded"),
    (StageTimeout, "stage_timeout"),
    (StageUnavailable, "service_unavailable"),
    (StageOutputError, "internal_error"),
)


def core_error_type(exc: BaseException) -> Optional[str]:
    """The envelope's ``error.type`` for a core exception, or None for any other exception."""
    return next((name for cls, name in CORE_ERROR_TYPES if isinstance(exc, cls)), None)


def core_error_answer(exc: Exception) -> ApiError:
    """The HTTP answer of a core exception (see :data:`CORE_ERROR_TYPES`)."""
    error_type = core_error_type(exc)
    if error_type is None:
        raise TypeError(f"{type(exc).__name__} is not a core outcome")
    if isinstance(exc, StageOverloaded):
        header = exc.retry_after_header()
        return ApiError(error_type, f"{exc.message}; retry after {header} s", headers={"Retry-After": header})
    if isinstance(exc, DeadlineExceeded):
        return ApiError(error_type, f"the request did not complete within request_timeout_s={exc.timeout_s:g}")
    if isinstance(exc, StageOutputError):
        logger.error("unusable output of the %s stage: %s", exc.stage, exc.message)
    return ApiError(error_type, exc.message if isinstance(exc, StageError) else str(exc))


def _error_response(request: Request, status: int, error_type: str, message: str, headers: Optional[dict] = None) -> JSONResponse:
    metrics.count_error(_endpoint(request), error_type)
    path = request.url.path
    if error_type == "overloaded" and is_rerank_path(path):
        status = RERANK_OVERLOADED_STATUS  # what Cohere's, Jina's and TEI's clients back off on
    return JSONResponse(envelope(error_type, message, path), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with the envelope."""

    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(request, exc.status_code, exc.error_type, exc.message, exc.headers)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, ApiError):
            return await on_api_error(request, exc)
        error_type = _STATUS_TYPES.get(exc.status_code, "http_error")
        default = ERROR_TYPES.get(error_type, (0, ""))[1]
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail else default
        if exc.status_code == 404:
            detail = f"no endpoint {request.method} {request.url.path}; see /docs"
        return _error_response(request, exc.status_code, error_type, detail, getattr(exc, "headers", None))

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error_type, message = _format_validation(exc)
        return _error_response(request, ERROR_TYPES[error_type][0], error_type, message)

    async def on_core_error(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, DeadlineExceeded):
            logger.warning("request deadline exceeded (%s)", exc)
        return await on_api_error(request, core_error_answer(exc))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
        return _error_response(request, 500, "internal_error", f"internal error ({type(exc).__name__}); see the service logs")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    for cls, _ in CORE_ERROR_TYPES:
        app.add_exception_handler(cls, on_core_error)
    app.add_exception_handler(Exception, on_unexpected)


# --------------------------------------------------------------------------- app

def _errors_doc(*pairs: tuple[int, str]) -> dict[int, dict[str, Any]]:
    return {code: {"model": ErrorEnvelope, "description": desc} for code, desc in pairs}


_ERRORS_DOC = _errors_doc(
    (400, "invalid_json"), (404, "model_not_found"), (413, "payload_too_large"), (415, "unsupported_media_type"), (422, "validation_error"),
    (503, "service_unavailable, overloaded"), (504, "stage_timeout, deadline_exceeded"),
)
_RERANK_ERRORS_DOC = {**_ERRORS_DOC, **_errors_doc((413, "payload_too_large, input_too_long (TEI shape, truncate=false)"), (429, "overloaded (Retry-After)"), (503, "service_unavailable"))}

DESCRIPTION = """Hybrid retrieval (BM25 + dense) with cross-encoder reranking, and the rerank APIs clients already speak.

* `POST /search`: retrieve, fuse, rerank, return the top documents.
* `POST /v2/rerank`: Cohere's v2 rerank (`cohere.ClientV2.rerank`).
* `POST /v1/rerank`: Cohere's v1 rerank, which Jina's rerank clients also speak.
* `POST /rerank`: Text Embeddings Inference's rerank when the body has `texts`, Cohere's v1 otherwise.
* `GET /healthz`: 200 once every stage has loaded its index or model, else 503.
* `GET /info`: models (every configured reranker), index size, limits, funnel defaults.
* `POST /documents`, `DELETE /documents`, `GET /documents/{id}`: live writes, when `writes.enabled`.

`model` (`reranker` on /search) picks one of the configured rerankers by name or alias.
Errors always have the body `{"error": {"type": ..., "message": ...}}`; the rerank routes add
the message at the top level (`"message"`, where Cohere's clients read it) and answer a shed
request with 429 instead of 503.
"""


_WRITE_ERRORS_DOC = _errors_doc(
    (400, "invalid_json"), (413, "payload_too_large"), (415, "unsupported_media_type"),
    (422, "validation_error: missing or unknown field, an id repeated in the batch, an empty or too long document, metadata that is not a small JSON object, too many documents"),
    (503, "service_unavailable: the document writer is unreachable; the batch may or may not have been logged: send it again (writes are idempotent)"),
)


def _document_routes(app: FastAPI, service: SearchService) -> None:
    """POST, DELETE and GET /documents (live writes). A key's bound filter guards all three:
    a write outside it is refused (403), a document outside it is not found (404)."""
    from serve_app.live.changes import check_deletes, check_upserts

    UpsertRequest, DeleteRequest = build_document_models(service.cfg.writes)

    @app.post("/documents", response_model=WriteResponse, response_model_exclude_unset=True, responses=_WRITE_ERRORS_DOC, summary="Add or replace documents (one durable batch)")
    async def upsert_documents(body: UpsertRequest, request: Request) -> Any:  # type: ignore[valid-type]
        docs = [d.model_dump(exclude_none=True) for d in body.documents]
        check_upserts(docs, service.cfg.writes)  # 422 before any round trip
        for i, d in enumerate(docs):
            try:
                check_metadata(d.get("metadata") or {}, service.cfg.fields, f"documents[{i}].metadata")
            except FilterError as exc:
                raise ApiError("validation_error", f"{exc}; nothing was written") from None
        return await service.upsert_documents(body, guard=key_scope(request).bound_filter(service.collection))

    @app.delete("/documents", response_model=WriteResponse, response_model_exclude_unset=True, responses=_WRITE_ERRORS_DOC, summary="Delete documents by id (one durable batch; idempotent)")
    async def delete_documents(body: DeleteRequest, request: Request) -> Any:  # type: ignore[valid-type]
        check_deletes(list(body.ids), service.cfg.writes)
        return await service.delete_documents(body, guard=key_scope(request).bound_filter(service.collection))

    @app.get("/documents/{doc_id:path}", response_model=DocumentOut, responses=_errors_doc((404, "document_not_found"), (503, "service_unavailable")), summary="The latest acknowledged version of a document")
    async def get_document(doc_id: str, request: Request) -> Any:
        if not doc_id or len(doc_id) > service.cfg.writes.max_id_chars:
            raise ApiError("validation_error", f"doc_id: must be 1 to {service.cfg.writes.max_id_chars} characters")
        doc = await service.get_document(doc_id, bound=key_scope(request).bound_filter(service.collection))
        if doc is None:
            raise ApiError("document_not_found", "no document with this id (it was never written, or it was deleted)")
        return doc


def _count_ignored(api: str, body: Any) -> None:
    """Count (and log at debug, by name only) the fields a lenient route set aside."""
    names = ignored_fields(body)
    if names:
        metrics.count_ignored_fields(api, len(names))
        logger.debug("%s: ignored unknown fields %s", api, names)


def _flavour_routes(app: FastAPI, service: SearchService) -> None:
    """Each flavour's routes under its prefix (see serve_app.serve.flavours)."""
    models = {"tei": service.models.tei, "cohere_v1": service.models.cohere_v1, "cohere_v2": service.models.cohere_v2, "infinity": service.flavour_models.infinity, "vllm": service.flavour_models.vllm, "jina": service.flavour_models.jina}
    for flavour in FLAVOURS:
        for path, kind in flavour.routes:
            _flavour_route(app, service, flavour, flavour.prefix + path, models[kind])


def _flavour_route(app: FastAPI, service: SearchService, flavour: Flavour, path: str, model: Any) -> None:
    async def rerank_as_reference(body: model) -> Any:  # type: ignore[valid-type]
        if flavour.lenient:
            _count_ignored(flavour.name, body)
        return JSONResponse(await service.rerank(body, flavour))

    summary = f"Rerank as {flavour.reference} answers (flavour `{flavour.name}`)"
    app.post(path, responses=_RERANK_ERRORS_DOC, summary=summary, operation_id=f"rerank_{flavour.name}_{path.strip('/').replace('/', '_')}")(rerank_as_reference)


def _service_app(service: SearchService, *, mounted: bool, collections: Sequence[str] = ()) -> FastAPI:
    """The routes of one collection's service (``mounted``: under /collections/{name} of the main app)."""
    SearchRequest = service.models.search
    RerankRequest = service.models.rerank
    CohereV1Request = service.models.cohere_v1
    CohereV2Request = service.models.cohere_v2

    title = "serve_app" if not mounted else f"serve_app: collection {service.collection}"
    app = FastAPI(title=title, version=serve_app.__version__, description=DESCRIPTION)
    app.router.route_class = json_route_class(service.cfg.limits.max_body_bytes)
    install_error_handlers(app)

    if not mounted:  # a mounted collection's requests are counted by the main app

        @app.middleware("http")
        async def count_requests(request: Request, call_next):  # type: ignore[no-untyped-def]
            response = await call_next(request)
            metrics.count_request(_endpoint(request), response.status_code)
            return response

    @app.post("/search", response_model=SearchResponse, response_model_exclude_unset=True, responses=_ERRORS_DOC, summary="Hybrid search with reranking")
    async def search(body: SearchRequest, request: Request) -> Any:  # type: ignore[valid-type]
        return await service.search(body, bound=key_scope(request).bound_filter(service.collection))

    @app.post("/rerank", response_model=Union[list[TEIRankOut], V1RerankResponse], response_model_exclude_none=True, responses=_RERANK_ERRORS_DOC, summary="Rerank: Text Embeddings Inference's shape (body with `texts`) or Cohere v1's; fields neither knows are ignored")
    async def rerank(body: RerankRequest) -> Any:  # type: ignore[valid-type]
        _count_ignored("rerank", body)
        return await service.rerank(body)

    @app.post("/v1/rerank", response_model=V1RerankResponse, response_model_exclude_none=True, responses=_RERANK_ERRORS_DOC, summary="Rerank documents (Cohere v1; Jina's rerank API)")
    async def rerank_v1(body: CohereV1Request) -> Any:  # type: ignore[valid-type]
        return await service.rerank(body)

    @app.post("/v2/rerank", response_model=RerankResponse, response_model_exclude_none=True, responses=_RERANK_ERRORS_DOC, summary="Rerank documents (Cohere v2)")
    async def rerank_v2(body: CohereV2Request) -> Any:  # type: ignore[valid-type]
        return await service.rerank(body)

    _flavour_routes(app, service)

    if service.cfg.writes.enabled:
        _document_routes(app, service)

    @app.get("/healthz", response_model=HealthResponse, responses={503: {"model": ErrorEnvelope, "description": "not_ready"}}, summary="Readiness")
    async def healthz() -> Any:
        ready, stages = await service.health()
        if not ready:
            detail = "; ".join(f"{k}: {v}" for k, v in stages.items() if v != "ok")
            raise ApiError("not_ready", f"not ready: {detail}")
        return {"status": "ok", "stages": stages}

    @app.get("/info", summary="Models, index size, limits, funnel defaults")
    async def info(request: Request) -> Any:
        scope = key_scope(request)
        out = {**await service.info(), "collection": service.collection}
        if not mounted:
            out["collections"] = [c for c in (DEFAULT_COLLECTION, *collections) if scope.sees(c)]
            enabled = bool(getattr(app.state, "auth_enabled", False))
            out["auth"] = {"api_key_required": enabled, "api_key_env": service.cfg.auth.api_key_env, **({"key": scope.name} if enabled else {})}
        return out

    return app


def create_app(service: SearchService, *, api_keys: Optional[Sequence[Any]] = None, collections: Optional[Mapping[str, SearchService]] = None) -> FastAPI:
    """The ASGI app serving ``service`` (the default collection) at the root and each of
    ``collections`` under ``/collections/{name}``.

    ``api_keys``: keys accepted as ``Authorization: Bearer`` tokens, plain (every operation) or
    (key, :class:`~serve_app.serve.auth.KeyScope`); None reads them from the environment variable
    ``service.cfg.auth.api_key_env`` and the scoped keys of ``service.cfg.auth`` (none: no
    authentication).
    """
    collections = dict(collections or {})
    app = _service_app(service, mounted=False, collections=list(collections))
    for name, svc in collections.items():
        app.mount(f"{COLLECTIONS_PREFIX}{name}", _service_app(svc, mounted=True))
    if api_keys is None:
        fields_of = {DEFAULT_COLLECTION: service.cfg.fields, **{n: s.cfg.fields for n, s in collections.items()}}
        api_keys = [*load_api_keys(service.cfg.auth.api_key_env), *load_scoped_keys(service.cfg.auth, fields_of, service.cfg.filters.limits())]
    # Last: the outermost middleware, so that requests without a valid key are refused before
    # anything reads their body.
    app.state.auth_enabled = install_api_key_auth(app, api_keys).enabled
    app.add_middleware(TraceRequests)  # outermost of all: refused requests are traced too
    return app


class TraceRequests:
    """ASGI middleware: each HTTP request in a ``serve_app.http`` span (a child of Ray Serve's
    replica span when Serve traces), its trace id in the ``X-Trace-Id`` response header."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        with tracing.span("serve_app.http", **{"http.request.method": scope.get("method"), "serve_app.endpoint": _endpoint_of_path(path), "url.path": path if not ("/documents/" in path) else None}) as sp:
            trace_id = tracing.current_trace_id()

            async def send_traced(message: Any) -> None:
                if message["type"] == "http.response.start":
                    tracing.annotate(sp, **{"http.response.status_code": message["status"]})
                    if trace_id:
                        message = {**message, "headers": [*message.get("headers", []), (tracing.TRACE_ID_HEADER.lower().encode(), trace_id.encode())]}
                await send(message)

            await self.app(scope, receive, send_traced)
