"""The end-to-end benchmark's plots (matplotlib, the ``bench`` extra), as PNG files."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from bench._report import MB_IN_MIB, SPLIT_LABELS, split_medians

__all__ = ["plot_all"]

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def plot_all(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write every plot the results allow into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    docker = results.get("docker")
    if isinstance(docker, dict) and "single" in docker:
        written.append(_latency_split(docker, folder / "e2e-latency-split.png"))
    memory = results.get("memory")
    if isinstance(memory, list) and memory:
        written.append(_memory_scaling(memory, folder / "e2e-jobs-scaling.png"))
    idle = results.get("idle")
    if isinstance(idle, list) and idle:
        written.append(_idle_scaling(idle, folder / "e2e-idle-scale-sets.png"))
    return written


def _latency_split(docker: dict[str, Any], path: Path) -> Path:
    """Stacked bars: outrunner's way from queued to container start, against the raw SDK's."""
    ours = docker["single"]["outrunner"]
    raw = docker["single"]["raw"]
    segments = [0.0 if v is None else v * 1000 for v in split_medians(ours)]
    raw_created = statistics.median(r["created"] for r in raw) * 1000
    raw_started = statistics.median(r["started"] for r in raw) * 1000
    fig, ax = plt.subplots(figsize=(9, 3.4), layout="constrained")
    left = 0.0
    for index, (label, width) in enumerate(zip(SPLIT_LABELS, segments, strict=True)):
        ax.barh(1, width, left=left, color=COLORS[index], label=f"{label}: {width:.0f} ms")
        left += width
    # The raw bar's two parts in the colours of outrunner's last two: create, then start.
    created, started = len(segments) - 2, len(segments) - 1
    ax.barh(0, raw_created, color=COLORS[created], hatch="//", edgecolor="white")
    ax.barh(
        0,
        raw_started - raw_created,
        left=raw_created,
        color=COLORS[started],
        hatch="//",
        edgecolor="white",
    )
    ax.axvline(raw_started + 25, color="black", linestyle="--", linewidth=1)
    ax.text(raw_started + 27, 0.5, "goal: raw + 25 ms", fontsize=8, va="center")
    ax.set_yticks([0, 1], ["raw SDK\ncreate+start", "outrunner\n(queued job)"])
    ax.set_xlabel(f"milliseconds (medians of {len(ours)} runs each, engine's start event)")
    ax.set_title("One job with real Docker: where the time goes")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, fontsize=8, frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _memory_scaling(levels: list[dict[str, Any]], path: Path) -> Path:
    return _scaling(
        path,
        [level["concurrency"] for level in levels],
        [
            (
                [lv["cpu_ms_per_lifecycle"] for lv in levels],
                5.0,
                "goal 5 ms",
                "CPU ms per job lifecycle",
            ),
            (
                [lv["peak_rss_mib"] for lv in levels],
                150 * MB_IN_MIB,
                "goal 150 MB",
                "peak RSS, MiB",
            ),
            (
                [lv["lag_max_ms"] for lv in levels],
                100.0,
                "goal 100 ms",
                "longest event-loop stall, ms",
            ),
        ],
        xlabel="jobs at once (max_runners)",
        title="Many jobs, in-memory environments: outrunner's process",
        log_x=True,
    )


def _idle_scaling(levels: list[dict[str, Any]], path: Path) -> Path:
    poll = levels[0]["long_poll_s"]
    return _scaling(
        path,
        [level["scale_sets"] for level in levels],
        [
            ([lv["cpu_pct"] for lv in levels], 1.5, "goal 1.5%", "CPU, % of one core"),
            ([lv["rss_mib"] for lv in levels], 100 * MB_IN_MIB, "goal 100 MB", "RSS, MiB"),
            (
                [lv["connections_per_poll"] for lv in levels],
                0.0,
                "goal 0",
                "new TCP connections per poll",
            ),
        ],
        xlabel="idle scale sets",
        title=f"Idle scale sets (each poll held {poll:g} s): outrunner's process",
        log_x=False,
    )


Panel = tuple[list[float], float, str, str]
"""One curve: its values, its goal, the goal's label and the y axis label."""


def _scaling(
    path: Path, x: list[int], panels: list[Panel], *, xlabel: str, title: str, log_x: bool
) -> Path:
    """Curves side by side against the same x, each with its goal line."""
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 3.4), layout="constrained")
    for ax, (y, goal, label, ylabel) in zip(axes, panels, strict=True):
        _curve(ax, x, y, goal, label)
        ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel)
        if log_x:
            ax.set_xscale("log")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curve(ax: Axes, x: list[int], y: list[float], goal: float, label: str) -> None:
    ax.plot(x, y, marker="o", color=COLORS[0])
    for xi, yi in zip(x, y, strict=True):
        ax.annotate(
            f"{yi:.3g}",
            (xi, yi),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    ax.axhline(goal, color=COLORS[3], linestyle="--", linewidth=1, label=label)
    ax.set_ylim(bottom=0, top=max([*y, goal]) * 1.25 or 1.0)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
