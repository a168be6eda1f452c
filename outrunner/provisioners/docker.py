"""Docker backend: one container per runner, created from ``runners.<name>.docker``.

The container is named after the runner and labelled ``outrunner=true``,
``outrunner.name=<runner>`` and ``outrunner.scaleset=<scale set>``; the labels are how orphan
cleanup and :meth:`DockerProvisioner.stop` tell outrunner's containers from anyone else's. The
runner gets its JIT config in ``ACTIONS_RUNNER_INPUT_JITCONFIG`` (``jit_via: env``, the default)
or as ``<runner_cmd> --jitconfig <config>`` (``jit_via: arg``). See ``docs/docker.md``.

Async model: the docker SDK blocks, so every SDK call runs in a small executor owned by the
provisioner, one short call at a time. Waiting (for a container to exit, for a removal already
in progress) is an ``asyncio.sleep`` loop on the event loop between such calls; no worker thread
ever sleeps, and a pull's progress stream is read one line per call.

Exits: :meth:`DockerProvisioner.wait_exited` listens to the engine's event stream (``die`` and
``destroy`` of containers labelled ``outrunner=true``), one stream per engine shared by every
waiter and read by a thread of its own (see :class:`_ExitEvents` for why). After a crash or a
restart, :meth:`DockerProvisioner.adopt` takes over a container an earlier process started: nothing
ties a container to the process that created it (it is created detached, nothing is attached to
its streams, and ``auto_remove`` is the engine's doing, not the client's).

Engine endpoint, first match wins (:func:`resolve_engine`): the runner's ``docker.host``, the
provisioner's ``host`` argument, ``DOCKER_HOST``, the active docker context (``DOCKER_CONTEXT``
or ``currentContext`` in ``$DOCKER_CONFIG/config.json``) when its socket exists, the SDK's
default socket. One client per distinct endpoint, created on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

import docker
import docker.errors
import docker.types
from docker.types.daemon import CancellableStream
from docker.utils import kwargs_from_env

from outrunner._aio import ClosingContext, backoff, cancel_and_wait
from outrunner.config import DockerImage, RunnerConfig
from outrunner.log import BoundLogger, get_logger
from outrunner.provisioner import ProvisionerError, RunnerRequest, is_runner_name
from outrunner.provisioners._workers import Workers

__all__ = [
    "JIT_ENV",
    "LABEL_MANAGED",
    "LABEL_NAME",
    "LABEL_SCALE_SET",
    "ClientFactory",
    "DockerProvisioner",
    "DockerProvisionerError",
    "EngineEndpoint",
    "default_client",
    "resolve_engine",
]

LABEL_MANAGED: Final = "outrunner"
"""Label ``outrunner=true``: the container was created by outrunner (also by gha-outrunner)."""
LABEL_NAME: Final = "outrunner.name"
LABEL_SCALE_SET: Final = "outrunner.scaleset"
JIT_ENV: Final = "ACTIONS_RUNNER_INPUT_JITCONFIG"
"""The variable the actions runner reads its ``--jitconfig`` argument from."""

ClientFactory = Callable[[str | None], docker.APIClient]
"""Builds a client for an engine URL (``None``: the SDK's default socket)."""

DEFAULT_WORKERS: Final = 32
"""Threads of the provisioner's own executor (made as needed; idle ones cost no CPU); its
client keeps twice as many engine connections (see :func:`default_client`). With 4 threads the
starts of a burst queued four at a time, and the last of 20 containers ran 1.27x later than 20
raw concurrent create+starts (four bursts: 1.25 to 1.32); with 32, 1.16x and 1.09x in two runs.
For a burst of 50 the runs disagree (1.22x with 4; 1.05x and 1.24x with 32):
docs/performance.md."""
_MIB: Final = 1024 * 1024
_GONE_TIMEOUT: Final = 30.0
"""Seconds a removal may stay "in progress" before stop gives up."""
_POLL_FIRST: Final = 0.02
_POLL_MAX: Final = 0.25
_EXIT_EVENTS: Final = {
    "type": "container",
    "event": ["die", "destroy"],
    "label": f"{LABEL_MANAGED}=true",
}
"""The events that can end a runner's container: its main process exited or was killed
(``die``), or the container was removed (``destroy``; also ``auto_remove``)."""
_RECONNECT_FIRST: Final = 0.2
_RECONNECT_MAX: Final = 5.0
_EVENTS_STOP_TIMEOUT: Final = 1.0
"""Seconds :meth:`DockerProvisioner.close` waits for an event stream's thread to end."""


class DockerProvisionerError(ProvisionerError):
    """A container could not be created, started, stopped or listed; the message says which
    runner, image or engine, and what the engine answered."""


# --------------------------------------------------------------------------------------------
# Engine endpoint


@dataclass(frozen=True)
class EngineEndpoint:
    """Where the Docker engine is, and which setting said so (for the log)."""

    url: str | None
    """``unix://``, ``tcp://`` or ``ssh://`` URL; ``None`` means the SDK's default socket."""
    source: str
    """``docker.host``, ``provisioner``, ``DOCKER_HOST``, ``docker context NAME`` or
    ``default``."""


def resolve_engine(
    option: str = "",
    *,
    default: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> EngineEndpoint:
    """The engine a runner's containers go to; see the module docstring for the order.

    Reads the docker CLI's files directly (no ``docker context inspect`` subprocess). A context
    whose ``unix://`` socket does not exist is skipped, as a stopped Colima or Docker Desktop
    leaves its context behind.
    """
    env = os.environ if environ is None else environ
    if option:
        return EngineEndpoint(option, "docker.host")
    if default:
        return EngineEndpoint(default, "provisioner")
    if env.get("DOCKER_HOST"):
        return EngineEndpoint(env["DOCKER_HOST"], "DOCKER_HOST")
    found = _context_endpoint(env)
    if found is not None:
        return found
    return EngineEndpoint(None, "default")


def _context_endpoint(env: Mapping[str, str]) -> EngineEndpoint | None:
    config_dir = Path(env.get("DOCKER_CONFIG") or Path.home() / ".docker")
    name = env.get("DOCKER_CONTEXT") or _read_json(config_dir / "config.json").get("currentContext")
    if not isinstance(name, str) or name in ("", "default"):
        return None
    # The CLI stores each context under the SHA-256 of its name.
    digest = hashlib.sha256(name.encode()).hexdigest()
    meta = _read_json(config_dir / "contexts" / "meta" / digest / "meta.json")
    host = meta.get("Endpoints", {}).get("docker", {}).get("Host")
    if not isinstance(host, str) or not host:
        return None
    if host.startswith("unix://") and not os.path.exists(host.removeprefix("unix://")):
        return None
    return EngineEndpoint(host, f"docker context {name}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def default_client(url: str | None) -> docker.APIClient:
    """The client :class:`DockerProvisioner` uses unless given a ``client_factory``.

    The API version is negotiated (``auto``) so older engines work; TLS for ``tcp://`` comes
    from ``DOCKER_TLS_VERIFY``/``DOCKER_CERT_PATH`` as for the docker CLI; ``ssh://`` uses the
    system ``ssh`` (its config, agent and known_hosts) and needs ``paramiko`` installed.
    """
    tls = kwargs_from_env().get("tls", False) if url and url.startswith("tcp://") else False
    client = docker.APIClient(
        base_url=url,
        version="auto",
        tls=tls,
        use_ssh_client=bool(url and url.startswith("ssh://")),
        # Room for every worker's call and the streams that hold a connection between reads
        # (exit events, pulls): a fuller pool drops the connection it gets back, with a warning.
        max_pool_size=2 * DEFAULT_WORKERS,
    )
    _keep_engine_connections(client)
    return client


def _keep_engine_connections(client: docker.APIClient) -> None:
    """Make a socket engine's client reuse its connections, and skip the proxy and netrc lookups
    that cannot apply to a socket.

    The SDK's adapter for ``unix://`` (and ``npipe://``, ``ssh://``) keys its connection pools by
    each request's whole URL (``docker/transport/unixconn.py``, ``get_connection``), so every
    call that names a new container (create, start, inspect, kill, remove) opens a new
    connection to the engine, and past 25 URLs each new pool closes an older one: measured on
    this machine, 2 connections per runner start instead of none. Keyed by the engine instead,
    the calls share one pool of keep-alive connections, as the Go client's do. TCP engines use
    the SDK's stock adapter, which already pools by host, and keep the environment's proxy
    settings (``trust_env``): only a socket engine drops them.
    """
    if not str(client.base_url).startswith("http+docker://"):
        return
    client.trust_env = False
    adapter = getattr(client, "_custom_adapter", None)
    get_connection = getattr(adapter, "get_connection", None)
    if adapter is None or get_connection is None or not hasattr(adapter, "pools"):
        return  # another SDK layout: its own pooling stands
    engine = str(client.base_url)

    def connection_for_engine(url: str, proxies: Mapping[str, str] | None = None) -> Any:
        return get_connection(engine, proxies)

    # Both ways a requests version reaches the pool go through get_connection: requests >= 2.32.2
    # via the SDK's get_connection_with_tls_context, older ones directly.
    setattr(adapter, "get_connection", connection_for_engine)  # noqa: B010 - an SDK instance
    # The version negotiation's pool, keyed by its URL, would keep its connection idle for good.
    adapter.pools.clear()


# --------------------------------------------------------------------------------------------
# Provisioner


class DockerProvisioner(ClosingContext):
    """Creates one container per runner and removes it when the runner stops.

    ``host`` is the engine for runners without their own ``docker.host`` (default: resolved as
    the module docstring says). ``client_factory`` builds the client for an engine URL (a seam
    for tests; default :func:`default_client`). ``executor`` runs the SDK calls (default: an
    own pool of :data:`DEFAULT_WORKERS` threads, shut down by :meth:`close`).
    """

    def __init__(
        self,
        *,
        host: str | None = None,
        logger: BoundLogger | None = None,
        client_factory: ClientFactory | None = None,
        executor: Executor | None = None,
    ) -> None:
        self._default_host = host or None
        self._log = logger or get_logger("outrunner.provisioners.docker")
        self._client_factory = client_factory or default_client
        self._workers = Workers(executor, max_workers=DEFAULT_WORKERS, name="outrunner-docker")
        self._call = self._workers.call
        self._endpoints: dict[str, EngineEndpoint] = {}
        self._clients: dict[str | None, docker.APIClient] = {}
        self._connecting = asyncio.Lock()
        self._pulls: dict[tuple[str | None, str], _Pulls] = {}
        # The engine option of each runner this instance started, so stop() finds its engine.
        self._runner_hosts: dict[str, str] = {}
        # One exit-event stream per engine client, made by the first wait_exited on that engine.
        self._exit_events: dict[docker.APIClient, _ExitEvents] = {}
        self._closed = False

    @classmethod
    def for_runner(
        cls,
        runner: RunnerConfig,
        *,
        logger: BoundLogger | None = None,
        client_factory: ClientFactory | None = None,
        executor: Executor | None = None,
    ) -> DockerProvisioner:
        """A provisioner whose default engine is ``runner.docker.host``, so that orphan cleanup
        (which has only a name prefix to go on) looks at the engine that runner entry uses."""
        host = runner.docker.host if runner.docker is not None else ""
        return cls(
            host=host or None, logger=logger, client_factory=client_factory, executor=executor
        )

    # -- the Provisioner protocol ------------------------------------------------------------

    async def start(self, request: RunnerRequest) -> None:
        """Create and start the runner's container; returns once its command was launched.

        Images are handled as ``docker run`` does: the container is created straight away, and
        only when the engine answers that the image is missing is it pulled (``pull:
        missing``) and the container created again; ``pull: always`` pulls before the create.
        On failure or cancellation the container (if one was made) is removed before this
        returns. Raises :class:`DockerProvisionerError`.
        """
        self._check_open()
        options = _options_of(request)
        client = await self._client(options.host)
        log = self._log.bind(name=request.name)
        self._runner_hosts[request.name] = options.host
        # The exit stream is open before the container starts, so its wait_exited can trust
        # the stream instead of asking the engine (see _ExitEvents).
        watcher = self._exit_watcher(client)
        try:
            container_id = await self._create_and_start(client, request, options, log, watcher)
        except BaseException:
            self._runner_hosts.pop(request.name, None)
            watcher.forget(request.name)
            raise
        log.info("Container started", image=options.image, id=container_id[:12])

    async def stop(self, name: str) -> None:
        """Stop the runner's container (SIGTERM, then SIGKILL after its ``stop_timeout``) and
        remove it. Unknown or already removed containers are not an error; a container of that
        name that outrunner did not create is left alone."""
        self._check_open()
        client = await self._client(self._runner_hosts.get(name, ""))
        watcher = self._exit_events.get(client)
        if watcher is not None:
            watcher.forget(name)
        info = await self._inspect(client, name)
        if info is None:
            self._runner_hosts.pop(name, None)
            return
        if not _is_ours(info, name):
            self._log.warning("Not stopping a container outrunner did not create", name=name)
            return
        await self._terminate(client, info, name)
        await self._remove(client, str(info["Id"]), name)
        self._runner_hosts.pop(name, None)
        self._log.debug("Container removed", name=name)

    async def close(self) -> None:
        """Stop the event streams, close the engine clients and the executor; safe to call more
        than once. A :meth:`wait_exited` still waiting raises :class:`DockerProvisionerError`.

        Containers are left alone: stopping runners is the Scaler's job, and a restarted
        outrunner adopts (:meth:`adopt`) or cleans up (:meth:`cleanup`) what is left.
        """
        if self._closed:
            return
        self._closed = True
        watchers = list(self._exit_events.values())
        self._exit_events.clear()
        for watcher in watchers:
            await watcher.close(self._call)
        clients = list(self._clients.values())
        self._clients.clear()
        for client in clients:
            await self._call(client.close)
        await self._workers.close(_GONE_TIMEOUT)

    # -- OrphanCleaner ---------------------------------------------------------------------------

    async def cleanup(self, prefix: str, *, keep: Collection[str] = ()) -> list[str]:
        """Remove the containers labelled ``outrunner=true`` whose name is a runner name of
        ``prefix`` (see :func:`~outrunner.provisioner.is_runner_name`), except those named in
        ``keep`` (runners that were adopted); return the names removed.

        Looks at the default engine and every engine this instance has talked to. Containers
        that could not be removed are logged and left out of the result.
        """
        self._check_open()
        await self._client("")
        kept = frozenset(keep)
        removed: set[str] = set()
        for client in list(self._clients.values()):
            found = await self._call(
                client.containers, all=True, filters={"label": f"{LABEL_MANAGED}=true"}
            )
            names = [n for n in _names_of(found) if is_runner_name(n, prefix) and n not in kept]
            results = await asyncio.gather(
                *(self._remove(client, name) for name in names), return_exceptions=True
            )
            for name, result in zip(names, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):
                        raise result
                    self._log.error("Failed to remove orphan container", name=name, error=result)
                else:
                    removed.add(name)
                    self._runner_hosts.pop(name, None)
        if removed:
            self._log.info("Removed orphan containers", prefix=prefix, count=len(removed))
        return sorted(removed)

    async def exited(self, name: str) -> bool:
        """True when the runner's container is gone or no longer running (a cheap status query:
        one inspect), e.g. because the runner process died."""
        self._check_open()
        client = await self._client(self._runner_hosts.get(name, ""))
        return await self._ended(client, name)

    # -- ExitWatcher -----------------------------------------------------------------------------

    async def wait_exited(self, name: str) -> None:
        """Return once the runner's container is gone or no longer running: its main process
        exited or was killed, or the container was removed (by :meth:`stop`, by hand, or by the
        engine's ``auto_remove``). Returns at once for an unknown or already ended container.

        Listens to the engine's event stream instead of polling, so it returns within a few
        milliseconds of the exit. While the engine cannot be reached (it restarts), it keeps
        waiting and looks again once the stream is back. Cancel it to stop waiting. Raises
        :class:`DockerProvisionerError` when the provisioner is closed (also while waiting) or
        no client for the runner's engine can be made.
        """
        self._check_open()
        client = await self._client(self._runner_hosts.get(name, ""))
        self._check_open()  # closed while connecting: no new stream may start
        await self._exit_watcher(client).wait(name)

    def _exit_watcher(self, client: docker.APIClient) -> _ExitEvents:
        """The engine's exit-event stream, opened on first use."""
        watcher = self._exit_events.get(client)
        if watcher is None:
            watcher = _ExitEvents(client, partial(self._inspect, client), self._log)
            self._exit_events[client] = watcher
        return watcher

    # -- Adopter -----------------------------------------------------------------------------

    async def adopt(self, name: str, runner: RunnerConfig) -> bool:
        """Take over container ``name`` of runner entry ``runner``, started by an earlier
        outrunner process. True when it exists on the runner's engine, is outrunner's (labelled
        ``outrunner=true``, ``outrunner.name=<name>`` and ``outrunner.scaleset=<runner.name>``)
        and its main process runs; from then on :meth:`stop`, :meth:`exited` and
        :meth:`wait_exited` find it as if this instance had started it.

        False when there is no such container or its runner has ended; the caller then calls
        :meth:`stop`, which removes an ended leftover. False, logged and left alone, for a
        container of that name that outrunner did not create for this scale set. Raises
        :class:`DockerProvisionerError` when the engine cannot be asked.
        """
        self._check_open()
        option = runner.docker.host if runner.docker is not None else ""
        client = await self._client(option)
        info = await self._inspect(client, name)
        if info is None:
            return False
        if not _is_ours(info, name) or _labels(info).get(LABEL_SCALE_SET) != runner.name:
            self._log.warning(
                "Not adopting a container outrunner did not create for this scale set",
                name=name,
                scale_set=runner.name,
            )
            return False
        self._runner_hosts[name] = option  # so that stop() removes it also when it has ended
        if not _is_running(info):
            status = (info.get("State") or {}).get("Status")
            self._log.info(
                "Not adopting a container whose runner has ended", name=name, status=status
            )
            return False
        self._log.info("Adopted container", name=name, id=str(info["Id"])[:12])
        return True

    # -- engine clients ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise DockerProvisionerError("the Docker provisioner is closed")

    async def _client(self, option: str) -> docker.APIClient:
        """The client for a runner's ``docker.host`` option (``""``: the default engine)."""
        endpoint = self._endpoints.get(option)
        if endpoint is None:  # resolved once: it may read the docker CLI's files
            endpoint = self._endpoints[option] = resolve_engine(option, default=self._default_host)
        client = self._clients.get(endpoint.url)
        if client is not None:
            return client
        async with self._connecting:  # one client per endpoint, even under concurrent starts
            client = self._clients.get(endpoint.url)
            if client is None:
                # Shielded: a start cancelled while connecting must not drop a client that is
                # made anyway in its thread; the task registers it for close() to close.
                client = await asyncio.shield(asyncio.ensure_future(self._connect(endpoint)))
        return client

    async def _connect(self, endpoint: EngineEndpoint) -> docker.APIClient:
        where = endpoint.url or "the default socket"
        try:
            client = await self._call(self._client_factory, endpoint.url)
        except Exception as exc:
            raise DockerProvisionerError(
                f"cannot reach the Docker engine at {where} (from {endpoint.source}): "
                f"{_explain(exc)}"
            ) from exc
        self._clients[endpoint.url] = client
        self._log.info(
            "Docker engine", host=where, source=endpoint.source, api_version=client.api_version
        )
        return client

    # -- image -----------------------------------------------------------------------------

    async def _pull_once(
        self, client: docker.APIClient, image: str, log: BoundLogger, seen: int
    ) -> None:
        """Pull ``image`` unless a pull of it on this engine ended since the caller read
        ``seen`` (:attr:`_Pulls.ended`); then that pull's outcome is the caller's.

        One pull per image and engine at a time: starts that need the image while it is being
        pulled wait for that pull instead of pulling again, and a failed pull fails them with
        its message. The lock is held around the pull only, never around a create, so starts of
        a present image never wait for one another.
        """
        pulls = self._pulls.setdefault((client.base_url, image), _Pulls())
        async with pulls.lock:
            if pulls.ended != seen:
                if pulls.failure is not None:
                    raise DockerProvisionerError(pulls.failure)
                return
            try:
                await self._pull(client, image, log)
            except DockerProvisionerError as exc:
                pulls.ended += 1
                pulls.failure = str(exc)
                raise
            pulls.ended += 1
            pulls.failure = None

    async def _pull(self, client: docker.APIClient, image: str, log: BoundLogger) -> None:
        log.info("Pulling image", image=image)
        began = time.monotonic()
        try:
            stream = await self._call(client.pull, image, stream=True, decode=True)
        except Exception as exc:
            raise DockerProvisionerError(f"pull image {image}: {_explain(exc)}") from exc
        progress = _PullProgress(log.bind(image=image))
        reader = _StreamReader(self._workers.executor, stream)
        try:
            async for line in reader:
                if "error" in line:
                    raise DockerProvisionerError(f"pull image {image}: {line['error']}")
                progress.update(line)
        except DockerProvisionerError:
            raise
        except Exception as exc:
            raise DockerProvisionerError(f"pull image {image}: {_explain(exc)}") from exc
        finally:
            reader.close()
        log.info("Pulled image", image=image, seconds=round(time.monotonic() - began, 1))

    # -- container -------------------------------------------------------------------------

    async def _create_and_start(
        self,
        client: docker.APIClient,
        request: RunnerRequest,
        options: DockerImage,
        log: BoundLogger,
        watcher: _ExitEvents,
    ) -> str:
        spec = _container_spec(client, request, options)
        image = options.image
        # Pulls of this image that had ended when this start began: a pull ending later may be
        # the one this start needs (see _pull_once).
        pulls = self._pulls.get((client.base_url, image))
        seen = pulls.ended if pulls is not None else 0
        if options.pull == "always":
            await self._pull_once(client, image, log, seen)
        # The create future is kept (and shielded) so that, whatever interrupts start, the
        # container it makes is found and removed, even if the call is still running in its
        # thread when the cancellation arrives. A create the engine refused for a missing image
        # made nothing (no container of that name exists), so after a pull only the second
        # create's future needs undoing.
        created = self._workers.submit(partial(client.create_container, **spec))
        try:
            try:
                result = await asyncio.shield(created)
            except docker.errors.ImageNotFound:
                if options.pull != "missing":
                    raise
                await self._pull_once(client, image, log, seen)
                created = self._workers.submit(partial(client.create_container, **spec))
                result = await asyncio.shield(created)
            container_id = str(result["Id"])
            log.debug("Container created", id=container_id[:12])
            watcher.started(request.name, container_id)
            await self._call(client.start, container_id)
        except BaseException as exc:
            await self._undo_create(client, created)
            error = _start_error(exc, request, options)
            if error is exc:
                raise
            raise error from exc
        return container_id

    async def _undo_create(self, client: docker.APIClient, created: asyncio.Future[Any]) -> None:
        await self._workers.undo(self._remove_created(client, created))

    async def _remove_created(self, client: docker.APIClient, created: asyncio.Future[Any]) -> None:
        try:
            result = await created
        except Exception:
            return  # nothing was created
        try:
            await self._remove(client, str(result["Id"]))
        except Exception as exc:
            self._log.error("Failed to remove a container whose start failed", error=exc)

    async def _ended(self, client: docker.APIClient, name: str) -> bool:
        info = await self._inspect(client, name)
        return info is None or not _is_running(info)

    async def _inspect(self, client: docker.APIClient, ref: str) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = await self._call(client.inspect_container, ref)
        except docker.errors.NotFound:
            return None
        except Exception as exc:
            raise DockerProvisionerError(f"inspect container {ref}: {_explain(exc)}") from exc
        return info

    async def _terminate(self, client: docker.APIClient, info: dict[str, Any], name: str) -> None:
        """Send the stop signal and wait up to the container's stop timeout for it to exit.

        This is ``docker stop`` split into short calls: the SDK's ``stop`` would hold a worker
        thread for the whole timeout.
        """
        config = info.get("Config") or {}
        timeout = config.get("StopTimeout")
        timeout = 10 if timeout is None else int(timeout)
        if timeout <= 0 or not _is_running(info):
            return
        ref = str(info["Id"])
        try:
            await self._call(client.kill, ref, signal=config.get("StopSignal") or "SIGTERM")
        except docker.errors.APIError as exc:
            if exc.status_code in (404, 409):  # gone, or no longer running
                return
            raise DockerProvisionerError(f"stop container {name}: {_explain(exc)}") from exc
        deadline = time.monotonic() + timeout
        for delay in backoff(_POLL_FIRST, _POLL_MAX):
            state = await self._inspect(client, ref)
            if state is None or not _is_running(state):
                return
            if time.monotonic() >= deadline:
                return  # the forced removal kills it
            await asyncio.sleep(delay)

    async def _remove(self, client: docker.APIClient, ref: str, name: str = "") -> None:
        """Force-remove ``ref`` (a name or ID; ``name`` is for messages) and return once it is
        gone; a missing container is fine.

        A 409 means the engine is already removing it (``auto_remove`` after the runner
        exited): retry until the engine answers 404, bounded by :data:`_GONE_TIMEOUT`.
        """
        deadline = time.monotonic() + _GONE_TIMEOUT
        for delay in backoff(_POLL_FIRST, _POLL_MAX):
            try:
                await self._call(client.remove_container, ref, force=True)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code != 409:
                    raise DockerProvisionerError(
                        f"remove container {name or ref}: {_explain(exc)}"
                    ) from exc
            else:
                return
            if time.monotonic() >= deadline:
                raise DockerProvisionerError(
                    f"container {name or ref} is still being removed after {_GONE_TIMEOUT:.0f} s"
                )
            await asyncio.sleep(delay)


# --------------------------------------------------------------------------------------------
# Helpers


def _options_of(request: RunnerRequest) -> DockerImage:
    options = request.runner.docker
    if options is None:
        raise DockerProvisionerError(
            f"runner {request.name}: scale set {request.runner.name} has no docker section"
        )
    return options


def _container_spec(
    client: docker.APIClient, request: RunnerRequest, options: DockerImage
) -> dict[str, Any]:
    """Keyword arguments of ``create_container``; holds the JIT config, so never log it."""
    command = [options.runner_cmd]
    environment = [f"{key}={value}" for key, value in options.env.items()]
    if options.jit_via == "arg":
        command += ["--jitconfig", request.jit_config]
    else:
        environment.append(f"{JIT_ENV}={request.jit_config}")
    mounts = [
        docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only)
        for m in options.mounts
    ]
    host_config = client.create_host_config(
        auto_remove=options.auto_remove,
        mounts=mounts,
        network_mode=options.network or None,
        nano_cpus=round(options.cpus * 1e9) if options.cpus is not None else None,
        mem_limit=options.memory * _MIB if options.memory is not None else None,
        privileged=options.privileged,
        runtime=options.runtime or None,
    )
    return {
        "image": options.image,
        "command": command,
        "name": request.name,
        "environment": environment,
        "labels": {
            LABEL_MANAGED: "true",
            LABEL_NAME: request.name,
            LABEL_SCALE_SET: request.runner.name,
        },
        "user": options.user or None,
        "stop_timeout": options.stop_timeout,
        "host_config": host_config,
        "detach": True,
    }


def _start_error(exc: BaseException, request: RunnerRequest, options: DockerImage) -> BaseException:
    """What a failed create and start raises: ``exc`` itself when it says enough already (a
    pull's error, a cancellation), else a :class:`DockerProvisionerError` naming the runner and
    image."""
    if isinstance(exc, DockerProvisionerError) or not isinstance(exc, Exception):
        return exc
    image = options.image
    if isinstance(exc, docker.errors.ImageNotFound):
        if options.pull == "never":
            return DockerProvisionerError(
                f"image {image} is not present on the Docker engine and pull is never"
            )
        return DockerProvisionerError(
            f"image {image} is not present on the Docker engine after it was pulled: "
            f"{_explain(exc)}"
        )
    return DockerProvisionerError(f"start container {request.name} from {image}: {_explain(exc)}")


def _labels(info: Mapping[str, Any]) -> Mapping[str, str]:
    labels: Mapping[str, str] = (info.get("Config") or {}).get("Labels") or {}
    return labels


def _is_ours(info: Mapping[str, Any], name: str) -> bool:
    labels = _labels(info)
    return bool(labels.get(LABEL_MANAGED) == "true" and labels.get(LABEL_NAME, name) == name)


def _is_running(info: Mapping[str, Any]) -> bool:
    return bool((info.get("State") or {}).get("Running", False))


def _names_of(containers: list[dict[str, Any]]) -> list[str]:
    # The list API gives names with a leading "/" (a legacy of container links).
    return [name.lstrip("/") for c in containers for name in c.get("Names") or []]


def _explain(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__


class _ExitEvents:
    """The ``die`` and ``destroy`` events of one engine's outrunner containers, shared by every
    :meth:`DockerProvisioner.wait_exited` on that engine.

    Why a thread of its own: the event stream is one HTTP response that stays open as long as
    the provisioner and blocks in every read until the engine has something to say. Read through
    the provisioner's pool (as :class:`_StreamReader` reads a pull) it would hold one of its
    :data:`DEFAULT_WORKERS` threads for good. So each engine's stream gets one daemon thread that
    only reads, hands each event's container name to the event loop
    (``call_soon_threadsafe``) and, when the stream breaks, subscribes again with backoff (its
    delays wait on an event that :meth:`close` sets). All bookkeeping happens on the event loop.

    Race-free: a waiter inspects the container once after registering, so an exit before that is
    seen there and a later one arrives as an event; every (re)subscription inspects all waited
    names again, so an exit while the stream was down is seen then. The subscription also asks
    for the events of the second before it (``since``), because the engine sends its response
    headers before it subscribes.

    An event for the container ID a waiter's inspect saw running releases that name's waiters at
    once: ``die`` means that container's main process ended, ``destroy`` that it is gone. Any
    other event for a waited name only means "look again" (an inspect), so replayed or stale
    events cannot release a waiter early. The fast path matters when many runners end at once:
    the confirming inspect would queue behind starts and removals in the provisioner's pool.

    A container this provisioner starts while the stream is up needs no inspect at all: the
    start announces its ID (:meth:`started`) before the engine runs it, so its ``die`` or
    ``destroy`` is on the stream, and is kept until the runner's wait comes, when it comes
    before. The waiter trusts the stream only if it has stayed subscribed since the start (the
    subscription count has not moved); otherwise it inspects as above. In a burst this saves one
    engine call per runner, which would queue in the provisioner's pool between the creates
    and starts of the runners after it.
    """

    def __init__(
        self,
        client: docker.APIClient,
        inspect: Callable[[str], Awaitable[dict[str, Any] | None]],
        log: BoundLogger,
    ) -> None:
        self._client = client
        self._inspect = inspect
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._running_ids: dict[str, str] = {}  # waited name -> ID an inspect saw running
        self._subscriptions = 0  # subscriptions the loop has heard of
        self._subscribed = False  # and whether the latest is still up
        # Containers started while the stream was up, by name, until their first wait.
        self._started: dict[str, _Started] = {}
        self._checks: set[asyncio.Task[None]] = set()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # hands the open stream between the thread and close()
        self._stream: CancellableStream[dict[str, Any]] | None = None
        self._thread = threading.Thread(
            target=self._read, name="outrunner-docker-events", daemon=True
        )
        self._thread.start()

    def started(self, name: str, container_id: str) -> None:
        """Note that the container ``container_id`` named ``name`` is about to be started."""
        if self._subscribed:
            self._started[name] = _Started(container_id, self._subscriptions)
        else:
            self.forget(name)

    def forget(self, name: str) -> None:
        """Drop what :meth:`started` noted of ``name`` (its start failed, or it is stopped)."""
        self._started.pop(name, None)

    async def wait(self, name: str) -> None:
        """Return once ``name`` is gone or not running; raises when closed meanwhile."""
        future: asyncio.Future[None] = self._loop.create_future()
        waiters = self._waiters.setdefault(name, set())
        waiters.add(future)
        started = self._started.pop(name, None)
        try:
            if started is not None and started.ended:
                return
            if (
                started is not None
                and self._subscribed
                and started.subscription == self._subscriptions
            ):
                self._running_ids[name] = started.container_id
                await future
            elif not await self._looks_ended(name):
                await future
        finally:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: close() may have failed it as the inspect ended
            waiters.discard(future)
            if not waiters and self._waiters.get(name) is waiters:
                del self._waiters[name]
                self._running_ids.pop(name, None)

    async def close(self, call: Callable[..., Awaitable[Any]]) -> None:
        """Stop the thread (closing the stream unblocks its read), release the waiters with an
        error and wait up to :data:`_EVENTS_STOP_TIMEOUT` for the thread to end, in ``call``'s
        pool so the event loop does not block."""
        self._stopping.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            _close_stream(stream)
        for task in list(self._checks):
            await cancel_and_wait(task)
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(
                        DockerProvisionerError("the Docker provisioner was closed")
                    )
        await call(self._thread.join, _EVENTS_STOP_TIMEOUT)
        if self._thread.is_alive():  # an ssh:// stream cannot be cancelled, see _close_stream
            self._log.warning("Docker event stream still open after close; it ends with the engine")

    # -- on the event loop -----------------------------------------------------------------

    def _check(self, name: str) -> None:
        if self._stopping.is_set():
            return
        task = self._loop.create_task(self._release_if_ended(name))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def _on_event(self, name: str, container_id: str) -> None:
        started = self._started.get(name)
        if started is not None and started.container_id == container_id:
            started.ended = True
        if name not in self._waiters:
            return
        if self._running_ids.get(name) == container_id:
            self._release(name)
        else:
            self._check(name)

    def _on_subscribed(self) -> None:
        self._subscriptions += 1
        self._subscribed = True
        for name in list(self._waiters):
            self._check(name)

    def _on_unsubscribed(self) -> None:
        self._subscribed = False

    async def _release_if_ended(self, name: str) -> None:
        if await self._looks_ended(name):
            self._release(name)

    def _release(self, name: str) -> None:
        for future in self._waiters.get(name, ()):
            if not future.done():
                future.set_result(None)

    async def _looks_ended(self, name: str) -> bool:
        try:
            info = await self._inspect(name)
        except ProvisionerError as exc:
            # An engine hiccup is no exit: keep waiting; the next subscription looks again, and
            # the Scaler polls exited() meanwhile.
            self._log.debug("Cannot inspect an awaited container", name=name, error=str(exc))
            return False
        if info is None or not _is_running(info):
            return True
        if name in self._waiters:
            self._running_ids[name] = str(info["Id"])
        return False

    # -- in the thread -----------------------------------------------------------------------

    def _read(self) -> None:
        delays = backoff(_RECONNECT_FIRST, _RECONNECT_MAX)
        outage: str | None = None  # why the stream is down, logged once per outage
        while not self._stopping.is_set():
            try:
                stream = self._client.events(
                    since=int(time.time()) - 1, filters=_EXIT_EVENTS, decode=True
                )
            except Exception as exc:
                if outage is None:
                    outage = _explain(exc)
                    self._log.warning("Docker event stream unavailable, retrying", error=outage)
                self._stopping.wait(next(delays))
                continue
            with self._lock:
                stopping = self._stopping.is_set()
                if not stopping:
                    self._stream = stream
            if stopping:
                _close_stream(stream)
                return
            if outage is not None:
                self._log.info("Docker event stream subscribed again", after=outage)
                outage = None
            delays = backoff(_RECONNECT_FIRST, _RECONNECT_MAX)
            if not self._post(self._on_subscribed):
                return
            outage = self._forward(stream)
            self._post(self._on_unsubscribed)
            with self._lock:
                self._stream = None
            _close_stream(stream)
            if self._stopping.is_set():
                return
            self._log.warning("Docker event stream broken, subscribing again", error=outage)
            self._stopping.wait(next(delays))

    def _forward(self, stream: CancellableStream[dict[str, Any]]) -> str:
        """Hand each event's container name to the loop until the stream ends; say why it did."""
        try:
            for event in stream:
                actor = event.get("Actor") or {}
                name = (actor.get("Attributes") or {}).get("name")
                container_id = actor.get("ID") or event.get("id")
                if not isinstance(name, str) or not isinstance(container_id, str):
                    continue
                if not self._post(self._on_event, name, container_id):
                    return "the event loop is closed"
        except Exception as exc:
            return _explain(exc)
        return "the engine ended it"

    def _post(self, callback: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: no one is left to wait
            self._stopping.set()
            return False
        return True


@dataclass
class _Started:
    """A container :class:`_ExitEvents` saw announced before its start (see there)."""

    container_id: str
    subscription: int  # the stream's subscription that was up when it started
    ended: bool = False  # its die or destroy arrived before anyone waited


def _close_stream(stream: CancellableStream[Any]) -> None:
    # Shuts the socket down, which unblocks a read in another thread. It raises for a stream
    # that has ended already, and for ssh:// engines (a paramiko channel cannot be cancelled:
    # the thread then ends with the stream's next event or the engine's end).
    with contextlib.suppress(Exception):
        stream.close()


@dataclass
class _Pulls:
    """The pulls of one image on one engine (see :meth:`DockerProvisioner._pull_once`)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while the image is being pulled, and only then."""
    ended: int = 0
    """Pulls that ended, successfully or not (not those cancelled)."""
    failure: str | None = None
    """The error message of the last ended pull, or ``None`` when it succeeded."""


class _PullProgress:
    """Logs a pull's progress at debug, one line per change of a layer's status (the engine
    sends a line per downloaded chunk)."""

    def __init__(self, log: BoundLogger) -> None:
        self._log = log
        self._last: dict[str, str] = {}

    def update(self, line: Mapping[str, Any]) -> None:
        status = str(line.get("status", ""))
        layer = str(line.get("id", ""))
        if not status or self._last.get(layer) == status:
            return
        self._last[layer] = status
        if layer:
            self._log.debug("Pull progress", layer=layer, status=status)
        else:
            self._log.debug("Pull progress", status=status)


class _StreamReader:
    """Reads a blocking SDK stream one item per executor call, from the event loop.

    :meth:`close` closes the stream (and so its HTTP response) once no read is running in a
    thread any more: a generator cannot be closed while another thread is inside it.
    """

    def __init__(self, executor: Executor, stream: Iterator[Any]) -> None:
        self._executor = executor
        self._stream = stream
        self._pending: asyncio.Future[Any] | None = None

    def __aiter__(self) -> _StreamReader:
        return self

    async def __anext__(self) -> Any:
        loop = asyncio.get_running_loop()
        self._pending = loop.run_in_executor(self._executor, next, self._stream, _END)
        item = await asyncio.shield(self._pending)
        if item is _END:
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        pending = self._pending
        if pending is None or pending.done():
            self._close_stream()
        else:
            pending.add_done_callback(lambda _: self._close_stream())

    def _close_stream(self) -> None:
        if self._pending is not None and not self._pending.cancelled():
            self._pending.exception()  # retrieved: a cancelled reader has no one to raise it to
        close = getattr(self._stream, "close", None)
        # RuntimeError: the executor is shut down; the stream then goes with its client.
        if close is not None:
            with contextlib.suppress(RuntimeError):
                self._executor.submit(close)


_END: Final = object()
