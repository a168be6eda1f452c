"""Service.reload: a new config applied to a running Service (SIGHUP in the command) while jobs
run, against FakeGitHub over real HTTP with in-memory environments running the agent.

The rule under test: a reload never stops a runner that is running a job. Removed and
restarted scale sets are drained (their busy runners finish), added ones start at once, and
changes that a running scale set can take are applied in place.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from outrunner.config import Config, ConfigError
from outrunner.runner import RunnerPhase
from outrunner.service import ReloadResult, Service
from outrunner.testing import FakeGitHub, InMemoryProvisioner
from tests.test_service import TOKEN, fast_client, memory_factory, runner, running

pytestmark = pytest.mark.anyio


async def eventually(predicate: object, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


def labels_of(gh: FakeGitHub, name: str) -> tuple[str, ...]:
    return next(s.labels for s in gh.scale_sets() if s.name == name)


def service_for(config: Config, provisioners: dict[str, InMemoryProvisioner]) -> Service:
    return Service(
        config,
        token=TOKEN,
        provisioner_factory=memory_factory(provisioners),
        client_factory=fast_client,
        journal=False,
        shutdown_timeout=10,
    )


async def test_adding_removing_and_changing_scale_sets_while_jobs_run() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh:
        provisioners: dict[str, InMemoryProvisioner] = {}
        old = Config(
            url=gh.config_url(),
            runners={
                "keep": runner("keep", ("keep",), max_runners=2),
                "gone": runner("gone", ("gone",), max_runners=2),
            },
        )
        service = service_for(old, provisioners)
        async with running(service):
            # A long job on each scale set, running when the reload comes.
            gh.queue_job(["keep"], duration=2.0, display_name="keep job")
            gh.queue_job(["gone"], duration=2.0, display_name="gone job")
            await eventually(lambda: len([j for j in gh.jobs() if j.runner_name]) == 2)
            new = Config(
                url=gh.config_url(),
                runners={
                    "keep": runner("keep", ("keep", "x64"), max_runners=3, min_runners=1),
                    "new": runner("new", ("new",), max_runners=1),
                },
            )
            result = await service.reload(new)
            assert result == ReloadResult(added=("new",), removed=("gone",), changed=("keep",))

            # "gone" drains: its busy job finishes, no further job is taken, then it stops.
            gone = next(w for w in service.workers if w.name == "gone")
            assert gone.draining
            gh.queue_job(["gone"], duration=0.1, display_name="late gone job")
            # "new" serves at once; "keep" took its new settings without a restart.
            gh.queue_job(["new"], duration=0.1, display_name="new job")
            keep = next(w for w in service.workers if w.name == "keep")
            assert (keep.scaler.max_runners, keep.scaler.min_runners) == (3, 1)
            await eventually(lambda: [w.name for w in service.workers] == ["keep", "new"])
            await gh.wait_until_jobs_completed_async(3, timeout=30)
            # By name: "keep" and "gone" start together, either may be created first.
            await eventually(lambda: sorted(labels_of(gh, "keep")) == ["keep", "x64"])
            # The warm pool of the reloaded entry: one idle runner waits.
            await eventually(lambda: [r.phase for r in keep.runners()] == [RunnerPhase.IDLE])

            by_name = {job.display_name: job for job in gh.jobs()}
            assert by_name["keep job"].result == "succeeded"
            assert by_name["gone job"].result == "succeeded"
            assert by_name["new job"].result == "succeeded"
            assert by_name["late gone job"].result is None  # never taken: gone was draining
            # (A runner stopped during its job would not have reported "succeeded".)
            assert gone.scaler.scale_set_id not in {s.scale_set_id for s in gh.sessions()}
        assert gh.runners() == []


async def test_a_restarted_scale_set_waits_for_its_busy_runner() -> None:
    """A new runner group cannot be applied in place: the scale set drains (its job finishes)
    and then starts again with the new settings."""
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh:
        gh.add_runner_group("builders")
        provisioners: dict[str, InMemoryProvisioner] = {}
        config = Config(url=gh.config_url(), runners={"linux": runner(max_runners=2)})
        service = service_for(config, provisioners)
        async with running(service):
            gh.queue_job(["linux"], duration=1.5, display_name="long")
            await eventually(lambda: any(j.runner_name for j in gh.jobs()))
            moved = dataclasses.replace(config.runners["linux"], runner_group="builders")
            result = await service.reload(Config(url=gh.config_url(), runners={"linux": moved}))
            assert result.restarted == ("linux",)
            (draining,) = service.workers
            assert draining.draining
            await gh.wait_until_jobs_completed_async(1, timeout=30)
            await eventually(
                lambda: len(service.workers) == 1 and service.workers[0] is not draining
            )
            await service.wait_ready()
            gh.queue_job(["linux"], duration=0.1, display_name="after")
            await gh.wait_until_jobs_completed_async(2, timeout=30)
            assert {j.display_name: j.result for j in gh.jobs()} == {
                "long": "succeeded",
                "after": "succeeded",
            }


async def test_an_unusable_config_changes_nothing(tmp_path: Path) -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh:
        config = Config(url=gh.config_url(), runners={"linux": runner(max_runners=2)})
        service = service_for(config, {})
        async with running(service):
            missing = dataclasses.replace(
                config.runners["linux"], token_file=str(tmp_path / "no-such-token")
            )
            broken = Config(url=gh.config_url(), runners={"linux": missing, "x": runner("x")})
            with pytest.raises(ConfigError, match="no-such-token"):
                await service.reload(broken)
            (worker,) = service.workers
            assert worker.runner == config.runners["linux"]
            assert not worker.draining
            gh.queue_job(["linux"], duration=0.1)
            await gh.wait_until_jobs_completed_async(1, timeout=30)


async def test_reload_needs_a_running_service() -> None:
    service = Service(Config(url="https://github.com/o", runners={"a": runner("a")}), token="t")
    with pytest.raises(RuntimeError, match="not running"):
        await service.reload(Config(url="https://github.com/o", runners={"a": runner("a")}))


async def test_a_scale_set_a_reload_adds_that_github_refuses_fails_alone() -> None:
    """Unlike a config mistake at start-up, which ends the run, a bad entry added by a reload
    (an unknown runner group here) stops only itself; the farm keeps serving."""
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh:
        config = Config(url=gh.config_url(), runners={"linux": runner(max_runners=2)})
        service = service_for(config, {})
        async with running(service) as task:
            bad = runner("bad", ("bad",), runner_group="no-such-group")
            await service.reload(
                Config(url=gh.config_url(), runners={**config.runners, "bad": bad})
            )
            await eventually(lambda: not service.stopping and len(service.workers) == 2)
            bad_worker = next(w for w in service.workers if w.name == "bad")
            await eventually(lambda: not bad_worker.ready.is_set() and _ended(service, "bad"))
            assert not service.stopping
            gh.queue_job(["linux"], duration=0.1)
            await gh.wait_until_jobs_completed_async(1, timeout=30)
        # Once stopped, the run reports the failure (exit 1 in the command).
        assert "no-such-group" in str(task.exception())


def _ended(service: Service, name: str) -> bool:
    entry = service._running.get(name)
    return entry is not None and entry.task.done()
