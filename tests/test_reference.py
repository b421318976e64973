"""The reshape form (the CPU path, hand-written backward) against the materialized kron form."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_close_rel
from helpers import leaves, make_problem
from hypothesis import given, settings
from hypothesis import strategies as st

from moka.config import auto_component_shapes
from moka_kernels import contraction_order, delta_weight, library, moka_linear, quantize_nf4
from moka_kernels.reference import kron_component, moka_linear_materialized

CASES = {
    "square-r1": (64, 64, [(8, 8, 8, 8)]),
    "rect-auto-r5": (24, 36, auto_component_shapes(24, 36, 5)),
    "rect-mixed-r3": (36, 24, [(6, 4, 6, 6), (2, 12, 18, 2), (36, 3, 1, 8)]),
    "gqa-1024x4096-r2": (1024, 4096, [(32, 64, 32, 64), (16, 128, 64, 32)]),
    "llama-11008=86x128": (11008, 64, [(86, 8, 128, 8), (172, 4, 64, 16)]),
    "mixed-r6": (48, 60, auto_component_shapes(48, 60, 6)),
}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _truth(x, weight, a_factors, b_factors, gate_logits, bias, scale):
    """fp64 materialized output and gradients for the same values."""
    cast = [
        None if t is None else t.detach().double().requires_grad_(t.requires_grad)
        for t in (x, *a_factors, *b_factors, gate_logits, bias)
    ]
    r = len(a_factors)
    x64, a64, b64, g64, bias64 = cast[0], cast[1 : 1 + r], cast[1 + r : 1 + 2 * r], cast[-2], cast[-1]
    out = moka_linear_materialized(x64, weight.double(), a64, b64, g64, bias64, scale)
    return out, leaves(x64, a64, b64, g64, bias64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reshape_form_matches_materialized(case, dtype):
    n_out, k_in, shapes = CASES[case]
    x, weight, a_f, b_f, gate, bias = make_problem(n_out, k_in, shapes, dtype, lead=(3, 5))
    scale = 0.75
    out = moka_linear(x, weight, a_f, b_f, gate, bias, scale)
    expected, expected_leaves = _truth(x, weight, a_f, b_f, gate, bias, scale)
    tol = TOLERANCES[dtype]
    assert out.dtype == dtype
    assert_close_rel(out, expected, tol, "forward")
    grad_out = torch.randn_like(expected)
    ours = torch.autograd.grad(out, leaves(x, a_f, b_f, gate, bias), grad_out.to(dtype))
    theirs = torch.autograd.grad(expected, expected_leaves, grad_out)
    names = ["x"] + [f"A{i}" for i in range(len(a_f))] + [f"B{i}" for i in range(len(b_f))] + ["gate", "bias"]
    for name, g_ours, g_ref in zip(names, ours, theirs, strict=True):
        assert g_ours.dtype == dtype, name
        # The adapter's share of dx is small next to the base's; the gate's gradient is a long reduction.
        assert_close_rel(g_ours, g_ref, tol * (4 if name == "gate" else 1), f"grad {name}")


def test_adapter_alone_matches_kron_for_both_orders():
    x = torch.randn(9, 6 * 10, dtype=torch.float64)
    for a_shape, b_shape in [((2, 6), (20, 10)), ((20, 6), (2, 10))]:
        a, b = torch.randn(*a_shape, dtype=torch.float64), torch.randn(*b_shape, dtype=torch.float64)
        assert contraction_order(a_shape, b_shape) != contraction_order(b_shape, a_shape) or a_shape == b_shape
        torch.testing.assert_close(kron_component(x, a, b), x @ torch.kron(a, b).T)


def test_delta_weight_of_column_major_factors():
    """torch.kron raises on a column-major first operand; ΔW must not depend on the factors' layout."""
    a = [torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)]
    b = [torch.randn(3, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)]
    gate = torch.randn(2, dtype=torch.float64)
    expected = delta_weight(a, b, gate, 0.5)
    column_major_a = [t.T.contiguous().T for t in a]  # B row-major: the mix kron fails on
    assert not column_major_a[0].is_contiguous()
    torch.testing.assert_close(delta_weight(column_major_a, b, gate, 0.5), expected)
    alpha = torch.softmax(gate, 0)
    torch.testing.assert_close(expected, 0.5 * sum(alpha[i] * torch.kron(a[i], b[i]) for i in range(2)))


def test_contraction_order_picks_cheaper():
    # A 64x2 (cheap to apply first), B 2x512: b_first costs 2*2*(512+64), a_first 64*512*(2+2).
    assert contraction_order((64, 2), (2, 512)) == "b_first"
    assert contraction_order((2, 512), (64, 2)) == "a_first"


@pytest.mark.parametrize("gate", [True, False], ids=["gate", "gate-off"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_gradcheck_fp64(gate, bias):
    shapes = [(2, 3, 6, 6), (3, 9, 4, 2), (12, 2, 1, 9)]
    x, weight, a_f, b_f, g, b = make_problem(12, 18, shapes, torch.float64, lead=(2, 3), gate=gate, bias=bias)

    def fn(x, *rest):
        a, bb = rest[:3], rest[3:6]
        tail = list(rest[6:])
        g_ = tail.pop(0) if gate else None
        b_ = tail.pop(0) if bias else None
        return moka_linear(x, weight, a, bb, g_, b_, 0.6)

    inputs = [x, *a_f, *b_f] + ([g] if gate else []) + ([b] if bias else [])
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_separate_adapter_input_and_frozen_factor():
    shapes = [(3, 3, 4, 6), (2, 6, 6, 3)]
    x, weight, a_f, b_f, g, _b = make_problem(12, 18, shapes, torch.float64, lead=(4,))
    a_f[0] = torch.eye(3, dtype=torch.float64)  # MoKA_s-style frozen identity factor
    x_adapter = torch.randn_like(x).requires_grad_(True)

    def fn(x, x_adapter, a1, b0, b1, g):
        return moka_linear(x, weight, [a_f[0], a1], [b0, b1], g, None, 1.3, adapter_input=x_adapter)

    assert torch.autograd.gradcheck(fn, (x, x_adapter, a_f[1], b_f[0], b_f[1], g))


def test_transposed_adapter_input_for_both_orders():
    """A dense but column-major adapter input (e.g. a transposed activation) in backward, both contraction orders."""
    shapes = [(3, 2, 2, 4), (2, 4, 3, 2)]
    assert {contraction_order(s[:2], s[2:]) for s in shapes} == {"a_first", "b_first"}
    x, weight, a_f, b_f, g, _b = make_problem(6, 8, shapes, torch.float64, lead=(5,))
    x_adapter_t = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)

    def fn(x, x_adapter_t, *factors):
        return moka_linear(x, weight, factors[:2], factors[2:], g, None, 0.7, adapter_input=x_adapter_t.t())

    assert torch.autograd.gradcheck(fn, (x, x_adapter_t, *a_f, *b_f))


def test_first_order_grads_with_create_graph_and_a_clear_double_backward_error():
    x, weight, a_f, b_f, g, b = make_problem(24, 36, [(4, 6, 6, 6)], torch.float64, lead=(3,))
    out = moka_linear(x, weight, a_f, b_f, g, b)
    (grad_bias,) = torch.autograd.grad(out.pow(2).sum(), b, create_graph=True)  # a gradient penalty's first step
    torch.testing.assert_close(grad_bias, 2 * out.sum(0))
    (grad_x,) = torch.autograd.grad(moka_linear(x, weight, a_f, b_f, g, b).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad_x.sum().backward()


@pytest.mark.parametrize("use_custom_op", [False, True], ids=["eager", "custom_op"])
def test_a_loss_linear_in_the_output_still_refuses_the_second_derivative(use_custom_op):
    # d(Σ y)/dx = 1ᵀ(W + ΔW) depends on the factors although the incoming gradient is a constant: its
    # gradient must raise, not come back as a constant whose penalty silently has no factor gradient.
    x, weight, a_f, b_f, g, b = make_problem(24, 36, [(4, 6, 6, 6), (2, 9, 12, 4)], torch.float64, lead=(3,))
    out = library.apply_linear(x, None, weight, b, g, 0.5, a_f, b_f, "torch", use_custom_op=use_custom_op)
    grad_x, grad_a0, grad_bias = torch.autograd.grad(out.sum(), [x, a_f[0], b], create_graph=True)
    expected = moka_linear(x, weight, a_f, b_f, g, b, 0.5)
    (expected_grad_x,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad_x, expected_grad_x)  # the first order is unchanged
    for grad, depends_on in ((grad_x, a_f[1]), (grad_a0, b_f[0]), (grad_a0, g)):
        with pytest.raises(RuntimeError, match=r"no second derivative|no autograd formula"):
            torch.autograd.grad(grad.pow(2).sum(), depends_on)
    if not use_custom_op:  # (the custom op's generated backward marks every gradient)
        assert not grad_bias.requires_grad  # Σ_t G_t with a constant G: a constant, rightly
        # dA_0 = c_0 Σ_t G_t B_0 X_tᵀ does not depend on A_0: its derivative there is zero, not an error
        assert torch.autograd.grad(grad_a0.pow(2).sum(), a_f[0], allow_unused=True) == (None,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_runs_the_op_in_the_autocast_dtype(dtype):
    x, weight, a_f, b_f, g, b = make_problem(24, 36, [(4, 6, 6, 6), (2, 9, 12, 4)], torch.float32, lead=(3,))
    with torch.autocast("cpu", dtype=dtype):
        out = moka_linear(x, weight, a_f, b_f, g, b, 0.5)
    assert out.dtype == dtype
    low = [t.detach().to(dtype) for t in (x, weight, *a_f, *b_f, b)]
    expected = moka_linear(low[0], low[1], low[2:4], low[4:6], g.detach(), low[6], 0.5)
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (x, *a_f, *b_f, g, b))


def test_zero_tokens_and_leading_dims():
    x, weight, a_f, b_f, g, b = make_problem(24, 36, auto_component_shapes(24, 36, 3), torch.float32, lead=(2, 0, 3))
    out = moka_linear(x, weight, a_f, b_f, g, b)
    assert out.shape == (2, 0, 3, 24)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert all(torch.count_nonzero(a.grad) == 0 for a in a_f)
    assert torch.count_nonzero(g.grad) == 0


def test_nan_in_x_propagates():
    x, weight, a_f, b_f, g, b = make_problem(24, 36, auto_component_shapes(24, 36, 2), torch.float32, lead=(3,))
    x = x.detach().clone()
    x[1, 5] = float("nan")
    out = moka_linear(x, weight, a_f, b_f, g, b)
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[[0, 2]]).all()
    out.sum().backward()
    assert torch.isnan(a_f[0].grad).any()


def test_backward_saves_no_delta_weight_and_no_intermediates():
    """Saved tensors are x, the factors and the gate: nothing of size N*K or r*T*N."""
    n_out, k_in, shapes = 64, 96, auto_component_shapes(64, 96, 4)
    x, weight, a_f, b_f, g, b = make_problem(n_out, k_in, shapes, torch.float32, lead=(32,))
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        moka_linear(x, weight, a_f, b_f, g, b)
    factor_numel = sum(a.numel() + bb.numel() for a, bb in zip(a_f, b_f, strict=True))
    total = sum(t.numel() for t in saved if t.data_ptr() != weight.data_ptr())
    assert total <= x.numel() + factor_numel + g.numel(), total


# -- property test -------------------------------------------------------------------------------
def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def problems(draw):
    n_out = draw(st.sampled_from([1, 2, 4, 6, 8, 9, 12, 15, 16, 20, 24, 30]))
    k_in = draw(st.sampled_from([2, 3, 4, 6, 8, 10, 12, 18, 24, 32]))
    r = draw(st.integers(1, 4))
    shapes = []
    for _ in range(r):
        a1 = draw(st.sampled_from(_divisors(n_out)))
        a2 = draw(st.sampled_from(_divisors(k_in)))
        shapes.append((a1, a2, n_out // a1, k_in // a2))
    # at least one token and a scale away from 0, so the adapter's output and gradients are never all zero
    # (zero tokens have their own test)
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    gate = draw(st.booleans())
    bias = draw(st.booleans())
    scale = draw(st.floats(0.1, 2) | st.floats(-2, -0.1))
    return n_out, k_in, shapes, lead, dtype, gate, bias, scale


@settings(max_examples=60, deadline=None)
@given(problems())
def test_property_reshape_equals_materialized(problem):
    n_out, k_in, shapes, lead, dtype, gate, bias, scale = problem
    x, weight, a_f, b_f, g, b = make_problem(n_out, k_in, shapes, dtype, lead=lead, gate=gate, bias=bias)
    out = moka_linear(x, weight, a_f, b_f, g, b, scale)
    expected = moka_linear_materialized(x, weight, a_f, b_f, g, b, scale)
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}[dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    grad_out = torch.randn_like(out)
    tensors = leaves(x, a_f, b_f, g, b)
    ours = torch.autograd.grad(out, tensors, grad_out, allow_unused=True)
    theirs = torch.autograd.grad(expected, tensors, grad_out, allow_unused=True)
    for g_ours, g_ref in zip(ours, theirs, strict=True):
        g_ref = torch.zeros_like(g_ours) if g_ref is None else g_ref
        torch.testing.assert_close(g_ours, g_ref, rtol=tol, atol=tol)


def test_gradcheck_gate_only_with_frozen_factors():
    """Only x and the gate train: dα must come from its own contraction, not a factor's gradient."""
    shapes = [(3, 3, 4, 6), (2, 6, 6, 3), (4, 2, 3, 9)]
    x, weight, a_f, b_f, g, _ = make_problem(12, 18, shapes, torch.float64, lead=(5,), bias=False)
    frozen_a = [a.detach() for a in a_f]
    frozen_b = [b.detach() for b in b_f]
    assert torch.autograd.gradcheck(lambda x, g: moka_linear(x, weight, frozen_a, frozen_b, g, None, 0.9), (x, g))
    assert torch.autograd.gradcheck(lambda g: moka_linear(x.detach(), weight, frozen_a, frozen_b, g), (g,))


def test_kron_component_is_differentiable_when_asked():
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kron_component, (x, a, b))
    with torch.no_grad():
        torch.testing.assert_close(kron_component(x, a, b), x @ torch.kron(a, b).T)


@pytest.mark.parametrize("weight_kind", ["dense", "nf4"])
@pytest.mark.parametrize("variant", ["full", "gate-off-no-bias", "adapter-input-frozen-a0"])
def test_eager_route_equals_custom_op(weight_kind, variant):
    """Eager calls skip the dispatcher (EagerLinear); traced calls use moka::linear. Same numbers, bit for bit."""
    shapes = [(2, 3, 12, 16), (3, 8, 8, 6), (12, 2, 2, 24)]
    gate, bias = variant == "full" or variant.startswith("adapter"), variant != "gate-off-no-bias"
    x, weight, a_f, b_f, g, b = make_problem(24, 48, shapes, torch.float32, lead=(5,), gate=gate, bias=bias)
    if weight_kind == "nf4":
        weight = quantize_nf4(weight, blocksize=64)
    x_adapter = None
    if variant.startswith("adapter"):
        x_adapter = torch.randn_like(x).requires_grad_(True)
        a_f[0] = a_f[0].detach()
    results = []
    for use_custom_op in (False, True):
        out = library.apply_linear(x, x_adapter, weight, b, g, 0.7, a_f, b_f, "torch", use_custom_op=use_custom_op)
        inputs = [t for t in (x, x_adapter, *a_f, *b_f, g, b) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(out, inputs, torch.linspace(-1, 1, out.numel()).view_as(out))
        results.append((out, grads))
    (out_eager, grads_eager), (out_op, grads_op) = results
    assert torch.equal(out_eager, out_op)
    assert len(grads_eager) == len(grads_op)
    for g_eager, g_op in zip(grads_eager, grads_op, strict=True):
        assert torch.equal(g_eager, g_op)


def test_route_choice_eager_vs_traced():
    x = torch.randn(3, 18)
    assert not library._must_trace(x)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_x = mode.from_tensor(x)
        assert library._must_trace(fake_x)
        # The custom op's fake implementation gives the shape without running anything.
        x2, weight, a_f, b_f, g, b = make_problem(12, 18, [(2, 3, 6, 6)], torch.float32, lead=(4,))
        out = moka_linear(x2, weight, a_f, b_f, g, b)
        assert out.shape == (4, 12)


def test_fp16_factor_gradients_do_not_overflow_before_the_gradients_do():
    """The raw token sums are 1/c_i larger than the gradients; in fp16 they are kept in fp32."""
    shapes = [(2, 2, 4, 4), (4, 4, 2, 2)]  # one component in each contraction order
    dtype = torch.float16
    weight = torch.randn(8, 8, dtype=dtype)
    factors = [
        torch.full(s, 1.0, dtype=dtype, requires_grad=True) for a1, a2, b1, b2 in shapes for s in ((a1, a2), (b1, b2))
    ]
    a_f, b_f = factors[0::2], factors[1::2]
    gate = torch.zeros(2, dtype=dtype, requires_grad=True)
    x = torch.full((256, 8), 8.0, dtype=dtype)
    grad_y = torch.full((256, 8), 8.0, dtype=dtype)
    out = moka_linear(x, weight, a_f, b_f, gate, None, 0.01)
    got = torch.autograd.grad(out, [*a_f, *b_f, gate], grad_y)
    wide = [t.detach().double().requires_grad_() for t in (*a_f, *b_f, gate)]
    ref_out = moka_linear(x.double(), weight.double(), wide[:2], wide[2:4], wide[4], None, 0.01)
    want = torch.autograd.grad(ref_out, wide, grad_y.double())
    assert max(w.abs().max().item() for w in want) < 65504  # the gradients fit fp16
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("scale", [3e-8, 1e-6], ids=["c-below-fp16-subnormals", "c-subnormal"])
def test_fp16_keeps_a_coefficient_below_fp16s_normal_range(scale):
    """c_i = s·α_i is folded into a factor without first being rounded to fp16 (which made it 0 or lost its
    digits), so the output and dX follow the fp64 truth while A_i·c_i is representable."""
    shapes = [(2, 3, 3, 5), (3, 5, 2, 3)]  # one component in each contraction order
    dtype = torch.float16
    a_f = [torch.full((a1, a2), 100.0, dtype=dtype) for a1, a2, _, _ in shapes]
    b_f = [torch.full((b1, b2), 100.0, dtype=dtype) for _, _, b1, b2 in shapes]
    x = torch.ones(2, 15, dtype=dtype, requires_grad=True)
    weight = torch.zeros(6, 15, dtype=dtype)
    out = moka_linear(x, weight, a_f, b_f, None, None, scale)
    (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
    x64 = x.detach().double().requires_grad_()
    wide = [[t.double() for t in f] for f in (a_f, b_f)]
    ref = moka_linear(x64, weight.double(), *wide, None, None, scale)
    (ref_grad_x,) = torch.autograd.grad(ref, x64, torch.ones_like(ref))
    assert ref.abs().min() > 1e-3  # the output itself is well inside fp16's range
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=0)
    torch.testing.assert_close(grad_x.double(), ref_grad_x, rtol=1e-2, atol=0)


def test_first_order_grads_with_create_graph_under_activation_checkpointing():
    """Non-reentrant checkpointing allows each saved tensor one unpack: the backward reads them once even
    when it also guards its gradients against a second derivative (create_graph=True)."""
    from torch.utils.checkpoint import checkpoint

    x, weight, a_f, b_f, g, b = make_problem(24, 36, [(4, 6, 6, 6), (2, 9, 12, 4)], torch.float64, lead=(3,))
    out = checkpoint(moka_linear, x, weight, a_f, b_f, g, b, use_reentrant=False)
    grads = torch.autograd.grad(out.pow(2).sum(), [x, *a_f], create_graph=True)
    expected = torch.autograd.grad(moka_linear(x, weight, a_f, b_f, g, b).pow(2).sum(), [x, *a_f])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_fp32_factor_gradients_of_a_bf16_layer_are_fp32_sums():
    """bf16 activations with fp32 master factors (MoKALinear's default on a bf16 model): the factors' raw
    gradient sums run in fp32, as the Triton backend's do (rounded to bf16 they were off by ~0.4%)."""
    shape = (8, 2, 4, 32)
    assert contraction_order(shape[:2], shape[2:]) == "b_first"
    torch.manual_seed(0)
    x, w = torch.randn(256, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    a, b = torch.randn(8, 2, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    g = torch.randn(1, requires_grad=True)
    out = moka_linear(x, w, [a], [b], g, None, 0.7)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    a64, b64 = (f.detach().bfloat16().double().requires_grad_() for f in (a, b))
    reference = moka_linear_materialized(x.double(), w.double(), [a64], [b64], g.detach().double(), None, 0.7)
    reference.backward(grad_out.double())
    # dA sums G_t (X_t Bᵀ)ᵀ over bf16 inputs only; dB's intermediate Aᵀ G is rounded to bf16 first, as the
    # Triton reduction rounds its intermediate (docs/design.md §5), so only dA is exact to fp32 here
    assert_close_rel(a.grad, a64.grad, 1e-5, "dA")


def test_the_adapter_input_gets_its_gradient_when_x_needs_none():
    """moka_linear(x, ..., adapter_input=xa) with only xa requiring grad (the base input frozen upstream)."""
    torch.manual_seed(0)
    x = torch.randn(5, 12, dtype=torch.float64)
    xa = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 12, dtype=torch.float64)
    a, b = torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    moka_linear(x, w, [a], [b], None, None, 0.5, xa).sum().backward()
    assert xa.grad is not None
    torch.testing.assert_close(xa.grad, 0.5 * torch.kron(a, b).sum(0).expand(5, 12))


def test_gate_weights_is_the_softmax_or_uniform_without_a_device_argument():
    from moka_kernels import gate_weights

    logits = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(gate_weights(logits, 3), torch.softmax(logits, 0))
    uniform = gate_weights(None, 4)
    assert uniform.device.type == "cpu" and uniform.dtype == torch.float32
    torch.testing.assert_close(uniform, torch.full((4,), 0.25))
    assert gate_weights(None, 2, dtype=torch.bfloat16).dtype == torch.float32  # never in half precision
