"""The libvirt test guest: a direct-kernel-boot micro-VM built from the host's Debian packages.

Nothing is downloaded and nothing binary is committed. :func:`ensure_guest` assembles, from
``linux-image-amd64``, ``busybox-static`` and ``qemu-guest-agent`` as installed on this machine:

* ``vmlinux``: the uncompressed kernel, cut out of ``/boot/vmlinuz-*`` (an XZ stream after the
  bzImage's decompressor stub). QEMU boots this ELF straight through its PVH entry point, which
  under TCG reaches the guest agent in about 2.5 s against about 6 s for the compressed image;
* ``initrd.img``: an uncompressed ``newc`` cpio (no guest-side decompression, which is slow under
  TCG) holding busybox with its applet links, ``qemu-ga`` with the libraries ``ldd`` lists (at
  the same paths, the ELF interpreter included), the virtio modules with their dependencies, a
  ``/init`` and ``/actions-runner/run.sh``;
* ``base.qcow2``: an empty 64 MiB qcow2, the golden image the provisioner overlays.

``/init`` mounts proc, sys and dev, loads the modules, links
``/dev/virtio-ports/org.qemu.guest_agent.0`` (there is no udev) and keeps ``qemu-ga`` running.
Kernel command line switches for tests: ``outrunner.agent=off`` boots without the agent (a guest
that never answers), ``outrunner.poweroff=1`` powers off at once (a VM that dies while booting).

``/actions-runner/run.sh`` stands in for the actions runner: it writes its arguments to
``/run/outrunner/args`` (one per line) and the value after ``--jitconfig`` to
``/run/outrunner/jitconfig`` (atomically, via a rename), then sleeps until killed, as a runner
busy with a job would.

The output goes to a world-searchable directory (QEMU runs as ``libvirt-qemu`` and must read the
kernel and initrd): ``$OUTRUNNER_TEST_GUEST_DIR`` or ``/var/lib/outrunner-test/guest``. A
``guest.json`` there records the hash of every input; the guest is rebuilt when that changes.

Command line (CI runs it before the tests): ``python -m tests.support.guest [--dir D] [--force]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

__all__ = [
    "AGENT_OFF",
    "ARGS_FILE",
    "DEFAULT_DIR",
    "GUEST_CMDLINE",
    "JIT_FILE",
    "MODULES_LOADED",
    "POWEROFF",
    "RUNNER_CMD",
    "Guest",
    "GuestBuildError",
    "ensure_guest",
    "guest_problem",
    "main",
]

DEFAULT_DIR: Final = "/var/lib/outrunner-test/guest"
DIR_ENV: Final = "OUTRUNNER_TEST_GUEST_DIR"
RUNNER_CMD: Final = "/actions-runner/run.sh"
JIT_FILE: Final = "/run/outrunner/jitconfig"
ARGS_FILE: Final = "/run/outrunner/args"
GUEST_CMDLINE: Final = "console=ttyS0 quiet"
AGENT_OFF: Final = "outrunner.agent=off"
POWEROFF: Final = "outrunner.poweroff=1"

BUSYBOX: Final = "/bin/busybox"
QEMU_GA: Final = "/usr/sbin/qemu-ga"
BASE_SIZE: Final = "64M"
# Modules with their dependencies (from modules.dep). Early: what the guest agent needs, loaded
# before it starts. Late: the disk buses (the overlay on each of them) and virtio-fs (mounts),
# loaded after the agent is up; probing AHCI alone costs about 0.4 s under TCG.
EARLY_MODULES: Final = ("virtio_pci", "virtio_console")
LATE_MODULES: Final = ("virtio_blk", "virtio_scsi", "sd_mod", "ahci", "virtiofs")
MODULES_LOADED: Final = "/run/modules-loaded"
"""Exists in the guest once the late modules are loaded."""
# Bumped when the layout changes in a way the input hash cannot see.
_RECIPE: Final = "outrunner-test-guest/2"
_XZ_MAGIC: Final = b"\xfd7zXZ\x00"

_INIT: Final = r"""#!/bin/sh
# outrunner test guest: no udev, no systemd; this is PID 1.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
load() {
    for module in $(cat "$1"); do
        insmod "/lib/modules/$module" || echo "init: insmod $module failed"
    done
}
load /etc/modules.early
cmdline=" $(cat /proc/cmdline) "
case "$cmdline" in *" outrunner.poweroff=1 "*) echo "init: powering off"; poweroff -f ;; esac
# udev would make this link: the agent's port by its channel name.
mkdir -p /dev/virtio-ports
tries=0
while [ ! -e /dev/virtio-ports/org.qemu.guest_agent.0 ] && [ "$tries" -lt 200 ]; do
    for port in /sys/class/virtio-ports/*; do
        [ -r "$port/name" ] || continue
        name=$(cat "$port/name")
        [ -n "$name" ] && ln -sf "/dev/${port##*/}" "/dev/virtio-ports/$name"
    done
    tries=$((tries + 1))
    [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ] || sleep 0.05
done
case "$cmdline" in
*" outrunner.agent=off "*)
    echo "init: guest agent disabled"
    ;;
*)
    (
        while :; do
            qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run
            echo "init: qemu-ga exited with $?, restarting"
            sleep 0.2
        done
    ) &
    echo "init: guest agent started"
    ;;
esac
load /etc/modules.late
touch /run/modules-loaded
echo "init: all modules loaded"
# PID 1 must not exit; waiting also reaps orphans that get re-parented here.
while :; do
    wait
    sleep 3600 &
    wait
done
"""

_RUN_SH: Final = r"""#!/bin/sh
# Stand-in for the actions runner: record how we were started, then stay up like a busy runner.
mkdir -p /run/outrunner
: > /run/outrunner/args.tmp
for arg in "$@"; do printf '%s\n' "$arg" >> /run/outrunner/args.tmp; done
mv /run/outrunner/args.tmp /run/outrunner/args
if [ "$1" = "--jitconfig" ]; then
    printf '%s' "$2" > /run/outrunner/jitconfig.tmp
    mv /run/outrunner/jitconfig.tmp /run/outrunner/jitconfig
fi
exec sleep 2147483647
"""


class GuestBuildError(RuntimeError):
    """A tool or package the test guest is built from is missing or misbehaved."""


@dataclasses.dataclass(frozen=True)
class Guest:
    """Paths of a built test guest (all world-readable)."""

    directory: Path
    kernel: Path
    initrd: Path
    base: Path
    kernel_version: str
    digest: str
    cmdline: str = GUEST_CMDLINE
    runner_cmd: str = RUNNER_CMD


# --------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass(frozen=True)
class _Inputs:
    kernel_version: str
    vmlinuz: Path
    busybox: Path
    applets: tuple[str, ...]
    files: tuple[tuple[str, Path], ...]
    """(path in the guest, host file) for qemu-ga and its libraries."""
    early: tuple[tuple[str, Path], ...]
    """(name in /lib/modules, host file) in load order, before the agent starts."""
    late: tuple[tuple[str, Path], ...]
    """The same for the modules loaded after the agent started."""

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(_RECIPE.encode())
        h.update(_INIT.encode())
        h.update(_RUN_SH.encode())
        h.update(Path(__file__).read_bytes())
        h.update(" ".join(self.applets).encode())
        sources = [("vmlinuz", self.vmlinuz), ("busybox", self.busybox)]
        for name, path in [*sources, *self.files, *self.early, *self.late]:
            h.update(name.encode() + b"\0")
            h.update(_file_digest(path).encode())
        return h.hexdigest()


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _version_key(version: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", version)]


def _kernel() -> tuple[str, Path]:
    found = sorted(glob.glob("/boot/vmlinuz-*"))
    versions = [p.removeprefix("/boot/vmlinuz-") for p in found]
    versions = [v for v in versions if os.path.isdir(f"/lib/modules/{v}")]
    if not versions:
        raise GuestBuildError(
            "no /boot/vmlinuz-* with modules in /lib/modules (apt-get install linux-image-amd64)"
        )
    version = max(versions, key=_version_key)
    return version, Path(f"/boot/vmlinuz-{version}")


def _applets(busybox: Path) -> tuple[str, ...]:
    out = _run([str(busybox), "--list"])
    # Never "busybox" itself: a link of that name over the binary makes /init unexecutable.
    return tuple(sorted(a for a in out.split() if a and a != "busybox" and "/" not in a))


def _shared_libraries(binary: str) -> tuple[tuple[str, Path], ...]:
    """``ldd``'s list for ``binary``: (path the loader looks for, the real file); none for a
    static binary."""
    done = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
    if "not a dynamic executable" in done.stdout + done.stderr:
        return ()
    if done.returncode != 0:
        raise GuestBuildError(f"ldd {binary} failed: {done.stderr.strip()}")
    files: dict[str, Path] = {}
    for raw in done.stdout.splitlines():
        line = raw.strip()
        if "not found" in line:
            raise GuestBuildError(f"{binary}: a library is missing: {line}")
        if "=>" in line:
            target = line.split("=>", 1)[1].split("(")[0].strip()
        else:  # the ELF interpreter ("/lib64/ld-linux-x86-64.so.2 (0x...)") and the vDSO
            target = line.split("(")[0].strip()
        if target.startswith("/"):
            files[target] = Path(os.path.realpath(target))
    return tuple(sorted(files.items()))


def _modules(version: str) -> tuple[tuple[tuple[str, Path], ...], tuple[tuple[str, Path], ...]]:
    """(early, late) modules in load order, dependencies first, none twice."""
    base = Path(f"/lib/modules/{version}")
    deps: dict[str, list[str]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        module, _, needs = line.partition(":")
        deps[module] = needs.split()
    by_name = {_module_name(m): m for m in deps}
    order: list[str] = []

    def visit(module: str) -> None:
        if module in order:
            return
        # modules.dep lists every (transitive) dependency; load the deepest first.
        for dep in reversed(deps.get(module, [])):
            visit(dep)
        order.append(module)

    def resolve(names: Sequence[str]) -> tuple[tuple[str, Path], ...]:
        before = len(order)
        for name in names:
            module = by_name.get(name)
            if module is None:
                if _builtin(base, name):
                    continue
                raise GuestBuildError(f"kernel {version} has no module {name}")
            visit(module)
        return tuple((_module_name(m) + ".ko", base / m) for m in order[before:])

    early = resolve(EARLY_MODULES)
    return early, resolve(LATE_MODULES)


def _module_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            return name[: -len(suffix)].replace("-", "_")
    return name


def _builtin(base: Path, name: str) -> bool:
    builtin = base / "modules.builtin"
    return builtin.exists() and any(
        _module_name(line) == name for line in builtin.read_text().splitlines()
    )


def _inputs() -> _Inputs:
    version, vmlinuz = _kernel()
    for tool, package in ((BUSYBOX, "busybox-static"), (QEMU_GA, "qemu-guest-agent")):
        if not os.path.exists(tool):
            raise GuestBuildError(f"{tool} is missing (apt-get install {package})")
    # busybox-static needs no libraries; a dynamic busybox gets its own, like qemu-ga.
    libraries = dict(_shared_libraries(QEMU_GA)) | dict(_shared_libraries(BUSYBOX))
    early, late = _modules(version)
    return _Inputs(
        kernel_version=version,
        vmlinuz=vmlinuz,
        busybox=Path(os.path.realpath(BUSYBOX)),
        applets=_applets(Path(BUSYBOX)),
        files=((QEMU_GA, Path(QEMU_GA)), *sorted(libraries.items())),
        early=early,
        late=late,
    )


def _run(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{argv[0]} is not installed") from exc
    if done.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.stdout}")
    return done.stdout


# --------------------------------------------------------------------------------------------
# Building


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is XZ-compressed (Debian's amd64 kernels)."""
    start = vmlinuz.find(_XZ_MAGIC)
    while start != -1:
        try:
            # The stream is followed by the stub's trailer: decompress what is there, ignore
            # the rest.
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(vmlinuz[start:])
        except lzma.LZMAError:
            start = vmlinuz.find(_XZ_MAGIC, start + 1)
            continue
        if elf.startswith(b"\x7fELF"):
            return elf
        start = vmlinuz.find(_XZ_MAGIC, start + 1)
    raise GuestBuildError("no XZ-compressed ELF kernel found in the vmlinuz")


class _Cpio:
    """A minimal ``newc`` archive writer; every entry owned by root, mtime 0 (reproducible)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 0
        self._dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._out.write(header + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path and path not in self._dirs:
                self._dirs.add(path)
                self._entry(path, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith((".zst", ".gz")):
        raise GuestBuildError(f"{path}: only plain or XZ-compressed modules are supported")
    return data


def build_initrd(inputs: _Inputs) -> bytes:
    cpio = _Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "etc"):
        cpio.directory(d)
    # The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", inputs.busybox.read_bytes(), 0o755)
    for applet in inputs.applets:
        cpio.symlink(f"bin/{applet}", "busybox")
    for guest_path, host_path in inputs.files:
        cpio.file(guest_path, host_path.read_bytes(), 0o755)
    for list_name, modules in (("early", inputs.early), ("late", inputs.late)):
        for name, host_path in modules:
            cpio.file(f"lib/modules/{name}", _module_bytes(host_path))
        listing = "".join(f"{name}\n" for name, _ in modules)
        cpio.file(f"etc/modules.{list_name}", listing.encode())
    cpio.file("init", _INIT.encode(), 0o755)
    cpio.file(RUNNER_CMD, _RUN_SH.encode(), 0o755)
    return cpio.finish()


def _world_readable_dirs(path: Path) -> None:
    """Create ``path`` and its parents 0755 where missing: QEMU (libvirt-qemu) must reach it."""
    missing = []
    for parent in [path, *path.parents]:
        if parent.exists():
            break
        missing.append(parent)
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
        d.chmod(0o755)
    for d in [path, *path.parents]:
        if not d.stat().st_mode & stat.S_IXOTH:
            raise GuestBuildError(
                f"{d} is not searchable by others; QEMU runs as libvirt-qemu and could not read "
                f"the guest under {path} (choose another directory with {DIR_ENV})"
            )


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    lock_path = directory.parent / f".{directory.name}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o644)


def _guest(directory: Path, version: str, digest: str) -> Guest:
    return Guest(
        directory=directory,
        kernel=directory / "vmlinux",
        initrd=directory / "initrd.img",
        base=directory / "base.qcow2",
        kernel_version=version,
        digest=digest,
    )


def ensure_guest(directory: str | os.PathLike[str] | None = None, *, force: bool = False) -> Guest:
    """Build the test guest into ``directory`` unless an up-to-date one is there; return it."""
    target = Path(directory or os.environ.get(DIR_ENV) or DEFAULT_DIR).absolute()
    inputs = _inputs()
    digest = inputs.digest()
    _world_readable_dirs(target.parent)
    with _locked(target):
        manifest = target / "guest.json"
        if not force and manifest.exists():
            try:
                recorded = json.loads(manifest.read_text()).get("digest")
            except ValueError:
                recorded = None
            if recorded == digest:
                return _guest(target, inputs.kernel_version, digest)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            staging.chmod(0o755)
            _write(staging / "vmlinux", extract_vmlinux(inputs.vmlinuz.read_bytes()))
            _write(staging / "initrd.img", build_initrd(inputs))
            base = str(staging / "base.qcow2")
            _run(["qemu-img", "create", "-q", "-f", "qcow2", base, BASE_SIZE])
            (staging / "base.qcow2").chmod(0o644)
            record = {"digest": digest, "kernel": inputs.kernel_version, "recipe": _RECIPE}
            _write(staging / "guest.json", json.dumps(record, indent=2).encode())
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return _guest(target, inputs.kernel_version, digest)


def guest_problem() -> str | None:
    """Why the test guest cannot be built here, or None."""
    try:
        _inputs()
    except GuestBuildError as exc:
        return str(exc)
    if shutil.which("qemu-img") is None:
        return "qemu-img is not installed (apt-get install qemu-utils)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.guest", description="Build the libvirt test guest."
    )
    parser.add_argument("--dir", help=f"output directory (default: ${DIR_ENV} or {DEFAULT_DIR})")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    try:
        guest = ensure_guest(args.dir, force=args.force)
    except GuestBuildError as exc:
        print(f"guest: error: {exc}", file=sys.stderr)
        return 1
    print(f"kernel {guest.kernel} ({guest.kernel_version})")
    print(f"initrd {guest.initrd}")
    print(f"base   {guest.base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
