"""Kernel edge cases a mutation review found no test pinned: large gate logits, plan-cache keys that must see
strides, masks at tile edges, split-K accumulation, the fp32 dot (each test fails on the mutant it was written
against, under the Triton interpreter)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl

import moka_kernels.ops as ops
from moka_kernels.ops.kron_mixture import kron_factor_backward, kron_factor_grads, kron_mixture_forward
from moka_kernels.ops.nf4_matmul import _decode_nf4_rows, _nf4_args
from moka_kernels.reference import kron_component

SHAPES = [(2, 9, 12, 4), (8, 2, 3, 18), (24, 3, 1, 12)]  # 24x36, r = 3


def _factors(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = [torch.randn(a1, a2, generator=gen).to(dtype) for a1, a2, _, _ in shapes]
    b = [torch.randn(b1, b2, generator=gen).to(dtype) for _, _, b1, b2 in shapes]
    return a, b


def _mix64(x, a_f, b_f, c):
    return sum(ci * kron_component(x.double(), a.double(), b.double()) for ci, a, b in zip(c, a_f, b_f, strict=True))


@pytest.fixture(params=[False, True], ids=["atomic", "rowwise"])
def mode(request):
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield
    torch.use_deterministic_algorithms(was)


def test_softmax_gate_with_large_logits(mode):
    a_f, b_f = _factors(SHAPES)
    logits = torch.tensor([100.0, 0.0, -5.0])
    x = torch.randn(5, 36)
    got = kron_mixture_forward(x, a_f, b_f, gate_logits=logits, scale=1.0)
    alpha = torch.softmax(logits.double(), 0)
    torch.testing.assert_close(got.double(), _mix64(x, a_f, b_f, alpha), rtol=1e-4, atol=1e-4)


def test_gate_gradient_with_large_logits():
    a_f, b_f = _factors(SHAPES)
    logits = torch.tensor([100.0, 0.0, -5.0])
    x, g = torch.randn(5, 36), torch.randn(5, 24)
    requests = [(0, "a"), (1, "a"), (2, "a")]
    _, dg = kron_factor_backward(g, x, a_f, b_f, requests, logits, 1.0, gate_grad=True)
    assert torch.isfinite(dg).all(), dg


def test_plan_cache_sees_a_transposed_factor_at_the_same_address(mode):
    shapes = [(4, 4, 6, 6)]  # a square A: A and A.t() share address and shape
    a_f, b_f = _factors(shapes)
    x = torch.randn(3, 24)
    c = torch.ones(1)
    kron_mixture_forward(x, a_f, b_f, c)  # builds the plan of A
    at = [a_f[0].t()]
    torch.testing.assert_close(
        kron_mixture_forward(x, at, b_f, c).double(), _mix64(x, at, b_f, [1.0]), rtol=1e-4, atol=1e-4
    )


def test_adapter_plan_sees_the_rows_column_stride(mode):
    a_f, b_f = _factors(SHAPES)
    c = torch.ones(3)
    x = torch.randn(4, 36)
    kron_mixture_forward(x, a_f, b_f, c)
    xs = torch.randn(4, 72)[:, ::2]  # column stride 2
    torch.testing.assert_close(
        kron_mixture_forward(xs, a_f, b_f, c).double(), _mix64(xs, a_f, b_f, [1, 1, 1]), rtol=1e-4, atol=1e-4
    )


def test_factor_grad_plan_sees_the_rows_stride():
    a_f, b_f = _factors(SHAPES)
    g = torch.randn(5, 24)
    x = torch.randn(5, 36)
    kron_factor_grads(g, x, a_f, b_f, [(0, "a"), (1, "b")])
    xs = torch.randn(5, 40)[:, :36]  # row stride 40
    got = kron_factor_grads(g, xs, a_f, b_f, [(0, "a"), (1, "b")])[1]
    want = kron_factor_grads(g, xs.contiguous(), a_f, b_f, [(0, "a"), (1, "b")])[1]
    for gt, w in zip(got, want, strict=True):
        torch.testing.assert_close(gt, w)


def test_atomic_adapter_writes_nothing_outside_its_rows():
    a_f, b_f = _factors(SHAPES)
    x = torch.randn(3, 36)
    buf = torch.full((3, 24 + 32), -0.0)
    buf[:, :24] = 0.0
    kron_mixture_forward(x, a_f, b_f, torch.ones(3), out=buf[:, :24])
    assert torch.signbit(buf[:, 24:]).all(), "the adapter wrote outside its output rows"


def test_fp32_takes_the_ieee_dot():
    assert ops.dot_in_fp32(torch.float32)


def test_nf4_transposed_gemm_reads_no_dy_column_past_n():
    from moka_kernels import dequantize_nf4, quantize_nf4
    from moka_kernels.ops.nf4_matmul import nf4_matmul_t

    w = quantize_nf4(torch.randn(40, 96), blocksize=32)
    big = torch.full((5, 64), float("nan"))
    big[:, :40] = torch.randn(5, 40)
    dy = big[:, :40]  # row stride 64, NaN right after each row
    got = nf4_matmul_t(dy, w)
    want = dy.double() @ dequantize_nf4(w, torch.float32).double()
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_accumulate_with_the_adapter_at_more_rows_than_one_m_tile():
    from moka_kernels import dequantize_nf4, quantize_nf4
    from moka_kernels.ops.kron_mixture import adapter_launch
    from moka_kernels.ops.nf4_matmul import nf4_matmul_accumulate

    shapes = [(8, 12, 5, 8), (2, 32, 20, 3), (40, 2, 1, 48)]  # 40 x 96
    a_f, b_f = _factors(shapes)
    w = quantize_nf4(torch.randn(40, 96), blocksize=32)
    x = torch.randn(40, 96)  # two 32-row M-tiles under the interpreter
    acc = torch.zeros(40, 40)
    nf4_matmul_accumulate(x, w, acc, adapter=adapter_launch(x, acc, a_f, b_f, None, 0.7))
    want = x.double() @ dequantize_nf4(w, torch.float32).double().t() + _mix64(x, a_f, b_f, [0.7 / 3] * 3)
    torch.testing.assert_close(acc.double(), want, rtol=1e-4, atol=1e-4)


def test_nf4_gemm_with_a_k_tile_past_k(monkeypatch):
    """GPU configs take BLOCK_K = 64/128, so a K tile can cross K (K = 96): x's K mask matters."""
    import triton

    from moka_kernels import dequantize_nf4, quantize_nf4
    from moka_kernels.ops import nf4_matmul as nm

    cfg = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    monkeypatch.setattr(nm._nf4_matmul_kernel, "configs", cfg)
    monkeypatch.setattr(nm._nf4_matmul_kernel, "cache", {})
    w = quantize_nf4(torch.randn(40, 96), blocksize=32, double_quant=True)
    x = torch.randn(33, 96)
    got = nm.nf4_matmul(x, w)
    want = x.double() @ dequantize_nf4(w, torch.float32).double().t()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_accumulate_adds_where_the_device_would_not_split_k(monkeypatch):
    """On a GPU split_k_for returns 1 for K < 512 (k // 256 < 2); the accumulating GEMV must still add."""
    from moka_kernels import dequantize_nf4, quantize_nf4
    from moka_kernels.ops import nf4_matmul as nm

    monkeypatch.setattr(nm, "split_k_for", lambda m, n, k, *a, **kw: 1)
    w = quantize_nf4(torch.randn(40, 96), blocksize=32)
    x = torch.randn(3, 96)
    partial = torch.randn(3, 40)
    acc = partial.clone()
    nm.nf4_matmul_accumulate(x, w, acc)
    want = partial.double() + x.double() @ dequantize_nf4(w, torch.float32).double().t()
    torch.testing.assert_close(acc.double(), want, rtol=1e-4, atol=1e-4)


def test_gate_gradient_writes_only_r_entries(monkeypatch):
    """r = 3 pads the gate to 4 lanes: the 4th lane must not be stored past the (r,) gradient."""
    import moka_kernels.ops.kron_mixture as km

    tails = []
    real = km.new_output

    def guarded(shape, dtype, device):
        if len(shape) == 1 and shape[0] == 3:
            buf = torch.full((shape[0] + 8,), 12345.0, dtype=dtype, device=device)
            tails.append(buf[shape[0] :])
            return buf[: shape[0]]
        return real(shape, dtype, device)

    monkeypatch.setattr(km, "new_output", guarded)
    a_f, b_f = _factors(SHAPES)
    x, g = torch.randn(5, 36), torch.randn(5, 24)
    kron_factor_backward(g, x, a_f, b_f, [(0, "a"), (1, "a"), (2, "b")], torch.randn(3), 1.0, gate_grad=True)
    assert tails and all((t == 12345.0).all() for t in tails), tails


def test_half_dot_branch_gets_operands_of_one_dtype(monkeypatch):
    """Run the GPU's non-DOT_FP32 branch for fp16 under the interpreter: tl.dot refuses mixed dtypes there too."""
    import moka_kernels.ops.kron_mixture as km

    monkeypatch.setattr(km, "dot_in_fp32", lambda dtype: dtype == torch.float32)
    a_f, b_f = _factors(SHAPES, torch.float16)
    x = torch.randn(3, 36).to(torch.float16)
    got = kron_mixture_forward(x, a_f, b_f, torch.ones(3))
    torch.testing.assert_close(got.double(), _mix64(x, a_f, b_f, [1, 1, 1]), rtol=2e-2, atol=2e-2)


@triton.jit
def _whole_decode_tile(
    out_ptr, p0, p1, p2, p3, p4, p5, N, K, BS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DQ: tl.constexpr
):
    """Stores ``_decode_nf4_rows``' whole BN × BK tile at column 64, masks and all, unmasked."""
    offs_n = tl.arange(0, BN)
    tile = _decode_nf4_rows(p0, p1, p2, p3, p4, p5, offs_n, 64, N, K, BS, BN, BK, DQ)
    tl.store(out_ptr + offs_n[:, None] * BK + tl.arange(0, BK)[None, :], tile)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double_quant"])
def test_nf4_decode_tile_is_zero_outside_w(double_quant):
    """``_decode_nf4_rows`` promises zeros past W's rows and columns; with double quantization a masked scale
    read code[0]·0 + offset ≠ 0 before ``tl.where`` (harmless only while every caller masks the other operand)."""
    from moka_kernels import dequantize_nf4, quantize_nf4

    w = quantize_nf4(torch.randn(5, 96) + 3.0, blocksize=32, double_quant=double_quant)  # offset ≠ 0
    out = torch.full((8, 64), float("nan"))
    _whole_decode_tile[(1,)](out, *_nf4_args(w), 5, 96, BS=32, BN=8, BK=64, DQ=double_quant)
    want = torch.zeros(8, 64)
    want[:5, :32] = dequantize_nf4(w, torch.float32)[:, 64:]
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("tokens", [1, 40, 300], ids=["decode", "middle", "prefill"])
def test_nf4_autotuners_skip_tiles_that_cannot_win_at_the_token_count(monkeypatch, tokens):
    """Decode-size M times no BLOCK_M ≥ 128 tile and M ≥ 256 no BLOCK_M = 16 (half the compiles and timings
    of a GPU's first call per shape); in between every config is timed."""
    from triton.runtime import autotuner

    from moka_kernels import dequantize_nf4, quantize_nf4
    from moka_kernels.ops import nf4_matmul as nm

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": 32}) for bm in (16, 64, 128)]
    monkeypatch.setattr(autotuner.Autotuner, "do_bench", property(lambda self: lambda fn, quantiles=None: [1.0] * 3))
    w = quantize_nf4(torch.randn(32, 64))
    x, dy = torch.randn(tokens, 64), torch.randn(tokens, 32)
    want = {1: {16, 64}, 40: {16, 64, 128}, 300: {64, 128}}[tokens]
    for kernel, call in ((nm._nf4_matmul_kernel, nm.nf4_matmul), (nm._nf4_matmul_t_kernel, nm.nf4_matmul_t)):
        assert kernel.early_config_prune is nm.configs_for_token_count
        monkeypatch.setattr(kernel, "configs", configs)
        monkeypatch.setattr(kernel, "cache", {})
        got = call(x, w) if call is nm.nf4_matmul else call(dy, w)
        assert {c.kwargs["BLOCK_M"] for c in kernel.configs_timings} == want
        dense = dequantize_nf4(w, torch.float32)
        torch.testing.assert_close(got, x @ dense.T if call is nm.nf4_matmul else dy @ dense, rtol=1e-4, atol=1e-4)
    assert nm.configs_for_token_count(configs[2:], {"M_BUCKET": 1}) == configs[2:]  # never empty
