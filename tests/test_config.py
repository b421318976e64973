"""MoKAConfig and the automatic factor shapes."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

from moka import MoKAConfig, MoKALinear, auto_component_shapes


@pytest.mark.parametrize(
    ("n_out", "k_in"),
    [(24, 36), (36, 24), (4096, 4096), (1024, 4096), (4096, 11008), (11008, 4096), (192, 576), (576, 1536), (6, 4)],
)
@pytest.mark.parametrize("variant", ["moka", "moka_s"])
def test_auto_shapes_are_valid_distinct_and_nontrivial(n_out, k_in, variant):
    shapes = auto_component_shapes(n_out, k_in, 5, variant)
    assert shapes and len(shapes) == len(set(shapes)) <= 5
    for a1, a2, b1, b2 in shapes:
        assert a1 * b1 == n_out and a2 * b2 == k_in
        assert a1 * a2 > 1 and b1 * b2 > 1
        if variant == "moka_s":
            assert a1 == a2


def test_auto_shapes_match_the_paper_budget():
    """Five 64x64⊗64x64-sized components per 4096² layer: 5 × 2 × 4096 = 40,960 parameters."""
    shapes = auto_component_shapes(4096, 4096, 5)
    assert shapes[0] == (64, 64, 64, 64)
    assert all(a1 * a2 == b1 * b2 == 4096 for a1, a2, b1, b2 in shapes)
    gqa = auto_component_shapes(1024, 4096, 5)
    assert all(a1 * a2 == b1 * b2 == 2048 for a1, a2, b1, b2 in gqa)


def test_auto_shapes_most_balanced_first():
    shapes = auto_component_shapes(24, 36, 8)
    imbalance = [round(abs(math.log(a1 * a2 / (b1 * b2))), 9) for a1, a2, b1, b2 in shapes]
    assert imbalance == sorted(imbalance)


def test_auto_shapes_refuse_bad_input_naming_the_parameter():
    import numpy as np

    assert auto_component_shapes(np.int64(24), 36, np.int32(3)) == auto_component_shapes(24, 36, 3)
    for kwargs, name in [
        ({"num_components": -1}, "num_components"),
        ({"num_components": 0}, "num_components"),
        ({"out_features": 0}, "out_features"),
        ({"in_features": 2.5}, "in_features"),
        ({"num_components": True}, "num_components"),
    ]:
        with pytest.raises(ValueError, match=rf"{name}: expected an integer >= 1"):
            auto_component_shapes(**{"out_features": 24, "in_features": 36, "num_components": 3, **kwargs})
    with pytest.raises(ValueError, match=r"variant: expected one of \('moka', 'moka_s'\), got 'lora'"):
        auto_component_shapes(24, 36, 3, "lora")


def test_default_config_works_on_tiny_and_gqa_layers():
    for n_out, k_in in [(24, 36), (64, 256), (192, 576)]:
        layer = MoKALinear(nn.Linear(k_in, n_out), MoKAConfig())
        assert len(layer.component_shapes) == 5


def test_too_few_shapes_warns_and_uses_fewer():
    with pytest.warns(UserWarning, match="only 2 distinct"):
        layer = MoKALinear(nn.Linear(3, 2), MoKAConfig(num_components=5))
    assert len(layer.a_factors) == 2 and layer.gate_logits.shape == (2,)


def test_too_few_shapes_can_raise():
    with pytest.raises(ValueError, match="only 2 distinct"):
        MoKALinear(nn.Linear(3, 2), MoKAConfig(num_components=5, on_too_few_shapes="error"))


def test_no_factorization_raises():
    with pytest.raises(ValueError, match="no non-trivial Kronecker factorization"):
        MoKALinear(nn.Linear(7, 1))


def test_explicit_components_are_used_and_checked():
    config = MoKAConfig(components=[(4, 6, 6, 6), (2, 3, 12, 12)])
    assert config.num_components == 2
    assert MoKAConfig(num_components=2, components=[(4, 6, 6, 6), (2, 3, 12, 12)]).num_components == 2
    with pytest.raises(ValueError, match="num_components: 3 disagrees with the 2 shapes"):
        MoKAConfig(num_components=3, components=[(4, 6, 6, 6), (2, 3, 12, 12)])
    layer = MoKALinear(nn.Linear(36, 24), config)
    assert layer.component_shapes == [(4, 6, 6, 6), (2, 3, 12, 12)]
    with pytest.raises(ValueError, match=r"components\[0\].*out_features=48"):
        MoKALinear(nn.Linear(36, 48), config, name="model.layers.0.q_proj")


def test_target_module_matching():
    assert MoKAConfig().matches("model.layers.3.self_attn.q_proj")
    assert not MoKAConfig().matches("model.layers.3.self_attn.q_proj_extra")
    assert MoKAConfig(target_modules=["lm_head"]).matches("lm_head")
    regex = MoKAConfig(target_modules=r".*\.(q|v)_proj")
    assert regex.matches("model.layers.0.self_attn.v_proj") and not regex.matches("model.layers.0.self_attn.k_proj")


def test_dict_round_trip():
    config = MoKAConfig(components=[(4, 6, 6, 6)], scale=2.0, adapter_dtype=torch.bfloat16, gate=False)
    assert MoKAConfig.from_dict(config.to_dict()) == config
    as_tuple = MoKAConfig(target_modules=("q_proj", "v_proj"))  # e.g. LLAMA_TARGET_MODULES, a tuple
    assert MoKAConfig.from_dict(json.loads(json.dumps(as_tuple.to_dict()))) == as_tuple
    with pytest.raises(ValueError, match="unknown MoKAConfig fields"):
        MoKAConfig.from_dict({"rank": 4})
    for bad in ("bogus", "Tensor", 3):  # a hand-edited moka_adapter_config.json: a ValueError naming the field
        with pytest.raises(ValueError, match="adapter_dtype: expected a torch dtype name"):
            MoKAConfig.from_dict({"adapter_dtype": bad})
    with pytest.raises(ValueError, match="components: expected a list of"):
        MoKAConfig.from_dict({"components": [4, 6, 6, 6]})


def test_user_spellings_are_normalized_or_refused_by_name():
    """NumPy scalars and a set of names (as PEFT users write them) become plain JSON-ready values; one shape
    not wrapped in a list is refused naming ``components``."""
    import numpy as np

    config = MoKAConfig(num_components=np.int64(3), dropout=np.float32(0.25), target_modules={"v_proj", "q_proj"})
    assert type(config.num_components) is int and config.num_components == 3
    assert type(config.dropout) is float and config.dropout == 0.25
    assert config.target_modules == ["q_proj", "v_proj"]
    assert MoKAConfig.from_dict(config.to_dict()) == config
    assert MoKAConfig(components=[(np.int64(4), 6, 6, 6)]).components == [(4, 6, 6, 6)]
    with pytest.raises(ValueError, match=r"components: expected a list of \(a1, a2, b1, b2\) shapes"):
        MoKAConfig(components=(8, 8, 8, 8))
    for bad in ({"num_components": True}, {"num_components": 2.0}, {"dropout": True}, {"target_modules": 3}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MoKAConfig(**bad)


def test_adapter_dtype_defaults_to_fp32_for_half_bases():
    layer = MoKALinear(nn.Linear(36, 24).to(torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in layer.parameters() if p.requires_grad)
    x = torch.randn(3, 36, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    layer(x).float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_layer_hands_its_fp32_factors_to_the_op_uncast(dtype, monkeypatch):
    """No per-forward casts (2r launches on a GPU): the op takes the fp32 parameters themselves and rounds
    them as a cast would, so the output equals that of a layer whose factors were cast."""
    import moka.layer as layer_module

    layer = MoKALinear(nn.Linear(36, 24).to(dtype), MoKAConfig(num_components=2))
    with torch.no_grad():
        for p in layer.b_factors:
            p.normal_()
    seen = []
    real = layer_module.moka_linear
    monkeypatch.setattr(layer_module, "moka_linear", lambda *a, **k: seen.append(a) or real(*a, **k))
    x = torch.randn(3, 36, dtype=dtype)
    out = layer(x)
    assert all(f is p for f, p in zip([*seen[0][2], *seen[0][3]], [*layer.a_factors, *layer.b_factors], strict=True))
    cast = MoKALinear(nn.Linear(36, 24).to(dtype), MoKAConfig(num_components=2, adapter_dtype=dtype))
    cast.load_state_dict(layer.state_dict())
    assert torch.equal(out, cast(x))


def test_a_layer_with_factors_of_two_dtypes_casts_them_all():
    """moka_s with bf16 adapters whose trainable B alone was upcast to fp32 (as PEFT's adapter upcasting
    does): the op takes one factor dtype, so the module casts every factor rather than half of them."""
    dtype = torch.bfloat16
    layer = MoKALinear(nn.Linear(32, 32).to(dtype), MoKAConfig(variant="moka_s", num_components=2, adapter_dtype=dtype))
    with torch.no_grad():
        for p in layer.b_factors:
            p.normal_()
    reference = copy.deepcopy(layer)
    for p in layer.b_factors:
        p.data = p.data.float()
    x = torch.randn(3, 32, dtype=dtype)
    assert torch.equal(layer(x), reference(x))
    # the cast is differentiable: every trainable factor gets the gradient the all-bf16 layer's gets
    layer(x).float().square().sum().backward()
    reference(x).float().square().sum().backward()
    trained = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for _, p in trained)
    for (name, p), q in zip(trained, [q for q in reference.parameters() if q.requires_grad], strict=True):
        torch.testing.assert_close(p.grad.to(q.grad.dtype), q.grad, msg=name)


def test_bf16_adapters_on_an_fp32_base_are_cast_and_train():
    """adapter_dtype=bf16 on an fp32 layer: the op takes fp32 factors, so the module casts them; the gradients
    flow back through the cast to every bf16 factor, as a layer computing with fp32 copies of them would get."""
    base = nn.Linear(36, 24)
    layer = MoKALinear(base, MoKAConfig(num_components=2, adapter_dtype=torch.bfloat16))
    with torch.no_grad():
        for p in layer.b_factors:
            p.normal_()
    fp32 = MoKALinear(copy.deepcopy(base), MoKAConfig(num_components=2))
    fp32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    x = torch.randn(5, 36)
    torch.testing.assert_close(layer(x), fp32(x))
    layer(x).square().sum().backward()
    fp32(x).square().sum().backward()
    for (name, p), q in zip(layer.named_parameters(), fp32.parameters(), strict=True):
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
            torch.testing.assert_close(p.grad.float(), q.grad, rtol=2e-2, atol=1e-3, msg=name)


def test_warning_free_default_on_llama_shapes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n_out, k_in in [(4096, 4096), (1024, 4096), (11008, 4096), (4096, 14336)]:
            assert len(MoKAConfig().component_shapes(n_out, k_in)) == 5


def test_moka_s_never_gives_a_scalar_b_and_takes_k_near_the_fourth_root():
    for n in (4, 8, 64):
        assert all(b1 * b2 > 1 for _, _, b1, b2 in auto_component_shapes(n, n, 5, "moka_s"))
    assert auto_component_shapes(4096, 4096, 1, "moka_s") == [(64, 64, 64, 64)]


def test_a_target_name_matches_only_whole_name_parts():
    config = MoKAConfig(target_modules=["up_proj"])
    assert config.matches("model.mlp.up_proj") and config.matches("up_proj")
    assert not config.matches("model.mlp.gate_up_proj")  # Phi-3's fused projection


def test_dropout_one_and_components_of_another_input_width_are_refused():
    with pytest.raises(ValueError, match="dropout"):
        MoKAConfig(dropout=1.0)  # the adapter's input would always be zero
    with pytest.raises(ValueError, match=r"components\[0\].*in_features=32"):
        MoKALinear(nn.Linear(32, 16), MoKAConfig(components=[(4, 4, 4, 4)]))  # a2·b2 = 16
