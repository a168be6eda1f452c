"""LibvirtProvisioner's bookkeeping on libvirt's test driver (``test:///default``): domains and
their metadata, overlay files made by the real ``qemu-img``, stop and cleanup rules, failure and
cancellation teardown, connection handling. The guest agent is :class:`FakeAgent` (the test
driver has none); real VMs are in ``test_libvirt_vm.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from outrunner.config import LibvirtImage
from outrunner.provisioner import RunnerRequest
from outrunner.provisioners import libvirt as libvirt_provisioner
from outrunner.provisioners._libvirt_events import EVENT_THREAD_NAME
from outrunner.provisioners._libvirt_xml import METADATA_NS, RunnerFiles, parse_metadata
from outrunner.provisioners.libvirt import (
    LibvirtProvisioner,
    LibvirtProvisionerError,
    _ensure_dir,
    _qemu_runs_as_other_user,
    connection_uri,
)
from outrunner.testing.contract import runner_name
from tests.provisioners.libvirt_helpers import TEST_URI, FakeAgent, request_for, runner_config
from tests.support.libvirt_daemon import destroy_domains, domain_names

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (qemu-utils)"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def conn() -> Iterator[libvirt.virConnect]:
    from outrunner.provisioners.libvirt import _silence_libvirt_stderr

    _silence_libvirt_stderr()
    connection = libvirt.open(TEST_URI)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def scale_set(conn: libvirt.virConnect) -> Iterator[str]:
    name = f"tdrv{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        destroy_domains(conn, name)


@pytest.fixture
def golden(tmp_path: Path) -> str:
    path = tmp_path / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return str(path)


@pytest.fixture
def overlays(tmp_path: Path) -> Path:
    return tmp_path / "overlays"  # made by the provisioner on first use


@pytest.fixture
def fake_agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
async def provisioner(overlays: Path, fake_agent: FakeAgent) -> AsyncIterator[LibvirtProvisioner]:
    async with LibvirtProvisioner(
        uri=TEST_URI, overlay_dir=str(overlays), agent_command=fake_agent
    ) as p:
        yield p


@dataclass
class Env:
    """One test's world: the provisioner under test, the test driver, the fake agent, a scale
    set name, a golden image and the overlay directory."""

    provisioner: LibvirtProvisioner
    conn: libvirt.virConnect
    agent: FakeAgent
    scale_set: str
    golden: str
    overlays: Path

    def request(self, **extra: Any) -> RunnerRequest:
        entry = options(self.golden, self.overlays, **extra)
        return request_for(runner_config(self.scale_set, **entry))

    def domain(self, name: str) -> libvirt.virDomain | None:
        return lookup(self.conn, name)

    def files(self) -> list[str]:
        """What is in the overlay directory."""
        if not self.overlays.exists():
            return []
        return sorted(p.name for p in self.overlays.iterdir())


@pytest.fixture
def env(  # noqa: PLR0917 - pytest passes fixtures by name
    provisioner: LibvirtProvisioner,
    conn: libvirt.virConnect,
    fake_agent: FakeAgent,
    scale_set: str,
    golden: str,
    overlays: Path,
) -> Env:
    return Env(provisioner, conn, fake_agent, scale_set, golden, overlays)


def options(golden: str, overlays: Path, **extra: Any) -> dict[str, Any]:
    return {
        "path": golden,
        "uri": TEST_URI,
        "overlay_dir": str(overlays),
        "domain_type": "qemu",
        "network": "none",
        "boot_timeout": 5.0,
        **extra,
    }


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def foreign_domain(conn: libvirt.virConnect, name: str) -> None:
    """A domain outrunner did not create: no metadata."""
    conn.createXML(
        f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<os><type>hvm</type></os></domain>",
        0,
    )


def backing_file(overlay: Path) -> str:
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(overlay)],
        capture_output=True,
        check=True,
        text=True,
    )
    return str(json.loads(info.stdout)["backing-filename"])


# -- start and stop ----------------------------------------------------------------------------


async def test_start_makes_overlay_domain_and_runs_the_runner(env: Env) -> None:
    req = env.request(runner_cmd="/opt/run me.sh")
    await env.provisioner.start(req)

    overlay = env.overlays / f"{req.name}.qcow2"
    assert env.files() == [overlay.name]
    assert backing_file(overlay) == env.golden  # the golden image is never written
    assert mode_of(env.overlays) == 0o755  # created world-searchable
    domain = env.domain(req.name)
    assert domain is not None
    assert domain.isActive()
    metadata = parse_metadata(domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS))
    assert metadata is not None
    assert metadata.scale_set == env.scale_set
    assert metadata.files.overlay == str(overlay)
    assert metadata.files.console == str(env.overlays / f"{req.name}.console.log")
    # The runner command got the JIT config as its arguments, after the agent answered.
    assert env.agent.execs[req.name] == ("/opt/run me.sh", ["--jitconfig", req.jit_config])
    assert env.agent.pings[req.name] == env.agent.boot_pings + 1
    assert await env.provisioner.exited(req.name) is False

    await env.provisioner.stop(req.name)
    assert env.domain(req.name) is None
    assert env.files() == []
    await env.provisioner.stop(req.name)  # idempotent


async def test_stop_of_a_vanished_vm_still_deletes_its_files(env: Env) -> None:
    req = env.request()
    await env.provisioner.start(req)
    write(env.overlays / f"{req.name}.console.log", "boot log")
    env.conn.lookupByName(req.name).destroy()
    assert await env.provisioner.exited(req.name) is True
    await env.provisioner.stop(req.name)
    assert env.files() == []


async def test_stop_by_a_fresh_instance_uses_the_metadata(env: Env, tmp_path: Path) -> None:
    # Started with an overlay_dir the second provisioner does not know: stop finds the files
    # through the domain's metadata.
    elsewhere = tmp_path / "elsewhere"
    req = env.request(overlay_dir=str(elsewhere))
    async with LibvirtProvisioner(uri=TEST_URI, agent_command=env.agent) as first:
        await first.start(req)
    assert listing(elsewhere) == [f"{req.name}.qcow2"]
    async with LibvirtProvisioner(uri=TEST_URI, overlay_dir=str(tmp_path / "x")) as second:
        await second.stop(req.name)
    assert env.domain(req.name) is None
    assert listing(elsewhere) == []


async def test_stop_leaves_a_foreign_domain_alone(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    name = runner_name(env.scale_set)
    foreign_domain(env.conn, name)
    with caplog.at_level(logging.WARNING):
        await env.provisioner.stop(name)
    assert env.domain(name) is not None
    assert "did not create" in caplog.text


async def test_exited_when_the_runner_process_ends(env: Env) -> None:
    req = env.request()
    assert await env.provisioner.exited(req.name) is True  # unknown
    await env.provisioner.start(req)
    assert await env.provisioner.exited(req.name) is False
    env.agent.exited.add(req.name)
    assert await env.provisioner.exited(req.name) is True
    env.agent.exited.clear()  # qemu-ga reports an exit once; the provisioner remembers it
    assert await env.provisioner.exited(req.name) is True
    await env.provisioner.stop(req.name)


async def test_exited_is_false_when_the_agent_does_not_answer(env: Env) -> None:
    req = env.request()
    await env.provisioner.start(req)
    env.agent.answers = False
    env.agent.unsupported_status = True
    assert await env.provisioner.exited(req.name) is False
    await env.provisioner.stop(req.name)


# -- failures ----------------------------------------------------------------------------------


async def test_broken_golden_image(env: Env) -> None:
    req = env.request(path="/nonexistent/golden.qcow2")
    with pytest.raises(LibvirtProvisionerError, match=r"/nonexistent/golden\.qcow2") as err:
        await env.provisioner.start(req)
    assert "No such file" in str(err.value)
    assert env.domain(req.name) is None
    assert env.files() == []


async def test_failed_runner_command_tears_down_and_hides_the_jit(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    env.agent.echo_arguments = True
    req = env.request(runner_cmd="/nonexistent/run.sh")
    req = RunnerRequest(req.name, "eyJzZWNyZXQiOiAiand0In0=", req.runner)
    with caplog.at_level(logging.DEBUG), pytest.raises(LibvirtProvisionerError) as err:
        await env.provisioner.start(req)
    message = str(err.value)
    assert "/nonexistent/run.sh" in message
    assert req.name in message
    assert req.jit_config not in message
    assert "***" in message  # the agent's echo of the arguments, redacted
    assert err.value.__cause__ is None  # the original error, which holds the JIT, is dropped
    assert err.value.__suppress_context__
    assert req.jit_config not in caplog.text
    assert env.domain(req.name) is None
    assert env.files() == []


async def test_boot_timeout(env: Env) -> None:
    env.agent.answers = False
    req = env.request(boot_timeout=0.4)
    with pytest.raises(LibvirtProvisionerError) as err:
        await env.provisioner.start(req)
    message = str(err.value)
    assert "did not answer within boot_timeout (0.4 s)" in message
    assert "qemu-guest-agent" in message
    assert str(env.overlays / f"{req.name}.console.log") in message
    assert env.domain(req.name) is None
    assert env.files() == []


async def test_vm_that_dies_while_booting_fails_fast(env: Env) -> None:
    env.agent.answers = False
    env.agent.on_ping = lambda domain: domain.destroy()  # the guest powers off
    req = env.request(boot_timeout=60.0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(LibvirtProvisionerError, match="stopped while booting"):
        await env.provisioner.start(req)
    assert loop.time() - began < 5
    assert env.files() == []


async def test_existing_files_are_never_overwritten(env: Env) -> None:
    req = env.request()
    console = env.overlays / f"{req.name}.console.log"
    write(console, "someone else's")
    with pytest.raises(LibvirtProvisionerError, match="already exist"):
        await env.provisioner.start(req)
    assert read(console) == "someone else's"
    assert env.files() == [console.name]
    assert env.domain(req.name) is None


async def test_unreachable_libvirt_leaves_no_overlay(env: Env) -> None:
    # The overlay is made before connecting; the failed connection must take it away again.
    req = env.request(uri="qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    with pytest.raises(LibvirtProvisionerError, match="cannot connect to libvirt at"):
        await env.provisioner.start(req)
    assert env.files() == []


async def test_duplicate_start_is_refused(env: Env) -> None:
    req = env.request()
    await env.provisioner.start(req)
    with pytest.raises(LibvirtProvisionerError, match="already started"):
        await env.provisioner.start(req)
    await env.provisioner.stop(req.name)
    assert env.files() == []


async def test_cancelled_while_booting_tears_down(env: Env) -> None:
    env.agent.answers = False
    req = env.request(boot_timeout=60.0)
    task = asyncio.create_task(env.provisioner.start(req))
    while not env.agent.pings[req.name]:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert env.domain(req.name) is None
    assert env.files() == []


# -- cleanup -----------------------------------------------------------------------------------


async def test_cleanup_takes_only_our_domains_and_files(env: Env) -> None:
    ours = [env.request() for _ in range(2)]
    arm = request_for(runner_config(f"{env.scale_set}-arm", **options(env.golden, env.overlays)))
    # A previous run: started, then the process went away without stopping anything.
    async with LibvirtProvisioner(uri=TEST_URI, agent_command=env.agent) as previous:
        for req in [*ours, arm]:
            await previous.start(req)
    foreign = runner_name(env.scale_set)
    foreign_domain(env.conn, foreign)
    crashed = runner_name(env.scale_set)  # files of a runner whose VM is gone
    unrelated = [f"{env.scale_set}-notarunner.qcow2", f"{env.scale_set}-0a1b2c3d.txt", "a.qcow2"]
    for entry in [f"{foreign}.qcow2", f"{crashed}.qcow2", f"{crashed}.console.log", *unrelated]:
        write(env.overlays / entry, "")

    runner = ours[0].runner
    async with LibvirtProvisioner.for_runner(runner, agent_command=env.agent) as fresh:
        removed = await fresh.cleanup(f"{env.scale_set}-")

    assert removed == sorted([*(r.name for r in ours), crashed])
    assert domain_names(env.conn, env.scale_set) == sorted([arm.name, foreign])
    kept = [*unrelated, f"{foreign}.qcow2", f"{arm.name}.qcow2"]
    assert env.files() == sorted(kept)
    destroy_domains(env.conn, f"{env.scale_set}-arm")


async def test_cleanup_never_deletes_files_outside_the_runners_names(
    env: Env, tmp_path: Path
) -> None:
    # Metadata is writable by anyone with access to libvirt: a domain claiming some other file
    # as its overlay is destroyed (it is marked as ours) but that file is kept.
    victim = tmp_path / "precious.qcow2"
    write(victim, "keep me")
    name = runner_name(env.scale_set)
    env.conn.createXML(
        f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory>"
        f"<metadata><o:runner xmlns:o='{METADATA_NS}' overlay='{victim}' "
        f"console='{victim}'>{env.scale_set}</o:runner></metadata>"
        "<os><type>hvm</type></os></domain>",
        0,
    )
    assert await env.provisioner.cleanup(f"{env.scale_set}-") == [name]
    assert read(victim) == "keep me"
    assert env.domain(name) is None


async def test_cleanup_with_nothing_to_do(env: Env) -> None:
    assert await env.provisioner.cleanup(f"{env.scale_set}-") == []


# -- connection --------------------------------------------------------------------------------


def test_connection_uri() -> None:
    assert connection_uri(LibvirtImage(path="/g")) == "qemu:///system"
    assert connection_uri(LibvirtImage(path="/g", uri="qemu+ssh://ci@host/system")) == (
        "qemu+ssh://ci@host/system"
    )
    socket = LibvirtImage(path="/g", socket="/run/my libvirt/sock")
    assert connection_uri(socket) == "qemu+unix:///system?socket=/run/my%20libvirt/sock"


def test_for_runner_uses_the_entrys_uri_and_overlay_dir() -> None:
    runner = runner_config("x", path="/g", socket="/run/s", overlay_dir="/srv/ov")
    provisioner = LibvirtProvisioner.for_runner(runner)
    assert provisioner._uri == "qemu+unix:///system?socket=/run/s"
    assert provisioner._overlay_dir == "/srv/ov"


async def test_reconnects_after_the_connection_died(env: Env) -> None:
    first = env.request()
    await env.provisioner.start(first)
    env.provisioner._conns[TEST_URI].close()  # as if libvirtd had restarted
    await env.provisioner.stop(first.name)  # a lookup on the dead connection, then a reconnect
    assert env.domain(first.name) is None
    env.provisioner._conns[TEST_URI].close()
    second = env.request()
    await env.provisioner.start(second)
    await env.provisioner.stop(second.name)
    assert env.files() == []


async def test_closed_provisioner_refuses_work(overlays: Path) -> None:
    provisioner = LibvirtProvisioner(uri=TEST_URI, overlay_dir=str(overlays))
    await provisioner.close()
    with pytest.raises(LibvirtProvisionerError, match="closed"):
        await provisioner.stop("x-0a1b2c3d")


# -- small sync helpers (file operations stay out of the async tests) --------------------------


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


def chmod(path: Path, mode: int) -> None:
    path.chmod(mode)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def read(path: Path) -> str:
    return path.read_text()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# -- overlay directory permissions -------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "other_user"),
    [
        ("qemu:///system", True),
        ("qemu+unix:///system?socket=/run/l.sock", True),
        ("qemu:///session", False),
        ("qemu+ssh://ci@host/system", False),
        (TEST_URI, False),
    ],
)
def test_which_uris_run_qemu_as_another_user(uri: str, other_user: bool) -> None:
    assert _qemu_runs_as_other_user(uri) is other_user


def test_overlay_dir_is_created_searchable_and_blockers_are_reported(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)  # like pytest's own base directory
    target = tmp_path / "a" / "b"
    blocked = _ensure_dir(str(target), True)
    assert mode_of(target) == 0o755
    assert str(tmp_path) in blocked
    assert str(target) not in blocked
    assert _ensure_dir(str(target), False) == []  # exists: nothing to do, nothing checked


async def test_unsearchable_overlay_dir_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    provisioner = LibvirtProvisioner(uri=TEST_URI)
    blocked_dir = str(tmp_path / "ov")
    chmod(tmp_path, 0o700)
    log = provisioner._log
    files = RunnerFiles.of(blocked_dir, "x-0a1b2c3d", efi=False)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            await provisioner._prepare_overlay_dir(
                "x-0a1b2c3d", blocked_dir, "qemu:///system", files, log
            )
    await provisioner.close()
    assert caplog.text.count("not searchable by others") == 1


# -- wait_exited -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["destroy", "shutdown"])
async def test_wait_exited_returns_when_the_domain_stops(env: Env, how: str) -> None:
    req = env.request()
    await env.provisioner.start(req)
    waiting = asyncio.create_task(env.provisioner.wait_exited(req.name))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    domain = env.domain(req.name)
    assert domain is not None
    if how == "destroy":
        domain.destroy()  # by hand
    else:
        domain.shutdown()  # the guest powers off
    await asyncio.wait_for(waiting, 2)
    assert await env.provisioner.exited(req.name)
    await env.provisioner.stop(req.name)
    assert env.files() == []


async def test_wait_exited_returns_at_once_when_unknown_or_already_ended(env: Env) -> None:
    await asyncio.wait_for(env.provisioner.wait_exited(runner_name(env.scale_set)), 2)
    req = env.request()
    await env.provisioner.start(req)
    env.agent.exited.add(req.name)  # the runner process ended; the guest stays up
    await asyncio.wait_for(env.provisioner.wait_exited(req.name), 2)
    await env.provisioner.stop(req.name)


async def test_wait_exited_polls_where_there_are_no_events(
    overlays: Path, fake_agent: FakeAgent, env: Env
) -> None:
    req = env.request()
    async with LibvirtProvisioner(
        uri=TEST_URI, overlay_dir=str(overlays), agent_command=fake_agent, events=False
    ) as polling:
        await polling.start(req)
        waiting = asyncio.create_task(polling.wait_exited(req.name))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        env.conn.lookupByName(req.name).destroy()
        await asyncio.wait_for(waiting, 5)
        assert polling._watches == {}
        await polling.stop(req.name)


async def test_wait_exited_watches_again_after_the_connection_died(env: Env) -> None:
    req = env.request()
    await env.provisioner.start(req)
    waiting = asyncio.create_task(env.provisioner.wait_exited(req.name))
    await asyncio.sleep(0.1)
    dead = env.provisioner._conns[TEST_URI]
    dead.close()  # as if libvirtd had restarted
    # The next call notices (the Scaler polls exited()); the waiter moves to a new connection.
    assert await env.provisioner.exited(req.name) is False
    await asyncio.sleep(0.1)
    assert not waiting.done()
    assert env.provisioner._watches[TEST_URI].conn is not dead
    env.conn.lookupByName(req.name).destroy()
    await asyncio.wait_for(waiting, 5)
    await env.provisioner.stop(req.name)


async def test_wait_exited_raises_when_the_provisioner_closes(overlays: Path, env: Env) -> None:
    req = env.request()
    provisioner = LibvirtProvisioner(
        uri=TEST_URI, overlay_dir=str(overlays), agent_command=env.agent
    )
    await provisioner.start(req)
    waiting = asyncio.create_task(provisioner.wait_exited(req.name))
    await asyncio.sleep(0.1)
    await provisioner.close()
    with pytest.raises(LibvirtProvisionerError, match="closed"):
        await asyncio.wait_for(waiting, 2)
    assert env.domain(req.name) is not None  # close leaves VMs alone
    async with LibvirtProvisioner(uri=TEST_URI, overlay_dir=str(overlays)) as fresh:
        await fresh.stop(req.name)


def event_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == EVENT_THREAD_NAME]


async def test_one_event_thread_per_process_whatever_the_provisioners(env: Env) -> None:
    # libvirt's default event loop cannot be unregistered, and connections opened after it was
    # registered need it to run (keepalive): one thread for the process's lifetime, idle in
    # poll(). Provisioners come and go without adding threads, and close their pools.
    await env.provisioner.wait_exited(runner_name(env.scale_set))
    assert len(event_threads()) == 1
    before = set(threading.enumerate())
    for _ in range(3):
        async with LibvirtProvisioner(uri=TEST_URI, agent_command=env.agent) as other:
            req = env.request()
            await other.start(req)
            waiting = asyncio.create_task(other.wait_exited(req.name))
            await asyncio.sleep(0.05)
            await other.stop(req.name)
            await asyncio.wait_for(waiting, 2)
    assert len(event_threads()) == 1
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while set(threading.enumerate()) - before:
        assert loop.time() < deadline, f"threads left: {set(threading.enumerate()) - before}"
        await asyncio.sleep(0.05)


# -- adopt -------------------------------------------------------------------------------------


async def test_a_fresh_provisioner_adopts_a_runner_and_learns_its_pid(env: Env) -> None:
    req = env.request()
    async with LibvirtProvisioner(uri=TEST_URI, agent_command=env.agent) as earlier:
        await earlier.start(req)
    domain = env.domain(req.name)
    assert domain is not None
    metadata = parse_metadata(domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS))
    assert metadata is not None
    assert metadata.pid == 101  # the fake agent's first PID, recorded after guest-exec

    assert await env.provisioner.adopt(req.name, req.runner) is True
    assert await env.provisioner.exited(req.name) is False
    waiting = asyncio.create_task(env.provisioner.wait_exited(req.name))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    env.agent.exited.add(req.name)  # the runner exits; the agent knows it by the recorded PID
    assert await env.provisioner.exited(req.name) is True
    waiting.cancel()
    await env.provisioner.stop(req.name)
    assert env.domain(req.name) is None
    assert env.files() == []


async def test_adopt_refuses_what_is_not_a_live_runner_of_this_scale_set(
    env: Env, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(libvirt_provisioner, "_ADOPT_PING_WINDOW", 0.3)
    runner = env.request().runner
    assert await env.provisioner.adopt(runner_name(env.scale_set), runner) is False  # unknown
    # Not ours: no metadata, or another scale set's. Refused, logged and left alone.
    foreign = runner_name(env.scale_set)
    foreign_domain(env.conn, foreign)
    other = request_for(runner_config(f"{env.scale_set}-arm", **options(env.golden, env.overlays)))
    async with LibvirtProvisioner(uri=TEST_URI, agent_command=env.agent) as earlier:
        await earlier.start(other)
        # Ours, but its runner has ended, or its guest agent is silent.
        ended, silent = env.request(), env.request()
        await earlier.start(ended)
        await earlier.start(silent)
    env.agent.exited.add(ended.name)
    with caplog.at_level(logging.INFO):
        assert await env.provisioner.adopt(foreign, runner) is False
        assert await env.provisioner.adopt(other.name, runner) is False
        assert await env.provisioner.adopt(ended.name, runner) is False
        env.agent.answers = False
        assert await env.provisioner.adopt(silent.name, runner) is False
    assert caplog.text.count("did not create for this scale set") == 2
    reasons = [
        getattr(r, "attrs", {}).get("reason", "")
        for r in caplog.records
        if r.getMessage() == "Not adopting a VM whose runner cannot be running"
    ]
    assert reasons[0] == "its runner process has exited"
    assert reasons[1].startswith("the guest agent does not answer")
    assert env.domain(foreign) is not None
    assert env.domain(other.name) is not None
    # The caller stops what adopt refused: ours goes, with its files; the foreign one stays.
    for name in (foreign, ended.name, silent.name):
        await env.provisioner.stop(name)
    assert domain_names(env.conn, env.scale_set) == sorted([foreign, other.name])
    assert env.files() == [f"{other.name}.qcow2"]
    destroy_domains(env.conn, f"{env.scale_set}-arm")


async def test_cleanup_keeps_the_domains_and_files_of_kept_runners(env: Env) -> None:
    kept, gone, orphan = env.request(), env.request(), env.request()
    async with LibvirtProvisioner(uri=TEST_URI, agent_command=env.agent) as earlier:
        for req in (kept, gone, orphan):
            await earlier.start(req)
    for req in (gone, orphan):  # their VMs are gone, their overlays are left
        env.conn.lookupByName(req.name).destroy()
    removed = await env.provisioner.cleanup(f"{env.scale_set}-", keep={kept.name, gone.name})
    assert removed == [orphan.name]
    assert domain_names(env.conn, env.scale_set) == [kept.name]
    assert env.files() == sorted([f"{kept.name}.qcow2", f"{gone.name}.qcow2"])
    await env.provisioner.stop(kept.name)
    await env.provisioner.stop(gone.name)
    assert env.files() == []
