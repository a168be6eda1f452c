"""Fault injection: per-endpoint FIFO queues of failures, delays and dropped connections."""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from outrunner.testing.fakegithub.endpoints import Endpoint


@dataclass(frozen=True, kw_only=True)
class Fault:
    """What happens to the next request of an endpoint.

    ``kind`` is ``"fail"`` (answer ``status`` with ``body`` and ``headers`` without handling the
    request), ``"delay"`` (sleep ``seconds``, then handle it normally) or ``"drop"`` (read the
    request, then close the connection without an answer and without handling it).
    """

    kind: str
    status: int = 503
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0


@dataclass
class FaultPlan:
    """Thread-safe queues of pending faults, consumed one per matching request, in order."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pending: dict[Endpoint, deque[Fault]] = field(default_factory=dict)

    def add(self, endpoint: Endpoint | str, fault: Fault, times: int) -> None:
        if times < 1:
            raise ValueError("times must be at least 1")
        key = Endpoint(endpoint)
        with self._lock:
            self._pending.setdefault(key, deque()).extend([fault] * times)

    def take(self, endpoint: Endpoint) -> Fault | None:
        with self._lock:
            queue = self._pending.get(endpoint)
            return queue.popleft() if queue else None

    def pending(self, endpoint: Endpoint | str) -> int:
        with self._lock:
            return len(self._pending.get(Endpoint(endpoint), ()))

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()


def failure(
    endpoint: Endpoint,
    status: int,
    body: str | bytes | Mapping[str, object] | None,
    headers: Mapping[str, str] | None,
) -> Fault:
    """Build a "fail" fault; a mapping body is sent as JSON, a str as text/plain, bytes as is."""
    content_type: str | None
    if body is None:
        # Shaped like a real Actions-service error so clients exercise their usual error path.
        payload = {
            "typeName": "FakeGitHub.InjectedFaultException, FakeGitHub",
            "message": f"injected {status} for {endpoint}",
        }
        encoded, content_type = json.dumps(payload).encode(), "application/json; charset=utf-8"
    elif isinstance(body, bytes):
        encoded, content_type = body, None
    elif isinstance(body, str):
        encoded, content_type = body.encode(), "text/plain; charset=utf-8"
    else:
        encoded, content_type = json.dumps(dict(body)).encode(), "application/json; charset=utf-8"
    return Fault(
        kind="fail",
        status=status,
        body=encoded,
        content_type=content_type,
        headers=tuple((headers or {}).items()),
    )
