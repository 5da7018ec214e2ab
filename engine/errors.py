"""Exceptions of the engine.

Hierarchy::

    FimntkError
    ├── InvalidInputError (ValueError)       bad model, loader, shape or argument
    │   ├── TrainModeBatchNormError          BatchNorm in train mode: call ``model.eval()``
    │   ├── MemoryBudgetError                a representation would not fit the budget
    │   ├── InvalidNormOrderError            an unknown ``ord`` (also a RuntimeError)
    │   └── NotDifferentiableError           a scalar outside the graph (also a RuntimeError)
    ├── UnsupportedOperationError            operation not defined for a representation
    │   (TypeError, NotImplementedError)
    └── SerializationError (ValueError)      a file whose metadata and tensors disagree

Each error also subclasses the builtin it refines, so ``except ValueError`` keeps working, and
the builtin torch or NNGeometry raise in the same place (``torch.linalg.norm`` and
``torch.autograd.grad`` raise ``RuntimeError``; NNGeometry raises ``NotImplementedError`` for an
operation a representation lacks), so code written against them keeps working too.
"""

from __future__ import annotations


class FimntkError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidInputError(FimntkError, ValueError):
    """The model, the loader or an argument cannot give a well-defined result."""


class TrainModeBatchNormError(InvalidInputError, RuntimeError):
    """BatchNorm in train mode couples the examples of a batch (also a ``RuntimeError``, as
    NNGeometry raises there)."""


class MemoryBudgetError(InvalidInputError):
    """Building a representation would exceed the memory budget."""


class InvalidNormOrderError(InvalidInputError, RuntimeError):
    """A norm order other than those offered (``torch.linalg.norm`` raises ``RuntimeError``)."""


def unknown_norm_order(ord: object) -> InvalidNormOrderError:
    """The error for a norm order no matrix offers (one message for every representation)."""
    return InvalidNormOrderError(
        f"unsupported norm ord={ord!r}: use None or 'fro' (Frobenius), 2 or -2 (spectral)"
    )


class NotDifferentiableError(InvalidInputError, RuntimeError):
    """Differentiating a value that does not depend on the variables asked for
    (``torch.autograd.grad`` raises ``RuntimeError``)."""


class MissingGeneratorError(InvalidInputError, AttributeError):
    """An operation that recomputes from the data (``update_diag``) on a matrix without its
    Jacobian generator (loaded from a file or a pickle). Also an ``AttributeError``, as
    NNGeometry's stand-in generator raises there."""


class UnsupportedOperationError(FimntkError, TypeError, NotImplementedError):
    """An operation that a representation (or a pair of them) does not define."""


class SerializationError(FimntkError, ValueError):
    """A safetensors file that does not describe a valid engine object."""
