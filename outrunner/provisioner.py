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
- ``exited(name)`` (optional, :class:`EnvironmentMonitor`) is a cheap status query;
  ``wait_exited(name)`` (optional, :class:`ExitWatcher`) returns as soon as the backend can tell
  that the environment ended.
- ``adopt(name, runner)`` (optional, :class:`Adopter`) takes over a live environment that an
  earlier outrunner process started, so a restart does not destroy a runner that is running a
  job; an adopting backend's ``cleanup`` accepts ``keep`` (names it must leave alone).
- The environment outlives the outrunner process: a crash, ``kill -9`` or a restart of outrunner
  must not end a running runner (no process group, pipe or lease that dies with outrunner).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from outrunner.config import RunnerConfig

__all__ = [
    "Adopter",
    "EnvironmentMonitor",
    "ExitWatcher",
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


@runtime_checkable
class ExitWatcher(Protocol):
    """Optional provisioner capability: wait until a started environment ends.

    Where the backend can be told (Docker's event stream, libvirt's domain lifecycle events, the
    ``tart run`` process ending), this returns within a second or two of the runner exiting, so
    a finished runner's slot is freed at once instead of at the next :class:`EnvironmentMonitor`
    poll. The Scaler keeps polling ``exited`` as a safety net either way.
    """

    async def wait_exited(self, name: str) -> None:
        """Return once environment ``name`` is gone or its runner process has ended.

        Returns at once for an unknown or already ended environment. Cancellation is the normal
        way to stop waiting and must leave nothing behind. Raises :class:`ProvisionerError`
        when the backend cannot watch (the caller then relies on polling).
        """
        ...


@runtime_checkable
class Adopter(Protocol):
    """Optional provisioner capability: take over environments an earlier process started.

    After a crash or a restart, the journal names the runners that were alive; for each, the
    Scaler asks :meth:`adopt`. An adopted environment is then stopped, polled and watched by this
    provisioner exactly as if it had started it.
    """

    async def adopt(self, name: str, runner: RunnerConfig) -> bool:
        """True when environment ``name`` of runner entry ``runner`` is alive with its runner
        running (Docker: the container runs; libvirt: the domain runs and its guest agent
        answers; Tart: the VM runs) and is now handled by this provisioner. False when it is
        gone, ended or unusable; the caller then calls :meth:`Provisioner.stop` on it and
        deregisters the runner. Raises :class:`ProvisionerError` when the backend cannot tell."""
        ...

    async def cleanup(self, prefix: str, *, keep: Collection[str] = ()) -> list[str]:
        """:meth:`OrphanCleaner.cleanup`, leaving the environments named in ``keep`` alone."""
        ...
