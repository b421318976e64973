"""Library calls leave the caller's process state alone: random generators, matplotlib's backend, submodule
modes. Each test fails on the leak it was written against (a review found them after the fine-tune's
adapters came out different on a machine's first run, when the embedded model's conversion drew numbers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import randomize_adapters, tiny_llama, word_level_tokenizer

from moka import MoKAConfig, apply_moka, load_adapter, merge_moka, quantize_model, save_adapter


def _draws(call) -> bool:
    """Whether ``call()`` moves torch's default generator."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    call()
    return not torch.equal(torch.rand(4), expected)


def _patched(four_bit: bool = False):
    model = tiny_llama()
    if four_bit:
        quantize_model(model, progress=False)
    apply_moka(model, MoKAConfig(num_components=2, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(model)
    return model


def test_the_check_sees_a_draw():
    assert _draws(lambda: torch.nn.Linear(4, 4)) and not _draws(lambda: torch.zeros(4))


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense-base", "nf4-base"])
def test_merge_draws_nothing(four_bit):
    model = _patched(four_bit)
    assert not _draws(lambda: merge_moka(model))
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_decoding_4bit_layers_draws_nothing():
    from moka.merge import decode_4bit_layers

    model = tiny_llama()
    quantize_model(model, progress=False)
    assert not _draws(lambda: decode_4bit_layers(model, torch.float32))
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_load_adapter_into_an_unpatched_model_draws_nothing(tmp_path):
    saved = save_adapter(_patched(), tmp_path / "adapter")
    fresh = tiny_llama()
    assert not _draws(lambda: load_adapter(fresh, saved))
    assert torch.equal(
        fresh.model.layers[1].mlp.down_proj.b_factors[0], _patched().model.layers[1].mlp.down_proj.b_factors[0]
    )


def test_the_embedded_conversion_draws_nothing(tmp_path, monkeypatch):
    """The real conversion reads a 270 MB GGUF file; stand-ins give a tiny model and tokenizer instead (built
    before the check, so that only the conversion's own models could draw)."""
    import transformers

    import moka.embedded as embedded

    tiny, (tokenizer, _) = tiny_llama(), word_level_tokenizer(["a", "b"])
    monkeypatch.setattr(embedded, "_gguf_dir", lambda: tmp_path / "gguf")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    assert not _draws(lambda: embedded.embedded_model_dir(tmp_path / "cache"))
    assert (embedded.embedded_model_path(tmp_path / "cache") / "config.json").is_file()


def test_the_loss_plot_keeps_the_process_matplotlib_backend(tmp_path):
    import matplotlib

    from moka.finetune import plot_losses

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        plot_losses(SimpleNamespace(train=[(1, 2.0), (2, 1.0)], eval=[(2, 1.5)]), tmp_path / "loss.png", "t")
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    finally:
        matplotlib.use(before)


def test_exact_match_gives_every_submodule_its_own_mode_back():
    from moka.finetune import exact_match_accuracy

    tokenizer, vocab = word_level_tokenizer(["code", "for", "w1", "zorp"])
    tokenizer.chat_template = None
    model = tiny_llama(vocab=vocab).train()
    model.model.layers[0].eval()  # held in eval by the user, e.g. to freeze its dropout
    modes = {name: m.training for name, m in model.named_modules()}
    exact_match_accuracy(model, tokenizer, [{"instruction": "code for", "input": "w1", "output": "zorp"}], 2)
    assert {name: m.training for name, m in model.named_modules()} == modes
