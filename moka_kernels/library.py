"""torch.library registration: ``moka::linear`` and ``moka::linear_backward`` custom ops, and the eager path.

The forward op is opaque to ``torch.compile`` (no graph break) and has a fake implementation for
shape propagation; ``register_autograd`` connects it to the backward op, whose fake implementation
gives the gradient shapes. Both ops run the backend named in their ``backend`` argument.
An NF4Tensor travels as its plain tensor fields, since custom ops take tensors, not Python objects.

Eager calls skip the dispatcher: :func:`apply_linear` runs the same backend functions through a plain
``torch.autograd.Function`` (:class:`EagerLinear`) unless something is tracing (``torch.compile``,
``torch.export``, fake tensors, a dispatch mode, functorch transforms), which gets the custom op. The
custom-op round trip costs about 0.2 ms of CPU per layer per training step (576² layer, r = 4, one token:
0.64 ms vs 0.40 ms fwd+bwd; benchmarks/results/overhead-cpu.md), which is the whole step at small T on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .nf4 import NF4Tensor
from .ops import TRITON_AVAILABLE
from .reference import GradRequest, moka_backward_torch, moka_forward_torch

__all__ = ["BACKEND_IMPLS", "EagerLinear", "apply_linear", "linear", "weight_fields"]

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
    with without_autocast(grad_out.device):
        grads = backward(grad_out, x, adapter_x, w, gate_logits, scale, a_factors, b_factors, request)
    flat = [grads.x, grads.adapter_x, grads.bias, grads.gate, *grads.a, *grads.b]
    return _unaliased([x.new_empty(0) if g is None else g for g in flat])


def _unaliased(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A custom op's outputs may not share storage; the Triton backend returns the factor gradients as
    slices of one buffer (one launch for all), so all but the first slice of a storage are copied out.
    (``_base`` cannot tell: views made below autograd, as in a custom op's implementation, have none.)"""
    seen: set[int] = set()
    out = []
    for t in tensors:
        if t.numel():
            storage = t.untyped_storage().data_ptr()
            if storage in seen or t.storage_offset():  # an offset slice too: the fake kernel's are at offset 0
                t = t.clone()
            else:
                seen.add(storage)
        out.append(t)
    return out


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The backends compute in the dtypes they are given, as the forward does (it runs with autocast off):
    a backward called inside an autocast region (on a CPU autograd runs it on the caller's thread) would
    otherwise recast their matmuls' inputs while their out= buffers stay fp32."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # the usual case: no autocast context to enter and leave per backward


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


def _must_trace(x: torch.Tensor) -> bool:
    """True when the call is being traced or transformed, so it must go through the registered custom op."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    if torch._C._len_torch_dispatch_stack() > 0 or torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return type(x) is not torch.Tensor  # fake, functional or another tensor subclass


class EagerLinear(torch.autograd.Function):
    """``moka::linear`` without the dispatcher: the same backend functions and the same saved tensors.

    Saved for backward: x (and the adapter input if distinct), the gate logits, the factors and a dense base
    weight (saved, not held: under autocast it is a cast copy, which activation checkpointing must be able to
    free, as nn.Linear's); an NF4 base is kept by reference. Not saved: ΔW, a dequantized base weight
    (re-decoded in backward)
    and the r per-component intermediates (recomputed). Factors are passed flat (``*a_factors,
    *b_factors``) so autograd sees each one as an input.
    """

    @staticmethod
    def forward(ctx, x, adapter_x, weight, bias, gate_logits, scale, backend, num_components, *factors):
        a_factors, b_factors = factors[:num_components], factors[num_components:]
        forward, _ = BACKEND_IMPLS[backend]
        dense = isinstance(weight, torch.Tensor)
        ctx.meta = (
            None if dense else weight,
            scale,
            backend,
            num_components,
            adapter_x is not None,
            gate_logits is not None,
        )
        empty = x.new_empty(0)
        ctx.save_for_backward(
            x,
            empty if adapter_x is None else adapter_x,
            empty if gate_logits is None else gate_logits,
            weight if dense else empty,
            *factors,
        )
        return forward(x, adapter_x, weight, bias, gate_logits, scale, a_factors, b_factors)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # unpacked once: non-reentrant checkpointing allows no second unpack
        if torch.is_grad_enabled():  # create_graph=True: first order only (the backends use out= ops)
            with torch.no_grad():
                grads = _eager_backward(ctx, grad_out, saved)
            return _refuse_second_order(ctx, grad_out, grads, saved)
        return _eager_backward(ctx, grad_out, saved)


def _eager_backward(ctx, grad_out, saved):
    """EagerLinear's backward: the backend's hand-written gradients of what forward saved (``saved``: its
    ``ctx.saved_tensors``)."""
    nf4_weight, scale, backend, r, has_adapter_x, has_gate = ctx.meta
    x, adapter_x, gate_logits, dense_weight, *factors = saved
    weight = dense_weight if nf4_weight is None else nf4_weight
    n = ctx.needs_input_grad
    needs = GradRequest(n[0], n[1], n[3], n[4], tuple(n[8 : 8 + r]), tuple(n[8 + r :]))
    _, backward = BACKEND_IMPLS[backend]
    with without_autocast(grad_out.device):
        grads = backward(
            grad_out.contiguous(),
            x,
            adapter_x if has_adapter_x else None,
            weight,
            gate_logits if has_gate else None,
            scale,
            factors[:r],
            factors[r:],
            needs,
        )
    return grads.x, grads.adapter_x, None, grads.bias, grads.gate, None, None, None, *grads.a, *grads.b


SECOND_ORDER_ERROR = (
    b"moka_linear has no second derivative: a gradient computed with create_graph=True cannot be "
    b"differentiated again (first-order gradients are exact)"
)


def _refuse_second_order(ctx, grad_out: torch.Tensor, grads: tuple, saved: tuple) -> tuple:
    """The gradients, each made to raise if differentiated again when it depends on anything that requires
    grad. Not ``once_differentiable``: that looks at ``grad_out`` alone, so a loss linear in the output (its
    incoming gradient a constant) got dX, dA, dB and dg back as constants, though they depend on the factors
    and the inputs, and a gradient penalty's second-order term was dropped with no error.

    What each depends on: dX = G (W + ΔW) on G and the adapter (factors, gate), not on x (with a separate
    adapter input, dX = G W on G alone and d(adapter input) = G ΔW on G and the adapter); d bias = Σ_t G_t on
    G alone; dA_i = c_i Σ_t G_t B_i X_tᵀ on G, the adapter's input, the gate and B_i (not A_i), dB_i likewise
    on A_i; dg on G, the adapter's input, the gate and every factor."""
    r, separate, has_gate = ctx.meta[3], ctx.meta[4], ctx.meta[5]  # (absent inputs were saved empty)
    x, adapter_x, gate_logits, _, *factors = saved
    gate = [gate_logits] if has_gate else []
    g, xa = [grad_out], [adapter_x if separate else x]
    groups = [
        ([0], g if separate else g + gate + factors),
        ([1], g + gate + factors),
        ([3], g),
        ([4], g + xa + gate + factors),
        *(([8 + i], g + xa + gate + [factors[r + i]]) for i in range(r)),  # dA_i: B_i's
        *(([8 + r + i], g + xa + gate + [factors[i]]) for i in range(r)),  # dB_i: A_i's
    ]
    out = list(grads)
    for indices, deps in groups:
        indices = [i for i in indices if grads[i] is not None]
        deps = [t for t in deps if t.requires_grad]
        if indices and deps:
            # DelayedError passes its inputs through under a grad_fn that raises; the sources go in too (their
            # outputs dropped) so that the raising node lies on the path from the gradient to each of them.
            guard = torch._C._functions.DelayedError(SECOND_ORDER_ERROR, len(indices) + len(deps))
            guarded = guard(*[grads[i] for i in indices], *deps)
            for i, grad in zip(indices, guarded, strict=False):
                out[i] = grad
    return tuple(out)


def apply_linear(
    x: torch.Tensor,
    adapter_x: torch.Tensor | None,
    weight: torch.Tensor | NF4Tensor,
    bias: torch.Tensor | None,
    gate_logits: torch.Tensor | None,
    scale: float,
    a_factors: list[torch.Tensor],
    b_factors: list[torch.Tensor],
    backend: str,
    use_custom_op: bool | None = None,
) -> torch.Tensor:
    """(T, K) -> (T, N) through :class:`EagerLinear` in eager mode, or the ``moka::linear`` op when tracing.

    ``use_custom_op`` forces one route (tests compare them); ``None`` decides per call.
    """
    if use_custom_op is None:
        use_custom_op = _must_trace(x)
    if use_custom_op:  # (a functorch transform takes this route: refused here, off the eager hot path)
        if torch._C._functorch.peek_interpreter_stack() is not None and not (
            torch.compiler.is_compiling() or torch.compiler.is_exporting()
        ):
            # the op's autograd is register_autograd's, which functorch refuses, and it has no batching rule
            raise NotImplementedError(
                "moka_linear: torch.func transforms (grad, vmap, jacrev, ...) are not supported; differentiate "
                "with torch.autograd (loss.backward() or torch.autograd.grad)"
            )
        return linear(x, adapter_x, *weight_fields(weight), bias, gate_logits, scale, a_factors, b_factors, backend)
    return EagerLinear.apply(
        x, adapter_x, weight, bias, gate_logits, scale, backend, len(a_factors), *a_factors, *b_factors
    )
