"""Tests for outrunner.config: every upstream config_test.go case, a malformed-config corpus,
the upstream example files, credential resolution and the declarative schema machinery."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import random
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from outrunner._schema import (
    INVALID,
    Decoder,
    FrozenMap,
    check_schema,
    positive,
    rules,
)
from outrunner.config import (
    Config,
    ConfigError,
    DockerImage,
    DockerMount,
    LibvirtImage,
    LibvirtMount,
    RunnerConfig,
    TartImage,
    TartMount,
    load_config,
    resolve_runner_ca_file,
    resolve_runner_token,
    resolve_runner_url,
    resolve_token,
    resolve_url,
)
from tests.scaleset.scripted_server import self_signed_certificate


def write_config(directory: Path, content: str, name: str = "config.yml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(content), encoding="utf-8")
    return path


def load(directory: Path, content: str) -> Config:
    return load_config(write_config(directory, content))


def load_error(directory: Path, content: str) -> ConfigError:
    """Load a bad config; fail unless ConfigError (and nothing else) comes out."""
    path = write_config(directory, content)
    try:
        load_config(path)
    except ConfigError as exc:
        return exc
    except Exception as exc:  # the point: no other type may escape
        pytest.fail(f"load_config raised {type(exc).__name__} instead of ConfigError: {exc}")
    pytest.fail("load_config accepted a bad config")


@pytest.fixture
def no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


# ============================================================================================
# Ports of upstream config_test.go


def test_load_config(tmp_path: Path) -> None:
    """Go: TestLoadConfig"""
    cfg = load(
        tmp_path,
        """\
        url: https://github.com/org/repo
        runners:
          linux:
            labels: [self-hosted, linux]
            docker:
              image: runner:latest
          windows:
            labels: [self-hosted, windows]
            libvirt:
              path: /tmp/win.qcow2
        """,
    )
    assert len(cfg.runners) == 2
    linux = cfg.runners["linux"]
    assert linux.docker is not None
    assert linux.labels == ("self-hosted", "linux")
    windows = cfg.runners["windows"]
    assert windows.libvirt is not None
    assert windows.libvirt.cpus == 4
    assert windows.libvirt.memory == 8192


def test_load_config_missing_labels(tmp_path: Path) -> None:
    """Go: TestLoadConfigMissingLabels"""
    err = load_error(
        tmp_path,
        """\
        runners:
          linux:
            docker:
              image: runner:latest
        """,
    )
    assert "runners.linux.labels: missing required key" in str(err)


def test_load_config_missing_provider(tmp_path: Path) -> None:
    """Go: TestLoadConfigMissingProvider"""
    err = load_error(
        tmp_path,
        """\
        runners:
          linux:
            labels: [linux]
        """,
    )
    assert "runners.linux: must configure exactly one of docker, libvirt or tart" in str(err)


def test_load_config_no_runners(tmp_path: Path) -> None:
    """Go: TestLoadConfigNoRunners"""
    path = write_config(tmp_path, "runners: {}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"no runners configured (uncomment the runners section in {path})" in str(info.value)


def test_load_config_defaults(tmp_path: Path) -> None:
    """Go: TestLoadConfigDefaults"""
    cfg = load(
        tmp_path,
        """\
        url: https://github.com/org/repo
        runners:
          tart-runner:
            labels: [macos]
            tart:
              image: base:latest
        """,
    )
    runner = cfg.runners["tart-runner"]
    assert runner.tart == TartImage(image="base:latest")
    assert runner.tart.cpus == 4
    assert runner.tart.memory == 8192
    assert runner.tart.runner_cmd == "/actions-runner/run.sh"
    assert runner.tart.tart_path == "tart"
    assert runner.tart.boot_timeout == 180.0
    assert runner.max_runners is None
    assert runner.runner_group == "default"
    assert runner.url == ""
    assert runner.token_file == ""


def test_load_config_custom_values(tmp_path: Path) -> None:
    """Go: TestLoadConfigCustomValues"""
    cfg = load(
        tmp_path,
        """\
        url: https://github.com/org/repo
        runners:
          beefy:
            labels: [linux]
            libvirt:
              path: /images/linux.qcow2
              cpus: 16
              memory: 32768
        """,
    )
    libvirt = cfg.runners["beefy"].libvirt
    assert libvirt is not None
    assert (libvirt.cpus, libvirt.memory) == (16, 32768)


def test_load_config_max_runners(tmp_path: Path) -> None:
    """Go: TestLoadConfigMaxRunners"""
    cfg = load(
        tmp_path,
        """\
        url: https://github.com/org/repo
        runners:
          linux:
            labels: [linux]
            max_runners: 8
            docker:
              image: runner:latest
        """,
    )
    assert cfg.runners["linux"].max_runners == 8


def test_load_config_runner_cmd(tmp_path: Path) -> None:
    """Go: TestLoadConfigRunnerCmd"""
    cfg = load(
        tmp_path,
        """\
        url: https://github.com/org/repo
        runners:
          linux:
            labels: [linux]
            docker:
              image: runner:latest
              runner_cmd: /custom/run.sh
          windows:
            labels: [windows]
            libvirt:
              path: /images/win.qcow2
              runner_cmd: 'C:\\runner\\run.cmd'
        """,
    )
    docker = cfg.runners["linux"].docker
    libvirt = cfg.runners["windows"].libvirt
    assert docker is not None
    assert libvirt is not None
    assert docker.runner_cmd == "/custom/run.sh"
    assert libvirt.runner_cmd == "C:\\runner\\run.cmd"


def test_load_config_mounts(tmp_path: Path) -> None:
    """Go: TestLoadConfigMounts"""
    cfg = load(
        tmp_path,
        """\
        url: https://github.com/org/repo
        runners:
          docker-runner:
            labels: [linux]
            docker:
              image: runner:latest
              mounts:
                - source: /var/cache/vcpkg
                  target: /opt/vcpkg-cache
                - source: /var/cache/cargo
                  target: /opt/cargo-cache
                  read_only: true
          tart-runner:
            labels: [macos]
            tart:
              image: base:latest
              mounts:
                - name: vcpkg
                  source: /var/cache/vcpkg
                - name: cargo
                  source: /var/cache/cargo
                  read_only: true
          windows-runner:
            labels: [windows]
            libvirt:
              path: /images/win.qcow2
              mount:
                source: /var/cache/vcpkg
        """,
    )
    docker = cfg.runners["docker-runner"].docker
    assert docker is not None
    assert docker.mounts == (
        DockerMount("/var/cache/vcpkg", "/opt/vcpkg-cache", read_only=False),
        DockerMount("/var/cache/cargo", "/opt/cargo-cache", read_only=True),
    )
    tart = cfg.runners["tart-runner"].tart
    assert tart is not None
    assert tart.mounts == (
        TartMount("vcpkg", "/var/cache/vcpkg", read_only=False),
        TartMount("cargo", "/var/cache/cargo", read_only=True),
    )
    libvirt = cfg.runners["windows-runner"].libvirt
    assert libvirt is not None
    assert libvirt.mount == LibvirtMount("/var/cache/vcpkg")


def test_load_config_no_mounts(tmp_path: Path) -> None:
    """Go: TestLoadConfigNoMounts"""
    cfg = load(
        tmp_path,
        """\
        url: https://github.com/org/repo
        runners:
          linux:
            labels: [linux]
            docker:
              image: runner:latest
        """,
    )
    docker = cfg.runners["linux"].docker
    assert docker is not None
    assert docker.mounts == ()


def test_load_config_invalid_yaml(tmp_path: Path) -> None:
    """Go: TestLoadConfigInvalidYAML"""
    err = load_error(tmp_path, "{{invalid yaml")
    assert "config.yml:1: invalid YAML" in str(err)


def test_load_config_file_not_found() -> None:
    """Go: TestLoadConfigFileNotFound"""
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config("/nonexistent/path/config.yml")
    assert "/nonexistent/path/config.yml" in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_load_config_url_and_token_file(tmp_path: Path) -> None:
    """Go: TestLoadConfigURLAndTokenFile"""
    cfg = load(
        tmp_path,
        """\
        url: https://github.com/myorg
        token_file: /etc/outrunner/token
        runners:
          linux:
            labels: [linux]
            docker:
              image: runner:latest
        """,
    )
    assert cfg.url == "https://github.com/myorg"
    assert cfg.token_file == "/etc/outrunner/token"


class TestResolveToken:
    """Go: TestResolveToken (each subtest is a method)."""

    def test_flag_takes_precedence(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Go: TestResolveToken/flag_takes_precedence"""
        monkeypatch.setenv("GITHUB_TOKEN", "env-token")
        assert resolve_token("flag-token", Config(token_file="/nonexistent")) == "flag-token"

    def test_env_var(self, monkeypatch: pytest.MonkeyPatch, no_token_env: None) -> None:
        """Go: TestResolveToken/env_var"""
        monkeypatch.setenv("GITHUB_TOKEN", "env-token")
        assert resolve_token("", Config()) == "env-token"

    def test_credentials_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_token_env: None
    ) -> None:
        """Go: TestResolveToken/credentials_directory"""
        (tmp_path / "github-token").write_text("  cred-token\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
        monkeypatch.setenv("GITHUB_TOKEN", "")
        assert resolve_token("", Config()) == "cred-token"

    def test_token_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Go: TestResolveToken/token_file"""
        token_path = tmp_path / "token"
        token_path.write_text("file-token\n")
        monkeypatch.setenv("GITHUB_TOKEN", "")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", "")
        assert resolve_token("", Config(token_file=str(token_path))) == "file-token"

    def test_nothing_configured(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Go: TestResolveToken/nothing_configured"""
        monkeypatch.setenv("GITHUB_TOKEN", "")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", "")
        with pytest.raises(ConfigError, match="no token provided"):
            resolve_token("", Config())


class TestResolveURL:
    """Go: TestResolveURL"""

    def test_flag_takes_precedence(self) -> None:
        """Go: TestResolveURL/flag_takes_precedence"""
        assert resolve_url("https://flag.com", Config(url="https://config.com")) == (
            "https://flag.com"
        )

    def test_config_fallback(self) -> None:
        """Go: TestResolveURL/config_fallback"""
        assert resolve_url("", Config(url="https://config.com")) == "https://config.com"

    def test_nothing_configured(self) -> None:
        """Go: TestResolveURL/nothing_configured"""
        with pytest.raises(ConfigError, match="no URL provided"):
            resolve_url("", Config())


def test_load_config_per_runner_url(tmp_path: Path) -> None:
    """Go: TestLoadConfigPerRunnerURL"""
    cfg = load(
        tmp_path,
        """\
        url: https://github.com/org/repo-a
        runners:
          linux:
            labels: [linux]
            docker:
              image: runner:latest
          windows:
            url: https://github.com/org/repo-b
            token_file: /tmp/token-b
            labels: [windows]
            libvirt:
              path: /tmp/win.qcow2
        """,
    )
    assert cfg.runners["linux"].url == ""
    assert cfg.runners["windows"].url == "https://github.com/org/repo-b"
    assert cfg.runners["windows"].token_file == "/tmp/token-b"


def test_load_config_no_url_anywhere(tmp_path: Path) -> None:
    """Go: TestLoadConfigNoURLAnywhere: loading succeeds, resolving fails."""
    cfg = load(
        tmp_path,
        """\
        runners:
          linux:
            labels: [linux]
            docker:
              image: runner:latest
        """,
    )
    with pytest.raises(ConfigError, match="no URL provided") as info:
        resolve_runner_url("", cfg, cfg.runners["linux"])
    assert 'runner "linux"' in str(info.value)


def test_load_config_per_runner_url_without_global(tmp_path: Path) -> None:
    """Go: TestLoadConfigPerRunnerURLWithoutGlobal"""
    cfg = load(
        tmp_path,
        """\
        runners:
          linux:
            url: https://github.com/org/repo-a
            labels: [linux]
            docker:
              image: runner:latest
          windows:
            url: https://github.com/org/repo-b
            labels: [windows]
            libvirt:
              path: /tmp/win.qcow2
        """,
    )
    assert cfg.url == ""
    assert cfg.runners["linux"].url == "https://github.com/org/repo-a"


class TestResolveRunnerURL:
    """Go: TestResolveRunnerURL"""

    cfg = Config(url="https://github.com/global")

    def test_runner_override(self) -> None:
        """Go: TestResolveRunnerURL/runner_override"""
        runner = RunnerConfig(url="https://github.com/override")
        assert resolve_runner_url("", self.cfg, runner) == "https://github.com/override"

    def test_falls_back_to_global(self) -> None:
        """Go: TestResolveRunnerURL/falls_back_to_global"""
        assert resolve_runner_url("", self.cfg, RunnerConfig()) == "https://github.com/global"

    def test_runner_url_beats_flag(self) -> None:
        """Go: TestResolveRunnerURL/runner_URL_beats_flag"""
        runner = RunnerConfig(url="https://github.com/override")
        url = resolve_runner_url("https://github.com/flag", self.cfg, runner)
        assert url == "https://github.com/override"


class TestResolveRunnerToken:
    """Go: TestResolveRunnerToken"""

    def test_runner_token_file_override(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Go: TestResolveRunnerToken/runner_token_file_override"""
        token_path = tmp_path / "token"
        token_path.write_text("runner-token\n")
        monkeypatch.setenv("GITHUB_TOKEN", "env-token")
        runner = RunnerConfig(token_file=str(token_path))
        assert resolve_runner_token("flag-token", Config(), runner) == "runner-token"

    def test_falls_back_to_global_chain(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Go: TestResolveRunnerToken/falls_back_to_global_chain"""
        monkeypatch.setenv("GITHUB_TOKEN", "env-token")
        assert resolve_runner_token("", Config(), RunnerConfig()) == "env-token"


@pytest.mark.parametrize(
    ("runner", "want"),
    [
        pytest.param(RunnerConfig(docker=DockerImage(image="x")), "docker", id="docker"),
        pytest.param(RunnerConfig(libvirt=LibvirtImage(path="x")), "libvirt", id="libvirt"),
        pytest.param(RunnerConfig(tart=TartImage(image="x")), "tart", id="tart"),
    ],
)
def test_provider_type(runner: RunnerConfig, want: str) -> None:
    """Go: TestProviderType (docker, libvirt, tart)"""
    assert runner.provider_type == want
    assert runner.backend is getattr(runner, want)


def test_provider_type_empty() -> None:
    """Go: TestProviderType/empty. Go returns ""; the Literal type has no "", so we raise."""
    with pytest.raises(ConfigError, match="found none"):
        _ = RunnerConfig().provider_type
    with pytest.raises(ConfigError, match="found none"):
        _ = RunnerConfig().backend
    both = RunnerConfig(docker=DockerImage("x"), tart=TartImage("y"))
    with pytest.raises(ConfigError, match="found docker and tart"):
        _ = both.provider_type


# ============================================================================================
# Malformed-config corpus

BASE = """\
url: https://github.com/org/repo
runners:
  linux:
    labels: [self-hosted, linux]
    docker:
      image: runner:latest
"""
BASE_RUNNERS = BASE.split("\n", 1)[1]  # BASE without its url line


def runner(body: str, name: str = "linux") -> str:
    """A config with one runner whose body is ``body`` (dedented, no backend added)."""
    indented = textwrap.indent(textwrap.dedent(body), "    ")
    return f"url: https://github.com/org/repo\nrunners:\n  {name}:\n{indented}"


def docker(body: str) -> str:
    """A config with one docker runner whose docker section is ``body``."""
    indented = textwrap.indent(textwrap.dedent(body), "      ")
    return f"runners:\n  linux:\n    labels: [linux]\n    docker:\n{indented}"


def libvirt(body: str) -> str:
    indented = textwrap.indent(textwrap.dedent(body), "      ")
    return f"runners:\n  win:\n    labels: [windows]\n    libvirt:\n{indented}"


def tart(body: str) -> str:
    indented = textwrap.indent(textwrap.dedent(body), "      ")
    return f"runners:\n  mac:\n    labels: [macos]\n    tart:\n{indented}"


# (config text, key path of the problem, fragments the message must contain)
CORPUS = [
    # -- top level ----------------------------------------------------------------------------
    pytest.param("- a\n- b\n", "", ["top level must be a mapping"], id="top-level-list"),
    pytest.param("just a string\n", "", ["top level must be a mapping"], id="top-level-str"),
    pytest.param(
        "url: 5\n" + BASE_RUNNERS, "url", ["expected a string, got integer 5"], id="url-int"
    ),
    pytest.param(
        "url: ftp://github.com/org\n" + BASE_RUNNERS,
        "url",
        ["must be an http(s) URL", '"ftp://github.com/org"'],
        id="url-ftp",
    ),
    pytest.param(
        "url: github.com/org/repo\n" + BASE_RUNNERS,
        "url",
        ['"github.com/org/repo"'],
        id="url-no-scheme",
    ),
    pytest.param("url: 'https://'\n" + BASE_RUNNERS, "url", ['"https://"'], id="url-no-host"),
    pytest.param(
        "url: https://github.com/org repo\n" + BASE_RUNNERS,
        "url",
        ["without spaces"],
        id="url-space",
    ),
    pytest.param("url:\n" + BASE_RUNNERS, "url", ["got null"], id="url-null"),
    pytest.param(
        BASE + "token_file: [a]\n", "token_file", ["expected a string, got a list"], id="token-list"
    ),
    pytest.param(BASE + "token_file: ''\n", "token_file", ["must not be empty"], id="token-empty"),
    pytest.param(
        BASE + "token_file: 42\n",
        "token_file",
        ["expected a string, got integer 42"],
        id="token-int",
    ),
    pytest.param(
        BASE + "token_file: ~/token\n",
        "token_file",
        ['"~/token"', "not expanded"],
        id="token-tilde",
    ),
    pytest.param(
        BASE + "runner:\n  x: 1\n",
        "runner",
        ['unknown key (did you mean "runners"?)'],
        id="typo-top",
    ),
    pytest.param(
        "runners: [a]\n", "runners", ["expected a mapping, got a list"], id="runners-list"
    ),
    pytest.param(
        "runners:\n  linux: 5\n",
        "runners.linux",
        ["expected a mapping, got integer 5"],
        id="runner-int",
    ),
    pytest.param("runners:\n  linux:\n", "runners.linux", ["got null"], id="runner-null"),
    # -- scale set names ----------------------------------------------------------------------
    pytest.param(
        runner("labels: [a]\ndocker: {image: x}\n", name='"my runner"'),
        'runners."my runner"',
        ["scale set name", '"my runner"'],
        id="name-space",
    ),
    pytest.param(
        runner("labels: [a]\ndocker: {image: x}\n", name="-linux"),
        "runners.-linux",
        ["must start with a letter or digit", '"-linux"'],
        id="name-leading-dash",
    ),
    pytest.param(
        runner("labels: [a]\ndocker: {image: x}\n", name="a/b"),
        'runners."a/b"',
        ['"a/b"'],
        id="name-slash",
    ),
    pytest.param(
        runner("labels: [a]\ndocker: {image: x}\n", name="linüx"),
        'runners."linüx"',
        ['"linüx"'],
        id="name-unicode",
    ),
    pytest.param(
        runner("labels: [a]\ndocker: {image: x}\n", name="a" * 56),
        "runners." + "a" * 56,
        ["at most 55 characters", "got 56"],
        id="name-too-long",
    ),
    pytest.param(
        runner("labels: [a]\ndocker: {image: x}\n", name="123"),
        "runners",
        ["keys must be strings, got integer 123"],
        id="name-int",
    ),
    pytest.param(
        BASE + "  Linux:\n    labels: [b]\n    docker: {image: x}\n",
        "runners",
        ['"linux" and "Linux" differ only in case'],
        id="names-differ-in-case",
    ),
    # -- runner keys --------------------------------------------------------------------------
    pytest.param(
        runner("docker: {image: x}\n"),
        "runners.linux.labels",
        ["missing required key"],
        id="labels-missing",
    ),
    pytest.param(
        runner("labels: []\ndocker: {image: x}\n"),
        "runners.linux.labels",
        ["must not be empty"],
        id="labels-empty",
    ),
    pytest.param(
        runner("labels: linux\ndocker: {image: x}\n"),
        "runners.linux.labels",
        ['expected a list, got string "linux" (write [linux])'],
        id="labels-scalar",
    ),
    pytest.param(
        runner("labels: [a, b, a]\ndocker: {image: x}\n"),
        "runners.linux.labels",
        ['duplicate label "a" at [0] and [2]'],
        id="labels-duplicate",
    ),
    pytest.param(
        runner("labels: [Linux, linux]\ndocker: {image: x}\n"),
        "runners.linux.labels",
        ['duplicate label "linux"', "ignoring case"],
        id="labels-duplicate-case",
    ),
    pytest.param(
        runner("labels: [linux, 5]\ndocker: {image: x}\n"),
        "runners.linux.labels[1]",
        ["expected a string, got integer 5"],
        id="label-int",
    ),
    pytest.param(
        runner("labels: [linux, '']\ndocker: {image: x}\n"),
        "runners.linux.labels[1]",
        ["must not be empty"],
        id="label-empty",
    ),
    pytest.param(
        runner("labels: [linux, ~]\ndocker: {image: x}\n"),
        "runners.linux.labels[1]",
        ["got null"],
        id="label-null",
    ),
    pytest.param(
        runner("labels: [' linux']\ndocker: {image: x}\n"),
        "runners.linux.labels[0]",
        ["whitespace", '" linux"'],
        id="label-whitespace",
    ),
    pytest.param(
        runner("labels: [a]\nmax_runners: '2'\ndocker: {image: x}\n"),
        "runners.linux.max_runners",
        ['expected an integer, got string "2" (remove the quotes)'],
        id="max-runners-str",
    ),
    pytest.param(
        runner("labels: [a]\nmax_runners: true\ndocker: {image: x}\n"),
        "runners.linux.max_runners",
        ["expected an integer, got bool true"],
        id="max-runners-bool",
    ),
    pytest.param(
        runner("labels: [a]\nmax_runners: 0\ndocker: {image: x}\n"),
        "runners.linux.max_runners",
        ["must be greater than 0, got 0"],
        id="max-runners-zero",
    ),
    pytest.param(
        runner("labels: [a]\nmax_runners: -3\ndocker: {image: x}\n"),
        "runners.linux.max_runners",
        ["got -3"],
        id="max-runners-negative",
    ),
    pytest.param(
        runner("labels: [a]\nmax_runners: 1.5\ndocker: {image: x}\n"),
        "runners.linux.max_runners",
        ["expected an integer, got number 1.5"],
        id="max-runners-float",
    ),
    pytest.param(
        runner("labels: [a]\nrunner_group: ''\ndocker: {image: x}\n"),
        "runners.linux.runner_group",
        ["must not be empty"],
        id="runner-group-empty",
    ),
    pytest.param(
        runner("labels: [a]\nrunner_group: 7\ndocker: {image: x}\n"),
        "runners.linux.runner_group",
        ["expected a string, got integer 7 (quote it"],
        id="runner-group-int",
    ),
    pytest.param(
        runner("labels: [a]\nurl: not a url\ndocker: {image: x}\n"),
        "runners.linux.url",
        ['"not a url"'],
        id="runner-url-bad",
    ),
    pytest.param(
        runner("labels: [a]\ntoken_file: {a: b}\ndocker: {image: x}\n"),
        "runners.linux.token_file",
        ["expected a string, got a mapping"],
        id="runner-token-file-mapping",
    ),
    pytest.param(
        runner("lables: [a]\nlabels: [a]\ndocker: {image: x}\n"),
        "runners.linux.lables",
        ['unknown key (did you mean "labels"?)'],
        id="runner-key-typo",
    ),
    pytest.param(
        runner("labels: [a]\nimage: x\ndocker: {image: x}\n"),
        "runners.linux.image",
        ["unknown key (it belongs under docker or tart)"],
        id="runner-key-misplaced",
    ),
    # -- backends -----------------------------------------------------------------------------
    pytest.param(
        runner("labels: [a]\n"),
        "runners.linux",
        ["exactly one of docker, libvirt or tart (found none)"],
        id="backend-none",
    ),
    pytest.param(
        runner("labels: [a]\ndocker: {image: x}\ntart: {image: y}\n"),
        "runners.linux",
        ["found docker and tart"],
        id="backend-two",
    ),
    pytest.param(
        runner("labels: [a]\ndocker:\n"),
        "runners.linux.docker",
        ["expected a mapping, got null"],
        id="backend-null",
    ),
    pytest.param(
        runner("labels: [a]\ndocker: runner:latest\n"),
        "runners.linux.docker",
        ['expected a mapping, got string "runner:latest"'],
        id="backend-scalar",
    ),
    # -- docker -------------------------------------------------------------------------------
    pytest.param(
        docker("runner_cmd: ./run.sh\n"),
        "runners.linux.docker.image",
        ["missing required key"],
        id="docker-image-missing",
    ),
    pytest.param(
        docker("image: ''\n"),
        "runners.linux.docker.image",
        ["must not be empty"],
        id="docker-image-empty",
    ),
    pytest.param(
        docker("image: 5\n"), "runners.linux.docker.image", ["got integer 5"], id="docker-image-int"
    ),
    pytest.param(
        docker("imgae: x\nimage: x\n"),
        "runners.linux.docker.imgae",
        ['did you mean "image"?'],
        id="docker-key-typo",
    ),
    pytest.param(
        docker("image: x\nrunner_cmd: ''\n"),
        "runners.linux.docker.runner_cmd",
        ["must not be empty"],
        id="docker-runner-cmd-empty",
    ),
    pytest.param(
        docker("image: x\nmounts: /data\n"),
        "runners.linux.docker.mounts",
        ['expected a list, got string "/data"'],
        id="docker-mounts-scalar",
    ),
    pytest.param(
        docker("image: x\nmounts:\n  - source: data\n    target: /data\n"),
        "runners.linux.docker.mounts[0].source",
        ['must be an absolute path, got "data"'],
        id="docker-mount-source-relative",
    ),
    pytest.param(
        docker("image: x\nmounts:\n  - {source: /a, target: /b}\n  - {source: /c, target: d}\n"),
        "runners.linux.docker.mounts[1].target",
        ['must be an absolute path, got "d"'],
        id="docker-mount-target-relative",
    ),
    pytest.param(
        docker("image: x\nmounts:\n  - source: ~/cache\n    target: /cache\n"),
        "runners.linux.docker.mounts[0].source",
        ['"~/cache"', "~ is not expanded"],
        id="docker-mount-source-tilde",
    ),
    pytest.param(
        docker("image: x\nmounts:\n  - source: /a\n"),
        "runners.linux.docker.mounts[0].target",
        ["missing required key"],
        id="docker-mount-target-missing",
    ),
    pytest.param(
        docker("image: x\nmounts:\n  - {source: /a, target: /b, read_only: 'yes'}\n"),
        "runners.linux.docker.mounts[0].read_only",
        ['expected a bool (true or false), got string "yes"'],
        id="docker-mount-read-only-str",
    ),
    pytest.param(
        docker("image: x\nmounts:\n  - {source: /a, target: /b}\n  - {source: /c, target: /b}\n"),
        "runners.linux.docker.mounts",
        ['duplicate target "/b" at [0] and [1]'],
        id="docker-mount-duplicate-target",
    ),
    pytest.param(
        docker("image: x\nmounts:\n  - /a:/b\n"),
        "runners.linux.docker.mounts[0]",
        ['expected a mapping, got string "/a:/b"'],
        id="docker-mount-short-syntax",
    ),
    pytest.param(
        docker("image: x\n1: y\n"),
        "runners.linux.docker",
        ["keys must be strings, got integer 1"],
        id="docker-int-key",
    ),
    pytest.param(
        docker("image: x\nhost: http://docker:2375\n"),
        "runners.linux.docker.host",
        ["must be a unix://, tcp:// or ssh:// Docker endpoint", '"http://docker:2375"'],
        id="docker-host-scheme",
    ),
    pytest.param(
        docker("image: x\nhost: unix://docker.sock\n"),
        "runners.linux.docker.host",
        ["absolute socket path"],
        id="docker-host-unix-relative",
    ),
    pytest.param(
        docker('image: x\nhost: "tcp://"\n'),
        "runners.linux.docker.host",
        ["Docker endpoint"],
        id="docker-host-no-address",
    ),
    pytest.param(
        docker("image: x\nnetwork: my net\n"),
        "runners.linux.docker.network",
        ["must not contain whitespace"],
        id="docker-network-space",
    ),
    pytest.param(
        docker("image: x\ncpus: 0\n"),
        "runners.linux.docker.cpus",
        ["must be greater than 0, got 0"],
        id="docker-cpus-zero",
    ),
    pytest.param(
        docker('image: x\ncpus: "1.5"\n'),
        "runners.linux.docker.cpus",
        ["expected a number", "(remove the quotes)"],
        id="docker-cpus-string",
    ),
    pytest.param(
        docker("image: x\nmemory: 4\n"),
        "runners.linux.docker.memory",
        ["must be at least 6 (MiB, Docker's minimum), got 4"],
        id="docker-memory-too-small",
    ),
    pytest.param(
        docker("image: x\nmemory: 512.5\n"),
        "runners.linux.docker.memory",
        ["expected an integer, got number 512.5"],
        id="docker-memory-float",
    ),
    pytest.param(
        docker("image: x\nenv: [A=1]\n"),
        "runners.linux.docker.env",
        ["expected a mapping, got a list"],
        id="docker-env-list",
    ),
    pytest.param(
        docker('image: x\nenv: {"A=B": x}\n'),
        'runners.linux.docker.env."A=B"',
        ['without "="'],
        id="docker-env-key-equals",
    ),
    pytest.param(
        docker('image: x\nenv: {"": x}\n'),
        'runners.linux.docker.env.""',
        ["must be non-empty"],
        id="docker-env-key-empty",
    ),
    pytest.param(
        docker("image: x\nenv: {ACTIONS_RUNNER_INPUT_JITCONFIG: x}\n"),
        "runners.linux.docker.env.ACTIONS_RUNNER_INPUT_JITCONFIG",
        ["is reserved", "JIT config"],
        id="docker-env-jit-reserved",
    ),
    pytest.param(
        docker("image: x\nenv: {RETRIES: 3}\n"),
        "runners.linux.docker.env.RETRIES",
        ["expected a string, got integer 3 (quote it"],
        id="docker-env-value-int",
    ),
    pytest.param(
        docker('image: x\nprivileged: "true"\n'),
        "runners.linux.docker.privileged",
        ['expected a bool (true or false), got string "true"'],
        id="docker-privileged-str",
    ),
    pytest.param(
        docker('image: x\nruntime: " runsc"\n'),
        "runners.linux.docker.runtime",
        ["must not contain whitespace"],
        id="docker-runtime-space",
    ),
    pytest.param(
        docker("image: x\nuser: 1001\n"),
        "runners.linux.docker.user",
        ["expected a string, got integer 1001", "quote it"],
        id="docker-user-int",
    ),
    pytest.param(
        docker("image: x\njit_via: args\n"),
        "runners.linux.docker.jit_via",
        ['must be one of "env", "arg"', 'did you mean "arg"?'],
        id="docker-jit-via",
    ),
    pytest.param(
        docker("image: x\npull: if-not-present\n"),
        "runners.linux.docker.pull",
        ['must be one of "missing", "always", "never"'],
        id="docker-pull",
    ),
    pytest.param(
        docker("image: x\nauto_remove: 1\n"),
        "runners.linux.docker.auto_remove",
        ["expected a bool (true or false), got integer 1"],
        id="docker-auto-remove-int",
    ),
    pytest.param(
        docker("image: x\nstop_timeout: -1\n"),
        "runners.linux.docker.stop_timeout",
        ["must be 0 or more, got -1"],
        id="docker-stop-timeout-negative",
    ),
    pytest.param(
        docker("image: x\nstop_timeout: 2.5\n"),
        "runners.linux.docker.stop_timeout",
        ["expected an integer, got number 2.5"],
        id="docker-stop-timeout-float",
    ),
    # -- libvirt ------------------------------------------------------------------------------
    pytest.param(
        libvirt("cpus: 2\n"),
        "runners.win.libvirt.path",
        ["missing required key"],
        id="libvirt-path-missing",
    ),
    pytest.param(
        libvirt("path: images/win.qcow2\n"),
        "runners.win.libvirt.path",
        ['must be an absolute path, got "images/win.qcow2"'],
        id="libvirt-path-relative",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\ncpus: 0\n"),
        "runners.win.libvirt.cpus",
        ["must be greater than 0, got 0"],
        id="libvirt-cpus-zero",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\ncpus: yes\n"),
        "runners.win.libvirt.cpus",
        ["expected an integer, got bool true"],
        id="libvirt-cpus-bool",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nmemory: -1\n"),
        "runners.win.libvirt.memory",
        ["got -1"],
        id="libvirt-memory-negative",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nmemory: 8G\n"),
        "runners.win.libvirt.memory",
        ['expected an integer, got string "8G"'],
        id="libvirt-memory-str",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nsocket: libvirt-sock\n"),
        "runners.win.libvirt.socket",
        ['must be an absolute path, got "libvirt-sock"'],
        id="libvirt-socket-relative",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nmount:\n  source: cache\n"),
        "runners.win.libvirt.mount.source",
        ['must be an absolute path, got "cache"'],
        id="libvirt-mount-relative",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nmount: {}\n"),
        "runners.win.libvirt.mount.source",
        ["missing required key"],
        id="libvirt-mount-source-missing",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nmount:\n  source: /\n"),
        "runners.win.libvirt.mount.source",
        ["virtio-fs tag", '"/"'],
        id="libvirt-mount-root",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nmount: [{source: /a}]\n"),
        "runners.win.libvirt.mount",
        ["expected a mapping, got a list"],
        id="libvirt-mount-list",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nmounts: [{source: /a}]\n"),
        "runners.win.libvirt.mounts",
        ['unknown key (did you mean "mount"?)'],
        id="libvirt-mounts-plural",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nuri: https://host/system\n"),
        "runners.win.libvirt.uri",
        ["must be a libvirt connection URI of the QEMU driver", '"https://host/system"'],
        id="libvirt-uri-scheme",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nuri: xen:///system\n"),
        "runners.win.libvirt.uri",
        ["QEMU driver"],
        id="libvirt-uri-xen",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nuri: 'qemu:///sys tem'\n"),
        "runners.win.libvirt.uri",
        ["must be a libvirt connection URI"],
        id="libvirt-uri-space",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nsocket: /run/l.sock\nuri: qemu+ssh://h/system\n"),
        "runners.win.libvirt",
        ["socket and uri cannot both be set", "?socket="],
        id="libvirt-socket-and-uri",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\ndomain_type: xen\n"),
        "runners.win.libvirt.domain_type",
        ['must be one of "kvm", "qemu"'],
        id="libvirt-domain-type",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nfirmware: uefi\n"),
        "runners.win.libvirt.firmware",
        ['must be one of "efi", "bios"', 'did you mean "efi"?'],
        id="libvirt-firmware",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\ndisk_bus: ide\n"),
        "runners.win.libvirt.disk_bus",
        ['must be one of "scsi", "virtio", "sata"'],
        id="libvirt-disk-bus",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\ncpu_mode: host passthrough\n"),
        "runners.win.libvirt.cpu_mode",
        ["host-passthrough, host-model, maximum or a QEMU CPU model name"],
        id="libvirt-cpu-mode",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\ndomain_type: qemu\ncpu_mode: host-passthrough\n"),
        "runners.win.libvirt",
        ["cpu_mode host-passthrough needs domain_type kvm", "maximum or host-model"],
        id="libvirt-tcg-passthrough",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nmachine: pc q35\n"),
        "runners.win.libvirt.machine",
        ["must not contain whitespace"],
        id="libvirt-machine-space",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nnetwork: ''\n"),
        "runners.win.libvirt.network",
        ["must not be empty"],
        id="libvirt-network-empty",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nkernel: boot/vmlinuz\n"),
        "runners.win.libvirt.kernel",
        ['must be an absolute path, got "boot/vmlinuz"'],
        id="libvirt-kernel-relative",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\ninitrd: /boot/initrd.img\ncmdline: quiet\n"),
        "runners.win.libvirt",
        ["initrd and cmdline need kernel"],
        id="libvirt-initrd-without-kernel",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\noverlay_dir: overlays\n"),
        "runners.win.libvirt.overlay_dir",
        ['must be an absolute path, got "overlays"'],
        id="libvirt-overlay-dir-relative",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nboot_timeout: 0\n"),
        "runners.win.libvirt.boot_timeout",
        ["must be greater than 0, got 0"],
        id="libvirt-boot-timeout-zero",
    ),
    pytest.param(
        libvirt("path: /w.qcow2\nboot_timeout: 3m\n"),
        "runners.win.libvirt.boot_timeout",
        ['expected a number, got string "3m"'],
        id="libvirt-boot-timeout-str",
    ),
    # -- tart ---------------------------------------------------------------------------------
    pytest.param(
        tart("cpus: 4\n"),
        "runners.mac.tart.image",
        ["missing required key"],
        id="tart-image-missing",
    ),
    pytest.param(
        tart("image: base\ncpus: -2\n"),
        "runners.mac.tart.cpus",
        ["got -2"],
        id="tart-cpus-negative",
    ),
    pytest.param(
        tart("image: base\nmemory: 0\n"),
        "runners.mac.tart.memory",
        ["got 0"],
        id="tart-memory-zero",
    ),
    pytest.param(
        tart("image: base\nmounts:\n  - source: /a\n"),
        "runners.mac.tart.mounts[0].name",
        ["missing required key"],
        id="tart-mount-name-missing",
    ),
    pytest.param(
        tart("image: base\nmounts:\n  - {name: c, source: cache}\n"),
        "runners.mac.tart.mounts[0].source",
        ['must be an absolute path, got "cache"'],
        id="tart-mount-source-relative",
    ),
    pytest.param(
        tart("image: base\nmounts:\n  - {name: 'a:b', source: /a}\n"),
        "runners.mac.tart.mounts[0].name",
        ['must not contain ":"', '"a:b"'],
        id="tart-mount-name-colon",
    ),
    pytest.param(
        tart("image: base\nmounts:\n  - {name: a, source: '/a:b'}\n"),
        "runners.mac.tart.mounts[0].source",
        ['must not contain ":"', '"/a:b"'],
        id="tart-mount-source-colon",
    ),
    pytest.param(
        tart("image: base\nmounts:\n  - {name: a, source: /a}\n  - {name: a, source: /b}\n"),
        "runners.mac.tart.mounts",
        ['duplicate name "a" at [0] and [1]'],
        id="tart-mount-duplicate-name",
    ),
    pytest.param(
        tart("image: base\nboot_timeout: 0\n"),
        "runners.mac.tart.boot_timeout",
        ["0"],
        id="tart-boot-timeout-zero",
    ),
    pytest.param(
        tart("image: base\ntart_path: ''\n"),
        "runners.mac.tart.tart_path",
        ["must not be empty"],
        id="tart-path-empty",
    ),
    # -- YAML level ---------------------------------------------------------------------------
    pytest.param(
        BASE + "  linux:\n    labels: [b]\n    docker: {image: y}\n",
        "",
        ['found duplicate key "linux" (first defined on line 3)'],
        id="yaml-duplicate-runner",
    ),
    pytest.param(
        docker("image: x\nimage: y\n"),
        "",
        ['found duplicate key "image" (first defined on line 5)'],
        id="yaml-duplicate-nested-key",
    ),
    pytest.param("runners:\n\tlinux: {}\n", "", ["invalid YAML"], id="yaml-tab"),
    pytest.param(
        "runners: !!python/object:os.system {}\n", "", ["invalid YAML"], id="yaml-python-tag"
    ),
    pytest.param("a: 1\n---\nb: 2\n", "", ["invalid YAML", "single document"], id="yaml-two-docs"),
    pytest.param("? [a, b]\n: c\n", "", ["invalid YAML", "unhashable"], id="yaml-unhashable-key"),
    pytest.param(
        "runners: *nowhere\n", "", ["invalid YAML", "undefined alias"], id="yaml-bad-alias"
    ),
]


@pytest.mark.parametrize(("content", "key_path", "fragments"), CORPUS)
def test_malformed_config(
    tmp_path: Path, content: str, key_path: str, fragments: list[str]
) -> None:
    err = load_error(tmp_path, content)
    message = str(err)
    assert "config.yml" in message
    assert err.source is not None
    assert err.source.endswith("config.yml")
    if key_path:
        assert f" {key_path}: " in message
    assert any(p.path == key_path for p in err.problems), err.problems
    for fragment in fragments:
        assert fragment in message
    assert isinstance(err, ValueError)


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 40


def test_docker_options_defaults(tmp_path: Path) -> None:
    image = load(tmp_path, docker("image: x\n")).runners["linux"].docker
    assert image == DockerImage(image="x")
    assert (image.host, image.network, image.runtime, image.user) == ("", "", "", "")
    assert (image.cpus, image.memory, image.env, image.privileged) == (None, None, {}, False)
    assert (image.jit_via, image.pull, image.auto_remove, image.stop_timeout) == (
        "env",
        "missing",
        True,
        10,
    )


def test_docker_options_all_set(tmp_path: Path) -> None:
    body = """\
        image: ghcr.io/org/runner:v1
        host: ssh://ci@build-host
        network: host
        cpus: 2
        memory: 4096
        env: {RUNNER_ALLOW_RUNASROOT: "1", EMPTY: ""}
        privileged: true
        runtime: sysbox-runc
        user: "1001:1001"
        jit_via: arg
        pull: always
        auto_remove: false
        stop_timeout: 0
        """
    image = load(tmp_path, docker(body)).runners["linux"].docker
    assert image is not None
    assert image.host == "ssh://ci@build-host"
    assert image.network == "host"
    assert image.cpus == 2.0
    assert isinstance(image.cpus, float)
    assert image.memory == 4096
    assert image.env == {"RUNNER_ALLOW_RUNASROOT": "1", "EMPTY": ""}
    assert image.privileged is True
    assert image.runtime == "sysbox-runc"
    assert image.user == "1001:1001"
    assert image.jit_via == "arg"
    assert image.pull == "always"
    assert image.auto_remove is False
    assert image.stop_timeout == 0
    hash(image)  # still a frozen, hashable config


def test_libvirt_options_defaults(tmp_path: Path) -> None:
    image = load(tmp_path, libvirt("path: /w.qcow2\n")).runners["win"].libvirt
    assert image == LibvirtImage(path="/w.qcow2")
    assert (image.uri, image.socket) == ("qemu:///system", "")
    assert (image.domain_type, image.machine, image.firmware) == ("kvm", "q35", "efi")
    assert (image.cpu_mode, image.effective_cpu_mode) == ("", "host-passthrough")
    assert (image.disk_bus, image.network) == ("scsi", "default")
    assert (image.kernel, image.initrd, image.cmdline) == ("", "", "")
    assert image.overlay_dir == "/var/lib/outrunner/overlays"
    assert image.boot_timeout == 180.0
    assert (image.cpus, image.memory, image.mount) == (4, 8192, None)


def test_libvirt_options_all_set(tmp_path: Path) -> None:
    body = """\
        path: /images/micro.qcow2
        runner_cmd: /opt/runner/run.sh
        uri: qemu+ssh://ci@hv1/system
        domain_type: qemu
        machine: pc
        firmware: bios
        cpu_mode: host-model
        disk_bus: virtio
        network: none
        kernel: /images/vmlinux
        initrd: /images/initrd.img
        cmdline: console=ttyS0 quiet
        overlay_dir: /srv/overlays
        boot_timeout: 30.5
        cpus: 1
        memory: 256
        """
    image = load(tmp_path, libvirt(body)).runners["win"].libvirt
    assert image is not None
    assert image.uri == "qemu+ssh://ci@hv1/system"
    assert (image.domain_type, image.machine, image.firmware) == ("qemu", "pc", "bios")
    assert (image.cpu_mode, image.effective_cpu_mode) == ("host-model", "host-model")
    assert (image.disk_bus, image.network) == ("virtio", "none")
    assert image.kernel == "/images/vmlinux"
    assert image.initrd == "/images/initrd.img"
    assert image.cmdline == "console=ttyS0 quiet"
    assert image.overlay_dir == "/srv/overlays"
    assert image.boot_timeout == 30.5
    assert (image.cpus, image.memory) == (1, 256)
    hash(image)


@pytest.mark.parametrize(
    ("body", "mode"),
    [
        ("domain_type: qemu\n", "maximum"),
        ("domain_type: kvm\n", "host-passthrough"),
        ("domain_type: qemu\ncpu_mode: Skylake-Client-v4\n", "Skylake-Client-v4"),
        ("cpu_mode: maximum\n", "maximum"),
    ],
)
def test_libvirt_cpu_mode_default_follows_domain_type(tmp_path: Path, body: str, mode: str) -> None:
    image = load(tmp_path, libvirt(f"path: /w.qcow2\n{body}")).runners["win"].libvirt
    assert image is not None
    assert image.effective_cpu_mode == mode


@pytest.mark.parametrize(
    "uri",
    [
        "qemu:///system",
        "qemu:///session",
        "qemu+ssh://root@h:2222/system?keyfile=/k",
        "test:///default",
    ],
)
def test_libvirt_uri_forms(tmp_path: Path, uri: str) -> None:
    image = load(tmp_path, libvirt(f"path: /w.qcow2\nuri: '{uri}'\n")).runners["win"].libvirt
    assert image is not None
    assert image.uri == uri


def test_libvirt_socket_with_the_default_uri(tmp_path: Path) -> None:
    # gha-outrunner's key, with the URI left at (or spelled as) its default.
    for body in ("socket: /run/l.sock\n", "socket: /run/l.sock\nuri: qemu:///system\n"):
        image = load(tmp_path, libvirt(f"path: /w.qcow2\n{body}")).runners["win"].libvirt
        assert image is not None
        assert image.socket == "/run/l.sock"


@pytest.mark.parametrize(
    "host", ["unix:///var/run/docker.sock", "tcp://127.0.0.1:2375", "ssh://me@host:2222"]
)
def test_docker_host_forms(tmp_path: Path, host: str) -> None:
    image = load(tmp_path, docker(f"image: x\nhost: {host}\n")).runners["linux"].docker
    assert image is not None
    assert image.host == host


# ============================================================================================
# Upstream example files (own equivalents, so the tests do not need the mirror)

EXAMPLES = {
    "examples/docker.yml": """\
        # Docker-only configuration.
        url: https://github.com/your-org/your-repo
        # token_file: /etc/outrunner/token

        runners:
          linux:
            labels: [self-hosted, linux]
            docker:
              image: outrunner-runner:latest
              # mounts:
              #   - source: /var/cache/vcpkg
              #     target: /opt/vcpkg-cache
        """,
    "examples/docker.yml with mounts": """\
        url: https://github.com/your-org/your-repo
        runners:
          linux:
            labels: [self-hosted, linux]
            docker:
              image: outrunner-runner:latest
              mounts:
                - source: /var/cache/vcpkg
                  target: /opt/vcpkg-cache
                - source: /var/cache/cargo
                  target: /opt/cargo-cache
                  read_only: false
        """,
    "examples/libvirt.yml": """\
        url: https://github.com/your-org/your-repo
        runners:
          windows:
            labels: [self-hosted, windows, x64]
            max_runners: 1
            libvirt:
              path: /var/lib/libvirt/images/ci-runners/windows-builder.qcow2
              runner_cmd: 'C:\\actions-runner\\run.cmd'
              cpus: 4
              memory: 8192
              mount:
                source: /var/cache/vcpkg
        """,
    "examples/tart.yml": """\
        url: https://github.com/your-org/your-repo
        runners:
          macos:
            labels: [self-hosted, macos, arm64]
            max_runners: 1
            tart:
              image: ghcr.io/cirruslabs/macos-sequoia-base:latest
              runner_cmd: /actions-runner/run.sh
              cpus: 4
              memory: 8192
              mounts:
                - name: vcpkg
                  source: /var/cache/vcpkg
                - name: cargo
                  source: /var/cache/cargo
                  read_only: false
        """,
    "examples/mixed.yml": """\
        # All three backends in one config.
        url: https://github.com/your-org/your-repo
        runners:
          linux:
            labels: [self-hosted, linux, x64]
            max_runners: 4
            docker:
              image: outrunner-runner:latest
          windows:
            labels: [self-hosted, windows, x64]
            max_runners: 1
            libvirt:
              path: /var/lib/libvirt/images/ci-runners/windows-builder.qcow2
              runner_cmd: 'C:\\actions-runner\\run.cmd'
              cpus: 4
              memory: 8192
          macos:
            labels: [self-hosted, macos, arm64]
            max_runners: 1
            tart:
              image: ghcr.io/cirruslabs/macos-sequoia-base:latest
              runner_cmd: /actions-runner/run.sh
              cpus: 4
              memory: 8192
        """,
    "docs multi-repo": """\
        url: https://github.com/myorg/main-repo
        token_file: /etc/outrunner/token
        runners:
          main-linux:
            labels: [self-hosted, linux]
            docker:
              image: runner:latest
          # This runner targets a different repo, with its own token.
          infra-linux:
            url: https://github.com/myorg/infra-repo
            token_file: /etc/outrunner/token-infra
            labels: [self-hosted, linux]
            docker:
              image: runner:latest
        """,
    "docs multi-repo without global url": """\
        token_file: /etc/outrunner/token
        runners:
          repo-a:
            url: https://github.com/myorg/repo-a
            labels: [self-hosted, linux]
            docker:
              image: runner:latest
          repo-b:
            url: https://github.com/myorg/repo-b
            labels: [self-hosted, linux]
            docker:
              image: runner:latest
        """,
    "docs/configuration.md anchors": """\
        x-linux: &linux
          labels: [self-hosted, linux]
          max_runners: 4
          docker: &docker
            image: ghcr.io/org/runner:latest
            mounts:
              - {source: /var/cache/build, target: /cache}

        runners:
          linux-a:
            <<: *linux
            url: https://github.com/org/a
          linux-b:
            <<: *linux
            url: https://github.com/org/b
            docker:
              <<: *docker
              image: ghcr.io/org/runner:gpu
        """,
    "docs/configuration.md full example": """\
        url: https://github.com/myorg
        token_file: /etc/outrunner/token

        x-cache: &cache /var/cache/build

        runners:
          linux:
            labels: [self-hosted, linux, x64]
            max_runners: 4
            docker:
              image: ghcr.io/myorg/runner:latest
              mounts:
                - source: *cache
                  target: /opt/build-cache
                - source: /etc/ssl/certs
                  target: /etc/ssl/certs
                  read_only: true

          windows:
            labels: [self-hosted, windows, x64]
            max_runners: 1
            runner_group: windows-builders
            libvirt:
              path: /var/lib/libvirt/images/ci-runners/windows-builder.qcow2
              runner_cmd: 'C:\\actions-runner\\run.cmd'
              cpus: 8
              memory: 16384
              mount:
                source: /var/cache/build

          macos:
            labels: [self-hosted, macos, arm64]
            max_runners: 2
            tart:
              image: ghcr.io/cirruslabs/macos-sequoia-base:latest
              runner_cmd: /Users/admin/actions-runner/run.sh
              mounts:
                - name: build-cache
                  source: /var/cache/build

          # Another repository, with its own token (relative: next to this file).
          infra:
            url: https://github.com/myorg/infra
            token_file: token-infra
            labels: [self-hosted, linux, infra]
            docker:
              image: ghcr.io/myorg/runner:latest
        """,
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_upstream_example_parses(tmp_path: Path, name: str) -> None:
    cfg = load(tmp_path, EXAMPLES[name])
    assert cfg.runners
    for key, entry in cfg.runners.items():
        assert entry.name == key
        assert entry.backend is getattr(entry, entry.provider_type)


def test_upstream_mixed_example_values(tmp_path: Path) -> None:
    cfg = load(tmp_path, EXAMPLES["examples/mixed.yml"])
    assert list(cfg.runners) == ["linux", "windows", "macos"]  # file order is kept
    assert [r.provider_type for r in cfg.runners.values()] == ["docker", "libvirt", "tart"]
    assert [r.max_runners for r in cfg.runners.values()] == [4, 1, 1]
    assert cfg.runners["macos"].labels == ("self-hosted", "macos", "arm64")


def test_docs_full_example_values(tmp_path: Path) -> None:
    cfg = load(tmp_path, EXAMPLES["docs/configuration.md full example"])
    linux, windows, macos, infra = cfg.runners.values()
    assert linux.docker is not None
    assert linux.docker.mounts[0].source == "/var/cache/build"
    assert linux.docker.mounts[1].read_only is True
    assert windows.runner_group == "windows-builders"
    assert windows.libvirt == LibvirtImage(
        path="/var/lib/libvirt/images/ci-runners/windows-builder.qcow2",
        runner_cmd="C:\\actions-runner\\run.cmd",
        cpus=8,
        memory=16384,
        mount=LibvirtMount("/var/cache/build"),
    )
    assert macos.tart is not None
    assert (macos.tart.cpus, macos.tart.memory) == (4, 8192)
    assert infra.token_file == str(tmp_path / "token-infra")


def test_docs_error_example(tmp_path: Path) -> None:
    """The error listing shown in docs/configuration.md, verbatim."""
    err = load_error(
        tmp_path,
        """\
        url: https://github.com/myorg
        runners:
          linux:
            labels: [self-hosted, linux]
            docker:
              image: runner:latest
              mounts:
                - source: data
                  target: /data
            max_runners: "2"
            lables: [gpu]
          win:
            labels: [windows]
            cpus: 8
            libvirt:
              path: ~/w.qcow2
        """,
    )
    assert [p.format("config.yml") for p in err.problems] == [
        'config.yml:8: runners.linux.docker.mounts[0].source: must be an absolute path, got "data"',
        "config.yml:10: runners.linux.max_runners: expected an integer, got string "
        '"2" (remove the quotes)',
        'config.yml:11: runners.linux.lables: unknown key (did you mean "labels"?)',
        "config.yml:14: runners.win.cpus: unknown key (it belongs under docker or libvirt or tart)",
        "config.yml:16: runners.win.libvirt.path: must be an absolute path, "
        'got "~/w.qcow2" (~ is not expanded)',
    ]


def test_packaged_config_with_runners_commented_out(tmp_path: Path) -> None:
    """The packaged /etc/outrunner/config.yml ships with the runners section commented out."""
    path = write_config(
        tmp_path,
        """\
        url: https://github.com/your-org/your-repo
        token_file: /etc/outrunner/token
        # runners:
        #   linux:
        #     labels: [self-hosted, linux]
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: no runners configured (uncomment the runners section in {path})"
    )


@pytest.mark.parametrize("content", ["", "# only a comment\n", "runners:\n", "runners: ~\n"])
def test_no_runners_variants(tmp_path: Path, content: str) -> None:
    err = load_error(tmp_path, content)
    assert "no runners configured (uncomment the runners section in" in str(err)


# ============================================================================================
# Loading: files, YAML features, messages


def test_accepts_pathlike_and_str(tmp_path: Path) -> None:
    path = write_config(tmp_path, BASE)
    assert load_config(path) == load_config(str(path))


def test_config_is_frozen_and_hashable(tmp_path: Path) -> None:
    cfg = load(tmp_path, EXAMPLES["examples/mixed.yml"])
    assert hash(cfg) == hash(load(tmp_path, EXAMPLES["examples/mixed.yml"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.url = "https://example.com"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.runners["x"] = cfg.runners["linux"]  # type: ignore[index]
    assert cfg.runners == {k: v for k, v in cfg.runners.items()}


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests may run as root, which chmod cannot lock out; fake the failing open instead.
    path = write_config(tmp_path, BASE)
    real_open = builtins.open

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(ConfigError, match="permission denied") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_nul_byte_in_path() -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("config\0.yml")


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_bytes(b"url: https://github.com/org\nrunners:\n  \xff\xfe: {}\n")
    with pytest.raises(ConfigError, match=r"config.yml:3: file is not valid UTF-8"):
        load_config(path)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert load_config(path).runners["linux"].labels == ("self-hosted", "linux")


def test_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)


def test_deep_nesting_is_a_config_error(tmp_path: Path) -> None:
    err = load_error(tmp_path, "runners: " + "[" * 20000 + "]" * 20000 + "\n")
    assert "config.yml" in str(err)


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    err = load_error(tmp_path, "url: https://github.com/org\nrunners:\n  linux: [a\n  b: c\n")
    assert err.problems[0].line is not None
    assert err.problems[0].line >= 3
    assert str(err).startswith(f"{err.source}:{err.problems[0].line}: invalid YAML")


def test_problem_lines_and_format(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        docker("image: x\nmounts:\n  - source: data\n    target: /data\n"),
    )
    (problem,) = err.problems
    assert problem.path == "runners.linux.docker.mounts[0].source"
    assert problem.line == 7
    assert str(err) == (
        f"{err.source}:7: runners.linux.docker.mounts[0].source: "
        'must be an absolute path, got "data"'
    )


def test_all_problems_are_reported_in_line_order(tmp_path: Path) -> None:
    err = load_error(
        tmp_path,
        """\
        url: ftp://x
        runners:
          a:
            labels: linux
            docker: {image: x}
          b:
            labels: [b]
            max_runners: 0
            libvirt: {path: rel.qcow2}
        """,
    )
    assert [p.path for p in err.problems] == [
        "url",
        "runners.a.labels",
        "runners.b.max_runners",
        "runners.b.libvirt.path",
    ]
    assert [p.line for p in err.problems] == [1, 4, 8, 9]
    assert len(str(err).splitlines()) == 4


def test_many_problems_are_capped(tmp_path: Path) -> None:
    body = "".join(f"  r{i}:\n    labels: []\n    docker: {{image: x}}\n" for i in range(40))
    err = load_error(tmp_path, "runners:\n" + body)
    assert len(err.problems) == 40
    lines = str(err).splitlines()
    assert len(lines) == 26
    assert lines[-1].endswith("and 15 more problems")


def test_anchors_and_merge_keys(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """\
        x-defaults: &defaults
          labels: [self-hosted, linux]
          max_runners: 3
          docker: &docker
            image: runner:latest
            mounts:
              - {source: /var/cache/build, target: /cache}
        runners:
          a:
            <<: *defaults
          b:
            <<: *defaults
            labels: [self-hosted, gpu]
            docker:
              <<: *docker
              image: runner:gpu
        """,
    )
    a, b = cfg.runners["a"], cfg.runners["b"]
    assert a.labels == ("self-hosted", "linux")
    assert a.max_runners == b.max_runners == 3
    assert b.labels == ("self-hosted", "gpu")
    assert a.docker is not None
    assert b.docker is not None
    assert a.docker.image == "runner:latest"
    assert b.docker.image == "runner:gpu"
    assert a.docker.mounts == b.docker.mounts


def test_only_x_prefixed_top_level_keys_are_ignored(tmp_path: Path) -> None:
    err = load_error(tmp_path, "defaults: &d {labels: [a]}\n" + BASE)
    assert "defaults: unknown key" in str(err)


def test_relative_token_file_is_resolved_against_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_token_env: None
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "token").write_text("global-token\n")
    (conf_dir / "tokens").mkdir()
    (conf_dir / "tokens" / "b").write_text("b-token\n")
    path = write_config(
        conf_dir,
        """\
        token_file: token
        runners:
          a:
            labels: [a]
            docker: {image: x}
          b:
            token_file: ./tokens/../tokens/b
            labels: [b]
            docker: {image: x}
        """,
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path.relative_to(tmp_path))
    assert cfg.token_file == str(conf_dir / "token")
    assert cfg.runners["b"].token_file == str(conf_dir / "tokens" / "b")
    assert resolve_runner_token(None, cfg, cfg.runners["a"]) == "global-token"
    assert resolve_runner_token(None, cfg, cfg.runners["b"]) == "b-token"


def test_null_max_runners_means_default(tmp_path: Path) -> None:
    cfg = load(tmp_path, runner("labels: [a]\nmax_runners:\ndocker: {image: x}\n"))
    assert cfg.runners["linux"].max_runners is None


def test_name_at_limit_is_accepted(tmp_path: Path) -> None:
    name = "a" * 55
    cfg = load(tmp_path, runner("labels: [a]\ndocker: {image: x}\n", name=name))
    assert cfg.runners[name].name == name
    assert len(f"{name}-0123abcd") == 64


def test_yaml_bool_spellings_for_read_only(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        docker("image: x\nmounts:\n  - {source: /a, target: /a, read_only: yes}\n"),
    )
    docker_cfg = cfg.runners["linux"].docker
    assert docker_cfg is not None
    assert docker_cfg.mounts[0].read_only is True


def test_error_is_value_error_with_cause(tmp_path: Path) -> None:
    err = load_error(tmp_path, "{{")
    assert isinstance(err, ValueError)
    assert isinstance(err.__cause__, yaml.YAMLError)


# ============================================================================================
# Credentials


def test_token_sources_are_stripped(monkeypatch: pytest.MonkeyPatch, no_token_env: None) -> None:
    assert resolve_token("  flag \n", Config()) == "flag"
    monkeypatch.setenv("GITHUB_TOKEN", " env\n")
    assert resolve_token(None, Config()) == "env"


def test_blank_env_token_falls_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_token_env: None
) -> None:
    (tmp_path / "token").write_text("file-token")
    monkeypatch.setenv("GITHUB_TOKEN", "  ")
    assert resolve_token(None, Config(token_file=str(tmp_path / "token"))) == "file-token"


def test_missing_credential_file_falls_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_token_env: None
) -> None:
    (tmp_path / "token").write_text("file-token")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert resolve_token(None, Config(token_file=str(tmp_path / "token"))) == "file-token"


def test_credentials_directory_beats_token_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_token_env: None
) -> None:
    (tmp_path / "github-token").write_text("cred-token")
    (tmp_path / "token").write_text("file-token")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve_token(None, Config(token_file=str(tmp_path / "token"))) == "cred-token"


def test_empty_credential_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_token_env: None
) -> None:
    (tmp_path / "github-token").write_text("\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError, match="is empty") as info:
        resolve_token(None, Config())
    assert str(tmp_path / "github-token") in str(info.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        pytest.param(b"", "is empty", id="empty"),
        pytest.param(b"  \n\t\n", "is empty", id="blank"),
        pytest.param(b"ghp_secret1 ghp_secret2\n", "whitespace", id="two-words"),
        pytest.param(b"ghp_secret1\nghp_secret2\n", "whitespace", id="two-lines"),
        pytest.param(b"ghp_secret\xff\n", "not valid UTF-8", id="binary"),
        pytest.param(b"x" * (65 * 1024), "larger than", id="huge"),
    ],
)
def test_bad_token_file(tmp_path: Path, no_token_env: None, content: bytes, fragment: str) -> None:
    token_path = tmp_path / "token"
    token_path.write_bytes(content)
    with pytest.raises(ConfigError, match=fragment) as info:
        resolve_token(None, Config(token_file=str(token_path)))
    message = str(info.value)
    assert str(token_path) in message
    assert "ghp_secret" not in message
    assert "token_file" in message
    assert info.value.__cause__ is None or "ghp_secret" not in str(info.value.__cause__)


def test_missing_token_file(tmp_path: Path, no_token_env: None) -> None:
    with pytest.raises(ConfigError, match="file not found") as info:
        resolve_token(None, Config(token_file=str(tmp_path / "nope")))
    assert str(tmp_path / "nope") in str(info.value)


def test_unreadable_token_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_token_env: None
) -> None:
    token_path = tmp_path / "token"
    token_path.write_text("ghp_secret")
    real_open = builtins.open

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(token_path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(ConfigError, match="Permission denied") as info:
        resolve_token(None, Config(token_file=str(token_path)))
    assert str(token_path) in str(info.value)


def test_token_file_is_a_directory(tmp_path: Path, no_token_env: None) -> None:
    with pytest.raises(ConfigError, match="cannot read token_file"):
        resolve_token(None, Config(token_file=str(tmp_path)))


def test_runner_token_file_error_names_runner(tmp_path: Path) -> None:
    runner_cfg = RunnerConfig(name="linux", token_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"runners\.linux\.token_file") as info:
        resolve_runner_token("flag", Config(), runner_cfg)
    assert str(tmp_path / "missing") in str(info.value)


def test_flag_token_with_whitespace_inside_is_rejected_without_echo() -> None:
    with pytest.raises(ConfigError, match="--token") as info:
        resolve_token("ghp_secret more", Config())
    assert "ghp_secret" not in str(info.value)


def test_flag_url_is_validated() -> None:
    with pytest.raises(ConfigError, match="--url: must be an http"):
        resolve_url("github.com/org", Config(url="https://github.com/org"))


def test_runner_url_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"runners\.a\.url"):
        resolve_runner_url(None, Config(), RunnerConfig(name="a", url="ftp://x"))


# ============================================================================================
# ca_file: a private CA (GHES), global and per runner


def test_ca_file_global_and_per_runner_relative_to_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "certs").mkdir(parents=True)
    global_ca = self_signed_certificate(conf_dir, "global").cert
    runner_ca = self_signed_certificate(conf_dir / "certs", "runner").cert
    path = write_config(
        conf_dir,
        """\
        ca_file: global.pem
        runners:
          a:
            labels: [a]
            docker: {image: x}
          b:
            ca_file: ./certs/../certs/runner.pem
            labels: [b]
            docker: {image: x}
        """,
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path.relative_to(tmp_path))
    assert cfg.ca_file == str(global_ca)
    assert cfg.runners["a"].ca_file == ""
    assert cfg.runners["b"].ca_file == str(runner_ca)
    # The runner's own beats the global one; without either, "" (the system trust store).
    assert resolve_runner_ca_file(cfg, cfg.runners["a"]) == str(global_ca)
    assert resolve_runner_ca_file(cfg, cfg.runners["b"]) == str(runner_ca)
    assert resolve_runner_ca_file(Config(), RunnerConfig(name="a")) == ""


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda d: d / "missing.pem", "file not found", id="missing"),
        pytest.param(lambda d: d, "not a regular file", id="directory"),
        pytest.param(
            lambda d: _written(d / "token.pem", "ghp_notACertificate\n"),
            "not a PEM certificate bundle (NO_CERTIFICATE_OR_CRL_FOUND)",
            id="not-pem",
        ),
        pytest.param(
            lambda d: _written(d / "cut.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n"),
            "not a PEM certificate bundle",
            id="truncated-pem",
        ),
    ],
)
def test_bad_ca_file_names_file_line_key_and_value(tmp_path: Path, make: Any, reason: str) -> None:
    bad = make(tmp_path)
    err = load_error(tmp_path, f"ca_file: {bad}\n" + runner(f"ca_file: {bad}\n{RUNNER_BODY}"))
    source = tmp_path / "config.yml"
    assert str(err).splitlines() == [
        f'{source}:1: ca_file: cannot use "{bad}" as a CA file: {reason}',
        f'{source}:5: runners.linux.ca_file: cannot use "{bad}" as a CA file: {reason}',
    ]


RUNNER_BODY = "labels: [a]\ndocker: {image: x}\n"


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("value", "message"),
    [("''", "must not be empty"), ("~/ca.pem", "must not start with ~"), ("[a]", "expected a")],
)
def test_ca_file_value_checks(tmp_path: Path, value: str, message: str) -> None:
    err = load_error(tmp_path, f"ca_file: {value}\n" + runner(RUNNER_BODY))
    assert [p.path for p in err.problems] == ["ca_file"]
    assert message in err.problems[0].message


def test_resolving_a_ca_file_checks_it_again(tmp_path: Path) -> None:
    """A Config built in code was never loaded: the resolver reports a bad file by its key."""
    missing = str(tmp_path / "gone.pem")
    with pytest.raises(ConfigError, match=r"^runners\.linux\.ca_file: cannot use .* not found"):
        resolve_runner_ca_file(Config(), RunnerConfig(name="linux", ca_file=missing))
    with pytest.raises(ConfigError, match=r"^ca_file: cannot use .*gone\.pem"):
        resolve_runner_ca_file(Config(ca_file=missing), RunnerConfig(name="linux"))


# ============================================================================================
# The declarative schema machinery


@dataclass(frozen=True)
class _Inner:
    size: int = field(metadata=rules(positive))


@dataclass(frozen=True)
class _Toy:
    mode: Literal["fast", "slow"] = "fast"
    ratio: float = field(default=1.0, metadata=rules(positive))
    env: Mapping[str, str] = field(default_factory=FrozenMap[str, str])
    flag: bool = False
    inner: _Inner | None = None
    tags: tuple[str, ...] = ()


def decode_toy(raw: object) -> tuple[Any, list[str]]:
    decoder = Decoder()
    value = decoder.decode(raw, _Toy, "toy")
    return value, [p.format("f") for p in decoder.problems]


def test_schema_accepts_all_supported_annotations() -> None:
    check_schema(Config)
    check_schema(_Toy)


def test_schema_rejects_unsupported_annotation() -> None:
    @dataclass(frozen=True)
    class Bad:
        things: list[str]

    with pytest.raises(TypeError, match="unsupported annotation"):
        check_schema(Bad)


def test_schema_decodes_every_kind() -> None:
    value, problems = decode_toy(
        {
            "mode": "slow",
            "ratio": 2,
            "env": {"A": "1"},
            "flag": True,
            "inner": {"size": 3},
            "tags": ["x"],
        }
    )
    assert problems == []
    assert value == _Toy("slow", 2.0, FrozenMap({"A": "1"}), True, _Inner(3), ("x",))
    assert isinstance(value.ratio, float)
    assert hash(value) == hash(_Toy("slow", 2.0, FrozenMap({"A": "1"}), True, _Inner(3), ("x",)))


def test_schema_defaults() -> None:
    value, problems = decode_toy({})
    assert problems == []
    assert value == _Toy()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"mode": "fsat"},
            'f: toy.mode: must be one of "fast", "slow", got string "fsat" (did you mean "fast"?)',
        ),
        ({"mode": 1}, 'f: toy.mode: must be one of "fast", "slow", got integer 1'),
        ({"ratio": True}, "f: toy.ratio: expected a number, got bool true"),
        ({"ratio": float("inf")}, "f: toy.ratio: must be a finite number, got inf"),
        ({"ratio": -0.5}, "f: toy.ratio: must be greater than 0, got -0.5"),
        (
            {"env": {"A": 1}},
            "f: toy.env.A: expected a string, got integer 1 (quote it if you meant a string)",
        ),
        ({"env": {1: "a"}}, "f: toy.env: keys must be strings, got integer 1 (quote it)"),
        ({"env": ["A=1"]}, "f: toy.env: expected a mapping, got a list"),
        ({"flag": "true"}, 'f: toy.flag: expected a bool (true or false), got string "true"'),
        ({"flag": 1}, "f: toy.flag: expected a bool (true or false), got integer 1"),
        ({"inner": {}}, "f: toy.inner.size: missing required key"),
        ({"inner": None, "size": 1}, "f: toy.size: unknown key (it belongs under inner)"),
        ({"tags": [["x"]]}, "f: toy.tags[0]: expected a string, got a list"),
        ({"zzz": 1}, "f: toy.zzz: unknown key (valid keys: mode, ratio, env, flag, inner, tags)"),
    ],
)
def test_schema_rejects(raw: dict[str, Any], expected: str) -> None:
    value, problems = decode_toy(raw)
    assert value is INVALID
    assert problems == [expected]


def test_frozen_map() -> None:
    m = FrozenMap({"b": 1, "a": 2})
    assert list(m) == ["b", "a"]
    assert m == {"b": 1, "a": 2}
    assert m != {"b": 1}
    assert hash(m) == hash(FrozenMap({"a": 2, "b": 1}))
    assert repr(m) == "FrozenMap({'b': 1, 'a': 2})"
    assert len(m) == 2


# ============================================================================================
# Robustness: random damage to valid configs only ever yields Config or ConfigError

_JUNK: list[Any] = [
    None,
    0,
    -1,
    1,
    True,
    False,
    1.5,
    "",
    "x",
    "~/x",
    "rel/path",
    "/abs",
    "https://",
    [],
    [1],
    ["a", "a"],
    {},
    {"a": 1},
    {"source": "/a"},
    "a" * 70,
]


def _mutate(node: Any, rng: random.Random) -> Any:
    if isinstance(node, dict) and node and rng.random() < 0.8:
        key = rng.choice(list(node))
        action = rng.random()
        if action < 0.2:
            del node[key]
        elif action < 0.35:
            node[rng.choice(["lables", "cpu", "x", "mount", "image", 7])] = rng.choice(_JUNK)
        elif action < 0.6:
            node[key] = rng.choice(_JUNK)
        else:
            node[key] = _mutate(node[key], rng)
        return node
    if isinstance(node, list) and node and rng.random() < 0.8:
        i = rng.randrange(len(node))
        node[i] = _mutate(node[i], rng) if rng.random() < 0.5 else rng.choice(_JUNK)
        return node
    return rng.choice(_JUNK)


def test_random_damage_only_raises_config_error(tmp_path: Path) -> None:
    rng = random.Random(1234)
    originals = [yaml.safe_load(textwrap.dedent(text)) for text in EXAMPLES.values()]
    outcomes = {"ok": 0, "error": 0}
    unnamed = []
    for i in range(400):
        data = _mutate(yaml.safe_load(yaml.safe_dump(rng.choice(originals))), rng)
        path = tmp_path / f"c{i}.yml"
        path.write_text(yaml.safe_dump(data))
        try:
            load_config(path)
            outcomes["ok"] += 1
        except ConfigError as exc:
            outcomes["error"] += 1
            if str(path) not in str(exc):
                unnamed.append(str(exc))
    assert outcomes["error"] > 100
    assert unnamed == []


def test_random_bytes_only_raise_config_error(tmp_path: Path) -> None:
    rng = random.Random(99)
    alphabet = b"abc:- \n\t{}[]&*!|>'\"#%@`,?~\xff\x00"
    base = BASE.encode()
    path = tmp_path / "config.yml"
    for _ in range(300):
        data = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            data.insert(rng.randrange(len(data) + 1), rng.choice(alphabet))
        path.write_bytes(bytes(data))
        with contextlib.suppress(ConfigError):
            load_config(path)


# --------------------------------------------------------------------------------------------
# Warm pool, lifetimes and the HTTP listener (issue 12)

POOL = """\
url: https://github.com/org
runners:
  linux:
    labels: [linux]
    max_runners: 4
    docker: {image: x}
"""


def test_pool_and_lifetimes_default_to_off(tmp_path: Path) -> None:
    runner = load(tmp_path, POOL).runners["linux"]
    assert (runner.min_runners, runner.max_lifetime, runner.idle_timeout) == (0, None, None)
    assert load(tmp_path, POOL).listen == ""


def test_pool_and_lifetimes_are_read(tmp_path: Path) -> None:
    text = POOL.replace(
        "    max_runners: 4\n",
        "    max_runners: 4\n    min_runners: 2\n"
        "    max_lifetime: 28800\n    idle_timeout: 600.5\n",
    )
    config = load(tmp_path, 'listen: "[::1]:9090"\n' + text)
    runner = config.runners["linux"]
    assert (runner.min_runners, runner.max_lifetime, runner.idle_timeout) == (2, 28800, 600.5)
    assert config.listen == "[::1]:9090"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "    min_runners: 5\n",
            "runners.linux: min_runners (5) must not exceed max_runners (4)",
        ),
        ("    min_runners: -1\n", "runners.linux.min_runners: must be 0 or more, got -1"),
        ("    max_lifetime: 0\n", "runners.linux.max_lifetime: must be greater than 0, got 0"),
        ("    idle_timeout: -5\n", "runners.linux.idle_timeout: must be greater than 0, got -5"),
        (
            '    idle_timeout: "10 minutes"\n',
            "runners.linux.idle_timeout: expected seconds or a duration such as 90s, 30m, 8h",
        ),
        ("    max_lifetime: 0s\n", "runners.linux.max_lifetime: must be greater than 0, got 0"),
    ],
)
def test_pool_and_lifetime_errors_name_the_key(tmp_path: Path, line: str, message: str) -> None:
    error = load_error(
        tmp_path, POOL.replace("    max_runners: 4\n", "    max_runners: 4\n" + line)
    )
    assert message in str(error)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1:99999", "expected HOST:PORT with a port from 0 to 65535"),
        ("9090", "expected HOST:PORT"),
        ("::1:9090", "an IPv6 address needs brackets"),
    ],
)
def test_listen_must_be_host_and_port(tmp_path: Path, value: str, message: str) -> None:
    error = load_error(tmp_path, f'listen: "{value}"\n' + POOL)
    assert f"listen: {message}" in str(error)


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("600", 600.0),
        ("90s", 90.0),
        ("30m", 1800.0),
        ("8h", 28800.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("2m30s", 150.0),
        ("500ms", 0.5),
        ('"45m"', 2700.0),
    ],
)
def test_lifetimes_and_drain_timeout_take_durations(
    tmp_path: Path, written: str, seconds: float
) -> None:
    text = f"drain_timeout: {written}\n" + POOL.replace(
        "    max_runners: 4\n",
        f"    max_runners: 4\n    max_lifetime: {written}\n    idle_timeout: {written}\n",
    )
    config = load(tmp_path, text)
    runner = config.runners["linux"]
    assert (config.drain_timeout, runner.max_lifetime, runner.idle_timeout) == (seconds,) * 3
