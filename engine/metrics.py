"""Metrics: the Fisher Information Matrix (exact, Monte Carlo, empirical) and the NTK Gram.

Convention (tested): ``F = (1/n) Σ_i E_{y~p(y|x_i)}[∇_θ log p(y|x_i) ∇_θ log p(y|x_i)ᵀ]`` with n
the number of examples the loader actually yielded (a ``drop_last`` loader included). The Gram
matrix ``K[k, i, l, j] = ⟨∂_θ f_k(x_i), ∂_θ f_l(x_j)⟩`` is *not* divided by n.

References: Amari (1998), "Natural gradient works efficiently in learning"; George, Laurent,
Bouthillier, Ballas & Vincent (2018, NNGeometry 2021); Jacot, Gabriel & Hongler (2018), "Neural
Tangent Kernel".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from typing import Any

import torch
from torch import nn

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.fspace import FMatDense
from fimntk.engine.generator import (
    EmpiricalFisher,
    ExactFisher,
    Identity,
    Jacobian,
    MonteCarloFisher,
    PseudoOutputs,
)
from fimntk.engine.generator.jacobian import Progress
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.memory import check_budget
from fimntk.engine.pspace import PMatAbstract, resolve_representation


def _build(
    model: nn.Module,
    loader: Iterable,
    representation: str | type[PMatAbstract],
    pseudo: PseudoOutputs,
    *,
    function: Callable | None,
    n_output: int | None,
    layer_collection: LayerCollection | None,
    device: str | torch.device | None,
    verbose: bool,
    progress: Progress | None,
    options: dict[str, Any],
) -> PMatAbstract:
    cls = resolve_representation(representation)
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    budget = options.pop("memory_budget", None)
    lc = LayerCollection.resolve(model, layer_collection)
    gen = Jacobian(
        model,
        lc,
        function=function,
        n_output=n_output,
        pseudo_outputs=pseudo,
        device=device,
        verbose=verbose,
        progress=progress,
    )
    if budget is not None:
        c, k = gen.probe(loader)
        dataset = getattr(loader, "dataset", None)
        n = len(dataset) if isinstance(dataset, Sized) else None
        check_budget(model, cls.name, int(budget), c, n, k, lc)
    return cls(lc, generator=gen, examples=loader, **options)


def FIM(
    model: nn.Module,
    loader: Iterable,
    representation: str | type[PMatAbstract],
    variant: str = "classif_logits",
    device: str | torch.device | None = None,
    function: Callable | None = None,
    layer_collection: LayerCollection | None = None,
    verbose: bool = False,
    n_output: int | None = None,
    sigma: float = 1.0,
    progress: Progress | None = None,
    **options: Any,
) -> PMatAbstract:
    """The Fisher Information Matrix with the expectation over ``y`` computed exactly.

    Args:
        model: the network; ``function(*batch)`` gives its ``(n, c)`` outputs.
        loader: iterable of batches ``(x,)`` or ``(x, y)`` (targets are not used).
        representation: a ``PMat*`` class or its name (``"dense"``, ``"diag"``, ``"kfac"``...).
        variant: ``"classif_logits"`` (softmax), ``"classif_binary_logits"`` (sigmoid of one
            logit) or ``"regression"`` (Gaussian with standard deviation ``sigma``).
        device: where batches go; default the model's device.
        function: how to apply the model to a batch; default ``model(batch[0])``.
        layer_collection: restrict to some layers.
        verbose: progress bar.
        n_output: expected number of outputs c (checked).
        sigma: regression noise standard deviation.
        progress: ``progress(done, total, stage)`` callback.
        **options: representation options, e.g. ``kfac_approx="reduce"`` (KFAC, EKFAC, Mixed),
            ``policy={...}`` (Mixed), and ``memory_budget=bytes``: raise
            :class:`~fimntk.engine.errors.MemoryBudgetError` (naming the need and a cheaper
            representation) before computing anything if the result would not fit.

    Returns:
        The representation, ``(1/n) Σ_i J_iᵀ H_i J_i`` with ``H_i`` the output Fisher.

    Example::

        F = FIM(model, loader, representation="kfac")
        F.vTMv(PVector.from_model(model))
    """
    return _build(
        model,
        loader,
        representation,
        ExactFisher(variant, sigma),
        function=function,
        n_output=n_output,
        layer_collection=layer_collection,
        device=device,
        verbose=verbose,
        progress=progress,
        options=options,
    )


def FIM_MonteCarlo(
    model: nn.Module,
    loader: Iterable,
    representation: str | type[PMatAbstract],
    variant: str = "classif_logits",
    trials: int = 1,
    device: str | torch.device | None = None,
    function: Callable | None = None,
    layer_collection: LayerCollection | None = None,
    verbose: bool = False,
    n_output: int | None = None,
    sigma: float = 1.0,
    seed: int | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> PMatAbstract:
    """The Fisher with the expectation over ``y`` replaced by ``trials`` samples per example.

    Unbiased: ``E[F_MC] = F``. ``seed`` makes the draws reproducible. Other arguments as in
    :func:`FIM`.
    """
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(int(seed))
    else:
        gen.seed()
    return _build(
        model,
        loader,
        representation,
        MonteCarloFisher(variant, trials, sigma, gen),
        function=function,
        n_output=n_output,
        layer_collection=layer_collection,
        device=device,
        verbose=verbose,
        progress=progress,
        options=options,
    )


def EmpiricalFIM(
    model: nn.Module,
    loader: Iterable,
    representation: str | type[PMatAbstract],
    variant: str = "classif_logits",
    centering: bool = False,
    device: str | torch.device | None = None,
    function: Callable | None = None,
    layer_collection: LayerCollection | None = None,
    verbose: bool = False,
    n_output: int | None = None,
    sigma: float = 1.0,
    progress: Progress | None = None,
    **options: Any,
) -> PMatAbstract:
    """The empirical Fisher ``(1/n) Σ_i ∇ log p(y_i|x_i) ∇ log p(y_i|x_i)ᵀ`` at the true targets.

    The loader must yield ``(x, y)``. With ``centering=True`` the mean gradient ``ḡ`` is
    subtracted: ``(1/n) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ`` (the gradients' covariance). Not the Fisher in
    general — see Kunstner, Balles & Hennig (2019), "Limitations of the empirical Fisher".
    """
    pseudo = EmpiricalFisher(variant, sigma)
    mat = _build(
        model,
        loader,
        representation,
        pseudo,
        function=function,
        n_output=n_output,
        layer_collection=layer_collection,
        device=device,
        verbose=verbose,
        progress=progress,
        options=options,
    )
    if centering:
        centered = mat.centered(mat.generator.get_mean_gradient(loader))
        centered.generator, centered.paths = mat.generator, mat.paths
        mat = centered
    return mat


FIM_empirical = EmpiricalFIM


def GramMatrix(
    model: nn.Module,
    loader: Iterable,
    layer_collection: LayerCollection | None = None,
    device: str | torch.device | None = None,
    function: Callable | None = None,
    verbose: bool = False,
    n_output: int | None = None,
    progress: Progress | None = None,
) -> FMatDense:
    """The finite-width NTK Gram matrix ``K[k, i, l, j] = ⟨∂_θ f_k(x_i), ∂_θ f_l(x_j)⟩``.

    Computed per layer from activations and output gradients where the layer allows it (Linear:
    ``(A Aᵀ) ⊙ (G Gᵀ)``; Novak et al. 2022), without per-example weight gradients.

    Returns:
        :class:`FMatDense` of shape ``(c, n, c, n)``, not divided by n.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lc = LayerCollection.resolve(model, layer_collection)
    gen = Jacobian(
        model,
        lc,
        function=function,
        n_output=n_output,
        pseudo_outputs=Identity(),
        device=device,
        verbose=verbose,
        progress=progress,
    )
    return FMatDense(gen.get_gram_matrix(loader), paths=gen.paths)


NTK = GramMatrix
