"""Kernel microbenchmarks: the NF4 base GEMM and the fused MoKA layer against the alternatives.

Every provider runs on the same layer shape and token count in one process, side by side. Results go to
JSON with the conditions (device, versions, git sha, date) and, on H100/H200, the roofline lower bound of
each row (docs/design.md §6).

    python -m benchmarks.kernel_bench --out results.json              # GPU: LLaMA shapes, bf16
    python -m benchmarks.kernel_bench --device cpu --smoke --out x.json  # CPU: tiny, PyTorch path only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from moka.config import auto_component_shapes
from moka_kernels import dequantize_nf4, moka_linear, quantize_nf4
from moka_kernels.reference import contraction_order, materialized_delta_weight

GPU_LAYERS = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N out, K in): q/o, up/gate, down
GPU_TOKENS = [1, 16, 512, 4096]
SMOKE_LAYERS = [(48, 64)]
SMOKE_TOKENS = [1, 16]
# Measured peaks of one H200 (REFERENCE.md §6); used only when the device is an H100/H200.
PEAK_FLOPS = 790e12
PEAK_BYTES = 4.3e12


def conditions(device: torch.device, dtype: torch.dtype) -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except ImportError:
            return None

    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        sha = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "triton": version("triton"),
        "bitsandbytes": version("bitsandbytes"),
        "cuda": torch.version.cuda,
        "git_sha": sha,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
    }


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from torch.utils import benchmark

    return lambda fn: benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e3


def adapter_macs(shapes, tokens: int) -> int:
    total = 0
    for a1, a2, b1, b2 in shapes:
        if contraction_order((a1, a2), (b1, b2)) == "b_first":
            total += a2 * b1 * (b2 + a1)
        else:
            total += a1 * b2 * (a2 + b1)
    return total * tokens


def roofline_ms(flops: float, bytes_moved: float) -> float:
    return max(flops / PEAK_FLOPS, bytes_moved / PEAK_BYTES) * 1e3


def bench_layer(
    n_out: int, k_in: int, tokens: int, device, dtype, use_triton: bool, measure, with_roofline: bool
) -> list[dict]:
    """Time every provider on one layer shape and token count; MOKA_BACKEND must already be set."""
    torch.manual_seed(0)
    shapes = auto_component_shapes(n_out, k_in, 5)
    w_dense = (torch.randn(n_out, k_in, device=device) / k_in**0.5).to(dtype)
    w_nf4 = quantize_nf4(w_dense)
    x = torch.randn(tokens, k_in, device=device, dtype=dtype)
    a = [torch.randn(a1, a2, device=device, dtype=dtype, requires_grad=True) for a1, a2, _, _ in shapes]
    b = [torch.randn(b1, b2, device=device, dtype=dtype, requires_grad=True) for _, _, b1, b2 in shapes]
    gate = torch.zeros(len(shapes), device=device, requires_grad=True)
    grad_out = torch.randn(tokens, n_out, device=device, dtype=dtype)

    def moka_fwd():
        with torch.no_grad():
            return moka_linear(x, w_nf4, a, b, gate)

    def moka_fwd_bwd():
        xg = x.detach().requires_grad_(True)
        moka_linear(xg, w_nf4, a, b, gate).backward(grad_out)

    def lokr_fwd_bwd():  # PEFT LoKr's way: materialize ΔW every step, then a full-size GEMM
        xg = x.detach().requires_grad_(True)
        delta = materialized_delta_weight(a, b, gate).to(dtype)
        F.linear(xg, w_dense + delta).backward(grad_out)

    def dequant_matmul_fwd_bwd():  # what bitsandbytes does at training sizes: dequantize, cuBLAS, twice
        xg = x.detach().requires_grad_(True)
        F.linear(xg, dequantize_nf4(w_nf4, dtype)).backward(grad_out)

    providers: dict[str, tuple[str, Callable]] = {
        "dense_linear": ("fwd", lambda: F.linear(x, w_dense)),
        "dequant_then_matmul": ("fwd", lambda: F.linear(x, dequantize_nf4(w_nf4, dtype))),
        "moka_nf4": ("fwd", moka_fwd),
        "dequant_then_matmul_train": ("fwd+bwd", dequant_matmul_fwd_bwd),
        "moka_nf4_train": ("fwd+bwd", moka_fwd_bwd),
        "lokr_materialized_dense_train": ("fwd+bwd", lokr_fwd_bwd),
    }
    if use_triton:
        from moka_kernels.ops.nf4_matmul import nf4_matmul, nf4_matmul_t

        def base_fwd_bwd():
            nf4_matmul(x, w_nf4)
            nf4_matmul_t(grad_out, w_nf4)

        providers["ours_nf4_base"] = ("fwd", lambda: nf4_matmul(x, w_nf4))
        providers["ours_nf4_base_train"] = ("fwd+bwd", base_fwd_bwd)
    try:
        import bitsandbytes as bnb

        from moka.bnb_compat import linear4bit_from_nf4

        layer4 = linear4bit_from_nf4(w_nf4, None, dtype)
        providers["bnb_matmul_4bit"] = (
            "fwd",
            lambda: bnb.matmul_4bit(x, layer4.weight.t(), quant_state=layer4.weight.quant_state),
        )
    except ImportError:
        pass

    rows = []
    macs_base = tokens * n_out * k_in
    macs_adapter = adapter_macs(shapes, tokens)
    io_bytes = (tokens * (k_in + n_out)) * torch.finfo(dtype).bits // 8
    for name, (mode, fn) in providers.items():
        fn()  # warm up: compile, autotune
        ms = measure(fn)
        row = {"n_out": n_out, "k_in": k_in, "tokens": tokens, "provider": name, "mode": mode, "ms": ms}
        if with_roofline:
            adapter = macs_adapter if name.startswith("moka") else 0
            passes = 2 if mode == "fwd+bwd" else 1  # the frozen base needs fwd + dX; the adapter about 3x
            flops = 2 * (passes * macs_base + (3 if passes == 2 else 1) * adapter)
            bound = roofline_ms(flops, 0.516 * n_out * k_in * passes + io_bytes * passes)
            row["roofline_ms"] = bound
            row["pct_of_roofline"] = 100 * bound / ms
        rows.append(row)
        print(f"{n_out:>6}x{k_in:<6} T={tokens:<5} {name:32s} {mode:8s} {ms:9.4f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MoKA kernel microbenchmarks")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for CI")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kernel_bench: --device cuda needs a CUDA GPU; use --device cpu --smoke on CPU", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    conds = conditions(device, dtype)
    with_roofline = any(name in conds["device"] for name in ("H100", "H200"))
    use_triton = device.type == "cuda"
    os.environ["MOKA_BACKEND"] = "triton" if use_triton else "torch"
    layers, token_counts = (SMOKE_LAYERS, SMOKE_TOKENS) if args.smoke else (GPU_LAYERS, GPU_TOKENS)
    measure = timer(device)
    rows = []
    for n_out, k_in in layers:
        for tokens in token_counts:
            rows.extend(bench_layer(n_out, k_in, tokens, device, dtype, use_triton, measure, with_roofline))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"conditions": conds, "rows": rows}, indent=1))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
