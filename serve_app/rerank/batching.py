"""Token-budgeted batch planning for the cross-encoder (pure functions, no torch).

A forward pass over a padded batch costs about ``(longest pair in the batch) x (pairs in
the batch)`` tokens. Scoring pairs in input order mixes short and long pairs, so most of
that cost is padding. ``plan_batches`` sorts the pairs by length, **longest first**, and
cuts consecutive runs of the sorted order into batches that stay within a token budget:

* the first batch holds the longest pairs, so a budget that does not fit in memory fails
  on the first forward pass rather than half-way through a request;
* inside a batch the first pair is the longest, so the padded size of a batch is
  ``lengths[batch[0]] * len(batch)``;
* ties keep input order (stable sort), so a plan is a deterministic function of its inputs.

>>> plan_batches([5, 40, 7, 38], max_batch_tokens=80, max_batch_pairs=8)
[[1, 3], [2, 0]]
>>> naive_batches(5, 2)
[[0, 1], [2, 3], [4]]
"""

from __future__ import annotations

from typing import Sequence


def _check_lengths(lengths: Sequence[int]) -> None:
    for i, n in enumerate(lengths):
        if int(n) != n or n < 0:
            raise ValueError(f"lengths[{i}] = {n!r}: token lengths must be non-negative integers")


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_pairs: int) -> list[list[int]]:
    """Group pair indices into batches of similar length within a padded-token budget.

    Indices are sorted by descending ``lengths`` (stable) and cut greedily: a batch grows
    while ``max(lengths in batch) * len(batch) <= max_batch_tokens`` and
    ``len(batch) <= max_batch_pairs``. A pair longer than the whole budget forms a batch
    of its own (it cannot be split). Every index in ``range(len(lengths))`` appears in
    exactly one batch.
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    if max_batch_pairs < 1:
        raise ValueError(f"max_batch_pairs must be >= 1, got {max_batch_pairs}")
    _check_lengths(lengths)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current:
            longest = lengths[current[0]]  # descending order: the first pair is the longest
            if len(current) + 1 > max_batch_pairs or longest * (len(current) + 1) > max_batch_tokens:
                batches.append(current)
                current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def naive_batches(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive slices of ``range(n)`` in input order: the baseline ``plan_batches`` is compared to."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def padded_tokens(lengths: Sequence[int], batch: Sequence[int]) -> int:
    """Size of ``batch`` once padded to its longest pair: ``max length x pairs``."""
    return max((lengths[i] for i in batch), default=0) * len(batch)


def padded_token_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded positions of ``batches`` that are padding, in [0, 1).

    0.0 means no padding at all (or nothing to pad).

    >>> padded_token_fraction([4, 2], [[0, 1]])
    0.25
    """
    _check_lengths(lengths)
    total = sum(padded_tokens(lengths, b) for b in batches)
    if total == 0:
        return 0.0
    real = sum(lengths[i] for b in batches for i in b)
    return (total - real) / total
