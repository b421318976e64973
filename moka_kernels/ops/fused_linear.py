r"""The fused MoKA layer on the Triton kernels: forward and backward of

.. math::  y = x W_0^T + b + \sum_i c_i (A_i \otimes B_i) x_a, \qquad c = s \cdot \mathrm{softmax}(g)

Forward, whatever r is:

* training and prefill: ``kron_mixture_forward`` writes the adapter output Σ c_i Y_i once (T × N) in one
  launch for all components; the base GEMM adds it, with the bias: ``nf4_matmul``'s epilogue for an NF4
  base below ``DEQUANTIZE_MIN_TOKENS`` (decoding the packed bytes in registers; the adapter output in
  fp32), else ``torch.addmm`` (cuBLAS, beta = 1) on the dense base or on W decoded by ``nf4_dequantize``
  (the adapter output written in bf16 directly when x is bf16 and the rowwise schedule runs);
* decoding (an NF4 base whose GEMM takes the split-K path, T ≤ 16): the base's split-K programs and the
  adapter's atomic-schedule programs both add into one zeroed fp32 buffer, in one launch
  (``nf4_matmul_accumulate(..., adapter=adapter_launch(...))``), which is cast once.

fp32 master factors of a bf16/fp16 layer (``MoKALinear``'s default) are rounded into cached per-layer
copies in one ``_foreach_copy_`` launch per call (``factors_in_dtype``), instead of the 2r cast launches
(and 2r more for the gradients) of casting each factor in the module; their gradients are written in
fp32 by the finishing launch.

Why the epilogue and not ΔW folded into the dequantized tile: folding needs ΔW tiles, i.e. r small
GEMMs per W tile recomputed by every M-tile, which only pays at very large T; the epilogue costs one write
and one read of a T × N fp32 tensor (docs/design.md has the roofline numbers).

Backward: dx = dy · W0 with the adapter's dx (``kron_mixture_backward_dx``, one launch) added in the NF4
transposed GEMM's epilogue (or in cuBLAS's beta term, as in the forward); every raw factor gradient M_i,
R_i in one token-reduction launch, then dA, dB (in factor layout, in one buffer) and dg in one finishing
launch (``kron_factor_backward``). The coefficients c are formed from the logits inside each kernel, so a
layer's backward runs three or four launches (plus dy's column sum with a bias) and no small torch ops.
Nothing of size r·T·N is ever written, and W0 is re-decoded instead of saved. Under
``torch.use_deterministic_algorithms(True)`` no atomics are used (no split-K, the row-owning adapter
schedule), so results are bitwise reproducible.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence

import torch

from ..nf4 import NF4Tensor, dequantize_nf4
from ..reference import GradRequest, MoKAGrads, factor_requests, split_factor_grads
from . import nf4_matmul as nf4_ops
from .kron_mixture import (
    _PlanCache,
    adapter_launch,
    factor_signature,
    grouped_launch_allowed,
    kron_factor_backward,
    kron_mixture_backward_dx,
    kron_mixture_forward,
)
from .nf4_dequantize import nf4_dequantize

__all__ = ["factors_in_dtype", "moka_backward_triton", "moka_forward_triton", "on_device_of"]


def on_device_of(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while launching: Triton launches on the current CUDA device and its stream,
    whatever device the tensors are on (a model split over GPUs keeps cuda:0 current for every layer)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launches_on_input_device(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(first: torch.Tensor, *args, **kwargs):
        with on_device_of(first.device):
            return fn(first, *args, **kwargs)

    return wrapper


_FACTOR_COPIES = _PlanCache()


def _new_copies(factors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    # Normal tensors even when the first call runs under inference_mode: inference tensors would refuse
    # the in-place copy of every later (training) call.
    with torch.inference_mode(False):
        return [torch.empty_like(f, dtype=dtype) for f in factors]


def factors_in_dtype(
    a_factors: Sequence[torch.Tensor], b_factors: Sequence[torch.Tensor], dtype: torch.dtype
) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]:
    """The factors in the activations' ``dtype`` for the kernels: as they are, or (fp32 master factors of
    a bf16/fp16 layer) rounded into per-layer copies by one ``_foreach_copy_`` launch for all 2r of them.

    The copies are cached on the factors' signature, so their addresses (and the launch plans built on
    them) are the same every call; they are rewritten on every call, so they are never stale, and no
    kernel reads fp32 factor tiles (which cost registers and the operands' async-copy pipelining).
    """
    if a_factors[0].dtype == dtype:
        return a_factors, b_factors
    factors = [*a_factors, *b_factors]
    key = (factor_signature(a_factors, b_factors), factors[0].dtype, dtype, factors[0].device)
    copies = _FACTOR_COPIES.get(key, lambda: _new_copies(factors, dtype))
    torch._foreach_copy_(copies, factors)  # one launch on CUDA (same sizes and strides, any dtypes)
    r = len(a_factors)
    return copies[:r], copies[r:]


def _dense_base(weight: torch.Tensor | NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W0 as a dense tensor for cuBLAS: itself, or the NF4 weight decoded (one launch where the kernels
    take its layout, the reference's torch ops otherwise)."""
    if not isinstance(weight, NF4Tensor):
        return weight
    return nf4_dequantize(weight, dtype) if nf4_ops.supports(weight) else dequantize_nf4(weight, dtype)


def _fused_nf4(weight: torch.Tensor | NF4Tensor, num_tokens: int) -> bool:
    """Whether the base GEMM decodes the NF4 bytes in its inner loop (few tokens) rather than running
    cuBLAS on a decoded copy (many tokens: ``nf4_matmul.nf4_route``)."""
    return isinstance(weight, NF4Tensor) and nf4_ops.supports(weight) and nf4_ops.nf4_route(num_tokens) == "fused"


def _adapter_rows_dtype(rows_dtype: torch.dtype, fused_epilogue: bool) -> torch.dtype:
    """The dtype the rowwise adapter kernel writes its rows in: bf16 for bf16 activations when the rows do
    not go to a fused NF4 GEMM's epilogue (cuBLAS adds them, or they are the adapter input's gradient),
    which skips an fp32 write and a cast pass; else fp32: the fused epilogues read fp32, and an fp16 running
    sum over the components could overflow where the fp32 sum would not. (The atomic schedule returns fp32
    whatever is asked.)"""
    return torch.bfloat16 if rows_dtype == torch.bfloat16 and not fused_epilogue else torch.float32


def _base_matmul(
    x2d: torch.Tensor,
    weight: torch.Tensor | NF4Tensor,
    add: torch.Tensor | None,
    bias: torch.Tensor | None,
    fused: bool | None = None,
) -> torch.Tensor:
    """x · W0ᵀ + add + bias: add (fp32) and bias join in the fused NF4 GEMM's epilogue, or in cuBLAS's
    beta term (add, fp32 or already in x's dtype, taken in x's dtype, as for a dense base). ``fused``: the
    caller's ``_fused_nf4`` answer, if it already asked."""
    if _fused_nf4(weight, x2d.shape[0]) if fused is None else fused:
        return nf4_ops.nf4_matmul(x2d, weight, add=add, bias=bias)
    dense = _dense_base(weight, x2d.dtype)
    base_in = add.to(x2d.dtype) if add is not None else None
    if bias is not None:
        base_in = bias.expand(x2d.shape[0], -1) if base_in is None else base_in + bias
    if base_in is None:
        return x2d @ dense.t()
    return torch.addmm(base_in, x2d, dense.t())


def _base_matmul_t(
    grad_out: torch.Tensor, weight: torch.Tensor | NF4Tensor, add: torch.Tensor | None, fused: bool | None = None
):
    """dy · W0 (+ add): the NF4 bytes read in place by the fused kernel, or cuBLAS on a decoded copy
    (``fused`` as in :func:`_base_matmul`)."""
    if _fused_nf4(weight, grad_out.shape[0]) if fused is None else fused:
        return nf4_ops.nf4_matmul_t(grad_out, weight, add=add)
    dense = _dense_base(weight, grad_out.dtype)
    if add is None:
        return grad_out @ dense
    return torch.addmm(add.to(grad_out.dtype), grad_out, dense)


@_launches_on_input_device
def moka_forward_triton(
    x2d: torch.Tensor,
    adapter_x2d: torch.Tensor | None,
    weight: torch.Tensor | NF4Tensor,
    bias: torch.Tensor | None,
    gate_logits: torch.Tensor | None,
    scale: float,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
) -> torch.Tensor:
    """(T, K) -> (T, N) on the Triton kernels; same contract as ``reference.moka_forward_torch``."""
    x2d = x2d.contiguous()
    xa = x2d if adapter_x2d is None else adapter_x2d.contiguous()
    a_factors, b_factors = factors_in_dtype(a_factors, b_factors, x2d.dtype)
    if _decode_fusion(x2d, weight):
        # Decoding: the split-K base GEMV and all adapter components add into one fp32 buffer, in one
        # launch whose extra programs run the adapter (MOKA_DECODE_FUSION=0: the adapter as its own launch).
        acc = torch.zeros((x2d.shape[0], weight.shape[0]), dtype=torch.float32, device=x2d.device)
        if os.environ.get("MOKA_DECODE_FUSION", "1") != "0":
            launch = adapter_launch(xa, acc, a_factors, b_factors, gate_logits, scale)
            nf4_ops.nf4_matmul_accumulate(x2d, weight, acc, bias, adapter=launch)
        else:
            nf4_ops.nf4_matmul_accumulate(x2d, weight, acc, bias)
            kron_mixture_forward(xa, a_factors, b_factors, gate_logits=gate_logits, scale=scale, out=acc)
        return acc.to(x2d.dtype)
    fused = _fused_nf4(weight, x2d.shape[0])
    out_dtype = _adapter_rows_dtype(x2d.dtype, fused)
    adapter = kron_mixture_forward(xa, a_factors, b_factors, gate_logits=gate_logits, scale=scale, out_dtype=out_dtype)
    return _base_matmul(x2d, weight, adapter, bias, fused)


def _decode_fusion(x2d: torch.Tensor, weight: torch.Tensor | NF4Tensor) -> bool:
    """Few tokens on an NF4 base with atomics allowed: the base takes the split-K path anyway (unless
    ``MOKA_NF4_ROUTE=dequantize`` sends every NF4 GEMM through a decoded copy)."""
    if not (isinstance(weight, NF4Tensor) and nf4_ops.supports(weight) and grouped_launch_allowed()):
        return False
    if nf4_ops.nf4_route(x2d.shape[0]) != "fused":
        return False
    return nf4_ops.split_k_for(x2d.shape[0], weight.shape[0], weight.shape[1]) > 1 and x2d.shape[0] > 0


@_launches_on_input_device
def moka_backward_triton(
    grad_out: torch.Tensor,
    x2d: torch.Tensor,
    adapter_x2d: torch.Tensor | None,
    weight: torch.Tensor | NF4Tensor,
    gate_logits: torch.Tensor | None,
    scale: float,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    needs: GradRequest,
) -> MoKAGrads:
    """Backward on the Triton kernels; same contract as ``reference.moka_backward_torch``."""
    grad_out = grad_out.contiguous()
    separate = adapter_x2d is not None
    xa = (adapter_x2d if separate else x2d).contiguous()
    need_adapter_x = needs.adapter_x if separate else needs.x
    grad_dtype = a_factors[0].dtype  # fp32 master factors get fp32 gradients, never rounded to half
    a_factors, b_factors = factors_in_dtype(a_factors, b_factors, grad_out.dtype)

    # c = scale·softmax(g) is formed inside every kernel from the logits: no small torch ops here
    fused = _fused_nf4(weight, grad_out.shape[0])
    adapter_dx = None
    if need_adapter_x:
        dx_dtype = _adapter_rows_dtype(grad_out.dtype, fused_epilogue=fused and not separate)
        adapter_dx = kron_mixture_backward_dx(
            grad_out, a_factors, b_factors, gate_logits=gate_logits, scale=scale, out_dtype=dx_dtype
        )
    grad_x = _base_matmul_t(grad_out, weight, None if separate else adapter_dx, fused) if needs.x else None
    grad_xa = adapter_dx.to(grad_out.dtype) if (separate and need_adapter_x) else None

    requests = factor_requests(needs, len(a_factors))
    grad_a, grad_b, grad_gate = [None] * len(a_factors), [None] * len(b_factors), None
    if requests:  # two launches: every raw factor gradient, then c·raw and the gate's gradient
        grads_flat, grad_gate = kron_factor_backward(
            grad_out,
            xa,
            a_factors,
            b_factors,
            requests,
            gate_logits,
            scale,
            gate_grad=needs.gate,
            grad_dtype=grad_dtype,
        )
        grad_a, grad_b = split_factor_grads(grads_flat, requests, needs, a_factors, b_factors)
    grad_bias = grad_out.sum(0) if needs.bias else None
    return MoKAGrads(grad_x, grad_xa, grad_bias, grad_gate, grad_a, grad_b)
