"""Per-example gradient generation (hooks, torch.func fallback, pseudo-outputs)."""

from .jacobian import FALLBACK, HOOKS, BatchJacobian, Jacobian
from .outputs import EmpiricalFisher, ExactFisher, Identity, MonteCarloFisher, PseudoOutputs

__all__ = ["FALLBACK", "HOOKS", "BatchJacobian", "EmpiricalFisher", "ExactFisher", "Identity",
           "Jacobian", "MonteCarloFisher", "PseudoOutputs"]
