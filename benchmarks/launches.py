"""Device operations per layer call: ``python -m benchmarks.launches``.

At decode sizes a layer's GPU time is a handful of microseconds, so what it costs is how many kernels it
launches (each is a few µs of host work and a gap on the GPU) and whether it ever waits for the device.
Both are properties of the code, not of the machine, so they are counted exactly here, on CPU: the Triton
kernels run in the interpreter (``TRITON_INTERPRET=1``, set by this module when there is no GPU) and each
launch is counted, and every aten op that runs a kernel is counted by a ``TorchDispatchMode`` (views and
allocations run none and are left out). ``_local_scalar_dense`` (``.item()``, a host sync) is reported
separately.

Routes, one layer, forward alone and fwd+bwd (gradients for x, every factor and the gate; no bias):

* ``nf4 base (ours)``: ``nf4_matmul`` + ``nf4_matmul_t``, the base alone (its dX);
* ``dense base``: ``x @ Wᵀ`` + ``dy @ W``;
* ``moka nf4 triton``: MoKA on the NF4 base through the eager route of ``moka_linear``, Triton backend
  (what CUDA tensors take);
* ``moka nf4 triton deterministic``: the same under ``torch.use_deterministic_algorithms(True)``;
* ``moka dense triton``, ``moka nf4 torch`` (the PyTorch path);
* ``moka nf4 module`` (host time only: a dispatch mode would send it through the custom op): a
  ``MoKALinear`` on the NF4 base, what a patched model calls (the module, input validation, then the eager
  route), on the Triton backend;
* ``bf16 model, fp32 factors``: MoKA on a bf16 NF4 base with fp32 factors (``MoKALinear``'s default
  adapter dtype on a bf16 model), the module's eager route; ``bf16 model, factors cast per call``: the same
  with each factor cast to bf16 in the call, as the module did before the kernels took fp32 factors;
* ``peft lora r16``: PEFT's LoRA layer on the dense base (bitsandbytes' own CUDA kernels would not be
  seen by the dispatch mode, so QLoRA is left out rather than undercounted).

Host time per call (``host_us``): the same calls timed with every Triton launch replaced by a no-op, for
the routes whose device work is all Triton kernels and small aten ops (HOST_ROUTES), and for scale PEFT's
LoRA layer at T = 1 (whose three matmuls then run on CPU: a few µs of its time at these sizes). It is the Python and
dispatcher time our code spends per call: what a GPU cannot hide when its kernels are shorter (decoding,
small layers). Triton's own launcher (argument binding, cache lookup, the driver call) is not in it, as
it needs a GPU; the aten ops do run (on CPU, on tensors of a few hundred elements).

Writes ``<out>/launches.json`` (with the conditions) and ``.md``.
"""

from __future__ import annotations

import os

import torch

if __name__ == "__main__" and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # as a script on CPU: before any kernel is defined

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from unittest import mock

from torch.utils._python_dispatch import TorchDispatchMode

from moka import MoKAConfig, MoKALinear
from moka.config import auto_component_shapes
from moka_kernels import library, quantize_nf4

from .providers import build_case
from .run import RESULTS, conditions

ROUTES = [
    "nf4 base (ours)",
    "dense base",
    "moka nf4 triton",
    "moka nf4 triton deterministic",
    "moka dense triton",
    "moka nf4 torch",
    "peft lora r16",
    "bf16 model, fp32 factors",
    "bf16 model, factors cast per call",
]
HOST_ROUTES = ["nf4 base (ours)", "moka nf4 triton", "moka nf4 triton deterministic", "moka nf4 module"]
HOST_ROUTES += ["peft lora r16"]

# aten ops that run no kernel: allocations, and metadata-only ops not flagged as views in their schema.
NO_KERNEL = {
    "empty.memory_format",
    "empty_strided.default",
    "empty_like.default",
    "new_empty.default",
    "new_empty_strided.default",
    "detach.default",
    "lift_fresh.default",
    "_unsafe_view.default",
    "_local_scalar_dense.default",
}


class LaunchCounter(TorchDispatchMode):
    """Counts aten ops that run a kernel, and host syncs; Triton launches are counted by ``counting``."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs = 0
        self.triton = 0
        self.inside_triton = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside_triton:
            return func(*args, **(kwargs or {}))
        name = func._opname + "." + func._overloadname
        returns = func._schema.returns
        is_view = bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
        makes_tensor = any(isinstance(r.type, torch.TensorType) for r in returns)
        # in-place ops that return nothing (``_foreach_copy_``) still run a kernel
        writes_in_place = not returns and any(
            a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments
        )
        if name == "_local_scalar_dense.default":
            self.syncs += 1
        elif ((makes_tensor and not is_view) or writes_in_place) and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values()) + self.triton


def _patch_triton_launches(counter_ref: list) -> None:
    """Count every Triton kernel launch (compiled or interpreted) into the active counter."""
    from triton.runtime import interpreter, jit

    for cls in (interpreter.InterpretedFunction, jit.JITFunction):
        if getattr(cls.run, "_moka_counted", False):
            continue
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            if _SKIP_TRITON[0]:
                return None
            counter = counter_ref[0]
            if counter is None or counter.inside_triton:
                return _original(self, *args, **kwargs)
            counter.triton += 1
            counter.inside_triton = True  # the interpreter's own tensor copies are not launches
            try:
                return _original(self, *args, **kwargs)
            finally:
                counter.inside_triton = False

        run._moka_counted = True
        cls.run = run


_ACTIVE: list = [None]
_SKIP_TRITON: list = [False]


def count(fn) -> LaunchCounter:
    """Run fn once to warm up (autotuning, caches), then count one more call."""
    _patch_triton_launches(_ACTIVE)
    fn()
    counter = LaunchCounter()
    _ACTIVE[0] = counter
    try:
        with counter:
            fn()
    finally:
        _ACTIVE[0] = None
    return counter


def host_us(fn, calls: int = 200, repeats: int = 7) -> float:
    """Microseconds of host time per call of fn with every Triton launch a no-op (best of ``repeats``)."""
    _patch_triton_launches(_ACTIVE)
    fn()  # compile/autotune and fill the caches with the kernels running
    _SKIP_TRITON[0] = True
    try:
        for _ in range(calls // 4):
            fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - start) / calls)
    finally:
        _SKIP_TRITON[0] = False
    return best * 1e6


def count_routes(
    n_out: int, k_in: int, tokens: int, r: int, device: torch.device, dtype, host_calls: int = 200
) -> dict:
    """{route: {"launches", "syncs", "triton", "aten"[, "host_us", "fwd_host_us"]}} for one layer and token
    count (host times for HOST_ROUTES)."""
    from moka_kernels.ops.nf4_matmul import nf4_matmul, nf4_matmul_t

    gen = torch.Generator().manual_seed(0)
    shapes = auto_component_shapes(n_out, k_in, r)
    dense = (torch.randn(n_out, k_in, generator=gen) / k_in**0.5).to(device, dtype)
    nf4 = quantize_nf4(dense, blocksize=64)
    a_f = [torch.randn(a1, a2, generator=gen).to(device, dtype).requires_grad_() for a1, a2, _, _ in shapes]
    b_f = [torch.randn(b1, b2, generator=gen).to(device, dtype).requires_grad_() for _, _, b1, b2 in shapes]
    gate = torch.zeros(len(shapes), device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(tokens, k_in, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(tokens, n_out, generator=gen).to(device, dtype)
    params = [x, gate, *a_f, *b_f]

    def moka(weight, backend, deterministic=False):
        # The eager route that moka_linear takes outside tracing (under a dispatch mode, such as this
        # counter, moka_linear itself would take the custom op).
        def call(backward):
            for p in params:
                p.grad = None
            was = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic)
            try:
                out = library.apply_linear(x, None, weight, None, gate, 1.0, a_f, b_f, backend, use_custom_op=False)
                if backward:
                    out.backward(dy)
            finally:
                torch.use_deterministic_algorithms(was)

        return call

    lora = build_case("lora_r16", n_out, k_in, device, dtype, base="dense")

    def peft_lora(backward):
        for p in lora.forward.parameters():
            p.grad = None
        x.grad = None
        out = lora.forward(x)
        if backward:
            out.backward(dy)

    module = MoKALinear(nf4, MoKAConfig(num_components=r))
    with torch.no_grad():  # both factors nonzero, as after some training
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05, generator=gen)

    def moka_module(backward):
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x)
        if backward:
            out.backward(dy)

    # A bf16 model's MoKALinear keeps fp32 factors (the default adapter dtype): the Triton path copies them
    # into bf16 in one launch per call; before, the module cast each one (2r launches, and 2r gradient casts).
    half = torch.bfloat16
    module_half = MoKALinear(quantize_nf4(dense.to(half), blocksize=64), MoKAConfig(num_components=r))
    with torch.no_grad():
        for p in module_half.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05, generator=gen)
    x_half = x.detach().to(half).requires_grad_()
    dy_half = dy.to(half)

    def half_model(cast_per_call: bool):
        # what the module passes on (its eager route; under this counter's dispatch mode the module itself
        # would take the custom op)
        def call(backward):
            m = module_half
            m.zero_grad(set_to_none=True)
            x_half.grad = None
            a_f32, b_f32 = list(m.a_factors), list(m.b_factors)
            a_in = [a.to(half) for a in a_f32] if cast_per_call else a_f32
            b_in = [b.to(half) for b in b_f32] if cast_per_call else b_f32
            weight = m.base_weight()
            out = library.apply_linear(x_half, None, weight, None, m.gate_logits, 1.0, a_in, b_in, "triton", False)
            if backward:
                out.backward(dy_half)

        return call

    x_d = x.detach()
    calls = {
        "nf4 base (ours)": lambda backward: (nf4_matmul(x_d, nf4), backward and nf4_matmul_t(dy, nf4)),
        "dense base": lambda backward: (x_d @ dense.t(), backward and dy @ dense),
        "moka nf4 triton": moka(nf4, "triton"),
        "moka nf4 triton deterministic": moka(nf4, "triton", deterministic=True),
        "moka dense triton": moka(dense, "triton"),
        "moka nf4 torch": moka(nf4, "torch"),
        "peft lora r16": peft_lora,
        "bf16 model, fp32 factors": half_model(cast_per_call=False),
        "bf16 model, factors cast per call": half_model(cast_per_call=True),
    }
    out = {}
    for name, fn in calls.items():
        c = count(lambda fn=fn: fn(True))
        f = count(lambda fn=fn: fn(False))
        out[name] = {
            "launches": c.total,
            "fwd_launches": f.total,
            "syncs": c.syncs + f.syncs,
            "triton": c.triton,
            "aten": dict(sorted(c.ops.items())),
        }
        # LoRA's matmuls run on CPU here: host time only where their arithmetic is negligible (T = 1)
        if name in HOST_ROUTES and host_calls and (name != "peft lora r16" or tokens == 1):
            out[name]["host_us"] = host_us(lambda fn=fn: fn(True), host_calls)
            out[name]["fwd_host_us"] = host_us(lambda fn=fn: fn(False), host_calls)
    if host_calls:
        with mock.patch.dict(os.environ, {"MOKA_BACKEND": "triton"}):  # set once, outside the timed calls
            out["moka nf4 module"] = {
                "host_us": host_us(lambda: moka_module(True), host_calls),
                "fwd_host_us": host_us(lambda: moka_module(False), host_calls),
            }
    return out


def _columns(rows: list[dict], preferred: list[str], key: str) -> list[str]:
    """The routes a results file measured ``key`` for, in ``preferred`` order then its own: runs from before
    a route was added (or after one was renamed) render with the columns they have."""
    present = list(dict.fromkeys(name for row in rows for name, cell in row["routes"].items() if key in cell))
    return [n for n in preferred if n in present] + [n for n in present if n not in preferred]


def render(path: Path) -> Path:
    data = json.loads(path.read_text())
    routes, host_routes = _columns(data["rows"], ROUTES, "launches"), _columns(data["rows"], HOST_ROUTES, "host_us")
    lines = [
        f"# Device operations per layer call: {path.stem}",
        "",
        "Conditions: " + ", ".join(f"{k}={v}" for k, v in data["conditions"].items()),
        "",
        "Kernel launches per call, forward / forward+backward (Triton launches + aten ops that run a kernel), "
        "counted exactly; host syncs in brackets where not 0.",
        "",
        "| layer | T | " + " | ".join(routes) + " |",
        "|---|---|" + "---|" * len(routes),
    ]
    for row in data["rows"]:
        cells = []
        for name in routes:
            c = row["routes"].get(name, {})
            if "launches" not in c:
                cells.append("—")
                continue
            cells.append(f"{c['fwd_launches']} / {c['launches']}" + (f" [{c['syncs']} syncs]" if c["syncs"] else ""))
        lines.append(f"| {row['n_out']}×{row['k_in']} r={row['r']} | {row['tokens']} | " + " | ".join(cells) + " |")
    host_rows = [row for row in data["rows"] if any("host_us" in row["routes"].get(n, {}) for n in host_routes)]
    if host_rows:
        lines += [
            "",
            "Host time per call, forward / forward+backward (µs): our Python and the dispatcher with every Triton "
            "launch a no-op (Triton's own launcher, which needs a GPU, not included; aten ops run on CPU"
            + (", so PEFT LoRA's includes its three small matmuls" if "peft lora r16" in host_routes else "")
            + "). Best of 7 rounds of repeated calls.",
            "",
            "| layer | T | " + " | ".join(host_routes) + " |",
            "|---|---|" + "---|" * len(host_routes),
        ]
        for row in host_rows:
            cells = [
                f"{row['routes'][n]['fwd_host_us']:.1f} / {row['routes'][n]['host_us']:.1f}"
                if "host_us" in row["routes"].get(n, {})
                else "—"
                for n in host_routes
            ]
            lines.append(f"| {row['n_out']}×{row['k_in']} r={row['r']} | {row['tokens']} | " + " | ".join(cells) + " |")
    md = path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kernel launches per MoKA layer call, counted exactly")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--components", type=int, default=5, help="MoKA components r")
    parser.add_argument("--smoke", action="store_true", help="one tiny layer (CI)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from moka_kernels.ops import INTERPRET

    if device.type == "cpu" and not INTERPRET:
        print("benchmarks.launches: on CPU the Triton kernels need TRITON_INTERPRET=1 before import", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Counts depend on the code path, not the size: small layers keep the interpreter quick.
    layers = [(64, 128)] if args.smoke else [(256, 256), (128, 512)]
    rows = []
    for n_out, k_in in layers:
        for tokens in (1, 64):  # split-K decode path, and the prefill/training path
            routes = count_routes(n_out, k_in, tokens, args.components, device, dtype, 20 if args.smoke else 200)
            rows.append({"n_out": n_out, "k_in": k_in, "r": args.components, "tokens": tokens, "routes": routes})
            print(
                f"{n_out}x{k_in} T={tokens}: "
                + "  ".join(f"{k} {routes[k]['fwd_launches']}/{routes[k]['launches']}" for k in ROUTES)
            )
    conds = conditions(device, dtype, 0.0)
    conds.pop("timer", None)
    conds.update(components=args.components, triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("launches-smoke.json" if args.smoke else "launches.json")
    path.write_text(json.dumps({"conditions": conds, "rows": rows}, indent=1))
    print(f"wrote {path} and {render(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
