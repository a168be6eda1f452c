"""The provisioner contract as a pytest suite you can run against any backend, including yours.

Subclass :class:`ProvisionerContract` in a test module (name the subclass ``Test...`` so pytest
collects it) and implement the hooks; every ``test_*`` method then runs against your backend::

    from outrunner.testing.contract import ProvisionerContract

    class TestMyProvisioner(ProvisionerContract[MyProvisioner]):
        async def make_provisioner(self) -> MyProvisioner: ...
        def make_request(self, name: str, scale_set: str) -> RunnerRequest: ...
        async def environment_exists(self, provisioner: MyProvisioner, name: str) -> bool: ...
        async def list_environments(self, provisioner: MyProvisioner, prefix: str) -> list[str]: ...
        async def make_failing_request(self, provisioner, name, scale_set) -> RunnerRequest: ...
        async def remove_behind_back(self, provisioner: MyProvisioner, name: str) -> None: ...

Optional hooks: :meth:`~ProvisionerContract.make_foreign_environment` (an environment of a runner's
name that your backend did not create, which cleanup and adopt must leave alone),
:meth:`~ProvisionerContract.make_runner_exit` (end an environment's runner process as a finished
runner would) and :meth:`~ProvisionerContract.discard_environments` (teardown of whatever a test
left, run even when it failed).

Tests of an optional capability (``cleanup``, ``wait_exited``, ``adopt``) run when the provisioner
has it (``isinstance(provisioner, ExitWatcher)`` and so on) and skip, saying so, when it does not.

The base class itself is never collected (``__test__ = False``); subclasses are, unless they set
``__test__ = False`` themselves (useful for an intermediate base).

The tests are async and run on asyncio through anyio's pytest plugin, which ships with anyio
(a dependency of httpx). See ``docs/provisioner-contract.md``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Generic, TypeVar

try:
    import pytest
except ImportError as exc:  # the base install has no pytest: say which extra brings it
    raise ImportError(
        "outrunner.testing.contract is a pytest suite and needs pytest: "
        "pip install 'outrunner[testing]'",
        name=exc.name,
    ) from exc

from outrunner._aio import cancel_and_wait
from outrunner.provisioner import (
    Adopter,
    EnvironmentMonitor,
    ExitWatcher,
    OrphanCleaner,
    Provisioner,
    RunnerRequest,
)

__all__ = ["ProvisionerContract", "runner_name"]

P = TypeVar("P", bound=Provisioner)


def runner_name(scale_set: str) -> str:
    """A runner name as the Scaler makes them: ``<scale set>-<8 hex digits>``."""
    return f"{scale_set}-{secrets.token_hex(4)}"


class ProvisionerContract(Generic[P]):
    """The contract of ``outrunner.provisioner`` as tests; subclass and implement the hooks."""

    __test__ = False
    pytestmark: ClassVar[Any] = [pytest.mark.anyio]

    scale_set_prefix: ClassVar[str] = "contract"
    """Scale set names of a test are this plus 6 random hex digits; every environment a test
    makes is named after its scale set, so :meth:`discard_environments` can find them all."""
    start_error: ClassVar[type[BaseException]] = Exception
    """What a failing start must raise (narrow it to your backend's error class)."""
    cancel_delays: ClassVar[tuple[float, ...]] = (0.0, 0.01, 0.05, 0.1, 0.2)
    """Seconds after which a start is cancelled, one start each: pick them so most land while
    your start is still running."""
    cancel_timeout: ClassVar[float] = 10.0
    """How long a cancelled start may take to finish cancelling (and cleaning up)."""
    concurrency: ClassVar[int] = 4
    """Runners started at once by the concurrency test."""
    exit_timeout: ClassVar[float] = 20.0
    """How long ``wait_exited`` may take to return once its environment has ended (or for a name
    it does not know). A bound for slow backends, not a latency target."""
    still_waiting_time: ClassVar[float] = 0.5
    """How long a ``wait_exited`` on a live environment is watched to check it does not return."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__test__" not in cls.__dict__:
            cls.__test__ = True

    # -- hooks -------------------------------------------------------------------------------

    async def make_provisioner(self) -> P:
        """A fresh provisioner; each test closes the one it gets."""
        raise NotImplementedError

    def make_request(self, name: str, scale_set: str) -> RunnerRequest:
        """A request whose environment starts and stays up until stopped (it must not exit by
        itself during a test). ``scale_set`` is the runner entry's name: ``request.runner.name``.
        """
        raise NotImplementedError

    async def make_failing_request(
        self, provisioner: P, name: str, scale_set: str
    ) -> RunnerRequest:
        """A request that ``provisioner`` fails to start, preferably late (after it has made
        something it must then remove); may reconfigure ``provisioner`` to fail."""
        raise NotImplementedError

    async def environment_exists(self, provisioner: P, name: str) -> bool:
        """Whether an environment called ``name`` exists, asked of the backend itself."""
        raise NotImplementedError

    async def list_environments(self, provisioner: P, prefix: str) -> list[str]:
        """Names of all environments starting with ``prefix``, outrunner's and foreign ones."""
        raise NotImplementedError

    async def remove_behind_back(self, provisioner: P, name: str) -> None:
        """Destroy ``name`` without the provisioner (as an admin or a crash would)."""
        raise NotImplementedError

    async def make_foreign_environment(self, provisioner: P, name: str) -> bool:
        """Make an environment called ``name`` that the backend did not create (no ownership
        marker). Return False if the backend has no such notion (the default)."""
        return False

    async def make_runner_exit(self, provisioner: P, name: str) -> bool:
        """Make the runner process of environment ``name`` end by itself, as a runner does after
        its job, without the provisioner (Docker: the container's main process exits). The
        environment may then stay, ended, or vanish. Return False when your backend cannot (the
        default): the tests that need it skip."""
        return False

    async def discard_environments(self, prefix: str) -> None:
        """Remove every environment starting with ``prefix``, foreign ones too. Runs after each
        test, also after failures, when the test's provisioner may be closed already."""

    # -- fixtures ----------------------------------------------------------------------------

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    async def provisioner(self) -> AsyncIterator[P]:
        provisioner = await self.make_provisioner()
        try:
            yield provisioner
        finally:
            await provisioner.close()

    @pytest.fixture
    async def scale_set(self, provisioner: P) -> AsyncIterator[str]:
        name = f"{self.scale_set_prefix}{secrets.token_hex(3)}"
        try:
            yield name
        finally:
            await self.discard_environments(name)

    # -- helpers -----------------------------------------------------------------------------

    async def _assert_gone(self, provisioner: P, scale_set: str) -> None:
        left = await self.list_environments(provisioner, scale_set)
        assert left == [], f"environments left behind: {left}"

    @staticmethod
    def _watcher(provisioner: Provisioner) -> ExitWatcher:
        watcher: object = provisioner  # a plain object: mypy cannot narrow a TypeVar to it
        if not isinstance(watcher, ExitWatcher):
            pytest.skip("the provisioner has no wait_exited (ExitWatcher is optional)")
        return watcher

    @staticmethod
    def _adopter(provisioner: Provisioner) -> Adopter:
        adopter: object = provisioner
        if not isinstance(adopter, Adopter):
            pytest.skip("the provisioner has no adopt (Adopter is optional)")
        return adopter

    async def _exited(self, provisioner: Provisioner, name: str) -> bool | None:
        """``exited(name)`` when the provisioner has it, else None."""
        monitor: object = provisioner
        return await monitor.exited(name) if isinstance(monitor, EnvironmentMonitor) else None

    async def _returns(self, waiting: asyncio.Task[None], what: str) -> None:
        done, _ = await asyncio.wait({waiting}, timeout=self.exit_timeout)
        assert done, f"wait_exited still waiting {self.exit_timeout} s after {what}"
        waiting.result()

    async def _still_waiting(self, waiting: asyncio.Task[None]) -> None:
        done, _ = await asyncio.wait({waiting}, timeout=self.still_waiting_time)
        if done:
            waiting.result()  # an error says more than the assertion
        assert not done, "wait_exited returned while the environment was running"

    async def _ran_out(self, provisioner: P, name: str) -> None:
        """Make ``name``'s runner exit by itself and wait (bounded) until the provisioner can
        tell; skips when the backend has no :meth:`make_runner_exit`."""
        if not await self.make_runner_exit(provisioner, name):
            pytest.skip("make_runner_exit is not implemented for this backend")
        watcher: object = provisioner
        if isinstance(watcher, ExitWatcher):
            await asyncio.wait_for(watcher.wait_exited(name), self.exit_timeout)
            return
        deadline = asyncio.get_running_loop().time() + self.exit_timeout
        while not await self._exited(provisioner, name):
            assert asyncio.get_running_loop().time() < deadline, f"{name} did not end"
            await asyncio.sleep(0.05)

    # -- the contract ------------------------------------------------------------------------

    async def test_start_then_stop_leaves_nothing(self, provisioner: P, scale_set: str) -> None:
        name = runner_name(scale_set)
        await provisioner.start(self.make_request(name, scale_set))
        assert await self.environment_exists(provisioner, name), "start returned, no environment"
        await provisioner.stop(name)
        assert not await self.environment_exists(provisioner, name)
        await self._assert_gone(provisioner, scale_set)

    async def test_stop_of_unknown_name_is_a_no_op(self, provisioner: P, scale_set: str) -> None:
        await provisioner.stop(runner_name(scale_set))
        await self._assert_gone(provisioner, scale_set)

    async def test_stop_twice_is_a_no_op(self, provisioner: P, scale_set: str) -> None:
        name = runner_name(scale_set)
        await provisioner.start(self.make_request(name, scale_set))
        await provisioner.stop(name)
        await provisioner.stop(name)
        await self._assert_gone(provisioner, scale_set)

    async def test_stop_after_environment_vanished_is_a_no_op(
        self, provisioner: P, scale_set: str
    ) -> None:
        name = runner_name(scale_set)
        await provisioner.start(self.make_request(name, scale_set))
        await self.remove_behind_back(provisioner, name)
        await provisioner.stop(name)
        await self._assert_gone(provisioner, scale_set)

    async def test_failing_start_raises_and_leaves_nothing(
        self, provisioner: P, scale_set: str
    ) -> None:
        name = runner_name(scale_set)
        request = await self.make_failing_request(provisioner, name, scale_set)
        with pytest.raises(self.start_error):
            await provisioner.start(request)
        assert not await self.environment_exists(provisioner, name)
        await self._assert_gone(provisioner, scale_set)

    async def test_start_honours_cancellation(self, provisioner: P, scale_set: str) -> None:
        for delay in self.cancel_delays:
            name = runner_name(scale_set)
            task = asyncio.create_task(provisioner.start(self.make_request(name, scale_set)))
            await asyncio.sleep(delay)
            interrupted = task.cancel()
            done, _ = await asyncio.wait({task}, timeout=self.cancel_timeout)
            assert done, f"start still running {self.cancel_timeout} s after cancel ({delay=})"
            if interrupted:
                assert task.cancelled(), f"start swallowed the cancellation ({delay=})"
                assert not await self.environment_exists(provisioner, name), f"{delay=}"
            else:  # start finished before the cancel: a whole environment, stopped normally
                task.result()
                await provisioner.stop(name)
        await self._assert_gone(provisioner, scale_set)

    async def test_concurrent_starts(self, provisioner: P, scale_set: str) -> None:
        names = sorted(runner_name(scale_set) for _ in range(self.concurrency))
        await asyncio.gather(*(provisioner.start(self.make_request(n, scale_set)) for n in names))
        assert sorted(await self.list_environments(provisioner, scale_set)) == names
        await asyncio.gather(*(provisioner.stop(n) for n in names))
        await self._assert_gone(provisioner, scale_set)

    async def test_cleanup_removes_exactly_this_scale_sets_runners(
        self, provisioner: P, scale_set: str
    ) -> None:
        cleaner: object = provisioner  # a plain object: mypy cannot narrow a TypeVar to it
        if not isinstance(cleaner, OrphanCleaner):
            pytest.skip("the provisioner has no cleanup (it is optional)")
        ours = [runner_name(scale_set) for _ in range(2)]
        # Runners of "<set>-arm" and "<set>b", and a name that is not "<set>-<8 hex>".
        others = [
            runner_name(f"{scale_set}-arm"),
            runner_name(f"{scale_set}b"),
            f"{scale_set}-{secrets.token_hex(5)}",
        ]
        await asyncio.gather(
            *(provisioner.start(self.make_request(n, scale_set)) for n in ours + others)
        )
        foreign = runner_name(scale_set)
        if await self.make_foreign_environment(provisioner, foreign):
            others.append(foreign)

        removed = await cleaner.cleanup(f"{scale_set}-")

        assert sorted(removed) == sorted(ours)
        for name in ours:
            assert not await self.environment_exists(provisioner, name), name
        for name in others:
            assert await self.environment_exists(provisioner, name), f"{name} was removed"

    async def test_close_is_safe_after_use_and_twice(self, provisioner: P, scale_set: str) -> None:
        name = runner_name(scale_set)
        await provisioner.start(self.make_request(name, scale_set))
        await provisioner.stop(name)
        await provisioner.close()
        await provisioner.close()  # and the fixture closes it a third time

    async def test_close_without_use(self) -> None:
        provisioner = await self.make_provisioner()
        await provisioner.close()
        await provisioner.close()

    # -- ExitWatcher -------------------------------------------------------------------------

    async def test_wait_exited_returns_at_once_for_unknown_name(
        self, provisioner: P, scale_set: str
    ) -> None:
        watcher = self._watcher(provisioner)
        waiting = asyncio.create_task(watcher.wait_exited(runner_name(scale_set)))
        await self._returns(waiting, "being asked about an unknown name")

    async def test_wait_exited_returns_when_environment_removed_behind_back(
        self, provisioner: P, scale_set: str
    ) -> None:
        watcher = self._watcher(provisioner)
        name = runner_name(scale_set)
        await provisioner.start(self.make_request(name, scale_set))
        waiting = asyncio.create_task(watcher.wait_exited(name))
        try:
            await self._still_waiting(waiting)
            await self.remove_behind_back(provisioner, name)
            await self._returns(waiting, "the environment was removed")
        finally:
            await cancel_and_wait(waiting)
        await provisioner.stop(name)
        await self._assert_gone(provisioner, scale_set)

    async def test_wait_exited_returns_when_runner_exits(
        self, provisioner: P, scale_set: str
    ) -> None:
        watcher = self._watcher(provisioner)
        name = runner_name(scale_set)
        await provisioner.start(self.make_request(name, scale_set))
        waiting = asyncio.create_task(watcher.wait_exited(name))
        try:
            await self._still_waiting(waiting)
            if not await self.make_runner_exit(provisioner, name):
                pytest.skip("make_runner_exit is not implemented for this backend")
            await self._returns(waiting, "the runner exited")
            assert await self._exited(provisioner, name) in (True, None), "exited() disagrees"
            # Asked again once it has ended: at once.
            again = asyncio.create_task(watcher.wait_exited(name))
            await self._returns(again, "the runner had exited already")
        finally:
            await cancel_and_wait(waiting)
            await provisioner.stop(name)
        await self._assert_gone(provisioner, scale_set)

    async def test_wait_exited_is_cancellable_and_leaves_no_task(
        self, provisioner: P, scale_set: str
    ) -> None:
        watcher = self._watcher(provisioner)
        name = runner_name(scale_set)
        await provisioner.start(self.make_request(name, scale_set))
        # Let the backend set up whatever it keeps for watching, so only a waiter's own
        # leftovers count below.
        await asyncio.wait_for(watcher.wait_exited(runner_name(scale_set)), self.exit_timeout)
        before = asyncio.all_tasks()
        waiting = asyncio.create_task(watcher.wait_exited(name))
        await self._still_waiting(waiting)
        waiting.cancel()
        done, _ = await asyncio.wait({waiting}, timeout=self.cancel_timeout)
        assert done, f"wait_exited still running {self.cancel_timeout} s after cancel"
        assert waiting.cancelled(), "wait_exited swallowed the cancellation"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cancel_timeout
        while left := asyncio.all_tasks() - before:
            if loop.time() >= deadline:
                pytest.fail(f"tasks left behind by a cancelled wait_exited: {left}")
            await asyncio.sleep(0.02)
        assert await self.environment_exists(provisioner, name), "cancelling ended the environment"
        await provisioner.stop(name)
        await self._assert_gone(provisioner, scale_set)

    # -- Adopter -------------------------------------------------------------------------------

    async def test_adopt_of_unknown_name_is_false(self, provisioner: P, scale_set: str) -> None:
        adopter = self._adopter(provisioner)
        name = runner_name(scale_set)
        assert await adopter.adopt(name, self.make_request(name, scale_set).runner) is False
        await self._assert_gone(provisioner, scale_set)

    async def test_second_instance_adopts_a_live_environment(
        self, provisioner: P, scale_set: str
    ) -> None:
        self._adopter(provisioner)
        name = runner_name(scale_set)
        request = self.make_request(name, scale_set)
        await provisioner.start(request)
        # The first instance stays open and is never told: as after a crash of its process.
        second = await self.make_provisioner()
        waiting: asyncio.Task[None] | None = None
        try:
            adopter = self._adopter(second)
            assert await adopter.adopt(name, request.runner) is True, "live environment refused"
            assert await self.environment_exists(second, name), "adopt ended the environment"
            assert await self._exited(second, name) in (False, None), "adopted but exited()"
            watcher: object = second
            if isinstance(watcher, ExitWatcher):
                waiting = asyncio.create_task(watcher.wait_exited(name))
                await self._still_waiting(waiting)
            await second.stop(name)
            if waiting is not None:
                await self._returns(waiting, "the adopted environment was stopped")
            assert not await self.environment_exists(second, name), "stop left it"
            assert await self._exited(second, name) in (True, None), "stopped but not exited()"
        finally:
            await cancel_and_wait(waiting)
            await second.close()
        await self._assert_gone(provisioner, scale_set)

    async def test_adopt_of_ended_environment_is_false_and_stop_removes_it(
        self, provisioner: P, scale_set: str
    ) -> None:
        self._adopter(provisioner)
        name = runner_name(scale_set)
        request = self.make_request(name, scale_set)
        await provisioner.start(request)
        await self._ran_out(provisioner, name)
        second = await self.make_provisioner()
        try:
            adopter = self._adopter(second)
            assert await adopter.adopt(name, request.runner) is False, "adopted an ended runner"
            await second.stop(name)
            assert not await self.environment_exists(second, name), "stop left the leftover"
        finally:
            await second.close()
        await self._assert_gone(provisioner, scale_set)

    async def test_adopt_leaves_foreign_environment_alone(
        self, provisioner: P, scale_set: str
    ) -> None:
        adopter = self._adopter(provisioner)
        name = runner_name(scale_set)
        if not await self.make_foreign_environment(provisioner, name):
            pytest.skip("the backend has no foreign environments (make_foreign_environment)")
        assert await adopter.adopt(name, self.make_request(name, scale_set).runner) is False
        assert await self.environment_exists(provisioner, name), "adopt removed it"

    async def test_cleanup_leaves_kept_environments_alone(
        self, provisioner: P, scale_set: str
    ) -> None:
        adopter = self._adopter(provisioner)
        names = sorted(runner_name(scale_set) for _ in range(3))
        await asyncio.gather(*(provisioner.start(self.make_request(n, scale_set)) for n in names))
        kept = names[1]

        removed = await adopter.cleanup(f"{scale_set}-", keep={kept})

        assert sorted(removed) == [names[0], names[2]]
        assert await self.list_environments(provisioner, scale_set) == [kept]
        assert await adopter.cleanup(f"{scale_set}-", keep=(kept,)) == []
        await provisioner.stop(kept)
        await self._assert_gone(provisioner, scale_set)
