"""_request.build_request and parse_url give what httpx gives, request for request."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import pytest

from outrunner.scaleset import _request
from outrunner.scaleset._request import build_request, parse_url

URLS = (
    # The shapes the package sends (urls.py): the short way.
    "https://api.example.com:8443/_apis/runtime/runnerscalesets/7?api-version=6.0-preview",
    "https://pipelines.actions.githubusercontent.com/abc/_apis/distributedtask/pools/0/agents/5"
    "?api-version=6.0-preview",
    "http://127.0.0.1:8080/_apis/runtime/runnerscalesets/1/sessions/6f1c-2a?lastMessageId=12"
    "&api-version=6.0-preview",
    "http://[::1]:9/runnergroups/?api-version=6.0-preview&groupName=a+b",
    "https://api.github.com/orgs/acme/actions/runners/registration-token",
    "https://HOST.Example.COM:443/x?",
    "https://h/p/?a=1&b=:@/?",
    "http://h:80/",
    # Shapes httpx must parse: escapes, spaces, dot segments, user info, fragments, no path,
    # non-ASCII.
    "http://127.0.0.1:5/a?x=%20",
    "http://127.0.0.1:5/a b?x=1",
    "http://127.0.0.1:5/a/b/../c?x=1",
    "http://127.0.0.1:5/a/./c",
    "http://user:pw@h/x",
    "http://h/x#frag",
    "http://h",
    "http://h/caf\u00e9?q=\u00e9",
    "http://h/[x]",
)


def facts(url: httpx.URL) -> tuple[Any, ...]:
    return (
        str(url),
        url.raw_path,
        url.scheme,
        url.host,
        url.port,
        url.netloc,
        url.path,
        url.query,
        url.fragment,
        url.userinfo,
    )


@pytest.mark.parametrize("url", URLS)
def test_parse_url_gives_httpx_url(url: str) -> None:
    assert facts(parse_url(url)) == facts(httpx.URL(url))
    assert parse_url(url) == httpx.URL(url)


def test_the_package_s_urls_skip_the_parse_with_the_httpx_releases_it_supports() -> None:
    if not httpx.__version__.startswith(("0.27.", "0.28.")):
        pytest.skip(f"httpx {httpx.__version__}: whether the short way holds is checked at import")
    assert _request._SHORT_WAY
    assert _request._fast_url(URLS[0]) is not None
    assert _request._fast_url("http://127.0.0.1:5/a/b/../c") is None  # httpx's parse, then


def facts_of(request: httpx.Request) -> tuple[Any, ...]:
    return (
        request.method,
        facts(request.url),
        request.headers.raw,
        request.content,
        request.extensions,
        type(request.stream),
    )


HEADERS: tuple[dict[str, str], ...] = (
    {},
    {"Authorization": "Bearer t", "Content-Type": "application/json", "User-Agent": "ua/1"},
    {"accept": "text/plain", "USER-AGENT": "other"},
    {"Host": "elsewhere:1"},
    {"Content-Length": "7"},
    {"Transfer-Encoding": "chunked"},
)


@pytest.mark.parametrize(
    ("method", "headers", "content"),
    [
        (method, headers, content)
        for method, headers, content in itertools.product(
            ("GET", "POST", "post", "PUT", "PATCH", "DELETE"),
            HEADERS,
            (None, b"", b'{"name":"runner"}'),
        )
        # A Content-Length that is not the body's length is not a request anyone builds.
        if "Content-Length" not in headers or content == b'{"name":"runner"}'
    ],
)
@pytest.mark.anyio
async def test_build_request_gives_httpx_request(
    method: str, headers: dict[str, str], content: bytes | None
) -> None:
    async with httpx.AsyncClient(
        headers={"User-Agent": "outrunner/test", "X-Extra": "1"},
        timeout=httpx.Timeout(5.0, read=60.0),
    ) as client:
        for url in URLS:
            ours = build_request(client, method, url, headers=headers, content=content)
            theirs = client.build_request(method, url, headers=headers, content=content)
            assert facts_of(ours) == facts_of(theirs), url


@pytest.mark.parametrize(
    "options",
    [
        {"cookies": {"session": "x"}},
        {"params": {"a": "1"}},
        {"base_url": "https://base.example/root/"},
    ],
)
@pytest.mark.anyio
async def test_a_client_with_cookies_parameters_or_a_base_url_gets_httpx_s_build(
    options: dict[str, Any],
) -> None:
    async with httpx.AsyncClient(**options) as client:
        url = "https://h/_apis/x?api-version=1" if "base_url" not in options else "_apis/x"
        ours = build_request(client, "POST", url, headers={"A": "b"}, content=b"{}")
        theirs = client.build_request("POST", url, headers={"A": "b"}, content=b"{}")
        assert facts_of(ours) == facts_of(theirs)


@pytest.mark.anyio
async def test_a_built_request_goes_over_the_wire_as_httpx_s_does() -> None:
    """The same request through httpx's own transport: the server sees one body and the
    headers it would see from httpx's build."""
    seen: list[tuple[str, str, dict[str, str], bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, str(request.url), dict(request.headers), request.content))
        return httpx.Response(204)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        url = URLS[2]
        await client.send(build_request(client, "POST", url, headers={"A": "1"}, content=b"{}"))
        await client.send(client.build_request("POST", url, headers={"A": "1"}, content=b"{}"))
    assert seen[0] == seen[1]
    assert seen[0][3] == b"{}"
