"""Pairs as token ids: the per-pair limits, the checks of a pair, and :class:`PairTokenizer`,
which encoder rerankers (classification and pooling) and training share, so a model is trained
on the very inputs it is served. A leaf module of the rerank package.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def limits_for(n: int, max_length: int | Sequence[int] | None, cap: int, floor: int) -> list[int]:
    """Per-pair token limits: ``max_length`` (one int or one per pair) capped to ``cap``; a
    value under ``floor`` (the smallest pair the encoder can build) is refused."""
    if max_length is None:
        return [cap] * n
    values = [max_length] * n if isinstance(max_length, (int, np.integer)) else list(max_length)
    if len(values) != n:
        raise ValueError(f"max_length has {len(values)} values for {n} pairs")
    for v in values:
        if v < floor:
            raise ValueError(f"max_length={v} is too small: a pair needs at least {floor} tokens (its fixed tokens plus one query and one document token)")
    return [min(int(v), cap) for v in values]


def check_pairs(pairs: Sequence[tuple[str, str]]) -> None:
    """TypeError unless every pair is a (query, document) tuple of two strings."""
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not isinstance(pair[0], str) or not isinstance(pair[1], str):
            raise TypeError(f"pairs[{i}] must be a (query, document) tuple of two strings, got {pair!r}")


class PairTokenizer:
    """(query, document) pairs -> token ids, with the document side truncated to fit.

    ``max_length`` is the pair limit (special tokens included). A query so long that it leaves
    no room for a single document token falls back to ``longest_first`` (both sides cut).
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.special_tokens: int = tokenizer.num_special_tokens_to_add(pair=True)
        # Smallest pair limit: the special tokens plus one query and one document token.
        self.min_pair_length: int = self.special_tokens + 2

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` alone (no special tokens)."""
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def query_overhead(self, query: str) -> int:
        """Tokens a pair spends before its first document token: the query and the special tokens."""
        return len(self.token_ids(query)) + self.special_tokens

    def limits(self, n: int, max_length: int | Sequence[int] | None) -> list[int]:
        """Per-pair limits: ``max_length`` (one int or one per pair) capped to :attr:`max_length`."""
        return limits_for(n, max_length, self.max_length, self.min_pair_length)

    def features(self, pairs: Sequence[tuple[str, str]], limits: Sequence[int]) -> list[dict[str, list[int]]]:
        """Unpadded features of every pair, in input order."""
        check_pairs(pairs)
        query_tokens: dict[str, int] = {}
        groups: dict[tuple[int, str], list[int]] = {}
        for i, (q, _) in enumerate(pairs):
            if q not in query_tokens:
                query_tokens[q] = len(self.token_ids(q))
            # only_second must leave at least one document token, else the tokenizer refuses.
            fits = query_tokens[q] + self.special_tokens < limits[i]
            groups.setdefault((limits[i], "only_second" if fits else "longest_first"), []).append(i)
        features: list[dict[str, list[int]]] = [{} for _ in pairs]
        for (limit, strategy), idx in groups.items():
            enc = self.tokenizer([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], truncation=strategy, max_length=limit, padding=False)
            for k, i in enumerate(idx):
                features[i] = {name: enc[name][k] for name in enc.keys()}
        return features

    def pad(self, features: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        """One padded batch of features, as torch tensors."""
        return dict(self.tokenizer.pad(list(features), padding=True, return_tensors="pt"))

    def batch(self, pairs: Sequence[tuple[str, str]], max_length: int | None = None) -> dict[str, Any]:
        """The padded tensors of ``pairs`` in input order (a training batch)."""
        return self.pad(self.features(pairs, self.limits(len(pairs), max_length)))
