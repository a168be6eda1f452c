"""Scaler: turns the listener's demand signals into runner environments, one task per runner.

Each runner lives through one asyncio task::

    PROVISIONING --start ok--> IDLE --JobStarted--> RUNNING --JobCompleted or shutdown--> STOPPING
         |                                                                                    |
         +--start failed / cancelled: deregister, forget              stop, deregister, forget

All bookkeeping happens on the event loop, so the runner map needs no lock; every phase change
goes through :meth:`Scaler._set_phase`, the one place a journal or metrics can observe.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from outrunner._aio import cancel_and_wait
from outrunner.log import BoundLogger, get_logger, register_secret, unregister_secret
from outrunner.provisioner import EnvironmentMonitor, Provisioner, RunnerRequest
from outrunner.runner import RunnerPhase, RunnerSnapshot, RunnerState
from outrunner.scaleset.errors import RunnerNotFoundError
from outrunner.scaleset.types import JitRunnerConfig, JitRunnerSetting, JobCompleted, JobStarted

if TYPE_CHECKING:
    from outrunner.config import RunnerConfig

__all__ = ["ScaleSetClient", "Scaler", "ScalerError"]

STOP_TIMEOUT = 120.0
"""Seconds a provisioner's stop may take before the runner is deregistered anyway."""
DEREGISTER_TIMEOUT = 10.0
WATCH_INTERVAL = 15.0
"""Seconds between checks that a live runner's environment still exists (EnvironmentMonitor)."""
JIT_CONCURRENCY = 8
"""JIT configs requested at once during a burst; bounded so a burst of 100 does not open 100."""


class ScaleSetClient(Protocol):
    """The part of ``outrunner.scaleset.Client`` the Scaler needs."""

    async def generate_jit_runner_config(
        self, setting: JitRunnerSetting, scale_set_id: int
    ) -> JitRunnerConfig: ...

    async def remove_runner(self, runner_id: int) -> None: ...


class ScalerError(RuntimeError):
    """The Scaler could not add the runners it was asked for."""


PhaseObserver = Callable[[str, RunnerSnapshot | None], None]
"""Called with a runner's name and its new snapshot on every change; None once it is forgotten."""


class Scaler:
    """Provisions one environment per job for one scale set; implements the listener's Scaler."""

    def __init__(
        self,
        client: ScaleSetClient,
        *,
        scale_set_id: int,
        max_runners: int,
        name_prefix: str,
        runner: RunnerConfig,
        provisioner: Provisioner,
        logger: BoundLogger | None = None,
        on_phase_change: PhaseObserver | None = None,
        stop_timeout: float = STOP_TIMEOUT,
        deregister_timeout: float = DEREGISTER_TIMEOUT,
        jit_concurrency: int = JIT_CONCURRENCY,
        watch_interval: float = WATCH_INTERVAL,
    ) -> None:
        if max_runners < 0:
            raise ValueError(f"max_runners must be >= 0, got {max_runners}")
        if jit_concurrency < 1:
            raise ValueError(f"jit_concurrency must be >= 1, got {jit_concurrency}")
        self._client = client
        self._scale_set_id = scale_set_id
        self._max_runners = max_runners
        self._prefix = name_prefix
        self._runner_config = runner
        self._provisioner = provisioner
        self._log = logger or get_logger("outrunner.scaler", scale_set=name_prefix)
        self._on_phase_change = on_phase_change
        self._stop_timeout = stop_timeout
        self._deregister_timeout = deregister_timeout
        self._jit_slots = asyncio.Semaphore(jit_concurrency)
        self._watch_interval = watch_interval

        self._runners: dict[str, RunnerState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._start_tasks: dict[str, asyncio.Task[None]] = {}
        # Slots reserved by handle_desired_runner_count calls whose JIT requests are in flight;
        # counting them is what keeps concurrent calls from overshooting the target.
        self._reserved = 0
        self._naming: set[str] = set()
        self._shutting_down = asyncio.Event()

    @property
    def max_runners(self) -> int:
        return self._max_runners

    @max_runners.setter
    def max_runners(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"max_runners must be >= 0, got {value}")
        self._max_runners = value

    def runners(self) -> list[RunnerSnapshot]:
        """Snapshots of every tracked runner, oldest first."""
        return [state.snapshot() for state in self._runners.values()]

    async def handle_desired_runner_count(self, count: int) -> int:
        """Add runners until ``min(max_runners, count)`` exist; never removes any.

        Returns once the new runners are registered and their lifecycles started, without waiting
        for provisioning. The result counts tracked runners plus those other calls are adding.
        """
        target = min(self._max_runners, max(count, 0))
        current = len(self._runners) + self._reserved
        missing = 0 if self._shutting_down.is_set() else target - current
        self._log.debug("Desired runner count", requested=count, target=target, current=current)
        if missing > 0:
            self._reserved += missing
            results = await asyncio.gather(
                *(self._add_runner() for _ in range(missing)), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                for err in errors:
                    if not isinstance(err, Exception):
                        raise err
                raise ScalerError(f"generate JIT config: {errors[0]}") from errors[0]
        return len(self._runners) + self._reserved

    async def handle_job_started(self, job: JobStarted) -> None:
        state = self._runners.get(job.runner_name)
        self._log.info(
            "Job started",
            runner=job.runner_name,
            request_id=job.runner_request_id,
            job=job.job_display_name,
        )
        if state is not None and state.phase in (RunnerPhase.PROVISIONING, RunnerPhase.IDLE):
            self._set_phase(state, RunnerPhase.RUNNING)

    async def handle_job_completed(self, job: JobCompleted) -> None:
        self._log.info("Job completed", runner=job.runner_name, result=job.result)
        state = self._runners.get(job.runner_name)
        if state is not None:
            state.signal_done()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop and deregister every runner; give up waiting after ``timeout`` seconds.

        Runners still provisioning have their start cancelled (the provisioner cleans up after
        itself). Lifecycles still running when the timeout passes are cancelled and named in the
        log, so the next start's orphan cleanup knows what it is looking at.
        """
        self._shutting_down.set()
        for start in list(self._start_tasks.values()):
            start.cancel()
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if not pending:
            self._log.info("All runners shut down")
            return
        left = sorted(name for name, task in self._tasks.items() if task in pending)
        self._log.warning(
            "Shutdown timed out, some runners may not be fully cleaned up", runners=",".join(left)
        )
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)

    async def _add_runner(self) -> None:
        """Fill one slot reserved by handle_desired_runner_count, releasing it whatever happens."""
        name = self._new_name()
        self._naming.add(name)
        try:
            async with self._jit_slots:
                jit = await self._client.generate_jit_runner_config(
                    JitRunnerSetting(name=name), self._scale_set_id
                )
        finally:
            # Released in the same step that tracks the runner, so the count never double-counts.
            self._reserved -= 1
            self._naming.discard(name)
        if self._shutting_down.is_set():
            # Shutdown began while the JIT request was in flight: do not start what will not be
            # stopped, but do not leave the registration behind either.
            await self._deregister(name, jit.runner.id)
            return
        # The JIT config lets whoever holds it act as this runner: mask it in every log line
        # until the runner is forgotten.
        register_secret(jit.encoded_jit_config)
        state = RunnerState(name=name, runner_id=jit.runner.id)
        self._runners[name] = state
        self._notify(state)
        request = RunnerRequest(
            name=name, jit_config=jit.encoded_jit_config, runner=self._runner_config
        )
        self._log.info("Spawning runner", name=name, runner_id=state.runner_id)
        self._tasks[name] = asyncio.create_task(
            self._lifecycle(state, request), name=f"runner:{name}"
        )

    def _new_name(self) -> str:
        while True:
            name = f"{self._prefix}-{secrets.token_hex(4)}"
            if name not in self._runners and name not in self._naming:
                return name

    async def _lifecycle(self, state: RunnerState, request: RunnerRequest) -> None:
        try:
            if not await self._provision(state, request):
                await self._deregister(state.name, state.runner_id)
                return
            waits = {
                asyncio.create_task(state.wait_done()),
                asyncio.create_task(self._shutting_down.wait()),
                asyncio.create_task(self._watch(state.name)),
            }
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    await cancel_and_wait(wait)
            self._set_phase(state, RunnerPhase.STOPPING)
            self._log.info("Stopping runner", name=state.name)
            await self._stop(state.name)
            await self._deregister(state.name, state.runner_id)
        finally:
            unregister_secret(request.jit_config)
            self._runners.pop(state.name, None)
            self._tasks.pop(state.name, None)
            if self._on_phase_change is not None:
                self._on_phase_change(state.name, None)

    async def _watch(self, name: str) -> None:
        """Return once the runner's environment has ended on its own; never, without a monitor."""
        monitor = self._provisioner
        if not isinstance(monitor, EnvironmentMonitor):
            await asyncio.Event().wait()
            return
        while True:
            await asyncio.sleep(self._watch_interval)
            try:
                ended = await monitor.exited(name)
            except Exception as exc:  # a monitor hiccup is no reason to drop a runner
                self._log.debug("Could not check runner environment", name=name, error=str(exc))
                continue
            if ended:
                # A runner exits right after its job, a moment before GitHub's JobCompleted
                # arrives: give that message the chance to end the wait the normal way.
                await asyncio.sleep(min(self._watch_interval, 5.0))
                self._log.warning("Runner environment ended without a completed job", name=name)
                return

    async def _provision(self, state: RunnerState, request: RunnerRequest) -> bool:
        """Run the provisioner's start as its own task so shutdown can cancel just this step."""
        if self._shutting_down.is_set():
            return False
        start = asyncio.create_task(self._provisioner.start(request), name=f"start:{state.name}")
        self._start_tasks[state.name] = start
        try:
            await asyncio.shield(start)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # The lifecycle itself was cancelled (shutdown timeout): still cancel the start.
                await cancel_and_wait(start)
                raise
            self._log.info("Runner start cancelled", name=state.name)
            return False
        except Exception as exc:
            self._log.error("Failed to start runner", name=state.name, error=str(exc))
            return False
        finally:
            self._start_tasks.pop(state.name, None)
        state.started_at = datetime.now(UTC)
        if state.phase is RunnerPhase.RUNNING:
            self._log.info("Runner provisioned (job already assigned)", name=state.name)
            self._notify(state)
        else:
            self._set_phase(state, RunnerPhase.IDLE)
            self._log.info("Runner provisioned", name=state.name)
        return True

    async def _stop(self, name: str) -> None:
        try:
            async with asyncio.timeout(self._stop_timeout):
                await self._provisioner.stop(name)
        except TimeoutError:
            self._log.error("Timed out stopping runner", name=name, timeout=self._stop_timeout)
        except Exception as exc:
            self._log.error("Failed to stop runner", name=name, error=str(exc))

    async def _deregister(self, name: str, runner_id: int) -> None:
        if runner_id == 0:
            return
        try:
            async with asyncio.timeout(self._deregister_timeout):
                await self._client.remove_runner(runner_id)
        except RunnerNotFoundError:
            # Ephemeral JIT runners are removed by GitHub once their job ends: nothing to do.
            self._log.debug("Runner already deregistered", name=name, runner_id=runner_id)
        except TimeoutError:
            self._log.warning("Timed out deregistering runner", name=name, runner_id=runner_id)
        except Exception as exc:
            self._log.warning(
                "Failed to deregister runner", name=name, runner_id=runner_id, error=str(exc)
            )

    def _set_phase(self, state: RunnerState, phase: RunnerPhase) -> None:
        state.phase = phase
        self._notify(state)

    def _notify(self, state: RunnerState) -> None:
        if self._on_phase_change is not None:
            self._on_phase_change(state.name, state.snapshot())
