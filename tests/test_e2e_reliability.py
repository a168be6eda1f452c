"""Jobs survive everything (issue 9), end to end: examples/run.py as a subprocess, FakeGitHub on
127.0.0.1, real Docker containers running the busybox agent with host networking.

Each test puts 3 runners to work on 3 jobs and then does what would kill them in a naive runner
manager: a 45 s GitHub outage longer than the session's lifetime, a SIGTERM (the drain), a second
SIGTERM, a ``kill -9`` and a restart, a ``kill -9`` while a runner is being registered. The proof
that no busy runner was destroyed is that every job completes with ``succeeded`` on the runner
that took it: the fake agent inside the container reports the result only if its container ran
the whole job. Afterwards no container, registration or session is left.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from outrunner.journal import JOURNAL_FILE, Journal
from outrunner.testing import Endpoint, FakeGitHub
from outrunner.testing.fakegithub import JobState
from tests.support.run_script import RunScript, docker_farm, run_script

pytestmark = pytest.mark.docker

TOKEN = "ghp_e2eReliabilityToken_0a1b2c3d4e5f60718"
SCALE_SET = "e2e-reliable"
LABEL = "reliable"


def eventually(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    detail: Callable[[], str] = str,
) -> None:
    """Poll ``predicate`` (it may look at Docker, which the fake's wait_for cannot see);
    ``detail()`` (e.g. the script's output) goes into the error when it times out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}\n{detail()}")
        time.sleep(0.1)


def containers(engine: Any, *, running_only: bool = False) -> dict[str, str]:
    """Runner name -> container id of this scale set's containers."""
    found = engine.containers(
        all=not running_only, filters={"label": f"outrunner.scaleset={SCALE_SET}"}
    )
    return {c["Labels"]["outrunner.name"]: c["Id"] for c in found}


@contextmanager
def farm(
    engine: Any, runner_image: str, tmp_path: Path, **fake: Any
) -> Iterator[tuple[FakeGitHub, Path, dict[str, str]]]:
    """A FakeGitHub, a config for it and the environment run.py gets; on the way out, whatever
    a failed test left in Docker is removed (a passing test asserts there is nothing)."""
    env = {**os.environ, "GITHUB_TOKEN": TOKEN}
    try:
        with FakeGitHub(pat=TOKEN, long_poll_timeout=1.0, **fake) as gh:
            config = docker_farm(
                gh, tmp_path / "farm.yml", scale_set=SCALE_SET, label=LABEL, image=runner_image
            )
            yield gh, config, env
    finally:
        for container_id in containers(engine).values():
            engine.remove_container(container_id, force=True)


def start_busy(gh: FakeGitHub, durations: list[float]) -> list[int]:
    """Queue one job per duration once the script listens; return when all of them run."""
    gh.wait_for(lambda: len(gh.sessions()) == 1, timeout=60)
    jobs = [
        gh.queue_job([LABEL], duration=d, display_name=f"busy job {n}")
        for n, d in enumerate(durations)
    ]
    gh.wait_for(lambda: all(gh.job(j).state is JobState.RUNNING for j in jobs), timeout=60)
    return jobs


def runner_of(gh: FakeGitHub, jobs: list[int]) -> dict[int, str]:
    return {job: gh.job(job).runner_name or "" for job in jobs}


def assert_finished_where_they_started(
    gh: FakeGitHub, jobs: list[int], started_on: dict[int, str]
) -> None:
    for job in jobs:
        info = gh.job(job)
        assert info.state is JobState.COMPLETED, info
        assert info.result == "succeeded", info
        assert info.runner_name == started_on[job], info


def journaled(env: dict[str, str]) -> set[str]:
    """The runners the journal still holds (read once the script has exited)."""
    with Journal.open(env["OUTRUNNER_STATE_DIR"]) as journal:
        return {entry.name for entry in journal.entries()}


def assert_nothing_left(gh: FakeGitHub, engine: Any, output: str) -> None:
    assert containers(engine) == {}, output[-3000:]
    assert gh.runners() == [], output[-3000:]
    assert gh.sessions() == [], output[-3000:]
    assert TOKEN not in output


def stop(script: RunScript, timeout: float = 90) -> str:
    status, output = script.sigterm(timeout=timeout)
    assert status == 0, output[-3000:]
    assert "Shut down cleanly" in output
    return output


def test_a_45_second_outage_destroys_no_busy_runner(
    engine: Any, runner_image: str, tmp_path: Path
) -> None:
    """GitHub answers 503 to everything for 45 s, longer than the session lives (10 s idle).
    Two jobs finish during the outage, one after; each on the runner that took it. The
    session is replaced afterwards and a job queued then is served."""
    with farm(engine, runner_image, tmp_path, session_idle_timeout=10.0) as (gh, config, env):
        with run_script(config, env) as script:
            jobs = start_busy(gh, [15.0, 30.0, 60.0])
            started_on = runner_of(gh, jobs)
            # The agent (host network) can take its job before dockerd has marked its
            # container running: wait for dockerd's view (seen 1 run in 10 without the wait).
            eventually(
                lambda: set(containers(engine, running_only=True)) == set(started_on.values()),
                10,
                "the busy runners' containers to show as running",
            )
            before = containers(engine, running_only=True)
            first_session = gh.sessions()[0].session_id
            with gh.outage():
                time.sleep(45)
                # The two short jobs ended during the outage; their containers are gone even
                # though GitHub could not be told. The long one still runs, in its container.
                still = containers(engine, running_only=True)
                assert list(still) == [started_on[jobs[2]]], script.output()[-3000:]
                assert still[started_on[jobs[2]]] == before[started_on[jobs[2]]]
            gh.wait_until_jobs_completed(3, timeout=120)
            assert_finished_where_they_started(gh, jobs, started_on)
            # A new session serves new work.
            gh.wait_for(lambda: len(gh.sessions()) == 1, timeout=120)
            assert gh.sessions()[0].session_id != first_session
            after = gh.queue_job([LABEL], duration=0.5, display_name="after the outage")
            gh.wait_for(lambda: gh.job(after).state is JobState.COMPLETED, timeout=120)
            assert gh.job(after).result == "succeeded"
            gh.wait_for(lambda: gh.runners() == [], timeout=120)
            output = stop(script)
        assert "Listener failed, reconnecting; runners keep running" in output
        assert_nothing_left(gh, engine, output)


def test_sigterm_drains_busy_runners_and_registers_none(
    engine: Any, runner_image: str, tmp_path: Path
) -> None:
    """The first SIGTERM lets the 3 busy runners finish; no runner is registered after it and
    a job queued behind them is left for another runner manager; exit 0."""
    with farm(engine, runner_image, tmp_path) as (gh, config, env):
        with run_script(config, env) as script:
            jobs = start_busy(gh, [6.0, 8.0, 10.0])
            started_on = runner_of(gh, jobs)
            waiting = gh.queue_job([LABEL], duration=0.5, display_name="queued behind")
            registered_before = len(gh.requests_to(Endpoint.GENERATE_JIT))
            signalled = time.monotonic()
            script.signal(signal.SIGTERM)
            status, output = script.wait(timeout=120)
            took = time.monotonic() - signalled
        assert status == 0, output[-3000:]
        assert_finished_where_they_started(gh, jobs, started_on)
        assert gh.job(waiting).state is not JobState.COMPLETED
        assert gh.job(waiting).runner_name is None
        assert len(gh.requests_to(Endpoint.GENERATE_JIT)) == registered_before
        # The last job needed most of its 10 s: the drain waited for it.
        assert took >= 5.0, took
        assert "Draining" in output
        assert_nothing_left(gh, engine, output)


def test_a_second_sigterm_stops_busy_runners_now_and_the_journal_finishes_the_job(
    engine: Any, runner_image: str, tmp_path: Path
) -> None:
    """A second SIGTERM stops the busy runners at once. GitHub refuses to remove a runner whose
    job it still thinks runs (409), so those registrations stay in the journal; once GitHub has
    given up on the jobs, the next start removes them."""
    fake = {"remove_agent_on_completion": False}
    with farm(engine, runner_image, tmp_path, **fake) as (gh, config, env):
        with run_script(config, env) as script:
            jobs = start_busy(gh, [300.0, 300.0, 300.0])
            names = set(runner_of(gh, jobs).values())
            script.signal(signal.SIGTERM)
            time.sleep(1.0)
            signalled = time.monotonic()
            script.signal(signal.SIGTERM)
            status, output = script.wait(timeout=60)
            took = time.monotonic() - signalled
        assert status == 0, output[-3000:]
        assert took < 30, took
        assert "Second signal: stopping every runner now" in output
        assert containers(engine) == {}
        assert gh.sessions() == []
        assert {r.name for r in gh.runners()} == names  # 409 JobStillRunning, as GitHub does
        assert journaled(env) == names
        for job in jobs:  # GitHub notices the runners are lost and fails their jobs
            gh.cancel_job(job)
        with run_script(config, env) as script:
            gh.wait_for(lambda: gh.runners() == [] and len(gh.sessions()) == 1, timeout=60)
            output = stop(script)
        assert "Runner deregistered" in output
        assert_nothing_left(gh, engine, output)


def test_kill_9_with_busy_runners_then_restart_adopts_them(
    engine: Any, runner_image: str, tmp_path: Path
) -> None:
    """``kill -9`` while 3 jobs run: the containers keep running, the restarted outrunner adopts
    them (same containers, not destroyed as orphans) and removes each when its job ends."""
    with farm(engine, runner_image, tmp_path) as (gh, config, env):
        with run_script(config, env) as script:
            jobs = start_busy(gh, [12.0, 14.0, 16.0])
            started_on = runner_of(gh, jobs)
            eventually(
                lambda: set(containers(engine, running_only=True)) == set(started_on.values()),
                timeout=30,
                what="the 3 busy containers listed as running",
            )
            before = containers(engine, running_only=True)
            script.kill()
        assert containers(engine, running_only=True) == before
        with run_script(config, env) as script:
            eventually(
                lambda: script.output().count("Adopted runner") == 3,
                timeout=60,
                what="3 runners adopted",
                detail=lambda: script.output()[-6000:],
            )
            # Adopted, not recreated: the very containers that took the jobs.
            assert containers(engine, running_only=True) == before
            gh.wait_until_jobs_completed(3, timeout=120)
            assert_finished_where_they_started(gh, jobs, started_on)
            eventually(lambda: containers(engine) == {}, timeout=60, what="containers removed")
            gh.wait_for(lambda: gh.runners() == [], timeout=60)
            output = stop(script)
        assert "Removed orphan" not in output
        # The dead process's session never expires in this fake: the journal named it.
        assert "Deleted the message session of an earlier run" in output
        assert_nothing_left(gh, engine, output)


def test_kill_9_while_registering_leaves_no_registration(
    engine: Any, runner_image: str, tmp_path: Path
) -> None:
    """``kill -9`` while the JIT request is in flight: GitHub registers a runner the dead
    process never heard of. The journal named it before asking, so the next start finds it by
    name and removes it; the job is then served by a new runner."""
    with farm(engine, runner_image, tmp_path) as (gh, config, env):
        journal = Path(env["OUTRUNNER_STATE_DIR"]) / JOURNAL_FILE
        with run_script(config, env) as script:
            gh.wait_for(lambda: len(gh.sessions()) == 1, timeout=60)
            gh.delay_next(Endpoint.GENERATE_JIT, 3.0)
            job = gh.queue_job([LABEL], duration=0.5, display_name="after the crash")
            eventually(
                lambda: journal.exists() and "registering" in journal.read_text(),
                timeout=30,
                what="the runner journaled before its JIT request",
            )
            time.sleep(0.5)  # the JIT request reaches the fake and is held there
            script.kill()
        gh.wait_for(lambda: len(gh.runners()) == 1, timeout=30)
        leaked = gh.runners()[0].name
        assert containers(engine) == {}
        with run_script(config, env) as script:
            gh.wait_for(lambda: gh.job(job).state is JobState.COMPLETED, timeout=120)
            gh.wait_for(lambda: gh.runners() == [], timeout=60)
            output = stop(script)
        assert gh.job(job).result == "succeeded"
        assert gh.job(job).runner_name != leaked
        assert_nothing_left(gh, engine, output)
        assert journaled(env) == set()


def test_a_runner_that_exits_after_its_job_is_gone_within_2_s_without_any_message(
    engine: Any, runner_image: str, tmp_path: Path
) -> None:
    """The message queue is down, so no JobCompleted can arrive: the container's exit alone
    (Docker's event stream) gets it removed, within 2 s of the job's end."""
    with farm(engine, runner_image, tmp_path) as (gh, config, env):
        with run_script(config, env) as script:
            (job,) = start_busy(gh, [3.0])
            name = runner_of(gh, [job])[job]
            eventually(lambda: "Job started" in script.output(), timeout=10, what="JobStarted")
            with gh.outage(endpoints=[Endpoint.GET_MESSAGE, Endpoint.DELETE_MESSAGE]):
                gh.wait_for(lambda: gh.job(job).state is JobState.COMPLETED, timeout=30)
                finished = time.monotonic()
                eventually(lambda: name not in containers(engine), timeout=10, what="removal")
                took = time.monotonic() - finished
            assert took < 2.0, took
            assert "Stopping runner" in script.output(), script.output()[-6000:]
            assert 'reason="environment exited"' in script.output(), script.output()[-6000:]
            gh.wait_for(lambda: gh.runners() == [], timeout=60)
            output = stop(script)
        assert_nothing_left(gh, engine, output)
