"""Credentials of the GitHub REST side: PAT and installation tokens, registration tokens, and
the admin tokens runner-registration exchanges them for.

Independent of the Actions-side model, so it has its own lock.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from outrunner.testing.fakegithub import tokens
from outrunner.testing.fakegithub.apps import FakeApp, load_public_key

# GitHub's registration and installation tokens live one hour.
_GITHUB_TOKEN_TTL = 3600.0


class Credentials:
    def __init__(
        self,
        *,
        pat: str | None,
        owner: str,
        repo: str | None,
        admin_token_ttl: float,
        installation_token_ttl: float = _GITHUB_TOKEN_TTL,
    ):
        self._pat = pat
        self._owner = owner
        self._repo = repo
        self._admin_token_ttl = admin_token_ttl
        self._installation_token_ttl = installation_token_ttl
        self._lock = threading.Lock()
        self._admin_tokens: dict[str, float] = {}
        self._registration_tokens: dict[str, tuple[float, str]] = {}
        self._installation_tokens: dict[str, float] = {}
        self._apps: dict[int, FakeApp] = {}  # by installation id
        self._suspended: set[int] = set()
        self._revoked = False

    def add_app(self, app: FakeApp) -> None:
        load_public_key(app.public_key_pem)  # a bad key fails here, not at the first request
        with self._lock:
            if app.installation_id in self._apps:
                raise ValueError(f"installation {app.installation_id} is already registered")
            self._apps[app.installation_id] = app

    def apps(self) -> list[FakeApp]:
        with self._lock:
            return list(self._apps.values())

    def installation_status(self, app: FakeApp, installation_id: int) -> int:
        """201 when ``app`` may get a token for the installation, 404 when the installation is
        not its (or does not exist), 403 when it is suspended."""
        with self._lock:
            if self._apps.get(installation_id) != app:
                return 404
            return 403 if installation_id in self._suspended else 201

    def suspend_installation(self, installation_id: int, suspended: bool = True) -> None:
        with self._lock:
            if installation_id not in self._apps:
                raise KeyError(f"no App installation {installation_id}")
            if suspended:
                self._suspended.add(installation_id)
            else:
                self._suspended.discard(installation_id)

    def expire_installation_tokens(self) -> None:
        with self._lock:
            for token in self._installation_tokens:
                self._installation_tokens[token] = 0.0

    def scope_exists(self, scope: str) -> bool:
        """Whether a registration-token scope (``org``, ``org/repo``, ``enterprises/e``) is one
        the fake serves: the configured owner (and repo, if set); any enterprise."""
        parts = scope.split("/")
        if parts[0] == "enterprises":
            return True
        if parts[0].casefold() != self._owner.casefold():
            return False
        repo = self._repo
        return len(parts) == 1 or repo is None or parts[1].casefold() == repo.casefold()

    def bearer_valid(self, token: str) -> bool:
        """A PAT or installation token good for the registration-token call."""
        with self._lock:
            if self._revoked:
                return False
            if token in self._installation_tokens:
                return self._installation_tokens[token] > time.time()
            if self._pat is None:
                return bool(token)
            return token == self._pat

    def issue_installation_token(self) -> tuple[str, datetime]:
        with self._lock:
            token = tokens.new_secret("ghs_", 27)
            ttl = self._installation_token_ttl
            self._installation_tokens[token] = time.time() + ttl
            return token, _expiry(ttl)

    def issue_registration_token(self, scope: str) -> tuple[str, datetime]:
        with self._lock:
            token = tokens.new_secret("AR", 24)
            self._registration_tokens[token] = (time.time() + _GITHUB_TOKEN_TTL, scope)
            return token, _expiry(_GITHUB_TOKEN_TTL)

    def registration_scope(self, token: str) -> str | None:
        """The scope a valid registration token was issued for, or None."""
        with self._lock:
            entry = self._registration_tokens.get(token)
            if entry is None or entry[0] <= time.time():
                return None
            return entry[1]

    def issue_admin_token(self) -> str:
        with self._lock:
            token, expires = tokens.make_admin_token(self._admin_token_ttl)
            self._admin_tokens[token] = expires
            return token

    def admin_token_valid(self, token: str) -> bool:
        with self._lock:
            expires = self._admin_tokens.get(token)
            return expires is not None and expires > time.time()

    def expire_admin_tokens(self) -> None:
        with self._lock:
            for token in self._admin_tokens:
                self._admin_tokens[token] = 0.0

    def revoke(self) -> None:
        """The PAT (or App installation) is revoked: nothing it issued works any more."""
        with self._lock:
            self._revoked = True
            self._installation_tokens.clear()
        self.expire_admin_tokens()


def _expiry(ttl: float) -> datetime:
    return datetime.fromtimestamp(int(time.time() + ttl), UTC)
