"""Layers whose first dimension does not index the examples, against the dense reference.

The hook path splits a layer's gradient per example along the first dimension of its captured
input and output gradient. A layer applied to something the examples share — position
embeddings looked up with a batch dimension of 1 and broadcast (BERT, GPT-2), a buffer, a
parameter whose first dimension happens to equal the batch size, a sequence-first tensor whose
length equals the batch size — has no per-example split there: its summed gradient is right, so
the first-batch check of summed gradients alone cannot see it. Each shape of the mistake must
end on a path that is right and give the reference's numbers: a layer called on a batch of one
whose output is broadcast stays on the hooks with its input and output expanded to the batch
(each example's share then has its own row), unless expanding changes the outputs (the output
summed over its batch dimension); the others take ``torch.func``. A layer fed an
``expand``-ed tensor (rows that each belong to one example) stays on the hooks.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from fimntk import engine
from tests import reference as ref
from tests import zoo
from tests.engine import _structured_helpers as H

D, T, N, BATCH = 5, 4, 8, 4


class BroadcastPositions(nn.Module):
    """BERT's embeddings: positions ``(1, T)`` looked up once and broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(11, D)
        self.positions = nn.Embedding(T, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        h = torch.tanh(self.tokens(ids) + self.positions(pos))
        return self.head(h.mean(dim=1))


class ExpandedPositions(BroadcastPositions):
    """The same, positions expanded to ``(n, T)`` first: each row belongs to one example."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        h = torch.tanh(self.tokens(ids) + self.positions(pos))
        return self.head(h.mean(dim=1))


class LayerOnBuffer(nn.Module):
    """A Linear layer applied to a ``(1, D)`` buffer, its output broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("context", torch.randn(1, D))
        self.encode = nn.Linear(D, D)
        self.inp = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inp(x) * self.encode(self.context)))


class LayerOnBufferReduced(LayerOnBuffer):
    """The same, the layer's output summed over its batch dimension of 1: expanding it to the
    batch would multiply it by n."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inp(x) * self.encode(self.context).sum(dim=0)))


class LayerOnParameter(nn.Module):
    """A Linear layer applied to a ``(BATCH, D)`` parameter table: its first dimension equals the
    batch size by coincidence, and every example reads every row."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(BATCH, D))
        self.encode = nn.Linear(D, D)
        self.inp = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = torch.tanh(self.encode(self.table)).mean(dim=0)
        return self.head(torch.tanh(self.inp(x) + memory))


class SequenceFirst(nn.Module):
    """A Linear layer on a sequence-first ``(T, n, D)`` tensor whose length equals the batch size:
    its first dimension indexes positions, not examples."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (n, T, D)
        h = torch.tanh(self.mix(x.transpose(0, 1)))  # (T, n, D)
        return self.head(h.cumsum(dim=0)[-1])


def _ids() -> torch.Tensor:
    return torch.randint(0, 11, (N, T), generator=torch.Generator().manual_seed(3))


def _x2() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(3))


def _x3() -> torch.Tensor:
    return torch.randn(N, BATCH, D, generator=torch.Generator().manual_seed(3))


#: (model, inputs, the layers that must leave the hook path)
SHAPES = {
    "broadcast_positions": (BroadcastPositions, _ids, set()),
    "expanded_positions": (ExpandedPositions, _ids, set()),
    "layer_on_buffer": (LayerOnBuffer, _x2, set()),
    "layer_on_buffer_reduced": (LayerOnBufferReduced, _x2, {"encode"}),
    "layer_on_parameter": (LayerOnParameter, _x2, {"", "encode"}),
    "sequence_first": (SequenceFirst, _x3, {"mix"}),
}


def _built(name: str):
    torch.manual_seed(0)
    cls, make_x, _ = SHAPES[name]
    return zoo.build_model_loader(cls(), make_x(), batch_size=BATCH)


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("rep", ["dense", "diag", "kfac"])
def test_fisher_matches_the_reference(name, rep, monkeypatch):
    monkeypatch.setattr(H, "layer_io", partial(H.layer_io, expand=True))  # per example
    model, loader = _built(name)
    mat = engine.FIM(model, loader, rep)
    full = ref.fisher(model, loader)
    assert {k for k, v in mat.paths.items() if v == engine.generator.FALLBACK} == SHAPES[name][2]
    if rep == "dense":
        ref.assert_close(mat.to_torch(), full, 1e-9, name)
    elif rep == "diag":
        ref.assert_close(mat.get_diag(), full.diagonal(), 1e-9, name)
    else:  # exact blocks for the layers off the hook path, factors from their definition else
        offsets = ref.layer_offsets(model)
        dense = mat.to_torch()
        for layer in SHAPES[name][2]:
            s, e = offsets[layer]
            ref.assert_close(dense[s:e, s:e], full[s:e, s:e], 1e-9, f"{name} block {layer}")
        modules = dict(model.named_modules())
        assert set(mat.factors) == {
            layer
            for layer, m in modules.items()
            if isinstance(m, (nn.Linear, nn.Embedding)) and layer not in SHAPES[name][2]
        }
        for layer, (a, g) in mat.factors.items():
            a_ref, g_ref = H.kfac_factors(model, loader, modules[layer])
            ref.assert_close(a, a_ref, 1e-9, f"{name} A of {layer}")
            ref.assert_close(g, g_ref, 1e-9, f"{name} G of {layer}")


@pytest.mark.parametrize("name", list(SHAPES))
def test_ntk_matches_the_reference(name):
    model, loader = _built(name)
    gram = engine.NTK(model, loader).to_torch()
    ref.assert_close(gram, ref.ntk(model, loader), 1e-9, name)


@pytest.mark.parametrize("name", list(SHAPES))
def test_implicit_products_match_the_reference(name):
    model, loader = _built(name)
    mat = engine.FIM(model, loader, "implicit")
    full = ref.fisher(model, loader)
    v = engine.PVector.random(
        mat.layer_collection, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    x = v.get_flat_representation()
    ref.assert_close(mat.vTMv(v), x @ full @ x, 1e-9, f"{name} vTMv")
    ref.assert_close(mat.mv(v).get_flat_representation(), full @ x, 1e-9, f"{name} mv")


def test_a_broadcast_layer_is_found_on_a_later_larger_batch():
    """A first batch of one example cannot show a broadcast (its batch dimension is 1 too);
    the next, larger batch does, expands it, and its numbers stay right."""
    torch.manual_seed(0)
    model = BroadcastPositions().double().eval()
    ids = _ids()
    batches = [(ids[:1],), (ids[1:],)]
    mat = engine.FIM(model, batches, "diag")
    expected = ref.fisher(model, batches).diagonal()
    ref.assert_close(mat.get_diag(), expected, 1e-9, "diag")
    assert mat.paths["positions"] == engine.generator.HOOKS
