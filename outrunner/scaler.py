"""Scaler: turns the listener's demand signals into runner environments, one task per runner.

A Scaler belongs to its scale set worker for the worker's whole life, not to a message session:
a session that fails is replaced while every runner keeps running, and the next session's
messages reach the same Scaler. Each runner lives through one asyncio task::

    (JIT) PROVISIONING --start ok--> IDLE --JobStarted--> RUNNING --JobCompleted/exit--> STOPPING
              |                        |                                                    |
              +- start failed ---------+- drain: deregistered first (409: it is busy) ------+
                                                                    stop, then deregister

Three things end a runner that is running a job, and nothing else: its job completing (the
JobCompleted message), its environment ending on its own (the runner exits after its job;
:class:`~outrunner.provisioner.ExitWatcher` or the :class:`EnvironmentMonitor` poll), or
:meth:`Scaler.shutdown` (the drain timeout or an operator's second signal). :meth:`drain` only
releases runners that have no job: each is deregistered *first*, so a job cannot land on it
while it is being stopped; GitHub's 409 (JobStillRunning) says it took one, and it is kept.

Deregistration is retried with backoff until GitHub confirms it (204, or 404: already gone), in
a task of its own, so a runner whose environment is gone no longer holds a slot while GitHub is
down. The journal (:mod:`outrunner.journal`) keeps every runner from before its JIT request
until that confirmation, so a crash at any point leaks nothing the next start cannot find.

All bookkeeping happens on the event loop, so the runner map needs no lock; every phase change
goes through :meth:`Scaler._set_phase`, the one place the journal and metrics observe.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum, auto
from typing import TYPE_CHECKING, Any, Final, Protocol

from outrunner._aio import Signal, backoff, cancel_and_wait, first_of
from outrunner.failures import Failure, classify
from outrunner.journal import JournalEntry, JournalPhase
from outrunner.log import BoundLogger, get_logger, register_secret, unregister_secret
from outrunner.provisioner import EnvironmentMonitor, ExitWatcher, Provisioner, RunnerRequest
from outrunner.runner import RunnerPhase, RunnerSnapshot, RunnerState
from outrunner.scaleset.errors import JobStillRunningError, RunnerNotFoundError
from outrunner.scaleset.types import (
    JitRunnerConfig,
    JitRunnerSetting,
    JobCompleted,
    JobStarted,
    RunnerReference,
)

if TYPE_CHECKING:
    from outrunner.config import RunnerConfig

__all__ = ["RunnerJournal", "ScaleSetClient", "Scaler", "ScalerError", "StartBackoff"]

STOP_TIMEOUT = 120.0
"""Seconds a provisioner's stop may take before the runner is deregistered anyway."""
STOP_ATTEMPTS: Final = 3
"""A stop that fails (an engine hiccup) is tried this often, waiting ``retry_first`` (1 s)
doubling between tries, before the environment is given up on (logged; the next start's orphan
cleanup finds it)."""
START_TIMEOUT = 1800.0
"""Seconds a provisioner's start may take (image pull and boot included) before it is cancelled
and counted as a failed start; the backends' own boot timeouts are usually far shorter."""
DEREGISTER_TIMEOUT = 10.0
"""Seconds one deregistration attempt may take."""
WATCH_INTERVAL = 15.0
"""Seconds between checks that a live runner's environment still exists (EnvironmentMonitor)."""
JIT_CONCURRENCY = 8
"""JIT configs requested at once during a burst; bounded so a burst of 100 does not open 100.
Runner removals (deregistrations, releases) are bounded to twice as many."""
RETRY_FIRST: Final = 1.0
RETRY_MAX: Final = 60.0
"""Backoff (seconds) between deregistration attempts while GitHub does not confirm them."""
START_BACKOFF_FIRST: Final = 1.0
START_BACKOFF_MAX: Final = 300.0
"""Backoff (seconds) after consecutive failed starts: 1 s doubling to 5 minutes, jittered."""
JIT_SETTLE: Final = 3.0
"""Seconds after a JIT request failed or was cut off during which a lookup by name that finds no
such runner is not taken as final: the server may still be handling the request (a connection
dropped or cancelled mid-request does not stop it), and the runner it registers would be left
behind (the Scaler's ``jit_settle``)."""
UNCONFIRMED_FOR: Final = 60.0
"""Seconds a runner that ended in the middle of its job, before its JobCompleted message
arrived, still counts towards the demand (see Scaler.handle_desired_runner_count)."""
REAP_INTERVAL = 5.0
"""Seconds between checks of runner ages against ``max_lifetime`` and ``idle_timeout``."""
PHANTOM_REAPS: Final = 3
"""Idle runners reaped in a row while GitHub reports assigned jobs before that is logged as a
likely inflated job count."""


class ScaleSetClient(Protocol):
    """The part of ``outrunner.scaleset.Client`` the Scaler needs."""

    async def generate_jit_runner_config(
        self, setting: JitRunnerSetting, scale_set_id: int
    ) -> JitRunnerConfig: ...

    async def remove_runner(self, runner_id: int) -> None: ...

    async def get_runner_by_name(self, name: str) -> RunnerReference | None: ...


class RunnerJournal(Protocol):
    """Where the Scaler records its runners (``outrunner.journal.Journal``, or your own)."""

    def record(self, entry: JournalEntry) -> None: ...

    def forget(self, name: str) -> None: ...


class ScalerError(RuntimeError):
    """The Scaler was used wrongly (e.g. asked for runners before it knows its scale set).

    A failed JIT request is *not* a ScalerError: it fails that one slot, is logged, and the next
    demand signal tries again; the message session is never ended by it.
    """


@dataclass(frozen=True)
class StartBackoff:
    """A scale set whose runners fail to start: how often in a row, the last reason, and when
    the next start may be tried (until then demand is remembered, not acted on)."""

    failures: int
    last_error: str
    retry_at: datetime


PhaseObserver = Callable[[str, RunnerSnapshot | None], None]
"""Called with a runner's name and its new snapshot on every change; None once it is forgotten."""
ReapObserver = Callable[[str, str], None]
"""Called with a runner's name and the reason (``"max_lifetime"`` or ``"idle_timeout"``) when
the Scaler ends a runner for its age."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Scaler:
    """Provisions one environment per job for one scale set; implements the listener's Scaler."""

    def __init__(
        self,
        client: ScaleSetClient,
        *,
        scale_set_id: int = 0,
        max_runners: int,
        name_prefix: str,
        runner: RunnerConfig,
        provisioner: Provisioner,
        logger: BoundLogger | None = None,
        on_phase_change: PhaseObserver | None = None,
        journal: RunnerJournal | None = None,
        stop_timeout: float = STOP_TIMEOUT,
        start_timeout: float = START_TIMEOUT,
        deregister_timeout: float = DEREGISTER_TIMEOUT,
        jit_settle: float = JIT_SETTLE,
        jit_concurrency: int = JIT_CONCURRENCY,
        watch_interval: float = WATCH_INTERVAL,
        retry_first: float = RETRY_FIRST,
        retry_max: float = RETRY_MAX,
        start_backoff_first: float = START_BACKOFF_FIRST,
        start_backoff_max: float = START_BACKOFF_MAX,
        min_runners: int = 0,
        max_lifetime: float | None = None,
        idle_timeout: float | None = None,
        on_reap: ReapObserver | None = None,
        reap_interval: float = REAP_INTERVAL,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if max_runners < 0:
            raise ValueError(f"max_runners must be >= 0, got {max_runners}")
        if min_runners < 0:
            raise ValueError(f"min_runners must be >= 0, got {min_runners}")
        _check_lifetimes(max_lifetime, idle_timeout)
        if jit_concurrency < 1:
            raise ValueError(f"jit_concurrency must be >= 1, got {jit_concurrency}")
        self._client = client
        self.scale_set_id = scale_set_id
        """The scale set's id at GitHub; 0 until the worker has set the scale set up (adopted
        runners are tracked before that; new ones are only requested after)."""
        self._max_runners = max_runners
        self._min_runners = min_runners
        self._max_lifetime = max_lifetime
        self._idle_timeout = idle_timeout
        self._on_reap = on_reap
        self._reap_interval = reap_interval
        self._clock = clock
        self._reaper: asyncio.Task[None] | None = None
        self._phantom_reaps = 0
        self._prefix = name_prefix
        self._runner_config = runner
        self._backend = _backend_of(runner)
        self._provisioner = provisioner
        # Its optional capabilities, looked up once: a protocol isinstance() walks the
        # protocol's members every time, twice per runner otherwise.
        self._exit_watcher = provisioner if isinstance(provisioner, ExitWatcher) else None
        self._monitor = provisioner if isinstance(provisioner, EnvironmentMonitor) else None
        self._log = logger or get_logger("outrunner.scaler", scale_set=name_prefix)
        self._on_phase_change = on_phase_change
        self._journal = journal
        self._stop_timeout = stop_timeout
        self._start_timeout = start_timeout
        self._deregister_timeout = deregister_timeout
        self._jit_settle = jit_settle
        self._jit_slots = asyncio.Semaphore(jit_concurrency)
        # Removals are bounded too: when a wave of jobs ends together, hundreds of DELETEs built
        # and sent in one loop iteration stalled the loop for hundreds of milliseconds.
        self._removal_slots = asyncio.Semaphore(2 * jit_concurrency)
        self._watch_interval = watch_interval
        self._retry = (retry_first, retry_max)
        self._start_backoff_limits = (start_backoff_first, start_backoff_max)
        self._start_failures = 0
        self._last_start_error = ""
        self._start_retry_at = 0.0  # loop time
        self._start_retry_wall = datetime.now(UTC)
        self._start_retry: asyncio.Task[None] | None = None
        self._desired = 0

        self._runners: dict[str, RunnerState] = {}
        # The runners of _runners that are stopping: each demand signal counts those whose job
        # is done, and walking all of _runners for that was O(runners) per message.
        self._stopping: dict[str, RunnerState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._start_tasks: dict[str, asyncio.Task[None]] = {}
        self._deregistrations: dict[str, asyncio.Task[None]] = {}
        # Slots reserved by handle_desired_runner_count calls whose JIT requests are in flight;
        # counting them is what keeps concurrent calls from overshooting the target.
        self._reserved = 0
        self._adding: set[asyncio.Task[None]] = set()
        """JIT requests in flight, each in its own task (see handle_desired_runner_count)."""
        self._held_back = False
        # Runners gone while running a job whose JobCompleted has not arrived -> loop time they
        # went (see handle_desired_runner_count).
        self._unconfirmed: dict[str, float] = {}
        self._naming: set[str] = set()
        self._draining = Signal()
        self._forced = Signal()
        self._empty = asyncio.Event()
        self._empty.set()

    # -- state -------------------------------------------------------------------------------

    @property
    def max_runners(self) -> int:
        return self._max_runners

    @max_runners.setter
    def max_runners(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"max_runners must be >= 0, got {value}")
        self._max_runners = value

    @property
    def min_runners(self) -> int:
        """Idle runners kept waiting for jobs (the warm pool), within ``max_runners``."""
        return self._min_runners

    @min_runners.setter
    def min_runners(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"min_runners must be >= 0, got {value}")
        self._min_runners = value

    @property
    def runner_config(self) -> RunnerConfig:
        """The runner entry new runners are made from (labels, backend options)."""
        return self._runner_config

    @runner_config.setter
    def runner_config(self, runner: RunnerConfig) -> None:
        # Runners already tracked keep what they were started with; their requests hold it.
        self._runner_config = runner

    def set_lifetimes(self, max_lifetime: float | None, idle_timeout: float | None) -> None:
        """Change ``max_lifetime`` and ``idle_timeout`` (seconds, None: off) for every runner,
        tracked ones included, from the next reaper round on."""
        _check_lifetimes(max_lifetime, idle_timeout)
        self._max_lifetime, self._idle_timeout = max_lifetime, idle_timeout
        self._start_reaper()

    def rebalance(self) -> None:
        """Act on the last demand again now (after ``max_runners`` or ``min_runners`` changed),
        rather than at the next message from GitHub."""
        if not self.draining and self.scale_set_id:
            self._schedule_start_retry()

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` or :meth:`shutdown` was called: no new runners."""
        return self._draining.is_set()

    def runners(self) -> list[RunnerSnapshot]:
        """Snapshots of every tracked runner, oldest first."""
        return [state.snapshot() for state in self._runners.values()]

    def busy_runners(self) -> int:
        """Runners that are running a job."""
        return sum(state.phase is RunnerPhase.RUNNING for state in self._runners.values())

    def pending_deregistrations(self) -> list[str]:
        """Runners whose environment is gone but whose registration GitHub has not yet
        confirmed removed (retried with backoff)."""
        return sorted(self._deregistrations)

    def start_backoff(self) -> StartBackoff | None:
        """The start backoff while the last start failed; None once starts succeed."""
        if not self._start_failures:
            return None
        return StartBackoff(
            failures=self._start_failures,
            last_error=self._last_start_error,
            retry_at=self._start_retry_wall,
        )

    async def wait_empty(self) -> None:
        """Wait until no runner is tracked (pending deregistrations do not count)."""
        await self._empty.wait()

    # -- the listener's Scaler protocol ------------------------------------------------------

    async def handle_desired_runner_count(self, count: int) -> int:
        """Add runners until ``min(max_runners, count + min_runners)`` exist; never removes any.

        ``count`` is GitHub's assigned jobs; ``min_runners`` idle runners wait on top of them
        (the warm pool, as ARC and the actions/scaleset example size it), so a runner that takes
        a job is replaced by the next demand signal, which counts that job.

        A runner stopping after its JobCompleted message takes no more jobs and is no longer in
        GitHub's count, so it does not count towards the demand; its environment still counts
        against ``max_runners`` until it is gone, and demand it held back is met as soon as it
        is. (A runner whose environment ended in the middle of its job counts until its
        JobCompleted arrives, even once it is gone, for up to ``UNCONFIRMED_FOR`` seconds: the
        statistics may still count its job, and a runner started for it would only idle.)

        Returns at once: the JIT requests of new runners run in tasks of their own (so a burst
        never holds up the listener's next poll), at most ``jit_concurrency`` at a time. A JIT
        request that fails fails its slot only (logged; the next demand signal tries again).
        After failed starts, new runners wait out the start backoff (the demand is remembered
        and acted on when it ends) and then come one at a time until a start succeeds. The
        result counts tracked runners plus those being added.
        """
        self._desired = count
        target = min(self._max_runners, max(count, 0) + self._min_runners)
        finished = sum(state.is_done for state in self._stopping.values())
        current = len(self._runners) + self._reserved
        room = self._max_runners - current
        wanted = target - (current - finished + self._count_unconfirmed())
        # Demand that only finished environments hold back is met as soon as one is gone.
        self._held_back = finished > 0 and wanted > room
        missing = 0 if self.draining else min(wanted, room)
        self._log.debug(
            "Desired runner count",
            requested=count,
            target=target,
            current=current,
            finished=finished,
        )
        if missing > 0 and self._start_failures:
            missing = self._probes_allowed(missing)
        if missing > 0:
            if not self.scale_set_id:
                raise ScalerError("the scale set id is not known yet")
            self._reserved += missing
            for _ in range(missing):
                task = asyncio.create_task(self._add_runner(), name=f"add-runner:{self._prefix}")
                self._adding.add(task)
                task.add_done_callback(self._adding.discard)
        return len(self._runners) + self._reserved

    async def settled(self) -> None:
        """Wait until the runners being added are registered (their JIT requests answered)
        and tracked, or have failed; for tests and tools that inspect the Scaler."""
        while self._adding:
            await asyncio.wait(set(self._adding))

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
        self._unconfirmed.pop(job.runner_name, None)

    def _count_unconfirmed(self) -> int:
        """Runners gone in the middle of a job whose JobCompleted has not arrived (forgotten
        after ``UNCONFIRMED_FOR``: a lost message must not hold a slot for good)."""
        if self._unconfirmed:
            now = asyncio.get_running_loop().time()
            for name, gone_at in list(self._unconfirmed.items()):
                if now - gone_at >= UNCONFIRMED_FOR:
                    del self._unconfirmed[name]
        return len(self._unconfirmed)

    # -- recovery, draining, shutdown --------------------------------------------------------

    def adopt(self, name: str, runner_id: int, phase: RunnerPhase) -> RunnerSnapshot:
        """Track a live environment an earlier process started (the provisioner has adopted
        it): it counts against ``max_runners`` and ends like any other runner."""
        if name in self._runners:
            raise ValueError(f"runner {name} is already tracked")
        if phase not in (RunnerPhase.IDLE, RunnerPhase.RUNNING):
            raise ValueError(f"only idle or running runners can be adopted, got {phase}")
        now = self._clock()  # its true age is unknown: its lifetime counts from the adoption
        state = RunnerState(
            name=name, runner_id=runner_id, phase=phase, adopted=True, created_at=now
        )
        state.started_at = now
        self._track(state)
        self._log.info("Adopted runner", name=name, runner_id=runner_id, phase=str(phase))
        self._tasks[name] = asyncio.create_task(self._lifecycle(state, None), name=f"runner:{name}")
        return state.snapshot()

    def deregister_later(self, name: str, runner_id: int) -> None:
        """Remove a registration whose environment is gone, retrying until GitHub confirms it
        (``runner_id`` 0: look the runner up by name first)."""
        self._start_deregistration(name, runner_id)

    def drain(self) -> None:
        """Stop taking work: no new runners; runners without a job are deregistered and stopped
        at once; runners running a job finish it. :meth:`wait_empty` tells when all are gone."""
        if not self.draining:
            self._log.info("Draining", busy=self.busy_runners(), runners=len(self._runners))
        self._draining.set()
        if self._start_retry is not None:
            self._start_retry.cancel()
        if self._reaper is not None:
            self._reaper.cancel()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop and deregister every runner, busy or not; give up waiting after ``timeout``.

        Runners still provisioning have their start cancelled (the provisioner cleans up after
        itself). Lifecycles still running when the timeout passes are cancelled and named in the
        log. Deregistrations get one more prompt attempt each; those GitHub does not confirm in
        time stay in the journal, and the next start retries them.
        """
        self._draining.set()
        self._forced.set()
        await cancel_and_wait(self._start_retry)
        await cancel_and_wait(self._reaper)
        # JIT requests still in flight are cancelled; each leaves a lookup-by-name
        # deregistration behind (the request may have registered it), settled below.
        for adding in list(self._adding):
            await cancel_and_wait(adding)
        for start in list(self._start_tasks.values()):
            start.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._tasks and await self._settle(
            self._tasks, timeout, "Shutdown timed out, some runners may not be fully cleaned up"
        ):
            self._log.info("All runners shut down")
        await self._settle(
            self._deregistrations,
            max(deadline - loop.time(), self._deregister_timeout),
            "GitHub did not confirm some deregistrations; the next start retries them",
        )

    async def _settle(
        self, tasks: dict[str, asyncio.Task[None]], timeout: float, late: str
    ) -> bool:
        """Wait up to ``timeout`` for ``tasks`` (by runner name); cancel those still running and
        name them in a ``late`` warning. True when all finished in time."""
        waiting = dict(tasks)
        if not waiting:
            return True
        _, pending = await asyncio.wait(waiting.values(), timeout=timeout)
        if not pending:
            return True
        self._log.warning(
            late, runners=",".join(sorted(n for n, task in waiting.items() if task in pending))
        )
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)
        return False

    # -- adding runners ----------------------------------------------------------------------

    async def _add_runner(self) -> None:
        """Fill one slot reserved by handle_desired_runner_count, releasing it whatever happens."""
        name = self._new_name()
        self._naming.add(name)
        # Journaled before the request: if the process dies before the answer is recorded, the
        # next start finds the registration by name and removes it.
        self._record(name, 0, JournalPhase.REGISTERING)
        try:
            # ...and on disk before GitHub creates the runner: the journal's group commit syncs
            # off the event loop, so a crash of the machine could otherwise lose the record.
            # ``sync`` is optional (RunnerJournal does not require it), and a failing one must
            # not hold up the start.
            sync: Callable[[], Awaitable[None]] | None = getattr(self._journal, "sync", None)
            if callable(sync):
                try:
                    await sync()
                except Exception as exc:
                    self._log.error("Cannot sync the runner journal", name=name, error=str(exc))
            async with self._jit_slots:
                jit = await self._client.generate_jit_runner_config(
                    JitRunnerSetting(name=name), self.scale_set_id
                )
        except Exception as exc:
            self._log.error("Failed to register runner", name=name, error=str(exc))
            # The request may have reached GitHub before failing (a dropped answer), or may
            # still be handled there.
            self._deregister_unsettled(name)
            return
        except asyncio.CancelledError:
            # Shut down mid-request: GitHub may have registered it all the same.
            self._deregister_unsettled(name)
            raise
        finally:
            # Released in the same step that tracks the runner, so the count never double-counts.
            self._reserved -= 1
            self._naming.discard(name)
        if self.draining:
            # Draining began while the JIT request was in flight: do not start what will not be
            # used, but do not leave the registration behind either.
            self._start_deregistration(name, jit.runner.id)
            return
        # The JIT config lets whoever holds it act as this runner. The log redactor masks it by
        # its shape (base64 JSON) without this; registering it too is the fallback should
        # GitHub ever change the format, and costs O(1) (outrunner/log.py).
        register_secret(jit.encoded_jit_config)
        state = RunnerState(name=name, runner_id=jit.runner.id, created_at=self._clock())
        self._track(state)
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
            if (
                name not in self._runners
                and name not in self._naming
                and name not in self._deregistrations
            ):
                return name

    def _track(self, state: RunnerState) -> None:
        self._runners[state.name] = state
        self._empty.clear()
        self._notify(state)
        self._start_reaper()

    def _start_reaper(self) -> None:
        """One reaper per Scaler, once a lifetime is set and a runner is tracked."""
        wanted = (self._max_lifetime or self._idle_timeout) and self._runners
        if wanted and self._reaper is None and not self.draining:
            self._reaper = asyncio.create_task(self._reap_loop(), name=f"reaper:{self._prefix}")

    # -- a runner's life ---------------------------------------------------------------------

    async def _lifecycle(self, state: RunnerState, request: RunnerRequest | None) -> None:
        """Provision (unless adopted), wait for the end, stop, deregister."""
        deregistered = False
        ran_job = False
        try:
            if request is not None:
                outcome = await self._provision(state, request)
                if outcome is not _Start.OK:
                    if outcome is _Start.FAILED:
                        self._start_deregistration(state.name, state.runner_id)
                    else:
                        self._forget(state.name)
                    return
            deregistered, why = await self._wait_for_end(state)
            ran_job = state.phase is RunnerPhase.RUNNING
            self._set_phase(state, RunnerPhase.STOPPING)
            self._stopping[state.name] = state
            self._log.info("Stopping runner", name=state.name, reason=why)
            await self._stop(state.name)
            if deregistered:
                self._forget(state.name)
            else:
                self._start_deregistration(state.name, state.runner_id)
        finally:
            if request is not None:
                unregister_secret(request.jit_config)
            self._runners.pop(state.name, None)
            self._stopping.pop(state.name, None)
            self._tasks.pop(state.name, None)
            if not self._runners:
                self._empty.set()
            if ran_job and not state.is_done and not self.draining:
                self._unconfirmed[state.name] = asyncio.get_running_loop().time()
            if self._on_phase_change is not None:
                self._on_phase_change(state.name, None)
            if (state.reaped or self._held_back) and not self.draining:
                # Its slot is free and demand was waiting for it (or it was reaped and needs a
                # replacement): act on the latest demand now, not at the next message, which may
                # be a 50 s long poll away.
                self._schedule_start_retry()

    async def _wait_for_end(self, state: RunnerState) -> tuple[bool, str]:
        """Wait for the job to complete, the environment to end, a forced shutdown, or (while
        draining, for a runner without a job) a successful release. True when the runner was
        released, i.e. its registration is already removed; and which of these it was (the
        ``reason`` of the "Stopping runner" line)."""
        watcher = None
        if self._exit_watcher is not None:
            watcher = asyncio.create_task(self._wait_exited(self._exit_watcher, state.name))
        try:
            while True:
                ends: list[asyncio.Future[Any] | Signal] = [state.done_signal, self._forced]
                if state.phase is not RunnerPhase.RUNNING and not state.release_tried:
                    # indexes 2 and 3: drained, or reaped for its age: release it, then go on
                    ends += [self._draining, state.release_signal]
                got = await self._first_end(state, watcher, ends)
                if got < 2:
                    return False, _end_reason(state, got)
                if state.phase is RunnerPhase.RUNNING:
                    continue  # it took a job while waiting: the drain leaves it alone
                state.release_tried = True
                # The environment may end while GitHub is slow to answer the release.
                release = asyncio.ensure_future(self._release(state))
                if await self._first_end(state, watcher, [release]) < 0:
                    await cancel_and_wait(release)
                    return False, _end_reason(state, -1)
                if release.result():
                    return True, "released"
        finally:
            await cancel_and_wait(watcher)

    async def _first_end(
        self,
        state: RunnerState,
        watcher: asyncio.Task[None] | None,
        ends: list[asyncio.Future[Any] | Signal],
    ) -> int:
        """The index in ``ends`` of the first to finish, or -1 once the runner's environment has
        ended on its own. An ExitWatcher (``watcher``) answers within moments; the
        EnvironmentMonitor poll stays as the safety net (a watcher that failed, an engine that
        lost events), asked every ``watch_interval`` while nothing else has happened.

        No task watches the environment alongside the runner's own: at 1,000 runners, one was
        a fifth of the objects each full garbage collection walks (and stops the loop for).
        """
        monitor = self._monitor
        timeout = None if monitor is None else self._watch_interval
        waits: list[asyncio.Future[Any] | Signal] = [*ends] if watcher is None else [*ends, watcher]
        while True:
            got = await first_of(*waits, timeout=timeout)
            if 0 <= got < len(ends):
                return got
            if got == len(ends):  # the watcher answered
                break
            # A watch interval passed: ask the monitor, still minding the ends.
            assert monitor is not None
            poll = asyncio.ensure_future(self._poll_exited(monitor, state.name))
            try:
                got = await first_of(*ends, poll)
            finally:
                await cancel_and_wait(poll)
            if got < len(ends):
                return got
            exited = poll.result()
            # The finished task (its coroutine and context) would otherwise stay in this frame
            # until the next poll, 15 s on: objects every full garbage collection walks.
            del poll
            if exited:
                break
        if state.phase is not RunnerPhase.RUNNING and not state.is_done:
            self._log.warning("Runner environment ended without running a job", name=state.name)
        # Otherwise the "Stopping runner" line that follows says it (reason=environment exited).
        return -1

    async def _wait_exited(self, watcher: ExitWatcher, name: str) -> None:
        try:
            await watcher.wait_exited(name)
        except Exception as exc:  # polling carries on; a watcher hiccup never drops a runner
            self._log.debug("Cannot watch runner environment", name=name, error=str(exc))
            await asyncio.Event().wait()

    async def _poll_exited(self, monitor: EnvironmentMonitor, name: str) -> bool:
        try:
            return await monitor.exited(name)
        except Exception as exc:  # a monitor hiccup is no reason to drop a runner
            self._log.debug("Could not check runner environment", name=name, error=str(exc))
            return False

    async def _release(self, state: RunnerState) -> bool:
        """Deregister a runner that has no job, before its environment is stopped, so no job can
        be handed to it meanwhile. False when GitHub says it is running one (409), or when the
        job or a forced shutdown comes first; retried with backoff while GitHub is unreachable.
        """
        if state.runner_id == 0:
            return False
        delays = backoff(*self._retry)
        quiet = False
        while True:
            outcome = await self._remove_once(state.name, state.runner_id, quiet=quiet)
            quiet = True  # one warning per runner; the retries are at debug
            if outcome is _Removal.DONE:
                self._log.info("Released idle runner", name=state.name)
                return True
            if outcome is _Removal.BUSY:
                self._log.info(
                    "Runner took a job while draining; letting it finish", name=state.name
                )
                if state.phase is not RunnerPhase.RUNNING:
                    self._set_phase(state, RunnerPhase.RUNNING)
                return False
            waited = await first_of(asyncio.sleep(next(delays)), state.done_signal, self._forced)
            if waited != 0:
                return False

    async def _provision(self, state: RunnerState, request: RunnerRequest) -> _Start:
        """Run the provisioner's start as its own task so shutdown can cancel just this step.

        While draining, a runner still provisioning is released (deregistered, then its start
        cancelled) unless GitHub says it already took a job.
        """
        if self.draining:  # drained before the start began: nothing can have a job yet
            return _Start.FAILED
        start = asyncio.create_task(self._bounded_start(request), name=f"start:{state.name}")
        self._start_tasks[state.name] = start
        try:
            while not start.done():
                if state.release_tried:
                    await asyncio.shield(start)
                    break
                if await first_of(start, self._draining) == 0:
                    break
                state.release_tried = True
                if state.phase is RunnerPhase.RUNNING:
                    continue  # it took its job while provisioning: the drain leaves it alone
                if await self._release(state):
                    started = start.done() and not start.cancelled() and not start.exception()
                    await cancel_and_wait(start)
                    if started:  # the start won the race with a slow release: undo it
                        await self._stop(state.name)
                    self._log.info("Runner start cancelled", name=state.name)
                    return _Start.RELEASED
            start.result()  # the start's own failure or cancellation, handled below
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # The lifecycle itself was cancelled (shutdown timeout): still cancel the start.
                await cancel_and_wait(start)
                raise
            self._log.info("Runner start cancelled", name=state.name)
            return _Start.FAILED
        except Exception as exc:
            self._start_failed(state.name, exc)
            return _Start.FAILED
        finally:
            self._start_tasks.pop(state.name, None)
        self._start_succeeded()
        state.started_at = self._clock()
        if state.phase is RunnerPhase.RUNNING:
            self._log.info("Runner provisioned (job already assigned)", name=state.name)
            self._notify(state)
        else:
            self._set_phase(state, RunnerPhase.IDLE)
            self._log.info("Runner provisioned", name=state.name)
        return _Start.OK

    # -- lifetimes ---------------------------------------------------------------------------

    async def _reap_loop(self) -> None:
        """Every ``reap_interval``, end the runners past ``max_lifetime`` (any phase but
        provisioning, which ``start_timeout`` bounds) or idle past ``idle_timeout``."""
        while not self.draining:
            await asyncio.sleep(self._reap_interval)
            now = self._clock()
            for state in list(self._runners.values()):
                reason = self._reap_reason(state, now)
                if reason is not None:
                    self._reap(state, reason, now)

    def _reap_reason(self, state: RunnerState, now: datetime) -> str | None:
        if state.reaped or state.phase in (RunnerPhase.PROVISIONING, RunnerPhase.STOPPING):
            return None
        age = (now - state.created_at).total_seconds()
        if self._max_lifetime is not None and age >= self._max_lifetime:
            return "max_lifetime"
        if self._idle_timeout is not None and state.phase is RunnerPhase.IDLE:
            idle_since = state.started_at or state.created_at
            if (now - idle_since).total_seconds() >= self._idle_timeout:
                return "idle_timeout"
        return None

    def _reap(self, state: RunnerState, reason: str, now: datetime) -> None:
        state.reaped = True
        age = round((now - state.created_at).total_seconds())
        if state.phase is RunnerPhase.RUNNING:
            # The reaper for wedged environments: a runner whose job should long be over.
            self._log.warning(
                "Runner is over its max_lifetime while running a job; stopping it",
                name=state.name,
                age=age,
                max_lifetime=self._max_lifetime,
            )
            state.signal_done()
        else:
            # Released like a drained idle runner: deregistered first, so no job lands on it
            # while it stops; if GitHub says it just took one (409), it is kept.
            self._log.info("Reaping idle runner", name=state.name, reason=reason, age=age)
            state.request_release()
        if self._on_reap is not None:
            self._on_reap(state.name, reason)
        self._note_phantom(state, reason)

    def _note_phantom(self, state: RunnerState, reason: str) -> None:
        """After GitHub incidents TotalAssignedJobs can stay inflated and hold idle runners for
        jobs that do not exist (actions-runner-controller#4397): say so when idle runners keep
        being reaped while GitHub reports assigned jobs."""
        if state.phase is RunnerPhase.RUNNING or self._desired <= 0:
            self._phantom_reaps = 0
            return
        self._phantom_reaps += 1
        if self._phantom_reaps == PHANTOM_REAPS:
            self._log.warning(
                "Idle runners keep being reaped while GitHub reports assigned jobs; its job "
                "count may be inflated (jobs that no longer exist)",
                reaped_in_a_row=self._phantom_reaps,
                assigned_jobs=self._desired,
                reason=reason,
            )
            self._phantom_reaps = 0

    # -- start backoff -----------------------------------------------------------------------

    def _probes_allowed(self, missing: int) -> int:
        """How many of ``missing`` runners may be added while starts are failing: none until the
        backoff ends (a retry is scheduled for the remembered demand), then one at a time."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._start_retry_at:
            self._schedule_start_retry()
            return 0
        in_flight = self._reserved + sum(
            state.phase is RunnerPhase.PROVISIONING for state in self._runners.values()
        )
        return min(missing, max(0, 1 - in_flight))

    def _start_failed(self, name: str, exc: Exception) -> None:
        first, cap = self._start_backoff_limits
        self._start_failures += 1
        # Jitter downwards only, so the cap stays a cap; it keeps many scale sets (or hosts)
        # that fail together from retrying in step.
        delay = min(cap, first * 2 ** (self._start_failures - 1)) * random.uniform(0.8, 1.0)
        self._start_retry_at = asyncio.get_running_loop().time() + delay
        self._start_retry_wall = datetime.now(UTC) + timedelta(seconds=delay)
        self._last_start_error = str(exc)
        self._log.bind(**_environment_of(self._runner_config)).error(
            "Failed to start runner",
            name=name,
            error=str(exc),
            failures=self._start_failures,
            retry_in=round(delay, 1),
        )
        self._schedule_start_retry()

    def _start_succeeded(self) -> None:
        if not self._start_failures:
            return
        self._log.info("Runners start again", failed_before=self._start_failures)
        self._start_failures = 0
        self._start_retry_at = 0.0
        # The probe worked: fill the rest of the remembered demand now.
        self._schedule_start_retry()

    def _schedule_start_retry(self) -> None:
        """Act on the remembered demand once the backoff ends, not at the next message (which
        may be a 50 s long poll away)."""
        if self._start_retry is not None and not self._start_retry.done():
            return
        self._start_retry = asyncio.create_task(self._retry_start(), name="start-retry")

    async def _retry_start(self) -> None:
        await asyncio.sleep(max(0.0, self._start_retry_at - asyncio.get_running_loop().time()))
        self._start_retry = None  # a failure of this round schedules the next
        if self.draining or not self.scale_set_id:
            return
        try:
            await self.handle_desired_runner_count(self._desired)
        except Exception as exc:  # the next demand signal tries again
            self._log.error("Retrying runner starts failed", error=str(exc))

    async def _bounded_start(self, request: RunnerRequest) -> None:
        try:
            async with asyncio.timeout(self._start_timeout):
                await self._provisioner.start(request)
        except TimeoutError as exc:
            # The provisioner undoes a cancelled start itself (the contract).
            raise TimeoutError(
                f"start did not finish within {self._start_timeout:g} s and was cancelled"
            ) from exc

    async def _stop(self, name: str) -> None:
        delays = backoff(self._retry[0], 4 * self._retry[0])
        for attempt in range(1, STOP_ATTEMPTS + 1):
            try:
                async with asyncio.timeout(self._stop_timeout):
                    await self._provisioner.stop(name)
                return
            except TimeoutError:
                self._log.error("Timed out stopping runner", name=name, timeout=self._stop_timeout)
                return  # a stop that hangs would hang again
            except Exception as exc:
                last = attempt == STOP_ATTEMPTS
                self._log.log(
                    logging.ERROR if last else logging.WARNING,
                    "Failed to stop runner" + ("" if last else "; trying again"),
                    name=name,
                    error=str(exc),
                    attempt=attempt,
                )
                if not last:
                    await asyncio.sleep(next(delays))

    # -- deregistration ----------------------------------------------------------------------

    def _start_deregistration(
        self, name: str, runner_id: int, *, settle_until: float = 0.0
    ) -> None:
        if name in self._deregistrations:
            return
        self._record(name, runner_id, JournalPhase.DEREGISTERING)
        task = asyncio.create_task(
            self._deregister(name, runner_id, settle_until), name=f"deregister:{name}"
        )
        self._deregistrations[name] = task
        task.add_done_callback(lambda _: self._deregistrations.pop(name, None))

    def _deregister_unsettled(self, name: str) -> None:
        """Deregister a runner whose JIT request failed or was cut off, looking it up by name
        until ``jit_settle`` has passed: only then does "no such runner" mean there is none."""
        settle_until = asyncio.get_running_loop().time() + self._jit_settle
        self._start_deregistration(name, 0, settle_until=settle_until)

    async def _deregister(self, name: str, runner_id: int, settle_until: float) -> None:
        """Remove the registration, retrying with backoff until GitHub confirms (204 or 404);
        a forced shutdown cuts the wait between attempts short. Until ``settle_until`` (loop
        time), a lookup by name that finds nothing is tried again (see JIT_SETTLE)."""
        delays = backoff(*self._retry)
        quiet = False
        while True:
            outcome = await self._remove_once(
                name, runner_id, quiet=quiet, settle_until=settle_until
            )
            if outcome is _Removal.DONE:
                self._forget(name)
                return
            if outcome is _Removal.BUSY and self._forced.is_set():
                # Stopped in the middle of its job: GitHub refuses until it has noticed the
                # runner is gone (minutes). The journal keeps it; the next start removes it.
                self._log.info("GitHub still sees a job on a stopped runner", name=name)
                return
            if outcome is _Removal.REFUSED and self._forced.is_set():
                return  # the credentials are refused: retrying cannot help; the journal keeps it
            quiet = True  # one warning per runner; the retries are at debug
            delay = next(delays)
            if self._forced.is_set():  # shutting down: a last few prompt attempts
                await asyncio.sleep(min(delay, 1.0))
            else:  # a shutdown cuts the wait short
                await first_of(asyncio.sleep(delay), self._forced)

    async def _remove_once(
        self, name: str, runner_id: int, *, quiet: bool, settle_until: float = 0.0
    ) -> _Removal:
        async with self._removal_slots:  # the timeout below is the request's, not the wait's
            return await self._remove_now(name, runner_id, quiet, settle_until)

    async def _remove_now(
        self, name: str, runner_id: int, quiet: bool, settle_until: float
    ) -> _Removal:
        try:
            async with asyncio.timeout(self._deregister_timeout):
                if runner_id == 0:
                    found = await self._client.get_runner_by_name(name)
                    if found is None:
                        if asyncio.get_running_loop().time() < settle_until:
                            return _Removal.FAILED  # its JIT request may still be handled
                        return _Removal.DONE
                    runner_id = found.id
                await self._client.remove_runner(runner_id)
        except RunnerNotFoundError:
            # Ephemeral JIT runners are removed by GitHub once their job ends: nothing to do.
            self._log.debug("Runner already deregistered", name=name, runner_id=runner_id)
            return _Removal.DONE
        except JobStillRunningError:
            return _Removal.BUSY
        except TimeoutError:
            self._log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "Timed out deregistering runner",
                name=name,
                runner_id=runner_id,
            )
            return _Removal.FAILED
        except Exception as exc:
            self._log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "Failed to deregister runner",
                name=name,
                runner_id=runner_id,
                error=str(exc),
            )
            return _Removal.REFUSED if classify(exc) is Failure.PERMANENT else _Removal.FAILED
        self._log.debug("Runner deregistered", name=name, runner_id=runner_id)
        return _Removal.DONE

    # -- observation -------------------------------------------------------------------------

    def _set_phase(self, state: RunnerState, phase: RunnerPhase) -> None:
        state.phase = phase
        self._notify(state)

    def _notify(self, state: RunnerState) -> None:
        self._record(state.name, state.runner_id, JournalPhase(state.phase.value))
        if self._on_phase_change is not None:
            self._on_phase_change(state.name, state.snapshot())

    def _record(self, name: str, runner_id: int, phase: JournalPhase) -> None:
        if self._journal is None:
            return
        entry = JournalEntry(
            scale_set=self._prefix,
            name=name,
            runner_id=runner_id,
            backend=self._backend,
            phase=phase,
            updated_at=time.time(),  # set here, or record() makes the entry (and checks it) again
        )
        try:
            self._journal.record(entry)
        except Exception as exc:  # a full disk must not take the runners down with it
            self._log.error("Cannot write the runner journal", name=name, error=str(exc))

    def _forget(self, name: str) -> None:
        if self._journal is None:
            return
        try:
            self._journal.forget(name)
        except Exception as exc:
            self._log.error("Cannot write the runner journal", name=name, error=str(exc))


def _end_reason(state: RunnerState, got: int) -> str:
    """What ended ``state``'s wait, from :meth:`Scaler._first_end`'s answer (the ``ends`` of
    :meth:`Scaler._wait_for_end` begin with the runner's done signal and the forced shutdown)."""
    if got == 0:  # done: its job completed, or the reaper gave up on a wedged one
        return "max_lifetime" if state.reaped else "job completed"
    return "shutdown" if got == 1 else "environment exited"


class _Start(Enum):
    """Outcomes of :meth:`Scaler._provision`."""

    OK = auto()
    FAILED = auto()
    """The start failed or was cancelled: the registration still has to go."""
    RELEASED = auto()
    """Released while draining: the registration is already gone."""


class _Removal(Enum):
    """Outcomes of one deregistration attempt."""

    DONE = auto()
    """Removed, or GitHub had already removed it."""
    BUSY = auto()
    """GitHub says it is running a job (409 JobStillRunning)."""
    REFUSED = auto()
    """Failed in a way waiting will not fix (the credentials are refused)."""
    FAILED = auto()


def _environment_of(runner: RunnerConfig) -> dict[str, object]:
    """What a runner's environment is made from, for log lines: image or golden disk."""
    if runner.docker is not None:
        return {"image": runner.docker.image}
    if runner.libvirt is not None:
        return {"golden": runner.libvirt.path}
    if runner.tart is not None:
        return {"image": runner.tart.image}
    return {}


def _check_lifetimes(max_lifetime: float | None, idle_timeout: float | None) -> None:
    for what, limit in (("max_lifetime", max_lifetime), ("idle_timeout", idle_timeout)):
        if limit is not None and limit <= 0:
            raise ValueError(f"{what} must be more than 0 seconds, got {limit}")


def _backend_of(runner: RunnerConfig) -> str:
    try:
        return runner.provider_type
    except ValueError:  # a hand-built RunnerConfig without a backend (tests, custom scalers)
        return ""
