"""Service: a whole Config as running workers (what gha-outrunner's main.go does, as a library).

For every runner entry it resolves the URL, credentials (a token or a GitHub App) and CA file
(runner's own first), shares one scale set client per distinct (URL, credentials, CA file),
builds the entry's provisioner and runs a ScaleSetWorker; :meth:`Service.reload` applies a new
config while it runs. The Service owns what it creates (the runner journal, clients, provisioners,
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
import gc
import hashlib
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Final, Protocol

from outrunner._version import __version__
from outrunner.config import (
    Config,
    ConfigError,
    ResolvedApp,
    RunnerConfig,
    resolve_runner_ca_file,
    resolve_runner_credentials,
    resolve_runner_url,
)
from outrunner.health import HealthServer, parse_listen
from outrunner.journal import Journal, resolve_state_dir
from outrunner.log import BoundLogger, get_logger, register_secret, unregister_secret
from outrunner.metrics import Metrics
from outrunner.provisioner import Provisioner
from outrunner.runner import RunnerPhase, RunnerSnapshot
from outrunner.scaleset.auth import Credentials, GitHubApp, PersonalAccessToken
from outrunner.scaleset.client import Client, SystemInfo
from outrunner.worker import ScaleSetStatus, ScaleSetWorker

__all__ = [
    "ClientFactory",
    "ProvisionerFactory",
    "ReloadResult",
    "ScaleSetPlan",
    "Service",
    "ServiceState",
    "default_provisioner",
    "serve",
]

ProvisionerFactory = Callable[[RunnerConfig], Provisioner]


class ClientFactory(Protocol):
    """Builds the scale set client for a URL and its credentials: a token (``str``), or a
    :class:`~outrunner.scaleset.auth.GitHubApp` when the entry authenticates as an App.
    ``ca_file`` (a PEM CA bundle that replaces the system trust store) is passed only when the
    runner entry resolves one, so a factory taking just ``(url, token)`` works for token
    configs without ``ca_file``."""

    def __call__(
        self, url: str, credentials: str | Credentials, /, *, ca_file: str = ""
    ) -> Client: ...


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


def _default_client(url: str, credentials: str | Credentials, /, *, ca_file: str = "") -> Client:
    info = SystemInfo(system="outrunner", version=__version__, subsystem="outrunner")
    auth = PersonalAccessToken(credentials) if isinstance(credentials, str) else credentials
    # No ca_file: the system trust store.
    return Client(url, auth, system_info=info, verify=ca_file or True)


def _owner() -> str:
    return socket.gethostname() or str(uuid.uuid4())


@dataclass(frozen=True)
class ScaleSetPlan:
    """What one runner entry resolves to: everything its worker is built from (see
    :meth:`Service.plan`)."""

    runner: RunnerConfig
    url: str
    credentials: str | GitHubApp = field(repr=False)
    """The token, or the (shared) GitHub App credentials."""
    credentials_origin: str
    """Where the credentials came from, for people: ``token from GITHUB_TOKEN``,
    ``GitHub App Iv1.abc installation 42 (app, key /etc/outrunner/app.pem)``."""
    credentials_key: str = field(repr=False)
    """Equal for equal credentials: the token itself, or the App's issuer, installation and
    the digest of its key."""
    max_runners: int
    ca_file: str
    """The PEM CA bundle the client trusts; ``""``: the system trust store."""

    @property
    def client_key(self) -> tuple[str, str, str]:
        """Entries with the same key share one scale set client."""
        return (self.url, self.credentials_key, self.ca_file)

    def same_scale_set(self, other: ScaleSetPlan) -> bool:
        """Whether ``other`` can be applied to this plan's running worker; otherwise the
        scale set is drained and started again (another GitHub, identity, group or backend)."""
        mine, theirs = self.runner, other.runner
        return (
            self.client_key == other.client_key
            and mine.runner_group == theirs.runner_group
            and mine.provider_type == theirs.provider_type
        )


@dataclass(eq=False)
class _Running:
    """A scale set's worker, its task and the plan it runs."""

    plan: ScaleSetPlan
    worker: ScaleSetWorker
    task: asyncio.Task[None]
    initial: bool = False
    """Started with the Service: failing before it first listens ends the whole run (a config
    mistake); a scale set a reload starts fails alone."""
    retiring: bool = False
    """Drained because a reload removed (or restarts) its entry."""
    successor: tuple[ScaleSetPlan, Provisioner] | None = None
    """What starts once it has ended (a restarted scale set)."""


@dataclass(frozen=True)
class ReloadResult:
    """What :meth:`Service.reload` changed, by scale set name."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    """Drained: no new runners; busy ones finish their jobs, then the scale set stops."""
    restarted: tuple[str, ...] = ()
    """Drained and started again: its URL, credentials, CA file, runner group or backend kind
    changed, which a running scale set cannot take on."""
    changed: tuple[str, ...] = ()
    """Applied in place: max_runners, min_runners and lifetimes now; labels at GitHub; backend
    options for the runners started from now on."""


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
        token_origin: str = "--token",
    ) -> None:
        # The one place the default runner count is checked: the flag, or a library caller.
        if max_runners < 1:
            raise ConfigError(f"--max-runners must be at least 1, got {max_runners}")
        if drain_timeout is not None and drain_timeout < 0:
            raise ConfigError(f"--drain-timeout must be 0 or more, got {drain_timeout}")
        self._config = config
        self._url = url
        self._token = token
        self._token_origin = token_origin
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
        self._drain_timeout_flag = drain_timeout is not None
        self._workers_created = asyncio.Event()
        self._running: dict[str, _Running] = {}
        """The current worker of every scale set in the config, in config order."""
        self._retiring: list[_Running] = []
        """Workers draining because a reload removed or restarts their scale set."""
        self._changed = asyncio.Event()
        self._failures: list[BaseException] = []
        self._stack: AsyncExitStack | None = None
        self._clients: dict[tuple[str, str, str], Client] = {}
        self._provisioners: list[Provisioner] = []
        self._apps: dict[str, GitHubApp] = {}
        self._warned: set[str] = set()
        self._reload_lock = asyncio.Lock()
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

    @property
    def workers(self) -> list[ScaleSetWorker]:
        """Every scale set's worker in config order, then those draining after a reload."""
        return [r.worker for r in (*self._running.values(), *self._retiring)]

    def plan(self) -> list[ScaleSetPlan]:
        """Resolve every runner entry of the config as :meth:`run` does, without starting or
        contacting anything (what ``outrunner --check`` shows): URL, credentials (token files
        and App keys are read), CA file and ``max_runners``. Raises :class:`ConfigError`."""
        return [self._plan(runner, self._config) for runner in self._config.runners.values()]

    def _plan(self, runner: RunnerConfig, config: Config) -> ScaleSetPlan:
        url = resolve_runner_url(self._url, config, runner)
        resolved = resolve_runner_credentials(
            self._token, config, runner, url=url, flag_origin=self._token_origin
        )
        credentials: str | GitHubApp
        if isinstance(resolved, ResolvedApp):
            register_secret(resolved.private_key)
            # The key's digest, not its path: a key rotated in place is a new identity at reload.
            digest = hashlib.sha256(resolved.private_key.encode()).hexdigest()
            key = f"app:{resolved.issuer}:{resolved.installation_id}:{digest}"
            app = self._apps.get(key)
            if app is None:
                # One per App installation: its installation token is shared by every client.
                app = resolved.credentials(
                    register_secret=register_secret, unregister_secret=unregister_secret
                )
                self._apps[key] = app
            credentials, origin = app, resolved.origin
            for source in resolved.ignored:
                if source not in self._warned:
                    self._warned.add(source)
                    self._log.warning(
                        "A token is set but the config's GitHub App is used instead",
                        token_source=source,
                        app=resolved.origin,
                    )
        else:
            # Mask the token in every log line from here on, whoever prints it.
            register_secret(resolved.value)
            credentials = key = resolved.value
            origin = f"token from {resolved.origin}"
        max_runners = runner.max_runners or self._max_runners
        if runner.min_runners > max_runners:  # load_config checked it against an explicit max
            raise ConfigError(
                f"runners.{runner.name}: min_runners ({runner.min_runners}) must not exceed "
                f"max_runners ({max_runners}, from --max-runners)"
            )
        return ScaleSetPlan(
            runner=runner,
            url=url,
            credentials=credentials,
            credentials_origin=origin,
            credentials_key=key,
            max_runners=max_runners,
            ca_file=resolve_runner_ca_file(config, runner),
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
        async with AsyncExitStack() as stack:
            plans = self.plan()
            if self._listen is not None:
                # Up before the workers, so /readyz says "starting"; closed after they stopped.
                self.http = HealthServer(self, *self._listen, logger=self._log)
                await self.http.start()
                stack.push_async_callback(self.http.close)
            if self._use_journal:
                self.journal = self._open_journal()
                stack.callback(self._close_journal)
            # Clients and provisioners (including those a reload adds) are closed after every
            # worker has stopped its runners: the callbacks run in reverse order.
            stack.push_async_callback(self._close_clients)
            stack.push_async_callback(self._close_provisioners)
            # Every provisioner is built before any worker starts, so a backend that cannot be
            # built (a missing extra) fails the run before anything happened at GitHub.
            provisioners = [self._new_provisioner(plan) for plan in plans]
            stack.push_async_callback(self._stop_workers)
            self._stack = stack
            try:
                for plan, provisioner in zip(plans, provisioners, strict=True):
                    self._start_worker(plan, provisioner, initial=True)
                self._workers_created.set()
                await self._supervise()
            finally:
                self._stack = None
        self._log.info("Shut down cleanly")

    def _new_provisioner(self, plan: ScaleSetPlan) -> Provisioner:
        provisioner = self._provisioner_factory(plan.runner)
        self._provisioners.append(provisioner)
        return provisioner

    def _client_for(self, plan: ScaleSetPlan) -> Client:
        client = self._clients.get(plan.client_key)
        if client is None:
            extra = {"ca_file": plan.ca_file} if plan.ca_file else {}
            client = self._client_factory(plan.url, plan.credentials, **extra)
            self._clients[plan.client_key] = client
            self._log.info(
                "Created scaleset client",
                url=plan.url,
                ca_file=plan.ca_file or "(system trust store)",
            )
        return client

    def _start_worker(
        self, plan: ScaleSetPlan, provisioner: Provisioner, *, initial: bool = False
    ) -> None:
        worker = ScaleSetWorker(
            self._client_for(plan),
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
        task = asyncio.create_task(worker.run(), name=f"worker:{worker.name}")
        self._running[worker.name] = _Running(plan, worker, task, initial=initial)
        self._changed.set()

    def _all(self) -> list[_Running]:
        return [*self._running.values(), *self._retiring]

    async def _supervise(self) -> None:
        """Return when stopped (after the drain); raise when a scale set failed.

        A scale set that fails at start-up (before it first listened) ends the whole run, as a
        config mistake should, after the others have drained. One that fails later stops alone
        (it drains itself) while the others keep serving; once every scale set has stopped, the
        first failure is raised. Workers a reload adds are supervised from then on.
        """
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while not stop.done():
                live = {r.task for r in self._all() if not r.task.done()}
                if not live:
                    break
                self._changed.clear()
                changed = asyncio.ensure_future(self._changed.wait())
                try:
                    done, _ = await asyncio.wait(
                        [*live, stop, changed], return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    changed.cancel()
                for entry in self._all():
                    if entry.task in done:
                        self._worker_ended(entry)
        finally:
            stop.cancel()
        live_tasks = [r.task for r in self._all() if not r.task.done()]
        if live_tasks and not self._force.is_set():
            await self._drain(live_tasks)
        for entry in self._all():
            error = _failure(entry.task)
            if error is not None and not entry.retiring and error not in self._failures:
                self._failures.append(error)
        if self._failures:
            raise self._failures[0]

    def _worker_ended(self, entry: _Running) -> None:
        error = _failure(entry.task)
        name = entry.worker.name
        if entry.retiring:
            self._retiring.remove(entry)
            if error is not None:
                self._log.error(
                    "Removed scale set failed while draining", scale_set=name, error=str(error)
                )
            if entry.successor is not None and not self.stopping:
                plan, provisioner = entry.successor
                self._log.info("Restarting scale set with its new settings", scale_set=name)
                self.metrics.forget(name)
                self._start_worker(plan, provisioner)
            elif entry.successor is None:
                self.metrics.forget(name)
                self._log.info("Scale set removed", scale_set=name)
            return
        if error is None:
            return
        self._failures.append(error)
        if entry.initial and not entry.worker.ready.is_set():
            self._log.error(
                "Scale set failed at start-up; stopping", scale_set=name, error=str(error)
            )
            self.stop()
            return
        left = sum(not r.task.done() for r in self._all())
        self._log.error(
            "Scale set stopped; the others keep serving",
            scale_set=name,
            error=str(error),
            serving=left,
        )

    # -- reload ------------------------------------------------------------------------------

    async def reload(self, config: Config) -> ReloadResult:
        """Apply a new config to the running Service without stopping any busy runner.

        New scale sets start; removed ones are drained (no new runners; busy ones finish their
        jobs, then they stop); a scale set whose URL, credentials, CA file, runner group or
        backend kind changed is drained and started again with the new settings; for the rest
        ``max_runners``, ``min_runners`` and the lifetimes apply at once, labels are updated at
        GitHub, and backend options apply to the runners started from now on. ``listen``,
        ``state_dir`` and the journal keep their values until a restart; ``drain_timeout``
        applies unless the Service was given one.

        Everything is resolved first (tokens, key files, CA files, backends): a
        :class:`ConfigError` leaves the running Service exactly as it was. Raises
        :class:`RuntimeError` when the Service is not running.
        """
        async with self._reload_lock:
            if self._stack is None or self.stopping:
                raise RuntimeError("the service is not running")
            plans = {name: self._plan(runner, config) for name, runner in config.runners.items()}
            current = dict(self._running)
            added = [name for name in plans if name not in current]
            removed = [name for name in current if name not in plans]
            restarted = [
                name
                for name in plans
                if name in current and not current[name].plan.same_scale_set(plans[name])
            ]
            changed = [
                name
                for name in plans
                if name in current and name not in restarted and current[name].plan != plans[name]
            ]
            built: dict[str, Provisioner] = {}
            try:
                for name in (*added, *restarted):
                    built[name] = self._provisioner_factory(plans[name].runner)
            except BaseException:
                for provisioner in built.values():
                    await provisioner.close()
                raise
            self._provisioners.extend(built.values())
            self._config = config
            if not self._drain_timeout_flag:
                self.drain_timeout = config.drain_timeout
            for name in (*removed, *restarted):
                entry = self._running.pop(name)
                entry.retiring = True
                if name in restarted:
                    entry.successor = (plans[name], built[name])
                self._retiring.append(entry)
                entry.worker.drain()
            for name in added:
                draining = next((r for r in self._retiring if r.worker.name == name), None)
                if draining is None:
                    self._start_worker(plans[name], built[name])
                else:  # removed by an earlier reload and still draining: it starts afterwards
                    draining.successor = (plans[name], built[name])
            for entry in self._retiring:
                if entry.worker.name not in plans:
                    entry.successor = None  # restarting, but now removed
            for name in changed:
                entry = self._running[name]
                entry.worker.reconfigure(plans[name].runner, plans[name].max_runners)
                entry.plan = plans[name]
            # Config order for status(), /status and the metrics' listing.
            self._running = {name: self._running[name] for name in plans if name in self._running}
            self._changed.set()
            result = ReloadResult(tuple(added), tuple(removed), tuple(restarted), tuple(changed))
            self._log.info(
                "Config reloaded",
                added=",".join(added) or "-",
                removed=",".join(removed) or "-",
                restarted=",".join(restarted) or "-",
                changed=",".join(changed) or "-",
            )
            return result

    # -- stopping ----------------------------------------------------------------------------

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

    async def _stop_workers(self) -> None:
        """Cancel every worker still running (each stops its runners, bounded) and wait."""
        tasks = [entry.task for entry in self._all()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _close_clients(self) -> None:
        for client in reversed(list(self._clients.values())):
            await self._close(client.aclose(), "scale set client")

    async def _close_provisioners(self) -> None:
        for provisioner in reversed(self._provisioners):
            await self._close(provisioner.close(), "provisioner")

    async def _close(self, closing: Awaitable[None], what: str) -> None:
        """Close one resource; a failure is logged and the others are still closed."""
        try:
            await closing
        except Exception as exc:
            self._log.error(f"Failed to close a {what}", error=str(exc))

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


YOUNG_GC_THRESHOLD: Final = 10_000
"""Net allocations between two collections of the youngest generation while :func:`serve`
runs (Python's default: 700)."""


async def serve(service: Service, *, on_reload: Callable[[], None] | None = None) -> None:
    """Run ``service`` until SIGINT or SIGTERM, then shut it down cleanly (bounded).

    The first signal drains (busy runners finish their jobs, up to the drain timeout); the
    second stops every runner at once; after that the default handlers are back, so a third
    signal interrupts even a stuck shutdown. With ``on_reload``, SIGHUP calls it (on the event
    loop) instead of ending the process, as a service manager's "reload" expects.

    Like the signal handlers, two things are for the whole process. What it allocated so far
    (modules, the config, clients) is moved out of the garbage collector's way for good
    (``gc.freeze()``): it lives as long as the process, and each full collection would walk it
    again, some 40,000 objects, 40 ms per pass on the reference machine. And while this runs,
    the youngest generation is collected after :data:`YOUNG_GC_THRESHOLD` net allocations
    instead of Python's 700: most of what a runner's lifecycle allocates is freed by reference
    counting well within that, so it is never walked. At 1,000 concurrent jobs that took the
    collector's time from 819 to 233 ms in 5,000 lifecycles (docs/performance.md). The previous
    thresholds are back when this returns.
    """
    gc.freeze()
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
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], YOUNG_GC_THRESHOLD), *thresholds[1:])
    try:
        await service.run()
    finally:
        gc.set_threshold(*thresholds)
        for sig in signals:
            loop.remove_signal_handler(sig)
        if on_reload is not None:
            loop.remove_signal_handler(signal.SIGHUP)
