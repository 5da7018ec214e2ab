"""Memory planning: ``fimntk.engine.estimate_memory`` and ``FIM(..., memory_budget=bytes)``.

The estimate must equal the bytes the representation actually stores, measured as the sum of the
tensors' sizes in its saved file (EKFAC: as if every input basis were full; a thin one stores
less); a budget too small raises ``MemoryBudgetError`` (a
``ValueError``) naming the need and a cheaper representation that fits, before any computation.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from torch import nn

from fimntk import engine
from fimntk.engine import MemoryBudgetError, estimate_memory
from tests.engine import _structured_helpers as H

pytestmark = H.ATTN_WARNING

STORED = ["dense", "diag", "blockdiag", "quasidiag", "kfac", "ekfac", "mixed", "lowrank"]
MEMORY_CASES = [
    "mlp",
    "cnn_bn",
    "norms",
    "convtranspose",
    "grouped_conv",
    "embedding",
    "custom",
    "attention",
]


def file_bytes(obj, path) -> int:
    """Bytes of the tensors ``obj`` stores, read back from its saved file."""
    engine.save(obj, path)
    with safe_open(str(path), framework="pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())  # noqa: SIM118


def thin_saving(mat) -> int:
    """Bytes a thin EKFAC input basis saves against the full one the estimate assumes (an upper
    bound: the rank of A is known only once the data have been seen)."""
    out = 0
    blocks = mat.data.values() if isinstance(mat.data, dict) else ()
    for blk in blocks:
        if getattr(blk, "thin", False):
            g, c, r = blk.u_a.shape
            q = blk.u_g.shape[-1]
            out += (g * c * (c - r) + g * q * (c - r) - 1) * blk.u_a.element_size()
    return out


@pytest.mark.parametrize(
    "case, dtype",
    [(c, torch.float64) for c in MEMORY_CASES]
    + [(c, torch.float32) for c in ("cnn_bn", "embedding", "custom")],
    ids=[f"{c}-float64" for c in MEMORY_CASES]
    + [f"{c}-float32" for c in ("cnn_bn", "embedding", "custom")],
)
def test_estimate_equals_the_bytes_stored(tmp_path, case, dtype):
    model, _ = H.built(case, dtype)
    for rep in STORED:
        mat = H.fim(case, rep, dtype)
        est = estimate_memory(model, rep, n_output=3, n_examples=13)
        assert est == file_bytes(mat, tmp_path / f"{rep}.safetensors") + thin_saving(mat), rep
        # the class and its "PMat" name are accepted too
        assert estimate_memory(model, type(mat).__name__, 3, n_examples=13) == est
        assert (
            estimate_memory(model, rep, 3, n_examples=13, dtype=torch.float16)
            * (dtype.itemsize // 2)
            == est
        )


def test_estimate_of_the_ntk_gram_and_other_pseudo_outputs(tmp_path):
    model, loader = H.built("cnn_bn")
    gram = engine.NTK(model, loader)
    assert estimate_memory(model, "ntk", 3, n_examples=13) == file_bytes(gram, tmp_path / "g")
    mc = engine.FIM_MonteCarlo(model, loader, "lowrank", trials=2, seed=0)
    assert estimate_memory(model, "lowrank", 3, n_examples=13, n_pseudo=2) == file_bytes(
        mc, tmp_path / "mc"
    )
    emp = engine.EmpiricalFIM(model, loader, "lowrank")
    assert estimate_memory(model, "lowrank", 3, n_examples=13, n_pseudo=1) == file_bytes(
        emp, tmp_path / "emp"
    )


def test_estimate_for_a_layer_subset(tmp_path):
    model, loader = H.built("norms")
    lc = engine.LayerCollection.from_model(model, layers=["1", "4"])
    for rep in ("dense", "kfac", "quasidiag"):
        mat = engine.FIM(model, loader, rep, layer_collection=lc)
        assert estimate_memory(model, rep, 3, layer_collection=lc) == file_bytes(
            mat, tmp_path / rep
        )


def test_estimate_needs_n_examples_for_lowrank_and_ntk():
    model, _ = H.built("mlp")
    for rep in ("lowrank", "ntk"):
        with pytest.raises(engine.InvalidInputError, match="n_examples"):
            estimate_memory(model, rep, 3)
    with pytest.raises(engine.InvalidInputError, match="unknown representation"):
        estimate_memory(model, "sparse", 3)


def test_estimate_reads_only_the_structure():
    """A model on the meta device (no storage) gives the same estimate; implicit is O(d)."""
    with torch.device("meta"):
        big = nn.Sequential(nn.Linear(4096, 4096), nn.Tanh(), nn.Linear(4096, 10))
    d = 4096 * 4097 + 4097 * 10
    assert estimate_memory(big, "dense", 10) == 4 * d * d
    assert estimate_memory(big, "diag", 10) == 4 * d
    assert estimate_memory(big, "kfac", 10) == 4 * (4097**2 + 4096**2 + 4097**2 + 10**2)
    assert estimate_memory(big, "implicit", 10) < 8 * 4 * d
    model, _ = H.built("grouped_conv")
    with torch.device("meta"):
        twin = H.BY_NAME["grouped_conv"].build_model().double()
    for rep in STORED:
        assert estimate_memory(twin, rep, 3, 13) == estimate_memory(model, rep, 3, 13), rep


# ----- budgets ---------------------------------------------------------------------------------


def parse_bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[unit]


@pytest.mark.parametrize(
    "case, rep",
    [("mlp", "dense"), ("cnn_bn", "blockdiag"), ("norms", "kfac"), ("custom", "lowrank")],
)
def test_budget_too_small_raises_before_computing(case, rep):
    model, loader = H.built(case)
    need = estimate_memory(model, rep, 3, n_examples=13)
    diag = estimate_memory(model, "diag", 3)
    budget = max(diag, need // 4)
    counting = H.CountingLoader(loader, limit=1)  # the probe may read one batch, no more
    with pytest.raises(MemoryBudgetError) as err:
        engine.FIM(model, counting, rep, memory_budget=budget)
    assert isinstance(err.value, ValueError) and isinstance(err.value, engine.InvalidInputError)
    msg = str(err.value)
    assert counting.taken <= 1
    m = re.search(
        r"'(\w+)' needs ([\d.]+ \w+), over the budget of ([\d.]+ \w+); '(\w+)' "
        r"needs ([\d.]+ \w+) and fits",
        msg,
    )
    assert m, msg
    assert m.group(1) == rep
    assert parse_bytes(m.group(2)) == pytest.approx(need, rel=0.01)
    assert parse_bytes(m.group(3)) == pytest.approx(budget, rel=0.01)
    cheaper = m.group(4)
    alt = estimate_memory(model, cheaper, 3, n_examples=13)
    assert alt <= budget < need and cheaper != rep
    assert parse_bytes(m.group(5)) == pytest.approx(alt, rel=0.01)
    built = engine.FIM(model, loader, cheaper, memory_budget=budget)  # the suggestion works
    assert built.name == cheaper


def test_budget_that_fits_builds_the_representation():
    model, loader = H.built("mlp")
    need = estimate_memory(model, "kfac", 3)
    mat = engine.FIM(model, loader, "kfac", memory_budget=need)
    ref_mat = H.fim("mlp", "kfac")
    assert torch.equal(mat.to_torch(), ref_mat.to_torch())
    with pytest.raises(MemoryBudgetError):
        engine.FIM(model, loader, "kfac", memory_budget=need - 1)


def test_budget_counts_monte_carlo_trials_and_examples():
    model, loader = H.built("mlp")
    need = estimate_memory(model, "lowrank", 3, n_examples=13, n_pseudo=4)
    with pytest.raises(MemoryBudgetError):
        engine.FIM_MonteCarlo(model, loader, "lowrank", trials=4, memory_budget=need - 1, seed=0)
    mat = engine.FIM_MonteCarlo(model, loader, "lowrank", trials=4, memory_budget=need, seed=0)
    assert mat.data.shape == (4 * 13, mat.shape[0])


def test_budget_nothing_fits():
    model, loader = H.built("mlp")
    with pytest.raises(MemoryBudgetError, match="no representation fits"):
        engine.FIM(model, loader, "dense", memory_budget=8)


def test_budget_on_a_large_model_fails_fast():
    """Linear(4096, 4096), c = 4096: dense would need about 1 PiB; the error comes right after
    the first batch's probe and names a representation that fits in 1 GiB."""
    model = nn.Linear(4096, 4096)
    x = torch.randn(4, 4096)
    loader = H.CountingLoader(
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=2), limit=1
    )
    with pytest.raises(MemoryBudgetError) as err:
        engine.FIM(model, loader, "dense", memory_budget=2**30)
    m = re.search(
        r"'dense' needs ([\d.]+ TiB).*; '(\w+)' needs ([\d.]+ \w+) and fits", str(err.value)
    )
    assert m, str(err.value)
    d = 4096 * 4097
    assert parse_bytes(m.group(1)) == pytest.approx(4 * d * d, rel=0.01)
    assert estimate_memory(model, m.group(2), 4096, n_examples=4) <= 2**30
    assert loader.taken == 1


# ----- what is stored holds no autograd graph -----------------------------------------------


@pytest.mark.parametrize("rep", STORED)
def test_stored_tensors_hold_no_autograd_graph(rep):
    """A matrix keeps its tensors, not the computation graph of the model that produced them
    (custom: a layer on the torch.func path)."""
    mat = H.fim("custom", rep)
    data = mat.data
    tensors = (
        [data]
        if isinstance(data, torch.Tensor)
        else [
            t
            for blk in data.values()
            for t in ([blk] if isinstance(blk, torch.Tensor) else blk.tensors().values())
        ]
    )
    for t in tensors:
        assert not t.requires_grad and t.grad_fn is None
