"""Fault injection, token expiry and prompt, leak-free shutdown of the fake."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from outrunner.testing.agent import AgentError, run_agent
from outrunner.testing.fakegithub import Endpoint, FakeGitHub
from tests.testing.raw import Raw, raw_client

SCALE_SETS = "_apis/runtime/runnerscalesets"


def _fake_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fakegithub")]


def test_fail_next(gh: FakeGitHub, raw: Raw) -> None:
    gh.fail_next(Endpoint.GET_SCALE_SET, times=2, headers={"Retry-After": "1"})
    assert gh.pending_faults(Endpoint.GET_SCALE_SET) == 2
    for _ in range(2):
        failed = raw.actions("GET", SCALE_SETS)
        assert failed.status_code == 503
        assert failed.headers["Retry-After"] == "1"
        assert "typeName" in failed.json()
        assert "message" in failed.json()
    assert raw.actions("GET", SCALE_SETS).status_code == 200
    log = gh.requests_to(Endpoint.GET_SCALE_SET)
    assert [(r.status, r.fault) for r in log] == [(503, "fail"), (503, "fail"), (200, None)]

    gh.fail_next("create_scale_set", status=400, body={"message": "test error"})
    failed = raw.actions("POST", SCALE_SETS, json_body={"name": "x"})
    assert (failed.status_code, failed.json()) == (400, {"message": "test error"})
    assert gh.scale_sets() == []  # a failed request is not handled

    gh.fail_next(Endpoint.GET_RUNNER_GROUP, status=500, body="plain words")
    failed = raw.actions("GET", "_apis/runtime/runnergroups/")
    assert failed.headers["Content-Type"].startswith("text/plain")
    assert failed.text == "plain words"

    gh.fail_next(Endpoint.LIST_RUNNERS, status=200, body=b"")
    empty = raw.actions("GET", "_apis/distributedtask/pools/0/agents")
    assert (empty.status_code, empty.content) == (200, b"")

    gh.fail_next(Endpoint.GET_SCALE_SET, times=3)
    gh.clear_faults()
    assert gh.pending_faults(Endpoint.GET_SCALE_SET) == 0
    with pytest.raises(ValueError, match="not_an_endpoint"):
        gh.fail_next("not_an_endpoint")
    with pytest.raises(ValueError, match="times"):
        gh.drop_next(Endpoint.GET_MESSAGE, times=0)


def test_delay_next(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    gh.delay_next(Endpoint.CREATE_SESSION, 0.3)
    started = time.monotonic()
    session = raw.create_session(scale_set_id)  # delayed, then handled normally
    assert time.monotonic() - started >= 0.3
    assert session.id == gh.sessions()[0].session_id
    assert gh.requests_to(Endpoint.CREATE_SESSION)[-1].fault == "delay"


def test_drop_next(gh: FakeGitHub, raw: Raw) -> None:
    session = raw.create_session(raw.create_scale_set())
    gh.queue_job(["linux"])
    message = raw.poll(session).json()
    gh.drop_next(Endpoint.DELETE_MESSAGE)
    with pytest.raises(httpx.RemoteProtocolError):
        raw.ack(session, message["messageId"])
    dropped = gh.requests_to(Endpoint.DELETE_MESSAGE)[-1]
    assert (dropped.status, dropped.fault) == (None, "drop")
    # Not handled: the message is still there, and a retry succeeds.
    assert raw.poll(session).json()["messageId"] == message["messageId"]
    assert raw.ack(session, message["messageId"]).status_code == 204


@pytest.mark.anyio
async def test_agent_retries_a_dropped_connect(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    await asyncio.to_thread(raw.poll, session)
    gh.queue_job(["linux"])
    gh.drop_next(Endpoint.AGENT_CONNECT)
    result = await run_agent(gh.generate_jit_config(scale_set_id, "r"), timeout=5)
    assert result.result == "succeeded"
    # Without retries (retry_for=0) a 5xx answer is final; see test_fake_outage for retries.
    gh.fail_next(Endpoint.AGENT_CONNECT, status=500)
    with pytest.raises(AgentError, match="500"):
        await run_agent(gh.generate_jit_config(scale_set_id, "r2"), timeout=5, retry_for=0)


def test_short_admin_token_ttl() -> None:
    with FakeGitHub(admin_token_ttl=0.15) as gh, raw_client(gh) as raw:
        assert raw.actions("GET", SCALE_SETS).status_code == 200
        time.sleep(0.2)
        assert raw.actions("GET", SCALE_SETS).status_code == 401


def test_short_queue_token_ttl() -> None:
    # Long enough for the first poll to come in time on a loaded machine.
    with FakeGitHub(long_poll_timeout=0.05, queue_token_ttl=0.5) as gh, raw_client(gh) as raw:
        session = raw.create_session(raw.create_scale_set())
        assert raw.poll(session).status_code == 202
        time.sleep(0.5)
        assert raw.poll(session).status_code == 401


def test_stop_is_prompt_with_polls_in_flight() -> None:
    gh = FakeGitHub(long_poll_timeout=30.0).start()
    outcomes: list[object] = []
    with raw_client(gh) as raw:
        scale_set_id = raw.create_scale_set()
        session = raw.create_session(scale_set_id)
        gh.delay_next(Endpoint.GET_SCALE_SET, 30.0)
        encoded = gh.generate_jit_config(scale_set_id, "waiting")

        def call(fn: object) -> None:
            try:
                outcomes.append(fn())  # type: ignore[operator]
            except (httpx.TransportError, AgentError) as error:
                outcomes.append(error)

        with httpx.Client(trust_env=False, timeout=60) as other:
            headers = {"Authorization": f"Bearer {session.token}"}
            workers = [
                threading.Thread(target=call, args=(lambda: raw.poll(session),)),
                threading.Thread(target=call, args=(lambda: raw.actions("GET", SCALE_SETS),)),
                threading.Thread(
                    target=call,
                    # retry_for=0: a stopped fake refuses connections, which would be retried.
                    args=(
                        lambda: asyncio.run(
                            run_agent(encoded, poll_timeout=30.0, timeout=60, retry_for=0)
                        ),
                    ),
                ),
                threading.Thread(
                    target=call, args=(lambda: other.get(session.queue_url, headers=headers),)
                ),
            ]
            for worker in workers:
                worker.start()
            gh.wait_for(lambda: len(_fake_threads()) >= 5, timeout=5)
            time.sleep(0.1)
            started = time.monotonic()
            gh.stop()
            assert time.monotonic() - started < 1.0
            for worker in workers:
                worker.join(5)
    gh.stop()  # idempotent
    assert len(outcomes) == 4
    assert all(isinstance(o, httpx.TransportError | AgentError) for o in outcomes), outcomes
    assert _fake_threads() == []


def test_idle_keep_alive_connections_are_closed_on_stop() -> None:
    with httpx.Client(trust_env=False) as http:
        with FakeGitHub() as gh:
            assert http.get(gh.url + "/nope").status_code == 404  # leaves a pooled connection
            assert _fake_threads()
        assert _fake_threads() == []
        with pytest.raises(httpx.TransportError):
            http.get(gh.url + "/nope")


@pytest.mark.anyio
async def test_async_context_manager() -> None:
    async with FakeGitHub() as gh, httpx.AsyncClient(trust_env=False) as http:
        response = await http.post(
            f"{gh.api_url}/orgs/octo-org/actions/runners/registration-token",
            headers={"Authorization": "Bearer t"},
        )
        assert response.status_code == 201
    assert _fake_threads() == []
