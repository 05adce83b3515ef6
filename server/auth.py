"""Bearer-token checks: an admin token for adapter management, API keys for inference.

Tokens come from settings (flag/env) and from mounted secret files; a file is re-read
when its mtime changes, so a rotated Kubernetes Secret takes effect without a restart.
Comparisons use hmac.compare_digest against every configured token (no early exit on the
first match), so timing reveals neither a token nor which one matched.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from server.config import Settings
from server.errors import Forbidden, Unauthorized

logger = logging.getLogger(__name__)

CHALLENGE = {"WWW-Authenticate": "Bearer"}


class _SecretFile:
    """Tokens from a file, one per line (blank lines and # comments ignored)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._stamp: int | None = None
        self._tokens: tuple[bytes, ...] = ()

    def tokens(self) -> tuple[bytes, ...]:
        if self.path is None:
            return ()
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            # A missing secret must lock the surface, never open it: keep the last tokens.
            logger.error("token file %s is missing; keeping the last tokens read", self.path)
            return self._tokens
        if stamp != self._stamp:
            lines = self.path.read_text(encoding="utf-8").splitlines()
            self._tokens = tuple(
                line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#")
            )
            self._stamp = stamp
        return self._tokens


def _matches(presented: bytes, tokens: tuple[bytes, ...]) -> bool:
    found = False
    for token in tokens:
        found |= hmac.compare_digest(presented, token)
    return found


def bearer(header: str | None) -> bytes | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip().encode()


class Authenticator:
    def __init__(self, settings: Settings):
        self._admin = tuple(
            t.get_secret_value().encode() for t in [settings.admin_token] if t is not None
        )
        self._admin_file = _SecretFile(settings.admin_token_file)
        self._keys = tuple(k.get_secret_value().encode() for k in settings.api_keys)
        self._keys_file = _SecretFile(settings.api_keys_file)
        self.admin_required = bool(self._admin) or settings.admin_token_file is not None
        self.keys_required = bool(self._keys) or settings.api_keys_file is not None

    def admin_tokens(self) -> tuple[bytes, ...]:
        return self._admin + self._admin_file.tokens()

    def api_keys(self) -> tuple[bytes, ...]:
        return self._keys + self._keys_file.tokens()

    def check_admin(self, authorization: str | None) -> None:
        """No admin token configured = loopback-only dev mode (cli.check_exposure enforces that)."""
        if not self.admin_required:
            return
        presented = bearer(authorization)
        if presented is None:
            raise Unauthorized("adapter management needs `Authorization: Bearer <admin token>`", headers=CHALLENGE)
        if not _matches(presented, self.admin_tokens()):
            raise Forbidden("this token may not manage adapters")

    def check_inference(self, authorization: str | None) -> None:
        """The admin token is accepted too, so an operator can try what they just uploaded."""
        if not self.keys_required:
            return
        presented = bearer(authorization)
        if presented is None:
            raise Unauthorized("inference needs `Authorization: Bearer <api key>`", headers=CHALLENGE)
        # Both lists are always compared, so which one matched is not visible in the timing.
        allowed = _matches(presented, self.api_keys()) | _matches(presented, self.admin_tokens())
        if not allowed:
            raise Forbidden("unknown API key")
