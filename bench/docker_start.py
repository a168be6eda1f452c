"""Benchmark: DockerProvisioner start/stop against raw docker SDK create+start/remove, same run.

    .venv/bin/python bench/docker_start.py [--runs 10] [--concurrency 6]

Needs a Docker engine and builds the offline test runner image if missing. Containers use
network "none" and are removed afterwards. Prints p50/min/max in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from functools import partial

from outrunner.config import DockerImage, RunnerConfig
from outrunner.provisioner import RunnerRequest
from outrunner.provisioners.docker import DockerProvisioner, default_client, resolve_engine
from outrunner.testing.runner_image import ensure_runner_image


def summary(label: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return (
        f"{label:<34} n={len(ms):<3} p50={statistics.median(ms):7.1f} ms  "
        f"min={ms[0]:7.1f}  max={ms[-1]:7.1f}"
    )


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    began = time.perf_counter()
    await call()
    return time.perf_counter() - began


async def main(runs: int, concurrency: int) -> None:
    api = default_client(resolve_engine().url)
    image = ensure_runner_image(api)
    prefix = f"bench{secrets.token_hex(2)}"
    runner = RunnerConfig(
        name=prefix,
        labels=("bench",),
        docker=DockerImage(image=image, runner_cmd="./idle.sh", network="none", stop_timeout=2),
    )

    raw_start: list[float] = []
    raw_remove: list[float] = []
    for n in range(runs):
        name = f"{prefix}-raw{n}"

        def create_start(name: str = name) -> None:
            container = api.create_container(
                image,
                command=["./idle.sh"],
                name=name,
                host_config=api.create_host_config(network_mode="none"),
            )
            api.start(container["Id"])

        raw_start.append(await timed(lambda: asyncio.to_thread(create_start)))
        raw_remove.append(
            await timed(partial(asyncio.to_thread, api.remove_container, name, force=True))
        )

    prov_start: list[float] = []
    prov_stop: list[float] = []
    async with DockerProvisioner() as provisioner:
        await provisioner.start(RunnerRequest(f"{prefix}-warm0000", "jit", runner))
        await provisioner.stop(f"{prefix}-warm0000")
        for n in range(runs):
            name = f"{prefix}-{n:08x}"
            request = RunnerRequest(name=name, jit_config="jit", runner=runner)
            prov_start.append(await timed(partial(provisioner.start, request)))
            prov_stop.append(await timed(partial(provisioner.stop, name)))

        names = [f"{prefix}-c{n:07x}" for n in range(concurrency)]
        burst_start = await timed(
            lambda: asyncio.gather(
                *(provisioner.start(RunnerRequest(nm, "jit", runner)) for nm in names)
            )
        )
        burst_stop = await timed(lambda: asyncio.gather(*(provisioner.stop(nm) for nm in names)))

    print(f"engine: {api.base_url}  image: {image}")
    print(summary("raw SDK create+start", raw_start))
    print(summary("DockerProvisioner.start", prov_start))
    print(summary("raw SDK remove(force)", raw_remove))
    print(summary("DockerProvisioner.stop", prov_stop))
    print(
        f"{concurrency} concurrent starts: {burst_start:.2f} s "
        f"({concurrency / burst_start:.1f}/s); stops: {burst_stop:.2f} s"
    )
    api.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=6)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.concurrency))
