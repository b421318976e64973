"""Adapter quality on real data: MoKA against PEFT QLoRA and LoKr, per trainable parameter.

    python -m benchmarks.quality                 # the full grid on SmolLM2-135M-Instruct (NF4), hours of CPU
    python -m benchmarks.quality --max-runs 4    # a piece of it; rerun to continue where it stopped
    python -m benchmarks.quality --render-only   # rebuild docs/results.md and the plot from the record

Tasks (data from Debian's ``bible-kjv`` and ``wordnet-base``, see :mod:`benchmarks.quality_data`):

* ``bible``: causal-LM fine-tuning on the King James Bible; metric: perplexity on held-out books.
* ``wordnet``: instruction tuning, "Define the word 'X' (pos)." → WordNet gloss; metrics: loss on the
  responses of held-out words, and zero-shot 4-way hypernym multiple choice on held-out nouns, scored by
  log-likelihood as lm-eval-harness does (``acc``: summed log-probability; ``acc_norm``: per character).

Methods (all on the same NF4 double-quantized base with bf16 compute, except LoKr which PEFT cannot run
on a 4-bit base): ``moka`` (r = 5 automatic shapes), ``moka_s`` (identity A, block-diagonal ΔW),
``moka_nogate`` (fixed α_i = 1/r), ``qlora_r{4,16,32}`` (PEFT LoRA, alpha = 2r), ``lokr_bf16`` (PEFT LoKr
defaults on a bf16 base) and ``base`` (no fine-tuning). Every method adapts the same modules (q, k, v, o
of the upper half of the layers) with the same steps, batches and schedule (AdamW, 10% warm-up, cosine).

Learning rates: ``moka`` and ``qlora_r16`` run a 3-value grid on seed 0; every other method takes the
best value of its family (chosen on the validation split, never on test), falling back to the next
lower grid value if its run diverges. Each finished run is appended to ``runs.jsonl``; runs already
recorded there (same task, method, seed, learning rate and budget) are skipped, so the grid can be
completed in pieces.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import quality_data as qd

RESULTS = Path(__file__).parent / "results" / "quality"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
TASKS = ("bible", "wordnet")
# method → (family whose learning rate it uses, description)
METHODS: dict[str, tuple[str | None, str]] = {
    "base": (None, "base model (NF4), no fine-tuning"),
    "base_bf16": (None, "base model in bf16 (LoKr's base), no fine-tuning"),
    "moka": ("moka", "MoKA, r=5 automatic shapes"),
    "moka_s": ("moka", "MoKA_s (A_i = I), r=5"),
    "moka_nogate": ("moka", "MoKA, gate off (α_i = 1/r)"),
    "qlora_r4": ("lora", "PEFT QLoRA r=4"),
    "qlora_r16": ("lora", "PEFT QLoRA r=16"),
    "qlora_r32": ("lora", "PEFT QLoRA r=32"),
    "lokr_bf16": ("moka", "PEFT LoKr (r=8, defaults), bf16 base"),
    "moka_bf16": ("moka", "MoKA, r=5, on LoKr's bf16 base (like-for-like with lokr_bf16)"),
}
BF16_BASE = ("base_bf16", "lokr_bf16", "moka_bf16")  # PEFT LoKr cannot run on a 4-bit base
LR_GRID = {"moka": (3e-3, 1e-2, 3e-2), "lora": (1e-4, 3e-4, 1e-3)}
GRID_METHOD = {"moka": "moka", "lora": "qlora_r16"}
MAX_GRID_EXTENSIONS = 2  # a best value on the grid's upper edge extends it by a half decade, at most twice
# The metric that picks a learning rate (validation split; lower is better).
SELECT_METRIC = {"bible": "valid_ppl", "wordnet": "valid_loss"}
# (key, label, higher is better) of each test metric shown in the table.
TABLE_METRICS = (
    ("bible", "test_ppl", "Bible test ppl ↓", False),
    ("wordnet", "test_loss", "WordNet test loss ↓", False),
    ("wordnet", "mc_acc", "WordNet MC acc ↑", True),
)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Budget:
    """Everything every method shares; its fingerprint is part of a run's identity."""

    steps: int = 200
    bible_batch: int = 4
    bible_seq: int = 64
    wordnet_batch: int = 8
    wordnet_max_len: int = 96
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    layer_fraction: float = 0.5  # adapt q, k, v, o of the upper half of the layers
    eval_chunks: int = 128  # Bible: held-out chunks of bible_seq tokens (test; valid gets half)
    wordnet_test_words: int = 256
    wordnet_valid_words: int = 128
    mc_questions: int = 150
    eval_batch: int = 32

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


SMOKE_BUDGET = Budget(
    steps=4,
    bible_batch=2,
    bible_seq=16,
    wordnet_batch=2,
    wordnet_max_len=64,
    eval_chunks=4,
    wordnet_test_words=16,
    wordnet_valid_words=4,
    mc_questions=4,
    eval_batch=4,
)


# -- data ---------------------------------------------------------------------------------------------
class TaskData:
    """Tokenized train/valid/test data of one task for one tokenizer and budget."""

    def __init__(self, task: str, tokenizer, budget: Budget, bible_file: Path | None, wordnet_dir: Path | None):
        self.task, self.tokenizer, self.budget = task, tokenizer, budget
        if task == "bible":
            train, valid, test = qd.split_bible(qd.read_bible(bible_file))
            seq = budget.bible_seq
            self.train_chunks = self._chunks(train, seq)
            self.valid = self._spread(self._chunks(valid, seq), budget.eval_chunks // 2)
            self.test = self._spread(self._chunks(test, seq), budget.eval_chunks)
        else:
            from moka.data import tokenize_records

            train, valid, test = qd.split_words(
                qd.read_wordnet(wordnet_dir), budget.wordnet_test_words, budget.wordnet_valid_words
            )
            length = budget.wordnet_max_len
            self.train_examples = tokenize_records(tokenizer, [self.record(e) for e in train], length)
            self.valid = tokenize_records(tokenizer, [self.record(e) for e in valid], length)
            self.test = tokenize_records(tokenizer, [self.record(e) for e in test], length)
            self.questions = qd.hypernym_questions(test, budget.mc_questions)

    @staticmethod
    def record(entry: qd.WordEntry) -> dict:
        return {"instruction": f"Define the word '{entry.word}' ({entry.pos}).", "output": entry.definition}

    def _chunks(self, text: str, seq: int) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        n = len(ids) // seq
        if n == 0:
            raise ValueError(f"bible text: {len(ids)} tokens cannot fill one chunk of {seq}")
        return torch.tensor(ids[: n * seq]).view(n, seq)

    @staticmethod
    def _spread(chunks: torch.Tensor, n: int) -> list[dict]:
        """``n`` chunks evenly spaced through the held-out text (it is contiguous; this samples all of it)."""
        index = torch.linspace(0, len(chunks) - 1, min(n, len(chunks))).round().long()
        return [{"input_ids": chunks[i].tolist(), "labels": chunks[i].tolist()} for i in index]

    def train_batches(self, steps: int, seed: int) -> Iterator[list[dict]]:
        gen = torch.Generator().manual_seed(seed)
        if self.task == "bible":
            for _ in range(steps):
                rows = self.train_chunks[
                    torch.randint(len(self.train_chunks), (self.budget.bible_batch,), generator=gen)
                ]
                yield [{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows]
        else:
            n = len(self.train_examples)
            for _ in range(steps):
                picks = torch.randint(n, (self.budget.wordnet_batch,), generator=gen).tolist()
                yield [self.train_examples[i] for i in picks]


def collate(features: list[dict], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    from moka.data import DataCollator

    return {k: v.to(device) for k, v in DataCollator(pad_token_id)(features).items()}


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL in fp32, number of predicted tokens) of the labels != -100, next-token shifted."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return nll, (labels != -100).sum()


@torch.no_grad()
def mean_nll(model, examples: list[dict], pad_token_id: int, batch_size: int, device: torch.device) -> float:
    """Token-weighted mean NLL (nats per predicted token)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        nll, n = token_nll(model, collate(examples[start : start + batch_size], pad_token_id, device))
        total, count = total + nll.item(), count + n.item()
    return total / count


@torch.no_grad()
def multiple_choice(model, tokenizer, questions: list[dict], batch_size: int, device: torch.device) -> dict:
    """lm-eval-harness style: the option with the highest log-likelihood after the prompt wins.

    ``acc`` sums the option's token log-probabilities; ``acc_norm`` divides that by its length in characters.
    """
    from moka.data import format_prompt

    has_template = bool(getattr(tokenizer, "chat_template", None))
    examples, lengths = [], []
    for q in questions:
        prompt = format_prompt(tokenizer, f"What is '{q['word']}' a kind of? Answer with one word or phrase.")
        prompt_ids = tokenizer(prompt, add_special_tokens=not has_template)["input_ids"]
        for option in q["options"]:
            option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
            examples.append({"input_ids": prompt_ids + option_ids, "labels": [-100] * len(prompt_ids) + option_ids})
            lengths.append(len(option))
    scores = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        logprobs = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores += (logprobs * (labels != -100)).sum(-1).tolist()
    correct = correct_norm = 0
    for i, q in enumerate(questions):
        s = scores[4 * i : 4 * i + 4]
        n = [v / length for v, length in zip(s, lengths[4 * i : 4 * i + 4], strict=True)]
        correct += max(range(4), key=s.__getitem__) == q["answer"]
        correct_norm += max(range(4), key=n.__getitem__) == q["answer"]
    return {"mc_acc": correct / len(questions), "mc_acc_norm": correct_norm / len(questions)}


def evaluate(task: str, model, data: TaskData, budget: Budget, device: torch.device) -> dict:
    model.eval()
    pad = data.tokenizer.pad_token_id
    valid = mean_nll(model, data.valid, pad, budget.eval_batch, device)
    test = mean_nll(model, data.test, pad, budget.eval_batch, device)
    if task == "bible":
        return {"valid_loss": valid, "valid_ppl": math.exp(valid), "test_loss": test, "test_ppl": math.exp(test)}
    return {
        "valid_loss": valid,
        "test_loss": test,
        **multiple_choice(model, data.tokenizer, data.questions, budget.eval_batch, device),
    }


# -- models -------------------------------------------------------------------------------------------
def target_regex(num_layers: int, layer_fraction: float) -> str:
    first = num_layers - max(1, round(num_layers * layer_fraction))
    layers = "|".join(str(i) for i in range(first, num_layers))
    return rf".*\.layers\.({layers})\.self_attn\.({'|'.join(ATTENTION)})"


def build(model_path: str, method: str, budget: Budget, seed: int, device: torch.device):
    """(model, trainable parameters) with the method's adapter attached; the adapter init uses ``seed``."""
    from moka.finetune import load_model

    four_bit = method not in BF16_BASE
    model, _ = load_model(model_path, load_in_4bit=four_bit, dtype=torch.bfloat16)
    model.to(device)
    model.requires_grad_(False)
    targets = target_regex(model.config.num_hidden_layers, budget.layer_fraction)
    torch.manual_seed(seed)
    if METHODS[method][0] is None:  # an untuned base
        return model, []
    if method.startswith("moka"):
        from moka import MoKAConfig, apply_moka

        variant = "moka_s" if method == "moka_s" else "moka"
        apply_moka(model, MoKAConfig(target_modules=targets, variant=variant, gate=method != "moka_nogate"))
    else:
        from peft import LoKrConfig, LoraConfig, get_peft_model

        if method.startswith("qlora"):
            rank = int(method.removeprefix("qlora_r"))
            config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
        else:
            config = LoKrConfig(r=8, target_modules=targets)
        model = get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def train(model, params, data: TaskData, budget: Budget, lr: float, seed: int, device: torch.device) -> dict:
    """AdamW with linear warm-up and cosine decay; returns the loss curve and timing."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(
        optimizer, max(1, round(budget.steps * budget.warmup_fraction)), budget.steps
    )
    model.train()
    losses = []
    start = time.perf_counter()
    progress = _progress(budget.steps, f"{data.task} lr={lr:g}")
    for features in data.train_batches(budget.steps, seed):
        nll, count = token_nll(model, collate(features, data.tokenizer.pad_token_id, device))
        loss = nll / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, budget.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        if not math.isfinite(losses[-1]):
            break
    progress.close()
    seconds = time.perf_counter() - start
    tenth = max(1, len(losses) // 10)
    first, last = statistics.mean(losses[:tenth]), statistics.mean(losses[-tenth:])
    return {
        "train_loss_first": first,
        "train_loss_last": last,
        "train_losses": [round(v, 4) for v in losses],
        "diverged": not math.isfinite(last) or len(losses) < budget.steps or last > first,
        "train_seconds": seconds,
        "seconds_per_step": seconds / max(1, len(losses)),
    }


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, mininterval=5.0, file=sys.stderr)


# -- the plan -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str
    seed: int
    lr: float | None

    def key(self, budget: Budget) -> tuple:
        return (self.task, self.method, self.seed, self.lr, budget.fingerprint())


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_key(record: dict) -> tuple:
    return (record["task"], record["method"], record["seed"], record["lr"], record["budget_id"])


def _next_half_decade(lr: float) -> float:
    """1e-3 → 3e-3 → 1e-2: the grid's spacing, continued upward."""
    mantissa = lr / 10 ** math.floor(math.log10(lr) + 1e-9)
    return float(f"{lr * (3 if mantissa < 2 else 10 / 3):.1g}")


def lr_grid(records: list[dict], task: str, family: str, budget: Budget) -> tuple[list[float], float | None]:
    """(grid, best value): the family's grid on ``task``, extended upward (at most MAX_GRID_EXTENSIONS values)
    while its best is its largest value, and the value with the lowest validation metric (None until the
    whole grid has run; the smallest value if every run diverged)."""
    runs = {
        r["lr"]: r
        for r in records
        if r["budget_id"] == budget.fingerprint() and r["task"] == task and r["method"] == GRID_METHOD[family]
        if r["seed"] == 0
    }
    grid = list(LR_GRID[family])
    while True:
        if any(lr not in runs for lr in grid):
            return grid, None
        ok = [runs[lr] for lr in grid if not runs[lr]["diverged"] and math.isfinite(runs[lr][SELECT_METRIC[task]])]
        if not ok:
            return grid, min(grid)
        best = min(ok, key=lambda r: r[SELECT_METRIC[task]])["lr"]
        if best != grid[-1] or len(grid) >= len(LR_GRID[family]) + MAX_GRID_EXTENSIONS:
            return grid, best
        grid.append(_next_half_decade(grid[-1]))


def best_lr(records: list[dict], task: str, family: str, budget: Budget) -> float | None:
    """The family's chosen learning rate on ``task`` (see :func:`lr_grid`)."""
    return lr_grid(records, task, family, budget)[1]


def next_run(records: list[dict], tasks, methods, seeds, budget: Budget) -> RunSpec | None:
    """The first run of the plan that is not recorded yet: base evals, the LR grids (seed 0), then every
    method on each seed in turn at its family's best LR (a lower grid value if that run diverged)."""
    done = {record_key(r): r for r in records}

    def pending(spec: RunSpec) -> bool:
        return spec.key(budget) not in done

    for task in tasks:
        for method in methods:
            if METHODS[method][0] is None and pending(spec := RunSpec(task, method, 0, None)):
                return spec
    for family, method in GRID_METHOD.items():
        for task in tasks:
            for lr in lr_grid(records, task, family, budget)[0]:
                if method in methods and pending(spec := RunSpec(task, method, 0, lr)):
                    return spec
    for seed in seeds:
        for task in tasks:
            for method in methods:
                family = METHODS[method][0]
                if family is None:
                    continue
                lr = best_lr(records, task, family, budget)
                if lr is None:
                    continue  # its family's grid was not asked for
                lower = [v for v in sorted(lr_grid(records, task, family, budget)[0], reverse=True) if v <= lr]
                for candidate in lower:  # fall back down the grid while runs diverge
                    spec = RunSpec(task, method, seed, candidate)
                    if pending(spec):
                        return spec
                    if not done[spec.key(budget)]["diverged"]:
                        break
    return None


# -- running ------------------------------------------------------------------------------------------
def run_one(spec: RunSpec, model_path: str, data: TaskData, budget: Budget, device: torch.device) -> dict:
    model, params = build(model_path, spec.method, budget, spec.seed, device)
    record = {
        "task": spec.task,
        "method": spec.method,
        "seed": spec.seed,
        "lr": spec.lr,
        "budget_id": budget.fingerprint(),
        "trainable": sum(p.numel() for p in params),
        "torch_threads": torch.get_num_threads(),
    }
    if METHODS[spec.method][0] is not None:
        record.update(train(model, params, data, budget, spec.lr, spec.seed, device))
    else:
        record["diverged"] = False
    start = time.perf_counter()
    record.update(evaluate(spec.task, model, data, budget, device))
    record["eval_seconds"] = time.perf_counter() - start
    del model, params
    gc.collect()
    return record


def conditions(model_path: str, budget: Budget, device: torch.device) -> dict:
    from .run import conditions as bench_conditions

    conds = bench_conditions(device, torch.bfloat16, 0.0)
    conds.pop("timer")
    conds.update(model=model_path, base="NF4 double-quant, bf16 compute (lokr_bf16: bf16 dense)", **asdict(budget))
    return conds


def render(out: Path, budget: Budget, docs: Path | None) -> Path:
    """Write summary.json, the plot and the generated part of ``docs`` (between the quality markers)."""
    from .quality_report import render_report

    return render_report(out, budget, docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="adapter quality: MoKA vs QLoRA vs LoKr on real data (issue 6)")
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--bible-file", type=Path, help="text in `bible -f` format (default: run `bible`)")
    parser.add_argument("--wordnet-dir", type=Path, help=f"WordNet database directory (default {qd.WORDNET_DIR})")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"where runs.jsonl, summary.json and the plot go (default {RESULTS}; with --smoke a temporary dir)",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        help=f"markdown file whose generated section is rewritten (default {DOCS}; with --smoke none)",
    )
    parser.add_argument("--max-runs", type=int, help="stop after this many new runs (the rest runs next time)")
    parser.add_argument("--smoke", action="store_true", help="tiny budget (4 steps, a few eval examples); for CI")
    parser.add_argument("--render-only", action="store_true", help="only rebuild the report from runs.jsonl")
    args = parser.parse_args(argv)
    try:
        tasks = _choice_list(args.tasks, TASKS, "--tasks")
        methods = _choice_list(args.methods, tuple(METHODS), "--methods")
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as err:
        print(f"benchmarks.quality: {err}", file=sys.stderr)
        return 2
    budget = SMOKE_BUDGET if args.smoke else Budget()
    if args.out is None:  # a smoke run never replaces the committed results or docs/results.md
        args.out = Path(tempfile.mkdtemp(prefix="moka-quality-smoke-")) if args.smoke else RESULTS
    if args.docs is None and not args.smoke:
        args.docs = DOCS
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs_path = args.out / "runs.jsonl"
    if args.render_only:
        print(f"wrote {render(args.out, budget, args.docs)}")
        return 0
    from moka.finetune import EMBEDDED, CLIError, resolve_model_path

    try:
        model_path = resolve_model_path(args.model or EMBEDDED)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        data = {t: TaskData(t, tokenizer, budget, args.bible_file, args.wordnet_dir) for t in tasks}
    except (CLIError, qd.DataMissingError, FileNotFoundError, ValueError, OSError) as err:
        print(f"benchmarks.quality: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    conds_path = args.out / "conditions.json"
    if not conds_path.exists():
        conds_path.write_text(json.dumps(conditions(model_path, budget, device), indent=1))
    new_runs = 0
    while args.max_runs is None or new_runs < args.max_runs:
        spec = next_run(read_records(runs_path), tasks, methods, seeds, budget)
        if spec is None:
            break
        print(f"run {spec}", file=sys.stderr, flush=True)
        record = run_one(spec, model_path, data[spec.task], budget, device)
        with runs_path.open("a") as f:  # one line per finished run: an interrupted run leaves nothing
            f.write(json.dumps(record) + "\n")
        new_runs += 1
        print(json.dumps({k: v for k, v in record.items() if k != "train_losses"}), flush=True)
    print(f"{new_runs} new runs; wrote {render(args.out, budget, args.docs)}")
    return 0


def _choice_list(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [t for t in text.split(",") if t]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"{flag}: expected a comma-separated subset of {', '.join(allowed)}, got {text!r}")
    return items


if __name__ == "__main__":
    sys.exit(main())
