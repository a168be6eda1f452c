"""The provisioner contract suite run against DockerProvisioner and a real engine."""

from __future__ import annotations

import asyncio

import docker
import docker.errors
import pytest

from outrunner.provisioner import RunnerRequest
from outrunner.provisioners.docker import DockerProvisioner, DockerProvisionerError
from outrunner.testing.contract import ProvisionerContract
from outrunner.testing.runner_image import DEFAULT_TAG
from tests.provisioners.conftest import runner_config
from tests.support.docker_engine import SESSION_PREFIX, remove_containers


@pytest.mark.docker
class TestDockerProvisionerContract(ProvisionerContract[DockerProvisioner]):
    scale_set_prefix = f"{SESSION_PREFIX}c"
    start_error = DockerProvisionerError
    # A start takes about 0.2 s here (create ~0.1 s, start ~0.1 s): these land before, inside
    # the create call, between create and start, inside start, and after.
    cancel_delays = (0.0, 0.02, 0.06, 0.1, 0.15, 0.4)

    @pytest.fixture(autouse=True)
    def _engine(self, engine: docker.APIClient, runner_image: str) -> None:
        self.engine = engine

    async def make_provisioner(self) -> DockerProvisioner:
        return DockerProvisioner()

    def make_request(self, name: str, scale_set: str) -> RunnerRequest:
        return RunnerRequest(name=name, jit_config="jit", runner=runner_config(scale_set))

    async def make_failing_request(
        self, provisioner: DockerProvisioner, name: str, scale_set: str
    ) -> RunnerRequest:
        # Fails in the engine's start call, after the container was created.
        runner = runner_config(scale_set, runner_cmd="/nonexistent/run.sh")
        return RunnerRequest(name=name, jit_config="jit", runner=runner)

    async def environment_exists(self, provisioner: DockerProvisioner, name: str) -> bool:
        try:
            await asyncio.to_thread(self.engine.inspect_container, name)
        except docker.errors.NotFound:
            return False
        return True

    async def list_environments(self, provisioner: DockerProvisioner, prefix: str) -> list[str]:
        found = await asyncio.to_thread(self.engine.containers, all=True, filters={"name": prefix})
        names = (n.lstrip("/") for c in found for n in c["Names"])
        return sorted(n for n in names if n.startswith(prefix))

    async def remove_behind_back(self, provisioner: DockerProvisioner, name: str) -> None:
        await asyncio.to_thread(self.engine.remove_container, name, force=True)

    async def make_runner_exit(self, provisioner: DockerProvisioner, name: str) -> bool:
        # idle.sh, the container's main process, exits 0 on SIGTERM.
        await asyncio.to_thread(self.engine.kill, name, "SIGTERM")
        return True

    async def make_foreign_environment(self, provisioner: DockerProvisioner, name: str) -> bool:
        await asyncio.to_thread(self.engine.create_container, DEFAULT_TAG, ["./idle.sh"], name=name)
        return True

    async def discard_environments(self, prefix: str) -> None:
        await asyncio.to_thread(remove_containers, self.engine, prefix)
