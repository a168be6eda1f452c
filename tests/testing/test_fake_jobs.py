"""Job simulation end to end with the Python agent: statistics, one-time JIT, runner removal."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import pytest

from outrunner.testing.agent import AgentError, decode_jit_config, run_agent
from outrunner.testing.fakegithub import (
    Endpoint,
    FakeGitHub,
    JobState,
    RunnerStatus,
    Statistics,
)
from outrunner.testing.fakegithub.errors import ApiError
from tests.testing.raw import Raw, Session, jobs_of, raw_client

AGENTS = "_apis/distributedtask/pools/0/agents"


def _consistent(stats: Statistics) -> None:
    assert stats.total_assigned_jobs >= stats.total_running_jobs
    assert stats.total_registered_runners == stats.total_busy_runners + stats.total_idle_runners
    assert stats.total_busy_runners == stats.total_running_jobs


def _stats(message: dict[str, Any]) -> Statistics:
    s = message["statistics"]
    return Statistics(
        total_available_jobs=s["totalAvailableJobs"],
        total_acquired_jobs=s["totalAcquiredJobs"],
        total_assigned_jobs=s["totalAssignedJobs"],
        total_running_jobs=s["totalRunningJobs"],
        total_registered_runners=s["totalRegisteredRunners"],
        total_busy_runners=s["totalBusyRunners"],
        total_idle_runners=s["totalIdleRunners"],
    )


async def _poll(raw: Raw, session: Session) -> dict[str, Any]:
    """One message, acknowledged; the blocking client runs off the loop so agents keep going."""
    response = await asyncio.to_thread(raw.poll, session, 0, 1)
    assert response.status_code == 200, response.status_code
    message: dict[str, Any] = response.json()
    await asyncio.to_thread(raw.ack, session, message["messageId"])
    return message


@pytest.mark.anyio
async def test_full_lifecycle_keeps_statistics_consistent(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    first = gh.queue_job(["linux"], duration=0.3, result="failed", display_name="test")
    second = gh.queue_job(["linux"], duration=0.0)

    assigned = await _poll(raw, session)  # capacity 1: only the first job
    assert [j["runnerRequestId"] for j in jobs_of(assigned)] == [first]
    assert _stats(assigned) == Statistics(total_assigned_jobs=1)
    assert gh.job(second).state is JobState.QUEUED

    jit = raw.jit(scale_set_id, "linux-set-1a2b3c4d").json()
    runner_id = jit["runner"]["id"]
    assert gh.statistics(scale_set_id) == Statistics(
        total_assigned_jobs=1, total_registered_runners=1, total_idle_runners=1
    )

    agent = asyncio.create_task(run_agent(jit["encodedJITConfig"], poll_timeout=1.0, timeout=10))
    await gh.wait_for_async(lambda: gh.job(first).state is JobState.RUNNING)
    running = gh.statistics(scale_set_id)
    _consistent(running)
    assert running == Statistics(
        total_assigned_jobs=1,
        total_running_jobs=1,
        total_registered_runners=1,
        total_busy_runners=1,
    )
    still_running = raw.actions("DELETE", f"{AGENTS}/{runner_id}")
    assert still_running.status_code == 409
    assert "JobStillRunningException" in still_running.json()["typeName"]

    started = await _poll(raw, session)
    (job_started,) = jobs_of(started)
    assert job_started["messageType"] == "JobStarted"
    assert (job_started["runnerId"], job_started["runnerName"]) == (runner_id, "linux-set-1a2b3c4d")
    assert job_started["runnerAssignTime"].endswith("Z")
    _consistent(_stats(started))

    result = await agent
    assert (result.runner_request_id, result.result, result.display_name) == (
        first,
        "failed",
        "test",
    )
    completed = await _poll(raw, session)
    messages = jobs_of(completed)
    assert messages[0]["messageType"] == "JobCompleted"
    assert messages[0]["result"] == "failed"
    assert messages[0]["runnerName"] == "linux-set-1a2b3c4d"
    assert messages[0]["finishTime"].endswith("Z")
    # The freed capacity went to the second job, in the same batch.
    assert [(m["messageType"], m["runnerRequestId"]) for m in messages[1:]] == [
        ("JobAssigned", second)
    ]
    assert _stats(completed) == Statistics(total_assigned_jobs=1)

    # The ephemeral runner is gone server-side once its job is done.
    assert gh.runners() == []
    assert raw.actions("DELETE", f"{AGENTS}/{runner_id}").status_code == 404
    info = gh.job(first)
    assert (info.state, info.result, info.runner_name) == (
        JobState.COMPLETED,
        "failed",
        "linux-set-1a2b3c4d",
    )

    # Reusing the one-time JIT config is refused.
    with pytest.raises(AgentError, match="409"):
        await run_agent(jit["encodedJITConfig"], poll_timeout=0.2, timeout=5)

    other = raw.jit(scale_set_id, "linux-set-2").json()["encodedJITConfig"]
    await run_agent(other, poll_timeout=1.0, timeout=5)
    done = await gh.wait_until_jobs_completed_async(2, timeout=5)
    assert {j.id for j in done} == {first, second}
    assert gh.statistics(scale_set_id) == Statistics()


@pytest.mark.anyio
async def test_agent_waits_for_a_job_and_is_refused_while_busy(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    await asyncio.to_thread(raw.poll, session)  # capacity known, no job yet: 202
    encoded = gh.generate_jit_config(scale_set_id, "r1")
    agent = asyncio.create_task(run_agent(encoded, poll_timeout=0.1, timeout=10))
    # At least two empty connects (204): the agent keeps asking.
    await gh.wait_for_async(
        lambda: [r.status for r in gh.requests_to(Endpoint.AGENT_CONNECT)].count(204) >= 2
    )
    assert gh.runners()[0].status is RunnerStatus.IDLE
    assert not agent.done()
    gh.queue_job(["linux"], duration=0.2)
    await gh.wait_for_async(lambda: gh.runners()[0].status is RunnerStatus.BUSY)
    with pytest.raises(AgentError, match="409"):
        await run_agent(encoded, poll_timeout=0.2, timeout=5)
    await agent
    assert gh.wait_until_jobs_completed(1)[0].runner_name == "r1"


@pytest.mark.anyio
async def test_a_lost_job_answer_is_delivered_again_to_the_same_agent_run(
    gh: FakeGitHub, raw: Raw
) -> None:
    # Under load an agent's connect can time out on its side while the fake still holds it; the
    # fake then hands the job to a request nobody reads. The agent's retry must get that job, or
    # the job runs for good on a runner whose agent was refused (409) and exited.
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    await asyncio.to_thread(raw.poll, session)
    credential = decode_jit_config(gh.generate_jit_config(scale_set_id, "r1")).credential
    gh.queue_job(["linux"], duration=0.2)

    def connect(run: str | None) -> tuple[int, str]:
        form = {"wait": "5"} if run is None else {"wait": "5", "session": run}
        reply = raw.http.post(
            f"{gh.url}/_agent/connect",
            data=form,
            headers={"Authorization": f"Bearer {credential}"},
        )
        return reply.status_code, reply.text

    status, lost = await asyncio.to_thread(connect, "run-1")  # the answer the agent never read
    assert status == 200
    assert "job_id=" in lost
    assert await asyncio.to_thread(connect, "run-1") == (200, lost)  # its retry: the same job
    assert (await asyncio.to_thread(connect, "run-2"))[0] == 409  # another run of the config
    assert (await asyncio.to_thread(connect, None))[0] == 409
    assert [j.state for j in gh.jobs()] == [JobState.RUNNING]


@pytest.mark.anyio
async def test_runner_kept_when_removal_disabled() -> None:
    async with FakeGitHub(long_poll_timeout=0.2, remove_agent_on_completion=False) as gh:
        with raw_client(gh) as raw:
            scale_set_id = raw.create_scale_set()
            session = raw.create_session(scale_set_id)
            await asyncio.to_thread(raw.poll, session)
            gh.queue_job(["linux"])
            encoded = gh.generate_jit_config(scale_set_id, "keep-me")
            await run_agent(encoded, poll_timeout=1.0, timeout=5)
            (runner,) = gh.runners()
            assert runner.status is RunnerStatus.FINISHED
            assert gh.statistics(scale_set_id) == Statistics(
                total_registered_runners=1, total_idle_runners=1
            )
            assert raw.actions("DELETE", f"{AGENTS}/{runner.id}").status_code == 204
            assert gh.runners() == []


@pytest.mark.anyio
async def test_removed_and_unknown_runners_are_refused(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    jit = raw.jit(scale_set_id, "doomed").json()
    agent = asyncio.create_task(run_agent(jit["encodedJITConfig"], poll_timeout=5.0, timeout=10))
    await gh.wait_for_async(lambda: gh.runners()[0].status is RunnerStatus.IDLE)
    # Deleting an idle runner wakes its waiting connect with a 404.
    deleted = await asyncio.to_thread(raw.actions, "DELETE", f"{AGENTS}/{jit['runner']['id']}")
    assert deleted.status_code == 204
    with pytest.raises(AgentError, match="404"):
        await agent

    forged = gh.generate_jit_config(scale_set_id, "forged")
    config = json.loads(base64.b64decode(forged))
    config["credential"] = "jit_forged"
    tampered = base64.b64encode(json.dumps(config).encode()).decode()
    with pytest.raises(AgentError, match="401"):
        await run_agent(tampered, poll_timeout=0.2, timeout=5)
    with pytest.raises(AgentError, match="base64"):
        await run_agent("!!!", timeout=5)


@pytest.mark.anyio
async def test_cancel_running_job(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    await asyncio.to_thread(raw.poll, session)
    job = gh.queue_job(["linux"], duration=5.0)
    agent = asyncio.create_task(
        run_agent(gh.generate_jit_config(scale_set_id, "r"), poll_timeout=1.0, timeout=10)
    )
    await gh.wait_for_async(lambda: gh.job(job).state is JobState.RUNNING)
    gh.cancel_job(job)
    assert gh.job(job).result == "canceled"
    agent.cancel()
    with pytest.raises(asyncio.CancelledError):
        await agent
    messages = jobs_of(raw.poll(session).json())
    # Nothing was delivered in between, so all three events share one message.
    assert [m["messageType"] for m in messages] == ["JobAssigned", "JobStarted", "JobCompleted"]
    assert messages[-1]["result"] == "canceled"
    queued = gh.queue_job(["nothing-matches"])
    gh.cancel_job(queued)
    assert gh.job(queued).state is JobState.COMPLETED


def test_deleting_a_scale_set_requeues_its_unstarted_jobs(gh: FakeGitHub, raw: Raw) -> None:
    first = raw.create_scale_set("a")
    second = raw.create_scale_set("b")
    first_session = raw.create_session(first)
    raw.poll(first_session)
    job = gh.queue_job(["linux"])
    assert gh.job(job).scale_set_id == first
    raw.actions("DELETE", f"_apis/runtime/runnerscalesets/{first}")
    assert gh.sessions() == []
    assert gh.job(job).state is JobState.QUEUED
    second_session = raw.create_session(second)
    assert [m["runnerRequestId"] for m in raw.next_jobs(second_session)] == [job]


def test_queue_job_validation(gh: FakeGitHub) -> None:
    with pytest.raises(ValueError, match="label"):
        gh.queue_job([])
    with pytest.raises(TypeError):
        gh.queue_job("linux")
    with pytest.raises(ValueError, match="duration"):
        gh.queue_job(["linux"], duration=-1)
    with pytest.raises(KeyError):
        gh.statistics(42)
    with pytest.raises(ValueError, match="exists"):
        gh.add_runner_group("Default")


@pytest.mark.anyio
async def test_remove_runner_ends_its_waiting_connect(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    credential = decode_jit_config(gh.generate_jit_config(scale_set_id, "Gone-1")).credential

    def connect() -> tuple[int, float]:
        start = time.monotonic()
        reply = raw.http.post(
            f"{gh.url}/_agent/connect",
            data={"wait": "30"},
            headers={"Authorization": f"Bearer {credential}"},
        )
        return reply.status_code, time.monotonic() - start

    waiting = asyncio.create_task(asyncio.to_thread(connect))
    await asyncio.to_thread(gh.wait_for, lambda: gh.runners()[0].status is RunnerStatus.IDLE)
    assert gh.remove_runner("gone-1")  # names are case-insensitive, as GitHub's
    status, waited = await asyncio.wait_for(waiting, 10)
    assert status == 404
    assert waited < 5  # not the 30 s long poll
    assert gh.runners() == []
    assert gh.remove_runner("gone-1") is False


@pytest.mark.anyio
async def test_remove_runner_refuses_a_runner_with_a_running_job(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    await asyncio.to_thread(raw.poll, session)
    credential = decode_jit_config(gh.generate_jit_config(scale_set_id, "busy-1")).credential
    gh.queue_job(["linux"], duration=30)
    reply = await asyncio.to_thread(
        raw.http.post,
        f"{gh.url}/_agent/connect",
        data={"wait": "5"},
        headers={"Authorization": f"Bearer {credential}"},
    )
    assert reply.status_code == 200
    with pytest.raises(ApiError) as refused:
        gh.remove_runner("busy-1")
    assert refused.value.status == 409
    assert [r.name for r in gh.runners()] == ["busy-1"]


@pytest.mark.anyio
async def test_assign_job_hands_a_job_to_a_runner_without_a_listener(gh: FakeGitHub) -> None:
    # A baseline's runners (registered with generate_jit_config, no session polling) take the
    # jobs assigned to their scale set, as runners behind a listener do.
    scale_set_id = gh.create_scale_set("baseline", ["baseline"])
    job = gh.assign_job(scale_set_id, duration=0.1)
    assert gh.job(job).state is JobState.ASSIGNED
    assert gh.job(job).scale_set_id == scale_set_id
    assert gh.statistics(scale_set_id).total_assigned_jobs == 1
    await run_agent(gh.generate_jit_config(scale_set_id, "base-1"), poll_timeout=1.0, timeout=5)
    done = gh.job(job)
    assert done.state is JobState.COMPLETED
    assert done.result == "succeeded"
    assert done.runner_name == "base-1"
    with pytest.raises(ApiError) as unknown:
        gh.assign_job(999)
    assert unknown.value.status == 404
