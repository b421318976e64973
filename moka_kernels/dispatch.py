"""The public functional op: validate once, pick a backend, run it (``moka::linear`` when traced).

Backends: ``triton`` (the fused kernels in :mod:`moka_kernels.ops`, CUDA tensors) and ``torch`` (the
reshape form in :mod:`moka_kernels.reference`, any device). ``auto`` (the default) takes Triton for CUDA
tensors when triton imports (fp64 excepted: the kernels accumulate in fp32), else the PyTorch path. The
environment variable ``MOKA_BACKEND`` (``auto`` | ``torch`` | ``triton``) forces a choice; ``triton`` on CPU
tensors needs ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch

from . import library, reference
from .nf4 import NF4Tensor
from .ops import INTERPRET, TRITON_AVAILABLE

__all__ = [
    "BACKENDS",
    "delta_weight",
    "factor_dtypes_for",
    "factors_taken_as_they_are",
    "is_finite_real",
    "moka_linear",
    "select_backend",
    "validate_moka_inputs",
]

BACKENDS = ("torch", "triton")


def select_backend(x: torch.Tensor) -> str:
    """Backend for ``x``: ``MOKA_BACKEND`` if set to a backend name, else the best available one. fp64 always
    takes the PyTorch path (the kernels accumulate in fp32: an fp64 result of fp32 accuracy would mislead)."""
    requested = os.environ.get("MOKA_BACKEND", "auto").strip().lower() or "auto"
    if requested not in ("auto", *BACKENDS):
        raise ValueError(f"MOKA_BACKEND: expected one of {['auto', *BACKENDS]}, got {requested!r}")
    if x.dtype == torch.float64:
        return "torch"
    if requested == "auto":
        return "triton" if (TRITON_AVAILABLE and x.is_cuda) else "torch"
    if requested == "triton":
        if not TRITON_AVAILABLE:
            raise ValueError("MOKA_BACKEND: 'triton' was asked for, but triton is not installed")
        if not x.is_cuda and not INTERPRET:
            raise ValueError(
                f"MOKA_BACKEND: 'triton' needs CUDA tensors (x is on {x.device}) or TRITON_INTERPRET=1 set before "
                "importing moka_kernels"
            )
    return requested


def _shape(t: torch.Tensor | NF4Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def factor_dtypes_for(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The factor dtypes ``moka_linear`` takes with activations of ``dtype``: the same, or fp32 master
    factors with bf16/fp16 activations (rounded to the activations' dtype inside the op, without a cast
    launch per factor; their gradients come back in fp32)."""
    if dtype in (torch.bfloat16, torch.float16):
        return (dtype, torch.float32)
    return (dtype,)


def validate_moka_inputs(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Tensor,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    gate_logits: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    adapter_input: torch.Tensor | None = None,
) -> None:
    """Raise a ValueError/TypeError naming the offending parameter if the inputs do not fit together."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., K), got a 0-d tensor")
    if isinstance(weight, NF4Tensor):
        if weight.device != x.device:
            raise ValueError(f"weight: expected device {x.device} (the device of x), got {weight.device}")
    elif isinstance(weight, torch.Tensor):
        if weight.dim() != 2:
            raise ValueError(f"weight: expected a 2-D (N, K) tensor, got shape {_shape(weight)}")
        if weight.dtype != x.dtype:
            raise TypeError(f"weight: expected dtype {x.dtype} (the dtype of x), got {weight.dtype}")
        if weight.device != x.device:
            raise ValueError(f"weight: expected device {x.device} (the device of x), got {weight.device}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("weight: expected a frozen base weight (requires_grad=False); MoKA trains only adapters")
    else:
        raise TypeError(f"weight: expected a torch.Tensor or NF4Tensor, got {type(weight).__name__}")
    n_out, k_in = _shape(weight)
    if k_in < 1 or n_out < 1:
        raise ValueError(f"weight: expected N, K >= 1, got shape {(n_out, k_in)}")
    if x.shape[-1] != k_in:
        raise ValueError(f"x: expected last dim K={k_in} (weight is {n_out}x{k_in}), got shape {tuple(x.shape)}")
    validate_factors(a_factors, b_factors, gate_logits, scale, out_in=(n_out, k_in), device=x.device, x_dtype=x.dtype)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n_out,):
            raise ValueError(f"bias: expected shape ({n_out},), got {getattr(bias, 'shape', type(bias).__name__)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias: expected dtype {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")
    if adapter_input is not None:
        if not isinstance(adapter_input, torch.Tensor):
            raise TypeError(f"adapter_input: expected a torch.Tensor like x, got {type(adapter_input).__name__}")
        got = (tuple(adapter_input.shape), adapter_input.dtype, adapter_input.device)
        if got != (tuple(x.shape), x.dtype, x.device):
            raise ValueError(
                f"adapter_input: expected a tensor like x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got "
                f"shape {got[0]}, {got[1]}, {got[2]}"
            )


def validate_factors(
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    gate_logits: torch.Tensor | None,
    scale: float = 1.0,
    *,
    out_in: tuple[int, int] | None = None,
    device: torch.device | None = None,
    x_dtype: torch.dtype | None = None,
) -> None:
    """Raise a ValueError/TypeError naming the offending parameter if the adapter's factors, gate logits and
    scale do not fit together: r ≥ 1 pairs of 2-D tensors of one dtype (one of ``factor_dtypes_for(x_dtype)``
    when given) on ``device``, every kron(A_i, B_i) of shape ``out_in`` (N, K) (by default the first's), r
    gate logits, a finite scale."""
    for name, factors in (("a_factors", a_factors), ("b_factors", b_factors)):
        if isinstance(factors, torch.Tensor) or not hasattr(factors, "__len__"):
            raise TypeError(f"{name}: expected a list of 2-D tensors (one per component), got {type(factors).__name__}")
    if len(a_factors) == 0:
        raise ValueError("a_factors: expected at least one component (r >= 1), got r=0")
    if len(b_factors) != len(a_factors):
        raise ValueError(f"b_factors: expected r={len(a_factors)} factors (one per A), got {len(b_factors)}")
    allowed = factor_dtypes_for(x_dtype) if x_dtype is not None else None
    factor_dtype = getattr(a_factors[0], "dtype", None)
    where = "the device of x" if device is not None else "that of a_factors[0]"
    device = device if device is not None else getattr(a_factors[0], "device", None)
    if allowed is not None and factor_dtype not in allowed:
        factor_dtype = x_dtype  # the first factor is wrong: name it below
    for i, (a, b) in enumerate(zip(a_factors, b_factors, strict=True)):
        for name, f in ((f"a_factors[{i}]", a), (f"b_factors[{i}]", b)):
            if not isinstance(f, torch.Tensor):
                raise TypeError(f"{name}: expected a 2-D torch.Tensor, got {type(f).__name__}")
            if f.dim() != 2:
                raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(f.shape)}")
            if not f.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got dtype {f.dtype}")
            if f.dtype != factor_dtype:
                also = f": {' or '.join(str(d) for d in allowed)} for x of dtype {x_dtype}" if allowed else ""
                raise TypeError(f"{name}: expected dtype {factor_dtype} (factors share one dtype{also}), got {f.dtype}")
            if f.device != device:
                raise ValueError(f"{name}: expected device {device} ({where}), got {f.device}")
        (a1, a2), (b1, b2) = a.shape, b.shape
        if out_in is None:
            out_in = (a1 * b1, a2 * b2)
        n_out, k_in = out_in
        if a1 * b1 != n_out or a2 * b2 != k_in:
            raise ValueError(
                f"a_factors[{i}], b_factors[{i}]: expected a1*b1 == N={n_out} and a2*b2 == K={k_in}, "
                f"got A {a1}x{a2} and B {b1}x{b2} (kron shape {a1 * b1}x{a2 * b2})"
            )
    r = len(a_factors)
    if gate_logits is not None:
        if not isinstance(gate_logits, torch.Tensor) or tuple(gate_logits.shape) != (r,):
            raise ValueError(
                f"gate_logits: expected shape ({r},) (one logit per component), got "
                f"{getattr(gate_logits, 'shape', type(gate_logits).__name__)}"
            )
        if not gate_logits.is_floating_point():
            raise TypeError(f"gate_logits: expected a floating-point tensor, got dtype {gate_logits.dtype}")
        if gate_logits.device != device:
            raise ValueError(f"gate_logits: expected device {device} ({where}), got {gate_logits.device}")
    if not is_finite_real(scale):
        raise ValueError(f"scale: expected a finite real number, got {scale!r}")


def delta_weight(
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    gate_logits: torch.Tensor | None,
    scale: float = 1.0,
) -> torch.Tensor:
    """ΔW = s · Σ_i softmax(g)_i · kron(A_i, B_i), shape (N, K) (uniform 1/r with ``gate_logits=None``): the
    materialized update, for merging (``moka_linear`` never forms it). Factors, gate logits and scale are
    checked as ``moka_linear`` checks them (an error names the parameter); differentiable by autograd."""
    validate_factors(a_factors, b_factors, gate_logits, scale)
    return reference.materialized_delta_weight(a_factors, b_factors, gate_logits, scale)


def is_finite_real(value: object) -> bool:
    """A finite real number (Python or NumPy scalar), not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        return False
    # comparisons, not math.isfinite: torch.compile traces a scale that differs between calls as a SymFloat
    return -math.inf < value < math.inf


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if not torch.amp.is_autocast_available(device_type):  # e.g. meta tensors: nothing to cast
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _cast_for_autocast(t, dtype: torch.dtype):
    # What autocast does to the inputs of F.linear: floating tensors other than fp64 take its dtype.
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def factors_taken_as_they_are(factors: Sequence[torch.Tensor], dtype: torch.dtype) -> bool:
    """Whether ``moka_linear`` takes these factors uncast with activations of ``dtype``: all of one dtype,
    one of :func:`factor_dtypes_for`. Callers that would otherwise cast (a module, autocast) cast all of
    them when this is False, so a mix of fp32 and bf16 factors is never half cast."""
    if not factors:
        raise ValueError("factors: expected at least one factor tensor, got none")
    first = factors[0].dtype
    return first in factor_dtypes_for(dtype) and all(f.dtype == first for f in factors)


def _factors_for_autocast(a_factors, b_factors, dtype: torch.dtype) -> tuple[list, list]:
    # fp32 factors stay fp32 (rounded to the autocast dtype inside the op): no cast launches
    if all(isinstance(f, torch.Tensor) for f in (*a_factors, *b_factors)) and factors_taken_as_they_are(
        [*a_factors, *b_factors], dtype
    ):
        return list(a_factors), list(b_factors)
    return [_cast_for_autocast(a, dtype) for a in a_factors], [_cast_for_autocast(b, dtype) for b in b_factors]


def moka_linear(
    x: torch.Tensor,
    weight: torch.Tensor | NF4Tensor,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    gate_logits: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    adapter_input: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""A linear layer with a frozen base and a gated mixture of Kronecker adapters.

    .. math::

        y = x W_0^T + b + s \sum_{i=1}^{r} \mathrm{softmax}(g)_i \, (A_i \otimes B_i)\, x_a

    ΔW = s Σ α_i (A_i ⊗ B_i) is never formed: per token, (A ⊗ B) x = (A · x.view(a2, b2) · Bᵀ).flatten().

    Args:
        x: (..., K) input, any leading dims (zero tokens allowed), floating point.
        weight: frozen base W0, a dense (N, K) tensor of x's dtype or an :class:`NF4Tensor`.
        a_factors: r tensors A_i of shape (a1_i, a2_i) on x's device, all of one dtype: x's, or fp32 when
            x is bf16/fp16 (fp32 master factors: rounded to x's dtype inside the op, as a cast would round
            them, but without a cast launch per factor; their gradients come back in fp32).
        b_factors: r tensors B_i of shape (b1_i, b2_i) with a1_i·b1_i = N and a2_i·b2_i = K, A's dtype.
        gate_logits: (r,) logits g, or None for the gate-off ablation (α_i = 1/r, fixed).
        bias: optional (N,) bias.
        scale: the fixed scale s.
        adapter_input: optional x_a (same shape as x) fed to the adapter only, e.g. dropout(x);
            defaults to x.

    Returns:
        (..., N) output in x's dtype. Differentiable w.r.t. x, adapter_input, every A_i and B_i,
        gate_logits and bias; the base weight gets no gradient.

    Under ``torch.autocast`` the op runs as ``F.linear`` does there: x, the dense weight, the factors,
    the bias and adapter_input are cast to the autocast dtype (fp64 excepted; fp32 factors are left to the
    op, which rounds them the same way), and so is the output.
    """
    # (fp64 x is left alone by autocast, as F.linear leaves it; so are its other inputs then, which must match)
    autocast = isinstance(x, torch.Tensor) and x.dtype != torch.float64
    if autocast and (dtype := _autocast_dtype(x.device.type)) is not None:
        with torch.autocast(x.device.type, enabled=False):
            return moka_linear(
                _cast_for_autocast(x, dtype),
                _cast_for_autocast(weight, dtype),
                *_factors_for_autocast(a_factors, b_factors, dtype),
                gate_logits,
                _cast_for_autocast(bias, dtype),
                scale,
                _cast_for_autocast(adapter_input, dtype),
            )
    validate_moka_inputs(x, weight, a_factors, b_factors, gate_logits, bias, scale, adapter_input)
    n_out, k_in = _shape(weight)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k_in)
    adapter_x2d = None if adapter_input is None else adapter_input.reshape(-1, k_in)
    # The kernels read the bias and the logits as contiguous vectors (a view such as gates[:, layer] is not).
    bias = None if bias is None else bias.contiguous()
    gate_logits = None if gate_logits is None else gate_logits.contiguous()
    out = library.apply_linear(
        x2d, adapter_x2d, weight, bias, gate_logits, float(scale), list(a_factors), list(b_factors), select_backend(x)
    )
    return out.reshape(*lead, n_out)
