"""A convolution's number of positions T, from the input's shape, equals its output's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fimntk.engine.layers.registry import kernel_for

CONFIGS = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), padding="same", padding_mode="circular", dilation=(1, 2)),
    dict(kernel_size=3, stride=(2, 1), padding=(1, 2), padding_mode="replicate"),
    dict(kernel_size=2, padding="valid", dilation=2),
]


def _one_d(config: dict) -> dict:
    return {k: v[0] if isinstance(v, tuple) else v for k, v in config.items()}


@pytest.mark.parametrize("config", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_positions_without_unfolding(config):
    for conv, shape in (
        (nn.Conv2d(2, 3, **config), (2, 2, 9, 7)),
        (nn.Conv1d(2, 3, **_one_d(config)), (2, 2, 9)),
    ):
        kernel = kernel_for(conv)
        x = torch.randn(shape)
        assert kernel.positions(x) == conv(x)[0, 0].numel() == kernel.inputs(x).shape[2]
