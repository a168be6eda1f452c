"""The asyncio network backend under httpx (``_network.py``) and the client's sharded pool
(``_pool.py``), over real sockets on loopback.

The server is a small asyncio HTTP/1.1 server written here so that each test controls exactly what
happens on the wire: how many connections were accepted, a connection closed while idle, a reply
that never comes, a large body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpcore
import httpx
import pytest

from outrunner.scaleset import Client
from outrunner.scaleset._network import AsyncioBackend, use_asyncio_network
from outrunner.scaleset._pool import ClientPool
from outrunner.scaleset._transport import SHARD_LIMITS
from outrunner.scaleset.auth import PersonalAccessToken

pytestmark = pytest.mark.anyio

Handler = Callable[[bytes, bytes], Awaitable[bytes | None]]
"""(request head, request body) -> the whole response to write, or None to close at once."""


def response(body: bytes = b"ok", status: str = "200 OK", close: bool = False) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


@dataclass
class Server:
    handler: Handler
    port: int = 0
    accepted: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                reply = await self.handler(head, body)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close_idle_connections(self) -> None:
        for writer in self.writers:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> Server:
        server = Server(handler)
        listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        server.port = listening.sockets[0].getsockname()[1]
        servers.append(listening)
        return server

    yield start
    for listening in servers:
        listening.close()


async def ok(head: bytes, body: bytes) -> bytes:
    return response(b'{"ok":true}')


def fast_client(**kwargs: object) -> httpx.AsyncClient:
    http = httpx.AsyncClient(trust_env=False, **kwargs)  # type: ignore[arg-type]
    assert use_asyncio_network(http)
    return http


async def test_the_scale_set_client_connects_through_the_asyncio_backend() -> None:
    # Guards an httpx/httpcore upgrade: the backend is set through httpcore's pool attribute.
    client = Client("https://github.com/org", PersonalAccessToken("t"))
    try:
        transport = client._transport
        shard = transport._http._shards[0].http
        pool = shard._transport._pool  # type: ignore[attr-defined]
        assert isinstance(pool._network_backend, AsyncioBackend)
        session_http = transport._new_session_http()
        assert session_http is not None
        assert isinstance(
            session_http._transport._pool._network_backend,  # type: ignore[attr-defined]
            AsyncioBackend,
        )
        await session_http.aclose()
    finally:
        await client.aclose()


async def test_proxied_pools_take_the_backend_too() -> None:
    http = httpx.AsyncClient(
        trust_env=False, mounts={"http://": httpx.AsyncHTTPTransport(proxy="http://127.0.0.1:1")}
    )
    try:
        assert use_asyncio_network(http)
        proxy_pool = http._mounts[next(iter(http._mounts))]._pool  # type: ignore[union-attr]
        assert isinstance(proxy_pool._network_backend, AsyncioBackend)
    finally:
        await http.aclose()


async def test_a_mock_transport_is_left_alone() -> None:
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(204)))
    try:
        assert use_asyncio_network(http)  # nothing of httpx's to change
        assert (await http.get("http://x/")).status_code == 204
    finally:
        await http.aclose()


async def test_requests_reuse_one_connection(serve: Callable[[Handler], Awaitable[Server]]) -> None:
    server = await serve(ok)
    async with fast_client() as http:
        for _ in range(20):
            reply = await http.post(f"{server.url}/x", json={"a": 1})
            assert reply.json() == {"ok": True}
    assert server.accepted == 1


async def test_a_connection_the_server_closed_while_idle_is_not_reused(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    server = await serve(ok)
    async with fast_client() as http:
        assert (await http.get(f"{server.url}/a")).status_code == 200
        server.close_idle_connections()
        await asyncio.sleep(0.05)  # the FIN arrives
        assert (await http.get(f"{server.url}/b")).status_code == 200
    assert server.accepted == 2


async def test_connection_close_from_the_server_opens_a_new_one(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    async def closing(head: bytes, body: bytes) -> bytes:
        return response(b"bye", close=True)

    server = await serve(closing)
    async with fast_client() as http:
        for _ in range(3):
            assert (await http.get(f"{server.url}/")).text == "bye"
    assert server.accepted == 3


async def test_large_bodies_both_ways(serve: Callable[[Handler], Awaitable[Server]]) -> None:
    big = bytes(range(256)) * (12 * 1024)  # 3 MiB: past the read buffer's high-water mark

    async def echo(head: bytes, body: bytes) -> bytes:
        return response(body)

    server = await serve(echo)
    async with fast_client() as http:
        reply = await http.post(f"{server.url}/echo", content=big)
        assert reply.content == big


async def test_a_reply_that_never_comes_is_a_read_timeout(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    async def never(head: bytes, body: bytes) -> bytes:
        await asyncio.sleep(30)
        return response()

    server = await serve(never)
    async with fast_client(timeout=httpx.Timeout(0.2)) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"{server.url}/")


async def test_a_server_that_hangs_up_mid_request_is_a_transport_error(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    async def hang_up(head: bytes, body: bytes) -> None:
        return None

    server = await serve(hang_up)
    async with fast_client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(f"{server.url}/")


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with fast_client() as http:
        with pytest.raises(httpx.ConnectError) as caught:
            await http.get("http://127.0.0.1:1/")
    # The OS's error stays in the chain (httpcore re-raises with ``from None``: the context).
    chain: list[BaseException] = []
    error: BaseException | None = caught.value
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, httpcore.ConnectError) for e in chain)
    assert any(isinstance(e, ConnectionRefusedError) for e in chain)


async def test_a_cancelled_request_leaves_the_pool_usable(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    slow = asyncio.Event()

    async def maybe_slow(head: bytes, body: bytes) -> bytes:
        if b"/slow" in head:
            await slow.wait()
        return response()

    server = await serve(maybe_slow)
    async with fast_client() as http:
        request = asyncio.create_task(http.get(f"{server.url}/slow"))
        await asyncio.sleep(0.1)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert (await http.get(f"{server.url}/fast")).status_code == 200
        slow.set()


# -- the sharded pool ----------------------------------------------------------------------------


def pool(**kwargs: object) -> ClientPool:
    return ClientPool(lambda: fast_client(limits=SHARD_LIMITS), **kwargs)  # type: ignore[arg-type]


async def send(clients: ClientPool, url: str) -> httpx.Response:
    request = clients.build_request("GET", url, headers={"X-Test": "1"})
    return await clients.send(request)


async def test_a_quiet_pool_keeps_one_shard_and_one_connection(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    server = await serve(ok)
    clients = pool()
    try:
        for _ in range(10):
            assert (await send(clients, f"{server.url}/")).status_code == 200
        assert clients.shards == 1
        assert server.accepted == 1
    finally:
        await clients.aclose()


async def test_a_burst_spreads_over_shards_of_four_connections(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    release = asyncio.Event()
    arrived = 0

    async def held(head: bytes, body: bytes) -> bytes:
        nonlocal arrived
        arrived += 1
        await release.wait()
        return response()

    server = await serve(held)
    clients = pool(max_shards=5)
    try:
        requests = [asyncio.create_task(send(clients, f"{server.url}/{i}")) for i in range(30)]
        for _ in range(100):
            if arrived >= 20:
                break
            await asyncio.sleep(0.02)
        # 5 shards of 4 connections: 20 requests at the server, 10 waiting for a connection.
        assert clients.shards == 5
        assert arrived == 20
        release.set()
        replies = await asyncio.gather(*requests)
        assert [r.status_code for r in replies] == [200] * 30
        assert server.accepted == 20
    finally:
        await clients.aclose()


async def test_shards_idle_past_the_limit_are_closed_but_the_first(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    server = await serve(ok)
    now = [0.0]
    clients = pool(idle_after=90.0, clock=lambda: now[0])
    try:
        await asyncio.gather(*(send(clients, f"{server.url}/{i}") for i in range(12)))
        grown = clients.shards
        assert grown > 1
        now[0] = 91.0
        assert (await send(clients, f"{server.url}/later")).status_code == 200
        assert clients.shards == 1
    finally:
        await clients.aclose()
    assert clients.is_closed
