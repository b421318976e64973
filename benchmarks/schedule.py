"""The adapter kernel's two schedules side by side: ``python -m benchmarks.schedule --device cuda``.

``moka_kernels.ops.kron_mixture`` runs all r components in one launch, split either as ``atomic`` (a
program per token, tile and component, fp32 atomics into a zeroed buffer) or ``rowwise`` (a program per
token, owning its output row through all components). ``ROWWISE_MIN_TOKENS`` picks between them; this
sweep measures both at each token count, for the adapter forward and its dx, next to our NF4 base GEMM
alone, so a GPU run can set the threshold from data; the NF4 base by its two routes (``nf4-fwd`` /
``nf4-dx``: the fused dequant-GEMM kernels, or ``nf4_dequantize`` + cuBLAS), to set
``nf4_matmul.DEQUANTIZE_MIN_TOKENS`` the same way; at T ≤ 16 also the whole decode forward with the
adapter's programs inside the NF4 GEMV's launch (``fused``) and as their own launch (``separate``,
``MOKA_DECODE_FUSION=0``); and the adapter forward with the tile sizes of the previous policy
(``fwd-maxtiles``: each the largest any component needs, ``MOKA_TILE_POLICY=max``) against the chooser's
(least padded work). Times are medians of ``triton.testing.do_bench``
(ms); on CPU only ``--smoke`` runs (the interpreter, to keep the script working; its times mean nothing).

Writes ``<out>/schedule-<device>.json`` (with the conditions) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from moka.config import auto_component_shapes
from moka_kernels import quantize_nf4

from .plot import failure_lines
from .run import (
    RESULTS,
    conditions,
    failure,
    host_inclusive_timer,
    make_timer,
    write_conditions_first,
    write_json,
)

SCHEDULES = ("atomic", "rowwise")
ROUTE_MIN_SWEPT = 64  # below this the NF4 base takes the fused (decode) route whatever the threshold


def measure_schedules(n_out: int, k_in: int, tokens: int, r: int, device, dtype, measure) -> dict:
    """ms per call: adapter forward and dx under each schedule, and the NF4 base GEMM alone."""
    from moka_kernels.ops.kron_mixture import kron_mixture_backward_dx, kron_mixture_forward
    from moka_kernels.ops.nf4_matmul import nf4_matmul

    gen = torch.Generator().manual_seed(0)
    shapes = auto_component_shapes(n_out, k_in, r)
    a_f = [(torch.randn(a1, a2, generator=gen) / a2**0.5).to(device, dtype) for a1, a2, _, _ in shapes]
    b_f = [(torch.randn(b1, b2, generator=gen) / b2**0.5).to(device, dtype) for _, _, b1, b2 in shapes]
    x = torch.randn(tokens, k_in, generator=gen).to(device, dtype)
    dy = torch.randn(tokens, n_out, generator=gen).to(device, dtype)
    logits = torch.randn(len(shapes), generator=gen).to(device)
    coeffs = torch.softmax(logits, 0)
    weight = quantize_nf4((torch.randn(n_out, k_in, generator=gen) * 0.02).to(device, dtype))
    row = {"nf4-fwd fused": measure(lambda: nf4_matmul(x, weight))}
    if tokens >= ROUTE_MIN_SWEPT:  # the NF4 base's two routes, to place DEQUANTIZE_MIN_TOKENS
        from moka_kernels.ops.fused_linear import _base_matmul, _base_matmul_t

        for route in ("fused", "dequantize"):
            with mock.patch.dict(os.environ, {"MOKA_NF4_ROUTE": route}):
                if route == "dequantize":
                    row["nf4-fwd dequantize"] = measure(lambda: _base_matmul(x, weight, None, None))
                row[f"nf4-dx {route}"] = measure(lambda: _base_matmul_t(dy, weight, None))
    if tokens <= 16:  # the decode forward: adapter programs inside the GEMV's launch, or their own launch
        from moka_kernels.ops.fused_linear import moka_forward_triton

        for fused in ("1", "0"):
            with mock.patch.dict(os.environ, {"MOKA_DECODE_FUSION": fused}):
                row[f"decode fwd {'fused' if fused == '1' else 'separate'}"] = measure(
                    lambda: moka_forward_triton(x, None, weight, None, logits, 1.0, a_f, b_f)
                )
    for schedule in SCHEDULES:
        with mock.patch.dict(os.environ, {"MOKA_ADAPTER_SCHEDULE": schedule, "MOKA_TILE_POLICY": "min-work"}):
            row[f"fwd {schedule}"] = measure(lambda: kron_mixture_forward(x, a_f, b_f, gate_logits=logits))
            row[f"dx {schedule}"] = measure(lambda: kron_mixture_backward_dx(dy, a_f, b_f, coeffs))
        with mock.patch.dict(os.environ, {"MOKA_ADAPTER_SCHEDULE": schedule, "MOKA_TILE_POLICY": "max"}):
            row[f"fwd-maxtiles {schedule}"] = measure(lambda: kron_mixture_forward(x, a_f, b_f, gate_logits=logits))
    return row


def _once(fn) -> float:
    """Smoke mode: one call, timed (the script's plumbing is what is under test, not the speed)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _host_inclusive(row: dict) -> dict | None:
    """A row's host-inclusive times (back-to-back calls; CUDA, T ≤ 16) as a row of its own, or None."""
    if not row.get("wall_ms"):
        return None
    return dict(row, ms=row["wall_ms"], tokens=f"{row['tokens']} (host-incl.)")


def render(path: Path) -> Path:
    data = json.loads(path.read_text())
    columns = [f"nf4-{kind} {route}" for kind in ("fwd", "dx") for route in ("fused", "dequantize")]
    columns += [f"{kind} {s}" for kind in ("fwd", "fwd-maxtiles", "dx") for s in SCHEDULES]
    columns += ["decode fwd fused", "decode fwd separate"]
    lines = [
        f"# Adapter schedules: {path.stem}",
        "",
        "Conditions: " + ", ".join(f"{k}={v}" for k, v in data["conditions"].items()),
        *failure_lines(data),
        "",
        "ms per call (median of do_bench, which flushes L2 before each call and so hides host time; rows marked "
        "host-incl.: back-to-back calls, host work included); the NF4 base alone by both routes (the fused "
        "dequant-GEMM, and one decode launch + cuBLAS), forward and dx; the faster of each pair in bold.",
        "",
        "| layer | r | T | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for row in (r for base in data["rows"] for r in (base, _host_inclusive(base)) if r is not None):
        ms = row["ms"]
        cells = []
        for name in columns:
            if name not in ms:
                cells.append("—")
                continue
            group = [c for c in columns if c.rsplit(" ", 1)[0] == name.rsplit(" ", 1)[0] and c in ms]
            best = len(group) > 1 and ms[name] == min(ms[c] for c in group)
            cells.append(f"**{ms[name]:.4f}**" if best else f"{ms[name]:.4f}")
        lines.append(f"| {row['n_out']}×{row['k_in']} | {row['r']} | {row['tokens']} | " + " | ".join(cells) + " |")
    md = path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the adapter kernel's atomic and rowwise schedules, side by side")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--components", type=int, default=5, help="MoKA components r")
    parser.add_argument("--smoke", action="store_true", help="one tiny layer (CI; CPU needs TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    from moka_kernels.ops import INTERPRET

    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.schedule: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.device == "cpu" and not (args.smoke and INTERPRET):
        print("benchmarks.schedule: on CPU only --smoke runs, with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    measure = _once if args.smoke else make_timer(device, 0.01)
    layers = [(64, 128)] if args.smoke else [(4096, 4096), (4096, 14336)]
    tokens = [1, 64] if args.smoke else [1, 16, 64, 128, 256, 512, 2048, 4096]  # 64, 256: the crossovers
    conds = conditions(device, dtype, 0.01)
    conds.update(components=args.components, smoke=args.smoke, complete=False)
    path = args.out / f"schedule-{'smoke' if args.smoke else args.device}.json"
    rows, errors = [], []
    write_conditions_first(path, conds)
    for n_out, k_in in layers:
        for t in tokens:
            try:
                ms = measure_schedules(n_out, k_in, t, args.components, device, dtype, measure)
                # at T ≤ 16 launches and host work may decide between schedules: timed host-inclusive too
                wall = None
                if device.type == "cuda" and t <= 16:
                    wall = measure_schedules(n_out, k_in, t, args.components, device, dtype, host_inclusive_timer())
            except Exception as err:  # one failing layer costs its own row only
                errors.append(failure(f"{n_out}x{k_in} T={t}", err, device))
                continue
            rows.append({"n_out": n_out, "k_in": k_in, "r": args.components, "tokens": t, "ms": ms, "wall_ms": wall})
            print(f"{n_out}x{k_in} T={t}: " + "  ".join(f"{k} {v:.4f}" for k, v in ms.items()), flush=True)
            write_json(path, conds, rows, errors)
    conds["complete"] = True
    write_json(path, conds, rows, errors)
    print(f"wrote {path} and {render(path)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
