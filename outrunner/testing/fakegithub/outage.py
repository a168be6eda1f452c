"""Simulated outages: a window during which chosen endpoints fail without being handled.

Unlike the one-shot faults of ``faults``, an outage lasts until it is ended, applies to every
request of its endpoints (before any pending fault, which stays queued for later), and also cuts
the long polls (message GET, agent connect) and delayed requests that were open when it began, as
when the real service goes down under its clients.
"""

from __future__ import annotations

import http
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Self

from outrunner.testing.fakegithub.endpoints import AGENT_ENDPOINTS, REST_ENDPOINTS, Endpoint
from outrunner.testing.fakegithub.errors import SERVICES, ApiError, type_name


class Outage:
    """An outage in progress, started by ``FakeGitHub.outage()``.

    End it with ``end()`` or by leaving ``with gh.outage(): ...``; ending is idempotent and does
    not block, so the plain ``with`` also suits async tests. ``status`` is the HTTP status every
    affected request gets, or None when their connections are closed without an answer (what a
    client sees as a connection reset). ``endpoints`` are the affected endpoints.
    """

    def __init__(
        self,
        *,
        status: int | None,
        endpoints: Iterable[Endpoint],
        headers: Mapping[str, str] | None,
        on_end: Callable[[Outage], None],
    ) -> None:
        if status is not None and not 100 <= status <= 599:
            raise ValueError(f"status must be an HTTP status or None, not {status}")
        self.status = status
        self.endpoints = frozenset(endpoints)
        if not self.endpoints:
            raise ValueError("an outage needs at least one endpoint")
        self.headers = tuple((headers or {}).items())
        self.started = time.monotonic()
        self._ended: float | None = None
        self._on_end = on_end
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "active" if self.active else "ended"
        return f"Outage(status={self.status}, endpoints={len(self.endpoints)}, {state})"

    @property
    def active(self) -> bool:
        return self._ended is None

    @property
    def duration(self) -> float:
        """Seconds from the start to the end (or to now while it lasts)."""
        end = self._ended if self._ended is not None else time.monotonic()
        return end - self.started

    def end(self) -> None:
        """End the outage: the endpoints answer normally again."""
        with self._lock:
            if self._ended is not None:
                return
            self._ended = time.monotonic()
        self._on_end(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end()

    def error(self, endpoint: Endpoint) -> ApiError:
        """The answer for ``endpoint``, shaped like the errors of the service behind it."""
        assert self.status is not None
        try:
            phrase = http.HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Error"
        if endpoint in REST_ENDPOINTS:
            return ApiError(self.status, phrase, rest=True)
        if endpoint in AGENT_ENDPOINTS:
            return ApiError(self.status, f"{self.status} {phrase} (simulated outage)", plain=True)
        # The Actions service and its message queue answer .NET-style errors; the type name is
        # illustrative: clients must not depend on it, only on the status.
        exception = (
            "VssServiceUnavailableException" if self.status == 503 else "VssServiceException"
        )
        return ApiError(
            self.status,
            f"The service is unavailable ({self.status} {phrase}, simulated outage).",
            type_name=type_name(SERVICES, exception),
        )
