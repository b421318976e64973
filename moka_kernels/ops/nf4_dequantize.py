r"""NF4 → dense in one launch: the first half of the NF4 base's large-batch route (dequantize, then cuBLAS).

Math: element (n, k) of W, as in :mod:`moka_kernels.ops.nf4_matmul` (bitsandbytes' packed layout),

.. math::  w_{nk} = \mathrm{NF4}[\mathrm{nibble}(nK + k)] \cdot \mathrm{scale}[(nK + k) / \mathrm{blocksize}]

computed as an fp32 product and then cast to the output dtype, exactly as ``moka_kernels.dequantize_nf4``
(the reference) computes it, so the two agree bit for bit (compiled without FMA contraction: the double-
quantized scale code8[q]·absmax2 + offset is a multiply and an add, each rounded, as in torch).

Why a kernel: at many tokens the NF4 GEMM is compute-bound, and decoding W in the GEMM's inner loop (what
``nf4_matmul`` does, once per M-tile) competes with the tensor cores, while cuBLAS on a dense copy of W
does not; the copy costs one pass over W (read 0.5 + write 2 bytes per element in bf16), which is small
next to a GEMM over thousands of tokens. bitsandbytes' ``matmul_4bit`` does the same for T > 1. The
reference decodes in chunks of torch ops (tens of launches for a LLaMA projection); this is one launch.

Kernel: each program decodes a BLOCK_N × BLOCK_K tile with the GEMM's own ``_decode_nf4_rows`` (each packed
byte read once, a 16-entry table gather, one scale per run of columns) and stores it in the output dtype.
Same constraints as the NF4 GEMMs (``nf4_matmul.supports``): a power-of-two blocksize dividing K and fewer
than 2^31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..nf4 import NF4Tensor
from . import new_output
from .nf4_matmul import _decode_nf4_rows, _nf4_args, supports

__all__ = ["DEQUANTIZE_BLOCK_K", "DEQUANTIZE_BLOCK_N", "DEQUANTIZE_WARPS", "nf4_dequantize"]

# A memory-bound pass: 32 × 256 elements a program (4 KB of packed bytes in, 16 KB of bf16 out), wide
# loads and stores. 8 warps: 80 registers a thread on sm_90 (4 warps take 108-152, a third of the
# occupancy); no autotuning, since nothing but occupancy and launch count is traded.
DEQUANTIZE_BLOCK_N = 32
DEQUANTIZE_BLOCK_K = 256
DEQUANTIZE_WARPS = 8


@triton.jit
def _nf4_dequantize_kernel(
    out_ptr,  # (N, K) dense output, row-major
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    value = _decode_nf4_rows(
        packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, offs_n, k0, N, K,
        BLOCKSIZE, BLOCK_N, BLOCK_K, DOUBLE_QUANT,
    )  # fmt: skip
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], value.to(out_ptr.dtype.element_ty), mask=mask)


def nf4_dequantize(w: NF4Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense (N, K) W in ``dtype`` (default ``w.dtype``), in one launch; bit-exact to ``dequantize_nf4``.

    ``w`` must satisfy ``nf4_matmul.supports``; ``out``, if given, is a contiguous (N, K) tensor of ``dtype``.
    """
    assert supports(w), "nf4_dequantize: blocksize must be a power of two dividing K, and W under 2^31 elements"
    n, k = w.shape
    dtype = dtype or w.dtype
    out = new_output((n, k), dtype, w.device) if out is None else out
    assert out.shape == (n, k) and out.dtype == dtype and out.is_contiguous(), "out: a contiguous (N, K) tensor"
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(n, DEQUANTIZE_BLOCK_N), triton.cdiv(k, DEQUANTIZE_BLOCK_K))
    _nf4_dequantize_kernel[grid](
        out,
        *_nf4_args(w),
        n,
        k,
        BLOCKSIZE=w.blocksize,
        DOUBLE_QUANT=w.double_quant,
        BLOCK_N=DEQUANTIZE_BLOCK_N,
        BLOCK_K=DEQUANTIZE_BLOCK_K,
        num_warps=DEQUANTIZE_WARPS,
        # Bit-exactness: with double quantization the scale is code8[q]·absmax2 + offset, which the
        # compiler would contract to one FMA (one rounding, where torch's mul then add round twice).
        enable_fp_fusion=False,
    )
    return out
