"""Bad inputs give a ValueError naming the problem and the fix, never a silently wrong number.

Each problem is tried on every entry point (FIM in three representations, Monte Carlo, centered
empirical Fisher, NTK, the Jacobian generator).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimntk import engine
from fimntk.engine import InvalidInputError, TrainModeBatchNormError
from tests import zoo

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

ENTRY_POINTS = {
    "FIM-dense": lambda m, ld, **kw: engine.FIM(m, ld, "dense", **kw),
    "FIM-diag": lambda m, ld, **kw: engine.FIM(m, ld, "diag", **kw),
    "FIM-blockdiag": lambda m, ld, **kw: engine.FIM(m, ld, "blockdiag", **kw),
    "FIM_MonteCarlo": lambda m, ld, **kw: engine.FIM_MonteCarlo(m, ld, "dense", seed=0, **kw),
    "EmpiricalFIM-centered": lambda m, ld, **kw: engine.EmpiricalFIM(
        m, ld, "diag", centering=True, **kw
    ),
    "NTK": lambda m, ld, **kw: engine.NTK(m, ld, **kw),
    "Jacobian": lambda m, ld, **kw: engine.Jacobian(m, **kw).get_jacobian(ld),
}
ENTRY = pytest.mark.parametrize("entry", list(ENTRY_POINTS.values()), ids=list(ENTRY_POINTS))


def _mlp():
    return zoo.build(zoo.CASES[zoo.CASE_IDS.index("mlp")])


def _loader(x, y=None, **kw):
    y = torch.zeros(x.shape[0], dtype=torch.long) if y is None else y
    return DataLoader(TensorDataset(x, y), batch_size=4, **kw)


def _raises(fn, *words, cls=InvalidInputError):
    with pytest.raises(ValueError) as err:
        fn()
    assert isinstance(err.value, cls), type(err.value)
    msg = str(err.value)
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in: {msg}"
    return msg


@ENTRY
@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Tanh()),
        nn.Linear(5, 3).requires_grad_(False),
    ],
    ids=["no_parameters", "all_frozen"],
)
def test_model_without_parameters(entry, model):
    _, loader = _mlp()
    _raises(lambda: entry(model.double(), loader), "no parameters", "requires_grad", "unfreeze")


@ENTRY
def test_loader_shape_the_model_rejects(entry):
    model, _ = _mlp()
    loader = _loader(torch.randn(8, 7, dtype=torch.float64))
    _raises(lambda: entry(model, loader), "shape", "(4, 7)", "function=")


@ENTRY
def test_n_output_contradicts_the_model(entry):
    model, loader = _mlp()
    _raises(lambda: entry(model, loader, n_output=4), "n_output=4", "outputs 3")


@ENTRY
@pytest.mark.parametrize("where", ["nan_weight", "nan_input"])
def test_non_finite_outputs(entry, where):
    model, loader = _mlp()
    if where == "nan_weight":
        with torch.no_grad():
            model[2].weight[0, 0] = math.nan
    else:
        x = torch.randn(8, 5, dtype=torch.float64)
        x[5, 1] = math.nan  # second batch only
        loader = _loader(x)
    _raises(lambda: entry(model, loader), "non-finite", "weights", "inputs")


@pytest.mark.parametrize("rep", ["dense", "diag", "blockdiag"])
def test_non_finite_input_with_finite_outputs_is_not_a_silent_nan(rep):
    """tanh saturates an infinite input, so the outputs are finite but ∂f/∂W = g xᵀ is not."""
    model, _ = _mlp()
    x = torch.randn(8, 5, dtype=torch.float64)
    x[5, 1] = math.inf
    loader = _loader(x)
    assert torch.isfinite(model(x)).all()
    try:
        mat = engine.FIM(model, loader, rep)
    except ValueError as err:
        assert "non-finite" in str(err)
    else:
        assert torch.isfinite(mat.to_torch()).all(), "a NaN Fisher returned without an error"


@ENTRY
@pytest.mark.parametrize(
    "loader",
    [
        [],
        _loader(torch.empty(0, 5, dtype=torch.float64)),
        _loader(torch.randn(3, 5, dtype=torch.float64), drop_last=True),
    ],
    ids=["empty_list", "empty_dataset", "drop_last_drops_everything"],
)
def test_empty_loader(entry, loader):
    model, _ = _mlp()
    _raises(lambda: entry(model, loader), "no examples", "non-empty")


@ENTRY
def test_batchnorm_in_train_mode(entry):
    model, loader = zoo.build(zoo.CASES[zoo.CASE_IDS.index("cnn_bn")])
    model.train()
    _raises(
        lambda: entry(model, loader), "model.eval()", "BatchNorm2d", cls=TrainModeBatchNormError
    )


def test_batchnorm_without_running_stats():
    model = (
        nn.Sequential(
            nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)
        )
        .double()
        .eval()
    )
    _, loader = _mlp()
    _raises(
        lambda: engine.FIM(model, loader, "dense"),
        "track_running_stats",
        cls=TrainModeBatchNormError,
    )


def test_dropout_in_train_mode_on_the_hooks_path():
    """A random forward gives a random 'Fisher': the fallback path already says call eval()."""
    model = zoo.dropout_mlp().double().train()
    _, loader = _mlp()
    _raises(lambda: engine.FIM(model, loader, "dense"), "eval()")
    _raises(lambda: engine.NTK(model, loader), "eval()")


def test_dropout_in_train_mode_on_the_fallback_path():
    model = (
        nn.Sequential(nn.Linear(5, 6), zoo.Scale(6), nn.Dropout(0.5), nn.Linear(6, 3))
        .double()
        .train()
    )
    _, loader = _mlp()
    _raises(lambda: engine.FIM(model, loader, "dense"), "eval()")


def test_recurrent_dropout_in_train_mode_on_the_example_loop():
    """``nn.LSTM(dropout=...)`` draws inside its own kernel, which ``vmap`` never sees (the
    fallback loops over examples there): the loop's own check still says call eval()."""
    model = zoo.RecurrentNet(nn.LSTM, num_layers=2, dropout=0.5).double().train()
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    _raises(lambda: engine.FIM(model, _loader(x), "dense"), "eval()")
    model.eval()
    assert torch.isfinite(engine.FIM(model, _loader(x), "diag").get_diag()).all()


class _BatchCentred(nn.Module):
    """``(x - mean over the batch) ⊙ w``: mixes the examples of a batch (torch.func path)."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return (x - x.mean(dim=0)) * self.w


def test_a_layer_mixing_the_examples_is_refused():
    """Per-example gradients of a layer that mixes a batch do not exist: run one example at a
    time, it would compute those of another function, so the fallback checks that they add up
    to the batch's gradient and names the way out."""
    model = (
        nn.Sequential(nn.Linear(5, 4), _BatchCentred(4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    )
    _, loader = _mlp()
    _raises(lambda: engine.FIM(model, loader, "diag"), "do not add up", "layer_collection")


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.nan])
def test_regression_sigma_must_be_positive(sigma):
    model, loader = _mlp()
    for fn in (engine.FIM, engine.FIM_MonteCarlo, engine.EmpiricalFIM):
        _raises(
            lambda fn=fn: fn(model, loader, "dense", variant="regression", sigma=sigma), "sigma"
        )


def test_other_bad_arguments():
    model, loader = _mlp()
    _raises(lambda: engine.FIM(model, loader, "kfacc"), "unknown representation", "dense")
    _raises(
        lambda: engine.FIM(model, loader, "dense", variant="softmax"),
        "unknown variant",
        "classif_logits",
    )
    _raises(
        lambda: engine.FIM(model, loader, "dense", variant="classif_binary_logits"),
        "one logit",
        "classif_logits",
    )
    _raises(lambda: engine.FIM_MonteCarlo(model, loader, "dense", trials=0), "trials")
    no_targets = DataLoader(TensorDataset(torch.randn(4, 5, dtype=torch.float64)), batch_size=2)
    _raises(lambda: engine.EmpiricalFIM(model, no_targets, "dense"), "targets")
    bad_targets = _loader(torch.randn(4, 5, dtype=torch.float64), torch.full((4,), 3))
    _raises(lambda: engine.EmpiricalFIM(model, bad_targets, "dense"), "class indices")
    _raises(lambda: engine.FIM(model, [{"x": torch.zeros(2, 5)}], "dense"), "function=")
    _raises(lambda: engine.FIM(lambda x: x, loader, "dense"), "torch.nn.Module")
    three_d = DataLoader(TensorDataset(torch.randn(4, 2, 5, dtype=torch.float64)), batch_size=2)
    _raises(lambda: engine.FIM(model, three_d, "dense"), "(n, c)", "function=")
    mat = engine.FIM(model, loader, "dense")
    _raises(lambda: mat.solve(engine.PVector.from_model(model), regul=-1.0), "regul")
    _raises(lambda: mat.norm("nuc"), "Frobenius")
