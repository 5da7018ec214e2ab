"""Memory checked before it is spent: the worker knows what it has and refuses a job whose
representation will not fit, naming a cheaper one that does.

The need is the engine's :func:`~fimntk.engine.memory.estimate_memory` (the bytes the
representation stores: 4·d² for a float32 dense Fisher, the Kronecker factors for KFAC, n²c²
for an NTK, ...) plus the peak activations of one batch, estimated by
:func:`activation_bytes` from a probe: one example of the first batch run forward with every
module's output measured, times the batch size and ``_ACTIVATION_COPIES`` (the activations
kept for the backward pass, their gradients, and the per-example working copies). The
memory available is the GPU's free memory (``torch.cuda.mem_get_info``) on a CUDA worker, else
the host's ``MemAvailable`` (``/proc/meminfo``). A job is refused when its need exceeds
``_USABLE`` of what is available, leaving room for the per-batch Jacobians.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fimntk.contract import problems
from fimntk.engine.generator.inputs import default_function, map_tensors, to_device
from fimntk.engine.memory import CHEAPER, estimate_memory
from fimntk.worker.errors import JobProblemError

#: Fraction of the available memory a representation may take.
_USABLE = 0.8
#: Copies of one batch's activations alive at the peak of a pass (see the module docstring).
_ACTIVATION_COPIES = 3


def _tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def activation_bytes(
    model: nn.Module, loader: Iterable[Any], device: torch.device, dtype: torch.dtype
) -> int:
    """Peak bytes of one batch's activations, from a probe of one example.

    The first example of the loader's first batch runs forward (no graph kept) with a hook
    on every leaf module adding up the bytes of its outputs; the sum is scaled by the batch size and
    ``_ACTIVATION_COPIES``. ``0`` when the loader is empty or the probe cannot run (the job
    itself then reports what is wrong).
    """
    try:
        batch = to_device(next(iter(loader)), device, dtype)
    except StopIteration:
        return 0
    size = next((t.shape[0] for t in _tensors(batch) if t.dim() > 0), 1)
    one = map_tensors(batch, lambda t: t[:1] if t.dim() > 0 else t)
    total = 0

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        total += sum(t.numel() * t.element_size() for t in _tensors(output))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            default_function(model)(*one)
    except Exception:  # a probe is a hint: the job's own run reports a model that fails
        return 0
    finally:
        for handle in handles:
            handle.remove()
    return total * size * _ACTIVATION_COPIES


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
    working_bytes: int = 0,
) -> None:
    """Refuse a representation whose storage and one batch's activations do not fit in the
    device's memory.

    Args:
        model: The model (only its structure is read).
        representation: Representation name, or ``"ntk"``.
        n_output: Outputs per example c.
        n_examples: Examples in the dataset (for the NTK and low-rank).
        device: The worker's device.
        available: Bytes available (measured when omitted).
        working_bytes: Peak bytes of one batch's activations (:func:`activation_bytes`).

    Raises:
        JobProblemError: ``out-of-memory`` with the bytes needed and available and the first
            cheaper representation that fits (``None`` when none does).
    """
    need = estimate_memory(model, representation, n_output, n_examples) + working_bytes
    have = available_bytes(device) if available is None else available
    budget = int(have * _USABLE)
    if need <= budget:
        return
    alternative = None
    if representation in CHEAPER:
        for cheaper in CHEAPER[CHEAPER.index(representation) + 1 :]:
            if estimate_memory(model, cheaper, n_output, n_examples) + working_bytes <= budget:
                alternative = cheaper
                break
    hint = f"try representation {alternative!r}" if alternative else "try a smaller model"
    if alternative is None and working_bytes > budget // 2:
        hint = "try a smaller 'dataset.batch_size'"
    if representation == "ntk":
        hint = "try a smaller 'dataset.subset'"
    raise JobProblemError(
        problems.OUT_OF_MEMORY,
        f"{representation!r} needs {need} bytes (of which {working_bytes} for one batch's "
        f"activations) and {device} has {have} available ({budget} usable); {hint}",
        "dataset.subset" if representation == "ntk" else "representation",
        needed_bytes=need,
        available_bytes=have,
        alternative=alternative,
    )


#: Representations of the loss Hessian, costliest first (a refused one names the next that fits).
_HESSIAN_CHEAPER = ("dense", "blockdiag", "diag", "implicit")


def hessian_bytes(model: nn.Module, representation: str, working_bytes: int = 0) -> int:
    """Peak bytes of :func:`fimntk.engine.Hessian` on ``model``.

    ``torch.func.hessian`` is forward-over-reverse vmapped over the d basis directions, so one
    batch's Hessian ``(d, d)`` is built with d tangent copies of the activations beside the
    running sum ``(d, d)``. Per layer (``blockdiag``, and ``diag``, which is read off the
    blocks): ``Σ_l d_l²`` twice and ``max_l d_l`` tangent copies. Implicit: one
    Hessian-vector product, a few ``(d,)`` vectors and two copies of the activations.

    Args:
        model: The model (only its structure is read).
        representation: ``"dense"``, ``"blockdiag"``, ``"diag"`` or ``"implicit"``.
        working_bytes: One batch's activations (:func:`activation_bytes`).
    """
    from fimntk.engine.layercollection import LayerCollection

    sizes = [entry.numel for entry in LayerCollection.from_model(model)]
    param = next(model.parameters(), None)
    item = param.element_size() if param is not None else 4
    d = sum(sizes)
    if representation == "dense":
        return 2 * d * d * item + d * working_bytes
    if representation in ("blockdiag", "diag"):
        return 2 * sum(s * s for s in sizes) * item + max(sizes, default=0) * working_bytes
    return 4 * d * item + 2 * working_bytes


def check_hessian_fits(
    model: nn.Module,
    representation: str,
    device: torch.device,
    available: int | None = None,
    working_bytes: int = 0,
) -> None:
    """Refuse a loss Hessian whose computation (:func:`hessian_bytes`) does not fit.

    Raises:
        JobProblemError: ``out-of-memory`` naming ``representation``, with the bytes needed
            and available and the first cheaper Hessian representation that fits.
    """
    _refuse_unless_fits(
        "Hessian",
        representation,
        _HESSIAN_CHEAPER,
        lambda r: hessian_bytes(model, r, working_bytes),
        device,
        available,
        "try a smaller model or 'dataset.batch_size'",
    )


def jacobian_bytes(
    model: nn.Module, representation: str, outputs: int, n: int | None, working_bytes: int = 0
) -> int:
    """Peak bytes of a Jacobian map on ``model``: ``dense`` stores ``J`` ``(c, n, d)`` (and
    one batch of per-example rows beside it); ``implicit`` holds a few ``(d,)`` and ``(c, n)``
    vectors and two copies of one batch's activations (a forward-mode or a backward pass)."""
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    param = next(model.parameters(), None)
    item = param.element_size() if param is not None else 4
    examples = n if n is not None else 1
    vectors = 4 * d * item + 2 * outputs * examples * item + 2 * working_bytes
    if representation == "dense":
        return outputs * examples * d * item + vectors
    return vectors


def check_jacobian_fits(
    model: nn.Module,
    representation: str,
    outputs: int,
    n: int | None,
    device: torch.device,
    available: int | None = None,
    working_bytes: int = 0,
) -> None:
    """Refuse a Jacobian map whose storage (:func:`jacobian_bytes`) does not fit.

    Raises:
        JobProblemError: ``out-of-memory`` naming ``representation``, with the bytes needed and
            available, and ``implicit`` as the alternative when it fits.
    """
    _refuse_unless_fits(
        "Jacobian",
        representation,
        _JACOBIAN_CHEAPER,
        lambda r: jacobian_bytes(model, r, outputs, n, working_bytes),
        device,
        available,
        "try a smaller model",
    )


#: Representations of a Jacobian map, costliest first.
_JACOBIAN_CHEAPER = ("dense", "implicit")


def _refuse_unless_fits(
    what: str,
    representation: str,
    cheaper: tuple[str, ...],
    bytes_of: Callable[[str], int],
    device: torch.device,
    available: int | None,
    otherwise: str,
) -> None:
    """Raise ``out-of-memory`` when ``bytes_of(representation)`` exceeds the usable share of
    the device's memory, naming the first later entry of ``cheaper`` that fits (the hint
    ``otherwise`` when none does)."""
    need = bytes_of(representation)
    have = available_bytes(device) if available is None else available
    budget = int(have * _USABLE)
    if need <= budget:
        return
    later = cheaper[cheaper.index(representation) + 1 :]
    alternative = next((r for r in later if bytes_of(r) <= budget), None)
    hint = f"try representation {alternative!r}" if alternative else otherwise
    raise JobProblemError(
        problems.OUT_OF_MEMORY,
        f"the {representation!r} {what} needs about {need} bytes and {device} has {have} "
        f"available ({budget} usable); {hint}",
        "representation",
        needed_bytes=need,
        available_bytes=have,
        alternative=alternative,
    )
