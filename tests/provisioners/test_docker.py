"""DockerProvisioner against a real engine: the container it makes, images and pulls, stop and
cleanup edge cases, cancellation races, and a busybox runner agent finishing a FakeGitHub job."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import requests
import urllib3.connectionpool
from pytest_mock import MockerFixture

from outrunner.config import DockerMount, RunnerConfig
from outrunner.provisioner import RunnerRequest
from outrunner.provisioners.docker import (
    JIT_ENV,
    DockerProvisioner,
    DockerProvisionerError,
    default_client,
)
from outrunner.testing.contract import runner_name
from outrunner.testing.fakegithub import FakeGitHub, JobState
from tests.provisioners.conftest import runner_config
from tests.provisioners.registry import Registry, serve_registry
from tests.testing.raw import raw_client

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

MIB = 1024 * 1024
# Not a tag anyone has locally; its registry refuses connections, so its pull fails at once.
UNPULLABLE = "127.0.0.1:1/outrunner/unpullable"
MISSING_IMAGE = f"{UNPULLABLE}:latest"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def provisioner(runner_image: str) -> AsyncIterator[DockerProvisioner]:
    async with DockerProvisioner() as p:
        yield p


class Clients:
    """A client_factory that builds real clients and spies on their image and create calls."""

    def __init__(self, mocker: MockerFixture) -> None:
        self._mocker = mocker
        self.made: list[tuple[str | None, docker.APIClient]] = []

    def __call__(self, url: str | None) -> docker.APIClient:
        client = default_client(url)
        for method in ("pull", "inspect_image", "create_container"):
            self._mocker.spy(client, method)
        self.made.append((url, client))
        return client

    def count(self, method: str) -> int:
        return sum(getattr(client, method).call_count for _, client in self.made)

    @property
    def pulls(self) -> int:
        return self.count("pull")


@pytest.fixture
def clients(mocker: MockerFixture) -> Clients:
    return Clients(mocker)


def request(scale_set: str, jit: str | None = None, **options: Any) -> RunnerRequest:
    runner = runner_config(scale_set, **options)
    return RunnerRequest(runner_name(scale_set), jit or f"jit-{secrets.token_hex(8)}", runner)


async def inspect(engine: docker.APIClient, name: str) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = await asyncio.to_thread(engine.inspect_container, name)
    except docker.errors.NotFound:
        return None
    return info


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# -- the container -----------------------------------------------------------------------------


async def test_container_with_jit_in_env(
    provisioner: DockerProvisioner,
    engine: docker.APIClient,
    scale_set: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A PAT in outrunner's own environment must not reach the container in any form.
    pat = "ghp_" + secrets.token_hex(16)
    monkeypatch.setenv("GITHUB_TOKEN", pat)
    (tmp_path / "rw").mkdir()
    (tmp_path / "ro").mkdir()
    mounts = (
        DockerMount(str(tmp_path / "rw"), "/cache"),
        DockerMount(str(tmp_path / "ro"), "/certs", read_only=True),
    )
    req = request(
        scale_set,
        mounts=mounts,
        cpus=0.5,
        memory=64,
        env={"FOO": "bar baz", "EMPTY": ""},
        user="runner",
        stop_timeout=3,
    )
    await provisioner.start(req)
    info = await inspect(engine, req.name)
    assert info is not None
    config, host = info["Config"], info["HostConfig"]

    assert info["Name"] == "/" + req.name
    assert info["State"]["Running"]
    assert config["Labels"]["outrunner"] == "true"
    assert config["Labels"]["outrunner.name"] == req.name
    assert config["Labels"]["outrunner.scaleset"] == scale_set
    assert config["Cmd"] == ["./idle.sh"]
    assert f"{JIT_ENV}={req.jit_config}" in config["Env"]
    assert {"FOO=bar baz", "EMPTY="} <= set(config["Env"])
    assert config["User"] == "runner"
    assert config["StopTimeout"] == 3
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == 64 * MIB
    assert host["NetworkMode"] == "none"
    assert host["AutoRemove"] is True
    assert host["Privileged"] is False
    assert not host.get("Runtime") or host["Runtime"] == "runc"
    assert sorted((m["Target"], m["Source"], m.get("ReadOnly", False)) for m in host["Mounts"]) == [
        ("/cache", str(tmp_path / "rw"), False),
        ("/certs", str(tmp_path / "ro"), True),
    ]
    assert pat not in json.dumps(info)

    await provisioner.stop(req.name)
    assert await inspect(engine, req.name) is None


async def test_container_with_jit_as_argument(
    provisioner: DockerProvisioner, engine: docker.APIClient, scale_set: str
) -> None:
    req = request(scale_set, jit_via="arg")
    await provisioner.start(req)
    info = await inspect(engine, req.name)
    assert info is not None
    assert info["Config"]["Cmd"] == ["./idle.sh", "--jitconfig", req.jit_config]
    assert not any(e.startswith(f"{JIT_ENV}=") for e in info["Config"]["Env"])
    await provisioner.stop(req.name)


async def test_host_network_runtime_and_kept_container(
    provisioner: DockerProvisioner, engine: docker.APIClient, scale_set: str
) -> None:
    req = request(scale_set, network="host", runtime="runc", auto_remove=False)
    await provisioner.start(req)
    info = await inspect(engine, req.name)
    assert info is not None
    host = info["HostConfig"]
    assert host["NetworkMode"] == "host"
    assert host["Runtime"] == "runc"
    assert host["AutoRemove"] is False
    assert host["Privileged"] is False
    assert not host["NanoCpus"]
    assert not host["Memory"]
    await provisioner.stop(req.name)
    assert await inspect(engine, req.name) is None


async def test_privileged(clients: Clients, engine: docker.APIClient, scale_set: str) -> None:
    req = request(scale_set, privileged=True)
    sent: list[dict[str, Any]] = []

    def spying(url: str | None) -> docker.APIClient:
        client = clients(url)
        create = client.create_container

        def record(*args: Any, **kwargs: Any) -> Any:
            sent.append(kwargs["host_config"])
            return create(*args, **kwargs)

        client.create_container = record  # type: ignore[method-assign]
        return client

    async with DockerProvisioner(client_factory=spying) as provisioner:
        try:
            await provisioner.start(req)
        except DockerProvisionerError as exc:
            # Sandboxed CI engines may lack capabilities a privileged container gets.
            assert "caps" in str(exc), exc  # noqa: PT017
        else:
            info = await inspect(engine, req.name)
            assert info is not None
            assert info["HostConfig"]["Privileged"] is True
            await provisioner.stop(req.name)
    assert sent[0]["Privileged"] is True
    assert await inspect(engine, req.name) is None


PROBE = """\
#!/bin/sh
# Reports what the runner process sees, then exits (the container removes itself).
{
  echo "uid=$(id -u)"
  echo "args=$*"
  echo "jit=${ACTIONS_RUNNER_INPUT_JITCONFIG:-}"
  echo "foo=${FOO:-}"
  if touch /probe/written 2>/dev/null; then echo "ro=writable"; else echo "ro=read-only"; fi
  echo "end"
} > /out/report
"""


@pytest.mark.parametrize("jit_via", ["env", "arg"])
async def test_what_the_runner_process_sees(
    provisioner: DockerProvisioner,
    engine: docker.APIClient,
    scale_set: str,
    tmp_path: Path,
    jit_via: str,
) -> None:
    probe, out = tmp_path / "probe", tmp_path / "out"
    probe.mkdir()
    out.mkdir()
    (probe / "probe.sh").write_text(PROBE)
    (probe / "probe.sh").chmod(0o755)
    out.chmod(0o777)  # the probe runs as uid 1001
    req = request(
        scale_set,
        runner_cmd="/probe/probe.sh",
        mounts=(DockerMount(str(probe), "/probe", read_only=True), DockerMount(str(out), "/out")),
        env={"FOO": "bar"},
        user="runner",
        jit_via=jit_via,
    )
    await provisioner.start(req)
    report = out / "report"

    async def reported() -> bool:
        return report.exists() and report.read_text().endswith("end\n")

    await wait_until(reported)
    lines = report.read_text().splitlines()
    assert "uid=1001" in lines
    assert "foo=bar" in lines
    assert "ro=read-only" in lines
    if jit_via == "env":
        assert f"jit={req.jit_config}" in lines
        assert "args=" in lines
    else:
        assert "jit=" in lines
        assert f"args=--jitconfig {req.jit_config}" in lines

    # It exited by itself and auto_remove took it away: stop has nothing left to do.
    async def exited() -> bool:
        return await provisioner.exited(req.name) and await inspect(engine, req.name) is None

    await wait_until(exited)
    await provisioner.stop(req.name)


async def test_exited_container_is_removed_by_stop_without_auto_remove(
    provisioner: DockerProvisioner, engine: docker.APIClient, scale_set: str
) -> None:
    req = request(scale_set, runner_cmd="/bin/true", auto_remove=False)
    await provisioner.start(req)
    await wait_until(lambda: provisioner.exited(req.name))
    info = await inspect(engine, req.name)
    assert info is not None
    assert info["State"]["Status"] == "exited"
    await provisioner.stop(req.name)
    assert await inspect(engine, req.name) is None


async def test_stop_sends_sigterm_then_kills_after_stop_timeout(
    provisioner: DockerProvisioner, engine: docker.APIClient, scale_set: str, tmp_path: Path
) -> None:
    # idle.sh exits on SIGTERM; a plain sleep as PID 1 has no handler, so the kernel ignores
    # SIGTERM for it and only the SIGKILL after stop_timeout ends it.
    (tmp_path / "stubborn.sh").write_text("#!/bin/sh\nexec sleep 1000\n")
    (tmp_path / "stubborn.sh").chmod(0o755)
    graceful = request(scale_set, stop_timeout=5)
    stubborn = request(
        scale_set,
        runner_cmd="/t/stubborn.sh",
        mounts=(DockerMount(str(tmp_path), "/t", read_only=True),),
        stop_timeout=1,
    )
    await asyncio.gather(provisioner.start(graceful), provisioner.start(stubborn))
    durations = {}
    for req in (graceful, stubborn):
        began = time.monotonic()
        await provisioner.stop(req.name)
        durations[req.name] = time.monotonic() - began
        assert await inspect(engine, req.name) is None
    assert durations[graceful.name] < 1.0
    assert 0.9 < durations[stubborn.name] < 3.0


async def test_start_failures_leave_nothing(
    provisioner: DockerProvisioner, engine: docker.APIClient, scale_set: str, tmp_path: Path
) -> None:
    cases = {
        "unknown runtime": request(scale_set, runtime="no-such-runtime"),
        "missing mount source": request(
            scale_set, mounts=(DockerMount(str(tmp_path / "absent"), "/x"),)
        ),
        "missing runner_cmd": request(scale_set, runner_cmd="/no/run.sh"),
        "bad user": request(scale_set, user="nobody-here"),
    }
    for what, req in cases.items():
        with pytest.raises(DockerProvisionerError) as caught:
            await provisioner.start(req)
        message = str(caught.value)
        assert req.name in message, what
        assert req.jit_config not in message, what
        assert await inspect(engine, req.name) is None, what


async def test_request_without_docker_section(provisioner: DockerProvisioner) -> None:
    runner = RunnerConfig(name="linux", labels=("linux",))
    with pytest.raises(DockerProvisionerError, match="no docker section"):
        await provisioner.start(RunnerRequest("linux-0a1b2c3d", "jit", runner))


async def test_jit_config_is_never_logged(
    provisioner: DockerProvisioner, scale_set: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="outrunner")
    ok = request(scale_set, jit_via="arg")
    failing = request(scale_set, runner_cmd="/no/run.sh")
    await provisioner.start(ok)
    with pytest.raises(DockerProvisionerError):
        await provisioner.start(failing)
    await provisioner.stop(ok.name)
    text = caplog.text + "".join(repr(getattr(r, "attrs", "")) for r in caplog.records)
    assert "Container started" in text
    assert ok.jit_config not in text
    assert failing.jit_config not in text


# -- images and pulls --------------------------------------------------------------------------


async def test_local_image_is_used_without_pulling(
    clients: Clients, engine: docker.APIClient, scale_set: str, runner_image: str
) -> None:
    async with DockerProvisioner(client_factory=clients) as provisioner:
        for pull in ("missing", "never"):
            req = request(scale_set, pull=pull)
            await provisioner.start(req)
            await provisioner.stop(req.name)
    assert clients.pulls == 0


async def test_burst_of_a_present_image_only_creates_and_starts(
    clients: Clients,
    engine: docker.APIClient,
    scale_set: str,
    runner_image: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # As `docker run`: the create is the image check, so a start makes two engine calls.
    caplog.set_level(logging.DEBUG, logger="outrunner")
    requests = [request(scale_set) for _ in range(10)]
    async with DockerProvisioner(client_factory=clients) as provisioner:
        await asyncio.gather(*(provisioner.start(r) for r in requests))
        for req in requests:
            info = await inspect(engine, req.name)
            assert info is not None
            assert info["State"]["Running"]
        assert clients.count("inspect_image") == 0
        assert clients.count("create_container") == 10
        assert clients.pulls == 0
        created = [r.attrs["name"] for r in caplog.records if r.getMessage() == "Container created"]  # type: ignore[attr-defined]
        assert sorted(created) == sorted(r.name for r in requests)
        await asyncio.gather(*(provisioner.stop(r.name) for r in requests))


async def test_engine_calls_reuse_their_connections(
    mocker: MockerFixture, scale_set: str, runner_image: str
) -> None:
    # The SDK's socket adapter pools connections by URL, so each call naming a new container
    # opened a connection of its own (2 per start); default_client keys the pool by engine.
    from docker.transport import unixconn

    connects = mocker.spy(unixconn.UnixHTTPConnection, "connect")
    client = default_client(None)
    if not str(client.base_url).startswith("http+docker://"):
        client.close()
        pytest.skip("the engine is not reached through a socket here")
    assert client.trust_env is False  # no proxy or netrc applies to a socket
    pool_full = mocker.spy(urllib3.connectionpool.log, "warning")  # "Connection pool is full"
    requests = [request(scale_set) for _ in range(6)]
    async with DockerProvisioner(client_factory=lambda url: client) as provisioner:
        for req in requests:  # one call at a time: one connection serves them all
            await provisioner.start(req)
            assert await provisioner.exited(req.name) is False
        for req in requests:
            await provisioner.stop(req.name)
        # 6 creates, 6 starts, 6 inspects and each stop's engine calls, plus the exit-event
        # stream, which holds a connection of its own while it is open.
        assert connects.call_count <= 3, connects.call_count
        adapter = client._custom_adapter  # type: ignore[attr-defined]
        assert len(adapter.pools) == 1
    assert pool_full.call_count == 0


@pytest.fixture
def unpullable_but_present(engine: docker.APIClient, runner_image: str) -> Iterator[str]:
    """The test runner image under a tag of the unreachable registry: present, not pullable."""
    tag = secrets.token_hex(4)
    engine.tag(runner_image, UNPULLABLE, tag)
    image = f"{UNPULLABLE}:{tag}"
    try:
        yield image
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            engine.remove_image(image)


@pytest.mark.parametrize("pull", ["missing", "always"])
async def test_failed_pull_is_a_clear_error(
    clients: Clients,
    engine: docker.APIClient,
    scale_set: str,
    unpullable_but_present: str,
    pull: str,
) -> None:
    # "always" pulls even an image that is present, and a failed pull fails the start.
    image = MISSING_IMAGE if pull == "missing" else unpullable_but_present
    req = request(scale_set, image=image, pull=pull)
    async with DockerProvisioner(client_factory=clients) as provisioner:
        with pytest.raises(DockerProvisionerError) as caught:
            await provisioner.start(req)
    message = str(caught.value)
    assert message.startswith(f"pull image {image}: ")
    assert len(message) > len(f"pull image {image}: ") + 10  # the engine's own reason follows
    assert clients.pulls == 1
    assert clients.count("create_container") == (1 if pull == "missing" else 0)
    assert await inspect(engine, req.name) is None


async def test_concurrent_starts_share_a_failed_pull(
    clients: Clients, engine: docker.APIClient, scale_set: str
) -> None:
    requests = [request(scale_set, image=MISSING_IMAGE) for _ in range(3)]
    async with DockerProvisioner(client_factory=clients) as provisioner:
        results = await asyncio.gather(
            *(provisioner.start(r) for r in requests), return_exceptions=True
        )
        assert clients.pulls == 1
        messages = {str(result) for result in results}
        assert len(messages) == 1
        assert messages.pop().startswith(f"pull image {MISSING_IMAGE}: ")
        assert all(isinstance(result, DockerProvisionerError) for result in results)
        # A later start tries again.
        with pytest.raises(DockerProvisionerError, match=f"pull image {MISSING_IMAGE}: "):
            await provisioner.start(request(scale_set, image=MISSING_IMAGE))
        assert clients.pulls == 2
    for req in requests:
        assert await inspect(engine, req.name) is None


async def test_pull_never_with_missing_image(
    clients: Clients, engine: docker.APIClient, scale_set: str
) -> None:
    req = request(scale_set, image=MISSING_IMAGE, pull="never")
    async with DockerProvisioner(client_factory=clients) as provisioner:
        with pytest.raises(DockerProvisionerError) as caught:
            await provisioner.start(req)
    assert str(caught.value) == (
        f"image {MISSING_IMAGE} is not present on the Docker engine and pull is never"
    )
    assert clients.pulls == 0
    assert clients.count("create_container") == 1
    assert await inspect(engine, req.name) is None


@pytest.fixture
def registry(engine: docker.APIClient) -> Iterator[Registry]:
    with serve_registry() as served:
        try:
            yield served
        finally:
            with contextlib.suppress(docker.errors.NotFound):
                engine.remove_image(served.image, force=True)


async def test_missing_image_is_pulled_with_progress_logged(
    clients: Clients,
    engine: docker.APIClient,
    scale_set: str,
    registry: Registry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="outrunner")
    requests = [request(scale_set, image=registry.image, runner_cmd="/bin/sh") for _ in range(5)]
    async with DockerProvisioner(client_factory=clients) as provisioner:
        # Five starts at once: each create finds the image missing; one pull, the others wait
        # for it and then create again.
        await asyncio.gather(*(provisioner.start(r) for r in requests))
        for req in requests:
            await provisioner.stop(req.name)
    assert clients.pulls == 1
    assert clients.count("inspect_image") == 0
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages.count(("INFO", "Pulling image")) == 1
    assert messages.count(("INFO", "Pulled image")) == 1
    assert messages.count(("INFO", "Container started")) == 5
    statuses = [r.attrs.get("status") for r in caplog.records if r.getMessage() == "Pull progress"]  # type: ignore[attr-defined]
    assert "Pull complete" in statuses
    assert any(r.startswith("GET /v2/outrunner/pulled/blobs/") for r in registry.requests)


async def test_pull_always_shares_a_running_pull_only(
    clients: Clients, engine: docker.APIClient, scale_set: str, registry: Registry
) -> None:
    def always() -> RunnerRequest:
        return request(scale_set, image=registry.image, runner_cmd="/bin/sh", pull="always")

    burst, later = [always() for _ in range(5)], always()
    async with DockerProvisioner(client_factory=clients) as provisioner:
        await asyncio.gather(*(provisioner.start(r) for r in burst))
        assert clients.pulls == 1  # the starts that came while it ran waited for it
        assert clients.count("create_container") == 5
        await provisioner.start(later)  # after that pull ended: "always" pulls again
        assert clients.pulls == 2
        for req in [*burst, later]:
            await provisioner.stop(req.name)


async def test_image_gone_again_after_its_pull_is_a_clear_error(
    mocker: MockerFixture, engine: docker.APIClient, scale_set: str, registry: Registry
) -> None:
    def vanishing_image(url: str | None) -> docker.APIClient:
        client = default_client(url)
        pull = client.pull

        def pull_then_lose_it(*args: Any, **kwargs: Any) -> Any:
            yield from pull(*args, **kwargs)
            client.remove_image(registry.image)  # someone removes it right after the pull

        mocker.patch.object(client, "pull", side_effect=pull_then_lose_it)
        return client

    req = request(scale_set, image=registry.image, runner_cmd="/bin/sh")
    async with DockerProvisioner(client_factory=vanishing_image) as provisioner:
        with pytest.raises(DockerProvisionerError) as caught:
            await provisioner.start(req)
    assert str(caught.value).startswith(
        f"image {registry.image} is not present on the Docker engine after it was pulled: "
    )
    assert await inspect(engine, req.name) is None


@pytest.mark.parametrize("during", ["pull", "second create"])
async def test_cancel_while_pulling_or_creating_after_the_pull(
    mocker: MockerFixture, engine: docker.APIClient, scale_set: str, registry: Registry, during: str
) -> None:
    inside = threading.Event()
    creates = 0

    def slow_engine(url: str | None) -> docker.APIClient:
        # An engine that takes its time in one call (test double, not the provisioner).
        client = default_client(url)
        pull, create = client.pull, client.create_container

        def slow_pull(*args: Any, **kwargs: Any) -> Any:
            if during == "pull":
                inside.set()
                time.sleep(0.5)
            return pull(*args, **kwargs)

        def slow_create(*args: Any, **kwargs: Any) -> Any:
            nonlocal creates
            creates += 1
            if during == "second create" and creates == 2:
                inside.set()
                time.sleep(0.5)
            return create(*args, **kwargs)

        mocker.patch.object(client, "pull", side_effect=slow_pull)
        mocker.patch.object(client, "create_container", side_effect=slow_create)
        return client

    req = request(scale_set, image=registry.image, runner_cmd="/bin/sh")
    async with DockerProvisioner(client_factory=slow_engine) as provisioner:
        task = asyncio.create_task(provisioner.start(req))
        await wait_until(lambda: asyncio.sleep(0, inside.is_set()))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await inspect(engine, req.name) is None
        # Nothing is held: the next start pulls (if the cancelled pull did not finish) and runs.
        again = request(scale_set, image=registry.image, runner_cmd="/bin/sh")
        await provisioner.start(again)
        await provisioner.stop(again.name)


async def test_pull_failing_midway_is_a_clear_error(
    clients: Clients, engine: docker.APIClient, scale_set: str, registry: Registry
) -> None:
    registry.blobs_missing = True  # the engine accepts the pull, then the layers are missing
    req = request(scale_set, image=registry.image)
    async with DockerProvisioner(client_factory=clients) as provisioner:
        with pytest.raises(DockerProvisionerError, match=f"pull image {registry.image}: "):
            await provisioner.start(req)
    assert await inspect(engine, req.name) is None


# -- stop, cleanup and ownership ---------------------------------------------------------------


async def test_stop_and_cleanup_leave_foreign_containers_alone(
    provisioner: DockerProvisioner, engine: docker.APIClient, scale_set: str, runner_image: str
) -> None:
    name = runner_name(scale_set)
    await asyncio.to_thread(engine.create_container, runner_image, ["./idle.sh"], name=name)
    await provisioner.stop(name)
    assert await provisioner.cleanup(f"{scale_set}-") == []
    assert await inspect(engine, name) is not None


async def test_cleanup_after_restart_finds_orphans(
    engine: docker.APIClient, scale_set: str, runner_image: str
) -> None:
    requests = [request(scale_set) for _ in range(2)]
    neighbour = request(f"{scale_set}-arm")
    async with DockerProvisioner() as first:  # the run that crashed, leaving its containers
        await asyncio.gather(*(first.start(r) for r in [*requests, neighbour]))
    async with DockerProvisioner() as second:
        removed = await second.cleanup(f"{scale_set}-")
        assert removed == sorted(r.name for r in requests)
        assert await inspect(engine, neighbour.name) is not None
        assert await second.cleanup(f"{scale_set}-") == []
        await second.stop(neighbour.name)  # stop works for containers of an earlier run too
    assert await inspect(engine, neighbour.name) is None


# -- concurrency and cancellation --------------------------------------------------------------


async def test_cancel_while_create_is_still_running_in_its_thread(
    mocker: MockerFixture, engine: docker.APIClient, scale_set: str, runner_image: str
) -> None:
    created = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_engine(url: str | None) -> docker.APIClient:
        client = default_client(url)
        create = client.create_container

        def slow_create(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.5)  # an engine that takes its time (test double, not the provisioner)
            result = create(*args, **kwargs)
            loop.call_soon_threadsafe(created.set)
            return result

        mocker.patch.object(client, "create_container", side_effect=slow_create)
        return client

    req = request(scale_set)
    async with DockerProvisioner(client_factory=slow_engine) as provisioner:
        task = asyncio.create_task(provisioner.start(req))
        await asyncio.sleep(0.2)  # inside the slow create
        assert not created.is_set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert created.is_set(), "start returned before the create it launched had finished"
        assert await inspect(engine, req.name) is None


async def test_one_client_per_endpoint_and_stop_uses_the_runners_engine(
    mocker: MockerFixture, engine: docker.APIClient, scale_set: str, runner_image: str
) -> None:
    factory = mocker.Mock(side_effect=default_client)
    socket = "unix:///var/run/docker.sock"
    async with DockerProvisioner(client_factory=factory) as provisioner:
        default, explicit = request(scale_set), request(scale_set, host=socket)
        await asyncio.gather(provisioner.start(default), provisioner.start(explicit))
        await provisioner.stop(explicit.name)
        await provisioner.stop(default.name)
    assert [call.args for call in factory.call_args_list] in (
        [(None,), (socket,)],
        [(socket,), (None,)],
    )


async def test_closed_provisioner_refuses_work(scale_set: str, runner_image: str) -> None:
    provisioner = DockerProvisioner()
    await provisioner.close()
    with pytest.raises(DockerProvisionerError, match="closed"):
        await provisioner.start(request(scale_set))
    with pytest.raises(DockerProvisionerError, match="closed"):
        await provisioner.stop(runner_name(scale_set))


# -- a real runner agent ------------------------------------------------------------------------


@pytest.mark.parametrize("jit_via", ["env", "arg"])
async def test_agent_in_container_completes_a_job(
    provisioner: DockerProvisioner, engine: docker.APIClient, scale_set: str, jit_via: str
) -> None:
    with FakeGitHub(long_poll_timeout=0.3) as gh, raw_client(gh) as raw:
        scale_set_id = raw.create_scale_set(scale_set, labels=["linux"])
        session = raw.create_session(scale_set_id)
        name = runner_name(scale_set)
        jit = gh.generate_jit_config(scale_set_id, name)
        # Host networking: the agent in the container reaches the fake on 127.0.0.1.
        runner = runner_config(scale_set, runner_cmd="./run.sh", network="host", jit_via=jit_via)
        await provisioner.start(RunnerRequest(name, jit, runner))
        job = gh.queue_job(["linux"], duration=0.1, display_name="contained build")
        assert (await asyncio.to_thread(raw.poll, session)).status_code == 200
        await gh.wait_for_async(lambda: gh.job(job).state is JobState.COMPLETED, timeout=20)
        assert gh.job(job).result == "succeeded"
        await wait_until(lambda: provisioner.exited(name))
        await provisioner.stop(name)
        assert await inspect(engine, name) is None


async def test_stop_waits_out_a_removal_already_in_progress(
    mocker: MockerFixture, engine: docker.APIClient, scale_set: str, runner_image: str
) -> None:
    conflict = requests.Response()
    conflict.status_code = 409
    calls: list[str] = []

    def engine_busy_removing(url: str | None) -> docker.APIClient:
        client = default_client(url)
        remove = client.remove_container

        def remove_after_two_conflicts(container: str, **kwargs: Any) -> None:
            calls.append(container)
            if len(calls) <= 2:
                raise docker.errors.APIError(
                    "removal of container is already in progress", response=conflict
                )
            remove(container, **kwargs)

        mocker.patch.object(client, "remove_container", side_effect=remove_after_two_conflicts)
        return client

    req = request(scale_set)
    async with DockerProvisioner(client_factory=engine_busy_removing) as provisioner:
        await provisioner.start(req)
        await provisioner.stop(req.name)
    assert len(calls) == 3
    assert await inspect(engine, req.name) is None


# -- exits and adoption ------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
EVENTS_THREAD = "outrunner-docker-events"


def event_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == EVENTS_THREAD]


async def still_waiting(task: asyncio.Task[None], seconds: float = 0.3) -> bool:
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if done:
        task.result()
    return not done


async def test_wait_exited_when_the_runner_exits_by_itself(
    provisioner: DockerProvisioner, engine: docker.APIClient, scale_set: str, tmp_path: Path
) -> None:
    # A runner that finishes on its own a moment after it started, as after its job.
    (tmp_path / "brief.sh").write_text("#!/bin/sh\nsleep 0.5\n")
    (tmp_path / "brief.sh").chmod(0o755)
    mounts = (DockerMount(str(tmp_path), "/t", read_only=True),)
    kept = request(scale_set, runner_cmd="/t/brief.sh", mounts=mounts, auto_remove=False)
    removed = request(scale_set, runner_cmd="/t/brief.sh", mounts=mounts)
    await asyncio.gather(provisioner.start(kept), provisioner.start(removed))
    # Two waiters on one name, one on another: one event stream serves them all.
    waiters = [asyncio.create_task(provisioner.wait_exited(r.name)) for r in (kept, kept, removed)]
    await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert len(event_threads()) == 1
    info = await inspect(engine, kept.name)
    assert info is not None
    assert info["State"]["Status"] == "exited"
    assert await provisioner.exited(kept.name)
    await provisioner.wait_exited(kept.name)  # ended already: returns at once
    await provisioner.stop(kept.name)
    await provisioner.stop(removed.name)
    assert await inspect(engine, kept.name) is None


async def test_a_runner_it_started_is_watched_without_asking_the_engine(
    mocker: MockerFixture, engine: docker.APIClient, scale_set: str, tmp_path: Path
) -> None:
    # In a burst, an inspect per runner would queue between the creates and starts of the
    # runners after it. The stream, open before the start, tells of the exit instead: while
    # the waiter waits, or (a runner that ended at once) before the wait began.
    for script, body in (("brief.sh", "sleep 0.5"), ("quick.sh", "exit 0")):
        (tmp_path / script).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / script).chmod(0o755)
    mounts = (DockerMount(str(tmp_path), "/t", read_only=True),)
    clients: list[docker.APIClient] = []

    def factory(url: str | None) -> docker.APIClient:
        client = default_client(url)
        mocker.patch.object(client, "inspect_container", wraps=client.inspect_container)
        clients.append(client)
        return client

    async with DockerProvisioner(client_factory=factory) as provisioner:
        first = request(scale_set, runner_cmd="/t/brief.sh", mounts=mounts)
        await provisioner.start(first)  # opens the engine's exit stream
        (watcher,) = provisioner._exit_events.values()
        await wait_until(lambda: asyncio.sleep(0, watcher._subscribed))
        brief = request(scale_set, runner_cmd="/t/brief.sh", mounts=mounts)
        quick = request(scale_set, runner_cmd="/t/quick.sh", mounts=mounts, auto_remove=False)
        await provisioner.start(brief)
        await provisioner.start(quick)

        async def quick_exited() -> bool:
            info = await inspect(engine, quick.name)  # the test's own client
            return info is not None and info["State"]["Status"] == "exited"

        await wait_until(quick_exited)
        (client,) = clients
        client.inspect_container.reset_mock()
        waits = (provisioner.wait_exited(brief.name), provisioner.wait_exited(quick.name))
        await asyncio.wait_for(asyncio.gather(*waits), 10)
        assert client.inspect_container.call_count == 0
        assert await provisioner.exited(brief.name)
        for req in (first, brief, quick):
            await provisioner.stop(req.name)
    assert watcher._started == {}  # nothing noted is left, ended or not


async def test_event_stream_thread_ends_with_close(
    engine: docker.APIClient, scale_set: str
) -> None:
    await asyncio.to_thread(engine.ping)  # the test's own helper thread is part of the baseline
    baseline = threading.active_count()
    provisioner = DockerProvisioner()
    req = request(scale_set)
    await provisioner.start(req)
    waiting = asyncio.create_task(provisioner.wait_exited(req.name))
    assert await still_waiting(waiting)
    assert len(event_threads()) == 1
    await provisioner.close()
    # No thread left behind, and a waiter learns that nobody watches any more.
    assert event_threads() == []
    with pytest.raises(DockerProvisionerError, match="closed"):
        await waiting
    with pytest.raises(DockerProvisionerError, match="closed"):
        await provisioner.wait_exited(req.name)
    assert await inspect(engine, req.name) is not None  # close leaves containers alone
    deadline = time.monotonic() + 5  # the pool's threads end once they see the shutdown
    while threading.active_count() > baseline:
        assert time.monotonic() < deadline, [t.name for t in threading.enumerate()]
        await asyncio.sleep(0.02)


class FlakyEvents:
    """A client_factory whose clients' event stream the test can break, with the engine then
    unreachable once (a refused subscription) and unreachable again until ``back`` is set."""

    def __init__(self, mocker: MockerFixture) -> None:
        self._mocker = mocker
        self.streams: list[Any] = []
        self.calls = 0
        self.back = threading.Event()

    def __call__(self, url: str | None) -> docker.APIClient:
        client = default_client(url)
        subscribe = client.events

        def events(**kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == 2:
                raise requests.ConnectionError("engine restarting")
            if self.calls > 2:
                self.back.wait(10)  # blocks only the provisioner's event thread
            stream = subscribe(**kwargs)
            self.streams.append(stream)
            return stream

        self._mocker.patch.object(client, "events", side_effect=events)
        return client


async def test_wait_exited_survives_a_broken_event_stream(
    mocker: MockerFixture,
    engine: docker.APIClient,
    scale_set: str,
    runner_image: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="outrunner")
    flaky = FlakyEvents(mocker)
    req = request(scale_set, auto_remove=False)
    try:
        async with DockerProvisioner(client_factory=flaky) as provisioner:
            await provisioner.start(req)
            waiting = asyncio.create_task(provisioner.wait_exited(req.name))
            await wait_until(lambda: asyncio.sleep(0, len(flaky.streams) == 1))
            flaky.streams[0].close()  # as when the engine restarts
            await wait_until(lambda: asyncio.sleep(0, flaky.calls == 3))
            # The runner exits while nothing listens: no event will ever tell of it.
            await asyncio.to_thread(engine.kill, req.name, "SIGTERM")
            await wait_until(lambda: provisioner.exited(req.name))
            assert await still_waiting(waiting), "released without the engine telling"
            flaky.back.set()
            await asyncio.wait_for(waiting, 10)  # the new subscription looks again
            await provisioner.stop(req.name)
    finally:
        flaky.back.set()
    # One warning for the outage, however many subscriptions failed during it.
    assert [
        (r.levelname, r.getMessage()) for r in caplog.records if "stream" in r.getMessage()
    ] == [
        ("WARNING", "Docker event stream broken, subscribing again"),
        ("INFO", "Docker event stream subscribed again"),
    ]
    assert await inspect(engine, req.name) is None


async def test_adopt_uses_the_runners_engine(
    mocker: MockerFixture, engine: docker.APIClient, scale_set: str, runner_image: str
) -> None:
    socket = "unix:///var/run/docker.sock"
    req = request(scale_set, host=socket)
    async with DockerProvisioner() as first:
        await first.start(req)
    factory = mocker.Mock(side_effect=default_client)
    async with DockerProvisioner(client_factory=factory) as second:
        assert await second.adopt(req.name, req.runner)
        assert not await second.exited(req.name)
        await second.stop(req.name)
    # Only the runner's engine was asked, never the default one.
    assert [call.args for call in factory.call_args_list] == [(socket,)]
    assert await inspect(engine, req.name) is None


async def test_adopt_refuses_what_is_not_a_live_runner_of_the_scale_set(
    provisioner: DockerProvisioner,
    engine: docker.APIClient,
    scale_set: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ended = request(scale_set, runner_cmd="/bin/true", auto_remove=False)
    other_set = request(scale_set)
    await asyncio.gather(provisioner.start(ended), provisioner.start(other_set))
    await wait_until(lambda: provisioner.exited(ended.name))
    async with DockerProvisioner() as fresh:
        # An ended runner: False, and stop then removes the leftover.
        assert await fresh.adopt(ended.name, ended.runner) is False
        await fresh.stop(ended.name)
        assert await inspect(engine, ended.name) is None
        # Outrunner's container, but labelled for another scale set: not touched.
        assert await fresh.adopt(other_set.name, runner_config(f"{scale_set}x")) is False
        assert "Not adopting a container outrunner did not create for this scale set" in [
            r.getMessage() for r in caplog.records
        ]
        info = await inspect(engine, other_set.name)
        assert info is not None
        assert info["State"]["Running"]
    await provisioner.stop(other_set.name)


OUTRUNNER_THAT_CRASHES = """\
import asyncio, sys
from outrunner.provisioner import RunnerRequest
from outrunner.provisioners.docker import DockerProvisioner
from tests.provisioners.conftest import runner_config

async def main(name, scale_set):
    provisioner = DockerProvisioner()
    runner = runner_config(scale_set, auto_remove=False)
    await provisioner.start(RunnerRequest(name, "jit", runner))
    watching = asyncio.ensure_future(provisioner.wait_exited(name))  # an open event stream too
    print("started", flush=True)
    await watching

asyncio.run(main(*sys.argv[1:]))
"""


async def test_container_outlives_a_killed_outrunner_and_is_adopted(
    engine: docker.APIClient, scale_set: str, runner_image: str
) -> None:
    name = runner_name(scale_set)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        OUTRUNNER_THAT_CRASHES,
        name,
        scale_set,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 30) == b"started\n"
    finally:
        process.kill()  # SIGKILL: nothing of that outrunner runs any more
        await process.wait()
    assert process.returncode == -signal.SIGKILL

    async with DockerProvisioner() as restarted:
        assert await restarted.adopt(name, runner_config(scale_set)) is True
        waiting = asyncio.create_task(restarted.wait_exited(name))
        assert await still_waiting(waiting), "the runner did not survive its outrunner"
        await asyncio.to_thread(engine.kill, name, "SIGTERM")  # the runner process ends
        await asyncio.wait_for(waiting, 10)
        assert await restarted.exited(name)
        await restarted.stop(name)
    assert await inspect(engine, name) is None
