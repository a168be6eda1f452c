"""outrunner installs as a program: the wheel built from this tree, in a fresh venv, no dev extras.

One module fixture builds the wheel from a copy of the working tree and installs
``outrunner[docker]`` into a new venv (``python -m venv``, no system site-packages), both with
``--no-index`` from ``.venv/wheelhouse`` (``make wheelhouse``; see tests/support/install.py):
nothing here reaches a package index. About 10 s: building the wheel 4 s, installing 3 s. The
tests then run the installed ``outrunner`` the way an operator does, from a directory outside the
checkout so that nothing is imported from it.

``outrunner demo`` runs on Docker when an engine answers (the ``docker`` extra is installed) and
on in-memory environments otherwise, so this module needs no engine.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from outrunner import __version__
from tests.support.install import (
    WheelhouseMissing,
    build_wheel,
    check_wheelhouse,
    offline_pip_env,
    run,
    sample_config,
    write_broken_config,
)

pytestmark = pytest.mark.slow

EX_CONFIG = 78


@dataclasses.dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    wheelhouse: Path
    home: Path
    """A scratch directory: the working directory of every command, and their state dir."""

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a user of this venv: its bin first on PATH, no outrunner or GitHub
        variable of the test run's own, pip confined to the wheelhouse."""
        base = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("OUTRUNNER_", "GITHUB_")) and key != "CREDENTIALS_DIRECTORY"
        }
        base["PATH"] = f"{self.bin}{os.pathsep}{base.get('PATH', os.defpath)}"
        base["OUTRUNNER_STATE_DIR"] = str(self.home / "state")
        return offline_pip_env(self.wheelhouse, base, **extra)

    def run(
        self, argv: Sequence[str], *, timeout: float = 60, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / argv[0]), *argv[1:]],
            env=self.env(**env),
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def pip(self, argv: Sequence[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
        """pip, acting on this venv's interpreter, offline."""
        command = [sys.executable, "-m", "pip", "--python", str(self.bin / "python"), *argv]
        if check:
            return run(command, env=self.env(), cwd=self.home)
        return subprocess.run(
            command, env=self.env(), cwd=self.home, capture_output=True, text=True, check=False
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    try:
        wheelhouse = check_wheelhouse()
    except WheelhouseMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    work = tmp_path_factory.mktemp("install")
    wheel = build_wheel(wheelhouse, work)
    venv = work / "venv"
    # The interpreter running the tests, but none of its packages: a venv made from a venv is
    # based on the same base installation, without --system-site-packages. Without pip: the
    # test venv's pip installs into it (`pip --python`), which spares ensurepip's 7 s.
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    home = work / "home"
    home.mkdir()
    installed = Installed(wheel=wheel, venv=venv, wheelhouse=wheelhouse, home=home)
    installed.pip(["install", "--quiet", f"{wheel}[docker]"], check=True)
    return installed


def test_the_wheel_ships_the_package_data_and_no_tests(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = wheel.read(entry_points).decode()
    assert "outrunner/py.typed" in names
    assert "outrunner/testing/agent.sh" in names
    assert "outrunner/cli.py" in names
    assert "outrunner/__main__.py" in names
    top_level = {name.split("/", 1)[0] for name in names}
    assert top_level == {"outrunner", f"outrunner-{__version__}.dist-info"}, top_level
    assert "outrunner = outrunner.cli:main" in scripts


def test_the_venv_holds_outrunner_and_its_dependencies_only(installed: Installed) -> None:
    where = installed.run(["python", "-c", "import outrunner; print(outrunner.__file__)"])
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), where.stdout
    # No dev extra came along, and every requirement is met.
    dev = installed.run(["python", "-c", "import mypy"])
    assert dev.returncode != 0
    check = installed.pip(["check"])
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["outrunner", "--version"],
        ["outrunner", "-v"],
        ["python", "-m", "outrunner", "--version"],
    ],
)
def test_version(installed: Installed, argv: list[str]) -> None:
    done = installed.run(argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"outrunner {__version__}"


def test_check_accepts_the_sample_config(installed: Installed) -> None:
    done = installed.run(
        ["outrunner", "--check", "--config", str(sample_config(installed.home))],
        GITHUB_TOKEN="ghp_dummy",
    )
    assert done.returncode == 0, done.stderr
    assert "token from GITHUB_TOKEN" in done.stdout
    assert "ghp_dummy" not in done.stdout + done.stderr
    assert "Warning" not in done.stderr, done.stderr  # e.g. a dependency that fails to import


def test_check_rejects_a_broken_config_with_ex_config(installed: Installed) -> None:
    config = write_broken_config(installed.home / "broken.yml")
    done = installed.run(["outrunner", "--check", "--config", str(config)], GITHUB_TOKEN="ghp_x")
    assert done.returncode == EX_CONFIG, done.stdout + done.stderr
    assert done.stderr.startswith("outrunner: error:"), done.stderr
    assert "labels" in done.stderr
    assert "Traceback" not in done.stderr


def test_demo_runs_jobs_to_completion(installed: Installed) -> None:
    done = installed.run(["outrunner", "demo", "--jobs", "2", "--max-runners", "2"], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict:             OK" in done.stdout


def test_the_contract_suite_names_the_testing_extra(installed: Installed) -> None:
    done = installed.run(["python", "-c", "import outrunner.testing.contract"])
    assert done.returncode != 0
    assert "pip install 'outrunner[testing]'" in done.stderr, done.stderr
    # ... and that extra installs (resolved from the wheelhouse; --dry-run leaves the venv as is).
    extra = installed.pip(["install", "--dry-run", f"{installed.wheel}[testing]"])
    assert extra.returncode == 0, extra.stdout + extra.stderr
    assert "pytest" in extra.stdout
