"""Actions-service routes of the fake: auth, scale sets, runner groups, JIT configs, agents."""

from __future__ import annotations

import base64
import json

from outrunner.testing.fakegithub import Endpoint, FakeGitHub, RunnerStatus
from tests.testing.raw import Raw

SCALE_SETS = "_apis/runtime/runnerscalesets"
AGENTS = "_apis/distributedtask/pools/0/agents"


def test_admin_token_required(gh: FakeGitHub, raw: Raw) -> None:
    no_auth = raw.http.get(raw.base + SCALE_SETS, params={"api-version": "6.0-preview"})
    assert no_auth.status_code == 401
    assert "VssUnauthorizedException" in no_auth.json()["typeName"]
    assert raw.actions("GET", SCALE_SETS, token="forged").status_code == 401
    assert raw.actions("GET", SCALE_SETS).status_code == 200
    gh.expire_admin_tokens()
    assert raw.actions("GET", SCALE_SETS).status_code == 401
    # A fresh exchange issues a working token again.
    raw.base, raw.admin_token = raw.exchange()
    assert raw.actions("GET", SCALE_SETS).status_code == 200
    assert [r.auth_valid for r in gh.requests_to(Endpoint.GET_SCALE_SET)] == [
        False,
        False,
        True,
        False,
        True,
    ]


def test_api_version_required(raw: Raw) -> None:
    headers = {"Authorization": f"Bearer {raw.admin_token}"}
    missing = raw.http.get(raw.base + SCALE_SETS, headers=headers)
    assert missing.status_code == 400
    assert "VersionNotSpecified" in missing.json()["typeName"]
    wrong = raw.http.get(raw.base + SCALE_SETS, params={"api-version": "7.1"}, headers=headers)
    assert wrong.status_code == 400


def test_scale_set_crud(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set("linux-docker", ["linux", "docker"])
    created = raw.actions("GET", f"{SCALE_SETS}/{scale_set_id}").json()
    assert created["name"] == "linux-docker"
    assert created["runnerGroupId"] == 1
    assert created["runnerGroupName"] == "default"
    assert created["labels"] == [
        {"type": "User", "name": "linux"},
        {"type": "User", "name": "docker"},
    ]
    assert created["runnerSetting"] == {"disableUpdate": True}
    assert created["createdOn"].endswith("Z")
    assert set(created["statistics"]) == {
        "totalAvailableJobs",
        "totalAcquiredJobs",
        "totalAssignedJobs",
        "totalRunningJobs",
        "totalRegisteredRunners",
        "totalBusyRunners",
        "totalIdleRunners",
    }

    by_name = raw.actions("GET", SCALE_SETS, params={"runnerGroupId": 1, "name": "linux-docker"})
    assert by_name.status_code == 200
    assert by_name.json()["count"] == 1
    assert by_name.json()["value"][0]["id"] == scale_set_id
    missing = raw.actions("GET", SCALE_SETS, params={"runnerGroupId": 1, "name": "nope"}).json()
    assert missing == {"count": 0, "value": []}

    # PATCH sends the whole object back with new labels, as outrunner does.
    created["labels"] = [{"type": "", "name": "arm64"}]
    updated = raw.actions("PATCH", f"{SCALE_SETS}/{scale_set_id}", json_body=created)
    assert updated.status_code == 200
    assert updated.json()["labels"] == [{"type": "System", "name": "arm64"}]
    assert gh.scale_sets()[0].labels == ("arm64",)

    assert raw.actions("DELETE", f"{SCALE_SETS}/{scale_set_id}").status_code == 204
    gone = raw.actions("GET", f"{SCALE_SETS}/{scale_set_id}")
    assert gone.status_code == 404
    assert "RunnerScaleSetNotFoundException" in gone.json()["typeName"]
    assert raw.actions("DELETE", f"{SCALE_SETS}/{scale_set_id}").status_code == 404
    assert raw.actions("PATCH", f"{SCALE_SETS}/{scale_set_id}", json_body={}).status_code == 404


def test_scale_set_create_errors_and_defaults(raw: Raw) -> None:
    raw.create_scale_set("dup")
    again = raw.actions("POST", SCALE_SETS, json_body={"name": "DUP", "runnerGroupId": 1})
    assert again.status_code == 409
    assert "RunnerScaleSetExistsException" in again.json()["typeName"]
    nameless = raw.actions("POST", SCALE_SETS, json_body={"runnerGroupId": 1})
    assert nameless.status_code == 400
    assert nameless.json()["typeName"].startswith("System.ArgumentException")
    no_group = raw.actions("POST", SCALE_SETS, json_body={"name": "x", "runnerGroupId": 99})
    assert no_group.status_code == 404
    # No labels: the scale set answers to its name, like the client's own default.
    bare = raw.actions("POST", SCALE_SETS, json_body={"name": "bare"}).json()
    assert bare["labels"] == [{"type": "System", "name": "bare"}]
    assert bare["runnerGroupId"] == 1
    assert raw.actions("POST", SCALE_SETS, json_body=[1]).status_code == 400


def test_runner_groups(gh: FakeGitHub, raw: Raw) -> None:
    default = raw.actions("GET", "_apis/runtime/runnergroups/", params={"groupName": "default"})
    assert default.status_code == 200
    assert default.json() == {
        "count": 1,
        "value": [{"id": 1, "name": "default", "size": 0, "isDefaultGroup": True}],
    }
    group_id = gh.add_runner_group("gpu")
    found = raw.actions("GET", "_apis/runtime/runnergroups/", params={"groupName": "gpu"}).json()
    assert found["value"] == [{"id": group_id, "name": "gpu", "size": 0, "isDefaultGroup": False}]
    none = raw.actions("GET", "_apis/runtime/runnergroups/", params={"groupName": "x"}).json()
    assert none == {"count": 0, "value": []}
    # The trailing slash is part of the route.
    assert raw.actions("GET", "_apis/runtime/runnergroups").status_code == 404
    # Same name in another group is fine.
    created = raw.actions("POST", SCALE_SETS, json_body={"name": "s", "runnerGroupId": group_id})
    assert created.json()["runnerGroupName"] == "gpu"
    raw.create_scale_set("s")


def test_generate_jit_config_and_agents(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    response = raw.jit(scale_set_id, "runner-1")
    assert response.status_code == 200
    body = response.json()
    runner = body["runner"]
    assert runner == {"id": runner["id"], "name": "runner-1", "runnerScaleSetId": scale_set_id}
    config = json.loads(base64.b64decode(body["encodedJITConfig"]))
    assert config["url"] == gh.url
    assert config["runner_id"] == runner["id"]
    assert config["runner_name"] == "runner-1"
    assert config["scale_set_id"] == scale_set_id
    assert config["credential"]
    # Flat, so a busybox sed can read it: no nested objects or arrays.
    assert all(not isinstance(v, dict | list) for v in config.values())

    duplicate = raw.jit(scale_set_id, "runner-1")
    assert duplicate.status_code == 409
    assert "AgentExistsException" in duplicate.json()["typeName"]
    assert raw.jit(999, "x").status_code == 404
    assert raw.jit(scale_set_id, "").status_code == 400

    got = raw.actions("GET", f"{AGENTS}/{runner['id']}")
    assert got.json() == runner
    listed = raw.actions("GET", AGENTS, params={"agentName": "runner-1"}).json()
    assert listed == {"count": 1, "value": [runner]}
    assert raw.actions("GET", AGENTS, params={"agentName": "x"}).json()["count"] == 0
    assert gh.runners()[0].status is RunnerStatus.OFFLINE

    assert raw.actions("DELETE", f"{AGENTS}/{runner['id']}").status_code == 204
    for method in ("GET", "DELETE"):
        missing = raw.actions(method, f"{AGENTS}/{runner['id']}")
        assert missing.status_code == 404
        assert "AgentNotFoundException" in missing.json()["typeName"]
    # The name is free again once the runner is gone.
    assert raw.jit(scale_set_id, "runner-1").status_code == 200


def test_unknown_route_and_method(raw: Raw) -> None:
    assert raw.http.get(raw.gh.url + "/nope").status_code == 404
    wrong_method = raw.actions("PUT", SCALE_SETS)
    assert wrong_method.status_code == 405
    assert "GET" in wrong_method.headers["Allow"]
    assert raw.gh.requests[-1].endpoint is None
