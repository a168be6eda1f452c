"""The offline-built busybox test runner image."""

from __future__ import annotations

import contextlib
import io
import shutil
import tarfile
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from pytest_mock import MockerFixture

from outrunner.testing import runner_image
from outrunner.testing.runner_image import IMAGE_LABEL, ensure_runner_image, main


def image_info(engine: docker.APIClient, tag: str) -> Any:
    inspect: Any = engine.inspect_image  # untyped in types-docker
    return inspect(tag)


def test_static_busybox_is_recognised(tmp_path: Path) -> None:
    assert runner_image._is_static_elf("/bin/busybox")
    dynamic = shutil.which("ls") or "/bin/ls"
    assert not runner_image._is_static_elf(dynamic)  # has a PT_INTERP
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert not runner_image._is_static_elf(str(tmp_path / "script"))
    assert not runner_image._is_static_elf(str(tmp_path / "absent"))


def _members(busybox: str | None) -> dict[str, tarfile.TarInfo]:
    context, _ = runner_image._build_context(busybox)
    with tarfile.open(fileobj=io.BytesIO(context.getvalue())) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_build_context_from_scratch() -> None:
    members = _members("/bin/busybox")
    assert members["runner/run.sh"].mode == 0o755
    assert members["rootfs/tmp"].mode == 0o1777
    assert members["rootfs/bin/sh"].linkname == "busybox"
    assert "rootfs/bin/busybox" in members
    assert members["rootfs/bin/busybox"].isfile()  # the binary, never a link to itself
    for applet in ("wget", "base64", "sed", "sleep", "printf", "cat"):
        assert members[f"rootfs/bin/{applet}"].issym(), applet


def test_build_context_fallback_without_static_busybox() -> None:
    context, _ = runner_image._build_context(None)
    with tarfile.open(fileobj=io.BytesIO(context.getvalue())) as tar:
        dockerfile = tar.extractfile("Dockerfile")
        assert dockerfile is not None
        assert dockerfile.read().startswith(b"FROM busybox:stable\n")
        assert not any(name.startswith("rootfs") for name in tar.getnames())


def test_recipe_is_stable_and_follows_the_inputs() -> None:
    _, first = runner_image._build_context("/bin/busybox")
    _, again = runner_image._build_context("/bin/busybox")
    _, fallback = runner_image._build_context(None)
    assert first == again
    assert first != fallback


@pytest.mark.docker
def test_image_is_reused_while_current(
    engine: docker.APIClient, runner_image: str, mocker: MockerFixture
) -> None:
    build = mocker.spy(engine, "build")
    assert ensure_runner_image(engine) == runner_image
    assert build.call_count == 0
    high_level = docker.DockerClient(version="auto")
    try:
        assert ensure_runner_image(high_level) == runner_image  # the .api client is used
    finally:
        high_level.close()
    info = image_info(engine, runner_image)
    assert info["Config"]["Labels"][IMAGE_LABEL] == "true"
    assert info["Config"]["WorkingDir"] == "/home/runner"


@pytest.mark.docker
def test_other_tag_and_cli(
    engine: docker.APIClient, runner_image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tag = "outrunner-test-runner:cli-check"
    try:
        assert main(["--tag", tag, "--rebuild"]) == 0
        assert capsys.readouterr().out == f"{tag}\n"
        assert image_info(engine, tag)["Id"] == image_info(engine, runner_image)["Id"]
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            engine.remove_image(tag)
