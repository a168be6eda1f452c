"""TartProvisioner against the fake tart CLI (tests.support.faketart): exact arguments,
lifecycle, failures and their logs, cancellation, orphan cleanup, secrecy of the JIT config."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from outrunner.config import RunnerConfig, TartImage, TartMount
from outrunner.provisioner import RunnerRequest
from outrunner.provisioners.tart import (
    _JIT_WRAPPER,
    TAIL_BYTES,
    TartProvisioner,
    TartProvisionerError,
    _is_runner_exec,
    _private_dir,
)
from outrunner.testing.contract import runner_name
from tests.support.faketart import FakeTart, Invocation

pytestmark = pytest.mark.anyio

IDLE_RUNNER = (
    'printf "%s\\n" "$@" > args.txt\n'
    'printf "%s" "$ACTIONS_RUNNER_INPUT_JITCONFIG" > jit.txt\n'
    "exec sleep 600\n"
)
"""Records its arguments and the JIT config it was given in the VM folder (the fake's guest cwd),
then idles until killed."""


# --------------------------------------------------------------------------------------------
# Helpers, also used by test_tart_contract.py


def write_script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(0o755)
    return str(path)


IMAGES = ("base", "broken", "mute")


def install_fake(directory: Path) -> FakeTart:
    """A fake tart with images ``base`` (boots in 0.1 s), ``broken`` (``tart run`` fails) and
    ``mute`` (never boots)."""
    fake = FakeTart.install(directory)
    fake.create_vm("base", boot_delay=0.1)
    fake.create_vm("broken", fail={"run": "The number of VMs exceeds the system limit"})
    fake.create_vm("mute", boot_delay="never")
    return fake


def tart_runner(
    scale_set: str, fake: FakeTart, runner_cmd: str, *, image: str = "base", **options: Any
) -> RunnerConfig:
    tart = TartImage(image=image, runner_cmd=runner_cmd, tart_path=str(fake.executable), **options)
    return RunnerConfig(name=scale_set, labels=("macos",), tart=tart)


async def end_runner(fake: FakeTart, name: str) -> None:
    """End the runner command of VM ``name`` in the fake's "guest" (a process group of its
    own), as a runner ends after its job; its ``tart exec`` then exits. ``start`` returns once
    ``tart exec`` is spawned: the command may take a moment to appear."""
    await eventually(lambda: bool(guest_processes(fake, name)))
    for pid in guest_processes(fake, name):
        os.killpg(pid, signal.SIGTERM)


def guest_processes(fake: FakeTart, name: str) -> list[int]:
    """What the fake's ``tart exec`` runs in VM ``name`` (it records their PIDs)."""
    guest = fake.home / "vms" / name / "guest"
    return [int(entry.name) for entry in guest.iterdir()] if guest.is_dir() else []


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def all_ended(fake: FakeTart) -> bool:
    return all(i.ended is not None for i in fake.invocations())


def files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


def calls(fake: FakeTart, verb: str, name: str | None = None) -> list[Invocation]:
    return [i for i in fake.invocations() if i.verb == verb and (name is None or name in i.argv)]


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """Everything our records carry: messages and structured attributes."""
    return "\n".join(
        f"{r.getMessage()} {json.dumps(getattr(r, 'attrs', {}), default=str)}"
        for r in caplog.records
    )


def record(caplog: pytest.LogCaptureFixture, message: str) -> dict[str, Any]:
    found = [r for r in caplog.records if r.getMessage() == message]
    assert found, f"no {message!r} record in:\n{logged(caplog)}"
    attrs: dict[str, Any] = found[-1].attrs  # type: ignore[attr-defined]
    return attrs


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeTart]:
    fake = install_fake(tmp_path / "tart")
    try:
        yield fake
    finally:
        discard_vms(fake, "")  # close() leaves VMs running: end their fake processes


def discard_vms(fake: FakeTart, prefix: str) -> None:
    """Stop and delete the VMs named ``prefix...`` (all but the images for ``""``) by hand."""
    for name in fake.vms():
        if name.startswith(prefix) and name not in IMAGES:
            if fake.is_running(name):
                fake.call("stop", "--timeout", "1", name)
            fake.call("delete", name)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs"


@pytest.fixture
def idle(tmp_path: Path) -> str:
    return write_script(tmp_path / "idle.sh", IDLE_RUNNER)


@pytest.fixture
async def provisioner(fake: FakeTart, log_dir: Path) -> Any:
    provisioner = TartProvisioner(tart_path=str(fake.executable), log_dir=log_dir)
    try:
        yield provisioner
    finally:
        await provisioner.close()


@pytest.fixture
def scale_set() -> str:
    return f"tart{secrets.token_hex(3)}"


@pytest.fixture
def tart_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="outrunner")
    return caplog


def request(name: str, runner: RunnerConfig, jit: str | None = None) -> RunnerRequest:
    return RunnerRequest(name, jit or f"JIT-{secrets.token_hex(12)}", runner)


# --------------------------------------------------------------------------------------------
# Lifecycle and arguments


async def test_lifecycle_runs_exact_commands_and_leaves_nothing(
    provisioner: TartProvisioner,
    fake: FakeTart,
    *,
    tmp_path: Path,
    log_dir: Path,
    scale_set: str,
    idle: str,
) -> None:
    cache, tools = tmp_path / "cache", tmp_path / "tools"
    cache.mkdir()
    tools.mkdir()
    mounts = (
        TartMount(name="cache", source=str(cache)),
        TartMount(name="tools", source=str(tools), read_only=True),
    )
    runner = tart_runner(scale_set, fake, idle, cpus=3, memory=3072, mounts=mounts)
    name = runner_name(scale_set)
    req = request(name, runner)

    await provisioner.start(req)

    assert fake.is_running(name)
    config = fake.config(name)
    assert (config["cpuCount"], config["memorySize"]) == (3, 3072 * 1024 * 1024)
    assert fake.run_info(name)["dirs"] == [
        {"name": "cache", "path": str(cache), "read_only": False, "tag": AUTOMOUNT},
        {"name": "tools", "path": str(tools), "read_only": True, "tag": AUTOMOUNT},
    ]
    vm_dir = fake.home / "vms" / name
    await eventually(lambda: read(vm_dir / "jit.txt") != "")
    assert read(vm_dir / "jit.txt") == req.jit_config
    assert read(vm_dir / "args.txt") == "\n", "the runner has no arguments"
    assert not await provisioner.exited(name)

    await provisioner.stop(name)

    argvs = [list(i.argv) for i in fake.invocations()]
    probes = [a for a in argvs if a == ["exec", name, "echo", "ok"]]
    assert probes, argvs
    assert [a for a in argvs if a != ["exec", name, "echo", "ok"]] == [
        ["clone", "base", name],
        ["set", name, "--cpu", "3", "--memory", "3072"],
        ["run", "--no-graphics", f"--dir=cache:{cache}", f"--dir=tools:{tools}:ro", name],
        ["exec", "-i", name, "/bin/sh", "-c", _JIT_WRAPPER, idle],
        ["stop", "--timeout", "30", name],
        ["delete", name],
    ]
    assert name not in fake.vms()
    assert all_ended(fake)
    assert await provisioner.exited(name)
    assert files(log_dir) == [], "capture files of a clean run are removed"


AUTOMOUNT = "com.apple.virtio-fs.automount"


async def test_boot_probe_polls_until_the_guest_agent_answers(
    provisioner: TartProvisioner, fake: FakeTart, scale_set: str, idle: str
) -> None:
    fake.create_vm("slow", boot_delay=0.8)
    name = runner_name(scale_set)
    began = time.monotonic()
    await provisioner.start(request(name, tart_runner(scale_set, fake, idle, image="slow")))
    assert time.monotonic() - began >= 0.8
    probes = [i for i in calls(fake, "exec", name) if i.argv[2:] == ("echo", "ok")]
    assert len(probes) >= 2
    # Exit 2 ("not running") until `tart run` holds the VM, then 1 until the agent answers.
    assert all(p.status in {1, 2} for p in probes[:-1])
    assert probes[-1].status == 0
    await provisioner.stop(name)


async def test_oci_image_is_cloned_once_at_a_time_and_pulled_once(
    provisioner: TartProvisioner, fake: FakeTart, scale_set: str, idle: str
) -> None:
    runner = tart_runner(scale_set, fake, idle, image="ghcr.io/cirruslabs/ubuntu-runner-arm64:1")
    names = [runner_name(scale_set) for _ in range(3)]
    await asyncio.gather(*(provisioner.start(request(n, runner)) for n in names))
    clones = calls(fake, "clone")
    for earlier, later in itertools.pairwise(clones):
        assert earlier.ended is not None
        assert earlier.ended <= later.started
    assert fake.cached_images() == ["ghcr.io/cirruslabs/ubuntu-runner-arm64:1"]
    await asyncio.gather(*(provisioner.stop(n) for n in names))
    assert set(fake.vms()) == {"base", "broken", "mute"}


# --------------------------------------------------------------------------------------------
# Failures


async def test_boot_timeout_is_a_clear_error_and_deletes_the_clone(
    provisioner: TartProvisioner,
    fake: FakeTart,
    *,
    log_dir: Path,
    scale_set: str,
    idle: str,
    tart_logs: pytest.LogCaptureFixture,
) -> None:
    name = runner_name(scale_set)
    runner = tart_runner(scale_set, fake, idle, image="mute", boot_timeout=1.0)
    began = time.monotonic()
    with pytest.raises(TartProvisionerError) as caught:
        await provisioner.start(request(name, runner))
    assert 1.0 <= time.monotonic() - began < 5.0
    message = str(caught.value)
    assert f"VM {name} did not boot" in message
    assert "Tart Guest Agent" in message
    assert "image mute" in message
    assert name not in fake.vms()
    assert all_ended(fake)
    assert calls(fake, "delete", name)
    # The VM's output file is kept and named in the error and the log.
    attrs = record(tart_logs, "VM failed")
    kept = Path(attrs["log"])
    assert files(log_dir) == [kept]
    assert str(kept) in message
    assert "no answer from the guest agent within 1 s" in attrs["reason"]


async def test_failing_run_logs_its_stderr_tail_and_keeps_the_file(
    provisioner: TartProvisioner,
    fake: FakeTart,
    scale_set: str,
    idle: str,
    tart_logs: pytest.LogCaptureFixture,
) -> None:
    noise = "x" * 3000
    fake.create_vm("noisy", fail={"run": f"{noise}\nThe number of VMs exceeds the system limit"})
    name = runner_name(scale_set)
    runner = tart_runner(scale_set, fake, idle, image="noisy", boot_timeout=60)
    began = time.monotonic()
    with pytest.raises(TartProvisionerError, match="exceeds the system limit") as caught:
        await provisioner.start(request(name, runner))
    assert time.monotonic() - began < 10, "a dead `tart run` fails the start at once"
    assert "stopped while booting: tart run exited with status 1" in str(caught.value)
    attrs = record(tart_logs, "VM failed")
    assert attrs["reason"] == "tart run exited with status 1"
    assert attrs["output"].endswith("The number of VMs exceeds the system limit")
    assert len(attrs["output"].encode()) <= TAIL_BYTES
    kept = Path(attrs["log"])
    assert noise in read(kept), "the file has the whole output"
    assert name not in fake.vms()
    assert all_ended(fake)


async def test_failing_clone(
    provisioner: TartProvisioner, fake: FakeTart, scale_set: str, idle: str
) -> None:
    fake.set_fault("clone", "disk full")
    name = runner_name(scale_set)
    with pytest.raises(TartProvisionerError) as caught:
        await provisioner.start(request(name, tart_runner(scale_set, fake, idle)))
    assert str(caught.value) == (
        f"clone base to VM {name}: tart clone failed: exit status 1: disk full"
    )
    assert name not in fake.vms()
    assert [i.verb for i in fake.invocations()] == ["clone", "delete"]


async def test_failing_set_deletes_the_clone(
    provisioner: TartProvisioner, fake: FakeTart, scale_set: str, idle: str
) -> None:
    fake.create_vm("macos", os_name="darwin", cpus=4, memory=8192)
    name = runner_name(scale_set)
    runner = tart_runner(scale_set, fake, idle, image="macos", cpus=2)
    with pytest.raises(TartProvisionerError, match="VM should have 4 CPU cores at minimum"):
        await provisioner.start(request(name, runner))
    assert name not in fake.vms()
    assert [i.verb for i in fake.invocations()] == ["clone", "set", "delete"]


async def test_exec_that_always_fails_ends_in_a_boot_timeout(
    provisioner: TartProvisioner, fake: FakeTart, scale_set: str, idle: str
) -> None:
    fake.set_fault("exec", "Failed to connect to the VM using its control socket")
    name = runner_name(scale_set)
    # 3 s: a few failed probes (each a new process) even on a busy machine.
    runner = tart_runner(scale_set, fake, idle, boot_timeout=3.0)
    with pytest.raises(TartProvisionerError) as caught:
        await provisioner.start(request(name, runner))
    assert "last: exit status 1: Failed to connect to the VM" in str(caught.value)
    assert name not in fake.vms()
    assert all_ended(fake)


async def test_failing_runner_is_logged_and_its_output_kept(
    provisioner: TartProvisioner,
    fake: FakeTart,
    *,
    tmp_path: Path,
    log_dir: Path,
    scale_set: str,
    tart_logs: pytest.LogCaptureFixture,
) -> None:
    crash = write_script(tmp_path / "crash.sh", "echo 'runner: not configured' >&2\nexit 3\n")
    name = runner_name(scale_set)
    await provisioner.start(request(name, tart_runner(scale_set, fake, crash)))
    await eventually(lambda: any(r.getMessage() == "Runner failed" for r in tart_logs.records))
    assert await provisioner.exited(name)
    attrs = record(tart_logs, "Runner failed")
    assert attrs["reason"] == "tart exec exited with status 3"
    assert attrs["output"] == "runner: not configured"
    await provisioner.stop(name)
    assert files(log_dir) == [Path(attrs["log"])]
    assert read(Path(attrs["log"])) == "runner: not configured\n"
    assert name not in fake.vms()


async def test_missing_tart_executable(fake: FakeTart, scale_set: str, idle: str) -> None:
    runner = RunnerConfig(
        name=scale_set,
        labels=("macos",),
        tart=TartImage(image="base", runner_cmd=idle, tart_path="/nonexistent/tart"),
    )
    async with TartProvisioner(tart_path="/nonexistent/tart") as provisioner:
        with pytest.raises(TartProvisionerError, match=r"cannot run /nonexistent/tart.*Tart"):
            await provisioner.start(request(runner_name(scale_set), runner))


async def test_ambiguous_mount_source_fails_before_anything_is_made(
    provisioner: TartProvisioner, fake: FakeTart, tmp_path: Path, scale_set: str, idle: str
) -> None:
    source = tmp_path / "cache,ro"
    source.mkdir()
    mounts = (TartMount(name="cache", source=str(source)),)
    runner = tart_runner(scale_set, fake, idle, mounts=mounts)
    with pytest.raises(TartProvisionerError, match="share options"):
        await provisioner.start(request(runner_name(scale_set), runner))
    assert fake.invocations() == []


def test_default_log_dir_must_be_private(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(TartProvisionerError, match="writable only by"):
        _private_dir(shared)
    private = tmp_path / "private" / "logs"
    _private_dir(private)
    assert private.stat().st_mode & 0o777 == 0o700


# --------------------------------------------------------------------------------------------
# Stop, exited, close


async def test_stop_is_idempotent(
    provisioner: TartProvisioner, fake: FakeTart, scale_set: str, idle: str
) -> None:
    name = runner_name(scale_set)
    await provisioner.stop(name)  # never started
    await provisioner.start(request(name, tart_runner(scale_set, fake, idle)))
    await provisioner.stop(name)
    await provisioner.stop(name)
    assert name not in fake.vms()
    assert all_ended(fake)


async def test_vm_that_died_is_reported_exited_and_still_deleted(
    provisioner: TartProvisioner,
    fake: FakeTart,
    scale_set: str,
    idle: str,
    tart_logs: pytest.LogCaptureFixture,
) -> None:
    name = runner_name(scale_set)
    await provisioner.start(request(name, tart_runner(scale_set, fake, idle)))
    os.kill(fake.run_info(name)["pid"], signal.SIGKILL)  # the VM process crashes
    await eventually(lambda: any(r.getMessage() == "VM failed" for r in tart_logs.records))
    assert await provisioner.exited(name)
    assert record(tart_logs, "VM failed")["reason"] == "tart run exited with status -9"
    await provisioner.stop(name)
    assert name not in fake.vms()
    # Only the SIGKILLed `tart run` could not record its end.
    assert [i for i in fake.invocations() if i.ended is None] == calls(fake, "run", name)


async def test_close_leaves_the_vms_running_and_stop_still_works(
    fake: FakeTart, log_dir: Path, scale_set: str, idle: str
) -> None:
    provisioner = TartProvisioner(tart_path=str(fake.executable), log_dir=log_dir)
    names = sorted(runner_name(scale_set) for _ in range(2))
    runner = tart_runner(scale_set, fake, idle)
    await asyncio.gather(*(provisioner.start(request(n, runner)) for n in names))
    await provisioner.close()
    await asyncio.sleep(0.3)  # nothing is ended later either (say, by garbage collection)
    assert all(fake.is_running(n) for n in names)
    assert (
        sorted(i.verb for i in fake.invocations() if i.ended is None) == ["exec"] * 2 + ["run"] * 2
    )
    with pytest.raises(TartProvisionerError, match="closed"):
        await provisioner.start(request(runner_name(scale_set), runner))
    with pytest.raises(TartProvisionerError, match="closed"):
        await provisioner.wait_exited(names[0])
    for name in names:  # stopping is the Scaler's job, also after close
        await provisioner.stop(name)
    assert not set(names) & set(fake.vms())
    assert all_ended(fake)
    assert files(log_dir) == []


# --------------------------------------------------------------------------------------------
# Cancellation


async def cancel_when(
    start: Awaitable[None], ready: Callable[[], bool], timeout: float = 10.0
) -> None:
    task = asyncio.ensure_future(start)
    await eventually(ready, timeout)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancellation_during_boot_leaves_nothing(
    provisioner: TartProvisioner, fake: FakeTart, log_dir: Path, scale_set: str, idle: str
) -> None:
    fake.create_vm("sleepy", boot_delay=30)
    name = runner_name(scale_set)
    runner = tart_runner(scale_set, fake, idle, image="sleepy")
    await cancel_when(provisioner.start(request(name, runner)), lambda: fake.is_running(name))
    assert name not in fake.vms()
    assert all_ended(fake)
    assert files(log_dir) == [], "a cancellation is not a failure: no file kept"
    assert await provisioner.exited(name)


async def test_cancellation_during_clone_ends_the_clone_and_leaves_nothing(
    provisioner: TartProvisioner, fake: FakeTart, scale_set: str, idle: str
) -> None:
    fake.set_delay("clone", 5)
    name = runner_name(scale_set)
    runner = tart_runner(scale_set, fake, idle)
    began = time.monotonic()
    await cancel_when(provisioner.start(request(name, runner)), lambda: bool(calls(fake, "clone")))
    assert time.monotonic() - began < 4, "the clone was interrupted, not waited for"
    assert name not in fake.vms()
    assert all_ended(fake)
    assert calls(fake, "clone")[0].status == -signal.SIGINT


# --------------------------------------------------------------------------------------------
# Orphan cleanup


async def test_cleanup_stops_and_deletes_exactly_this_prefix(
    provisioner: TartProvisioner, fake: FakeTart, tmp_path: Path
) -> None:
    ours_running, ours_stopped = "linux-0a1b2c3d", "linux-deadbeef"
    others = ["linux-arm-0a1b2c3d", "linux-0a1b2c3", "linux-0a1b2c3dx", "linuxb-0a1b2c3d"]
    for name in [ours_running, ours_stopped, *others]:
        fake.create_vm(name)
    run = await asyncio.create_subprocess_exec(
        str(fake.executable), "run", "--no-graphics", ours_running
    )
    await eventually(lambda: fake.is_running(ours_running))

    removed = await provisioner.cleanup("linux-")

    assert removed == [ours_running, ours_stopped]
    assert await run.wait() == 0
    assert sorted(set(fake.vms()) - {"base", "broken", "mute"}) == sorted(others)
    assert [list(i.argv) for i in calls(fake, "list")] == [["list", "--source", "local", "--quiet"]]


async def test_cleanup_reports_what_it_could_not_delete(
    provisioner: TartProvisioner, fake: FakeTart, tart_logs: pytest.LogCaptureFixture
) -> None:
    fake.create_vm("linux-0a1b2c3d", fail={"delete": "permission denied"})
    fake.create_vm("linux-deadbeef")
    assert await provisioner.cleanup("linux-") == ["linux-deadbeef"]
    assert record(tart_logs, "Failed to remove orphan VM")["name"] == "linux-0a1b2c3d"


async def test_cleanup_fails_loudly_when_tart_cannot_list(
    provisioner: TartProvisioner, fake: FakeTart
) -> None:
    fake.set_fault("list", "TART_HOME is not writable")
    with pytest.raises(TartProvisionerError, match=r"list local VMs: .*TART_HOME"):
        await provisioner.cleanup("linux-")


# --------------------------------------------------------------------------------------------
# Secrecy


async def test_jit_config_never_reaches_the_log(
    provisioner: TartProvisioner,
    fake: FakeTart,
    *,
    tmp_path: Path,
    scale_set: str,
    idle: str,
    tart_logs: pytest.LogCaptureFixture,
) -> None:
    jit = f"SECRET-JIT-{secrets.token_hex(16)}"
    crash = write_script(tmp_path / "crash.sh", "echo boom >&2\nexit 1\n")
    messages = []
    # A clean lifecycle, a runner that fails, a boot timeout and a failing run.
    for image, cmd, timeout in (("base", idle, 5), ("base", crash, 5), ("mute", idle, 0.5)):
        name = runner_name(scale_set)
        runner = tart_runner(scale_set, fake, cmd, image=image, boot_timeout=timeout)
        try:
            await provisioner.start(request(name, runner, jit))
        except TartProvisionerError as exc:
            messages.append(str(exc))
        if cmd == crash:  # let it fail by itself, before the stop
            await asyncio.wait_for(provisioner.wait_exited(name), 10)
        await provisioner.stop(name)
    with pytest.raises(TartProvisionerError) as caught:
        await provisioner.start(
            request(runner_name(scale_set), tart_runner(scale_set, fake, idle, image="broken"), jit)
        )
    messages.append(str(caught.value))
    assert any(r.getMessage() == "Runner failed" for r in tart_logs.records)
    assert jit not in logged(tart_logs)
    assert not any(jit in m for m in messages)
    assert not any(jit in " ".join(i.argv) for i in fake.invocations())


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads Linux's /proc")
async def test_jit_config_is_in_no_command_line_and_reaches_the_runner(
    provisioner: TartProvisioner, fake: FakeTart, *, log_dir: Path, scale_set: str, idle: str
) -> None:
    jit = f"SECRET-JIT-{secrets.token_hex(16)}"
    name = runner_name(scale_set)
    await provisioner.start(request(name, tart_runner(scale_set, fake, idle), jit))
    vm_dir = fake.home / "vms" / name
    await eventually(lambda: read(vm_dir / "jit.txt") != "")
    assert read(vm_dir / "jit.txt") == jit, "the runner got it, in its environment"

    # While the runner runs, no process on this host has it in its arguments: not the live
    # `tart exec`, not the guest's wrapper (which exec'd the runner), not the runner.
    (runner_exec,) = [i for i in calls(fake, "exec", name) if i.ended is None]
    (guest,) = guest_processes(fake, name)
    cmdlines = command_lines()
    assert runner_exec.pid in cmdlines
    assert guest in cmdlines
    assert [pid for pid, cmdline in cmdlines.items() if jit.encode() in cmdline] == []
    assert jit.encode() in environment(guest)
    assert jit.encode() not in environment(runner_exec.pid)
    # tart exec reads it from a file without a name, which no capture file is.
    assert os.readlink(f"/proc/{runner_exec.pid}/fd/0").endswith(" (deleted)")
    assert [p.suffix for p in files(log_dir)] == [".log", ".log"]
    assert not any(jit in read(p) for p in files(log_dir))

    await provisioner.stop(name)
    assert not any(jit in " ".join(i.argv) for i in fake.invocations())


def environment(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def command_lines() -> dict[int, bytes]:
    """``/proc/<pid>/cmdline`` of every process we may read."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found[int(entry.name)] = (entry / "cmdline").read_bytes()
    return found


async def test_a_jit_config_of_several_lines_is_refused_before_anything_is_made(
    provisioner: TartProvisioner, fake: FakeTart, scale_set: str, idle: str
) -> None:
    runner = tart_runner(scale_set, fake, idle)
    with pytest.raises(TartProvisionerError, match="not a single line") as caught:
        await provisioner.start(request(runner_name(scale_set), runner, "SECRET\nLINES"))
    assert "SECRET" not in str(caught.value)
    assert fake.invocations() == []


ECHO_RUNNER = 'echo "jit=$ACTIONS_RUNNER_INPUT_JITCONFIG args=$#"\nread -r more\necho "read: $?"\n'
"""Shows the JIT config it got, how many arguments, and whether stdin has more."""


def test_wrapper_hands_one_line_of_stdin_to_the_runner_and_nothing_else(
    fake: FakeTart, tmp_path: Path
) -> None:
    echo = write_script(tmp_path / "echo.sh", ECHO_RUNNER)
    fake.create_vm("wrapped")
    vm = subprocess.Popen([str(fake.executable), "run", "wrapped"], env=fake.env())
    try:
        wait_for(lambda: fake.is_running("wrapped"))
        exec_ = ("exec", "-i", "wrapped", "/bin/sh", "-c", _JIT_WRAPPER, echo)
        given = fake.call(*exec_, input="SECRET\nmore\n")
        # The runner's stdin is /dev/null: the second line stays with the wrapper.
        assert (given.returncode, given.stdout) == (0, "jit=SECRET args=0\nread: 1\n")
        for missing in ("", "\n", "SECRET"):  # nothing, an empty line, a cut-off line
            failed = fake.call(*exec_, input=missing)
            assert (failed.returncode, failed.stdout) == (1, ""), missing
            assert failed.stderr == "outrunner: no JIT config on standard input\n"
    finally:
        fake.call("stop", "wrapped")
        assert vm.wait(5) == 0


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# Exits, survival and adoption


@pytest.mark.parametrize("what", ["runner", "vm"])
async def test_wait_exited_returns_when_the_runner_or_the_vm_ends(
    provisioner: TartProvisioner, fake: FakeTart, scale_set: str, idle: str, what: str
) -> None:
    name = runner_name(scale_set)
    await provisioner.start(request(name, tart_runner(scale_set, fake, idle)))
    waiting = asyncio.create_task(provisioner.wait_exited(name))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    if what == "runner":
        await end_runner(fake, name)  # the runner's job is done: its tart exec exits
    else:
        os.kill(fake.run_info(name)["pid"], signal.SIGKILL)  # the VM crashes
    await asyncio.wait_for(waiting, 5)
    assert await provisioner.exited(name)
    await asyncio.wait_for(provisioner.wait_exited(name), 1)  # ended: at once
    await provisioner.stop(name)
    assert name not in fake.vms()


async def test_wait_exited_of_unknown_names_and_when_closed_meanwhile(
    provisioner: TartProvisioner, fake: FakeTart, scale_set: str, idle: str
) -> None:
    await asyncio.wait_for(provisioner.wait_exited(runner_name(scale_set)), 1)
    name = runner_name(scale_set)
    await provisioner.start(request(name, tart_runner(scale_set, fake, idle)))
    waiting = asyncio.create_task(provisioner.wait_exited(name))
    await asyncio.sleep(0.1)
    await provisioner.close()
    with pytest.raises(TartProvisionerError, match="closed"):
        await asyncio.wait_for(waiting, 1)
    assert fake.is_running(name)


TICKING_RUNNER = (
    'echo "jit=$ACTIONS_RUNNER_INPUT_JITCONFIG"\nwhile :; do echo tick; sleep 0.05; done\n'
)
"""A runner that shows its JIT config, then writes to its output all the time: it would die of
SIGPIPE on a broken pipe."""

OUTRUNNER = """
import asyncio, sys
from outrunner.config import RunnerConfig, TartImage
from outrunner.provisioner import RunnerRequest
from outrunner.provisioners.tart import TartProvisioner

async def main(tart, log_dir, scale_set, name, runner_cmd, jit):
    image = TartImage(image="base", runner_cmd=runner_cmd, tart_path=tart)
    runner = RunnerConfig(name=scale_set, labels=("macos",), tart=image)
    provisioner = TartProvisioner(tart_path=tart, log_dir=log_dir)
    await provisioner.start(RunnerRequest(name, jit, runner))
    print("started", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(*sys.argv[1:]))
"""
"""An outrunner process that starts one runner, then lives until it is killed."""


async def test_a_vm_outlives_its_sigkilled_outrunner_and_is_adopted(
    fake: FakeTart, log_dir: Path, scale_set: str, tmp_path: Path
) -> None:
    ticking = write_script(tmp_path / "ticking.sh", TICKING_RUNNER)
    name = runner_name(scale_set)
    jit = f"JIT-{secrets.token_hex(8)}"
    outrunner = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        OUTRUNNER,
        *(str(fake.executable), str(log_dir), scale_set, name, ticking, jit),
        stdout=asyncio.subprocess.PIPE,
    )
    assert outrunner.stdout is not None
    assert await asyncio.wait_for(outrunner.stdout.readline(), 30) == b"started\n"
    outrunner.kill()
    await outrunner.wait()

    # Nothing died with it: the VM runs, and the runner, which got its JIT config (complete
    # before its tart exec started), keeps writing to its capture file.
    size = runner_output_size(log_dir, name)
    await asyncio.sleep(0.5)
    assert fake.is_running(name)
    assert runner_output_size(log_dir, name) > size
    assert read(runner_capture(log_dir, name)).startswith(f"jit={jit}\ntick\n")
    assert sorted(i.verb for i in fake.invocations() if i.ended is None) == ["exec", "run"]

    async with TartProvisioner(tart_path=str(fake.executable), log_dir=log_dir) as fresh:
        runner = tart_runner(scale_set, fake, ticking)
        assert await fresh.adopt(name, runner) is True
        assert await fresh.exited(name) is False
        waiting = asyncio.create_task(fresh.wait_exited(name))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await fresh.stop(name)
        await asyncio.wait_for(waiting, 10)
        assert await fresh.exited(name)
    assert name not in fake.vms()
    assert all_ended(fake)
    assert files(log_dir) == [], "the adopted runner's capture files are removed with it"


def runner_capture(log_dir: Path, name: str) -> Path:
    (capture,) = log_dir.glob(f"{name}-runner-*.log")
    return capture


def runner_output_size(log_dir: Path, name: str) -> int:
    return runner_capture(log_dir, name).stat().st_size


async def test_adopt_refuses_what_is_not_a_live_runner_of_the_scale_set(
    provisioner: TartProvisioner,
    fake: FakeTart,
    scale_set: str,
    idle: str,
    tart_logs: pytest.LogCaptureFixture,
) -> None:
    runner = tart_runner(scale_set, fake, idle)
    assert await provisioner.adopt(runner_name(scale_set), runner) is False  # no such VM
    # Running, but named as a runner of another scale set: refused and left alone.
    other = runner_name(f"{scale_set}-arm")
    fake.create_vm(other)
    running = await asyncio.create_subprocess_exec(str(fake.executable), "run", other)
    await eventually(lambda: fake.is_running(other))
    assert await provisioner.adopt(other, runner) is False
    assert "Not adopting a VM not named as a runner" in logged(tart_logs)
    assert fake.is_running(other)
    # A stopped VM, and a running one whose runner's tart exec is gone: refused; stop removes.
    stopped, idle_vm = runner_name(scale_set), runner_name(scale_set)
    for name in (stopped, idle_vm):
        fake.create_vm(name)
    booted = await asyncio.create_subprocess_exec(str(fake.executable), "run", idle_vm)
    await eventually(lambda: fake.is_running(idle_vm))
    assert await provisioner.adopt(stopped, runner) is False
    assert await provisioner.adopt(idle_vm, runner) is False
    assert await provisioner.exited(idle_vm)
    for name in (stopped, idle_vm):
        await provisioner.stop(name)
        assert name not in fake.vms()
    assert await booted.wait() == 0
    assert fake.call("stop", other).returncode == 0
    assert await running.wait() == 0


def test_runner_exec_is_recognised_by_its_command_line() -> None:
    name = "linux-0a1b2c3d"
    # Split at spaces, as `ps -o args=` shows it.
    ours = f"/opt/homebrew/bin/tart exec -i {name} /bin/sh -c {_JIT_WRAPPER} /a/run.sh".split()
    assert _is_runner_exec(ours, name)
    assert _is_runner_exec(["python3", "faketart.py", *ours[1:]], name)
    # Started by an earlier outrunner, with the JIT config as an argument: adopted after an upgrade.
    assert _is_runner_exec(["tart", "exec", name, "/a/run.sh", "--jitconfig", "x"], name)
    assert not _is_runner_exec(["tart", "exec", name, "echo", "ok"], name)  # a boot probe
    assert not _is_runner_exec(["tart", "exec", "-i", name, "/bin/sh", "-c", "echo", "hi"], name)
    other = f"tart exec -i linux-deadbeef /bin/sh -c {_JIT_WRAPPER} /a/run.sh".split()
    assert not _is_runner_exec(other, name)
    assert not _is_runner_exec(["tart", "exec", "linux-deadbeef", "r", "--jitconfig", "x"], name)
    assert not _is_runner_exec(["tart", "run", name], name)
    assert not _is_runner_exec(["tart", "exec"], name)
    assert not _is_runner_exec(["tart", "exec", "-i"], name)
