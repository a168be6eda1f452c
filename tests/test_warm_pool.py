"""The warm pool under a stream of jobs: a Service against FakeGitHub over real HTTP, in-memory
environments running the agent. ``min_runners`` idle runners wait before the first job, the pool
is refilled as runners take jobs, and it never exceeds ``max_runners``."""

from __future__ import annotations

import asyncio

import pytest

from outrunner.config import Config
from outrunner.runner import RunnerPhase
from outrunner.service import Service
from outrunner.testing import FakeGitHub, InMemoryProvisioner
from tests.test_service import TOKEN, fast_client, memory_factory, runner, running

pytestmark = pytest.mark.anyio


def idle(service: Service) -> int:
    return sum(r.phase is RunnerPhase.IDLE for r in service.workers[0].runners())


async def eventually(predicate: object, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_pool_waits_before_jobs_is_refilled_and_stays_within_max() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh:
        provisioners: dict[str, InMemoryProvisioner] = {}
        config = Config(
            url=gh.config_url(), runners={"linux": runner(max_runners=4, min_runners=2)}
        )
        service = Service(
            config,
            token=TOKEN,
            provisioner_factory=memory_factory(provisioners),
            client_factory=fast_client,
            journal=False,
        )
        async with running(service):
            # Before any job: exactly the pool, idle.
            await eventually(lambda: idle(service) == 2)
            assert len(gh.runners()) == 2
            # A job takes a waiting runner: its environment already exists, so no new one is
            # started for it (the pool is refilled behind it).
            started_before = len(provisioners["linux"].events)
            gh.queue_job(["linux"], duration=1.0, display_name="first")
            await eventually(lambda: any(job.runner_name for job in gh.jobs()))
            first = gh.jobs()[0]
            pool_names = {e[1] for e in provisioners["linux"].events[:started_before]}
            assert first.runner_name in pool_names
            await eventually(lambda: idle(service) == 2)  # refilled: 1 busy + 2 idle
            # A stream of jobs: never more than max_runners environments.
            for n in range(8):
                gh.queue_job(["linux"], duration=0.3, display_name=f"stream {n}")
                await asyncio.sleep(0.1)
            await gh.wait_until_jobs_completed_async(9, timeout=60)
            assert {job.result for job in gh.jobs()} == {"succeeded"}
            assert provisioners["linux"].max_concurrent <= 4
            # Afterwards the pool is back: two idle runners, nothing else.
            await eventually(
                lambda: [r.phase for r in service.workers[0].runners()] == [RunnerPhase.IDLE] * 2
            )
        assert gh.runners() == []
