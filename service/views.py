"""Conversion of job records to their public JSON views, with links."""

from __future__ import annotations

from typing import Any

from fimntk.contract.schemas import (
    JobLinks,
    JobPublic,
    OperationResult,
    Progress,
    ResultPublic,
    TensorRef,
)
from fimntk.core.storage.records import JobRecord


def artifact_href(job_id: str, name: str) -> str:
    """Download link of an artifact."""
    return f"/v1/jobs/{job_id}/artifacts/{name}"


def job_public(record: JobRecord, progress: dict[str, Any] | None) -> JobPublic:
    """The public view of a job.

    Args:
        record: The job record.
        progress: Progress to show (live from RQ while running, else the stored one).
    """
    base = f"/v1/jobs/{record.id}"
    return JobPublic(
        id=record.id,
        status=record.status,  # type: ignore[arg-type]
        owner=record.owner_id,
        metric=record.metric,
        representation=record.representation,
        model=record.model_digest,
        dataset=record.dataset,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        progress=Progress(**(progress or {})),
        timings=record.timings or {},
        error=record.error,  # type: ignore[arg-type]
        kept=record.kept,
        reused_from=record.reuse_job_id,
        labels=record.labels,
        step=record.step,
        spec=record.spec,
        links=JobLinks(self=base, result=f"{base}/result", cancel=f"{base}/cancel"),
    )


def result_public(record: JobRecord) -> ResultPublic:
    """The public view of a succeeded job's result.

    The worker stores tensors as ``{"artifact": name, "shape": [...], "dtype": ...}``; they
    become :class:`TensorRef` links here.
    """
    assert record.result is not None
    operations = []
    for entry in record.result["operations"]:
        outputs: dict[str, float | str | TensorRef] = {}
        for name, value in entry["outputs"].items():
            if isinstance(value, dict):
                outputs[name] = TensorRef(
                    name=value["artifact"],
                    shape=value["shape"],
                    dtype=value["dtype"],
                    href=artifact_href(record.id, value["artifact"]),
                )
            else:
                outputs[name] = value
        operations.append(OperationResult(index=entry["index"], op=entry["op"], outputs=outputs))
    kept = record.result.get("representation_artifact")
    return ResultPublic(
        job_id=record.id,
        metric=record.metric,
        representation=record.representation,
        reused_from=record.result.get("reused_from"),
        operations=operations,
        representation_artifact=artifact_href(record.id, kept) if kept else None,
    )
