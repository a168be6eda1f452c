"""outrunner: ephemeral self-hosted GitHub Actions runners without Kubernetes.

The public API is exactly what ``__all__`` lists. The scale set protocol client is in
:mod:`outrunner.scaleset`, the backends in :mod:`outrunner.provisioners`, and the test kit (fake
GitHub, fake runner agent, in-memory provisioner) in :mod:`outrunner.testing`.
"""

from outrunner._version import __version__
from outrunner.config import (
    Config,
    ConfigError,
    ConfigProblem,
    DockerImage,
    DockerMount,
    GitHubAppConfig,
    LibvirtImage,
    LibvirtMount,
    ResolvedApp,
    ResolvedToken,
    RunnerConfig,
    TartImage,
    TartMount,
    load_config,
    resolve_runner_ca_file,
    resolve_runner_credentials,
    resolve_runner_token,
    resolve_runner_url,
    resolve_token,
    resolve_url,
)
from outrunner.journal import (
    Journal,
    JournalEntry,
    JournalError,
    JournalPhase,
    StateDir,
    resolve_state_dir,
)
from outrunner.log import (
    BoundLogger,
    JsonFormatter,
    SimpleHandler,
    configure_logging,
    get_logger,
    register_secret,
)
from outrunner.provisioner import (
    Adopter,
    EnvironmentMonitor,
    ExitWatcher,
    OrphanCleaner,
    Provisioner,
    ProvisionerError,
    RunnerRequest,
    is_runner_name,
)
from outrunner.runner import RunnerPhase, RunnerSnapshot, RunnerState
from outrunner.scaler import RunnerJournal, Scaler, ScalerError, ScaleSetClient, StartBackoff
from outrunner.service import ReloadResult, Service, ServiceState, serve
from outrunner.worker import ScaleSetStatus, ScaleSetWorker

__all__ = [
    "Adopter",
    "BoundLogger",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DockerImage",
    "DockerMount",
    "EnvironmentMonitor",
    "ExitWatcher",
    "GitHubAppConfig",
    "Journal",
    "JournalEntry",
    "JournalError",
    "JournalPhase",
    "JsonFormatter",
    "LibvirtImage",
    "LibvirtMount",
    "OrphanCleaner",
    "Provisioner",
    "ProvisionerError",
    "ReloadResult",
    "ResolvedApp",
    "ResolvedToken",
    "RunnerConfig",
    "RunnerJournal",
    "RunnerPhase",
    "RunnerRequest",
    "RunnerSnapshot",
    "RunnerState",
    "ScaleSetClient",
    "ScaleSetStatus",
    "ScaleSetWorker",
    "Scaler",
    "ScalerError",
    "Service",
    "ServiceState",
    "SimpleHandler",
    "StartBackoff",
    "StateDir",
    "TartImage",
    "TartMount",
    "__version__",
    "configure_logging",
    "get_logger",
    "is_runner_name",
    "load_config",
    "register_secret",
    "resolve_runner_ca_file",
    "resolve_runner_credentials",
    "resolve_runner_token",
    "resolve_runner_url",
    "resolve_state_dir",
    "resolve_token",
    "resolve_url",
    "serve",
]
