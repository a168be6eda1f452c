"""The shared asyncio helpers."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from outrunner._aio import Signal, backoff, cancel_and_wait, first_of


def test_backoff_grows_to_its_maximum_and_stays() -> None:
    assert list(itertools.islice(backoff(0.1, 0.5), 5)) == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert list(itertools.islice(backoff(1, 3, factor=1.5), 4)) == [1, 1.5, 2.25, 3]


@pytest.mark.anyio
async def test_cancel_and_wait_swallows_the_task_outcome_not_the_callers_cancellation() -> None:
    async def failing() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("cleanup failed")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.done()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)  # a cleanup that takes a while
            raise

    blocker = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(cancel_and_wait(blocker))
    await asyncio.sleep(0.01)  # the waiter is now inside its wait
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not blocker.done()
    await asyncio.wait({blocker})
    await cancel_and_wait(None)


@pytest.mark.anyio
async def test_a_signal_wakes_every_waiter_through_one_shared_future() -> None:
    signal = Signal()
    assert not signal.is_set()
    assert signal.waiter() is signal.waiter()  # shared: no object per waiter
    waiters = [asyncio.create_task(signal.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    signal.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert signal.is_set()
    assert signal.waiter().done()
    await signal.wait()  # set: returns at once


@pytest.mark.anyio
async def test_cancelling_a_waiter_leaves_the_signal_and_the_other_waiters_alone() -> None:
    signal = Signal()
    first, second = (asyncio.create_task(signal.wait()) for _ in range(2))
    await asyncio.sleep(0)
    await cancel_and_wait(first)
    assert not signal.waiter().cancelled()
    signal.set()
    await asyncio.wait_for(second, 1)


def test_a_signal_set_outside_a_loop_is_set_in_the_next_one() -> None:
    signal = Signal()
    signal.set()

    async def check() -> bool:
        return signal.waiter().done()

    assert asyncio.run(check())
    assert asyncio.run(check())  # a new loop gets a future of its own, already done


@pytest.mark.anyio
async def test_first_of_returns_the_index_of_the_first_to_finish() -> None:
    slow, fast = Signal(), Signal()
    asyncio.get_running_loop().call_later(0.01, fast.set)
    assert await first_of(slow.waiter(), fast.waiter()) == 1
    assert not slow.waiter().done()
    assert await first_of(slow.waiter(), fast.waiter()) == 1  # already done: no wait
    assert await first_of(slow.waiter(), timeout=0.01) == -1


@pytest.mark.anyio
async def test_first_of_cancels_the_coroutines_it_started_not_the_callers_futures() -> None:
    started = asyncio.Event()
    cancelled = False

    async def forever() -> None:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled = True
            raise

    theirs = asyncio.create_task(asyncio.sleep(10))
    assert await first_of(forever(), theirs, asyncio.sleep(0.01)) == 2
    assert started.is_set()
    assert cancelled
    assert not theirs.done()  # the caller's task is left running
    theirs.cancel()


@pytest.mark.anyio
async def test_cancelling_first_of_removes_its_callbacks_and_cancels_its_tasks() -> None:
    shared = Signal()
    before = asyncio.all_tasks()
    waiting = asyncio.create_task(first_of(shared.waiter(), asyncio.sleep(10)))
    await asyncio.sleep(0.01)
    await cancel_and_wait(waiting)
    assert waiting.cancelled()
    future = shared.waiter()
    assert not future.cancelled()
    assert asyncio.all_tasks() == before  # the sleep's task is gone too


@pytest.mark.anyio
async def test_first_of_takes_signals_and_leaves_none_of_its_wake_ups_on_them() -> None:
    shared, mine = Signal(), Signal()
    # Many waiters on one signal, as every runner of a Scaler on its drain signal.
    waiting = [asyncio.create_task(first_of(mine, shared, timeout=10.0)) for _ in range(100)]
    await asyncio.sleep(0.01)
    assert len(shared._wakes) == 100
    for task in waiting[:50]:
        await cancel_and_wait(task)
    assert len(shared._wakes) == 50  # each cancelled wait took its own wake-up out
    mine.set()
    assert [await task for task in waiting[50:]] == [0] * 50
    assert (shared._wakes, mine._wakes) == (set(), set())
    assert await first_of(shared, mine) == 1  # already set: no wait
    shared.set()
    assert await first_of(asyncio.sleep(10), shared) == 1
    assert await first_of(Signal(), timeout=0.01) == -1
