"""Core quantities (issue 2): dense FIM (W1), diagonal (W1, W2, W3), block-diagonal (W1), NTK (W4).

Tools: fimntk, NNGeometry 0.4, BackPACK 1.7 (``DiagGGNExact``; ``SqrtGGNExact`` for the dense
and block-diagonal matrices; ``BatchGrad`` per output for the NTK), torch.func (``vmap(jacrev)``
Jacobians then contraction; the NTK tutorial's Jacobian-contraction recipe).

Targets: each quantity at least as fast as the fastest peer computing it; the NTK Gram at least
3× faster than torch.func's Jacobian contraction.

Run ``python -m bench.core [--quick]`` from the repository root (``--help`` for options).
"""

from __future__ import annotations

from collections.abc import Sequence

from bench import tool_recipes as r
from bench._common import W1, W2, W3, W4, Case, Settings, Target, Workload, main

TITLE = "fimntk core benchmarks: dense, diagonal, block-diagonal FIM and NTK Gram"

TARGETS = [
    Target("dense", "W1"),
    Target("diag", "W1"),
    Target("diag", "W2"),
    Target("diag", "W3"),
    Target("blockdiag", "W1"),
    Target("ntk", "W4"),
    Target("ntk", "W4", factor=3.0, against="torch.func"),
]


def _workloads(settings: Settings) -> dict[str, Workload]:
    if not settings.quick:
        return {"W1": W1, "W2": W2, "W3": W3, "W4": W4}
    # quick: the dense and block-diagonal peers cost ~10 s per 1000 examples, torch.func's
    # diagonal of W2 ~60 s per 1000 on one core
    return {"W1": W1.scaled(100), "W2": W2.scaled(100), "W3": W3.scaled(64), "W4": W4}


def build_cases(settings: Settings) -> list[Case]:
    w = _workloads(settings)
    cases: list[Case] = []

    def add(quantity: str, wl: Workload, tools: dict) -> None:
        for tool, prep in tools.items():
            note = ""
            if isinstance(prep, tuple):
                prep, note = prep
            cases.append(Case(quantity, wl, tool, prep, note=note))

    add(
        "dense",
        w["W1"],
        {
            "fimntk": r.fimntk("dense"),
            "nngeometry": r.nngeometry("dense"),
            "BackPACK": (r.backpack("dense"), "SqrtGGNExact, Σ VᵀV"),
            "torch.func": (r.func("dense"), "vmap(jacrev), Σ (LᵀJ)ᵀ(LᵀJ)"),
        },
    )
    for key in ("W1", "W2", "W3"):
        add(
            "diag",
            w[key],
            {
                "fimntk": r.fimntk("diag"),
                "nngeometry": r.nngeometry("diag"),
                "BackPACK": (r.backpack("diag"), "DiagGGNExact"),
                "torch.func": (r.func("diag"), "vmap(jacrev), Σ (LᵀJ)²"),
            },
        )
    add(
        "blockdiag",
        w["W1"],
        {
            "fimntk": r.fimntk("blockdiag"),
            "nngeometry": r.nngeometry("blockdiag"),
            "BackPACK": (r.backpack("blockdiag"), "SqrtGGNExact, per-layer VᵀV"),
            "torch.func": (r.func("blockdiag"), "vmap(jacrev), per-layer blocks"),
        },
    )
    add(
        "ntk",
        w["W4"],
        {
            "fimntk": r.fimntk_ntk(),
            "nngeometry": r.nngeometry_ntk(),
            "BackPACK": (r.backpack_ntk(), "BatchGrad per output, JJᵀ"),
            "torch.func": (r.func_ntk(), "NTK tutorial: jacobian contraction"),
        },
    )
    return cases


def run(argv: Sequence[str] | None = None):
    return main("bench.core", "core", TITLE, build_cases, TARGETS, argv, memory_default=False)


if __name__ == "__main__":
    run()
