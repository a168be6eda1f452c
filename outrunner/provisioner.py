"""The seam between the Scaler and the environment backends (Docker, libvirt, Tart, your own).

A provisioner knows nothing about GitHub: it is handed a name and an opaque JIT config and must
make an environment in which ``<runner_cmd> --jitconfig <jit_config>`` (or the backend's equivalent)
runs, then tear that environment down on request.

Contract every backend keeps (``outrunner.testing`` ships a suite that checks it):

- ``start`` returns once the runner process has been launched; it does not wait for the job.
  If it fails or is cancelled, it leaves nothing behind (no container, VM, overlay, clone).
- ``stop`` is idempotent: stopping an unknown or already vanished environment is not an error.
- ``close`` releases the backend's resources and is safe to call after any sequence of calls.
- ``cleanup(prefix)`` (optional, see :class:`OrphanCleaner`) removes environments left by an
  earlier run that are runners of ``prefix`` (see :func:`is_runner_name`), and only those the
  backend itself created.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from outrunner.config import RunnerConfig

__all__ = [
    "EnvironmentMonitor",
    "OrphanCleaner",
    "Provisioner",
    "ProvisionerError",
    "RunnerRequest",
    "is_runner_name",
]


class ProvisionerError(RuntimeError):
    """A backend could not create, inspect or remove an environment; the message says which
    and why, in words an operator can act on (the backends subclass it)."""


_RUNNER_SUFFIX = re.compile(r"[0-9a-f]{8}")


def is_runner_name(name: str, prefix: str) -> bool:
    """True when ``name`` is ``prefix`` followed by the 8 hex digits the Scaler appends.

    Orphan cleanup matches this exactly instead of ``startswith``: scale set ``linux`` must
    not sweep away the runners of scale set ``linux-arm`` (``linux-arm-0a1b2c3d``).
    """
    return name.startswith(prefix) and _RUNNER_SUFFIX.fullmatch(name, len(prefix)) is not None


@dataclass(frozen=True)
class RunnerRequest:
    """Everything a provisioner needs to start one runner."""

    name: str
    """Unique runner name, ``<scale set>-<8 hex>``; also the environment's name."""
    jit_config: str
    """Base64 JIT configuration from GitHub; a credential, never logged."""
    runner: RunnerConfig
    """The runner entry of the configuration this runner belongs to."""

    def __repr__(self) -> str:
        return (
            f"RunnerRequest(name={self.name!r}, jit_config=<redacted>, runner={self.runner.name!r})"
        )


class Provisioner(Protocol):
    """Creates and destroys ephemeral runner environments."""

    async def start(self, request: RunnerRequest) -> None: ...

    async def stop(self, name: str) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class OrphanCleaner(Protocol):
    """Optional provisioner capability: remove environments an earlier run left behind."""

    async def cleanup(self, prefix: str) -> list[str]:
        """Remove this backend's environments that are runners of ``prefix``; return their names.

        ``prefix`` is ``<scale set name>-``; match names with :func:`is_runner_name`.
        """
        ...


@runtime_checkable
class EnvironmentMonitor(Protocol):
    """Optional provisioner capability: tell whether a started environment has ended.

    The Scaler polls it for runners it believes alive, so an environment that dies without its
    job ever reporting completion (a crashed container, a VM that powered off, a runner that
    refused its JIT config) is stopped and deregistered instead of holding a slot forever.
    """

    async def exited(self, name: str) -> bool:
        """True when the environment ``name`` is gone or its runner process has ended."""
        ...
