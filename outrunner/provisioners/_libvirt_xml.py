"""Domain XML for the libvirt backend, built with ElementTree (pure: no libvirt import).

Every name and path goes into the document as element text or an attribute value, which
ElementTree escapes; nothing is spliced into markup, so a path holding ``'``, ``"``, ``<``, ``>``
or ``&`` arrives in libvirt exactly as written and cannot add elements. Text templates (what
gha-outrunner used) offer no such guarantee.

Each domain carries an ``<outrunner:runner>`` element in its ``<metadata>``: the mark that
outrunner made it (orphan cleanup, ``stop`` and adoption leave unmarked domains alone) and the
record of its files and, once it runs, of its runner's PID in the guest, so that a later process
can adopt or remove it without knowing the config that made it.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Final

from outrunner.config import LibvirtImage

__all__ = [
    "AGENT_CHANNEL",
    "METADATA_NS",
    "METADATA_PREFIX",
    "DomainSpec",
    "RunnerFiles",
    "RunnerMetadata",
    "mount_tag",
    "parse_metadata",
    "render_domain_xml",
    "render_metadata",
]

METADATA_NS: Final = "https://github.com/outrunner/outrunner/xmlns/libvirt-runner/1"
"""Namespace of outrunner's domain metadata element; stable across releases."""
METADATA_PREFIX: Final = "outrunner"
AGENT_CHANNEL: Final = "org.qemu.guest_agent.0"
"""The virtio-serial port name qemu-ga listens on (the libvirt default for type='virtio')."""

# Guest device names per bus: libvirt wants a target dev whose prefix matches the bus.
_DISK_DEV: Final = {"scsi": "sda", "sata": "sda", "virtio": "vda"}

# Serialize our element as <outrunner:runner> rather than <ns0:runner> (cosmetic: libvirt keeps
# the prefix in `virsh dumpxml`). Process-wide, but only for our own namespace URI.
ET.register_namespace(METADATA_PREFIX, METADATA_NS)


@dataclass(frozen=True)
class RunnerFiles:
    """The host files of one runner VM, all inside its overlay directory."""

    overlay: str
    console: str
    nvram: str | None
    """EFI variable store; ``None`` with BIOS firmware."""

    @classmethod
    def of(cls, overlay_dir: str, name: str, *, efi: bool) -> RunnerFiles:
        return cls(
            overlay=os.path.join(overlay_dir, f"{name}.qcow2"),
            console=os.path.join(overlay_dir, f"{name}.console.log"),
            nvram=os.path.join(overlay_dir, f"{name}_VARS.fd") if efi else None,
        )

    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.overlay, self.console, self.nvram) if p)

    @staticmethod
    def suffixes() -> tuple[str, ...]:
        """File name endings after ``<runner name>``, for finding leftovers in a directory."""
        return (".qcow2", ".console.log", "_VARS.fd")


@dataclass(frozen=True)
class DomainSpec:
    """What one runner's domain is made of."""

    name: str
    scale_set: str
    options: LibvirtImage
    files: RunnerFiles


def render_domain_xml(spec: DomainSpec) -> str:
    """The ``<domain>`` document for ``virConnect.createXML`` (a transient domain)."""
    o = spec.options
    domain = ET.Element("domain", type=o.domain_type)
    _text(domain, "name", spec.name)
    metadata = ET.SubElement(domain, "metadata")
    metadata.append(_marker(f"{{{METADATA_NS}}}runner", RunnerMetadata(spec.scale_set, spec.files)))
    _text(domain, "memory", str(o.memory), unit="MiB")
    _text(domain, "vcpu", str(o.cpus))
    if o.mount is not None:
        # virtiofsd maps guest memory: it must be shareable (gha-outrunner's choice: memfd).
        backing = ET.SubElement(domain, "memoryBacking")
        ET.SubElement(backing, "source", type="memfd")
        ET.SubElement(backing, "access", mode="shared")
    domain.append(_os(spec))
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    domain.append(_cpu(o.effective_cpu_mode))
    _text(domain, "on_poweroff", "destroy")
    _text(domain, "on_reboot", "restart")
    _text(domain, "on_crash", "destroy")
    domain.append(_devices(spec))
    return ET.tostring(domain, encoding="unicode")


def _os(spec: DomainSpec) -> ET.Element:
    o = spec.options
    os_el = ET.Element("os")
    if o.firmware == "efi":
        # Firmware autoselection (libvirt >= 5.2) picks an OVMF build from the host's
        # descriptors; the variable store goes next to the overlay so stop() can delete it
        # even when outrunner cannot write to libvirt's own nvram directory.
        os_el.set("firmware", "efi")
    _text(os_el, "type", "hvm", arch="x86_64", machine=o.machine)
    if spec.files.nvram:
        _text(os_el, "nvram", spec.files.nvram)
    if o.kernel:
        _text(os_el, "kernel", o.kernel)
        if o.initrd:
            _text(os_el, "initrd", o.initrd)
        if o.cmdline:
            _text(os_el, "cmdline", o.cmdline)
    else:
        ET.SubElement(os_el, "boot", dev="hd")
    return os_el


def _cpu(mode: str) -> ET.Element:
    if mode in ("host-passthrough", "host-model", "maximum"):
        return ET.Element("cpu", mode=mode)
    # A named model: exactly that CPU, or fail (no silent fallback to another model).
    cpu = ET.Element("cpu", mode="custom", match="exact")
    _text(cpu, "model", mode, fallback="forbid")
    return cpu


def _devices(spec: DomainSpec) -> ET.Element:
    o = spec.options
    devices = ET.Element("devices")
    if o.disk_bus == "scsi":
        ET.SubElement(devices, "controller", type="scsi", model="virtio-scsi")
    # No USB controller: nothing uses it, and QEMU would emulate (and poll) it.
    ET.SubElement(devices, "controller", type="usb", model="none")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache="writeback", discard="unmap")
    ET.SubElement(disk, "source", file=spec.files.overlay)
    ET.SubElement(disk, "target", dev=_DISK_DEV[o.disk_bus], bus=o.disk_bus)
    if o.network != "none":
        interface = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(interface, "source", network=o.network)
        ET.SubElement(interface, "model", type="virtio")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name=AGENT_CHANNEL)
    if o.mount is not None:
        fs = ET.SubElement(devices, "filesystem", type="mount", accessmode="passthrough")
        ET.SubElement(fs, "driver", type="virtiofs")
        ET.SubElement(fs, "source", dir=o.mount.source)
        ET.SubElement(fs, "target", dir=mount_tag(o.mount.source))
    # The serial console goes to a file next to the overlay: what the guest printed is there
    # when a boot times out. libvirt adds the matching <console> itself.
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=spec.files.console)
    # Headless: no <graphics> at all (libvirt has no type='none'), no video card, no balloon.
    video = ET.SubElement(devices, "video")
    ET.SubElement(video, "model", type="none")
    ET.SubElement(devices, "memballoon", model="none")
    return devices


def mount_tag(source: str) -> str:
    """The virtio-fs tag of a mount: the last component of its source (as gha-outrunner)."""
    return os.path.basename(source.rstrip("/"))


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    element.text = text
    return element


@dataclass(frozen=True)
class RunnerMetadata:
    """outrunner's metadata element of a domain, as ``virDomain.metadata`` returns it."""

    scale_set: str
    files: RunnerFiles
    pid: int | None = None
    """The runner command's PID in the guest (``guest-exec``'s answer); ``None`` until the runner
    is started. It lets a later process ask the guest agent whether an adopted runner exited."""


def render_metadata(metadata: RunnerMetadata) -> str:
    """The element for ``virDomain.setMetadata``, which puts it in :data:`METADATA_NS` itself
    (so it is written without a namespace here)."""
    return ET.tostring(_marker("runner", metadata), encoding="unicode")


def _marker(tag: str, metadata: RunnerMetadata) -> ET.Element:
    files = metadata.files
    attrs = {"overlay": files.overlay, "console": files.console}
    if files.nvram:
        attrs["nvram"] = files.nvram
    if metadata.pid is not None:
        attrs["pid"] = str(metadata.pid)
    element = ET.Element(tag, attrs)
    element.text = metadata.scale_set
    return element


def parse_metadata(xml: str) -> RunnerMetadata | None:
    """Read the element libvirt returns for :data:`METADATA_NS` (it drops the prefix)."""
    try:
        element = ET.fromstring(xml)
    except ET.ParseError:
        return None
    if element.tag.rpartition("}")[2] != "runner":
        return None
    overlay = element.get("overlay", "")
    console = element.get("console", "")
    if not overlay or not console:
        return None
    files = RunnerFiles(overlay=overlay, console=console, nvram=element.get("nvram") or None)
    pid = element.get("pid", "")
    return RunnerMetadata(
        scale_set=element.text or "", files=files, pid=int(pid) if pid.isdigit() else None
    )
