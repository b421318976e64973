r"""The frozen NF4 base alone, as a layer with no adapter needs it:

.. math::

    y = x \, \mathrm{dequant}(W)^T + b, \qquad
    \partial x = \partial y \, \mathrm{dequant}(W), \qquad
    \partial b = \textstyle\sum_t \partial y_t

Nothing weight-sized is saved for the backward: it decodes W again (or, on CUDA, reads the packed bytes in
place), as bitsandbytes' ``matmul_4bit`` does. Autograd through ``F.linear(x, dequantize_nf4(W))`` would
keep each layer's decoded weight alive from its forward to its backward, a dense copy of every frozen NF4
layer the model runs during training.

The compute is :func:`moka_linear`'s base: on the Triton backend the NF4 GEMM that decodes in its inner loop
for few tokens, else W decoded by one Triton launch and cuBLAS; on the PyTorch path the reference decode and
``F.linear``. Under tracing (``torch.compile``, ``torch.export``) it is that plain composite, which the
compiler can fuse and recompute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .dispatch import _autocast_dtype, _cast_for_autocast, select_backend
from .library import _must_trace
from .nf4 import NF4Tensor, dequantize_nf4
from .ops import TRITON_AVAILABLE

if TRITON_AVAILABLE:  # select_backend never returns "triton" otherwise
    from .ops.fused_linear import _base_matmul, _base_matmul_t, on_device_of

__all__ = ["nf4_linear", "nf4_linear_reference"]


def nf4_linear_reference(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain-PyTorch reference: decode, then ``F.linear`` (autograd saves the decoded weight)."""
    return F.linear(x, dequantize_nf4(weight, x.dtype), None if bias is None else bias.to(x.dtype))


def _forward(x2d: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend == "triton":
        with on_device_of(x2d.device):
            return _base_matmul(x2d.contiguous(), weight, None, bias)
    return F.linear(x2d, dequantize_nf4(weight, x2d.dtype), bias)


def _grad_input(grad_out: torch.Tensor, weight: NF4Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        with on_device_of(grad_out.device):
            return _base_matmul_t(grad_out.contiguous(), weight, None)
    return grad_out @ dequantize_nf4(weight, grad_out.dtype)


class _NF4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, bias, weight, backend):
        ctx.weight, ctx.backend = weight, backend  # the NF4 fields only: W is decoded again in the backward
        return _forward(x2d, weight, bias, backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_x = _grad_input(grad_out, ctx.weight, ctx.backend) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None, None


def nf4_linear(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · dequant(W)ᵀ + b for a frozen NF4 weight, saving nothing weight-sized for the backward.

    Args:
        x: (..., K) floating input; it sets the compute dtype (W is decoded to it).
        weight: the frozen (N, K) :class:`NF4Tensor`, on x's device.
        bias: optional (N,) bias, cast to x's dtype.

    Returns:
        (..., N) in x's dtype, differentiable w.r.t. x and the bias. Under ``torch.autocast`` x and the bias
        are cast to the autocast dtype first, as ``F.linear`` casts them.
    """
    if not isinstance(weight, NF4Tensor):
        raise TypeError(f"weight: expected an NF4Tensor, got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    n_out, k_in = weight.shape
    if x.dim() == 0 or x.shape[-1] != k_in:
        raise ValueError(f"x: expected last dimension {k_in} (the weight's in_features), got shape {tuple(x.shape)}")
    if x.device != weight.packed.device:
        raise ValueError(f"x: expected a tensor on the weight's device {weight.packed.device}, got {x.device}")
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.is_floating_point()):
        raise TypeError(
            f"bias: expected a floating-point ({n_out},) tensor, got {getattr(bias, 'dtype', type(bias).__name__)}"
        )
    if bias is not None and (tuple(bias.shape) != (n_out,) or bias.device != x.device):
        raise ValueError(f"bias: expected shape ({n_out},) on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    if x.dtype != torch.float64 and (dtype := _autocast_dtype(x.device.type)) is not None:  # fp64: untouched
        x, bias = _cast_for_autocast(x, dtype), _cast_for_autocast(bias, dtype)
    bias = None if bias is None else bias.to(x.dtype).contiguous()  # the NF4 GEMM's epilogue reads it so
    if _must_trace(x):
        return nf4_linear_reference(x, weight, bias)
    lead = x.shape[:-1]
    out = _NF4Linear.apply(x.reshape(-1, k_in), bias, weight, select_backend(x))
    return out.reshape(*lead, n_out)
