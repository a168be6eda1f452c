"""Fixtures for the scale set protocol tests: a scripted server and a client pointed at it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from outrunner.scaleset import Client, PersonalAccessToken, RetryPolicy
from tests.scaleset.scripted_server import Reply, ScriptedServer, make_jwt

PAT = "ghp_test_personal_access_token"
REG_TOKEN = "registration-token-abc"
TENANT = "/tenant/123"
REG_TOKEN_PATH = "/api/v3/repos/org/repo/actions/runners/registration-token"
RUNNER_REGISTRATION_PATH = "/api/v3/actions/runner-registration"


class RecordingSleep:
    """Retry waits are recorded instead of slept, so retry tests take no wall time."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Loopback only: a proxy from the environment must not intercept the scripted server.
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GITHUB_ACTIONS_FORCE_GHES", raising=False)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as scripted:
        yield scripted


@pytest.fixture
def sleeps() -> RecordingSleep:
    return RecordingSleep()


def admin_token(lifetime: float = 600.0) -> str:
    now = int(time.time())
    return make_jwt({"iss": "123", "iat": now - 600, "exp": now + lifetime})


def script_auth(server: ScriptedServer, *, lifetime: float = 600.0, **extra: Any) -> str:
    """Serve the registration-token and runner-registration calls for as long as asked."""
    token = admin_token(lifetime)
    server.on("POST", REG_TOKEN_PATH, Reply(201, {"token": REG_TOKEN}), repeat_last=True)
    server.on(
        "POST",
        RUNNER_REGISTRATION_PATH,
        Reply(201, {"url": f"{server.url}{TENANT}/", "token": token, **extra}),
        repeat_last=True,
    )
    return token


def new_client(server: ScriptedServer, sleeps: RecordingSleep, **kwargs: Any) -> Client:
    return Client(
        f"{server.url}/org/repo",
        PersonalAccessToken(PAT),
        retry=RetryPolicy(sleep=sleeps),
        **kwargs,
    )


@pytest.fixture
async def client(server: ScriptedServer, sleeps: RecordingSleep) -> AsyncIterator[Client]:
    async with new_client(server, sleeps) as scale_set_client:
        yield scale_set_client


@pytest.fixture
def authed(server: ScriptedServer) -> str:
    """Auth routes served; returns the admin token."""
    return script_auth(server)
