"""Triton ops, one per file: each holds its @triton.jit kernels, launch wrappers and docs.

``TRITON_AVAILABLE`` is False when triton cannot be imported; the PyTorch path is used then.
``INTERPRET`` is True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors, for tests).
"""

from __future__ import annotations

import functools
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

__all__ = ["INTERPRET", "POISON_OUTPUTS", "TRITON_AVAILABLE", "dot_in_fp32", "multiprocessors", "new_output"]


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether kernels take their ``DOT_FP32`` branch: an IEEE fp32 ``tl.dot`` for fp32 inputs (torch's
    default precision, not TF32) and, under the interpreter, for half types (its bf16 dot is wrong)."""
    return dtype == torch.float32 or (INTERPRET and dtype in (torch.bfloat16, torch.float16))


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer that every element of which a kernel must write."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def multiprocessors(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device (of the current one when ``device`` has no index):
    the split-K and token-split launchers size their grids to fill them."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessors(index)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
