"""Config URL parsing, API base selection and Actions URL building (docs/protocol.md §1, §3.1)."""

from __future__ import annotations

import pytest

from outrunner.scaleset import InvalidConfigURLError, Scope, parse_config_url
from outrunner.scaleset.urls import actions_url, append_path, with_query

REPO = Scope.REPOSITORY
ORG = Scope.ORGANIZATION
ENTERPRISE = Scope.ENTERPRISE


@pytest.mark.parametrize(
    ("url", "scope", "names"),
    [
        ("https://github.com/org/repo/", REPO, {"owner": "org", "repo": "repo"}),
        (
            "https://github.com/enterprises/my-enterprise/",
            ENTERPRISE,
            {"enterprise": "my-enterprise"},
        ),
        ("https://github.com/Enterprises/e", ENTERPRISE, {"enterprise": "e"}),
        ("https://www.github.com/org", ORG, {"org": "org"}),
        ("https://github.localhost/org", ORG, {"org": "org"}),
        ("https://my-ghes.com/org", ORG, {"org": "org"}),
        ("https://my-ghes.ghe.com/org/", ORG, {"org": "org"}),
        ("https://github.com/enterprises", ORG, {"org": "enterprises"}),
        ("//https://github.com/org/repo//", REPO, {"owner": "org", "repo": "repo"}),
        # No scheme: Go parses it as a two-segment path, so it "works" as a repository.
        ("github.com/org", REPO, {"owner": "github.com", "repo": "org"}),
    ],
)
def test_valid_config_urls(url: str, scope: Scope, names: dict[str, str]) -> None:
    config = parse_config_url(url)
    assert config.scope is scope
    for field, value in names.items():
        assert getattr(config, field) == value
    # Sent back in runner-registration: the URL with every leading/trailing "/" trimmed.
    assert config.config_url == url.strip("/")


@pytest.mark.parametrize(
    "url", ["https://github.com/", "https://github.com", "https://github.com/some/random/path"]
)
def test_invalid_config_urls(url: str) -> None:
    with pytest.raises(InvalidConfigURLError) as caught:
        parse_config_url(url)
    trimmed = url.strip("/")
    assert str(caught.value) == (
        f'"{trimmed}": invalid config URL, should point to an enterprise, org, or repository'
    )


def test_unparsable_config_url() -> None:
    with pytest.raises(InvalidConfigURLError, match="failed to parse URL"):
        parse_config_url("https://github.com:notaport/org")


@pytest.mark.parametrize(
    ("url", "hosted", "api_base"),
    [
        ("https://github.com/org/repo", True, "https://api.github.com"),
        ("https://WWW.GitHub.com/org/repo", True, "https://api.github.com"),
        ("http://github.localhost/org/repo", True, "http://api.github.localhost"),
        ("https://github.ghe.com/org/repo", True, "https://api.github.ghe.com"),
        ("https://my-instance.com/org/repo", False, "https://my-instance.com/api/v3"),
        ("http://localhost/org/repo", False, "http://localhost/api/v3"),
        ("https://github.com:443/org", False, "https://github.com:443/api/v3"),
        ("http://127.0.0.1:8080/org", False, "http://127.0.0.1:8080/api/v3"),
        ("https://x.GHE.COM/org", False, "https://x.GHE.COM/api/v3"),  # suffix is case-sensitive
    ],
)
def test_api_base(url: str, hosted: bool, api_base: str) -> None:
    config = parse_config_url(url)
    assert config.is_hosted is hosted
    assert config.api_base == api_base


@pytest.mark.parametrize("value", ["1", ""])
def test_force_ghes_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    config = parse_config_url("https://test.ghe.com/org/repo")
    assert config.api_url("/x") == "https://api.test.ghe.com/x"
    monkeypatch.setenv("GITHUB_ACTIONS_FORCE_GHES", value)  # presence counts, even empty
    assert not config.is_hosted
    assert config.api_url("/x") == "https://test.ghe.com/api/v3/x"


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("https://github.com/o/r", "/repos/o/r/actions/runners/registration-token"),
        ("https://github.com/o", "/orgs/o/actions/runners/registration-token"),
        ("https://github.com/enterprises/e", "/enterprises/e/actions/runners/registration-token"),
    ],
)
def test_registration_token_path(url: str, path: str) -> None:
    assert parse_config_url(url).registration_token_path == path


@pytest.mark.parametrize(
    ("base", "path", "params", "expected"),
    [
        (
            "http://h/tenant/123/",
            "_apis/x",
            None,
            "http://h/tenant/123/_apis/x?api-version=6.0-preview",
        ),
        (
            "http://h/tenant/123",
            "/_apis/x",
            None,
            "http://h/tenant/123/_apis/x?api-version=6.0-preview",
        ),
        ("http://h", "_apis/x", None, "http://h/_apis/x?api-version=6.0-preview"),
        (
            "http://h/t/",
            "_apis/runtime/runnergroups/",
            {"groupName": "g"},
            "http://h/t/_apis/runtime/runnergroups/?api-version=6.0-preview&groupName=g",
        ),
        ("http://h/a/b/", "../c/./d", None, "http://h/a/c/d?api-version=6.0-preview"),
        ("http://h/a//b", "c", None, "http://h/a/b/c?api-version=6.0-preview"),
        (
            "http://h/t?z=1&b=2",
            "x",
            {"name": "Scale Set", "runnerGroupId": "1"},
            "http://h/t/x?api-version=6.0-preview&b=2&name=Scale+Set&runnerGroupId=1&z=1",
        ),
        ("http://h/t?api-version=7.0", "x", None, "http://h/t/x?api-version=7.0"),
        ("http://h/t", "x", {"api-version": "5.1"}, "http://h/t/x?api-version=5.1"),
        (
            "http://h/t",
            "x",
            {"name": "a&b#c"},
            "http://h/t/x?api-version=6.0-preview&name=a%26b%23c",
        ),
    ],
)
def test_actions_url(base: str, path: str, params: dict[str, str] | None, expected: str) -> None:
    assert actions_url(base, path, params) == expected


def test_with_query_merges_sorted_without_api_version() -> None:
    url = "https://broker.example/message?sessionId=abc&a=1"
    assert with_query(url, {"lastMessageId": "7"}) == (
        "https://broker.example/message?a=1&lastMessageId=7&sessionId=abc"
    )
    assert with_query("http://q/m?lastMessageId=1", {"lastMessageId": "2"}) == (
        "http://q/m?lastMessageId=2"
    )


def test_append_path_keeps_query() -> None:
    assert (
        append_path("https://b/scalesets/message?x=1", "12") == "https://b/scalesets/message/12?x=1"
    )
    assert append_path("https://b/m/", "12") == "https://b/m//12"
