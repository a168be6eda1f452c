"""The fake tart CLI itself: argument validation like the real one, state, faults, records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.faketart import FakeTart


@pytest.fixture
def fake(tmp_path: Path) -> FakeTart:
    fake = FakeTart.install(tmp_path / "tart")
    fake.create_vm("base")
    return fake


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def start_vm(fake: FakeTart) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Starts ``tart run`` in the background; whatever is still running is stopped after."""
    started: list[subprocess.Popen[str]] = []

    def start(name: str, *flags: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [str(fake.executable), "run", *flags, name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=fake.env(),
        )
        started.append(process)
        wait_until(lambda: fake.is_running(name) or process.poll() is not None)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def usage_error(result: subprocess.CompletedProcess[str], message: str, verb: str) -> None:
    assert result.returncode == 64, result
    lines = result.stderr.splitlines()
    assert lines[0] == f"Error: {message}"
    assert lines[1].startswith(f"Usage: tart {verb}")
    assert lines[2] == f"  See 'tart {verb} --help' for more information."


# --------------------------------------------------------------------------------------------
# Argument validation

EXCLUSIVE = "--graphics and --no-graphics are mutually exclusive"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["set", "base", "--bogus"], "Unknown option '--bogus'"),
        (["set", "base", "--cpu", "four"], "The value 'four' is invalid for '--cpu <cpu>'"),
        (["set", "base", "--cpu", "-1"], "Missing value for '--cpu <cpu>'"),
        (["set", "base", "--memory"], "Missing value for '--memory <memory>'"),
        (["set"], "Missing expected argument '<name>'"),
        (["set", "base", "extra"], "Unexpected argument 'extra'"),
        (["clone", "base"], "Missing expected argument '<new-name>'"),
        (["clone", "base", "org/vm"], "<new-name> should be a local name"),
        (["run", "--no-graphics=yes", "base"], "Unknown option '--no-graphics=yes'"),
        (["run", "--graphics", "--no-graphics", "base"], EXCLUSIVE),
        (["exec", "base"], "Missing expected argument '<command> ...'"),
        (["exec", "-x", "base", "true"], "Unknown option '-x'"),
        (["exec", "--interactive", "base", "true"], "Unknown option '--interactive'"),
        (["stop", "base", "-t", "soon"], "The value 'soon' is invalid for '-t <timeout>'"),
        (["delete"], "Missing expected argument '<name>'"),
        (["list", "--source", "remote"], "'remote' is not a valid <source>"),
        (["list", "--format", "yaml"], "The value 'yaml' is invalid for '--format <format>'"),
    ],
)  # fmt: skip
def test_usage_errors_are_reported_like_argument_parser(
    fake: FakeTart, argv: list[str], message: str
) -> None:
    usage_error(fake.call(*argv), message, argv[0])


def test_unknown_verb_and_help_and_version(fake: FakeTart) -> None:
    unknown = fake.call("frobnicate")
    assert unknown.returncode == 64
    assert unknown.stderr.startswith("Error: Unexpected argument 'frobnicate'")
    assert fake.call("set", "--help").returncode == 0
    assert fake.call("set", "--help").stdout.startswith("USAGE: tart set <name>")
    assert fake.call("--version").stdout.strip().endswith("-fake")


def test_option_forms(fake: FakeTart) -> None:
    assert fake.call("set", "base", "--cpu=3", "--memory", "1024").returncode == 0
    config = fake.config("base")
    assert (config["cpuCount"], config["memorySize"]) == (3, 1024 * 1024 * 1024)
    assert fake.call("list", "-q").stdout == "base\n"


# --------------------------------------------------------------------------------------------
# clone and set


def test_clone_of_local_and_missing_images(fake: FakeTart) -> None:
    assert fake.call("clone", "base", "vm1").returncode == 0
    assert fake.vms() == ["base", "vm1"]
    # A clone gets a fresh MAC address when its source's is taken (tart does the same).
    assert fake.config("vm1")["macAddress"] != fake.config("base")["macAddress"]
    missing = fake.call("clone", "nope", "vm2")
    assert (missing.returncode, missing.stderr) == (2, 'the specified VM "nope" does not exist\n')


def test_clone_of_an_oci_reference_pulls_it_into_the_cache(fake: FakeTart) -> None:
    image = "ghcr.io/cirruslabs/macos-sequoia-base:latest"
    assert fake.call("clone", image, "mac").returncode == 0
    assert fake.cached_images() == [image]
    assert fake.config("mac")["os"] == "darwin"
    assert fake.call("list", "--source", "oci", "--quiet").stdout == f"{image}\n"
    assert fake.call("clone", "ghcr.io/cirruslabs/ubuntu", "linux").returncode == 0
    assert "ghcr.io/cirruslabs/ubuntu:latest" in fake.cached_images()


def test_clone_onto_an_existing_vm(
    fake: FakeTart, start_vm: Callable[..., subprocess.Popen[str]]
) -> None:
    fake.create_vm("vm1", cpus=7)
    assert fake.call("clone", "base", "vm1").returncode == 0, "a stopped VM is replaced"
    assert fake.config("vm1")["cpuCount"] == 2
    start_vm("vm1")
    running = fake.call("clone", "base", "vm1")
    assert (running.returncode, running.stderr) == (1, 'VM "vm1" is running\n')


def test_set_checks_minimums_and_works_on_a_running_vm(
    fake: FakeTart, start_vm: Callable[..., subprocess.Popen[str]]
) -> None:
    fake.create_vm("mac", os_name="darwin", cpus=4, memory=8192)
    small = fake.call("set", "mac", "--cpu", "2")
    assert (small.returncode, small.stderr) == (
        1,
        "Error: VM should have 4 CPU cores at minimum (requested 2)\n",
    )
    assert fake.call("set", "base", "--memory", "64").returncode == 1
    start_vm("base")
    assert fake.call("set", "base", "--cpu", "3").returncode == 0
    assert fake.config("base")["cpuCount"] == 3
    assert fake.call("set", "nope", "--cpu", "3").returncode == 2


# --------------------------------------------------------------------------------------------
# run, exec, stop, delete


def test_run_blocks_until_stopped_and_records_its_shares(
    fake: FakeTart, tmp_path: Path, start_vm: Callable[..., subprocess.Popen[str]]
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run = start_vm(
        "base",
        "--no-graphics",
        f"--dir=a:{tmp_path / 'a'}",
        "--dir",
        f"b:{tmp_path / 'b'}:ro,tag=build",
    )
    assert fake.run_info("base")["dirs"] == [
        {"name": "a", "path": str(tmp_path / "a"), "read_only": False, "tag": AUTOMOUNT},
        {"name": "b", "path": str(tmp_path / "b"), "read_only": True, "tag": "build"},
    ]
    assert run.poll() is None
    again = fake.call("run", "base")
    assert (again.returncode, again.stderr) == (2, 'VM "base" is already running!\n')
    assert fake.call("stop", "base").returncode == 0
    assert run.wait(5) == 0
    assert run.communicate()[0] == "Stopping VM...\n"
    assert not fake.is_running("base")
    stopped = fake.call("stop", "base")
    assert (stopped.returncode, stopped.stderr) == (2, 'VM "base" is not running\n')


AUTOMOUNT = "com.apple.virtio-fs.automount"


def test_run_share_validation(fake: FakeTart, tmp_path: Path) -> None:
    unnamed = fake.call("run", f"--dir={tmp_path}", f"--dir={tmp_path}", "base")
    assert unnamed.returncode == 64
    assert "each one of them should be named" in unnamed.stderr
    missing = fake.call("run", f"--dir=x:{tmp_path / 'missing'}", "base")
    assert missing.returncode == 1
    assert "is not a directory" in missing.stderr


def test_run_dies_of_sigterm_and_ends_when_its_vm_folder_goes(
    fake: FakeTart, start_vm: Callable[..., subprocess.Popen[str]]
) -> None:
    run = start_vm("base")
    run.send_signal(signal.SIGTERM)
    assert run.wait(5) == -signal.SIGTERM
    assert not fake.is_running("base")
    fake.create_vm("doomed")
    run = start_vm("doomed")
    for path in (fake.home / "vms" / "doomed").iterdir():
        if path.is_file():
            path.unlink()
    assert run.wait(5) == 1


def test_exec_needs_a_running_booted_vm_then_runs_on_the_host(
    fake: FakeTart, start_vm: Callable[..., subprocess.Popen[str]]
) -> None:
    stopped = fake.call("exec", "base", "true")
    assert (stopped.returncode, stopped.stderr) == (2, 'VM "base" is not running\n')
    fake.set_boot_delay(0.5)
    start_vm("base")
    booting = fake.call("exec", "base", "true")
    assert booting.returncode == 1
    assert "is the Tart Guest Agent running?" in booting.stderr
    time.sleep(0.5)
    result = fake.call(
        "exec", "-it", "base", "sh", "-c", 'pwd; read x || echo "no stdin"; echo oops >&2; exit 7'
    )
    assert result.returncode == 7
    assert result.stdout.splitlines() == [str(fake.home / "vms" / "base"), "no stdin"]
    assert result.stderr == "oops\n"


READ_ALL = '[ -p /dev/stdin ] && echo pipe; while read -r line; do echo "got $line"; done; echo end'
"""Says whether its stdin is a pipe, then echoes its lines until the end."""


def test_exec_forwards_stdin_only_with_i(
    fake: FakeTart, start_vm: Callable[..., subprocess.Popen[str]]
) -> None:
    start_vm("base")
    # -i: the command reads the caller's stdin through a pipe, as the guest agent gives it, and
    # sees its end.
    interactive = fake.call("exec", "-i", "base", "sh", "-c", READ_ALL, input="one\ntwo\n")
    assert (interactive.returncode, interactive.stdout) == (0, "pipe\ngot one\ngot two\nend\n")
    # A file on the caller's side, as outrunner gives the runner's tart exec: the same.
    source = fake.home / "stdin.txt"
    source.write_text("from a file\n")
    with source.open("rb") as stdin:
        from_file = subprocess.run(
            [str(fake.executable), "exec", "-i", "base", "sh", "-c", READ_ALL],
            stdin=stdin,
            capture_output=True,
            text=True,
            env=fake.env(),
            check=False,
            timeout=30,
        )
    assert (from_file.returncode, from_file.stdout) == (0, "pipe\ngot from a file\nend\n")
    # Without -i the command's stdin is /dev/null, whatever the caller's.
    plain = fake.call("exec", "base", "sh", "-c", READ_ALL, input="ignored\n")
    assert (plain.returncode, plain.stdout) == (0, "end\n")


def test_guest_processes_die_with_the_vm(
    fake: FakeTart, start_vm: Callable[..., subprocess.Popen[str]]
) -> None:
    start_vm("base")
    job = subprocess.Popen(
        [str(fake.executable), "exec", "base", "sh", "-c", "echo $$ > pid; exec sleep 60"],
        env=fake.env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    pid_file = fake.home / "vms" / "base" / "pid"
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
    guest = int(pid_file.read_text())
    assert fake.call("stop", "base").returncode == 0
    assert job.wait(5) == 1
    assert "the VM has stopped" in job.communicate()[1]
    with pytest.raises(ProcessLookupError):
        os.kill(guest, 0)


def test_delete(fake: FakeTart, start_vm: Callable[..., subprocess.Popen[str]]) -> None:
    fake.create_vm("a")
    fake.create_vm("b")
    start_vm("a")
    running = fake.call("delete", "a")
    assert (running.returncode, running.stderr) == (1, 'VM "a" is running\n')
    assert fake.call("stop", "--timeout", "5", "a").returncode == 0
    missing = fake.call("delete", "a", "b", "nope")
    assert (missing.returncode, missing.stderr) == (2, 'the specified VM "nope" does not exist\n')
    assert fake.vms() == ["base"]


def test_list_formats(fake: FakeTart, start_vm: Callable[..., subprocess.Popen[str]]) -> None:
    fake.create_vm("other")
    start_vm("other")
    rows = json.loads(fake.call("list", "--format", "json").stdout)
    assert [(r["Source"], r["Name"], r["Running"], r["State"]) for r in rows] == [
        ("local", "base", False, "stopped"),
        ("local", "other", True, "running"),
    ]
    text = fake.call("list").stdout.splitlines()
    assert text[0].split() == ["Source", "Name", "Disk", "Size", "Accessed", "State"]
    assert text[2].split()[1::4] == ["other", "running"]
    assert fake.call("list", "--source", "local", "--quiet").stdout == "base\nother\n"


# --------------------------------------------------------------------------------------------
# Faults and records


def test_faults_from_the_environment_the_control_file_and_the_image(fake: FakeTart) -> None:
    failing = subprocess.run(
        [str(fake.executable), "clone", "base", "x"],
        env=fake.env(FAKE_TART_FAIL_CLONE="no space left on device"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert (failing.returncode, failing.stderr) == (1, "no space left on device\n")
    fake.set_fault("set", "config is locked")
    assert fake.call("set", "base", "--cpu", "2").stderr == "config is locked\n"
    fake.set_fault("set", None)
    assert fake.call("set", "base", "--cpu", "2").returncode == 0
    fake.set_delay("list", 0.4)
    began = time.monotonic()
    fake.call("list")
    assert time.monotonic() - began >= 0.4
    # An image's faults are inherited by its clones.
    fake.create_vm("broken", fail={"run": "VZErrorDomain Code=2"})
    assert fake.call("clone", "broken", "copy").returncode == 0
    run = fake.call("run", "copy")
    assert (run.returncode, run.stderr) == (1, "VZErrorDomain Code=2\n")


def test_a_vm_that_never_boots(
    fake: FakeTart, start_vm: Callable[..., subprocess.Popen[str]]
) -> None:
    fake.create_vm("mute", boot_delay="never")
    start_vm("mute")
    assert fake.call("exec", "mute", "true").returncode == 1


def test_every_invocation_is_recorded(
    fake: FakeTart, start_vm: Callable[..., subprocess.Popen[str]]
) -> None:
    fake.call("clone", "base", "vm1")
    fake.call("set", "vm1", "--bogus")
    run = start_vm("vm1")
    run.send_signal(signal.SIGTERM)
    run.wait(5)
    calls = fake.invocations()
    assert [(c.argv, c.status) for c in calls] == [
        (("clone", "base", "vm1"), 0),
        (("set", "vm1", "--bogus"), 64),
        (("run", "vm1"), -signal.SIGTERM),
    ]
    assert calls[2].pid == run.pid
    assert all(c.ended is not None and c.ended >= c.started for c in calls)


def test_shim_and_module_entry_points(fake: FakeTart, tmp_path: Path) -> None:
    # The shim remembers its state directory: a PATH entry alone selects this fake.
    env = {k: v for k, v in fake.env().items() if k != "FAKE_TART_HOME"}
    listed = subprocess.run(
        ["tart", "list", "-q"], env=env, capture_output=True, text=True, check=True
    )
    assert listed.stdout == "base\n"
    module = subprocess.run(
        [sys.executable, "-m", "tests.support.faketart", "list", "-q"],
        env=fake.env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert module.stdout == "base\n"
