"""Which store implementations a deployment uses, chosen from its settings."""

from __future__ import annotations

from pathlib import Path

from fimntk.core.config import Settings
from fimntk.core.storage.artifacts import ArtifactStore, LocalArtifactStore


def open_artifact_store(settings: Settings) -> ArtifactStore:
    """The artifact store the settings name: S3 for ``s3://`` URLs, else the data directory."""
    url = settings.artifact_url
    if url and url.startswith("s3://"):
        from fimntk.core.storage.s3 import S3ArtifactStore  # boto3 only where S3 is used

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return S3ArtifactStore(
            bucket, prefix, settings.data_dir / "artifact-cache", settings.s3_endpoint_url or None
        )
    if url:
        return LocalArtifactStore(Path(url.removeprefix("file://")))
    return LocalArtifactStore(settings.artifacts_dir)
