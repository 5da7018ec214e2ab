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
ntk            S blocks' per-layer factors → S(S+1)/2 upper-triangle Gram tiles → final
               (mirrored)
implicit       S shards of each additive operation (per product or probe) → final
=============  =================================================================================

Each task writes one artifact keyed (job, stage, index), so a task retried after its worker
was lost overwrites the same key. The final task reads every partial of its stage, refuses a
partial set (a missing partial, or counts that do not add to n), adds them in shard order in
float64 (:mod:`fimntk.engine.partials`), runs the operations and records the result. Monte
Carlo draws and probes of shard s in round r are seeded from (job seed, r, s).

CG, Lanczos and SLQ stay on one worker: each iteration needs the previous product, so every
step would be a round trip through the queue (tens of ms plus fetching the model and the
shard), which pays only when one product takes much longer — for an implicit Fisher, past
about a minute per product (a dataset of ~10⁵ examples on a GPU).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch
from rq import get_current_job
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset, TensorDataset

from fimntk import engine
from fimntk.contract.vocabulary import JobStatus
from fimntk.core import logs
from fimntk.core.errors import NotFoundError
from fimntk.core.queue import JobQueue, done_channel
from fimntk.core.shards import (
    PLAN,
    ShardTasks,
    bounds,
    namespace,
    output_name,
    resolve_shards,
    task_id,
)
from fimntk.core.storage.records import JobRecord, utcnow
from fimntk.engine import partials
from fimntk.worker import artifacts
from fimntk.worker.errors import JobCanceledError
from fimntk.worker.models import DTYPES
from fimntk.worker.runner import JobRunner, _Progress

_log = logging.getLogger(__name__)

#: Representations whose statistics are plain sums over examples (one round).
ADDITIVE = frozenset({"dense", "diag", "blockdiag", "quasidiag", "kfac", "mixed", "lowrank"})


class IncompleteShardsError(RuntimeError):
    """A reduce found fewer partials (or examples) than its plan: no result is made."""


# ----- the plan ----------------------------------------------------------------------------------


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


def _write_plan(runner: JobRunner, job_id: str, plan: dict[str, Any]) -> None:
    store = runner.artifacts
    staged = store.staging_path(namespace(job_id), PLAN)
    try:
        save_file({}, str(staged), metadata={"plan": json.dumps(plan)})
        store.publish(namespace(job_id), PLAN, staged)
    finally:
        staged.unlink(missing_ok=True)


def _read_plan(runner: JobRunner, job_id: str) -> dict[str, Any]:
    path = runner.artifacts.path(namespace(job_id), PLAN)
    with safe_open(str(path), framework="pt") as f:
        return dict(json.loads((f.metadata() or {})["plan"]))


def _examples(runner: JobRunner, spec: dict[str, Any]) -> int:
    dataset = _full_loader(runner, spec).dataset
    assert isinstance(dataset, TensorDataset)
    return len(dataset)


#: The last dataset a task of this process read: the tasks of one job share it (one entry, so
#: a worker holds at most one dataset beyond what its current job uses).
_last_loader: dict[str, DataLoader] = {}


def _full_loader(runner: JobRunner, spec: dict[str, Any]) -> DataLoader:
    key = json.dumps([spec["dataset"], spec["dtype"], spec["metric"]], sort_keys=True)
    loader = _last_loader.get(key)
    if loader is None:
        loader = runner._loader(spec, DTYPES[spec["dtype"]], spec["metric"] == "empirical_fim")
        _last_loader.clear()
        _last_loader[key] = loader
    return loader


def _shard_loader(runner: JobRunner, spec: dict[str, Any], indexes: list[int]) -> DataLoader:
    full = _full_loader(runner, spec)
    return DataLoader(Subset(full.dataset, indexes), batch_size=full.batch_size, shuffle=False)


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
        examples = _examples(runner, spec)
        model = runner._model(spec)
    except Exception:  # bad input: the runner reports it with the right problem
        return None
    parameters = sum(p.numel() for p in model.parameters())
    shards = resolve_shards(spec["shards"], examples, parameters, runner.settings)
    if shards == 1:
        return None
    flow = flow_of(spec)
    plan: dict[str, Any] = {
        "flow": flow,
        "bounds": bounds(examples, shards),
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
        _write_plan(runner, job_id, plan)
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
    plan = _read_plan(runner, job_id)
    done = {
        (stage, index)
        for stage, count in enumerate(plan["stages"])
        for index in range(count)
        if _has_output(runner, job_id, stage, index)
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
    plan = _read_plan(runner, job_id)
    runner.current_job_id = task_id(job_id, stage, index)
    runner.stop_requested.clear()
    progress = _Progress(runner, job_id)
    try:
        final = stage == len(plan["stages"]) - 1
        if final:
            _final(runner, record, plan, progress)
            return {"status": JobStatus.SUCCEEDED}
        _TASKS[(plan["flow"], stage)](runner, record, plan, index, progress)
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
        runner.stop_requested.clear()
    _count_done(runner, job_id, plan, stage)
    return {"status": "done"}


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
    """End the job (failed or cancelled): no result, every other task cancelled."""
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


# ----- outputs -----------------------------------------------------------------------------------


def _has_output(runner: JobRunner, job_id: str, stage: int, index: int) -> bool:
    try:
        runner.artifacts.path(namespace(job_id), output_name(stage, index))
    except NotFoundError:
        return False
    return True


def _publish(runner: JobRunner, job_id: str, stage: int, index: int, write: Any) -> None:
    store = runner.artifacts
    name = output_name(stage, index)
    staged = store.staging_path(namespace(job_id), name)
    try:
        write(staged)
        store.publish(namespace(job_id), name, staged)
    finally:
        staged.unlink(missing_ok=True)


def _save_partial(
    runner: JobRunner, job_id: str, stage: int, index: int, part: partials.Partial
) -> None:
    _publish(runner, job_id, stage, index, lambda path: partials.save_partial(part, path))


def _save_tensors(
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


def _load_tensors(
    runner: JobRunner, job_id: str, stage: int, index: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = _output_path(runner, job_id, stage, index)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118


def _output_path(runner: JobRunner, job_id: str, stage: int, index: int) -> Any:
    try:
        return runner.artifacts.path(namespace(job_id), output_name(stage, index))
    except NotFoundError as exc:
        raise IncompleteShardsError(
            f"the output of stage {stage} task {index} is missing: no result is made from a "
            "partial set of shards"
        ) from exc


def _all_partials(
    runner: JobRunner, job_id: str, stage: int, plan: dict[str, Any]
) -> partials.Partial:
    """Every shard's partial of a stage, added in shard order; refuses a partial set."""
    shard_bounds = plan["bounds"]
    parts = []
    for index in range(len(shard_bounds) - 1):
        part = partials.load_partial(_output_path(runner, job_id, stage, index))
        expected = shard_bounds[index + 1] - shard_bounds[index]
        if part.count != expected:
            raise IncompleteShardsError(
                f"shard {index} of stage {stage} summed {part.count} examples, not {expected}"
            )
        parts.append(part)
    return partials.add_partials(parts)


# ----- computing ---------------------------------------------------------------------------------


def _indexes(plan: dict[str, Any], shard: int) -> list[int]:
    return list(range(plan["bounds"][shard], plan["bounds"][shard + 1]))


def _job_seed(record: JobRecord) -> int:
    seed = record.spec.get("seed")
    if seed is not None:
        return int(seed)
    return int.from_bytes(record.id.encode()[-8:].rjust(8, b"\0"), "big") >> 1


def _fisher(
    runner: JobRunner,
    record: JobRecord,
    loader: DataLoader,
    representation: str,
    round_: int,
    shard: int,
    progress: _Progress,
) -> Any:
    """The job's Fisher metric over one shard, its Monte Carlo draws seeded by the shard."""
    spec = record.spec
    model = runner._model(spec)
    common: dict[str, Any] = {
        "device": runner.device,
        "progress": progress,
        "variant": spec["variant"],
    }
    metric = spec["metric"]
    if metric == "fim":
        return engine.FIM(model, loader, representation, **common)
    if metric == "fim_mc":
        seed = partials.derive_seed(_job_seed(record), round_, shard)
        return engine.FIM_MonteCarlo(
            model, loader, representation, trials=spec["trials"], seed=seed, **common
        )
    return engine.EmpiricalFIM(model, loader, representation, **common)


def _mean_gradient(record: JobRecord, rep: Any, loader: DataLoader) -> dict[str, torch.Tensor]:
    if record.spec["metric"] == "empirical_fim" and record.spec.get("centering"):
        return {"mean_gradient": rep.generator.get_mean_gradient(loader)}
    return {}


def _partial_task(
    runner: JobRunner, record: JobRecord, plan: dict[str, Any], index: int, progress: _Progress
) -> None:
    """Round 1 of a Fisher: the shard's statistics (KFAC factors for EKFAC)."""
    indexes = _indexes(plan, index)
    loader = _shard_loader(runner, record.spec, indexes)
    progress.stage("shard")
    rep_name = "kfac" if plan["flow"] == "ekfac" else record.spec["representation"]
    rep = _fisher(runner, record, loader, rep_name, 1, index, progress)
    part = partials.partial_of(rep, len(indexes), _mean_gradient(record, rep, loader))
    _save_partial(runner, record.id, 0, index, part)


def _reduce_task(
    runner: JobRunner, record: JobRecord, plan: dict[str, Any], index: int, progress: _Progress
) -> None:
    """EKFAC: the KFAC factors over all examples (float64 sums, finalized by readers)."""
    progress.stage("reduce")
    _save_partial(runner, record.id, 1, 0, _all_partials(runner, record.id, 0, plan))


def _kfac(runner: JobRunner, record: JobRecord) -> Any:
    reduced = partials.load_partial(_output_path(runner, record.id, 1, 0))
    return partials.finalize(reduced, DTYPES[record.spec["dtype"]])


def _eigen_task(
    runner: JobRunner, record: JobRecord, plan: dict[str, Any], index: int, progress: _Progress
) -> None:
    """EKFAC: the eigendecompositions of this task's share of the layers (spread by cost)."""
    progress.stage("eigendecompositions")
    kfac = _kfac(runner, record)
    groups = partials.spread_by_cost(partials.eigen_costs(kfac), plan["stages"][2])
    layers = groups[index] if index < len(groups) else []
    tensors = partials.bases_to_tensors(partials.eigenbases(kfac, layers))
    _save_tensors(runner, record.id, 2, index, tensors, {"layers": layers})


def _ekfac(runner: JobRunner, record: JobRecord, plan: dict[str, Any]) -> Any:
    """The EKFAC of the reduced factors in the eigenbases the eigen tasks computed."""
    kfac = _kfac(runner, record)
    bases: dict[str, Any] = {}
    for index in range(plan["stages"][2]):
        tensors, _ = _load_tensors(runner, record.id, 2, index)
        bases |= partials.bases_from_tensors(kfac, tensors)
    return partials.ekfac_from(kfac, bases)


def _diag_task(
    runner: JobRunner, record: JobRecord, plan: dict[str, Any], index: int, progress: _Progress
) -> None:
    """EKFAC round 2: the shard's eigenvalue corrections in the shared eigenbasis."""
    indexes = _indexes(plan, index)
    loader = _shard_loader(runner, record.spec, indexes)
    progress.stage("update_diag")
    generator = _fisher(runner, record, loader, "implicit", 2, index, progress).generator
    rep = _ekfac(runner, record, plan).update_diag(loader, generator)
    _save_partial(runner, record.id, 3, index, partials.partial_of(rep, len(indexes)))


def _factors_task(
    runner: JobRunner, record: JobRecord, plan: dict[str, Any], index: int, progress: _Progress
) -> None:
    """NTK round 1: one block's per-layer factors (the forward and c backward passes)."""
    loader = _shard_loader(runner, record.spec, _indexes(plan, index))
    progress.stage("gram factors")
    model = runner._model(record.spec)
    factors = partials.gram_factors(model, loader, runner.device, progress)
    _save_tensors(runner, record.id, 0, index, factors, {"block": index})


def _tile_task(
    runner: JobRunner, record: JobRecord, plan: dict[str, Any], index: int, progress: _Progress
) -> None:
    """NTK round 2: one group of upper-triangle tiles ``K[:, I_a, :, I_b]``, ``a ≤ b``
    (:func:`~fimntk.engine.partials.tile_groups`), each contracted from two blocks' factors."""
    shards = len(plan["bounds"]) - 1
    progress.stage("gram tiles")
    model = runner._model(record.spec)
    payload: dict[str, torch.Tensor] = {}
    for a, b in partials.tile_groups(shards)[index]:
        progress.check()
        rows, _ = _load_tensors(runner, record.id, 0, a)
        cols = None if a == b else _load_tensors(runner, record.id, 0, b)[0]
        tile = partials.gram_tile(model, rows, cols, runner.device)
        if a == b:  # symmetric: its upper triangle only
            c, n = tile.shape[:2]
            payload[f"{a}_{b}.packed"] = partials.pack_symmetric(tile.reshape(c * n, c * n))
        else:
            payload[f"{a}_{b}.tile"] = tile
        c = tile.shape[0]
    _save_tensors(runner, record.id, 1, index, payload, {"c": c})


def _products_task(
    runner: JobRunner, record: JobRecord, plan: dict[str, Any], index: int, progress: _Progress
) -> None:
    """Implicit Fisher: the shard's share (times its count) of every additive operation."""
    indexes = _indexes(plan, index)
    count = len(indexes)
    loader = _shard_loader(runner, record.spec, indexes)
    progress.stage("products")
    rep = _fisher(runner, record, loader, "implicit", 1, index, progress)
    tensors: dict[str, torch.Tensor] = {}
    for i, op in enumerate(record.spec["operations"]):
        progress.check()
        tensors[f"op{i}"] = _implicit_value(runner, rep, i, op, record.spec).double() * count
    _save_tensors(runner, record.id, 0, index, tensors, {"count": count})


def _implicit_value(
    runner: JobRunner, rep: Any, index: int, op: dict[str, Any], spec: dict[str, Any]
) -> torch.Tensor:
    name = op["op"]
    if name in ("trace", "get_diag"):
        return torch.as_tensor(getattr(rep, name)())
    if name in ("mv", "vTMv"):
        v = runner._vector(op["v"], index, rep, spec)
        return rep.vTMv(v) if name == "vTMv" else rep.mv(v).get_flat_representation()
    return partials.probe_samples(rep, name, int(op["n_samples"]), int(op["seed"]))


_TASKS = {
    ("additive", 0): _partial_task,
    ("ekfac", 0): _partial_task,
    ("ekfac", 1): _reduce_task,
    ("ekfac", 2): _eigen_task,
    ("ekfac", 3): _diag_task,
    ("ntk", 0): _factors_task,
    ("ntk", 1): _tile_task,
    ("implicit", 0): _products_task,
}


# ----- the final task ----------------------------------------------------------------------------


def _final(runner: JobRunner, record: JobRecord, plan: dict[str, Any], progress: _Progress) -> None:
    """Reduce the last stage, run the operations and record the result."""
    clock = time.monotonic()
    progress.stage("reduce")
    dtype = DTYPES[record.spec["dtype"]]
    flow = plan["flow"]
    timings: dict[str, float] = {}
    if flow == "implicit":
        result = _implicit_result(runner, record, plan)
    else:
        if flow == "ntk":
            rep: Any = engine.FMatDense(_gram(runner, record, plan).to(dtype))
        elif flow == "ekfac" and len(plan["stages"]) == 4:  # no update_diag
            rep = _ekfac(runner, record, plan)
        else:
            stage = len(plan["stages"]) - 2
            rep = partials.finalize(_all_partials(runner, record.id, stage, plan), dtype)
        timings["reduce_s"] = time.monotonic() - clock
        result = runner.operations_result(record, rep, None, progress, timings)
    done = runner.records.update_job(
        record.id,
        only_if_status=(JobStatus.RUNNING,),
        status=JobStatus.SUCCEEDED,
        finished_at=utcnow(),
        result=result,
        kept=bool(record.spec.get("keep")),
        timings=timings,
        progress={
            "done": sum(plan["stages"]),
            "total": sum(plan["stages"]),
            "stage": "done",
            "shards": len(plan["bounds"]) - 1,
        },
    )
    if not done:
        runner.artifacts.delete_job(record.id)
    _cleanup(runner, _queue(runner), record.id, JobStatus.SUCCEEDED if done else "abandoned")


def _gram(runner: JobRunner, record: JobRecord, plan: dict[str, Any]) -> torch.Tensor:
    shard_bounds = plan["bounds"]
    tiles = {}
    for index, group in enumerate(partials.tile_groups(len(shard_bounds) - 1)):
        tensors, meta = _load_tensors(runner, record.id, 1, index)
        c = int(meta["c"])
        for a, b in group:
            if a == b:
                n = shard_bounds[a + 1] - shard_bounds[a]
                packed = tensors.get(f"{a}_{b}.packed")
                if packed is None:
                    raise IncompleteShardsError(f"tile {(a, b)} is missing from task {index}")
                tiles[(a, b)] = partials.unpack_symmetric(packed, c * n).reshape(c, n, c, n)
            elif f"{a}_{b}.tile" in tensors:
                tiles[(a, b)] = tensors[f"{a}_{b}.tile"]
    return partials.gram_from_tiles(tiles, shard_bounds)


def _implicit_result(runner: JobRunner, record: JobRecord, plan: dict[str, Any]) -> dict[str, Any]:
    shard_bounds = plan["bounds"]
    n = shard_bounds[-1]
    sums: dict[str, torch.Tensor] = {}
    for index in range(len(shard_bounds) - 1):
        tensors, meta = _load_tensors(runner, record.id, 0, index)
        if meta.get("count") != shard_bounds[index + 1] - shard_bounds[index]:
            raise IncompleteShardsError(f"shard {index} summed {meta.get('count')} examples")
        for key, value in tensors.items():
            sums[key] = value.clone() if key not in sums else sums[key] + value
    dtype = DTYPES[record.spec["dtype"]]
    outputs = []
    for i, op in enumerate(record.spec["operations"]):
        mean = sums[f"op{i}"] / n
        name = op["op"]
        prefix = f"op{i}_{name}"
        if name.startswith("hutchinson"):
            estimate, stderr = partials.probe_estimate(mean)
            values = {"estimate": estimate.to(dtype), "stderr": stderr.to(dtype)}
        else:
            values = {"value": mean.to(dtype)}
        out: dict[str, Any] = {}
        for field, value in values.items():
            if value.dim() == 0:
                out[field] = artifacts.scalar(value)
            else:
                label = prefix if field == "value" else f"{prefix}_{field}"
                out[field] = artifacts.save_tensor(runner.artifacts, record.id, label, value)
        outputs.append({"index": i, "op": name, "outputs": out})
    return {"operations": outputs, "reused_from": None, "representation_artifact": None}
