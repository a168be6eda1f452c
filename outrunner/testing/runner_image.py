"""A tiny runner image for tests and the demo, built offline: busybox plus the fake runner agent.

:func:`ensure_runner_image` returns a tag whose image has

* ``/home/runner/run.sh``: :file:`outrunner/testing/agent.sh`, the busybox twin of the fake runner
  agent (so the default ``runner_cmd: ./run.sh`` works against :class:`FakeGitHub`);
* ``/home/runner/idle.sh``: waits until stopped (exits 0 on SIGTERM), for tests that need a live
  environment without a job;
* busybox applets under ``/bin``, a ``runner`` user (uid 1001, as in the official runner image),
  ``/tmp``, ``WORKDIR /home/runner``; label ``outrunner.test-image=true``.

It is built ``FROM scratch`` with the host's static ``/bin/busybox`` (Debian's busybox-static), so
no registry is needed. Without a static busybox on the host it falls back to
``FROM busybox:stable``, which the engine must be able to pull. An existing image is reused when
its recipe label matches what this module would build now; otherwise it is rebuilt.

Command line: ``python -m outrunner.testing.runner_image [--tag T] [--host URL] [--rebuild]``
prints the tag.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import io
import struct
import sys
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any, Final

import docker
import docker.errors

from outrunner.provisioners.docker import default_client, resolve_engine

__all__ = ["DEFAULT_TAG", "IMAGE_LABEL", "RunnerImageError", "ensure_runner_image", "main"]

DEFAULT_TAG: Final = "outrunner-test-runner:latest"
IMAGE_LABEL: Final = "outrunner.test-image"
_RECIPE_LABEL: Final = "outrunner.test-image.recipe"
HOST_BUSYBOX: Final = "/bin/busybox"
RUNNER_UID: Final = 1001

# What agent.sh and the tests use, plus a few for poking around with `docker exec`. The name
# "busybox" itself is never linked: the binary already has it.
APPLETS: Final = (
    "sh", "ash", "base64", "cat", "echo", "env", "printf", "sed", "sleep", "tr", "wget",
    "test", "[", "true", "false", "id", "ls", "ps", "kill", "mkdir", "rm", "touch", "head",
    "grep", "hostname", "uname", "wc",
)  # fmt: skip

_IDLE_SH: Final = """\
#!/bin/sh
# Stays up until stopped, for tests that need a live runner environment without a job.
# PID 1 gets no default signal handlers, hence the trap; `wait` returns when TERM arrives.
trap 'exit 0' TERM INT
sleep 2147483647 &
wait $!
"""
_PASSWD: Final = (
    f"root:x:0:0:root:/root:/bin/sh\nrunner:x:{RUNNER_UID}:{RUNNER_UID}::/home/runner:/bin/sh\n"
)
_GROUP: Final = f"root:x:0:\nrunner:x:{RUNNER_UID}:\n"

_SCRATCH_DOCKERFILE: Final = f"""\
FROM scratch
COPY rootfs/ /
COPY --chown={RUNNER_UID}:{RUNNER_UID} runner/ /home/runner/
ENV PATH=/bin
WORKDIR /home/runner
"""
_FALLBACK_DOCKERFILE: Final = f"""\
FROM busybox:stable
COPY --chown={RUNNER_UID}:{RUNNER_UID} runner/ /home/runner/
WORKDIR /home/runner
"""


class RunnerImageError(RuntimeError):
    """The test runner image could not be built."""


def ensure_runner_image(
    client_or_host: docker.APIClient | docker.DockerClient | str | None = None,
    tag: str = DEFAULT_TAG,
    *,
    rebuild: bool = False,
    busybox: str = HOST_BUSYBOX,
) -> str:
    """Return ``tag`` once the engine has the test runner image under it, building it if needed.

    ``client_or_host``: a docker SDK client, an engine URL, or ``None`` for the engine
    :func:`~outrunner.provisioners.docker.resolve_engine` finds. ``busybox``: the host binary to
    copy (must be statically linked; otherwise the ``busybox:stable`` fallback is used).
    """
    if isinstance(client_or_host, docker.APIClient | docker.DockerClient):
        api = (
            client_or_host.api
            if isinstance(client_or_host, docker.DockerClient)
            else client_or_host
        )
        return _ensure(api, tag, rebuild, busybox)
    api = default_client(resolve_engine(client_or_host or "").url)
    try:
        return _ensure(api, tag, rebuild, busybox)
    finally:
        api.close()


def _ensure(api: docker.APIClient, tag: str, rebuild: bool, busybox: str) -> str:
    static = busybox if _is_static_elf(busybox) else None
    context, recipe = _build_context(static)
    if not rebuild and _current_recipe(api, tag) == recipe:
        return tag
    labels = {IMAGE_LABEL: "true", _RECIPE_LABEL: recipe}
    try:
        output = api.build(
            fileobj=context,
            custom_context=True,
            tag=tag,
            labels=labels,
            rm=True,
            forcerm=True,
            network_mode="none",  # nothing is downloaded while building
            decode=True,
        )
        _drain(output)
    except docker.errors.DockerException as exc:
        raise RunnerImageError(f"build {tag}: {exc}") from exc
    return tag


def _current_recipe(api: docker.APIClient, tag: str) -> str | None:
    try:
        info = api.inspect_image(tag)  # type: ignore[no-untyped-call]  # untyped in the stubs
    except docker.errors.NotFound:
        return None
    labels = (info.get("Config") or {}).get("Labels") or {}
    recipe = labels.get(_RECIPE_LABEL)
    return recipe if isinstance(recipe, str) else None


def _drain(output: Iterator[dict[str, Any]]) -> None:
    log: list[str] = []
    for line in output:
        if "error" in line:
            detail = "".join(log[-5:]).strip()
            raise RunnerImageError(f"{line['error']}\n{detail}".strip())
        log.append(str(line.get("stream", "")))


def _build_context(busybox: str | None) -> tuple[io.BytesIO, str]:
    """The tar build context and a digest of everything in it (the recipe label)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        dockerfile = _SCRATCH_DOCKERFILE if busybox else _FALLBACK_DOCKERFILE
        _add_file(tar, "Dockerfile", dockerfile.encode(), 0o644)
        runner = "runner/"
        _add_dir(tar, runner, 0o755)
        _add_file(tar, runner + "run.sh", _agent_script(), 0o755)
        _add_file(tar, runner + "idle.sh", _IDLE_SH.encode(), 0o755)
        if busybox:
            _add_rootfs(tar, busybox)
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()[:16]
    buffer.seek(0)
    return buffer, digest


def _add_rootfs(tar: tarfile.TarFile, busybox: str) -> None:
    for directory, mode in (("rootfs/", 0o755), ("rootfs/bin/", 0o755), ("rootfs/etc/", 0o755)):
        _add_dir(tar, directory, mode)
    _add_dir(tar, "rootfs/tmp/", 0o1777)
    _add_dir(tar, "rootfs/root/", 0o700)
    with open(busybox, "rb") as f:
        _add_file(tar, "rootfs/bin/busybox", f.read(), 0o755)
    for applet in APPLETS:
        link = tarfile.TarInfo("rootfs/bin/" + applet)
        link.type, link.linkname, link.mode = tarfile.SYMTYPE, "busybox", 0o777
        tar.addfile(link)
    _add_file(tar, "rootfs/etc/passwd", _PASSWD.encode(), 0o644)
    _add_file(tar, "rootfs/etc/group", _GROUP.encode(), 0o644)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mode: int) -> None:
    info = tarfile.TarInfo(name.rstrip("/"))
    info.type, info.mode = tarfile.DIRTYPE, mode
    tar.addfile(info)


def _agent_script() -> bytes:
    return importlib.resources.files("outrunner.testing").joinpath("agent.sh").read_bytes()


_PT_INTERP: Final = 3


def _is_static_elf(path: str) -> bool:
    """True for an ELF executable without a program interpreter (``PT_INTERP``), i.e. one that
    needs no dynamic loader and so runs alone in a ``FROM scratch`` image."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if len(header) < 52 or header[:4] != b"\x7fELF":
                return False
            is_64, order = header[4] == 2, "<" if header[5] == 1 else ">"
            if is_64:
                phoff, phentsize, phnum = struct.unpack_from(order + "Q14xHH", header, 32)
            else:
                phoff, phentsize, phnum = struct.unpack_from(order + "I10xHH", header, 28)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    types = [struct.unpack_from(order + "I", table, i * phentsize)[0] for i in range(phnum)]
    return _PT_INTERP not in types and len(table) == phentsize * phnum


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m outrunner.testing.runner_image",
        description="Build (if needed) the busybox test runner image and print its tag.",
    )
    parser.add_argument("--tag", default=DEFAULT_TAG, help=f"image tag (default {DEFAULT_TAG})")
    parser.add_argument("--host", default="", help="Docker engine URL (default: as outrunner)")
    parser.add_argument("--rebuild", action="store_true", help="build even if the tag is current")
    args = parser.parse_args(argv)
    try:
        tag = ensure_runner_image(args.host or None, args.tag, rebuild=args.rebuild)
    except (RunnerImageError, docker.errors.DockerException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
