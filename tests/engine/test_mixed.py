"""PMatMixed: a block kind per layer, chosen by policy, with documented defaults and fallbacks.

Defaults (engine.pspace.mixed): KFAC for hook-path Linear/Conv/Embedding, a dense block for
normalisation layers, the diagonal for layers on the ``torch.func`` path, else a dense block up to
4096 parameters. Each block is checked against its own definition from the reference Fisher.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fimntk import engine
from fimntk.engine import PMatKFAC, PMatMixed, UnsupportedOperationError
from tests import reference as ref
from tests import zoo
from tests.engine import _structured_helpers as H

pytestmark = H.ATTN_WARNING

TOL = 1e-10


def default_kind(case: str, name: str) -> str:
    m = H.modules(case)[name]
    typ = type(m).__name__
    if not H.on_hooks(case, name):
        return "diag"
    if H.is_kron(m):
        return "kfac"
    if typ in H.NORM_TYPES:
        return "dense"
    return "dense" if sum(p.numel() for p in m.parameters(recurse=False)) <= 4096 else "diag"


def expected_block(case: str, name: str, kind: str, mat) -> torch.Tensor:
    """The dense block that a ``kind`` block of layer ``name`` stands for."""
    off = H.offsets(case)[name]
    exact = H.block(H.ref_fisher(case), off)
    if kind == "dense":
        return exact
    if kind == "diag":
        return torch.diag(exact.diagonal())
    if kind == "quasidiag":
        return H.block(H.ref_fisher(case) * H.quasidiag_mask(case), off)
    view = H.view_of(H.modules(case)[name])
    blk = mat.data[name]
    if kind == "kfac":
        return H.kron_dense(blk.a, blk.g, view)
    return H.kron_dense(*H.fim(case, "kfac").factors[name], view)  # ekfac before update_diag


def check_blocks(case: str, mat, kinds: dict[str, str]) -> None:
    assert mat.kinds == kinds
    full = mat.to_torch()
    for name, off in H.offsets(case).items():
        ref.assert_close(
            H.block(full, off),
            expected_block(case, name, kinds[name], mat),
            TOL,
            f"{case} {name} ({kinds[name]})",
        )
    ref.assert_close(
        full - H.block_diagonal_part(full, case), torch.zeros_like(full), 0.0, "between layers"
    )


@H.CASES
def test_default_kinds_and_blocks(case):
    mat = H.fim(case, "mixed")
    assert isinstance(mat, PMatMixed)
    check_blocks(case, mat, {n: default_kind(case, n) for n in H.offsets(case)})
    kfac = H.fim(case, "kfac")
    for name, (a, g) in kfac.factors.items():  # the same factors as PMatKFAC
        assert torch.equal(mat.data[name].a, a) and torch.equal(mat.data[name].g, g)


@H.CASES
def test_operations_match_own_dense_matrix(case):
    mat = H.fim(case, "mixed")
    full = mat.to_torch()
    v = H.rand_pvector(mat, 13)
    x = v.get_flat_representation()
    ref.assert_close(mat.mv(v).get_flat_representation(), full @ x, TOL, "mv")
    ref.assert_close(mat.vTMv(v), x @ full @ x, TOL, "vTMv")
    ref.assert_close(mat.trace(), full.trace(), TOL, "trace")
    ref.assert_close(mat.get_diag(), full.diagonal(), TOL, "diag")
    ref.assert_close(mat.norm(), torch.linalg.norm(full), TOL, "norm")


@pytest.mark.parametrize("case", ["norms", "custom", "attention"])
def test_solve_blockwise(case):
    """Exact ``(B_l + λI)⁻¹`` on dense/diag blocks, the π-damped Kronecker inverse on KFAC ones."""
    regul = 1e-2
    mat = H.fim(case, "mixed")
    v = H.rand_pvector(mat, 14)
    x = v.get_flat_representation()
    got = mat.solve(v, regul).get_flat_representation()
    full = mat.to_torch()
    for name, (s, e) in H.offsets(case).items():
        if mat.kinds[name] == "kfac":
            blk = mat.data[name]
            inverse = H.pi_damped_kron_inverse(
                blk.a, blk.g, H.view_of(H.modules(case)[name]), regul
            )
        else:
            inverse = torch.linalg.inv(
                H.block(full, (s, e)) + regul * torch.eye(e - s, dtype=full.dtype)
            )
        ref.assert_close(got[s:e], inverse @ x[s:e], 1e-9, f"{name} solve")


def test_policy_by_layer_name_module_type_and_default():
    """The first match wins in the order layer name, module type, path, "default"."""
    case = "norms"  # 0 Conv2d, 1 GroupNorm, 4 Linear, 5 LayerNorm, 7 Linear
    policy = {"4": "ekfac", "Linear": "quasidiag", "GroupNorm": "diag", "default": "dense"}
    mat = engine.FIM(*H.built(case), "mixed", policy=policy)
    assert mat.policy == policy
    check_blocks(
        case, mat, {"0": "dense", "1": "diag", "4": "ekfac", "5": "dense", "7": "quasidiag"}
    )


def test_policy_by_path():
    case = "custom"  # 0 Linear, 1 Scale (torch.func), 2 Linear
    mat = engine.FIM(*H.built(case), "mixed", policy={"torch.func": "dense", "hooks": "diag"})
    check_blocks(case, mat, {"0": "diag", "1": "dense", "2": "diag"})


@pytest.mark.parametrize(
    "case, policy",
    [
        ("custom", {"1": "kfac"}),
        ("custom", {"Scale": "quasidiag", "default": "ekfac"}),
        ("embedding", {"Embedding": "quasidiag"}),
        ("cnn_bn", {"BatchNorm2d": "kfac"}),
        ("convtranspose", {"ConvTranspose2d": "quasidiag"}),
        ("attention", {"torch.func": "kfac"}),
    ],
    ids=[
        "torch_func_kfac",
        "scale_quasidiag",
        "embedding_quasidiag",
        "batchnorm_kfac",
        "convtranspose_quasidiag",
        "attention_kfac",
    ],
)
def test_a_kind_a_layer_cannot_take_falls_back_to_its_default(case, policy):
    mat = engine.FIM(*H.built(case), "mixed", policy=policy)
    kinds = {}
    for name in H.offsets(case):
        m = H.modules(case)[name]
        asked = (
            policy.get(name)
            or policy.get(type(m).__name__)
            or policy.get("hooks" if H.on_hooks(case, name) else "torch.func")
            or policy.get("default")
        )
        able = asked in ("kfac", "ekfac") and H.on_hooks(case, name) and H.is_kron(m)
        kinds[name] = asked if able else default_kind(case, name)
    check_blocks(case, mat, kinds)


def test_unknown_block_kind_is_rejected():
    with pytest.raises(engine.InvalidInputError, match="block kind"):
        engine.FIM(*H.built("mlp"), "mixed", policy={"Linear": "kronecker"})


def test_layers_no_representation_handles_get_the_fallback():
    """A torch.func layer above 4096 parameters: KFAC and Mixed store its exact diagonal; an
    attention module with separate q/k/v weights and ``bias_k`` (no Kronecker view) under KFAC
    gets an exact dense block, its ``out_proj`` a Kronecker one. No error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2100), zoo.Scale(2100), nn.Linear(2100, 3))
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    model, loader = zoo.build_model_loader(model, x)
    j = ref.jacobian(model, loader)
    h = ref.output_fisher(ref.outputs(model, loader), "classif_logits")
    diag = torch.einsum("nca,ncb,nba->a", j, h, j) / j.shape[0]
    s, e = ref.layer_offsets(model)["1"]
    for rep in ("kfac", "mixed"):
        mat = engine.FIM(model, loader, rep)
        assert mat.kinds == {"0": "kfac", "1": "diag", "2": "kfac"}
        ref.assert_close(mat.data["1"].d, diag[s:e], TOL, f"{rep} diagonal fallback")
    attention = H.fim("cross_attention_kdim", "kfac")
    assert attention.kinds == {"att": "dense", "att.out_proj": "kfac", "head": "kfac"}


def test_arithmetic():
    case = "norms"
    policy = {"Linear": "quasidiag", "Conv2d": "diag"}
    mat = engine.FIM(*H.built(case), "mixed", policy=policy)
    other = engine.FIM(*H.built(case), "mixed", policy=policy, variant="regression")
    a, b = mat.to_torch(), other.to_torch()
    for got, want in [
        (mat + other, a + b),
        (mat - other, a - b),
        (2.5 * mat, 2.5 * a),
        (mat * -1, -a),
    ]:
        assert isinstance(got, PMatMixed) and got.policy == policy
        ref.assert_close(got.to_torch(), want, TOL, "arithmetic")
    default = H.fim(case, "mixed")
    ref.assert_close((default * 3).to_torch(), 3 * default.to_torch(), TOL, "default * 3")
    for lhs, rhs in [(default, default), (mat, H.fim(case, "kfac")), (mat, H.fim(case, "dense"))]:
        with pytest.raises(UnsupportedOperationError) as err:
            lhs + rhs
        assert isinstance(err.value, TypeError)
        assert "to_torch" in str(err.value) and "PMatDense" in str(err.value)
    assert not isinstance(mat, PMatKFAC)


def test_defaults_are_documented():
    doc = PMatMixed.__doc__
    for word in ("KFAC", "dense", "normalisation", "diagonal", "torch.func", "falls back"):
        assert word in doc, word
