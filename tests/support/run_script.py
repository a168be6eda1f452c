"""examples/run.py as a subprocess against a FakeGitHub: the harness of the end-to-end tests.

The script's output goes to a file, not a pipe: a long run with debug logs would fill a pipe
nobody reads until the end, and the script would block writing its log.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from outrunner.testing.fakegithub import FakeGitHub, JobInfo

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "run.py"


class RunScript:
    def __init__(self, process: subprocess.Popen[str], log: IO[str]) -> None:
        self.process = process
        self._log = log

    def output(self) -> str:
        """Everything printed so far (stdout and stderr)."""
        self._log.flush()
        return Path(self._log.name).read_text(encoding="utf-8", errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        """Wait for the exit; return the exit status and everything printed."""
        self.process.wait(timeout=timeout)
        return self.process.returncode, self.output()

    def sigterm(self, timeout: float = 60) -> tuple[int, str]:
        """Send SIGTERM, wait for the exit; return the exit status and everything printed."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> str:
        """SIGKILL, as a crash or ``kill -9`` would: nothing of outrunner runs afterwards."""
        self.process.kill()
        self.process.wait(timeout=30)
        return self.output()


@contextmanager
def run_script(
    config: Path, env: Mapping[str, str], *, args: Sequence[str] = ()
) -> Iterator[RunScript]:
    """Start ``run.py --config config`` (debug logs, stderr folded into stdout); kill it on the
    way out if the test did not stop it."""
    with tempfile.NamedTemporaryFile("w+", prefix="run-py-", suffix=".log") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                "--config",
                str(config),
                "--log-level",
                "debug",
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(env),
        )
        try:
            yield RunScript(process, log)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def docker_farm(gh: FakeGitHub, path: Path, *, scale_set: str, label: str, image: str) -> Path:
    """Write a config with one Docker scale set (labels ``self-hosted`` and ``label``, 3 runners
    at most) whose containers use the host network, so their agents reach the fake on
    127.0.0.1, and never pull (the image is built offline). Returns ``path``."""
    path.write_text(
        f"url: {gh.config_url()}\n"
        "runners:\n"
        f"  {scale_set}:\n"
        f"    labels: [self-hosted, {label}]\n"
        "    max_runners: 3\n"
        "    docker:\n"
        f"      image: {image}\n"
        "      network: host\n"
        "      pull: never\n"
    )
    return path


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
