"""The demo behind ``examples/run.py --demo``: the real Service against the embedded fake GitHub.

Nothing is mocked: a FakeGitHub serves the scale set protocol over HTTP on 127.0.0.1, the Service
creates the scale set, opens a message session and long-polls; jobs queued on the fake are
assigned, runners are registered with JIT configs, and each runner gets a fresh Docker container
(host networking, the tiny busybox runner image built offline) whose agent takes its job and
reports it; then every container is destroyed and its runner deregistered. The summary counts
what was left behind, which should be nothing.

Without a reachable Docker engine the demo says so and runs the same flow with in-memory
environments running the Python agent, so it still shows the protocol end to end.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from outrunner.config import Config, DockerImage, RunnerConfig
from outrunner.log import BoundLogger, get_logger, registered_secrets
from outrunner.provisioner import OrphanCleaner, Provisioner, RunnerRequest
from outrunner.service import Service
from outrunner.testing.agent import run_agent
from outrunner.testing.fakegithub import FakeGitHub
from outrunner.testing.memory import InMemoryProvisioner

__all__ = ["DemoSummary", "run_demo"]

DEMO_SCALE_SET = "demo"
DEMO_LABELS = ("self-hosted", "linux", "demo")


@dataclass(frozen=True)
class DemoSummary:
    jobs: int
    results: Counter[str]
    wall_time: float
    max_runners: int
    peak_environments: int
    leftover_environments: int
    leftover_runners: int
    leftover_sessions: int
    backend: str
    job_seconds: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.results.get("succeeded", 0) == self.jobs
            and self.leftover_environments == 0
            and self.leftover_runners == 0
            and self.leftover_sessions == 0
            and self.peak_environments <= self.max_runners
        )

    def render(self) -> str:
        results = ", ".join(f"{name}={count}" for name, count in sorted(self.results.items()))
        return "\n".join(
            [
                "Demo summary",
                f"  backend:             {self.backend}",
                f"  jobs:                {self.jobs} ({results or 'none finished'})",
                f"  wall time:           {self.wall_time:.2f} s",
                f"  peak environments:   {self.peak_environments} (max_runners {self.max_runners})",
                f"  leftover envs:       {self.leftover_environments}",
                f"  leftover runners:    {self.leftover_runners} registered at GitHub",
                f"  leftover sessions:   {self.leftover_sessions}",
                f"  verdict:             {'OK' if self.ok else 'FAILED'}",
            ]
        )


class _Tracked:
    """Wraps the demo's provisioner to count live environments and their peak."""

    def __init__(self, inner: Provisioner) -> None:
        self.inner = inner
        self.live: set[str] = set()
        self.peak = 0

    async def start(self, request: RunnerRequest) -> None:
        await self.inner.start(request)
        self.live.add(request.name)
        self.peak = max(self.peak, len(self.live))

    async def stop(self, name: str) -> None:
        await self.inner.stop(name)
        self.live.discard(name)

    async def cleanup(self, prefix: str) -> list[str]:
        if isinstance(self.inner, OrphanCleaner):
            return await self.inner.cleanup(prefix)
        return []

    async def close(self) -> None:
        await self.inner.close()


@dataclass(frozen=True)
class _Backend:
    name: str
    runner: RunnerConfig
    provisioner: _Tracked
    leftovers: Callable[[], Awaitable[int]]


async def _docker_backend(log: BoundLogger) -> _Backend | None:
    try:
        from outrunner.provisioners.docker import (
            LABEL_SCALE_SET,
            DockerProvisioner,
            default_client,
            resolve_engine,
        )
        from outrunner.testing.runner_image import ensure_runner_image
    except ImportError as exc:
        log.warning("Docker SDK not installed, using in-memory environments", error=str(exc))
        return None
    url = resolve_engine().url
    try:
        api = await asyncio.to_thread(default_client, url)
        await asyncio.to_thread(api.ping)
    except Exception as exc:
        log.warning("No Docker engine answers, using in-memory environments", error=str(exc))
        return None
    log.info("Preparing the runner image (built offline from the host's busybox)")
    image = await asyncio.to_thread(ensure_runner_image, api)
    runner = RunnerConfig(
        name=DEMO_SCALE_SET,
        labels=DEMO_LABELS,
        docker=DockerImage(image=image, network="host", pull="never"),
    )

    async def leftovers() -> int:
        try:
            found = await asyncio.to_thread(
                api.containers, all=True, filters={"label": f"{LABEL_SCALE_SET}={DEMO_SCALE_SET}"}
            )
            return len(found)
        finally:
            await asyncio.to_thread(api.close)

    provisioner = _Tracked(DockerProvisioner.for_runner(runner, logger=log.group("docker")))
    return _Backend(f"docker ({image}, host network)", runner, provisioner, leftovers)


def _memory_backend() -> _Backend:
    async def agent(request: RunnerRequest) -> object:
        return await run_agent(request.jit_config, poll_timeout=2.0)

    memory = InMemoryProvisioner(workload=agent)

    async def leftovers() -> int:
        return len(memory.environments)

    runner = RunnerConfig(
        name=DEMO_SCALE_SET,
        labels=DEMO_LABELS,
        docker=DockerImage(image="unused-in-memory:latest"),
    )
    return _Backend(
        "in-memory environments running the Python agent", runner, _Tracked(memory), leftovers
    )


async def run_demo(
    *,
    jobs: int = 6,
    max_runners: int = 3,
    job_duration: float = 0.5,
    timeout: float = 180.0,
    backend: Literal["auto", "docker", "memory"] = "auto",
    logger: BoundLogger | None = None,
) -> DemoSummary:
    """Run ``jobs`` jobs through a Service and a fake GitHub; return what happened.

    ``backend="auto"`` uses Docker when an engine answers, else in-memory environments;
    ``"docker"`` insists on Docker (raises when none answers).
    """
    log = logger or get_logger("outrunner.demo")
    token = f"demo_{secrets.token_hex(16)}"
    chosen = None if backend == "memory" else await _docker_backend(log)
    if chosen is None:
        if backend == "docker":
            raise RuntimeError("the demo was asked for Docker, but no Docker engine answers")
        chosen = _memory_backend()
    provisioner = chosen.provisioner
    with registered_secrets(token):
        async with FakeGitHub(pat=token, long_poll_timeout=2.0) as github:
            config = Config(
                url=github.config_url(),
                runners={DEMO_SCALE_SET: replace(chosen.runner, max_runners=max_runners)},
            )
            # The demo's runners live and die with the demo: no journal in the machine's state
            # directory for a fake GitHub that is gone after the run.
            service = Service(
                config,
                token=token,
                provisioner_factory=lambda runner: provisioner,
                shutdown_timeout=30.0,
                journal=False,
            )
            log.info("Demo starting", fake_github=github.url, jobs=jobs, max_runners=max_runners)
            began = time.monotonic()
            running = asyncio.create_task(service.run(), name="demo-service")
            try:
                async with asyncio.timeout(timeout):
                    await _first(service.wait_ready(), running)
                    for index in range(jobs):
                        github.queue_job(
                            DEMO_LABELS[1:2],
                            duration=job_duration,
                            display_name=f"demo job {index + 1}",
                        )
                    await _first(github.wait_until_jobs_completed_async(jobs, timeout), running)
            finally:
                service.stop()
                await running
            wall = time.monotonic() - began
            finished = [job for job in github.jobs() if job.result]
            return DemoSummary(
                jobs=jobs,
                results=Counter(job.result or "" for job in finished),
                wall_time=wall,
                max_runners=max_runners,
                peak_environments=provisioner.peak,
                leftover_environments=await chosen.leftovers(),
                leftover_runners=len(github.runners()),
                leftover_sessions=len(github.sessions()),
                backend=chosen.name,
            )


async def _first(awaitable: object, service: asyncio.Task[None]) -> None:
    """Await ``awaitable`` unless the service dies first, in which case raise its error."""
    waiter = asyncio.ensure_future(awaitable)  # type: ignore[call-overload]
    done, _ = await asyncio.wait({waiter, service}, return_when=asyncio.FIRST_COMPLETED)
    if waiter in done:
        waiter.result()
        return
    waiter.cancel()
    service.result()
    raise RuntimeError("the service stopped before the demo finished")
