"""Shared builders for tests."""

from __future__ import annotations

import torch


def make_problem(
    n_out: int,
    k_in: int,
    shapes: list[tuple[int, int, int, int]],
    dtype: torch.dtype,
    lead: tuple[int, ...] = (7,),
    gate: bool = True,
    bias: bool = True,
    requires_grad: bool = True,
):
    """Random x, W0, factors (all non-zero), gate logits and bias for a layer of shape (n_out, k_in)."""
    x = torch.randn(*lead, k_in, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    weight = (torch.randn(n_out, k_in, dtype=torch.float64) / k_in**0.5).to(dtype)
    a_factors = [
        (torch.randn(a1, a2, dtype=torch.float64) / a2**0.5).to(dtype).requires_grad_(requires_grad)
        for a1, a2, _, _ in shapes
    ]
    b_factors = [
        (torch.randn(b1, b2, dtype=torch.float64) / b2**0.5).to(dtype).requires_grad_(requires_grad)
        for _, _, b1, b2 in shapes
    ]
    gate_logits = (
        torch.randn(len(shapes), dtype=torch.float64).to(dtype).requires_grad_(requires_grad) if gate else None
    )
    b = (torch.randn(n_out, dtype=torch.float64) * 0.1).to(dtype).requires_grad_(requires_grad) if bias else None
    return x, weight, a_factors, b_factors, gate_logits, b


def leaves(x, a_factors, b_factors, gate_logits, bias):
    return [t for t in (x, *a_factors, *b_factors, gate_logits, bias) if t is not None and t.requires_grad]


def grads_of(out: torch.Tensor, tensors, grad_out: torch.Tensor):
    return torch.autograd.grad(out, tensors, grad_out, allow_unused=False)
