"""Outages of the fake GitHub, session idle expiry, and the runner agents riding out outages."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from outrunner.testing.agent import SHELL_AGENT, AgentError, run_agent
from outrunner.testing.fakegithub import Endpoint, FakeGitHub, JobState, RunnerStatus
from tests.testing.raw import Raw, Session, jobs_of, raw_client, types_of
from tests.testing.shells import Shell, busybox, dash

SCALE_SETS = "_apis/runtime/runnerscalesets"
SESSION_EXPIRED = "RunnerScaleSetSessionExpiredException"
# How long the agent tests keep the service down: several agent retries (0.2, 0.4, 0.8 s, ...).
OUTAGE = 2.0


class Background:
    """Runs ``fn`` in a thread with its own HTTP client, e.g. a request the fake holds."""

    def __init__(self, fn: Callable[[httpx.Client], Any]) -> None:
        self._outcome: list[Any] = []
        self._thread = threading.Thread(target=self._run, args=(fn,))
        self._thread.start()

    def _run(self, fn: Callable[[httpx.Client], Any]) -> None:
        with httpx.Client(trust_env=False, timeout=60) as http:
            try:
                value: Any = fn(http)
            except Exception as error:
                value = error
        self._outcome.extend([value, time.monotonic()])

    def result(self, timeout: float = 10.0) -> tuple[Any, float]:
        """What ``fn`` returned (or the exception it raised), and when (``time.monotonic()``)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background call did not finish"
        return self._outcome[0], self._outcome[1]


def _poll(session: Session, capacity: int = 10) -> Callable[[httpx.Client], httpx.Response]:
    def call(http: httpx.Client) -> httpx.Response:
        headers = {
            "Authorization": f"Bearer {session.token}",
            "X-ScaleSetMaxCapacity": str(capacity),
        }
        return http.get(session.queue_url, headers=headers)

    return call


def _actions_get(path: str, raw: Raw) -> Callable[[httpx.Client], httpx.Response]:
    def call(http: httpx.Client) -> httpx.Response:
        return http.get(
            raw.base + path,
            params={"api-version": "6.0-preview"},
            headers={"Authorization": f"Bearer {raw.admin_token}"},
        )

    return call


def _runner_status(gh: FakeGitHub, name: str) -> RunnerStatus | None:
    runner = gh.runner(name)
    return None if runner is None else runner.status


def _polling(gh: FakeGitHub, polls: int) -> Callable[[], bool]:
    """True once the fake has counted ``polls`` message GETs (the last one may still be held)."""
    return lambda: sum(s.polls for s in gh.sessions()) >= polls


def test_outage_answers_every_service_endpoint_and_is_logged(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    gh.fail_next(Endpoint.GET_SCALE_SET)  # stays queued through the outage
    gh.clear_requests()

    with gh.outage(headers={"Retry-After": "1"}) as outage:
        rest = raw.http.post(
            f"{gh.api_url}/orgs/octo-org/actions/runners/registration-token",
            headers={"Authorization": "Bearer pat"},
        )
        assert rest.status_code == 503
        assert rest.headers["Retry-After"] == "1"
        assert set(rest.json()) == {"message", "documentation_url"}  # GitHub REST error shape
        actions = raw.actions("GET", SCALE_SETS)
        assert actions.status_code == 503
        assert set(actions.json()) == {"typeName", "message"}  # Actions service error shape
        assert raw.actions("POST", f"{SCALE_SETS}/{scale_set_id}/sessions").status_code == 503
        assert raw.poll(session).status_code == 503
        assert raw.ack(session, 100_000_000).status_code == 503
        assert gh.pending_faults(Endpoint.GET_SCALE_SET) == 1
        # The agent endpoints are another service: not down (401: handled, unknown credential).
        connect = raw.http.post(f"{gh.url}/_agent/connect", headers={"Authorization": "Bearer x"})
        assert connect.status_code == 401
    assert not outage.active
    outage.end()  # idempotent

    log = [(r.endpoint, r.status, r.fault) for r in gh.requests]
    assert log == [
        (Endpoint.REGISTRATION_TOKEN, 503, "outage"),
        (Endpoint.GET_SCALE_SET, 503, "outage"),
        (Endpoint.CREATE_SESSION, 503, "outage"),
        (Endpoint.GET_MESSAGE, 503, "outage"),
        (Endpoint.DELETE_MESSAGE, 503, "outage"),
        (Endpoint.AGENT_CONNECT, 401, None),
    ]
    # Not handled: no poll was counted, and the queued fault applies now, then service resumes.
    assert gh.sessions()[0].polls == 0
    assert raw.actions("GET", SCALE_SETS).status_code == 503
    assert gh.requests_to(Endpoint.GET_SCALE_SET)[-1].fault == "fail"
    assert raw.actions("GET", SCALE_SETS).status_code == 200


def test_outage_of_selected_endpoints(gh: FakeGitHub, raw: Raw) -> None:
    session = raw.create_session(raw.create_scale_set())
    queue_down = gh.outage(500, endpoints=[Endpoint.GET_MESSAGE, "delete_message"])
    agents_down = gh.outage(502, endpoints=[Endpoint.GET_MESSAGE], include_agents=True)
    assert agents_down.endpoints == {
        Endpoint.GET_MESSAGE,
        Endpoint.AGENT_CONNECT,
        Endpoint.AGENT_COMPLETE,
    }
    assert raw.poll(session).status_code == 500  # overlapping outages: the oldest answers
    assert raw.actions("GET", SCALE_SETS).status_code == 200
    connect = raw.http.post(f"{gh.url}/_agent/connect", headers={"Authorization": "Bearer x"})
    assert (connect.status_code, connect.headers["Content-Type"]) == (
        502,
        "text/plain; charset=utf-8",
    )
    queue_down.end()
    assert not queue_down.active
    assert agents_down.active
    assert raw.poll(session).status_code == 502
    agents_down.end()
    assert raw.poll(session).status_code == 202

    with pytest.raises(ValueError, match="status"):
        gh.outage(42)
    with pytest.raises(ValueError, match="endpoint"):
        gh.outage(endpoints=[])
    with pytest.raises(ValueError, match="not_an_endpoint"):
        gh.outage(endpoints=["not_an_endpoint"])


def test_open_long_polls_are_cut_when_the_outage_starts() -> None:
    # Polls held for 30 s unless the outage cuts them.
    with FakeGitHub(long_poll_timeout=30.0) as gh, raw_client(gh) as raw:
        scale_set_id = raw.create_scale_set()
        session = raw.create_session(scale_set_id)
        jit = gh.generate_jit_config(scale_set_id, "waiting")
        gh.delay_next(Endpoint.GET_SCALE_SET, 30.0)
        poll = Background(_poll(session))
        agent = Background(
            lambda _: asyncio.run(run_agent(jit, poll_timeout=30.0, timeout=30, retry_for=0))
        )
        delayed = Background(_actions_get(SCALE_SETS, raw))
        gh.wait_for(
            lambda: _polling(gh, 1)() and _runner_status(gh, "waiting") is RunnerStatus.IDLE,
            timeout=5,
        )
        time.sleep(0.1)  # let the delayed request reach its sleep

        started = time.monotonic()
        outage = gh.outage(include_agents=True)
        (response, answered) = poll.result()
        (error, agent_done) = agent.result()
        (slow, slow_done) = delayed.result()
        outage.end()
        latest = max(answered, agent_done, slow_done) - started
        assert latest < 1.0, f"the open requests were answered {latest:.3f} s after the outage"
        assert response.status_code == 503
        assert isinstance(error, AgentError)
        assert "503" in str(error)
        assert slow.status_code == 503
        for endpoint in (Endpoint.GET_MESSAGE, Endpoint.AGENT_CONNECT, Endpoint.GET_SCALE_SET):
            cut = gh.requests_to(endpoint)[-1]
            assert (cut.status, cut.fault) == (503, "outage")
        assert raw.actions("GET", SCALE_SETS).status_code == 200


def test_drop_connection_outage() -> None:
    with FakeGitHub(long_poll_timeout=30.0) as gh, raw_client(gh) as raw:
        session = raw.create_session(raw.create_scale_set())
        poll = Background(_poll(session))
        gh.wait_for(_polling(gh, 1), timeout=5)
        started = time.monotonic()
        with gh.outage(status=None):
            (cut, answered) = poll.result()
            assert isinstance(cut, httpx.RemoteProtocolError)  # closed without an answer
            assert answered - started < 1.0
            with pytest.raises(httpx.RemoteProtocolError):
                raw.actions("GET", SCALE_SETS)
        log = [(r.endpoint, r.status, r.fault) for r in gh.requests[-2:]]
        assert log == [
            (Endpoint.GET_MESSAGE, None, "outage"),
            (Endpoint.GET_SCALE_SET, None, "outage"),
        ]
        assert raw.actions("GET", SCALE_SETS).status_code == 200


def _assigned_job(gh: FakeGitHub, raw: Raw) -> tuple[Session, int, str]:
    """A listener that polled and acked a JobAssigned; returns (session, job, JIT config)."""
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    job = gh.queue_job(["linux"], duration=0.2)
    assert types_of(raw.poll(session).json()) == ["JobAssigned"]
    raw.ack(session, raw.poll(session).json()["messageId"])
    return session, job, gh.generate_jit_config(scale_set_id, "r-1")


def _started_and_completed(raw: Raw, session: Session, job: int) -> None:
    message = raw.poll(session).json()
    assert types_of(message) == ["JobStarted", "JobCompleted"]
    assert {j["runnerRequestId"] for j in jobs_of(message)} == {job}
    assert jobs_of(message)[1]["result"] == "succeeded"
    assert message["statistics"]["totalAssignedJobs"] == 0


@pytest.mark.anyio
async def test_jobs_complete_during_outage_and_are_reported_after(gh: FakeGitHub, raw: Raw) -> None:
    session, job, jit = _assigned_job(gh, raw)
    with gh.outage():
        # retry_for=0: the agent's service is up, so it needs no retry.
        result = await run_agent(jit, poll_timeout=1.0, timeout=10, retry_for=0)
        assert result.runner_request_id == job
        assert gh.job(job).state is JobState.COMPLETED
        assert gh.runner("r-1") is None  # removed server-side, as an ephemeral runner is
        assert raw.poll(session).status_code == 503
    # The session survived the outage: it gets the messages emitted meanwhile.
    _started_and_completed(raw, session, job)


@pytest.mark.anyio
async def test_outage_longer_than_the_session_lifetime() -> None:
    async with FakeGitHub(long_poll_timeout=0.1, session_idle_timeout=0.3) as gh:
        with raw_client(gh) as raw:
            session, job, jit = _assigned_job(gh, raw)
            with gh.outage():
                await run_agent(jit, poll_timeout=1.0, timeout=10, retry_for=0)
                # The listener's polls fail, so its session idles out meanwhile.
                await gh.wait_for_async(lambda: gh.sessions() == [], timeout=5)
                assert raw.poll(session).status_code == 503
            assert raw.poll(session).status_code == 404
            path = f"{SCALE_SETS}/{session.scale_set_id}/sessions/{session.id}"
            refresh = raw.actions("PATCH", path)
            assert refresh.status_code == 400
            assert SESSION_EXPIRED in refresh.json()["typeName"]
            # A new session (no 409) gets what was emitted while there was none.
            _started_and_completed(raw, raw.create_session(session.scale_set_id), job)


def test_session_idle_timeout() -> None:
    idle = 0.3
    with FakeGitHub(long_poll_timeout=0.1, session_idle_timeout=idle) as gh, raw_client(gh) as raw:
        scale_set_id = raw.create_scale_set()
        session = raw.create_session(scale_set_id)
        # Polling keeps it alive well past its idle timeout.
        deadline = time.monotonic() + 3 * idle
        while time.monotonic() < deadline:
            assert raw.poll(session).status_code == 202
        job = gh.queue_job(["linux"])
        message = raw.poll(session).json()
        assert raw.ack(session, message["messageId"]).status_code == 204
        last_poll_end = time.monotonic()
        # Idle: expired about `idle` after the end of its last GET; the reaper makes it visible
        # without any request.
        gh.wait_for(lambda: gh.sessions() == [], timeout=5)
        expired_after = time.monotonic() - last_poll_end
        assert idle / 2 <= expired_after < idle + 1.0
        assert raw.poll(session).status_code == 404
        path = f"{SCALE_SETS}/{scale_set_id}/sessions/{session.id}"
        for method in ("PATCH", "DELETE"):
            expired = raw.actions(method, path)
            assert expired.status_code == 400
            assert SESSION_EXPIRED in expired.json()["typeName"]
        # Emitted while no session exists; the queue is the scale set's.
        gh.cancel_job(job)
        again = raw.create_session(scale_set_id)
        assert again.id != session.id
        (completed,) = raw.next_jobs(again)
        assert (completed["messageType"], completed["result"]) == ("JobCompleted", "canceled")
    assert [t for t in threading.enumerate() if t.name.startswith("fakegithub")] == []


def test_a_held_poll_keeps_the_session_alive() -> None:
    # A single GET held longer than the idle timeout: the session is polling, not idle.
    with FakeGitHub(long_poll_timeout=0.6, session_idle_timeout=0.2) as gh, raw_client(gh) as raw:
        session = raw.create_session(raw.create_scale_set())
        assert raw.poll(session).status_code == 202
        assert raw.poll(session).status_code == 202  # not 404: it did not expire meanwhile
        assert len(gh.sessions()) == 1
        # A session that never polls expires too.
        other = raw.create_session(raw.create_scale_set("other"))
        gh.wait_for(lambda: other.id not in {s.session_id for s in gh.sessions()}, timeout=5)
    with pytest.raises(ValueError, match="session_idle_timeout"):
        FakeGitHub(session_idle_timeout=0)


@pytest.mark.anyio
async def test_python_agent_retries_through_an_outage(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    first, second = gh.queue_job(["linux"], duration=0.3), gh.queue_job(["linux"])
    await asyncio.to_thread(raw.poll, session)
    running = asyncio.create_task(run_agent(gh.generate_jit_config(scale_set_id, "a"), timeout=30))
    await gh.wait_for_async(lambda: gh.job(first).state is JobState.RUNNING)
    # "a" will report during the outage; "b" connects during it.
    outage = gh.outage(include_agents=True)
    connecting = asyncio.create_task(
        run_agent(gh.generate_jit_config(scale_set_id, "b"), timeout=30)
    )
    await asyncio.sleep(OUTAGE)
    outage.end()
    done = await asyncio.gather(running, connecting)
    assert [r.runner_request_id for r in done] == [first, second]
    for endpoint in (Endpoint.AGENT_CONNECT, Endpoint.AGENT_COMPLETE):
        log = [(r.status, r.fault) for r in gh.requests_to(endpoint)]
        assert (503, "outage") in log
        assert log[-1] == (200, None)
    assert [j.result for j in gh.jobs()] == ["succeeded", "succeeded"]


@pytest.mark.parametrize(
    ("shell_name", "status"), [("dash", 503), ("busybox", 503), ("busybox", None)]
)
def test_shell_agent_retries_through_an_outage(
    gh: FakeGitHub, raw: Raw, tmp_path: Path, shell_name: str, status: int | None
) -> None:
    shell: Shell = dash() if shell_name == "dash" else busybox(tmp_path)
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    job = gh.queue_job(["linux"], duration=0.1, display_name="build and test")
    assert raw.poll(session).status_code == 200
    jit = gh.generate_jit_config(scale_set_id, "sh-agent")
    outage = gh.outage(status, include_agents=True)
    ending = threading.Timer(OUTAGE, outage.end)
    ending.start()
    started = time.monotonic()
    done = subprocess.run(
        [*shell.argv, str(SHELL_AGENT), "--poll-timeout", "1", "--retry-for", "30"],
        env={**shell.env, "ACTIONS_RUNNER_INPUT_JITCONFIG": jit},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    took = time.monotonic() - started
    ending.join()
    assert done.returncode == 0, done.stderr
    assert OUTAGE <= took < OUTAGE + 5
    assert "completed with result: succeeded" in done.stdout
    problem = "HTTP 503" if status else f"no answer from {gh.url}"
    assert f"outrunner-agent: connect: {problem}; retrying in 0.20 s" in done.stderr
    assert jit not in done.stdout + done.stderr
    assert gh.job(job).result == "succeeded"
    retried = [r for r in gh.requests_to(Endpoint.AGENT_CONNECT) if r.fault == "outage"]
    assert len(retried) >= 3
    assert {r.status for r in retried} == {status}


@pytest.mark.anyio
async def test_agent_retries_are_bounded_and_4xx_is_final(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    with gh.outage(include_agents=True):
        started = time.monotonic()
        with pytest.raises(AgentError, match="connect refused: HTTP 503"):
            await run_agent(gh.generate_jit_config(scale_set_id, "a"), retry_for=0.5)
        assert 0.5 <= time.monotonic() - started < 2.0
    # 404: the runner was removed; retrying cannot help.
    jit = gh.generate_jit_config(scale_set_id, "b")
    registered = gh.runner("B")  # names are case-insensitive, as on GitHub
    assert registered is not None
    assert registered.status is RunnerStatus.OFFLINE
    removed = raw.actions("DELETE", f"_apis/distributedtask/pools/0/agents/{registered.id}")
    assert removed.status_code == 204
    assert gh.runner("b") is None
    started = time.monotonic()
    with pytest.raises(AgentError, match="404"):
        await run_agent(jit, retry_for=30)
    assert time.monotonic() - started < 1.0
