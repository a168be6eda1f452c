"""HTTP/1.1 for the client's direct connections: an httpx transport on asyncio's transports and h11.

httpx sends through a *transport*; its own (``httpx.AsyncHTTPTransport``) is httpcore's connection
pool, which wraps every step of a request in anyio locks and cancel scopes, trace hooks and a scan
of the pool's connections, and reads through a network backend (``_network.py``). Measured on the
reference machine (2 cores, ``docs/performance.md``) with small JSON posts to a loopback server in
another process, the client's CPU per request: 1.0-1.6 ms through ``httpx.AsyncClient`` over
httpcore, 0.6-0.8 ms over this transport, of which this transport is 0.4-0.5 ms. At 1,000 runners
the API calls were half of outrunner's CPU.

What stays httpx's: the request and response objects (requests built the cheap way by
``_request.py``), redirects, decoding the body, timeouts' configuration, errors, and proxies (a
proxied URL goes through the transport httpx mounts for it, which ``use_asyncio_network`` sets
up). What stays h11's: the protocol (framing, chunked bodies, keep-alive rules, validation).
What is written here is the pool and the socket:

* at most ``max_connections`` open (or opening) at once; requests beyond wait for one, first
  come first served, until the request's ``pool`` timeout from when it asked
  (:class:`httpx.PoolTimeout`); an idle connection to another server is closed to make room;
* an idle connection is reused, the most recent first, unless it is past ``keepalive_expiry``
  or received anything while idle (an end of stream, a stray byte: the protocol saw it arrive,
  no system call needed); such idle connections are closed, all of them, by the next request
  at most :data:`SWEEP_EVERY` after the last sweep (a quarter of ``keepalive_expiry`` if less):
  sweeping every pool on every request was 1 % of outrunner's CPU at 1,000 runners;
* the request's ``connect`` timeout bounds TCP and TLS, ``read`` each wait for the server,
  ``write`` each wait for the socket to drain; errors are httpx's (``ConnectError``,
  ``ReadTimeout``, ``RemoteProtocolError``...), the original error as the cause;
* a request that fails or is cancelled mid-way closes its connection: what is left on it is
  unknown.

The whole response is read before it is handed back: the API's bodies are small, and the caller
reads them at once anyway (``retry.send``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
from collections import deque
from collections.abc import Mapping
from typing import Any, cast

import h11
import httpx

from outrunner.scaleset._request import build_request

__all__ = ["DirectSender", "Http11Transport", "send_direct", "use_http11_transport"]

_httpx_log = logging.getLogger("httpx")
# send_direct uses three of httpx's private methods (present from 0.18 to 0.28); a release without
# them turns it into plain client.send, slower but the same.
_SHORT_WAY = all(
    hasattr(httpx.AsyncClient, name)
    for name in ("_transport_for_url", "_build_redirect_request", "_send_handling_redirects")
)

SWEEP_EVERY = 1.0
"""Seconds between two sweeps of the idle connections (see the module docstring)."""

MAX_HEAD_BYTES = 100 * 1024
"""The largest response head accepted (httpcore's limit too)."""


class _Connection(asyncio.Protocol):
    """One connection: h11's state, and what arrived for the request in flight."""

    def __init__(self, key: tuple[bytes, bytes, int | None]) -> None:
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.transport: asyncio.Transport | None = None
        self.busy = True  # a connection is made for a request
        self.stale = False  # something arrived while idle
        self.ended = False  # the server's end of stream, or the connection is lost
        self.error: BaseException | None = None
        self.idle_since = 0.0
        # What the request in flight waits for: data, the end, or the socket drained (it never
        # waits for two at once: it writes, then reads).
        self.waiter: asyncio.Future[bool] | None = None
        self.write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.stale = True
            return
        self.h11.receive_data(data)
        _wake(self.waiter)

    def eof_received(self) -> bool:
        self._end()
        return False  # close our side too: HTTP/1.1 has no use for a half-closed connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc
        self._end()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        _wake(self.waiter)

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.busy:
            self.h11.receive_data(b"")  # h11 tells a clean end from one mid-response
        _wake(self.waiter)

    def reusable(self, loop: asyncio.AbstractEventLoop, expiry: float) -> bool:
        return (
            self.loop is loop  # a connection of an event loop that ended is of no use
            and not self.stale
            and not self.ended
            and self.transport is not None
            and not self.transport.is_closing()
            and loop.time() - self.idle_since < expiry
        )

    async def exchange(self, request: httpx.Request, timeouts: dict[str, Any]) -> httpx.Response:
        """Send ``request`` and read its whole response."""
        connection = self.h11
        url = request.url
        head = h11.Request(method=request.method, target=url.raw_path, headers=request.headers.raw)
        try:
            out = [connection.send(head)]
            async for chunk in cast(httpx.AsyncByteStream, request.stream):
                if chunk:
                    out.append(connection.send(h11.Data(data=chunk)))
            out.append(connection.send(h11.EndOfMessage()))
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from exc
        await self._write(b"".join(out), timeouts.get("write"))
        read_timeout = timeouts.get("read")
        response: h11.Response | None = None
        body: list[bytes] = []
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as exc:
                text = str(exc)
                if self.ended and response is None:  # h11 words it as a state error
                    text = "Server disconnected without sending a response."
                raise self._read_error(text) from (self.error or exc)
            if event is h11.NEED_DATA:
                await self._readable(read_timeout)
                continue
            if event is h11.PAUSED:
                # 101 Switching Protocols (or a CONNECT's answer): h11 hands the connection
                # over; this transport speaks nothing else, and waiting would never end.
                raise httpx.RemoteProtocolError("the server switched protocols")
            kind = type(event)
            if kind is h11.Data:
                body.append(cast(h11.Data, event).data)
            elif kind is h11.Response:
                response = cast(h11.Response, event)
            elif kind is h11.EndOfMessage:
                break
            elif kind is h11.ConnectionClosed:
                raise self._read_error("Server disconnected without sending a response.")
            # InformationalResponse (1xx): the final response follows.
        assert response is not None  # h11 ends a message only after its head
        return httpx.Response(
            response.status_code,
            headers=response.headers.raw_items(),
            stream=httpx.ByteStream(b"".join(body)),
            extensions={
                "http_version": b"HTTP/" + response.http_version,
                "reason_phrase": response.reason,
            },
        )

    def finished_cleanly(self) -> bool:
        """The exchange ended so that the connection may carry another."""
        connection = self.h11
        return (
            connection.our_state is h11.DONE
            and connection.their_state is h11.DONE
            and not connection.trailing_data[0]
            and not self.ended
        )

    def _read_error(self, text: str) -> httpx.TransportError:
        if self.error is not None:  # reset, not closed: the OS's error says more
            return httpx.ReadError(str(self.error) or type(self.error).__name__)
        return httpx.RemoteProtocolError(text)

    async def _readable(self, timeout: float | None) -> None:
        if self.ended:  # h11 has been told; it cannot need more
            raise self._read_error("Server disconnected without sending a response.")
        if not await self._wait(timeout):
            raise httpx.ReadTimeout(f"no data within {timeout} s")

    async def _write(self, data: bytes, timeout: float | None) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise httpx.WriteError(self._closed_text())
        transport.write(data)
        while self.write_paused and not self.ended:  # an early reply also wakes the wait
            if not await self._wait(timeout):
                raise httpx.WriteTimeout(f"could not send within {timeout} s")
        if self.write_paused:
            raise httpx.WriteError(self._closed_text())

    async def _wait(self, timeout: float | None) -> bool:
        """Wait to be woken; False when ``timeout`` seconds passed first."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        try:
            if timeout is None:
                return await waiter
            # A timer on the future instead of asyncio.timeout(): no task bookkeeping.
            timer = asyncio.get_running_loop().call_later(timeout, _expire, waiter)
            try:
                return await waiter
            finally:
                timer.cancel()
        finally:
            self.waiter = None

    def _closed_text(self) -> str:
        return f"connection closed ({self.error})" if self.error else "connection closed"


def _wake(waiter: asyncio.Future[bool] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(True)


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


def _granted(turn: asyncio.Future[bool]) -> bool:
    """A wait for a connection was woken (not expired, not cancelled)."""
    return turn.done() and not turn.cancelled() and turn.result()


class Http11Transport(httpx.AsyncBaseTransport):
    """An httpx transport speaking HTTP/1.1 over direct connections (see the module docstring).

    ``ssl_context`` verifies HTTPS servers (and carries client settings); ``max_connections`` and
    ``keepalive_expiry`` are the pool's limits, as in :class:`httpx.Limits`.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        max_connections: int,
        keepalive_expiry: float,
    ) -> None:
        if max_connections < 1:
            raise ValueError("a connection pool needs at least one connection")
        self._ssl = ssl_context
        self._max = max_connections
        self._expiry = keepalive_expiry
        self._sweep_every = min(SWEEP_EVERY, keepalive_expiry / 4)
        self._swept = -math.inf
        self._idle: dict[tuple[bytes, bytes, int | None], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._opening = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()
        """Requests waiting for a connection, first come first served: True when woken, False
        when their pool timeout passed."""
        self._closed = False

    @property
    def connections(self) -> int:
        """Connections open or opening."""
        return len(self._open) + self._opening

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        connection = await self._acquire(request.url, timeouts)
        try:
            response = await connection.exchange(request, timeouts)
        except BaseException:
            self._drop(connection, abort=True)
            raise
        self._release(connection)
        return response

    async def aclose(self) -> None:
        self._closed = True
        for connection in list(self._open):
            self._drop(connection, abort=True)
        for waiter in self._waiters:
            _wake(waiter)

    async def _acquire(self, url: httpx.URL, timeouts: dict[str, Any]) -> _Connection:
        if url.scheme not in ("http", "https"):  # as httpcore words it
            raise httpx.UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{url.scheme}://'."
                if url.scheme
                else "Request URL is missing an 'http://' or 'https://' protocol."
            )
        if not url.host:
            raise httpx.UnsupportedProtocol("Request URL is missing a host.")
        key = (url.raw_scheme, url.raw_host, url.port)
        loop = asyncio.get_running_loop()
        timeout: float | None = timeouts.get("pool")
        deadline = None if timeout is None else loop.time() + timeout
        waited = False
        while True:
            if self._closed:
                raise RuntimeError("the connection pool is closed")
            now = loop.time()
            if now - self._swept >= self._sweep_every:
                self._sweep(loop)
                self._swept = now
            idle = self._idle.get(key)
            if idle:
                connection = idle.pop()
                if not connection.reusable(loop, self._expiry):
                    self._drop(connection)
                    continue
                connection.busy = True
                return connection
            if self.connections < self._max:
                return await self._connect(key, url, timeouts.get("connect"))
            # Full: an idle connection to another server makes room, else wait for a turn.
            other = next((rest for rest in self._idle.values() if rest), None)
            if other is not None:
                self._drop(other[0], wake=False)  # the room is this request's
                continue
            # A request woken before finds its turn taken only by a newcomer: it goes back to
            # the head of the queue, with the deadline it started with.
            await self._wait_turn(deadline, timeout, first=waited)
            waited = True

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close idle connections past their expiry, or that the server closed or wrote to."""
        for idle in self._idle.values():
            for connection in [c for c in idle if not c.reusable(loop, self._expiry)]:
                self._drop(connection)

    async def _wait_turn(self, deadline: float | None, timeout: float | None, first: bool) -> None:
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[bool] = loop.create_future()
        if first:
            self._waiters.appendleft(turn)
        else:
            self._waiters.append(turn)
        # A timer that resolves the same future as a wake-up: which came first is decided once.
        timer = None if deadline is None else loop.call_at(deadline, _expire, turn)
        try:
            woken = await turn
        except BaseException:
            if _granted(turn):
                self._wake_next()  # this turn came but is not taken: pass it on
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if not _granted(turn):  # expired or cancelled: _wake_next has not taken it out
                with contextlib.suppress(ValueError):
                    self._waiters.remove(turn)
        if not woken:
            raise httpx.PoolTimeout(f"no connection free within {timeout} s")

    def _wake_next(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(True)
                return

    async def _connect(
        self, key: tuple[bytes, bytes, int | None], url: httpx.URL, timeout: float | None
    ) -> _Connection:
        secure = url.scheme == "https"
        # The IDNA form httpx encoded, as the Host header names it (the str form would be encoded
        # again by the socket layer, with the older IDNA rules).
        host = url.raw_host.decode("ascii")
        port = url.port or (443 if secure else 80)
        loop = asyncio.get_running_loop()
        self._opening += 1
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(key),
                    host,
                    port,
                    ssl=self._ssl if secure else None,
                    server_hostname=host if secure else None,
                )
        except BaseException as exc:
            self._opening -= 1
            self._wake_next()  # the slot this took is free again
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout(f"not connected within {timeout} s") from exc
            if isinstance(exc, OSError):  # ssl.SSLError too: a certificate that does not verify
                raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
            raise
        self._opening -= 1
        if self._closed:
            connection.transport.abort()  # type: ignore[union-attr]
            raise RuntimeError("the connection pool is closed")
        self._open.add(connection)
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection not in self._open:  # dropped meanwhile (the pool closed)
            return
        if not connection.finished_cleanly():
            self._drop(connection)
            return
        connection.h11.start_next_cycle()
        connection.busy = False
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(connection.key, []).append(connection)
        self._wake_next()

    def _drop(self, connection: _Connection, *, abort: bool = False, wake: bool = True) -> None:
        if connection not in self._open:
            return
        self._open.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
        transport = connection.transport
        if transport is not None:
            # The loop of a connection left from an earlier asyncio.run() is closed: the socket
            # is then closed when the transport is collected.
            with contextlib.suppress(RuntimeError):
                transport.abort() if abort else transport.close()
        if wake:
            self._wake_next()


def use_http11_transport(client: httpx.AsyncClient, transport: Http11Transport) -> bool:
    """Send ``client``'s direct requests through ``transport``; True when it took.

    httpx's ``transport=`` argument would also turn off the proxies of the environment
    (``HTTP(S)_PROXY``, ``NO_PROXY``), so the client is made as usual and its default transport
    (httpx's, with no connection yet) swapped. A client whose default transport is not httpx's
    own (a test's ``MockTransport``) is left alone.
    """
    if not isinstance(getattr(client, "_transport", None), httpx.AsyncHTTPTransport):
        return False
    client._transport = transport
    return True


async def send_direct(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """``client.send(request)``, its body read, taking a short way for a direct request.

    httpx's ``send`` walks every request through its auth flow, event hooks, redirect loop and
    cookie jar, which for this package's requests have nothing to do (no auth or hooks on the
    client, no jar: ``_transport.py``), yet were a tenth of outrunner's CPU at 1,000 runners
    (``docs/performance.md``). So a request whose transport is an :class:`Http11Transport`
    goes to it directly; its response gets what httpx's ``send`` would give it (its request, its
    body read). A redirect goes back to httpx's redirect loop, with this response as the first of
    its history (so ``max_redirects`` counts the same). Anything else (a proxied URL, a client
    with auth, hooks or no redirects, user info in the URL) takes ``client.send`` all the way.
    """
    if not _SHORT_WAY:
        return await client.send(request)
    transport = client._transport_for_url(request.url)
    if (
        not isinstance(transport, Http11Transport)
        or client.auth is not None
        or client.event_hooks["request"]
        or client.event_hooks["response"]
        or request.url.userinfo
        or client.is_closed
        or not client.follow_redirects
    ):
        return await client.send(request)
    try:
        response = await transport.handle_async_request(request)
    except httpx.RequestError as exc:
        exc.request = request  # as httpx's request_context() sets it
        raise
    response.request = request
    if _httpx_log.isEnabledFor(logging.INFO):  # the line httpx's send logs for each request
        _httpx_log.info(
            'HTTP Request: %s %s "%s %d %s"',
            request.method,
            request.url,
            response.http_version,
            response.status_code,
            response.reason_phrase,
        )
    try:
        await response.aread()
        if response.has_redirect_location:
            redirect = client._build_redirect_request(request, response)
            response = await client._send_handling_redirects(
                redirect, follow_redirects=True, history=[response]
            )
            await response.aread()
    except BaseException:
        await response.aclose()
        raise
    return response


class DirectSender:
    """An httpx client as a :class:`outrunner.scaleset.retry.Sender` that sends through
    :func:`send_direct`."""

    __slots__ = ("http",)

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    def build_request(
        self, method: str, url: str, *, headers: Mapping[str, str], content: bytes | None
    ) -> httpx.Request:
        return build_request(self.http, method, url, headers=headers, content=content)

    async def send(self, request: httpx.Request) -> httpx.Response:
        return await send_direct(self.http, request)
