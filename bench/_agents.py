"""In-memory environments whose runners run in another process and talk HTTP to the fake.

The benchmark measures outrunner's process alone, so the "environments" of its in-memory runs
must not run their runner agents there. :class:`AgentPoolProvisioner` is an
:class:`~outrunner.testing.InMemoryProvisioner` (the whole provisioner contract) whose workload
hands the runner's JIT config to the agent pool, a separate process
(``python -m bench._agents --socket PATH``), over a Unix socket, and ends the environment when
that runner's agent has exited. The pool runs :func:`outrunner.testing.agent.run_agent` for each
runner: it connects to the fake over HTTP, takes a job, "runs" it and reports it, as a real
runner does.

Wire format, one line each way: ``start <name> <jit>`` / ``stop <name>`` to the pool,
``exit <name> <ok|error|stopped>`` back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Collection

import httpx

from outrunner.provisioner import RunnerRequest
from outrunner.scaleset._network import use_asyncio_network
from outrunner.testing import InMemoryProvisioner
from outrunner.testing.agent import AgentError, run_agent

__all__ = ["AgentPool", "AgentPoolProvisioner", "main"]


class AgentPool:
    """One connection to the agent pool process, shared by every provisioner of a process."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting = asyncio.Lock()
        self._exits: dict[str, Callable[[], None]] = {}
        """Name -> what to call when that runner's agent exits."""

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is None:
                reader, writer = await asyncio.open_unix_connection(self._path, limit=1 << 20)
                self._writer = writer
                self._reader_task = asyncio.create_task(self._read(reader))
            return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            _, name, _outcome = line.decode().split()
            exited = self._exits.pop(name, None)
            if exited is not None:
                exited()
        exits, self._exits = self._exits, {}
        for exited in exits.values():  # the pool went away: every agent is gone
            exited()

    async def launch(self, request: RunnerRequest, exited: Callable[[], None]) -> None:
        """Start the runner's agent in the pool; ``exited`` is called once it has ended.

        A callback rather than a task waiting for the exit: a task per runner (its coroutines,
        context and futures) would be a tenth of the objects each full garbage collection of
        outrunner's process walks at 1,000 runners, and its stalls are measured.
        """
        writer = await self._connect()
        self._exits[request.name] = exited
        writer.write(f"start {request.name} {request.jit_config}\n".encode())

    def halt(self, name: str) -> None:
        """Stop the runner's agent, if it is still running (its environment is removed)."""
        if self._exits.pop(name, None) is not None and self._writer is not None:
            self._writer.write(f"stop {name}\n".encode())

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task


class AgentPoolProvisioner(InMemoryProvisioner):
    """An in-memory environment per runner whose agent runs in the pool process."""

    def __init__(self, pool: AgentPool) -> None:
        super().__init__()
        self._pool = pool

    async def start(self, request: RunnerRequest) -> None:
        await super().start(request)
        try:
            await self._pool.launch(request, self.environments[request.name].end)
        except BaseException:
            await super().stop(request.name)
            raise

    async def stop(self, name: str) -> None:
        self._pool.halt(name)
        await super().stop(name)

    async def cleanup(self, prefix: str, *, keep: Collection[str] = ()) -> list[str]:
        names = await super().cleanup(prefix, keep=keep)
        for name in names:
            self._pool.halt(name)
        return names

    async def close(self) -> None:
        if not self.survive_close:
            for name in self.environments:
                self._pool.halt(name)
        await super().close()


# -- the pool process ------------------------------------------------------------------------


AGENTS_PER_CLIENT = 4
"""Agents sharing one httpx client (each holds a connection for its long poll). One client for
all of them made this process the machine's busiest at 1,000 agents: httpcore's pool scans every
waiting request against every connection (see outrunner/scaleset/_pool.py), and the agents
compete with outrunner for the same two cores."""


class _Agents:
    def __init__(self) -> None:
        # client -> agents using it; the fake is on loopback, so no proxy.
        self.clients: dict[httpx.AsyncClient, int] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.finished = 0
        self.failed = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            verb, name, *rest = line.decode().split()
            if verb == "start":
                self.tasks[name] = asyncio.create_task(self._agent(name, rest[0], writer))
            elif verb == "stop":
                task = self.tasks.pop(name, None)
                if task is not None:
                    task.cancel()
        for task in self.tasks.values():
            task.cancel()

    def _client(self) -> httpx.AsyncClient:
        client = next((c for c, users in self.clients.items() if users < AGENTS_PER_CLIENT), None)
        if client is None:
            limits = httpx.Limits(max_connections=AGENTS_PER_CLIENT + 1)
            client = httpx.AsyncClient(trust_env=False, limits=limits)
            use_asyncio_network(client)
        self.clients[client] = self.clients.get(client, 0) + 1
        return client

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()

    async def _agent(self, name: str, jit: str, writer: asyncio.StreamWriter) -> None:
        outcome = "ok"
        client = self._client()
        try:
            await run_agent(jit, client=client, poll_timeout=30.0, retry_for=30.0)
            self.finished += 1
        except asyncio.CancelledError:
            outcome = "stopped"
            raise
        except (AgentError, httpx.HTTPError, TimeoutError) as exc:
            outcome = "error"
            self.failed += 1
            # In the agents' log (kept with --keep): an agent that fails ends its environment,
            # and outrunner only sees that it ended.
            print(f"agent {name} failed: {exc!r}", file=sys.stderr, flush=True)
        finally:
            self.clients[client] -= 1
            self.tasks.pop(name, None)
            if outcome != "stopped" and not writer.is_closing():
                writer.write(f"exit {name} {outcome}\n".encode())


async def _main(path: str) -> None:
    agents = _Agents()
    server = await asyncio.start_unix_server(agents.serve, path, limit=1 << 20)
    async with server:
        os.chmod(path, 0o600)  # the lines carry JIT configs: only this user may connect
        print(json.dumps({"socket": path}), flush=True)
        # Runs until the orchestrator closes our stdin (or kills us).
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await agents.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description="Runner agents for bench.e2e's in-memory runs")
    parser.add_argument("--socket", required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.socket))


if __name__ == "__main__":
    main()
