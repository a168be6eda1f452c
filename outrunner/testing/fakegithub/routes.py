"""Request dispatch: path and method -> endpoint -> handler, plus auth, faults and the request log.

The router knows HTTP (status codes, headers, bodies); the state knows the domain. Every request,
answered or not, is recorded once, after it finished, with its endpoint and final status.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from outrunner.testing.fakegithub import tokens
from outrunner.testing.fakegithub.apps import check_signed_app_jwt
from outrunner.testing.fakegithub.endpoints import Endpoint
from outrunner.testing.fakegithub.errors import (
    SERVICES,
    ApiError,
    OutageCut,
    Stopping,
    bad_request,
    type_name,
)
from outrunner.testing.fakegithub.faults import FaultPlan
from outrunner.testing.fakegithub.model import RECORDED_HEADERS, RecordedRequest
from outrunner.testing.fakegithub.outage import Outage
from outrunner.testing.fakegithub.state import (
    AGENT_PREFIX,
    API_PREFIX,
    BASE_PATH,
    QUEUE_PREFIX,
    State,
)

API_VERSION = "6.0-preview"
_JSON = "application/json; charset=utf-8"
# Longest hold an agent may ask for; keeps a forgotten agent from pinning a thread for long.
_MAX_AGENT_WAIT = 300.0


@dataclass(frozen=True, kw_only=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]  # lower-case names
    body: bytes


@dataclass(frozen=True, kw_only=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, payload: object) -> Response:
    return Response(status=status, body=json.dumps(payload).encode(), content_type=_JSON)


def list_response(items: list[Any]) -> Response:
    return json_response(200, {"count": len(items), "value": items})


@dataclass
class _Context:
    """What a handler learned about the request, for the log."""

    auth_scheme: str | None = None
    auth_valid: bool | None = None
    parsed: Any = None

    def credential(self, request: Request) -> str:
        """The token of the Authorization header; records the scheme (never the token)."""
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        self.auth_scheme = scheme or None
        return token.strip()

    def bearer(self, request: Request) -> str:
        """The Bearer token, or "" (never valid) when another scheme was used."""
        token = self.credential(request)
        return token if self.auth_scheme == "Bearer" else ""


_Handler = Callable[[Request, _Context, Mapping[str, str]], Response]


@dataclass(frozen=True)
class _Route:
    endpoint: Endpoint
    method: str
    pattern: re.Pattern[str]
    handler: _Handler


_ACTIONS = re.escape(BASE_PATH) + "/_apis"
_SCALE_SETS = _ACTIONS + "/runtime/runnerscalesets"
_AGENTS = _ACTIONS + r"/distributedtask/pools/\d+/agents"
_API = re.escape(API_PREFIX)


@dataclass
class Router:
    state: State
    faults: FaultPlan
    _routes: list[_Route] = field(default_factory=list)

    def __post_init__(self) -> None:
        table: list[tuple[Endpoint, str, str, _Handler]] = [
            (
                Endpoint.REGISTRATION_TOKEN,
                "POST",
                _API + r"/(?P<scope>repos/[^/]+/[^/]+|orgs/[^/]+|enterprises/[^/]+)"
                r"/actions/runners/registration-token",
                self._registration_token,
            ),
            (
                Endpoint.APP_ACCESS_TOKEN,
                "POST",
                _API + r"/app/installations/(?P<installation>\d+)/access_tokens",
                self._app_access_token,
            ),
            (
                Endpoint.RUNNER_REGISTRATION,
                "POST",
                _API + r"/actions/runner-registration",
                self._runner_registration,
            ),
            (Endpoint.GET_SCALE_SET, "GET", _SCALE_SETS, self._get_scale_set),
            (Endpoint.CREATE_SCALE_SET, "POST", _SCALE_SETS, self._create_scale_set),
            (
                Endpoint.GET_SCALE_SET_BY_ID,
                "GET",
                _SCALE_SETS + r"/(?P<id>\d+)",
                self._get_scale_set_by_id,
            ),
            (
                Endpoint.UPDATE_SCALE_SET,
                "PATCH",
                _SCALE_SETS + r"/(?P<id>\d+)",
                self._update_scale_set,
            ),
            (
                Endpoint.DELETE_SCALE_SET,
                "DELETE",
                _SCALE_SETS + r"/(?P<id>\d+)",
                self._delete_scale_set,
            ),
            # The trailing slash is part of the real route; clients must keep it.
            (
                Endpoint.GET_RUNNER_GROUP,
                "GET",
                _ACTIONS + "/runtime/runnergroups/",
                self._get_runner_group,
            ),
            (
                Endpoint.GENERATE_JIT,
                "POST",
                _SCALE_SETS + r"/(?P<id>\d+)/generatejitconfig",
                self._generate_jit,
            ),
            (Endpoint.LIST_RUNNERS, "GET", _AGENTS, self._list_runners),
            (Endpoint.GET_RUNNER, "GET", _AGENTS + r"/(?P<runner>\d+)", self._get_runner),
            (
                Endpoint.DELETE_RUNNER,
                "DELETE",
                _AGENTS + r"/(?P<runner>\d+)",
                self._delete_runner,
            ),
            (
                Endpoint.CREATE_SESSION,
                "POST",
                _SCALE_SETS + r"/(?P<id>\d+)/sessions",
                self._create_session,
            ),
            (
                Endpoint.REFRESH_SESSION,
                "PATCH",
                _SCALE_SETS + r"/(?P<id>\d+)/sessions/(?P<session>[^/]+)",
                self._refresh_session,
            ),
            (
                Endpoint.DELETE_SESSION,
                "DELETE",
                _SCALE_SETS + r"/(?P<id>\d+)/sessions/(?P<session>[^/]+)",
                self._delete_session,
            ),
            (
                Endpoint.ACQUIRE_JOBS,
                "POST",
                _SCALE_SETS + r"/(?P<id>\d+)/acquirejobs",
                self._acquire_jobs,
            ),
            (
                Endpoint.GET_MESSAGE,
                "GET",
                re.escape(QUEUE_PREFIX) + r"/(?P<session>[^/]+)",
                self._get_message,
            ),
            (
                Endpoint.DELETE_MESSAGE,
                "DELETE",
                re.escape(QUEUE_PREFIX) + r"/(?P<session>[^/]+)/(?P<message>[^/]+)",
                self._delete_message,
            ),
            (
                Endpoint.AGENT_CONNECT,
                "POST",
                re.escape(AGENT_PREFIX) + "/connect",
                self._agent_connect,
            ),
            (
                Endpoint.AGENT_COMPLETE,
                "POST",
                re.escape(AGENT_PREFIX) + "/complete",
                self._agent_complete,
            ),
        ]
        self._routes = [
            _Route(endpoint, method, re.compile(pattern), handler)
            for endpoint, method, pattern, handler in table
        ]

    # -- dispatch -------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response | None:
        """Answer one request; None means "close the connection without an answer"."""
        context = _Context()
        endpoint: Endpoint | None = None
        response: Response | None = None
        fault_kind: str | None = None
        try:
            matched = [r for r in self._routes if r.pattern.fullmatch(request.path)]
            route = next((r for r in matched if r.method == request.method), None)
            if route is None:
                response = self._no_route(request, matched)
            elif (outage := self.state.outage_for(route.endpoint)) is not None:
                # Down: not handled, and pending faults stay queued for after the outage.
                endpoint, fault_kind = route.endpoint, "outage"
                context.credential(request)
                response = self._outage_response(outage, endpoint)
            else:
                endpoint = route.endpoint
                fault = self.faults.take(endpoint)
                fault_kind = fault.kind if fault is not None else None
                if fault is not None and fault.kind == "fail":
                    context.credential(request)
                    response = Response(
                        status=fault.status,
                        body=fault.body,
                        content_type=fault.content_type,
                        headers=fault.headers,
                    )
                elif fault is not None and fault.kind == "drop":
                    response = None
                else:
                    if fault is not None:
                        self.state.sleep(fault.seconds, endpoint)
                    match = route.pattern.fullmatch(request.path)
                    assert match is not None
                    params = {k: v for k, v in match.groupdict().items() if v is not None}
                    response = route.handler(request, context, params)
        except ApiError as error:
            body, content_type = error.body()
            response = Response(status=error.status, body=body, content_type=content_type)
        except OutageCut as cut:
            # A long poll or delayed request that was open when the outage began.
            assert endpoint is not None
            fault_kind = "outage"
            response = self._outage_response(cut.outage, endpoint)
        except Stopping:
            response = None
        self.state.record(
            RecordedRequest(
                endpoint=endpoint,
                method=request.method,
                path=request.path,
                query=dict(request.query),
                auth_scheme=context.auth_scheme,
                auth_valid=context.auth_valid,
                headers={
                    name: request.headers[name.lower()]
                    for name in RECORDED_HEADERS
                    if name.lower() in request.headers
                },
                json=context.parsed,
                status=None if response is None else response.status,
                fault=fault_kind,
            )
        )
        return response

    @staticmethod
    def _outage_response(outage: Outage, endpoint: Endpoint) -> Response | None:
        if outage.status is None:
            return None
        body, content_type = outage.error(endpoint).body()
        return Response(
            status=outage.status, body=body, content_type=content_type, headers=outage.headers
        )

    @staticmethod
    def _no_route(request: Request, matched: list[_Route]) -> Response:
        if matched:
            allow = ", ".join(sorted({r.method for r in matched}))
            return Response(
                status=405,
                body=json.dumps({"message": f"{request.method} not allowed"}).encode(),
                content_type=_JSON,
                headers=(("Allow", allow),),
            )
        return json_response(404, {"message": f"Not Found: {request.path}"})

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _json(request: Request, context: _Context, *, rest: bool = False) -> Any:
        if not request.body:
            return None
        try:
            context.parsed = json.loads(request.body)
        except (UnicodeDecodeError, ValueError) as error:
            if rest:
                raise ApiError(400, "Problems parsing JSON", rest=True) from error
            raise bad_request(f"The request body is not valid JSON: {error}") from error
        return context.parsed

    @staticmethod
    def _form(request: Request, context: _Context) -> dict[str, str]:
        form = dict(parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True))
        context.parsed = form
        return form

    def _actions_auth(self, request: Request, context: _Context) -> None:
        """Admin-token check and api-version check shared by every Actions-service route."""
        token = context.credential(request)
        context.auth_valid = (
            context.auth_scheme == "Bearer" and self.state.credentials.admin_token_valid(token)
        )
        if not context.auth_valid:
            raise ApiError(
                401,
                "The user is not authorized to access this resource: the admin token is missing, "
                "unknown or expired.",
                type_name=type_name(SERVICES, "VssUnauthorizedException"),
            )
        self._api_version(request)

    @staticmethod
    def _api_version(request: Request) -> None:
        version = request.query.get("api-version")
        if version is None:
            raise ApiError(
                400,
                "No api-version was supplied for the request.",
                type_name=type_name(SERVICES, "VssVersionNotSpecifiedException"),
            )
        if version != API_VERSION:
            raise ApiError(
                400,
                f"The requested api-version {version} is not supported.",
                type_name=type_name(SERVICES, "VssInvalidApiVersionException"),
            )

    @staticmethod
    def _int_param(query: Mapping[str, str], name: str) -> int | None:
        raw = query.get(name)
        if raw is None or raw == "":
            return None
        try:
            return int(raw)
        except ValueError as error:
            raise bad_request(f"{name} must be an integer") from error

    def _queue_auth(self, request: Request, context: _Context, session_id: str) -> None:
        token = context.credential(request)
        valid = self.state.queue_token_valid(session_id, token)
        context.auth_valid = context.auth_scheme == "Bearer" and valid
        if not context.auth_valid:
            # The client treats any 401 here as "message queue token expired" and refreshes.
            raise ApiError(401, "The message queue access token is invalid or expired.", plain=True)
        expected = self.state.settings.message_queue_query
        if expected:
            for key, value in parse_qsl(expected, keep_blank_values=True):
                if request.query.get(key) != value:
                    raise ApiError(
                        400,
                        f"query parameter {key!r} of the messageQueueUrl is missing",
                        plain=True,
                    )

    # -- GitHub REST ----------------------------------------------------------------------------

    def _registration_token(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        token = context.credential(request)
        context.auth_valid = context.auth_scheme in ("Bearer", "token") and (
            self.state.credentials.bearer_valid(token)
        )
        if not context.auth_valid:
            raise ApiError(401, "Bad credentials", rest=True)
        raw_scope = params["scope"]
        kind, _, rest = raw_scope.partition("/")
        scope = raw_scope if kind == "enterprises" else rest
        if not self.state.credentials.scope_exists(scope):
            raise ApiError(404, "Not Found", rest=True)
        issued, expires = self.state.credentials.issue_registration_token(scope)
        return json_response(
            201, {"token": issued, "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}
        )

    def _app_access_token(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        credentials = self.state.credentials
        token = context.credential(request)
        installation = int(params["installation"])
        apps = credentials.apps()
        if context.auth_scheme != "Bearer":
            problem: str | None = "Bearer authentication is required"
        elif apps:
            # Registered Apps: the JWT must be signed with the key of the App it names.
            app, problem = check_signed_app_jwt(token, apps)
        else:
            # No App registered: any well-formed JWT (the legacy app_client_id mode).
            app, problem = (
                None,
                tokens.check_app_jwt(token, client_id=self.state.settings.app_client_id),
            )
        context.auth_valid = problem is None
        if problem is not None:
            raise ApiError(401, problem, rest=True)
        if app is not None:
            status = credentials.installation_status(app, installation)
            if status == 404:
                raise ApiError(404, "Not Found", rest=True)
            if status == 403:
                raise ApiError(403, "This installation has been suspended", rest=True)
        elif self.state.settings.app_installation_id not in (None, installation):
            raise ApiError(404, "Not Found", rest=True)
        issued, expires = credentials.issue_installation_token()
        return json_response(
            201, {"token": issued, "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}
        )

    def _runner_registration(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        token = context.credential(request)
        scope = (
            self.state.credentials.registration_scope(token)
            if context.auth_scheme == "RemoteAuth"
            else None
        )
        context.auth_valid = scope is not None
        if scope is None:
            raise ApiError(401, "Invalid registration token (RemoteAuth required)", rest=True)
        body = self._json(request, context, rest=True)
        return json_response(201, self.state.runner_registration(scope, body))

    # -- scale sets and runner groups -----------------------------------------------------------

    def _get_scale_set(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        self._actions_auth(request, context)
        group = self._int_param(request.query, "runnerGroupId")
        return list_response(self.state.list_scale_sets(group, request.query.get("name")))

    def _get_scale_set_by_id(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        self._actions_auth(request, context)
        return json_response(200, self.state.get_scale_set(int(params["id"])))

    def _create_scale_set(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        self._actions_auth(request, context)
        body = self._json(request, context)
        return json_response(200, self.state.create_scale_set(body))

    def _update_scale_set(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        self._actions_auth(request, context)
        body = self._json(request, context)
        return json_response(200, self.state.update_scale_set(int(params["id"]), body))

    def _delete_scale_set(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        self._actions_auth(request, context)
        self.state.delete_scale_set(int(params["id"]))
        return Response(status=204)

    def _get_runner_group(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        self._actions_auth(request, context)
        return list_response(self.state.list_runner_groups(request.query.get("groupName")))

    # -- runners --------------------------------------------------------------------------------

    def _generate_jit(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        self._actions_auth(request, context)
        body = self._json(request, context)
        return json_response(200, self.state.generate_jit(int(params["id"]), body))

    def _list_runners(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        self._actions_auth(request, context)
        return list_response(self.state.list_agents(request.query.get("agentName")))

    def _get_runner(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        self._actions_auth(request, context)
        return json_response(200, self.state.get_agent(int(params["runner"])))

    def _delete_runner(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        self._actions_auth(request, context)
        self.state.delete_agent(int(params["runner"]))
        return Response(status=204)

    # -- sessions and jobs ----------------------------------------------------------------------

    def _create_session(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        self._actions_auth(request, context)
        body = self._json(request, context)
        return json_response(200, self.state.create_session(int(params["id"]), body))

    def _refresh_session(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        self._actions_auth(request, context)
        self._json(request, context)
        session = self.state.refresh_session(int(params["id"]), params["session"])
        return json_response(200, session)

    def _delete_session(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        self._actions_auth(request, context)
        self.state.delete_session(int(params["id"]), params["session"])
        return Response(status=204)

    def _acquire_jobs(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        scale_set_id = int(params["id"])
        # The one Actions call authenticated with the message-queue token, not the admin token.
        token = context.credential(request)
        context.auth_valid = context.auth_scheme == "Bearer" and (
            self.state.scale_set_queue_token_valid(scale_set_id, token)
        )
        if not context.auth_valid:
            raise ApiError(401, "The message queue access token is invalid or expired.", plain=True)
        self._api_version(request)
        body = self._json(request, context)
        return list_response(self.state.acquire_jobs(scale_set_id, body))

    # -- message queue --------------------------------------------------------------------------

    def _get_message(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        session_id = params["session"]
        self._queue_auth(request, context, session_id)
        last = self._int_param(request.query, "lastMessageId") or 0
        raw_capacity = request.headers.get("x-scalesetmaxcapacity")
        capacity: int | None = None
        if raw_capacity is not None:
            try:
                capacity = int(raw_capacity)
            except ValueError:
                capacity = -1
            if capacity < 0:
                raise ApiError(
                    400, "X-ScaleSetMaxCapacity must be a non-negative integer", plain=True
                )
        message = self.state.get_message(session_id, last, capacity)
        if message is None:
            return Response(status=202)
        return json_response(200, message)

    def _delete_message(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        session_id = params["session"]
        self._queue_auth(request, context, session_id)
        try:
            message_id = int(params["message"])
        except ValueError as error:
            raise ApiError(404, "no such message", plain=True) from error
        self.state.delete_message(session_id, message_id)
        return Response(status=204)

    # -- agent protocol -------------------------------------------------------------------------

    def _agent_connect(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        credential = context.bearer(request)
        form = self._form(request, context)
        try:
            wait = float(form.get("wait") or self.state.settings.long_poll_timeout)
        except ValueError as error:
            raise ApiError(400, "wait must be a number of seconds", plain=True) from error
        wait = min(max(wait, 0.0), _MAX_AGENT_WAIT)
        try:
            job = self.state.agent_connect(credential, wait, form.get("session", ""))
        except ApiError as error:
            context.auth_valid = error.status != 401
            raise
        context.auth_valid = True
        if job is None:
            return Response(status=204)
        return Response(
            status=200, body=job.lines().encode(), content_type="text/plain; charset=utf-8"
        )

    def _agent_complete(
        self, request: Request, context: _Context, params: Mapping[str, str]
    ) -> Response:
        credential = context.bearer(request)
        form = self._form(request, context)
        job_id = form.get("job_id", "")
        if not job_id:
            raise ApiError(400, "job_id is required", plain=True)
        try:
            self.state.agent_complete(credential, job_id, form.get("result", ""))
        except ApiError as error:
            context.auth_valid = error.status != 401
            raise
        context.auth_valid = True
        return Response(status=200, body=b"ok\n", content_type="text/plain; charset=utf-8")
