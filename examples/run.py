#!/usr/bin/env python3
"""outrunner's runner script: flags -> load_config -> Service, or the self-contained demo.

    python examples/run.py --config farm.yml        # a real farm (needs a token)
    python examples/run.py --demo                   # embedded fake GitHub, no token needed

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
    service = Service(config, url=args.url, token=args.token, max_runners=args.max_runners)
    await serve(service)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format, sys.stdout)
    try:
        return asyncio.run(amain(args))
    except (ConfigError, ScaleSetError, ProvisionerError) as exc:
        print(f"outrunner: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
