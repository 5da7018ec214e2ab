"""Accuracy of the Fisher representations against the exact Fisher (NNGeometry paper, §3.1).

A laptop-scale reproduction of Section 3.1 / Figure 2 of George (2021), "NNGeometry: Easy and
Fast Fisher Information Matrices and Neural Tangent Kernels in PyTorch": a small ResNet-style CNN
is trained for a few epochs on scikit-learn's bundled 8×8 digits (no download). At
initialisation, mid-training and the end, the exact Fisher ``F`` (``classif_logits``, float64,
dense ``d × d``) is compared with the approximations Diag, QuasiDiag, BlockDiag, KFAC and EKFAC:

* relative error ``|x̂ − x| / |x|`` of ``trace()`` and of ``vTMv(v)``;
* cosine between ``F̂ v`` and ``F v``;
* cosine between ``(F̂ + λI)⁻¹ v`` and ``(F + λI)⁻¹ v`` over a log grid of damping λ, given
  relative to the mean eigenvalue ``tr(F)/d``.

``v`` is a standard normal direction (``random``; metrics averaged over ``--n-random`` draws,
one draw alone makes ``vᵀFv`` noisy) and the mean loss gradient on the Fisher examples
(``grad``, the vector natural-gradient methods precondition). The dense reference is
itself checked against an engine-independent ``Fv = (1/n) Σ Jᵢᵀ Hᵢ Jᵢ v`` (``torch.func`` jvp
then vjp). Representations the engine does not offer yet are skipped with a note; ``implicit``,
where available, is reported as a consistency row (it should be exact) and left out of the
verdicts.

Writes under ``bench/out/accuracy/`` (override with ``--out``): ``metrics.csv`` (long format:
checkpoint, representation, metric, vector, draw, λ, value), ``summary.csv``, ``training.csv`` and
``trace_vtmv.png``, ``mv_cos.png``, ``solve_cos.png``. Prints a summary table and a verdict,
computed from the numbers, on each of the paper's conclusions.

The verdicts are computed twice: among the paper's five, and among the scalable four (without
BlockDiag, which stores the exact ``d_l × d_l`` layer blocks and so bounds what a per-layer
approximation can do). Inverse operations: the mean cosine of the damped solve; forward: the
mean rank over the ``vᵀFv`` errors and ``F̂v`` cosines; trace: the mean relative error. Note that
``solve`` is measured as each representation defines it: KFAC damps its two factors
(``π``-corrected, Martens & Grosse 2015 §6.3), which is not ``(F̂ + λI)⁻¹``; QuasiDiag is not
positive semi-definite in general, so ``F̂ + λI`` can be near-singular for some λ.

Usage (from the repository root; ``--threads`` defaults to 1, see ``--help``)::

    python bench/accuracy.py            # about 2-3 min on 2 CPU cores
    python bench/accuracy.py --quick    # under 1 min: fewer examples, epochs and λ
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as Fn
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fimntk import engine  # noqa: E402

#: The approximations of the paper, in plotting order.
APPROX = ["diag", "quasidiag", "blockdiag", "kfac", "ekfac"]
#: Exact representations evaluated as a consistency check only (not in the verdicts).
EXACT_EXTRA = ["implicit"]
#: Scalable approximations (BlockDiag stores the exact d_l × d_l layer blocks).
SCALABLE = ["diag", "quasidiag", "kfac", "ekfac"]
VECTORS = ["random", "grad"]
LABEL = {
    "diag": "Diag",
    "quasidiag": "QuasiDiag",
    "blockdiag": "BlockDiag",
    "kfac": "KFAC",
    "ekfac": "EKFAC",
    "implicit": "Implicit",
}
STYLE = {
    "diag": ("tab:blue", "o"),
    "quasidiag": ("tab:cyan", "v"),
    "blockdiag": ("tab:green", "s"),
    "kfac": ("tab:red", "D"),
    "ekfac": ("tab:purple", "^"),
    "implicit": ("black", "x"),
}
TINY = 1e-17  # floor for log plots of errors that are exactly zero up to round-off


# ----- model and data ------------------------------------------------------------------------
class ResBlock(nn.Module):
    """``relu(x + conv(relu(conv(x))))`` with 3×3 convolutions, no normalisation layer."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class SmallResNet(nn.Module):
    """Stem conv → ResBlock → avgpool(2) → ResBlock → adaptive avgpool(2×2) → linear.

    No BatchNorm (a Fisher needs eval-mode statistics, and KFAC covers conv/linear layers
    only), so every parameter belongs to a Conv2d or a Linear layer.
    """

    def __init__(self, width: int = 8, n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.block1 = ResBlock(width)
        self.block2 = ResBlock(width)
        self.fc = nn.Linear(width * 4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = Fn.avg_pool2d(self.block1(x), 2)
        x = Fn.adaptive_avg_pool2d(self.block2(x), 2)
        return self.fc(x.flatten(1))


def load_digits(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = 297
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


# ----- exact reference, independent of the engine ---------------------------------------------
def ggn_mv_reference(model: nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F v = (1/n) Σᵢ Jᵢᵀ (diag(pᵢ) − pᵢpᵢᵀ) Jᵢ v`` via one jvp and one vjp (no engine)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    tangents, start = {}, 0
    for n in names:
        k = params[n].numel()
        tangents[n] = v[start : start + k].reshape(params[n].shape)
        start += k

    def f(p):
        return torch.func.functional_call(model, p, (x,))

    logits, jv = torch.func.jvp(f, (params,), (tangents,))
    prob = torch.softmax(logits, dim=1)
    hjv = prob * jv - prob * (prob * jv).sum(1, keepdim=True)
    _, vjp = torch.func.vjp(f, params)
    (g,) = vjp(hjv / x.shape[0])
    return torch.cat([g[n].reshape(-1) for n in names])


def mean_loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    Fn.cross_entropy(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    model.zero_grad()
    return g.detach().clone()


# ----- helpers ---------------------------------------------------------------------------------
def rel_err(est: float, ref: float) -> float:
    return abs(est - ref) / abs(ref)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.dot(a, b) / (a.norm() * b.norm())).item()


def available(rep: str) -> bool:
    try:
        engine.resolve_representation(rep)
        return True
    except engine.InvalidInputError:
        return False


def build(rep: str, model: nn.Module, loader: list) -> engine.PMatAbstract:
    """``fimntk.engine.FIM`` in ``rep``; EKFAC gets its eigenvalue correction if not already
    done."""
    F = engine.FIM(model, loader, representation=rep, variant="classif_logits")
    if hasattr(F, "update_diag"):
        flags = [
            getattr(F, a)
            for a in (
                "diag_updated",
                "is_diag_updated",
                "_diag_updated",
                "corrected",
                "eigenvalues_corrected",
            )
            if isinstance(getattr(F, a, None), bool)
        ]
        if not any(flags):
            F.update_diag(loader)
    return F


def safe(fn, note: list, what: str):
    """``fn()``, or NaN with a note if the representation does not support it."""
    try:
        out = fn()
        return out.item() if isinstance(out, torch.Tensor) and out.dim() == 0 else out
    except (NotImplementedError, engine.FimntkError) as err:
        note.append(f"{what}: {type(err).__name__}: {str(err)[:120]}")
        return float("nan")


# ----- one checkpoint --------------------------------------------------------------------------
def evaluate(
    ckpt: str,
    model32: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    reps: list[str],
    lam_rel: list[float],
    n_random: int,
    seed: int,
    rows: list[dict],
    cg_solve: bool = True,
) -> dict:
    model = copy.deepcopy(model32).double().eval()
    xd = x.double()
    loader = [(xd[i : i + 100], y[i : i + 100]) for i in range(0, len(y), 100)]
    lc = engine.LayerCollection.from_model(model)
    d = lc.numel()

    t0 = time.perf_counter()
    Fd = engine.FIM(model, loader, representation="dense", variant="classif_logits")
    M = Fd.to_torch()
    t_dense = time.perf_counter() - t0
    tr = M.diagonal().sum().item()
    mean_eig = tr / d
    lams = [a * mean_eig for a in lam_rel]

    gen = torch.Generator().manual_seed(seed + 1)
    vecs = {
        ("random", i): torch.randn(d, generator=gen, dtype=torch.float64) for i in range(n_random)
    }
    vecs["grad", 0] = mean_loss_gradient(model, xd, y)
    # Exact damped solves: one Cholesky factorisation per λ for all the vectors at once.
    rhs = torch.stack(list(vecs.values()), dim=1)
    eye = torch.eye(d, dtype=M.dtype)
    sols = [torch.cholesky_solve(rhs, torch.linalg.cholesky(M + lam * eye)) for lam in lams]
    ref = {}
    check = 0.0
    for j, (k, v) in enumerate(vecs.items()):
        fv = M @ v
        check = max(check, ((fv - ggn_mv_reference(model, xd, v)).norm() / fv.norm()).item())
        ref[k] = {"mv": fv, "vTMv": torch.dot(v, fv).item(), "solve": [x[:, j] for x in sols]}
    print(
        f"  [{ckpt}] d={d}, n={len(y)}, dense F + exact solves {time.perf_counter() - t0:.1f}s,"
        f" tr F={tr:.4g}, dense F vs engine-free jvp/vjp Fv: max rel err {check:.1e}"
    )
    if check > 1e-8:
        print(f"  WARNING: the engine's dense F disagrees with the jvp/vjp reference ({check:.1e})")

    def add(rep, metric, value, vec=("", 0), lam=float("nan"), lrel=float("nan")):
        rows.append(
            {
                "checkpoint": ckpt,
                "representation": rep,
                "metric": metric,
                "vector": vec[0],
                "draw": vec[1],
                "lambda": lam,
                "lambda_rel": lrel,
                "value": value,
            }
        )

    add("dense", "reference_check", check)
    add("dense", "build_s", t_dense)
    for rep in reps:
        note: list[str] = []
        t0 = time.perf_counter()
        try:
            F = build(rep, model, loader)
        except (NotImplementedError, engine.FimntkError) as err:
            print(f"  [{ckpt}] {rep}: could not build ({type(err).__name__}: {err}); skipped")
            continue
        add(rep, "build_s", time.perf_counter() - t0)
        evaluate_rep(rep, F, lc, M, tr, vecs, ref, lams, lam_rel, add, note, cg_solve)
        for msg in dict.fromkeys(note):
            print(f"  [{ckpt}] {rep}: {msg}")
    return {"d": d, "trace": tr, "mean_eig": mean_eig, "check": check}


def evaluate_rep(rep, F, lc, M, tr, vecs, ref, lams, lam_rel, add, note, cg_solve) -> None:
    """All metrics of one representation at one checkpoint, appended through ``add``."""
    exact = rep in EXACT_EXTRA
    add(rep, "trace_relerr", rel_err(safe(F.trace, note, "trace"), tr))
    if not exact:  # an exact operator's to_torch() is the dense F again: skip the cost
        dense = safe(F.to_torch, note, "to_torch")
        if isinstance(dense, torch.Tensor):
            add(rep, "frobenius_relerr", ((dense - M).norm() / M.norm()).item())
    for k, v in vecs.items():
        pv = engine.PVector(lc, vector_repr=v)
        add(
            rep,
            "vTMv_relerr",
            rel_err(safe(lambda pv=pv: F.vTMv(pv), note, "vTMv"), ref[k]["vTMv"]),
            k,
        )
        mv = safe(lambda pv=pv: F.mv(pv).get_flat_representation(), note, "mv")
        add(
            rep,
            "mv_cos",
            cosine(mv, ref[k]["mv"]) if isinstance(mv, torch.Tensor) else float("nan"),
            k,
        )
        for i, (lam, lr, sref) in enumerate(zip(lams, lam_rel, ref[k]["solve"])):
            # Conjugate gradients (implicit) make a pass over the data per iteration: check one
            # vector at the largest damping only, where CG converges in a few tens of iterations.
            if exact and (not cg_solve or i != len(lams) - 1 or k[0] != "grad"):
                continue
            s = safe(
                lambda F=F, pv=pv, lam=lam: F.solve(pv, regul=lam).get_flat_representation(),
                note,
                f"solve(λ={lam:.2g})",
            )
            add(
                rep,
                "solve_cos",
                cosine(s, sref) if isinstance(s, torch.Tensor) else float("nan"),
                k,
                lam,
                lr,
            )
            info = getattr(F, "last_solve_info", None)
            if exact and info:
                note.append(f"CG solve: {info}")


# ----- training ------------------------------------------------------------------------------
def train(args) -> tuple[list[tuple[str, nn.Module]], list[dict], tuple]:
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_digits(args.seed)
    model = SmallResNet(args.width)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ckpts = [("init", copy.deepcopy(model))]
    log = [{"epoch": 0, "train_loss": float("nan"), "test_acc": accuracy(model, xte, yte)}]
    mid = max(1, args.epochs // 2)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        total = 0.0
        for i in range(0, len(ytr), args.batch_size):
            idx = perm[i : i + args.batch_size]
            opt.zero_grad()
            loss = Fn.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        log.append(
            {"epoch": epoch, "train_loss": total / len(ytr), "test_acc": accuracy(model, xte, yte)}
        )
        if epoch == mid and epoch != args.epochs:
            ckpts.append((f"mid (ep {epoch})", copy.deepcopy(model)))
    ckpts.append((f"end (ep {args.epochs})", copy.deepcopy(model)))
    return ckpts, log, (xtr, ytr)


# ----- summaries, verdicts ---------------------------------------------------------------------
def values(rows, rep, metric, vector=None, ckpt=None):
    return [
        r["value"]
        for r in rows
        if r["representation"] == rep
        and r["metric"] == metric
        and (vector is None or r["vector"] == vector)
        and (ckpt is None or r["checkpoint"] == ckpt)
        and not math.isnan(r["value"])
    ]


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def gmean(xs):
    return math.exp(mean([math.log(max(x, TINY)) for x in xs])) if xs else float("nan")


def cell_ranks(rows, reps, metric, higher_better) -> dict[str, list[int]]:
    """Rank (1 = best) of each representation in every (checkpoint, vector, λ) cell."""
    cells: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["metric"] == metric and r["representation"] in reps and not math.isnan(r["value"]):
            key = (r["checkpoint"], r["vector"], r["draw"], r["lambda_rel"])
            cells.setdefault(key, {})[r["representation"]] = r["value"]
    ranks: dict[str, list[int]] = {rep: [] for rep in reps}
    for vals in cells.values():
        if len(vals) != len(reps):
            continue
        order = sorted(vals, key=lambda k: -vals[k] if higher_better else vals[k])
        for i, rep in enumerate(order):
            ranks[rep].append(i + 1)
    return ranks


def verdicts(rows, present: list[str]) -> list[str]:
    out = []
    for group_name, group in (
        ("the paper's five", APPROX),
        ("the scalable ones, i.e. without BlockDiag", SCALABLE),
    ):
        reps = [r for r in group if r in present]
        if len(reps) < 2:
            continue
        out.append(f"Among {group_name} available here ({', '.join(LABEL[r] for r in reps)}):")
        # Inverse operations: mean cosine of the damped solve over checkpoints, vectors and λ.
        inv = {r: mean(values(rows, r, "solve_cos")) for r in reps}
        best_inv = max(inv, key=inv.get)
        ranks = cell_ranks(rows, reps, "solve_cos", higher_better=True)
        wins = {r: sum(1 for x in ranks[r] if x == 1) for r in reps}
        ncell = len(ranks[reps[0]])
        out.append(
            _verdict(
                "KFAC best for inverse operations (solve)",
                "kfac",
                best_inv,
                reps,
                f"mean cos(solve) {fmt_map(inv)}; best in "
                f"{fmt_map(wins, '{:d}')} of {ncell} (ckpt, v, λ) cells",
            )
        )
        # Forward operations: mean rank over vTMv relative error and 1 − cos(Fv).
        r1 = cell_ranks(rows, reps, "vTMv_relerr", higher_better=False)
        r2 = cell_ranks(rows, reps, "mv_cos", higher_better=True)
        fwd = {r: mean(r1[r] + r2[r]) for r in reps}
        best_fwd = min(fwd, key=fwd.get)
        out.append(
            _verdict(
                "EKFAC best for forward operations (vTMv, Fv)",
                "ekfac",
                best_fwd,
                reps,
                f"mean rank over vTMv error and cos(Fv) cells {fmt_map(fwd)}",
            )
        )
        # Trace: KFAC's relative error the largest.
        trc = {r: mean(values(rows, r, "trace_relerr")) for r in reps}
        worst = max(trc, key=trc.get)
        out.append(
            _verdict(
                "KFAC's trace least accurate",
                "kfac",
                worst,
                reps,
                f"mean trace rel. error {fmt_map(trc, '{:.1e}')}",
            )
        )
    return out or ["  UNDETERMINED: fewer than two of the paper's representations were compared"]


def _verdict(claim, expect, got, reps, detail) -> str:
    if expect not in reps:
        return f"  - {claim}: UNDETERMINED ({LABEL[expect]} not available yet)"
    status = "HOLDS" if got == expect else f"DOES NOT HOLD ({LABEL[got]} is)"
    return f"  - {claim}: {status}; {detail}"


def fmt_map(m, spec="{:.3f}") -> str:
    return ", ".join(f"{LABEL[k]} {spec.format(v)}" for k, v in m.items())


def summary_rows(rows, ckpts, reps) -> list[dict]:
    out = []
    for ck in ckpts:
        for rep in reps:
            if not values(rows, rep, "build_s", ckpt=ck):
                continue
            row = {
                "checkpoint": ck,
                "representation": rep,
                "trace_relerr": mean(values(rows, rep, "trace_relerr", ckpt=ck)),
                "frobenius_relerr": mean(values(rows, rep, "frobenius_relerr", ckpt=ck)),
            }
            for v in VECTORS:
                row[f"vTMv_relerr_{v}"] = mean(values(rows, rep, "vTMv_relerr", v, ck))
                row[f"mv_cos_{v}"] = mean(values(rows, rep, "mv_cos", v, ck))
                row[f"solve_cos_{v}"] = mean(values(rows, rep, "solve_cos", v, ck))
            row["build_s"] = mean(values(rows, rep, "build_s", ckpt=ck))
            out.append(row)
    return out


def print_table(summary: list[dict]) -> None:
    cols = [
        ("trace_relerr", "trace err", "{:.1e}"),
        ("frobenius_relerr", "frob err", "{:.2f}"),
        ("vTMv_relerr_random", "vTMv err r", "{:.1e}"),
        ("vTMv_relerr_grad", "vTMv err g", "{:.1e}"),
        ("mv_cos_random", "cos Fv r", "{:.4f}"),
        ("mv_cos_grad", "cos Fv g", "{:.4f}"),
        ("solve_cos_random", "cos slv r", "{:.4f}"),
        ("solve_cos_grad", "cos slv g", "{:.4f}"),
        ("build_s", "build s", "{:.2f}"),
    ]
    head = f"{'checkpoint':<12} {'repr':<10} " + " ".join(f"{c[1]:>10}" for c in cols)
    print(head)
    print("-" * len(head))
    last = None
    for r in summary:
        ck = r["checkpoint"] if r["checkpoint"] != last else ""
        last = r["checkpoint"]
        cells = " ".join(f"{c[2].format(r[c[0]]):>10}" for c in cols)
        print(f"{ck:<12} {LABEL[r['representation']]:<10} {cells}")
    print("(r = random direction, g = loss gradient; cos slv = mean over the λ grid)")


# ----- plots -----------------------------------------------------------------------------------
def plot(rows, ckpts, reps, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = range(len(ckpts))
    paths = []

    def series(rep, metric, vector=None, transform=lambda v: v):
        return [transform(mean(values(rows, rep, metric, vector, ck))) for ck in ckpts]

    def line(ax, rep, ys):
        color, marker = STYLE[rep]
        ax.plot(
            xs,
            ys,
            marker=marker,
            color=color,
            label=LABEL[rep],
            ls="--" if rep in EXACT_EXTRA else "-",
        )

    def finish(ax, title, ylabel, log=True):
        ax.set_xticks(list(xs), ckpts)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)

    floor = lambda v: max(v, TINY)  # noqa: E731
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for rep in reps:
        line(axes[0], rep, series(rep, "trace_relerr", transform=floor))
        for ax, v in zip(axes[1:], VECTORS):
            line(ax, rep, series(rep, "vTMv_relerr", v, floor))
    finish(axes[0], "trace: |tr F̂ − tr F| / tr F", "relative error (lower is better)")
    for ax, v in zip(axes[1:], VECTORS):
        finish(ax, f"vᵀFv, v = {v}: relative error", "relative error (lower is better)")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "Forward quantities vs exact Fisher (values at 1e-17 are exact up to round-off)",
        fontsize=10,
    )
    fig.tight_layout()
    paths.append(out / "trace_vtmv.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for rep in reps:
        for ax, v in zip(axes, VECTORS):
            line(ax, rep, series(rep, "mv_cos", v, lambda c: floor(1.0 - c)))
    for ax, v in zip(axes, VECTORS):
        finish(ax, f"F̂v vs Fv, v = {v}", "1 − cos angle (lower is better)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "mv_cos.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(
        len(VECTORS),
        len(ckpts),
        figsize=(4.6 * len(ckpts), 7.5),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for i, v in enumerate(VECTORS):
        for j, ck in enumerate(ckpts):
            ax = axes[i][j]
            for rep in reps:
                by_lam: dict[float, list[float]] = {}
                for r in rows:
                    if (
                        r["representation"] == rep
                        and r["metric"] == "solve_cos"
                        and r["vector"] == v
                        and r["checkpoint"] == ck
                        and not math.isnan(r["value"])
                    ):
                        by_lam.setdefault(r["lambda_rel"], []).append(r["value"])
                pts = sorted((lam, mean(vs)) for lam, vs in by_lam.items())
                if pts:
                    color, marker = STYLE[rep]
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        marker=marker,
                        ms=4,
                        color=color,
                        label=LABEL[rep],
                        ls="--" if rep in EXACT_EXTRA else "-",
                    )
            ax.set_xscale("log")
            ax.set_title(f"{ck}, v = {v}", fontsize=10)
            ax.grid(alpha=0.3)
            if i == len(VECTORS) - 1:
                ax.set_xlabel("damping λ / (tr F / d)")
            if j == 0:
                ax.set_ylabel("cos((F̂+λI)⁻¹v, (F+λI)⁻¹v)")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Damped solve vs exact (higher is better)", fontsize=11)
    fig.tight_layout()
    paths.append(out / "solve_cos.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# ----- main ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer examples, epochs and λ (<1 min)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "accuracy")
    p.add_argument(
        "--n-fisher",
        type=int,
        default=None,
        help="training examples the Fisher is computed on (default 500, quick 200)",
    )
    p.add_argument("--epochs", type=int, default=None, help="default 10, quick 4")
    p.add_argument("--width", type=int, default=8, help="channels of the CNN (d ≈ 43·w²)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reps",
        default=",".join(APPROX + EXACT_EXTRA),
        help="comma-separated representations to compare",
    )
    p.add_argument(
        "--n-random",
        type=int,
        default=None,
        help="random directions v, metrics averaged over them (default 4, quick 2)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: this workload is mostly small kernels, "
        "and on a busy machine extra threads make it several times slower)",
    )
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    args.n_fisher = args.n_fisher or (200 if args.quick else 500)
    args.epochs = args.epochs or (4 if args.quick else 10)
    args.n_random = args.n_random or (2 if args.quick else 4)
    lam_rel = [1e-3, 1e-1, 10.0, 1e3] if args.quick else [10.0 ** (k / 2) for k in range(-8, 7)]

    torch.set_num_threads(max(1, args.threads))
    start = time.perf_counter()
    wanted = [r.strip().lower() for r in args.reps.split(",") if r.strip()]
    reps = []
    for r in wanted:
        if available(r):
            reps.append(r)
        else:
            print(f"note: representation {r!r} is not in the engine yet; skipped")
    if not reps:
        print("no representation to compare")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick and any(r in EXACT_EXTRA for r in reps):
        print("note: --quick skips the conjugate-gradient solve of the implicit Fisher")

    ckpts, log, (xtr, ytr) = train(args)
    print(
        f"trained SmallResNet(width={args.width}) for {args.epochs} epochs on digits: "
        f"test accuracy {log[0]['test_acc']:.3f} → {log[-1]['test_acc']:.3f} "
        f"({time.perf_counter() - start:.1f}s)"
    )
    x, y = xtr[: args.n_fisher], ytr[: args.n_fisher]
    rows: list[dict] = []
    for name, model in ckpts:
        evaluate(
            name,
            model,
            x,
            y,
            reps,
            lam_rel,
            args.n_random,
            args.seed,
            rows,
            cg_solve=not args.quick,
        )
    names = [n for n, _ in ckpts]
    present = [r for r in reps if any(row["representation"] == r for row in rows)]

    write_csv(args.out / "metrics.csv", rows)
    write_csv(args.out / "training.csv", log)
    summary = summary_rows(rows, names, present)
    write_csv(args.out / "summary.csv", summary)
    print()
    print_table(summary)
    print()
    print("Paper conclusions (NNGeometry §3.1), checked on these numbers:")
    for line in verdicts(rows, present):
        print(line)
    files = [args.out / f for f in ("metrics.csv", "summary.csv", "training.csv")]
    if not args.no_plots:
        files += plot(rows, names, [r for r in present if r not in EXACT_EXTRA], args.out)
    shown = [str(f.relative_to(REPO)) if f.is_relative_to(REPO) else str(f) for f in files]
    print(f"\nwrote {', '.join(shown)}")
    print(f"total {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
