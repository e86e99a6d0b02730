"""Coalescer: groups submitted while a model call runs share the next call; results and errors reach the right callers."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.rerank.coalesce import Coalescer


class SlowModel:
    """Records the items of every call; each call takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.05, fail_on: object = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.calls: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        await asyncio.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [10 * x for x in items]


def test_groups_arriving_during_a_call_share_the_next_call():
    model = SlowModel()
    coalescer = Coalescer(model, max_items=100)

    async def scenario():
        first = asyncio.create_task(coalescer.submit([1]))
        await asyncio.sleep(0.01)  # the first call is running now
        later = [asyncio.create_task(coalescer.submit([i, i + 1])) for i in (2, 4, 6, 8)]
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(scenario())
    assert first == [10]
    assert later == [[20, 30], [40, 50], [60, 70], [80, 90]]
    assert model.calls == [[1], [2, 3, 4, 5, 6, 7, 8, 9]]  # one call for the four waiting groups, in arrival order
    assert list(coalescer.calls) == [(1, 1), (4, 8)]


def test_max_items_splits_waiting_groups_into_several_calls_but_never_splits_a_group():
    model = SlowModel()
    coalescer = Coalescer(model, max_items=4)

    async def scenario():
        first = asyncio.create_task(coalescer.submit([0]))
        await asyncio.sleep(0.01)
        rest = [asyncio.create_task(coalescer.submit(g)) for g in ([1, 2], [3, 4], [5, 6, 7, 8, 9], [10])]
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(scenario())
    assert rest == [[10, 20], [30, 40], [50, 60, 70, 80, 90], [100]]
    assert model.calls == [[0], [1, 2, 3, 4], [5, 6, 7, 8, 9], [10]]  # an oversized group runs alone


def test_a_failing_call_fails_only_its_own_callers():
    model = SlowModel(fail_on=3)
    coalescer = Coalescer(model, max_items=2)

    async def scenario():
        first = asyncio.create_task(coalescer.submit([1]))
        await asyncio.sleep(0.01)
        bad = asyncio.create_task(coalescer.submit([2, 3]))
        good = asyncio.create_task(coalescer.submit([4]))
        return await asyncio.gather(first, bad, good, return_exceptions=True)

    first, bad, good = asyncio.run(scenario())
    assert first == [10] and good == [40]
    assert isinstance(bad, ValueError) and "bad item 3" in str(bad)


def test_a_wrong_number_of_results_is_an_error_and_empty_input_needs_no_call():
    async def short(items):
        return items[:-1]

    coalescer = Coalescer(short, max_items=8)
    with pytest.raises(RuntimeError, match="2 results for 3 items"):
        asyncio.run(coalescer.submit([1, 2, 3]))
    assert asyncio.run(coalescer.submit([])) == [] and len(coalescer.calls) == 1
    with pytest.raises(ValueError, match="max_items"):
        Coalescer(short, max_items=0)


def test_a_cancelled_caller_does_not_disturb_the_others():
    model = SlowModel()
    coalescer = Coalescer(model, max_items=100)

    async def scenario():
        first = asyncio.create_task(coalescer.submit([1]))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(coalescer.submit([2]))
        kept = asyncio.create_task(coalescer.submit([3]))
        await asyncio.sleep(0)
        gone.cancel()
        return await first, await kept, gone.cancelled()

    assert asyncio.run(scenario()) == ([10], [30], True)


def test_a_cancelled_waiting_group_never_reaches_the_model():
    """A submitter cancelled while its group waits behind a running call takes the group out:
    its items are not in the next call, the others' results are unaffected."""
    model = SlowModel(delay=0.05)
    coalescer = Coalescer(model, max_items=100)

    async def scenario():
        first = asyncio.create_task(coalescer.submit([1]))
        await asyncio.sleep(0.01)  # the first call runs
        abandoned = asyncio.create_task(coalescer.submit([7, 8, 9]))
        kept = asyncio.create_task(coalescer.submit([2]))
        await asyncio.sleep(0.01)
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        return await first, await kept

    assert asyncio.run(scenario()) == ([10], [20])
    assert model.calls == [[1], [2]]
    assert (coalescer.cancelled_groups, coalescer.cancelled_items) == (1, 3)


def test_cancelling_a_submitter_during_its_call_does_not_fail_the_others_in_it():
    model = SlowModel(delay=0.05)
    coalescer = Coalescer(model, max_items=100)

    async def scenario():
        blocker = asyncio.create_task(coalescer.submit([1]))
        await asyncio.sleep(0.01)
        a = asyncio.create_task(coalescer.submit([2]))
        b = asyncio.create_task(coalescer.submit([3]))
        await blocker
        await asyncio.sleep(0.01)  # a and b share the second call, which runs now
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        return await b

    assert asyncio.run(scenario()) == [30]
    assert model.calls == [[1], [2, 3]]
