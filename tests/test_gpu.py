"""GPU tests at LLaMA-7B/8B shapes (marked ``gpu``; deselected by default, run by benchmarks/gpu_suite.sh).

The Triton path in bf16/fp16 is compared with an fp32 reference of the same inputs, forward and every
gradient; its error must be within 2x that of the PyTorch path run in the same dtype (or a floor).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import rel_rms

import moka_kernels.ops as ops
from moka.config import auto_component_shapes
from moka_kernels import dequantize_nf4, moka_linear, quantize_nf4
from moka_kernels.ops.nf4_matmul import nf4_matmul, nf4_matmul_t

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _real_gpu():
    assert torch.cuda.is_available(), "the gpu-marked tests need a CUDA device"
    assert not ops.INTERPRET, "run the GPU tests with TRITON_INTERPRET=0 (conftest defaults it to 1)"


CUDA = torch.device("cuda")
FLOOR = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
LAYERS = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (11008, 4096)]


def _problem(n_out, k_in, dtype, tokens, r=5):
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = auto_component_shapes(n_out, k_in, r)
    x = torch.randn(tokens, k_in, generator=g).to(CUDA, dtype)
    w = (torch.randn(n_out, k_in, generator=g) / k_in**0.5).to(CUDA)
    a = [(torch.randn(a1, a2, generator=g) / a2**0.5).to(CUDA, dtype) for a1, a2, _, _ in shapes]
    b = [(torch.randn(b1, b2, generator=g) / b2**0.5 * 0.5).to(CUDA, dtype) for _, _, b1, b2 in shapes]
    gate = torch.randn(len(shapes), generator=g).to(CUDA)
    bias = (torch.randn(n_out, generator=g) * 0.1).to(CUDA, dtype)
    return x, w, a, b, gate, bias


def _run(backend, x, weight, a, b, gate, bias, grad_out, monkeypatch):
    monkeypatch.setenv("MOKA_BACKEND", backend)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *a, *b, gate, bias)]
    r = len(a)
    out = moka_linear(leaves[0], weight, leaves[1 : 1 + r], leaves[1 + r : 1 + 2 * r], leaves[-2], leaves[-1], 2.0)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return [out, *grads]


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "dense"])
@pytest.mark.parametrize("tokens", [1, 16, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n_out", "k_in"), LAYERS, ids=str)
def test_triton_matches_reference_at_llama_shapes(n_out, k_in, dtype, tokens, nf4, monkeypatch):
    x, w, a, b, gate, bias = _problem(n_out, k_in, dtype, tokens)
    weight = quantize_nf4(w.to(dtype)) if nf4 else w.to(dtype)
    weight32 = replace(weight, dtype=torch.float32) if nf4 else w.float()
    grad_out = torch.randn(tokens, n_out, device=CUDA).to(dtype)
    truth = _run(
        "torch",
        x.float(),
        weight32,
        [t.float() for t in a],
        [t.float() for t in b],
        gate,
        bias.float(),
        grad_out.float(),
        monkeypatch,
    )
    ours = _run("triton", x, weight, a, b, gate, bias, grad_out, monkeypatch)
    baseline = _run("torch", x, weight, a, b, gate, bias, grad_out, monkeypatch)
    names = ["out", "x"] + [f"A{i}" for i in range(len(a))] + [f"B{i}" for i in range(len(b))] + ["gate", "bias"]
    for name, o, t, base in zip(names, ours, truth, baseline, strict=True):
        assert torch.isfinite(o).all(), name
        tol = max(FLOOR[dtype], 2 * rel_rms(base, t))
        err = rel_rms(o, t)
        assert err <= tol, f"{name}: rel RMS {err:.3g} > {tol:.3g} (torch path in {dtype}: {rel_rms(base, t):.3g})"


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "fp32-absmax"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_nf4_dequantize_kernel_is_bit_exact(dtype, double_quant):
    """The large-batch route's decode equals the reference bit for bit (the GPU rounds fp32 → bf16 as torch)."""
    from moka_kernels.ops.nf4_dequantize import nf4_dequantize

    w = quantize_nf4((torch.randn(11008, 4096) * 0.02).to(CUDA, dtype), double_quant=double_quant)
    assert torch.equal(nf4_dequantize(w, dtype), dequantize_nf4(w, dtype))


@pytest.mark.parametrize("route", ["fused", "dequantize"])
def test_both_nf4_routes_match_the_reference(route, monkeypatch):
    """The fused GEMMs and decode + cuBLAS, each forced, at 2048 tokens (the e2e batch): forward and dx."""
    monkeypatch.setenv("MOKA_NF4_ROUTE", route)
    x, w, a, b, gate, bias = _problem(4096, 4096, torch.bfloat16, 2048)
    weight = quantize_nf4(w.to(torch.bfloat16))
    grad_out = torch.randn(2048, 4096, device=CUDA).to(torch.bfloat16)
    ours = _run("triton", x, weight, a, b, gate, bias, grad_out, monkeypatch)
    weight32 = replace(weight, dtype=torch.float32)
    f32 = [x.float(), weight32, [t.float() for t in a], [t.float() for t in b], gate, bias.float(), grad_out.float()]
    truth = _run("torch", *f32, monkeypatch)
    for name, o, t in zip(["out", "x"], ours[:2], truth[:2], strict=True):
        assert rel_rms(o, t) < FLOOR[torch.bfloat16], name


@pytest.mark.parametrize("schedule", ["atomic", "rowwise"])
@pytest.mark.parametrize("tokens", [5, 600])
def test_both_adapter_schedules_at_llama_shapes(schedule, tokens, monkeypatch):
    """Each schedule on either side of ROWWISE_MIN_TOKENS, forward and dx, against an fp32 reference."""
    from moka_kernels.ops.kron_mixture import kron_mixture_backward_dx, kron_mixture_forward
    from moka_kernels.reference import kron_component

    monkeypatch.setenv("MOKA_ADAPTER_SCHEDULE", schedule)
    x, _, a, b, gate, _ = _problem(4096, 4096, torch.bfloat16, tokens)
    coeffs = torch.softmax(gate, 0)
    expected = sum(
        c * kron_component(x.float(), ai.float(), bi.float()) for c, ai, bi in zip(coeffs, a, b, strict=True)
    )
    assert rel_rms(kron_mixture_forward(x, a, b, gate_logits=gate), expected) < 1e-2
    dy = torch.randn(tokens, 4096, device=CUDA, dtype=torch.bfloat16)
    expected_dx = sum(
        c * dy.float() @ torch.kron(ai.float(), bi.float()) for c, ai, bi in zip(coeffs, a, b, strict=True)
    )
    assert rel_rms(kron_mixture_backward_dx(dy, a, b, coeffs), expected_dx) < 1e-2


def test_deterministic_mode_is_bitwise_reproducible(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) (rowwise schedule, no split-K) two runs agree bit for bit."""
    monkeypatch.delenv("MOKA_ADAPTER_SCHEDULE", raising=False)
    x, w, a, b, gate, bias = _problem(4096, 4096, torch.bfloat16, 16)
    weight = quantize_nf4(w.to(torch.bfloat16))
    grad_out = torch.randn(16, 4096, device=CUDA).to(torch.bfloat16)
    torch.use_deterministic_algorithms(True)
    try:
        first = _run("triton", x, weight, a, b, gate, bias, grad_out, monkeypatch)
        second = _run("triton", x, weight, a, b, gate, bias, grad_out, monkeypatch)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))


def test_layer_calls_replay_from_cuda_graphs(monkeypatch):
    """After warm-up calls (compiling, autotuning, building the launch plans) a layer call makes no host
    sync and no host-to-device copy, so it can be captured: the decode forward (the adapter inside the
    GEMV's launch) under ``torch.cuda.graph``, and a training fwd+bwd under
    ``torch.cuda.make_graphed_callables``, both matching eager calls on fresh inputs."""
    import copy

    from moka import MoKALinear

    monkeypatch.setenv("MOKA_BACKEND", "triton")
    x, w, a, b, gate, bias = _problem(4096, 4096, torch.bfloat16, 1)
    weight = quantize_nf4(w.to(torch.bfloat16))
    static_x = x.clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                moka_linear(static_x, weight, a, b, gate, bias, 2.0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = moka_linear(static_x, weight, a, b, gate, bias, 2.0)
        for _ in range(2):
            fresh = torch.randn_like(x)
            static_x.copy_(fresh)
            graph.replay()
            assert rel_rms(static_out, moka_linear(fresh, weight, a, b, gate, bias, 2.0)) < 1e-2

    layer = MoKALinear(weight, bias=bias)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    eager = copy.deepcopy(layer)
    graphed = torch.cuda.make_graphed_callables(
        layer, (torch.randn(64, 4096, device=CUDA).to(torch.bfloat16).requires_grad_(),)
    )
    for _ in range(2):
        results = []
        inputs = torch.randn(64, 4096, device=CUDA).to(torch.bfloat16)
        grad_out = torch.randn(64, 4096, device=CUDA).to(torch.bfloat16)
        for module in (graphed, eager):
            module.zero_grad(set_to_none=True)
            x_in = inputs.clone().requires_grad_()
            out = module(x_in)
            out.backward(grad_out)
            trainable = [p for p in module.parameters() if p.requires_grad]
            results.append([out.detach().clone(), x_in.grad.clone(), *[p.grad.clone() for p in trainable]])
        for got, want in zip(*results, strict=True):
            assert rel_rms(got, want) < 1e-2


@pytest.mark.parametrize("tokens", [1, 512])
def test_fp32_factors_of_a_bf16_layer_compute_what_cast_factors_do(tokens, monkeypatch):
    """MoKALinear's default on a bf16 model: fp32 factors, rounded into per-layer bf16 copies by one
    ``_foreach_copy_``. In deterministic mode (no atomics) the output and dx equal those of a call with the
    factors cast first, bit for bit, and the fp32 factor gradients round to the cast call's."""
    monkeypatch.setenv("MOKA_BACKEND", "triton")
    x, w, a, b, gate, bias = _problem(4096, 4096, torch.bfloat16, tokens)
    weight = quantize_nf4(w.to(torch.bfloat16))
    a32 = [f.float().requires_grad_() for f in a]
    b32 = [f.float().requires_grad_() for f in b]
    grad_out = torch.randn(tokens, 4096, device=CUDA).to(torch.bfloat16)
    torch.use_deterministic_algorithms(True)
    try:
        x_in = x.clone().requires_grad_()
        mixed = moka_linear(x_in, weight, a32, b32, gate, bias, 2.0)
        ours = torch.autograd.grad(mixed, [x_in, *a32, *b32], grad_out)
        cast = _run("triton", x, weight, a, b, gate, bias, grad_out, monkeypatch)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(mixed, cast[0]) and torch.equal(ours[0], cast[1])
    for mine, ref in zip(ours[1:], cast[2 : 2 + 2 * len(a)], strict=True):
        assert mine.dtype == torch.float32 and torch.equal(mine.to(torch.bfloat16), ref)


# Last in the file: its four token buckets tune the NF4 GEMMs afresh, and the GPU suite's time limit may
# cut the focused tests short; the ones above need a GPU most (graphs, determinism, schedules).
@pytest.mark.parametrize("tokens", [1, 7, 16, 300])
def test_nf4_kernels_match_dequantize(tokens):
    w = quantize_nf4((torch.randn(4096, 4096) * 0.02).to(CUDA, torch.bfloat16))
    dense = dequantize_nf4(w).float()
    x = torch.randn(tokens, 4096, device=CUDA, dtype=torch.bfloat16)
    assert rel_rms(nf4_matmul(x, w), x.float() @ dense.T) < 1e-2
    dy = torch.randn(tokens, 4096, device=CUDA, dtype=torch.bfloat16)
    assert rel_rms(nf4_matmul_t(dy, w), dy.float() @ dense) < 1e-2


@pytest.mark.parametrize("tokens", [1, 600])  # both NF4 routes: the fused GEMM, and decode + cuBLAS
def test_disabled_adapters_match_the_layer_at_zero_adapters(tokens):
    """disable_adapters on CUDA computes the NF4 base through nf4_linear, the enabled layer through its fused
    kernels: at zero adapters the two agree to bf16 rounding, and the adapters come back after. (Last in this
    file: the suite's time limit cuts it first.)"""
    from moka import MoKAConfig, MoKALinear, disable_adapters

    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(4096, 4096, generator=g) / 64).to(CUDA, torch.bfloat16)
    layer = MoKALinear(quantize_nf4(w), MoKAConfig(num_components=5))  # zero_b: the adapter is zero at init
    x = torch.randn(tokens, 4096, generator=g).to(CUDA, torch.bfloat16)
    with torch.no_grad():
        enabled = layer(x)
        with disable_adapters(layer):
            disabled = layer(x)
        for b_factor in layer.b_factors:
            b_factor.normal_(0, 0.05)
        adapted = layer(x)
    assert disabled.dtype == enabled.dtype == torch.bfloat16
    assert rel_rms(disabled.float(), enabled.float()) < 1e-2
    assert rel_rms(adapted.float(), enabled.float()) > 1e-2
