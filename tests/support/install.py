"""Building and installing outrunner the way a user does, without a package index.

Shared by tests/test_install.py (the wheel in a fresh venv) and tests/test_containerfile.py
(packaging/Containerfile).

``make wheelhouse`` (a prerequisite of ``make pytest``) downloads into ``.venv/wheelhouse`` the
wheels of everything ``pip install 'outrunner[docker,testing]'`` needs and of the build backend.
The install tests then build outrunner's wheel from a copy of the working tree and install it with
``--no-index --find-links .venv/wheelhouse``: pip never reaches an index during a test.

:func:`offline_pip_env` also drops this machine's own pip configuration (config files and
``PIP_*`` variables, which may name other indexes or constraints), so that what the tests install
depends only on the repository and its wheelhouse.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

__all__ = [
    "REPO",
    "SAMPLE_CONFIG",
    "WHEELHOUSE",
    "WheelhouseMissing",
    "build_wheel",
    "check_wheelhouse",
    "copy_sources",
    "offline_pip_env",
    "run",
    "sample_config",
    "write_broken_config",
]

REPO: Final = Path(__file__).resolve().parents[2]
WHEELHOUSE: Final = REPO / ".venv" / "wheelhouse"
SAMPLE_CONFIG: Final = REPO / "packaging" / "config.yml"
_STAMP: Final = REPO / ".venv" / ".wheelhouse"
"""Touched by ``make wheelhouse`` once the download is complete."""
_PYTHON_ENV: Final = frozenset(
    {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV"}
)


class WheelhouseMissing(RuntimeError):
    """The wheelhouse is missing or older than pyproject.toml."""


def check_wheelhouse() -> Path:
    """The wheelhouse directory, or :class:`WheelhouseMissing` saying to run ``make wheelhouse``.

    A wheelhouse older than pyproject.toml may lack a dependency added since: the offline install
    would then fail with pip's "no matching distribution", which does not say what to do.
    """
    if not _STAMP.exists() or not any(WHEELHOUSE.glob("*.whl")):
        raise WheelhouseMissing(
            f"no wheelhouse at {WHEELHOUSE}: run `make wheelhouse` (`make test` does) so that "
            "this test can install outrunner without a package index"
        )
    if _STAMP.stat().st_mtime < (REPO / "pyproject.toml").stat().st_mtime:
        raise WheelhouseMissing(
            f"the wheelhouse at {WHEELHOUSE} is older than pyproject.toml: run `make wheelhouse`"
        )
    return WHEELHOUSE


def offline_pip_env(
    wheelhouse: Path, base: Mapping[str, str] | None = None, **extra: str
) -> dict[str, str]:
    """``base`` (default: os.environ) with pip confined to ``wheelhouse``.

    No config file, no ``PIP_*`` variable of the caller's, no index, no cache, no version check
    (the only request pip would make on its own). Variables that would make a subprocess's Python
    see this process's environment (``PYTHONPATH``, ``VIRTUAL_ENV``, ...) are dropped too.
    """
    env = {
        key: value
        for key, value in (os.environ if base is None else base).items()
        if not key.startswith("PIP_") and key not in _PYTHON_ENV
    }
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_NO_INDEX="1",
        PIP_FIND_LINKS=str(wheelhouse),
        PIP_NO_CACHE_DIR="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
    )
    env.update(extra)
    return env


def run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing text output; a non-zero exit raises
    :class:`RuntimeError` with the command and what it printed (CalledProcessError leaves the
    output out of its message, and so out of the test report)."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} exited with {done.returncode}\n"
            f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
        )
    return done


def copy_sources(dest: Path) -> Path:
    """Copy the working tree's files into ``dest``: tracked ones and new ones that are not
    ignored, as they are on disk now (so uncommitted changes are what gets built).

    Building from a copy keeps setuptools' ``build/`` and ``*.egg-info`` out of the checkout, and
    leaves out what .gitignore lists (the venv, caches, the wheelhouse itself).
    """
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO)
    for name in listed.stdout.split("\0"):
        source = REPO / name
        if not name or not source.is_file():  # deleted but still in the index
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return dest


def build_wheel(wheelhouse: Path, work: Path) -> Path:
    """Build outrunner's wheel from a copy of the working tree in ``work``; return its path.

    pip's build isolation installs the build backend from the wheelhouse (PIP_NO_INDEX and
    PIP_FIND_LINKS reach the pip that sets up the isolated environment).
    """
    source = copy_sources(work / "src")
    out = work / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)],
        env=offline_pip_env(wheelhouse),
        cwd=work,
    )
    (wheel,) = out.glob("outrunner-*.whl")
    return wheel


def sample_config(directory: Path) -> Path:
    """The annotated config that packaging ships, which ``outrunner --check`` must accept with a
    token in ``GITHUB_TOKEN``; a minimal one written into ``directory`` while it does not exist."""
    if SAMPLE_CONFIG.exists():
        return SAMPLE_CONFIG
    config = directory / "config.yml"
    config.write_text(
        "url: https://github.com/my-org\n"
        "runners:\n"
        "  linux:\n"
        "    labels: [self-hosted, linux]\n"
        "    docker:\n"
        "      image: ghcr.io/actions/actions-runner:latest\n"
    )
    return config


def write_broken_config(path: Path) -> Path:
    """A config that fails validation: a runner without labels."""
    path.write_text("url: https://github.com/my-org\nrunners:\n  linux:\n    labels: []\n")
    return path
