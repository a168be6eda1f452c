"""GitHub App credentials (docs/protocol.md §2.1, docs/github-app.md): the JWT, the installation
token and its cache, and the errors, against FakeGitHub over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from outrunner.failures import Failure, classify
from outrunner.scaleset import (
    Client,
    GitHubApp,
    GitHubAppError,
    JitRunnerSetting,
    Label,
    ProtocolError,
    RetryExhaustedError,
    RetryPolicy,
    RunnerScaleSet,
)
from outrunner.scaleset.auth import load_app_private_key
from outrunner.testing.fakegithub import Endpoint, FakeGitHub, generate_key_pair
from tests.scaleset.conftest import REG_TOKEN_PATH, RecordingSleep, script_auth
from tests.scaleset.scripted_server import Reply, ScriptedServer

pytestmark = pytest.mark.anyio

CLIENT_ID = "Iv1.abc0123456789"
APP_ID = 4242
INSTALLATION = 42
ACCESS_TOKENS_PATH = f"/api/v3/app/installations/{INSTALLATION}/access_tokens"
GROUPS = "/tenant/123/_apis/runtime/runnergroups/"
ONE_GROUP = {"count": 1, "value": [{"id": 1, "name": "default", "isDefaultGroup": True}]}


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    """The App's (private PEM, public PEM); 2048-bit, generated once for the module."""
    return generate_key_pair()


@pytest.fixture(scope="module")
def wrong_keys() -> tuple[str, str]:
    return generate_key_pair()


@pytest.fixture
def gh(keys: tuple[str, str]) -> Iterator[FakeGitHub]:
    # A PAT is configured, so registration-token accepts only it or an installation token.
    with FakeGitHub(pat="ghp_not_used_by_these_tests", long_poll_timeout=0.1) as fake:
        fake.add_app(CLIENT_ID, INSTALLATION, keys[1], app_id=APP_ID)
        yield fake


class Clock:
    """Real time plus an offset the test moves: a machine whose clock is off, or time passing."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Secrets:
    """The secret hooks: what the App asked to mask, and what it still has masked."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.live: Counter[str] = Counter()

    def register(self, secret: str) -> None:
        self.seen.append(secret)
        self.live[secret] += 1

    def unregister(self, secret: str) -> None:
        self.live[secret] -= 1
        if not self.live[secret]:
            del self.live[secret]


def make_app(
    private_key: str,
    secrets: Secrets | None = None,
    *,
    client_id: str | int = CLIENT_ID,
    installation_id: int = INSTALLATION,
    clock: Clock | None = None,
) -> GitHubApp:
    secrets = secrets or Secrets()
    return GitHubApp(
        client_id,
        installation_id,
        private_key,
        clock=clock or time.time,
        register_secret=secrets.register,
        unregister_secret=secrets.unregister,
    )


def statuses(gh: FakeGitHub, endpoint: Endpoint) -> list[int | None]:
    return [r.status for r in gh.requests_to(endpoint)]


async def test_app_creates_a_scale_set_and_a_jit_config(
    gh: FakeGitHub, keys: tuple[str, str]
) -> None:
    secrets = Secrets()
    async with Client(gh.config_url(), make_app(keys[0], secrets)) as client:
        group = await client.get_runner_group_by_name("default")
        scale_set = await client.create_runner_scale_set(
            RunnerScaleSet(
                name="app-set", runner_group_id=group.id, labels=(Label(name="linux", type="User"),)
            )
        )
        jit = await client.generate_jit_runner_config(
            JitRunnerSetting(name="app-set-00000001"), scale_set.id
        )
    assert jit.encoded_jit_config
    assert [s.name for s in gh.scale_sets()] == ["app-set"]
    assert [r.name for r in gh.runners()] == ["app-set-00000001"]

    first = [(r.endpoint, r.status) for r in gh.requests[:3]]
    assert first == [
        (Endpoint.APP_ACCESS_TOKEN, 201),
        (Endpoint.REGISTRATION_TOKEN, 201),
        (Endpoint.RUNNER_REGISTRATION, 201),
    ]
    access, registration = gh.requests[0], gh.requests[1]
    assert access.path == ACCESS_TOKENS_PATH
    assert (access.auth_scheme, access.auth_valid) == ("Bearer", True)
    assert access.headers["Accept"] == "application/vnd.github+json"
    assert access.headers["Content-Type"] == "application/vnd.github+json"
    assert json.loads(access.headers["User-Agent"])["kind"] == "scaleset"
    assert (registration.auth_scheme, registration.auth_valid) == ("Bearer", True)

    # One JWT and one installation token, both handed to the redactor before use; the JWT is
    # released once sent, the installation token stays masked while it is cached.
    jwt_text, token = secrets.seen
    assert jwt_text.count(".") == 2
    assert token.startswith("ghs_")
    assert secrets.live == Counter({token: 1})


async def test_the_jwt_is_what_github_asks_for(keys: tuple[str, str]) -> None:
    for issuer, expected in ((CLIENT_ID, CLIENT_ID), (APP_ID, str(APP_ID))):
        app = make_app(keys[0], client_id=issuer)
        before = int(time.time())
        token = app.jwt()
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, keys[1], algorithms=["RS256"], options={"verify_iat": False})
        assert header == {"alg": "RS256", "typ": "JWT"}
        # iss is a JSON string even for a numeric App id, as the Go client sends it.
        assert claims["iss"] == expected
        assert before - 61 <= claims["iat"] <= int(time.time()) - 59
        assert claims["exp"] - claims["iat"] == 540  # 9 minutes: inside GitHub's 10
        assert app.label == f"GitHub App {expected} (installation {INSTALLATION})"
        assert keys[0] not in repr(app)


async def test_app_id_works_like_the_client_id(gh: FakeGitHub, keys: tuple[str, str]) -> None:
    async with Client(gh.config_url(), make_app(keys[0], client_id=APP_ID)) as client:
        await client.get_runner_group_by_name("default")
    assert statuses(gh, Endpoint.APP_ACCESS_TOKEN) == [201]


async def test_token_is_reused_until_five_minutes_are_left(
    server: ScriptedServer, sleeps: RecordingSleep, keys: tuple[str, str]
) -> None:
    # A scripted GitHub that hands out GitHub's one-hour installation tokens and does not check
    # the JWT's times, so the client's clock can jump ahead by most of an hour.
    expires = datetime.fromtimestamp(int(time.time()) + 3600, UTC).isoformat()
    server.on(
        "POST",
        ACCESS_TOKENS_PATH,
        Reply(201, {"token": "ghs_first", "expires_at": expires}),
        Reply(201, {"token": "ghs_second", "expires_at": expires}),
    )
    script_auth(server, lifetime=30)  # an admin token this short is refreshed at every call
    server.on("GET", GROUPS, Reply(200, ONE_GROUP), repeat_last=True)
    clock = Clock()
    app = make_app(keys[0], clock=clock)
    async with Client(f"{server.url}/org/repo", app, retry=RetryPolicy(sleep=sleeps)) as client:
        await client.get_runner_group_by_name("default")
        clock.offset = 3600 - 300 - 5  # 5 min and 5 s left: still good
        await client.get_runner_group_by_name("default")
        clock.offset = 3600 - 300 + 5  # 4 min 55 s left: replaced
        await client.get_runner_group_by_name("default")
    minted = server.made("POST", ACCESS_TOKENS_PATH)
    assert len(minted) == 2
    bearers = [r.headers["authorization"] for r in server.made("POST", REG_TOKEN_PATH)]
    assert bearers == ["Bearer ghs_first", "Bearer ghs_first", "Bearer ghs_second"]

    # The JWT actually sent, checked with the App's public key.
    request = minted[-1]
    assert request.headers["accept"] == "application/vnd.github+json"
    assert request.body == b""
    scheme, _, sent = request.headers["authorization"].partition(" ")
    assert scheme == "Bearer"
    claims = jwt.decode(sent, keys[1], algorithms=["RS256"], options={"verify_iat": False})
    assert claims["iss"] == CLIENT_ID
    assert claims["iat"] == pytest.approx(time.time() + clock.offset - 60, abs=2)


async def test_short_lived_token_is_refreshed_at_half_its_life(keys: tuple[str, str]) -> None:
    with FakeGitHub(installation_token_ttl=200) as gh:
        gh.add_app(CLIENT_ID, INSTALLATION, keys[1])
        clock, secrets = Clock(), Secrets()
        async with Client(gh.config_url(), make_app(keys[0], secrets, clock=clock)) as client:
            await client.get_runner_group_by_name("default")
            gh.expire_admin_tokens()  # the next call runs the admin exchange again
            await client.get_runner_group_by_name("default")
            assert statuses(gh, Endpoint.APP_ACCESS_TOKEN) == [201]
            assert statuses(gh, Endpoint.REGISTRATION_TOKEN) == [201, 201]
            clock.offset = 110  # 90 s of 200 left: under half its life
            gh.expire_admin_tokens()
            await client.get_runner_group_by_name("default")
    assert statuses(gh, Endpoint.APP_ACCESS_TOKEN) == [201, 201]
    tokens = [s for s in secrets.seen if s.startswith("ghs_")]
    assert len(tokens) == 2
    assert secrets.live == Counter({tokens[1]: 1})  # the replaced token is unmasked again


async def test_concurrent_clients_share_one_refresh(gh: FakeGitHub, keys: tuple[str, str]) -> None:
    # Five scale sets of one App: one installation token, however the requests interleave.
    app = make_app(keys[0])
    gh.delay_next(Endpoint.APP_ACCESS_TOKEN, 0.3)
    clients = [Client(gh.config_url(), app) for _ in range(5)]
    try:
        groups = await asyncio.gather(*(c.get_runner_group_by_name("default") for c in clients))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    assert {g.id for g in groups} == {1}
    assert statuses(gh, Endpoint.APP_ACCESS_TOKEN) == [201]
    assert statuses(gh, Endpoint.REGISTRATION_TOKEN) == [201] * 5


async def test_refused_token_is_replaced_once(gh: FakeGitHub, keys: tuple[str, str]) -> None:
    secrets = Secrets()
    async with Client(gh.config_url(), make_app(keys[0], secrets)) as client:
        await client.get_runner_group_by_name("default")
        gh.expire_installation_tokens()  # revoked before its expires_at
        gh.expire_admin_tokens()
        await client.get_runner_group_by_name("default")
    assert statuses(gh, Endpoint.APP_ACCESS_TOKEN) == [201, 201]
    assert statuses(gh, Endpoint.REGISTRATION_TOKEN) == [201, 401, 201]
    tokens = [s for s in secrets.seen if s.startswith("ghs_")]
    assert secrets.live == Counter({tokens[1]: 1})


@pytest.mark.parametrize(
    "scenario",
    [
        ("wrong key", 401, "A JSON web token could not be decoded", "private key"),
        ("unknown installation", 404, "Not Found", "installation_id"),
        ("expired JWT", 401, "'Expiration time' claim ('exp') must be", "clock"),
        ("JWT from the future", 401, "'Issued at' claim ('iat') must be", "clock"),
        ("another App's id", 401, "Integration not found", "no App has this client id"),
        ("suspended", 403, "This installation has been suspended", "suspended"),
        ("missing permission", 403, "Resource not accessible by integration", "Administration"),
    ],
    ids=lambda scenario: scenario[0],
)
async def test_refusals_are_permanent_and_name_the_app(
    gh: FakeGitHub,
    keys: tuple[str, str],
    wrong_keys: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
    scenario: tuple[str, int, str, str],
) -> None:
    case, status, github_says, hint = scenario
    clock, secrets = Clock(), Secrets()
    private_key, client_id, installation = keys[0], CLIENT_ID, INSTALLATION
    if case == "wrong key":
        private_key = wrong_keys[0]
    elif case == "unknown installation":
        installation = 7
    elif case == "expired JWT":
        clock.offset = -15 * 60  # this machine's clock is 15 min behind
    elif case == "JWT from the future":
        clock.offset = 5 * 60
    elif case == "another App's id":
        client_id = "Iv1.someone-else"
    elif case == "suspended":
        gh.suspend_app_installation(INSTALLATION)
    elif case == "missing permission":
        gh.fail_next(
            Endpoint.REGISTRATION_TOKEN,
            status=403,
            body={"message": github_says, "documentation_url": "https://docs.github.com/rest"},
        )
    app = make_app(
        private_key, secrets, client_id=client_id, installation_id=installation, clock=clock
    )
    caplog.set_level(logging.DEBUG)
    async with Client(gh.config_url(), app) as client:
        with pytest.raises(GitHubAppError) as raised:
            await client.get_runner_group_by_name("default")
    error = raised.value
    message = str(error)
    assert message.startswith(f"GitHub App {client_id} (installation {installation}): ")
    assert (error.app, error.installation_id, error.status) == (client_id, installation, status)
    assert github_says in message
    assert hint in message
    assert classify(error) is Failure.PERMANENT
    # Nothing secret in the message or the logs: not the JWT, the token, nor a line of the key.
    assert secrets.seen
    key_lines = [line for line in private_key.splitlines() if "-----" not in line]
    for secret in [*secrets.seen, *key_lines]:
        assert secret not in message
        assert secret not in caplog.text
    # Only a token GitHub issued stays masked (it is cached; the refusal came after it).
    assert list(secrets.live) == [s for s in secrets.seen if s.startswith("ghs_")]
    assert gh.requests_to(Endpoint.APP_ACCESS_TOKEN)  # the App flow was used


async def test_server_errors_are_retried_and_transient(
    gh: FakeGitHub, keys: tuple[str, str]
) -> None:
    sleeps = RecordingSleep()
    app = make_app(keys[0])
    async with Client(gh.config_url(), app, retry=RetryPolicy(sleep=sleeps)) as client:
        gh.fail_next(Endpoint.APP_ACCESS_TOKEN, times=5, status=502)
        with pytest.raises(RetryExhaustedError) as raised:
            await client.get_runner_group_by_name("default")
        assert classify(raised.value) is Failure.TRANSIENT
        gh.fail_next(Endpoint.APP_ACCESS_TOKEN, times=2, status=503)
        await client.get_runner_group_by_name("default")
    assert statuses(gh, Endpoint.APP_ACCESS_TOKEN) == [502] * 5 + [503, 503, 201]
    assert sleeps.waits == [1.0, 2.0, 4.0, 8.0, 1.0, 2.0]


async def test_answer_without_token_fails(gh: FakeGitHub, keys: tuple[str, str]) -> None:
    async with Client(gh.config_url(), make_app(keys[0])) as client:
        gh.fail_next(Endpoint.APP_ACCESS_TOKEN, status=201, body={"expires_at": None})
        with pytest.raises(ProtocolError, match="access token for GitHub App auth missing token"):
            await client.get_runner_group_by_name("default")


async def test_token_without_expiry_is_used_once(
    server: ScriptedServer, sleeps: RecordingSleep, keys: tuple[str, str]
) -> None:
    server.on("POST", ACCESS_TOKENS_PATH, Reply(201, {"token": "ghs_x"}), repeat_last=True)
    script_auth(server, lifetime=30)  # refreshed at every call
    server.on("GET", GROUPS, Reply(200, ONE_GROUP), repeat_last=True)
    app = make_app(keys[0])
    async with Client(f"{server.url}/org/repo", app, retry=RetryPolicy(sleep=sleeps)) as client:
        await client.get_runner_group_by_name("default")
        await client.get_runner_group_by_name("default")
    # Without expires_at nothing says how long it lasts: minted again, as the Go client does.
    assert len(server.made("POST", ACCESS_TOKENS_PATH)) == 2


def test_constructor_checks(keys: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match="empty"):
        GitHubApp(" ", INSTALLATION, keys[0])
    with pytest.raises(ValueError, match="positive"):
        GitHubApp(CLIENT_ID, 0, keys[0])
    with pytest.raises(ValueError, match="not a PEM file"):
        GitHubApp(CLIENT_ID, INSTALLATION, "ghp_a_token_by_mistake")


def _pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, fmt: str, password: bytes = b""
) -> str:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    private_format = (
        serialization.PrivateFormat.PKCS8
        if fmt == "pkcs8"
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    return key.private_bytes(serialization.Encoding.PEM, private_format, encryption).decode()


def test_private_key_formats(keys: tuple[str, str]) -> None:
    rsa_key = serialization.load_pem_private_key(keys[0].encode(), password=None)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert load_app_private_key(keys[0]).key_size == 2048  # PKCS#1, as GitHub hands it out
    assert load_app_private_key(_pem(rsa_key, "pkcs8").encode()).key_size == 2048
    ec_key = ec.generate_private_key(ec.SECP256R1())
    truncated = keys[0][: len(keys[0]) // 2] + "\n-----END RSA PRIVATE KEY-----\n"
    refused = {
        r"not an RSA key \(EC\)": _pem(ec_key, "pkcs8"),
        "encrypted with a passphrase": _pem(rsa_key, "pkcs8", b"secret"),
        "not a PEM private key": keys[1],
        "not a valid PEM private key": truncated,
        "not a PEM file": "just text",
    }
    for reason, pem in refused.items():
        with pytest.raises(ValueError, match=reason) as raised:
            load_app_private_key(pem)
        body_lines = [line for line in pem.splitlines() if "-----" not in line and len(line) > 8]
        assert not any(line in str(raised.value) for line in body_lines)
        assert raised.value.__cause__ is None


def test_works_without_pyjwt_until_an_app_is_used(tmp_path: Path, keys: tuple[str, str]) -> None:
    """PyJWT (the ``app`` extra) is optional: blocked here, everything else still imports and
    a PAT client works against the fake; only an App (client, config or fake) asks for it."""
    key_file = tmp_path / "app.pem"
    key_file.write_text(keys[0])
    code = f"""
import asyncio, sys
sys.modules["jwt"] = None  # makes "import jwt" raise ImportError
sys.modules["cryptography"] = None
import outrunner, outrunner.failures, outrunner.testing
from outrunner.config import Config, ConfigError, GitHubAppConfig, RunnerConfig
from outrunner.config import resolve_runner_credentials
from outrunner.scaleset import Client, GitHubApp, PersonalAccessToken
from outrunner.testing.fakegithub import FakeGitHub

async def main():
    with FakeGitHub() as gh:
        async with Client(gh.config_url(), PersonalAccessToken("ghp_x")) as client:
            await client.get_runner_group_by_name("default")
        try:
            GitHubApp("Iv1.x", 1, "-----BEGIN RSA PRIVATE KEY-----")
        except ImportError as exc:
            print(exc)
        try:
            gh.add_app("Iv1.x", 1, "-----BEGIN PUBLIC KEY-----")
        except ImportError as exc:
            print(exc)
    app = GitHubAppConfig(client_id="Iv1.x", installation_id=1, private_key_file={str(key_file)!r})
    try:
        resolve_runner_credentials(None, Config(app=app), RunnerConfig(name="r"), url="")
    except ConfigError as exc:
        print(exc)

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert all("pip install 'outrunner[app]'" in line for line in lines)
    assert lines[2].startswith("app: GitHub App authentication needs PyJWT")
