"""Credentials and the admin-token exchange (``docs/protocol.md`` §2).

Every Actions-service call needs an *admin token*, obtained in two GitHub REST calls::

    POST {api}/…/actions/runners/registration-token  Bearer <credential>     -> 201 {"token"}
    POST {api}/actions/runner-registration           RemoteAuth <reg token>  -> 2xx {"url","token"}

giving the Actions service base URL and the admin token (a JWT).

:class:`AdminTokenCache` keeps the result and reruns the exchange when fewer than 60 s remain.

Credentials plug in at one point: :meth:`Credentials.authorization` returns the ``Authorization``
value for the registration-token request. :class:`PersonalAccessToken` returns ``Bearer <PAT>``.
A later ``GitHubApp(client_id, installation_id, private_key)`` fits the same slot: its
``authorization`` mints an RS256 JWT (``iss`` = client id, ``iat`` = now - 60 s,
``exp`` = iat + 9 min), POSTs it with ``send`` to ``/app/installations/{id}/access_tokens`` on
``config.api_base`` (``Content-Type: application/vnd.github+json``, ``Authorization: Bearer <jwt>``;
success is exactly 201, error cause ``failed to get access token for GitHub App auth (<status>)``)
and returns ``Bearer <installation token>``, minting a fresh one each time as the Go client does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from outrunner.scaleset import _json
from outrunner.scaleset.errors import protocol_error, response_error, status_line
from outrunner.scaleset.urls import GitHubConfig

_log = logging.getLogger("outrunner.scaleset.auth")

# Algorithms golang-jwt knows; an unknown "alg" makes its unverified parse fail, so ours does too.
_KNOWN_ALGS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512"}
    | {"PS256", "PS384", "PS512", "EdDSA", "none"}
)
REFRESH_MARGIN = 60.0  # seconds of validity below which the admin token is refreshed


class Requester(Protocol):
    """Sends one GitHub REST request with the client's User-Agent and retry policy.

    ``retry_auth_failures`` selects the runner-registration policy: 401 and 403 are retried too and
    the last response is handed back when attempts run out.
    """

    async def __call__(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        retry_auth_failures: bool = False,
    ) -> httpx.Response: ...


class Credentials(Protocol):
    """What the client needs from credentials: the registration-token ``Authorization`` value."""

    async def authorization(self, send: Requester, config: GitHubConfig) -> str: ...


class PersonalAccessToken:
    """A GitHub personal access token (classic or fine-grained)."""

    __slots__ = ("_token",)

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("personal access token is empty")
        self._token = token

    def __repr__(self) -> str:
        return "PersonalAccessToken(<redacted>)"

    async def authorization(self, send: Requester, config: GitHubConfig) -> str:
        return f"Bearer {self._token}"


@dataclass(frozen=True, kw_only=True)
class AdminConnection:
    """The Actions service base URL and its admin token, valid until ``expires_at`` (epoch s)."""

    url: str
    token: str = field(repr=False)
    expires_at: float


def admin_token_expiry(token: str) -> float:
    """The ``exp`` claim of a JWT, read without verifying it; raises ``ValueError``.

    Mirrors golang-jwt's unverified parse: 3 segments, unpadded base64url JSON, a known ``alg`` in
    the header, and a numeric ``exp`` (the Go client would crash without one).
    """
    segments = token.split(".")
    if len(segments) != 3:
        raise ValueError("token contains an invalid number of segments")
    header = _decode_segment(segments[0], "header")
    claims = _decode_segment(segments[1], "claims")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise ValueError("signing method (alg) is unspecified")
    if alg not in _KNOWN_ALGS:
        raise ValueError(f"signing method (alg) {alg!r} is unavailable")
    exp: object = None
    # The claims decode into a Go struct, so the key matches case-insensitively.
    for key, value in claims.items():
        if key.lower() == "exp":
            exp = value
    if exp is None:
        raise ValueError("token has no exp claim")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise ValueError("exp claim is not a number")
    return float(exp)


def _decode_segment(segment: str, what: str) -> dict[str, object]:
    if "=" in segment or "+" in segment or "/" in segment:
        raise ValueError(f"{what}: illegal base64url data (padded or standard alphabet)")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{what}: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{what}: not a JSON object")
    return value


async def fetch_registration_token(
    send: Requester, config: GitHubConfig, credentials: Credentials
) -> str:
    url = config.api_url(config.registration_token_path)
    headers = {
        "Content-Type": "application/vnd.github.v3+json",
        "Authorization": await credentials.authorization(send, config),
    }
    _log.info("Getting runner registration token", extra={"attrs": {"url": url}})
    response = await send("POST", url, headers=headers, content=b"")
    if response.status_code != 201:
        raise response_error(
            response, f"failed to get runner registration token ({status_line(response)})"
        )
    token = _json.parse_response(response, _json.parse_registration_token, "registration token")
    if not token:
        raise protocol_error(response, "runner registration token missing token")
    return token


async def fetch_admin_connection(
    send: Requester, config: GitHubConfig, registration_token: str
) -> AdminConnection:
    url = config.api_url("/actions/runner-registration")
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"RemoteAuth {registration_token}",
    }
    # Go's json.Encoder with HTML escaping off, which ends the document with a newline.
    body = _json.dumps({"url": config.config_url, "runner_event": "register"}, escape_html=False)
    _log.info("Getting Actions service URL and admin token", extra={"attrs": {"url": url}})
    response = await send(
        "POST", url, headers=headers, content=body + b"\n", retry_auth_failures=True
    )
    if not 200 <= response.status_code <= 299:
        raise response_error(response, f"unexpected status code: {response.status_code}")
    service_url, token = _json.parse_response(
        response, _json.parse_admin_connection, "actions service admin connection"
    )
    if not service_url:
        raise protocol_error(response, "actions service admin connection missing url")
    if not token:
        raise protocol_error(response, "actions service admin connection missing token")
    try:
        expires_at = admin_token_expiry(token)
    except ValueError as exc:
        raise protocol_error(response, f"failed to read admin token expiry: {exc}") from exc
    return AdminConnection(url=service_url, token=token, expires_at=expires_at)


class AdminTokenCache:
    """Holds the admin connection and refreshes it when fewer than 60 s of validity remain.

    One refresh runs at a time: concurrent callers wait for it instead of stampeding GitHub.
    A failed refresh keeps the previous connection and fails only the call that triggered it.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[AdminConnection]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._current: AdminConnection | None = None
        self._lock = asyncio.Lock()

    @property
    def current(self) -> AdminConnection | None:
        return self._current

    def _usable(self, connection: AdminConnection | None) -> AdminConnection | None:
        if connection is None or self._clock() + REFRESH_MARGIN > connection.expires_at:
            return None
        return connection

    def invalidate(self, token: str) -> None:
        """Forget the connection holding ``token`` (the service refused it), so the next
        :meth:`get` fetches a new one; a newer connection is kept."""
        if self._current is not None and self._current.token == token:
            self._current = None

    async def get(self) -> AdminConnection:
        if usable := self._usable(self._current):
            return usable
        async with self._lock:
            if usable := self._usable(self._current):  # refreshed while we waited
                return usable
            connection = await self._fetch()
            self._current = connection
            return connection
