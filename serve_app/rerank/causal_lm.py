"""Decoder rerankers: a causal language model asked whether a document meets the query.

The Qwen3-Reranker family (and rerankers trained the same way) read one prompt holding the
instruction, the query and the document, and score relevance as the next token being "yes"
rather than "no"::

    score = logit("yes") - logit("no")      at the prompt's last position
    sigmoid(score) = P(yes)                 (softmax over the two tokens)

:class:`PromptTokenizer` builds the prompt's token ids from a :class:`~serve_app.config.PromptConfig`
(``prefix`` + ``template`` with ``{instruction}``, ``{query}``, ``{document}`` + ``suffix``):
the prefix and the suffix are tokenised on their own, the template once as a whole (so token
boundaries are those of the model's reference implementation), and only the *document's*
tokens are cut when the prompt would exceed the pair limit: the query, the instruction and
the template always stay whole. :class:`CausalLMScorer` batches prompts like the
cross-encoder (token budget, length-sorted), right-padded, reads the hidden state of each
prompt's last real token and projects it on the two rows of the output embedding
(``W[yes] - W[no]``), so no vocabulary-wide logits are computed.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np

from serve_app.config import PromptConfig
from serve_app.models import ModelLoadError

logger = logging.getLogger(__name__)


class PromptTokenizer:
    """(query, document) pairs -> the token ids of a decoder reranker's prompt.

    Same interface as :class:`serve_app.rerank.cross_encoder.PairTokenizer`, with an optional
    instruction per pair (None: ``prompt.instruction``).
    """

    def __init__(self, tokenizer: Any, prompt: PromptConfig, max_length: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError("a decoder reranker needs a fast (Rust) tokenizer: the document's tokens are found by character offsets")
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_length = int(max_length)
        self.prefix_ids: list[int] = self._ids(prompt.prefix)
        self.suffix_ids: list[int] = self._ids(prompt.suffix)
        self.special_tokens = len(self.prefix_ids) + len(self.suffix_ids)
        self.min_pair_length = self.special_tokens + 2
        self.yes_id = self._single_token(prompt.yes_token)
        self.no_id = self._single_token(prompt.no_token) if prompt.no_token is not None else None

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []

    def _single_token(self, token: str) -> int:
        ids = self._ids(token)
        if len(ids) != 1:
            raise ModelLoadError(f"the decoder reranker's answer token {token!r} is {len(ids)} tokens in this tokenizer; it must be exactly one (prompt.yes_token / prompt.no_token)")
        return ids[0]

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` alone."""
        return self._ids(text)

    def _render(self, query: str, instruction: Optional[str]) -> tuple[str, str]:
        """The template's text before and after the document."""
        head, tail = self.prompt.template.split("{document}")
        fields = {"instruction": instruction if instruction is not None else self.prompt.instruction, "query": query}
        return head.format(**fields), tail.format(**fields)

    def query_overhead(self, query: str, instruction: Optional[str] = None) -> int:
        """Tokens a prompt spends on everything but the document (prefix, template, query, suffix)."""
        head, tail = self._render(query, instruction)
        return self.special_tokens + len(self._ids(head + tail))

    def limits(self, n: int, max_length: int | Sequence[int] | None) -> list[int]:
        """Per-pair limits: ``max_length`` (one int or one per pair) capped to :attr:`max_length`."""
        if max_length is None:
            return [self.max_length] * n
        values = [max_length] * n if isinstance(max_length, (int, np.integer)) else list(max_length)
        if len(values) != n:
            raise ValueError(f"max_length has {len(values)} values for {n} pairs")
        return [min(max(int(v), self.min_pair_length), self.max_length) for v in values]

    def encode(self, query: str, document: str, limit: int, instruction: Optional[str] = None) -> list[int]:
        """The prompt's token ids, the document cut (from its end) so that the prompt fits ``limit``
        tokens; a query and template that alone exceed ``limit`` are kept whole with no document."""
        head, tail = self._render(query, instruction)
        text = head + document + tail
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        start, end = len(head), len(head) + len(document)
        in_doc = [start <= s < end for s, _ in offsets]  # a token that starts inside the document is the document's
        n_doc = sum(in_doc)
        budget = limit - self.special_tokens - (len(ids) - n_doc)
        if budget < n_doc:
            keep = max(budget, 0)
            kept, seen = [], 0
            for token, inside in zip(ids, in_doc):
                if inside:
                    seen += 1
                    if seen > keep:
                        continue
                kept.append(token)
            ids = kept
        return self.prefix_ids + ids + self.suffix_ids

    def features(self, pairs: Sequence[tuple[str, str]], limits: Sequence[int], instructions: Optional[Sequence[Optional[str]]] = None) -> list[dict[str, list[int]]]:
        """Unpadded features of every pair, in input order."""
        out = []
        for i, pair in enumerate(pairs):
            if len(pair) != 2 or not isinstance(pair[0], str) or not isinstance(pair[1], str):
                raise TypeError(f"pairs[{i}] must be a (query, document) tuple of two strings, got {pair!r}")
            ids = self.encode(pair[0], pair[1], limits[i], instructions[i] if instructions is not None else None)
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        return out

    def pad(self, features: Sequence[dict[str, list[int]]], side: str = "right") -> dict[str, Any]:
        """One padded batch of features, as torch tensors (``side``: where the padding goes)."""
        import torch

        width = max(len(f["input_ids"]) for f in features)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(features), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            cols = slice(0, n) if side == "right" else slice(width - n, width)
            ids[row, cols] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[row, cols] = 1
        return {"input_ids": ids, "attention_mask": mask}
