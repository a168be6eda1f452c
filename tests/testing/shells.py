"""Ways to run ``agent.sh``: dash with the host's GNU wget, or busybox sh with busybox applets only
(the contents of the tiny runner image)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "wget", "base64", "sed", "sleep", "cat", "printf")
PROXY_VARS = {"http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"}


@dataclass(frozen=True)
class Shell:
    """Run a script as ``[*argv, script, ...]`` with ``env``."""

    argv: list[str]
    env: dict[str, str]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without proxies or a JIT config, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env.pop("ACTIONS_RUNNER_INPUT_JITCONFIG", None)
    return {**env, **extra}


def dash() -> Shell:
    """/bin/sh (dash on Debian) with the host's tools; skips without wget."""
    if shutil.which("wget") is None:
        pytest.skip("no wget on PATH for dash")
    return Shell(["/bin/sh"], clean_env())


def busybox(tmp_path: Path) -> Shell:
    """busybox sh with only busybox applets on PATH: anything else a script needed would fail.

    Skips without busybox, or fails when OUTRUNNER_REQUIRE_BUSYBOX=1."""
    if not BUSYBOX.exists():
        message = "busybox is not installed (apt-get install busybox-static)"
        if os.environ.get("OUTRUNNER_REQUIRE_BUSYBOX") == "1":
            pytest.fail(message)
        pytest.skip(message)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for applet in BUSYBOX_APPLETS:
        (bin_dir / applet).symlink_to(BUSYBOX)
    return Shell([str(BUSYBOX), "sh"], {"PATH": str(bin_dir), "HOME": str(tmp_path)})
