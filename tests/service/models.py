"""A small model, its data and vectors, uploaded once per session, and in-process references."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from fastapi.testclient import TestClient
from torch import nn

from tests.service.conftest import st_bytes, upload

ARCH = {
    "kind": "sequential",
    "layers": [
        {"type": "Linear", "args": [4, 6]},
        {"type": "Tanh"},
        {"type": "Linear", "args": [6, 3]},
    ],
}
N_EXAMPLES = 12
BATCH = 5


def make_model(seed: int = 0) -> nn.Module:
    """The model that :data:`ARCH` describes, with seeded weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).eval()


@dataclass
class Uploaded:
    """Digests of the uploaded model, dataset and vectors, and their tensors."""

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    vector: torch.Tensor
    vector_ntk: torch.Tensor
    spec_model: dict[str, Any]
    dataset: str
    v: str
    v_ntk: str

    def loader(self, with_targets: bool = True) -> torch.utils.data.DataLoader:
        """The loader the worker builds from the dataset spec."""
        parts = (self.inputs, self.targets) if with_targets else (self.inputs,)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*parts), batch_size=BATCH)


def upload_all(client: TestClient, key: str) -> Uploaded:
    """Upload weights, dataset and vectors as ``key``."""
    model = make_model()
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(N_EXAMPLES, 4, generator=gen)
    targets = torch.randint(0, 3, (N_EXAMPLES,), generator=gen)
    d = sum(p.numel() for p in model.parameters())
    vector = torch.randn(d, generator=gen)
    weights = upload(client, key, st_bytes(model.state_dict()))
    dataset = upload(client, key, st_bytes({"inputs": inputs, "targets": targets}))
    v = upload(client, key, st_bytes({"vector": vector}))
    vector_ntk = torch.randn(3, N_EXAMPLES, generator=gen)
    v_ntk = upload(client, key, st_bytes({"vector": vector_ntk}))
    spec_model = {"weights": weights, "architecture": ARCH}
    return Uploaded(model, inputs, targets, vector, vector_ntk, spec_model, dataset, v, v_ntk)
