"""The scale set API client: admin-token handling, scale sets, runner groups, JIT configs, runners.

Every request is built here (``_send`` and ``_actions_request``); :mod:`.session` reuses both so
headers, retries and token refresh live in one place.

The Go client runs one public call at a time under a mutex. This one does not need to: calls share
nothing mutable except the admin token, whose refresh is serialised by :class:`AdminTokenCache`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Self, TypeVar

import httpx

from outrunner.scaleset import _json, retry
from outrunner.scaleset.auth import (
    AdminConnection,
    AdminTokenCache,
    Credentials,
    fetch_admin_connection,
    fetch_registration_token,
)
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
from outrunner.scaleset.urls import GitHubConfig, actions_url, parse_config_url

_log = logging.getLogger("outrunner.scaleset.client")
_T = TypeVar("_T")

SCALE_SETS = "_apis/runtime/runnerscalesets"
RUNNERS = "_apis/distributedtask/pools/0/agents"
RUNNER_GROUPS = "_apis/runtime/runnergroups/"  # the trailing slash is part of the route
DEFAULT_TIMEOUT = 300.0  # per attempt; well above the ~50 s long poll
CONNECT_TIMEOUT = 30.0  # establishing a connection, within an attempt


@dataclass(frozen=True, kw_only=True)
class SystemInfo:
    """Who is calling; sent in the User-Agent JSON. Update ``scale_set_id`` once it is known."""

    system: str = ""
    version: str = ""
    commit_sha: str = ""
    scale_set_id: int = 0
    subsystem: str = ""


def _build_info() -> tuple[str, str]:
    """The installed outrunner version, and a commit when the version carries one (``+g<sha>``)."""
    try:
        version = importlib.metadata.version("outrunner")
    except importlib.metadata.PackageNotFoundError:
        return "unknown", "unknown"
    commit = re.search(r"(?:^|[+.])g([0-9a-f]{7,40})(?:$|\.)", version.partition("+")[2])
    return version, commit.group(1) if commit else version


_BUILD_VERSION, _BUILD_COMMIT = _build_info()


def user_agent(info: SystemInfo) -> str:
    """The one-line User-Agent JSON, keys in the Go client's order (§3.1)."""
    return json.dumps(
        {
            "system": info.system,
            "version": info.version,
            "commit_sha": info.commit_sha,
            "scale_set_id": info.scale_set_id,
            "subsystem": info.subsystem,
            "build_version": _BUILD_VERSION,
            "build_commit_sha": _BUILD_COMMIT,
            "kind": "scaleset",
        },
        separators=(",", ":"),
    )


class Client:
    """Talks to GitHub and the Actions service for one config URL.

    An async context manager owning its connection pool; creating it makes no network call.
    ``proxy`` defaults to the environment's ``HTTP(S)_PROXY``; ``verify`` may be a CA bundle path
    (which replaces the system roots), an ``ssl.SSLContext`` or ``False``. ``transport`` replaces
    the network (tests). ``timeout`` bounds each attempt.
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
        self._config = parse_config_url(config_url)
        self._credentials = credentials
        self._retry = retry or RetryPolicy()
        self._timeout = timeout
        self._system_info = system_info or SystemInfo()
        self._user_agent = user_agent(self._system_info)
        if isinstance(verify, str):
            verify = ssl.create_default_context(cafile=verify)
        self._http = httpx.AsyncClient(
            proxy=proxy,
            verify=verify,
            transport=transport,
            # An unreachable host must not hold a shutdown for the whole attempt timeout (which
            # must stay above the ~50 s long poll).
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
            follow_redirects=True,  # like Go's http.Client, which the Go library uses
            max_redirects=10,
        )
        self._admin = AdminTokenCache(self._fetch_admin_connection)

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
        await self._http.aclose()

    @property
    def config(self) -> GitHubConfig:
        return self._config

    @property
    def system_info(self) -> SystemInfo:
        return self._system_info

    def set_system_info(
        self, info: SystemInfo | None = None, *, scale_set_id: int | None = None
    ) -> None:
        """Replace the system info, or only its ``scale_set_id``; later requests carry it."""
        info = info or self._system_info
        if scale_set_id is not None:
            info = replace(info, scale_set_id=scale_set_id)
        self._system_info = info
        self._user_agent = user_agent(info)

    def __repr__(self) -> str:
        return f"Client({self._config.config_url!r})"

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
            raise lookup_error(response, f"no runner group found with name {go_quote(name)}")
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
        return await MessageSession.create(self, scale_set_id, owner)

    async def delete_message_session(self, scale_set_id: int, session_id: str) -> None:
        """DELETE a session by id (204), e.g. one a crashed process left open; an unknown or
        expired one raises ``SessionExpiredError``."""
        await self._call("DELETE", f"{SCALE_SETS}/{scale_set_id}/sessions/{session_id}", expect=204)

    # ------------------------------------------------------------------------------ plumbing

    async def _send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
        retry_auth_failures: bool = False,
    ) -> httpx.Response:
        """Every request of this package goes through here: User-Agent, retries, attempt timeout."""
        return await retry.send(
            self._http,
            self._retry,
            method,
            url,
            headers={**headers, "User-Agent": self._user_agent},
            content=content,
            attempt_timeout=self._timeout,
            also_retry=(401, 403) if retry_auth_failures else (),
            hand_back_last=retry_auth_failures,
        )

    async def _actions_request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        bearer: str | None = None,
    ) -> httpx.Response:
        """An Actions-service request: admin token refreshed first, ``api-version`` in the query.

        ``bearer`` replaces the admin token (acquirejobs sends the message-queue token).
        """
        admin = await self._admin.get()
        headers = {
            "Content-Type": "application/json",  # on every method, GET and DELETE included
            "Authorization": f"Bearer {bearer if bearer is not None else admin.token}",
        }
        url = actions_url(admin.url, path, params)
        return await self._send(method, url, headers=headers, content=content)

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
        response = await self._actions_request(method, path, params=params, content=content)
        if response.status_code != expect:
            raise response_error(response, f"unexpected status code: {response.status_code}")
        return response

    async def _fetch_admin_connection(self) -> AdminConnection:
        _log.info(
            "Refreshing admin token", extra={"attrs": {"config_url": self._config.config_url}}
        )
        registration_token = await fetch_registration_token(
            self._send, self._config, self._credentials
        )
        return await fetch_admin_connection(self._send, self._config, registration_token)

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
