"""moka_kernels: functional MoKA ops (no nn.Module, no bitsandbytes needed).

Public functions:

* :func:`moka_linear` — y = x W0ᵀ + b + s Σ softmax(g)_i (A_i ⊗ B_i) x, never forming ΔW.
* :func:`quantize_nf4` / :func:`dequantize_nf4` / :class:`NF4Tensor` — bitsandbytes' exact NF4 layout.
* :func:`nf4_linear` — the frozen NF4 base alone (x · dequant(W)ᵀ + b), saving no decoded weight for backward.
* :func:`delta_weight` — the materialized ΔW (for merging and tests).
"""

from .dispatch import (
    delta_weight,
    factor_dtypes_for,
    factors_taken_as_they_are,
    moka_linear,
    select_backend,
    validate_moka_inputs,
)
from .nf4 import NF4_CODE, NF4Tensor, dequantize_nf4, quantize_nf4
from .nf4_linear import nf4_linear
from .reference import contraction_order, gate_weights

__version__ = "0.1.0"

__all__ = [
    "NF4_CODE",
    "NF4Tensor",
    "contraction_order",
    "delta_weight",
    "dequantize_nf4",
    "factor_dtypes_for",
    "factors_taken_as_they_are",
    "gate_weights",
    "moka_linear",
    "nf4_linear",
    "quantize_nf4",
    "select_backend",
    "validate_moka_inputs",
]
