"""Benchmark: log redaction cost against the number of live runners, before and after issue 13.

    .venv/bin/python bench/redaction.py [--jit fake|real] [--before REV] [--sizes 10,100,1000]
                                        [--json FILE]

Every live runner has a JIT config. Up to issue 13 the Scaler registered each with the redactor,
and every registration recompiled one regex of all live secrets. Now JIT configs and JWTs are
masked by shape and registering one keeps nothing. For each number of live JIT configs (plus a
PAT and an installation token registered as long-lived secrets) this prints, for the redactor in
``outrunner/log.py`` at ``REV`` ("before", loaded from ``git show``; the default is the last
commit before the change) and for the working tree ("after"):

* register+unregister: one more runner coming and going while N are live (the Scaler's two calls);
* record: formatting one typical record (text format, a message and four attributes);
* churn: register, a record, unregister, a record (what a runner's start and end cost when
  records arrive between registrations, as they do);
* regex cache: patterns added to Python's ``re`` cache by 5 such churns (before, each is a
  compiled alternation of every live secret, and the cache keeps up to 512).

``--jit fake`` (the default) uses JIT configs like the fake GitHub's (~150 characters, what the
end-to-end benchmark runs against); ``--jit real`` lays them out like the Actions runner's
(``{".runner": ...}`` with an RSA key, ~2 KB), which makes "before" another order of magnitude
slower. Times are the best of three runs of each measurement.

"After, opaque" repeats the measurement with N secrets of no known shape registered by value, the
fallback when a secret is not a JIT config or a JWT: registering stays O(1), and each record pays
one ``str.find`` per secret.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import itertools
import json
import logging
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from outrunner import log as new_log

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "77178bf"
"""The last commit whose redactor compiled a regex of every registered secret."""
PAT = "ghp_" + "a1B2c3D4e5" * 4
INSTALLATION_TOKEN = "ghs_" + "Z9y8X7w6V5" * 4


def load_before(rev: str) -> ModuleType:
    """``outrunner/log.py`` at ``rev`` as a module of its own (it imports only the stdlib)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:outrunner/log.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix="bench-redaction-") as folder:
        path = Path(folder) / "old_log.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("bench_old_outrunner_log", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclass and typing machinery look the module up
        spec.loader.exec_module(module)
    return module


def _b64(value: object) -> str:
    return base64.b64encode(json.dumps(value, separators=(",", ":")).encode()).decode()


def fake_jit_config(n: int) -> str:
    """A JIT config like the fake GitHub's (``outrunner/testing/fakegithub/state.py``)."""
    return _b64(
        {
            "url": "http://127.0.0.1:40000",
            "runner_id": n,
            "runner_name": f"r-{n:08x}",
            "scale_set_id": 1,
            "credential": "jit_" + secrets.token_urlsafe(24),
        }
    )


def real_jit_config(n: int) -> str:
    """A JIT config laid out like the Actions runner's (``{".runner": ...}``), ~2 KB."""
    runner = {"AgentId": n, "AgentName": f"r-{n:08x}", "PoolId": 1, "WorkFolder": "_work"}
    return _b64(
        {
            ".runner": _b64(runner),
            ".credentials": _b64({"Scheme": "OAuthAccessToken", "Data": {"token": "x" * 40}}),
            ".credentials_rsaparams": base64.b64encode(secrets.token_bytes(1000)).decode(),
        }
    )


def opaque_secret(n: int) -> str:
    return f"opaque-{n:06d}-{secrets.token_hex(16)}"


def record(n: int) -> logging.LogRecord:
    out = logging.LogRecord(
        "outrunner.scaler", logging.INFO, __file__, 1, "Spawning runner", None, None
    )
    out.attrs = {"scale_set": "linux", "name": f"r-{n:08x}", "runner_id": n, "phase": "starting"}
    return out


def per_call(call: Callable[[], object], *, budget: float = 0.3, most: int = 10000) -> float:
    """Seconds per call of ``call``, best of three runs of up to ``budget`` s or ``most`` calls."""
    best = float("inf")
    for _ in range(3):
        calls = 0
        began = time.perf_counter()
        while True:
            call()
            calls += 1
            elapsed = time.perf_counter() - began
            if elapsed >= budget or calls >= most:
                break
        best = min(best, elapsed / calls)
    return best


def measure(module: ModuleType, live: int, make: Callable[[int], str]) -> dict[str, float]:
    redactor: Any = module.Redactor()
    formatter: Any = module.TextFormatter(utc=True, redactor=redactor)
    redactor.register(PAT)
    redactor.register(INSTALLATION_TOKEN)
    if hasattr(redactor, "_recompile"):
        # The old redactor recompiles at every registration: filling it one by one would take
        # minutes at 1,000. Set it up in one step; only what follows is measured.
        redactor._counts.update(make(n) for n in range(live))
        redactor._recompile()
    else:
        for n in range(live):
            redactor.register(make(n))
    # Made beforehand, so that making them is not measured; reused in turn (each call leaves the
    # set as it found it).
    extra = itertools.cycle([make(live + n) for n in range(1000)])
    typical = record(7)
    redactor.redact("warm")

    def register_unregister() -> None:
        secret = next(extra)
        redactor.register(secret)
        redactor.unregister(secret)

    def churn() -> None:
        secret = next(extra)
        redactor.register(secret)
        formatter.format(typical)
        redactor.unregister(secret)
        formatter.format(typical)

    pair = per_call(register_unregister)
    per_record = per_call(lambda: formatter.format(typical))
    churned = per_call(churn)
    re.purge()
    for _ in range(5):
        churn()
    cached = len(re._cache)  # type: ignore[attr-defined]
    return {
        "live": live,
        "register_unregister_ms": pair * 1000,
        "record_us": per_record * 1e6,
        "churn_ms": churned * 1000,
        "re_cache_entries_after_5_churns": cached,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help=f"git revision (default {BEFORE})")
    parser.add_argument("--sizes", default="10,100,1000", help="live secrets (comma-separated)")
    parser.add_argument("--jit", choices=("fake", "real"), default="fake", help="JIT config layout")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    jit_config = fake_jit_config if args.jit == "fake" else real_jit_config
    sizes = [int(size) for size in args.sizes.split(",")]
    before = load_before(args.before)
    rows: list[dict[str, Any]] = []
    for label, module, make in (
        (f"before ({args.before})", before, jit_config),
        ("after", new_log, jit_config),
        ("after, opaque", new_log, opaque_secret),
    ):
        for live in sizes:
            rows.append({"code": label, "jit": args.jit, **measure(module, live, make)})
    header = (
        f"{'code':<18} {'live':>5} {'register+unregister':>20} {'record':>11} "
        f"{'churn':>11} {'re cache +':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['code']:<18} {row['live']:>5} {row['register_unregister_ms']:>17.3f} ms "
            f"{row['record_us']:>8.1f} us {row['churn_ms']:>8.3f} ms "
            f"{row['re_cache_entries_after_5_churns']:>10}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
