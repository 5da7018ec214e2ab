"""Pseudo-outputs: which combinations of the network outputs the Jacobian generator differentiates.

Every metric of the engine is a sum over examples of ``J_iᵀ H_i J_i`` (``J_i``: the ``c × d``
Jacobian of the outputs of example ``i``). Writing ``H_i = L_i L_iᵀ`` with ``L_i`` of shape
``(c, K)``, the generator differentiates the K *pseudo-outputs* ``f̃_{k,i} = Σ_j L_i[j, k] f_{j,i}``
(one backward pass each, all examples at once); their per-example gradients are the rows that the
representations aggregate. A pseudo-output object returns the ``(K, n, c)`` tensor
``L_iᵀ`` stacked over examples, used as ``grad_outputs``.

* Exact Fisher, ``classif_logits``: ``H = diag(p) − p pᵀ = L Lᵀ`` with ``L = diag(√p) − p √pᵀ``
  (column k is ``√p_k (e_k − p)``, the gradient of ``√p_k · log p_k``): exact expectation in c
  backward passes.
* ``classif_binary_logits`` (one logit, ``p = σ(f)``): ``H = p(1 − p)``.
* ``regression`` (Gaussian with variance σ²): ``H = I / σ²``.
* Monte Carlo (Martens 2014, "New insights and perspectives on the natural gradient method"):
  ``trials`` draws ``y ~ p(y|x)``, each contributing ``∇ log p(y|x) / √trials``.
* Empirical Fisher (Kunstner, Balles & Hennig 2019 on its pitfalls): ``∇ log p(y_true|x)``.
* Jacobian / NTK: the identity, ``K = c``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.generator.inputs import targets_of

VARIANTS = ("classif_logits", "classif_binary_logits", "regression")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise InvalidInputError(f"unknown variant {variant!r}; use one of {list(VARIANTS)}")


def check_sigma(sigma: float) -> float:
    """The regression noise standard deviation, a finite positive number."""
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise InvalidInputError(f"sigma must be a finite positive number, got {sigma}")
    return sigma


def _check_binary(out: Tensor) -> None:
    if out.shape[1] != 1:
        raise InvalidInputError(
            f"variant 'classif_binary_logits' expects one logit per example; the model outputs "
            f"{out.shape[1]}: use 'classif_logits' for several classes"
        )


class PseudoOutputs(ABC):
    """Maps detached outputs ``(n, c)`` (and the batch) to ``grad_outputs`` ``(K, n, c)``."""

    @abstractmethod
    def __call__(self, out: Tensor, batch: tuple) -> Tensor: ...


class Identity(PseudoOutputs):
    """The outputs themselves (Jacobians, NTK)."""

    def __call__(self, out: Tensor, batch: tuple) -> Tensor:
        n, c = out.shape
        return torch.eye(c, dtype=out.dtype, device=out.device)[:, None, :].expand(c, n, c)


class ExactFisher(PseudoOutputs):
    """Factor of the exact output Fisher ``H`` of the variant (see module docstring)."""

    def __init__(self, variant: str, sigma: float = 1.0) -> None:
        check_variant(variant)
        self.variant, self.sigma = variant, check_sigma(sigma)

    def __call__(self, out: Tensor, batch: tuple) -> Tensor:
        c = out.shape[1]
        if self.variant == "classif_logits":
            p = torch.softmax(out, dim=1)
            eye = torch.eye(c, dtype=out.dtype, device=out.device)
            # [k, i, j] = √p_ik (δ_kj − p_ij)
            return p.sqrt().t()[:, :, None] * (eye[:, None, :] - p[None, :, :])
        if self.variant == "classif_binary_logits":
            _check_binary(out)
            p = torch.sigmoid(out)
            return (p * (1 - p)).sqrt()[None]
        return Identity()(out, batch) / self.sigma


class MonteCarloFisher(PseudoOutputs):
    """``trials`` samples ``y ~ p(y|x)``; row t is ``∇_f log p(y_t|x) / √trials``."""

    def __init__(
        self,
        variant: str,
        trials: int = 1,
        sigma: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        check_variant(variant)
        if int(trials) < 1:
            raise InvalidInputError(f"trials must be a positive integer, got {trials}")
        self.variant, self.trials, self.sigma = variant, int(trials), check_sigma(sigma)
        self.generator = generator

    def _noise(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return torch.randn(shape, generator=self.generator, dtype=like.dtype).to(like.device)

    def _uniform(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return torch.rand(shape, generator=self.generator, dtype=like.dtype).to(like.device)

    def __call__(self, out: Tensor, batch: tuple) -> Tensor:
        n, c = out.shape
        t = self.trials
        scale = 1.0 / math.sqrt(t)
        if self.variant == "classif_logits":
            p = torch.softmax(out, dim=1)
            cdf = p.cumsum(dim=1)
            u = self._uniform((t, n, 1), out)
            y = (u > cdf[None]).sum(dim=2).clamp_max(c - 1)
            onehot = torch.nn.functional.one_hot(y, c).to(out.dtype)
            return (onehot - p[None]) * scale
        if self.variant == "classif_binary_logits":
            _check_binary(out)
            p = torch.sigmoid(out)
            y = (self._uniform((t, n, 1), out) < p[None]).to(out.dtype)
            return (y - p[None]) * scale
        return self._noise((t, n, c), out) * (scale / self.sigma)


class EmpiricalFisher(PseudoOutputs):
    """One row per example: ``∇_f log p(y_true|x)``, targets from ``batch[target_index]``."""

    def __init__(self, variant: str, sigma: float = 1.0, target_index: int = 1) -> None:
        check_variant(variant)
        self.variant, self.sigma, self.target_index = variant, check_sigma(sigma), target_index

    def _targets(self, batch: tuple) -> Tensor:
        targets = targets_of(batch, self.target_index)
        if targets is None:
            raise InvalidInputError(
                "the empirical Fisher needs targets: the loader must yield (inputs, targets) "
                "or dictionaries with labels"
            )
        return targets

    def __call__(self, out: Tensor, batch: tuple) -> Tensor:
        n, c = out.shape
        y = self._targets(batch).to(out.device)
        if self.variant == "classif_logits":
            y = y.reshape(-1).long()
            if y.numel() != n or (y < 0).any() or (y >= c).any():
                raise InvalidInputError(
                    f"classification targets must be n={n} class indices in [0, {c})"
                )
            p = torch.softmax(out, dim=1)
            return (torch.nn.functional.one_hot(y, c).to(out.dtype) - p)[None]
        if self.variant == "classif_binary_logits":
            _check_binary(out)
            return (y.reshape(n, 1).to(out.dtype) - torch.sigmoid(out))[None]
        if y.numel() != n * c:
            raise InvalidInputError(
                f"regression targets must have n·c = {n * c} values; got shape {tuple(y.shape)}"
            )
        return ((y.reshape(n, c).to(out.dtype) - out) / self.sigma**2)[None]
