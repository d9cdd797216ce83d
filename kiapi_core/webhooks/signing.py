"""Standard Webhooks signatures (https://www.standardwebhooks.com) and the secrets that make them.

Each delivery carries ``webhook-id`` (the same on every attempt of one delivery),
``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``: ``v1,<base64
HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed with the base64-decoded part of a ``whsec_``
secret after the prefix; one signature per secret, space-separated, while secrets rotate.

The secrets: ``KIAPI_WEBHOOK_SECRET`` (one or more, newest first, comma- or space-separated),
else the file ``KIAPI_HOME/webhook_secrets`` (0600, one a line, newest first), generated at
first use so receivers keep verifying across restarts; ``kiapi webhooks rotate`` puts a new one
first and keeps the previous one signing until ``kiapi webhooks rotate --drop-old``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path

PREFIX = "whsec_"
SECRETS_FILE = "webhook_secrets"
# What is sent while rotating: the newest and the previous one (receivers switch in between).
KEEP_ON_ROTATE = 2


class BadSecret(ValueError):
    """A secret that is not ``whsec_`` + base64 of at least 24 bytes."""


def generate() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def key_of(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; BadSecret naming the rule."""
    if not secret.startswith(PREFIX):
        raise BadSecret("a webhook secret must start with whsec_ (kiapi webhooks rotate makes one)")
    try:
        key = base64.b64decode(secret[len(PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise BadSecret("a webhook secret must be whsec_ followed by base64") from None
    if len(key) < 24:
        raise BadSecret("a webhook secret must hold at least 24 random bytes")
    return key


def split_secrets(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part]


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def sign(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: one ``v1,...`` per key, space-separated."""
    return " ".join(signature(k, msg_id, timestamp, body) for k in keys)


def mask(secret: str) -> str:
    return f"{PREFIX}…{secret[-4:]}" if len(secret) > len(PREFIX) + 8 else "***"


class SecretKeeper:
    """The signing secrets, newest first: from the setting, else from the file (made once)."""

    def __init__(self, home: Path, configured: str | None) -> None:
        self.path = home / SECRETS_FILE
        self.configured = split_secrets(configured) if configured else None
        self._lock = threading.Lock()
        self._cache: tuple[float, list[str]] | None = None
        for secret in self.configured or []:
            key_of(secret)  # a bad setting is refused at start, not at the first delivery

    def secrets(self) -> list[str]:
        if self.configured:
            return list(self.configured)
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime
            except FileNotFoundError:
                self._write([generate()])
                mtime = self.path.stat().st_mtime
            if self._cache is None or self._cache[0] != mtime:
                found = split_secrets(self.path.read_text())
                self._cache = (mtime, found or [])
            return list(self._cache[1])

    def keys(self) -> list[bytes]:
        return [key_of(s) for s in self.secrets()]

    def rotate(self, drop_old: bool = False) -> list[str]:
        """Put a new secret first, the previous one still signing beside it; ``drop_old``
        instead ends a rotation: only the newest is kept."""
        if self.configured:
            raise BadSecret(
                "KIAPI_WEBHOOK_SECRET is set: rotate by putting a new secret before the old one"
                " in it (comma-separated), then dropping the old one"
            )
        with self._lock:
            old = split_secrets(self.path.read_text()) if self.path.exists() else []
            new = (
                (old[:1] or [generate()]) if drop_old else [generate(), *old[: KEEP_ON_ROTATE - 1]]
            )
            self._write(new)
            self._cache = None
            return new

    def _write(self, values: list[str]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(values) + "\n")
        os.replace(tmp, self.path)
