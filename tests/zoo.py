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
    """Self-attention (packed ``in_proj_weight``, batch first) then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.att(x, x, x, need_weights=False)
        return self.head(h.mean(dim=1))


class CrossAttention(nn.Module):
    """Cross-attention, sequence first: queries from the first 2 steps, keys and values from the
    last 4, a float attention mask and a key-padding mask read off the data (the first key is
    always attended)."""

    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2)
        self.head = nn.Linear(4, 3)
        self.register_buffer("bias", torch.linspace(-1.0, 1.0, 8).reshape(2, 4))

    def forward(self, x):
        q, kv = x[:, :2].transpose(0, 1), x[:, 2:].transpose(0, 1)
        pad = kv[..., 0].t() > 0.8
        pad[:, 0] = False
        pad = torch.zeros(pad.shape, dtype=x.dtype).masked_fill(pad, float("-inf"))
        h, _ = self.att(q, kv, kv, key_padding_mask=pad, attn_mask=self.bias)
        return self.head(torch.tanh(h).mean(dim=0))


class CrossAttentionKdim(nn.Module):
    """Cross-attention with separate q/k/v weights (kdim, vdim), no bias, ``bias_k``/``bias_v``,
    a zero key, per-head boolean masks and per-head weights returned; 3 queries, 4 keys."""

    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(
            4, 2, kdim=3, vdim=2, bias=False, add_bias_kv=True, add_zero_attn=True,
            batch_first=True,
        )  # fmt: skip
        self.head = nn.Linear(4 + 12, 3)

    def forward(self, x):
        q, k, v = x[:, :3, :4], x[:, 3:, :3], x[:, 3:, 3:5]
        mask = torch.zeros(x.shape[0] * 2, 3, 4, dtype=torch.bool)
        mask[:, 0, 2] = True
        h, w = self.att(q, k, v, attn_mask=mask, average_attn_weights=False)
        return self.head(torch.cat([h.mean(dim=1), w[:, :, 0].reshape(x.shape[0], -1)], dim=1))


class Encoder(nn.Module):
    """Two ``nn.TransformerEncoderLayer`` (post- and pre-norm) with a causal mask, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        layer = dict(d_model=4, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.enc = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(**layer),
                nn.TransformerEncoderLayer(**layer, norm_first=True, activation="gelu"),
            ]
        )
        self.head = nn.Linear(4, 3)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(3))

    def forward(self, x):
        for layer in self.enc:
            x = layer(x, src_mask=self.causal, is_causal=True)
        return self.head(x.mean(dim=1))


class Decoder(nn.Module):
    """``nn.TransformerDecoder`` (one layer, batch first) on a target with a causal mask and a
    memory made by a Linear from the same input. (Sequence-first Linear layers would not carry
    the examples along their first dimension.)"""

    def __init__(self) -> None:
        super().__init__()
        self.mem = nn.Linear(4, 4)
        layer = nn.TransformerDecoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoder(layer, num_layers=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(3)
        h = self.dec(x, torch.tanh(self.mem(x)), tgt_mask=mask, tgt_is_causal=True)
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
    return _randomize_bn(
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(inplace=True),
            nn.Conv2d(4, 3, 3, stride=2),
            nn.Tanh(),
            Flatten(),
            nn.Linear(3 * 2 * 2, 3),
        )
    )


def _norms():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        nn.LayerNorm(6),
        nn.Tanh(),
        nn.Linear(6, 3),
    )


def _conv1d():
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=2, dilation=2),
        nn.Tanh(),
        nn.Conv1d(3, 3, 2, stride=2, padding_mode="circular", padding=1),
        nn.Tanh(),
        Flatten(),
        nn.Linear(3 * 5, 3),
    )


def _convT():
    return nn.Sequential(
        nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1),
        nn.Tanh(),
        nn.ConvTranspose2d(4, 2, 2, groups=2, dilation=2),
        nn.Tanh(),
        Flatten(),
        nn.Linear(2 * 8 * 8, 3),
    )


def _grouped():
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, dilation=1, groups=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(6, 6, 3, dilation=2, groups=3, padding="same", padding_mode="reflect"),
        nn.Tanh(),
        Flatten(),
        nn.Linear(6 * 3 * 3, 3),
    )


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
    Case("cross_attention", CrossAttention, lambda g, n: torch.randn(n, 6, 4, generator=g), 3),
    Case(
        "cross_attention_kdim",
        CrossAttentionKdim,
        lambda g, n: torch.randn(n, 7, 5, generator=g),
        3,
    ),
    Case("transformer_encoder", Encoder, lambda g, n: torch.randn(n, 3, 4, generator=g), 3),
    Case("transformer_decoder", Decoder, lambda g, n: torch.randn(n, 3, 4, generator=g), 3),
]
CASE_IDS = [c.name for c in CASES]


def build(
    case: Case,
    n: int = 13,
    batch_size: int = 5,
    dtype=torch.float64,
    seed: int = 0,
    targets: bool = True,
):
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


# ----- extra models for the engine core tests (not in CASES) ----------------------------------

#: Layers of each case that must take the torch.func fallback; every other layer takes hooks.
FALLBACK_LAYERS: dict[str, set[str]] = {
    "custom": {"1"},
    "shared_twice": {"shared"},
}


class TiedWeights(nn.Module):
    """Embedding whose weight is also the output Linear's (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.lin = nn.Linear(4, 7)
        self.lin.weight = self.emb.weight

    def forward(self, x):
        return self.lin(torch.tanh(self.emb(x)).mean(dim=1))


class WeightUsedOutside(nn.Module):
    """A Linear whose weight is also used outside the Linear's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x) + x @ self.lin.weight.t()))


def inplace_relu_cnn() -> nn.Module:
    """Conv2d and Linear each followed by ``ReLU(inplace=True)``; inputs ``(n, 2, 6, 6)``."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(inplace=True),
        nn.Conv2d(3, 3, 3, bias=False),
        nn.ReLU(inplace=True),
        Flatten(),
        nn.Linear(3 * 2 * 2, 4),
        nn.ReLU(inplace=True),
        nn.Linear(4, 3),
    )


def dropout_mlp() -> nn.Module:
    """An MLP with Dropout; inputs ``(n, 5)``."""
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.5), nn.Linear(7, 3))


def build_model_loader(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    batch_size: int = 4,
    dtype=torch.float64,
    **loader_kwargs,
):
    """``(model, loader)`` for an arbitrary model and inputs (float inputs cast to ``dtype``)."""
    model = model.to(dtype).eval()
    if x.is_floating_point():
        x = x.to(dtype)
    ds = TensorDataset(x) if y is None else TensorDataset(x, y)
    return model, DataLoader(ds, batch_size=batch_size, shuffle=False, **loader_kwargs)


def build_binary(case: Case, n: int = 13, batch_size: int = 5, dtype=torch.float64, seed: int = 0):
    """``case``'s model followed by ``Linear(c, 1)``: one logit; targets in {0, 1} (float)."""
    model, loader = build(case, n=n, batch_size=batch_size, dtype=dtype, seed=seed)
    torch.manual_seed(seed + 2)
    head = nn.Linear(case.c, 1).to(dtype)
    x = loader.dataset.tensors[0]
    y = torch.randint(0, 2, (n, 1), generator=torch.Generator().manual_seed(seed + 3))
    return (
        nn.Sequential(model, head).eval(),
        DataLoader(TensorDataset(x, y.to(dtype)), batch_size=batch_size, shuffle=False),
    )


def build_regression(
    case: Case, n: int = 13, batch_size: int = 5, dtype=torch.float64, seed: int = 0
):
    """``case``'s model with real targets ``(n, c)`` for the Gaussian (regression) variant."""
    model, loader = build(case, n=n, batch_size=batch_size, dtype=dtype, seed=seed)
    x = loader.dataset.tensors[0]
    y = torch.randn(n, case.c, generator=torch.Generator().manual_seed(seed + 3), dtype=dtype)
    return model, DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def build_variant(case: Case, variant: str, **kwargs):
    """``(model, loader)`` suited to ``variant`` (binary: an extra one-logit head)."""
    if variant == "classif_binary_logits":
        return build_binary(case, **kwargs)
    if variant == "regression":
        return build_regression(case, **kwargs)
    return build(case, **kwargs)


class ResidualInplace(nn.Module):
    """``h = a(x); h += x``: the Linear's output is modified in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        h += x
        return self.b(torch.tanh(h))


class DoubledLinear(nn.Linear):
    """A subclass of Linear that overrides forward (must not be taken for a Linear)."""

    def forward(self, x):
        return super().forward(x) * 2


class KeywordCall(nn.Module):
    """A Linear called with a keyword argument, ``self.a(input=x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(input=x)))


class BilinearNet(nn.Module):
    """``nn.Bilinear`` (two inputs; no kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(4, 4, 3)

    def forward(self, x):
        return self.bil(x, torch.tanh(x))


class RecurrentNet(nn.Module):
    """An ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (batch first) read at its last step, then a Linear.

    Recurrent layers initialise their hidden state unbatched and update it in place, which
    ``vmap`` cannot batch: the fallback goes example by example.
    """

    def __init__(self, kind: type[nn.RNNBase], **kwargs):
        super().__init__()
        self.rnn = kind(3, 4, batch_first=True, **kwargs)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _partially_frozen():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model[0].bias.requires_grad_(False)
    return model


def _randn(*shape):
    return lambda g, n: torch.randn(n, *shape, generator=g)


#: More layer configurations (not in CASES): each is checked against the reference.
EXTRA_CASES = [
    Case(
        "linear_nobias_4d",
        lambda: nn.Sequential(
            nn.Linear(4, 5, bias=False), nn.Tanh(), Flatten(), nn.Linear(2 * 3 * 5, 3)
        ),
        _randn(2, 3, 4),
        3,
    ),
    Case(
        "layernorm_2d_nobias",
        lambda: nn.Sequential(
            nn.Linear(4, 3), nn.LayerNorm([2, 3], bias=False), Flatten(), nn.Linear(6, 3)
        ),
        _randn(2, 4),
        3,
    ),
    Case(
        "batchnorm1d",
        lambda: _randomize_bn(
            nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
        ),
        _randn(4),
        3,
    ),
    Case(
        "batchnorm1d_seq",
        lambda: _randomize_bn(
            nn.Sequential(
                nn.Conv1d(2, 4, 3),
                nn.BatchNorm1d(4, affine=True),
                nn.Tanh(),
                Flatten(),
                nn.Linear(4 * 4, 3),
            )
        ),
        _randn(2, 6),
        3,
    ),
    Case(
        "groupnorm_no_affine",
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4, affine=False), Flatten(), nn.Linear(4 * 9, 3)
        ),
        _randn(2, 5, 5),
        3,
    ),
    Case(
        "convtranspose1d",
        lambda: nn.Sequential(
            nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1),
            nn.Tanh(),
            nn.ConvTranspose1d(4, 4, 3, groups=2, bias=False),
            Flatten(),
            nn.Linear(4 * 12, 3),
        ),
        _randn(2, 5),
        3,
    ),
    Case(
        "convtranspose_dilated",
        lambda: nn.Sequential(
            nn.ConvTranspose2d(2, 2, 3, stride=2, dilation=2, output_padding=1),
            Flatten(),
            nn.Linear(2 * 10 * 10, 3),
        ),
        _randn(2, 3, 3),
        3,
    ),
    Case(
        "conv_same_circular",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, (3, 2), padding="same", padding_mode="circular", dilation=(1, 2)),
            Flatten(),
            nn.Linear(3 * 25, 3),
        ),
        _randn(2, 5, 5),
        3,
    ),
    Case(
        "conv_replicate_strided",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=(2, 1), padding=(1, 2), padding_mode="replicate"),
            Flatten(),
            nn.Linear(3 * 3 * 7, 3),
        ),
        _randn(2, 5, 5),
        3,
    ),
    Case(
        "embedding_no_padding",
        lambda: nn.Sequential(nn.Embedding(9, 3), Flatten(), nn.Linear(12, 3)),
        lambda g, n: torch.randint(0, 9, (n, 4), generator=g),
        3,
    ),
    Case("residual_inplace", ResidualInplace, _randn(4), 3),
    Case(
        "conv3d",
        lambda: nn.Sequential(nn.Conv3d(1, 2, 2), Flatten(), nn.Linear(2 * 8, 3)),
        _randn(1, 3, 3, 3),
        3,
    ),
    Case(
        "linear_subclass",
        lambda: nn.Sequential(DoubledLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
        _randn(4),
        3,
    ),
    Case("bilinear", BilinearNet, _randn(4), 3),
    Case("partially_frozen", _partially_frozen, _randn(4), 3),
    Case("keyword_call", KeywordCall, _randn(4), 3),
    Case("lstm", lambda: RecurrentNet(nn.LSTM), _randn(3, 3), 3),
    Case("gru_two_layers", lambda: RecurrentNet(nn.GRU, num_layers=2), _randn(3, 3), 3),
    Case("rnn_tanh", lambda: RecurrentNet(nn.RNN, bias=False), _randn(3, 3), 3),
    Case(
        "prelu",
        lambda: nn.Sequential(
            nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 5), nn.PReLU(5), nn.Linear(5, 3)
        ),
        _randn(4),
        3,
    ),
    Case(
        "embedding_bag",
        lambda: nn.Sequential(nn.EmbeddingBag(9, 4, mode="mean"), nn.Linear(4, 3)),
        lambda g, n: torch.randint(0, 9, (n, 5), generator=g),
        3,
    ),
]
EXTRA_CASE_IDS = [c.name for c in EXTRA_CASES]
FALLBACK_LAYERS.update(
    {
        "conv3d": {"0"},
        "linear_subclass": {"0"},
        "bilinear": {"bil"},
        "partially_frozen": {"0"},
        "lstm": {"rnn"},
        "gru_two_layers": {"rnn"},
        "rnn_tanh": {"rnn"},
        "prelu": {"1", "3"},
        "embedding_bag": {"0"},
    }
)
