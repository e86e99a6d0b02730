"""Reranker: scores the documents of one or many queries with a cross-encoder.

Long documents (``cfg.long_documents``):

* ``truncate``: one (query, document) pair per document; the scorer cuts the document
  side to the pair limit, so only the head of a long document is read;
* ``max_chunk``: the document is cut into windows of ``cfg.chunk_tokens`` tokens of the
  cross-encoder's tokenizer, one every ``cfg.chunk_stride`` tokens (the last window ends at
  the document's end, as in ``serve_app.chunking.word_windows``), at most
  ``cfg.max_chunks_per_doc`` windows from the start; each window is the original text
  between its first and last token's character offsets. A document's score is its best
  window's score. A document that fits one window is scored whole, exactly as ``truncate``
  scores it.

``max_tokens_per_doc`` (Cohere's rerank parameter) limits the document tokens read per
document: in ``truncate`` mode the pair limit becomes query + special tokens +
``max_tokens_per_doc`` (never above the scorer's limit); in ``max_chunk`` mode windows
only cover the first ``max_tokens_per_doc`` tokens and pairs get the same limit.

``rerank_many`` expands all pairs of all requests and scores them in ONE scorer call, so
concurrent requests gathered by Ray Serve's ``@serve.batch`` share forward passes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from serve_app.config import CrossEncoderConfig
from serve_app.rerank.cross_encoder import CrossEncoderScorer
from serve_app.types import RerankRequest

__all__ = ["RerankRequest", "Reranker"]


def _validate(request: RerankRequest, where: str) -> None:
    if not isinstance(request.query, str):
        raise TypeError(f"{where}query must be a string, got {type(request.query).__name__}")
    if isinstance(request.documents, (str, bytes)):
        raise TypeError(f"{where}documents must be a sequence of strings, not a single string")
    for i, doc in enumerate(request.documents):
        if not isinstance(doc, str):
            raise TypeError(f"{where}documents[{i}] must be a string, got {type(doc).__name__}")
    m = request.max_tokens_per_doc
    if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1):
        raise ValueError(f"{where}max_tokens_per_doc must be a positive integer or null, got {m!r}")


class Reranker:
    """Cross-encoder reranking of documents, one request or many in one scorer call."""

    def __init__(self, scorer: CrossEncoderScorer, cfg: CrossEncoderConfig) -> None:
        self.scorer = scorer
        self.cfg = cfg
        if cfg.long_documents == "max_chunk" and not getattr(scorer.tokenizer, "is_fast", False):
            raise ValueError(
                f"reranker.long_documents=max_chunk needs a fast (Rust) tokenizer for character offsets; "
                f"the tokenizer of {scorer.model_name!r} is not one (use long_documents=truncate)"
            )

    @classmethod
    def from_config(cls, cfg: CrossEncoderConfig) -> "Reranker":
        """Load the model ``cfg`` names and rerank with it."""
        return cls(CrossEncoderScorer(cfg), cfg)

    def windows(self, document: str, max_tokens: int | None = None) -> list[str]:
        """The texts ``max_chunk`` scores for ``document`` (the document itself when it fits one window)."""
        size, stride = self.cfg.chunk_tokens, self.cfg.chunk_stride
        enc = self.scorer.tokenizer(document, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = enc["offset_mapping"]
        n = len(offsets) if max_tokens is None else min(len(offsets), max_tokens)
        if n <= size:
            return [document]
        starts = list(range(0, n - size + 1, stride))
        if starts[-1] + size < n:
            starts.append(n - size)
        starts = starts[: self.cfg.max_chunks_per_doc]
        return [document[offsets[s][0] : offsets[s + size - 1][1]] for s in starts]

    def rerank(self, query: str, documents: Sequence[str], max_tokens_per_doc: int | None = None) -> np.ndarray:
        """Scores of ``documents`` for ``query`` (float32, input order, higher is more relevant)."""
        return self.rerank_many([RerankRequest(query, documents, max_tokens_per_doc)])[0]

    def rerank_many(self, requests: Sequence[RerankRequest]) -> list[np.ndarray]:
        """Each request's document scores, all pairs scored in one ``scorer.score`` call."""
        pairs: list[tuple[str, str]] = []
        limits: list[int] = []
        owner: list[int] = []  # pair -> document position across all requests
        n_docs: list[int] = []
        doc_pos = 0
        for r, req in enumerate(requests):
            _validate(req, f"requests[{r}]." if len(requests) > 1 else "")
            limit = self.scorer.max_length
            if req.max_tokens_per_doc is not None:
                wanted = self.scorer.query_overhead(req.query) + int(req.max_tokens_per_doc)
                limit = min(limit, max(wanted, self.scorer.min_pair_length))
            for doc in req.documents:
                texts = self.windows(doc, req.max_tokens_per_doc) if self.cfg.long_documents == "max_chunk" else [doc]
                for text in texts:
                    pairs.append((req.query, text))
                    limits.append(limit)
                    owner.append(doc_pos)
                doc_pos += 1
            n_docs.append(len(req.documents))
        doc_scores = np.full(doc_pos, -np.inf, dtype=np.float32)
        if pairs:
            scores = self.scorer.score(pairs, max_length=limits)
            np.maximum.at(doc_scores, np.asarray(owner, dtype=np.int64), scores)
        bounds = np.cumsum([0, *n_docs])
        return [doc_scores[bounds[i] : bounds[i + 1]].copy() for i in range(len(requests))]
