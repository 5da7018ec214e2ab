"""Per-layer blocks of the layerwise representations (KFAC, EKFAC, QuasiDiag, Mixed): one
module per structure, each a :class:`~fimntk.engine.pspace.blocks.base.Block`.
"""

from fimntk.engine.pspace.blocks.base import Block
from fimntk.engine.pspace.blocks.dense import DenseBlock
from fimntk.engine.pspace.blocks.diag import DiagBlock
from fimntk.engine.pspace.blocks.ekron import EKronBlock
from fimntk.engine.pspace.blocks.kron import KronBlock
from fimntk.engine.pspace.blocks.quasidiag import QuasiDiagBlock

BLOCKS: dict[str, type[Block]] = {
    cls.kind: cls for cls in (DenseBlock, DiagBlock, KronBlock, EKronBlock, QuasiDiagBlock)
}


__all__ = [
    "BLOCKS",
    "Block",
    "DenseBlock",
    "DiagBlock",
    "EKronBlock",
    "KronBlock",
    "QuasiDiagBlock",
]
