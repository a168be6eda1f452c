"""ScaleSetWorker and issue 9: runners outlive sessions, a restart adopts them, a drain lets them
finish. Against FakeGitHub over real HTTP on loopback, with in-memory environments running the
fake runner agent, and a dict-backed journal."""

from __future__ import annotations

import asyncio

import pytest

from outrunner.journal import JournalEntry, JournalPhase
from outrunner.provisioner import RunnerRequest
from outrunner.runner import RunnerPhase
from outrunner.testing import Endpoint, FakeGitHub, InMemoryProvisioner, JobState
from outrunner.worker import Backoff, ScaleSetWorker
from tests.test_scaler import eventually
from tests.test_scaler_reliability import FakeJournal, until
from tests.test_service import TOKEN, agent, fast_client, runner

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0.05, maximum=0.1)


async def agent_then_linger(request: RunnerRequest) -> None:
    """The runner agent in an environment that stays up after its job, so that only the
    JobCompleted message can end the runner."""
    await agent(request)
    await asyncio.Event().wait()


async def start_worker(worker: ScaleSetWorker) -> asyncio.Task[None]:
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(10):
        done, _ = await asyncio.wait(
            {task, asyncio.ensure_future(worker.ready.wait())},
            return_when=asyncio.FIRST_COMPLETED,
        )
    if task in done:
        task.result()
    return task


async def stop_worker(task: asyncio.Task[None]) -> None:
    task.cancel()
    async with asyncio.timeout(30):
        await asyncio.wait({task})


async def test_a_runner_running_a_job_outlives_a_failed_session() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        async with fast_client(gh.config_url(), TOKEN) as client:
            prov = InMemoryProvisioner(workload=agent_then_linger)
            journal = FakeJournal()
            worker = ScaleSetWorker(
                client,
                runner(),
                max_runners=2,
                provisioner=prov,
                owner="me",
                backoff=FAST,
                journal=journal,
            )
            task = await start_worker(worker)
            try:
                scaler = worker.scaler
                job = gh.queue_job(["linux"], duration=2.0)
                await gh.wait_for_async(lambda: scaler.busy_runners() == 1, timeout=10)
                (busy,) = scaler.runners()

                # The session disappears server-side mid-job: the listener fails, the worker
                # opens another one, and the runner is left alone.
                worker.ready.clear()
                gh.expire_sessions()
                gh.fail_next(Endpoint.GET_MESSAGE, status=404)
                async with asyncio.timeout(10):
                    await worker.ready.wait()
                assert len(gh.requests_to(Endpoint.CREATE_SESSION)) == 2
                assert worker.scaler is scaler
                assert scaler.runners() == [busy]
                assert busy.phase is RunnerPhase.RUNNING
                assert prov.stopped == []
                assert journal.phase(busy.name) is JournalPhase.RUNNING
                assert gh.job(job).state is JobState.RUNNING

                # The job completes on the same runner; the new session's JobCompleted reaches
                # the same Scaler, which ends the runner (its environment would linger).
                await gh.wait_until_jobs_completed_async(1, timeout=10)
                assert gh.job(job).runner_name == busy.name
                assert gh.job(job).result == "succeeded"
                await gh.wait_for_async(lambda: scaler.runners() == [], timeout=10)
                assert prov.stopped == [busy.name]
                await gh.wait_for_async(lambda: journal.held == {}, timeout=10)
            finally:
                await stop_worker(task)
        assert prov.environments == {}
        assert gh.runners() == []
        assert gh.sessions() == []


def entry(name: str, phase: JournalPhase, runner_id: int, scale_set: str = "linux") -> JournalEntry:
    return JournalEntry(
        scale_set=scale_set, name=name, runner_id=runner_id, backend="docker", phase=phase
    )


async def test_start_up_adopts_live_runners_and_cleans_up_the_rest() -> None:
    alive, gone, registering, orphan = (f"linux-0000000{c}" for c in "abcd")
    elsewhere = "windows-0000000e"
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        scale_set = gh.create_scale_set("linux", ["linux"])
        for name in (alive, gone, registering):
            gh.generate_jit_config(scale_set, name)
        ids = {r.name: r.id for r in gh.runners()}

        # What the process that crashed left behind: two live environments (one of them
        # unknown to the journal) and the journal.
        gate = asyncio.Event()
        earlier = InMemoryProvisioner(workload=until(gate), survive_close=True)
        for name in (alive, orphan):
            await earlier.start(RunnerRequest(name=name, jit_config="old", runner=runner()))
        await earlier.close()
        journal = FakeJournal(
            [
                entry(alive, JournalPhase.RUNNING, ids[alive]),
                entry(gone, JournalPhase.IDLE, ids[gone]),
                entry(registering, JournalPhase.REGISTERING, 0),
                entry(elsewhere, JournalPhase.RUNNING, 99, scale_set="windows"),
            ]
        )
        prov = InMemoryProvisioner(environments=earlier.environments)

        async with fast_client(gh.config_url(), TOKEN) as client:
            worker = ScaleSetWorker(
                client, runner(), max_runners=2, provisioner=prov, owner="me", journal=journal
            )
            task = await start_worker(worker)
            try:
                (adopted,) = worker.runners()
                assert (adopted.name, adopted.runner_id) == (alive, ids[alive])
                assert adopted.phase is RunnerPhase.RUNNING
                assert adopted.adopted
                assert prov.events == [
                    ("adopted", alive),
                    ("not-adopted", gone),
                    ("stop", gone),
                    ("cleanup", orphan),
                ]
                assert sorted(prov.environments) == [alive]

                await gh.wait_for_async(
                    lambda: {r.name for r in gh.runners()} == {alive}, timeout=10
                )
                deleted = [r.path.rsplit("/", 1)[1] for r in gh.requests_to(Endpoint.DELETE_RUNNER)]
                assert sorted(deleted) == sorted([str(ids[gone]), str(ids[registering])])
                lookups = [r.query["agentName"] for r in gh.requests_to(Endpoint.LIST_RUNNERS)]
                assert lookups == [registering]
                await gh.wait_for_async(
                    lambda: sorted(journal.held) == [alive, elsewhere], timeout=10
                )
                assert journal.phase(alive) is JournalPhase.RUNNING

                # The adopted runner is alive in every way: its environment ending ends it.
                gate.set()
                await gh.wait_for_async(lambda: worker.runners() == [], timeout=10)
                assert ("stop", alive) in prov.events
                await gh.wait_for_async(lambda: gh.runners() == [], timeout=10)
                await gh.wait_for_async(lambda: sorted(journal.held) == [elsewhere], timeout=10)
            finally:
                await stop_worker(task)
        # The other scale set's entry is not this worker's business.
        assert journal.held[elsewhere].phase is JournalPhase.RUNNING


async def test_drain_returns_once_the_busy_runner_has_finished() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        async with fast_client(gh.config_url(), TOKEN) as client:
            prov = InMemoryProvisioner(workload=agent)
            worker = ScaleSetWorker(
                client, runner(), max_runners=2, provisioner=prov, owner="me", journal=FakeJournal()
            )
            task = await start_worker(worker)
            try:
                job = gh.queue_job(["linux"], duration=2.0)
                await gh.wait_for_async(lambda: worker.scaler.busy_runners() == 1, timeout=10)
                (busy,) = worker.runners()
                worker.drain()
                assert worker.draining
                # The listener tells GitHub it takes no more jobs, while the job goes on.
                await gh.wait_for_async(
                    lambda: [s.max_capacity for s in gh.sessions()] == [0], timeout=5
                )
                assert not task.done()
                assert gh.job(job).state is JobState.RUNNING
                assert worker.runners() == [busy]
                async with asyncio.timeout(10):
                    await task  # run() returns by itself once the runner is gone
            finally:
                await stop_worker(task)
        assert gh.job(job).result == "succeeded"
        assert gh.job(job).runner_name == busy.name
        assert prov.stopped == [busy.name]
        assert prov.environments == {}
        assert gh.runners() == []
        assert gh.sessions() == []
        assert len(gh.requests_to(Endpoint.DELETE_SESSION)) == 1
        assert len(gh.requests_to(Endpoint.GENERATE_JIT)) == 1
        capacities = [
            r.headers["X-ScaleSetMaxCapacity"] for r in gh.requests_to(Endpoint.GET_MESSAGE)
        ]
        assert capacities[0] == "2"
        assert capacities[-1] == "0"
        # Once it said 0, it never said anything else again.
        assert set(capacities[capacities.index("0") :]) == {"0"}


async def test_start_up_deletes_the_session_a_crashed_run_left_open() -> None:
    """After ``kill -9`` the old session lives on at GitHub; the journal names it, so the new
    run deletes it and listens at once instead of meeting 409 conflicts until it expires."""
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        scale_set = gh.create_scale_set("linux", ["linux"])
        async with fast_client(gh.config_url(), TOKEN) as client:
            stale = await client.create_message_session(scale_set, "me")
            journal = FakeJournal()
            journal.open_sessions["linux"] = stale.session.session_id
            sleeps: list[float] = []

            async def no_sleep(delay: float) -> None:
                sleeps.append(delay)
                await asyncio.sleep(0)

            worker = ScaleSetWorker(
                client,
                runner(),
                max_runners=1,
                provisioner=InMemoryProvisioner(),
                owner="me",
                journal=journal,
                sleep=no_sleep,
            )
            task = asyncio.create_task(worker.run())
            async with asyncio.timeout(10):
                await worker.ready.wait()
            assert sleeps == []  # no 409 to wait out
            (session,) = gh.sessions()
            assert session.session_id != stale.session.session_id
            assert journal.open_sessions == {"linux": session.session_id}
            task.cancel()
            await asyncio.wait({task})
        assert gh.sessions() == []
        assert journal.open_sessions == {}


async def test_a_short_outage_resumes_the_same_session_instead_of_abandoning_it() -> None:
    """GitHub still has the session after a short outage: abandoning it would make GitHub
    refuse a new one (409) until it expired, so the worker refreshes and resumes it."""
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3) as gh:
        async with fast_client(gh.config_url(), TOKEN) as client:
            worker = ScaleSetWorker(
                client,
                runner(),
                max_runners=1,
                provisioner=InMemoryProvisioner(workload=agent),
                owner="me",
                backoff=Backoff(initial=0.2, maximum=0.4),
            )
            task = asyncio.create_task(worker.run())
            async with asyncio.timeout(10):
                await worker.ready.wait()
            (before,) = gh.sessions()
            with gh.outage():
                await eventually(lambda: not worker.session_open, timeout=10)
                await asyncio.sleep(0.5)
            await eventually(lambda: worker.session_open, timeout=10)
            (after,) = gh.sessions()
            assert after.session_id == before.session_id
            assert [r.status for r in gh.requests_to(Endpoint.CREATE_SESSION)] == [200]
            job = gh.queue_job(["linux"], duration=0.05)
            await gh.wait_for_async(lambda: gh.job(job).state is JobState.COMPLETED, timeout=10)
            task.cancel()
            await asyncio.wait({task})
        assert gh.sessions() == []


async def one_job_in_acquire_mode_despite(fail: Endpoint) -> FakeGitHub:
    """Run one job through a worker against FakeGitHub in acquire mode (older GHES: jobs are
    offered, and assigned once acquired) while every retry of one call to ``fail`` fails; the
    job must succeed and nothing be left. Returns the (stopped) fake, for its request log."""
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.3, acquire_mode=True) as gh:
        async with fast_client(gh.config_url(), TOKEN) as client:
            prov = InMemoryProvisioner(workload=agent)
            worker = ScaleSetWorker(
                client, runner(), max_runners=2, provisioner=prov, owner="me", backoff=FAST
            )
            task = await start_worker(worker)
            try:
                gh.fail_next(fail, times=5)  # every retry of one call
                job = gh.queue_job(["linux"], duration=0.1)
                await gh.wait_until_jobs_completed_async(1, timeout=15)
                assert gh.job(job).result == "succeeded"
                assert gh.pending_faults(fail) == 0
                await gh.wait_for_async(lambda: worker.scaler.runners() == [], timeout=10)
            finally:
                await stop_worker(task)
        assert prov.environments == {}
        assert gh.runners() == []
    return gh


async def test_a_message_whose_acknowledgement_failed_is_read_again_after_resuming() -> None:
    # The listener fails and the worker resumes the same session. The message was never
    # acknowledged: the resumed listener must poll from before it, or its offer is never
    # acquired and the job waits forever, holding a slot of the scale set's capacity.
    gh = await one_job_in_acquire_mode_despite(Endpoint.DELETE_MESSAGE)
    assert [r.status for r in gh.requests_to(Endpoint.CREATE_SESSION)] == [200]


async def test_jobs_offered_while_acquisition_fails_are_acquired_after_reconnecting() -> None:
    # The offer's message is acknowledged first, so when every attempt to acquire fails, the
    # worker must remember the offer: GitHub does not make it again.
    gh = await one_job_in_acquire_mode_despite(Endpoint.ACQUIRE_JOBS)
    assert len(gh.requests_to(Endpoint.ACQUIRE_JOBS)) == 6
