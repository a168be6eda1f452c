"""Message sessions and the queue: create/refresh/delete, poll, ack, acquire
(docs/protocol.md §3.13-§4)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from outrunner.scaleset import (
    Client,
    JobCompleted,
    JobStarted,
    Listener,
    MessageQueueTokenExpiredError,
    MessageSession,
    ProtocolError,
    SessionConflictError,
    SessionExpiredError,
    StatusError,
)
from tests.scaleset.conftest import TENANT
from tests.scaleset.scripted_server import Reply, ScriptedServer

pytestmark = pytest.mark.anyio

SESSIONS = f"{TENANT}/_apis/runtime/runnerscalesets/5/sessions"
SESSION_ID = "9b6e4a3e-0d0c-4bb8-9f61-3f0f5f0e2a11"
STATS = {"totalAssignedJobs": 2, "totalAvailableJobs": 0, "totalRunningJobs": 1}
ACQUIRE = f"{TENANT}/_apis/runtime/runnerscalesets/5/acquirejobs"


def session_json(
    server: ScriptedServer, token: str, queue: str = "/queue/message"
) -> dict[str, Any]:
    return {
        "sessionId": SESSION_ID,
        "ownerName": "host-1",
        "runnerScaleSet": {"id": 5, "name": "linux"},
        "messageQueueUrl": f"{server.url}{queue}?sessionId=abc",
        "messageQueueAccessToken": token,
        "statistics": STATS,
    }


def message_json(message_id: int = 12) -> dict[str, Any]:
    jobs = [{"messageType": "JobStarted", "runnerRequestId": 1, "runnerName": "r-1", "runnerId": 3}]
    return {
        "messageId": message_id,
        "messageType": "RunnerScaleSetJobMessages",
        "body": json.dumps(jobs),
        "statistics": STATS,
    }


@pytest.fixture
async def session(server: ScriptedServer, client: Client, authed: str) -> MessageSession:
    server.on("POST", SESSIONS, Reply(200, session_json(server, "q1")))
    return await client.create_message_session(5, "host-1")


async def test_create(server: ScriptedServer, session: MessageSession, authed: str) -> None:
    (request,) = server.made("POST", SESSIONS)
    assert request.body == (
        b'{"sessionId":"00000000-0000-0000-0000-000000000000","ownerName":"host-1"}'
    )
    assert request.headers["authorization"] == f"Bearer {authed}"
    assert request.query == "api-version=6.0-preview"
    assert session.session.session_id == SESSION_ID
    assert session.session.statistics is not None
    assert session.session.statistics.total_assigned_jobs == 2
    assert session.scale_set_id == 5
    assert "q1" not in repr(session)


async def test_create_conflict(server: ScriptedServer, client: Client, authed: str) -> None:
    namespace = "GitHub.Actions.Runtime.WebApi"
    type_name = f"{namespace}.RunnerScaleSetSessionConflictException, {namespace}"
    text = "The actions runner scaleset linux already has an active session."
    body = {"typeName": type_name, "message": text}
    server.on("POST", SESSIONS, Reply(409, body), repeat_last=True)
    with pytest.raises(SessionConflictError) as caught:
        await client.create_message_session(5, "host-1")
    assert "unexpected status code 409 Conflict: GitHub.Actions" in str(caught.value)
    assert len(server.made("POST", SESSIONS)) == 1  # not retried


async def test_create_must_be_200(server: ScriptedServer, client: Client, authed: str) -> None:
    server.on("POST", SESSIONS, Reply(201, session_json(server, "q1")))
    with pytest.raises(StatusError, match="unexpected status code 201 Created"):
        await client.create_message_session(5, "host-1")


async def test_refresh_replaces_every_field(
    server: ScriptedServer, session: MessageSession
) -> None:
    server.on(
        "PATCH",
        f"{SESSIONS}/{SESSION_ID}",
        Reply(200, {**session_json(server, "q2", "/q2"), "statistics": None}),
    )
    refreshed = await session.refresh()
    assert refreshed is session.session
    assert refreshed.message_queue_access_token == "q2"
    assert refreshed.message_queue_url.startswith(f"{server.url}/q2")
    assert refreshed.statistics is None
    (request,) = server.made("PATCH", f"{SESSIONS}/{SESSION_ID}")
    assert request.body == b""
    assert request.headers["content-type"] == "application/json"


async def test_delete_and_close(server: ScriptedServer, session: MessageSession) -> None:
    server.on("DELETE", f"{SESSIONS}/{SESSION_ID}", Reply(204))
    async with session:
        pass
    await session.close()  # already deleted: no second request
    (request,) = server.made("DELETE", f"{SESSIONS}/{SESSION_ID}")
    assert request.headers["content-type"] == "application/json"


async def test_close_logs_and_delete_raises(
    server: ScriptedServer, session: MessageSession, caplog: pytest.LogCaptureFixture
) -> None:
    expired = {"typeName": "RunnerScaleSetSessionExpiredException", "message": "not valid"}
    server.on("DELETE", f"{SESSIONS}/{SESSION_ID}", Reply(400, expired), repeat_last=True)
    with caplog.at_level(logging.WARNING, logger="outrunner.scaleset.session"):
        await session.close()
    assert "Failed to delete message session" in caplog.text
    with pytest.raises(SessionExpiredError, match="not valid"):
        await session.delete()


async def test_get_message_headers(server: ScriptedServer, session: MessageSession) -> None:
    server.on("GET", "/queue/message", Reply(200, message_json()), Reply(202))
    message = await session.get_message(0, 3)
    assert message is not None
    assert message.jobs_started[0].runner_name == "r-1"
    assert await session.get_message(0, 0) is None
    first, second = server.made("GET", "/queue/message")
    assert first.query == "sessionId=abc"  # unchanged: no lastMessageId, no api-version
    assert first.headers["accept"] == "application/json; api-version=6.0-preview"
    assert first.headers["authorization"] == "Bearer q1"
    assert first.headers["x-scalesetmaxcapacity"] == "3"
    assert "content-type" not in first.headers
    assert json.loads(first.headers["user-agent"])["kind"] == "scaleset"
    assert second.headers["x-scalesetmaxcapacity"] == "0"


async def test_last_message_id_merged_sorted(
    server: ScriptedServer, session: MessageSession
) -> None:
    server.on("GET", "/queue/message", Reply(202))
    await session.get_message(100003863, 2)
    (request,) = server.made("GET", "/queue/message")
    assert request.query == "lastMessageId=100003863&sessionId=abc"


async def test_get_message_401_refreshes_and_retries_once(
    server: ScriptedServer, session: MessageSession
) -> None:
    server.on("GET", "/queue/message", Reply(401, "expired"))
    server.on("PATCH", f"{SESSIONS}/{SESSION_ID}", Reply(200, session_json(server, "q2", "/q2")))
    server.on("GET", "/q2", Reply(200, message_json(13)))
    message = await session.get_message(12, 1)
    assert message is not None
    assert message.message_id == 13
    (retried,) = server.made("GET", "/q2")
    assert retried.headers["authorization"] == "Bearer q2"
    assert retried.query == "lastMessageId=12&sessionId=abc"


async def test_get_message_second_401_raises(
    server: ScriptedServer, session: MessageSession
) -> None:
    server.on("GET", "/queue/message", Reply(401, "expired"), repeat_last=True)
    server.on("PATCH", f"{SESSIONS}/{SESSION_ID}", Reply(200, session_json(server, "q2")))
    with pytest.raises(MessageQueueTokenExpiredError) as caught:
        await session.get_message(0, 1)
    assert str(caught.value).endswith("): message queue token expired: expired")
    assert caught.value.status == 401
    assert len(server.made("GET", "/queue/message")) == 2
    assert len(server.made("PATCH")) == 1


async def test_get_message_refresh_failure(server: ScriptedServer, session: MessageSession) -> None:
    server.on("GET", "/queue/message", Reply(401))
    server.on("PATCH", f"{SESSIONS}/{SESSION_ID}", Reply(404, {"message": "no session"}))
    with pytest.raises(StatusError, match="no session") as caught:
        await session.get_message(0, 1)
    assert any("refreshing the message session" in note for note in caught.value.__notes__)


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Reply(404), "unexpected status code 404 Not Found: unknown error"),
        (
            Reply(400, "bad capacity", {"Content-Type": "text/plain"}),
            "400 Bad Request: bad capacity",
        ),
        (Reply(200), "failed to decode runner scale set message response: EOF"),
        (Reply(200, {**message_json(), "messageType": "Nope"}), "unsupported message type: Nope"),
        (Reply(200, {**message_json(), "body": [1]}), "body: expected string"),
    ],
)
async def test_get_message_errors(
    server: ScriptedServer, session: MessageSession, reply: Reply, error: str
) -> None:
    server.on("GET", "/queue/message", reply)
    with pytest.raises((StatusError, ProtocolError), match=error):
        await session.get_message(0, 1)


async def test_delete_message(server: ScriptedServer, session: MessageSession) -> None:
    server.on("DELETE", "/queue/message/12", Reply(204), Reply(200))
    await session.delete_message(12)
    (request,) = server.made("DELETE", "/queue/message/12")
    assert request.query == "sessionId=abc"
    assert request.headers["authorization"] == "Bearer q1"
    assert request.headers["content-type"] == "application/json"
    with pytest.raises(StatusError, match="unexpected status code 200 OK"):
        await session.delete_message(12)


async def test_delete_message_401_refresh(server: ScriptedServer, session: MessageSession) -> None:
    server.on("DELETE", "/queue/message/12", Reply(401))
    server.on("PATCH", f"{SESSIONS}/{SESSION_ID}", Reply(200, session_json(server, "q2", "/q2")))
    server.on("DELETE", "/q2/12", Reply(204))
    await session.delete_message(12)
    assert server.made("DELETE", "/q2/12")[0].headers["authorization"] == "Bearer q2"


async def test_acquire_jobs_uses_queue_token(
    server: ScriptedServer, session: MessageSession, authed: str
) -> None:
    server.on(
        "POST",
        ACQUIRE,
        Reply(200, {"count": 2, "value": [1, 2]}),
        Reply(200, {"count": 0, "value": []}),
    )
    assert await session.acquire_jobs([1, 2, 3]) == [1, 2]
    assert await session.acquire_jobs([]) == []
    first, second = server.made("POST", ACQUIRE)
    assert first.headers["authorization"] == "Bearer q1"  # not the admin token
    assert first.headers["content-type"] == "application/json"
    assert first.query == "api-version=6.0-preview"
    assert first.body == b"[1,2,3]"
    assert second.body == b"[]"


async def test_acquire_jobs_401_refresh_then_second_401(
    server: ScriptedServer, session: MessageSession
) -> None:
    server.on(
        "POST", ACQUIRE, Reply(401), Reply(200, {"count": 1, "value": [1]}), Reply(401), Reply(401)
    )
    server.on(
        "PATCH",
        f"{SESSIONS}/{SESSION_ID}",
        Reply(200, session_json(server, "q2")),
        repeat_last=True,
    )
    assert await session.acquire_jobs([1]) == [1]
    assert server.made("POST", ACQUIRE)[1].headers["authorization"] == "Bearer q2"
    with pytest.raises(MessageQueueTokenExpiredError):
        await session.acquire_jobs([1])
    assert len(server.made("PATCH")) == 2


async def test_acquire_jobs_other_error(server: ScriptedServer, session: MessageSession) -> None:
    server.on("POST", ACQUIRE, Reply(404, {"message": "no such scale set"}))
    with pytest.raises(StatusError, match="unexpected status code 404 Not Found: : no such"):
        await session.acquire_jobs([1])


async def test_listener_over_http(server: ScriptedServer, session: MessageSession) -> None:
    """The real session drives the listener: poll, ack first, acquire, then the desired count."""
    jobs = [{"messageType": "JobAvailable", "runnerRequestId": 77}]
    body = {**message_json(12), "body": json.dumps(jobs), "statistics": {"totalAssignedJobs": 1}}
    server.on("GET", "/queue/message", Reply(200, body), Reply(202, delay=30))
    server.on("DELETE", "/queue/message/12", Reply(204))
    server.on("POST", ACQUIRE, Reply(200, {"count": 1, "value": [77]}))
    desired: list[int] = []
    polled_again = asyncio.Event()

    class Scaler:
        async def handle_desired_runner_count(self, count: int) -> int:
            desired.append(count)
            if len(desired) == 2:
                polled_again.set()
            return count

        async def handle_job_started(self, job: JobStarted) -> None:
            raise AssertionError("no job started")

        async def handle_job_completed(self, job: JobCompleted) -> None:
            raise AssertionError("no job completed")

    task = asyncio.create_task(Listener(session, max_runners=4).run(Scaler()))
    await asyncio.wait_for(polled_again.wait(), 5)
    while len(server.made("GET", "/queue/message")) < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert desired == [2, 1]
    order = [(r.method, r.path) for r in server.requests if "runner-registration" not in r.path]
    assert order[-4:] == [
        ("GET", "/queue/message"),
        ("DELETE", "/queue/message/12"),
        ("POST", ACQUIRE),
        ("GET", "/queue/message"),
    ]
    assert server.made("POST", ACQUIRE)[0].body == b"[77]"
    assert server.made("GET", "/queue/message")[1].query == "lastMessageId=12&sessionId=abc"
