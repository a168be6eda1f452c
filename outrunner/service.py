"""Service: a whole Config as running workers (what gha-outrunner's main.go does, as a library).

For every runner entry it resolves the URL, token and CA file (runner's own first), shares one
scale set client per distinct (URL, token, CA file), builds the entry's provisioner and runs a
ScaleSetWorker. The Service owns what it creates (the runner journal, clients, provisioners,
worker tasks) through one exit stack, released in reverse order.

:meth:`Service.run` returns once the Service has stopped:

* ``stop()`` (the first SIGINT/SIGTERM under :func:`serve`) *drains*: no new runners, runners
  without a job are released at once, busy runners finish their jobs for up to ``drain_timeout``
  seconds; then whatever is left is stopped, sessions are deleted and ``run`` returns.
* ``stop(drain=False)`` (a second signal), or a drain timeout of 0, stops every runner at once.
* A worker that cannot set up its scale set (bad token, unknown runner group) makes ``run``
  raise, after every other worker has stopped its runners the same bounded way.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Protocol

from outrunner._version import __version__
from outrunner.config import (
    Config,
    ConfigError,
    RunnerConfig,
    resolve_runner_ca_file,
    resolve_runner_token,
    resolve_runner_url,
)
from outrunner.health import HealthServer, parse_listen
from outrunner.journal import Journal, resolve_state_dir
from outrunner.log import BoundLogger, get_logger, register_secret
from outrunner.metrics import Metrics
from outrunner.provisioner import Provisioner
from outrunner.runner import RunnerPhase, RunnerSnapshot
from outrunner.scaleset.auth import PersonalAccessToken
from outrunner.scaleset.client import Client, SystemInfo
from outrunner.worker import ScaleSetStatus, ScaleSetWorker

__all__ = [
    "ClientFactory",
    "ProvisionerFactory",
    "Service",
    "ServiceState",
    "default_provisioner",
    "serve",
]

ProvisionerFactory = Callable[[RunnerConfig], Provisioner]


class ClientFactory(Protocol):
    """Builds the scale set client for a URL and token. ``ca_file`` (a PEM CA bundle that
    replaces the system trust store) is passed only when the runner entry resolves one, so a
    factory taking just ``(url, token)`` works for configs without ``ca_file``."""

    def __call__(self, url: str, token: str, /, *, ca_file: str = "") -> Client: ...


DEFAULT_MAX_RUNNERS = 2


def default_provisioner(runner: RunnerConfig) -> Provisioner:
    """The backend a runner entry names; imported lazily so unused extras need not be installed."""
    logger = get_logger(f"outrunner.{runner.provider_type}", scale_set=runner.name)
    return backend_factory(runner)(runner, logger=logger)


def backend_factory(runner: RunnerConfig) -> Callable[..., Provisioner]:
    """The ``for_runner(runner, *, logger)`` constructor of the backend a runner entry names,
    imported now: raises :class:`ConfigError` when this installation lacks the backend's extra
    (what ``outrunner --check`` reports before anything starts)."""
    kind = runner.provider_type
    try:
        if kind == "docker":
            from outrunner.provisioners.docker import DockerProvisioner

            return DockerProvisioner.for_runner
        if kind == "libvirt":
            from outrunner.provisioners.libvirt import LibvirtProvisioner

            return LibvirtProvisioner.for_runner
        if kind == "tart":
            from outrunner.provisioners.tart import TartProvisioner

            return TartProvisioner.for_runner
    except ImportError as exc:
        raise ConfigError(
            f"runners.{runner.name}: the {kind} backend needs the '{kind}' extra "
            f"(pip install 'outrunner[{kind}]'): {exc}"
        ) from exc
    raise ConfigError(f"runners.{runner.name}: the {kind} backend is not available in this build")


def _default_client(url: str, token: str, /, *, ca_file: str = "") -> Client:
    info = SystemInfo(system="outrunner", version=__version__, subsystem="outrunner")
    # No ca_file: the system trust store.
    return Client(url, PersonalAccessToken(token), system_info=info, verify=ca_file or True)


def _owner() -> str:
    return socket.gethostname() or str(uuid.uuid4())


@dataclass(frozen=True)
class _Plan:
    runner: RunnerConfig
    url: str
    token: str
    max_runners: int
    ca_file: str
    """The PEM CA bundle the client trusts; ``""``: the system trust store."""


@dataclass(frozen=True)
class ServiceState:
    """Where a Service is in its life (see :meth:`Service.state`)."""

    stopping: bool
    """stop() was called (a signal arrived)."""
    draining: bool
    """Stopping, and waiting for busy runners to finish their jobs."""
    busy_runners: int
    """Runners running a job, over every scale set."""
    runners: int
    """Runners tracked, in any phase, over every scale set."""
    drain_deadline: float | None
    """``loop.time()`` at which the drain gives up and stops what is left; None when not
    draining."""


class Service:
    """Runs every scale set of a Config until stopped.

    ``drain_timeout`` (seconds; default: the config's ``drain_timeout``, 900) bounds how long a
    drain waits for busy runners; 0 stops them at once. ``state_dir`` is where the runner journal
    lives (default: resolved by :func:`outrunner.journal.resolve_state_dir` from the config's
    ``state_dir`` and the environment); ``journal=False`` runs without one (no adoption after a
    restart). ``shutdown_timeout`` bounds stopping the runners that are left once the drain is
    over. ``listen`` (``HOST:PORT``, e.g. ``127.0.0.1:9090``; port 0 picks a free one; default:
    the config's ``listen``, ``""``: off) serves ``/metrics``, ``/healthz``, ``/readyz`` and
    ``/status`` while :meth:`run` runs (``docs/metrics.md``); :attr:`metrics` is kept either way.
    """

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
        drain_timeout: float | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        journal: bool = True,
        logger: BoundLogger | None = None,
        listen: str | None = None,
    ) -> None:
        # The one place the default runner count is checked: the flag, or a library caller.
        if max_runners < 1:
            raise ConfigError(f"--max-runners must be at least 1, got {max_runners}")
        if drain_timeout is not None and drain_timeout < 0:
            raise ConfigError(f"--drain-timeout must be 0 or more, got {drain_timeout}")
        self._config = config
        self._url = url
        self._token = token
        self._max_runners = max_runners
        self._log = logger or get_logger("outrunner.service")
        self._provisioner_factory = provisioner_factory
        self._client_factory = client_factory
        self._owner = owner or _owner()
        self._shutdown_timeout = shutdown_timeout
        self.drain_timeout = config.drain_timeout if drain_timeout is None else drain_timeout
        self._state_dir = None if state_dir is None else os.fspath(state_dir)
        self._use_journal = journal
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._drain_deadline: float | None = None
        self._workers_created = asyncio.Event()
        self.workers: list[ScaleSetWorker] = []
        self._tasks: list[asyncio.Task[None]] = []
        """Worker tasks, in the order of ``workers``."""
        self.journal: Journal | None = None
        """The runner journal while :meth:`run` runs (None without one)."""
        listen = config.listen if listen is None else listen
        self._listen = parse_listen(listen) if listen else None
        self.metrics = Metrics()
        """Every scale set's metrics (its own Prometheus registry) and what the health
        endpoints read."""
        self.metrics.watch(self.status)
        self.http: HealthServer | None = None
        """The HTTP endpoints while :meth:`run` runs with ``listen``; ``http.addresses`` are the
        bound (host, port) pairs."""

    def _plan(self, runner: RunnerConfig) -> _Plan:
        resolved_token = resolve_runner_token(self._token, self._config, runner)
        # Mask the token in every log line from here on, whoever prints it.
        register_secret(resolved_token)
        return _Plan(
            runner=runner,
            url=resolve_runner_url(self._url, self._config, runner),
            token=resolved_token,
            max_runners=runner.max_runners or self._max_runners,
            ca_file=resolve_runner_ca_file(self._config, runner),
        )

    def stop(self, *, drain: bool = True) -> None:
        """Ask :meth:`run` to shut down: drain first (the default), or at once.

        A second call, or ``drain=False``, skips (or cuts short) the drain. Call it on the event
        loop (``loop.add_signal_handler`` callbacks run there); from another thread use
        ``loop.call_soon_threadsafe(service.stop)``.
        """
        if self._stop.is_set() or not drain or self.drain_timeout <= 0:
            self._force.set()
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def state(self) -> ServiceState:
        """Whether the Service is stopping or draining, and how many runners are busy."""
        runners = [r for snapshots in self.runners().values() for r in snapshots]
        return ServiceState(
            stopping=self._stop.is_set(),
            draining=self._stop.is_set() and not self._force.is_set(),
            busy_runners=sum(r.phase is RunnerPhase.RUNNING for r in runners),
            runners=len(runners),
            drain_deadline=self._drain_deadline,
        )

    def runners(self) -> dict[str, list[RunnerSnapshot]]:
        """Every scale set's tracked runners."""
        return {worker.name: worker.runners() for worker in self.workers}

    def status(self) -> list[ScaleSetStatus]:
        """Every scale set's session, runners and start backoff, in config order."""
        return [worker.status() for worker in self.workers]

    async def wait_ready(self) -> None:
        """Wait until every scale set exists and listens (tests, demos, health checks)."""
        await self._workers_created.wait()
        await asyncio.gather(*(worker.ready.wait() for worker in self.workers))

    async def run(self) -> None:
        tasks: list[asyncio.Task[None]] = self._tasks
        async with AsyncExitStack() as stack:
            plans = [self._plan(runner) for runner in self._config.runners.values()]
            if self._listen is not None:
                # Up before the workers, so /readyz says "starting"; closed after they stopped.
                self.http = HealthServer(self, *self._listen, logger=self._log)
                await self.http.start()
                stack.push_async_callback(self.http.close)
            if self._use_journal:
                self.journal = self._open_journal()
                stack.callback(self._close_journal)
            # Every provisioner is built before any worker starts, so a backend that cannot be
            # built (a missing extra) fails the run before anything happened at GitHub.
            provisioners: list[Provisioner] = []
            for plan in plans:
                provisioner = self._provisioner_factory(plan.runner)
                provisioners.append(provisioner)
                stack.push_async_callback(provisioner.close)
            clients: dict[tuple[str, str, str], Client] = {}
            for plan in plans:
                key = (plan.url, plan.token, plan.ca_file)
                if key not in clients:
                    extra = {"ca_file": plan.ca_file} if plan.ca_file else {}
                    clients[key] = self._client_factory(plan.url, plan.token, **extra)
                    stack.push_async_callback(clients[key].aclose)
                    self._log.info(
                        "Created scaleset client",
                        url=plan.url,
                        ca_file=plan.ca_file or "(system trust store)",
                    )
            # Released first: every worker stops its runners before provisioners and clients go.
            stack.push_async_callback(self._stop_workers, tasks)
            for plan, provisioner in zip(plans, provisioners, strict=True):
                worker = ScaleSetWorker(
                    clients[(plan.url, plan.token, plan.ca_file)],
                    plan.runner,
                    max_runners=plan.max_runners,
                    provisioner=provisioner,
                    owner=self._owner,
                    logger=self._log.bind(scale_set=plan.runner.name),
                    shutdown_timeout=self._shutdown_timeout,
                    journal=self.journal,
                    drain_timeout=self.drain_timeout,
                    metrics=self.metrics.for_runner(plan.runner, url=plan.url),
                )
                self.workers.append(worker)
                tasks.append(asyncio.create_task(worker.run(), name=f"worker:{worker.name}"))
            self._workers_created.set()
            await self._supervise(tasks)
        self._log.info("Shut down cleanly")

    async def _supervise(self, tasks: list[asyncio.Task[None]]) -> None:
        """Return when stopped (after the drain); raise when a scale set failed.

        A scale set that fails at start-up (before it first listened) ends the whole run, as a
        config mistake should, after the others have drained. One that fails later stops alone
        (it drains itself) while the others keep serving; once every scale set has stopped, the
        first failure is raised.
        """
        running = set(tasks)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while running and not stop.done():
                done, _ = await asyncio.wait([*running, stop], return_when=asyncio.FIRST_COMPLETED)
                for task in running & done:
                    running.discard(task)
                    self._worker_ended(task)
        finally:
            stop.cancel()
        if running and not self._force.is_set():
            await self._drain(list(running))
        failed = next((t for t in tasks if _failure(t) is not None), None)
        if failed is not None:
            raise _failure(failed)  # type: ignore[misc]

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        error = _failure(task)
        worker = next(w for w, t in zip(self.workers, self._tasks, strict=True) if t is task)
        if error is None:
            return
        if not worker.ready.is_set():
            self._log.error(
                "Scale set failed at start-up; stopping", scale_set=worker.name, error=str(error)
            )
            self.stop()
            return
        left = sum(not t.done() for t in self._tasks)
        self._log.error(
            "Scale set stopped; the others keep serving",
            scale_set=worker.name,
            error=str(error),
            serving=left,
        )

    async def _drain(self, tasks: list[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        self._drain_deadline = loop.time() + self.drain_timeout
        state = self.state()
        self._log.info(
            "Draining: no new runners; busy runners finish their jobs (signal again to stop now)",
            busy=state.busy_runners,
            timeout=self.drain_timeout,
        )
        for worker in self.workers:
            worker.drain()
        force = asyncio.ensure_future(self._force.wait())
        drained = asyncio.ensure_future(asyncio.wait(tasks))
        try:
            async with asyncio.timeout_at(self._drain_deadline):
                await asyncio.wait([force, drained], return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            busy = self.state().busy_runners
            self._log.warning("Drain timed out; stopping the runners that are left", busy=busy)
        finally:
            force.cancel()
            drained.cancel()
        if self._force.is_set():
            self._log.warning("Stopping every runner now", busy=self.state().busy_runners)

    async def _stop_workers(self, tasks: list[asyncio.Task[None]]) -> None:
        """Cancel every worker still running (each stops its runners, bounded) and wait."""
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _open_journal(self) -> Journal:
        where = resolve_state_dir(self._state_dir, self._config.state_dir)
        if where.warning:
            self._log.warning(where.warning)
        journal = Journal.open(where, logger=self._log.group("journal"))
        self._log.info("Runner journal", path=str(journal.path), source=where.source)
        unknown = sorted(
            entry.name for entry in journal.entries() if entry.scale_set not in self._config.runners
        )
        if unknown:
            # Their scale set is gone from the config, so there is no backend to stop them
            # with; they stay in the journal until a config with that entry runs again.
            self._log.warning(
                "Journaled runners of scale sets not in the config are left alone",
                runners=",".join(unknown),
            )
        return journal

    def _close_journal(self) -> None:
        if self.journal is not None:
            self.journal.close()


def _failure(task: asyncio.Task[None]) -> BaseException | None:
    return None if not task.done() or task.cancelled() else task.exception()


async def serve(service: Service, *, on_reload: Callable[[], None] | None = None) -> None:
    """Run ``service`` until SIGINT or SIGTERM, then shut it down cleanly (bounded).

    The first signal drains (busy runners finish their jobs, up to the drain timeout); the
    second stops every runner at once; after that the default handlers are back, so a third
    signal interrupts even a stuck shutdown. With ``on_reload``, SIGHUP calls it (on the event
    loop) instead of ending the process, as a service manager's "reload" expects.
    """
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if service.stopping:
            service._log.warning("Second signal: stopping every runner now", signal=name)
            service.stop(drain=False)
            for sig in signals:
                loop.remove_signal_handler(sig)
            return
        service._log.info("Signal received, shutting down", signal=name)
        service.stop()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    if on_reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        await service.run()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if on_reload is not None:
            loop.remove_signal_handler(signal.SIGHUP)
