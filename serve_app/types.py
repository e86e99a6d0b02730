"""Small value types shared by every stage of the funnel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable


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
