"""Local engine demo: ``python -m fimntk.engine.demo`` prints a FIM trace, a vTMv and an NTK
summary."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimntk.engine import FIM, NTK, PVector


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
    ).eval()
    x, y = torch.randn(512, 20), torch.randint(0, 10, (512,))
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    v = PVector.from_model(model)
    for rep in ("diag", "blockdiag", "dense"):
        F = FIM(model, loader, representation=rep)
        print(f"FIM {rep:10s} trace = {F.trace().item():.6g}   vTMv(w) = {F.vTMv(v).item():.6g}")
    K = NTK(model, DataLoader(TensorDataset(x[:100]), batch_size=50))
    evals, _ = K.eigenpairs(3)
    print(
        f"NTK Gram {tuple(K.shape)}: trace = {K.trace().item():.6g}, "
        f"top eigenvalues = {[round(e, 4) for e in evals.tolist()]}"
    )


if __name__ == "__main__":
    main()
