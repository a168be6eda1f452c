"""A scripted HTTP server on 127.0.0.1 for protocol tests.

Tests program replies per (method, path regex) and read back every request the client made, so
status codes, headers, retries and bodies are checked over a real socket rather than a mock.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
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


class _TLSServer(ThreadingHTTPServer):
    """HTTPS: the handshake runs in the connection's own thread, so a client that rejects the
    certificate (or never finishes) cannot stall the accept loop."""

    def __init__(self, address: tuple[str, int], handler: Any, tls: ssl.SSLContext) -> None:
        super().__init__(address, handler)
        self.tls = tls

    def finish_request(self, request: Any, client_address: Any) -> None:
        assert isinstance(request, socket.socket)
        try:
            request = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the client refused the certificate
        super().finish_request(request, client_address)


class ScriptedServer:
    """``tls``: serve HTTPS with this server-side context (the URL becomes ``https://``)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._routes: list[_Route] = []
        self._lock = threading.Lock()
        self.requests: list[Recorded] = []
        self.stopping = threading.Event()
        handler = _make_handler(self)
        self._httpd: ThreadingHTTPServer = (
            ThreadingHTTPServer(("127.0.0.1", 0), handler)
            if tls is None
            else _TLSServer(("127.0.0.1", 0), handler, tls)
        )
        self._httpd.daemon_threads = True
        self.connections = 0
        """TCP connections accepted: counts attempts even when no request arrived (TLS)."""
        process_request = self._httpd.process_request

        def counting(request: Any, client_address: Any) -> None:
            # Runs in the accept loop before the handshake starts, so by the time a client has
            # seen the certificate its connection is counted.
            with self._lock:
                self.connections += 1
            process_request(request, client_address)

        self._httpd.process_request = counting  # type: ignore[method-assign]
        # A short poll interval keeps shutdown (once per test) quick.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        scheme = "https" if isinstance(self._httpd, _TLSServer) else "http"
        return f"{scheme}://{host!s}:{port}"

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


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its private key, as PEM files."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def self_signed_certificate(directory: Path, name: str = "server") -> Certificate:
    """Make a certificate with the ``openssl`` command (no Python crypto package is needed)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the TLS tests need the openssl command (apt-get install openssl)")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            f"/CN=outrunner test {name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return Certificate(cert, key)
