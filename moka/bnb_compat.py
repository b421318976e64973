"""Adapters between bitsandbytes objects and moka_kernels' plain NF4Tensor (bitsandbytes is optional)."""

from __future__ import annotations

import torch
from torch import nn

from moka_kernels import NF4Tensor

__all__ = [
    "forget_4bit_loading",
    "is_linear4bit",
    "keep_dense_when_reloaded",
    "linear4bit_from_nf4",
    "nf4_from_linear4bit",
]


def is_linear4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (checked without importing bitsandbytes)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and hasattr(weight, "quant_state") and hasattr(weight, "quant_type")


def nf4_from_linear4bit(module: nn.Module) -> NF4Tensor:
    """A zero-copy NF4Tensor view of a quantized ``Linear4bit``'s weight (see NF4Tensor.from_bnb)."""
    weight = module.weight
    if getattr(weight, "quant_state", None) is None:
        raise ValueError(
            "base_layer: the Linear4bit weight is not quantized yet (bitsandbytes quantizes on .to(device) "
            "or on the first .cuda()); quantize it before wrapping"
        )
    if weight.quant_type != "nf4":
        raise ValueError(f"base_layer: expected an NF4 Linear4bit (quant_type='nf4'), got {weight.quant_type!r}")
    return NF4Tensor.from_bnb(weight, weight.quant_state)


def linear4bit_from_nf4(
    q: NF4Tensor,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype | None,
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding exactly the bytes of ``q`` (requires bitsandbytes), stored as
    ``quant_storage`` (FSDP-QLoRA setups store the bytes as bf16 so that FSDP flattens them with the rest)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    n_out, k_in = q.shape
    code = bnb.functional.get_4bit_type("nf4", device=q.device)
    state2 = None
    if q.double_quant:
        state2 = QuantState(absmax=q.nested_absmax, code=q.nested_code, blocksize=256, dtype=torch.float32)
    state = QuantState(
        absmax=q.absmax,
        shape=torch.Size(q.shape),
        code=code,
        blocksize=q.blocksize,
        quant_type="nf4",
        dtype=q.dtype,
        offset=q.offset,
        state2=state2,
    )
    layer = bnb.nn.Linear4bit(
        k_in,
        n_out,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=q.double_quant,
        quant_type="nf4",
        quant_storage=quant_storage,
        device="meta",
    )
    packed = q.packed.reshape(-1).view(quant_storage).reshape(-1, 1) if quant_storage != torch.uint8 else q.packed
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=q.blocksize,
        compress_statistics=q.double_quant,
        quant_type="nf4",
        bnb_quantized=True,
        quant_storage=quant_storage,
        module=layer,
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    # In eval on an AVX512-BF16 CPU its own forward would repack the bytes in place, out of the NF4 layout
    # (a later apply_moka or merge could no longer read them), as MoKALinear prevents for the layers it wraps.
    layer.support_avx512bf16_for_cpu = False
    return layer


def forget_4bit_loading(model: nn.Module) -> None:
    """Drop transformers' record that ``model`` was loaded in 4-bit (its quantizer, ``config.quantization_config``,
    ``is_loaded_in_4bit`` and the 4-bit deserializer among its load-time conversions), for a model whose 4-bit
    layers are all gone: ``save_pretrained`` then writes a plain model, which ``from_pretrained`` reloads as one
    (with the config kept, it would rebuild ``Linear4bit`` layers around the dense weights)."""
    if not _loaded_in_4bit(model):  # another quantizer's config (8-bit, fp8, ...) still describes its layers
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model, "is_loaded_in_4bit", False):  # read by the Trainer and num_parameters
        model.is_loaded_in_4bit = False
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        # transformers 5.17 keeps the 4-bit checkpoint's deserializer among the load-time conversions, which
        # save_pretrained then tries to reverse (NotImplementedError); the layers are dense now.
        model._weight_conversions = [c for c in conversions if not _deserializes_4bit(c)]


def _loaded_in_4bit(model: nn.Module) -> bool:
    """Whether transformers loaded ``model`` with bitsandbytes 4-bit (not 8-bit or another quantizer)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    in_config = config.get("load_in_4bit") if isinstance(config, dict) else getattr(config, "load_in_4bit", False)
    return bool(getattr(model, "is_loaded_in_4bit", False) or in_config)


def _deserializes_4bit(conversion) -> bool:
    return any(type(op).__name__.startswith("Bnb4bit") for op in getattr(conversion, "operations", ()))


def keep_dense_when_reloaded(model: nn.Module, names: list[str]) -> None:
    """Add ``names`` (layers of a 4-bit-loaded model that are dense now) to its quantization config's skipped
    modules, so ``from_pretrained`` of the saved model builds them as ``nn.Linear`` again, not as ``Linear4bit``
    around dense weights. The skips transformers chose by default (the output layer) are kept: an explicit
    list replaces them."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None or not names or not hasattr(config, "llm_int8_skip_modules"):
        return
    chosen = config.llm_int8_skip_modules
    if chosen is None:
        chosen = getattr(getattr(model, "hf_quantizer", None), "modules_to_not_convert", None) or []
    config.llm_int8_skip_modules = [*chosen, *(n for n in names if n not in chosen)]
