"""Content-addressed blob files behind the :class:`BlobStore` interface.

A blob lives at ``<root>/sha256/<hex>``. An upload is hashed while it is written to a temporary
file in ``<root>/tmp``; only when the size cap held and the digest matched is it renamed into
place (atomic on one filesystem), so a failed upload leaves nothing behind and memory stays
flat whatever the size.
"""

from __future__ import annotations

import abc
import errno
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from service.errors import (
    BadRequestError,
    InvalidInputError,
    PayloadTooLargeError,
    StorageFullError,
)

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(digest: str, field: str = "digest") -> str:
    """Validate a ``sha256:<64 lowercase hex>`` digest.

    Args:
        digest: Digest to check.
        field: Field reported on error.

    Returns:
        The digest.

    Raises:
        InvalidInputError: The digest is malformed.
    """
    if not DIGEST_RE.match(digest):
        raise InvalidInputError("digest must be 'sha256:' followed by 64 lowercase hex", field)
    return digest


class BlobStore(abc.ABC):
    """Immutable blobs addressed by their SHA-256 digest."""

    @abc.abstractmethod
    def path(self, digest: str) -> Path:
        """Local path of a held blob (the worker reads blobs through it)."""

    @abc.abstractmethod
    def exists(self, digest: str) -> bool:
        """Whether the blob is held."""

    @abc.abstractmethod
    async def write(self, digest: str, chunks: AsyncIterator[bytes], max_bytes: int) -> int:
        """Store a streamed body under ``digest`` after checking size and digest.

        Args:
            digest: Claimed digest of the body.
            chunks: The body.
            max_bytes: Size cap.

        Returns:
            The size in bytes.

        Raises:
            PayloadTooLargeError: The body exceeds ``max_bytes``.
            BadRequestError: The body's digest differs from ``digest``.
        """


    @abc.abstractmethod
    def check_ready(self, min_free_bytes: int) -> str | None:
        """Why the store cannot take uploads (not writable, too little free space), or
        ``None`` when it can."""


class LocalBlobStore(BlobStore):
    """Blobs in a local (or shared network) directory.

    Args:
        root: Directory of the store.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / check_digest(digest).removeprefix("sha256:")

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def check_ready(self, min_free_bytes: int) -> str | None:
        from service.storage.artifacts import free_space_problem

        return free_space_problem(self.root / "tmp", min_free_bytes)

    async def write(self, digest: str, chunks: AsyncIterator[bytes], max_bytes: int) -> int:
        target = self.path(digest)
        hasher = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp", prefix="upload-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLargeError(
                            f"upload exceeds the limit of {max_bytes} bytes", "body"
                        )
                    hasher.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            actual = f"sha256:{hasher.hexdigest()}"
            if actual != digest:
                raise BadRequestError(
                    f"body has digest {actual}, not the {digest} named in the URL", "digest"
                )
            os.replace(tmp, target)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(
                    "no space left to store the upload; ask the admin to free space", "body"
                ) from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return size
