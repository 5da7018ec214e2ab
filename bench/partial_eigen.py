"""Partial eigensolver against the full eigendecomposition on a dense Fisher-like matrix.

    python -m bench.partial_eigen --d 17000 --k 5 --threads 1 --skip-full
    python -m bench.partial_eigen --d 4000 --k 5 --threads 2

Prints the seconds of ``top_eigenpairs`` (Lanczos) and of ``torch.linalg.eigh`` (unless
skipped), and the largest relative difference of the top k eigenvalues.
"""

from __future__ import annotations

import argparse
import time

import torch

from fimntk.engine.partial_eigen import top_eigenpairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d", type=int, default=4000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-full", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rank = min(args.d, 2000)
    jac = torch.randn(rank, args.d, generator=g) * torch.logspace(0, -3, rank)[:, None]
    matrix = jac.t() @ jac / rank  # float32, PSD, decaying spectrum, as a Fisher
    del jac
    clock = time.perf_counter()
    evals, _ = top_eigenpairs(matrix, args.k)
    partial_s = time.perf_counter() - clock
    print(f"d={args.d} k={args.k} threads={args.threads} lanczos: {partial_s:.2f} s")
    if args.skip_full:
        return
    clock = time.perf_counter()
    full = torch.linalg.eigvalsh(matrix).flip(0)[: args.k]
    full_s = time.perf_counter() - clock
    rel = float(((evals - full).abs() / full.abs()).max())
    print(f"full eigvalsh: {full_s:.2f} s  ratio {full_s / partial_s:.1f}x  max rel diff {rel:.1e}")


if __name__ == "__main__":
    main()
