"""The ``outrunner`` command: flags and environment defaults, ``--check``, exit statuses, where
output goes, ``--token-file`` and SIGHUP on a running service (a subprocess against FakeGitHub
with the fake tart CLI, which needs no daemon)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import outrunner
from outrunner.cli import EX_CONFIG, EX_FAILURE, EX_OK, EX_USAGE, main, parse_args
from outrunner.testing import FakeGitHub
from tests.support.faketart import FakeTart

TOKEN = "ghp_cliTestToken_0123456789abcdef"
CONFIG = """\
url: https://github.com/my-org
runners:
  linux:
    labels: [self-hosted, linux]
    max_runners: 4
    docker: {image: ghcr.io/actions/actions-runner:latest}
  mac:
    labels: [macos]
    token_file: mac-token
    tart: {image: ghcr.io/cirruslabs/macos-runner:sonoma}
"""


def command(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m outrunner`` as a user runs it; ``env`` replaces the environment."""
    return subprocess.run(
        [sys.executable, "-m", "outrunner", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env if env is not None else {"PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
def farm(tmp_path: Path) -> Path:
    (tmp_path / "mac-token").write_text("ghp_macToken_0123456789\n")
    path = tmp_path / "farm.yml"
    path.write_text(CONFIG)
    return path


# ---------------------------------------------------------------------------------------------
# Flags and environment defaults (in process)


def test_defaults_come_from_the_environment_when_no_flag_is_given() -> None:
    env = {
        "OUTRUNNER_CONFIG": "/srv/farm.yml",
        "OUTRUNNER_LOG_LEVEL": "DEBUG",
        "OUTRUNNER_LOG_FORMAT": "Json",
    }
    options = parse_args([], env)
    assert (options.config, options.log_level, options.log_format) == (
        "/srv/farm.yml",
        "debug",
        "json",
    )
    flags = ["--config", "x.yml", "--log-level", "error", "--log-format", "text"]
    options = parse_args(flags, env)
    assert (options.config, options.log_level, options.log_format) == ("x.yml", "error", "text")
    options = parse_args([], {})
    assert (options.config, options.log_level, options.log_format, options.mode) == (
        "/etc/outrunner/config.yml",
        "info",
        "text",
        "serve",
    )


@pytest.mark.parametrize("level", ["warning", "WARN", "Warning", "debug", "ERROR", "Info"])
def test_log_level_takes_warning_and_any_case(level: str) -> None:
    assert parse_args(["--log-level", level], {}).log_level == level.lower()


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-runners", "0"], {}, "--max-runners: must be at least 1, got 0"),
        (["--max-runners", "-3"], {}, "must be at least 1"),
        (["--token", "a", "--token-file", "b"], {}, "not allowed with argument"),
        (["--log-level", "loud"], {}, "invalid log level 'loud'"),
        (["--drain-timeout", "-1"], {}, "must be 0 or more seconds"),
        (["--drain-timeout", "nan"], {}, "must be 0 or more seconds"),
        ([], {"OUTRUNNER_LOG_LEVEL": "verbose"}, "$OUTRUNNER_LOG_LEVEL: invalid log level"),
        ([], {"OUTRUNNER_LOG_FORMAT": "xml"}, "$OUTRUNNER_LOG_FORMAT: invalid log format"),
        (["--check", "demo"], {}, "--check does not apply to the demo"),
        (["demo", "--jobs", "0"], {}, "must be at least 1"),
    ],
)
def test_usage_errors_exit_2_before_anything_runs(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv, env)
    assert exit_.value.code == EX_USAGE
    assert message in capsys.readouterr().err


def test_demo_is_a_subcommand_and_the_old_flags_still_work() -> None:
    options = parse_args(["demo", "--jobs", "4", "--max-runners", "2", "--backend", "memory"], {})
    assert (options.mode, options.demo_jobs, options.demo_max_runners) == ("demo", 4, 2)
    assert options.demo_backend == "memory"
    old = parse_args(["--demo", "--demo-jobs", "5", "--demo-max-runners", "1"], {})
    assert (old.mode, old.demo_jobs, old.demo_max_runners) == ("demo", 5, 1)
    plain = parse_args(["demo"], {})
    assert (plain.demo_jobs, plain.demo_max_runners, plain.demo_backend) == (6, 3, "auto")
    # A flag given before the subcommand is not overwritten by the subcommand's default.
    assert parse_args(["--log-level", "debug", "demo"], {}).log_level == "debug"
    assert parse_args(["demo", "--log-level", "error"], {}).log_level == "error"


def test_production_help_is_short_and_says_how_to_give_the_token(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"], {})
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for expected in ("--token-file", "$GITHUB_TOKEN", "LoadCredential=github-token", "exit status"):
        assert expected in out
    for status in ("0 ", "1 ", "2 ", "78 ", "130 "):
        assert f"\n  {status}" in out
    assert "--demo-jobs" not in out
    assert "--jobs" not in out
    assert "(default 2)" in out  # --max-runners shows its default


@pytest.mark.parametrize("flag", ["-v", "--version"])
def test_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args([flag], {})
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"outrunner {outrunner.__version__}"


# ---------------------------------------------------------------------------------------------
# --check


@pytest.fixture
def outrunner_logger() -> Iterator[None]:
    """main() installs its log handler on the ``outrunner`` logger, writing to this test's
    captured stderr: put the logger back as it was, or later tests log to a closed stream."""
    logger = logging.getLogger("outrunner")
    handlers, level = list(logger.handlers), logger.level
    yield
    for handler in [h for h in logger.handlers if h not in handlers]:
        logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.usefixtures("outrunner_logger")
def test_check_prints_one_line_per_scale_set_and_never_the_token(
    farm: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    assert main(["--check", "--config", str(farm), "--max-runners", "3"]) == EX_OK
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "linux: https://github.com/my-org, token from GITHUB_TOKEN, docker image "
        "ghcr.io/actions/actions-runner:latest, labels self-hosted,linux, max_runners 4",
        f"mac: https://github.com/my-org, token from runners.mac.token_file "
        f"{farm.parent / 'mac-token'}, tart image ghcr.io/cirruslabs/macos-runner:sonoma, "
        "labels macos, max_runners 3",
    ]
    assert "Config OK" in err  # the log, on stderr
    assert TOKEN not in out + err
    assert "ghp_macToken" not in out + err


def test_check_names_a_token_file_flag_as_the_source(farm: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    result = command("--check", "--config", str(farm), "--token-file", str(token_file))
    assert result.returncode == EX_OK, result.stderr
    assert f"token from --token-file {token_file}" in result.stdout.splitlines()[0]
    assert TOKEN not in result.stdout + result.stderr


def test_check_takes_the_config_from_outrunner_config(farm: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "OUTRUNNER_CONFIG": str(farm), "GITHUB_TOKEN": TOKEN}
    result = command("--check", env=env)
    assert result.returncode == EX_OK, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["linux", "mac"]


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ("max_runners: 4", "runners.linux.max_runners"),
        ("labels: [self-hosted, linux]", "runners.linux.lables"),
        ("token_file: mac-token", "mac-token"),
    ],
)
def test_check_exits_78_on_a_config_error(
    farm: Path, broken: str, expected: str, tmp_path: Path
) -> None:
    replacement = {
        "max_runners: 4": "max_runners: -1",
        "labels: [self-hosted, linux]": "lables: [self-hosted, linux]",
        "token_file: mac-token": "token_file: missing-token",
    }[broken]
    farm.write_text(farm.read_text().replace(broken, replacement))
    if broken.startswith("token_file"):
        expected = str(tmp_path / "missing-token")
    result = command("--check", "--config", str(farm), env={"GITHUB_TOKEN": TOKEN})
    assert result.returncode == EX_CONFIG, result.stdout + result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("outrunner: error: ")
    assert str(farm) in result.stderr or "missing-token" in result.stderr
    assert expected in result.stderr


def test_check_without_any_token_exits_78(farm: Path) -> None:
    result = command("--check", "--config", str(farm))
    assert result.returncode == EX_CONFIG
    assert "no token provided" in result.stderr


def test_check_reports_a_backend_whose_extra_is_missing(farm: Path) -> None:
    # `-c` with docker made unimportable: what a user without the docker extra sees.
    code = (
        "import sys; sys.modules['docker'] = None; "
        "from outrunner.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--check", "--config", str(farm)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "GITHUB_TOKEN": TOKEN},
    )
    assert result.returncode == EX_CONFIG, result.stderr
    assert "runners.linux: the docker backend needs the 'docker' extra" in result.stderr
    assert "pip install 'outrunner[docker]'" in result.stderr


def test_a_config_error_at_start_is_also_78(tmp_path: Path) -> None:
    result = command("--config", str(tmp_path / "absent.yml"))
    assert result.returncode == EX_CONFIG
    assert (
        result.stderr.strip()
        == f"outrunner: error: {tmp_path / 'absent.yml'}: config file not found"
    )


def test_a_failed_demo_backend_is_a_runtime_error() -> None:
    # Docker insisted on, but no engine at this address: one line, exit 1.
    env = {"PATH": "/usr/bin:/bin", "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    result = command("demo", "--backend", "docker", env=env)
    assert result.returncode == EX_FAILURE, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("outrunner: error: ")
    assert "Traceback" not in result.stderr


def test_the_demo_summary_is_on_stdout_and_the_logs_on_stderr() -> None:
    result = command("demo", "--jobs", "2", "--backend", "memory", timeout=120)
    assert result.returncode == EX_OK, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == "Demo summary"
    assert "verdict:             OK" in result.stdout
    assert " INFO " not in result.stdout
    assert "Demo starting" in result.stderr


# ---------------------------------------------------------------------------------------------
# A running service: --token-file, logs on stderr, SIGHUP


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sighup_reloads_the_config_and_keeps_serving(tmp_path: Path) -> None:
    fake = FakeTart.install(tmp_path / "tart")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with FakeGitHub(pat=TOKEN, long_poll_timeout=1.0) as gh:
        config = tmp_path / "farm.yml"
        text = (
            f"url: {gh.config_url()}\nrunners:\n  mac:\n    labels: [macos]\n"
            "    tart: {image: base}\n"
        )
        config.write_text(text)
        # No GITHUB_TOKEN: the token comes from --token-file only.
        env = fake.env({"PATH": "/usr/bin:/bin"})
        argv = [sys.executable, "-m", "outrunner", "--config", str(config)]
        argv += ["--token-file", str(token_file), "--state-dir", str(tmp_path / "state")]
        with stdout.open("w") as out, stderr.open("w") as err:
            process = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        try:
            gh.wait_for(lambda: len(gh.sessions()) == 1, timeout=30)

            def hup_and_expect(message: str) -> None:
                process.send_signal(signal.SIGHUP)
                wait_for(lambda: message in stderr.read_text(), 10, message)
                assert process.poll() is None, stderr.read_text()
                assert len(gh.sessions()) == 1  # still listening, same session

            hup_and_expect("Config reloaded added=- removed=- restarted=- changed=-")
            config.write_text(text.replace("[macos]", "[macos, arm64]"))
            hup_and_expect("Config reloaded added=- removed=- restarted=- changed=mac")
            wait_for(
                lambda: "Scale set labels updated" in stderr.read_text(), 10, "the label update"
            )
            (scale_set,) = gh.scale_sets()
            assert sorted(scale_set.labels) == ["arm64", "macos"]
            config.write_text(text.replace("labels", "lables"))
            hup_and_expect("SIGHUP: the config cannot be used; the running config is kept")
            process.send_signal(signal.SIGTERM)
            status = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert gh.sessions() == []
    logs = stderr.read_text()
    assert status == EX_OK, logs
    assert stdout.read_text() == ""  # a service prints nothing but logs, and those to stderr
    assert "Shut down cleanly" in logs
    assert TOKEN not in logs


def test_check_resolves_entries_as_the_service_does(farm: Path) -> None:
    """--check asks the Service for its plan, so what would fail at start fails here too: a
    warm pool larger than the --max-runners default of an entry without max_runners."""
    farm.write_text(
        farm.read_text().replace(
            "    labels: [macos]\n", "    labels: [macos]\n    min_runners: 3\n"
        )
    )
    result = command("--check", "--config", str(farm), env={"GITHUB_TOKEN": TOKEN})
    assert result.returncode == EX_CONFIG, result.stdout + result.stderr
    assert "runners.mac: min_runners (3) must not exceed max_runners (2, from --max-runners)" in (
        result.stderr
    )
    result = command(
        "--check", "--config", str(farm), "--max-runners", "3", env={"GITHUB_TOKEN": TOKEN}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].endswith("max_runners 3")
