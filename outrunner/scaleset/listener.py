"""The listener loop: long-poll the session and drive a scaler (``docs/protocol.md`` §7).

Per message, in this order: record statistics, acknowledge (DELETE) first, acquire the available
jobs, hand over started jobs, then completed jobs, then ask for the desired runner count with
``totalAssignedJobs``. An empty poll (202) asks for the desired count with the latest statistics.

When acquiring fails, the rest of the message is still handed over before the error is raised,
and the offers are kept (``unacquired``, which a supervisor hands from one listener to the next)
and acquired again when the next listener starts: the message is already acknowledged, so GitHub
will not tell of its jobs again, and dropping any of it would lose them.

The listener neither creates nor deletes the session. Errors propagate with a note saying where
they happened; the exception type is kept so callers can react (e.g. reconnect on
``MessageQueueTokenExpiredError``). ``last_message_id`` survives a failed :meth:`Listener.run`, so a
supervisor can call ``run`` again, or hand the id to a new listener on the same session. It is the
id of the last message *acknowledged*, not the last one read (the Go listener's ``lastMessageId``
is the latter, but Go never resumes a session): a message whose DELETE failed is still in the queue,
and a listener resuming past it would never read it again, losing its offers for good.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from outrunner.scaleset.errors import ProtocolError
from outrunner.scaleset.types import (
    NIL_SESSION_ID,
    JobCompleted,
    JobStarted,
    RunnerScaleSetMessage,
    RunnerScaleSetSession,
    RunnerScaleSetStatistic,
)

_MAX_RUNNERS = 2**31 - 1
_T = TypeVar("_T")


class Scaler(Protocol):
    """What the listener drives: desired runner count (returns the count it settled on), jobs."""

    async def handle_desired_runner_count(self, count: int) -> int: ...

    async def handle_job_started(self, job: JobStarted) -> None: ...

    async def handle_job_completed(self, job: JobCompleted) -> None: ...


class MetricsRecorder(Protocol):
    """Hooks called as messages are handled; must be quick and must not raise."""

    def record_statistics(self, statistics: RunnerScaleSetStatistic) -> None: ...

    def record_job_started(self, job: JobStarted) -> None: ...

    def record_job_completed(self, job: JobCompleted) -> None: ...

    def record_desired_runners(self, count: int) -> None: ...


class NoopMetrics:
    """The default recorder: records nothing."""

    def record_statistics(self, statistics: RunnerScaleSetStatistic) -> None:
        pass

    def record_job_started(self, job: JobStarted) -> None:
        pass

    def record_job_completed(self, job: JobCompleted) -> None:
        pass

    def record_desired_runners(self, count: int) -> None:
        pass


class MessageSource(Protocol):
    """The part of a ``MessageSession`` the listener uses."""

    @property
    def session(self) -> RunnerScaleSetSession: ...

    async def get_message(
        self, last_message_id: int, max_capacity: int
    ) -> RunnerScaleSetMessage | None: ...

    async def delete_message(self, message_id: int) -> None: ...

    async def acquire_jobs(self, request_ids: Sequence[int]) -> list[int]: ...


def _check_max_runners(count: int) -> int:
    if not 0 <= count <= _MAX_RUNNERS:
        raise ValueError(f"max_runners must be between 0 and {_MAX_RUNNERS}, got {count}")
    return count


class Listener:
    """Polls one message session and hands what arrives to a :class:`Scaler`."""

    def __init__(
        self,
        source: MessageSource,
        *,
        max_runners: int,
        metrics: MetricsRecorder | None = None,
        logger: logging.Logger | None = None,
        last_message_id: int = 0,
        unacquired: set[int] | None = None,
    ) -> None:
        self._source = source
        self.unacquired: set[int] = set() if unacquired is None else unacquired
        """Runner request ids offered (``JobAvailable``) whose acquisition failed; shared with
        the caller when it passes its own set."""
        self._max_runners = _check_max_runners(max_runners)
        self._metrics: MetricsRecorder = metrics or NoopMetrics()
        self._log = logger or logging.getLogger("outrunner.scaleset.listener")
        self.last_message_id = last_message_id
        # Replaced by the session's statistics when run() starts.
        self._latest_statistics = RunnerScaleSetStatistic()

    @property
    def max_runners(self) -> int:
        return self._max_runners

    def set_max_runners(self, count: int) -> None:
        """Change the capacity sent with the next poll (``X-ScaleSetMaxCapacity``)."""
        self._max_runners = _check_max_runners(count)

    @property
    def latest_statistics(self) -> RunnerScaleSetStatistic:
        return self._latest_statistics

    async def run(self, scaler: Scaler) -> None:
        """Run until cancelled (raises ``CancelledError``) or until something fails (raises it)."""
        session = self._source.session
        if not session.session_id or session.session_id == NIL_SESSION_ID:
            raise ProtocolError("initial session is nil")
        if session.statistics is None:
            raise ProtocolError("session statistics is nil")
        self._record_statistics(session.statistics)
        self._log.info(
            "Handling initial session statistics",
            extra={"attrs": {"total_assigned_jobs": session.statistics.total_assigned_jobs}},
        )
        desired = await _noted(
            scaler.handle_desired_runner_count(session.statistics.total_assigned_jobs),
            "handling the initial statistics",
        )
        self._metrics.record_desired_runners(desired)
        if self.unacquired:
            await self._acquire([], "acquiring jobs offered before a failure")

        while True:
            self._log.debug(
                "Getting next message", extra={"attrs": {"last_message_id": self.last_message_id}}
            )
            message = await _noted(
                self._source.get_message(self.last_message_id, self._max_runners),
                "getting the next message",
            )
            if message is None:
                await _noted(
                    scaler.handle_desired_runner_count(self._latest_statistics.total_assigned_jobs),
                    "handling an empty poll",
                )
                continue
            await self._finish(self._handle(message, scaler), message.message_id)

    async def _finish(self, handling: Coroutine[Any, Any, None], message_id: int) -> None:
        """Run a message's handling to the end even if this task is cancelled meanwhile.

        The message is acknowledged before its jobs are handed over, so abandoning it halfway would
        lose jobs. A cancellation is re-raised once handling is over.
        """
        task = asyncio.ensure_future(handling)
        cancelled = False
        while True:
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled():  # the handling itself was cancelled
                    raise
                cancelled = True  # this task was; the handling goes on
                if not task.done():
                    self._log.info(
                        "Cancelled while handling a message, finishing it first",
                        extra={"attrs": {"message_id": message_id}},
                    )
                    continue
            except BaseException:  # the handling failed; inspected below
                pass
            break
        error = task.exception()
        if cancelled:
            if error is not None:
                # The caller asked to stop; report the failure but honour the cancellation.
                self._log.error(
                    "Handling a message failed after cancellation",
                    exc_info=error,
                    extra={"attrs": {"message_id": message_id}},
                )
            raise asyncio.CancelledError
        if error is not None:
            raise error

    async def _handle(self, message: RunnerScaleSetMessage, scaler: Scaler) -> None:
        where = f"handling message {message.message_id}"
        if message.statistics is None:
            # The Go listener would crash here; keep the last statistics and carry on.
            self._log.warning(
                "Message without statistics", extra={"attrs": {"message_id": message.message_id}}
            )
        else:
            self._record_statistics(message.statistics)
        await _noted(self._source.delete_message(message.message_id), f"{where}: delete")
        self.last_message_id = message.message_id
        failed: Exception | None = None
        if message.jobs_available:
            ids = [job.runner_request_id for job in message.jobs_available]
            try:
                await self._acquire(ids, f"{where}: acquire jobs")
            except Exception as exc:
                # Raised once the rest is handled: the message is acknowledged, so the jobs it
                # reports started and completed would never be told again.
                failed = exc
        for started in message.jobs_started:
            self._metrics.record_job_started(started)
            await _noted(scaler.handle_job_started(started), f"{where}: job started")
        for completed in message.jobs_completed:
            self._metrics.record_job_completed(completed)
            await _noted(scaler.handle_job_completed(completed), f"{where}: job completed")
        desired = await _noted(
            scaler.handle_desired_runner_count(self._latest_statistics.total_assigned_jobs),
            f"{where}: desired runner count",
        )
        self._metrics.record_desired_runners(desired)
        if failed is not None:
            raise failed

    async def _acquire(self, offered: Sequence[int], where: str) -> None:
        """Acquire ``offered`` and any earlier offers whose acquisition failed. They stay in
        :attr:`unacquired` until GitHub answers; ids missing from its answer were taken by
        another scale set or are no longer on offer, so they are not asked for again."""
        self.unacquired.update(offered)
        ids = sorted(self.unacquired)
        self._log.info("Acquiring jobs", extra={"attrs": {"count": len(ids)}})
        acquired = await _noted(self._source.acquire_jobs(ids), where)
        self.unacquired.difference_update(ids)
        self._log.info("Jobs acquired", extra={"attrs": {"count": len(acquired), "ids": acquired}})

    def _record_statistics(self, statistics: RunnerScaleSetStatistic) -> None:
        self._latest_statistics = statistics
        self._metrics.record_statistics(statistics)


async def _noted(awaitable: Awaitable[_T], where: str) -> _T:
    """Await, noting ``where`` on any exception so the traceback says which step failed."""
    try:
        return await awaitable
    except Exception as exc:
        exc.add_note(f"listener: failed while {where}")
        raise
