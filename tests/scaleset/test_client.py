"""Every Client endpoint: method, path, query, headers, body and accepted status
(docs/protocol.md §3)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from outrunner.scaleset import (
    Client,
    JitRunnerSetting,
    Label,
    NameLookupError,
    ProtocolError,
    RunnerScaleSet,
    RunnerSetting,
    StatusError,
    SystemInfo,
)
from outrunner.scaleset.client import user_agent
from tests.scaleset.conftest import TENANT, RecordingSleep, new_client
from tests.scaleset.scripted_server import Recorded, Reply, ScriptedServer

pytestmark = pytest.mark.anyio

SETS = f"{TENANT}/_apis/runtime/runnerscalesets"
AGENTS = f"{TENANT}/_apis/distributedtask/pools/0/agents"
GROUPS = f"{TENANT}/_apis/runtime/runnergroups/"
SCALE_SET = {
    "id": 5,
    "name": "linux",
    "runnerGroupId": 1,
    "RunnerSetting": {},
    "createdOn": "0001-01-01T00:00:00Z",
}


@pytest.fixture(autouse=True)
def _auth(authed: str) -> None:
    pass


def only(server: ScriptedServer, method: str, path: str) -> Recorded:
    (request,) = server.made(method, path)
    assert request.headers["content-type"] == "application/json"  # GET and DELETE too
    assert request.headers["authorization"].startswith("Bearer ")
    assert json.loads(request.headers["user-agent"])["kind"] == "scaleset"
    assert "api-version=6.0-preview" in request.query
    return request


async def test_get_runner_scale_set_by_name(server: ScriptedServer, client: Client) -> None:
    server.on("GET", SETS, Reply(200, {"count": 1, "value": [SCALE_SET]}))
    found = await client.get_runner_scale_set(1, "linux docker")
    assert found is not None
    assert found.id == 5
    request = only(server, "GET", SETS)
    assert request.query == "api-version=6.0-preview&name=linux+docker&runnerGroupId=1"


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ({"count": 0, "value": [SCALE_SET]}, None),  # count is authoritative
        ({"count": 0, "value": None}, None),
        (
            {"count": 2, "value": [SCALE_SET, SCALE_SET]},
            'multiple runner scale sets found with name "linux"',
        ),
        ({"count": 1, "value": []}, "count is 1 but value is empty"),
    ],
)
async def test_get_runner_scale_set_count_semantics(
    server: ScriptedServer, client: Client, answer: dict[str, Any], outcome: str | None
) -> None:
    server.on("GET", SETS, Reply(200, answer))
    if outcome is None:
        assert await client.get_runner_scale_set(1, "linux") is None
    else:
        with pytest.raises((NameLookupError, ProtocolError), match=outcome):
            await client.get_runner_scale_set(1, "linux")


async def test_get_runner_scale_set_by_id(server: ScriptedServer, client: Client) -> None:
    server.on("GET", f"{SETS}/5", Reply(200, SCALE_SET), Reply(200, b"null"))
    found = await client.get_runner_scale_set_by_id(5)
    assert found is not None
    assert found.name == "linux"
    assert await client.get_runner_scale_set_by_id(5) is None


async def test_create_runner_scale_set(server: ScriptedServer, client: Client) -> None:
    server.on("POST", SETS, Reply(200, SCALE_SET))
    created = await client.create_runner_scale_set(
        RunnerScaleSet(
            name="linux-docker",
            runner_group_id=1,
            labels=(Label(name="linux", type="User"),),
            runner_setting=RunnerSetting(disable_update=True),
        )
    )
    assert created.id == 5
    assert only(server, "POST", SETS).body == (
        b'{"name":"linux-docker","runnerGroupId":1,"labels":[{"type":"User","name":"linux"}],'
        b'"RunnerSetting":{"disableUpdate":true},"createdOn":"0001-01-01T00:00:00Z"}'
    )


async def test_create_defaults_labels(server: ScriptedServer, client: Client) -> None:
    server.on("POST", SETS, Reply(200, SCALE_SET), Reply(200, SCALE_SET))
    await client.create_runner_scale_set(RunnerScaleSet(name="s"))
    await client.create_runner_scale_set(
        RunnerScaleSet(name="s", labels=(Label(name="x", type=""),))
    )
    first, second = (r.json()["labels"] for r in server.made("POST", SETS))
    assert first == [{"type": "System", "name": "s"}]
    assert second == [{"type": "System", "name": "x"}]


async def test_create_without_name_or_labels_sends_nothing(
    server: ScriptedServer, client: Client
) -> None:
    with pytest.raises(ValueError, match="name or at least one label"):
        await client.create_runner_scale_set(RunnerScaleSet())
    assert server.requests == []


async def test_create_is_200_not_201(server: ScriptedServer, client: Client) -> None:
    server.on("POST", SETS, Reply(201, SCALE_SET))
    with pytest.raises(StatusError, match="unexpected status code: 201"):
        await client.create_runner_scale_set(RunnerScaleSet(name="s"))


async def test_update_runner_scale_set(server: ScriptedServer, client: Client) -> None:
    server.on(
        "PATCH", f"{SETS}/5", Reply(200, {**SCALE_SET, "labels": [{"type": "System", "name": "a"}]})
    )
    updated = await client.update_runner_scale_set(
        5, RunnerScaleSet(id=5, name="linux", labels=(Label(name="a", type=""),))
    )
    assert updated.labels == (Label(name="a", type="System"),)
    body = only(server, "PATCH", f"{SETS}/5").json()
    assert body["labels"] == [{"type": "System", "name": "a"}]
    assert body["id"] == 5


async def test_delete_runner_scale_set(server: ScriptedServer, client: Client) -> None:
    server.on("DELETE", f"{SETS}/5", Reply(204), Reply(400, {"message": "test error"}))
    await client.delete_runner_scale_set(5)
    only(server, "DELETE", f"{SETS}/5")
    with pytest.raises(StatusError, match="test error"):
        await client.delete_runner_scale_set(5)


async def test_get_runner_group_by_name(server: ScriptedServer, client: Client) -> None:
    group = {"id": 3, "name": "my group", "size": 2, "isDefaultGroup": False}
    server.on(
        "GET",
        GROUPS,
        Reply(200, {"count": 1, "value": [group]}),
        Reply(200, {"count": 0, "value": []}),
        Reply(200, {"count": 2, "value": [group, group]}),
    )
    found = await client.get_runner_group_by_name("my group")
    assert (found.id, found.size) == (3, 2)
    request = server.made("GET", GROUPS)[0]
    assert request.path.endswith("/runnergroups/")
    assert request.query == "api-version=6.0-preview&groupName=my+group"
    with pytest.raises(NameLookupError, match='no runner group found with name "my group"') as err:
        await client.get_runner_group_by_name("my group")
    # The request URL is the Actions service's; the config URL says which organization it is.
    assert str(err.value).endswith(f' "my group" at {server.url}/org/repo')
    with pytest.raises(NameLookupError, match='multiple runner group found with name "my group"'):
        await client.get_runner_group_by_name("my group")


async def test_generate_jit_runner_config(server: ScriptedServer, client: Client) -> None:
    path = f"{SETS}/5/generatejitconfig"
    server.on(
        "POST",
        path,
        Reply(
            200,
            {"runner": {"id": 11, "name": "r-1", "runnerScaleSetId": 5}, "encodedJitConfig": "b64"},
        ),
    )
    config = await client.generate_jit_runner_config(JitRunnerSetting(name="r-1"), 5)
    assert (config.runner.id, config.runner.runner_scale_set_id) == (11, 5)
    assert config.encoded_jit_config == "b64"
    assert "b64" not in repr(config)
    assert only(server, "POST", path).body == b'{"name":"r-1","workFolder":""}'


async def test_get_runner(server: ScriptedServer, client: Client) -> None:
    server.on("GET", f"{AGENTS}/11", Reply(200, {"id": 11, "name": "r", "runnerScaleSetId": 5}))
    runner = await client.get_runner(11)
    assert (runner.id, runner.name, runner.runner_scale_set_id) == (11, "r", 5)
    only(server, "GET", f"{AGENTS}/11")


async def test_get_runner_null_is_a_protocol_error(server: ScriptedServer, client: Client) -> None:
    server.on("GET", f"{AGENTS}/11", Reply(200, b"null"))
    with pytest.raises(ProtocolError, match="failed to decode runner reference"):
        await client.get_runner(11)


async def test_get_runner_by_name(server: ScriptedServer, client: Client) -> None:
    runner = {"id": 11, "name": "r", "runnerScaleSetId": 5}
    server.on(
        "GET",
        AGENTS,
        Reply(200, {"count": 1, "value": [runner]}),
        Reply(200, {"count": 0, "value": [runner]}),
        Reply(200, {"count": 2, "value": [runner, runner]}),
    )
    found = await client.get_runner_by_name("r")
    assert found is not None
    assert found.id == 11
    assert server.made("GET", AGENTS)[0].query == "agentName=r&api-version=6.0-preview"
    assert await client.get_runner_by_name("r") is None
    with pytest.raises(NameLookupError, match='multiple runners found with name "r"'):
        await client.get_runner_by_name("r")


async def test_remove_runner(server: ScriptedServer, client: Client) -> None:
    server.on("DELETE", f"{AGENTS}/11", Reply(204), Reply(200))
    await client.remove_runner(11)
    only(server, "DELETE", f"{AGENTS}/11")
    with pytest.raises(StatusError, match="unexpected status code: 200"):
        await client.remove_runner(11)


async def test_bom_on_a_success_body(server: ScriptedServer, client: Client) -> None:
    body = b"\xef\xbb\xbf" + json.dumps({"id": 11, "name": "r"}).encode()
    server.on("GET", f"{AGENTS}/11", Reply(200, body))
    assert (await client.get_runner(11)).name == "r"


async def test_invalid_json_on_success(server: ScriptedServer, client: Client) -> None:
    server.on("GET", f"{AGENTS}/11", Reply(200, b"<html>"))
    with pytest.raises(ProtocolError) as caught:
        await client.get_runner(11)
    assert caught.value.status == 200
    assert 'failed(status="200 OK"): failed to decode runner reference' in str(caught.value)


def test_user_agent_key_order() -> None:
    text = user_agent(
        SystemInfo(system="s", version="1", commit_sha="c", scale_set_id=42, subsystem="sub")
    )
    parsed = json.loads(text)
    assert list(parsed) == [
        "system",
        "version",
        "commit_sha",
        "scale_set_id",
        "subsystem",
        "build_version",
        "build_commit_sha",
        "kind",
    ]
    assert text.startswith(
        '{"system":"s","version":"1","commit_sha":"c","scale_set_id":42,"subsystem":"sub",'
        '"build_version":"'
    )
    assert text.endswith('"kind":"scaleset"}')
    assert parsed["build_version"] not in ("", None)


async def test_user_agent_default_and_set_system_info(
    server: ScriptedServer, sleeps: RecordingSleep
) -> None:
    server.on("GET", f"{AGENTS}/1", Reply(200, {"id": 1, "name": "r"}), repeat_last=True)
    async with new_client(server, sleeps) as client:
        await client.get_runner(1)
        client.set_system_info(SystemInfo(system="outrunner", subsystem="listener"))
        client.set_system_info(scale_set_id=9)
        await client.get_runner(1)
    first, second = (json.loads(r.headers["user-agent"]) for r in server.made("GET", f"{AGENTS}/1"))
    assert (first["system"], first["scale_set_id"]) == ("", 0)
    assert (second["system"], second["subsystem"], second["scale_set_id"]) == (
        "outrunner",
        "listener",
        9,
    )
    assert all(json.loads(r.headers["user-agent"])["kind"] == "scaleset" for r in server.requests)
