r"""Kronecker-mixture kernels: Σ_i c_i (A_i ⊗ B_i) x without ΔW, and its backward, each in one launch.

Every contraction of the adapter is one of two shapes, so two contractions cover forward and backward.

**Sandwich**, per token t and component i:

.. math::  \mathrm{out}_t \mathrel{+}= c_i \cdot S_{1,i} \, (M_{t,i} \, S_{2,i})

with S_1 (P×J) and S_2 (L×Q) the component's factors and M_t (J×L) a view of token t's row. Strides pick
the roles:

* forward, ``b_first``: S_1 = A, M_t = X_t, S_2 = Bᵀ, out_t = Y_t (a1×b1)  — a2·b1·(b2 + a1) MACs;
* forward, ``a_first``: S_1 = B, M_t = X_tᵀ, S_2 = Aᵀ, out_t = Y_tᵀ        — a1·b2·(a2 + b1) MACs;
* adapter dX: S_1 = Aᵀ, M_t = G_t, S_2 = B (or the transposed roles), out_t = dX_t.

A tile (``_sandwich_tile``) is a BLOCK_P × BLOCK_Q block of out_t in fp32 registers: it walks J in BLOCK_J
steps; each step's inner product M_t[j-block, :] · S_2[:, q-tile] is accumulated over L in fp32, rounded
to the input dtype (as the reference rounds its intermediate) and multiplied by S_1[p-tile, j-block]. The
per-token intermediate (as large as x per component) never leaves the chip.

Components differ in shape, so one launch covers all of them through a **component table**: an int64 row
per component with its factors' addresses, dimensions, strides and tile counts (cached on the device,
keyed on its contents; a layer's factors keep their addresses, so training builds it once). One set of
tile sizes serves all components, masked at the edges: :func:`choose_blocks` picks the set of least padded
work (tiles sized for the largest component made a 4096² layer execute 10.8× its multiply-adds). The
coefficients c = s·softmax(g) are computed in the kernel from the logits. Two schedules (:func:`adapter_schedule`):

* ``_kron_sandwich_grouped_kernel`` ("atomic"): a program per (token, tile, component), component fastest,
  adding with fp32 atomics into a zeroed buffer. r·tiles·T programs fill the GPU at decode sizes; the r
  programs of one row run together, so their read-modify-writes meet in L2.
* ``_kron_sandwich_rowwise_kernel`` ("rowwise"): a program per token, owning its output row through all
  components in a fixed order (the first stores, the others add to what the program wrote, with a barrier
  between components since their tilings differ). The row is written once: no zero fill and no DRAM
  read-modify-write, and the sum is deterministic.

**Token reduction** (``_kron_token_reduce_grouped_kernel``), over all tokens:

.. math::  \mathrm{out} = \sum_t (L_t \, S) \, R_t

* dA_raw = M = Σ_t (G_t B) X_tᵀ: L_t = G_t, S = B, R_t = X_tᵀ;
* dB_raw = R = Σ_t (G_tᵀ A) X_t: L_t = G_tᵀ, S = A, R_t = X_t;

each grouped so that its intermediate is the component's small one; the other grouping is the transposed
reduction (e.g. Mᵀ = Σ_t (X_t Bᵀ) G_tᵀ when X Bᵀ is the small intermediate), stored transposed so every
result lands in its factor's layout. All requested reductions run in one launch over a table like the
sandwich's, into one flat fp32 buffer. The token axis is split across programs, each writing an fp32
partial sum; no atomics, so results are deterministic.

**Finishing pass** (``_factor_grad_finish_kernel``): a program per requested gradient sums its token
splits and writes dA = c·M or dB = c·R in the factor's dtype and layout; one more program forms
dα_i = s⟨A_i, M_i⟩ = s⟨B_i, R_i⟩ for the gate's r requests and the softmax backward
dg = α ⊙ (dα − ⟨α, dα⟩). The coefficients c = s·softmax(g) are formed from the logits inside every kernel,
so a layer's backward needs no small torch ops. Launch plans (tables, tile sizes) are cached per layer
(``_PlanCache``), so a call's host work is a signature of its factors and a dictionary lookup.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..reference import contraction_order
from . import INTERPRET, dot_in_fp32, multiprocessors, new_output

__all__ = [
    "AdapterLaunch",
    "adapter_launch",
    "adapter_schedule",
    "grouped_launch_allowed",
    "kron_factor_backward",
    "kron_factor_grads",
    "kron_mixture_backward_dx",
    "kron_mixture_forward",
    "sandwich_grouped",
    "token_reduce_grouped",
]


@triton.jit
def _dot_acc(acc, a, b, DOT_FP32: tl.constexpr):
    """acc + a · b in fp32; DOT_FP32 takes the IEEE-precision dot (fp32 inputs, or half under the interpreter)."""
    if DOT_FP32:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return acc + tl.dot(a, b)


@triton.jit
def _tile_product(
    a_ptr,
    b_ptr,
    offs_m,  # (BLOCK_M,) rows of A
    offs_n,  # (BLOCK_N,) columns of B
    M,
    K,
    N,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """(A · B)[offs_m, offs_n] in fp32, walking K in BLOCK_K steps; zero outside A and B."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_tile = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
            other=0.0,
        )
        b_tile = tl.load(
            b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=(offs_k[:, None] < K) & (offs_n[None, :] < N),
            other=0.0,
        )
        acc = _dot_acc(acc, a_tile, b_tile, DOT_FP32)
    return acc


@triton.jit
def _sandwich_tile(
    m_row,  # token t's M_t
    s1_ptr,
    s2_ptr,
    offs_p,  # (BLOCK_P,) rows of out_t this program owns
    offs_q,  # (BLOCK_Q,) columns of out_t this program owns
    J,
    L,
    P,
    Q,
    stride_mj,
    stride_ml,
    stride_s1p,
    stride_s1j,
    stride_s2l,
    stride_s2q,
    DOT_FP32: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """The fp32 tile (S_1 · (M_t · S_2))[offs_p, offs_q]; the intermediate rounded to the input dtype."""
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        inner = _tile_product(
            m_row, s2_ptr, offs_j, offs_q, J, L, Q, stride_mj, stride_ml, stride_s2l, stride_s2q,
            DOT_FP32, BLOCK_J, BLOCK_L, BLOCK_Q,
        )  # fmt: skip
        s1_tile = tl.load(
            s1_ptr + offs_p[:, None] * stride_s1p + offs_j[None, :] * stride_s1j,
            mask=(offs_p[:, None] < P) & (offs_j[None, :] < J),
            other=0.0,
        )
        # the reference rounds its intermediate to the input dtype too
        acc = _dot_acc(acc, s1_tile, inner.to(s1_tile.dtype), DOT_FP32)
    return acc


# The per-component table of ``_kron_sandwich_grouped_kernel``: one int64 row per component, columns
#  0 S_1 address, 1 S_2 address, 2 P, 3 J, 4 L, 5 Q, 6-7 M_t strides (j, l), 8-9 S_1 strides (p, j),
# 10-11 S_2 strides (l, q), 12-13 out_t strides (p, q), 14 Q-tiles, 15 tiles.
TABLE_COLUMNS = 16


@triton.jit
def _kron_sandwich_grouped_kernel(
    m_ptr,  # per-token rows, shared by all components (x for the forward, dy for dx)
    out_ptr,  # fp32 (T, ·) rows, shared by all components; the kernel atomically adds into it
    table_ptr,  # int64 (R, TABLE_COLUMNS): per component S_1/S_2 addresses, dims, strides, tile counts
    gate_ptr,  # GATE 0: the fp32 coefficients c (R,); GATE 1: the gate logits g (R,); GATE 2: unused
    factor_ptr,  # any factor: the element type the table's addresses point to
    scale,
    R,
    max_tiles,
    stride_mt,
    stride_ot,
    GATE: tl.constexpr,  # 0: c_i = gate_ptr[i]; 1: c = scale·softmax(g); 2: c_i = scale / R (gate off)
    R_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """All r components in one launch: program (token, tile, component), component fastest so the r
    programs adding into one token's row run together and their atomics meet in L2."""
    grouped_sandwich_program(
        tl.program_id(0),
        m_ptr,
        out_ptr,
        table_ptr,
        gate_ptr,
        factor_ptr,
        scale,
        R,
        max_tiles,
        stride_mt,
        stride_ot,
        GATE,
        R_PAD,
        DOT_FP32,
        BLOCK_P,
        BLOCK_J,
        BLOCK_L,
        BLOCK_Q,
    )


@triton.jit
def grouped_sandwich_program(
    pid,
    m_ptr,
    out_ptr,
    table_ptr,
    gate_ptr,
    factor_ptr,
    scale,
    R,
    max_tiles,
    stride_mt,
    stride_ot,
    GATE: tl.constexpr,
    R_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """Program ``pid`` of the atomic schedule (also run inside the NF4 GEMV's launch when decoding)."""
    comp = pid % R
    rest = pid // R
    tile = rest % max_tiles
    t = (rest // max_tiles).to(tl.int64)
    row = table_ptr + comp * 16
    if tile < tl.load(row + 15):
        s1_ptr = tl.load(row + 0).to(factor_ptr.dtype)
        s2_ptr = tl.load(row + 1).to(factor_ptr.dtype)
        P = tl.load(row + 2)
        Q = tl.load(row + 5)
        tiles_q = tl.load(row + 14)
        offs_p = (tile // tiles_q) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_q = (tile % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        acc = _sandwich_tile(
            m_ptr + t * stride_mt,
            s1_ptr,
            s2_ptr,
            offs_p,
            offs_q,
            tl.load(row + 3),
            tl.load(row + 4),
            P,
            Q,
            tl.load(row + 6),
            tl.load(row + 7),
            tl.load(row + 8),
            tl.load(row + 9),
            tl.load(row + 10),
            tl.load(row + 11),
            DOT_FP32,
            BLOCK_P,
            BLOCK_J,
            BLOCK_L,
            BLOCK_Q,
        )
        coeff = _component_coefficient(gate_ptr, comp, scale, R, GATE, R_PAD)
        out_ptrs = out_ptr + t * stride_ot + offs_p[:, None] * tl.load(row + 12) + offs_q[None, :] * tl.load(row + 13)
        # relaxed: a sum needs no ordering with other memory (the default acq_rel fences every add)
        tl.atomic_add(out_ptrs, acc * coeff, mask=(offs_p[:, None] < P) & (offs_q[None, :] < Q), sem="relaxed")


@triton.jit
def _component_coefficient(gate_ptr, comp, scale, R, GATE: tl.constexpr, R_PAD: tl.constexpr):
    """c_comp: GATE 0 reads it; 1: scale·softmax(g)[comp] in fp32, as reference.gate_weights; 2: scale / R."""
    if GATE == 0:
        coeff = tl.load(gate_ptr + comp)
    elif GATE == 1:
        offs_r = tl.arange(0, R_PAD)
        logits = tl.load(gate_ptr + offs_r, mask=offs_r < R, other=-float("inf")).to(tl.float32)
        exps = tl.exp(logits - tl.max(logits, 0))
        coeff = tl.sum(tl.where(offs_r == comp, exps, 0.0), 0) / tl.sum(exps, 0) * scale
    else:
        coeff = scale / R
    return coeff


@triton.jit
def _kron_sandwich_rowwise_kernel(
    m_ptr,  # per-token rows, shared by all components
    out_ptr,  # (T, ·) rows, fp32 or the inputs' dtype; written (ACCUMULATE: added to) by the row's program
    table_ptr,  # the same per-component table as the grouped kernel
    gate_ptr,
    factor_ptr,
    scale,
    R,
    stride_mt,
    stride_ot,
    ACCUMULATE: tl.constexpr,  # add to what out holds instead of overwriting it
    GATE: tl.constexpr,
    R_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """One program per token, owning its output row through all r components in a fixed order: the first
    component stores, the others add to what the program itself wrote (a barrier between components,
    since their tilings of the row differ). The row is written to memory once, with no zero fill and no
    atomics; the sum is deterministic. Sums are fp32 in registers; an out row in half precision is rounded
    once per component (what the PyTorch path does accumulating into a half-precision output)."""
    t = tl.program_id(0).to(tl.int64)
    m_row = m_ptr + t * stride_mt
    out_row = out_ptr + t * stride_ot
    for comp in range(0, R):
        row = table_ptr + comp * 16
        s1_ptr = tl.load(row + 0).to(factor_ptr.dtype)
        s2_ptr = tl.load(row + 1).to(factor_ptr.dtype)
        P = tl.load(row + 2)
        J = tl.load(row + 3)
        L = tl.load(row + 4)
        Q = tl.load(row + 5)
        stride_mj = tl.load(row + 6)
        stride_ml = tl.load(row + 7)
        stride_s1p = tl.load(row + 8)
        stride_s1j = tl.load(row + 9)
        stride_s2l = tl.load(row + 10)
        stride_s2q = tl.load(row + 11)
        stride_op = tl.load(row + 12)
        stride_oq = tl.load(row + 13)
        tiles_q = tl.load(row + 14)
        coeff = _component_coefficient(gate_ptr, comp, scale, R, GATE, R_PAD)
        keep = (comp > 0) | ACCUMULATE
        for tile in range(0, tl.load(row + 15)):
            offs_p = (tile // tiles_q) * BLOCK_P + tl.arange(0, BLOCK_P)
            offs_q = (tile % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
            acc = _sandwich_tile(
                m_row,
                s1_ptr,
                s2_ptr,
                offs_p,
                offs_q,
                J,
                L,
                P,
                Q,
                stride_mj,
                stride_ml,
                stride_s1p,
                stride_s1j,
                stride_s2l,
                stride_s2q,
                DOT_FP32,
                BLOCK_P,
                BLOCK_J,
                BLOCK_L,
                BLOCK_Q,
            )
            out_ptrs = out_row + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq
            mask = (offs_p[:, None] < P) & (offs_q[None, :] < Q)
            acc = acc * coeff + tl.load(out_ptrs, mask=mask & keep, other=0.0).to(tl.float32)
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # this component's stores are visible to every thread before the next reads


# The table of ``_kron_token_reduce_grouped_kernel``: one int64 row per reduction, columns
#  0 which per-token tensor L_t is in (0 or 1), 1 S's address, 2 which one R_t is in, 3-6 M, K, J, N,
#  7-9 L strides (t, m, k), 10-11 S strides (k, j),
# 12-14 R strides (t, j, n), 15 offset of the result in the flat workspace, 16-17 its strides (m, n),
# 18 N-tiles, 19 tiles.
REDUCE_COLUMNS = 20


@triton.jit
def _kron_token_reduce_grouped_kernel(
    rows0_ptr,  # the per-token tensors the reductions read (dy and x): kernel arguments rather than
    rows1_ptr,  # table entries, so the table holds only per-layer constants and is built once
    table_ptr,  # int64 (R, REDUCE_COLUMNS)
    ws_ptr,  # fp32 partial sums (splits, total): every result's block at its offset
    like_ptr,  # any operand: the element type the table's addresses point to
    T,
    tokens_per_split,
    R,
    max_tiles,
    stride_ws,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Every requested reduction in one launch: program (split, tile, reduction), each writing its fp32
    partial sum over its share of the tokens (no atomics: the sum over splits is deterministic)."""
    pid = tl.program_id(0)
    job = pid % R
    rest = pid // R
    tile = rest % max_tiles
    split = (rest // max_tiles).to(tl.int64)
    row = table_ptr + job * 20
    if tile < tl.load(row + 19):
        l_ptr = rows0_ptr
        if tl.load(row + 0) != 0:
            l_ptr = rows1_ptr
        r_ptr = rows0_ptr
        if tl.load(row + 2) != 0:
            r_ptr = rows1_ptr
        s_ptr = tl.load(row + 1).to(like_ptr.dtype)
        M = tl.load(row + 3)
        K = tl.load(row + 4)
        J = tl.load(row + 5)
        N = tl.load(row + 6)
        stride_lt = tl.load(row + 7)
        stride_lm = tl.load(row + 8)
        stride_lk = tl.load(row + 9)
        stride_sk = tl.load(row + 10)
        stride_sj = tl.load(row + 11)
        stride_rt = tl.load(row + 12)
        stride_rj = tl.load(row + 13)
        stride_rn = tl.load(row + 14)
        tiles_n = tl.load(row + 18)
        offs_m = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        t_start = split * tokens_per_split
        t_end = tl.minimum(t_start + tokens_per_split, T)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, t_end - t_start):
            t = t_start + step  # int64 tensor in both compiled and interpreted runs
            l_row = l_ptr + t * stride_lt
            r_row = r_ptr + t * stride_rt
            for j0 in range(0, J, BLOCK_J):
                offs_j = j0 + tl.arange(0, BLOCK_J)
                lhs = _tile_product(
                    l_row, s_ptr, offs_m, offs_j, M, K, J, stride_lm, stride_lk, stride_sk, stride_sj,
                    DOT_FP32, BLOCK_M, BLOCK_K, BLOCK_J,
                )  # fmt: skip
                r_tile = tl.load(
                    r_row + offs_j[:, None] * stride_rj + offs_n[None, :] * stride_rn,
                    mask=(offs_j[:, None] < J) & (offs_n[None, :] < N),
                    other=0.0,
                )
                # the reference rounds its intermediate to the input dtype too
                acc = _dot_acc(acc, lhs.to(r_tile.dtype), r_tile, DOT_FP32)
        out_ptrs = (
            ws_ptr
            + split * stride_ws
            + tl.load(row + 15)
            + offs_m[:, None] * tl.load(row + 16)
            + offs_n[None, :] * tl.load(row + 17)
        )
        tl.store(out_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# The table of ``_factor_grad_finish_kernel``: one int64 row per raw gradient (request), columns
#  0 offset in the flat buffers, 1 elements, 2 component, 3 its factor's address, 4 the factor's columns,
#  5-6 its strides (row, column).
FINISH_COLUMNS = 7


@triton.jit
def _split_sum(ws_ptr, offs, mask, splits, stride_ws):
    """Σ over the token splits of the fp32 partial sums at ``offs``, in split order."""
    total = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for split in range(1, splits):
        total += tl.load(ws_ptr + split * stride_ws + offs, mask=mask, other=0.0)
    return total


@triton.jit
def _factor_grad_finish_kernel(
    ws_ptr,  # fp32 (splits, total): the token reduction's partial sums of every raw gradient
    table_ptr,  # int64 (S, FINISH_COLUMNS)
    gate_ptr,  # the gate logits (GATE 1)
    grad_ptr,  # (total,) in the factors' dtype: dA_i = c_i·M_i, dB_i = c_i·R_i at each request's offset
    gate_grad_ptr,  # (R,) in the logits' dtype (NEED_GATE_GRAD)
    factor_ptr,  # any factor: the element type the table's addresses point to
    scale,
    R,
    S,
    splits,
    stride_ws,
    GATE: tl.constexpr,
    NEED_GATE_GRAD: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Programs 0..S-1: one request each, raw = Σ_splits partial, grad = c·raw in the factor dtype.
    Program S (NEED_GATE_GRAD, requests 0..R-1 one per component): dα_i = s⟨factor_i, raw_i⟩, then the
    softmax backward dg = α ⊙ (dα − ⟨α, dα⟩) with α = softmax(g) in fp32; one program, so the sums have
    a fixed order (deterministic)."""
    pid = tl.program_id(0)
    if pid < S:
        row = table_ptr + pid * 7
        offset = tl.load(row + 0)
        numel = tl.load(row + 1)
        coeff = _component_coefficient(gate_ptr, tl.load(row + 2), scale, R, GATE, R_PAD)
        for start in range(0, numel, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < numel
            raw = _split_sum(ws_ptr, offset + offs, mask, splits, stride_ws)
            tl.store(grad_ptr + offset + offs, (raw * coeff).to(grad_ptr.dtype.element_ty), mask=mask)
    if NEED_GATE_GRAD:  # noqa: SIM102 - a constexpr branch, pruned at compile time
        if pid == S:
            offs_r = tl.arange(0, R_PAD)
            d_alpha = tl.zeros((R_PAD,), dtype=tl.float32)
            for comp in range(0, R):
                row = table_ptr + comp * 7
                offset = tl.load(row + 0)
                numel = tl.load(row + 1)
                f_ptr = tl.load(row + 3).to(factor_ptr.dtype)
                cols = tl.load(row + 4)
                stride_r = tl.load(row + 5)
                stride_c = tl.load(row + 6)
                dot = tl.zeros((BLOCK,), dtype=tl.float32)
                for start in range(0, numel, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    mask = offs < numel
                    raw = _split_sum(ws_ptr, offset + offs, mask, splits, stride_ws)
                    f_offs = (offs // cols) * stride_r + (offs % cols) * stride_c
                    factor = tl.load(f_ptr + f_offs, mask=mask, other=0.0)
                    dot += raw * factor.to(tl.float32)
                d_alpha = tl.where(offs_r == comp, scale * tl.sum(dot, 0), d_alpha)
            logits = tl.load(gate_ptr + offs_r, mask=offs_r < R, other=-float("inf")).to(tl.float32)
            exps = tl.exp(logits - tl.max(logits, 0))
            alpha = exps / tl.sum(exps, 0)
            grad = alpha * (d_alpha - tl.sum(alpha * d_alpha, 0))
            tl.store(gate_grad_ptr + offs_r, grad.to(gate_grad_ptr.dtype.element_ty), mask=offs_r < R)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # plain ints: triton.cdiv is a constexpr function, microseconds per host call


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def block_for(dim: int, cap: int = 64) -> int:
    """Tile size for one factor dimension: a power of two in [16, cap] (tl.dot needs >= 16 on GPUs)."""
    return max(16, min(cap, _next_power_of_2(dim)))


# Tile sizes. Both contractions have one shape: an output tile BLOCK_P × BLOCK_Q of S_1 (P×J) · (M (J×L) ·
# S_2 (L×Q)), walking J in BLOCK_J steps, each step's inner product walking L in BLOCK_L steps (the
# reduction is the same shape transposed). One launch runs every component with one set of tile sizes.
TILE_POLICIES = ("min-work", "max")
ACC_ELEMENTS = 4096  # BLOCK_P · BLOCK_Q and BLOCK_J · BLOCK_Q: fp32 tiles of 32 registers a thread at 4 warps
# Register spills, from ptxas on sm_90 (python -m moka_kernels.ops.aot): every tile set whose five tiles
# (tile_elements) hold at most 8192 elements compiles for all three kernels spilling at most a few words;
# from 8704 up, 27 of the 47 sets spill more than 32 B in some kernel or target (68 B and up, e.g.
# 128×16×64×32: 108 B, 64⁴: 236 B; benchmarks/results/registers.json).
TILE_ELEMENTS = 8192
# fp32 operands (an fp32 layer's IEEE-precision dot) take a register per element, where two 16-bit ones
# share one: of the 64 sets within TILE_ELEMENTS, 36 spill more than 32 B in some kernel and target, up to
# 1.6 KB (ptxas on sm_80 and sm_90, benchmarks/results/registers.json). These 28 spill at most 32 B in each;
# no size rule picks them out (16×16×32×32 spills 44 B where 16×32×32×32 spills none), so they are listed,
# and the AOT check (tests/test_aot_compile.py) compiles every one of them in fp32 on each run.
FP32_TILE_SETS = frozenset(
    {
        (16, 16, 16, 16),
        (16, 16, 16, 32),
        (16, 16, 16, 64),
        (16, 16, 32, 16),
        (16, 16, 64, 16),
        (16, 32, 16, 16),
        (16, 32, 16, 32),
        (16, 32, 32, 16),
        (16, 32, 32, 32),
        (16, 64, 16, 16),
        (16, 64, 16, 32),
        (32, 16, 16, 16),
        (32, 16, 16, 32),
        (32, 16, 32, 16),
        (32, 16, 64, 16),
        (32, 32, 16, 16),
        (32, 32, 16, 32),
        (32, 32, 32, 16),
        (32, 64, 16, 16),
        (64, 16, 16, 16),
        (64, 16, 16, 32),
        (64, 16, 32, 16),
        (64, 16, 32, 32),
        (64, 32, 16, 16),
        (64, 32, 32, 16),
        (128, 16, 16, 16),
        (128, 16, 32, 16),
        (128, 32, 16, 16),
    }
)
SPILL_TOLERANCE_BYTES = 32  # ptxas spills 8-24 B of a few in-budget tile sets (80-168 registers): not a cost
DOT_OVERHEAD_MACS = 16 * 16 * 16  # a guess until a GPU sweep: a tl.dot call costs at least a 16³ product
MIN_DOT_OUTPUTS = 4 * 16 * 8  # 4 warps × one 16×8 MMA tile each: a smaller dot output leaves warps idle


def tile_policy() -> str:
    """``MOKA_TILE_POLICY``: ``min-work`` (default, :func:`choose_blocks`) or ``max`` (each tile size the
    largest any component needs, up to 64: the policy before, kept for the GPU sweep)."""
    policy = os.environ.get("MOKA_TILE_POLICY", "min-work")
    if policy not in TILE_POLICIES:
        raise ValueError(f"MOKA_TILE_POLICY: expected one of {TILE_POLICIES}, got {policy!r}")
    return policy


@functools.lru_cache(maxsize=4)
def tile_sets(register_budget: bool = True, fp32_operands: bool = False) -> tuple[tuple[int, int, int, int], ...]:
    """Power-of-two tile sets (BLOCK_P, BLOCK_Q ≤ 128; BLOCK_J, BLOCK_L ≤ 64) whose two fp32 tiles hold at
    most ACC_ELEMENTS each, and, with ``register_budget``, whose five tiles hold at most TILE_ELEMENTS (and,
    with ``fp32_operands``, are among FP32_TILE_SETS)."""
    sizes = (16, 32, 64, 128)
    out = []
    for bp in sizes:
        for bj in sizes[:3]:
            for bl in sizes[:3]:
                for bq in sizes:
                    blocks = (bp, bj, bl, bq)
                    if bp * bq > ACC_ELEMENTS or bj * bq > ACC_ELEMENTS:  # accumulator, inner product
                        continue
                    if not register_budget or (
                        tile_elements(blocks) <= TILE_ELEMENTS and (not fp32_operands or blocks in FP32_TILE_SETS)
                    ):
                        out.append(blocks)
    return tuple(out)


def _candidate_blocks(fp32_operands: bool = False) -> tuple[tuple[int, int, int, int], ...]:
    """The tile sets :func:`choose_blocks` picks from, for 16-bit or fp32 operands."""
    return tile_sets(True, fp32_operands)


def tile_elements(blocks: tuple[int, int, int, int]) -> int:
    """Elements of the tiles one program holds: the fp32 accumulators BLOCK_P × BLOCK_Q and BLOCK_J ×
    BLOCK_Q and the operand tiles of S_1, M and S_2 (BLOCK_P × BLOCK_J, BLOCK_J × BLOCK_L, BLOCK_L × BLOCK_Q)."""
    bp, bj, bl, bq = blocks
    return bp * bq + bj * bq + bp * bj + bj * bl + bl * bq


@functools.lru_cache(maxsize=1)
def maximal_blocks() -> tuple[tuple[int, int, int, int], ...]:
    """The candidates no other candidate contains size by size: shared memory and registers grow with each
    size, so these bound every choice (the AOT check compiles them in every variant)."""
    candidates = _candidate_blocks()
    return tuple(
        b for b in candidates if not any(o != b and all(x <= y for x, y in zip(b, o, strict=True)) for o in candidates)
    )


def reduce_block_constexprs(blocks: tuple[int, int, int, int]) -> dict[str, int]:
    """The reduction kernel's tile constexprs for a :func:`choose_blocks` result: its out (M×N) = (L (M×K)
    · S (K×J)) · R (J×N) is the sandwich transposed, so (P, J, L, Q) are (N, J, K, M)."""
    bn, bj, bk, bm = blocks
    return {"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_J": bj, "BLOCK_N": bn}


def padded_work(
    dims: tuple[int, int, int, int],
    blocks: tuple[int, int, int, int],
    dot_overhead: int = DOT_OVERHEAD_MACS,
    min_dot_outputs: int = MIN_DOT_OUTPUTS,
) -> int:
    r"""Multiply-adds one token's output of one component costs with these tiles, padding included, plus
    ``dot_overhead`` (o) per ``tl.dot`` call, each dot's output counted as at least ``min_dot_outputs`` (m)
    elements (a smaller one leaves warps idle). dims = (P, J, L, Q), blocks = (BLOCK_P, BLOCK_J, BLOCK_L,
    BLOCK_Q):

    .. math::  \lceil P/b_P \rceil \lceil Q/b_Q \rceil \lceil J/b_J \rceil
               \big(\lceil L/b_L \rceil (\max(b_J b_Q, m)\, b_L + o) + \max(b_P b_Q, m)\, b_J + o\big)

    Each tile recomputes its J-block of M·S_2 for its own P rows, so ⌈P/b_P⌉ multiplies that part. With
    o = m = 0 it is the multiply-adds the tiles execute."""
    p, j, l_, q = dims
    bp, bj, bl, bq = blocks
    inner = max(bj * bq, min_dot_outputs) * bl + dot_overhead
    per_j_block = _cdiv(l_, bl) * inner + max(bp * bq, min_dot_outputs) * bj + dot_overhead
    return _cdiv(p, bp) * _cdiv(q, bq) * _cdiv(j, bj) * per_j_block


def choose_blocks(dims: Sequence[tuple[int, int, int, int]], fp32_operands: bool = False) -> tuple[int, int, int, int]:
    """One launch's tile sizes for jobs of these (P, J, L, Q): with the ``min-work`` policy the candidate
    (each a power of two from 16; BLOCK_P · BLOCK_Q and BLOCK_J · BLOCK_Q, the two fp32 tiles, at most
    ACC_ELEMENTS; all five tiles at most TILE_ELEMENTS and, for ``fp32_operands``, one of FP32_TILE_SETS, so
    no kernel spills registers) of least total :func:`padded_work`. The ``max`` policy (kept for the GPU
    sweep) is not held to the register budget.

    Components of one layer differ in shape (a 16×256 factor beside a 64×64 one), and tiles sized for the
    largest pad the others: at 4096², r = 5 the previous policy (``max``) executed 10.8× the adapter's
    multiply-adds, this one 1.6× (docs/design.md §5.2)."""
    if tile_policy() == "max":
        return tuple(max(block_for(d[i]) for d in dims) for i in range(4))  # type: ignore[return-value]
    candidates = _candidate_blocks(fp32_operands)
    return min(candidates, key=lambda blocks: (sum(padded_work(d, blocks) for d in dims), blocks))


class _PlanCache:
    """Launch plans (component table, tile sizes, tile counts) keyed on everything they are built from.

    Building a plan walks every component in Python (tens of µs); a layer's calls all share a few keys,
    so a call pays one dictionary lookup instead. The least recently used plans are dropped beyond
    ``maxsize`` (a layer called eagerly every step keeps its plan, and its factor copies, however many others
    come and go; a CUDA graph's replays do not refresh them, so there it only makes eviction less likely)."""

    def __init__(self, maxsize: int = 4096):
        self.maxsize = maxsize
        self.misses = 0
        self._plans: OrderedDict[Hashable, object] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], object]):
        plan = self._plans.get(key)
        if plan is None:
            self.misses += 1
            plan = self._plans[key] = build()
            if len(self._plans) > self.maxsize:
                self._plans.popitem(last=False)
        else:
            with contextlib.suppress(KeyError):  # another thread may have dropped it since the lookup
                self._plans.move_to_end(key)
        return plan


_PLANS = _PlanCache()


def factor_signature(a_factors: Sequence[torch.Tensor], b_factors: Sequence[torch.Tensor]) -> tuple:
    """What a plan reads of the factors: addresses, shapes and strides (never values), per component."""
    return tuple(
        (a.data_ptr(), *a.shape, *a.stride(), b.data_ptr(), *b.shape, *b.stride())
        for a, b in zip(a_factors, b_factors, strict=True)
    )


class _View:
    """A 2-D (or per-token 2-D) operand as a base tensor plus element strides."""

    def __init__(self, tensor: torch.Tensor, rows: int, cols: int, stride_r: int, stride_c: int, stride_t: int = 0):
        self.tensor, self.rows, self.cols = tensor, rows, cols
        self.stride_r, self.stride_c, self.stride_t = stride_r, stride_c, stride_t

    def t(self) -> _View:
        return _View(self.tensor, self.cols, self.rows, self.stride_c, self.stride_r, self.stride_t)


def _mat(t: torch.Tensor) -> _View:
    return _View(t, t.shape[0], t.shape[1], t.stride(0), t.stride(1))


def _per_token(rows2d: torch.Tensor, n_rows: int, n_cols: int) -> _View:
    """Token t's row of a (T, n_rows·n_cols) tensor, viewed as an n_rows × n_cols row-major matrix."""
    return _View(rows2d, n_rows, n_cols, n_cols * rows2d.stride(1), rows2d.stride(1), rows2d.stride(0))


def _num_splits(num_tokens: int, tiles: int, device: torch.device) -> int:
    """How many shares of the tokens a reduction's partial sums split into: about four programs per
    multiprocessor in all, at most one share per token."""
    if INTERPRET:
        return max(1, min(num_tokens, 3))  # exercise several partial sums in CPU tests
    return max(1, min(num_tokens, (4 * multiprocessors(device)) // max(tiles, 1)))


ReduceJob = tuple[_View, _View, _View, bool]  # (L_t, S, R_t, store the result transposed)


@dataclass(frozen=True)
class _ReducePlan:
    """A token reduction's launch plan: the component table, which per-token tensor the kernel reads as
    its first and second, where each result lies in the flat output, tile sizes and tile counts."""

    table: torch.Tensor
    per_token: tuple[int, ...]  # indices into the caller's per-token tensors
    views: tuple[tuple[int, tuple[int, int]], ...]  # (offset, shape) of each job's result
    size: int
    total_tiles: int
    max_tiles: int
    blocks: tuple[int, int, int, int]  # choose_blocks' (P, J, L, Q) = (BLOCK_N, BLOCK_J, BLOCK_K, BLOCK_M)


def _reduce_plan(jobs: Sequence[ReduceJob], sources: Sequence[torch.Tensor]) -> _ReducePlan:
    """The plan of ``jobs``, whose per-token operands are views of ``sources`` (dy and x)."""
    operands = [v.tensor for job in jobs for v in job[:3]]
    assert all(t.dtype == operands[0].dtype for t in operands), "the kernel casts every address to one type"
    per_token: list[int] = []  # the (at most two) sources L_t and R_t come from, in first-use order
    for left, _, right, _ in jobs:
        for view in (left, right):
            index = next(i for i, t in enumerate(sources) if view.tensor is t)
            if index not in per_token:
                per_token.append(index)
    assert len(per_token) <= 2, "reductions read at most two per-token tensors (dy and x)"
    which = {id(sources[index]): slot for slot, index in enumerate(per_token)}
    # out (M×N) = (L (M×K) · S (K×J)) · R (J×N) is the sandwich's shape transposed: P, J, L, Q = N, J, K, M
    blocks = choose_blocks(
        [(right.cols, shared.cols, left.cols, left.rows) for left, shared, right, _ in jobs],
        fp32_operands=operands[0].dtype == torch.float32,
    )
    bn, bm = blocks[0], blocks[3]
    rows, views, offset = [], [], 0
    for left, shared, right, transposed in jobs:
        m_dim, n_dim = left.rows, right.cols
        assert shared.rows == left.cols and right.rows == shared.cols
        tiles_n = _cdiv(n_dim, bn)
        rows.append(
            (
                which[id(left.tensor)],
                shared.tensor.data_ptr(),
                which[id(right.tensor)],
                m_dim,
                left.cols,
                shared.cols,
                n_dim,
                left.stride_t,
                left.stride_r,
                left.stride_c,
                shared.stride_r,
                shared.stride_c,
                right.stride_t,
                right.stride_r,
                right.stride_c,
                offset,
                1 if transposed else n_dim,
                m_dim if transposed else 1,
                tiles_n,
                _cdiv(m_dim, bm) * tiles_n,
            )
        )
        views.append((offset, (n_dim, m_dim) if transposed else (m_dim, n_dim)))
        offset += m_dim * n_dim
    return _ReducePlan(
        table=_component_table(tuple(rows), operands[0].device),
        per_token=tuple(per_token),
        views=tuple(views),
        size=offset,
        total_tiles=sum(r[-1] for r in rows),
        max_tiles=max(r[-1] for r in rows),
        blocks=blocks,
    )


def _reduce_partials(
    plan: _ReducePlan, sources: Sequence[torch.Tensor], factor: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """The plan's reductions in one launch: fp32 partial sums (splits, total), one per share of the tokens.

    ``sources`` are the per-token tensors the plan was built on; ``factor`` any factor (the kernel reads
    every factor as its dtype).
    """
    first, last = sources[plan.per_token[0]], sources[plan.per_token[-1]]
    splits = _num_splits(num_tokens, plan.total_tiles, first.device)
    per_split = _cdiv(max(num_tokens, 1), splits)
    splits = _cdiv(max(num_tokens, 1), per_split)
    workspace = new_output((splits, plan.size), torch.float32, first.device)
    _kron_token_reduce_grouped_kernel[(len(plan.views) * plan.max_tiles * splits,)](
        first,
        last,
        plan.table,
        workspace,
        factor,
        num_tokens,
        per_split,
        len(plan.views),
        plan.max_tiles,
        workspace.stride(0),
        DOT_FP32=dot_in_fp32(factor.dtype),
        **reduce_block_constexprs(plan.blocks),
        num_warps=4,
    )
    return workspace


def token_reduce_grouped(
    plan: _ReducePlan, sources: Sequence[torch.Tensor], factor: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Σ_t (L_t · S) · R_t for every job of the plan, in one launch and one sum over the token splits.

    Returns the flat fp32 results and one contiguous view of it per job: (L.rows, R.cols), or its
    transpose when the job asks (so a result lands in its factor's row-major layout).
    """
    workspace = _reduce_partials(plan, sources, factor, num_tokens)
    flat = workspace.sum(0) if workspace.shape[0] > 1 else workspace[0]
    return flat, [flat[o : o + shape[0] * shape[1]].view(shape) for o, shape in plan.views]


def grouped_launch_allowed() -> bool:
    """Whether fp32 atomics may sum the adapter (and the split-K GEMV): the order then varies run to run.

    ``torch.use_deterministic_algorithms(True)`` turns them off: the adapter takes the rowwise schedule,
    which forms each row's sum in a fixed order, bit for bit reproducible.
    """
    return not torch.are_deterministic_algorithms_enabled()


@functools.lru_cache(maxsize=16384)
def _component_table(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """The device copy of a component table. Keyed on its own contents (factor addresses, shapes, strides;
    never activations), so a hit is always right; a layer's factors keep their addresses across steps, so
    training copies its tables once. A few hundred bytes each: 16k entries cover ~5000 adapted layers, so
    a table captured in a CUDA graph is not evicted while the graph lives in any realistic model."""
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        # (While capturing, a miss cannot be served: a pageable copy fails loudly instead of recording a
        # copy from a host buffer that would be reused before the graph replays.)
        return host.to(device)
    # A miss happens whenever the factors move (e.g. cast per call from fp32 under autocast): a pinned,
    # non-blocking copy keeps it from stalling the host until the GPU drains.
    return host.pin_memory().to(device, non_blocking=True)


Job = tuple[_View, _View, _View, _View]  # (M_t, S_1, S_2, out_t) of one component's sandwich


ROWWISE_MIN_TOKENS = 512  # from here on the row-owning schedule; a guess until a GPU run sweeps it
SCHEDULES = ("atomic", "rowwise")


def adapter_schedule(num_tokens: int) -> str:
    """How the one adapter launch splits its work (``MOKA_ADAPTER_SCHEDULE`` overrides):

    * ``"atomic"``: a program per (token, tile, component), adding with fp32 atomics into a zeroed buffer:
      r·tiles·T programs, so few tokens still fill the GPU (decoding);
    * ``"rowwise"``: a program per token, owning its output row through all components: the row is
      written once (no zero fill, no read-modify-write in DRAM) and the sum is deterministic, so it is the
      only schedule under ``torch.use_deterministic_algorithms(True)``.
    """
    forced = os.environ.get("MOKA_ADAPTER_SCHEDULE")
    if forced:
        if forced not in SCHEDULES:
            raise ValueError(f"MOKA_ADAPTER_SCHEDULE: expected one of {SCHEDULES}, got {forced!r}")
        if forced == "atomic" and not grouped_launch_allowed():
            raise RuntimeError("MOKA_ADAPTER_SCHEDULE=atomic: fp32 atomics are off in deterministic mode")
        return forced
    if not grouped_launch_allowed() or num_tokens >= ROWWISE_MIN_TOKENS:
        return "rowwise"
    return "atomic"


@dataclass(frozen=True)
class _SandwichPlan:
    """A sandwich launch's plan: the component table, tile sizes (:func:`choose_blocks`) and
    the most tiles of a component."""

    table: torch.Tensor
    blocks: tuple[int, int, int, int]  # BLOCK_P, BLOCK_J, BLOCK_L, BLOCK_Q
    max_tiles: int


def _sandwich_plan(jobs: Sequence[Job]) -> _SandwichPlan:
    m_rows, out = jobs[0][0].tensor, jobs[0][3].tensor
    factors = [t for _, s1, s2, _ in jobs for t in (s1.tensor, s2.tensor)]
    assert all(j[0].tensor is m_rows and j[3].tensor is out for j in jobs)
    assert out.dtype in (torch.float32, m_rows.dtype), "out: fp32, or the rows' dtype for the rowwise schedule"
    assert all(f.dtype == factors[0].dtype for f in factors), "the kernel casts every address to one type"
    fp32_operands = factors[0].dtype == torch.float32
    bp, bj, bl, bq = choose_blocks([(s1.rows, s1.cols, m.cols, s2.cols) for m, s1, s2, _ in jobs], fp32_operands)
    rows = []
    for m, s1, s2, o in jobs:
        tiles_q = _cdiv(s2.cols, bq)
        rows.append(
            (
                s1.tensor.data_ptr(),
                s2.tensor.data_ptr(),
                s1.rows,
                s1.cols,
                m.cols,
                s2.cols,
                m.stride_r,
                m.stride_c,
                s1.stride_r,
                s1.stride_c,
                s2.stride_r,
                s2.stride_c,
                o.stride_r,
                o.stride_c,
                tiles_q,
                _cdiv(s1.rows, bp) * tiles_q,
            )
        )
    return _SandwichPlan(_component_table(tuple(rows), out.device), (bp, bj, bl, bq), max(r[-1] for r in rows))


def _adapter_plan(kind: str, rows: torch.Tensor, out: torch.Tensor, a_factors, b_factors) -> _SandwichPlan:
    """The plan of the adapter forward (``kind="forward"``: rows = x, out = y) or dx (``"dx"``: rows = dy,
    out = dx). A plan holds no activation address, so a layer's calls share it."""
    if a_factors[0].dtype != rows.dtype:  # before the plan cache, whose key holds the factors' dtype only
        # the interpreter would upcast both; tl.dot on a GPU refuses the mix
        raise TypeError(
            f"factors: expected the dtype of the rows they multiply ({rows.dtype}), got {a_factors[0].dtype}; cast "
            "them first (moka_linear does: factors_in_dtype)"
        )
    key = (
        kind,
        tile_policy(),
        factor_signature(a_factors, b_factors),
        a_factors[0].dtype,
        rows.stride(1),
        out.stride(1),
        out.device,
    )
    make_jobs = _forward_jobs if kind == "forward" else _dx_jobs
    return _PLANS.get(key, lambda: _sandwich_plan(make_jobs(rows, out, a_factors, b_factors)))


@dataclass
class AdapterLaunch:
    """One adapter launch's arguments: the component table, tile sizes and gate, for the standalone kernels
    (``sandwich_grouped``) or for atomic programs hosted by another launch (the NF4 GEMV's, when decoding:
    ``adapter_launch``). ``none`` gives placeholders for a launch without the adapter."""

    rows: torch.Tensor  # the per-token input rows every component reads
    out: torch.Tensor  # the output rows every component writes: fp32 (rowwise: or the inputs' dtype)
    table: torch.Tensor
    gate: torch.Tensor
    factor: torch.Tensor
    scale: float
    num_components: int
    max_tiles: int
    gate_mode: int  # 0: gate holds c (fp32); 1: c = scale·softmax(gate); 2: c_i = scale / r
    blocks: tuple[int, int, int, int]  # BLOCK_P, BLOCK_J, BLOCK_L, BLOCK_Q

    @property
    def programs(self) -> int:
        """Programs of the atomic schedule: token × tile × component."""
        return self.num_components * self.max_tiles * self.out.shape[0]

    @property
    def stride_rows(self) -> int:
        return self.rows.stride(0)

    def kernel_constexprs(self, prefix: str = "") -> dict:
        names = ("GATE", "R_PAD", "BLOCK_P", "BLOCK_J", "BLOCK_L", "BLOCK_Q")
        values = (self.gate_mode, _next_power_of_2(self.num_components), *self.blocks)
        return {prefix + name: value for name, value in zip(names, values, strict=True)}

    @property
    def constexprs(self) -> dict:
        """The hosting NF4 kernel's ``AD_*`` constexprs."""
        return self.kernel_constexprs("AD_")

    @staticmethod
    def none(like: torch.Tensor) -> AdapterLaunch:
        return AdapterLaunch(like, like.new_empty((0, 1)), like, like, like, 0.0, 1, 0, 0, (16, 16, 16, 16))


def _prepare(
    plan: _SandwichPlan,
    rows: torch.Tensor,
    out: torch.Tensor,
    factor: torch.Tensor,
    gate: torch.Tensor | None,
    gate_mode: int,
    scale: float,
) -> AdapterLaunch:
    return AdapterLaunch(
        rows=rows,
        out=out,
        table=plan.table,
        gate=gate if gate is not None else plan.table,
        factor=factor,
        scale=float(scale),
        num_components=plan.table.shape[0],
        max_tiles=plan.max_tiles,
        gate_mode=gate_mode,
        blocks=plan.blocks,
    )


def sandwich_grouped(ad: AdapterLaunch, schedule: str = "atomic", accumulate: bool = True) -> None:
    """out_t (+)= Σ_i c_i · S1_i · M_t,i · S2_i for every token t, all components in one launch.

    All components share the per-token tensor (M, ``ad.rows``) and the output (``ad.out``: fp32, or for the
    rowwise schedule also the rows' dtype). Gate mode 0: ``ad.gate`` holds c (fp32); 1: c =
    scale·softmax(gate); 2: c_i = scale / r. ``schedule`` as in :func:`adapter_schedule`; the atomic one
    always adds (fp32 atomics), so its output must be fp32 and start zeroed (or hold partial sums).
    """
    assert schedule == "rowwise" or ad.out.dtype == torch.float32, "the atomic schedule adds into fp32"
    if ad.out.shape[0] == 0:
        return
    args = (ad.rows, ad.out, ad.table, ad.gate, ad.factor, ad.scale, ad.num_components)
    strides = (ad.stride_rows, ad.out.stride(0))
    dot_fp32 = dot_in_fp32(ad.rows.dtype)
    if schedule == "atomic":
        assert accumulate, "the atomic schedule adds into its output"
        _kron_sandwich_grouped_kernel[(ad.programs,)](
            *args, ad.max_tiles, *strides, DOT_FP32=dot_fp32, **ad.kernel_constexprs(), num_warps=4
        )
    else:
        _kron_sandwich_rowwise_kernel[(ad.out.shape[0],)](
            *args, *strides, ACCUMULATE=accumulate, DOT_FP32=dot_fp32, **ad.kernel_constexprs(), num_warps=4
        )


def adapter_launch(
    x2d: torch.Tensor,
    out: torch.Tensor,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    gate_logits: torch.Tensor | None,
    scale: float,
) -> AdapterLaunch:
    """The forward Σ_i c_i (A_i ⊗ B_i) x_t, c = scale·softmax(g), as atomic programs adding into ``out``
    (fp32, T × N), to be run by a launch that hosts them (``nf4_matmul_accumulate``)."""
    assert out.dtype == torch.float32 and x2d.stride(1) == 1 and out.stride(1) == 1
    plan = _adapter_plan("forward", x2d, out, a_factors, b_factors)
    gate_mode = 1 if gate_logits is not None else 2
    return _prepare(plan, x2d, out, a_factors[0], gate_logits, gate_mode, scale)


def _forward_jobs(x2d: torch.Tensor, out: torch.Tensor, a_factors, b_factors) -> list[Job]:
    """Each component's forward as a sandwich, in its cheaper contraction order."""
    jobs = []
    for a, b in zip(a_factors, b_factors, strict=True):
        (a1, a2), (b1, b2) = a.shape, b.shape
        x_t, y_t = _per_token(x2d, a2, b2), _per_token(out, a1, b1)
        if contraction_order(a.shape, b.shape) == "b_first":  # A · (X · Bᵀ)
            jobs.append((x_t, _mat(a), _mat(b).t(), y_t))
        else:  # Yᵀ = B · (Xᵀ · Aᵀ)
            jobs.append((x_t.t(), _mat(b), _mat(a).t(), y_t.t()))
    return jobs


def _dx_jobs(grad_out: torch.Tensor, out: torch.Tensor, a_factors, b_factors) -> list[Job]:
    """Each component's adapter dx, Aᵀ · G_t · B, in its cheaper contraction order."""
    jobs = []
    for a, b in zip(a_factors, b_factors, strict=True):
        (a1, a2), (b1, b2) = a.shape, b.shape
        g_t, dx_t = _per_token(grad_out, a1, b1), _per_token(out, a2, b2)
        if a2 * b1 * (a1 + b2) <= a1 * b2 * (b1 + a2):  # dXᵀ = Bᵀ · (Gᵀ · A)
            jobs.append((g_t.t(), _mat(b).t(), _mat(a), dx_t.t()))
        else:  # dX = Aᵀ · (G · B): a1·b2·(b1 + a2) MACs
            jobs.append((g_t, _mat(a).t(), _mat(b), dx_t))
    return jobs


def _run_adapter(
    kind: str,
    rows: torch.Tensor,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    coeffs: torch.Tensor | None,
    gate_logits: torch.Tensor | None,
    scale: float,
    out: torch.Tensor | None,
    width: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Run the adapter forward or dx in one launch into ``out`` (fp32, added to) or a new (T, width) tensor:
    in ``out_dtype`` under the rowwise schedule, fp32 under the atomic one (its atomics add in fp32)."""
    shape = (rows.shape[0], width)
    schedule = adapter_schedule(shape[0])
    accumulate = out is not None or schedule == "atomic"
    if out is None and schedule == "atomic":
        out = torch.zeros(shape, dtype=torch.float32, device=rows.device)
    elif out is None:
        out = new_output(shape, out_dtype, rows.device)
    else:
        assert out.dtype == torch.float32 and tuple(out.shape) == shape
    plan = _adapter_plan(kind, rows, out, a_factors, b_factors)
    if coeffs is not None:
        ad = _prepare(plan, rows, out, a_factors[0], coeffs, 0, 1.0)
    else:
        ad = _prepare(plan, rows, out, a_factors[0], gate_logits, 1 if gate_logits is not None else 2, scale)
    sandwich_grouped(ad, schedule, accumulate)
    return out


def kron_mixture_forward(
    x2d: torch.Tensor,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    coeffs: torch.Tensor | None = None,
    *,
    gate_logits: torch.Tensor | None = None,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Σ_i c_i (A_i ⊗ B_i) x_t for every row of x2d, as a (T, N) tensor: fp32, or ``out_dtype`` when the
    rowwise schedule runs (a caller that adds it to a half-precision GEMM's output then skips a cast pass).

    c is ``coeffs`` (fp32, r) if given, else scale·softmax(gate_logits), computed in the kernel (scale / r
    when ``gate_logits`` is None). With ``out`` (fp32, T × N) the result is added into it.
    """
    width = a_factors[0].shape[0] * b_factors[0].shape[0]
    return _run_adapter("forward", x2d, a_factors, b_factors, coeffs, gate_logits, scale, out, width, out_dtype)


def kron_mixture_backward_dx(
    grad_out: torch.Tensor,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    coeffs: torch.Tensor | None = None,
    *,
    gate_logits: torch.Tensor | None = None,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Σ_i c_i Aᵢᵀ G_t Bᵢ for every row of grad_out, as a (T, K) tensor (added into ``out``): fp32, or
    ``out_dtype`` when the rowwise schedule runs, as in :func:`kron_mixture_forward`.

    c as in :func:`kron_mixture_forward`: ``coeffs``, else scale·softmax(gate_logits) in the kernel.
    """
    width = a_factors[0].shape[1] * b_factors[0].shape[1]
    return _run_adapter("dx", grad_out, a_factors, b_factors, coeffs, gate_logits, scale, out, width, out_dtype)


def kron_factor_grads(
    grad_out: torch.Tensor,
    xa: torch.Tensor,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    requests: Sequence[tuple[int, str]],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The raw factor gradients M_i = Σ_t G_t B_i X_tᵀ (request ``(i, "a")``, a1×a2) and
    R_i = Σ_t G_tᵀ A_i X_t (``(i, "b")``, b1×b2), all in one launch, fp32.

    Returns the flat results, in request order and each in its factor's layout, and a view per request.
    Each product is grouped so that its per-token intermediate is the component's small one (a1×b2 for
    ``a_first``, a2×b1 for ``b_first``): the other grouping is the transposed reduction, stored transposed.
    """
    sources = (grad_out, xa)
    plan = _factor_grad_plan(grad_out, xa, a_factors, b_factors, requests)
    return token_reduce_grouped(plan.reduce, sources, a_factors[0], grad_out.shape[0])


def kron_factor_backward(
    grad_out: torch.Tensor,
    xa: torch.Tensor,
    a_factors: Sequence[torch.Tensor],
    b_factors: Sequence[torch.Tensor],
    requests: Sequence[tuple[int, str]],
    gate_logits: torch.Tensor | None,
    scale: float,
    *,
    gate_grad: bool,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""The finished factor gradients of ``requests``, in two launches: the token reduction
    (:func:`kron_factor_grads`'s raw M_i, R_i) and one pass over its partial sums that forms

    .. math::  dA_i = c_i M_i, \quad dB_i = c_i R_i, \quad c = s \cdot \mathrm{softmax}(g)

    flat in request order, each in its factor's layout, in ``grad_dtype`` (default: the factors' dtype;
    fp32 for the fp32 master factors a half-precision layer's factors were copied from), c_i = s / r
    without a gate. With
    ``gate_grad`` (the gate's logits given, and ``requests`` starting with one per component in order, as
    ``reference.factor_requests`` makes them) it also returns the logits' gradient

    .. math::  d\alpha_i = s \langle F_i, \mathrm{raw}_i \rangle, \quad
               dg = \alpha \odot (d\alpha - \langle \alpha, d\alpha \rangle)

    with F_i the factor of request i (A_i for M_i, B_i for R_i). Same results as
    ``reference.finish_factor_grads`` and ``reference.softmax_gate_backward`` on the raw sums.
    """
    r = len(a_factors)
    if gate_grad and (gate_logits is None or [i for i, _ in requests[:r]] != list(range(r))):
        raise ValueError("gate_grad: needs gate_logits and requests starting with one per component, in order")
    sources = (grad_out, xa)
    plan = _factor_grad_plan(grad_out, xa, a_factors, b_factors, requests)
    workspace = _reduce_partials(plan.reduce, sources, a_factors[0], grad_out.shape[0])
    grads = new_output((plan.reduce.size,), grad_dtype or a_factors[0].dtype, grad_out.device)
    gate = gate_logits if gate_logits is not None else plan.finish
    gate_out = new_output((r,), gate_logits.dtype, grad_out.device) if gate_grad else grads
    num_requests = len(requests)
    _factor_grad_finish_kernel[(num_requests + int(gate_grad),)](
        workspace,
        plan.finish,
        gate,
        grads,
        gate_out,
        a_factors[0],
        float(scale),
        r,
        num_requests,
        workspace.shape[0],
        workspace.stride(0),
        GATE=1 if gate_logits is not None else 2,
        NEED_GATE_GRAD=gate_grad,
        R_PAD=_next_power_of_2(r),
        BLOCK=1024,
        num_warps=4,
    )
    return grads, (gate_out if gate_grad else None)


@dataclass(frozen=True)
class _FactorGradPlan:
    reduce: _ReducePlan
    finish: torch.Tensor  # int64 (requests, FINISH_COLUMNS)


def _factor_grad_plan(grad_out, xa, a_factors, b_factors, requests) -> _FactorGradPlan:
    key = ("reduce", tile_policy(), tuple(requests), factor_signature(a_factors, b_factors), a_factors[0].dtype)
    key += (grad_out.stride(), xa.stride(), grad_out is xa, grad_out.device)

    def build() -> _FactorGradPlan:
        jobs = _factor_grad_jobs(grad_out, xa, a_factors, b_factors, requests)
        reduce = _reduce_plan(jobs, (grad_out, xa))
        rows = []
        for (i, which), (offset, _) in zip(requests, reduce.views, strict=True):
            factor = (a_factors if which == "a" else b_factors)[i]
            rows.append((offset, factor.numel(), i, factor.data_ptr(), factor.shape[1], *factor.stride()))
        return _FactorGradPlan(reduce, _component_table(tuple(rows), grad_out.device))

    return _PLANS.get(key, build)


def _factor_grad_jobs(grad_out, xa, a_factors, b_factors, requests) -> list[ReduceJob]:
    jobs: list[ReduceJob] = []
    for i, which in requests:
        a, b = a_factors[i], b_factors[i]
        (a1, a2), (b1, b2) = a.shape, b.shape
        g_t, x_t = _per_token(grad_out, a1, b1), _per_token(xa, a2, b2)
        a_first = contraction_order(a.shape, b.shape) == "a_first"
        if which == "a":
            if a_first:  # Σ (G_t B) X_tᵀ: intermediate G_t B is a1×b2
                jobs.append((g_t, _mat(b), x_t.t(), False))
            else:  # Mᵀ = Σ (X_t Bᵀ) G_tᵀ: intermediate X_t Bᵀ is a2×b1
                jobs.append((x_t, _mat(b).t(), g_t.t(), True))
        elif which == "b":
            if a_first:  # Rᵀ = Σ (X_tᵀ Aᵀ) G_t: intermediate X_tᵀ Aᵀ is b2×a1
                jobs.append((x_t.t(), _mat(a).t(), g_t, True))
            else:  # Σ (G_tᵀ A) X_t: intermediate G_tᵀ A is b1×a2
                jobs.append((g_t.t(), _mat(a), x_t, False))
        else:
            raise ValueError(f"requests: expected (component, 'a' or 'b'), got {(i, which)!r}")
    return jobs
