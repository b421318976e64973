"""Every Triton kernel and autotune config compiles for sm_80 and sm_90 on this CPU-only machine, its
shared memory fits the target, and no Kronecker kernel spills registers at any tile set the chooser can
pick. This catches GPU-only errors (and slowdowns) the interpreter does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from moka_kernels.ops.kron_mixture import SPILL_TOLERANCE_BYTES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def aot_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "moka_kernels.ops.aot", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert results, f"no results; stderr:\n{proc.stderr[-3000:]}"
    return results, proc.returncode


def test_every_variant_compiles_and_fits(aot_results):
    results, returncode = aot_results
    failures = [r for r in results if not r["ok"]]
    assert not failures, json.dumps(failures[:5], indent=1)
    assert returncode == 0
    for r in results:
        assert r["shared_bytes"] <= {80: 163 * 1024, 90: 227 * 1024}[r["capability"]]
        if r["kernel"] != "_factor_grad_finish_kernel":  # the only kernel without tl.dot may need none
            assert r["shared_bytes"] > 0, r


def test_every_autotune_config_and_kernel_is_covered(aot_results):
    results, _ = aot_results
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "from moka_kernels.ops.nf4_matmul import NF4_MATMUL_CONFIGS as F, NF4_MATMUL_T_CONFIGS as T;"
        "print(len(F), len(T))"
    )
    n_fwd, n_bwd = map(int, subprocess.check_output([sys.executable, "-c", code], cwd=ROOT, env=env).split())
    for kernel, n_configs in [("_nf4_matmul_kernel", n_fwd), ("_nf4_matmul_t_kernel", n_bwd)]:
        for cc in (80, 90):
            tiles = {
                (*(r["constexprs"][n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), r["num_warps"], r["num_stages"])
                for r in results
                if r["kernel"] == kernel and r["capability"] == cc
            }
            assert len(tiles) == n_configs, (kernel, cc, tiles)
    kernels = {r["kernel"] for r in results}
    # Every kernel the ops define (found by name, so a new one without AOT variants fails here).
    code = (
        "import pkgutil, importlib, moka_kernels.ops as ops;"
        "mods = [importlib.import_module('moka_kernels.ops.' + m.name) for m in pkgutil.iter_modules(ops.__path__)];"
        "print(' '.join(n for m in mods for n in vars(m) if n.startswith('_') and n.endswith('_kernel')))"
    )
    defined = set(subprocess.check_output([sys.executable, "-c", code], cwd=ROOT, env=env, text=True).split())
    assert {"_kron_sandwich_grouped_kernel", "_nf4_dequantize_kernel"} <= defined
    assert kernels == defined


def _candidates_and_constexprs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json, moka_kernels.ops.kron_mixture as k;"
        "print(json.dumps([[b, k.reduce_block_constexprs(b)] for b in k._candidate_blocks()]))"
    )
    return json.loads(subprocess.check_output([sys.executable, "-c", code], cwd=ROOT, env=env, text=True))


def test_kronecker_kernels_compile_without_spills_at_every_choosable_tile_set(aot_results):
    """Every tile set the chooser can pick is compiled in bf16 for both sandwich kernels and the reduction
    (with the launcher's own mapping of the sets onto the reduction's tiles), and none spills registers
    beyond a few words. Spill counts are real: the NF4 GEMM's large autotune configs do spill."""
    results, _ = aot_results
    candidates = _candidates_and_constexprs()
    names = ("BLOCK_P", "BLOCK_J", "BLOCK_L", "BLOCK_Q")
    for cc in (80, 90):
        for kernel in ("_kron_sandwich_grouped_kernel", "_kron_sandwich_rowwise_kernel"):
            compiled = {
                tuple(r["constexprs"][n] for n in names): r
                for r in results
                if r["kernel"] == kernel and r["capability"] == cc and r["spill_checked"]
            }
            assert {tuple(b) for b, _ in candidates} <= set(compiled), (kernel, cc)
        reductions = [
            r for r in results if r["kernel"] == "_kron_token_reduce_grouped_kernel" and r["capability"] == cc
        ]
        for _, constexprs in candidates:
            assert any(all(r["constexprs"][k] == v for k, v in constexprs.items()) for r in reductions), constexprs
    checked = [r for r in results if r["kernel"].startswith("_kron") and r["spill_checked"]]
    assert checked and all(r["spill_bytes"] <= SPILL_TOLERANCE_BYTES and r["registers"] > 0 for r in checked), [
        r for r in checked if r["spill_bytes"] > SPILL_TOLERANCE_BYTES
    ][:3]
    assert any(r["spill_bytes"] > 0 for r in results if r["kernel"] == "_nf4_matmul_kernel")


def test_nf4_autotune_lists_hold_spill_free_configs_for_every_token_count(aot_results):
    """Autotuning may pick a spilling config if it is fastest, but each NF4 GEMM has a spill-free one for
    decode (BLOCK_M = 16) and for prefill/training (BLOCK_M ≥ 64), and the decode fusion has one for every
    maximal adapter tile set (within the Kronecker kernels' tolerance of a few words), on both targets."""
    results, _ = aot_results
    for cc in (80, 90):
        for kernel in ("_nf4_matmul_kernel", "_nf4_matmul_t_kernel"):
            plain = [
                r
                for r in results
                if r["kernel"] == kernel and r["capability"] == cc and not r["constexprs"].get("HAS_ADAPTER")
            ]
            for small in (True, False):
                rows = [r for r in plain if (r["constexprs"]["BLOCK_M"] <= 16) == small]
                assert any(r["spill_bytes"] == 0 for r in rows), (kernel, cc, small)
                if not small:
                    assert any(r["spill_bytes"] == 0 and r["constexprs"]["BLOCK_M"] >= 64 for r in rows)
        least: dict[tuple, int] = {}
        for r in results:
            if r["kernel"] == "_nf4_matmul_kernel" and r["capability"] == cc and r["constexprs"].get("HAS_ADAPTER"):
                adapter = tuple(r["constexprs"][f"AD_BLOCK_{n}"] for n in "PJLQ")
                least[adapter] = min(least.get(adapter, 1 << 30), r["spill_bytes"])
        # ptxas spills 16 B of a few sets at ~168 registers (not register pressure): the kernels' tolerance.
        # One known exception, on sm_80 only (not the H100/H200 target): compiled as a T = 1 launch specializes
        # it (M = 1 a constant), the decode fusion with adapter tiles 16×64×64×16 spills 52 B in its best
        # config; a spill regression there, or any other set over the tolerance, still fails.
        allowed = {(16, 64, 64, 16): 64} if cc == 80 else {}
        over = {a: b for a, b in least.items() if b > allowed.get(a, SPILL_TOLERANCE_BYTES)}
        assert least and not over, over


def test_the_values_launchers_pick_beyond_the_usual_are_compiled(aot_results):
    """R_PAD (the power of two above r), the fused decode's gate modes, blocksizes and split-K counts."""
    results, _ = aot_results

    def seen(kernel, name):
        return {r["constexprs"][name] for r in results if r["kernel"] == kernel and name in r["constexprs"]}

    for kernel in ("_kron_sandwich_grouped_kernel", "_kron_sandwich_rowwise_kernel", "_factor_grad_finish_kernel"):
        assert {1, 2, 4, 8, 16} <= seen(kernel, "R_PAD"), kernel
    assert {1, 2} <= seen("_nf4_matmul_kernel", "AD_GATE")
    assert {64, 128} <= seen("_nf4_matmul_kernel", "BLOCKSIZE") and 256 in seen("_nf4_matmul_t_kernel", "BLOCKSIZE")
    assert any(k not in (1, 2, 4, 8, 16) for k in seen("_nf4_matmul_kernel", "SPLIT_K"))
    assert False in seen("_nf4_matmul_t_kernel", "DOUBLE_QUANT")


def test_fp32_gate_logits_with_half_activations_are_a_variant():
    """MoKALinear passes fp32 logits with bf16 activations: the sandwich kernels are compiled that way too."""
    from moka_kernels.ops import aot

    pairs = {
        (v.kernel, v.pointer_types["m_ptr"], v.pointer_types["gate_ptr"], v.constexprs["GATE"])
        for v in aot.variants()
        if v.kernel.startswith("_kron_sandwich")
    }
    for kernel in ("_kron_sandwich_grouped_kernel", "_kron_sandwich_rowwise_kernel"):
        assert (kernel, "*bf16", "*fp32", 1) in pairs and (kernel, "*bf16", "*bf16", 1) in pairs


def test_the_nf4_decode_compiles_without_fma_contraction():
    """nf4_dequantize promises bit-exactness to the torch reference, whose double-quantized scale is a
    multiply and an add, each rounded: its PTX (launched with enable_fp_fusion=False) must hold no fused
    fp32 multiply-add, which the default compile would emit for code8[q]·absmax2 + offset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import dataclasses, moka_kernels.ops.aot as aot;"
        "v = next(v for v in aot.variants() if v.kernel == '_nf4_dequantize_kernel'"
        " and v.constexprs['DOUBLE_QUANT']);"
        "fused = dataclasses.replace(v, fp_fusion=True);"
        "print(aot.compile_for(v, 90).asm['ptx'].count('fma.rn.f32'),"
        " aot.compile_for(fused, 90).asm['ptx'].count('fma.rn.f32'))"
    )
    out = subprocess.check_output([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, text=True)
    unfused, fused = map(int, out.split()[-2:])
    assert unfused == 0 and fused > 0  # the check can see an FMA: the default compile has some


def test_nf4_variants_compile_as_a_launch_specializes_them():
    """The NF4 GEMMs are compiled with the launch's specialization (unit strides constant, sizes and pointers
    divisible by 16): the binary differs from the unspecialized one (shared memory of the largest
    transposed config on sm_90), so the check measures what a GPU launch would compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    code = """
import dataclasses, json
from moka_kernels.ops import aot
v = next(v for v in aot.variants() if v.kernel == "_nf4_matmul_t_kernel" and v.constexprs["BLOCK_N"] == 256
         and "*bf16" in v.pointer_types.values())
assert v.aligned_pointers and v.launch_ints["stride_dxk"] == 1 and v.launch_ints["K"] % 16 == 0
plain = dataclasses.replace(v, launch_ints={}, aligned_pointers=False)
print(json.dumps([aot.compile_for(x, 90).metadata.shared for x in (v, plain)]))
"""
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    specialized, plain = json.loads(out.stdout.strip().splitlines()[-1])
    assert specialized != plain and specialized <= 227 * 1024, (specialized, plain)


def test_moka_linears_default_paths_are_variants():
    """fp32 master factors of a bf16 layer (fp32 gradients, bf16 factor copies) in the finishing pass, and
    fp32 rows written without accumulating (deterministic mode's rowwise schedule)."""
    from moka_kernels.ops import aot

    variants = aot.variants()
    assert any(
        v.kernel == "_factor_grad_finish_kernel"
        and (v.pointer_types["grad_ptr"], v.pointer_types["factor_ptr"]) == ("*fp32", "*bf16")
        for v in variants
    )
    assert any(
        v.kernel == "_kron_sandwich_rowwise_kernel"
        and v.pointer_types["out_ptr"] == "*fp32"
        and v.pointer_types["m_ptr"] == "*bf16"
        and v.constexprs["ACCUMULATE"] is False
        for v in variants
    )
