"""Fail safe and loud (issue 10), end to end with real Docker: examples/run.py against FakeGitHub.

A revoked token stops only its own scale set; the other keeps serving.

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


def test_revoking_one_token_mid_run_keeps_the_other_scale_set_serving(
    engine: Any, runner_image: str, tmp_path: Path
) -> None:
    """Two scale sets on two URLs. One token is revoked mid-run, while that scale set's runner
    runs a job: the job finishes, that scale set stops with the cause in the log, the other
    keeps serving; after SIGTERM the process exits 1 with one error line."""
    with (
        FakeGitHub(pat=TOKEN, long_poll_timeout=1.0) as kept,
        FakeGitHub(pat=TOKEN, long_poll_timeout=1.0) as revoked,
    ):
        config = tmp_path / "farm.yml"
        docker = f"    docker: {{image: {runner_image}, network: host, pull: never}}\n"
        config.write_text(
            "runners:\n"
            "  e2e-kept:\n"
            f"    url: {kept.config_url()}\n"
            "    labels: [self-hosted, kept]\n"
            f"{docker}"
            "  e2e-revoked:\n"
            f"    url: {revoked.config_url()}\n"
            "    labels: [self-hosted, revoked]\n"
            f"{docker}"
        )
        with run_script(config, {**os.environ, "GITHUB_TOKEN": TOKEN}) as script:
            kept.wait_for(lambda: len(kept.sessions()) == 1, timeout=60)
            revoked.wait_for(lambda: len(revoked.sessions()) == 1, timeout=60)
            busy = revoked.queue_job(["revoked"], duration=4.0)
            revoked.wait_for(lambda: revoked.job(busy).runner_name is not None, timeout=60)
            revoked.revoke_credentials()
            revoked.wait_for(lambda: revoked.job(busy).result is not None, timeout=60)
            for n in range(3):
                kept.queue_job(["kept"], duration=0.5, display_name=f"kept {n}")
            completed = kept.wait_until_jobs_completed(3, timeout=120)
            assert [job.result for job in completed] == ["succeeded"] * 3
            status, output = script.sigterm(timeout=120)
        assert revoked.job(busy).result == "succeeded"
        assert status == 1, output[-3000:]
        assert "Scale set stopped: an error that waiting will not fix" in output
        assert "Scale set stopped; the others keep serving" in output
        assert output.strip().splitlines()[-1].startswith("outrunner: error: ")
        assert "401" in output.strip().splitlines()[-1]
        assert kept.sessions() == []
        assert kept.runners() == []
        for scale_set in ("e2e-kept", "e2e-revoked"):
            left = engine.containers(all=True, filters={"label": f"outrunner.scaleset={scale_set}"})
            assert left == []
