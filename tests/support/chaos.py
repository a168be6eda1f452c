"""A seeded chaos run: scale sets against FakeGitHub while GitHub and the provisioner misbehave.

One run (:func:`run_seed`) starts FakeGitHub and two :class:`~outrunner.worker.ScaleSetWorker`
sharing one scale set client and one runner journal, as :class:`~outrunner.service.Service`
builds them, but with millisecond timings (the Service does not expose the worker's reconnect
backoff or the Scaler's knobs). Each runner environment is an in-memory one running the fake
runner agent. A driver queues jobs and, at moments drawn from the seed, injects:

* GitHub faults (FakeGitHub): 5xx and 429 bursts, dropped connections and slow answers on the
  endpoints the client uses; 401 on the message queue (``expire_queue_tokens``); short 401
  bursts on the token exchange's runner-registration call (which the client retries, like the
  Go client; fewer than its 5 attempts, so never a permanent failure); expired sessions followed
  by 409 conflicts, injected or from a squatting session; one outage longer than a session.
* provisioner faults (:class:`ChaosProvisioner`): a start that raises, a start that hangs past
  the Scaler's ``start_timeout``, a stop that raises (at most twice in a row for a runner, under
  the Scaler's 3 tries), and environments that die, mid-job or idle. A job whose runner died is
  cancelled at the fake, as GitHub does when it loses a runner, and counted as killed.

Once every job is queued and has a runner, the workers are drained as the Service does on SIGTERM
(busy runners finish, idle ones are released) while request faults on what a drain uses, stop
failures and runner deaths go on; once no runner is left, the faults end and the run checks the
invariants (:attr:`SeedReport.violations`): every job completed; each job that was not killed ran
exactly once and succeeded; no runner was stopped mid-job unless the chaos killed it; no
environment, registration, session or journal entry is left. Every wait is bounded, so a stuck
run fails with its seed instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Coroutine, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from outrunner.config import DockerImage, RunnerConfig
from outrunner.journal import Journal
from outrunner.log import TextFormatter
from outrunner.provisioner import ProvisionerError, RunnerRequest
from outrunner.scaler import Scaler
from outrunner.scaleset import Client, PersonalAccessToken, RetryPolicy
from outrunner.scaleset.session import MessageSession
from outrunner.testing import Endpoint, FakeGitHub, InMemoryProvisioner, JobState
from outrunner.testing.agent import AgentError, run_agent
from outrunner.testing.fakegithub import Outage
from outrunner.worker import Backoff, ScaleSetWorker

__all__ = [
    "ACQUIRE_ENV",
    "SEEDS_ENV",
    "SEED_ENV",
    "ChaosProvisioner",
    "SeedReport",
    "chosen_seeds",
    "random_seed",
    "run_seed",
]

SEED_ENV = "OUTRUNNER_CHAOS_SEED"
"""Seeds to run instead of random ones (``123`` or ``123,456``): replays a failure."""
SEEDS_ENV = "OUTRUNNER_CHAOS_SEEDS"
"""How many random seeds to run (more locally than in CI)."""
ACQUIRE_ENV = "OUTRUNNER_CHAOS_ACQUIRE"
"""``1``: FakeGitHub in acquire mode (older GHES: jobs are offered, then acquired)."""

TOKEN = "ghp_chaosTestToken_abcdefghijklmnop"
SESSION_IDLE = 1.0
"""FakeGitHub's session lifetime without a poll; the outage lasts longer."""
START_TIMEOUT = 0.4
"""The Scaler's start_timeout: a hanging start is cancelled after this long."""
QUEUE_SPAN = 4.5
"""Seconds over which the jobs are queued; the faults go on until every job has a runner."""
CHAOS_LIMIT = 20.0
"""Seconds after which the faults stop even if some jobs still wait for a runner."""
SETTLE_TIMEOUT = 40.0
DRAIN_TIMEOUT = 30.0

_CONFLICT = {
    "typeName": "GitHub.DistributedTask.WebApi.RunnerScaleSetSessionConflictException, "
    "GitHub.DistributedTask.WebApi",
    "message": "The actions runner scaleset chaos already has an active session.",
}
# Endpoints a running scale set calls. DELETE_SESSION is left out: it is only called on the way
# out, where a failure leaves the session to expire by design ("the next start deletes it").
_TARGETS = (
    Endpoint.GET_MESSAGE,
    Endpoint.DELETE_MESSAGE,
    Endpoint.GENERATE_JIT,
    Endpoint.DELETE_RUNNER,
    Endpoint.LIST_RUNNERS,
    Endpoint.CREATE_SESSION,
    Endpoint.REFRESH_SESSION,
    Endpoint.REGISTRATION_TOKEN,
)
# What a request fault is, and how likely each kind is.
_REQUEST_FAULTS = {"5xx": 14, "429": 2, "drop": 5, "delay": 4}
# Events, in expected occurrences per second of the chaos window.
_EVENTS = {
    "exhaust": 0.3,  # a burst longer than the client's 5 attempts: that call fails
    "queue-401": 1.0,
    "registration-401": 0.8,
    "session-409": 0.08,
    "squatter": 0.08,
    "session-lost": 0.08,
    "kill-busy": 1.0,
    "kill-idle": 0.4,
}
# What a drain uses: the listener (for JobCompleted) and the releases of idle runners.
_DRAIN_TARGETS = (Endpoint.GET_MESSAGE, Endpoint.DELETE_MESSAGE, Endpoint.DELETE_RUNNER)
_QUEUE_ENDPOINTS = frozenset({Endpoint.GET_MESSAGE, Endpoint.DELETE_MESSAGE, Endpoint.ACQUIRE_JOBS})


def chosen_seeds(default_count: int) -> tuple[list[int], bool]:
    """The seeds to run, and whether they were chosen at random (False: replaying)."""
    fixed = os.environ.get(SEED_ENV, "").replace(",", " ").split()
    if fixed:
        return [int(seed) for seed in fixed], False
    count = int(os.environ.get(SEEDS_ENV) or default_count)
    return [random_seed() for _ in range(count)], True


def random_seed() -> int:
    return random.SystemRandom().randrange(1, 2**31)


@dataclass
class SeedReport:
    """What one seed's run did, and which invariants it broke (empty: none)."""

    seed: int
    acquire_mode: bool = False
    jobs: int = 0
    killed: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    wall: float = 0.0
    violations: list[str] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)
    """When an invariant broke: the run's last log lines at INFO and above, with their
    attributes (pytest's captured log shows only warnings, and only their messages)."""

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())

    def summary(self) -> str:
        kinds = " ".join(f"{kind}={n}" for kind, n in sorted(self.faults.items()))
        replay = f"{SEED_ENV}={self.seed}" + (f" {ACQUIRE_ENV}=1" if self.acquire_mode else "")
        return (
            f"chaos seed={self.seed} jobs={self.jobs} killed={self.killed} "
            f"faults={self.total_faults} ({kinds}) wall={self.wall:.1f}s [replay: {replay}]"
        )


class Ledger:
    """The runner agents' side of the run: which job each ran to the end, which runner the
    chaos killed, and any runner stopped mid-job that the chaos did not kill."""

    def __init__(self, gh: FakeGitHub, http: httpx.AsyncClient) -> None:
        self._gh = gh
        self._http = http
        self.runs: Counter[int] = Counter()
        """runnerRequestId -> how often an agent ran it to the end (reported it)."""
        self.chaos_killed: set[str] = set()
        """Runners whose environment the chaos killed."""
        self.dead: set[str] = set()
        """Runners whose agent ended without reporting a job (killed or stopped)."""
        self.killed_jobs: set[int] = set()
        self.violations: list[str] = []
        self._stopped_busy: set[str] = set()

    def workload(self, request: RunnerRequest) -> Awaitable[object]:
        """The environment's runner: the fake agent, watched. Made only once awaited: an
        environment stopped before its task first ran would otherwise leave a coroutine that
        was never awaited (and a RuntimeWarning)."""
        return _Lazy(lambda: self._agent(request))

    async def _agent(self, request: RunnerRequest) -> object:
        name = request.name
        try:
            result = await run_agent(request.jit_config, poll_timeout=0.3, client=self._http)
        except asyncio.CancelledError:
            self._ended_early(name)
            raise
        except AgentError:
            # Refused: its registration was removed before it took a job (a drain released it).
            self._ended_early(name)
            return None
        self.runs[result.runner_request_id] += 1
        return result

    def _ended_early(self, name: str) -> None:
        job = next((j for j in self._gh.jobs() if j.runner_name == name), None)
        if job is not None and job.state is JobState.COMPLETED and job.result == "succeeded":
            # Stopped after its report went out, before the agent returned: it did run.
            self.runs[job.id] += 1
            return
        self.dead.add(name)
        if job is not None and job.state is JobState.RUNNING and name not in self.chaos_killed:
            self._stopped_busy.add(name)
            self.violations.append(
                f"runner {name} was stopped while running job {job.id}, and the chaos did not "
                "kill it"
            )

    def sweep(self) -> None:
        """Cancel the jobs of runners that are gone, as GitHub does when it loses a runner.

        A runner the chaos killed may still take a job after its death (its connect was held
        at the fake); that job is killed too. A job on a runner outrunner stopped is a lost
        job: a violation.
        """
        for job in self._gh.jobs():
            name = job.runner_name
            if job.state is not JobState.RUNNING or name is None or name not in self.dead:
                continue
            with contextlib.suppress(KeyError):
                self._gh.cancel_job(job.id)
            if name in self.chaos_killed:
                self.killed_jobs.add(job.id)
            elif name not in self._stopped_busy:
                self.violations.append(
                    f"job {job.id} was handed to runner {name} after outrunner had stopped it"
                )


class _Lazy:
    """An awaitable that makes its coroutine when it is first awaited."""

    def __init__(self, make: Callable[[], Coroutine[Any, Any, object]]) -> None:
        self._make = make

    def __await__(self) -> Generator[Any, None, object]:
        return self._make().__await__()


class ChaosProvisioner:
    """An :class:`InMemoryProvisioner` whose start raises or hangs and whose stop raises, at
    rates drawn from the seed. Everything else (exit watching, adoption, cleanup) is the inner
    provisioner's."""

    def __init__(
        self,
        inner: InMemoryProvisioner,
        rng: random.Random,
        faults: Counter[str],
        *,
        start_raises: float,
        start_hangs: float,
        stop_raises: float,
        quiet: Callable[[], bool],
    ) -> None:
        self.inner = inner
        self._rng = rng
        self._faults = faults
        self._rates = (start_raises, start_hangs, stop_raises)
        self._quiet = quiet
        self._stop_failures: Counter[str] = Counter()

    async def start(self, request: RunnerRequest) -> None:
        start_raises, start_hangs, _ = self._rates
        draw = self._rng.random()
        await asyncio.sleep(self._rng.uniform(0.0, 0.05))  # a start takes a moment
        if not self._quiet():
            if draw < start_raises:
                self._faults["start-raises"] += 1
                raise ProvisionerError(f"chaos: cannot start {request.name}")
            if draw < start_raises + start_hangs:
                self._faults["start-hangs"] += 1
                await asyncio.Event().wait()  # until the Scaler's start_timeout cancels it
        await self.inner.start(request)

    async def stop(self, name: str) -> None:
        # At most two failures in a row: the Scaler tries a stop 3 times, then gives up on the
        # environment by design (the next start's orphan cleanup would remove it).
        if (
            not self._quiet()
            and self._stop_failures[name] < 2
            and self._rng.random() < self._rates[2]
        ):
            self._stop_failures[name] += 1
            self._faults["stop-raises"] += 1
            raise ProvisionerError(f"chaos: cannot stop {name}")
        self._stop_failures.pop(name, None)
        await self.inner.stop(name)

    async def close(self) -> None:
        await self.inner.close()

    async def exited(self, name: str) -> bool:
        return await self.inner.exited(name)

    async def wait_exited(self, name: str) -> None:
        await self.inner.wait_exited(name)

    async def adopt(self, name: str, runner: RunnerConfig) -> bool:
        return await self.inner.adopt(name, runner)

    async def cleanup(self, prefix: str, *, keep: Collection[str] = ()) -> list[str]:
        return await self.inner.cleanup(prefix, keep=keep)


@dataclass
class _ScaleSet:
    runner: RunnerConfig
    provisioner: ChaosProvisioner
    worker: ScaleSetWorker
    task: asyncio.Task[None] | None = None


class _Chaos:
    """One seed's run."""

    def __init__(self, seed: int, state_dir: Path, *, acquire_mode: bool) -> None:
        self.seed = seed
        self.acquire_mode = acquire_mode
        self.rng = random.Random(seed)
        self.state_dir = state_dir
        self.report = SeedReport(seed, acquire_mode=acquire_mode)
        self.faults = self.report.faults
        self.phase = "chaos"
        """What may fail: everything ("chaos"); what a drain meets ("drain": request faults on
        the endpoints it uses, runners dying or failing to stop); nothing ("quiet")."""
        self.outage: Outage | None = None
        self._outage_end: asyncio.Task[None] | None = None
        self._squatter: asyncio.Task[None] | None = None
        self._intensity = self.rng.uniform(0.35, 0.5)
        """The share of requests to each endpoint that meets a fault."""
        self._credit: dict[Endpoint, float] = dict.fromkeys(Endpoint, 0.0)
        self._seen = 0
        self._once: dict[str, float] = {}
        """Events still to happen once: loop time from which each is due."""

    async def run(self) -> None:
        async with (
            FakeGitHub(
                pat=TOKEN,
                long_poll_timeout=0.1,
                session_idle_timeout=SESSION_IDLE,
                # The client refreshes its admin token when less than 60 s is left: with 61 s,
                # every second, so the token exchange is in the traffic the faults hit.
                admin_token_ttl=61.0,
                acquire_mode=self.acquire_mode,
            ) as gh,
            httpx.AsyncClient(trust_env=False) as agent_http,
            _client(gh) as client,
            _client(gh) as squatter_client,
        ):
            self.gh = gh
            self.ledger = Ledger(gh, agent_http)
            journal = Journal.open(self.state_dir, durable=False)
            try:
                sets = [self._scale_set(client, journal, f"chaos{i}") for i in range(2)]
                for s in sets:
                    s.task = asyncio.create_task(s.worker.run(), name=f"worker:{s.runner.name}")
                try:
                    await self._serve(sets, squatter_client)
                finally:
                    await self._stop(sets)
                    for s in sets:
                        await s.provisioner.close()
                self._check(sets, journal)
            finally:
                journal.close()

    def _scale_set(self, client: Client, journal: Journal, name: str) -> _ScaleSet:
        rng = self.rng
        runner = RunnerConfig(
            name=name, labels=(name,), docker=DockerImage(image=f"chaos/{name}:latest")
        )
        inner = InMemoryProvisioner(workload=self.ledger.workload)
        provisioner = ChaosProvisioner(
            inner,
            random.Random(rng.random()),
            self.faults,
            start_raises=rng.uniform(0.05, 0.15),
            start_hangs=rng.uniform(0.02, 0.06),
            stop_raises=rng.uniform(0.1, 0.3),
            quiet=lambda: self.phase == "quiet",
        )
        max_runners = rng.randint(5, 8)
        scaler = Scaler(
            client,
            max_runners=max_runners,
            name_prefix=name,
            runner=runner,
            provisioner=provisioner,
            journal=journal,
            stop_timeout=5.0,
            start_timeout=START_TIMEOUT,
            deregister_timeout=5.0,
            watch_interval=0.5,
            retry_first=0.02,
            retry_max=0.2,
            start_backoff_first=0.02,
            start_backoff_max=0.3,
        )
        worker = ScaleSetWorker(
            client,
            runner,
            max_runners=max_runners,
            provisioner=provisioner,
            owner=f"chaos-{self.seed}",
            shutdown_timeout=10.0,
            backoff=Backoff(initial=0.02, maximum=0.3),
            journal=journal,
            scaler=scaler,
            drain_timeout=DRAIN_TIMEOUT,
        )
        return _ScaleSet(runner=runner, provisioner=provisioner, worker=worker)

    # -- the run -------------------------------------------------------------------------------

    async def _serve(self, sets: list[_ScaleSet], squatter_client: Client) -> None:
        gh, rng = self.gh, self.rng
        await self._bounded(
            asyncio.gather(*(s.worker.ready.wait() for s in sets)), 10.0, "the scale sets to start"
        )
        loop = asyncio.get_running_loop()
        began = loop.time()
        jobs = rng.randint(50, 56)
        self.report.jobs = jobs
        # When each job is queued, and when the outage (longer than a session) begins.
        queue_at = sorted(rng.uniform(0.0, QUEUE_SPAN) for _ in range(jobs))
        outage_at = rng.uniform(0.5, QUEUE_SPAN - 1.0)
        outage_for = rng.uniform(1.1, 1.5) * SESSION_IDLE
        # Early enough that the run is still going (it ends once every job has a runner).
        self._once = {event: began + rng.uniform(0.2, QUEUE_SPAN * 0.6) for event in _EVENTS}
        last = began
        while loop.time() - began < CHAOS_LIMIT:
            now = loop.time() - began
            elapsed, last = loop.time() - last, loop.time()
            while queue_at and queue_at[0] <= now:
                queue_at.pop(0)
                s = rng.choice(sets)
                gh.queue_job([s.runner.name], duration=rng.uniform(0.02, 0.2))
            if not queue_at and self.outage is not None and self._placed():
                break
            if self.outage is None and now >= outage_at and self._registration_settled():
                status = rng.choice((503, 502, None))
                self.outage = gh.outage(status=status)
                self._outage_end = asyncio.create_task(self._end_outage_after(outage_for))
            self._request_faults()
            await self._events(sets, squatter_client, elapsed)
            self.ledger.sweep()
            await asyncio.sleep(rng.uniform(0.005, 0.03))
        for _ in queue_at:  # never left out, however the timing went
            gh.queue_job([rng.choice(sets).runner.name], duration=rng.uniform(0.02, 0.2))
        await self._wind_down()

        # Every job gets a runner (or is killed); then the drain, as the Service does on SIGTERM.
        async def placed() -> None:
            while not self._placed():
                self._request_faults()
                await asyncio.sleep(0.02)

        await self._bounded(
            placed(), SETTLE_TIMEOUT, "every job to be taken by a runner", must=False
        )

    def _placed(self) -> bool:
        """True once every job runs or has ended (none waits for a runner)."""
        self.ledger.sweep()
        return all(j.state in (JobState.RUNNING, JobState.COMPLETED) for j in self.gh.jobs())

    async def _wind_down(self) -> None:
        """End the chaos but for what a drain meets: the outage, session trouble and squatters
        end; request faults go on for the endpoints the drain uses, and runners may still die
        or fail to stop."""
        self.phase = "drain"
        if self._outage_end is not None:
            self._outage_end.cancel()
            await asyncio.wait({self._outage_end})
        if self.outage is not None:
            self.outage.end()
        if self._squatter is not None:
            await self._squatter  # deletes its session; bounded

    async def _stop(self, sets: list[_ScaleSet]) -> None:
        """Drain every worker: busy runners finish, idle ones are released, while the faults of
        the drain phase go on until no runner is left; then no faults, and whatever is still
        running after ``DRAIN_TIMEOUT`` is cancelled, as the Service does."""
        if self.phase == "chaos":  # the run was cut short
            await self._wind_down()
        for s in sets:
            s.worker.drain()
        tasks = [s.task for s in sets if s.task is not None]
        loop = asyncio.get_running_loop()
        deadline = last = loop.time()
        deadline += DRAIN_TIMEOUT
        while tasks and loop.time() < deadline:
            if self.phase == "drain" and not any(s.worker.scaler.runners() for s in sets):
                # Shutting down: a failed DELETE of the session would leave it to expire by
                # design, so the faults end here.
                self.phase = "quiet"
                self.gh.clear_faults()
            elapsed, last = loop.time() - last, loop.time()
            self._request_faults()
            await self._events(sets, None, elapsed)
            self.ledger.sweep()
            done, _ = await asyncio.wait(tasks, timeout=0.02)
            tasks = [t for t in tasks if t not in done]
        if tasks:
            self.report.violations.append(
                f"the drain did not finish within {DRAIN_TIMEOUT:g} s: "
                f"busy={[s.worker.scaler.busy_runners() for s in sets]}"
            )
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=15.0)
        self.phase = "quiet"
        self.gh.clear_faults()
        for s in sets:
            if s.task is None or not s.task.done() or s.task.cancelled():
                continue
            error = s.task.exception()
            if error is not None:
                self.report.violations.append(f"scale set {s.runner.name} failed: {error!r}")
        # A connect a dead runner held at the fake may still have taken a job meanwhile.
        await asyncio.sleep(0.4)
        self.ledger.sweep()

    # -- faults --------------------------------------------------------------------------------

    def _request_faults(self) -> None:
        """Fail, drop or slow down a share of each endpoint's requests: for every request an
        endpoint received, it earns ``intensity`` of a fault, spent once nothing is pending
        there, so rarely called endpoints do not pile faults up and busy ones get many."""
        gh, rng = self.gh, self.rng
        requests = gh.requests
        for request in requests[self._seen :]:
            if request.endpoint is not None:
                self._credit[request.endpoint] += self._intensity
        self._seen = len(requests)
        if self._outage_active() or self.phase == "quiet":
            return  # GitHub answers nothing anyway, or the faults are over
        targets: tuple[Endpoint, ...] = _TARGETS if self.phase == "chaos" else _DRAIN_TARGETS
        if self.acquire_mode and self.phase == "chaos":
            targets += (Endpoint.ACQUIRE_JOBS,)
        for endpoint in targets:
            if self._credit[endpoint] < 1 or gh.pending_faults(endpoint):
                continue
            times = min(int(self._credit[endpoint]), rng.randint(1, 2))
            self._credit[endpoint] -= times
            kind = rng.choices(list(_REQUEST_FAULTS), weights=list(_REQUEST_FAULTS.values()))[0]
            if kind == "5xx":
                gh.fail_next(endpoint, times=times, status=rng.choice((500, 502, 503, 504)))
            elif kind == "429":
                gh.fail_next(endpoint, times=times, status=429, headers={"Retry-After": "0"})
            elif kind == "drop":
                gh.drop_next(endpoint, times=times)
            else:
                gh.delay_next(endpoint, rng.uniform(0.05, 0.3), times=times)

    async def _events(
        self, sets: list[_ScaleSet], squatter_client: Client | None, elapsed: float
    ) -> None:
        """What else happens in ``elapsed`` seconds: a failing call, token and session trouble,
        a squatting session, a runner that dies (only that while draining). Each kind also
        happens once at a moment drawn from the seed, so every run has every kind."""
        rng = self.rng
        due = [event for event, rate in _EVENTS.items() if rng.random() < rate * elapsed]
        if self.phase == "chaos":
            now = asyncio.get_running_loop().time()
            due += [event for event, at in self._once.items() if at <= now]
        elif "kill-busy" not in due:
            return
        else:
            due = ["kill-busy"]
        for event in due:
            if self._outage_active() and not event.startswith("kill"):
                continue  # runners may still die meanwhile
            if await self._event(event, sets, squatter_client):
                self._once.pop(event, None)

    async def _event(
        self, event: str, sets: list[_ScaleSet], squatter_client: Client | None
    ) -> bool:
        """Make ``event`` happen; False when it cannot now (e.g. no runner is idle)."""
        gh, rng = self.gh, self.rng
        if event == "exhaust":
            endpoint = rng.choice(_TARGETS)
            if gh.pending_faults(endpoint):
                return False
            gh.fail_next(endpoint, times=6, status=rng.choice((500, 502, 503, 504)))
        elif event == "queue-401":
            gh.expire_queue_tokens()  # counted by the 401s it causes
        elif event == "registration-401":
            if not self._registration_settled():
                return False
            # Fewer than the client's 5 attempts: it gets through on a retry. (A 401 on the
            # registration-token call is a permanent failure by design: never injected.)
            gh.fail_next(
                Endpoint.RUNNER_REGISTRATION,
                times=rng.randint(1, 4),
                status=401,
                body={"message": "Bad credentials"},
            )
        elif event == "session-409":
            gh.expire_sessions()
            self.faults["sessions-expired"] += 1
            gh.fail_next(
                Endpoint.CREATE_SESSION, times=rng.randint(1, 2), status=409, body=_CONFLICT
            )
        elif event == "squatter":
            if squatter_client is None or not (self._squatter is None or self._squatter.done()):
                return False
            self._squatter = asyncio.create_task(self._squat(rng.choice(sets), squatter_client))
        elif event == "session-lost":
            gh.expire_sessions()
            self.faults["sessions-expired"] += 1
        elif event == "kill-busy":
            return await self._kill(sets, busy=True)
        elif event == "kill-idle":
            return await self._kill(sets, busy=False)
        return True

    def _outage_active(self) -> bool:
        return self.outage is not None and self.outage.active

    def _registration_settled(self) -> bool:
        """True when no 401 burst on runner-registration is pending or in the middle of a retry
        loop (its last request succeeded). Another burst, or an outage, now could give one token
        exchange 5 failures in a row, ending in a 401: a permanent failure, as it should be."""
        gh = self.gh
        if gh.pending_faults(Endpoint.RUNNER_REGISTRATION):
            return False
        calls = gh.requests_to(Endpoint.RUNNER_REGISTRATION)
        return not calls or (calls[-1].fault is None and calls[-1].status == 201)

    async def _end_outage_after(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(seconds)
        if self.outage is not None:
            self.outage.end()

    async def _squat(self, s: _ScaleSet, client: Client) -> None:
        """Another listener's session: once GitHub has dropped ours, take the scale set's
        session for a moment, so the worker meets real 409 conflicts; then let go."""
        gh, rng = self.gh, self.rng
        scale_set = s.worker.scale_set
        if scale_set is None:
            return
        gh.expire_sessions()
        self.faults["sessions-expired"] += 1
        session: MessageSession | None = None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                session = await client.create_message_session(scale_set.id, "squatter")
        if session is None:
            return  # the worker was quicker, or a fault hit us: no squat this time
        await asyncio.sleep(rng.uniform(0.2, 0.6))
        # Faults may hit the delete too; the session would expire on its own within a second.
        for _ in range(20):
            try:
                async with asyncio.timeout(2.0):
                    await session.delete()
                return
            except Exception:
                await asyncio.sleep(0.05)

    async def _kill(self, sets: list[_ScaleSet], *, busy: bool) -> bool:
        """Kill one runner's environment: one running a job (busy), or one waiting for a job.
        False when there is none."""
        gh = self.gh
        running = {j.runner_name for j in gh.jobs() if j.state is JobState.RUNNING}
        alive: dict[str, asyncio.Task[object]] = {
            name: env.task
            for s in sets
            for name, env in s.provisioner.inner.environments.items()
            if env.task is not None and not env.task.done()
        }
        candidates = sorted(name for name in alive if (name in running) == busy)
        if not candidates:
            return False
        name = self.rng.choice(candidates)
        task = alive[name]
        self.ledger.chaos_killed.add(name)
        task.cancel()  # the environment's runner dies; the provisioner sees it exit
        await asyncio.wait({task})
        self.faults["kill-busy" if busy else "kill-idle"] += 1
        self.ledger.sweep()
        return True

    # -- invariants ----------------------------------------------------------------------------

    def _check(self, sets: list[_ScaleSet], journal: Journal) -> None:
        gh, ledger, report = self.gh, self.ledger, self.report
        violations = report.violations
        violations.extend(ledger.violations)
        report.killed = len(ledger.killed_jobs)
        for job in gh.jobs():
            runs = ledger.runs[job.id]
            if job.state is not JobState.COMPLETED:
                violations.append(f"job {job.id} is {job.state} on {job.runner_name}, not done")
            elif job.id in ledger.killed_jobs:
                if runs:
                    violations.append(f"job {job.id} was killed but ran {runs} time(s)")
            elif job.result != "succeeded" or runs != 1:
                violations.append(
                    f"job {job.id} ended {job.result} on {job.runner_name} after {runs} run(s) "
                    "(want: succeeded, 1)"
                )
        for s in sets:
            if s.provisioner.inner.environments:
                violations.append(
                    f"environments left in {s.runner.name}: "
                    f"{sorted(s.provisioner.inner.environments)}"
                )
        if gh.runners():
            violations.append(f"registrations left: {[r.name for r in gh.runners()]}")
        if gh.sessions():
            violations.append(f"sessions left: {[x.owner_name for x in gh.sessions()]}")
        if journal.entries():
            violations.append(f"journal entries left: {[e.name for e in journal.entries()]}")
        if any(journal.sessions().values()):
            violations.append(f"journal sessions left: {journal.sessions()}")
        for request in gh.requests:
            if request.fault is not None:
                kind = request.fault
                if request.fault == "fail":
                    kind = f"http-{request.status}"
                self.faults[kind] += 1
            elif request.endpoint in _QUEUE_ENDPOINTS and request.status == 401:
                self.faults["queue-401"] += 1
            elif (
                request.endpoint is Endpoint.CREATE_SESSION
                and request.status == 409
                and (request.json or {}).get("ownerName") != "squatter"
            ):
                self.faults["squatter-409"] += 1  # met by a worker

    async def _bounded(
        self, work: Awaitable[object], seconds: float, what: str, *, must: bool = True
    ) -> None:
        try:
            async with asyncio.timeout(seconds):
                await work
        except TimeoutError:
            self.report.violations.append(f"timed out after {seconds:g} s waiting for {what}")
            if must:
                raise _Stuck(what) from None


class _Stuck(Exception):
    """A wait the run cannot go on without timed out (a violation is recorded)."""


def _client(gh: FakeGitHub) -> Client:
    return Client(
        gh.config_url(),
        PersonalAccessToken(TOKEN),
        retry=RetryPolicy(wait_min=0.01, wait_max=0.05),
    )


LOG_TAIL = 600
"""Log lines a failed seed reports (:attr:`SeedReport.log_tail`)."""


class _FlightRecorder(logging.Handler):
    """Keeps outrunner's last ``LOG_TAIL`` records at INFO and above while a seed runs, so a
    failure that does not replay shows what led to it. Warnings and errors still reach the
    root logger's handlers (pytest's capture) as before; INFO records do not, so the captured
    log of a failing test does not grow."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: deque[logging.LogRecord] = deque(maxlen=LOG_TAIL)
        self.setFormatter(TextFormatter(utc=True))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if record.levelno >= logging.WARNING:
            logging.getLogger().handle(record)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        logger = logging.getLogger("outrunner")
        level, propagate = logger.level, logger.propagate
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(self)
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate

    def lines(self) -> list[str]:
        # A traceback's last line says enough here; whole ones would bury the sequence.
        out: list[str] = []
        for record in self.records:
            text = self.format(record)
            first, _, rest = text.partition("\n")
            out.append(f"{first} | {rest.splitlines()[-1]}" if rest else first)
        return out


async def run_seed(seed: int, state_dir: Path, *, acquire_mode: bool = False) -> SeedReport:
    """Run one seed against a fresh FakeGitHub; ``state_dir`` holds its runner journal."""
    chaos = _Chaos(seed, state_dir, acquire_mode=acquire_mode)
    recorder = _FlightRecorder()
    began = time.monotonic()
    with recorder.recording(), contextlib.suppress(_Stuck):  # the violation says what got stuck
        await chaos.run()
    chaos.report.wall = time.monotonic() - began
    if chaos.report.violations:
        chaos.report.log_tail = recorder.lines()
    return chaos.report
