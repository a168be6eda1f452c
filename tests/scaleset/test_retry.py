"""Retry rules of docs/protocol.md §6, observed over a real socket with a recording sleep."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from email.utils import format_datetime

import httpx
import pytest

from outrunner.scaleset import (
    Client,
    JitRunnerSetting,
    PermanentTransportError,
    PersonalAccessToken,
    RetryExhaustedError,
    RetryPolicy,
    StatusError,
)
from tests.scaleset.conftest import TENANT, RecordingSleep
from tests.scaleset.scripted_server import Reply, ScriptedServer

pytestmark = pytest.mark.anyio

RUNNER = f"{TENANT}/_apis/distributedtask/pools/0/agents/7"
OK_RUNNER = Reply(200, {"id": 7, "name": "r"})


@pytest.fixture(autouse=True)
def _auth(authed: str) -> None:
    pass


async def test_five_attempts_then_give_up(
    server: ScriptedServer, client: Client, sleeps: RecordingSleep
) -> None:
    server.on("GET", RUNNER, Reply(500, "oops", {"ActivityId": "A1"}), repeat_last=True)
    with pytest.raises(RetryExhaustedError) as caught:
        await client.get_runner(7)
    assert len(server.made("GET", RUNNER)) == 5
    assert sleeps.waits == [1, 2, 4, 8]
    error = caught.value
    assert error.attempts == 5
    assert error.status == 500
    assert error.activity_id == "A1"
    assert str(error) == (
        f'request GET {server.url}{RUNNER}?api-version=6.0-preview failed(status="500 Internal '
        'Server Error", activity_id="A1"): giving up after 5 attempt(s): unexpected HTTP status '
        "500 Internal Server Error"
    )


async def test_success_after_retries(
    server: ScriptedServer, client: Client, sleeps: RecordingSleep
) -> None:
    server.on("GET", RUNNER, Reply(502), Reply(504), Reply(429), OK_RUNNER)
    assert (await client.get_runner(7)).name == "r"
    assert sleeps.waits == [1, 2, 4]


async def test_wait_is_capped(server: ScriptedServer, sleeps: RecordingSleep) -> None:
    policy = RetryPolicy(max_attempts=8, wait_min=1, wait_max=30, sleep=sleeps)
    server.on("GET", RUNNER, Reply(503), repeat_last=True)
    async with Client(f"{server.url}/org/repo", _pat(), retry=policy) as client:
        with pytest.raises(RetryExhaustedError, match="giving up after 8 attempt"):
            await client.get_runner(7)
    assert sleeps.waits == [1, 2, 4, 8, 16, 30, 30]


async def test_retry_after_seconds_on_429_and_503(
    server: ScriptedServer, client: Client, sleeps: RecordingSleep
) -> None:
    server.on(
        "GET",
        RUNNER,
        Reply(429, headers={"Retry-After": "120"}),
        Reply(503, headers={"Retry-After": "45"}),
        Reply(500, headers={"Retry-After": "99"}),  # ignored on 500
        OK_RUNNER,
    )
    await client.get_runner(7)
    assert sleeps.waits == [120, 45, 4]  # uncapped, then the normal backoff


async def test_retry_after_http_date(server: ScriptedServer, sleeps: RecordingSleep) -> None:
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    policy = RetryPolicy(sleep=sleeps, clock=lambda: now)
    later = format_datetime(datetime(2026, 3, 1, 12, 1, 30, tzinfo=UTC), usegmt=True)
    past = format_datetime(datetime(2026, 3, 1, 11, 0, 0, tzinfo=UTC), usegmt=True)
    server.on(
        "GET",
        RUNNER,
        Reply(503, headers={"Retry-After": later}),
        Reply(429, headers={"Retry-After": past}),
        Reply(429, headers={"Retry-After": "soon"}),  # unparsable: normal backoff
        OK_RUNNER,
    )
    async with Client(f"{server.url}/org/repo", _pat(), retry=policy) as client:
        await client.get_runner(7)
    assert sleeps.waits == [90, 0, 4]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 501])
async def test_not_retried(
    server: ScriptedServer, client: Client, sleeps: RecordingSleep, status: int
) -> None:
    server.on("GET", RUNNER, Reply(status, {"message": "no"}), repeat_last=True)
    with pytest.raises(StatusError) as caught:
        await client.get_runner(7)
    assert caught.value.status == status
    # A 401 refreshes the admin token and tries once more (the token may have been revoked);
    # that is not a retry of the retry policy: no wait.
    assert len(server.made("GET", RUNNER)) == (2 if status == 401 else 1)
    assert sleeps.waits == []


async def test_a_refused_admin_token_is_refreshed_once_and_the_request_succeeds(
    server: ScriptedServer, client: Client, sleeps: RecordingSleep
) -> None:
    server.on("GET", RUNNER, Reply(401, {"message": "token revoked"}), OK_RUNNER)
    assert (await client.get_runner(7)).id == 7
    assert len(server.made("GET", RUNNER)) == 2
    # The token exchange ran again between the two: registration token, then runner-registration.
    assert len(server.made("POST")) == 4
    assert sleeps.waits == []


async def test_dropped_connection_is_retried(
    server: ScriptedServer, client: Client, sleeps: RecordingSleep
) -> None:
    server.on("GET", RUNNER, Reply(drop=True), Reply(drop=True), OK_RUNNER)
    assert (await client.get_runner(7)).id == 7
    assert sleeps.waits == [1, 2]


async def test_dropped_every_time_gives_up_with_the_transport_error(
    server: ScriptedServer, client: Client
) -> None:
    server.on("GET", RUNNER, Reply(drop=True), repeat_last=True)
    with pytest.raises(RetryExhaustedError) as caught:
        await client.get_runner(7)
    assert caught.value.status is None
    assert "giving up after 5 attempt(s): RemoteProtocolError" in str(caught.value)
    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)


async def test_connection_refused_is_retried(sleeps: RecordingSleep) -> None:
    with ScriptedServer() as gone:
        url = gone.url
    async with Client(f"{url}/org/repo", _pat(), retry=RetryPolicy(sleep=sleeps)) as client:
        with pytest.raises(RetryExhaustedError, match="ConnectError"):
            await client.get_runner(7)
    assert sleeps.waits == [1, 2, 4, 8]


async def test_body_is_sent_on_every_attempt(server: ScriptedServer, client: Client) -> None:
    generate = f"{TENANT}/_apis/runtime/runnerscalesets/3/generatejitconfig"
    server.on(
        "POST",
        generate,
        Reply(500),
        Reply(drop=True),
        Reply(200, {"runner": {"id": 1, "name": "r"}, "encodedJITConfig": "x"}),
    )
    await client.generate_jit_runner_config(JitRunnerSetting(name="r"), 3)
    bodies = [r.body for r in server.made("POST", generate)]
    assert bodies == [b'{"name":"r","workFolder":""}'] * 3


async def test_attempt_timeout_is_retried(server: ScriptedServer, sleeps: RecordingSleep) -> None:
    server.on("GET", RUNNER, Reply(200, {"id": 7}, delay=2), OK_RUNNER)
    async with Client(
        f"{server.url}/org/repo", _pat(), retry=RetryPolicy(sleep=sleeps), timeout=0.2
    ) as client:
        assert (await client.get_runner(7)).name == "r"
    assert sleeps.waits == [1]


async def test_cancellation_stops_retrying(server: ScriptedServer) -> None:
    started = asyncio.Event()

    async def slow_sleep(seconds: float) -> None:
        started.set()
        await asyncio.sleep(3600)

    server.on("GET", RUNNER, Reply(500), repeat_last=True)
    async with Client(
        f"{server.url}/org/repo", _pat(), retry=RetryPolicy(sleep=slow_sleep)
    ) as client:
        task = asyncio.create_task(client.get_runner(7))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(server.made("GET", RUNNER)) == 1


async def test_unsupported_scheme_is_not_retried(sleeps: RecordingSleep) -> None:
    async with Client("ftp://example.invalid/org", _pat(), retry=RetryPolicy(sleep=sleeps)) as c:
        with pytest.raises(PermanentTransportError, match="UnsupportedProtocol"):
            await c.get_runner(7)
    assert sleeps.waits == []


async def test_redirect_loop_is_not_retried(
    server: ScriptedServer, client: Client, sleeps: RecordingSleep
) -> None:
    server.on("GET", RUNNER, Reply(302, headers={"Location": RUNNER}), repeat_last=True)
    with pytest.raises(PermanentTransportError, match="TooManyRedirects") as caught:
        await client.get_runner(7)
    assert str(caught.value).startswith(f"request GET {server.url}{RUNNER}?api-version=")
    assert len(server.made("GET", RUNNER)) == 11  # the request and 10 redirects, once
    assert sleeps.waits == []


async def test_redirect_to_another_scheme_is_not_retried(
    server: ScriptedServer, client: Client, sleeps: RecordingSleep
) -> None:
    server.on("GET", RUNNER, Reply(301, headers={"Location": "ftp://127.0.0.1:1/x"}))
    with pytest.raises(PermanentTransportError, match="UnsupportedProtocol"):
        await client.get_runner(7)
    assert len(server.made("GET", RUNNER)) == 1
    assert sleeps.waits == []


def _pat() -> PersonalAccessToken:
    return PersonalAccessToken("pat")
