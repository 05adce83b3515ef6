"""Bearer-token checks: an admin token for adapter management, API keys for inference.

Tokens come from settings (flag/env) and from mounted secret files; a file is re-read
when its mtime changes, so a rotated Kubernetes Secret takes effect without a restart.
Comparisons use hmac.compare_digest against every configured token (no early exit on the
first match), so timing reveals neither a token nor which one matched.

Management is never open by default: with no admin token configured (and not --insecure)
the server generates one at start and keeps it in `<adapters_dir>/.admin-token` (0600),
because any web page the user opens can POST a multipart form to 127.0.0.1 without a
preflight (CSRF, DNS rebinding). In that same zero-config mode the listener also refuses
Host headers that are not loopback names, which stops DNS rebinding from reading answers.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
from pathlib import Path

from server.config import Settings
from server.errors import Forbidden, Unauthorized

logger = logging.getLogger(__name__)

CHALLENGE = {"WWW-Authenticate": "Bearer"}
ADMIN_TOKEN_FILE = ".admin-token"  # dot name: the adapter store never reads it as an adapter


def load_or_create_admin_token(path: Path) -> tuple[str, bool]:
    """The token kept in `path`, made (random, 0600) if absent; True when made now.

    Replicas sharing a store may start together: the token is written to a private temp
    file and hard-linked into place, so exactly one wins and nobody reads a half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = ""
    if token:
        if path.stat().st_mode & 0o077:
            logger.warning("admin token file %s is readable by others; making it 0600", path)
            path.chmod(0o600)
        return token, False
    token = secrets.token_urlsafe(32)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(token + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return path.read_text(encoding="utf-8").strip(), False
    finally:
        temporary.unlink(missing_ok=True)
    return token, True


def is_loopback_host(host: str) -> bool:
    """A Host header value (with or without port) that names this machine's loopback."""
    if host.startswith("["):  # [::1]:8000
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


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
        configured = bool(self._admin) or settings.admin_token_file is not None
        # Zero-config mode: a generated token guards management (and Host names are checked).
        self.generated_token_path = (
            None if configured or settings.insecure else settings.adapters_dir / ADMIN_TOKEN_FILE
        )
        self._generated: tuple[bytes, ...] = ()
        self.admin_required = configured or self.generated_token_path is not None
        self.keys_required = bool(self._keys) or settings.api_keys_file is not None

    def prepare(self) -> None:
        """At start: make or read the generated admin token and say where it is."""
        if self.generated_token_path is None or self._generated:
            return
        token, made = load_or_create_admin_token(self.generated_token_path)
        self._generated = (token.encode(),)
        logger.warning("no admin token configured: adapter management needs the token %s %s "
                       "(send `Authorization: Bearer $(cat %s)`)",
                       "generated in" if made else "kept in", self.generated_token_path, self.generated_token_path)

    def admin_tokens(self) -> tuple[bytes, ...]:
        # A second listener (admin port) shares the file but not this object: read it on first use.
        self.prepare()
        return self._admin + self._admin_file.tokens() + self._generated

    def api_keys(self) -> tuple[bytes, ...]:
        return self._keys + self._keys_file.tokens()

    def check_admin(self, authorization: str | None) -> None:
        """Open only with --insecure and no token (cli.check_exposure keeps that on loopback)."""
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
