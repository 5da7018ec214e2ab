"""Per-example gradient generation (hooks, torch.func fallback, pseudo-outputs)."""

from fimntk.engine.generator.jacobian import FALLBACK, HOOKS, BatchJacobian, Jacobian
from fimntk.engine.generator.outputs import (
    EmpiricalFisher,
    ExactFisher,
    Identity,
    MonteCarloFisher,
    PseudoOutputs,
)

__all__ = [
    "FALLBACK",
    "HOOKS",
    "BatchJacobian",
    "EmpiricalFisher",
    "ExactFisher",
    "Identity",
    "Jacobian",
    "MonteCarloFisher",
    "PseudoOutputs",
]
