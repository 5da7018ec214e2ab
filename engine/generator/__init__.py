"""Per-example gradient generation (hooks, torch.func fallback, pseudo-outputs)."""

from fimntk.engine.generator.batch_jacobian import BatchJacobian
from fimntk.engine.generator.jacobian import Jacobian
from fimntk.engine.generator.outputs import (
    EmpiricalFisher,
    ExactFisher,
    Identity,
    MonteCarloFisher,
    PseudoOutputs,
)
from fimntk.engine.generator.paths import FALLBACK, HOOKS

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
