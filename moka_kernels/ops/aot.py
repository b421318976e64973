"""Ahead-of-time compilation of every kernel and autotune config for sm_80 and sm_90, without a GPU.

``triton.compile`` with an explicit ``GPUTarget`` runs the whole GPU pipeline (TTIR → TTGIR → LLVM → PTX →
cubin) on a CPU machine, so GPU-only errors (``tl.dot`` with K < 16, layout or shared-memory overflows)
show up here. Each result records the compiled kernel's shared memory, checked against the target's limit,
and its registers and spill stores (``ptxas -v`` on the same PTX): a Kronecker kernel at any tile set the
chooser can pick must not spill (more than a few words); the NF4 GEMMs' autotune configs may, since
autotuning times them against spill-free ones.

Run it in a process without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions)::

    python -m moka_kernels.ops.aot            # a table
    python -m moka_kernels.ops.aot --json     # JSON lines, for tests
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

# Shared memory per block that a kernel may use, in bytes (CUDA occupancy limits per architecture).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class Variant:
    kernel: str
    pointer_types: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    spill_checked: bool = True  # spills beyond SPILL_TOLERANCE_BYTES fail the check
    fp_fusion: bool = True  # False where the launcher passes enable_fp_fusion=False
    # Integer arguments as a launch at the shapes this variant stands for passes them: Triton's launcher
    # compiles an int equal to 1 as a constant and marks multiples of 16 (and, with ``aligned_pointers``,
    # 16-byte-aligned pointers) divisible, which changes vectorization, pipelining, shared memory and
    # registers; without them the check would measure a binary no launch compiles.
    launch_ints: dict[str, int] = field(default_factory=dict)
    aligned_pointers: bool = False


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
    registers: int = 0
    spill_bytes: int = 0  # spill stores per thread
    spill_checked: bool = True

    @property
    def ok(self) -> bool:
        from .kron_mixture import SPILL_TOLERANCE_BYTES

        fits = self.shared_bytes <= self.limit_bytes
        return self.error is None and fits and (not self.spill_checked or self.spill_bytes <= SPILL_TOLERANCE_BYTES)


def _kernels():
    from . import kron_mixture, nf4_dequantize, nf4_matmul

    return {
        "_nf4_matmul_kernel": nf4_matmul._nf4_matmul_kernel.fn,
        "_nf4_matmul_t_kernel": nf4_matmul._nf4_matmul_t_kernel.fn,
        "_nf4_dequantize_kernel": nf4_dequantize._nf4_dequantize_kernel,
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
    # A LLaMA projection's launch (N = K = 4096, contiguous operands): unit strides 1, the rest multiples of
    # 16; prefill at T = 4096, decoding at T = 1 (the split-K GEMV). Bytes from fresh allocations: aligned.
    width = 4096
    prefill = dict(M=width, M_BUCKET=width, N=width, K=width)
    decode = dict(prefill, M=1, M_BUCKET=1)
    fwd_strides = dict(stride_xm=width, stride_xk=1, stride_om=width, stride_on=1, stride_am=width, stride_an=1)
    no_adapter_ints = dict(ad_r=1, ad_max_tiles=0, ad_programs=0, ad_stride_xm=width)  # AdapterLaunch.none
    t_ints = dict(prefill, stride_dym=width, stride_dyn=1, stride_dxm=width, stride_dxk=1, stride_am=width, stride_ak=1)
    out: list[Variant] = []
    for dtype in ("bf16", "fp16"):
        fwd_ptrs = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "add_ptr": "*fp32", "bias_ptr": f"*{dtype}"}
        for cfg in NF4_MATMUL_CONFIGS:
            split_ks = (1, 4) if cfg.kwargs["BLOCK_M"] <= 16 else (1,)
            for split_k in split_ks:
                ptrs = dict(fwd_ptrs, **nf4_pointers)
                if split_k > 1:
                    ptrs["out_ptr"] = "*fp32"
                flags = dict(
                    BLOCKSIZE=64, HAS_ADD=True, HAS_BIAS=True, DOUBLE_QUANT=True, SPLIT_K=split_k, ROWS_64=False
                )
                no_adapter = dict(HAS_ADAPTER=False, AD_GATE=0, AD_R_PAD=1)
                no_adapter.update(AD_BLOCK_P=16, AD_BLOCK_J=16, AD_BLOCK_L=16, AD_BLOCK_Q=16)
                shape_ints = decode if split_k > 1 else prefill
                out.append(
                    Variant(
                        "_nf4_matmul_kernel",
                        ptrs,
                        dict(flags, DOT_FP32=False, **no_adapter, **cfg.kwargs),
                        cfg.num_warps,
                        cfg.num_stages,
                        spill_checked=False,
                        launch_ints=dict(shape_ints, **fwd_strides, **no_adapter_ints),
                        aligned_pointers=True,
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
                    fused = [(b, 1) for b in kron_mixture.maximal_blocks()] if dtype == "bf16" else []
                    fused.append((kron_mixture.maximal_blocks()[0], 2))  # the uniform gate; fp16
                    for ad_blocks, ad_gate in fused:
                        adapter = dict(HAS_ADAPTER=True, AD_GATE=ad_gate, AD_R_PAD=8)
                        names = ("AD_BLOCK_P", "AD_BLOCK_J", "AD_BLOCK_L", "AD_BLOCK_Q")
                        adapter.update(zip(names, ad_blocks, strict=True))
                        out.append(
                            Variant(
                                "_nf4_matmul_kernel",
                                dict(ptrs, **adapter_ptrs),
                                dict(flags, HAS_ADD=False, DOT_FP32=False, **adapter, **cfg.kwargs),
                                cfg.num_warps,
                                cfg.num_stages,
                                spill_checked=False,
                                launch_ints=dict(decode, **fwd_strides, ad_stride_xm=width),
                                aligned_pointers=True,
                            )
                        )
        for cfg in NF4_MATMUL_T_CONFIGS:
            ptrs = dict({"dy_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}", "add_ptr": "*fp32"}, **nf4_pointers)
            flags = dict(BLOCKSIZE=64, HAS_ADD=True, DOUBLE_QUANT=True, DOT_FP32=False, ROWS_64=False)
            out.append(
                Variant(
                    "_nf4_matmul_t_kernel",
                    ptrs,
                    dict(flags, **cfg.kwargs),
                    cfg.num_warps,
                    cfg.num_stages,
                    False,
                    launch_ints=t_ints,
                    aligned_pointers=True,
                )
            )
        # The large-batch route's decode: double quantization or fp32 scales; a blocksize below the 256-wide
        # tile and one above it (two tiles per block).
        from .nf4_dequantize import DEQUANTIZE_BLOCK_K, DEQUANTIZE_BLOCK_N, DEQUANTIZE_WARPS

        for double_quant, blocksize in ((True, 64), (False, 512)):
            ptrs = dict(nf4_pointers, out_ptr=f"*{dtype}", absmax_ptr="*u8" if double_quant else "*fp32")
            flags = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant)
            flags.update(BLOCK_N=DEQUANTIZE_BLOCK_N, BLOCK_K=DEQUANTIZE_BLOCK_K)
            out.append(
                Variant(
                    "_nf4_dequantize_kernel",
                    ptrs,
                    flags,
                    DEQUANTIZE_WARPS,
                    3,
                    fp_fusion=False,
                    launch_ints=dict(N=width, K=width),
                    aligned_pointers=True,
                )
            )
        # bf16: every tile set the chooser can pick, gated by the logits' dtype; fp16 and the other gate
        # modes: the maximal sets (the others are no larger, size by size). The ``max`` policy's largest
        # set (64⁴, kept for the GPU sweep) must compile but may spill.
        every = kron_mixture._candidate_blocks() if dtype == "bf16" else ()
        blocks = {b: (1,) for b in every}
        blocks.update({b: (0, 1, "1-fp32", 2) for b in kron_mixture.maximal_blocks()})
        blocks[(64, 64, 64, 64)] = (1,)
        for tile_set, gate_modes in blocks.items():
            out += kron_variants(tile_set, dtype, gate_modes)
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
    # Activations spanning 2^31 elements take 64-bit row offsets: the first config of each NF4 GEMM again.
    for kernel in ("_nf4_matmul_kernel", "_nf4_matmul_t_kernel"):
        first = next(v for v in out if v.kernel == kernel)
        out.append(
            Variant(
                kernel,
                first.pointer_types,
                dict(first.constexprs, ROWS_64=True),
                first.num_warps,
                first.num_stages,
                False,
            )
        )
    # Values the launchers pick that the lists above fix: R_PAD (the power of two above r) other than 8, a
    # blocksize other than 64, an odd split-K count (split_k_for returns 1..16).
    from . import kron_mixture

    for r_pad in (1, 2, 4, 16):
        out += kron_variants(kron_mixture.maximal_blocks()[0], "bf16", ("1-fp32",), r_pad)
        finish = next(v for v in out if v.kernel == "_factor_grad_finish_kernel")
        out.append(dataclasses.replace(finish, constexprs=dict(finish.constexprs, R_PAD=r_pad)))
    # MoKALinear's defaults the lists above miss: fp32 master factors of a bf16 layer (fp32 gradients beside
    # the bf16 copies the kernels read), and fp32 rows written without accumulating (the rowwise schedule of
    # deterministic mode, and of fp16 layers at T >= 512).
    finish = next(v for v in out if v.kernel == "_factor_grad_finish_kernel" and v.pointer_types["grad_ptr"] == "*bf16")
    master = dict(finish.pointer_types, grad_ptr="*fp32", gate_grad_ptr="*fp32", gate_ptr="*fp32")
    out.append(dataclasses.replace(finish, pointer_types=master, constexprs=dict(finish.constexprs, GATE=1)))
    rowwise = next(v for v in out if v.kernel == "_kron_sandwich_rowwise_kernel" and v.constexprs["GATE"] == 1)
    out.append(dataclasses.replace(rowwise, constexprs=dict(rowwise.constexprs, ACCUMULATE=False)))
    first_fwd = next(v for v in out if v.kernel == "_nf4_matmul_kernel")
    first_t = next(v for v in out if v.kernel == "_nf4_matmul_t_kernel")
    split = dict(first_fwd.pointer_types, out_ptr="*fp32")  # split-K accumulates in fp32
    out.append(
        dataclasses.replace(
            first_fwd, pointer_types=split, constexprs=dict(first_fwd.constexprs, BLOCKSIZE=128, SPLIT_K=6)
        )
    )
    single_quant = dict(first_t.pointer_types, absmax_ptr="*fp32")  # fp32 scales without double quantization
    single_quant_flags = dict(first_t.constexprs, BLOCKSIZE=256, DOUBLE_QUANT=False)
    out.append(dataclasses.replace(first_t, pointer_types=single_quant, constexprs=single_quant_flags))
    # fp32 layers: every set of their own list (FP32_TILE_SETS: its spills do not shrink with the tiles,
    # so the maximal sets would not bound the others), with fp32 logits as MoKALinear passes them.
    for tile_set in kron_mixture._candidate_blocks(fp32_operands=True):
        out += kron_variants(tile_set, "fp32", ("1-fp32",))
    # fp32 inputs take the IEEE-precision dot branch: the first config of each kernel again, in fp32.
    for kernel in _kernels():
        first = next(v for v in out if v.kernel == kernel)
        pointers = {k: ("*fp32" if t in ("*bf16", "*fp16") else t) for k, t in first.pointer_types.items()}
        constexprs = dict(first.constexprs, DOT_FP32=True)
        out.append(Variant(kernel, pointers, constexprs, first.num_warps, first.num_stages, first.spill_checked))
    return out


def kron_variants(
    blocks: tuple[int, int, int, int], dtype: str = "bf16", gate_modes=(1,), r_pad: int = 8
) -> list[Variant]:
    """The three Kronecker kernels at one tile set (as ``choose_blocks`` returns it): both sandwich schedules
    for each gate mode (0: coefficients read, 1: logits of ``dtype``, "1-fp32": fp32 logits, as MoKALinear
    passes them, 2: uniform) and the token reduction, its tiles mapped as the launcher maps them.
    Spill-checked when the chooser can pick the set."""
    from . import kron_mixture

    ieee = dtype == "fp32"  # fp32 inputs take the IEEE-precision dot branch, as a launch does (dot_in_fp32)
    checked = blocks in kron_mixture._candidate_blocks(fp32_operands=ieee)
    bp, bj, bl, bq = blocks
    out = []
    for gate_key, gate_mode, gate_type in (
        (0, 0, "*fp32"),
        (1, 1, f"*{dtype}"),
        ("1-fp32", 1, "*fp32"),
        (2, 2, "*fp32"),
    ):
        if gate_key not in gate_modes:
            continue
        ptrs = {
            "m_ptr": f"*{dtype}",
            "out_ptr": "*fp32",
            "table_ptr": "*i64",
            "gate_ptr": gate_type,
            "factor_ptr": f"*{dtype}",
            "scale": "fp32",
        }
        flags = dict(GATE=gate_mode, R_PAD=r_pad, DOT_FP32=ieee, BLOCK_P=bp, BLOCK_J=bj, BLOCK_L=bl, BLOCK_Q=bq)
        out.append(Variant("_kron_sandwich_grouped_kernel", ptrs, flags, 4, 3, checked))
        out.append(Variant("_kron_sandwich_rowwise_kernel", ptrs, dict(flags, ACCUMULATE=True), 4, 3, checked))
        if dtype == "bf16" and gate_key in (1, "1-fp32"):  # bf16 rows for cuBLAS to add (cuBLAS routes)
            half_out = dict(ptrs, out_ptr=f"*{dtype}")
            out.append(Variant("_kron_sandwich_rowwise_kernel", half_out, dict(flags, ACCUMULATE=False), 4, 3, checked))
    ptrs = {
        "rows0_ptr": f"*{dtype}",
        "rows1_ptr": f"*{dtype}",
        "table_ptr": "*i64",
        "ws_ptr": "*fp32",
        "like_ptr": f"*{dtype}",
    }
    flags = dict(DOT_FP32=ieee, **kron_mixture.reduce_block_constexprs(blocks))
    out.append(Variant("_kron_token_reduce_grouped_kernel", ptrs, flags, 4, 3, checked))
    return out


def compile_variant(variant: Variant, capability: int) -> Result:
    fn = _kernels()[variant.kernel]
    constexprs = {k: v for k, v in variant.constexprs.items() if k in fn.arg_names}
    start = time.perf_counter()
    shared, error, registers, spills = 0, None, 0, 0
    try:
        compiled = compile_for(variant, capability)
        shared = int(compiled.metadata.shared)
        if "cubin" not in compiled.asm:
            error = "no cubin produced"
        registers, spills = register_usage(compiled.asm["ptx"], capability)
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
        registers,
        spills,
        variant.spill_checked,
    )


def compile_for(variant: Variant, capability: int):
    """The compiled kernel (``.asm`` holds its PTX and cubin) of one variant for ``sm_<capability>``."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _kernels()[variant.kernel]
    constexprs = {k: v for k, v in variant.constexprs.items() if k in fn.arg_names}
    constexprs.update({k: 1 for k, v in variant.launch_ints.items() if v == 1 and k in fn.arg_names})
    signature = {
        name: variant.pointer_types.get(name, "constexpr" if name in constexprs else "i32") for name in fn.arg_names
    }
    divisible = [["tt.divisibility", 16]]
    attrs = {
        (i,): divisible
        for i, name in enumerate(fn.arg_names)
        if signature[name] != "constexpr"
        and (
            (variant.aligned_pointers and signature[name].startswith("*")) or variant.launch_ints.get(name, 1) % 16 == 0
        )
    }
    return triton.compile(
        triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", capability, 32),
        options={
            "num_warps": variant.num_warps,
            "num_stages": variant.num_stages,
            "enable_fp_fusion": variant.fp_fusion,
        },
    )


def register_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers per thread, spill-store bytes per thread) of a kernel's PTX, from ``ptxas -v`` with the
    ptxas and flags Triton itself uses for this target (the compiled metadata leaves them unset without a
    GPU driver)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        command = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2"]
        command += [f"--gpu-name={sm_arch_from_capability(capability)}", source, "-o", source + ".o"]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if registers is None or spills is None:
        raise RuntimeError(f"ptxas -v printed no register usage: {log[-300:]!r}")
    return int(registers.group(1)), int(spills.group(1))


def _compile_pair(args: tuple[Variant, int]) -> Result:
    return compile_variant(*args)


def compile_all(
    capabilities: tuple[int, ...] = (80, 90), workers: int | None = None, chosen: list[Variant] | None = None
) -> list[Result]:
    """Compile ``chosen`` (default: every variant) for each capability, in a process pool."""
    jobs = [(v, cc) for v in (variants() if chosen is None else chosen) for cc in capabilities]
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
            why = r.error or ("shared memory over limit" if r.shared_bytes > r.limit_bytes else "register spills")
            status = "ok" if r.ok else f"FAIL {why}"
            spills = f"{r.registers:3d} regs {r.spill_bytes:5d} B spilled{'' if r.spill_checked else ' (autotuned)'}"
            print(
                f"sm_{r.capability} {r.kernel:28s} {r.shared_bytes / 1024:7.1f} KB  {spills}  {status}  {r.constexprs}"
            )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
