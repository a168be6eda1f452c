"""Small asyncio helpers shared across the package."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Self


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
