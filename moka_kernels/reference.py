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

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .nf4 import NF4Tensor, dequantize_nf4

__all__ = [
    "GradRequest",
    "MoKAGrads",
    "contraction_order",
    "gate_weights",
    "kron_component",
    "materialized_delta_weight",
    "moka_backward_torch",
    "moka_forward_torch",
    "moka_linear_materialized",
]


def gate_weights(
    gate_logits: torch.Tensor | None,
    num_components: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """α = softmax(g), or the fixed uniform 1/r when the gate is off (``gate_logits is None``).

    Computed in ``dtype`` promoted to at least fp32 (and to the logits' dtype), never in half precision.
    """
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


def _token_sum_outer(p3: torch.Tensor, q3: torch.Tensor) -> torch.Tensor:
    """Σ_t P_t Q_tᵀ for P (T, m, k) and Q (T, n, k) -> (m, n).

    A batched GEMM reading Q transposed in place, then a sum over tokens; ``tensordot`` would copy both
    operands into (m, T·k) / (T·k, n) layouts first, and the copy of the x-sized operand costs more.
    """
    return torch.bmm(p3, q3.transpose(1, 2)).sum(0)


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
    delta = sum(
        alpha[i].to(a.dtype) * torch.kron(a, b) for i, (a, b) in enumerate(zip(a_factors, b_factors, strict=True))
    )
    return delta * scale


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
    coeffs = (alpha * scale).to(x2d.dtype)
    out = F.linear(x2d, _dense_weight(weight, x2d.dtype), bias)
    for i, (a, b) in enumerate(zip(a_factors, b_factors, strict=True)):
        _accumulate_kron(out, xa, a * coeffs[i], b)  # c_i folded into the small factor
    return out


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
    """Hand-written backward of the reshape form (formulas in the module docstring)."""
    r = len(a_factors)
    separate = adapter_x2d is not None
    need_adapter_x = needs.adapter_x if separate else needs.x
    xa = adapter_x2d if separate else x2d
    num_tokens = x2d.shape[0]
    alpha = gate_weights(gate_logits, r, x2d.device, x2d.dtype)
    coeffs = (alpha * scale).to(grad_out.dtype)

    grad_x = grad_out @ _dense_weight(weight, grad_out.dtype) if needs.x else None
    grad_xa = torch.zeros_like(xa) if (need_adapter_x and separate) else None
    grad_alpha = torch.zeros_like(alpha)
    grad_a: list[torch.Tensor | None] = [None] * r
    grad_b: list[torch.Tensor | None] = [None] * r

    for i, (a, b) in enumerate(zip(a_factors, b_factors, strict=True)):
        (a1, a2), (b1, b2) = a.shape, b.shape
        need_a, need_b = needs.a[i], needs.b[i]
        g3 = grad_out.reshape(num_tokens, a1, b1)
        x3 = xa.reshape(num_tokens, a2, b2)
        # Follow the component's cheaper contraction order, so every intermediate is the small one.
        m_raw = r_raw = None
        if contraction_order(a.shape, b.shape) == "a_first":
            # Q = G·B and V = A·X are (T, a1, b2).
            q = g3 @ b if (need_a or need_adapter_x or (needs.gate and not need_b)) else None
            if need_adapter_x:
                dx_target3 = (grad_xa if separate else grad_x).view(num_tokens, a2, b2)
                torch.baddbmm(dx_target3, (a.T * coeffs[i]).expand(num_tokens, a2, a1), q, out=dx_target3)
            if q is not None and (need_a or needs.gate):
                m_raw = _token_sum_outer(q, x3)  # Σ_t Q_t X_tᵀ
            if need_b:
                v = _left(a, x3)
                r_raw = g3.reshape(-1, b1).T @ v.reshape(-1, b2)  # Σ_t G_tᵀ V_t, one GEMM over (t, a1)
        else:
            # P = Aᵀ·G and U = X·Bᵀ are (T, a2, b1).
            p = _left(a.T, g3) if (need_b or need_adapter_x or (needs.gate and not need_a)) else None
            if need_adapter_x:
                dx_target = (grad_xa if separate else grad_x).view(num_tokens * a2, b2)
                dx_target.addmm_(p.reshape(num_tokens * a2, b1), b * coeffs[i])
            if p is not None and (need_b or needs.gate):
                r_raw = p.reshape(-1, b1).T @ x3.reshape(-1, b2)  # Σ_t P_tᵀ X_t, one GEMM over (t, a2)
            if need_a:
                u = x3 @ b.T
                m_raw = _token_sum_outer(g3, u)  # Σ_t G_t U_tᵀ
        if needs.gate:
            factor, raw = (a, m_raw) if m_raw is not None else (b, r_raw)
            grad_alpha[i] = scale * (factor.to(alpha.dtype) * raw.to(alpha.dtype)).sum()
        if need_a:
            grad_a[i] = m_raw * coeffs[i]
        if need_b:
            grad_b[i] = r_raw * coeffs[i]

    grad_gate = softmax_gate_backward(alpha, grad_alpha, gate_logits.dtype) if needs.gate else None
    grad_bias = grad_out.sum(0) if needs.bias else None
    return MoKAGrads(grad_x, grad_xa, grad_bias, grad_gate, grad_a, grad_b)
