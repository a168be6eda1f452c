"""Config URL parsing and URL building (``docs/protocol.md`` §1 and §3.1).

The config URL (``https://github.com/org/repo``) names the registration target; from it come the
scope, the GitHub REST API base and the registration-token path. The Actions service URLs are built
from the base URL that the runner-registration exchange hands back.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from outrunner.scaleset.errors import InvalidConfigURLError, go_quote

API_VERSION = "6.0-preview"
# Actions-service routes, relative to the base URL from runner-registration (docs/protocol.md §3).
SCALE_SETS = "_apis/runtime/runnerscalesets"
RUNNERS = "_apis/distributedtask/pools/0/agents"
RUNNER_GROUPS = "_apis/runtime/runnergroups/"  # the trailing slash is part of the route
FORCE_GHES_ENV = "GITHUB_ACTIONS_FORCE_GHES"
_INVALID_CONFIG_URL = "invalid config URL, should point to an enterprise, org, or repository"
_HOSTED_HOSTS = frozenset({"github.com", "www.github.com", "github.localhost"})


class Scope(enum.StrEnum):
    REPOSITORY = "repository"
    ORGANIZATION = "organization"
    ENTERPRISE = "enterprise"


@dataclass(frozen=True, kw_only=True)
class GitHubConfig:
    """A parsed config URL. Build it with :func:`parse_config_url`."""

    config_url: str  # the URL with leading/trailing "/" trimmed, as sent in runner-registration
    scheme: str
    host: str  # host[:port], without user info
    scope: Scope
    owner: str = ""  # repository scope
    repo: str = ""  # repository scope
    org: str = ""  # organization scope
    enterprise: str = ""  # enterprise scope

    @property
    def is_hosted(self) -> bool:
        """github.com-like host. Read at call time: the FORCE_GHES variable may change meanwhile."""
        if FORCE_GHES_ENV in os.environ:  # presence counts, even when empty
            return False
        # The port is part of the host, so github.com:443 is not hosted (Go compares u.Host).
        return self.host.lower() in _HOSTED_HOSTS or self.host.endswith(".ghe.com")

    @property
    def api_base(self) -> str:
        """GitHub REST API base: ``https://api.github.com`` or ``https://ghes.example/api/v3``."""
        if not self.is_hosted:
            return f"{self.scheme}://{self.host}/api/v3"
        if self.host.lower() == "www.github.com":
            return f"{self.scheme}://api.github.com"
        return f"{self.scheme}://api.{self.host}"

    def api_url(self, path: str) -> str:
        """``path`` (starting with ``/``) on the REST API base."""
        return self.api_base + path

    @property
    def registration_token_path(self) -> str:
        match self.scope:
            case Scope.REPOSITORY:
                return f"/repos/{self.owner}/{self.repo}/actions/runners/registration-token"
            case Scope.ORGANIZATION:
                return f"/orgs/{self.org}/actions/runners/registration-token"
            case Scope.ENTERPRISE:
                return f"/enterprises/{self.enterprise}/actions/runners/registration-token"


def parse_config_url(url: str) -> GitHubConfig:
    """Parse a config URL; raises :class:`InvalidConfigURLError`.

    As in Go, a URL without a scheme (``github.com/org``) parses with an empty host and two path
    segments, so it is accepted as a repository and fails only when used.
    """
    trimmed = url.strip("/")
    try:
        parts = urlsplit(trimmed)
        parts.port  # noqa: B018 - validates the port the way Go's parser does
    except ValueError as exc:
        raise InvalidConfigURLError(f"failed to parse URL: {exc}") from exc
    config_url = urlunsplit(parts)
    host = parts.netloc.rpartition("@")[2]
    segments = unquote(parts.path).strip("/").split("/")
    common = {"config_url": config_url, "scheme": parts.scheme, "host": host}
    if len(segments) == 1 and segments[0]:
        return GitHubConfig(scope=Scope.ORGANIZATION, org=segments[0], **common)
    if len(segments) == 2:
        if segments[0].lower() == "enterprises":
            return GitHubConfig(scope=Scope.ENTERPRISE, enterprise=segments[1], **common)
        return GitHubConfig(scope=Scope.REPOSITORY, owner=segments[0], repo=segments[1], **common)
    raise InvalidConfigURLError(f"{go_quote(config_url)}: {_INVALID_CONFIG_URL}")


def actions_url(base: str, path: str, params: Mapping[str, str] | None = None) -> str:
    """Join the Actions service base URL and an endpoint path, with ``api-version`` in the query.

    The base's path prefix is kept (``…/tenant/123/`` + ``_apis/x``), ``.`` and ``..`` are cleaned,
    a trailing slash on ``path`` is kept (runner groups need it), and the query is the base's query
    merged with ``params``, sorted, with ``api-version`` added unless already there.
    """
    parts = urlsplit(base)
    joined = _clean_path(f"{parts.path}/{path}", trailing_slash=path.endswith("/"))
    query = _merge_query(parts.query, params or {}, api_version=True)
    return urlunsplit((parts.scheme, parts.netloc, joined, query, ""))


def with_query(url: str, params: Mapping[str, str]) -> str:
    """``url`` with ``params`` set in its query (replacing same-named keys), written sorted."""
    parts = urlsplit(url)
    query = _merge_query(parts.query, params, api_version=False)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def append_path(url: str, segment: str) -> str:
    """``url`` with ``/segment`` appended to its path; the query is kept.

    Plain concatenation like Go's client: a queue URL ending in ``/`` gives ``//``.
    """
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"{parts.path}/{segment}", parts.query, ""))


def _clean_path(path: str, *, trailing_slash: bool) -> str:
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    cleaned = "/" + "/".join(segments)
    if trailing_slash and not cleaned.endswith("/"):
        cleaned += "/"
    return cleaned


def _merge_query(existing: str, params: Mapping[str, str], *, api_version: bool) -> str:
    merged: dict[str, list[str]] = {}
    for key, value in parse_qsl(existing, keep_blank_values=True):
        merged.setdefault(key, []).append(value)
    for key, value in params.items():
        merged[key] = [value]
    if api_version and not any(merged.get("api-version", [])):
        merged["api-version"] = [API_VERSION]
    # Go's url.Values.Encode: keys sorted, values kept in order, form encoding (space -> "+").
    return urlencode([(key, value) for key in sorted(merged) for value in merged[key]])
