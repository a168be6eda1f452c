"""The outrunner configuration file (gha-outrunner 1.2 schema) and credential resolution.

The file maps scale set names to runner definitions; each definition picks exactly one backend
(Docker, libvirt or Tart). See ``docs/configuration.md`` for every key.

:func:`load_config` is strict: unknown keys, wrong types and impossible values are errors, all
reported at once, each naming the file, the line and the key path::

    config.yml:14: runners.linux.docker.mounts[0].source: must be an absolute path, got "data"

The schema is declarative (see :mod:`outrunner._schema`): the dataclasses below *are* the
schema, and adding a key is adding a field.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final, Literal

import yaml

from outrunner._schema import (
    Check,
    ConfigProblem,
    Decoder,
    FrozenMap,
    YamlLoader,
    absolute_path,
    describe,
    empty_or,
    exactly_one_of,
    http_url,
    no_tilde,
    non_blank,
    positive,
    quote,
    rules,
    unique,
    unique_by,
    unique_keys_ignoring_case,
    without_chars,
)
from outrunner.scaleset.auth import APP_EXTRA_HINT, GitHubApp, load_app_private_key
from outrunner.scaleset.errors import InvalidConfigURLError
from outrunner.scaleset.urls import Scope, parse_config_url

__all__ = [
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DockerImage",
    "DockerMount",
    "GitHubAppConfig",
    "LibvirtImage",
    "LibvirtMount",
    "ResolvedApp",
    "ResolvedToken",
    "RunnerConfig",
    "TartImage",
    "TartMount",
    "load_config",
    "read_token_file",
    "resolve_runner_ca_file",
    "resolve_runner_credentials",
    "resolve_runner_token",
    "resolve_runner_token_source",
    "resolve_runner_url",
    "resolve_token",
    "resolve_url",
]

ProviderType = Literal["docker", "libvirt", "tart"]

# --------------------------------------------------------------------------------------------
# Constraints specific to outrunner

SCALE_SET_NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Runner names are "<scale set>-<8 hex>"; GitHub caps runner names at 64 characters.
SCALE_SET_NAME_MAX: Final = 64 - len("-") - 8
# virtio-fs tags are at most 36 bytes (struct virtio_fs_config in the virtio spec).
_VIRTIOFS_TAG_MAX: Final = 36


def _pool_within_max(min_runners: int, max_runners: int | None) -> str | None:
    """``min_runners`` idle runners must fit under ``max_runners`` (``None``: the flag's value,
    checked when the Service plans the scale set)."""
    if max_runners is not None and min_runners > max_runners:
        return f"min_runners ({min_runners}) must not exceed max_runners ({max_runners})"
    return None


def _scale_set_name(name: str) -> str | None:
    # The name prefixes Docker container names, libvirt domains, Tart VMs and GitHub runner
    # names; Docker's rule ([a-zA-Z0-9][a-zA-Z0-9_.-]*) is the strictest of these.
    if not SCALE_SET_NAME_PATTERN.match(name):
        return (
            'scale set name must start with a letter or digit and use only letters, digits, "_", '
            f'"." and "-" (it prefixes container, VM and runner names), got {quote(name)}'
        )
    if len(name) > SCALE_SET_NAME_MAX:
        return (
            f"scale set name must be at most {SCALE_SET_NAME_MAX} characters (runner names are "
            f'"<name>-<8 hex>" and GitHub allows 64), got {len(name)}'
        )
    return None


def _trimmed(value: str) -> str | None:
    if value != value.strip():
        return f"must not start or end with whitespace, got {quote(value)}"
    return None


def _virtiofs_tag(source: str) -> str | None:
    # The libvirt backend derives the virtio-fs tag from the last path component.
    tag = os.path.basename(source.rstrip("/"))
    if not tag:
        return (
            'must name a directory below "/" (its last component becomes the virtio-fs tag), '
            f"got {quote(source)}"
        )
    if len(tag.encode()) > _VIRTIOFS_TAG_MAX:
        return (
            f"last path component becomes the virtio-fs tag and must be at most "
            f"{_VIRTIOFS_TAG_MAX} bytes, got {quote(tag)}"
        )
    return None


_TART_DIR_SEPARATOR = without_chars(":", 'tart run --dir uses ":" as its separator')

_DOCKER_HOST_SCHEMES: Final = ("unix://", "tcp://", "ssh://")
# Docker refuses memory limits below 6 MiB (linuxMinMemory in the engine).
_DOCKER_MIN_MEMORY: Final = 6
# outrunner hands the JIT config to the runner in this variable (docker jit_via: env).
_JIT_ENV: Final = "ACTIONS_RUNNER_INPUT_JITCONFIG"


def _docker_host(value: str) -> str | None:
    scheme = next((s for s in _DOCKER_HOST_SCHEMES if value.startswith(s)), None)
    rest = value[len(scheme) :] if scheme else ""
    if scheme is None or not rest or any(c.isspace() for c in value):
        return f"must be a unix://, tcp:// or ssh:// Docker endpoint, got {quote(value)}"
    if scheme == "unix://" and not rest.startswith("/"):
        return f"unix:// endpoint must name an absolute socket path, got {quote(value)}"
    return None


def _no_whitespace(value: str) -> str | None:
    if any(c.isspace() for c in value):
        return f"must not contain whitespace, got {quote(value)}"
    return None


def _docker_memory(value: int) -> str | None:
    if value < _DOCKER_MIN_MEMORY:
        return f"must be at least {_DOCKER_MIN_MEMORY} (MiB, Docker's minimum), got {value}"
    return None


def _not_negative(value: float) -> str | None:
    return f"must be 0 or more, got {value}" if value < 0 else None


def _host_port(value: str) -> str | None:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT``; port 0 picks a free one."""
    try:
        parse_host_port(value)
    except ValueError as exc:
        return str(exc)
    return None


def parse_host_port(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` / ``[IPv6]:PORT`` / ``:PORT`` (host ``""``: every address); raises
    :class:`ValueError` naming what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port from 0 to 65535, got {quote(value)}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets, e.g. [::1]:9090, got {quote(value)}")
    return host, int(port)


def _ca_file(path: str) -> str | None:
    # Loaded as the client will load it, so a wrong path or a file without a PEM certificate is
    # reported with the config's file and line at start-up, not as a TLS error later.
    try:
        # Reading a FIFO or /dev/zero would never end.
        reason = "" if stat.S_ISREG(os.stat(path).st_mode) else "not a regular file"
        if not reason:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        if isinstance(exc, ssl.SSLError):
            reason = "not a PEM certificate bundle" + (f" ({exc.reason})" if exc.reason else "")
        elif isinstance(exc, FileNotFoundError):
            reason = "file not found"
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = str(exc)
    if reason:
        return f"cannot use {quote(path, limit=None)} as a CA file: {reason}"
    return None


_CA_FILE_RULES: Final = rules(non_blank, no_tilde, relative_to_file=True, path_checks=(_ca_file,))


DEFAULT_DRAIN_TIMEOUT: Final = 900.0
"""Seconds a shutdown waits for busy runners to finish their jobs (``drain_timeout``)."""


def _env_name(name: str) -> str | None:
    if not name or "=" in name or "\0" in name:
        return f'variable names must be non-empty without "=", got {quote(name)}'
    if name == _JIT_ENV:
        return f"{name} is reserved: outrunner passes the runner's JIT config in it"
    return None


# --------------------------------------------------------------------------------------------
# Schema


@dataclass(frozen=True)
class DockerMount:
    """A bind mount into the runner container."""

    source: str = field(metadata=rules(absolute_path))
    target: str = field(metadata=rules(absolute_path))
    read_only: bool = False


@dataclass(frozen=True)
class DockerImage:
    """A runner in a Docker container started from ``image``."""

    image: str = field(metadata=rules(non_blank))
    runner_cmd: str = field(default="./run.sh", metadata=rules(non_blank))
    mounts: tuple[DockerMount, ...] = field(default=(), metadata=rules(unique_by("target")))
    host: str = field(default="", metadata=rules(empty_or(_docker_host)))
    """Engine endpoint; empty: ``DOCKER_HOST``, else the active docker context, else the default."""
    network: str = field(default="", metadata=rules(_no_whitespace))
    """Empty: Docker's default network."""
    cpus: float | None = field(default=None, metadata=rules(positive))
    memory: int | None = field(default=None, metadata=rules(_docker_memory))
    """MiB."""
    env: Mapping[str, str] = field(
        default_factory=FrozenMap[str, str], metadata=rules(keys=(_env_name,))
    )
    privileged: bool = False
    runtime: str = field(default="", metadata=rules(_no_whitespace))
    """Empty: the engine's default runtime (runc)."""
    user: str = field(default="", metadata=rules(_no_whitespace))
    """Empty: the image's user."""
    jit_via: Literal["env", "arg"] = "env"
    pull: Literal["missing", "always", "never"] = "missing"
    auto_remove: bool = True
    stop_timeout: int = field(default=10, metadata=rules(_not_negative))
    """Seconds between SIGTERM and SIGKILL when a runner is stopped."""


@dataclass(frozen=True)
class LibvirtMount:
    """A host directory shared into a libvirt VM with virtio-fs."""

    source: str = field(metadata=rules(absolute_path, _virtiofs_tag))


LIBVIRT_DEFAULT_URI: Final = "qemu:///system"
LIBVIRT_DEFAULT_OVERLAY_DIR: Final = "/var/lib/outrunner/overlays"
LIBVIRT_CPU_MODES: Final = ("host-passthrough", "host-model", "maximum")
# The backend drives QEMU (guest agent, kvm/qemu domains): the qemu driver over any transport,
# or libvirt's in-process test driver (for tests of code built on outrunner).
_LIBVIRT_URI: Final = re.compile(r"^(qemu(\+[a-z0-9]+)?|test)://\S*$")
_CPU_MODEL: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _libvirt_uri(value: str) -> str | None:
    if not _LIBVIRT_URI.match(value):
        return (
            "must be a libvirt connection URI of the QEMU driver, like qemu:///system or "
            f"qemu+ssh://host/system, got {quote(value)}"
        )
    return None


def _cpu_mode(value: str) -> str | None:
    if value in LIBVIRT_CPU_MODES or _CPU_MODEL.match(value):
        return None
    modes = ", ".join(LIBVIRT_CPU_MODES)
    return f"must be one of {modes} or a QEMU CPU model name, got {quote(value)}"


def _libvirt_checks(image: LibvirtImage) -> str | None:
    if image.socket and image.uri != LIBVIRT_DEFAULT_URI:
        return (
            f"socket and uri cannot both be set (socket means "
            f"qemu+unix:///system?socket=<path>; put ?socket= into uri {quote(image.uri)} instead)"
        )
    if not image.kernel and (image.initrd or image.cmdline):
        which = " and ".join(k for k in ("initrd", "cmdline") if getattr(image, k))
        return f"{which} need kernel (they are only used for direct kernel boot)"
    if image.domain_type == "qemu" and image.cpu_mode == "host-passthrough":
        return (
            "cpu_mode host-passthrough needs domain_type kvm: libvirt refuses it for the qemu "
            "(TCG emulation) domain type; use maximum or host-model, or leave cpu_mode unset"
        )
    return None


@dataclass(frozen=True)
class LibvirtImage:
    """A runner in a libvirt/QEMU VM booted from a copy-on-write overlay of ``path``."""

    path: str = field(metadata=rules(absolute_path))
    """The golden qcow2 image; never modified."""
    runner_cmd: str = field(default="/actions-runner/run.sh", metadata=rules(non_blank))
    uri: str = field(default=LIBVIRT_DEFAULT_URI, metadata=rules(_libvirt_uri))
    socket: str = field(default="", metadata=rules(empty_or(absolute_path)))
    """libvirtd's Unix socket (gha-outrunner's key): ``qemu+unix:///system?socket=<socket>``."""
    domain_type: Literal["kvm", "qemu"] = "kvm"
    """``kvm``: hardware virtualization; ``qemu``: TCG emulation (no KVM needed, slow)."""
    machine: str = field(default="q35", metadata=rules(non_blank, _no_whitespace))
    firmware: Literal["efi", "bios"] = "efi"
    cpu_mode: str = field(default="", metadata=rules(empty_or(_cpu_mode)))
    """Empty: ``host-passthrough`` for kvm, ``maximum`` for qemu; else a mode or a CPU model."""
    disk_bus: Literal["scsi", "virtio", "sata"] = "scsi"
    network: str = field(default="default", metadata=rules(non_blank, _no_whitespace))
    """A libvirt network name; ``none``: no NIC at all."""
    kernel: str = field(default="", metadata=rules(empty_or(absolute_path)))
    """Direct kernel boot: the kernel QEMU loads instead of booting the disk."""
    initrd: str = field(default="", metadata=rules(empty_or(absolute_path)))
    cmdline: str = ""
    overlay_dir: str = field(default=LIBVIRT_DEFAULT_OVERLAY_DIR, metadata=rules(absolute_path))
    """Where each runner's overlay, console log and EFI variables live."""
    boot_timeout: float = field(default=180.0, metadata=rules(positive))
    """Seconds the guest agent may take to answer after the VM was created."""
    cpus: int = field(default=4, metadata=rules(positive))
    memory: int = field(default=8192, metadata=rules(positive))
    """MiB."""
    mount: LibvirtMount | None = None

    __schema_checks__: ClassVar[tuple[Check, ...]] = (_libvirt_checks,)

    @property
    def effective_cpu_mode(self) -> str:
        """``cpu_mode``, or its default for the domain type when unset."""
        if self.cpu_mode:
            return self.cpu_mode
        return "host-passthrough" if self.domain_type == "kvm" else "maximum"


@dataclass(frozen=True)
class TartMount:
    """A host directory shared into a Tart VM (``tart run --dir name:source``)."""

    name: str = field(
        metadata=rules(
            non_blank, without_chars(":/", 'it becomes a directory name after "--dir name:"')
        )
    )
    source: str = field(metadata=rules(absolute_path, _TART_DIR_SEPARATOR))
    read_only: bool = False


@dataclass(frozen=True)
class TartImage:
    """A runner in a Tart VM cloned from ``image`` (an OCI reference or a local VM name)."""

    image: str = field(metadata=rules(non_blank))
    runner_cmd: str = field(default="/actions-runner/run.sh", metadata=rules(non_blank))
    cpus: int = field(default=4, metadata=rules(positive))
    memory: int = field(default=8192, metadata=rules(positive))
    """MiB."""
    mounts: tuple[TartMount, ...] = field(default=(), metadata=rules(unique_by("name")))
    tart_path: str = field(default="tart", metadata=rules(non_blank))
    """The tart executable: a name looked up on PATH, or a path."""
    boot_timeout: float = field(default=180.0, metadata=rules(positive))
    """Seconds ``tart exec <vm> echo ok`` may take to start succeeding after ``tart run``."""


@dataclass(frozen=True)
class GitHubAppConfig:
    """A GitHub App installation to authenticate with, instead of a token (``app:``).

    The key file is read when the credentials are resolved, like a token file, not when the
    config is loaded (see :func:`resolve_runner_credentials`).
    """

    client_id: str | None = field(
        default=None, metadata=rules(non_blank, _no_whitespace, nullable=False)
    )
    """The App's client id (``Iv1.…``, ``Iv23…``); GitHub's recommended JWT issuer."""
    app_id: int | None = field(default=None, metadata=rules(positive, nullable=False))
    """The App's numeric id, accepted instead of ``client_id``."""
    installation_id: int = field(default=0, metadata=rules(positive, required=True))
    private_key_file: str = field(
        default="",
        metadata=rules(non_blank, no_tilde, required=True, relative_to_file=True),
    )
    """The App's PEM private key; relative paths are resolved against the config file."""

    __schema_checks__: ClassVar[tuple[Check, ...]] = (exactly_one_of("client_id", "app_id"),)

    @property
    def issuer(self) -> str:
        """The JWT issuer: the client id, or the App id."""
        return self.client_id or str(self.app_id or "")


def _one_credential(obj: RunnerConfig | Config) -> str | None:
    if obj.token_file and obj.app is not None:
        return (
            "token_file and app cannot both be set: use a token or a GitHub App, not both "
            f"(token_file {quote(obj.token_file, limit=None)})"
        )
    return None


Backend = DockerImage | LibvirtImage | TartImage
_BACKENDS: Final[tuple[ProviderType, ...]] = ("docker", "libvirt", "tart")


@dataclass(frozen=True)
class RunnerConfig:
    """One runner definition: a scale set and the environment each of its runners gets.

    ``url``, ``token_file``, ``app`` and ``ca_file`` are per-runner overrides; empty means "use
    the global ones". A runner sets at most one of ``token_file`` and ``app``.
    Every field has a default so code (and tests) can build partial instances;
    :func:`load_config` enforces the required keys.
    """

    name: str = field(default="", metadata=rules(from_key=True))
    """The scale set name: the key of this entry under ``runners``."""
    url: str = field(default="", metadata=rules(http_url))
    token_file: str = field(default="", metadata=rules(non_blank, no_tilde, relative_to_file=True))
    app: GitHubAppConfig | None = field(default=None, metadata=rules(nullable=False))
    """This runner's GitHub App, instead of any token (and of the global ``app``)."""
    ca_file: str = field(default="", metadata=_CA_FILE_RULES)
    """PEM CA bundle that verifies this runner's GitHub (instead of the system trust store)."""
    labels: tuple[str, ...] = field(
        default=(),
        metadata=rules(
            non_blank,
            unique(ignore_case=True, what="label"),
            each=(non_blank, _trimmed),
            required=True,
        ),
    )
    max_runners: int | None = field(default=None, metadata=rules(positive))
    """``None``: use the global default (the ``--max-runners`` flag)."""
    min_runners: int = field(default=0, metadata=rules(_not_negative))
    """Idle runners kept ready for jobs (a warm pool): GitHub's assigned jobs plus this many
    are wanted, within ``max_runners``."""
    max_lifetime: float | None = field(default=None, metadata=rules(positive, duration=True))
    """Seconds a runner may live (idle or busy) before it is stopped and deregistered: the
    reaper for wedged environments. ``None``: no limit."""
    idle_timeout: float | None = field(default=None, metadata=rules(positive, duration=True))
    """Seconds a runner may wait idle before it is replaced by a fresh one. ``None``: forever."""
    runner_group: str = field(default="default", metadata=rules(non_blank))
    docker: DockerImage | None = field(default=None, metadata=rules(nullable=False))
    libvirt: LibvirtImage | None = field(default=None, metadata=rules(nullable=False))
    tart: TartImage | None = field(default=None, metadata=rules(nullable=False))

    __schema_checks__: ClassVar[tuple[Check, ...]] = (
        exactly_one_of(*_BACKENDS),
        lambda runner: _pool_within_max(runner.min_runners, runner.max_runners),
        _one_credential,
    )

    @property
    def provider_type(self) -> ProviderType:
        """Which backend this runner uses.

        Raises :class:`ConfigError` when not exactly one backend is set, which only happens
        for instances built by hand (Go returns ``""`` there).
        """
        present = [kind for kind in _BACKENDS if getattr(self, kind) is not None]
        if len(present) != 1:
            found = " and ".join(present) or "none"
            raise ConfigError(
                f"runner {quote(self.name)}: must configure exactly one of docker, libvirt or tart "
                f"(found {found})"
            )
        return present[0]

    @property
    def backend(self) -> Backend:
        """The one backend section (``docker``, ``libvirt`` or ``tart``)."""
        backend: Backend = getattr(self, self.provider_type)
        return backend


@dataclass(frozen=True)
class Config:
    """The whole configuration file."""

    url: str = field(default="", metadata=rules(http_url))
    token_file: str = field(default="", metadata=rules(non_blank, no_tilde, relative_to_file=True))
    app: GitHubAppConfig | None = field(default=None, metadata=rules(nullable=False))
    """The GitHub App of runners without their own ``token_file`` or ``app``; it beats
    ``GITHUB_TOKEN`` and the systemd credential, not ``--token`` (see
    :func:`resolve_runner_credentials`)."""
    ca_file: str = field(default="", metadata=_CA_FILE_RULES)
    """PEM CA bundle that verifies GitHub's certificate instead of the system trust store (a
    GHES with a private CA); ``""``: the system trust store."""
    drain_timeout: float = field(
        default=DEFAULT_DRAIN_TIMEOUT, metadata=rules(_not_negative, duration=True)
    )
    """Seconds SIGTERM/SIGINT lets busy runners finish their jobs; 0 stops them at once."""
    listen: str = field(default="", metadata=rules(_host_port))
    """``HOST:PORT`` of the metrics and health HTTP server (``/metrics``, ``/healthz``,
    ``/readyz``, ``/status``); ``""``: off. The ``--listen`` flag overrides it."""
    state_dir: str = field(default="", metadata=rules(absolute_path))
    """Where the runner journal lives; ``""``: ``$OUTRUNNER_STATE_DIR``, ``$STATE_DIRECTORY``,
    ``/var/lib/outrunner`` (see :func:`outrunner.journal.resolve_state_dir`)."""
    runners: Mapping[str, RunnerConfig] = field(
        default_factory=FrozenMap[str, RunnerConfig],
        metadata=rules(
            unique_keys_ignoring_case(
                "scale set names",
                "GitHub and case-insensitive file systems would treat them as one",
            ),
            keys=(_scale_set_name,),
        ),
    )
    """Scale set name -> runner, in file order."""

    __schema_checks__: ClassVar[tuple[Check, ...]] = (_one_credential,)


# --------------------------------------------------------------------------------------------
# Errors


class ConfigError(ValueError):
    """The configuration or the credentials it points to are unusable.

    For :func:`load_config` errors, ``source`` is the config path and ``problems`` lists every
    problem found; the message has one line per problem.
    """

    _MAX_LISTED: ClassVar[int] = 25

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        problems: Sequence[ConfigProblem] = (),
    ) -> None:
        super().__init__(message)
        self.source = source
        self.problems = tuple(problems)

    @classmethod
    def from_problems(cls, source: str, problems: Sequence[ConfigProblem]) -> ConfigError:
        lines = [p.format(source) for p in problems[: cls._MAX_LISTED]]
        if len(problems) > cls._MAX_LISTED:
            lines.append(f"{source}: ... and {len(problems) - cls._MAX_LISTED} more problems")
        return cls("\n".join(lines), source=source, problems=problems)


# --------------------------------------------------------------------------------------------
# Loading

# A config file is a few KiB; anything past this is a wrong path (a disk image, /dev/zero).
_MAX_CONFIG_BYTES: Final = 1 << 20


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a config file.

    Relative ``token_file`` and ``ca_file`` paths are resolved against the directory of the config
    file; a ``ca_file`` must hold a PEM certificate.
    Raises :class:`ConfigError` for anything wrong with the file; nothing else escapes for bad
    input.
    """
    source = os.fspath(path)
    text = _read_config_text(source)
    raw = _parse_yaml(text, source)

    if raw is None:  # an empty file, or only comments
        raw = {}
    if not isinstance(raw, dict):
        raise _single_problem(
            source,
            f"top level must be a mapping with url, token_file and runners, got {describe(raw)}",
        )

    # Like docker compose: top-level "x-..." keys are ignored, as a home for YAML anchors.
    for key in [k for k in raw if isinstance(k, str) and k.startswith("x-")]:
        del raw[key]

    decoder = Decoder(base_dir=os.path.dirname(os.path.abspath(source)))
    runners = raw.get("runners")
    if runners is None or (isinstance(runners, dict) and not runners):
        raw.pop("runners", None)
        decoder.report("", f"no runners configured (uncomment the runners section in {source})")
    config = decoder.decode(raw, Config)
    if decoder.problems:
        problems = sorted(decoder.problems, key=lambda p: p.line or 0)
        raise ConfigError.from_problems(source, problems)
    assert isinstance(config, Config)
    return config


def _single_problem(source: str, message: str, line: int | None = None) -> ConfigError:
    return ConfigError.from_problems(source, [ConfigProblem("", message, line)])


def _read_config_text(source: str) -> str:
    try:
        with open(source, "rb") as f:
            data = f.read(_MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as exc:
        raise _single_problem(source, "config file not found") from exc
    except IsADirectoryError as exc:
        raise _single_problem(source, "is a directory, not a config file") from exc
    except PermissionError as exc:
        raise _single_problem(source, "cannot read config file: permission denied") from exc
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _single_problem(source, f"cannot read config file: {reason}") from exc
    if len(data) > _MAX_CONFIG_BYTES:
        raise _single_problem(
            source, f"file is larger than {_MAX_CONFIG_BYTES} bytes; is this really a config file?"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _single_problem(source, "file is not valid UTF-8", line) from exc


def _parse_yaml(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=YamlLoader)  # YamlLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem:
            if not exc.context.startswith("while") or exc.context_mark is None:
                what = f"{exc.context}, {exc.problem}"
            else:
                what += f" ({exc.context} started on line {exc.context_mark.line + 1})"
        line = mark.line + 1 if mark else None
        column = f" at column {mark.column + 1}" if mark else ""
        raise _single_problem(source, f"invalid YAML{column}: {what}", line) from exc
    except yaml.YAMLError as exc:
        raise _single_problem(source, f"invalid YAML: {exc}") from exc
    except RecursionError as exc:
        raise _single_problem(source, "invalid YAML: nested too deeply") from exc


# --------------------------------------------------------------------------------------------
# Credentials and URLs

_NO_TOKEN_MESSAGE: Final = (
    "no token provided (use --token, GITHUB_TOKEN env var, systemd-creds, or token_file in config)"
)
# Tokens are a few hundred bytes; refuse to slurp a wrongly configured large file.
_MAX_TOKEN_BYTES: Final = 64 * 1024
_TOKEN_BAD_CHARS: Final = re.compile(r"[\s\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ResolvedToken:
    """A token and the setting it came from (for messages; the token itself is never shown)."""

    value: str = field(repr=False)
    origin: str
    """``"--token"`` (or the flag's own label), ``"GITHUB_TOKEN"``, ``"systemd credential
    <path>"``, ``"token_file <path>"`` or ``"runners.<name>.token_file <path>"``."""


def resolve_token(flag_token: str | None, cfg: Config) -> str:
    """The GitHub token, from the first source that has one.

    1. ``flag_token`` (the ``--token`` flag), 2. the ``GITHUB_TOKEN`` environment variable,
    3. ``$CREDENTIALS_DIRECTORY/github-token`` (systemd credentials; skipped when that file does
    not exist), 4. ``cfg.token_file``. Values are stripped of surrounding whitespace. Raises
    :class:`ConfigError` (never containing the token) when there is no token, or when a token
    file is unreadable, empty or holds more than one word.
    """
    return _resolve_token(flag_token, cfg, "--token").value


def _resolve_token(flag_token: str | None, cfg: Config, flag_origin: str) -> ResolvedToken:
    if flag_token and flag_token.strip():
        return ResolvedToken(_checked_token(flag_token.strip(), flag_origin), flag_origin)
    env_token = os.environ.get("GITHUB_TOKEN", "").strip()
    if env_token:
        return ResolvedToken(_checked_token(env_token, "GITHUB_TOKEN"), "GITHUB_TOKEN")
    credentials_dir = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if credentials_dir:
        path = os.path.join(credentials_dir, "github-token")
        token = _read_token_file(path, "systemd credential", missing_ok=True)
        if token is not None:
            return ResolvedToken(token, f"systemd credential {path}")
    if cfg.token_file:
        token = _read_token_file(cfg.token_file, "token_file")
        assert token is not None
        return ResolvedToken(token, f"token_file {cfg.token_file}")
    raise ConfigError(_NO_TOKEN_MESSAGE)


def resolve_url(flag_url: str | None, cfg: Config) -> str:
    """The global GitHub URL: ``flag_url`` (``--url``), else ``cfg.url``."""
    if flag_url:
        return _checked_url(flag_url, "--url")
    if cfg.url:
        return _checked_url(cfg.url, "url")
    raise ConfigError("no URL provided (use --url flag or url in config)")


def resolve_runner_url(flag_url: str | None, cfg: Config, runner: RunnerConfig) -> str:
    """A runner's URL: its own ``url`` (which beats ``--url``), else :func:`resolve_url`."""
    if runner.url:
        return _checked_url(runner.url, f"{_runner_key(runner)}.url")
    try:
        return resolve_url(flag_url, cfg)
    except ConfigError as exc:
        if not runner.name:
            raise
        raise ConfigError(f"runner {quote(runner.name)}: {exc}") from exc


def resolve_runner_token(flag_token: str | None, cfg: Config, runner: RunnerConfig) -> str:
    """A runner's token: read from its own ``token_file`` if set, else :func:`resolve_token`.

    A runner's ``token_file`` beats even ``--token``: it exists to give that runner a
    different identity.
    """
    return resolve_runner_token_source(flag_token, cfg, runner).value


def resolve_runner_token_source(
    flag_token: str | None, cfg: Config, runner: RunnerConfig, *, flag_origin: str = "--token"
) -> ResolvedToken:
    """:func:`resolve_runner_token` with where the token came from; ``flag_origin`` names the
    flag that gave ``flag_token`` (``--token-file <path>`` when the command read it from one)."""
    if runner.token_file:
        origin = f"{_runner_key(runner)}.token_file"
        token = _read_token_file(runner.token_file, origin)
        assert token is not None
        return ResolvedToken(token, f"{origin} {runner.token_file}")
    return _resolve_token(flag_token, cfg, flag_origin)


@dataclass(frozen=True)
class ResolvedApp:
    """A GitHub App installation to authenticate with: its ids, its private key (read and
    parsed), and the setting it came from (for messages; the key itself is never shown)."""

    client_id: str
    """``""`` when the App is named by ``app_id``."""
    app_id: int | None
    installation_id: int
    private_key: str = field(repr=False)
    """The PEM text of the key file."""
    key_file: str
    origin: str
    """``"GitHub App Iv1.abc installation 42 (app, key /etc/outrunner/app.pem)"``; the setting is
    ``app`` or ``runners.<name>.app``."""
    ignored: tuple[str, ...] = ()
    """Token sources that were set but lost to a top-level ``app`` (``"GITHUB_TOKEN"``,
    ``"systemd credential <path>"``), so the caller can warn about them."""

    @property
    def issuer(self) -> str:
        """The JWT issuer: the client id, or the App id."""
        return self.client_id or str(self.app_id or "")

    def credentials(
        self,
        *,
        register_secret: Callable[[str], None] | None = None,
        unregister_secret: Callable[[str], None] | None = None,
    ) -> GitHubApp:
        """The scale set client's credentials for this App (see :class:`GitHubApp` for the
        secret hooks, e.g. :func:`outrunner.log.register_secret`)."""
        return GitHubApp(
            self.client_id or self.app_id or 0,
            self.installation_id,
            self.private_key,
            register_secret=register_secret,
            unregister_secret=unregister_secret,
        )


def resolve_runner_credentials(
    flag_token: str | None,
    cfg: Config,
    runner: RunnerConfig,
    *,
    url: str,
    flag_origin: str = "--token",
) -> ResolvedToken | ResolvedApp:
    """What a runner authenticates with: a token or a GitHub App, from the first source set.

    1. the runner's ``app`` or ``token_file`` (at most one is set; each beats even ``--token``:
       they exist to give that runner a different identity),
    2. ``flag_token`` (``--token`` / ``--token-file``; ``flag_origin`` names it),
    3. the top-level ``app``,
    4. ``GITHUB_TOKEN``, 5. ``$CREDENTIALS_DIRECTORY/github-token``, 6. the top-level
       ``token_file`` (as :func:`resolve_token`).

    A top-level ``app`` beats the environment because it is written in the config on purpose,
    while ``GITHUB_TOKEN`` is often inherited from a shell or an old unit file: a leftover
    personal token must not quietly replace the App (:attr:`ResolvedApp.ignored` lists such
    leftovers). The command line still wins, as a deliberate override.

    ``url`` is the runner's resolved URL (:func:`resolve_runner_url`): an App cannot register
    enterprise runners, so an App for an enterprise URL is a :class:`ConfigError`. The App's key
    file is read and parsed here (a :class:`ConfigError` naming the setting and the file when it
    is missing, unreadable, not an unencrypted PEM RSA private key, or PyJWT is not installed);
    messages never contain key material.
    """
    # Checked again for configs built in code, which load_config did not see.
    for obj, key in ((runner, _runner_key(runner)), (cfg, "top level")):
        problem = _one_credential(obj)
        if problem is not None:
            raise ConfigError(f"{key}: {problem}")
    resolved: ResolvedToken | ResolvedApp
    if runner.app is not None:
        resolved = _resolve_app(runner.app, f"{_runner_key(runner)}.app")
    elif runner.token_file or (flag_token and flag_token.strip()) or cfg.app is None:
        return resolve_runner_token_source(flag_token, cfg, runner, flag_origin=flag_origin)
    else:
        resolved = _resolve_app(cfg.app, "app", ignored=_shadowed_token_sources())
    _check_app_scope(resolved, url, runner)
    return resolved


def _resolve_app(
    app: GitHubAppConfig, origin: str, *, ignored: tuple[str, ...] = ()
) -> ResolvedApp:
    path = app.private_key_file
    where = f"{origin}.private_key_file {quote(path, limit=None)}"
    pem = _read_private_key_file(path, where)
    try:
        import jwt  # noqa: F401 - GitHubApp needs it: say so now, not at start-up

        load_app_private_key(pem)
    except ImportError as exc:
        raise ConfigError(
            f"{origin}: GitHub App authentication needs PyJWT with its crypto extra "
            f"({APP_EXTRA_HINT})"
        ) from exc
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return ResolvedApp(
        client_id=app.client_id or "",
        app_id=app.app_id,
        installation_id=app.installation_id,
        private_key=pem,
        key_file=path,
        origin=(
            f"GitHub App {app.issuer} installation {app.installation_id} ({origin}, key {path})"
        ),
        ignored=ignored,
    )


def _shadowed_token_sources() -> tuple[str, ...]:
    found = []
    if os.environ.get("GITHUB_TOKEN", "").strip():
        found.append("GITHUB_TOKEN")
    credentials_dir = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if credentials_dir:
        path = os.path.join(credentials_dir, "github-token")
        if os.path.exists(path):
            found.append(f"systemd credential {path}")
    return tuple(found)


def _check_app_scope(resolved: ResolvedApp, url: str, runner: RunnerConfig) -> None:
    try:
        scope = parse_config_url(url).scope if url else None
    except InvalidConfigURLError:
        return  # reported where the URL is used
    if scope is Scope.ENTERPRISE:
        name = f"runner {quote(runner.name)}: " if runner.name else ""
        raise ConfigError(
            f"{name}{resolved.origin} cannot register runners for the enterprise URL {url}: "
            "GitHub Apps are installed on organizations and repositories, not enterprises; use "
            "a personal access token (classic) with the manage_runners:enterprise scope, or an "
            "organization URL"
        )


# A PEM RSA key is 1.7 KiB (2048 bits) to 3.3 KiB (4096); anything past this is a wrong path.
_MAX_KEY_BYTES: Final = 64 * 1024


def _read_private_key_file(path: str, where: str) -> str:
    try:
        # Reading a FIFO or /dev/zero would never end.
        regular = stat.S_ISREG(os.stat(path).st_mode)
        data = b""
        if regular:
            with open(path, "rb") as f:
                data = f.read(_MAX_KEY_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot read {where}: file not found") from exc
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read {where}: {reason}") from exc
    if not regular:
        raise ConfigError(f"cannot read {where}: not a regular file")
    if len(data) > _MAX_KEY_BYTES:
        raise ConfigError(f"{where} is larger than {_MAX_KEY_BYTES} bytes; not a private key")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        # from None: the decode error carries the file's bytes.
        raise ConfigError(
            f"{where}: not a PEM file (it is binary; DER keys are not supported)"
        ) from None


def read_token_file(path: str, origin: str) -> str:
    """Read a token file as every token setting does (one word, stripped, at most 64 KiB);
    ``origin`` names the setting in errors, e.g. ``"--token-file"``. Raises
    :class:`ConfigError`, never containing the token."""
    token = _read_token_file(path, origin)
    assert token is not None
    return token


def resolve_runner_ca_file(cfg: Config, runner: RunnerConfig) -> str:
    """The CA file a runner's client trusts: its own ``ca_file``, else the global one; ``""``
    means the system trust store.

    Raises :class:`ConfigError` when the file cannot be loaded as a PEM CA bundle (checked again
    here for configs built in code, which :func:`load_config` did not see).
    """
    if runner.ca_file:
        path, origin = runner.ca_file, f"{_runner_key(runner)}.ca_file"
    elif cfg.ca_file:
        path, origin = cfg.ca_file, "ca_file"
    else:
        return ""
    problem = _ca_file(path)
    if problem is not None:
        raise ConfigError(f"{origin}: {problem}")
    return path


def _runner_key(runner: RunnerConfig) -> str:
    return f"runners.{runner.name}" if runner.name else "runner"


def _checked_url(url: str, origin: str) -> str:
    problem = http_url(url)
    if problem is not None:
        raise ConfigError(f"{origin}: {problem}")
    return url


def _checked_token(token: str, origin: str) -> str:
    if _TOKEN_BAD_CHARS.search(token):
        raise ConfigError(
            f"token from {origin} contains whitespace or control characters inside it "
            "(expected a single token on one line)"
        )
    return token


def _read_token_file(path: str, origin: str, *, missing_ok: bool = False) -> str | None:
    where = f"{origin} {quote(path, limit=None)}"
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_TOKEN_BYTES + 1)
    except FileNotFoundError as exc:
        if missing_ok:
            return None
        raise ConfigError(f"cannot read {where}: file not found") from exc
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read {where}: {reason}") from exc
    if len(data) > _MAX_TOKEN_BYTES:
        raise ConfigError(f"{where} is larger than {_MAX_TOKEN_BYTES} bytes; not a token file")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        # from None: the decode error carries the file's bytes, i.e. the token.
        raise ConfigError(f"{where} is not valid UTF-8") from None
    if not token:
        raise ConfigError(f"{where} is empty")
    return _checked_token(token, where)
