"""PMatEKFACBlockDiag, pseudo-inverses, ``mapTMmap``, pickling and the new safetensors objects.

The references are the ``torch.func`` Fisher of each zoo case (blocks cut from it), the KFAC
factors for EKFAC blocks before ``update_diag``, and pseudo-inverses computed here from the dense
blocks with ``torch.linalg.eigh``.
"""

from __future__ import annotations

import pickle
from unittest import mock

import pytest
import torch

from fimntk import engine
from fimntk.engine import (
    Jacobian,
    MissingGeneratorError,
    PFMapDense,
    PFMapImplicit,
    PMatEKFACBlockDiag,
    PMatEye,
    SerializationError,
    UnsupportedOperationError,
)
from fimntk.engine.errors import InvalidInputError, TrainModeBatchNormError
from tests import reference as ref
from tests.engine import _structured_helpers as H

pytestmark = H.ATTN_WARNING

TOL = 1e-10
MODELS = ["cnn_bn", "norms", "custom", "attention", "transformer_encoder"]


def _ekfac_blockdiag(case: str, update: bool = True) -> PMatEKFACBlockDiag:
    model, loader = H.built(case)
    mat = engine.FIM(model, loader, PMatEKFACBlockDiag)
    assert isinstance(mat, PMatEKFACBlockDiag)
    return mat.update_diag(loader) if update else mat


def _kron_layers(case: str) -> set[str]:
    return {n for n in H.offsets(case) if H.on_hooks(case, n) and H.is_kron(H.modules(case)[n])}


def _pinv_reference(m: torch.Tensor, atol: float) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh((m + m.t()) / 2)
    inv = torch.where(evals > atol, 1 / evals.clamp_min(atol), torch.zeros_like(evals))
    return (evecs * inv) @ evecs.t()


@pytest.mark.parametrize("case", MODELS)
def test_ekfac_blockdiag_blocks(case):
    """EKFAC on Kronecker layers (KFAC's blocks before update_diag), exact dense blocks on every
    other layer whatever its size, nothing between layers; after update_diag the trace is the
    Fisher's (EKFAC's corrected eigenvalues keep the trace exact)."""
    before = _ekfac_blockdiag(case, update=False)
    kron = _kron_layers(case)
    assert before.kinds == {n: "ekfac" if n in kron else "dense" for n in H.offsets(case)}
    exact = H.ref_fisher(case)
    full = before.to_torch()
    kfac = H.fim(case, "kfac")
    for name, off in H.offsets(case).items():
        if name in kron:
            a, g = kfac.factors[name]
            expected = H.kron_dense(a, g, H.view_of(H.modules(case)[name]))
        else:
            expected = H.block(exact, off)
        ref.assert_close(H.block(full, off), expected, 1e-9, f"{case} {name}")
    ref.assert_close(full - H.block_diagonal_part(full, case), torch.zeros_like(full), 0.0)
    after = _ekfac_blockdiag(case)
    assert after.diag_updated
    ref.assert_close(after.trace(), exact.trace(), 1e-9, "trace after update_diag")
    ref.assert_close(after.get_diag(), after.to_torch().diagonal(), TOL, "diag")


@pytest.mark.parametrize("case", ["cnn_bn", "attention"])
def test_ekfac_blockdiag_operations(case):
    mat = _ekfac_blockdiag(case)
    full = mat.to_torch()
    v = H.rand_pvector(mat, 3)
    x = v.get_flat_representation()
    ref.assert_close(mat.mv(v).get_flat_representation(), full @ x, TOL, "mv")
    ref.assert_close(mat.vTMv(v), x @ full @ x, TOL, "vTMv")
    scale = torch.linalg.norm(full).item()  # the smallest singular value may be round-off
    for order in ("fro", 2, -2):
        err = (mat.norm(order) - torch.linalg.norm(full, ord=order)).abs().item()
        assert err <= 1e-10 * scale, (order, err)
    ref.assert_close((2.5 * mat).to_torch(), 2.5 * full, TOL, "scaled")
    regul = 1e-3
    d = full.shape[0]
    solved = mat.solve(v, regul).get_flat_representation()
    ref.assert_close(solved, torch.linalg.solve(full + regul * torch.eye(d), x), 1e-6, "solve")
    inv = mat.inv(regul).to_torch()
    ref.assert_close(inv, torch.linalg.inv(full + regul * torch.eye(d)), 1e-6, "inv")


@pytest.mark.parametrize("case", ["cnn_bn", "norms", "attention"])
def test_pinv_blockwise_and_lstsq_solve(case):
    mat = _ekfac_blockdiag(case)
    full = mat.to_torch()
    atol = 1e-3 * torch.linalg.eigvalsh(full).max().item()  # drops some eigenvalues
    pinv = mat.pinv(atol)
    got = pinv.to_torch()
    dropped = 0
    for name, off in H.offsets(case).items():
        blk = H.block(full, off)
        ref.assert_close(H.block(got, off), _pinv_reference(blk, atol), 1e-7, name)
        dropped += int((torch.linalg.eigvalsh(blk) <= atol).sum())
    assert dropped > 0
    residual = torch.linalg.matrix_norm(full @ got @ full - full, ord=2).item()
    assert residual <= atol * (1 + 1e-6)  # M M⁺ M = M but for the dropped eigenvalues ≤ atol
    v = H.rand_pvector(mat, 4)
    lstsq = mat.solve(v, atol, solve="lstsq").get_flat_representation()
    ref.assert_close(lstsq, got @ v.get_flat_representation(), 1e-9, "solve lstsq")
    with pytest.raises(InvalidInputError, match="lstsq"):
        mat.solve(v, atol, solve="cholesky")


def test_pinv_of_mixed_kfac_blocks_and_kfac_refusal():
    case = "cnn_bn"
    mixed = H.fim(case, "mixed")  # KFAC blocks on Conv/Linear, dense on BatchNorm
    full = mixed.to_torch()
    atol = 1e-3 * torch.linalg.eigvalsh(full).max().item()
    got = mixed.pinv(atol).to_torch()
    for name, off in H.offsets(case).items():
        ref.assert_close(H.block(got, off), _pinv_reference(H.block(full, off), atol), 1e-7, name)
    with pytest.raises(UnsupportedOperationError, match="EKFAC"):
        H.fim(case, "kfac").pinv(atol)
    diag = H.fim(case, "ekfac").pinv(0.0)  # a zero threshold still skips exact zeros
    assert torch.isfinite(diag.to_torch()).all()


@pytest.mark.parametrize("rep", ["dense", "diag", "kfac", "ekfac_blockdiag", "eye"])
def test_map_quadratic_forms(rep):
    model, loader = H.built("cnn_bn")
    lc = engine.LayerCollection.from_model(model)
    jac = PFMapDense(lc, generator=Jacobian(model, lc), examples=loader)
    eye = PMatEye(lc, scaling=torch.tensor(0.7, dtype=torch.float64))
    mat = eye if rep == "eye" else engine.FIM(model, loader, rep)
    full = mat.to_torch()
    j = jac.to_torch()  # (K, n, d)
    expected = torch.einsum("kid,de,kie->ki", j, full, j)
    ref.assert_close(mat.mapTMmap(jac, reduction="diag"), expected, 1e-9, "diag")
    ref.assert_close(mat.mapTMmap(jac), expected.sum(dim=0), 1e-9, "sum")
    with pytest.raises(InvalidInputError, match="reduction"):
        mat.mapTMmap(jac, reduction="mean")
    with pytest.raises(InvalidInputError, match="PFMapDense"):
        mat.mapTMmap(PFMapImplicit(lc, Jacobian(model, lc), loader))


@pytest.mark.parametrize(
    "rep",
    ["dense", "diag", "blockdiag", "quasidiag", "kfac", "ekfac", "ekfac_blockdiag", "lowrank"],
)
def test_pickle_round_trip_without_generator(rep):
    model, loader = H.built("cnn_bn")
    mat = engine.FIM(model, loader, rep)
    assert mat.generator is not None
    back = pickle.loads(pickle.dumps(mat))
    assert type(back) is type(mat) and back.generator is None and mat.generator is not None
    assert torch.equal(back.to_torch(), mat.to_torch())
    assert back.layer_collection == mat.layer_collection and back.paths == mat.paths
    if hasattr(back, "update_diag"):
        with pytest.raises(MissingGeneratorError) as err:
            back.update_diag(loader)
        assert isinstance(err.value, AttributeError)  # NNGeometry's stand-in generator's error
        back.update_diag(loader, generator=Jacobian(model))  # a generator given explicitly


def test_pickle_refuses_implicit_and_keeps_maps():
    model, loader = H.built("mlp")
    with pytest.raises(UnsupportedOperationError, match="pickle"):
        pickle.dumps(engine.FIM(model, loader, "implicit"))
    lc = engine.LayerCollection.from_model(model)
    jac = PFMapDense(lc, generator=Jacobian(model, lc), examples=loader)
    back = pickle.loads(pickle.dumps(jac))
    assert back.generator is None and torch.equal(back.to_torch(), jac.to_torch())


def test_safetensors_round_trips(tmp_path):
    model, loader = H.built("norms")
    lc = engine.LayerCollection.from_model(model)
    mat = _ekfac_blockdiag("norms")
    jac = PFMapDense(lc, generator=Jacobian(model, lc), examples=loader)
    eye = PMatEye(lc, scaling=torch.tensor(0.25, dtype=torch.float64))
    for obj in (mat, jac, eye):
        path = tmp_path / f"{type(obj).__name__}.safetensors"
        engine.save(obj, path, metadata={"run": "seed0"})
        back = engine.load(path)
        assert type(back) is type(obj) and back.layer_collection == lc
        assert back.metadata == {"run": "seed0"}
        if isinstance(obj, PMatEKFACBlockDiag):  # stored tensors exact; products may round apart
            for name, blk in obj.data.items():
                for key, t in blk.tensors().items():
                    assert torch.equal(back.data[name].tensors()[key], t), (name, key)
            assert back.kinds == obj.kinds
        ref.assert_close(back.to_torch(), obj.to_torch(), 1e-14, type(obj).__name__)
    assert engine.load(tmp_path / "PMatEKFACBlockDiag.safetensors").diag_updated
    with pytest.raises(SerializationError, match="PFMapDense"):
        engine.save(PFMapImplicit(lc, Jacobian(model, lc), loader), tmp_path / "x.safetensors")


def test_representation_names():
    assert engine.resolve_representation("ekfac_blockdiag") is PMatEKFACBlockDiag
    assert engine.resolve_representation("PMatEKFACBlockDiag") is PMatEKFACBlockDiag
    assert issubclass(TrainModeBatchNormError, RuntimeError)  # NNGeometry raises RuntimeError


@pytest.mark.parametrize("case", ["cnn_bn", "conv1d", "grouped_conv"])
def test_per_example_conv_implementations_agree_with_torch_func(case):
    """The grouped-convolution (default) and unfolded-input per-example gradients of a
    convolution both give the torch.func Fisher."""
    from fimntk.engine.layers.conv import per_example_conv_impl
    from fimntk.engine.layers.outer_product import OuterKernel

    model, loader = H.built(case)
    for impl in ("conv", "unfold"):
        original = OuterKernel.per_example_grads
        with (
            per_example_conv_impl(impl),
            mock.patch.object(
                OuterKernel, "per_example_grads", autospec=True, side_effect=original
            ) as outer,
        ):
            dense = engine.FIM(model, loader, "dense").to_torch()
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d | torch.nn.Conv2d)]
        called = {type(call.args[0].module) for call in outer.call_args_list}
        assert any(type(c) in called for c in convs) == (impl == "unfold"), (impl, called)
        ref.assert_close(dense, H.ref_fisher(case), 1e-10, impl)
    with pytest.raises(ValueError, match="unfold"), per_example_conv_impl("fft"):
        pass
