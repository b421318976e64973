"""Ahead-of-time compilation of every kernel and autotune config for sm_80 and sm_90, without a GPU.

``triton.compile`` with an explicit ``GPUTarget`` runs the whole GPU pipeline (TTIR → TTGIR → LLVM → PTX →
cubin) on a CPU machine, so GPU-only errors (``tl.dot`` with K < 16, layout or shared-memory overflows)
show up here. Each result records the compiled kernel's shared memory, checked against the target's limit.

Run it in a process without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions)::

    python -m moka_kernels.ops.aot            # a table
    python -m moka_kernels.ops.aot --json     # JSON lines, for tests
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

# Shared memory per block that a kernel may use, in bytes (CUDA occupancy limits per architecture).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class Variant:
    kernel: str
    pointer_types: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int


@dataclass
class Result:
    kernel: str
    capability: int
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    shared_bytes: int
    limit_bytes: int
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.shared_bytes <= self.limit_bytes


def _kernels():
    from . import kron_mixture, nf4_matmul

    return {
        "_nf4_matmul_kernel": nf4_matmul._nf4_matmul_kernel.fn,
        "_nf4_matmul_t_kernel": nf4_matmul._nf4_matmul_t_kernel.fn,
        "_kron_sandwich_rowwise_kernel": kron_mixture._kron_sandwich_rowwise_kernel,
        "_kron_sandwich_grouped_kernel": kron_mixture._kron_sandwich_grouped_kernel,
        "_kron_token_reduce_grouped_kernel": kron_mixture._kron_token_reduce_grouped_kernel,
        "_factor_grad_finish_kernel": kron_mixture._factor_grad_finish_kernel,
    }


def variants() -> list[Variant]:
    """Every autotune config of the NF4 GEMMs, and the tile shapes the Kronecker launchers can pick."""
    from . import kron_mixture
    from .nf4_matmul import NF4_MATMUL_CONFIGS, NF4_MATMUL_T_CONFIGS

    nf4_pointers = {
        "packed_ptr": "*u8",
        "absmax_ptr": "*u8",
        "nested_absmax_ptr": "*fp32",
        "nested_code_ptr": "*fp32",
        "offset_ptr": "*fp32",
        "code_ptr": "*fp32",
    }
    out: list[Variant] = []
    for dtype in ("bf16", "fp16"):
        fwd_ptrs = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "add_ptr": "*fp32", "bias_ptr": f"*{dtype}"}
        for cfg in NF4_MATMUL_CONFIGS:
            split_ks = (1, 4) if cfg.kwargs["BLOCK_M"] <= 16 else (1,)
            for split_k in split_ks:
                ptrs = dict(fwd_ptrs, **nf4_pointers)
                if split_k > 1:
                    ptrs["out_ptr"] = "*fp32"
                flags = dict(BLOCKSIZE=64, HAS_ADD=True, HAS_BIAS=True, DOUBLE_QUANT=True, SPLIT_K=split_k)
                no_adapter = dict(HAS_ADAPTER=False, AD_GATE=0, AD_R_PAD=1)
                no_adapter.update(AD_BLOCK_P=16, AD_BLOCK_J=16, AD_BLOCK_L=16, AD_BLOCK_Q=16)
                out.append(
                    Variant(
                        "_nf4_matmul_kernel",
                        ptrs,
                        dict(flags, DOT_FP32=False, **no_adapter, **cfg.kwargs),
                        cfg.num_warps,
                        cfg.num_stages,
                    )
                )
                if split_k > 1:  # the decode fusion: the adapter's programs in the GEMV's launch
                    adapter_ptrs = {
                        "ad_x_ptr": f"*{dtype}",
                        "ad_table_ptr": "*i64",
                        "ad_gate_ptr": "*fp32",
                        "ad_factor_ptr": f"*{dtype}",
                        "ad_scale": "fp32",
                    }
                    for ad_blocks in kron_mixture.LARGEST_BLOCKS:
                        adapter = dict(HAS_ADAPTER=True, AD_GATE=1, AD_R_PAD=8)
                        names = ("AD_BLOCK_P", "AD_BLOCK_J", "AD_BLOCK_L", "AD_BLOCK_Q")
                        adapter.update(zip(names, ad_blocks, strict=True))
                        out.append(
                            Variant(
                                "_nf4_matmul_kernel",
                                dict(ptrs, **adapter_ptrs),
                                dict(flags, HAS_ADD=False, DOT_FP32=False, **adapter, **cfg.kwargs),
                                cfg.num_warps,
                                cfg.num_stages,
                            )
                        )
        for cfg in NF4_MATMUL_T_CONFIGS:
            ptrs = dict({"dy_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}", "add_ptr": "*fp32"}, **nf4_pointers)
            flags = dict(BLOCKSIZE=64, HAS_ADD=True, DOUBLE_QUANT=True, DOT_FP32=False)
            out.append(Variant("_nf4_matmul_t_kernel", ptrs, dict(flags, **cfg.kwargs), cfg.num_warps, cfg.num_stages))
        # the smallest tiles, the largest the tile chooser can pick (shared memory grows with each size, so
        # these bound every choice) and a typical pick (4096², r = 5)
        blocks = [(16, 16, 16, 16), *kron_mixture.LARGEST_BLOCKS, (128, 16, 64, 32)]
        for bp, bj, bl, bq in blocks:
            for gate_mode, gate_type in ((0, "*fp32"), (1, f"*{dtype}"), (2, "*fp32")):
                ptrs = {
                    "m_ptr": f"*{dtype}",
                    "out_ptr": "*fp32",
                    "table_ptr": "*i64",
                    "gate_ptr": gate_type,
                    "factor_ptr": f"*{dtype}",
                    "scale": "fp32",
                }
                flags = dict(GATE=gate_mode, R_PAD=8, DOT_FP32=False, BLOCK_P=bp, BLOCK_J=bj, BLOCK_L=bl, BLOCK_Q=bq)
                out.append(Variant("_kron_sandwich_grouped_kernel", ptrs, flags, 4, 3))
                out.append(Variant("_kron_sandwich_rowwise_kernel", ptrs, dict(flags, ACCUMULATE=True), 4, 3))
            ptrs = {
                "rows0_ptr": f"*{dtype}",
                "rows1_ptr": f"*{dtype}",
                "table_ptr": "*i64",
                "ws_ptr": "*fp32",
                "like_ptr": f"*{dtype}",
            }
            flags = dict(DOT_FP32=False, BLOCK_M=bp, BLOCK_K=bj, BLOCK_J=bl, BLOCK_N=bq)
            out.append(Variant("_kron_token_reduce_grouped_kernel", ptrs, flags, 4, 3))
        # the finishing pass: logits (fp32 or the input dtype) with the gate's gradient, logits without it,
        # and the uniform gate
        for gate_mode, logits, need_gate_grad in (
            (1, "fp32", True),
            (1, dtype, True),
            (1, "fp32", False),
            (2, "", False),
        ):
            ptrs = {
                "ws_ptr": "*fp32",
                "table_ptr": "*i64",
                "gate_ptr": f"*{logits}" if logits else "*i64",
                "grad_ptr": f"*{dtype}",
                "gate_grad_ptr": f"*{logits}" if need_gate_grad else f"*{dtype}",
                "factor_ptr": f"*{dtype}",
                "scale": "fp32",
            }
            flags = dict(GATE=gate_mode, NEED_GATE_GRAD=need_gate_grad, R_PAD=8, BLOCK=1024)
            out.append(Variant("_factor_grad_finish_kernel", ptrs, flags, 4, 3))
    # fp32 inputs take the IEEE-precision dot branch: the first config of each kernel again, in fp32.
    for kernel in _kernels():
        first = next(v for v in out if v.kernel == kernel)
        pointers = {k: ("*fp32" if t in ("*bf16", "*fp16") else t) for k, t in first.pointer_types.items()}
        constexprs = dict(first.constexprs, DOT_FP32=True)
        out.append(Variant(kernel, pointers, constexprs, first.num_warps, first.num_stages))
    return out


def compile_variant(variant: Variant, capability: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _kernels()[variant.kernel]
    constexprs = {k: v for k, v in variant.constexprs.items() if k in fn.arg_names}
    signature = {
        name: variant.pointer_types.get(name, "constexpr" if name in constexprs else "i32") for name in fn.arg_names
    }
    start = time.perf_counter()
    shared, error = 0, None
    try:
        compiled = triton.compile(
            triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
        )
        shared = int(compiled.metadata.shared)
        if "cubin" not in compiled.asm:
            error = "no cubin produced"
    except Exception as exc:  # report every failing variant, not just the first
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    return Result(
        variant.kernel,
        capability,
        constexprs,
        variant.num_warps,
        variant.num_stages,
        shared,
        SHARED_MEMORY_LIMIT[capability],
        round(time.perf_counter() - start, 2),
        error,
    )


def _compile_pair(args: tuple[Variant, int]) -> Result:
    return compile_variant(*args)


def compile_all(capabilities: tuple[int, ...] = (80, 90), workers: int | None = None) -> list[Result]:
    jobs = [(v, cc) for v in variants() for cc in capabilities]
    workers = workers or min(4, os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_pair, jobs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object per variant")
    parser.add_argument("--capability", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET; the interpreter replaces the kernels being compiled", file=sys.stderr)
        return 2
    results = compile_all(tuple(args.capability or SHARED_MEMORY_LIMIT))
    for r in results:
        if args.json:
            print(json.dumps(dict(asdict(r), ok=r.ok)))
        else:
            status = "ok" if r.ok else f"FAIL {r.error or 'shared memory over limit'}"
            print(f"sm_{r.capability} {r.kernel:28s} {r.shared_bytes / 1024:7.1f} KB  {status}  {r.constexprs}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
