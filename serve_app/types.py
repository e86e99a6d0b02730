"""Small value types shared by every stage of the funnel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True, slots=True)
class Document:
    """One retrievable unit of the corpus.

    ``content`` is what indexes and the reranker read: the title and the text
    joined by a space (the BEIR convention), or the text alone without a title.
    """

    id: str
    text: str
    title: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def content(self) -> str:
        return f"{self.title} {self.text}" if self.title else self.text


@dataclass(frozen=True, slots=True)
class Hit:
    """A document-level search result of one retriever (chunks already collapsed)."""

    doc_id: str
    score: float


@runtime_checkable
class Retriever(Protocol):
    """What the pipeline and the Serve deployments need from a first-stage retriever."""

    name: str

    def search(self, query: str, k: int) -> list[Hit]:
        """Top-``k`` documents for one query, best first."""
        ...

    def search_batch(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-``k`` documents for each query, best first."""
        ...


@dataclass(frozen=True)
class RerankRequest:
    """One query and the documents to score against it (scores come back in this order).

    * ``max_tokens_per_doc`` limits the document tokens read per document (Cohere's parameter);
      None reads as many as the pair limit allows;
    * ``model``: the configured reranker to use (its name; None: the default one);
    * ``max_chunks``: score up to this many windows of each long document and keep the best
      (``max_chunk`` for this request; Cohere v1's ``max_chunks_per_doc``); None: the model's
      configured ``long_documents`` handling;
    * ``truncate``: False refuses a pair longer than the model reads instead of cutting it (TEI's
      ``truncate: false``); ``truncation_direction``: which end of a document is kept when it
      is cut (``right`` keeps the start, ``left`` the end);
    * ``instruction``: decoder rerankers only, the task instruction of their prompt for this
      request (None: the configured ``prompt.instruction``).
    """

    query: str
    documents: Sequence[str]
    max_tokens_per_doc: int | None = None
    model: str | None = None
    max_chunks: int | None = None
    truncate: bool = True
    truncation_direction: Literal["right", "left"] = "right"
    instruction: str | None = None


@dataclass(frozen=True)
class RerankOutcome:
    """What a reranker answers for one :class:`RerankRequest`."""

    scores: list[float]
    batch_size: int = 1  # requests that shared the cross-encoder call
    batch_pairs: int = 0  # pairs scored by that call
    pairs: int = 0  # pairs scored for this request (windows of long documents count)
    tokens: int = 0  # tokens the model read for this request
    cached: int = 0  # documents answered from the score cache (not scored again)
