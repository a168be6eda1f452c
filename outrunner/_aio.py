"""Small asyncio helpers shared across the package."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Self

# The context first_of's wake-up callbacks run in: they read no context variable, and a
# callback added without one copies the caller's context each time.
_WAKE_CONTEXT = contextvars.Context()


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has finished, without inheriting its outcome.

    Unlike ``with suppress(BaseException): await task``, a cancellation of the caller itself
    still propagates, and the task's own exception is marked retrieved so asyncio does not
    report it as lost.
    """
    if task is None:
        return
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()


class Signal:
    """A flag that is set once and never cleared, which any number of waiters can wait on
    without a task each.

    With ``asyncio.Event``, every wait is a coroutine, and waiting for the first of several
    events with ``asyncio.wait`` makes each of them a task, which has to be cancelled and
    awaited afterwards. A runner's life waits like that several times (its job done, a release
    asked for, the drain, a forced shutdown): at 1,000 runners, those tasks were half of the
    Scaler's tasks and a good part of the objects the garbage collector walks. A Signal's
    :meth:`waiter` is one future shared by every waiter; ``asyncio.wait`` takes it as is.

    :func:`first_of` takes the Signal itself, which is cheaper still: its wake-up callback goes
    in a set, so taking it out again costs the same however many wait. (A future's callbacks
    are a list: with 1,000 runners waiting on the Scaler's drain signal, each runner that
    stopped waiting scanned all of them, a few percent of the process's CPU.)
    """

    __slots__ = ("_future", "_set", "_wakes")

    def __init__(self) -> None:
        self._set = False
        self._future: asyncio.Future[None] | None = None
        self._wakes: set[Callable[[object], None]] = set()

    def set(self) -> None:
        self._set = True
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)
        wakes, self._wakes = self._wakes, set()
        for wake in wakes:
            wake(self)

    def is_set(self) -> bool:
        return self._set

    def waiter(self) -> asyncio.Future[None]:
        """A future of the running loop that is done once the signal is set, shared by every
        caller: pass it to ``asyncio.wait``, never cancel it (use :meth:`wait` to await)."""
        loop = asyncio.get_running_loop()
        future = self._future
        if future is None or future.cancelled() or future.get_loop() is not loop:
            future = self._future = loop.create_future()
            if self._set:
                future.set_result(None)
        return future

    async def wait(self) -> None:
        """Wait until the signal is set (cancelling the caller leaves the signal alone)."""
        if not self._set:
            await asyncio.shield(self.waiter())


async def first_of(
    *waits: Coroutine[Any, Any, Any] | asyncio.Future[Any] | Signal, timeout: float | None = None
) -> int:
    """Wait for the first of ``waits`` to finish (a :class:`Signal`: to be set); return its
    index, or -1 when ``timeout`` seconds passed first. Coroutines are run as tasks and
    cancelled once this returns; futures, tasks and signals passed in are the caller's and left
    as they are (a :meth:`Signal.waiter` is shared by many callers).

    Like ``asyncio.wait(..., return_when=FIRST_COMPLETED)`` with less on the way: one future to
    wake on, callbacks that do not copy the caller's context each, no coroutines of its own. A
    runner waits like this for its whole life, so at 1,000 runners these objects are much of
    what the garbage collector walks.
    """
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[Any] | Signal] = []
    owned: list[asyncio.Task[Any]] = []
    for wait in waits:
        if isinstance(wait, Signal) or asyncio.isfuture(wait):
            futures.append(wait)
        else:
            owned.append(loop.create_task(wait))
            futures.append(owned[-1])
    try:
        winner = _first_done(futures)
        if winner < 0:
            woken: asyncio.Future[None] = loop.create_future()

            def wake(_: object) -> None:
                if not woken.done():
                    woken.set_result(None)

            for future in futures:
                if isinstance(future, Signal):
                    future._wakes.add(wake)
                else:
                    future.add_done_callback(wake, context=_WAKE_CONTEXT)
            timer = None
            if timeout is not None:
                timer = loop.call_later(timeout, wake, None, context=_WAKE_CONTEXT)
            try:
                await woken
            finally:
                if timer is not None:
                    timer.cancel()
                for future in futures:
                    if isinstance(future, Signal):
                        future._wakes.discard(wake)
                    else:
                        future.remove_done_callback(wake)
            winner = _first_done(futures)
    finally:
        for task in owned:
            await cancel_and_wait(task)
    return winner


def _first_done(futures: list[asyncio.Future[Any] | Signal]) -> int:
    return next(
        (
            i
            for i, future in enumerate(futures)
            if (future._set if isinstance(future, Signal) else future.done())
        ),
        -1,
    )


def backoff(first: float, maximum: float, factor: float = 2.0) -> Iterator[float]:
    """Endless poll delays: ``first``, then multiplied by ``factor`` up to ``maximum``.

    Backends poll a daemon between short calls (DESIGN: never sleep in a worker thread); this
    keeps the first answers quick and the steady state cheap.
    """
    delay = first
    while True:
        yield delay
        delay = min(delay * factor, maximum)


class ClosingContext:
    """``async with obj:`` that calls ``await obj.close()`` on the way out."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
