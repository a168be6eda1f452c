"""Access to the real Docker engine for tests: availability, required-ness, tidying.

Tests marked ``docker`` need an engine. It is looked for once per session; without one they are
skipped, or they fail when ``OUTRUNNER_REQUIRE_DOCKER=1`` (CI sets it, so a broken engine cannot
pass as "skipped").
"""

from __future__ import annotations

import functools
import secrets

import docker
import docker.errors

from outrunner.provisioners.docker import default_client, resolve_engine

REQUIRE_ENV = "OUTRUNNER_REQUIRE_DOCKER"
SESSION_PREFIX = f"ortest{secrets.token_hex(2)}"
"""Prefix of every container name in this session (Docker names: [a-zA-Z0-9][a-zA-Z0-9_.-]*)."""


@functools.cache
def engine_problem() -> str | None:
    """Why no engine can be used, or None when one answers."""
    try:
        client = default_client(resolve_engine().url)
    except docker.errors.DockerException as exc:
        return f"no Docker engine reachable: {exc}"
    try:
        client.ping()
    except docker.errors.DockerException as exc:
        return f"the Docker engine does not answer: {exc}"
    finally:
        client.close()
    return None


def connect() -> docker.APIClient:
    return default_client(resolve_engine().url)


def remove_containers(engine: docker.APIClient, prefix: str) -> list[str]:
    """Force-remove every container whose name starts with ``prefix``; return the names."""
    removed = []
    for container in engine.containers(all=True, filters={"name": prefix}):
        names = [n.lstrip("/") for n in container["Names"]]
        if any(n.startswith(prefix) for n in names):
            try:
                engine.remove_container(container["Id"], force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # already being removed
                    raise
            removed.extend(names)
    return removed
