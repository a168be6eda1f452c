"""The provisioner contract suite run against LibvirtProvisioner twice: on libvirt's test driver
with a fake guest agent (fast; many cancellation points), and on the real libvirtd with QEMU
booting the test guest (TCG, direct kernel boot, no NIC)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import libvirt
import pytest

from outrunner.provisioner import RunnerRequest
from outrunner.provisioners.libvirt import LibvirtProvisioner, LibvirtProvisionerError
from outrunner.testing.contract import ProvisionerContract
from tests.provisioners.libvirt_helpers import (
    TEST_URI,
    FakeAgent,
    power_off,
    runner_config,
    vm_options,
)
from tests.support.guest import Guest
from tests.support.libvirt_daemon import (
    SESSION_PREFIX,
    destroy_domains,
    domain_names,
    leftovers,
)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

FOREIGN_XML = (
    "<domain type='{type}'><name>{name}</name><memory unit='MiB'>64</memory>"
    "<os><type arch='x86_64'>hvm</type></os></domain>"
)


class _LibvirtContract(ProvisionerContract[LibvirtProvisioner]):
    """What both runs share; subclasses say where the domains live and what they boot."""

    __test__ = False
    start_error = LibvirtProvisionerError
    uri: ClassVar[str]
    foreign_type: ClassVar[str]
    foreign_flags: ClassVar[int] = 0
    conn: libvirt.virConnect
    overlays: Path

    def options(self) -> dict[str, object]:
        raise NotImplementedError

    def make_request(self, name: str, scale_set: str) -> RunnerRequest:
        return RunnerRequest(name, "jit", runner_config(scale_set, **self.options()))

    async def make_failing_request(
        self, provisioner: LibvirtProvisioner, name: str, scale_set: str
    ) -> RunnerRequest:
        # Fails late: after the overlay and the domain were made and the guest booted, in
        # guest-exec, so both must be taken away again.
        options = {**self.options(), "runner_cmd": "/nonexistent/run.sh"}
        return RunnerRequest(name, "jit", runner_config(scale_set, **options))

    async def environment_exists(self, provisioner: LibvirtProvisioner, name: str) -> bool:
        return await asyncio.to_thread(self._exists, name)

    def _exists(self, name: str) -> bool:
        try:
            self.conn.lookupByName(name)
        except libvirt.libvirtError:
            return False
        return True

    async def list_environments(self, provisioner: LibvirtProvisioner, prefix: str) -> list[str]:
        names = await asyncio.to_thread(domain_names, self.conn, prefix)
        # A runner's files count as part of its environment: none may outlive it.
        files = await asyncio.to_thread(leftovers, self.overlays, prefix)
        return sorted(set(names) | {_runner_of(f) for f in files})

    async def remove_behind_back(self, provisioner: LibvirtProvisioner, name: str) -> None:
        await asyncio.to_thread(lambda: self.conn.lookupByName(name).destroy())

    async def make_foreign_environment(self, provisioner: LibvirtProvisioner, name: str) -> bool:
        xml = FOREIGN_XML.format(type=self.foreign_type, name=name)
        await asyncio.to_thread(self.conn.createXML, xml, self.foreign_flags)
        return True

    async def discard_environments(self, prefix: str) -> None:
        await asyncio.to_thread(destroy_domains, self.conn, prefix)


def _runner_of(file_name: str) -> str:
    for suffix in (".qcow2", ".console.log", "_VARS.fd"):
        file_name = file_name.removesuffix(suffix)
    return file_name


# -- on the test driver ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="outrunner-contract-") as directory:
        path = Path(directory)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path / "golden.qcow2"), "16M"],
            check=True,
        )
        yield path


class TestLibvirtContractOnTestDriver(_LibvirtContract):
    """The test driver has no guest: a runner "exits" as a guest that powers off after it."""

    scale_set_prefix = "tdrvc"
    uri = TEST_URI
    foreign_type = "test"
    # A start here takes ~30 ms: qemu-img (~15 ms), createXML, two failed pings, guest-exec.
    cancel_delays = (0.0, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08)

    @pytest.fixture(autouse=True)
    def _world(self, golden_dir: Path) -> Iterator[None]:
        from outrunner.provisioners.libvirt import _silence_libvirt_stderr

        _silence_libvirt_stderr()
        self.golden = golden_dir / "golden.qcow2"
        self.overlays = golden_dir / "overlays"
        self.conn = libvirt.open(TEST_URI)
        try:
            yield
        finally:
            self.conn.close()

    async def make_runner_exit(self, provisioner: LibvirtProvisioner, name: str) -> bool:
        await asyncio.to_thread(lambda: self.conn.lookupByName(name).shutdown())
        return True

    def options(self) -> dict[str, object]:
        return {
            "path": str(self.golden),
            "uri": TEST_URI,
            "overlay_dir": str(self.overlays),
            "domain_type": "qemu",
            "network": "none",
            "boot_timeout": 5.0,
        }

    async def make_provisioner(self) -> LibvirtProvisioner:
        return LibvirtProvisioner(
            uri=TEST_URI,
            overlay_dir=str(self.overlays),
            agent_command=FakeAgent(boot_pings=1),
        )


# -- on the real daemon ------------------------------------------------------------------------


@pytest.mark.libvirt
class TestLibvirtContractOnQemu(_LibvirtContract):
    scale_set_prefix = f"{SESSION_PREFIX}c"
    uri = "qemu:///system"
    foreign_type = "qemu"
    # Paused: a foreign domain only has to exist, not to boot.
    foreign_flags = libvirt.VIR_DOMAIN_START_PAUSED
    # A start takes ~3.5 s: qemu-img ~10 ms, createXML ~0.4 s, boot ~2.7 s, guest-exec ~20 ms.
    # These land before anything exists, during qemu-img or createXML, and while booting.
    cancel_delays = (0.0, 0.03, 0.3, 1.5)
    cancel_timeout = 20.0
    # Two cores under TCG: two VMs booting at once is plenty.
    concurrency = 2

    @pytest.fixture(autouse=True)
    def _world(self, libvirt_conn: libvirt.virConnect, test_guest: Guest, vm_scratch: Path) -> None:
        self.conn = libvirt_conn
        self.guest = test_guest
        self.overlays = vm_scratch / "contract"

    def options(self) -> dict[str, object]:
        return vm_options(self.guest, self.overlays)

    async def make_runner_exit(self, provisioner: LibvirtProvisioner, name: str) -> bool:
        # wait_exited watches the domain: a runner's end shows as its guest powering off, as a
        # golden image that shuts down after its runner does.
        await asyncio.to_thread(power_off, self.conn.lookupByName(name))
        return True

    async def make_provisioner(self) -> LibvirtProvisioner:
        return LibvirtProvisioner(overlay_dir=str(self.overlays))
