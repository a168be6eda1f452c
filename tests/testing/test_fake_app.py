"""GitHub Apps in the fake: ``add_app`` and the signed-JWT check of ``access_tokens``.

Raw httpx and PyJWT, so these tests do not depend on ``outrunner.scaleset``'s App client.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from outrunner.testing.fakegithub import Endpoint, FakeGitHub, generate_key_pair

CLIENT_ID = "Iv1.fake0123456789"
APP_ID = 4242
INSTALLATION = 42


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    return generate_key_pair()


@pytest.fixture(scope="module")
def other_keys() -> tuple[str, str]:
    return generate_key_pair()


@pytest.fixture
def gh(keys: tuple[str, str]) -> Iterator[FakeGitHub]:
    with FakeGitHub(pat="ghp_pat", installation_token_ttl=900) as fake:
        fake.add_app(CLIENT_ID, INSTALLATION, keys[1], app_id=APP_ID)
        yield fake


def app_jwt(
    private_pem: str, *, iss: object = CLIENT_ID, iat: float = -60, exp: float = 480
) -> str:
    """A JWT signed with ``private_pem``; ``iat`` and ``exp`` are offsets from now."""
    now = int(time.time())
    claims: dict[str, Any] = {"iss": iss, "iat": now + int(iat), "exp": now + int(exp)}
    # Signed as a JWS: PyJWT's JWT layer refuses a numeric iss, which GitHub accepts.
    return jwt.PyJWS().encode(
        json.dumps(claims).encode(), _parsed(private_pem), algorithm="RS256", headers={"typ": "JWT"}
    )


@functools.cache
def _parsed(private_pem: str) -> Any:
    # Parsing an RSA key checks it, which takes tens of milliseconds: once per key.
    return serialization.load_pem_private_key(private_pem.encode(), password=None)


# One client for the module: building one (its TLS context) costs more than a request.
_HTTP = httpx.Client(trust_env=False)


def access_tokens(
    gh: FakeGitHub, token: str, installation: int = INSTALLATION, scheme: str = "Bearer"
) -> httpx.Response:
    return _HTTP.post(
        f"{gh.api_url}/app/installations/{installation}/access_tokens",
        headers={"Authorization": f"{scheme} {token}", "Accept": "application/vnd.github+json"},
    )


def registration_token(gh: FakeGitHub, bearer: str) -> httpx.Response:
    return _HTTP.post(
        f"{gh.api_url}/orgs/octo-org/actions/runners/registration-token",
        headers={"Authorization": f"Bearer {bearer}"},
    )


def test_signed_jwt_gets_an_installation_token_that_works_like_a_pat(
    gh: FakeGitHub, keys: tuple[str, str]
) -> None:
    before = time.time()
    response = access_tokens(gh, app_jwt(keys[0]))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["token"].startswith("ghs_")
    expires = datetime.fromisoformat(body["expires_at"]).timestamp()
    assert before + 900 - 2 <= expires <= time.time() + 900  # installation_token_ttl
    assert registration_token(gh, body["token"]).status_code == 201

    record = gh.requests_to(Endpoint.APP_ACCESS_TOKEN)[-1]
    assert (record.auth_scheme, record.auth_valid, record.status) == ("Bearer", True, 201)
    assert record.headers["Accept"] == "application/vnd.github+json"
    assert body["token"] not in repr(gh.requests)


@pytest.mark.parametrize("iss", [APP_ID, str(APP_ID)], ids=["number", "string"])
def test_app_id_is_accepted_as_issuer(gh: FakeGitHub, keys: tuple[str, str], iss: object) -> None:
    assert access_tokens(gh, app_jwt(keys[0], iss=iss)).status_code == 201


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong key", (401, "A JSON web token could not be decoded")),
        ("not a JWT", (401, "A JSON web token could not be decoded")),
        ("unsigned", (401, "A JSON web token could not be decoded")),
        ("unknown issuer", (401, "Integration not found")),
        ("exp too far", (401, "'Expiration time' claim ('exp') is too far in the future")),
        ("lives too long", (401, "'Expiration time' claim ('exp') is too far in the future")),
        ("expired", (401, "'Expiration time' claim ('exp') must be a numeric value")),
        ("issued in the future", (401, "'Issued at' claim ('iat') must be an Integer")),
        ("token scheme", (401, "Bearer authentication is required")),
        ("unknown installation", (404, "Not Found")),
    ],
)
def test_refusals_are_githubs(
    gh: FakeGitHub,
    keys: tuple[str, str],
    other_keys: tuple[str, str],
    case: str,
    expected: tuple[int, str],
) -> None:
    status, message = expected
    token, installation, scheme = app_jwt(keys[0]), INSTALLATION, "Bearer"
    if case == "wrong key":
        token = app_jwt(other_keys[0])
    elif case == "not a JWT":
        token = "not-a-jwt"
    elif case == "unsigned":
        now = int(time.time())
        token = jwt.encode({"iss": CLIENT_ID, "iat": now - 60, "exp": now + 480}, "", "none")
    elif case == "unknown issuer":
        token = app_jwt(keys[0], iss="Iv1.someone-else")
    elif case == "exp too far":
        token = app_jwt(keys[0], iat=0, exp=1800)
    elif case == "lives too long":  # exp is near, but 20 min after iat
        token = app_jwt(keys[0], iat=-1200, exp=60)
    elif case == "expired":
        token = app_jwt(keys[0], iat=-700, exp=-100)
    elif case == "issued in the future":
        token = app_jwt(keys[0], iat=300, exp=600)
    elif case == "token scheme":
        scheme = "token"
    elif case == "unknown installation":
        installation = 7
    response = access_tokens(gh, token, installation, scheme)
    assert response.status_code == status, response.text
    assert response.json()["message"].startswith(message)
    assert "documentation_url" in response.json()
    record = gh.requests_to(Endpoint.APP_ACCESS_TOKEN)[-1]
    assert record.auth_valid is (status != 401)


def test_installations_belong_to_their_app(
    gh: FakeGitHub, keys: tuple[str, str], other_keys: tuple[str, str]
) -> None:
    gh.add_app("Iv1.second", 43, other_keys[1])
    assert access_tokens(gh, app_jwt(other_keys[0], iss="Iv1.second"), 43).status_code == 201
    # The first App's valid JWT does not open the second App's installation, nor the reverse.
    assert access_tokens(gh, app_jwt(keys[0]), 43).status_code == 404
    assert access_tokens(gh, app_jwt(other_keys[0], iss="Iv1.second")).status_code == 404
    with pytest.raises(ValueError, match="already registered"):
        gh.add_app("Iv1.third", 43, other_keys[1])


def test_suspended_installation_answers_403(gh: FakeGitHub, keys: tuple[str, str]) -> None:
    gh.suspend_app_installation(INSTALLATION)
    response = access_tokens(gh, app_jwt(keys[0]))
    assert response.status_code == 403
    assert response.json()["message"] == "This installation has been suspended"
    gh.suspend_app_installation(INSTALLATION, suspended=False)
    assert access_tokens(gh, app_jwt(keys[0])).status_code == 201
    with pytest.raises(KeyError):
        gh.suspend_app_installation(999)


def test_expired_and_revoked_installation_tokens_are_refused(
    gh: FakeGitHub, keys: tuple[str, str]
) -> None:
    first = access_tokens(gh, app_jwt(keys[0])).json()["token"]
    gh.expire_installation_tokens()
    assert registration_token(gh, first).status_code == 401
    second = access_tokens(gh, app_jwt(keys[0])).json()["token"]
    assert second != first
    assert registration_token(gh, second).status_code == 201
    gh.revoke_credentials()
    assert registration_token(gh, second).status_code == 401


def test_installation_token_ttl_bounds_its_life(keys: tuple[str, str]) -> None:
    with FakeGitHub(installation_token_ttl=0.2) as gh:
        gh.add_app(CLIENT_ID, INSTALLATION, keys[1])
        token = access_tokens(gh, app_jwt(keys[0])).json()["token"]
        assert registration_token(gh, token).status_code == 201
        time.sleep(0.3)
        assert registration_token(gh, token).status_code == 401


def test_add_app_checks_its_arguments(keys: tuple[str, str]) -> None:
    with FakeGitHub() as gh:
        with pytest.raises(ValueError, match="positive"):
            gh.add_app(CLIENT_ID, 0, keys[1])
        with pytest.raises(ValueError, match="not a PEM public key"):
            gh.add_app(CLIENT_ID, 1, "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ValueError, match="installation_token_ttl"):
        FakeGitHub(installation_token_ttl=0)


def test_key_pair_is_pkcs1_rsa(keys: tuple[str, str]) -> None:
    private, public = keys
    assert private.startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert public.startswith("-----BEGIN PUBLIC KEY-----")
    token = jwt.encode({"iss": "x"}, private, algorithm="RS256")
    assert jwt.decode(token, public, algorithms=["RS256"]) == {"iss": "x"}
