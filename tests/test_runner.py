"""Runner state tests: every case of gha-outrunner's runner_test.go."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from outrunner.runner import RunnerPhase, RunnerSnapshot, RunnerState


@pytest.mark.parametrize(
    ("phase", "want"),
    [
        (RunnerPhase.PROVISIONING, "provisioning"),
        (RunnerPhase.IDLE, "idle"),
        (RunnerPhase.RUNNING, "running"),
        (RunnerPhase.STOPPING, "stopping"),
    ],
)
def test_runner_phase_string(phase: RunnerPhase, want: str) -> None:
    """Go: TestRunnerPhaseString."""
    assert str(phase) == want
    assert f"{phase}" == want


def test_unknown_phase_is_rejected() -> None:
    """Go: TestRunnerPhaseString's unknown(99) case; an enum cannot hold it, so it fails loudly."""
    with pytest.raises(ValueError, match="'bogus' is not a valid RunnerPhase"):
        RunnerPhase("bogus")


@pytest.mark.anyio
async def test_signal_done_idempotent() -> None:
    """Go: TestSignalDoneIdempotent."""
    state = RunnerState(name="r", runner_id=1)
    seen = [state.is_done]
    state.signal_done()
    seen.append(state.is_done)
    state.signal_done()
    seen.append(state.is_done)
    assert seen == [False, True, True]


@pytest.mark.anyio
async def test_signal_done_unblocks() -> None:
    """Go: TestSignalDoneUnblocks."""
    state = RunnerState(name="r", runner_id=1)
    waiter = asyncio.create_task(state.wait_done())
    await asyncio.sleep(0)
    assert not waiter.done()
    state.signal_done()
    async with asyncio.timeout(1):
        await waiter


def test_snapshot_is_a_frozen_copy() -> None:
    state = RunnerState(name="r", runner_id=7)
    snap = state.snapshot()
    state.phase = RunnerPhase.RUNNING
    state.started_at = datetime.now(UTC)
    assert snap == RunnerSnapshot(
        name="r", runner_id=7, phase=RunnerPhase.PROVISIONING, created_at=state.created_at
    )
    with pytest.raises(AttributeError):
        snap.phase = RunnerPhase.IDLE  # type: ignore[misc]
