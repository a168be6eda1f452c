"""What a running Service observes, for Prometheus and the health endpoints (``docs/metrics.md``).

:class:`Metrics` belongs to one Service and owns its own ``prometheus_client`` registry (never
the process-wide default one, so several Services, or tests, never share or collide). It hands
each scale set a :class:`ScaleSetMetrics`, which is at once

* the listener's ``MetricsRecorder``: GitHub's statistics, jobs started and completed, the
  desired runner count, under actions-runner-controller's listener metric names (``gha_*``) so
  its dashboards work;
* the Scaler's phase and reap observer: provisioning and stop durations, start failures, reaps;
* the worker's session hooks: successful polls, session failures and reconnects;
* the bookkeeping the health endpoints read: the job each runner runs, the last successful poll,
  since when and why a scale set has no listening session.

``prometheus_client`` is an optional extra (``outrunner[metrics]``). Without it every hook still
keeps the bookkeeping (``/readyz`` and ``/status`` need it) and only the Prometheus series are
missing: :attr:`Metrics.registry` is None and :meth:`Metrics.exposition` raises
:class:`MetricsUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

from outrunner._version import __version__
from outrunner.log import redact
from outrunner.runner import RunnerPhase, RunnerSnapshot
from outrunner.scaleset.errors import InvalidConfigURLError
from outrunner.scaleset.listener import MessageSource
from outrunner.scaleset.listener import Scaler as ListenerScaler
from outrunner.scaleset.types import (
    JobCompleted,
    JobStarted,
    RunnerScaleSetMessage,
    RunnerScaleSetSession,
    RunnerScaleSetStatistic,
)
from outrunner.scaleset.urls import parse_config_url

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    _Family = Counter | Gauge | Histogram
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.metrics_core import Metric

    from outrunner.config import RunnerConfig
    from outrunner.scaler import StartBackoff
    from outrunner.worker import ScaleSetStatus

__all__ = [
    "REAP_REASONS",
    "RUNTIME_BUCKETS",
    "Metrics",
    "MetricsUnavailable",
    "RunningJob",
    "ScaleSetMetrics",
]

RUNTIME_BUCKETS: Final = (
    *(0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0, 15.0, 18.0),
    *(20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0, 110.0, 120.0, 150.0, 180.0),
    *(210.0, 240.0, 300.0, 360.0, 420.0, 480.0, 540.0, 600.0, 900.0, 1200.0, 1800.0, 2400.0),
    *(3000.0, 3600.0),
)
"""Histogram buckets (seconds) of every duration: the ones actions-runner-controller's listener
uses for job startup and execution, so its dashboards' quantiles mean the same here. They span
a container's start (tens of milliseconds) to an hour-long job or VM boot."""

REAP_REASONS: Final = ("max_lifetime", "idle_timeout")
"""The ``reason`` label values of ``outrunner_runners_reaped_total``."""

# Label names. "name" is the scale set, as in actions-runner-controller; enterprise,
# organization and repository come from the config URL for the scale set's series, and from the
# job message (owner, repository) for the job series, as there. The job histograms leave out
# job_name, which the job counters have: a histogram series is 48 lines of text, and one per
# distinct job name (every matrix combination) would make each scrape large and slow.
# actions-runner-controller's sample dashboard sums them by le anyway.
_SCALE_SET_LABELS: Final = ("name", "enterprise", "organization", "repository")
_JOB_COUNTER_LABELS: Final = (*_SCALE_SET_LABELS, "job_name", "event_name")
_JOB_HISTOGRAM_LABELS: Final = (*_SCALE_SET_LABELS, "event_name")
_PHASES: Final = tuple(str(phase) for phase in RunnerPhase)
_SESSIONS: Final = ("resumed", "new")


class MetricsUnavailable(RuntimeError):
    """The ``metrics`` extra (``prometheus_client``) is not installed."""


@dataclass(frozen=True)
class RunningJob:
    """The job a runner is running, from its JobStarted message (shown by ``/status``)."""

    name: str
    """The job's display name."""
    repository: str
    """``owner/repository``."""
    workflow_run_id: int
    runner_request_id: int
    started_at: datetime | None
    """When GitHub assigned it to the runner (``runnerAssignTime``)."""


class _ScalerView(Protocol):
    """What :meth:`ScaleSetMetrics.follow` reads from a Scaler, at scrape time."""

    @property
    def max_runners(self) -> int: ...

    @property
    def min_runners(self) -> int: ...

    def start_backoff(self) -> StartBackoff | None: ...


class ScaleSetMetrics:
    """One scale set's recorder and observer; every hook is quick and never raises.

    Built by :meth:`Metrics.scale_set`; built alone (``ScaleSetMetrics("linux")``) it keeps
    only the bookkeeping, with no Prometheus series.
    """

    def __init__(
        self,
        name: str,
        *,
        backend: str = "",
        url: str = "",
        families: _Families | None = None,
    ) -> None:
        self.name = name
        self.backend = backend
        scope = _scope_labels(url)
        self._scale_set_labels = (name, *scope)
        self._enterprise = scope[0]
        self._families = families
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        """The series written to, by family and label values (see :meth:`_child`)."""
        # Bookkeeping, read by the health endpoints.
        self.last_poll: datetime | None = None
        """The last successful long poll (a message or an empty answer)."""
        self.not_listening_since: datetime | None = None
        """Since when the scale set has had no listening session after a failure; None while
        it listens, or before its first failure."""
        self.last_error = ""
        """The failure that ended the last session (or held up the scale set's setup), redacted;
        ``""`` once a session listens again."""
        self.reconnects = 0
        """Sessions listening again after a failure (resumed or new)."""
        self.reaped = dict.fromkeys(REAP_REASONS, 0)
        self._jobs: dict[str, RunningJob] = {}
        self._tracked: set[str] = set()
        self._provisioned: set[str] = set()
        self._stopping: dict[str, float] = {}
        self._start_backoff: Callable[[], StartBackoff | None] | None = None
        self._start_failures_seen = 0
        self._listened = False
        if families is not None:
            self._initialise(families)

    def _initialise(self, f: _Families) -> None:
        # Counters of known label values start at 0, so rate() and increase() see the first one.
        labels = self._scale_set_labels
        for session in _SESSIONS:
            self._child(f.reconnects, (self.name, session))
        for reason in REAP_REASONS:
            self._child(f.reaped, (self.name, reason))
        self._child(f.start_failures, (self.name, self.backend))
        self._child(f.provisioning, (self.name, self.backend))
        self._child(f.stopping, (self.name, self.backend))
        for gauge in f.counts:
            self._child(gauge, labels).set(0)

    # -- read side ---------------------------------------------------------------------------

    def job_of(self, runner: str) -> RunningJob | None:
        """The job ``runner`` runs, as its JobStarted message said; None when it runs none."""
        return self._jobs.get(runner)

    # -- wiring ------------------------------------------------------------------------------

    def follow(self, scaler: _ScalerView) -> None:
        """Read ``gha_max_runners``/``gha_min_runners`` from ``scaler`` at every scrape (so a
        changed limit shows at once), and count start failures from its start backoff."""
        self._start_backoff = scaler.start_backoff
        if self._families is not None:
            labels = self._scale_set_labels
            self._families.max_runners.labels(*labels).set_function(lambda: scaler.max_runners)
            self._families.min_runners.labels(*labels).set_function(lambda: scaler.min_runners)

    def polled(self, source: MessageSource) -> MessageSource:
        """``source`` for the Listener, recording every successful long poll."""
        return _PolledSource(source, self.record_poll)

    def observed(self, scaler: ListenerScaler) -> ListenerScaler:
        """``scaler`` for ``Listener.run``, recording the desired runner count after every
        demand signal. The listener, like Go's, records it only after a message, so after the
        last job the gauge would keep counting the runners that were still stopping then until
        the next job arrives; empty polls bring it down within one long poll."""
        return _ObservedScaler(scaler, self.record_desired_runners)

    # -- the listener's MetricsRecorder ------------------------------------------------------

    def record_statistics(self, statistics: RunnerScaleSetStatistic) -> None:
        f = self._families
        if f is None:
            return
        labels = self._scale_set_labels
        child = self._child
        child(f.assigned_jobs, labels).set(statistics.total_assigned_jobs)
        child(f.running_jobs, labels).set(statistics.total_running_jobs)
        child(f.registered_runners, labels).set(statistics.total_registered_runners)
        child(f.busy_runners, labels).set(statistics.total_busy_runners)
        child(f.idle_runners, labels).set(statistics.total_idle_runners)
        child(f.available_jobs, labels).set(statistics.total_available_jobs)
        child(f.acquired_jobs, labels).set(statistics.total_acquired_jobs)

    def record_job_started(self, job: JobStarted) -> None:
        if job.runner_name in self._tracked:
            self._jobs[job.runner_name] = RunningJob(
                name=job.job_display_name,
                repository="/".join(p for p in (job.owner_name, job.repository_name) if p),
                workflow_run_id=job.workflow_run_id,
                runner_request_id=job.runner_request_id,
                started_at=job.runner_assign_time,
            )
        f = self._families
        if f is None:
            return
        counter, histogram = self._job_labels(job)
        self._child(f.started_jobs, counter).inc()
        startup = _seconds_between(job.scale_set_assign_time, job.runner_assign_time)
        if startup is not None:
            self._child(f.job_startup, histogram).observe(startup)

    def record_job_completed(self, job: JobCompleted) -> None:
        self._jobs.pop(job.runner_name, None)
        f = self._families
        # A job that never reached a runner (cancelled while queued) is not counted, as in
        # actions-runner-controller, so started and completed counts stay comparable.
        if f is None or job.runner_assign_time is None:
            return
        counter, histogram = self._job_labels(job)
        self._child(f.completed_jobs, (*counter, job.result)).inc()
        execution = _seconds_between(job.runner_assign_time, job.finish_time)
        if execution is not None:
            self._child(f.job_execution, (*histogram, job.result)).observe(execution)

    def record_desired_runners(self, count: int) -> None:
        if self._families is not None:
            self._child(self._families.desired_runners, self._scale_set_labels).set(count)

    def _job_labels(self, job: JobStarted | JobCompleted) -> tuple[tuple[str, ...], ...]:
        """The label values of a job's counter series and of its histogram series."""
        scope = (self.name, self._enterprise, job.owner_name, job.repository_name)
        return (*scope, job.job_display_name, job.event_name), (*scope, job.event_name)

    def _child(self, family: _Family, labels: tuple[str, ...]) -> Any:
        """``family``'s series of ``labels``, made once and kept: ``labels()`` takes a lock and
        checks every value each time, and a few series take every write. Kept series are also
        what :meth:`Metrics.forget` drops (the job series have label values known only here)."""
        key = (family, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    # -- the Scaler's observers --------------------------------------------------------------

    def on_phase_change(self, runner: str, snapshot: RunnerSnapshot | None) -> None:
        """The Scaler's ``PhaseObserver``: provisioning and stop durations, start failures."""
        if snapshot is None:
            self._forgotten(runner)
            return
        self._tracked.add(runner)
        if (
            snapshot.started_at is not None
            and not snapshot.adopted
            and runner not in self._provisioned
        ):
            self._provisioned.add(runner)
            took = (snapshot.started_at - snapshot.created_at).total_seconds()
            if self._families is not None:
                provisioning = self._families.provisioning
                self._child(provisioning, (self.name, self.backend)).observe(max(took, 0.0))
            self._count_start_failures()  # a start that works ends the backoff
        if snapshot.phase is RunnerPhase.STOPPING:
            self._stopping.setdefault(runner, time.monotonic())

    def _forgotten(self, runner: str) -> None:
        began = self._stopping.pop(runner, None)
        if began is not None and self._families is not None:
            took = time.monotonic() - began
            self._child(self._families.stopping, (self.name, self.backend)).observe(took)
        self._tracked.discard(runner)
        self._provisioned.discard(runner)
        self._jobs.pop(runner, None)
        # A failed start is forgotten right after it failed, in the same step of the event
        # loop: the start backoff counts it by then.
        self._count_start_failures()

    def _count_start_failures(self) -> None:
        if self._start_backoff is None:
            return
        backoff = self._start_backoff()
        failures = 0 if backoff is None else backoff.failures
        if failures > self._start_failures_seen and self._families is not None:
            start_failures = self._families.start_failures
            self._child(start_failures, (self.name, self.backend)).inc(
                failures - self._start_failures_seen
            )
        self._start_failures_seen = failures

    def on_reap(self, runner: str, reason: str) -> None:
        """The Scaler's ``ReapObserver``: ``runner`` is ended for its age (``reason`` is one of
        :data:`REAP_REASONS`)."""
        self.reaped[reason] = self.reaped.get(reason, 0) + 1
        if self._families is not None:
            self._child(self._families.reaped, (self.name, reason)).inc()

    # -- the worker's session hooks ----------------------------------------------------------

    def record_poll(self) -> None:
        """A long poll succeeded (a message, or GitHub's empty answer)."""
        now = time.time()
        self.last_poll = datetime.fromtimestamp(now, UTC)
        if self._families is not None:
            self._child(self._families.last_poll, (self.name,)).set(now)

    def session_failed(self, error: BaseException) -> None:
        """The session (or the scale set's setup) failed; the worker retries after a backoff."""
        if self.not_listening_since is None:
            self.not_listening_since = datetime.now(UTC)
        self.last_error = redact(str(error) or type(error).__name__)

    def session_listening(self, *, resumed: bool) -> None:
        """A session listens: ``resumed`` the one that failed, or a new one. After a failure of
        an earlier session this counts as a reconnect (the first session, even after failed
        set-up attempts, does not)."""
        if self._listened and (self.not_listening_since is not None or self.last_error):
            self.reconnects += 1
            if self._families is not None:
                session = "resumed" if resumed else "new"
                self._child(self._families.reconnects, (self.name, session)).inc()
        self._listened = True
        self.not_listening_since = None
        self.last_error = ""

    # -- removal -----------------------------------------------------------------------------

    def _remove_series(self) -> None:
        f = self._families
        if f is None:
            return
        # Every series this recorder writes is one of its children (made by _initialise or on
        # first write), but the two that follow() reads from the Scaler at scrape time.
        labels = self._scale_set_labels
        removals = [*self._children, (f.max_runners, labels), (f.min_runners, labels)]
        self._children.clear()
        # A late hook call (a runner of the removed scale set still stopping) writes nothing,
        # instead of making a series again that nothing would ever drop.
        self._families = None
        for family, values in removals:
            # Older prometheus_client raise KeyError for a series never created (no follow()).
            with contextlib.suppress(KeyError):
                family.remove(*values)


class _PolledSource:
    """A MessageSource that tells :meth:`ScaleSetMetrics.record_poll` of each successful poll."""

    def __init__(self, source: MessageSource, on_poll: Callable[[], None]) -> None:
        self._source = source
        self._on_poll = on_poll

    @property
    def session(self) -> RunnerScaleSetSession:
        return self._source.session

    async def get_message(
        self, last_message_id: int, max_capacity: int
    ) -> RunnerScaleSetMessage | None:
        message = await self._source.get_message(last_message_id, max_capacity)
        self._on_poll()
        return message

    async def delete_message(self, message_id: int) -> None:
        await self._source.delete_message(message_id)

    async def acquire_jobs(self, request_ids: Sequence[int]) -> list[int]:
        return await self._source.acquire_jobs(request_ids)


class _ObservedScaler:
    """A listener's Scaler that tells ``record`` the count each demand signal settled on."""

    def __init__(self, scaler: ListenerScaler, record: Callable[[int], None]) -> None:
        self._scaler = scaler
        self._record = record

    async def handle_desired_runner_count(self, count: int) -> int:
        settled = await self._scaler.handle_desired_runner_count(count)
        self._record(settled)
        return settled

    async def handle_job_started(self, job: JobStarted) -> None:
        await self._scaler.handle_job_started(job)

    async def handle_job_completed(self, job: JobCompleted) -> None:
        await self._scaler.handle_job_completed(job)


class Metrics:
    """A Service's metrics: its own registry and one :class:`ScaleSetMetrics` per scale set.

    ``prometheus``: None (the default) uses ``prometheus_client`` when it is installed; False
    never does (bookkeeping only); True requires it (raises :class:`MetricsUnavailable`).
    """

    def __init__(self, *, prometheus: bool | None = None) -> None:
        self._scale_sets: dict[str, ScaleSetMetrics] = {}
        self._collector = _StatusCollector()
        self._exposing = asyncio.Lock()
        self.registry: CollectorRegistry | None = None
        """The registry to expose (``prometheus_client.generate_latest(registry)``); None without
        the ``metrics`` extra."""
        self._families: _Families | None = None
        if prometheus is False:
            return
        try:
            from prometheus_client import CollectorRegistry
        except ImportError as exc:
            if prometheus:
                raise MetricsUnavailable(_MISSING) from exc
            return
        from prometheus_client import ProcessCollector

        self.registry = CollectorRegistry()
        self._families = _Families(self.registry)
        self.registry.register(self._collector)
        # process_* (CPU, memory, open files) as the default registry has them; Linux only.
        ProcessCollector(registry=self.registry)

    @property
    def enabled(self) -> bool:
        """True when the Prometheus series are kept (the ``metrics`` extra is installed)."""
        return self.registry is not None

    def watch(self, status: Callable[[], Iterable[ScaleSetStatus]]) -> None:
        """Read runners per phase, open sessions and pending deregistrations from ``status``
        (``Service.status``) at every scrape."""
        self._collector.status = status

    def scale_set(self, name: str, *, backend: str = "", url: str = "") -> ScaleSetMetrics:
        """The recorder of scale set ``name`` (made on first use). ``backend`` labels the runner
        histograms; ``url`` (the config URL) gives the enterprise/organization/repository
        labels."""
        found = self._scale_sets.get(name)
        if found is None:
            found = ScaleSetMetrics(name, backend=backend, url=url, families=self._families)
            self._scale_sets[name] = found
        return found

    def for_runner(self, runner: RunnerConfig, *, url: str = "") -> ScaleSetMetrics:
        """The recorder of a runner entry's scale set, its backend as the ``backend`` label."""
        try:
            backend: str = runner.provider_type
        except ValueError:  # a hand-built RunnerConfig without a backend (tests)
            backend = ""
        return self.scale_set(runner.name, backend=backend, url=url)

    def get(self, name: str) -> ScaleSetMetrics | None:
        return self._scale_sets.get(name)

    def forget(self, name: str) -> None:
        """Drop scale set ``name`` and its series (it was removed from the config)."""
        found = self._scale_sets.pop(name, None)
        if found is not None:
            found._remove_series()

    def record_reap(self, scale_set: str, reason: str) -> None:
        """A runner of ``scale_set`` was ended for its age (``max_lifetime``/``idle_timeout``)."""
        self.scale_set(scale_set).on_reap("", reason)

    def exposition(self) -> tuple[bytes, str]:
        """The registry in Prometheus' text format, and its content type. Raises
        :class:`MetricsUnavailable` without the ``metrics`` extra."""
        if self.registry is None:
            raise MetricsUnavailable(_MISSING)
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE_LATEST

    async def exposition_off_loop(self) -> tuple[bytes, str]:
        """:meth:`exposition`, with the text built in a worker thread so a large registry does
        not hold up the event loop (the listeners). The scale sets' state is read here, on the
        loop that owns it; ``prometheus_client``'s series are safe to read from a thread. One
        at a time: concurrent scrapes wait for each other, not for the loop."""
        if self.registry is None:
            raise MetricsUnavailable(_MISSING)
        async with self._exposing:
            # The thread runs in a copy of this context, so it sees the statuses set here.
            token = _STATUSES.set(list(self._collector.status()))
            try:
                return await asyncio.to_thread(self.exposition)
            finally:
                _STATUSES.reset(token)


_MISSING: Final = "metrics need the 'metrics' extra: pip install 'outrunner[metrics]'"
_STATUSES: ContextVar[Sequence[ScaleSetStatus] | None] = ContextVar("_STATUSES", default=None)
"""The scale sets' state read on the event loop for an exposition built in a thread."""


class _Families:
    """Every metric family of one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        import prometheus_client as prom

        def gauge(name: str, doc: str, labels: Sequence[str] = _SCALE_SET_LABELS) -> Gauge:
            return prom.Gauge(name, doc, labels, registry=registry)

        def counter(name: str, doc: str, labels: Sequence[str]) -> Counter:
            return prom.Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: Sequence[str]) -> Histogram:
            return prom.Histogram(name, doc, labels, registry=registry, buckets=RUNTIME_BUCKETS)

        gauge("outrunner_info", "outrunner's version (always 1).", ["version"]).labels(
            __version__
        ).set(1)
        # GitHub's statistics, as the last message (or the session) reported them.
        self.assigned_jobs = gauge("gha_assigned_jobs", "Jobs GitHub assigned to the scale set.")
        self.running_jobs = gauge("gha_running_jobs", "Jobs running or about to run.")
        self.registered_runners = gauge(
            "gha_registered_runners", "Runners registered in the scale set."
        )
        self.busy_runners = gauge("gha_busy_runners", "Registered runners running a job.")
        self.idle_runners = gauge("gha_idle_runners", "Registered runners not running a job.")
        self.available_jobs = gauge(
            "gha_available_jobs", "Jobs offered to the scale set and not acquired yet."
        )
        self.acquired_jobs = gauge(
            "gha_acquired_jobs", "Jobs the scale set acquired that have not completed."
        )
        # outrunner's own view of the scale set.
        self.desired_runners = gauge(
            "gha_desired_runners", "Runners the scale set settled on at the last demand signal."
        )
        self.max_runners = gauge("gha_max_runners", "The scale set's max_runners.")
        self.min_runners = gauge("gha_min_runners", "The scale set's min_runners (warm pool).")
        self.counts: tuple[Gauge, ...] = (
            self.assigned_jobs,
            self.running_jobs,
            self.registered_runners,
            self.busy_runners,
            self.idle_runners,
            self.available_jobs,
            self.acquired_jobs,
            self.desired_runners,
        )
        """The scale set's counts: shown as 0 until its first statistics arrive."""
        self.started_jobs = counter(
            "gha_started_jobs_total",
            "Jobs started on the scale set's runners.",
            _JOB_COUNTER_LABELS,
        )
        self.completed_jobs = counter(
            "gha_completed_jobs_total",
            "Jobs completed on the scale set's runners, by result.",
            (*_JOB_COUNTER_LABELS, "job_result"),
        )
        self.job_startup = histogram(
            "gha_job_startup_duration_seconds",
            "Seconds from the job's assignment to the scale set to its assignment to a runner.",
            _JOB_HISTOGRAM_LABELS,
        )
        self.job_execution = histogram(
            "gha_job_execution_duration_seconds",
            "Seconds from the job's assignment to a runner to its end.",
            (*_JOB_HISTOGRAM_LABELS, "job_result"),
        )
        runner_labels = ("name", "backend")
        self.provisioning = histogram(
            "outrunner_runner_provisioning_duration_seconds",
            "Seconds the backend took to start a runner's environment.",
            runner_labels,
        )
        self.stopping = histogram(
            "outrunner_runner_stop_duration_seconds",
            "Seconds the backend took to stop a runner's environment.",
            runner_labels,
        )
        self.start_failures = counter(
            "outrunner_runner_start_failures_total",
            "Runner environments that failed to start (or timed out starting).",
            runner_labels,
        )
        self.reaped = counter(
            "outrunner_runners_reaped_total",
            "Runners ended for their age, by reason (max_lifetime, idle_timeout).",
            ("name", "reason"),
        )
        self.reconnects = counter(
            "outrunner_session_reconnects_total",
            "Message sessions listening again after a failure: the same one resumed, or new.",
            ("name", "session"),
        )
        self.last_poll = gauge(
            "outrunner_last_successful_poll_timestamp_seconds",
            "Unix time of the last successful long poll of the scale set's message queue.",
            ("name",),
        )


class _WithoutCreated:
    """A registry's series without the ``*_created`` samples, which the text format would show
    as one extra gauge per counter and histogram series (OpenMetrics alone has a place for
    them, and actions-runner-controller's listener has none)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            if not any(sample.name == created for sample in metric.samples):
                yield metric
                continue
            trimmed = copy.copy(metric)
            trimmed.samples = [s for s in metric.samples if s.name != created]
            yield trimmed


class _StatusCollector:
    """Series read from ``Service.status()`` at scrape time, so they never drift from it."""

    def __init__(self) -> None:
        self.status: Callable[[], Iterable[ScaleSetStatus]] = list

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        runners, session_open, pending = self._families()
        statuses = _STATUSES.get()
        for status in self.status() if statuses is None else statuses:
            counts = dict.fromkeys(_PHASES, 0)
            for runner in status.runners:
                counts[str(runner.phase)] += 1
            for phase, count in counts.items():
                runners.add_metric([status.name, phase], count)
            session_open.add_metric([status.name], 1.0 if status.session_open else 0.0)
            pending.add_metric([status.name], len(status.pending_deregistrations))
        return [runners, session_open, pending]

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        from prometheus_client.core import GaugeMetricFamily

        return (
            GaugeMetricFamily(
                "outrunner_runners",
                "Runners the scale set tracks, by phase.",
                labels=["name", "phase"],
            ),
            GaugeMetricFamily(
                "outrunner_session_open",
                "1 while the scale set has a listening message session, else 0.",
                labels=["name"],
            ),
            GaugeMetricFamily(
                "outrunner_pending_deregistrations",
                "Runners whose environment is gone but whose removal GitHub has not confirmed.",
                labels=["name"],
            ),
        )


def _scope_labels(url: str) -> tuple[str, str, str]:
    """(enterprise, organization, repository) of a config URL; empty where it has none."""
    if not url:
        return "", "", ""
    try:
        parsed = parse_config_url(url)
    except InvalidConfigURLError:
        return "", "", ""
    return parsed.enterprise, parsed.org or parsed.owner, parsed.repo


def _seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max((end - start).total_seconds(), 0.0)
