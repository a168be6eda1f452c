"""Service packaging (packaging/): the systemd unit, the launchd job and the sample config.

* The unit passes ``systemd-analyze verify`` (Debian's ``systemd`` package) with no warning about
  it, and its directives agree with outrunner: exit 78 is not restarted, the stop timeout leaves
  room for the drain, the token comes from the ``github-token`` credential outrunner reads.
  Without ``systemd-analyze`` the verify test skips, or fails when ``OUTRUNNER_REQUIRE_SYSTEMD=1``
  (set by .ci/run) or ``CI=true``.
* The launchd plist parses and gives a drain the time it needs (launchd's default is 20 s).
* ``outrunner --check`` accepts ``packaging/config.yml`` and refuses a broken copy, or one without
  a token, with exit 78 (EX_CONFIG) and a one-line message: what the unit's
  ``RestartPreventExitStatus=78`` relies on.
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from outrunner.config import DEFAULT_DRAIN_TIMEOUT, load_config

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
UNIT = PACKAGING / "outrunner.service"
PLIST = PACKAGING / "com.github.outrunner.plist"
CONFIG = PACKAGING / "config.yml"

REQUIRE_ENV = "OUTRUNNER_REQUIRE_SYSTEMD"
EX_CONFIG = 78
TOKEN = "ghp_dummy0123456789abcdefDUMMYdummy"
# The variables that choose a config or supply a token: the tests set them explicitly.
_CLI_ENV = ("GITHUB_TOKEN", "CREDENTIALS_DIRECTORY", "OUTRUNNER_CONFIG")


# --------------------------------------------------------------------------------------------
# The systemd unit


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's directives: section -> key -> values in file order (comments dropped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are not parsed here"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"line {number}: not a directive: {raw!r}"
        assert current is not None, f"line {number}: a directive before any [section]"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    """The value of a directive that must appear exactly once."""
    values = section.get(key, [])
    assert len(values) == 1, f"{key}= must appear once, found {values}"
    return values[0]


def seconds(timespan: str) -> float:
    """A systemd time span in the forms this unit may use: ``960``, ``960s``, ``16min``."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", timespan)
    assert match, f"unsupported time span {timespan!r}"
    return float(match[1]) * (60 if match[2] in ("min", "m") else 1)


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        problem = "systemd-analyze is not installed (Debian package systemd)"
        if os.environ.get(REQUIRE_ENV) == "1" or os.environ.get("CI") == "true":
            pytest.fail(
                f"{problem}; {REQUIRE_ENV}=1 or CI=true makes this a failure", pytrace=False
            )
        pytest.skip(f"{problem}; set {REQUIRE_ENV}=1 to fail instead")
    return found


def verify(unit_text: str, directory: Path) -> tuple[int, list[str]]:
    """``systemd-analyze verify`` on ``unit_text`` saved as ``directory/outrunner.service``: its
    exit status and the output lines that mention our unit.

    verify checks that ExecStart='s program exists and is executable, and the operator's
    /usr/local/bin/outrunner is not on this machine. So the program is replaced by an executable
    stub named ``outrunner`` in ``directory``, with the arguments kept; every other directive is
    verified as shipped. Warnings about other units (docker.service, pulled in by After=) are
    not ours to fix and are ignored; ours name the file or the unit.
    """
    stub = directory / "bin" / "outrunner"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    rewritten, count = re.subn(
        r"^ExecStart=\S+/outrunner(?=\s)", f"ExecStart={stub}", unit_text, flags=re.MULTILINE
    )
    assert count == 1, "ExecStart= should run .../outrunner"
    unit = directory / "outrunner.service"
    unit.write_text(rewritten)
    result = subprocess.run(
        # --man=no: do not look Documentation= man pages up; --generators=no: none are needed,
        # and they would only add noise in a container without systemd as PID 1.
        [systemd_analyze(), "verify", "--man=no", "--generators=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    output = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in output if "outrunner.service" in line]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    status, about_us = verify(UNIT.read_text(), tmp_path)
    assert status == 0, about_us
    assert about_us == []


def test_verify_reports_a_mistake_in_the_unit(tmp_path: Path) -> None:
    """The check above would notice a broken unit: a misspelt directive is reported, naming it."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KilMode=mixed")
    _, about_us = verify(broken, tmp_path)
    assert any("KilMode" in line for line in about_us), about_us


def test_unit_directives_match_outrunner() -> None:
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]

    # Who and what runs.
    assert one(service, "User") == "outrunner"
    assert one(service, "Type") == "exec"
    program, *args = one(service, "ExecStart").split()
    assert program.endswith("/outrunner")
    assert args == ["--config", "/etc/outrunner/config.yml"]
    # SIGHUP reloads the config; it does not stop the process.
    assert one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"

    # Restarts: after failures, never after a config error (EX_CONFIG) or a usage error.
    assert one(service, "Restart") == "on-failure"
    assert seconds(one(service, "RestartSec")) > 0
    prevent = one(service, "RestartPreventExitStatus").split()
    assert str(EX_CONFIG) in prevent
    assert "0" not in prevent
    assert "1" not in prevent

    # Stopping drains: the stop timeout must outlast the drain of the default and of the sample
    # config, plus the bounded stop of what is left, or systemd's SIGKILL cuts it short.
    stop_timeout = seconds(one(service, "TimeoutStopSec"))
    assert stop_timeout >= DEFAULT_DRAIN_TIMEOUT + 30
    assert stop_timeout >= load_config(CONFIG).drain_timeout + 30
    # SIGTERM to outrunner only; its children (ssh to a Docker engine, tart) are its business.
    assert one(service, "KillMode") == "mixed"

    # State and credentials where outrunner looks for them.
    assert one(service, "StateDirectory") == "outrunner"  # $STATE_DIRECTORY=/var/lib/outrunner
    assert one(service, "StateDirectoryMode") == "0700"
    credential = one(service, "LoadCredential")
    assert credential == "github-token:/etc/outrunner/github-token"
    assert one(service, "UMask") == "0077"

    # Hardening that every backend allows.
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert one(service, key) == value, key
    assert "@system-service" in service["SystemCallFilter"]

    # Ordered before the backends' daemons stop, without requiring them to be installed.
    after = " ".join(unit["Unit"]["After"]).split()
    assert {"network-online.target", "docker.service", "libvirtd.service"} <= set(after)
    assert "Requires" not in unit["Unit"]
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_unit_comments_every_directive() -> None:
    """Each directive is preceded by a comment (directly, or for a group of related lines) that
    says why; a bare block of directives is what this catches."""
    bare_run = 0
    for line in UNIT.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            bare_run = 0
        elif stripped and not stripped.startswith("["):
            bare_run += 1
            # A comment may explain a small group (User= and Group=, the Protect* lines).
            assert bare_run <= 4, f"too many directives without a comment, up to {stripped!r}"


# --------------------------------------------------------------------------------------------
# The launchd job


def test_launchd_plist() -> None:
    with PLIST.open("rb") as f:
        job = plistlib.load(f)

    assert job["Label"] == "com.github.outrunner"
    program, *args = job["ProgramArguments"]
    assert program.endswith("/outrunner")
    assert args[args.index("--config") + 1].endswith("/config.yml")
    # The token comes from a file, never from argv (visible in ps) or the plist itself.
    assert "--token" not in args
    assert "--token-file" in args
    env = job["EnvironmentVariables"]
    assert "GITHUB_TOKEN" not in env
    assert os.path.isabs(env["OUTRUNNER_STATE_DIR"])
    assert env["OUTRUNNER_LOG_FORMAT"] in ("text", "json")

    # launchd sends SIGKILL ExitTimeOut seconds after SIGTERM (default 20): the drain needs more.
    assert job["ExitTimeOut"] >= DEFAULT_DRAIN_TIMEOUT + 30
    # Restarted after a failure, not after a clean exit (an operator's drain).
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["RunAtLoad"] is True
    # A LaunchAgent in the GUI session, where Tart can start VMs.
    assert job["LimitLoadToSessionType"] == "Aqua"
    assert job["StandardErrorPath"]

    # launchd expands neither ~ nor $HOME: every path must be absolute already.
    paths = [program, args[args.index("--config") + 1], args[args.index("--token-file") + 1]]
    paths += [env["OUTRUNNER_STATE_DIR"], job["StandardErrorPath"], job["StandardOutPath"]]
    for path in paths:
        assert path.startswith("/"), path
        assert "~" not in path, path
        assert "$" not in path, path


# --------------------------------------------------------------------------------------------
# outrunner --check on the sample config


def check(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m outrunner --check --config <config>`` with no token or config variable from
    our environment, only those in ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in _CLI_ENV}
    return subprocess.run(
        [sys.executable, "-m", "outrunner", "--check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
        env={**base, **env},
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The error a run ended with: ``outrunner: error: ...`` and its continuation lines."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("outrunner: error: ")]
    assert len(starts) == 1, result.stderr
    return lines[starts[0] :]


def test_check_accepts_the_sample_config() -> None:
    result = check(CONFIG, GITHUB_TOKEN=TOKEN)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    names = list(load_config(CONFIG).runners)
    lines = result.stdout.splitlines()
    assert [line.partition(":")[0] for line in lines] == names
    for line in lines:
        assert "token from GITHUB_TOKEN" in line
    assert TOKEN not in result.stdout + result.stderr


def _edited_sample(tmp_path: Path, old: str, new: str) -> Path:
    text = CONFIG.read_text()
    assert text.count(old) == 1, f"{old!r} should appear once in {CONFIG}"
    path = tmp_path / "config.yml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("    max_runners: 2\n", "    max_runners: -1\n", "runners.linux.max_runners"),
        ("    max_runners: 2\n", "    max_runner: 2\n", "runners.linux.max_runner"),
    ],
    ids=["bad-value", "unknown-key"],
)
def test_check_rejects_a_broken_config(tmp_path: Path, old: str, new: str, key: str) -> None:
    config = _edited_sample(tmp_path, old, new)
    result = check(config, GITHUB_TOKEN=TOKEN)
    assert result.returncode == EX_CONFIG, result.stderr
    message = "\n".join(error_lines(result))
    assert str(config) in message
    assert f": {key}: " in message
    assert result.stdout == ""


@pytest.mark.parametrize("token_file", [True, False], ids=["missing-file", "no-source"])
def test_check_without_a_token_exits_78(tmp_path: Path, token_file: bool) -> None:
    """No GITHUB_TOKEN, no systemd credential, and a token_file that does not exist, or none."""
    missing = tmp_path / "github-token"
    line = "token_file: /etc/outrunner/github-token\n"
    config = _edited_sample(tmp_path, line, f"token_file: {missing}\n" if token_file else "")
    result = check(config)
    assert result.returncode == EX_CONFIG, result.stderr
    message = "\n".join(error_lines(result))
    assert (str(missing) if token_file else "no token provided") in message
    assert result.stdout == ""
