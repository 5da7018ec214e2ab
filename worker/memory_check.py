"""Memory checked before it is spent: the worker knows what it has and refuses a job whose
representation will not fit, naming a cheaper one that does.

The need is the engine's :func:`~fimntk.engine.memory.estimate_memory` (the bytes the
representation stores: 4·d² for a float32 dense Fisher, the Kronecker factors for KFAC, n²c²
for an NTK, ...). The memory available is the GPU's free memory (``torch.cuda.mem_get_info``)
on a CUDA worker, else the host's ``MemAvailable`` (``/proc/meminfo``). A job is refused when
its need exceeds ``_USABLE`` of what is available, leaving room for the per-batch Jacobians
and activations.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fimntk.contract import problems
from fimntk.engine.memory import CHEAPER, estimate_memory
from fimntk.worker.errors import JobProblemError

#: Fraction of the available memory a representation may take.
_USABLE = 0.8


def available_bytes(device: torch.device) -> int:
    """Free memory of ``device``: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_fits(
    model: nn.Module,
    representation: str,
    n_output: int,
    n_examples: int | None,
    device: torch.device,
    available: int | None = None,
) -> None:
    """Refuse a representation whose storage does not fit in the device's memory.

    Args:
        model: The model (only its structure is read).
        representation: Representation name, or ``"ntk"``.
        n_output: Outputs per example c.
        n_examples: Examples in the dataset (for the NTK and low-rank).
        device: The worker's device.
        available: Bytes available (measured when omitted).

    Raises:
        JobProblemError: ``out-of-memory`` with the bytes needed and available and the first
            cheaper representation that fits (``None`` when none does).
    """
    need = estimate_memory(model, representation, n_output, n_examples)
    have = available_bytes(device) if available is None else available
    budget = int(have * _USABLE)
    if need <= budget:
        return
    alternative = None
    if representation in CHEAPER:
        for cheaper in CHEAPER[CHEAPER.index(representation) + 1 :]:
            if estimate_memory(model, cheaper, n_output, n_examples) <= budget:
                alternative = cheaper
                break
    hint = f"try representation {alternative!r}" if alternative else "try a smaller model"
    if representation == "ntk":
        hint = "try a smaller 'dataset.subset'"
    raise JobProblemError(
        problems.OUT_OF_MEMORY,
        f"{representation!r} needs {need} bytes and {device} has {have} available "
        f"({budget} usable); {hint}",
        "dataset.subset" if representation == "ntk" else "representation",
        needed_bytes=need,
        available_bytes=have,
        alternative=alternative,
    )
