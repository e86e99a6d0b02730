"""Bad input over every body endpoint, in process (no Ray), and a schema-driven fuzz run.

The matrix is generated per endpoint (/search, /rerank, /v1/rerank) from the same categories:
malformed JSON, NaN/Infinity, binary and non-UTF-8 bodies, wrong content types, wrong types,
empty and oversized lists, too-long strings, out-of-range numbers, unknown fields and huge
bodies. Each case must get its documented 4xx with the error envelope, reach no stage, and
leave no trace of the request in the response or in the logs: every body carries a marker
string that must never appear in either.

The fuzz run (schemathesis, from the app's own /openapi.json) sends schema-valid and
schema-violating requests to every operation and checks: no 5xx, responses (errors included)
conform to the documented schemas and content types, and schema-violating data is rejected.
"""

from __future__ import annotations

import collections
import json
import logging
from typing import Any, Iterator, Optional

import httpx
import pytest
from serve_fakes import FakeBackends, asgi_request, service_app, small_corpus

from serve_app.serve.api import ERROR_TYPES

CORPUS = small_corpus(60)
MARK = "zq7-marker-5e1f"  # in every bad body; must never be echoed or logged
JSON_CT = "application/json"
LIMITS = {"max_body_bytes": 64 * 1024, "max_query_chars": 100, "max_documents": 5, "max_document_chars": 200}
PATHS = ("/search", "/rerank", "/v1/rerank", "/v2/rerank")


def make_app(**limits: Any):
    app, backends, _ = service_app(FakeBackends(CORPUS), CORPUS, api_keys=[], limits={**LIMITS, **limits}, timeouts={"retriever_timeout_s": 1.0, "rerank_timeout_s": 1.0})
    return app, backends


def send(app, path: str, content: Any, content_type: Optional[str], method: str = "POST") -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return asgi_request(app, method, path, content=content, headers=headers, base_url="http://t")


# --------------------------------------------------------------------------- the matrix


def _j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def bad_inputs(path: str) -> Iterator[tuple[str, str, Any, Optional[str], int, str]]:
    """(category, case, body, content type, status, error type) for one endpoint."""
    search = path == "/search"
    ok: dict[str, Any] = {"query": f"{MARK} gene"} if search else {"query": f"{MARK} gene", "documents": [f"{MARK} protein", "ocean"]}
    num = "top_k" if search else "top_n"
    body = _j(ok)

    def with_(**fields: Any) -> bytes:
        return _j({**ok, **fields})

    def raw_field(literal: str) -> bytes:
        return body[:-1] + f', "{num}": {literal}}}'.encode()

    for case, b in (
        ("truncated", body[:-1]),
        ("trailing garbage", body + b" }"),
        ("single quotes", f"{{'query': '{MARK}'}}".encode()),
        ("unquoted key", f'{{query: "{MARK}"}}'.encode()),
        ("deep nesting", b'{"query": ' + b"[" * 20000 + b"]" * 20000 + b"}"),  # within the body limit, beyond the parser's recursion limit
    ):
        yield "malformed JSON", case, b, JSON_CT, 400, "invalid_json"
    for literal in ("NaN", "Infinity", "-Infinity", "1e999", "-1e400"):
        yield "NaN/Infinity", literal, raw_field(literal), JSON_CT, 400, "invalid_json"
    for case, b in (
        ("PNG bytes", b"\x89PNG\r\n\x1a\n\x00\x00" + MARK.encode() + bytes(range(256))),
        ("NUL bytes", b"\x00" * 64 + MARK.encode()),
        ("invalid UTF-8 in a string", b'{"query": "' + MARK.encode() + b' \xff\xfe"}'),
        ("UTF-16 JSON", json.dumps(ok).encode("utf-16")),
        ("UTF-8 BOM", b"\xef\xbb\xbf" + body),
    ):
        yield "binary body", case, b, JSON_CT, 400, "invalid_json"
    for ct in ("text/plain", None, "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json; charset=latin-1", "application/xml", "application/octet-stream"):
        content = f"query={MARK}".encode() if ct and "form" in ct else body
        yield "wrong content type", str(ct), content, ct, 415, "unsupported_media_type"
    wrong_types: list[tuple[str, bytes]] = [
        ("body is an array", _j([ok])),
        ("body is a string", _j(MARK)),
        ("body is a number", b"42"),
        ("body is null", b"null"),
        ("query is a number", with_(query=5)),
        ("query is a list", with_(query=[MARK])),
        ("query is null", with_(query=None)),
        (f"{num} is a string", with_(**{num: "5"})),
        (f"{num} is a float", with_(**{num: 5.5})),
        (f"{num} is a bool", with_(**{num: True})),
        ("return_documents is a string", with_(return_documents="yes")),
        ("return_documents is 1", with_(return_documents=1)),
    ]
    if search:
        wrong_types += [("retrievers is a string", with_(retrievers="bm25")), ("unknown retriever", with_(retrievers=[MARK]))]
    else:
        wrong_types += [
            ("documents is a string", with_(documents=MARK)),
            ("document is null", with_(documents=[None])),
            ("document is a number", with_(documents=[3])),
            ("document text is a number", with_(documents=[{"text": 5, "note": MARK}])),
            ("document object without text", with_(documents=[{"body": MARK}])),
            ("model is a number", with_(model=7)),
        ]
    for case, b in wrong_types:
        yield "wrong types", case, b, JSON_CT, 422, "validation_error"
    empty = [("empty body", b""), ("empty object", b"{}"), ("empty query", with_(query="")), ("blank query", with_(query="  \t\n "))]
    empty += [("empty retrievers", with_(retrievers=[]))] if search else [("empty documents", with_(documents=[]))]
    for case, b in empty:
        yield "empty", case, b, JSON_CT, 422, "validation_error"
    if search:
        over = [("3 retrievers", with_(retrievers=["bm25", "dense", "bm25"])), ("repeated retriever", with_(retrievers=["bm25", "bm25"]))]
    else:
        over = [(f"{LIMITS['max_documents'] + 1} documents", with_(documents=[MARK] * (LIMITS["max_documents"] + 1)))]
    for case, b in over:
        yield "oversized list", case, b, JSON_CT, 422, "validation_error"
    long_q = MARK + "q" * LIMITS["max_query_chars"]
    too_long = [("query", with_(query=long_q))]
    if not search:
        too_long += [
            ("document string", with_(documents=[MARK + "d" * LIMITS["max_document_chars"]])),
            ("document object", with_(documents=[{"text": MARK + "d" * LIMITS["max_document_chars"]}])),
            ("model", with_(model=MARK + "m" * 256)),
        ]
    for case, b in too_long:
        yield "too-long string", case, b, JSON_CT, 422, "validation_error"
    big = 10**30  # an integer beyond every limit (and beyond int64)
    out_of_range = [(f"{num}=0", with_(**{num: 0})), (f"{num}=-1", with_(**{num: -1}))]
    if search:
        out_of_range += [("top_k=10**30", with_(top_k=big)), ("rerank_top_m=-1", with_(rerank_top_m=-1)), ("top_n=10**30", with_(top_n=big))]
    else:
        out_of_range += [("max_tokens_per_doc=10**30", with_(max_tokens_per_doc=big)), ("max_tokens_per_doc=0", with_(max_tokens_per_doc=0))]
    for case, b in out_of_range:
        yield "out of range", case, b, JSON_CT, 422, "validation_error"
    # The message names an unknown field (field names are the request's structure), never its value.
    if path != "/rerank":  # /rerank ignores unknown top-level fields, as TEI, infinity and vLLM do (test_gateways.py)
        yield "unknown field", "extra field", with_(colour=MARK), JSON_CT, 422, "validation_error"
    if search:
        yield "unknown field", "extra field in an object", with_(flavour={"x": MARK}), JSON_CT, 422, "validation_error"
    elif path == "/v2/rerank":
        yield "unknown field", "extra field in a document", with_(documents=[{"text": "a", "colour": MARK}]), JSON_CT, 422, "validation_error"
    else:  # Cohere v1 documents are objects with any fields; the ranked ones must exist
        yield "unknown field", "rank field missing from a document", with_(documents=[{"text": "a", "note": MARK}], rank_fields=["colour"]), JSON_CT, 422, "validation_error"
    huge = LIMITS["max_body_bytes"] + 1
    yield "huge body", "long string", with_(query=MARK + "x" * huge), JSON_CT, 413, "payload_too_large"
    yield "huge body", "long list", with_(documents=[MARK] * (huge // 10)), JSON_CT, 413, "payload_too_large"
    yield "huge body", "binary", b"\xff" * huge, JSON_CT, 413, "payload_too_large"


MATRIX = [(path, *case) for path in PATHS for case in bad_inputs(path)]
CATEGORIES = ("malformed JSON", "NaN/Infinity", "binary body", "wrong content type", "wrong types", "empty", "oversized list", "too-long string", "out of range", "unknown field", "huge body")


def test_every_endpoint_gets_every_category():
    for path in PATHS:
        assert {c[1] for c in MATRIX if c[0] == path} == set(CATEGORIES), path


@pytest.mark.parametrize("path,category,case,body,ctype,status,etype", MATRIX, ids=[f"{m[0]}-{m[1]}-{m[2]}" for m in MATRIX])
def test_bad_input_gets_its_documented_4xx_and_is_not_echoed_or_logged(path, category, case, body, ctype, status, etype, caplog, capsys):
    app, backends = make_app()
    caplog.set_level(logging.DEBUG)
    r = send(app, path, body, ctype)
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert ERROR_TYPES[etype][0] == status  # the documented status of that error type
    err = r.json()
    expected_keys = {"error", "message"} if path.endswith("/rerank") else {"error"}  # Cohere's clients read a top-level message
    assert set(err) == expected_keys and set(err["error"]) == {"type", "message"}, err
    assert err.get("message", err["error"]["message"]) == err["error"]["message"]
    assert err["error"]["type"] == etype and err["error"]["message"]
    assert r.headers["content-type"].startswith("application/json")
    assert not backends.calls  # rejected before any stage
    assert MARK not in r.text
    if category == "unknown field":
        assert "colour" in err["error"]["message"] or "flavour" in err["error"]["message"], err
    logged = caplog.text + "".join(str(rec.args) for rec in caplog.records)
    out, errs = capsys.readouterr()
    assert MARK not in logged and MARK not in out and MARK not in errs


def test_body_limit_without_content_length_on_every_endpoint(caplog):
    app, backends = make_app()
    caplog.set_level(logging.DEBUG)

    async def chunks():
        yield b'{"query": "' + MARK.encode()
        for _ in range(80):
            yield b"x" * 1024

    for path in PATHS:
        r = send(app, path, chunks(), JSON_CT)
        assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large", r.text
    assert not backends.calls and MARK not in caplog.text


def test_a_valid_request_with_the_marker_is_answered_and_not_logged(caplog):
    """Control: the same bodies without the defect succeed, and successful requests are not logged either."""
    app, backends = make_app()
    caplog.set_level(logging.DEBUG)
    for path in PATHS:
        ok = {"query": f"{MARK} gene"} if path == "/search" else {"query": f"{MARK} gene", "documents": [f"{MARK} protein", "ocean"]}
        r = send(app, path, _j(ok), JSON_CT)
        assert r.status_code == 200, r.text
    assert backends.calls
    assert MARK not in caplog.text


# --------------------------------------------------------------------------- schema-driven fuzz


FUZZ_EXAMPLES = 150  # per body operation and generation mode: ~900 cases, well under a minute


@pytest.mark.slow
def test_schemathesis_fuzz_finds_no_5xx_and_responses_match_the_schema():
    import schemathesis
    from schemathesis import GenerationMode

    app, _ = make_app()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    statuses: collections.Counter = collections.Counter()
    failures: list[str] = []
    operations = list(schema.get_all_operations())
    for result in operations:
        op = result.ok()
        for mode in [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else []):
            _fuzz_operation(op, mode, statuses, failures)
    total = sum(statuses.values())
    server_errors = sum(n for (_, _, status), n in statuses.items() if status >= 500)
    summary = ", ".join(f"{op} {mode} {status}: {n}" for (op, mode, status), n in sorted(statuses.items()))
    print(f"\nschemathesis: {total} cases over {len(operations)} operations, {server_errors} with a 5xx; {summary}")
    assert server_errors == 0 and not failures, failures[:5]
    # Not vacuous: every body endpoint answered both accepted (2xx) and rejected (4xx) cases.
    for path in PATHS:
        seen = {status // 100 for (op, _, status) in statuses if op == f"POST {path}"}
        assert {2, 4} <= seen, (path, seen)
    assert total >= 5 * FUZZ_EXAMPLES


def _fuzz_operation(op: Any, mode: Any, statuses: collections.Counter, failures: list[str]) -> None:
    """Run schemathesis cases of one operation and generation mode; count statuses, collect failures."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
    )

    label = f"{op.method.upper()} {op.path}"
    checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
    if mode.is_negative:
        checks.append(negative_data_rejection)

    @settings(max_examples=FUZZ_EXAMPLES if op.method.upper() == "POST" else 5, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call()
        statuses[(label, mode.value, response.status_code)] += 1
        try:
            case.validate_response(response, checks=checks)
        except Exception as exc:  # noqa: BLE001 - collect every failure, report them together
            failures.append(f"{label} [{mode.value}] -> {response.status_code}: {str(exc)[:300]}")

    run()
