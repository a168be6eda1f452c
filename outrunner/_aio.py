"""Small asyncio helpers shared across the package."""

from __future__ import annotations

import asyncio
from typing import Any


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
