"""Where a sharded job keeps its plan and its tasks' outputs: the shared artifact store, in the
job's shard namespace (:func:`fimntk.core.shards.namespace`), one artifact per task keyed
(job, stage, task), written whole or not at all (staged, then published).

A reader of a stage's outputs refuses a partial set: a missing output or a shard whose count is
not its range's size raises :class:`IncompleteShardsError`, so no result is ever made from some
of the shards.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fimntk.contract.vocabulary import JobStatus
from fimntk.core.errors import NotFoundError
from fimntk.core.shards import PLAN, namespace, output_name
from fimntk.engine import partials
from fimntk.worker.runner import JobRunner


class IncompleteShardsError(RuntimeError):
    """A reduce found fewer partials (or examples) than its plan: no result is made."""


def write_plan(runner: JobRunner, job_id: str, plan: dict[str, Any]) -> None:
    store = runner.artifacts
    staged = store.staging_path(namespace(job_id), PLAN)
    try:
        save_file({}, str(staged), metadata={"plan": json.dumps(plan)})
        store.publish(namespace(job_id), PLAN, staged)
    finally:
        staged.unlink(missing_ok=True)


def read_plan(runner: JobRunner, job_id: str) -> dict[str, Any]:
    path = runner.artifacts.path(namespace(job_id), PLAN)
    with safe_open(str(path), framework="pt") as f:
        return dict(json.loads((f.metadata() or {})["plan"]))


def has_output(runner: JobRunner, job_id: str, stage: int, index: int) -> bool:
    try:
        runner.artifacts.path(namespace(job_id), output_name(stage, index))
    except NotFoundError:
        return False
    return True


def _publish(runner: JobRunner, job_id: str, stage: int, index: int, write: Any) -> None:
    """Stage and publish one task's output; if the job ended meanwhile (a sibling task failed,
    or a cancel), remove the namespace again: its end's cleanup may have run before this
    publish, and nothing would ever read what it wrote."""
    store = runner.artifacts
    name = output_name(stage, index)
    staged = store.staging_path(namespace(job_id), name)
    try:
        write(staged)
        store.publish(namespace(job_id), name, staged)
    finally:
        staged.unlink(missing_ok=True)
        record = runner.records.get_job(job_id)
        if record is None or record.status != JobStatus.RUNNING:
            store.delete_job(namespace(job_id))


def save_partial(
    runner: JobRunner, job_id: str, stage: int, index: int, part: partials.Partial
) -> None:
    _publish(runner, job_id, stage, index, lambda path: partials.save_partial(part, path))


def save_tensors(
    runner: JobRunner,
    job_id: str,
    stage: int,
    index: int,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _publish(
        runner,
        job_id,
        stage,
        index,
        lambda path: save_file(cpu, str(path), metadata={"meta": json.dumps(meta)}),
    )


def load_tensors(
    runner: JobRunner, job_id: str, stage: int, index: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = output_path(runner, job_id, stage, index)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118


def output_path(runner: JobRunner, job_id: str, stage: int, index: int) -> Any:
    try:
        return runner.artifacts.path(namespace(job_id), output_name(stage, index))
    except NotFoundError as exc:
        raise IncompleteShardsError(
            f"the output of stage {stage} task {index} is missing: no result is made from a "
            "partial set of shards"
        ) from exc


def all_partials(
    runner: JobRunner, job_id: str, stage: int, plan: dict[str, Any]
) -> partials.Partial:
    """Every shard's partial of a stage, added in shard order; refuses a partial set."""
    shard_bounds = plan["bounds"]
    parts = []
    for index in range(len(shard_bounds) - 1):
        part = partials.load_partial(output_path(runner, job_id, stage, index))
        expected = shard_bounds[index + 1] - shard_bounds[index]
        if part.count != expected:
            raise IncompleteShardsError(
                f"shard {index} of stage {stage} summed {part.count} examples, not {expected}"
            )
        parts.append(part)
    return partials.add_partials(parts)
