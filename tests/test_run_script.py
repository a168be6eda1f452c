"""examples/run.py as a user runs it: a subprocess, its exit status and what it prints.

Logs go to stderr, so an error is the *last* stderr line; the command's own output (the demo
summary) is on stdout. The installed ``outrunner`` command runs the same code (tests/test_cli.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import outrunner
from tests.scaleset.scripted_server import ScriptedServer, self_signed_certificate
from tests.support.faketart import FakeTart

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "run.py"


def run(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the script; ``env`` replaces the whole environment (None: inherit ours)."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"outrunner {outrunner.__version__}"


def error_line(stderr: str) -> str:
    """The error a run ended with: stderr's last line (log lines come before it)."""
    lines = stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("outrunner: error: "), stderr
    return lines[-1]


def test_missing_config_is_one_clear_line(tmp_path: Path) -> None:
    result = run("--config", str(tmp_path / "nope.yml"))
    assert result.returncode == 78  # EX_CONFIG
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("outrunner: error: ")
    assert "nope.yml" in lines[0]


def test_bad_config_names_file_key_and_value(tmp_path: Path) -> None:
    config = tmp_path / "farm.yml"
    config.write_text(
        "url: https://github.com/org\nrunners:\n  linux:\n    labels: [linux]\n"
        '    max_runners: "2"\n    docker: {image: x}\n'
    )
    result = run("--config", str(config))
    assert result.returncode == 78
    assert "Traceback" not in result.stderr
    assert "farm.yml" in result.stderr
    assert "runners.linux.max_runners" in result.stderr
    assert '"2"' in result.stderr


def test_missing_token_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "farm.yml"
    config.write_text(
        "url: https://github.com/org\nrunners:\n  linux:\n    labels: [linux]\n"
        "    docker: {image: x}\n"
    )
    result = run("--config", str(config), timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 78
    assert "Traceback" not in result.stderr
    assert "token" in error_line(result.stderr).lower()


def test_demo_runs_every_job_and_leaves_nothing() -> None:
    result = run("--demo", "--demo-jobs", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "jobs:                4 (succeeded=4)" in result.stdout
    assert "leftover runners:    0" in result.stdout
    assert "verdict:             OK" in result.stdout


def test_unreachable_backend_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "farm.yml"
    # Loopback URL on a closed port: nothing leaves the machine even if cleanup passed.
    config.write_text(
        "url: http://127.0.0.1:9/org\nrunners:\n  linux:\n    labels: [linux]\n"
        "    docker: {image: x, host: 'unix:///nonexistent/docker.sock'}\n"
    )
    result = run(
        "--config",
        str(config),
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "GITHUB_TOKEN": "ghp_notARealToken0123456789"},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "/nonexistent/docker.sock" in error_line(result.stderr)
    assert "ghp_notARealToken0123456789" not in result.stdout + result.stderr


@pytest.mark.parametrize("trust", ["system", "ca_file"])
def test_untrusted_certificate_ends_start_up_with_one_line(tmp_path: Path, trust: str) -> None:
    """A self-signed server: exit 1 at once (not "GitHub unreachable" forever), and a line that
    says "certificate", names the URL and what the certificate was checked against."""
    server_cert = self_signed_certificate(tmp_path)
    other_cert = self_signed_certificate(tmp_path, "other")  # a CA file that does not match
    tart = FakeTart.install(tmp_path / "tart")  # a backend that needs no daemon
    token = "ghp_notARealToken0123456789"
    with ScriptedServer(tls=server_cert.server_context()) as server:
        config = tmp_path / "farm.yml"
        config.write_text(
            f"url: {server.url}/org/repo\n"
            + (f"ca_file: {other_cert.cert}\n" if trust == "ca_file" else "")
            + "runners:\n  linux:\n    labels: [linux]\n"
            + f"    tart: {{image: base, tart_path: '{tart.bin_dir / 'tart'}'}}\n"
        )
        result = run(
            "--config",
            str(config),
            "--state-dir",
            str(tmp_path / "state"),
            timeout=60,
            env=tart.env({"PATH": "/usr/bin:/bin"}, GITHUB_TOKEN=token),
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("outrunner: ")]
    assert len(errors) == 1, result.stderr
    lines = [error_line(result.stderr)]
    token_url = f"{server.url}/api/v3/repos/org/repo/actions/runners/registration-token"
    assert lines[0].startswith(f"outrunner: error: request POST {token_url} failed: ")
    assert "TLS certificate verification failed: self-signed certificate" in lines[0]
    roots = "the system trust store" if trust == "system" else f"CA file {other_cert.cert}"
    assert lines[0].endswith(f"(trusted roots: {roots})")
    assert server.connections == 1  # not retried
    assert token not in result.stdout + result.stderr
