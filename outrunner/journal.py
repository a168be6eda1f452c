"""A crash-safe journal of the runners this process registered at GitHub.

A runner outlives the process that made it (DESIGN.md, "Async model"): after a crash, a
``kill -9`` or a restart, the next outrunner process reads the journal to adopt the environments
that still run and to remove the registrations that leaked. There is one journal per state
directory, and one process at a time may use a state directory (an ``flock`` on
``runners.journal.lock``, released by the kernel when the process dies, however it dies).

The file is append-only JSON lines; ``docs/journal-format.md`` describes it record by record. A
record is appended with one ``os.write`` of a whole line, so a crash leaves at worst a torn last
line, which the next :meth:`Journal.open` ignores and reports. The line is in the kernel's page
cache (safe from a crash of the process) when :meth:`Journal.record` returns; on an event loop,
its ``fdatasync`` runs later in a thread, shared by every record written meanwhile (group commit),
and ``await journal.sync()`` waits until it is on disk (safe from a crash of the machine). The
journal never raises because of what the file holds: bad records are skipped and listed in
:attr:`Journal.problems`. Only a state directory or file that cannot be used at all raises
:class:`JournalError`.

The journal holds names, ids, phases and backends, never a JIT config or a token.

Where the state directory is comes from :func:`resolve_state_dir`::

    state = resolve_state_dir(args.state_dir, cfg.state_dir)
    if state.warning:
        log.warning(state.warning)
    with Journal.open(state) as journal:
        journal.record(JournalEntry(scale_set="linux", name="linux-0a1b2c3d"))
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import stat
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple, TypeVar

from outrunner._aio import first_of
from outrunner.log import BoundLogger, get_logger

__all__ = [
    "DEFAULT_STATE_DIR",
    "JOURNAL_FILE",
    "LOCK_FILE",
    "Journal",
    "JournalEntry",
    "JournalError",
    "JournalPhase",
    "StateDir",
    "resolve_state_dir",
]

JOURNAL_FILE: Final = "runners.journal"
LOCK_FILE: Final = JOURNAL_FILE + ".lock"
# Compaction writes the new journal here, then renames it over JOURNAL_FILE. One name is enough:
# only the process holding the lock ever writes it.
_TEMP_FILE: Final = JOURNAL_FILE + ".tmp"
DEFAULT_STATE_DIR: Final = Path("/var/lib/outrunner")

FORMAT_VERSION: Final = 1
_T = TypeVar("_T")
# The file is rewritten when it holds more than max(64, 4 x live entries) records: appends stay
# the common case, and the file stays small whatever the churn.
_COMPACT_MIN_RECORDS: Final = 64
_COMPACT_FACTOR: Final = 4
# The least time, in seconds, between the starts of two background fdatasyncs (Journal._flush)
# while a caller waits in Journal.sync().
_SYNC_INTERVAL: Final = 0.01
# How long, in seconds, a record nobody waits for may stay unsynced: such records (a phase change,
# a forgotten runner) only need to reach the disk soon, and gathering them costs far fewer syncs
# (at 1,000 runners, a sync every 10 ms was a tenth of the process's CPU).
_LAZY_SYNC_INTERVAL: Final = 1.0
# How long, in seconds, Journal.sync() waits for an fdatasync before it gives up waiting (logged):
# a disk that hangs (an NFS server gone) must not stop every runner start for good, any more than
# a failing one does. The record is written already, so only a crash of the machine could lose it.
SYNC_WAIT_LIMIT: Final = 10.0
# A file of garbage must not produce millions of problems and log lines.
_MAX_PROBLEMS: Final = 100
_EXCERPT_BYTES: Final = 60

if sys.platform == "darwin":
    # macOS has no fdatasync; its fsync survives a kernel panic, not a power cut (F_FULLFSYNC
    # would, at tens of milliseconds per record).
    _datasync = os.fsync
else:
    _datasync = os.fdatasync


class JournalError(Exception):
    """The state directory cannot be used at all: it cannot be created, written or locked (another
    live process uses it). The message names the path and the reason."""


class JournalPhase(StrEnum):
    """What the journal knows about a runner; ``str()`` gives the value stored in the file."""

    REGISTERING = "registering"
    """Recorded before the JIT request: the name is known, the runner id maybe not."""
    PROVISIONING = "provisioning"
    """The JIT config arrived (the runner id is known); the environment is being created."""
    IDLE = "idle"
    """The environment started; the runner waits for a job."""
    RUNNING = "running"
    """The runner is running a job."""
    STOPPING = "stopping"
    """The environment is being destroyed."""
    DEREGISTERING = "deregistering"
    """The environment is gone; removing the registration at GitHub is pending."""


@dataclass(frozen=True, kw_only=True)
class JournalEntry:
    """One runner as the journal knows it.

    ``runner_id`` 0 means unknown (the process died before the JIT answer was recorded: the
    registration, if any, must be found by name). ``backend`` is the provisioner kind
    (``"docker"``, ``"libvirt"``, ``"tart"`` or another). ``updated_at`` is the ``time.time()`` of
    the record; :meth:`Journal.record` sets it when it is 0. Construction checks types and values
    (the file is read back through it), raising :class:`TypeError` or :class:`ValueError`.
    """

    scale_set: str
    name: str
    runner_id: int = 0
    backend: str = ""
    phase: JournalPhase = JournalPhase.REGISTERING
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        for field, value in (
            ("scale_set", self.scale_set),
            ("name", self.name),
            ("backend", self.backend),
        ):
            if not isinstance(value, str):
                raise TypeError(f"{field} must be a string, got {type(value).__name__}")
        if not self.scale_set:
            raise ValueError("scale_set must not be empty")
        if not self.name:
            raise ValueError("name must not be empty")
        if type(self.runner_id) is not int:  # bool is an int, and never a runner id
            raise TypeError(f"runner_id must be an integer, got {type(self.runner_id).__name__}")
        if self.runner_id < 0:
            raise ValueError(f"runner_id must be >= 0, got {self.runner_id}")
        if not isinstance(self.phase, str):
            raise TypeError(f"phase must be a string, got {type(self.phase).__name__}")
        # JournalPhase(...) raises ValueError naming an unknown phase.
        object.__setattr__(self, "phase", JournalPhase(self.phase))
        if isinstance(self.updated_at, bool) or not isinstance(self.updated_at, int | float):
            raise TypeError(f"updated_at must be a number, got {type(self.updated_at).__name__}")
        if not math.isfinite(self.updated_at) or self.updated_at < 0:
            raise ValueError(f"updated_at must be a finite time >= 0, got {self.updated_at}")
        object.__setattr__(self, "updated_at", float(self.updated_at))


_ENTRY_FIELDS: Final = frozenset(f.name for f in dataclasses.fields(JournalEntry))


# ---------------------------------------------------------------------------------------------
# Where the state directory is


@dataclass(frozen=True)
class StateDir:
    """A resolved state directory: where it is, which setting chose it, and a warning to log
    when the default was unusable and a user directory replaced it."""

    path: Path
    source: str
    """``"--state-dir"``, ``"config state_dir"``, ``"OUTRUNNER_STATE_DIR"``,
    ``"STATE_DIRECTORY"``, ``"default"`` or ``"user fallback"``."""
    warning: str | None = None


def resolve_state_dir(
    flag: str | None,
    config_value: str,
    environ: Mapping[str, str] | None = None,
    *,
    default: str | os.PathLike[str] = DEFAULT_STATE_DIR,
    create: bool = True,
) -> StateDir:
    """The state directory, from the first setting that names one.

    1. ``flag`` (``--state-dir``), 2. ``config_value`` (the config key ``state_dir``),
    3. ``$OUTRUNNER_STATE_DIR``, 4. systemd's ``$STATE_DIRECTORY`` (the first of its
    colon-separated paths), 5. ``default`` (``/var/lib/outrunner``). Empty values count as unset.
    ``environ`` defaults to ``os.environ``.

    Only the default is checked, by creating it (mode 0o700) when missing: when that fails or the
    directory is not writable, the user's state directory (``$XDG_STATE_HOME/outrunner``, else
    ``~/.local/state/outrunner``) replaces it and ``warning`` says so. An explicit setting is never
    replaced: if it cannot be used, :meth:`Journal.open` raises :class:`JournalError` naming it.
    ``create=False`` (``outrunner --check``) judges a missing default by its parent instead of
    creating it.
    """
    env = os.environ if environ is None else environ
    explicit = (
        ("--state-dir", flag or ""),
        ("config state_dir", config_value),
        ("OUTRUNNER_STATE_DIR", env.get("OUTRUNNER_STATE_DIR", "")),
        ("STATE_DIRECTORY", next((p for p in env.get("STATE_DIRECTORY", "").split(":") if p), "")),
    )
    for source, value in explicit:
        if value:
            return StateDir(Path(value).absolute(), source)
    default_path = Path(default)
    try:
        if create:
            _make_dir(default_path)
        probe = default_path if create or default_path.exists() else _existing_parent(default_path)
        problem = None if os.access(probe, os.W_OK | os.X_OK) else "not writable"
    except OSError as exc:
        problem = _reason(exc)
    if problem is None:
        return StateDir(default_path, "default")
    fallback = _user_state_dir(env)
    warning = (
        f"default state dir {default_path} cannot be used ({problem}); using {fallback} instead "
        "(choose one with --state-dir, the config key state_dir or OUTRUNNER_STATE_DIR)"
    )
    return StateDir(fallback, "user fallback", warning)


def _existing_parent(path: Path) -> Path:
    """The nearest ancestor of ``path`` that exists (where creating it would start)."""
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path("/")


def _user_state_dir(env: Mapping[str, str]) -> Path:
    xdg = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec says to ignore a relative value
        return Path(xdg) / "outrunner"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".local" / "state" / "outrunner"


def _make_dir(path: Path) -> None:
    # The mode applies to the last component only; parents get the usual umask defaults.
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileExistsError):  # from mkdir(exist_ok=True): a file has the name
        return "it exists and is not a directory"
    if isinstance(exc, NotADirectoryError):
        return "a parent of it is not a directory"
    return exc.strerror or str(exc)


# ---------------------------------------------------------------------------------------------
# Reading the file


class _Problem(NamedTuple):
    line: int
    reason: str


class _Replay(NamedTuple):
    live: dict[str, JournalEntry]
    sessions: dict[str, str]
    records: int
    problems: list[_Problem]
    more_problems: int


def _excerpt(line: bytes) -> str:
    text = repr(line[:_EXCERPT_BYTES])
    return text + "..." if len(line) > _EXCERPT_BYTES else text


def _apply(
    line: bytes, live: dict[str, JournalEntry], sessions: dict[str, str]
) -> tuple[bool, str | None]:
    """Apply one record to ``live`` or ``sessions``: (whether it was applied, what was wrong with
    it or None)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return False, f"not a JSON record ({type(exc).__name__}: {exc})"
    if not isinstance(record, dict):
        return False, f"not a JSON object but {type(record).__name__}"
    version = record.get("v")
    if type(version) is not int or version != FORMAT_VERSION:
        return False, f"unsupported version {version!r} (written by a newer outrunner?), skipped"
    op = record.get("op")
    if op == "put":
        try:
            entry = JournalEntry(**{k: v for k, v in record.items() if k in _ENTRY_FIELDS})
        except (TypeError, ValueError) as exc:
            return False, f"invalid put record ({exc}), skipped"
        live[entry.name] = entry
        unknown = sorted(k for k in record if k not in _ENTRY_FIELDS and k not in ("v", "op"))
        if unknown:
            return True, f"ignored unknown fields {', '.join(map(repr, unknown))} of a put record"
        return True, None
    if op == "forget":
        name = record.get("name")
        if not isinstance(name, str) or not name:
            return False, "invalid forget record (name must be a non-empty string), skipped"
        live.pop(name, None)
        return True, None
    if op == "session":
        scale_set, session_id = record.get("scale_set"), record.get("session_id")
        if not isinstance(scale_set, str) or not scale_set or not isinstance(session_id, str):
            return False, "invalid session record (scale_set, session_id must be strings), skipped"
        if session_id:
            sessions[scale_set] = session_id
        else:
            sessions.pop(scale_set, None)
        return True, None
    return False, f"unknown op {op!r} (written by a newer outrunner?), skipped"


def _replay(data: bytes) -> _Replay:
    """Rebuild the live entries from the file's bytes. Never raises on content."""
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the data ends with a newline or is empty
    live: dict[str, JournalEntry] = {}
    sessions: dict[str, str] = {}
    problems: list[_Problem] = []
    more = 0

    def problem(number: int, reason: str) -> None:
        nonlocal more
        if len(problems) < _MAX_PROBLEMS:
            problems.append(_Problem(number, reason))
        else:
            more += 1

    for number, line in enumerate(lines, 1):
        applied, reason = _apply(line, live, sessions)
        if reason is None:
            continue
        if not applied and number == len(lines) and not tail:
            problem(number, f"torn last record ignored ({reason}): {_excerpt(line)}")
        else:
            problem(number, f"{reason}: {_excerpt(line)}")
    if tail:
        # Every record is written with its newline in one write: a line without one was cut
        # short by a crash, even if what is there happens to parse.
        problem(
            len(lines) + 1,
            f"torn last record ignored ({len(tail)} bytes without a newline): {_excerpt(tail)}",
        )
    return _Replay(live, sessions, len(lines) + (1 if tail else 0), problems, more)


# One encoder for every record: json.dumps with arguments builds a new one per call.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)


# What the encoder quotes a str with when ensure_ascii is set.
_quote: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii


def _line(record: Mapping[str, object]) -> bytes:
    return (_ENCODER.encode(record) + "\n").encode("ascii")


def _put_line(entry: JournalEntry) -> bytes:
    # The same bytes as _line() of the record as a dict (a test compares them), at half the
    # cost: a runner's lifecycle writes six. JournalEntry has checked every field already (str,
    # int >= 0, a finite float), and strings are quoted by the function the encoder uses.
    q = _quote
    return (
        f'{{"v":{FORMAT_VERSION},"op":"put","scale_set":{q(entry.scale_set)},'
        f'"name":{q(entry.name)},"runner_id":{entry.runner_id},"backend":{q(entry.backend)},'
        f'"phase":{q(entry.phase.value)},"updated_at":{float.__repr__(entry.updated_at)}}}\n'
    ).encode("ascii")


def _forget_line(name: str) -> bytes:
    # As _put_line: the bytes _line() writes for the same record, formatted directly.
    return f'{{"v":{FORMAT_VERSION},"op":"forget","name":{_quote(name)}}}\n'.encode("ascii")


def _session_line(scale_set: str, session_id: str) -> bytes:
    return _line(
        {"v": FORMAT_VERSION, "op": "session", "scale_set": scale_set, "session_id": session_id}
    )


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _datasync_and_close(fd: int) -> None:
    """Run in the journal's sync thread: ``fd`` is a duplicate of the append descriptor, taken on
    the event loop, so a compaction that closes (and the kernel that reuses) the original meanwhile
    cannot make this sync another file."""
    try:
        _datasync(fd)
    finally:
        os.close(fd)


def _install_compaction(fd: int, temp: Path, path: Path) -> str:
    """Run in the journal's sync thread: sync the compacted file (``fd``, a duplicate this closes),
    rename it over the journal, and sync the directory so that the rename survives a power cut.

    Returns what went wrong with the directory's sync ("" when nothing did): the new file is in
    place whatever it says. Raises when the file's sync or the rename fails (the old file is then
    still the journal, untouched)."""
    try:
        _datasync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    try:
        _fsync_dir(path.parent)
    except OSError as exc:
        return str(exc)
    return ""


class _Compaction:
    """A compacted journal being written next to the journal while the event loop goes on.

    ``fd`` is the temp file's append descriptor: it holds one put per live entry and one record
    per open session as of the compaction's start, then every line appended to the journal since
    (``lines`` counts them all). ``failed`` is set when one of those appends failed: the temp file
    is then of no use (see :meth:`Journal._settle_compaction`)."""

    __slots__ = ("failed", "fd", "lines")

    def __init__(self, fd: int, lines: int) -> None:
        self.fd = fd
        self.lines = lines
        self.failed = False


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The journal


class Journal:
    """The runners recorded under one state directory; open it with :meth:`open`.

    :meth:`record`, :meth:`forget` and :meth:`record_session` are cheap synchronous calls for the
    event loop: one ``os.write`` of the whole line on a descriptor kept open, so what they wrote
    survives a crash of the process as soon as they return. When ``durable``, the ``fdatasync``
    that makes it survive a crash of the machine too depends on the caller:

    * On a running event loop, it happens later, off the loop: one flusher task per journal runs
      ``fdatasync`` in the journal's own thread, and one sync covers every record written before it
      began (group commit: a thousand records in one loop iteration cost one or two syncs, not a
      thousand stalls). ``await`` :meth:`sync` to wait until what was written is on disk; records
      nobody waits for reach it within about a second.
    * Without a running loop (tools, tests), it happens inline, before the call returns.

    See ``docs/journal-format.md`` for the measured cost. A failed write or sync is logged, not
    raised: the entries stay in memory and the next call rewrites the whole file, so a full or
    failing disk costs crash safety for a while, never a running job. Not thread-safe (one event
    loop uses it).
    """

    def __init__(
        self, path: Path, *, lock_fd: int, logger: BoundLogger, durable: bool, where: str
    ) -> None:
        """Private: use :meth:`open`."""
        self._path = path
        self._lock_fd = lock_fd
        self._log = logger
        self._durable = durable
        self._where = where
        self._fd = -1
        self._live: dict[str, JournalEntry] = {}
        # The put line of each live entry, as written: a compaction joins these instead of encoding
        # every entry again (10 ms of the event loop at 1,000 live runners).
        self._lines: dict[str, bytes] = {}
        self._sessions: dict[str, str] = {}
        self._records = 0  # records in the file, including replaced and forgotten ones
        self._stale = False  # a write failed: the file lags the memory until a rewrite succeeds
        self._problems: tuple[str, ...] = ()
        self._closed = False
        # Group commit (durable only): ``_written`` counts the lines appended since open,
        # ``_synced`` how many of them a finished sync covers (a failed one too: it is logged, and
        # the file is rewritten on the next call). Waiters of sync() wait for a target count, in
        # the order of their targets.
        self._written = 0
        self._synced = 0
        self._sync_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None  # ends the flusher's lazy wait: a waiter
        self._sync_thread: ThreadPoolExecutor | None = None  # created on the first flush
        # A compaction started on an event loop (durable only): its file and directory syncs and
        # its rename run in the sync thread (``_install``, while it runs), not on the loop, where
        # they stalled every runner for the disk's latency (tens of milliseconds, more under load).
        self._compaction: _Compaction | None = None
        self._install: Future[str] | None = None

    @classmethod
    def open(
        cls,
        state_dir: StateDir | str | os.PathLike[str],
        *,
        logger: BoundLogger | None = None,
        durable: bool = True,
    ) -> Journal:
        """Lock ``state_dir`` (created 0o700 when missing), load its journal and compact it.

        A :class:`StateDir` lets error messages name the setting that chose the directory.
        ``durable=False`` skips every fsync: records still survive a crash of the process (they
        are in the kernel's page cache), not a crash of the machine. Raises :class:`JournalError`
        when the directory or file cannot be used or another process holds the lock.
        """
        if isinstance(state_dir, StateDir):
            directory = state_dir.path
            where = f"state dir {directory} (from {state_dir.source})"
        else:
            directory = Path(state_dir)
            where = f"state dir {directory}"
        log = logger if logger is not None else get_logger("outrunner.journal")
        try:
            _make_dir(directory)
        except OSError as exc:
            raise JournalError(f"{where} cannot be used: {_reason(exc)}") from exc
        journal = cls(
            directory / JOURNAL_FILE,
            lock_fd=_lock(directory, where),
            logger=log,
            durable=durable,
            where=where,
        )
        try:
            journal._load()
        except BaseException:
            journal.close()
            raise
        return journal

    @property
    def path(self) -> Path:
        """The journal file."""
        return self._path

    @property
    def problems(self) -> tuple[str, ...]:
        """What loading found wrong (torn last record, corrupt or unknown records), one
        human-readable line each, as ``<file>:<line>: <what>``; empty when the file was clean."""
        return self._problems

    def entries(self, scale_set: str | None = None) -> list[JournalEntry]:
        """The live entries (of ``scale_set``, or all), in the order they were first recorded."""
        return [e for e in self._live.values() if scale_set is None or e.scale_set == scale_set]

    def get(self, name: str) -> JournalEntry | None:
        """The live entry named ``name``, if any."""
        return self._live.get(name)

    def sessions(self) -> dict[str, str]:
        """Scale set name -> id of the message session this process (or a crashed one) has
        open there; after a crash, the next start deletes it instead of waiting for GitHub to
        expire it."""
        return dict(self._sessions)

    def record_session(self, scale_set: str, session_id: str) -> None:
        """Remember the open message session of ``scale_set``; ``""`` once it is deleted.
        Raises :class:`ValueError` once closed."""
        self._check_open()
        if self._sessions.get(scale_set, "") == session_id:
            return
        if session_id:
            self._sessions[scale_set] = session_id
        else:
            del self._sessions[scale_set]
        self._write(_session_line(scale_set, session_id))

    def record(self, entry: JournalEntry) -> None:
        """Insert ``entry``, or replace the entry of the same name (keeping its position).

        ``updated_at`` 0 becomes the current time. Raises :class:`ValueError` once closed.
        """
        self._check_open()
        if entry.updated_at == 0.0:
            entry = dataclasses.replace(entry, updated_at=time.time())
        line = _put_line(entry)
        self._live[entry.name] = entry
        self._lines[entry.name] = line
        self._write(line)

    def forget(self, name: str) -> None:
        """Drop the entry named ``name``; nothing happens (nothing is written) when there is
        none. Raises :class:`ValueError` once closed."""
        self._check_open()
        if self._live.pop(name, None) is not None:
            del self._lines[name]
            self._write(_forget_line(name))

    async def sync(self) -> None:
        """Return once every record written before the call is on disk.

        Returns at once when not ``durable``, when nothing written is waiting for its
        ``fdatasync``, or once closed (:meth:`close` syncs). A failing sync is logged and ends the
        wait all the same: a failing disk must not hold up the caller (a runner start); the next
        write rewrites the file. So does a sync that takes longer than :data:`SYNC_WAIT_LIMIT`
        (logged as an error; the sync goes on in the background).
        """
        target = self._written
        if not self._durable or self._closed or self._synced >= target:
            return
        loop = asyncio.get_running_loop()
        self._start_flusher(loop)
        waiter = loop.create_future()
        self._sync_waiters.append((target, waiter))
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        # The waiter is left as it is when this is cancelled or gives up: _mark_synced ends it.
        if await first_of(waiter, timeout=SYNC_WAIT_LIMIT) < 0:
            self._log.error(
                "Runner journal sync is taking too long; going on without it",
                file=str(self._path),
                waited_s=SYNC_WAIT_LIMIT,
            )

    def close(self) -> None:
        """Close the file and release the state directory's lock. Safe to call again, on an event
        loop or not.

        Syncs what is not yet on disk (inline: this is the process's last word) and stops the
        flusher task and the sync thread.
        """
        if self._closed:
            return
        self._closed = True
        self._stop_flusher()
        if self._sync_thread is not None:
            # Waits for at most the one fdatasync in flight (on its own duplicate descriptor),
            # so no thread of this journal outlives it.
            self._sync_thread.shutdown(wait=True)
            self._sync_thread = None
        # A compaction the thread renamed while nobody waited for it (its loop ended) may miss
        # the sync of its last lines and of the directory: close syncs both.
        installed = self._settle_compaction() and self._durable
        if installed:
            with contextlib.suppress(OSError):
                _fsync_dir(self._path.parent)
        if self._stale and self._fd >= 0:
            self._rewrite()  # last chance to persist what a failed write left in memory
        elif self._durable and (installed or self._synced < self._written) and self._fd >= 0:
            try:
                _datasync(self._fd)
            except OSError as exc:
                self._log.error(
                    "Cannot sync the runner journal", file=str(self._path), error=str(exc)
                )
        self._mark_synced(self._written)
        if self._fd >= 0:
            with contextlib.suppress(OSError):  # every record was already written (or logged)
                os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            # An empty pid (rather than a stale one) is what a racing opener reads from now on.
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"runners={len(self._live)}"
        return f"<Journal {self._path} {state}>"

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"journal {self._path} is closed")

    def _load(self) -> None:
        started = time.monotonic()
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            reason = _reason(exc)
            raise JournalError(
                f"{self._where} cannot be used: cannot read {self._path}: {reason}"
            ) from exc
        else:
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise JournalError(
                        f"{self._where} cannot be used: {self._path} is not a regular file"
                    )
                data = _read_all(fd)
            except OSError as exc:
                raise JournalError(
                    f"{self._where} cannot be used: cannot read {self._path}: {exc.strerror}"
                ) from exc
            finally:
                os.close(fd)
        replay = _replay(data)
        self._live = replay.live
        self._lines = {name: _put_line(e) for name, e in replay.live.items()}
        self._sessions = replay.sessions
        problems = [f"{self._path}:{p.line}: {p.reason}" for p in replay.problems]
        for p in replay.problems:
            self._log.warning(
                "Ignored part of the runner journal",
                file=str(self._path),
                line=p.line,
                reason=p.reason,
            )
        if replay.more_problems:
            problems.append(f"{self._path}: {replay.more_problems} more problems not listed")
            self._log.warning(
                "More problems in the runner journal not listed",
                file=str(self._path),
                count=replay.more_problems,
            )
        self._problems = tuple(problems)
        if os.path.lexists(self._path.with_name(_TEMP_FILE)):
            # A compaction was interrupted before its rename: the journal itself is intact (the
            # old file); the temp file is replaced by the compaction below.
            self._log.info("Removing a temp file of an interrupted journal compaction")
        # Compacting now also cuts a torn tail, which the next append would otherwise extend.
        try:
            self._compact()
        except OSError as exc:
            raise JournalError(
                f"{self._where} cannot be used: cannot write {self._path}: {exc.strerror or exc}"
            ) from exc
        self._log.info(
            "Opened runner journal",
            file=str(self._path),
            runners=len(self._live),
            records=replay.records,
            problems=len(self._problems),
            seconds=round(time.monotonic() - started, 4),
        )

    def _write(self, line: bytes) -> None:
        if not self._stale:
            loop = _running_loop() if self._durable else None
            if loop is None and self._compaction is not None and not self._installing():
                self._settle_compaction()  # its loop is gone: nobody would finish it
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
                self._written += 1
                if self._durable and loop is None:
                    _datasync(self._fd)
                    self._mark_synced(self._written)
            except OSError as exc:
                # The line may be partly on disk: only a rewrite from memory repairs the file.
                self._stale = True
                self._log.error(
                    "Cannot append to the runner journal; rewriting it",
                    file=str(self._path),
                    error=str(exc),
                )
            else:
                self._records += 1
                compaction = self._compaction
                if compaction is not None:
                    self._append_to_compaction(compaction, line)
                else:
                    live = len(self._live) + len(self._sessions)
                    if self._records > max(_COMPACT_MIN_RECORDS, _COMPACT_FACTOR * live):
                        if loop is None:
                            self._rewrite()  # which syncs what is pending, when it succeeds
                        else:
                            self._begin_compaction()  # the flusher syncs and installs it
                if loop is not None and (
                    self._synced < self._written or self._compaction is not None
                ):
                    self._start_flusher(loop)
                return
        self._rewrite()

    # -- group commit ------------------------------------------------------------------------

    def _start_flusher(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make sure a flusher runs on ``loop``: a live one notices new writes by itself, after
        the sync in flight (a new loop, as after ``asyncio.run`` ended, gets a new one)."""
        flusher = self._flusher
        if flusher is None or flusher.done() or flusher.get_loop() is not loop:
            self._flusher = loop.create_task(self._flush(), name=f"journal-sync:{self._path}")

    async def _flush(self) -> None:
        """Sync until every line written is covered: each round covers what was written before
        it began, so writes made during a sync cost one more round, however many they are.

        A round starts at most every _SYNC_INTERVAL while someone waits in :meth:`sync`, and
        within _LAZY_SYNC_INTERVAL of the flusher's start or last round when nobody does: under
        a steady stream of records, a round per record would cost a thread hand-off and an
        fdatasync each for little gain in durability."""
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        lazy_until = next_round + _LAZY_SYNC_INTERVAL
        while (self._synced < self._written or self._compaction is not None) and not self._closed:
            now = loop.time()
            start_at = next_round if self._sync_waiters else lazy_until
            if now < start_at:
                self._wake = wake = loop.create_future()
                try:
                    await first_of(wake, timeout=start_at - now)
                finally:
                    self._wake = None
                continue
            began = now
            target = self._written
            if self._compaction is not None:
                await self._install_compaction(target)
                next_round = began + _SYNC_INTERVAL
                lazy_until = loop.time() + _LAZY_SYNC_INTERVAL
                continue
            try:
                fd = os.dup(self._fd)
            except OSError as exc:
                self._sync_failed(exc)
            else:
                job = self._in_sync_thread(_datasync_and_close, fd)
                try:
                    await asyncio.wrap_future(job)
                except Exception as exc:  # OSError, but nothing may leave sync() waiting
                    self._sync_failed(exc)
                except asyncio.CancelledError:
                    # Cancelled by close() or by the end of the loop: close() (or the next
                    # write) syncs what this round did not confirm.
                    if job.cancelled():  # it never ran, so its descriptor is ours to close
                        os.close(fd)
                    raise
            # Once the file is stale, only a rewrite (the next write, or close()) can persist what
            # is pending: another fdatasync would be no use to a waiter.
            self._mark_synced(self._written if self._stale else target)
            next_round = began + _SYNC_INTERVAL
            lazy_until = loop.time() + _LAZY_SYNC_INTERVAL

    async def _install_compaction(self, target: int) -> None:
        """One round of the flusher that finishes the pending compaction: the sync thread syncs
        the temp file, renames it over the journal and syncs the directory; then the temp file's
        descriptor becomes the append descriptor. The temp file holds every line written before
        ``target`` (the snapshot, then each append), so its sync covers them all."""
        compaction = self._compaction
        assert compaction is not None
        if compaction.failed:
            self._settle_compaction()  # dropped; the next write past the threshold tries again
            return
        try:
            fd = os.dup(compaction.fd)
        except OSError as exc:
            compaction.failed = True
            self._settle_compaction()
            self._compaction_failed(exc)
            return
        temp = self._path.with_name(_TEMP_FILE)
        self._install = job = self._in_sync_thread(_install_compaction, fd, temp, self._path)
        try:
            dir_problem = await asyncio.wrap_future(job)
        except Exception as exc:  # OSError; whatever it is, the old file is still the journal
            self._settle_compaction()
            self._compaction_failed(exc)
            return
        except asyncio.CancelledError:
            # close() (or the next write without a loop) settles it once the thread is done.
            if job.cancelled():
                os.close(fd)
            raise
        if dir_problem:
            self._dir_sync_failed(dir_problem)
        self._settle_compaction()
        if self._stale:
            self._rewrite()  # a write failed while the thread worked: repair the file from memory
        else:
            self._mark_synced(target)

    def _in_sync_thread(self, work: Callable[..., _T], *args: object) -> Future[_T]:
        """Run ``work(*args)`` in the journal's sync thread (started on first use)."""
        if self._sync_thread is None:
            self._sync_thread = ThreadPoolExecutor(1, thread_name_prefix="journal-sync")
        return self._sync_thread.submit(work, *args)

    def _dir_sync_failed(self, error: str) -> None:
        # The new file is in place; only its survival of a power cut is uncertain.
        self._log.warning(
            "Cannot fsync the state dir after rewriting the runner journal",
            dir=str(self._path.parent),
            error=error,
        )

    def _installing(self) -> bool:
        """Whether the sync thread is working on the pending compaction right now."""
        return self._install is not None and not self._install.done()

    def _begin_compaction(self) -> None:
        """Write the compacted journal to the temp file (into the page cache: no sync on the
        loop) and go on appending to both files until the flusher installs it."""
        try:
            fd = self._write_temp()
        except OSError as exc:
            self._compaction_failed(exc)
            return
        self._compaction = _Compaction(fd, len(self._live) + len(self._sessions))

    def _append_to_compaction(self, compaction: _Compaction, line: bytes) -> None:
        if compaction.failed:
            return
        try:
            written = os.write(compaction.fd, line)
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
        except OSError as exc:
            compaction.failed = True  # the flusher drops it; the old file is still complete
            self._compaction_failed(exc)
        else:
            compaction.lines += 1

    def _compaction_failed(self, exc: Exception) -> None:
        self._log.error(
            "Cannot rewrite the runner journal; appending to it as it is",
            file=str(self._path),
            error=str(exc),
        )

    def _settle_compaction(self) -> bool:
        """End the pending compaction, if any, once the sync thread is not working on it: when
        its rename happened, its file is the journal now and its descriptor becomes the append
        descriptor (returns True); otherwise the temp file is removed. A compaction whose file
        missed a line (``failed``) that was renamed all the same leaves the journal stale."""
        compaction, self._compaction = self._compaction, None
        self._install = None
        if compaction is None:
            return False
        try:
            mine = os.fstat(compaction.fd)
            current = os.stat(self._path)
            renamed = (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino)
        except OSError:
            renamed = False
        if not renamed:
            with contextlib.suppress(OSError):
                os.close(compaction.fd)
            with contextlib.suppress(OSError):
                os.unlink(self._path.with_name(_TEMP_FILE))
            return False
        old, self._fd = self._fd, compaction.fd
        self._records = compaction.lines
        if compaction.failed:
            self._stale = True
        with contextlib.suppress(OSError):
            os.close(old)
        return True

    def _sync_failed(self, exc: Exception) -> None:
        # After a failed fdatasync the kernel may drop the dirty pages and report success to the
        # next one (see fsync(2), "Errors"): only a rewrite from memory is sure to persist them.
        self._stale = True
        self._log.error(
            "Cannot sync the runner journal; rewriting it on the next write",
            file=str(self._path),
            error=str(exc),
        )

    def _mark_synced(self, count: int) -> None:
        """``count`` lines are on disk (or their sync failed, which was logged): wake the
        waiters of :meth:`sync` that wait for no more."""
        self._synced = max(self._synced, count)
        waiters = self._sync_waiters
        while waiters and (self._closed or waiters[0][0] <= self._synced):
            _, waiter = waiters.popleft()
            # A waiter whose loop is gone (the journal outlived an asyncio.run) has nobody left.
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(None)

    def _stop_flusher(self) -> None:
        flusher, self._flusher = self._flusher, None
        if flusher is None or flusher.done():
            return
        loop = flusher.get_loop()
        if loop.is_closed():
            return
        if loop.is_running() and loop is not _running_loop():
            loop.call_soon_threadsafe(flusher.cancel)
        else:
            flusher.cancel()

    def _rewrite(self) -> None:
        if self._installing():
            # The thread is renaming a compacted file over the journal: the flusher rewrites
            # from memory once it is done (the journal is stale meanwhile).
            self._stale = True
            return
        self._settle_compaction()
        try:
            self._compact()
        except OSError as exc:
            self._stale = True
            self._log.error(
                "Cannot rewrite the runner journal; entries are kept in memory and written later",
                file=str(self._path),
                error=str(exc),
            )

    def _compact(self) -> None:
        """Atomically replace the file with one put per live entry and one session record per
        open session.

        A crash at any point leaves either the old file or the new one under the journal's name
        (the rename is atomic), plus at worst the temp file, which the next compaction removes.
        The descriptor of the temp file becomes the journal's append descriptor: the rename
        moves the inode, not the open file.
        """
        temp = self._path.with_name(_TEMP_FILE)
        fd = self._write_temp()
        try:
            if self._durable:
                os.fsync(fd)
            os.replace(temp, self._path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        old, self._fd = self._fd, fd
        self._records = len(self._live) + len(self._sessions)
        self._stale = False
        if self._durable:
            self._mark_synced(self._written)  # the new file holds every line, fsynced
        if old >= 0:
            with contextlib.suppress(OSError):  # the new file is in place whatever this says
                os.close(old)
        if self._durable:
            try:
                _fsync_dir(self._path.parent)
            except OSError as exc:
                self._dir_sync_failed(str(exc))

    def _write_temp(self) -> int:
        """Write one put per live entry and one record per open session to a new temp file
        (removing a stale one first) and return its append descriptor, not synced."""
        temp = self._path.with_name(_TEMP_FILE)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(temp, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            _write_all(
                fd,
                b"".join(self._lines.values())
                + b"".join(_session_line(k, v) for k, v in self._sessions.items()),
            )
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return fd


def _lock(directory: Path, where: str) -> int:
    """Take the state directory's lock (held until the descriptor closes or the process dies)
    and write our pid into the lock file; return the descriptor."""
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise JournalError(f"{where} cannot be used: cannot open {path}: {_reason(exc)}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JournalError(
                f"state dir {directory} is in use by another outrunner process "
                f"(pid {_read_pid(fd)})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except JournalError:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        raise JournalError(f"{where} cannot be used: cannot lock {path}: {exc.strerror}") from exc
    return fd


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    # Empty while the holder is between taking the lock and writing its pid.
    return text if text.isdigit() else "unknown"
