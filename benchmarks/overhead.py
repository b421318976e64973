"""Per-call overhead of the routes into the MoKA op at small token counts: ``python -m benchmarks.overhead``.

One layer, r components, fwd+bwd per call, side by side in one process:

* ``backend functions``: the backend's forward and hand-written backward called directly, no autograd: the floor;
* ``eager route``: ``library.apply_linear`` through the plain ``autograd.Function`` (what eager calls take);
* ``custom-op route``: the same through the registered ``moka::linear`` op (what ``torch.compile`` traces);
* ``moka_linear``: the public op (input validation + the eager route);
* ``peft lora r16``: PEFT's LoRA layer on the same dense base, for scale.

Writes ``<out>/overhead-<device>.json`` (with the conditions) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moka.config import MoKAConfig, auto_component_shapes
from moka_kernels import library, moka_linear
from moka_kernels.reference import GradRequest

from .plot import failure_lines
from .providers import build_case
from .run import (
    RESULTS,
    conditions,
    failure,
    host_inclusive_timer,
    make_timer,
    write_conditions_first,
    write_json,
)

ROUTES = ["backend functions", "eager route", "custom-op route", "moka_linear", "peft lora r16"]


def measure_routes(
    n_out: int, k_in: int, tokens: int, r: int, device: torch.device, dtype, measure, backend: str | None = None
) -> dict:
    """Milliseconds per fwd+bwd call for every route on one layer (backend: triton on CUDA, else torch)."""
    gen = torch.Generator().manual_seed(0)
    shapes = auto_component_shapes(n_out, k_in, r)
    weight = (torch.randn(n_out, k_in, generator=gen) / k_in**0.5).to(device, dtype)
    master = MoKAConfig().resolved_adapter_dtype(dtype)  # fp32 factors and logits, as MoKALinear keeps them
    a_factors = [torch.randn(a1, a2, generator=gen).to(device, master).requires_grad_() for a1, a2, _, _ in shapes]
    b_factors = [torch.randn(b1, b2, generator=gen).to(device, master).requires_grad_() for _, _, b1, b2 in shapes]
    gate = torch.zeros(len(shapes), device=device, dtype=master, requires_grad=True)
    x = torch.randn(tokens, k_in, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(tokens, n_out, generator=gen).to(device, dtype)
    backend = backend or ("triton" if device.type == "cuda" else "torch")
    forward, backward = library.BACKEND_IMPLS[backend]
    needs = GradRequest(True, False, False, True, (True,) * len(shapes), (True,) * len(shapes))
    detached = [t.detach() for t in (x, gate, *a_factors, *b_factors)]
    x_d, gate_d, factors_d = detached[0], detached[1], detached[2:]
    a_d, b_d = factors_d[: len(shapes)], factors_d[len(shapes) :]

    def backend_functions():
        forward(x_d, None, weight, None, gate_d, 1.0, a_d, b_d)
        backward(dy, x_d, None, weight, gate_d, 1.0, a_d, b_d, needs)

    leaves = [x, gate, *a_factors, *b_factors]

    def fresh_grads():  # a training step's zero_grad(set_to_none=True): no accumulating add_ per leaf
        for t in leaves:
            t.grad = None

    def route(use_custom_op):
        def call():
            fresh_grads()
            out = library.apply_linear(
                x, None, weight, None, gate, 1.0, a_factors, b_factors, backend, use_custom_op=use_custom_op
            )
            out.backward(dy)

        return call

    def public():
        fresh_grads()
        moka_linear(x, weight, a_factors, b_factors, gate).backward(dy)

    lora = build_case("lora_r16", n_out, k_in, device, dtype, base="dense")

    def peft_lora():
        for t in (x, *lora.params):
            t.grad = None
        lora.forward(x).backward(dy)

    calls = dict(zip(ROUTES, [backend_functions, route(False), route(True), public, peft_lora], strict=True))
    return {name: measure(fn) for name, fn in calls.items()}


def render(path: Path) -> Path:
    data = json.loads(path.read_text())
    lines = [
        f"# Per-call overhead: {path.stem}",
        "",
        "Conditions: " + ", ".join(f"{k}={v}" for k, v in data["conditions"].items()),
        *failure_lines(data),
        "",
        "fwd+bwd per call (ms); the eager route is what `moka_linear` takes outside tracing.",
        "",
        "| layer | T | " + " | ".join(ROUTES) + " |",
        "|---|---|" + "---|" * len(ROUTES),
    ]
    for row in data["rows"]:
        cells = " | ".join(f"{row['ms'][name]:.3f}" for name in ROUTES)
        lines.append(f"| {row['n_out']}×{row['k_in']} | {row['tokens']} | {cells} |")
    md = path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="per-call overhead of the routes into the MoKA op")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--components", type=int, default=4, help="MoKA components r")
    parser.add_argument("--smoke", action="store_true", help="one tiny layer, seconds (CI)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks.overhead: --device cuda needs a CUDA GPU; run --device cpu here", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    min_run_time = 0.05 if args.smoke else 0.5
    # on CUDA host time is the subject: do_bench's L2 flush before each call would hide most of it
    measure = host_inclusive_timer() if device.type == "cuda" else make_timer(device, min_run_time)
    layers = [(48, 64)] if args.smoke else [(576, 576), (2048, 2048)]
    tokens = [1] if args.smoke else [1, 16]
    conds = conditions(device, dtype, min_run_time)
    timer = "host-inclusive: median of 5 rounds of 20 back-to-back calls" if device.type == "cuda" else "torch Timer"
    conds.update(components=args.components, smoke=args.smoke, timer=timer, complete=False)
    path = args.out / f"overhead-{'smoke' if args.smoke else args.device}.json"
    rows, errors = [], []
    write_conditions_first(path, conds)
    for n_out, k_in in layers:
        for t in tokens:
            try:
                ms = measure_routes(n_out, k_in, t, args.components, device, dtype, measure)
            except Exception as err:  # one failing layer costs its own row only
                errors.append(failure(f"{n_out}x{k_in} T={t}", err, device))
                continue
            rows.append({"n_out": n_out, "k_in": k_in, "tokens": t, "ms": ms})
            print(f"{n_out}x{k_in} T={t}: " + "  ".join(f"{k} {v:.3f}" for k, v in ms.items()), flush=True)
            write_json(path, conds, rows, errors)
    conds["complete"] = True
    write_json(path, conds, rows, errors)
    print(f"wrote {path} and {render(path)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
