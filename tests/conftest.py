"""Shared pytest configuration.

Async tests run on asyncio through anyio's pytest plugin. Tests marked ``docker`` need a Docker
engine: without one they skip, or fail when ``OUTRUNNER_REQUIRE_DOCKER=1`` (set by CI).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import docker
import pytest

from outrunner.testing.runner_image import ensure_runner_image
from tests.support.docker_engine import (
    REQUIRE_ENV,
    SESSION_PREFIX,
    connect,
    engine_problem,
    remove_containers,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _missing_engine(problem: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{problem} ({REQUIRE_ENV}=1 makes this a failure)", pytrace=False)
    pytest.skip(f"{problem} (set {REQUIRE_ENV}=1 to fail instead)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("docker") is None:
        return
    problem = engine_problem()
    if problem is not None:
        _missing_engine(problem)


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
