"""Representations on a ResNet and transformers (issue 17): W5 (ResNet-8, BatchNorm in eval
mode, residual), W6 (two ``nn.TransformerEncoderLayer``) and W7 (a small GPT-2 built from a
config; needs ``transformers``): diagonal, KFAC, EKFAC (with
``update_diag``), matrix-free ``vᵀFv``, each against one plain forward+backward pass and against
every peer that runs the model, with peak memory in full mode.

Peers: NNGeometry 0.4, BackPACK 1.7, curvlinops 3.0 and ``torch.func`` (``jvp``); a peer that
refuses a model (BatchNorm, attention's functional projections) shows ``n/a`` with its reason.
On W6 fimntk takes every layer on its hooks (attention as Linear projections,
``engine/layers/attention.py``); KFAC holds one Kronecker block per q/k/v projection.

Run ``python -m bench.architectures [--quick] [--threads N] [--device cuda]`` from the
repository root; with ``--device cuda`` times are CUDA-synchronised and memory is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench import tool_recipes as r
from bench._common import W5, W6, W7, Case, Settings, Target, Workload, main

TITLE = "fimntk on a ResNet and transformers: diagonal, KFAC, EKFAC, implicit vTMv"

TARGETS = [Target(q, w) for q in ("kfac", "diag", "vTMv") for w in ("W5", "W6", "W7")]


def _workloads(settings: Settings) -> list[Workload]:
    if settings.quick:
        return [W5.scaled(128), W6.scaled(128), W7.scaled(128)]
    return [W5, W6, W7]


def build_cases(settings: Settings) -> list[Case]:
    tools = {
        "kfac": {
            "fimntk": r.fimntk("kfac"),
            "nngeometry": r.nngeometry("kfac"),
            "curvlinops": (r.curvlinops("kfac"), "type-2, joint bias"),
        },
        "ekfac": {
            "fimntk": r.fimntk("ekfac"),
            "nngeometry": (r.nngeometry("ekfac"), "PMatEKFAC + update_diag"),
            "curvlinops": (r.curvlinops("ekfac"), "type-2, joint bias"),
        },
        "diag": {
            "fimntk": r.fimntk("diag"),
            "nngeometry": r.nngeometry("diag"),
            "BackPACK": (r.backpack("diag"), "DiagGGNExact"),
        },
        "vTMv": {
            "fimntk": r.fimntk("vTMv"),
            "torch.func": (r.func_implicit("vTMv"), "jvp; Σ (Jv)ᵀH(Jv)"),
            "BackPACK": (r.backpack_implicit("vTMv"), "R_op (double backward)"),
            "curvlinops": (r.curvlinops("vTMv"), "GGNLinearOperator, v·(Gv)"),
        },
    }
    cases = []
    for quantity, by_tool in tools.items():
        for wl in _workloads(settings):
            for tool, prep in by_tool.items():
                prep, note = prep if isinstance(prep, tuple) else (prep, "")
                cases.append(Case(quantity, wl, tool, prep, note=note))
    return cases


def run(argv: Sequence[str] | None = None):
    return main(
        "bench.architectures",
        "architectures",
        TITLE,
        build_cases,
        TARGETS,
        argv,
        memory_default=None,
    )


if __name__ == "__main__":
    run()
