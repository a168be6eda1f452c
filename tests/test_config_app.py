"""``app:`` in the config (docs/github-app.md): the schema, which credential a runner gets, and the
private key file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from outrunner.config import (
    Config,
    ConfigError,
    GitHubAppConfig,
    ResolvedApp,
    ResolvedToken,
    RunnerConfig,
    resolve_runner_credentials,
    resolve_runner_token_source,
)
from outrunner.log import Redactor
from outrunner.scaleset import GitHubApp
from outrunner.testing.fakegithub import generate_key_pair
from tests.test_config import load, load_error

ORG_URL = "https://github.com/octo-org"
DOCKER = "docker: {image: runner:latest}"


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    return generate_key_pair()


@pytest.fixture
def key_file(tmp_path: Path, keys: tuple[str, str]) -> Path:
    path = tmp_path / "app.pem"
    path.write_text(keys[0])
    path.chmod(0o600)
    return path


@pytest.fixture(autouse=True)
def _no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def app_config(path: Path | str, **overrides: object) -> GitHubAppConfig:
    fields: dict[str, object] = {
        "client_id": "Iv1.abc",
        "installation_id": 42,
        "private_key_file": str(path),
    }
    fields.update(overrides)
    return GitHubAppConfig(**fields)  # type: ignore[arg-type]


def resolve(
    cfg: Config, runner: RunnerConfig, flag: str | None = None, url: str = ORG_URL
) -> ResolvedToken | ResolvedApp:
    return resolve_runner_credentials(flag, cfg, runner, url=url)


# ============================================================================================
# Loading


def test_global_and_per_runner_app(tmp_path: Path, key_file: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "infra.pem").write_text("not read at load time")
    cfg = load(
        tmp_path,
        f"""
        url: {ORG_URL}
        app:
          client_id: Iv1.abc
          installation_id: 42
          private_key_file: app.pem
        runners:
          linux:
            labels: [linux]
            {DOCKER}
          infra:
            labels: [infra]
            app:
              app_id: 123456
              installation_id: 7
              private_key_file: keys/infra.pem
            {DOCKER}
        """,
    )
    assert cfg.app == GitHubAppConfig(
        client_id="Iv1.abc", installation_id=42, private_key_file=str(key_file)
    )
    assert cfg.app.issuer == "Iv1.abc"
    infra = cfg.runners["infra"].app
    assert infra is not None
    # Relative to the config file's directory, like token_file.
    assert infra.private_key_file == str(tmp_path / "keys" / "infra.pem")
    assert (infra.client_id, infra.app_id, infra.issuer) == (None, 123456, "123456")
    assert cfg.runners["linux"].app is None


def test_a_missing_key_file_does_not_fail_loading(tmp_path: Path) -> None:
    """Like token files, the key is read when credentials are resolved, so a config can be
    checked on a machine that does not hold the secrets."""
    cfg = load(
        tmp_path,
        f"""
        app: {{client_id: Iv1.abc, installation_id: 42, private_key_file: /nonexistent.pem}}
        runners:
          linux:
            labels: [linux]
            {DOCKER}
        """,
    )
    assert cfg.app is not None
    with pytest.raises(ConfigError, match=r'app.private_key_file "/nonexistent.pem": file not'):
        resolve(cfg, cfg.runners["linux"])


@pytest.mark.parametrize(
    ("app", "message"),
    [
        (
            "{client_id: Iv1.abc, app_id: 1, installation_id: 42, private_key_file: k.pem}",
            "config.yml:3: app: must configure exactly one of client_id or app_id "
            "(found client_id and app_id)",
        ),
        (
            "{installation_id: 42, private_key_file: k.pem}",
            "config.yml:3: app: must configure exactly one of client_id or app_id (found none)",
        ),
        (
            "{client_id: Iv1.abc, private_key_file: k.pem}",
            "config.yml:3: app.installation_id: missing required key",
        ),
        (
            "{client_id: Iv1.abc, installation_id: 0, private_key_file: k.pem}",
            "config.yml:3: app.installation_id: must be greater than 0, got 0",
        ),
        (
            '{client_id: Iv1.abc, installation_id: "42", private_key_file: k.pem}',
            'app.installation_id: expected an integer, got string "42" (remove the quotes)',
        ),
        (
            "{client_id: Iv1.abc, installation_id: 42}",
            "config.yml:3: app.private_key_file: missing required key",
        ),
        (
            "{client_id: Iv1.abc, installation_id: 42, private_key_file: ~/k.pem}",
            "app.private_key_file: must not start with ~",
        ),
        (
            '{client_id: "Iv1 abc", installation_id: 42, private_key_file: k.pem}',
            'app.client_id: must not contain whitespace, got "Iv1 abc"',
        ),
        (
            "{app_id: -3, installation_id: 42, private_key_file: k.pem}",
            "app.app_id: must be greater than 0, got -3",
        ),
        (
            "{client_id: Iv1.abc, installation_id: 42, private_key: k.pem}",
            'app.private_key: unknown key (did you mean "private_key_file"?)',
        ),
        ("null", "app: expected a mapping, got null"),
    ],
    ids=[
        "both ids",
        "no id",
        "no installation",
        "installation 0",
        "installation string",
        "no key file",
        "tilde",
        "client id whitespace",
        "negative app id",
        "typo",
        "null",
    ],
)
def test_app_schema_errors(tmp_path: Path, app: str, message: str) -> None:
    error = load_error(
        tmp_path,
        f"""
        url: {ORG_URL}
        app: {app}
        runners:
          linux:
            labels: [linux]
            {DOCKER}
        """,
    )
    assert message in str(error)


def test_one_credential_per_entry(tmp_path: Path) -> None:
    app = "{client_id: Iv1.abc, installation_id: 42, private_key_file: k.pem}"
    runner_error = load_error(
        tmp_path,
        f"""
        runners:
          linux:
            labels: [linux]
            token_file: linux-token
            app: {app}
            {DOCKER}
        """,
    )
    assert str(runner_error) == (
        f"{tmp_path / 'config.yml'}:3: runners.linux: token_file and app cannot both be set: "
        f'use a token or a GitHub App, not both (token_file "{tmp_path / "linux-token"}")'
    )
    top_error = load_error(
        tmp_path,
        f"""
        token_file: token
        app: {app}
        runners:
          linux:
            labels: [linux]
            {DOCKER}
        """,
    )
    assert str(top_error) == (
        f"{tmp_path / 'config.yml'}: token_file and app cannot both be set: use a token or a "
        f'GitHub App, not both (token_file "{tmp_path / "token"}")'
    )


# ============================================================================================
# Which credential a runner gets


def test_precedence(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch, keys: tuple[str, str]
) -> None:
    own_key = tmp_path / "own.pem"
    own_key.write_text(keys[0])
    token_file = tmp_path / "token"
    token_file.write_text("ghp_from_file\n")
    global_app = app_config(key_file)
    own_app = app_config(own_key, client_id=None, app_id=99, installation_id=7)

    # 1. A runner's own app or token_file beats everything, --token included.
    runner = RunnerConfig(name="linux", app=own_app)
    got = resolve(Config(app=global_app), runner, "ghp_flag")
    assert isinstance(got, ResolvedApp)
    assert (got.issuer, got.installation_id, got.key_file) == ("99", 7, str(own_key))
    assert got.origin == f"GitHub App 99 installation 7 (runners.linux.app, key {own_key})"
    runner = RunnerConfig(name="linux", token_file=str(token_file))
    got = resolve(Config(app=global_app), runner, "ghp_flag")
    assert got == ResolvedToken("ghp_from_file", f"runners.linux.token_file {token_file}")

    # 2. The command line beats the top-level app.
    plain = RunnerConfig(name="linux")
    assert resolve(Config(app=global_app), plain, "ghp_flag") == ResolvedToken(
        "ghp_flag", "--token"
    )
    # 3. The top-level app beats GITHUB_TOKEN and the systemd credential, and says so.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "github-token").write_text("ghp_systemd")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_env")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    got = resolve(Config(app=global_app), plain)
    assert isinstance(got, ResolvedApp)
    assert got.origin == f"GitHub App Iv1.abc installation 42 (app, key {key_file})"
    assert got.ignored == ("GITHUB_TOKEN", f"systemd credential {credentials / 'github-token'}")
    # 4. Without any app, exactly the token chain as before.
    assert resolve(Config(), plain) == resolve_runner_token_source(None, Config(), plain)
    assert resolve(Config(), plain) == ResolvedToken("ghp_env", "GITHUB_TOKEN")


def test_resolved_app_reads_the_key_once_and_builds_credentials(
    key_file: Path, keys: tuple[str, str]
) -> None:
    got = resolve(Config(app=app_config(key_file)), RunnerConfig(name="linux"))
    assert isinstance(got, ResolvedApp)
    assert got.private_key == keys[0]
    assert keys[0] not in repr(got)
    assert "BEGIN" not in repr(got)
    registered: list[str] = []
    app = got.credentials(register_secret=registered.append)
    assert isinstance(app, GitHubApp)
    assert (app.issuer, app.installation_id) == ("Iv1.abc", 42)
    # The PEM text masks well in logs: every line of it, also inside a repr.
    redactor = Redactor()
    redactor.register(got.private_key)
    masked = redactor.redact(f"oops {got.private_key!r} and {got.private_key}")
    body = [line for line in keys[0].splitlines() if "-----" not in line]
    assert not any(line in masked for line in body)


def test_enterprise_urls_cannot_use_an_app(key_file: Path) -> None:
    cfg = Config(app=app_config(key_file))
    runner = RunnerConfig(name="ent")
    with pytest.raises(ConfigError) as raised:
        resolve(cfg, runner, url="https://github.com/enterprises/acme")
    assert str(raised.value) == (
        f'runner "ent": GitHub App Iv1.abc installation 42 (app, key {key_file}) cannot '
        "register runners for the enterprise URL https://github.com/enterprises/acme: GitHub "
        "Apps are installed on organizations and repositories, not enterprises; use a personal "
        "access token (classic) with the manage_runners:enterprise scope, or an organization URL"
    )
    for url in (ORG_URL, "https://github.com/octo-org/repo", "https://ghes.example/org"):
        assert isinstance(resolve(cfg, runner, url=url), ResolvedApp)
    # A token is fine for an enterprise.
    token = resolve(cfg, runner, "ghp_flag", url="https://github.com/enterprises/acme")
    assert isinstance(token, ResolvedToken)


def test_configs_built_in_code_are_checked_too(key_file: Path, tmp_path: Path) -> None:
    both = RunnerConfig(name="linux", token_file=str(tmp_path / "t"), app=app_config(key_file))
    with pytest.raises(ConfigError, match=r"runners\.linux: token_file and app cannot both be set"):
        resolve(Config(), both)
    cfg = Config(token_file=str(tmp_path / "t"), app=app_config(key_file))
    with pytest.raises(ConfigError, match="top level: token_file and app cannot both be set"):
        resolve(cfg, RunnerConfig(name="linux"))


def _ec_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "directory",
        "unreadable",
        "empty",
        "public key",
        "token by mistake",
        "EC key",
        "binary",
        "too large",
    ],
)
def test_bad_key_files(tmp_path: Path, keys: tuple[str, str], case: str) -> None:
    path = tmp_path / "app.pem"
    expected = {
        "missing": "cannot read {where}: file not found",
        "directory": "cannot read {where}: not a regular file",
        "unreadable": "cannot read {where}: Permission denied",
        "empty": "{where}: not a PEM file (no -----BEGIN line)",
        "public key": "{where}: not a PEM private key (a public key or a certificate?)",
        "token by mistake": "{where}: not a PEM file (no -----BEGIN line)",
        "EC key": "{where}: not an RSA key (EC): GitHub App private keys are RSA",
        "binary": "{where}: not a PEM file (it is binary; DER keys are not supported)",
        "too large": "{where} is larger than 65536 bytes; not a private key",
    }[case]
    content = ""
    if case == "directory":
        path.mkdir()
    elif case == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        content = keys[0]
        path.write_text(content)
        path.chmod(0)
    elif case == "empty":
        path.write_text("")
    elif case == "public key":
        content = keys[1]
        path.write_text(content)
    elif case == "token by mistake":
        content = "ghp_0123456789abcdefghijklmnopqrstuvwxyz"
        path.write_text(content)
    elif case == "EC key":
        content = _ec_key_pem()
        path.write_text(content)
    elif case == "binary":
        path.write_bytes(b"\x30\x82\x04\xa4\xff\xfe secret der bytes")
    elif case == "too large":
        path.write_text(keys[0] * 40)
    runner = RunnerConfig(name="linux", app=app_config(path))
    with pytest.raises(ConfigError) as raised:
        resolve(Config(), runner)
    where = f'runners.linux.app.private_key_file "{path}"'
    assert str(raised.value) == expected.format(where=where)
    secret_lines = [line for line in content.splitlines() if "-----" not in line and line]
    assert not any(line in str(raised.value) for line in secret_lines)
    assert "secret der bytes" not in repr(raised.value.__cause__)
