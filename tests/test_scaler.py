"""Scaler tests: every case of gha-outrunner's scaler_test.go, plus the concurrency guarantees."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

import pytest

from outrunner.config import DockerImage, RunnerConfig
from outrunner.provisioner import RunnerRequest
from outrunner.runner import RunnerPhase, RunnerSnapshot
from outrunner.scaler import Scaler
from outrunner.scaleset.errors import JobStillRunningError, RunnerNotFoundError
from outrunner.scaleset.types import (
    JitRunnerConfig,
    JitRunnerSetting,
    JobCompleted,
    JobStarted,
    RunnerReference,
)
from outrunner.testing.memory import InMemoryProvisioner

pytestmark = pytest.mark.anyio

RUNNER = RunnerConfig(name="test", labels=("linux",), docker=DockerImage(image="test:latest"))


class FakeClient:
    """A scale set client: records JIT, lookup and remove calls; can be made slow, gated or
    failing. ``registered`` holds the runners it registered and has not removed, so lookups by
    name find them as GitHub would."""

    def __init__(self) -> None:
        self.next_id = 1
        self.jit_names: list[str] = []
        self.registered: dict[str, int] = {}
        self.lookups: list[str] = []
        self.removed: list[int] = []
        """Every remove attempt's runner id, failed ones included, in order."""
        self.jit_error: Exception | None = None
        self.lose_jit_answers = 0
        """The next N JIT requests register the runner, then fail (an answer lost on the way)."""
        self.remove_error: Exception | None = None
        """Raised by every remove attempt while set."""
        self.remove_failures: list[Exception] = []
        """Raised by the next remove attempts, one each, before ``remove_error`` applies."""
        self.remove_hangs = 0
        """The next N remove attempts never answer (until the Scaler's timeout cancels them)."""
        self.busy: set[int] = set()
        """Runners running a job: removing one answers 409 JobStillRunning, as GitHub does."""
        self.on_remove: Callable[[int], None] | None = None
        self.lookup_failures: list[Exception] = []
        """Raised by the next lookups by name, one each."""
        self.jit_delay = 0.0
        self.jit_gate: asyncio.Event | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    async def generate_jit_runner_config(
        self, setting: JitRunnerSetting, scale_set_id: int
    ) -> JitRunnerConfig:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.jit_gate is not None:
                await self.jit_gate.wait()
            if self.jit_delay:
                await asyncio.sleep(self.jit_delay)
            if self.jit_error is not None:
                raise self.jit_error
        finally:
            self.in_flight -= 1
        runner_id = self.next_id
        self.next_id += 1
        self.jit_names.append(setting.name)
        self.registered[setting.name] = runner_id
        if self.lose_jit_answers:
            self.lose_jit_answers -= 1
            raise RuntimeError("connection reset by peer")
        return JitRunnerConfig(
            runner=RunnerReference(
                id=runner_id, name=setting.name, runner_scale_set_id=scale_set_id
            ),
            encoded_jit_config="test-jit-config",
        )

    async def get_runner_by_name(self, name: str) -> RunnerReference | None:
        self.lookups.append(name)
        if self.lookup_failures:
            raise self.lookup_failures.pop(0)
        runner_id = self.registered.get(name)
        return None if runner_id is None else RunnerReference(id=runner_id, name=name)

    async def remove_runner(self, runner_id: int) -> None:
        self.removed.append(runner_id)
        if self.on_remove is not None:
            self.on_remove(runner_id)
        if self.remove_hangs:
            self.remove_hangs -= 1
            await asyncio.Event().wait()
        if self.remove_failures:
            raise self.remove_failures.pop(0)
        if self.remove_error is not None:
            raise self.remove_error
        if runner_id in self.busy:
            raise JobStillRunningError(f"runner {runner_id} is running a job")
        self.registered = {n: i for n, i in self.registered.items() if i != runner_id}


class SettlingScaler(Scaler):
    """A Scaler whose ``handle_desired_runner_count`` also waits for the JIT requests it
    started (the real one returns at once, so a burst never holds up the listener): the tests
    built on it check the bookkeeping right after the call."""

    async def handle_desired_runner_count(self, count: int) -> int:
        before = set(self._adding)
        await super().handle_desired_runner_count(count)
        started = self._adding - before  # this call's requests; another call's may be gated
        if started:
            await asyncio.wait(started)
        return len(self._runners) + self._reserved


def make_scaler(
    client: FakeClient,
    prov: InMemoryProvisioner,
    *,
    max_runners: int = 10,
    prefix: str = "test",
    **kwargs: object,
) -> Scaler:
    return SettlingScaler(
        client,
        scale_set_id=1,
        max_runners=max_runners,
        name_prefix=prefix,
        runner=RUNNER,
        provisioner=prov,
        **kwargs,  # type: ignore[arg-type]
    )


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait until ``predicate`` holds; the scaler's work happens in tasks we do not await."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def phases(scaler: Scaler) -> list[RunnerPhase]:
    return [r.phase for r in scaler.runners()]


async def test_non_blocking_provisioning() -> None:
    """Go: TestNonBlockingProvisioning."""
    client, gate = FakeClient(), asyncio.Event()
    prov = InMemoryProvisioner(start_gate=gate)
    s = make_scaler(client, prov)
    async with asyncio.timeout(2):
        assert await s.handle_desired_runner_count(1) == 1
    await eventually(lambda: prov.events == [("start", s.runners()[0].name)])
    assert phases(s) == [RunnerPhase.PROVISIONING]
    gate.set()
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    await s.shutdown()


async def test_happy_path() -> None:
    """Go: TestHappyPath."""
    client, prov = FakeClient(), InMemoryProvisioner()
    s = make_scaler(client, prov)
    assert await s.handle_desired_runner_count(1) == 1
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    name = s.runners()[0].name
    await s.handle_job_started(JobStarted(runner_name=name))
    assert phases(s) == [RunnerPhase.RUNNING]
    await s.handle_job_completed(JobCompleted(runner_name=name, result="succeeded"))
    await eventually(lambda: s.runners() == [])
    assert prov.stopped == [name]
    # The removal runs in a deregistration task of its own, which may end after the runner left.
    await eventually(lambda: client.removed == [1])
    assert prov.environments == {}
    await s.shutdown()


async def test_provisioning_failure() -> None:
    """Go: TestProvisioningFailure. A failed start deregisters and never calls stop."""
    client = FakeClient()
    prov = InMemoryProvisioner(start_error=TimeoutError("deadline exceeded"))
    s = make_scaler(client, prov)
    assert await s.handle_desired_runner_count(1) == 1
    await eventually(lambda: s.runners() == [])
    await eventually(lambda: client.removed == [1])
    assert prov.stopped == []
    await s.shutdown()


async def test_shutdown_during_provisioning() -> None:
    """Go: TestShutdownDuringProvisioning. Shutdown cancels start, then deregisters."""
    client, gate = FakeClient(), asyncio.Event()
    prov = InMemoryProvisioner(start_gate=gate)
    s = make_scaler(client, prov)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: len(prov.events) == 1)
    assert len(s.runners()) == 1
    await s.shutdown(timeout=5)
    assert s.runners() == []
    assert client.removed == [1]
    assert [verb for verb, _ in prov.events] == ["start", "start-failed"]
    assert prov.environments == {}


async def test_count_accuracy() -> None:
    """Go: TestCountAccuracy."""
    client, prov = FakeClient(), InMemoryProvisioner()
    s = make_scaler(client, prov)
    assert await s.handle_desired_runner_count(3) == 3
    assert await s.handle_desired_runner_count(3) == 3
    assert len(client.jit_names) == 3
    await s.shutdown()


async def test_shutdown_waits_for_lifecycles() -> None:
    """Go: TestShutdownWaitsForGoroutines."""
    client, gate = FakeClient(), asyncio.Event()
    prov = InMemoryProvisioner(start_gate=gate)
    s = make_scaler(client, prov)
    await s.handle_desired_runner_count(2)
    await eventually(lambda: len(prov.events) == 2)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await s.shutdown(timeout=5)
    assert loop.time() - began < 3
    assert s.runners() == []
    assert sorted(client.removed) == [1, 2]


async def test_concurrent_runners() -> None:
    """Go: TestConcurrentRunners. Completing in reverse order stops all three."""
    client, prov = FakeClient(), InMemoryProvisioner()
    s = make_scaler(client, prov)
    await s.handle_desired_runner_count(3)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 3)
    for runner in reversed(s.runners()):
        await s.handle_job_completed(JobCompleted(runner_name=runner.name, result="succeeded"))
    await eventually(lambda: s.runners() == [])
    assert len(prov.stopped) == 3
    await eventually(lambda: sorted(client.removed) == [1, 2, 3])
    await s.shutdown()


async def test_max_runners_clamping() -> None:
    """Go: TestMaxRunnersClamping."""
    client, prov = FakeClient(), InMemoryProvisioner()
    s = make_scaler(client, prov, max_runners=2)
    assert await s.handle_desired_runner_count(10) == 2
    assert len(client.jit_names) == 2
    await s.shutdown()


async def test_desired_count_zero() -> None:
    """Go: TestDesiredCountZero."""
    client, prov = FakeClient(), InMemoryProvisioner()
    s = make_scaler(client, prov)
    assert await s.handle_desired_runner_count(0) == 0
    assert s.runners() == []
    await s.shutdown()


async def test_jit_config_error(caplog: pytest.LogCaptureFixture) -> None:
    """Go: TestJitConfigError. Go returns the error from HandleDesiredRunnerCount, which stops
    the listener and with it the message session. Here a failed JIT request fails its slot only:
    it is logged, nothing is tracked, and the next demand signal fills the slot. A failed JIT
    must never end the message session (issue 9): that session is what delivers the
    JobCompleted messages of the runners already running jobs."""
    client, prov = FakeClient(), InMemoryProvisioner()
    client.jit_error = RuntimeError("GitHub API unavailable")
    caplog.set_level(logging.ERROR, logger="outrunner")
    s = make_scaler(client, prov, jit_settle=0.1, retry_first=0.02)
    assert await s.handle_desired_runner_count(1) == 0
    assert s.runners() == []
    assert prov.events == []
    (failed,) = [r for r in caplog.records if r.getMessage() == "Failed to register runner"]
    assert failed.levelno == logging.ERROR
    assert failed.attrs["error"] == "GitHub API unavailable"  # type: ignore[attr-defined]
    # The request may have reached GitHub before failing, or be handled there still: the name is
    # looked up until jit_settle has passed, and found absent every time.
    name = failed.attrs["name"]  # type: ignore[attr-defined]
    await eventually(lambda: s.pending_deregistrations() == [])
    assert len(client.lookups) >= 2
    assert set(client.lookups) == {name}
    assert client.removed == []
    assert await s.handle_desired_runner_count(0) == 0
    client.jit_error = None
    assert await s.handle_desired_runner_count(1) == 1
    await s.shutdown()


async def test_a_runner_registered_after_its_jit_request_failed_is_still_removed() -> None:
    """The server may handle a JIT request after the client gave up on it (a connection cut
    mid-request, a shutdown cancelling it): the first lookups by name find nothing, and the
    runner it registers a moment later must not be left behind."""
    client, prov = FakeClient(), InMemoryProvisioner()
    client.jit_error = RuntimeError("connection reset by peer")
    s = make_scaler(client, prov, jit_settle=5.0, retry_first=0.02, retry_max=0.05)
    assert await s.handle_desired_runner_count(1) == 0
    await eventually(lambda: len(client.lookups) >= 2)
    (name,) = set(client.lookups)
    assert s.pending_deregistrations() == [name]  # "not found" is not final yet
    client.registered[name] = 41  # the server handles the request late
    await eventually(lambda: client.removed == [41])
    await eventually(lambda: s.pending_deregistrations() == [])
    await s.shutdown()


async def test_job_completed_unknown_runner() -> None:
    """Go: TestJobCompletedUnknownRunner."""
    s = make_scaler(FakeClient(), InMemoryProvisioner())
    await s.handle_job_completed(JobCompleted(runner_name="nonexistent-runner", result="succeeded"))
    await s.shutdown()


async def test_job_started_unknown_runner() -> None:
    """Go: TestJobStartedUnknownRunner."""
    s = make_scaler(FakeClient(), InMemoryProvisioner())
    await s.handle_job_started(JobStarted(runner_name="nonexistent-runner"))
    assert s.runners() == []
    await s.shutdown()


async def test_job_completed_during_provisioning() -> None:
    """Go: TestJobCompletedDuringProvisioning. Stop still runs once start returns."""
    client, gate = FakeClient(), asyncio.Event()
    prov = InMemoryProvisioner(start_gate=gate)
    s = make_scaler(client, prov)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: len(prov.events) == 1)
    name = s.runners()[0].name
    await s.handle_job_completed(JobCompleted(runner_name=name, result="succeeded"))
    gate.set()
    await eventually(lambda: s.runners() == [])
    assert prov.stopped == [name]
    await eventually(lambda: client.removed == [1])
    await s.shutdown()


async def test_job_started_during_provisioning() -> None:
    """Go: TestJobStartedDuringProvisioning. RUNNING survives the end of provisioning."""
    client, gate = FakeClient(), asyncio.Event()
    prov = InMemoryProvisioner(start_gate=gate)
    s = make_scaler(client, prov)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: len(prov.events) == 1)
    name = s.runners()[0].name
    await s.handle_job_started(JobStarted(runner_name=name))
    assert phases(s) == [RunnerPhase.RUNNING]
    gate.set()
    await eventually(lambda: prov.started == [name])
    assert phases(s) == [RunnerPhase.RUNNING]
    assert s.runners()[0].started_at is not None
    await s.shutdown()


async def test_shutdown_with_no_runners() -> None:
    """Go: TestShutdownWithNoRunners."""
    s = make_scaler(FakeClient(), InMemoryProvisioner())
    async with asyncio.timeout(1):
        await s.shutdown(timeout=1)


async def test_runner_name_prefix() -> None:
    """Go: TestRunnerNamePrefix. Names are <prefix>-<8 lowercase hex>."""
    client, prov = FakeClient(), InMemoryProvisioner()
    s = make_scaler(client, prov, prefix="my-scale-set")
    await s.handle_desired_runner_count(1)
    (runner,) = s.runners()
    assert re.fullmatch(r"my-scale-set-[0-9a-f]{8}", runner.name)
    assert client.jit_names == [runner.name]
    await s.shutdown()


# Beyond Go ---------------------------------------------------------------------------------


async def test_burst_requests_jit_configs_concurrently_but_bounded() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    client.jit_delay = 0.05
    s = make_scaler(client, prov, max_runners=20, jit_concurrency=8)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await s.handle_desired_runner_count(20) == 20
    # 20 requests of 50 ms in waves of 8 take 3 waves; sequential would take 1 s.
    assert loop.time() - began < 0.6
    assert client.max_in_flight == 8
    assert len(set(client.jit_names)) == 20
    await s.shutdown()


async def test_concurrent_calls_never_overshoot() -> None:
    client, gate = FakeClient(), asyncio.Event()
    client.jit_gate = gate
    s = make_scaler(client, InMemoryProvisioner(), max_runners=5)
    calls = [asyncio.create_task(s.handle_desired_runner_count(n)) for n in (5, 5, 3, 7)]
    await eventually(lambda: client.in_flight == 5)
    gate.set()
    assert await asyncio.gather(*calls) == [5, 5, 5, 5]
    assert len(client.jit_names) == 5
    assert await s.handle_desired_runner_count(5) == 5
    await s.shutdown()


async def test_count_includes_runners_being_added_by_other_calls() -> None:
    client, gate = FakeClient(), asyncio.Event()
    client.jit_gate = gate
    s = make_scaler(client, InMemoryProvisioner())
    first = asyncio.create_task(s.handle_desired_runner_count(2))
    await eventually(lambda: client.in_flight == 2)
    assert await s.handle_desired_runner_count(1) == 2
    gate.set()
    assert await first == 2
    await s.shutdown()


async def test_partial_jit_failure_keeps_the_runners_that_registered() -> None:
    """Beyond Go, where a JIT error is returned from HandleDesiredRunnerCount (see
    TestJitConfigError) and stops the listener: here the failed slot alone is lost, without an
    exception (a failed JIT must never end the message session, issue 9). The two others are
    tracked, the next call fills the slot, and the registration the lost answer left behind at
    GitHub is found by name and removed in the background."""
    client, prov = FakeClient(), InMemoryProvisioner()
    calls = 0
    real = client.generate_jit_runner_config

    async def flaky(setting: JitRunnerSetting, scale_set_id: int) -> JitRunnerConfig:
        nonlocal calls
        calls += 1
        if calls == 2:
            client.lose_jit_answers = 1  # registered at GitHub, but the answer never arrives
        return await real(setting, scale_set_id)

    client.generate_jit_runner_config = flaky  # type: ignore[method-assign]
    s = make_scaler(client, prov)
    assert await s.handle_desired_runner_count(3) == 2
    assert len(s.runners()) == 2
    lost = next(name for name in client.jit_names if name not in {r.name for r in s.runners()})
    lost_id = dict(zip(client.jit_names, range(1, 4), strict=True))[lost]
    await eventually(lambda: s.pending_deregistrations() == [])
    assert client.lookups == [lost]
    assert client.removed == [lost_id]
    assert await s.handle_desired_runner_count(3) == 3
    await s.shutdown()
    assert sorted(client.removed) == [1, 2, 3, 4]


async def test_shutdown_while_jit_in_flight_deregisters_and_starts_nothing() -> None:
    client, gate = FakeClient(), asyncio.Event()
    client.jit_gate = gate
    prov = InMemoryProvisioner()
    s = make_scaler(client, prov, jit_settle=0.1, retry_first=0.02)
    # The real Scaler: the call returns while the JIT requests are in flight.
    assert await Scaler.handle_desired_runner_count(s, 2) == 2
    await eventually(lambda: client.in_flight == 2)
    await s.shutdown()
    gate.set()
    assert client.in_flight == 0  # cancelled
    # GitHub may have registered them before the cancellation, or do it a moment later: both
    # are looked up by name until jit_settle has passed.
    assert len(set(client.lookups)) == 2
    assert s.pending_deregistrations() == []
    assert prov.events == []
    assert await s.handle_desired_runner_count(5) == 0


async def test_shutdown_stops_idle_and_running_runners() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    s = make_scaler(client, prov)
    await s.handle_desired_runner_count(2)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 2)
    await s.handle_job_started(JobStarted(runner_name=s.runners()[0].name))
    await s.shutdown()
    assert s.runners() == []
    assert len(prov.stopped) == 2
    assert prov.environments == {}
    assert sorted(client.removed) == [1, 2]


async def test_stop_failure_is_retried_then_still_deregisters() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    attempts: list[str] = []

    async def failing_stop(name: str) -> None:
        attempts.append(name)
        raise RuntimeError("daemon gone")

    prov.stop = failing_stop  # type: ignore[method-assign]
    s = make_scaler(client, prov, retry_first=0.01)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    name = s.runners()[0].name
    await s.handle_job_completed(JobCompleted(runner_name=name))
    await eventually(lambda: s.runners() == [])
    await eventually(lambda: client.removed == [1])
    assert attempts == [name] * 3
    await s.shutdown()


async def test_a_stop_that_fails_once_is_retried_and_succeeds() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    real_stop = prov.stop
    failures = [RuntimeError("engine hiccup")]

    async def flaky_stop(name: str) -> None:
        if failures:
            raise failures.pop()
        await real_stop(name)

    prov.stop = flaky_stop  # type: ignore[method-assign]
    s = make_scaler(client, prov, retry_first=0.01)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    await s.handle_job_completed(JobCompleted(runner_name=s.runners()[0].name))
    await eventually(lambda: s.runners() == [])
    assert prov.environments == {}
    await s.shutdown()


async def test_a_start_that_hangs_past_its_timeout_is_a_failed_start() -> None:
    client, gate = FakeClient(), asyncio.Event()
    prov = InMemoryProvisioner(start_gate=gate)  # never opened: the start hangs
    s = make_scaler(client, prov, start_timeout=0.1)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: s.runners() == [])
    backoff = s.start_backoff()
    assert backoff is not None
    assert "did not finish within 0.1 s" in backoff.last_error
    assert [verb for verb, _ in prov.events] == ["start", "start-failed"]
    await eventually(lambda: client.removed == [1])
    await s.shutdown()


async def test_stop_timeout_is_bounded_and_still_deregisters() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()

    async def hanging_stop(name: str) -> None:
        await asyncio.Event().wait()

    prov.stop = hanging_stop  # type: ignore[method-assign]
    s = make_scaler(client, prov, stop_timeout=0.05)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    await s.handle_job_completed(JobCompleted(runner_name=s.runners()[0].name))
    await eventually(lambda: s.runners() == [])
    await eventually(lambda: client.removed == [1])
    await s.shutdown()


async def test_runner_already_gone_at_github_is_not_a_failure() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    client.remove_error = RunnerNotFoundError("runner not found")
    s = make_scaler(client, prov)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    await s.handle_job_completed(JobCompleted(runner_name=s.runners()[0].name))
    await eventually(lambda: s.runners() == [])
    await eventually(lambda: client.removed == [1])
    await s.shutdown()


async def test_shutdown_timeout_cancels_stuck_lifecycles() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    stop_cancelled = asyncio.Event()

    async def hanging_stop(name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stop_cancelled.set()
            raise

    prov.stop = hanging_stop  # type: ignore[method-assign]
    s = make_scaler(client, prov)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    async with asyncio.timeout(2):
        await s.shutdown(timeout=0.1)
    assert stop_cancelled.is_set()
    assert s.runners() == []


async def test_phase_observer_sees_every_transition() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    seen: list[tuple[str, RunnerPhase | None]] = []

    def observe(name: str, snap: RunnerSnapshot | None) -> None:
        seen.append((name, None if snap is None else snap.phase))

    s = make_scaler(client, prov, on_phase_change=observe)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    name = s.runners()[0].name
    await s.handle_job_started(JobStarted(runner_name=name))
    await s.handle_job_completed(JobCompleted(runner_name=name))
    await eventually(lambda: s.runners() == [])
    assert [phase for _, phase in seen] == [
        RunnerPhase.PROVISIONING,
        RunnerPhase.IDLE,
        RunnerPhase.RUNNING,
        RunnerPhase.STOPPING,
        None,
    ]
    assert {n for n, _ in seen} == {name}
    await s.shutdown()


async def test_provisioner_receives_the_jit_config_and_runner_entry() -> None:
    client = FakeClient()
    requests: list[RunnerRequest] = []

    async def workload(request: RunnerRequest) -> None:
        requests.append(request)

    s = make_scaler(client, InMemoryProvisioner(workload=workload))
    await s.handle_desired_runner_count(1)
    await eventually(lambda: len(requests) == 1)
    assert requests[0].jit_config == "test-jit-config"
    assert requests[0].runner is RUNNER
    assert "test-jit-config" not in repr(requests[0])
    await s.shutdown()


async def test_max_runners_can_change_at_run_time() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    s = make_scaler(client, prov, max_runners=1)
    assert await s.handle_desired_runner_count(3) == 1
    s.max_runners = 3
    assert await s.handle_desired_runner_count(3) == 3
    with pytest.raises(ValueError, match="max_runners"):
        s.max_runners = -1
    await s.shutdown()


def test_negative_max_runners_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_runners"):
        make_scaler(FakeClient(), InMemoryProvisioner(), max_runners=-1)


async def test_environment_that_dies_is_stopped_and_deregistered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = FakeClient()

    async def crashes(request: RunnerRequest) -> None:
        return None  # the runner process ends at once, without ever taking a job

    prov = InMemoryProvisioner(workload=crashes)
    caplog.set_level(logging.INFO, logger="outrunner")
    s = make_scaler(client, prov, watch_interval=0.02)
    await s.handle_desired_runner_count(1)
    name = s.runners()[0].name
    await eventually(lambda: s.runners() == [])
    assert prov.stopped == [name]
    await eventually(lambda: client.removed == [1])
    ended = [r for r in caplog.records if r.getMessage().startswith("Runner environment")]
    assert [(r.levelno, r.getMessage()) for r in ended] == [
        (logging.WARNING, "Runner environment ended without running a job")
    ]
    # The freed slot is filled again on the next demand signal.
    assert await s.handle_desired_runner_count(1) == 1
    await s.shutdown()


async def test_job_completed_just_after_the_environment_ended_is_not_a_death(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A runner exits right after its job, a moment before GitHub's JobCompleted arrives: the
    exit ends it (logged at info, it ran a job), and the late message is harmless."""
    client, gate = FakeClient(), asyncio.Event()

    async def finishes(request: RunnerRequest) -> None:
        await gate.wait()

    prov = InMemoryProvisioner(workload=finishes)
    caplog.set_level(logging.INFO, logger="outrunner")
    s = make_scaler(client, prov, watch_interval=0.2)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    name = s.runners()[0].name
    await s.handle_job_started(JobStarted(runner_name=name))
    gate.set()  # the runner process ends after its job ...
    await eventually(lambda: s.runners() == [])
    await s.handle_job_completed(JobCompleted(runner_name=name, result="succeeded"))  # ... then
    await eventually(lambda: s.pending_deregistrations() == [])
    assert "Runner environment ended without running a job" not in caplog.messages
    (stopping,) = [r for r in caplog.records if r.getMessage() == "Stopping runner"]
    assert stopping.levelno == logging.INFO
    assert stopping.attrs["reason"] == "environment exited"  # type: ignore[attr-defined]
    assert prov.stopped == [name]
    assert client.removed == [1]
    await s.shutdown()


async def test_the_stopping_line_says_what_ended_the_runner(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = FakeClient()
    prov = InMemoryProvisioner()
    caplog.set_level(logging.INFO, logger="outrunner")
    s = make_scaler(client, prov)
    await s.handle_desired_runner_count(2)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 2)
    busy, idle = (r.name for r in s.runners())
    await s.handle_job_started(JobStarted(runner_name=busy))
    await s.handle_job_completed(JobCompleted(runner_name=busy, result="succeeded"))
    await eventually(lambda: [r.name for r in s.runners()] == [idle])
    s.drain()  # the idle one is released
    await eventually(lambda: s.runners() == [])
    reasons = {
        r.attrs["name"]: r.attrs["reason"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "Stopping runner"
    }
    assert reasons == {busy: "job completed", idle: "released"}
    await s.shutdown()


async def test_a_burst_never_holds_up_the_caller() -> None:
    """The listener's next poll is not held up by a burst's JIT requests: the call returns with
    the slots reserved while the requests are in flight (at most jit_concurrency at a time)."""
    client, gate = FakeClient(), asyncio.Event()
    client.jit_gate = gate
    s = Scaler(
        client,
        scale_set_id=1,
        max_runners=20,
        name_prefix="test",
        runner=RUNNER,
        provisioner=InMemoryProvisioner(),
        jit_concurrency=4,
    )
    async with asyncio.timeout(1):
        assert await s.handle_desired_runner_count(10) == 10
    await eventually(lambda: client.in_flight == 4)
    # A second signal while they are in flight counts them: nothing more is requested.
    assert await s.handle_desired_runner_count(10) == 10
    gate.set()
    await s.settled()
    assert len(client.jit_names) == 10
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 10)
    await s.shutdown()


def hold_stops(prov: InMemoryProvisioner) -> asyncio.Event:
    """Make every stop of ``prov`` wait until the returned event is set."""
    release, real_stop = asyncio.Event(), prov.stop

    async def held_stop(name: str) -> None:
        await release.wait()
        await real_stop(name)

    prov.stop = held_stop  # type: ignore[method-assign]
    return release


async def two_running(s: Scaler) -> tuple[str, str]:
    """Two runners, each with a job; their names."""
    await s.handle_desired_runner_count(2)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 2)
    first, second = (r.name for r in s.runners())
    for name in (first, second):
        await s.handle_job_started(JobStarted(runner_name=name))
    return first, second


async def test_stopping_runners_do_not_hold_up_demand() -> None:
    """A runner that is stopping takes no job: a new job gets a new runner at once where
    max_runners leaves room, and as soon as the stop finishes where it does not."""
    client, prov = FakeClient(), InMemoryProvisioner()
    release = hold_stops(prov)
    s = make_scaler(client, prov, max_runners=2)
    first, _ = await two_running(s)
    await s.handle_job_completed(JobCompleted(runner_name=first, result="succeeded"))
    await eventually(lambda: RunnerPhase.STOPPING in phases(s))
    # A new job is assigned (2 assigned: the running one and the new one). The stopping
    # environment still counts against max_runners: no room yet.
    assert await s.handle_desired_runner_count(2) == 2
    assert len(client.jit_names) == 2
    release.set()
    # The stop finishes and the waiting demand is met without another message from GitHub.
    await eventually(lambda: len(client.jit_names) == 3)
    await eventually(lambda: sorted(phases(s)) == [RunnerPhase.IDLE, RunnerPhase.RUNNING])
    await s.shutdown()


async def test_a_stopping_runner_does_not_count_as_available() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    release = hold_stops(prov)
    s = make_scaler(client, prov, max_runners=3)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    (name,) = (r.name for r in s.runners())
    await s.handle_job_started(JobStarted(runner_name=name))
    await s.handle_job_completed(JobCompleted(runner_name=name, result="succeeded"))
    await eventually(lambda: phases(s) == [RunnerPhase.STOPPING])
    # The next job: room under max_runners, so its runner starts now, not after the stop.
    assert await s.handle_desired_runner_count(1) == 2
    assert len(client.jit_names) == 2
    release.set()
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    await s.shutdown()


async def test_a_runner_gone_before_its_job_completed_message_still_counts() -> None:
    """A runner's environment can end (its job done) and the runner be gone before the message
    with its JobCompleted arrives; until then GitHub's statistics may still count its job, so
    the demand signal must not start a runner for it (it would only idle)."""
    client, prov = FakeClient(), InMemoryProvisioner()
    s = make_scaler(client, prov, max_runners=2)
    first, second = await two_running(s)
    prov.environments[first].end()  # the job is done, its message not yet here
    await eventually(lambda: [r.name for r in s.runners()] == [second])
    # Statistics from before the JobCompleted: still 2 assigned jobs, both with runners.
    assert await s.handle_desired_runner_count(2) == 1
    assert len(client.jit_names) == 2
    # The message arrives: one job left, which has its runner.
    await s.handle_job_completed(JobCompleted(runner_name=first, result="succeeded"))
    assert await s.handle_desired_runner_count(1) == 1
    assert len(client.jit_names) == 2
    # A new job now gets a runner.
    assert await s.handle_desired_runner_count(2) == 2
    assert len(client.jit_names) == 3
    await s.shutdown()
