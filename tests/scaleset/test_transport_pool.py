"""Connections of many message sessions sharing one client (issue 13).

One :class:`Client` serves every scale set with the same URL and credentials, and each session's
long poll holds a connection for the whole poll. With one shared httpx pool at its default limits,
more than 20 sessions made every poll open a new connection (against github.com: a TLS
handshake), and more than 100 left API calls waiting for a poll to end. Each session now has a
pool of its own for its queue requests; these tests count, over a real socket, the TCP connections
the server accepts.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

from outrunner.scaleset import Client, MessageSession, SessionExpiredError
from outrunner.scaleset._transport import API_MAX_CONNECTIONS
from tests.scaleset.conftest import TENANT
from tests.scaleset.scripted_server import Reply, ScriptedServer

pytestmark = pytest.mark.anyio

SESSIONS = 60
ROUNDS = 4
HOLD = 0.3
"""Seconds the server holds each poll, so that every session's poll is in flight at once."""
QUEUE = "/queue/message"
SESSION_ID = "9b6e4a3e-0d0c-4bb8-9f61-3f0f5f0e2a11"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedServer]:
    # socketserver listens with a backlog of 5: sixty connections at once would wait for SYN
    # retransmits (seconds), as the accept loop is slower than the connects.
    monkeypatch.setattr(ThreadingHTTPServer, "request_queue_size", 4 * SESSIONS)

    def handle_error(self: ThreadingHTTPServer, request: Any, client_address: Any) -> None:
        # A poll still held when the test ends finds its client gone: expected, not news.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            ThreadingHTTPServer.handle_error(self, request, client_address)

    with ScriptedServer() as scripted:
        # Set for good (not monkeypatched): held polls end after the fixture is torn down.
        scripted._httpd.handle_error = handle_error.__get__(scripted._httpd)  # type: ignore[method-assign]
        yield scripted


def _script(server: ScriptedServer, poll: Reply) -> None:
    session = {
        "sessionId": SESSION_ID,
        "ownerName": "host-1",
        "runnerScaleSet": {"id": 1, "name": "linux"},
        "messageQueueUrl": f"{server.url}{QUEUE}?sessionId=abc",
        "messageQueueAccessToken": "queue-token",
        "statistics": {"totalAvailableJobs": 0},
    }
    server.on(
        "POST",
        f"{TENANT}/_apis/runtime/runnerscalesets/\\d+/sessions",
        Reply(200, session),
        repeat_last=True,
    )
    server.on("GET", QUEUE, poll, repeat_last=True)
    server.on("DELETE", f"{QUEUE}/7", Reply(204), repeat_last=True)


async def _open(client: Client, count: int) -> list[MessageSession]:
    return await asyncio.gather(
        *(client.create_message_session(scale_set_id, "host-1") for scale_set_id in range(count))
    )


async def _poll_and_ack(session: MessageSession) -> None:
    message = await session.get_message(0, 1)
    assert message is not None
    await session.delete_message(message.message_id)


async def test_sixty_long_polls_reuse_their_connections(
    server: ScriptedServer, client: Client, authed: str
) -> None:
    message = {
        "messageId": 7,
        "messageType": "RunnerScaleSetJobMessages",
        "body": json.dumps([]),
        "statistics": {"totalAvailableJobs": 0},
    }
    _script(server, Reply(200, message, delay=HOLD))
    sessions = await _open(client, SESSIONS)
    before_polls = server.connections
    counts = []
    for _ in range(ROUNDS):
        await asyncio.gather(*(_poll_and_ack(session) for session in sessions))
        counts.append(server.connections)

    polls = server.made("GET", QUEUE)
    assert len(polls) == SESSIONS * ROUNDS
    # The first round opens one connection per session...
    assert counts[0] - before_polls == SESSIONS
    # ...and no round after it opens any: every poll and acknowledgement reuses it.
    assert counts == [counts[0]] * ROUNDS, f"connections after each round: {counts}"


async def test_api_calls_are_not_starved_by_long_polls(
    server: ScriptedServer, client: Client, authed: str
) -> None:
    """With more sessions polling than the API pool's connection cap, an API call still gets a
    connection at once instead of waiting for a poll to end."""
    # Held far longer than the test waits for the API call: a call queued behind the polls
    # would time out.
    _script(server, Reply(202, delay=60.0))
    server.on("GET", f"{TENANT}/_apis/runtime/runnerscalesets/1", Reply(200, None))
    sessions = await _open(client, API_MAX_CONNECTIONS + 10)
    polls = [asyncio.create_task(session.get_message(0, 1)) for session in sessions]
    try:
        async with asyncio.timeout(5):  # the polls are held for 60 s
            while len(server.made("GET", QUEUE)) < len(polls):  # every poll is in flight
                await asyncio.sleep(0.01)
            assert await client.get_runner_scale_set_by_id(1) is None
    finally:
        for poll in polls:
            poll.cancel()
        await asyncio.gather(*polls, return_exceptions=True)


async def test_a_session_pool_is_closed_with_the_session_and_reopens_if_used(
    server: ScriptedServer, client: Client, authed: str
) -> None:
    _script(server, Reply(202))
    sessions = f"{TENANT}/_apis/runtime/runnerscalesets/\\d+/sessions/{SESSION_ID}"
    server.on("DELETE", sessions, Reply(204))
    session, gone, left_open = await _open(client, 3)
    for each in (session, gone, left_open):
        assert not each._queue.is_open  # nothing opened before the first poll
        assert await each.get_message(0, 1) is None
        assert each._queue.is_open

    await session.delete()
    assert not session._queue.is_open
    await session.close()  # already deleted: nothing sent, still closed
    assert not session._queue.is_open

    expired = "GitHub.Actions.Runtime.WebApi.RunnerScaleSetSessionExpiredException"
    server.on("PATCH", sessions, Reply(400, {"typeName": expired, "message": "expired"}))
    with pytest.raises(SessionExpiredError):
        await gone.refresh()
    assert not gone._queue.is_open  # GitHub has no such session: its connection is let go
    assert await gone.get_message(0, 1) is None  # a later poll still works
    assert gone._queue.is_open

    connections = server.connections
    await client.aclose()  # closes the pools of sessions still open
    assert not gone._queue.is_open
    assert not left_open._queue.is_open
    assert server.connections == connections
