"""libvirt backend: one transient QEMU/KVM domain per runner, booted from a qcow2 overlay.

For every runner :class:`LibvirtProvisioner` creates ``<overlay_dir>/<runner>.qcow2`` backed by
the runner entry's golden image (``qemu-img create``; the golden image is never written), boots
a transient domain named after the runner on it, waits until the QEMU guest agent inside
answers ``guest-ping`` and then starts ``<runner_cmd> --jitconfig <jit>`` through the agent's
``guest-exec``. :meth:`~LibvirtProvisioner.stop` destroys the domain (a transient domain is
undefined by that) and deletes the overlay, the serial console log and the EFI variable store,
all of which live next to each other in ``overlay_dir``. See ``docs/libvirt.md``.

Every domain carries outrunner's ``<metadata>`` element (see :mod:`._libvirt_xml`); ``stop``,
orphan cleanup and adoption touch only domains that have it, and read the runner's file paths
(and, once the runner runs, its PID in the guest) from it.

Nothing ties a VM to the outrunner process: the domain is created without
``VIR_DOMAIN_START_AUTODESTROY``, so libvirtd keeps it when the connection that made it closes
or its process dies; the runner is a child of the guest agent, not of a host process; the files
are QEMU's. A restarted outrunner takes a live runner over with
:meth:`~LibvirtProvisioner.adopt`.

Exits: :meth:`~LibvirtProvisioner.wait_exited` listens to the domains' lifecycle events (one
subscription per connection; libvirt's event loop runs in a thread of its own, see
:mod:`._libvirt_events`), and polls :meth:`~LibvirtProvisioner.exited` where a connection has
no events.

Async model: libvirt-python blocks, so every libvirt call runs in a small executor owned by the
provisioner, one short call at a time (a guest agent call is bounded by its own timeout, a few
seconds at most). Waiting for a guest to boot or a domain to vanish is an ``asyncio.sleep`` loop
on the event loop between such calls; no worker thread ever sleeps. ``qemu-img`` runs as an
asyncio subprocess. One connection per URI, opened on first use and re-opened if it dies
(libvirtd restarted).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import stat
import time
import urllib.parse
from collections.abc import Callable, Collection
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import libvirt
import libvirt_qemu

from outrunner._aio import ClosingContext, backoff
from outrunner.config import (
    LIBVIRT_DEFAULT_OVERLAY_DIR,
    LIBVIRT_DEFAULT_URI,
    LibvirtImage,
    RunnerConfig,
)
from outrunner.log import BoundLogger, get_logger
from outrunner.provisioner import ProvisionerError, RunnerRequest, is_runner_name
from outrunner.provisioners._libvirt_events import LifecycleWatch, ensure_event_loop
from outrunner.provisioners._libvirt_xml import (
    METADATA_NS,
    METADATA_PREFIX,
    DomainSpec,
    RunnerFiles,
    RunnerMetadata,
    parse_metadata,
    render_domain_xml,
    render_metadata,
)
from outrunner.provisioners._workers import Workers

__all__ = [
    "DEFAULT_WORKERS",
    "METADATA_NS",
    "AgentCommand",
    "LibvirtProvisioner",
    "LibvirtProvisionerError",
    "connection_uri",
]

AgentCommand = Callable[[libvirt.virDomain, str, int], str]
"""Sends one guest agent command (JSON) to a domain with a timeout in seconds; returns the
reply (JSON). The default is ``libvirt_qemu.qemuAgentCommand``; a seam for tests on the libvirt
test driver, which has no guest agent."""

DEFAULT_WORKERS: Final = 6
"""Threads of the provisioner's own executor. The slowest single calls are a domain destroy
(1-2 s while QEMU exits) and an unanswered agent ping (bounded by :data:`_PING_TIMEOUT`)."""
_PING_TIMEOUT: Final = 2
"""Seconds one ``guest-ping`` may wait for an answer. An agent that is not connected yet fails
at once; this only bounds a connected agent that does not reply."""
_EXEC_TIMEOUT: Final = 10
_STATUS_TIMEOUT: Final = 2
_GONE_TIMEOUT: Final = 30.0
"""Seconds a destroyed domain may take to disappear before stop gives up."""
_QEMU_IMG_TIMEOUT: Final = 120.0
_POLL_FIRST: Final = 0.05
_POLL_MAX: Final = 0.25
_EXIT_POLL_FIRST: Final = 0.1
_EXIT_POLL_MAX: Final = 2.0
"""``wait_exited`` without lifecycle events polls ``exited`` this often (seconds, growing)."""
_REWATCH_FIRST: Final = 0.2
_REWATCH_MAX: Final = 5.0
"""Pauses between attempts to watch again after the connection of a watch was lost."""
_ADOPT_PING_WINDOW: Final = 10.0
"""Seconds adopt keeps pinging the guest agent of a running domain before it gives up: a guest
busy with a job may be slow to answer, and a False destroys the VM (and the job in it)."""

_T = TypeVar("_T")


class LibvirtProvisionerError(ProvisionerError):
    """A VM could not be created, booted, started, stopped or listed; the message says which
    runner, domain or file, and what libvirt, QEMU or the guest agent answered."""


def connection_uri(options: LibvirtImage) -> str:
    """The libvirt URI a runner entry connects to: ``uri``, or for gha-outrunner's ``socket``
    key (only allowed with the default ``uri``) ``qemu+unix:///system?socket=<socket>``."""
    if options.socket:
        return "qemu+unix:///system?socket=" + urllib.parse.quote(options.socket, safe="/")
    return options.uri


# --------------------------------------------------------------------------------------------
# libvirt's process-wide error handler


def _ignore_libvirt_error(_ctx: object, _error: object) -> None:
    # Every error also raises libvirtError, which the provisioner reports through its logger.
    return None


@functools.cache
def _silence_libvirt_stderr() -> None:
    """Replace libvirt's default handler, which prints every error to stderr: a booting guest
    fails a few dozen agent pings, each a line of noise. Process-wide, done once."""
    libvirt.registerErrorHandler(_ignore_libvirt_error, None)


def _qemu_agent_command(domain: libvirt.virDomain, command: str, timeout: int) -> str:
    return libvirt_qemu.qemuAgentCommand(domain, command, timeout, 0)


# --------------------------------------------------------------------------------------------
# Provisioner


@dataclass
class _Runner:
    """What this instance knows about a runner it started (or is starting)."""

    uri: str
    files: RunnerFiles
    pid: int | None = None
    """The runner command's PID in the guest; ``None`` while starting, or when adopted from a
    domain whose metadata has none."""
    exited: bool = False


class LibvirtProvisioner(ClosingContext):
    """Boots one VM per runner and destroys it (and its files) when the runner stops.

    ``uri`` and ``overlay_dir`` are where orphan cleanup looks (runners use their entry's own
    settings; :meth:`for_runner` passes them in). ``executor`` runs the libvirt calls (default:
    an own pool of :data:`DEFAULT_WORKERS` threads, shut down by :meth:`close`).
    ``agent_command`` replaces the guest agent transport (a seam for tests). ``events=False``
    makes :meth:`wait_exited` poll instead of subscribing to lifecycle events.
    """

    def __init__(
        self,
        *,
        uri: str = LIBVIRT_DEFAULT_URI,
        overlay_dir: str = LIBVIRT_DEFAULT_OVERLAY_DIR,
        logger: BoundLogger | None = None,
        executor: Executor | None = None,
        agent_command: AgentCommand | None = None,
        events: bool = True,
    ) -> None:
        _silence_libvirt_stderr()
        self._uri = uri
        self._overlay_dir = overlay_dir
        self._log = logger or get_logger("outrunner.provisioners.libvirt")
        self._agent_command = agent_command or _qemu_agent_command
        self._workers = Workers(executor, max_workers=DEFAULT_WORKERS, name="outrunner-libvirt")
        self._call = self._workers.call
        self._conns: dict[str, libvirt.virConnect] = {}
        self._connecting = asyncio.Lock()
        self._runners: dict[str, _Runner] = {}
        self._checked_dirs: set[str] = set()
        self._events = events
        # One lifecycle subscription per URI, made by the first wait_exited on it.
        self._watches: dict[str, LifecycleWatch] = {}
        self._watching = asyncio.Lock()
        self._no_events: set[str] = set()
        """URIs whose connection refused a lifecycle subscription: wait_exited polls them."""
        self._closed = False

    @classmethod
    def for_runner(
        cls,
        runner: RunnerConfig,
        *,
        logger: BoundLogger | None = None,
        executor: Executor | None = None,
        agent_command: AgentCommand | None = None,
    ) -> LibvirtProvisioner:
        """A provisioner whose cleanup looks at the hypervisor and overlay directory of
        ``runner.libvirt`` (orphan cleanup has only a name prefix to go on)."""
        options = runner.libvirt
        if options is None:
            return cls(logger=logger, executor=executor, agent_command=agent_command)
        return cls(
            uri=connection_uri(options),
            overlay_dir=options.overlay_dir,
            logger=logger,
            executor=executor,
            agent_command=agent_command,
        )

    # -- the Provisioner protocol ------------------------------------------------------------

    async def start(self, request: RunnerRequest) -> None:
        """Create the overlay, boot the VM, wait for its guest agent, start the runner.

        Returns once ``guest-exec`` has launched the runner command. On failure or cancellation
        the domain (if one was made) is destroyed and the runner's files are deleted before
        this returns. Raises :class:`LibvirtProvisionerError`.
        """
        self._check_open()
        name = request.name
        options = _options_of(request)
        uri = connection_uri(options)
        files = RunnerFiles.of(options.overlay_dir, name, efi=options.firmware == "efi")
        log = self._log.bind(name=name)
        if name in self._runners:
            raise LibvirtProvisionerError(f"runner {name} is already started")
        self._runners[name] = runner = _Runner(uri, files)
        began = time.monotonic()
        try:
            # Before anything is made: what fails here must not delete files it did not make.
            await self._prepare_overlay_dir(name, options.overlay_dir, uri, files, log)
        except BaseException:
            self._runners.pop(name, None)
            raise
        created: asyncio.Future[libvirt.virDomain] | None = None
        try:
            await _create_overlay(options.path, files.overlay)
            conn = await self._live_conn(uri)
            xml = render_domain_xml(DomainSpec(name, request.runner.name, options, files))
            # Kept (and shielded) so that whatever interrupts start, the domain this call makes
            # is found and destroyed, even while the call is still running in its thread.
            created = self._workers.submit(conn.createXML, xml, 0)
            try:
                domain = await asyncio.shield(created)
            except libvirt.libvirtError as exc:
                raise LibvirtProvisionerError(
                    f"create VM {name} from {options.path}: {_explain(exc)}"
                ) from exc
            log.debug("Domain created", uri=uri, seconds=_since(began))
            booted = time.monotonic()
            await self._wait_for_agent(name, domain, options, files, log)
            log.info("Guest agent answered", seconds=_since(booted))
            runner.pid = await self._exec_runner(domain, request, options)
            await self._record_pid(domain, RunnerMetadata(request.runner.name, files, runner.pid))
        except BaseException as exc:
            self._runners.pop(name, None)
            await self._undo_start(name, files, created)
            if isinstance(exc, LibvirtProvisionerError):
                raise
            if isinstance(exc, Exception):
                raise LibvirtProvisionerError(f"start VM {name}: {_explain(exc)}") from exc
            raise
        log.info(
            "Runner started in VM",
            cmd=options.runner_cmd,
            pid=runner.pid,
            seconds=_since(began),
        )

    async def stop(self, name: str) -> None:
        """Destroy the runner's VM and delete its overlay, console log and EFI variables.

        Unknown or already vanished VMs are not an error (their leftover files are still
        deleted); a domain of that name that outrunner did not create is left alone.
        """
        self._check_open()
        runner = self._runners.get(name)
        uri = runner.uri if runner is not None else self._uri
        files = runner.files if runner is not None else None
        found = await self._inspect(uri, name)
        if found is None:
            # No such domain: nothing to power off, but files a crash left may still be there.
            await self._remove_files(files or RunnerFiles.of(self._overlay_dir, name, efi=True))
            self._runners.pop(name, None)
            return
        if found.metadata is None:
            self._log.warning("Not stopping a VM outrunner did not create", name=name)
            return
        began = time.monotonic()
        await self._destroy(uri, name)
        await self._remove_files(files or _trusted_files(found.metadata, name))
        self._runners.pop(name, None)
        self._log.info("VM stopped", name=name, seconds=_since(began))

    async def close(self) -> None:
        """End the event subscriptions, close the libvirt connections and the executor; safe to
        call more than once. A :meth:`wait_exited` still waiting raises
        :class:`LibvirtProvisionerError`.

        VMs are left alone: stopping runners is the Scaler's job, and a restarted outrunner
        adopts (:meth:`adopt`) or cleans up (:meth:`cleanup`) what is left.
        """
        if self._closed:
            return
        self._closed = True
        watches = list(self._watches.values())
        self._watches.clear()
        for watch in watches:
            watch.fail(LibvirtProvisionerError("the libvirt provisioner was closed"))
            await self._call(watch.deregister)
        conns = list(self._conns.values())
        self._conns.clear()
        for conn in conns:
            with contextlib.suppress(libvirt.libvirtError):
                await self._call(conn.close)
        await self._workers.close(_GONE_TIMEOUT)

    # -- OrphanCleaner -----------------------------------------------------------------------

    async def cleanup(self, prefix: str, *, keep: Collection[str] = ()) -> list[str]:
        """Destroy the VMs outrunner made whose name is a runner name of ``prefix`` (see
        :func:`~outrunner.provisioner.is_runner_name`) and delete their files; also delete
        runner files of ``prefix`` in the overlay directories that no domain uses. Returns the
        names of the runners removed.

        Runners named in ``keep`` (adopted ones) are left alone: their domains and their files.
        Looks at the provisioner's ``uri`` and ``overlay_dir`` and those of every runner this
        instance started or adopted. Domains without outrunner's metadata are never touched.
        """
        self._check_open()
        kept = frozenset(keep)
        uris = {self._uri, *(r.uri for r in self._runners.values())}
        dirs = {
            self._overlay_dir,
            *(os.path.dirname(r.files.overlay) for r in self._runners.values()),
        }
        removed: set[str] = set()
        alive: set[str] = set(kept)
        for uri in sorted(uris):
            try:
                domains = await self._with(uri, _list_domains, prefix)
            except libvirt.libvirtError as exc:
                raise LibvirtProvisionerError(
                    f"list domains at {uri} for cleanup: {_explain(exc)}"
                ) from exc
            alive.update(found.name for found in domains if found.metadata is None)
            ours = [
                (f.name, f.metadata)
                for f in domains
                if f.metadata is not None and f.name not in kept
            ]
            # Concurrently: each destroy waits a second or two for its QEMU to exit.
            results = await asyncio.gather(
                *(self._remove_orphan(uri, name, metadata) for name, metadata in ours)
            )
            for (name, _), ok in zip(ours, results, strict=True):
                if ok:
                    self._runners.pop(name, None)
                    removed.add(name)
                else:
                    alive.add(name)
        for directory in sorted(dirs):
            leftovers = await self._call(_leftover_files, directory, prefix)
            for name, paths in sorted(leftovers.items()):
                if name in alive or name in self._runners:
                    continue
                try:
                    await self._remove_paths(paths)
                except LibvirtProvisionerError as exc:
                    self._log.error("Failed to remove orphan files", name=name, error=str(exc))
                    continue
                removed.add(name)
        if removed:
            self._log.info("Removed orphan VMs", prefix=prefix, count=len(removed))
        return sorted(removed)

    async def _remove_orphan(self, uri: str, name: str, metadata: RunnerMetadata) -> bool:
        try:
            await self._destroy(uri, name)
            await self._remove_files(_trusted_files(metadata, name))
        except LibvirtProvisionerError as exc:
            self._log.error("Failed to remove orphan VM", name=name, error=str(exc))
            return False
        return True

    async def exited(self, name: str) -> bool:
        """True when the runner's VM is gone or not running, or when the guest agent reports
        that the runner command has exited (cheap: a lookup, and one ``guest-exec-status``
        for runners this instance started). An agent that does not answer counts as running.
        """
        self._check_open()
        runner = self._runners.get(name)
        if runner is not None and runner.exited:
            return True
        uri = runner.uri if runner is not None else self._uri
        try:
            domain = await self._with(uri, _running_domain, name)
        except libvirt.libvirtError as exc:
            raise LibvirtProvisionerError(f"look up VM {name}: {_explain(exc)}") from exc
        if domain is None:
            return True
        if runner is None or runner.pid is None:
            return False
        # qemu-ga forgets a process once it has reported its exit: remember it here.
        runner.exited = await self._runner_exited(domain, runner.pid)
        return runner.exited

    async def _runner_exited(self, domain: libvirt.virDomain, pid: int) -> bool:
        """Whether the guest agent reports the runner process ``pid`` exited; an agent that
        does not answer (or answers nonsense) counts as running."""
        command = {"execute": "guest-exec-status", "arguments": {"pid": pid}}
        try:
            reply = await self._call(
                self._agent_command, domain, json.dumps(command), _STATUS_TIMEOUT
            )
            return bool(json.loads(reply)["return"]["exited"])
        except (libvirt.libvirtError, ValueError, KeyError, TypeError):
            return False

    # -- ExitWatcher -------------------------------------------------------------------------

    async def wait_exited(self, name: str) -> None:
        """Return once :meth:`exited` is true for ``name``: its domain stopped (the guest
        powered off or crashed), was destroyed or vanished, or (seen at the start) its runner
        process has exited. Returns at once for an unknown or already ended runner.

        Woken by the domain's lifecycle events, then confirmed with a lookup, so it returns
        within milliseconds of libvirt reporting the domain stopped. A runner process that ends
        while its guest keeps running raises no event; :meth:`exited` (which the Scaler polls)
        sees that. Where the connection has no events (a driver without them, or
        ``events=False``), it polls :meth:`exited` every 0.1 s growing to 2 s. If the connection
        dies while waiting (libvirtd restarted), it watches again on a new one, retrying with
        backoff. Cancel it to stop waiting. Raises :class:`LibvirtProvisionerError` when the
        first look fails (libvirt unreachable) or the provisioner is closed.
        """
        retries = backoff(_REWATCH_FIRST, _REWATCH_MAX)
        watched = False
        while True:
            self._check_open()
            try:
                if await self._wait_on_watch(name):
                    return
                watched = True
            except LibvirtProvisionerError as exc:
                if not watched or self._closed:
                    raise
                # Lost the connection and cannot watch again yet (libvirtd restarting).
                self._log.debug("Cannot watch VM yet, retrying", name=name, error=str(exc))
                await asyncio.sleep(next(retries))

    async def _wait_on_watch(self, name: str) -> bool:
        """Wait for ``name`` on its connection's watch: True once it ended, False when the
        connection was lost (watch again). Without events, poll until it ended."""
        runner = self._runners.get(name)
        uri = runner.uri if runner is not None else self._uri
        watch = await self._watch(uri)
        if watch is None:
            await self._poll_exited(name)
            return True
        waiter = watch.add(name)
        try:
            # Registered before looking: an end after this look wakes the waiter, one before
            # it is seen by it. woken is cleared before each look for the same reason.
            while not waiter.lost:
                waiter.woken.clear()
                if await self.exited(name):
                    return True
                await waiter.woken.wait()
                if waiter.error is not None:
                    raise waiter.error
            return False
        finally:
            watch.discard(name, waiter)

    async def _poll_exited(self, name: str) -> None:
        for delay in backoff(_EXIT_POLL_FIRST, _EXIT_POLL_MAX):
            if await self.exited(name):
                return
            await asyncio.sleep(delay)

    async def _watch(self, uri: str) -> LifecycleWatch | None:
        """The lifecycle subscription of ``uri``'s connection, made on first use; ``None`` when
        that connection has no events."""
        if not self._events or uri in self._no_events:
            return None
        watch = self._watches.get(uri)
        if watch is not None and not watch.lost:
            return watch
        async with self._watching:  # one subscription per URI, even under concurrent waits
            watch = self._watches.get(uri)
            if watch is None or watch.lost:
                # Shielded: a cancelled waiter must not strand a subscription made in a thread.
                watch = await asyncio.shield(asyncio.ensure_future(self._subscribe(uri)))
        return watch

    async def _subscribe(self, uri: str) -> LifecycleWatch | None:
        conn = await self._live_conn(uri)
        watch = LifecycleWatch(conn, asyncio.get_running_loop(), self._watch_lost)
        try:
            await self._call(watch.register)
        except libvirt.libvirtError as exc:
            self._no_events.add(uri)
            self._log.warning(
                "No lifecycle events from libvirt; wait_exited polls instead",
                uri=uri,
                error=_explain(exc),
            )
            return None
        if self._closed:  # close() ran meanwhile and did not see this one
            await self._call(watch.deregister)
            raise LibvirtProvisionerError("the libvirt provisioner is closed")
        self._watches[uri] = watch
        return watch

    def _watch_lost(self, watch: LifecycleWatch) -> None:
        """libvirt says a watched connection closed (libvirtd went away)."""
        for uri, known in list(self._conns.items()):
            if known is watch.conn:
                self._drop(uri, known)
        watch.lose()

    # -- Adopter -----------------------------------------------------------------------------

    async def adopt(self, name: str, runner: RunnerConfig) -> bool:
        """Take over VM ``name`` of runner entry ``runner``, started by an earlier outrunner
        process. True when the domain exists on the entry's connection, carries outrunner's
        metadata for scale set ``runner.name``, runs, its guest agent answers ``guest-ping``
        (retried for up to 10 s: a guest busy with a job may be slow) and, when the metadata
        records the runner's PID, ``guest-exec-status`` does not report it exited. From then on
        :meth:`stop`, :meth:`exited` and :meth:`wait_exited` handle it as if this instance had
        started it (with the URI and file paths the metadata records).

        False when there is no such domain, or it is not running, its agent is silent or its
        runner has ended; the caller then calls :meth:`stop`, which removes it and its files.
        False, logged and left alone, for a domain of that name that outrunner did not create
        for this scale set. Raises :class:`LibvirtProvisionerError` when libvirt cannot be
        asked.
        """
        self._check_open()
        uri = connection_uri(runner.libvirt) if runner.libvirt is not None else self._uri
        log = self._log.bind(name=name)
        found = await self._inspect(uri, name)
        if found is None:
            log.info("Not adopting a VM that is gone")
            return False
        metadata = found.metadata
        if metadata is None or metadata.scale_set != runner.name:
            log.warning(
                "Not adopting a VM outrunner did not create for this scale set",
                scale_set=runner.name,
            )
            return False
        record = self._runners.get(name)
        if record is None:
            # Known from here on, so that stop() finds its connection and files, whatever
            # the answer.
            record = _Runner(uri, _trusted_files(metadata, name), pid=metadata.pid)
            self._runners[name] = record
        reason = await self._unadoptable(name, found.domain, record)
        if reason is not None:
            record.exited = True
            log.info("Not adopting a VM whose runner cannot be running", reason=reason)
            return False
        log.info("Adopted VM", uri=uri, pid=record.pid)
        return True

    async def _unadoptable(
        self, name: str, domain: libvirt.virDomain, runner: _Runner
    ) -> str | None:
        """Why the runner in ``domain`` cannot be running, or None when it may be."""
        try:
            if not await self._call(_is_running, domain):
                return "the domain is not running"
        except libvirt.libvirtError as exc:
            raise LibvirtProvisionerError(f"look up VM {name}: {_explain(exc)}") from exc
        ping = json.dumps({"execute": "guest-ping"})
        deadline = time.monotonic() + _ADOPT_PING_WINDOW
        for delay in backoff(_POLL_MAX, _POLL_MAX * 8):
            try:
                await self._call(self._agent_command, domain, ping, _PING_TIMEOUT)
                break
            except libvirt.libvirtError as exc:
                if time.monotonic() + delay >= deadline:
                    return f"the guest agent does not answer: {_explain(exc)}"
            await asyncio.sleep(delay)
        if runner.pid is None:
            # The PID is recorded once the runner is launched: without it, the start did not
            # get that far and no runner can be running in the guest.
            return "its runner was never launched (no runner PID in the metadata)"
        if await self._runner_exited(domain, runner.pid):
            return "its runner process has exited"
        return None

    # -- executor and connections ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LibvirtProvisionerError("the libvirt provisioner is closed")

    async def _with(self, uri: str, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(connection, *args)`` in the executor. When the call fails because the
        connection died (libvirtd restarted), reconnect and try once more: every ``fn`` passed
        here is a lookup, a listing or an idempotent destroy."""
        conn = await self._conn(uri)
        try:
            return await self._call(fn, conn, *args)
        except libvirt.libvirtError:
            if await self._call(_alive, conn):
                raise
            self._drop(uri, conn)
        return await self._call(fn, await self._conn(uri), *args)

    async def _live_conn(self, uri: str) -> libvirt.virConnect:
        """The connection for ``uri``, re-opened first if it died (a local check, no RPC)."""
        conn = await self._conn(uri)
        if await self._call(_alive, conn):
            return conn
        self._drop(uri, conn)
        return await self._conn(uri)

    async def _conn(self, uri: str) -> libvirt.virConnect:
        conn = self._conns.get(uri)
        if conn is not None:
            return conn
        async with self._connecting:  # one connection per URI, even under concurrent starts
            conn = self._conns.get(uri)
            if conn is None:
                # Shielded: a start cancelled while connecting must not drop a connection that
                # is made anyway in its thread; the task registers it for close() to close.
                conn = await asyncio.shield(asyncio.ensure_future(self._connect(uri)))
        return conn

    async def _connect(self, uri: str) -> libvirt.virConnect:
        if self._events:
            # Before the first connection: libvirt hooks a connection into its event loop (for
            # events and keepalive) only if one is registered when it opens.
            ensure_event_loop()
        try:
            conn = await self._call(libvirt.open, uri)
        except libvirt.libvirtError as exc:
            raise LibvirtProvisionerError(
                f"cannot connect to libvirt at {uri}: {_explain(exc)}"
            ) from exc
        self._conns[uri] = conn
        self._log.info("Connected to libvirt", uri=uri)
        return conn

    def _drop(self, uri: str, conn: libvirt.virConnect) -> None:
        if self._conns.get(uri) is conn:
            del self._conns[uri]
            self._log.warning("libvirt connection lost; reconnecting on next use", uri=uri)
            watch = self._watches.get(uri)
            if watch is not None and watch.conn is conn:
                del self._watches[uri]
                watch.lose()  # its waiters watch again, on the next connection
            with contextlib.suppress(RuntimeError):  # the executor is already shut down
                self._workers.executor.submit(_retire, conn, watch)

    # -- start -------------------------------------------------------------------------------

    async def _prepare_overlay_dir(
        self, name: str, directory: str, uri: str, files: RunnerFiles, log: BoundLogger
    ) -> None:
        try:
            blocked = await self._call(_ensure_dir, directory, directory not in self._checked_dirs)
            existing = await self._call(_existing, files.paths())
        except OSError as exc:
            raise LibvirtProvisionerError(
                f"overlay_dir {directory}: {exc.strerror or exc}"
            ) from exc
        if directory not in self._checked_dirs:
            self._checked_dirs.add(directory)
            if blocked and _qemu_runs_as_other_user(uri):
                log.warning(
                    "Overlay directory is not searchable by others; QEMU (user libvirt-qemu) "
                    "may fail to open overlays",
                    overlay_dir=directory,
                    blocked=",".join(blocked),
                )
        if existing:
            # Runner names are random; such files belong to someone else, or to a runner of
            # that name still alive. Never overwrite them.
            raise LibvirtProvisionerError(
                f"refusing to start VM {name}: {', '.join(existing)} already exist(s)"
            )

    async def _wait_for_agent(
        self,
        name: str,
        domain: libvirt.virDomain,
        options: LibvirtImage,
        files: RunnerFiles,
        log: BoundLogger,
    ) -> None:
        """Poll ``guest-ping`` until it answers, the domain dies or ``boot_timeout`` passes."""
        deadline = time.monotonic() + options.boot_timeout
        ping = json.dumps({"execute": "guest-ping"})
        last_error = "no answer"
        for polls, delay in enumerate(backoff(_POLL_FIRST, _POLL_MAX, factor=1.5), start=1):
            try:
                await self._call(self._agent_command, domain, ping, _PING_TIMEOUT)
            except libvirt.libvirtError as exc:
                last_error = _explain(exc)
                if not await self._call(_is_running, domain):
                    raise LibvirtProvisionerError(
                        f"VM {name} stopped while booting (powered off or crashed) before its "
                        f"guest agent answered; console log: {files.console}"
                    ) from None
            else:
                log.debug("Guest agent ping answered", polls=polls)
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LibvirtProvisionerError(
                    f"VM {name}: the guest agent did not answer within boot_timeout "
                    f"({options.boot_timeout:g} s); is qemu-guest-agent installed and enabled "
                    f"in {options.path}? Last error: {last_error}. Console log: {files.console}"
                )
            await asyncio.sleep(min(delay, remaining))

    async def _exec_runner(
        self, domain: libvirt.virDomain, request: RunnerRequest, options: LibvirtImage
    ) -> int:
        """``guest-exec`` the runner command; returns its PID in the guest. The command holds
        the JIT config: it is never logged, and libvirt's messages are redacted of it."""
        command = json.dumps(
            {
                "execute": "guest-exec",
                "arguments": {
                    "path": options.runner_cmd,
                    "arg": ["--jitconfig", request.jit_config],
                    "capture-output": False,
                },
            }
        )
        try:
            reply = await self._call(self._agent_command, domain, command, _EXEC_TIMEOUT)
            pid = json.loads(reply)["return"]["pid"]
        except libvirt.libvirtError as exc:
            message = _explain(exc).replace(request.jit_config, "***")
            # from None: the original exception's text may carry the command line.
            raise LibvirtProvisionerError(
                f"start {options.runner_cmd} in VM {request.name} through the guest agent: "
                f"{message}"
            ) from None
        except (ValueError, KeyError, TypeError):
            raise LibvirtProvisionerError(
                f"start {options.runner_cmd} in VM {request.name}: the guest agent's guest-exec "
                "reply has no pid"
            ) from None
        if not isinstance(pid, int):
            raise LibvirtProvisionerError(
                f"start {options.runner_cmd} in VM {request.name}: guest-exec returned pid {pid!r}"
            )
        return pid

    async def _record_pid(self, domain: libvirt.virDomain, metadata: RunnerMetadata) -> None:
        """Add the runner's PID to the domain's metadata, so that a process adopting it later
        can ask the agent whether the runner exited. Not fatal: without it, adoption goes by
        the domain and its agent alone."""
        try:
            await self._call(
                domain.setMetadata,
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                render_metadata(metadata),
                METADATA_PREFIX,
                METADATA_NS,
                libvirt.VIR_DOMAIN_AFFECT_LIVE,
            )
        except libvirt.libvirtError as exc:
            self._log.warning(
                "Cannot record the runner's PID in the VM's metadata",
                name=domain.name(),
                error=_explain(exc),
            )

    async def _undo_start(
        self,
        name: str,
        files: RunnerFiles,
        created: asyncio.Future[libvirt.virDomain] | None,
    ) -> None:
        await self._workers.undo(self._remove_created(name, files, created))

    async def _remove_created(
        self,
        name: str,
        files: RunnerFiles,
        created: asyncio.Future[libvirt.virDomain] | None,
    ) -> None:
        domain = None
        if created is not None:
            with contextlib.suppress(Exception):  # nothing was created
                domain = await created
        try:
            if domain is not None:
                await self._call(_destroy_domain, domain)
            await self._remove_files(files)
        except Exception as exc:
            self._log.error(
                "Failed to remove a VM whose start failed", name=name, error=_explain(exc)
            )

    # -- stop --------------------------------------------------------------------------------

    async def _inspect(self, uri: str, name: str) -> _Found | None:
        try:
            return await self._with(uri, _lookup_with_metadata, name)
        except libvirt.libvirtError as exc:
            raise LibvirtProvisionerError(f"look up VM {name}: {_explain(exc)}") from exc

    async def _destroy(self, uri: str, name: str) -> None:
        """Power the domain off and return once libvirt no longer lists it as running."""
        deadline = time.monotonic() + _GONE_TIMEOUT
        try:
            await self._with(uri, _destroy_named, name)
            for delay in backoff(_POLL_FIRST, _POLL_MAX, factor=1.5):
                if await self._with(uri, _running_domain, name) is None:
                    return
                if time.monotonic() >= deadline:
                    raise LibvirtProvisionerError(
                        f"VM {name} is still running {_GONE_TIMEOUT:.0f} s after destroy"
                    )
                await asyncio.sleep(delay)
        except libvirt.libvirtError as exc:
            raise LibvirtProvisionerError(f"destroy VM {name}: {_explain(exc)}") from exc

    async def _remove_files(self, files: RunnerFiles) -> None:
        await self._remove_paths(files.paths())

    async def _remove_paths(self, paths: tuple[str, ...] | list[str]) -> None:
        failures = await self._call(_unlink_all, tuple(paths))
        if failures:
            raise LibvirtProvisionerError("cannot delete " + "; ".join(failures))


# --------------------------------------------------------------------------------------------
# Blocking helpers: each runs in the executor, one short libvirt call or file operation.


def _error_code(exc: libvirt.libvirtError) -> int | None:
    return exc.get_error_code()


def _alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _retire(conn: libvirt.virConnect, watch: LifecycleWatch | None) -> None:
    """Close a dead connection, after taking our callbacks off it (they keep it referenced)."""
    if watch is not None and watch.conn is conn:
        watch.deregister()
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


def _lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if _error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _is_running(domain: libvirt.virDomain) -> bool:
    try:
        return bool(domain.isActive())
    except libvirt.libvirtError as exc:
        if _error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:  # transient and gone
            return False
        raise


def _running_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    domain = _lookup(conn, name)
    return domain if domain is not None and _is_running(domain) else None


def _metadata(domain: libvirt.virDomain) -> RunnerMetadata | None:
    try:
        xml = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
    except libvirt.libvirtError as exc:
        if _error_code(exc) in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN):
            return None
        raise
    return parse_metadata(xml)


@dataclass(frozen=True)
class _Found:
    domain: libvirt.virDomain
    name: str
    metadata: RunnerMetadata | None
    """outrunner's metadata; ``None``: a domain outrunner did not create."""


def _lookup_with_metadata(conn: libvirt.virConnect, name: str) -> _Found | None:
    domain = _lookup(conn, name)
    if domain is None:
        return None
    return _Found(domain, name, _metadata(domain))


def _list_domains(conn: libvirt.virConnect, prefix: str) -> list[_Found]:
    """Every domain named like a runner of ``prefix``, with outrunner's metadata if it has it."""
    found = []
    for domain in conn.listAllDomains(0):
        try:
            name = domain.name()
            if is_runner_name(name, prefix):
                found.append(_Found(domain, name, _metadata(domain)))
        except libvirt.libvirtError as exc:
            if _error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:  # vanished while listing
                raise
    return found


def _destroy_named(conn: libvirt.virConnect, name: str) -> None:
    domain = _lookup(conn, name)
    if domain is not None:
        _destroy_domain(domain)


def _destroy_domain(domain: libvirt.virDomain) -> None:
    """Power off at once; a domain already gone or not running is fine."""
    try:
        # REMOVE_LOGS: libvirt's own /var/log/libvirt/qemu/<name>.log would otherwise pile up,
        # one file per runner, forever.
        domain.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_REMOVE_LOGS)
    except libvirt.libvirtError as exc:
        code = _error_code(exc)
        if code in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
            try:  # a libvirt (or driver) without that flag
                domain.destroy()
            except libvirt.libvirtError as inner:
                if _error_code(inner) not in (
                    libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_OPERATION_INVALID,
                ):
                    raise
        elif code not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            raise


def _ensure_dir(directory: str, check: bool) -> list[str]:
    """Create ``directory`` (0755) if missing; with ``check``, return the components of its path
    that others cannot search (QEMU under qemu:///system runs as another user)."""
    if not os.path.isdir(directory):
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o755)  # makedirs' mode is filtered by the umask
    if not check:
        return []
    blocked = []
    path = os.path.abspath(directory)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            blocked.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            return blocked
        path = parent


def _existing(paths: tuple[str, ...]) -> list[str]:
    return [p for p in paths if os.path.lexists(p)]


def _unlink_all(paths: tuple[str, ...]) -> list[str]:
    failures = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            failures.append(f"{path}: {exc.strerror or exc}")
    return failures


def _leftover_files(directory: str, prefix: str) -> dict[str, list[str]]:
    """Runner files of ``prefix`` in ``directory``, by runner name."""
    found: dict[str, list[str]] = {}
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return found
    for entry in entries:
        for suffix in RunnerFiles.suffixes():
            name = entry[: -len(suffix)]
            if entry.endswith(suffix) and is_runner_name(name, prefix):
                found.setdefault(name, []).append(os.path.join(directory, entry))
    return found


# --------------------------------------------------------------------------------------------
# Helpers


def _options_of(request: RunnerRequest) -> LibvirtImage:
    options = request.runner.libvirt
    if options is None:
        raise LibvirtProvisionerError(
            f"runner {request.name}: scale set {request.runner.name} has no libvirt section"
        )
    return options


async def _create_overlay(base: str, overlay: str) -> None:
    """``qemu-img create`` a qcow2 overlay backed by ``base``. A cancelled or timed-out run is
    killed; the caller deletes whatever it left."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, overlay]
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except FileNotFoundError:
        raise LibvirtProvisionerError(
            "qemu-img is not installed (Debian/Ubuntu: qemu-utils; Fedora: qemu-img)"
        ) from None
    try:
        async with asyncio.timeout(_QEMU_IMG_TIMEOUT):
            output, _ = await process.communicate()
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.shield(process.wait())
        if isinstance(exc, TimeoutError):
            raise LibvirtProvisionerError(
                f"qemu-img create {overlay} did not finish within {_QEMU_IMG_TIMEOUT:.0f} s"
            ) from None
        raise
    if process.returncode != 0:
        detail = output.decode(errors="replace").strip() or f"exit status {process.returncode}"
        raise LibvirtProvisionerError(f"create overlay {overlay} on {base}: {detail}")


def _trusted_files(metadata: RunnerMetadata, name: str) -> RunnerFiles:
    """The files a domain's metadata names, when they are that runner's files. Metadata is
    writable by anyone with access to libvirt; a path that does not end in the runner's own
    file names is not deleted."""
    files = metadata.files

    def own(path: str | None, suffix: str) -> str | None:
        return path if path and os.path.basename(path) == name + suffix else None

    overlay = own(files.overlay, ".qcow2") or ""
    console = own(files.console, ".console.log") or ""
    return RunnerFiles(overlay=overlay, console=console, nvram=own(files.nvram, "_VARS.fd"))


def _qemu_runs_as_other_user(uri: str) -> bool:
    """True for local system URIs, where QEMU runs as its own user (libvirt-qemu, qemu)."""
    parts = urllib.parse.urlsplit(uri)
    return parts.scheme.split("+")[0] == "qemu" and not parts.hostname and parts.path == "/system"


def _explain(exc: BaseException) -> str:
    if isinstance(exc, libvirt.libvirtError):
        return exc.get_error_message() or str(exc)
    return str(exc) or type(exc).__name__


def _since(began: float) -> float:
    return round(time.monotonic() - began, 2)
