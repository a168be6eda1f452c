"""Fixtures for backend tests against a real Docker engine (engine checks: tests/conftest.py).

Every container a test makes is named ``<session prefix>...`` and removed after the test, and
again at the end of the session, whatever happened.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import docker
import pytest

from outrunner.config import DockerImage, RunnerConfig
from outrunner.testing.runner_image import DEFAULT_TAG
from tests.support.docker_engine import SESSION_PREFIX, remove_containers


def runner_config(scale_set: str, **options: Any) -> RunnerConfig:
    """A docker runner entry for the test image whose containers idle until stopped."""
    defaults: dict[str, Any] = {
        "image": DEFAULT_TAG,
        "runner_cmd": "./idle.sh",
        "network": "none",
        "stop_timeout": 2,
    }
    docker_options = DockerImage(**{**defaults, **options})
    return RunnerConfig(name=scale_set, labels=("linux",), docker=docker_options)


@pytest.fixture
def scale_set(engine: docker.APIClient) -> Iterator[str]:
    """A scale set name unique to the test; its containers are removed afterwards."""
    name = f"{SESSION_PREFIX}{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        remove_containers(engine, name)
