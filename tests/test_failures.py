"""Errors are sorted (issue 10): what waiting fixes is retried forever; what it does not fix ends
the run at start-up, or stops only its own scale set after start-up."""

from __future__ import annotations

import asyncio
import logging

import pytest

from outrunner.config import Config, ConfigError
from outrunner.failures import Failure, classify
from outrunner.scaleset.errors import (
    InvalidConfigURLError,
    MessageQueueTokenExpiredError,
    NameLookupError,
    PermanentTransportError,
    ProtocolError,
    RetryExhaustedError,
    SessionConflictError,
    SessionExpiredError,
    StatusError,
    TLSVerificationError,
    TransportError,
)
from outrunner.service import Service
from outrunner.testing import FakeGitHub, InMemoryProvisioner
from outrunner.testing.fakegithub import JobState
from tests.test_service import TOKEN, agent, fast_client, runner

pytestmark = pytest.mark.anyio

API = "http://127.0.0.1:1/api/v3"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (TransportError("connection refused"), Failure.TRANSIENT),
        (RetryExhaustedError("giving up after 5 attempt(s)"), Failure.TRANSIENT),
        (TimeoutError(), Failure.TRANSIENT),
        (ConnectionResetError(), Failure.TRANSIENT),
        (SessionConflictError("409", status=409), Failure.TRANSIENT),
        (SessionExpiredError("400", status=400), Failure.TRANSIENT),
        (MessageQueueTokenExpiredError("401", status=401), Failure.TRANSIENT),
        (StatusError("502", status=502, url=f"{API}/x"), Failure.TRANSIENT),
        (StatusError("429", status=429, url=f"{API}/x"), Failure.TRANSIENT),
        (
            StatusError("401", status=401, url=f"{API}/orgs/o/actions/runners/registration-token"),
            Failure.PERMANENT,
        ),
        (
            StatusError("403", status=403, url=f"{API}/actions/runner-registration"),
            Failure.PERMANENT,
        ),
        (
            StatusError(
                "404", status=404, url=f"{API}/orgs/nope/actions/runners/registration-token"
            ),
            Failure.PERMANENT,
        ),
        (
            StatusError("401", status=401, url=f"{API}/app/installations/7/access_tokens?x=1"),
            Failure.PERMANENT,
        ),
        (NameLookupError('no runner group named "gpu"'), Failure.PERMANENT),
        (TLSVerificationError("certificate verify failed"), Failure.PERMANENT),
        (PermanentTransportError("unsupported scheme"), Failure.PERMANENT),
        (InvalidConfigURLError("not an org"), Failure.PERMANENT),
        (ConfigError("bad"), Failure.PERMANENT),
        # Neither known transient nor permanent: retried, with its traceback logged once.
        (StatusError("400", status=400, url=f"{API}/x"), Failure.UNKNOWN),
        (StatusError("403", status=403, url=f"{API}/_apis/runtime/x"), Failure.UNKNOWN),
        (ProtocolError("session statistics is nil"), Failure.UNKNOWN),
        (RuntimeError("a bug"), Failure.UNKNOWN),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_classify(error: BaseException, expected: Failure) -> None:
    assert classify(error) is expected


async def test_a_revoked_token_stops_its_scale_set_while_the_other_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two scale sets on two URLs; one token is revoked mid-run. That scale set lets its busy
    runner finish, then stops with the cause logged; the other goes on serving; run() raises
    (exit 1) only once both have stopped."""
    caplog.set_level(logging.ERROR, logger="outrunner")
    async with (
        FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as kept,
        FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as revoked,
    ):
        provisioners: dict[str, InMemoryProvisioner] = {}

        def factory(entry: object) -> InMemoryProvisioner:
            name = entry.name  # type: ignore[attr-defined]
            provisioners[name] = InMemoryProvisioner(workload=agent)
            return provisioners[name]

        config = Config(
            runners={
                "kept": runner("kept", url=kept.config_url()),
                "revoked": runner("revoked", url=revoked.config_url()),
            }
        )
        service = Service(
            config, token=TOKEN, provisioner_factory=factory, client_factory=fast_client
        )
        task = asyncio.create_task(service.run())
        async with asyncio.timeout(10):
            await service.wait_ready()
        busy = revoked.queue_job(["linux"], duration=2.0)
        await revoked.wait_for_async(lambda: revoked.job(busy).state is JobState.RUNNING)
        revoked.revoke_credentials()
        # The busy runner finishes its job; its scale set then stops.
        await revoked.wait_for_async(lambda: revoked.job(busy).result == "succeeded", timeout=20)
        async with asyncio.timeout(30):
            while not service.workers[1].status().draining:
                await asyncio.sleep(0.05)
        # The other scale set keeps serving.
        for n in range(3):
            kept.queue_job(["linux"], duration=0.1, display_name=f"kept {n}")
        await kept.wait_until_jobs_completed_async(3, timeout=30)
        assert not task.done()
        service.stop()
        with pytest.raises(StatusError) as raised:
            async with asyncio.timeout(30):
                await task
        assert raised.value.status == 401
        assert "Scale set stopped: an error that waiting will not fix" in caplog.messages
        assert "Scale set stopped; the others keep serving" in caplog.messages
        assert provisioners["kept"].environments == {}
        assert provisioners["revoked"].environments == {}
        assert kept.sessions() == []
