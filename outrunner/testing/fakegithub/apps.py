"""GitHub Apps the fake knows: their public keys, installations, and the JWT check GitHub makes.

Verifying an App JWT's RS256 signature needs PyJWT with its crypto extra (``outrunner[app]``);
it is imported only when an App is registered, so the rest of the fake works without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from outrunner.testing.fakegithub import tokens

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

_EXTRA_HINT = "pip install 'outrunner[app]'"
UNDECODABLE = "A JSON web token could not be decoded"
UNKNOWN_APP = "Integration not found"


@dataclass(frozen=True, kw_only=True)
class FakeApp:
    """A GitHub App registered with :meth:`FakeGitHub.add_app`, installed once.

    Its JWTs must name it in ``iss`` (``client_id``, or ``app_id`` as a string or number) and be
    signed with the private key matching ``public_key_pem``.
    """

    client_id: str
    app_id: int | None
    installation_id: int
    public_key_pem: str = field(repr=False)

    def issued_by(self, iss: object) -> bool:
        """Whether a JWT ``iss`` claim names this App."""
        if isinstance(iss, bool) or not isinstance(iss, str | int):
            return False
        return str(iss) == self.client_id or (
            self.app_id is not None and str(iss) == str(self.app_id)
        )


def load_public_key(pem: str) -> RSAPublicKey:
    """Parse an App's PEM public key (SubjectPublicKeyInfo or PKCS#1); raises ``ValueError``, or
    ``ImportError`` without the ``app`` extra."""
    try:
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError as exc:
        raise ImportError(f"FakeGitHub Apps need PyJWT[crypto] ({_EXTRA_HINT})") from exc
    try:
        key = load_pem_public_key(pem.encode())
    except Exception as exc:  # ValueError, UnsupportedAlgorithm
        raise ValueError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, RSAPublicKey):
        raise ValueError("a GitHub App key must be RSA")
    return key


def generate_key_pair(bits: int = 2048) -> tuple[str, str]:
    """A new RSA key pair for a test App: ``(private_key_pem, public_key_pem)``.

    The private key is PKCS#1 (``BEGIN RSA PRIVATE KEY``), as GitHub hands it out.
    """
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError as exc:
        raise ImportError(f"FakeGitHub Apps need PyJWT[crypto] ({_EXTRA_HINT})") from exc
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private.decode(), public.decode()


def check_signed_app_jwt(
    token: str, apps: list[FakeApp], *, now: float | None = None
) -> tuple[FakeApp | None, str | None]:
    """The App a JWT comes from and why GitHub would refuse it (``None``: accepted).

    In GitHub's order: the JWT must decode, name a known App in ``iss``, carry that App's RS256
    signature, and have ``iat``/``exp`` claims GitHub accepts (:func:`tokens.check_app_jwt`).
    """
    import jwt

    decoded = tokens.decode_jwt(token)
    if decoded is None:
        return None, UNDECODABLE
    iss = decoded[1].get("iss")
    app = next((a for a in apps if a.issued_by(iss)), None)
    if app is None:
        return None, UNKNOWN_APP
    try:
        # Only the signature (JWS): the claims are checked below, with GitHub's messages, and
        # PyJWT's JWT layer would refuse a numeric iss, which GitHub accepts.
        jwt.PyJWS().decode(token, load_public_key(app.public_key_pem), algorithms=["RS256"])
    except jwt.InvalidTokenError:
        return app, UNDECODABLE
    return app, tokens.check_app_jwt(token, client_id=None, now=now)
