"""Layer benchmarks, side by side in one process: ``python -m benchmarks.run``.

Measures every provider of :mod:`benchmarks.providers` on each layer shape and token count in ``fwd``,
``bwd`` and ``fwd+bwd``, plus the bytes autograd saves for backward and the peak memory of one call
(:mod:`benchmarks.memory`: the CUDA allocator's peak, or the CPU allocator's events via the profiler), and writes
``<out>/<tag>.json`` and ``.csv`` with the conditions (device, versions, git sha, date). Then it renders
markdown tables and PNG plots from the saved file (:mod:`benchmarks.plot` reads results only).

    python -m benchmarks.run                       # CPU: fp32, 2048² target row + SmolLM2 projections
    python -m benchmarks.run --device cuda         # GPU: bf16, LLaMA-7B/8B projections
    python -m benchmarks.run --smoke --out /tmp/b  # tiny, seconds; what CI runs
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .memory import peak_bytes
from .providers import build_case

RESULTS = Path(__file__).parent / "results"

# (N out, K in) per layer set; the first CPU layer is the CPU target row.
LAYERS = {
    "cpu": [(2048, 2048), (576, 576), (192, 576), (1536, 576), (576, 1536)],
    "cuda": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "smoke": [(48, 64)],
}
# On CUDA the targets' token counts come first (T ≤ 16 and T = 4096), in case a time limit cuts the run.
TOKENS = {"cpu": [1, 16, 128, 512], "cuda": [16, 4096, 1, 512], "smoke": [1, 16]}
# provider, base
CPU_PROVIDERS = [
    ("dense_linear", "dense"),
    ("bnb_nf4", "nf4"),
    ("ours_nf4", "nf4"),
    ("moka_torch", "dense"),
    ("moka_torch", "nf4"),
    ("lokr_materialized", "dense"),
    ("lokr_fused", "dense"),
    ("lora_equal", "dense"),
    ("lora_r16", "dense"),
    ("lora_r32", "dense"),
    ("lora_r16", "nf4"),
    ("lora_r32", "nf4"),
]
# On CUDA the targets' providers first (a time limit cuts the last ones of a cell), the PyTorch path last.
CUDA_PROVIDERS = [
    ("ours_nf4", "nf4"),
    ("moka_triton", "nf4"),
    ("dequant_cublas", "nf4"),
    ("ours_nf4_fused", "nf4"),
    ("dense_linear", "dense"),
    ("moka_triton", "dense"),
    ("bnb_nf4", "nf4"),
    ("lora_r16", "nf4"),
    ("lora_r32", "nf4"),
    ("lokr_materialized", "dense"),
    ("lora_equal", "dense"),
    ("lora_r16", "dense"),
    ("lora_r32", "dense"),
    ("lokr_fused", "dense"),
    ("moka_torch", "dense"),
    ("moka_torch", "nf4"),
]
MODES = ("fwd", "bwd", "fwd+bwd")


def conditions(device: torch.device, dtype: torch.dtype, min_run_time: float) -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except ImportError:
            return None

    sha = os.environ.get("MOKA_GIT_SHA")  # given with a copy of the tree (the lent GPU machine): it wins
    try:
        if sha:
            raise OSError("MOKA_GIT_SHA given")
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
        changed = subprocess.check_output(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "moka", "moka_kernels", "benchmarks/*.py"],
            text=True,
            stderr=subprocess.DEVNULL,
        )
        sha += "+uncommitted" if changed.strip() else ""  # the measured code is not that commit's
    except (OSError, subprocess.CalledProcessError):
        pass  # no git: the sha given, or None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "bitsandbytes": version("bitsandbytes"),
        "peft": version("peft"),
        "transformers": version("transformers"),
        "cuda": torch.version.cuda,
        "thresholds": _thresholds(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("MOKA_", "TRITON_"))},
        "git_sha": sha,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "timer": "triton.testing.do_bench median"
        if device.type == "cuda"
        else f"torch.utils.benchmark blocked_autorange median, min_run_time={min_run_time}s and >= {MIN_SAMPLES} calls",
    }


def cpu_description() -> str:
    """The host CPU as the timings depend on it: model name (from /proc/cpuinfo where there is one), the SIMD
    level torch dispatches to, and the BLAS it calls (MKL picks slower paths on some non-Intel CPUs)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    blas = "MKL" if torch.backends.mkl.is_available() else "non-MKL BLAS"
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}, {blas}"


def _thresholds() -> dict | None:
    """The token counts at which the kernels change route or schedule (guesses until a GPU sweep sets them);
    None without triton (no kernels)."""
    from moka_kernels.ops import TRITON_AVAILABLE

    if not TRITON_AVAILABLE:
        return None
    from moka_kernels.ops.kron_mixture import ROWWISE_MIN_TOKENS
    from moka_kernels.ops.nf4_matmul import DEQUANTIZE_MIN_TOKENS

    return {"DEQUANTIZE_MIN_TOKENS": DEQUANTIZE_MIN_TOKENS, "ROWWISE_MIN_TOKENS": ROWWISE_MIN_TOKENS}


MIN_SAMPLES = 7  # timed calls (CPU) behind each median, at least


def make_timer(device: torch.device, min_run_time: float):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    from torch.utils import benchmark

    def measure(fn):
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return statistics.median(cpu_samples(timer, min_run_time)) * 1e3

    return measure


def cpu_samples(timer, min_run_time: float) -> list[float]:
    """Seconds per call of ``blocked_autorange`` blocks: ``min_run_time`` of them, and at least MIN_SAMPLES.

    A fixed time budget gives a 100 ms call only 2-3 samples, and one slow call (a page-faulting allocation)
    then moves the median; the budget is sized from one call and topped up if later calls run slower."""
    once = timer.timeit(1).median
    times: list[float] = []
    while len(times) < MIN_SAMPLES:
        budget = max(0.0 if times else min_run_time, (MIN_SAMPLES - len(times)) * once)
        times += timer.blocked_autorange(min_run_time=budget).times
    return times


def saved_bytes(case, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward beyond tensors that persist anyway (x, weights, parameters)."""
    persistent = {t.untyped_storage().data_ptr() for t in [x, *case.params, *case.frozen] if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in persistent:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        case.forward(x)
    return sum(seen.values())


def mode_call(case, x, dy, mode: str):
    """The callable one measurement repeats: forward without autograd, forward + backward, or backward alone."""
    if mode == "fwd":

        def forward():
            with torch.no_grad():
                return case.forward(x)

        return forward
    xg = x.detach().requires_grad_(True)
    out = case.forward(xg) if mode == "bwd" else None  # bwd: replay backward on one retained graph

    def backward():
        # fresh gradients, as after a training step's zero_grad(set_to_none=True): no accumulating add_ per
        # parameter (2r + 1 extra kernels for MoKA), and dX is a fresh tensor in a real model
        for t in (xg, *case.params):
            t.grad = None
        (case.forward(xg) if out is None else out).backward(dy, retain_graph=out is not None)

    backward.input = xg  # for run_layer to free dX before a peak-memory window, as it frees the gradients
    return backward


def wall_ms(fn, reps: int = 50) -> float:
    """Milliseconds per call of ``reps`` back-to-back calls between two synchronizations: host time included
    (``do_bench`` flushes L2 before each timed call, which lets the host run ahead by the flush's length, so
    on launch-bound cells it reports about the device time alone)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def host_inclusive_timer(rounds: int = 5, reps: int = 20):
    """Per-call ms of back-to-back calls (``wall_ms``), the median of ``rounds``: what a launch-bound call
    costs a training loop, host work included."""
    return lambda fn: statistics.median(wall_ms(fn, reps) for _ in range(rounds))


def cells(layers: list, tokens: list, device: torch.device) -> list[tuple[tuple[int, int], int]]:
    """(layer, T) in measuring order. On CUDA the first two of ``tokens`` (T = 16 and 4096, where the forward
    targets lie) over every layer first, then the rest (T = 1 and 512, which some targets cover too): a time
    limit then cuts those."""
    if device.type != "cuda":
        return [(layer, t) for layer in layers for t in tokens]
    first, rest = tokens[:2], tokens[2:]
    return [(layer, t) for group in (first, rest) for layer in layers for t in group]


def run_layer(provider, base, n_out, k_in, tokens, device, dtype, measure, r: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, k_in, generator=gen).to(device, dtype)
    dy = torch.randn(tokens, n_out, generator=gen).to(device, dtype)
    case = build_case(provider, n_out, k_in, device, dtype, r=r, base=base)
    previous = os.environ.get("MOKA_BACKEND")
    if case.backend:
        os.environ["MOKA_BACKEND"] = case.backend
    try:
        rows = []
        saved = saved_bytes(case, x.detach().requires_grad_(True))
        for mode in MODES:
            call = mode_call(case, x, dy, mode)
            ms = measure(call)
            # host-inclusive time where launches, not the device, may bound a call (CUDA, few tokens)
            host = wall_ms(call) if device.type == "cuda" and tokens <= 16 else None
            inputs = [call.input] if hasattr(call, "input") else []
            for p in (*case.params, *inputs):  # the peak counts the gradients' and dX's first allocation
                p.grad = None
            peak = peak_bytes(call, device)
            rows.append(
                {
                    "provider": provider,
                    "base": base,
                    "n_out": n_out,
                    "k_in": k_in,
                    "tokens": tokens,
                    "mode": mode,
                    "ms": ms,
                    "wall_ms": host,
                    "trainable": case.trainable,
                    "adapter_macs_per_token": case.adapter_macs_per_token,
                    "adapter_train_macs_per_token": case.adapter_train_macs_per_token,
                    "saved_bytes": saved,
                    "peak_bytes": peak,
                    "note": case.note,
                }
            )
            for p in case.params:
                p.grad = None
        return rows
    finally:
        if previous is None:
            os.environ.pop("MOKA_BACKEND", None)
        else:
            os.environ["MOKA_BACKEND"] = previous


def write_json(path: Path, conds: dict, rows: list[dict], errors: list[dict] | None = None) -> None:
    """Replace ``path`` (.json) with the conditions and rows in one rename, so that a run killed by its time
    limit (the GPU suite's parts have one) leaves every row measured so far, marked ``complete: false``.
    ``errors``: what raised instead of measuring (``failure``), kept beside the rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"conditions": conds, "rows": rows, **({"errors": errors} if errors else {})}, indent=1))
    tmp.replace(path.with_suffix(".json"))


def write_conditions_first(path: Path, conds: dict) -> None:
    """A part's conditions (no rows, ``complete: false``) before its first row, so a part cut before it still
    leaves a file; never over an earlier result file, which stays until a first new row replaces it."""
    if not path.with_suffix(".json").exists():
        write_json(path, conds, [])


def failure(what: str, err: Exception, device: torch.device) -> dict:
    """A measurement that raised, as one record (its type and first message line), so that one failing provider
    costs its own rows only, not the rest of a time-limited part; the CUDA cache is emptied of what is free."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    message = (str(err).strip().splitlines() or [""])[0][:300]
    print(f"FAILED {what}: {type(err).__name__}: {message}", file=sys.stderr, flush=True)
    return {"what": what, "error": f"{type(err).__name__}: {message}"}


def write_results(path: Path, conds: dict, rows: list[dict], errors: list[dict] | None = None) -> None:
    write_json(path, conds, rows, errors)
    with path.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MoKA layer benchmarks (measures, then renders)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--tag", help="file stem (default: layers-<device>[-smoke])")
    parser.add_argument("--components", type=int, default=4, help="MoKA components r")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="CPU seconds per measurement")
    parser.add_argument("--providers", help="comma-separated subset, e.g. moka_torch,lokr_materialized")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.run: --device cuda needs a CUDA GPU; run --device cpu here", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    key = "smoke" if args.smoke else args.device
    providers = CUDA_PROVIDERS if device.type == "cuda" else CPU_PROVIDERS
    if args.providers:
        wanted = {name.strip() for name in args.providers.split(",") if name.strip()}
        known = {name for name, _ in CPU_PROVIDERS + CUDA_PROVIDERS}
        if wanted - known:
            print(
                f"benchmarks.run: --providers: unknown {sorted(wanted - known)}; known: {sorted(known)}",
                file=sys.stderr,
            )
            return 2
        providers = [p for p in providers if p[0] in wanted]
        if not providers:
            print(f"benchmarks.run: --providers: none of {sorted(wanted)} runs on {args.device}", file=sys.stderr)
            return 2
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        needs_bnb = ("bnb_nf4", "dequant_cublas")
        providers = [p for p in providers if not (p[0] in needs_bnb or (p[0].startswith("lora") and p[1] == "nf4"))]
    min_run_time = 0.05 if args.smoke else args.min_run_time
    measure = make_timer(device, min_run_time)
    conds = conditions(device, dtype, min_run_time)
    conds.update(components=args.components, smoke=args.smoke, complete=False)
    path = args.out / ((args.tag or f"layers-{key}") + ".json")  # a dotted --tag (v1.2) keeps its whole name
    rows: list[dict] = []
    errors: list[dict] = []
    failures: dict[tuple[str, str], int] = {}
    write_conditions_first(path, conds)
    for (n_out, k_in), tokens in cells(LAYERS[key], TOKENS[key], device):
        for provider, base in providers:
            what = f"{provider}[{base}] {n_out}x{k_in} T={tokens}"
            if failures.get((provider, base), 0) >= 2:  # failed twice: its later cells are not tried
                errors.append({"what": what, "error": "skipped: this provider failed twice before"})
                continue
            try:
                layer_rows = run_layer(provider, base, n_out, k_in, tokens, device, dtype, measure, args.components)
            except Exception as err:  # one provider's failure (a kernel, OOM) costs its own cell only
                errors.append(failure(what, err, device))
                failures[provider, base] = failures.get((provider, base), 0) + 1
                continue
            rows += layer_rows
            times = "  ".join(f"{r['mode']} {r['ms']:8.3f}" for r in layer_rows)
            print(f"{n_out:>5}x{k_in:<5} T={tokens:<5} {provider + '[' + base + ']':24s} {times} ms", flush=True)
            write_json(path, conds, rows, errors)
    conds["complete"] = True
    if not rows:
        write_json(path, conds, rows, errors)
        print(f"benchmarks.run: every measurement failed; see {path}", file=sys.stderr)
        return 1
    write_results(path, conds, rows, errors)
    from .plot import render

    render(path.with_suffix(".json"))
    print(f"wrote {path.with_suffix('.json')}, .csv, .md and plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
