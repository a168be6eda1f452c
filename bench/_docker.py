"""Docker for the end-to-end benchmark: the engine's event stream (when each container was
created, started and destroyed, by the engine's own clock) and the raw baseline, the docker SDK's
create+start of the same image with nothing of outrunner in between."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import docker

__all__ = ["ContainerEvent", "DockerEvents", "raw_burst", "raw_start", "remove_containers"]

ACTIONS = ["create", "start", "die", "destroy"]


@dataclass(frozen=True)
class ContainerEvent:
    action: str
    name: str
    t: float
    """The engine's timestamp (wall clock, ns precision)."""


class DockerEvents:
    """Records every container create/start/die/destroy event from now on, in a thread."""

    def __init__(self, api: docker.APIClient) -> None:
        self._stream = api.events(decode=True, filters={"type": "container", "event": ACTIONS})
        self._events: list[ContainerEvent] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="bench-docker-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):  # the stream ends when close() cuts it
            for event in self._stream:
                action = str(event.get("Action") or event.get("status") or "")
                name = str((event.get("Actor") or {}).get("Attributes", {}).get("name", ""))
                t = int(event.get("timeNano") or 0) / 1e9 or float(event.get("time") or 0)
                with self._changed:
                    self._events.append(ContainerEvent(action, name, t))
                    self._changed.notify_all()

    def matching(
        self, action: str, names: Callable[[str], bool], after: float = 0.0
    ) -> list[ContainerEvent]:
        with self._changed:
            return [
                e for e in self._events if e.action == action and names(e.name) and e.t >= after
            ]

    def wait(
        self, action: str, names: Callable[[str], bool], count: int, after: float, timeout: float
    ) -> list[ContainerEvent]:
        """Wait until ``count`` events of ``action`` for matching names happened after
        ``after``; return them (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [
                    e for e in self._events if e.action == action and names(e.name) and e.t >= after
                ]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(found)} of {count} {action} events in {timeout:g} s")
                self._changed.wait(left)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.close()
        self._thread.join(5)


def _create_start(
    api: docker.APIClient, image: str, name: str, environment: list[str] | None = None
) -> None:
    """Create and start ``name``: the runner agent when ``environment`` holds its JIT config (as
    outrunner's Docker backend passes it), else a container that only sleeps."""
    container = api.create_container(
        image,
        command=["./run.sh" if environment else "./idle.sh"],
        name=name,
        environment=environment,
        host_config=api.create_host_config(network_mode="host", auto_remove=True),
    )
    api.start(container["Id"])


def raw_start(api: docker.APIClient, image: str, name: str) -> float:
    """Create and start one container the plain SDK way; returns when the calls began."""
    began = time.time()
    _create_start(api, image, name)
    return began


def raw_burst(
    client: Callable[[], docker.APIClient],
    image: str,
    names: list[str],
    environments: list[list[str]] | None = None,
) -> float:
    """Create and start ``len(names)`` containers at once, one thread and one engine client
    each (``client()``, called beforehand); returns when the calls began. ``environments``
    (one per name): run the runner agent with these variables instead of sleeping."""
    clients = [client() for _ in names]
    barrier = threading.Barrier(len(names) + 1)
    envs: list[list[str] | None] = list(environments) if environments else [None] * len(names)

    def one(client: docker.APIClient, name: str, environment: list[str] | None) -> None:
        barrier.wait()
        _create_start(client, image, name, environment)

    try:
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            futures = [
                pool.submit(one, c, n, e) for c, n, e in zip(clients, names, envs, strict=True)
            ]
            began = time.time()
            barrier.wait()
            for future in futures:
                future.result()
        return began
    finally:
        for made in clients:
            made.close()


def remove_containers(api: docker.APIClient, names: Iterable[str]) -> None:
    """Force-remove containers by name, in parallel; missing ones are fine."""

    def remove(name: str) -> None:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            api.remove_container(name, force=True)

    names = list(names)
    if names:
        with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
            list(pool.map(remove, names))


def containers_named(api: docker.APIClient, prefix: str) -> list[str]:
    """Names of every container (running or not) whose name starts with ``prefix``."""
    found: list[dict[str, Any]] = api.containers(all=True, filters={"name": prefix})
    names = [n.lstrip("/") for c in found for n in c.get("Names") or []]
    return [n for n in names if n.startswith(prefix)]
