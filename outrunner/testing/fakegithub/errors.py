"""Errors raised inside the fake and turned into HTTP answers by the router."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from outrunner.testing.fakegithub.outage import Outage

# Namespaces of the .NET exception type names the real services put in ``typeName``. The client
# matches them by substring (docs/protocol.md §5), so the fully qualified forms are used.
RUNTIME = "GitHub.Actions.Runtime.WebApi"
DISTRIBUTED_TASK = "GitHub.DistributedTask.WebApi"
SERVICES = "GitHub.Services.WebApi"


def type_name(namespace: str, exception: str) -> str:
    """``"<ns>.<Exception>, <ns>"``, the assembly-qualified shape the Actions service uses."""
    return f"{namespace}.{exception}, {namespace}"


class Stopping(Exception):
    """The server is shutting down: the request is answered by closing the connection."""


class OutageCut(Exception):
    """An outage began while the request was held (long poll, delay): answer it as the outage."""

    def __init__(self, outage: Outage) -> None:
        super().__init__("cut by an outage")
        self.outage = outage


class ApiError(Exception):
    """An error answer: ``status`` with a JSON (or plain-text) body.

    Actions-service errors carry ``{"typeName", "message"}``; GitHub REST errors carry
    ``{"message", "documentation_url"}``; agent-protocol errors are plain text so a shell can print
    them.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_name: str | None = None,
        rest: bool = False,
        plain: bool = False,
    ) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.type_name = type_name
        self.rest = rest
        self.plain = plain

    def body(self) -> tuple[bytes, str]:
        """The encoded body and its content type."""
        if self.plain:
            return (self.message + "\n").encode(), "text/plain; charset=utf-8"
        payload: dict[str, object]
        if self.rest:
            payload = {"message": self.message, "documentation_url": "https://docs.github.com/rest"}
        else:
            payload = {"typeName": self.type_name or "", "message": self.message}
        return json.dumps(payload).encode(), "application/json; charset=utf-8"


def runtime_error(status: int, exception: str, message: str) -> ApiError:
    return ApiError(status, message, type_name=type_name(RUNTIME, exception))


def task_error(status: int, exception: str, message: str) -> ApiError:
    return ApiError(status, message, type_name=type_name(DISTRIBUTED_TASK, exception))


def bad_request(message: str) -> ApiError:
    return ApiError(400, message, type_name="System.ArgumentException, System.Private.CoreLib")
