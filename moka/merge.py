"""Merge a saved MoKA adapter into its base model and save a plain Hugging Face model: ``python -m moka.merge``
or ``moka-merge``.

Each adapted projection becomes an ``nn.Linear`` holding W0 + s·Σᵢ αᵢ (Aᵢ ⊗ Bᵢ), so the output loads with a
plain ``from_pretrained`` anywhere (inference servers, GGUF converters), with no moka installed. The base
model and 4-bit default to what the fine-tune recorded in the adapter dir's ``moka_run.json`` (for an adapter
from ``save_adapter``: the model directory its ``moka_adapter_config.json`` names). With
``--load-in-4bit`` W0 is the NF4-decoded base the adapter was trained against, and every other 4-bit layer
is decoded too; without it, W0 is the
checkpoint's full-precision weight (as PEFT's ``merge_and_unload`` on a bf16 base). Before saving, the
merged model's logits on a probe text are compared with the adapted model's (``--no-check`` skips it).

Examples::

    python -m moka.merge                                    # moka-output/adapter onto the model it was trained on
    python -m moka.merge --model ./llama-dir --adapter run/adapter --output-dir merged --load-in-4bit
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from moka_kernels import dequantize_nf4

from .bnb_compat import forget_4bit_loading, is_linear4bit, nf4_from_linear4bit
from .embedded import embedded_model_path
from .finetune import (
    EMBEDDED,
    NF4_BACKENDS,
    RUN_CONDITIONS_NAME,
    ArgumentParser,
    CLIError,
    _read_json,
    bitsandbytes_quantizes_on,
    canonical_location,
    directory_written_whole,
    load_model,
    one_line,
    quantized_elsewhere_note,
    refuse_replacing_unrelated,
    refuse_unwritable,
    resolve_model_path,
    resolve_nf4_backend,
    user_path,
)
from .layer import NF4Linear, frozen_linear
from .model import ADAPTER_CONFIG_NAME, _parent_and_attr, load_adapter, merge_moka, read_adapter_config

__all__ = ["decode_4bit_layers", "main", "merge", "parse_args"]

MERGE_RECORD_NAME = "moka_merge.json"  # what this CLI wrote: --overwrite replaces only such a directory


def _is_merge_output(directory: Path) -> bool:
    return (directory / MERGE_RECORD_NAME).is_file()


PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 1, 2, 3, 4, 5"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    # The module docstring's first paragraph, without its RST markup (argparse prints it as it is).
    p = ArgumentParser(prog="moka-merge", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument(
        "--model",
        help="the base model: local dir, hub id, or the embedded SmolLM2 (default: the one the fine-tune recorded "
        "in the adapter dir's moka_run.json; without one, the model dir moka_adapter_config.json names, else the "
        "embedded SmolLM2)",
    )
    p.add_argument("--adapter", type=user_path, default=Path("moka-output/adapter"), help="a save_adapter directory")
    p.add_argument(
        "--output-dir", type=user_path, default=Path("moka-output/merged"), help="where the merged model is written"
    )
    p.add_argument(
        "--load-in-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="merge into the NF4-decoded base the adapter was trained on (default: what the fine-tune recorded "
        "in the adapter dir's moka_run.json; without one, on for the embedded model)",
    )
    p.add_argument(
        "--nf4-backend",
        choices=["auto", *NF4_BACKENDS],
        default=None,
        help="who quantizes the 4-bit base (default: what the fine-tune recorded in moka_run.json; without "
        "one, auto = bitsandbytes when installed)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="dtype of the merged weights; auto = a local checkpoint's (fp32 if it does not say, or for a hub id)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output-dir")
    p.add_argument("--no-check", action="store_true", help="skip the logits comparison on a probe text")
    return p


def read_run_record(adapter_dir: Path) -> dict:
    """What the fine-tune trained the adapter on (``moka_run.json``: model, 4-bit, NF4 backend, dtype, ...);
    empty for an adapter saved another way."""
    path = adapter_dir / RUN_CONDITIONS_NAME
    if not path.is_file():
        return {}
    record = _read_json(path, "--adapter")
    if not isinstance(record, dict):
        raise CLIError(f"--adapter: {str(path)!r} is not a JSON object")
    return record


def _recorded_model(record: dict, adapter_config: dict) -> str:
    """The base the fine-tune recorded (an absolute path, a hub id or the embedded name). Without a run record
    (an adapter from ``save_adapter``): the model directory ``moka_adapter_config.json`` names as its base if
    there is one here, else the embedded model when it names none."""
    if not record:
        base = adapter_config.get("base_model")
        if not isinstance(base, str) or not base:  # a model built in code records ""
            return EMBEDDED
        if not (Path(base).expanduser() / "config.json").is_file():
            raise CLIError(
                f"--model: not given, and the base the adapter's {ADAPTER_CONFIG_NAME} records, {base!r}, is not a "
                "model directory here; pass --model"
            )
        return str(Path(base).expanduser().absolute())
    model = record.get("model", EMBEDDED)
    if not isinstance(model, str) or not model:
        raise CLIError(f"--adapter: its {RUN_CONDITIONS_NAME} records the model as {model!r}; pass --model")
    if Path(model).is_absolute() and not (Path(model) / "config.json").is_file():  # moved, or another machine's
        raise CLIError(
            f"--model: not given, and the base the adapter's {RUN_CONDITIONS_NAME} records, {model!r}, is not a "
            "model directory here; pass --model"
        )
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The merge's flags (``argv``, default ``sys.argv[1:]``), checked; a bad one raises ``CLIError``."""
    args = build_parser().parse_args(argv)
    try:
        adapter_config = read_adapter_config(args.adapter)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(f"--adapter: {str(err).removeprefix('directory: ')}") from None
    args.record = read_run_record(args.adapter)
    args.model_given = args.model is not None
    if args.model is None:
        args.model = _recorded_model(args.record, adapter_config)
    given_4bit, given_backend = args.load_in_4bit, args.nf4_backend
    if args.load_in_4bit is None:
        args.load_in_4bit = bool(args.record.get("load_in_4bit", args.model == EMBEDDED))
    if args.nf4_backend is not None and not args.load_in_4bit:
        raise CLIError(f"--nf4-backend: only used with a 4-bit base (--load-in-4bit), got {args.nf4_backend}")
    if args.nf4_backend is None:
        args.nf4_backend = args.record.get("nf4_backend") or "auto"
    if args.load_in_4bit:
        args.nf4_backend = resolve_nf4_backend(args.nf4_backend)
    # flags given against what the fine-tune recorded: done as asked, and noted (the probe compares the merge
    # with the adapter on the same base, so it cannot tell a base the adapter was not trained on)
    given = {
        "load_in_4bit": None if given_4bit is None else f"--{'' if given_4bit else 'no-'}load-in-4bit",
        "nf4_backend": None if given_backend is None else f"--nf4-backend {given_backend} ({args.nf4_backend})",
    }
    args.overridden = [
        f"{flag} (recorded: {key} {args.record[key]!r})"
        for key, flag in given.items()
        if flag is not None and args.record.get(key) not in (None, getattr(args, key))
    ]
    args.nf4_quantized_on = bitsandbytes_quantizes_on(args.load_in_4bit, args.nf4_backend)
    args.quantized_elsewhere = quantized_elsewhere_note(
        args.record.get("nf4_quantized_on"), args.nf4_quantized_on, "merge"
    )
    out = args.output_dir
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir: expected a directory, got the file {str(out)!r}")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CLIError(f"--output-dir: {str(out)!r} lies under the file {str(parent)!r}")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"--output-dir: {str(out)!r} exists and is not empty; pass --overwrite to replace it")
    refuse_unwritable(out.absolute().parent, out, "--output-dir")  # written into a temp dir beside it, then renamed
    model_path = embedded_model_path() if args.model == EMBEDDED else Path(args.model).expanduser()
    inputs = [("the --adapter", args.adapter), ("the current", Path.cwd())]
    inputs += [("the --model", model_path)] if model_path.exists() or args.model == EMBEDDED else []
    for what, path in inputs:
        if out.resolve() == path.resolve() or out.resolve() in path.resolve().parents:
            raise CLIError(f"--output-dir: {str(out)!r} holds {what} directory; choose another")
    earlier_merge = f"an earlier moka-merge output (one holding {MERGE_RECORD_NAME})"
    refuse_replacing_unrelated(out, _is_merge_output, earlier_merge, "--output-dir")
    return args


def checkpoint_dtype(model_dir: str) -> torch.dtype:
    """The dtype a model directory's config.json names (``dtype`` or ``torch_dtype``); fp32 if none."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except ValueError as err:
        raise CLIError(f"--model: {model_dir}/config.json is not valid JSON ({err})") from None
    name = config.get("dtype") or config.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


@torch.no_grad()
def decode_4bit_layers(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every 4-bit layer (bitsandbytes NF4 ``Linear4bit``, moka ``NF4Linear``) by an ``nn.Linear``
    holding its decoded weight (moka's decode: bit-exact to bitsandbytes' on every shape, where its CPU kernel
    is not) and drop the model's quantization config, so ``save_pretrained`` writes a plain model. Returns the
    number of layers decoded."""
    layers = {name: m for name, m in model.named_modules() if is_linear4bit(m) or isinstance(m, NF4Linear)}
    for name, m in layers.items():
        nf4 = m.nf4_weight if isinstance(m, NF4Linear) else nf4_from_linear4bit(m)
        weight = dequantize_nf4(nf4, dtype)
        dense = frozen_linear(weight, m.bias)
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, dense)
    forget_4bit_loading(model)
    return len(layers)


def _probe_logits(model, tokenizer) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        return model(ids).logits.float()


def merge(args: argparse.Namespace) -> dict:
    """The whole job; returns what it prints (layers merged, dtype, the probe's logits difference)."""
    model_dir = resolve_model_path(args.model)
    local = Path(model_dir).is_dir()
    dtype = DTYPES.get(args.dtype) or (checkpoint_dtype(model_dir) if local else torch.float32)
    record = getattr(args, "record", {})
    # A 4-bit W0 is quantized from the weights as the fine-tune loaded them (its dtype: fp32 weights rounded to
    # bf16 first quantize to other NF4 bytes), by the backend it used (on a CPU bitsandbytes' kernel picks a
    # neighbouring scale code for 0.1–0.25% of blocks where moka takes the nearest).
    base_dtype = DTYPES.get(record.get("dtype"), dtype) if args.load_in_4bit else dtype
    model, tokenizer = load_model(model_dir, args.load_in_4bit, base_dtype, args.nf4_backend)
    # Every 4-bit layer decoded to dtype: the base the adapter was trained on, dense. (A checkpoint saved in
    # 4-bit loads quantized whatever --load-in-4bit says.)
    decode_4bit_layers(model, dtype)
    model.to(dtype)
    try:
        summary = load_adapter(model, args.adapter)
    except (ValueError, SafetensorError) as err:
        # the base was a default: say which, since the usual cause is another base than the adapter's
        # first: one_line cuts a long mismatch list
        base = "" if getattr(args, "model_given", True) else f"on {args.model!r}, the default base (pass --model): "
        raise CLIError(f"--adapter: {base}{str(err).removeprefix('directory: ')}") from None
    model.eval()
    adapted = None if args.no_check else _probe_logits(model, tokenizer)
    merge_moka(model, dtype=dtype)
    result: dict = {
        "layers_merged": summary.layers_patched,
        "dtype": str(dtype).removeprefix("torch."),
        "nf4_backend": args.nf4_backend if args.load_in_4bit else None,
        "nf4_quantized_on": getattr(args, "nf4_quantized_on", None),
        "base_dtype": str(base_dtype).removeprefix("torch."),
    }
    if record.get("model") not in (None, canonical_location(args.model)):
        result["trained_on"] = record["model"]
    if getattr(args, "overridden", None):
        result["overridden"] = args.overridden
    if getattr(args, "quantized_elsewhere", None):
        result["quantized_elsewhere"] = args.quantized_elsewhere
    if not record:
        result["run_record"] = None  # the flags as given: nothing says what the adapter was trained on
    if adapted is not None:
        diff = (_probe_logits(model, tokenizer) - adapted).abs().max().item()
        result.update(probe_max_abs_diff=diff, probe_logit_scale=adapted.abs().max().item())
    out = args.output_dir
    # written whole into a temp dir, then renamed into place (--overwrite: the old one removed only then)
    with directory_written_whole(out, _is_merge_output, "--output-dir") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MERGE_RECORD_NAME).write_text(
            json.dumps(
                {**result, "base_model": canonical_location(args.model), "adapter": str(args.adapter.absolute())},
                indent=1,
            )
        )
    result["output_dir"] = str(out)
    return result


def print_summary(result: dict) -> None:
    print(f"merged {result['layers_merged']} MoKA layers into {result['output_dir']} ({result['dtype']})")
    if "run_record" in result:
        four_bit = "on" if result["nf4_backend"] else "off"
        print(
            f"note: the adapter dir has no {RUN_CONDITIONS_NAME} (not written by moka-finetune, or its save was cut "
            f"short): merged as the flags say (--load-in-4bit {four_bit}), which may not be the base it was trained on"
        )
    for flag in result.get("overridden", ()):
        print(f"note: merged with {flag} as given, not as the adapter's {RUN_CONDITIONS_NAME} records")
    if "quantized_elsewhere" in result:
        print(result["quantized_elsewhere"] + " (--nf4-backend moka takes the nearest code on either device)")
    if "trained_on" in result:
        print(f"note: the adapter was trained on {result['trained_on']!r} (its moka_run.json), not on this --model")
    if "probe_max_abs_diff" in result:
        print(
            f"probe logits, merged vs adapted: max |diff| {result['probe_max_abs_diff']:.3g} "
            f"(logits up to {result['probe_logit_scale']:.3g})"
        )
        if result["probe_max_abs_diff"] > 0.01 * result["probe_logit_scale"] and result["dtype"] != "float32":
            print(
                f"note: rounding W0 + ΔW to {result['dtype']} changed the logits by over 1%; "
                "--dtype fp32 keeps the adapter's effect whole"
            )


def main(argv: list[str] | None = None) -> int:
    """The ``moka-merge`` entry point: merges, and returns the exit code (2 with one error line on bad input)."""
    try:
        print_summary(merge(parse_args(argv)))
    except (CLIError, OSError, ValueError, SafetensorError) as err:  # OSError: e.g. no space left
        print(f"moka-merge: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
