"""Boot, start and stop times of the libvirt provisioner's VMs, collected from its log records
during the test session and printed in pytest's terminal summary (``make test`` shows them)."""

from __future__ import annotations

import logging
import re
import statistics
from collections.abc import Iterable
from typing import ClassVar

LOGGER = "outrunner.provisioners.libvirt"
_EVENTS = {
    "Guest agent answered": "boot to agent",
    "Runner started in VM": "start (overlay to runner launched)",
    "VM stopped": "stop (destroy and delete files)",
}
_LINE = re.compile(
    r" (?P<msg>Guest agent answered|Runner started in VM|VM stopped) .*?seconds=(?P<s>[0-9.]+)"
)


class VmTimings(logging.Handler):
    """A handler on the libvirt provisioner's logger that keeps each event's ``seconds``."""

    samples: ClassVar[dict[str, list[float]]] = {event: [] for event in _EVENTS}

    @classmethod
    def install(cls) -> VmTimings:
        handler = cls(logging.DEBUG)
        logger = logging.getLogger(LOGGER)
        handler.previous_level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        return handler

    previous_level: int = logging.NOTSET

    def uninstall(self) -> None:
        logger = logging.getLogger(LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self.previous_level)

    def emit(self, record: logging.LogRecord) -> None:
        attrs = getattr(record, "attrs", None) or {}
        message = record.getMessage()
        if message in self.samples and isinstance(attrs.get("seconds"), int | float):
            self.samples[message].append(float(attrs["seconds"]))

    @classmethod
    def add_from_output(cls, lines: Iterable[str]) -> None:
        """Take the same events from a subprocess's text log (the end-to-end test)."""
        for line in lines:
            match = _LINE.search(line)
            if match:
                cls.samples[match["msg"]].append(float(match["s"]))

    @classmethod
    def report(cls) -> list[str]:
        lines = []
        for event, label in _EVENTS.items():
            values = cls.samples[event]
            if values:
                lines.append(
                    f"libvirt VM {label}: n={len(values)} p50={statistics.median(values):.2f}s "
                    f"min={min(values):.2f}s max={max(values):.2f}s"
                )
        return lines
