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
* ``classif_logsoftmax`` (the model returns ``f = log p``, already normalised): the gradient of
  ``log p_y`` with respect to ``f`` is ``e_y``, so ``H = diag(p)`` with ``L = diag(√p)`` (the
  centring ``− p pᵀ`` is inside the log-softmax's Jacobian).
* ``segmentation_logits`` (outputs ``(n, c, *positions)``, one categorical per position, all
  independent): ``H`` is block-diagonal over the ``P`` positions with a softmax block each. The
  outputs are flattened position-major to ``(n, P·c)``. Exactly this takes ``K = P·c``
  pseudo-outputs (bounded by ``MAX_EXACT_SEGMENTATION_ENTRIES``); a Monte Carlo draw samples
  every position at once and sums their ``∇ log p`` into one pseudo-output per trial (the
  cross-position terms vanish in expectation because the positions are independent).
* ``regression`` (Gaussian with variance σ²): ``H = I / σ²``.
* Monte Carlo (Martens 2014, "New insights and perspectives on the natural gradient method"):
  ``trials`` draws ``y ~ p(y|x)``, each contributing ``∇ log p(y|x) / √trials``.
* Empirical Fisher (Kunstner, Balles & Hennig 2019 on its pitfalls): ``∇ log p(y_true|x)``.
* Jacobian / NTK: the identity, ``K = c``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.generator.inputs import targets_of

VARIANTS = (
    "classif_logits",
    "classif_binary_logits",
    "classif_logsoftmax",
    "segmentation_logits",
    "regression",
)

#: Largest exact ``segmentation_logits`` pseudo-output tensor, ``(P·c) · n · (P·c)`` entries per
#: batch; beyond it the exact Fisher asks for ``FIM_MonteCarlo``.
MAX_EXACT_SEGMENTATION_ENTRIES = 2**26

#: How far ``Σ exp(f)`` may be from 1 before ``classif_logsoftmax`` refuses the outputs.
LOGSOFTMAX_TOLERANCE = 1e-3


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


def _check_logsoftmax(out: Tensor) -> Tensor:
    """``p = exp(f)`` of log-probabilities ``f`` ``(n, c)``, checked to sum to one."""
    p = out.exp()
    if (p.sum(dim=1) - 1).abs().max() > LOGSOFTMAX_TOLERANCE:
        raise InvalidInputError(
            "variant 'classif_logsoftmax' expects log-probabilities (log_softmax outputs, whose "
            "exponentials sum to 1 per example): use 'classif_logits' for raw logits"
        )
    return p


def _softmax_factor(p: Tensor) -> Tensor:
    """``L`` with ``L Lᵀ = diag(p) − p pᵀ`` for probabilities ``p`` ``(..., c)``: ``[k, ..., j] =
    √p_k (δ_kj − p_j)``, shape ``(c, ..., c)``."""
    c = p.shape[-1]
    eye = torch.eye(c, dtype=p.dtype, device=p.device)
    factor = p.sqrt()[..., :, None] * (eye - p[..., None, :])  # (..., k, j)
    return factor.movedim(-2, 0)


def _sampled_onehot(p: Tensor, uniform: Tensor) -> Tensor:
    """One class per trial and distribution of ``p`` ``(..., c)``, drawn by inverting the CDF at
    ``uniform`` ``(trials, ..., 1)``, one-hot: ``(trials, ..., c)``."""
    c = p.shape[-1]
    y = (uniform > p.cumsum(dim=-1)[None]).sum(dim=-1).clamp_max(c - 1)
    return torch.nn.functional.one_hot(y, c).to(p.dtype)


class PseudoOutputs(ABC):
    """Maps detached outputs ``(n, c)`` (and the batch) to ``grad_outputs`` ``(K, n, c)``."""

    #: Whether a call draws random numbers (then a batch's draws depend on its whole shape).
    random: bool = False

    @abstractmethod
    def __call__(self, out: Tensor, batch: tuple) -> Tensor: ...

    def outputs_of(self, function: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """The function whose ``(n, c)`` outputs this object weighs (``function`` itself except
        for ``segmentation_logits``, which flattens the positions)."""
        return function


class _PerPosition:
    """The outputs ``(n, c, *positions)`` of a segmentation model, flattened position-major to
    ``(n, P·c)``; remembers ``c`` so that the pseudo-outputs can reshape to ``(n, P, c)``."""

    def __init__(self) -> None:
        self.classes: int | None = None

    def wrap(self, function: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def flattened(*batch: Any) -> Tensor:
            out = function(*batch)
            if not isinstance(out, Tensor) or out.dim() < 3:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise InvalidInputError(
                    "variant 'segmentation_logits' expects outputs (n, c, *positions), e.g. "
                    f"(n, c, h, w) logits; got {shape}"
                )
            self.classes = out.shape[1]
            return out.movedim(1, -1).reshape(out.shape[0], -1)

        return flattened

    def split(self, out: Tensor) -> Tensor:
        """``(n, P·c)`` → ``(n, P, c)``."""
        if self.classes is None or out.shape[1] % self.classes:
            raise InvalidInputError(
                "variant 'segmentation_logits' needs the outputs of its own function"
            )
        return out.reshape(out.shape[0], -1, self.classes)


class VariantOutputs(PseudoOutputs):
    """A pseudo-output of one of the :data:`VARIANTS`; a ``segmentation_logits`` one flattens its
    function's positions (:class:`_PerPosition`)."""

    def __init__(self, variant: str) -> None:
        check_variant(variant)
        self.variant = variant
        self._positions = _PerPosition()

    def outputs_of(self, function: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if self.variant == "segmentation_logits":
            return self._positions.wrap(function)
        return function


class Identity(PseudoOutputs):
    """The outputs themselves (Jacobians, NTK)."""

    def __call__(self, out: Tensor, batch: tuple) -> Tensor:
        n, c = out.shape
        return torch.eye(c, dtype=out.dtype, device=out.device)[:, None, :].expand(c, n, c)


class ExactFisher(VariantOutputs):
    """Factor of the exact output Fisher ``H`` of the variant (see module docstring)."""

    def __init__(self, variant: str, sigma: float = 1.0) -> None:
        super().__init__(variant)
        self.sigma = check_sigma(sigma)

    def __call__(self, out: Tensor, batch: tuple) -> Tensor:
        n = out.shape[0]
        if self.variant == "classif_logits":
            return _softmax_factor(torch.softmax(out, dim=1))  # [k, i, j] = √p_ik (δ_kj − p_ij)
        if self.variant == "classif_logsoftmax":
            p = _check_logsoftmax(out)
            return torch.diag_embed(p.sqrt()).permute(1, 0, 2)  # [k, i, j] = √p_ik δ_kj
        if self.variant == "segmentation_logits":
            p = torch.softmax(self._positions.split(out), dim=-1)  # (n, P, c)
            positions, classes = p.shape[1], p.shape[2]
            if (positions * classes) ** 2 * n > MAX_EXACT_SEGMENTATION_ENTRIES:
                raise InvalidInputError(
                    f"the exact segmentation Fisher needs P·c = {positions * classes} "
                    "pseudo-outputs per example, too many for this output size: use "
                    "FIM_MonteCarlo(..., variant='segmentation_logits', trials=...)"
                )
            blocks = _softmax_factor(p)  # (c_k, n, P, c_j)
            eye = torch.eye(positions, dtype=out.dtype, device=out.device)
            # [(q, k), i, (p, j)] = δ_qp √p_ipk (δ_kj − p_ipj)
            w = eye[:, None, None, :, None] * blocks.permute(2, 0, 1, 3)[:, :, :, None, :]
            return w.reshape(positions * classes, n, -1)
        if self.variant == "classif_binary_logits":
            _check_binary(out)
            p = torch.sigmoid(out)
            return (p * (1 - p)).sqrt()[None]
        return Identity()(out, batch) / self.sigma


class MonteCarloFisher(VariantOutputs):
    """``trials`` samples ``y ~ p(y|x)``; row t is ``∇_f log p(y_t|x) / √trials``."""

    random = True

    def __init__(
        self,
        variant: str,
        trials: int = 1,
        sigma: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(variant)
        if int(trials) < 1:
            raise InvalidInputError(f"trials must be a positive integer, got {trials}")
        self.trials, self.sigma = int(trials), check_sigma(sigma)
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
            return (_sampled_onehot(p, self._uniform((t, n, 1), out)) - p[None]) * scale
        if self.variant == "classif_logsoftmax":
            p = _check_logsoftmax(out)
            return _sampled_onehot(p, self._uniform((t, n, 1), out)) * scale
        if self.variant == "segmentation_logits":
            p = torch.softmax(self._positions.split(out), dim=-1)  # (n, P, c)
            u = self._uniform((t, *p.shape[:2], 1), out)
            return ((_sampled_onehot(p, u) - p[None]) * scale).reshape(t, n, c)
        if self.variant == "classif_binary_logits":
            _check_binary(out)
            p = torch.sigmoid(out)
            y = (self._uniform((t, n, 1), out) < p[None]).to(out.dtype)
            return (y - p[None]) * scale
        return self._noise((t, n, c), out) * (scale / self.sigma)


def _onehot_targets(y: Tensor, n: int, c: int, dtype: torch.dtype) -> Tensor:
    """Class indices ``y`` (n values in ``[0, c)``) one-hot, ``(n, c)``."""
    y = y.reshape(-1).long()
    if y.numel() != n or (y < 0).any() or (y >= c).any():
        raise InvalidInputError(f"classification targets must be n={n} class indices in [0, {c})")
    return torch.nn.functional.one_hot(y, c).to(dtype)


class EmpiricalFisher(VariantOutputs):
    """One row per example: ``∇_f log p(y_true|x)``, targets from ``batch[target_index]``."""

    def __init__(self, variant: str, sigma: float = 1.0, target_index: int = 1) -> None:
        super().__init__(variant)
        self.sigma, self.target_index = check_sigma(sigma), target_index

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
        if self.variant in ("classif_logits", "classif_logsoftmax"):
            onehot = _onehot_targets(y, n, c, out.dtype)
            if self.variant == "classif_logsoftmax":
                _check_logsoftmax(out)
                return onehot[None]
            return (onehot - torch.softmax(out, dim=1))[None]
        if self.variant == "segmentation_logits":
            p = torch.softmax(self._positions.split(out), dim=-1)  # (n, P, c)
            positions, classes = p.shape[1], p.shape[2]
            if y.numel() != n * positions:
                raise InvalidInputError(
                    f"segmentation targets must hold one class index per position (n·P = "
                    f"{n * positions} values, e.g. (n, h, w)); got shape {tuple(y.shape)}"
                )
            onehot = _onehot_targets(y.reshape(-1), n * positions, classes, out.dtype)
            return (onehot.reshape(p.shape) - p).reshape(1, n, c)
        if self.variant == "classif_binary_logits":
            _check_binary(out)
            return (y.reshape(n, 1).to(out.dtype) - torch.sigmoid(out))[None]
        if y.numel() != n * c:
            raise InvalidInputError(
                f"regression targets must have n·c = {n * c} values; got shape {tuple(y.shape)}"
            )
        return ((y.reshape(n, c).to(out.dtype) - out) / self.sigma**2)[None]
