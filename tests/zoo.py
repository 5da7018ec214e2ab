"""Small download-free models and data for the tests, one entry per architecture.

Each case builds ``(model, loader, c)`` deterministically. Models are in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Scale(nn.Module):
    """A custom parameterised module (no kernel: takes the torch.func path)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.2, d))

    def forward(self, x):
        return torch.tanh(x) * self.gain + self.shift


class SharedTwice(nn.Module):
    """One Linear used twice in the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


class TokenNet(nn.Module):
    """Embedding + mean pooling + Linear on token inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 5, padding_idx=0)
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.emb(x)).mean(dim=1))


class SeqNet(nn.Module):
    """Linear on sequence inputs (n, T, d), then pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.l2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))).sum(dim=1)


class Attention(nn.Module):
    """MultiheadAttention (in_proj_weight: fallback) then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.att(x, x, x, need_weights=False)
        return self.head(h.mean(dim=1))


class Flatten(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@dataclass
class Case:
    name: str
    build_model: Callable[[], nn.Module]
    make_x: Callable[[torch.Generator, int], torch.Tensor]
    c: int


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))


def _cnn_bn():
    return _randomize_bn(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 3, 3, stride=2), nn.Tanh(), Flatten(), nn.Linear(3 * 2 * 2, 3)))


def _norms():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), Flatten(),
        nn.Linear(4 * 5 * 5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


def _conv1d():
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=2, dilation=2), nn.Tanh(),
                         nn.Conv1d(3, 3, 2, stride=2, padding_mode="circular", padding=1),
                         nn.Tanh(), Flatten(), nn.Linear(3 * 5, 3))


def _convT():
    return nn.Sequential(nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1),
                         nn.Tanh(), nn.ConvTranspose2d(4, 2, 2, groups=2, dilation=2), nn.Tanh(),
                         Flatten(), nn.Linear(2 * 8 * 8, 3))


def _grouped():
    return nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, dilation=1, groups=2, padding=1),
                         nn.Tanh(), nn.Conv2d(6, 6, 3, dilation=2, groups=3, padding="same",
                                              padding_mode="reflect"),
                         nn.Tanh(), Flatten(), nn.Linear(6 * 3 * 3, 3))


def _custom():
    return nn.Sequential(nn.Linear(5, 6), Scale(6), nn.Linear(6, 3))


CASES = [
    Case("mlp", _mlp, lambda g, n: torch.randn(n, 5, generator=g), 3),
    Case("cnn_bn", _cnn_bn, lambda g, n: torch.randn(n, 2, 6, 6, generator=g), 3),
    Case("norms", _norms, lambda g, n: torch.randn(n, 2, 5, 5, generator=g), 3),
    Case("conv1d", _conv1d, lambda g, n: torch.randn(n, 2, 8, generator=g), 3),
    Case("convtranspose", _convT, lambda g, n: torch.randn(n, 2, 3, 3, generator=g), 3),
    Case("grouped_conv", _grouped, lambda g, n: torch.randn(n, 4, 6, 6, generator=g), 3),
    Case("embedding", TokenNet, lambda g, n: torch.randint(0, 11, (n, 4), generator=g), 3),
    Case("sequence", SeqNet, lambda g, n: torch.randn(n, 3, 4, generator=g), 3),
    Case("custom", _custom, lambda g, n: torch.randn(n, 5, generator=g), 3),
    Case("shared_twice", SharedTwice, lambda g, n: torch.randn(n, 6, generator=g), 3),
    Case("attention", Attention, lambda g, n: torch.randn(n, 3, 4, generator=g), 3),
]
CASE_IDS = [c.name for c in CASES]


def build(case: Case, n: int = 13, batch_size: int = 5, dtype=torch.float64, seed: int = 0,
          targets: bool = True):
    """``(model, loader)`` of ``case`` with n examples in uneven batches."""
    torch.manual_seed(seed)
    model = case.build_model().to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = case.make_x(g, n)
    if x.is_floating_point():
        x = x.to(dtype)
    y = torch.randint(0, case.c, (n,), generator=g)
    ds = TensorDataset(x, y) if targets else TensorDataset(x)
    return model, DataLoader(ds, batch_size=batch_size, shuffle=False)
