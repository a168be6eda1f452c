"""Listener + Scaler + FakeGitHub over real HTTP + in-memory environments running the agent.

The burst test is the scale set issue's acceptance test: 20 jobs, max_runners 5; every job
completes, every runner is deregistered, no session is left, the statistics return to zero, and
the request log matches docs/protocol.md request by request.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any

import pytest

from outrunner.config import DockerImage, RunnerConfig
from outrunner.log import get_logger
from outrunner.provisioner import RunnerRequest
from outrunner.scaler import Scaler
from outrunner.scaleset import (
    Client,
    Label,
    Listener,
    PersonalAccessToken,
    RetryPolicy,
    RunnerScaleSet,
    RunnerSetting,
)
from outrunner.scaleset.types import JobCompleted, JobStarted
from outrunner.testing import Endpoint, FakeGitHub, InMemoryProvisioner, JobState, run_agent
from outrunner.testing.fakegithub import RecordedRequest
from outrunner.testing.fakegithub.endpoints import AGENT_ENDPOINTS

pytestmark = pytest.mark.anyio

TOKEN = "ghp_integrationTestToken0123456789"
RUNNER = RunnerConfig(name="burst", labels=("linux",), docker=DockerImage(image="unused:latest"))


class RecordingScaler:
    """Delegates to the real Scaler and remembers the job messages the listener handed over."""

    def __init__(self, inner: Scaler) -> None:
        self.inner = inner
        self.started: list[JobStarted] = []
        self.completed: list[JobCompleted] = []
        self.desired: list[int] = []

    async def handle_desired_runner_count(self, count: int) -> int:
        self.desired.append(count)
        return await self.inner.handle_desired_runner_count(count)

    async def handle_job_started(self, job: JobStarted) -> None:
        self.started.append(job)
        await self.inner.handle_job_started(job)

    async def handle_job_completed(self, job: JobCompleted) -> None:
        self.completed.append(job)
        await self.inner.handle_job_completed(job)


async def agent(request: RunnerRequest) -> object:
    return await run_agent(request.jit_config, poll_timeout=1.0, timeout=30)


async def test_burst_of_20_jobs_with_max_5_runners() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh:
        provisioner = InMemoryProvisioner(workload=agent)
        async with Client(
            gh.config_url(), PersonalAccessToken(TOKEN), retry=RetryPolicy(wait_min=0.01)
        ) as client:
            group = await client.get_runner_group_by_name("default")
            assert await client.get_runner_scale_set(group.id, "burst") is None
            scale_set = await client.create_runner_scale_set(
                RunnerScaleSet(
                    name="burst",
                    runner_group_id=group.id,
                    labels=(Label(name="linux", type="User"),),
                    runner_setting=RunnerSetting(disable_update=True),
                )
            )
            scaler = Scaler(
                client,
                scale_set_id=scale_set.id,
                max_runners=5,
                name_prefix="burst",
                runner=RUNNER,
                provisioner=provisioner,
                logger=get_logger("test.burst"),
            )
            recorder = RecordingScaler(scaler)
            async with await client.create_message_session(scale_set.id, "test-host") as session:
                listener = Listener(session, max_runners=5)
                listening = asyncio.create_task(listener.run(recorder))
                for n in range(20):
                    gh.queue_job(["linux"], duration=0.05, display_name=f"job {n}")
                await gh.wait_until_jobs_completed_async(20, timeout=60)
                # JobCompleted messages may still be on their way to the listener.
                await gh.wait_for_async(lambda: len(recorder.completed) == 20, timeout=10)
                listening.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await listening
                await scaler.shutdown(timeout=10)
        assert gh.sessions() == []

        jobs = gh.jobs()
        assert len(jobs) == 20
        assert {job.state for job in jobs} == {JobState.COMPLETED}
        assert Counter(job.result for job in jobs) == {"succeeded": 20}
        assert len(recorder.started) == 20
        assert Counter(job.result for job in recorder.completed) == {"succeeded": 20}
        assert len({job.runner_name for job in recorder.completed}) == 20  # one runner per job
        assert provisioner.max_concurrent <= 5
        assert max(recorder.desired) <= 20
        assert provisioner.environments == {}
        assert gh.runners() == []
        stats = gh.statistics(scale_set.id)
        assert stats.total_assigned_jobs == 0
        assert stats.total_running_jobs == 0
        assert stats.total_registered_runners == 0
        assert stats.total_busy_runners == 0
        assert scaler.runners() == []

        check_request_log(gh.requests, scale_set.id)


# docs/protocol.md, as a table: (method, path pattern, api-version?, auth scheme, body keys).
_BASE = r"/tenant/1"
_SS = _BASE + r"/_apis/runtime/runnerscalesets"
EXPECTED: dict[Endpoint, tuple[str, str, bool | None, str, Any]] = {
    Endpoint.REGISTRATION_TOKEN: (
        "POST",
        r"/api/v3/orgs/octo-org/actions/runners/registration-token",
        None,
        "Bearer",
        None,
    ),
    Endpoint.RUNNER_REGISTRATION: (
        "POST",
        r"/api/v3/actions/runner-registration",
        None,
        "RemoteAuth",
        {"url", "runner_event"},
    ),
    Endpoint.GET_RUNNER_GROUP: (
        "GET",
        _BASE + r"/_apis/runtime/runnergroups/",
        True,
        "Bearer",
        None,
    ),
    Endpoint.GET_SCALE_SET: ("GET", _SS, True, "Bearer", None),
    Endpoint.CREATE_SCALE_SET: (
        "POST",
        _SS,
        True,
        "Bearer",
        {"name", "runnerGroupId", "labels", "RunnerSetting", "createdOn"},
    ),
    Endpoint.CREATE_SESSION: (
        "POST",
        _SS + r"/\d+/sessions",
        True,
        "Bearer",
        {"sessionId", "ownerName"},
    ),
    Endpoint.DELETE_SESSION: ("DELETE", _SS + r"/\d+/sessions/[0-9a-f-]{36}", True, "Bearer", None),
    Endpoint.GENERATE_JIT: (
        "POST",
        _SS + r"/\d+/generatejitconfig",
        True,
        "Bearer",
        {"name", "workFolder"},
    ),
    Endpoint.DELETE_RUNNER: (
        "DELETE",
        _BASE + r"/_apis/distributedtask/pools/0/agents/\d+",
        True,
        "Bearer",
        None,
    ),
    Endpoint.GET_MESSAGE: ("GET", r"/queue/[0-9a-f-]{36}", False, "Bearer", None),
    Endpoint.DELETE_MESSAGE: ("DELETE", r"/queue/[0-9a-f-]{36}/\d+", False, "Bearer", None),
    Endpoint.AGENT_CONNECT: ("POST", r"/_agent/connect", None, "Bearer", None),
    Endpoint.AGENT_COMPLETE: ("POST", r"/_agent/complete", None, "Bearer", None),
}


def check_request_log(requests: list[RecordedRequest], scale_set_id: int) -> None:
    # The poll in flight when the listener was cancelled is abandoned by the client; the fake
    # answers it 404 once the session is deleted. That one answer nobody reads is not the flow.
    abandoned = [r for r in requests if r.endpoint is Endpoint.GET_MESSAGE and r.status == 404]
    assert len(abandoned) <= 1
    requests = [r for r in requests if r not in abandoned]
    seen = Counter(r.endpoint for r in requests)
    unexpected = set(seen) - set(EXPECTED)
    assert not unexpected, f"requests outside the expected flow: {unexpected}"
    for r in requests:
        assert r.endpoint is not None
        method, path, api_version, scheme, body_keys = EXPECTED[r.endpoint]
        where = f"{r.method} {r.path} ({r.endpoint})"
        assert r.method == method, where
        assert re.fullmatch(path, r.path), where
        if api_version is True:
            assert r.query.get("api-version") == "6.0-preview", where
            assert r.headers.get("Content-Type") == "application/json", where
        elif api_version is False:
            assert "api-version" not in r.query, where
        assert r.auth_scheme == scheme, where
        assert r.auth_valid is not False, where
        # Ephemeral runners vanish server-side once their job completes, so the Scaler's
        # deregistration may meet a 404 (AgentNotFound), which it treats as done. The agent of an
        # idle runner stopped and deregistered at shutdown may have a long-poll connect held by
        # the fake, which answers it 404 (runner removed): that is the agent's request, not ours.
        ok = {404} if r.endpoint in (Endpoint.DELETE_RUNNER, *AGENT_ENDPOINTS) else set()
        assert r.status is not None, where
        assert r.status < 400 or r.status in ok, where
        if body_keys is not None:
            assert isinstance(r.json, dict), where
            assert set(r.json) == body_keys, where
        if r.endpoint in (
            Endpoint.REGISTRATION_TOKEN,
            Endpoint.DELETE_RUNNER,
            Endpoint.GET_RUNNER_GROUP,
        ):
            assert r.json is None, where
        if r.endpoint is Endpoint.GET_MESSAGE:
            assert r.headers.get("X-ScaleSetMaxCapacity") == "5", where
            assert r.headers.get("Accept") == "application/json; api-version=6.0-preview", where
            assert "Content-Type" not in r.headers, where
        if r.endpoint is Endpoint.DELETE_SESSION or r.endpoint is Endpoint.CREATE_SESSION:
            assert f"/runnerscalesets/{scale_set_id}/" in r.path + "/", where

    assert seen[Endpoint.GENERATE_JIT] == 20
    assert seen[Endpoint.DELETE_RUNNER] == 20
    completed = [r for r in requests if r.endpoint is Endpoint.AGENT_COMPLETE and r.status == 200]
    assert len(completed) == 20
    assert seen[Endpoint.CREATE_SESSION] == 1
    assert seen[Endpoint.DELETE_SESSION] == 1
    # Every delivered message was acknowledged exactly once, and in order.
    gets = [r for r in requests if r.endpoint is Endpoint.GET_MESSAGE]
    acks = [
        int(r.path.rsplit("/", 1)[1]) for r in requests if r.endpoint is Endpoint.DELETE_MESSAGE
    ]
    assert acks == sorted(set(acks))
    assert len([g for g in gets if g.status == 200]) == len(acks)
    # lastMessageId follows the acknowledged ids.
    last_ids = [int(g.query["lastMessageId"]) for g in gets if "lastMessageId" in g.query]
    assert set(last_ids) <= set(acks)
    # The registration exchange happens before any Actions call.
    first_actions = next(i for i, r in enumerate(requests) if r.path.startswith(_BASE))
    assert requests[first_actions - 1].endpoint is Endpoint.RUNNER_REGISTRATION
