"""End to end: examples/run.py as a subprocess, FakeGitHub on 127.0.0.1, real Docker containers.

Each container runs the busybox shell agent with host networking, so it reaches the fake GitHub,
takes its job and reports it. A watcher thread polls the engine throughout and records every
container it sees, which is how "at most 3 at any moment" and "the PAT is in no container" are
checked.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from outrunner.testing import FakeGitHub
from tests.support.run_script import docker_farm, run_jobs, run_script

pytestmark = pytest.mark.docker

TOKEN = "ghp_e2eSecretToken_9f8e7d6c5b4a39281706"
SCALE_SET = "e2e-docker"


class ContainerWatcher(threading.Thread):
    """Polls the engine for this scale set's containers; remembers peaks and what it saw."""

    def __init__(self, client: Any) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.stop_event = threading.Event()
        self.peak = 0
        self.seen: dict[str, dict[str, Any]] = {}

    def run(self) -> None:
        while not self.stop_event.wait(0.05):
            try:
                containers = self.client.containers(
                    all=True, filters={"label": f"outrunner.scaleset={SCALE_SET}"}
                )
                self.peak = max(self.peak, len(containers))
                for container in containers:
                    if container["Id"] not in self.seen:
                        self.seen[container["Id"]] = self.client.inspect_container(container["Id"])
            except Exception:  # gone between list and inspect, or the engine is busy
                continue


def test_six_jobs_three_runners_sigterm_and_no_leftovers(
    engine: Any, runner_image: str, tmp_path: Path
) -> None:
    with FakeGitHub(pat=TOKEN, long_poll_timeout=1.0) as gh:
        config = docker_farm(
            gh, tmp_path / "farm.yml", scale_set=SCALE_SET, label="e2e", image=runner_image
        )
        watcher = ContainerWatcher(engine)
        watcher.start()
        try:
            with run_script(config, {**os.environ, "GITHUB_TOKEN": TOKEN}) as script:
                completed = run_jobs(gh, ["e2e"], 6, duration=1.0)
                status, output = script.sigterm()
        finally:
            watcher.stop_event.set()
            watcher.join()

        assert status == 0, output
        assert [job.result for job in completed] == ["succeeded"] * 6
        assert len({job.runner_name for job in completed}) == 6
        assert gh.sessions() == []
        assert gh.runners() == []
        assert 1 <= watcher.peak <= 3
        assert len(watcher.seen) == 6
        left = engine.containers(all=True, filters={"label": f"outrunner.scaleset={SCALE_SET}"})
        assert left == []
        # The PAT reaches neither a container nor a log line.
        for attrs in watcher.seen.values():
            assert TOKEN not in json.dumps(attrs["Config"])
        assert TOKEN not in output
        assert "Shut down cleanly" in output
