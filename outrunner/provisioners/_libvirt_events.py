"""Domain lifecycle events for the libvirt backend: libvirt's event loop thread, and watches.

libvirt delivers events only while some thread runs its event loop, and
``virEventRunDefaultImpl`` blocks in ``poll()`` for as long as nothing happens. Run in the
provisioner's pool it would hold one of its few threads for good (DESIGN: no worker thread ever
waits), and on the asyncio loop it would stall everything; so one daemon thread of its own runs
it (:func:`ensure_event_loop`), started before the process's first connection, because the
remote driver (every ``qemu://`` URI goes through libvirtd) hooks a connection's socket into the
event loop only when one is registered as it connects.

That thread is process-wide and is never stopped, on purpose. ``virEventRegisterDefaultImpl``
cannot be undone, and from then on libvirtd sends keepalive probes on every connection the
process opens (ours and anyone else's), which only a running event loop answers: without it,
libvirtd closes an idle connection after about 30 s (keepalive_interval 5 s, keepalive_count 5;
the next call fails with "Cannot write data: Broken pipe", measured here). The thread blocks in
``poll()`` and costs no CPU; provisioners come and go without adding threads (one thread per
process, whatever their number).

A :class:`LifecycleWatch` registers one lifecycle callback on one connection and wakes the
asyncio waiters of domains that stopped, shut down, crashed or were undefined
(``call_soon_threadsafe``; the callback itself runs in the event loop thread). A wake-up only
means "look again": the waiter asks libvirt whether the domain really ended, so a ``SHUTDOWN``
that precedes ``STOPPED`` by a few milliseconds, or an event of a domain that was replaced, can
never end a wait early.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import libvirt

__all__ = ["EVENT_THREAD_NAME", "LifecycleWatch", "Waiter", "ensure_event_loop"]

EVENT_THREAD_NAME: Final = "outrunner-libvirt-events"

_END_EVENTS: Final = frozenset(
    {
        libvirt.VIR_DOMAIN_EVENT_STOPPED,
        libvirt.VIR_DOMAIN_EVENT_SHUTDOWN,
        libvirt.VIR_DOMAIN_EVENT_CRASHED,
        libvirt.VIR_DOMAIN_EVENT_UNDEFINED,
    }
)
"""Lifecycle events after which a domain may have ended (``on_poweroff`` and ``on_crash`` are
``destroy`` in outrunner's domains, so a shut down or crashed guest is stopped right after)."""


@functools.cache
def ensure_event_loop() -> None:
    """Register libvirt's default event loop and start the thread that runs it; once per
    process. Call it before opening a connection whose events are wanted."""
    libvirt.virEventRegisterDefaultImpl()
    thread = threading.Thread(target=_run_event_loop, name=EVENT_THREAD_NAME, daemon=True)
    thread.start()


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError:
            # One failed iteration (poll() interrupted and the like); this thread is ours alone,
            # and the pause keeps a lasting failure from spinning a core.
            time.sleep(0.1)


class Waiter:
    """One ``wait_exited``'s mailbox: set when its domain may have ended or the watch is gone."""

    def __init__(self) -> None:
        self.woken = asyncio.Event()
        self.lost = False
        """The connection died: the waiter must watch again on a new one."""
        self.error: Exception | None = None
        """The provisioner was closed: the waiter raises this."""


class LifecycleWatch:
    """The lifecycle events of one connection, for the waiters on one asyncio loop.

    :meth:`register` and :meth:`deregister` are libvirt calls (run them in the provisioner's
    pool); everything else runs on the loop, except the two callbacks, which libvirt invokes in
    the event loop thread and which only hand over to the loop.
    """

    def __init__(
        self,
        conn: libvirt.virConnect,
        loop: asyncio.AbstractEventLoop,
        on_lost: Callable[[LifecycleWatch], None],
    ) -> None:
        self.conn = conn
        self._loop = loop
        self._on_lost = on_lost
        self._waiters: dict[str, set[Waiter]] = {}
        self._callback_id: int | None = None
        self._close_callback = False
        self.lost = False

    # -- in the provisioner's pool ----------------------------------------------------------

    def register(self) -> None:
        """Subscribe to the connection's lifecycle events; raises ``libvirtError`` when the
        driver has none."""
        self._callback_id = self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
        )
        try:
            self.conn.registerCloseCallback(self._on_close, None)
        except libvirt.libvirtError:
            pass  # a driver without it; a dead connection is then noticed at its next call
        else:
            self._close_callback = True

    def deregister(self) -> None:
        """Undo :meth:`register`; failures (a dead connection) do not matter."""
        if self._callback_id is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.domainEventDeregisterAny(self._callback_id)
            self._callback_id = None
        if self._close_callback:
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.unregisterCloseCallback()
            self._close_callback = False

    # -- on the asyncio loop ------------------------------------------------------------------

    def add(self, name: str) -> Waiter:
        waiter = Waiter()
        self._waiters.setdefault(name, set()).add(waiter)
        if self.lost:
            waiter.lost = True
            waiter.woken.set()
        return waiter

    def discard(self, name: str, waiter: Waiter) -> None:
        waiters = self._waiters.get(name)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[name]

    def lose(self) -> None:
        """The connection is gone: wake every waiter to watch again elsewhere."""
        self.lost = True
        for waiter in self._all():
            waiter.lost = True
            waiter.woken.set()

    def fail(self, error: Exception) -> None:
        """The provisioner is closing: every waiter raises ``error``."""
        self.lost = True
        for waiter in self._all():
            waiter.error = error
            waiter.woken.set()

    def _all(self) -> list[Waiter]:
        return [w for waiters in self._waiters.values() for w in waiters]

    def _ended(self, name: str) -> None:
        for waiter in self._waiters.get(name, ()):
            waiter.woken.set()

    def _closed(self) -> None:
        if not self.lost:
            self._on_lost(self)

    # -- in libvirt's event loop thread ---------------------------------------------------------

    def _on_event(
        self, conn: libvirt.virConnect, domain: libvirt.virDomain, event: int, *_: Any
    ) -> None:
        if event in _END_EVENTS:
            with contextlib.suppress(libvirt.libvirtError):  # name() is local; be safe anyway
                self._post(self._ended, domain.name())

    def _on_close(self, conn: libvirt.virConnect, reason: int, opaque: object) -> None:
        self._post(self._closed)

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(callback, *args)
