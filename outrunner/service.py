"""Service: a whole Config as running workers (what gha-outrunner's main.go does, as a library).

For every runner entry it resolves the URL and token (runner's own first), shares one scale set
client per distinct (URL, token), builds the entry's provisioner and runs a ScaleSetWorker.
:meth:`Service.run` returns when :meth:`Service.stop` is called (the runner script wires SIGINT and
SIGTERM to it) or raises when a worker cannot set up its scale set. Either way every worker stops
its runners, deregisters them, deletes its message session and closes its provisioner first.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from outrunner._version import __version__
from outrunner.config import (
    Config,
    ConfigError,
    RunnerConfig,
    resolve_runner_token,
    resolve_runner_url,
)
from outrunner.log import BoundLogger, get_logger, register_secret
from outrunner.provisioner import Provisioner
from outrunner.runner import RunnerSnapshot
from outrunner.scaleset.auth import PersonalAccessToken
from outrunner.scaleset.client import Client, SystemInfo
from outrunner.worker import ScaleSetWorker

__all__ = ["ClientFactory", "ProvisionerFactory", "Service", "default_provisioner", "serve"]

ProvisionerFactory = Callable[[RunnerConfig], Provisioner]
ClientFactory = Callable[[str, str], Client]

DEFAULT_MAX_RUNNERS = 2


def default_provisioner(runner: RunnerConfig) -> Provisioner:
    """The backend a runner entry names; imported lazily so unused extras need not be installed."""
    kind = runner.provider_type
    logger = get_logger(f"outrunner.{kind}", scale_set=runner.name)
    try:
        if kind == "docker":
            from outrunner.provisioners.docker import DockerProvisioner

            return DockerProvisioner.for_runner(runner, logger=logger)
        if kind == "libvirt":
            from outrunner.provisioners.libvirt import LibvirtProvisioner

            return LibvirtProvisioner.for_runner(runner, logger=logger)
        if kind == "tart":
            from outrunner.provisioners.tart import TartProvisioner

            return TartProvisioner.for_runner(runner, logger=logger)
    except ImportError as exc:
        raise ConfigError(
            f"runners.{runner.name}: the {kind} backend needs the '{kind}' extra "
            f"(pip install 'outrunner[{kind}]'): {exc}"
        ) from exc
    raise ConfigError(f"runners.{runner.name}: the {kind} backend is not available in this build")


def _default_client(url: str, token: str) -> Client:
    info = SystemInfo(system="outrunner", version=__version__, subsystem="outrunner")
    return Client(url, PersonalAccessToken(token), system_info=info)


def _owner() -> str:
    return socket.gethostname() or str(uuid.uuid4())


@dataclass(frozen=True)
class _Plan:
    runner: RunnerConfig
    url: str
    token: str
    max_runners: int


class Service:
    """Runs every scale set of a Config until stopped."""

    def __init__(
        self,
        config: Config,
        *,
        url: str | None = None,
        token: str | None = None,
        max_runners: int = DEFAULT_MAX_RUNNERS,
        provisioner_factory: ProvisionerFactory = default_provisioner,
        client_factory: ClientFactory = _default_client,
        owner: str | None = None,
        shutdown_timeout: float = 30.0,
        logger: BoundLogger | None = None,
    ) -> None:
        if max_runners < 1:
            raise ConfigError(f"--max-runners must be at least 1, got {max_runners}")
        self._log = logger or get_logger("outrunner.service")
        self._plans = [
            self._plan(config, runner, url, token, max_runners)
            for runner in config.runners.values()
        ]
        self._provisioner_factory = provisioner_factory
        self._client_factory = client_factory
        self._owner = owner or _owner()
        self._shutdown_timeout = shutdown_timeout
        self._stop = asyncio.Event()
        self._workers_created = asyncio.Event()
        self.workers: list[ScaleSetWorker] = []

    @staticmethod
    def _plan(
        config: Config, runner: RunnerConfig, url: str | None, token: str | None, max_runners: int
    ) -> _Plan:
        resolved_token = resolve_runner_token(token, config, runner)
        # Mask the token in every log line from here on, whoever prints it.
        register_secret(resolved_token)
        return _Plan(
            runner=runner,
            url=resolve_runner_url(url, config, runner),
            token=resolved_token,
            max_runners=runner.max_runners or max_runners,
        )

    def stop(self) -> None:
        """Ask :meth:`run` to shut down.

        Call it on the event loop (``loop.add_signal_handler`` callbacks run there); from another
        thread use ``loop.call_soon_threadsafe(service.stop)``.
        """
        self._stop.set()

    def runners(self) -> dict[str, list[RunnerSnapshot]]:
        """Every scale set's tracked runners."""
        return {worker.name: worker.runners() for worker in self.workers}

    async def wait_ready(self) -> None:
        """Wait until every scale set exists and listens (tests, demos, health checks)."""
        await self._workers_created.wait()
        await asyncio.gather(*(worker.ready.wait() for worker in self.workers))

    async def run(self) -> None:
        clients: dict[tuple[str, str], Client] = {}
        tasks: list[asyncio.Task[None]] = []
        failed: asyncio.Task[None] | None = None
        provisioners: list[Provisioner] = []
        try:
            # Every provisioner is built before any worker starts, so a backend that cannot be
            # built (a missing extra) fails the run before anything happened at GitHub.
            for plan in self._plans:
                provisioners.append(self._provisioner_factory(plan.runner))
            for plan, provisioner in zip(self._plans, provisioners, strict=True):
                key = (plan.url, plan.token)
                if key not in clients:
                    clients[key] = self._client_factory(plan.url, plan.token)
                    self._log.info("Created scaleset client", url=plan.url)
                worker = ScaleSetWorker(
                    clients[key],
                    plan.runner,
                    max_runners=plan.max_runners,
                    provisioner=provisioner,
                    owner=self._owner,
                    logger=self._log.bind(scale_set=plan.runner.name),
                    shutdown_timeout=self._shutdown_timeout,
                )
                self.workers.append(worker)
                tasks.append(asyncio.create_task(worker.run(), name=f"worker:{worker.name}"))
            self._workers_created.set()
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            failed = next((t for t in tasks if t in done and _failure(t) is not None), None)
            if failed is not None:
                raise _failure(failed)  # type: ignore[misc]
        finally:
            await self._shutdown(tasks, raised=failed)
            # A worker closes its own provisioner; these never got a worker.
            for provisioner in provisioners[len(tasks) :]:
                await provisioner.close()
            for client in clients.values():
                await client.aclose()
        self._log.info("Shut down cleanly")

    async def _shutdown(
        self, tasks: list[asyncio.Task[None]], *, raised: asyncio.Task[None] | None
    ) -> None:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        # run() raises the failure that ended it; other workers that failed are only logged.
        for task in tasks:
            error = _failure(task)
            if error is not None and task is not raised:
                self._log.error("Scale set worker failed", task=task.get_name(), error=str(error))


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    return None if not task.done() or task.cancelled() else task.exception()


async def serve(service: Service) -> None:
    """Run ``service`` until SIGINT or SIGTERM, then shut it down cleanly (bounded).

    A second signal while shutting down is left to the default handler, so an impatient operator
    can still interrupt a stuck shutdown.
    """
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal(signum: int) -> None:
        service.stop()
        for sig in signals:
            loop.remove_signal_handler(sig)

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await service.run()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
