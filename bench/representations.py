"""Representations (issue 3) on W2 (MLP) and W3 (CNN): KFAC, EKFAC, diagonal (exact and Monte
Carlo), matrix-free ``vᵀFv`` and ``Fv``, with the peak memory of each.

Tools: fimntk, NNGeometry 0.4, BackPACK 1.7 (``KFLR``/``KFAC``, ``DiagGGNExact``/``DiagGGNMC``,
Hessian-free ``R_op``/``ggn_vector_product``), curvlinops 3.0 (``KFACLinearOperator``,
``EKFACLinearOperator`` with ``fisher_type="type-2"`` and a joint bias; ``GGNLinearOperator``),
torch.func (``jvp``/``vjp``).

``-mc`` quantities use one Monte Carlo sample per example (fimntk ``FIM_MonteCarlo(trials=1)``)
and are checked against fimntk's exact result: their error is the Monte Carlo noise, not a
disagreement. A representation not in the engine yet shows ``n/a (not in engine)``.

Run ``python -m bench.representations [--quick]`` from the repository root.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench import tool_recipes as r
from bench._common import W2, W3, Case, Settings, Target, Workload, main

TITLE = "fimntk representations: KFAC, EKFAC, diagonal, implicit products"

TARGETS = [
    Target(q, w)
    for q in ("kfac", "ekfac", "diag", "diag-mc", "kfac-mc", "vTMv", "mv")
    for w in ("W2", "W3")
]


def _workloads(settings: Settings) -> list[Workload]:
    if settings.quick:
        return [W2.scaled(500), W3.scaled(64)]
    return [W2, W3]


def build_cases(settings: Settings) -> list[Case]:
    cases: list[Case] = []
    wls = _workloads(settings)

    def add(quantity: str, tools: dict, reference: str | None = None) -> None:
        for wl in wls:
            if settings.quick and quantity == "ekfac" and wl.key == "W3":
                continue  # the peers' eigendecompositions of the 6273² input factor: ~1 min
            for tool, prep in tools.items():
                note, in_target = "", True
                if isinstance(prep, tuple):
                    prep, note = prep
                if quantity.startswith("kfac") and tool == "BackPACK" and wl.key == "W3":
                    # BackPACK's conv G is (Σ_t s_t)(Σ_t s_t)ᵀ, the bias GGN, not KFC's
                    # Σ_t s_t s_tᵀ: another approximation, so not a like-for-like speed peer
                    note += "; conv G = bias GGN, not KFC (not in target)"
                    in_target = False
                cases.append(
                    Case(
                        quantity,
                        wl,
                        tool,
                        prep,
                        note=note,
                        reference=reference,
                        in_target=in_target,
                    )
                )

    add(
        "kfac",
        {
            "fimntk": r.fimntk("kfac"),
            "nngeometry": r.nngeometry("kfac"),
            "BackPACK": (r.backpack_kfac(exact=True), "KFLR; weights only (bias kept apart)"),
            "curvlinops": (r.curvlinops("kfac"), "type-2, joint bias"),
        },
    )
    add(
        "kfac-mc",
        {
            "fimntk": r.fimntk("kfac", mc=True),
            "nngeometry": r.nngeometry("kfac", mc=True),
            "BackPACK": (r.backpack_kfac(exact=False), "KFAC (MC); weights only"),
            "curvlinops": (r.curvlinops("kfac", mc=True), "mc, 1 sample, joint bias"),
        },
        reference="kfac",
    )
    add(
        "ekfac",
        {
            "fimntk": r.fimntk("ekfac"),
            "nngeometry": (r.nngeometry("ekfac"), "PMatEKFAC + update_diag"),
            "curvlinops": (r.curvlinops("ekfac"), "type-2, joint bias"),
        },
    )
    add(
        "diag",
        {
            "fimntk": r.fimntk("diag"),
            "nngeometry": r.nngeometry("diag"),
            "BackPACK": (r.backpack("diag"), "DiagGGNExact"),
        },
    )
    add(
        "diag-mc",
        {
            "fimntk": r.fimntk("diag", mc=True),
            "nngeometry": r.nngeometry("diag", mc=True),
            "BackPACK": (r.backpack("diag-mc"), "DiagGGNMC"),
        },
        reference="diag",
    )
    add(
        "vTMv",
        {
            "fimntk": r.fimntk("vTMv"),
            "nngeometry": (r.nngeometry("vTMv"), "PMatImplicit"),
            "torch.func": (r.func_implicit("vTMv"), "jvp; Σ (Jv)ᵀH(Jv)"),
            "BackPACK": (r.backpack_implicit("vTMv"), "R_op (double backward)"),
            "curvlinops": (r.curvlinops("vTMv"), "GGNLinearOperator, v·(Gv)"),
        },
    )
    add(
        "mv",
        {
            "fimntk": r.fimntk("mv"),
            "nngeometry": (r.nngeometry("mv"), "PMatImplicit"),
            "torch.func": (r.func_implicit("mv"), "jvp + vjp"),
            "BackPACK": (r.backpack_implicit("mv"), "ggn_vector_product"),
            "curvlinops": (r.curvlinops("mv"), "GGNLinearOperator"),
        },
    )
    return cases


def run(argv: Sequence[str] | None = None):
    return main(
        "bench.representations",
        "representations",
        TITLE,
        build_cases,
        TARGETS,
        argv,
        memory_default=None,
    )


if __name__ == "__main__":
    run()
