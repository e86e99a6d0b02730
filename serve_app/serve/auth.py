"""Optional API key authentication of the HTTP API (bearer tokens), as designed in SECURITY.md.

The key comes from an environment variable of the ingress replicas (``auth.api_key_env``,
default ``SERVE_APP_API_KEY``), itself filled from a secret store; several comma-separated keys
allow rotation. Unset or empty: no authentication (the loopback default). Such a key may do
everything.

**Scoped keys** (:class:`KeyScope`) come from a secret too: a YAML or JSON list in the file
``auth.scoped_keys_file`` or in the environment variable ``auth.scoped_keys_env``, each entry
``{name, key, operations, collections, filter}``: the operations the key may use (``search``:
/search and GET /documents/{id}; ``rerank``: the rerank routes; ``write``: POST and DELETE
/documents; ``admin``: /info and the API docs), the collections it sees (``["*"]``: all), and
an optional *bound filter* ANDed into every search and checked on every document it reads or
writes, so that the request cannot widen it. An operation outside the scope is **403**
``forbidden``; a collection outside it is the same **404** ``not_found`` as a collection that
does not exist (nothing to probe).

With a key configured, every request except ``GET``/``HEAD /healthz`` (readiness probes) must
carry ``Authorization: Bearer <key>``; otherwise the answer is **401** with the error envelope
(``unauthorized``) and ``WWW-Authenticate: Bearer``, before the body is read. Tokens are
compared in constant time (``hmac.compare_digest`` on SHA-256 digests, so neither content nor
length leaks through timing) against every configured key. Neither the key nor the
``Authorization`` header is ever logged, echoed in an error message, or shown by ``/info``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional, Sequence, Union

from serve_app.serve import metrics
from serve_app.serve.api import envelope
from serve_app.serve.config import ConfigError
from serve_app.serve.flavours import FLAVOURS

#: Shortest accepted key. Generate one with ``python -c "import secrets; print(secrets.token_urlsafe(32))"``.
MIN_KEY_CHARS = 16
#: (method, path relative to the application's route prefix) answered without a key.
EXEMPT: frozenset[tuple[str, str]] = frozenset({("GET", "/healthz"), ("HEAD", "/healthz")})
REALM = "serve_app"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def load_api_keys(env_var: str, environ: Optional[Mapping[str, str]] = None) -> tuple[str, ...]:
    """The API keys in ``env_var`` (comma-separated; empty entries ignored). Raises :class:`ConfigError`
    naming the variable, never the key, when a key is too short or holds other than printable ASCII."""
    env = os.environ if environ is None else environ
    keys = tuple(k.strip() for k in env.get(env_var, "").split(",") if k.strip())
    for i, key in enumerate(keys, 1):
        if len(key) < MIN_KEY_CHARS:
            raise ConfigError(f"{env_var}: API key #{i} is shorter than {MIN_KEY_CHARS} characters; use a long random key (python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
        if not all(33 <= ord(c) <= 126 for c in key):
            raise ConfigError(f"{env_var}: API key #{i} holds a character other than printable ASCII without spaces")
    return keys


def bearer_token(authorization: Optional[str]) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header value (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


#: The operations a scoped key may be given.
OPERATIONS = ("search", "rerank", "write", "admin")
ALL_COLLECTIONS = "*"


@dataclass(frozen=True)
class KeyScope:
    """What one API key may do: ``operations``, ``collections`` (None: all) and, per collection,
    its bound filter (parsed; None: unfiltered). ``name`` identifies the key in answers and logs
    (never the key itself)."""

    name: str
    operations: frozenset[str] = frozenset(OPERATIONS)
    collections: Optional[frozenset[str]] = None
    filters: Mapping[str, Any] = None  # type: ignore[assignment]

    def sees(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections

    def may(self, operation: Optional[str]) -> bool:
        return operation is None or operation in self.operations

    def bound_filter(self, collection: str) -> Any:
        """The parsed filter bound to this key in ``collection`` (None: none)."""
        return (self.filters or {}).get(collection)


FULL_SCOPE = KeyScope("api_key")


def parse_scoped_keys(text: str, source: str, fields_of: Mapping[str, Mapping[str, str]], limits: Any = None) -> list[tuple[str, KeyScope]]:
    """The (key, scope) entries of a scoped-keys secret (YAML or JSON), checked against the
    collections (``fields_of``: each collection's declared fields, for the bound filters).
    Raises :class:`ConfigError` naming ``source`` and the entry's position and name, never a key."""
    import yaml

    from serve_app.filters import FilterError, FilterLimits, parse_filter

    try:
        entries = yaml.safe_load(text) if text.strip() else []
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML/JSON ({type(exc).__name__})") from None
    if isinstance(entries, dict) and "keys" in entries:
        entries = entries["keys"]
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: expected a list of keys ({{name, key, operations, collections, filter}})")
    out: list[tuple[str, KeyScope]] = []
    seen_names: set[str] = set()
    seen_keys: set[bytes] = set()
    for i, e in enumerate(entries, 1):
        where = f"{source}: key #{i}"
        if not isinstance(e, dict):
            raise ConfigError(f"{where}: expected an object")
        unknown = sorted(set(e) - {"name", "key", "operations", "collections", "filter"})
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}")
        name = e.get("name")
        if not isinstance(name, str) or not name.strip() or name in seen_names:
            raise ConfigError(f"{where}: needs a unique, non-empty name")
        where = f"{where} ({name})"
        seen_names.add(name)
        key = e.get("key")
        if not isinstance(key, str) or len(key) < MIN_KEY_CHARS or not all(33 <= ord(c) <= 126 for c in key):
            raise ConfigError(f"{where}: key must be at least {MIN_KEY_CHARS} printable ASCII characters without spaces")
        if _digest(key) in seen_keys:
            raise ConfigError(f"{where}: the same key is given twice")
        seen_keys.add(_digest(key))
        ops = e.get("operations")
        if not isinstance(ops, list) or not ops or any(o not in OPERATIONS for o in ops):
            raise ConfigError(f"{where}: operations must be a non-empty list among {list(OPERATIONS)}")
        cols = e.get("collections", [ALL_COLLECTIONS])
        if not isinstance(cols, list) or not cols or any(not isinstance(c, str) for c in cols):
            raise ConfigError(f"{where}: collections must be a non-empty list of names (or [\"*\"])")
        unknown_cols = sorted(set(cols) - set(fields_of) - {ALL_COLLECTIONS})
        if unknown_cols:
            raise ConfigError(f"{where}: unknown collection(s) {unknown_cols}; the collections are {sorted(fields_of)}")
        seen = None if ALL_COLLECTIONS in cols else frozenset(cols)
        filters: dict[str, Any] = {}
        if e.get("filter") is not None:
            for c in (sorted(fields_of) if seen is None else sorted(seen)):
                try:
                    filters[c] = parse_filter(e["filter"], fields_of[c], limits or FilterLimits(), path="filter")
                except FilterError as exc:
                    raise ConfigError(f"{where}: collection {c!r}: {exc}") from None
        out.append((key, KeyScope(name, frozenset(ops), seen, filters)))
    return out


def load_scoped_keys(auth: Any, fields_of: Mapping[str, Mapping[str, str]], limits: Any = None, environ: Optional[Mapping[str, str]] = None) -> list[tuple[str, KeyScope]]:
    """The scoped keys of ``auth`` (an :class:`~serve_app.serve.config.AuthConfig`): from its file
    and its environment variable (either or both; none: no scoped keys)."""
    env = os.environ if environ is None else environ
    out: list[tuple[str, KeyScope]] = []
    if auth.scoped_keys_file:
        try:
            text = open(auth.scoped_keys_file, encoding="utf-8").read()
        except OSError as exc:
            raise ConfigError(f"auth.scoped_keys_file: cannot read it ({type(exc).__name__})") from None
        out += parse_scoped_keys(text, "auth.scoped_keys_file", fields_of, limits)
    if env.get(auth.scoped_keys_env, "").strip():
        out += parse_scoped_keys(env[auth.scoped_keys_env], auth.scoped_keys_env, fields_of, limits)
    digests = [_digest(k) for k, _ in out]
    if len(set(digests)) != len(digests):
        raise ConfigError("scoped keys: the same key is given twice (file and environment)")
    return out


KeyEntry = Union[str, tuple[str, KeyScope]]


class APIKeyChecker:
    """Constant-time check of a presented token against the configured keys (only digests are
    kept). ``keys``: plain keys (every operation, every collection) or (key, :class:`KeyScope`)."""

    def __init__(self, keys: Iterable[KeyEntry]) -> None:
        entries = [(k, FULL_SCOPE) if isinstance(k, str) else k for k in keys]
        self._digests = tuple(_digest(k) for k, _ in entries)
        self._scopes = tuple(s for _, s in entries)

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (authentication required)."""
        return bool(self._digests)

    def identify(self, token: Optional[str]) -> Optional[KeyScope]:
        """The scope of the key ``token`` equals (None: no key matches). Every key is compared,
        whatever matches, and the comparison of digests takes the same time for any token."""
        if token is None or not self._digests:
            return None
        presented = _digest(token)
        found: Optional[KeyScope] = None
        for ref, scope in zip(self._digests, self._scopes):
            if hmac.compare_digest(presented, ref):
                found = scope
        return found

    def check(self, token: Optional[str]) -> bool:
        """True when ``token`` equals one of the keys."""
        return self.identify(token) is not None

    def __repr__(self) -> str:  # never show digests either
        return f"APIKeyChecker(keys={len(self._digests)})"


def _header(scope: Scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def relative_path(scope: Scope) -> str:
    """The request path below the application's route prefix (``root_path``)."""
    path = scope.get("path") or "/"
    root = (scope.get("root_path") or "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root):] or "/"
    return path.rstrip("/") or "/"


def _endpoint(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name if name in ("search", "rerank", "healthz", "info") else "other"


#: The route prefix of a named collection's API (``/collections/{name}/search`` ...).
COLLECTIONS_PREFIX = "/collections/"
DEFAULT_COLLECTION = "default"
_ADMIN_PATHS = frozenset({"/info", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
_RERANK_PATHS = frozenset({"/rerank", "/v1/rerank", "/v2/rerank", *(f.prefix + p for f in FLAVOURS for p, _ in f.routes)})


def split_collection(path: str) -> tuple[str, str]:
    """(collection, path inside it) of a relative request path: ``/collections/papers/search``
    is (``papers``, ``/search``); any other path belongs to the default collection."""
    if path.startswith(COLLECTIONS_PREFIX):
        name, _, rest = path[len(COLLECTIONS_PREFIX):].partition("/")
        return name, "/" + rest if rest else "/"
    return DEFAULT_COLLECTION, path


def operation_of(method: str, path: str) -> Optional[str]:
    """The operation a request needs in its collection (``path`` inside it), None for paths that
    belong to none (any valid key; they answer 404)."""
    if path == "/search":
        return "search"
    if path in _RERANK_PATHS:
        return "rerank"
    if path == "/documents":
        return "write"
    if path.startswith("/documents/"):
        return "search" if method in ("GET", "HEAD") else "write"
    if path in _ADMIN_PATHS:
        return "admin"
    return None  # /healthz of a collection, unknown paths: any key that sees the collection


def key_scope(request: Any) -> KeyScope:
    """The scope of the key that authenticated ``request`` (a Starlette request); every operation
    on every collection when authentication is off."""
    return getattr(request.state, "api_key", None) or FULL_SCOPE


class APIKeyMiddleware:
    """ASGI middleware: 401 with the error envelope unless the request carries a valid bearer
    key; 404 for a collection outside the key's scope (as for one that does not exist), 403 for
    an operation outside it; else the key's scope is left in the request's state."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], checker: APIKeyChecker) -> None:
        self.app = app
        self.checker = checker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or not self.checker.enabled:
            await self.app(scope, receive, send)
            return
        path = relative_path(scope)
        method = scope.get("method", "GET").upper()
        if (method, path) in EXEMPT:
            await self.app(scope, receive, send)
            return
        token = bearer_token(_header(scope, b"authorization"))
        found = self.checker.identify(token)
        if found is None:
            await self._refuse_unauthorized(path, token, send)
            return
        collection, inner = split_collection(path)
        if not found.sees(collection):
            await _answer(send, path, 404, "not_found", f"no endpoint {method} {scope.get('path') or '/'}; see /docs")
            return
        op = operation_of(method, inner)
        if not found.may(op):
            await _answer(send, path, 403, "forbidden", f"this API key ({found.name}) may not use {op}; its operations: {', '.join(sorted(found.operations))}")
            return
        scope.setdefault("state", {})["api_key"] = found
        await self.app(scope, receive, send)

    async def _refuse_unauthorized(self, path: str, token: Optional[str], send: Send) -> None:
        if token is None:
            message = "this endpoint needs an API key: send the header Authorization: Bearer <key>"
            challenge = f'Bearer realm="{REALM}"'
        else:
            message = "the API key is not valid"
            challenge = f'Bearer realm="{REALM}", error="invalid_token"'
        await _answer(send, path, 401, "unauthorized", message, [(b"www-authenticate", challenge.encode())])


async def _answer(send: Send, path: str, status: int, error_type: str, message: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    endpoint = _endpoint(path)
    metrics.count_error(endpoint, error_type)
    metrics.count_request(endpoint, status)
    body = json.dumps(envelope(error_type, message, path)).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


def install_api_key_auth(app: Any, keys: Iterable[KeyEntry]) -> APIKeyChecker:
    """Require one of ``keys`` (plain keys, or (key, :class:`KeyScope`)) on every request of the
    FastAPI ``app`` (no keys: nothing required).

    Add it last, so that it is the outermost middleware and rejects before anything reads the body.
    """
    checker = APIKeyChecker(keys)
    if checker.enabled:
        app.add_middleware(APIKeyMiddleware, checker=checker)
    return checker
