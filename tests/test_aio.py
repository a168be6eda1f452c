"""The shared asyncio helpers."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from outrunner._aio import backoff, cancel_and_wait


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
