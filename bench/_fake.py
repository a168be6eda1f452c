"""The fake GitHub in a process of its own, driven by the end-to-end benchmark over JSON lines.

    python -m bench._fake --long-poll 50

Prints ``{"url": ..., "config_url": ...}`` once it listens on 127.0.0.1, then answers one JSON
request per line (see :func:`_Controls.handle`). On top of :class:`FakeGitHub` it counts the TCP
connections it accepts and times every request (when it arrived, when its answer was ready), so
the orchestrator can tell when a job's message was delivered, acknowledged and its runner
registered without instrumenting outrunner.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from bench._proc import percentile, serve_lines
from outrunner.testing import FakeGitHub
from outrunner.testing.fakegithub.model import JobState
from outrunner.testing.fakegithub.routes import Request, Response, Router

JOB_NAMES = ("build", "test", "lint", "package")


def _kind(method: str, path: str) -> str:
    """The request's part in a job's life, from its method and path."""
    if "/queue/" in path:
        return "message" if method == "GET" else "ack"
    if path.endswith("/generatejitconfig"):
        return "jit"
    if path.endswith("/_agent/connect"):
        return "agent_connect"
    if path.endswith("/_agent/complete"):
        return "agent_complete"
    if "/agents/" in path and method == "DELETE":
        return "deregister"
    return "other"


def _job_ids(body: bytes) -> list[int]:
    """runnerRequestIds of the JobAssigned/JobAvailable messages of a message answer."""
    try:
        messages = json.loads(json.loads(body)["body"])
    except (ValueError, KeyError, TypeError):
        return []
    return [
        int(m["runnerRequestId"])
        for m in messages
        if m.get("messageType") in ("JobAssigned", "JobAvailable")
    ]


class _TimedRouter:
    """Wraps the fake's router: times each request and notes a message's job ids."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._lock = threading.Lock()
        self.timings: list[tuple[str, float, float, int, list[int]]] = []
        self.counts: Counter[str] = Counter()

    def handle(self, request: Request) -> Response | None:
        began = time.time()
        response = self._router.handle(request)
        ended = time.time()
        kind = _kind(request.method, request.path)
        status = 0 if response is None else response.status
        jobs = _job_ids(response.body) if response is not None and kind == "message" else []
        with self._lock:
            self.timings.append((kind, began, ended, status, jobs))
            self.counts[kind] += 1
        return response

    def since(self, when: float) -> list[tuple[str, float, float, int, list[int]]]:
        with self._lock:
            return [t for t in self.timings if t[2] >= when]


class _Controls:
    def __init__(self, gh: FakeGitHub) -> None:
        self.gh = gh
        server = gh._server  # the fake's HTTP server: wrapped to count and time, nothing else
        assert server is not None
        self.router = _TimedRouter(server.router)
        server.router = self.router  # type: ignore[assignment]
        self.connections = 0
        accept = server.process_request

        def counting(request: Any, client_address: Any) -> None:
            self.connections += 1  # only the serving thread accepts
            accept(request, client_address)

        server.process_request = counting  # type: ignore[method-assign]
        self._sampler: threading.Thread | None = None
        self._sampling = threading.Event()
        self.peak_running = 0
        # The scale set of the raw baseline's runners (see "jit"): left out of "state".
        self.raw_scale_set: int | None = None

    def handle(self, request: dict[str, Any]) -> Mapping[str, Any]:
        cmd = request["cmd"]
        gh = self.gh
        if cmd == "queue":
            labels = request.get("labels", ["linux"])
            duration = float(request.get("duration", 0.0))
            began = time.time()
            # Job names repeat, as a workflow's do: the metrics keep a series per job name
            # (as actions-runner-controller's), which the fake's default (job-<id>) would make
            # one per job.
            ids = [
                gh.queue_job(labels, duration=duration, display_name=JOB_NAMES[i % len(JOB_NAMES)])
                for i in range(int(request["n"]))
            ]
            return {"t": began, "ids": ids}
        if cmd == "jit":
            # JIT configs of runners in a scale set of their own that no listener serves, for
            # the raw baseline's containers: they run the same agent as outrunner's.
            if self.raw_scale_set is None:
                self.raw_scale_set = gh.create_scale_set("bench-raw", ["bench-raw"])
            names = [str(name) for name in request["names"]]
            return {"jit": [gh.generate_jit_config(self.raw_scale_set, name) for name in names]}
        if cmd == "raw_jobs":
            # A job waiting for each raw runner, so that its agent takes one as soon as it
            # connects, as outrunner's agents do: the agents of the first containers then do the
            # same work on both sides while the last ones start.
            assert self.raw_scale_set is not None, "jit first"
            duration = float(request["duration"])
            ids = [
                gh.assign_job(self.raw_scale_set, duration=duration)
                for _ in range(int(request["n"]))
            ]
            return {"ids": ids}
        if cmd == "cancel":
            for job in request["ids"]:
                gh.cancel_job(int(job))
            return {}
        if cmd == "unregister":
            # The raw baseline's runners once their containers are gone: as a real orchestrator
            # deregisters them. Otherwise each agent's connect (a 30 s long poll at the fake)
            # outlives its container, and every change of the fake's state wakes it.
            names = [str(name) for name in request["names"]]
            return {"removed": sum(gh.remove_runner(name) for name in names)}
        if cmd == "state":
            return self._state()
        if cmd == "timings":
            return {"timings": self.router.since(float(request.get("since", 0.0)))}
        if cmd == "latency":
            return {"latency": self._latency(float(request.get("since", 0.0)))}
        if cmd == "cancel_all":
            open_jobs = [j.id for j in gh.jobs() if j.state is not JobState.COMPLETED]
            for job in open_jobs:
                gh.cancel_job(job)
            return {"cancelled": len(open_jobs)}
        if cmd == "sample":
            self._start_sampling(float(request.get("interval", 0.25)))
            return {}
        if cmd == "quit":
            self._sampling.set()
            return {}
        raise ValueError(f"unknown command {cmd!r}")

    def _latency(self, since: float) -> dict[str, dict[str, float]]:
        """Per kind of request since ``since``: count, and the fake's handling time in ms
        (median, p95, max); long polls (message, agent_connect) include their wait."""
        by_kind: dict[str, list[float]] = {}
        for kind, began, ended, _, _ in self.router.since(since):
            by_kind.setdefault(kind, []).append((ended - began) * 1000)
        return {
            kind: {
                "n": len(values),
                "p50": percentile(values, 0.5),
                "p95": percentile(values, 0.95),
                "max": max(values),
            }
            for kind, values in by_kind.items()
        }

    def _state(self) -> dict[str, Any]:
        gh = self.gh
        jobs = Counter(
            str(job.state) for job in gh.jobs() if job.scale_set_id != self.raw_scale_set
        )
        runners = [r for r in gh.runners() if r.scale_set_id != self.raw_scale_set]
        sessions = gh.sessions()
        return {
            "t": time.time(),
            "jobs": dict(jobs),
            "completed": jobs.get(str(JobState.COMPLETED), 0),
            "runners": len(runners),
            "idle_runners": sum(str(r.status) == "idle" for r in runners),
            "sessions": len(sessions),
            "session_polls": {s.session_id: s.polls for s in sessions},
            "connections": self.connections,
            "requests": dict(self.router.counts),
            "peak_running": self.peak_running,
        }

    def _start_sampling(self, interval: float) -> None:
        """Track the peak number of running jobs (statistics are cheap to read)."""
        self.peak_running = 0
        if self._sampler is not None:
            return

        def sample() -> None:
            while not self._sampling.wait(interval):
                ids = [s.id for s in self.gh.scale_sets()]
                running = sum(self.gh.statistics(i).total_running_jobs for i in ids)
                self.peak_running = max(self.peak_running, running)

        self._sampler = threading.Thread(target=sample, name="bench-sampler", daemon=True)
        self._sampler.start()


def main() -> None:
    parser = argparse.ArgumentParser(description="The fake GitHub, for bench.e2e")
    parser.add_argument("--long-poll", type=float, default=50.0)
    args = parser.parse_args()
    with FakeGitHub(long_poll_timeout=args.long_poll) as gh:
        controls = _Controls(gh)
        print(json.dumps({"url": gh.url, "config_url": gh.config_url()}), flush=True)
        serve_lines(controls.handle)


if __name__ == "__main__":
    main()
