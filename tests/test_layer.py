"""MoKALinear over nn.Linear, bitsandbytes Linear4bit and NF4Tensor bases."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TOLERANCES, assert_close_rel
from torch import nn

from moka import MoKAConfig, MoKALinear, NF4Linear, NF4Tensor, dequantize_nf4, quantize_nf4
from moka_kernels import nf4_linear

bnb = pytest.importorskip("bitsandbytes")


def _randomize_adapter(layer: MoKALinear) -> None:
    """Give every factor and the gate non-zero values, so ΔW != 0."""
    with torch.no_grad():
        for p in list(layer.a_factors) + list(layer.b_factors):
            if p.requires_grad:
                p.normal_(0, 0.3)
        if layer.gate_logits is not None:
            layer.gate_logits.normal_()


def _linear4bit(n_out: int, k_in: int, bias: bool = True, compute_dtype=torch.float32, double_quant=True):
    dense = nn.Linear(k_in, n_out, bias=bias)
    layer = bnb.nn.Linear4bit(
        k_in, n_out, bias=bias, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=double_quant
    )
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # quantizes


def _bnb_dense(layer) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("variant", ["moka", "moka_s"])
def test_linear_base_equals_dense_math(dtype, variant):
    base = nn.Linear(36, 24).to(dtype)
    layer = MoKALinear(base, MoKAConfig(variant=variant, num_components=3))
    _randomize_adapter(layer)
    x = torch.randn(2, 5, 36, dtype=dtype)
    expected = x.double() @ (base.weight.double() + layer.delta_weight().double()).T + base.bias.double()
    assert_close_rel(layer(x), expected, TOLERANCES[dtype])


def test_linear4bit_that_lost_its_quant_state_fails_clearly():
    """FSDP2's fully_shard swaps a Linear4bit's Params4bit for a plain uint8 parameter: say so, don't treat the
    bytes as a dense weight."""
    layer = MoKALinear(_linear4bit(48, 64), MoKAConfig(num_components=2))
    layer.base_layer.weight = nn.Parameter(layer.base_layer.weight.data.clone(), requires_grad=False)
    assert layer.is_4bit
    with pytest.raises(RuntimeError, match=r"base_layer: .*lost its quant_state.*moka\.quantize_model"):
        layer(torch.randn(3, 64))


@pytest.mark.parametrize("shape", [(48, 64), (20, 36)], ids=["48x64", "20x36-short-last-block"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "fp32-absmax"])
def test_linear4bit_base_equals_dense_math(double_quant, shape):
    base = _linear4bit(*shape, double_quant=double_quant)
    layer = MoKALinear(base, MoKAConfig(num_components=4))
    _randomize_adapter(layer)
    x = torch.randn(3, 7, shape[1])
    # (bitsandbytes' CPU decode is wrong when K % blocksize != 0; test_nf4 checks ours on its reference kernel)
    w0 = _bnb_dense(base) if shape[1] % 64 == 0 else dequantize_nf4(NF4Tensor.from_bnb(base.weight), torch.float32)
    expected = x @ (w0 + layer.delta_weight()).T + base.bias
    assert_close_rel(layer(x), expected, TOLERANCES[torch.float32])
    # Gradients flow to the adapter only.
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters() if p.requires_grad)
    assert base.weight.grad is None


def test_linear4bit_bf16_compute_dtype_casts_back():
    base = _linear4bit(32, 64, compute_dtype=torch.bfloat16)
    layer = MoKALinear(base)
    x = torch.randn(4, 64)
    out = layer(x)
    assert out.dtype == torch.float32
    expected = (x.bfloat16() @ _bnb_dense(base).bfloat16().T + base.bias.bfloat16()).float()
    assert_close_rel(out, expected, TOLERANCES[torch.bfloat16])


def test_nf4tensor_base():
    w = torch.randn(24, 64)
    q = quantize_nf4(w)
    bias = torch.randn(24)
    layer = MoKALinear(q, MoKAConfig(num_components=2), bias=bias)
    assert isinstance(layer.base_layer, NF4Linear)
    _randomize_adapter(layer)
    x = torch.randn(5, 64)
    expected = x @ (dequantize_nf4(q, torch.float32) + layer.delta_weight()).T + bias
    assert_close_rel(layer(x), expected, TOLERANCES[torch.float32])


@pytest.mark.parametrize("init", ["zero_b", "zero_a"])
@pytest.mark.parametrize("variant", ["moka", "moka_s"])
def test_zero_init_is_exactly_the_base(init, variant):
    base = nn.Linear(36, 24)
    layer = MoKALinear(base, MoKAConfig(init=init, variant=variant))
    x = torch.randn(4, 36)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.delta_weight()) == 0
    nonzero = [p for p in list(layer.a_factors) + list(layer.b_factors) if torch.count_nonzero(p) > 0]
    assert len(nonzero) == len(layer.component_shapes), "exactly one factor per component must be non-zero"
    zeroed, random = (layer.a_factors, layer.b_factors) if init == "zero_a" else (layer.b_factors, layer.a_factors)
    if variant == "moka_s" and init == "zero_a":  # A is the frozen identity: zero_a would zero the whole adapter
        zeroed, random = layer.b_factors, layer.a_factors
    assert all(torch.count_nonzero(p) == 0 for p in zeroed), f"{init}: the wrong factor was zeroed"
    assert all(torch.count_nonzero(p) > 0 for p in random)


def test_zero_init_is_exactly_the_4bit_base():
    base = _linear4bit(32, 64)
    layer = MoKALinear(base)
    x = torch.randn(4, 64)
    expected = x @ bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).T + base.bias
    assert torch.equal(layer(x), expected)


def test_only_adapter_is_trainable_and_counted():
    base = nn.Linear(36, 24)
    layer = MoKALinear(base, MoKAConfig(num_components=3))
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {
        "a_factors.0",
        "a_factors.1",
        "a_factors.2",
        "b_factors.0",
        "b_factors.1",
        "b_factors.2",
        "gate_logits",
    }
    expected = sum(a1 * a2 + b1 * b2 for a1, a2, b1, b2 in layer.component_shapes) + 3
    assert layer.num_trainable_parameters() == expected
    layer_s = MoKALinear(nn.Linear(36, 24), MoKAConfig(variant="moka_s", num_components=2, gate=False))
    assert layer_s.num_trainable_parameters() == sum(b1 * b2 for _, _, b1, b2 in layer_s.component_shapes)


def test_moka_s_update_is_block_diagonal():
    layer = MoKALinear(nn.Linear(36, 24), MoKAConfig(variant="moka_s", num_components=1))
    _randomize_adapter(layer)
    k, _, b1, b2 = layer.component_shapes[0]
    delta = layer.delta_weight()
    mask = torch.block_diag(*[torch.ones(b1, b2)] * k).bool()
    assert torch.count_nonzero(delta[~mask]) == 0 and torch.count_nonzero(delta[mask]) > 0


def test_gate_off_uses_uniform_weights():
    layer = MoKALinear(nn.Linear(36, 24), MoKAConfig(gate=False, num_components=3))
    _randomize_adapter(layer)
    assert layer.gate_logits is None
    expected = sum(torch.kron(a, b) for a, b in zip(layer.a_factors, layer.b_factors, strict=True)) / 3
    torch.testing.assert_close(layer.delta_weight(), expected)


def test_dropout_applies_to_adapter_input_only_in_training():
    base = nn.Linear(36, 24)
    layer = MoKALinear(base, MoKAConfig(dropout=0.5))
    _randomize_adapter(layer)
    x = torch.randn(64, 36)
    layer.eval()
    eval_out = layer(x)
    layer.train()
    torch.manual_seed(1)
    train_out = layer(x)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    expected = base(x) + dropped @ layer.delta_weight().T
    assert_close_rel(train_out, expected, 1e-5)
    assert not torch.allclose(train_out, eval_out)


@pytest.mark.parametrize("kind", ["linear", "linear4bit", "nf4"])
def test_merge_equals_forward(kind):
    if kind == "linear":
        base = nn.Linear(64, 48)
    elif kind == "linear4bit":
        base = _linear4bit(48, 64)
    else:
        base = quantize_nf4(torch.randn(48, 64))
    layer = MoKALinear(base, MoKAConfig(num_components=3))
    _randomize_adapter(layer)
    x = torch.randn(6, 64)
    merged = layer.merge()
    assert isinstance(merged, nn.Linear) and not any(p.requires_grad for p in merged.parameters())
    assert_close_rel(merged(x), layer(x), 1e-5)
    assert layer.merge(dtype=torch.float64).weight.dtype == torch.float64
    for bad in ("bf16", torch.int8):
        with pytest.raises(TypeError, match=r"dtype: expected a floating-point torch\.dtype"):
            layer.merge(dtype=bad)
    if kind != "linear":
        with pytest.raises(TypeError, match=r"dtype: requantizing takes"):
            layer.merge(requantize=True, dtype=torch.float64)


@pytest.mark.parametrize(
    ("base_dtype", "adapter_dtype", "tol"),
    [(torch.float64, None, 1e-12), (torch.float32, torch.bfloat16, 2e-6)],
    ids=["fp64-layer", "bf16-adapter-on-fp32"],
)
def test_merge_is_as_precise_as_the_forward(base_dtype, adapter_dtype, tol):
    """The merge sums W0 + ΔW at the forward's precision: fp64 throughout for an fp64 layer (not via fp32),
    and bf16 factors widened before their products (the forward widens them to the fp32 activations)."""
    base = nn.Linear(64, 48, dtype=base_dtype)
    layer = MoKALinear(base, MoKAConfig(num_components=3, adapter_dtype=adapter_dtype))
    _randomize_adapter(layer)
    x = torch.randn(6, 64, dtype=base_dtype)
    assert_close_rel(layer.merge()(x), layer(x), tol)


@pytest.mark.parametrize("kind", ["linear4bit", "nf4"])
def test_merge_requantize_reports_error(kind):
    base = _linear4bit(48, 64) if kind == "linear4bit" else quantize_nf4(torch.randn(48, 64) * 0.05)
    layer = MoKALinear(base, MoKAConfig(num_components=3))
    _randomize_adapter(layer)
    with torch.no_grad():
        for b in layer.b_factors:
            b.mul_(0.05)
    merged = layer.merge(requantize=True)
    assert type(merged) is (bnb.nn.Linear4bit if kind == "linear4bit" else NF4Linear)
    report = merged.moka_requantization_error
    assert 0 < report["rel_rms"] < 0.15 and report["max_abs"] > 0
    x = torch.randn(6, 64)
    dense = layer.merge()
    rel = ((merged(x) - dense(x)).norm() / dense(x).norm()).item()
    assert rel < 0.2, rel  # NF4 rounding of W0 + ΔW, no more


def test_requantized_merge_keeps_the_linear4bit_quant_storage():
    """FSDP-QLoRA stores the 4-bit bytes as bf16: the requantized layer is stored the same way."""
    dense = nn.Linear(64, 48)
    base = bnb.nn.Linear4bit(64, 48, quant_type="nf4", compute_dtype=torch.float32, quant_storage=torch.bfloat16)
    base.load_state_dict(dense.state_dict())
    layer = MoKALinear(base.to("cpu"), MoKAConfig(num_components=2))
    _randomize_adapter(layer)
    merged = layer.merge(requantize=True)
    assert merged.weight.dtype == merged.quant_storage == torch.bfloat16
    x = torch.randn(5, 64)
    expected = x @ dequantize_nf4(NF4Tensor.from_bnb(merged.weight), torch.float32).T + merged.bias
    torch.testing.assert_close(merged(x), expected)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.uint8], ids=str)
@pytest.mark.parametrize("cast", ["half", "float", "bfloat16", "type"])
def test_a_cast_never_converts_linear4bit_bytes(cast, storage):
    """With quant_storage=bf16 the packed bytes are a float tensor: Module.half() converted them as numbers
    (W0 off by up to 6.9; .float() then failed on a doubled byte count); Module.type() converts even uint8
    bytes. Only the adapter and bias cast."""
    import copy

    dense = nn.Linear(64, 48)
    base = bnb.nn.Linear4bit(64, 48, quant_type="nf4", compute_dtype=torch.float32, quant_storage=storage)
    base.load_state_dict(dense.state_dict())
    layer = MoKALinear(base.to("cpu"), MoKAConfig(num_components=2))
    _randomize_adapter(layer)
    packed = layer.base_layer.weight.detach().clone()
    keys = list(layer.state_dict())
    copied = copy.deepcopy(layer)
    cast_layer = copied.type(torch.float16) if cast == "type" else getattr(copied, cast)()
    assert torch.equal(cast_layer.base_layer.weight.view(torch.uint8), packed.view(torch.uint8))
    assert list(cast_layer.state_dict()) == keys
    dtype = {"half": torch.float16, "type": torch.float16, "float": torch.float32, "bfloat16": torch.bfloat16}[cast]
    assert cast_layer.a_factors[0].dtype == cast_layer.base_layer.bias.dtype == dtype
    x = torch.randn(5, 64)
    torch.testing.assert_close(cast_layer(x.to(dtype)).float(), layer(x), atol=0.1, rtol=0.05)
    copied = copy.deepcopy(layer)
    weight = copied.base_layer.weight
    copied.share_memory()  # fn reaches the bytes when it is no cast: the same Parameter, now in shared memory
    assert copied.base_layer.weight is weight and weight.is_shared()


def test_fp64_layer_stays_fp64_under_autocast():
    """As nn.Linear: autocast leaves fp64 alone."""
    layer = MoKALinear(nn.Linear(36, 24).double(), MoKAConfig(num_components=2))
    x = torch.randn(3, 36, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float64 and torch.equal(out, layer(x))


def test_autocast_weight_copy_is_a_saved_tensor_that_checkpointing_frees():
    """Under autocast the dense base weight is a bf16 copy: it is saved for backward (so non-reentrant
    checkpointing drops it and recomputes it), not held by the autograd node; without autocast the saved
    weight is the parameter itself, no copy."""
    layer = MoKALinear(nn.Linear(64, 48), MoKAConfig(num_components=2))
    x = torch.randn(4, 64, requires_grad=True)
    for autocast in (True, False):
        saved: list[torch.Tensor] = []
        with (
            torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        ):
            out = layer(x)
        weights = [t for t in saved if t.shape == (48, 64)]
        assert len(weights) == 1
        assert (weights[0].dtype, weights[0].data_ptr() == layer.weight.data_ptr()) == (
            (torch.bfloat16, False) if autocast else (torch.float32, True)
        )
        out.float().square().sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # checkpointed: only x's, nothing weight-sized, is kept
        kept: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    assert not any(t.shape == (48, 64) for t in kept)
    out.float().sum().backward()


def test_repacked_linear4bit_is_rejected():
    """bitsandbytes' CPU inference path rewrites the bytes in place; wrapping such a layer must fail clearly."""
    base = _linear4bit(64, 64)
    base.eval()
    with torch.no_grad():
        base(torch.randn(2, 64))  # repacks on AVX512-BF16 CPUs
    state = base.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        state.packing_format_for_cpu = True  # this CPU lacks AVX512-BF16: mark it as the repack would
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        MoKALinear(base)


def test_wrapping_prevents_a_later_repack():
    base = _linear4bit(64, 64)
    layer = MoKALinear(base)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
        base(torch.randn(2, 64))  # the unwrapped layer, e.g. after remove_moka
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    assert isinstance(NF4Tensor.from_bnb(base.weight), NF4Tensor)


@pytest.mark.parametrize("shardable", [False, True], ids=["buffers", "shardable"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "fp32-absmax"])
@pytest.mark.parametrize("cast", ["to-bf16", "half", "double"])
def test_casting_an_nf4_layer_keeps_w0_bit_exact(double_quant, cast, shardable):
    """model.to(dtype) reaches the adapters, the bias and the decode dtype, never the NF4 codes or scales."""
    q = quantize_nf4(torch.randn(64, 96), 64, double_quant)
    layer = MoKALinear(NF4Linear(q, torch.randn(64), shardable=shardable), MoKAConfig(num_components=2))
    w0 = layer.dense_base_weight(torch.float32)
    keys = list(layer.base_layer.state_dict())
    fields = {n: (t.dtype, t.clone()) for n, t in layer.base_layer.state_dict().items() if n != "bias"}
    kinds = {n: type(getattr(layer.base_layer, n)) for n in fields}
    dtype = {"to-bf16": torch.bfloat16, "half": torch.float16, "double": torch.float64}[cast]
    cast_layer = {"to-bf16": lambda m: m.to(torch.bfloat16), "half": nn.Module.half, "double": nn.Module.double}[cast]
    assert cast_layer(layer) is layer
    for name, (field_dtype, before) in fields.items():
        after = getattr(layer.base_layer, name)
        assert after.dtype == field_dtype and torch.equal(after, before), name
        assert type(after) is kinds[name] and not after.requires_grad, name  # frozen parameters stay parameters
    assert list(layer.base_layer.state_dict()) == keys  # state_dict order kept
    assert layer.base_layer.nf4_dtype == dtype and layer.bias.dtype == dtype and layer.b_factors[0].dtype == dtype
    assert torch.equal(layer.dense_base_weight(torch.float32), w0)
    x = torch.randn(3, 96, dtype=dtype)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, w0.to(dtype), layer.bias))  # ΔW = 0 at init


@pytest.mark.parametrize("swap", [False, True], ids=["data", "swap"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "fp32-absmax"])
def test_shardable_nf4_layer_holds_its_bytes_as_frozen_parameters_and_its_scales_as_buffers(double_quant, swap):
    """shardable: integer fields are parameters (FSDP2 shards them and never casts integers), floating ones
    buffers; a move keeps each Parameter object, as Module._apply does (FSDP2 relies on it). Default: buffers."""
    q = quantize_nf4(torch.randn(64, 64), 64, double_quant)
    assert not list(NF4Linear(q).parameters())  # FSDP1 flattens a unit's parameters into one dtype
    base = NF4Linear(q, shardable=True)
    params = dict(base.named_parameters())
    assert list(params) == (["packed", "absmax"] if double_quant else ["packed"])
    assert all(p.dtype == torch.uint8 and not p.requires_grad for p in params.values())
    assert all(b.is_floating_point() for b in base.buffers())
    assert ("absmax" in dict(base.named_buffers())) is not double_quant
    keys = list(base.state_dict())
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        base._apply(lambda t: t.clone())  # what a cpu -> cuda move does: new tensors of the same kind
        assert all(getattr(base, n) is p for n, p in params.items())
        base.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    # swap mode keeps the object on any move; otherwise a move to another tensor type makes a new one
    assert all((getattr(base, n) is p) is swap and getattr(base, n).device.type == "meta" for n, p in params.items())
    assert all(type(p) is nn.Parameter and not p.requires_grad for p in base.parameters())
    assert list(base.state_dict()) == keys


def test_nf4_layer_computes_in_its_compute_dtype_and_returns_the_input_dtype():
    """As Linear4bit: x is cast to compute_dtype, the output back to x's dtype (quantize_model keeps a
    Linear4bit's compute_dtype)."""
    q, bias = quantize_nf4(torch.randn(48, 64), 64, True), torch.randn(48)
    x = torch.randn(3, 64)
    expected = nn.functional.linear(x.bfloat16(), dequantize_nf4(q, torch.bfloat16), bias.bfloat16()).float()
    layer = NF4Linear(q, bias, compute_dtype=torch.bfloat16)
    assert torch.equal(layer(x), expected)
    moka = MoKALinear(layer, MoKAConfig(num_components=2))
    assert moka(x).dtype == torch.float32 and torch.equal(moka(x), expected)  # ΔW = 0 at init
    assert not torch.equal(NF4Linear(q, bias)(x), expected)  # fp32 compute differs: the test can see it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_nf4_layer_trains_through_without_saving_its_decoded_weight(dtype):
    """A frozen NF4Linear (one apply_moka left unwrapped) in a training graph: its output and dx equal
    autograd through decode + F.linear, bit for bit (the same ops), while autograd would save the decoded
    weight (a dense copy per layer until the backward) and it saves nothing."""
    q, bias = quantize_nf4(torch.randn(80, 96), 32, True), torch.randn(80)
    layer = NF4Linear(q, bias).to(dtype)
    x = torch.randn(2, 5, 96, dtype=dtype, requires_grad=True)
    saved, plain_saved = [], []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain_saved.append(t.numel()) or t, lambda t: t):
        ref = nn.functional.linear(ref_x, dequantize_nf4(q, dtype), bias.to(dtype))
    assert q.numel() in plain_saved and saved == []
    grad_out = torch.randn_like(ref)
    assert torch.equal(out, ref)
    assert torch.equal(*(torch.autograd.grad(o, i, grad_out)[0] for o, i in ((out, x), (ref, ref_x))))
    x32 = x.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as F.linear: x and the bias cast to the autocast dtype
        in_autocast = nf4_linear(x32, q, bias)
    assert torch.equal(in_autocast, nf4_linear(x32.bfloat16(), q, bias.bfloat16()))


def test_nf4_layer_built_on_meta_then_to_empty_then_loaded():
    """FSDP's build-on-meta pattern: to_empty gives fields of the same dtypes (a cast reaches none of them),
    and load_state_dict fills them; Module.type(), which casts every tensor, leaves the NF4 bytes uint8."""
    original = NF4Linear(quantize_nf4(torch.randn(48, 64), 32, True), torch.randn(48))
    layer = copy.deepcopy(original).to("meta").to_empty(device="cpu")
    dtypes = {k: v.dtype for k, v in original.state_dict().items()}
    assert {k: v.dtype for k, v in layer.state_dict().items()} == dtypes
    layer.load_state_dict(original.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), original(x))
    assert layer.type(torch.float16).packed.dtype == torch.uint8 and layer.bias.dtype == torch.float16


def test_nf4_layer_moves_to_meta_whole():
    layer = MoKALinear(quantize_nf4(torch.randn(64, 64), 64, True), MoKAConfig(num_components=2)).to("meta")
    assert {t.device.type for t in [*layer.buffers(), *layer.parameters()]} == {"meta"}


@pytest.mark.parametrize("scale", [2.5, -0.75])
def test_scale_multiplies_the_mixture_against_an_explicit_kron_sum(scale):
    """y = x W0ᵀ + b + s Σ softmax(g)_i kron(A_i, B_i) x, written out with torch.kron here (not delta_weight)."""
    base = nn.Linear(36, 24).double()
    layer = MoKALinear(base, MoKAConfig(num_components=3, scale=scale)).double()
    _randomize_adapter(layer)
    alpha = torch.softmax(layer.gate_logits.detach(), 0)
    delta = sum(
        alpha[i] * torch.kron(a.detach().contiguous(), b.detach().contiguous())
        for i, (a, b) in enumerate(zip(layer.a_factors, layer.b_factors, strict=True))
    )
    x = torch.randn(5, 36, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (base.weight + scale * delta).T + base.bias)


@pytest.mark.parametrize(("blocksize", "double_quant"), [(64, True), (128, False)], ids=["64-dq", "128-fp32"])
def test_requantized_merge_holds_the_adapter_and_keeps_the_format(blocksize, double_quant):
    w0 = torch.randn(48, 128) * 0.05
    layer = MoKALinear(quantize_nf4(w0, blocksize, double_quant), MoKAConfig(num_components=3))
    _randomize_adapter(layer)
    merged = layer.merge(requantize=True)
    q = merged.nf4_weight
    assert (q.blocksize, q.double_quant) == (blocksize, double_quant)
    dense_merge = layer.dense_base_weight(torch.float32) + layer.delta_weight().float()
    # exactly what quantizing W0 + ΔW in that format gives, and not what W0 alone gives
    assert torch.equal(q.dequantize(torch.float32), quantize_nf4(dense_merge, blocksize, double_quant).dequantize())
    assert not torch.equal(q.dequantize(torch.float32), layer.dense_base_weight(torch.float32))


def test_requantized_merge_of_a_linear4bit_holds_the_adapter():
    """The bitsandbytes branch: the merged Linear4bit's bytes are exactly quantize_nf4(W0 + ΔW), not W0's."""
    from moka.bnb_compat import nf4_from_linear4bit

    layer = MoKALinear(_linear4bit(48, 64), MoKAConfig(num_components=3))
    _randomize_adapter(layer)
    merged = layer.merge(requantize=True)
    assert isinstance(merged, bnb.nn.Linear4bit)
    q = nf4_from_linear4bit(merged)
    base = nf4_from_linear4bit(layer.base_layer)
    dense_merge = layer.dense_base_weight(torch.float32) + layer.delta_weight().float()
    expected = quantize_nf4(dense_merge.to(base.dtype), base.blocksize, base.double_quant)
    assert torch.equal(q.dequantize(torch.float32), expected.dequantize(torch.float32))
    assert not torch.equal(q.dequantize(torch.float32), base.dequantize(torch.float32))


def test_moka_s_identities_stay_frozen_after_apply_and_load(tmp_path):
    from helpers import tiny_llama

    from moka import apply_moka, load_adapter, moka_layers, remove_moka, save_adapter

    model = tiny_llama()
    apply_moka(model, MoKAConfig(variant="moka_s", num_components=2))
    for layer in moka_layers(model).values():
        assert all(not a.requires_grad and torch.equal(a, torch.eye(a.shape[0])) for a in layer.a_factors)
        assert all(b.requires_grad for b in layer.b_factors)
    save_adapter(model, tmp_path / "s")
    remove_moka(model)
    load_adapter(model, tmp_path / "s")
    assert all(not a.requires_grad for layer in moka_layers(model).values() for a in layer.a_factors)


def test_nf4_state_dict_of_another_layout_is_refused_even_when_not_strict():
    """A double-quantized layer's uint8 scale codes copied into an fp32-absmax layer (or the reverse) would change
    W0 silently; the load raises, naming the field, and the layer keeps its weight."""
    w = torch.randn(32, 64)
    double, single = NF4Linear(quantize_nf4(w, double_quant=True)), NF4Linear(quantize_nf4(w, double_quant=False))
    before = dequantize_nf4(single.nf4_weight, torch.float32)
    for target, source, field in ((single, double, "absmax"), (double, single, "absmax")):
        kept = {k: v.clone() for k, v in target.state_dict().items()}
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=rf"{field}: the state dict holds another NF4 layout"):
                target.load_state_dict(source.state_dict(), strict=strict)
        assert all(torch.equal(kept[k], v) for k, v in target.state_dict().items())
    assert torch.equal(dequantize_nf4(single.nf4_weight, torch.float32), before)
    same = NF4Linear(quantize_nf4(torch.randn(32, 64), double_quant=True))
    same.load_state_dict(double.state_dict())  # the same layout loads as before
    assert torch.equal(dequantize_nf4(same.nf4_weight, torch.float32), dequantize_nf4(double.nf4_weight, torch.float32))


def test_a_layer_built_on_the_meta_device_starts_as_its_base_after_reset_parameters():
    """The meta-device pattern (FSDP2, big models): to_empty leaves uninitialized memory (NaN logits were seen);
    the loop generic init code runs, reset_parameters on every module that has it, then the base's weights."""
    base = nn.Linear(24, 36)
    with torch.device("meta"):
        layer = MoKALinear(nn.Linear(24, 36), MoKAConfig(num_components=2, gate=True))
    layer.to_empty(device="cpu")
    for p in layer.parameters():
        p.data.fill_(float("nan"))  # what to_empty may hand out
    for module in layer.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    layer.base_layer.load_state_dict(base.state_dict())
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert any(f.abs().sum() > 0 for f in [*layer.a_factors, *layer.b_factors])  # one factor of each is not zero


def _randomized(layer: MoKALinear) -> MoKALinear:
    with torch.no_grad():
        for p in [*layer.a_factors, *layer.b_factors]:
            p.normal_(0, 0.3)
        if layer.gate_logits is not None:
            layer.gate_logits.normal_()
    return layer


def test_the_nonzero_factor_starts_as_nn_linear_s_kaiming_uniform():
    """kaiming_uniform_(a=√5): bound 1/√fan_in, PEFT's and nn.Linear's default."""
    torch.manual_seed(0)
    layer = MoKALinear(nn.Linear(64, 64), MoKAConfig(num_components=3))
    for a in layer.a_factors:
        assert 0.5 / math.sqrt(a.shape[1]) < a.abs().max() <= 1 / math.sqrt(a.shape[1])


def test_disabled_adapters_keep_the_base_bias():
    base = nn.Linear(16, 8)
    layer = _randomized(MoKALinear(base, MoKAConfig(num_components=2)))
    x = torch.randn(3, 16)
    layer.adapters_enabled = False
    torch.testing.assert_close(layer(x), base(x))


def test_an_nf4_merge_with_bf16_adapters_sums_in_fp32():
    """Neither the factors (bf16) nor the base (NF4) is fp32: W0 + ΔW is still formed in fp32 for an fp32
    merge (it was decoded to bf16 and ΔW rounded: 2.5e-3 rel. error)."""
    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(16, 32))
    layer = _randomized(MoKALinear(w, MoKAConfig(num_components=2, adapter_dtype=torch.bfloat16)))
    merged = layer.merge(dtype=torch.float32)
    assert_close_rel(merged.weight, dequantize_nf4(w, torch.float64) + layer.delta_weight(torch.float64), 1e-6)


@pytest.mark.parametrize("kind", ["linear", "nf4"])
def test_a_merge_keeps_the_layer_s_scale(kind):
    torch.manual_seed(0)
    base = nn.Linear(32, 16) if kind == "linear" else quantize_nf4(torch.randn(16, 32))
    layer = _randomized(MoKALinear(base, MoKAConfig(num_components=2, scale=2.5)))
    x = torch.randn(4, 32)
    assert_close_rel(layer.merge()(x), layer(x), 1e-5)
