"""What the end-to-end benchmark's processes share: reading a process's own CPU time and memory,
an event-loop lag ticker, and a JSON-lines request/answer channel to a child process.

Every benchmark process (the fake GitHub, the runner agents, outrunner itself) is a child of the
orchestrator (:mod:`bench.e2e`) that answers one JSON object per line on stdout for each JSON
request it reads on stdin, so the orchestrator measures outrunner's process alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = [
    "Child",
    "ChildError",
    "LagTicker",
    "cpu_seconds",
    "machine_busy_cores",
    "memory_mib",
    "percentile",
    "reset_peak_rss",
    "serve_lines",
    "wait_for_quiet_machine",
]


def cpu_seconds() -> float:
    """User plus system CPU time of this process so far (every thread, not its children)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_ticks() -> tuple[int, int]:
    """All and idle (idle + iowait) CPU ticks of the machine so far, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]  # guest time is in user already
    return sum(values), values[3] + values[4]


def machine_busy_cores(window: float) -> float:
    """How many cores the whole machine kept busy, on average, over the next ``window`` s."""
    total, idle = _cpu_ticks()
    time.sleep(window)
    total_after, idle_after = _cpu_ticks()
    ticks = total_after - total
    if ticks <= 0:
        return 0.0
    return (ticks - (idle_after - idle)) / ticks * (os.cpu_count() or 1)


def wait_for_quiet_machine(
    max_busy: float = 0.25, timeout: float = 30.0, window: float = 1.0
) -> float:
    """Write back what is dirty (``sync``), then wait until the machine keeps at most
    ``max_busy`` cores busy over ``window``; returns the seconds waited (``timeout`` at most).

    After 50 containers are removed, the kernel goes on releasing their cgroups and writing back
    their layers' removal for seconds (``kworker`` threads at 1-2 cores on the reference
    machine): a burst measured straight after would pay for the one before it.
    """
    began = time.monotonic()
    os.sync()
    while time.monotonic() - began < timeout:
        if machine_busy_cores(window) <= max_busy:
            break
    return time.monotonic() - began


def memory_mib() -> dict[str, float]:
    """This process's resident set now (``rss``) and its peak (``hwm``), in MiB, from
    /proc/self/status (VmRSS, VmHWM)."""
    values: dict[str, float] = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values["rss" if key == "VmRSS" else "hwm"] = int(rest.split()[0]) / 1024
    return values


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``5`` into /proc/self/clear_refs), so the
    next peak is that of the work that follows. False where the kernel refuses it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of ``values``; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class LagTicker:
    """Event-loop lag: a task that sleeps ``interval`` seconds in a loop and records how late
    each wake-up was. A callback that holds the loop for 200 ms shows as a 200 ms sample."""

    interval: float = 0.01
    samples: list[float] = field(default_factory=list)
    cpu_per_second: float = 0.0
    """The ticker's own CPU time per second, where it was measured (else 0)."""
    _task: asyncio.Task[None] | None = None

    gc_pauses: list[tuple[int, float]] = field(default_factory=list)
    """(generation, seconds) of each garbage collection since the last :meth:`take`."""
    _gc_began: float = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick(), name="bench-lag-ticker")
        # The cyclic collector stops the process (the GIL is held throughout): a stall with no
        # frame of outrunner's to blame.
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_began = time.perf_counter()
        else:
            self.gc_pauses.append((info["generation"], time.perf_counter() - self._gc_began))

    async def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def take(self) -> dict[str, float]:
        """Max, p99 and count of samples (ms) since the last call; starts a new window."""
        samples, self.samples = self.samples, []
        pauses, self.gc_pauses = self.gc_pauses, []
        oldest = [seconds for generation, seconds in pauses if generation == 2]
        return {
            "gc_max_ms": max((seconds for _, seconds in pauses), default=0.0) * 1000,
            "gc_full_collections": float(len(oldest)),
            "gc_full_max_ms": max(oldest, default=0.0) * 1000,
            "gc_total_ms": sum(seconds for _, seconds in pauses) * 1000,
            "lag_max_ms": max(samples, default=0.0) * 1000,
            "lag_p99_ms": percentile(samples, 0.99) * 1000,
            "lag_over_100ms": float(sum(s > 0.1 for s in samples)),
            "lag_samples": float(len(samples)),
        }

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            self.last_tick = time.monotonic()
            await asyncio.sleep(self.interval)
            self.samples.append(max(0.0, loop.time() - began - self.interval))

    last_tick: float = 0.0

    def watch_stalls(self, threshold: float = 0.1) -> list[dict[str, Any]]:
        """Start a thread that samples the loop thread's stack every 20 ms while the loop has
        not ticked for ``threshold`` seconds; each stall is added to the returned list with its
        length (a lower bound) and where its samples were: the callback the loop was running
        and the innermost outrunner frame. For diagnosis: it costs a wake-up every 20 ms."""
        stalls: list[dict[str, Any]] = []
        loop_thread = threading.get_ident()

        def where() -> str:
            frame = sys._current_frames().get(loop_thread)
            stack = traceback.extract_stack(frame) if frame is not None else []
            names = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in stack]
            runs = [i for i, f in enumerate(stack) if f.name == "_run" and "events" in f.filename]
            root = names[runs[-1] + 1] if runs and runs[-1] + 1 < len(names) else "?"
            ours = [n for f, n in zip(stack, names, strict=True) if "/outrunner/" in f.filename]
            return f"{root} ... {ours[-1] if ours else names[-1] if names else '?'}"

        def watch() -> None:
            current: dict[str, Any] | None = None
            while True:
                time.sleep(0.02)
                last = self.last_tick
                late = time.monotonic() - last - self.interval
                if late < threshold:
                    current = None
                    continue
                if current is None or current["tick"] != last:
                    current = {"tick": last, "ms": 0, "where": Counter()}
                    stalls.append(current)
                current["ms"] = round(late * 1000)
                current["where"][where()] += 1

        threading.Thread(target=watch, name="bench-stall-watch", daemon=True).start()
        return stalls


Handler = Callable[[dict[str, Any]], Mapping[str, Any]]


def serve_lines(handle: Handler, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """Answer JSON requests, one per line, until stdin closes or a request says ``quit``.

    Each answer is ``{"ok": true, ...}`` with what ``handle`` returned, or ``{"ok": false,
    "error": ...}`` when it raised. For children whose work runs in threads (the fake)."""
    for line in stdin:
        request = json.loads(line)
        try:
            answer: dict[str, Any] = {"ok": True, **handle(request)}
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        stdout.write(json.dumps(answer) + "\n")
        stdout.flush()
        if request.get("cmd") == "quit":
            return


class ChildError(RuntimeError):
    """A benchmark child process failed, answered an error or did not answer in time."""


class Child:
    """A benchmark process driven over JSON lines (stdin requests, stdout answers).

    It runs in its own session, so a Ctrl-C at the terminal reaches only the orchestrator, which
    then shuts its children down in order (:meth:`close`). Its stderr goes to ``log_path``.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: str,
        *,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix``: a command the child's Python runs under (``nice``, ``taskset``)."""
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [*prefix, sys.executable, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            start_new_session=True,
            env=None if env is None else dict(env),
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"bench-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """The child's user plus system CPU time so far (/proc/PID/stat), 0 once it is gone."""
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def receive(self, timeout: float) -> dict[str, Any]:
        """The next line the child prints (its start-up line or an answer)."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise ChildError(f"{self.name}: no answer within {timeout:g} s") from None
        if line is None:
            raise ChildError(f"{self.name} exited ({self.process.wait()}); see {self.log_path}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def request(self, cmd: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        """Send one request and return the answer; raises ChildError on an error answer."""
        stdin = self.process.stdin
        if stdin is None or self.process.poll() is not None:
            raise ChildError(f"{self.name} is not running; see {self.log_path}")
        try:
            stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
            stdin.flush()
        except OSError as exc:
            raise ChildError(f"{self.name}: cannot send {cmd}: {exc}") from exc
        answer = self.receive(timeout)
        if not answer.get("ok", False):
            raise ChildError(f"{self.name}: {cmd} failed: {answer.get('error')}")
        return answer

    def close(self, timeout: float = 30.0) -> int | None:
        """Ask the child to quit (closing its stdin), then SIGTERM, then SIGKILL; reap it."""
        process = self.process
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        for sig, wait in ((None, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)
            try:
                status = process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            status = None
        self._log.close()
        return status


def now() -> float:
    """Wall-clock seconds (the clock Docker's event times and log records use)."""
    return time.time()
