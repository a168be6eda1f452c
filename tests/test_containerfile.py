"""packaging/Containerfile builds offline and the image runs outrunner as documented.

No registry is reachable here, so the image is built ``FROM`` a Python base made from this
machine's own interpreter (tests/support/python_image.py, cached by content), with
``docker build --network none`` and pip confined to the wheelhouse (``make wheelhouse``), which
is copied into the build context next to the working tree's files. The legacy builder is used
(``DOCKER_BUILDKIT=0``): it needs no buildx plugin and honours ``--network none``.

The images built here are removed at the end; the base image stays for the next run.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from outrunner import __version__
from tests.support.install import (
    WheelhouseMissing,
    check_wheelhouse,
    copy_sources,
    run,
    sample_config,
    write_broken_config,
)
from tests.support.python_image import PythonImageError, ensure_python_image

pytestmark = [pytest.mark.docker, pytest.mark.slow]

EX_CONFIG = 78
CONFIG_IN_IMAGE = "/etc/outrunner/config.yml"


def _docker_env() -> dict[str, str]:
    return {**os.environ, "DOCKER_BUILDKIT": "0"}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        wheelhouse = check_wheelhouse()
    except WheelhouseMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    if shutil.which("docker") is None:
        pytest.fail("the docker command is missing (apt-get install docker.io)", pytrace=False)
    try:
        base = ensure_python_image()
    except PythonImageError as exc:
        pytest.fail(f"cannot make the Python base image: {exc}", pytrace=False)
    context = copy_sources(tmp_path_factory.mktemp("context"))
    shutil.copytree(wheelhouse, context / "wheelhouse")
    tag = f"outrunner-test-containerfile:{secrets.token_hex(4)}"
    build = [
        "docker", "build", "--quiet", "--network", "none",
        "-f", str(context / "packaging" / "Containerfile"),
        "--build-arg", f"PYTHON_IMAGE={base}",
        "--build-arg", "PIP_NO_INDEX=1",
        "--build-arg", "PIP_FIND_LINKS=/src/wheelhouse",
    ]  # fmt: skip
    # The build stage tagged too, so that removing both tags leaves no untagged image behind
    # (the second build takes that stage from the cache).
    tags = [f"{tag}-build", tag]
    try:
        run([*build, "--target", "build", "-t", tags[0], str(context)], env=_docker_env())
        run([*build, "-t", tag, str(context)], env=_docker_env())
        yield tag
    finally:
        subprocess.run(["docker", "rmi", *tags], capture_output=True, check=False)


def _docker_run(
    image: str, argv: Sequence[str], *, options: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "run", "--rm", "--network", "none", *options, image, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _readable_copy(config: Path, directory: Path) -> Path:
    """A copy the image's non-root user can read through a bind mount."""
    copy = directory / "mounted.yml"
    shutil.copyfile(config, copy)
    copy.chmod(0o644)
    return copy


def test_version(image: str) -> None:
    done = _docker_run(image, ["--version"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"outrunner {__version__}"


def test_the_image_runs_outrunner_as_a_service_would(image: str) -> None:
    config = json.loads(run(["docker", "image", "inspect", image]).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["outrunner"]
    assert config["User"] == "10001:10001"
    assert config["StopSignal"] == "SIGTERM"
    assert "/var/lib/outrunner" in config["Volumes"]
    assert f"OUTRUNNER_CONFIG={CONFIG_IN_IMAGE}" in config["Env"]
    assert "OUTRUNNER_STATE_DIR=/var/lib/outrunner" in config["Env"]
    # The non-root user can write its journal to the state volume (a fresh one here).
    probe = _docker_run(
        image,
        ["-c", "import os; open('/var/lib/outrunner/probe', 'w').close(); print(os.getuid())"],
        options=["--entrypoint", "python3"],
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "10001"


def test_check_accepts_the_sample_config(image: str, tmp_path: Path) -> None:
    config = _readable_copy(sample_config(tmp_path), tmp_path)
    done = _docker_run(
        image,
        ["--check"],
        options=["-e", "GITHUB_TOKEN=ghp_dummy", "-v", f"{config}:{CONFIG_IN_IMAGE}:ro"],
    )
    assert done.returncode == 0, done.stderr
    assert "token from GITHUB_TOKEN" in done.stdout
    assert "ghp_dummy" not in done.stdout + done.stderr
    assert "Warning" not in done.stderr, done.stderr  # e.g. a dependency that fails to import


def test_check_rejects_a_broken_config_with_ex_config(image: str, tmp_path: Path) -> None:
    config = write_broken_config(tmp_path / "broken.yml")
    config.chmod(0o644)
    done = _docker_run(
        image,
        ["--check"],
        options=["-e", "GITHUB_TOKEN=ghp_dummy", "-v", f"{config}:{CONFIG_IN_IMAGE}:ro"],
    )
    assert done.returncode == EX_CONFIG, done.stdout + done.stderr
    assert done.stderr.startswith("outrunner: error:"), done.stderr


def test_demo_runs_jobs_in_the_image(image: str) -> None:
    # The whole service path (fake GitHub on the container's loopback, scaler, agents) with
    # in-memory environments: no Docker socket is mounted here.
    done = _docker_run(image, ["demo", "--backend", "memory", "--jobs", "2"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict:             OK" in done.stdout
