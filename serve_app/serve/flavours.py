"""Rerank API flavours: the request and the answer of each reference server, under its own prefix.

``/rerank`` is a path that Text Embeddings Inference, infinity and vLLM all serve, with three
different answers; ``/v1/rerank`` is Cohere's and Jina's. The unprefixed routes answer a union
that most clients read (see docs/API.md); a client that checks its answer strictly is pointed at
its flavour's prefix instead, with nothing but a base URL: ``http://HOST:8000/infinity`` makes
``{base}/rerank`` answer exactly what infinity answers, in field names, types and nesting.

Each :class:`Flavour` names its reference server, its routes (path under the prefix and the
request model they take) and the function that shapes its answer from a :class:`Ranked`, the
shape-free result of one rerank request. docs/API.md's table of flavours is generated from
:data:`FLAVOURS`.

Scores: the references answer relevance in (0, 1); a model configured with ``activation: none``
gets a sigmoid over its raw scores on these routes, unless the request asks for raw scores where
its reference has that switch (``raw_scores`` of TEI and infinity).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Union

from pydantic import BaseModel, Field, field_validator

from serve_app.serve.api import INSTRUCTION_DOC, LENIENT, RerankBody, _not_blank, _not_blank_or_none, text_types
from serve_app.serve.config import RequestLimits


@dataclass(frozen=True)
class Ranked:
    """One rerank request's result, before any flavour shapes it."""

    body: Any  # the validated request
    texts: list[str]  # the texts scored, request order
    scores: list[float]  # the model's scores, request order
    order: list[int]  # indexes of the results returned, best first
    model: str  # the configured name of the model that answered
    model_id: str  # its configured model (Hub id or path)
    activation: str  # none: raw scores; sigmoid: probabilities already
    tokens: int  # tokens the model read
    pairs: int  # pairs scored (windows of long documents count)
    batch_size: int
    ms: float

    def relevance(self, i: int, raw: bool = False) -> float:
        """Document ``i``'s score as the references answer it: in (0, 1) unless ``raw``."""
        s = float(self.scores[i])
        if raw or self.activation != "none":
            return s
        return 1.0 / (1.0 + math.exp(-s))

    def requested_model(self) -> str:
        return getattr(self.body, "model", None) or self.model


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class FlavourModels:
    infinity: type[BaseModel]
    vllm: type[BaseModel]
    jina: type[BaseModel]


def build_flavour_models(limits: RequestLimits) -> FlavourModels:
    """The request models of the flavours that have their own (bounded by ``limits``)."""
    Query, Instruction, DocText = text_types(limits)
    Docs = list[DocText]
    n_docs = dict(min_length=1, max_length=limits.max_documents)
    TopN = Optional[int]

    class _Lenient(RerankBody):
        model_config = LENIENT
        _query_not_blank = field_validator("query", check_fields=False)(_not_blank)

        def texts(self) -> list[str]:
            return list(self.documents)  # type: ignore[attr-defined]

    class InfinityRerankRequest(_Lenient):
        """infinity's ``POST /rerank``."""

        shape: ClassVar[str] = "infinity"
        query: Query = Field(..., description="The query.")
        documents: Docs = Field(..., **n_docs, description=f"1 to {limits.max_documents} texts.")  # type: ignore[arg-type]
        return_documents: bool = Field(False, strict=True, description="Include each result's text (as `document`, a string).")
        raw_scores: bool = Field(False, strict=True, description="The model's raw scores instead of relevance in (0, 1).")
        top_n: TopN = Field(None, strict=True, gt=0, description="Results returned (default: all).")
        model: Optional[str] = Field(None, strict=True, max_length=256, description="A configured reranker name or alias.")

    class VLLMRerankRequest(_Lenient):
        """vLLM's ``POST /rerank`` (also ``/v1/rerank``, ``/v2/rerank``)."""

        shape: ClassVar[str] = "vllm"
        query: Query = Field(..., description="The query.")
        documents: Docs = Field(..., **n_docs, description=f"1 to {limits.max_documents} texts.")  # type: ignore[arg-type]
        top_n: int = Field(0, strict=True, ge=0, description="Results returned; 0 (default): all.")
        model: Optional[str] = Field(None, strict=True, max_length=256, description="A configured reranker name or alias.")
        instruction: Instruction = Field(None, description=INSTRUCTION_DOC)
        _instruction_not_blank = field_validator("instruction")(_not_blank_or_none)

        def limit(self) -> int:
            return len(self.documents) if not self.top_n else min(self.top_n, len(self.documents))

    class JinaDoc(BaseModel):
        model_config = LENIENT
        text: DocText  # type: ignore[valid-type]

    class JinaRerankRequest(_Lenient):
        """Jina's ``POST /v1/rerank``."""

        shape: ClassVar[str] = "jina"
        query: Query = Field(..., description="The query.")
        documents: list[Union[DocText, JinaDoc]] = Field(..., **n_docs, description="Texts, or objects with a `text` string.")  # type: ignore[valid-type]
        top_n: TopN = Field(None, strict=True, ge=1, description="Results returned (default: all).")
        return_documents: bool = Field(True, strict=True, description="Include each result's document (default true, as Jina's API).")
        model: Optional[str] = Field(None, strict=True, max_length=256, description="A configured reranker name or alias.")

        def texts(self) -> list[str]:
            return [d if isinstance(d, str) else d.text for d in self.documents]

    return FlavourModels(infinity=InfinityRerankRequest, vllm=VLLMRerankRequest, jina=JinaRerankRequest)


# --------------------------------------------------------------------------- answers


def tei_answer(r: Ranked) -> list[dict[str, Any]]:
    """TEI: ``[{index, score, text?}]``, best first."""
    out = []
    for i in r.order:
        item: dict[str, Any] = {"index": i, "score": r.relevance(i, raw=r.body.raw_scores)}
        if r.body.return_text:
            item["text"] = r.texts[i]
        out.append(item)
    return out


def infinity_answer(r: Ranked) -> dict[str, Any]:
    """infinity: ``document`` is the text itself (a string), or null."""
    results = [{"relevance_score": r.relevance(i, raw=r.body.raw_scores), "index": i, "document": r.texts[i] if r.body.return_documents else None} for i in r.order]
    return {"object": "rerank", "results": results, "model": r.requested_model(), "usage": {"prompt_tokens": r.tokens, "total_tokens": r.tokens}, "id": f"infinity-{uuid.uuid4()}", "created": int(time.time())}


def vllm_answer(r: Ranked) -> dict[str, Any]:
    """vLLM: every result carries its document as ``{text}``."""
    results = [{"index": i, "document": {"text": r.texts[i]}, "relevance_score": r.relevance(i)} for i in r.order]
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": r.requested_model(), "usage": {"total_tokens": r.tokens}, "results": results}


def jina_answer(r: Ranked) -> dict[str, Any]:
    """Jina: ``model``, ``usage.total_tokens``, results with ``document: {text}`` by default."""
    results = []
    for i in r.order:
        item: dict[str, Any] = {"index": i, "relevance_score": r.relevance(i)}
        if r.body.return_documents:
            item["document"] = {"text": r.texts[i]}
        results.append(item)
    return {"model": r.requested_model(), "usage": {"total_tokens": r.tokens}, "results": results}


def cohere_answer(r: Ranked, raw: bool = False) -> dict[str, Any]:
    """Cohere v1 and v2: ``id``, ``results``, ``meta`` with the API version and billed units
    (one search unit per 100 pairs; long documents count per window). ``raw``: the model's own
    scores (what the unprefixed routes answer) instead of relevance in (0, 1)."""
    v1 = r.body.shape == "cohere-v1"
    results = []
    for i in r.order:
        item: dict[str, Any] = {"index": i, "relevance_score": r.relevance(i, raw=raw)}
        if r.body.return_documents:
            item["document"] = r.body.document(i) if v1 else {"text": r.texts[i]}
        results.append(item)
    meta = {"api_version": {"version": "1" if v1 else "2"}, "billed_units": {"search_units": max(1, math.ceil(r.pairs / 100))}}
    return {"id": str(uuid.uuid4()), "results": results, "meta": meta}


# --------------------------------------------------------------------------- the flavours


@dataclass(frozen=True)
class Flavour:
    """One reference server's rerank API under ``/{name}``."""

    name: str
    reference: str
    routes: tuple[tuple[str, str], ...]  # (path under the prefix, request model: tei, cohere_v1, cohere_v2, infinity, vllm, jina)
    answer: Callable[[Ranked], Any]
    lenient: bool  # the reference ignores fields it does not know
    clients: str  # clients to point at the prefix, and how (docs/API.md)

    @property
    def prefix(self) -> str:
        return "/" + self.name


FLAVOURS: tuple[Flavour, ...] = (
    Flavour("tei", "Text Embeddings Inference", (("/rerank", "tei"),), tei_answer, True, "LiteLLM `huggingface/<model>` with `api_base=$BASE/tei`; TEI clients with base URL `$BASE/tei`"),
    Flavour("infinity", "infinity (michaelfeil/infinity)", (("/rerank", "infinity"), ("/v1/rerank", "infinity")), infinity_answer, True, "LiteLLM `infinity/<model>` with `api_base=$BASE/infinity`; infinity's HTTP clients with base URL `$BASE/infinity`"),
    Flavour("vllm", "vLLM (`vllm serve`, score/rerank models)", (("/rerank", "vllm"), ("/v1/rerank", "vllm"), ("/v2/rerank", "vllm")), vllm_answer, True, "LiteLLM `hosted_vllm/<model>` with `api_base=$BASE/vllm`"),
    Flavour("jina", "Jina AI's rerank API", (("/v1/rerank", "jina"),), jina_answer, True, "Jina's HTTP clients with base URL `$BASE/jina` (LiteLLM `jina_ai/<model>` keeps only the host of its `api_base`: give it `$BASE`, see below)"),
    Flavour("cohere", "Cohere's rerank API v1 and v2", (("/v1/rerank", "cohere_v1"), ("/v2/rerank", "cohere_v2")), cohere_answer, False, "Cohere's SDK (`cohere.ClientV2(base_url=$BASE/cohere)`); LiteLLM `cohere/<model>` and `azure_ai/<model>` with `api_base=$BASE/cohere`, `together_ai/<model>` with `api_base=$BASE/cohere/v1`"),
)


def flavours_table() -> str:
    """The markdown table of flavours in docs/API.md."""
    rows = ["| prefix | answers as | routes | unknown fields | point these clients at it |", "|---|---|---|---|---|"]
    for f in FLAVOURS:
        routes = ", ".join(f"`POST {f.prefix}{p}`" for p, _ in f.routes)
        rows.append(f"| `{f.prefix}` | {f.reference} | {routes} | {'ignored (counted)' if f.lenient else 'refused (422)'} | {f.clients} |")
    return "\n".join(rows)
