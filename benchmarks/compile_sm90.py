#!/usr/bin/env python
"""Compile every Triton config of the linear_logprobs kernels for Hopper (sm_90) offline — no GPU
needed, only Triton's bundled ptxas — and report what the SASS holds: registers, spill stack,
dynamic shared memory (the pipeline depth) and whether the dots became wgmma (HGMMA).

    python benchmarks/compile_sm90.py             # every kernel, bf16, ~1-3 min on 2 cores
    python benchmarks/compile_sm90.py dz          # the kernels whose name starts with "dz"

Pointers, strides and H are compiled as divisible by 16, as the launchers' arguments are on a GPU
(torch allocations are 256-byte aligned; H and the strides of real models are multiples of 16);
without that hint Triton neither vectorises the loads nor pipelines them. Exit status 1 if a
config fails to compile.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
PTR, INT, FLT = "*bf16", "i32", "fp32"


def _jit(kernel) -> JITFunction:
    fn = kernel
    while not isinstance(fn, JITFunction):  # autotuner / heuristics wrappers
        fn = fn.fn
    return fn


def compile_one(kernel, sig: dict, const: dict, cfg) -> str:
    fn = _jit(kernel)
    const = dict(const, **cfg.kwargs)
    signature = {a: ("constexpr" if a in const else sig[a]) for a in fn.arg_names}
    aligned = [
        a
        for a in fn.arg_names
        if a not in const and (a.endswith("_ptr") or a.startswith("stride") or a in ("H", "C_PAD", "V_RANGE"))
    ]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn, signature, constexprs=const, attrs=attrs)
    ck = triton.compile(
        src, target=TARGET, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
    usage = next((line for line in res.splitlines() if "REG:" in line), "")
    usage = " ".join(w for w in usage.split() if w.startswith(("REG:", "STACK:")))
    return f"{usage} dyn_smem={ck.metadata.shared // 1024} KiB HGMMA={'HGMMA' in sass}"


def jobs(k) -> list[tuple]:
    base = dict(F64=False, ACC=tl.float32, DOT_PREC="ieee", DOT_UPCAST=False)
    fwd = {
        **dict.fromkeys(("h_ptr", "w_ptr", "b_ptr"), PTR),
        "lab_ptr": "*i64",
        "part_ptr": "*fp32",
        "lmass_ptr": "*fp32",
        **dict.fromkeys(("N", "V", "H", "V_RANGE", "SPLIT", "stride_hn", "stride_wv", "ignore_index"), INT),
        **dict.fromkeys(("N_BUCKET", "NB"), INT),
        "inv_t_hi": FLT,
        "inv_t_lo": FLT,
    }
    dz = {
        **dict.fromkeys(("h_ptr", "w_ptr", "b_ptr", "dz_ptr"), PTR),
        "lab_ptr": "*i64",
        "lse_ptr": "*fp64",
        **dict.fromkeys(("ent_ptr", "glogp_ptr", "gent_ptr", "dbp_ptr"), "*fp32"),
        "keep_ptr": "*u8",
        **dict.fromkeys(("N", "V", "H", "c0", "C", "C_PAD", "NB", "stride_hn", "stride_wv"), INT),
        **dict.fromkeys(("stride_dz", "stride_dbp", "ignore_index", "N_BUCKET"), INT),
        "inv_t_hi": FLT,
        "inv_t_lo": FLT,
    }
    dh = {
        **dict.fromkeys(("dz_ptr", "w_ptr"), PTR),
        "dh_ptr": "*fp32",
        "keep_ptr": "*u8",
        **dict.fromkeys(
            ("N", "H", "V", "C", "C_PAD", "c0", "NB", "stride_dz", "stride_wv", "stride_dh"), INT
        ),
        "N_BUCKET": INT,
    }
    dw = {
        **dict.fromkeys(("dz_ptr", "h_ptr", "dw_ptr"), PTR),
        "keep_ptr": "*u8",
        **dict.fromkeys(
            ("N", "H", "V", "C", "c0", "NB", "stride_dz", "stride_hn", "stride_dw", "N_BUCKET"), INT
        ),
    }
    gemm = dict(ACC=tl.float32, DOT_PREC="ieee", DOT_UPCAST=False, HAS_KEEP=True, FB=256, GROUP_N=8)
    out = []
    for cfg in k._fwd_configs(every=True):
        for mass in (False, True):
            const = dict(base, HAS_BIAS=True, WITH_ENTROPY=True, WITH_MASS=mass, FB=256, EVEN_K=True)
            out.append((f"fwd mass={mass}", k._linear_logprobs_fwd_kernel, fwd, const, cfg))
    for cfg in k._dz_configs(every=True):
        for keep in (False, True):
            const = dict(base, HAS_BIAS=True, WITH_ENTROPY=True, NEED_DBIAS=True, HAS_KEEP=keep, FB=256)
            out.append(
                (
                    f"dz keep={keep}",
                    k._linear_logprobs_bwd_kernel,
                    dz,
                    dict(const, GROUP_N=8, EVEN_K=True),
                    cfg,
                )
            )
    for cfg in k._dh_configs(every=True):
        out.append(("dh keep=True", k._linear_logprobs_bwd_dh_kernel, dh, gemm, cfg))
        out.append(("dw keep=True", k._linear_logprobs_bwd_dw_kernel, dw, gemm, cfg))
    return out


def main(argv: list[str]) -> int:
    k = importlib.import_module("fastalign.kernels.linear_logprobs")
    only = argv[0] if argv else ""
    print(f"triton {triton.__version__}, target sm_90, bf16 operands, fp32 accumulation", flush=True)
    failed = 0
    for name, kernel, sig, const, cfg in jobs(k):
        if not name.startswith(only):
            continue
        tag = f"{name:14s} {cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}"
        t0 = time.time()
        try:
            print(f"{tag}: {compile_one(kernel, sig, const, cfg)} ({time.time() - t0:.0f} s)", flush=True)
        except Exception as exc:
            failed += 1
            print(f"{tag}: FAILED {type(exc).__name__}: {str(exc)[:400]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
