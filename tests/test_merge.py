"""moka-merge: a saved adapter merged into its base and saved as a plain Hugging Face model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize_adapters, tiny_llama, word_level_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from moka import MoKAConfig, apply_moka, dequantize_nf4, load_adapter, save_adapter
from moka.finetune import EMBEDDED, load_model
from moka.merge import PROBE_TEXT, main, parse_args

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny LLaMA dir (hidden 128: every K a multiple of bitsandbytes' blocksize) and a random adapter on it."""
    directory = tmp_path_factory.mktemp("merge")
    tokenizer, vocab = word_level_tokenizer(["the", "quick", "brown", "fox", *[f"w{i}" for i in range(30)]])
    tiny_llama(hidden=128, vocab=vocab).save_pretrained(directory / "base")
    tokenizer.save_pretrained(directory / "base")
    model = AutoModelForCausalLM.from_pretrained(directory / "base")
    apply_moka(model, MoKAConfig(num_components=3, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapters(model, std=0.3)
    save_adapter(model, directory / "adapter")
    return directory / "base", directory / "adapter"


def _adapted_logits(base: Path, adapter: Path, four_bit: bool) -> torch.Tensor:
    model, _ = load_model(str(base), four_bit, torch.float32)
    load_adapter(model, adapter)
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("four_bit", [False, True], ids=["dense-base", "nf4-base"])
def test_merged_model_loads_plainly_and_computes_the_adapted_function(base_and_adapter, tmp_path, capsys, four_bit):
    if four_bit:
        pytest.importorskip("bitsandbytes")
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    argv = ["--model", str(base), "--adapter", str(adapter), "--output-dir", str(out), "--dtype", "fp32"]
    assert main([*argv, "--load-in-4bit" if four_bit else "--no-load-in-4bit"]) == 0
    printed = capsys.readouterr().out
    assert f"merged 6 MoKA layers into {out} (float32)" in printed and "probe logits" in printed
    assert "note: rounding" not in printed
    report = json.loads((out / "moka_merge.json").read_text())
    assert report["layers_merged"] == 6 and report["probe_max_abs_diff"] < 1e-4 * report["probe_logit_scale"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    umask = os.umask(0)
    os.umask(umask)
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}["model.safetensors"] == 0o666 & ~umask
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # a plain model: no moka, no bitsandbytes
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith("_proj"))
    assert AutoTokenizer.from_pretrained(out)(PROBE_TEXT)["input_ids"]
    with torch.no_grad():
        logits = merged(IDS).logits
    expected = _adapted_logits(base, adapter, four_bit)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    other = _adapted_logits(base, adapter, not four_bit)  # the other base differs: the test can tell them apart
    assert (logits - other).abs().max() > 1e-3


def test_a_checkpoint_saved_in_4bit_is_decoded_whatever_the_flag(base_and_adapter, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    base, adapter = base_and_adapter
    model, tokenizer = load_model(str(base), True, torch.float32)
    model.save_pretrained(tmp_path / "nf4")
    tokenizer.save_pretrained(tmp_path / "nf4")
    out = tmp_path / "merged"
    argv = ["--model", str(tmp_path / "nf4"), "--adapter", str(adapter), "--output-dir", str(out)]
    assert main([*argv, "--no-load-in-4bit"]) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out).eval()(IDS).logits
    torch.testing.assert_close(logits, _adapted_logits(base, adapter, True), rtol=1e-4, atol=1e-4)


def test_auto_dtype_is_the_checkpoints_and_overwrite_replaces_the_output(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "bf16")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("x")
    argv = ["--model", str(tmp_path / "bf16"), "--adapter", str(adapter), "--output-dir", str(out), "--overwrite"]
    assert main(argv) == 2  # not an earlier merge: --overwrite deleted whatever directory it named (even ~)
    assert "is not an earlier moka-merge output" in capsys.readouterr().err and (out / "old.txt").read_text() == "x"
    (out / "moka_merge.json").write_text("{}")  # an earlier merge's output is replaced whole
    assert main(argv) == 0
    assert "(bfloat16)" in capsys.readouterr().out and not (out / "old.txt").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert not list(tmp_path.glob(".merged.*"))  # neither the temp dir nor the old one is left
    assert main([*argv, "--dtype", "fp32"]) == 0  # an explicit --dtype wins over the checkpoint's
    assert AutoModelForCausalLM.from_pretrained(out).model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert json.loads((out / "moka_merge.json").read_text())["dtype"] == "float32"


def test_merge_bad_input_is_one_line_and_writes_nothing(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    out = tmp_path / "merged"

    def fails(argv, pattern):
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moka-merge:")]
        assert len(err) == 1 and pattern in err[0], err

    common = ["--model", str(base), "--output-dir", str(out), "--no-load-in-4bit"]
    fails([*common, "--adapter", str(tmp_path / "nowhere")], "--adapter: expected a MoKA adapter dir")
    assert not out.exists()
    fails(["--model", str(tmp_path), "--adapter", str(adapter), "--output-dir", str(out)], "--model:")
    assert not out.exists()
    other = tmp_path / "other"  # an adapter saved from a model of another shape
    model = tiny_llama(hidden=64)
    apply_moka(model, MoKAConfig(num_components=2))
    save_adapter(model, other)
    fails([*common, "--adapter", str(other)], "--adapter: adapter")
    assert not out.exists() and not list(tmp_path.glob(".merged.*"))
    out.mkdir()
    (out / "keep.txt").write_text("x")
    fails([*common, "--adapter", str(adapter)], "--output-dir: ")
    assert (out / "keep.txt").read_text() == "x"
    # --overwrite replaces only an earlier merge's output: it deleted any directory named (~, a project)
    fails([*common, "--adapter", str(adapter), "--overwrite"], "is not an earlier moka-merge output")
    assert (out / "keep.txt").read_text() == "x"
    # --overwrite never deletes an input: an output dir that is, or holds, the adapter or the base
    for target in (adapter, adapter.parent, base):
        fails([*common, "--adapter", str(adapter), "--output-dir", str(target), "--overwrite"], "holds the --")
    assert (adapter / "moka_adapter_config.json").is_file() and (base / "config.json").is_file()
    with pytest.MonkeyPatch.context() as patch:  # "~" as a shell leaves it in --model=~/base: still the base
        patch.setenv("HOME", str(base.parent))
        tilde = ["--model=~/base", "--adapter", str(adapter), "--no-load-in-4bit", "--overwrite"]
        fails([*tilde, "--output-dir", str(base)], "holds the --model")
        fails([*tilde, "--output-dir=~/base"], "holds the --model")
        cache = tmp_path / "cache"  # the embedded default's converted base (or the cache holding it)
        patch.setenv("MOKA_CACHE", str(cache))
        unnamed = shutil.copytree(adapter, tmp_path / "unnamed")  # its base built in code: the embedded default
        config = json.loads((unnamed / "moka_adapter_config.json").read_text())
        (unnamed / "moka_adapter_config.json").write_text(json.dumps({**config, "base_model": ""}))
        embedded = ["--adapter", str(unnamed), "--no-load-in-4bit", "--overwrite"]
        for target in (cache, cache / "SmolLM2-135M-Instruct-bf16"):
            fails([*embedded, "--output-dir", str(target)], "holds the --model")
        patch.chdir(out)  # the current directory, or one that holds it
        for target in (".", ".."):
            fails([*common, "--adapter", str(adapter), "--output-dir", target, "--overwrite"], "holds the current")
    assert (base / "config.json").is_file() and (out / "keep.txt").is_file()
    (tmp_path / "file").write_text("x")
    fails([*common, "--adapter", str(adapter), "--output-dir", str(tmp_path / "file" / "m")], "lies under the file")
    read_only = tmp_path / "read_only"  # refused before the model is loaded, not when writing it
    read_only.mkdir()
    with pytest.MonkeyPatch.context() as patch:  # as on a read-only mount (root passes permission bits)
        patch.setattr(os, "access", lambda path, mode: Path(path) != read_only)
        target = read_only / "m"
        fails([*common, "--adapter", str(adapter), "--output-dir", str(target)], f"'{target}' cannot be written")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    fails(
        ["--model", str(tmp_path / "broken"), "--adapter", str(adapter), "--output-dir", str(tmp_path / "new")],
        "--model: ",
    )


def test_merge_takes_the_fine_tunes_recorded_base(base_and_adapter, tmp_path, capsys):
    """An adapter dir with the fine-tune's moka_run.json (4-bit by moka, computing in bf16): by default the merge
    quantizes W0 from the weights in bf16, as that fine-tune loaded them, whatever the output --dtype is."""

    base, adapter = base_and_adapter
    recorded = tmp_path / "adapter"
    shutil.copytree(adapter, recorded)
    record = {"model": str(tmp_path / "elsewhere"), "load_in_4bit": True, "nf4_backend": "moka", "dtype": "bf16"}
    (recorded / "moka_run.json").write_text(json.dumps(record))
    out = tmp_path / "merged"
    assert main(["--model", str(base), "--adapter", str(recorded), "--output-dir", str(out), "--dtype", "fp32"]) == 0
    assert "note: the adapter was trained on" in capsys.readouterr().out  # another --model than recorded
    report = json.loads((out / "moka_merge.json").read_text())
    assert (report["nf4_backend"], report["base_dtype"], report["dtype"]) == ("moka", "bfloat16", "float32")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32
    trained_base, _ = load_model(str(base), True, torch.bfloat16, "moka")
    fp32_base, _ = load_model(str(base), True, torch.float32, "moka")
    name = "model.layers.0.self_attn.k_proj"  # no adapter there: W0 alone
    ours = merged.get_submodule(name).weight
    assert torch.equal(ours, dequantize_nf4(trained_base.get_submodule(name).nf4_weight, torch.float32))
    assert not torch.equal(ours, dequantize_nf4(fp32_base.get_submodule(name).nf4_weight, torch.float32))
    # without --model, the recorded base: here a path that no longer holds a model, refused naming the flag
    assert main(["--adapter", str(recorded), "--output-dir", str(tmp_path / "m2")]) == 2
    assert "--model: not given, and the base the adapter's moka_run.json records" in capsys.readouterr().err
    record["model"] = str(base)
    (recorded / "moka_run.json").write_text(json.dumps(record))
    assert main(["--adapter", str(recorded), "--output-dir", str(tmp_path / "m3"), "--dtype", "fp32"]) == 0
    assert "note: the adapter was trained on" not in capsys.readouterr().out
    assert json.loads((tmp_path / "m3" / "moka_merge.json").read_text())["base_model"] == str(base)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "m3").get_submodule(name).weight, ours)
    # a flag against the record is done as given, and noted (the probe cannot tell: it uses the same base)
    assert main(["--adapter", str(recorded), "--output-dir", str(tmp_path / "m4"), "--no-load-in-4bit"]) == 0
    printed = capsys.readouterr().out
    assert "note: merged with --no-load-in-4bit (recorded: load_in_4bit True) as given" in printed
    assert json.loads((tmp_path / "m4" / "moka_merge.json").read_text())["nf4_backend"] is None
    assert (
        main(["--adapter", str(recorded), "--output-dir", str(tmp_path / "m5"), "--nf4-backend", "bitsandbytes"]) == 0
    )
    assert "note: merged with --nf4-backend bitsandbytes (bitsandbytes) (recorded: nf4_backend 'moka')" in (
        capsys.readouterr().out
    )
    args = parse_args(["--adapter", str(recorded), "--output-dir", str(tmp_path / "m7"), "--nf4-backend", "auto"])
    assert args.overridden == ["--nf4-backend auto (bitsandbytes) (recorded: nf4_backend 'moka')"]  # resolved first
    record["load_in_4bit"] = False
    (recorded / "moka_run.json").write_text(json.dumps(record))
    assert main(["--adapter", str(recorded), "--output-dir", str(tmp_path / "m6"), "--nf4-backend", "moka"]) == 2
    assert "--nf4-backend: only used with a 4-bit base" in capsys.readouterr().err


def test_an_adapter_from_save_adapter_merges_onto_the_base_its_config_names(base_and_adapter, tmp_path, capsys):
    """No moka_run.json (saved from Python): the base is the model dir moka_adapter_config.json records, not the
    embedded model; a recorded base that is not here, or one the adapter does not fit, names --model."""

    base, adapter = base_and_adapter
    assert json.loads((adapter / "moka_adapter_config.json").read_text())["base_model"] == str(base)
    assert parse_args(["--adapter", str(adapter), "--output-dir", str(tmp_path / "m")]).model == str(base)
    assert main(["--adapter", str(adapter), "--output-dir", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    assert "note: the adapter dir has no moka_run.json" in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "moka_merge.json").read_text())["base_model"] == str(base)
    # an earlier merge's output is replaced only with --overwrite
    assert main(["--adapter", str(adapter), "--output-dir", str(tmp_path / "m")]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err

    def with_base(directory: Path, recorded) -> Path:
        config = json.loads((directory / "moka_adapter_config.json").read_text())
        (directory / "moka_adapter_config.json").write_text(json.dumps({**config, "base_model": recorded}))
        return directory

    moved = with_base(shutil.copytree(adapter, tmp_path / "moved"), str(tmp_path / "gone"))
    assert main(["--adapter", str(moved), "--output-dir", str(tmp_path / "m2")]) == 2
    assert "--model: not given, and the base the adapter's moka_adapter_config.json records" in capsys.readouterr().err
    assert parse_args(["--adapter", str(with_base(moved, "")), "--output-dir", str(tmp_path / "m2")]).model == EMBEDDED
    model = tiny_llama(hidden=64)  # another shape, recorded as trained on base
    apply_moka(model, MoKAConfig(num_components=2))
    other = with_base(save_adapter(model, tmp_path / "other"), str(base))
    assert main(["--adapter", str(other), "--output-dir", str(tmp_path / "m3")]) == 2
    assert f"--adapter: on {str(base)!r}, the default base (pass --model): adapter" in capsys.readouterr().err
    assert main(["--model", str(base), "--adapter", str(other), "--output-dir", str(tmp_path / "m3")]) == 2
    assert "pass --model" not in capsys.readouterr().err  # given: the adapter is the one that does not fit
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


def test_a_merge_notes_a_base_bitsandbytes_quantized_on_another_kind_of_device(base_and_adapter, tmp_path, capsys):
    """Trained on a base bitsandbytes quantized on a GPU, merged here on the CPU (its CPU kernel picks other
    scale codes for a few blocks): noted, and recorded; not noted for moka's backend or a matching device."""
    pytest.importorskip("bitsandbytes")
    base, adapter = base_and_adapter
    recorded = shutil.copytree(adapter, tmp_path / "adapter")
    record = {"model": str(base), "load_in_4bit": True, "nf4_backend": "bitsandbytes", "nf4_quantized_on": "cuda"}
    (recorded / "moka_run.json").write_text(json.dumps(record))
    assert main(["--adapter", str(recorded), "--output-dir", str(tmp_path / "m"), "--no-check"]) == 0
    printed = capsys.readouterr().out
    assert "note: bitsandbytes quantized the adapter's base on cuda and quantizes this merge's on cpu" in printed
    report = json.loads((tmp_path / "m" / "moka_merge.json").read_text())
    assert report["nf4_quantized_on"] == "cpu" and "quantizes this merge's on cpu" in report["quantized_elsewhere"]
    argv = ["--adapter", str(recorded), "--output-dir", str(tmp_path / "m2"), "--no-check", "--nf4-backend", "moka"]
    assert main(argv) == 0
    assert "quantized the adapter's base" not in capsys.readouterr().out
    assert json.loads((tmp_path / "m2" / "moka_merge.json").read_text())["nf4_quantized_on"] is None
    (recorded / "moka_run.json").write_text(json.dumps({**record, "nf4_quantized_on": "cpu"}))
    assert parse_args(["--adapter", str(recorded), "--output-dir", str(tmp_path / "m3")]).quantized_elsewhere is None


def test_save_adapter_records_a_relative_base_dir_absolute(base_and_adapter, tmp_path, monkeypatch):
    """A base loaded by a path relative to the current directory is recorded absolute, so the merge finds it
    from anywhere; a hub-style name that is no directory here is recorded as it is."""
    base, _ = base_and_adapter
    monkeypatch.chdir(base.parent)
    model = AutoModelForCausalLM.from_pretrained("base")
    apply_moka(model, MoKAConfig(num_components=2, target_modules=["q_proj"]))
    saved = save_adapter(model, tmp_path / "relative")
    assert json.loads((saved / "moka_adapter_config.json").read_text())["base_model"] == str(base.absolute())
    monkeypatch.chdir(tmp_path)
    assert parse_args(["--adapter", str(saved), "--output-dir", str(tmp_path / "m")]).model == str(base.absolute())
    model.config._name_or_path = "org/not-here"
    saved = save_adapter(model, tmp_path / "hub")
    assert json.loads((saved / "moka_adapter_config.json").read_text())["base_model"] == "org/not-here"


def test_load_in_4bit_without_bitsandbytes_merges_the_same_nf4_base(base_and_adapter, tmp_path, capsys, monkeypatch):
    """moka quantizes the base itself: the same NF4 bytes as bitsandbytes', so the same merged model."""
    pytest.importorskip("bitsandbytes")  # for the reference
    import importlib.util

    base, adapter = base_and_adapter
    expected = _adapted_logits(base, adapter, True)  # through bitsandbytes
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else find_spec(n, *a))
    out = tmp_path / "m"
    argv = ["--model", str(base), "--adapter", str(adapter), "--output-dir", str(out), "--load-in-4bit"]
    assert main([*argv, "--dtype", "fp32"]) == 0
    assert json.loads((out / "moka_merge.json").read_text())["nf4_backend"] == "moka"
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out).eval()(IDS).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_cli_entry_runs_as_a_module(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    argv = ["--model", str(base), "--adapter", str(adapter), "--output-dir", str(tmp_path / "m"), "--no-check"]
    done = subprocess.run(
        [sys.executable, "-m", "moka.merge", *argv],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "merged 6 MoKA layers" in done.stdout and "probe" not in done.stdout
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_summary_warns_when_the_merge_dtype_rounds_the_adapter_away(capsys):
    from moka.merge import print_summary

    result = {"layers_merged": 3, "output_dir": "m", "probe_logit_scale": 30.0}
    print_summary({**result, "dtype": "bfloat16", "probe_max_abs_diff": 1.5})
    assert "note: rounding W0 + ΔW to bfloat16" in capsys.readouterr().out
    for dtype, diff in [("bfloat16", 0.2), ("float32", 1.5)]:
        print_summary({**result, "dtype": dtype, "probe_max_abs_diff": diff})
        assert "note:" not in capsys.readouterr().out


def test_a_failed_overwrite_puts_the_old_output_back(base_and_adapter, tmp_path, monkeypatch, capsys):
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("x")
    (out / "moka_merge.json").write_text("{}")
    real_rename = Path.rename

    def rename(self, target):  # the new dir's rename into place fails, after the old one moved aside
        if Path(target) == out and self.name.startswith(".merged.") and not self.name.endswith(".old"):
            raise OSError("disk full")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    argv = ["--model", str(base), "--adapter", str(adapter), "--output-dir", str(out), "--overwrite", "--no-check"]
    assert main(argv) == 2  # one line on stderr, as for bad input
    assert capsys.readouterr().err.splitlines()[-1] == "moka-merge: error: disk full"
    assert (out / "old.txt").read_text() == "x" and not list(tmp_path.glob(".merged.*"))


@pytest.mark.parametrize("targets", ["all", "some"])
def test_merge_moka_on_a_4bit_loaded_model_saves_a_model_that_reloads(base_and_adapter, tmp_path, targets):
    """merge_moka (the library call) on a model transformers loaded in 4-bit: merged dense everywhere, the
    quantization config is dropped and the reload is the plain model; merged in part, the merged layers are
    listed as skipped modules, so the reload builds them dense (not Linear4bit around dense weights)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from moka import merge_moka

    base, _ = base_and_adapter
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization, device_map="cpu").eval()
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    apply_moka(model, MoKAConfig(num_components=2, target_modules=names if targets == "all" else ["q_proj"]))
    randomize_adapters(model, std=0.3)
    merge_moka(model)
    model.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu").eval()
    merged_q = reloaded.model.layers[1].self_attn.q_proj
    assert type(merged_q) is torch.nn.Linear
    torch.testing.assert_close(merged_q.weight, model.model.layers[1].self_attn.q_proj.weight, rtol=0, atol=0)
    if targets == "all":
        assert "quantization_config" not in config and not getattr(model, "is_loaded_in_4bit", False)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    else:
        assert "model.layers.1.self_attn.q_proj" in config["quantization_config"]["llm_int8_skip_modules"]
        assert "lm_head" in config["quantization_config"]["llm_int8_skip_modules"]  # transformers' own skip kept
        assert type(reloaded.model.layers[1].self_attn.k_proj).__name__ == "Linear4bit"
        assert type(reloaded.lm_head) is torch.nn.Linear


def test_overwriting_a_symlinked_output_leaves_no_hidden_leftovers(base_and_adapter, tmp_path, capsys):
    """--overwrite of an --output-dir that is a symlink: the link is replaced by the merged model, what it
    named is kept, and no hidden .NAME.*.old entry stays beside it (rmtree refuses links, and said nothing)."""
    base, adapter = base_and_adapter
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    out = tmp_path / "merged"
    out.symlink_to(target, target_is_directory=True)
    argv = ["--model", str(base), "--adapter", str(adapter), "--output-dir", str(out), "--overwrite", "--no-check"]
    assert main(argv) == 0
    assert not out.is_symlink() and (out / "config.json").is_file()
    assert (target / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "merged"]


def test_merge_moka_keeps_another_quantizers_config(base_and_adapter, tmp_path):
    """On an 8-bit model (adapter on its dense lm_head) the merge leaves the 8-bit layers and the config that
    describes them: dropped, the reload read the int8 bytes as plain weights."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from moka import merge_moka

    base, _ = base_and_adapter
    quantization = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization, device_map="cpu").eval()
    apply_moka(model, MoKAConfig(num_components=2, target_modules=["lm_head"]))
    randomize_adapters(model, std=0.3)
    merge_moka(model)
    assert getattr(model.config, "quantization_config", None) is not None and model.is_loaded_in_8bit
    model.save_pretrained(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu").eval()
    assert type(reloaded.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_decoding_4bit_layers_keeps_their_bias():
    """moka-merge --load-in-4bit decodes every 4-bit layer: a biased one kept nn.Linear's random bias."""
    from torch import nn

    from moka import NF4Linear, quantize_nf4
    from moka.merge import decode_4bit_layers

    torch.manual_seed(0)
    model = nn.Sequential(NF4Linear(quantize_nf4(torch.randn(8, 64)), torch.randn(8)))
    x = torch.randn(2, 64)
    before = model(x)
    assert decode_4bit_layers(model, torch.float32) == 1 and type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), before)
