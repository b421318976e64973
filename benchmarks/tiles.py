"""Multiply-adds the adapter kernels execute, padding included: ``python -m benchmarks.tiles``.

One launch runs every component of a layer with one set of tile sizes (``kron_mixture.choose_blocks``),
so components smaller than a tile are padded, and a tile recomputes the shared inner product for its own
rows. What that costs is a property of the shapes and tile sizes, not of the machine, so it is counted
exactly here (no kernel runs): for each contraction of a layer (adapter forward, its dx, the factor
gradients' token reduction: every raw gradient, as a training step with the gate asks for) the tiles the
launch would take under each policy (``min-work``, the default, and ``max``, the previous one), and per token

* ``ideal``: the multiply-adds of the contraction in its cheaper order (what the PyTorch path does);
* ``executed``: what the tiles execute (``padded_work`` without its per-dot charges), as a multiple of
  ``ideal`` and of the base GEMM's N·K.

Writes ``<out>/tiles.json`` (with the conditions) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch

from moka.config import auto_component_shapes
from moka_kernels.ops import kron_mixture as km
from moka_kernels.reference import GradRequest, factor_requests

from .run import RESULTS, conditions, write_json

LAYERS = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (576, 576), (192, 576)]
LAYERS += [(1536, 576), (576, 1536)]
POLICIES = ("min-work", "max")


def contraction_dims(n_out: int, k_in: int, r: int) -> dict[str, list[tuple[int, int, int, int]]]:
    """(P, J, L, Q) of every job of each contraction, from the kernels' own job builders."""
    shapes = auto_component_shapes(n_out, k_in, r)
    a_f = [torch.zeros(a1, a2) for a1, a2, _, _ in shapes]
    b_f = [torch.zeros(b1, b2) for _, _, b1, b2 in shapes]
    x, y = torch.zeros(1, k_in), torch.zeros(1, n_out)
    needs = GradRequest(True, False, False, True, (True,) * r, (True,) * r)

    def sandwich(jobs):
        return [(s1.rows, s1.cols, m.cols, s2.cols) for m, s1, s2, _ in jobs]

    reduce_jobs = km._factor_grad_jobs(y, x, a_f, b_f, factor_requests(needs, r))
    return {
        "forward": sandwich(km._forward_jobs(x, y, a_f, b_f)),
        "dx": sandwich(km._dx_jobs(y, torch.zeros(1, k_in), a_f, b_f)),
        "factor grads": [(right.cols, shared.cols, left.cols, left.rows) for left, shared, right, _ in reduce_jobs],
    }


def count_layer(n_out: int, k_in: int, r: int) -> dict:
    """{contraction: {"ideal", policy: {"blocks", "executed"}}} in multiply-adds per token."""
    out = {}
    for name, dims in contraction_dims(n_out, k_in, r).items():
        row: dict = {"ideal": sum(j * l_ * q + p * j * q for p, j, l_, q in dims)}
        for policy in POLICIES:
            with mock.patch.dict(os.environ, {"MOKA_TILE_POLICY": policy}):
                blocks = km.choose_blocks(dims)
            row[policy] = {
                "blocks": list(blocks),
                "executed": sum(km.padded_work(d, blocks, dot_overhead=0, min_dot_outputs=0) for d in dims),
            }
        out[name] = row
    return out


def render(path: Path) -> Path:
    data = json.loads(path.read_text())
    lines = [
        f"# Adapter multiply-adds executed per token: {path.stem}",
        "",
        "Conditions: " + ", ".join(f"{k}={v}" for k, v in data["conditions"].items()),
        "",
        "Counted, not timed. Per contraction: the tiles each policy picks (BLOCK_P × J × L × Q; for the factor "
        "gradients' reduction, the same form transposed: BLOCK_N × J × K × M), and the multiply-adds they execute "
        "per token as a multiple of the contraction's own (ideal) and of the base GEMM's N·K.",
        "",
        "| layer | contraction | ideal / N·K | min-work tiles | executed / ideal | executed / N·K | max tiles "
        "| executed / ideal | executed / N·K |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        base = row["n_out"] * row["k_in"]
        for name, c in row["contractions"].items():
            cells = [f"{c['ideal'] / base:.3f}"]
            for policy in POLICIES:
                executed = c[policy]["executed"]
                blocks = "×".join(map(str, c[policy]["blocks"]))
                cells += [blocks, f"{executed / c['ideal']:.2f}", f"{executed / base:.3f}"]
            lines.append(f"| {row['n_out']}×{row['k_in']} r={row['r']} | {name} | " + " | ".join(cells) + " |")
    md = path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="adapter multiply-adds executed per token, padding included")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--components", type=int, default=5, help="MoKA components r")
    parser.add_argument("--smoke", action="store_true", help="two layers (CI)")
    args = parser.parse_args(argv)
    if args.components < 1:
        print(f"benchmarks.tiles: --components must be >= 1, got {args.components}", file=sys.stderr)
        return 2
    rows = []
    for n_out, k_in in LAYERS[:2] if args.smoke else LAYERS:
        counts = count_layer(n_out, k_in, args.components)
        rows.append({"n_out": n_out, "k_in": k_in, "r": args.components, "contractions": counts})
        print(
            f"{n_out}x{k_in}: "
            + "  ".join(
                f"{name} {c['min-work']['executed'] / c['ideal']:.2f}x (max {c['max']['executed'] / c['ideal']:.2f}x)"
                for name, c in counts.items()
            )
        )
    conds = conditions(torch.device("cpu"), torch.float32, 0.0)
    for key in ("timer", "torch_threads", "dtype"):
        conds.pop(key, None)
    conds.update(
        components=args.components,
        dot_overhead_macs_in_choice=km.DOT_OVERHEAD_MACS,
        min_dot_outputs_in_choice=km.MIN_DOT_OUTPUTS,
    )
    path = args.out / ("tiles-smoke.json" if args.smoke else "tiles.json")
    write_json(path, conds, rows)
    print(f"wrote {path} and {render(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
