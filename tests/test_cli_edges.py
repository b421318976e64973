"""Edge cases of the data pipeline, the output-dir ownership checks, resume and merge helpers that a mutation
review found no test pinned (each test fails on the mutant it was written against)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import word_level_tokenizer

WORDS = [f"w{i}" for i in range(40)]


def _tokenizer():
    tokenizer, _ = word_level_tokenizer(["code", "for", "the", "a", "b", "c", *WORDS, "zorp", "blick"])
    return tokenizer


def test_long_records_keep_their_start_and_an_exact_fit_is_not_cut():
    from moka.data import tokenize_records

    tokenizer = _tokenizer()
    tokenizer.chat_template = None
    with pytest.warns(UserWarning):
        cut = tokenize_records(tokenizer, [{"text": " ".join(WORDS[:30])}], 8)
    assert cut[0]["input_ids"] == tokenizer(" ".join(WORDS[:8]))["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 7 words + EOS = 8 tokens: no "were cut" warning
        assert len(tokenize_records(tokenizer, [{"text": " ".join(WORDS[:7])}], 8)[0]["input_ids"]) == 8


def test_a_chat_template_with_its_own_bos_trains_on_what_evaluation_feeds():
    """A tokenizer that adds BOS and a template that starts with it (Llama-3, Gemma): one BOS, not two."""
    from tokenizers import processors

    from moka.data import tokenize_records
    from moka.finetune import _encode_prompts

    tokenizer = _tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.chat_template = "<s>" + tokenizer.chat_template
    record = {"instruction": "code for", "input": "w1", "output": "zorp"}
    example = tokenize_records(tokenizer, [record], 64)[0]
    prompt = _encode_prompts(tokenizer, [record])["input_ids"][0]
    assert example["input_ids"][: len(prompt)] == prompt and example["input_ids"][:2] != [1, 1]


def test_a_jsonl_file_mixing_record_forms_is_refused(tmp_path):
    from moka.data import read_jsonl

    path = tmp_path / "mixed.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"text": "c"}\n')
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: mixes text records into a file of instruction"):
        read_jsonl(path)


def test_exact_match_ignores_a_final_period_before_a_newline():
    from moka.finetune import _normalize

    assert _normalize("Zorp.\n") == _normalize("zorp. ") == "zorp"


def test_prompts_are_left_padded_for_generation():
    """Batched greedy decoding starts where every prompt ends (right padding generated from pad positions)."""
    from moka.finetune import exact_match_accuracy

    tokenizer = _tokenizer()
    tokenizer.chat_template = None
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask=None, **kwargs):
            seen.append((input_ids, attention_mask))
            return torch.cat([input_ids, torch.full((len(input_ids), 1), 2)], 1)

    records = [
        {"instruction": "code for", "output": "zorp"},
        {"instruction": "code for", "input": " ".join(WORDS[:9]), "output": "zorp"},
    ]
    exact_match_accuracy(Spy(), tokenizer, records, 1)
    ids, mask = seen[0]
    assert mask[:, -1].all() and ids[:, -1].ne(tokenizer.pad_token_id).all()
    assert tokenizer.padding_side == "right"  # restored


def _checkpoint(root: Path, name: str, files: list[str]) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    for file in files:
        (directory / file).write_text("x")
    return directory


def test_checkpoints_with_weights_a_peft_adapter_or_a_subfolder_are_someone_elses(tmp_path):
    from moka.finetune import _is_moka_checkpoint

    assert not _is_moka_checkpoint(_checkpoint(tmp_path, "checkpoint-100", ["trainer_state.json", "model.safetensors"]))
    peft = _checkpoint(
        tmp_path, "checkpoint-200", ["adapter_config.json", "adapter_model.safetensors", "trainer_state.json"]
    )
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    assert not _is_moka_checkpoint(peft)
    nested = _checkpoint(tmp_path, "checkpoint-5", ["trainer_state.json"])
    (nested / "tokenizer_backup").mkdir()
    (nested / "tokenizer_backup" / "weights.bin").write_text("theirs")
    assert not _is_moka_checkpoint(nested)
    assert _is_moka_checkpoint(_checkpoint(tmp_path, "checkpoint-7", ["trainer_state.json", "moka_run.json"]))


def test_a_summary_needs_both_moka_keys_and_empty_or_linked_directories_are_replaceable(tmp_path):
    from moka.finetune import _is_moka_summary, refuse_replacing_unrelated

    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"trainable_parameters": 12, "accuracy": 0.9}))
    assert not _is_moka_summary(summary)
    (tmp_path / "empty").mkdir()
    refuse_replacing_unrelated(tmp_path / "empty", lambda d: False, "ours", "--output-dir")  # no error
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "x").write_text("theirs")
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    refuse_replacing_unrelated(tmp_path / "link", lambda d: False, "ours", "--output-dir")  # only the link goes


def test_a_summary_written_whole_keeps_the_old_one_when_the_disk_fills(tmp_path, monkeypatch):
    from moka import finetune

    path = tmp_path / "summary.json"
    path.write_text("old")
    real = Path.write_text

    def half(self, text, *args, **kwargs):
        real(self, text[:3], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(OSError):
        finetune._write_whole(path, "new summary")
    monkeypatch.undo()
    assert path.read_text() == "old"


def test_resume_picks_the_numerically_highest_step(tmp_path):
    from moka.finetune import _last_checkpoint

    for step in (9, 10):
        _checkpoint(tmp_path / "checkpoints", f"checkpoint-{step}", [])
        state = tmp_path / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json"
        state.write_text(json.dumps({"global_step": step}))
    path, state = _last_checkpoint(SimpleNamespace(resume=True, output_dir=tmp_path))
    assert Path(path).name == "checkpoint-10" and state["global_step"] == 10


def test_a_seed_past_32_bits_is_refused_naming_the_flag(tmp_path):
    from moka.finetune import CLIError, parse_args

    argv = ["--seed", str(2**32), "--output-dir", str(tmp_path / "o"), "--model", str(tmp_path), "--no-load-in-4bit"]
    with pytest.raises(CLIError, match="--seed"):
        parse_args(argv)


def test_an_fp16_checkpoint_merges_in_fp16_by_default(tmp_path):
    from moka.merge import checkpoint_dtype

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert checkpoint_dtype(str(tmp_path)) == torch.float16


@pytest.mark.parametrize("module", ["moka.finetune", "moka.merge"])
def test_help_prints_plain_text_not_rst_markup(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).parse_args(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "python -m " + module in printed and "``" not in printed


def test_a_resume_notes_a_base_bitsandbytes_quantized_on_another_kind_of_device(tmp_path, capsys):
    from moka.finetune import CLIError, _check_resume_conditions, quantized_elsewhere_note

    assert quantized_elsewhere_note("cuda", "cpu", "merge").startswith("note: bitsandbytes quantized")
    for recorded, here in (("cpu", "cpu"), (None, "cpu"), ("cuda", None), ("gpu?", "cpu")):
        assert quantized_elsewhere_note(recorded, here, "merge") is None
    conditions = {"model": "m", "load_in_4bit": True, "nf4_backend": "bitsandbytes", "nf4_quantized_on": "cpu"}
    (tmp_path / "moka_run.json").write_text(json.dumps({**conditions, "nf4_quantized_on": "cuda"}))
    _check_resume_conditions(str(tmp_path), conditions)
    assert "quantizes this resumed run's on cpu" in capsys.readouterr().out
    (tmp_path / "moka_run.json").write_text(json.dumps(conditions))
    _check_resume_conditions(str(tmp_path), conditions)
    assert capsys.readouterr().out == ""
    (tmp_path / "moka_run.json").write_text(json.dumps({**conditions, "model": "other"}))
    with pytest.raises(CLIError, match="--model 'other'"):
        _check_resume_conditions(str(tmp_path), conditions)
