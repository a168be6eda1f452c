"""The ``outrunner`` command: flags -> load_config -> Service, ``--check``, and the demo.

    outrunner --config /etc/outrunner/config.yml      # run a farm (needs a token)
    outrunner --check                                # validate the config and tokens, offline
    outrunner demo                                   # embedded fake GitHub, no token needed

The console script, ``python -m outrunner`` and ``examples/run.py`` all call :func:`main`.
Exit statuses (also in ``--help``): :data:`EX_OK`, :data:`EX_FAILURE`, :data:`EX_USAGE`,
:data:`EX_CONFIG` (sysexits' EX_CONFIG, so a systemd unit can stop restarting a service whose
config is broken with ``RestartPreventExitStatus=78``) and :data:`EX_INTERRUPTED`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from outrunner._version import __version__
from outrunner.config import Config, ConfigError, load_config, read_token_file
from outrunner.health import parse_listen
from outrunner.journal import JournalError, resolve_state_dir
from outrunner.log import BoundLogger, configure_logging, get_logger, parse_level
from outrunner.provisioner import ProvisionerError
from outrunner.scaleset import ScaleSetError
from outrunner.service import (
    DEFAULT_MAX_RUNNERS,
    ScaleSetPlan,
    Service,
    backend_factory,
    serve,
)

__all__ = [
    "EX_CONFIG",
    "EX_FAILURE",
    "EX_INTERRUPTED",
    "EX_OK",
    "EX_USAGE",
    "main",
    "parse_args",
]

EX_OK: Final = 0
"""A clean shutdown after SIGTERM/SIGINT, ``--check`` passed, or the demo succeeded."""
EX_FAILURE: Final = 1
"""A runtime error: GitHub refused the credentials, a backend is unreachable, every scale set
stopped, or the demo failed."""
EX_USAGE: Final = 2
"""A bad flag, flag value or ``OUTRUNNER_*`` environment value (argparse's own status)."""
EX_CONFIG: Final = 78
"""The config file or a credential it needs is unusable (sysexits.h EX_CONFIG)."""
EX_INTERRUPTED: Final = 130
"""Interrupted (Ctrl-C) before the service took over SIGINT: 128 + SIGINT, as shells report."""

DEFAULT_CONFIG: Final = "/etc/outrunner/config.yml"
ENV_CONFIG: Final = "OUTRUNNER_CONFIG"
ENV_LOG_LEVEL: Final = "OUTRUNNER_LOG_LEVEL"
ENV_LOG_FORMAT: Final = "OUTRUNNER_LOG_FORMAT"
ENV_LISTEN: Final = "OUTRUNNER_LISTEN"
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")
_LOG_FORMATS: Final = ("text", "json")
_DEMO_JOBS: Final = 6
_DEMO_MAX_RUNNERS: Final = 3

_EPILOG: Final = f"""\
credentials (first found wins; a runner entry's own token_file or app beats all of them):
  --token, --token-file, the config's app (a GitHub App), $GITHUB_TOKEN,
  $CREDENTIALS_DIRECTORY/github-token (systemd LoadCredential=github-token:PATH), the config's
  token_file. Prefer a file, $GITHUB_TOKEN or systemd credentials: --token is visible to every
  user of the machine in the process list.

environment:
  {ENV_CONFIG}, {ENV_LOG_LEVEL}, {ENV_LOG_FORMAT}, {ENV_LISTEN}: defaults for --config,
  --log-level, --log-format and --listen; OUTRUNNER_STATE_DIR, STATE_DIRECTORY: the state
  directory (see --state-dir).

signals:
  SIGTERM/SIGINT drains: no new runners, idle ones released, busy ones finish their jobs for up
  to the drain timeout; a second signal stops every runner at once. SIGHUP reloads the config
  file (an invalid one is logged and the running config kept).

exit status:
  {EX_OK}    clean shutdown, --check passed, demo succeeded
  {EX_FAILURE}    runtime error (GitHub refused the token, backend unreachable, demo failed)
  {EX_USAGE}    usage error (bad flag or value, bad {ENV_LOG_LEVEL}/{ENV_LOG_FORMAT})
  {EX_CONFIG}   config error (invalid config, no token, unreadable token, App key or CA file)
  {EX_INTERRUPTED}  interrupted before the service started

demo: `outrunner demo --help` (runs jobs against an embedded fake GitHub, no token needed).
"""


class _UsageError(Exception):
    """A flag or environment value is unusable: exit :data:`EX_USAGE` with argparse's format."""


# ---------------------------------------------------------------------------------------------
# Flags


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {value!r}")
    return number


def _listen(value: str) -> str:
    if not value.strip():
        return ""  # off, e.g. an empty $OUTRUNNER_LISTEN
    try:
        parse_listen(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("listen: ")) from None
    return value.strip()


def _log_level(value: str) -> str:
    try:
        parse_level(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid log level {value!r} (choose from {', '.join(_LOG_LEVELS)}, any case)"
        ) from None
    return value.strip().lower()


def _log_format(value: str) -> str:
    chosen = value.strip().lower()
    if chosen not in _LOG_FORMATS:
        raise argparse.ArgumentTypeError(
            f"invalid log format {value!r} (choose from {', '.join(_LOG_FORMATS)})"
        )
    return chosen


def _add_logging(parser: argparse.ArgumentParser, *, inherited: bool) -> None:
    # In the demo subcommand the same flags may follow `demo`; SUPPRESS keeps the subparser
    # from overwriting values given before it with its own defaults.
    default = argparse.SUPPRESS if inherited else None
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default=default,
        metavar="LEVEL",
        help=f"{', '.join(_LOG_LEVELS)} (any case; also warn); default ${ENV_LOG_LEVEL}, else info",
    )
    parser.add_argument(
        "--log-format",
        type=_log_format,
        default=default,
        metavar="FORMAT",
        help=f"text or json, to stderr; default ${ENV_LOG_FORMAT}, else text",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command's parser (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="outrunner",
        description="Ephemeral self-hosted GitHub Actions runners without Kubernetes: registers "
        "each runner entry of the config as a runner scale set and gives every job a fresh "
        "Docker container, libvirt VM or Tart VM.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"config file (YAML); default ${ENV_CONFIG}, else {DEFAULT_CONFIG}",
    )
    parser.add_argument(
        "--url", help="repository, organization or enterprise URL (overrides the config's url)"
    )
    token = parser.add_mutually_exclusive_group()
    token.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the GitHub token from this file (see 'credentials' below)",
    )
    token.add_argument(
        "--token",
        help="the GitHub token itself; prefer --token-file or $GITHUB_TOKEN (see below)",
    )
    parser.add_argument(
        "--max-runners",
        type=_positive_int,
        default=DEFAULT_MAX_RUNNERS,
        metavar="N",
        help="max runners of a scale set whose entry sets no max_runners; at least 1 "
        f"(default {DEFAULT_MAX_RUNNERS})",
    )
    parser.add_argument(
        "--drain-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long busy runners may finish their jobs; 0 stops them at "
        "once (default: the config's drain_timeout, else 900)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the runner journal lives (default: the config's state_dir, "
        "$OUTRUNNER_STATE_DIR, $STATE_DIRECTORY, else /var/lib/outrunner)",
    )
    parser.add_argument(
        "--listen",
        type=_listen,
        metavar="HOST:PORT",
        help="serve /metrics, /healthz, /readyz and /status over HTTP on this address, e.g. "
        f"127.0.0.1:9090 or [::1]:9090 (port 0: any free one); default ${ENV_LISTEN}, else off",
    )
    _add_logging(parser, inherited=False)
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config and resolve every scale set's URL, token and CA file "
        f"without contacting anything; print one line per scale set; exit 0, or {EX_CONFIG}",
    )
    parser.add_argument("-v", "--version", action="version", version=f"outrunner {__version__}")
    # The demo is `outrunner demo`; `--demo` and its old flags still work, unlisted.
    parser.add_argument("--demo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--demo-jobs", dest="jobs", type=_positive_int, default=None, help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--demo-max-runners",
        dest="demo_max_runners",
        type=_positive_int,
        default=None,
        help=argparse.SUPPRESS,
    )
    commands = parser.add_subparsers(dest="command", metavar="{demo}")
    demo = commands.add_parser(
        "demo",
        help="run jobs against an embedded fake GitHub (no token needed) and print a summary",
        description="Start a fake GitHub on 127.0.0.1, register a scale set, queue jobs and run "
        "each in its own environment: a Docker container (a 2 MB busybox image built offline) "
        "when a Docker engine answers, else in-memory environments. Prints a summary; exit 0 "
        "when every job succeeded and nothing was left behind.",
    )
    demo.add_argument(
        "--jobs",
        type=_positive_int,
        default=argparse.SUPPRESS,
        metavar="N",
        help=f"jobs to queue (default {_DEMO_JOBS})",
    )
    demo.add_argument(
        "--max-runners",
        dest="demo_max_runners",
        type=_positive_int,
        default=argparse.SUPPRESS,
        metavar="N",
        help=f"max runners at once (default {_DEMO_MAX_RUNNERS})",
    )
    demo.add_argument(
        "--backend",
        choices=["auto", "docker", "memory"],
        default="auto",
        help="auto: Docker when an engine answers, else in-memory (default auto)",
    )
    _add_logging(demo, inherited=True)
    return parser


@dataclass(frozen=True)
class Options:
    """The command line after defaults from the environment were applied."""

    mode: Literal["serve", "check", "demo"]
    config: str
    url: str | None
    token: str | None
    token_file: str | None
    max_runners: int
    drain_timeout: float | None
    state_dir: str | None
    listen: str | None
    """``HOST:PORT`` of the HTTP endpoints; None: off."""
    log_level: str
    log_format: Literal["text", "json"]
    demo_jobs: int
    demo_max_runners: int
    demo_backend: Literal["auto", "docker", "memory"]


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Options:
    """Parse ``argv`` (default ``sys.argv[1:]``) with ``OUTRUNNER_*`` defaults from ``environ``
    (default ``os.environ``). Exits :data:`EX_USAGE` with a message on a bad flag or value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        return _options(args, env)
    except _UsageError as exc:
        parser.error(str(exc))


def _from_env(value: str | None, env: Mapping[str, str], name: str, default: str) -> str:
    if value is not None:
        return value
    return env.get(name, "").strip() or default


def _env_checked(
    value: str | None, env: Mapping[str, str], name: str, default: str, parse: Callable[[str], str]
) -> str:
    """A flag's value, else the environment's (checked like the flag, the error naming the
    variable), else ``default``."""
    if value is not None:
        return value
    try:
        return parse(_from_env(None, env, name, default))
    except argparse.ArgumentTypeError as exc:
        raise _UsageError(f"${name}: {exc}") from None


def _options(args: argparse.Namespace, env: Mapping[str, str]) -> Options:
    level = _env_checked(args.log_level, env, ENV_LOG_LEVEL, "info", _log_level)
    fmt = _env_checked(args.log_format, env, ENV_LOG_FORMAT, "text", _log_format)
    demo = args.command == "demo" or args.demo
    if args.check and demo:
        raise _UsageError("--check does not apply to the demo")
    mode: Literal["serve", "check", "demo"] = "demo" if demo else "check" if args.check else "serve"
    listen = _env_checked(args.listen, env, ENV_LISTEN, "", _listen)
    return Options(
        mode=mode,
        config=_from_env(args.config, env, ENV_CONFIG, DEFAULT_CONFIG),
        url=args.url,
        token=args.token,
        token_file=args.token_file,
        max_runners=args.max_runners,
        drain_timeout=args.drain_timeout,
        state_dir=args.state_dir,
        listen=listen or None,
        log_level=level,
        log_format="json" if fmt == "json" else "text",
        demo_jobs=getattr(args, "jobs", None) or _DEMO_JOBS,
        demo_max_runners=getattr(args, "demo_max_runners", None) or _DEMO_MAX_RUNNERS,
        demo_backend=getattr(args, "backend", "auto"),
    )


# ---------------------------------------------------------------------------------------------
# What the command does


def _flag_token(options: Options) -> tuple[str | None, str]:
    """The token given on the command line, and how to name where it came from."""
    if options.token_file is not None:
        return read_token_file(options.token_file, "--token-file"), (
            f"--token-file {options.token_file}"
        )
    return options.token, "--token"


def check(options: Options, log: BoundLogger) -> list[str]:
    """Validate the config and everything each scale set needs that can be checked offline;
    return one line per scale set. Raises :class:`ConfigError` at the first problem."""
    config = load_config(options.config)
    lines = []
    # The Service resolves each entry exactly as it would to run it (credentials, min_runners
    # against --max-runners, ...); nothing is started.
    for plan in _service(options, config, log).plan():
        backend_factory(plan.runner)  # the backend's extra is installed
        lines.append(_summary(plan))
    where = resolve_state_dir(options.state_dir, config.state_dir, create=False)
    log.info(
        "Config OK",
        file=options.config,
        scale_sets=len(lines),
        state_dir=str(where.path),
        state_dir_source=where.source,
    )
    return lines


def _summary(plan: ScaleSetPlan) -> str:
    runner = plan.runner
    if runner.docker is not None:
        backend = f"docker image {runner.docker.image}"
    elif runner.libvirt is not None:
        backend = f"libvirt image {runner.libvirt.path}"
    elif runner.tart is not None:
        backend = f"tart image {runner.tart.image}"
    else:  # pragma: no cover - load_config and provider_type allow no other
        backend = runner.provider_type
    parts = [
        plan.url,
        plan.credentials_origin,
        backend,
        f"labels {','.join(runner.labels)}",
        f"max_runners {plan.max_runners}",
    ]
    if plan.ca_file:
        parts.append(f"ca_file {plan.ca_file}")
    return f"{runner.name}: {', '.join(parts)}"


def _service(options: Options, config: Config, log: BoundLogger) -> Service:
    flag_token, flag_origin = _flag_token(options)
    return Service(
        config,
        url=options.url,
        token=flag_token,
        token_origin=flag_origin,
        max_runners=options.max_runners,
        drain_timeout=options.drain_timeout,
        state_dir=options.state_dir,
        listen=options.listen,
        logger=log,
    )


async def _serve(options: Options, log: BoundLogger) -> int:
    config = load_config(options.config)
    log.info("Loaded config", runners=len(config.runners), file=options.config)
    service = _service(options, config, get_logger("outrunner.service"))
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = asyncio.create_task(_reload(service, options.config, log), name="reload")
        reloads.add(task)  # the loop keeps only a weak reference to tasks
        task.add_done_callback(reloads.discard)

    await serve(service, on_reload=on_sighup)
    return EX_OK


async def _reload(service: Service, path: str, log: BoundLogger) -> None:
    """SIGHUP: re-read the config file and apply it (:meth:`Service.reload`); a config that is
    invalid, or cannot be applied, is logged with its errors and the running one kept."""
    log.info("SIGHUP: reloading the config", file=path)
    try:
        config = await asyncio.to_thread(load_config, path)
        await service.reload(config)
    except ConfigError as exc:
        log.error("SIGHUP: the config cannot be used; the running config is kept", error=str(exc))
    except RuntimeError as exc:  # shutting down meanwhile
        log.info("SIGHUP: not reloaded", reason=str(exc))
    except Exception as exc:
        log.error("SIGHUP: reloading failed; the running config is kept", error=str(exc))


async def _demo(options: Options, log: BoundLogger) -> int:
    from outrunner.demo import run_demo

    summary = await run_demo(
        jobs=options.demo_jobs,
        max_runners=options.demo_max_runners,
        backend=options.demo_backend,
        logger=log,
    )
    print(summary.render(), flush=True)
    return EX_OK if summary.ok else EX_FAILURE


async def _run(options: Options) -> int:
    log = get_logger("outrunner.cli")
    if options.mode == "demo":
        return await _demo(options, get_logger("outrunner.demo"))
    if options.mode == "check":
        for line in check(options, log):
            print(line, flush=True)
        return EX_OK
    return await _serve(options, log)


def _fail(status: int, exc: BaseException) -> int:
    print(f"outrunner: error: {exc}", file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status (the console script exits with it)."""
    options = parse_args(argv)
    if options.mode == "serve":
        # A `systemctl reload` during start-up, before serve() handles SIGHUP, would otherwise
        # end the process, and systemd counts that as a clean exit: the farm would stay down.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Logs go to stderr, as daemons' do (journald captures both streams); stdout carries only
    # what the command was asked for: --check's lines and the demo summary.
    configure_logging(options.log_level, options.log_format, sys.stderr)
    try:
        return asyncio.run(_run(options))
    except ConfigError as exc:
        return _fail(EX_CONFIG, exc)
    except (ScaleSetError, ProvisionerError, JournalError) as exc:
        return _fail(EX_FAILURE, exc)
    except RuntimeError as exc:
        if options.mode != "demo":
            raise
        return _fail(EX_FAILURE, exc)  # e.g. "the demo was asked for Docker, but none answers"
    except KeyboardInterrupt:
        return EX_INTERRUPTED
