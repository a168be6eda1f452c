"""Workers: a backend's bounded threads for short blocking SDK calls, and its undo tasks.

The Docker and libvirt SDKs block. Each backend runs their calls in a small pool of its own
(DESIGN: the default executor has only cpu+4 threads, and a busy backend must not starve the
others), one short call at a time; waiting happens on the event loop between calls.

A start that fails or is cancelled after its backend made something (a container, a domain)
hands the removal to :meth:`Workers.undo`: the removal runs shielded, so a second cancellation
cannot strand what was made, and :meth:`Workers.close` waits for it before the pool goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial
from typing import Any, ParamSpec, TypeVar

_P = ParamSpec("_P")
_T = TypeVar("_T")


class Workers:
    def __init__(self, executor: Executor | None, *, max_workers: int, name: str) -> None:
        self._own = executor is None
        self.executor: Executor = executor or ThreadPoolExecutor(
            max_workers, thread_name_prefix=name
        )
        self._undoing: set[asyncio.Task[None]] = set()

    async def call(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run one short blocking call in the pool."""
        return await self.submit(fn, *args, **kwargs)

    def submit(
        self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> asyncio.Future[_T]:
        """Start a blocking call and hand back its future, for callers that must keep hold of
        it even when they are cancelled (to undo what the call makes)."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self.executor, partial(fn, *args, **kwargs))

    async def undo(self, removal: Coroutine[Any, Any, None]) -> None:
        """Run ``removal`` to the end even if the caller is cancelled meanwhile."""
        task = asyncio.create_task(removal)
        self._undoing.add(task)
        task.add_done_callback(self._undoing.discard)
        await asyncio.shield(task)

    async def close(self, timeout: float) -> None:
        """Wait (bounded) for pending undos, then shut the pool down if it is ours."""
        if self._undoing:
            await asyncio.wait(set(self._undoing), timeout=timeout)
        if self._own:
            self.executor.shutdown(wait=False, cancel_futures=True)
