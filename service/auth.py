"""API keys: generated with :mod:`secrets`, stored only as their SHA-256.

Keys are 256-bit random strings, so a fast hash is enough (no password stretching needed): the
database never holds a usable key.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "fk_"


def generate_key() -> str:
    """A fresh random API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()
