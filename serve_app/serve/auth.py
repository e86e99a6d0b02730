"""Optional API key authentication of the HTTP API (bearer tokens), as designed in SECURITY.md.

The key comes from an environment variable of the ingress replicas (``auth.api_key_env``,
default ``SERVE_APP_API_KEY``), itself filled from a secret store; several comma-separated keys
allow rotation. Unset or empty: no authentication (the loopback default).

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
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional

from serve_app.serve import metrics
from serve_app.serve.api import envelope
from serve_app.serve.config import ConfigError

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


class APIKeyChecker:
    """Constant-time check of a presented token against the configured keys (only digests are kept)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(k) for k in keys)

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (authentication required)."""
        return bool(self._digests)

    def check(self, token: Optional[str]) -> bool:
        """True when ``token`` equals one of the keys. Every key is compared, whatever matches."""
        if token is None or not self._digests:
            return False
        presented = _digest(token)
        matched = False
        for ref in self._digests:
            matched |= hmac.compare_digest(presented, ref)
        return matched

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


class APIKeyMiddleware:
    """ASGI middleware: 401 with the error envelope unless the request carries a valid bearer key."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], checker: APIKeyChecker) -> None:
        self.app = app
        self.checker = checker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or not self.checker.enabled:
            await self.app(scope, receive, send)
            return
        path = relative_path(scope)
        if (scope.get("method", "GET").upper(), path) in EXEMPT:
            await self.app(scope, receive, send)
            return
        token = bearer_token(_header(scope, b"authorization"))
        if self.checker.check(token):
            await self.app(scope, receive, send)
            return
        if token is None:
            message = "this endpoint needs an API key: send the header Authorization: Bearer <key>"
            challenge = f'Bearer realm="{REALM}"'
        else:
            message = "the API key is not valid"
            challenge = f'Bearer realm="{REALM}", error="invalid_token"'
        endpoint = _endpoint(path)
        metrics.count_error(endpoint, "unauthorized")
        metrics.count_request(endpoint, 401)
        body = json.dumps(envelope("unauthorized", message, path)).encode()
        await send({
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", challenge.encode()),
            ],
        })
        await send({"type": "http.response.body", "body": body})


def install_api_key_auth(app: Any, keys: Iterable[str]) -> APIKeyChecker:
    """Require one of ``keys`` on every request of the FastAPI ``app`` (no keys: nothing required).

    Add it last, so that it is the outermost middleware and rejects before anything reads the body.
    """
    checker = APIKeyChecker(keys)
    if checker.enabled:
        app.add_middleware(APIKeyMiddleware, checker=checker)
    return checker
