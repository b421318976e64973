"""Registers and register spills of the Triton kernels, per tile set: ``python -m benchmarks.registers``.

Counted, not timed, and without a GPU: each kernel is compiled for sm_80 and sm_90 (``triton.compile``
with an explicit target) and ``ptxas -v`` reports its registers per thread and its spill stores
(``moka_kernels.ops.aot``). Rows:

* the three Kronecker kernels (both sandwich schedules, the token reduction) in bf16 at every tile set the
  fp32-tile limits allow (``tile_sets(register_budget=False)``), marked by whether the register budget
  (``TILE_ELEMENTS``) lets the chooser pick it;
* the same kernels with fp32 inputs (the IEEE-precision dot an fp32 model's layers run) at every tile set the
  register budget allows (from which the sets fp32 layers are held to, ``FP32_TILE_SETS``, were read);
* the NF4 GEMMs' autotune configs in bf16 (forward without the adapter, and the transposed GEMM).

Writes ``<out>/registers.json`` (with the conditions) and ``.md``. Run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from moka_kernels.ops import aot
from moka_kernels.ops import kron_mixture as km

from .run import RESULTS, conditions, write_json

KRON_KERNELS = ("_kron_sandwich_grouped_kernel", "_kron_sandwich_rowwise_kernel", "_kron_token_reduce_grouped_kernel")
TILE_NAMES = {
    "_kron_token_reduce_grouped_kernel": ("BLOCK_N", "BLOCK_J", "BLOCK_K", "BLOCK_M"),  # as the launcher maps
}


def _tile_set(kernel: str, constexprs: dict) -> tuple[int, ...]:
    names = TILE_NAMES.get(kernel, ("BLOCK_P", "BLOCK_J", "BLOCK_L", "BLOCK_Q"))
    return tuple(constexprs[n] for n in names)


def chosen_variants(smoke: bool) -> list[aot.Variant]:
    sets = km.tile_sets(register_budget=False)
    if smoke:
        sets = [(16, 16, 16, 16), (128, 64, 64, 32)]
    out = [v for blocks in sets for v in aot.kron_variants(blocks)]
    out += [
        v for blocks in sets if blocks in km.tile_sets(True) for v in aot.kron_variants(blocks, "fp32", ("1-fp32",))
    ]
    nf4 = [
        v
        for v in aot.variants()
        if v.kernel in ("_nf4_matmul_kernel", "_nf4_matmul_t_kernel")
        and "*bf16" in v.pointer_types.values()
        and not v.constexprs.get("HAS_ADAPTER")
        and v.constexprs.get("SPLIT_K", 1) == 1
        and not v.constexprs.get("ROWS_64")
    ]
    return out + (nf4[:1] if smoke else nf4)


def ptxas_version() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return subprocess.check_output([get_ptxas(90).path, "--version"], text=True).strip().splitlines()[-1]


def render(path: Path) -> Path:
    """registers.md from registers.json (never compiles)."""
    data = json.loads(path.read_text())
    rows, conds = data["rows"], data["conditions"]
    budget = {tuple(b) for b in km.tile_sets(True)}
    lines = [f"# Registers and spills: {path.stem}", ""]
    lines.append("Conditions: " + ", ".join(f"{k}={v}" for k, v in conds.items()))
    lines += ["", "Counted by ptxas, not timed. Spills are spill-store bytes per thread.", ""]
    lines += ["**Kronecker kernels, bf16, every tile set under the fp32-tile limits**", ""]
    over = f"over {km.SPILL_TOLERANCE_BYTES} B"
    lines.append(f"| kernel | target | sets | spilling | {over} | largest spill | in budget | {over} in budget |")
    lines.append("|---|---|---|---|---|---|---|---|")
    ieee = [r for r in rows if r["constexprs"].get("DOT_FP32")]
    rows = [r for r in rows if not r["constexprs"].get("DOT_FP32")]
    for kernel in KRON_KERNELS:
        for cc in (80, 90):
            mine = [r for r in rows if r["kernel"] == kernel and r["capability"] == cc]
            if not mine:
                continue
            inside = [r["spill_bytes"] for r in mine if tuple(r["tile_set"]) in budget]
            spills = [r["spill_bytes"] for r in mine]
            cells = [
                kernel.strip("_"),
                f"sm_{cc}",
                len(mine),
                sum(s > 0 for s in spills),
                sum(s > km.SPILL_TOLERANCE_BYTES for s in spills),
            ]
            cells += [
                f"{max(spills)} B",
                len(inside),
                f"{sum(s > km.SPILL_TOLERANCE_BYTES for s in inside)} (largest {max(inside, default=0)} B)",
            ]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    if ieee:
        lines += [
            "",
            "**Kronecker kernels, fp32 inputs (the IEEE-precision dot), every tile set within the bf16 budget**",
        ]
        lines += ["", f"| kernel | target | sets | spilling | {over} | largest spill | largest registers |"]
        lines.append("|---|---|---|---|---|---|---|")
        for kernel in KRON_KERNELS:
            for cc in (80, 90):
                spills = [r["spill_bytes"] for r in ieee if r["kernel"] == kernel and r["capability"] == cc]
                if not spills:
                    continue
                regs = max(r["registers"] for r in ieee if r["kernel"] == kernel and r["capability"] == cc)
                cells = [kernel.strip("_"), f"sm_{cc}", len(spills), sum(s > 0 for s in spills)]
                cells += [sum(s > km.SPILL_TOLERANCE_BYTES for s in spills), f"{max(spills)} B", regs]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
        sets = {tuple(r["tile_set"]) for r in ieee}
        spilling = {tuple(r["tile_set"]) for r in ieee if r["spill_bytes"] > km.SPILL_TOLERANCE_BYTES}
        lines += [
            "",
            f"{len(sets) - len(spilling)} of {len(sets)} tile sets spill at most {km.SPILL_TOLERANCE_BYTES} B ",
        ]
        lines[-1] += "in every kernel and target with fp32 inputs (the register budget is set for bf16); "
        chosen = set(km.tile_sets(True, fp32_operands=True))
        lines[-1] += f"the chooser picks fp32 layers' tiles from {len(chosen)} sets (`FP32_TILE_SETS`), " + (
            "exactly these." if chosen == sets - spilling else f"of which {len(chosen - (sets - spilling))} not."
        )
    lines += ["", "**NF4 GEMM autotune configs, bf16** (registers / spill bytes)", ""]
    lines.append("| kernel | BLOCK_M × N × K | warps | stages | sm_80 | sm_90 |")
    lines.append("|---|---|---|---|---|---|")
    configs: dict[tuple, dict[int, str]] = {}
    for r in rows:
        if r["kernel"].startswith("_nf4"):
            c = r["constexprs"]
            key = (
                r["kernel"].strip("_"),
                f"{c['BLOCK_M']}×{c['BLOCK_N']}×{c['BLOCK_K']}",
                r["num_warps"],
                r["num_stages"],
            )
            # the first of a key is the default layout (blocksize 64, double quantization); the variants that
            # follow it (another blocksize, fp32 scales, 64-bit rows) share its tiles and would overwrite it
            configs.setdefault(key, {}).setdefault(r["capability"], f"{r['registers']} / {r['spill_bytes']} B")
    for key, by_cc in configs.items():
        lines.append(f"| {' | '.join(map(str, key))} | {by_cc.get(80, '–')} | {by_cc.get(90, '–')} |")
    out = path.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="registers and spills of the Triton kernels (ptxas, no GPU)")
    parser.add_argument("--smoke", action="store_true", help="two tile sets, one NF4 config")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("benchmarks.registers: unset TRITON_INTERPRET (the interpreter replaces the kernels)", file=sys.stderr)
        return 2
    import torch

    conds = conditions(torch.device("cpu"), torch.bfloat16, 0.0)
    for key in ("device", "torch_threads", "timer", "min_run_time"):
        conds.pop(key, None)
    conds.update(ptxas=ptxas_version(), targets="sm_80, sm_90a", smoke=args.smoke)
    path = args.out / ("registers-smoke" if args.smoke else "registers")
    results = aot.compile_all(chosen=chosen_variants(args.smoke))
    rows = []
    for r in results:
        row = {
            "kernel": r.kernel,
            "capability": r.capability,
            "constexprs": r.constexprs,
            "num_warps": r.num_warps,
            "num_stages": r.num_stages,
            "registers": r.registers,
            "spill_bytes": r.spill_bytes,
            "error": r.error,
        }
        if r.kernel in KRON_KERNELS:
            row["tile_set"] = list(_tile_set(r.kernel, r.constexprs))
        rows.append(row)
    write_json(path, conds, rows)
    render(path.with_suffix(".json"))
    print(f"wrote {path.with_suffix('.json')} and .md", flush=True)
    return 0 if all(r["error"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
