"""The seeded chaos suite (issue 10): scale sets keep every job while GitHub and the provisioner
fail at random moments.

Each seed drives a fresh FakeGitHub and its scale sets through 5xx and 429 bursts, dropped
connections, slow answers, 401s on the message queue and the token exchange, lost sessions, 409
conflicts, an outage longer than a session, and starts that fail or hang, stops that fail and
environments that die (see ``tests/support/chaos.py``). After each run: every job completed; each
job not killed by the chaos ran exactly once and succeeded; no runner was stopped mid-job unless the
chaos killed it; nothing is left (environments, registrations, sessions, journal entries).

Seeds are random and printed with their summary. Replay one with ``OUTRUNNER_CHAOS_SEED=<seed>``
(several: ``OUTRUNNER_CHAOS_SEED=1,2``); run more with ``OUTRUNNER_CHAOS_SEEDS=<count>``.
Every other random seed runs FakeGitHub in acquire mode (older GHES: jobs are offered, and
assigned once acquired); ``OUTRUNNER_CHAOS_ACQUIRE=1`` runs every seed so, ``=0`` none (a replay
without it runs in the default mode, as its summary's replay line says).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from tests.support.chaos import ACQUIRE_ENV, SeedReport, chosen_seeds, random_seed, run_seed

pytestmark = pytest.mark.anyio

CI_SEEDS = 4
"""Random seeds per run by default. More are run (up to ``MAX_SEEDS``) in the rare run whose
seeds together injected fewer than ``MIN_FAULTS`` faults or ran fewer than ``MIN_JOBS`` jobs."""
MAX_SEEDS = 6
MIN_FAULTS = 1000
MIN_JOBS = 200
KINDS = (
    "outage",
    "drop",
    "delay",
    "http-401",
    "http-409",
    "http-429",
    "queue-401",
    "sessions-expired",
    "start-raises",
    "start-hangs",
    "stop-raises",
    "kill-busy",
    "kill-idle",
)
"""Fault kinds every run injects somewhere (besides 5xx answers)."""


async def test_no_job_is_lost_or_run_twice_whatever_fails(tmp_path: Path) -> None:
    seeds, random_seeds = chosen_seeds(CI_SEEDS)
    # The totals are for CI's run; a replay, or a quick run of fewer seeds, cannot reach them.
    totals = random_seeds and len(seeds) >= CI_SEEDS
    chosen_mode = os.environ.get(ACQUIRE_ENV)
    reports: list[SeedReport] = []
    faults: Counter[str] = Counter()
    while seeds:
        seed = seeds.pop(0)
        if chosen_mode is not None:
            acquire_mode = chosen_mode == "1"
        else:
            acquire_mode = random_seeds and len(reports) % 2 == 1
        # Printed before the run too, so even a run that hangs names its seed.
        print(f"chaos seed={seed} acquire_mode={acquire_mode} starting", flush=True)
        report = await run_seed(seed, tmp_path / str(seed), acquire_mode=acquire_mode)
        print(report.summary(), flush=True)
        if report.violations:
            print(f"last {len(report.log_tail)} log lines of seed {seed}:", flush=True)
            print("\n".join(report.log_tail), flush=True)
        reports.append(report)
        faults.update(report.faults)
        short = sum(faults.values()) < MIN_FAULTS or sum(r.jobs for r in reports) < MIN_JOBS
        if totals and not seeds and short and len(reports) < MAX_SEEDS:
            seeds.append(random_seed())
    failed = [r for r in reports if r.violations]
    assert not failed, "\n".join(f"{r.summary()}\n  " + "\n  ".join(r.violations) for r in failed)

    jobs = sum(r.jobs for r in reports)
    total = sum(faults.values())
    print(f"chaos total: {len(reports)} seeds, {jobs} jobs, {total} faults", flush=True)
    if totals:
        assert total >= MIN_FAULTS, faults
        assert jobs >= MIN_JOBS
        for kind in KINDS:
            assert faults[kind] > 0, (kind, faults)
        assert any(faults[f"http-{status}"] for status in (500, 502, 503, 504)), faults
