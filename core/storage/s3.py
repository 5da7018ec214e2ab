"""Artifacts in an S3-compatible bucket (AWS S3, MinIO, Ceph...), shared by workers on several
boxes.

An artifact is the object ``<prefix>/<job id>/<name>.safetensors``, written with one upload of
a fully staged local file (an object appears whole or not at all). Reads go through a local
cache, since artifacts never change once published: ``path`` downloads the object once into
``<cache>/<job id>/<name>.safetensors`` (via a temporary file and a rename).
Credentials come from boto3's usual sources (``AWS_ACCESS_KEY_ID``... or an instance role).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from fimntk.core.errors import NotFoundError
from fimntk.core.storage.artifacts import NAME_RE, ArtifactStore, free_space_problem


class S3ArtifactStore(ArtifactStore):
    """Artifacts in ``s3://<bucket>/<prefix>``.

    Args:
        bucket: Bucket name (it must exist).
        prefix: Key prefix, may be empty.
        cache_dir: Local directory for staged uploads and downloaded artifacts.
        endpoint_url: Endpoint of an S3-compatible server; ``None`` for AWS.
        client: A boto3 S3 client to use instead of a new one.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        cache_dir: Path,
        endpoint_url: str | None = None,
        client: Any = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache_dir = cache_dir
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3}),
        )
        (cache_dir / "staging").mkdir(parents=True, exist_ok=True)

    def _key(self, job_id: str, name: str) -> str:
        if not NAME_RE.match(job_id):
            raise NotFoundError(f"no job {job_id!r}", "job_id")
        if not NAME_RE.match(name):
            raise NotFoundError(f"no artifact {name!r}", "name")
        key = f"{job_id}/{name}.safetensors"
        return f"{self.prefix}/{key}" if self.prefix else key

    def staging_path(self, job_id: str, name: str) -> Path:
        self._key(job_id, name)
        directory = self.cache_dir / "staging" / job_id
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f".{name}.tmp-{os.getpid()}"

    def publish(self, job_id: str, name: str, staged: Path) -> None:
        self.client.upload_file(str(staged), self.bucket, self._key(job_id, name))
        staged.unlink(missing_ok=True)

    def path(self, job_id: str, name: str) -> Path:
        key = self._key(job_id, name)
        target = self.cache_dir / job_id / f"{name}.safetensors"
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{name}.download-{uuid.uuid4().hex}")
        try:
            self.client.download_file(self.bucket, key, str(tmp))
            os.replace(tmp, target)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise NotFoundError(f"no artifact {name!r} for job {job_id}", "name") from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def delete_job(self, job_id: str) -> None:
        if not NAME_RE.match(job_id):
            return
        prefix = f"{self.prefix}/{job_id}/" if self.prefix else f"{job_id}/"
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objects:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})
        shutil.rmtree(self.cache_dir / job_id, ignore_errors=True)
        shutil.rmtree(self.cache_dir / "staging" / job_id, ignore_errors=True)

    def check_ready(self, min_free_bytes: int) -> str | None:
        probe = f"{self.prefix}/.readyz" if self.prefix else ".readyz"
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
        except (BotoCoreError, ClientError) as exc:
            return f"bucket {self.bucket} is not writable: {exc}"
        return free_space_problem(self.cache_dir, min_free_bytes)
