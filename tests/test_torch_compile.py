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
