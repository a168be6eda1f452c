"""GitHub Actions runner scale set API: client, message session and listener.

This package imports nothing from the rest of outrunner.
"""

from outrunner.scaleset.auth import Credentials, PersonalAccessToken
from outrunner.scaleset.client import Client, SystemInfo
from outrunner.scaleset.errors import (
    InvalidConfigURLError,
    JobStillRunningError,
    MessageQueueTokenExpiredError,
    NameLookupError,
    ProtocolError,
    RetryExhaustedError,
    RunnerExistsError,
    RunnerNotFoundError,
    ScaleSetError,
    SessionConflictError,
    SessionExpiredError,
    StatusError,
    TransportError,
)
from outrunner.scaleset.listener import (
    Listener,
    MessageSource,
    MetricsRecorder,
    NoopMetrics,
    Scaler,
)
from outrunner.scaleset.retry import RetryPolicy
from outrunner.scaleset.session import MessageSession
from outrunner.scaleset.types import (
    DEFAULT_RUNNER_GROUP,
    NIL_SESSION_ID,
    JitRunnerConfig,
    JitRunnerSetting,
    JobAssigned,
    JobAvailable,
    JobCompleted,
    JobMessageBase,
    JobStarted,
    Label,
    RunnerGroup,
    RunnerReference,
    RunnerScaleSet,
    RunnerScaleSetMessage,
    RunnerScaleSetSession,
    RunnerScaleSetStatistic,
    RunnerSetting,
)
from outrunner.scaleset.urls import GitHubConfig, Scope, parse_config_url

__all__ = [
    "DEFAULT_RUNNER_GROUP",
    "NIL_SESSION_ID",
    "Client",
    "Credentials",
    "GitHubConfig",
    "InvalidConfigURLError",
    "JitRunnerConfig",
    "JitRunnerSetting",
    "JobAssigned",
    "JobAvailable",
    "JobCompleted",
    "JobMessageBase",
    "JobStarted",
    "JobStillRunningError",
    "Label",
    "Listener",
    "MessageQueueTokenExpiredError",
    "MessageSession",
    "MessageSource",
    "MetricsRecorder",
    "NameLookupError",
    "NoopMetrics",
    "PersonalAccessToken",
    "ProtocolError",
    "RetryExhaustedError",
    "RetryPolicy",
    "RunnerExistsError",
    "RunnerGroup",
    "RunnerNotFoundError",
    "RunnerReference",
    "RunnerScaleSet",
    "RunnerScaleSetMessage",
    "RunnerScaleSetSession",
    "RunnerScaleSetStatistic",
    "RunnerSetting",
    "ScaleSetError",
    "Scaler",
    "Scope",
    "SessionConflictError",
    "SessionExpiredError",
    "StatusError",
    "SystemInfo",
    "TransportError",
    "parse_config_url",
]
