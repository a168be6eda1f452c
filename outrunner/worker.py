"""ScaleSetWorker: one runner entry of the config, as a scale set with a listener and a Scaler.

The worker owns one :class:`~outrunner.scaler.Scaler` (and so every runner) for its whole life.
Start-up, once: the runner journal's entries of this scale set are resolved (live environments
are adopted, dead ones stopped and their registrations removed), then orphan cleanup removes
environments no journal knows, then the scale set is looked up or created. After that the worker
keeps a message session open and a listener polling it. When the session or the listener fails
(GitHub down, the session expired, a 409 conflict), only the session is replaced, after a
backoff; every runner keeps running, and the new session's messages reach the same Scaler.

:meth:`ScaleSetWorker.drain` stops taking work: the listener advertises a capacity of 0, runners
without a job are released, and :meth:`run` returns once the last busy runner has finished.
Cancelling :meth:`run` deletes the session and stops every runner (bounded). Scale sets are never
deleted: the next start reuses them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from typing import Protocol

from outrunner._aio import cancel_and_wait
from outrunner.config import DEFAULT_DRAIN_TIMEOUT, RunnerConfig
from outrunner.failures import Failure, classify
from outrunner.journal import JournalEntry, JournalPhase
from outrunner.log import BoundLogger, get_logger
from outrunner.metrics import ScaleSetMetrics
from outrunner.provisioner import Adopter, OrphanCleaner, Provisioner
from outrunner.runner import RunnerPhase, RunnerSnapshot
from outrunner.scaler import RunnerJournal, Scaler, StartBackoff
from outrunner.scaleset.errors import SessionExpiredError, StatusError
from outrunner.scaleset.listener import Listener
from outrunner.scaleset.session import MessageSession
from outrunner.scaleset.types import (
    DEFAULT_RUNNER_GROUP,
    DEFAULT_RUNNER_GROUP_ID,
    JitRunnerConfig,
    JitRunnerSetting,
    Label,
    RunnerGroup,
    RunnerReference,
    RunnerScaleSet,
    RunnerSetting,
)

__all__ = [
    "Backoff",
    "JournalReader",
    "ScaleSetStatus",
    "ScaleSetWorker",
    "WorkerClient",
    "labels_match",
]

SESSION_DELETE_TIMEOUT = 10.0
"""Seconds the DELETE of a message session may take on the way out (GitHub may be down)."""
STOP_TIMEOUT = 60.0
"""Seconds stopping a dead journaled environment may take at start-up."""


class JournalReader(RunnerJournal, Protocol):
    """The journal as a worker uses it: the Scaler's writes, this scale set's entries read back
    at start-up, and the id of its open message session."""

    def entries(self, scale_set: str | None = None) -> list[JournalEntry]: ...

    def sessions(self) -> dict[str, str]: ...

    def record_session(self, scale_set: str, session_id: str) -> None: ...


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

    async def get_runner_by_name(self, name: str) -> RunnerReference | None: ...

    async def create_message_session(self, scale_set_id: int, owner: str) -> MessageSession: ...

    async def delete_message_session(self, scale_set_id: int, session_id: str) -> None: ...


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


@dataclass(frozen=True)
class ScaleSetStatus:
    """One scale set at a glance (``Service.status()``; the health endpoints build on it)."""

    name: str
    scale_set_id: int
    """0 until the scale set has been looked up or created at GitHub."""
    session_open: bool
    draining: bool
    runners: tuple[RunnerSnapshot, ...]
    busy: int
    start_backoff: StartBackoff | None
    """Set while runners fail to start: failures in a row, last reason, next try."""
    pending_deregistrations: tuple[str, ...]


class ScaleSetWorker:
    """Runs one scale set until drained or cancelled; owns its Scaler and message sessions."""

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
        journal: JournalReader | None = None,
        scaler: Scaler | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        metrics: ScaleSetMetrics | None = None,
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
        self._journal = journal
        self._drain_timeout = drain_timeout
        self._traced: set[type[BaseException]] = set()
        self.metrics = metrics or ScaleSetMetrics(runner.name)
        """Records this scale set's listener messages, runner phases and sessions (metrics,
        ``/readyz``, ``/status``)."""
        self.scaler = scaler or Scaler(
            client,
            max_runners=max_runners,
            name_prefix=runner.name,
            runner=runner,
            provisioner=provisioner,
            logger=self._log.group("scaler"),
            journal=journal,
            on_phase_change=self.metrics.on_phase_change,
            on_reap=self.metrics.on_reap,
            min_runners=runner.min_runners,
            max_lifetime=runner.max_lifetime,
            idle_timeout=runner.idle_timeout,
        )
        """The Scaler of this scale set, for the worker's whole life."""
        self.metrics.follow(self.scaler)
        self._listener: Listener | None = None
        self._drain = asyncio.Event()
        self.scale_set: RunnerScaleSet | None = None
        self.ready = asyncio.Event()
        """Set once the scale set exists and the first session is listening."""
        self.session_open = False
        """True while a message session is open and its listener polls."""
        self._relabel: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.runner.name

    @property
    def draining(self) -> bool:
        return self._drain.is_set()

    def runners(self) -> list[RunnerSnapshot]:
        return self.scaler.runners()

    def status(self) -> ScaleSetStatus:
        return ScaleSetStatus(
            name=self.name,
            scale_set_id=self.scaler.scale_set_id,
            session_open=self.session_open,
            draining=self.draining,
            runners=tuple(self.scaler.runners()),
            busy=self.scaler.busy_runners(),
            start_backoff=self.scaler.start_backoff(),
            pending_deregistrations=tuple(self.scaler.pending_deregistrations()),
        )

    def drain(self) -> None:
        """Stop taking work; :meth:`run` returns once every busy runner has finished its job."""
        self._drain.set()
        self.scaler.drain()
        if self._listener is not None:
            # Capacity 0 tells GitHub to assign this scale set no further jobs.
            self._listener.set_max_runners(0)

    def reconfigure(self, runner: RunnerConfig, max_runners: int) -> None:
        """Apply a reloaded entry of this scale set (same name, URL, credentials and backend
        kind): ``max_runners``, ``min_runners`` and the lifetimes at once, labels at GitHub in
        the background, backend options to the runners started from now on. Runners already
        running keep what they were started with."""
        if runner.name != self.name:
            raise ValueError(f"entry {runner.name} cannot reconfigure scale set {self.name}")
        relabel = tuple(runner.labels) != tuple(self.runner.labels)
        self.runner, self.max_runners = runner, max_runners
        self.scaler.runner_config = runner
        self.scaler.max_runners = max_runners
        self.scaler.min_runners = runner.min_runners
        self.scaler.set_lifetimes(runner.max_lifetime, runner.idle_timeout)
        if self._listener is not None and not self.draining:
            self._listener.set_max_runners(max_runners)
        if relabel and self.scale_set is not None:
            if self._relabel is not None:
                self._relabel.cancel()
            self._relabel = asyncio.create_task(self._update_labels(), name=f"labels:{self.name}")
        self.scaler.rebalance()

    async def _update_labels(self) -> None:
        """Bring the scale set's labels at GitHub in line with the entry (retried while GitHub
        is unreachable); a refusal is logged and the scale set keeps serving."""
        try:
            scale_set = await self._set_up()
        except Exception as exc:
            self._log.error("Cannot update the scale set's labels", error=str(exc))
            return
        self.scale_set = scale_set
        self._log.info("Scale set labels updated", labels=",".join(self.runner.labels))

    async def run(self) -> None:
        """Recover, set up the scale set, then listen until drained (returns) or cancelled.

        Transient failures (GitHub unreachable, a lost session) are retried with backoff
        forever while every runner keeps running. A permanent one (see
        :mod:`outrunner.failures`: bad credentials, an unknown runner group, a certificate that
        does not verify) stops this scale set: it is logged with its cause, the scale set stops
        taking work, its busy runners finish (up to ``drain_timeout``), and then it is raised.
        Whatever ends it, every runner still tracked is stopped and deregistered (bounded by
        ``shutdown_timeout``) and the session deleted.
        """
        serving: asyncio.Task[None] | None = None
        try:
            await self._recover()
            serving = asyncio.create_task(self._set_up_and_serve(), name=f"serve:{self.name}")
            drained = asyncio.create_task(self._drained(), name=f"drained:{self.name}")
            try:
                await asyncio.wait({serving, drained}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancel_and_wait(drained)
            if serving.done():
                # It only ends by failing in a way waiting cannot fix.
                await self._stop_for_good(serving.exception() or RuntimeError("stopped"))
            self._log.info("Drained: every runner has finished")
        finally:
            # The session goes first, so GitHub assigns nothing more here while runners stop.
            await cancel_and_wait(serving)
            await cancel_and_wait(self._relabel)
            await self.scaler.shutdown(self._shutdown_timeout)

    async def _stop_for_good(self, error: BaseException) -> None:
        """A permanent failure: stop taking work, let busy runners finish, then raise it."""
        self._log.error(
            "Scale set stopped: an error that waiting will not fix",
            error=str(error),
            busy=self.scaler.busy_runners(),
            # A known error's message says it all (and goes to an operator's log); only a
            # surprise needs its traceback.
            exc_info=error if classify(error) is Failure.UNKNOWN else None,
        )
        self.drain()
        try:
            async with asyncio.timeout(self._drain_timeout):
                await self.scaler.wait_empty()
        except TimeoutError:
            self._log.warning("Drain timed out; stopping the runners that are left")
        raise error

    async def _set_up_and_serve(self) -> None:
        scale_set = await self._set_up()
        self.scale_set = scale_set
        self.scaler.scale_set_id = scale_set.id
        await self._delete_stale_session(scale_set.id)
        await self._serve_sessions(scale_set.id)

    async def _delete_stale_session(self, scale_set_id: int) -> None:
        """Delete the session a crashed process left open, so this one can listen now instead
        of meeting 409 conflicts until GitHub expires it."""
        stale = self._journal.sessions().get(self.name) if self._journal is not None else None
        if not stale:
            return
        deleting = self._client.delete_message_session(scale_set_id, stale)
        # If it cannot be deleted it expires by itself; meanwhile the 409s are retried.
        if await self._delete_session(
            deleting, "Cannot delete the message session of an earlier run", session_id=stale
        ):
            self._log.info("Deleted the message session of an earlier run", session_id=stale)

    async def _drained(self) -> None:
        await self._drain.wait()
        await self.scaler.wait_empty()

    # -- start-up ----------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Resolve this scale set's journaled runners, then remove orphans (environments of
        this scale set's names that no journal knows)."""
        keep: list[str] = []
        entries = self._journal.entries(self.name) if self._journal is not None else []
        for entry in entries:
            if await self._resume(entry):
                keep.append(entry.name)
        await self._clean_orphans(keep)

    async def _resume(self, entry: JournalEntry) -> bool:
        """Adopt a journaled runner whose environment lives, or clean it up; True when its
        environment must be kept (adopted, or the backend could not tell)."""
        log = self._log.bind(name=entry.name, runner_id=entry.runner_id, phase=str(entry.phase))
        # A provisioning entry is asked too: the process may have died between the environment
        # starting (its runner taking a job at once) and the journal hearing of it; the backend
        # says whether the runner really runs.
        adoptable = entry.runner_id and entry.phase in (
            JournalPhase.PROVISIONING,
            JournalPhase.IDLE,
            JournalPhase.RUNNING,
        )
        if adoptable and isinstance(self._provisioner, Adopter):
            try:
                adopted = await self._provisioner.adopt(entry.name, self.runner)
            except Exception as exc:
                # Not knowing is no reason to destroy what may be running a job: leave it and
                # its journal entry for the next start.
                log.error("Cannot tell whether a journaled runner is alive", error=str(exc))
                return True
            if adopted:
                running = entry.phase is JournalPhase.RUNNING
                phase = RunnerPhase.RUNNING if running else RunnerPhase.IDLE
                self.scaler.adopt(entry.name, entry.runner_id, phase)
                return True
        if entry.phase not in (JournalPhase.REGISTERING, JournalPhase.DEREGISTERING):
            log.info("Journaled runner is gone; cleaning up")
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self._provisioner.stop(entry.name)
            except Exception as exc:
                log.error("Failed to stop a journaled runner", error=str(exc))
        self.scaler.deregister_later(entry.name, entry.runner_id)
        return False

    async def _clean_orphans(self, keep: Collection[str]) -> None:
        if not isinstance(self._provisioner, OrphanCleaner):
            return
        prefix = f"{self.name}-"
        if keep and isinstance(self._provisioner, Adopter):
            removed = await self._provisioner.cleanup(prefix, keep=keep)
        else:
            removed = await self._provisioner.cleanup(prefix)
        if removed:
            self._log.warning(
                "Removed orphaned runners", count=len(removed), names=",".join(removed)
            )

    async def _set_up(self) -> RunnerScaleSet:
        failures = 0
        while True:
            try:
                return await self._ensure_scale_set()
            except Exception as exc:
                self.metrics.session_failed(exc)
                if classify(exc) is Failure.PERMANENT:
                    raise
                failures += 1
                delay = self._backoff.delay(failures)
                self._log_retry("GitHub unreachable during setup", exc, retry_in=delay)
                await self._sleep(delay)

    def _log_retry(self, message: str, exc: Exception, **attrs: object) -> None:
        """Log a failure that is retried; the first of each unknown kind with its traceback,
        so a surprise can be reported rather than looping in silence."""
        unknown = classify(exc) is Failure.UNKNOWN and type(exc) not in self._traced
        if unknown:
            self._traced.add(type(exc))
        self._log.error(message, error=str(exc), exc_info=exc if unknown else None, **attrs)

    async def _ensure_scale_set(self) -> RunnerScaleSet:
        if self.runner.runner_group == DEFAULT_RUNNER_GROUP:
            # Id 1 under whatever name the organization gave it, like both Go references.
            group = RunnerGroup(id=DEFAULT_RUNNER_GROUP_ID, name=DEFAULT_RUNNER_GROUP)
        else:
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

    # -- sessions ----------------------------------------------------------------------------

    async def _serve_sessions(self, scale_set_id: int) -> None:
        """Keep a session listening while every runner keeps running.

        When the listener fails, the same session is resumed after a backoff (refreshed, its
        queue position kept) as long as GitHub still has it; only a session GitHub has dropped
        is replaced by a new one. Abandoning a live session would leave GitHub refusing the new
        one (409) until the old one expired. The session is deleted when this is cancelled.
        """
        failures = 0
        loop = asyncio.get_running_loop()
        session: MessageSession | None = None
        last_message_id = 0
        unacquired: set[int] = set()  # offers acknowledged but not acquired: outlive a listener
        try:
            while True:
                began = loop.time()
                listener: Listener | None = None
                try:
                    session, resumed = await self._open_session(scale_set_id, session)
                    capacity = 0 if self.draining else self.max_runners
                    # A new session starts from the queue's first undeleted message, as the Go
                    # listener does; handling a message twice is harmless (every handler is
                    # idempotent), skipping one is not.
                    listener = Listener(
                        self.metrics.polled(session),
                        max_runners=capacity,
                        metrics=self.metrics,
                        last_message_id=last_message_id if resumed else 0,
                        unacquired=unacquired,
                    )
                    self._listener = listener
                    self.session_open = True
                    self.metrics.session_listening(resumed=resumed)
                    self._log.info("Listening for jobs", max_runners=capacity)
                    self.ready.set()
                    await listener.run(self.metrics.observed(self.scaler))
                except Exception as exc:
                    self._listener = None
                    self.session_open = False
                    self.metrics.session_failed(exc)
                    if classify(exc) is Failure.PERMANENT:
                        raise
                    if listener is not None:
                        last_message_id = listener.last_message_id
                    if loop.time() - began >= self._healthy_after:
                        failures = 0  # a session that served for a while starts a fresh count
                    failures += 1
                    delay = self._backoff.delay(failures)
                    self._log_retry(
                        "Listener failed, reconnecting; runners keep running",
                        exc,
                        retry_in=delay,
                        runners=len(self.scaler.runners()),
                        busy=self.scaler.busy_runners(),
                    )
                    await self._sleep(delay)
                finally:
                    self._listener = None
                    self.session_open = False
        finally:
            if session is not None:
                await self._close_session(session)

    async def _open_session(
        self, scale_set_id: int, previous: MessageSession | None
    ) -> tuple[MessageSession, bool]:
        """Resume ``previous`` if GitHub still has it, else open a new session; True when
        resumed. Errors that say nothing about the session (GitHub down) are raised."""
        if previous is not None:
            try:
                await previous.refresh()
            except SessionExpiredError:
                self._log.info("The message session is gone; opening a new one")
            except StatusError as exc:
                if exc.status != 404:
                    raise
                self._log.info("The message session is gone; opening a new one")
            else:
                self._log.info("Resumed the message session")
                return previous, True
        creating = asyncio.ensure_future(
            self._client.create_message_session(scale_set_id, self._owner)
        )
        try:
            session = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # Stopped while the request was out: GitHub may have made the session anyway, and
            # it would block the next start (409) until it expires. Finish and delete it.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(SESSION_DELETE_TIMEOUT):
                    session = await creating
                await self._close_session(session)
            raise
        self._remember_session(session.session.session_id)
        return session, False

    async def _close_session(self, session: MessageSession) -> None:
        await self._delete_session(
            session.delete(), "Failed to delete the message session; the next start deletes it"
        )

    async def _delete_session(
        self, deleting: Awaitable[None], failure: str, **attrs: object
    ) -> bool:
        """Await a session DELETE, bounded; True (and the journal told) once GitHub no longer
        has the session, False (``failure`` logged) when it may still have it."""
        try:
            async with asyncio.timeout(SESSION_DELETE_TIMEOUT):
                await deleting
        except SessionExpiredError:
            pass  # GitHub dropped it already (it expired, or it is why the listener failed)
        except TimeoutError:
            self._log.bind(**attrs).warning(
                failure, error=f"no answer within {SESSION_DELETE_TIMEOUT:g} s"
            )
            return False
        except Exception as exc:
            self._log.bind(**attrs).warning(failure, error=str(exc))
            return False
        self._remember_session("")
        return True

    def _remember_session(self, session_id: str) -> None:
        if self._journal is None:
            return
        try:
            self._journal.record_session(self.name, session_id)
        except Exception as exc:  # the journal's trouble is no reason to stop listening
            self._log.error("Cannot write the runner journal", error=str(exc))
