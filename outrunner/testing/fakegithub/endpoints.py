"""Names of the fake's endpoints, used by fault injection and the request log."""

from __future__ import annotations

from enum import StrEnum


class Endpoint(StrEnum):
    """One value per route the fake serves; ``str(Endpoint.X)`` is the lower-case name."""

    # GitHub REST API (GHES mode, under /api/v3).
    REGISTRATION_TOKEN = "registration_token"
    APP_ACCESS_TOKEN = "app_access_token"
    RUNNER_REGISTRATION = "runner_registration"
    # Actions service, under the base URL handed out by runner-registration.
    GET_SCALE_SET = "get_scale_set"
    GET_SCALE_SET_BY_ID = "get_scale_set_by_id"
    CREATE_SCALE_SET = "create_scale_set"
    UPDATE_SCALE_SET = "update_scale_set"
    DELETE_SCALE_SET = "delete_scale_set"
    GET_RUNNER_GROUP = "get_runner_group"
    GENERATE_JIT = "generate_jit"
    GET_RUNNER = "get_runner"
    LIST_RUNNERS = "list_runners"
    DELETE_RUNNER = "delete_runner"
    CREATE_SESSION = "create_session"
    REFRESH_SESSION = "refresh_session"
    DELETE_SESSION = "delete_session"
    ACQUIRE_JOBS = "acquire_jobs"
    # Message queue, at the session's absolute messageQueueUrl.
    GET_MESSAGE = "get_message"
    DELETE_MESSAGE = "delete_message"
    # The fake runner agent's own protocol.
    AGENT_CONNECT = "agent_connect"
    AGENT_COMPLETE = "agent_complete"


# The GitHub REST API (api.github.com or GHES /api/v3): errors are {"message", "documentation_url"}.
REST_ENDPOINTS = frozenset(
    {Endpoint.REGISTRATION_TOKEN, Endpoint.APP_ACCESS_TOKEN, Endpoint.RUNNER_REGISTRATION}
)
# What the runner itself talks to. The real runner reaches a different service (its broker) than
# the scale set API a listener uses, so one can be down while the other is up.
AGENT_ENDPOINTS = frozenset({Endpoint.AGENT_CONNECT, Endpoint.AGENT_COMPLETE})
# Everything a scale set client talks to: the REST API, the Actions service, the message queue.
SERVICE_ENDPOINTS = frozenset(Endpoint) - AGENT_ENDPOINTS
