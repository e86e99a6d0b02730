"""A small Python client of the serve_app HTTP API (sync and async, built on httpx).

>>> from serve_app.client import ServeAppClient
>>> with ServeAppClient("http://127.0.0.1:8000") as c:          # doctest: +SKIP
...     hits = c.search("how do vaccines work", top_n=3)["results"]
...     ranked = c.rerank("capital of France", ["Paris is...", "Berlin is..."])["results"]      # Cohere v1 / Jina
...     ranked = c.rerank_v2("capital of France", ["Paris is...", "Berlin is..."], model="small")["results"]  # Cohere v2
...     ranks = c.rerank_tei("capital of France", ["Paris is...", "Berlin is..."])          # TEI: a list

Live writes (when the service has ``writes.enabled``)::

    c.upsert_documents([{"id": "d1", "text": "...", "title": "...", "metadata": {...}}], refresh="wait_for")
    c.delete_documents(["d1"])            # {"deleted": [...], "absent": [...]}
    c.get_document("d1")                   # None once deleted

``model`` (``reranker`` for :meth:`search`) picks one of the service's configured rerankers;
``instruction`` sets a decoder reranker's prompt instruction for the request.

Errors come back as :class:`ServeAppError` carrying the service's envelope
(``{"error": {"type", "message"}}``) and the HTTP status. ``retries`` (default 0) retries
connection failures, client-side timeouts and 429/502/503/504 answers (overload, a replica
restarting, a deadline) with exponential backoff and jitter, honouring ``Retry-After``; every
endpoint is idempotent (search, rerank, health, info, and writes: an upsert sent twice leaves
the same documents, a delete sent twice deletes nothing more), so retrying is safe. Other 4xx (bad input,
401) are never retried.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Optional, Sequence, Union

import httpx

DocumentIn = Union[str, dict[str, Any]]
RETRYABLE_STATUS = (429, 502, 503, 504)
#: Longest single wait between attempts (seconds), whatever Retry-After or the backoff says.
MAX_BACKOFF_S = 30.0


class ServeAppError(Exception):
    """An error answer of the service (or a failure to reach it: ``status_code`` 0)."""

    def __init__(self, status_code: int, error_type: str, message: str) -> None:
        super().__init__(f"{status_code} {error_type}: {message}")
        self.status_code = status_code
        self.type = error_type
        self.message = message

    @property
    def envelope(self) -> dict[str, Any]:
        """The error as the service's envelope."""
        return {"error": {"type": self.type, "message": self.message}}


def _error_from(response: httpx.Response) -> ServeAppError:
    try:
        body = response.json()
        err = body["error"]
        return ServeAppError(response.status_code, str(err["type"]), str(err["message"]))
    except Exception:  # noqa: BLE001 - not our envelope (e.g. a proxy's plain-text answer)
        return ServeAppError(response.status_code, "http_error", response.text[:500])


def _body(required: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """A request body: the required fields, and the optional ones that are set (sequences as lists)."""
    body = dict(required)
    for key, value in optional.items():
        if value is not None:
            body[key] = list(value) if isinstance(value, (list, tuple)) else value
    return body


def _search_body(query: str, top_k: Optional[int], rerank_top_m: Optional[int], top_n: Optional[int], retrievers: Optional[Sequence[str]], return_documents: bool, reranker: Optional[str] = None, instruction: Optional[str] = None, filter: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return _body({"query": query, "return_documents": return_documents}, top_k=top_k, rerank_top_m=rerank_top_m, top_n=top_n, retrievers=retrievers, reranker=reranker, instruction=instruction, filter=filter)


def _rerank_body(query: str, documents: Sequence[DocumentIn], top_n: Optional[int], return_documents: bool, model: Optional[str], max_tokens_per_doc: Optional[int], rank_fields: Optional[Sequence[str]] = None, max_chunks_per_doc: Optional[int] = None, instruction: Optional[str] = None) -> dict[str, Any]:
    return _body({"query": query, "documents": list(documents), "return_documents": return_documents}, top_n=top_n, model=model, max_tokens_per_doc=max_tokens_per_doc, rank_fields=rank_fields, max_chunks_per_doc=max_chunks_per_doc, instruction=instruction)


def _rerank_v2_body(query: str, documents: Sequence[DocumentIn], model: Optional[str], top_n: Optional[int], max_tokens_per_doc: Optional[int], return_documents: bool, instruction: Optional[str] = None) -> dict[str, Any]:
    return _body({"query": query, "documents": list(documents)}, model=model, top_n=top_n, max_tokens_per_doc=max_tokens_per_doc, return_documents=return_documents or None, instruction=instruction)


def _tei_body(query: str, texts: Sequence[str], raw_scores: bool, return_text: bool, truncate: bool, truncation_direction: str, model: Optional[str], instruction: Optional[str] = None) -> dict[str, Any]:
    return _body({"query": query, "texts": list(texts), "raw_scores": raw_scores, "return_text": return_text, "truncate": truncate, "truncation_direction": truncation_direction}, model=model, instruction=instruction)


def _write_body(key: str, items: Sequence[Any], refresh: Optional[str]) -> dict[str, Any]:
    return _body({key: list(items)}, refresh=refresh)


def _document_path(doc_id: str) -> str:
    from urllib.parse import quote

    return "/documents/" + quote(doc_id, safe="")


def _delay(attempt: int, response: Optional[httpx.Response], backoff_s: float) -> float:
    if response is not None:
        retry_after = response.headers.get("retry-after", "")
        if retry_after.strip().isdigit():
            return min(float(retry_after) + backoff_s * random.random(), MAX_BACKOFF_S)  # jitter: no herd
    return min(backoff_s * (2**attempt) * (0.5 + random.random()), MAX_BACKOFF_S)


class _Base:
    def __init__(self, base_url: str, api_key: Optional[str], retries: int, backoff_s: float) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self.headers = {"Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise _error_from(response)
        try:
            return response.json()
        except ValueError:
            raise ServeAppError(response.status_code, "invalid_response", "the service answered with a body that is not JSON") from None


class ServeAppClient(_Base):
    """Synchronous client. Use as a context manager or call :meth:`close`."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, timeout: float = 30.0, *, retries: int = 0, backoff_s: float = 0.2, transport: Optional[httpx.BaseTransport] = None) -> None:
        super().__init__(base_url, api_key, retries, backoff_s)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=self.headers, transport=transport)

    def _request(self, method: str, path: str, body: Optional[dict[str, Any]] = None) -> Any:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, path, json=body)
            except httpx.TransportError as exc:
                if last:
                    raise ServeAppError(0, "connection_error", f"{type(exc).__name__}: {exc}") from exc
                time.sleep(_delay(attempt, None, self.backoff_s))
                continue
            if response.status_code in RETRYABLE_STATUS and not last:
                time.sleep(_delay(attempt, response, self.backoff_s))
                continue
            return self._check(response)
        raise AssertionError("unreachable")

    def search(self, query: str, *, top_k: Optional[int] = None, rerank_top_m: Optional[int] = None, top_n: Optional[int] = None, retrievers: Optional[Sequence[str]] = None, return_documents: bool = False, reranker: Optional[str] = None, instruction: Optional[str] = None, filter: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """``POST /search``; ``reranker`` names one of the configured rerankers; ``instruction``: a decoder reranker's prompt instruction; ``filter``: a metadata filter (docs/API.md#filters). A collection's client: ``base_url`` ending in ``/collections/{name}``."""
        return self._request("POST", "/search", _search_body(query, top_k, rerank_top_m, top_n, retrievers, return_documents, reranker, instruction, filter))

    def rerank(
        self, query: str, documents: Sequence[DocumentIn], *, top_n: Optional[int] = None, return_documents: bool = False, model: Optional[str] = None,
        max_tokens_per_doc: Optional[int] = None, rank_fields: Optional[Sequence[str]] = None, max_chunks_per_doc: Optional[int] = None, instruction: Optional[str] = None,
    ) -> dict[str, Any]:
        """``POST /v1/rerank``: Cohere v1's request and answer (Jina's ``model`` and ``usage`` included)."""
        return self._request("POST", "/v1/rerank", _rerank_body(query, documents, top_n, return_documents, model, max_tokens_per_doc, rank_fields, max_chunks_per_doc, instruction))

    def rerank_v2(self, query: str, documents: Sequence[DocumentIn], *, model: Optional[str] = None, top_n: Optional[int] = None, max_tokens_per_doc: Optional[int] = None, return_documents: bool = False, instruction: Optional[str] = None) -> dict[str, Any]:
        """``POST /v2/rerank``: Cohere v2's request and answer."""
        return self._request("POST", "/v2/rerank", _rerank_v2_body(query, documents, model, top_n, max_tokens_per_doc, return_documents, instruction))

    def rerank_tei(
        self, query: str, texts: Sequence[str], *, raw_scores: bool = False, return_text: bool = False, truncate: bool = False, truncation_direction: str = "Right", model: Optional[str] = None, instruction: Optional[str] = None,
    ) -> list[dict[str, Any]]:
        """``POST /rerank`` with ``texts``: Text Embeddings Inference's request, its answer a list ``[{index, score, text?}]``."""
        return self._request("POST", "/rerank", _tei_body(query, texts, raw_scores, return_text, truncate, truncation_direction, model, instruction))

    def upsert_documents(self, documents: Sequence[dict[str, Any]], *, refresh: Optional[str] = None) -> dict[str, Any]:
        """``POST /documents``: add or replace documents (``id``, ``text``, optional ``title`` and
        ``metadata``) as one batch; ``refresh="wait_for"`` answers once every replica serves it."""
        return self._request("POST", "/documents", _write_body("documents", documents, refresh))

    def delete_documents(self, ids: Sequence[str], *, refresh: Optional[str] = None) -> dict[str, Any]:
        """``DELETE /documents``: one batch; the answer's ``absent`` lists the ids that were not there."""
        return self._request("DELETE", "/documents", _write_body("ids", ids, refresh))

    def get_document(self, doc_id: str) -> Optional[dict[str, Any]]:
        """``GET /documents/{id}``: the latest acknowledged version, or None when there is none."""
        try:
            return self._request("GET", _document_path(doc_id))
        except ServeAppError as exc:
            if exc.status_code == 404 and exc.type == "document_not_found":
                return None
            raise

    def health(self) -> dict[str, Any]:
        """``GET /healthz``; raises :class:`ServeAppError` (``not_ready``) while a stage is not ready."""
        return self._request("GET", "/healthz")

    def info(self) -> dict[str, Any]:
        """``GET /info``."""
        return self._request("GET", "/info")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ServeAppClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncServeAppClient(_Base):
    """Asynchronous client (``async with``)."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, timeout: float = 30.0, *, retries: int = 0, backoff_s: float = 0.2, transport: Optional[httpx.AsyncBaseTransport] = None) -> None:
        super().__init__(base_url, api_key, retries, backoff_s)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=self.headers, transport=transport)

    async def _request(self, method: str, path: str, body: Optional[dict[str, Any]] = None) -> Any:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = await self._http.request(method, path, json=body)
            except httpx.TransportError as exc:
                if last:
                    raise ServeAppError(0, "connection_error", f"{type(exc).__name__}: {exc}") from exc
                await asyncio.sleep(_delay(attempt, None, self.backoff_s))
                continue
            if response.status_code in RETRYABLE_STATUS and not last:
                await asyncio.sleep(_delay(attempt, response, self.backoff_s))
                continue
            return self._check(response)
        raise AssertionError("unreachable")

    async def search(self, query: str, *, top_k: Optional[int] = None, rerank_top_m: Optional[int] = None, top_n: Optional[int] = None, retrievers: Optional[Sequence[str]] = None, return_documents: bool = False, reranker: Optional[str] = None, instruction: Optional[str] = None, filter: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """``POST /search``; ``reranker`` names one of the configured rerankers; ``instruction``: a decoder reranker's prompt instruction; ``filter``: a metadata filter (docs/API.md#filters). A collection's client: ``base_url`` ending in ``/collections/{name}``."""
        return await self._request("POST", "/search", _search_body(query, top_k, rerank_top_m, top_n, retrievers, return_documents, reranker, instruction, filter))

    async def rerank(
        self, query: str, documents: Sequence[DocumentIn], *, top_n: Optional[int] = None, return_documents: bool = False, model: Optional[str] = None,
        max_tokens_per_doc: Optional[int] = None, rank_fields: Optional[Sequence[str]] = None, max_chunks_per_doc: Optional[int] = None, instruction: Optional[str] = None,
    ) -> dict[str, Any]:
        """``POST /v1/rerank``: Cohere v1's request and answer (Jina's ``model`` and ``usage`` included)."""
        return await self._request("POST", "/v1/rerank", _rerank_body(query, documents, top_n, return_documents, model, max_tokens_per_doc, rank_fields, max_chunks_per_doc, instruction))

    async def rerank_v2(self, query: str, documents: Sequence[DocumentIn], *, model: Optional[str] = None, top_n: Optional[int] = None, max_tokens_per_doc: Optional[int] = None, return_documents: bool = False, instruction: Optional[str] = None) -> dict[str, Any]:
        """``POST /v2/rerank``: Cohere v2's request and answer."""
        return await self._request("POST", "/v2/rerank", _rerank_v2_body(query, documents, model, top_n, max_tokens_per_doc, return_documents, instruction))

    async def rerank_tei(
        self, query: str, texts: Sequence[str], *, raw_scores: bool = False, return_text: bool = False, truncate: bool = False, truncation_direction: str = "Right", model: Optional[str] = None, instruction: Optional[str] = None,
    ) -> list[dict[str, Any]]:
        """``POST /rerank`` with ``texts``: Text Embeddings Inference's request, its answer a list ``[{index, score, text?}]``."""
        return await self._request("POST", "/rerank", _tei_body(query, texts, raw_scores, return_text, truncate, truncation_direction, model, instruction))

    async def upsert_documents(self, documents: Sequence[dict[str, Any]], *, refresh: Optional[str] = None) -> dict[str, Any]:
        """``POST /documents``: add or replace documents (``id``, ``text``, optional ``title`` and
        ``metadata``) as one batch; ``refresh="wait_for"`` answers once every replica serves it."""
        return await self._request("POST", "/documents", _write_body("documents", documents, refresh))

    async def delete_documents(self, ids: Sequence[str], *, refresh: Optional[str] = None) -> dict[str, Any]:
        """``DELETE /documents``: one batch; the answer's ``absent`` lists the ids that were not there."""
        return await self._request("DELETE", "/documents", _write_body("ids", ids, refresh))

    async def get_document(self, doc_id: str) -> Optional[dict[str, Any]]:
        """``GET /documents/{id}``: the latest acknowledged version, or None when there is none."""
        try:
            return await self._request("GET", _document_path(doc_id))
        except ServeAppError as exc:
            if exc.status_code == 404 and exc.type == "document_not_found":
                return None
            raise

    async def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        return await self._request("GET", "/healthz")

    async def info(self) -> dict[str, Any]:
        """``GET /info``."""
        return await self._request("GET", "/info")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncServeAppClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
