"""torch.compile sees moka::linear as one custom op: no graph break, same numbers as eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moka import MoKAConfig, MoKALinear, quantize_nf4


def _model(base):
    layer = MoKALinear(base, MoKAConfig(num_components=3))
    with torch.no_grad():
        for p in list(layer.a_factors) + list(layer.b_factors):
            p.normal_(0, 0.2)
        layer.gate_logits.normal_()
    return layer


def test_compiled_layer_has_no_graph_break_and_matches_eager():
    torch._dynamo.reset()
    for base in (nn.Linear(64, 48), quantize_nf4(torch.randn(48, 64) * 0.1)):
        layer = _model(base)
        x = torch.randn(2, 5, 64, requires_grad=True)
        explanation = torch._dynamo.explain(layer)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        # Traced calls take the opaque custom op, not the eager autograd.Function.
        assert "moka.linear" in explanation.graphs[0].code
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        eager_out = layer(x)
        compiled_out = compiled(x)
        torch.testing.assert_close(compiled_out, eager_out)
        eager_grads = torch.autograd.grad(eager_out.square().sum(), [x, *layer.a_factors, layer.gate_logits])
        compiled_grads = torch.autograd.grad(compiled_out.square().sum(), [x, *layer.a_factors, layer.gate_logits])
        for g_c, g_e in zip(compiled_grads, eager_grads, strict=True):
            torch.testing.assert_close(g_c, g_e)


def test_inductor_compile_matches_eager():
    torch._dynamo.reset()
    layer = _model(nn.Linear(36, 24))
    x = torch.randn(7, 36)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_layer_on_the_triton_backend_matches_eager(dtype, monkeypatch):
    """The traced route (moka::linear) running the Triton kernels, in the interpreter on CPU; in bf16 with
    the layer's fp32 factors, which the op takes as they are and whose gradients it returns in fp32."""
    pytest.importorskip("triton")
    from moka_kernels.ops import INTERPRET

    if INTERPRET:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1 (conftest.py sets it)")
    monkeypatch.setenv("MOKA_BACKEND", "triton")
    torch._dynamo.reset()
    layer = _model(quantize_nf4((torch.randn(48, 64) * 0.1).to(dtype))).to(device)
    x = torch.randn(5, 64, device=device, dtype=dtype, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager_out, compiled_out = layer(x), compiled(x)
    torch.testing.assert_close(compiled_out, eager_out)
    leaves = [x, *layer.a_factors, *layer.b_factors, layer.gate_logits]
    eager_grads = torch.autograd.grad(eager_out.square().sum(), leaves)
    compiled_grads = torch.autograd.grad(compiled_out.square().sum(), leaves)
    for g_c, g_e in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(g_c, g_e)
    assert compiled_out.dtype == dtype and all(g.dtype == torch.float32 for g in compiled_grads[1:])


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_torch_export_records_the_custom_op(strict):
    layer = _model(quantize_nf4(torch.randn(48, 64) * 0.1))
    x = torch.randn(5, 64)
    exported = torch.export.export(layer, (x,), strict=strict)
    assert "torch.ops.moka.linear.default" in exported.graph_module.code
    torch.testing.assert_close(exported.module()(x), layer(x))


def _grads_of_a_layer(inputs: dict, use_custom_op: bool, autocast: bool) -> tuple[torch.Tensor, ...]:
    from moka_kernels.library import apply_linear

    x, weight, gate, a_factors, b_factors = (inputs[k] for k in ("x", "weight", "gate", "a", "b"))
    y = apply_linear(x, None, weight, None, gate, 0.5, a_factors, b_factors, "torch", use_custom_op)
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):  # the backward only
        return torch.autograd.grad(y.float().square().sum(), [x, gate, *a_factors, *b_factors])


@pytest.mark.parametrize("use_custom_op", [False, True], ids=["eager-route", "custom-op-route"])
def test_a_backward_run_inside_autocast_matches_one_outside(use_custom_op):
    """On a CPU autograd runs the backward on the caller's thread, inside its autocast region: the backends
    must keep their own dtypes there (an a_first component's fp32 sums raised; b_first ones lost precision)."""
    gen = torch.Generator().manual_seed(0)
    for x_dtype, factor_dtype in ((torch.float16, torch.float16), (torch.bfloat16, torch.float32)):
        inputs = {
            "x": torch.randn(6, 14, generator=gen).to(x_dtype).requires_grad_(),
            "weight": (torch.randn(15, 14, generator=gen) * 0.1).to(x_dtype),
            "gate": torch.zeros(2, requires_grad=True),
            # A 5x7 with B 3x2 takes the a_first order; A 3x2 with B 5x7 the b_first one
            "a": [torch.randn(*s, generator=gen).to(factor_dtype).requires_grad_() for s in ((5, 7), (3, 2))],
            "b": [torch.randn(*s, generator=gen).to(factor_dtype).requires_grad_() for s in ((3, 2), (5, 7))],
        }
        inside, outside = (_grads_of_a_layer(inputs, use_custom_op, autocast) for autocast in (True, False))
        for g_in, g_out in zip(inside, outside, strict=True):
            assert g_in.dtype == g_out.dtype and torch.equal(g_in, g_out), (x_dtype, factor_dtype)


def test_layers_with_different_scales_compile_whole():
    """A scale that differs between compiled calls is traced as a SymFloat: its check must not break the graph."""
    torch._dynamo.reset()
    x = torch.randn(3, 64)
    for scale in (0.5, 2.0):
        layer = MoKALinear(nn.Linear(64, 48), MoKAConfig(num_components=2, scale=scale))
        with torch.no_grad():
            for p in layer.b_factors:
                p.normal_(0, 0.2)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), layer(x))


def test_custom_op_outputs_share_no_storage_and_start_at_offset_zero():
    """The fake kernel's outputs are fresh tensors: the real op's must not be offset slices of one buffer."""
    from moka_kernels.library import _unaliased

    buffer = torch.arange(10.0)
    out = _unaliased([buffer[3:5], buffer[5:10], buffer[0:3], torch.ones(2)[1:]])
    assert all(t.storage_offset() == 0 for t in out)
    assert len({t.untyped_storage().data_ptr() for t in out}) == 4
    assert [t.tolist() for t in out] == [[3.0, 4.0], [5.0, 6.0, 7.0, 8.0, 9.0], [0.0, 1.0, 2.0], [1.0]]


def test_meta_tensors_give_the_output_shape():
    from moka_kernels import moka_linear

    x, weight = torch.empty(4, 14, device="meta"), torch.empty(15, 14, device="meta")
    out = moka_linear(x, weight, [torch.empty(5, 7, device="meta")], [torch.empty(3, 2, device="meta")], None)
    assert out.shape == (4, 15) and out.device.type == "meta"


def test_torch_func_transforms_are_refused_by_name_and_functional_call_works():
    from moka_kernels import moka_linear

    x, weight = torch.randn(4, 14), torch.randn(15, 14)
    a, b = [torch.randn(5, 7)], [torch.randn(3, 2)]
    for transform in (torch.func.grad, torch.func.vmap):
        with pytest.raises(NotImplementedError, match=r"moka_linear: torch\.func transforms .* not supported"):
            transform(lambda t: moka_linear(t, weight, a, b, None).sum())(x)
    layer = MoKALinear(nn.Linear(14, 15), MoKAConfig(num_components=1))
    params = {k: v.detach().clone() for k, v in layer.named_parameters()}
    torch.testing.assert_close(torch.func.functional_call(layer, params, (x,)), layer(x))
