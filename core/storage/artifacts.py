"""Job artifacts (result tensors, kept representations) behind :class:`ArtifactStore`.

An artifact is a safetensors file ``<job id>/<name>.safetensors``: in a local (or network)
directory with :class:`LocalArtifactStore`, or in an S3-compatible bucket shared by workers on
several boxes with :class:`fimntk.core.storage.s3.S3ArtifactStore`;
:func:`fimntk.core.storage.stores.open_artifact_store` picks one from the settings. Writers
produce a temporary local file and publish it with :meth:`ArtifactStore.publish` (a rename, or
one PUT), so readers never see a half-written file.
"""

from __future__ import annotations

import abc
import os
import re
import shutil
import uuid
from pathlib import Path

from fimntk.core.errors import NotFoundError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ArtifactStore(abc.ABC):
    """Files produced by jobs."""

    @abc.abstractmethod
    def staging_path(self, job_id: str, name: str) -> Path:
        """A temporary path to write an artifact to before publishing it."""

    @abc.abstractmethod
    def publish(self, job_id: str, name: str, staged: Path) -> None:
        """Move a staged file into place atomically."""

    @abc.abstractmethod
    def path(self, job_id: str, name: str) -> Path:
        """Local path of a published artifact.

        Raises:
            NotFoundError: No such artifact.
        """

    @abc.abstractmethod
    def delete_job(self, job_id: str) -> None:
        """Remove every artifact of a job (staged ones included)."""

    @abc.abstractmethod
    def check_ready(self, min_free_bytes: int) -> str | None:
        """Why the store cannot take new artifacts (not writable, too little free space), or
        ``None`` when it can."""


def free_space_problem(directory: Path, min_free_bytes: int) -> str | None:
    """Whether ``directory`` is writable and has ``min_free_bytes`` free; why not, else None."""
    probe = directory / f".probe-{uuid.uuid4().hex}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        return f"{directory} is not writable: {exc}"
    if free < min_free_bytes:
        return f"{directory} has {free} bytes free, fewer than the {min_free_bytes} required"
    return None


class LocalArtifactStore(ArtifactStore):
    """Artifacts in a local (or shared network) directory.

    Args:
        root: Directory of the store.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _dir(self, job_id: str) -> Path:
        if not NAME_RE.match(job_id):
            raise NotFoundError(f"no job {job_id!r}", "job_id")
        return self.root / job_id

    def staging_path(self, job_id: str, name: str) -> Path:
        directory = self._dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f".{name}.tmp-{os.getpid()}"

    def publish(self, job_id: str, name: str, staged: Path) -> None:
        os.replace(staged, self._dir(job_id) / f"{name}.safetensors")

    def path(self, job_id: str, name: str) -> Path:
        if not NAME_RE.match(name):
            raise NotFoundError(f"no artifact {name!r}", "name")
        target = self._dir(job_id) / f"{name}.safetensors"
        if not target.is_file():
            raise NotFoundError(f"no artifact {name!r} for job {job_id}", "name")
        return target

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self._dir(job_id), ignore_errors=True)

    def check_ready(self, min_free_bytes: int) -> str | None:
        return free_space_problem(self.root, min_free_bytes)
