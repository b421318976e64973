"""moka: Mixture of Kronecker Adapters (MoKA) for frozen dense or NF4 linear layers.

User-facing API: :class:`MoKAConfig`, :class:`MoKALinear`, :class:`NF4Linear`; :func:`quantize_model` (an NF4
base without bitsandbytes); model patching with :func:`apply_moka`, :func:`remove_moka`, :func:`merge_moka`,
:func:`save_adapter`, :func:`load_adapter`, :func:`disable_adapters` (the base alone, in a ``with`` block);
the fine-tune CLI in :mod:`moka.finetune`. The functional ops live in :mod:`moka_kernels`.
"""

from moka_kernels import NF4Tensor, dequantize_nf4, moka_linear, quantize_nf4

from .config import LLAMA_TARGET_MODULES, MoKAConfig, auto_component_shapes
from .layer import MoKALinear, NF4Linear
from .model import (
    MoKASummary,
    adapter_state_dict,
    apply_moka,
    disable_adapters,
    load_adapter,
    merge_moka,
    moka_layers,
    quantize_model,
    remove_moka,
    save_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "LLAMA_TARGET_MODULES",
    "MoKAConfig",
    "MoKALinear",
    "MoKASummary",
    "NF4Linear",
    "NF4Tensor",
    "adapter_state_dict",
    "apply_moka",
    "auto_component_shapes",
    "dequantize_nf4",
    "disable_adapters",
    "load_adapter",
    "merge_moka",
    "moka_layers",
    "moka_linear",
    "quantize_model",
    "quantize_nf4",
    "remove_moka",
    "save_adapter",
]
