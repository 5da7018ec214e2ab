"""Models no server knows in advance (issue 15): custom modules the client traces into graph
specs, and tiny Hugging Face transformers built from configs (no download)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """ResNet-18's basic block: two 3x3 convolutions with BatchNorm, a residual ``+``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """A ResNet-18-shaped CIFAR network (stem, stages of basic blocks, pooling, head), narrow."""

    def __init__(self, width: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, width, 1))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2))
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


class DenseBlock(nn.Module):
    """A DenseNet-style block: each layer sees the ``torch.cat`` of all before it."""

    def __init__(self, cin: int = 3, growth: int = 2, layers: int = 2, num_classes: int = 3):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(cin + i * growth, growth, 3, padding=1) for i in range(layers)
        )
        self.head = nn.Linear(cin + layers * growth, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in self.convs:
            features.append(torch.tanh(conv(torch.cat(features, 1))))
        pooled = torch.cat(features, 1).mean(dim=(2, 3))
        return self.head(pooled)


class FunctionalNet(nn.Module):
    """Functional calls and parameters used outside any layer: ``F.linear`` on a raw weight, a
    learned scale, a buffer, ``view``/``size`` reshapes."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 12) * 0.3)
        self.scale = nn.Parameter(torch.rand(5) + 0.5)
        self.register_buffer("shift", torch.randn(5))
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(x.size(0), -1)
        h = F.gelu(F.linear(h, self.weight)) * self.scale + self.shift
        return self.out(h)


def custom_models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Each custom model (seeded, eval mode, BatchNorm statistics randomised) and inputs."""
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    models: dict[str, tuple[nn.Module, torch.Tensor]] = {
        "resnet": (CifarResNet(), torch.randn(6, 3, 8, 8, generator=gen)),
        "densenet": (DenseBlock(), torch.randn(6, 3, 6, 6, generator=gen)),
        "functional": (FunctionalNet(), torch.randn(6, 3, 4, generator=gen)),
    }
    for model, _ in models.values():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.data.uniform_(0.5, 1.5, generator=gen)
                m.bias.data.uniform_(-0.5, 0.5, generator=gen)
        model.eval()
    return models


def tiny_transformer(kind: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny BERT, GPT-2 or Llama sequence classifier, or ViT image classifier, from its
    config, and a batch (padded tokens, or images)."""
    import transformers

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    if kind == "vit":
        vit = transformers.ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=24,
            image_size=8,
            patch_size=4,
            num_labels=3,
        )
        images = torch.randn(6, 3, 8, 8, generator=gen)
        return transformers.ViTForImageClassification(vit).eval(), {"pixel_values": images}
    common: dict[str, Any] = {"vocab_size": 40, "num_labels": 3, "pad_token_id": 0}
    size = {"num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16}
    configs: dict[str, tuple[Any, Any]] = {
        "bert": (
            transformers.BertConfig(hidden_size=16, intermediate_size=24, **size, **common),
            transformers.BertForSequenceClassification,
        ),
        "gpt2": (
            transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, **common),
            transformers.GPT2ForSequenceClassification,
        ),
        "llama": (
            transformers.LlamaConfig(
                hidden_size=16, intermediate_size=24, num_key_value_heads=1, **size, **common
            ),
            transformers.LlamaForSequenceClassification,
        ),
    }
    config, cls = configs[kind]
    ids = torch.randint(1, 40, (6, 7), generator=gen)
    mask = torch.ones(6, 7, dtype=torch.int64)
    mask[:3, 5:] = 0
    return cls(config).eval(), {"input_ids": ids * mask, "attention_mask": mask}
