"""The wire contract against the engine: every public method of the engine's matrices is an
operation a job may ask for, or is excluded with a reason; every listed operation exists."""

from __future__ import annotations

import inspect

import pytest

from fimntk import engine
from fimntk.contract.vocabulary import (
    ESTIMATOR_OPERATIONS,
    HESSIAN_OPERATIONS,
    HESSIAN_REPRESENTATIONS,
    JACOBIAN_OPERATIONS,
    JACOBIAN_REPRESENTATIONS,
    NOT_OPERATIONS,
    NTK_KEY,
    OPERATIONS,
    REPRESENTATIONS,
)


def _matrix_class(key: str) -> type:
    return engine.FMatDense if key == NTK_KEY else engine.resolve_representation(key)


def _public_methods(cls: type) -> set[str]:
    return {
        name
        for name, value in inspect.getmembers(cls)
        if not name.startswith("_") and callable(value) and not inspect.isclass(value)
    }


@pytest.mark.parametrize("key", [*REPRESENTATIONS, NTK_KEY])
def test_every_engine_method_is_an_operation_or_excluded(key: str) -> None:
    methods = _public_methods(_matrix_class(key))
    assert methods, key
    unlisted = methods - OPERATIONS[key] - NOT_OPERATIONS.keys()
    assert unlisted == set(), f"{key}: list these in OPERATIONS or NOT_OPERATIONS: {unlisted}"


@pytest.mark.parametrize("key", [*REPRESENTATIONS, NTK_KEY])
def test_every_listed_operation_exists_in_the_engine(key: str) -> None:
    methods = _public_methods(_matrix_class(key))
    missing = OPERATIONS[key] - ESTIMATOR_OPERATIONS - methods
    assert missing == set(), f"{key}: the engine has no {missing}"
    assert all(callable(getattr(engine.estimators, op)) for op in ESTIMATOR_OPERATIONS)


def test_reasons_are_given_for_methods_that_exist() -> None:
    every = set().union(*(_public_methods(_matrix_class(k)) for k in [*REPRESENTATIONS, NTK_KEY]))
    assert set(NOT_OPERATIONS) <= every
    assert all(len(reason) > 10 for reason in NOT_OPERATIONS.values())


_HESSIAN_CLASSES = {
    "dense": engine.PMatDense,
    "blockdiag": engine.PMatBlockDiag,
    "diag": engine.PMatDiag,
    "implicit": engine.PMatHessianImplicit,
}


def test_the_hessian_vocabulary_is_the_engines() -> None:
    from fimntk.engine.hessian import HESSIAN_REPRESENTATIONS as ENGINE_REPRESENTATIONS

    assert set(HESSIAN_REPRESENTATIONS) == set(ENGINE_REPRESENTATIONS) == set(_HESSIAN_CLASSES)
    assert set(HESSIAN_OPERATIONS) == {f"hessian_{rep}" for rep in HESSIAN_REPRESENTATIONS}


@pytest.mark.parametrize("rep", sorted(_HESSIAN_CLASSES))
def test_every_listed_hessian_operation_exists_in_the_engine(rep: str) -> None:
    methods = _public_methods(_HESSIAN_CLASSES[rep])
    missing = HESSIAN_OPERATIONS[f"hessian_{rep}"] - ESTIMATOR_OPERATIONS - methods
    assert missing == set(), f"hessian {rep}: the engine has no {missing}"
    assert "solve" not in HESSIAN_OPERATIONS[f"hessian_{rep}"]  # a Hessian need not be PSD


_JACOBIAN_CLASSES = {"dense": engine.PFMapDense, "implicit": engine.PFMapImplicit}


@pytest.mark.parametrize("rep", sorted(_JACOBIAN_CLASSES))
def test_every_listed_jacobian_operation_exists_in_the_engine(rep: str) -> None:
    assert set(JACOBIAN_REPRESENTATIONS) == set(_JACOBIAN_CLASSES)
    methods = _public_methods(_JACOBIAN_CLASSES[rep])
    missing = JACOBIAN_OPERATIONS[f"jacobian_{rep}"] - methods
    assert missing == set(), f"jacobian {rep}: the engine has no {missing}"
