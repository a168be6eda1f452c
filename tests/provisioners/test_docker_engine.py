"""Engine endpoint resolution: runner option, provisioner host, DOCKER_HOST, docker context."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from outrunner.config import DockerImage, RunnerConfig
from outrunner.provisioner import RunnerRequest
from outrunner.provisioners.docker import (
    DockerProvisioner,
    DockerProvisionerError,
    EngineEndpoint,
    resolve_engine,
)


@pytest.fixture
def listening_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "engine.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        yield path


def write_context(config_dir: Path, name: str, host: str, *, current: bool = True) -> None:
    meta = config_dir / "contexts" / "meta" / hashlib.sha256(name.encode()).hexdigest()
    meta.mkdir(parents=True)
    (meta / "meta.json").write_text(
        json.dumps({"Name": name, "Endpoints": {"docker": {"Host": host}}})
    )
    if current:
        (config_dir / "config.json").write_text(json.dumps({"currentContext": name}))


def test_precedence(tmp_path: Path, listening_socket: Path) -> None:
    write_context(tmp_path, "colima", f"unix://{listening_socket}")
    env = {"DOCKER_CONFIG": str(tmp_path), "DOCKER_HOST": "tcp://10.0.0.1:2375"}
    option = "ssh://builder@10.0.0.2"
    assert resolve_engine(option, default="tcp://p:1", environ=env) == EngineEndpoint(
        option, "docker.host"
    )
    assert resolve_engine("", default="tcp://p:1", environ=env) == EngineEndpoint(
        "tcp://p:1", "provisioner"
    )
    assert resolve_engine("", environ=env) == EngineEndpoint("tcp://10.0.0.1:2375", "DOCKER_HOST")
    del env["DOCKER_HOST"]
    assert resolve_engine("", environ=env) == EngineEndpoint(
        f"unix://{listening_socket}", "docker context colima"
    )


def test_docker_context_variable_beats_current_context(
    tmp_path: Path, listening_socket: Path
) -> None:
    write_context(tmp_path, "desktop", "unix:///nonexistent/docker.sock")
    write_context(tmp_path, "remote", "ssh://me@build", current=False)
    env = {"DOCKER_CONFIG": str(tmp_path)}
    # The current context's socket is gone (a stopped Docker Desktop): fall back to the default.
    assert resolve_engine("", environ=env) == EngineEndpoint(None, "default")
    env["DOCKER_CONTEXT"] = "remote"
    assert resolve_engine("", environ=env) == EngineEndpoint(
        "ssh://me@build", "docker context remote"
    )


@pytest.mark.parametrize(
    "config",
    [None, "", "{not json", '["a list"]', '{"currentContext": "default"}', '{"currentContext": 5}'],
)
def test_no_usable_context_means_the_default(tmp_path: Path, config: str | None) -> None:
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    assert resolve_engine("", environ={"DOCKER_CONFIG": str(tmp_path)}) == EngineEndpoint(
        None, "default"
    )


def test_context_without_meta_or_host(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"currentContext": "ghost"}')
    env = {"DOCKER_CONFIG": str(tmp_path)}
    assert resolve_engine("", environ=env).url is None
    write_context(tmp_path, "empty", "", current=True)
    assert resolve_engine("", environ=env).url is None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_unreachable_engine_is_a_clear_error(tmp_path: Path) -> None:
    runner = RunnerConfig(name="linux", labels=("linux",), docker=DockerImage(image="x"))
    absent = f"unix://{tmp_path}/no-engine.sock"
    async with DockerProvisioner(host=absent) as provisioner:
        with pytest.raises(DockerProvisionerError) as caught:
            await provisioner.start(RunnerRequest("linux-0a1b2c3d", "jit", runner))
    assert str(caught.value).startswith(
        f"cannot reach the Docker engine at {absent} (from provisioner): "
    )


@pytest.mark.anyio
async def test_adopt_with_unreachable_engine_raises(tmp_path: Path) -> None:
    # A restarted outrunner cannot tell whether its runners live: it must not say "gone".
    absent = f"unix://{tmp_path}/no-engine.sock"
    runner = RunnerConfig(
        name="linux", labels=("linux",), docker=DockerImage(image="x", host=absent)
    )
    async with DockerProvisioner() as provisioner:
        with pytest.raises(DockerProvisionerError, match="cannot reach the Docker engine"):
            await provisioner.adopt("linux-0a1b2c3d", runner)


def test_for_runner_takes_the_runners_engine() -> None:
    runner = RunnerConfig(
        name="linux", labels=("linux",), docker=DockerImage(image="x", host="tcp://h:2375")
    )
    provisioner = DockerProvisioner.for_runner(runner)
    assert provisioner._default_host == "tcp://h:2375"
    assert DockerProvisioner.for_runner(RunnerConfig(name="x"))._default_host is None
