"""A fake GitHub Actions runner for ``outrunner.testing.FakeGitHub``.

It plays the part of ``run.sh --jitconfig <encodedJITConfig>`` of the real runner: it decodes the
JIT config the fake handed out (base64 of a flat JSON object with the fake's ``url``, ``runner_id``,
``runner_name``, ``scale_set_id`` and a one-time ``credential``), connects to the fake, waits for a
job of its scale set, "runs" it by sleeping the job's ``duration``, reports the job's ``result``
and exits. The protocol is described in ``outrunner.testing.fakegithub``; ``agent.sh`` next to this
file speaks the same protocol with nothing but busybox.

Use it in-process::

    result = await run_agent(jit_config.encoded_jit_config)

or as a process, the way a provisioner starts the real runner::

    python -m outrunner.testing.agent --jitconfig <encoded>
    ACTIONS_RUNNER_INPUT_JITCONFIG=<encoded> python -m outrunner.testing.agent

Like the real runner with its broker connection, it rides out outages: a 5xx answer or a transport
error (connection refused, reset, closed without an answer) is retried with a short backoff (0.2 s
doubling to 2 s) for up to ``retry_for`` seconds (``--retry-for``, default 600) per call; 4xx
answers are final (401 unknown credential, 404 runner removed, 409 credential already used).

The process exits 0 once its job is reported (whatever the job's result, like the real runner),
1 with an ``outrunner-agent: error: ...`` line on stderr otherwise, 2 on bad usage. The JIT config
is a credential and is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from outrunner._aio import backoff

JIT_CONFIG_ENV = "ACTIONS_RUNNER_INPUT_JITCONFIG"
# The busybox twin of this module, to copy into tiny runner images.
SHELL_AGENT = Path(__file__).with_name("agent.sh")
DEFAULT_POLL_TIMEOUT = 30.0
# How long one call keeps retrying 5xx answers and transport errors, as a real runner keeps
# retrying its broker connection through an outage.
DEFAULT_RETRY_FOR = 600.0
_RETRY_FIRST = 0.2
_RETRY_MAX = 2.0
_CONNECT_TIMEOUT = 10.0
_PROG = "outrunner-agent"

_log = logging.getLogger(__name__)


class AgentError(Exception):
    """The agent could not take or report a job (bad config, refused credential, ...)."""


@dataclass(frozen=True, kw_only=True)
class JitConfig:
    """The decoded ``encodedJITConfig`` of the fake."""

    url: str
    runner_id: int
    runner_name: str
    scale_set_id: int
    credential: str = field(repr=False)


@dataclass(frozen=True, kw_only=True)
class AgentResult:
    """The job the agent ran and what it reported."""

    runner_id: int
    runner_name: str
    job_id: str
    runner_request_id: int
    display_name: str
    result: str
    duration: float


def decode_jit_config(encoded: str) -> JitConfig:
    """Decode the fake's JIT config; raises AgentError without echoing the secret."""
    try:
        raw: Any = json.loads(base64.b64decode(encoded.strip(), validate=True))
    except (binascii.Error, ValueError) as error:
        raise AgentError("the JIT config is not base64-encoded JSON") from error
    if not isinstance(raw, dict):
        raise AgentError("the JIT config is not a JSON object")
    try:
        return JitConfig(
            url=str(raw["url"]).rstrip("/"),
            runner_id=int(raw["runner_id"]),
            runner_name=str(raw["runner_name"]),
            scale_set_id=int(raw["scale_set_id"]),
            credential=str(raw["credential"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise AgentError(f"the JIT config lacks a valid field: {error}") from error


def _parse_lines(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value
    return fields


@dataclass(frozen=True, kw_only=True)
class _Agent:
    """One agent run: what each of its requests needs."""

    client: httpx.AsyncClient
    config: JitConfig
    poll_timeout: float
    retry_for: float
    session: str = field(default_factory=lambda: secrets.token_hex(8))
    """Sent with each connect: a connect whose answer (the job) was lost gets the job again."""


async def _post(
    agent: _Agent, path: str, data: dict[str, str], read_timeout: float
) -> httpx.Response:
    """POST to the fake; 5xx answers and transport errors are retried for ``agent.retry_for``
    seconds from the first failure. Returns the last answer (a 5xx one once retries ran out);
    raises AgentError when the last attempt got no answer."""
    url = f"{agent.config.url}{path}"
    timeout = httpx.Timeout(_CONNECT_TIMEOUT, read=read_timeout)
    headers = {"Authorization": f"Bearer {agent.config.credential}"}
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    delays = backoff(_RETRY_FIRST, _RETRY_MAX)
    while True:
        try:
            response = await agent.client.post(url, data=data, headers=headers, timeout=timeout)
        except httpx.TransportError as error:
            failure: httpx.TransportError | None = error
            problem = repr(error)
        else:
            if response.status_code < 500:
                return response
            failure, problem = None, f"HTTP {response.status_code}"
        now = loop.time()
        if deadline is None:
            deadline = now + agent.retry_for
        if now >= deadline:
            if failure is not None:
                raise AgentError(f"POST {url} failed: {problem}") from failure
            return response
        delay = min(next(delays), deadline - now)
        _log.info("POST %s: %s; retrying in %.1f s", url, problem, delay)
        await asyncio.sleep(delay)


def _refused(what: str, response: httpx.Response) -> AgentError:
    detail = response.text.strip() or response.reason_phrase
    return AgentError(f"{what} refused: HTTP {response.status_code}: {detail}")


async def _take_job(agent: _Agent) -> dict[str, str]:
    wait = agent.poll_timeout
    while True:
        form = {"wait": f"{wait:g}", "session": agent.session}
        response = await _post(agent, "/_agent/connect", form, wait + 30.0)
        if response.status_code == 200:
            fields = _parse_lines(response.text)
            if "job_id" not in fields:
                raise AgentError("connect answered 200 without a job_id line")
            return fields
        # 204 (and 202, accepted for tolerance) mean "no job yet, ask again".
        if response.status_code not in (202, 204):
            raise _refused("connect", response)


async def _run(agent: _Agent) -> AgentResult:
    config = agent.config
    job = await _take_job(agent)
    try:
        duration = float(job.get("duration") or 0.0)
    except ValueError as error:
        raise AgentError("connect answered a non-numeric duration") from error
    result = job.get("result") or "succeeded"
    # "Running" the job: the fake only needs it to take time.
    await asyncio.sleep(duration)
    response = await _post(
        agent, "/_agent/complete", {"job_id": job["job_id"], "result": result}, _CONNECT_TIMEOUT
    )
    if response.status_code != 200:
        raise _refused("complete", response)
    return AgentResult(
        runner_id=config.runner_id,
        runner_name=config.runner_name,
        job_id=job["job_id"],
        runner_request_id=int(job.get("runner_request_id") or 0),
        display_name=job.get("display_name", ""),
        result=result,
        duration=duration,
    )


async def run_agent(
    encoded_jit_config: str,
    *,
    poll_timeout: float = DEFAULT_POLL_TIMEOUT,
    timeout: float | None = None,
    client: httpx.AsyncClient | None = None,
    retry_for: float = DEFAULT_RETRY_FOR,
) -> AgentResult:
    """Connect with a JIT config, run one job, report it and return what was run.

    ``poll_timeout`` is how long the fake holds each connect request when no job is waiting (the
    agent then asks again, forever, like a real runner); ``timeout`` bounds the whole run
    (TimeoutError). A 5xx answer or a transport error is retried (0.2 s doubling to 2 s) for up
    to ``retry_for`` seconds from a call's first failure (0: never). Raises AgentError when the
    fake refuses the runner (404 removed, 409 credential already used, 401 unknown credential)
    or stays unreachable or failing for ``retry_for``.
    """
    if retry_for < 0:
        raise ValueError("retry_for must not be negative")
    config = decode_jit_config(encoded_jit_config)
    async with asyncio.timeout(timeout), contextlib.AsyncExitStack() as stack:
        if client is None:
            # trust_env=False: the fake is on loopback; a proxy from the environment is never
            # right.
            client = await stack.enter_async_context(httpx.AsyncClient(trust_env=False))
        return await _run(
            _Agent(client=client, config=config, poll_timeout=poll_timeout, retry_for=retry_for)
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m outrunner.testing.agent",
        description="Fake GitHub Actions runner for outrunner.testing.FakeGitHub.",
    )
    parser.add_argument(
        "--jitconfig", metavar="ENCODED", help=f"encoded JIT config (default: ${JIT_CONFIG_ENV})"
    )
    parser.add_argument(
        "--poll-timeout",
        type=float,
        default=DEFAULT_POLL_TIMEOUT,
        metavar="SECONDS",
        help="how long each connect request may wait for a job",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="give up after this long"
    )
    parser.add_argument(
        "--retry-for",
        type=float,
        default=DEFAULT_RETRY_FOR,
        metavar="SECONDS",
        help="how long one call retries 5xx answers and unreachable servers (0: never)",
    )
    args = parser.parse_args(argv)
    encoded = args.jitconfig or os.environ.get(JIT_CONFIG_ENV, "")
    if not encoded:
        print(
            f"{_PROG}: error: no JIT config: pass --jitconfig or set {JIT_CONFIG_ENV}",
            file=sys.stderr,
        )
        return 2
    try:
        result = asyncio.run(
            run_agent(
                encoded,
                poll_timeout=args.poll_timeout,
                timeout=args.timeout,
                retry_for=args.retry_for,
            )
        )
    except AgentError as error:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"{_PROG}: error: no job finished within {args.timeout} s", file=sys.stderr)
        return 1
    print(f"Runner {result.runner_name} ran job {result.display_name} ({result.job_id})")
    print(f"Job {result.display_name} completed with result: {result.result}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
