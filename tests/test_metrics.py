"""Metrics: values after known sequences of jobs, scraped over HTTP from a real Service driving
FakeGitHub and in-memory environments that run the fake agent; and the recorder alone."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from outrunner.metrics import Metrics, MetricsUnavailable, ScaleSetMetrics
from outrunner.runner import RunnerPhase, RunnerSnapshot
from outrunner.scaler import StartBackoff
from outrunner.scaleset.types import JobCompleted, JobStarted, RunnerScaleSetStatistic
from outrunner.testing import FakeGitHub, InMemoryProvisioner
from tests.support.scrape import agent, scrape, serving, value

pytestmark = pytest.mark.anyio

TOKEN = "ghp_metricsTestToken_0123456789abcdef"
OWNER = "octo-org"  # FakeGitHub's default organization


async def test_six_jobs_are_counted_and_every_gauge_returns_to_zero() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh:
        provisioner = InMemoryProvisioner(workload=agent)
        before = time.time()
        async with serving(gh, TOKEN, provisioner=provisioner) as (service, client):
            for _ in range(5):
                gh.queue_job(["linux"], duration=0.1, display_name="build")
            gh.queue_job(
                ["linux"], duration=0.1, result="failed", display_name="lint", event_name="pr"
            )
            await gh.wait_until_jobs_completed_async(6, timeout=30)
            await gh.wait_for_async(
                lambda: gh.runners() == [] and service.runners() == {"linux": []}, timeout=30
            )
            response = await client.get("/metrics")
            assert response.headers["content-type"] == CONTENT_TYPE_LATEST
            # GitHub's statistics come with its messages, the desired count with the next poll
            # (the last job's runner was still stopping at the last message): wait for both.
            async with asyncio.timeout(10):
                while True:
                    families = await scrape(client)
                    if (
                        value(families, "gha_registered_runners", name="linux")
                        == value(families, "gha_desired_runners", name="linux")
                        == 0
                    ):
                        break
                    await asyncio.sleep(0.1)
        after = time.time()

    job = {"name": "linux", "organization": OWNER, "repository": "repo"}
    assert value(families, "gha_started_jobs_total", **job) == 6
    assert value(families, "gha_started_jobs_total", job_name="build", event_name="push") == 5
    assert value(families, "gha_completed_jobs_total", job_result="succeeded", **job) == 5
    assert value(families, "gha_completed_jobs_total", job_result="failed", job_name="lint") == 1
    assert value(families, "gha_job_startup_duration_seconds_count", **job) == 6
    assert value(families, "gha_job_execution_duration_seconds_count", job_result="succeeded") == 5
    # Each job "ran" 0.1 s on its runner (the timestamps have millisecond precision).
    assert value(families, "gha_job_execution_duration_seconds_sum", **job) >= 6 * 0.099
    # Every environment that started was timed, and stopped and timed again.
    started = len(provisioner.started)
    assert started >= 6
    runner = {"name": "linux", "backend": "docker"}
    assert value(families, "outrunner_runner_provisioning_duration_seconds_count", **runner) == (
        started
    )
    assert value(families, "outrunner_runner_stop_duration_seconds_count", **runner) == started
    assert value(families, "outrunner_runner_start_failures_total", **runner) == 0
    scale_set = {"name": "linux", "organization": OWNER}
    for gauge in (
        "gha_assigned_jobs",
        "gha_running_jobs",
        "gha_registered_runners",
        "gha_busy_runners",
        "gha_idle_runners",
        "gha_available_jobs",
        "gha_acquired_jobs",
        "gha_desired_runners",
        "gha_min_runners",
    ):
        assert value(families, gauge, **scale_set) == 0, gauge
    assert value(families, "gha_max_runners", **scale_set) == 2
    for phase in RunnerPhase:
        assert value(families, "outrunner_runners", name="linux", phase=str(phase)) == 0
    assert value(families, "outrunner_session_open", name="linux") == 1
    assert value(families, "outrunner_session_reconnects_total", name="linux") == 0
    assert before <= value(families, "outrunner_last_successful_poll_timestamp_seconds") <= after
    # The text format has no place for *_created: they would be one extra series each.
    assert not any(s.name.endswith("_created") for f in families.values() for s in f.samples)


async def test_failed_starts_are_counted_as_the_start_backoff_counts_them() -> None:
    async with FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh:
        provisioner = InMemoryProvisioner(start_error=RuntimeError("no capacity left"))
        async with serving(gh, TOKEN, provisioner=provisioner) as (service, client):
            gh.queue_job(["linux"])
            worker = service.workers[0]
            # The second failure comes after the first backoff (1 s).
            await gh.wait_for_async(
                lambda: (worker.scaler.start_backoff() or _NO_BACKOFF).failures >= 2, timeout=10
            )
            families = await scrape(client)
            backoff = worker.scaler.start_backoff()
            status = (await client.get("/status")).json()
        assert backoff is not None
        failures = value(families, "outrunner_runner_start_failures_total", backend="docker")
        # A failure may land between the two reads, not more.
        assert failures in (backoff.failures, backoff.failures - 1)
        assert failures >= 2
        assert value(families, "outrunner_runner_provisioning_duration_seconds_count") == 0
        shown = status["scale_sets"][0]["backoff"]
        assert shown["failures"] >= failures
        assert shown["last_error"] == "no capacity left"


_NO_BACKOFF = StartBackoff(failures=0, last_error="", retry_at=datetime.now(UTC))


async def test_session_reconnects_are_counted_resumed_or_new() -> None:
    async with (
        FakeGitHub(pat=TOKEN, long_poll_timeout=0.5) as gh,
        serving(gh, TOKEN) as (service, client),
    ):
        worker = service.workers[0]
        # GitHub unreachable for a moment: the same session is resumed afterwards.
        with gh.outage():
            await gh.wait_for_async(lambda: not worker.session_open, timeout=10)
        await gh.wait_for_async(lambda: worker.session_open, timeout=10)
        # GitHub dropped the session: a new one is opened.
        gh.expire_sessions()
        await gh.wait_for_async(lambda: not worker.session_open, timeout=10)
        await gh.wait_for_async(lambda: worker.session_open, timeout=10)
        families = await scrape(client)
    reconnects = "outrunner_session_reconnects_total"
    assert value(families, reconnects, name="linux", session="resumed") == 1
    assert value(families, reconnects, name="linux", session="new") == 1
    assert value(families, "outrunner_session_open", name="linux") == 1


# -- the recorder alone ------------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def snapshot(
    name: str, phase: RunnerPhase, *, started: float | None = None, adopted: bool = False
) -> RunnerSnapshot:
    return RunnerSnapshot(
        name=name,
        runner_id=1,
        phase=phase,
        created_at=T0,
        started_at=None if started is None else T0 + timedelta(seconds=started),
        adopted=adopted,
    )


@dataclass
class FakeScaler:
    max_runners: int = 4
    min_runners: int = 1
    failures: int = 0

    def start_backoff(self) -> StartBackoff | None:
        if not self.failures:
            return None
        return StartBackoff(failures=self.failures, last_error="boom", retry_at=T0)


def sample(metrics: Metrics, metric: str, /, **labels: str) -> float | None:
    assert metrics.registry is not None
    return metrics.registry.get_sample_value(metric, labels)


def test_runner_phases_give_provisioning_and_stop_durations_and_start_failures() -> None:
    metrics = Metrics()
    recorder = metrics.scale_set("linux", backend="libvirt")
    scaler = FakeScaler()
    recorder.follow(scaler)
    labels = {"name": "linux", "backend": "libvirt"}

    recorder.on_phase_change("a", snapshot("a", RunnerPhase.PROVISIONING))
    recorder.on_phase_change("a", snapshot("a", RunnerPhase.IDLE, started=42.0))
    recorder.on_phase_change("a", snapshot("a", RunnerPhase.RUNNING, started=42.0))
    recorder.on_phase_change("a", snapshot("a", RunnerPhase.STOPPING, started=42.0))
    recorder.on_phase_change("a", None)
    provisioning = "outrunner_runner_provisioning_duration_seconds"
    assert sample(metrics, f"{provisioning}_count", **labels) == 1
    assert sample(metrics, f"{provisioning}_sum", **labels) == 42.0
    assert sample(metrics, f"{provisioning}_bucket", le="50.0", **labels) == 1
    assert sample(metrics, f"{provisioning}_bucket", le="40.0", **labels) == 0
    assert sample(metrics, "outrunner_runner_stop_duration_seconds_count", **labels) == 1

    # An adopted runner was started by an earlier process: its start is not timed here.
    recorder.on_phase_change("b", snapshot("b", RunnerPhase.IDLE, started=1.0, adopted=True))
    assert sample(metrics, f"{provisioning}_count", **labels) == 1

    # Two starts fail (each is forgotten as it fails), one works, then one fails again.
    failures = "outrunner_runner_start_failures_total"
    for name in ("c", "d"):
        recorder.on_phase_change(name, snapshot(name, RunnerPhase.PROVISIONING))
        scaler.failures += 1
        recorder.on_phase_change(name, None)
    assert sample(metrics, failures, **labels) == 2
    recorder.on_phase_change("e", snapshot("e", RunnerPhase.PROVISIONING))
    scaler.failures = 0
    recorder.on_phase_change("e", snapshot("e", RunnerPhase.IDLE, started=1.0))
    recorder.on_phase_change("f", snapshot("f", RunnerPhase.PROVISIONING))
    scaler.failures = 1
    recorder.on_phase_change("f", None)
    assert sample(metrics, failures, **labels) == 3

    # The limits are read at scrape time, so a changed one shows at once.
    scale_set = {"name": "linux", "enterprise": "", "organization": "", "repository": ""}
    assert sample(metrics, "gha_max_runners", **scale_set) == 4
    scaler.max_runners = 7
    assert sample(metrics, "gha_max_runners", **scale_set) == 7
    assert sample(metrics, "gha_min_runners", **scale_set) == 1


def job_started(runner: str, **times: datetime | None) -> JobStarted:
    return JobStarted(
        runner_name=runner,
        runner_request_id=9,
        owner_name="octo",
        repository_name="hello",
        job_display_name="test",
        workflow_run_id=77,
        event_name="push",
        **times,  # type: ignore[arg-type]
    )


def job_completed(runner: str, result: str, **times: datetime | None) -> JobCompleted:
    return JobCompleted(
        runner_name=runner,
        result=result,
        owner_name="octo",
        repository_name="hello",
        job_display_name="test",
        event_name="push",
        **times,  # type: ignore[arg-type]
    )


def test_jobs_statistics_and_the_job_each_runner_runs() -> None:
    metrics = Metrics()
    recorder = metrics.scale_set("linux", url="https://github.com/octo/hello")
    recorder.on_phase_change("r1", snapshot("r1", RunnerPhase.IDLE, started=1.0))
    assigned = T0 + timedelta(seconds=3)
    recorder.record_job_started(
        job_started("r1", scale_set_assign_time=T0, runner_assign_time=assigned)
    )
    running = recorder.job_of("r1")
    assert running is not None
    assert (running.name, running.repository, running.workflow_run_id) == ("test", "octo/hello", 77)
    # A runner this scale set does not track (another process's) is not remembered.
    recorder.record_job_started(job_started("elsewhere"))
    assert recorder.job_of("elsewhere") is None

    recorder.record_job_completed(
        job_completed(
            "r1", "succeeded", runner_assign_time=assigned, finish_time=assigned + timedelta(0, 5)
        )
    )
    assert recorder.job_of("r1") is None
    # Cancelled before any runner took it: not a completed job here (nor in ARC).
    recorder.record_job_completed(job_completed("", "canceled"))
    recorder.record_statistics(
        RunnerScaleSetStatistic(total_available_jobs=3, total_acquired_jobs=2, total_idle_runners=1)
    )
    recorder.record_desired_runners(5)

    scope = {"name": "linux", "enterprise": "", "organization": "octo", "repository": "hello"}
    job = {**scope, "job_name": "test", "event_name": "push"}
    assert sample(metrics, "gha_started_jobs_total", **job) == 2
    # The histograms leave the job name out (one series per job name would be 48 lines each).
    startup = "gha_job_startup_duration_seconds"
    assert sample(metrics, f"{startup}_count", **job) is None
    # The second start had no timestamps: counted, not timed.
    assert sample(metrics, f"{startup}_count", **scope, event_name="push") == 1
    assert sample(metrics, f"{startup}_sum", **scope, event_name="push") == 3.0
    done = {**job, "job_result": "succeeded"}
    assert sample(metrics, "gha_completed_jobs_total", **done) == 1
    execution = {**scope, "event_name": "push", "job_result": "succeeded"}
    assert sample(metrics, "gha_job_execution_duration_seconds_sum", **execution) == 5.0
    assert sample(metrics, "gha_completed_jobs_total", **{**done, "job_result": "canceled"}) is None
    # The scale set's series carry the config URL's scope.
    assert sample(metrics, "gha_available_jobs", **scope) == 3
    assert sample(metrics, "gha_acquired_jobs", **scope) == 2
    assert sample(metrics, "gha_idle_runners", **scope) == 1
    assert sample(metrics, "gha_desired_runners", **scope) == 5


def test_reaps_sessions_and_forgetting_a_scale_set() -> None:
    metrics = Metrics()
    recorder = metrics.scale_set("linux", backend="tart")
    recorder.on_reap("linux-1", "idle_timeout")
    metrics.record_reap("linux", "max_lifetime")
    reaped = "outrunner_runners_reaped_total"
    assert sample(metrics, reaped, name="linux", reason="idle_timeout") == 1
    assert sample(metrics, reaped, name="linux", reason="max_lifetime") == 1
    assert recorder.reaped == {"max_lifetime": 1, "idle_timeout": 1}

    # A failed set-up before the first session is no reconnect; a failed session is.
    recorder.session_failed(RuntimeError("GitHub is down"))
    failing_since = recorder.not_listening_since
    recorder.session_listening(resumed=False)
    assert failing_since is not None
    assert (recorder.reconnects, recorder.not_listening_since, recorder.last_error) == (0, None, "")
    recorder.session_failed(RuntimeError("503 Service Unavailable"))
    assert recorder.last_error == "503 Service Unavailable"
    recorder.session_listening(resumed=True)
    assert recorder.reconnects == 1
    recorder.record_poll()
    assert recorder.last_poll is not None
    now = datetime.now(UTC)
    recorder.record_job_started(job_started("linux-2", scale_set_assign_time=now))
    recorder.record_statistics(RunnerScaleSetStatistic(total_assigned_jobs=1))

    metrics.forget("linux")
    assert metrics.get("linux") is None
    exposed = metrics.exposition()[0].decode()
    assert 'name="linux"' not in exposed
    assert "outrunner_info" in exposed

    # A runner of the removed scale set that is still stopping calls its hooks late: they make
    # no series again (nothing would ever drop them).
    recorder.record_job_completed(job_completed("linux-2", "succeeded", finish_time=now))
    recorder.record_statistics(RunnerScaleSetStatistic(total_assigned_jobs=0))
    recorder.record_desired_runners(0)
    recorder.on_reap("linux-3", "idle_timeout")
    recorder.record_poll()
    assert 'name="linux"' not in metrics.exposition()[0].decode()


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.scale_set("linux").record_desired_runners(3)
    second.scale_set("linux").record_desired_runners(1)
    labels = {"name": "linux", "enterprise": "", "organization": "", "repository": ""}
    assert sample(first, "gha_desired_runners", **labels) == 3
    assert sample(second, "gha_desired_runners", **labels) == 1


def test_without_prometheus_the_bookkeeping_still_works() -> None:
    metrics = Metrics(prometheus=False)
    assert not metrics.enabled
    recorder = metrics.scale_set("linux")
    recorder.on_phase_change("r1", snapshot("r1", RunnerPhase.IDLE, started=1.0))
    recorder.record_job_started(job_started("r1"))
    recorder.record_statistics(RunnerScaleSetStatistic(total_assigned_jobs=1))
    recorder.record_poll()
    assert recorder.job_of("r1") is not None
    assert recorder.last_poll is not None
    with pytest.raises(MetricsUnavailable, match=r"outrunner\[metrics\]"):
        metrics.exposition()
    # A worker built without a Service records into such a recorder.
    assert ScaleSetMetrics("alone").job_of("r1") is None


def test_without_the_extra_installed_metrics_fall_back_or_refuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails, as when absent
    assert not Metrics().enabled
    with pytest.raises(MetricsUnavailable):
        Metrics(prometheus=True)
