r"""NF4 dequant-GEMMs over bitsandbytes' packed layout: y = x·dequant(W)ᵀ and dx = dy·dequant(W).

Math. W (N × K) is stored row-major in 4-bit codes, two per byte (even flat index in the high nibble),
with one scale per ``blocksize`` flat elements (see moka_kernels/nf4.py). Element (n, k):

.. math::

    f = nK + k, \quad w_{nk} = \mathrm{NF4}[(\mathrm{byte}[f/2] \gg 4(1 - f \bmod 2)) \,\&\, 15]
                              \cdot \mathrm{scale}[f / \mathrm{blocksize}]

    \mathrm{scale}[b] = \mathrm{absmax}[b]
        \quad\text{or}\quad \mathrm{code}_8[\mathrm{absmax}[b]] \cdot \mathrm{absmax}_2[b / 256] + \mathrm{offset}

Kernels.

* ``_nf4_matmul_kernel``: out[M, N] = x[M, K] · Wᵀ (+ add[M, N]) (+ bias). Each program owns a
  BLOCK_M × BLOCK_N output tile in fp32 registers and walks K in BLOCK_K steps: the x tile and the packed
  bytes of the W tile are loaded, the W tile is decoded in registers (a 16-entry table gather, not a select
  tree) to x's dtype, and fed to ``tl.dot``. ``add`` (the adapter output) and bias join in the epilogue.
  For few tokens (decoding), the launcher splits K across SPLIT_K programs that ``atomic_add`` into an fp32
  buffer, so the GPU is filled although M is tiny. With ``HAS_ADAPTER`` the grid has extra K-slices whose
  programs run the MoKA adapter's atomic schedule (``kron_mixture.grouped_sandwich_program``) into the same
  buffer: base and adapter in one launch.
* ``_nf4_matmul_t_kernel``: dx[M, K] = dy[M, N] · W, reading the same bytes (no transposed copy). Each
  program owns a BLOCK_M × BLOCK_K tile of dx and walks N.

Both need K % blocksize == 0 (every LLaMA shape; whole bytes per row and one scale per run of columns);
:func:`supports` tells, and the fused op falls back to dequantize + GEMM otherwise.
Both decode what ``dequantize_nf4`` returns (fp32 product, then cast), so they match the reference up to
the GEMM's summation order and, with double quantization, FMA contraction of the scale decode on a GPU
(1 ulp of some scales; ``nf4_dequantize``, which promises bit-exactness, is compiled without it).
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from ..nf4 import NESTED_BLOCKSIZE, NF4_CODE, NF4Tensor, cached_table
from . import INTERPRET, dot_in_fp32, multiprocessors, new_output
from .kron_mixture import AdapterLaunch, grouped_sandwich_program

__all__ = [
    "DEQUANTIZE_MIN_TOKENS",
    "NF4_MATMUL_CONFIGS",
    "NF4_MATMUL_T_CONFIGS",
    "NF4_ROUTES",
    "nf4_matmul",
    "nf4_matmul_accumulate",
    "nf4_matmul_t",
    "nf4_route",
    "split_k_for",
    "supports",
]


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


# GPU configs: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Under the interpreter one small config, so tests
# cross tile edges on small shapes (the interpreter cannot autotune several configs without a GPU).
# The W tile is decoded in registers, so large tiles spill (ptxas on sm_90, specialized as launched at 4096²:
# 128×256×64 232 B, 256×128×64 228 B; benchmarks/results/registers.md); the lists keep them for autotuning to
# time, beside spill-free tiles for every token
# count (python -m benchmarks.registers writes each config's registers and spills).
NF4_MATMUL_CONFIGS = (
    _configs([(32, 32, 32, 4, 1)])
    if INTERPRET
    else _configs(
        [
            (16, 64, 128, 4, 4),
            (16, 128, 128, 4, 3),
            (64, 128, 64, 4, 4),
            (64, 128, 64, 8, 3),
            (128, 64, 64, 8, 3),
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3),
        ]
    )
)
NF4_MATMUL_T_CONFIGS = (
    NF4_MATMUL_CONFIGS
    if INTERPRET
    else _configs(
        [
            (16, 64, 128, 4, 4),
            (16, 128, 128, 4, 3),
            (64, 128, 64, 4, 4),
            (64, 128, 64, 8, 3),
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 2),
            (256, 128, 64, 8, 3),
        ]
    )
)


NF4_AUTOTUNE = os.environ.get("MOKA_NF4_AUTOTUNE", "all")
if NF4_AUTOTUNE not in ("all", "quick"):
    raise ValueError(f"MOKA_NF4_AUTOTUNE: expected 'all' or 'quick', got {NF4_AUTOTUNE!r}")
# What the autotuners time. "quick", for correctness runs on a GPU (the GPU suite's tests), never for timing:
# two configs per GEMM, the small-T 16×64×128 and the 128×128×64 tile, not every config compiled and timed
# for each new shape. (The AOT check compiles the full lists above whatever this says.)
TUNED_CONFIGS, TUNED_T_CONFIGS = NF4_MATMUL_CONFIGS, NF4_MATMUL_T_CONFIGS
if NF4_AUTOTUNE == "quick" and not INTERPRET:
    TUNED_CONFIGS = (NF4_MATMUL_CONFIGS[0], NF4_MATMUL_CONFIGS[5])
    TUNED_T_CONFIGS = (NF4_MATMUL_T_CONFIGS[0], NF4_MATMUL_T_CONFIGS[4])


def configs_for_token_count(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The autotuners' early prune: tiles that cannot win at this token count are neither compiled nor timed
    (about half the list at each end): no BLOCK_M ≥ 128 for a decode-size M ≤ 16 (≥ 7/8 of each tile masked
    rows), no BLOCK_M = 16 from M ≥ 256 on (16+ M-tiles, each decoding all of W again). Never empty."""
    m_bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET"))
    if m_bucket is None:
        return configs
    if m_bucket <= 16:
        kept = [c for c in configs if c.kwargs["BLOCK_M"] < 128]
    elif m_bucket >= 256:
        kept = [c for c in configs if c.kwargs["BLOCK_M"] > 16]
    else:
        kept = configs
    return kept or configs


PRUNE_BY_TOKEN_COUNT = {"early_config_prune": configs_for_token_count}


def _m_bucket(m: int) -> int:
    """Autotune key: token counts in power-of-two buckets, so each decode/prefill size tunes once."""
    return 1 << max(m - 1, 0).bit_length()


@triton.jit
def _load_block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, mask, DOUBLE_QUANT):
    """fp32 scales of the given absmax blocks, undoing double quantization as bitsandbytes does."""
    if DOUBLE_QUANT:
        scale_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0)
        # masked blocks would read code[0]·0 + offset, not 0: zero them so tiles past W decode to 0
        return tl.where(mask, tl.load(nested_code_ptr + scale_code) * nested + tl.load(offset_ptr), 0.0)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _decode_nf4_rows(
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    offs_n,  # (BLOCK_N,) int32 row indices of W
    k0,  # first column of the tile
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):
    """The fp32 tile W[offs_n, k0 : k0 + BLOCK_K], shape (BLOCK_N, BLOCK_K); zero outside W."""
    # Load each byte once, split it into (high, low) nibbles and interleave: element 2j is the high one.
    # 32-bit indices (supports() keeps W under 2^31 elements): int64 index tiles cost registers, and made
    # the large autotune configs spill 2-6× more (ptxas on sm_90).
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask_b = (offs_n[:, None] < N) & (offs_b[None, :] < K // 2)
    byte = tl.load(packed_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :], mask=mask_b, other=0)
    nibbles = tl.reshape(tl.join(byte >> 4, byte & 0xF), (BLOCK_N, BLOCK_K))
    value = tl.load(code_ptr + nibbles.to(tl.int32))  # 16-entry table gather, stays in L1
    # K % BLOCKSIZE == 0, so each run of GROUP columns of a row shares one scale.
    GROUP: tl.constexpr = min(BLOCK_K, BLOCKSIZE)
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    group_k = k0 + tl.arange(0, GROUPS) * GROUP
    block = offs_n[:, None] * (K // BLOCKSIZE) + (group_k // BLOCKSIZE)[None, :]
    mask_s = (offs_n[:, None] < N) & (group_k[None, :] < K)
    scale = _load_block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, mask_s, DOUBLE_QUANT)
    value = tl.reshape(tl.reshape(value, (BLOCK_N, GROUPS, GROUP)) * scale[:, :, None], (BLOCK_N, BLOCK_K))
    return value


# restore_value, not reset_to_zero: autotuning runs the kernel once per config, and the split-K/decode path
# adds into out_ptr, which may hold the caller's partial sums (nf4_matmul_accumulate); a reset would wipe
# them on each new key's first call. The key holds what changes the best tile, shapes aside: the epilogue's
# fp32 add (the adapter output), the adapter programs of the decode fusion and the scale decoding, so the
# base alone and the fused layer, called at one shape, do not share one tuning.
NF4_MATMUL_KEY = ["M_BUCKET", "N", "K", "SPLIT_K", "HAS_ADD", "HAS_ADAPTER", "BLOCKSIZE", "DOUBLE_QUANT"]


@triton.autotune(
    configs=TUNED_CONFIGS, key=NF4_MATMUL_KEY, restore_value=["out_ptr"], prune_configs_by=PRUNE_BY_TOKEN_COUNT
)
@triton.jit
def _nf4_matmul_kernel(
    x_ptr,  # (M, K) activations
    out_ptr,  # (M, N) output; fp32 accumulation buffer when SPLIT_K > 1
    add_ptr,  # (M, N) fp32 tensor added in the epilogue (the adapter output), if HAS_ADD
    bias_ptr,  # (N,) bias, if HAS_BIAS
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    ad_x_ptr,  # HAS_ADAPTER: the adapter's input rows, and the arguments of the atomic adapter schedule
    ad_table_ptr,
    ad_gate_ptr,
    ad_factor_ptr,
    ad_scale,
    ad_r,
    ad_max_tiles,
    ad_programs,
    ad_stride_xm,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_om,
    stride_on,
    stride_am,
    stride_an,
    BLOCKSIZE: tl.constexpr,
    HAS_ADD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr,  # IEEE fp32 dot: fp32 inputs, or half inputs under the interpreter
    ROWS_64: tl.constexpr,  # 64-bit row offsets: x, out or add spans 2^31 elements
    HAS_ADAPTER: tl.constexpr,  # decode fusion: programs with pid_k >= SPLIT_K run the adapter (atomics)
    AD_GATE: tl.constexpr,
    AD_R_PAD: tl.constexpr,
    AD_BLOCK_P: tl.constexpr,
    AD_BLOCK_J: tl.constexpr,
    AD_BLOCK_L: tl.constexpr,
    AD_BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    # The grid's K-slices from SPLIT_K on (HAS_ADAPTER only) are the adapter's programs: they add into the
    # same fp32 buffer as the split-K partial sums, so base and adapter share one launch, side by side.
    if HAS_ADAPTER:
        if pid_k >= SPLIT_K:
            flat = ((pid_k - SPLIT_K) * tl.num_programs(0) + pid_m) * tl.num_programs(1) + pid_n
            if flat < ad_programs:
                grouped_sandwich_program(
                    flat,
                    ad_x_ptr,
                    out_ptr,
                    ad_table_ptr,
                    ad_gate_ptr,
                    ad_factor_ptr,
                    ad_scale,
                    ad_r,
                    ad_max_tiles,
                    ad_stride_xm,
                    stride_om,
                    AD_GATE,
                    AD_R_PAD,
                    DOT_FP32,
                    AD_BLOCK_P,
                    AD_BLOCK_J,
                    AD_BLOCK_L,
                    AD_BLOCK_Q,
                )
        else:
            _nf4_matmul_program(
                pid_m, pid_n, pid_k, x_ptr, out_ptr, add_ptr, bias_ptr, packed_ptr, absmax_ptr,
                nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, M, N, K, stride_xm, stride_xk,
                stride_om, stride_on, stride_am, stride_an, BLOCKSIZE, HAS_ADD, HAS_BIAS, DOUBLE_QUANT,
                SPLIT_K, DOT_FP32, ROWS_64, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
    else:
        _nf4_matmul_program(
            pid_m, pid_n, pid_k, x_ptr, out_ptr, add_ptr, bias_ptr, packed_ptr, absmax_ptr,
            nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, M, N, K, stride_xm, stride_xk,
            stride_om, stride_on, stride_am, stride_an, BLOCKSIZE, HAS_ADD, HAS_BIAS, DOUBLE_QUANT,
            SPLIT_K, DOT_FP32, ROWS_64, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip


@triton.jit
def _nf4_matmul_program(
    pid_m,
    pid_n,
    pid_k,
    x_ptr,
    out_ptr,
    add_ptr,
    bias_ptr,
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_om,
    stride_on,
    stride_am,
    stride_an,
    BLOCKSIZE: tl.constexpr,
    HAS_ADD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ROWS_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One BLOCK_M × BLOCK_N output tile over K-slice ``pid_k`` of the base GEMM."""
    # Row offsets of x/out in 64 bits only if a matrix spans 2^31 elements (ROWS_64, set by the launcher);
    # column offsets are 32-bit (the launcher gives every matrix unit column stride).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = offs_m.to(tl.int64) if ROWS_64 else offs_m
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_span
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_span, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x_ptrs = x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        w = _decode_nf4_rows(
            packed_ptr,
            absmax_ptr,
            nested_absmax_ptr,
            nested_code_ptr,
            offset_ptr,
            code_ptr,
            offs_n,
            k0,
            N,
            K,
            BLOCKSIZE,
            BLOCK_N,
            BLOCK_K,
            DOUBLE_QUANT,
        ).to(x.dtype)  # (BLOCK_N, BLOCK_K), rounded as dequantize_nf4 rounds
        w = tl.trans(w)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if pid_k == 0:
        if HAS_ADD:
            add_ptrs = add_ptr + rows_m[:, None] * stride_am + offs_n[None, :] * stride_an
            acc += tl.load(add_ptrs, mask=out_mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")  # a sum: no ordering needed


@triton.autotune(
    configs=TUNED_T_CONFIGS,
    key=["M_BUCKET", "N", "K", "HAS_ADD", "BLOCKSIZE", "DOUBLE_QUANT"],
    prune_configs_by=PRUNE_BY_TOKEN_COUNT,
)
@triton.jit
def _nf4_matmul_t_kernel(
    dy_ptr,  # (M, N) upstream gradient
    dx_ptr,  # (M, K) output
    add_ptr,  # (M, K) fp32 tensor added in the epilogue (the adapter's dx), if HAS_ADD
    packed_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset_ptr,
    code_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_dym,
    stride_dyn,
    stride_dxm,
    stride_dxk,
    stride_am,
    stride_ak,
    BLOCKSIZE: tl.constexpr,
    HAS_ADD: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ROWS_64: tl.constexpr,  # 64-bit row offsets: dy, dx or add spans 2^31 elements
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    # As in _nf4_matmul_program: 64-bit row offsets only under ROWS_64, 32-bit column offsets.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows_m = offs_m.to(tl.int64) if ROWS_64 else offs_m
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        dy_ptrs = dy_ptr + rows_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
        dy = tl.load(dy_ptrs, mask=dy_mask, other=0.0)
        w = _decode_nf4_rows(
            packed_ptr,
            absmax_ptr,
            nested_absmax_ptr,
            nested_code_ptr,
            offset_ptr,
            code_ptr,
            offs_n,
            pid_k * BLOCK_K,
            N,
            K,
            BLOCKSIZE,
            BLOCK_N,
            BLOCK_K,
            DOUBLE_QUANT,
        ).to(dy.dtype)  # (BLOCK_N, BLOCK_K) tile of W
        if DOT_FP32:
            acc += tl.dot(dy.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(dy, w)
    out_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    if HAS_ADD:
        add_ptrs = add_ptr + rows_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        acc += tl.load(add_ptrs, mask=out_mask, other=0.0)
    dx_ptrs = dx_ptr + rows_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=out_mask)


def _code_table(device: torch.device) -> torch.Tensor:
    return cached_table(("nf4_code", device), lambda: torch.tensor(NF4_CODE, dtype=torch.float32, device=device))


def _nf4_args(w: NF4Tensor) -> tuple:
    """Kernel pointer arguments for an NF4Tensor (placeholders where double quantization is off). The kernels
    index every field as contiguous: a strided view (a hand-built NF4Tensor, a load with ``assign=True``) is
    copied here, not read wrong (``contiguous()`` returns a contiguous field itself)."""
    absmax = w.absmax.contiguous()
    return (
        w.packed.contiguous(),
        absmax,
        w.nested_absmax.contiguous() if w.double_quant else absmax,
        w.nested_code.contiguous() if w.double_quant else absmax,
        w.offset.reshape(1) if w.double_quant else absmax,
        _code_table(w.device),
    )


def supports(w: NF4Tensor) -> bool:
    """Whether the NF4 kernels take this weight: a power-of-two blocksize (the decode splits a K tile into
    whole blocks) dividing K, and fewer than 2^31 elements (the kernels index W in 32 bits)."""
    power_of_two = w.blocksize & (w.blocksize - 1) == 0
    return power_of_two and w.shape[1] % w.blocksize == 0 and w.numel() < 2**31


# From this many tokens on, the NF4 base runs as dequantize (one launch, ``nf4_dequantize``) + cuBLAS
# instead of the fused dequant-GEMM. A guess from the roofline, not yet from a GPU (docs/design.md §5.1):
# at 4096² and T = 512 a bf16 GEMM takes ~25 µs on an H100-class GPU at cuBLAS's efficiency, and the
# dense copy one pass over W (~10 µs); the fused kernel, decoding W in every M-tile's inner loop, is not
# expected within 1.4× of cuBLAS there. ``benchmarks.schedule`` (nf4-fwd / nf4-dx at T = 128 … 4096) and
# the layer providers ``ours_nf4`` / ``ours_nf4_fused`` time both routes side by side to set it.
DEQUANTIZE_MIN_TOKENS = 512
NF4_ROUTES = ("auto", "fused", "dequantize")


def nf4_route(num_tokens: int) -> str:
    """``"fused"`` (the dequant-GEMM kernels) or ``"dequantize"`` (W decoded to a dense copy, then cuBLAS)
    for a GEMM over ``num_tokens`` rows; ``MOKA_NF4_ROUTE`` = ``fused`` | ``dequantize`` forces one.

    ``"fused"`` at every T under ``torch.use_deterministic_algorithms(True)`` when PyTorch would refuse
    cuBLAS there (no ``CUBLAS_WORKSPACE_CONFIG`` of ``:4096:8`` or ``:16:8``, and not ``warn_only``), unless
    forced; the fused kernels need no split-K in that mode.
    """
    forced = os.environ.get("MOKA_NF4_ROUTE", "auto").strip().lower() or "auto"
    if forced not in NF4_ROUTES:
        raise ValueError(f"MOKA_NF4_ROUTE: expected one of {list(NF4_ROUTES)}, got {forced!r}")
    if forced != "auto":
        return forced
    if num_tokens < DEQUANTIZE_MIN_TOKENS or not _cublas_allowed():
        return "fused"
    return "dequantize"


def _cublas_allowed() -> bool:
    """Whether PyTorch runs a cuBLAS GEMM in the current determinism mode (it raises without the config)."""
    if not torch.are_deterministic_algorithms_enabled() or torch.is_deterministic_algorithms_warn_only_enabled():
        return True
    return os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")


def split_k_for(m: int, n: int, k: int, block_n: int = 128, num_sms: int | None = None) -> int:
    """Split K for decode-sized batches (M <= 16) so about two waves of programs fill the GPU
    (``num_sms``: the current device's multiprocessor count by default).

    1 (no split, no atomics) under ``torch.use_deterministic_algorithms(True)``.
    """
    if m > 16 or torch.are_deterministic_algorithms_enabled():
        return 1
    if INTERPRET:
        return 2  # exercise the split-K path in CPU tests
    num_sms = num_sms or multiprocessors(torch.device("cuda"))
    tiles = triton.cdiv(n, block_n)
    return max(1, min(16, (2 * num_sms) // max(tiles, 1), k // 256))


def _spans_2g(*tensors: torch.Tensor) -> bool:
    """Whether any matrix's last element lies 2^31 or more elements past its first (64-bit row offsets)."""
    return any(
        sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True)) >= 2**31 - 1 for t in tensors
    )


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    """``t`` with column stride 1 (copied if need be): the kernels index within a row in 32 bits."""
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _launch_forward(x, w, target, add, bias, split_k, adapter: AdapterLaunch | None = None) -> None:
    x = _unit_columns(x)
    assert target.shape[1] <= 1 or target.stride(1) == 1, "outputs need unit column stride"
    add = None if add is None else _unit_columns(add)
    m, k = x.shape
    n = w.shape[0]
    add_arg = add if add is not None else target
    bias_arg = bias if bias is not None else target
    ad = adapter or AdapterLaunch.none(x)

    def grid(meta):
        tiles_m, tiles_n = triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])
        return (tiles_m, tiles_n, split_k + triton.cdiv(ad.programs, tiles_m * tiles_n))

    _nf4_matmul_kernel[grid](
        x,
        target,
        add_arg,
        bias_arg,
        *_nf4_args(w),
        ad.rows,
        ad.table,
        ad.gate,
        ad.factor,
        ad.scale,
        ad.num_components,
        ad.max_tiles,
        ad.programs,
        ad.stride_rows,
        m,
        n,
        k,
        _m_bucket(m),
        x.stride(0),
        x.stride(1),
        target.stride(0),
        target.stride(1),
        add_arg.stride(0),
        add_arg.stride(1),
        BLOCKSIZE=w.blocksize,
        HAS_ADD=add is not None,
        HAS_BIAS=bias is not None,
        DOUBLE_QUANT=w.double_quant,
        SPLIT_K=split_k,
        DOT_FP32=dot_in_fp32(x.dtype),
        ROWS_64=_spans_2g(x, target, add_arg),
        HAS_ADAPTER=adapter is not None,
        **ad.constexprs,
    )


def nf4_matmul(
    x: torch.Tensor,
    w: NF4Tensor,
    add: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = x · dequant(w)ᵀ (+ add) (+ bias). x: (M, K); add: fp32 (M, N); returns (M, N) in x's dtype."""
    m, k = x.shape
    n = w.shape[0]
    out = new_output((m, n), x.dtype, x.device) if out is None else out
    if m == 0:
        return out
    split_k = split_k_for(m, n, k)
    target = out if split_k == 1 else torch.zeros((m, n), dtype=torch.float32, device=x.device)
    _launch_forward(x, w, target, add, bias, split_k)
    if split_k > 1:
        out.copy_(target)
    return out


def nf4_matmul_accumulate(
    x: torch.Tensor,
    w: NF4Tensor,
    acc: torch.Tensor,
    bias: torch.Tensor | None = None,
    adapter: AdapterLaunch | None = None,
) -> None:
    """acc += x · dequant(w)ᵀ (+ bias) (+ the adapter), by split-K fp32 atomics: the decode path. With
    ``adapter`` (from ``kron_mixture.adapter_launch`` on acc), the adapter's atomic programs run as extra
    programs of the same launch. acc: fp32 (M, N), zeroed or holding partial sums. Not under
    ``torch.use_deterministic_algorithms(True)`` (the atomics' order varies): use :func:`nf4_matmul` there."""
    m, k = x.shape
    n = w.shape[0]
    assert acc.dtype == torch.float32 and acc.shape == (m, n)
    if torch.are_deterministic_algorithms_enabled():
        message = (
            "nf4_matmul_accumulate adds by fp32 atomics, whose order varies, but "
            "torch.use_deterministic_algorithms(True) is set: use nf4_matmul"
        )
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, stacklevel=2)  # warn_only=True: as PyTorch's own nondeterministic ops do
    if m > 0:
        _launch_forward(x, w, acc, None, bias, max(2, split_k_for(m, n, k)), adapter)


def nf4_matmul_t(
    dy: torch.Tensor, w: NF4Tensor, add: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """dx = dy · dequant(w) (+ add). dy: (M, N); add: fp32 (M, K); returns (M, K) in dy's dtype."""
    dy = _unit_columns(dy)
    m, n = dy.shape
    k = w.shape[1]
    out = new_output((m, k), dy.dtype, dy.device) if out is None else out
    assert k <= 1 or out.stride(1) == 1, "outputs need unit column stride"
    if m == 0:
        return out
    add_arg = _unit_columns(add) if add is not None else out

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"]))

    _nf4_matmul_t_kernel[grid](
        dy,
        out,
        add_arg,
        *_nf4_args(w),
        m,
        n,
        k,
        _m_bucket(m),
        dy.stride(0),
        dy.stride(1),
        out.stride(0),
        out.stride(1),
        add_arg.stride(0),
        add_arg.stride(1),
        BLOCKSIZE=w.blocksize,
        HAS_ADD=add is not None,
        DOUBLE_QUANT=w.double_quant,
        DOT_FP32=dot_in_fp32(dy.dtype),
        ROWS_64=_spans_2g(dy, out, add_arg),
    )
    return out


assert NESTED_BLOCKSIZE == 256  # hard-coded in _decode_nf4_tile
