"""The end-to-end benchmark's goals (issue 13) and its text table."""

from __future__ import annotations

import statistics
from typing import Any

from bench._proc import percentile

__all__ = ["MB_IN_MIB", "evaluate", "render", "split_medians"]

MB_IN_MIB = 1e6 / 2**20
"""Goals are in MB (10^6 bytes); memory is measured in MiB."""

SPLIT_POINTS = ("delivered", "acknowledged", "jit", "created", "started")
SPLIT_LABELS = (
    "queued -> message delivered (fake)",
    "message -> acknowledged (DELETE answered)",
    "acknowledged -> JIT config received",
    "JIT -> container created (event)",
    "created -> started (event)",
)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ms(value: float | None, width: int = 8) -> str:
    return f"{'-':>{width}}" if value is None else f"{value * 1000:{width}.1f}"


def split_medians(samples: list[dict[str, Any]]) -> list[float | None]:
    """Median of each segment between consecutive split points, over the samples that have
    both ends."""
    medians: list[float | None] = []
    for index, point in enumerate(SPLIT_POINTS):
        values = []
        for sample in samples:
            end = sample.get(point)
            start = 0.0 if index == 0 else sample.get(SPLIT_POINTS[index - 1])
            if end is not None and start is not None:
                values.append(end - start)
        medians.append(_median(values))
    return medians


def _top(levels: Any, key: str, wanted: int) -> dict[str, Any] | None:
    """The level measured for ``wanted`` (else the largest one)."""
    if not isinstance(levels, list) or not levels:
        return None
    exact = [level for level in levels if level.get(key) == wanted]
    top: dict[str, Any] = exact[0] if exact else max(levels, key=lambda x: int(x.get(key, 0)))
    return top


def _goal(
    name: str, target: str, measured: str, passed: bool | None, note: str = ""
) -> dict[str, Any]:
    status = "INFO" if passed is None else ("PASS" if passed else "FAIL")
    return {"goal": name, "target": target, "measured": measured, "status": status, "note": note}


def _memory_goal(name: str, mib: float, limit_mb: int) -> dict[str, Any]:
    """A memory goal: set in MB (10^6 bytes), measured in MiB."""
    return _goal(
        name,
        f"<= {limit_mb} MB",
        f"{mib / MB_IN_MIB:.0f} MB ({mib:.0f} MiB)",
        mib <= limit_mb * MB_IN_MIB,
    )


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal of issue 13 item 2 against its measured figure."""
    goals: list[dict[str, Any]] = []
    docker = results.get("docker")
    if isinstance(docker, dict) and "single" in docker:
        ours = [s["started"] for s in docker["single"]["outrunner"]]
        raw = [s["started"] for s in docker["single"]["raw"]]
        ours_m, raw_m = statistics.median(ours), statistics.median(raw)
        goals.append(
            _goal(
                "single job, Docker: median queued -> container start",
                "<= raw + 25 ms",
                f"{ours_m * 1000:.0f} ms vs raw {raw_m * 1000:.0f} ms "
                f"({(ours_m - raw_m) * 1000:+.0f} ms)",
                ours_m <= raw_m + 0.025,
            )
        )
        for size in sorted({b["size"] for b in docker.get("bursts", [])}):
            ratios = [b["ratio"] for b in docker["bursts"] if b["size"] == size]
            ratio = statistics.median(ratios)
            goals.append(
                _goal(
                    f"burst of {size}, Docker: makespan vs {size} raw create+starts",
                    "<= 1.15x",
                    # Three decimals: at two, a median of 1.152 would read "1.15x" and FAIL.
                    f"{ratio:.3f}x"
                    + (
                        f" (runs: {', '.join(f'{r:.2f}' for r in ratios)})"
                        if len(ratios) > 1
                        else ""
                    ),
                    ratio <= 1.15,
                )
            )
        warm = docker.get("warm_pool") or []
        if warm:
            taken = [w["job_taken"] for w in warm]
            goals.append(
                _goal(
                    "warm pool (min_runners 1): queued -> waiting runner has the job",
                    "reported",
                    f"median {statistics.median(taken) * 1000:.0f} ms, "
                    f"p95 {percentile(taken, 0.95) * 1000:.0f} ms",
                    None,
                )
            )
    elif isinstance(docker, dict):
        reason = docker.get("skipped") or docker.get("error", "")
        goals.append(_goal("Docker goals", "-", "not measured", False, reason))

    top = _top(results.get("memory"), "concurrency", 1000)
    if top is not None:
        label = f"{top['concurrency']:,} concurrent jobs"
        unfinished = "" if top["finished"] else f" (only {top['completed']} of {top['jobs']} done)"
        goals += [
            _goal(
                f"{label}: CPU per job lifecycle",
                "<= 5 ms",
                f"{top['cpu_ms_per_lifecycle']:.1f} ms{unfinished}",
                top["finished"] and top["cpu_ms_per_lifecycle"] <= 5.0,
            ),
            _goal(
                f"{label}: longest event-loop stall",
                "<= 100 ms",
                f"{top['lag_max_ms']:.0f} ms (p99 {top['lag_p99_ms']:.1f} ms)",
                top["lag_max_ms"] <= 100.0,
            ),
            _memory_goal(f"{label}: peak RSS", top["peak_rss_mib"], 150),
            _goal(
                f"{label}: every runner deregistered in time",
                "yes",
                "yes"
                if top["deregistered"]
                else f"no: {top['runners_left']} registered at the end, "
                f"{top['timed_out_deregistering']} 'Timed out deregistering' warnings" + unfinished,
                bool(top["deregistered"] and top["finished"]),
            ),
        ]
        surplus = int(top.get("surplus_idle_runners") or 0)
        if surplus:
            goals.append(
                _goal(
                    f"{label}: runners left idle after the last job",
                    "reported",
                    f"{surplus} (started after every job had a runner; kept until a job comes)",
                    None,
                )
            )
    idle = _top(results.get("idle"), "scale_sets", 200)
    if idle is not None:
        label = f"{idle['scale_sets']} idle scale sets"
        goals += [
            _goal(
                f"{label}: CPU",
                "<= 1.5% of a core",
                f"{idle['cpu_pct']:.2f}% (polls every {idle['long_poll_s']:g} s)",
                idle["cpu_pct"] <= 1.5,
            ),
            _memory_goal(f"{label}: RSS", idle["rss_mib"], 100),
            _goal(
                f"{label}: new connections per poll after the first",
                "0",
                f"{idle['connections_per_poll']:.2f} ({idle['new_connections']} in "
                f"{idle['polls']} polls; {idle['polling_scale_sets']} of "
                f"{idle['scale_sets']} sets polled)",
                idle["new_connections"] == 0,
            ),
        ]
    libvirt = results.get("libvirt")
    if isinstance(libvirt, dict) and "single" in libvirt:
        single = [vm["runner_launched"] for vm in libvirt["single"]]
        burst = [vm["runner_launched"] for vm in libvirt["burst"]]
        goals.append(
            _goal(
                "libvirt (TCG): queued -> runner launched in the VM",
                "reported",
                f"single median {statistics.median(single):.2f} s; burst of {len(burst)}: "
                f"last {max(burst):.2f} s",
                None,
            )
        )
    return goals


def render(results: dict[str, Any]) -> str:
    """The whole table: machine, every scenario, then the goals."""
    m = results.get("machine", {})
    settings = results.get("settings", {})
    lines = [
        "outrunner end-to-end benchmark "
        f"({'quick' if settings.get('quick') else 'full'} run, "
        f"{results.get('duration_s', 0) / 60:.1f} min)",
        f"machine: {m.get('nproc')} cores ({m.get('cpu')}), {m.get('memory')}, Linux "
        f"{m.get('kernel')}, Python {m.get('python')}, outrunner {m.get('outrunner')}, "
        f"load before {m.get('load_before', 0):.2f}",
    ]
    docker = results.get("docker")
    if isinstance(docker, dict) and "single" in docker:
        lines += _render_docker(docker)
    elif isinstance(docker, dict):
        lines += ["", f"Docker: {docker.get('skipped') or docker.get('error')}"]
    memory = results.get("memory")
    if isinstance(memory, list) and memory:
        lines += [
            "",
            "In-memory environments (agents in another process, over HTTP); "
            "max_runners = jobs at once; others: CPU s of the fake and the agents",
            f"  {'at once':>7} {'jobs':>6} {'done':>6} {'wall s':>7} {'CPU ms/job':>10} "
            f"{'peak MiB':>8} {'lag max':>8} {'lag p99':>8} {'>100ms':>6} {'peak run':>8} "
            f"{'dereg.':>6} {'surplus':>7} {'CPU s':>6} {'others':>6}",
        ]
        for level in memory:
            lines.append(
                f"  {level['concurrency']:>7} {level['jobs']:>6} {level['completed']:>6} "
                f"{level['wall_s']:>7.1f} {level['cpu_ms_per_lifecycle']:>10.1f} "
                f"{level['peak_rss_mib']:>8.1f} {level['lag_max_ms']:>6.0f}ms "
                f"{level['lag_p99_ms']:>6.1f}ms {level['lag_over_100ms']:>6.0f} "
                f"{level['peak_running']:>8} {'yes' if level['deregistered'] else 'NO':>6} "
                f"{level.get('surplus_idle_runners') or '-':>7} {level['cpu_s']:>6.1f} "
                f"{level.get('fake_and_agents_cpu_s', 0):>6.1f}"
            )
        collected = [level for level in memory if "gc_full_max_ms" in level]
        if collected:
            lines.append(
                "  garbage collector (stops the loop): "
                + "; ".join(
                    f"{level['concurrency']}: {level['gc_full_collections']:.0f} full "
                    f"collections, longest {level['gc_full_max_ms']:.0f} ms, all collections "
                    f"{level['gc_total_ms'] / max(level['completed'], 1):.2f} ms/job"
                    for level in collected
                )
            )
        top = _top(memory, "concurrency", 1000) or {}
        if top.get("stalls"):
            lines.append(
                f"  event-loop stalls over 100 ms at {top['concurrency']} (loop thread sampled "
                "every 20 ms: callback ... innermost outrunner frame):"
            )
            for stall in top["stalls"][:4]:
                where = "; ".join(f"{w} (x{n})" for w, n in stall["where"][:2])
                lines.append(f"    {stall['ms']:>5} ms  {where}")
        latency = top.get("fake_latency_ms") or {}
        kinds = [k for k in ("jit", "deregister", "ack", "agent_complete") if k in latency]
        if kinds:
            parts = [
                f"{k} {latency[k]['p50']:.1f}/{latency[k]['p95']:.1f}/{latency[k]['max']:.0f}"
                for k in kinds
            ]
            lines.append(
                f"  the fake's own handling time at {top['concurrency']}, ms "
                f"(median/p95/max): {', '.join(parts)}"
            )
    elif isinstance(memory, dict):
        lines += ["", f"In-memory: {memory.get('error')}"]
    idle = results.get("idle")
    if isinstance(idle, list) and idle:
        poll = idle[0]["long_poll_s"]
        lines += [
            "",
            f"Idle scale sets (fake holds each poll {poll:g} s; GitHub: 50 s)",
            f"  {'sets':>5} {'window s':>8} {'CPU %':>6} {'ms/poll':>7} {'RSS MiB':>7} "
            f"{'peak':>6} {'polls':>6} {'polling':>7} {'new conns':>9} {'per poll':>8} "
            f"{'lag max':>7}",
        ]
        for level in idle:
            lines.append(
                f"  {level['scale_sets']:>5} {level['window_s']:>8.1f} {level['cpu_pct']:>6.2f} "
                f"{level['cpu_ms_per_poll']:>7.2f} {level['rss_mib']:>7.1f} "
                f"{level['peak_rss_mib']:>6.1f} {level['polls']:>6} "
                f"{level['polling_scale_sets']:>7} {level['new_connections']:>9} "
                f"{level['connections_per_poll']:>8.2f} {level['lag_max_ms']:>5.0f}ms"
            )
    elif isinstance(idle, dict):
        lines += ["", f"Idle: {idle.get('error')}"]
    libvirt = results.get("libvirt")
    if isinstance(libvirt, dict) and "single" in libvirt:
        lines += ["", f"libvirt {libvirt.get('libvirt')}: {libvirt.get('guest')}"]
        lines.append(
            f"  {'':<10} {'JIT':>7} {'domain':>7} {'agent':>7} {'launched':>8}  (s after queued)"
        )
        for label, vms in (("single", libvirt["single"]), ("burst", libvirt["burst"])):
            for vm in vms:
                lines.append(
                    f"  {label:<10} {vm['jit']:>7.2f} {vm['domain_created']:>7.2f} "
                    f"{vm['agent_answered']:>7.2f} {vm['runner_launched']:>8.2f}"
                )
    elif isinstance(libvirt, dict):
        lines += ["", f"libvirt: {libvirt.get('skipped') or libvirt.get('error')}"]
    goals = results.get("goals", [])
    if goals:
        width = max(len(g["goal"]) for g in goals)
        lines += ["", "Goals"]
        for g in goals:
            note = f"  [{g['note']}]" if g["note"] else ""
            head = f"  {g['status']:<4}  {g['goal']:<{width}}  {g['target']:<17}"
            lines.append(f"{head}  {g['measured']}{note}")
    return "\n".join(lines)


def _render_docker(docker: dict[str, Any]) -> list[str]:
    ours = docker["single"]["outrunner"]
    raw = docker["single"]["raw"]
    ours_started = [s["started"] for s in ours]
    raw_started = [s["started"] for s in raw]
    lines = [
        "",
        f"Single job, Docker {docker.get('engine')} (queued -> container start event), "
        f"n={len(ours)}",
        f"  {'':<42} {'median':>8} {'p95':>8} {'min':>8} {'max':>8}  (ms)",
    ]
    for label, values in (
        ("outrunner", ours_started),
        ("raw SDK create+start (host network)", raw_started),
    ):
        lines.append(
            f"  {label:<42} {_ms(statistics.median(values))} {_ms(percentile(values, 0.95))} "
            f"{_ms(min(values))} {_ms(max(values))}"
        )
    lines.append("  outrunner's time split (medians):")
    for label, value in zip(SPLIT_LABELS, split_medians(ours), strict=True):
        lines.append(f"    {label:<44} {_ms(value)}")
    for key, label in (
        ("jit_arrived", "(JIT request reached the fake)"),
        ("jit_answered", "(the fake's JIT answer ready)"),
    ):
        gaps = [s[key] - s["acknowledged"] for s in ours if s.get(key) and s.get("acknowledged")]
        if gaps:
            lines.append(f"    {label + ', after acknowledged':<44} {_ms(statistics.median(gaps))}")
    returned = [s["start_returned"] for s in ours if s.get("start_returned") is not None]
    if returned:
        lines.append(
            f"    {'(start call returned, Container started log)':<44} "
            f"{_ms(statistics.median(returned))}"
        )
    raw_created = [s["created"] for s in raw]
    lines.append(
        f"  raw split (medians): create {_ms(statistics.median(raw_created)).strip()}, "
        f"start {_ms(statistics.median(raw_started) - statistics.median(raw_created)).strip()}"
    )
    bursts = docker.get("bursts") or []
    if bursts:
        lines += [
            "",
            "Bursts, Docker (queued at once -> last container start; raw: as many concurrent "
            "create+starts; each side starts on a quiet machine, first as the first column says)",
            f"  {'first':>9} {'jobs':>5} {'raw median':>10} {'raw last':>9} {'ours median':>11} "
            f"{'ours last':>9} {'ratio':>6} {'last JIT':>8} {'last create':>11} "
            f"{'last start returned':>19}",
        ]
        for b in bursts:
            lasts = [
                f"{max(b.get(key) or [0.0]):>{width}.2f}s"
                for key, width in (
                    ("jit_received", 7),
                    ("create_returned", 10),
                    ("start_returned", 18),
                )
            ]
            lines.append(
                f"  {b.get('first', 'raw'):>9} {b['size']:>5} {statistics.median(b['raw']):>9.2f}s "
                f"{b['raw_makespan']:>8.2f}s {statistics.median(b['outrunner']):>10.2f}s "
                f"{b['outrunner_makespan']:>8.2f}s {b['ratio']:>6.2f} {' '.join(lasts)}"
            )
    warm = docker.get("warm_pool") or []
    if warm:
        taken = [w["job_taken"] for w in warm]
        refill = [w["pool_refilled"] for w in warm]
        lines += [
            "",
            f"Warm pool, Docker (min_runners 1), n={len(warm)}",
            "  queued -> waiting runner has the job: median "
            f"{_ms(statistics.median(taken)).strip()} ms, "
            f"p95 {_ms(percentile(taken, 0.95)).strip()} ms",
            f"  queued -> replacement container started: median "
            f"{_ms(statistics.median(refill)).strip()} ms",
        ]
    return lines
