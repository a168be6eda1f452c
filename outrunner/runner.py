"""The state of one runner as the Scaler tracks it, and the read-only snapshot it hands out."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from outrunner._aio import Signal

__all__ = ["RunnerPhase", "RunnerSnapshot", "RunnerState"]


class RunnerPhase(StrEnum):
    """Where a runner is in its lifecycle; ``str()`` gives the lower-case name used in logs."""

    PROVISIONING = "provisioning"
    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, kw_only=True)
class RunnerSnapshot:
    """A point-in-time copy of a runner's state; safe to keep and compare."""

    name: str
    runner_id: int
    phase: RunnerPhase
    created_at: datetime
    started_at: datetime | None = None
    adopted: bool = False
    """Started by an earlier outrunner process and taken over after a restart."""


@dataclass(kw_only=True)
class RunnerState:
    """Mutable bookkeeping of one runner; owned by the Scaler, mutated only on the event loop."""

    name: str
    runner_id: int
    phase: RunnerPhase = RunnerPhase.PROVISIONING
    created_at: datetime = field(default_factory=_now)
    started_at: datetime | None = None
    adopted: bool = False
    release_tried: bool = field(default=False, repr=False)
    """Draining already tried to deregister it while it had no job (the Scaler's bookkeeping)."""
    reaped: bool = field(default=False, repr=False)
    """Ended for its age (``max_lifetime`` / ``idle_timeout``); a replacement follows."""
    _done: Signal = field(default_factory=Signal, repr=False)
    _release: Signal = field(default_factory=Signal, repr=False)

    def signal_done(self) -> None:
        """Tell the lifecycle that the job finished. Safe to call any number of times."""
        self._done.set()

    @property
    def is_done(self) -> bool:
        return self._done.is_set()

    @property
    def done_signal(self) -> Signal:
        """Set by :meth:`signal_done`; its waiter lets the Scaler wait without a task."""
        return self._done

    async def wait_done(self) -> None:
        await self._done.wait()

    def request_release(self) -> None:
        """Ask the lifecycle to release the runner if it has no job (as draining does)."""
        self._release.set()

    @property
    def release_signal(self) -> Signal:
        """Set by :meth:`request_release`."""
        return self._release

    async def wait_release(self) -> None:
        await self._release.wait()

    def snapshot(self) -> RunnerSnapshot:
        return RunnerSnapshot(
            name=self.name,
            runner_id=self.runner_id,
            phase=self.phase,
            created_at=self.created_at,
            started_at=self.started_at,
            adopted=self.adopted,
        )
