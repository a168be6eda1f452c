"""A farm authenticated as a GitHub App, end to end: the config's ``app:`` key, ``outrunner
--check``, and a Service running jobs against FakeGitHub, which verifies every JWT against the
App's public key. No PAT exists anywhere in these runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from outrunner.config import load_config
from outrunner.service import Service
from outrunner.testing import Endpoint, FakeGitHub, InMemoryProvisioner
from outrunner.testing.fakegithub import generate_key_pair
from tests.test_service import memory_factory, running

pytestmark = pytest.mark.anyio

CLIENT_ID = "Iv23liAppTest0001"
INSTALLATION = 4242


@pytest.fixture(scope="module")
def key_pair() -> tuple[str, str]:
    return generate_key_pair()


def write_farm(tmp_path: Path, url: str, private_key: str) -> Path:
    key = tmp_path / "app.pem"
    key.write_text(private_key)
    key.chmod(0o600)
    config = tmp_path / "farm.yml"
    config.write_text(
        f"url: {url}\n"
        f"app: {{client_id: {CLIENT_ID}, installation_id: {INSTALLATION}, "
        "private_key_file: app.pem}\n"
        "runners:\n  linux:\n    labels: [linux]\n    max_runners: 2\n"
        "    docker: {image: unused:latest}\n"
    )
    return config


def test_check_names_the_app_as_the_credential(tmp_path: Path, key_pair: tuple[str, str]) -> None:
    config = write_farm(tmp_path, "https://github.com/my-org", key_pair[0])
    result = subprocess.run(
        [sys.executable, "-m", "outrunner", "--check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "GITHUB_TOKEN": "ghp_leftoverPersonalToken0123"},
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith(
        f"linux: https://github.com/my-org, GitHub App {CLIENT_ID} installation {INSTALLATION}"
    )
    # The leftover personal token is not used, and the operator is told so.
    assert "A token is set but the config's GitHub App is used instead" in result.stderr
    assert "token_source=GITHUB_TOKEN" in result.stderr
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    assert "ghp_leftover" not in result.stdout + result.stderr


async def test_a_service_runs_jobs_as_an_app(tmp_path: Path, key_pair: tuple[str, str]) -> None:
    private_key, public_key = key_pair
    async with FakeGitHub(pat="ghp_nobodyHasThisToken0123", long_poll_timeout=0.5) as gh:
        gh.add_app(CLIENT_ID, INSTALLATION, public_key)
        config = load_config(write_farm(tmp_path, gh.config_url(), private_key))
        provisioners: dict[str, InMemoryProvisioner] = {}
        service = Service(config, provisioner_factory=memory_factory(provisioners), journal=False)
        async with running(service):
            for _ in range(3):
                gh.queue_job(["linux"], duration=0.05)
            jobs = await gh.wait_until_jobs_completed_async(3, timeout=30)
        assert [job.result for job in jobs] == ["succeeded"] * 3
        # One installation token served the whole run (it lasts an hour).
        assert len(gh.requests_to(Endpoint.APP_ACCESS_TOKEN)) == 1
        assert gh.runners() == []
        assert gh.sessions() == []
