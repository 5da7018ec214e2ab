"""The implicit products and the diagonal in slices of examples
(:mod:`fimntk.engine.generator.slicing`).

With :data:`~fimntk.engine.generator.slicing.SLICE_BYTES` at one byte (and the implicit
products' threshold at zero) every batch runs one example at a time; every product must still
equal the dense ``torch.func`` reference (a slice that dropped, repeated or mis-weighted
examples, or split a dimension other than the examples', would not). A batch whose first
dimension is not provably the examples, and Monte Carlo draws, are never split.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimntk import engine
from fimntk.engine.generator import slicing
from fimntk.engine.pspace import implicit
from tests import reference as ref
from tests import zoo
from tests.engine import _structured_helpers as H

pytestmark = [H.ATTN_WARNING, H.JIT_WARNING]

TOL = 1e-10


@pytest.fixture
def one_example_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slicing, "SLICE_BYTES", 1)
    monkeypatch.setattr(implicit, "FORWARD_SLICES_ABOVE", 0)


def _assert_products(model: nn.Module, loader, mat: engine.PMatImplicit, tol: float) -> None:
    full = ref.fisher(model, loader)
    n = len(loader.dataset)
    v = H.rand_pvector(mat, 3)
    x = v.get_flat_representation()
    ref.assert_close(mat.vTMv(v), x @ full @ x, tol, "vTMv")
    ref.assert_close(mat.mv(v).get_flat_representation(), full @ x, tol, "mv")
    # pseudo-outputs of the exact Fisher: J v weighted by the output Fisher's square root
    jv = mat.push_forward(v)  # (K, n)
    ref.assert_close((jv * jv).sum() / n, x @ full @ x, tol, "push_forward")
    u = torch.randn(jv.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = mat.pull_back(u).get_flat_representation()
    ref.assert_close(x @ got, (u * jv).sum(), tol, "pull_back is the adjoint of push_forward")


@H.CASES
def test_products_in_slices_of_one_example_equal_the_reference(case, one_example_slices):
    model, loader = zoo.build(H.BY_NAME[case])
    mat = engine.FIM(model, loader, "implicit")
    _assert_products(model, loader, mat, TOL)
    assert mat.generator._slicer.examples == 1, "the batches were not sliced"


def test_one_batch_of_a_batchnorm_cnn_in_slices(one_example_slices):
    model, loader = zoo.build(H.BY_NAME["cnn_bn"], n=11, batch_size=11)
    mat = engine.FIM(model, loader, "implicit")
    _assert_products(model, loader, mat, TOL)
    assert mat.generator._slicer.examples == 1


def test_dict_batches_of_a_transformer_in_slices(one_example_slices):
    pytest.importorskip("transformers")
    from tests.engine.test_dict_inputs import Packed, _bert, _loaders

    model = _bert()
    dicts, tensors = _loaders()
    mat = engine.FIM(model, dicts, "implicit")
    full = ref.fisher(Packed(model), tensors)
    v = H.rand_pvector(mat, 5)
    x = v.get_flat_representation()
    ref.assert_close(mat.vTMv(v), x @ full @ x, 1e-9, "vTMv")
    ref.assert_close(mat.mv(v).get_flat_representation(), full @ x, 1e-9, "mv")
    assert mat.generator._slicer.examples == 1


class SequenceFirst(nn.Module):
    """Self-attention on ``(L, n, e)`` inputs (``batch_first=False``), mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(x, x, x, need_weights=False)[0].mean(0))


def test_a_sequence_first_batch_is_not_split(one_example_slices):
    """Inputs ``(L, n, e)`` with ``L == n``: dimension 0 is not the examples, so no slice."""
    torch.manual_seed(0)
    model = SequenceFirst().double().eval()
    x = torch.randn(4, 4, 4, dtype=torch.float64)
    loader = [(x,)]
    mat = engine.FIM(model, loader, "implicit")
    v = H.rand_pvector(mat, 6)
    vec = v.get_flat_representation()

    class Transposed(nn.Module):  # examples first, for the reference
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, xt: torch.Tensor) -> torch.Tensor:
            return self.inner(xt.transpose(0, 1))

    full = ref.fisher(Transposed(), DataLoader(TensorDataset(x.transpose(0, 1)), batch_size=4))
    ref.assert_close(mat.vTMv(v), vec @ full @ vec, TOL, "vTMv")
    assert mat.generator._slicer.examples == 0


def test_monte_carlo_draws_are_not_split(one_example_slices):
    model, loader = zoo.build(H.BY_NAME["cnn_bn"])
    dense = engine.FIM_MonteCarlo(model, loader, "dense", trials=3, seed=5).to_torch()
    mat = engine.FIM_MonteCarlo(model, loader, "implicit", trials=3, seed=5)
    v = H.rand_pvector(mat, 7)
    x = v.get_flat_representation()
    ref.assert_close(mat.vTMv(v), x @ dense @ x, TOL, "MC vTMv")
    ref.assert_close(mat.mv(v).get_flat_representation(), dense @ x, TOL, "MC mv")


class ConstantBranch(nn.Module):
    """A Linear on the examples plus a module whose output does not grow with them."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(1000, 50)
        self.lin = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.table(torch.arange(1000)).sum()  # 1000 × 50 × 4 bytes, whatever n
        return self.lin(x) + bias


def test_slices_are_sized_by_what_one_example_adds():
    model = ConstantBranch()
    slicer = slicing.ExampleSlicer(model, model, slice_bytes=3 * 4 * 4)
    batch = (torch.randn(13, 6),)
    parts = list(slicer.slices(batch))
    # one example adds 3 output floats (12 bytes) to the Linear and to the whole model; the
    # table's 200 kB do not grow with the examples and do not count
    assert slicer.examples == 4
    assert [p[0].shape[0] for p in parts] == [3, 3, 3, 4]
    assert torch.equal(torch.cat([p[0] for p in parts]), batch[0])


def test_a_batch_that_fits_is_not_split():
    model = nn.Linear(6, 3)
    slicer = slicing.ExampleSlicer(model, lambda x, y: model(x))
    batch = (torch.randn(9, 6), torch.arange(9))
    assert [part is batch for part in slicer.slices(batch)] == [True]
    assert slicer.examples is not None and slicer.examples > 9


def test_tensors_of_other_first_dimensions_are_not_split():
    model = nn.Linear(6, 3)
    slicer = slicing.ExampleSlicer(model, model, slice_bytes=1)
    batch = (torch.randn(9, 6), torch.arange(4))
    assert [part is batch for part in slicer.slices(batch)] == [True]


@H.CASES
def test_the_diagonal_in_slices_of_one_example_equals_the_reference(case, one_example_slices):
    model, loader = zoo.build(H.BY_NAME[case])
    mat = engine.FIM(model, loader, "diag")
    ref.assert_close(mat.get_diag(), ref.fisher(model, loader).diagonal(), TOL, "diag")
    assert mat.generator._slicer.examples == 1, "the batches were not sliced"


def test_the_monte_carlo_diagonal_is_not_sliced(one_example_slices):
    model, loader = zoo.build(H.BY_NAME["cnn_bn"])
    dense = engine.FIM_MonteCarlo(model, loader, "dense", trials=3, seed=5).to_torch()
    diag = engine.FIM_MonteCarlo(model, loader, "diag", trials=3, seed=5)
    ref.assert_close(diag.get_diag(), dense.diagonal(), TOL, "MC diag")
    assert diag.generator._slicer is None


def test_the_probe_leaves_the_random_state_alone():
    model = nn.Sequential(nn.Linear(6, 3), nn.Dropout(0.5)).train()
    slicer = slicing.ExampleSlicer(model, model, slice_bytes=12)
    batch = (torch.randn(5, 6),)
    state = torch.get_rng_state()
    parts = list(slicer.slices(batch))
    assert torch.equal(torch.get_rng_state(), state)
    assert slicer.examples == 1 and len(parts) == 5


def test_the_measurement_is_remembered_per_model_and_batch_signature():
    model = nn.Linear(6, 3)
    calls: list[int] = []
    model.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))

    def function(x, *labels):
        return model(x)

    for _ in range(2):
        slicer = slicing.ExampleSlicer(model, function, key="f", slice_bytes=24)
        assert len(list(slicer.slices((torch.randn(7, 6),)))) == 4
    assert calls == [1, 2], "probed once: one and two examples"
    other = slicing.ExampleSlicer(model, function, key="f", slice_bytes=24)
    assert len(list(other.slices((torch.randn(7, 6), torch.arange(7))))) == 4
    assert calls == [1, 2, 1, 2], "another batch signature: probed again"


def test_a_batch_below_the_threshold_is_not_split():
    model = nn.Linear(6, 3)
    slicer = slicing.ExampleSlicer(model, model, slice_bytes=12)
    batch = (torch.randn(5, 6),)
    assert [part is batch for part in slicer.slices(batch, above=5 * 12)] == [True]
    assert len(list(slicer.slices(batch, above=4 * 12))) == 5
