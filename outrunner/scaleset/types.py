"""Typed shapes of the scale set API's JSON (``docs/protocol.md`` §3.2, §4.2, §4.3).

Field names are the snake_case form of the JSON keys; the JSON key is noted where the mapping is not
mechanical. Parsing from and rendering to JSON lives in ``outrunner.scaleset._json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

DEFAULT_RUNNER_GROUP = "default"
DEFAULT_RUNNER_GROUP_ID = 1
"""The id of the default runner group, under whatever name an organization gave it; both Go
references use it without asking (docs/protocol.md §3.8)."""
NIL_SESSION_ID = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True, kw_only=True)
class Label:
    name: str
    type: str = "System"


@dataclass(frozen=True, kw_only=True)
class RunnerSetting:
    disable_update: bool = False


@dataclass(frozen=True, kw_only=True)
class RunnerScaleSetStatistic:
    total_available_jobs: int = 0
    total_acquired_jobs: int = 0
    total_assigned_jobs: int = 0
    total_running_jobs: int = 0
    total_registered_runners: int = 0
    total_busy_runners: int = 0
    total_idle_runners: int = 0


@dataclass(frozen=True, kw_only=True)
class RunnerScaleSet:
    id: int = 0
    name: str = ""
    runner_group_id: int = 0
    runner_group_name: str = ""
    labels: tuple[Label, ...] = ()
    runner_setting: RunnerSetting = field(default_factory=RunnerSetting)  # JSON "RunnerSetting"
    created_on: datetime | None = None
    runner_jit_config_url: str = ""
    statistics: RunnerScaleSetStatistic | None = None


@dataclass(frozen=True, kw_only=True)
class RunnerGroup:
    id: int
    name: str
    size: int = 0
    is_default_group: bool = False


@dataclass(frozen=True, kw_only=True)
class RunnerReference:
    id: int
    name: str
    runner_scale_set_id: int = 0


@dataclass(frozen=True, kw_only=True)
class JitRunnerSetting:
    name: str
    work_folder: str = ""


@dataclass(frozen=True, kw_only=True)
class JitRunnerConfig:
    runner: RunnerReference
    encoded_jit_config: str  # JSON "encodedJITConfig"

    def __repr__(self) -> str:
        # The encoded config is a credential: keep it out of reprs that end up in logs.
        return f"JitRunnerConfig(runner={self.runner!r}, encoded_jit_config=<redacted>)"


@dataclass(frozen=True, kw_only=True)
class RunnerScaleSetSession:
    session_id: str
    owner_name: str = ""
    runner_scale_set: RunnerScaleSet | None = None
    message_queue_url: str = ""
    message_queue_access_token: str = ""
    statistics: RunnerScaleSetStatistic | None = None

    def __repr__(self) -> str:
        return (
            f"RunnerScaleSetSession(session_id={self.session_id!r}, "
            f"owner_name={self.owner_name!r}, message_queue_url={self.message_queue_url!r}, "
            f"statistics={self.statistics!r})"
        )


@dataclass(frozen=True, kw_only=True)
class JobMessageBase:
    """Fields common to every job message in a message body."""

    message_type: str = ""
    runner_request_id: int = 0
    repository_name: str = ""
    owner_name: str = ""
    job_id: str = ""
    job_workflow_ref: str = ""
    job_display_name: str = ""
    workflow_run_id: int = 0
    event_name: str = ""
    request_labels: tuple[str, ...] = ()
    queue_time: datetime | None = None
    scale_set_assign_time: datetime | None = None
    runner_assign_time: datetime | None = None
    finish_time: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class JobAvailable(JobMessageBase):
    acquire_job_url: str = ""


@dataclass(frozen=True, kw_only=True)
class JobAssigned(JobMessageBase):
    pass


@dataclass(frozen=True, kw_only=True)
class JobStarted(JobMessageBase):
    runner_id: int = 0
    runner_name: str = ""


@dataclass(frozen=True, kw_only=True)
class JobCompleted(JobMessageBase):
    result: str = ""
    runner_id: int = 0
    runner_name: str = ""


@dataclass(frozen=True, kw_only=True)
class RunnerScaleSetMessage:
    """One long-poll answer: an envelope with statistics and the job messages of its body."""

    message_id: int
    message_type: str
    statistics: RunnerScaleSetStatistic | None = None
    jobs_available: tuple[JobAvailable, ...] = ()
    jobs_assigned: tuple[JobAssigned, ...] = ()
    jobs_started: tuple[JobStarted, ...] = ()
    jobs_completed: tuple[JobCompleted, ...] = ()
