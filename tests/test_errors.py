"""Bad input raises an exception that names the parameter and the expected value, and changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_problem
from torch import nn

from moka import MoKAConfig, MoKALinear
from moka_kernels import NF4Tensor, moka_linear, nf4_linear, quantize_nf4


@pytest.fixture
def problem():
    return make_problem(24, 36, [(4, 6, 6, 6), (2, 9, 12, 4)], torch.float32, lead=(3,))


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list) and all(isinstance(t, torch.Tensor) for t in value):
        return [t.detach().clone() for t in value]
    return value


def _call(problem, **overrides):
    x, weight, a_f, b_f, g, b = problem
    args = dict(x=x, weight=weight, a_factors=a_f, b_factors=b_f, gate_logits=g, bias=b)
    args.update(overrides)
    snapshot = {k: _clone(v) for k, v in args.items()}
    try:
        moka_linear(**args)
    finally:
        for k, v in args.items():  # nothing was modified
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, snapshot[k]), k
            elif isinstance(v, list) and all(isinstance(t, torch.Tensor) for t in v):
                assert all(t.device.type == "meta" or torch.equal(t, s) for t, s in zip(v, snapshot[k], strict=True)), k


def test_factor_shapes_must_multiply_to_layer(problem):
    _, _, _a_f, b_f, _, _ = problem
    with pytest.raises(ValueError, match=r"a_factors\[1\], b_factors\[1\]: expected a1\*b1 == N=24 and a2\*b2 == K=36"):
        _call(problem, b_factors=[b_f[0], torch.randn(12, 5)])


def test_x_last_dim_must_be_k(problem):
    with pytest.raises(ValueError, match=r"x: expected last dim K=36"):
        _call(problem, x=torch.randn(3, 35))


def test_factor_dtype_must_match_x(problem):
    _, _, a_f, _, _, _ = problem
    with pytest.raises(TypeError, match=r"a_factors\[0\]: expected dtype torch.float32"):
        _call(problem, a_factors=[a_f[0].detach().double(), a_f[1]])


def test_half_activations_take_factors_of_their_dtype_or_fp32_all_alike(problem):
    x, weight, a_f, b_f, g, b = problem
    half = dict(x=x.detach().bfloat16(), weight=weight.bfloat16(), bias=b.detach().bfloat16())
    with pytest.raises(
        TypeError, match=r"a_factors\[0\]: expected dtype torch.bfloat16 .*torch.bfloat16 or torch.float32"
    ):
        _call(
            problem, **half, a_factors=[f.detach().double() for f in a_f], b_factors=[f.detach().double() for f in b_f]
        )
    with pytest.raises(TypeError, match=r"b_factors\[1\]: expected dtype torch.float32 \(factors share one dtype"):
        _call(problem, **half, b_factors=[b_f[0], b_f[1].detach().bfloat16()])
    assert moka_linear(half["x"], half["weight"], a_f, b_f, g, half["bias"]).dtype == torch.bfloat16  # fp32 ok


def test_autocast_casts_every_factor_when_their_dtypes_differ(problem):
    """fp32 factors stay fp32 under autocast only when all are fp32: a mix is cast whole, as F.linear's
    inputs would be, not left for the validation to refuse."""
    x, weight, a_f, b_f, g, b = problem
    mixed_b = [f.detach().bfloat16() for f in b_f]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moka_linear(x, weight, a_f, mixed_b, g, b)
        cast = moka_linear(x, weight, [f.detach().bfloat16() for f in a_f], mixed_b, g, b)
    assert out.dtype == torch.bfloat16 and torch.equal(out, cast)


def test_factor_device_must_match_x(problem):
    _, _, _, b_f, _, _ = problem
    with pytest.raises(ValueError, match=r"b_factors\[1\]: expected device cpu"):
        _call(problem, b_factors=[b_f[0], b_f[1].detach().to("meta")])


def test_x_must_be_floating(problem):
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor, got dtype torch\.int64"):
        _call(problem, x=torch.ones(3, 36, dtype=torch.int64))


def test_gate_logits_length(problem):
    with pytest.raises(ValueError, match=r"gate_logits: expected shape \(2,\)"):
        _call(problem, gate_logits=torch.zeros(3))


def test_zero_components(problem):
    with pytest.raises(ValueError, match=r"a_factors: expected at least one component \(r >= 1\)"):
        _call(problem, a_factors=[], b_factors=[])
    with pytest.raises(ValueError, match="num_components: expected an integer >= 1, got 0"):
        MoKAConfig(num_components=0)
    with pytest.raises(ValueError, match=r"components: expected at least one"):
        MoKAConfig(components=[])


def test_factor_count_mismatch(problem):
    _, _, _, b_f, _, _ = problem
    with pytest.raises(ValueError, match="b_factors: expected r=2 factors"):
        _call(problem, b_factors=b_f[:1])


def test_bias_shape(problem):
    with pytest.raises(ValueError, match=r"bias: expected shape \(24,\)"):
        _call(problem, bias=torch.zeros(36))


def test_fp64_under_autocast_is_left_alone_and_errors_name_the_dtype_passed(problem):
    """autocast never touches an fp64 call (as F.linear): its other inputs are not rounded to bf16 first, and a
    mismatch names the dtype the caller passed."""
    x = problem[0].detach().double()
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(TypeError, match=r"weight: expected dtype torch.float64 .*, got torch.float32"),
    ):
        _call(problem, x=x)
    q, bias = quantize_nf4(torch.randn(24, 64), 32), torch.randn(24) / 3  # an fp32 bias for an fp64 x: exact
    x = torch.randn(3, 64, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = nf4_linear(x, q, bias)
    assert in_autocast.dtype == torch.float64 and torch.equal(in_autocast, nf4_linear(x, q, bias.double()))


def test_nf4_linear_errors_name_the_parameter():
    q = quantize_nf4(torch.randn(24, 64), 32)
    with pytest.raises(TypeError, match="weight: expected an NF4Tensor"):
        nf4_linear(torch.randn(2, 64), torch.randn(24, 64))
    with pytest.raises(ValueError, match=r"x: expected last dimension 64"):
        nf4_linear(torch.randn(2, 63), q)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        nf4_linear(torch.ones(2, 64, dtype=torch.long), q)
    with pytest.raises(ValueError, match=r"bias: expected shape \(24,\)"):
        nf4_linear(torch.randn(2, 64), q, torch.randn(23))


def test_trainable_base_weight_is_rejected(problem):
    _, weight, _, _, _, _ = problem
    with pytest.raises(ValueError, match="weight: expected a frozen base weight"):
        _call(problem, weight=weight.clone().requires_grad_(True))


def test_nf4_blocksize_and_block_count_are_checked():
    q = quantize_nf4(torch.randn(8, 16), blocksize=32)
    with pytest.raises(ValueError, match="absmax: expected 3 block scales, got 4"):  # 128 = 48 + 48 + 32
        NF4Tensor(packed=q.packed, absmax=q.absmax, shape=q.shape, dtype=q.dtype, blocksize=48)
    with pytest.raises(ValueError, match="blocksize: expected a positive even element count per block"):
        NF4Tensor(packed=q.packed, absmax=q.absmax, shape=q.shape, dtype=q.dtype, blocksize=33)
    with pytest.raises(ValueError, match=r"blocksize: expected one of \(32, 64"):
        quantize_nf4(torch.randn(8, 16), blocksize=48)
    with pytest.raises(ValueError, match="w: expected a non-empty weight"):
        quantize_nf4(torch.randn(0, 16), blocksize=64)
    assert quantize_nf4(torch.randn(6, 16), blocksize=64).absmax.numel() == 2  # 96 = 64 + a short 32


def test_nf4_fields_must_share_the_packed_bytes_device():
    q = quantize_nf4(torch.randn(8, 64), blocksize=32)  # double quantization: five fields
    for name in ("absmax", "nested_absmax", "nested_code", "offset"):
        fields = {f: getattr(q, f) for f in ("packed", "absmax", "nested_absmax", "nested_code", "offset")}
        fields[name] = fields[name].to("meta")
        with pytest.raises(ValueError, match=f"{name}: expected device cpu"):
            NF4Tensor(**fields, shape=q.shape, dtype=q.dtype, blocksize=q.blocksize)


def test_config_errors_name_the_parameter():
    for kwargs, pattern in [
        (dict(variant="lokr"), "variant: expected one of"),
        (dict(init="normal"), "init: expected one of"),
        (dict(dropout=1.5), r"dropout: expected a probability in \[0, 1\)"),
        (dict(scale=float("nan")), "scale: expected a finite real number"),
        (dict(scale=10**400), "scale: expected a finite real number"),
        (dict(gate="no"), "gate: expected True or False"),
        (dict(target_modules=[]), "target_modules: expected a non-empty list"),
        (dict(target_modules="(["), "target_modules: invalid regular expression"),
        (dict(components=[(4, 6, 6)]), r"components\[0\]: expected four positive ints"),
        (dict(variant="moka_s", components=[(4, 6, 6, 6)]), r"components\[0\]: moka_s needs a square identity"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            MoKAConfig(**kwargs)


def test_layer_errors_leave_base_untouched():
    base = nn.Linear(36, 24)
    before = copy.deepcopy(base.state_dict())
    requires_grad = [p.requires_grad for p in base.parameters()]
    with pytest.raises(ValueError, match="components"):
        MoKALinear(base, MoKAConfig(components=[(5, 6, 5, 6)]))
    assert [p.requires_grad for p in base.parameters()] == requires_grad  # not frozen by the failed wrap
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    with pytest.raises(TypeError, match=r"base_layer: expected nn\.Linear"):
        MoKALinear(nn.Conv1d(3, 3, 1))
    int8 = nn.Linear(36, 24)
    int8.weight = nn.Parameter(torch.ones(24, 36, dtype=torch.int8), requires_grad=False)  # like Linear8bitLt
    with pytest.raises(
        TypeError, match=r"base_layer: expected a float16/bfloat16/float32/float64 weight .* torch\.int8 weight"
    ):
        MoKALinear(int8)
    with pytest.raises(TypeError, match="config: expected a MoKAConfig"):
        MoKALinear(base, {"num_components": 2})


def test_backend_env_is_validated(problem, monkeypatch):
    monkeypatch.setenv("MOKA_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="MOKA_BACKEND: expected one of"):
        _call(problem)


def test_numpy_scale_is_a_real_number(problem):
    np = pytest.importorskip("numpy")
    config = MoKAConfig(scale=np.float32(0.5))
    assert type(config.scale) is float and config.to_dict()["scale"] == 0.5
    x, weight, a_f, b_f, g, b = problem
    torch.testing.assert_close(
        moka_linear(x, weight, a_f, b_f, g, b, np.float64(0.5)), moka_linear(x, weight, a_f, b_f, g, b, 0.5)
    )
    with pytest.raises(ValueError, match="scale: expected a finite real number"):
        _call(problem, scale=10**400)


def test_adapter_input_error_names_what_differs(problem):
    x = problem[0]
    expected = r"adapter_input: expected a tensor like x \(shape \(3, 36\), torch\.float32.*got shape \(3, 36\), "
    expected += r"torch\.float64"
    with pytest.raises(ValueError, match=expected):
        _call(problem, adapter_input=x.detach().double())
    with pytest.raises(TypeError, match=r"adapter_input: expected a torch\.Tensor"):
        _call(problem, adapter_input=[1.0])


def test_delta_weight_checks_its_inputs_as_moka_linear_does(problem):
    """Three gate logits for two components once gave a silently wrong ΔW (softmax over three, two used)."""
    from moka_kernels import delta_weight

    _, _, a_f, b_f, g, _ = problem
    cases = [
        ({"gate_logits": torch.zeros(3)}, ValueError, r"gate_logits: expected shape \(2,\)"),
        ({"gate_logits": torch.zeros(1, 2)}, ValueError, r"gate_logits: expected shape \(2,\)"),
        ({"b_factors": b_f[:1]}, ValueError, "b_factors: expected r=2 factors"),
        ({"a_factors": [], "b_factors": []}, ValueError, "a_factors: expected at least one component"),
        (
            {"a_factors": [a_f[0], torch.zeros(3, 9)]},
            ValueError,
            r"a_factors\[1\], b_factors\[1\]: expected a1\*b1 == N=24",
        ),
        (
            {"a_factors": [a_f[0].detach().numpy(), a_f[1]]},
            TypeError,
            r"a_factors\[0\]: expected a 2-D torch.Tensor, got ndarray",
        ),
        ({"a_factors": (a for a in a_f)}, TypeError, "a_factors: expected a list of 2-D tensors"),
        ({"b_factors": [b_f[0].double(), b_f[1]]}, TypeError, r"b_factors\[0\]: expected dtype torch.float32"),
        ({"scale": float("nan")}, ValueError, "scale: expected a finite real number"),
    ]
    for overrides, error, message in cases:
        args = {"a_factors": a_f, "b_factors": b_f, "gate_logits": g, "scale": 1.0, **overrides}
        with pytest.raises(error, match=message):
            delta_weight(**args)
    expected = sum(w * torch.kron(a, b) for w, a, b in zip(torch.softmax(g, 0), a_f, b_f, strict=True))
    torch.testing.assert_close(delta_weight(a_f, b_f, g), expected)


def test_a_factor_that_is_not_a_tensor_is_named_as_such(problem):
    _, _, a_f, _, _, _ = problem
    with pytest.raises(TypeError, match=r"a_factors\[1\]: expected a 2-D torch.Tensor, got ndarray"):
        _call(problem, a_factors=[a_f[0], a_f[1].detach().numpy()])


def test_nf4_fields_and_arguments_are_checked_by_name():
    import dataclasses

    from moka_kernels import dequantize_nf4

    q = quantize_nf4(torch.randn(64, 80))  # 80 blocks of 64: one nested scale
    for field, value, message in [
        ("nested_code", q.nested_code[:16], r"nested_code: expected shape \(256,\)"),
        ("nested_absmax", q.nested_absmax[:0], r"nested_absmax: expected shape \(1,\) for 80 blocks"),
        ("offset", torch.tensor([0.1, 0.2]), r"offset: expected shape \(\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(q, **{field: value})
    with pytest.raises(ValueError, match=r"blocksize: expected one of .* got 64\.0"):
        quantize_nf4(torch.randn(4, 16), blocksize=64.0)
    import numpy as np

    assert quantize_nf4(torch.randn(4, 16), blocksize=np.int64(32)).blocksize == 32
    with pytest.raises(TypeError, match=r"dtype: expected a floating-point torch\.dtype, got torch\.int32"):
        dequantize_nf4(q, torch.int32)
    w = torch.randn(64, 64)
    w[10, 3] = float("inf")  # would turn every block NaN under double quantization (as in bitsandbytes)
    with pytest.raises(ValueError, match=r"w: expected finite values, got inf at \(10, 3\)"):
        quantize_nf4(w)
    with pytest.raises(TypeError, match=r"bias: expected a floating-point \(64,\) tensor, got list"):
        nf4_linear(torch.randn(2, 80), q, bias=[0.0] * 64)
    for field, value, error, message in [
        ("shape", (64, 80, 1), ValueError, r"shape: expected the logical \(N, K\) as two integers, got \(64, 80, 1\)"),
        ("shape", (64.0, 80), ValueError, r"shape: expected the logical \(N, K\)"),
        (
            "dtype",
            torch.int32,
            TypeError,
            r"dtype: expected a floating-point torch\.dtype \(dequantize's default\), got torch\.int32",
        ),
    ]:
        with pytest.raises(error, match=message):
            dataclasses.replace(q, **{field: value})
    for not_a_bool in ("no", 1, torch.tensor(True)):
        with pytest.raises(TypeError, match=r"double_quant: expected a bool, got"):
            quantize_nf4(torch.randn(4, 16), double_quant=not_a_bool)
    assert quantize_nf4(torch.randn(4, 16), double_quant=np.False_).double_quant is False


def test_gate_weights_and_factor_dtype_check_refuse_empty_input():
    from moka_kernels import factors_taken_as_they_are
    from moka_kernels.reference import gate_weights

    with pytest.raises(ValueError, match=r"num_components: expected an integer >= 1, got 0"):
        gate_weights(None, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"factors: expected at least one factor tensor"):
        factors_taken_as_they_are([], torch.float32)


def test_degenerate_shapes_are_refused_by_name():

    with pytest.raises(ValueError, match=r"weight: expected N, K >= 1, got shape \(15, 0\)"):
        moka_linear(torch.randn(4, 0), torch.randn(15, 0), [torch.randn(3, 0)], [torch.randn(5, 0)], None)
    q = quantize_nf4(torch.randn(8, 8))
    fields = dict(packed=q.packed, absmax=q.absmax, dtype=q.dtype, nested_absmax=q.nested_absmax)
    fields.update(nested_code=q.nested_code, offset=q.offset)
    with pytest.raises(ValueError, match=r"shape: expected two dimensions >= 1, got \(-8, -8\)"):
        NF4Tensor(shape=(-8, -8), blocksize=64, **fields)
    with pytest.raises(ValueError, match=r"shape: expected two dimensions >= 1, got \(0, 64\)"):
        NF4Tensor(shape=(0, 64), blocksize=64, **fields)
    with pytest.raises(TypeError, match=r"blocksize: expected an integer, got 64\.0"):
        NF4Tensor(shape=(8, 8), blocksize=64.0, **fields)
