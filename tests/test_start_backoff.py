"""Start backoff (issue 10): runners that fail to start are retried 1 s doubling to 5 min, one at
a time, with the demand remembered meanwhile; a success resets it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from outrunner.testing.memory import InMemoryProvisioner
from tests.test_scaler import FakeClient, eventually, make_scaler

pytestmark = pytest.mark.anyio


async def test_failed_starts_back_off_one_probe_at_a_time_and_a_success_resets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = FakeClient()
    prov = InMemoryProvisioner(start_error=RuntimeError("pull access denied for nope:latest"))
    caplog.set_level(logging.ERROR, logger="outrunner")
    s = make_scaler(client, prov, start_backoff_first=0.2, start_backoff_max=10.0)
    await s.handle_desired_runner_count(3)  # nothing known to fail yet: a burst of 3
    await eventually(lambda: s.runners() == [])
    backoff = s.start_backoff()
    assert backoff is not None
    assert backoff.failures == 3
    assert backoff.last_error == "pull access denied for nope:latest"
    # While backing off, demand signals start nothing ...
    for _ in range(5):
        await s.handle_desired_runner_count(3)
    assert len(client.jit_names) == 3
    # ... and once it ends, one probe (0.8 s at most after 3 failures at 0.2 s doubling).
    await eventually(lambda: len(client.jit_names) == 4, timeout=3)
    await asyncio.sleep(0.1)
    assert len(client.jit_names) == 4
    assert s.start_backoff() is not None
    assert s.start_backoff().failures == 4  # type: ignore[union-attr]
    # The image is fixed: the next probe succeeds, the backoff resets, and the remembered demand
    # of 3 is filled without another demand signal.
    prov.start_error = None
    await eventually(lambda: len(prov.environments) == 3, timeout=5)
    assert s.start_backoff() is None
    failures = [r for r in caplog.records if r.getMessage() == "Failed to start runner"]
    assert len(failures) == 4
    # Each failure names the runner, the backend's reason and the image it used.
    for record in failures:
        attrs = record.attrs  # type: ignore[attr-defined]
        assert attrs["image"] == "test:latest"
        assert attrs["error"] == "pull access denied for nope:latest"
        assert attrs["name"].startswith("test-")
    await s.shutdown()
    assert prov.environments == {}


async def test_the_backoff_doubles_up_to_its_cap() -> None:
    client = FakeClient()
    prov = InMemoryProvisioner(start_error=RuntimeError("no"))
    s = make_scaler(client, prov, start_backoff_first=0.05, start_backoff_max=0.2)
    loop = asyncio.get_running_loop()
    waits: list[float] = []
    await s.handle_desired_runner_count(1)
    for _ in range(6):
        await eventually(lambda: s.start_backoff() is not None and not s.runners(), timeout=3)
        failed_at, seen = loop.time(), len(client.jit_names)
        await eventually(lambda seen=seen: len(client.jit_names) > seen, timeout=3)
        waits.append(loop.time() - failed_at)
    # 0.05, 0.1, 0.2, then capped (jitter takes up to 20 % off, never adds).
    assert 0.03 <= waits[0] < 0.2
    assert all(w < 0.2 + 0.15 for w in waits)
    assert max(waits[3:]) >= 0.15
    await s.shutdown()


async def test_shutdown_cancels_a_pending_start_retry() -> None:
    client = FakeClient()
    prov = InMemoryProvisioner(start_error=RuntimeError("no"))
    s = make_scaler(client, prov, start_backoff_first=30.0)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: s.start_backoff() is not None)
    async with asyncio.timeout(2):
        await s.shutdown()
    assert len(client.jit_names) == 1


async def test_an_environment_that_ends_while_its_release_is_refused_ends_the_runner() -> None:
    """Draining while GitHub refuses the release (here: it keeps failing): the runner's
    environment ending must still end it, not wait for GitHub."""
    client = FakeClient()
    client.remove_error = RuntimeError("401 Unauthorized")
    prov = InMemoryProvisioner()
    s = make_scaler(client, prov, retry_first=0.05, retry_max=0.1)
    await s.handle_desired_runner_count(1)
    await eventually(lambda: [r.phase.value for r in s.runners()] == ["idle"])
    s.drain()
    await eventually(lambda: len(client.removed) >= 2)  # the release is being retried
    (name,) = prov.environments
    prov.environments[name].end()  # the runner process exits by itself
    await eventually(lambda: s.runners() == [], timeout=2)
    assert prov.environments == {}
    await s.shutdown(timeout=1)
