"""Scaler reliability (issue 9): runners outlive failures around them.

A failed JIT request fails its slot only; deregistration is retried until GitHub confirms it,
without holding the runner's slot; the journal follows every runner from before its JIT request
to that confirmation; a drain releases runners without a job and leaves busy ones alone; adopted
runners end like any other; an environment that exits is noticed at once. Everything runs against
in-memory environments and the fake client of ``tests/test_scaler.py``, with millisecond backoffs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import pytest

from outrunner.journal import JournalEntry, JournalPhase
from outrunner.provisioner import (
    EnvironmentMonitor,
    ExitWatcher,
    ProvisionerError,
    RunnerRequest,
)
from outrunner.runner import RunnerPhase
from outrunner.scaler import Scaler, ScalerError
from outrunner.scaleset.errors import JobStillRunningError, RunnerNotFoundError
from outrunner.scaleset.types import JitRunnerConfig, JitRunnerSetting, JobCompleted, JobStarted
from outrunner.testing.memory import InMemoryProvisioner
from tests.test_scaler import RUNNER, FakeClient, eventually, make_scaler, phases

pytestmark = pytest.mark.anyio


class FakeJournal:
    """A dict-backed runner journal: the latest entry of each runner, and every write in order.

    It also answers ``entries()``, so a ScaleSetWorker can read it back at start-up."""

    def __init__(self, entries: Iterable[JournalEntry] = ()) -> None:
        self.held: dict[str, JournalEntry] = {entry.name: entry for entry in entries}
        self.writes: list[tuple[str, JournalEntry | None]] = []
        """``(name, entry)`` of every record, ``(name, None)`` of every forget."""
        self.open_sessions: dict[str, str] = {}

    def sessions(self) -> dict[str, str]:
        return dict(self.open_sessions)

    def record_session(self, scale_set: str, session_id: str) -> None:
        if session_id:
            self.open_sessions[scale_set] = session_id
        else:
            self.open_sessions.pop(scale_set, None)

    def record(self, entry: JournalEntry) -> None:
        self.held[entry.name] = entry
        self.writes.append((entry.name, entry))

    def forget(self, name: str) -> None:
        self.held.pop(name, None)
        self.writes.append((name, None))

    def entries(self, scale_set: str | None = None) -> list[JournalEntry]:
        return [e for e in self.held.values() if scale_set is None or e.scale_set == scale_set]

    def phase(self, name: str) -> JournalPhase | None:
        entry = self.held.get(name)
        return None if entry is None else entry.phase

    def phases_of(self, name: str) -> list[JournalPhase | None]:
        """The phase of every write of ``name``; None for a forget."""
        return [None if e is None else e.phase for written, e in self.writes if written == name]

    def ids_of(self, name: str) -> list[int]:
        return [e.runner_id for written, e in self.writes if written == name and e is not None]


def fast_scaler(client: FakeClient, prov: InMemoryProvisioner, **kwargs: Any) -> Scaler:
    """A Scaler whose retries take milliseconds (each test overrides what it is about)."""
    kwargs.setdefault("retry_first", 0.005)
    kwargs.setdefault("retry_max", 0.02)
    kwargs.setdefault("deregister_timeout", 1.0)
    kwargs.setdefault("jit_settle", 0.05)
    return make_scaler(client, prov, **kwargs)


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == text]


def attr(record: logging.LogRecord, key: str) -> object:
    return record.attrs[key]  # type: ignore[attr-defined]


async def idle_runner(s: Scaler, count: int = 1) -> list[str]:
    """Add ``count`` runners and wait until they are idle; return their names."""
    assert await s.handle_desired_runner_count(count) == count
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * count)
    return [r.name for r in s.runners()]


async def running_runner(s: Scaler) -> str:
    (name,) = await idle_runner(s)
    await s.handle_job_started(JobStarted(runner_name=name))
    assert phases(s) == [RunnerPhase.RUNNING]
    return name


def until(gate: asyncio.Event) -> Callable[[RunnerRequest], Awaitable[None]]:
    """A runner process (an InMemoryProvisioner workload) that runs until ``gate`` is set."""

    async def workload(request: RunnerRequest) -> None:
        await gate.wait()

    return workload


def gated_workload(gate: asyncio.Event) -> InMemoryProvisioner:
    return InMemoryProvisioner(workload=until(gate))


# 1. A failed JIT request fails its slot only -------------------------------------------------


async def test_scaler_error_only_when_the_scale_set_id_is_unknown() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    s = Scaler(client, max_runners=2, name_prefix="test", runner=RUNNER, provisioner=prov)
    assert await s.handle_desired_runner_count(0) == 0
    with pytest.raises(ScalerError, match="scale set id is not known"):
        await s.handle_desired_runner_count(1)
    assert client.jit_names == []
    assert s.runners() == []
    s.scale_set_id = 1
    assert await s.handle_desired_runner_count(1) == 1
    await s.shutdown()


async def test_failed_jit_fails_one_slot_of_a_burst_and_the_next_call_fills_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    journal = FakeJournal()
    real = client.generate_jit_runner_config
    calls = 0

    async def second_fails(setting: JitRunnerSetting, scale_set_id: int) -> JitRunnerConfig:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("502 Bad Gateway")
        return await real(setting, scale_set_id)

    client.generate_jit_runner_config = second_fails  # type: ignore[method-assign]
    caplog.set_level(logging.ERROR, logger="outrunner")
    s = fast_scaler(client, prov, journal=journal, max_runners=3)
    assert await s.handle_desired_runner_count(3) == 2
    (failed,) = messages(caplog, "Failed to register runner")
    lost = attr(failed, "name")
    assert isinstance(lost, str)
    assert lost not in {r.name for r in s.runners()}
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 2)
    # Nothing was registered: the lookups by name (until jit_settle) find nothing to remove.
    await eventually(lambda: s.pending_deregistrations() == [])
    assert set(client.lookups) == {lost}
    assert client.removed == []
    assert journal.phases_of(lost) == [
        JournalPhase.REGISTERING,
        JournalPhase.DEREGISTERING,
        None,
    ]
    assert await s.handle_desired_runner_count(3) == 3
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 3)
    await s.shutdown()


async def test_registration_left_by_a_lost_jit_answer_is_found_by_name_and_removed() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    client.lose_jit_answers = 1
    # GitHub is flaky for the lookups too: they are retried like any deregistration.
    client.lookup_failures = [RuntimeError("503"), RuntimeError("503")]
    journal = FakeJournal()
    s = fast_scaler(client, prov, journal=journal)
    assert await s.handle_desired_runner_count(1) == 0
    (name,) = client.jit_names
    await eventually(lambda: s.pending_deregistrations() == [])
    assert client.lookups == [name] * 3
    assert client.removed == [1]
    assert client.registered == {}
    assert journal.held == {}
    assert prov.events == []
    await s.shutdown()


# 2. Deregistration is retried until GitHub confirms it --------------------------------------

FAILURES = ("error", "job-still-running", "timeout")


def break_removals(client: FakeClient, failure: str) -> None:
    """Make every remove attempt fail the way ``failure`` names, until :func:`heal`."""
    if failure == "error":
        client.remove_error = RuntimeError("503 Service Unavailable")
    elif failure == "job-still-running":
        client.remove_error = JobStillRunningError("job still running")
    else:  # every attempt outlasts the Scaler's deregister_timeout
        client.remove_hangs = 10_000


def heal(client: FakeClient) -> None:
    client.remove_error = None
    client.remove_hangs = 0


@pytest.mark.parametrize("failure", FAILURES)
async def test_deregistration_is_retried_and_the_slot_is_freed_meanwhile(failure: str) -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    journal = FakeJournal()
    s = fast_scaler(client, prov, journal=journal, max_runners=1, deregister_timeout=0.02)
    (name,) = await idle_runner(s)
    break_removals(client, failure)
    await s.handle_job_completed(JobCompleted(runner_name=name, result="succeeded"))
    await eventually(lambda: len(client.removed) >= 3)
    # The environment is stopped; only the registration is pending, and it holds no slot.
    assert s.runners() == []
    assert s.pending_deregistrations() == [name]
    assert prov.stopped == [name]
    assert journal.phase(name) is JournalPhase.DEREGISTERING
    assert journal.held[name].runner_id == 1
    assert await s.handle_desired_runner_count(1) == 1
    (replacement,) = s.runners()
    assert replacement.name != name
    heal(client)
    await eventually(lambda: s.pending_deregistrations() == [])
    assert set(client.removed) == {1}
    assert name not in journal.held
    await s.shutdown()


@pytest.mark.parametrize(
    ("failure", "text"),
    [
        ("error", "Failed to deregister runner"),
        ("job-still-running", None),
        ("timeout", "Timed out deregistering runner"),
    ],
)
async def test_one_warning_per_runner_however_many_retries(
    caplog: pytest.LogCaptureFixture, failure: str, text: str | None
) -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    caplog.set_level(logging.DEBUG, logger="outrunner")
    s = fast_scaler(client, prov, deregister_timeout=0.02)
    (name,) = await idle_runner(s)
    break_removals(client, failure)
    await s.handle_job_completed(JobCompleted(runner_name=name))
    await eventually(lambda: len(client.removed) >= 5)
    heal(client)
    await eventually(lambda: s.pending_deregistrations() == [])
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    if text is None:  # a 409 is expected while the job winds down: no warning at all
        assert warnings == []
    else:
        assert [r.getMessage() for r in warnings] == [text]
        assert attr(warnings[0], "name") == name
        retries = [r for r in messages(caplog, text) if r.levelno == logging.DEBUG]
        assert len(retries) >= 4
    await s.shutdown()


async def test_runner_not_found_counts_as_deregistered() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    client.remove_error = RunnerNotFoundError("AgentNotFoundException")
    journal = FakeJournal()
    s = fast_scaler(client, prov, journal=journal)
    (name,) = await idle_runner(s)
    await s.handle_job_completed(JobCompleted(runner_name=name))
    await eventually(lambda: s.runners() == [] and s.pending_deregistrations() == [])
    assert client.removed == [1]
    assert journal.held == {}
    await s.shutdown()


async def test_deregistration_waits_between_attempts() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    client.remove_failures = [RuntimeError("503")]
    s = fast_scaler(client, prov, retry_first=30.0, retry_max=60.0)
    (name,) = await idle_runner(s)
    await s.handle_job_completed(JobCompleted(runner_name=name))
    await eventually(lambda: client.removed == [1] and s.runners() == [])
    await asyncio.sleep(0.1)
    assert client.removed == [1]  # backing off, not hammering GitHub
    assert s.pending_deregistrations() == [name]
    await s.shutdown(timeout=5)


# 3. Shutdown and the journal ----------------------------------------------------------------


async def test_journal_follows_a_runner_from_before_its_jit_request_to_confirmation() -> None:
    client, jit_gate, start_gate = FakeClient(), asyncio.Event(), asyncio.Event()
    client.jit_gate = jit_gate
    prov = InMemoryProvisioner(start_gate=start_gate)
    journal = FakeJournal()
    s = fast_scaler(client, prov, journal=journal)

    adding = asyncio.create_task(s.handle_desired_runner_count(1))
    await eventually(lambda: client.in_flight == 1)
    (entry,) = journal.held.values()
    name = entry.name
    assert (entry.phase, entry.runner_id) == (JournalPhase.REGISTERING, 0)
    assert (entry.scale_set, entry.backend) == ("test", "docker")

    jit_gate.set()
    assert await adding == 1
    await eventually(lambda: prov.events == [("start", name)])
    assert (journal.phase(name), journal.held[name].runner_id) == (JournalPhase.PROVISIONING, 1)

    start_gate.set()
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    assert journal.phase(name) is JournalPhase.IDLE
    await s.handle_job_started(JobStarted(runner_name=name))
    assert journal.phase(name) is JournalPhase.RUNNING

    seen: dict[str, JournalPhase | None] = {}
    real_stop = prov.stop

    async def stop(stopping: str) -> None:
        seen["stop"] = journal.phase(stopping)
        await real_stop(stopping)

    def on_remove(runner_id: int) -> None:
        seen["remove"] = journal.phase(name)

    prov.stop = stop  # type: ignore[method-assign,assignment]
    client.on_remove = on_remove
    await s.handle_job_completed(JobCompleted(runner_name=name))
    await eventually(lambda: name not in journal.held)
    assert seen == {"stop": JournalPhase.STOPPING, "remove": JournalPhase.DEREGISTERING}
    assert journal.phases_of(name) == [
        JournalPhase.REGISTERING,
        JournalPhase.PROVISIONING,
        JournalPhase.IDLE,
        JournalPhase.RUNNING,
        JournalPhase.STOPPING,
        JournalPhase.DEREGISTERING,
        None,
    ]
    assert journal.ids_of(name) == [0, 1, 1, 1, 1, 1]
    await s.shutdown()


async def test_shutdown_gives_pending_deregistrations_a_prompt_last_attempt() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    client.remove_failures = [RuntimeError("503")]
    journal = FakeJournal()
    # The next attempt would come 30 s later: shutdown must not wait for it.
    s = fast_scaler(client, prov, journal=journal, retry_first=30.0, retry_max=60.0)
    (name,) = await idle_runner(s)
    await s.handle_job_completed(JobCompleted(runner_name=name))
    await eventually(lambda: s.pending_deregistrations() == [name])
    async with asyncio.timeout(2):
        await s.shutdown(timeout=10)
    assert client.removed == [1, 1]
    assert s.pending_deregistrations() == []
    assert journal.held == {}


@pytest.mark.parametrize("failure", ["error", "timeout"])
async def test_shutdown_gives_up_on_unconfirmed_deregistrations_within_its_window(
    caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    journal = FakeJournal()
    caplog.set_level(logging.WARNING, logger="outrunner")
    s = fast_scaler(client, prov, journal=journal, retry_first=30.0, deregister_timeout=0.05)
    names = await idle_runner(s, count=2)
    break_removals(client, failure)
    for name in names:
        await s.handle_job_completed(JobCompleted(runner_name=name))
    # Both first attempts have failed: the next ones are 30 s away.
    await eventually(
        lambda: len([r for r in caplog.records if "deregister" in r.getMessage()]) == 2
    )
    assert s.pending_deregistrations() == sorted(names)
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with asyncio.timeout(3):
        await s.shutdown(timeout=0.3)
    assert loop.time() - began < 1.5
    assert len(client.removed) > 2  # prompt attempts during the window, not one per 30 s
    assert s.pending_deregistrations() == []
    (gave_up,) = messages(
        caplog, "GitHub did not confirm some deregistrations; the next start retries them"
    )
    assert attr(gave_up, "runners") == ",".join(sorted(names))
    # The journal keeps them for the next start.
    assert {n: (e.phase, e.runner_id) for n, e in journal.held.items()} == {
        names[0]: (JournalPhase.DEREGISTERING, 1),
        names[1]: (JournalPhase.DEREGISTERING, 2),
    }


# 4. Drain ------------------------------------------------------------------------------------


async def test_drain_requests_no_new_runners() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    s = fast_scaler(client, prov)
    await running_runner(s)
    s.drain()
    assert s.draining
    assert await s.handle_desired_runner_count(5) == 1
    assert len(client.jit_names) == 1
    await s.shutdown()


async def test_drain_deregisters_an_idle_runner_before_stopping_it() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    journal = FakeJournal()
    s = fast_scaler(client, prov, journal=journal)
    (name,) = await idle_runner(s)
    stopped_at_removal: list[list[str]] = []
    client.on_remove = lambda runner_id: stopped_at_removal.append(list(prov.stopped))
    s.drain()
    async with asyncio.timeout(2):
        await s.wait_empty()
    assert stopped_at_removal == [[]]  # deregistered first: no job can land on it while stopping
    assert prov.stopped == [name]
    assert client.removed == [1]
    assert prov.environments == {}
    assert s.pending_deregistrations() == []
    assert journal.held == {}
    await s.shutdown()


async def test_drain_keeps_an_idle_runner_that_took_a_job_meanwhile() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    client.remove_failures = [JobStillRunningError("job still running")]
    journal = FakeJournal()
    s = fast_scaler(client, prov, journal=journal)
    (name,) = await idle_runner(s)
    s.drain()
    await eventually(lambda: phases(s) == [RunnerPhase.RUNNING])
    assert journal.phase(name) is JournalPhase.RUNNING
    await asyncio.sleep(0.05)
    assert phases(s) == [RunnerPhase.RUNNING]
    assert prov.stopped == []
    assert client.removed == [1]
    await s.handle_job_completed(JobCompleted(runner_name=name, result="succeeded"))
    async with asyncio.timeout(2):
        await s.wait_empty()
    assert prov.stopped == [name]
    await eventually(lambda: s.pending_deregistrations() == [])
    assert client.removed == [1, 1]
    assert journal.held == {}
    await s.shutdown()


@pytest.mark.parametrize("end", ["job-completed", "environment-exits"])
async def test_drain_leaves_a_running_runner_alone_until_it_ends(end: str) -> None:
    """Not even a deregistration attempt: the 409 GitHub would answer is no licence to try."""
    client, gate = FakeClient(), asyncio.Event()
    prov = gated_workload(gate)
    s = fast_scaler(client, prov, watch_interval=0.01)
    name = await running_runner(s)
    client.busy.add(1)
    s.drain()
    await asyncio.sleep(0.1)
    assert phases(s) == [RunnerPhase.RUNNING]
    assert client.removed == []
    assert prov.stopped == []
    client.busy.clear()
    if end == "job-completed":
        await s.handle_job_completed(JobCompleted(runner_name=name, result="succeeded"))
    else:
        gate.set()
    async with asyncio.timeout(2):
        await s.wait_empty()
    assert prov.stopped == [name]
    await eventually(lambda: client.removed == [1])
    await s.shutdown()


async def test_drain_leaves_a_runner_that_took_its_job_while_provisioning_alone() -> None:
    client, gate = FakeClient(), asyncio.Event()
    prov = InMemoryProvisioner(start_gate=gate)
    s = fast_scaler(client, prov)
    await s.handle_desired_runner_count(1)
    (name,) = [r.name for r in s.runners()]
    await eventually(lambda: prov.events == [("start", name)])
    await s.handle_job_started(JobStarted(runner_name=name))
    client.busy.add(1)
    s.drain()
    await asyncio.sleep(0.05)
    assert client.removed == []
    gate.set()
    await eventually(lambda: prov.started == [name])
    await asyncio.sleep(0.05)
    assert phases(s) == [RunnerPhase.RUNNING]
    assert client.removed == []
    assert prov.stopped == []
    client.busy.clear()
    await s.handle_job_completed(JobCompleted(runner_name=name, result="succeeded"))
    async with asyncio.timeout(2):
        await s.wait_empty()
    assert prov.stopped == [name]
    await eventually(lambda: client.removed == [1])
    await s.shutdown()


async def test_drain_releases_a_provisioning_runner_and_cancels_its_start() -> None:
    client, gate = FakeClient(), asyncio.Event()
    prov = InMemoryProvisioner(start_gate=gate)
    journal = FakeJournal()
    s = fast_scaler(client, prov, journal=journal)
    await s.handle_desired_runner_count(1)
    (name,) = [r.name for r in s.runners()]
    await eventually(lambda: prov.events == [("start", name)])
    events_at_removal: list[list[tuple[str, str]]] = []
    client.on_remove = lambda runner_id: events_at_removal.append(list(prov.events))
    s.drain()
    async with asyncio.timeout(2):
        await s.wait_empty()
    assert events_at_removal == [[("start", name)]]  # deregistered before the start ends
    assert prov.events == [("start", name), ("start-failed", name)]
    assert prov.environments == {}
    assert client.removed == [1]
    assert s.pending_deregistrations() == []
    assert journal.held == {}
    await s.shutdown()


async def test_drain_retries_a_failed_release_and_keeps_the_runner_meanwhile() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    client.remove_error = RuntimeError("503 Service Unavailable")
    s = fast_scaler(client, prov)
    (name,) = await idle_runner(s)
    s.drain()
    await eventually(lambda: len(client.removed) >= 3)
    assert phases(s) == [RunnerPhase.IDLE]
    assert list(prov.environments) == [name]
    assert prov.stopped == []
    client.remove_error = None
    async with asyncio.timeout(2):
        await s.wait_empty()
    assert prov.stopped == [name]
    assert prov.environments == {}
    await s.shutdown()


async def test_drain_release_retries_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    client.remove_error = RuntimeError("503 Service Unavailable")
    caplog.set_level(logging.DEBUG, logger="outrunner")
    s = fast_scaler(client, prov)
    (name,) = await idle_runner(s)
    s.drain()
    await eventually(lambda: len(client.removed) >= 5)
    client.remove_error = None
    async with asyncio.timeout(2):
        await s.wait_empty()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.getMessage(), attr(r, "name")) for r in warnings] == [
        ("Failed to deregister runner", name)
    ]
    await s.shutdown()


async def test_drain_release_that_outlasts_the_start_still_stops_the_environment() -> None:
    """A runner still provisioning when the drain begins, while GitHub refuses the release
    for longer than the start takes: once the release succeeds, the started environment must
    be stopped, not left behind."""
    client, gate = FakeClient(), asyncio.Event()
    client.remove_error = RuntimeError("503 Service Unavailable")
    prov = InMemoryProvisioner(start_gate=gate)
    s = fast_scaler(client, prov)
    await s.handle_desired_runner_count(1)
    (name,) = [r.name for r in s.runners()]
    await eventually(lambda: prov.events == [("start", name)])
    s.drain()
    await eventually(lambda: len(client.removed) >= 2)
    gate.set()
    await eventually(lambda: prov.started == [name])
    client.remove_error = None
    async with asyncio.timeout(2):
        await s.wait_empty()
    await s.shutdown()
    assert prov.environments == {}
    assert prov.stopped == [name]


async def test_wait_empty_returns_once_every_runner_is_gone() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    s = fast_scaler(client, prov)
    assert await s.handle_desired_runner_count(2) == 2
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 2)
    (busy, busy_id), (idle, _) = ((r.name, r.runner_id) for r in s.runners())
    await s.handle_job_started(JobStarted(runner_name=busy))
    client.busy.add(busy_id)
    s.drain()
    waiting = asyncio.create_task(s.wait_empty())
    await eventually(lambda: [r.name for r in s.runners()] == [busy])
    await asyncio.sleep(0.05)
    assert not waiting.done()
    client.busy.clear()
    await s.handle_job_completed(JobCompleted(runner_name=busy))
    async with asyncio.timeout(2):
        await waiting
    assert sorted(prov.stopped) == sorted([busy, idle])
    await s.shutdown()


async def test_shutdown_after_a_drain_stops_a_busy_runner_at_once() -> None:
    client, gate = FakeClient(), asyncio.Event()
    prov = gated_workload(gate)
    s = fast_scaler(client, prov)
    name = await running_runner(s)
    client.busy.add(1)
    s.drain()
    await asyncio.sleep(0.05)
    assert phases(s) == [RunnerPhase.RUNNING]
    assert prov.stopped == []
    client.busy.clear()  # its job dies with the environment; GitHub then lets the runner go
    async with asyncio.timeout(2):
        await s.shutdown(timeout=30)
    assert s.runners() == []
    assert prov.stopped == [name]
    assert prov.environments == {}
    assert client.removed[-1:] == [1]
    assert s.pending_deregistrations() == []


# 5. Adoption ---------------------------------------------------------------------------------


async def live_environment(name: str, gate: asyncio.Event) -> InMemoryProvisioner:
    """An environment an earlier process started (its runner runs until ``gate`` is set), and
    the provisioner of this process, which knows it through the shared environments."""
    earlier = InMemoryProvisioner(workload=until(gate), survive_close=True)
    await earlier.start(RunnerRequest(name=name, jit_config="old-jit-config", runner=RUNNER))
    await earlier.close()
    return InMemoryProvisioner(environments=earlier.environments)


async def test_adopted_runner_counts_and_ends_on_its_job_completed() -> None:
    client, gate = FakeClient(), asyncio.Event()
    name = "test-0000abcd"
    prov = await live_environment(name, gate)
    journal = FakeJournal()
    s = fast_scaler(client, prov, journal=journal, max_runners=2)
    snapshot = s.adopt(name, 7, RunnerPhase.RUNNING)
    assert (snapshot.name, snapshot.runner_id, snapshot.phase) == (name, 7, RunnerPhase.RUNNING)
    assert snapshot.adopted
    assert snapshot.started_at is not None
    assert s.runners() == [snapshot]
    assert s.busy_runners() == 1
    assert (journal.phase(name), journal.held[name].runner_id) == (JournalPhase.RUNNING, 7)
    # It holds one of the two slots.
    assert await s.handle_desired_runner_count(5) == 2
    assert len(client.jit_names) == 1
    await asyncio.sleep(0.05)
    assert name in {r.name for r in s.runners()}  # its environment lives: nothing ends it
    await s.handle_job_completed(JobCompleted(runner_name=name, result="succeeded"))
    await eventually(lambda: name not in {r.name for r in s.runners()})
    assert prov.stopped == [name]
    await eventually(lambda: s.pending_deregistrations() == [])
    assert client.removed == [7]
    assert name not in journal.held
    await s.shutdown()


async def test_adopted_runner_ends_when_its_environment_exits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, gate = FakeClient(), asyncio.Event()
    name = "test-0000abcd"
    prov = await live_environment(name, gate)
    caplog.set_level(logging.INFO, logger="outrunner")
    s = fast_scaler(client, prov, watch_interval=60)
    s.adopt(name, 7, RunnerPhase.RUNNING)
    gate.set()  # its runner exits after the job it was running
    async with asyncio.timeout(2):
        await s.wait_empty()
    assert prov.stopped == [name]
    await eventually(lambda: client.removed == [7])
    (stopping,) = messages(caplog, "Stopping runner")
    assert stopping.levelno == logging.INFO
    assert stopping.attrs["reason"] == "environment exited"  # type: ignore[attr-defined]
    await s.shutdown()


async def test_adopt_rejects_a_tracked_name_and_phases_without_an_environment() -> None:
    client, gate = FakeClient(), asyncio.Event()
    name = "test-0000abcd"
    prov = await live_environment(name, gate)
    s = fast_scaler(client, prov)
    with pytest.raises(ValueError, match="only idle or running"):
        s.adopt(name, 7, RunnerPhase.PROVISIONING)
    s.adopt(name, 7, RunnerPhase.IDLE)
    with pytest.raises(ValueError, match="already tracked"):
        s.adopt(name, 7, RunnerPhase.RUNNING)
    await s.shutdown()
    assert prov.stopped == [name]
    assert client.removed == [7]


@pytest.mark.parametrize("registered", [True, False])
async def test_deregister_later_without_an_id_looks_the_runner_up_by_name(
    registered: bool,
) -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    name = "test-0000abcd"
    if registered:
        client.registered[name] = 5
    journal = FakeJournal()
    s = fast_scaler(client, prov, journal=journal)
    s.deregister_later(name, 0)
    assert journal.phase(name) is JournalPhase.DEREGISTERING
    await eventually(lambda: s.pending_deregistrations() == [])
    assert client.lookups == [name]
    assert client.removed == ([5] if registered else [])
    assert journal.held == {}
    await s.shutdown()


async def test_deregister_later_with_an_id_removes_it_directly() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    s = fast_scaler(client, prov)
    s.deregister_later("test-0000abcd", 9)
    await eventually(lambda: s.pending_deregistrations() == [])
    assert client.lookups == []
    assert client.removed == [9]
    await s.shutdown()


# 6. Exit detection ---------------------------------------------------------------------------


async def test_exit_watcher_ends_a_runner_without_waiting_for_the_poll() -> None:
    client, gate = FakeClient(), asyncio.Event()
    prov = gated_workload(gate)
    assert isinstance(prov, ExitWatcher)
    s = fast_scaler(client, prov, watch_interval=60)
    name = await running_runner(s)
    gate.set()
    async with asyncio.timeout(1):
        await s.wait_empty()
    assert prov.stopped == [name]
    await eventually(lambda: client.removed == [1], timeout=1)
    await s.shutdown()


class MonitorOnly:
    """A backend that can only be polled (an EnvironmentMonitor, no ExitWatcher)."""

    def __init__(self, inner: InMemoryProvisioner) -> None:
        self.inner = inner
        self.polls = 0

    async def start(self, request: RunnerRequest) -> None:
        await self.inner.start(request)

    async def stop(self, name: str) -> None:
        await self.inner.stop(name)

    async def close(self) -> None:
        await self.inner.close()

    async def exited(self, name: str) -> bool:
        self.polls += 1
        return await self.inner.exited(name)


async def test_a_backend_that_can_only_be_polled_still_gets_dead_environments_cleaned_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, gate = FakeClient(), asyncio.Event()
    inner = gated_workload(gate)
    monitor = MonitorOnly(inner)
    assert isinstance(monitor, EnvironmentMonitor)
    assert not isinstance(monitor, ExitWatcher)
    caplog.set_level(logging.WARNING, logger="outrunner")
    s = fast_scaler(client, monitor, watch_interval=0.02)  # type: ignore[arg-type]
    (name,) = await idle_runner(s)
    await asyncio.sleep(0.1)
    assert phases(s) == [RunnerPhase.IDLE]  # polled, alive, kept
    assert monitor.polls >= 2
    gate.set()  # the runner dies without a job
    async with asyncio.timeout(2):
        await s.wait_empty()
    assert inner.stopped == [name]
    await eventually(lambda: client.removed == [1])
    assert [r.levelno for r in messages(caplog, "Runner environment ended without running a job")]
    await s.shutdown()


class BrokenWatcher(InMemoryProvisioner):
    """An ExitWatcher whose event stream is lost: waiting raises at once."""

    async def wait_exited(self, name: str) -> None:
        raise ProvisionerError("cannot watch: the event stream closed")


async def test_an_exit_watcher_that_fails_falls_back_to_polling() -> None:
    client, gate = FakeClient(), asyncio.Event()
    prov = BrokenWatcher(workload=until(gate))
    s = fast_scaler(client, prov, watch_interval=0.05)
    name = await running_runner(s)
    await asyncio.sleep(0.15)
    assert phases(s) == [RunnerPhase.RUNNING]  # a watcher failure never drops a runner
    gate.set()
    async with asyncio.timeout(2):
        await s.wait_empty()
    assert prov.stopped == [name]
    await eventually(lambda: client.removed == [1])
    await s.shutdown()
