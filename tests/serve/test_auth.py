"""API key authentication of the HTTP API, in process (no Ray): SECURITY.md's design.

The app is driven through httpx's ASGI transport with the fake stages of ``serve_fakes``; the
test over real HTTP (Serve proxy, key in the replica's environment) is in test_reliability.py.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from typing import Any

import httpx
import pytest
from serve_fakes import FakeBackends, asgi_request, service_app, small_corpus

from serve_app.client import AsyncServeAppClient, ServeAppError
from serve_app.serve import auth as auth_mod
from serve_app.serve.auth import (
    APIKeyChecker,
    bearer_token,
    load_api_keys,
    relative_path,
)
from serve_app.serve.config import ConfigError, parse_app_config

CORPUS = small_corpus(30)
KEY = secrets.token_urlsafe(32)
OLD_KEY = secrets.token_urlsafe(32)
WRONG = secrets.token_urlsafe(32)
SEARCH = {"query": "protein gene", "top_k": 10, "rerank_top_m": 3, "top_n": 3}
RERANK = {"query": "protein gene", "documents": ["gene protein cell", "the sea"]}


def make_app(api_keys: Any = (KEY,), **overrides: Any):
    return service_app(FakeBackends(CORPUS), CORPUS, api_keys=api_keys, **overrides)[0]


def call(app, method: str, path: str, token: str | None = None, scheme: str = "Bearer", **kwargs: Any) -> httpx.Response:
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    return asgi_request(app, method, path, headers=headers, **kwargs)


def assert_unauthorized(r: httpx.Response, *, invalid_token: bool) -> str:
    assert r.status_code == 401, r.text
    expected = {"error": {"type": "unauthorized", "message": r.json()["error"]["message"]}}
    if r.request.url.path.endswith("/rerank"):  # Cohere's clients read the message at the top level
        expected["message"] = expected["error"]["message"]
    assert r.json() == expected
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert ('error="invalid_token"' in challenge) is invalid_token
    return r.json()["error"]["message"]


# --------------------------------------------------------------------------- keys and tokens


def test_keys_come_from_the_named_variable_comma_separated():
    assert load_api_keys("K", {}) == ()
    assert load_api_keys("K", {"K": "  "}) == ()
    assert load_api_keys("K", {"K": f" {KEY} , ,{OLD_KEY}"}) == (KEY, OLD_KEY)


@pytest.mark.parametrize("value,rule", [("Zq9x-7Kp", "shorter than 16"), ("a" * 20 + " b" * 3, "printable ASCII"), ("é" * 20, "printable ASCII")])
def test_bad_keys_fail_naming_the_variable_not_the_key(value, rule):
    with pytest.raises(ConfigError) as info:
        load_api_keys("MY_KEY_VAR", {"MY_KEY_VAR": f"{KEY},{value}"})
    message = str(info.value)
    assert "MY_KEY_VAR" in message and "#2" in message and rule in message
    assert value not in message and KEY not in message


def test_api_key_env_must_be_a_variable_name():
    assert parse_app_config({"index_dir": "/x"}, use_env=False).auth.api_key_env == "SERVE_APP_API_KEY"
    assert parse_app_config({"index_dir": "/x", "auth": {"api_key_env": "MY_SECRET_1"}}, use_env=False).auth.api_key_env == "MY_SECRET_1"
    with pytest.raises(ConfigError, match="auth.api_key_env"):
        parse_app_config({"index_dir": "/x", "auth": {"api_key_env": "not a name"}}, use_env=False)
    with pytest.raises(ConfigError, match="auth.api_key"):
        parse_app_config({"index_dir": "/x", "auth": {"api_key": KEY}}, use_env=False)  # the key itself never goes in the config


@pytest.mark.parametrize("header,token", [
    (f"Bearer {KEY}", KEY), (f"bearer   {KEY} ", KEY), (f"BEARER {KEY}", KEY),
    (None, None), ("", None), ("Bearer", None), ("Bearer   ", None), (f"Basic {KEY}", None), (KEY, None),
])
def test_bearer_token_parsing(header, token):
    assert bearer_token(header) == token


def test_checker_compares_every_key_in_constant_time(monkeypatch):
    checker = APIKeyChecker([KEY, OLD_KEY])
    assert checker.enabled and not APIKeyChecker([]).enabled
    assert checker.check(KEY) and checker.check(OLD_KEY)
    assert not checker.check(WRONG) and not checker.check(None) and not checker.check("") and not checker.check(KEY[:-1])
    assert KEY not in repr(checker)
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_mod.hmac, "compare_digest", spy)
    assert checker.check(KEY)  # matches the first key, still compares the second
    assert len(calls) == 2
    assert all(len(a) == len(b) == 32 for a, b in calls)  # digests: the key's length does not show either


def test_relative_path_strips_the_route_prefix():
    assert relative_path({"path": "/main/healthz", "root_path": "/main"}) == "/healthz"
    assert relative_path({"path": "/main/healthz/", "root_path": "/main/"}) == "/healthz"
    assert relative_path({"path": "/healthz", "root_path": ""}) == "/healthz"
    assert relative_path({"path": "/mainx/healthz", "root_path": "/main"}) == "/mainx/healthz"
    assert relative_path({"path": "/main", "root_path": "/main"}) == "/"


# --------------------------------------------------------------------------- the app


ENDPOINTS = [
    ("POST", "/search", {"json": SEARCH}),
    ("POST", "/rerank", {"json": RERANK}),
    ("POST", "/v1/rerank", {"json": RERANK}),
    ("POST", "/v2/rerank", {"json": RERANK}),
    ("GET", "/info", {}),
    ("GET", "/openapi.json", {}),
    ("GET", "/docs", {}),
]


@pytest.mark.parametrize("method,path,kwargs", ENDPOINTS, ids=[p for _, p, _ in ENDPOINTS])
def test_every_endpoint_but_healthz_needs_the_key(method, path, kwargs):
    app = make_app()
    missing = assert_unauthorized(call(app, method, path, **kwargs), invalid_token=False)
    assert "Authorization: Bearer" in missing
    assert_unauthorized(call(app, method, path, WRONG, **kwargs), invalid_token=True)
    assert_unauthorized(call(app, method, path, KEY, scheme="Basic", **kwargs), invalid_token=False)
    ok = call(app, method, path, KEY, **kwargs)
    assert ok.status_code == 200, ok.text


def test_healthz_is_exempt_and_keys_rotate():
    app = make_app(api_keys=[KEY, OLD_KEY])
    assert call(app, "GET", "/healthz").status_code == 200
    assert call(app, "GET", "/healthz", WRONG).status_code == 200
    assert call(app, "POST", "/healthz").status_code == 401  # only the probe itself is open
    for key in (KEY, OLD_KEY):
        assert call(app, "POST", "/search", key, json=SEARCH).status_code == 200


def test_rejected_before_routing_or_reading_the_body():
    app = make_app()
    # Unknown paths and oversized or malformed bodies get 401 too: nothing is revealed or parsed first.
    assert_unauthorized(call(app, "GET", "/nowhere"), invalid_token=False)
    assert_unauthorized(call(app, "POST", "/search", content=b"{not json", headers={"content-type": "application/json"}), invalid_token=False)
    assert_unauthorized(call(app, "POST", "/rerank", WRONG, content=b"x" * (9 * 1024 * 1024), headers={"content-type": "application/json"}), invalid_token=True)
    # With the key, the usual answers come back.
    assert call(app, "GET", "/nowhere", KEY).status_code == 404
    assert call(app, "POST", "/search", KEY, content=b"{not json", headers={"content-type": "application/json"}).status_code == 400


def test_no_key_configured_means_open_and_env_is_read(monkeypatch):
    monkeypatch.delenv("SERVE_APP_API_KEY", raising=False)
    open_app = make_app(api_keys=None)
    assert call(open_app, "POST", "/search", json=SEARCH).status_code == 200
    assert call(open_app, "GET", "/info").json()["auth"] == {"api_key_required": False, "api_key_env": "SERVE_APP_API_KEY"}

    monkeypatch.setenv("TEAM_API_KEY", f"{KEY},{OLD_KEY}")
    app = make_app(api_keys=None, auth={"api_key_env": "TEAM_API_KEY"})
    assert_unauthorized(call(app, "POST", "/search", json=SEARCH), invalid_token=False)
    assert call(app, "POST", "/search", OLD_KEY, json=SEARCH).status_code == 200
    info = call(app, "GET", "/info", KEY)
    assert info.json()["auth"] == {"api_key_required": True, "api_key_env": "TEAM_API_KEY", "key": "api_key"}  # the name of the key that asked, never the key
    assert KEY not in info.text and OLD_KEY not in info.text

    monkeypatch.setenv("TEAM_API_KEY", "too-short")
    with pytest.raises(ConfigError, match="TEAM_API_KEY"):
        make_app(api_keys=None, auth={"api_key_env": "TEAM_API_KEY"})


def test_keys_never_reach_logs_or_messages(caplog):
    app = make_app()
    caplog.set_level(logging.DEBUG)
    answers = [
        call(app, "POST", "/search", WRONG, json=SEARCH),
        call(app, "POST", "/search", KEY, json=SEARCH),
        call(app, "POST", "/search", KEY, json={"query": 5}),
        call(app, "GET", "/nowhere", KEY),
    ]
    assert [r.status_code for r in answers] == [401, 200, 422, 404]
    everything = caplog.text + "".join(r.text + str(dict(r.headers)) for r in answers)
    assert KEY not in everything and WRONG not in everything


def test_the_client_sends_the_key_and_does_not_retry_401():
    app = make_app()
    seen: list[int] = []

    async def go() -> tuple[dict, ServeAppError]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

        async def hook(response: httpx.Response) -> None:
            seen.append(response.status_code)

        async with AsyncServeAppClient("http://test", api_key=KEY, transport=transport) as good:
            out = await good.search("protein gene", top_n=2)
        async with AsyncServeAppClient("http://test", api_key=WRONG, transport=transport, retries=3, backoff_s=0.01) as bad:
            bad._http.event_hooks["response"].append(hook)
            with pytest.raises(ServeAppError) as info:
                await bad.health()  # open
                await bad.search("protein gene")
        return out, info.value

    out, err = asyncio.run(go())
    assert len(out["results"]) == 2
    assert err.status_code == 401 and err.type == "unauthorized"
    assert seen == [200, 401]  # /healthz answered, the 401 was not retried
