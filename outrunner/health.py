"""The HTTP endpoints of a Service: ``/metrics``, ``/healthz``, ``/readyz``, ``/status``.

``--listen HOST:PORT`` (``Service(listen=...)``) turns them on; ``docs/metrics.md`` describes
each. The server runs on the Service's own event loop (``asyncio.start_server``, no thread per
request, no framework) and speaks just enough HTTP/1.1 for Prometheus, a service manager's
probe or curl: ``GET``/``HEAD`` only, one request per connection (``Connection: close``), no
request body. A client cannot hold up the listeners: each request must arrive whole within
``read_timeout`` seconds and ``max_request_bytes``, each answer leave within ``write_timeout``,
and at most ``max_connections`` are served at once; every step awaits, so a slow or hostile
client costs one idle coroutine and never blocks the loop.

Without the ``metrics`` extra (``prometheus_client``) the health endpoints still work and
``/metrics`` answers 501, which Prometheus reports as a failed scrape (``up == 0``): health
checks need no extra dependency, and a scrape that cannot work is loud where it is configured.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlsplit

from outrunner._version import __version__
from outrunner.config import ConfigError, parse_host_port
from outrunner.log import BoundLogger, get_logger, redact
from outrunner.metrics import Metrics, MetricsUnavailable

if TYPE_CHECKING:
    from outrunner.service import ServiceState
    from outrunner.worker import ScaleSetStatus

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BYTES",
    "READ_TIMEOUT",
    "WRITE_TIMEOUT",
    "HealthServer",
    "HealthSource",
    "not_ready_reasons",
    "parse_listen",
    "status_document",
]

READ_TIMEOUT: Final = 5.0
"""Seconds a client has to send its whole request line and headers."""
WRITE_TIMEOUT: Final = 10.0
"""Seconds an answer may take to leave (a client that does not read is cut off)."""
MAX_REQUEST_BYTES: Final = 8192
"""Largest request line plus headers, in bytes (431 beyond)."""
MAX_CONNECTIONS: Final = 64
"""Connections served at once; more are answered 503 and closed."""
_CLOSE_TIMEOUT: Final = 1.0
_LINGER_CHUNK: Final = 65536
_TEXT: Final = "text/plain; charset=utf-8"
_JSON: Final = "application/json"


class HealthSource(Protocol):
    """What the endpoints read: a :class:`~outrunner.service.Service`."""

    @property
    def metrics(self) -> Metrics: ...

    def status(self) -> list[ScaleSetStatus]: ...

    def state(self) -> ServiceState: ...


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port): ``127.0.0.1:9090``, ``[::1]:9090``, ``localhost:0`` (port 0:
    any free port), ``:9090`` (every interface). Raises :class:`ConfigError` (the config's own
    ``listen`` key is checked by the same :func:`~outrunner.config.parse_host_port`)."""
    try:
        return parse_host_port(value.strip())
    except ValueError as exc:
        raise ConfigError(f"listen: {exc}") from None


@dataclass
class _Response:
    status: HTTPStatus
    body: bytes = b""
    content_type: str = _TEXT
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: HTTPStatus, text: str, **headers: str) -> _Response:
        return cls(status, text.encode(), headers=headers)


class HealthServer:
    """Serves the endpoints of ``source`` on ``host:port`` until closed.

    ``async with HealthServer(...)`` starts and closes it; :attr:`addresses` are the bound
    (host, port) pairs (port 0 picks one; each is logged as ``Listening for HTTP``).
    """

    def __init__(
        self,
        source: HealthSource,
        host: str,
        port: int,
        *,
        logger: BoundLogger | None = None,
        read_timeout: float = READ_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._source = source
        self._host = host
        self._port = port
        self._log = logger or get_logger("outrunner.http")
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        self._max_request_bytes = max_request_bytes
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.addresses: list[tuple[str, int]] = []
        """The bound (host, port) pairs, once started."""

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind and start serving; raises :class:`ConfigError` when the address cannot be
        bound (in use, not this machine's)."""
        try:
            self._server = await asyncio.start_server(
                self._serve,
                self._host or None,  # "": every interface
                self._port,
                limit=self._max_request_bytes,
            )
        except OSError as exc:
            where = f"[{self._host}]" if ":" in self._host else self._host
            raise ConfigError(
                f"listen: cannot listen on {where}:{self._port}: {exc.strerror or exc}"
            ) from exc
        for sock in self._server.sockets:
            host, port = sock.getsockname()[:2]
            self.addresses.append((host, port))
            self._log.info("Listening for HTTP", host=host, port=port)
        if not self._source.metrics.enabled:
            self._log.warning(
                "/metrics answers 501: the metrics extra is not installed "
                "(pip install 'outrunner[metrics]')"
            )

    async def close(self) -> None:
        """Stop listening and cut off the connections still open."""
        if self._server is None:
            return
        self._server.close()
        # Cut the connections rather than cancel their tasks: each handler then ends on its
        # own, the way it ends when a client goes away.
        for writer in self._connections.values():
            writer.transport.abort()
        if self._connections:
            await asyncio.wait(list(self._connections))
        await self._server.wait_closed()
        self._server = None

    # -- one connection ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            if len(self._connections) > self._max_connections:
                response: _Response | None = _Response.text(
                    HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n"
                )
            else:
                response = await self._answer(reader)
            if response is not None:
                await self._send(writer, response)
            await _linger(reader, writer)
        except Exception as exc:  # a client that went away mid-answer, or a bug: never fatal
            self._log.debug("HTTP connection ended badly", error=str(exc))
            writer.transport.abort()
        finally:
            del self._connections[task]

    async def _answer(self, reader: asyncio.StreamReader) -> _Response | None:
        try:
            async with asyncio.timeout(self._read_timeout):
                head = await self._read_head(reader)
        except TimeoutError:
            return _Response.text(HTTPStatus.REQUEST_TIMEOUT, "request timeout\n")
        except _TooLarge:
            return _Response.text(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request header fields too large\n"
            )
        if head is None:
            return None  # connected and left without a word
        if not head:
            return _Response.text(HTTPStatus.BAD_REQUEST, "incomplete request\n")
        parts = head[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1]:
            return _Response.text(HTTPStatus.BAD_REQUEST, "malformed request line\n")
        if any(":" not in line or line[:1] in (" ", "\t") for line in head[1:]):
            return _Response.text(HTTPStatus.BAD_REQUEST, "malformed header\n")
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return _Response.text(
                HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD\n", Allow="GET, HEAD"
            )
        if not target.startswith("/") and not target.lower().startswith(("http://", "https://")):
            return _Response.text(HTTPStatus.BAD_REQUEST, "malformed request target\n")
        try:
            response = await self._route(urlsplit(target).path)
        except Exception as exc:
            self._log.error("HTTP endpoint failed", path=target, error=str(exc), exc_info=exc)
            response = _Response.text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")
        if method == "HEAD":
            response.headers = {**response.headers, "Content-Length": str(len(response.body))}
            response.body = b""
        return response

    async def _read_head(self, reader: asyncio.StreamReader) -> list[str] | None:
        """The request line and header lines; None when the client sent nothing at all, ``[]``
        when it stopped halfway. Bare LF line ends are accepted (RFC 9112 §2.2)."""
        lines: list[str] = []
        size = 0
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # one line longer than the stream's limit
                raise _TooLarge from None
            size += len(line)
            if size > self._max_request_bytes:
                raise _TooLarge
            if not line.endswith(b"\n"):  # the client closed before the end of the head
                return None if size == 0 else []
            text = line.rstrip(b"\r\n").decode("latin-1")
            if not text:
                if lines:
                    return lines
                continue  # empty lines before the request line are ignored (RFC 9112 §2.2)
            lines.append(text)

    async def _send(self, writer: asyncio.StreamWriter, response: _Response) -> None:
        status = response.status
        headers = {
            "Content-Type": response.content_type,
            "Content-Length": str(len(response.body)),
            "Cache-Control": "no-store",
            "Connection": "close",
            **response.headers,
        }
        head = f"HTTP/1.1 {status.value} {status.phrase}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        writer.write(head.encode("latin-1") + b"\r\n" + response.body)
        async with asyncio.timeout(self._write_timeout):
            await writer.drain()

    # -- the endpoints -----------------------------------------------------------------------

    async def _route(self, path: str) -> _Response:
        if path == "/healthz":
            # Answering at all shows that the process and its event loop are alive.
            return _Response.text(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            reasons = not_ready_reasons(self._source)
            if reasons:
                return _Response.text(HTTPStatus.SERVICE_UNAVAILABLE, "\n".join(reasons) + "\n")
            return _Response.text(HTTPStatus.OK, "ready\n")
        if path == "/status":
            document = json.dumps(status_document(self._source), indent=2) + "\n"
            return _Response(HTTPStatus.OK, document.encode(), _JSON)
        if path == "/metrics":
            try:
                body, content_type = await self._source.metrics.exposition_off_loop()
            except MetricsUnavailable as exc:
                return _Response.text(HTTPStatus.NOT_IMPLEMENTED, f"{exc}\n")
            return _Response(HTTPStatus.OK, body, content_type)
        return _Response.text(
            HTTPStatus.NOT_FOUND, "not found; try /metrics, /healthz, /readyz or /status\n"
        )


class _TooLarge(Exception):
    pass


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close so that the client reads the whole answer: send our end of the stream, then read
    and drop what the client still sends (a request not read, because it was turned away or
    too large) until it closes too, for up to ``_CLOSE_TIMEOUT``. Closing a socket with unread
    input would reset the connection, and the client could lose the answer (Apache's "lingering
    close"). A client that neither reads nor closes is cut off."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            while await reader.read(_LINGER_CHUNK):
                pass
            writer.close()
            await writer.wait_closed()
    except (TimeoutError, OSError):
        writer.transport.abort()


# -- what the endpoints say ------------------------------------------------------------------


def not_ready_reasons(source: HealthSource) -> list[str]:
    """Why the Service is not ready, one line each; empty when every scale set has a listening
    session. While stopping or draining it is not ready: it takes no new jobs."""
    state = source.state()
    if state.stopping:
        return ["draining: busy runners finish their jobs" if state.draining else "stopping"]
    statuses = source.status()
    if not statuses:
        return ["starting"]
    reasons = []
    for status in statuses:
        if status.session_open and not status.draining:
            continue
        recorded = source.metrics.get(status.name)
        error = recorded.last_error if recorded is not None else ""
        since = recorded.not_listening_since if recorded is not None else None
        if status.draining:
            reason = f"{status.name}: stopped taking work"
            if error:
                reason += f" after: {error}"
        else:
            doing = (
                "setting up the scale set" if not status.scale_set_id else "no listening session"
            )
            reason = f"{status.name}: {doing}"
            if since is not None:
                reason += f"; failing since {_iso(since)}: {error}"
        reasons.append(reason)
    return reasons


def status_document(source: HealthSource) -> dict[str, object]:
    """``/status``: the Service, and per scale set its session, start backoff and runners."""
    state = source.state()
    reasons = not_ready_reasons(source)
    now = datetime.now(UTC)
    deadline = None
    if state.drain_deadline is not None:
        left = state.drain_deadline - asyncio.get_running_loop().time()
        deadline = _iso(now + timedelta(seconds=max(left, 0.0)))
    return {
        "version": __version__,
        "ready": not reasons,
        "not_ready": reasons,
        "stopping": state.stopping,
        "draining": state.draining,
        "drain_deadline": deadline,
        "runners": state.runners,
        "busy_runners": state.busy_runners,
        "scale_sets": [_scale_set(status, source.metrics, now) for status in source.status()],
    }


def _scale_set(status: ScaleSetStatus, metrics: Metrics, now: datetime) -> dict[str, object]:
    recorded = metrics.get(status.name)
    since = recorded.not_listening_since if recorded is not None else None
    if status.session_open:
        session = "listening"
    elif not status.scale_set_id:
        session = "setting up"
    elif since is not None:
        session = "reconnecting"
    else:
        session = "opening"
    backoff = status.start_backoff
    runners = []
    for runner in status.runners:
        job = recorded.job_of(runner.name) if recorded is not None else None
        runners.append(
            {
                "name": runner.name,
                "runner_id": runner.runner_id,
                "phase": str(runner.phase),
                "age_seconds": round((now - runner.created_at).total_seconds(), 1),
                "adopted": runner.adopted,
                "job": None
                if job is None
                else {
                    "name": job.name,
                    "repository": job.repository,
                    "workflow_run_id": job.workflow_run_id,
                    "runner_request_id": job.runner_request_id,
                    "started_at": _iso(job.started_at) if job.started_at else None,
                },
            }
        )
    return {
        "name": status.name,
        "scale_set_id": status.scale_set_id,
        "session": session,
        "draining": status.draining,
        "last_poll": _iso(recorded.last_poll) if recorded and recorded.last_poll else None,
        "not_listening_since": _iso(since) if since is not None else None,
        "last_error": (recorded.last_error or None) if recorded is not None else None,
        "reconnects": recorded.reconnects if recorded is not None else 0,
        "backoff": None
        if backoff is None
        else {
            "failures": backoff.failures,
            "last_error": redact(backoff.last_error),
            "retry_at": _iso(backoff.retry_at),
        },
        "busy": status.busy,
        "pending_deregistrations": list(status.pending_deregistrations),
        "runners": runners,
    }


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
