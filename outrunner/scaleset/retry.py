"""HTTP retries with the go-retryablehttp rules the Go client uses (``docs/protocol.md`` §6).

* Retried: transport errors, 429, and 0 or >= 500 except 501. Everything else is handed back at
  once.
* Never retried, raised at once as :class:`PermanentTransportError`: a TLS certificate that does
  not verify (:class:`TLSVerificationError`), an unsupported scheme, a malformed URL or header,
  too many redirects, a body that cannot be decoded. Retrying cannot fix any of them.
* Wait before retry ``i`` (0-based): ``min(wait_max, wait_min * 2**i)``; a 429 or 503 with a
  ``Retry-After`` (seconds or HTTP date) waits that long instead, uncapped.
* After ``max_attempts`` retryable failures: :class:`RetryExhaustedError` ("giving up after 5
  attempt(s)"), or, for the runner-registration call, the last response itself.
* Each attempt is bounded by an overall timeout; cancellation stops retrying at once.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Protocol

import httpx

from outrunner.scaleset.errors import (
    ACTIVITY_ID_HEADER,
    REQUEST_ID_HEADER,
    PermanentTransportError,
    RetryExhaustedError,
    TLSVerificationError,
    describe,
    status_line,
)

_log = logging.getLogger("outrunner.scaleset.retry")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently to retry. ``sleep`` and ``clock`` are seams for tests."""

    max_attempts: int = 5
    wait_min: float = 1.0
    wait_max: float = 30.0
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, repr=False)
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def backoff(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        if response is not None and response.status_code in (429, 503):
            retry_after = self._retry_after(response.headers.get("Retry-After", ""))
            if retry_after is not None:
                return retry_after
        return min(self.wait_max, self.wait_min * 2.0**attempt)

    def _retry_after(self, header: str) -> float | None:
        header = header.strip()
        if not header:
            return None
        if header.lstrip("-").isdigit():
            seconds = int(header)
            return float(seconds) if seconds >= 0 else None
        try:
            when = parsedate_to_datetime(header)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT
            return None
        return max(0.0, when.timestamp() - self.clock())


def is_retryable_status(status: int) -> bool:
    return status in (0, 429) or (status >= 500 and status != 501)


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind ``exc`` (httpx wraps it in a ConnectError)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _permanent_error(
    method: str, url: str, exc: Exception, trust: str
) -> PermanentTransportError | None:
    """The error to raise at once for a failure retrying cannot fix, or ``None`` to retry."""
    certificate = _certificate_error(exc)
    if certificate is not None:
        reason = certificate.verify_message or str(certificate)
        return TLSVerificationError(
            f"{describe(method, url)}: TLS certificate verification failed: {reason} "
            f"(trusted roots: {trust})",
            method=method,
            url=url,
        )
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        return _permanent(method, url, exc)
    return None


class Sender(Protocol):
    """What :func:`send` needs of a client: an ``httpx.AsyncClient``, or the client pool of
    ``_pool.ClientPool``."""

    def build_request(
        self, method: str, url: str, *, headers: Mapping[str, str], content: bytes | None
    ) -> httpx.Request: ...

    async def send(self, request: httpx.Request) -> httpx.Response: ...


async def send(
    http: Sender,
    policy: RetryPolicy,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    content: bytes | None = None,
    attempt_timeout: float,
    also_retry: Collection[int] = (),
    hand_back_last: bool = False,
    trust: str = "the client's trusted roots",
) -> httpx.Response:
    """Send one request with retries; the body is sent again on every attempt.

    ``also_retry`` adds statuses to retry (401/403 for runner-registration), and ``hand_back_last``
    returns the last response instead of raising when attempts run out. ``trust`` names the roots
    ``http`` verifies certificates against, for the message of a :class:`TLSVerificationError`.
    """
    last_response: httpx.Response | None = None
    last_error: Exception | None = None
    for attempt in range(policy.max_attempts):
        try:
            request = http.build_request(method, url, headers=headers, content=content)
            # httpx's timeouts are per socket operation; this bounds the whole attempt like Go's
            # http.Client.Timeout, and stays above the ~50 s long poll.
            async with asyncio.timeout(attempt_timeout):
                response = await http.send(request)
        except (httpx.TransportError, TimeoutError) as exc:
            permanent = _permanent_error(method, url, exc, trust)
            if permanent is not None:
                raise permanent from exc
            last_response, last_error = None, exc
            outcome = _error_text(exc)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # Too many redirects, undecodable content, a malformed URL: retrying cannot help.
            raise _permanent(method, url, exc) from exc
        else:
            status = response.status_code
            if not (is_retryable_status(status) or status in also_retry):
                return response
            last_response, last_error = response, None
            outcome = status_line(response)
        if attempt + 1 == policy.max_attempts:
            break
        wait = policy.backoff(attempt, last_response)
        _log.debug(
            "Retrying request",
            extra={
                "attrs": {
                    "method": method,
                    "url": url,
                    "attempt": attempt + 1,
                    "outcome": outcome,
                    "wait": wait,
                }
            },
        )
        await policy.sleep(wait)
    if hand_back_last and last_response is not None:
        return last_response
    raise _exhausted(method, url, policy.max_attempts, last_response, last_error) from last_error


def _exhausted(
    method: str,
    url: str,
    attempts: int,
    response: httpx.Response | None,
    error: Exception | None,
) -> RetryExhaustedError:
    reason = f"giving up after {attempts} attempt(s)"
    if response is not None:
        reason += f": unexpected HTTP status {status_line(response)}"
    elif error is not None:
        reason += f": {_error_text(error)}"
    exc = RetryExhaustedError(
        f"{describe(method, url, response)}: {reason}",
        method=method,
        url=url,
        status=None if response is None else response.status_code,
        activity_id=None if response is None else response.headers.get(ACTIVITY_ID_HEADER),
        request_id=None if response is None else response.headers.get(REQUEST_ID_HEADER),
    )
    exc.attempts = attempts
    return exc


def _permanent(method: str, url: str, exc: Exception) -> PermanentTransportError:
    return PermanentTransportError(
        f"{describe(method, url)}: {_error_text(exc)}", method=method, url=url
    )


def _error_text(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
