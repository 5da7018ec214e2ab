"""Exceptions of the engine.

Hierarchy::

    FimntkError
    ├── InvalidInputError (ValueError)       bad model, loader, shape or argument
    │   ├── TrainModeBatchNormError          BatchNorm in train mode: call ``model.eval()``
    │   └── MemoryBudgetError                a representation would not fit the budget
    ├── UnsupportedOperationError (TypeError) operation not defined for a representation
    └── SerializationError (ValueError)      a file whose metadata and tensors disagree

Each error also subclasses the builtin it refines, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class FimntkError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidInputError(FimntkError, ValueError):
    """The model, the loader or an argument cannot give a well-defined result."""


class TrainModeBatchNormError(InvalidInputError):
    """BatchNorm in train mode couples the examples of a batch."""


class MemoryBudgetError(InvalidInputError):
    """Building a representation would exceed the memory budget."""


class UnsupportedOperationError(FimntkError, TypeError):
    """An operation that a representation (or a pair of them) does not define."""


class SerializationError(FimntkError, ValueError):
    """A safetensors file that does not describe a valid engine object."""
