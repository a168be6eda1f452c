"""outrunner under test: the ``outrunner`` command's service path in a process of its own.

    python -m bench._service --config farm.yml --token T --state-dir D --log-file F \\
        [--log-level debug] [--agents SOCKET] [--max-runners N]

It does what :func:`outrunner.cli.main` does for ``outrunner --config farm.yml``: load the config
file, configure logging (text, to ``--log-file`` instead of stderr), build a
:class:`~outrunner.service.Service` and run it under :func:`~outrunner.service.serve` (SIGTERM
drains). Backends are the config's (:func:`~outrunner.service.default_provisioner`), or with
``--agents`` in-memory environments whose runner agents run in the agent pool process
(:mod:`bench._agents`).

Alongside it measures itself: CPU time (getrusage), resident memory and its peak (/proc), and the
event loop's lag (a 10 ms ticker). A log handler keeps the time of the records that mark a job's
way (``Desired runner count``, ``Spawning runner``, ``Container created``, ...) and every
warning. Requests arrive as JSON lines on stdin (see :func:`_Bench.handle`); answers go to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench._agents import AgentPool, AgentPoolProvisioner
from bench._proc import LagTicker, cpu_seconds, memory_mib, reset_peak_rss
from outrunner.config import RunnerConfig, load_config
from outrunner.log import configure_logging
from outrunner.provisioner import Provisioner
from outrunner.service import Service, default_provisioner, serve

# Records whose times split a job's way from its message to its runner's start.
MARKS = frozenset(
    {
        "Getting next message",
        "Desired runner count",
        "Spawning runner",
        "Container created",
        "Container started",
        "Runner provisioned",
        "Runner provisioned (job already assigned)",
        "Job started",
        "Job completed",
        "Domain created",
        "Guest agent answered",
        "Runner started in VM",
    }
)


class _Capture(logging.Handler):
    """Keeps the time and a few attributes of MARKS records, and counts warnings and errors."""

    def __init__(self, marks: bool) -> None:
        # Without marks only warnings matter: the logger then skips this handler for the rest,
        # so the harness costs outrunner's process (whose CPU is measured) nothing per line.
        super().__init__(logging.DEBUG if marks else logging.WARNING)
        self.marks = marks
        self.records: list[dict[str, Any]] = []
        self.warnings: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.msg if isinstance(record.msg, str) else record.getMessage()
        if record.levelno >= logging.WARNING:
            self.warnings[f"{record.levelname} {message}"] += 1
        if self.marks and message in MARKS:
            attrs = getattr(record, "attrs", None) or {}
            self.records.append(
                {
                    "t": record.created,
                    "msg": message,
                    "name": str(_find(attrs, "name") or ""),
                    "seconds": _find(attrs, "seconds"),
                }
            )

    def note(self, message: str, **attrs: Any) -> None:
        self.records.append({"t": time.time(), "msg": message, **attrs})


def _find(attrs: Any, key: str) -> Any:
    """``key`` in a record's attributes, also inside groups (``log.group("scaler")``)."""
    if not isinstance(attrs, dict):
        return None
    if key in attrs:
        return attrs[key]
    for value in attrs.values():
        found = _find(value, key)
        if found is not None:
            return found
    return None


class _Bench:
    def __init__(
        self,
        service: Service,
        capture: _Capture,
        ticker: LagTicker,
        stalls: list[dict[str, Any]],
    ) -> None:
        self.service = service
        self.stalls = stalls
        self.capture = capture
        self.ticker = ticker
        self.run: asyncio.Task[None] | None = None

    def usage(self) -> dict[str, Any]:
        state = self.service.state()
        return {
            "t": time.time(),
            "cpu": cpu_seconds(),
            **memory_mib(),
            "runners": state.runners,
            "busy": state.busy_runners,
            "pending_deregistrations": sum(
                len(w.scaler.pending_deregistrations()) for w in self.service.workers
            ),
            "ticker_cpu_per_s": self.ticker.cpu_per_second,
        }

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """``ready`` (wait until every scale set listens), ``usage`` (CPU, memory, runners now),
        ``mark`` (usage and the loop lag since the last mark; ``reset_peak``: start a new RSS
        peak), ``records`` (captured records
        and warnings since the last call), ``stop`` (drain and shut down like SIGTERM; answers
        once the service has stopped)."""
        cmd = request["cmd"]
        if cmd == "ready":
            await self.service.wait_ready()
            return self.usage()
        if cmd == "usage":
            return self.usage()
        if cmd == "mark":
            usage = {**self.usage(), **self.ticker.take()}
            if request.get("reset_peak"):
                usage["peak_reset"] = reset_peak_rss()
            return usage
        if cmd == "records":
            records, self.capture.records = self.capture.records, []
            return {"records": records, "warnings": dict(self.capture.warnings)}
        if cmd == "stop":
            began = time.time()
            self.service.stop(drain=bool(request.get("drain", True)))
            assert self.run is not None
            error = ""
            try:
                await self.run
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            return {
                **self.usage(),
                "shutdown_s": time.time() - began,
                "error": error,
                **self.ticker.take(),
                "warnings": dict(self.capture.warnings),
                "stalls": [
                    {"ms": stall["ms"], "where": stall["where"].most_common(4)}
                    for stall in sorted(self.stalls, key=lambda stall: -int(stall["ms"]))[:10]
                ],
            }
        raise ValueError(f"unknown command {cmd!r}")


async def _control(bench: _Bench) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        request = json.loads(line)
        try:
            answer = {"ok": True, **await bench.handle(request)}
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
        if request["cmd"] == "stop":
            return
    bench.service.stop(drain=False)  # the orchestrator went away


async def _main(args: argparse.Namespace, capture: _Capture) -> None:
    config = load_config(args.config)
    factory: Callable[[RunnerConfig], Provisioner] = default_provisioner
    pool: AgentPool | None = None
    if args.agents:
        agent_pool = pool = AgentPool(args.agents)

        def factory(runner: RunnerConfig) -> Provisioner:
            return AgentPoolProvisioner(agent_pool)

    service = Service(
        config,
        token=args.token,
        max_runners=args.max_runners,
        state_dir=args.state_dir,
        provisioner_factory=factory,
    )
    ticker = LagTicker(interval=args.tick)
    ticker.start()
    stalls = ticker.watch_stalls() if args.stall_stacks else []
    if args.tick < 0.5:
        # The ticker's own CPU (about 0.25 ms a tick on the reference machine): measured alone
        # here, so the orchestrator can leave it out of outrunner's figures.
        began, cpu = time.monotonic(), cpu_seconds()
        await asyncio.sleep(2.0)
        ticker.cpu_per_second = (cpu_seconds() - cpu) / (time.monotonic() - began)
        ticker.take()
    bench = _Bench(service, capture, ticker, stalls)
    bench.run = asyncio.create_task(serve(service), name="service")
    control = asyncio.create_task(_control(bench), name="bench-control")
    try:
        await asyncio.wait({bench.run, control}, return_when=asyncio.FIRST_COMPLETED)
        if not control.done():  # the service ended by itself (SIGTERM or a failure)
            control.cancel()
        await asyncio.gather(bench.run, return_exceptions=True)
    finally:
        await ticker.stop()
        if pool is not None:
            await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="outrunner under test, for bench.e2e")
    parser.add_argument("--config", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--log-file", required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--max-runners", type=int, default=2)
    parser.add_argument("--agents", default="")
    parser.add_argument("--tick", type=float, default=0.01, help="lag ticker interval, s")
    parser.add_argument("--stall-stacks", action="store_true", help="note stacks of stalls")
    parser.add_argument("--docker-workers", type=int, default=0, help="what-if: pool size")
    parser.add_argument("--marks", action="store_true", help="keep the times of MARKS records")
    args = parser.parse_args()
    with open(args.log_file, "a", encoding="utf-8") as log:
        configure_logging(args.log_level, "text", log)
        capture = _Capture(args.marks)
        logging.getLogger("outrunner").addHandler(capture)
        if args.docker_workers:
            # A what-if for diagnosis: the Docker backend's thread pool size.
            import outrunner.provisioners.docker as docker_backend

            docker_backend.DEFAULT_WORKERS = args.docker_workers  # type: ignore[misc]
        print(json.dumps({"pid": os.getpid()}), flush=True)
        asyncio.run(_main(args, capture))


if __name__ == "__main__":
    main()
