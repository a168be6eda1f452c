"""Reading and writing the scale set API's JSON the way the Go client does.

See ``docs/protocol.md`` §3.1, §3.2, §4.2 and §4.3.

Reading follows Go's ``encoding/json``: keys match case-insensitively (the last matching key wins),
unknown keys are ignored, ``null`` leaves the zero value, and a value of the wrong JSON type is an
error. Timestamps are RFC 3339; absent or ``null`` is fine, ``""`` is not. Parsers raise
:class:`DecodeError`; the client turns it into a ``ProtocolError`` that names the request.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final, TypeVar

import httpx

from outrunner.scaleset.errors import protocol_error, strip_bom
from outrunner.scaleset.types import (
    NIL_SESSION_ID,
    JitRunnerConfig,
    JitRunnerSetting,
    JobAssigned,
    JobAvailable,
    JobCompleted,
    JobStarted,
    Label,
    RunnerGroup,
    RunnerReference,
    RunnerScaleSet,
    RunnerScaleSetMessage,
    RunnerScaleSetSession,
    RunnerScaleSetStatistic,
    RunnerSetting,
)

JOB_MESSAGES_TYPE = "RunnerScaleSetJobMessages"
_ZERO_TIME = "0001-01-01T00:00:00Z"
_INT64 = (-(2**63), 2**63 - 1)
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})"
)
_T = TypeVar("_T")
_KIND_NAMES: dict[type, str] = {
    str: "string",
    int: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
}


class DecodeError(ValueError):
    """A JSON document that does not have the expected shape."""


# ---------------------------------------------------------------------------------------- reading


def loads(body: bytes) -> Any:
    """Decode a response body: BOM removed, empty body reported like Go's decoder (``EOF``)."""
    body = strip_bom(body)
    if not body.strip():
        raise DecodeError("EOF")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(str(exc)) from exc


def parse_response(response: httpx.Response, parse: Callable[[object], _T], what: str) -> _T:
    """Decode a successful response with ``parse``; a bad body becomes a ``ProtocolError``."""
    try:
        return parse(loads(response.content))
    except DecodeError as exc:
        raise protocol_error(response, f"failed to decode {what}: {exc}") from exc


class _Object:
    """A JSON object read with Go's rules; each getter returns the zero value for absent/null."""

    def __init__(self, raw: object, what: str) -> None:
        if not isinstance(raw, dict):
            raise DecodeError(f"{what}: expected a JSON object, got {_kind(raw)}")
        self._what = what
        # Lower-cased keys, in document order, so the last case-insensitive match wins like in Go.
        self._values: dict[str, object] = {key.lower(): value for key, value in raw.items()}

    def _get(self, key: str, expected: type | tuple[type, ...]) -> Any:
        value = self._values.get(key.lower())
        if value is not None and (
            not isinstance(value, expected) or (isinstance(value, bool) and expected is int)
        ):
            wanted = _kind_of(expected)
            raise DecodeError(f"{self._what}.{key}: expected {wanted}, got {_kind(value)}")
        return value

    def string(self, key: str) -> str:
        value: str | None = self._get(key, str)
        return value or ""

    def integer(self, key: str) -> int:
        value: int | None = self._get(key, int)
        if value is None:
            return 0
        if not _INT64[0] <= value <= _INT64[1]:
            raise DecodeError(f"{self._what}.{key}: {value} overflows int64")
        return value

    def boolean(self, key: str) -> bool:
        value: bool | None = self._get(key, bool)
        return bool(value)

    def timestamp(self, key: str) -> datetime | None:
        value: str | None = self._get(key, str)
        return None if value is None else parse_time(value, f"{self._what}.{key}")

    def nested(self, key: str, parse: Callable[[object, str], _T]) -> _T | None:
        value: dict[str, object] | None = self._get(key, dict)
        return None if value is None else parse(value, f"{self._what}.{key}")

    def array(self, key: str, item: Callable[[object, str], _T]) -> tuple[_T, ...]:
        value: list[object] | None = self._get(key, list)
        where = f"{self._what}.{key}"
        return tuple(item(entry, f"{where}[{i}]") for i, entry in enumerate(value or ()))

    def has(self, key: str) -> bool:
        """Present and not null."""
        return self._values.get(key.lower()) is not None


def _kind_of(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_KIND_NAMES.get(t, t.__name__) for t in types)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return _KIND_NAMES.get(type(value), type(value).__name__)


_GO_ZERO_TIME: Final = datetime(1, 1, 1, tzinfo=UTC)


def parse_time(text: str, where: str = "timestamp") -> datetime | None:
    """RFC 3339, fraction truncated to microseconds. Go's zero time becomes ``None``."""
    try:
        return _parse_time(text)
    except ValueError as exc:
        raise DecodeError(f"{where}: {text!r}{exc}") from None


# A job's timestamps come again in each of its messages (assigned, started, completed), and
# Go's zero time stands in for every one not set yet: most texts were seen before.
@functools.lru_cache(maxsize=4096)
def _parse_time(text: str) -> datetime | None:
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(" is not an RFC 3339 timestamp")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    tz = UTC
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
        tz = timezone(sign * offset)
    try:
        value = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=tz,
        )
    except ValueError as exc:
        raise ValueError(f": {exc}") from None
    return None if value == _GO_ZERO_TIME else value


def _int_item(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DecodeError(f"{where}: expected number, got {_kind(value)}")
    return value


def _str_item(value: object, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DecodeError(f"{where}: expected string, got {_kind(value)}")
    return value


def parse_statistics(raw: object, where: str = "statistics") -> RunnerScaleSetStatistic:
    obj = _Object(raw, where)
    return RunnerScaleSetStatistic(
        total_available_jobs=obj.integer("totalAvailableJobs"),
        total_acquired_jobs=obj.integer("totalAcquiredJobs"),
        total_assigned_jobs=obj.integer("totalAssignedJobs"),
        total_running_jobs=obj.integer("totalRunningJobs"),
        total_registered_runners=obj.integer("totalRegisteredRunners"),
        total_busy_runners=obj.integer("totalBusyRunners"),
        total_idle_runners=obj.integer("totalIdleRunners"),
    )


def _optional_statistics(obj: _Object) -> RunnerScaleSetStatistic | None:
    return obj.nested("statistics", parse_statistics)


def _parse_runner_setting(raw: object, where: str) -> RunnerSetting:
    return RunnerSetting(disable_update=_Object(raw, where).boolean("disableUpdate"))


def _parse_label(raw: object, where: str) -> Label:
    obj = _Object(raw, where)
    return Label(name=obj.string("name"), type=obj.string("type"))


def parse_runner_scale_set(raw: object, where: str = "runnerScaleSet") -> RunnerScaleSet:
    obj = _Object(raw, where)
    return RunnerScaleSet(
        id=obj.integer("id"),
        name=obj.string("name"),
        runner_group_id=obj.integer("runnerGroupId"),
        runner_group_name=obj.string("runnerGroupName"),
        labels=obj.array("labels", _parse_label),
        runner_setting=obj.nested("RunnerSetting", _parse_runner_setting) or RunnerSetting(),
        created_on=obj.timestamp("createdOn"),
        runner_jit_config_url=obj.string("runnerJitConfigUrl"),
        statistics=_optional_statistics(obj),
    )


def parse_runner_group(raw: object, where: str = "runnerGroup") -> RunnerGroup:
    obj = _Object(raw, where)
    return RunnerGroup(
        id=obj.integer("id"),
        name=obj.string("name"),
        size=obj.integer("size"),
        is_default_group=obj.boolean("isDefaultGroup"),
    )


def parse_runner_reference(raw: object, where: str = "runner") -> RunnerReference:
    obj = _Object(raw, where)
    return RunnerReference(
        id=obj.integer("id"),
        name=obj.string("name"),
        runner_scale_set_id=obj.integer("runnerScaleSetId"),
    )


def parse_jit_config(raw: object) -> JitRunnerConfig:
    obj = _Object(raw, "jitConfig")
    runner = obj.nested("runner", parse_runner_reference)
    if runner is None:
        raise DecodeError("jitConfig.runner: missing")
    return JitRunnerConfig(
        runner=runner,
        encoded_jit_config=obj.string("encodedJITConfig"),
    )


def parse_list(raw: object, item: Callable[[object, str], _T], where: str) -> tuple[int, list[_T]]:
    """A ``{"count": n, "value": [...]}`` wrapper; the caller decides what ``count`` means."""
    obj = _Object(raw, where)
    return obj.integer("count"), list(obj.array("value", item))


def parse_acquired_jobs(raw: object) -> list[int]:
    return list(_Object(raw, "acquireJobs").array("value", _int_item))


def parse_registration_token(raw: object) -> str:
    return _Object(raw, "registrationToken").string("token")


def parse_admin_connection(raw: object) -> tuple[str, str]:
    obj = _Object(raw, "adminConnection")
    return obj.string("url"), obj.string("token")


def parse_session(raw: object) -> RunnerScaleSetSession:
    obj = _Object(raw, "session")
    session_id = obj.string("sessionId") if obj.has("sessionId") else None
    return RunnerScaleSetSession(
        session_id=_parse_uuid(session_id, "session.sessionId"),
        owner_name=obj.string("ownerName"),
        runner_scale_set=obj.nested("runnerScaleSet", parse_runner_scale_set),
        message_queue_url=obj.string("messageQueueUrl"),
        message_queue_access_token=obj.string("messageQueueAccessToken"),
        statistics=_optional_statistics(obj),
    )


def _parse_uuid(text: str | None, where: str) -> str:
    if text is None:  # Go leaves the zero UUID in place
        return NIL_SESSION_ID
    try:
        return str(uuid.UUID(text))  # canonical lower-case form, as Go prints it in URLs
    except ValueError as exc:
        raise DecodeError(f"{where}: {text!r} is not a UUID") from exc


def _keys(*fields: str) -> tuple[tuple[str, str, str], ...]:
    """(dataclass field, JSON key, the key lower-cased) of each JSON key given."""
    return tuple((re.sub("[A-Z]", lambda m: "_" + m[0].lower(), k), k, k.lower()) for k in fields)


# A job's fields by kind.
_JOB_STRINGS: Final = _keys(
    "messageType",
    "repositoryName",
    "ownerName",
    "jobId",
    "jobWorkflowRef",
    "jobDisplayName",
    "eventName",
)
_JOB_TIMES: Final = _keys("queueTime", "scaleSetAssignTime", "runnerAssignTime", "finishTime")


def _job_fields(obj: _Object) -> dict[str, Any]:
    # Every entry of every message comes through here (three per job). A present string is
    # taken as it is; anything else (absent, null, a wrong type, a bad timestamp) goes through
    # the _Object getter, which gives the zero value or raises with the key's name.
    values = obj._values
    fields: dict[str, Any] = {
        "runner_request_id": obj.integer("runnerRequestId"),
        "workflow_run_id": obj.integer("workflowRunId"),
        "request_labels": obj.array("requestLabels", _str_item),
    }
    for field, key, lower in _JOB_STRINGS:
        value = values.get(lower)
        fields[field] = value if type(value) is str else obj.string(key)
    for field, key, lower in _JOB_TIMES:
        value = values.get(lower)
        if type(value) is str:
            try:
                fields[field] = _parse_time(value)
                continue
            except ValueError:
                pass
        fields[field] = obj.timestamp(key)  # the zero value, or raises naming the key
    return fields


def parse_message(raw: object) -> RunnerScaleSetMessage:
    """The message envelope of a 200 long-poll answer, with its body's job messages sorted by type.

    Unknown job types are skipped; a known type that fails to decode fails the whole message.
    """
    envelope = _Object(raw, "message")
    message_type = envelope.string("messageType")
    if message_type != JOB_MESSAGES_TYPE:
        raise DecodeError(f"unsupported message type: {message_type}")
    body = envelope.string("body")
    entries = _parse_body(body) if body else []
    available: list[JobAvailable] = []
    assigned: list[JobAssigned] = []
    started: list[JobStarted] = []
    completed: list[JobCompleted] = []
    for index, entry in enumerate(entries):
        obj = _Object(entry, f"body[{index}]")
        match obj.string("messageType"):
            case "JobAvailable":
                available.append(
                    JobAvailable(acquire_job_url=obj.string("acquireJobUrl"), **_job_fields(obj))
                )
            case "JobAssigned":
                assigned.append(JobAssigned(**_job_fields(obj)))
            case "JobStarted":
                started.append(
                    JobStarted(
                        runner_id=obj.integer("runnerId"),
                        runner_name=obj.string("runnerName"),
                        **_job_fields(obj),
                    )
                )
            case "JobCompleted":
                completed.append(
                    JobCompleted(
                        result=obj.string("result"),
                        runner_id=obj.integer("runnerId"),
                        runner_name=obj.string("runnerName"),
                        **_job_fields(obj),
                    )
                )
            case _:
                continue  # a type this client does not know: skipped, like Go
    return RunnerScaleSetMessage(
        message_id=envelope.integer("messageId"),
        message_type=message_type,
        statistics=_optional_statistics(envelope),
        jobs_available=tuple(available),
        jobs_assigned=tuple(assigned),
        jobs_started=tuple(started),
        jobs_completed=tuple(completed),
    )


def _parse_body(body: str) -> list[object]:
    try:
        entries = json.loads(body)
    except ValueError as exc:
        raise DecodeError(f"failed to unmarshal batched messages: {exc}") from exc
    if entries is None:
        return []
    if not isinstance(entries, list):
        got = _kind(entries)
        raise DecodeError(f"failed to unmarshal batched messages: expected array, got {got}")
    return entries


# ---------------------------------------------------------------------------------------- writing


def dumps(value: object, *, escape_html: bool = True) -> bytes:
    """Compact JSON like Go's ``json.Marshal`` (which escapes ``<``, ``>`` and ``&`` by default)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    if escape_html:
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode()


def format_time(value: datetime | None) -> str:
    """RFC 3339 with the fraction's trailing zeros trimmed, like Go's ``time.Time`` marshalling."""
    if value is None:
        return _ZERO_TIME
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    offset = value.utcoffset() or timedelta()
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def render_statistics(stats: RunnerScaleSetStatistic) -> dict[str, int]:
    return {
        "totalAvailableJobs": stats.total_available_jobs,
        "totalAcquiredJobs": stats.total_acquired_jobs,
        "totalAssignedJobs": stats.total_assigned_jobs,
        "totalRunningJobs": stats.total_running_jobs,
        "totalRegisteredRunners": stats.total_registered_runners,
        "totalBusyRunners": stats.total_busy_runners,
        "totalIdleRunners": stats.total_idle_runners,
    }


def render_labels(labels: Sequence[Label]) -> list[dict[str, str]]:
    # An empty type means "System": the service needs one and the Go client fills it in.
    return [{"type": label.type or "System", "name": label.name} for label in labels]


def render_runner_scale_set(scale_set: RunnerScaleSet) -> dict[str, object]:
    """The omitempty rules of docs/protocol.md §3.2; ``RunnerSetting`` (capital R) and
    ``createdOn`` are always written."""
    out: dict[str, object] = {}
    if scale_set.id:
        out["id"] = scale_set.id
    if scale_set.name:
        out["name"] = scale_set.name
    if scale_set.runner_group_id:
        out["runnerGroupId"] = scale_set.runner_group_id
    if scale_set.runner_group_name:
        out["runnerGroupName"] = scale_set.runner_group_name
    if scale_set.labels:
        out["labels"] = render_labels(scale_set.labels)
    out["RunnerSetting"] = (
        {"disableUpdate": True} if scale_set.runner_setting.disable_update else {}
    )
    out["createdOn"] = format_time(scale_set.created_on)
    if scale_set.runner_jit_config_url:
        out["runnerJitConfigUrl"] = scale_set.runner_jit_config_url
    if scale_set.statistics is not None:
        out["statistics"] = render_statistics(scale_set.statistics)
    return out


def render_jit_setting(setting: JitRunnerSetting) -> dict[str, str]:
    return {"name": setting.name, "workFolder": setting.work_folder}


def render_new_session(owner: str) -> dict[str, str]:
    # The all-zero sessionId is written: Go's omitempty cannot drop a fixed-size UUID array.
    return {"sessionId": NIL_SESSION_ID, "ownerName": owner}
