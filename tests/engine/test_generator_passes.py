"""How the generator runs its passes: chunks of pseudo-outputs, the remembered verification and
the forward-mode tangents of the hooked layers, each against the ``torch.func`` reference."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from fimntk import engine
from fimntk.engine.generator import batch_jacobian
from fimntk.engine.generator import jacobian as jacobian_module
from tests import reference as ref
from tests import zoo
from tests.engine import _structured_helpers as H

pytestmark = [H.ATTN_WARNING, H.JIT_WARNING]

TOL = 1e-10
CHUNKED_CASES = [
    "mlp",
    "cnn_bn",
    "convtranspose",
    "grouped_conv",
    "embedding",
    "custom",
    "shared_twice",
]


def _case(name: str) -> zoo.Case:
    for c in zoo.CASES + zoo.EXTRA_CASES:
        if c.name == name:
            return c
    raise KeyError(name)


@pytest.mark.parametrize("case", CHUNKED_CASES)
def test_one_pseudo_output_per_chunk_gives_the_same_matrices(case, monkeypatch):
    """With chunks of one pseudo-output (a byte budget of 1), every representation that sums
    over pseudo-outputs equals the reference, and KFAC's input factor is counted once."""
    model, loader = zoo.build(_case(case))
    full = ref.fisher(model, loader)
    unchunked = engine.FIM(model, loader, "kfac")
    monkeypatch.setattr(jacobian_module, "K_CHUNK_BYTES", 1)
    ref.assert_close(engine.FIM(model, loader, "dense").to_torch(), full, TOL, "dense")
    ref.assert_close(engine.FIM(model, loader, "diag").get_diag(), full.diagonal(), TOL, "diag")
    bd = engine.FIM(model, loader, "blockdiag")
    for name, (s, e) in ref.layer_offsets(model).items():
        ref.assert_close(bd.data[name], full[s:e, s:e], TOL, f"block {name}")
    kfac = engine.FIM(model, loader, "kfac")
    for name, blk in kfac.data.items():
        for t_chunked, t_whole in zip(
            blk.tensors().values(), unchunked.data[name].tensors().values()
        ):
            ref.assert_close(t_chunked, t_whole, TOL, f"KFAC {name}")
    qd = engine.FIM(model, loader, "quasidiag")
    ref.assert_close(qd.get_diag(), full.diagonal(), TOL, "quasidiag diagonal")
    ekfac = engine.FIM(model, loader, "ekfac").update_diag(loader)
    ref.assert_close(ekfac.trace(), full.trace(), TOL, "EKFAC trace after update_diag")


def test_normalised_inputs_are_computed_once_per_batch(monkeypatch):
    """In chunks of one pseudo-output, a BatchNorm's ``x̂`` is computed once per batch, not per
    chunk, and the diagonal still equals the reference."""
    from fimntk.engine.layers import norm

    calls: list[int] = []
    plain = norm.BatchNormKernel.normalized

    def counted(self, x):
        calls.append(x.shape[0])
        return plain(self, x)

    monkeypatch.setattr(norm.BatchNormKernel, "normalized", counted)
    monkeypatch.setattr(jacobian_module, "K_CHUNK_BYTES", 1)
    model, loader = zoo.build(_case("cnn_bn"))
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    diag = engine.FIM(model, loader, "diag").get_diag()
    ref.assert_close(diag, ref.fisher(model, loader).diagonal(), TOL, "diag")
    assert bns > 0 and len(calls) == bns * len(loader)


@pytest.mark.parametrize("case", [*CHUNKED_CASES, "attention", "transformer_encoder"])
@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_looped_and_batched_backward_passes_give_the_reference(case, mode, monkeypatch):
    """The K backward passes as a loop of plain passes or as one batched pass (the engine picks
    by size, :data:`BATCHED_BACKWARD_BYTES`): both give the torch.func Fisher, and the chosen
    one is the one that ran."""
    model, loader = zoo.build(_case(case))
    full = ref.fisher(model, loader)
    monkeypatch.setattr(
        jacobian_module, "BATCHED_BACKWARD_BYTES", -1 if mode == "loop" else 1 << 40
    )
    calls = []
    real = jacobian_module.batched_weighted_grads

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(jacobian_module, "batched_weighted_grads", counted)
    ref.assert_close(engine.FIM(model, loader, "dense").to_torch(), full, TOL, "dense")
    ref.assert_close(engine.FIM(model, loader, "diag").get_diag(), full.diagonal(), TOL, "diag")
    ekfac = engine.FIM(model, loader, "ekfac").update_diag(loader)
    ref.assert_close(ekfac.trace(), full.trace(), TOL, "EKFAC trace after update_diag")
    hooked = any(True for _ in engine.Jacobian(model).hooked_modules())
    assert bool(calls) == (mode == "batched" and hooked)


def test_chunks_bound_the_output_gradients_held_at_once(monkeypatch):
    """A budget of one pseudo-output's gradients yields K chunks per batch, the first flagged."""
    model, loader = zoo.build(_case("cnn_bn"))
    monkeypatch.setattr(jacobian_module, "K_CHUNK_BYTES", 1)
    gen = engine.Jacobian(model, pseudo_outputs=engine.generator.ExactFisher("classif_logits"))
    chunks = list(gen.batches(loader))
    c = model(next(iter(loader))[0]).shape[1]
    assert all(bj.k == 1 for bj in chunks)
    assert len(chunks) == c * len(loader)
    assert sum(bj.first for bj in chunks) == len(loader)
    assert gen.n_examples == len(loader.dataset)


class WeightAlsoOutside(nn.Module):
    """``fc``'s weight also scales the output: hooks alone would miss that use."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x))) * self.fc.weight.sum()


def test_remembered_verification_still_moves_a_weight_used_outside(monkeypatch):
    torch.manual_seed(0)
    model = WeightAlsoOutside().double()
    x = torch.randn(9, 4, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    expected = ref.fisher(model, loader)
    first = engine.FIM(model, loader, "dense")
    assert first.paths == {"fc": "torch.func", "head": "hooks"}
    checks = []
    real = engine.layers.outer_product.OuterKernel.grad_sum

    def counting(self, *args):
        checks.append(1)
        return real(self, *args)

    monkeypatch.setattr(engine.layers.outer_product.OuterKernel, "grad_sum", counting)
    for rep in ("dense", "kfac", "implicit"):
        mat = engine.FIM(model, loader, rep)
        if rep == "implicit":
            v = H.rand_pvector(mat, 3)
            xv = v.get_flat_representation()
            ref.assert_close(mat.vTMv(v), xv @ expected @ xv, TOL, "implicit vTMv")
            ref.assert_close(mat.mv(v).get_flat_representation(), expected @ xv, TOL, "mv")
        elif rep == "dense":
            ref.assert_close(mat.to_torch(), expected, TOL, "dense, remembered")
        assert mat.generator.paths == {"fc": "torch.func", "head": "hooks"}
    assert not checks  # remembered: no second verification pass
    other = WeightAlsoOutside().double()  # another model is checked afresh
    assert engine.FIM(other, loader, "diag").paths == {"fc": "torch.func", "head": "hooks"}
    assert checks


@pytest.mark.parametrize("case", zoo.EXTRA_CASES, ids=zoo.EXTRA_CASE_IDS)
def test_forward_mode_products_on_more_layer_configurations(case):
    """vᵀFv and Fv of the implicit Fisher (tangents added by the hooks) on padding modes,
    transposed and 1-d/3-d convolutions, keyword calls, in-place residuals, frozen parts."""
    model, loader = zoo.build(case, n=7, batch_size=3)
    full = ref.fisher(model, loader)
    mat = engine.FIM(model, loader, "implicit")
    v = H.rand_pvector(mat, 4)
    xv = v.get_flat_representation()
    ref.assert_close(mat.vTMv(v), xv @ full @ xv, TOL, "vTMv")
    ref.assert_close(mat.mv(v).get_flat_representation(), full @ xv, TOL, "mv")


def test_implicit_products_validate_the_outputs():
    """An implicit matrix reads the loader only when operated on; its products then check the
    outputs like every other representation and name the fix."""
    model, loader = zoo.build(_case("mlp"))
    mat = engine.FIM(model, loader, "implicit", n_output=7)
    v = H.rand_pvector(mat, 1)
    with pytest.raises(engine.InvalidInputError, match="n_output=7"):
        mat.vTMv(v)
    bad = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(6, 3).double()), batch_size=3
    )
    with pytest.raises(engine.InvalidInputError, match="shapes"):
        engine.FIM(model, bad, "implicit").mv(v)


@pytest.mark.parametrize("case", ["cnn_bn", "embedding", "attention", "shared_twice"])
def test_forward_mode_products_on_part_of_the_layers(case):
    """Layers left out of the collection contribute no tangent; the rest equal the dense
    reference of the same collection (the hooked and the ``torch.func`` layers alike)."""
    model, loader = zoo.build(_case(case))
    full = engine.LayerCollection.from_model(model)
    lc = full.sub([e.name for e in full][1:])
    dense = engine.FIM(model, loader, "dense", layer_collection=lc).to_torch()
    expected = ref.fisher(model, loader)
    keep = torch.cat(
        [
            torch.arange(s, e)
            for name, (s, e) in ref.layer_offsets(model).items()
            if name in {e.name for e in lc}
        ]
    )
    ref.assert_close(dense, expected[keep][:, keep], TOL, "dense on the sub-collection")
    mat = engine.FIM(model, loader, "implicit", layer_collection=lc)
    v = engine.PVector(
        lc, torch.randn(lc.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    )
    xv = v.get_flat_representation()
    ref.assert_close(mat.vTMv(v), xv @ dense @ xv, TOL, "vTMv")
    ref.assert_close(mat.mv(v).get_flat_representation(), dense @ xv, TOL, "mv")


def test_hooked_layer_outputs_are_freed_after_the_forward_pass():
    """The generator keeps each hooked layer's place in the graph, not its output: a Linear's
    output that only a ReLU read (ReLU saves its own result) is gone during the backward passes.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    loader = zoo.build_model_loader(model, torch.randn(6, 5))[1]
    first: list = []
    alive: list[bool] = []

    def keep_ref(module, inputs, output):
        first.append(weakref.ref(output))

    def watch(module, inputs, output):
        if output.requires_grad:
            output.register_hook(lambda g: alive.append(first[-1]() is not None))

    handles = [model[0].register_forward_hook(keep_ref), model[2].register_forward_hook(watch)]
    try:
        diag = engine.FIM(model, loader, "diag").get_diag()
    finally:
        for h in handles:
            h.remove()
    ref.assert_close(diag, ref.fisher(model, loader).diagonal(), TOL, "diag")
    assert alive and not any(alive), alive


def test_finiteness_check_tells_overflow_from_non_finite_entries():
    """The check sums first; a sum that overflows on finite entries is not an error."""
    big = torch.full((4,), 3e38)
    assert batch_jacobian.check_finite(big, "x") is big
    for bad in (float("nan"), float("inf")):
        t = torch.ones(5)
        t[2] = bad
        with pytest.raises(engine.InvalidInputError, match="non-finite"):
            batch_jacobian.check_finite(t, "x")
