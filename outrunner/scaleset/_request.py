"""Building the client's requests: what ``httpx.AsyncClient.build_request`` gives, for less.

Every API request of the package is built from an absolute URL that ``urls.py`` wrote (its path
cleaned, its query encoded) and three or four headers. httpx's ``build_request`` parses that URL
character by character, merges the client's default headers through two ``Headers`` copies and
checks the client's cookies, base URL and parameters: 0.12 ms of CPU per request on the
reference machine, and a tenth of outrunner's samples in a profile of 1,000 runners
(``docs/performance.md``). This builds the same request in about 0.03 ms.

:func:`build_request` gives the same request (method, URL, headers in httpx's order, body,
timeout extension) for a client with no base URL, parameters or cookies, which is what
``_transport.py`` makes; any other client gets ``client.build_request``. :func:`parse_url` gives
``httpx.URL(url)``, and for a URL whose path and query hold only characters httpx leaves as
they are, skips the parse: the scheme and authority are parsed once per origin and the path and
query taken as they stand. That uses httpx's private parse result (``URL._uri_reference``,
present from 0.23 to 0.28); checked at import, and without it every URL is parsed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import httpx

__all__ = ["build_request", "parse_url"]

# The characters httpx's urlparse keeps as they are in a path (unreserved, sub-delims, ":@/")
# and a query (the same and "?"); "%" is left out, so an escape is never second-guessed.
_PLAIN = re.compile(r"(/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*)(?:\?([A-Za-z0-9\-._~!$&'()*+,;=:@/?]*))?")
# A "." or ".." segment, which httpx's parse removes.
_DOT_SEGMENT = re.compile(r"/\.\.?(?:/|$)")
_ORIGINS_KEPT = 64
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_LENGTH_HEADERS = frozenset({b"content-length", b"transfer-encoding"})

_origins: dict[str, Any] = {}


def _origin_reference(origin: str) -> Any:
    """httpx's parse of ``origin`` (``scheme://authority``), kept for the next URL on it."""
    reference = _origins.get(origin)
    if reference is None:
        reference = httpx.URL(origin + "/")._uri_reference
        if len(_origins) >= _ORIGINS_KEPT:
            _origins.clear()
        _origins[origin] = reference
    return reference


def _fast_url(url: str) -> httpx.URL | None:
    """``httpx.URL(url)`` without the parse, or None when ``url`` needs httpx's parse."""
    scheme_end = url.find("://")
    if scheme_end <= 0:
        return None
    path_start = url.find("/", scheme_end + 3)
    if path_start < 0:
        return None
    plain = _PLAIN.fullmatch(url, path_start)
    if plain is None:
        return None
    path, query = plain.group(1), plain.group(2)
    if _DOT_SEGMENT.search(path) is not None:
        return None
    origin = url[:path_start]
    if "@" in origin:  # user info: rare, and httpx quotes it
        return None
    reference = _origin_reference(origin)._replace(path=path, query=query, fragment=None)
    made: httpx.URL = httpx.URL.__new__(httpx.URL)
    made._uri_reference = reference
    return made


def _works() -> bool:
    """True when httpx's URL keeps its parse as this module expects: the short way then gives
    what httpx's parse gives, for a URL of each shape the package sends."""
    probes = (
        "https://api.example.com:8443/_apis/runtime/runnerscalesets/7?api-version=6.0-preview",
        "http://127.0.0.1:1/tenant/x/_apis/pools/0/agents?agentName=a+b:c&api-version=6.0",
        "https://[::1]:8080/runnergroups/?api-version=6.0-preview",
        "https://h/p?",
    )

    def facts(url: httpx.URL) -> tuple[object, ...]:
        return (str(url), url.raw_path, url.host, url.port, url.query)

    try:
        for probe in probes:
            fast = _fast_url(probe)
            if fast is None or facts(fast) != facts(httpx.URL(probe)):
                return False
    except Exception:  # a release that keeps its parse differently
        return False
    finally:
        _origins.clear()
    return True


_SHORT_WAY = (
    isinstance(getattr(httpx.URL("https://a/"), "_uri_reference", None), tuple) and _works()
)


def parse_url(url: str) -> httpx.URL:
    """``httpx.URL(url)``, skipping the parse where that gives the same URL."""
    if _SHORT_WAY:
        made = _fast_url(url)
        if made is not None:
            return made
    return httpx.URL(url)


def build_request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    content: bytes | None = None,
) -> httpx.Request:
    """``client.build_request(method, url, headers=headers, content=content)``, for less."""
    if client.cookies or client.params or client.base_url.raw_path != b"/" or client.base_url.host:
        return client.build_request(method, url, headers=headers, content=content)
    method = method.upper()
    target = parse_url(url)
    extra = httpx.Headers(headers)
    # httpx's merge: the client's headers less those the request sets, then the request's.
    replaced = {key.lower() for key, _ in extra.raw}
    merged = [(k, v) for k, v in client.headers.raw if k.lower() not in replaced] + extra.raw
    # What httpx.Request adds for ``content=``: Host first, then Content-Length (last, or
    # first as 0 for an empty POST, PUT or PATCH), unless the headers have them already.
    names = {key.lower() for key, _ in merged}
    first: list[tuple[bytes, bytes]] = []
    if b"host" not in names and target.host:
        first.append((b"Host", target.netloc))
    body = content or b""
    if body and b"content-length" not in names:
        merged.append((b"Content-Length", str(len(body)).encode("ascii")))
    elif not body and method in _WITH_BODY and not names & _LENGTH_HEADERS:
        first.append((b"Content-Length", b"0"))
    # ``stream=`` takes the headers as given (no second pass over them); read() loads the body
    # as ``content=`` does.
    request = httpx.Request(
        method,
        target,
        headers=first + merged,
        stream=httpx.ByteStream(body),
        extensions={"timeout": client.timeout.as_dict()},
    )
    request.read()
    return request
