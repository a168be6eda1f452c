"""Sessions and the message queue: conflicts, tokens, long polls, redelivery, batching, routing."""

from __future__ import annotations

import json
import threading
import time

from outrunner.testing.fakegithub import Endpoint, FakeGitHub, JobState
from tests.testing.raw import SESSION_CONFLICT, Raw, jobs_of, raw_client, types_of

SCALE_SETS = "_apis/runtime/runnerscalesets"


def test_session_create_conflict_refresh_delete(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set("dev")
    session = raw.create_session(scale_set_id, owner="host-a")
    assert session.raw["ownerName"] == "host-a"
    assert session.raw["runnerScaleSet"]["id"] == scale_set_id
    assert session.raw["statistics"]["totalAssignedJobs"] == 0
    assert not session.queue_url.endswith("/")
    assert session.queue_url.startswith(gh.url)

    conflict = raw.actions("POST", f"{SCALE_SETS}/{scale_set_id}/sessions", json_body={})
    assert conflict.status_code == 409
    assert conflict.json() == {
        "typeName": SESSION_CONFLICT,
        "message": "The actions runner scaleset dev already has an active session.",
    }

    path = f"{SCALE_SETS}/{scale_set_id}/sessions/{session.id}"
    refreshed = raw.actions("PATCH", path)
    assert refreshed.status_code == 200
    fresh = refreshed.json()
    assert fresh["sessionId"] == session.id
    assert fresh["messageQueueAccessToken"] != session.token
    # The old queue token is dead, the new one works.
    assert raw.poll(session).status_code == 401
    session.token = fresh["messageQueueAccessToken"]
    assert raw.poll(session).status_code == 202

    assert raw.actions("DELETE", path).status_code == 204
    for method in ("DELETE", "PATCH"):
        expired = raw.actions(method, path)
        assert expired.status_code == 400
        assert "RunnerScaleSetSessionExpiredException" in expired.json()["typeName"]
    # The queue URL of an ended session is gone; a new session can be opened.
    assert raw.poll(session).status_code == 404
    assert raw.create_session(scale_set_id).id != session.id
    assert raw.actions("POST", f"{SCALE_SETS}/999/sessions", json_body={}).status_code == 404


def test_queue_token_checks(gh: FakeGitHub, raw: Raw) -> None:
    session = raw.create_session(raw.create_scale_set())
    assert raw.poll(session, token="wrong").status_code == 401
    no_auth = raw.http.get(session.queue_url)
    assert no_auth.status_code == 401
    gh.expire_queue_tokens()
    assert raw.poll(session).status_code == 401
    assert raw.ack(session, 100000000).status_code == 401
    refreshed = raw.actions("PATCH", f"{SCALE_SETS}/{session.scale_set_id}/sessions/{session.id}")
    session.token = refreshed.json()["messageQueueAccessToken"]
    assert raw.poll(session).status_code == 202
    # Secrets never reach the request log.
    assert session.token not in repr(gh.requests)
    assert raw.admin_token not in repr(gh.requests)


def test_long_poll_returns_at_once_or_202_after_timeout() -> None:
    hold = 0.3  # long enough to tell "at once" from "held"
    with FakeGitHub(long_poll_timeout=hold) as gh, raw_client(gh) as raw:
        session = raw.create_session(raw.create_scale_set())
        started = time.monotonic()
        empty = raw.poll(session)
        waited = time.monotonic() - started
        assert empty.status_code == 202
        assert empty.content == b""
        assert hold - 0.05 <= waited < hold + 0.5

        gh.queue_job(["linux"])
        started = time.monotonic()
        message = raw.poll(session)
        assert message.status_code == 200
        assert time.monotonic() - started < hold / 2


def test_poll_wakes_when_a_job_arrives() -> None:
    with FakeGitHub(long_poll_timeout=5.0) as slow, raw_client(slow) as raw:
        session = raw.create_session(raw.create_scale_set())
        timer = threading.Timer(0.2, lambda: slow.queue_job(["linux"]))
        timer.start()
        started = time.monotonic()
        response = raw.poll(session)
        timer.join()
        assert response.status_code == 200
        assert 0.15 < time.monotonic() - started < 2.0


def test_envelope_shape(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    job = gh.queue_job(["linux"], repository="app", workflow="build.yml", display_name="build")
    message = raw.poll(session).json()
    assert message["messageType"] == "RunnerScaleSetJobMessages"
    assert isinstance(message["messageId"], int)
    assert message["messageId"] >= 100_000_000
    assert message["statistics"]["totalAssignedJobs"] == 1
    (assigned,) = jobs_of(message)
    info = gh.job(job)
    assert assigned["messageType"] == "JobAssigned"
    assert assigned["runnerRequestId"] == job
    assert assigned["jobId"] == info.job_id
    assert isinstance(assigned["jobId"], str)
    assert assigned["repositoryName"] == "app"
    assert assigned["ownerName"] == "octo-org"
    assert assigned["jobWorkflowRef"] == "octo-org/app/.github/workflows/build.yml@refs/heads/main"
    assert assigned["jobDisplayName"] == "build"
    assert isinstance(assigned["workflowRunId"], int)
    assert assigned["eventName"] == "push"
    assert assigned["requestLabels"] == ["linux"]
    assert assigned["queueTime"].endswith("Z")
    assert assigned["scaleSetAssignTime"].endswith("Z")
    assert assigned["runnerAssignTime"] is None
    assert info.state is JobState.ASSIGNED


def test_redelivery_last_message_id_and_monotonic_ids(gh: FakeGitHub, raw: Raw) -> None:
    session = raw.create_session(raw.create_scale_set())
    gh.queue_job(["linux"])
    first = raw.poll(session).json()
    # Not acknowledged: delivered again, identical.
    assert raw.poll(session).json() == first
    gh.queue_job(["linux"])
    # The first message was delivered, so the new job goes into a new, later message.
    second = raw.poll(session, last=first["messageId"]).json()
    assert second["messageId"] > first["messageId"]
    # lastMessageId=0 (omitted) still starts from the oldest undeleted message.
    assert raw.poll(session).json()["messageId"] == first["messageId"]
    assert raw.ack(session, first["messageId"]).status_code == 204
    assert raw.poll(session).json()["messageId"] == second["messageId"]
    assert raw.ack(session, second["messageId"]).status_code == 204
    # Deleting twice is harmless; an id never issued is not found.
    assert raw.ack(session, second["messageId"]).status_code == 204
    assert raw.ack(session, second["messageId"] + 1000).status_code == 404
    assert raw.poll(session).status_code == 202

    ids: list[int] = []
    for _ in range(3):
        gh.queue_job(["linux"])
        message = raw.poll(session, last=ids[-1] if ids else second["messageId"]).json()
        ids.append(message["messageId"])
    assert ids == sorted(ids)
    assert len(set(ids)) == 3


def test_batching_at_most_50_job_messages(gh: FakeGitHub, raw: Raw) -> None:
    session = raw.create_session(raw.create_scale_set())
    assert raw.poll(session, capacity=500).status_code == 202  # capacity known, queue empty
    for _ in range(120):
        gh.queue_job(["linux"])
    sizes = []
    while (response := raw.poll(session, capacity=500)).status_code == 200:
        message = response.json()
        sizes.append(len(jobs_of(message)))
        raw.ack(session, message["messageId"])
    assert sizes == [50, 50, 20]
    assert gh.statistics(session.scale_set_id).total_assigned_jobs == 120


def test_capacity_is_respected(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    for _ in range(5):
        gh.queue_job(["linux"])
    # Before the first poll the capacity is unknown: nothing is assigned yet.
    assert {j.state for j in gh.jobs()} == {JobState.QUEUED}
    message = raw.poll(session, capacity=2).json()
    assert types_of(message) == ["JobAssigned", "JobAssigned"]
    assert message["statistics"]["totalAssignedJobs"] == 2
    assert gh.sessions()[0].max_capacity == 2
    raw.ack(session, message["messageId"])
    assert raw.poll(session, capacity=2).status_code == 202
    # Raising the capacity assigns more on the next poll.
    more = raw.poll(session, capacity=4).json()
    assert types_of(more) == ["JobAssigned", "JobAssigned"]
    states = [j.state for j in gh.jobs()]
    assert states.count(JobState.ASSIGNED) == 4
    assert states.count(JobState.QUEUED) == 1
    # Capacity 0 assigns nothing.
    raw.ack(session, more["messageId"])
    gh.queue_job(["linux"])
    assert raw.poll(session, capacity=0).status_code == 202


def test_label_routing(gh: FakeGitHub, raw: Raw) -> None:
    linux = raw.create_scale_set("linux", ["linux", "x64"])
    arm = raw.create_scale_set("arm", ["linux", "ARM64"])
    linux_session = raw.create_session(linux)
    arm_session = raw.create_session(arm)
    to_arm = gh.queue_job(["linux", "arm64"])  # case-insensitive match
    to_linux = gh.queue_job(["x64"])
    nowhere = gh.queue_job(["windows"])
    # Each scale set's first poll routes the jobs that match it.
    assert [j["runnerRequestId"] for j in raw.next_jobs(arm_session)] == [to_arm]
    assert [j["runnerRequestId"] for j in raw.next_jobs(linux_session)] == [to_linux]
    assert gh.job(to_arm).scale_set_id == arm
    assert gh.job(to_linux).scale_set_id == linux
    assert gh.job(nowhere).state is JobState.QUEUED
    # A matching scale set appearing later picks up the waiting job on its first poll.
    windows = raw.create_scale_set("windows", ["windows"])
    windows_session = raw.create_session(windows)
    assert [j["runnerRequestId"] for j in raw.next_jobs(windows_session)] == [nowhere]


def test_messages_survive_a_session_restart(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    raw.poll(session)
    job = gh.queue_job(["linux"])
    raw.actions("DELETE", f"{SCALE_SETS}/{scale_set_id}/sessions/{session.id}")
    # The queue belongs to the scale set: the next session gets the undeleted message.
    again = raw.create_session(scale_set_id)
    assert again.raw["statistics"]["totalAssignedJobs"] == 1
    assert [j["runnerRequestId"] for j in raw.next_jobs(again)] == [job]


def test_expire_sessions(gh: FakeGitHub, raw: Raw) -> None:
    session = raw.create_session(raw.create_scale_set())
    gh.expire_sessions()
    assert raw.poll(session).status_code == 404
    path = f"{SCALE_SETS}/{session.scale_set_id}/sessions/{session.id}"
    assert raw.actions("PATCH", path).status_code == 400
    assert raw.create_session(session.scale_set_id).id


def test_message_queue_url_with_query() -> None:
    with (
        FakeGitHub(long_poll_timeout=0.2, message_queue_query="sig=abc") as gh,
        raw_client(gh) as raw,
    ):
        session = raw.create_session(raw.create_scale_set())
        assert session.queue_url.endswith("?sig=abc")
        gh.queue_job(["linux"])
        first = raw.poll(session).json()
        gh.queue_job(["linux"])
        # httpx merges lastMessageId into the existing query; the fake sees both.
        second = raw.poll(session, last=first["messageId"])
        assert second.status_code == 200
        assert gh.requests_to(Endpoint.GET_MESSAGE)[-1].query == {
            "sig": "abc",
            "lastMessageId": str(first["messageId"]),
        }
        base, _, _ = session.queue_url.partition("?")
        delete_url = f"{base}/{first['messageId']}?sig=abc"
        headers = {"Authorization": f"Bearer {session.token}"}
        assert raw.http.delete(delete_url, headers=headers).status_code == 204
        stripped = raw.http.get(base, headers=headers)
        assert stripped.status_code == 400


def test_acquire_mode() -> None:
    with FakeGitHub(long_poll_timeout=0.2, acquire_mode=True) as gh, raw_client(gh) as raw:
        scale_set_id = raw.create_scale_set()
        session = raw.create_session(scale_set_id)
        job = gh.queue_job(["linux"])
        message = raw.poll(session).json()
        (available,) = jobs_of(message)
        assert available["messageType"] == "JobAvailable"
        assert available["acquireJobUrl"].endswith(f"/runnerscalesets/{scale_set_id}/acquirejobs")
        assert message["statistics"]["totalAvailableJobs"] == 1
        assert message["statistics"]["totalAssignedJobs"] == 0
        assert gh.job(job).state is JobState.AVAILABLE
        raw.ack(session, message["messageId"])

        path = f"{SCALE_SETS}/{scale_set_id}/acquirejobs"
        # Acquisition is authenticated with the message-queue token, not the admin token.
        assert raw.actions("POST", path, json_body=[job]).status_code == 401
        acquired = raw.actions("POST", path, json_body=[job, 999], token=session.token)
        assert acquired.status_code == 200
        assert acquired.json() == {"count": 1, "value": [job]}
        assert gh.requests_to(Endpoint.ACQUIRE_JOBS)[-1].auth_valid is True
        again = raw.actions("POST", path, json_body=[job], token=session.token)
        assert again.json() == {"count": 0, "value": []}
        empty = raw.actions("POST", path, json_body=[], token=session.token)
        assert empty.json() == {"count": 0, "value": []}
        bad = raw.actions("POST", path, json_body={"ids": [1]}, token=session.token)
        assert bad.status_code == 400

        assigned = raw.poll(session).json()
        assert types_of(assigned) == ["JobAssigned"]
        stats = assigned["statistics"]
        assert (stats["totalAvailableJobs"], stats["totalAcquiredJobs"]) == (0, 1)
        assert stats["totalAssignedJobs"] == 1
        assert gh.job(job).acquired
        gh.expire_queue_tokens()
        assert raw.actions("POST", path, json_body=[], token=session.token).status_code == 401
        assert json.loads(assigned["body"])[0]["runnerRequestId"] == job
