"""A fake ``tart`` CLI: VMs are folders on disk and the "guest" is the host.

Tart runs only on Apple Silicon Macs, but a backend that drives the ``tart`` CLI can be tested
anywhere against a program that keeps the CLI's contract. This is that program, stdlib only, so
you can test your own orchestration too::

    python -m tests.support.faketart list --source local --quiet
    python path/to/faketart.py clone ghcr.io/cirruslabs/ubuntu:latest my-vm

or, from Python (e.g. in a pytest test)::

    fake = FakeTart.install(tmp_path)            # writes tmp_path/bin/tart, state in tmp_path/home
    env = fake.env()                             # PATH with the shim first
    fake.create_vm("base", boot_delay=0.2)       # a local image to clone
    ...
    assert [i.verb for i in fake.invocations()] == ["clone", "set", "run", ...]

State (``FAKE_TART_HOME``; default ``<tmp>/faketart-<uid>``, the fake's ``~/.tart``)::

    vms/<name>/config.json disk.img nvram.bin    a local VM, laid out like tart's
    vms/<name>/run.json run.lock guest/          fake only: the running ``tart run``
    cache/OCIs/<host>/<namespace>/<tag>/         "pulled" OCI images
    control.json                                 fault knobs (below), read by every call
    invocations.jsonl                            every call: argv, pid, times, exit status

Verbs and flags are those of tart 2.x (``clone``, ``set``, ``run``, ``exec``, ``stop``,
``delete``, ``list``), validated like Swift ArgumentParser does: an unknown flag, a missing or
malformed value is ``Error: ...`` plus a usage line on stderr and exit status 64. Runtime
errors print tart's messages with tart's exit statuses: 2 for "does not exist", "is not running"
and "is already running", 1 otherwise.

Behaviour, as the real CLI (``Sources/tart/Commands/*.swift``) unless marked *fake*:

* ``clone SRC NEW``: SRC is a local VM, or an OCI reference (``host/namespace[:tag|@digest]``)
  that is "pulled" into the cache instantly when missing. NEW must not contain ``/``. Like tart,
  cloning onto an existing *stopped* VM replaces it; *fake:* onto a running one fails (tart
  would swap the files under the running VM).
* ``set NAME --cpu N --memory MiB ...``: rewrites config.json; allowed on a running VM (it takes
  effect at the next boot); below the image's minimum CPUs or memory fails.
* ``run NAME [--no-graphics] [--dir=[name:]path[:ro][,tag=T]]...``: blocks until stopped. SIGINT
  (what ``tart stop`` sends) prints ``Stopping VM...`` and exits 0; SIGTERM is not handled by
  tart, so the fake stops the VM and dies of the signal as tart would. *Fake:* a ``--dir`` path
  that is not a directory fails at once, and deleting the VM folder behind its back ends it.
* ``exec [-i] [-t] NAME CMD...``: fails (exit 2) on a stopped VM and (exit 1, "is the Tart Guest
  Agent running?") until the VM's boot delay has passed since ``run`` started; then runs CMD on
  the host with the VM folder as working directory, passing its output and exit status through.
  CMD's stdin is ``/dev/null``, or with ``-i`` (short only, like tart) a pipe fed with the
  fake's own stdin and closed at its end, as the guest agent closes it when tart forwards the
  end of its stdin. The command runs in its own session and dies with the VM. *Fake:* ``-t``
  allocates no terminal.
* ``stop NAME [-t|--timeout S]``: SIGINT to the ``run`` process, SIGKILL after S seconds
  (default 30); exit 2 when the VM is not running.
* ``delete NAME...``: exit 2 for a missing VM; like tart, exit 1 (``VM "x" is running``) for a
  running one: tart does not stop it for you.
* ``list [--source local|oci] [--format text|json] [-q|--quiet]``.

Fault knobs, most specific first: the VM's (or clone source's) ``config.json`` ``fake`` object
(so an image's faults are inherited by its clones), then ``control.json``, then the environment:

* fail a verb with an error message on stderr, exit 1: ``{"fail": {"run": "boom"}}`` /
  ``FAKE_TART_FAIL_RUN=boom`` (any verb; for ``exec`` every call fails, the boot probe too);
* delay a verb by seconds before it acts: ``{"delay": {"clone": 0.5}}`` /
  ``FAKE_TART_DELAY_CLONE=0.5``;
* boot delay, seconds from ``run`` until ``exec`` works, or ``"never"``: ``{"boot_delay": 0.2}``
  / ``FAKE_TART_BOOT_DELAY=0.2`` (default 0).

Every invocation appends two JSON lines to ``invocations.jsonl``, ``{"event": "start", "id",
"pid", "time", "argv"}`` and ``{"event": "end", "id", "time", "status"}`` (a negative status is
death by that signal), redacting nothing: tests check argv. :meth:`FakeTart.invocations` pairs
them up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

__all__ = [
    "BOOT_DELAY_ENV",
    "HOME_ENV",
    "FakeTart",
    "Invocation",
    "default_home",
    "install",
    "main",
]

HOME_ENV: Final = "FAKE_TART_HOME"
BOOT_DELAY_ENV: Final = "FAKE_TART_BOOT_DELAY"
_FAIL_ENV: Final = "FAKE_TART_FAIL_"
_DELAY_ENV: Final = "FAKE_TART_DELAY_"
_CONTROL: Final = "control.json"
_INVOCATIONS: Final = "invocations.jsonl"
_VERSION: Final = "2.28.0-fake"
_EX_USAGE: Final = 64
_MIB: Final = 1024 * 1024
_POLL: Final = 0.05
# Virtualization.framework's floors (minimumAllowedCPUCount, minimumAllowedMemorySize).
_MIN_CPUS: Final = 1
_MIN_MEMORY: Final = 128 * _MIB
_AGENT_DOWN: Final = (
    "Failed to connect to the VM using its control socket: connection refused, "
    "is the Tart Guest Agent running?"
)
_CONNECTION_LOST: Final = "the connection to the VM was lost: the VM has stopped"
_REMOTE = re.compile(
    r"(?P<host>[A-Za-z0-9.-]+(?::[0-9]+)?)/(?P<namespace>[a-z0-9._/-]+?)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]*)|@(?P<digest>sha256:[0-9a-f]{64}))?"
)


def default_home() -> Path:
    """``$FAKE_TART_HOME``, else ``<system temp dir>/faketart-<uid>``."""
    configured = os.environ.get(HOME_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"faketart-{os.getuid()}"


# --------------------------------------------------------------------------------------------
# Errors: how the real CLI reports them


class _Exit(Exception):
    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Killed(Exception):
    """The process must die of ``signum`` (after recording its end), as tart would."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _runtime(message: str, status: int = 1) -> _Exit:
    # tart's RuntimeError: printed bare (its description), exit 2 for the "VM state" errors.
    return _Exit(status, message)


def _missing(name: str) -> _Exit:
    return _runtime(f'the specified VM "{name}" does not exist', 2)


def _not_running(name: str) -> _Exit:
    return _runtime(f'VM "{name}" is not running', 2)


def _error(message: str) -> _Exit:
    # Any other Swift error goes through ArgumentParser's exit(withError:): "Error: ...", 1.
    return _Exit(1, f"Error: {message}")


# --------------------------------------------------------------------------------------------
# Argument parsing, ArgumentParser style


@dataclass(frozen=True)
class _Opt:
    dest: str
    metavar: str | None = None
    """``None`` for a flag, else the option takes a value shown as ``<metavar>``."""
    parse: Callable[[str], object] = str
    repeat: bool = False


@dataclass(frozen=True)
class _Verb:
    name: str
    positionals: tuple[str, ...]
    options: Mapping[str, _Opt]
    usage: str
    rest: str = ""
    """``many``: the last positional takes one or more values; ``passthrough``: everything after
    the positionals is one list (``tart exec``'s command)."""


def _uint(bits: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text, 10)
        if not text.isdigit() or value >= 1 << bits:
            raise ValueError(text)
        return value

    return parse


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(text)
        return text

    return parse


def _flags(*names: str) -> dict[str, _Opt]:
    return {f"--{n}": _Opt(n.replace("-", "_")) for n in names}


def _options(*specs: tuple[str, str, Callable[[str], object]]) -> dict[str, _Opt]:
    return {f"--{n}": _Opt(n.replace("-", "_"), metavar, parse) for n, metavar, parse in specs}


_VERBS: Final[dict[str, _Verb]] = {
    "clone": _Verb(
        "clone",
        ("<source-name>", "<new-name>"),
        {
            **_flags("insecure", "deduplicate"),
            **_options(("concurrency", "concurrency", _uint(64)), ("prune-limit", "n", _uint(64))),
        },
        "tart clone <source-name> <new-name> [--insecure] [--concurrency <concurrency>] "
        "[--prune-limit <n>]",
    ),
    "set": _Verb(
        "set",
        ("<name>",),
        {
            **_flags("display-refit", "no-display-refit", "random-mac", "random-serial"),
            **_options(
                ("cpu", "cpu", _uint(16)),
                ("memory", "memory", _uint(64)),
                ("display", "display", str),
                ("disk", "path", str),
                ("disk-size", "disk-size", _uint(16)),
            ),
        },
        "tart set <name> [--cpu <cpu>] [--memory <memory>] [--display <display>] "
        "[--[no-]display-refit] [--random-mac] [--random-serial] [--disk <path>] "
        "[--disk-size <disk-size>]",
    ),
    "run": _Verb(
        "run",
        ("<name>",),
        {
            **_flags(
                "no-graphics",
                "serial",
                "graphics",
                "no-audio",
                "no-clipboard",
                "recovery",
                "vnc",
                "vnc-experimental",
                "nested",
                "net-softnet",
                "net-host",
                "suspendable",
                "capture-system-keys",
                "no-trackpad",
                "no-pointer",
                "no-keyboard",
            ),
            **_options(
                ("serial-path", "serial-path", str),
                ("rosetta", "tag", str),
                ("net-softnet-allow", "comma-separated CIDRs", str),
                ("net-softnet-block", "comma-separated CIDRs", str),
                ("net-softnet-expose", "comma-separated port specifications", str),
                ("root-disk-opts", "options", str),
            ),
            "--disk": _Opt("disk", "path[:options]", str, repeat=True),
            "--dir": _Opt("dir", "[name:]path[:options]", str, repeat=True),
            "--net-bridged": _Opt("net_bridged", "interface name", str, repeat=True),
        },
        "tart run <name> [--no-graphics] [--serial] [--serial-path <serial-path>] [--no-audio] "
        "[--no-clipboard] [--recovery] [--vnc] [--vnc-experimental] "
        "[--disk <path[:options]> ...] [--rosetta <tag>] [--dir <[name:]path[:options]> ...] "
        "[--nested] [--net-bridged <interface name> ...] [--net-softnet] [--net-host] "
        "[--root-disk-opts <options>] [--suspendable] [--capture-system-keys] [--no-trackpad] "
        "[--no-pointer] [--no-keyboard]",
    ),
    "exec": _Verb(
        "exec",
        ("<name>",),
        {"-i": _Opt("interactive"), "-t": _Opt("tty")},
        "tart exec [-i] [-t] <name> [<command> ...]",
        rest="passthrough",
    ),
    "stop": _Verb(
        "stop",
        ("<name>",),
        {
            "--timeout": _Opt("timeout", "timeout", _uint(64)),
            "-t": _Opt("timeout", "timeout", _uint(64)),
        },
        "tart stop <name> [--timeout <timeout>]",
    ),
    "delete": _Verb("delete", ("<name>",), {}, "tart delete <name> ...", rest="many"),
    "list": _Verb(
        "list",
        (),
        {
            "--source": _Opt("source", "source", str),
            "--format": _Opt("format", "format", _choice("text", "json")),
            "--quiet": _Opt("quiet"),
            "-q": _Opt("quiet"),
        },
        "tart list [--source <source>] [--format <format>] [--quiet]",
    ),
}
_ROOT_USAGE: Final = "tart <subcommand>"


def _usage_error(verb: _Verb | None, message: str) -> _Exit:
    usage = verb.usage if verb else _ROOT_USAGE
    helper = f"tart {verb.name} --help" if verb else "tart --help"
    return _Exit(
        _EX_USAGE,
        f"Error: {message}\nUsage: {usage}\n  See '{helper}' for more information.",
    )


@dataclass
class _Args:
    positionals: list[str]
    options: dict[str, Any]
    rest: list[str]


def _parse(verb: _Verb, argv: Sequence[str]) -> _Args:
    values: dict[str, Any] = {o.dest: [] if o.repeat else None for o in verb.options.values()}
    positionals: list[str] = []
    rest: list[str] = []
    tokens = list(argv)
    only_positionals = False
    while tokens:
        token = tokens.pop(0)
        if verb.rest == "passthrough" and len(positionals) == len(verb.positionals):
            rest = [token, *tokens]  # everything after the VM name is the command
            break
        if only_positionals or token == "-" or not token.startswith("-"):
            positionals.append(token)
            continue
        if token == "--":
            only_positionals = True
            continue
        if token in ("-h", "--help"):
            raise _Exit(0, "")
        for key, inline in _option_tokens(verb, token):
            spec = verb.options[key]
            if spec.metavar is None:
                if inline is not None:
                    raise _usage_error(verb, f"Unknown option '{token}'")
                values[spec.dest] = True
                continue
            shown = f"'{key} <{spec.metavar}>'"
            if inline is None and (not tokens or tokens[0].startswith("-")):
                raise _usage_error(verb, f"Missing value for {shown}")
            text = tokens.pop(0) if inline is None else inline
            try:
                value = spec.parse(text)
            except ValueError:
                raise _usage_error(verb, f"The value '{text}' is invalid for {shown}") from None
            if spec.repeat:
                values[spec.dest].append(value)
            else:
                values[spec.dest] = value
    if len(positionals) < len(verb.positionals):
        raise _usage_error(
            verb, f"Missing expected argument '{verb.positionals[len(positionals)]}'"
        )
    if len(positionals) > len(verb.positionals) and verb.rest != "many":
        raise _usage_error(verb, f"Unexpected argument '{positionals[len(verb.positionals)]}'")
    if verb.rest == "passthrough" and not rest:
        raise _usage_error(verb, "Missing expected argument '<command> ...'")
    return _Args(positionals, values, rest)


def _option_tokens(verb: _Verb, token: str) -> Iterator[tuple[str, str | None]]:
    """The options one token holds: ``--key``, ``--key=value``, ``-k`` or ``-it``."""
    if token.startswith("--"):
        key, eq, inline = token.partition("=")
        if key not in verb.options:
            raise _usage_error(verb, f"Unknown option '{key}'")
        yield key, inline if eq else None
        return
    if token in verb.options:
        yield token, None
        return
    letters = [f"-{c}" for c in token[1:]]
    if all(k in verb.options and verb.options[k].metavar is None for k in letters):
        for key in letters:
            yield key, None
        return
    raise _usage_error(verb, f"Unknown option '{token}'")


# --------------------------------------------------------------------------------------------
# State on disk


@dataclass(frozen=True)
class _Share:
    name: str | None
    path: str
    read_only: bool
    tag: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "read_only": self.read_only, "tag": self.tag}


_AUTOMOUNT_TAG: Final = "com.apple.virtio-fs.automount"


def _parse_dir(raw: str) -> _Share:
    """``[name:]path[:options]`` as tart's DirectoryShare parses it."""
    parts = raw.split(":")
    read_only, tag, found = False, _AUTOMOUNT_TAG, False
    for option in parts[-1].split(","):
        if option == "ro":
            read_only, found = True, True
        elif option.startswith("tag="):
            tag, found = option[4:], True
    if found:
        parts.pop()
    rest = ":".join(parts)
    if rest.startswith(("http:", "https:")):
        return _Share(None, rest, read_only, tag)
    name, sep, path = rest.partition(":")
    if not sep:
        return _Share(None, name, read_only, tag)
    return _Share(name, path, read_only, tag)


class _Home:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.vms = root / "vms"
        self.cache = root / "cache" / "OCIs"
        self.tmp = root / "tmp"
        for directory in (self.vms, self.cache, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)
        self._control = _read_json(root / _CONTROL)

    # -- knobs ----------------------------------------------------------------------------

    def _knob(self, vm: Path | None, key: str, verb: str, env_prefix: str) -> Any:
        if vm is not None:
            value = _fake_config(vm).get(key, {}).get(verb)
            if value is not None:
                return value
        value = self._control.get(key, {}).get(verb)
        if value is not None:
            return value
        return os.environ.get(f"{env_prefix}{verb.upper()}")

    def fail(self, verb: str, vm: Path | None = None) -> None:
        message = self._knob(vm, "fail", verb, _FAIL_ENV)
        if message:
            raise _runtime(str(message), 1)

    def delay(self, verb: str, vm: Path | None = None) -> None:
        seconds = self._knob(vm, "delay", verb, _DELAY_ENV)
        if seconds:
            time.sleep(float(seconds))

    def boot_delay(self, vm: Path) -> float:
        value = _fake_config(vm).get("boot_delay")
        if value is None:
            value = self._control.get("boot_delay")
        if value is None:
            value = os.environ.get(BOOT_DELAY_ENV) or 0
        return float("inf") if value == "never" else float(value)

    # -- VMs ------------------------------------------------------------------------------

    def local(self, name: str) -> Path:
        """The local VM ``name``, which must exist (tart's VMStorageLocal.open)."""
        vm = self.vms / name
        if "/" in name or not _initialized(vm):
            raise _missing(name)
        os.utime(vm)  # tart updates the access date on every open
        return vm

    def remote(self, name: str) -> Path | None:
        """The cache folder of OCI reference ``name``, or None if it is not one."""
        match = _REMOTE.fullmatch(name)
        if match is None:
            return None
        reference = match["digest"] or match["tag"] or "latest"
        return self.cache / match["host"] / match["namespace"] / reference

    def local_names(self) -> list[str]:
        return sorted(p.name for p in self.vms.iterdir() if _initialized(p))

    def remote_names(self) -> list[tuple[str, Path]]:
        found = []
        for config in self.cache.rglob("config.json"):
            parts = config.parent.relative_to(self.cache).parts
            if len(parts) < 3:
                continue
            reference = parts[-1]
            joiner = "@" if reference.startswith("sha256:") else ":"
            found.append((f"{parts[0]}/{'/'.join(parts[1:-1])}{joiner}{reference}", config.parent))
        return sorted(found)


def _initialized(vm: Path) -> bool:
    return all((vm / f).is_file() for f in ("config.json", "disk.img", "nvram.bin"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    # Atomic: concurrent readers (list, exec) never see half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def _fake_config(vm: Path) -> dict[str, Any]:
    fake = _read_json(vm / "config.json").get("fake")
    return fake if isinstance(fake, dict) else {}


def _random_mac() -> str:
    octets = [random.randrange(256) for _ in range(6)]
    octets[0] = (octets[0] | 0x02) & 0xFE  # locally administered, unicast
    return ":".join(f"{o:02x}" for o in octets)


def _new_config(os_name: str, cpus: int, memory_mib: int) -> dict[str, Any]:
    darwin = os_name == "darwin"
    return {
        "version": 1,
        "os": os_name,
        "arch": "arm64",
        "cpuCount": cpus,
        "cpuCountMin": 4 if darwin else _MIN_CPUS,
        "memorySize": memory_mib * _MIB,
        "memorySizeMin": 4096 * _MIB if darwin else _MIN_MEMORY,
        "macAddress": _random_mac(),
        "display": {"width": 1024, "height": 768},
        "diskFormat": "raw",
        "diskSize": 50,
    }


def _make_vm(directory: Path, config: Mapping[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "config.json", config)
    for name in ("disk.img", "nvram.bin"):
        (directory / name).touch()


# -- the run lock: held by a running ``tart run`` (tart locks config.json with fcntl) ---------


def _lock_path(vm: Path) -> Path:
    return vm / "run.lock"


@contextlib.contextmanager
def _try_lock(vm: Path, *, wait: float = 0.0) -> Iterator[int | None]:
    """Yield a descriptor holding the VM's lock, or None when a ``run`` holds it."""
    try:
        fd = os.open(_lock_path(vm), os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:  # the VM folder is gone
        yield None
        return
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # Another call may be probing the lock for a moment: retry briefly.
                if time.monotonic() >= deadline:
                    yield None
                    return
                time.sleep(0.01)
        yield fd
    finally:
        os.close(fd)


def _running(vm: Path) -> bool:
    if not _lock_path(vm).exists():
        return False
    with _try_lock(vm, wait=0.05) as fd:
        return fd is None


def _run_info(vm: Path, *, wait: float = 1.0) -> dict[str, Any]:
    # run.json is written right after the lock is taken: a caller may be a moment early.
    deadline = time.monotonic() + wait
    while True:
        info = _read_json(vm / "run.json")
        if info or time.monotonic() >= deadline:
            return info
        time.sleep(0.01)


def _kill_guests(vm: Path) -> None:
    """Kill what ``exec`` started in the "guest": a stopped VM runs nothing."""
    guests = vm / "guest"
    if not guests.is_dir():
        return
    for entry in guests.iterdir():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.killpg(int(entry.name), signal.SIGKILL)
        entry.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Verbs


def _clone(home: _Home, args: _Args) -> int:
    source, new = args.positionals
    if "/" in new:
        raise _usage_error(_VERBS["clone"], "<new-name> should be a local name")
    if args.options["concurrency"] is not None and args.options["concurrency"] < 1:
        raise _usage_error(_VERBS["clone"], "network concurrency cannot be less than 1")
    remote = home.remote(source)
    source_vm = remote if remote is not None else home.vms / source
    known = _initialized(source_vm)
    home.delay("clone", source_vm if known else None)
    home.fail("clone", source_vm if known else None)
    if remote is not None and not known:
        _pull(home, source, remote)
    elif remote is None:
        source_vm = home.local(source)
    target = home.vms / new
    if target.exists() and _running(target):
        raise _runtime(f'VM "{new}" is running', 1)
    staging = Path(tempfile.mkdtemp(dir=home.tmp))
    config = _read_json(source_vm / "config.json")
    # Like tart: a clone gets a fresh MAC when another local VM already uses the source's.
    macs = {_read_json(home.vms / n / "config.json").get("macAddress") for n in home.local_names()}
    if config.get("macAddress") in macs:
        config["macAddress"] = _random_mac()
    _make_vm(staging, config)
    if target.exists():
        shutil.rmtree(target)
    staging.replace(target)
    return 0


def _pull(home: _Home, name: str, cache: Path) -> None:
    print(f"pulling {name}...")
    guess = "darwin" if "macos" in name.lower() else "linux"
    staging = Path(tempfile.mkdtemp(dir=home.tmp))
    _make_vm(staging, _new_config(guess, 4, 8192 if guess == "darwin" else 4096))
    cache.parent.mkdir(parents=True, exist_ok=True)
    if cache.exists():  # pulled concurrently by another clone
        shutil.rmtree(staging)
    else:
        staging.replace(cache)


def _set(home: _Home, args: _Args) -> int:
    (name,) = args.positionals
    vm = home.local(name)
    home.delay("set", vm)
    home.fail("set", vm)
    opts = args.options
    config = _read_json(vm / "config.json")
    if opts["cpu"] is not None:
        floor = max(_MIN_CPUS, int(config.get("cpuCountMin", _MIN_CPUS)))
        if opts["cpu"] < floor:
            raise _error(f"VM should have {floor} CPU cores at minimum (requested {opts['cpu']})")
        config["cpuCount"] = opts["cpu"]
    if opts["memory"] is not None:
        size = opts["memory"] * _MIB
        floor = max(_MIN_MEMORY, int(config.get("memorySizeMin", _MIN_MEMORY)))
        if size < floor:
            raise _error(f"VM should have {floor} bytes of memory at minimum (requested {size})")
        config["memorySize"] = size
    if opts["display"] is not None:
        width, _, height = opts["display"].rstrip("ptx").partition("x")
        config["display"] = {"width": int(width or 0), "height": int(height or 0)}
    if opts["display_refit"] or opts["no_display_refit"]:
        config["displayRefit"] = bool(opts["display_refit"])
    if opts["random_mac"]:
        config["macAddress"] = _random_mac()
    if opts["disk"] is not None:
        if not Path(opts["disk"]).is_file():
            raise _error(f"The file {opts['disk']!r} couldn't be opened.")
        shutil.copyfile(opts["disk"], vm / "disk.img")
    if opts["disk_size"] is not None:
        if opts["disk_size"] < int(config.get("diskSize", 0)):
            raise _runtime("the new file size should be larger than the current disk size", 1)
        config["diskSize"] = opts["disk_size"]
    _write_json(vm / "config.json", config)
    return 0


def _validate_run(opts: Mapping[str, Any]) -> None:
    verb = _VERBS["run"]
    if opts["vnc"] and opts["vnc_experimental"]:
        raise _usage_error(verb, "--vnc and --vnc-experimental are mutually exclusive")
    softnet = bool(
        opts["net_softnet"]
        or opts["net_softnet_allow"]
        or opts["net_softnet_block"]
        or opts["net_softnet_expose"]
    )
    if sum([bool(opts["net_bridged"]), softnet, bool(opts["net_host"])]) > 1:
        raise _usage_error(
            verb, "--net-bridged, --net-softnet and --net-host are mutually exclusive"
        )
    if opts["graphics"] and opts["no_graphics"]:
        raise _usage_error(verb, "--graphics and --no-graphics are mutually exclusive")


def _shares(raw: Sequence[str]) -> list[_Share]:
    shares = [_parse_dir(d) for d in raw]
    by_tag: dict[str, list[_Share]] = {}
    for share in shares:
        by_tag.setdefault(share.tag, []).append(share)
    for group in by_tag.values():
        if len(group) > 1 and any(s.name is None for s in group):
            raise _usage_error(
                _VERBS["run"],
                "invalid --dir syntax: for multiple directory shares each one of them should "
                "be named",
            )
    for share in shares:
        path = os.path.expanduser(share.path)
        if not share.path.startswith(("http:", "https:")) and not os.path.isdir(path):
            raise _error(f"directory share {share.path!r} is not a directory")  # fake's check
    return shares


class _Signals:
    """Remembers the first SIGINT or SIGTERM instead of dying of it."""

    def __init__(self) -> None:
        self.received: int | None = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum


def _run(home: _Home, args: _Args, argv: Sequence[str]) -> int:
    (name,) = args.positionals
    _validate_run(args.options)
    vm = home.local(name)
    shares = _shares(args.options["dir"])
    home.delay("run", vm)
    home.fail("run", vm)
    signals = _Signals()
    with _try_lock(vm, wait=0.5) as fd:
        if fd is None:
            raise _runtime(f'VM "{name}" is already running!', 2)
        info = {
            "pid": os.getpid(),
            "started": time.time(),
            "argv": list(argv),
            "graphics": not args.options["no_graphics"],
            "dirs": [s.to_json() for s in shares],
        }
        _write_json(vm / "run.json", info)
        try:
            while signals.received is None:
                if not (vm / "config.json").exists():
                    raise _runtime(f'the VM "{name}" was deleted while running', 1)
                time.sleep(_POLL)
        finally:
            _kill_guests(vm)
            (vm / "run.json").unlink(missing_ok=True)
    if signals.received == signal.SIGINT:
        print("Stopping VM...")
        return 0
    raise _Killed(signal.SIGTERM)


def _exec(home: _Home, args: _Args) -> int:
    (name,) = args.positionals
    vm = home.local(name)
    if not _running(vm):
        raise _not_running(name)
    home.delay("exec", vm)
    home.fail("exec", vm)
    started = _run_info(vm).get("started")
    if not isinstance(started, float | int) or time.time() - started < home.boot_delay(vm):
        raise _runtime(_AGENT_DOWN, 1)
    signals = _Signals()
    try:
        child = subprocess.Popen(
            args.rest,
            cwd=vm,
            # The guest agent gives an interactive command a pipe, a non-interactive one nothing.
            stdin=subprocess.PIPE if args.options["interactive"] else subprocess.DEVNULL,
            start_new_session=True,  # the "guest" process group, killed when the VM stops
        )
    except OSError as exc:
        raise _runtime(f"failed to run {args.rest[0]!r} in the guest: {exc.strerror}", 1) from exc
    if child.stdin is not None:
        threading.Thread(target=_forward_stdin, args=(child.stdin,), daemon=True).start()
    marker = vm / "guest" / str(child.pid)
    with contextlib.suppress(OSError):
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
    try:
        while True:
            try:
                status = child.wait(timeout=_POLL)
            except subprocess.TimeoutExpired:
                pass
            else:
                if status < 0 and not _running(vm):  # killed because the VM stopped
                    raise _runtime(_CONNECTION_LOST, 1)
                return status if status >= 0 else 128 - status
            if signals.received is not None:
                # tart exec does not handle signals: it dies, and the agent ends the command.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                raise _Killed(signals.received)
            if not _running(vm):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                raise _runtime(_CONNECTION_LOST, 1)
    finally:
        marker.unlink(missing_ok=True)


def _forward_stdin(pipe: IO[bytes]) -> None:
    """``tart exec -i``: this process's stdin to the command's, which is closed at its end."""
    try:
        while chunk := os.read(0, 64 * 1024):
            view = memoryview(chunk)
            while view:
                view = view[os.write(pipe.fileno(), view) :]
    except OSError:
        pass  # no stdin, or the command closed its own (EPIPE)
    finally:
        with contextlib.suppress(OSError):
            pipe.close()


def _stop(home: _Home, args: _Args) -> int:
    (name,) = args.positionals
    vm = home.local(name)
    home.delay("stop", vm)
    home.fail("stop", vm)
    if not _running(vm):
        raise _not_running(name)
    pid = _run_info(vm).get("pid")
    if not isinstance(pid, int):
        raise _not_running(name)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    timeout = args.options["timeout"]
    deadline = time.monotonic() + (30 if timeout is None else timeout)
    while time.monotonic() < deadline:
        if not _running(vm):
            return 0
        time.sleep(_POLL)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return 0
    except OSError as exc:
        raise _runtime(
            f'failed to forcefully terminate the VM "{name}": {exc.strerror}', 1
        ) from exc
    _kill_guests(vm)
    while _running(vm):
        time.sleep(0.01)
    return 0


def _delete(home: _Home, args: _Args) -> int:
    for name in args.positionals:
        remote = home.remote(name)
        if remote is not None:
            if not _initialized(remote):
                raise _missing(name)
            shutil.rmtree(remote)
            continue
        vm = home.vms / name
        if not (vm / "config.json").exists():
            raise _missing(name)
        home.delay("delete", vm)
        home.fail("delete", vm)
        with _try_lock(vm, wait=0.05) as fd:
            if fd is None:
                raise _runtime(f'VM "{name}" is running', 1)
            shutil.rmtree(vm)
    return 0


def _list(home: _Home, args: _Args) -> int:
    source = args.options["source"]
    if source is not None and source not in ("local", "oci"):
        raise _usage_error(_VERBS["list"], f"'{source}' is not a valid <source>")
    home.delay("list")
    home.fail("list")
    rows: list[dict[str, Any]] = []
    if source in (None, "local"):
        rows += [_info("local", n, home.vms / n) for n in home.local_names()]
    if source in (None, "oci"):
        rows += [_info("OCI", n, p) for n, p in home.remote_names()]
    if args.options["quiet"]:
        for row in rows:
            print(row["Name"])
    elif args.options["format"] == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(_table(rows))
    return 0


def _info(source: str, name: str, vm: Path) -> dict[str, Any]:
    config = _read_json(vm / "config.json")
    running = _running(vm)
    accessed = datetime.fromtimestamp(vm.stat().st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "Source": source,
        "Name": name,
        "Disk": int(config.get("diskSize", 0)),
        "Size": 0,
        "Accessed": accessed,
        "Running": running,
        "State": "running" if running else "stopped",
    }


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = [c for c in rows[0] if c != "Running"]  # tart shows Running only in JSON
    cells = [columns] + [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------
# Entry point


def _dispatch(home: _Home, argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(f"USAGE: {_ROOT_USAGE}\n\nSUBCOMMANDS: {', '.join(_VERBS)}")
        return 0
    if argv[0] == "--version":
        print(_VERSION)
        return 0
    verb = _VERBS.get(argv[0])
    if verb is None:
        raise _usage_error(None, f"Unexpected argument '{argv[0]}'")
    try:
        args = _parse(verb, argv[1:])
    except _Exit as exc:
        if exc.status == 0:  # --help
            print(f"USAGE: {verb.usage}")
        raise
    if verb.name == "clone":
        return _clone(home, args)
    if verb.name == "set":
        return _set(home, args)
    if verb.name == "run":
        return _run(home, args, argv)
    if verb.name == "exec":
        return _exec(home, args)
    if verb.name == "stop":
        return _stop(home, args)
    if verb.name == "delete":
        return _delete(home, args)
    return _list(home, args)


def _record(root: Path, entry: Mapping[str, Any]) -> None:
    line = (json.dumps(entry) + "\n").encode()
    fd = os.open(root / _INVOCATIONS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        os.close(fd)


def _die_of_signal(signum: int, frame: FrameType | None) -> None:
    raise _Killed(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake CLI with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    A ``run`` ended by SIGTERM, or an ``exec`` by SIGINT/SIGTERM, kills this process with that
    signal after recording the invocation, as the real (non-handling) tart would die.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    root = default_home()
    root.mkdir(parents=True, exist_ok=True)
    # Until a verb handles signals itself (run, exec), SIGTERM ends it as it would end tart,
    # but through _Killed, so that the end is recorded. (SIGINT raises KeyboardInterrupt.)
    signal.signal(signal.SIGTERM, _die_of_signal)
    call = uuid.uuid4().hex
    _record(
        root, {"event": "start", "id": call, "pid": os.getpid(), "time": time.time(), "argv": args}
    )
    status = 1
    killed: int | None = None
    try:
        status = _dispatch(_Home(root), args)
    except _Exit as exc:
        if exc.message:
            print(exc.message, file=sys.stderr)
        status = exc.status
    except _Killed as exc:
        killed = exc.signum
        status = -exc.signum
    except KeyboardInterrupt:
        # SIGINT while a verb works (tart cancels it, cleaning up): die of it.
        killed = signal.SIGINT
        status = -signal.SIGINT
    finally:
        sys.stdout.flush()
        _record(root, {"event": "end", "id": call, "time": time.time(), "status": status})
    if killed is not None:
        signal.signal(killed, signal.SIG_DFL)
        os.kill(os.getpid(), killed)
    return status


# --------------------------------------------------------------------------------------------
# Test helpers


@dataclass(frozen=True)
class Invocation:
    """One recorded call of the fake."""

    argv: tuple[str, ...]
    pid: int
    started: float
    ended: float | None
    """``None`` while running, or if the process was killed with SIGKILL."""
    status: int | None
    """Exit status; negative: died of that signal; ``None``: see :attr:`ended`."""

    @property
    def verb(self) -> str:
        return self.argv[0] if self.argv else ""


@dataclass(frozen=True)
class FakeTart:
    """A fake tart installation: an executable shim in :attr:`bin_dir`, state in :attr:`home`."""

    home: Path
    bin_dir: Path

    @classmethod
    def install(
        cls, directory: Path | str, *, home: Path | str | None = None, python: str | None = None
    ) -> FakeTart:
        """Write ``<directory>/bin/tart``, a ``#!/bin/sh`` shim running this module with
        ``python`` (default: the current interpreter) and ``FAKE_TART_HOME`` defaulting to
        ``home`` (default ``<directory>/home``), so a PATH entry alone selects this fake.

        The shim runs this file by path rather than ``-m tests.support.faketart``: it
        imports only the stdlib, and skipping the package import makes each call ~5x faster.
        """
        base = Path(directory)
        fake = cls(home=Path(home) if home else base / "home", bin_dir=base / "bin")
        fake.bin_dir.mkdir(parents=True, exist_ok=True)
        fake.home.mkdir(parents=True, exist_ok=True)
        script = (
            "#!/bin/sh\n"
            f'FAKE_TART_HOME="${{{HOME_ENV}:-{_shell_escape(fake.home)}}}"\n'
            f"export {HOME_ENV}\n"
            f"exec {shlex.quote(python or sys.executable)} {shlex.quote(__file__)} " + '"$@"\n'
        )
        fake.executable.write_text(script, encoding="utf-8")
        fake.executable.chmod(0o755)
        return fake

    @property
    def executable(self) -> Path:
        return self.bin_dir / "tart"

    def env(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        """``base`` (default ``os.environ``) with :attr:`bin_dir` first on PATH, ``HOME_ENV``
        set, plus ``extra``."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join(filter(None, [str(self.bin_dir), env.get("PATH", "")]))
        env[HOME_ENV] = str(self.home)
        env.update(extra)
        return env

    def call(
        self, *args: str, input: str | None = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the fake CLI with ``args`` and ``input`` on its stdin (default: ``/dev/null``);
        output captured as text."""
        return subprocess.run(
            [str(self.executable), *args],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            check=False,
        )

    # -- images and VMs ---------------------------------------------------------------------

    def create_vm(
        self,
        name: str,
        *,
        os_name: str = "linux",
        cpus: int = 2,
        memory: int = 2048,
        boot_delay: float | str | None = None,
        fail: Mapping[str, str] | None = None,
        delay: Mapping[str, float] | None = None,
    ) -> Path:
        """Make local VM ``name`` (an image to clone), with faults its clones inherit:
        ``boot_delay`` (seconds or ``"never"``), ``fail`` ({verb: message}) and ``delay``
        ({verb: seconds})."""
        config = _new_config(os_name, cpus, memory)
        fake: dict[str, Any] = {}
        if boot_delay is not None:
            fake["boot_delay"] = boot_delay
        if fail:
            fake["fail"] = dict(fail)
        if delay:
            fake["delay"] = dict(delay)
        if fake:
            config["fake"] = fake
        vm = _Home(self.home).vms / name
        _make_vm(vm, config)
        return vm

    def vms(self) -> list[str]:
        """Names of the local VMs (``tart list --source local --quiet``)."""
        return _Home(self.home).local_names()

    def cached_images(self) -> list[str]:
        """Names of the pulled OCI images."""
        return [name for name, _ in _Home(self.home).remote_names()]

    def config(self, name: str) -> dict[str, Any]:
        return _read_json(self.home / "vms" / name / "config.json")

    def is_running(self, name: str) -> bool:
        vm = self.home / "vms" / name
        return vm.is_dir() and _running(vm)

    def run_info(self, name: str) -> dict[str, Any]:
        """What the running ``tart run`` of ``name`` recorded (pid, argv, dirs); ``{}``."""
        return _read_json(self.home / "vms" / name / "run.json")

    # -- knobs ----------------------------------------------------------------------------

    def set_fault(self, verb: str, message: str | None) -> None:
        """Make every ``verb`` call fail with ``message`` (``None``: stop failing)."""
        self._update_control("fail", verb, message)

    def set_delay(self, verb: str, seconds: float | None) -> None:
        self._update_control("delay", verb, seconds)

    def set_boot_delay(self, seconds: float | str | None) -> None:
        """Seconds (or ``"never"``) before ``exec`` works after ``run``; ``None``: default."""
        control = _read_json(self.home / _CONTROL)
        if seconds is None:
            control.pop("boot_delay", None)
        else:
            control["boot_delay"] = seconds
        _write_json(self.home / _CONTROL, control)

    def _update_control(self, key: str, verb: str, value: object) -> None:
        control = _read_json(self.home / _CONTROL)
        section = control.setdefault(key, {})
        if value is None:
            section.pop(verb, None)
        else:
            section[verb] = value
        _write_json(self.home / _CONTROL, control)

    # -- records --------------------------------------------------------------------------

    def invocations(self) -> list[Invocation]:
        """Every recorded call, in the order they started."""
        starts: dict[str, dict[str, Any]] = {}
        ends: dict[str, dict[str, Any]] = {}
        try:
            lines = (self.home / _INVOCATIONS).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            entry = json.loads(line)
            (starts if entry["event"] == "start" else ends)[entry["id"]] = entry
        calls = []
        for call, start in starts.items():
            end = ends.get(call, {})
            calls.append(
                Invocation(
                    argv=tuple(start["argv"]),
                    pid=start["pid"],
                    started=start["time"],
                    ended=end.get("time"),
                    status=end.get("status"),
                )
            )
        return sorted(calls, key=lambda c: c.started)


def install(directory: Path | str, *, home: Path | str | None = None) -> FakeTart:
    """:meth:`FakeTart.install`: the pytest-friendly entry point (``install(tmp_path)``)."""
    return FakeTart.install(directory, home=home)


def _shell_escape(path: Path) -> str:
    # Inside "${VAR:-...}" in double quotes: escape what the shell would expand.
    return re.sub(r'([$`"\\])', r"\\\1", str(path))


if __name__ == "__main__":
    sys.exit(main())
