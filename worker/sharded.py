"""Sharded jobs on the worker side: the plan, and the tasks RQ runs (map, reduce, eigen, tiles).

A job with ``shards`` > 1 is split into fixed example ranges when a worker first takes it
(:func:`start`): ``bounds = floor(k·n/S)``, decided by the job and never by how many workers are
up, so the result is the same on one worker or forty. The plan (flow, bounds) is stored as an
artifact, the graph of tasks is put on the queue with RQ dependencies
(:class:`fimntk.core.shards.ShardTasks`), and the worker is free again. The flows:

=============  =================================================================================
flow           stages (each depends on all tasks of the stage before)
=============  =================================================================================
additive       S shard partials (dense, diag, blockdiag, quasidiag, kfac, mixed, lowrank) → final
ekfac          S KFAC partials → reduce → S eigen tasks (layers spread by cost) → S partials
               of the corrected eigenvalues (if ``update_diag``) → final
ntk            S blocks' per-layer factors → the S(S+1)/2 upper-triangle Gram tiles in groups
               of equal work → final (mirrored)
implicit       S shards of each additive operation (per product or probe) → final
=============  =================================================================================

Each task writes one artifact keyed (job, stage, index) (:mod:`fimntk.worker.shard_store`), so a
task retried after its worker was lost overwrites the same key; what each task computes is in
:mod:`fimntk.worker.shard_tasks`. The final task reads every partial of its stage, refuses a
partial set (a missing partial, or counts that do not add to n), adds them in shard order in
float64 (:mod:`fimntk.engine.partials`), runs the operations and records the result. Monte
Carlo draws of shard s in round r are seeded from (job seed, r, s); Hutchinson probes from the
operation's seed, the same on every shard (so that their values add).

CG, Lanczos and SLQ stay on one worker: each iteration needs the previous product, so every
step would be a round trip through the queue (tens of ms plus fetching the model and the
shard), which pays only when one product takes much longer — for an implicit Fisher, past
about a minute per product (a dataset of ~10⁵ examples on a GPU).
"""

from __future__ import annotations

import logging
from typing import Any

from rq import get_current_job

from fimntk.contract.vocabulary import JobStatus
from fimntk.core import logs
from fimntk.core.queue import JobQueue, done_channel
from fimntk.core.shards import (
    ShardTasks,
    bounds,
    namespace,
    resolve_shards,
    task_id,
)
from fimntk.core.storage.records import JobRecord, utcnow
from fimntk.engine import partials
from fimntk.worker.errors import JobCanceledError
from fimntk.worker.runner import JobRunner, _Progress
from fimntk.worker.shard_store import has_output, read_plan, write_plan
from fimntk.worker.shard_tasks import TASKS, examples, final_result

_log = logging.getLogger(__name__)

#: Representations whose statistics are plain sums over examples (one round).
ADDITIVE = frozenset({"dense", "diag", "blockdiag", "quasidiag", "kfac", "mixed", "lowrank"})


def flow_of(spec: dict[str, Any]) -> str:
    """The flow of a job: ``additive``, ``ekfac``, ``ntk`` or ``implicit``."""
    if spec["metric"] == "ntk":
        return "ntk"
    rep = spec["representation"]
    if rep in ADDITIVE:
        return "additive"
    return str(rep)


def stages(flow: str, shards: int, update_diag: bool) -> list[int]:
    """Tasks per stage of a flow over ``shards`` shards; the last stage is the final task."""
    if flow == "ntk":
        return [shards, len(partials.tile_groups(shards)), 1]
    if flow == "ekfac":
        return [shards, 1, shards, shards, 1] if update_diag else [shards, 1, shards, 1]
    return [shards, 1]


# ----- entry points ------------------------------------------------------------------------------


def start(runner: JobRunner, job_id: str) -> dict[str, Any] | None:
    """Plan a sharded job and put its tasks on the queue.

    Returns:
        A summary for RQ, or ``None`` when the job runs as one (``shards`` 1, ``auto`` below
        the size where sharding pays, a reuse, or an input problem the runner will report).
    """
    record = runner.records.get_job(job_id)
    if record is None or record.status != JobStatus.QUEUED or record.cancel_requested:
        return None
    spec = record.spec
    if spec.get("shards", 1) == 1 or record.reuse_job_id is not None:
        return None
    try:
        n = examples(runner, spec)
        model = runner._model(spec)
    except Exception:  # bad input: the runner reports it with the right problem
        return None
    parameters = sum(p.numel() for p in model.parameters())
    shards = resolve_shards(spec["shards"], n, parameters, runner.settings)
    if shards == 1:
        return None
    flow = flow_of(spec)
    plan: dict[str, Any] = {
        "flow": flow,
        "bounds": bounds(n, shards),
        "stages": stages(flow, shards, spec.get("update_diag") is not False),
    }
    total = sum(plan["stages"])
    started = runner.records.update_job(
        job_id,
        only_if_status=(JobStatus.QUEUED,),
        status=JobStatus.RUNNING,
        started_at=utcnow(),
        worker=runner.worker_name,
        progress={"done": 0, "total": total, "stage": "shards", "shards": shards},
    )
    if not started:
        return {"status": "abandoned"}
    try:
        write_plan(runner, job_id, plan)
        _enqueue(runner, job_id, plan, done=set())
    except Exception as exc:
        _end(runner, job_id, JobStatus.FAILED, runner._problem_for(exc, record))
        return {"status": JobStatus.FAILED}
    _log.info("job %s runs as %d shards (%s, %d tasks)", job_id, shards, flow, total)
    return {"status": JobStatus.RUNNING, "shards": shards, "tasks": total}


def resume(runner: JobRunner, job_id: str) -> dict[str, Any]:
    """Enqueue again the tasks of a running sharded job whose outputs are missing (after Redis
    lost its tasks): stages already complete are skipped."""
    record = runner.records.get_job(job_id)
    if record is None or record.status != JobStatus.RUNNING:
        return {"status": "skipped"}
    plan = read_plan(runner, job_id)
    done = {
        (stage, index)
        for stage, count in enumerate(plan["stages"])
        for index in range(count)
        if has_output(runner, job_id, stage, index)
    }
    _enqueue(runner, job_id, plan, done)
    return {"status": "resumed", "outputs_kept": len(done)}


def run_task(runner: JobRunner, job_id: str, stage: int, index: int) -> dict[str, Any]:
    """Run one task of a sharded job.

    Returns:
        A small summary for RQ; the job's record carries status, progress and result.
    """
    token = logs.job_id.set(job_id)
    try:
        return _run_task(runner, job_id, stage, index)
    finally:
        logs.job_id.reset(token)


# ----- one task ----------------------------------------------------------------------------------


def _run_task(runner: JobRunner, job_id: str, stage: int, index: int) -> dict[str, Any]:
    record = runner.records.get_job(job_id)
    if record is None or record.status != JobStatus.RUNNING:
        return {"status": "skipped"}
    if record.cancel_requested:
        _end(runner, job_id, JobStatus.CANCELED)
        return {"status": JobStatus.CANCELED}
    plan = read_plan(runner, job_id)
    runner.current_job_id = task_id(job_id, stage, index)
    runner.stop_requested.clear()
    runner.working_on(job_id, lambda rid: _end(runner, rid, JobStatus.CANCELED))
    progress = _Progress(runner, job_id)
    try:
        if stage == len(plan["stages"]) - 1:
            result, timings = final_result(runner, record, plan, progress)
            return _succeed(runner, record, plan, result, timings)
        TASKS[(plan["flow"], stage)](runner, record, plan, index, progress)
    except JobCanceledError:
        _end(runner, job_id, JobStatus.CANCELED)
        return {"status": JobStatus.CANCELED}
    except BaseException as exc:
        _end(runner, job_id, JobStatus.FAILED, runner._problem_for(exc, record))
        if not isinstance(exc, Exception):
            raise
        return {"status": JobStatus.FAILED}
    finally:
        runner.current_job_id = None
        runner.working_on(None, None)
        runner.stop_requested.clear()
    _count_done(runner, job_id, plan, stage)
    return {"status": "done"}


def _succeed(
    runner: JobRunner,
    record: JobRecord,
    plan: dict[str, Any],
    result: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """Record the result (unless the job ended meanwhile) and clean up the partials."""
    total = sum(plan["stages"])
    done = runner.records.update_job(
        record.id,
        only_if_status=(JobStatus.RUNNING,),
        status=JobStatus.SUCCEEDED,
        finished_at=utcnow(),
        result=result,
        kept=bool(record.spec.get("keep")),
        timings=timings,
        progress={
            "done": total,
            "total": total,
            "stage": "done",
            "shards": len(plan["bounds"]) - 1,
        },
    )
    if not done:
        runner.artifacts.delete_job(record.id)
    status = JobStatus.SUCCEEDED if done else "abandoned"
    _cleanup(runner, _queue(runner), record.id, status)
    return {"status": status}


def _count_done(runner: JobRunner, job_id: str, plan: dict[str, Any], stage: int) -> None:
    rq_job = get_current_job()
    total = sum(plan["stages"])
    done = total - 1
    if rq_job is not None:
        done = int(rq_job.connection.incr(f"fimntk:shard-done:{job_id}"))
        rq_job.connection.expire(f"fimntk:shard-done:{job_id}", runner.settings.result_ttl_s)
    runner.records.update_job(
        job_id,
        only_if_status=(JobStatus.RUNNING,),
        progress={
            "done": min(done, total),
            "total": total,
            "stage": f"stage {stage + 1} of {len(plan['stages'])}",
            "shards": len(plan["bounds"]) - 1,
        },
    )


def _end(runner: JobRunner, job_id: str, status: str, error: dict[str, Any] | None = None) -> None:
    """End the job (failed or cancelled): no result, every other task cancelled.

    The partials go before the status turns terminal (a client that sees ``failed`` finds
    nothing left of the job), and again after: a sibling task may publish in between, and one
    that publishes later removes its own output (:mod:`fimntk.worker.shard_store`)."""
    runner.artifacts.delete_job(namespace(job_id))
    ended = runner.records.update_job(
        job_id,
        only_if_status=(JobStatus.RUNNING,),
        status=status,
        finished_at=utcnow(),
        error=error,
        progress={"done": 0, "total": None, "stage": status},
    )
    if not ended:
        return
    queue = _queue(runner)
    try:
        ShardTasks(queue).cancel_all(job_id)
    except Exception as exc:  # the job is ended either way; stray tasks see it and skip
        _log.warning("could not cancel the tasks of %s: %s", job_id, exc)
    _cleanup(runner, queue, job_id, status)


def _cleanup(runner: JobRunner, queue: JobQueue, job_id: str, status: str) -> None:
    runner.artifacts.delete_job(namespace(job_id))
    if status != JobStatus.SUCCEEDED:
        runner.artifacts.delete_job(job_id)
    ShardTasks(queue).forget(job_id)
    try:
        queue.redis.publish(done_channel(job_id), status)
        queue.redis.delete(f"fimntk:shard-done:{job_id}")
    except Exception as exc:  # a long poll falls back to its own timeout
        _log.warning("could not announce the end of %s: %s", job_id, exc)


_queues: dict[str, JobQueue] = {}


def _queue(runner: JobRunner) -> JobQueue:
    rq_job = get_current_job()
    name = rq_job.origin if rq_job is not None else runner.settings.queue_name
    url = runner.settings.redis_url or "redis://127.0.0.1:6379/0"
    if name not in _queues:
        _queues[name] = JobQueue(url, name)
    return _queues[name]


def _enqueue(
    runner: JobRunner, job_id: str, plan: dict[str, Any], done: set[tuple[int, int]]
) -> None:
    record = runner.records.get_job(job_id)
    assert record is not None
    timeout = int(record.spec.get("timeout_s") or runner.settings.default_job_timeout_s)
    todo = [
        [i for i in range(count) if (stage, i) not in done]
        for stage, count in enumerate(plan["stages"])
    ]
    ShardTasks(_queue(runner)).enqueue(job_id, todo, timeout, runner.settings.result_ttl_s)
