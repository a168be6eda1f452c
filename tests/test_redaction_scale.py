"""Redaction whose cost does not grow with the number of live runners (issue 13).

Every live runner has a JIT config, and registering each with the log redactor used to recompile
one regular expression of all of them on every registration (and fill Python's regex cache with
such patterns). JIT configs and JWTs are now masked by shape, with no registration; the few
long-lived secrets are registered by value and masked without any regex. These tests check the
behaviour (what is masked, where, and that registering compiles nothing), never timing:
``bench/redaction.py`` measures the cost.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import secrets
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from outrunner.log import Redactor, SimpleHandler, redact, register_secret, unregister_secret
from outrunner.testing import FakeGitHub
from outrunner.testing.fakegithub.tokens import make_admin_token

PAT = "ghp_0123456789abcdefABCDEF0123456789abcd"


def _b64(value: object, *, url: bool = False) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    if url:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return base64.b64encode(raw).decode()


def _real_shaped_jit_config() -> str:
    """Laid out like the Actions runner's: base64 of the files it writes, each base64 itself
    (``{".runner": ...}``, hence ``eyIu``, where the fake's ``{"url": ...}`` gives ``eyJ``)."""
    files = {
        ".runner": _b64({"AgentId": 7, "AgentName": "r-1", "PoolId": 1, "WorkFolder": "_work"}),
        ".credentials": _b64({"Scheme": "OAuthAccessToken", "Data": {"token": "x" * 40}}),
        ".credentials_rsaparams": base64.b64encode(secrets.token_bytes(600)).decode(),
    }
    return _b64(files)


def _hs256_shaped_jwt() -> str:
    header = _b64({"typ": "JWT", "alg": "HS256"}, url=True)
    claims = _b64({"iss": "Iv1.abc", "iat": 1, "exp": 600}, url=True)
    return f"{header}.{claims}.{base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()}"


@pytest.fixture(scope="module")
def fake_jit_config() -> Iterator[str]:
    with FakeGitHub(pat=PAT) as gh:
        yield gh.generate_jit_config(gh.create_scale_set("linux"), "r-1a2b3c4d")


@pytest.fixture(params=["fake JIT config", "real-shaped JIT config", "admin token", "HS256 JWT"])
def shaped(request: pytest.FixtureRequest, fake_jit_config: str) -> str:
    makers: dict[str, Callable[[], str]] = {
        "fake JIT config": lambda: fake_jit_config,
        "real-shaped JIT config": _real_shaped_jit_config,
        "admin token": lambda: make_admin_token(600)[0],
        "HS256 JWT": _hs256_shaped_jwt,
    }
    return makers[request.param]()


def _log_everywhere(secret: str, *, json_format: bool) -> str:
    """Log ``secret`` in the message, attributes, a group, a list, a repr, exception text and
    stack text, through a handler of the given format; return the output."""
    logger = logging.getLogger(f"outrunner_test.redaction.{secrets.token_hex(4)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    stream = io.StringIO()
    logger.addHandler(SimpleHandler(stream, "debug", json=json_format))
    attrs: dict[str, Any] = {
        "jit": secret,
        "env": f"ACTIONS_RUNNER_INPUT_JITCONFIG={secret}",
        "group": {"token": f"Bearer {secret}"},
        "argv": ["run.sh", "--jitconfig", secret],
        "request": repr({"encodedJITConfig": secret}),
        "body": json.dumps({"encodedJITConfig": secret}),
        "query": "jitconfig=" + urllib.parse.quote(secret, safe=""),
    }
    try:
        raise RuntimeError(f"runner failed to start with {secret}")
    except RuntimeError:
        logger.error("starting %s", secret, exc_info=True, stack_info=True, extra={"attrs": attrs})
    return stream.getvalue()


@pytest.mark.parametrize("json_format", [False, True], ids=["text", "json"])
def test_jit_configs_and_jwts_are_masked_everywhere_without_registration(
    shaped: str, json_format: bool
) -> None:
    assert shaped[:3] in ("eyJ", "eyI")
    out = _log_everywhere(shaped, json_format=json_format)
    # No piece of it survives, escaped or not (20 characters of base64 are 15 bytes).
    for piece in {shaped[:20], shaped[len(shaped) // 2 :][:20], shaped[-20:]}:
        assert piece not in out
    assert "runner failed to start with ***" in out
    assert "starting ***" in out
    if json_format:
        (line,) = out.splitlines()
        record = json.loads(line)
        assert record["jit"] == "***"
        assert record["group"] == {"token": "Bearer ***"}
        assert record["argv"] == ["run.sh", "--jitconfig", "***"]
        assert record["query"] == "jitconfig=***"
    else:
        assert " jit=*** " in out
        assert "group.token=" in out


def test_a_jit_config_or_jwt_registered_anyway_is_not_kept(
    shaped: str, fake_jit_config: str
) -> None:
    redactor = Redactor()
    redactor.register(shaped)
    redactor.register(f"{shaped}\n{fake_jit_config}\n")  # each line is shaped too
    assert len(redactor) == 1  # only the two-line string itself, which no shape matches whole
    assert redactor.redact(f"x {shaped} y") == "x *** y"
    redactor.unregister(shaped)
    redactor.unregister(f"{shaped}\n{fake_jit_config}\n")
    assert len(redactor) == 0
    assert redactor.redact(f"x {shaped} y") == "x *** y"  # still masked, by shape


def test_ordinary_log_text_is_left_alone() -> None:
    texts = [
        "https://api.github.com/repos/org/repo/actions/runners/registration-token",
        "runner r-1a2b3c4d (id 42) eyes the queue; key=eyJ (short)",
        "session 9b6e4a3e-0d0c-4bb8-9f61-3f0f5f0e2a11 messageId=12 SGVsbG8gd29ybGQh",
        "image ghcr.io/actions/actions-runner:2.321.0@sha256:" + "ab" * 32,
    ]
    for text in texts:
        assert Redactor().redact(text) == text


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patterns compiled (or looked up in the regex cache) through the ``re`` module."""
    seen: list[str] = []
    compile_ = re._compile  # type: ignore[attr-defined]

    def counting(pattern: Any, flags: Any) -> Any:
        seen.append(str(pattern))
        return compile_(pattern, flags)

    monkeypatch.setattr(re, "_compile", counting)
    return seen


def test_a_thousand_live_runners_compile_no_pattern(
    compiles: list[str], fake_jit_config: str
) -> None:
    """The Scaler's calls, for a thousand runners alive at once, then all gone: nothing is
    compiled, the regex cache does not grow, and every secret stays masked while registered."""
    cache_before = len(re._cache)  # type: ignore[attr-defined]
    jit_configs = [_real_shaped_jit_config() for _ in range(1000)]
    others = [f"opaque-runner-secret-{i:04d}-{secrets.token_hex(8)}" for i in range(1000)]
    register_secret(PAT)
    try:
        for jit, other in zip(jit_configs, others, strict=True):
            register_secret(jit)
            register_secret(other)  # a secret of no known shape, registered by value
            assert redact(f"start {jit} {other} as {PAT}") == "start *** *** as ***"
        assert redact(" ".join(others[::97])) == " ".join(["***"] * len(others[::97]))
        for jit, other in zip(jit_configs, others, strict=True):
            unregister_secret(jit)
            unregister_secret(other)
        assert redact(f"{others[0]} {PAT}") == f"{others[0]} ***"
    finally:
        unregister_secret(PAT)
    assert redact(PAT) == PAT
    assert redact(jit_configs[0]) == "***"
    assert compiles == []
    assert len(re._cache) == cache_before  # type: ignore[attr-defined]


def test_registration_is_idempotent_and_reference_counted() -> None:
    redactor = Redactor()
    for _ in range(3):
        redactor.register(PAT)
    for _ in range(2):
        redactor.unregister(PAT)
    assert redactor.redact(PAT) == "***"  # one registration still holds it
    redactor.unregister(PAT)
    assert redactor.redact(PAT) == PAT
    redactor.unregister(PAT)  # one too many: ignored, and no count below zero
    redactor.register(PAT)
    assert redactor.redact(PAT) == "***"


def test_a_long_lived_secret_is_masked_among_many_shaped_ones(fake_jit_config: str) -> None:
    redactor = Redactor()
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA0abc\n-----END RSA PRIVATE KEY-----"
    redactor.register(pem)
    redactor.register(PAT)
    text = f"{fake_jit_config}{PAT} {pem!r}"
    assert redactor.redact(text) == "*** '***\\n***\\n***'"
