"""The listener loop of docs/protocol.md §7, driven by a fake message source and a recording
scaler."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from outrunner.scaleset import (
    NIL_SESSION_ID,
    JobAvailable,
    JobCompleted,
    JobStarted,
    Listener,
    MessageQueueTokenExpiredError,
    ProtocolError,
    RunnerScaleSetMessage,
    RunnerScaleSetSession,
    RunnerScaleSetStatistic,
)

pytestmark = pytest.mark.anyio

Call = tuple[object, ...]


def stats(assigned: int) -> RunnerScaleSetStatistic:
    return RunnerScaleSetStatistic(total_assigned_jobs=assigned)


def session(
    statistics: RunnerScaleSetStatistic | None = None, session_id: str = "sid"
) -> RunnerScaleSetSession:
    return RunnerScaleSetSession(session_id=session_id, statistics=statistics)


class FakeSource:
    """Serves scripted poll results, then blocks like an idle long poll."""

    def __init__(
        self,
        calls: list[Call],
        polls: Sequence[RunnerScaleSetMessage | Exception | None],
        initial: RunnerScaleSetSession | None = None,
    ) -> None:
        self.calls = calls
        self.polls = list(polls)
        self._session = initial or session(stats(1))
        self.polling = asyncio.Event()

    @property
    def session(self) -> RunnerScaleSetSession:
        return self._session

    async def get_message(
        self, last_message_id: int, max_capacity: int
    ) -> RunnerScaleSetMessage | None:
        self.calls.append(("get", last_message_id, max_capacity))
        if not self.polls:
            self.polling.set()
            await asyncio.Event().wait()
        item = self.polls.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    async def delete_message(self, message_id: int) -> None:
        self.calls.append(("delete", message_id))

    async def acquire_jobs(self, request_ids: Sequence[int]) -> list[int]:
        self.calls.append(("acquire", list(request_ids)))
        return list(request_ids[:1])


class FakeScaler:
    def __init__(self, calls: list[Call]) -> None:
        self.calls = calls
        self.gate: asyncio.Event | None = None  # when set, job-started waits for it
        self.entered = asyncio.Event()
        self.fail_on: str | None = None

    async def handle_desired_runner_count(self, count: int) -> int:
        self.calls.append(("desired", count))
        return count + 100

    async def handle_job_started(self, job: JobStarted) -> None:
        self.calls.append(("started", job.runner_name))
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()

    async def handle_job_completed(self, job: JobCompleted) -> None:
        self.calls.append(("completed", job.runner_name))
        if self.fail_on == job.runner_name:
            raise RuntimeError("provisioner exploded")


class RecordingMetrics:
    def __init__(self, calls: list[Call]) -> None:
        self.calls = calls

    def record_statistics(self, statistics: RunnerScaleSetStatistic) -> None:
        self.calls.append(("m.statistics", statistics.total_assigned_jobs))

    def record_job_started(self, job: JobStarted) -> None:
        self.calls.append(("m.started", job.runner_name))

    def record_job_completed(self, job: JobCompleted) -> None:
        self.calls.append(("m.completed", job.runner_name))

    def record_desired_runners(self, count: int) -> None:
        self.calls.append(("m.desired", count))


def message(
    message_id: int,
    assigned: int | None,
    *,
    available: int = 0,
    started: Sequence[str] = (),
    completed: Sequence[str] = (),
) -> RunnerScaleSetMessage:
    return RunnerScaleSetMessage(
        message_id=message_id,
        message_type="RunnerScaleSetJobMessages",
        statistics=None if assigned is None else stats(assigned),
        jobs_available=tuple(JobAvailable(runner_request_id=i + 1) for i in range(available)),
        jobs_started=tuple(JobStarted(runner_name=name) for name in started),
        jobs_completed=tuple(JobCompleted(runner_name=name) for name in completed),
    )


async def run_until_idle(listener: Listener, source: FakeSource, scaler: FakeScaler) -> None:
    """Run until the source has nothing left and is long-polling, then cancel."""
    task = asyncio.create_task(listener.run(scaler))
    await asyncio.wait_for(source.polling.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_order_of_a_message() -> None:
    calls: list[Call] = []
    source = FakeSource(calls, [message(12, 4, available=2, started=["a", "b"], completed=["c"])])
    scaler = FakeScaler(calls)
    listener = Listener(source, max_runners=3, metrics=RecordingMetrics(calls))
    await run_until_idle(listener, source, scaler)
    assert calls == [
        ("m.statistics", 1),
        ("desired", 1),
        ("m.desired", 101),
        ("get", 0, 3),
        ("m.statistics", 4),
        ("delete", 12),
        ("acquire", [1, 2]),
        ("m.started", "a"),
        ("started", "a"),
        ("m.started", "b"),
        ("started", "b"),
        ("m.completed", "c"),
        ("completed", "c"),
        ("desired", 4),
        ("m.desired", 104),
        ("get", 12, 3),
    ]
    assert listener.last_message_id == 12


async def test_empty_poll_uses_latest_statistics() -> None:
    calls: list[Call] = []
    source = FakeSource(calls, [None, message(7, 5), None, message(8, None), None])
    listener = Listener(source, max_runners=2, metrics=RecordingMetrics(calls))
    await run_until_idle(listener, source, FakeScaler(calls))
    desired = [c for c in calls if c[0] in ("desired", "m.desired")]
    assert desired == [
        ("desired", 1),
        ("m.desired", 101),
        ("desired", 1),  # 202: session statistics, not recorded as a metric
        ("desired", 5),
        ("m.desired", 105),
        ("desired", 5),  # 202 after message 7
        ("desired", 5),  # message 8 carried no statistics: keep the last ones
        ("m.desired", 105),
        ("desired", 5),
    ]
    assert ("get", 8, 2) in calls


async def test_no_acquire_without_available_jobs() -> None:
    calls: list[Call] = []
    source = FakeSource(calls, [message(1, 0, started=["a"])])
    await run_until_idle(Listener(source, max_runners=1), source, FakeScaler(calls))
    assert not [c for c in calls if c[0] == "acquire"]


class FailingAcquire(FakeSource):
    """Fails its first ``failures`` acquisitions, as GitHub does during an outage."""

    def __init__(self, calls: list[Call], polls: Sequence[RunnerScaleSetMessage], failures: int):
        super().__init__(calls, polls)
        self.failures = failures

    async def acquire_jobs(self, request_ids: Sequence[int]) -> list[int]:
        self.calls.append(("acquire", list(request_ids)))
        if self.failures:
            self.failures -= 1
            raise ConnectionError("GitHub is down")
        return [i for i in request_ids if i != 2]  # job 2 went to another scale set


async def test_a_failed_acquisition_still_hands_over_the_rest_of_its_message() -> None:
    # Acknowledged already: the jobs it reports started and completed would never come again.
    calls: list[Call] = []
    source = FailingAcquire(calls, [message(5, 3, available=1, started=["a"], completed=["b"])], 1)
    with pytest.raises(ConnectionError) as raised:
        await Listener(source, max_runners=2).run(FakeScaler(calls))
    assert calls[-5:] == [
        ("delete", 5),
        ("acquire", [1]),
        ("started", "a"),
        ("completed", "b"),
        ("desired", 3),
    ]
    assert raised.value.__notes__ == ["listener: failed while handling message 5: acquire jobs"]


async def test_offers_whose_acquisition_failed_are_acquired_by_the_next_listener() -> None:
    # The offer's message is acknowledged before the acquisition: GitHub will not offer the jobs
    # again, so a listener that dropped them on failure would lose them.
    calls: list[Call] = []
    unacquired: set[int] = set()
    first = FailingAcquire(calls, [message(5, 0, available=2)], failures=1)
    with pytest.raises(ConnectionError):
        await Listener(first, max_runners=2, unacquired=unacquired).run(FakeScaler(calls))
    assert unacquired == {1, 2}

    calls.clear()
    second = FailingAcquire(calls, [message(6, 0, available=1)], failures=0)
    listener = Listener(second, max_runners=2, last_message_id=5, unacquired=unacquired)
    await run_until_idle(listener, second, FakeScaler(calls))
    # At start, before the next poll; then only the new offer (job 2 was answered for: taken).
    assert [c for c in calls if c[0] in ("acquire", "get")] == [
        ("acquire", [1, 2]),
        ("get", 5, 2),
        ("acquire", [1]),
        ("get", 6, 2),
    ]
    assert unacquired == set()


class FailingDelete(FakeSource):
    """Fails to acknowledge message ``bad``, as GitHub does when every retry of a DELETE fails."""

    def __init__(self, calls: list[Call], polls: Sequence[RunnerScaleSetMessage], bad: int):
        super().__init__(calls, polls)
        self.bad = bad

    async def delete_message(self, message_id: int) -> None:
        self.calls.append(("delete", message_id))
        if message_id == self.bad:
            raise ConnectionError("GitHub is down")


async def test_last_message_id_moves_only_past_acknowledged_messages() -> None:
    # Message 7 was read but not acknowledged: it is still in GitHub's queue, so a listener
    # resuming the session must poll from 6 and read it again, or its offer is lost for good.
    calls: list[Call] = []
    source = FailingDelete(calls, [message(6, 0), message(7, 1, available=1)], bad=7)
    listener = Listener(source, max_runners=2)
    with pytest.raises(ConnectionError) as raised:
        await listener.run(FakeScaler(calls))
    assert raised.value.__notes__ == ["listener: failed while handling message 7: delete"]
    assert listener.last_message_id == 6
    assert ("acquire", [1]) not in calls  # nothing of an unacknowledged message is handled

    calls.clear()
    again = FakeSource(calls, [message(7, 1, available=1)])
    resumed = Listener(again, max_runners=2, last_message_id=listener.last_message_id)
    await run_until_idle(resumed, again, FakeScaler(calls))
    assert [c for c in calls if c[0] in ("get", "delete", "acquire")] == [
        ("get", 6, 2),
        ("delete", 7),
        ("acquire", [1]),
        ("get", 7, 2),
    ]
    assert resumed.last_message_id == 7


@pytest.mark.parametrize(
    ("initial", "error"),
    [
        (session(stats(1), session_id=NIL_SESSION_ID), "initial session is nil"),
        (session(stats(1), session_id=""), "initial session is nil"),
        (session(None), "session statistics is nil"),
    ],
)
async def test_initial_checks(initial: RunnerScaleSetSession, error: str) -> None:
    calls: list[Call] = []
    source = FakeSource(calls, [], initial)
    with pytest.raises(ProtocolError, match=error):
        await Listener(source, max_runners=1).run(FakeScaler(calls))
    assert calls == []


async def test_cancel_during_long_poll_is_clean() -> None:
    calls: list[Call] = []
    source = FakeSource(calls, [])
    await run_until_idle(Listener(source, max_runners=1), source, FakeScaler(calls))
    assert calls == [("desired", 1), ("get", 0, 1)]


async def test_message_handling_finishes_despite_cancellation() -> None:
    calls: list[Call] = []
    source = FakeSource(calls, [message(3, 2, started=["a"], completed=["b"])])
    scaler = FakeScaler(calls)
    scaler.gate = asyncio.Event()
    task = asyncio.create_task(Listener(source, max_runners=1).run(scaler))
    await asyncio.wait_for(scaler.entered.wait(), 5)
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()  # twice: still finishes
    await asyncio.sleep(0.01)
    assert not task.done()
    scaler.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls[-3:] == [("started", "a"), ("completed", "b"), ("desired", 2)]
    assert ("get", 3, 1) not in calls  # no new poll after the cancellation


async def test_handler_error_propagates_with_a_note() -> None:
    calls: list[Call] = []
    source = FakeSource(calls, [message(3, 2, completed=["x"])])
    scaler = FakeScaler(calls)
    scaler.fail_on = "x"
    with pytest.raises(RuntimeError, match="provisioner exploded") as caught:
        await Listener(source, max_runners=1).run(scaler)
    assert any("handling message 3: job completed" in note for note in caught.value.__notes__)
    assert ("desired", 2) not in calls


async def test_get_error_propagates_typed_and_run_is_restartable() -> None:
    calls: list[Call] = []
    expired = MessageQueueTokenExpiredError("token expired", status=401)
    source = FakeSource(calls, [message(9, 1), expired, None])
    scaler = FakeScaler(calls)
    listener = Listener(source, max_runners=1)
    with pytest.raises(MessageQueueTokenExpiredError) as caught:
        await listener.run(scaler)
    assert caught.value is expired
    assert any("getting the next message" in note for note in expired.__notes__)
    assert listener.last_message_id == 9
    calls.clear()
    await run_until_idle(listener, source, scaler)
    assert calls[:3] == [("desired", 1), ("get", 9, 1), ("desired", 1)]


async def test_last_message_id_can_be_handed_to_a_new_listener() -> None:
    calls: list[Call] = []
    source = FakeSource(calls, [])
    await run_until_idle(
        Listener(source, max_runners=1, last_message_id=41), source, FakeScaler(calls)
    )
    assert ("get", 41, 1) in calls


async def test_set_max_runners() -> None:
    calls: list[Call] = []
    source = FakeSource(calls, [None])
    listener = Listener(source, max_runners=1)
    listener.set_max_runners(0)
    await run_until_idle(listener, source, FakeScaler(calls))
    assert [c for c in calls if c[0] == "get"] == [("get", 0, 0), ("get", 0, 0)]
    for bad in (-1, 2**31):
        with pytest.raises(ValueError, match="max_runners"):
            listener.set_max_runners(bad)
    with pytest.raises(ValueError, match="max_runners"):
        Listener(source, max_runners=-1)


async def test_failure_after_cancellation_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[Call] = []
    source = FakeSource(calls, [message(3, 2, started=["a"], completed=["x"])])
    scaler = FakeScaler(calls)
    scaler.gate = asyncio.Event()
    scaler.fail_on = "x"
    task = asyncio.create_task(Listener(source, max_runners=1).run(scaler))
    await asyncio.wait_for(scaler.entered.wait(), 5)
    task.cancel()
    await asyncio.sleep(0)
    scaler.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "Handling a message failed after cancellation" in caplog.text
    assert "provisioner exploded" in caplog.text
