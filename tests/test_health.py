"""The HTTP endpoints: /readyz through a GitHub outage and /status of a real Service over real
HTTP on 127.0.0.1; and the server's own HTTP handling (slow, malformed, hostile clients)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from outrunner.config import Config, ConfigError, DockerImage, RunnerConfig
from outrunner.health import HealthServer, parse_listen
from outrunner.metrics import Metrics
from outrunner.runner import RunnerPhase, RunnerSnapshot
from outrunner.service import Service, ServiceState
from outrunner.testing import Endpoint, FakeGitHub, InMemoryProvisioner
from outrunner.worker import ScaleSetStatus
from tests.support.scrape import agent, serving

pytestmark = pytest.mark.anyio

TOKEN = "ghp_healthTestToken_0123456789abcdefg"


# -- a real Service ----------------------------------------------------------------------------


async def test_readyz_is_503_with_the_reason_during_an_outage_and_200_after() -> None:
    async with (
        FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh,
        serving(gh, TOKEN) as (service, client),
    ):
        ready = await client.get("/readyz")
        assert (ready.status_code, ready.text) == (200, "ready\n")
        began = datetime.now(UTC).replace(microsecond=0)
        with gh.outage():
            await gh.wait_for_async(lambda: not service.workers[0].session_open, timeout=10)
            during = await client.get("/readyz")
            # Liveness is another question: the process answers.
            alive = await client.get("/healthz")
            status = (await client.get("/status")).json()
        async with asyncio.timeout(10):
            while (after := await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.05)
    assert during.status_code == 503
    assert during.text.startswith("linux: no listening session; failing since ")
    since = datetime.fromisoformat(during.text.split("since ")[1].split(": ")[0])
    assert began <= since <= datetime.now(UTC)
    assert "503" in during.text  # the error the listener failed with
    assert (alive.status_code, alive.text) == (200, "ok\n")
    (linux,) = status["scale_sets"]
    assert not status["ready"]
    assert status["not_ready"] == [during.text.strip()]
    assert linux["session"] == "reconnecting"
    assert linux["not_listening_since"] is not None
    assert after.text == "ready\n"


async def test_readyz_says_what_is_still_starting() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh:
        gh.delay_next(Endpoint.GET_SCALE_SET, 1.0)  # the scale set's look-up hangs a while
        async with serving(gh, TOKEN, wait_ready=False) as (service, client):
            await gh.wait_for_async(lambda: bool(service.workers))
            starting = await client.get("/readyz")
            status = (await client.get("/status")).json()
            await service.wait_ready()
            ready = await client.get("/readyz")
    assert (starting.status_code, starting.text) == (503, "linux: setting up the scale set\n")
    assert status["scale_sets"][0]["session"] == "setting up"
    assert ready.status_code == 200


async def test_status_shows_each_runner_with_its_phase_age_and_job() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh:
        provisioner = InMemoryProvisioner(workload=agent)
        async with serving(gh, TOKEN, provisioner=provisioner) as (service, client):
            job = gh.queue_job(["linux"], duration=30.0, display_name="integration tests")
            await gh.wait_for_async(
                lambda: [r.phase for r in service.runners()["linux"]] == [RunnerPhase.RUNNING]
            )
            response = await client.get("/status")
            gh.cancel_job(job)
    assert response.headers["content-type"] == "application/json"
    status = response.json()
    assert (status["ready"], status["stopping"], status["busy_runners"]) == (True, False, 1)
    (linux,) = status["scale_sets"]
    assert linux["name"] == "linux"
    assert linux["session"] == "listening"
    assert (linux["draining"], linux["backoff"], linux["last_error"]) == (False, None, None)
    assert linux["last_poll"] is not None
    (runner,) = linux["runners"]
    assert runner["name"] == gh.job(job).runner_name
    assert runner["phase"] == "running"
    assert 0 <= runner["age_seconds"] < 30
    assert runner["job"]["name"] == "integration tests"
    assert runner["job"]["repository"] == "octo-org/repo"
    assert runner["job"]["runner_request_id"] == job


async def test_a_service_that_cannot_bind_its_address_fails_with_a_config_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with FakeGitHub(pat=TOKEN) as gh:
            with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
                async with HealthServer(Source(), "127.0.0.1", port):
                    pass
            assert gh.requests == []
    finally:
        server.close()


async def test_the_config_listen_key_is_the_default_and_an_empty_listen_turns_it_off() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh:
        config = Config(
            url=gh.config_url(),
            listen="127.0.0.1:0",
            runners={
                "linux": RunnerConfig(
                    name="linux", labels=("linux",), docker=DockerImage(image="unused:latest")
                )
            },
        )
        memory = InMemoryProvisioner(workload=agent)
        off = Service(config, token=TOKEN, provisioner_factory=lambda e: memory, listen="")
        service = Service(config, token=TOKEN, provisioner_factory=lambda e: memory)
        task = asyncio.create_task(service.run())
        try:
            await service.wait_ready()
            assert service.http is not None
            (address,) = service.http.addresses
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{address[1]}/readyz")
        finally:
            service.stop()
            await task
    assert response.text == "ready\n"
    assert off.http is None


# -- the server alone, against a source under the test's control -------------------------------


@dataclass
class Source:
    metrics: Metrics = field(default_factory=Metrics)
    statuses: list[ScaleSetStatus] = field(default_factory=list)
    stopping: bool = False
    draining: bool = False

    def status(self) -> list[ScaleSetStatus]:
        return self.statuses

    def state(self) -> ServiceState:
        return ServiceState(
            stopping=self.stopping,
            draining=self.draining,
            busy_runners=0,
            runners=0,
            drain_deadline=None,
        )


def scale_set(name: str = "linux", *, session_open: bool = True, **kw: object) -> ScaleSetStatus:
    fields: dict[str, object] = {
        "name": name,
        "scale_set_id": 1,
        "session_open": session_open,
        "draining": False,
        "runners": (),
        "busy": 0,
        "start_backoff": None,
        "pending_deregistrations": (),
        **kw,
    }
    return ScaleSetStatus(**fields)  # type: ignore[arg-type]


@asynccontextmanager
async def server(source: Source, **options: float) -> AsyncIterator[tuple[str, int]]:
    async with HealthServer(source, "127.0.0.1", 0, **options) as http:  # type: ignore[arg-type]
        yield http.addresses[0]


async def exchange(address: tuple[str, int], request: bytes) -> bytes:
    """Send ``request`` as is, read until the server closes the connection."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_endpoints_methods_and_paths() -> None:
    source = Source(statuses=[scale_set()])
    async with server(source) as (host, port), httpx.AsyncClient() as client:
        url = f"http://{host}:{port}"
        healthz = await client.get(f"{url}/healthz?verbose=1")
        readyz = await client.get(f"{url}/readyz")
        head = await client.head(f"{url}/healthz")
        post = await client.post(f"{url}/healthz")
        missing = await client.get(f"{url}/")
        metrics = await client.get(f"{url}/metrics")
    assert (healthz.status_code, healthz.text) == (200, "ok\n")
    assert healthz.headers["connection"] == "close"
    assert (readyz.status_code, readyz.text) == (200, "ready\n")
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "3")
    assert (post.status_code, post.headers["allow"]) == (405, "GET, HEAD")
    assert missing.status_code == 404
    assert metrics.status_code == 200
    assert "outrunner_info" in metrics.text


async def test_metrics_answers_501_without_the_extra() -> None:
    async with server(Source(metrics=Metrics(prometheus=False))) as address:
        answer = await exchange(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        healthz = await exchange(address, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 501 Not Implemented\r\n")
    assert answer.endswith(b"pip install 'outrunner[metrics]'\n")
    assert healthz.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /healthz\r\n\r\n", b"400 Bad Request"),
        (b"GET  /healthz HTTP/1.1\r\n\r\n", b"400 Bad Request"),
        (b"GET /healthz SPDY/3\r\n\r\n", b"400 Bad Request"),
        (b"GET healthz HTTP/1.1\r\n\r\n", b"400 Bad Request"),
        (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", b"400 Bad Request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400 Bad Request"),  # TLS
        (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431 Request Header"),
        (b"GET /healthz HTTP/1.1\r\n" + b"X: a\r\n" * 2000 + b"\r\n", b"431 Request Header"),
        (b"DELETE /status HTTP/1.1\r\n\r\n", b"405 Method Not Allowed"),
        # Tolerated: empty lines before the request, bare LF line ends, an absolute URL.
        (b"\r\nGET /healthz HTTP/1.0\n\n", b"200 OK"),
        (b"GET http://localhost/healthz HTTP/1.1\r\n\r\n", b"200 OK"),
    ],
)
async def test_malformed_requests_get_an_error_status(request_bytes: bytes, status: bytes) -> None:
    async with server(Source()) as address:
        answer = await exchange(address, request_bytes)
        # The server is none the worse for it.
        after = await exchange(address, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
    assert after.startswith(b"HTTP/1.1 200 OK")


async def test_a_client_that_sends_nothing_stalls_nobody_and_is_cut_off() -> None:
    async with server(Source(), read_timeout=1.0) as address:
        silent = await asyncio.open_connection(*address)
        halfway = await asyncio.open_connection(*address)
        halfway[1].write(b"GET /healthz HTT")
        try:
            began = time.monotonic()
            answers = [await exchange(address, b"GET /healthz HTTP/1.1\r\n\r\n") for _ in range(5)]
            served_in = time.monotonic() - began
            async with asyncio.timeout(5):
                cut_off = await silent[0].read()
                cut_halfway = await halfway[0].read()
            waited = time.monotonic() - began
        finally:
            silent[1].close()
            halfway[1].close()
    assert all(a.startswith(b"HTTP/1.1 200 OK") for a in answers)
    assert served_in < 1.0  # not after the silent clients' timeout
    assert cut_off.startswith(b"HTTP/1.1 408 Request Timeout")
    assert cut_halfway.startswith(b"HTTP/1.1 408 Request Timeout")
    assert waited >= 0.9


async def test_connections_beyond_the_limit_are_turned_away() -> None:
    async with server(Source(), max_connections=2, read_timeout=5.0) as address:
        idle = [await asyncio.open_connection(*address) for _ in range(2)]
        await asyncio.sleep(0.05)  # the server has accepted both
        try:
            turned_away = await exchange(address, b"GET /healthz HTTP/1.1\r\n\r\n")
        finally:
            for _, writer in idle:
                writer.close()
        await asyncio.sleep(0.05)
        served = await exchange(address, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert turned_away.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert served.startswith(b"HTTP/1.1 200 OK")


async def test_closing_cuts_off_open_connections() -> None:
    http = HealthServer(Source(), "127.0.0.1", 0, read_timeout=60.0)
    await http.start()
    reader, writer = await asyncio.open_connection(*http.addresses[0])
    await asyncio.sleep(0.05)
    async with asyncio.timeout(5):
        await http.close()
        assert await reader.read() == b""
    writer.close()


async def test_readyz_reasons() -> None:
    since = datetime(2026, 3, 30, 21, 8, 31, tzinfo=UTC)
    source = Source()
    lost = source.metrics.scale_set("linux")
    lost.session_failed(RuntimeError("giving up after 5 attempt(s): 503"))
    lost.not_listening_since = since
    async with server(source) as address:
        starting = await exchange(address, b"GET /readyz HTTP/1.1\r\n\r\n")
        source.statuses = [
            scale_set("linux", session_open=False),
            scale_set("mac", session_open=False, scale_set_id=0),
            scale_set("arm", session_open=True),
            scale_set("gpu", session_open=True, draining=True),
        ]
        mixed = await exchange(address, b"GET /readyz HTTP/1.1\r\n\r\n")
        source.stopping = source.draining = True
        draining = await exchange(address, b"GET /readyz HTTP/1.1\r\n\r\n")
    assert starting.startswith(b"HTTP/1.1 503 ")
    assert starting.endswith(b"\r\n\r\nstarting\n")
    assert mixed.split(b"\r\n\r\n", 1)[1].decode().splitlines() == [
        "linux: no listening session; failing since 2026-03-30T21:08:31Z: giving up after 5 "
        "attempt(s): 503",
        "mac: setting up the scale set",
        "gpu: stopped taking work",
    ]
    assert draining.endswith(b"draining: busy runners finish their jobs\n")


async def test_status_of_runners_without_a_service() -> None:
    created = datetime.now(UTC) - timedelta(seconds=90)
    runner = RunnerSnapshot(
        name="linux-1", runner_id=7, phase=RunnerPhase.IDLE, created_at=created, adopted=True
    )
    source = Source(statuses=[scale_set(runners=(runner,), pending_deregistrations=("x",))])
    async with server(source) as (host, port), httpx.AsyncClient() as client:
        status = (await client.get(f"http://{host}:{port}/status")).json()
    (linux,) = status["scale_sets"]
    (shown,) = linux["runners"]
    assert shown["name"] == "linux-1"
    assert shown["runner_id"] == 7
    assert shown["phase"] == "idle"
    assert shown["adopted"] is True
    assert shown["job"] is None
    assert 90 <= shown["age_seconds"] < 100
    assert linux["pending_deregistrations"] == ["x"]


async def test_listens_on_ipv6_loopback() -> None:
    host, port = parse_listen("[::1]:0")
    async with HealthServer(Source(), host, port) as http, httpx.AsyncClient() as client:
        (address,) = http.addresses
        response = await client.get(f"http://[::1]:{address[1]}/healthz")
    assert address[0] == "::1"
    assert address[1] > 0
    assert response.text == "ok\n"


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        ("[::1]:9090", ("::1", 9090)),
        ("localhost:0", ("localhost", 0)),
        (":9090", ("", 9090)),
        (" 0.0.0.0:65535 ", ("0.0.0.0", 65535)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    "listen",
    ["9090", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:65536", "127.0.0.1:-1", "::1:9090"],
)
def test_parse_listen_refuses(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^listen: .*(HOST:PORT|brackets)"):
        parse_listen(listen)
