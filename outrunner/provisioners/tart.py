"""Tart backend: one Tart VM per runner, cloned from ``runners.<name>.tart.image``.

For every runner (gha-outrunner 1.1.2's lifecycle, with its failures made loud and clean)::

    tart clone <image> <name>
    tart set <name> --cpu <cpus> --memory <MiB>
    tart run --no-graphics [--dir=<mount>:<source>[:ro]]... <name>      background
    tart exec <name> echo ok                                           until it works
    tart exec -i <name> /bin/sh -c <read the JIT config> <runner_cmd>  background, JIT on stdin

and to stop it: end the runner's ``tart exec``, ``tart stop <name>``, wait for ``tart run`` to
exit, ``tart delete <name>``. A VM that is already stopped or gone is not an error. A start
that fails or is cancelled at any step tears down what it made (processes and clone) before
raising :class:`TartProvisionerError`. See ``docs/tart.md``.

Async model: no thread is used and nothing blocks the event loop. Short tart calls (``clone``,
``set``, probes, ``stop``, ``delete``, ``list``) are :func:`asyncio.create_subprocess_exec`
subprocesses. The two background processes are plain :class:`subprocess.Popen` children,
polled from the event loop (a non-blocking ``waitpid`` every 50 ms, growing to 0.5 s): asyncio's
subprocess transport kills its process when it is closed or garbage collected, which would end
the VM and the runner with outrunner's own exit.

The VM and its runner outlive outrunner: every tart process gets its own session (a Ctrl-C in
outrunner's terminal, or a signal to its process group, does not reach them), the background
processes read only files (``tart run`` ``/dev/null``, the runner's ``exec`` its JIT config,
below) and write only to their capture files, never to a pipe whose reader could die (a write
would then kill them with SIGPIPE), and :meth:`close` leaves them running. A restarted
outrunner takes a live VM over with :meth:`TartProvisioner.adopt`.

Output capture: the stdout and stderr of the two background processes (``run``, labelled
``vm``, and the runner's ``exec``, labelled ``runner``) go to a file each,
``<log_dir>/<runner name>-<label>-<random>.log``. When such a process fails (exits non-zero
by itself, or the VM does not boot in time), the last :data:`TAIL_BYTES` bytes are logged at
ERROR and the file is kept, its path logged; otherwise the file is removed when the runner is
stopped. ``log_dir`` defaults to :func:`default_log_dir`.

The JIT config is in no process's arguments, on the host or in the guest: ``tart exec -i``
forwards its standard input to the command, so the runner's ``exec`` reads the config (one line)
from an anonymous file (see :func:`_secret_file`), and a ``/bin/sh`` wrapper in the guest
(:data:`_JIT_WRAPPER`) reads that line into ``ACTIONS_RUNNER_INPUT_JITCONFIG``, where the
actions runner looks for its ``--jitconfig`` (and which it removes from its environment), then
execs ``runner_cmd`` with no arguments and stdin ``/dev/null``. No log line, error message or
capture file name contains it either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from outrunner._aio import ClosingContext, backoff, cancel_and_wait
from outrunner.config import RunnerConfig, TartImage, TartMount
from outrunner.log import BoundLogger, get_logger
from outrunner.provisioner import ProvisionerError, RunnerRequest, is_runner_name

__all__ = [
    "DEFAULT_STOP_TIMEOUT",
    "TAIL_BYTES",
    "TartProvisioner",
    "TartProvisionerError",
    "default_log_dir",
]

TAIL_BYTES: Final = 1024
"""How much of a failed process's output is logged inline."""
DEFAULT_STOP_TIMEOUT: Final = 30
"""``tart stop --timeout``: seconds between tart's SIGINT to the VM and its SIGKILL (tart's
own default)."""
_PROBE_TIMEOUT: Final = 15.0
"""Longest a single ``tart exec <vm> echo ok`` may take: a probe can hang while the guest
agent's socket is not answering yet."""
_PROBE_FIRST: Final = 0.25
_PROBE_MAX: Final = 2.0
_COMMAND_TIMEOUT: Final = 60.0
"""For ``set``, ``list`` and ``delete``; ``clone`` has none (it may pull tens of GB)."""
_GRACE: Final = 5.0
"""Seconds a signalled tart process gets to exit before SIGKILL."""
_DELETE_RETRY: Final = 10.0
"""How long ``tart delete`` is retried while tart still reports the VM running."""
_NO_ANSWER: Final = "no answer yet"
_EXIT_NOT_FOUND: Final = 2
"""tart's exit status for "does not exist", "is not running" and "is already running"."""
_REAP_FIRST: Final = 0.05
_REAP_MAX: Final = 0.5
"""A background process is polled this often (seconds, growing): how soon its end is seen."""
_ADOPTED_POLL_FIRST: Final = 0.5
_ADOPTED_POLL_MAX: Final = 5.0
"""``wait_exited`` of an adopted VM asks ``tart list`` this often (seconds, growing)."""
_JIT_ENV: Final = "ACTIONS_RUNNER_INPUT_JITCONFIG"
"""Where the actions runner looks for its ``--jitconfig`` argument when it has none (its
``CommandSettings`` reads every ``ACTIONS_RUNNER_INPUT_<arg>`` and removes them from its own
environment, so the jobs it runs do not inherit it)."""
_GUEST_SHELL: Final = "/bin/sh"
"""Absolute: the guest agent looks a bare name up in its own ``PATH``, whatever that is."""
_JIT_WRAPPER: Final = (
    f'IFS= read -r {_JIT_ENV} && [ -n "${_JIT_ENV}" ] || '
    "{ echo 'outrunner: no JIT config on standard input' >&2; exit 1; }; "
    f'export {_JIT_ENV}; exec "$0" "$@" </dev/null'
)
"""The guest side of the hand-over, run as ``/bin/sh -c <this> <runner_cmd>``: one line of
stdin into :data:`_JIT_ENV`, then ``exec <runner_cmd>`` with stdin ``/dev/null`` (as a
non-interactive ``tart exec`` gives its command), so that neither the wrapper's nor the runner's
arguments hold the JIT config. One line of POSIX sh, so that ``ps`` shows it whole."""

# Background processes that close() left running, on purpose: referenced here so that Python
# neither warns about them ("subprocess ... is still running") when their provisioner is
# garbage collected nor leaves them unreaped when they end (pruned at every launch and close).
_LEFT_RUNNING: set[subprocess.Popen[bytes]] = set()


class TartProvisionerError(ProvisionerError):
    """A VM could not be cloned, configured, booted, stopped, deleted or listed; the message
    names the VM, the step and what tart said."""


def default_log_dir() -> Path:
    """``<temp dir>/outrunner-<uid>``: private to the user (macOS's temp dir already is)."""
    return Path(tempfile.gettempdir()) / f"outrunner-{os.getuid()}"


# --------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class _Result:
    """How a short tart command ended."""

    status: int | None
    """Exit status; ``None``: killed after its timeout."""
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.status == 0

    def reason(self) -> str:
        """For messages: the status and the end of stderr."""
        if self.status is None:
            return "timed out"
        detail = _last_line(self.stderr)
        return f"exit status {self.status}" + (f": {detail}" if detail else "")


class _Background:
    """A long-running tart process (``run`` or the runner's ``exec``) with its output in a file.

    A watcher task polls the process; when it exits by itself with a non-zero status while
    the runner is not being stopped, the failure is reported (tail logged, file kept).
    :meth:`settle` reports such an exit at once, before a stop makes every exit expected.
    """

    def __init__(
        self,
        label: str,
        process: subprocess.Popen[bytes],
        path: Path,
        log: BoundLogger,
    ) -> None:
        self.label = label
        self.process = process
        self.path = path
        self.keep = False
        """Keep the capture file: a failure was reported and points at it."""
        self.expected = False
        """The runner is being stopped: an exit now is not a failure."""
        self._settled = False
        self._log = log
        self.watcher = asyncio.create_task(self._watch(), name=f"tart-{label}:{path.name}")

    @property
    def exited(self) -> bool:
        """Whether the process has ended (asks the kernel: a non-blocking ``waitpid``)."""
        return self.process.poll() is not None

    async def _watch(self) -> None:
        self._ended(await _reaped(self.process))

    def settle(self) -> None:
        """If the process has ended by itself and the watcher has not seen it yet (it polls),
        report that now."""
        status = self.process.poll()
        if status is not None:
            self._ended(status)

    def _ended(self, status: int | None) -> None:
        """Report how the process ended, once."""
        if self._settled or self.expected:
            return
        self._settled = True
        if status != 0:
            self.report(f"tart {self._verb} exited with status {status}")
        else:
            self._log.info(f"{self._what} exited", status=status)

    @property
    def _verb(self) -> str:
        return "run" if self.label == "vm" else "exec"

    @property
    def _what(self) -> str:
        return "VM" if self.label == "vm" else "Runner"

    def report(self, reason: str) -> None:
        """Log ``reason`` with the tail of the output, and keep the file."""
        self.keep = True
        self._log.error(
            f"{self._what} failed", reason=reason, output=self.tail(), log=str(self.path)
        )

    def tail(self) -> str:
        try:
            with self.path.open("rb") as file:
                file.seek(0, os.SEEK_END)
                file.seek(max(0, file.tell() - TAIL_BYTES))
                data = file.read()
        except OSError:
            return ""
        return data.decode("utf-8", "replace").strip()

    async def end(self, signum: int) -> None:
        """Make sure the process is gone: ``signum``, then SIGKILL after :data:`_GRACE`."""
        self.expected = True
        if not self.exited:
            self.process.send_signal(signum)  # a no-op once it has been reaped
            if await _reaped(self.process, _GRACE) is None:
                self.process.kill()
                await _reaped(self.process)
        await cancel_and_wait(self.watcher)

    def detach(self) -> None:
        """Stop watching the process and leave it running (see :meth:`TartProvisioner.close`)."""
        self.watcher.cancel()
        if not self.exited:
            _LEFT_RUNNING.add(self.process)

    def discard(self) -> None:
        """Remove the capture file unless a failure points at it."""
        if not self.keep:
            self.path.unlink(missing_ok=True)


async def _reaped(process: subprocess.Popen[bytes], timeout: float | None = None) -> int | None:
    """Poll ``process`` until it has ended (and is reaped); its status, or None once ``timeout``
    seconds passed first."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    delays = backoff(_REAP_FIRST, _REAP_MAX)
    while (status := process.poll()) is None:
        delay = next(delays)
        if deadline is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            delay = min(delay, remaining)
        await asyncio.sleep(delay)
    return status


def _prune_left_running() -> None:
    for process in list(_LEFT_RUNNING):
        if process.poll() is not None:
            _LEFT_RUNNING.discard(process)


async def _terminate(process: asyncio.subprocess.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)
    try:
        async with asyncio.timeout(_GRACE):
            await process.wait()
            return
    except TimeoutError:
        pass
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()


@dataclass
class _Machine:
    """What this provisioner knows of one runner's VM."""

    name: str
    tart: str
    vm: _Background | None = None
    runner: _Background | None = None
    may_run: bool = True
    """False until a start launches ``tart run``: before that, stopping is pointless."""
    adopted: bool = False
    """Taken over from an earlier process (:meth:`TartProvisioner.adopt`): no process here is
    ours; the VM's state comes from ``tart list``."""
    runner_pid: int | None = None
    """Adopted: the PID of the runner's ``tart exec``, found in the host's process list."""
    began: float = field(default_factory=time.monotonic)

    def backgrounds(self) -> Iterator[_Background]:
        yield from (b for b in (self.runner, self.vm) if b is not None)


# --------------------------------------------------------------------------------------------
# Provisioner


class TartProvisioner(ClosingContext):
    """Creates one Tart VM per runner and deletes it when the runner stops.

    ``tart_path`` is the tart executable for :meth:`cleanup` and for stopping VMs this instance
    did not start (each runner's own ``tart.tart_path`` is used for the VMs it starts).
    ``log_dir`` holds the output capture files (default :func:`default_log_dir`).
    ``stop_timeout`` is passed as ``tart stop --timeout``.
    """

    def __init__(
        self,
        *,
        tart_path: str = "tart",
        log_dir: Path | str | None = None,
        logger: BoundLogger | None = None,
        stop_timeout: int = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        self._tart_path = tart_path
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._log_dir_ready = False
        self._log = logger or get_logger("outrunner.provisioners.tart")
        self._stop_timeout = stop_timeout
        self._machines: dict[str, _Machine] = {}
        self._clone_locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Teardowns and process reaping that outlived a cancelled caller; close() awaits them.
        self._pending: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def for_runner(
        cls,
        runner: RunnerConfig,
        *,
        logger: BoundLogger | None = None,
        log_dir: Path | str | None = None,
    ) -> TartProvisioner:
        """A provisioner whose default ``tart_path`` is the runner entry's, so that orphan
        cleanup (which has only a name prefix to go on) runs the tart that entry uses."""
        tart_path = runner.tart.tart_path if runner.tart is not None else "tart"
        return cls(tart_path=tart_path, log_dir=log_dir, logger=logger)

    # -- the Provisioner protocol ------------------------------------------------------------

    async def start(self, request: RunnerRequest) -> None:
        """Clone, configure and boot the runner's VM and launch the runner in it; returns once
        the runner's ``tart exec`` is running.

        On failure or cancellation the processes are ended and the clone is deleted before
        this returns. Raises :class:`TartProvisionerError`.
        """
        self._check_open()
        options = _options_of(request)
        name = request.name
        dirs = [_dir_argument(m, name) for m in options.mounts]  # before anything is made
        if "\n" in request.jit_config:  # the guest reads one line (and a newline is no base64)
            raise TartProvisionerError(f"runner {name}: the JIT config is not a single line")
        if name in self._machines:
            raise TartProvisionerError(f"VM {name} is already started")
        machine = self._machines[name] = _Machine(name, options.tart_path, may_run=False)
        log = self._log.bind(name=name)
        try:
            await self._clone(machine, options.image, log)
            await self._checked(
                machine.tart,
                ["set", name, "--cpu", str(options.cpus), "--memory", str(options.memory)],
                f"set CPUs and memory of VM {name}",
            )
            log.debug("Starting VM", cpus=options.cpus, memory=options.memory, mounts=len(dirs))
            machine.may_run = True
            machine.vm = await self._launch(machine, "vm", ["run", "--no-graphics", *dirs, name])
            await self._wait_for_boot(machine, options, log)
            # The JIT config goes to the runner's stdin, never into arguments or logs.
            runner_args = ["exec", "-i", name, _GUEST_SHELL, "-c", _JIT_WRAPPER, options.runner_cmd]
            machine.runner = await self._launch(
                machine, "runner", runner_args, stdin=f"{request.jit_config}\n".encode()
            )
            if self._closed:
                raise TartProvisionerError(f"the Tart provisioner was closed while starting {name}")
        except BaseException as exc:
            await self._undo(machine)
            if isinstance(exc, Exception) and not isinstance(exc, TartProvisionerError):
                raise TartProvisionerError(f"start VM {name}: {exc}") from exc
            raise
        log.info(
            "Runner started in VM",
            image=options.image,
            cmd=options.runner_cmd,
            seconds=round(time.monotonic() - machine.began, 1),
        )

    async def stop(self, name: str) -> None:
        """End the runner, stop the VM and delete it. A VM that is stopped, gone or was never
        started is not an error; one that cannot be deleted raises
        :class:`TartProvisionerError`. Works after :meth:`close` too (it only runs tart)."""
        machine = self._machines.get(name) or _Machine(name, self._tart_path)
        try:
            await self._teardown(machine)
        finally:
            if self._machines.get(name) is machine:
                del self._machines[name]
        self._log.debug("VM deleted", name=name)

    async def close(self) -> None:
        """Stop watching and leave every VM running, with its ``tart run`` and runner's
        ``tart exec``; safe to call more than once. Teardowns of failed or cancelled starts
        are awaited. A :meth:`wait_exited` still waiting raises :class:`TartProvisionerError`.

        VMs are left alone: stopping runners is the Scaler's job, and a restarted outrunner
        adopts (:meth:`adopt`) or cleans up (:meth:`cleanup`) what is left. :meth:`stop` still
        works afterwards.
        """
        if self._closed:
            return
        self._closed = True
        if self._pending:
            await asyncio.wait(set(self._pending))
        running = 0
        for machine in self._machines.values():
            for background in machine.backgrounds():
                background.detach()
            running += machine.runner is not None and not machine.runner.exited
        if running:
            self._log.info("Leaving VMs running", count=running)
        _prune_left_running()

    # -- OrphanCleaner ---------------------------------------------------------------------------

    async def cleanup(self, prefix: str, *, keep: Collection[str] = ()) -> list[str]:
        """Stop and delete the local VMs whose name is a runner name of ``prefix`` (see
        :func:`~outrunner.provisioner.is_runner_name`), except those named in ``keep`` (adopted
        runners); return their names. VMs that could not be deleted are logged and left out.

        Tart VMs carry no labels, so any local VM named ``<prefix><8 hex digits>`` is taken
        for an earlier run's runner.
        """
        kept = frozenset(keep)
        listed = await self._tart(
            self._tart_path, ["list", "--source", "local", "--quiet"], timeout=_COMMAND_TIMEOUT
        )
        if not listed.ok:
            raise TartProvisionerError(f"list local VMs: {listed.reason()}")
        listed_names = (line.strip() for line in listed.stdout.splitlines())
        names = sorted(
            {name for name in listed_names if is_runner_name(name, prefix) and name not in kept}
        )
        results = await asyncio.gather(*(self.stop(n) for n in names), return_exceptions=True)
        removed = []
        for name, result in zip(names, results, strict=True):
            if isinstance(result, Exception):
                self._log.error("Failed to remove orphan VM", name=name, error=str(result))
            elif isinstance(result, BaseException):
                raise result
            else:
                removed.append(name)
        if removed:
            self._log.info("Removed orphan VMs", prefix=prefix, count=len(removed))
        return removed

    async def exited(self, name: str) -> bool:
        """True when the runner's environment can no longer run a job: its ``tart run`` or
        its runner's ``tart exec`` has ended, or this instance is not running ``name``. No
        tart call for the VMs this instance started (it looks at their processes); for an
        adopted one, its runner's ``tart exec`` must still be alive and ``tart list`` must
        show the VM running."""
        machine = self._machines.get(name)
        if machine is None:
            return True
        if machine.adopted:
            return await self._adopted_ended(machine)
        if machine.vm is None or machine.runner is None:
            return True
        return machine.vm.exited or machine.runner.exited

    # -- ExitWatcher -----------------------------------------------------------------------

    async def wait_exited(self, name: str) -> None:
        """Return once :meth:`exited` is true for ``name``: for a VM this instance started,
        when its ``tart run`` or its runner's ``tart exec`` ends (seen within 0.5 s); for an
        adopted VM, which has no process of ours, by asking as :meth:`exited` does, every
        0.5 s growing to 5 s. Returns at once for an unknown or already ended runner. Cancel it
        to stop waiting. Raises :class:`TartProvisionerError` when the provisioner is closed
        (also while waiting), or ``tart list`` fails for an adopted VM.
        """
        self._check_open()
        machine = self._machines.get(name)
        if machine is None:
            return
        if machine.adopted:
            for delay in backoff(_ADOPTED_POLL_FIRST, _ADOPTED_POLL_MAX):
                if await self._adopted_ended(machine):
                    return
                await asyncio.sleep(delay)
                self._check_open()
        if machine.vm is None or machine.runner is None:
            return
        vm, runner = machine.vm, machine.runner
        # asyncio.wait neither cancels the watchers nor leaves a task behind when cancelled.
        await asyncio.wait({vm.watcher, runner.watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not (vm.exited or runner.exited):
            self._check_open()  # the watchers were detached by close()

    # -- Adopter -----------------------------------------------------------------------------

    async def adopt(self, name: str, runner: RunnerConfig) -> bool:
        """Take over VM ``name`` of runner entry ``runner``, started by an earlier outrunner
        process. True when ``name`` is a runner name of scale set ``runner.name``, ``tart list``
        shows it running and the runner's ``tart exec`` (found in the host's process list, see
        :func:`_is_runner_exec`) is alive. From then on :meth:`stop`,
        :meth:`exited` and :meth:`wait_exited` handle it (with the entry's ``tart_path``).

        False when the VM is gone or stopped, or its runner's ``tart exec`` has ended; the
        caller then calls :meth:`stop`, which deletes it. False, logged and left alone, for a
        name that is not a runner name of this scale set (Tart VMs carry no other mark).
        Raises :class:`TartProvisionerError` when ``tart list`` or ``ps`` fails.
        """
        self._check_open()
        log = self._log.bind(name=name)
        if not is_runner_name(name, f"{runner.name}-"):
            log.warning("Not adopting a VM not named as a runner of this scale set")
            return False
        current = self._machines.get(name)
        if current is not None and not current.adopted:
            return not await self.exited(name)  # started by this instance
        tart = runner.tart.tart_path if runner.tart is not None else self._tart_path
        # Known from here on, so that stop() runs the entry's tart, whatever the answer.
        machine = self._machines[name] = _Machine(name, tart, adopted=True)
        state = await self._vm_state(tart, name)
        if state != "running":
            log.info("Not adopting a VM that is not running", state=state or "gone")
            return False
        machine.runner_pid = await self._find_runner_exec(name)
        if machine.runner_pid is None:
            log.info("Not adopting a VM whose runner (tart exec) has ended")
            return False
        log.info("Adopted VM", runner_pid=machine.runner_pid)
        return True

    async def _adopted_ended(self, machine: _Machine) -> bool:
        if machine.runner_pid is None or not _pid_alive(machine.runner_pid):
            return True
        return await self._vm_state(machine.tart, machine.name) != "running"

    async def _vm_state(self, tart: str, name: str) -> str | None:
        """What ``tart list`` says of local VM ``name`` (``running``, ``stopped``, ...);
        None when there is no such VM."""
        listed = await self._tart(
            tart, ["list", "--source", "local", "--format", "json"], timeout=_COMMAND_TIMEOUT
        )
        if not listed.ok:
            raise TartProvisionerError(f"list local VMs: {listed.reason()}")
        try:
            entries: Any = json.loads(listed.stdout or "[]")
        except ValueError as exc:
            raise TartProvisionerError(f"list local VMs: tart printed no JSON: {exc}") from None
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and entry.get("Name") == name:
                state = entry.get("State")
                if isinstance(state, str):
                    return state.lower()
                return "running" if entry.get("Running") else "stopped"  # before tart 2.x
        return None

    async def _find_runner_exec(self, name: str) -> int | None:
        """The PID of the runner's ``tart exec`` of VM ``name``, from ``ps``. None of the
        listing is logged: the command line of a runner started by an earlier outrunner,
        ``tart exec <name> <runner_cmd> --jitconfig <config>``, holds its JIT config."""
        listed = await self._command(
            "ps", ["-A", "-ww", "-o", "pid=,args="], timeout=_COMMAND_TIMEOUT
        )
        if not listed.ok:
            raise TartProvisionerError(f"list processes: ps failed: {listed.reason()}")
        for line in listed.stdout.splitlines():
            pid, _, args = line.strip().partition(" ")
            if pid.isdigit() and _is_runner_exec(args.split(), name):
                return int(pid)
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise TartProvisionerError("the Tart provisioner is closed")

    # -- steps -----------------------------------------------------------------------------

    async def _clone(self, machine: _Machine, image: str, log: BoundLogger) -> None:
        # One clone per image at a time: the first clone of an OCI image pulls it (many GB);
        # the others then wait and clone from tart's cache instead of pulling it again.
        lock = self._clone_locks.setdefault((machine.tart, image), asyncio.Lock())
        async with lock:
            log.debug("Cloning VM", image=image)
            await self._checked(
                machine.tart, ["clone", image, machine.name], f"clone {image} to VM {machine.name}"
            )

    async def _wait_for_boot(self, machine: _Machine, options: TartImage, log: BoundLogger) -> None:
        """Poll ``tart exec <vm> echo ok`` until it succeeds; fail early if ``tart run`` ends."""
        vm = machine.vm
        assert vm is not None
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + options.boot_timeout
        last = _NO_ANSWER
        for delay in backoff(_PROBE_FIRST, _PROBE_MAX):
            if vm.exited:
                vm.settle()  # reports a non-zero exit
                if not vm.keep:  # exit status 0: the guest shut down; still a failed start
                    vm.report("tart run exited while the VM was booting")
                raise TartProvisionerError(
                    f"VM {machine.name} stopped while booting: tart run exited with status "
                    f"{vm.process.returncode}: {_last_line(vm.tail()) or 'no output'} "
                    f"(output kept in {vm.path})"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            probe = await self._tart(
                machine.tart,
                ["exec", machine.name, "echo", "ok"],
                timeout=min(_PROBE_TIMEOUT, remaining),
            )
            if probe.ok:
                log.debug("Guest agent ready", seconds=round(loop.time() - began, 1))
                return
            if probe.status is not None or last == _NO_ANSWER:
                # A probe cut short by the deadline says less than the one before it.
                last = probe.reason()
            # Wake early if the VM dies meanwhile.
            await asyncio.wait({vm.watcher}, timeout=min(delay, max(0.0, deadline - loop.time())))
        vm.report(f"no answer from the guest agent within {options.boot_timeout:g} s")
        raise TartProvisionerError(
            f"VM {machine.name} did not boot: `tart exec {machine.name} echo ok` kept failing for "
            f"{options.boot_timeout:g} s (last: {last}); is the Tart Guest Agent installed and "
            f"running in image {options.image}? (VM output kept in {vm.path})"
        )

    async def _launch(
        self, machine: _Machine, label: str, args: Sequence[str], *, stdin: bytes | None = None
    ) -> _Background:
        """Start ``tart <args>`` in the background with its output in a capture file; its
        standard input is ``stdin`` (see :func:`_secret_file`), or ``/dev/null``."""
        directory = self._capture_dir()
        _prune_left_running()
        fd, path = tempfile.mkstemp(prefix=f"{machine.name}-{label}-", suffix=".log", dir=directory)
        try:
            with _secret_file(stdin, directory) as source:
                # Not an asyncio subprocess: see the module docstring. Popen returns once the
                # child is spawned, as asyncio's own subprocess_exec does (it calls Popen too).
                process = subprocess.Popen(  # noqa: ASYNC220
                    [machine.tart, *args],
                    stdin=source,
                    stdout=fd,
                    stderr=fd,
                    start_new_session=True,
                )
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if isinstance(exc, OSError):
                raise TartProvisionerError(_cannot_run(machine.tart, exc)) from exc
            raise
        finally:
            os.close(fd)
        return _Background(label, process, Path(path), self._log.bind(name=machine.name))

    async def _undo(self, machine: _Machine) -> None:
        """Tear down a failed or cancelled start, whatever interrupts this meanwhile."""
        task = asyncio.create_task(self._undo_now(machine))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        # Shielded: a second cancellation must not strand the clone; the teardown then
        # finishes on its own and close() waits for it.
        await asyncio.shield(task)

    async def _undo_now(self, machine: _Machine) -> None:
        try:
            await self._teardown(machine)
        except Exception as exc:
            self._log.error(
                "Failed to delete a VM whose start failed", name=machine.name, error=exc
            )
        finally:
            if self._machines.get(machine.name) is machine:
                del self._machines[machine.name]

    async def _teardown(self, machine: _Machine) -> None:
        """End the runner's exec, stop the VM, delete it; remove capture files unless kept."""
        name = machine.name
        for background in machine.backgrounds():
            background.settle()  # a failure before the stop is still one
            background.expected = True  # `tart stop` below ends `tart run` before we do
        if machine.runner is not None:
            await machine.runner.end(signal.SIGTERM)
        if machine.may_run and (machine.vm is None or not machine.vm.exited):
            stopped = await self._tart(
                machine.tart,
                ["stop", "--timeout", str(self._stop_timeout), name],
                timeout=self._stop_timeout + _GRACE + _COMMAND_TIMEOUT,
            )
            if not stopped.ok and stopped.status != _EXIT_NOT_FOUND:
                # Not fatal: ending our own `tart run` below also stops the VM.
                self._log.warning("tart stop failed", name=name, error=stopped.reason())
        if machine.vm is not None:
            # SIGINT is how `tart stop` asks `tart run` to stop; usually it has exited already.
            await machine.vm.end(signal.SIGINT)
        await self._delete(machine)
        for background in machine.backgrounds():
            background.discard()
        if machine.adopted:
            self._discard_adopted_captures(name)

    def _discard_adopted_captures(self, name: str) -> None:
        """Remove the capture files the process that started an adopted VM left: its runner
        was alive when adopted, so they record no failure."""
        directory = self._log_dir or default_log_dir()
        for label in ("vm", "runner"):
            for path in directory.glob(f"{name}-{label}-*.log"):
                path.unlink(missing_ok=True)

    async def _delete(self, machine: _Machine) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _DELETE_RETRY
        for delay in backoff(_PROBE_FIRST, _PROBE_MAX):
            result = await self._tart(
                machine.tart, ["delete", machine.name], timeout=_COMMAND_TIMEOUT
            )
            if result.ok or result.status == _EXIT_NOT_FOUND:
                return
            # tart refuses to delete a running VM (one whose `tart run` is not ours, or is
            # still exiting): retry for a while.
            if "is running" not in result.stderr or loop.time() >= deadline:
                raise TartProvisionerError(f"delete VM {machine.name}: {result.reason()}")
            await asyncio.sleep(delay)

    # -- running tart ------------------------------------------------------------------------

    async def _checked(self, tart: str, args: Sequence[str], what: str) -> None:
        timeout = None if args[0] == "clone" else _COMMAND_TIMEOUT
        result = await self._tart(tart, args, timeout=timeout)
        if not result.ok:
            raise TartProvisionerError(f"{what}: tart {args[0]} failed: {result.reason()}")

    async def _tart(self, tart: str, args: Sequence[str], *, timeout: float | None) -> _Result:
        """Run a short tart command and collect its output; killed after ``timeout``.

        Never pass the JIT config here: ``args`` may end up in messages.
        """
        return await self._command(tart, args, timeout=timeout)

    async def _command(
        self, program: str, args: Sequence[str], *, timeout: float | None
    ) -> _Result:
        """Run a short command (tart, ps) and collect its output; killed after ``timeout``."""
        try:
            process = await asyncio.create_subprocess_exec(
                program,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise TartProvisionerError(_cannot_run(program, exc)) from exc
        try:
            async with asyncio.timeout(timeout):
                stdout, stderr = await process.communicate()
        except TimeoutError:
            await _terminate(process, signal.SIGINT)
            return _Result(None, "", "")
        except BaseException:
            # Cancelled: end the command (SIGINT lets `tart clone` remove its temporary
            # copy), shielded so that a second cancellation cannot leave it running.
            task = asyncio.create_task(_terminate(process, signal.SIGINT))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            await asyncio.shield(task)
            raise
        return _Result(
            process.returncode,
            stdout.decode("utf-8", "replace"),
            stderr.decode("utf-8", "replace"),
        )

    def _capture_dir(self) -> Path:
        if self._log_dir_ready:
            assert self._log_dir is not None
            return self._log_dir
        if self._log_dir is None:
            self._log_dir = default_log_dir()
            _private_dir(self._log_dir)
        else:
            self._log_dir.mkdir(parents=True, exist_ok=True)
        self._log_dir_ready = True
        return self._log_dir


# --------------------------------------------------------------------------------------------
# Helpers


def _options_of(request: RunnerRequest) -> TartImage:
    options = request.runner.tart
    if options is None:
        raise TartProvisionerError(
            f"runner {request.name}: scale set {request.runner.name} has no tart section"
        )
    return options


def _dir_argument(mount: TartMount, name: str) -> str:
    """``--dir=<name>:<source>[:ro]``. Always named, so a guest sees each share as
    ``<automount point>/<name>`` however many there are."""
    # tart reads the last ":" part as options when one of its comma-separated items is "ro"
    # or "tag=...": a source like "/cache,ro" would silently lose its last component.
    last = mount.source.rsplit("/", 1)[-1].split(",")
    if any(item == "ro" or item.startswith("tag=") for item in last[1:]):
        raise TartProvisionerError(
            f"VM {name}: mount {mount.name}: tart would read the end of source "
            f"{mount.source!r} as share options"
        )
    return f"--dir={mount.name}:{mount.source}" + (":ro" if mount.read_only else "")


def _private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) or accept it only if it is a directory of ours that nobody
    else can write to: the default lives in a shared temp dir, where another user could
    have planted it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise TartProvisionerError(
            f"log directory {path} is not a directory owned by this user and writable only by "
            "it; remove it or pass another log_dir"
        )


@contextlib.contextmanager
def _secret_file(data: bytes | None, directory: Path) -> Iterator[IO[bytes] | int]:
    """An anonymous file holding ``data``, opened for reading from its start, for a child's
    stdin (``subprocess.DEVNULL`` for None); closed on exit, when the child has its own copy.

    The file is made in the private capture directory with mode 0600 and has no name: on Linux
    it never had one (``O_TMPFILE``), elsewhere it is unlinked at once. It disappears when the
    child ends.

    A file, not a pipe, for two reasons. It is complete before the child starts, so nothing
    depends on outrunner afterwards: a pipe could not be filled by an outrunner killed in
    between, nor be larger than the pipe buffer before its reader runs. And ``tart exec -i``
    handles them differently (``Exec.execute`` in tart's ``Sources/tart/Commands/Exec.swift``):
    since tart 2.28.2 it reads a regular file to its end, forwards it and then an empty chunk,
    on which the guest agent closes the command's stdin; a pipe it watches with a Foundation
    ``readabilityHandler`` that it never removes, and a pipe at end of file is readable
    forever, so tart then spins a host core for the runner's whole life (up to 2.32.1 at
    least). Older tart (2.27.x-2.28.1) forwards a file's contents but never its end: the
    wrapper reads one line and needs no more.
    """
    if data is None:
        yield subprocess.DEVNULL
        return
    with tempfile.TemporaryFile(dir=directory) as file:
        file.write(data)
        file.flush()
        file.seek(0)
        yield file


def _is_runner_exec(argv: Sequence[str], name: str) -> bool:
    """Whether a command line (split at spaces, as ``ps`` shows it) is the runner's ``tart
    exec`` of VM ``name``: ``... exec [-i] <name> ...`` running :data:`_JIT_WRAPPER`, or
    ``<runner_cmd> --jitconfig <config>`` as an earlier outrunner started runners (so that those
    are still adopted after an upgrade). A boot probe, ``exec <name> echo ok``, is neither."""
    for i, word in enumerate(argv):
        if word != "exec":
            continue
        at = i + 1
        while at < len(argv) and argv[at].startswith("-"):  # tart exec's flags: -i, -t, -it
            at += 1
        if at < len(argv) and argv[at] == name:
            command = argv[at + 1 :]
            return "--jitconfig" in command or any(_JIT_ENV in word for word in command)
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process got that PID: ours has ended
        return False
    return True


def _cannot_run(tart: str, exc: OSError) -> str:
    hint = " (is Tart installed? see tart_path)" if isinstance(exc, FileNotFoundError) else ""
    return f"cannot run {tart}: {exc.strerror or exc}{hint}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-TAIL_BYTES:] if lines else ""
