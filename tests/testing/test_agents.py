"""The runner agents as processes: ``python -m outrunner.testing.agent`` and ``agent.sh`` under
dash (with GNU wget) and busybox sh (with busybox applets only)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from outrunner.testing.agent import SHELL_AGENT
from outrunner.testing.agent import main as agent_main
from outrunner.testing.fakegithub import Endpoint, FakeGitHub, JobState
from tests.testing.raw import Raw
from tests.testing.shells import busybox, clean_env, dash


def _ready(gh: FakeGitHub, raw: Raw, display_name: str = "build and test") -> tuple[int, int]:
    """A scale set whose listener has polled, with one assigned job; returns (scale set, job)."""
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    job = gh.queue_job(["linux"], duration=0.1, result="succeeded", display_name=display_name)
    assert raw.poll(session).status_code == 200
    return scale_set_id, job


def _run(argv: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20, check=False)


def _check_success(
    gh: FakeGitHub, job: int, encoded: str, done: subprocess.CompletedProcess[str]
) -> None:
    assert done.returncode == 0, done.stderr
    assert "completed with result: succeeded" in done.stdout
    assert "build and test" in done.stdout
    assert encoded not in done.stdout + done.stderr
    assert gh.job(job).state is JobState.COMPLETED
    assert gh.job(job).result == "succeeded"


def _error_line(stderr: str) -> str:
    # The last line: python -m may print runpy warnings first (see outrunner/testing/__init__).
    return stderr.strip().splitlines()[-1]


def _check_reuse_refused(encoded: str, done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 1
    line = _error_line(done.stderr)
    assert line.startswith("outrunner-agent: error: connect refused")
    assert "409" in line
    assert encoded not in done.stdout + done.stderr


def test_python_agent_process(gh: FakeGitHub, raw: Raw) -> None:
    scale_set_id, job = _ready(gh, raw)
    encoded = gh.generate_jit_config(scale_set_id, "py-agent")
    argv = [sys.executable, "-m", "outrunner.testing.agent", "--poll-timeout", "2"]
    # The JIT config from the environment, as the real runner's run.sh takes it...
    done = _run(argv, clean_env(ACTIONS_RUNNER_INPUT_JITCONFIG=encoded))
    _check_success(gh, job, encoded, done)
    # ... or from the flag.
    _check_reuse_refused(encoded, _run([*argv, "--jitconfig", encoded], clean_env()))


def test_python_agent_usage_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ACTIONS_RUNNER_INPUT_JITCONFIG", raising=False)
    assert agent_main([]) == 2
    assert "ACTIONS_RUNNER_INPUT_JITCONFIG" in capsys.readouterr().err
    assert agent_main(["--jitconfig", "x"]) == 1
    assert capsys.readouterr().err.startswith("outrunner-agent: error: the JIT config")
    monkeypatch.setenv("ACTIONS_RUNNER_INPUT_JITCONFIG", base64.b64encode(b"[1]").decode())
    assert agent_main([]) == 1
    assert "not a JSON object" in capsys.readouterr().err
    nowhere = {"url": "http://127.0.0.1:9", "runner_id": 1, "runner_name": "r", "scale_set_id": 1}
    encoded = base64.b64encode(json.dumps({**nowhere, "credential": "c"}).encode()).decode()
    started = time.monotonic()
    # Connection refused is retried for --retry-for seconds, then reported.
    assert agent_main(["--jitconfig", encoded, "--retry-for", "0.5"]) == 1
    assert 0.5 <= time.monotonic() - started < 3.0
    error = capsys.readouterr().err
    assert error.startswith("outrunner-agent: error: POST http://127.0.0.1:9/_agent/connect failed")
    assert encoded not in error


def _shell_agent_end_to_end(
    gh: FakeGitHub, raw: Raw, shell: Sequence[str], env: dict[str, str]
) -> None:
    scale_set_id = raw.create_scale_set()
    session = raw.create_session(scale_set_id)
    encoded = gh.generate_jit_config(scale_set_id, "sh-agent")
    # Started before there is a job: it must keep reconnecting on 204.
    agent = subprocess.Popen(
        [*shell, str(SHELL_AGENT), "--poll-timeout", "0.1"],
        env={**env, "ACTIONS_RUNNER_INPUT_JITCONFIG": encoded},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        gh.wait_for(
            lambda: [r.status for r in gh.requests_to(Endpoint.AGENT_CONNECT)].count(204) >= 2,
            timeout=10,
        )
        job = gh.queue_job(["linux"], duration=0.1, display_name="build and test")
        assert raw.poll(session).status_code == 200  # the first poll assigns the job
        stdout, stderr = agent.communicate(timeout=20)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    done = subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr)
    _check_success(gh, job, encoded, done)
    _check_reuse_refused(encoded, _run([*shell, str(SHELL_AGENT), "--jitconfig", encoded], env))

    missing = _run([*shell, str(SHELL_AGENT)], env)
    assert missing.returncode == 2
    assert "ACTIONS_RUNNER_INPUT_JITCONFIG" in missing.stderr
    bad = _run([*shell, str(SHELL_AGENT), "--bogus"], env)
    assert (bad.returncode, "unknown argument" in bad.stderr) == (2, True)
    nowhere = base64.b64encode(
        json.dumps({"url": "http://127.0.0.1:9", "credential": "c", "runner_id": 1}).encode()
    ).decode()
    unreachable = _run([*shell, str(SHELL_AGENT), "--jitconfig", nowhere, "--retry-for", "0"], env)
    assert unreachable.returncode == 1
    assert "connect failed: cannot reach http://127.0.0.1:9" in _error_line(unreachable.stderr)
    assert "retrying" not in unreachable.stderr
    bad_retry = _run([*shell, str(SHELL_AGENT), "--jitconfig", nowhere, "--retry-for", "x"], env)
    assert (bad_retry.returncode, "--retry-for" in bad_retry.stderr) == (2, True)


def test_shell_agent_under_dash(gh: FakeGitHub, raw: Raw) -> None:
    shell = dash()
    _shell_agent_end_to_end(gh, raw, shell.argv, shell.env)


def test_shell_agent_under_busybox(gh: FakeGitHub, raw: Raw, tmp_path: Path) -> None:
    shell = busybox(tmp_path)
    _shell_agent_end_to_end(gh, raw, shell.argv, shell.env)
