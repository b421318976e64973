"""Triton ops, one per file: each holds its @triton.jit kernels, launch wrappers and docs.

``TRITON_AVAILABLE`` is False when triton cannot be imported; the PyTorch path is used then.
``INTERPRET`` is True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors, for tests).
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    TRITON_AVAILABLE = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests set this: kernel outputs then start as NaN instead of uninitialized, so an unwritten tile fails.
POISON_OUTPUTS = False

__all__ = ["INTERPRET", "POISON_OUTPUTS", "TRITON_AVAILABLE", "new_output"]


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer that every element of which a kernel must write."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
