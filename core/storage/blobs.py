"""Content-addressed blob files behind the :class:`BlobStore` interface.

A blob lives at ``<root>/sha256/<hex>``. An upload is hashed while it is written to a temporary
file in ``<root>/tmp`` (in 1 MiB pieces, by a thread, while the next piece arrives); only when
the size cap held and the digest matched is it renamed into place (atomic on one filesystem),
so a failed upload leaves nothing behind and memory stays flat whatever the size.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fimntk.core.errors import (
    BadRequestError,
    InvalidInputError,
    PayloadTooLargeError,
    StorageFullError,
)

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
#: Bytes of the body gathered before they are hashed and written in one go.
WRITE_CHUNK = 1024 * 1024


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
        from fimntk.core.storage.artifacts import free_space_problem

        return free_space_problem(self.root / "tmp", min_free_bytes)

    async def write(self, digest: str, chunks: AsyncIterator[bytes], max_bytes: int) -> int:
        target = self.path(digest)
        size = 0
        buffer = bytearray()
        temp = _TempFile(self.root / "tmp")
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLargeError(
                        f"upload exceeds the limit of {max_bytes} bytes", "body"
                    )
                buffer += chunk
                if len(buffer) >= WRITE_CHUNK:
                    await temp.feed(buffer)
                    buffer = bytearray()
            await temp.feed(buffer)
            actual = await temp.finish()
            if actual != digest:
                raise BadRequestError(
                    f"body has digest {actual}, not the {digest} named in the URL", "digest"
                )
            temp.commit(target)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(
                    "no space left to store the upload; ask the admin to free space", "body"
                ) from exc
            raise
        finally:
            await temp.discard()
        return size


class _TempFile:
    """A temporary file that one thread of its own hashes and writes, so that the event loop
    only receives the body while the previous chunk is hashed and written (``hashlib`` and
    ``os.write`` release the GIL): at most two chunks are in memory at a time.

    Args:
        directory: Where the file is created.
    """

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(dir=directory, prefix="upload-")
        self.fd: int | None = fd
        self.path = Path(name)
        self._hasher = hashlib.sha256()
        self._committed = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-upload")
        self._last: asyncio.Future[None] | None = None

    async def feed(self, chunk: bytes | bytearray) -> None:
        """Hand ``chunk`` to the thread once it has finished the chunk before (raising what
        that one raised)."""
        if self._last is not None:
            await self._last
        if chunk:
            self._last = asyncio.get_running_loop().run_in_executor(
                self._thread, self._write, chunk
            )

    async def finish(self) -> str:
        """Wait for the writes, then fsync and close the file; its ``sha256:`` digest."""
        await self.feed(b"")
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._finish)

    def commit(self, target: Path) -> None:
        """Rename the finished file to ``target`` (atomic on one filesystem)."""
        os.replace(self.path, target)
        self._committed = True

    async def discard(self) -> None:
        """Close the file if still open and remove it unless committed, after the thread's
        last write; done even when this coroutine is cancelled."""
        cleanup = asyncio.get_running_loop().run_in_executor(self._thread, self._discard)
        self._thread.shutdown(wait=False)
        with contextlib.suppress(Exception):
            await asyncio.shield(cleanup)
            if self._last is not None and not self._last.cancelled():
                self._last.exception()  # already raised, or superseded by another error

    def _write(self, chunk: bytes | bytearray) -> None:
        assert self.fd is not None
        self._hasher.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view) :]

    def _finish(self) -> str:
        assert self.fd is not None
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        return f"sha256:{self._hasher.hexdigest()}"

    def _discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if not self._committed:
            self.path.unlink(missing_ok=True)
