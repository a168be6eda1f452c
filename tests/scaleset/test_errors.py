"""Turning error responses into exceptions, with the text of docs/protocol.md §5 (over HTTP)."""

from __future__ import annotations

import pytest

from outrunner.scaleset import (
    Client,
    JobStillRunningError,
    RunnerExistsError,
    RunnerNotFoundError,
    ScaleSetError,
    SessionConflictError,
    SessionExpiredError,
    StatusError,
)
from tests.scaleset.conftest import TENANT
from tests.scaleset.scripted_server import Reply, ScriptedServer

pytestmark = pytest.mark.anyio

AGENT = f"{TENANT}/_apis/distributedtask/pools/0/agents/7"
NET = "GitHub.DistributedTask.WebApi.{}, GitHub.DistributedTask.WebApi"
RUNTIME = "GitHub.Actions.Runtime.WebApi"


@pytest.fixture(autouse=True)
def _auth(authed: str) -> None:
    pass


def prefix(server: ScriptedServer, status: str) -> str:
    return f'request DELETE {server.url}{AGENT}?api-version=6.0-preview failed(status="{status}"'


async def fail(server: ScriptedServer, client: Client, reply: Reply) -> ScaleSetError:
    server.on("DELETE", AGENT, reply)
    with pytest.raises(ScaleSetError) as caught:
        await client.remove_runner(7)
    return caught.value


@pytest.mark.parametrize(
    ("status", "type_name", "expected"),
    [
        (409, NET.format("AgentExistsException"), (RunnerExistsError, "runner exists")),
        (404, NET.format("AgentNotFoundException"), (RunnerNotFoundError, "runner not found")),
        (409, "JobStillRunningException", (JobStillRunningError, "job still running")),
        (400, "AgentNotFoundException", (RunnerNotFoundError, "runner not found")),  # any status
    ],
)
async def test_sentinel_type_names(
    server: ScriptedServer,
    client: Client,
    status: int,
    type_name: str,
    expected: tuple[type[StatusError], str],
) -> None:
    cls, cause = expected
    error = await fail(server, client, Reply(status, {"typeName": type_name, "message": "msg"}))
    assert type(error) is cls
    assert str(error).endswith(f"): {cause}: msg")
    assert isinstance(error, StatusError)
    assert error.type_name == type_name
    assert error.status == status


@pytest.mark.parametrize(
    ("type_name", "cls"),
    [
        (f"{RUNTIME}.RunnerScaleSetSessionConflictException, X", SessionConflictError),
        (f"{RUNTIME}.RunnerScaleSetSessionExpiredException, X", SessionExpiredError),
        ("SomethingElseException", StatusError),
    ],
)
async def test_other_type_names_keep_the_cause(
    server: ScriptedServer, client: Client, type_name: str, cls: type[StatusError]
) -> None:
    error = await fail(server, client, Reply(409, {"typeName": type_name, "message": "busy"}))
    assert type(error) is cls
    assert str(error) == (
        f"{prefix(server, '409 Conflict')}): unexpected status code: 409: {type_name}: busy"
    )


async def test_full_text_with_activity_and_request_ids(
    server: ScriptedServer, client: Client
) -> None:
    headers = {"ActivityId": "act-1", "X-GitHub-Request-Id": "req-1"}
    error = await fail(server, client, Reply(404, {"message": "gone"}, headers))
    assert str(error) == (
        f'{prefix(server, "404 Not Found")}, activity_id="act-1", github_request_id="req-1"): '
        "unexpected status code: 404: : gone"
    )
    assert (error.activity_id, error.request_id, error.status) == ("act-1", "req-1", 404)
    assert error.method == "DELETE"
    assert error.url == f"{server.url}{AGENT}?api-version=6.0-preview"


async def test_text_plain_body_is_raw(server: ScriptedServer, client: Client) -> None:
    reply = Reply(400, "plain {not json}", {"Content-Type": "text/plain; charset=utf-8"})
    error = await fail(server, client, reply)
    assert str(error).endswith("): unexpected status code: 400: plain {not json}")


async def test_empty_body_is_unknown_error(server: ScriptedServer, client: Client) -> None:
    error = await fail(server, client, Reply(404))
    assert (
        str(error)
        == f"{prefix(server, '404 Not Found')}): unexpected status code: 404: unknown error"
    )


async def test_unparsable_body(server: ScriptedServer, client: Client) -> None:
    error = await fail(
        server, client, Reply(400, b"<html>bad</html>", {"Content-Type": "text/html"})
    )
    detail = 'failed to unmarshal error response body: "<html>bad</html>"'
    assert str(error).endswith(f"): unexpected status code: 400: {detail}")
    assert type(error) is StatusError


async def test_bom_in_error_body(server: ScriptedServer, client: Client) -> None:
    body = b'\xef\xbb\xbf{"typeName": "AgentNotFoundException", "message": "m"}'
    error = await fail(server, client, Reply(404, body, {"Content-Type": "application/json"}))
    assert isinstance(error, RunnerNotFoundError)


async def test_error_keys_match_case_insensitively(server: ScriptedServer, client: Client) -> None:
    error = await fail(
        server, client, Reply(409, {"TypeName": "AgentExistsException", "Message": "m"})
    )
    assert isinstance(error, RunnerExistsError)
    assert str(error).endswith("runner exists: m")
