"""Service and ScaleSetWorker against FakeGitHub over real HTTP, with in-memory environments."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from outrunner.config import Config, ConfigError, DockerImage, RunnerConfig
from outrunner.log import SimpleHandler
from outrunner.provisioner import Provisioner, RunnerRequest
from outrunner.scaleset import Client, NameLookupError, PersonalAccessToken, RetryPolicy
from outrunner.scaleset.types import Label
from outrunner.service import YOUNG_GC_THRESHOLD, Service, serve
from outrunner.testing import Endpoint, FakeGitHub, InMemoryProvisioner, run_agent
from outrunner.worker import Backoff, ScaleSetWorker, labels_match

pytestmark = pytest.mark.anyio

TOKEN = "ghp_serviceTestToken_abcdefghijklmnop"


async def agent(request: RunnerRequest) -> object:
    return await run_agent(request.jit_config, poll_timeout=1.0, timeout=30)


def runner(name: str = "linux", labels: tuple[str, ...] = ("linux",), **kw: object) -> RunnerConfig:
    return RunnerConfig(
        name=name,
        labels=labels,
        docker=DockerImage(image="unused:latest"),
        **kw,  # type: ignore[arg-type]
    )


def fast_client(url: str, token: str) -> Client:
    return Client(url, PersonalAccessToken(token), retry=RetryPolicy(wait_min=0.01, wait_max=0.05))


@asynccontextmanager
async def running(service: Service) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10):
            done, _ = await asyncio.wait(
                {task, asyncio.ensure_future(service.wait_ready())},
                return_when=asyncio.FIRST_COMPLETED,
            )
        if task in done:
            task.result()
        yield task
    finally:
        service.stop()
        async with asyncio.timeout(30):
            await asyncio.wait({task})


def memory_factory(
    provisioners: dict[str, InMemoryProvisioner],
) -> Callable[[RunnerConfig], Provisioner]:
    def factory(entry: RunnerConfig) -> Provisioner:
        provisioners[entry.name] = InMemoryProvisioner(workload=agent)
        return provisioners[entry.name]

    return factory


async def test_jobs_run_and_nothing_is_left_after_stop() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh:
        provisioners: dict[str, InMemoryProvisioner] = {}
        config = Config(url=gh.config_url(), runners={"linux": runner(max_runners=2)})
        service = Service(
            config,
            token=TOKEN,
            provisioner_factory=memory_factory(provisioners),
            client_factory=fast_client,
            owner="test-host",
        )
        async with running(service) as task:
            for _ in range(4):
                gh.queue_job(["linux"], duration=0.05)
            await gh.wait_until_jobs_completed_async(4, timeout=30)
        assert task.done()
        assert task.exception() is None
        assert {job.result for job in gh.jobs()} == {"succeeded"}
        assert provisioners["linux"].max_concurrent <= 2
        assert provisioners["linux"].environments == {}
        assert provisioners["linux"].closed
        assert gh.runners() == []
        assert gh.sessions() == []
        # Scale sets are kept for the next start.
        assert [s.name for s in gh.scale_sets()] == ["linux"]
        created = gh.requests_to(Endpoint.CREATE_SCALE_SET)[0].json
        assert created["labels"] == [{"type": "User", "name": "linux"}]
        assert created["RunnerSetting"] == {"disableUpdate": True}
        assert gh.requests_to(Endpoint.CREATE_SESSION)[0].json["ownerName"] == "test-host"


async def test_existing_scale_set_is_reused_and_labels_updated_only_when_they_differ() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        same = gh.create_scale_set("same", ["linux", "x64"])
        differ = gh.create_scale_set("differ", ["old"])
        config = Config(
            url=gh.config_url(),
            runners={
                "same": runner("same", ("x64", "linux")),
                "differ": runner("differ", ("new",)),
            },
        )
        service = Service(
            config, token=TOKEN, provisioner_factory=memory_factory({}), client_factory=fast_client
        )
        async with running(service):
            pass
        assert gh.requests_to(Endpoint.CREATE_SCALE_SET) == []
        updates = gh.requests_to(Endpoint.UPDATE_SCALE_SET)
        assert [u.path.rsplit("/", 1)[1] for u in updates] == [str(differ)]
        assert updates[0].json["labels"] == [{"type": "User", "name": "new"}]
        # The whole object goes back, as gha-outrunner does.
        assert updates[0].json["name"] == "differ"
        assert updates[0].json["id"] == differ
        assert {s.id for s in gh.scale_sets()} == {same, differ}


async def test_runner_group_is_looked_up_by_name() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        group = gh.add_runner_group("farm")
        config = Config(url=gh.config_url(), runners={"linux": runner(runner_group="farm")})
        service = Service(
            config, token=TOKEN, provisioner_factory=memory_factory({}), client_factory=fast_client
        )
        async with running(service):
            pass
        assert gh.requests_to(Endpoint.GET_RUNNER_GROUP)[0].query["groupName"] == "farm"
        assert gh.requests_to(Endpoint.CREATE_SCALE_SET)[0].json["runnerGroupId"] == group


async def test_default_runner_group_is_id_1_without_a_lookup() -> None:
    # Both Go references do the same, so an organization that renamed its default group works.
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        config = Config(url=gh.config_url(), runners={"linux": runner(runner_group="default")})
        service = Service(
            config, token=TOKEN, provisioner_factory=memory_factory({}), client_factory=fast_client
        )
        async with running(service):
            pass
        assert gh.requests_to(Endpoint.GET_RUNNER_GROUP) == []
        assert gh.requests_to(Endpoint.GET_SCALE_SET)[0].query["runnerGroupId"] == "1"
        assert gh.requests_to(Endpoint.CREATE_SCALE_SET)[0].json["runnerGroupId"] == 1


async def test_missing_runner_group_is_a_clear_error_and_leaks_nothing() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        provisioners: dict[str, InMemoryProvisioner] = {}
        config = Config(url=gh.config_url(), runners={"linux": runner(runner_group="nope")})
        service = Service(
            config,
            token=TOKEN,
            provisioner_factory=memory_factory(provisioners),
            client_factory=fast_client,
        )
        with pytest.raises(NameLookupError, match='no runner group found with name "nope"') as err:
            await service.run()
        assert gh.config_url() in str(err.value)
        assert provisioners["linux"].closed
        assert gh.scale_sets() == []
        assert gh.sessions() == []


async def test_one_client_per_distinct_url_and_token(tmp_path: Path) -> None:
    other_token = str(tmp_path / "other-token")
    (tmp_path / "other-token").write_text("ghp_otherToken_0123456789abcdef\n")
    async with FakeGitHub(long_poll_timeout=0.3) as gh:
        made: list[tuple[str, str]] = []

        def counting_client(url: str, token: str) -> Client:
            made.append((url, token))
            return fast_client(url, token)

        config = Config(
            url=gh.config_url(),
            runners={
                "a": runner("a", ("a",)),
                "b": runner("b", ("b",)),
                "c": runner("c", ("c",), token_file=other_token),
            },
        )
        service = Service(
            config,
            token=TOKEN,
            provisioner_factory=memory_factory({}),
            client_factory=counting_client,
        )
        async with running(service):
            assert sorted(service.runners()) == ["a", "b", "c"]
        assert made == [
            (gh.config_url(), TOKEN),
            (gh.config_url(), "ghp_otherToken_0123456789abcdef"),
        ]


async def test_orphans_are_cleaned_before_listening() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        leftovers = InMemoryProvisioner()
        for name in ("linux-0123abcd", "linux-arm-0123abcd", "other-0123abcd"):
            await leftovers.start(RunnerRequest(name=name, jit_config="x", runner=runner()))
        config = Config(url=gh.config_url(), runners={"linux": runner()})
        service = Service(
            config,
            token=TOKEN,
            provisioner_factory=lambda entry: leftovers,
            client_factory=fast_client,
        )
        async with running(service):
            assert sorted(leftovers.environments) == ["linux-arm-0123abcd", "other-0123abcd"]
        assert ("cleanup", "linux-0123abcd") in leftovers.events


async def test_worker_reconnects_after_a_session_conflict_and_a_broken_session() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        scale_set = gh.create_scale_set("linux", ["linux"])
        async with fast_client(gh.config_url(), TOKEN) as client:
            squatter = await client.create_message_session(scale_set, "someone-else")
            sleeps: list[float] = []

            async def fake_sleep(delay: float) -> None:
                sleeps.append(delay)
                if len(sleeps) == 1:
                    await squatter.delete()  # the other listener goes away
                await asyncio.sleep(0)

            provisioner = InMemoryProvisioner(workload=agent)
            worker = ScaleSetWorker(
                client,
                runner(),
                max_runners=2,
                provisioner=provisioner,
                owner="me",
                backoff=Backoff(initial=1, maximum=4),
                sleep=fake_sleep,
            )
            task = asyncio.create_task(worker.run())
            async with asyncio.timeout(10):
                await worker.ready.wait()
            assert sleeps == [1.0]
            assert [s.owner_name for s in gh.sessions()] == ["me"]

            gh.queue_job(["linux"], duration=0.05)
            await gh.wait_until_jobs_completed_async(1, timeout=10)
            # The session disappears server-side: the listener fails, the worker opens another.
            worker.ready.clear()
            gh.expire_sessions()
            gh.fail_next(Endpoint.GET_MESSAGE, status=404)
            async with asyncio.timeout(10):
                await worker.ready.wait()
            assert sleeps == [1.0, 2.0]
            gh.queue_job(["linux"], duration=0.05)
            await gh.wait_until_jobs_completed_async(2, timeout=10)
            task.cancel()
            await asyncio.wait({task})
        # The worker stops its runners but leaves its provisioner open: whoever built it (the
        # Service) closes it.
        assert not provisioner.closed
        assert provisioner.environments == {}
        assert gh.sessions() == []
        assert gh.runners() == []


def test_labels_match_ignores_order_and_type() -> None:
    """Go: TestLabelsMatch."""
    a = (Label(name="linux", type="User"), Label(name="x64", type="User"))
    assert labels_match(a, tuple(reversed(a)))
    assert labels_match((Label(name="linux", type="System"),), (Label(name="linux", type="User"),))
    assert not labels_match(a, a[:1])
    assert not labels_match(a[:1], (Label(name="other"),))
    assert labels_match((), ())


async def test_token_never_reaches_the_log() -> None:
    stream = io.StringIO()
    handler = SimpleHandler(stream, logging.DEBUG)
    root = logging.getLogger("outrunner")
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
            config = Config(url=gh.config_url(), runners={"linux": runner()})
            service = Service(
                config,
                token=TOKEN,
                provisioner_factory=memory_factory({}),
                client_factory=fast_client,
            )
            async with running(service):
                gh.queue_job(["linux"], duration=0.05)
                await gh.wait_until_jobs_completed_async(1, timeout=10)
                # The fake counts the job completed once the runner says so; the service hears
                # of it in the next message. Stopping before that message would leave its line
                # out of the log (the runner's exit alone ends the runner).
                await gh.wait_for_async(lambda: "Job completed" in stream.getvalue(), timeout=10)
                # Even code that logs the token by mistake prints it masked.
                logging.getLogger("outrunner.test").warning("oops %s", TOKEN)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = stream.getvalue()
    assert "Listening for jobs" in text
    assert "Job completed" in text
    assert TOKEN not in text
    assert "oops ***" in text


async def test_serve_stops_cleanly_on_sigterm() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        config = Config(url=gh.config_url(), runners={"linux": runner()})
        service = Service(
            config, token=TOKEN, provisioner_factory=memory_factory({}), client_factory=fast_client
        )
        before = gc.get_threshold()
        serving = asyncio.create_task(serve(service))
        async with asyncio.timeout(10):
            await service.wait_ready()
        # While serving, the youngest generation is collected less often; then as before.
        assert gc.get_threshold()[0] == YOUNG_GC_THRESHOLD
        assert gc.get_threshold()[1:] == before[1:]
        os.kill(os.getpid(), signal.SIGTERM)
        async with asyncio.timeout(10):
            await serving
        assert gh.sessions() == []
    assert gc.get_threshold() == before


async def test_setup_waits_out_an_unreachable_github_instead_of_failing() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        # Every attempt of the first lookup fails (the client makes 5), then GitHub is back.
        gh.fail_next(Endpoint.GET_SCALE_SET, times=5, status=503)
        sleeps: list[float] = []

        async def fake_sleep(delay: float) -> None:
            sleeps.append(delay)

        async with fast_client(gh.config_url(), TOKEN) as client:
            provisioner = InMemoryProvisioner()
            worker = ScaleSetWorker(
                client,
                runner(),
                max_runners=1,
                provisioner=provisioner,
                owner="me",
                sleep=fake_sleep,
            )
            task = asyncio.create_task(worker.run())
            async with asyncio.timeout(10):
                await worker.ready.wait()
            assert sleeps == [1.0]
            assert [s.name for s in gh.scale_sets()] == ["linux"]
            task.cancel()
            await asyncio.wait({task})
        assert gh.sessions() == []


async def test_a_backend_that_cannot_be_built_fails_before_github_is_touched() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        built: list[InMemoryProvisioner] = []

        def factory(entry: RunnerConfig) -> Provisioner:
            if entry.name == "b":
                raise ConfigError("runners.b: the docker backend needs the 'docker' extra")
            built.append(InMemoryProvisioner())
            return built[-1]

        config = Config(
            url=gh.config_url(), runners={"a": runner("a", ("a",)), "b": runner("b", ("b",))}
        )
        service = Service(
            config, token=TOKEN, provisioner_factory=factory, client_factory=fast_client
        )
        with pytest.raises(ConfigError, match="needs the 'docker' extra"):
            await service.run()
        assert [p.closed for p in built] == [True]
        assert gh.requests == []


@pytest.mark.parametrize(("healthy_after", "expected"), [(3600.0, [1, 2, 4]), (0.0, [1, 1, 1])])
async def test_reconnect_backoff_restarts_after_a_healthy_session(
    healthy_after: float, expected: list[float]
) -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        gh.fail_next(Endpoint.CREATE_SESSION, times=10, status=400)
        sleeps: list[float] = []

        async def fake_sleep(delay: float) -> None:
            sleeps.append(delay)
            if len(sleeps) == 3:
                raise asyncio.CancelledError

        async with fast_client(gh.config_url(), TOKEN) as client:
            worker = ScaleSetWorker(
                client,
                runner(),
                max_runners=1,
                provisioner=InMemoryProvisioner(),
                owner="me",
                sleep=fake_sleep,
                healthy_after=healthy_after,
            )
            with pytest.raises(asyncio.CancelledError):
                await worker.run()
        assert sleeps == expected


# -- drain (issue 9): the first stop lets busy runners finish, the second stops them ----------


def drain_service(gh: FakeGitHub, **kw: object) -> tuple[Service, dict[str, InMemoryProvisioner]]:
    provisioners: dict[str, InMemoryProvisioner] = {}
    config = Config(url=gh.config_url(), runners={"linux": runner(max_runners=3)})
    service = Service(
        config,
        token=TOKEN,
        provisioner_factory=memory_factory(provisioners),
        client_factory=fast_client,
        **kw,  # type: ignore[arg-type]
    )
    return service, provisioners


async def busy(service: Service, gh: FakeGitHub, durations: list[float]) -> list[int]:
    """Queue the jobs; return once the Service knows every one of them runs (JobStarted)."""
    jobs = [gh.queue_job(["linux"], duration=d) for d in durations]
    async with asyncio.timeout(10):
        while service.state().busy_runners < len(jobs):
            await asyncio.sleep(0.02)
    return jobs


async def test_stop_drains_busy_runners_and_registers_no_new_one() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        service, provisioners = drain_service(gh)
        task = asyncio.create_task(service.run())
        async with asyncio.timeout(10):
            await service.wait_ready()
        jobs = await busy(service, gh, [1.0, 1.5, 2.0])
        behind = gh.queue_job(["linux"], duration=0.1)
        jit_requests = len(gh.requests_to(Endpoint.GENERATE_JIT))
        service.stop()
        await asyncio.sleep(0.1)
        state = service.state()
        assert state.stopping
        assert state.draining
        assert state.busy_runners == 3
        assert state.drain_deadline is not None
        async with asyncio.timeout(20):
            await task
        assert [gh.job(j).result for j in jobs] == ["succeeded"] * 3
        assert gh.job(behind).runner_name is None  # left for another runner manager
        assert len(gh.requests_to(Endpoint.GENERATE_JIT)) == jit_requests
        assert provisioners["linux"].environments == {}
        assert gh.runners() == []
        assert gh.sessions() == []
        # While draining, the listener told GitHub it takes no more jobs.
        polls = gh.requests_to(Endpoint.GET_MESSAGE)
        assert polls[-1].headers.get("X-ScaleSetMaxCapacity") == "0"


async def test_drain_releases_idle_runners_deregistering_them_before_stopping_them() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        provisioners: dict[str, InMemoryProvisioner] = {}

        def factory(entry: RunnerConfig) -> Provisioner:
            # No workload: the environment never connects, so its runner stays idle.
            provisioners[entry.name] = InMemoryProvisioner()
            return provisioners[entry.name]

        config = Config(url=gh.config_url(), runners={"linux": runner(max_runners=2)})
        service = Service(
            config, token=TOKEN, provisioner_factory=factory, client_factory=fast_client
        )
        task = asyncio.create_task(service.run())
        async with asyncio.timeout(10):
            await service.wait_ready()
        gh.queue_job(["linux"])
        gh.queue_job(["linux"])
        await gh.wait_for_async(lambda: len(provisioners["linux"].started) == 2, timeout=10)
        gh.clear_requests()
        service.stop()
        async with asyncio.timeout(10):
            await task
        assert service.state().busy_runners == 0
        deleted = {r.path.rsplit("/", 1)[-1] for r in gh.requests_to(Endpoint.DELETE_RUNNER)}
        assert len(deleted) == 2
        assert sorted(provisioners["linux"].stopped) == sorted(provisioners["linux"].started)
        assert gh.runners() == []
        assert gh.sessions() == []


async def test_a_second_stop_stops_busy_runners_at_once() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3, remove_agent_on_completion=True) as gh:
        service, provisioners = drain_service(gh)
        task = asyncio.create_task(service.run())
        async with asyncio.timeout(10):
            await service.wait_ready()
        await busy(service, gh, [60.0, 60.0])
        service.stop()
        await asyncio.sleep(0.2)
        assert service.state().draining
        service.stop()
        assert not service.state().draining
        async with asyncio.timeout(15):
            await task
        assert provisioners["linux"].environments == {}
        assert gh.sessions() == []


async def test_drain_timeout_stops_what_is_left() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        service, provisioners = drain_service(gh, drain_timeout=0.5)
        task = asyncio.create_task(service.run())
        async with asyncio.timeout(10):
            await service.wait_ready()
        await busy(service, gh, [60.0])
        loop = asyncio.get_running_loop()
        began = loop.time()
        service.stop()
        async with asyncio.timeout(15):
            await task
        assert 0.5 <= loop.time() - began < 10
        assert provisioners["linux"].environments == {}


async def test_drain_timeout_zero_is_an_immediate_stop() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        service, provisioners = drain_service(gh, drain_timeout=0)
        task = asyncio.create_task(service.run())
        async with asyncio.timeout(10):
            await service.wait_ready()
        await busy(service, gh, [60.0])
        service.stop()
        assert not service.state().draining
        async with asyncio.timeout(10):
            await task
        assert provisioners["linux"].environments == {}


async def test_serve_drains_on_the_first_signal_and_stops_on_the_second() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        service, provisioners = drain_service(gh)
        serving = asyncio.create_task(serve(service))
        async with asyncio.timeout(10):
            await service.wait_ready()
        await busy(service, gh, [60.0])
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert service.state().draining
        assert not serving.done()
        os.kill(os.getpid(), signal.SIGINT)
        async with asyncio.timeout(15):
            await serving
        assert provisioners["linux"].environments == {}
        assert gh.sessions() == []


def test_drain_timeout_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="--drain-timeout must be 0 or more, got -1"):
        Service(Config(runners={"linux": runner()}), drain_timeout=-1)


async def test_a_torn_and_corrupt_journal_is_reported_and_never_stops_the_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state_dir = Path(os.environ["OUTRUNNER_STATE_DIR"])
    (state_dir / "runners.journal").write_bytes(
        b"\x00\xffgarbage that is not JSON\n"
        b'{"v":1,"op":"put","scale_set":"linux","name":"linux-0a1b2c3d","runner_id":7,'
        b'"backend":"docker","phase":"deregistering","updated_at":1.0}\n'
        b'{"v":1,"op":"put","scale_set":"linux","name":"linux-torn'
    )
    caplog.set_level(logging.WARNING, logger="outrunner")
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        service, _ = drain_service(gh)
        async with running(service):
            gh.queue_job(["linux"], duration=0.05)
            await gh.wait_until_jobs_completed_async(1, timeout=10)
            # The readable entry is acted on: its registration is gone (404), so forgotten.
            assert service.journal is not None
            await gh.wait_for_async(lambda: service.journal.get("linux-0a1b2c3d") is None)
    # One warning each for the corrupt first line and the torn last one.
    assert caplog.messages.count("Ignored part of the runner journal") == 2, caplog.messages
    assert gh.jobs()[0].result == "succeeded"


async def test_an_outage_longer_than_the_session_destroys_no_busy_runner() -> None:
    """Every request answers 503 for longer than the session lives: the busy runners finish
    their jobs on the runners that took them, a new session serves the jobs queued after, and
    nothing is left."""
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3, session_idle_timeout=1.0) as gh:
        service, provisioners = drain_service(gh)
        task = asyncio.create_task(service.run())
        async with asyncio.timeout(10):
            await service.wait_ready()
        jobs = await busy(service, gh, [3.0, 4.0])
        started_on = {job: gh.job(job).runner_name for job in jobs}
        (first,) = gh.sessions()
        with gh.outage():
            await asyncio.sleep(2.5)
            assert gh.sessions() == []  # expired: nobody could poll
            # Nothing was stopped: both environments still run their jobs.
            assert sorted(provisioners["linux"].environments) == sorted(started_on.values())
        await gh.wait_until_jobs_completed_async(2, timeout=30)
        assert {job: gh.job(job).runner_name for job in jobs} == started_on
        assert [gh.job(job).result for job in jobs] == ["succeeded"] * 2
        await gh.wait_for_async(lambda: len(gh.sessions()) == 1, timeout=30)
        assert gh.sessions()[0].session_id != first.session_id
        after = gh.queue_job(["linux"], duration=0.1)
        await gh.wait_for_async(lambda: gh.job(after).result == "succeeded", timeout=30)
        await gh.wait_for_async(lambda: gh.runners() == [], timeout=30)
        service.stop()
        async with asyncio.timeout(20):
            await task
        assert provisioners["linux"].environments == {}
        assert gh.sessions() == []
