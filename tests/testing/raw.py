"""A deliberately dumb raw-httpx client of the fake, so these tests do not depend on
outrunner.scaleset: every URL, header and body is spelled out as docs/protocol.md has it."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from outrunner.testing.fakegithub import FakeGitHub

API_VERSION = {"api-version": "6.0-preview"}
SESSION_CONFLICT = (
    "GitHub.Actions.Runtime.WebApi.RunnerScaleSetSessionConflictException, "
    "GitHub.Actions.Runtime.WebApi"
)


@dataclass
class Session:
    id: str
    scale_set_id: int
    queue_url: str
    token: str
    raw: dict[str, Any]


class Raw:
    def __init__(self, gh: FakeGitHub, http: httpx.Client) -> None:
        self.gh = gh
        self.http = http
        self.base, self.admin_token = self.exchange()

    def registration_token(self, scope: str = "orgs/octo-org", token: str = "pat") -> str:
        response = self.http.post(
            f"{self.gh.api_url}/{scope}/actions/runners/registration-token",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 201, response.text
        return str(response.json()["token"])

    def exchange(self) -> tuple[str, str]:
        """Registration token -> (actions base URL with trailing slash, admin token)."""
        response = self.http.post(
            f"{self.gh.api_url}/actions/runner-registration",
            headers={"Authorization": f"RemoteAuth {self.registration_token()}"},
            json={"url": self.gh.config_url(), "runner_event": "register"},
        )
        assert response.status_code == 201, response.text
        body = response.json()
        return str(body["url"]), str(body["token"])

    def actions(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        token: str | None = None,
    ) -> httpx.Response:
        return self.http.request(
            method,
            self.base + path,
            params={**API_VERSION, **(params or {})},
            headers={
                "Authorization": f"Bearer {token or self.admin_token}",
                "Content-Type": "application/json",
            },
            content=None if json_body is None else json.dumps(json_body),
        )

    def create_scale_set(self, name: str = "linux-set", labels: Sequence[str] = ("linux",)) -> int:
        response = self.actions(
            "POST",
            "_apis/runtime/runnerscalesets",
            json_body={
                "name": name,
                "runnerGroupId": 1,
                "labels": [{"type": "User", "name": label} for label in labels],
                "RunnerSetting": {"disableUpdate": True},
                "createdOn": "0001-01-01T00:00:00Z",
            },
        )
        assert response.status_code == 200, response.text
        return int(response.json()["id"])

    def create_session(self, scale_set_id: int, owner: str = "host") -> Session:
        response = self.actions(
            "POST",
            f"_apis/runtime/runnerscalesets/{scale_set_id}/sessions",
            json_body={"sessionId": "00000000-0000-0000-0000-000000000000", "ownerName": owner},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        return Session(
            id=body["sessionId"],
            scale_set_id=scale_set_id,
            queue_url=body["messageQueueUrl"],
            token=body["messageQueueAccessToken"],
            raw=body,
        )

    def jit(self, scale_set_id: int, name: str) -> httpx.Response:
        return self.actions(
            "POST",
            f"_apis/runtime/runnerscalesets/{scale_set_id}/generatejitconfig",
            json_body={"name": name, "workFolder": ""},
        )

    def poll(
        self, session: Session, last: int = 0, capacity: int | None = 10, token: str | None = None
    ) -> httpx.Response:
        headers = {
            "Accept": "application/json; api-version=6.0-preview",
            "Authorization": f"Bearer {token or session.token}",
        }
        if capacity is not None:
            headers["X-ScaleSetMaxCapacity"] = str(capacity)
        url = httpx.URL(session.queue_url)
        if last > 0:
            # Merge into whatever query the queue URL already has (httpx's params= replaces it).
            url = url.copy_merge_params({"lastMessageId": str(last)})
        return self.http.get(url, headers=headers)

    def ack(self, session: Session, message_id: int) -> httpx.Response:
        return self.http.delete(
            f"{session.queue_url}/{message_id}",
            headers={
                "Authorization": f"Bearer {session.token}",
                "Content-Type": "application/json",
            },
        )

    def next_jobs(self, session: Session, capacity: int = 10) -> list[dict[str, Any]]:
        """Poll once (expecting a message), ack it, and return its job messages."""
        response = self.poll(session, capacity=capacity)
        assert response.status_code == 200, response.text
        message = response.json()
        assert self.ack(session, message["messageId"]).status_code == 204
        return jobs_of(message)


def jobs_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    body = message["body"]
    assert isinstance(body, str), "body must be a JSON string"
    parsed = json.loads(body)
    assert isinstance(parsed, list)
    return parsed


def types_of(message: dict[str, Any]) -> list[str]:
    return [job["messageType"] for job in jobs_of(message)]


@contextmanager
def raw_client(gh: FakeGitHub) -> Iterator[Raw]:
    with httpx.Client(trust_env=False, timeout=10.0) as http:
        yield Raw(gh, http)
