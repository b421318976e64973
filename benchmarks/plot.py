"""Render saved benchmark results: markdown tables and PNG plots. Reads JSON only; never measures.

python -m benchmarks.plot benchmarks/results/layers-cpu.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

__all__ = [
    "GPU_REFERENCE_RATIOS",
    "GPU_TARGETS",
    "cpu_target_check",
    "gpu_reference_ratios",
    "gpu_target_checks",
    "label",
    "render",
]

# The GPU rows' roofline: the bf16 GEMM rate and bandwidth the project's reference (REFERENCE.md §6, outside this
# repo) measured on an H200, below its spec sheet's 989 TFLOP/s and 4.8 TB/s.
PEAK_FLOPS = 790e12
PEAK_BYTES = 4.3e12


def label(row: dict) -> str:
    return f"{row['provider']}[{row['base']}]"


def _index(rows):
    return {(r["n_out"], r["k_in"], r["tokens"], label(r), r["mode"]): r for r in rows}


def roofline_ms(row: dict) -> float:
    """Lower bound of a GPU row: max(FLOPs / peak, bytes / bandwidth); NF4 weights at 0.516 B, bf16 activations."""
    n, k, t = row["n_out"], row["k_in"], row["tokens"]
    passes = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[row["mode"]]
    macs = passes * t * n * k
    adapter = row.get("adapter_macs_per_token", 0) * t
    train = row.get("adapter_train_macs_per_token", 0) * t
    macs += {"fwd": adapter, "bwd": train - adapter, "fwd+bwd": train}[row["mode"]]
    weight_bytes = (0.516 if row["base"] == "nf4" else 2.0) * n * k
    io = 2 * t * (n + k)
    return max(2 * macs / PEAK_FLOPS, passes * (weight_bytes + io) / PEAK_BYTES) * 1e3


def cpu_target_check(rows: list[dict], n: int = 2048, k: int = 2048, tokens: int = 512) -> dict | None:
    """The benchmarks issue's CPU targets on the fp32 2048², T = 512 row, or None when it is absent."""
    idx = _index(rows)
    try:
        moka = idx[(n, k, tokens, "moka_torch[dense]", "fwd+bwd")]
        lokr = idx[(n, k, tokens, "lokr_materialized[dense]", "fwd+bwd")]
        base = idx[(n, k, tokens, "dense_linear[dense]", "fwd+bwd")]
    except KeyError:
        return None
    fused = idx.get((n, k, tokens, "lokr_fused[dense]", "fwd+bwd"))
    share = moka["adapter_train_macs_per_token"] / (2 * n * k)  # adapter fwd+bwd FLOPs / base fwd+dX FLOPs
    overhead = moka["ms"] / base["ms"] - 1
    return {
        "speedup_vs_lokr": lokr["ms"] / moka["ms"],
        # the same, counting only what each adds to the frozen base's fwd + dX
        "adapter_speedup_vs_lokr": (lokr["ms"] - base["ms"]) / max(moka["ms"] - base["ms"], 1e-9),
        "lokr_over_base": lokr["ms"] / base["ms"],
        "speedup_target": 2.5,
        "overhead_vs_base": overhead,
        "adapter_flop_share": share,
        "overhead_over_share": overhead / share,
        "overhead_target": 1.5,
        "moka_ms": moka["ms"],
        "lokr_ms": lokr["ms"],
        "base_ms": base["ms"],
        "speedup_vs_lokr_fused": None if fused is None else fused["ms"] / moka["ms"],
    }


def note_lines(rows: list[dict]) -> list[str]:
    """One line per provider note; per layer where a provider's note differs between layers (MoKA's factor
    shapes), rather than the last layer's note standing for all."""
    notes: dict[str, dict[str, str]] = {}
    for r in rows:
        if r["note"]:
            notes.setdefault(label(r), {})[f"{r['n_out']}×{r['k_in']}"] = r["note"]
    lines = []
    for provider, by_layer in notes.items():
        if len(set(by_layer.values())) == 1:
            lines.append(f"- `{provider}`: {next(iter(by_layer.values()))}")
        else:
            lines += [f"- `{provider}` at {layer}: {note}" for layer, note in by_layer.items()]
    return lines


def share_table(rows: list[dict], provider: str = "moka_torch[dense]") -> list[str]:
    """Per layer, at its largest T: MoKA's fwd+bwd time over the dense base against its adapter FLOP share."""
    idx = _index(rows)
    layers = dict.fromkeys((r["n_out"], r["k_in"]) for r in rows)
    out = []
    for n, k in layers:
        tokens = max(r["tokens"] for r in rows if (r["n_out"], r["k_in"]) == (n, k))
        moka = idx.get((n, k, tokens, provider, "fwd+bwd"))
        base = idx.get((n, k, tokens, "dense_linear[dense]", "fwd+bwd"))
        if moka is None or base is None:
            continue
        lokr = idx.get((n, k, tokens, "lokr_materialized[dense]", "fwd+bwd"))
        share = moka["adapter_train_macs_per_token"] / (2 * n * k)
        overhead = moka["ms"] / base["ms"] - 1
        lokr_cell = "–" if lokr is None else f"+{100 * (lokr['ms'] / base['ms'] - 1):.0f}%"
        cells = [f"{n}×{k}", str(tokens), f"{100 * share:.0f}%", f"+{100 * overhead:.0f}%", f"{overhead / share:.2f}×"]
        out.append("| " + " | ".join([*cells, lokr_cell]) + " |")
    if not out:
        return []
    return [
        "",
        f"**`{provider}` fwd+bwd over the dense base against its adapter FLOP share** (adapter fwd+bwd FLOPs / "
        "base fwd + dX FLOPs), at each layer's largest T:",
        "",
        "| layer | T | FLOP share | MoKA over the base | ratio | LoKr-style over the base |",
        "|---|---|---|---|---|---|",
        *out,
    ]


def _table(rows: list[dict], mode: str, gpu: bool) -> list[str]:
    by_layer = defaultdict(list)
    for r in rows:
        if r["mode"] == mode:
            by_layer[(r["n_out"], r["k_in"])].append(r)
    out = []
    for (n, k), layer_rows in by_layer.items():
        tokens = sorted({r["tokens"] for r in layer_rows})
        labels = list(dict.fromkeys(label(r) for r in layer_rows))
        cell = {(label(r), r["tokens"]): r for r in layer_rows}
        legend = "; % of roofline; [host-inclusive ms of back-to-back calls] at T ≤ 16" if gpu else ""
        out.append(f"\n**{n}×{k}, {mode}** (ms; ratio to `dense_linear[dense]`{legend})\n")
        out.append(
            f"| provider | trainable | saved for bwd at T={tokens[-1]} (KB) | "
            f"peak of one {mode} at T={tokens[-1]} (KB) | " + " | ".join(f"T={t}" for t in tokens) + " |"
        )
        out.append("|---|---|---|---|" + "---|" * len(tokens))
        for lab in labels:
            first = max((r for r in layer_rows if label(r) == lab), key=lambda r: r["tokens"])
            cells = []
            for t in tokens:
                r = cell.get((lab, t))
                base = cell.get(("dense_linear[dense]", t))
                if r is None:
                    cells.append("–")
                    continue
                text = f"{r['ms']:.3f}"
                if base is not None:
                    text += f" ({r['ms'] / base['ms']:.2f}×)"
                if gpu:
                    text += f" {100 * roofline_ms(r) / r['ms']:.0f}%"
                if r.get("wall_ms") is not None:  # host-inclusive, back-to-back calls
                    text += f" [host-incl. {r['wall_ms']:.3f}]"
                cells.append(text)
            # a provider whose largest T is not the layer's (a failed or time-cut cell): its own T is named
            at = "" if first["tokens"] == tokens[-1] else f" (T={first['tokens']})"
            saved = f"{first['saved_bytes'] / 1024:,.0f}{at}"
            peak = "–" if first.get("peak_bytes") is None else f"{first['peak_bytes'] / 1024:,.0f}{at}"
            out.append(f"| {lab} | {first['trainable']:,} | {saved} | {peak} | " + " | ".join(cells) + " |")
    return out


# The benchmarks issue's GPU layer targets: (what, numerator, denominator, mode, token counts, bound).
# A ratio ≤ bound is met; the bnb-over-ours row is a speedup, so its bound is a floor (≥).
GPU_TARGETS = [
    ("fused NF4+MoKA fwd / our NF4 base", "moka_triton[nf4]", "ours_nf4[nf4]", "fwd", lambda t: t == 4096, 1.15),
    ("fused NF4+MoKA fwd / our NF4 base", "moka_triton[nf4]", "ours_nf4[nf4]", "fwd", lambda t: t <= 16, 1.05),
    ("fused NF4+MoKA fwd+bwd / our NF4 base", "moka_triton[nf4]", "ours_nf4[nf4]", "fwd+bwd", lambda t: True, 1.3),
    ("our NF4 base / dequantize + cuBLAS", "ours_nf4[nf4]", "dequant_cublas[nf4]", "fwd", lambda t: t >= 512, 1.1),
    ("our NF4 base / dequantize + cuBLAS", "ours_nf4[nf4]", "dequant_cublas[nf4]", "fwd+bwd", lambda t: t >= 512, 1.1),
    ("dequantize + cuBLAS / our NF4 base", "dequant_cublas[nf4]", "ours_nf4[nf4]", "fwd", lambda t: t <= 16, -2.0),
]
# Ratios shown beside the targets, not scored: QLoRA's base as users run it (matmul_4bit: bitsandbytes' GEMV at
# T = 1 without grad) against ours.
GPU_REFERENCE_RATIOS = [
    ("bitsandbytes matmul_4bit / our NF4 base", "bnb_nf4[nf4]", "ours_nf4[nf4]", "fwd", lambda t: t <= 16),
]


def gpu_target_checks(rows: list[dict]) -> list[dict]:
    """Every GPU layer target on every layer and token count that has both rows: ratio, bound and whether
    it is met (negative bounds are floors: the ratio must be at least |bound|). ``timer``: "device" (``ms``,
    do_bench, which hides host time behind its L2 flush), and again "host-incl." (``wall_ms``, back-to-back
    calls) where both rows have it (CUDA, T ≤ 16, where launches and host work may bound a call)."""
    idx = _index(rows)
    checks = []
    for n, k, t in sorted({(r["n_out"], r["k_in"], r["tokens"]) for r in rows}):
        for what, num, den, mode, applies, bound in GPU_TARGETS:
            top, bottom = idx.get((n, k, t, num, mode)), idx.get((n, k, t, den, mode))
            if not applies(t) or top is None or bottom is None:
                continue
            for timer, key in (("device", "ms"), ("host-incl.", "wall_ms")):
                if top.get(key) is None or bottom.get(key) is None:
                    continue
                ratio = top[key] / bottom[key]
                met = ratio >= -bound if bound < 0 else ratio <= bound
                checks.append(
                    dict(
                        target=what,
                        layer=f"{n}×{k}",
                        tokens=t,
                        mode=mode,
                        timer=timer,
                        ratio=ratio,
                        bound=bound,
                        met=met,
                    )
                )
    return checks


def gpu_reference_ratios(rows: list[dict]) -> list[dict]:
    """The unscored comparisons of ``GPU_REFERENCE_RATIOS`` on every layer and token count that has both rows."""
    idx = _index(rows)
    ratios = []
    for n, k, t in sorted({(r["n_out"], r["k_in"], r["tokens"]) for r in rows}):
        for what, num, den, mode, applies in GPU_REFERENCE_RATIOS:
            top, bottom = idx.get((n, k, t, num, mode)), idx.get((n, k, t, den, mode))
            if applies(t) and top is not None and bottom is not None:
                ratios.append(dict(what=what, layer=f"{n}×{k}", tokens=t, mode=mode, ratio=top["ms"] / bottom["ms"]))
    return ratios


def _gpu_target_lines(rows: list[dict]) -> list[str]:
    checks = gpu_target_checks(rows)
    references = gpu_reference_ratios(rows)
    lines = _gpu_check_table(checks)
    if references:
        lines += [
            "",
            "For reference (not targets):",
            "",
            "| ratio | layer | T | mode | value |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['what']} | {c['layer']} | {c['tokens']} | {c['mode']} | {c['ratio']:.2f}× |" for c in references
        ]
    return lines


def _gpu_check_table(checks: list[dict]) -> list[str]:
    if not checks:
        return []
    met = sum(c["met"] for c in checks)
    lines = ["", f"GPU layer targets ({met} of {len(checks)} met):", ""]
    lines += ["| target | layer | T | mode | timer | ratio | bound | |", "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        bound = f"≥ {-c['bound']:.2f}×" if c["bound"] < 0 else f"≤ {c['bound']:.2f}×"
        verdict = "met" if c["met"] else "MISSED"
        lines.append(
            f"| {c['target']} | {c['layer']} | {c['tokens']} | {c['mode']} | {c.get('timer', 'device')} | "
            f"{c['ratio']:.2f}× | {bound} | {verdict} |"
        )
    return lines


def failure_lines(data: dict) -> list[str]:
    """Markdown lines listing what a result file's run failed to measure (``errors``; none: no lines)."""
    errors = data.get("errors") or []
    return ["", "Failed (not measured):", "", *(f"- {e['what']}: {e['error']}" for e in errors)] if errors else []


def render(path: Path) -> Path:
    """Write ``<stem>.md`` and ``<stem>-*.png`` next to the JSON file; returns the markdown path."""
    path = Path(path)
    data = json.loads(path.read_text())
    conds, rows = data["conditions"], data["rows"]
    gpu = "cpu" not in conds["device"]
    lines = [f"# Layer benchmarks: {path.stem}", "", "Conditions: " + ", ".join(f"{k}={v}" for k, v in conds.items())]
    lines += failure_lines(data)
    check = cpu_target_check(rows)
    if check is not None:
        lines += [
            "",
            "CPU targets (fp32, 2048×2048, T = 512, fwd+bwd):",
            f"- MoKA (PyTorch path) vs LoKr-style materialization: {check['speedup_vs_lokr']:.2f}× faster "
            f"(target ≥ {check['speedup_target']}×): {'met' if check['speedup_vs_lokr'] >= 2.5 else 'MISSED'}. "
            f"LoKr-style (PEFT's way: base(x) + F.linear(x, ΔW)) takes {check['lokr_over_base']:.2f}× the base "
            f"alone; MoKA at the base GEMM's FLOP rate would take {1 + check['adapter_flop_share']:.2f}×, so "
            f"{check['lokr_over_base'] / (1 + check['adapter_flop_share']):.2f}× is the most its FLOPs allow here; "
            f"counting only the time each adds to the base, MoKA's adapter is "
            f"{check['adapter_speedup_vs_lokr']:.2f}× faster than LoKr's.",
            *(
                [
                    f"- Against the stricter comparator, ΔW added to W0 for one GEMM (lokr_fused, not PEFT's way): "
                    f"{check['speedup_vs_lokr_fused']:.2f}× faster."
                ]
                if check["speedup_vs_lokr_fused"] is not None
                else []
            ),
            f"- MoKA time over the base alone: +{100 * check['overhead_vs_base']:.1f}% against an adapter FLOP "
            f"share of {100 * check['adapter_flop_share']:.1f}% = {check['overhead_over_share']:.2f}× the share "
            f"(target ≤ {check['overhead_target']}×): {'met' if check['overhead_over_share'] <= 1.5 else 'MISSED'}",
        ]
    lines += _gpu_target_lines(rows) if gpu else []
    lines += share_table(rows, "moka_triton[dense]" if gpu else "moka_torch[dense]")
    for mode in ("fwd", "fwd+bwd", "bwd"):
        lines += _table(rows, mode, gpu)
    lines += ["", "Provider notes:", *note_lines(rows)]
    md = path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    _plots(path, rows)
    return md


def _plots(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys((r["n_out"], r["k_in"]) for r in rows))
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=plt.cm.tab20.colors)  # > 10 providers: distinct colours
    for mode in ("fwd", "fwd+bwd"):
        fig, axes = plt.subplots(2, len(layers), figsize=(4.2 * len(layers), 7.5), squeeze=False)
        for col, (n, k) in enumerate(layers):
            layer_rows = [r for r in rows if (r["n_out"], r["k_in"]) == (n, k) and r["mode"] == mode]
            base = {r["tokens"]: r["ms"] for r in layer_rows if label(r) == "dense_linear[dense]"}
            for lab in dict.fromkeys(label(r) for r in layer_rows):
                series = sorted((r["tokens"], r["ms"]) for r in layer_rows if label(r) == lab)
                t, ms = zip(*series, strict=True)
                style = "-" if lab.startswith("moka") else "--"
                axes[0][col].plot(t, ms, style, marker="o", label=lab)
                if base:
                    axes[1][col].plot(
                        t, [m / base[x] for x, m in zip(t, ms, strict=True)], style, marker="o", label=lab
                    )
            axes[0][col].set(title=f"{n}×{k} {mode}", xscale="log", yscale="log", xlabel="tokens", ylabel="ms")
            axes[1][col].set(xscale="log", yscale="log", xlabel="tokens", ylabel="time / dense_linear")
            for ax in axes[:, col]:
                ax.grid(alpha=0.3, which="both")
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        fig.tight_layout()
        fig.savefig(path.with_name(f"{path.stem}-{mode.replace('+', '')}.png"), dpi=110)
        plt.close(fig)


# File-name prefix -> the module whose ``render`` turns that kind of results file into markdown (and plots).
RENDERERS = {
    "e2e-": "e2e",
    "schedule-": "schedule",
    "launches": "launches",
    "overhead-": "overhead",
    "tiles": "tiles",
    "registers": "registers",
    "layers-": "plot",
}


def render_any(path: Path) -> Path:
    """Render a results file of any kind the benchmarks write (the prefixes of ``RENDERERS``)."""
    import importlib

    path = Path(path)
    for prefix, module in RENDERERS.items():
        if path.name.startswith(prefix):
            return importlib.import_module(f"benchmarks.{module}").render(path)
    raise ValueError(f"{path}: not a results file the benchmarks write ({', '.join(RENDERERS)})")


if __name__ == "__main__":
    # Every file named, or every results file; others (the GPU suite's env.json) are skipped, not fatal.
    for arg in sys.argv[1:] or [str(p) for p in sorted((Path(__file__).parent / "results").glob("*.json"))]:
        try:
            print(render_any(Path(arg)))
        except ValueError as err:
            print(f"skipped: {err}", file=sys.stderr)
