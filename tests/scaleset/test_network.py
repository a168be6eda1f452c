"""The client's two ways onto the network, over real sockets on loopback: the HTTP/1.1 transport
of direct connections (``_http11.py``) and httpx's own transport on the asyncio network backend
(``_network.py``), which proxied requests take; and the client's sharded pool (``_pool.py``).

The server is a small asyncio HTTP/1.1 server written here so that each test controls exactly what
happens on the wire: how many connections were accepted, a connection closed while idle, a reply
that never comes, a large body.
"""

from __future__ import annotations

import asyncio
import gzip
import http.server
import logging
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from outrunner.scaleset import Client
from outrunner.scaleset._http11 import Http11Transport, send_direct, use_http11_transport
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


def http11_client(**kwargs: object) -> httpx.AsyncClient:
    """What the scale set client's pools are: httpx over :class:`Http11Transport`."""
    http = httpx.AsyncClient(trust_env=False, **kwargs)  # type: ignore[arg-type]
    limits = kwargs.get("limits", httpx.Limits())
    assert isinstance(limits, httpx.Limits)
    direct = Http11Transport(
        ssl.create_default_context(),
        max_connections=limits.max_connections or 100,
        keepalive_expiry=limits.keepalive_expiry or 5.0,
    )
    assert use_http11_transport(http, direct)
    return http


def httpcore_client(**kwargs: object) -> httpx.AsyncClient:
    """What proxied requests take: httpx's own transport on the asyncio network backend."""
    http = httpx.AsyncClient(trust_env=False, **kwargs)  # type: ignore[arg-type]
    assert use_asyncio_network(http)
    return http


@pytest.fixture(params=[http11_client, httpcore_client], ids=["http11", "httpcore"])
def fast_client(request: pytest.FixtureRequest) -> Callable[..., httpx.AsyncClient]:
    """Each wire test runs on both ways onto the network."""
    return request.param  # type: ignore[no-any-return]


async def test_the_scale_set_client_sends_through_the_http11_transport() -> None:
    # Guards an httpx upgrade: the transport is swapped in through the client's attribute, and
    # the proxies' pools take the asyncio backend through httpcore's.
    client = Client("https://github.com/org", PersonalAccessToken("t"))
    try:
        transport = client._transport
        shard = transport._http._shards[0].http
        assert isinstance(shard._transport, Http11Transport)
        session_http = transport._new_session_http()
        assert session_http is not None
        assert isinstance(session_http._transport, Http11Transport)
        await session_http.aclose()
    finally:
        await client.aclose()


async def test_environment_proxies_still_apply_over_the_http11_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    client = Client("https://github.com/org", PersonalAccessToken("t"))
    try:
        http = client._transport._http._shards[0].http
        proxied = http._transport_for_url(httpx.URL("https://api.github.com/x"))
        assert isinstance(proxied, httpx.AsyncHTTPTransport)
        assert isinstance(proxied._pool._network_backend, AsyncioBackend)
        direct = http._transport_for_url(httpx.URL("https://internal.example/x"))
        assert isinstance(direct, Http11Transport)
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
        direct = Http11Transport(
            ssl.create_default_context(), max_connections=1, keepalive_expiry=1
        )
        assert not use_http11_transport(http, direct)
        assert (await http.get("http://x/")).status_code == 204
    finally:
        await http.aclose()


async def test_requests_reuse_one_connection(
    serve: Callable[[Handler], Awaitable[Server]], fast_client: Callable[..., httpx.AsyncClient]
) -> None:
    server = await serve(ok)
    async with fast_client() as http:
        for _ in range(20):
            reply = await http.post(f"{server.url}/x", json={"a": 1})
            assert reply.json() == {"ok": True}
    assert server.accepted == 1


async def test_a_connection_the_server_closed_while_idle_is_not_reused(
    serve: Callable[[Handler], Awaitable[Server]],
    fast_client: Callable[..., httpx.AsyncClient],
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
    fast_client: Callable[..., httpx.AsyncClient],
) -> None:
    async def closing(head: bytes, body: bytes) -> bytes:
        return response(b"bye", close=True)

    server = await serve(closing)
    async with fast_client() as http:
        for _ in range(3):
            assert (await http.get(f"{server.url}/")).text == "bye"
    assert server.accepted == 3


async def test_large_bodies_both_ways(
    serve: Callable[[Handler], Awaitable[Server]], fast_client: Callable[..., httpx.AsyncClient]
) -> None:
    big = bytes(range(256)) * (12 * 1024)  # 3 MiB: past the read buffer's high-water mark

    async def echo(head: bytes, body: bytes) -> bytes:
        return response(body)

    server = await serve(echo)
    async with fast_client() as http:
        reply = await http.post(f"{server.url}/echo", content=big)
        assert reply.content == big


async def test_a_reply_that_never_comes_is_a_read_timeout(
    serve: Callable[[Handler], Awaitable[Server]],
    fast_client: Callable[..., httpx.AsyncClient],
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
    fast_client: Callable[..., httpx.AsyncClient],
) -> None:
    async def hang_up(head: bytes, body: bytes) -> None:
        return None

    server = await serve(hang_up)
    async with fast_client() as http:
        with pytest.raises(httpx.RemoteProtocolError, match="Server disconnected"):
            await http.get(f"{server.url}/")


async def test_a_refused_connection_is_a_connect_error(
    fast_client: Callable[..., httpx.AsyncClient],
) -> None:
    async with fast_client() as http:
        with pytest.raises(httpx.ConnectError) as caught:
            await http.get("http://127.0.0.1:1/")
    # The OS's error stays in the chain (httpcore re-raises with ``from None``: the context).
    chain: list[BaseException] = []
    error: BaseException | None = caught.value
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, ConnectionRefusedError) for e in chain)


async def test_a_cancelled_request_leaves_the_pool_usable(
    serve: Callable[[Handler], Awaitable[Server]],
    fast_client: Callable[..., httpx.AsyncClient],
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


# -- send_direct: httpx's send without the layers that have nothing to do ------------------------


async def test_send_direct_gives_what_httpx_send_gives(
    serve: Callable[[Handler], Awaitable[Server]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="httpx")
    server = await serve(ok)
    async with http11_client() as http:
        request = http.build_request("POST", f"{server.url}/a", content=b"{}")
        direct = await send_direct(http, request)
        through_httpx = await http.send(http.build_request("POST", f"{server.url}/a"))
    assert direct.request is request
    assert (direct.status_code, direct.content, direct.json()) == (
        200,
        b'{"ok":true}',
        {"ok": True},
    )
    assert direct.is_closed
    lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert lines == [f'HTTP Request: POST {server.url}/a "HTTP/1.1 200 OK"'] * 2
    assert through_httpx.content == direct.content


async def test_send_direct_follows_redirects_as_httpx_does(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    seen: list[bytes] = []

    async def redirect(head: bytes, body: bytes) -> bytes:
        seen.append(head.split(b"\r\n", 1)[0])
        if head.startswith(b"POST /a "):
            return b"HTTP/1.1 303 See Other\r\nLocation: /b\r\nContent-Length: 0\r\n\r\n"
        if head.startswith(b"GET /loop "):
            return b"HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n"
        return response(b"here")

    server = await serve(redirect)
    async with http11_client(follow_redirects=True, max_redirects=3) as http:
        reply = await send_direct(http, http.build_request("POST", f"{server.url}/a", content=b"x"))
        assert (reply.status_code, reply.content, str(reply.url)) == (
            200,
            b"here",
            f"{server.url}/b",
        )
        assert [r.status_code for r in reply.history] == [303]
        assert seen == [b"POST /a HTTP/1.1", b"GET /b HTTP/1.1"]  # 303: the body is dropped
        seen.clear()
        with pytest.raises(httpx.TooManyRedirects):
            await send_direct(http, http.build_request("GET", f"{server.url}/loop"))
        assert len(seen) == 4  # the request and 3 redirects, as httpx's send counts them


async def test_send_direct_errors_carry_their_request() -> None:
    async with http11_client() as http:
        request = http.build_request("GET", "http://127.0.0.1:1/")
        with pytest.raises(httpx.ConnectError) as caught:
            await send_direct(http, request)
    assert caught.value.request is request


async def test_send_direct_leaves_a_client_with_hooks_to_httpx(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    hooked: list[int] = []

    async def hook(response: httpx.Response) -> None:
        hooked.append(response.status_code)

    server = await serve(ok)
    async with http11_client(event_hooks={"response": [hook]}) as http:
        reply = await send_direct(http, http.build_request("GET", f"{server.url}/"))
    assert (reply.status_code, hooked) == (200, [200])


# -- the sharded pool ----------------------------------------------------------------------------


def pool(**kwargs: object) -> ClientPool:
    return ClientPool(lambda: http11_client(limits=SHARD_LIMITS), **kwargs)  # type: ignore[arg-type]


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


# -- the HTTP/1.1 transport's own pool -----------------------------------------------------------


def http11(max_connections: int = 4, keepalive_expiry: float = 90.0) -> Http11Transport:
    return Http11Transport(
        ssl.create_default_context(),
        max_connections=max_connections,
        keepalive_expiry=keepalive_expiry,
    )


def held_server() -> tuple[Handler, asyncio.Event, list[bytes]]:
    """A handler that holds every request until the event is set; the list has their heads."""
    release = asyncio.Event()
    arrived: list[bytes] = []

    async def held(head: bytes, body: bytes) -> bytes:
        arrived.append(head)
        await release.wait()
        return response()

    return held, release, arrived


@dataclass
class Held:
    """A server whose only connection from the client is taken by a held request ``/first``."""

    server: Server
    release: asyncio.Event
    arrived: list[bytes]
    first: asyncio.Task[httpx.Response]

    def paths(self) -> list[bytes]:
        return [head.split(b" ")[1] for head in self.arrived]


async def hold_the_connection(
    serve: Callable[[Handler], Awaitable[Server]], http: httpx.AsyncClient
) -> Held:
    handler, release, arrived = held_server()
    server = await serve(handler)
    first = asyncio.create_task(http.get(f"{server.url}/first"))
    await until(lambda: len(arrived) == 1)
    return Held(server, release, arrived, first)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.01)


async def test_requests_beyond_the_connection_limit_wait_their_turn(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    handler, release, arrived = held_server()
    server = await serve(handler)
    transport = http11(max_connections=2)
    async with httpx.AsyncClient(transport=transport) as http:
        requests = [asyncio.create_task(http.get(f"{server.url}/{i}")) for i in range(6)]
        await until(lambda: len(arrived) == 2)
        await asyncio.sleep(0.1)
        assert len(arrived) == 2
        assert transport.connections == 2
        release.set()
        replies = await asyncio.gather(*requests)
    assert [reply.status_code for reply in replies] == [200] * 6
    assert server.accepted == 2
    assert transport.connections == 0  # closed with the client


async def test_no_connection_free_within_the_pool_timeout_is_a_pool_timeout(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    timeout = httpx.Timeout(5.0, pool=0.1)
    async with httpx.AsyncClient(transport=http11(max_connections=1), timeout=timeout) as http:
        held = await hold_the_connection(serve, http)
        with pytest.raises(httpx.PoolTimeout):
            await http.get(f"{held.server.url}/second")
        held.release.set()
        assert (await held.first).status_code == 200


async def test_a_cancelled_wait_for_a_connection_passes_the_turn_on(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    async with httpx.AsyncClient(transport=http11(max_connections=1)) as http:
        held = await hold_the_connection(serve, http)
        second = asyncio.create_task(http.get(f"{held.server.url}/second"))
        third = asyncio.create_task(http.get(f"{held.server.url}/third"))
        await asyncio.sleep(0.05)
        second.cancel()
        held.release.set()
        assert (await held.first).status_code == 200
        assert (await third).status_code == 200
        with pytest.raises(asyncio.CancelledError):
            await second
    assert held.paths() == [b"/first", b"/third"]
    assert held.server.accepted == 1


async def test_an_idle_connection_past_its_expiry_is_not_reused(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    server = await serve(ok)
    async with httpx.AsyncClient(transport=http11(keepalive_expiry=0.05)) as http:
        assert (await http.get(f"{server.url}/a")).status_code == 200
        assert (await http.get(f"{server.url}/b")).status_code == 200
        assert server.accepted == 1
        await asyncio.sleep(0.1)
        assert (await http.get(f"{server.url}/c")).status_code == 200
    assert server.accepted == 2


async def test_chunked_informational_and_compressed_replies(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    packed = gzip.compress(b'{"id": 7}')

    async def varied(head: bytes, body: bytes) -> bytes:
        if b"/chunked" in head:
            return (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
        if b"/early" in head:
            return b"HTTP/1.1 100 Continue\r\n\r\n" + response(b"after")
        if b"HEAD " in head:
            return b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"
        return (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
            + f"Content-Length: {len(packed)}\r\n\r\n".encode()
            + packed
        )

    server = await serve(varied)
    async with httpx.AsyncClient(transport=http11()) as http:
        assert (await http.get(f"{server.url}/chunked")).text == "hello world"
        assert (await http.get(f"{server.url}/early")).text == "after"
        head = await http.head(f"{server.url}/head")
        assert head.headers["content-length"] == "12"
        assert head.content == b""
        assert (await http.get(f"{server.url}/gzip")).json() == {"id": 7}
    assert server.accepted == 1  # each of them left the connection reusable


async def test_a_reply_before_the_request_was_made_closes_the_connection(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    server = await serve(ok)
    async with httpx.AsyncClient(transport=http11()) as http:
        assert (await http.get(f"{server.url}/a")).status_code == 200
        # An idle connection that receives bytes (here a second, unasked-for reply) is spoilt.
        server.writers[0].write(response(b"unasked"))
        await asyncio.sleep(0.05)
        assert (await http.get(f"{server.url}/b")).json() == {"ok": True}
    assert server.accepted == 2


async def test_unsupported_schemes_are_refused_before_connecting() -> None:
    async with httpx.AsyncClient(transport=http11()) as http:
        with pytest.raises(httpx.UnsupportedProtocol, match="ftp://"):
            await http.get("ftp://127.0.0.1:1/x")


async def test_cookies_the_server_sets_are_not_sent_back(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    heads: list[bytes] = []

    async def sets_cookie(head: bytes, body: bytes) -> bytes:
        heads.append(head.lower())
        return b"HTTP/1.1 200 OK\r\nSet-Cookie: session=abc; Path=/\r\nContent-Length: 0\r\n\r\n"

    server = await serve(sets_cookie)
    client = Client("https://github.com/org", PersonalAccessToken("t"))
    try:
        http = client._transport._new_http(SHARD_LIMITS)  # as every pool of the client is made
        async with http:
            for _ in range(2):
                assert (await http.get(f"{server.url}/")).status_code == 200
    finally:
        await client.aclose()
    assert len(heads) == 2
    assert b"cookie:" not in heads[1]  # as the Go client, which has no cookie jar


def test_a_transport_outlives_its_event_loop() -> None:
    """Connections opened under one ``asyncio.run()`` are not reused under the next (their loop
    is closed); the transport opens new ones."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    transport = http11()
    url = f"http://127.0.0.1:{server.server_address[1]}/"

    async def get() -> str:
        http = httpx.AsyncClient(transport=transport)
        return (await http.get(url)).text  # the client is not closed: it would close the pool

    try:
        assert asyncio.run(get()) == "ok"
        assert transport.connections == 1
        assert asyncio.run(get()) == "ok"
        assert transport.connections == 1  # the first loop's connection was dropped
    finally:
        server.shutdown()
        server.server_close()


async def test_waiting_requests_get_connections_in_the_order_they_asked(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    async with httpx.AsyncClient(transport=http11(max_connections=1)) as http:
        held = await hold_the_connection(serve, http)
        waiting = []
        for i in range(1, 6):
            waiting.append(asyncio.create_task(http.get(f"{held.server.url}/{i}")))
            await asyncio.sleep(0.01)
        held.release.set()
        replies = await asyncio.gather(held.first, *waiting)
    assert [reply.status_code for reply in replies] == [200] * 6
    assert held.paths() == [b"/first"] + [f"/{i}".encode() for i in range(1, 6)]


async def test_idle_connections_past_their_expiry_are_closed_by_any_request(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    one, other = await serve(ok), await serve(ok)
    transport = http11(keepalive_expiry=0.05)
    async with httpx.AsyncClient(transport=transport) as http:
        assert (await http.get(f"{one.url}/")).status_code == 200
        await asyncio.sleep(0.1)
        assert (await http.get(f"{other.url}/")).status_code == 200
        assert transport.connections == 1  # the first server's is closed, not kept


async def test_idle_connections_are_swept_at_most_every_second(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    # A dead connection is never reused (test_a_connection_the_server_closed_while_idle_is_not_
    # reused); one to a server no request goes to is closed by the next sweep.
    one, other = await serve(ok), await serve(ok)
    transport = http11(keepalive_expiry=4.0)  # a sweep at most every second
    async with httpx.AsyncClient(transport=transport) as http:
        assert (await http.get(f"{one.url}/")).status_code == 200  # swept here
        assert (await http.get(f"{other.url}/")).status_code == 200
        one.close_idle_connections()
        await asyncio.sleep(0.05)  # the FIN arrives
        assert (await http.get(f"{other.url}/")).status_code == 200
        assert transport.connections == 2  # the dead one: no sweep within 1 s of the last
        await asyncio.sleep(1.1)
        assert (await http.get(f"{other.url}/")).status_code == 200
        assert transport.connections == 1


async def test_a_server_switching_protocols_is_an_error_not_a_hang(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    async def switch(head: bytes, body: bytes) -> bytes:
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: other\r\nConnection: Upgrade\r\n\r\n"

    server = await serve(switch)
    upgrade = {"Upgrade": "other", "Connection": "Upgrade"}
    async with httpx.AsyncClient(transport=http11()) as http, asyncio.timeout(5):
        with pytest.raises(httpx.RemoteProtocolError, match="switched protocols"):
            await http.get(f"{server.url}/", headers=upgrade)
