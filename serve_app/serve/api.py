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

from dataclasses import dataclass, replace
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, field_validator, model_validator
from starlette.exceptions import HTTPException

from serve_app.config import FunnelLimits
from serve_app.serve.config import RequestLimits
from serve_app.types import RerankRequest as CoreRerankRequest

# --------------------------------------------------------------------------- errors

#: error type -> (HTTP status, when it happens). Later features add theirs here.
ERROR_TYPES: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "The body is not valid JSON: malformed, not UTF-8, or holding NaN/Infinity."),
    "not_found": (404, "No such endpoint."),
    "method_not_allowed": (405, "The endpoint exists but not for this HTTP method."),
    "payload_too_large": (413, "The body exceeds limits.max_body_bytes."),
    "unsupported_media_type": (415, "The body is not sent as application/json (UTF-8)."),
    "validation_error": (422, "The JSON does not match the request schema: missing or unknown field, wrong type, empty list, too long string, too many documents, funnel size beyond its maximum, an instruction sent to a reranker that has no prompt (not kind causal_lm)."),
    "internal_error": (500, "An unexpected failure inside the service (a bug); the message holds no request data."),
    "service_unavailable": (503, "A stage needed for the answer is unavailable: every retriever failed, or the reranker failed for /rerank."),
    "not_ready": (503, "GET /healthz: a stage has not loaded its index or model yet, or does not answer."),
    "stage_timeout": (504, "A stage needed for the answer did not answer within its timeout (e.g. the reranker for /rerank)."),
    "unauthorized": (401, "An API key is configured and the request has no Authorization: Bearer header, or a key that is not valid (WWW-Authenticate: Bearer). GET /healthz is exempt."),
    "overloaded": (503, "A stage needed for the answer is at capacity (its queue, max_queued_requests, is full): the request was shed; retry after the Retry-After header's seconds."),
    "deadline_exceeded": (504, "The request did not complete within timeouts.request_timeout_s; its pending stage calls were cancelled."),
    "model_not_found": (404, "The request names a reranker model (`model`, or `reranker` on /search) that is not configured; the message lists the available names and aliases."),
    "document_not_found": (404, "GET /documents/{id}: no live document has this id."),
    "invalid_filter": (422, "/search: the filter names a field the collection does not declare, uses an operator its type does not have or a value of the wrong type, or is larger than the filters limits. The message names the path (e.g. filter.and[1].year.gte). (A write whose metadata gives a declared field a value of the wrong type is a validation_error naming documents[i].metadata.field.)"),
    "forbidden": (403, "The API key's scope does not allow this operation (search, rerank, write, admin), or a write would touch a document outside the key's bound filter."),
    "input_too_long": (413, "TEI shape with truncate=false: a query and document pair is longer than the model reads (its max_length tokens); or, for a decoder reranker, the query with its prompt and instruction leaves no room for a document token (queries are never cut)."),
}

#: The rerank routes answer a shed request (``overloaded``) with 429, as Cohere, Jina and TEI do;
#: /search keeps 503.
RERANK_OVERLOADED_STATUS = 429


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
    message: Optional[str] = Field(None, description="The rerank routes only: error.message again, where Cohere's and Jina's clients read it.")


def is_rerank_path(path: str) -> bool:
    """Whether ``path`` is one of the rerank routes (``/rerank``, ``/v1/rerank``, ``/v2/rerank``, under any prefix)."""
    return path.rstrip("/").endswith("/rerank")


def envelope(error_type: str, message: str, path: str = "") -> dict[str, Any]:
    """The JSON body of an error answer; on the rerank routes also the message at the top level,
    where the clients of Cohere's (and Jina's) API read it."""
    body: dict[str, Any] = {"error": {"type": error_type, "message": message}}
    if is_rerank_path(path):
        body["message"] = message
    return body


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


#: Tags of the union members (document forms, /rerank's two body shapes); they appear in
#: validation error locations and are dropped there.
DOCUMENT_TAGS = ("string", "object", "cohere", "tei")


def _not_blank_or_none(value: Optional[str]) -> Optional[str]:
    return None if value is None else _not_blank(value)


INSTRUCTION_DOC = "Extension, decoder rerankers (kind causal_lm) only: the task instruction of the prompt for this request (default: reranker.prompt.instruction). Sent to another kind of model it is refused (422)."


def _document_kind(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return "string"
    if isinstance(value, (dict, BaseModel)):
        return "object"
    return None


def _rerank_shape(value: Any) -> str:
    """/rerank answers Text Embeddings Inference's shape when the body has ``texts``, Cohere's otherwise."""
    return "tei" if isinstance(value, dict) and "texts" in value or isinstance(value, TEIRerankBase) else "cohere"


class RerankBody(_Request):
    """What every rerank request shape can tell the service (see the shapes below)."""

    shape: ClassVar[str] = "cohere-v1"

    def texts(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def limit(self) -> int:
        """Results to return."""
        n = getattr(self, "top_n", None)
        if n is None:
            n = getattr(self, "top_k", None)
        total = len(self.texts())
        return total if n is None else min(n, total)

    def core(self) -> CoreRerankRequest:
        """The reranker's request (documents as the texts to score)."""
        return CoreRerankRequest(self.query, self.texts(), getattr(self, "max_tokens_per_doc", None), model=getattr(self, "model", None), instruction=getattr(self, "instruction", None))  # type: ignore[attr-defined]


class TEIRerankBase(RerankBody):
    """Marker base of the TEI shape (see :func:`build_request_models`)."""

    shape: ClassVar[str] = "tei"


@dataclass(frozen=True)
class RequestModels:
    """The request models of one configuration."""

    search: type[BaseModel]
    rerank: Any  # /rerank: the Cohere (v1) or TEI shape, told apart by ``texts``
    cohere_v1: type[BaseModel]
    cohere_v2: type[BaseModel]
    tei: type[BaseModel]


def text_types(limits: RequestLimits) -> tuple[Any, Any, Any]:
    """(query, instruction, document text) string types bounded by ``limits``."""
    Query = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=limits.max_query_chars)]
    Instruction = Optional[Annotated[str, StringConstraints(strict=True, min_length=1, max_length=limits.max_query_chars)]]
    DocText = Annotated[str, StringConstraints(strict=True, max_length=limits.max_document_chars)]
    return Query, Instruction, DocText


#: Request models of the compatibility routes whose reference server ignores fields it does not
#: know (TEI, infinity, vLLM): unknown top-level fields are kept aside (``model_extra``), counted
#: and dropped, never refused. Nested objects are still checked.
LENIENT = ConfigDict(extra="allow", frozen=True)


def ignored_fields(body: BaseModel) -> list[str]:
    """Names of the top-level fields a lenient request model set aside (sorted)."""
    return sorted((body.model_extra or {}).keys())


def build_request_models(limits: RequestLimits, funnel: FunnelLimits) -> RequestModels:
    """Request models whose constraints come from ``limits`` and ``funnel``."""
    Query, Instruction, DocText = text_types(limits)

    class LimitedTextDocument(TextDocument):
        text: DocText = Field(..., description=f"The document text (at most {limits.max_document_chars} characters).")

    Document = Annotated[
        Union[Annotated[DocText, Tag("string")], Annotated[LimitedTextDocument, Tag("object")]],
        Discriminator(_document_kind, custom_error_type="document_type", custom_error_message="must be a string or an object with a `text` string"),
    ]
    DocObject = Annotated[dict[Annotated[str, StringConstraints(max_length=256)], Any], Field(max_length=64)]
    ObjectOrText = Annotated[
        Union[Annotated[DocText, Tag("string")], Annotated[DocObject, Tag("object")]],
        Discriminator(_document_kind, custom_error_type="document_type", custom_error_message="must be a string or an object (ranked on its `text` field or on rank_fields)"),
    ]

    class SearchRequest(_Request):
        """Hybrid search: retrieve with each retriever, fuse, rerank the head, return the top."""

        query: Query = Field(..., description=f"The search query (1 to {limits.max_query_chars} characters, not only whitespace).")
        top_k: Optional[int] = Field(None, strict=True, ge=1, le=funnel.max_top_k, description=f"Candidates fetched from each retriever (default {funnel.default_top_k}).")
        rerank_top_m: Optional[int] = Field(None, strict=True, ge=0, le=funnel.max_rerank_top_m, description=f"Fused candidates scored by the cross-encoder; 0 disables reranking (default {funnel.default_rerank_top_m}, capped by the candidate pool).")
        top_n: Optional[int] = Field(None, strict=True, ge=1, le=funnel.max_top_n, description=f"Results returned (default {funnel.default_top_n}).")
        retrievers: Optional[list[Literal["bm25", "dense"]]] = Field(None, min_length=1, max_length=2, description="Retrievers to use (default: all deployed).")
        return_documents: bool = Field(False, strict=True, description="Include each result's title and text.")
        reranker: Optional[Annotated[str, StringConstraints(strict=True, min_length=1, max_length=256)]] = Field(None, description="A configured reranker name or alias (default: the default model).")
        instruction: Instruction = Field(None, description=INSTRUCTION_DOC)
        filter: Optional[dict[str, Any]] = Field(None, description="Metadata filter over the collection's declared fields: {field: value}, {field: {in: [...]}}, {field: {gte: x, lt: y}}, {field: {exists: true}}, and/or/not (docs/API.md#filters). Applied inside every retriever before its top-k; an unknown field or a value of the wrong type is refused (422 invalid_filter). An API key's bound filter is ANDed to it.")
        cascade: Optional[dict[Annotated[str, StringConstraints(max_length=32)], Annotated[int, Field(strict=True, ge=0)]]] = Field(
            None, max_length=16, description="Depth of each rerank cascade stage by name (default: the stage's default_top_m); each at most the stage's max_top_m and the depth of the stage before it; 0 skips a stage. An unknown name is refused (422)."
        )

        _query_not_blank = field_validator("query")(_not_blank)
        _instruction_not_blank = field_validator("instruction")(_not_blank_or_none)

        @field_validator("retrievers")
        @classmethod
        def _unique(cls, v: Optional[list[str]]) -> Optional[list[str]]:
            if v is not None and len(set(v)) != len(v):
                raise ValueError("must not repeat a retriever")
            return v

    ModelName = Optional[Annotated[str, StringConstraints(strict=True, min_length=1, max_length=256)]]
    TopN = Optional[Annotated[int, Field(strict=True, ge=1)]]
    MaxTokens = Optional[Annotated[int, Field(strict=True, ge=1, le=limits.max_tokens_per_doc)]]

    def object_text(doc: dict[str, Any], rank_fields: Optional[list[str]], i: int) -> str:
        """The text a document object is ranked on: ``text``, or its ``rank_fields``."""
        fields = rank_fields or ["text"]
        for f in fields:
            if f not in doc:
                raise ValueError(f"documents[{i}] has no field {f!r}" + ("" if rank_fields else " (an object document needs `text`, or send rank_fields)"))
            if not isinstance(doc[f], str):
                raise ValueError(f"documents[{i}].{f} must be a string to be ranked, got {type(doc[f]).__name__}")
        text = doc[fields[0]] if len(fields) == 1 else "\n".join(f"{f}: {doc[f]}" for f in fields)
        if len(text) > limits.max_document_chars:
            raise ValueError(f"documents[{i}]: the ranked text has {len(text)} characters, more than limits.max_document_chars={limits.max_document_chars}")
        return text

    class CohereRerankRequest(RerankBody):
        """Cohere v1 rerank (also what Jina's rerank clients send). ``top_k`` is accepted as an
        alias of ``top_n``; ``max_tokens_per_doc`` as an extension."""

        shape: ClassVar[str] = "cohere-v1"

        query: Query = Field(..., description=f"The query (1 to {limits.max_query_chars} characters).")
        documents: list[ObjectOrText] = Field(..., min_length=1, max_length=limits.max_documents, description=f"1 to {limits.max_documents} documents: strings, or objects ranked on their `text` field or on `rank_fields`.")
        top_n: TopN = Field(None, description="Results returned (default: all documents; larger values are capped at the number of documents).")
        top_k: TopN = Field(None, description="Alias of top_n.")
        return_documents: bool = Field(False, strict=True, description="Include each result's document (as sent: a string becomes {text}).")
        model: ModelName = Field(None, description="A configured reranker name or alias (default: the default model); `meta.model` names the one that answered.")
        rank_fields: Optional[list[Annotated[str, StringConstraints(strict=True, min_length=1, max_length=256)]]] = Field(None, min_length=1, max_length=32, description="Object documents: the fields ranked, in this order (one field: its text; several: `field: value` lines).")
        max_chunks_per_doc: Optional[int] = Field(None, strict=True, ge=1, le=256, description="Score up to this many windows of each long document and keep the best (the max_chunk handling for this request).")
        max_tokens_per_doc: MaxTokens = Field(None, description="Document tokens read per document (longer documents are truncated).")
        instruction: Instruction = Field(None, description=INSTRUCTION_DOC)

        _query_not_blank = field_validator("query")(_not_blank)
        _instruction_not_blank = field_validator("instruction")(_not_blank_or_none)

        @model_validator(mode="after")
        def _check(self) -> "CohereRerankRequest":
            if self.top_n is not None and self.top_k is not None and self.top_n != self.top_k:
                raise ValueError(f"top_n ({self.top_n}) and its alias top_k ({self.top_k}) disagree; send one of them")
            if self.rank_fields is not None and len(set(self.rank_fields)) != len(self.rank_fields):
                raise ValueError("rank_fields must not repeat a field")
            self.texts()  # every object document must have the fields it is ranked on
            return self

        def texts(self) -> list[str]:
            return [d if isinstance(d, str) else object_text(d, self.rank_fields, i) for i, d in enumerate(self.documents)]

        def document(self, i: int) -> Any:
            d = self.documents[i]
            return {"text": d} if isinstance(d, str) else d

        def core(self) -> CoreRerankRequest:
            return replace(super().core(), max_chunks=self.max_chunks_per_doc)

    class CohereV2RerankRequest(RerankBody):
        """Cohere v2 rerank (``POST /v2/rerank``, what ``cohere.ClientV2.rerank`` sends). Extensions:
        documents as objects with a `text` string, ``return_documents``."""

        shape: ClassVar[str] = "cohere-v2"

        model: ModelName = Field(None, description="A configured reranker name or alias (Cohere requires it; here the default model answers without one).")
        query: Query = Field(..., description=f"The query (1 to {limits.max_query_chars} characters).")
        documents: list[Document] = Field(..., min_length=1, max_length=limits.max_documents, description=f"1 to {limits.max_documents} documents (strings; objects with a `text` string are accepted too).")
        top_n: TopN = Field(None, description="Results returned (default: all documents).")
        max_tokens_per_doc: MaxTokens = Field(None, description="Document tokens read per document (longer documents are truncated).")
        return_documents: bool = Field(False, strict=True, description="Extension: include each result's document text.")
        priority: Optional[int] = Field(None, strict=True, ge=0, le=1000, description="Accepted for compatibility and ignored: requests are served in arrival order.")
        instruction: Instruction = Field(None, description=INSTRUCTION_DOC)

        _query_not_blank = field_validator("query")(_not_blank)
        _instruction_not_blank = field_validator("instruction")(_not_blank_or_none)

        def texts(self) -> list[str]:
            return [d if isinstance(d, str) else d.text for d in self.documents]

    class TEIRerankRequest(TEIRerankBase):
        """Text Embeddings Inference's rerank (``POST /rerank`` with ``texts``). Extension: ``model``."""

        query: Query = Field(..., description=f"The query (1 to {limits.max_query_chars} characters).")
        texts_: list[DocText] = Field(..., alias="texts", min_length=1, max_length=limits.max_documents, description=f"1 to {limits.max_documents} texts to rank.")
        raw_scores: bool = Field(False, strict=True, description="Return the model's scores as they are; false applies a sigmoid to raw scores (models with activation none).")
        return_text: bool = Field(False, strict=True, description="Include each result's text.")
        truncate: bool = Field(False, strict=True, description="false: a query and text longer than the model reads is refused (413 input_too_long), as TEI does; true: the text is cut to fit.")
        truncation_direction: Literal["Right", "Left", "right", "left"] = Field("Right", description="Which end of a text is cut when it does not fit: Right keeps its start, Left its end.")
        top_n: TopN = Field(None, description="Results returned, best first (default: all texts; larger values are capped at the number of texts).")
        model: ModelName = Field(None, description="Extension: a configured reranker name or alias.")
        instruction: Instruction = Field(None, description=INSTRUCTION_DOC)

        # TEI ignores fields it does not know: so does this shape (they are counted, see ignored_fields).
        model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=False)
        _query_not_blank = field_validator("query")(_not_blank)
        _instruction_not_blank = field_validator("instruction")(_not_blank_or_none)

        def texts(self) -> list[str]:
            return list(self.texts_)

        def core(self) -> CoreRerankRequest:
            return replace(super().core(), truncate=self.truncate, truncation_direction=self.truncation_direction.lower())  # type: ignore[arg-type]

    class SharedPathRerankRequest(CohereRerankRequest):
        """The Cohere-shaped body on ``POST /rerank``, where infinity's and vLLM's clients post
        too; both servers ignore fields they do not know, and so does this path."""

        model_config = LENIENT

    Rerank = Annotated[
        Union[Annotated[TEIRerankRequest, Tag("tei")], Annotated[SharedPathRerankRequest, Tag("cohere")]],
        Discriminator(_rerank_shape),
    ]

    return RequestModels(search=SearchRequest, rerank=Rerank, cohere_v1=CohereRerankRequest, cohere_v2=CohereV2RerankRequest, tei=TEIRerankRequest)


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
    depth_reduced: Optional[bool] = Field(None, description="rerank, with slo set: true when fewer candidates were reranked than asked, to meet the latency objective.")
    requested_top_m: Optional[int] = Field(None, description="rerank, with slo set: the depth the request asked for (candidates is the depth used).")


class FunnelOut(BaseModel):
    top_k: int
    rerank_top_m: int
    top_n: int
    retrievers: list[str]
    reranker: Optional[str] = Field(None, description="The reranker model that answered, when the request named one.")
    cascade: Optional[dict[str, int]] = Field(None, description="The depth of each cascade stage, when a cascade is configured.")


def build_document_models(writes: Any) -> tuple[type[BaseModel], type[BaseModel]]:
    """The request models of POST and DELETE /documents, sized by ``writes`` (a
    :class:`~serve_app.config.WritesConfig`). What a schema cannot say (an id repeated in the
    batch, a blank text, metadata too large) is checked by
    :func:`serve_app.live.changes.check_upserts`, answered 422 as well."""
    DocId = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=writes.max_id_chars)]
    Refresh = Literal["false", "wait_for"]
    refresh_doc = "false (default): answer once the batch is durable; it is searchable within writes.refresh_interval_s. wait_for: answer once every replica serves it (visible: true), or after writes.wait_for_timeout_s (visible: false)."

    class DocumentIn(_Request):
        id: DocId = Field(..., description=f"The document's id (1 to {writes.max_id_chars} characters); an existing id is replaced.")
        text: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=writes.max_document_chars)] = Field(..., description="The document's text.")
        title: Optional[Annotated[str, StringConstraints(strict=True, max_length=writes.max_document_chars)]] = Field(None, description="Its title (indexed with the text).")
        metadata: Optional[dict[str, Any]] = Field(None, description=f"A JSON object stored with the document and returned with it (at most {writes.max_metadata_bytes} bytes as compact JSON).")

    class UpsertDocumentsRequest(_Request):
        """Add or replace documents: one batch, applied whole or not at all."""

        documents: list[DocumentIn] = Field(..., min_length=1, max_length=writes.max_batch_documents, description=f"1 to {writes.max_batch_documents} documents, each id once.")
        refresh: Refresh = Field("false", description=refresh_doc)

    class DeleteDocumentsRequest(_Request):
        """Delete documents by id: one batch; ids that are not there are listed in `absent`."""

        ids: list[DocId] = Field(..., min_length=1, max_length=writes.max_batch_documents, description=f"1 to {writes.max_batch_documents} ids, each once.")
        refresh: Refresh = Field("false", description=refresh_doc)

    return UpsertDocumentsRequest, DeleteDocumentsRequest


class WriteResponse(BaseModel):
    seq: Optional[int] = Field(..., description="The batch's sequence number (null: the batch changed nothing, e.g. a delete of absent ids).")
    upserted: Optional[list[str]] = Field(None, description="POST: the ids written.")
    deleted: Optional[list[str]] = Field(None, description="DELETE: the ids deleted.")
    absent: Optional[list[str]] = Field(None, description="DELETE: the ids that were not there (nothing to delete).")
    refresh: str
    visible: Optional[bool] = Field(None, description="refresh=wait_for: whether every replica served the batch before the answer.")
    timings_ms: Optional[dict[str, float]] = Field(None, description="Measured by the writer: durable (validated, encoded, logged and fsynced) and, with wait_for, visible (from durable until every replica served the batch).")


class DocumentOut(BaseModel):
    id: str
    title: str
    text: str
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    seq: Optional[int] = Field(None, description="With live writes: the batch this answer reads as of (every retriever, shard and document of it).")
    query: str
    results: list[SearchHitOut]
    degraded: bool = Field(..., description="True when a stage failed or timed out and was left out (see stages).")
    stages: dict[str, StageReport] = Field(..., description="Per stage: bm25, dense, fusion, rerank.<name> for each cascade stage, rerank.")
    timings_ms: dict[str, float] = Field(..., description="Wall time per stage and in total (milliseconds).")
    funnel: FunnelOut = Field(..., description="The sizes used (defaults applied).")


class RerankDocumentOut(BaseModel):
    text: str


class RerankResultOut(BaseModel):
    index: int = Field(..., description="Position of the document in the request's list.")
    relevance_score: float = Field(..., description="The model's score (higher is more relevant; in (0, 1) with activation sigmoid).")
    document: Optional[RerankDocumentOut] = Field(None, description="The document (return_documents).")


class RerankResponse(BaseModel):
    """Cohere v2's response (``POST /v2/rerank``)."""

    id: str
    results: list[RerankResultOut] = Field(..., description="Best first.")
    meta: dict[str, Any] = Field(..., description="api_version, billed_units.search_units; extensions: model, batch_size, timings_ms.")


class V1ResultOut(BaseModel):
    index: int = Field(..., description="Position of the document in the request's list.")
    relevance_score: float = Field(..., description="The model's score (higher is more relevant; in (0, 1) with activation sigmoid).")
    document: Optional[dict[str, Any]] = Field(None, description="The document as sent, a string as {text} (return_documents).")


class UsageOut(BaseModel):
    total_tokens: int = Field(..., description="Tokens of the (query, document) pairs the model read.")


class V1RerankResponse(BaseModel):
    """Cohere v1's response, with Jina's ``model`` and ``usage`` (``POST /v1/rerank``, Cohere-shaped ``POST /rerank``)."""

    id: str
    results: list[V1ResultOut] = Field(..., description="Best first.")
    meta: dict[str, Any] = Field(..., description="api_version, billed_units.search_units; extensions: model, batch_size, timings_ms.")
    model: str = Field(..., description="The reranker model that answered (its configured name).")
    usage: UsageOut


class TEIRankOut(BaseModel):
    """One result of Text Embeddings Inference's rerank shape (a JSON list of these, best first)."""

    index: int
    score: float
    text: Optional[str] = None


class HealthResponse(BaseModel):
    status: Literal["ok"]
    stages: dict[str, str]
