"""The provisioner contract suite run against TartProvisioner and the fake tart CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from outrunner.provisioner import RunnerRequest
from outrunner.provisioners.tart import TartProvisioner, TartProvisionerError
from outrunner.testing.contract import ProvisionerContract
from tests.provisioners.test_tart import (
    IDLE_RUNNER,
    discard_vms,
    end_runner,
    install_fake,
    tart_runner,
    write_script,
)
from tests.support.faketart import FakeTart


class TestTartProvisionerContract(ProvisionerContract[TartProvisioner]):
    start_error = TartProvisionerError
    # A start takes about 0.5 s with the fake (clone, set, run, two or three probes while the
    # image "boots" for 0.1 s, exec): these land in each of those steps, and after.
    cancel_delays = (0.0, 0.05, 0.12, 0.2, 0.3, 0.45, 1.0)

    @pytest.fixture(autouse=True)
    def _fake(self, tmp_path: Path) -> None:
        self.fake: FakeTart = install_fake(tmp_path / "tart")
        self.log_dir = tmp_path / "logs"
        self.runner_cmd = write_script(tmp_path / "idle.sh", IDLE_RUNNER)

    async def make_provisioner(self) -> TartProvisioner:
        return TartProvisioner(tart_path=str(self.fake.executable), log_dir=self.log_dir)

    def make_request(self, name: str, scale_set: str) -> RunnerRequest:
        runner = tart_runner(scale_set, self.fake, self.runner_cmd)
        return RunnerRequest(name=name, jit_config="jit", runner=runner)

    async def make_failing_request(
        self, provisioner: TartProvisioner, name: str, scale_set: str
    ) -> RunnerRequest:
        # Fails late: cloned and configured, then `tart run` exits with an error.
        runner = tart_runner(scale_set, self.fake, self.runner_cmd, image="broken")
        return RunnerRequest(name=name, jit_config="jit", runner=runner)

    async def environment_exists(self, provisioner: TartProvisioner, name: str) -> bool:
        return name in self.fake.vms()

    async def list_environments(self, provisioner: TartProvisioner, prefix: str) -> list[str]:
        return [name for name in self.fake.vms() if name.startswith(prefix)]

    async def remove_behind_back(self, provisioner: TartProvisioner, name: str) -> None:
        # As an admin would: `tart stop` then `tart delete`.
        assert self.fake.call("stop", name).returncode == 0
        assert self.fake.call("delete", name).returncode == 0

    async def make_runner_exit(self, provisioner: TartProvisioner, name: str) -> bool:
        # The runner's job is done: its command ends, and with it the runner's `tart exec`.
        await end_runner(self.fake, name)
        return True

    async def discard_environments(self, prefix: str) -> None:
        discard_vms(self.fake, prefix)
