"""InMemoryProvisioner: a Provisioner whose environments are entries in a dict.

It keeps the full provisioner contract (cancellable start that leaves nothing, idempotent stop,
prefix cleanup, close) and every optional capability (EnvironmentMonitor, ExitWatcher, Adopter),
so it can stand in for a real backend in tests of anything above the provisioner seam. Give it a
``workload`` (for example the fake runner agent) to make each "environment" actually do something
with its JIT config.

Like a real backend's containers and VMs, environments outlive :meth:`InMemoryProvisioner.close`
when ``survive_close=True``: hand the same environments to a new provisioner
(``InMemoryProvisioner(environments=old.environments)``) to test adoption after a "restart".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

from outrunner._aio import ClosingContext, Signal, cancel_and_wait, first_of
from outrunner.config import RunnerConfig
from outrunner.provisioner import RunnerRequest, is_runner_name

__all__ = ["InMemoryProvisioner", "MemoryEnvironment"]

Workload = Callable[[RunnerRequest], Awaitable[object]]


@dataclass
class MemoryEnvironment:
    request: RunnerRequest
    task: asyncio.Task[object] | None = field(default=None, repr=False)
    removed: Signal = field(default_factory=Signal, repr=False)
    """Set once the environment is stopped or cleaned up."""
    ended: Signal = field(default_factory=Signal, repr=False)
    """Set once its runner process ended on its own (the workload returned, or :meth:`end`)."""

    @property
    def exited(self) -> bool:
        """True once the workload ended on its own (the environment 'died' or finished)."""
        return self.ended.is_set()

    def end(self) -> None:
        """End the runner process by itself, as a runner does after its job."""
        self.ended.set()


class InMemoryProvisioner(ClosingContext):
    """Environments as dict entries, with knobs to make start slow, blocked or failing."""

    def __init__(
        self,
        *,
        workload: Workload | None = None,
        start_delay: float = 0.0,
        start_error: Exception | None = None,
        start_gate: asyncio.Event | None = None,
        environments: dict[str, MemoryEnvironment] | None = None,
        survive_close: bool = False,
    ) -> None:
        self.workload = workload
        self.start_delay = start_delay
        self.start_error = start_error
        self.start_gate = start_gate
        self.survive_close = survive_close
        self.environments: dict[str, MemoryEnvironment] = (
            {} if environments is None else environments
        )
        """Name -> environment; share the dict with a later instance to simulate a restart."""
        self.events: list[tuple[str, str]] = []
        """Every call in order, as ``(verb, name)``: start, started, start-failed, stop, cleanup,
        adopted, not-adopted."""
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
            env.task.add_done_callback(lambda _: env.end())
        self.environments[request.name] = env
        self.max_concurrent = max(self.max_concurrent, len(self.environments))
        self.events.append(("started", request.name))

    async def stop(self, name: str) -> None:
        self.events.append(("stop", name))
        env = self.environments.pop(name, None)
        if env is not None:
            await _discard(env)

    async def exited(self, name: str) -> bool:
        env = self.environments.get(name)
        return env is None or env.exited

    async def wait_exited(self, name: str) -> None:
        env = self.environments.get(name)
        if env is None:
            return
        await first_of(env.removed, env.ended)

    async def adopt(self, name: str, runner: RunnerConfig) -> bool:
        env = self.environments.get(name)
        alive = env is not None and not env.exited and env.request.runner.name == runner.name
        self.events.append(("adopted" if alive else "not-adopted", name))
        return alive

    async def cleanup(self, prefix: str, *, keep: Collection[str] = ()) -> list[str]:
        names = sorted(
            name for name in self.environments if is_runner_name(name, prefix) and name not in keep
        )
        for name in names:
            self.events.append(("cleanup", name))
            await _discard(self.environments.pop(name))
        return names

    async def close(self) -> None:
        if not self.survive_close:
            for name in list(self.environments):
                await _discard(self.environments.pop(name))
        self.closed = True


async def _discard(env: MemoryEnvironment) -> None:
    env.removed.set()
    await cancel_and_wait(env.task)


async def _as_coroutine(awaitable: Awaitable[object]) -> object:
    return await awaitable
