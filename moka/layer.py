"""MoKALinear: a drop-in nn.Module with a frozen base and a gated mixture of Kronecker adapters."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from moka_kernels import NF4Tensor, dequantize_nf4, factors_taken_as_they_are, moka_linear, nf4_linear, quantize_nf4
from moka_kernels import delta_weight as materialized_delta_weight

from .bnb_compat import is_linear4bit, linear4bit_from_nf4, nf4_from_linear4bit
from .config import FLOAT_DTYPES, MoKAConfig, require_bool

__all__ = ["MoKALinear", "NF4Linear"]

logger = logging.getLogger("moka")

_NF4_FIELDS = ("packed", "absmax", "nested_absmax", "nested_code", "offset")


@torch.no_grad()
def frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen ``nn.Linear`` holding ``weight`` (out, in) and ``bias`` (cast to the weight's dtype), on the
    weight's device. Built with ``skip_init``: ``nn.Linear()``'s random init would draw from the caller's
    generator only to be overwritten."""
    layer = skip_init(
        nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer.requires_grad_(False)


class NF4Linear(nn.Module):
    """A frozen linear layer over an :class:`NF4Tensor`: y = x · dequant(W)ᵀ + b.

    Args:
        weight: the NF4 weight; its ``dtype`` is the layer's ``nf4_dtype`` (what it decodes to, and a merge's
            dtype; adapters on it default to fp32, fp64 on an fp64 base).
        bias: optional, shape (out_features,).
        compute_dtype: the dtype the layer computes in (x is cast to it and the output back to x's dtype, as
            bitsandbytes' ``Linear4bit`` does); None: x's own dtype.
        shardable: hold the integer fields (the packed bytes; the absmax bytes with double quantization) as
            frozen ``nn.Parameter``s, which FSDP2's ``fully_shard`` shards across ranks and all-gathers bit
            for bit (FSDP casts only floating parameters). Default False: buffers, which FSDP replicates;
            FSDP1 needs that, since it flattens a unit's parameters into one dtype.

    The floating fields (fp32 scales, the nested code, the offset, the bias) are always buffers. ``.to(device)``
    and ``state_dict`` carry every field. Casts (``.to(dtype)``, ``.half()``, a whole model's
    ``.to(torch.bfloat16)``) reach the bias and ``nf4_dtype``, never the NF4 fields: their fp32 scales define
    W bit for bit, so they only move.
    """

    def __init__(
        self,
        weight: NF4Tensor,
        bias: torch.Tensor | None = None,
        *,
        compute_dtype: torch.dtype | None = None,
        shardable: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(weight, NF4Tensor):
            raise TypeError(f"weight: expected an NF4Tensor, got {type(weight).__name__}")
        if compute_dtype not in (None, torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"compute_dtype: expected None or a floating dtype, got {compute_dtype}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        self.out_features, self.in_features = weight.shape
        self.nf4_dtype = weight.dtype
        self.blocksize = weight.blocksize
        self.compute_dtype = compute_dtype
        require_bool(shardable, "shardable")  # "False" would otherwise mean True
        self.shardable = shardable
        for name in _NF4_FIELDS:
            t = getattr(weight, name)
            if self.shardable and t is not None and not t.is_floating_point():
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A copy_ would silently convert another layout's fields (uint8 scale codes read as fp32 scales): W0
        # would change with no error, even in a non-strict load. Refused whatever ``strict`` says.
        layout = "double-quantized" if self.nested_absmax is not None else "fp32 absmax"
        for name in _NF4_FIELDS:
            key, mine = prefix + name, getattr(self, name)
            if key in state_dict and (mine is None or state_dict[key].dtype != mine.dtype):
                got = state_dict[key].dtype
                error_msgs.append(
                    f"{key}: the state dict holds another NF4 layout than this layer ({layout}): "
                    f"{got} where this layer has {'no such field' if mine is None else mine.dtype}; "
                    "quantize the model the same way (double_quant) before loading"
                )
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn, recurse=True):
        # Module.to/half/cuda/... all land here with fn applied to every tensor. The probe learns what fn
        # does to a floating tensor here (device and dtype); the NF4 fields take only its device. They are
        # taken out while Module._apply casts the rest, then put back in their places (state_dict order).
        probe = fn(torch.empty(0, dtype=self.nf4_dtype, device=self.packed.device))
        held: dict[str, torch.Tensor | None] = {}
        orders = {id(self._parameters): list(self._parameters), id(self._buffers): list(self._buffers)}
        for name in _NF4_FIELDS:
            store = self._parameters if name in self._parameters else self._buffers
            t = store.pop(name)
            if t is None:
                held[name] = None
                continue
            moved = fn(t)  # integer bytes: fn only moves them (or, to_empty, makes new ones)
            if moved.dtype != t.dtype:  # a cast: a floating field takes only the move (from t, unrounded)
                moved = t.to(probe.device)
            if isinstance(t, nn.Parameter) and moved is not t:  # the Parameter object as Module._apply keeps it
                if torch.__future__.get_swap_module_params_on_conversion():
                    torch.utils.swap_tensors(t, nn.Parameter(moved, requires_grad=False))
                    moved = t
                elif torch._has_compatible_shallow_copy_type(t, moved) and not (
                    torch.__future__.get_overwrite_module_params_on_conversion()
                ):
                    t.data = moved
                    moved = t
                else:  # e.g. to or from meta: a new Parameter, as Module._apply makes one
                    moved = nn.Parameter(moved, requires_grad=False)
            held[name] = moved
        try:
            super()._apply(fn, recurse)
        finally:  # never lose a field
            for store in (self._parameters, self._buffers):
                _put_back(store, orders[id(store)], held)
        self.nf4_dtype = probe.dtype
        return self

    @property
    def nf4_weight(self) -> NF4Tensor:
        """The frozen weight as an NF4Tensor viewing this layer's buffers (no copy)."""
        return NF4Tensor(
            packed=self.packed,
            absmax=self.absmax,
            shape=(self.out_features, self.in_features),
            dtype=self.nf4_dtype,
            blocksize=self.blocksize,
            nested_absmax=self.nested_absmax,
            nested_code=self.nested_code,
            offset=self.offset,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x·W0ᵀ + b with W0 decoded from NF4, computed in ``compute_dtype`` (if set); output in x's dtype."""
        input_dtype = x.dtype
        x = x.to(self.compute_dtype or input_dtype)
        return nf4_linear(x, self.nf4_weight, self.bias).to(input_dtype)

    def extra_repr(self) -> str:
        extra = "".join(
            [
                f", compute_dtype={self.compute_dtype}" if self.compute_dtype else "",
                ", shardable" if self.shardable else "",
            ]
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocksize={self.blocksize}{extra}"
        )


def _factors_as_taken(
    a_factors: nn.ParameterList, b_factors: nn.ParameterList, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The factors as ``moka_linear`` takes them with activations of ``dtype``: as they are when it accepts
    them (all one dtype, fp32 factors of a bf16/fp16 layer included: no per-forward cast), else all cast."""
    # ParameterList's own iteration goes through __getitem__ index parsing: ~1.5 µs a factor, every call
    a_params, b_params = list(a_factors._parameters.values()), list(b_factors._parameters.values())
    if factors_taken_as_they_are([*a_params, *b_params], dtype):
        return a_params, b_params
    return [p.to(dtype) for p in a_params], [p.to(dtype) for p in b_params]


def _put_back(store: dict, order: list[str], held: dict) -> None:
    """Re-insert the entries ``held`` took out of a module's ``_parameters``/``_buffers`` in their places
    (``order``, the state_dict order), beside what ``_apply`` left there."""
    rest = dict(store)
    store.clear()
    for name in order:
        store[name] = held[name] if name in held else rest.pop(name)
    store.update(rest)


def refuse_a_forward_that_would_be_skipped(layer: nn.Module, at: str = "", param: str = "base_layer") -> None:
    """MoKA computes a base layer from its weight (x·Wᵀ + b) and never calls its forward, so whatever that
    forward adds would silently stop: a subclass's own forward (scales, casts) and hooks registered on it.
    (bitsandbytes' Linear4bit and moka's NF4Linear are the 4-bit forms MoKA decodes itself.)"""
    own_forward = type(layer).forward
    # bitsandbytes' 4-bit layer by class, not by its quant_state (which FSDP may have dropped: refused later,
    # with that hint)
    four_bit = any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(layer).__mro__)
    if isinstance(layer, nn.Linear) and not four_bit and own_forward is not nn.Linear.forward:
        raise TypeError(
            f"{param}: {type(layer).__module__}.{type(layer).__qualname__} overrides nn.Linear.forward, which "
            f"would never run (MoKA computes x·Wᵀ + b from the weight){at}; expected an nn.Linear, a bitsandbytes "
            "Linear4bit or an NF4Linear"
        )
    kinds = [
        kind
        for kind, hooks in (
            ("forward hooks", layer._forward_hooks),
            ("forward pre-hooks", layer._forward_pre_hooks),
            ("backward hooks", layer._backward_hooks),
            ("backward pre-hooks", layer._backward_pre_hooks),
        )
        if hooks
    ]
    if kinds:
        raise ValueError(
            f"{param}: has {' and '.join(kinds)}, which would never fire (the layer's own forward is not "
            f"called){at}; remove them and register them on the layer that replaces it"
        )


class MoKALinear(nn.Module):
    r"""A linear layer whose frozen base is adapted by a gated mixture of Kronecker products.

    .. math::

        y = x W_0^T + b + s \sum_{i=1}^{r} \mathrm{softmax}(g)_i\,(A_i \otimes B_i)\,\mathrm{dropout}(x)

    Args:
        base_layer: the frozen base: an ``nn.Linear``, a bitsandbytes ``Linear4bit`` (NF4), an
            :class:`NF4Tensor`, or an :class:`NF4Linear`. Its parameters are frozen.
        config: a :class:`MoKAConfig`; defaults to ``MoKAConfig()``.
        bias: the bias when ``base_layer`` is an NF4Tensor.
        name: the layer's name, used in error messages.

    Only ``a_factors``, ``b_factors`` and ``gate_logits`` are trainable (with ``moka_s``, A_i is a
    frozen identity). At init one factor of each component is zero, so the output equals the base's.
    With ``adapters_enabled = False`` (see :func:`moka.disable_adapters`) the layer computes its base alone.
    """

    adapters_enabled: bool = True  # a plain attribute: not part of the state dict or the adapter file

    def __init__(
        self,
        base_layer: nn.Module | NF4Tensor,
        config: MoKAConfig | None = None,
        *,
        bias: torch.Tensor | None = None,
        name: str = "layer",
    ) -> None:
        super().__init__()
        config = config if config is not None else MoKAConfig()
        if not isinstance(config, MoKAConfig):
            raise TypeError(f"config: expected a MoKAConfig, got {type(config).__name__}")
        # A validated copy: fields set on the caller's object after it was built are checked here, and a
        # later change to it (reused for another model) cannot change this layer's recorded settings.
        config = dataclasses.replace(copy.deepcopy(config))
        at = "" if name == "layer" else f" (at {name})"  # where a base error happened, inside apply_moka
        if getattr(getattr(base_layer, "_hf_hook", None), "offload", False):
            # accelerate's offload hook loads the weights in the layer's own forward, which MoKA never calls
            raise ValueError(
                f"base_layer: its weights are offloaded by accelerate (a device_map with cpu/disk offload, or "
                f"cpu_offload){at}; MoKA needs them resident: load without offload, e.g. in 4-bit to fit"
            )
        if isinstance(base_layer, NF4Tensor):
            base_layer = NF4Linear(base_layer, bias)
        elif bias is not None:
            raise ValueError("bias: only accepted with an NF4Tensor base; nn.Linear bases carry their own")
        elif isinstance(base_layer, nn.Module):
            refuse_a_forward_that_would_be_skipped(base_layer, at)
        if isinstance(base_layer, NF4Linear):
            base_dtype = base_layer.nf4_dtype
        elif is_linear4bit(base_layer):
            try:  # validates: quantized, NF4, not repacked for CPU
                nf4_from_linear4bit(base_layer)
            except ValueError as err:
                raise ValueError(f"{err}{at}") from None
            # Our forward never calls Linear4bit.forward; this keeps a later plain forward (after
            # remove_moka) from repacking the bytes in place on AVX512-BF16 CPUs.
            base_layer.support_avx512bf16_for_cpu = False
            base_dtype = base_layer.compute_dtype or base_layer.weight.quant_state.dtype
            self._wraps_linear4bit = True
        elif isinstance(base_layer, nn.Linear):
            if base_layer.weight.dtype not in FLOAT_DTYPES:  # e.g. Linear8bitLt after quantizing, float8 weights
                hint = (
                    " (a Linear4bit whose quant_state FSDP dropped? call moka.quantize_model(model, shardable=True) "
                    "before sharding)"
                    if base_layer.weight.dtype == torch.uint8
                    else ""
                )
                raise TypeError(
                    "base_layer: expected a float16/bfloat16/float32/float64 weight or an NF4 Linear4bit, got a "
                    f"{base_layer.weight.dtype} weight in {type(base_layer).__name__}{at}{hint}"
                )
            base_dtype = base_layer.weight.dtype
        else:
            raise TypeError(
                "base_layer: expected nn.Linear, bitsandbytes Linear4bit, NF4Tensor or NF4Linear, got "
                f"{type(base_layer).__name__}"
            )
        self.out_features, self.in_features = int(base_layer.out_features), int(base_layer.in_features)
        shapes = config.component_shapes(self.out_features, self.in_features, name)

        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.config = config
        self.component_shapes = shapes
        self.scale = float(config.scale)
        self.variant = config.variant
        dtype = config.resolved_adapter_dtype(base_dtype)
        device = self._base_device()
        self.a_factors = nn.ParameterList(
            [nn.Parameter(torch.empty(a1, a2, dtype=dtype, device=device)) for a1, a2, _, _ in shapes]
        )
        self.b_factors = nn.ParameterList(
            [nn.Parameter(torch.empty(b1, b2, dtype=dtype, device=device)) for _, _, b1, b2 in shapes]
        )
        self.gate_logits = nn.Parameter(torch.zeros(len(shapes), dtype=dtype, device=device)) if config.gate else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.reset_adapter()
        self.train(base_layer.training)  # the mode of the layer it replaces (a model in eval: no dropout)

    def _apply(self, fn, recurse=True):
        # A Linear4bit's packed bytes: stored in a float dtype (quant_storage=torch.bfloat16, as for FSDP-QLoRA),
        # Module.half()/to(dtype) would convert them as numbers (bitsandbytes' own layer does), and
        # Module.type() converts even uint8 ones, corrupting W0. That weight gets fn as Module._apply gives it
        # (moves, to_empty, share_memory), except a cast, of which it takes only the device.
        weight = self.base_layer.weight if recurse and getattr(self, "_wraps_linear4bit", False) else None
        if weight is None:
            return super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        params = self.base_layer._parameters
        order = list(params)
        del params["weight"]
        kept = weight
        try:
            super()._apply(fn, recurse)
            applied = fn(weight)
            if applied.dtype != weight.dtype:  # a cast: the bytes only move (Params4bit.to moves quant_state)
                applied = weight if probe.device == weight.device else weight.to(probe.device)
            if applied is not weight:
                if torch._has_compatible_shallow_copy_type(weight, applied) and not (
                    torch.__future__.get_overwrite_module_params_on_conversion()
                    or torch.__future__.get_swap_module_params_on_conversion()
                ):
                    weight.data = applied  # the Parameter object kept, as Module._apply keeps it
                else:
                    kept = applied
        finally:
            _put_back(params, order, {"weight": kept})
        return self

    # -- set-up --------------------------------------------------------------------------------
    def _base_device(self) -> torch.device:
        for t in self.base_layer.buffers():
            return t.device
        return next(self.base_layer.parameters()).device

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """Re-initialize: ΔW = 0 (one factor zero per component, the other Kaiming-uniform), g = 0."""
        zero_a = self.config.init == "zero_a" and self.variant == "moka"
        for a, b in zip(self.a_factors, self.b_factors, strict=True):
            if self.variant == "moka_s":
                nn.init.eye_(a)  # not copy_(torch.eye(...)): that fails on FSDP2's DTensor shards
                a.requires_grad_(False)
                b.zero_()
                continue
            nonzero, zero = (b, a) if zero_a else (a, b)
            nn.init.kaiming_uniform_(nonzero, a=math.sqrt(5))
            zero.zero_()
        if self.gate_logits is not None:
            self.gate_logits.zero_()

    def reset_parameters(self) -> None:
        """:meth:`reset_adapter` under the name generic initialization code calls: a model built on the meta
        device and materialized by ``to_empty`` holds uninitialized memory until each module's
        ``reset_parameters`` runs. Only the adapter: the base layer is a module of its own (loaded or reset
        itself)."""
        self.reset_adapter()

    def reset_requires_grad(self) -> None:
        """Make the adapter trainable again (MoKA_s identities stay frozen)."""
        for a in self.a_factors:
            a.requires_grad_(self.variant == "moka")
        for b in self.b_factors:
            b.requires_grad_(True)
        if self.gate_logits is not None:
            self.gate_logits.requires_grad_(True)

    # -- the base ------------------------------------------------------------------------------
    _wraps_linear4bit = False  # set in __init__: whether the base was a bitsandbytes Linear4bit

    @property
    def is_4bit(self) -> bool:
        """Whether the base weight is NF4 (a bitsandbytes ``Linear4bit`` or an ``NF4Linear``)."""
        return isinstance(self.base_layer, NF4Linear) or self._wraps_linear4bit or is_linear4bit(self.base_layer)

    def base_weight(self) -> torch.Tensor | NF4Tensor:
        """W0 as moka_kernels takes it: the dense weight, or a zero-copy NF4Tensor."""
        if isinstance(self.base_layer, NF4Linear):
            return self.base_layer.nf4_weight
        if self._wraps_linear4bit or is_linear4bit(self.base_layer):
            if not is_linear4bit(self.base_layer):
                raise RuntimeError(
                    "base_layer: the bitsandbytes Linear4bit's weight has lost its quant_state (FSDP's fully_shard "
                    "replaces it with a plain tensor); call moka.quantize_model(model, shardable=True) before "
                    "apply_moka: its NF4Linear layers hold the same bytes and shard under FSDP2"
                )
            return nf4_from_linear4bit(self.base_layer)
        return self.base_layer.weight

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight object (for code that inspects ``module.weight``)."""
        if isinstance(self.base_layer, NF4Linear):
            return self.base_layer.packed
        return self.base_layer.weight

    def __setattr__(self, name: str, value) -> None:
        # transformers ties an output embedding by assigning ``lm_head.weight = embed.weight`` (tie_weights,
        # resize_token_embeddings): the assignment goes to the base layer the adapter wraps. (Module's
        # __setattr__ would refuse a Parameter named like the ``weight`` property.)
        if name in ("out_features", "in_features") and name in self.__dict__ and value != self.__dict__[name]:
            # transformers' resize_token_embeddings sets a tied lm_head's out_features before tying the new weight
            raise ValueError(
                f"{name}: expected {self.__dict__[name]} (the adapter's factors are sized for it), got {value!r}; "
                "resize the vocabulary before apply_moka, or remove_moka first"
            )
        if name == "weight" and "base_layer" in self.__dict__.get("_modules", {}):
            if isinstance(self.base_layer, NF4Linear):
                raise AttributeError("weight: an NF4 base layer's weight is its packed bytes; it cannot be assigned")
            shape = tuple(getattr(value, "shape", ()))
            # e.g. resize_token_embeddings on a tied lm_head (a Linear4bit's packed bytes have another shape)
            if not self._wraps_linear4bit and shape != (self.out_features, self.in_features):
                raise ValueError(
                    f"weight: expected shape {(self.out_features, self.in_features)} (the adapter's factors are "
                    f"sized for it), got {shape}; resize the vocabulary before apply_moka, or remove_moka first"
                )
            setattr(self.base_layer, name, value)
            return
        super().__setattr__(name, value)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if (is_linear4bit(self.base_layer) or isinstance(self.base_layer, NF4Linear)) and self.base_layer.compute_dtype:
            return self.base_layer.compute_dtype
        return x.dtype

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + s·Σᵢ softmax(g)ᵢ·(Aᵢ ⊗ Bᵢ)·dropout(x), without forming ΔW; (..., in) -> (..., out)."""
        if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):  # as nn.Linear: fp64 untouched
            x = x.to(torch.get_autocast_dtype(x.device.type))  # and the output in the autocast dtype
        input_dtype = x.dtype
        x = x.to(self._compute_dtype(x))
        dtype = x.dtype
        bias = self.bias
        weight = self.base_weight()
        if not self.adapters_enabled:  # the base alone as this forward computes it: equal to it at zero adapters
            bias = None if bias is None else bias.to(dtype)
            out = nf4_linear(x, weight, bias) if isinstance(weight, NF4Tensor) else F.linear(x, weight.to(dtype), bias)
            return out.to(input_dtype)
        # after the disabled return: no dropout draw while the adapters are off
        adapter_input = self.dropout(x) if (self.dropout is not None and self.training) else None
        a_factors, b_factors = _factors_as_taken(self.a_factors, self.b_factors, dtype)
        try:
            out = moka_linear(
                x,
                weight,
                a_factors,
                b_factors,
                self.gate_logits,
                None if bias is None else bias.to(dtype),
                self.scale,
                adapter_input,
            )
        except ValueError:
            self._refuse_a_resized_base(weight)
            raise
        return out.to(input_dtype)

    def _refuse_a_resized_base(self, weight: torch.Tensor | NF4Tensor) -> None:
        # A base weight resized in place after patching (transformers swaps a tied embedding's data on a
        # vocabulary resize) fails in moka_linear's factor check, whose message does not say why.
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"base_layer: its weight is {tuple(weight.shape)} but the adapter was built for "
                f"{(self.out_features, self.in_features)} (a vocabulary resized after apply_moka?); remove_moka, "
                "resize, then apply_moka"
            )

    # -- inspection and merging ----------------------------------------------------------------
    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The materialized ΔW = s Σ softmax(g)_i kron(A_i, B_i), shape (out, in), computed in ``dtype``
        (the factors cast to it first; default: the adapter dtype)."""
        a_factors, b_factors = list(self.a_factors), list(self.b_factors)
        if dtype is not None:
            a_factors, b_factors = [a.to(dtype) for a in a_factors], [b.to(dtype) for b in b_factors]
        return materialized_delta_weight(a_factors, b_factors, self.gate_logits, self.scale)

    def dense_base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 as a dense tensor (dequantized for 4-bit bases)."""
        weight = self.base_weight()
        if isinstance(weight, NF4Tensor):
            return dequantize_nf4(weight, dtype or weight.dtype)
        return weight.detach().to(dtype or weight.dtype)

    @torch.no_grad()
    def merge(self, requantize: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain layer computing the same function, holding W0 + ΔW.

        Args:
            requantize: for a 4-bit base, quantize W0 + ΔW back to NF4 (same blocksize and double
                quantization) and return the same kind of 4-bit layer (Linear4bit or NF4Linear).
                The error this adds is logged and stored as ``merged.moka_requantization_error``
                (``max_abs`` and ``rel_rms`` against the unquantized merge). Ignored for dense bases.
            dtype: dtype of the merged dense weight; defaults to the base's dtype (for 4-bit bases,
                the dtype bitsandbytes dequantizes to).

        The merged layer's parameters are frozen (``requires_grad=False``), as the base was inside the
        adapter; ``merge_moka`` restores the flags the model had before ``apply_moka``.
        """
        require_bool(requantize, "requantize")
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected a floating-point torch.dtype or None, got {dtype!r}")
        if (
            dtype is not None
            and self.is_4bit
            and requantize
            and dtype not in (torch.float32, torch.float16, torch.bfloat16)
        ):
            raise TypeError(
                f"dtype: requantizing takes torch.float32, torch.float16 or torch.bfloat16 (or None), got {dtype}"
            )
        base_w = self.base_weight()
        out_dtype = dtype or (base_w.dtype if isinstance(base_w, (torch.Tensor, NF4Tensor)) else torch.float32)
        # At least fp32 and at least the base's and the adapter's precision (fp64 stays fp64); bf16 factors
        # widened before their products, as the forward widens them to fp32 activations.
        wide = torch.promote_types(torch.float32, self.a_factors[0].dtype)
        if isinstance(base_w, torch.Tensor) and base_w.dtype.is_floating_point:
            wide = torch.promote_types(wide, base_w.dtype)
        merged_wide = self.dense_base_weight(wide) + self.delta_weight(wide)
        bias = self.bias
        if self.is_4bit and requantize:
            q = quantize_nf4(merged_wide.to(out_dtype), base_w.blocksize, base_w.double_quant)
            err = dequantize_nf4(q, torch.float32) - merged_wide
            report = {
                "max_abs": err.abs().max().item(),
                "rel_rms": (err.pow(2).mean().sqrt() / merged_wide.pow(2).mean().sqrt().clamp_min(1e-30)).item(),
            }
            if is_linear4bit(self.base_layer):
                storage = getattr(self.base_layer, "quant_storage", None) or self.base_layer.weight.dtype
                layer = linear4bit_from_nf4(q, bias, self.base_layer.compute_dtype, storage)
            else:
                base = self.base_layer
                layer = NF4Linear(q, bias, compute_dtype=base.compute_dtype, shardable=base.shardable)
            layer.moka_requantization_error = report
            layer.train(self.training)
            logger.info(
                "merge: NF4 requantization error max_abs=%.3g rel_rms=%.3g", report["max_abs"], report["rel_rms"]
            )
            return layer
        layer = frozen_linear(merged_wide.to(out_dtype), bias)
        return layer.train(self.training)  # the mode of the layer it replaces, as nn.Linear starts in train

    def num_trainable_parameters(self) -> int:
        """The adapter's trainable elements: its trainable factors (moka_s: the B's only) and the gate logits if on."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{a1}x{a2}⊗{b1}x{b2}" for a1, a2, b1, b2 in self.component_shapes)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, variant={self.variant}, "
            f"r={len(self.component_shapes)} [{shapes}], gate={self.gate_logits is not None}, scale={self.scale}"
        )
