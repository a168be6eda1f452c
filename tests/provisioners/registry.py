"""A read-only image registry on 127.0.0.1 (Docker Registry HTTP API V2, just enough to pull).

It serves one image whose only layer is the host's static busybox, so a test can watch the
provisioner pull a missing image from a registry without any network beyond loopback. The
engine treats ``localhost:PORT`` as an insecure registry and falls back to plain HTTP.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _busybox_layer(busybox: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar, open(busybox, "rb") as f:
        data = f.read()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("bin/sh")
        link.type, link.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(link)
    return buffer.getvalue()


@dataclass
class Registry:
    port: int
    repository: str
    tag: str
    blobs: dict[str, bytes]
    manifest: bytes
    requests: list[str] = field(default_factory=list)
    blobs_missing: bool = False
    """Answer blob requests with 404: the pull then fails after the engine accepted it."""

    @property
    def image(self) -> str:
        return f"localhost:{self.port}/{self.repository}:{self.tag}"


@contextmanager
def serve_registry(
    busybox: str = "/bin/busybox", repository: str = "outrunner/pulled", tag: str = "test"
) -> Iterator[Registry]:
    layer = _busybox_layer(busybox)
    compressed = gzip.compress(layer, mtime=0)
    config = json.dumps(
        {
            "architecture": _ARCH.get(platform.machine(), platform.machine()),
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": len(config),
                "digest": _digest(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": len(compressed),
                    "digest": _digest(compressed),
                }
            ],
        }
    ).encode()
    blobs = {_digest(config): config, _digest(compressed): compressed}
    registry = Registry(0, repository, tag, blobs, manifest)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(registry))
    registry.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield registry
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _handler(registry: Registry) -> type[BaseHTTPRequestHandler]:
    manifests = f"/v2/{registry.repository}/manifests/"
    blobs = f"/v2/{registry.repository}/blobs/"

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, *, body: bool) -> None:
            registry.requests.append(f"{self.command} {self.path}")
            if self.path == "/v2/":
                self._send(200, b"{}", "application/json", body)
            elif self.path in (manifests + registry.tag, manifests + _digest(registry.manifest)):
                self._send(200, registry.manifest, MANIFEST_TYPE, body, _digest(registry.manifest))
            elif (
                self.path.startswith(blobs)
                and self.path[len(blobs) :] in registry.blobs
                and not registry.blobs_missing
            ):
                digest = self.path[len(blobs) :]
                self._send(200, registry.blobs[digest], "application/octet-stream", body, digest)
            else:
                self._send(404, b'{"errors":[{"code":"NOT_FOUND"}]}', "application/json", body)

        def _send(
            self, status: int, data: bytes, kind: str, body: bool, digest: str | None = None
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            if digest:
                self.send_header("Docker-Content-Digest", digest)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean; requests are recorded instead

    return Handler
