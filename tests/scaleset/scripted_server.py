"""A scripted HTTP server on 127.0.0.1 for protocol tests.

Tests program replies per (method, path regex) and read back every request the client made, so
status codes, headers, retries and bodies are checked over a real socket rather than a mock.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Reply:
    """One programmed answer. ``body`` may be bytes, text, or any JSON-encodable value."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering
    delay: float = 0.0  # hold the request this long (released when the server stops)

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        if isinstance(self.body, bytes):
            body = self.body
        elif isinstance(self.body, str):
            body = self.body.encode()
        else:
            body = json.dumps(self.body).encode()
            headers.setdefault("Content-Type", "application/json")
        return body, headers


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def params(self) -> dict[str, list[str]]:
        return parse_qs(self.query, keep_blank_values=True)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Route:
    method: str
    pattern: re.Pattern[str]
    replies: deque[Reply]
    repeat_last: bool


class ScriptedServer:
    def __init__(self) -> None:
        self._routes: list[_Route] = []
        self._lock = threading.Lock()
        self.requests: list[Recorded] = []
        self.stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        # A short poll interval keeps shutdown (once per test) quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def on(self, method: str, path: str, *replies: Reply, repeat_last: bool = False) -> None:
        """Answer requests whose path fully matches the regex ``path`` with ``replies`` in turn.

        With ``repeat_last`` the final reply keeps answering; otherwise the route is used up.
        Routes are tried in the order they were added.
        """
        with self._lock:
            self._routes.append(_Route(method, re.compile(path), deque(replies), repeat_last))

    def made(self, method: str | None = None, path: str | None = None) -> list[Recorded]:
        """Requests received, optionally filtered by method and a path regex."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method)
                and (path is None or re.fullmatch(path, r.path))
            ]

    def _next_reply(self, recorded: Recorded) -> Reply:
        with self._lock:
            self.requests.append(recorded)
            for route in self._routes:
                if route.method != recorded.method or not route.pattern.fullmatch(recorded.path):
                    continue
                if len(route.replies) > 1 or (route.replies and not route.repeat_last):
                    return route.replies.popleft()
                if route.replies:
                    return route.replies[0]
        text = f"no scripted reply for {recorded.method} {recorded.path}"
        return Reply(418, text, {"Content-Type": "text/plain"})


def _make_handler(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            recorded = Recorded(
                method=self.command,
                path=parts.path,
                query=parts.query,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
            )
            reply = server._next_reply(recorded)
            if reply.delay:
                server.stopping.wait(reply.delay)
            if reply.drop:
                self.close_connection = True
                return
            payload, headers = reply.encoded()
            self.send_response(reply.status)
            for name, value in headers.items():
                self.send_header(name, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve

    return Handler


def make_jwt(claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """An unsigned-looking JWT: the client reads ``exp`` without verifying the signature."""

    def segment(value: dict[str, Any]) -> str:
        raw = json.dumps(value).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return ".".join(
        [segment(header or {"alg": "RS256", "typ": "JWT"}), segment(claims), "c2lnbmF0dXJl"]
    )
