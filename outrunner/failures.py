"""Which failures waiting fixes and which it does not: the one place that decides.

* **transient**: connection errors and timeouts, 5xx and 429 after the client's own retries, a
  409 session conflict, an expired session or message-queue token. The worker retries setup or
  reconnects its session with backoff, forever; every runner keeps running.
* **permanent**: the token exchange refusing the credentials (401/403, or 404 for an unknown
  organization or repository; for a GitHub App also its installation-token request: a JWT signed
  with the wrong key or refused for its times, an unknown or suspended installation, each a
  :class:`~outrunner.scaleset.GitHubAppError` naming the App and installation), an unknown
  runner group, a TLS certificate that does not verify,
  an invalid URL or scheme, a redirect loop, a bad configuration. At start-up the run ends with
  one ``outrunner: error:`` line (exit 1); after start-up that scale set stops (it stops taking
  work and lets its busy runners finish first), the others keep serving, and the process exits 1
  once every scale set has stopped.
* **unknown**: anything else (a bug, a surprise from the service) is treated as transient, but
  the first time it happens its traceback is logged, so it can be reported.

See the error table in ``docs/reliability.md``.
"""

from __future__ import annotations

from enum import StrEnum

from outrunner.config import ConfigError
from outrunner.scaleset.auth import GitHubAppError
from outrunner.scaleset.errors import (
    InvalidConfigURLError,
    MessageQueueTokenExpiredError,
    NameLookupError,
    PermanentTransportError,
    RetryExhaustedError,
    SessionConflictError,
    SessionExpiredError,
    StatusError,
    TransportError,
)

__all__ = ["Failure", "classify"]


class Failure(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    UNKNOWN = "unknown"


# The requests that turn the configured credentials into tokens: a refusal there means the
# token or App is wrong, revoked or lacks the scope, and waiting does not change that.
_TOKEN_EXCHANGE = (
    "/actions/runners/registration-token",
    "/actions/runner-registration",
    "/access_tokens",
)


def classify(exc: BaseException) -> Failure:
    """Whether waiting can fix ``exc``."""
    if isinstance(exc, ConfigError | InvalidConfigURLError | PermanentTransportError):
        return Failure.PERMANENT
    if isinstance(exc, NameLookupError):  # e.g. the runner group does not exist
        return Failure.PERMANENT
    if isinstance(exc, SessionConflictError | SessionExpiredError | MessageQueueTokenExpiredError):
        return Failure.TRANSIENT
    if isinstance(exc, GitHubAppError) and exc.status in (401, 403, 404):
        return Failure.PERMANENT  # the App's key, id, installation or permissions are wrong
    if isinstance(exc, StatusError):
        if exc.status in (401, 403, 404) and _is_token_exchange(exc.url):
            return Failure.PERMANENT
        if exc.status is None or exc.status >= 500 or exc.status == 429:
            return Failure.TRANSIENT
        return Failure.UNKNOWN
    if isinstance(exc, TransportError | RetryExhaustedError | TimeoutError | ConnectionError):
        return Failure.TRANSIENT
    return Failure.UNKNOWN


def _is_token_exchange(url: str | None) -> bool:
    path = (url or "").split("?", 1)[0]
    return any(path.endswith(suffix) for suffix in _TOKEN_EXCHANGE)
