"""examples/run.py as a subprocess against a FakeGitHub: the harness of the end-to-end tests."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from outrunner.testing.fakegithub import FakeGitHub, JobInfo

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "run.py"


class RunScript:
    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    def sigterm(self, timeout: float = 60) -> tuple[int, str]:
        """Send SIGTERM, wait for the exit; return the exit status and everything printed."""
        self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=timeout)
        return self.process.returncode, output


@contextmanager
def run_script(config: Path, env: Mapping[str, str]) -> Iterator[RunScript]:
    """Start ``run.py --config config`` (debug logs, stderr folded into stdout); kill it on the
    way out if the test did not stop it."""
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--config", str(config), "--log-level", "debug"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(env),
    )
    try:
        yield RunScript(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def run_jobs(
    gh: FakeGitHub,
    labels: Sequence[str],
    count: int,
    *,
    duration: float,
    timeout: float = 180,
) -> list[JobInfo]:
    """Once the script listens, queue ``count`` jobs; wait until all completed and every runner
    was deregistered (so a SIGTERM afterwards meets an idle service)."""
    gh.wait_for(lambda: len(gh.sessions()) == 1, timeout=30)
    for n in range(count):
        gh.queue_job(labels, duration=duration, display_name=f"e2e job {n}")
    completed = gh.wait_until_jobs_completed(count, timeout=timeout)
    gh.wait_for(lambda: gh.runners() == [], timeout=60)
    return completed
