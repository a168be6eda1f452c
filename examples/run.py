#!/usr/bin/env python3
"""outrunner's runner script: flags -> load_config -> Service, or the self-contained demo.

    python examples/run.py --config farm.yml        # a real farm (needs a token)
    python examples/run.py --demo                   # embedded fake GitHub, no token needed

The first SIGINT/SIGTERM drains: no new runners, idle ones are released at once, and busy ones
finish their jobs for up to ``--drain-timeout`` seconds (default: the config's ``drain_timeout``,
900); a second signal stops every runner at once. Runners are recorded in a journal under
``--state-dir``, so after a crash or ``kill -9`` the next start adopts the ones still running.

Exit status: 0 after a clean shutdown (SIGINT/SIGTERM) or a successful demo, 1 on any error
(printed as one line, without a traceback, for the errors a user can fix).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from outrunner import (
    ConfigError,
    ProvisionerError,
    Service,
    __version__,
    configure_logging,
    get_logger,
    load_config,
)
from outrunner.demo import run_demo
from outrunner.journal import JournalError
from outrunner.scaleset import ScaleSetError
from outrunner.service import serve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="outrunner",
        description="Ephemeral GitHub Actions runners, no Kubernetes required.",
    )
    parser.add_argument("--config", default="/etc/outrunner/config.yml", help="config file (YAML)")
    parser.add_argument("--url", help="repository, org or enterprise URL (overrides the config)")
    parser.add_argument("--token", help="GitHub PAT (overrides GITHUB_TOKEN and the config)")
    parser.add_argument(
        "--max-runners", type=int, default=2, help="default max runners per scale set (2)"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long busy runners may finish their jobs; 0 stops them at "
        "once (default: the config's drain_timeout, 900)",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help="where the runner journal lives (default: config state_dir, $OUTRUNNER_STATE_DIR, "
        "$STATE_DIRECTORY, /var/lib/outrunner)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warn", "error"], help="log level"
    )
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="log format")
    parser.add_argument(
        "--demo", action="store_true", help="run the demo against an embedded fake GitHub"
    )
    parser.add_argument("--demo-jobs", type=int, default=6, help="jobs the demo queues (6)")
    parser.add_argument(
        "--demo-max-runners", type=int, default=3, help="max runners in the demo (3)"
    )
    parser.add_argument("--version", action="version", version=f"outrunner {__version__}")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    if args.demo:
        summary = await run_demo(jobs=args.demo_jobs, max_runners=args.demo_max_runners)
        print(summary.render())
        return 0 if summary.ok else 1
    config = load_config(args.config)
    get_logger().info("Loaded config", runners=len(config.runners), file=args.config)
    service = Service(
        config,
        url=args.url,
        token=args.token,
        max_runners=args.max_runners,
        drain_timeout=args.drain_timeout,
        state_dir=args.state_dir,
    )
    await serve(service)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format, sys.stdout)
    try:
        return asyncio.run(amain(args))
    except (ConfigError, ScaleSetError, ProvisionerError, JournalError) as exc:
        print(f"outrunner: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
