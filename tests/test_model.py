"""apply_moka / remove_moka / merge_moka / save_adapter / load_adapter on tiny random LLaMA models."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from helpers import randomize_adapters, tiny_llama, train_steps
from torch import nn

from moka import (
    MoKAConfig,
    MoKALinear,
    NF4Linear,
    adapter_state_dict,
    apply_moka,
    load_adapter,
    merge_moka,
    moka_layers,
    quantize_model,
    remove_moka,
    save_adapter,
)
from moka_kernels import dequantize_nf4, quantize_nf4

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def test_patch_is_exact_at_init_and_freezes_the_rest():
    model = tiny_llama()
    reference = model(IDS).logits
    summary = apply_moka(model, MoKAConfig(num_components=3))
    assert summary.layers_patched == 2 * 7
    assert torch.equal(model(IDS).logits, reference)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".a_factors." in n or ".b_factors." in n or n.endswith("gate_logits") for n in trainable)
    assert summary.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "14 layers patched" in str(summary)
    one = tiny_llama()
    assert "MoKA: 1 layer patched" in str(apply_moka(one, MoKAConfig(target_modules=["lm_head"])))


def test_regex_and_names_select_layers():
    model = tiny_llama()
    summary = apply_moka(model, MoKAConfig(target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj"))
    assert sorted(moka_layers(model)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert summary.layers_patched == 2


def test_remove_restores_layers_and_flags():
    model = tiny_llama()
    reference = model(IDS).logits
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_moka(model)
    randomize_adapters(model)
    assert not torch.allclose(model(IDS).logits, reference)
    remove_moka(model)
    assert not moka_layers(model)
    assert torch.equal(model(IDS).logits, reference)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_merge_computes_the_same_function():
    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=4))
    randomize_adapters(model)
    patched = model(IDS).logits
    merge_moka(model)
    assert not moka_layers(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(model(IDS).logits, patched, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=3, variant="moka", gate=True))
    randomize_adapters(model)
    logits = model(IDS).logits
    save_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["moka_adapter.safetensors", "moka_adapter_config.json"]  # no pickle
    umask = os.umask(0)
    os.umask(umask)  # modes as a plain mkdir/open would make them (safetensors alone writes 0600)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "adapter").iterdir()} == {0o666 & ~umask}
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o777 & ~umask
    meta = json.loads((tmp_path / "adapter" / "moka_adapter_config.json").read_text())
    assert meta["config"]["num_components"] == 3 and len(meta["layers"]) == 14

    fresh = tiny_llama()  # same base weights (same seed), not patched yet
    load_adapter(fresh, tmp_path / "adapter")
    saved, loaded = adapter_state_dict(model), adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(fresh(IDS).logits, logits)


def test_an_adapter_patched_on_a_submodule_by_regex_reloads_into_the_whole_model(tmp_path):
    """The saved config's regex was relative to the submodule apply_moka ran on, the saved names to the model:
    load_adapter matched nothing. Such a config is saved with the layers' names; one that fits keeps its own."""
    model = tiny_llama()
    apply_moka(model.model, MoKAConfig(num_components=2, target_modules=r"layers\.0\.self_attn\.[qv]_proj"))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "sub")
    meta = json.loads((tmp_path / "sub" / "moka_adapter_config.json").read_text())
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert meta["config"]["target_modules"] == names and sorted(meta["layers"]) == names
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "sub")
    assert sorted(moka_layers(fresh)) == names and torch.equal(fresh(IDS).logits, model(IDS).logits)
    whole = tiny_llama()
    apply_moka(whole, MoKAConfig(num_components=2, target_modules=r".*\.self_attn\.[qv]_proj"))
    save_adapter(whole, tmp_path / "whole")
    meta = json.loads((tmp_path / "whole" / "moka_adapter_config.json").read_text())
    assert meta["config"]["target_modules"] == r".*\.self_attn\.[qv]_proj"


def test_load_adapter_refuses_a_meta_model_and_leaves_it_unpatched(tmp_path):
    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=2))
    save_adapter(model, tmp_path / "adapter")
    with torch.device("meta"):
        meta = tiny_llama()
    with pytest.raises(ValueError, match=r"model: its adapter parameters are on the meta device"):
        load_adapter(meta, tmp_path / "adapter")
    assert not moka_layers(meta)


def test_adapters_save_and_load_through_compile_and_data_parallel_wrappers(tmp_path):
    """The names are the model's own, whatever wraps it: a file saved through torch.compile's or DataParallel's
    wrapper loads into a bare model and back (no ``_orig_mod.`` / ``module.`` prefix)."""
    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=2))
    randomize_adapters(model)
    bare = adapter_state_dict(model)
    for wrap in (torch.compile, nn.DataParallel, lambda m: torch.compile(nn.DataParallel(m))):
        wrapped = wrap(model)
        assert adapter_state_dict(wrapped).keys() == bare.keys()
        save_adapter(wrapped, tmp_path / "wrapped")
        fresh = tiny_llama()
        load_adapter(fresh, tmp_path / "wrapped")
        assert all(torch.equal(adapter_state_dict(fresh)[k], v) for k, v in bare.items())
        into_wrapped = tiny_llama()
        apply_moka(into_wrapped, MoKAConfig(num_components=2))
        load_adapter(wrap(into_wrapped), tmp_path / "wrapped")
        assert all(torch.equal(adapter_state_dict(into_wrapped)[k], v) for k, v in bare.items())


def test_load_adapter_from_another_shape_fails_clearly_and_changes_nothing(tmp_path):
    small = tiny_llama(hidden=64)
    apply_moka(small)
    save_adapter(small, tmp_path / "a")
    other = tiny_llama(hidden=48)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapter(other, tmp_path / "a")
    assert not moka_layers(other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


@pytest.mark.parametrize("damage", ["config_value", "weights_file"])
def test_load_adapter_from_a_damaged_adapter_names_the_file_and_changes_nothing(tmp_path, damage):
    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=2))
    directory = save_adapter(model, tmp_path / "a")
    config_path, weights_path = directory / "moka_adapter_config.json", directory / "moka_adapter.safetensors"
    if damage == "config_value":
        meta = json.loads(config_path.read_text())
        meta["config"]["num_components"] = "five"
        config_path.write_text(json.dumps(meta))
        expected = rf"directory: '{re.escape(str(config_path))}' holds an invalid MoKA config \(num_components: "
    else:
        weights_path.write_bytes(weights_path.read_bytes()[:100])
        expected = rf"directory: '{re.escape(str(weights_path))}' is not a readable safetensors file"
    other = tiny_llama()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=expected):
        load_adapter(other, directory)
    assert not moka_layers(other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_load_adapter_non_strict_loads_the_layers_both_have(tmp_path):
    """strict=False: an adapter of some layers into a model patched more broadly (the others keep their
    values), or of more layers into a model patched less; refused when no layer is shared, and strict (the
    default) refuses both with the missing/unexpected names."""
    source = tiny_llama()
    apply_moka(source, MoKAConfig(num_components=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(source, seed=3)
    save_adapter(source, tmp_path / "qv")
    broad = tiny_llama()
    apply_moka(broad, MoKAConfig(num_components=2))
    randomize_adapters(broad, seed=4)
    before = {k: v.clone() for k, v in adapter_state_dict(broad).items()}
    with pytest.raises(ValueError, match=r"does not fit this model .*missing \['model.layers.0.mlp"):
        load_adapter(broad, tmp_path / "qv")
    load_adapter(broad, tmp_path / "qv", strict=False)
    loaded, saved = adapter_state_dict(broad), adapter_state_dict(source)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert all(torch.equal(loaded[k], before[k]) for k in loaded if k not in saved)
    assert any(k not in saved for k in loaded)

    save_adapter(broad, tmp_path / "all")
    narrow = tiny_llama()
    apply_moka(narrow, MoKAConfig(num_components=2, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.0.mlp"):
        load_adapter(narrow, tmp_path / "all")
    load_adapter(narrow, tmp_path / "all", strict=False)
    assert all(torch.equal(v, loaded[k]) for k, v in adapter_state_dict(narrow).items())

    unrelated = tiny_llama()
    apply_moka(unrelated, MoKAConfig(num_components=2, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"shares no layer with this model"):
        load_adapter(unrelated, tmp_path / "qv", strict=False)


def test_target_modules_matching_nothing_fails_and_changes_nothing():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"matched no linear layer.*q_proj"):
        apply_moka(model, MoKAConfig(target_modules=["qkv"]))
    assert not moka_layers(model) and all(p.requires_grad for p in model.parameters())


def test_adapter_files_are_not_peft_s_and_older_adapters_still_load(tmp_path):
    """PEFT's file names made transformers/PEFT take a MoKA adapter dir for a PEFT adapter (a KeyError);
    an adapter saved under those names still loads, and a save into its dir replaces them."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=2))
    randomize_adapters(model)
    logits = model(IDS).logits
    save_adapter(model, tmp_path / "old")
    for new, old in (
        ("moka_adapter.safetensors", "adapter_model.safetensors"),
        ("moka_adapter_config.json", "adapter_config.json"),
    ):
        (tmp_path / "old" / new).rename(tmp_path / "old" / old)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "old")
    assert torch.equal(fresh(IDS).logits, logits)
    save_adapter(fresh, tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [
        "moka_adapter.safetensors",
        "moka_adapter_config.json",
    ]
    with pytest.raises(
        (OSError, ValueError), match=r"config\.json"
    ):  # transformers' own "no model here", not a PEFT KeyError
        AutoModelForCausalLM.from_pretrained(tmp_path / "old")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="it holds a PEFT adapter, not a MoKA one"):
        load_adapter(tiny_llama(), tmp_path / "peft")


def test_a_matched_module_of_another_type_is_refused_not_skipped():
    """A PEFT LoRA layer or GPT-2's Conv1D under a target name: an error naming it, not a silent skip (that
    also froze the LoRA weights); a string target gets the hint that it is one full-name regex."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    with pytest.raises(ValueError, match=r"q_proj is a peft\.tuners\.lora\.layer\.Linear, not an nn\.Linear"):
        apply_moka(peft_model, MoKAConfig(num_components=2))
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == flags
    with pytest.raises(ValueError, match=r"names matched as suffixes are a list, \[.q_proj.\]"):
        apply_moka(tiny_llama(), MoKAConfig(target_modules="q_proj"))
    broad = tiny_llama()  # a broad regex also matches norms and containers: passed over, not refused
    assert apply_moka(broad, MoKAConfig(num_components=2, target_modules=r"model\.layers\.0\..*")).layers_patched == 7
    quantize_model(model := tiny_llama(), progress=False)
    with pytest.raises(ValueError, match="it matched only NF4Linear modules"):
        quantize_model(model, progress=False)


def test_new_layers_take_the_mode_of_the_model(tmp_path):
    """Patched or loaded into a model in eval mode, the adapter's dropout is off (two calls agree)."""
    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=2, dropout=0.5))
    for layer in moka_layers(model).values():
        nn.init.normal_(layer.b_factors[0])
    save_adapter(model, tmp_path / "a")
    other = tiny_llama().eval()
    load_adapter(other, tmp_path / "a")
    assert not any(m.training for m in other.modules())
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(other(ids).logits, other(ids).logits)
    training = tiny_llama().train()
    apply_moka(training, MoKAConfig(num_components=2, dropout=0.5))
    assert all(m.training for m in moka_layers(training).values())


def test_apply_twice_and_missing_adapter_dir_are_rejected(tmp_path):
    model = tiny_llama()
    apply_moka(model)
    with pytest.raises(ValueError, match="already has MoKA layers"):
        apply_moka(model)
    with pytest.raises(FileNotFoundError, match="expected a MoKA adapter dir"):
        load_adapter(model, tmp_path / "nothing")
    save_adapter(model, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "moka_adapter_config.json"
    for text, problem in [("{", "not valid JSON"), ('{"layers": {}}', "a 'config' object"), ("[]", "a 'config'")]:
        config_path.write_text(text)
        with pytest.raises(ValueError, match=problem):
            load_adapter(tiny_llama(), tmp_path / "adapter")


def test_layers_an_adapter_could_not_reach_are_refused():
    """An nn.MultiheadAttention reads out_proj.weight directly; a layer held by two parents would be swapped in
    one only. A parent reachable under two names is fine (the swap reaches both)."""
    encoder = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64)
    with pytest.raises(ValueError, match=r"self_attn.out_proj is an nn.MultiheadAttention's projection"):
        apply_moka(encoder, MoKAConfig(num_components=2, target_modules=["out_proj", "linear1"]))
    assert not moka_layers(encoder) and all(p.requires_grad for p in encoder.parameters())
    apply_moka(encoder, MoKAConfig(num_components=2, target_modules=["linear1"]))
    shared = nn.Linear(16, 16)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ValueError, match=r"one layer is reachable as '0' and '2'"):
        apply_moka(twice, MoKAConfig(num_components=2, target_modules=r"\d"))
    block = nn.Sequential(nn.Linear(16, 16))
    aliased = nn.ModuleDict({"a": block, "b": block})
    apply_moka(aliased, MoKAConfig(num_components=2, target_modules=r"a\.0"))
    assert isinstance(aliased["b"][0], MoKALinear)


def test_remove_from_the_whole_model_restores_what_patching_a_submodule_froze():
    model = tiny_llama()
    apply_moka(model.model, MoKAConfig(num_components=2))
    assert not model.model.embed_tokens.weight.requires_grad
    remove_moka(model)
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model.model, "moka_config")


def test_a_model_offloaded_by_accelerate_is_refused_clearly():
    """accelerate's offload hooks load a layer's weights in its own forward, which MoKA never calls."""
    from accelerate import cpu_offload

    model = tiny_llama()
    cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"base_layer: its weights are offloaded by accelerate .*at model\.layers"):
        apply_moka(model, MoKAConfig(num_components=2))
    assert not moka_layers(model)


def test_a_tied_output_embedding_can_be_patched_and_tied_again():
    """transformers ties by assigning lm_head.weight = embed_tokens.weight (tie_weights, which the Trainer
    calls): the assignment reaches the wrapped base layer."""
    model = tiny_llama(tie_word_embeddings=True)
    apply_moka(model, MoKAConfig(num_components=2, target_modules=["q_proj", "lm_head"]))
    frozen_copy = nn.Parameter(model.model.embed_tokens.weight.detach().clone(), requires_grad=False)
    model.model.embed_tokens.weight = frozen_copy  # untied, as a load or a resize leaves it
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight
    assert model(IDS).logits.shape == (*IDS.shape, 128)
    # A resize after patching would tie a larger embedding to factors sized for 128 rows: refused before it
    # touches the embeddings (transformers resizes them first).
    with pytest.raises(ValueError, match=r"resize_token_embeddings: lm_head carries a MoKA adapter .*resize the"):
        model.resize_token_embeddings(136)
    assert model.model.embed_tokens.weight.shape == (128, 64) and model.lm_head.out_features == 128
    # What transformers' resize does to a tie, done by hand: setting lm_head.out_features is refused, not
    # left to the next forward's shape error; the shared weight's data swapped in place is named at a forward.
    with pytest.raises(ValueError, match=r"out_features: expected 128 .*got 136; resize the vocabulary before"):
        model.lm_head.out_features = 136
    model.model.embed_tokens.weight.data = torch.zeros(136, 64)
    with pytest.raises(ValueError, match=r"base_layer: its weight is \(136, 64\) but the adapter was built for "):
        model(IDS)
    with pytest.raises(ValueError, match=r"weight: expected shape \(128, 64\) .*got \(136, 64\); resize the voc"):
        model.lm_head.weight = nn.Parameter(torch.zeros(136, 64), requires_grad=False)


def test_resizing_the_vocabulary_of_a_patched_lm_head_is_refused_before_anything_changes():
    """Untied, transformers would resize the input embeddings, then raise on the wrapped lm_head: half resized."""
    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"resize_token_embeddings: lm_head carries a MoKA adapter"):
        model.resize_token_embeddings(136)
    assert model.model.embed_tokens.weight.shape == (128, 64) and model.config.vocab_size == 128
    copied = copy.deepcopy(model)  # the guard travels with a copy and goes with the adapters
    for patched in (model, copied):
        remove_moka(patched)
        patched.resize_token_embeddings(136)
        assert patched.lm_head.weight.shape == (136, 64) and patched.model.embed_tokens.weight.shape == (136, 64)
    other = tiny_llama()
    apply_moka(other, MoKAConfig(num_components=2, target_modules=["lm_head"]))
    merge_moka(other)
    other.resize_token_embeddings(136)
    assert other.lm_head.weight.shape == (136, 64)
    only_attention = tiny_llama()
    apply_moka(only_attention, MoKAConfig(num_components=2, target_modules=["q_proj"]))
    only_attention.resize_token_embeddings(136)  # lm_head not patched: nothing to refuse
    assert only_attention.lm_head.weight.shape == (136, 64)


def test_a_tied_patched_lm_head_saves_and_merges_untied(tmp_path):
    """save_pretrained (the Trainer's checkpoints) drops the tied copy under its wrapped name instead of raising
    on the shared tensor; merging unties lm_head and says so in the config, so a later tie_weights() cannot
    drop ΔW."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tie_word_embeddings=True)
    apply_moka(model, MoKAConfig(num_components=2, target_modules=["q_proj", "lm_head"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "patched")  # raised "contained shared tensors" before
    adapted = model(IDS).logits
    merge_moka(model)
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-4, atol=1e-5)
    model.tie_weights()  # honours the flag: the merged head stays
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-4, atol=1e-5)
    model.tie_weights(recompute_mapping=False)  # transformers' cached mapping (its init and load paths) too
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(IDS).logits, adapted, rtol=1e-4, atol=1e-5)


def test_training_steps_reduce_the_loss():
    model = tiny_llama()
    apply_moka(model)
    model.train()
    losses = train_steps(model, IDS, steps=12, lr=3e-2)
    assert losses[-1] < 0.8 * losses[0], losses


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        apply_moka(model)
        randomize_adapters(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_generate_matches_the_base_at_init():
    model = tiny_llama()
    base_tokens = model.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    apply_moka(model)
    assert torch.equal(model.generate(IDS[:1], max_new_tokens=6, do_sample=False), base_tokens)


def _bnb_nf4_model(tmp_path, double_quant: bool = True, hidden: int = 128):
    """A tiny LLaMA loaded through transformers' BitsAndBytesConfig (NF4) on CPU, in eval mode."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # hidden 128, intermediate 192: every K is a multiple of 64. (For other K, bitsandbytes' own AVX512 CPU
    # dequantization indexes blocks per row and is wrong; see docs/design.md §4.)
    tiny_llama(hidden=hidden).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")
    for m in model.modules():  # bitsandbytes would repack 4-bit bytes in place in eval/no-grad forwards
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model.eval()


def test_4bit_base_through_bitsandbytes_config(tmp_path):
    """transformers' BitsAndBytesConfig NF4 + double quant on CPU, with the CPU repack kept away."""
    model = _bnb_nf4_model(tmp_path)
    with torch.no_grad():
        reference = model(IDS).logits
    summary = apply_moka(model)
    assert summary.layers_patched == 14
    assert all(m.is_4bit for m in moka_layers(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference, rtol=0, atol=1e-5)
    model.train()
    losses = train_steps(model, IDS, steps=5, lr=1e-2)
    assert losses[-1] < losses[0]
    model.eval()
    assert model.generate(IDS[:1], max_new_tokens=3, do_sample=False).shape == (1, 15)
    assert not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in model.modules()
        if hasattr(m, "support_avx512bf16_for_cpu")
    )
    assert isinstance(next(iter(moka_layers(model).values())), MoKALinear)
    layer = next(iter(moka_layers(model).values()))
    packed = layer.base_layer.weight
    layer.weight = packed  # a Linear4bit's packed bytes (shape (n, 1)) are not refused as a wrong-shaped weight
    assert layer.base_layer.weight is packed


@pytest.mark.parametrize("base", ["dense", "nf4", "bitsandbytes"])
def test_disable_adapters_gives_the_base_alone_inside_the_block_only(tmp_path, base):
    """PEFT's disable_adapter(): inside the block the base's logits, exactly as the adapted model computes
    them at zero adapters (autocast included) and, in fp32, as the unpatched dense/NF4Linear model did; after
    it the adapted model again, also when the block raises; a model without MoKA layers is refused."""
    from moka import disable_adapters

    # bitsandbytes: hidden 64, so down_proj's K = 96 is no multiple of the blocksize, where bitsandbytes' own
    # CPU forward decodes wrong: the disabled base must still be the one the adapters are trained on.
    model = _bnb_nf4_model(tmp_path, hidden=64) if base == "bitsandbytes" else tiny_llama()
    if base == "nf4":
        quantize_model(model)

    def logits(autocast: bool = False):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(IDS).logits  # autocast: the Trainer's bf16=True

    unpatched = (logits(), logits(autocast=True))
    with pytest.raises(ValueError, match="model: has no MoKA layers to disable"), disable_adapters(model):
        pass
    apply_moka(model, MoKAConfig(num_components=2))
    at_zero = (logits(), logits(autocast=True))  # the adapters start at zero
    if base != "bitsandbytes":  # (under autocast a patched NF4Linear casts elsewhere: bf16 rounding apart)
        assert torch.equal(at_zero[0], unpatched[0]) and (base == "nf4" or torch.equal(at_zero[1], unpatched[1]))
    randomize_adapters(model)
    adapted = logits()
    assert not torch.allclose(adapted, at_zero[0], atol=1e-3)
    with disable_adapters(model) as same:
        assert same is model
        assert torch.equal(logits(), at_zero[0]) and torch.equal(logits(autocast=True), at_zero[1])
        assert not model(IDS).logits.requires_grad  # the adapters are out of the graph (all else is frozen)
    assert torch.equal(logits(), adapted)
    with pytest.raises(KeyError), disable_adapters(model):
        raise KeyError("inside")
    assert torch.equal(logits(), adapted)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_base_patches_exactly_and_trains(dtype):
    model = tiny_llama().to(dtype)
    reference = model(IDS).logits
    apply_moka(model)
    assert torch.equal(model(IDS).logits, reference)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # fp32 adapters
    model.train()
    randomize_adapters(model)
    model(IDS, labels=IDS).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(torch.count_nonzero(g) for g in grads)


def test_apply_that_fails_on_one_layer_changes_nothing():
    """A target that cannot be wrapped (here an fp4 Linear4bit) is found before any layer is swapped."""
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(64, 64))
    model.add_module("v_proj", bnb.nn.Linear4bit(64, 64, quant_type="fp4").to("cpu"))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"quant_type='nf4'.*v_proj"):
        apply_moka(model, MoKAConfig(num_components=2))
    assert not moka_layers(model) and type(model.q_proj) is nn.Linear
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "_moka_requires_grad")
    model.v_proj = nn.Linear(64, 64)  # fixed: a retry is accepted
    assert apply_moka(model, MoKAConfig(num_components=2)).layers_patched == 2


def test_load_adapter_into_a_model_patched_with_another_scale_fails_clearly(tmp_path):
    model = tiny_llama()
    apply_moka(model, MoKAConfig(scale=4.0, num_components=2))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    other = tiny_llama()
    apply_moka(other, MoKAConfig(num_components=2))
    before = {k: v.clone() for k, v in adapter_state_dict(other).items()}
    with pytest.raises(ValueError, match=r"which has scale=1\.0 \(adapter: 4\.0\).*remove_moka"):
        load_adapter(other, tmp_path / "adapter")
    assert all(torch.equal(v, before[k]) for k, v in adapter_state_dict(other).items())
    remove_moka(other)
    load_adapter(other, tmp_path / "adapter")
    assert torch.equal(other(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("change", ["apply_with_another_scale", "edit_a_layer"])
def test_save_adapter_refuses_layers_whose_settings_its_one_config_would_lose(tmp_path, change):
    """The file holds one config that load_adapter applies to every layer: a layer patched with another
    scale (or edited by hand) would reload as a different function, silently. Refused, naming the layer; a
    scale set on every layer alike is what the file records."""
    model = tiny_llama()
    first = "model.layers.0.self_attn.q_proj"
    if change == "apply_with_another_scale":
        apply_moka(model.model.layers[0], MoKAConfig(num_components=2))
        apply_moka(model.model.layers[1], MoKAConfig(num_components=2, scale=4.0))
        odd = "model.layers.1.self_attn.q_proj"
    else:
        apply_moka(model, MoKAConfig(num_components=2))
        odd = "model.layers.0.mlp.up_proj"
        moka_layers(model)[odd].scale = 0.5
    expected = rf"model: layer {re.escape(odd)} has scale=(4\.0|0\.5) \(.*{re.escape(first)}, the first layer: 1\.0\)"
    with pytest.raises(ValueError, match=expected):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    for layer in moka_layers(model).values():
        layer.scale = 0.5  # the same on every layer: saved as the config's scale, and reloaded as it runs
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "adapter")
    assert all(layer.scale == 0.5 for layer in moka_layers(fresh).values())
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-lm-head"])
def test_merge_restores_requires_grad_flags(tied):
    """Every name's flag, a tied lm_head's too: merged, it holds its own weight, which must not stay frozen."""
    model = tiny_llama(tie_word_embeddings=tied)
    model.model.norm.weight.requires_grad_(False)  # a user's own choice, restored as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    assert "lm_head.weight" in flags and not flags["model.norm.weight"]
    apply_moka(model, MoKAConfig(num_components=2, target_modules=["q_proj", "lm_head"]))
    merge_moka(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)} == flags
    assert not hasattr(model, "_moka_requires_grad") and not hasattr(model, "moka_config")


def test_patched_fp32_model_runs_under_autocast():
    """torch.autocast (HF Trainer's bf16=True on an fp32 model) casts into the op, as it does for nn.Linear."""
    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=2))
    randomize_adapters(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    layer = next(iter(moka_layers(model).values()))
    with torch.no_grad():  # logits a bf16 copy holds exactly (autocast leaves the gate in fp32, as its softmax is)
        layer.gate_logits.copy_(layer.gate_logits.bfloat16())
    x = torch.randn(3, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16  # as nn.Linear returns under autocast
    bf16 = copy.deepcopy(layer).to(torch.bfloat16)
    assert torch.equal(out, bf16(x.bfloat16()))


def test_quantize_model_gives_an_nf4_base_that_patches_exactly_and_trains():
    """moka's own NF4 base, no bitsandbytes: each projection decodes to quantize_nf4's W, lm_head stays dense."""
    model = tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj  # a bias too (Qwen2-style), counted in the total
    q_proj.bias = nn.Parameter(torch.randn(q_proj.out_features) * 0.1)
    dense = copy.deepcopy(model)
    assert quantize_model(model, blocksize=128, double_quant=True, progress=False) == 14
    for name, m in dense.named_modules():
        if name.endswith("_proj"):
            m.weight.data = dequantize_nf4(quantize_nf4(m.weight.data, 128, True), torch.float32)
    assert all(isinstance(m, NF4Linear) for n, m in model.named_modules() if n.endswith("_proj"))
    assert type(model.lm_head) is nn.Linear
    reference = dense(IDS).logits
    assert torch.equal(model(IDS).logits, reference)
    summary = apply_moka(model, MoKAConfig(num_components=2))
    assert summary.layers_patched == 14 and all(m.is_4bit for m in moka_layers(model).values())
    assert summary.total_parameters == sum(p.numel() for p in dense.parameters()) + summary.trainable_parameters
    assert torch.equal(model(IDS).logits, reference)
    model.train()
    losses = train_steps(model, IDS, steps=4, lr=1e-2)
    assert losses[-1] < losses[0]


def test_requantized_merge_can_be_patched_again():
    """merge_moka(requantize=True) leaves NF4Linear layers; apply_moka takes them as bases."""
    model = tiny_llama()
    quantize_model(model, shardable=True, progress=False)
    apply_moka(model, MoKAConfig(num_components=2))
    randomize_adapters(model)
    merge_moka(model, requantize=True)
    assert all(isinstance(m, NF4Linear) and m.shardable for n, m in model.named_modules() if n.endswith("_proj"))
    merged = model(IDS).logits
    assert apply_moka(model, MoKAConfig(num_components=2)).layers_patched == 14
    assert torch.equal(model(IDS).logits, merged)


def test_quantize_model_bad_input_names_the_parameter_and_changes_nothing():
    model = tiny_llama()
    reference = model(IDS).logits
    with pytest.raises(ValueError, match=r"blocksize: expected one of"):
        quantize_model(model, blocksize=48)
    with pytest.raises(ValueError, match=r"target_modules: .*matched no nn\.Linear"):
        quantize_model(model, target_modules=["qkv"])
    with pytest.raises(TypeError, match=r"lm_head\.weight is torch\.float64"):
        model.lm_head.double()
        quantize_model(model, target_modules=["lm_head"], progress=False)
    model.lm_head.float()
    last = [name for name, _ in model.named_modules() if name.endswith("o_proj")][-1]  # after other targets
    weight = model.get_submodule(last).weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"model: {re.escape(last)}\.weight has non-finite values"):
        quantize_model(model, progress=False)
    with torch.no_grad():
        weight.copy_(saved)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    assert torch.equal(model(IDS).logits, reference)
    apply_moka(model, MoKAConfig(num_components=2))
    with pytest.raises(ValueError, match=r"model: has MoKA layers"):
        quantize_model(model)


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "fp32-absmax"])
def test_quantize_model_takes_bitsandbytes_nf4_layers_over_without_a_copy(tmp_path, double_quant):
    """A model loaded with BitsAndBytesConfig: its Linear4bit layers become NF4Linear views of the same bytes."""
    model = _bnb_nf4_model(tmp_path, double_quant)
    with torch.no_grad():
        reference = model(IDS).logits
    storage = {n: m.weight.untyped_storage().data_ptr() for n, m in model.named_modules() if n.endswith("_proj")}
    assert quantize_model(model, blocksize=4096, progress=False) == 14  # blocksize is the layers' own
    layers = {n: m for n, m in model.named_modules() if n.endswith("_proj")}
    assert all(isinstance(m, NF4Linear) and m.blocksize == 64 for m in layers.values())
    assert all(m.compute_dtype == torch.float32 and not m.shardable for m in layers.values())  # Linear4bit's own
    assert {n: m.packed.untyped_storage().data_ptr() for n, m in layers.items()} == storage
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference, rtol=0, atol=1e-5)
    apply_moka(model, MoKAConfig(num_components=2))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference, rtol=0, atol=1e-5)


def test_quantize_model_refuses_a_non_nf4_linear4bit_and_changes_nothing():
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(64, 64))
    model.add_module("v_proj", bnb.nn.Linear4bit(64, 64, quant_type="fp4").to("cpu"))
    with pytest.raises(ValueError, match=r"model: v_proj cannot become an NF4Linear: .*'nf4'"):
        quantize_model(model, progress=False)
    assert type(model.q_proj) is nn.Linear


def test_quantize_model_frees_each_dense_weight_and_can_quantize_onto_another_device(monkeypatch):
    """One dense weight at a time: each is released once its NF4 layer replaces it; with ``device`` the NF4
    layers land there while the rest of the model stays (meta stands in for a GPU here)."""
    import gc
    import weakref

    import moka.model

    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    refs = [weakref.ref(layer.weight) for layer in model]
    alive, quantize = [], moka.model.quantize_nf4

    def counting(w, *args):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        return quantize(w, *args)

    monkeypatch.setattr(moka.model, "quantize_nf4", counting)
    assert quantize_model(model, target_modules=r"\d", progress=False) == 4
    assert alive == [4, 3, 2, 1]
    other = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    quantize_model(other, target_modules=["0"], device="meta", progress=False)
    assert isinstance(other[0], NF4Linear) and {t.device.type for t in other[0].buffers()} == {"meta"}
    assert other[1].weight.device.type == "cpu"


def test_apply_and_load_refuse_a_model_inside_ddp(tmp_path):
    """DDP's reducer knows only the parameters it was built with: patching inside it (apply_moka, or load_adapter
    into an unpatched model) would leave each rank training its own adapter, so both refuse; a model patched
    before wrapping loads through the wrapper."""
    import torch.distributed as dist

    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=2))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(tiny_llama())
        with pytest.raises(ValueError, match=r"model: is wrapped in DistributedDataParallel"):
            apply_moka(wrapped, MoKAConfig(num_components=2))
        with pytest.raises(ValueError, match=r"model: is wrapped in DistributedDataParallel"):
            load_adapter(wrapped, tmp_path / "adapter")
        compiled = torch.compile(wrapped)  # torch.compile(DDP(model)): the wrapper inside is still DDP
        with pytest.raises(ValueError, match=r"model: is wrapped in DistributedDataParallel"):
            apply_moka(compiled, MoKAConfig(num_components=2))
        with pytest.raises(ValueError, match=r"model: is wrapped in DistributedDataParallel"):
            load_adapter(compiled, tmp_path / "adapter")
        assert not moka_layers(wrapped.module)
        patched = tiny_llama()
        apply_moka(patched, MoKAConfig(num_components=2))
        load_adapter(nn.parallel.DistributedDataParallel(patched), tmp_path / "adapter")
        assert all(torch.equal(adapter_state_dict(patched)[k], v) for k, v in adapter_state_dict(model).items())
        # FSDP1 hands modules flat shards under prefixed names: every adapter entry point refuses it
        from torch.distributed.fsdp import FullyShardedDataParallel

        quantized = tiny_llama()
        quantize_model(quantized, progress=False)
        apply_moka(quantized, MoKAConfig(num_components=2))
        sharded = FullyShardedDataParallel(quantized, device_id=torch.device("cpu"), use_orig_params=True)
        for call in (
            lambda: save_adapter(sharded, tmp_path / "fsdp1"),
            lambda: adapter_state_dict(sharded),
            lambda: load_adapter(sharded, tmp_path / "adapter"),
        ):
            with pytest.raises(ValueError, match=r"model: is wrapped in FSDP1 \(FullyShardedDataParallel\)"):
                call()
        assert not (tmp_path / "fsdp1").exists()
        unpatched = tiny_llama()
        quantize_model(unpatched, progress=False)
        with pytest.raises(ValueError, match=r"model: is wrapped in FSDP1"):
            apply_moka(FullyShardedDataParallel(unpatched, device_id=torch.device("cpu")), MoKAConfig())
        # wrapped at the root only, the module inside (what accelerate's unwrap_model gives the Trainer's save)
        # holds no wrapper, but its parameters are FSDP1's flat-shard views
        root_only = tiny_llama()
        quantize_model(root_only, progress=False)
        apply_moka(root_only, MoKAConfig(num_components=2))
        inner = FullyShardedDataParallel(root_only, device_id=torch.device("cpu"), use_orig_params=True).module
        with pytest.raises(ValueError, match=r"model: is wrapped in FSDP1"):
            save_adapter(inner, tmp_path / "fsdp1-root")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        parent = tiny_llama()
        fully_shard(parent, mesh=init_device_mesh("cpu", (1,)))  # FSDP2 on the parent, MoKA asked on a child
        with pytest.raises(ValueError, match=r"model: is already sharded by FSDP2"):
            apply_moka(parent.model, MoKAConfig(num_components=2))
    finally:
        dist.destroy_process_group()


def test_disabled_adapters_draw_no_dropout():
    """A disabled layer skips the adapter's dropout too: the RNG stream of a training step is the base's."""
    from moka import disable_adapters

    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=2, dropout=0.5))
    model.train()
    state = torch.get_rng_state()
    with torch.no_grad(), disable_adapters(model):
        model(IDS)
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        model(IDS)
    assert not torch.equal(torch.get_rng_state(), state)  # enabled: the adapter input's dropout draws


def test_layers_made_by_quantize_model_and_merge_keep_the_models_mode(tmp_path):
    """New modules start in train mode: quantize_model's NF4Linear and merge's layers take the mode of the
    layer they replace, so an adapter with dropout applied after them does not drop out in an eval model."""
    config = MoKAConfig(num_components=2, dropout=0.5)
    model = tiny_llama().eval()
    quantize_model(model, progress=False)
    assert not any(m.training for m in model.modules())
    apply_moka(model, config)
    randomize_adapters(model)
    assert torch.equal(model(IDS).logits, model(IDS).logits)  # no dropout in eval
    for requantize in (False, True):
        merged = copy.deepcopy(model)
        merge_moka(merged, requantize=requantize)
        assert not any(m.training for m in merged.modules()), requantize
        apply_moka(merged, config)
        randomize_adapters(merged)
        assert torch.equal(merged(IDS).logits, merged(IDS).logits), requantize
    trained = tiny_llama().train()
    quantize_model(trained, progress=False)
    assert all(m.training for m in trained.modules())


def test_a_base_whose_own_forward_or_hooks_would_be_skipped_is_refused():
    """MoKA computes the base from its weight: a Linear subclass's forward, hooks on the layer and float8 weights
    are refused (naming the layer) by apply_moka and quantize_model, leaving the model as it was."""

    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = tiny_llama()
    attention = model.model.layers[1].self_attn
    attention.v_proj = ScaledLinear(attention.v_proj.in_features, attention.v_proj.out_features, bias=False)
    for convert in (lambda m: apply_moka(m, MoKAConfig(num_components=2)), lambda m: quantize_model(m, progress=False)):
        with pytest.raises(
            TypeError, match=r"ScaledLinear overrides nn\.Linear\.forward.*at model\.layers\.1\.self_attn\.v_proj"
        ):
            convert(model)
        assert not moka_layers(model) and not any(isinstance(m, NF4Linear) for m in model.modules())
    model = tiny_llama()
    calls = []
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *args: calls.append(1))
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda *args: calls.append(2))
    with pytest.raises(
        ValueError, match=r"has forward hooks, which would never fire .*at model\.layers\.0\.mlp\.up_proj"
    ):
        apply_moka(model, MoKAConfig(num_components=2))
    with pytest.raises(ValueError, match=r"model: has forward hooks"):
        quantize_model(model, progress=False)
    assert not moka_layers(model) and not any(isinstance(m, NF4Linear) for m in model.modules())
    model.model.layers[0].mlp.up_proj._forward_hooks.clear()
    with pytest.raises(ValueError, match=r"has forward pre-hooks.*down_proj"):
        apply_moka(model, MoKAConfig(num_components=2))
    float8 = nn.Linear(64, 64).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"base_layer: expected a float16/bfloat16/float32/float64 weight"):
        MoKALinear(float8)
    with pytest.raises(ValueError, match=r"adapter_dtype: expected one of"):
        MoKAConfig(adapter_dtype=torch.float8_e4m3fn)


def test_quantize_model_refuses_targets_a_swap_would_miss():
    """As apply_moka: an nn.MultiheadAttention's projection (its weight is read directly) and a layer held
    under two names would keep computing densely somewhere."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2)
            self.enc = nn.Sequential(nn.Linear(16, 16))
            self.dec = nn.Sequential(self.enc[0])

    model = Shared()
    with pytest.raises(ValueError, match=r"attn\.out_proj is an nn\.MultiheadAttention's projection"):
        quantize_model(model, r"attn\.out_proj", progress=False)
    with pytest.raises(ValueError, match=r"reachable as 'enc\.0' and 'dec\.0'"):
        quantize_model(model, ["0"], progress=False)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())


def test_quantize_model_refuses_a_tied_output_layer():
    """A tied lm_head shares the embedding's weight: in 4-bit it would untie them (tie_weights() then put the
    dense embedding back on the NF4 layer as a new parameter), so it is refused before anything changes."""
    model = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"lm_head\.weight is also model\.embed_tokens\.weight \(tied weights\)"):
        quantize_model(model, ["q_proj", "lm_head"], progress=False)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    assert quantize_model(tiny_llama(), ["lm_head"], progress=False) == 1  # untied, it is a layer like any other


def test_remove_or_merge_on_a_part_of_the_patched_model_is_refused():
    """apply_moka(model) keeps the requires_grad flags on model: remove_moka(model.model) would leave every
    parameter frozen, so it is refused, naming what to call instead."""
    model = tiny_llama()
    apply_moka(model, MoKAConfig(num_components=2))
    for undo in (remove_moka, merge_moka):
        with pytest.raises(
            ValueError, match=rf"model: is a part of the module apply_moka patched .*call {undo.__name__}"
        ):
            undo(model.model)
    assert len(moka_layers(model)) == 14
    remove_moka(model)
    assert all(p.requires_grad for p in model.parameters())
    layer = MoKALinear(nn.Linear(8, 8))  # built by hand: nothing recorded, removable anywhere
    holder = nn.Sequential(nn.Sequential(layer))
    remove_moka(holder[0])
    assert isinstance(holder[0][0], nn.Linear)


def test_boolean_flags_must_be_booleans():
    model = tiny_llama()
    for kwargs in ({"shardable": "no"}, {"double_quant": 1}, {"progress": None}):
        with pytest.raises(TypeError, match=rf"{next(iter(kwargs))}: expected True or False"):
            quantize_model(model, **kwargs)
    with pytest.raises(ValueError, match=r"blocksize: expected one of .*got '64'"):
        quantize_model(model, blocksize="64")
    apply_moka(model, MoKAConfig(num_components=2))
    with pytest.raises(TypeError, match=r"requantize: expected True or False, got 'False'"):
        merge_moka(model, requantize="False")
    assert moka_layers(model)


def test_the_config_is_copied_and_checked_when_a_model_is_patched(tmp_path):
    """apply_moka and MoKALinear keep a validated copy: the caller's config, changed afterwards (reused for
    another model), neither changes what a patched model saves nor skips validation; a changed
    model.moka_config that would rebuild other shapes is refused by save_adapter, not written."""
    config = MoKAConfig(num_components=5, target_modules=["q_proj", "v_proj"])
    first = tiny_llama()
    apply_moka(first, config)
    randomize_adapters(first)
    config.num_components = 3
    config.target_modules.append("k_proj")  # changed in place: the copy is deep
    apply_moka(tiny_llama(), config)
    save_adapter(first, tmp_path / "first")  # recorded 3 components before: unloadable
    again = tiny_llama()
    load_adapter(again, tmp_path / "first")
    assert torch.equal(again(IDS).logits, first(IDS).logits)
    late = MoKAConfig()
    late.gate = "False"  # set after construction: checked when a layer is built from it
    with pytest.raises(ValueError, match=r"gate: expected True or False, got 'False'"):
        MoKALinear(nn.Linear(16, 12), late)
    late = MoKAConfig()
    late.init = "zero-a"
    with pytest.raises(ValueError, match=r"init: expected one of"):
        apply_moka(tiny_llama(), late)
    first.moka_config.num_components = 2
    with pytest.raises(ValueError, match=r"model: layer .* has components .* gives it"):
        save_adapter(first, tmp_path / "changed")
    assert not (tmp_path / "changed").exists()
    with pytest.raises(TypeError, match=r"shardable: expected True or False"):
        NF4Linear(quantize_nf4(torch.randn(8, 64)), shardable="False")
