"""The message session of a scale set: long-poll, acknowledge, acquire (``docs/protocol.md``
§3.13-§4).

Session create/refresh/delete and acquirejobs are Actions-service requests (admin token refreshed
first, ``api-version`` added); acquirejobs authenticates with the *message-queue* token. The queue
GET and DELETE go to the session's ``messageQueueUrl`` with the queue token only. A 401 from any of
the three queue calls refreshes the session (PATCH) and retries once.

Every request goes through the :class:`~outrunner.scaleset._transport.Transport` of the client
that opened the session, so it carries the client's User-Agent, retries and admin token. The queue
GET and DELETE go through a connection pool of the session's own (``SessionPool``), so the long
polls of many scale sets sharing one client each keep their connection from one poll to the next
(the reasons are in ``_transport``'s docstring). The pool is closed when the session is deleted or
closed, or when a refresh finds that GitHub no longer has the session, so a session given up is
not left holding a connection; a later queue request would open it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Self, TypeVar

import httpx

from outrunner.scaleset import _json
from outrunner.scaleset._transport import Transport
from outrunner.scaleset.errors import (
    MessageQueueTokenExpiredError,
    ScaleSetError,
    SessionExpiredError,
    response_error,
    status_line,
)
from outrunner.scaleset.types import RunnerScaleSetMessage, RunnerScaleSetSession
from outrunner.scaleset.urls import API_VERSION, SCALE_SETS, append_path, with_query

_log = logging.getLogger("outrunner.scaleset.session")
_T = TypeVar("_T")

MAX_CAPACITY_HEADER = "X-ScaleSetMaxCapacity"


def _unexpected(response: httpx.Response, *, token_expired: bool = False) -> ScaleSetError:
    # The Go session client words its cause differently from the main client's: no colon, and the
    # full status line.
    return response_error(
        response,
        f"unexpected status code {status_line(response)}",
        token_expired=token_expired,
    )


class MessageSession:
    """An open message session. Open one with ``Client.create_message_session``.

    As an async context manager it deletes the session on exit, logging (not raising) a failure;
    call :meth:`delete` to see the error instead.
    """

    def __init__(
        self, transport: Transport, scale_set_id: int, session: RunnerScaleSetSession
    ) -> None:
        self._transport = transport
        self._queue = transport.session_pool()
        self._scale_set_id = scale_set_id
        self._session = session
        self._refresh_lock = asyncio.Lock()
        self._deleted = False

    @classmethod
    async def create(cls, transport: Transport, scale_set_id: int, owner: str) -> MessageSession:
        """POST a new session (200); a live session elsewhere raises ``SessionConflictError``.

        ``transport`` is the client's; ``Client.create_message_session`` passes it.
        """
        response = await transport.actions_request(
            "POST",
            f"{SCALE_SETS}/{scale_set_id}/sessions",
            content=_json.dumps(_json.render_new_session(owner)),
        )
        if response.status_code != 200:
            raise _unexpected(response)
        session = _json.parse_response(response, _json.parse_session, "message session")
        _log.info(
            "Created message session",
            extra={"attrs": {"scale_set_id": scale_set_id, "session_id": session.session_id}},
        )
        return cls(transport, scale_set_id, session)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def session(self) -> RunnerScaleSetSession:
        return self._session

    @property
    def scale_set_id(self) -> int:
        return self._scale_set_id

    def __repr__(self) -> str:
        return f"MessageSession(scale_set_id={self._scale_set_id}, session={self._session!r})"

    def _session_path(self) -> str:
        return f"{SCALE_SETS}/{self._scale_set_id}/sessions/{self._session.session_id}"

    # ------------------------------------------------------------------------------ lifecycle

    async def refresh(self) -> RunnerScaleSetSession:
        """PATCH the session (no body); the answer replaces every field, queue URL and token too."""
        async with self._refresh_lock:
            return await self._refresh_locked()

    async def _refresh_locked(self) -> RunnerScaleSetSession:
        response = await self._transport.actions_request("PATCH", self._session_path())
        if response.status_code != 200:
            error = _unexpected(response)
            if isinstance(error, SessionExpiredError) or error.status == 404:
                await self._queue.aclose()  # GitHub no longer has the session
            raise error
        self._session = _json.parse_response(response, _json.parse_session, "message session")
        return self._session

    async def delete(self) -> None:
        """DELETE the session (204); raises on failure. Idempotent once it succeeded."""
        if self._deleted:
            return
        response = await self._transport.actions_request("DELETE", self._session_path())
        if response.status_code != 204:
            raise _unexpected(response)
        self._deleted = True
        await self._queue.aclose()
        _log.info(
            "Deleted message session",
            extra={"attrs": {"scale_set_id": self._scale_set_id}},
        )

    async def close(self) -> None:
        """Delete the session, logging a failure instead of raising (for exit paths)."""
        try:
            await self.delete()
        except ScaleSetError as exc:
            _log.warning(
                "Failed to delete message session",
                extra={"attrs": {"scale_set_id": self._scale_set_id, "error": str(exc)}},
            )
        finally:
            await self._queue.aclose()

    # ------------------------------------------------------------------------------ queue

    async def get_message(
        self, last_message_id: int, max_capacity: int
    ) -> RunnerScaleSetMessage | None:
        """Long-poll for the next message after ``last_message_id``; ``None`` when there is none."""
        return await self._with_fresh_token(
            lambda session: self._get_message(session, last_message_id, max_capacity)
        )

    async def delete_message(self, message_id: int) -> None:
        """Acknowledge a message (204 only)."""
        await self._with_fresh_token(lambda session: self._delete_message(session, message_id))

    async def acquire_jobs(self, request_ids: Sequence[int]) -> list[int]:
        """Acquire ``JobAvailable`` runner requests; returns the ids the service acquired."""
        return await self._with_fresh_token(
            lambda session: self._acquire_jobs(session, request_ids)
        )

    async def _get_message(
        self, session: RunnerScaleSetSession, last_message_id: int, max_capacity: int
    ) -> RunnerScaleSetMessage | None:
        url = session.message_queue_url
        if last_message_id > 0:
            url = with_query(url, {"lastMessageId": str(last_message_id)})
        headers = {
            "Accept": f"application/json; api-version={API_VERSION}",
            "Authorization": f"Bearer {session.message_queue_access_token}",
            MAX_CAPACITY_HEADER: str(max_capacity),
        }
        response = await self._queue.send("GET", url, headers=headers)
        if response.status_code == 202:
            return None
        if response.status_code == 200:
            return _json.parse_response(
                response, _json.parse_message, "runner scale set message response"
            )
        raise _unexpected(response, token_expired=response.status_code == 401)

    async def _delete_message(self, session: RunnerScaleSetSession, message_id: int) -> None:
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {session.message_queue_access_token}",
        }
        url = append_path(session.message_queue_url, str(message_id))
        response = await self._queue.send("DELETE", url, headers=headers)
        if response.status_code != 204:
            raise _unexpected(response, token_expired=response.status_code == 401)

    async def _acquire_jobs(
        self, session: RunnerScaleSetSession, request_ids: Sequence[int]
    ) -> list[int]:
        response = await self._transport.actions_request(
            "POST",
            f"{SCALE_SETS}/{self._scale_set_id}/acquirejobs",
            content=_json.dumps(list(request_ids)),
            bearer=session.message_queue_access_token,
        )
        if response.status_code != 200:
            raise _unexpected(response, token_expired=response.status_code == 401)
        return _json.parse_response(response, _json.parse_acquired_jobs, "acquire jobs response")

    async def _with_fresh_token(self, call: Callable[[RunnerScaleSetSession], Awaitable[_T]]) -> _T:
        """Run ``call``; on a 401, refresh the session and run it once more with the new token."""
        session = self._session
        try:
            return await call(session)
        except MessageQueueTokenExpiredError:
            _log.info(
                "Message queue token expired, refreshing session",
                extra={"attrs": {"scale_set_id": self._scale_set_id}},
            )
        async with self._refresh_lock:
            # Another caller may have refreshed while this one waited; one PATCH is enough.
            if self._session is session:
                try:
                    await self._refresh_locked()
                except ScaleSetError as exc:
                    exc.add_note("while refreshing the message session after a 401")
                    raise
        return await call(self._session)
