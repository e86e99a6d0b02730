"""HTTP API types: request and response models, the error envelope and its error types.

Request models are built from the configured limits (:func:`build_request_models`), so the
validation, the OpenAPI schema at ``/docs`` and ``GET /info`` all read the same
:class:`~serve_app.serve.config.RequestLimits` and :class:`~serve_app.config.FunnelLimits`.
Scalars are strict (``"5"`` is not an integer, ``1`` is not a boolean) and unknown fields are
rejected, so a client's mistake is reported instead of silently reinterpreted.

Every error answer has one shape, ``{"error": {"type": ..., "message": ...}}``; ``ERROR_TYPES``
lists the types and their status codes (docs/API.md is generated from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, field_validator, model_validator
from starlette.exceptions import HTTPException

from serve_app.config import FunnelLimits
from serve_app.serve.config import RequestLimits

# --------------------------------------------------------------------------- errors

#: error type -> (HTTP status, when it happens). Later features add theirs here.
ERROR_TYPES: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "The body is not valid JSON: malformed, not UTF-8, or holding NaN/Infinity."),
    "not_found": (404, "No such endpoint."),
    "method_not_allowed": (405, "The endpoint exists but not for this HTTP method."),
    "payload_too_large": (413, "The body exceeds limits.max_body_bytes."),
    "unsupported_media_type": (415, "The body is not sent as application/json (UTF-8)."),
    "validation_error": (422, "The JSON does not match the request schema: missing or unknown field, wrong type, empty list, too long string, too many documents, funnel size beyond its maximum."),
    "internal_error": (500, "An unexpected failure inside the service (a bug); the message holds no request data."),
    "service_unavailable": (503, "A stage needed for the answer is unavailable: every retriever failed, or the reranker failed for /rerank."),
    "not_ready": (503, "GET /healthz: a stage has not loaded its index or model yet, or does not answer."),
    "stage_timeout": (504, "A stage needed for the answer did not answer within its timeout (e.g. the reranker for /rerank)."),
    "unauthorized": (401, "An API key is configured and the request has no Authorization: Bearer header, or a key that is not valid (WWW-Authenticate: Bearer). GET /healthz is exempt."),
    "overloaded": (503, "A stage needed for the answer is at capacity (its queue, max_queued_requests, is full): the request was shed; retry after the Retry-After header's seconds."),
    "deadline_exceeded": (504, "The request did not complete within timeouts.request_timeout_s; its pending stage calls were cancelled."),
}


class ApiError(HTTPException):
    """An error answered with the envelope. Subclasses Starlette's HTTPException so that
    FastAPI re-raises it untouched from body parsing."""

    def __init__(self, error_type: str, message: str, status_code: int | None = None, headers: dict[str, str] | None = None) -> None:
        status = status_code if status_code is not None else ERROR_TYPES[error_type][0]
        super().__init__(status_code=status, detail=message, headers=headers)
        self.error_type = error_type
        self.message = message


class ErrorBody(BaseModel):
    type: str = Field(..., description="Machine-readable error type (see docs/API.md).")
    message: str = Field(..., description="What is wrong and how to fix it; never echoes request data beyond field names.")


class ErrorEnvelope(BaseModel):
    """The body of every error response."""

    error: ErrorBody


def envelope(error_type: str, message: str) -> dict[str, Any]:
    """The JSON body of an error answer."""
    return {"error": {"type": error_type, "message": message}}


# --------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain a non-whitespace character")
    return value


class TextDocument(_Request):
    """A document given as an object (Cohere v1 style)."""

    text: str = Field(..., strict=True, description="The document text.")


#: Tags of the two document forms; they appear in validation error locations and are dropped there.
DOCUMENT_TAGS = ("string", "object")


def _document_kind(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return "string"
    if isinstance(value, (dict, TextDocument)):
        return "object"
    return None


@dataclass(frozen=True)
class RequestModels:
    """The request models of one configuration."""

    search: type[BaseModel]
    rerank: type[BaseModel]


def build_request_models(limits: RequestLimits, funnel: FunnelLimits) -> RequestModels:
    """Request models whose constraints come from ``limits`` and ``funnel``."""
    Query = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=limits.max_query_chars)]
    DocText = Annotated[str, StringConstraints(strict=True, max_length=limits.max_document_chars)]

    class LimitedTextDocument(TextDocument):
        text: DocText = Field(..., description=f"The document text (at most {limits.max_document_chars} characters).")

    Document = Annotated[
        Union[Annotated[DocText, Tag("string")], Annotated[LimitedTextDocument, Tag("object")]],
        Discriminator(_document_kind, custom_error_type="document_type", custom_error_message="must be a string or an object with a `text` string"),
    ]

    class SearchRequest(_Request):
        """Hybrid search: retrieve with each retriever, fuse, rerank the head, return the top."""

        query: Query = Field(..., description=f"The search query (1 to {limits.max_query_chars} characters, not only whitespace).")
        top_k: Optional[int] = Field(None, strict=True, ge=1, le=funnel.max_top_k, description=f"Candidates fetched from each retriever (default {funnel.default_top_k}).")
        rerank_top_m: Optional[int] = Field(None, strict=True, ge=0, le=funnel.max_rerank_top_m, description=f"Fused candidates scored by the cross-encoder; 0 disables reranking (default {funnel.default_rerank_top_m}, capped by the candidate pool).")
        top_n: Optional[int] = Field(None, strict=True, ge=1, le=funnel.max_top_n, description=f"Results returned (default {funnel.default_top_n}).")
        retrievers: Optional[list[Literal["bm25", "dense"]]] = Field(None, min_length=1, max_length=2, description="Retrievers to use (default: all deployed).")
        return_documents: bool = Field(False, strict=True, description="Include each result's title and text.")

        _query_not_blank = field_validator("query")(_not_blank)

        @field_validator("retrievers")
        @classmethod
        def _unique(cls, v: Optional[list[str]]) -> Optional[list[str]]:
            if v is not None and len(set(v)) != len(v):
                raise ValueError("must not repeat a retriever")
            return v

    class RerankRequest(_Request):
        """Cohere v2 compatible rerank (``top_k`` accepted as an alias of ``top_n``)."""

        query: Query = Field(..., description=f"The query (1 to {limits.max_query_chars} characters).")
        documents: list[Document] = Field(..., min_length=1, max_length=limits.max_documents, description=f"1 to {limits.max_documents} documents: strings, or objects with a `text` string.")
        top_n: Optional[int] = Field(None, strict=True, ge=1, description="Results returned (default: all documents; larger values are capped at the number of documents).")
        top_k: Optional[int] = Field(None, strict=True, ge=1, description="Alias of top_n.")
        return_documents: bool = Field(False, strict=True, description="Include each result's document text.")
        model: Optional[str] = Field(None, strict=True, max_length=256, description="Accepted for compatibility; the configured reranker answers and `meta.model` names it.")
        max_tokens_per_doc: Optional[int] = Field(None, strict=True, ge=1, le=limits.max_tokens_per_doc, description="Document tokens read per document (longer documents are truncated).")

        _query_not_blank = field_validator("query")(_not_blank)

        @model_validator(mode="after")
        def _top_alias(self) -> "RerankRequest":
            if self.top_n is not None and self.top_k is not None and self.top_n != self.top_k:
                raise ValueError(f"top_n ({self.top_n}) and its alias top_k ({self.top_k}) disagree; send one of them")
            return self

        def texts(self) -> list[str]:
            """The documents as strings, in request order."""
            return [d if isinstance(d, str) else d.text for d in self.documents]

        def limit(self) -> int:
            """Results to return."""
            n = self.top_n if self.top_n is not None else self.top_k
            return len(self.documents) if n is None else min(n, len(self.documents))

    return RequestModels(search=SearchRequest, rerank=RerankRequest)


# --------------------------------------------------------------------------- responses


class RetrieverEvidence(BaseModel):
    rank: int = Field(..., description="1-based rank in that retriever's list.")
    score: float = Field(..., description="That retriever's raw score.")


class SearchHitOut(BaseModel):
    id: str = Field(..., description="Document id.")
    score: float = Field(..., description="Final score: the rerank score when reranked, else the fused score.")
    rerank_score: Optional[float] = Field(None, description="Cross-encoder score (null when the document was not reranked).")
    fused_score: float = Field(..., description="Fusion score.")
    retrievers: dict[str, RetrieverEvidence] = Field(..., description="Rank and score from each retriever that returned the document.")
    title: Optional[str] = Field(None, description="Document title (return_documents).")
    text: Optional[str] = Field(None, description="Document text (return_documents).")
    metadata: Optional[dict[str, Any]] = Field(None, description="Document metadata (return_documents).")


class StageReport(BaseModel):
    status: Literal["ok", "timeout", "error", "skipped"] = Field(..., description="ok, timeout or error (the stage was left out: degraded), or skipped (not requested).")
    candidates: int = Field(0, description="Documents the stage produced.")
    ms: float = Field(0.0, description="Wall time of the stage in milliseconds, as seen by the ingress.")
    error: Optional[str] = Field(None, description="Why the stage was left out.")
    batch_size: Optional[int] = Field(None, description="rerank: requests that shared the cross-encoder call.")


class FunnelOut(BaseModel):
    top_k: int
    rerank_top_m: int
    top_n: int
    retrievers: list[str]


class SearchResponse(BaseModel):
    query: str
    results: list[SearchHitOut]
    degraded: bool = Field(..., description="True when a stage failed or timed out and was left out (see stages).")
    stages: dict[str, StageReport] = Field(..., description="Per stage: bm25, dense, fusion, rerank.")
    timings_ms: dict[str, float] = Field(..., description="Wall time per stage and in total (milliseconds).")
    funnel: FunnelOut = Field(..., description="The sizes used (defaults applied).")


class RerankDocumentOut(BaseModel):
    text: str


class RerankResultOut(BaseModel):
    index: int = Field(..., description="Position of the document in the request's list.")
    relevance_score: float = Field(..., description="Cross-encoder score (higher is more relevant).")
    document: Optional[RerankDocumentOut] = Field(None, description="The document (return_documents).")


class RerankResponse(BaseModel):
    id: str
    results: list[RerankResultOut] = Field(..., description="Best first.")
    meta: dict[str, Any]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    stages: dict[str, str]
