"""End-to-end benchmark of outrunner: job latency with real Docker (and libvirt), the cost of
many jobs and of many idle scale sets, against the goals of docs/performance.md.

    .venv/bin/python -m bench.e2e            # the full run (about 12 minutes on 2 cores)
    .venv/bin/python -m bench.e2e --quick    # about 3 minutes, for iterating
    .venv/bin/python -m bench.e2e --only memory,idle --memory-levels 1000

outrunner runs as the ``outrunner`` command does (config file, :class:`~outrunner.service.Service`
under :func:`~outrunner.service.serve`, Docker through ``default_provisioner``) in a process of
its own (:mod:`bench._service`), which measures its own CPU time, memory and event-loop lag. The
fake GitHub (:mod:`bench._fake`) and, for in-memory environments, the runner agents
(:mod:`bench._agents`) run in other processes and talk HTTP on 127.0.0.1, so what is measured is
outrunner's process alone. Scenarios:

* ``docker``: a single job, queued at the fake -> its container's ``start`` event (the engine's
  clock), against the SDK's create+start of the same image in the same run, interleaved, with
  the time split; bursts of 20 and 50 jobs against as many concurrent raw create+starts, six
  of each, the two sides taking turns going first and each starting on a quiet machine (dirty
  pages written back, under a quarter of a core busy); a warm pool (``min_runners: 1``): queued
  -> the waiting runner has the job.
* ``memory``: 10 -> 100 -> 1,000 concurrent jobs (max_runners = that, five jobs per runner
  slot) in in-memory environments: wall time, CPU per job lifecycle, peak RSS, loop lag, and
  whether every runner was deregistered in time.
* ``idle``: 10 -> 50 -> 200 idle scale sets for 60 s: CPU, RSS, new connections per poll.
* ``libvirt`` (where libvirtd and the test guest are there): queued -> runner launched in a
  TCG micro-VM, single and a burst of 5.

It prints a table with each goal's PASS/FAIL, writes JSON (``bench/results/e2e.json``; the quick
run ``e2e-quick.json``) and PNG plots (``docs/img/``; the quick run ``bench/results/quick/``).
Containers, VMs and processes it starts are removed on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench._proc import Child, ChildError, wait_for_quiet_machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS_IMG = ROOT / "docs" / "img"
TOKEN = "bench-token-0123456789"
GITHUB_LONG_POLL = 50.0
STAND_IN_NICE = 10


def placement(role: str, apart: bool) -> list[str]:
    """The command a child runs under: the fake GitHub and the agent pool (``stand-in``) at a
    lower priority, and with ``apart`` on a machine of 2 or more cores, outrunner alone on CPU 0
    and the stand-ins on the others.

    The stand-ins play GitHub and runners on other machines, yet share this machine's cores with
    outrunner: at 1,000 jobs they use more CPU than outrunner, and unpinned (even at nice 10, as
    the fake's threads are many) outrunner's event-loop thread waited 20-22 s of a 150 s run for
    a core (``/proc/PID/task/TID/schedstat``), which the lag ticker counted as stalls of up to
    0.5 s. Pinned, outrunner has one core, as its event loop uses one; its CPU time is measured
    the same either way. The Docker scenarios stay unpinned: the engine's work and the raw
    baseline's threads run on every core.
    """
    prefix = ["nice", "-n", str(STAND_IN_NICE)] if role == "stand-in" else []
    cores = os.cpu_count() or 1
    if apart and cores >= 2:
        prefix = ["taskset", "-c", "0" if role == "outrunner" else f"1-{cores - 1}", *prefix]
    return prefix


"""Seconds GitHub holds an empty message poll; the fake does the same in the job scenarios."""


@dataclass
class Settings:
    quick: bool
    scenarios: set[str]
    single_samples: int
    bursts: list[int]
    burst_repeats: int
    warm_samples: int
    memory_levels: list[int]
    jobs_per_slot: int
    job_seconds: float
    memory_timeout: float
    idle_levels: list[int]
    idle_window: float
    idle_poll: float
    libvirt_single: int
    libvirt_burst: int
    keep: bool
    docker_workers: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        quick = bool(args.quick)
        settings = cls(
            quick=quick,
            scenarios=set(args.only.split(",")) if args.only else set(SCENARIOS),
            single_samples=5 if quick else 12,
            bursts=[20] if quick else [20, 50],
            # Even: each side goes first as often as the other.
            burst_repeats=2 if quick else 6,
            warm_samples=3 if quick else 10,
            memory_levels=[10, 100, 1000],
            jobs_per_slot=1 if quick else 5,
            # At least 3 s, and concurrency / 50 s (20 s at 1,000): long enough for every slot to
            # be busy at once.
            job_seconds=3.0,
            memory_timeout=75.0 if quick else 280.0,
            idle_levels=[10, 50, 200],
            idle_window=15.0 if quick else 60.0,
            # GitHub holds an empty poll 50 s; the quick run's 15 s window needs shorter polls.
            idle_poll=10.0 if quick else GITHUB_LONG_POLL,
            libvirt_single=1 if quick else 3,
            libvirt_burst=3 if quick else 5,
            keep=bool(args.keep),
            docker_workers=int(args.docker_workers),
        )
        if args.memory_levels:
            settings.memory_levels = [int(n) for n in args.memory_levels.split(",")]
        if args.idle_levels:
            settings.idle_levels = [int(n) for n in args.idle_levels.split(",")]
        if args.samples:
            settings.single_samples = settings.warm_samples = args.samples
        return settings


SCENARIOS = ("docker", "memory", "idle", "libvirt")


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Bench:
    """The run's scratch directory and everything it started, for cleanup on any exit."""

    work: Path
    settings: Settings
    children: list[Child] = field(default_factory=list)
    cleanups: list[Callable[[], object]] = field(default_factory=list)
    serial: int = 0

    def next_name(self, stem: str) -> str:
        self.serial += 1
        return f"{stem}{self.serial:02d}"

    def child(
        self, name: str, argv: list[str], timeout: float = 60.0, prefix: Sequence[str] = ()
    ) -> tuple[Child, dict[str, Any]]:
        """Start a child and wait for its first line (it is listening/ready to serve)."""
        log = self.work / f"{self.next_name(name)}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        process = Child(name, argv, str(log), env=env, prefix=prefix)
        self.children.append(process)
        try:
            first = process.receive(timeout)
        except ChildError:
            self.close(process)
            raise
        return process, first

    def close(self, child: Child, timeout: float = 30.0) -> None:
        child.close(timeout)
        if child in self.children:
            self.children.remove(child)

    @contextlib.contextmanager
    def fake(self, long_poll: float, *, apart: bool = False) -> Iterator[tuple[Child, str]]:
        argv = ["-m", "bench._fake", "--long-poll", f"{long_poll:g}"]
        child, first = self.child("fake", argv, prefix=placement("stand-in", apart))
        try:
            yield child, str(first["config_url"])
        finally:
            with contextlib.suppress(ChildError):
                child.request("quit", timeout=10)
            self.close(child)

    @contextlib.contextmanager
    def agents(self, *, apart: bool = False) -> Iterator[tuple[Child, str]]:
        path = str(self.work / f"{self.next_name('agents')}.sock")
        argv = ["-m", "bench._agents", "--socket", path]
        child, _ = self.child("agents", argv, prefix=placement("stand-in", apart))
        try:
            yield child, path
        finally:
            self.close(child)

    @contextlib.contextmanager
    def outrunner(
        self,
        config: str,
        *,
        agents: str = "",
        log_level: str = "info",
        marks: bool = False,
        stop_timeout: float = 120.0,
        tick: float = 0.01,
        stall_stacks: bool = False,
        apart: bool = False,
    ) -> Iterator[Outrunner]:
        name = self.next_name("outrunner")
        config_path = self.work / f"{name}.yml"
        config_path.write_text(config)
        state = self.work / f"{name}-state"
        state.mkdir()
        argv = [
            "-m",
            "bench._service",
            "--config",
            str(config_path),
            "--token",
            TOKEN,
            "--state-dir",
            str(state),
            "--log-file",
            str(self.work / f"{name}-outrunner.log"),
            "--log-level",
            log_level,
            "--tick",
            str(tick),
        ]
        if agents:
            argv += ["--agents", agents]
        if marks:
            argv.append("--marks")
        if stall_stacks:
            argv.append("--stall-stacks")
        if self.settings.docker_workers:
            argv += ["--docker-workers", str(self.settings.docker_workers)]
        child, _ = self.child("outrunner", argv, prefix=placement("outrunner", apart))
        runner = Outrunner(child)
        try:
            yield runner
        finally:
            if runner.stopped is None:
                with contextlib.suppress(ChildError):
                    runner.stop(timeout=stop_timeout)
            self.close(child)

    def cleanup(self) -> None:
        for child in list(self.children):
            with contextlib.suppress(Exception):
                self.close(child, timeout=15)
        for step in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                step()


@dataclass
class Outrunner:
    child: Child
    stopped: dict[str, Any] | None = None

    def request(self, cmd: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        return self.child.request(cmd, timeout=timeout, **args)

    def stop(self, timeout: float = 120.0, drain: bool = True) -> dict[str, Any]:
        self.stopped = self.request("stop", timeout=timeout, drain=drain)
        return self.stopped


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def docker_config(
    config_url: str, name: str, image: str, *, max_runners: int, min_runners: int = 0
) -> str:
    return (
        f"url: {config_url}\n"
        "runners:\n"
        f"  {name}:\n"
        f"    labels: [{name}]\n"
        f"    max_runners: {max_runners}\n"
        f"    min_runners: {min_runners}\n"
        "    docker:\n"
        f"      image: {image}\n"
        "      runner_cmd: ./run.sh\n"
        "      network: host\n"
        "      pull: never\n"
        "      stop_timeout: 2\n"
    )


def memory_config(config_url: str, names: list[str], *, max_runners: int) -> str:
    """Scale sets for in-memory environments; the docker key is required by the schema but
    unused (the benchmark's provisioner factory replaces the backend)."""
    lines = [f"url: {config_url}", "runners:"]
    for name in names:
        lines += [
            f"  {name}:",
            f"    labels: [{name}]",
            f"    max_runners: {max_runners}",
            "    docker:",
            "      image: unused",
        ]
    return "\n".join(lines) + "\n"


# -- docker --------------------------------------------------------------------------------------

SPLIT = (
    ("queued -> message delivered", "fake answers the long poll"),
    ("message -> acknowledged", "outrunner has the DELETE answer"),
    ("acknowledged -> JIT received", "generatejitconfig round trip"),
    ("JIT -> created", "provisioner: engine client, create_container (engine event)"),
    ("created -> started", "start (engine event)"),
)


def _first(items: list[float]) -> float | None:
    return min(items) if items else None


def _split(
    queued: float,
    job: int,
    *,
    timings: list[list[Any]],
    records: list[dict[str, Any]],
    created: float | None,
    started: float,
) -> dict[str, float | None]:
    """The points of one job's way, in seconds after it was queued."""
    delivered = _first([t[2] for t in timings if t[0] == "message" and job in t[4]])
    after = delivered or queued
    jit_requests = [t for t in timings if t[0] == "jit" and t[1] >= after]

    def record(message: str, since: float) -> float | None:
        return _first([r["t"] for r in records if r["msg"] == message and r["t"] >= since])

    acked = record("Desired runner count", after)
    jit = record("Spawning runner", acked or after)
    points = {
        "delivered": delivered,
        "acknowledged": acked,
        "jit": jit,
        "created": created,
        "started": started,
        "start_returned": record("Container started", jit or after),
        # The JIT request at the fake: when it arrived and when its answer was ready.
        "jit_arrived": jit_requests[0][1] if jit_requests else None,
        "jit_answered": jit_requests[0][2] if jit_requests else None,
    }
    return {key: None if value is None else value - queued for key, value in points.items()}


def _segments(points: dict[str, float | None]) -> list[float | None]:
    order = ["delivered", "acknowledged", "jit", "created", "started"]
    values: list[float | None] = []
    previous: float | None = 0.0
    for key in order:
        value = points.get(key)
        values.append(None if value is None or previous is None else value - previous)
        previous = value
    return values


def run_docker(bench: Bench) -> dict[str, Any]:
    try:
        from outrunner.provisioners.docker import JIT_ENV, default_client, resolve_engine
        from outrunner.testing.runner_image import ensure_runner_image
    except ImportError as exc:
        return {"skipped": f"the docker extra is not installed: {exc}"}
    from bench._docker import (
        DockerEvents,
        containers_named,
        raw_burst,
        raw_start,
        remove_containers,
    )

    try:
        engine_url = resolve_engine().url
        api = default_client(engine_url)
        engine = api.version()
    except Exception as exc:
        return {"skipped": f"no Docker engine answers: {exc}"}
    image = ensure_runner_image(api)
    prefix = f"e2e{secrets.token_hex(3)}"
    raw_prefix = f"{prefix}raw"
    bench.cleanups.append(lambda: remove_containers(api, containers_named(api, prefix)))
    events = DockerEvents(api)
    bench.cleanups.append(events.close)
    settings = bench.settings
    result: dict[str, Any] = {"engine": engine.get("Version"), "image": image}

    def ours(name: str) -> bool:
        return name.startswith(prefix + "-")

    def settle(fake: Child, out: Outrunner, runners: int = 0, timeout: float = 60.0) -> None:
        """Wait until every job is done, the containers are gone and only ``runners`` (the
        warm pool) are left, at the fake and in outrunner."""

        def quiet() -> bool:
            state = fake.request("state")
            if state["jobs"].get("completed", 0) != sum(state["jobs"].values()):
                return False
            if state["runners"] != runners or state["idle_runners"] != runners:
                return False
            return bool(out.request("usage")["runners"] == runners)

        if not wait_until(quiet, timeout, 0.1):
            raise RuntimeError("outrunner did not settle after its jobs (see the logs)")
        live = [n for n in containers_named(api, prefix + "-")]
        if len(live) > runners:
            wait_until(lambda: len(containers_named(api, prefix + "-")) <= runners, 30, 0.2)

    with bench.fake(GITHUB_LONG_POLL) as (fake, config_url):
        config = docker_config(config_url, prefix, image, max_runners=max([*settings.bursts, 2]))
        with bench.outrunner(config, log_level="debug", marks=True) as out:
            out.request("ready")
            out.request("records")
            # Warm-up, not measured: the engine's first create of a run is slower.
            fake.request("queue", n=1, labels=[prefix])
            events.wait("start", ours, 1, 0, 60)
            settle(fake, out)
            raw_start(api, image, f"{raw_prefix}w")
            remove_containers(api, [f"{raw_prefix}w"])
            out.request("records")

            single: list[dict[str, Any]] = []
            raw: list[dict[str, float]] = []
            for n in range(settings.single_samples):
                name = f"{raw_prefix}{n}"
                began = raw_start(api, image, name)
                start = events.wait("start", name.__eq__, 1, began, 30)[0].t
                create = events.wait("create", name.__eq__, 1, began, 30)[0].t
                raw.append({"created": create - began, "started": start - began})
                remove_containers(api, [name])
                events.wait("destroy", name.__eq__, 1, began, 30)

                queued = fake.request("queue", n=1, labels=[prefix])
                t, job = queued["t"], queued["ids"][0]
                started = events.wait("start", ours, 1, t, 30)[0]
                created_events = events.matching("create", started.name.__eq__, t)
                settle(fake, out)
                timings = fake.request("timings", since=t)["timings"]
                records = out.request("records")["records"]
                created = created_events[0].t if created_events else None
                single.append(
                    _split(
                        t,
                        job,
                        timings=timings,
                        records=records,
                        created=created,
                        started=started.t,
                    )
                )
            result["single"] = {"outrunner": single, "raw": raw}

            def job_seconds(size: int) -> float:
                # The jobs last until every container has started, so no runner exits (and no
                # engine removal runs) during the burst, on either side.
                return max(10.0, size * 0.4)

            def run_raw(names: list[str], jits: list[str]) -> list[float]:
                jobs = fake.request("raw_jobs", n=len(names), duration=job_seconds(len(names)))
                began = raw_burst(
                    lambda: default_client(engine_url),
                    image,
                    names,
                    [[f"{JIT_ENV}={jit}"] for jit in jits],
                )
                named = set(names).__contains__
                starts = [e.t - began for e in events.wait("start", named, len(names), began, 120)]
                fake.request("cancel", ids=jobs["ids"])
                remove_containers(api, names)
                fake.request("unregister", names=names)
                events.wait("destroy", named, len(names), began, 60)
                return starts

            def run_ours(size: int) -> tuple[float, list[float], list[Any]]:
                t = fake.request("queue", n=size, labels=[prefix], duration=job_seconds(size))["t"]
                started = [e.t - t for e in events.wait("start", ours, size, t, 180)]
                settle(fake, out, timeout=180)
                return t, started, out.request("records")["records"]

            bursts: list[dict[str, Any]] = []
            for size in settings.bursts:
                for rep in range(settings.burst_repeats):
                    names = [f"{raw_prefix}b{size}x{rep}n{i}" for i in range(size)]
                    # The raw containers run the same runner agent as outrunner's (registered
                    # in a scale set of their own, where a job waits for each): the agents of
                    # the first containers take their jobs while the last ones start, on the
                    # same cores, in both.
                    jits = fake.request("jit", names=names)["jit"]

                    # Each side starts on a quiet machine, and they take turns going first: the
                    # cleanup after one burst must not slow the next, nor the order favour one.
                    quiet: dict[str, float] = {}
                    if rep % 2:
                        quiet["outrunner"] = wait_for_quiet_machine()
                        t, ours_started, records = run_ours(size)
                        quiet["raw"] = wait_for_quiet_machine()
                        raw_starts = run_raw(names, jits)
                    else:
                        quiet["raw"] = wait_for_quiet_machine()
                        raw_starts = run_raw(names, jits)
                        quiet["outrunner"] = wait_for_quiet_machine()
                        t, ours_started, records = run_ours(size)

                    def at(message: str, since: float = t, got: list[Any] = records) -> list[float]:
                        return sorted(
                            r["t"] - since for r in got if since <= r["t"] and r["msg"] == message
                        )

                    bursts.append(
                        {
                            "size": size,
                            "first": "outrunner" if rep % 2 else "raw",
                            "quiet_wait_s": quiet,
                            "raw": sorted(raw_starts),
                            "outrunner": sorted(ours_started),
                            # When outrunner had each runner's JIT config, and when each start
                            # call returned: where a slow tail comes from.
                            "jit_received": at("Spawning runner")[:size],
                            "create_returned": at("Container created")[:size],
                            "start_returned": at("Container started")[:size],
                            "raw_makespan": max(raw_starts),
                            "outrunner_makespan": max(ours_started),
                            "ratio": max(ours_started) / max(raw_starts),
                        }
                    )
            result["bursts"] = bursts
            out.stop()

    # A warm pool: one idle runner waits; the job lands on it.
    with bench.fake(GITHUB_LONG_POLL) as (fake, config_url):
        config = docker_config(config_url, prefix, image, max_runners=4, min_runners=1)
        with bench.outrunner(config) as out:
            out.request("ready")
            warm: list[dict[str, float]] = []
            for _ in range(settings.warm_samples):
                settle(fake, out, runners=1)
                t = fake.request("queue", n=1, labels=[prefix])["t"]

                def taken(since: float = t) -> bool:
                    timings = fake.request("timings", since=since)["timings"]
                    return any(x[0] == "agent_connect" and x[3] == 200 for x in timings)

                if not wait_until(taken, 30, 0.01):
                    raise RuntimeError("the warm runner did not take the job")
                timings = fake.request("timings", since=t)["timings"]
                got = min(x[2] for x in timings if x[0] == "agent_connect" and x[3] == 200)
                refill = events.wait("start", ours, 1, t, 60)[0].t
                warm.append({"job_taken": got - t, "pool_refilled": refill - t})
            settle(fake, out, runners=1)
            result["warm_pool"] = warm
            out.stop()
    events.close()
    return result


# -- in-memory environments --------------------------------------------------------------------


def run_memory(bench: Bench) -> list[dict[str, Any]]:
    settings = bench.settings
    levels: list[dict[str, Any]] = []
    for concurrency in settings.memory_levels:
        jobs = concurrency * settings.jobs_per_slot
        name = f"mem{secrets.token_hex(3)}"
        with (
            bench.fake(GITHUB_LONG_POLL, apart=True) as (fake, config_url),
            bench.agents(apart=True) as (agents, socket),
        ):
            config = memory_config(config_url, [name], max_runners=concurrency)
            with bench.outrunner(
                config, agents=socket, stop_timeout=90, stall_stacks=True, apart=True
            ) as out:
                out.request("ready")
                fake.request("sample")
                before = out.request("mark", reset_peak=True)
                others = fake.cpu_seconds() + agents.cpu_seconds()
                seconds = max(settings.job_seconds, concurrency / 50)
                t = fake.request("queue", n=jobs, labels=[name], duration=seconds)["t"]
                deadline = time.monotonic() + settings.memory_timeout
                done_at: float | None = None
                state: dict[str, Any] = {}
                while time.monotonic() < deadline:
                    state = fake.request("state")
                    if state["completed"] >= jobs:
                        done_at = state["t"]
                        break
                    time.sleep(0.5)

                # Every runner deregistered in time: within 30 s of the last job, nothing is
                # left to deregister in outrunner and the runners still registered at the fake
                # are those outrunner keeps, idle (surplus: started after the last job had one).
                def settled() -> bool:
                    usage = out.request("usage")
                    state = fake.request("state")
                    return bool(
                        usage["pending_deregistrations"] == 0
                        and state["runners"] == state["idle_runners"] == usage["runners"]
                    )

                deregistered = done_at is not None and wait_until(settled, 30, 0.1)
                clear_at = time.time()
                after = out.request("mark")
                others = fake.cpu_seconds() + agents.cpu_seconds() - others
                state = fake.request("state")
                latency = fake.request("latency", since=t)["latency"]
                stopped = out.stop(timeout=120)
                warnings = stopped.get("warnings", {})
                timed_out = sum(v for k, v in warnings.items() if "Timed out deregistering" in k)
                completed = int(state["completed"])
                # Less the lag ticker's own CPU (measured alone before the service started).
                ticker = after["ticker_cpu_per_s"] * (after["t"] - before["t"])
                cpu = after["cpu"] - before["cpu"] - ticker
                levels.append(
                    {
                        "concurrency": concurrency,
                        "jobs": jobs,
                        "completed": completed,
                        "job_seconds": seconds,
                        "wall_s": (done_at or clear_at) - t,
                        "cpu_s": cpu,
                        "ticker_cpu_s": ticker,
                        "fake_and_agents_cpu_s": others,
                        "cpu_ms_per_lifecycle": cpu / max(completed, 1) * 1000,
                        "peak_rss_mib": max(after["hwm"], stopped["hwm"]),
                        "rss_mib": after["rss"],
                        "lag_max_ms": after["lag_max_ms"],
                        "lag_p99_ms": after["lag_p99_ms"],
                        "lag_over_100ms": after["lag_over_100ms"],
                        "gc_full_collections": after["gc_full_collections"],
                        "gc_full_max_ms": after["gc_full_max_ms"],
                        "gc_total_ms": after["gc_total_ms"],
                        "peak_running": state["peak_running"],
                        "deregistered": bool(deregistered) and timed_out == 0,
                        "runners_left": state["runners"],
                        "surplus_idle_runners": after["runners"] if deregistered else None,
                        "timed_out_deregistering": timed_out,
                        "warnings": warnings,
                        "shutdown_s": stopped["shutdown_s"],
                        "finished": done_at is not None,
                        "stalls": stopped.get("stalls", []),
                        "fake_latency_ms": latency,
                    }
                )
                print(f"  memory {concurrency}: {levels[-1]['wall_s']:.1f} s", file=sys.stderr)
    return levels


# -- idle scale sets ---------------------------------------------------------------------------


def run_idle(bench: Bench) -> list[dict[str, Any]]:
    settings = bench.settings
    levels: list[dict[str, Any]] = []
    for count in settings.idle_levels:
        stem = f"idle{secrets.token_hex(2)}"
        names = [f"{stem}-{i:03d}" for i in range(count)]
        with (
            bench.fake(settings.idle_poll, apart=True) as (fake, config_url),
            bench.agents(apart=True) as (_, socket),
        ):
            config = memory_config(config_url, names, max_runners=2)
            # A 1 s lag ticker: a 10 ms one would cost more than the idle scale sets.
            with bench.outrunner(config, agents=socket, tick=1.0, apart=True) as out:
                out.request("ready", timeout=120)

                def all_polled(fake: Child = fake, count: int = count) -> bool:
                    polls: dict[str, int] = fake.request("state")["session_polls"]
                    return len(polls) == count and min(polls.values(), default=0) >= 1

                # Every session polls (its connection exists); the window measures from
                # there: a new connection after that is one per poll too many.
                polled = wait_until(all_polled, settings.idle_poll * 3 + 30, 0.5)
                first = fake.request("state")
                before = out.request("mark", reset_peak=True)
                time.sleep(settings.idle_window)
                last = fake.request("state")
                after = out.request("mark")
                polls = {
                    sid: n - first["session_polls"].get(sid, 0)
                    for sid, n in last["session_polls"].items()
                }
                total_polls = sum(polls.values())
                connections = last["connections"] - first["connections"]
                wall = after["t"] - before["t"]
                levels.append(
                    {
                        "scale_sets": count,
                        "window_s": wall,
                        "long_poll_s": settings.idle_poll,
                        "all_polled_twice": polled,
                        "cpu_pct": (after["cpu"] - before["cpu"]) / wall * 100,
                        "cpu_ms_per_poll": (after["cpu"] - before["cpu"])
                        / max(total_polls, 1)
                        * 1000,
                        "rss_mib": after["rss"],
                        "peak_rss_mib": after["hwm"],
                        "polls": total_polls,
                        "polling_scale_sets": sum(n > 0 for n in polls.values()),
                        "new_connections": connections,
                        "connections_per_poll": connections / max(total_polls, 1),
                        "lag_max_ms": after["lag_max_ms"],
                    }
                )
                print(f"  idle {count}: {levels[-1]['cpu_pct']:.2f}% CPU", file=sys.stderr)
    return levels


# -- libvirt -----------------------------------------------------------------------------------


def run_libvirt(bench: Bench) -> dict[str, Any]:
    try:
        from tests.support.libvirt_daemon import (
            connect,
            daemon_problem,
            destroy_domains,
            scratch_dir,
        )
    except ImportError as exc:
        return {"skipped": f"cannot import the libvirt test support: {exc}"}
    problem = daemon_problem()
    if problem is not None:
        return {"skipped": problem}
    from tests.support.guest import ensure_guest

    guest = ensure_guest()
    conn = connect()
    prefix = f"e2evm{secrets.token_hex(2)}"
    overlays = scratch_dir(f"bench-{prefix}")
    bench.cleanups.append(lambda: shutil.rmtree(overlays, ignore_errors=True))
    bench.cleanups.append(lambda: destroy_domains(conn, prefix))
    result: dict[str, Any] = {
        "libvirt": ".".join(str(conn.getLibVersion() // 1000**i % 1000) for i in (2, 1, 0)),
        "guest": f"direct kernel boot, TCG, 1 vCPU, 256 MiB ({guest.kernel.name})",
    }

    def config(config_url: str, max_runners: int) -> str:
        return (
            f"url: {config_url}\n"
            "runners:\n"
            f"  {prefix}:\n"
            f"    labels: [{prefix}]\n"
            f"    max_runners: {max_runners}\n"
            "    libvirt:\n"
            f"      path: {guest.base}\n"
            f"      runner_cmd: {guest.runner_cmd}\n"
            "      domain_type: qemu\n"
            "      firmware: bios\n"
            "      network: none\n"
            f"      kernel: {guest.kernel}\n"
            f"      initrd: {guest.initrd}\n"
            f"      cmdline: {guest.cmdline}\n"
            f"      overlay_dir: {overlays}\n"
            "      cpus: 1\n"
            "      memory: 256\n"
            "      boot_timeout: 120\n"
        )

    def sample(size: int) -> list[dict[str, float]]:
        """Queue ``size`` jobs; per VM: queued -> domain created, agent answered, runner
        launched. The guest has no network, so its runner never takes the job: the jobs are
        cancelled and the drain releases the idle runners (and destroys their VMs)."""
        with contextlib.ExitStack() as stack:
            fake, config_url = stack.enter_context(bench.fake(GITHUB_LONG_POLL))
            out = stack.enter_context(
                bench.outrunner(config(config_url, size), log_level="debug", marks=True)
            )
            out.request("ready")
            out.request("records")
            t = fake.request("queue", n=size, labels=[prefix])["t"]
            records: list[dict[str, Any]] = []

            def launched() -> bool:
                records.extend(out.request("records")["records"])
                return sum(bool(r["msg"] == "Runner started in VM") for r in records) >= size

            if not wait_until(launched, 180, 0.2):
                raise RuntimeError(f"{size} VM runners did not start in 180 s")
            fake.request("cancel_all")
            out.stop(timeout=120)
        destroy_domains(conn, prefix)
        vms: list[dict[str, float]] = []
        for name in sorted({r["name"] for r in records if r["msg"] == "Runner started in VM"}):

            def at(message: str, vm: str = name) -> float | None:
                found = [r["t"] - t for r in records if r["msg"] == message and r["name"] == vm]
                return min(found) if found else None

            vms.append(
                {
                    "jit": at("Spawning runner") or 0.0,
                    "domain_created": at("Domain created") or 0.0,
                    "agent_answered": at("Guest agent answered") or 0.0,
                    "runner_launched": at("Runner started in VM") or 0.0,
                }
            )
        return vms

    result["single"] = [vm for _ in range(bench.settings.libvirt_single) for vm in sample(1)]
    result["burst"] = sample(bench.settings.libvirt_burst)
    conn.close()
    return result


# -- the run -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    memory = ""
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as meminfo:
        memory = f"{int(meminfo.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    import outrunner

    return {
        "nproc": nproc,
        "cpu": model,
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "outrunner": outrunner.__version__,
        "load_before": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="about 3 minutes instead of 12")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of {','.join(SCENARIOS)}"
    )
    parser.add_argument("--memory-levels", default="", help="e.g. 10,100,1000")
    parser.add_argument("--idle-levels", default="", help="e.g. 10,50,200")
    parser.add_argument("--samples", type=int, default=0, help="single-job and warm-pool samples")
    parser.add_argument("--output", default="", help="JSON path (default bench/results/e2e.json)")
    parser.add_argument("--plots", default="", help="PNG folder (default docs/img)")
    parser.add_argument("--keep", action="store_true", help="keep the logs' folder")
    parser.add_argument(
        "--docker-workers",
        type=int,
        default=0,
        help="what-if: the Docker backend's thread pool size (default: outrunner's own)",
    )
    args = parser.parse_args(argv)
    settings = Settings.from_args(args)
    unknown = settings.scenarios - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {','.join(sorted(unknown))}")
    output = Path(args.output or RESULTS / ("e2e-quick.json" if settings.quick else "e2e.json"))
    plots = Path(args.plots or (RESULTS / "quick" if settings.quick else DOCS_IMG))

    work = Path(tempfile.mkdtemp(prefix="outrunner-e2e-"))
    work.chmod(0o700)
    bench = Bench(work, settings)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": vars(settings) | {"scenarios": sorted(settings.scenarios)},
    }
    began = time.monotonic()
    interrupted = False
    try:
        for scenario, run in (
            ("docker", run_docker),
            ("memory", run_memory),
            ("idle", run_idle),
            ("libvirt", run_libvirt),
        ):
            if scenario not in settings.scenarios:
                continue
            print(f"== {scenario}", file=sys.stderr, flush=True)
            try:
                results[scenario] = run(bench)
            except Exception as exc:  # reported; the other scenarios still run
                results[scenario] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"   {scenario} failed: {exc}", file=sys.stderr)
            bench.cleanup()
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: cleaning up", file=sys.stderr)
    finally:
        bench.cleanup()
    results["duration_s"] = time.monotonic() - began
    from bench._report import evaluate, render

    results["goals"] = evaluate(results)
    print(render(results))
    if interrupted:
        print(f"\ninterrupted: no JSON or plots written; logs: {work}")
        return 130
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nJSON: {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")
    try:
        from bench._plots import plot_all
    except ImportError as exc:
        print(f"no plots: {exc} (pip install -e '.[bench]')")
    else:
        for path in plot_all(results, plots):
            print(f"plot: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if settings.keep:
        print(f"logs: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
