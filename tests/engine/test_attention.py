"""``nn.MultiheadAttention`` on the hook path (engine/layers/attention.py).

The re-computation must return what torch's own module returns, for every configuration; the
zoo's attention and transformer cases check every representation against the dense reference.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fimntk import engine
from fimntk.engine.generator import HOOKS
from fimntk.engine.layers.attention import replay_attention
from tests import zoo

CONFIGS = {
    "self_batch_first": (dict(batch_first=True), "self", {}),
    "self_seq_first_no_weights": (dict(), "self", {"need_weights": False}),
    "cross_bias_kv_zero_attn_per_head": (
        dict(batch_first=True, add_bias_kv=True, add_zero_attn=True),
        "cross",
        {"average_attn_weights": False},
    ),
    "kdim_vdim_no_bias_bool_masks": (
        dict(batch_first=True, kdim=3, vdim=6, bias=False),
        "kdim",
        {"key_padding_mask": "bool", "attn_mask": "bool2d"},
    ),
    "cross_float_masks_per_head": (
        dict(add_bias_kv=True),
        "cross",
        {"key_padding_mask": "float", "attn_mask": "float3d", "need_weights": False},
    ),
}


def _inputs(kind: str, batch_first: bool):
    g = torch.Generator().manual_seed(0)
    n, length, s = 3, 5, 7
    x = torch.randn(n, length, 8, generator=g, dtype=torch.float64)
    if kind == "self":
        q = k = v = x
    else:
        kd, vd = (3, 6) if kind == "kdim" else (8, 8)
        q = x
        k = torch.randn(n, s, kd, generator=g, dtype=torch.float64)
        v = k if kd == vd else torch.randn(n, s, vd, generator=g, dtype=torch.float64)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        if kind == "self":
            k = v = q
    return q, k, v, n, length, s


def _mask(spec, n: int, length: int, s: int, heads: int):
    g = torch.Generator().manual_seed(1)
    if spec == "bool":
        m = torch.rand(n, s, generator=g) < 0.3
        m[:, 0] = False
        return m
    if spec == "float":
        return torch.zeros(n, s, dtype=torch.float64).masked_fill(
            torch.rand(n, s, generator=g) < 0.3, float("-inf")
        )
    if spec == "bool2d":
        return torch.triu(torch.ones(length, s, dtype=torch.bool), 2)
    return torch.randn(n * heads, length, s, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_replay_returns_what_the_module_returns(config):
    kwargs, kind, call = CONFIGS[config]
    torch.manual_seed(0)
    m = nn.MultiheadAttention(8, 2, **kwargs).double().eval()
    q, k, v, n, length, s = _inputs(kind, m.batch_first)
    call = dict(call)
    for key in ("key_padding_mask", "attn_mask"):
        if key in call:
            call[key] = _mask(call[key], n, length, s, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own warnings on mixed mask types
        want = m(q, k, v, **call)
    seen = []
    got = replay_attention(
        m, (q, k, v), call, dict(m.named_parameters()), lambda x, y: seen.append(x) or y
    )
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    if want[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    assert len(seen) == 1 and seen[0].shape[0] == n  # one site, examples first


def test_transformer_takes_hooks_with_kfac_blocks_per_projection_and_no_warning():
    case = zoo.CASES[zoo.CASE_IDS.index("transformer_encoder")]
    model, loader = zoo.build(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mat = engine.FIM(model, loader, "kfac")
    assert set(mat.paths.values()) == {HOOKS}
    for name, module in model.named_modules():
        if isinstance(module, (nn.MultiheadAttention, nn.Linear)):
            assert mat.kinds[name] == "kfac", name
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            a, g = mat.factors[name]
            assert a.shape == (3, 5, 5) and g.shape == (3, 4, 4)  # q, k, v; E = 4, bias


class _Unbatched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2)

    def forward(self, x):
        return self.att(x[0], x[0], x[0])[0].sum(dim=1, keepdim=True)


class _Dropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True, dropout=0.5)

    def forward(self, x):
        return self.att(x, x, x)[0].mean(1)


@pytest.mark.parametrize(
    "model, message",
    [
        (_Unbatched(), "unbatched"),
        (_Dropout().train(), "model.eval()"),
    ],
    ids=["unbatched", "dropout_in_train_mode"],
)
def test_attention_refusals_name_the_fix(model, message):
    x = torch.randn(4, 3, 4)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine.FIM(model.double(), [(x.double(),)], "diag")
