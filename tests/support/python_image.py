"""A Python base image made from this machine's own interpreter, for building the Containerfile.

``packaging/Containerfile`` starts ``FROM ${PYTHON_IMAGE}`` (``python:3.12-slim`` by default),
which the test machines cannot pull: no registry is reachable. :func:`ensure_python_image`
``docker import``\\ s instead a minimal root file system laid out like the official image's:

* ``/usr/local/bin/python3.X`` (with ``python3`` and ``python`` links) and its standard library
  in ``/usr/local/lib/python3.X``, from :data:`sys.base_prefix` (the installation the test venv is
  based on), without ``site-packages`` (only ``pip``, as the official image has it), the
  standard library's own tests and tkinter/IDLE, with the bytecode of the default optimization
  level (which a non-root process could not write: without it each start compiles ~1.5 s);
* the shared libraries ``ldd`` lists (with tests/support/guest.py's helper) for the interpreter
  and for ``lib-dynload/*.so``, and those a manylinux wheel may use without shipping them
  (libstdc++, libpthread, ...), at the paths the loader looks for them, the ELF interpreter
  included; a ``libpython`` from the installation itself goes next to the C library, where the
  loader looks without an ``ld.so.cache`` (as Debian places its own ``libpython3.X.so.1.0``);
* ``/bin/busybox`` (Debian's busybox-static) with a link per applet, for ``/bin/sh`` and the
  few tools a ``RUN`` line uses;
* a minimal ``/etc/passwd`` and ``/etc/group`` (root and nobody), ``/tmp`` (mode 1777);
* ``ENV PATH``/``LANG`` and ``CMD ["python3"]`` as in the official image.

The tag is ``outrunner-test-python:<digest>``, the digest covering every input file's content and
this module: an existing image of that tag is reused (about 1.2 s to find out; an import takes
about 3.5 s, 89 MB), and older tags of the repository are removed when a new one is built.

Command line: ``python -m tests.support.python_image [--force]`` prints the tag.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from tests.support.guest import GuestBuildError, _applets, _shared_libraries

__all__ = ["REPOSITORY", "PythonImageError", "ensure_python_image", "main"]

REPOSITORY: Final = "outrunner-test-python"
BUSYBOX: Final = Path("/bin/busybox")
PREFIX: Final = PurePosixPath("/usr/local")
# Bumped when the layout changes in a way the digest of the inputs cannot see.
_RECIPE: Final = "outrunner-test-python/1"
_ENV_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CHANGES: Final = (
    f"ENV PATH={_ENV_PATH}",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
# Top-level entries of the standard library left out: tests, GUI, the static library.
_STDLIB_SKIP: Final = frozenset(
    {"test", "idlelib", "tkinter", "turtledemo", "turtle.py", "site-packages"}
)
# Directories skipped at any depth (ctypes/test, lib2to3/tests, unittest/test, ...).
_SKIP_ANYWHERE: Final = frozenset({"test", "tests", "idle_test"})
# Bytecode of the default optimization level only (see the module docstring).
_PYC_SUFFIX: Final = f".{sys.implementation.cache_tag}.pyc"
# Libraries a manylinux wheel may link against without shipping them (the policy of PEP 599 and
# PEP 600, less X11/GL/GLib): a wheel in the image may need one the interpreter itself does not,
# e.g. charset-normalizer's compiled modules need libpthread.so.0. Taken from the C library's
# directory when they are there.
_MANYLINUX_LIBRARIES: Final = (
    "libgcc_s.so.1", "libstdc++.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libc.so.6",
    "libnsl.so.1", "libutil.so.1", "libpthread.so.0", "libresolv.so.2",
)  # fmt: skip
_PASSWD: Final = (
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
_GROUP: Final = "root:x:0:\nnogroup:x:65534:\n"


class PythonImageError(RuntimeError):
    """A file the image is made from is missing, or docker refused the import."""


@dataclass(frozen=True)
class _Layout:
    files: tuple[tuple[str, Path], ...]
    """(path in the image, host file), regular files, content copied."""
    links: tuple[tuple[str, str], ...]
    """(path in the image, link target)."""

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(_RECIPE.encode())
        h.update(Path(__file__).read_bytes())
        h.update(repr(_CHANGES).encode())
        for name, path in self.files:
            h.update(name.encode() + b"\0")
            with path.open("rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        for name, target in self.links:
            h.update(f"{name}\0{target}\0".encode())
        return h.hexdigest()


def _stdlib(stdlib: Path) -> Iterator[Path]:
    """The standard library's files to ship, host paths."""
    for entry in sorted(stdlib.iterdir()):
        if entry.name in _STDLIB_SKIP or entry.name.startswith("config-"):
            continue  # config-3.X-<triplet>: the static libpython, for embedding only
        if entry.is_file():
            yield entry
            continue
        for root, dirs, files in os.walk(entry):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_ANYWHERE)
            for name in sorted(files):
                if "_tkinter" in name:  # needs Tcl/Tk and X11 libraries
                    continue
                if Path(root).name == "__pycache__" and not name.endswith(_PYC_SUFFIX):
                    continue
                yield Path(root, name)


def _pip(site_packages: Path) -> Iterator[Path]:
    if not site_packages.is_dir():
        raise PythonImageError(
            f"{site_packages} is missing: the Containerfile's build stage needs pip in the base"
        )
    for entry in sorted(site_packages.iterdir()):
        if entry.name == "pip" or (entry.name.startswith("pip-") and entry.name.endswith("-info")):
            for root, dirs, files in os.walk(entry):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                yield from (Path(root, name) for name in sorted(files))


def _layout() -> _Layout:
    base = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    interpreter = base / "bin" / version
    stdlib = base / "lib" / version
    for needed in (interpreter, stdlib / "os.py", BUSYBOX):
        if not needed.exists():
            raise PythonImageError(f"{needed} is missing (busybox: apt-get install busybox-static)")
    image_lib = PREFIX / "lib" / version
    files: dict[str, Path] = {str(PREFIX / "bin" / version): interpreter}
    for path in _stdlib(stdlib):
        files[str(image_lib / path.relative_to(stdlib))] = path
    for path in _pip(stdlib / "site-packages"):
        files[str(image_lib / "site-packages" / path.relative_to(stdlib / "site-packages"))] = path

    binaries = [interpreter, *sorted((stdlib / "lib-dynload").glob("*.so"))]
    libraries: dict[str, Path] = {}
    try:
        for binary in binaries:
            if "_tkinter" not in binary.name:
                libraries.update(_shared_libraries(str(binary)))
    except GuestBuildError as exc:
        raise PythonImageError(str(exc)) from exc
    libc = next((name for name in libraries if Path(name).name.startswith("libc.so")), None)
    if libc is None:
        raise PythonImageError(f"ldd lists no libc for {interpreter}")
    system_lib = PurePosixPath(libc).parent
    for soname in _MANYLINUX_LIBRARIES:
        path = Path(system_lib / soname)
        if str(path) not in libraries and path.exists():
            libraries[str(path)] = path.resolve()
    for name, path in libraries.items():
        if Path(name).is_relative_to(base):  # libpython of a --enable-shared build
            files[str(system_lib / Path(name).name)] = path
        else:
            files[name] = path

    files[str(BUSYBOX)] = BUSYBOX
    try:
        applets = _applets(BUSYBOX)
    except GuestBuildError as exc:
        raise PythonImageError(str(exc)) from exc
    links = {f"/bin/{applet}": "busybox" for applet in applets}
    links[str(PREFIX / "bin" / "python3")] = version
    links[str(PREFIX / "bin" / "python")] = version
    return _Layout(files=tuple(sorted(files.items())), links=tuple(sorted(links.items())))


def _docker(*argv: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(["docker", *argv], input=stdin, capture_output=True, check=False)
    if done.returncode != 0:
        raise PythonImageError(f"docker {argv[0]} failed: {done.stderr.decode().strip()}")
    return done.stdout.decode()


def _image_exists(tag: str) -> bool:
    done = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=False)
    return done.returncode == 0


def _tar_info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name.lstrip("/"))
    info.type = kind
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _write_rootfs(layout: _Layout, out: io.BufferedIOBase) -> None:
    """Stream the root file system as a tar: directories first (mode 0755), then files."""
    with tarfile.open(fileobj=out, mode="w|") as tar:
        directories = {"/tmp", "/etc", "/root"}
        for name in [*(n for n, _ in layout.files), *(n for n, _ in layout.links)]:
            directories.update(str(p) for p in PurePosixPath(name).parents if str(p) != "/")
        for directory in sorted(directories):
            mode = {"/tmp": 0o1777, "/root": 0o700}.get(directory, 0o755)
            tar.addfile(_tar_info(directory, tarfile.DIRTYPE, mode))
        for name, path in layout.files:
            info = _tar_info(name, tarfile.REGTYPE, 0o755 if os.access(path, os.X_OK) else 0o644)
            stat = path.stat()
            info.size = stat.st_size
            info.mtime = int(stat.st_mtime)  # .pyc files are checked against their source's
            with path.open("rb") as f:
                tar.addfile(info, f)
        for name, target in layout.links:
            info = _tar_info(name, tarfile.SYMTYPE, 0o777)
            info.linkname = target
            tar.addfile(info)
        for name, text in (("/etc/passwd", _PASSWD), ("/etc/group", _GROUP)):
            data = text.encode()
            info = _tar_info(name, tarfile.REGTYPE, 0o644)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def ensure_python_image(*, force: bool = False) -> str:
    """The tag of an image with this machine's Python, imported now unless it exists already."""
    layout = _layout()
    tag = f"{REPOSITORY}:{layout.digest()[:16]}"
    if not force and _image_exists(tag):
        return tag
    changes = [arg for change in _CHANGES for arg in ("--change", change)]
    proc = subprocess.Popen(
        ["docker", "import", *changes, "-", tag],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stderr is not None
    try:
        _write_rootfs(layout, proc.stdin)  # type: ignore[arg-type]
    except BrokenPipeError:
        pass  # docker import gave up: its exit status and stderr say why
    finally:
        proc.stdin.close()
    error = proc.stderr.read().decode().strip()
    if proc.wait() != 0:
        raise PythonImageError(f"docker import failed: {error}")
    for line in _docker("images", REPOSITORY, "--format", "{{.Repository}}:{{.Tag}}").split():
        if line != tag:
            subprocess.run(["docker", "rmi", line], capture_output=True, check=False)
    return tag


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="import even if the tag exists")
    args = parser.parse_args(argv)
    try:
        print(ensure_python_image(force=args.force))
    except PythonImageError as exc:
        print(f"python_image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
