"""Gated modules and ``decouple``: the decoupling method's layers.

See :mod:`pydecouple.nn.modules` for how masks are passed between layers.
"""

from .decouple import DecoupleSummary, decouple, is_decoupled, set_gates_open
from .gate import ArchitectureControl, gate_modules, semhash
from .modules import (
    BasicBlock,
    Bottleneck,
    ConvBNReLU,
    GatedBasicBlock,
    GatedBatchNorm2d,
    GatedBottleneck,
    GatedConv2d,
    GatedConvBNReLU,
    MaskChain,
    attach_chain,
)

__all__ = [
    "ArchitectureControl", "gate_modules", "semhash",
    "GatedConv2d", "GatedBatchNorm2d", "ConvBNReLU", "GatedConvBNReLU",
    "BasicBlock", "Bottleneck", "GatedBasicBlock", "GatedBottleneck", "MaskChain", "attach_chain",
    "decouple", "DecoupleSummary", "is_decoupled", "set_gates_open",
]
