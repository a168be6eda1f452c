"""Warm pools (``min_runners``) and runner lifetimes (``max_lifetime``, ``idle_timeout``).

The Scaler's ages come from an injected clock, which these tests move forward by hand; the
reaper checks every few milliseconds here, so nothing waits for real minutes to pass.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from outrunner.runner import RunnerPhase
from outrunner.scaler import PHANTOM_REAPS, Scaler
from outrunner.scaleset.types import JobCompleted, JobStarted
from outrunner.testing.memory import InMemoryProvisioner
from tests.test_scaler import FakeClient, eventually, phases
from tests.test_scaler_reliability import fast_scaler, messages

pytestmark = pytest.mark.anyio


class FakeClock:
    """Wall time that moves only when told to (the Scaler measures runner ages with it)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


def pool_scaler(
    client: FakeClient, prov: InMemoryProvisioner, clock: FakeClock, **kwargs: Any
) -> tuple[Scaler, list[tuple[str, str]]]:
    reaps: list[tuple[str, str]] = []
    scaler = fast_scaler(
        client,
        prov,
        clock=clock,
        reap_interval=0.005,
        on_reap=lambda name, reason: reaps.append((name, reason)),
        **kwargs,
    )
    return scaler, reaps


# ---------------------------------------------------------------------------------------------
# Warm pool


async def test_min_runners_wait_idle_and_are_refilled_as_they_take_jobs() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    s = fast_scaler(client, prov, max_runners=5, min_runners=2)
    # No job assigned: the pool alone.
    assert await s.handle_desired_runner_count(0) == 2
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 2)
    first = s.runners()[0].name
    # A job lands on a warm runner; GitHub's next statistics count it: the pool is refilled.
    await s.handle_job_started(JobStarted(runner_name=first))
    assert await s.handle_desired_runner_count(1) == 3
    await eventually(
        lambda: sorted(phases(s)) == sorted([RunnerPhase.RUNNING] + [RunnerPhase.IDLE] * 2)
    )
    # A burst beyond max_runners: capped.
    assert await s.handle_desired_runner_count(10) == 5
    # The job ends: its runner goes; the pool stays (ephemeral runners are never reused).
    await s.handle_job_completed(JobCompleted(runner_name=first, result="succeeded"))
    await eventually(lambda: first not in [r.name for r in s.runners()])
    assert len(s.runners()) == 4
    await s.shutdown(5)


@pytest.mark.parametrize(
    ("assigned", "min_runners", "max_runners", "expected"),
    [(0, 0, 4, 0), (0, 3, 4, 3), (2, 3, 4, 4), (3, 1, 10, 4), (0, 5, 2, 2)],
)
async def test_desired_count_is_assigned_plus_min_capped_by_max(
    assigned: int, min_runners: int, max_runners: int, expected: int
) -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    s = fast_scaler(client, prov, max_runners=max_runners, min_runners=min_runners)
    assert await s.handle_desired_runner_count(assigned) == expected
    assert len(client.jit_names) == expected
    await s.shutdown(5)


async def test_draining_does_not_refill_the_pool() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    s = fast_scaler(client, prov, max_runners=5, min_runners=2)
    await s.handle_desired_runner_count(0)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 2)
    s.drain()
    await eventually(lambda: s.runners() == [])
    assert await s.handle_desired_runner_count(0) == 0
    assert len(client.jit_names) == 2
    await s.shutdown(5)


async def test_min_runners_can_change_at_run_time() -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    s = fast_scaler(client, prov, max_runners=5, min_runners=1)
    assert await s.handle_desired_runner_count(0) == 1
    s.min_runners = 3
    assert await s.handle_desired_runner_count(0) == 3
    with pytest.raises(ValueError, match="min_runners must be >= 0"):
        s.min_runners = -1
    await s.shutdown(5)


# ---------------------------------------------------------------------------------------------
# Lifetimes


async def test_an_idle_runner_past_idle_timeout_is_released_and_replaced() -> None:
    client, prov, clock = FakeClient(), InMemoryProvisioner(), FakeClock()
    s, reaps = pool_scaler(client, prov, clock, max_runners=3, min_runners=1, idle_timeout=600)
    await s.handle_desired_runner_count(0)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    stale = s.runners()[0].name
    clock.advance(599)
    await asyncio.sleep(0.05)  # ten reaper rounds
    assert [r.name for r in s.runners()] == [stale]
    clock.advance(2)
    # Deregistered first (no job can land on it), then stopped; a fresh one takes its place
    # without waiting for another message from GitHub.
    await eventually(lambda: reaps == [(stale, "idle_timeout")])
    await eventually(lambda: len(s.runners()) == 1 and s.runners()[0].name != stale)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    assert client.registered.get(stale) is None
    assert ("stop", stale) in prov.events
    await s.shutdown(5)


async def test_a_busy_runner_is_never_reaped_for_idleness() -> None:
    client, prov, clock = FakeClient(), InMemoryProvisioner(), FakeClock()
    s, reaps = pool_scaler(client, prov, clock, idle_timeout=60)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    name = s.runners()[0].name
    await s.handle_job_started(JobStarted(runner_name=name))
    clock.advance(3600)
    await asyncio.sleep(0.1)  # twenty reaper rounds
    assert phases(s) == [RunnerPhase.RUNNING]
    assert reaps == []
    await s.shutdown(5)


async def test_an_idle_runner_that_took_a_job_meanwhile_is_kept() -> None:
    """GitHub answers the release with 409 (the job landed just now): the runner stays."""
    client, prov, clock = FakeClient(), InMemoryProvisioner(), FakeClock()
    s, reaps = pool_scaler(client, prov, clock, idle_timeout=60)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    name = s.runners()[0].name
    client.busy.add(client.registered[name])
    clock.advance(61)
    await eventually(lambda: reaps == [(name, "idle_timeout")])
    await eventually(lambda: phases(s) == [RunnerPhase.RUNNING])
    assert ("stop", name) not in prov.events
    await s.shutdown(5)


async def test_max_lifetime_stops_idle_and_busy_runners(caplog: pytest.LogCaptureFixture) -> None:
    client, prov, clock = FakeClient(), InMemoryProvisioner(), FakeClock()
    s, reaps = pool_scaler(client, prov, clock, max_lifetime=3600)
    await s.handle_desired_runner_count(2)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 2)
    idle, busy = (r.name for r in s.runners())
    await s.handle_job_started(JobStarted(runner_name=busy))
    with caplog.at_level(logging.INFO, logger="outrunner"):
        clock.advance(3600)
        # Both end; two fresh runners (whose lifetimes start now) replace them.
        await eventually(lambda: not {idle, busy} & {r.name for r in s.runners()})
        await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 2)
    assert sorted(reaps) == sorted([(idle, "max_lifetime"), (busy, "max_lifetime")])
    assert {("stop", idle), ("stop", busy)} <= set(prov.events)
    over = messages(caplog, "Runner is over its max_lifetime while running a job; stopping it")
    assert [r.attrs["name"] for r in over] == [busy]  # type: ignore[attr-defined]
    await s.shutdown(5)


async def test_idle_reaps_while_github_reports_assigned_jobs_are_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Phantom jobs: GitHub keeps reporting 2 assigned jobs that no runner ever receives."""
    client, prov, clock = FakeClient(), InMemoryProvisioner(), FakeClock()
    s, reaps = pool_scaler(client, prov, clock, max_runners=2, idle_timeout=60)
    text = (
        "Idle runners keep being reaped while GitHub reports assigned jobs; its job count may "
        "be inflated (jobs that no longer exist)"
    )
    with caplog.at_level(logging.INFO, logger="outrunner"):
        await s.handle_desired_runner_count(2)
        for _ in range(2):  # each round reaps both idle runners, which are replaced
            await eventually(
                lambda: (
                    phases(s) == [RunnerPhase.IDLE] * 2
                    and not {r.name for r in s.runners()} & {name for name, _ in reaps}
                )
            )
            expected = len(reaps) + 2
            clock.advance(61)
            await eventually(lambda: len(reaps) == expected)  # noqa: B023 (awaited here)
        await eventually(lambda: len(messages(caplog, text)) == 1)
    (warning,) = messages(caplog, text)
    assert warning.attrs["assigned_jobs"] == 2  # type: ignore[attr-defined]
    assert len(reaps) >= PHANTOM_REAPS
    await s.shutdown(5)


@pytest.mark.parametrize("key", ["max_lifetime", "idle_timeout"])
async def test_lifetimes_must_be_positive(key: str) -> None:
    with pytest.raises(ValueError, match=f"{key} must be more than 0 seconds"):
        fast_scaler(FakeClient(), InMemoryProvisioner(), **{key: 0})


async def test_lifetimes_and_pool_change_at_run_time() -> None:
    """What a reload applies: a new idle_timeout reaps runners already tracked, and a larger
    min_runners fills the pool at once (rebalance), without a message from GitHub."""
    client, prov, clock = FakeClient(), InMemoryProvisioner(), FakeClock()
    s, reaps = pool_scaler(client, prov, clock, max_runners=4)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    (old,) = (r.name for r in s.runners())
    s.min_runners = 2
    s.rebalance()
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 3)
    s.set_lifetimes(None, 30)
    clock.advance(31)
    await eventually(lambda: (old, "idle_timeout") in reaps)
    with pytest.raises(ValueError, match="idle_timeout must be more than 0 seconds"):
        s.set_lifetimes(None, 0)
    await s.shutdown(5)
