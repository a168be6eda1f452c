"""Shared pytest configuration.

Async tests run on asyncio through anyio's pytest plugin. Tests marked ``docker`` need a Docker
engine: without one they skip, or fail when ``OUTRUNNER_REQUIRE_DOCKER=1`` (set by CI). Tests
marked ``libvirt`` need libvirtd with QEMU and the test guest: without them they skip, or fail
when ``OUTRUNNER_REQUIRE_LIBVIRT=1``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import docker
import pytest

from outrunner.testing.runner_image import ensure_runner_image
from tests.support import libvirt_daemon
from tests.support.docker_engine import (
    REQUIRE_ENV,
    SESSION_PREFIX,
    connect,
    engine_problem,
    remove_containers,
)
from tests.support.vm_timings import VmTimings

if TYPE_CHECKING:
    import libvirt

    from tests.support.guest import Guest


# Modules that import libvirt-python at the top. Without the binding they are not collected
# (the summary says so), unless OUTRUNNER_REQUIRE_LIBVIRT=1 makes their import error a failure.
_LIBVIRT_MODULES = [
    "provisioners/test_libvirt.py",
    "provisioners/test_libvirt_contract.py",
    "provisioners/test_libvirt_vm.py",
    "test_e2e_libvirt.py",
]
_LIBVIRT_BINDING_PROBLEM = libvirt_daemon.python_binding_problem()
collect_ignore = (
    _LIBVIRT_MODULES
    if _LIBVIRT_BINDING_PROBLEM and os.environ.get(libvirt_daemon.REQUIRE_ENV) != "1"
    else []
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own runner journal directory (the default, /var/lib/outrunner, is the
    machine's): Services, and run.py subprocesses started with os.environ, use it."""
    path = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("OUTRUNNER_STATE_DIR", str(path))
    return path


def _missing_engine(problem: str, require_env: str = REQUIRE_ENV) -> None:
    if os.environ.get(require_env) == "1":
        pytest.fail(f"{problem} ({require_env}=1 makes this a failure)", pytrace=False)
    pytest.skip(f"{problem} (set {require_env}=1 to fail instead)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("docker") is not None:
        problem = engine_problem()
        if problem is not None:
            _missing_engine(problem)
    if item.get_closest_marker("libvirt") is not None:
        problem = libvirt_daemon.daemon_problem()
        if problem is not None:
            _missing_engine(problem, libvirt_daemon.REQUIRE_ENV)


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.APIClient]:
    """A plain SDK client for looking at (and tidying) the engine behind the provisioner's back."""
    problem = engine_problem()
    if problem is not None:
        _missing_engine(problem)
    client = connect()
    try:
        yield client
    finally:
        remove_containers(client, SESSION_PREFIX)
        client.close()


@pytest.fixture(scope="session")
def runner_image(engine: docker.APIClient) -> str:
    return ensure_runner_image(engine)


# -- libvirt ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[libvirt.virConnect]:
    """A plain connection to qemu:///system for looking at (and tidying) domains behind the
    provisioner's back; every domain of this session is destroyed at the end."""
    problem = libvirt_daemon.daemon_problem()
    if problem is not None:
        _missing_engine(problem, libvirt_daemon.REQUIRE_ENV)
    conn = libvirt_daemon.connect()
    try:
        yield conn
    finally:
        libvirt_daemon.destroy_domains(conn, libvirt_daemon.SESSION_PREFIX)
        conn.close()
        libvirt_daemon.remove_libvirt_logs(libvirt_daemon.SESSION_PREFIX)


@pytest.fixture(scope="session")
def test_guest(libvirt_conn: libvirt.virConnect, vm_timings: VmTimings) -> Guest:
    """The direct-kernel-boot test guest (built, or reused when up to date). Every test that
    boots it has its VMs' boot, start and stop times collected for the summary."""
    from tests.support.guest import GuestBuildError, ensure_guest

    try:
        return ensure_guest()
    except (GuestBuildError, OSError) as exc:
        _missing_engine(f"cannot build the test guest: {exc}", libvirt_daemon.REQUIRE_ENV)
        raise  # unreachable: _missing_engine skips or fails


@pytest.fixture(scope="session")
def vm_scratch(libvirt_conn: libvirt.virConnect) -> Iterator[Path]:
    """A world-searchable directory for this session's overlays, removed at the end."""
    try:
        path = libvirt_daemon.scratch_dir(libvirt_daemon.SESSION_PREFIX)
    except (RuntimeError, OSError) as exc:
        _missing_engine(f"no scratch directory for VMs: {exc}", libvirt_daemon.REQUIRE_ENV)
        raise  # unreachable: _missing_engine skips or fails
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def vm_timings() -> Iterator[VmTimings]:
    """Collects the libvirt provisioner's boot and stop times; printed in the summary."""
    timings = VmTimings.install()
    try:
        yield timings
    finally:
        timings.uninstall()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if collect_ignore:
        terminalreporter.write_line(
            f"libvirt tests not collected: {_LIBVIRT_BINDING_PROBLEM} "
            f"(set {libvirt_daemon.REQUIRE_ENV}=1 to fail instead)"
        )
    for line in VmTimings.report():
        terminalreporter.write_line(line)
