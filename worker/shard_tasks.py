"""The computations of a sharded job's tasks: shard statistics, the EKFAC reduce and
eigendecompositions, NTK block factors and tiles, implicit products, and the final reduce.

Each task reads what the stages before it wrote (:mod:`fimntk.worker.shard_store`) and writes
its own output; :mod:`fimntk.worker.sharded` runs them and records the job's life.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from fimntk import engine
from fimntk.core.storage.records import JobRecord
from fimntk.engine import partials
from fimntk.worker import artifacts
from fimntk.worker.data import Examples
from fimntk.worker.models import DTYPES
from fimntk.worker.runner import JobRunner, _Progress
from fimntk.worker.shard_store import (
    IncompleteShardsError,
    all_partials,
    load_tensors,
    output_path,
    save_partial,
    save_tensors,
)


def examples(runner: JobRunner, spec: dict[str, Any]) -> int:
    dataset = _full_loader(runner, spec).dataset
    assert isinstance(dataset, Examples)
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
    save_partial(runner, record.id, 0, index, part)


def _reduce_task(
    runner: JobRunner, record: JobRecord, plan: dict[str, Any], index: int, progress: _Progress
) -> None:
    """EKFAC: the KFAC factors over all examples (float64 sums, finalized by readers)."""
    progress.stage("reduce")
    save_partial(runner, record.id, 1, 0, all_partials(runner, record.id, 0, plan))


def _kfac(runner: JobRunner, record: JobRecord) -> Any:
    reduced = partials.load_partial(output_path(runner, record.id, 1, 0))
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
    save_tensors(runner, record.id, 2, index, tensors, {"layers": layers})


def _ekfac(runner: JobRunner, record: JobRecord, plan: dict[str, Any]) -> Any:
    """The EKFAC of the reduced factors in the eigenbases the eigen tasks computed."""
    kfac = _kfac(runner, record)
    bases: dict[str, Any] = {}
    for index in range(plan["stages"][2]):
        tensors, _ = load_tensors(runner, record.id, 2, index)
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
    save_partial(runner, record.id, 3, index, partials.partial_of(rep, len(indexes)))


def _factors_task(
    runner: JobRunner, record: JobRecord, plan: dict[str, Any], index: int, progress: _Progress
) -> None:
    """NTK round 1: one block's per-layer factors (the forward and c backward passes)."""
    loader = _shard_loader(runner, record.spec, _indexes(plan, index))
    progress.stage("gram factors")
    model = runner._model(record.spec)
    factors = partials.gram_factors(model, loader, runner.device, progress)
    save_tensors(runner, record.id, 0, index, factors, {"block": index})


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
        rows, _ = load_tensors(runner, record.id, 0, a)
        cols = None if a == b else load_tensors(runner, record.id, 0, b)[0]
        tile = partials.gram_tile(model, rows, cols, runner.device)
        if a == b:  # symmetric: its upper triangle only
            c, n = tile.shape[:2]
            payload[f"{a}_{b}.packed"] = partials.pack_symmetric(tile.reshape(c * n, c * n))
        else:
            payload[f"{a}_{b}.tile"] = tile
        c = tile.shape[0]
    save_tensors(runner, record.id, 1, index, payload, {"c": c})


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
    save_tensors(runner, record.id, 0, index, tensors, {"count": count})


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


TASKS = {
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


def final_result(
    runner: JobRunner, record: JobRecord, plan: dict[str, Any], progress: _Progress
) -> tuple[dict[str, Any], dict[str, float]]:
    """Reduce the last stage and run the operations.

    Returns:
        The result document and the timings.
    """
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
            rep = partials.finalize(all_partials(runner, record.id, stage, plan), dtype)
        timings["reduce_s"] = time.monotonic() - clock
        result = runner.operations_result(record, rep, None, progress, timings)
    return result, timings


def _gram(runner: JobRunner, record: JobRecord, plan: dict[str, Any]) -> torch.Tensor:
    shard_bounds = plan["bounds"]
    tiles = {}
    for index, group in enumerate(partials.tile_groups(len(shard_bounds) - 1)):
        tensors, meta = load_tensors(runner, record.id, 1, index)
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
        tensors, meta = load_tensors(runner, record.id, 0, index)
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
