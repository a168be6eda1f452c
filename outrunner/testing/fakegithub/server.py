"""``FakeGitHub``: the public facade, and the threaded HTTP/1.1 server it runs in the background.

The server is ``http.server.ThreadingHTTPServer`` in its own thread, one daemon thread per
connection, plus (with ``session_idle_timeout``) a thread that expires idle sessions when due.
Running outside the caller's event loop is deliberate: the same object serves sync tests and async
tests, and a test that blocks its loop cannot stall the fake's long polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

from outrunner.testing.fakegithub.apps import FakeApp
from outrunner.testing.fakegithub.endpoints import AGENT_ENDPOINTS, SERVICE_ENDPOINTS, Endpoint
from outrunner.testing.fakegithub.entities import Settings
from outrunner.testing.fakegithub.errors import ApiError
from outrunner.testing.fakegithub.faults import Fault, FaultPlan, failure
from outrunner.testing.fakegithub.model import (
    JobInfo,
    JobState,
    RecordedRequest,
    RunnerInfo,
    ScaleSetInfo,
    SessionInfo,
    Statistics,
)
from outrunner.testing.fakegithub.outage import Outage
from outrunner.testing.fakegithub.routes import Request, Response, Router
from outrunner.testing.fakegithub.state import API_PREFIX, State

_log = logging.getLogger(__name__)

# How long stop() waits for connection threads after closing their sockets.
_JOIN_TIMEOUT = 1.0
# serve_forever's shutdown check interval; small so stop() is prompt.
_POLL_INTERVAL = 0.02
# How often the async waiters re-check their predicate.
_ASYNC_POLL_INTERVAL = 0.01


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the second one waits for the
    # client's delayed ACK (~40 ms per request on Linux).
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # Trailers end with an empty line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        body = self._read_body()
        parts = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=parts.path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
        )
        response = self.server.router.handle(request)
        if response is None:
            # Injected drop or shutdown: no status line at all, like a crashed proxy.
            self.close_connection = True
            return
        self._write(response)

    def _write(self, response: Response) -> None:
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        # 204 must not carry a body or a Content-Length (RFC 9110 §8.6).
        if response.status != 204:
            if response.content_type is not None:
                self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if response.status != 204 and response.body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        # The request log (FakeGitHub.requests) replaces http.server's stderr lines.
        pass


class _Server(ThreadingHTTPServer):
    """Tracks connection threads and sockets so stop() can close and join all of them."""

    daemon_threads = True
    block_on_close = False
    # socketserver's default listen backlog is 5: a burst of new connections (a thousand agents
    # connecting, a client opening its pool) overflowed it, and the kernel dropped connection
    # attempts, which clients retry only after 1 s, 3 s, 7 s... (the kernel caps it at somaxconn).
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], router: Router) -> None:
        self.router = router
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"fakegithub-conn-{client_address[1]}",
            daemon=True,
        )
        with self._connections_lock:
            self._connections[thread] = request
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._connections_lock:
                self._connections.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-answer (cancelled long polls, stop()) are normal here.
        _log.debug("fake GitHub connection from %s failed", client_address, exc_info=True)

    def close_connections(self, timeout: float) -> None:
        with self._connections_lock:
            connections = dict(self._connections)
        for sock in connections.values():
            # Wakes threads blocked reading the next keep-alive request.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))


class FakeGitHub:
    """A fake GitHub (REST API + Actions service) on loopback; see the package docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        long_poll_timeout: float = 50.0,
        admin_token_ttl: float = 600.0,
        queue_token_ttl: float = 3600.0,
        pat: str | None = None,
        acquire_mode: bool = False,
        owner: str = "octo-org",
        repo: str | None = None,
        remove_agent_on_completion: bool = True,
        message_queue_query: str | None = None,
        app_client_id: str | None = None,
        app_installation_id: int | None = None,
        session_idle_timeout: float | None = None,
        installation_token_ttl: float = 3600.0,
    ) -> None:
        if session_idle_timeout is not None and session_idle_timeout <= 0:
            raise ValueError("session_idle_timeout must be positive (or None: never)")
        if installation_token_ttl <= 0:
            raise ValueError("installation_token_ttl must be positive")
        self._address = (host, port)
        self._state = State(
            Settings(
                long_poll_timeout=long_poll_timeout,
                admin_token_ttl=admin_token_ttl,
                queue_token_ttl=queue_token_ttl,
                pat=pat,
                acquire_mode=acquire_mode,
                owner=owner,
                repo=repo,
                remove_agent_on_completion=remove_agent_on_completion,
                message_queue_query=message_queue_query,
                app_client_id=app_client_id,
                app_installation_id=app_installation_id,
                session_idle_timeout=session_idle_timeout,
                installation_token_ttl=installation_token_ttl,
            )
        )
        self._faults = FaultPlan()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._reaper: threading.Thread | None = None
        self._stopped = False

    def __repr__(self) -> str:
        where = self._state.url or "not started"
        return f"FakeGitHub({where}, owner={self._state.settings.owner!r})"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind and serve in a background thread; returns self."""
        if self._server is not None or self._stopped:
            raise RuntimeError("a FakeGitHub can be started only once")
        server = _Server(self._address, Router(self._state, self._faults))
        host, port = server.server_address[:2]
        self._state.url = f"http://{host!s}:{port}"
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=f"fakegithub-{port}",
            daemon=True,
        )
        self._thread.start()
        if self._state.settings.session_idle_timeout is not None:
            self._reaper = threading.Thread(
                target=self._state.reap_idle_sessions,
                name=f"fakegithub-sessions-{port}",
                daemon=True,
            )
            self._reaper.start()
        return self

    def stop(self) -> None:
        """Stop serving: wakes long polls, closes every connection, joins every thread.

        In-flight long polls and delayed requests get their connection closed without an
        answer. Idempotent.
        """
        server, self._server = self._server, None
        self._stopped = True
        if server is None:
            return
        self._state.shutdown()
        server.shutdown()
        if self._thread is not None:
            self._thread.join()
        if self._reaper is not None:
            self._reaper.join()
        server.close_connections(_JOIN_TIMEOUT)
        server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Joining threads blocks briefly; keep it off the event loop.
        await asyncio.to_thread(self.stop)

    # -- addresses ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``; the server must be started."""
        if not self._state.url:
            raise RuntimeError("FakeGitHub is not started")
        return self._state.url

    @property
    def api_url(self) -> str:
        """Base of the GitHub REST API (GHES style): ``<url>/api/v3``."""
        return self.url + API_PREFIX

    @property
    def base_url(self) -> str:
        """The Actions service base runner-registration hands out (without its trailing /)."""
        self.url  # noqa: B018 - raises when not started
        return self._state.base_url

    def config_url(self, scope: str | None = None) -> str:
        """A GitHub config URL for this server: ``<url>/<scope>``; the default scope is the
        configured owner (org), or ``owner/repo`` when ``repo`` was given."""
        if scope is None:
            settings = self._state.settings
            scope = settings.owner if settings.repo is None else f"{settings.owner}/{settings.repo}"
        return f"{self.url}/{scope.strip('/')}"

    # -- jobs and test controls -----------------------------------------------------------------

    def queue_job(
        self,
        labels: Sequence[str] = ("linux",),
        *,
        duration: float = 0.0,
        result: str = "succeeded",
        repository: str = "repo",
        owner: str | None = None,
        workflow: str = "ci.yml",
        display_name: str | None = None,
        event_name: str = "push",
    ) -> int:
        """Queue a job with ``runs-on: labels``; returns its id (the ``runnerRequestId``).

        ``duration`` and ``result`` are what the runner agent that takes it will sleep and
        report.
        """
        return self._state.queue_job(
            labels,
            duration=duration,
            result=result,
            repository=repository,
            owner=owner,
            workflow=workflow,
            display_name=display_name,
            event_name=event_name,
        )

    def assign_job(
        self, scale_set_id: int, *, duration: float = 0.0, display_name: str | None = None
    ) -> int:
        """Queue a job already assigned to a scale set, as if its listener had taken it; returns
        its id. For runners registered with :meth:`generate_jit_config` and no listener (a
        baseline's, a provisioner test's): the first such runner that connects takes it.
        ``ApiError`` 404 for an unknown scale set."""
        return self._state.assign_job(scale_set_id, duration=duration, display_name=display_name)

    def cancel_job(self, job: int) -> None:
        """Cancel a job: it completes with ``canceled`` (JobCompleted if it reached a scale
        set). A running job's agent is then refused when it reports."""
        self._state.cancel_job(job)

    def add_runner_group(self, name: str) -> int:
        """Create a runner group; returns its id. The ``default`` group (id 1) always exists."""
        return self._state.add_runner_group(name)

    def create_scale_set(
        self, name: str, labels: Sequence[str] = ("linux",), *, runner_group_id: int = 1
    ) -> int:
        """Create a scale set without going through HTTP; returns its id."""
        body = {
            "name": name,
            "runnerGroupId": runner_group_id,
            "labels": [{"name": label, "type": "User"} for label in labels],
        }
        return int(self._state.create_scale_set(body)["id"])

    def generate_jit_config(self, scale_set_id: int, runner_name: str) -> str:
        """Register a runner as generatejitconfig does; returns its ``encodedJITConfig``."""
        return self._state.generate_jit_config(scale_set_id, runner_name)

    def remove_runner(self, name: str) -> bool:
        """Remove a registered runner as an administrator would (``DELETE`` on it); returns
        False when no runner has that name. Its agent's connect, waiting or not, then gets 404
        (so a runner whose environment is gone stops holding a long poll). Raises
        ``ApiError`` (409) while it runs a job, as GitHub does."""
        runner = self.runner(name)
        if runner is None:
            return False
        try:
            self._state.delete_agent(runner.id)
        except ApiError as exc:
            if exc.status != 404:  # removed meanwhile, by its scaler: the same outcome
                raise
        return True

    def add_app(
        self,
        client_id: str,
        installation_id: int,
        public_key_pem: str,
        *,
        app_id: int | None = None,
    ) -> FakeApp:
        """Register a GitHub App installed once (as ``installation_id``); returns it.

        From then on ``access_tokens`` verifies every JWT: it must name a registered App in
        ``iss`` (its ``client_id`` or ``app_id``) and carry that App's RS256 signature (needs
        PyJWT[crypto]), and the installation must be that App's (else 404). Keys:
        :func:`outrunner.testing.fakegithub.generate_key_pair`.
        """
        if isinstance(installation_id, bool) or installation_id <= 0:
            raise ValueError("installation_id must be a positive integer")
        app = FakeApp(
            client_id=client_id,
            app_id=app_id,
            installation_id=installation_id,
            public_key_pem=public_key_pem,
        )
        self._state.credentials.add_app(app)
        return app

    def suspend_app_installation(self, installation_id: int, suspended: bool = True) -> None:
        """Suspend (or with ``suspended=False`` unsuspend) an App installation: its
        ``access_tokens`` requests answer 403 "This installation has been suspended"."""
        self._state.credentials.suspend_installation(installation_id, suspended)

    def expire_installation_tokens(self) -> None:
        """Make every installation token issued so far invalid before its ``expires_at`` (as
        when an App is reinstalled or its token revoked): registration-token answers 401."""
        self._state.credentials.expire_installation_tokens()

    def expire_admin_tokens(self) -> None:
        """Make every admin token issued so far invalid (401 on Actions-service calls)."""
        self._state.credentials.expire_admin_tokens()

    def revoke_credentials(self) -> None:
        """Revoke the token (as its owner or an admin would): registration-token answers 401
        from now on, and every admin and message-queue token issued so far stops working, so
        a client notices at its next call."""
        self._state.credentials.revoke()
        self._state.expire_queue_tokens()

    def expire_queue_tokens(self) -> None:
        """Make every session's message-queue token invalid until the session is refreshed."""
        self._state.expire_queue_tokens()

    def expire_sessions(self) -> None:
        """Forget every session (as after listeners stopped polling): their queue URLs answer
        404 and refresh/delete answer 400 RunnerScaleSetSessionExpiredException. The queue stays
        with the scale set; a new session may be created. See also ``session_idle_timeout``."""
        self._state.expire_sessions()

    # -- outages --------------------------------------------------------------------------------

    def outage(
        self,
        status: int | None = 503,
        *,
        endpoints: Iterable[Endpoint | str] | None = None,
        include_agents: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> Outage:
        """Start an outage now; end it with ``.end()`` or use it as ``with gh.outage(): ...``.

        While it lasts, every request to the affected endpoints is answered ``status`` with an
        error body shaped like the service's (or, with ``status=None``, its connection is closed
        without an answer) without being handled, and is logged with ``fault="outage"``. Long
        polls and delayed requests of those endpoints that are open when it starts get the same
        answer at once. ``endpoints`` defaults to every scale set client endpoint (REST API,
        Actions service, message queue); the agent endpoints are added with
        ``include_agents=True`` (the real runner talks to another service, its broker, so by
        default jobs keep running and completing, and their messages wait in the queue).
        ``headers`` are added to every answer, e.g. ``{"Retry-After": "1"}``. Pending faults are
        not consumed during an outage. Outages may overlap; the oldest one answers.
        """
        selected = set(SERVICE_ENDPOINTS if endpoints is None else map(Endpoint, endpoints))
        if include_agents:
            selected |= AGENT_ENDPOINTS
        outage = Outage(
            status=status, endpoints=selected, headers=headers, on_end=self._state.end_outage
        )
        self._state.start_outage(outage)
        return outage

    # -- fault injection ------------------------------------------------------------------------

    def fail_next(
        self,
        endpoint: Endpoint | str,
        times: int = 1,
        status: int = 503,
        body: str | bytes | Mapping[str, object] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer the next ``times`` requests of ``endpoint`` with ``status`` without handling
        them. ``body``: mapping -> JSON, str -> text/plain, bytes -> as is; None -> a JSON
        ``{"typeName", "message"}`` error. ``headers`` e.g. ``{"Retry-After": "1"}``."""
        key = Endpoint(endpoint)
        self._faults.add(key, failure(key, status, body, headers), times)

    def delay_next(self, endpoint: Endpoint | str, seconds: float, times: int = 1) -> None:
        """Hold the next ``times`` requests of ``endpoint`` for ``seconds``, then handle them."""
        self._faults.add(endpoint, Fault(kind="delay", seconds=seconds), times)

    def drop_next(self, endpoint: Endpoint | str, times: int = 1) -> None:
        """Close the connection of the next ``times`` requests of ``endpoint`` without an
        answer and without handling them."""
        self._faults.add(endpoint, Fault(kind="drop"), times)

    def pending_faults(self, endpoint: Endpoint | str) -> int:
        return self._faults.pending(endpoint)

    def clear_faults(self) -> None:
        self._faults.clear()

    # -- inspection -----------------------------------------------------------------------------

    def jobs(self) -> list[JobInfo]:
        """Every job queued so far, in queue order."""
        return self._state.jobs()

    def job(self, job: int) -> JobInfo:
        return self._state.job(job)

    def runners(self) -> list[RunnerInfo]:
        """Runners currently registered (removed ones are gone)."""
        return self._state.runners()

    def runner(self, name: str) -> RunnerInfo | None:
        """The registered runner named ``name`` (case-insensitive, like GitHub), or None: e.g.
        ``assert gh.runner("r-1") is None`` once an environment is gone."""
        folded = name.casefold()
        return next((r for r in self.runners() if r.name.casefold() == folded), None)

    def scale_sets(self) -> list[ScaleSetInfo]:
        return self._state.scale_sets()

    def sessions(self) -> list[SessionInfo]:
        return self._state.sessions()

    def statistics(self, scale_set_id: int) -> Statistics:
        return self._state.statistics(scale_set_id)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far (a copy), in completion order."""
        return self._state.requests()

    def requests_to(self, endpoint: Endpoint | str) -> list[RecordedRequest]:
        key = Endpoint(endpoint)
        return [r for r in self._state.requests() if r.endpoint is key]

    def clear_requests(self) -> None:
        self._state.clear_requests()

    # -- waiting --------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate()`` is true; it is re-checked after every state change.

        Raises TimeoutError. Do not call from an event loop that drives the client under test:
        use ``wait_for_async`` there.
        """
        if not self._state.wait_for(predicate, timeout):
            raise TimeoutError(f"condition not met within {timeout} s")

    async def wait_for_async(
        self,
        predicate: Callable[[], bool],
        timeout: float = 10.0,
    ) -> None:
        """``wait_for`` for async tests: polls without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            await asyncio.sleep(_ASYNC_POLL_INTERVAL)

    def _completed(self, count: int) -> Callable[[], bool]:
        def done() -> bool:
            return sum(1 for j in self.jobs() if j.state is JobState.COMPLETED) >= count

        return done

    def wait_until_jobs_completed(self, count: int, timeout: float = 10.0) -> list[JobInfo]:
        """Block until at least ``count`` jobs completed; returns the completed jobs."""
        self.wait_for(self._completed(count), timeout)
        return [j for j in self.jobs() if j.state is JobState.COMPLETED]

    async def wait_until_jobs_completed_async(
        self,
        count: int,
        timeout: float = 10.0,
    ) -> list[JobInfo]:
        await self.wait_for_async(self._completed(count), timeout)
        return [j for j in self.jobs() if j.state is JobState.COMPLETED]
