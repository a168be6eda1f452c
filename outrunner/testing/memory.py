"""InMemoryProvisioner: a Provisioner whose environments are entries in a dict.

It keeps the full provisioner contract (cancellable start that leaves nothing, idempotent stop,
prefix cleanup, close), so it can stand in for a real backend in tests of anything above the
provisioner seam. Give it a ``workload`` (for example the fake runner agent) to make each
"environment" actually do something with its JIT config.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from outrunner._aio import ClosingContext, cancel_and_wait
from outrunner.provisioner import RunnerRequest, is_runner_name

__all__ = ["InMemoryProvisioner", "MemoryEnvironment"]

Workload = Callable[[RunnerRequest], Awaitable[object]]


@dataclass
class MemoryEnvironment:
    request: RunnerRequest
    task: asyncio.Task[object] | None = field(default=None, repr=False)

    @property
    def exited(self) -> bool:
        """True once the workload ended on its own (the environment 'died' or finished)."""
        return self.task is not None and self.task.done()


class InMemoryProvisioner(ClosingContext):
    """Environments as dict entries, with knobs to make start slow, blocked or failing."""

    def __init__(
        self,
        *,
        workload: Workload | None = None,
        start_delay: float = 0.0,
        start_error: Exception | None = None,
        start_gate: asyncio.Event | None = None,
    ) -> None:
        self.workload = workload
        self.start_delay = start_delay
        self.start_error = start_error
        self.start_gate = start_gate
        self.environments: dict[str, MemoryEnvironment] = {}
        self.events: list[tuple[str, str]] = []
        """Every call in order, as ``(verb, name)``: start, started, start-failed, stop, cleanup."""
        self.max_concurrent = 0
        self.closed = False

    @property
    def started(self) -> list[str]:
        return [name for verb, name in self.events if verb == "started"]

    @property
    def stopped(self) -> list[str]:
        return [name for verb, name in self.events if verb == "stop"]

    async def start(self, request: RunnerRequest) -> None:
        if self.closed:
            raise RuntimeError("InMemoryProvisioner is closed")
        if request.name in self.environments:
            raise RuntimeError(f"environment {request.name} already exists")
        self.events.append(("start", request.name))
        try:
            if self.start_gate is not None:
                await self.start_gate.wait()
            if self.start_delay:
                await asyncio.sleep(self.start_delay)
            if self.start_error is not None:
                raise self.start_error
        except BaseException:
            self.events.append(("start-failed", request.name))
            raise
        env = MemoryEnvironment(request)
        if self.workload is not None:
            env.task = asyncio.create_task(
                _as_coroutine(self.workload(request)), name=f"workload:{request.name}"
            )
        self.environments[request.name] = env
        self.max_concurrent = max(self.max_concurrent, len(self.environments))
        self.events.append(("started", request.name))

    async def stop(self, name: str) -> None:
        self.events.append(("stop", name))
        env = self.environments.pop(name, None)
        if env is not None:
            await cancel_and_wait(env.task)

    async def exited(self, name: str) -> bool:
        env = self.environments.get(name)
        return env is None or env.exited

    async def cleanup(self, prefix: str) -> list[str]:
        names = sorted(name for name in self.environments if is_runner_name(name, prefix))
        for name in names:
            self.events.append(("cleanup", name))
            await cancel_and_wait(self.environments.pop(name).task)
        return names

    async def close(self) -> None:
        for name in list(self.environments):
            await cancel_and_wait(self.environments.pop(name).task)
        self.closed = True


async def _as_coroutine(awaitable: Awaitable[object]) -> object:
    return await awaitable
