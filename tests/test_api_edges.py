"""Behaviour of moka's layers, model functions and merge CLI that a mutation review found no test pinned (each
test fails on the mutant it was written against): dtypes kept, inputs checked by name, parameter counts,
nested disabling, non-strict loads, the merge CLI's defaults and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from moka import (
    MoKAConfig,
    MoKALinear,
    MoKASummary,
    NF4Linear,
    adapter_state_dict,
    apply_moka,
    dequantize_nf4,
    disable_adapters,
    load_adapter,
    moka_layers,
    quantize_model,
    quantize_nf4,
    save_adapter,
)
from moka_kernels import nf4_linear


def _nf4(n_out: int = 48, k_in: int = 64):
    return quantize_nf4(torch.randn(n_out, k_in, generator=torch.Generator().manual_seed(0)), 64, True)


# -- NF4Linear -------------------------------------------------------------------------------------------------
def test_nf4_linear_returns_the_input_dtype_whatever_it_computes_in():
    x = torch.randn(3, 64)
    out = NF4Linear(_nf4(), compute_dtype=torch.bfloat16)(x)
    assert out.dtype == torch.float32  # torch.equal would not tell: it compares values across dtypes
    want = nf4_linear(x.bfloat16(), _nf4(), None).float()
    assert torch.equal(out, want)


def test_nf4_linear_checks_its_arguments_by_name_and_copies_the_bias():
    with pytest.raises(ValueError, match=r"compute_dtype: expected None or a floating dtype, got torch.int8"):
        NF4Linear(_nf4(), compute_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"bias: expected shape \(48,\), got \(47,\)"):
        NF4Linear(_nf4(), torch.zeros(47))
    bias = nn.Parameter(torch.randn(48))
    layer = NF4Linear(_nf4(), bias)
    assert not layer.bias.requires_grad and layer.bias.data_ptr() != bias.data_ptr()
    assert "bias" not in dict(layer.named_parameters())


# -- MoKALinear ------------------------------------------------------------------------------------------------
def test_moka_linear_refuses_a_separate_bias_for_a_linear_base():
    with pytest.raises(ValueError, match=r"bias: only accepted with an NF4Tensor base"):
        MoKALinear(nn.Linear(64, 48), MoKAConfig(num_components=2), bias=torch.zeros(48))


def test_an_nf4_base_weight_cannot_be_assigned():
    """transformers ties by assigning lm_head.weight: on a 4-bit base that must fail, not be ignored."""
    layer = MoKALinear(NF4Linear(_nf4()), MoKAConfig(num_components=2))
    with pytest.raises(AttributeError, match=r"weight: an NF4 base layer's weight is its packed bytes"):
        layer.weight = nn.Parameter(torch.randn(48, 64))


def test_merge_checks_requantize_and_keeps_the_nf4_compute_dtype():
    layer = MoKALinear(NF4Linear(_nf4(), torch.randn(48), compute_dtype=torch.bfloat16), MoKAConfig(num_components=2))
    with torch.no_grad():
        for b in layer.b_factors:
            b.normal_(0, 0.3)
    with pytest.raises(TypeError, match=r"requantize: expected True or False"):
        layer.merge(requantize="False")
    merged = layer.merge(requantize=True)
    assert isinstance(merged, NF4Linear) and merged.compute_dtype == torch.bfloat16
    dense = layer.merge().weight.double()
    err = dequantize_nf4(merged.nf4_weight, torch.float64) - dense
    rel_rms = (err.pow(2).mean().sqrt() / dense.pow(2).mean().sqrt()).item()
    assert merged.moka_requantization_error["rel_rms"] == pytest.approx(rel_rms, rel=1e-3)
    assert merged.moka_requantization_error["max_abs"] == pytest.approx(err.abs().max().item(), rel=1e-3)


def test_a_linear4bit_base_computes_in_its_own_compute_dtype():
    bnb = pytest.importorskip("bitsandbytes")
    from moka.bnb_compat import nf4_from_linear4bit

    dense = nn.Linear(64, 48)
    base = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    base.load_state_dict(dense.state_dict())
    base = base.to("cpu")
    layer = MoKALinear(base, MoKAConfig(num_components=2))  # B = 0: the base alone
    x = torch.randn(5, 64)
    out = layer(x)
    want = nf4_linear(x.bfloat16(), nf4_from_linear4bit(base), base.bias.bfloat16()).float()
    assert out.dtype == torch.float32 and torch.equal(out, want)


# -- model functions -------------------------------------------------------------------------------------------
def test_summary_counts_a_tied_weight_once_and_4bit_weights_by_their_logical_size():
    model = tiny_llama(tie_word_embeddings=True)
    summary = apply_moka(model, MoKAConfig(num_components=2))
    assert summary.total_parameters == sum(p.numel() for p in model.parameters())  # parameters() dedupes ties
    assert MoKASummary(1, 1, 4).trainable_percent == 25.0
    assert str(MoKASummary(2, 1, 4)).endswith("(25.000%)")
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.Linear4bit(64, 48, quant_type="nf4").to("cpu")
    wrapper = nn.Sequential(base)
    assert apply_moka(wrapper, MoKAConfig(num_components=2, target_modules=["0"])).total_parameters == (
        64 * 48 + 48 + sum(p.numel() for p in moka_layers(wrapper)["0"].parameters() if p.requires_grad)
    )


def test_disable_adapters_restores_each_layers_own_switch():
    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=2, target_modules=["q_proj"]))
    layers = list(moka_layers(model).values())
    layers[0].adapters_enabled = False  # switched off by hand before the block
    with disable_adapters(model):
        assert not any(layer.adapters_enabled for layer in layers)
    assert [layer.adapters_enabled for layer in layers] == [False] + [True] * (len(layers) - 1)


def test_adapter_state_dict_holds_detached_tensors():
    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=2, target_modules=["q_proj"]))
    state = adapter_state_dict(model)
    assert state and not any(t.requires_grad for t in state.values())


def test_a_non_strict_load_ignores_the_settings_of_layers_not_in_the_file(tmp_path):
    source = tiny_llama()
    apply_moka(source, MoKAConfig(num_components=2, target_modules=["q_proj"]))
    save_adapter(source, tmp_path / "q")
    target = tiny_llama()
    apply_moka(target, MoKAConfig(num_components=2, target_modules=["q_proj", "v_proj"]))
    for name, layer in moka_layers(target).items():
        if name.endswith("v_proj"):
            layer.scale = 2.0  # not in the file: a non-strict load leaves it alone
    assert load_adapter(target, tmp_path / "q", strict=False).layers_patched == 4
    with pytest.raises(TypeError, match=r"strict: expected True or False"):  # "False" would have meant strict
        load_adapter(target, tmp_path / "q", strict="False")


def test_quantize_model_checks_every_layer_before_replacing_one():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(0, 4))
    with pytest.raises(ValueError, match=r"has an empty weight"):
        quantize_model(model, target_modules=["0", "1"])
    assert not any(isinstance(m, NF4Linear) for m in model.modules())


# -- the merge CLI ---------------------------------------------------------------------------------------------
@pytest.fixture
def adapter_dir(tmp_path):
    """A small adapter whose recorded base is a model built in code (base_model "")."""
    model = tiny_llama(hidden=128)
    apply_moka(model, MoKAConfig(num_components=2, target_modules=["q_proj"]))
    return save_adapter(model, tmp_path / "adapter")


def test_merge_defaults_to_the_embedded_model_in_4bit_without_a_run_record(adapter_dir, tmp_path):
    from moka.finetune import EMBEDDED
    from moka.merge import parse_args

    args = parse_args(["--adapter", str(adapter_dir), "--output-dir", str(tmp_path / "m")])
    assert args.model == EMBEDDED and args.load_in_4bit is True  # the fine-tune's embedded default is 4-bit


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ([], "is not a JSON object"),
        ({"model": 5}, "records the model as 5; pass --model"),
    ],
    ids=["list", "model-not-a-string"],
)
def test_merge_refuses_a_bad_run_record_in_one_line(adapter_dir, tmp_path, capsys, record, pattern):
    from moka.merge import main

    (adapter_dir / "moka_run.json").write_text(json.dumps(record))
    assert main(["--adapter", str(adapter_dir), "--output-dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and pattern in err[0], err


def test_a_base_model_that_is_not_a_string_means_the_embedded_default(adapter_dir, tmp_path):
    from moka.finetune import EMBEDDED
    from moka.merge import parse_args

    config = json.loads((adapter_dir / "moka_adapter_config.json").read_text())
    (adapter_dir / "moka_adapter_config.json").write_text(json.dumps({**config, "base_model": 5}))
    assert parse_args(["--adapter", str(adapter_dir), "--output-dir", str(tmp_path / "m")]).model == EMBEDDED


def test_decode_4bit_layers_builds_frozen_layers_in_the_asked_dtype():
    from moka.merge import decode_4bit_layers

    model = nn.Sequential(NF4Linear(_nf4(), torch.randn(48)))
    assert decode_4bit_layers(model, torch.bfloat16) == 1
    layer = model[0]
    assert isinstance(layer, nn.Linear) and layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in layer.parameters())
    assert torch.equal(layer.weight, dequantize_nf4(_nf4(), torch.bfloat16))
