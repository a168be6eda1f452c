"""LibvirtProvisioner booting real QEMU VMs (TCG) of the test guest through qemu:///system.

What happens inside the guest is read back through the guest agent (``guest-file-read``,
``guest-exec``) over a separate libvirt connection, never through the provisioner under test.
"""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import os
import secrets
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from outrunner.config import LibvirtMount
from outrunner.provisioner import RunnerRequest
from outrunner.provisioners._libvirt_xml import METADATA_NS
from outrunner.provisioners.libvirt import LibvirtProvisioner, LibvirtProvisionerError
from outrunner.testing.contract import runner_name
from tests.provisioners.libvirt_helpers import (
    guest_run,
    power_off,
    read_guest_file,
    request_for,
    runner_config,
    vm_options,
    wait_for_guest_file,
)
from tests.support.guest import AGENT_OFF, ARGS_FILE, JIT_FILE, MODULES_LOADED, POWEROFF, Guest
from tests.support.libvirt_daemon import SESSION_PREFIX, domain_names, leftovers

pytestmark = [pytest.mark.anyio, pytest.mark.libvirt]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Vm:
    """One test's world: its scale set, overlay directory and a provisioner for them."""

    provisioner: LibvirtProvisioner
    conn: libvirt.virConnect
    guest: Guest
    scale_set: str
    overlays: Path

    def request(self, **options: Any) -> RunnerRequest:
        entry = vm_options(self.guest, self.overlays, **options)
        return request_for(runner_config(self.scale_set, **entry))

    async def domain(self, name: str) -> libvirt.virDomain | None:
        def lookup() -> libvirt.virDomain | None:
            try:
                return self.conn.lookupByName(name)
            except libvirt.libvirtError:
                return None

        return await asyncio.to_thread(lookup)

    async def domains(self) -> list[str]:
        return await asyncio.to_thread(domain_names, self.conn, self.scale_set)

    async def files(self) -> list[str]:
        return await asyncio.to_thread(leftovers, self.overlays, self.scale_set)

    async def assert_nothing_left(self) -> None:
        assert await self.domains() == []
        assert await self.files() == []


@pytest.fixture
async def vm(
    libvirt_conn: libvirt.virConnect, test_guest: Guest, vm_scratch: Path
) -> AsyncIterator[Vm]:
    scale_set = f"{SESSION_PREFIX}v{secrets.token_hex(3)}"
    overlays = vm_scratch / scale_set
    async with LibvirtProvisioner(overlay_dir=str(overlays)) as provisioner:
        yield Vm(provisioner, libvirt_conn, test_guest, scale_set, overlays)


async def test_runner_command_runs_in_the_guest_with_its_jit_config(
    vm: Vm, caplog: pytest.LogCaptureFixture
) -> None:
    req = vm.request()
    jit = req.jit_config
    with caplog.at_level(logging.DEBUG):
        await vm.provisioner.start(req)
    domain = await vm.domain(req.name)
    assert domain is not None

    # The runner command ran inside this guest, with --jitconfig <this runner's config>.
    assert await wait_for_guest_file(domain, JIT_FILE) == jit.encode()
    args = await wait_for_guest_file(domain, ARGS_FILE)
    assert args.decode().splitlines() == ["--jitconfig", jit]
    assert await asyncio.to_thread(read_guest_file, domain, "/run/no-such-file") is None
    assert jit not in caplog.text

    # The live domain is the one the options describe.
    xml = ET.fromstring(await asyncio.to_thread(domain.XMLDesc, 0))
    assert xml.get("type") == "qemu"
    assert xml.find(".//interface") is None  # network: none
    assert xml.find(".//graphics") is None
    assert xml.find("metadata/{%s}runner" % METADATA_NS) is not None  # noqa: UP031
    assert xml.findtext("os/kernel") == str(vm.guest.kernel)
    console = vm.overlays / f"{req.name}.console.log"
    assert xml.find("devices/serial/source").get("path") == str(console)  # type: ignore[union-attr]
    assert sorted(await vm.files()) == sorted([console.name, f"{req.name}.qcow2"])
    # The overlay is the guest's SCSI disk (the default bus): 64 MiB, like the golden image.
    await wait_for_guest_file(domain, MODULES_LOADED)
    code, out = await asyncio.to_thread(guest_run, domain, "cat /sys/block/sda/size")
    assert (code, out.strip()) == (0, "131072")

    # The runner process ending is noticed; the VM is still up.
    assert await vm.provisioner.exited(req.name) is False
    pid = vm.provisioner._runners[req.name].pid
    code, out = await asyncio.to_thread(guest_run, domain, f"kill {pid}")
    assert code == 0, out
    for _ in range(50):
        if await vm.provisioner.exited(req.name):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("exited() never noticed the runner process ending")

    await vm.provisioner.stop(req.name)
    await vm.assert_nothing_left()


@pytest.mark.parametrize(("bus", "device"), [("virtio", "vda"), ("sata", "sda")])
async def test_disk_bus(vm: Vm, bus: str, device: str) -> None:
    req = vm.request(disk_bus=bus)
    await vm.provisioner.start(req)
    domain = await vm.domain(req.name)
    assert domain is not None
    await wait_for_guest_file(domain, MODULES_LOADED)
    code, out = await asyncio.to_thread(guest_run, domain, f"cat /sys/block/{device}/size")
    assert (code, out.strip()) == (0, "131072")
    await vm.provisioner.stop(req.name)
    await vm.assert_nothing_left()


def _virtiofsd() -> str | None:
    for path in ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"):
        if os.access(path, os.X_OK):
            return path
    return None


@pytest.mark.skipif(_virtiofsd() is None, reason="virtiofsd is not installed")
async def test_virtiofs_mount(vm: Vm, vm_scratch: Path) -> None:
    source = vm_scratch / f"{vm.scale_set}-cache"
    await asyncio.to_thread(_make_share, source, "shared with the guest\n")
    req = vm.request(mount=LibvirtMount(str(source)))
    await vm.provisioner.start(req)
    domain = await vm.domain(req.name)
    assert domain is not None
    await wait_for_guest_file(domain, MODULES_LOADED)
    tag = source.name
    script = f"mkdir -p /mnt/c && mount -t virtiofs {tag} /mnt/c && cat /mnt/c/hello.txt"
    code, out = await asyncio.to_thread(guest_run, domain, script)
    assert (code, out) == (0, "shared with the guest\n")
    await vm.provisioner.stop(req.name)
    await vm.assert_nothing_left()


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _make_share(path: Path, text: str) -> None:
    path.mkdir()
    path.chmod(0o755)
    (path / "hello.txt").write_text(text)
    (path / "hello.txt").chmod(0o644)


async def test_efi_firmware_keeps_its_variables_next_to_the_overlay(vm: Vm) -> None:
    # OVMF cannot boot the uncompressed test kernel: give it Debian's EFI-stub vmlinuz.
    vmlinuz = sorted(glob.glob("/boot/vmlinuz-*"))
    if not vmlinuz or not _exists("/usr/share/OVMF"):
        pytest.skip("needs /boot/vmlinuz-* and ovmf")
    req = vm.request(firmware="efi", kernel=vmlinuz[-1], machine="q35", boot_timeout=90.0)
    await vm.provisioner.start(req)
    nvram = f"{req.name}_VARS.fd"
    assert nvram in await vm.files()
    assert not _exists(f"/var/lib/libvirt/qemu/nvram/{nvram}")  # not in libvirt's directory
    await vm.provisioner.stop(req.name)
    await vm.assert_nothing_left()


# -- failures ----------------------------------------------------------------------------------


async def test_broken_golden_image(vm: Vm) -> None:
    req = vm.request(path="/nonexistent/golden.qcow2")
    with pytest.raises(LibvirtProvisionerError, match="Could not open") as err:
        await vm.provisioner.start(req)
    assert "/nonexistent/golden.qcow2" in str(err.value)
    await vm.assert_nothing_left()


async def test_boot_timeout_when_the_agent_never_answers(vm: Vm) -> None:
    req = vm.request(cmdline=f"{vm.guest.cmdline} {AGENT_OFF}", boot_timeout=5.0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(LibvirtProvisionerError) as err:
        await vm.provisioner.start(req)
    assert 5.0 <= loop.time() - began < 20
    message = str(err.value)
    assert "did not answer within boot_timeout (5 s)" in message
    assert f"{req.name}.console.log" in message
    await vm.assert_nothing_left()


async def test_guest_that_powers_off_while_booting(vm: Vm) -> None:
    req = vm.request(cmdline=f"{vm.guest.cmdline} {POWEROFF}", boot_timeout=60.0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(LibvirtProvisionerError, match="stopped while booting"):
        await vm.provisioner.start(req)
    assert loop.time() - began < 30  # noticed, not waited out
    await vm.assert_nothing_left()


# -- orphans -----------------------------------------------------------------------------------


async def test_cleanup_after_a_previous_run(vm: Vm) -> None:
    entry = vm_options(vm.guest, vm.overlays)
    runner = runner_config(vm.scale_set, **entry)
    orphan = request_for(runner)
    # A previous run: its provisioner started a VM, then went away without stopping it.
    async with LibvirtProvisioner.for_runner(runner) as previous:
        await previous.start(orphan)
    # A runner whose VM is gone but whose overlay stayed (the host crashed mid-stop).
    stray = runner_name(vm.scale_set)
    await asyncio.to_thread((vm.overlays / f"{stray}.qcow2").write_bytes, b"")
    # A domain named like a runner that outrunner did not make (no metadata): kept.
    foreign = runner_name(vm.scale_set)
    xml = (
        f"<domain type='qemu'><name>{foreign}</name><memory unit='MiB'>32</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    await asyncio.to_thread(vm.conn.createXML, xml, libvirt.VIR_DOMAIN_START_PAUSED)

    async with LibvirtProvisioner.for_runner(runner) as fresh:
        removed = await fresh.cleanup(f"{vm.scale_set}-")

    assert removed == sorted([orphan.name, stray])
    assert await vm.domains() == [foreign]
    assert await vm.files() == []
    domain = await vm.domain(foreign)
    assert domain is not None
    await asyncio.to_thread(domain.destroy)


# -- exits and adoption ------------------------------------------------------------------------

OUTRUNNER = """
import asyncio, json, sys
from outrunner.config import LibvirtImage, RunnerConfig
from outrunner.provisioner import RunnerRequest
from outrunner.provisioners.libvirt import LibvirtProvisioner

async def main(scale_set, name, options):
    runner = RunnerConfig(name=scale_set, labels=("linux",), libvirt=LibvirtImage(**options))
    provisioner = LibvirtProvisioner.for_runner(runner)
    await provisioner.start(RunnerRequest(name, "jit", runner))
    print("started", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
"""
"""An outrunner process that starts one runner VM, then lives until it is killed."""


async def test_a_vm_outlives_its_sigkilled_outrunner_and_is_adopted(vm: Vm) -> None:
    req = vm.request()
    options = vm_options(vm.guest, vm.overlays)
    outrunner = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        OUTRUNNER,
        *(vm.scale_set, req.name, json.dumps(options)),
        stdout=asyncio.subprocess.PIPE,
    )
    assert outrunner.stdout is not None
    assert await asyncio.wait_for(outrunner.stdout.readline(), 120) == b"started\n"
    outrunner.kill()  # SIGKILL: its libvirt connection drops with it
    await outrunner.wait()
    await asyncio.sleep(0.5)

    assert await vm.domains() == [req.name]
    async with LibvirtProvisioner(overlay_dir=str(vm.overlays / "elsewhere")) as fresh:
        assert await fresh.adopt(req.name, req.runner) is True
        assert await fresh.exited(req.name) is False  # the runner PID from the metadata
        waiting = asyncio.create_task(fresh.wait_exited(req.name))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await fresh.stop(req.name)  # the files are found through the metadata
        await asyncio.wait_for(waiting, 10)
    await vm.assert_nothing_left()


async def test_wait_exited_when_the_guest_powers_off(vm: Vm) -> None:
    req = vm.request()
    await vm.provisioner.start(req)
    domain = await vm.domain(req.name)
    assert domain is not None
    waiting = asyncio.create_task(vm.provisioner.wait_exited(req.name))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    loop = asyncio.get_running_loop()
    await asyncio.to_thread(power_off, domain)  # as a golden image does after its runner
    began = loop.time()
    await asyncio.wait_for(waiting, 20)
    print(f"wait_exited after the guest powered off: {loop.time() - began:.3f} s")
    assert await vm.provisioner.exited(req.name)
    await vm.provisioner.stop(req.name)
    await vm.assert_nothing_left()


async def test_wait_exited_after_virsh_destroy(vm: Vm) -> None:
    req = vm.request()
    await vm.provisioner.start(req)
    waiting = asyncio.create_task(vm.provisioner.wait_exited(req.name))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    virsh = await asyncio.create_subprocess_exec(
        "virsh",
        "-q",
        "-c",
        "qemu:///system",
        "destroy",
        req.name,
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert await virsh.wait() == 0
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(waiting, 10)
    print(f"wait_exited after virsh destroy returned: {loop.time() - began:.3f} s")
    assert "qemu:///system" in vm.provisioner._watches  # events, not polling
    await vm.provisioner.stop(req.name)
    await vm.assert_nothing_left()
