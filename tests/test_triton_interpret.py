"""The Triton kernels, run by the Triton interpreter on CPU (TRITON_INTERPRET=1, set in conftest.py).

Every kernel is checked against the plain-PyTorch reference, for the forward and every gradient, on odd
shapes, with kernel outputs pre-filled with NaN so that an unwritten tile fails.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from conftest import assert_close_rel
from helpers import leaves, make_problem
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import moka_kernels.ops as ops
from moka.config import auto_component_shapes
from moka_kernels import dequantize_nf4, moka_linear, quantize_nf4, select_backend
from moka_kernels.ops.kron_mixture import (
    kron_factor_backward,
    kron_factor_grads,
    kron_mixture_backward_dx,
    kron_mixture_forward,
)
from moka_kernels.ops.nf4_matmul import nf4_matmul, nf4_matmul_t
from moka_kernels.reference import contraction_order, kron_component, moka_linear_materialized

# Relative RMS error against an fp64 reference of the same inputs; bf16 outputs round at 2^-9. bf16 was 2e-2 until a
# mutation audit showed a 2% systematic error passing; the largest seen since is 1.26e-2 (a bf16 factor gradient at
# T = 33), the forward ~3e-3. (Under the interpreter every tl.dot runs in fp32, DOT_FP32: the half-precision dot
# GPUs take is checked by tests/test_gpu.py only.)
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
DTYPES = list(TOL)
TOKENS = [0, 1, 7, 33]


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    assert ops.INTERPRET, "conftest.py must set TRITON_INTERPRET=1 before the kernels are imported"
    monkeypatch.setattr(ops, "POISON_OUTPUTS", True)


@pytest.fixture(params=[False, True], ids=["grouped", "deterministic"])
def deterministic(request):
    """Run a test in the default mode (few tokens: the atomic adapter schedule and split-K) and in
    deterministic mode (the row-owning schedule, no split-K)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(was)


def _check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Relative RMS error within TOL[dtype]."""
    assert not torch.isnan(actual).any(), f"{what}: NaN left in the output (an unwritten tile)"
    if actual.numel() == 0:
        assert actual.shape == expected.shape
        return
    assert_close_rel(actual, expected, TOL[dtype], what)


def _check_reduction(actual, expected, abs_scale, dtype, what: str) -> None:
    """‖actual − expected‖ ≤ TOL[dtype] · ‖Σ|terms|‖ (normwise forward error of a long reduction)."""
    assert not torch.isnan(actual).any(), f"{what}: NaN left in the output (an unwritten tile)"
    err = ((actual.double() - expected).norm() / abs_scale.norm().clamp_min(1e-30)).item()
    assert err <= TOL[dtype], f"{what}: error {err:.3g} of the |terms| scale > {TOL[dtype]:.3g}"


# -- NF4 dequant-GEMMs ------------------------------------------------------------------------------
NF4_LAYERS = [(40, 96, 32), (100, 128, 64), (24, 64, 64)]  # (N, K, blocksize): N, K cross 32-wide tiles


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "fp32-absmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n_out", "k_in", "blocksize"), NF4_LAYERS, ids=str)
def test_nf4_matmul_forward_and_transposed(n_out, k_in, blocksize, dtype, double_quant):
    w = quantize_nf4((torch.randn(n_out, k_in) * 0.1).to(dtype), blocksize, double_quant)
    dense = dequantize_nf4(w, dtype).double()
    bias = torch.randn(n_out).to(dtype)
    for tokens in TOKENS:  # tokens <= 16 take the split-K path
        x = torch.randn(tokens, k_in).to(dtype)
        add = torch.randn(tokens, n_out)
        out = nf4_matmul(x, w, add=add, bias=bias)
        _check(out, x.double() @ dense.T + add.double() + bias.double(), dtype, f"nf4_matmul T={tokens}")
        _check(nf4_matmul(x, w), x.double() @ dense.T, dtype, f"nf4_matmul plain T={tokens}")
        dy = torch.randn(tokens, n_out).to(dtype)
        add_t = torch.randn(tokens, k_in)
        _check(nf4_matmul_t(dy, w, add=add_t), dy.double() @ dense + add_t.double(), dtype, f"nf4_matmul_t T={tokens}")


@pytest.mark.parametrize("rows_64", [False, True], ids=["rows-32bit", "rows-64bit"])
def test_nf4_matmul_strided_inputs_and_row_offset_width(rows_64, monkeypatch):
    """Inputs with non-unit column stride are made unit-stride (the kernels index within a row in 32 bits),
    row-strided views are read in place, and the 64-bit row-offset branch (taken when a matrix spans 2^31
    elements, forced here) gives the same result."""
    import moka_kernels.ops.nf4_matmul as nm

    monkeypatch.setattr(nm, "_spans_2g", lambda *tensors: rows_64)
    w = quantize_nf4(torch.randn(40, 96) * 0.1, 32)
    dense = dequantize_nf4(w, torch.float32).double()
    for tokens in (3, 33):
        x_wide = torch.randn(tokens, 2 * 96)
        x_rows = x_wide[:, :96]  # row stride 192
        x_cols = torch.randn(96, tokens).T  # column stride `tokens`
        for x in (x_rows, x_cols):
            _check(nf4_matmul(x, w), x.double() @ dense.T, torch.float32, f"nf4_matmul strides {x.stride()}")
        dy = torch.randn(40, tokens).T
        _check(nf4_matmul_t(dy, w), dy.double() @ dense, torch.float32, f"nf4_matmul_t strides {dy.stride()}")


# -- Kronecker mixture ------------------------------------------------------------------------------
MIXTURES = {
    "24x36-r1": (24, 36, [(4, 6, 6, 6)]),
    "24x36-r3-mixed": (24, 36, [(2, 9, 12, 4), (8, 2, 3, 18), (24, 3, 1, 12)]),
    "36x24-r5-auto": (36, 24, auto_component_shapes(36, 24, 5)),
    "48x80-r4-wide": (48, 80, [(2, 4, 24, 20), (16, 40, 3, 2), (48, 80, 1, 1), (6, 5, 8, 16)]),
}


def test_mixtures_cover_both_contraction_orders():
    orders = {contraction_order(c[:2], c[2:]) for _, _, comps in MIXTURES.values() for c in comps}
    assert orders == {"a_first", "b_first"}


def _factors(shapes, dtype):
    a = [(torch.randn(a1, a2) / a2**0.5).to(dtype) for a1, a2, _, _ in shapes]
    b = [(torch.randn(b1, b2) / b2**0.5).to(dtype) for _, _, b1, b2 in shapes]
    return a, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(MIXTURES), ids=list(MIXTURES))
def test_kron_mixture_kernels(case, dtype, deterministic):
    n_out, k_in, shapes = MIXTURES[case]
    a_f, b_f = _factors(shapes, dtype)
    coeffs = torch.rand(len(shapes)) + 0.5
    a64, b64 = [a.double() for a in a_f], [b.double() for b in b_f]
    for tokens in TOKENS:
        x = torch.randn(tokens, k_in).to(dtype)
        g = torch.randn(tokens, n_out).to(dtype)
        expected = sum(c * kron_component(x.double(), a, b) for c, a, b in zip(coeffs.double(), a64, b64, strict=True))
        _check(kron_mixture_forward(x, a_f, b_f, coeffs), expected, dtype, f"forward T={tokens}")
        expected_dx = sum(c * g.double() @ torch.kron(a, b) for c, a, b in zip(coeffs.double(), a64, b64, strict=True))
        _check(kron_mixture_backward_dx(g, a_f, b_f, coeffs), expected_dx, dtype, f"dx T={tokens}")
        for i, (a, b) in enumerate(zip(a_f, b_f, strict=True)):
            (a1, a2), (b1, b2) = a.shape, b.shape
            g3, x3 = g.double().reshape(tokens, a1, b1), x.double().reshape(tokens, a2, b2)
            m_ref = torch.einsum("tuq,qv,tpv->up", g3, b64[i], x3)
            r_ref = torch.einsum("tuq,up,tpv->qv", g3, a64[i], x3)
            _, (m_raw, r_raw) = kron_factor_grads(g, x, a_f, b_f, [(i, "a"), (i, "b")])
            if tokens == 0:
                assert torch.count_nonzero(m_raw) == 0 and torch.count_nonzero(r_raw) == 0
                continue
            # Token reductions can cancel heavily (R is a scalar when B is 1×1), so bound the error by the
            # sum of |terms|, the standard forward-error scale of a dot product.
            m_scale = torch.einsum("tuq,qv,tpv->up", g3.abs(), b64[i].abs(), x3.abs())
            r_scale = torch.einsum("tuq,up,tpv->qv", g3.abs(), a64[i].abs(), x3.abs())
            _check_reduction(m_raw, m_ref, m_scale, dtype, f"M[{i}] T={tokens}")
            _check_reduction(r_raw, r_ref, r_scale, dtype, f"R[{i}] T={tokens}")


def _executed_macs(dims, blocks) -> int:
    (p, j, l_, q), (bp, bj, bl, bq) = dims, blocks
    tiles = -(-p // bp) * -(-q // bq)
    return tiles * -(-j // bj) * (-(-l_ // bl) * bj * bl * bq + bp * bj * bq)


def _sandwich_dims(shapes):
    """(P, J, L, Q) of each component's forward sandwich, in its contraction order."""
    out = []
    for a1, a2, b1, b2 in shapes:
        out.append((a1, a2, b2, b1) if contraction_order((a1, a2), (b1, b2)) == "b_first" else (b1, b2, a2, a1))
    return out


def test_plan_cache_drops_the_least_recently_used():
    """A plan (and the factor copies cached the same way) used every step stays however many others come and
    go: dropping the oldest-built entry instead would free the buffers of a layer in use every step."""
    from moka_kernels.ops.kron_mixture import _PlanCache

    cache = _PlanCache(maxsize=2)
    assert cache.get("hot", lambda: "hot plan") == "hot plan"
    cache.get("a", lambda: "a plan")
    assert cache.get("hot", lambda: "rebuilt") == "hot plan"  # a hit: now the most recent
    cache.get("b", lambda: "b plan")  # over maxsize: "a", the least recently used, goes
    assert cache.get("hot", lambda: "rebuilt") == "hot plan" and cache.misses == 3
    assert cache.get("a", lambda: "a again") == "a again" and cache.misses == 4


def test_tile_sizes_follow_the_least_padded_work(monkeypatch):
    """One set of tile sizes serves every component of a launch. At LLaMA-7B's 4096², r = 5 (components
    from 16×256 to 64×64) tiles sized for the largest component executed 10.8× the adapter's
    multiply-adds; the chooser's pick (which also keeps every dot's output wide enough for 4 warps) executes
    at most 1.65×. A component that fits one tile exactly gets that tile (no padding, no recomputation); a
    bad policy name is refused."""
    import moka_kernels.ops.kron_mixture as km

    dims = _sandwich_dims(auto_component_shapes(4096, 4096, 5))
    ideal = sum(j * l_ * q + p * j * q for p, j, l_, q in dims)
    monkeypatch.setenv("MOKA_TILE_POLICY", "max")
    largest = km.choose_blocks(dims)
    assert largest == (64, 64, 64, 64) and sum(_executed_macs(d, largest) for d in dims) > 10 * ideal
    monkeypatch.delenv("MOKA_TILE_POLICY")
    chosen = km.choose_blocks(dims)
    assert sum(_executed_macs(d, chosen) for d in dims) <= 1.65 * ideal, chosen
    big = km.choose_blocks([(128, 64, 64, 128)])  # one tile would need a 128×128 fp32 accumulator
    assert big[0] * big[3] <= km.ACC_ELEMENTS and big in km._candidate_blocks(), big
    # the register budget (ptxas spills from 8704 tile elements up; test_aot_compile checks every candidate)
    assert all(km.tile_elements(b) <= km.TILE_ELEMENTS for b in km._candidate_blocks())
    assert (128, 16, 64, 32) not in km._candidate_blocks() and (128, 16, 32, 32) in km._candidate_blocks()
    # the AOT check compiles the maximal sets in every variant: every candidate is no larger, size by size
    top = km.maximal_blocks()
    assert set(top) <= set(km._candidate_blocks()) and len(top) < len(km._candidate_blocks())
    for blocks in km._candidate_blocks():
        assert any(all(b <= m for b, m in zip(blocks, t, strict=True)) for t in top), blocks
    assert km.choose_blocks([(32, 32, 64, 32)]) == (32, 32, 64, 32)
    assert km.choose_blocks([(128, 32, 32, 16)]) == (128, 32, 32, 16)
    assert km.reduce_block_constexprs((128, 16, 32, 64)) == {
        "BLOCK_N": 128,
        "BLOCK_J": 16,
        "BLOCK_K": 32,
        "BLOCK_M": 64,
    }
    monkeypatch.setenv("MOKA_TILE_POLICY", "largest")
    with pytest.raises(ValueError, match="MOKA_TILE_POLICY: expected one of"):
        km.choose_blocks(dims)


@pytest.mark.parametrize("case", ["48x80-r4-wide", "36x24-r5-auto"])
def test_kron_kernels_under_both_tile_policies(case, monkeypatch):
    """Forward, dx and the finished factor gradients agree under both tile policies (different tile
    sizes, the same masked kernels) with the fp64 reference."""
    n_out, k_in, shapes = MIXTURES[case]
    a_f, b_f = _factors(shapes, torch.float32)
    logits = torch.randn(len(shapes))
    alpha = torch.softmax(logits.double(), 0)
    x, g = torch.randn(7, k_in), torch.randn(7, n_out)
    requests = [(i, "a") for i in range(len(shapes))] + [(i, "b") for i in range(len(shapes))]
    raw = _raw_factor_grads64(g, x, a_f, b_f, requests)
    for policy in ("max", "min-work"):
        monkeypatch.setenv("MOKA_TILE_POLICY", policy)
        _check(
            kron_mixture_forward(x, a_f, b_f, gate_logits=logits), _mixture64(x, a_f, b_f, alpha), torch.float32, policy
        )
        expected_dx = sum(
            c * g.double() @ torch.kron(a.double(), b.double()) for c, a, b in zip(alpha, a_f, b_f, strict=True)
        )
        _check(kron_mixture_backward_dx(g, a_f, b_f, gate_logits=logits), expected_dx, torch.float32, policy + " dx")
        grads, _ = kron_factor_backward(g, x, a_f, b_f, requests, logits, 1.0, gate_grad=True)
        _check(
            grads.double(),
            torch.cat([(alpha[i] * m).reshape(-1) for (i, _), m in zip(requests, raw, strict=True)]),
            torch.float32,
            policy + " grads",
        )


def _mixture64(x, a_f, b_f, coeffs):
    return sum(c * kron_component(x.double(), a.double(), b.double()) for c, a, b in zip(coeffs, a_f, b_f, strict=True))


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["24x36-r3-mixed", "36x24-r5-auto"])
def test_kron_forward_gate_and_accumulation(case, logits_dtype, deterministic):
    """The coefficients from the logits (softmax in the kernel; r = 3 pads the gate to 4 lanes), the
    uniform gate, and adding into a buffer that already holds partial sums."""
    n_out, k_in, shapes = MIXTURES[case]
    a_f, b_f = _factors(shapes, torch.float32)
    logits = torch.randn(len(shapes)).to(logits_dtype)
    x = torch.randn(9, k_in)
    alpha = torch.softmax(logits.double(), 0)
    got = kron_mixture_forward(x, a_f, b_f, gate_logits=logits, scale=1.7)
    _check(got, _mixture64(x, a_f, b_f, 1.7 * alpha), torch.float32, "softmax gate")
    uniform = torch.full((len(shapes),), 0.3 / len(shapes), dtype=torch.float64)
    _check(kron_mixture_forward(x, a_f, b_f, scale=0.3), _mixture64(x, a_f, b_f, uniform), torch.float32, "uniform")
    partial = torch.randn(9, n_out)
    buffer = partial.clone()
    result = kron_mixture_forward(x, a_f, b_f, gate_logits=logits, scale=1.7, out=buffer)
    assert result is buffer
    _check(result, partial.double() + _mixture64(x, a_f, b_f, 1.7 * alpha), torch.float32, "out=")
    dx_buffer = partial[:, :k_in].clone() if k_in <= n_out else torch.randn(9, k_in)
    start = dx_buffer.clone()
    g = torch.randn(9, n_out)
    coeffs = torch.rand(len(shapes)) + 0.5
    kron_mixture_backward_dx(g, a_f, b_f, coeffs, out=dx_buffer)
    expected_dx = start.double() + sum(
        c * g.double() @ torch.kron(a.double(), b.double()) for c, a, b in zip(coeffs.double(), a_f, b_f, strict=True)
    )
    _check(dx_buffer, expected_dx, torch.float32, "dx out=")
    dx_gate = kron_mixture_backward_dx(g, a_f, b_f, gate_logits=logits, scale=1.7)
    expected_dx = sum(
        c * g.double() @ torch.kron(a.double(), b.double()) for c, a, b in zip(1.7 * alpha, a_f, b_f, strict=True)
    )
    _check(dx_gate, expected_dx, torch.float32, "dx softmax gate")


def _raw_factor_grads64(g, x, a_f, b_f, requests):
    """fp64 M_i = Σ_t G_t B_i X_tᵀ and R_i = Σ_t G_tᵀ A_i X_t for each request."""
    out = []
    for i, which in requests:
        (a1, a2), (b1, b2) = a_f[i].shape, b_f[i].shape
        g3, x3 = g.double().reshape(-1, a1, b1), x.double().reshape(-1, a2, b2)
        if which == "a":
            out.append(torch.einsum("tuq,qv,tpv->up", g3, b_f[i].double(), x3))
        else:
            out.append(torch.einsum("tuq,up,tpv->qv", g3, a_f[i].double(), x3))
    return out


@pytest.mark.parametrize("gate", ["fp32", "bf16", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["24x36-r3-mixed", "48x80-r4-wide"])
def test_factor_backward_finishing_pass(case, dtype, gate):
    """dA_i = c_i M_i, dB_i = c_i R_i (factor dtype and layout) and the logits' gradient
    dg = α ⊙ (dα − ⟨α, dα⟩), dα_i = s⟨F_i, raw_i⟩, from the token reduction's partial sums (several
    splits under the interpreter), against fp64; factors transposed in memory; gate-only requests."""
    n_out, k_in, shapes = MIXTURES[case]
    r = len(shapes)
    a_f, b_f = _factors(shapes, dtype)
    # column-major factors: the gate's dot must follow each factor's strides
    a_f, b_f = [a.t().contiguous().t() for a in a_f], [b.t().contiguous().t() for b in b_f]
    logits = None if gate == "none" else torch.randn(r).to(torch.float32 if gate == "fp32" else torch.bfloat16)
    scale = 1.3
    alpha = torch.softmax(logits.double(), 0) if logits is not None else torch.full((r,), 1.0 / r, dtype=torch.float64)
    requests = [(i, "a" if i % 2 else "b") for i in range(r)] + [(0, "a" if r > 1 else "b"), (r - 1, "a")]
    requests = list(dict.fromkeys(requests))
    for tokens in TOKENS:
        x, g = torch.randn(tokens, k_in).to(dtype), torch.randn(tokens, n_out).to(dtype)
        grads, gate_grad = kron_factor_backward(g, x, a_f, b_f, requests, logits, scale, gate_grad=logits is not None)
        assert grads.dtype == dtype and grads.numel() == sum((a_f if w == "a" else b_f)[i].numel() for i, w in requests)
        raw = _raw_factor_grads64(g, x, a_f, b_f, requests)
        # a token reduction can cancel heavily (R is a scalar when B is 1×1): error relative to Σ|terms|
        terms = _raw_factor_grads64(g.abs(), x.abs(), [a.abs() for a in a_f], [b.abs() for b in b_f], requests)
        offset = 0
        for (i, which), raw_i, terms_i in zip(requests, raw, terms, strict=True):
            got = grads[offset : offset + raw_i.numel()].view(raw_i.shape)
            offset += raw_i.numel()
            c = scale * alpha[i]
            _check_reduction(got, c * raw_i, c * terms_i, dtype, f"d{which.upper()}[{i}] T={tokens}")
        if logits is None:
            assert gate_grad is None
            continue
        factors = [(a_f if w == "a" else b_f)[i].double() for i, w in requests[:r]]
        d_alpha = scale * torch.stack([(f * m).sum() for f, m in zip(factors, raw[:r], strict=True)])
        expected = alpha * (d_alpha - (alpha * d_alpha).sum())
        assert gate_grad.dtype == logits.dtype and gate_grad.shape == (r,)
        dot_terms = torch.stack([(f.abs() * m).sum() for f, m in zip(factors, terms[:r], strict=True)])
        tol_dtype = torch.float32 if dtype == torch.float32 and gate == "fp32" else torch.bfloat16
        _check_reduction(gate_grad, expected, scale * dot_terms, tol_dtype, f"dg T={tokens}")


def test_factor_backward_checks_the_gate_requests():
    a_f, b_f = _factors(MIXTURES["24x36-r3-mixed"][2], torch.float32)
    x, g, logits = torch.randn(2, 36), torch.randn(2, 24), torch.zeros(3)
    with pytest.raises(ValueError, match="gate_grad: needs gate_logits and requests starting with one per component"):
        kron_factor_backward(g, x, a_f, b_f, [(1, "a"), (0, "a"), (2, "a")], logits, 1.0, gate_grad=True)


def test_component_tables_are_per_layer():
    """Two layers with equal factor shapes get their own tables (the cache keys on addresses), and a
    factor updated in place is read afresh."""
    _, k_in, shapes = MIXTURES["24x36-r3-mixed"]
    layers = [_factors(shapes, torch.float32) for _ in range(2)]
    coeffs = torch.rand(len(shapes)) + 0.5
    x = torch.randn(5, k_in)
    for _ in range(2):
        for a_f, b_f in layers:
            _check(
                kron_mixture_forward(x, a_f, b_f, coeffs), _mixture64(x, a_f, b_f, coeffs.double()), torch.float32, ""
            )
    layers[0][0][1].mul_(-3.0)
    a_f, b_f = layers[0]
    _check(kron_mixture_forward(x, a_f, b_f, coeffs), _mixture64(x, a_f, b_f, coeffs.double()), torch.float32, "")


def test_component_tables_are_built_once_per_layer(deterministic):
    """A layer's tables hold only per-layer constants (factor addresses, shapes, strides), never
    activation addresses: new activations and token counts reuse them, so training copies no table to
    the device after its first step, and builds no launch plan either."""
    import moka_kernels.ops.kron_mixture as km
    from moka_kernels import library
    from moka_kernels.ops.kron_mixture import _component_table

    shapes = auto_component_shapes(40, 96, 3)
    _, w_dense, a_f, b_f, g, _ = make_problem(40, 96, shapes, torch.float32)
    weight = quantize_nf4(w_dense, blocksize=32)

    def step(tokens):
        x = torch.randn(tokens, 96, requires_grad=True)
        out = library.apply_linear(x, None, weight, None, g, 0.7, a_f, b_f, "triton", use_custom_op=False)
        out.backward(torch.randn_like(out))

    step(5)
    built, planned = _component_table.cache_info().misses, km._PLANS.misses
    for tokens in (5, 9, 5):
        step(tokens)
    assert _component_table.cache_info().misses == built
    assert km._PLANS.misses == planned  # and no launch plan is rebuilt in Python (host time)


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "no-gate"])
def test_decode_forward_with_the_adapter_inside_the_gemv_launch(gate, monkeypatch):
    """Decoding on an NF4 base: the adapter's programs run inside the split-K GEMV's launch; the result
    matches the fp64 reference and the adapter as its own launch (MOKA_DECODE_FUSION=0)."""
    from moka_kernels.ops.fused_linear import moka_forward_triton

    shapes = [(8, 12, 5, 8), (2, 32, 20, 3), (40, 2, 1, 48)]
    for tokens in (1, 7, 16):
        x, w_dense, a_f, b_f, g, bias = make_problem(40, 96, shapes, torch.float32, lead=(tokens,), gate=gate)
        weight = quantize_nf4(w_dense, blocksize=32)
        x, a_f, b_f = x.detach(), [t.detach() for t in a_f], [t.detach() for t in b_f]
        g, bias = (g.detach() if gate else None), bias.detach()
        fused = moka_forward_triton(x, None, weight, bias, g, 0.7, a_f, b_f)
        monkeypatch.setenv("MOKA_DECODE_FUSION", "0")
        separate = moka_forward_triton(x, None, weight, bias, g, 0.7, a_f, b_f)
        monkeypatch.delenv("MOKA_DECODE_FUSION")
        a64, b64 = [t.double() for t in a_f], [t.double() for t in b_f]
        dense64 = dequantize_nf4(weight, torch.float64)
        ref = moka_linear_materialized(x.double(), dense64, a64, b64, g, bias.double(), 0.7)
        _check(fused, ref, torch.float32, f"fused T={tokens}")
        _check(separate, ref, torch.float32, f"separate T={tokens}")


def test_adapter_schedule_and_split_k_follow_the_mode(monkeypatch):
    """Default: the atomic schedule for few tokens, the row-owning one from ROWWISE_MIN_TOKENS, split-K
    for decode sizes. Deterministic mode: rowwise at every size and no split-K (both use atomics).
    ``MOKA_ADAPTER_SCHEDULE`` overrides, with clear errors. The launcher gets the schedule it reports."""
    import moka_kernels.ops.kron_mixture as km
    import moka_kernels.ops.nf4_matmul as nm

    _, k_in, shapes = MIXTURES["24x36-r3-mixed"]
    a_f, b_f = _factors(shapes, torch.float32)
    x, coeffs = torch.randn(3, k_in), torch.rand(len(shapes))
    launched = []
    original = km.sandwich_grouped
    monkeypatch.setattr(km, "sandwich_grouped", lambda *a, **k: launched.append(a[1]) or original(*a, **k))
    monkeypatch.delenv("MOKA_ADAPTER_SCHEDULE", raising=False)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert km.adapter_schedule(3) == "atomic" and km.adapter_schedule(km.ROWWISE_MIN_TOKENS) == "rowwise"
        assert nm.split_k_for(1, 4096, 4096) > 1
        kron_mixture_forward(x, a_f, b_f, coeffs)
        monkeypatch.setenv("MOKA_ADAPTER_SCHEDULE", "rowwise")
        kron_mixture_forward(x, a_f, b_f, coeffs)
        assert launched == ["atomic", "rowwise"]
        monkeypatch.setenv("MOKA_ADAPTER_SCHEDULE", "fastest")
        with pytest.raises(ValueError, match="MOKA_ADAPTER_SCHEDULE: expected one of"):
            km.adapter_schedule(3)
        monkeypatch.delenv("MOKA_ADAPTER_SCHEDULE")
        torch.use_deterministic_algorithms(True)
        assert km.adapter_schedule(1) == "rowwise" and nm.split_k_for(1, 4096, 4096) == 1
        monkeypatch.setenv("MOKA_ADAPTER_SCHEDULE", "atomic")
        with pytest.raises(RuntimeError, match="deterministic"):
            km.adapter_schedule(3)
    finally:
        torch.use_deterministic_algorithms(was)


# -- the fused op through the public API ------------------------------------------------------------
FUSED = [
    ("dense", 24, 36, auto_component_shapes(24, 36, 2)),
    ("nf4", 40, 96, [(8, 12, 5, 8), (2, 32, 20, 3), (40, 2, 1, 48)]),
    ("nf4-unaligned-K", 24, 36, auto_component_shapes(24, 36, 1)),  # K % blocksize != 0: dequantize fallback
    ("nf4-short-block", 20, 36, auto_component_shapes(20, 36, 2)),  # 720 = 22 blocks of 32 and one of 16
    ("nf4", 48, 64, auto_component_shapes(48, 64, 5)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "n_out", "k_in", "shapes"), FUSED, ids=[f[0] + f"-{f[1]}x{f[2]}" for f in FUSED])
def test_fused_op_matches_reference(kind, n_out, k_in, shapes, dtype, deterministic, monkeypatch):
    _check_fused_op(kind, n_out, k_in, shapes, dtype, monkeypatch)


@pytest.mark.parametrize("schedule", ["atomic", "rowwise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n_out", "k_in", "shapes"), [f[1:] for f in FUSED if f[0] == "nf4"], ids=["40x96", "48x64"])
def test_fused_op_on_the_dequantize_route_matches_reference(n_out, k_in, shapes, dtype, schedule, monkeypatch):
    """Forced at every T (from 0 to 33 tokens here, the decode path's too): the NF4 base runs as one decode
    launch + cuBLAS, never the fused GEMMs."""
    import moka_kernels.ops.nf4_matmul as nm

    monkeypatch.setenv("MOKA_NF4_ROUTE", "dequantize")
    monkeypatch.setenv("MOKA_ADAPTER_SCHEDULE", schedule)  # rowwise: the adapter rows come in x's dtype
    for fused_gemm in ("nf4_matmul", "nf4_matmul_t", "nf4_matmul_accumulate"):
        monkeypatch.setattr(nm, fused_gemm, mock.Mock(side_effect=AssertionError(f"{fused_gemm} called")))
    _check_fused_op("nf4", n_out, k_in, shapes, dtype, monkeypatch)


def _check_fused_op(kind, n_out, k_in, shapes, dtype, monkeypatch):
    """moka_linear on the Triton backend against the materialized fp64 reference: forward, every gradient."""
    monkeypatch.setenv("MOKA_BACKEND", "triton")
    for tokens, gate, bias, dropout_like in [
        (0, True, True, False),
        (1, True, False, False),
        (7, False, True, True),
        (33, True, True, False),
    ]:
        x, w_dense, a_f, b_f, g, b = make_problem(n_out, k_in, shapes, dtype, lead=(tokens,), gate=gate, bias=bias)
        weight = quantize_nf4(w_dense.float(), blocksize=32) if kind.startswith("nf4") else w_dense
        assert select_backend(x) == "triton"
        x_adapter = torch.randn_like(x).requires_grad_(True) if dropout_like else None
        out = moka_linear(x, weight, a_f, b_f, g, b, 0.7, adapter_input=x_adapter)
        dense64 = dequantize_nf4(weight, torch.float64) if kind.startswith("nf4") else w_dense.double()
        inputs = [t for t in leaves(x, a_f, b_f, g, b)] + ([x_adapter] if dropout_like else [])
        ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
        r = len(a_f)
        rx, ra, rb = ref_inputs[0], ref_inputs[1 : 1 + r], ref_inputs[1 + r : 1 + 2 * r]
        rest = ref_inputs[1 + 2 * r :]
        rg = rest.pop(0) if gate else None
        rbias = rest.pop(0) if bias else None
        rxa = rest.pop(0) if dropout_like else None
        ref = moka_linear_materialized(rx, dense64, ra, rb, rg, rbias, 0.7)
        if dropout_like:  # adapter sees x_a, the base sees x
            ref = ref - moka_linear_materialized(rx, dense64 * 0, ra, rb, rg, None, 0.7)
            ref = ref + moka_linear_materialized(rxa, dense64 * 0, ra, rb, rg, None, 0.7)
        _check(out, ref, dtype, f"forward T={tokens}")
        grad_out = torch.randn_like(ref)
        ours = torch.autograd.grad(out, inputs, grad_out.to(dtype), allow_unused=True)
        theirs = torch.autograd.grad(ref, ref_inputs, grad_out, allow_unused=True)
        for i, (g_ours, g_ref) in enumerate(zip(ours, theirs, strict=True)):
            g_ref = torch.zeros_like(inputs[i], dtype=torch.float64) if g_ref is None else g_ref
            if tokens == 0 and g_ref.numel() and torch.count_nonzero(g_ref) == 0:
                assert torch.count_nonzero(g_ours) == 0
                continue
            _check(g_ours, g_ref, dtype if g_ours.dtype != torch.float32 else torch.float32, f"grad {i} T={tokens}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_factors_with_half_activations_compute_what_cast_factors_do(
    backend, kind, dtype, deterministic, monkeypatch
):
    """fp32 master factors with bf16/fp16 activations (what MoKALinear passes on a half-precision model):
    the Triton path rounds them into per-layer copies in one launch. The forward and dx equal those of the
    same call with the factors cast first, bit for bit; the factors' gradients come back in fp32, equal to
    the cast call's once rounded (Triton; the gate's exactly) or within the dtype's tolerance (the PyTorch
    path sums them in fp32)."""
    monkeypatch.setenv("MOKA_BACKEND", backend)
    shapes = [(8, 12, 5, 8), (2, 32, 20, 3), (40, 2, 1, 48)]
    for tokens in (1, 7):
        x, w_dense, a32, b32, g, b = make_problem(40, 96, shapes, torch.float32, lead=(tokens,))
        weight = quantize_nf4(w_dense.to(dtype), blocksize=32) if kind == "nf4" else w_dense.to(dtype)
        x_half = x.detach().to(dtype).requires_grad_(True)
        bias = b.detach().to(dtype)
        a_cast = [a.detach().to(dtype).requires_grad_(True) for a in a32]
        b_cast = [f.detach().to(dtype).requires_grad_(True) for f in b32]
        mixed = moka_linear(x_half, weight, a32, b32, g, bias, 0.7)
        cast = moka_linear(x_half, weight, a_cast, b_cast, g, bias, 0.7)
        assert mixed.dtype == dtype and torch.equal(mixed, cast), f"forward T={tokens}"
        grad_out = torch.randn_like(mixed)
        ours = torch.autograd.grad(mixed, [x_half, *a32, *b32, g], grad_out)
        theirs = torch.autograd.grad(cast, [x_half, *a_cast, *b_cast, g], grad_out)
        assert torch.equal(ours[0], theirs[0]), f"dx T={tokens}"
        for i, (mine, ref) in enumerate(zip(ours[1:-1], theirs[1:-1], strict=True)):
            assert mine.dtype == torch.float32, f"factor grad {i}: {mine.dtype}"
            assert not torch.equal(mine, mine.to(dtype).float()), f"factor grad {i} was rounded to {dtype}"
            if backend == "triton" and dtype == torch.float16:
                assert torch.equal(mine.to(dtype), ref), f"factor grad {i} T={tokens}"
            elif backend == "triton":  # the cast call's bf16 store truncated here: one bf16 ulp apart at most
                ulp = ref.float().abs() * 2**-7
                assert ((mine - ref.float()).abs() <= ulp).all(), f"factor grad {i} T={tokens}"
            else:
                _check(mine, ref.double(), dtype, f"factor grad {i} T={tokens}")
        if backend == "triton":
            assert torch.equal(ours[-1], theirs[-1]), f"gate grad T={tokens}"
        else:
            _check(ours[-1], theirs[-1].double(), dtype, f"gate grad T={tokens}")
        with torch.no_grad():  # an optimizer step: the next call sees the new values (no stale copies)
            for f in (*a32, *b32):
                f.mul_(1.5)
        again = moka_linear(x_half, weight, a32, b32, g, bias, 0.7)
        cast = moka_linear(x_half, weight, [a.to(dtype) for a in a32], [f.to(dtype) for f in b32], g, bias, 0.7)
        assert torch.equal(again, cast) and not torch.equal(again, mixed), f"forward after a step T={tokens}"


def test_fp32_factors_first_seen_under_inference_mode_still_train(monkeypatch):
    """An eval or generate pass before training: the per-layer bf16 copies made then are normal tensors,
    so the training call after it can refresh them."""
    monkeypatch.setenv("MOKA_BACKEND", "triton")
    x, w, a32, b32, g, _ = make_problem(24, 36, [(4, 6, 6, 6)], torch.float32, lead=(3,))
    x_half, weight = x.detach().bfloat16(), w.bfloat16()
    with torch.inference_mode():
        first = moka_linear(x_half, weight, a32, b32, g)
    out = moka_linear(x_half, weight, a32, b32, g)
    out.float().sum().backward()
    assert torch.equal(out, first) and a32[0].grad.dtype == torch.float32


REQUESTS = {
    "everything": (True, True, True, (True, True, True), (True, True, True)),
    "gate-only": (False, True, False, (False, False, False), (False, False, False)),
    "gate-a-frozen": (True, True, False, (False, False, False), (True, False, True)),
    "b1-only": (False, False, False, (False, False, False), (False, True, False)),
    "nothing-but-x": (True, False, False, (False, False, False), (False, False, False)),
}


@pytest.mark.parametrize("request_name", list(REQUESTS))
def test_backends_return_exactly_the_requested_gradients(request_name, deterministic):
    """The Triton backward computes what a GradRequest asks for and returns None for the rest, like the
    PyTorch backend, whose values it matches (the gate-only reductions must not leak into dA/dB)."""
    from moka_kernels.ops.fused_linear import moka_backward_triton
    from moka_kernels.reference import GradRequest, moka_backward_torch

    need_x, gate, bias, need_a, need_b = REQUESTS[request_name]
    needs = GradRequest(need_x, False, bias, gate, need_a, need_b)
    shapes = [(8, 12, 5, 8), (2, 32, 20, 3), (40, 2, 1, 48)]
    x, w_dense, a_f, b_f, g, _ = make_problem(40, 96, shapes, torch.float32, lead=(6,), requires_grad=False)
    weight = quantize_nf4(w_dense, blocksize=32)
    grad_out = torch.randn(6, 40)
    ours = moka_backward_triton(grad_out, x, None, weight, g, 0.7, a_f, b_f, needs)
    theirs = moka_backward_torch(grad_out, x, None, weight, g, 0.7, a_f, b_f, needs)
    pairs = [(ours.x, theirs.x), (ours.bias, theirs.bias), (ours.gate, theirs.gate)]
    pairs += list(zip(ours.a, theirs.a, strict=True)) + list(zip(ours.b, theirs.b, strict=True))
    asked = [need_x, bias, gate, *need_a, *need_b]
    for i, ((mine, ref), wanted) in enumerate(zip(pairs, asked, strict=True)):
        assert (mine is not None) == wanted and (ref is not None) == wanted, f"gradient {i}: asked {wanted}"
        if ref is not None:
            _check(mine, ref.double(), torch.float32, f"gradient {i}")


def test_custom_op_route_under_a_dispatch_mode():
    """Under a TorchDispatchMode the op takes the registered custom op, whose outputs must not share
    storage: the Triton backend's factor gradients are slices of one buffer and must be copied out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moka_kernels import library

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    shapes = auto_component_shapes(40, 96, 3)
    x, w_dense, a_f, b_f, g, _ = make_problem(40, 96, shapes, torch.float32, lead=(2,))
    weight = quantize_nf4(w_dense, blocksize=32)
    with PassThrough():
        out = library.apply_linear(x, None, weight, None, g, 0.7, a_f, b_f, "triton", use_custom_op=True)
        grads = torch.autograd.grad(out.sum(), [x, g, *a_f, *b_f])
    expected = torch.autograd.grad(
        library.apply_linear(x, None, weight, None, g, 0.7, a_f, b_f, "triton", use_custom_op=False).sum(),
        [x, g, *a_f, *b_f],
    )
    for mine, ref in zip(grads, expected, strict=True):
        assert torch.equal(mine, ref)


# -- dispatch ---------------------------------------------------------------------------------------
def test_auto_backend_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("MOKA_BACKEND", raising=False)
    assert select_backend(torch.zeros(1)) == "torch"


def test_without_triton_auto_falls_back_and_forcing_explains(monkeypatch):
    import moka_kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "TRITON_AVAILABLE", False)
    monkeypatch.setenv("MOKA_BACKEND", "auto")
    assert select_backend(torch.zeros(1)) == "torch"
    monkeypatch.setenv("MOKA_BACKEND", "triton")
    with pytest.raises(ValueError, match="triton is not installed"):
        select_backend(torch.zeros(1))


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    import moka_kernels.dispatch as dispatch

    monkeypatch.setattr(dispatch, "INTERPRET", False)
    monkeypatch.setenv("MOKA_BACKEND", "triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        select_backend(torch.zeros(1))


# -- property test: random layers through every launch option ---------------------------------------
@st.composite
def triton_problems(draw):
    """A random fp32 layer (any factorizations, 1-wide factors included), token count, gate/bias/adapter
    input, frozen factors, adapter schedule, tile policy and deterministic mode."""
    n_out, k_in = draw(st.integers(1, 72)), draw(st.integers(2, 72))
    shapes = []
    for _ in range(draw(st.integers(1, 4))):
        a1 = draw(st.sampled_from([d for d in range(1, n_out + 1) if n_out % d == 0]))
        a2 = draw(st.sampled_from([d for d in range(1, k_in + 1) if k_in % d == 0]))
        shapes.append((a1, a2, n_out // a1, k_in // a2))
    tokens = draw(st.sampled_from([1, 2, 5, 17, 40]))
    frozen = draw(st.lists(st.booleans(), min_size=2 * len(shapes), max_size=2 * len(shapes)))
    deterministic = draw(st.booleans())
    schedule = None if deterministic else draw(st.sampled_from([None, "atomic", "rowwise"]))
    options = dict(gate=draw(st.booleans()), bias=draw(st.booleans()), separate=draw(st.booleans()))
    return (
        n_out,
        k_in,
        shapes,
        tokens,
        frozen,
        deterministic,
        schedule,
        draw(st.sampled_from(["min-work", "max"])),
        options,
    )


@settings(max_examples=12, deadline=None)
@given(triton_problems())
def test_property_triton_equals_materialized(problem):
    n_out, k_in, shapes, tokens, frozen, deterministic, schedule, policy, options = problem
    x, weight, a_f, b_f, g, b = make_problem(
        n_out, k_in, shapes, torch.float32, lead=(tokens,), gate=options["gate"], bias=options["bias"]
    )
    for factor, is_frozen in zip([*a_f, *b_f], frozen, strict=True):
        factor.requires_grad_(not is_frozen)
    x_adapter = torch.randn_like(x).requires_grad_(True) if options["separate"] else None
    env = {"MOKA_BACKEND": "triton", "MOKA_TILE_POLICY": policy, "MOKA_ADAPTER_SCHEDULE": schedule or ""}
    was = torch.are_deterministic_algorithms_enabled()
    try:  # outputs are NaN-poisoned by the autouse fixture
        torch.use_deterministic_algorithms(deterministic)
        with mock.patch.dict(os.environ, env):
            out = moka_linear(x, weight, a_f, b_f, g, b, 0.7, adapter_input=x_adapter)
            inputs = [t for t in (x, *a_f, *b_f, g, b, x_adapter) if t is not None and t.requires_grad]
            grad_out = torch.randn_like(out)
            ours = torch.autograd.grad(out, inputs, grad_out)
    finally:
        torch.use_deterministic_algorithms(was)
    ref_inputs = {id(t): t.detach().double().requires_grad_(True) for t in inputs}
    x64, xa64 = ref_inputs.get(id(x), x.detach().double()), None
    a64 = [ref_inputs.get(id(t), t.detach().double()) for t in a_f]
    b64 = [ref_inputs.get(id(t), t.detach().double()) for t in b_f]
    g64 = None if g is None else ref_inputs[id(g)]
    bias64 = None if b is None else ref_inputs[id(b)]
    ref = moka_linear_materialized(x64, weight.double(), a64, b64, g64, bias64, 0.7)
    if x_adapter is not None:  # the adapter sees x_a, the base sees x
        xa64 = ref_inputs[id(x_adapter)]
        zero = torch.zeros_like(weight, dtype=torch.float64)
        ref = ref + moka_linear_materialized(xa64 - x64, zero, a64, b64, g64, None, 0.7)
    _check(out, ref, torch.float32, "forward")
    theirs = torch.autograd.grad(ref, [ref_inputs[id(t)] for t in inputs], grad_out.double(), allow_unused=True)
    for i, (mine, truth) in enumerate(zip(ours, theirs, strict=True)):
        truth = torch.zeros_like(mine, dtype=torch.float64) if truth is None else truth
        # the gate's and 1×1 factors' gradients are long reductions: 4× the tolerance (as the reshape form's)
        tol = 4 * TOL[torch.float32] if (g is not None and inputs[i] is g) or inputs[i].numel() == 1 else None
        if tol is None:
            _check(mine, truth, torch.float32, f"grad of input {i}")
        else:
            assert_close_rel(mine, truth, tol, f"grad of input {i}")


def test_autotuning_keeps_the_partial_sums_an_accumulating_call_adds_to(monkeypatch):
    """Autotuning runs every config on the real output: the caller's partial sums must survive it."""
    import triton
    from triton.runtime import autotuner

    import moka_kernels.ops.nf4_matmul as nm

    kernel = nm._nf4_matmul_kernel
    monkeypatch.setattr(
        kernel, "configs", [*nm.NF4_MATMUL_CONFIGS, triton.Config(dict(nm.NF4_MATMUL_CONFIGS[0].kwargs))]
    )
    monkeypatch.setattr(kernel, "cache", {})

    def timing_every_config(self):
        def run(fn, quantiles=None):
            for _ in range(2):  # like do_bench: several runs per config
                fn()
            return [1.0, 1.0, 1.0]

        return run

    monkeypatch.setattr(autotuner.Autotuner, "do_bench", property(timing_every_config))
    w = torch.randn(32, 64)
    q = quantize_nf4(w)
    x = torch.randn(1, 64)
    partial = torch.randn(1, 32)
    acc = partial.clone()
    nm.nf4_matmul_accumulate(x, q, acc)
    torch.testing.assert_close(acc, partial + x @ dequantize_nf4(q, torch.float32).T, rtol=1e-4, atol=1e-4)
    deterministic = mock.patch.object(torch, "are_deterministic_algorithms_enabled", return_value=True)
    refused = pytest.raises(RuntimeError, match=r"use_deterministic_algorithms\(True\) is set: use nf4_matmul")
    with deterministic, refused:
        nm.nf4_matmul_accumulate(x, q, acc)
    warn_only = mock.patch.object(torch, "is_deterministic_algorithms_warn_only_enabled", return_value=True)
    with deterministic, warn_only, pytest.warns(UserWarning, match=r"adds by fp32 atomics"):
        nm.nf4_matmul_accumulate(x, q, acc)  # as PyTorch's own ops under warn_only=True: a warning, and the sum


def test_autotuning_tunes_the_base_alone_and_the_fused_layer_apart(monkeypatch):
    """The NF4 GEMMs' tuning key holds the epilogue's add and the decode fusion's adapter programs: the base
    alone, the prefill with the adapter output added, and the decode with the adapter inside each tune once."""
    import triton
    from triton.runtime import autotuner

    import moka_kernels.ops.fused_linear as fl
    import moka_kernels.ops.nf4_matmul as nm

    tuned = []
    for kernel, configs in ((nm._nf4_matmul_kernel, nm.NF4_MATMUL_CONFIGS), (nm._nf4_matmul_t_kernel, None)):
        configs = configs or nm.NF4_MATMUL_T_CONFIGS
        monkeypatch.setattr(kernel, "configs", [*configs, triton.Config(dict(configs[0].kwargs))])
        monkeypatch.setattr(kernel, "cache", {})
        tuned.append(kernel.cache)

    def timing_once(self):
        return lambda fn, quantiles=None: (fn(), [1.0, 1.0, 1.0])[1]

    monkeypatch.setattr(autotuner.Autotuner, "do_bench", property(timing_once))
    q = quantize_nf4(torch.randn(32, 64))
    a_f, b_f = [torch.randn(4, 8)], [torch.randn(8, 8)]
    for tokens in (20, 1):  # prefill (add in the epilogue), decode (adapter programs in the GEMV's launch)
        x, dy = torch.randn(tokens, 64), torch.randn(tokens, 32)
        nm.nf4_matmul(x, q)
        nm.nf4_matmul_t(dy, q)
        fl.moka_forward_triton(x, None, q, None, None, 1.0, a_f, b_f)
        nm.nf4_matmul_t(dy, q, add=torch.randn(tokens, 64))
    forward, transposed = tuned
    assert len(forward) == 4 and len(transposed) == 4  # with and without the add / adapter, per token count


NF4_DECODE_LAYERS = [(37, 96, 32), (100, 320, 64), (5, 1024, 512), (64, 256, 256)]  # (N, K, blocksize)


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "fp32-absmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n_out", "k_in", "blocksize"), NF4_DECODE_LAYERS, ids=str)
def test_nf4_dequantize_kernel_matches_the_reference_bit_for_bit(n_out, k_in, blocksize, dtype, double_quant):
    """Odd N, K not a multiple of the 256-wide tile, blocksizes below, at and above it (512: two tiles per
    block). fp32/fp16 are bit-exact; the interpreter truncates fp32 → bf16 casts (a GPU rounds), so bf16
    agrees with the reference's round-to-nearest to one bf16 ulp here (bit for bit in tests/test_gpu.py)."""
    from moka_kernels.ops.nf4_dequantize import nf4_dequantize

    w = quantize_nf4(torch.randn(n_out, k_in) * 0.1, blocksize, double_quant)
    ours, reference = nf4_dequantize(w, dtype), dequantize_nf4(w, dtype)
    assert ours.dtype == dtype and ours.shape == (n_out, k_in) and not torch.isnan(ours).any()
    if dtype == torch.bfloat16:
        exact = dequantize_nf4(w, torch.float32)
        assert ((ours.float() - exact).abs() <= exact.abs() * 2**-7).all()
        assert ((ours.float() - reference.float()).abs() <= reference.float().abs() * 2**-7).all()
    else:
        assert torch.equal(ours, reference)
    out = torch.full((n_out, k_in), float("nan"), dtype=dtype)
    assert nf4_dequantize(w, dtype, out=out) is out and torch.equal(out, ours)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rowwise_adapter_rows_in_the_inputs_dtype(dtype, monkeypatch):
    """out_dtype: the rowwise schedule writes the adapter's rows in x's dtype (sums in fp32 registers, one
    rounding per component); the atomic schedule always returns fp32."""
    shapes = [(8, 12, 5, 8), (2, 32, 20, 3), (40, 2, 1, 48)]
    x, _, a_f, b_f, g, _ = make_problem(40, 96, shapes, dtype, lead=(9,), gate=True, bias=False)
    x, a_f, b_f, g = x.detach(), [t.detach() for t in a_f], [t.detach() for t in b_f], g.detach()
    dy = torch.randn(9, 40).to(dtype)
    monkeypatch.setenv("MOKA_ADAPTER_SCHEDULE", "rowwise")
    wide = kron_mixture_forward(x, a_f, b_f, gate_logits=g)
    wide_dx = kron_mixture_backward_dx(dy, a_f, b_f, gate_logits=g)
    narrow = kron_mixture_forward(x, a_f, b_f, gate_logits=g, out_dtype=dtype)
    narrow_dx = kron_mixture_backward_dx(dy, a_f, b_f, gate_logits=g, out_dtype=dtype)
    assert wide.dtype == wide_dx.dtype == torch.float32 and narrow.dtype == narrow_dx.dtype == dtype
    _check(narrow, wide.double(), dtype, "forward rows in x's dtype")
    _check(narrow_dx, wide_dx.double(), dtype, "dx rows in x's dtype")
    monkeypatch.setenv("MOKA_ADAPTER_SCHEDULE", "atomic")
    assert kron_mixture_forward(x, a_f, b_f, gate_logits=g, out_dtype=dtype).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["dense", "nf4-fused", "nf4-dequantize"])
def test_adapter_rows_come_in_the_dtype_the_base_gemm_adds(kind, dtype, monkeypatch):
    """cuBLAS (dense base, NF4 dequantize route) adds the adapter rows in bf16, so with bf16 activations
    they are asked for in it (no fp32 → bf16 pass); the fused NF4 GEMMs' epilogues read fp32, and fp16 keeps
    fp32 (a running sum over components could overflow fp16)."""
    import moka_kernels.ops.fused_linear as fl

    monkeypatch.setenv("MOKA_BACKEND", "triton")
    monkeypatch.setenv("MOKA_ADAPTER_SCHEDULE", "rowwise")
    monkeypatch.setenv("MOKA_NF4_ROUTE", kind.removeprefix("nf4-") if kind != "dense" else "auto")
    shapes = auto_component_shapes(48, 64, 3)
    x, w_dense, a_f, b_f, g, bias = make_problem(48, 64, shapes, dtype, lead=(33,), gate=True, bias=True)
    weight = w_dense if kind == "dense" else quantize_nf4(w_dense.float(), blocksize=32)
    spies = {}
    for name in ("kron_mixture_forward", "kron_mixture_backward_dx"):
        spies[name] = mock.Mock(wraps=getattr(fl, name))
        monkeypatch.setattr(fl, name, spies[name])
    moka_linear(x, weight, a_f, b_f, g, bias).sum().backward()
    expected = torch.float32 if kind == "nf4-fused" or dtype == torch.float16 else torch.bfloat16
    for name, spy in spies.items():
        assert spy.call_count == 1 and spy.call_args.kwargs["out_dtype"] == expected, name


def test_nf4_decode_is_launched_without_fma_contraction(monkeypatch):
    """The launch flag that keeps the GPU decode bit-exact (its compiled PTX is checked in test_aot_compile)."""
    import moka_kernels.ops.nf4_dequantize as nd

    launches = []
    fake = mock.MagicMock()
    fake.__getitem__.return_value = lambda *args, **kwargs: launches.append(kwargs)
    monkeypatch.setattr(nd, "_nf4_dequantize_kernel", fake)
    nd.nf4_dequantize(quantize_nf4(torch.randn(8, 64), 32), torch.float16)
    assert len(launches) == 1 and launches[0]["enable_fp_fusion"] is False


def test_nf4_route_follows_the_token_count_and_its_override(monkeypatch):
    import moka_kernels.ops.nf4_matmul as nm

    monkeypatch.delenv("MOKA_NF4_ROUTE", raising=False)
    assert nm.nf4_route(nm.DEQUANTIZE_MIN_TOKENS - 1) == "fused"
    assert nm.nf4_route(nm.DEQUANTIZE_MIN_TOKENS) == "dequantize"
    monkeypatch.setenv("MOKA_NF4_ROUTE", "fused")
    assert nm.nf4_route(10**6) == "fused"
    monkeypatch.setenv("MOKA_NF4_ROUTE", "Dequantize")
    assert nm.nf4_route(1) == "dequantize"
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(True)  # PyTorch refuses cuBLAS here: fused, unless forced
    try:
        assert nm.nf4_route(10**6) == "dequantize"
        monkeypatch.delenv("MOKA_NF4_ROUTE")
        assert nm.nf4_route(10**6) == "fused"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS allowed again
        assert nm.nf4_route(10**6) == "dequantize"
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
        torch.use_deterministic_algorithms(True, warn_only=True)
        assert nm.nf4_route(10**6) == "dequantize"
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    monkeypatch.setenv("MOKA_NF4_ROUTE", "cublas")
    with pytest.raises(ValueError, match=r"MOKA_NF4_ROUTE: expected one of \['auto', 'fused', 'dequantize'\]"):
        nm.nf4_route(1)


def test_the_dequantize_route_is_one_decode_launch_and_one_gemm(monkeypatch):
    """At DEQUANTIZE_MIN_TOKENS tokens the NF4 base decodes W once (one kernel) and runs one addmm with the
    adapter output and bias in its beta term; one token below, the fused GEMM runs instead."""
    import moka_kernels.ops.fused_linear as fl
    import moka_kernels.ops.nf4_matmul as nm

    monkeypatch.delenv("MOKA_NF4_ROUTE", raising=False)
    monkeypatch.setattr(nm, "DEQUANTIZE_MIN_TOKENS", 9)
    w = quantize_nf4(torch.randn(40, 96) * 0.1, 32)
    add, bias = torch.randn(9, 40), torch.randn(40)
    decodes = mock.Mock(wraps=fl.nf4_dequantize)
    monkeypatch.setattr(fl, "nf4_dequantize", decodes)
    dense = dequantize_nf4(w, torch.float32)
    for tokens, route_decodes in ((9, 1), (8, 0)):
        decodes.reset_mock()
        x, dy = torch.randn(tokens, 96), torch.randn(tokens, 40)
        torch.testing.assert_close(fl._base_matmul(x, w, add[:tokens], bias), x @ dense.T + add[:tokens] + bias)
        torch.testing.assert_close(fl._base_matmul_t(dy, w, None), dy @ dense)
        assert decodes.call_count == 2 * route_decodes, tokens


def test_fp32_layers_take_tiles_from_their_own_spill_free_list(monkeypatch):
    """fp32 operands (the IEEE dot) take twice the registers: the chooser picks from FP32_TILE_SETS for them,
    the sets that spill at most SPILL_TOLERANCE_BYTES in the committed ptxas census (the AOT check compiles
    each in fp32), and every launch plan of an fp32 layer asks for them."""
    import json
    from pathlib import Path

    import moka_kernels.ops.kron_mixture as km

    fp32_sets = km._candidate_blocks(fp32_operands=True)
    assert set(fp32_sets) == km.FP32_TILE_SETS and set(fp32_sets) < set(km._candidate_blocks())
    census = json.loads((Path(__file__).parents[1] / "benchmarks/results/registers.json").read_text())["rows"]
    worst: dict[tuple, int] = {}
    for row in census:
        if row["constexprs"].get("DOT_FP32"):
            key = tuple(row["tile_set"])
            worst[key] = max(worst.get(key, 0), row["spill_bytes"])
    assert set(worst) == set(km._candidate_blocks())  # the census covers every bf16-budget set in fp32
    assert {b for b, spill in worst.items() if spill <= km.SPILL_TOLERANCE_BYTES} == km.FP32_TILE_SETS
    dims = _sandwich_dims(auto_component_shapes(4096, 4096, 5))
    half, single = km.choose_blocks(dims), km.choose_blocks(dims, fp32_operands=True)
    assert half == (128, 16, 32, 32) and worst[half] > 200  # bf16's pick spills 240 B in fp32
    assert single in km.FP32_TILE_SETS and sum(_executed_macs(d, single) for d in dims) <= 1.65 * sum(
        j * l_ * q + p * j * q for p, j, l_, q in dims
    )
    # every plan of a layer asks for its operands' list: forward and backward, fp32 and bf16
    monkeypatch.setenv("MOKA_BACKEND", "triton")
    asked = []
    choose = km.choose_blocks
    monkeypatch.setattr(km, "choose_blocks", lambda d, fp32_operands=False: asked.append(fp32_operands) or choose(d))
    for dtype, fp32 in ((torch.float32, True), (torch.bfloat16, False)):
        asked.clear()
        x, weight, a_f, b_f, g, bias = make_problem(48, 64, auto_component_shapes(48, 64, 3), dtype, gate=True)
        moka_linear(x, weight, a_f, b_f, g, bias).sum().backward()
        assert len(asked) >= 3 and set(asked) == {fp32}, (dtype, asked)


def test_split_k_follows_the_device_multiprocessor_count(monkeypatch):
    import moka_kernels.ops.nf4_matmul as nm

    monkeypatch.setattr(nm, "INTERPRET", False)
    # 4096 outputs in 128-wide tiles: 32 programs per split; about two waves of 132 (H100/H200) or 108 (A100)
    assert nm.split_k_for(1, 4096, 4096, num_sms=132) == 8
    assert nm.split_k_for(1, 4096, 4096, num_sms=108) == 6


def test_token_splits_follow_the_device_multiprocessor_count(monkeypatch):
    """The token reduction's partial sums fill the device it runs on (they assumed an H100's 132 SMs)."""
    import types

    import moka_kernels.ops as ops
    import moka_kernels.ops.kron_mixture as km

    monkeypatch.setattr(km, "INTERPRET", False)
    counts = {0: 132, 1: 108, 2: 16}
    asked = []

    def properties(index):
        asked.append(index)
        return types.SimpleNamespace(multi_processor_count=counts[index])

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    ops._multiprocessors.cache_clear()
    try:
        assert km._num_splits(4096, 8, torch.device("cuda", 0)) == 4 * 132 // 8
        assert km._num_splits(4096, 8, torch.device("cuda", 1)) == 4 * 108 // 8
        assert km._num_splits(4096, 8, torch.device("cuda")) == 4 * 16 // 8  # the current device
        assert km._num_splits(5, 8, torch.device("cuda", 0)) == 5  # at most one share per token
        assert km._num_splits(4096, 1000, torch.device("cuda", 1)) == 1
        assert km._num_splits(4096, 8, torch.device("cuda", 0)) == 66 and asked == [0, 1, 2]  # cached per device
    finally:
        ops._multiprocessors.cache_clear()


def test_nf4_kernels_take_power_of_two_blocksizes_only():
    import moka_kernels.ops.nf4_matmul as nm
    from moka_kernels import NF4_CODE, NF4Tensor

    w = torch.randn(8, 96)
    assert nm.supports(quantize_nf4(w, 32))
    # A hand-built layout with one 96-element block per row (quantize_nf4 makes powers of two only).
    absmax = w.abs().amax(1)
    codes = ((w / absmax[:, None]).reshape(-1, 1) - torch.tensor(NF4_CODE)).abs().argmin(1).to(torch.uint8)
    packed = (codes[0::2] << 4 | codes[1::2]).reshape(-1, 1)
    odd = NF4Tensor(packed=packed, absmax=absmax, shape=(8, 96), dtype=torch.float32, blocksize=96)
    assert not nm.supports(odd)
    x = torch.randn(3, 96)  # the Triton backend decodes it and runs a plain GEMM
    with mock.patch.dict(os.environ, {"MOKA_BACKEND": "triton"}):
        out = moka_linear(x, odd, [torch.zeros(2, 4)], [torch.zeros(4, 24)], None)
    torch.testing.assert_close(out, x @ dequantize_nf4(odd, torch.float32).T)


def test_launches_run_on_the_device_of_their_tensors(monkeypatch):
    """Triton launches on the current CUDA device: the Triton backend makes the tensors' device current."""
    import moka_kernels.ops.fused_linear as fl

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = fl.on_device_of(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(fl.on_device_of(torch.device("cuda", 0)), torch.cuda.device)
    assert not isinstance(fl.on_device_of(torch.device("cpu")), torch.cuda.device)
    seen = []
    original = fl.on_device_of
    monkeypatch.setattr(fl, "on_device_of", lambda device: seen.append(device) or original(device))
    x, weight, a_f, b_f, g, b = make_problem(24, 36, [(4, 6, 6, 6)], torch.float32, lead=(3,))
    with mock.patch.dict(os.environ, {"MOKA_BACKEND": "triton"}):
        moka_linear(x, weight, a_f, b_f, g, b).sum().backward()
    assert seen == [x.device, x.device]  # forward and backward


def test_auto_backend_takes_triton_for_cuda_tensors_except_fp64(monkeypatch):
    from types import SimpleNamespace

    import moka_kernels.dispatch as dispatch

    monkeypatch.delenv("MOKA_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "TRITON_AVAILABLE", True)
    cuda_like = {dtype: SimpleNamespace(is_cuda=True, dtype=dtype) for dtype in (torch.bfloat16, torch.float64)}
    assert select_backend(cuda_like[torch.bfloat16]) == "triton"
    assert select_backend(cuda_like[torch.float64]) == "torch"
    assert select_backend(torch.zeros(1)) == "torch"
    monkeypatch.setattr(dispatch, "TRITON_AVAILABLE", False)
    assert select_backend(cuda_like[torch.bfloat16]) == "torch"
    monkeypatch.setattr(dispatch, "TRITON_AVAILABLE", True)
    monkeypatch.setenv("MOKA_BACKEND", "triton")  # forced: still never fp64 on fp32-accumulating kernels
    assert select_backend(torch.zeros(1, dtype=torch.float64)) == "torch"
    assert select_backend(torch.zeros(1)) == "triton"  # (the interpreter runs CPU tensors)


def test_deterministic_mode_repeats_bit_for_bit_in_the_interpreter():
    shapes = [(4, 8, 6, 8), (2, 16, 12, 4)]
    x, weight, a_f, b_f, g, b = make_problem(24, 64, shapes, torch.float32, lead=(5,))
    q = quantize_nf4(weight)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        runs = []
        for _ in range(2):
            with mock.patch.dict(os.environ, {"MOKA_BACKEND": "triton"}):
                out = moka_linear(x, q, a_f, b_f, g, b)
                grads = torch.autograd.grad(out.square().sum(), [x, *a_f, *b_f, g, b])
            runs.append([out, *grads])
    finally:
        torch.use_deterministic_algorithms(was)
    assert all(torch.equal(p, q_) for p, q_ in zip(*runs, strict=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("route", ["fused", "dequantize"])
def test_nf4_linear_on_the_kernels_matches_the_reference(route, dtype, monkeypatch):
    """The frozen NF4 base alone (NF4Linear's op) on the Triton backend: forward, dx and the bias' gradient
    against fp64 on the decoded weight, for both routes of the base GEMM; nothing weight-sized is saved."""
    from moka_kernels import nf4_linear

    monkeypatch.setenv("MOKA_BACKEND", "triton")
    monkeypatch.setenv("MOKA_NF4_ROUTE", route)
    weight = quantize_nf4(torch.randn(40, 96) * 0.1, 32)
    dense64 = dequantize_nf4(weight, torch.float64)
    saved: list[int] = []
    for tokens, with_bias in [(0, True), (1, False), (7, True), (33, True)]:
        x = torch.randn(tokens, 3, 96, dtype=dtype).requires_grad_(True)  # 3-D: leading dims are flattened
        bias = torch.randn(40, dtype=dtype).requires_grad_(True) if with_bias else None
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = nf4_linear(x, weight, bias)
        assert out.dtype == dtype and out.shape == (tokens, 3, 40) and not saved
        rx = x.detach().double().requires_grad_(True)
        rbias = None if bias is None else bias.detach().double().requires_grad_(True)
        ref = torch.nn.functional.linear(rx, dense64, rbias)
        _check(out, ref, dtype, f"forward T={tokens}")
        grad_out = torch.randn_like(ref)
        inputs, ref_inputs = [x, *([bias] if with_bias else [])], [rx, *([rbias] if with_bias else [])]
        for i, (ours, theirs) in enumerate(
            zip(
                torch.autograd.grad(out, inputs, grad_out.to(dtype)),
                torch.autograd.grad(ref, ref_inputs, grad_out),
                strict=True,
            )
        ):
            _check(ours, theirs, dtype, f"grad {i} T={tokens}")


@pytest.mark.parametrize("tokens", [1, 7])  # the decode fusion (split-K) and the fused GEMM's epilogue
def test_strided_bias_and_gate_logits_read_as_their_values(tokens, monkeypatch):
    """A bias or logits given as strided views (e.g. gates[:, layer]) compute what their contiguous copies do:
    the kernels read both as contiguous vectors, so the op makes them so."""
    from moka_kernels import nf4_linear

    monkeypatch.setenv("MOKA_BACKEND", "triton")
    shapes = auto_component_shapes(64, 64, 2)
    x, w_dense, a_f, b_f, _, _ = make_problem(64, 64, shapes, torch.float32, lead=(tokens,), gate=True, bias=True)
    weight = quantize_nf4(w_dense.detach(), 32)
    bias_table = torch.randn(64, 2, requires_grad=True)  # column 1 is a stride-2 view
    gate_table = torch.randn(2, 3, requires_grad=True)  # column 1 is a stride-3 view
    strided = moka_linear(x, weight, a_f, b_f, gate_table[:, 1], bias_table[:, 1], 0.7)
    bias, gate = bias_table[:, 1].detach().clone().requires_grad_(True), gate_table[:, 1].detach().clone()
    gate.requires_grad_(True)
    contiguous = moka_linear(x, weight, a_f, b_f, gate, bias, 0.7)
    torch.testing.assert_close(strided, contiguous)
    grad_out = torch.randn_like(contiguous)
    strided_grads = torch.autograd.grad(strided, [bias_table, gate_table], grad_out)
    bias_grad, gate_grad = torch.autograd.grad(contiguous, [bias, gate], grad_out)
    torch.testing.assert_close(strided_grads[0][:, 1], bias_grad)
    torch.testing.assert_close(strided_grads[1][:, 1], gate_grad)
    torch.testing.assert_close(nf4_linear(x, weight, bias_table[:, 1]), nf4_linear(x, weight, bias))


@pytest.mark.parametrize("double_quant", [False, True], ids=["fp32-absmax", "double-quant"])
@pytest.mark.parametrize("route", ["fused", "dequantize"])
def test_nf4_fields_that_are_strided_views_are_read_right(route, double_quant, monkeypatch):
    """The kernels index the NF4 fields as contiguous; a field that is a strided view of the same values (a
    hand-built NF4Tensor, a state dict loaded with assign=True) must give the same result, not another weight."""
    import dataclasses

    from moka_kernels import nf4_linear

    monkeypatch.setenv("MOKA_BACKEND", "triton")
    monkeypatch.setenv("MOKA_NF4_ROUTE", route)
    weight = quantize_nf4(torch.randn(96, 192) * 0.1, 32, double_quant=double_quant)  # 576 blocks: 3 nested
    x = torch.randn(3, 192)
    expected = x @ dequantize_nf4(weight, torch.float32).T
    for name in ("packed", "absmax", *(("nested_absmax", "nested_code") if double_quant else ())):
        field = getattr(weight, name)
        every_other = torch.zeros(*field.shape, 2, dtype=field.dtype)
        every_other[..., 0] = field
        strided = dataclasses.replace(weight, **{name: every_other[..., 0]})
        assert not getattr(strided, name).is_contiguous()
        torch.testing.assert_close(nf4_linear(x, strided), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_factors_in_another_dtype_than_the_rows_are_refused_before_a_launch():
    """The interpreter would upcast a bf16 × fp32 tl.dot; compiled for a GPU it is refused, so the wrappers
    refuse the mix (moka_linear casts the factors first), also once a matching call has cached a plan."""
    x, _, a_f, b_f, _, _ = make_problem(40, 96, [(8, 12, 5, 8)], torch.bfloat16, lead=(3,), gate=False, bias=False)
    a_f, b_f = [t.detach() for t in a_f], [t.detach() for t in b_f]
    wide = [t.float() for t in a_f], [t.float() for t in b_f]
    for kernel, rows in ((kron_mixture_forward, x.detach()), (kron_mixture_backward_dx, torch.randn(3, 40).bfloat16())):
        kernel(rows.float(), *wide)  # a matching call first: its plan is cached, keyed by the factors' dtype
        with pytest.raises(TypeError, match=r"the dtype of the rows they multiply \(torch\.bfloat16\)"):
            kernel(rows, *wide)
        kernel(rows, a_f, b_f)
        with pytest.raises(TypeError, match=r"the dtype of the rows they multiply \(torch\.float32\)"):
            kernel(rows.float(), a_f, b_f)


def test_the_adapter_input_gets_its_gradient_when_x_needs_none_on_the_kernels(monkeypatch):
    monkeypatch.setenv("MOKA_BACKEND", "triton")
    torch.manual_seed(0)
    x, xa = torch.randn(5, 12), torch.randn(5, 12, requires_grad=True)
    w, a, b = torch.randn(6, 12), torch.randn(2, 3), torch.randn(3, 4)
    moka_linear(x, w, [a], [b], None, None, 0.5, xa).sum().backward()
    assert xa.grad is not None
    torch.testing.assert_close(xa.grad, 0.5 * torch.kron(a, b).sum(0).expand(5, 12))
