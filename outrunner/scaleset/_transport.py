"""The HTTP side of the scale set client, shared by :class:`.Client` and :class:`.MessageSession`.

A :class:`Transport` owns what every request of one client needs: the httpx connection pool (TLS,
proxy, timeouts), the retry policy (``docs/protocol.md`` §6), the admin-token cache (§2) and the
User-Agent (§3.1). ``Client`` builds its endpoints on it and hands it to the message sessions it
opens, so neither module needs the other's internals, and the session's requests get the same
headers, retries and token refresh as the client's.

TLS: by default certificates are verified against the operating system's trust store through
``truststore`` (as pip does), which is where an administrator installs a private CA and what the
Go client uses; httpx's own default would be certifi's bundle. A CA file *replaces* those roots,
like the Go client's ``WithRootCAs``.

Connections: one client serves every scale set with the same URL and credentials, and each of
their message sessions holds a connection for the whole ~50 s long poll. So each session's queue
requests (the long-poll GET and the acknowledging DELETE) go through a small connection pool of
its own (:class:`SessionPool`), as the Go client gives each session an HTTP client of its own
(``docs/protocol.md`` §3.14); the session, token and acquirejobs calls, like every other API call,
share the client's pool (:class:`~outrunner.scaleset._pool.ClientPool`: small httpx clients,
each request through the least busy). Why not one big shared pool with higher limits: httpcore
(1.0) closes an idle connection whenever its pool holds more connections than
``max_keepalive_connections`` (20 by default), so with more than 20 sessions every poll opened a
new connection, a TLS handshake against github.com; the default cap of 100 connections stopped
the 101st poll and left API calls waiting for a poll to end; and its bookkeeping scans every
connection of the pool on each request, quadratically when many are busy or idle at once: on
loopback, 200 sessions whose polls ended together cost 130 ms of CPU per poll in one pool, 2 ms
with a pool per session.

Every pool sends its direct requests through :mod:`outrunner.scaleset._http11` (HTTP/1.1 on
asyncio's transports and h11) instead of httpcore's pool: about half the CPU per request. Proxied
requests go through httpx's own transport, connected through asyncio's transports
(:mod:`outrunner.scaleset._network`) instead of anyio's streams.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import importlib.metadata
import json
import logging
import re
import ssl
import urllib.request
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import httpx
import truststore

from outrunner.scaleset import retry
from outrunner.scaleset._http11 import DirectSender, Http11Transport, use_http11_transport
from outrunner.scaleset._network import use_asyncio_network
from outrunner.scaleset._pool import MAX_SHARDS, SHARD_CONNECTIONS, ClientPool
from outrunner.scaleset.auth import (
    AdminConnection,
    AdminTokenCache,
    Credentials,
    fetch_admin_connection,
    fetch_registration_token,
)
from outrunner.scaleset.errors import ScaleSetError, go_quote
from outrunner.scaleset.retry import RetryPolicy
from outrunner.scaleset.urls import GitHubConfig, actions_url

_log = logging.getLogger("outrunner.scaleset.client")

DEFAULT_TIMEOUT = 300.0
"""Seconds one attempt may take, reading included: the Go client's 5 min, well above the ~50 s
long poll of the message queue (``docs/protocol.md`` §4.1)."""
CONNECT_TIMEOUT = 30.0
"""Seconds to establish a connection (TCP and TLS) within an attempt, like Go's dialer: an
unreachable host must not hold a shutdown for the whole attempt timeout."""
MAX_REDIRECTS = 10  # like Go's http.Client; more is a redirect loop, and is not retried

SYSTEM_TRUST_STORE = "the system trust store"

KEEPALIVE_EXPIRY = 90.0
"""Seconds an idle connection is kept for reuse: Go's ``IdleConnTimeout`` in the pooled transport
the Go client uses, instead of httpx's 5 s, after which a runner's JIT request following a quiet
spell would pay a new TLS handshake. A connection the server closed meanwhile is noticed (it reads
as closed) and not reused."""
API_MAX_CONNECTIONS = MAX_SHARDS * SHARD_CONNECTIONS
"""Connections the client's pool opens at most (httpx's default, 100): API requests beyond it wait
for one, so a burst of runners does not open a connection each."""
SHARD_LIMITS = httpx.Limits(
    max_connections=SHARD_CONNECTIONS,
    # As many idle as may be open: httpcore closes idle connections whenever the pool holds more
    # than this (see the module docstring), and a burst's connections should serve the next one.
    max_keepalive_connections=SHARD_CONNECTIONS,
    keepalive_expiry=KEEPALIVE_EXPIRY,
)
"""Limits of one shard of the client's pool (every request but a message session's queue
requests)."""
SESSION_MAX_CONNECTIONS = 4
"""Connections one session's pool opens at most. A session polls one request at a time; the rest
leave room for an acknowledgement sent while the next poll is out."""
SESSION_LIMITS = httpx.Limits(
    max_connections=SESSION_MAX_CONNECTIONS,
    max_keepalive_connections=SESSION_MAX_CONNECTIONS,
    keepalive_expiry=KEEPALIVE_EXPIRY,
)
"""Limits of a message session's own pool (:class:`SessionPool`)."""


class _NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that keeps nothing. The Go client's ``http.Client`` has no jar, so cookies the
    API sets are never sent back; httpx's default jar would keep them, and parses every response
    for them (4 % of outrunner's CPU at 1,000 runners, ``docs/performance.md``)."""

    def extract_cookies(
        self, response: http.client.HTTPResponse, request: urllib.request.Request
    ) -> None:
        pass

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        pass


@dataclass(frozen=True, kw_only=True)
class SystemInfo:
    """Who is calling; sent in the User-Agent JSON. Update ``scale_set_id`` once it is known."""

    system: str = ""
    version: str = ""
    commit_sha: str = ""
    scale_set_id: int = 0
    subsystem: str = ""


def _build_info() -> tuple[str, str]:
    """The installed outrunner version, and a commit when the version carries one (``+g<sha>``)."""
    try:
        version = importlib.metadata.version("outrunner")
    except importlib.metadata.PackageNotFoundError:
        return "unknown", "unknown"
    commit = re.search(r"(?:^|[+.])g([0-9a-f]{7,40})(?:$|\.)", version.partition("+")[2])
    return version, commit.group(1) if commit else version


_BUILD_VERSION, _BUILD_COMMIT = _build_info()


def user_agent(info: SystemInfo) -> str:
    """The one-line User-Agent JSON, keys in the Go client's order (``docs/protocol.md`` §3.1)."""
    return json.dumps(
        {
            "system": info.system,
            "version": info.version,
            "commit_sha": info.commit_sha,
            "scale_set_id": info.scale_set_id,
            "subsystem": info.subsystem,
            "build_version": _BUILD_VERSION,
            "build_commit_sha": _BUILD_COMMIT,
            "kind": "scaleset",
        },
        separators=(",", ":"),
    )


def tls_context(verify: bool | str | ssl.SSLContext) -> tuple[ssl.SSLContext | bool, str]:
    """The SSL context for a ``verify`` setting, and how error messages name its roots.

    ``True``: the system trust store. A ``str``: that CA bundle (PEM) only; raises
    :class:`ScaleSetError` when it cannot be loaded. An ``SSLContext``: used as given.
    ``False``: no verification.
    """
    if verify is True:
        return truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT), SYSTEM_TRUST_STORE
    if verify is False:
        return False, "none (verification is off)"
    if isinstance(verify, str):
        try:
            # cafile given: the default certificates are not loaded, so the file replaces them.
            context = ssl.create_default_context(cafile=verify)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ScaleSetError(f"cannot load CA file {go_quote(verify)}: {reason}") from exc
        return context, f"CA file {verify}"
    return verify, "the SSL context the client was given"


class Transport:
    """Sends the requests of one client: User-Agent, retries, timeouts, TLS, admin token.

    Creating it makes no network call. See :class:`.Client` for the parameters.
    """

    def __init__(
        self,
        config: GitHubConfig,
        credentials: Credentials,
        *,
        system_info: SystemInfo,
        retry: RetryPolicy,
        timeout: float,
        proxy: str | None,
        verify: bool | str | ssl.SSLContext,
        transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        self.config = config
        self._credentials = credentials
        self._retry = retry
        self._timeout = timeout
        self._system_info = system_info
        self._user_agent = user_agent(system_info)
        context, self._trust = tls_context(verify)
        self._ssl = (
            context
            if isinstance(context, ssl.SSLContext)
            else httpx.create_ssl_context(verify=False)
        )
        self._open_http = partial(
            httpx.AsyncClient,
            proxy=proxy,  # None: HTTP(S)_PROXY, ALL_PROXY and NO_PROXY from the environment
            verify=context,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
            follow_redirects=True,  # like Go's http.Client, which the Go library uses
            cookies=_NoCookies(),  # nor does it keep cookies
            max_redirects=MAX_REDIRECTS,
        )
        # A transport given by the caller makes its own connections: sessions share the client's
        # httpx client over it (closing several would close it several times).
        self._shared_only = transport is not None
        self._http = ClientPool(
            partial(self._new_http, SHARD_LIMITS), max_shards=1 if self._shared_only else MAX_SHARDS
        )
        self._session_pools: weakref.WeakSet[SessionPool] = weakref.WeakSet()
        self.admin = AdminTokenCache(self._fetch_admin_connection)
        """The admin token and Actions service URL, refreshed when fewer than 60 s remain."""

    @property
    def system_info(self) -> SystemInfo:
        return self._system_info

    @system_info.setter
    def system_info(self, info: SystemInfo) -> None:
        self._system_info = info
        self._user_agent = user_agent(info)

    async def aclose(self) -> None:
        """Close the client's pool and the pools of sessions still open."""
        try:
            await self._http.aclose()
        finally:
            for pool in list(self._session_pools):
                await pool.aclose()

    def session_pool(self) -> SessionPool:
        """A connection pool for one message session's queue requests (opened at its first)."""
        pool = SessionPool(self)
        self._session_pools.add(pool)
        return pool

    def _new_http(self, limits: httpx.Limits) -> httpx.AsyncClient:
        http = self._open_http(limits=limits)
        if not self._shared_only:
            use_asyncio_network(http)  # the proxies' pools
            direct = Http11Transport(
                self._ssl,
                max_connections=limits.max_connections or SHARD_CONNECTIONS,
                keepalive_expiry=limits.keepalive_expiry or KEEPALIVE_EXPIRY,
            )
            use_http11_transport(http, direct)
        return http

    def _new_session_http(self) -> httpx.AsyncClient | None:
        """An httpx client for a session's own pool; ``None``: use the client's."""
        if self._shared_only or self._http.is_closed:
            return None
        return self._new_http(SESSION_LIMITS)

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        retry_auth_failures: bool = False,
        via: retry.Sender | None = None,
    ) -> httpx.Response:
        """Every request of the package goes through here: User-Agent, retries, attempt timeout.

        ``retry_auth_failures`` is the runner-registration policy: 401 and 403 are retried too,
        and the last response is handed back when attempts run out (``docs/protocol.md`` §2.3).
        ``via`` is the httpx client of a :class:`SessionPool`; by default the client's own.
        """
        return await retry.send(
            self._http if via is None else via,
            self._retry,
            method,
            url,
            headers={**headers, "User-Agent": self._user_agent},
            content=content,
            attempt_timeout=self._timeout,
            also_retry=(401, 403) if retry_auth_failures else (),
            hand_back_last=retry_auth_failures,
            trust=self._trust,
        )

    async def actions_request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        bearer: str | None = None,
    ) -> httpx.Response:
        """An Actions-service request: admin token refreshed first, ``api-version`` in the query.

        ``bearer`` replaces the admin token (acquirejobs sends the message-queue token).
        """
        admin = await self.admin.get()
        send = partial(self._actions_send, method, path, params=params, content=content)
        response = await send(bearer=bearer, admin=admin)
        if response.status_code == 401 and bearer is None:
            # The service refused an admin token that had not expired (revoked, or the PAT
            # behind it was): fetch a new one and try once more. Unlike the Go client, which
            # keeps sending the refused token until it nears expiry; a revoked PAT then fails
            # at the token exchange, which is what tells a permanent failure (docs/protocol.md
            # §2.5).
            self.admin.invalidate(admin.token)
            response = await send(bearer=bearer, admin=await self.admin.get())
        return response

    async def _actions_send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None,
        content: bytes | None,
        bearer: str | None,
        admin: AdminConnection,
    ) -> httpx.Response:
        headers = {
            "Content-Type": "application/json",  # on every method, GET and DELETE included
            "Authorization": f"Bearer {bearer if bearer is not None else admin.token}",
        }
        url = actions_url(admin.url, path, params)
        return await self.send(method, url, headers=headers, content=content)

    async def _fetch_admin_connection(self) -> AdminConnection:
        _log.info("Refreshing admin token", extra={"attrs": {"config_url": self.config.config_url}})
        registration_token = await fetch_registration_token(
            self.send, self.config, self._credentials
        )
        return await fetch_admin_connection(self.send, self.config, registration_token)


class SessionPool:
    """The connection pool of one message session's queue requests (see the module docstring).

    Requests carry the :class:`Transport`'s User-Agent, retries and timeouts. The pool opens at the
    first request and again after :meth:`aclose`, so closing it early (the session is deleted, or
    GitHub no longer has it) frees its connection without breaking a later request. With a
    transport given to the client (tests), requests use the client's httpx client instead.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._sender: DirectSender | None = None

    @property
    def is_open(self) -> bool:
        """True while the pool has an httpx client of its own (and may hold a connection)."""
        return self._http is not None

    async def send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
    ) -> httpx.Response:
        """:meth:`Transport.send` through this pool."""
        if self._http is None:
            self._http = self._transport._new_session_http()
            self._sender = None if self._http is None else DirectSender(self._http)
        return await self._transport.send(
            method, url, headers=headers, content=content, via=self._sender
        )

    async def aclose(self) -> None:
        """Close the pool's connections; idempotent. A later request opens it again."""
        http, self._http, self._sender = self._http, None, None
        if http is not None:
            await http.aclose()
