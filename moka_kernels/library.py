"""torch.library registration: ``moka::linear`` and ``moka::linear_backward`` custom ops.

The forward op is opaque to ``torch.compile`` (no graph break) and has a fake implementation for
shape propagation; ``register_autograd`` connects it to the backward op, whose fake implementation
gives the gradient shapes. Both ops run the backend named in their ``backend`` argument.
An NF4Tensor travels as its plain tensor fields, since custom ops take tensors, not Python objects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .nf4 import NF4Tensor
from .ops import TRITON_AVAILABLE
from .reference import GradRequest, moka_backward_torch, moka_forward_torch

__all__ = ["BACKEND_IMPLS", "linear"]

# backend name -> (forward, backward), both with the signatures of moka_forward_torch / moka_backward_torch
BACKEND_IMPLS: dict[str, tuple[Callable, Callable]] = {"torch": (moka_forward_torch, moka_backward_torch)}
if TRITON_AVAILABLE:
    from .ops.fused_linear import moka_backward_triton, moka_forward_triton

    BACKEND_IMPLS["triton"] = (moka_forward_triton, moka_backward_triton)


def _rebuild_weight(
    weight: torch.Tensor | None,
    packed: torch.Tensor | None,
    absmax: torch.Tensor | None,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    nf4_shape: list[int],
    nf4_blocksize: int,
    nf4_dtype: torch.dtype,
) -> torch.Tensor | NF4Tensor:
    if weight is not None:
        return weight
    return NF4Tensor(
        packed=packed,
        absmax=absmax,
        shape=(nf4_shape[0], nf4_shape[1]),
        dtype=nf4_dtype,
        blocksize=nf4_blocksize,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        offset=None if offset is None else offset.reshape(()),
    )


def weight_fields(weight: torch.Tensor | NF4Tensor) -> tuple:
    """(dense, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, dtype) for the ops."""
    if isinstance(weight, NF4Tensor):
        offset = None if weight.offset is None else weight.offset.reshape(1)
        return (
            None,
            weight.packed,
            weight.absmax,
            weight.nested_absmax,
            weight.nested_code,
            offset,
            list(weight.shape),
            weight.blocksize,
            weight.dtype,
        )
    return (weight, None, None, None, None, None, list(weight.shape), 0, weight.dtype)


@torch.library.custom_op("moka::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    adapter_x: torch.Tensor | None,
    weight: torch.Tensor | None,
    nf4_packed: torch.Tensor | None,
    nf4_absmax: torch.Tensor | None,
    nf4_nested_absmax: torch.Tensor | None,
    nf4_nested_code: torch.Tensor | None,
    nf4_offset: torch.Tensor | None,
    nf4_shape: list[int],
    nf4_blocksize: int,
    nf4_dtype: torch.dtype,
    bias: torch.Tensor | None,
    gate_logits: torch.Tensor | None,
    scale: float,
    a_factors: list[torch.Tensor],
    b_factors: list[torch.Tensor],
    backend: str,
) -> torch.Tensor:
    """(T, K) -> (T, N). Use ``moka_kernels.moka_linear``, which validates and fills these arguments."""
    w = _rebuild_weight(
        weight,
        nf4_packed,
        nf4_absmax,
        nf4_nested_absmax,
        nf4_nested_code,
        nf4_offset,
        nf4_shape,
        nf4_blocksize,
        nf4_dtype,
    )
    forward, _ = BACKEND_IMPLS[backend]
    return forward(x, adapter_x, w, bias, gate_logits, scale, a_factors, b_factors)


@linear.register_fake
def _(
    x,
    adapter_x,
    weight,
    nf4_packed,
    nf4_absmax,
    nf4_nested_absmax,
    nf4_nested_code,
    nf4_offset,
    nf4_shape,
    nf4_blocksize,
    nf4_dtype,
    bias,
    gate_logits,
    scale,
    a_factors,
    b_factors,
    backend,
):
    return x.new_empty((x.shape[0], nf4_shape[0]))


@torch.library.custom_op("moka::linear_backward", mutates_args=())
def linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    adapter_x: torch.Tensor | None,
    weight: torch.Tensor | None,
    nf4_packed: torch.Tensor | None,
    nf4_absmax: torch.Tensor | None,
    nf4_nested_absmax: torch.Tensor | None,
    nf4_nested_code: torch.Tensor | None,
    nf4_offset: torch.Tensor | None,
    nf4_shape: list[int],
    nf4_blocksize: int,
    nf4_dtype: torch.dtype,
    gate_logits: torch.Tensor | None,
    scale: float,
    a_factors: list[torch.Tensor],
    b_factors: list[torch.Tensor],
    needs: list[bool],
    backend: str,
) -> list[torch.Tensor]:
    """[dx, dx_adapter, dbias, dg, dA_1..r, dB_1..r]; an empty tensor where a gradient was not asked for."""
    r = len(a_factors)
    request = GradRequest(needs[0], needs[1], needs[2], needs[3], tuple(needs[4 : 4 + r]), tuple(needs[4 + r :]))
    w = _rebuild_weight(
        weight,
        nf4_packed,
        nf4_absmax,
        nf4_nested_absmax,
        nf4_nested_code,
        nf4_offset,
        nf4_shape,
        nf4_blocksize,
        nf4_dtype,
    )
    _, backward = BACKEND_IMPLS[backend]
    grads = backward(grad_out, x, adapter_x, w, gate_logits, scale, a_factors, b_factors, request)
    flat = [grads.x, grads.adapter_x, grads.bias, grads.gate, *grads.a, *grads.b]
    return [x.new_empty(0) if g is None else g for g in flat]


@linear_backward.register_fake
def _(
    grad_out,
    x,
    adapter_x,
    weight,
    nf4_packed,
    nf4_absmax,
    nf4_nested_absmax,
    nf4_nested_code,
    nf4_offset,
    nf4_shape,
    nf4_blocksize,
    nf4_dtype,
    gate_logits,
    scale,
    a_factors,
    b_factors,
    needs,
    backend,
):
    shapes = [x.shape, x.shape, (nf4_shape[0],), (len(a_factors),)]
    shapes += [a.shape for a in a_factors] + [b.shape for b in b_factors]
    dtypes = [x.dtype, x.dtype, grad_out.dtype, gate_logits.dtype if gate_logits is not None else x.dtype]
    dtypes += [a.dtype for a in a_factors] + [b.dtype for b in b_factors]
    return [
        x.new_empty(s, dtype=d) if need else x.new_empty(0) for s, d, need in zip(shapes, dtypes, needs, strict=True)
    ]


def _setup_context(ctx, inputs, output):
    (
        x,
        adapter_x,
        weight,
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        nf4_shape,
        nf4_blocksize,
        nf4_dtype,
        bias,
        gate_logits,
        scale,
        a_factors,
        b_factors,
        backend,
    ) = inputs
    r = len(a_factors)
    ctx.meta = (nf4_shape, nf4_blocksize, nf4_dtype, scale, backend, r)
    ctx.present = [
        t is not None for t in (adapter_x, weight, packed, absmax, nested_absmax, nested_code, offset, gate_logits)
    ]
    optional = [
        t for t in (adapter_x, weight, packed, absmax, nested_absmax, nested_code, offset, gate_logits) if t is not None
    ]
    ctx.save_for_backward(x, *optional, *a_factors, *b_factors)
    ctx.needs = [
        x.requires_grad,
        adapter_x is not None and adapter_x.requires_grad,
        bias is not None and bias.requires_grad,
        gate_logits is not None and gate_logits.requires_grad,
        *[a.requires_grad for a in a_factors],
        *[b.requires_grad for b in b_factors],
    ]


def _backward(ctx, grad_out):
    nf4_shape, nf4_blocksize, nf4_dtype, scale, backend, r = ctx.meta
    saved = list(ctx.saved_tensors)
    x = saved.pop(0)
    optional = [saved.pop(0) if present else None for present in ctx.present]
    adapter_x, weight, packed, absmax, nested_absmax, nested_code, offset, gate_logits = optional
    a_factors, b_factors = saved[:r], saved[r:]
    flat = torch.ops.moka.linear_backward(
        grad_out.contiguous(),
        x,
        adapter_x,
        weight,
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        nf4_shape,
        nf4_blocksize,
        nf4_dtype,
        gate_logits,
        scale,
        a_factors,
        b_factors,
        ctx.needs,
        backend,
    )
    grads = [g if need else None for g, need in zip(flat, ctx.needs, strict=True)]
    grad_x, grad_xa, grad_bias, grad_gate = grads[:4]
    grad_a, grad_b = grads[4 : 4 + r], grads[4 + r :]
    return (
        grad_x,
        grad_xa,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        grad_bias,
        grad_gate,
        None,
        grad_a,
        grad_b,
        None,
    )


linear.register_autograd(_backward, setup_context=_setup_context)
