"""Credentials and the admin-token exchange (``docs/protocol.md`` §2).

Every Actions-service call needs an *admin token*, obtained in two GitHub REST calls::

    POST {api}/…/actions/runners/registration-token  Bearer <credential>     -> 201 {"token"}
    POST {api}/actions/runner-registration           RemoteAuth <reg token>  -> 2xx {"url","token"}

giving the Actions service base URL and the admin token (a JWT).

:class:`AdminTokenCache` keeps the result and reruns the exchange when fewer than 60 s remain.

Credentials plug in at one point: :meth:`Credentials.authorization` returns the ``Authorization``
value for the registration-token request. :class:`PersonalAccessToken` returns ``Bearer <PAT>``.
:class:`GitHubApp` fits the same slot: it mints an RS256 JWT (``iss`` = the client id or App id,
``iat`` = now - 60 s, ``exp`` = iat + 9 min, like the Go client), POSTs it to
``/app/installations/{id}/access_tokens`` on ``config.api_base`` and returns
``Bearer <installation token>``. Unlike the Go client, which mints a new installation token for
every admin-token refresh, it keeps the token (GitHub's last an hour) and mints the next one when
fewer than 5 minutes remain, or when the registration-token call refuses it (401): one request
fewer per refresh, and one call fewer that can fail while GitHub is degraded.

The App needs PyJWT with its crypto extra (``pip install 'outrunner[app]'``), imported only when a
:class:`GitHubApp` is created, so the rest of the package works without it.
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
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import httpx

from outrunner.scaleset import _json
from outrunner.scaleset.errors import StatusError, protocol_error, response_error, status_line
from outrunner.scaleset.urls import GitHubConfig

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

_log = logging.getLogger("outrunner.scaleset.auth")

# Algorithms golang-jwt knows; an unknown "alg" makes its unverified parse fail, so ours does too.
_KNOWN_ALGS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512"}
    | {"PS256", "PS384", "PS512", "EdDSA", "none"}
)
REFRESH_MARGIN = 60.0  # seconds of validity below which the admin token is refreshed

APP_EXTRA_HINT = "pip install 'outrunner[app]'"
"""How to install what :class:`GitHubApp` needs (PyJWT with its crypto extra)."""
APP_JWT_BACKDATE = 60.0
"""Seconds the App JWT's ``iat`` lies in the past, so a clock slightly ahead of GitHub's works."""
APP_JWT_LIFETIME = 540.0
"""Seconds from the App JWT's ``iat`` to its ``exp``: 9 min, inside GitHub's 10 min cap."""
INSTALLATION_TOKEN_REFRESH_MARGIN = 300.0
"""Seconds of validity below which a cached installation token is replaced (GitHub's last 1 h)."""


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


@runtime_checkable
class RefreshableCredentials(Credentials, Protocol):
    """Credentials whose value can go stale before they know it (a cached installation token).

    When the registration-token request answers 401, :func:`fetch_registration_token` calls
    :meth:`invalidate` with the refused ``Authorization`` value; ``True`` means a new one can be
    had, and the request is sent once more with it.
    """

    def invalidate(self, authorization: str) -> bool: ...


class GitHubAppError(StatusError):
    """GitHub refused a GitHub App's credentials: the installation-token request (bad JWT, unknown
    or suspended installation) or the registration-token request made with its installation
    token (missing permission, installation without access to the org or repository).

    The message starts with ``GitHub App <client id or App id> (installation <id>): `` and ends
    with what usually causes that status; ``app`` and ``installation_id`` say the same.
    """

    app: str = ""
    installation_id: int = 0


def load_app_private_key(pem: str | bytes) -> RSAPrivateKey:
    """Parse a GitHub App private key: a PEM RSA key, PKCS#1 (``BEGIN RSA PRIVATE KEY``, what
    GitHub hands out) or PKCS#8 (``BEGIN PRIVATE KEY``), without a passphrase.

    Raises :class:`ImportError` without the ``app`` extra, :class:`ValueError` for anything else;
    neither message contains key material.
    """
    try:
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError as exc:
        raise ImportError(
            f"GitHub App authentication needs PyJWT with its crypto extra ({APP_EXTRA_HINT})"
        ) from exc
    data = pem.encode() if isinstance(pem, str) else pem
    if b"-----BEGIN" not in data:
        raise ValueError("not a PEM file (no -----BEGIN line)")
    if b"ENCRYPTED PRIVATE KEY" in data or b"Proc-Type: 4,ENCRYPTED" in data:
        raise ValueError("the private key is encrypted with a passphrase; use it unencrypted")
    if b"PRIVATE KEY-----" not in data:
        raise ValueError("not a PEM private key (a public key or a certificate?)")
    try:
        key = load_pem_private_key(data, password=None)
    except Exception:  # ValueError, TypeError, UnsupportedAlgorithm: all mean "not usable"
        # from None: the parser's error may quote the data it could not parse.
        raise ValueError("not a valid PEM private key (it cannot be parsed)") from None
    if not isinstance(key, RSAPrivateKey):
        raise ValueError(f"not an RSA key ({_key_kind(key)}): GitHub App private keys are RSA")
    return key


def _key_kind(key: object) -> str:
    """``EC``, ``Ed25519``, ...: the kind of a private key, from its class name."""
    return type(key).__name__.removeprefix("_").removesuffix("PrivateKey") or "unknown"


@dataclass(frozen=True)
class _InstallationToken:
    token: str = field(repr=False)
    fetched_at: float
    expires_at: float | None  # None: GitHub sent no usable expires_at; used once


class GitHubApp:
    """A GitHub App installation: the JWT, the installation token, and its cache.

    ``client_id`` is the App's client id (``Iv1.…`` or ``Iv23…``, what GitHub recommends as the
    JWT issuer) or its numeric App id; ``installation_id`` the installation on the organization
    or repository; ``private_key`` the PEM private key (parsed now: ``ValueError`` if it is not an
    RSA private key, ``ImportError`` without the ``app`` extra).

    The installation token is cached per REST API base and replaced when fewer than
    ``refresh_margin`` seconds remain (at most half its lifetime), or when the registration-token
    request refuses it; concurrent callers wait for one refresh. ``clock`` gives the time for the
    JWT claims and the cache (tests).

    Nothing here logs the JWT, the installation token or the key. ``register_secret`` is called
    with every JWT and installation token before it is sent anywhere, ``unregister_secret`` with
    each once it is no longer used, so a log redactor (``outrunner.log.register_secret``) can
    mask them wherever they might surface.

    GitHub installs Apps on organizations and repositories only, so an App cannot register
    enterprise-level runners (GitHub's ARC documentation says the same); that needs a PAT.
    """

    def __init__(
        self,
        client_id: str | int,
        installation_id: int,
        private_key: str | bytes,
        *,
        refresh_margin: float = INSTALLATION_TOKEN_REFRESH_MARGIN,
        clock: Callable[[], float] = time.time,
        register_secret: Callable[[str], None] | None = None,
        unregister_secret: Callable[[str], None] | None = None,
    ) -> None:
        issuer = str(client_id).strip() if not isinstance(client_id, bool) else ""
        if not issuer:
            raise ValueError("GitHub App client id (or App id) is empty")
        if isinstance(installation_id, bool) or installation_id <= 0:
            raise ValueError(f"GitHub App installation id must be positive, got {installation_id}")
        try:
            import jwt  # noqa: F401 - fail now, not at the first token
        except ImportError as exc:
            raise ImportError(
                f"GitHub App authentication needs PyJWT with its crypto extra ({APP_EXTRA_HINT})"
            ) from exc
        self._key = load_app_private_key(private_key)
        self.issuer = issuer
        """The JWT ``iss``: the client id, or the App id as a string (as the Go client sends)."""
        self.installation_id = installation_id
        self._refresh_margin = refresh_margin
        self._clock = clock
        self._register = register_secret
        self._unregister = unregister_secret
        self._tokens: dict[str, _InstallationToken] = {}
        self._lock = asyncio.Lock()

    @property
    def label(self) -> str:
        """``GitHub App Iv1.abc (installation 42)``: how messages name this App."""
        return f"GitHub App {self.issuer} (installation {self.installation_id})"

    def __repr__(self) -> str:
        return f"GitHubApp({self.issuer!r}, {self.installation_id}, <private key>)"

    def jwt(self) -> str:
        """A fresh App JWT (RS256; ``iat`` = now - 60 s, ``exp`` = iat + 9 min, ``iss``)."""
        import jwt

        issued = int(self._clock() - APP_JWT_BACKDATE)
        claims = {"iat": issued, "exp": issued + int(APP_JWT_LIFETIME), "iss": self.issuer}
        return jwt.encode(claims, self._key, algorithm="RS256")

    async def authorization(self, send: Requester, config: GitHubConfig) -> str:
        token = self._usable(config.api_base)
        if token is None:
            async with self._lock:
                token = self._usable(config.api_base)  # refreshed while we waited
                if token is None:
                    token = await self._mint(send, config)
        return f"Bearer {token}"

    def invalidate(self, authorization: str) -> bool:
        """Forget the installation token in ``authorization`` (GitHub refused it); ``True`` when
        it was the cached one, so the next :meth:`authorization` mints another."""
        for base, cached in list(self._tokens.items()):
            if authorization == f"Bearer {cached.token}":
                del self._tokens[base]
                self._retire(cached.token)
                return True
        return False

    def _usable(self, api_base: str) -> str | None:
        cached = self._tokens.get(api_base)
        if cached is None or cached.expires_at is None:
            return None
        lifetime = cached.expires_at - cached.fetched_at
        margin = min(self._refresh_margin, lifetime / 2)
        if self._clock() + margin >= cached.expires_at:
            return None
        return cached.token

    async def _mint(self, send: Requester, config: GitHubConfig) -> str:
        url = config.api_url(f"/app/installations/{self.installation_id}/access_tokens")
        assertion = self.jwt()
        headers = {
            "Accept": "application/vnd.github+json",
            "Content-Type": "application/vnd.github+json",  # what the Go client sends
            "Authorization": f"Bearer {assertion}",
        }
        _log.info(
            "Getting access token for GitHub App auth",
            extra={"attrs": {"url": url, "app": self.issuer}},
        )
        fetched_at = self._clock()
        if self._register is not None:
            self._register(assertion)
        try:
            response = await send("POST", url, headers=headers, content=b"")
        finally:
            if self._unregister is not None:
                self._unregister(assertion)
        if response.status_code != 201:
            cause = f"failed to get access token for GitHub App auth ({status_line(response)})"
            raise self.error(response, cause)
        token, expires = _json.parse_response(
            response, _parse_access_token, "access token for GitHub App auth"
        )
        if not token:
            raise protocol_error(response, "access token for GitHub App auth missing token")
        if self._register is not None:
            self._register(token)
        previous = self._tokens.pop(config.api_base, None)
        if expires is not None:
            self._tokens[config.api_base] = _InstallationToken(token, fetched_at, expires)
        if previous is not None:
            self._retire(previous.token)
        _log.debug(
            "Got installation token for GitHub App auth",
            extra={"attrs": {"app": self.issuer, "expires_at": expires}},
        )
        return token

    def _retire(self, token: str) -> None:
        if self._unregister is not None:
            self._unregister(token)

    def error(self, response: httpx.Response, cause: str) -> GitHubAppError:
        """The error for a refusal of this App's credentials, naming the App and installation."""
        base = response_error(response, cause)
        hint = _APP_HINTS.get((_endpoint(response), response.status_code))
        if "Integration not found" in base.detail:
            hint = "no App has this client id or App id on this GitHub"
        message = f"{self.label}: {base.message}" + (f" ({hint})" if hint else "")
        error = GitHubAppError(
            message,
            method=base.method,
            url=base.url,
            status=base.status,
            activity_id=base.activity_id,
            request_id=base.request_id,
        )
        error.type_name, error.detail = base.type_name, base.detail
        error.app, error.installation_id = self.issuer, self.installation_id
        return error


_APP_HINTS: dict[tuple[str, int], str] = {
    ("access_tokens", 401): (
        "the App JWT was refused: a private key that is not this App's, a wrong client_id or "
        "app_id, or a clock more than a minute off"
    ),
    ("access_tokens", 403): "the installation is suspended, or the App may not use it",
    ("access_tokens", 404): (
        "the App has no such installation: check installation_id, and that the App is installed "
        "on the organization or repository"
    ),
    ("registration-token", 401): "the installation token was refused (App uninstalled?)",
    ("registration-token", 403): (
        "the App lacks a permission: Administration (read and write) for repository scale "
        "sets, Self-hosted runners (read and write) for organization ones"
    ),
    ("registration-token", 404): (
        "the installation cannot see this organization or repository (installed on another "
        "account, or not given this repository); enterprise runners cannot use a GitHub App"
    ),
}


def _endpoint(response: httpx.Response) -> str:
    return response.request.url.path.rstrip("/").rsplit("/", 1)[-1]


def _parse_access_token(raw: object) -> tuple[str, float | None]:
    obj = _json._Object(raw, "accessToken")
    token = obj.string("token")
    try:
        expires = obj.timestamp("expires_at")
    except _json.DecodeError:
        expires = None  # optional for us: without it the token is used once, like Go does
    return token, None if expires is None else expires.timestamp()


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
    _log.info("Getting runner registration token", extra={"attrs": {"url": url}})
    authorization = await credentials.authorization(send, config)
    response = await _post_registration_token(send, url, authorization)
    if (
        response.status_code == 401
        and isinstance(credentials, RefreshableCredentials)
        and credentials.invalidate(authorization)
    ):
        # A cached installation token refused before its expiry (revoked, App reinstalled).
        authorization = await credentials.authorization(send, config)
        response = await _post_registration_token(send, url, authorization)
    if response.status_code != 201:
        cause = f"failed to get runner registration token ({status_line(response)})"
        if isinstance(credentials, GitHubApp):
            raise credentials.error(response, cause)
        raise response_error(response, cause)
    token = _json.parse_response(response, _json.parse_registration_token, "registration token")
    if not token:
        raise protocol_error(response, "runner registration token missing token")
    return token


async def _post_registration_token(send: Requester, url: str, authorization: str) -> httpx.Response:
    headers = {"Content-Type": "application/vnd.github.v3+json", "Authorization": authorization}
    return await send("POST", url, headers=headers, content=b"")


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
