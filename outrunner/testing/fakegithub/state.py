"""The fake's Actions-side model: scale sets, runner groups, agents, sessions, queues and jobs.

Everything is guarded by one re-entrant lock. A single condition variable on that lock is notified
after every change; long polls (message GET, agent connect) and ``wait_for`` wait on it and re-check
their own predicate. With the handful of waiters a test has, that is simpler and cheaper than
per-queue conditions, and it cannot miss a wake-up.

Methods named after an API call raise ``ApiError`` with the status and body the real service would
answer; the router turns those into HTTP responses.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from outrunner.testing.fakegithub import tokens
from outrunner.testing.fakegithub.auth import Credentials
from outrunner.testing.fakegithub.endpoints import Endpoint
from outrunner.testing.fakegithub.entities import (
    AgentJob,
    AgentRecord,
    Envelope,
    Group,
    JobRecord,
    ScaleSetRecord,
    SessionRecord,
    Settings,
    rfc3339,
    utcnow,
)
from outrunner.testing.fakegithub.errors import (
    ApiError,
    OutageCut,
    Stopping,
    bad_request,
    runtime_error,
    task_error,
)
from outrunner.testing.fakegithub.model import (
    JobInfo,
    JobState,
    RecordedRequest,
    RunnerInfo,
    RunnerStatus,
    ScaleSetInfo,
    SessionInfo,
    Statistics,
)
from outrunner.testing.fakegithub.outage import Outage

# The real service batches at most 50 job messages per envelope (docs/protocol.md §4.1).
MAX_JOBS_PER_MESSAGE = 50
# Real message ids are large (e.g. 100003863); starting there catches int32-ish assumptions.
FIRST_MESSAGE_ID = 100_000_000
DEFAULT_RUNNER_GROUP_ID = 1
DEFAULT_RUNNER_GROUP = "default"
BASE_PATH = "/tenant/1"
API_PREFIX = "/api/v3"
QUEUE_PREFIX = "/queue"
AGENT_PREFIX = "/_agent"
# The one label a scale set created without labels answers to (the client's own default).
_SYSTEM = "System"


def _field(body: Mapping[str, Any], key: str) -> Any:
    """A JSON object member looked up case-insensitively, as Go's decoder does."""
    if key in body:
        return body[key]
    folded = key.casefold()
    for name, value in body.items():
        if name.casefold() == folded:
            return value
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class State:
    """All of the fake's mutable state; every public method takes the lock."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.credentials = Credentials(
            pat=settings.pat,
            owner=settings.owner,
            repo=settings.repo,
            admin_token_ttl=settings.admin_token_ttl,
            installation_token_ttl=settings.installation_token_ttl,
        )
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.stopping = False
        self.url = ""  # set by the server once bound
        self.version = 0
        self._ids = {
            "scale_set": itertools.count(1),
            "agent": itertools.count(1),
            "job": itertools.count(1),
            "run": itertools.count(5001),
            "message": itertools.count(FIRST_MESSAGE_ID),
            "group": itertools.count(DEFAULT_RUNNER_GROUP_ID + 1),
        }
        self._groups: dict[int, Group] = {
            DEFAULT_RUNNER_GROUP_ID: Group(
                id=DEFAULT_RUNNER_GROUP_ID, name=DEFAULT_RUNNER_GROUP, is_default=True
            )
        }
        self._scale_sets: dict[int, ScaleSetRecord] = {}
        self._sessions: dict[str, SessionRecord] = {}
        self._agents: dict[int, AgentRecord] = {}
        self._agents_by_credential: dict[str, AgentRecord] = {}
        self._jobs: dict[int, JobRecord] = {}
        # The jobs of _jobs not completed yet, oldest first: what scheduling, statistics and an
        # agent's connect look at. Completed jobs stay in _jobs only, so those calls cost the
        # same after thousands of jobs as after a few.
        self._open: dict[int, JobRecord] = {}
        self._requests: list[RecordedRequest] = []
        self._outages: list[Outage] = []

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.url + BASE_PATH

    def _touch(self) -> None:
        self.version += 1
        self.changed.notify_all()

    def shutdown(self) -> None:
        with self.lock:
            self.stopping = True
            self._touch()

    def sleep(self, seconds: float, endpoint: Endpoint | None = None) -> None:
        """Sleep, but raise ``Stopping`` as soon as the server stops, and ``OutageCut`` as soon
        as an outage covers ``endpoint``."""
        deadline = time.monotonic() + seconds
        with self.lock:
            while not self.stopping:
                if endpoint is not None:
                    self._check_outage(endpoint)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.changed.wait(remaining)
            raise Stopping

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds, re-checking it after every state change.

        The predicate runs *without* the lock, so it may do anything, even call the fake over
        HTTP; the version counter makes sure no change between two checks goes unnoticed.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                seen = self.version
            if predicate():
                return True
            with self.lock:
                while self.version == seen:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self.stopping:
                        return False
                    self.changed.wait(remaining)

    # -- outages --------------------------------------------------------------------------------

    def start_outage(self, outage: Outage) -> None:
        with self.lock:
            self._outages.append(outage)
            # Wakes the long polls and delays of the affected endpoints, which then end.
            self._touch()

    def end_outage(self, outage: Outage) -> None:
        with self.lock:
            if outage in self._outages:
                self._outages.remove(outage)
                self._touch()

    def outage_for(self, endpoint: Endpoint) -> Outage | None:
        """The oldest active outage that covers ``endpoint``, if any."""
        with self.lock:
            return next((o for o in self._outages if endpoint in o.endpoints), None)

    def _check_outage(self, endpoint: Endpoint) -> None:
        outage = self.outage_for(endpoint)
        if outage is not None:
            raise OutageCut(outage)

    def record(self, request: RecordedRequest) -> None:
        with self.lock:
            self._requests.append(request)
            self._touch()

    def requests(self) -> list[RecordedRequest]:
        with self.lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self.lock:
            self._requests.clear()

    # -- GitHub REST side -----------------------------------------------------------------------

    def runner_registration(self, scope: str, body: Any) -> dict[str, str]:
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object", rest=True)
        url, event = _field(body, "url"), _field(body, "runner_event")
        if not isinstance(url, str) or not url:
            raise ApiError(400, "url is required", rest=True)
        if event != "register":
            raise ApiError(400, "runner_event must be 'register'", rest=True)
        if urlsplit(url).path.strip("/").casefold() != scope.casefold():
            raise ApiError(400, f"the registration token is not valid for {url}", rest=True)
        # The trailing slash is what the service sends; clients must keep the base's path.
        return {"url": self.base_url + "/", "token": self.credentials.issue_admin_token()}

    # -- runner groups and scale sets -----------------------------------------------------------

    def add_runner_group(self, name: str) -> int:
        with self.lock:
            if any(g.name.casefold() == name.casefold() for g in self._groups.values()):
                raise ValueError(f"runner group {name!r} already exists")
            group = Group(id=next(self._ids["group"]), name=name, is_default=False)
            self._groups[group.id] = group
            self._touch()
            return group.id

    def list_runner_groups(self, name: str | None) -> list[dict[str, Any]]:
        with self.lock:
            groups = [
                g
                for g in self._groups.values()
                if name is None or g.name.casefold() == name.casefold()
            ]
            return [self._render_group(g) for g in groups]

    def _render_group(self, group: Group) -> dict[str, Any]:
        size = sum(
            1
            for a in self._agents.values()
            if self._scale_sets[a.scale_set_id].group_id == group.id
        )
        return {
            "id": group.id,
            "name": group.name,
            "size": size,
            "isDefaultGroup": group.is_default,
        }

    def _scale_set(self, scale_set_id: int) -> ScaleSetRecord:
        scale_set = self._scale_sets.get(scale_set_id)
        if scale_set is None:
            raise runtime_error(
                404,
                "RunnerScaleSetNotFoundException",
                f"No runner scale set found with identifier {scale_set_id}.",
            )
        return scale_set

    def _render_scale_set(self, scale_set: ScaleSetRecord) -> dict[str, Any]:
        group = self._groups[scale_set.group_id]
        return {
            "id": scale_set.id,
            "name": scale_set.name,
            "runnerGroupId": group.id,
            "runnerGroupName": group.name,
            "labels": [{"type": kind, "name": name} for name, kind in scale_set.labels],
            # camelCase like the .NET service; the Go client sends "RunnerSetting" and reads
            # either spelling because its decoder matches keys case-insensitively.
            "runnerSetting": {"disableUpdate": scale_set.disable_update},
            "createdOn": rfc3339(scale_set.created_on),
            "runnerJitConfigUrl": (
                f"{self.base_url}/_apis/runtime/runnerscalesets/{scale_set.id}/generatejitconfig"
            ),
            "statistics": self._statistics(scale_set.id).to_json(),
        }

    def list_scale_sets(self, group_id: int | None, name: str | None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                self._render_scale_set(s)
                for s in self._scale_sets.values()
                if (group_id is None or s.group_id == group_id)
                and (name is None or s.name.casefold() == name.casefold())
            ]

    def get_scale_set(self, scale_set_id: int) -> dict[str, Any]:
        with self.lock:
            return self._render_scale_set(self._scale_set(scale_set_id))

    @staticmethod
    def _parse_labels(raw: Any, default_name: str) -> list[tuple[str, str]]:
        if raw is None or raw == []:
            # The client normally fills this in; a scale set must answer to something.
            return [(default_name, _SYSTEM)]
        if not isinstance(raw, list):
            raise bad_request("labels must be an array")
        labels: list[tuple[str, str]] = []
        for item in raw:
            name = _field(item, "name") if isinstance(item, dict) else None
            if not isinstance(name, str) or not name:
                raise bad_request("every label needs a non-empty name")
            kind = _field(item, "type")
            labels.append((name, kind if isinstance(kind, str) and kind else _SYSTEM))
        return labels

    @staticmethod
    def _parse_disable_update(body: Mapping[str, Any]) -> bool | None:
        setting = _field(body, "runnerSetting")
        if setting is None:
            return None
        if not isinstance(setting, dict):
            raise bad_request("RunnerSetting must be an object")
        return _field(setting, "disableUpdate") is True

    def _group_for(self, raw: Any) -> Group:
        if raw is None or raw == 0:
            return self._groups[DEFAULT_RUNNER_GROUP_ID]
        if not _is_int(raw):
            raise bad_request("runnerGroupId must be an integer")
        group = self._groups.get(raw)
        if group is None:
            raise task_error(404, "RunnerGroupNotFoundException", f"Runner group {raw} not found.")
        return group

    def _check_name_free(self, name: str, group_id: int, except_id: int | None = None) -> None:
        for other in self._scale_sets.values():
            if (
                other.id != except_id
                and other.group_id == group_id
                and other.name.casefold() == name.casefold()
            ):
                raise runtime_error(
                    409,
                    "RunnerScaleSetExistsException",
                    f"A runner scale set named '{name}' already exists in runner group {group_id}.",
                )

    def create_scale_set(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise bad_request("body must be a runner scale set object")
        name = _field(body, "name")
        if not isinstance(name, str) or not name.strip():
            raise bad_request("The runner scale set name is required.")
        with self.lock:
            group = self._group_for(_field(body, "runnerGroupId"))
            self._check_name_free(name, group.id)
            scale_set = ScaleSetRecord(
                id=next(self._ids["scale_set"]),
                name=name,
                group_id=group.id,
                labels=self._parse_labels(_field(body, "labels"), name),
                disable_update=bool(self._parse_disable_update(body)),
                created_on=utcnow(),
            )
            self._scale_sets[scale_set.id] = scale_set
            self._schedule()
            self._touch()
            return self._render_scale_set(scale_set)

    def update_scale_set(self, scale_set_id: int, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise bad_request("body must be a runner scale set object")
        with self.lock:
            scale_set = self._scale_set(scale_set_id)
            name = _field(body, "name")
            if name is not None and not isinstance(name, str):
                raise bad_request("name must be a string")
            group = scale_set.group_id
            raw_group = _field(body, "runnerGroupId")
            if raw_group not in (None, 0):
                group = self._group_for(raw_group).id
            new_name = name or scale_set.name
            self._check_name_free(new_name, group, except_id=scale_set.id)
            labels = _field(body, "labels")
            if labels is not None:
                scale_set.labels = self._parse_labels(labels, new_name)
            disable_update = self._parse_disable_update(body)
            if disable_update is not None:
                scale_set.disable_update = disable_update
            scale_set.name, scale_set.group_id = new_name, group
            # New labels may make queued jobs routable.
            self._schedule()
            self._touch()
            return self._render_scale_set(scale_set)

    def delete_scale_set(self, scale_set_id: int) -> None:
        with self.lock:
            self._scale_set(scale_set_id)
            del self._scale_sets[scale_set_id]
            for session in [s for s in self._sessions.values() if s.scale_set_id == scale_set_id]:
                del self._sessions[session.id]
            for agent in [a for a in self._agents.values() if a.scale_set_id == scale_set_id]:
                agent.removed = True
                del self._agents[agent.id]
            for job in list(self._open.values()):
                if job.scale_set_id != scale_set_id:
                    continue
                if job.state is JobState.RUNNING:
                    # Its runner is gone with the scale set (its agent record too, so nothing is
                    # left to mark); nobody will report completion, and nobody listens for it.
                    self._finish(job, "canceled", emit=False)
                else:
                    # Not started yet: GitHub would hand it to another matching scale set.
                    self._requeue(job)
            self._schedule()
            self._touch()

    @staticmethod
    def _requeue(job: JobRecord) -> None:
        job.state, job.scale_set_id, job.acquired = JobState.QUEUED, None, False
        job.scale_set_assign_time = None

    # -- agents (runners) -----------------------------------------------------------------------

    def generate_jit(self, scale_set_id: int, body: Any) -> dict[str, Any]:
        name = _field(body, "name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise bad_request("The runner name is required.")
        with self.lock:
            scale_set = self._scale_set(scale_set_id)
            if any(a.name.casefold() == name.casefold() for a in self._agents.values()):
                raise task_error(
                    409,
                    "AgentExistsException",
                    f"A runner with name '{name}' already exists in the pool.",
                )
            agent = AgentRecord(
                id=next(self._ids["agent"]),
                name=name,
                scale_set_id=scale_set.id,
                credential=tokens.new_secret("jit_", 24),
            )
            self._agents[agent.id] = agent
            self._agents_by_credential[agent.credential] = agent
            self._touch()
            return {
                "runner": self._render_agent(agent),
                "encodedJITConfig": self._encode_jit(agent),
            }

    def _encode_jit(self, agent: AgentRecord) -> str:
        # Flat, compact and free of escapes so busybox sed can pull values out (agent.sh).
        config = {
            "url": self.url,
            "runner_id": agent.id,
            "runner_name": agent.name,
            "scale_set_id": agent.scale_set_id,
            "credential": agent.credential,
        }
        raw = json.dumps(config, separators=(",", ":"), ensure_ascii=True)
        return base64.b64encode(raw.encode()).decode("ascii")

    @staticmethod
    def _render_agent(agent: AgentRecord) -> dict[str, Any]:
        return {"id": agent.id, "name": agent.name, "runnerScaleSetId": agent.scale_set_id}

    def _agent(self, runner_id: int) -> AgentRecord:
        agent = self._agents.get(runner_id)
        if agent is None:
            raise task_error(
                404, "AgentNotFoundException", f"No runner found with identifier {runner_id}."
            )
        return agent

    def get_agent(self, runner_id: int) -> dict[str, Any]:
        with self.lock:
            return self._render_agent(self._agent(runner_id))

    def list_agents(self, name: str | None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                self._render_agent(a)
                for a in self._agents.values()
                if name is None or a.name.casefold() == name.casefold()
            ]

    def delete_agent(self, runner_id: int) -> None:
        with self.lock:
            agent = self._agent(runner_id)
            if agent.job is not None and agent.job.state is JobState.RUNNING:
                raise task_error(
                    409,
                    "JobStillRunningException",
                    f"Runner {agent.name} cannot be removed while job "
                    f"{agent.job.job_id} is still running.",
                )
            self._remove_agent(agent)
            self._touch()

    def _remove_agent(self, agent: AgentRecord) -> None:
        agent.removed = True
        self._agents.pop(agent.id, None)

    # -- sessions -------------------------------------------------------------------------------

    def _queue_url(self, session_id: str) -> str:
        url = f"{self.url}{QUEUE_PREFIX}/{session_id}"
        query = self.settings.message_queue_query
        return f"{url}?{query}" if query else url

    def _render_session(self, session: SessionRecord) -> dict[str, Any]:
        return {
            "sessionId": session.id,
            "ownerName": session.owner,
            "runnerScaleSet": self._render_scale_set(self._scale_sets[session.scale_set_id]),
            "messageQueueUrl": self._queue_url(session.id),
            "messageQueueAccessToken": session.token,
            "statistics": self._statistics(session.scale_set_id).to_json(),
        }

    def create_session(self, scale_set_id: int, body: Any) -> dict[str, Any]:
        owner = _field(body, "ownerName") if isinstance(body, dict) else None
        with self.lock:
            scale_set = self._scale_set(scale_set_id)
            self._expire_idle_sessions()
            if any(s.scale_set_id == scale_set_id for s in self._sessions.values()):
                raise runtime_error(
                    409,
                    "RunnerScaleSetSessionConflictException",
                    f"The actions runner scaleset {scale_set.name} already has an active session.",
                )
            session = SessionRecord(
                id=str(uuid.uuid4()),
                scale_set_id=scale_set_id,
                owner=owner if isinstance(owner, str) else "",
                token=tokens.new_secret("mq_", 32),
                token_expires=time.time() + self.settings.queue_token_ttl,
            )
            self._sessions[session.id] = session
            self._touch()
            return self._render_session(session)

    def _session(self, scale_set_id: int | None, session_id: str) -> SessionRecord:
        self._expire_idle_sessions()
        session = self._sessions.get(session_id)
        if session is None or (scale_set_id is not None and session.scale_set_id != scale_set_id):
            raise runtime_error(
                400,
                "RunnerScaleSetSessionExpiredException",
                f"The session identifier {session_id} is not valid.",
            )
        return session

    def refresh_session(self, scale_set_id: int, session_id: str) -> dict[str, Any]:
        with self.lock:
            session = self._session(scale_set_id, session_id)
            session.token = tokens.new_secret("mq_", 32)
            session.token_expires = time.time() + self.settings.queue_token_ttl
            self._touch()
            return self._render_session(session)

    def delete_session(self, scale_set_id: int, session_id: str) -> None:
        with self.lock:
            self._session(scale_set_id, session_id)
            del self._sessions[session_id]
            self._touch()

    def expire_queue_tokens(self) -> None:
        with self.lock:
            for session in self._sessions.values():
                session.token_expires = 0.0

    def expire_sessions(self) -> None:
        """Forget every session, as the service does with listeners that stopped polling."""
        with self.lock:
            self._sessions.clear()
            self._touch()

    def _idle_deadline(self, session: SessionRecord) -> float | None:
        """When ``session`` expires for not polling; None while it polls or without a limit."""
        timeout = self.settings.session_idle_timeout
        if timeout is None or session.open_polls:
            return None
        return session.idle_since + timeout

    def _expire_idle_sessions(self) -> None:
        """Forget the sessions idle past ``session_idle_timeout``, as ``expire_sessions`` does.

        Called before every lookup of a session, so expiry is exact whatever the reaper thread's
        timing; the reaper only makes it visible (and wakes waiters) without a request.
        """
        now = time.monotonic()
        expired = [
            s.id
            for s in self._sessions.values()
            if (deadline := self._idle_deadline(s)) is not None and deadline <= now
        ]
        for session_id in expired:
            # The queue stays with the scale set: the next session gets what is undeleted.
            del self._sessions[session_id]
        if expired:
            self._touch()

    def reap_idle_sessions(self) -> None:
        """Expire idle sessions when they are due, until the server stops (a thread's body)."""
        with self.lock:
            while not self.stopping:
                self._expire_idle_sessions()
                deadlines = [
                    d for s in self._sessions.values() if (d := self._idle_deadline(s)) is not None
                ]
                # Every change notifies the condition, so a new or finished poll is seen at once.
                timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                self.changed.wait(timeout)

    @staticmethod
    def _queue_gone(session_id: str) -> ApiError:
        # There is no queue at the URL of a session that ended: 404, not the 400 of the API.
        return runtime_error(
            404,
            "RunnerScaleSetSessionExpiredException",
            f"The session identifier {session_id} is not valid.",
        )

    def _queue_session(self, session_id: str) -> SessionRecord:
        self._expire_idle_sessions()
        session = self._sessions.get(session_id)
        if session is None:
            raise self._queue_gone(session_id)
        return session

    def queue_token_valid(self, session_id: str, token: str) -> bool:
        """Whether ``token`` is the session's current, unexpired queue token (404 if no session)."""
        with self.lock:
            session = self._queue_session(session_id)
            return session.token == token and session.token_expires > time.time()

    def scale_set_queue_token_valid(self, scale_set_id: int, token: str) -> bool:
        with self.lock:
            self._expire_idle_sessions()
            now = time.time()
            return any(
                s.scale_set_id == scale_set_id and s.token == token and s.token_expires > now
                for s in self._sessions.values()
            )

    # -- message queue --------------------------------------------------------------------------

    def get_message(
        self, session_id: str, last_message_id: int, capacity: int | None
    ) -> dict[str, Any] | None:
        """The oldest undeleted envelope newer than ``last_message_id``, waiting up to the
        long-poll timeout for one; None means "no message" (202)."""
        deadline = time.monotonic() + self.settings.long_poll_timeout
        with self.lock:
            session = self._queue_session(session_id)
            session.polls += 1
            session.polled = True
            # The Go client always sends the header; a poll without one means "no limit".
            session.capacity = capacity
            session.open_polls += 1
            try:
                self._schedule()
                self._touch()
                return self._wait_for_message(session, last_message_id, deadline)
            finally:
                session.open_polls -= 1
                session.idle_since = time.monotonic()
                # The reaper recomputes its deadline.
                self._touch()

    def _wait_for_message(
        self, session: SessionRecord, last_message_id: int, deadline: float
    ) -> dict[str, Any] | None:
        session_id = session.id
        with self.lock:
            while True:
                if self.stopping:
                    raise Stopping
                self._check_outage(Endpoint.GET_MESSAGE)
                if self._sessions.get(session_id) is not session:
                    raise self._queue_gone(session_id)  # deleted or expired while polling
                scale_set = self._scale_sets[session.scale_set_id]
                for envelope in scale_set.queue:
                    if envelope.id > last_message_id:
                        envelope.sealed = True
                        return {
                            "messageId": envelope.id,
                            "messageType": "RunnerScaleSetJobMessages",
                            "body": json.dumps(envelope.jobs, separators=(",", ":")),
                            "statistics": self._statistics(scale_set.id).to_json(),
                        }
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.changed.wait(remaining)

    def delete_message(self, session_id: str, message_id: int) -> None:
        with self.lock:
            session = self._queue_session(session_id)
            scale_set = self._scale_sets[session.scale_set_id]
            before = len(scale_set.queue)
            scale_set.queue = [e for e in scale_set.queue if e.id != message_id]
            # Deleting an already-deleted message is harmless (a retried DELETE whose first
            # answer was lost must not fail the listener); an id never issued is not.
            if len(scale_set.queue) == before and not (
                FIRST_MESSAGE_ID <= message_id <= scale_set.last_message_id
            ):
                raise runtime_error(
                    404, "MessageNotFoundException", f"Message {message_id} was not found."
                )
            self._touch()

    def _emit(self, scale_set_id: int, message_type: str, job: JobRecord, **extra: Any) -> None:
        scale_set = self._scale_sets.get(scale_set_id)
        if scale_set is None:
            return
        envelope = scale_set.queue[-1] if scale_set.queue else None
        if envelope is None or envelope.sealed or len(envelope.jobs) >= MAX_JOBS_PER_MESSAGE:
            envelope = Envelope(id=next(self._ids["message"]))
            scale_set.queue.append(envelope)
            scale_set.last_message_id = envelope.id
        envelope.jobs.append({"messageType": message_type, **self._job_fields(job), **extra})
        if len(envelope.jobs) >= MAX_JOBS_PER_MESSAGE:
            envelope.sealed = True

    @staticmethod
    def _job_fields(job: JobRecord) -> dict[str, Any]:
        return {
            "runnerRequestId": job.request_id,
            "repositoryName": job.repository,
            "ownerName": job.owner,
            "jobId": job.job_id,
            "jobWorkflowRef": (
                f"{job.owner}/{job.repository}/.github/workflows/{job.workflow}@refs/heads/main"
            ),
            "jobDisplayName": job.display_name,
            "workflowRunId": job.workflow_run_id,
            "eventName": job.event_name,
            "requestLabels": list(job.labels),
            "queueTime": rfc3339(job.queue_time),
            "scaleSetAssignTime": rfc3339(job.scale_set_assign_time),
            "runnerAssignTime": rfc3339(job.runner_assign_time),
            "finishTime": rfc3339(job.finish_time),
        }

    # -- jobs -----------------------------------------------------------------------------------

    def queue_job(
        self,
        labels: Sequence[str],
        *,
        duration: float,
        result: str,
        repository: str,
        owner: str | None,
        workflow: str,
        display_name: str | None,
        event_name: str,
        assign_to: int | None = None,
    ) -> int:
        """A new job, routed to a scale set with a listener as they poll, or with ``assign_to``
        assigned to that scale set at once (see :meth:`assign_job`)."""
        if isinstance(labels, str):
            raise TypeError("labels must be a sequence of strings, not a string")
        if not labels:
            raise ValueError("a job needs at least one label")
        if duration < 0:
            raise ValueError("duration must not be negative")
        with self.lock:
            request_id = next(self._ids["job"])
            job = JobRecord(
                request_id=request_id,
                job_id=str(uuid.uuid4()),
                labels=tuple(labels),
                duration=duration,
                planned_result=result,
                repository=repository,
                owner=owner or self.settings.owner,
                workflow=workflow,
                display_name=display_name or f"job-{request_id}",
                workflow_run_id=next(self._ids["run"]),
                event_name=event_name,
                queue_time=utcnow(),
            )
            self._jobs[request_id] = self._open[request_id] = job
            if assign_to is None:
                self._schedule()
            else:
                job.scale_set_id = assign_to
                self._assign(job, utcnow())
            self._touch()
            return request_id

    def assign_job(self, scale_set_id: int, *, duration: float, display_name: str | None) -> int:
        with self.lock:
            scale_set = self._scale_set(scale_set_id)
            return self.queue_job(
                [name for name, _ in scale_set.labels] or ["self-hosted"],
                duration=duration,
                result="succeeded",
                repository="repo",
                owner=None,
                workflow="ci.yml",
                display_name=display_name,
                event_name="push",
                assign_to=scale_set.id,
            )

    def cancel_job(self, request_id: int) -> None:
        with self.lock:
            job = self._jobs.get(request_id)
            if job is None:
                raise KeyError(request_id)
            if job.state is JobState.COMPLETED:
                return
            was_routed = job.state is not JobState.QUEUED
            self._finish(job, "canceled", emit=was_routed)
            self._schedule()
            self._touch()

    def _finish(self, job: JobRecord, result: str, *, emit: bool) -> None:
        job.state, job.result, job.finish_time = JobState.COMPLETED, result, utcnow()
        self._open.pop(job.request_id, None)
        agent = self._agents.get(job.runner_id) if job.runner_id is not None else None
        if emit and job.scale_set_id is not None:
            self._emit(
                job.scale_set_id,
                "JobCompleted",
                job,
                result=result,
                runnerId=job.runner_id or 0,
                runnerName=job.runner_name or "",
            )
        if agent is not None:
            agent.finished = True
            if self.settings.remove_agent_on_completion:
                # Ephemeral JIT runners are deleted server-side once their job is done.
                self._remove_agent(agent)

    @staticmethod
    def _labels_match(job: JobRecord, scale_set: ScaleSetRecord) -> bool:
        names = {name.casefold() for name, _ in scale_set.labels}
        return all(label.casefold() in names for label in job.labels)

    def _schedule(self) -> None:
        """Route queued jobs to scale sets, oldest job first.

        A scale set receives jobs only while it has a session that has polled at least once:
        before the first poll its capacity (``X-ScaleSetMaxCapacity``) is unknown, and the first
        poll itself triggers assignment, so a fresh listener gets its backlog in its first answer.
        It never receives more not-yet-completed jobs than that capacity. Among several matching
        scale sets the lowest id with room wins.
        """
        self._expire_idle_sessions()
        capacity: dict[int, int | None] = {}
        for session in self._sessions.values():
            if session.polled:
                capacity[session.scale_set_id] = session.capacity
        if not capacity:
            return
        in_flight = dict.fromkeys(capacity, 0)
        for job in self._open.values():
            if job.scale_set_id in in_flight:
                in_flight[job.scale_set_id] += 1
        candidates = [self._scale_sets[i] for i in sorted(capacity)]
        now = utcnow()
        for job in self._open.values():
            if job.state is not JobState.QUEUED:
                continue
            for scale_set in candidates:
                limit = capacity[scale_set.id]
                if limit is not None and in_flight[scale_set.id] >= limit:
                    continue
                if not self._labels_match(job, scale_set):
                    continue
                in_flight[scale_set.id] += 1
                job.scale_set_id = scale_set.id
                if self.settings.acquire_mode:
                    job.state = JobState.AVAILABLE
                    acquire_url = (
                        f"{self.base_url}/_apis/runtime/runnerscalesets/{scale_set.id}/acquirejobs"
                    )
                    self._emit(scale_set.id, "JobAvailable", job, acquireJobUrl=acquire_url)
                else:
                    self._assign(job, now)
                break

    def _assign(self, job: JobRecord, now: datetime) -> None:
        assert job.scale_set_id is not None
        job.state, job.scale_set_assign_time = JobState.ASSIGNED, now
        self._emit(job.scale_set_id, "JobAssigned", job)

    def acquire_jobs(self, scale_set_id: int, body: Any) -> list[int]:
        if not isinstance(body, list) or not all(_is_int(i) for i in body):
            raise bad_request("body must be a JSON array of runner request ids")
        with self.lock:
            self._scale_set(scale_set_id)
            acquired: list[int] = []
            now = utcnow()
            for request_id in body:
                job = self._jobs.get(request_id)
                # Jobs already acquired, or offered to another scale set, are left out of the
                # answer, which is how the service reports a lost race.
                if job is None or job.scale_set_id != scale_set_id:
                    continue
                if job.state is not JobState.AVAILABLE:
                    continue
                job.acquired = True
                self._assign(job, now)
                acquired.append(request_id)
            self._touch()
            return acquired

    # -- agent protocol -------------------------------------------------------------------------

    def _agent_by_credential(self, credential: str) -> AgentRecord:
        agent = self._agents_by_credential.get(credential)
        if agent is None:
            raise ApiError(401, "unknown runner credential", plain=True)
        return agent

    def agent_connect(self, credential: str, wait: float, session: str = "") -> AgentJob | None:
        """Hand the agent the oldest assigned job of its scale set, waiting up to ``wait``.

        ``session`` names the agent's run (any string it keeps for its connects). When the run
        that took a job connects again while that job runs, it gets the job again: the answer that
        carried it may never have reached it (its request timed out on its side while the fake
        held it, under load), and, as a real runner's broker session does with a message it has
        not acknowledged, the job is delivered again instead of being lost with a runner that can
        no longer connect. Any other connect with the spent credential gets 409."""
        deadline = time.monotonic() + wait
        with self.lock:
            agent = self._agent_by_credential(credential)
            if agent.spent:
                return self._redeliver(agent, session)
            if not agent.connected:
                agent.connected = True
                self._touch()
            while True:
                if self.stopping:
                    raise Stopping
                self._check_outage(Endpoint.AGENT_CONNECT)
                if agent.removed:
                    raise ApiError(404, f"runner {agent.name} is not registered", plain=True)
                if agent.job is not None:  # another connect of this agent took a job meanwhile
                    return self._redeliver(agent, session)
                job = next(
                    (
                        j
                        for j in self._open.values()
                        if j.state is JobState.ASSIGNED and j.scale_set_id == agent.scale_set_id
                    ),
                    None,
                )
                if job is not None:
                    return self._start(job, agent, session)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.changed.wait(remaining)

    def _start(self, job: JobRecord, agent: AgentRecord, session: str) -> AgentJob:
        job.state, job.runner_assign_time = JobState.RUNNING, utcnow()
        job.runner_id, job.runner_name = agent.id, agent.name
        agent.job, agent.spent, agent.session = job, True, session
        assert job.scale_set_id is not None
        self._emit(job.scale_set_id, "JobStarted", job, runnerId=agent.id, runnerName=agent.name)
        self._touch()
        return self._agent_job(job, agent)

    def _redeliver(self, agent: AgentRecord, session: str) -> AgentJob:
        job = agent.job
        if (
            not session
            or session != agent.session
            or job is None
            or job.state is not JobState.RUNNING
            or agent.finished
        ):
            raise ApiError(409, "this JIT configuration has already been used", plain=True)
        return self._agent_job(job, agent)

    @staticmethod
    def _agent_job(job: JobRecord, agent: AgentRecord) -> AgentJob:
        return AgentJob(
            job_id=job.job_id,
            runner_request_id=job.request_id,
            runner_id=agent.id,
            runner_name=agent.name,
            duration=job.duration,
            result=job.planned_result,
            display_name=job.display_name,
        )

    def agent_complete(self, credential: str, job_id: str, result: str) -> None:
        with self.lock:
            agent = self._agent_by_credential(credential)
            job = agent.job
            if job is None or job.job_id != job_id or job.state is not JobState.RUNNING:
                if agent.removed and not agent.finished:
                    raise ApiError(404, f"runner {agent.name} is not registered", plain=True)
                raise ApiError(
                    409, f"runner {agent.name} has no job {job_id} in progress", plain=True
                )
            self._finish(job, result or job.planned_result, emit=True)
            self._schedule()
            self._touch()

    # -- inspection -----------------------------------------------------------------------------

    def _statistics(self, scale_set_id: int) -> Statistics:
        # Every figure below leaves completed jobs out.
        jobs = [j for j in self._open.values() if j.scale_set_id == scale_set_id]
        agents = [a for a in self._agents.values() if a.scale_set_id == scale_set_id]
        running = sum(1 for j in jobs if j.state is JobState.RUNNING)
        busy = sum(1 for a in agents if a.job is not None and a.job.state is JobState.RUNNING)
        return Statistics(
            total_available_jobs=sum(1 for j in jobs if j.state is JobState.AVAILABLE),
            # Acquired and not yet completed: in acquire mode a subset of the assigned jobs.
            total_acquired_jobs=sum(1 for j in jobs if j.acquired),
            # Assigned covers waiting and running jobs, so assigned >= running always holds.
            total_assigned_jobs=sum(
                1 for j in jobs if j.state in (JobState.ASSIGNED, JobState.RUNNING)
            ),
            total_running_jobs=running,
            total_registered_runners=len(agents),
            total_busy_runners=busy,
            total_idle_runners=len(agents) - busy,
        )

    def statistics(self, scale_set_id: int) -> Statistics:
        with self.lock:
            if scale_set_id not in self._scale_sets:
                raise KeyError(scale_set_id)
            return self._statistics(scale_set_id)

    def jobs(self) -> list[JobInfo]:
        with self.lock:
            return [self._job_info(j) for j in self._jobs.values()]

    def job(self, request_id: int) -> JobInfo:
        with self.lock:
            return self._job_info(self._jobs[request_id])

    @staticmethod
    def _job_info(job: JobRecord) -> JobInfo:
        return JobInfo(
            id=job.request_id,
            job_id=job.job_id,
            state=job.state,
            labels=job.labels,
            scale_set_id=job.scale_set_id,
            runner_id=job.runner_id,
            runner_name=job.runner_name,
            result=job.result,
            planned_result=job.planned_result,
            duration=job.duration,
            display_name=job.display_name,
            repository=job.repository,
            workflow=job.workflow,
            workflow_run_id=job.workflow_run_id,
            acquired=job.acquired,
            queue_time=job.queue_time,
            finish_time=job.finish_time,
        )

    def runners(self) -> list[RunnerInfo]:
        with self.lock:
            return [self._runner_info(a) for a in self._agents.values()]

    @staticmethod
    def _runner_info(agent: AgentRecord) -> RunnerInfo:
        if agent.finished:
            status = RunnerStatus.FINISHED
        elif agent.job is not None:
            status = RunnerStatus.BUSY
        elif agent.connected:
            status = RunnerStatus.IDLE
        else:
            status = RunnerStatus.OFFLINE
        return RunnerInfo(
            id=agent.id,
            name=agent.name,
            scale_set_id=agent.scale_set_id,
            status=status,
            job=agent.job.request_id if agent.job is not None else None,
        )

    def scale_sets(self) -> list[ScaleSetInfo]:
        with self.lock:
            return [
                ScaleSetInfo(
                    id=s.id,
                    name=s.name,
                    runner_group_id=s.group_id,
                    runner_group_name=self._groups[s.group_id].name,
                    labels=tuple(name for name, _ in s.labels),
                    disable_update=s.disable_update,
                    created_on=s.created_on,
                )
                for s in self._scale_sets.values()
            ]

    def sessions(self) -> list[SessionInfo]:
        with self.lock:
            self._expire_idle_sessions()
            return [
                SessionInfo(
                    session_id=s.id,
                    scale_set_id=s.scale_set_id,
                    owner_name=s.owner,
                    message_queue_url=self._queue_url(s.id),
                    max_capacity=s.capacity,
                    polls=s.polls,
                )
                for s in self._sessions.values()
            ]

    def generate_jit_config(self, scale_set_id: int, name: str) -> str:
        return str(self.generate_jit(scale_set_id, {"name": name})["encodedJITConfig"])
