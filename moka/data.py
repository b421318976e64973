"""JSONL data for fine-tuning: reading with line-numbered errors, prompt formatting, tokenization, collation.

Two record forms, one per file:

* instruction form ``{"instruction": ..., "input": ... (optional), "output": ...}`` (the Alpaca convention);
  the loss is on the response only;
* plain LM form ``{"text": ...}``; the loss is on every token.

Prompts use the tokenizer's chat template when it has one, else the Alpaca template.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DataCollator", "format_prompt", "read_jsonl", "record_form", "tokenize_records"]

IGNORE_INDEX = -100
ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response that completes the request.\n\n"


def record_form(record: dict) -> str:
    """``"instruction"`` (has instruction and output), ``"text"`` (has text), else ``"unknown"``.

    Other keys (an ``id``, or the ``text`` column some Alpaca exports add beside instruction/output) are
    ignored.
    """
    if "instruction" in record and "output" in record:
        return "instruction"
    if "text" in record:
        return "text"
    return "unknown"


FORM_FIELDS = {"instruction": ("instruction", "input", "output"), "text": ("text",)}


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file, or of a JSON array of records (as Alpaca's ``alpaca_data.json`` is); raises
    ValueError naming the file and line (the item, in an array) for anything malformed.

    UTF-8, with or without a byte-order mark. Each record keeps only the fields of its form.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: a directory, not a data file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if _first_character(path) == "[":
        return _read_json_array(path)
    records: list[dict] = []
    form = None
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
            record, form = _checked_record(record, f"{path}:{lineno}", form)
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records (the file is empty)")
    return records


def _first_character(path: Path) -> str:
    """The file's first character that is not whitespace (after a byte-order mark); "" if none."""
    with path.open("rb") as f:
        start = f.read(3)
        if start != b"\xef\xbb\xbf":
            f.seek(0)
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return chr(stripped[0])
    return ""


def _read_json_array(path: Path) -> list[dict]:
    data = path.read_bytes()
    bom = len(b"\xef\xbb\xbf") if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start
        lineno = data.count(b"\n", 0, offset) + 1
        raise ValueError(f"{path}:{lineno}: not UTF-8 ({err.reason} at byte {offset})") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON array of records or JSON lines, got {type(items).__name__}")
    records: list[dict] = []
    form = None
    for index, item in enumerate(items, start=1):
        record, form = _checked_record(item, f"{path}: item {index}", form)
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records (an empty array)")
    return records


def _checked_record(record: object, where: str, form: str | None) -> tuple[dict, str]:
    """One record with only its form's fields, and its form; ValueError naming ``where`` if malformed or of
    another form than the file's ``form`` so far."""
    this_form = record_form(record) if isinstance(record, dict) else "unknown"
    if this_form == "unknown":
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{where}: expected an object with keys instruction/output (optional input) or text, got {got}"
        )
    record = {k: record[k] for k in FORM_FIELDS[this_form] if k in record}
    if not all(isinstance(v, str) for v in record.values()):
        raise ValueError(f"{where}: expected string values for {sorted(record)}")
    for key, value in record.items():
        try:  # a lone surrogate escape ("\ud800") decodes from ASCII but is no text a tokenizer takes
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{where}: {key!r} holds an unpaired surrogate escape at character {err.start}") from None
    if form is not None and this_form != form:
        raise ValueError(f"{where}: mixes {this_form} records into a file of {form} records")
    return record, this_form


def format_prompt(tokenizer, instruction: str, input_text: str = "") -> str:
    """The prompt up to where the response starts."""
    user = instruction if not input_text else f"{instruction}\n\n{input_text}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    if input_text:
        return f"{ALPACA_PROMPT}### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"{ALPACA_PROMPT}### Instruction:\n{instruction}\n\n### Response:\n"


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def tokenize_records(
    tokenizer, records: list[dict], max_length: int, source: str = "data"
) -> list[dict[str, list[int]]]:
    """input_ids and labels per record; instruction prompts get label IGNORE_INDEX (response-only loss).

    Records longer than ``max_length`` tokens are cut at the end (a warning counts them); a record left
    with no token to predict (the first token never is one) is dropped, with a warning; if none is left, a
    ValueError names ``source``.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    truncated = dropped_empty = 0
    for record in records:
        if record_form(record) == "text":
            ids = _ids(tokenizer, record["text"], special=True) + eos
            labels = list(ids)
        else:
            prompt = format_prompt(tokenizer, record["instruction"], record.get("input", ""))
            prompt_ids = _ids(tokenizer, prompt, special=not has_template)
            response_ids = _ids(tokenizer, record["output"], special=False) + eos
            ids = prompt_ids + response_ids
            labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        truncated += len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE_INDEX for label in labels[1:]):  # labels[0] has no previous token to predict it
            out.append({"input_ids": ids, "labels": labels})
        else:
            dropped_empty += not "".join(record.values()).strip()
    dropped = len(records) - len(out)
    if not out:
        raise ValueError(
            f"{source}: no record has a token to predict within max_length={max_length} tokens (responses cut "
            "away, or empty); raise --max-length or check the data"
        )
    if truncated or dropped:
        empty = f" ({dropped_empty} of them empty)" if dropped_empty else ""
        warnings.warn(
            f"{source}: {truncated} of {len(records)} records were cut to max_length={max_length} tokens and "
            f"{dropped} were dropped with nothing left to predict{empty}; raise --max-length to keep the others "
            "whole",
            stacklevel=2,
        )
    return out


@dataclass
class DataCollator:
    """Right-pads a batch: pad token in input_ids, IGNORE_INDEX in labels, 0 in attention_mask."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            pad = length - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(f["labels"] + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
