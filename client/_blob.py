"""Bytes to upload, in memory or in a file, addressed by their SHA-256; no torch needed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 4 << 20  # large pieces: little per-chunk overhead on both ends


@dataclass(frozen=True)
class Blob:
    """Content to upload with ``PUT /v1/blobs/{digest}``.

    Attributes:
        digest: ``sha256:<hex>`` of the content.
        size: Length in bytes.
        data: The content, when held in memory.
        path: The file holding the content, otherwise.
        owned: Whether the file is a temporary one, deleted by :meth:`discard`.
    """

    digest: str
    size: int
    data: bytes | None = None
    path: Path | None = None
    owned: bool = False

    @classmethod
    def from_bytes(cls, data: bytes) -> Blob:
        """A blob held in memory."""
        return cls("sha256:" + hashlib.sha256(data).hexdigest(), len(data), data=data)

    @classmethod
    def from_file(cls, path: Path, owned: bool = False) -> Blob:
        """A blob read from ``path``, hashed in chunks, never loaded whole."""
        sha = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                sha.update(chunk)
        return cls("sha256:" + sha.hexdigest(), path.stat().st_size, path=path, owned=owned)

    def chunks(self) -> Iterator[bytes]:
        """The content, 4 MiB at a time, read afresh on each call (so a retry can resend)."""
        if self.data is not None:
            yield self.data
            return
        assert self.path is not None
        with self.path.open("rb") as f:
            yield from iter(lambda: f.read(_CHUNK), b"")

    def discard(self) -> None:
        """Delete the temporary file, if this blob owns one."""
        if self.owned and self.path is not None:
            self.path.unlink(missing_ok=True)


def blob_of(data: bytes | str | Path) -> Blob:
    """A blob of bytes, or of the file at a path."""
    if isinstance(data, bytes):
        return Blob.from_bytes(data)
    return Blob.from_file(Path(data))
