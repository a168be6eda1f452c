"""The runner journal: round trips, damaged files, compaction, crashes, the lock, the state dir.

Everything works on real files under ``tmp_path``; crashes are real (``SIGKILL`` of a child
process, or a child that dies at a chosen point with ``os._exit``).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import outrunner.journal as journal_module
from outrunner.journal import (
    JOURNAL_FILE,
    LOCK_FILE,
    Journal,
    JournalEntry,
    JournalError,
    JournalPhase,
    StateDir,
    resolve_state_dir,
)
from outrunner.runner import RunnerPhase
from outrunner.scaleset.types import JitRunnerConfig, JitRunnerSetting
from outrunner.testing.memory import InMemoryProvisioner
from tests.test_scaler import FakeClient, eventually, make_scaler, phases
from tests.test_scaler_reliability import FakeJournal

REPO = Path(__file__).resolve().parent.parent
ENVELOPE = {"v", "op"}
ENTRY_KEYS = {"scale_set", "name", "runner_id", "backend", "phase", "updated_at"}


def entry(name: str, scale_set: str = "linux", **fields: object) -> JournalEntry:
    return JournalEntry(scale_set=scale_set, name=name, **fields)  # type: ignore[arg-type]


def lines_of(journal_dir: Path) -> list[bytes]:
    return (journal_dir / JOURNAL_FILE).read_bytes().splitlines(keepends=True)


def write_journal(journal_dir: Path, entries: list[JournalEntry]) -> bytes:
    """Write ``entries`` through a real journal and return the file's bytes."""
    with Journal.open(journal_dir, durable=False) as journal:
        for e in entries:
            journal.record(e)
    return (journal_dir / JOURNAL_FILE).read_bytes()


THREE = [
    entry("linux-00000001", runner_id=1, backend="docker", phase=JournalPhase.IDLE, updated_at=1.0),
    entry(
        "linux-00000002", runner_id=2, backend="docker", phase=JournalPhase.RUNNING, updated_at=2.5
    ),
    entry("linux-00000003", runner_id=3, backend="docker", updated_at=1774879509.123456),
]


# ---------------------------------------------------------------------------------------------
# Round trips


def test_entries_survive_a_reopen_in_first_recorded_order(tmp_path: Path) -> None:
    recorded = [
        entry("linux-0a", runner_id=11, backend="docker", phase=JournalPhase.PROVISIONING),
        entry("mac-0b", scale_set="mac", runner_id=12, backend="tart", phase=JournalPhase.RUNNING),
        entry("linux-0c", backend="libvirt"),  # runner id still unknown
        entry("linux-0d", runner_id=2**40, phase=JournalPhase.DEREGISTERING, updated_at=7.5),
    ]
    with Journal.open(tmp_path) as journal:
        for e in recorded:
            journal.record(e)
        written = journal.entries()
    assert [e.updated_at > 0 for e in written] == [True] * 4
    assert written[3].updated_at == 7.5  # a time given by the caller is kept

    with Journal.open(tmp_path) as journal:
        assert journal.problems == ()
        assert journal.entries() == written
        assert [e.name for e in journal.entries("linux")] == ["linux-0a", "linux-0c", "linux-0d"]
        assert journal.entries("mac") == [written[1]]
        assert journal.entries("windows") == []
        assert journal.get("linux-0c") == written[2]
        assert journal.get("nope") is None
        assert journal.path == tmp_path / JOURNAL_FILE
    # The file holds only the documented fields: names, ids, phases, never a JIT config.
    for line in lines_of(tmp_path):
        assert set(json.loads(line)) == ENVELOPE | ENTRY_KEYS


def test_record_replaces_in_place_and_forget_is_idempotent(tmp_path: Path) -> None:
    with Journal.open(tmp_path, durable=False) as journal:
        for e in THREE:
            journal.record(e)
        journal.record(entry("linux-00000001", runner_id=1, phase=JournalPhase.STOPPING))
        journal.forget("linux-00000002")
        size = journal.path.stat().st_size
        journal.forget("linux-00000002")
        journal.forget("never-recorded")
        assert journal.path.stat().st_size == size  # nothing to forget, nothing written
        journal.record(entry("linux-00000002", runner_id=22))  # comes back at the end

    with Journal.open(tmp_path, durable=False) as journal:
        names = [(e.name, e.runner_id, e.phase) for e in journal.entries()]
    assert names == [
        ("linux-00000001", 1, JournalPhase.STOPPING),
        ("linux-00000003", 3, JournalPhase.REGISTERING),
        ("linux-00000002", 22, JournalPhase.REGISTERING),
    ]


def test_entries_are_checked_when_built() -> None:
    assert entry("a", phase="idle").phase is JournalPhase.IDLE
    assert str(JournalPhase.DEREGISTERING) == "deregistering"
    with pytest.raises(ValueError, match="name must not be empty"):
        entry("")
    with pytest.raises(ValueError, match="runner_id must be >= 0"):
        entry("a", runner_id=-1)
    with pytest.raises(TypeError, match="runner_id must be an integer"):
        entry("a", runner_id=True)
    with pytest.raises(ValueError, match="draining"):
        entry("a", phase="draining")


def test_close_is_idempotent_and_a_closed_journal_refuses_writes(tmp_path: Path) -> None:
    with Journal.open(tmp_path, durable=False) as journal:
        journal.record(THREE[0])
    journal.close()
    assert journal.entries() == [THREE[0]]  # reading what was loaded stays possible
    with pytest.raises(ValueError, match="is closed"):
        journal.record(THREE[1])
    with pytest.raises(ValueError, match="is closed"):
        journal.forget(THREE[0].name)
    Journal.open(tmp_path).close()  # the context manager released the lock


# ---------------------------------------------------------------------------------------------
# Damaged files: loaded as far as possible, every problem reported, never raised


@pytest.mark.parametrize(
    ("name", "runner_id", "updated_at"),
    [
        ("linux-0a1b2c3d", 7, 1764500000.123456),
        ('we"ird\\na\u00efve\u2028\x01', 0, 0.0),
        ("x", 2**63 - 1, 1e22),
        ("\U0001f600", 1, 5e-324),
    ],
)
def test_put_and_forget_lines_are_what_the_json_encoder_writes(
    name: str, runner_id: int, updated_at: float
) -> None:
    for phase in JournalPhase:
        entry = JournalEntry(
            scale_set="sc\u00e9ne",
            name=name,
            runner_id=runner_id,
            backend="docker",
            phase=phase,
            updated_at=updated_at,
        )
        record = {
            "v": journal_module.FORMAT_VERSION,
            "op": "put",
            "scale_set": entry.scale_set,
            "name": entry.name,
            "runner_id": entry.runner_id,
            "backend": entry.backend,
            "phase": entry.phase.value,
            "updated_at": entry.updated_at,
        }
        line = journal_module._put_line(entry)
        assert line == journal_module._line(record)
        assert json.loads(line) == record
    forget = {"v": journal_module.FORMAT_VERSION, "op": "forget", "name": name}
    assert journal_module._forget_line(name) == journal_module._line(forget)


def test_a_record_cut_mid_line_is_reported_as_torn_and_appends_continue_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_journal(tmp_path, THREE)
    cut = data.rindex(b'"phase"')  # inside the third line
    (tmp_path / JOURNAL_FILE).write_bytes(data[:cut])
    caplog.set_level(logging.WARNING, logger="outrunner.journal")

    with Journal.open(tmp_path, durable=False) as journal:
        assert [e.name for e in journal.entries()] == ["linux-00000001", "linux-00000002"]
        assert len(journal.problems) == 1
        assert journal.problems[0].startswith(f"{tmp_path / JOURNAL_FILE}:3: torn last record")
        journal.record(THREE[2])
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.attrs["line"] == 3  # type: ignore[attr-defined]

    # The torn tail was cut on open: the new record is a line of its own.
    with Journal.open(tmp_path, durable=False) as journal:
        assert journal.problems == ()
        assert journal.entries() == THREE


def test_a_last_line_without_its_newline_is_torn_even_if_it_parses(tmp_path: Path) -> None:
    data = write_journal(tmp_path, THREE)
    (tmp_path / JOURNAL_FILE).write_bytes(data[:-1])
    with Journal.open(tmp_path, durable=False) as journal:
        assert journal.entries() == THREE[:2]
        (problem,) = journal.problems
    assert problem.startswith(f"{tmp_path / JOURNAL_FILE}:3: torn last record ignored")
    assert "without a newline" in problem


def test_a_corrupt_middle_line_is_skipped_and_reported(tmp_path: Path) -> None:
    lines = write_journal(tmp_path, THREE).splitlines(keepends=True)
    lines[1] = lines[1][:20] + b"\x00\xff garbage" + lines[1][20:]
    (tmp_path / JOURNAL_FILE).write_bytes(b"".join(lines))
    with Journal.open(tmp_path, durable=False) as journal:
        assert journal.entries() == [THREE[0], THREE[2]]
        (problem,) = journal.problems
    assert problem.startswith(f"{tmp_path / JOURNAL_FILE}:2: not a JSON record")
    assert "torn" not in problem


def test_unknown_versions_ops_and_fields_are_reported_not_fatal(tmp_path: Path) -> None:
    good = json.loads(write_journal(tmp_path, THREE[:1]))
    records = [
        good,
        {**good, "name": "newer-fields", "host": "h1", "slot": 3},  # applied, extras ignored
        {**good, "v": 2, "name": "v2"},
        {"v": 1, "op": "rename", "name": "x"},
        {**good, "name": "bad-id", "runner_id": "12"},
        {**good, "name": "bad-phase", "phase": "draining"},
        {"v": 1, "op": "forget"},
        [1, 2],
        {"v": 1, "op": "put", "name": "no-scale-set"},
    ]
    text = "".join(json.dumps(r) + "\n" for r in records) + "\n"  # and an empty last line
    (tmp_path / JOURNAL_FILE).write_text(text)
    with Journal.open(tmp_path, durable=False) as journal:
        assert [e.name for e in journal.entries()] == [THREE[0].name, "newer-fields"]
        problems = journal.problems
    where = f"{tmp_path / JOURNAL_FILE}:"
    expected = [
        (2, "ignored unknown fields 'host', 'slot'"),
        (3, "unsupported version 2"),
        (4, "unknown op 'rename'"),
        (5, "invalid put record (runner_id must be an integer"),
        (6, "invalid put record ('draining' is not a valid JournalPhase)"),
        (7, "invalid forget record"),
        (8, "not a JSON object but list"),
        (9, "invalid put record ("),
        (10, "torn last record ignored (not a JSON record"),
    ]
    assert len(problems) == len(expected)
    for problem, (line, what) in zip(problems, expected, strict=True):
        assert problem.startswith(f"{where}{line}: {what}"), problem


def test_garbage_binary_and_empty_files_load_without_raising(tmp_path: Path) -> None:
    journal_file = tmp_path / JOURNAL_FILE
    journal_file.write_bytes(b"")
    with Journal.open(tmp_path, durable=False) as journal:
        assert (journal.entries(), journal.problems) == ([], ())

    journal_file.write_bytes(random.Random(1).randbytes(100_000))
    with Journal.open(tmp_path, durable=False) as journal:
        assert journal.entries() == []
        assert 0 < len(journal.problems) <= 101  # capped, with a count of the rest
    assert journal_file.read_bytes() == b""  # compacted to what is live: nothing

    # What a machine crash can leave on ext4: valid records, then a run of zero bytes.
    journal_file.write_bytes(write_journal(tmp_path, THREE) + b"\x00" * 4096)
    with Journal.open(tmp_path, durable=False) as journal:
        assert journal.entries() == THREE
        (problem,) = journal.problems
    assert problem.startswith(f"{journal_file}:4: torn last record")


def test_seeded_fuzz_of_truncations_and_bit_flips_never_raises(tmp_path: Path) -> None:
    rng = random.Random(20260330)
    with Journal.open(tmp_path, durable=False) as journal:
        for i in range(40):
            journal.record(entry(f"linux-{i % 9:08x}", runner_id=i, backend="docker"))
            if i % 4 == 3:
                journal.forget(f"linux-{(i * 5) % 9:08x}")
    valid = (tmp_path / JOURNAL_FILE).read_bytes()
    damaged = 0
    for _ in range(300):
        data = bytearray(valid)
        kind = rng.choice(["truncate", "flip", "both", "splice"])
        if kind in ("flip", "both"):
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        if kind in ("truncate", "both"):
            del data[rng.randrange(len(data)) :]
        if kind == "splice":
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 40))
        (tmp_path / JOURNAL_FILE).write_bytes(bytes(data))
        with Journal.open(tmp_path, durable=False) as journal:
            assert all(isinstance(e, JournalEntry) and e.name for e in journal.entries())
            assert all(p.startswith(str(journal.path)) for p in journal.problems)
            damaged += bool(journal.problems)
    assert damaged > 150  # the mutations did damage the file, most of the time


def test_a_journal_path_that_is_not_a_file_is_unusable(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_FILE).mkdir()
    with pytest.raises(JournalError, match=f"{tmp_path / JOURNAL_FILE} is not a regular file"):
        Journal.open(tmp_path)


# ---------------------------------------------------------------------------------------------
# Compaction and failed writes


def test_compaction_keeps_only_live_entries_and_happens_at_the_threshold(tmp_path: Path) -> None:
    with Journal.open(tmp_path, durable=False) as journal:
        for i in range(64):  # max(64, 4 x 1 live) records: not yet
            journal.record(entry("linux-a", runner_id=i + 1))
        assert len(lines_of(tmp_path)) == 64
        journal.record(entry("linux-a", runner_id=100))
        assert lines_of(tmp_path) == [(tmp_path / JOURNAL_FILE).read_bytes()]
        assert json.loads(lines_of(tmp_path)[0])["runner_id"] == 100

        for i in range(30):  # with 30 live entries the threshold is 120 records
            journal.record(entry(f"many-{i}"))
        journal.forget("linux-a")
        for i in range(120 - 32):
            journal.record(entry(f"many-{i % 30}", runner_id=i + 1))
        assert len(lines_of(tmp_path)) == 120
        journal.record(entry("many-0", runner_id=999))
        assert len(lines_of(tmp_path)) == 30
        live = journal.entries()

    # The rewritten file is the live state, and it is still appended to afterwards.
    with Journal.open(tmp_path, durable=False) as journal:
        assert journal.entries() == live
        assert journal.get("linux-a") is None


def test_open_compacts_replaced_and_forgotten_records(tmp_path: Path) -> None:
    with Journal.open(tmp_path, durable=False) as journal:
        for e in THREE:
            journal.record(e)
            journal.record(e)
        journal.forget(THREE[1].name)
    assert len(lines_of(tmp_path)) == 7
    Journal.open(tmp_path, durable=False).close()
    assert [json.loads(line)["name"] for line in lines_of(tmp_path)] == [
        THREE[0].name,
        THREE[2].name,
    ]


def test_failed_writes_are_logged_and_repaired_by_a_later_rewrite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    temp = tmp_path / (JOURNAL_FILE + ".tmp")
    with Journal.open(tmp_path, durable=True) as journal:
        journal.record(THREE[0])
        before = journal.path.read_bytes()
        # Appends now fail with ENOSPC, and so does the rewrite (its temp path is taken).
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, journal._fd)
        os.close(full)
        temp.mkdir()
        journal.record(THREE[1])  # logged, not raised
        journal.record(THREE[2])
        assert journal.entries() == THREE  # kept in memory
        assert journal.path.read_bytes() == before  # the file is still the last good one
        temp.rmdir()
    # close() rewrote the file from memory.
    assert "Cannot append to the runner journal" in caplog.text
    assert "Cannot rewrite the runner journal" in caplog.text
    with Journal.open(tmp_path, durable=False) as journal:
        assert (journal.entries(), journal.problems) == (THREE, ())

    with Journal.open(tmp_path, durable=False) as journal:
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, journal._fd)
        os.close(full)
        journal.forget(THREE[0].name)  # the append fails; the rewrite right after succeeds
        assert [json.loads(line)["name"] for line in lines_of(tmp_path)] == [
            THREE[1].name,
            THREE[2].name,
        ]


CRASH_BEFORE_RENAME = """
import os, sys
from outrunner.journal import Journal, JournalEntry
journal = Journal.open(sys.argv[1], durable=True)
for i in range(64):
    journal.record(JournalEntry(scale_set="linux", name=f"linux-{i % 4}", runner_id=i + 1))
os.replace = lambda *args: os._exit(9)  # die after the temp file is written, before the rename
journal.record(JournalEntry(scale_set="linux", name="linux-9", runner_id=99))  # compacts
"""


def crash_a_child(journal_dir: Path, script: str, *args: str) -> Path:
    """Run ``script`` on ``journal_dir`` in a child process that dies with ``os._exit(9)``;
    return the path of the compaction's temp file."""
    child = subprocess.run(
        [sys.executable, "-c", script, str(journal_dir), *args], cwd=REPO, check=False
    )
    assert child.returncode == 9
    return journal_dir / (JOURNAL_FILE + ".tmp")


def recovered(journal_dir: Path) -> list[tuple[str, int]]:
    """What the next open finds: (name, runner id) of each live entry; the file must be clean."""
    with Journal.open(journal_dir, durable=False) as journal:
        assert journal.problems == ()
        return [(e.name, e.runner_id) for e in journal.entries()]


def test_a_crash_between_temp_write_and_rename_leaves_a_readable_journal(tmp_path: Path) -> None:
    temp = crash_a_child(tmp_path, CRASH_BEFORE_RENAME)
    assert temp.exists()
    assert len(lines_of(tmp_path)) == 65
    assert recovered(tmp_path) == [
        ("linux-0", 61),
        ("linux-1", 62),
        ("linux-2", 63),
        ("linux-3", 64),
        ("linux-9", 99),
    ]
    assert not temp.exists()
    assert len(lines_of(tmp_path)) == 5


def scripted_ops(seed: int = 7) -> Iterator[tuple[str, JournalEntry]]:
    """An endless deterministic mix of records and forgets over a few names (so compactions are
    frequent); the n-th op's entry carries ``updated_at=n + 1`` to make every state distinct."""
    rng = random.Random(seed)
    phases = list(JournalPhase)
    for n in range(10**9):
        name = f"linux-{rng.randrange(8):08x}"
        op = "forget" if rng.random() < 0.3 else "record"
        yield (
            op,
            JournalEntry(
                scale_set="linux",
                name=name,
                runner_id=n,
                backend="docker",
                phase=rng.choice(phases),
                updated_at=n + 1,
            ),
        )


RECORD_FOREVER = """
import sys
from outrunner.journal import Journal
from tests.test_journal import scripted_ops
journal = Journal.open(sys.argv[1], durable=False)
for n, (op, e) in enumerate(scripted_ops()):
    journal.record(e) if op == "record" else journal.forget(e.name)
    if n == 2000:
        print("recording", flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03])
def test_sigkill_in_a_loop_of_records_leaves_a_journal_that_loads(
    tmp_path: Path, delay: float
) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", RECORD_FOREVER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"recording\n"
            time.sleep(delay)
        finally:
            child.kill()
    assert child.returncode == -signal.SIGKILL

    with Journal.open(tmp_path, durable=False) as journal:
        loaded = journal.entries()
        assert all("torn last record" in p for p in journal.problems), journal.problems
    # Every record is whole: what loads is exactly the state after some prefix of the script.
    state: dict[str, JournalEntry] = {}
    for n, (op, e) in enumerate(scripted_ops()):
        if n > 2000 and list(state.values()) == loaded:
            break
        if op == "record":
            state[e.name] = e
        else:
            state.pop(e.name, None)
        assert n < 5_000_000, "the loaded journal matches no prefix of what was recorded"


# ---------------------------------------------------------------------------------------------
# The lock


LOCK_AND_WAIT = """
import sys
from outrunner.journal import Journal
journal = Journal.open(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


def test_the_state_dir_is_locked_until_its_holder_dies(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", LOCK_AND_WAIT, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == b"locked\n"
            message = (
                f"state dir {tmp_path} is in use by another outrunner process (pid {holder.pid})"
            )
            with pytest.raises(JournalError) as raised:
                Journal.open(tmp_path)
            assert str(raised.value) == message
        finally:
            holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
    assert holder.returncode == -signal.SIGKILL
    with Journal.open(tmp_path) as journal:
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert journal.problems == ()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # close leaves no stale pid behind


def test_a_second_open_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with Journal.open(tmp_path), pytest.raises(JournalError, match=f"pid {os.getpid()}"):
        Journal.open(tmp_path)


# ---------------------------------------------------------------------------------------------
# Modes


def test_state_dir_is_created_0700_and_files_0600(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    old_umask = os.umask(0)  # the modes must not depend on the umask
    try:
        with Journal.open(state) as journal:
            journal.record(THREE[0])
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / JOURNAL_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((state / LOCK_FILE).stat().st_mode) == 0o600


# ---------------------------------------------------------------------------------------------
# Where the state dir is


BOTH = {"OUTRUNNER_STATE_DIR": "/env", "STATE_DIRECTORY": "/sd"}


@pytest.mark.parametrize(
    ("flag", "config", "environ", "path", "source"),
    [
        ("/flag", "/config", BOTH, "/flag", "--state-dir"),
        (None, "/config", BOTH, "/config", "config state_dir"),
        ("", "", BOTH, "/env", "OUTRUNNER_STATE_DIR"),
        (None, "", {**BOTH, "OUTRUNNER_STATE_DIR": ""}, "/sd", "STATE_DIRECTORY"),
        (None, "", {"STATE_DIRECTORY": "/sd/one:/sd/two"}, "/sd/one", "STATE_DIRECTORY"),
    ],
)
def test_state_dir_precedence(
    flag: str | None, config: str, environ: dict[str, str], path: str, source: str
) -> None:
    unused = Path("/nonexistent/outrunner-default")
    resolved = resolve_state_dir(flag, config, environ, default=unused)
    assert resolved == StateDir(Path(path), source)
    assert not unused.exists()  # an explicit dir is never probed


def test_default_state_dir_is_used_and_created_when_writable(tmp_path: Path) -> None:
    default = tmp_path / "var" / "lib" / "outrunner"
    assert resolve_state_dir(None, "", {}, default=default) == StateDir(default, "default")
    assert stat.S_IMODE(default.stat().st_mode) == 0o700
    relative = resolve_state_dir("state", "", {}, default=default)
    assert relative.path == Path.cwd() / "state"


@pytest.mark.parametrize("below_a_file", [False, True])
def test_an_unusable_default_falls_back_to_the_user_state_dir(
    tmp_path: Path, below_a_file: bool
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # mkdir fails even for root
    default = blocker / "outrunner" if below_a_file else blocker
    xdg = tmp_path / "xdg"
    resolved = resolve_state_dir(None, "", {"XDG_STATE_HOME": str(xdg)}, default=default)
    assert (resolved.path, resolved.source) == (xdg / "outrunner", "user fallback")
    assert resolved.warning is not None
    assert str(default) in resolved.warning
    assert str(xdg / "outrunner") in resolved.warning

    home = resolve_state_dir(
        None, "", {"HOME": "/home/ci", "XDG_STATE_HOME": "rel"}, default=blocker
    )
    assert home.path == Path("/home/ci/.local/state/outrunner")
    with Journal.open(resolved) as journal:  # the fallback is created on open
        assert journal.path == xdg / "outrunner" / JOURNAL_FILE


@pytest.mark.parametrize(
    ("flag", "config", "variable", "source"),
    [
        (True, False, None, "--state-dir"),
        (False, True, None, "config state_dir"),
        (False, False, "OUTRUNNER_STATE_DIR", "OUTRUNNER_STATE_DIR"),
        (False, False, "STATE_DIRECTORY", "STATE_DIRECTORY"),
    ],
)
def test_an_unusable_explicit_state_dir_is_an_error_naming_its_setting(
    tmp_path: Path, flag: bool, config: bool, variable: str | None, source: str
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = str(blocker / "state")
    environ = {variable: bad} if variable else {}
    resolved = resolve_state_dir(bad if flag else None, bad if config else "", environ)
    assert (resolved.path, resolved.source, resolved.warning) == (Path(bad), source, None)
    with pytest.raises(JournalError) as raised:
        Journal.open(resolved)
    assert str(raised.value).startswith(f"state dir {bad} (from {source}) cannot be used: ")


# ---------------------------------------------------------------------------------------------
# Message sessions (deleted by the next start after a crash)


def test_sessions_survive_a_reopen_and_compaction_and_clear_with_an_empty_id(
    tmp_path: Path,
) -> None:
    with Journal.open(tmp_path, durable=False) as journal:
        journal.record(THREE[0])
        journal.record_session("linux", "session-a")
        journal.record_session("arm", "session-b")
        journal.record_session("linux", "session-c")  # a replacement session
        journal.record_session("linux", "session-c")  # unchanged: nothing written
        assert len(lines_of(tmp_path)) == 4
    with Journal.open(tmp_path, durable=False) as journal:  # open compacts
        assert journal.sessions() == {"linux": "session-c", "arm": "session-b"}
        assert journal.entries() == [THREE[0]]
        assert journal.problems == ()
        assert len(lines_of(tmp_path)) == 3
        journal.record_session("arm", "")
    with Journal.open(tmp_path, durable=False) as journal:
        assert journal.sessions() == {"linux": "session-c"}


def test_an_invalid_session_record_is_reported_and_skipped(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_FILE).write_bytes(
        b'{"v":1,"op":"session","scale_set":"","session_id":"x"}\n'
        b'{"v":1,"op":"session","scale_set":"linux","session_id":7}\n'
        b'{"v":1,"op":"session","scale_set":"linux","session_id":"ok"}\n'
    )
    with Journal.open(tmp_path, durable=False) as journal:
        assert journal.sessions() == {"linux": "ok"}
        assert len(journal.problems) == 2
        assert all("invalid session record" in p for p in journal.problems)


def test_resolving_without_create_leaves_a_missing_default_alone(tmp_path: Path) -> None:
    """``outrunner --check`` reports where the journal would live without creating anything."""
    default = tmp_path / "var" / "lib" / "outrunner"
    where = resolve_state_dir(None, "", {}, default=default, create=False)
    assert (where.path, where.source, where.warning) == (default, "default", None)
    assert not (tmp_path / "var").exists()


# ---------------------------------------------------------------------------------------------
# Group commit: on an event loop, fdatasync runs in the journal's thread, shared by many records


class Syncs:
    """Stands in for the journal's ``_datasync`` (see the ``syncs`` fixture): notes the thread
    of each call and the size of the file a successful one covered, then calls the real one.
    ``failing`` makes it raise EIO; ``release``, when set, holds each call until it is set."""

    def __init__(self, real: Callable[[int], None]) -> None:
        self.real = real
        self.threads: list[int] = []
        self.sizes: list[int] = []
        self.errors: list[OSError] = []
        self.failing = False
        self.entered = threading.Event()
        self.release: threading.Event | None = None

    def __call__(self, fd: int) -> None:
        self.threads.append(threading.get_ident())
        self.entered.set()
        if self.release is not None:
            self.release.wait(5.0)
        if self.failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        try:
            size = os.fstat(fd).st_size  # taken before the sync, so the sync covers it
            self.real(fd)
        except OSError as exc:  # EBADF would mean a descriptor closed under the sync
            self.errors.append(exc)
            raise
        self.sizes.append(size)


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Syncs:
    wrapper = Syncs(journal_module._datasync)
    monkeypatch.setattr(journal_module, "_datasync", wrapper)
    return wrapper


def sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("journal-sync")]


def returns_at_once(journal: Journal) -> bool:
    """Whether ``journal.sync()`` completes without suspending even once."""
    coroutine = journal.sync()
    try:
        coroutine.send(None)
    except StopIteration:
        return True
    coroutine.close()
    return False


@pytest.mark.anyio
async def test_records_made_on_a_loop_are_on_disk_after_sync(tmp_path: Path, syncs: Syncs) -> None:
    with Journal.open(tmp_path) as journal:
        for e in THREE:
            journal.record(e)
        journal.forget(THREE[1].name)
        journal.record_session("linux", "session-1")
        assert syncs.threads == []  # nothing synced inline
        await journal.sync()
        # The last sync began after the last line was written: it covered the whole file.
        assert syncs.sizes[-1] == journal.path.stat().st_size
        assert [json.loads(line)["op"] for line in lines_of(tmp_path)] == [
            *["put"] * 3,
            "forget",
            "session",
        ]
    with Journal.open(tmp_path, durable=False) as journal:
        assert journal.entries() == [THREE[0], THREE[2]]
        assert journal.sessions() == {"linux": "session-1"}


@pytest.mark.anyio
async def test_a_thousand_records_in_one_loop_iteration_share_a_few_syncs_off_the_loop(
    tmp_path: Path, syncs: Syncs
) -> None:
    with Journal.open(tmp_path) as journal:
        for n in range(1000):  # no await: one loop iteration, as a burst of runner tasks
            journal.record(entry(f"linux-{n:08x}", runner_id=n + 1))
        await journal.sync()
        assert 1 <= len(syncs.threads) <= 3
        assert threading.get_ident() not in syncs.threads
        assert syncs.sizes[-1] == journal.path.stat().st_size
        assert len(lines_of(tmp_path)) == 1000


@pytest.mark.anyio
async def test_sync_with_nothing_pending_returns_at_once(tmp_path: Path, syncs: Syncs) -> None:
    with Journal.open(tmp_path) as journal:
        assert returns_at_once(journal)  # nothing written yet
        journal.record(THREE[0])
        assert not returns_at_once(journal)
        await journal.sync()
        assert returns_at_once(journal)  # nothing written since
        assert len(syncs.threads) == 1
    with Journal.open(tmp_path / "volatile", durable=False) as journal:
        journal.record(THREE[0])
        assert returns_at_once(journal)  # never synced at all
    assert len(syncs.threads) == 1


@pytest.mark.anyio
async def test_a_failing_sync_is_logged_ends_the_wait_and_a_later_write_syncs_again(
    tmp_path: Path, syncs: Syncs, caplog: pytest.LogCaptureFixture
) -> None:
    with Journal.open(tmp_path) as journal:
        syncs.failing = True
        journal.record(THREE[0])
        await journal.sync()  # returns: a failing disk must not block a runner start
        failures = [
            r for r in caplog.records if r.getMessage().startswith("Cannot sync the runner journal")
        ]
        assert len(failures) == 1
        assert failures[0].levelno == logging.ERROR

        syncs.failing = False
        journal.record(THREE[1])  # rewrites the file (fsynced: the dirty pages may be lost)
        assert returns_at_once(journal)
        journal.record(THREE[2])  # and appends, synced off the loop, from then on
        await journal.sync()
        assert syncs.sizes == [journal.path.stat().st_size]
    with Journal.open(tmp_path, durable=False) as journal:
        assert (journal.entries(), journal.problems) == (THREE, ())


def slow_syncs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    message = "Runner journal sync is taking too long; going on without it"
    return [r for r in caplog.records if r.getMessage() == message]


@pytest.mark.anyio
async def test_a_sync_that_hangs_is_logged_and_stops_holding_up_the_caller(
    tmp_path: Path, syncs: Syncs, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A disk that hangs (an NFS server gone) must not stop every runner start for good.
    monkeypatch.setattr(journal_module, "SYNC_WAIT_LIMIT", 0.2)
    syncs.release = threading.Event()  # each fdatasync hangs until set
    try:
        with Journal.open(tmp_path) as journal:
            journal.record(THREE[0])
            await asyncio.wait_for(journal.sync(), 5)
            assert syncs.entered.is_set()
            assert [r.levelno for r in slow_syncs(caplog)] == [logging.ERROR]

            syncs.release.set()  # the disk is back: the next wait is an ordinary one
            journal.record(THREE[1])
            await asyncio.wait_for(journal.sync(), 5)
            assert len(slow_syncs(caplog)) == 1
    finally:
        syncs.release.set()
    with Journal.open(tmp_path, durable=False) as journal:
        assert (journal.entries(), journal.problems) == (THREE[:2], ())


@pytest.mark.anyio
async def test_close_on_a_loop_syncs_what_is_pending_inline_and_leaves_nothing_running(
    tmp_path: Path, syncs: Syncs, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal.open(tmp_path)
    journal.record(THREE[0])
    await journal.sync()  # the sync thread now exists
    assert len(sync_threads()) == 1
    journal.record(THREE[1])  # the flusher is scheduled, not yet run
    journal.close()
    assert syncs.threads[-1] == threading.get_ident()  # the last sync ran inline, in close()
    assert syncs.sizes[-1] == journal.path.stat().st_size
    assert sync_threads() == []
    await asyncio.sleep(0)  # the cancelled flusher finishes
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("journal-sync")]
    assert returns_at_once(journal)
    gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_close_after_the_loop_ended_syncs_what_is_pending(
    tmp_path: Path, syncs: Syncs, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal.open(tmp_path)

    async def burst() -> None:
        for e in THREE:
            journal.record(e)
        await asyncio.sleep(0)  # the flusher starts its sync and is cancelled by asyncio.run

    syncs.release = threading.Event()  # ...while its sync still runs in the thread
    asyncio.run(burst())
    syncs.release.set()
    journal.close()
    assert syncs.threads[-1] == threading.get_ident()
    assert syncs.sizes[-1] == journal.path.stat().st_size
    assert syncs.errors == []
    assert sync_threads() == []
    gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    with Journal.open(tmp_path, durable=False) as journal:
        assert journal.entries() == THREE


@pytest.mark.anyio
async def test_records_nobody_waits_for_are_synced_together_within_the_lazy_interval(
    tmp_path: Path, syncs: Syncs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "_LAZY_SYNC_INTERVAL", 0.3)
    with Journal.open(tmp_path) as journal:
        journal.record(THREE[0])
        await asyncio.sleep(0.1)
        journal.record(THREE[1])  # phase changes, say: no caller waits for their sync
        await asyncio.sleep(0.1)
        assert syncs.threads == []  # gathered, not synced one by one
        deadline = time.monotonic() + 5.0
        while not syncs.sizes and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert syncs.sizes == [journal.path.stat().st_size]  # one sync covered both
        assert returns_at_once(journal)
        monkeypatch.setattr(journal_module, "_LAZY_SYNC_INTERVAL", 60.0)
        journal.record(THREE[2])
        began = time.monotonic()
        await journal.sync()  # a waiter does not wait out the lazy interval
        assert time.monotonic() - began < 30.0
        assert len(syncs.sizes) == 2


def test_without_a_running_loop_records_sync_inline(tmp_path: Path, syncs: Syncs) -> None:
    with Journal.open(tmp_path) as journal:
        journal.record(THREE[0])
        journal.forget(THREE[0].name)
        assert syncs.threads == [threading.get_ident()] * 2
        assert syncs.sizes[-1] == journal.path.stat().st_size
    assert sync_threads() == []


@pytest.mark.anyio
async def test_a_compaction_while_a_sync_runs_keeps_the_file_right(
    tmp_path: Path, syncs: Syncs
) -> None:
    names = [f"linux-{n}" for n in range(4)]
    syncs.release = threading.Event()
    temp = tmp_path / (JOURNAL_FILE + ".tmp")
    with Journal.open(tmp_path) as journal:
        journal.record(entry(names[0], runner_id=1))
        first = asyncio.ensure_future(journal.sync())  # a waiter: the flusher's round starts now
        while not syncs.entered.is_set():  # the flusher's sync has begun, and is held
            await asyncio.sleep(0.001)
        # 64 more records start a compaction: its file is written now, and installed (synced,
        # renamed over the journal) by the flusher's next round, while the thread still syncs a
        # duplicate of the old descriptor.
        for n in range(2, 66):
            journal.record(entry(names[n % 4], runner_id=n))
        assert len(lines_of(tmp_path)) == 65  # the old file is still the journal, complete
        assert len(temp.read_bytes().splitlines()) == 4
        journal.record(entry(names[0], runner_id=99))  # appended to both files
        syncs.release.set()
        await journal.sync()
        await first
        assert not temp.exists()
        assert len(lines_of(tmp_path)) == 5  # the compacted file, and the append after it
        assert returns_at_once(journal)
        assert syncs.errors == []
        assert syncs.sizes[-1] == journal.path.stat().st_size
        expected = journal.entries()
    with Journal.open(tmp_path, durable=False) as journal:
        assert (journal.entries(), journal.problems) == (expected, ())
    assert [(e.name, e.runner_id) for e in expected] == [
        ("linux-0", 99),
        ("linux-2", 62),
        ("linux-3", 63),
        ("linux-1", 65),
    ]


class Calls:
    """Wraps a function and notes the thread of each call."""

    def __init__(self, real: Callable[..., object]) -> None:
        self.real = real
        self.threads: list[int] = []

    def __call__(self, *args: object) -> object:
        self.threads.append(threading.get_ident())
        return self.real(*args)


@pytest.mark.anyio
async def test_a_compaction_on_a_loop_syncs_and_renames_in_the_sync_thread(
    tmp_path: Path, syncs: Syncs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a thousand runners a compaction's file and directory fsyncs held the event loop (and
    # every runner on it) for the disk's latency: 105 ms in one benchmark run.
    fsync_dir = Calls(journal_module._fsync_dir)
    fsync = Calls(os.fsync)
    replace = Calls(os.replace)
    monkeypatch.setattr(journal_module, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    loop_thread = threading.get_ident()
    with Journal.open(tmp_path) as journal:
        opened = (len(fsync.threads), len(replace.threads), len(fsync_dir.threads))
        for round_ in range(5):  # five compactions, each with records during and after it
            for n in range(70):
                journal.record(entry(f"linux-{n % 5}", runner_id=round_ * 100 + n))
                if n == 66:
                    journal.forget("linux-4")
            await journal.sync()
            assert returns_at_once(journal)
        expected = journal.entries()
    calls = (
        fsync.threads[opened[0] :]
        + replace.threads[opened[1] :]
        + fsync_dir.threads[opened[2] :]
        + syncs.threads
    )
    assert len(replace.threads) - opened[1] >= 5  # every round compacted at least once
    assert loop_thread not in calls
    assert not (tmp_path / (JOURNAL_FILE + ".tmp")).exists()
    with Journal.open(tmp_path, durable=False) as journal:
        assert (journal.entries(), journal.problems) == (expected, ())
    assert [e.runner_id for e in expected] == [465, 466, 467, 468, 469]


@pytest.mark.anyio
async def test_close_while_the_thread_installs_a_compaction_keeps_every_record(
    tmp_path: Path, syncs: Syncs
) -> None:
    journal = Journal.open(tmp_path)
    for n in range(65):  # the 65th record starts a compaction
        journal.record(entry(f"linux-{n % 4}", runner_id=n + 1))
    syncs.release = threading.Event()
    waiter = asyncio.ensure_future(journal.sync())
    while not syncs.entered.is_set():  # the thread syncs the compacted file, held there
        await asyncio.sleep(0.001)
    journal.record(entry("linux-9", runner_id=99))  # written to both files meanwhile
    threading.Timer(0.2, syncs.release.set).start()
    journal.close()  # waits for the thread, then takes the renamed file as the journal
    await waiter
    assert syncs.errors == []
    assert not (tmp_path / (JOURNAL_FILE + ".tmp")).exists()
    assert len(lines_of(tmp_path)) == 5
    with Journal.open(tmp_path, durable=False) as reopened:
        assert [(e.name, e.runner_id) for e in reopened.entries()] == [
            ("linux-0", 65),
            ("linux-1", 62),
            ("linux-2", 63),
            ("linux-3", 64),
            ("linux-9", 99),
        ]


def test_a_compaction_left_pending_by_an_ended_loop_is_dropped(
    tmp_path: Path, syncs: Syncs
) -> None:
    journal = Journal.open(tmp_path)

    async def records() -> None:
        for n in range(65):  # starts a compaction; the flusher's lazy wait is cut by the end
            journal.record(entry(f"linux-{n % 4}", runner_id=n + 1))

    asyncio.run(records())
    temp = tmp_path / (JOURNAL_FILE + ".tmp")
    assert temp.exists()
    # No loop: the pending compaction goes, and this record, past the threshold, compacts inline.
    journal.record(entry("linux-9", runner_id=99))
    assert not temp.exists()
    assert len(lines_of(tmp_path)) == 5
    journal.close()
    with Journal.open(tmp_path, durable=False) as reopened:
        assert [e.runner_id for e in reopened.entries()] == [65, 62, 63, 64, 99]


@pytest.mark.anyio
async def test_a_compaction_whose_file_cannot_be_written_is_dropped_and_logged(
    tmp_path: Path, syncs: Syncs, caplog: pytest.LogCaptureFixture
) -> None:
    with Journal.open(tmp_path) as journal:
        for n in range(65):
            journal.record(entry(f"linux-{n % 4}", runner_id=n + 1))
        compaction = journal._compaction
        assert compaction is not None
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, compaction.fd)  # appends to the compacted file now fail with ENOSPC
        os.close(full)
        journal.record(entry("linux-9", runner_id=99))
        assert "Cannot rewrite the runner journal; appending to it as it is" in caplog.text
        await journal.sync()
        assert journal._compaction is None
        assert not (tmp_path / (JOURNAL_FILE + ".tmp")).exists()
        assert len(lines_of(tmp_path)) == 66  # the old file, every record in it
        assert syncs.sizes[-1] == journal.path.stat().st_size
        journal.record(entry("linux-9", runner_id=100))  # past the threshold: compacts again
        await journal.sync()
        assert len(lines_of(tmp_path)) == 5
    with Journal.open(tmp_path, durable=False) as reopened:
        assert [e.runner_id for e in reopened.entries()] == [65, 62, 63, 64, 100]


CRASH_IN_COMPACTION = """
import asyncio, os, sys
import outrunner.journal as journal_module
from outrunner.journal import Journal, JournalEntry

where = sys.argv[2]

async def main() -> None:
    journal = Journal.open(sys.argv[1], durable=True)
    if where == "after-rename":
        journal_module._fsync_dir = lambda path: os._exit(9)  # in the sync thread, after rename
    for i in range(65):  # the 65th record starts a compaction
        journal.record(JournalEntry(scale_set="linux", name=f"linux-{i % 4}", runner_id=i + 1))
    journal.record(JournalEntry(scale_set="linux", name="linux-9", runner_id=99))
    journal.forget("linux-0")
    if where == "pending":
        os._exit(9)  # before the flusher's round: the temp file is written, not renamed
    await journal.sync()

asyncio.run(main())
"""


@pytest.mark.parametrize("where", ["pending", "after-rename"])
def test_a_crash_during_a_compaction_on_a_loop_loses_no_record(tmp_path: Path, where: str) -> None:
    temp = crash_a_child(tmp_path, CRASH_IN_COMPACTION, where)
    assert temp.exists() == (where == "pending")
    assert len(lines_of(tmp_path)) == (67 if where == "pending" else 6)
    assert recovered(tmp_path) == [
        ("linux-1", 62),
        ("linux-2", 63),
        ("linux-3", 64),
        ("linux-9", 99),
    ]
    assert not temp.exists()


# ---------------------------------------------------------------------------------------------
# The Scaler waits for the journal's sync before its JIT request


class SyncCheckingClient(FakeClient):
    """Notes, at each JIT request, whether the runner's registering record is already synced."""

    def __init__(self, journal: Journal, syncs: Syncs) -> None:
        super().__init__()
        self.journal, self.syncs = journal, syncs
        self.synced_first: list[bool] = []

    async def generate_jit_runner_config(
        self, setting: JitRunnerSetting, scale_set_id: int
    ) -> JitRunnerConfig:
        data = self.journal.path.read_bytes()
        end = data.index(b"\n", data.index(f'"name":"{setting.name}"'.encode())) + 1
        self.synced_first.append(bool(self.syncs.sizes) and self.syncs.sizes[-1] >= end)
        return await super().generate_jit_runner_config(setting, scale_set_id)


@pytest.mark.anyio
async def test_the_scaler_syncs_a_registration_before_its_jit_request(
    tmp_path: Path, syncs: Syncs
) -> None:
    with Journal.open(tmp_path) as journal:
        client, prov = SyncCheckingClient(journal, syncs), InMemoryProvisioner()
        s = make_scaler(client, prov, journal=journal)
        assert await s.handle_desired_runner_count(3) == 3
        await eventually(lambda: phases(s) == [RunnerPhase.IDLE] * 3)
        assert client.synced_first == [True] * 3
        await s.shutdown()


class UnsyncableJournal(FakeJournal):
    async def sync(self) -> None:
        raise OSError(errno.EIO, "the disk is gone")


@pytest.mark.anyio
async def test_a_journal_whose_sync_fails_does_not_hold_up_a_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, prov = FakeClient(), InMemoryProvisioner()
    s = make_scaler(client, prov, journal=UnsyncableJournal())
    assert await s.handle_desired_runner_count(1) == 1
    await eventually(lambda: phases(s) == [RunnerPhase.IDLE])
    assert len(client.jit_names) == 1
    failures = [r for r in caplog.records if r.getMessage() == "Cannot sync the runner journal"]
    assert len(failures) == 1
    assert failures[0].levelno == logging.ERROR
    await s.shutdown()
