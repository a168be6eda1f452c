"""Helpers for the libvirt backend's tests: runner entries, a fake guest agent for the libvirt
test driver, and guest agent calls (file reads, commands) against real VMs."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from outrunner.config import LibvirtImage, RunnerConfig
from outrunner.provisioner import RunnerRequest
from outrunner.testing.contract import runner_name
from tests.support.guest import GUEST_CMDLINE, Guest

TEST_URI = "test:///default"
"""libvirt's in-process fake hypervisor: domains without QEMU, state shared per process."""


def runner_config(scale_set: str, **options: Any) -> RunnerConfig:
    return RunnerConfig(name=scale_set, labels=("linux",), libvirt=LibvirtImage(**options))


def vm_options(guest: Guest, overlay_dir: Path, **options: Any) -> dict[str, Any]:
    """Options for a real micro-VM of the test guest: TCG, BIOS, direct kernel boot, no NIC."""
    defaults: dict[str, Any] = {
        "path": str(guest.base),
        "runner_cmd": guest.runner_cmd,
        "domain_type": "qemu",
        "firmware": "bios",
        "network": "none",
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "cmdline": GUEST_CMDLINE,
        "overlay_dir": str(overlay_dir),
        "cpus": 1,
        "memory": 256,
        "boot_timeout": 60.0,
    }
    return {**defaults, **options}


def request_for(runner: RunnerConfig, jit: str | None = None) -> RunnerRequest:
    return RunnerRequest(runner_name(runner.name), jit or f"jit-{secrets.token_hex(8)}", runner)


def agent_error(message: str) -> libvirt.libvirtError:
    # libvirtError takes the thread's last libvirt error, if any, for its code; the tests only
    # need a message (and code None, which the provisioner treats as "some failure").
    return libvirt.libvirtError(message)


class FakeAgent:
    """The guest agent seam for the libvirt test driver (which has none): behaves like qemu-ga
    after ``boot_pings`` failed pings, and records what it was asked to run."""

    def __init__(self, *, boot_pings: int = 2, answers: bool = True) -> None:
        self.boot_pings = boot_pings
        self.answers = answers
        self.pings: Counter[str] = Counter()
        self.execs: dict[str, tuple[str, list[str]]] = {}
        self.exited: set[str] = set()
        self.missing = {"/nonexistent/run.sh"}
        self.echo_arguments = False
        """Put the command's arguments into guest-exec errors, as a careless agent might."""
        self.on_ping: Any = None
        self.unsupported_status = False
        self.commands: list[str] = []

    def __call__(self, domain: libvirt.virDomain, command: str, timeout: int) -> str:
        name = domain.name()
        request = json.loads(command)
        self.commands.append(request["execute"])
        if request["execute"] == "guest-ping":
            self.pings[name] += 1
            if self.on_ping is not None:
                self.on_ping(domain)
            if not self.answers or self.pings[name] <= self.boot_pings:
                raise agent_error("Guest agent is not responding: QEMU guest agent not connected")
            return '{"return": {}}'
        if request["execute"] == "guest-exec":
            path = request["arguments"]["path"]
            args = request["arguments"]["arg"]
            if path in self.missing:
                detail = f" {args}" if self.echo_arguments else ""
                raise agent_error(
                    "internal error: unable to execute QEMU agent command 'guest-exec': "
                    f"Failed to execute child process “{path}”{detail} (No such file or directory)"
                )
            self.execs[name] = (path, args)
            return json.dumps({"return": {"pid": 100 + len(self.execs)}})
        if request["execute"] == "guest-exec-status":
            if self.unsupported_status:
                raise agent_error("Guest agent is not responding")
            return json.dumps({"return": {"exited": name in self.exited}})
        raise agent_error(f"unsupported command {request['execute']}")


# -- real guests -------------------------------------------------------------------------------


def agent(domain: libvirt.virDomain, execute: str, **arguments: Any) -> Any:
    """One guest agent command; returns its ``return`` value."""
    command: dict[str, Any] = {"execute": execute}
    if arguments:
        command["arguments"] = arguments
    reply = libvirt_qemu.qemuAgentCommand(domain, json.dumps(command), 10, 0)
    return json.loads(reply)["return"]


def power_off(domain: libvirt.virDomain) -> None:
    """Make the guest power off at once (busybox ``poweroff -f`` through the agent)."""
    agent(domain, "guest-exec", path="/bin/sh", arg=["-c", "poweroff -f"])


def read_guest_file(domain: libvirt.virDomain, path: str) -> bytes | None:
    """A file's content read through the guest agent (guest-file-open/read/close); None if the
    guest has no such file."""
    try:
        handle = agent(domain, "guest-file-open", path=path, mode="r")
    except libvirt.libvirtError as exc:
        if "No such file" in str(exc):
            return None
        raise
    try:
        data = b""
        while True:
            chunk = agent(domain, "guest-file-read", handle=handle, count=65536)
            data += base64.b64decode(chunk.get("buf-b64", ""))
            if chunk.get("eof") or not chunk.get("count"):
                return data
    finally:
        agent(domain, "guest-file-close", handle=handle)


def guest_run(domain: libvirt.virDomain, script: str, timeout: float = 20.0) -> tuple[int, str]:
    """Run ``sh -c script`` in the guest through the agent; return (exit code, stdout+stderr)."""
    options = {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True}
    started = agent(domain, "guest-exec", **options)
    deadline = time.monotonic() + timeout
    while True:
        status = agent(domain, "guest-exec-status", pid=started["pid"])
        if status["exited"]:
            out = base64.b64decode(status.get("out-data", "")) + base64.b64decode(
                status.get("err-data", "")
            )
            return int(status.get("exitcode", -1)), out.decode(errors="replace")
        assert time.monotonic() < deadline, f"guest command did not finish: {script}"
        time.sleep(0.05)


async def wait_for_guest_file(domain: libvirt.virDomain, path: str, timeout: float = 20.0) -> bytes:
    """Poll the guest (off the event loop) until ``path`` exists; return its content."""
    deadline = time.monotonic() + timeout
    while True:
        data = await asyncio.to_thread(read_guest_file, domain, path)
        if data is not None:
            return data
        assert time.monotonic() < deadline, f"{path} did not appear in the guest"
        await asyncio.sleep(0.1)
