r"""Plain-PyTorch MoKA: the materialized form (tests only) and the reshape form (the CPU path).

Notation (docs/design.md has the derivations). A layer with frozen W0 of shape (N, K) and r components
A_i: (a1_i, a2_i), B_i: (b1_i, b2_i), a1_i·b1_i = N, a2_i·b2_i = K, gate logits g (r,), scale s:

.. math::

    y = x W_0^T + b + s \sum_i \alpha_i (A_i \otimes B_i) x, \qquad \alpha = \mathrm{softmax}(g)

Per token, with X = x.view(a2, b2) (row-major), ``(A ⊗ B) x == (A X Bᵀ).flatten()``.
Two contraction orders, per token:

* ``b_first``: U = X Bᵀ (a2×b1), then Y = A U — a2·b1·(b2 + a1) MACs;
* ``a_first``: V = A X (a1×b2), then Y = V Bᵀ — a1·b2·(a2 + b1) MACs.

Backward, with G = dy.view(a1, b1) per token and c_i = s·α_i:

* dX_i = c_i · Aᵀ G B
* dA_i = c_i · Σ_t G_t B X_tᵀ      (= c_i · M_i)
* dB_i = c_i · Σ_t G_tᵀ A X_t      (= c_i · R_i)
* dα_i = s · Σ_t ⟨G_t, A X_t Bᵀ⟩ = s · ⟨A_i, M_i⟩ = s · ⟨B_i, R_i⟩
* dg = α ⊙ (dα − ⟨α, dα⟩)           (softmax backward)

Backward follows each component's cheaper order, so its intermediates are the small ones:

* ``a_first``: Q = G B, dX = Aᵀ Q, M = Σ_t Q_t X_tᵀ, V = A X (recomputed), R = Σ_t G_tᵀ V_t;
* ``b_first``: P = Aᵀ G, dX = P B, R = Σ_t P_tᵀ X_t, U = X Bᵀ (recomputed), M = Σ_t G_t U_tᵀ;

about 2.5× the forward's MACs. Right-multiplications are one GEMM over all T·rows; left-multiplications
are one batched GEMM with the factor broadcast; the token reductions R are one GEMM over (t, row) pairs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .nf4 import NF4Tensor, dequantize_nf4

__all__ = [
    "GradRequest",
    "MoKAGrads",
    "contraction_order",
    "factor_requests",
    "finish_factor_grads",
    "gate_weights",
    "in_compute_dtype",
    "kron_component",
    "materialized_delta_weight",
    "moka_backward_torch",
    "moka_forward_torch",
    "moka_linear_materialized",
    "softmax_gate_backward",
    "split_factor_grads",
]


def gate_weights(
    gate_logits: torch.Tensor | None,
    num_components: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """α = softmax(g), or the fixed uniform 1/r when the gate is off (``gate_logits is None``).

    Computed in ``dtype`` promoted to at least fp32 (and to the logits' dtype), never in half precision;
    on the logits' device (``device`` is used when the gate is off: default torch's default device, the CPU
    unless set otherwise).
    """
    if num_components < 1:
        raise ValueError(f"num_components: expected an integer >= 1, got {num_components!r}")
    dtype = torch.promote_types(dtype, torch.float32)
    if gate_logits is None:
        return torch.full((num_components,), 1.0 / num_components, dtype=dtype, device=device)
    return torch.softmax(gate_logits.to(torch.promote_types(gate_logits.dtype, dtype)), dim=0)


def contraction_order(a_shape: Sequence[int], b_shape: Sequence[int]) -> str:
    """The cheaper per-token order for A X Bᵀ: ``"b_first"`` (X Bᵀ first) or ``"a_first"`` (A X first)."""
    (a1, a2), (b1, b2) = a_shape, b_shape
    return "b_first" if a2 * b1 * (b2 + a1) <= a1 * b2 * (a2 + b1) else "a_first"


def _left(m: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
    """(T, p, q) -> (T, m, q): M @ X_t for every token, one batched GEMM with M broadcast (stride 0).

    Not ``torch.matmul(m, x3)``: that folds into one GEMM over transposed copies of x3 and of the result.
    """
    return torch.bmm(m.expand(x3.shape[0], *m.shape), x3)


def _token_sum_outer(p3: torch.Tensor, q3: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_t P_t Q_tᵀ for P (T, m, k) and Q (T, n, k) -> (m, n), into ``out`` if given.

    A batched GEMM reading Q transposed in place, then a sum over tokens; ``tensordot`` would copy both
    operands into (m, T·k) / (T·k, n) layouts first, and the copy of the x-sized operand costs more.
    """
    return torch.sum(torch.bmm(p3, q3.transpose(1, 2)), 0, out=out)


def kron_component(x2d: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(A ⊗ B) x for every row of ``x2d`` (T, a2·b2) -> (T, a1·b1), without forming A ⊗ B.

    Differentiable by autograd when its inputs require grad (out-of-place ops then; in-place otherwise).
    """
    num_tokens = x2d.shape[0]
    (a1, a2), (b1, b2) = a.shape, b.shape
    if torch.is_grad_enabled() and (x2d.requires_grad or a.requires_grad or b.requires_grad):
        x3 = x2d.reshape(num_tokens, a2, b2)
        y3 = _left(a, x3 @ b.T) if contraction_order(a.shape, b.shape) == "b_first" else _left(a, x3) @ b.T
        return y3.reshape(num_tokens, a1 * b1)
    out = x2d.new_zeros(num_tokens, a1 * b1)
    _accumulate_kron(out, x2d, a, b)
    return out


def _accumulate_kron(out: torch.Tensor, x2d: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += (A ⊗ B) x per row, in place: the last GEMM accumulates into ``out`` (no T × N temporary)."""
    num_tokens = x2d.shape[0]
    (a1, a2), (b1, b2) = a.shape, b.shape
    x3 = x2d.reshape(num_tokens, a2, b2)
    if contraction_order(a.shape, b.shape) == "b_first":  # U = X·Bᵀ, then out_t += A·U_t
        out3 = out.view(num_tokens, a1, b1)
        torch.baddbmm(out3, a.expand(num_tokens, a1, a2), x3 @ b.T, out=out3)
    else:  # V = A·X, then out_t += V_t·Bᵀ as one GEMM over T·a1 rows
        out.view(num_tokens * a1, b1).addmm_(_left(a, x3).reshape(num_tokens * a1, b2), b.T)


def materialized_delta_weight(
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    gate_logits: torch.Tensor | None,
    scale: float = 1.0,
) -> torch.Tensor:
    """ΔW = s · Σ_i α_i · kron(A_i, B_i), shape (N, K). For tests and merging only."""
    alpha = gate_weights(gate_logits, len(a_factors), a_factors[0].device, a_factors[0].dtype)
    # .contiguous(): torch.kron raises on a column-major first operand (a view error inside kron)
    terms = (
        alpha[i].to(a.dtype) * torch.kron(a.contiguous(), b.contiguous())
        for i, (a, b) in enumerate(zip(a_factors, b_factors, strict=True))
    )
    delta = functools.reduce(torch.add, terms)  # not sum(): its 0 + first term is one more N × K pass
    return delta if scale == 1.0 else delta * scale


def _dense_weight(weight: torch.Tensor | NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_nf4(weight, dtype) if isinstance(weight, NF4Tensor) else weight.to(dtype)


def moka_linear_materialized(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Tensor,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    gate_logits: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """The obviously-right form: F.linear(x, W0 + ΔW, bias), with ΔW from torch.kron. Tests only."""
    delta = materialized_delta_weight(a_factors, b_factors, gate_logits, scale)
    return F.linear(x, _dense_weight(weight, x.dtype).detach() + delta.to(x.dtype), bias)


class GradRequest(NamedTuple):
    """Which gradients a backward must produce (False: skip the work, return None)."""

    x: bool
    adapter_x: bool  # only meaningful when the adapter input is a distinct tensor
    bias: bool
    gate: bool
    a: tuple[bool, ...]
    b: tuple[bool, ...]


class MoKAGrads(NamedTuple):
    x: torch.Tensor | None
    adapter_x: torch.Tensor | None
    bias: torch.Tensor | None
    gate: torch.Tensor | None
    a: list[torch.Tensor | None]
    b: list[torch.Tensor | None]


def softmax_gate_backward(alpha: torch.Tensor, grad_alpha: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dg = α ⊙ (dα − ⟨α, dα⟩), the softmax backward, cast to the logits' dtype."""
    return (alpha * (grad_alpha - (alpha * grad_alpha).sum())).to(dtype)


def factor_requests(needs: GradRequest, r: int) -> list[tuple[int, str]]:
    """Which raw factor gradients a backward computes, in order: with the gate, first one per component
    (M_i if dA_i is needed anyway or nothing else is, else R_i; dα_i = s⟨A_i, M_i⟩ = s⟨B_i, R_i⟩), then
    the others the factors' gradients need. ``(i, "a")`` is M_i (a1×a2), ``(i, "b")`` is R_i (b1×b2)."""
    requests: list[tuple[int, str]] = []
    if needs.gate:
        requests = [(i, "a" if needs.a[i] or not needs.b[i] else "b") for i in range(r)]
    for i in range(r):
        for which, wanted in (("a", needs.a[i]), ("b", needs.b[i])):
            if wanted and (i, which) not in requests:
                requests.append((i, which))
    return requests


@functools.lru_cache(maxsize=4096)
def _segment_owner(owners: tuple[int, ...], sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """For each element of a flat buffer of segments, the component it belongs to (cached per layout)."""
    return torch.repeat_interleave(torch.tensor(owners), torch.tensor(sizes)).to(device)


@functools.lru_cache(maxsize=4096)
def _segment_lengths(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(sizes, device=device)


def split_factor_grads(
    grads_flat: torch.Tensor,
    requests: Sequence[tuple[int, str]],
    needs: GradRequest,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """The factor gradients as views of ``grads_flat`` (the requests' gradients one after another, each in
    its factor's layout); None where not asked for (requests only the gate needed)."""
    grad_a: list[torch.Tensor | None] = [None] * len(a_factors)
    grad_b: list[torch.Tensor | None] = [None] * len(b_factors)
    offset = grads_flat.storage_offset()
    for i, which in requests:
        rows, cols = (a_factors if which == "a" else b_factors)[i].shape
        if (needs.a if which == "a" else needs.b)[i]:
            # one as_strided per gradient: half the host time of split + view (these run every step)
            (grad_a if which == "a" else grad_b)[i] = grads_flat.as_strided((rows, cols), (cols, 1), offset)
        offset += rows * cols
    assert offset == grads_flat.storage_offset() + grads_flat.numel(), "requests do not cover the buffer"
    return grad_a, grad_b


def finish_factor_grads(
    raw_flat: torch.Tensor,
    requests: Sequence[tuple[int, str]],
    needs: GradRequest,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    alpha: torch.Tensor,
    scale: float,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], torch.Tensor]:
    """dA_i = c_i·M_i, dB_i = c_i·R_i and dα_i = s⟨factor_i, raw_i⟩ from the raw gradients of ``requests``,
    laid out one after another in ``raw_flat`` (each in its factor's shape), as a few whole-buffer ops
    rather than a few per component. The factor gradients are views of one buffer."""
    if not requests:
        return [None] * len(a_factors), [None] * len(b_factors), torch.zeros_like(alpha)
    factors = [(a_factors if which == "a" else b_factors)[i] for i, which in requests]
    sizes = tuple(f.numel() for f in factors)
    owner = _segment_owner(tuple(i for i, _ in requests), sizes, raw_flat.device)
    grads_flat = (raw_flat * coeffs.to(raw_flat.dtype)[owner]).to(a_factors[0].dtype)
    grad_a, grad_b = split_factor_grads(grads_flat, requests, needs, a_factors, b_factors)
    if not needs.gate:
        return grad_a, grad_b, torch.zeros_like(alpha)
    r = len(a_factors)
    gate_part = raw_flat[: sum(sizes[:r])].to(alpha.dtype) * torch.cat([f.reshape(-1) for f in factors[:r]])
    dots = torch.segment_reduce(gate_part, "sum", lengths=_segment_lengths(sizes[:r], raw_flat.device))
    return grad_a, grad_b, scale * dots.to(alpha.dtype)


def in_compute_dtype(factors: Sequence[torch.Tensor], dtype: torch.dtype) -> Sequence[torch.Tensor]:
    """The factors as the contractions use them: in the activations' dtype (fp32 factors of a half-precision
    layer are rounded to it, as the Triton path rounds them into its per-layer copies)."""
    if not factors or factors[0].dtype == dtype:
        return factors
    return [f.to(dtype) for f in factors]


def _times(factor: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """c_i · factor in the factor's dtype, c_i (a 0-dim fp32 tensor) not rounded first: in fp16 a c_i below its
    normal range would lose its digits or become 0, though the product is representable (CPU kernels read a
    0-dim operand in fp32, CUDA ones may cast it to the factor's dtype first: widened here on both). bf16 has
    fp32's range."""
    if factor.dtype == torch.float16:
        return (factor.float() * coeff).to(torch.float16)
    return factor * coeff


def moka_forward_torch(
    x2d: torch.Tensor,
    adapter_x2d: torch.Tensor | None,
    weight: torch.Tensor | NF4Tensor,
    bias: torch.Tensor | None,
    gate_logits: torch.Tensor | None,
    scale: float,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Forward of the reshape form, (T, K) -> (T, N). No autograd inside."""
    xa = x2d if adapter_x2d is None else adapter_x2d
    alpha = gate_weights(gate_logits, len(a_factors), x2d.device, x2d.dtype)
    coeffs = alpha * scale  # fp32 at least; folded by _times
    out = F.linear(x2d, _dense_weight(weight, x2d.dtype), bias)
    a_factors, b_factors = in_compute_dtype(a_factors, x2d.dtype), in_compute_dtype(b_factors, x2d.dtype)
    for i, (a, b) in enumerate(zip(a_factors, b_factors, strict=True)):
        _accumulate_kron(out, xa, _times(a, coeffs[i]), b)  # c_i folded into the small factor
    return out


def _to_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float()


def _unchanged(t: torch.Tensor) -> torch.Tensor:
    return t


def moka_backward_torch(
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
    """Hand-written backward of the reshape form (formulas in the module docstring). The factors' gradients
    come out in the factors' dtype; fp32 factors of a half-precision layer get fp32 sums, unrounded."""
    r = len(a_factors)
    param_a, param_b = a_factors, b_factors
    a_factors, b_factors = in_compute_dtype(a_factors, x2d.dtype), in_compute_dtype(b_factors, x2d.dtype)
    separate = adapter_x2d is not None
    need_adapter_x = needs.adapter_x if separate else needs.x
    xa = adapter_x2d if separate else x2d
    num_tokens = x2d.shape[0]
    alpha = gate_weights(gate_logits, r, x2d.device, x2d.dtype)
    coeffs = alpha * scale  # fp32 at least: the finishing scale of raw sums, and folded as in the forward

    grad_x = grad_out @ _dense_weight(weight, grad_out.dtype) if needs.x else None
    # Not zeros_like: that keeps a transposed adapter input's strides, and the per-component views need rows.
    grad_xa = xa.new_zeros(xa.shape) if (need_adapter_x and separate) else None
    # Raw factor gradients go straight into one flat buffer (out=), in factor_requests' order, so their
    # scaling and dα are whole-buffer ops (finish_factor_grads: the reference of the Triton backend's
    # finishing kernel, kron_factor_backward).
    requests = factor_requests(needs, r)
    sizes = [(a_factors if w == "a" else b_factors)[i].numel() for i, w in requests]
    # The raw sums run 1/c_i (≈ r/s) times larger than the gradients: in fp16 that overflows long before the
    # gradients would, so fp16 sums them in fp32 (as the Triton backend's partial sums always are).
    # fp32 factors of a bf16 layer are summed in fp32 too: their gradients are fp32, so no rounding to bf16.
    widen = grad_out.dtype == torch.float16 or (grad_out.dtype == torch.bfloat16 and param_a[0].dtype == torch.float32)
    raw_flat = grad_out.new_empty(sum(sizes), dtype=torch.float32 if widen else grad_out.dtype)
    slots = dict(zip(requests, raw_flat.split(sizes), strict=True))
    raw = _to_fp32 if widen else _unchanged  # not t.to(dtype): ~1 µs a call even when it returns t
    grad_out_raw, xa_raw = (raw(grad_out), raw(xa)) if requests else (grad_out, xa)

    for i, (a, b) in enumerate(zip(a_factors, b_factors, strict=True)):
        (a1, a2), (b1, b2) = a.shape, b.shape
        m_slot, r_slot = slots.get((i, "a")), slots.get((i, "b"))
        g3 = grad_out.reshape(num_tokens, a1, b1)
        g3_raw, x3_raw = grad_out_raw.reshape(num_tokens, a1, b1), xa_raw.reshape(num_tokens, a2, b2)
        # Follow the component's cheaper contraction order, so every intermediate is the small one.
        if contraction_order(a.shape, b.shape) == "a_first":
            # Q = G·B and V = A·X are (T, a1, b2).
            q = g3 @ b if (m_slot is not None or need_adapter_x) else None
            if need_adapter_x:
                dx_target3 = (grad_xa if separate else grad_x).view(num_tokens, a2, b2)
                torch.baddbmm(dx_target3, _times(a.T, coeffs[i]).expand(num_tokens, a2, a1), q, out=dx_target3)
            if m_slot is not None:
                _token_sum_outer(raw(q), x3_raw, out=m_slot.view(a1, a2))  # Σ_t Q_t X_tᵀ
            del q
            if r_slot is not None:  # Σ_t G_tᵀ V_t, one GEMM over (t, a1)
                v3 = _left(raw(a), x3_raw).reshape(-1, b2)
                torch.mm(g3_raw.reshape(-1, b1).T, v3, out=r_slot.view(b1, b2))
                del v3  # not held into the next component (its temporaries would stack on it)
        else:
            # P = Aᵀ·G and U = X·Bᵀ are (T, a2, b1).
            p = _left(a.T, g3) if (r_slot is not None or need_adapter_x) else None
            if need_adapter_x:
                dx_target = (grad_xa if separate else grad_x).view(num_tokens * a2, b2)
                dx_target.addmm_(p.reshape(num_tokens * a2, b1), _times(b, coeffs[i]))
            if r_slot is not None:  # Σ_t P_tᵀ X_t, one GEMM over (t, a2)
                torch.mm(raw(p).reshape(-1, b1).T, x3_raw.reshape(-1, b2), out=r_slot.view(b1, b2))
            del p
            if m_slot is not None:
                _token_sum_outer(g3_raw, x3_raw @ raw(b).T, out=m_slot.view(a1, a2))  # Σ_t G_t U_tᵀ

    grad_a, grad_b, grad_alpha = finish_factor_grads(raw_flat, requests, needs, param_a, param_b, coeffs, alpha, scale)
    grad_gate = softmax_gate_backward(alpha, grad_alpha, gate_logits.dtype) if needs.gate else None
    grad_bias = grad_out.sum(0) if needs.bias else None
    return MoKAGrads(grad_x, grad_xa, grad_bias, grad_gate, grad_a, grad_b)
