"""The admin-token exchange, JWT expiry reading and refresh rules (docs/protocol.md §2)."""

from __future__ import annotations

import asyncio
import json

import pytest

from outrunner.scaleset import (
    Client,
    PersonalAccessToken,
    ProtocolError,
    RetryExhaustedError,
    StatusError,
)
from outrunner.scaleset.auth import AdminConnection, AdminTokenCache, admin_token_expiry
from tests.scaleset.conftest import (
    PAT,
    REG_TOKEN,
    REG_TOKEN_PATH,
    RUNNER_REGISTRATION_PATH,
    TENANT,
    RecordingSleep,
    admin_token,
    new_client,
    script_auth,
)
from tests.scaleset.scripted_server import Reply, ScriptedServer, make_jwt

pytestmark = pytest.mark.anyio

GROUPS = f"{TENANT}/_apis/runtime/runnergroups/"
ONE_GROUP = {"count": 1, "value": [{"id": 1, "name": "default", "isDefaultGroup": True}]}


async def test_exchange_headers_bodies_and_admin_bearer(
    server: ScriptedServer, client: Client
) -> None:
    token = script_auth(server)
    server.on("GET", GROUPS, Reply(200, ONE_GROUP))
    group = await client.get_runner_group_by_name("default")
    assert group.is_default_group

    registration, exchange, call = server.requests
    assert (registration.method, registration.path) == ("POST", REG_TOKEN_PATH)
    assert registration.headers["authorization"] == f"Bearer {PAT}"
    assert registration.headers["content-type"] == "application/vnd.github.v3+json"
    assert registration.body == b""
    assert registration.headers["content-length"] == "0"
    assert json.loads(registration.headers["user-agent"])["kind"] == "scaleset"

    assert (exchange.method, exchange.path) == ("POST", RUNNER_REGISTRATION_PATH)
    assert exchange.headers["authorization"] == f"RemoteAuth {REG_TOKEN}"
    assert exchange.headers["content-type"] == "application/json"
    assert exchange.body == (
        f'{{"url":"{server.url}/org/repo","runner_event":"register"}}\n'.encode()
    )

    assert call.headers["authorization"] == f"Bearer {token}"
    assert call.query == "api-version=6.0-preview&groupName=default"


async def test_constructor_makes_no_request(server: ScriptedServer, sleeps: RecordingSleep) -> None:
    async with new_client(server, sleeps):
        pass
    assert server.requests == []


async def test_registration_token_must_be_201(server: ScriptedServer, client: Client) -> None:
    server.on("POST", REG_TOKEN_PATH, Reply(200, {"token": "t"}))
    with pytest.raises(StatusError) as caught:
        await client.get_runner_group_by_name("default")
    assert "failed to get runner registration token (200 OK)" in str(caught.value)
    assert len(server.requests) == 1


async def test_runner_registration_accepts_any_2xx(server: ScriptedServer, client: Client) -> None:
    server.on("POST", REG_TOKEN_PATH, Reply(201, {"token": REG_TOKEN}))
    server.on(
        "POST",
        RUNNER_REGISTRATION_PATH,
        Reply(200, {"url": f"{server.url}{TENANT}", "token": admin_token()}),
    )
    server.on("GET", GROUPS, Reply(200, ONE_GROUP))
    await client.get_runner_group_by_name("default")


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ({"token": admin_token()}, "actions service admin connection missing url"),
        ({"url": "http://x/", "token": ""}, "actions service admin connection missing token"),
        ({"url": "http://x/", "token": "a.b"}, "invalid number of segments"),
    ],
)
async def test_runner_registration_bad_answers(
    server: ScriptedServer, client: Client, answer: dict[str, str], error: str
) -> None:
    server.on("POST", REG_TOKEN_PATH, Reply(201, {"token": REG_TOKEN}))
    server.on("POST", RUNNER_REGISTRATION_PATH, Reply(201, answer))
    with pytest.raises(ProtocolError, match=error):
        await client.get_runner_group_by_name("default")


async def test_runner_registration_retries_401_then_succeeds(
    server: ScriptedServer, client: Client, sleeps: RecordingSleep
) -> None:
    server.on("POST", REG_TOKEN_PATH, Reply(201, {"token": REG_TOKEN}))
    server.on(
        "POST",
        RUNNER_REGISTRATION_PATH,
        *[Reply(401, {"message": "nope"})] * 4,
        Reply(201, {"url": f"{server.url}{TENANT}/", "token": admin_token()}),
    )
    server.on("GET", GROUPS, Reply(200, ONE_GROUP))
    await client.get_runner_group_by_name("default")
    assert len(server.made("POST", RUNNER_REGISTRATION_PATH)) == 5
    assert sleeps.waits == [1, 2, 4, 8]


async def test_runner_registration_hands_back_last_403(
    server: ScriptedServer, client: Client
) -> None:
    server.on("POST", REG_TOKEN_PATH, Reply(201, {"token": REG_TOKEN}))
    server.on(
        "POST",
        RUNNER_REGISTRATION_PATH,
        Reply(403, {"message": "forbidden"}, {"X-GitHub-Request-Id": "R1"}),
        repeat_last=True,
    )
    with pytest.raises(StatusError) as caught:
        await client.get_runner_group_by_name("default")
    assert caught.value.status == 403
    assert caught.value.request_id == "R1"
    assert 'github_request_id="R1"' in str(caught.value)
    assert "unexpected status code: 403: : forbidden" in str(caught.value)
    assert len(server.made("POST", RUNNER_REGISTRATION_PATH)) == 5


async def test_registration_token_does_not_retry_401(
    server: ScriptedServer, client: Client
) -> None:
    server.on("POST", REG_TOKEN_PATH, Reply(401, {"message": "Bad credentials"}), repeat_last=True)
    with pytest.raises(StatusError, match="Bad credentials"):
        await client.get_runner_group_by_name("default")
    assert len(server.requests) == 1


async def test_refreshes_with_59_seconds_left(server: ScriptedServer, client: Client) -> None:
    script_auth(server, lifetime=59)
    server.on("GET", GROUPS, Reply(200, ONE_GROUP), repeat_last=True)
    await client.get_runner_group_by_name("default")
    await client.get_runner_group_by_name("default")
    assert len(server.made("POST", RUNNER_REGISTRATION_PATH)) == 2


async def test_no_refresh_with_an_hour_left(server: ScriptedServer, client: Client) -> None:
    script_auth(server, lifetime=3600)
    server.on("GET", GROUPS, Reply(200, ONE_GROUP), repeat_last=True)
    for _ in range(3):
        await client.get_runner_group_by_name("default")
    assert len(server.made("POST", REG_TOKEN_PATH)) == 1
    assert len(server.made("POST", RUNNER_REGISTRATION_PATH)) == 1


async def test_failed_refresh_keeps_old_token_and_fails_the_call(
    server: ScriptedServer, client: Client
) -> None:
    old = admin_token(59)
    server.on("POST", REG_TOKEN_PATH, Reply(201, {"token": REG_TOKEN}))
    server.on(
        "POST",
        RUNNER_REGISTRATION_PATH,
        Reply(201, {"url": f"{server.url}{TENANT}/", "token": old}),
    )
    server.on("POST", REG_TOKEN_PATH, Reply(500, "boom"), repeat_last=True)
    server.on("GET", GROUPS, Reply(200, ONE_GROUP), repeat_last=True)
    await client.get_runner_group_by_name("default")
    before = client._transport.admin.current
    with pytest.raises(RetryExhaustedError, match="giving up after 5 attempt"):
        await client.get_runner_group_by_name("default")
    assert client._transport.admin.current is before
    assert before is not None
    assert before.token == old
    assert len(server.made("GET", GROUPS)) == 1  # the triggering request was not sent


async def test_concurrent_calls_share_one_refresh(server: ScriptedServer, client: Client) -> None:
    script_auth(server)
    server.on("GET", GROUPS, Reply(200, ONE_GROUP), repeat_last=True)
    await asyncio.gather(*(client.get_runner_group_by_name("default") for _ in range(8)))
    assert len(server.made("POST", RUNNER_REGISTRATION_PATH)) == 1
    assert len(server.made("GET", GROUPS)) == 8


async def test_cache_refresh_rules_with_a_clock() -> None:
    now = 1_000_000.0
    fetched: list[AdminConnection] = []

    async def fetch() -> AdminConnection:
        connection = AdminConnection(url="u", token=f"t{len(fetched)}", expires_at=now + 120)
        fetched.append(connection)
        return connection

    cache = AdminTokenCache(fetch, clock=lambda: now)
    first = await cache.get()
    now += 60  # exactly 60 s left: still fine
    assert await cache.get() is first
    now += 1  # 59 s left: refresh
    assert (await cache.get()).token == "t1"
    assert "t1" not in repr(cache.current)


@pytest.mark.parametrize(
    ("token", "error"),
    [
        ("a.b", "invalid number of segments"),
        ("a.b.c.d", "invalid number of segments"),
        (make_jwt({"iat": 1}), "no exp claim"),
        (make_jwt({"exp": "1700000000"}), "not a number"),
        (make_jwt({"exp": 1}, {"typ": "JWT"}), "alg"),
        (make_jwt({"exp": 1}, {"alg": "XX999"}), "unavailable"),
        (make_jwt({"exp": 1}).replace(".", "=.", 1), "illegal base64url"),
        ("e30.!!!.c2ln", "illegal base64url|claims"),
        ("W10.e30.c2ln", "header: not a JSON object"),
    ],
)
def test_admin_token_expiry_errors(token: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        admin_token_expiry(token)


def test_admin_token_expiry_values() -> None:
    assert admin_token_expiry(make_jwt({"exp": 1700000000})) == 1700000000
    assert admin_token_expiry(make_jwt({"exp": 1700000000.5})) == 1700000000.5
    assert admin_token_expiry(make_jwt({"EXP": 5}, {"alg": "none"})) == 5


def test_pat_is_redacted() -> None:
    assert PAT not in repr(PersonalAccessToken(PAT))
    with pytest.raises(ValueError, match="empty"):
        PersonalAccessToken("")
