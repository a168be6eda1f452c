"""Fixtures for the fake GitHub's tests: a started fake with short long polls, a raw client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from outrunner.testing.fakegithub import FakeGitHub
from tests.testing.raw import Raw, raw_client

# Every empty poll costs this much; the long-poll timing test uses its own, longer fake.
POLL = 0.1


@pytest.fixture
def gh() -> Iterator[FakeGitHub]:
    with FakeGitHub(long_poll_timeout=POLL) as fake:
        yield fake


@pytest.fixture
def raw(gh: FakeGitHub) -> Iterator[Raw]:
    with raw_client(gh) as client:
        yield client
