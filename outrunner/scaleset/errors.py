"""Exceptions raised by the scale set client, and the rules that turn a response into one.

The hierarchy::

    ScaleSetError                    base; carries the request context when there was a request
    ├── InvalidConfigURLError        the config URL names no enterprise, org or repository
    ├── TransportError               no response: connect/read failure, timeout
    │   └── PermanentTransportError  never retried: bad scheme, URL or header, redirect loop
    │       └── TLSVerificationError the server's certificate did not verify
    ├── RetryExhaustedError          every attempt failed retryably: "giving up after 5 attempt(s)"
    ├── ProtocolError                a response or session that does not fit the protocol
    ├── NameLookupError              a by-name lookup matched no entry, or several
    └── StatusError                  unexpected HTTP status; ``type_name`` = service exception
        ├── RunnerExistsError              …AgentExistsException
        ├── RunnerNotFoundError            …AgentNotFoundException
        ├── JobStillRunningError           …JobStillRunningException
        ├── SessionConflictError           …RunnerScaleSetSessionConflictException
        ├── SessionExpiredError            …RunnerScaleSetSessionExpiredException
        └── MessageQueueTokenExpiredError  401 from the message queue or acquirejobs

Messages follow ``docs/protocol.md`` §5 so that logs read like the Go client's::

    request GET <url> failed(status="404 Not Found", activity_id="…"): <cause>: <detail>

where ``<cause>`` is e.g. ``unexpected status code: 404`` and ``<detail>`` comes from the body.
"""

from __future__ import annotations

import json
from typing import TypeVar

import httpx

ACTIVITY_ID_HEADER = "ActivityId"
REQUEST_ID_HEADER = "X-GitHub-Request-Id"
_BOM = b"\xef\xbb\xbf"


class ScaleSetError(Exception):
    """Base of every error raised by ``outrunner.scaleset``.

    ``method`` and ``url`` name the request that failed (``None`` when no request was involved);
    ``status`` is the HTTP status of its response (``None`` when there was none);
    ``activity_id`` and ``request_id`` are the Actions service's ``ActivityId`` and GitHub's
    ``X-GitHub-Request-Id`` response headers.
    """

    def __init__(
        self,
        message: str,
        *,
        method: str | None = None,
        url: str | None = None,
        status: int | None = None,
        activity_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.url = url
        self.status = status
        self.activity_id = activity_id
        self.request_id = request_id

    def __str__(self) -> str:
        return self.message


class InvalidConfigURLError(ScaleSetError, ValueError):
    """The config URL cannot be parsed or points to no enterprise, organization or repository."""


class TransportError(ScaleSetError):
    """The request got no response (connection refused or dropped, timeout, TLS failure)."""


class PermanentTransportError(TransportError):
    """A request that retrying cannot help, so it was tried once: an unsupported URL scheme, a
    malformed URL or header, more than 10 redirects, a body that cannot be decoded."""


class TLSVerificationError(PermanentTransportError):
    """The server's TLS certificate did not verify against the trusted roots (the system trust
    store, or the CA file the client was given); the message says which. Never retried: a
    certificate that does not verify now will not verify on the next attempt either."""


class RetryExhaustedError(ScaleSetError):
    """Every attempt failed in a retryable way; ``attempts`` says how many were made."""

    attempts: int = 0


class ProtocolError(ScaleSetError):
    """A response or session that does not fit the protocol: bad JSON, shape or message type."""


class NameLookupError(ScaleSetError):
    """A lookup by name found nothing where something is required, or found more than one entry."""


class StatusError(ScaleSetError):
    """The service answered with a status the call does not accept.

    ``type_name`` and ``detail`` come from the service's JSON error body when it had one.
    """

    type_name: str = ""
    detail: str = ""


class RunnerExistsError(StatusError):
    """A runner with that name is already registered (``AgentExistsException``)."""


class RunnerNotFoundError(StatusError):
    """The runner does not exist (``AgentNotFoundException``)."""


class JobStillRunningError(StatusError):
    """The runner still has a job in progress (``JobStillRunningException``)."""


class SessionConflictError(StatusError):
    """The scale set already has an active session (``RunnerScaleSetSessionConflictException``)."""


class SessionExpiredError(StatusError):
    """The message session is unknown or expired (``RunnerScaleSetSessionExpiredException``)."""


class MessageQueueTokenExpiredError(StatusError):
    """The message queue rejected the session's token (401)."""


# Matched as substrings of ``typeName`` so fully qualified .NET names match too
# (docs/protocol.md §5). The first three also replace the cause text, like the Go sentinels; the
# session ones only pick the class.
_SENTINELS: tuple[tuple[str, type[StatusError], str], ...] = (
    ("AgentExistsException", RunnerExistsError, "runner exists"),
    ("AgentNotFoundException", RunnerNotFoundError, "runner not found"),
    ("JobStillRunningException", JobStillRunningError, "job still running"),
)
_SESSION_EXCEPTIONS: tuple[tuple[str, type[StatusError]], ...] = (
    ("RunnerScaleSetSessionConflictException", SessionConflictError),
    ("RunnerScaleSetSessionExpiredException", SessionExpiredError),
)
TOKEN_EXPIRED_CAUSE = "message queue token expired"


def go_quote(text: str) -> str:
    """Quote like Go's ``%q`` closely enough for messages: double quotes, backslash escapes."""
    return json.dumps(text, ensure_ascii=False)


def status_line(response: httpx.Response) -> str:
    """``"404 Not Found"``: the status code and the reason phrase the server sent."""
    return f"{response.status_code} {response.reason_phrase}".rstrip()


def strip_bom(body: bytes) -> bytes:
    return body[len(_BOM) :] if body.startswith(_BOM) else body


_E = TypeVar("_E", bound=ScaleSetError)


def _with_context(cls: type[_E], message: str, response: httpx.Response) -> _E:
    return cls(
        message,
        method=response.request.method,
        url=str(response.request.url),
        status=response.status_code,
        activity_id=response.headers.get(ACTIVITY_ID_HEADER) or None,
        request_id=response.headers.get(REQUEST_ID_HEADER) or None,
    )


def describe(method: str, url: str, response: httpx.Response | None = None) -> str:
    """The ``request GET <url> failed(status=…, activity_id=…, github_request_id=…)`` prefix."""
    text = f"request {method} {url} failed"
    if response is None:
        return text
    fields = [f"status={go_quote(status_line(response))}"]
    if activity_id := response.headers.get(ACTIVITY_ID_HEADER):
        fields.append(f"activity_id={go_quote(activity_id)}")
    if request_id := response.headers.get(REQUEST_ID_HEADER):
        fields.append(f"github_request_id={go_quote(request_id)}")
    return f"{text}({', '.join(fields)})"


def response_error(
    response: httpx.Response, cause: str, *, token_expired: bool = False
) -> StatusError:
    """Build the error for an unexpected response, reading its body as docs/protocol.md §5 says.

    ``cause`` is the caller's reason (``unexpected status code: 404``); ``token_expired`` marks the
    message-queue 401 path, whose body is quoted raw.
    """
    prefix = describe(response.request.method, str(response.request.url), response)
    body = strip_bom(response.content)
    cls: type[StatusError] = MessageQueueTokenExpiredError if token_expired else StatusError
    if token_expired:
        cause = TOKEN_EXPIRED_CAUSE
    type_name = ""
    if response.headers.get("Content-Length") == "0" or not body:
        detail = "unknown error"
    elif token_expired or "text/plain" in response.headers.get("Content-Type", ""):
        detail = body.decode("utf-8", "replace")
    else:
        try:
            parsed = json.loads(body)
            if not isinstance(parsed, dict):
                raise ValueError("not an object")
            type_name = _str_field(parsed, "typename")
            message = _str_field(parsed, "message")
        except ValueError:
            text = body.decode("utf-8", "replace")
            detail = f"failed to unmarshal error response body: {go_quote(text)}"
        else:
            detail = message
            for needle, sentinel_cls, sentinel_text in _SENTINELS:
                if needle in type_name:
                    cls, cause = sentinel_cls, sentinel_text
                    break
            else:
                for needle, session_cls in _SESSION_EXCEPTIONS:
                    if needle in type_name:
                        cls = session_cls
                        break
                detail = f"{type_name}: {message}"
    error = _with_context(cls, f"{prefix}: {cause}: {detail}", response)
    error.type_name = type_name
    error.detail = detail
    return error


def protocol_error(response: httpx.Response, reason: str) -> ProtocolError:
    """A response that arrived with an accepted status but cannot be used."""
    prefix = describe(response.request.method, str(response.request.url), response)
    return _with_context(ProtocolError, f"{prefix}: {reason}", response)


def lookup_error(response: httpx.Response, reason: str) -> NameLookupError:
    prefix = describe(response.request.method, str(response.request.url), response)
    return _with_context(NameLookupError, f"{prefix}: {reason}", response)


def _str_field(obj: dict[str, object], lower_key: str) -> str:
    """Read a string field of the error body with Go's case-insensitive key matching."""
    value: object = None
    for key, item in obj.items():
        if key.lower() == lower_key:
            value = item
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{lower_key} is not a string")
    return value
