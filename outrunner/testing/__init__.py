"""Test kit shipped for users: fake GitHub, fake runner agent, in-memory provisioner.

* :class:`FakeGitHub` — a real HTTP server on 127.0.0.1 speaking the scale set protocol, with jobs,
  fault injection and inspection (see :mod:`outrunner.testing.fakegithub`).
* :func:`run_agent` / ``python -m outrunner.testing.agent`` / ``agent.sh`` — a runner agent that
  takes a job from FakeGitHub with a JIT config and reports it.
* :class:`InMemoryProvisioner` — a Provisioner whose environments are dict entries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outrunner.testing.fakegithub import Endpoint, FakeGitHub, JobState
from outrunner.testing.memory import InMemoryProvisioner, MemoryEnvironment

if TYPE_CHECKING:
    from outrunner.testing.agent import AgentError, AgentResult, run_agent

__all__ = [
    "AgentError",
    "AgentResult",
    "Endpoint",
    "FakeGitHub",
    "InMemoryProvisioner",
    "JobState",
    "MemoryEnvironment",
    "run_agent",
]

_AGENT_NAMES = frozenset({"AgentError", "AgentResult", "run_agent"})


def __getattr__(name: str) -> Any:
    # Imported on first use: importing the agent module here would make
    # `python -m outrunner.testing.agent` warn that the module was already imported.
    if name in _AGENT_NAMES:
        from outrunner.testing import agent

        return getattr(agent, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
