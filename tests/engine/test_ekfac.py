"""PMatEKFAC (George, Laurent, Bouthillier, Ballas & Vincent, NeurIPS 2018) against its definition.

Before ``update_diag`` EKFAC is KFAC in the Kronecker eigenbasis. After it, the eigenvalues are
``s = diag(Uᵀ F_l U)`` with ``U = U_G ⊗ U_A``: the block ``U diag(s) Uᵀ`` is the orthogonal
projection of the exact block ``F_l`` onto matrices diagonal in that basis, hence (George et al.,
Theorem) at least as close to ``F_l`` in Frobenius norm as KFAC (which is diagonal in the same
basis), and its trace is exact (``Σ s = tr(Uᵀ F_l U) = tr F_l``).
"""

from __future__ import annotations

import pytest
import torch

from fimntk import engine
from fimntk.engine import PMatEKFAC, UnsupportedOperationError
from tests import reference as ref
from tests.engine import _structured_helpers as H

pytestmark = H.ATTN_WARNING

TOL = 1e-10


def complete_basis(u: torch.Tensor) -> torch.Tensor:
    """``(groups, c, r)`` orthonormal columns completed to ``(groups, c, c)`` (first r kept)."""
    g, c, r = u.shape
    if r == c:
        return u
    extra = torch.randn(g, c, c - r, generator=torch.Generator().manual_seed(0), dtype=u.dtype)
    q = torch.linalg.qr(torch.cat([u, extra], dim=-1), mode="complete").Q
    return torch.cat([u, q[..., r:]], dim=-1)


@H.CASES
def test_equals_kfac_before_update_diag(case):
    mat = H.fim(case, "ekfac")
    kfac = H.fim(case, "kfac")
    assert isinstance(mat, PMatEKFAC) and not mat.diag_updated
    assert mat.kinds == {n: "ekfac" if k == "kfac" else k for n, k in kfac.kinds.items()}
    ref.assert_close(mat.to_torch(), kfac.to_torch(), TOL, "to_torch")
    ref.assert_close(mat.trace(), kfac.trace(), TOL, "trace")
    for name, (a, g) in kfac.factors.items():
        blk = mat.data[name]
        eye_a = torch.eye(blk.u_a.shape[-1], dtype=a.dtype).expand(a.shape[0], -1, -1)
        eye_g = torch.eye(g.shape[-1], dtype=g.dtype).expand_as(g)
        ref.assert_close(blk.u_a.transpose(-1, -2) @ blk.u_a, eye_a, TOL, "U_A orthogonal")
        ref.assert_close(blk.u_g.transpose(-1, -2) @ blk.u_g, eye_g, TOL, "U_G orthogonal")


@H.CASES
def test_update_diag_projects_the_exact_block_onto_the_eigenbasis(case):
    """``EKFAC_l = U diag(diag(Uᵀ F_l U)) Uᵀ`` on Kronecker layers, the exact block elsewhere;
    hence the trace is exact and, layer by layer, ``‖EKFAC_l − F_l‖ ≤ ‖KFAC_l − F_l‖``."""
    mat = H.ekfac_updated(case)
    assert mat.diag_updated
    exact = H.ref_fisher(case)
    kfac = H.fim(case, "kfac").to_torch()
    full = mat.to_torch()
    mods = H.modules(case)
    ref.assert_close(mat.trace(), exact.trace(), TOL, "trace is exact")
    ref.assert_close(full.trace(), exact.trace(), TOL, "trace of to_torch")
    for name, off in H.offsets(case).items():
        f_l, e_l, k_l = (H.block(m, off) for m in (exact, full, kfac))
        blk = mat.data[name]
        if blk.kind == "ekfac":
            view = H.view_of(mods[name])
            u_a = complete_basis(blk.u_a)  # a thin basis, completed: rest = 0 on the same data
            u = H.kron_dense(u_a, blk.u_g, view)  # X ↦ U_G X U_Aᵀ, flat coordinates
            s = torch.diagonal(u.t() @ f_l @ u)
            ref.assert_close(e_l, (u * s) @ u.t(), TOL, f"{name} projection")
            r = blk.u_a.shape[-1]
            ref.assert_close(blk.s, s[view.flat_index()][..., :r], TOL, f"{name} eigenvalues")
            ref.assert_close(e_l.trace(), f_l.trace(), TOL, f"{name} trace")
        else:
            ref.assert_close(e_l, f_l, TOL, f"{name} exact block")
        err_e = torch.linalg.norm(e_l - f_l)
        err_k = torch.linalg.norm(k_l - f_l)
        assert err_e <= err_k + 1e-12 * torch.linalg.norm(f_l), (name, err_e, err_k)
    ref.assert_close(
        full - H.block_diagonal_part(full, case), torch.zeros_like(full), 0.0, "between layers"
    )


@H.CASES
def test_operations_match_own_dense_matrix(case):
    mat = H.ekfac_updated(case)
    full = mat.to_torch()
    v = H.rand_pvector(mat, 3)
    x = v.get_flat_representation()
    ref.assert_close(mat.mv(v).get_flat_representation(), full @ x, TOL, "mv")
    ref.assert_close(mat.vTMv(v), x @ full @ x, TOL, "vTMv")
    ref.assert_close(mat.get_diag(), full.diagonal(), TOL, "diag")
    ref.assert_close(mat.norm(), torch.linalg.norm(full), TOL, "norm")


@pytest.mark.parametrize("case", ["mlp", "cnn_bn", "grouped_conv", "embedding", "custom"])
def test_damping_is_exact(case):
    """``solve(v, λ)`` is ``(EKFAC + λI)⁻¹ v`` (eigenvalues ``s + λ``): the residual against its
    own dense matrix is at rounding level; ``inv`` and ``pow`` agree."""
    regul = 1e-3
    mat = H.ekfac_updated(case)
    full = mat.to_torch()
    v = H.rand_pvector(mat, 4)
    x = mat.solve(v, regul).get_flat_representation()
    damped = full + regul * torch.eye(full.shape[0], dtype=full.dtype)
    ref.assert_close(damped @ x, v.get_flat_representation(), 1e-9, "residual")
    ref.assert_close(x, torch.linalg.solve(damped, v.get_flat_representation()), 1e-9, "solve")
    inv = mat.inv(regul)
    assert isinstance(inv, PMatEKFAC)
    ref.assert_close(inv.mv(v).get_flat_representation(), x, 1e-9, "inv.mv")
    root = mat.pow(0.5).to_torch()
    ref.assert_close(root @ root, full, 1e-9, "sqrt squared")


def test_arithmetic_in_a_shared_eigenbasis():
    mat = H.ekfac_updated("cnn_bn")
    full = mat.to_torch()
    ref.assert_close((mat + mat).to_torch(), 2 * full, TOL, "+")
    ref.assert_close((mat - 0.5 * mat).to_torch(), 0.5 * full, TOL, "-")
    ref.assert_close((3.0 * mat).to_torch(), 3 * full, TOL, "*")
    assert isinstance(mat + mat, PMatEKFAC) and isinstance(2 * mat, PMatEKFAC)


def test_arithmetic_across_eigenbases_or_representations_raises():
    mat = H.ekfac_updated("mlp")
    model, loader = H.built("mlp")
    first_batch = [next(iter(loader))]
    other = engine.FIM(model, first_batch, "ekfac")  # another eigenbasis
    for rhs in (other, H.fim("mlp", "kfac"), H.fim("mlp", "dense")):
        with pytest.raises(UnsupportedOperationError) as err:
            mat + rhs
        assert isinstance(err.value, TypeError)
        assert "to_torch" in str(err.value) and "PMatDense" in str(err.value)


def test_update_diag_needs_a_generator():
    mat = H.fim("mlp", "ekfac")
    bare = PMatEKFAC(mat.layer_collection, data=dict(mat.data))
    with pytest.raises(engine.InvalidInputError, match="generator"):
        bare.update_diag(H.built("mlp")[1])
    assert not mat.diag_updated  # the shared matrix was not touched


@pytest.mark.parametrize("n", [5, 700, 1100])
def test_column_major_bases_are_made_row_major_in_place(n):
    """LAPACK's column-major eigenvectors become row-major without a second copy of the basis
    (blocks of the storage are swapped), with exactly the same values."""
    from fimntk.engine.linalg import row_major

    m = torch.randn(2, n, n, dtype=torch.float64)
    col = m.transpose(-1, -2).contiguous().transpose(-1, -2)
    storage = col.untyped_storage().data_ptr()
    out = row_major(col)
    assert out.is_contiguous() and torch.equal(out, m)
    assert out.untyped_storage().data_ptr() == storage


def _other_data_ekfac():
    """EKFAC of the ``norms`` model, whose Linear(100 → 6) input factor has rank ≤ 13 (a thin
    basis), with its eigenvalues re-estimated on 17 other inputs."""
    model, loader = H.built("norms")
    mat = engine.FIM(model, loader, "ekfac")
    x = torch.randn(17, 2, 5, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    other = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=6)
    return model, other, mat.update_diag(other)


def test_a_low_rank_input_factor_gets_a_thin_basis():
    """A = E[ã ãᵀ] summed from 13 vectors of size 101: its basis keeps 13 + 8 columns, found
    by a range finder, and EKFAC still equals KFAC (the complement carries 0)."""
    mat = H.fim("norms", "ekfac")
    blk = mat.data["4"]
    assert blk.thin and tuple(blk.u_a.shape) == (1, 101, 21) and float(blk.rest) == 0.0
    a, _ = H.fim("norms", "kfac").factors["4"]
    proj = blk.u_a @ blk.u_a.transpose(-1, -2)
    ref.assert_close(proj @ a, a, TOL, "range(A) inside the thin basis")
    assert sum(b.u_a.numel() for b in mat.data.values() if b.kind == "ekfac") < 101 * 101


def test_update_diag_on_other_data_puts_the_energy_outside_the_thin_basis_in_rest():
    """Gradients of other inputs leave the range of A: inside the basis EKFAC takes
    ``s = diag(Uᵀ F_l U)``, outside it the mean energy per dimension ``rest`` — so the trace
    stays exact — and every operation agrees with the dense matrix that this defines."""
    model, other, mat = _other_data_ekfac()
    exact = ref.fisher(model, other)
    blk = mat.data["4"]
    view = H.view_of(H.modules("norms")["4"])
    off = H.offsets("norms")["4"]
    f_l = H.block(exact, off)
    u = H.kron_dense(complete_basis(blk.u_a), blk.u_g, view)
    inside = torch.zeros(view.groups, view.q, view.cols, dtype=torch.bool)
    inside[..., : blk.u_a.shape[-1]] = True
    inside = inside.reshape(-1)[view.flat_index().reshape(-1).argsort()]
    s = torch.diagonal(u.t() @ f_l @ u)
    rest = (f_l.trace() - s[inside].sum()) / int((~inside).sum())
    assert rest > 1e-3 * f_l.trace() / f_l.shape[0], "the other data should leave the basis"
    ref.assert_close(blk.rest, rest, TOL, "rest")
    expected = (u * torch.where(inside, s, rest)) @ u.t()
    full = mat.to_torch()
    ref.assert_close(H.block(full, off), expected, TOL, "thin block")
    ref.assert_close(mat.trace(), exact.trace(), TOL, "trace is exact")
    v = H.rand_pvector(mat, 6)
    x = v.get_flat_representation()
    ref.assert_close(mat.mv(v).get_flat_representation(), full @ x, TOL, "mv")
    ref.assert_close(mat.get_diag(), full.diagonal(), TOL, "diag")
    ref.assert_close(mat.norm(), torch.linalg.norm(full), TOL, "norm")
    regul = 1e-3
    damped = full + regul * torch.eye(full.shape[0], dtype=full.dtype)
    ref.assert_close(
        mat.solve(v, regul).get_flat_representation(), torch.linalg.solve(damped, x), 1e-9, "solve"
    )
    root = mat.pow(0.5).to_torch()
    ref.assert_close(root @ root, full, 1e-9, "sqrt squared")
    ref.assert_close((mat - 0.25 * mat).to_torch(), 0.75 * full, TOL, "arithmetic")
