"""The benchmark scripts keep working: tiny CPU runs (timings are not checked; speed lives in benchmarks/)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from benchmarks import plot, run

ROOT = Path(__file__).resolve().parents[1]


def test_layer_runner_smoke_writes_results_and_renders(tmp_path, monkeypatch):
    monkeypatch.delenv("MOKA_BACKEND", raising=False)
    assert run.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "layers-smoke.json").read_text())
    assert {"device", "torch", "git_sha", "date", "timer", "cpu"} <= set(data["conditions"])
    assert torch.backends.cpu.get_cpu_capability() in data["conditions"]["cpu"]
    labels = {plot.label(r) for r in data["rows"]}
    assert {"dense_linear[dense]", "moka_torch[nf4]", "lokr_materialized[dense]", "lora_equal[dense]"} <= labels
    assert {r["mode"] for r in data["rows"]} == {"fwd", "bwd", "fwd+bwd"}
    assert all(r["ms"] > 0 for r in data["rows"])
    moka = next(r for r in data["rows"] if plot.label(r) == "moka_torch[dense]")
    assert moka["trainable"] > 0 and moka["adapter_train_macs_per_token"] > moka["adapter_macs_per_token"] > 0
    assert all(r["peak_bytes"] > 0 for r in data["rows"])
    peak = {(plot.label(r), r["mode"], r["tokens"]): r["peak_bytes"] for r in data["rows"]}
    # LoKr-style forms r full-size ΔW matrices; MoKA forms none, so it holds less at once.
    assert peak[("lokr_materialized[dense]", "fwd+bwd", 16)] > peak[("moka_torch[dense]", "fwd+bwd", 16)]
    saved = {plot.label(r): r["saved_bytes"] for r in data["rows"] if r["tokens"] == 16 and r["mode"] == "fwd"}
    # our NF4 base runs as moka_linear does: W decoded again in the backward, nothing weight-sized saved
    assert saved["ours_nf4[nf4]"] == 0 and saved["moka_torch[nf4]"] == 0
    assert saved["lokr_fused[dense]"] > 0 and saved["lokr_materialized[dense]"] > 0
    assert all(r["wall_ms"] is None for r in data["rows"])  # host-inclusive timing: CUDA, T <= 16 only
    md = (tmp_path / "layers-smoke.md").read_text()
    assert md.startswith("# Layer benchmarks") and "| 48×64 | 16 |" in md  # the FLOP-share table's row
    assert (tmp_path / "layers-smoke-fwdbwd.png").stat().st_size > 1000
    assert (tmp_path / "layers-smoke.csv").read_text().startswith("provider,")


def test_layer_runner_keeps_the_rows_of_a_killed_run(tmp_path, monkeypatch):
    """The GPU suite kills a part at its time limit: every row measured before that is already on disk,
    marked incomplete."""
    calls = []

    def run_layer(provider, base, n_out, k_in, tokens, *args):
        if tokens == 16:
            raise KeyboardInterrupt  # stands in for the kill
        calls.append(provider)
        return [{"provider": provider, "base": base, "tokens": tokens, "mode": "fwd", "ms": 1.0}]

    monkeypatch.setattr(run, "run_layer", run_layer)
    with pytest.raises(KeyboardInterrupt):
        run.main(["--smoke", "--out", str(tmp_path), "--providers", "dense_linear,lokr_materialized"])
    data = json.loads((tmp_path / "layers-smoke.json").read_text())
    assert data["conditions"]["complete"] is False
    assert [row["provider"] for row in data["rows"]] == calls and len(calls) == 2


def test_cpu_peak_bytes_is_the_most_held_at_once():
    from benchmarks.memory import peak_bytes

    mib = 2**20

    def allocations():
        first = torch.empty(mib // 4)  # 1 MiB of fp32
        del first
        second, third = torch.empty(mib // 2), torch.empty(mib // 2)  # 2 MiB + 2 MiB held together
        return second.sum() + third.sum()

    peak = peak_bytes(allocations, torch.device("cpu"))
    assert 4 * mib <= peak < 4 * mib + 4096, peak


def test_cpu_target_check_reads_the_target_row():
    rows = []
    for label, ms in [("dense_linear", 40.0), ("moka_torch", 50.0), ("lokr_materialized", 100.0)]:
        rows.append(
            {
                "provider": label,
                "base": "dense",
                "n_out": 2048,
                "k_in": 2048,
                "tokens": 512,
                "mode": "fwd+bwd",
                "ms": ms,
                "adapter_train_macs_per_token": 2048 * 2048 * 2 // 5,
            }
        )
    check = plot.cpu_target_check(rows)
    assert check["speedup_vs_lokr"] == 2.0 and abs(check["adapter_flop_share"] - 0.2) < 1e-6
    assert abs(check["overhead_over_share"] - 1.25) < 1e-6 and check["adapter_speedup_vs_lokr"] == 6.0


def test_pytest_benchmark_file_runs_in_smoke_mode():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOKA_BACKEND")}
    env.update(MOKA_BENCH_SMOKE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks/",
            "--benchmark-disable",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's refusal of --device cuda")
def test_runner_without_gpu_fails_with_one_line(capsys, tmp_path):
    assert run.main(["--device", "cuda", "--out", "/nonexistent"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert run.main(["--smoke", "--out", str(tmp_path), "--providers", "moka_torch,mokka"]) == 2
    assert "--providers: unknown ['mokka']" in capsys.readouterr().err
    assert run.main(["--smoke", "--out", str(tmp_path), "--providers", "moka_triton"]) == 2  # CUDA only
    assert "none of ['moka_triton'] runs on cpu" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_plot_cli_renders_every_results_file_and_skips_others(tmp_path):
    """The GPU suite renders "$out"/*.json, its env.json too: that one is skipped, the rest rendered."""
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "H200"}))
    assert run.main(["--smoke", "--out", str(tmp_path), "--providers", "dense_linear", "--tag", "layers-v1.2"]) == 0
    (tmp_path / "layers-v1.2.md").unlink()  # a dotted --tag keeps its whole name
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.plot", str(tmp_path / "env.json"), str(tmp_path / "layers-v1.2.json")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped:" in proc.stderr and (tmp_path / "layers-v1.2.md").is_file()


def test_every_committed_results_file_renders_to_its_committed_markdown(tmp_path):
    """The documented re-render (``python -m benchmarks.plot benchmarks/results/*.json``) works on every
    committed run, older ones with fewer routes or columns too, and reproduces the committed tables."""
    results = ROOT / "benchmarks" / "results"
    files = sorted(results.glob("*.json"))
    assert len(files) >= 5
    for source in files:
        copy = tmp_path / source.name
        shutil.copy(source, copy)
        rendered = plot.render_any(copy)
        assert rendered.read_text() == (results / rendered.name).read_text(), source.name


def test_e2e_smoke_runs_every_tiny_method(tmp_path):
    from benchmarks import e2e

    old_row = {"model": "smollm2", "method": "moka", "base": "NF4", "error": "from an earlier run"}
    earlier = {"conditions": {"git_sha": "OLD", "seq": 512}, "rows": [old_row]}
    (tmp_path / "e2e-cpu-smoke.json").write_text(json.dumps(earlier))
    assert e2e.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e-cpu-smoke.json").read_text())
    (kept,) = [r for r in data["rows"] if r["model"] == "smollm2"]  # not re-run: kept with its own conditions
    assert kept["conditions"] == earlier["conditions"] and data["conditions"]["git_sha"] != "OLD"
    assert "Rows of smollm2 are from an earlier run: git_sha=OLD" in (tmp_path / "e2e-cpu-smoke.md").read_text()
    data["rows"] = [r for r in data["rows"] if r["model"] == "tiny"]
    methods = {r["method"]: r for r in data["rows"]}
    assert set(methods) == set(e2e.METHODS["tiny"])
    for name, row in methods.items():
        assert "error" not in row, (name, row.get("error"))
        assert row["step_seconds"] > 0 and row["peak_memory_mb"] > 0 and row["step_peak_mb"] > 0
    assert methods["frozen_base"]["trainable"] == 0 and methods["moka"]["trainable"] > 0
    assert "| tiny |" in (tmp_path / "e2e-cpu-smoke.md").read_text()
    assert (tmp_path / "e2e-cpu-smoke.png").stat().st_size > 1000
    from benchmarks import plot as plot_module

    # The plot CLI re-renders any kind of results file without measuring.
    assert plot_module.render_any(tmp_path / "e2e-cpu-smoke.json").name == "e2e-cpu-smoke.md"


def test_a_failing_provider_costs_its_own_cells_only(tmp_path, monkeypatch, capsys):
    """On the one GPU call a provider that raises (a kernel, an OOM) must not end the part: its cells are
    recorded as failures (after two, its later cells are skipped), the others measured and rendered."""

    def run_layer(provider, base, n_out, k_in, tokens, *args):
        if provider == "lokr_materialized":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return [
            {
                "provider": provider,
                "base": base,
                "n_out": n_out,
                "k_in": k_in,
                "tokens": tokens,
                "mode": m,
                "ms": 1.0,
                "trainable": 0,
                "adapter_macs_per_token": 0,
                "adapter_train_macs_per_token": 0,
                "saved_bytes": 0,
                "peak_bytes": 1,
                "note": "",
            }
            for m in ("fwd", "bwd", "fwd+bwd")
        ]

    monkeypatch.setattr(run, "run_layer", run_layer)
    monkeypatch.setitem(run.TOKENS, "smoke", [1, 2, 3, 4])
    assert run.main(["--smoke", "--out", str(tmp_path), "--providers", "dense_linear,lokr_materialized"]) == 0
    data = json.loads((tmp_path / "layers-smoke.json").read_text())
    assert data["conditions"]["complete"] is True and {r["provider"] for r in data["rows"]} == {"dense_linear"}
    cells = len(run.LAYERS["smoke"]) * len(run.TOKENS["smoke"])
    assert len(data["rows"]) == 3 * cells and len(data["errors"]) == cells
    assert data["errors"][0]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert [e["error"].startswith("skipped") for e in data["errors"]] == [False, False] + [True] * (cells - 2)
    md = (tmp_path / "layers-smoke.md").read_text()
    assert "Failed (not measured):" in md and "- lokr_materialized[dense] " in md
    assert "FAILED lokr_materialized[dense]" in capsys.readouterr().err
    monkeypatch.setattr(run, "run_layer", lambda *a: 1 / 0)
    assert run.main(["--smoke", "--out", str(tmp_path), "--providers", "dense_linear"]) == 1


@pytest.mark.parametrize("module_name, function", [("overhead", "measure_routes"), ("schedule", "measure_schedules")])
def test_overhead_and_schedule_record_a_failing_layer_and_go_on(tmp_path, monkeypatch, module_name, function):
    import importlib

    module = importlib.import_module(f"benchmarks.{module_name}")
    monkeypatch.setattr(module, function, lambda *a: (_ for _ in ()).throw(RuntimeError("triton: out of resources")))
    import moka_kernels.ops

    monkeypatch.setattr(moka_kernels.ops, "INTERPRET", True)  # schedule's CPU guard; nothing is launched
    assert module.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob(f"{module_name}-smoke.json")
    data = json.loads(path.read_text())
    assert data["rows"] == [] and data["errors"][0]["error"] == "RuntimeError: triton: out of resources"
    assert "Failed (not measured):" in path.with_suffix(".md").read_text()


def test_overhead_smoke_measures_every_route(tmp_path):
    from benchmarks import overhead

    assert overhead.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "overhead-smoke.json").read_text())
    (row,) = data["rows"]
    assert set(row["ms"]) == set(overhead.ROUTES) and all(v > 0 for v in row["ms"].values())
    assert "| 48×64 | 1 |" in (tmp_path / "overhead-smoke.md").read_text()


def test_triton_provider_runs_through_the_layer_runner_in_the_interpreter(monkeypatch):
    """The GPU-only provider's code path, on CPU tensors in the Triton interpreter (set in conftest.py)."""
    monkeypatch.delenv("MOKA_BACKEND", raising=False)

    def run_once(fn):
        fn()
        return 1.0

    for base in ("nf4", "dense"):
        rows = run.run_layer("moka_triton", base, 48, 64, 5, torch.device("cpu"), torch.float32, run_once, r=2)
        assert [r["mode"] for r in rows] == list(run.MODES)
        assert all(r["peak_bytes"] > 0 and r["trainable"] > 0 for r in rows)
    assert "MOKA_BACKEND" not in os.environ  # the runner restores the environment


def test_gpu_results_render_with_roofline_column(tmp_path):
    """A GPU results file (hand-made rows) renders each cell's % of the roofline bound."""
    n = k = tokens = 4096
    rows = [
        {
            "provider": provider,
            "base": base,
            "n_out": n,
            "k_in": k,
            "tokens": tokens,
            "mode": "fwd",
            "ms": ms,
            "trainable": 0,
            "adapter_macs_per_token": 0,
            "adapter_train_macs_per_token": 0,
            "saved_bytes": 0,
            "peak_bytes": 2**20,
            "note": "",
        }
        for provider, base, ms in [("dense_linear", "dense", 0.25), ("ours_nf4", "nf4", 0.5)]
    ]
    # bf16 4096³ forward: 2·4096³ FLOPs at 790 TFLOP/s = 0.174 ms, above its 100.7 MB at 4.3 TB/s (0.023 ms).
    assert abs(plot.roofline_ms(rows[0]) - 2 * 4096**3 / 790e12 * 1e3) < 1e-9
    path = tmp_path / "layers-cuda.json"
    path.write_text(json.dumps({"conditions": {"device": "NVIDIA H200", "dtype": "bfloat16"}, "rows": rows}))
    text = plot.render(path).read_text()
    assert "% of roofline" in text
    assert "| dense_linear[dense] | 0 | 0 | 1,024 | 0.250 (1.00×) 70% |" in text
    assert "| ours_nf4[nf4] | 0 | 0 | 1,024 | 0.500 (2.00×) 35% |" in text


def test_gpu_targets_are_checked_on_every_row_they_apply_to(tmp_path):
    """Hand-made GPU rows: each target is computed where it applies (by T and mode), met or MISSED."""

    def row(provider, tokens, mode, ms):
        return dict(provider=provider, base="nf4", n_out=4096, k_in=4096, tokens=tokens, mode=mode, ms=ms)

    rows = [
        row("ours_nf4", 16, "fwd", 0.010),
        row("moka_triton", 16, "fwd", 0.0104),  # 1.04× ≤ 1.05: met
        row("dequant_cublas", 16, "fwd", 0.019),  # 1.9× faster than dequantize + cuBLAS, < 2: MISSED
        row("ours_nf4", 4096, "fwd", 0.300),
        row("moka_triton", 4096, "fwd", 0.360),  # 1.20× > 1.15: MISSED
        row("dequant_cublas", 4096, "fwd", 0.290),  # ours 1.03× of it ≤ 1.1: met
        row("bnb_nf4", 16, "fwd", 0.008),  # matmul_4bit's GEMV faster than ours: 0.8× < 1, MISSED
        row("ours_nf4", 4096, "fwd+bwd", 0.9),
        row("moka_triton", 4096, "fwd+bwd", 1.08),  # 1.2× ≤ 1.3: met
    ]
    checks = {(c["target"], c["tokens"], c["mode"]): c for c in plot.gpu_target_checks(rows)}
    fused, base_vs_bnb = "fused NF4+MoKA fwd / our NF4 base", "our NF4 base / dequantize + cuBLAS"
    expected = {
        (fused, 16, "fwd"): (1.04, True),
        ("dequantize + cuBLAS / our NF4 base", 16, "fwd"): (1.9, False),
        (fused, 4096, "fwd"): (1.2, False),
        (base_vs_bnb, 4096, "fwd"): (0.3 / 0.29, True),
        ("fused NF4+MoKA fwd+bwd / our NF4 base", 4096, "fwd+bwd"): (1.2, True),
    }
    assert checks.keys() == expected.keys()  # the T ≤ 16 fwd bound is not applied at 4096, nor 1.15 at 16
    for key, (ratio, met) in expected.items():
        assert abs(checks[key]["ratio"] - ratio) < 1e-9 and checks[key]["met"] is met, key
    path = tmp_path / "layers-cuda.json"
    full = [dict(r, trainable=0, saved_bytes=0, peak_bytes=None, note="") for r in rows]
    path.write_text(json.dumps({"conditions": {"device": "NVIDIA H200"}, "rows": full}))
    text = plot.render(path).read_text()
    assert "GPU layer targets (3 of 5 met):" in text  # the bitsandbytes comparison is shown, not scored
    assert "| fused NF4+MoKA fwd / our NF4 base | 4096×4096 | 16 | fwd | device | 1.04× | ≤ 1.05× | met |" in text
    # with host-inclusive times (CUDA, T ≤ 16) the T ≤ 16 targets are judged on them too
    timed = {("moka_triton", 16): 0.031, ("ours_nf4", 16): 0.020, ("dequant_cublas", 16): 0.050}
    walled = [dict(r, wall_ms=timed.get((r["provider"], r["tokens"]))) for r in rows]
    host = {(c["target"], c["tokens"]): c for c in plot.gpu_target_checks(walled) if c["timer"] == "host-incl."}
    assert host.keys() == {(fused, 16), ("dequantize + cuBLAS / our NF4 base", 16)}
    assert abs(host[fused, 16]["ratio"] - 1.55) < 1e-9 and not host[fused, 16]["met"]
    assert abs(host["dequantize + cuBLAS / our NF4 base", 16]["ratio"] - 2.5) < 1e-9
    assert host["dequantize + cuBLAS / our NF4 base", 16]["met"]
    assert [(c["what"], c["ratio"]) for c in plot.gpu_reference_ratios(rows)] == [
        ("bitsandbytes matmul_4bit / our NF4 base", 0.8)
    ]
    assert "| bitsandbytes matmul_4bit / our NF4 base | 4096×4096 | 16 | fwd | 0.80× |" in text
    assert "| fused NF4+MoKA fwd / our NF4 base | 4096×4096 | 4096 | fwd | device | 1.20× | ≤ 1.15× | MISSED |" in text
    assert "| dequantize + cuBLAS / our NF4 base | 4096×4096 | 16 | fwd | device | 1.90× | ≥ 2.00× | MISSED |" in text


def test_random_llama_preset_quantizes_in_memory_and_trains(monkeypatch):
    """The GPU e2e model (a LLaMA preset with random weights, NF4 in memory), at toy size on CPU."""
    import bitsandbytes as bnb

    from benchmarks import e2e

    toy = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    monkeypatch.setitem(e2e.LLAMA_PRESETS, "toy-llama", toy)
    monkeypatch.setitem(e2e.METHODS, "toy-llama", e2e.METHODS["llama2-7b"])
    model, base = e2e.build_model("toy-llama", "moka", torch.device("cpu"), layers=2)
    assert base == "random toy-llama weights, 2 layers, NF4 (double quant), float32 compute"
    assert len(model.model.layers) == 2
    projections = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in e2e.TARGETS]
    assert len(projections) == 14 and all(isinstance(m, bnb.nn.Linear4bit) for m in projections)
    assert all(m.weight.quant_state is not None and m.weight.quant_state.nested for m in projections)
    for method in ("moka", "lora_r16", "lokr_bf16"):
        row = e2e.measure_one("toy-llama", method, 1, 2, 8, torch.device("cpu"), layers=2)
        assert "error" not in row, row
        assert row["trainable"] > 0 and row["step_seconds"] > 0 and row["step_peak_mb"] > 0


def test_overhead_routes_on_the_triton_backend_in_the_interpreter(monkeypatch):
    """The GPU run's overhead routes (Triton backend), on CPU tensors in the interpreter."""
    from benchmarks import overhead

    monkeypatch.setenv("MOKA_BACKEND", "triton")
    calls = []

    def run_once(fn):
        fn()
        calls.append(fn)
        return 1.0

    ms = overhead.measure_routes(24, 32, 3, 2, torch.device("cpu"), torch.float32, run_once, backend="triton")
    assert set(ms) == set(overhead.ROUTES) and len(calls) == len(overhead.ROUTES)


def test_launch_counts_one_grouped_launch_per_adapter_contraction(tmp_path):
    """Exact kernel counts per fwd+bwd call (r = 5): the Triton backend launches the adapter forward, its
    dx, all factor reductions and their finishing pass once each whatever r is, in deterministic mode too,
    and no small torch op for the gate (the coefficients are formed in the kernels)."""
    from benchmarks import launches

    assert launches.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "launches-smoke.json").read_text())
    r = data["conditions"]["components"]
    assert r == 5 and [row["tokens"] for row in data["rows"]] == [1, 64]
    for row in data["rows"]:
        routes = row["routes"]
        assert set(routes) == {*launches.ROUTES, "moka nf4 module"}  # the module: host time only
        assert all(routes[name]["syncs"] == 0 for name in launches.ROUTES), "a host sync in a layer call"
        # base fwd + adapter fwd (one launch when decoding), adapter dx + base dX + the reductions + finish
        assert routes["moka nf4 triton"]["triton"] == (5 if row["tokens"] == 1 else 6)
        # forward over the base alone: decoding is one kernel into the zeroed split-K buffer (the base
        # alone also copies that buffer into its output; in fp32 MoKA returns the buffer, in half
        # precision both cast); otherwise + the adapter and the zero fill its atomics need
        extra = routes["moka nf4 triton"]["fwd_launches"] - routes["nf4 base (ours)"]["fwd_launches"]
        assert extra == (-1 if row["tokens"] == 1 else 2), (row["tokens"], extra)
        assert routes["moka nf4 triton deterministic"]["triton"] == 6
        # beyond the Triton kernels: the zero fills of the atomic buffers (forward: the adapter's or the
        # split-K one; backward: the adapter dx's), none when deterministic
        assert routes["moka nf4 triton"]["aten"] == {"zeros.default": 2}
        assert routes["moka nf4 triton deterministic"]["aten"] == {}
        assert routes["nf4 base (ours)"]["triton"] == 2 and routes["dense base"]["launches"] == 2
        assert routes["moka nf4 triton"]["launches"] < routes["moka nf4 torch"]["launches"] / 3
        # fp32 factors of a bf16 model: one copy into bf16 per forward and per backward, where casting each
        # factor costs 2r launches forward and 2r gradient casts backward
        mixed, cast = routes["bf16 model, fp32 factors"], routes["bf16 model, factors cast per call"]
        assert mixed["aten"].get("_foreach_copy_.default") == 2 and "_foreach_copy_.default" not in cast["aten"]
        assert cast["launches"] - mixed["launches"] == 4 * r - 2
        assert cast["fwd_launches"] - mixed["fwd_launches"] == 2 * r - 1
    md = (tmp_path / "launches-smoke.md").read_text()
    assert "| 64×128 r=5 | 1 | 3 / 4 | 1 / 2 | 2 / 7 |" in md
    # host time per call, with the Triton launches as no-ops: measured for the Triton-only routes
    for row in data["rows"]:
        for name in launches.HOST_ROUTES:
            route = row["routes"][name]
            if name == "peft lora r16" and row["tokens"] > 1:
                assert "host_us" not in route  # its matmuls would be timed on CPU
                continue
            assert 0 < route["fwd_host_us"] < route["host_us"], (name, route)
    assert "Host time per call" in md and "| 64×128 r=5 | 64 |" in md.split("Host time per call")[1]


def test_schedule_sweep_smoke(tmp_path):
    """Both adapter schedules and both tile policies run through the sweep script (interpreter); on CPU only
    --smoke runs."""
    from benchmarks import schedule

    assert schedule.main(["--device", "cpu", "--out", str(tmp_path)]) == 2
    assert schedule.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "schedule-smoke.json").read_text())
    assert [row["tokens"] for row in data["rows"]] == [1, 64]
    expected = {"nf4-fwd fused", "fwd atomic", "fwd rowwise", "dx atomic", "dx rowwise", "fwd-maxtiles atomic"}
    expected |= {"fwd-maxtiles rowwise"}
    decode = {"decode fwd fused", "decode fwd separate"}
    routes = {"nf4-fwd dequantize", "nf4-dx fused", "nf4-dx dequantize"}
    for row in data["rows"]:
        assert set(row["ms"]) == (expected | decode if row["tokens"] <= 16 else expected | routes)
        assert min(row["ms"].values()) > 0
    assert "| 64×128 | 5 | 64 |" in (tmp_path / "schedule-smoke.md").read_text()


def test_tile_counts_smoke(tmp_path):
    """Executed multiply-adds per token under both tile policies: never below the ideal (padding only adds),
    the default never above the previous policy, and at 4096², r = 5 within 1.65× of the ideal."""
    from benchmarks import tiles

    assert tiles.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "tiles-smoke.json").read_text())
    assert [(row["n_out"], row["k_in"]) for row in data["rows"]] == [(4096, 4096), (1024, 4096)]
    for row in data["rows"]:
        assert set(row["contractions"]) == {"forward", "dx", "factor grads"}
        for c in row["contractions"].values():
            assert c["ideal"] <= c["min-work"]["executed"] <= c["max"]["executed"]
    forward = data["rows"][0]["contractions"]["forward"]
    assert forward["min-work"]["executed"] <= 1.65 * forward["ideal"] < forward["max"]["executed"] / 6
    assert "| 4096×4096 r=5 | forward | 0.078 | 128×16×32×32 | 1.60 |" in (tmp_path / "tiles-smoke.md").read_text()


def test_register_counts_smoke(tmp_path):
    """The register/spill census compiles (no GPU, no interpreter) and renders: the largest tile set is
    outside the register budget and spills, the smallest is inside and does not."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-W", "ignore", "-m", "benchmarks.registers", "--smoke", "--out", str(tmp_path)]
    subprocess.run(command, cwd=root, env=env, check=True, capture_output=True, timeout=600)
    rows = json.loads((tmp_path / "registers-smoke.json").read_text())["rows"]
    ieee = [r for r in rows if r["constexprs"].get("DOT_FP32")]  # fp32 inputs: the in-budget set only
    sandwich = {
        (tuple(r["tile_set"]), r["capability"]): r
        for r in rows
        if r["kernel"] == "_kron_sandwich_grouped_kernel" and r not in ieee
    }
    assert sandwich[((16, 16, 16, 16), 90)]["spill_bytes"] == 0 < sandwich[((128, 64, 64, 32), 90)]["spill_bytes"]
    assert all(r["registers"] > 0 and r["error"] is None for r in rows)
    assert {tuple(r["tile_set"]) for r in ieee} == {(16, 16, 16, 16)} and len(ieee) == 6  # 3 kernels, 2 targets
    md = (tmp_path / "registers-smoke.md").read_text()
    assert "| kron_sandwich_grouped_kernel | sm_90 | 2 | 1 |" in md and "fp32 inputs (the IEEE-precision dot)" in md


def test_e2e_without_bitsandbytes_fails_nf4_methods_in_the_parent(tmp_path, monkeypatch):
    """No child (which would build the whole bf16 model first) for a method that needs the NF4 base."""
    import importlib.util

    from benchmarks import e2e

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    monkeypatch.setitem(e2e.METHODS, "llama2-7b", ["moka", "lora_r32"])
    real_run = subprocess.run

    def no_child(cmd, *a, **k):
        assert "benchmarks.e2e" not in cmd, "started a child"
        return real_run(cmd, *a, **k)

    monkeypatch.setattr(subprocess, "run", no_child)
    assert e2e.main(["--models", "llama2-7b", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "e2e-cpu.json").read_text())["rows"]
    assert [(r["method"], r["error"]) for r in rows] == [
        ("moka", "ModuleNotFoundError: the NF4 base needs bitsandbytes"),
        ("lora_r32", "ModuleNotFoundError: the NF4 base needs bitsandbytes"),
    ]


def test_e2e_failed_child_keeps_its_error_line_and_whole_output(tmp_path, monkeypatch):
    """A child that dies reports its exception's line (not a later shutdown warning), and its whole output is
    written beside the results (on the one GPU call nothing else would survive)."""
    import argparse

    from benchmarks import e2e

    stderr = "Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory.\n[W] shutdown\n"

    def failed_child(cmd, *a, **k):
        return subprocess.CompletedProcess(cmd, 1, stdout="autotune: picked 64x64\n", stderr=stderr)

    monkeypatch.setattr(subprocess, "run", failed_child)
    args = argparse.Namespace(out=tmp_path, device="cuda", batch=4, seq=512, layers=None)
    row = e2e._run_child("llama2-7b", "moka", 3, args)
    assert row["error"] == "torch.OutOfMemoryError: CUDA out of memory." and row["log"] == "e2e-cuda-llama2-7b-moka.log"
    log = (tmp_path / row["log"]).read_text()
    assert "autotune: picked 64x64" in log and "[W] shutdown" in log and "exit code 1" in log


class _MacCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Multiply-accumulates of every matrix product an op runs (mm, bmm, addmm, baddbmm, their out= forms)."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_")
        operands = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2)}.get(name)
        if operands is not None:
            first, second = (args[i] for i in operands)
            self.macs += first.numel() * second.shape[-1]  # (…, m, k) @ (…, k, n): m·k·n per batch
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("n_out", "k_in"), [(2048, 2048), (576, 576), (192, 576), (1536, 576)])
def test_adapter_mac_formulas_count_what_the_pytorch_path_runs(n_out, k_in):
    """adapter_macs / adapter_train_macs (the FLOP share of the CPU target and the GPU roofline) equal the
    matrix-product MACs the PyTorch backend performs, counted op by op, forward and backward."""
    from benchmarks.providers import adapter_macs, adapter_train_macs, moka_shapes
    from moka_kernels.reference import GradRequest, moka_backward_torch, moka_forward_torch

    shapes, tokens = moka_shapes(n_out, k_in, 4), 3
    a_f = [torch.randn(a1, a2) for a1, a2, _, _ in shapes]
    b_f = [torch.randn(b1, b2) for _, _, b1, b2 in shapes]
    x, gate = torch.randn(tokens, k_in), torch.randn(4)
    zero_base = torch.zeros(n_out, k_in)
    with _MacCounter() as forward:
        moka_forward_torch(x, None, zero_base, None, gate, 1.0, a_f, b_f)
    needs = GradRequest(x=True, adapter_x=False, bias=False, gate=True, a=(True,) * 4, b=(True,) * 4)
    with _MacCounter() as backward:
        moka_backward_torch(torch.randn(tokens, n_out), x, None, zero_base, gate, 1.0, a_f, b_f, needs)
    base = tokens * n_out * k_in  # x·W0ᵀ in the forward, dy·W0 in the backward
    assert forward.macs - base == tokens * adapter_macs(shapes)
    assert forward.macs + backward.macs - 2 * base == tokens * adapter_train_macs(shapes)


def test_gpu_suite_plumbing(monkeypatch):
    """What the one GPU call depends on and no CPU run exercises: measuring children keep the caller's
    PYTHONPATH (the carried bitsandbytes), quick autotuning keeps two NF4 configs per GEMM and a wrong value
    is refused, and results record the sha given for a tree without .git."""
    from benchmarks import e2e

    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    assert e2e.child_env()["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/tmp/site"]
    probe = (
        "from moka_kernels.ops import nf4_matmul as m; "
        "print(len(m.TUNED_CONFIGS), len(m.TUNED_T_CONFIGS), m.TUNED_CONFIGS[1].kwargs['BLOCK_M'], "
        "len(m.NF4_MATMUL_CONFIGS))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for value, expected in (("quick", "2 2 128 8"), ("all", "8 7 16 8")):  # the AOT check keeps all 8
        done = subprocess.run(
            [sys.executable, "-c", probe],
            env=dict(env, PYTHONPATH=str(ROOT), MOKA_NF4_AUTOTUNE=value),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.stdout.split("\n")[-2] == expected, done.stderr
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env=dict(env, PYTHONPATH=str(ROOT), MOKA_NF4_AUTOTUNE="fast"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "MOKA_NF4_AUTOTUNE: expected 'all' or 'quick', got 'fast'" in done.stderr
    monkeypatch.setenv("MOKA_GIT_SHA", "abc123")
    monkeypatch.chdir("/")  # no git repository here
    conds = run.conditions(torch.device("cpu"), torch.float32, 0.01)
    assert conds["git_sha"] == "abc123" and conds["thresholds"]["ROWWISE_MIN_TOKENS"] > 0
    import moka_kernels.ops

    monkeypatch.setattr(moka_kernels.ops, "TRITON_AVAILABLE", False)  # no kernels, no thresholds, no crash
    assert run.conditions(torch.device("cpu"), torch.float32, 0.01)["thresholds"] is None


def test_providers_compute_what_they_are_named_for():
    """The timed providers are compared on their speed only if each computes its method: the base alone,
    MoKA and both LoKr-style variants against an fp64 reference on the same W0 and factors."""
    from benchmarks.providers import _frozen_weights, build_case
    from moka_kernels import dequantize_nf4
    from moka_kernels.reference import moka_linear_materialized

    n_out, k_in, device = 48, 64, torch.device("cpu")
    w_dense, w_nf4 = _frozen_weights(n_out, k_in, device, torch.float32)
    x = torch.randn(5, k_in)
    bases = {"dense": w_dense.double(), "nf4": dequantize_nf4(w_nf4, torch.float64)}
    for provider, base in [
        ("dense_linear", "dense"),
        ("ours_nf4", "nf4"),
        ("bnb_nf4", "nf4"),
        ("moka_torch", "dense"),
        ("moka_torch", "nf4"),
        ("lokr_materialized", "dense"),
        ("lokr_fused", "dense"),
    ]:
        case = build_case(provider, n_out, k_in, device, torch.float32, r=4, base=base)
        if case.params:
            r = (len(case.params) - 1) // 2
            factors = [p.detach().double() for p in case.params]
            a, b, g = factors[:r], factors[r : 2 * r], factors[2 * r]
            with torch.no_grad():
                for p in case.params[r : 2 * r]:
                    assert p.abs().sum() > 0  # the adapter is not zero: a provider that dropped it would show
            expected = moka_linear_materialized(x.double(), bases[base], a, b, g)
        else:
            expected = x.double() @ bases[base].T
        got = case.forward(x.requires_grad_(provider != "dense_linear")).detach().double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"{provider}[{base}]")


def test_e2e_frozen_base_backward_is_the_flow_adapters_need():
    """``frozen_base`` is the floor of adapter training: backward reaches every adapted projection's output
    (all 7 in every layer) and computes no gradient past them into layer 0's attention input."""
    from benchmarks import e2e

    model, _ = e2e.build_model("tiny", "frozen_base", torch.device("cpu"))
    assert e2e.attach(model, "frozen_base") == []
    reached, input_needs_grad = set(), {}

    def record(name):
        def hook(module, args, output):
            input_needs_grad[name] = args[0].requires_grad
            output.register_hook(lambda grad: reached.add(name))

        return hook

    targets = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in e2e.TARGETS]
    for name in targets:
        model.get_submodule(name).register_forward_hook(record(name))  # runs after the floor's own hook
    ids = torch.randint(3, model.config.vocab_size, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(targets) == 7 * model.config.num_hidden_layers and reached == set(targets)
    # Only layer 0's attention input is upstream of every adapter (its MLP input depends on q/k/v already).
    first_layer_inputs = {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    assert {n for n, needs in input_needs_grad.items() if not needs} == first_layer_inputs
    assert not any(p.requires_grad for p in model.parameters())


def test_cpu_timer_takes_its_median_over_at_least_min_samples_calls():
    """A slow call under a short time budget is still timed MIN_SAMPLES times (a median of 2 calls is not one),
    also when calls after the one that sized the budget run slower."""
    import time as time_module

    from torch.utils import benchmark

    calls = []

    def slowing():
        calls.append(1)
        time_module.sleep(0.004 if len(calls) <= 3 else 0.008)

    timer = benchmark.Timer(stmt="fn()", globals={"fn": slowing})
    samples = run.cpu_samples(timer, min_run_time=0.001)
    assert len(samples) >= run.MIN_SAMPLES and all(0.004 <= t < 0.1 for t in samples)
    assert 8 <= run.make_timer(torch.device("cpu"), min_run_time=0.001)(slowing) < 100


def test_provider_notes_name_the_layer_where_they_differ():
    """MoKA's note lists its factor shapes, which differ per layer: one line per layer, not the last layer's."""
    base = {"provider": "moka_torch", "base": "dense", "mode": "fwd", "tokens": 1}
    rows = [
        {**base, "n_out": 64, "k_in": 64, "note": "r=2: 8x8⊗8x8"},
        {**base, "n_out": 32, "k_in": 64, "note": "r=2: 4x8⊗8x8"},
        {**base, "provider": "lokr_fused", "n_out": 64, "k_in": 64, "note": "same"},
        {**base, "provider": "lokr_fused", "n_out": 32, "k_in": 64, "note": "same"},
    ]
    assert plot.note_lines(rows) == [
        "- `moka_torch[dense]` at 64×64: r=2: 8x8⊗8x8",
        "- `moka_torch[dense]` at 32×64: r=2: 4x8⊗8x8",
        "- `lokr_fused[dense]`: same",
    ]


def test_gpu_cells_put_the_targets_token_counts_first():
    layers = [(4096, 4096), (1024, 4096)]
    tokens = run.TOKENS["cuda"]
    cuda = run.cells(layers, tokens, torch.device("cuda"))
    assert [t for _, t in cuda[:4]] == [16, 4096, 16, 4096] and [t for _, t in cuda[4:]] == [1, 512, 1, 512]
    assert sorted(cuda) == sorted(run.cells(layers, tokens, torch.device("cpu")))  # the same cells, reordered
    assert run.cells(layers, [1, 16], torch.device("cpu"))[:2] == [((4096, 4096), 1), ((4096, 4096), 16)]
    assert sorted(run.CUDA_PROVIDERS) == sorted({*run.CPU_PROVIDERS, *run.CUDA_PROVIDERS})  # no CPU row lost
    assert run.CUDA_PROVIDERS[:3] == [("ours_nf4", "nf4"), ("moka_triton", "nf4"), ("dequant_cublas", "nf4")]


def test_recorded_sha_is_the_given_one_and_host_inclusive_timer_takes_a_median(monkeypatch):
    monkeypatch.setenv("MOKA_GIT_SHA", "abc123+uncommitted")
    assert run.conditions(torch.device("cpu"), torch.float32, 0.1)["git_sha"] == "abc123+uncommitted"
    monkeypatch.delenv("MOKA_GIT_SHA")
    assert run.conditions(torch.device("cpu"), torch.float32, 0.1)["git_sha"] != "abc123+uncommitted"
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    clock = iter([0.0, 1.0, 2.0, 2.5, 3.0, 3.5])  # each round's start and end: 1 s, 0.5 s, 0.5 s
    monkeypatch.setattr(run.time, "perf_counter", lambda: next(clock))
    calls = []
    ms = run.host_inclusive_timer(rounds=3, reps=10)(lambda: calls.append(1))
    assert ms == 50.0 and len(calls) == 3 * 11  # 100, 50 and 50 ms per call (one warm-up call a round)


def test_moka_gpu_rows_use_fp32_master_factors_as_moka_linear_does():
    from benchmarks.providers import build_case

    case = build_case("moka_torch", 64, 64, torch.device("cpu"), torch.bfloat16, r=2, base="dense")
    assert {p.dtype for p in case.params} == {torch.float32} and "float32 master factors" in case.note
    case = build_case("moka_torch", 64, 64, torch.device("cpu"), torch.float32, r=2, base="dense")
    assert "master factors" not in case.note


def test_a_part_cut_before_its_first_row_leaves_its_conditions(tmp_path, monkeypatch):
    from benchmarks import overhead

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the suite's time limit (SIGINT)

    monkeypatch.setattr(overhead, "measure_routes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        overhead.main(["--smoke", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "overhead-smoke.json").read_text())
    assert written["conditions"]["complete"] is False and written["rows"] == []
    # an earlier result file stays whole until a first new row replaces it
    (tmp_path / "overhead-smoke.json").write_text('{"conditions": {"complete": true}, "rows": [1]}')
    with pytest.raises(KeyboardInterrupt):
        overhead.main(["--smoke", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "overhead-smoke.json").read_text())["rows"] == [1]


def test_registers_table_shows_the_default_layout_of_each_nf4_config(tmp_path):
    """Variants that share a config's tiles (another blocksize, fp32 scales) follow the default-layout row in
    the results: the table keeps the first, not the last."""
    from benchmarks import registers

    def row(cc, regs, **extra):
        c = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, **extra)
        return dict(
            kernel="_nf4_matmul_t_kernel",
            capability=cc,
            constexprs=c,
            num_warps=4,
            num_stages=4,
            registers=regs,
            spill_bytes=0,
            target="",
            spill_checked=False,
            error=None,
        )

    rows = [row(80, 186), row(90, 158), row(80, 128, BLOCKSIZE=256), row(90, 130, BLOCKSIZE=256)]
    path = tmp_path / "registers.json"
    path.write_text(json.dumps({"conditions": {}, "rows": rows}))
    assert "| nf4_matmul_t_kernel | 16×64×128 | 4 | 4 | 186 / 0 B | 158 / 0 B |" in registers.render(path).read_text()


def test_the_adapter_providers_compute_one_function_with_the_same_gradients():
    """MoKA's PyTorch path and the two LoKr-style comparators (ΔW = Σ α_i kron(A_i, B_i) formed every step, α
    folded into the small factor) are one function of the same values: outputs and every gradient agree, so
    their times compare the same work done differently."""
    from benchmarks.providers import build_case

    x = torch.randn(5, 36, generator=torch.Generator().manual_seed(0))
    results = {}
    for provider in ("moka_torch", "lokr_materialized", "lokr_fused"):
        case = build_case(provider, 24, 36, "cpu", torch.float32, r=3, base="dense")
        with torch.no_grad():
            case.params[-1].copy_(torch.tensor([0.3, -0.2, 0.5]))  # a gate away from uniform
        out = case.forward(x)
        grads = torch.autograd.grad(out, case.params, torch.ones_like(out))
        results[provider] = (out, grads)
    out, grads = results["moka_torch"]
    for provider in ("lokr_materialized", "lokr_fused"):
        torch.testing.assert_close(results[provider][0], out, rtol=1e-5, atol=1e-6)
        for got, want in zip(results[provider][1], grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_gpu_suite_runs_its_parts_in_order_and_cuts_them_to_the_deadline(tmp_path):
    """The GPU suite's shell plumbing, with a stand-in interpreter (no GPU, no torch): every part runs in order
    with its own log, a part's limit shrinks to what is left of SUITE_SECONDS, parts with no time left are
    skipped with a message, the pack holds what was written, and the exit status says a part failed."""
    stub = tmp_path / "py"
    calls = tmp_path / "calls.txt"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ $1 == - ]]; then cat > /dev/null; echo "{}"; exit 0; fi\n'
        f'echo "$*" >> {calls}\n'
        "if [[ $* == *benchmarks.run* ]]; then sleep 30; fi\n"  # the layer part overruns its cut limit
        "exit 0\n"
    )
    stub.chmod(0o755)
    out, pack = tmp_path / "out", tmp_path / "suite.tgz"
    env = dict(os.environ, PYTHON=str(stub), SUITE_SECONDS="14", PACK=str(pack), PATH=os.environ["PATH"])
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    ran = calls.read_text().splitlines()
    assert [line.split()[1] for line in ran] == ["pytest", "benchmarks.run"], ran  # then no time was left
    assert "-vv --durations=0" in ran[0] and "not test_triton_matches_reference_at_llama_shapes" in ran[0]
    assert done.returncode == 1  # the layer part was cut; the later ones were skipped
    skipped = [line.split()[7] for line in done.stdout.splitlines() if line.startswith("gpu_suite: no time left")]
    assert skipped == ["benchmarks.schedule", "benchmarks.e2e", "pytest", "benchmarks.overhead"], done.stdout
    assert took < 14 + 10, took  # the layer part's 30 s sleep was cut at the deadline
    assert (out / "env.json").read_text().strip() == "{}" and (out / "layers.log").exists()
    with tarfile.open(pack) as archive:
        assert {"./env.json", "./gpu_tests.log"} <= set(archive.getnames())
