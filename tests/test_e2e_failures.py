"""Fail safe and loud (issue 10), end to end with real Docker: examples/run.py against FakeGitHub.

An image that cannot be pulled (its registry is 127.0.0.1:1, so the engine never reaches out)
must not turn every demand signal into a registration at GitHub: starts back off, 1 s doubling,
one probe at a time, and the log names the image.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from outrunner.testing import Endpoint, FakeGitHub
from tests.support.run_script import run_script

pytestmark = pytest.mark.docker

TOKEN = "ghp_e2eFailuresToken_9a8b7c6d5e4f30211"
SCALE_SET = "e2e-unpullable"
IMAGE = "127.0.0.1:1/outrunner/unpullable:latest"


def test_an_image_that_cannot_be_pulled_backs_off_and_is_named(engine: Any, tmp_path: Path) -> None:
    with FakeGitHub(pat=TOKEN, long_poll_timeout=1.0) as gh:
        config = tmp_path / "farm.yml"
        config.write_text(
            f"url: {gh.config_url()}\n"
            "runners:\n"
            f"  {SCALE_SET}:\n"
            "    labels: [self-hosted, unpullable]\n"
            "    max_runners: 3\n"
            "    docker:\n"
            f"      image: {IMAGE}\n"
            "      network: none\n"
        )
        with run_script(config, {**os.environ, "GITHUB_TOKEN": TOKEN}) as script:
            gh.wait_for(lambda: len(gh.sessions()) == 1, timeout=60)
            for n in range(3):
                gh.queue_job(["unpullable"], display_name=f"waits {n}")
            time.sleep(60)
            registrations = len(gh.requests_to(Endpoint.GENERATE_JIT))
            status, output = script.sigterm(timeout=90)
        assert status == 0, output[-3000:]
        # 3 at first, then one probe per backoff (1, 2, 4, 8, 16, 32 s): far under 25.
        assert 3 <= registrations <= 25, registrations
        failures = [line for line in output.splitlines() if "Failed to start runner" in line]
        assert len(failures) == registrations
        assert all(f"image={IMAGE}" in line for line in failures), failures[:3]
        assert gh.runners() == []
        assert gh.sessions() == []
        left = engine.containers(all=True, filters={"label": f"outrunner.scaleset={SCALE_SET}"})
        assert left == []
