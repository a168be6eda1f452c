"""The provisioner contract suite run against InMemoryProvisioner: the reference semantics."""

from __future__ import annotations

from outrunner.config import DockerImage, RunnerConfig
from outrunner.provisioner import RunnerRequest
from outrunner.testing.contract import ProvisionerContract
from outrunner.testing.memory import InMemoryProvisioner, MemoryEnvironment


class TestInMemoryProvisionerContract(ProvisionerContract[InMemoryProvisioner]):
    # A start that takes a moment, so the cancellation test interrupts it mid-way.
    cancel_delays = (0.0, 0.005, 0.02)
    start_error = RuntimeError

    async def make_provisioner(self) -> InMemoryProvisioner:
        # Every provisioner of a test sees the same environments, as every process on a host
        # sees the same containers: that is what adoption by a second instance needs.
        if not hasattr(self, "environments"):
            self.environments: dict[str, MemoryEnvironment] = {}
        return InMemoryProvisioner(
            start_delay=0.03, environments=self.environments, survive_close=True
        )

    def make_request(self, name: str, scale_set: str) -> RunnerRequest:
        runner = RunnerConfig(name=scale_set, labels=("linux",), docker=DockerImage(image="x"))
        return RunnerRequest(name=name, jit_config="jit", runner=runner)

    async def make_failing_request(
        self, provisioner: InMemoryProvisioner, name: str, scale_set: str
    ) -> RunnerRequest:
        provisioner.start_error = RuntimeError("no capacity")
        return self.make_request(name, scale_set)

    async def environment_exists(self, provisioner: InMemoryProvisioner, name: str) -> bool:
        return name in provisioner.environments

    async def list_environments(self, provisioner: InMemoryProvisioner, prefix: str) -> list[str]:
        return sorted(n for n in provisioner.environments if n.startswith(prefix))

    async def remove_behind_back(self, provisioner: InMemoryProvisioner, name: str) -> None:
        provisioner.environments.pop(name).removed.set()

    async def make_runner_exit(self, provisioner: InMemoryProvisioner, name: str) -> bool:
        provisioner.environments[name].end()
        return True
