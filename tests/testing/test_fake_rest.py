"""GitHub REST side of the fake: registration token, App installation token, runner-registration."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest

from outrunner.testing.fakegithub import Endpoint, FakeGitHub
from outrunner.testing.fakegithub.tokens import make_jwt
from tests.testing.raw import raw_client


def _claims(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    def part(segment: str) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=="))
        return decoded

    header, payload, signature = token.split(".")
    assert "=" not in token, "JWT segments are unpadded base64url"
    assert signature
    return part(header), part(payload)


@pytest.mark.parametrize(
    "scope", ["orgs/octo-org", "repos/octo-org/any-repo", "enterprises/acme", "orgs/OCTO-ORG"]
)
def test_registration_token_per_scope(gh: FakeGitHub, scope: str) -> None:
    with httpx.Client(trust_env=False) as http:
        response = http.post(
            f"{gh.api_url}/{scope}/actions/runners/registration-token",
            headers={"Authorization": "Bearer whatever", "Content-Type": "application/json"},
        )
    assert response.status_code == 201
    body = response.json()
    assert body["token"]
    assert body["expires_at"].endswith("Z")


def test_registration_token_errors() -> None:
    with FakeGitHub(pat="ghp_secret", repo="app") as gh, httpx.Client(trust_env=False) as http:
        url = f"{gh.api_url}/orgs/octo-org/actions/runners/registration-token"
        assert http.post(url).status_code == 401
        wrong = http.post(url, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["message"] == "Bad credentials"
        assert http.post(url, headers={"Authorization": "Bearer ghp_secret"}).status_code == 201
        assert http.post(url, headers={"Authorization": "token ghp_secret"}).status_code == 201
        other_org = f"{gh.api_url}/orgs/other/actions/runners/registration-token"
        assert http.post(other_org, headers={"Authorization": "Bearer ghp_secret"}).status_code == (
            404
        )
        other_repo = f"{gh.api_url}/repos/octo-org/other/actions/runners/registration-token"
        assert http.post(
            other_repo, headers={"Authorization": "Bearer ghp_secret"}
        ).status_code == (404)
        log = gh.requests_to(Endpoint.REGISTRATION_TOKEN)
        assert [r.auth_valid for r in log[:3]] == [False, False, True]
        assert "ghp_secret" not in repr(gh.requests)


def test_app_installation_token_then_registration() -> None:
    with (
        FakeGitHub(pat="ghp_x", app_client_id="Iv1.abc", app_installation_id=42) as gh,
        httpx.Client(trust_env=False) as http,
    ):
        now = int(time.time())
        good = make_jwt({"iss": "Iv1.abc", "iat": now - 60, "exp": now + 480})
        url = f"{gh.api_url}/app/installations/42/access_tokens"
        response = http.post(url, headers={"Authorization": f"Bearer {good}"})
        assert response.status_code == 201
        installation_token = response.json()["token"]
        assert installation_token.startswith("ghs_")
        # The installation token works where the PAT does.
        reg = http.post(
            f"{gh.api_url}/orgs/octo-org/actions/runners/registration-token",
            headers={"Authorization": f"Bearer {installation_token}"},
        )
        assert reg.status_code == 201

        too_long = make_jwt({"iss": "Iv1.abc", "iat": now, "exp": now + 3600})
        expired = make_jwt({"iss": "Iv1.abc", "iat": now - 700, "exp": now - 100})
        other_app = make_jwt({"iss": "Iv1.zzz", "iat": now, "exp": now + 300})
        for bad in ("not-a-jwt", too_long, expired, other_app):
            refused = http.post(url, headers={"Authorization": f"Bearer {bad}"})
            assert refused.status_code == 401, bad
            assert refused.json()["message"]
        wrong_installation = http.post(
            f"{gh.api_url}/app/installations/7/access_tokens",
            headers={"Authorization": f"Bearer {good}"},
        )
        assert wrong_installation.status_code == 404


def test_runner_registration_returns_base_and_admin_jwt(gh: FakeGitHub) -> None:
    with raw_client(gh) as raw:
        assert raw.base == gh.base_url + "/"
        assert raw.base.endswith("/tenant/1/")
        header, claims = _claims(raw.admin_token)
        assert header["alg"] == "RS256"
        assert isinstance(claims["exp"], int)
        assert 590 <= claims["exp"] - time.time() <= 601
        record = gh.requests_to(Endpoint.RUNNER_REGISTRATION)[-1]
        assert record.auth_scheme == "RemoteAuth"
        assert record.auth_valid is True
        assert record.json == {"url": gh.config_url(), "runner_event": "register"}


def test_runner_registration_errors(gh: FakeGitHub) -> None:
    with raw_client(gh) as raw:
        url = f"{gh.api_url}/actions/runner-registration"
        reg = raw.registration_token()
        body = {"url": gh.config_url(), "runner_event": "register"}
        http = raw.http
        assert http.post(
            url, json=body, headers={"Authorization": f"Bearer {reg}"}
        ).status_code == (401)
        assert http.post(
            url, json=body, headers={"Authorization": "RemoteAuth nope"}
        ).status_code == (401)
        auth = {"Authorization": f"RemoteAuth {reg}"}
        assert http.post(url, json={**body, "runner_event": "x"}, headers=auth).status_code == 400
        # The token was issued for the org, not for another scope.
        other = {**body, "url": gh.config_url("octo-org/repo")}
        assert http.post(url, json=other, headers=auth).status_code == 400
        assert http.post(url, content=b"{", headers=auth).status_code == 400
        # Registration tokens are reusable within their hour, as on GitHub.
        assert http.post(url, json=body, headers=auth).status_code == 201


def test_config_url_and_addresses() -> None:
    fake = FakeGitHub(owner="acme", repo="tools")
    with pytest.raises(RuntimeError):
        _ = fake.url
    with fake as gh:
        assert gh.url.startswith("http://127.0.0.1:")
        assert gh.config_url() == f"{gh.url}/acme/tools"
        assert gh.config_url("/enterprises/e/") == f"{gh.url}/enterprises/e"
        assert gh.api_url == f"{gh.url}/api/v3"
        assert "127.0.0.1" in repr(gh)
    with pytest.raises(RuntimeError):
        fake.start()
