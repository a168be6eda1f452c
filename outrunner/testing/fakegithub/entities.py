"""The fake's internal records: mutable, guarded by the state lock, never handed to users.

Users get the frozen snapshots of ``model`` instead; these records hold secrets (tokens, JIT
credentials) and change under the lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from outrunner.testing.fakegithub.model import JobState


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime | None) -> str | None:
    return None if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, kw_only=True)
class Settings:
    long_poll_timeout: float
    admin_token_ttl: float
    queue_token_ttl: float
    pat: str | None = field(repr=False)
    acquire_mode: bool
    owner: str
    repo: str | None
    remove_agent_on_completion: bool
    message_queue_query: str | None
    app_client_id: str | None
    app_installation_id: int | None
    session_idle_timeout: float | None = None
    installation_token_ttl: float = 3600.0


@dataclass(kw_only=True)
class Group:
    id: int
    name: str
    is_default: bool


@dataclass(kw_only=True)
class Envelope:
    id: int
    jobs: list[dict[str, Any]] = field(default_factory=list)
    # Once delivered (or full) an envelope never changes, so a redelivery is byte-identical
    # apart from the statistics, which are always current.
    sealed: bool = False


@dataclass(kw_only=True)
class ScaleSetRecord:
    id: int
    name: str
    group_id: int
    labels: list[tuple[str, str]]  # (name, type)
    disable_update: bool
    created_on: datetime
    # The queue belongs to the scale set, not to a session: messages emitted while no session is
    # open (a listener restarting) are delivered to the next session.
    queue: list[Envelope] = field(default_factory=list)
    last_message_id: int = 0


@dataclass(kw_only=True)
class SessionRecord:
    id: str
    scale_set_id: int
    owner: str
    token: str = field(repr=False)
    token_expires: float
    capacity: int | None = None
    polled: bool = False
    polls: int = 0
    # Idle-expiry bookkeeping (Settings.session_idle_timeout): message GETs being held right now,
    # and when the session last stopped polling (creation, or the end of its last GET), on the
    # time.monotonic() clock.
    open_polls: int = 0
    idle_since: float = field(default_factory=time.monotonic)


@dataclass(kw_only=True)
class JobRecord:
    request_id: int
    job_id: str
    labels: tuple[str, ...]
    duration: float
    planned_result: str
    repository: str
    owner: str
    workflow: str
    display_name: str
    workflow_run_id: int
    event_name: str
    queue_time: datetime
    state: JobState = JobState.QUEUED
    scale_set_id: int | None = None
    runner_id: int | None = None
    runner_name: str | None = None
    result: str | None = None
    acquired: bool = False
    scale_set_assign_time: datetime | None = None
    runner_assign_time: datetime | None = None
    finish_time: datetime | None = None


@dataclass(kw_only=True)
class AgentRecord:
    id: int
    name: str
    scale_set_id: int
    credential: str = field(repr=False)
    connected: bool = False
    job: JobRecord | None = None  # the job it took, kept after completion for inspection
    spent: bool = False  # took a job: the one-time JIT credential cannot connect again...
    session: str = ""  # ...but from the agent run that took it (its connects' "session" field)
    finished: bool = False
    removed: bool = False


@dataclass(frozen=True, kw_only=True)
class AgentJob:
    """What a connecting agent is told to do; rendered as ``key=value`` lines."""

    job_id: str
    runner_request_id: int
    runner_id: int
    runner_name: str
    duration: float
    result: str
    display_name: str

    def lines(self) -> str:
        # Newlines would break the line protocol; the display name is the only free text.
        display = self.display_name.replace("\r", " ").replace("\n", " ")
        return (
            f"job_id={self.job_id}\n"
            f"runner_request_id={self.runner_request_id}\n"
            f"runner_id={self.runner_id}\n"
            f"runner_name={self.runner_name}\n"
            f"duration={self.duration:g}\n"
            f"result={self.result}\n"
            f"display_name={display}\n"
        )
