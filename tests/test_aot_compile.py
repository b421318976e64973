"""Every Triton kernel and autotune config compiles for sm_80 and sm_90 on this CPU-only machine, and its
shared memory fits the target. This catches GPU-only errors the interpreter does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

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
                (r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"], r["constexprs"]["BLOCK_K"])
                for r in results
                if r["kernel"] == kernel and r["capability"] == cc
            }
            assert len(tiles) == n_configs, (kernel, cc, tiles)
    kernels = {r["kernel"] for r in results}
    # Every kernel the ops define (found by name, so a new one without AOT variants fails here).
    code = (
        "import moka_kernels.ops.kron_mixture as a, moka_kernels.ops.nf4_matmul as b;"
        "print(' '.join(n for m in (a, b) for n in vars(m) if n.startswith('_') and n.endswith('_kernel')))"
    )
    defined = set(subprocess.check_output([sys.executable, "-c", code], cwd=ROOT, env=env, text=True).split())
    assert "_kron_sandwich_grouped_kernel" in defined
    assert kernels == defined
