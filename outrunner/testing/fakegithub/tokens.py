"""Random secrets and the unsigned-but-well-formed JWTs the fake hands out and accepts.

No crypto dependency: the admin token only has to *parse* like a JWT (the client reads ``exp``
without verifying the signature, docs/protocol.md §2.4), so its signature is random bytes.
:func:`check_app_jwt` checks a GitHub App JWT's structure and the claims GitHub checks (``iss``,
``iat``, ``exp`` at most 10 minutes ahead); the RS256 signature is verified in
:mod:`.apps`, with PyJWT, for Apps registered with their public key.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

# GitHub rejects App JWTs that live longer than 10 minutes; allow the usual clock-drift slack.
_APP_JWT_MAX_LIFETIME = 600.0
_CLOCK_SKEW = 60.0


def new_secret(prefix: str = "", nbytes: int = 24) -> str:
    """A URL-safe random token, optionally prefixed like GitHub's (``ghs_`` for installations)."""
    return prefix + secrets.token_urlsafe(nbytes)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def make_jwt(claims: Mapping[str, object]) -> str:
    """An RS256-labelled JWT with the given claims and a random (meaningless) signature."""
    header = {"alg": "RS256", "typ": "JWT"}
    parts = [
        _b64url(json.dumps(header, separators=(",", ":")).encode()),
        _b64url(json.dumps(dict(claims), separators=(",", ":")).encode()),
        _b64url(secrets.token_bytes(256)),
    ]
    return ".".join(parts)


def make_admin_token(ttl: float, *, now: float | None = None) -> tuple[str, float]:
    """An admin token for the Actions service and its expiry (epoch seconds)."""
    issued = time.time() if now is None else now
    expires = issued + ttl
    claims = {
        "iss": "outrunner-fakegithub",
        "aud": "actions",
        "iat": int(issued),
        "nbf": int(issued),
        "exp": int(expires),
        "jti": secrets.token_hex(8),
    }
    return make_jwt(claims), expires


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Header and claims of a compact JWT, without verifying anything; None if malformed."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header = json.loads(_b64url_decode(parts[0]))
        claims = json.loads(_b64url_decode(parts[1]))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return header, claims


def check_app_jwt(token: str, *, client_id: str | None, now: float | None = None) -> str | None:
    """Why GitHub would refuse this App JWT, or None when it would accept it (signature aside)."""
    decoded = decode_jwt(token)
    if decoded is None:
        return "A JSON web token could not be decoded"
    header, claims = decoded
    if header.get("alg") != "RS256":
        return "'alg' must be RS256"
    current = time.time() if now is None else now
    iat, exp, iss = claims.get("iat"), claims.get("exp"), claims.get("iss")
    # bool is an int subclass; a JSON true is not a NumericDate.
    if not isinstance(iat, int | float) or isinstance(iat, bool):
        return "'iat' claim is missing or not a number"
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return "'exp' claim is missing or not a number"
    if iss is None or isinstance(iss, bool) or not isinstance(iss, str | int):
        return "'iss' claim is missing"
    if iat > current + _CLOCK_SKEW:
        return "'Issued at' claim ('iat') must be an Integer representing a time in the past"
    if exp <= current:
        return (
            "'Expiration time' claim ('exp') must be a numeric value representing the future time"
        )
    if exp - iat > _APP_JWT_MAX_LIFETIME + _CLOCK_SKEW or (
        exp > current + _APP_JWT_MAX_LIFETIME + _CLOCK_SKEW
    ):
        return "'Expiration time' claim ('exp') is too far in the future"
    if client_id is not None and str(iss) != client_id:
        return "Integration not found"
    return None
