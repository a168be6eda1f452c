"""ScaleSetWorker: one runner entry of the config, as a scale set with a listener and a Scaler.

Setup happens once: orphan cleanup, runner group lookup, get-or-create of the scale set (labels
updated when they differ). Then the worker keeps a message session open and a listener polling
it. When the session or the listener fails, the runners of that session are stopped and
deregistered, and a new session is opened after a backoff, so a bad minute at GitHub does not end
the farm. Scale sets are never deleted: the next start reuses them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol

from outrunner.config import RunnerConfig
from outrunner.log import BoundLogger, get_logger
from outrunner.provisioner import OrphanCleaner, Provisioner
from outrunner.runner import RunnerSnapshot
from outrunner.scaler import Scaler
from outrunner.scaleset.errors import RetryExhaustedError, TransportError
from outrunner.scaleset.listener import Listener
from outrunner.scaleset.session import MessageSession
from outrunner.scaleset.types import (
    JitRunnerConfig,
    JitRunnerSetting,
    Label,
    RunnerGroup,
    RunnerScaleSet,
    RunnerSetting,
)

__all__ = ["Backoff", "ScaleSetWorker", "WorkerClient", "labels_match"]


class WorkerClient(Protocol):
    """What a worker needs from ``outrunner.scaleset.Client``."""

    async def get_runner_group_by_name(self, name: str) -> RunnerGroup: ...

    async def get_runner_scale_set(
        self, runner_group_id: int, name: str
    ) -> RunnerScaleSet | None: ...

    async def create_runner_scale_set(self, scale_set: RunnerScaleSet) -> RunnerScaleSet: ...

    async def update_runner_scale_set(
        self, scale_set_id: int, scale_set: RunnerScaleSet
    ) -> RunnerScaleSet: ...

    async def generate_jit_runner_config(
        self, setting: JitRunnerSetting, scale_set_id: int
    ) -> JitRunnerConfig: ...

    async def remove_runner(self, runner_id: int) -> None: ...

    async def create_message_session(self, scale_set_id: int, owner: str) -> MessageSession: ...


@dataclass(frozen=True)
class Backoff:
    """Waits between session restarts: ``initial * 2**n`` capped at ``maximum``."""

    initial: float = 1.0
    maximum: float = 60.0

    def delay(self, failures: int) -> float:
        return float(min(self.maximum, self.initial * 2 ** max(failures - 1, 0)))


def labels_match(existing: tuple[Label, ...], desired: tuple[Label, ...]) -> bool:
    """Same label names, ignoring order and type (what gha-outrunner compares)."""
    return len(existing) == len(desired) and {label.name for label in desired} <= {
        label.name for label in existing
    }


class ScaleSetWorker:
    """Runs one scale set until cancelled; cleans up its runners and session on the way out."""

    def __init__(
        self,
        client: WorkerClient,
        runner: RunnerConfig,
        *,
        max_runners: int,
        provisioner: Provisioner,
        owner: str,
        logger: BoundLogger | None = None,
        shutdown_timeout: float = 30.0,
        backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        healthy_after: float = 300.0,
    ) -> None:
        self.runner = runner
        self.max_runners = max_runners
        self._client = client
        self._provisioner = provisioner
        self._owner = owner
        self._log = logger or get_logger("outrunner.worker", scale_set=runner.name)
        self._shutdown_timeout = shutdown_timeout
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._healthy_after = healthy_after
        self._scaler: Scaler | None = None
        self.scale_set: RunnerScaleSet | None = None
        self.ready = asyncio.Event()
        """Set once the scale set exists and the first session is listening."""

    @property
    def name(self) -> str:
        return self.runner.name

    def runners(self) -> list[RunnerSnapshot]:
        return [] if self._scaler is None else self._scaler.runners()

    async def run(self) -> None:
        """Set up the scale set, then listen until cancelled.

        Setup is retried with backoff while GitHub cannot be reached (every HTTP attempt failed
        in a retryable way); any other setup error (bad credentials, an unknown runner group) is
        raised, since waiting will not fix it.
        """
        try:
            await self._clean_orphans()
            scale_set = await self._set_up()
            self.scale_set = scale_set
            failures = 0
            loop = asyncio.get_running_loop()
            while True:
                began = loop.time()
                try:
                    await self._listen(scale_set.id)
                except Exception as exc:
                    # Whatever broke the session (GitHub down, token trouble, a scaler error),
                    # its runners are cleaned up by now; a new session is the way forward.
                    if loop.time() - began >= self._healthy_after:
                        failures = 0  # a session that served for a while starts a fresh count
                    failures += 1
                    delay = self._backoff.delay(failures)
                    self._log.error("Listener failed, reconnecting", error=str(exc), retry_in=delay)
                    await self._sleep(delay)
        finally:
            await self._provisioner.close()

    async def _set_up(self) -> RunnerScaleSet:
        failures = 0
        while True:
            try:
                return await self._ensure_scale_set()
            except (RetryExhaustedError, TransportError) as exc:
                failures += 1
                delay = self._backoff.delay(failures)
                self._log.error("GitHub unreachable during setup", error=str(exc), retry_in=delay)
                await self._sleep(delay)

    async def _clean_orphans(self) -> None:
        if not isinstance(self._provisioner, OrphanCleaner):
            return
        removed = await self._provisioner.cleanup(f"{self.name}-")
        if removed:
            self._log.warning(
                "Removed orphaned runners", count=len(removed), names=",".join(removed)
            )

    async def _ensure_scale_set(self) -> RunnerScaleSet:
        group = await self._client.get_runner_group_by_name(self.runner.runner_group)
        labels = tuple(Label(name=label, type="User") for label in self.runner.labels)
        self._log.info("Looking for scale set", runner_group=group.name)
        existing = await self._client.get_runner_scale_set(group.id, self.name)
        if existing is None:
            self._log.info("Creating scale set")
            scale_set = await self._client.create_runner_scale_set(
                RunnerScaleSet(
                    name=self.name,
                    runner_group_id=group.id,
                    labels=labels,
                    runner_setting=RunnerSetting(disable_update=True),
                )
            )
        elif not labels_match(existing.labels, labels):
            self._log.info("Updating scale set labels")
            # PATCH sends the whole object back, as the Go worker does, with only labels changed.
            scale_set = await self._client.update_runner_scale_set(
                existing.id, replace(existing, labels=labels)
            )
        else:
            scale_set = existing
        self._log.info("Scale set ready", id=scale_set.id)
        return scale_set

    async def _listen(self, scale_set_id: int) -> None:
        session = await self._client.create_message_session(scale_set_id, self._owner)
        scaler = Scaler(
            self._client,
            scale_set_id=scale_set_id,
            max_runners=self.max_runners,
            name_prefix=self.name,
            runner=self.runner,
            provisioner=self._provisioner,
            logger=self._log.group("scaler"),
        )
        self._scaler = scaler
        async with session:
            try:
                listener = Listener(session, max_runners=self.max_runners)
                self._log.info("Listening for jobs", max_runners=self.max_runners)
                self.ready.set()
                await listener.run(scaler)
            finally:
                # Runners belong to the session that spawned them: stop and deregister them
                # before the session is deleted (shutdown) or replaced (failure).
                await scaler.shutdown(self._shutdown_timeout)
