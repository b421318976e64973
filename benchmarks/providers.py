"""Layer-level providers: every way a user could run one adapted (or plain) linear layer.

A provider builds, for one layer shape (N out, K in), token count T, device and dtype, a :class:`Case`: a
``forward()`` closure, the trainable tensors, and the FLOPs of its adapter. The runner times
``fwd`` (no autograd), ``fwd+bwd`` and ``bwd`` (replaying ``backward`` on one retained graph), and counts
the bytes autograd saves for backward.

Providers (all on the same W0, x and dy):

* base alone: ``dense_linear`` (F.linear), ``bnb_nf4`` (bitsandbytes ``matmul_4bit``), ``ours_nf4``
  (our NF4 base as ``moka_linear`` runs it: on CUDA the fused Triton dequant-GEMMs below
  ``DEQUANTIZE_MIN_TOKENS`` tokens, our one-launch decode + cuBLAS from there; dequantize + GEMM on CPU),
  ``ours_nf4_fused`` (CUDA: the fused Triton GEMMs at every T, to place ``DEQUANTIZE_MIN_TOKENS``),
  ``dequant_cublas`` (CUDA: bitsandbytes ``dequantize_4bit`` + ``F.linear`` at every T, the GPU target's
  comparator; ``matmul_4bit`` itself takes a GEMV at T = 1 without grad);
* adapters: ``moka_torch`` / ``moka_triton`` (ours, NF4 or dense base), ``lokr_materialized`` (PEFT LoKr's
  way: ΔW = Σ α_i kron(A_i, B_i) every step, then ``base(x) + F.linear(x, ΔW)`` on a dense base, as PEFT's
  LoKr layer computes it), ``lokr_fused`` (the same ΔW added to W0, one GEMM: stricter than PEFT), ``lora_r16``,
  ``lora_r32`` and ``lora_equal`` (PEFT's LoRA layer, the last at the rank nearest MoKA's parameter count).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moka.config import MoKAConfig, auto_component_shapes
from moka_kernels import NF4Tensor, dequantize_nf4, moka_linear, quantize_nf4
from moka_kernels.reference import contraction_order

__all__ = ["PROVIDERS", "Case", "adapter_macs", "adapter_train_macs", "build_case", "moka_shapes"]


@dataclass
class Case:
    forward: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor] = field(default_factory=list)
    adapter_macs_per_token: int = 0
    adapter_train_macs_per_token: int = 0  # forward + backward
    trainable: int = 0
    backend: str | None = None  # MOKA_BACKEND while this case runs
    note: str = ""
    frozen: list[torch.Tensor] = field(default_factory=list)  # persistent tensors, not counted as saved


def moka_shapes(n_out: int, k_in: int, r: int) -> list[tuple[int, int, int, int]]:
    return auto_component_shapes(n_out, k_in, r)


def adapter_train_macs(shapes) -> int:
    """Per-token MACs of the adapter's forward plus backward (dX, dA, dB) as the PyTorch path computes them,
    each component in its cheaper order (``reference.moka_backward_torch``; counted op by op in a test):

    * ``a_first``: Q = G B (a1·b1·b2), dX = Aᵀ Q, M = Σ Q Xᵀ, V = A X (a1·a2·b2 each), R = Σ Gᵀ V (a1·b1·b2):
      2·a1·b1·b2 + 3·a1·a2·b2;
    * ``b_first``: P = Aᵀ G (a1·a2·b1), dX = P B, R = Σ Pᵀ X, U = X Bᵀ (a2·b1·b2 each), M = Σ G Uᵀ
      (a1·a2·b1): 2·a1·a2·b1 + 3·a2·b1·b2."""
    total = adapter_macs(shapes)
    for a1, a2, b1, b2 in shapes:
        if contraction_order((a1, a2), (b1, b2)) == "a_first":
            total += 2 * a1 * b1 * b2 + 3 * a1 * a2 * b2
        else:
            total += 2 * a1 * a2 * b1 + 3 * a2 * b1 * b2
    return total


def adapter_macs(shapes) -> int:
    """Per-token MACs of the adapter forward, cheaper contraction order per component."""
    total = 0
    for a1, a2, b1, b2 in shapes:
        total += a2 * b1 * (b2 + a1) if contraction_order((a1, a2), (b1, b2)) == "b_first" else a1 * b2 * (a2 + b1)
    return total


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def gated_kron_sum(a_factors, b_factors, gate_logits) -> torch.Tensor:
    """ΔW = Σ_i α_i kron(A_i, B_i) as the LoKr-style comparators form it every step, α folded into the small
    factor (kron(α_i A_i, B_i)): gating the full products instead would add r full-size multiplies and make
    autograd keep r full-size products for the gate's gradient, a cost of the comparator, not of LoKr."""
    alpha = torch.softmax(gate_logits.float(), 0)
    terms = (torch.kron(alpha[i].to(a.dtype) * a, b) for i, (a, b) in enumerate(zip(a_factors, b_factors, strict=True)))
    return functools.reduce(torch.add, terms)


def _peft_lora(base: nn.Module, rank: int) -> tuple[nn.Module, list[torch.Tensor]]:
    from peft import LoraConfig, inject_adapter_in_model

    holder = _Holder(base)
    # What from_pretrained(quantization_config=...) sets on a 4-bit model: PEFT then wraps a Linear4bit in
    # its bitsandbytes LoRA layer (QLoRA's), not the generic one.
    holder.is_loaded_in_4bit = hasattr(base, "support_avx512bf16_for_cpu")
    model = inject_adapter_in_model(LoraConfig(target_modules=["proj"], r=rank, lora_alpha=2 * rank), holder)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # PEFT zero-initializes lora_B; give it values so no kernel can shortcut zeros
        for p in params:
            p.normal_(0, 0.02)
            # fp32 adapter weights, as get_peft_model leaves them (autocast_adapter_dtype) and MoKA keeps its
            # factors; inject_adapter_in_model keeps a half-precision base's dtype
            p.data = p.data.float()
    return model, params


@contextlib.contextmanager
def _nf4_route(route: str | None):
    """``MOKA_NF4_ROUTE`` = ``route`` while inside (``None``: leave the library's choice)."""
    if route is None:
        yield
        return
    previous = os.environ.get("MOKA_NF4_ROUTE")
    os.environ["MOKA_NF4_ROUTE"] = route
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MOKA_NF4_ROUTE")
        else:
            os.environ["MOKA_NF4_ROUTE"] = previous


def _linear4bit(w_nf4, dtype):
    from moka.bnb_compat import linear4bit_from_nf4

    return linear4bit_from_nf4(w_nf4, None, dtype)


def build_case(provider: str, n_out: int, k_in: int, device, dtype, r: int = 4, base: str = "nf4") -> Case:
    """One provider on one layer; ``base`` is "nf4" or "dense" for the providers that take either."""
    case = _build_case(provider, n_out, k_in, device, dtype, r, base)
    if isinstance(case.forward, nn.Module):
        case.frozen += [t for t in case.forward.parameters() if not t.requires_grad] + list(case.forward.buffers())
    return case


@functools.lru_cache(maxsize=1)
def _frozen_weights(n_out: int, k_in: int, device, dtype) -> tuple[torch.Tensor, NF4Tensor]:
    """One layer's dense W0 and its NF4, shared by every provider and token count of that layer (making
    them takes a fraction of a second at LLaMA sizes, every case over)."""
    gen = torch.Generator().manual_seed(0)
    w_dense = (torch.randn(n_out, k_in, generator=gen) / math.sqrt(k_in)).to(device, dtype)
    return w_dense, quantize_nf4(w_dense)


def _build_case(provider: str, n_out: int, k_in: int, device, dtype, r: int, base: str) -> Case:
    w_dense, w_nf4_shared = _frozen_weights(n_out, k_in, torch.device(device), dtype)
    gen = torch.Generator().manual_seed(1)
    shapes = moka_shapes(n_out, k_in, r)
    moka_params = sum(a1 * a2 + b1 * b2 for a1, a2, b1, b2 in shapes) + len(shapes)
    persistent: list[torch.Tensor] = [w_dense]  # the frozen weights every call reuses

    def nf4(w):
        assert w is w_dense
        q = w_nf4_shared
        persistent.extend(t for t in (q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset) if t is not None)
        return q

    def factors(factor_dtype=dtype):
        a = [(torch.randn(a1, a2, generator=gen) / math.sqrt(a2)).to(device, factor_dtype) for a1, a2, _, _ in shapes]
        b = [(torch.randn(b1, b2, generator=gen) * 0.02).to(device, factor_dtype) for _, _, b1, b2 in shapes]
        g = torch.zeros(len(shapes), device=device)
        return [t.requires_grad_(True) for t in (*a, *b, g)]

    if provider == "dense_linear":
        return Case(lambda x: F.linear(x, w_dense), frozen=persistent)
    if provider == "bnb_nf4":
        import bitsandbytes as bnb

        layer = _linear4bit(nf4(w_dense), dtype)
        state = layer.weight.quant_state
        return Case(lambda x: bnb.matmul_4bit(x, layer.weight.t(), quant_state=state), frozen=persistent)
    if provider == "dequant_cublas":
        import bitsandbytes.functional as bnbf

        layer = _linear4bit(nf4(w_dense), dtype)
        packed, state = layer.weight.data, layer.weight.quant_state

        class _DequantizeThenGemm(torch.autograd.Function):
            # W decoded in the forward and again in the backward (never saved), as QLoRA's MatMul4Bit does
            @staticmethod
            def forward(ctx, x):
                return F.linear(x, bnbf.dequantize_4bit(packed, state).to(x.dtype))

            @staticmethod
            def backward(ctx, dy):
                return dy @ bnbf.dequantize_4bit(packed, state).to(dy.dtype)

        note = "bitsandbytes dequantize_4bit, then F.linear (cuBLAS) at every T, forward and backward"
        return Case(_DequantizeThenGemm.apply, note=note, frozen=persistent)
    if provider in ("ours_nf4", "ours_nf4_fused"):
        w_nf4 = nf4(w_dense)
        if device.type == "cuda":
            from moka_kernels.ops import fused_linear

            route = "fused" if provider == "ours_nf4_fused" else None  # None: the library's choice by T

            class _NF4Base(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x):
                    with _nf4_route(route):
                        return fused_linear._base_matmul(x, w_nf4, None, None)

                @staticmethod
                def backward(ctx, dy):
                    with _nf4_route(route):
                        return fused_linear._base_matmul_t(dy.contiguous(), w_nf4, None)

            note = (
                "Triton nf4_matmul / nf4_matmul_t at every T"
                if route
                else "as moka_linear runs it: Triton nf4_matmul(_t) below DEQUANTIZE_MIN_TOKENS, "
                "nf4_dequantize + cuBLAS from there"
            )
            return Case(_NF4Base.apply, note=note, frozen=persistent)

        class _DecodeThenGemm(torch.autograd.Function):
            # as moka_linear's PyTorch path runs the base: W decoded in the forward and again in the backward,
            # never saved (autograd through F.linear would save the decoded fp32 W, N·K·4 bytes)
            @staticmethod
            def forward(ctx, x):
                return F.linear(x, dequantize_nf4(w_nf4, x.dtype))

            @staticmethod
            def backward(ctx, dy):
                return dy @ dequantize_nf4(w_nf4, dy.dtype)

        note = "dequantize + GEMM (CPU), W decoded again in the backward, as moka_linear's PyTorch path"
        return Case(_DecodeThenGemm.apply, note=note, frozen=persistent)
    if provider in ("moka_torch", "moka_triton"):
        weight = nf4(w_dense) if base == "nf4" else w_dense
        # fp32 master factors on a half-precision layer, as MoKALinear keeps them (MoKAConfig.adapter_dtype)
        master = MoKAConfig().resolved_adapter_dtype(dtype)
        params = factors(master)
        a, b, g = params[:r], params[r : 2 * r], params[2 * r]
        factor_note = "" if master == dtype else f", {str(master).removeprefix('torch.')} master factors"
        return Case(
            lambda x: moka_linear(x, weight, a, b, g),
            params,
            adapter_macs(shapes),
            adapter_train_macs(shapes),
            moka_params,
            backend=provider.removeprefix("moka_"),
            note=f"{base} base{factor_note}, r={len(shapes)}: "
            + ", ".join(f"{a1}x{a2}⊗{b1}x{b2}" for a1, a2, b1, b2 in shapes),
            frozen=persistent,
        )
    if provider in ("lokr_materialized", "lokr_fused"):
        params = factors()
        a, b, g = params[:r], params[r : 2 * r], params[2 * r]
        n_k = n_out * k_in
        if provider == "lokr_materialized":  # PEFT LoKr's forward: base_layer(x) + F.linear(x, ΔW)
            return Case(
                lambda x: F.linear(x, w_dense) + F.linear(x, gated_kron_sum(a, b, g).to(dtype)),
                params,
                n_k,  # per token: the ΔW GEMM (forming ΔW, r·N·K per step, not counted)
                3 * n_k,  # its forward, its dX and dΔW = Gᵀ X
                moka_params,
                note="dense base; ΔW = Σ α kron(A, B) formed every step, a second full-size GEMM (PEFT LoKr's way)",
                frozen=persistent,
            )
        return Case(  # a stricter comparator than PEFT's: W0 + ΔW in one GEMM forward and one for dX
            lambda x: F.linear(x, w_dense + gated_kron_sum(a, b, g).to(dtype)),
            params,
            0,
            n_k,  # dΔW = Gᵀ X
            moka_params,
            note="dense base; ΔW = Σ α kron(A, B) formed every step and added to W0: one GEMM",
            frozen=persistent,
        )
    if provider.startswith("lora_"):
        rank = max(1, round(moka_params / (n_out + k_in))) if provider == "lora_equal" else int(provider[6:])
        layer = nn.Linear(k_in, n_out, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(w_dense)
        if base == "nf4":  # QLoRA: PEFT LoRA on a bitsandbytes NF4 layer
            layer = _linear4bit(nf4(w_dense), dtype)
            layer.support_avx512bf16_for_cpu = False
        model, params = _peft_lora(layer, rank)
        model.to(device)
        note = f"PEFT LoRA r={rank} on a {'bitsandbytes NF4' if base == 'nf4' else 'dense'} base"
        macs = rank * (n_out + k_in)
        return Case(model, params, macs, 3 * macs, macs, note=note, frozen=persistent)
    raise ValueError(f"provider: unknown {provider!r}; expected one of {PROVIDERS}")


PROVIDERS = (
    "dense_linear",
    "bnb_nf4",
    "dequant_cublas",
    "ours_nf4",
    "ours_nf4_fused",
    "moka_torch",
    "moka_triton",
    "lokr_materialized",
    "lokr_fused",
    "lora_equal",
    "lora_r16",
    "lora_r32",
)
