"""httpcore's network layer on asyncio's own transports, instead of anyio's streams.

httpx sends through httpcore, which reaches the network through a *network backend*; under
asyncio its default is anyio's, whose streams add a layer of wrappers, cancel scopes and attribute
lookups to every read and write. Measured on the reference machine (2 cores, docs/performance.md)
with one httpx client posting small JSON bodies to a loopback server: 1.7 ms of CPU per request
through anyio, 1.0 ms through this backend. The pool also asks each idle connection whether the
server closed it (``is_readable``) on every request; anyio answers with a ``poll`` system call per
connection, this backend from what the protocol already saw (bytes or an end of stream while
idle), without a system call.

Everything above the socket stays httpcore's and httpx's: HTTP/1.1, the pool, keep-alive, proxies
(the tunnel's connections come from the same backend), TLS settings. Timeouts and errors map to
httpcore's exceptions as its own backends map them, so httpx turns them into its usual ones and
the original error (a certificate that does not verify, say) stays the cause.

:func:`use_asyncio_network` puts the backend under an httpx client. httpx has no parameter for it,
so this sets the pools' backend attribute (httpcore 1.0); should a release rename it, the client
keeps anyio's backend (slower, not broken), and ``tests/scaleset/test_network.py`` fails.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Coroutine, Iterable
from typing import Any, cast

import httpcore
import httpx

__all__ = ["AsyncioBackend", "use_asyncio_network"]

_READ_HIGH_WATER = 1 << 20
"""Bytes buffered unread before the socket stops being read (resumed once drained)."""


class _Protocol(asyncio.Protocol):
    """Buffers what arrives and wakes the one reader waiting for it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.reader: asyncio.Future[None] | None = None
        self.writer: asyncio.Future[None] | None = None
        self.write_paused = False
        self.read_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (not an asyncio.Transport subclass on every event loop: uvloop's
        # are not).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _READ_HIGH_WATER and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
        _wake(self.reader)

    def eof_received(self) -> bool:
        self.eof = True
        _wake(self.reader)
        return False  # close our side too: HTTP/1.1 has no use for a half-closed connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        _wake(self.reader)
        _wake(self.writer)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        _wake(self.writer)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        protocol = self._protocol
        if not protocol.buffer and not protocol.eof:
            protocol.reader = asyncio.get_running_loop().create_future()
            try:
                await _within(timeout, protocol.reader, httpcore.ReadTimeout, "no data")
            finally:
                protocol.reader = None
        buffer = protocol.buffer
        if buffer:
            if len(buffer) <= max_bytes:
                data = bytes(buffer)
                buffer.clear()
            else:
                data = bytes(buffer[:max_bytes])
                del buffer[:max_bytes]
            if protocol.read_paused and len(buffer) <= _READ_HIGH_WATER // 2:
                protocol.read_paused = False
                self._transport.resume_reading()
            return data
        if protocol.error is not None:
            raise httpcore.ReadError(str(protocol.error) or type(protocol.error).__name__)
        return b""  # the end of the stream, as httpcore expects it

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        protocol = self._protocol
        if self._transport.is_closing():
            raise httpcore.WriteError(_closed(protocol))
        self._transport.write(buffer)
        if not protocol.write_paused:
            return
        protocol.writer = asyncio.get_running_loop().create_future()
        try:
            await _within(timeout, protocol.writer, httpcore.WriteTimeout, "could not send")
        finally:
            protocol.writer = None
        if protocol.write_paused:  # woken by connection_lost
            raise httpcore.WriteError(_closed(protocol))

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    self._transport,
                    self._protocol,
                    ssl_context,
                    server_hostname=server_hostname,
                )
        except TimeoutError as exc:
            self._transport.close()
            raise httpcore.ConnectTimeout(f"TLS handshake not done within {timeout} s") from exc
        except (OSError, ssl.SSLError) as exc:
            self._transport.close()
            raise httpcore.ConnectError(str(exc)) from exc
        if transport is None:  # the connection closed during the handshake
            raise httpcore.ConnectError(_closed(self._protocol))
        self._protocol.transport = transport
        return _Stream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # Asked of idle connections: anything received, or the end, means the server is
            # done with it.
            return bool(self._protocol.buffer) or self._protocol.eof
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        return None


def _closed(protocol: _Protocol) -> str:
    error = protocol.error
    return f"connection closed ({error})" if error is not None else "connection closed"


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend on asyncio transports (see the module docstring)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        local = (local_address, 0) if local_address else None
        opening = asyncio.get_running_loop().create_connection(
            _Protocol, host, port, local_addr=local
        )
        return await _connect(opening, timeout, socket_options)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        opening = asyncio.get_running_loop().create_unix_connection(_Protocol, path)
        return await _connect(opening, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _within(
    timeout: float | None,
    waiter: asyncio.Future[None],
    error: type[httpcore.TimeoutException],
    what: str,
) -> None:
    try:
        async with asyncio.timeout(timeout):
            await waiter
    except TimeoutError as exc:
        raise error(f"{what} within {timeout} s") from exc


async def _connect(
    opening: Coroutine[Any, Any, tuple[asyncio.Transport, _Protocol]],
    timeout: float | None,
    options: Iterable[httpcore.SOCKET_OPTION] | None,
) -> _Stream:
    try:
        async with asyncio.timeout(timeout):
            transport, protocol = await opening
    except TimeoutError as exc:
        raise httpcore.ConnectTimeout(f"not connected within {timeout} s") from exc
    except OSError as exc:
        raise httpcore.ConnectError(str(exc)) from exc
    _set_options(transport, options)
    return _Stream(transport, protocol)


def _set_options(
    transport: asyncio.Transport, options: Iterable[httpcore.SOCKET_OPTION] | None
) -> None:
    sock = transport.get_extra_info("socket")
    if not options or sock is None:
        return
    for option in options:
        # asyncio hands out a TransportSocket, which has setsockopt but not the full socket type.
        sock.setsockopt(*option)


def use_asyncio_network(client: httpx.AsyncClient) -> bool:
    """Make ``client``'s connection pools (its own and its proxies') connect through
    :class:`AsyncioBackend`; True when every pool took it. Transports that are not httpx's
    (a test's ``MockTransport``) are left alone."""
    backend = AsyncioBackend()
    transports: list[object] = [getattr(client, "_transport", None)]
    transports += list(getattr(client, "_mounts", {}).values())
    applied = True
    for transport in transports:
        if not isinstance(transport, httpx.AsyncHTTPTransport):
            continue
        pool = getattr(transport, "_pool", None)
        if isinstance(pool, httpcore.AsyncConnectionPool) and hasattr(pool, "_network_backend"):
            pool._network_backend = backend
        else:
            applied = False
    return applied
