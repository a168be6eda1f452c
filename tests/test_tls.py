"""TLS against a real HTTPS server on 127.0.0.1 with a certificate made for the test.

By default the client trusts the system trust store, so a self-signed certificate fails, at once
(a certificate that does not verify now will not verify on a retry) and with an error that says
"certificate" and names the URL; ``ca_file`` trusts a private CA instead of the system store, and
reaches the client from the config through the Service.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from outrunner.config import Config, DockerImage, RunnerConfig
from outrunner.scaleset import (
    Client,
    PersonalAccessToken,
    RetryPolicy,
    ScaleSetError,
    TLSVerificationError,
)
from outrunner.service import Service
from outrunner.testing import FakeGitHub, InMemoryProvisioner
from tests.scaleset.conftest import (
    RecordingSleep,
    _no_proxy_env,  # noqa: F401 (autouse: loopback traffic must not reach a proxy)
    script_auth,
)
from tests.scaleset.scripted_server import (
    Certificate,
    Reply,
    ScriptedServer,
    self_signed_certificate,
)

pytestmark = pytest.mark.anyio

TENANT = "/tenant/123"
RUNNER = f"{TENANT}/_apis/distributedtask/pools/0/agents/7"
SESSIONS = f"{TENANT}/_apis/runtime/runnerscalesets/5/sessions"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Certificate, Certificate]:
    """The server's certificate, and an unrelated one."""
    directory = tmp_path_factory.mktemp("certs")
    return self_signed_certificate(directory), self_signed_certificate(directory, "other")


@pytest.fixture
def https(certs: tuple[Certificate, Certificate]) -> Iterator[ScriptedServer]:
    with ScriptedServer(tls=certs[0].server_context()) as server:
        script_auth(server)
        yield server


@pytest.fixture
def sleeps() -> RecordingSleep:
    return RecordingSleep()


def client(server: ScriptedServer, sleeps: RecordingSleep, **kwargs: object) -> Client:
    return Client(
        f"{server.url}/org/repo",
        PersonalAccessToken("ghp_tlsTestToken"),
        retry=RetryPolicy(sleep=sleeps),
        **kwargs,  # type: ignore[arg-type]
    )


async def test_default_client_refuses_a_self_signed_certificate_without_retrying(
    https: ScriptedServer, sleeps: RecordingSleep
) -> None:
    async with client(https, sleeps) as c:
        with pytest.raises(TLSVerificationError) as caught:
            await c.get_runner(7)
    message = str(caught.value)
    token_url = f"{https.url}/api/v3/repos/org/repo/actions/runners/registration-token"
    assert message == (
        f"request POST {token_url} failed: TLS certificate verification failed: "
        "self-signed certificate (trusted roots: the system trust store)"
    )
    assert caught.value.url == token_url
    assert https.connections == 1  # one attempt, no retries
    assert sleeps.waits == []
    assert https.requests == []  # nothing was sent over the unverified connection


async def test_ca_file_trusts_the_private_ca_for_client_and_session(
    https: ScriptedServer, sleeps: RecordingSleep, certs: tuple[Certificate, Certificate]
) -> None:
    queue = f"{https.url}/queue/message?sessionId=abc"
    session = {
        "sessionId": "9b6e4a3e-0d0c-4bb8-9f61-3f0f5f0e2a11",
        "runnerScaleSet": {"id": 5, "name": "linux"},
        "messageQueueUrl": queue,
        "messageQueueAccessToken": "q1",
        "statistics": {"totalAssignedJobs": 0},
    }
    https.on("GET", RUNNER, Reply(200, {"id": 7, "name": "r"}))
    https.on("POST", SESSIONS, Reply(200, session))
    https.on("GET", "/queue/message", Reply(202))
    async with client(https, sleeps, verify=str(certs[0].cert)) as c:
        assert (await c.get_runner(7)).name == "r"
        opened = await c.create_message_session(5, "host-1")
        assert await opened.get_message(0, 1) is None
    assert [r.path for r in https.requests][-3:] == [RUNNER, SESSIONS, "/queue/message"]
    assert json.loads(https.requests[-1].headers["user-agent"])["kind"] == "scaleset"
    assert sleeps.waits == []


async def test_ca_file_replaces_the_system_trust_store(
    https: ScriptedServer, sleeps: RecordingSleep, certs: tuple[Certificate, Certificate]
) -> None:
    other = str(certs[1].cert)
    async with client(https, sleeps, verify=other) as c:
        with pytest.raises(TLSVerificationError, match="certificate") as caught:
            await c.get_runner(7)
    assert str(caught.value).endswith(f"(trusted roots: CA file {other})")
    assert https.connections == 1
    assert sleeps.waits == []


def test_a_ca_file_that_cannot_be_loaded_is_a_scale_set_error(tmp_path: Path) -> None:
    with pytest.raises(ScaleSetError, match=r'cannot load CA file ".*missing\.pem"'):
        Client(
            "https://127.0.0.1:1/org/repo",
            PersonalAccessToken("x"),
            verify=str(tmp_path / "missing.pem"),
        )


async def test_service_builds_one_client_per_url_token_and_ca_file(
    tmp_path: Path, certs: tuple[Certificate, Certificate]
) -> None:
    ca_file = str(certs[1].cert)
    made: list[tuple[str, str, str | None]] = []

    def factory(url: str, token: str, /, *, ca_file: str | None = None) -> Client:
        made.append((url, token, ca_file))
        # FakeGitHub speaks plain HTTP: the CA file has nothing to verify here.
        return Client(url, PersonalAccessToken(token), retry=RetryPolicy(wait_min=0.01))

    def runner(name: str, ca_file: str = "") -> RunnerConfig:
        return RunnerConfig(
            name=name, labels=(name,), docker=DockerImage(image="x"), ca_file=ca_file
        )

    async with FakeGitHub(pat="ghp_tls", long_poll_timeout=0.3) as gh:
        config = Config(
            url=gh.config_url(),
            runners={
                "a": runner("a"),
                "b": runner("b", ca_file=ca_file),
                "c": runner("c", ca_file=ca_file),
            },
        )
        service = Service(
            config,
            token="ghp_tls",
            provisioner_factory=lambda entry: InMemoryProvisioner(),
            client_factory=factory,
            journal=False,
        )
        run = asyncio.create_task(service.run())
        ready = asyncio.ensure_future(service.wait_ready())
        async with asyncio.timeout(10):
            await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        service.stop()
        async with asyncio.timeout(30):
            await run
    assert made == [(gh.config_url(), "ghp_tls", None), (gh.config_url(), "ghp_tls", ca_file)]


async def test_https_through_a_connect_proxy_verifies_the_server_inside_the_tunnel(
    https: ScriptedServer, sleeps: RecordingSleep, certs: tuple[Certificate, Certificate]
) -> None:
    """The client's connections (asyncio's transports, outrunner/scaleset/_network.py) run TLS
    inside an HTTP CONNECT tunnel, as behind a corporate proxy."""
    tunnels: list[bytes] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        tunnels.append(head.split(b"\r\n", 1)[0])
        host, _, port = head.split()[1].decode().rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    https.on("GET", RUNNER, Reply(200, {"id": 7, "name": "r"}))
    try:
        async with client(
            https, sleeps, verify=str(certs[0].cert), proxy=f"http://127.0.0.1:{port}"
        ) as c:
            assert (await c.get_runner(7)).name == "r"
        async with client(
            https, sleeps, verify=str(certs[1].cert), proxy=f"http://127.0.0.1:{port}"
        ) as c:
            with pytest.raises(TLSVerificationError):
                await c.get_runner(7)
    finally:
        server.close()
    host_port = https.url.removeprefix("https://").encode()
    assert tunnels[0] == b"CONNECT " + host_port + b" HTTP/1.1"
    assert sleeps.waits == []
