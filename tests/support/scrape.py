"""Reading a Service's HTTP endpoints the way Prometheus and a probe do: over real HTTP, parsed
with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from outrunner.config import Config, DockerImage, RunnerConfig
from outrunner.provisioner import RunnerRequest
from outrunner.scaleset import Client, PersonalAccessToken, RetryPolicy
from outrunner.service import Service
from outrunner.testing import FakeGitHub, InMemoryProvisioner, run_agent

_LISTENING = re.compile(r"Listening for HTTP host=(\S+) port=(\d+)")


def base_url(service: Service) -> str:
    """``http://host:port`` of a running Service's endpoints."""
    assert service.http is not None, "the Service does not listen"
    host, port = service.http.addresses[0]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def base_url_from_log(output: str) -> str | None:
    """``http://host:port`` from the ``Listening for HTTP`` log line, once it is there."""
    found = _LISTENING.search(output)
    return None if found is None else f"http://{found[1]}:{found[2]}"


def parse(text: str) -> dict[str, Metric]:
    """Metric families by name (a counter's name is without ``_total``)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Metric], sample: str, /, **labels: str) -> float:
    """The sum of ``sample``'s values over the series whose labels include ``labels``; fails
    when no series matches (a missing series is not a zero)."""
    matched = _matching(families, sample, labels)
    assert matched, f"no sample {sample} with {labels}"
    return sum(matched)


def value_or_zero(families: dict[str, Metric], sample: str, /, **labels: str) -> float:
    """:func:`value`, or 0 when no series matches (a labelled counter no event created yet)."""
    return sum(_matching(families, sample, labels))


def _matching(families: dict[str, Metric], sample: str, labels: dict[str, str]) -> list[float]:
    return [
        s.value
        for family in families.values()
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    ]


async def scrape(client: httpx.AsyncClient) -> dict[str, Metric]:
    """GET /metrics and parse it."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)


@asynccontextmanager
async def serving(
    gh: FakeGitHub,
    token: str,
    *,
    provisioner: InMemoryProvisioner | None = None,
    max_runners: int = 2,
    wait_ready: bool = True,
) -> AsyncIterator[tuple[Service, httpx.AsyncClient]]:
    """A Service with one scale set ``linux`` (in-memory environments running the fake agent)
    listening on 127.0.0.1:0, and an HTTP client for its endpoints. Stopped on the way out."""
    memory = provisioner or InMemoryProvisioner(workload=agent)
    config = Config(
        url=gh.config_url(),
        runners={
            "linux": RunnerConfig(
                name="linux",
                labels=("linux",),
                max_runners=max_runners,
                docker=DockerImage(image="unused:latest"),
            )
        },
    )
    service = Service(
        config,
        token=token,
        provisioner_factory=lambda entry: memory,
        client_factory=fast_client,
        listen="127.0.0.1:0",
    )
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10):
            while service.http is None or not service.http.addresses:
                assert not task.done(), task.result()
                await asyncio.sleep(0.01)
            if wait_ready:
                await service.wait_ready()
        async with httpx.AsyncClient(base_url=base_url(service), timeout=10) as client:
            yield service, client
    finally:
        service.stop()
        async with asyncio.timeout(30):
            await task


async def agent(request: RunnerRequest) -> object:
    return await run_agent(request.jit_config, poll_timeout=1.0, timeout=30)


def fast_client(url: str, token: str, /, *, ca_file: str = "") -> Client:
    """A scale set client that gives up on an unreachable GitHub within a fraction of a second
    (the default retries for 15 s), so the listener notices an outage at once."""
    return Client(url, PersonalAccessToken(token), retry=RetryPolicy(wait_min=0.01, wait_max=0.05))
