"""Access to a real libvirtd for tests: availability, required-ness, scratch space, tidying.

Tests marked ``libvirt`` boot real QEMU VMs through ``qemu:///system``. They need libvirt-python,
a libvirtd that answers, ``qemu-img`` and the test guest (built from the host's packages, see
:mod:`tests.support.guest`). All of that is checked once per session; without it they are
skipped, or they fail when ``OUTRUNNER_REQUIRE_LIBVIRT=1`` (CI sets it, so a broken daemon
cannot pass as "skipped").

QEMU runs as ``libvirt-qemu``, which cannot enter pytest's ``tmp_path`` (under a 0700
directory): overlays of real VMs go to :func:`scratch_dir`, a world-searchable directory
removed at the end of the session.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import secrets
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import libvirt

REQUIRE_ENV = "OUTRUNNER_REQUIRE_LIBVIRT"
URI = "qemu:///system"
SESSION_PREFIX = f"orvm{secrets.token_hex(2)}"
"""Prefix of every domain (and scale set) name a test of this session makes."""
SCRATCH_ROOT = Path(os.environ.get("OUTRUNNER_TEST_SCRATCH", "/var/lib/outrunner-test/runs"))


def python_binding_problem() -> str | None:
    if importlib.util.find_spec("libvirt") is None:
        return "libvirt-python is not installed (pip install 'outrunner[libvirt]')"
    return None


@functools.cache
def daemon_problem() -> str | None:
    """Why real VMs cannot be booted here, or None when everything is in place."""
    problem = python_binding_problem()
    if problem is not None:
        return problem
    import libvirt

    from outrunner.provisioners.libvirt import _silence_libvirt_stderr

    _silence_libvirt_stderr()
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        return f"libvirtd does not answer at {URI}: {exc.get_error_message() or exc}"
    try:
        conn.getLibVersion()
    except libvirt.libvirtError as exc:
        return f"libvirtd at {URI} fails: {exc.get_error_message() or exc}"
    finally:
        conn.close()
    if shutil.which("qemu-img") is None:
        return "qemu-img is not installed (apt-get install qemu-utils)"
    from tests.support.guest import guest_problem

    return guest_problem()


def connect() -> libvirt.virConnect:
    import libvirt

    from outrunner.provisioners.libvirt import _silence_libvirt_stderr

    _silence_libvirt_stderr()
    return libvirt.open(URI)


def domain_names(conn: libvirt.virConnect, prefix: str) -> list[str]:
    """Names of all domains starting with ``prefix``, outrunner's and foreign ones."""
    import libvirt

    names = []
    for domain in conn.listAllDomains(0):
        with contextlib.suppress(libvirt.libvirtError):  # vanished while listing
            if domain.name().startswith(prefix):
                names.append(domain.name())
    return sorted(names)


def destroy_domains(conn: libvirt.virConnect, prefix: str) -> list[str]:
    """Destroy (and undefine, if persistent) every domain starting with ``prefix``, in parallel
    (a destroy waits 1-2 s for QEMU to exit); return their names."""
    import libvirt

    def destroy(domain: libvirt.virDomain) -> str | None:
        with contextlib.suppress(libvirt.libvirtError):
            name = domain.name()
            if not name.startswith(prefix):
                return None
            if domain.isActive():
                domain.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_REMOVE_LOGS)
            if domain.isPersistent():
                domain.undefine()
            return name
        return None

    domains = conn.listAllDomains(0)
    if not domains:
        return []
    with ThreadPoolExecutor(max_workers=min(len(domains), 8)) as pool:
        return [name for name in pool.map(destroy, domains) if name is not None]


LIBVIRT_LOG_DIR = Path("/var/log/libvirt/qemu")


def remove_libvirt_logs(prefix: str) -> None:
    """Delete libvirtd's per-domain logs of this session that libvirt itself keeps: those of
    guests that powered off by themselves, and virtiofsd's (REMOVE_LOGS skips both)."""
    with contextlib.suppress(OSError):
        for path in LIBVIRT_LOG_DIR.glob(f"{prefix}*.log"):
            with contextlib.suppress(OSError):
                path.unlink()


def scratch_dir(name: str) -> Path:
    """A fresh world-searchable directory for overlays (QEMU must reach it as libvirt-qemu)."""
    path = SCRATCH_ROOT / name
    for directory in [*reversed(SCRATCH_ROOT.parents), SCRATCH_ROOT, path]:
        if not directory.exists():
            with contextlib.suppress(FileExistsError):
                directory.mkdir()
                directory.chmod(0o755)
    for directory in [path, *path.parents]:
        if not directory.stat().st_mode & stat.S_IXOTH:
            raise RuntimeError(
                f"{directory} is not searchable by others: QEMU (libvirt-qemu) could not open "
                "overlays below it; set OUTRUNNER_TEST_SCRATCH to another directory"
            )
    return path


def leftovers(directory: Path, prefix: str) -> list[str]:
    """Names of the files in ``directory`` starting with ``prefix`` (overlays, console logs and
    EFI variables are all named after their runner)."""
    if not directory.exists():
        return []
    return sorted(entry.name for entry in directory.iterdir() if entry.name.startswith(prefix))
