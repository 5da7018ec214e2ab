"""A representation per layer, chosen by a policy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.layers.norm import AffineNormKernel
from fimntk.engine.pspace.blocks import Block
from fimntk.engine.pspace.layerwise import BLOCK_KINDS, PMatLayerwise, kron_capable

if TYPE_CHECKING:
    from fimntk.engine.generator.jacobian import Jacobian


class PMatMixed(PMatLayerwise):
    """A representation per layer.

    ``policy`` maps a layer name, a module type name (``"Linear"``), a path (``"hooks"``,
    ``"torch.func"``) or ``"default"`` to one of ``kfac``, ``ekfac``, ``quasidiag``, ``dense``,
    ``diag`` — the first match wins in that order. Defaults: KFAC where the layer allows it,
    dense blocks for normalisation layers, the diagonal for the ``torch.func`` path and for any
    other layer above ``DENSE_BLOCK_LIMIT`` parameters. A requested kind a layer cannot take
    falls back to the default for that layer instead of raising.
    """

    name = "mixed"

    def _set_options(  # type: ignore[override]  # adds `policy`; kfac_approx goes on in options
        self, policy: dict[str, str] | None = None, **options: Any
    ) -> None:
        policy = dict(policy or {})
        bad = {k: v for k, v in policy.items() if v not in BLOCK_KINDS}
        if bad:
            raise InvalidInputError(f"unknown block kind(s) {bad}; use {list(BLOCK_KINDS)}")
        self.policy = policy
        super()._set_options(**options)

    def _new(self, data: dict[str, Block]) -> PMatMixed:
        out = PMatMixed(
            self.layer_collection, data=data, kfac_approx=self.kfac_approx, policy=self.policy
        )
        out.paths = self.paths
        return out

    def _default(self, generator: Jacobian, name: str) -> str:
        k = generator.kernel(name)
        if k is None:
            return "diag"
        if kron_capable(generator, name):
            return "kfac"
        if isinstance(k, AffineNormKernel):
            return "dense"
        return self._fallback_kind(name)

    def _allowed(self, generator: Jacobian, name: str, kind: str) -> bool:
        k = generator.kernel(name)
        if kind in ("kfac", "ekfac"):
            return kron_capable(generator, name)
        if kind == "quasidiag":
            return k is not None and k.mat_layout() is not None and k.mat_layout().bias
        return True

    def _policy(self, generator: Jacobian) -> dict[str, str]:
        paths = generator.paths
        out = {}
        for e in self.layer_collection:
            kind = None
            for key in (e.name, e.module_type, paths[e.name], "default"):
                if key in self.policy:
                    kind = self.policy[key]
                    break
            if kind is None or not self._allowed(generator, e.name, kind):
                kind = self._default(generator, e.name)
            out[e.name] = kind
        return out
