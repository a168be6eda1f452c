"""End to end: examples/run.py --listen 127.0.0.1:0 as a subprocess, FakeGitHub on 127.0.0.1,
real Docker containers running the busybox agent. /metrics is scraped over HTTP mid-run and at
the end: the completed-jobs counter equals the jobs run, and /readyz answers 200 while the
scale set listens."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from outrunner.testing import FakeGitHub
from tests.support.run_script import RunScript, docker_farm, run_script
from tests.support.scrape import base_url_from_log, parse, value, value_or_zero

pytestmark = pytest.mark.docker

TOKEN = "ghp_e2eMetricsToken_5a4b3c2d1e0f98765"
SCALE_SET = "e2e-metrics"
LABEL = "e2e-metrics"
JOBS = 6
_T = TypeVar("_T")


def eventually(probe: Callable[[], _T | None], timeout: float, what: str, script: RunScript) -> _T:
    """Call ``probe`` until it returns something other than None."""
    deadline = time.monotonic() + timeout
    while (found := probe()) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s:\n{script.output()[-3000:]}")
        time.sleep(0.1)
    return found


def test_metrics_count_the_jobs_run_in_containers_and_readyz_answers_200(
    engine: Any, runner_image: str, tmp_path: Path
) -> None:
    with FakeGitHub(pat=TOKEN, long_poll_timeout=1.0) as gh:
        config = docker_farm(
            gh, tmp_path / "farm.yml", scale_set=SCALE_SET, label=LABEL, image=runner_image
        )
        env = {**os.environ, "GITHUB_TOKEN": TOKEN}
        with run_script(config, env, args=["--listen", "127.0.0.1:0"]) as script:
            url = eventually(
                lambda: base_url_from_log(script.output()), 30, "Listening for HTTP", script
            )
            gh.wait_for(lambda: len(gh.sessions()) == 1, timeout=30)
            ready = httpx.get(f"{url}/readyz")

            for n in range(JOBS):
                gh.queue_job([LABEL], duration=2.0, display_name=f"e2e job {n}")

            def busy() -> dict[str, Any] | None:
                families = parse(httpx.get(f"{url}/metrics").text)
                running = value(families, "outrunner_runners", name=SCALE_SET, phase="running")
                return families if running >= 1 else None

            mid = eventually(busy, 60, "runner running a job", script)

            gh.wait_until_jobs_completed(JOBS, timeout=180)
            gh.wait_for(lambda: gh.runners() == [], timeout=60)

            def all_counted() -> dict[str, Any] | None:
                families = parse(httpx.get(f"{url}/metrics").text)
                done = value(families, "gha_completed_jobs_total", name=SCALE_SET)
                idle = value(families, "gha_desired_runners", name=SCALE_SET) == 0
                return families if done == JOBS and idle else None

            end = eventually(all_counted, 30, "every job counted", script)
            ready_at_end = httpx.get(f"{url}/readyz")
            status, output = script.sigterm()

    assert (ready.status_code, ready.text) == (200, "ready\n"), output[-3000:]
    assert (ready_at_end.status_code, ready_at_end.text) == (200, "ready\n")
    assert status == 0, output[-3000:]
    # Mid-run: a runner runs its job (its JobStarted counted), and not every job is done.
    assert value(mid, "gha_started_jobs_total", name=SCALE_SET) >= 1
    assert value_or_zero(mid, "gha_completed_jobs_total", name=SCALE_SET) < JOBS
    assert value(mid, "outrunner_session_open", name=SCALE_SET) == 1
    # At the end: every job counted, by result, and every container timed.
    assert value(end, "gha_completed_jobs_total", name=SCALE_SET, job_result="succeeded") == JOBS
    assert value(end, "gha_started_jobs_total", name=SCALE_SET) == JOBS
    assert value(end, "gha_job_execution_duration_seconds_count", name=SCALE_SET) == JOBS
    # Each job "ran" 2 s in its container.
    assert value(end, "gha_job_execution_duration_seconds_sum", name=SCALE_SET) >= JOBS * 1.9
    docker = {"name": SCALE_SET, "backend": "docker"}
    containers = value(end, "outrunner_runner_provisioning_duration_seconds_count", **docker)
    assert containers >= JOBS
    assert value(end, "outrunner_runner_stop_duration_seconds_count", **docker) == containers
    assert value(end, "outrunner_runner_start_failures_total", name=SCALE_SET) == 0
    assert value(end, "outrunner_runners", name=SCALE_SET) == 0
    assert value(end, "gha_max_runners", name=SCALE_SET) == 3
    assert value(end, "process_resident_memory_bytes") > 0
    assert TOKEN not in output
