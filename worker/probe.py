"""The probe batch: a few inputs and the client's model's own outputs on them, reproduced by
the rebuilt model before any long computation (a wrong spec, a trace that diverged from the
eager code, a version skew between the client's library and the server's all show here)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from fimntk.contract import problems
from fimntk.engine.generator.inputs import default_function
from fimntk.worker.data import split_inputs
from fimntk.worker.errors import JobInputError, JobProblemError

FIELD = "model.probe"
#: Largest error allowed, relative to ``max(1, max |reference output|)``, by parameter dtype.
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-3, torch.float64: 1e-3}


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """No TF32 on CUDA (cuDNN convolutions use it by default): the probe checks the spec, not
    the GPU's rounding."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


def run_probe(model: nn.Module, path: Path, param_dtype: torch.dtype) -> float:
    """Run the model on the probe's inputs and compare with its outputs.

    Args:
        model: The rebuilt model, on its device, in the job's dtype, in eval mode.
        path: The probe blob (``inputs`` or ``inputs.<key>``, and ``outputs``).
        param_dtype: dtype of the client's parameters (sets the tolerance).

    Returns:
        The relative error found.

    Raises:
        JobProblemError: ``probe-mismatch`` when the outputs differ, or have another shape.
    """
    tensors = load_file(str(path), device="cpu")
    reference = tensors.pop("outputs")
    first = next(model.parameters())
    inputs: Any = split_inputs(tensors, first.dtype)
    if isinstance(inputs, dict):
        inputs = {k: v.to(first.device) for k, v in inputs.items()}
    else:
        inputs = inputs.to(first.device)
    try:
        with torch.no_grad(), _full_float32():
            got: Tensor = default_function(model)(inputs).detach().to("cpu", torch.float64)
    except JobInputError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise JobProblemError(
            problems.PROBE_MISMATCH,
            f"the rebuilt model fails on the probe inputs ({type(exc).__name__}: "
            f"{lines[0][:200]}): the spec does not describe the model the client ran; check "
            "the traced graph, or register a builder for this model",
            FIELD,
        ) from None
    want = reference.to(torch.float64)
    tolerance = TOLERANCE.get(param_dtype, 1e-3)
    if got.shape != want.shape:
        raise JobProblemError(
            problems.PROBE_MISMATCH,
            f"the rebuilt model returns outputs of shape {list(got.shape)} on the probe, the "
            f"client's model {list(want.shape)}: the spec does not describe the model; check "
            "the traced graph (or register a builder for this model)",
            FIELD,
        )
    error = float((got - want).abs().max() / max(1.0, float(want.abs().max())))
    if not error <= tolerance:
        raise JobProblemError(
            problems.PROBE_MISMATCH,
            f"the rebuilt model's outputs on the probe differ from the client's model's by "
            f"{error:.3g} (relative; allowed {tolerance:g}): the spec does not compute what the "
            "model computes (a trace that diverged from the Python code, data-dependent control "
            "flow, or a library version skew); register a builder for this model instead",
            FIELD,
            relative_error=error,
            tolerance=tolerance,
        )
    return error
