"""moka: Mixture of Kronecker Adapters (MoKA) for frozen dense or NF4 linear layers.

User-facing API: :class:`MoKAConfig`, :class:`MoKALinear`, :class:`NF4Linear`. The functional ops
live in :mod:`moka_kernels`.
"""

from moka_kernels import NF4Tensor, dequantize_nf4, moka_linear, quantize_nf4

from .config import LLAMA_TARGET_MODULES, MoKAConfig, auto_component_shapes
from .layer import MoKALinear, NF4Linear

__version__ = "0.1.0"

__all__ = [
    "LLAMA_TARGET_MODULES",
    "MoKAConfig",
    "MoKALinear",
    "NF4Linear",
    "NF4Tensor",
    "auto_component_shapes",
    "dequantize_nf4",
    "moka_linear",
    "quantize_nf4",
]
