"""Token-budgeted batch planning: coverage, budgets, order and padding."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.rerank.batching import naive_batches, padded_token_fraction, padded_tokens, plan_batches


def _flat(batches):
    return [i for b in batches for i in b]


def _assert_valid_plan(lengths, batches, max_tokens, max_pairs):
    assert sorted(_flat(batches)) == list(range(len(lengths)))
    for b in batches:
        assert b, "no empty batches"
        assert len(b) <= max_pairs
        if len(b) > 1:
            assert max(lengths[i] for i in b) * len(b) <= max_tokens


def test_every_index_once_and_budgets_respected():
    rng = random.Random(0)
    lengths = [rng.randint(3, 300) for _ in range(500)]
    batches = plan_batches(lengths, max_batch_tokens=2048, max_batch_pairs=32)
    _assert_valid_plan(lengths, batches, 2048, 32)
    assert len(batches) > 10


def test_longest_first_and_stable_ties():
    lengths = [5, 40, 7, 40, 5]
    batches = plan_batches(lengths, max_batch_tokens=1000, max_batch_pairs=2)
    assert batches == [[1, 3], [2, 0], [4]]
    firsts = [lengths[b[0]] for b in batches]
    assert firsts == sorted(firsts, reverse=True)


def test_pair_longer_than_budget_gets_its_own_batch():
    lengths = [10, 500, 10, 10]
    batches = plan_batches(lengths, max_batch_tokens=64, max_batch_pairs=16)
    assert batches[0] == [1]
    assert sorted(_flat(batches[1:])) == [0, 2, 3]
    assert batches[1:] == [[0, 2, 3]]  # 3 x 10 <= 64


def test_pairs_cap_binds_when_tokens_do_not():
    batches = plan_batches([4] * 10, max_batch_tokens=10_000, max_batch_pairs=3)
    assert [len(b) for b in batches] == [3, 3, 3, 1]


def test_greedy_fills_to_the_budget():
    # 10 pairs of length 10 under a 50-token budget: exactly 5 per batch.
    batches = plan_batches([10] * 10, max_batch_tokens=50, max_batch_pairs=100)
    assert [len(b) for b in batches] == [5, 5]


def test_empty_input():
    assert plan_batches([], 100, 10) == []
    assert naive_batches(0, 4) == []
    assert padded_token_fraction([], []) == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lengths=[1], max_batch_tokens=0, max_batch_pairs=1), "max_batch_tokens"),
        (dict(lengths=[1], max_batch_tokens=10, max_batch_pairs=0), "max_batch_pairs"),
        (dict(lengths=[3, -1], max_batch_tokens=10, max_batch_pairs=2), r"lengths\[1\]"),
        (dict(lengths=[2.5], max_batch_tokens=10, max_batch_pairs=2), r"lengths\[0\]"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_batches(**kwargs)


def test_naive_batches_are_input_order_slices():
    assert naive_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="batch_size"):
        naive_batches(3, 0)


def test_padded_token_fraction_values():
    assert padded_tokens([4, 2, 6], [0, 1]) == 8
    assert padded_token_fraction([4, 2], [[0, 1]]) == pytest.approx(2 / 8)
    assert padded_token_fraction([4, 2], [[0], [1]]) == 0.0
    assert padded_token_fraction([3, 3, 3], [[0, 1, 2]]) == 0.0


def test_padding_lower_than_naive_on_varied_lengths():
    rng = random.Random(1)
    lengths = [rng.choice([rng.randint(8, 40), rng.randint(200, 512)]) for _ in range(256)]
    planned = plan_batches(lengths, max_batch_tokens=16384, max_batch_pairs=32)
    naive = naive_batches(len(lengths), 32)
    planned_frac = padded_token_fraction(lengths, planned)
    naive_frac = padded_token_fraction(lengths, naive)
    assert planned_frac < naive_frac / 3
    # The budget also keeps the total padded size (compute) below the naive plan's.
    assert sum(padded_tokens(lengths, b) for b in planned) < sum(padded_tokens(lengths, b) for b in naive)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=600), max_size=80),
    max_tokens=st.integers(min_value=1, max_value=4000),
    max_pairs=st.integers(min_value=1, max_value=40),
)
def test_plan_properties(lengths, max_tokens, max_pairs):
    batches = plan_batches(lengths, max_tokens, max_pairs)
    _assert_valid_plan(lengths, batches, max_tokens, max_pairs)
    # Sorted longest first across the whole plan.
    flat_lengths = [lengths[i] for i in _flat(batches)]
    assert flat_lengths == sorted(flat_lengths, reverse=True)
    # Greedy: a batch is only closed when the next pair would break a budget.
    for b, nxt in zip(batches, batches[1:]):
        longest = lengths[b[0]]
        assert len(b) + 1 > max_pairs or longest * (len(b) + 1) > max_tokens
        assert lengths[nxt[0]] <= longest
    frac = padded_token_fraction(lengths, batches)
    assert 0.0 <= frac < 1.0 or (frac == 0.0 and sum(lengths) == 0)
