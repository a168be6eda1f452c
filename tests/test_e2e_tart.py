"""End to end: examples/run.py as a subprocess, FakeGitHub on 127.0.0.1, the fake tart CLI.

The fake's ``tart exec`` runs its command on the host, so the runner command (a script that
starts ``python -m outrunner.testing.agent``) really takes its job from the fake GitHub and
reports it. The fake records every tart call, which is how each runner's lifecycle is checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

from outrunner.provisioners.tart import _JIT_WRAPPER
from outrunner.testing import FakeGitHub
from outrunner.testing.agent import AgentError, decode_jit_config
from tests.support.faketart import FakeTart, Invocation
from tests.support.run_script import run_jobs, run_script

TOKEN = "ghp_e2eTartSecretToken_0a9b8c7d6e5f4321"
SCALE_SET = "e2e-tart"
IMAGE = "ghcr.io/cirruslabs/ubuntu-runner-arm64:latest"


def lifecycle_of(name: str, calls: list[Invocation]) -> list[tuple[str, ...]]:
    """The runner's calls, boot probes folded into one, the runner's wrapper script named."""
    steps: list[tuple[str, ...]] = []
    for call in calls:
        if name not in call.argv:
            continue
        argv = call.argv
        if argv[:5] == ("exec", "-i", name, "/bin/sh", "-c"):
            assert argv[5] == _JIT_WRAPPER
            argv = (*argv[:5], "<wrapper>", *argv[6:])
        if argv == ("exec", name, "echo", "ok"):
            if call.status != 0:
                continue  # still booting
            argv = ("probe", name)
        steps.append(argv)
    return steps


def is_jit_config(word: str) -> bool:
    try:
        decode_jit_config(word)
    except AgentError:
        return False
    return True


def test_three_jobs_two_runners_sigterm_and_no_leftovers(tmp_path: Path) -> None:
    fake = FakeTart.install(tmp_path / "tart")
    runner_cmd = tmp_path / "run.sh"
    runner_cmd.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m outrunner.testing.agent "$@"\n')
    runner_cmd.chmod(0o755)
    temp = tmp_path / "temp"  # the default capture log dir lives under TMPDIR
    temp.mkdir()
    with FakeGitHub(pat=TOKEN, long_poll_timeout=1.0) as gh:
        config = tmp_path / "farm.yml"
        config.write_text(
            f"url: {gh.config_url()}\n"
            "runners:\n"
            f"  {SCALE_SET}:\n"
            "    labels: [self-hosted, arm64]\n"
            "    max_runners: 2\n"
            "    tart:\n"
            f"      image: {IMAGE}\n"
            f"      runner_cmd: {runner_cmd}\n"
            "      cpus: 2\n"
            "      memory: 2048\n"
            "      boot_timeout: 30\n"
        )
        env = fake.env(GITHUB_TOKEN=TOKEN, FAKE_TART_BOOT_DELAY="0.3", TMPDIR=str(temp))
        with run_script(config, env) as script:
            completed = run_jobs(gh, ["arm64"], 3, duration=0.5, timeout=120)
            status, output = script.sigterm()

        assert status == 0, output
        assert [job.result for job in completed] == ["succeeded"] * 3
        names = {job.runner_name or "" for job in completed}
        assert len(names) == 3
        assert "" not in names
        assert gh.sessions() == []
        assert gh.runners() == []

    calls = fake.invocations()
    assert calls[0].argv == ("list", "--source", "local", "--quiet"), "orphan cleanup first"
    for name in names:
        assert lifecycle_of(name, calls) == [
            ("clone", IMAGE, name),
            ("set", name, "--cpu", "2", "--memory", "2048"),
            ("run", "--no-graphics", name),
            ("probe", name),
            ("exec", "-i", name, "/bin/sh", "-c", "<wrapper>", str(runner_cmd)),
            ("stop", "--timeout", "30", name),
            ("delete", name),
        ], name
    # The runner may still be exiting when JobCompleted arrives and stop ends it: not a failure.
    assert "Runner failed" not in output
    assert "VM failed" not in output
    # Every tart process ended; only the pulled image is left; no capture file is left.
    assert all(call.ended is not None for call in calls)
    assert fake.vms() == []
    assert fake.cached_images() == [IMAGE]
    assert [p for p in temp.rglob("*") if p.is_file()] == []
    # The PAT reaches neither tart nor a log line; the JIT configs (which the runners got, on
    # their tart exec's stdin: they ran their jobs) are in no tart argument and no log line.
    assert TOKEN not in (fake.home / "invocations.jsonl").read_text()
    assert TOKEN not in output
    assert [word for call in calls for word in call.argv if is_jit_config(word)] == []
    assert [word for word in output.split() if is_jit_config(word)] == []
    assert "Shut down cleanly" in output
