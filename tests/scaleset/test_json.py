"""Reading and writing the API's JSON like the Go client (docs/protocol.md §3.1-§4.3)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from outrunner.scaleset import (
    JitRunnerSetting,
    Label,
    RunnerScaleSet,
    RunnerScaleSetStatistic,
    RunnerSetting,
    _json,
)
from outrunner.scaleset._json import DecodeError

STATS = {
    "totalAvailableJobs": 1,
    "totalAcquiredJobs": 2,
    "totalAssignedJobs": 3,
    "totalRunningJobs": 4,
    "totalRegisteredRunners": 5,
    "totalBusyRunners": 6,
    "totalIdleRunners": 7,
}
JOB = {
    "runnerRequestId": 77,
    "repositoryName": "repo",
    "ownerName": "org",
    "jobId": "0c7d7a4e-1111-2222-3333-444455556666",
    "jobWorkflowRef": "org/repo/.github/workflows/ci.yml@refs/heads/main",
    "jobDisplayName": "build",
    "workflowRunId": 555,
    "eventName": "push",
    "requestLabels": ["linux"],
    "queueTime": "2026-01-01T00:00:00Z",
}


def envelope(jobs: Any, **extra: Any) -> dict[str, Any]:
    body = jobs if isinstance(jobs, str) else json.dumps(jobs)
    return {
        "messageId": 12,
        "messageType": "RunnerScaleSetJobMessages",
        "body": body,
        "statistics": STATS,
        **extra,
    }


def parse(doc: Any) -> Any:
    return _json.parse_message(_json.loads(json.dumps(doc).encode()))


def test_message_sorted_by_type_in_order() -> None:
    jobs = [
        {"messageType": "JobAvailable", **JOB, "runnerRequestId": 1, "acquireJobUrl": "http://a"},
        {"messageType": "JobAssigned", **JOB},
        {"messageType": "JobStarted", **JOB, "runnerId": 9, "runnerName": "r-1"},
        {
            "messageType": "JobCompleted",
            **JOB,
            "result": "succeeded",
            "runnerId": 9,
            "runnerName": "r-1",
        },
        {"messageType": "JobStarted", **JOB, "runnerId": 10, "runnerName": "r-2"},
        {"messageType": "SomethingNew", "whatever": {"deep": [1, 2]}},
    ]
    message = parse(envelope(jobs))
    assert message.message_id == 12
    assert message.statistics == RunnerScaleSetStatistic(
        total_available_jobs=1,
        total_acquired_jobs=2,
        total_assigned_jobs=3,
        total_running_jobs=4,
        total_registered_runners=5,
        total_busy_runners=6,
        total_idle_runners=7,
    )
    assert [j.runner_request_id for j in message.jobs_available] == [1]
    assert message.jobs_available[0].acquire_job_url == "http://a"
    assert len(message.jobs_assigned) == 1
    assert [j.runner_name for j in message.jobs_started] == ["r-1", "r-2"]
    completed = message.jobs_completed[0]
    assert (completed.result, completed.runner_id, completed.runner_name) == ("succeeded", 9, "r-1")
    assert completed.job_id == JOB["jobId"]
    assert completed.request_labels == ("linux",)
    assert completed.queue_time == datetime(2026, 1, 1, tzinfo=UTC)
    assert completed.finish_time is None
    assert completed.workflow_run_id == 555


def test_bom_and_key_casing_and_unknown_fields() -> None:
    doc = {
        "MESSAGEID": 5,
        "messagetype": "RunnerScaleSetJobMessages",
        "Body": json.dumps([{"MessageType": "JobStarted", "RUNNERNAME": "x", "extra": 1}]),
        "Statistics": STATS,
        "unknown": [1, 2, 3],
    }
    raw = b"\xef\xbb\xbf" + json.dumps(doc).encode()
    message = _json.parse_message(_json.loads(raw))
    assert message.message_id == 5
    assert message.jobs_started[0].runner_name == "x"
    assert message.statistics is not None


def test_last_case_insensitive_key_wins() -> None:
    raw = _json.loads(
        b'{"runner": {"id": 1, "name": "a"}, "encodedJITConfig": "A", "encodedJitConfig": "B"}'
    )
    assert _json.parse_jit_config(raw).encoded_jit_config == "B"
    job = {
        "messageType": "JobStarted",
        "JOBDISPLAYNAME": "first",
        "jobdisplayname": "build",
        "QueueTime": "2026-01-01T00:00:00Z",
        "WorkflowRunId": 7,
    }
    started = parse(envelope([job])).jobs_started[0]
    assert started.job_display_name == "build"
    assert started.queue_time == datetime(2026, 1, 1, tzinfo=UTC)
    assert started.workflow_run_id == 7


def test_empty_or_absent_body_has_no_jobs() -> None:
    assert parse(envelope("")).jobs_started == ()
    assert parse({"messageId": 1, "messageType": "RunnerScaleSetJobMessages"}).statistics is None
    assert parse(envelope("null")).jobs_completed == ()


def test_null_values_leave_defaults() -> None:
    job = {"messageType": "JobStarted", "runnerId": None, "runnerName": None, "queueTime": None}
    started = parse(envelope([job])).jobs_started[0]
    assert (started.runner_id, started.runner_name, started.queue_time) == (0, "", None)


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        (envelope([], messageType="Other"), "unsupported message type: Other"),
        ({**envelope([]), "body": [{"messageType": "JobStarted"}]}, "body: expected string"),
        (envelope({"messageType": "JobStarted"}), "expected array"),
        (envelope("[not json"), "failed to unmarshal batched messages"),
        (envelope([{"messageType": "JobStarted", "runnerId": "9"}]), "runnerId: expected number"),
        (envelope([{"messageType": "JobCompleted", "jobId": 5}]), "jobId: expected string"),
        (envelope([{"messageType": "JobAssigned", "queueTime": ""}]), "not an RFC 3339 timestamp"),
        (envelope([{"messageType": "JobAssigned", "queueTime": "2026-01-01"}]), "not an RFC 3339"),
        (envelope([{"messageType": "JobAvailable", "runnerRequestId": 1.5}]), "expected number"),
        (envelope([{"messageType": "JobAvailable", "runnerRequestId": True}]), "expected number"),
        (envelope(["JobStarted"]), "expected a JSON object"),
        ({**envelope([]), "messageId": "12"}, "messageId: expected number"),
        ({**envelope([]), "statistics": [1]}, "statistics: expected object"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_message_errors(doc: Any, error: str) -> None:
    with pytest.raises(DecodeError, match=error):
        parse(doc)


def test_unknown_job_type_is_not_decoded() -> None:
    # Unknown types are skipped before their fields are looked at, like the Go switch's default.
    message = parse(envelope([{"messageType": "Future", "runnerRequestId": "not a number"}]))
    assert message.jobs_started == message.jobs_assigned == ()


def test_empty_response_body_is_eof() -> None:
    with pytest.raises(DecodeError, match="EOF"):
        _json.loads(b"")
    with pytest.raises(DecodeError, match="EOF"):
        _json.loads(b"\xef\xbb\xbf")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T03:04:05.123456789Z", datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
        (
            "2026-01-02T03:04:05+02:00",
            datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2))),
        ),
        ("0001-01-01T00:00:00Z", None),
    ],
)
def test_parse_time(text: str, expected: datetime | None) -> None:
    assert _json.parse_time(text) == expected


@pytest.mark.parametrize(
    "text", ["", "2026-01-02 03:04:05Z", "2026-13-02T03:04:05Z", "2026-01-02T03:04:05"]
)
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(DecodeError):
        _json.parse_time(text)


def test_format_time_like_go() -> None:
    assert _json.format_time(None) == "0001-01-01T00:00:00Z"
    assert (
        _json.format_time(datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=UTC))
        == "2026-01-02T03:04:05.12Z"
    )
    plus_two = timezone(timedelta(hours=2))
    assert (
        _json.format_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=plus_two))
        == "2026-01-02T03:04:05+02:00"
    )
    assert _json.format_time(datetime(2026, 1, 2)) == "2026-01-02T00:00:00Z"  # naive is UTC


def test_render_scale_set_omitempty_rules() -> None:
    minimal = _json.dumps(_json.render_runner_scale_set(RunnerScaleSet()))
    assert minimal == b'{"RunnerSetting":{},"createdOn":"0001-01-01T00:00:00Z"}'
    outrunner_style = RunnerScaleSet(
        name="linux-docker",
        runner_group_id=1,
        labels=(Label(name="linux", type="User"),),
        runner_setting=RunnerSetting(disable_update=True),
    )
    assert _json.dumps(_json.render_runner_scale_set(outrunner_style)) == (
        b'{"name":"linux-docker","runnerGroupId":1,"labels":[{"type":"User","name":"linux"}],'
        b'"RunnerSetting":{"disableUpdate":true},"createdOn":"0001-01-01T00:00:00Z"}'
    )
    full = RunnerScaleSet(
        id=3,
        name="n",
        runner_group_id=2,
        runner_group_name="g",
        labels=(Label(name="a", type=""),),
        created_on=datetime(2026, 1, 1, tzinfo=UTC),
        runner_jit_config_url="http://jit",
        statistics=RunnerScaleSetStatistic(total_assigned_jobs=1),
    )
    rendered = _json.render_runner_scale_set(full)
    assert list(rendered) == [
        "id",
        "name",
        "runnerGroupId",
        "runnerGroupName",
        "labels",
        "RunnerSetting",
        "createdOn",
        "runnerJitConfigUrl",
        "statistics",
    ]
    assert rendered["labels"] == [{"type": "System", "name": "a"}]
    assert rendered["statistics"] == {**dict.fromkeys(STATS, 0), "totalAssignedJobs": 1}


def test_scale_set_round_trip_accepts_both_setting_casings() -> None:
    for key in ("RunnerSetting", "runnerSetting"):
        raw = {
            "id": 1,
            "name": "s",
            key: {"disableUpdate": True},
            "createdOn": "2026-01-01T00:00:00Z",
        }
        parsed = _json.parse_runner_scale_set(raw)
        assert parsed.runner_setting.disable_update
        assert parsed.created_on == datetime(2026, 1, 1, tzinfo=UTC)


def test_session_parsing() -> None:
    raw = {
        "sessionId": "9B6E4A3E-0D0C-4BB8-9F61-3F0F5F0E2A11",
        "ownerName": "foo",
        "runnerScaleSet": {
            "id": 1,
            "name": "ScaleSet",
            "RunnerSetting": {},
            "createdOn": "0001-01-01T00:00:00Z",
        },
        "messageQueueUrl": "http://q",
        "messageQueueAccessToken": "tok",
        "statistics": STATS,
    }
    session = _json.parse_session(raw)
    assert session.session_id == "9b6e4a3e-0d0c-4bb8-9f61-3f0f5f0e2a11"
    assert session.runner_scale_set is not None
    assert session.runner_scale_set.created_on is None
    assert "tok" not in repr(session)
    with pytest.raises(DecodeError, match="not a UUID"):
        _json.parse_session({**raw, "sessionId": ""})
    assert _json.parse_session({}).session_id == "00000000-0000-0000-0000-000000000000"


def test_dumps_escapes_html_like_go() -> None:
    assert _json.dumps({"n": "<a&b>"}) == b'{"n":"\\u003ca\\u0026b\\u003e"}'
    assert _json.dumps({"n": "<a>"}, escape_html=False) == b'{"n":"<a>"}'
    assert _json.dumps(_json.render_jit_setting(JitRunnerSetting(name="r"))) == (
        b'{"name":"r","workFolder":""}'
    )
