"""End-to-end training-step benchmarks: MoKA against PEFT QLoRA/LoRA/LoKr and the frozen base.

Each method runs in its own process (so peak RSS / peak CUDA memory is its own): a few AdamW steps on fixed
random tokens, timing the median step after one warm-up step.

    python -m benchmarks.e2e                        # tiny LLaMA (fp32) and SmolLM2-135M (NF4) on CPU
    python -m benchmarks.e2e --models tiny --smoke  # seconds; CI
    python -m benchmarks.e2e --models /path/to/llama --device cuda   # a real model on a GPU
    python -m benchmarks.e2e --models llama2-7b --device cuda --seq 512 # LLaMA-2-7B shapes, random weights

Methods: ``moka`` (ours; r = 5 automatic components on all 7 projections), ``lora_r16`` / ``lora_r32``
(PEFT LoRA on the same base: QLoRA when the base is 4-bit), ``lokr`` (PEFT LoKr; it cannot run on a
4-bit base, which the ``lokr_4bit`` row shows), ``frozen_base`` (no adapter; backward runs from the loss down
to every projection an adapter would sit on, and no further: the floor every adapter method pays).
``lokr_bf16`` runs the whole model in bf16 (PEFT's LoKr cannot use the 4-bit base); its times are not
comparable with the fp32-compute rows on CPU.

``llama2-7b`` is LLaMA-2-7B's architecture with random weights, built in memory (nothing to download, so it
runs on machines without a model hub); its projections are quantized in memory to bitsandbytes NF4 with
double quantization, as ``from_pretrained(..., load_in_4bit=True)`` would. ``--layers`` keeps fewer decoder
layers of the same shapes when time is short.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .memory import peak_bytes

RESULTS = Path(__file__).parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "tiny": ["frozen_base", "moka", "lora_r16", "lora_r32", "lokr"],
    "smollm2": ["frozen_base", "moka", "lora_r16", "lora_r32", "lokr_4bit", "lokr_bf16"],
    # Ordered by what the GPU target needs first (MoKA vs QLoRA r = 32), in case a time limit cuts the run.
    "llama2-7b": ["moka", "lora_r32", "lora_r16", "frozen_base", "lokr_bf16"],
}
LLAMA_PRESETS = {
    "llama2-7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
    },
}


def quantize_projections_nf4(model: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Swap every target projection for a bitsandbytes ``Linear4bit`` (NF4, double quant), quantizing in memory."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if not (isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS):
            continue
        quantized = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            module.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
        if module.bias is not None:
            quantized.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, quantized.to(device))  # .to() quantizes


def random_llama(preset: dict, layers: int | None, four_bit: bool, device: torch.device, compute_dtype):
    """A LlamaForCausalLM with random weights, made on ``device`` (projections in NF4 when ``four_bit``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**preset, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    if four_bit:
        quantize_projections_nf4(model, compute_dtype, device)
        _keep_bnb_cpu_layout(model)
    return model


def _keep_bnb_cpu_layout(model: torch.nn.Module) -> None:
    """bitsandbytes may repack 4-bit weights for its AVX512-bf16 CPU kernel; keep its standard NF4 layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def build_model(model: str, method: str, device: torch.device, layers: int | None = None):
    """(model, base description). Every method on one model key shares the same weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    four_bit = model != "tiny" and method != "lokr_bf16"
    if model == "tiny":
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=8000,
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
        )
        return LlamaForCausalLM(config).to(device), "tiny LLaMA, fp32 dense"
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    if model in LLAMA_PRESETS:
        preset = LLAMA_PRESETS[model]
        depth = layers or preset["num_hidden_layers"]
        m = random_llama(preset, layers, four_bit, device, compute if four_bit else torch.bfloat16)
        kind = f"NF4 (double quant), {str(compute).removeprefix('torch.')} compute" if four_bit else "bf16 dense"
        return m, f"random {model} weights, {depth} layer{'s' if depth != 1 else ''}, {kind}"
    path = model
    if model == "smollm2":
        from moka.embedded import embedded_model_dir

        path = str(embedded_model_dir())
    if not four_bit:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device), "bf16 dense"
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    m = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quant,
        dtype=compute,
        device_map={"": device.index or 0} if device.type == "cuda" else "cpu",
    )
    _keep_bnb_cpu_layout(m)
    return m, f"NF4 (double quant), {str(compute).removeprefix('torch.')} compute"


def attach(model, method: str):
    """Attach the method's adapter; returns the trainable parameters."""
    if method == "frozen_base":
        model.requires_grad_(False)
        stop_gradients_where_adapters_would(model)
        return []
    if method == "moka":
        from moka import MoKAConfig, apply_moka

        apply_moka(model, MoKAConfig())
    else:
        from peft import LoKrConfig, LoraConfig, get_peft_model

        if method.startswith("lora"):
            rank = int(method.split("_r")[1])
            config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
        else:  # PEFT LoKr with its default factorization, r = 8
            config = LoKrConfig(r=8, target_modules=TARGETS)
        if any(hasattr(m, "support_avx512bf16_for_cpu") for m in model.modules()):
            model.is_loaded_in_4bit = True  # what from_pretrained sets: PEFT then takes its bnb (QLoRA) layers
        model = get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def _output_needs_grad(module, args, output):
    # A leaf that requires grad: backward reaches this projection's output and stops there, as it does at an
    # adapted projection whose input needs no gradient (the adapter's own factor gradients aside).
    return output if output.requires_grad else output.detach().requires_grad_(True)


def stop_gradients_where_adapters_would(model: torch.nn.Module) -> list:
    """Make the frozen model's backward exactly the flow an adapter on every ``TARGETS`` projection needs.

    Each target projection's output is made to require grad: then backward runs from the loss down to every
    adapted projection, and no further: layer 0's q/k/v input (the normed embeddings) gets no gradient, which
    adapter training does not compute either. Returns the hook handles."""
    return [
        module.register_forward_hook(_output_needs_grad)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS
    ]


def measure_one(
    model_key: str, method: str, steps: int, batch: int, seq: int, device: torch.device, layers: int | None = None
) -> dict:
    model, base = build_model(model_key, method, device, layers)
    result = {"model": model_key, "method": method, "base": base, "batch": batch, "seq": seq}
    try:
        attached = attach(model, method)
    except Exception as err:  # e.g. PEFT LoKr on a 4-bit base
        return {**result, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    model, params = (model, attached) if method == "frozen_base" else attached
    model.train()
    if device.type == "cuda":  # the peak of training, not of building (a bf16 copy is quantized in place)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=gen).to(device)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    times, losses = [], []

    def train_step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    try:
        for _ in range(steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = train_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
        peak = (
            torch.cuda.max_memory_allocated()
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        # Held above the step's start (activations, gradients, temporaries): one more step, not timed.
        step_peak = peak_bytes(train_step, device)
    except Exception as err:
        return {**result, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    step = statistics.median(times[1:])
    return {
        **result,
        "trainable": sum(p.numel() for p in params),
        "step_seconds": step,
        "tokens_per_second": batch * seq / step,
        "peak_memory_mb": peak / 2**20,
        "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "step_peak_mb": step_peak / 2**20,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def _child(args) -> int:
    device = torch.device(args.device)
    row = measure_one(args.one_model, args.one, args.steps, args.batch, args.seq, device, args.layers)
    print("E2E_RESULT " + json.dumps(row), flush=True)
    return 0


def render(path: Path) -> Path:
    data = json.loads(path.read_text())
    lines = [
        f"# End-to-end training steps: {path.stem}",
        "",
        "Conditions: " + ", ".join(f"{k}={v}" for k, v in data["conditions"].items()),
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in data["rows"] if "conditions" in r):
        own = next(r["conditions"] for r in data["rows"] if r["model"] == model and "conditions" in r)
        lines += [
            f"Rows of {model} are from an earlier run: "
            + ", ".join(f"{k}={own.get(k)}" for k in ("git_sha", "date", "batch", "seq")),
            "",
        ]
    lines += [
        "| model | base | method | trainable | step (s) | tokens/s | peak memory (MB) | step peak (MB) "
        "| loss first→last |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if "error" in r:
            log = f" (output: `{r['log']}`)" if r.get("log") else ""
            lines.append(
                f"| {r['model']} | {r['base']} | {r['method']} | – | fails: {r['error']}{log} | – | – | – | – |"
            )
            continue
        step_peak = f"{r['step_peak_mb']:.0f}" if "step_peak_mb" in r else "–"
        lines.append(
            f"| {r['model']} | {r['base']} | {r['method']} | {r['trainable']:,} | {r['step_seconds']:.3f} | "
            f"{r['tokens_per_second']:.0f} | {r['peak_memory_mb']:.0f} | {step_peak} | "
            f"{r['loss_first']:.3f}→{r['loss_last']:.3f} |"
        )
    md = path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    _plot(path, data["rows"])
    return md


def _plot(path: Path, rows: list[dict]) -> None:
    """``<stem>.png``: step time, step peak and process peak per method, one row of panels per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    panels = [
        ("step_seconds", "step (s)"),
        ("step_peak_mb", "step peak (MB)"),
        ("peak_memory_mb", "max RSS / peak (MB)"),
    ]
    fig, axes = plt.subplots(len(models), len(panels), figsize=(13, 3.2 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models, strict=True):
        model_rows = [r for r in rows if r["model"] == model]
        names = [r["method"] for r in model_rows]
        for ax, (key, title) in zip(row_axes, panels, strict=True):
            values = [r.get(key, 0.0) if "error" not in r else 0.0 for r in model_rows]
            colors = ["tab:red" if n == "moka" else "tab:gray" for n in names]
            ax.barh(names, values, color=colors)
            for y, r in enumerate(model_rows):
                if "error" in r:
                    ax.text(0, y, " fails", va="center", color="tab:red")
            ax.set(title=f"{model}: {title}")
            ax.invert_yaxis()
            ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)


def child_env() -> dict[str, str]:
    """The environment of a measuring child: the repo first on PYTHONPATH, then what the caller had there
    (on the lent GPU machine the carried bitsandbytes lies on PYTHONPATH, not in site-packages)."""
    path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))


def _run_child(model_key: str, method: str, steps: int, args) -> dict:
    """One method on one model in its own process (its own peak memory); its result row, or an error row."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.e2e",
        "--one",
        method,
        "--one-model",
        model_key,
        "--device",
        args.device,
        "--steps",
        str(steps),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        *(["--layers", str(args.layers)] if args.layers else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    found = [line for line in proc.stdout.splitlines() if line.startswith("E2E_RESULT ")]
    if found:
        return json.loads(found[-1][len("E2E_RESULT ") :])
    # The error line (an exception's "Type: message"), not whatever the child printed last (a shutdown
    # warning); the whole output beside the results, since on the one GPU call nothing else survives.
    lines = proc.stderr.strip().splitlines() or ["?"]
    error = next(
        (line for line in reversed(lines) if re.match(r"[\w.]+(Error|Exception|Interrupt)\b", line)), lines[-1]
    )
    log = args.out / f"e2e-{args.device}-{Path(model_key).name}-{method}.log"
    args.out.mkdir(parents=True, exist_ok=True)
    log.write_text(
        f"$ {' '.join(cmd)}\nexit code {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return {"model": model_key, "method": method, "base": "?", "error": error, "log": log.name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="end-to-end training-step benchmarks")
    parser.add_argument(
        "--models",
        default="tiny,smollm2",
        help="tiny, smollm2, llama2-7b (random weights), or model dirs (comma-separated)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, help="measured steps after one warm-up step (default: 10 tiny, 5 else)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, help="decoder layers of a random LLaMA preset (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny model only, 1 step, short sequences")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--one-model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return _child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.e2e: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.smoke:
        args.models, args.steps, args.seq = "tiny", 1, 16
    from .run import conditions

    # the compute dtype of the NF4 and LoKr rows (the tiny model computes in fp32 everywhere)
    conds = conditions(torch.device(args.device), torch.bfloat16 if args.device == "cuda" else torch.float32, 0.0)
    conds.pop("timer")
    conds.update(batch=args.batch, seq=args.seq, timer="median step after one warm-up step", complete=False)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"e2e-{args.device}{'-smoke' if args.smoke else ''}.json"
    models = args.models.split(",")
    # Rows of models not re-run now are kept; the file is rewritten after every method, so a run cut short
    # by a time limit keeps what it measured.
    # Each kept row keeps the conditions it was measured under (another git sha, date, batch or seq).
    earlier = json.loads(path.read_text()) if path.exists() else {"conditions": {}, "rows": []}
    kept = [
        {**r, "conditions": r.get("conditions", earlier["conditions"])}
        for r in earlier["rows"]
        if r["model"] not in models
    ]
    rows: list[dict] = []
    tmp = path.with_suffix(".json.tmp")
    if not path.exists():  # a part cut before its first row still leaves its conditions (never over earlier rows)
        tmp.write_text(json.dumps({"conditions": conds, "rows": kept}, indent=1))
        tmp.replace(path)
    for model_key in models:
        for method in METHODS.get(model_key, METHODS["smollm2"]):
            steps = args.steps or (10 if model_key == "tiny" else 5)
            if model_key != "tiny" and method != "lokr_bf16" and importlib.util.find_spec("bitsandbytes") is None:
                # fail in the parent: a child would first build the whole bf16 model
                row = {"model": model_key, "method": method, "base": "NF4"}
                row["error"] = "ModuleNotFoundError: the NF4 base needs bitsandbytes"
            else:
                row = _run_child(model_key, method, steps, args)
            row["steps"] = steps
            rows.append(row)
            print(json.dumps(row), flush=True)
            tmp.write_text(json.dumps({"conditions": conds, "rows": kept + rows}, indent=1))
            tmp.replace(path)
    conds["complete"] = True
    path.write_text(json.dumps({"conditions": conds, "rows": kept + rows}, indent=1))
    print(f"wrote {path} and {render(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
