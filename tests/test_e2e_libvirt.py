"""End to end with real VMs: examples/run.py as a subprocess, FakeGitHub on 127.0.0.1, and one
libvirt/QEMU VM of the test guest per job (TCG, direct kernel boot, 256 MiB, no NIC).

The VMs have no network interface at all, so the runner command inside a guest cannot reach
the fake GitHub. The test therefore runs a **relay** in place of the VM's network:

1. it watches libvirt for this scale set's domains;
2. once the provisioner has started the runner command in a guest, the command writes the
   arguments it was given to ``/run/outrunner/jitconfig``; the relay reads that file through
   the guest agent (``guest-file-read``). Finding it proves that outrunner's
   ``<runner_cmd> --jitconfig <jit>`` ran inside *that* VM with *that* JIT config;
3. it then runs the Python runner agent (:func:`outrunner.testing.agent.run_agent`) on the host
   with exactly the JIT config read from the guest; the agent takes the job from FakeGitHub and
   reports it, as the real runner inside the VM would. FakeGitHub accepts the agent only with
   the one-time credential in the JIT config it issued to that runner.

After the jobs: no domain, no overlay or console log, no registered runner; SIGTERM ends the
process with status 0 and its message session deleted.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import libvirt
import pytest

from outrunner.provisioners.libvirt import _silence_libvirt_stderr
from outrunner.testing import FakeGitHub
from outrunner.testing.agent import AgentResult, decode_jit_config, run_agent
from tests.provisioners.libvirt_helpers import read_guest_file
from tests.support.guest import JIT_FILE, Guest
from tests.support.libvirt_daemon import SESSION_PREFIX, URI, domain_names, leftovers
from tests.support.run_script import run_jobs, run_script
from tests.support.vm_timings import VmTimings

pytestmark = pytest.mark.libvirt

TOKEN = "ghp_e2eLibvirtSecret_0a9b8c7d6e5f4031"
SCALE_SET = f"{SESSION_PREFIX}e2e"
JOBS = 2


class Relay(threading.Thread):
    """Stands in for the VMs' network; see the module docstring. Runs its own event loop."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="e2e-relay")
        self.stop_event = threading.Event()
        self.jit: dict[str, str] = {}
        """Domain name -> the JIT config its runner command wrote inside the guest."""
        self.results: dict[str, AgentResult] = {}
        self.errors: list[str] = []
        self.peak = 0

    def run(self) -> None:
        _silence_libvirt_stderr()  # a booting guest fails many reads; they are expected
        asyncio.run(self._main())

    async def _main(self) -> None:
        conn = await asyncio.to_thread(libvirt.open, URI)
        agents: set[asyncio.Task[None]] = set()
        try:
            while not self.stop_event.is_set():
                names = await asyncio.to_thread(domain_names, conn, f"{SCALE_SET}-")
                self.peak = max(self.peak, len(names))
                for name in names:
                    if name in self.jit:
                        continue
                    jit = await asyncio.to_thread(_read_jit, conn, name)
                    if jit is not None:
                        self.jit[name] = jit
                        agents.add(asyncio.create_task(self._agent(name, jit)))
                await asyncio.sleep(0.2)
        finally:
            for task in agents:
                task.cancel()
            await asyncio.gather(*agents, return_exceptions=True)
            await asyncio.to_thread(conn.close)

    async def _agent(self, name: str, jit: str) -> None:
        try:
            self.results[name] = await run_agent(jit, poll_timeout=2.0, timeout=180.0)
        except Exception as exc:
            self.errors.append(f"{name}: {exc!r}")


def _read_jit(conn: libvirt.virConnect, name: str) -> str | None:
    """The JIT config the guest's runner command recorded, or None while there is none (still
    booting, agent not up yet, command not started yet, or the domain already gone)."""
    try:
        data = read_guest_file(conn.lookupByName(name), JIT_FILE)
    except libvirt.libvirtError:
        return None
    return data.decode() if data else None


def test_two_jobs_in_two_vms_then_nothing_left(
    libvirt_conn: libvirt.virConnect, test_guest: Guest, vm_scratch: Path
) -> None:
    overlays = vm_scratch / "e2e"
    with FakeGitHub(pat=TOKEN, long_poll_timeout=1.0) as gh:
        config = vm_scratch / "e2e.yml"
        config.write_text(
            f"url: {gh.config_url()}\n"
            "runners:\n"
            f"  {SCALE_SET}:\n"
            "    labels: [self-hosted, e2e-vm]\n"
            "    max_runners: 2\n"
            "    libvirt:\n"
            f"      path: {test_guest.base}\n"
            f"      runner_cmd: {test_guest.runner_cmd}\n"
            "      domain_type: qemu\n"
            "      firmware: bios\n"
            "      network: none\n"
            f"      kernel: {test_guest.kernel}\n"
            f"      initrd: {test_guest.initrd}\n"
            f"      cmdline: {test_guest.cmdline}\n"
            f"      overlay_dir: {overlays}\n"
            "      cpus: 1\n"
            "      memory: 256\n"
            "      boot_timeout: 60\n"
        )
        relay = Relay()
        relay.start()
        try:
            with run_script(config, {**os.environ, "GITHUB_TOKEN": TOKEN}) as script:
                completed = run_jobs(gh, ["e2e-vm"], JOBS, duration=1.0)
                # After its job each runner is stopped (VM destroyed, then its files deleted)
                # and deregistered; wait for all of that before asking for shutdown.
                gh.wait_for(lambda: domain_names(libvirt_conn, f"{SCALE_SET}-") == [], timeout=30)
                gh.wait_for(lambda: leftovers(overlays, SCALE_SET) == [], timeout=30)
                status, output = script.sigterm()
        finally:
            relay.stop_event.set()
            relay.join(timeout=30)

        VmTimings.add_from_output(output.splitlines())
        assert status == 0, output
        assert relay.errors == [], relay.errors
        assert [job.result for job in completed] == ["succeeded"] * JOBS
        runners = {job.runner_name for job in completed}
        assert len(runners) == JOBS, "each job must have run in its own runner"
        for job in completed:
            name = job.runner_name
            assert name is not None
            # The job's runner is a VM whose runner command got that runner's JIT config...
            assert name in relay.jit, f"no JIT config was read from VM {name}"
            issued = decode_jit_config(relay.jit[name])
            assert (issued.runner_name, issued.runner_id) == (name, job.runner_id)
            assert issued.url == gh.url
            # ...and the agent holding exactly that config ran this job.
            assert relay.results[name].job_id == job.job_id
        assert set(relay.jit) == runners  # no VM besides these two got as far as a runner
        assert 1 <= relay.peak <= 2
        assert leftovers(overlays, SCALE_SET) == []
        assert domain_names(libvirt_conn, SCALE_SET) == []
        assert gh.runners() == []
        assert gh.sessions() == []
        assert TOKEN not in output
        for jit in relay.jit.values():
            assert jit not in output
        assert "Shut down cleanly" in output
