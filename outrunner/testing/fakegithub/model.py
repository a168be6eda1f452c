"""Read-only snapshots of the fake's state, returned by the inspection methods of ``FakeGitHub``.

Snapshots never hold secrets (tokens, JIT credentials), so they are safe to print in test output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from outrunner.testing.fakegithub.endpoints import Endpoint


class JobState(StrEnum):
    """Where a queued job is in the fake's state machine.

    ``queued`` -> (``available`` -> acquirejobs ->) ``assigned`` -> ``running`` -> ``completed``.
    Acquisition assigns at once, so there is no separate "acquired" state: see ``JobInfo.acquired``.
    """

    QUEUED = "queued"
    AVAILABLE = "available"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"


class RunnerStatus(StrEnum):
    """A registered (JIT) runner agent's status."""

    OFFLINE = "offline"  # registered by generatejitconfig, never connected
    IDLE = "idle"  # connected, waiting for a job
    BUSY = "busy"  # running a job
    FINISHED = "finished"  # job done; only seen when remove_agent_on_completion=False


@dataclass(frozen=True, kw_only=True)
class Statistics:
    """A scale set's ``statistics`` object; field names are the snake_case JSON keys."""

    total_available_jobs: int = 0
    total_acquired_jobs: int = 0
    total_assigned_jobs: int = 0
    total_running_jobs: int = 0
    total_registered_runners: int = 0
    total_busy_runners: int = 0
    total_idle_runners: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "totalAvailableJobs": self.total_available_jobs,
            "totalAcquiredJobs": self.total_acquired_jobs,
            "totalAssignedJobs": self.total_assigned_jobs,
            "totalRunningJobs": self.total_running_jobs,
            "totalRegisteredRunners": self.total_registered_runners,
            "totalBusyRunners": self.total_busy_runners,
            "totalIdleRunners": self.total_idle_runners,
        }


@dataclass(frozen=True, kw_only=True)
class JobInfo:
    """A job queued with ``FakeGitHub.queue_job``; ``id`` is its ``runnerRequestId``."""

    id: int
    job_id: str
    state: JobState
    labels: tuple[str, ...]
    scale_set_id: int | None
    runner_id: int | None
    runner_name: str | None
    result: str | None  # the reported result once completed, else None
    planned_result: str  # what the agent is told to report
    duration: float
    display_name: str
    repository: str
    workflow: str
    workflow_run_id: int
    acquired: bool  # went through acquirejobs (acquire mode)
    queue_time: datetime
    finish_time: datetime | None


@dataclass(frozen=True, kw_only=True)
class RunnerInfo:
    """A runner agent registered through generatejitconfig."""

    id: int
    name: str
    scale_set_id: int
    status: RunnerStatus
    job: int | None  # runnerRequestId of the job it runs or ran


@dataclass(frozen=True, kw_only=True)
class ScaleSetInfo:
    id: int
    name: str
    runner_group_id: int
    runner_group_name: str
    labels: tuple[str, ...]
    disable_update: bool
    created_on: datetime


@dataclass(frozen=True, kw_only=True)
class SessionInfo:
    session_id: str
    scale_set_id: int
    owner_name: str
    message_queue_url: str
    max_capacity: int | None  # last X-ScaleSetMaxCapacity; None before the first poll
    polls: int


@dataclass(frozen=True, kw_only=True)
class RecordedRequest:
    """One request the fake received. Secrets are never stored: only the auth *scheme* and
    whether the credential was accepted (None when the route never looked at it)."""

    endpoint: Endpoint | None  # None: no route matched
    method: str
    path: str
    query: dict[str, str]
    auth_scheme: str | None
    auth_valid: bool | None
    headers: dict[str, str] = field(default_factory=dict)  # see RECORDED_HEADERS
    json: Any = None  # parsed JSON body (form fields for agent routes), None when empty
    status: int | None = None  # None: connection dropped without an answer
    # "fail", "delay" or "drop" when an injected fault applied; "outage" when an outage answered
    # it (before or, for long polls and delays, while it was being handled).
    fault: str | None = None


# Request headers worth asserting on in client tests; nothing secret is among them.
RECORDED_HEADERS = ("Accept", "Content-Type", "User-Agent", "X-ScaleSetMaxCapacity")
