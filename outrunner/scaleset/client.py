"""The scale set API client: scale sets, runner groups, JIT configs, runners, message sessions.

Every request goes through the client's private :class:`~outrunner.scaleset._transport.Transport`
(User-Agent, retries, timeouts, TLS, admin-token refresh), which the message sessions it opens
share, so headers, retries and token refresh live in one place.

The Go client runs one public call at a time under a mutex. This one does not need to: calls share
nothing mutable except the admin token, whose refresh is serialised by ``AdminTokenCache``.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Self, TypeVar

import httpx

from outrunner.scaleset import _json
from outrunner.scaleset._transport import (
    CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    SystemInfo,
    Transport,
    user_agent,
)
from outrunner.scaleset.auth import Credentials
from outrunner.scaleset.errors import go_quote, lookup_error, protocol_error, response_error
from outrunner.scaleset.retry import RetryPolicy
from outrunner.scaleset.session import MessageSession
from outrunner.scaleset.types import (
    JitRunnerConfig,
    JitRunnerSetting,
    Label,
    RunnerGroup,
    RunnerReference,
    RunnerScaleSet,
)
from outrunner.scaleset.urls import (
    RUNNER_GROUPS,
    RUNNERS,
    SCALE_SETS,
    GitHubConfig,
    parse_config_url,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "RUNNERS",
    "RUNNER_GROUPS",
    "SCALE_SETS",
    "Client",
    "SystemInfo",
    "user_agent",
]

_T = TypeVar("_T")


class Client:
    """Talks to GitHub and the Actions service for one config URL.

    An async context manager owning its connection pool; creating it makes no network call.

    ``verify``: ``True`` (the default) verifies certificates against the operating system's trust
    store; a path to a PEM CA bundle trusts that bundle *instead* (like the Go client's
    ``WithRootCAs``; :class:`ScaleSetError` if it cannot be loaded); an ``ssl.SSLContext`` is used
    as given; ``False`` turns verification off. A certificate that does not verify raises
    :class:`TLSVerificationError` at once, without retries. ``proxy`` defaults to the
    environment's ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` with ``NO_PROXY``. ``timeout``
    bounds each attempt (reads included; connecting is bounded by ``CONNECT_TIMEOUT`` within it)
    and must stay above the ~50 s long poll. ``transport`` replaces the network (tests).
    """

    def __init__(
        self,
        config_url: str,
        credentials: Credentials,
        *,
        system_info: SystemInfo | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        proxy: str | None = None,
        verify: bool | str | ssl.SSLContext = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._transport = Transport(
            parse_config_url(config_url),
            credentials,
            system_info=system_info or SystemInfo(),
            retry=retry or RetryPolicy(),
            timeout=timeout,
            proxy=proxy,
            verify=verify,
            transport=transport,
        )

    # ------------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    @property
    def config(self) -> GitHubConfig:
        return self._transport.config

    @property
    def system_info(self) -> SystemInfo:
        return self._transport.system_info

    def set_system_info(
        self, info: SystemInfo | None = None, *, scale_set_id: int | None = None
    ) -> None:
        """Replace the system info, or only its ``scale_set_id``; later requests carry it."""
        info = info or self._transport.system_info
        if scale_set_id is not None:
            info = replace(info, scale_set_id=scale_set_id)
        self._transport.system_info = info

    def __repr__(self) -> str:
        return f"Client({self.config.config_url!r})"

    # ------------------------------------------------------------------------------ scale sets

    async def get_runner_scale_set(self, runner_group_id: int, name: str) -> RunnerScaleSet | None:
        """The scale set called ``name`` in the runner group, or ``None`` (count 0)."""
        response = await self._call(
            "GET", SCALE_SETS, params={"runnerGroupId": str(runner_group_id), "name": name}
        )
        count, found = self._list(response, _json.parse_runner_scale_set, "runner scale set list")
        if count == 0:  # authoritative even when "value" has entries
            return None
        if count == 1:
            return self._first(response, found)
        raise lookup_error(response, f"multiple runner scale sets found with name {go_quote(name)}")

    async def get_runner_scale_set_by_id(self, scale_set_id: int) -> RunnerScaleSet | None:
        """The scale set, or ``None`` when the service answers ``null``."""
        response = await self._call("GET", f"{SCALE_SETS}/{scale_set_id}")
        return _json.parse_response(
            response, _optional(_json.parse_runner_scale_set), "runner scale set"
        )

    async def create_runner_scale_set(self, scale_set: RunnerScaleSet) -> RunnerScaleSet:
        """Create a scale set (success is 200). Without labels, the name becomes a System label."""
        if not scale_set.labels:
            if not scale_set.name:
                raise ValueError("runner scale set must have a name or at least one label")
            scale_set = replace(scale_set, labels=(Label(name=scale_set.name, type="System"),))
        response = await self._call(
            "POST", SCALE_SETS, body=_json.render_runner_scale_set(scale_set)
        )
        return _json.parse_response(response, _json.parse_runner_scale_set, "runner scale set")

    async def update_runner_scale_set(
        self, scale_set_id: int, scale_set: RunnerScaleSet
    ) -> RunnerScaleSet:
        """PATCH the whole object; empty label types are sent as ``System``."""
        response = await self._call(
            "PATCH",
            f"{SCALE_SETS}/{scale_set_id}",
            body=_json.render_runner_scale_set(scale_set),
        )
        return _json.parse_response(response, _json.parse_runner_scale_set, "runner scale set")

    async def delete_runner_scale_set(self, scale_set_id: int) -> None:
        await self._call("DELETE", f"{SCALE_SETS}/{scale_set_id}", expect=204)

    async def get_runner_group_by_name(self, name: str) -> RunnerGroup:
        response = await self._call("GET", RUNNER_GROUPS, params={"groupName": name})
        count, found = self._list(response, _json.parse_runner_group, "runner group list")
        if count == 1:
            return self._first(response, found)
        if count == 0:
            # The request URL is the Actions service's; the config URL says which org it is.
            raise lookup_error(
                response,
                f"no runner group found with name {go_quote(name)} at {self.config.config_url}",
            )
        raise lookup_error(response, f"multiple runner group found with name {go_quote(name)}")

    # ------------------------------------------------------------------------------ runners

    async def generate_jit_runner_config(
        self, setting: JitRunnerSetting, scale_set_id: int
    ) -> JitRunnerConfig:
        """Register a just-in-time runner; a taken name raises ``RunnerExistsError``."""
        response = await self._call(
            "POST",
            f"{SCALE_SETS}/{scale_set_id}/generatejitconfig",
            body=_json.render_jit_setting(setting),
        )
        return _json.parse_response(response, _json.parse_jit_config, "runner JIT config")

    async def get_runner(self, runner_id: int) -> RunnerReference:
        response = await self._call("GET", f"{RUNNERS}/{runner_id}")
        return _json.parse_response(response, _json.parse_runner_reference, "runner reference")

    async def get_runner_by_name(self, name: str) -> RunnerReference | None:
        response = await self._call("GET", RUNNERS, params={"agentName": name})
        count, found = self._list(response, _json.parse_runner_reference, "runner list")
        if count == 0:
            return None
        if count == 1:
            return self._first(response, found)
        raise lookup_error(response, f"multiple runners found with name {go_quote(name)}")

    async def remove_runner(self, runner_id: int) -> None:
        """Deregister a runner (204); ``RunnerNotFoundError`` or ``JobStillRunningError`` if not."""
        await self._call("DELETE", f"{RUNNERS}/{runner_id}", expect=204)

    # ------------------------------------------------------------------------------ sessions

    async def create_message_session(self, scale_set_id: int, owner: str) -> MessageSession:
        """Open the scale set's message session; a second one raises ``SessionConflictError``."""
        return await MessageSession.create(self._transport, scale_set_id, owner)

    async def delete_message_session(self, scale_set_id: int, session_id: str) -> None:
        """DELETE a session by id (204), e.g. one a crashed process left open; an unknown or
        expired one raises ``SessionExpiredError``."""
        await self._call("DELETE", f"{SCALE_SETS}/{scale_set_id}/sessions/{session_id}", expect=204)

    # ------------------------------------------------------------------------------ plumbing

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: object = None,
        expect: int = 200,
    ) -> httpx.Response:
        content = None if body is None else _json.dumps(body)
        response = await self._transport.actions_request(
            method, path, params=params, content=content
        )
        if response.status_code != expect:
            raise response_error(response, f"unexpected status code: {response.status_code}")
        return response

    @staticmethod
    def _list(
        response: httpx.Response, item: Callable[[object, str], _T], what: str
    ) -> tuple[int, list[_T]]:
        return _json.parse_response(response, lambda raw: _json.parse_list(raw, item, what), what)

    @staticmethod
    def _first(response: httpx.Response, found: list[_T]) -> _T:
        if not found:
            raise protocol_error(response, "count is 1 but value is empty")
        return found[0]


def _optional(parse: Callable[[object], _T]) -> Callable[[object], _T | None]:
    return lambda raw: None if raw is None else parse(raw)
