"""Domain XML rendering for the libvirt backend: pure, no libvirt needed."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from outrunner.config import LibvirtImage, LibvirtMount
from outrunner.provisioners._libvirt_xml import (
    AGENT_CHANNEL,
    METADATA_NS,
    DomainSpec,
    RunnerFiles,
    RunnerMetadata,
    mount_tag,
    parse_metadata,
    render_domain_xml,
    render_metadata,
)

NS = {"o": METADATA_NS}
HOSTILE = 'we\'ird "<x>&amp;</x>" ]]> <!-- -->'


def spec(name: str = "linux-0a1b2c3d", overlay_dir: str = "/ov", **options: Any) -> DomainSpec:
    image = LibvirtImage(**{"path": "/golden.qcow2", **options})
    files = RunnerFiles.of(overlay_dir, name, efi=image.firmware == "efi")
    return DomainSpec(name=name, scale_set="linux", options=image, files=files)


def render(**kwargs: Any) -> ET.Element:
    return ET.fromstring(render_domain_xml(spec(**kwargs)))


def one(root: ET.Element, path: str) -> ET.Element:
    found = root.findall(path, NS)
    assert len(found) == 1, f"{path}: {len(found)} elements"
    return found[0]


def test_defaults_are_gha_outrunners_domain() -> None:
    root = render()
    assert root.tag == "domain"
    assert root.get("type") == "kvm"
    assert one(root, "name").text == "linux-0a1b2c3d"
    memory = one(root, "memory")
    assert (memory.text, memory.get("unit")) == ("8192", "MiB")
    assert one(root, "vcpu").text == "4"
    assert one(root, "os").get("firmware") == "efi"
    os_type = one(root, "os/type")
    assert (os_type.text, os_type.get("arch"), os_type.get("machine")) == ("hvm", "x86_64", "q35")
    assert one(root, "os/boot").get("dev") == "hd"
    assert one(root, "os/nvram").text == "/ov/linux-0a1b2c3d_VARS.fd"
    assert root.find("os/kernel") is None
    assert one(root, "cpu").attrib == {"mode": "host-passthrough"}
    assert one(root, "features/acpi") is not None
    assert one(root, "on_poweroff").text == "destroy"
    assert one(root, "on_crash").text == "destroy"
    # SCSI disk behind a virtio-scsi controller, qcow2 overlay with writeback cache.
    assert one(root, "devices/controller[@type='scsi']").get("model") == "virtio-scsi"
    disk = one(root, "devices/disk")
    assert disk.attrib == {"type": "file", "device": "disk"}
    assert one(disk, "driver").get("type") == "qcow2"
    assert one(disk, "driver").get("cache") == "writeback"
    assert one(disk, "source").get("file") == "/ov/linux-0a1b2c3d.qcow2"
    assert one(disk, "target").attrib == {"dev": "sda", "bus": "scsi"}
    interface = one(root, "devices/interface")
    assert interface.get("type") == "network"
    assert one(interface, "source").get("network") == "default"
    assert one(interface, "model").get("type") == "virtio"
    channel = one(root, "devices/channel")
    assert channel.get("type") == "unix"
    assert one(channel, "target").attrib == {"type": "virtio", "name": AGENT_CHANNEL}
    assert root.find("devices/filesystem") is None
    assert root.find("memoryBacking") is None


def test_headless_and_lean() -> None:
    root = render()
    assert root.find(".//graphics") is None
    assert one(root, "devices/video/model").get("type") == "none"
    assert one(root, "devices/memballoon").get("model") == "none"
    assert one(root, "devices/controller[@type='usb']").get("model") == "none"
    serial = one(root, "devices/serial")
    assert serial.get("type") == "file"
    assert one(serial, "source").get("path") == "/ov/linux-0a1b2c3d.console.log"


def test_metadata_marks_the_domain_and_records_its_files() -> None:
    root = render()
    marker = one(root, "metadata/o:runner")
    assert marker.text == "linux"
    assert marker.get("overlay") == "/ov/linux-0a1b2c3d.qcow2"
    assert marker.get("console") == "/ov/linux-0a1b2c3d.console.log"
    assert marker.get("nvram") == "/ov/linux-0a1b2c3d_VARS.fd"
    assert 'xmlns:outrunner="' + METADATA_NS + '"' in render_domain_xml(spec())


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        # What virDomainGetMetadata returns: the element without its prefix.
        (
            '<runner overlay="/ov/a.qcow2" console="/ov/a.console.log" nvram="/ov/a_VARS.fd">'
            "linux</runner>",
            RunnerFiles("/ov/a.qcow2", "/ov/a.console.log", "/ov/a_VARS.fd"),
        ),
        (
            f'<o:runner xmlns:o="{METADATA_NS}" overlay="/a.qcow2" console="/a.log">x</o:runner>',
            RunnerFiles("/a.qcow2", "/a.log", None),
        ),
    ],
)
def test_parse_metadata(returned: str, expected: RunnerFiles) -> None:
    parsed = parse_metadata(returned)
    assert parsed is not None
    assert parsed.files == expected


@pytest.mark.parametrize(
    "returned", ["", "<runner/>", "<other overlay='/a' console='/b'/>", "<runner overlay='/a'"]
)
def test_parse_metadata_rejects_foreign_or_broken(returned: str) -> None:
    assert parse_metadata(returned) is None


def test_metadata_round_trips() -> None:
    made = spec()
    marker = one(ET.fromstring(render_domain_xml(made)), "metadata/o:runner")
    parsed = parse_metadata(ET.tostring(marker, encoding="unicode"))
    assert parsed is not None
    assert (parsed.scale_set, parsed.files) == ("linux", made.files)


@pytest.mark.parametrize(
    ("bus", "dev", "controller"),
    [("scsi", "sda", True), ("virtio", "vda", False), ("sata", "sda", False)],
)
def test_disk_bus(bus: str, dev: str, controller: bool) -> None:
    root = render(disk_bus=bus)
    assert one(root, "devices/disk/target").attrib == {"dev": dev, "bus": bus}
    assert (root.find("devices/controller[@type='scsi']") is not None) is controller


def test_no_nic_when_network_is_none() -> None:
    root = render(network="none")
    assert root.find(".//interface") is None


def test_named_network() -> None:
    root = render(network="br-ci")
    assert one(root, "devices/interface/source").get("network") == "br-ci"


def test_tcg_domain_with_bios_and_default_cpu() -> None:
    root = render(domain_type="qemu", firmware="bios", machine="pc")
    assert root.get("type") == "qemu"
    assert one(root, "os").get("firmware") is None
    assert root.find("os/nvram") is None
    assert one(root, "os/type").get("machine") == "pc"
    # host-passthrough is refused under TCG; the unset cpu_mode means "maximum" there.
    assert one(root, "cpu").attrib == {"mode": "maximum"}
    marker = one(root, "metadata/o:runner")
    assert marker.get("nvram") is None


@pytest.mark.parametrize("mode", ["host-passthrough", "host-model", "maximum"])
def test_cpu_modes(mode: str) -> None:
    assert one(render(cpu_mode=mode), "cpu").attrib == {"mode": mode}


def test_custom_cpu_model() -> None:
    cpu = one(render(cpu_mode="Skylake-Client-v4"), "cpu")
    assert cpu.attrib == {"mode": "custom", "match": "exact"}
    model = one(cpu, "model")
    assert (model.text, model.get("fallback")) == ("Skylake-Client-v4", "forbid")


def test_direct_kernel_boot() -> None:
    root = render(
        kernel="/boot/vmlinux",
        initrd="/boot/initrd.img",
        cmdline="console=ttyS0 root=/dev/sda quiet",
        firmware="bios",
    )
    assert one(root, "os/kernel").text == "/boot/vmlinux"
    assert one(root, "os/initrd").text == "/boot/initrd.img"
    assert one(root, "os/cmdline").text == "console=ttyS0 root=/dev/sda quiet"
    assert root.find("os/boot") is None  # the kernel, not the disk, is booted


def test_direct_kernel_boot_without_initrd_or_cmdline() -> None:
    root = render(kernel="/boot/vmlinux")
    assert one(root, "os/kernel").text == "/boot/vmlinux"
    assert root.find("os/initrd") is None
    assert root.find("os/cmdline") is None


def test_virtiofs_mount() -> None:
    root = render(mount=LibvirtMount("/var/cache/vcpkg/"))
    backing = one(root, "memoryBacking")
    assert one(backing, "source").get("type") == "memfd"
    assert one(backing, "access").get("mode") == "shared"
    fs = one(root, "devices/filesystem")
    assert fs.attrib == {"type": "mount", "accessmode": "passthrough"}
    assert one(fs, "driver").get("type") == "virtiofs"
    assert one(fs, "source").get("dir") == "/var/cache/vcpkg/"
    assert one(fs, "target").get("dir") == "vcpkg"
    assert mount_tag("/var/cache/vcpkg") == "vcpkg"


def test_memory_and_cpus() -> None:
    root = render(cpus=32, memory=65536)
    assert one(root, "vcpu").text == "32"
    assert one(root, "memory").text == "65536"


def test_hostile_names_and_paths_round_trip_and_inject_nothing() -> None:
    hostile_dir = f"/srv/{HOSTILE}"
    made = spec(
        name=f"x{HOSTILE}",
        overlay_dir=hostile_dir,
        kernel=f"/k/{HOSTILE}",
        initrd=f"/i/{HOSTILE}",
        cmdline=f"init=/{HOSTILE}",
        network=HOSTILE,
        cpu_mode="maximum",
        mount=LibvirtMount(f"/m/{HOSTILE}"),
    )
    made = dataclasses.replace(made, scale_set=HOSTILE)
    text = render_domain_xml(made)
    root = ET.fromstring(text)
    assert one(root, "name").text == f"x{HOSTILE}"
    assert one(root, "os/kernel").text == f"/k/{HOSTILE}"
    assert one(root, "os/initrd").text == f"/i/{HOSTILE}"
    assert one(root, "os/cmdline").text == f"init=/{HOSTILE}"
    assert one(root, "devices/disk/source").get("file") == f"{hostile_dir}/x{HOSTILE}.qcow2"
    assert one(root, "devices/interface/source").get("network") == HOSTILE
    assert one(root, "devices/filesystem/source").get("dir") == f"/m/{HOSTILE}"
    assert one(root, "devices/serial/source").get("path") == (
        f"{hostile_dir}/x{HOSTILE}.console.log"
    )
    marker = one(root, "metadata/o:runner")
    assert marker.text == HOSTILE
    assert marker.get("overlay") == f"{hostile_dir}/x{HOSTILE}.qcow2"
    # Nothing was added: the same elements as a harmless domain, no <x>, no comments.
    plain = ET.fromstring(
        render_domain_xml(
            spec(
                kernel="/k",
                initrd="/i",
                cmdline="c",
                network="n",
                cpu_mode="maximum",
                mount=LibvirtMount("/m/a"),
            )
        )
    )
    assert [e.tag for e in root.iter()] == [e.tag for e in plain.iter()]
    assert root.find(".//x") is None
    assert "<!--" not in text


def test_metadata_with_the_runners_pid_round_trips() -> None:
    made = spec()
    marker = one(ET.fromstring(render_domain_xml(made)), "metadata/o:runner")
    assert marker.get("pid") is None  # not started yet
    # What virDomainSetMetadata gets once the runner runs: the element without a namespace.
    element = render_metadata(RunnerMetadata("linux", made.files, pid=4242))
    assert element.startswith("<runner ")
    parsed = parse_metadata(element)
    assert parsed == RunnerMetadata("linux", made.files, pid=4242)
    broken = element.replace('pid="4242"', 'pid="-1"')
    assert parse_metadata(broken) == RunnerMetadata("linux", made.files, pid=None)
