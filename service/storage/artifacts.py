"""Job artifacts (result tensors, kept representations) behind :class:`ArtifactStore`.

An artifact is a safetensors file ``<root>/<job id>/<name>.safetensors``. Writers produce a
temporary file and publish it with :meth:`ArtifactStore.publish`, so readers never see a
half-written file.
"""

from __future__ import annotations

import abc
import os
import re
import shutil
from pathlib import Path

from service.errors import NotFoundError

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
