#!/usr/bin/env python
"""GPU timing of the fused Triton linear_logprobs against eager PyTorch and a bare cuBLAS GEMM,
with the gradient filter off and on, plus one autotuned correctness check at a training shape
(the pytest GPU suite runs with autotuning off or with forced configs). Run by gpu_check.sh:

    python benchmarks/gpu_timing.py [--n 8192 --h 4096 --v 128256] [--profile]

Prints one line per measurement and exits non-zero when the autotuned check fails. Timings use
CUDA events over a few calls after two warm-up calls (the first compiles / autotunes).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / (b.norm() + 1e-6)).item()


def bench(fn, reps: int = 5) -> tuple[float, float]:
    """(ms per call, peak extra GiB) over `reps` calls after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, (torch.cuda.max_memory_allocated() - base) / 2**30


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--profile", action="store_true", help="print the kernel time table of one fwd+bwd")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_timing: no CUDA device", file=sys.stderr)
        return 2
    from fastalign.ops import linear_logprobs, linear_logprobs_reference

    llmod = importlib.import_module("fastalign.ops.linear_logprobs")
    torch.backends.cuda.matmul.allow_tf32 = False
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "1")
    dev, bf = "cuda", torch.bfloat16
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    t0 = time.time()
    fails = 0

    # 1. autotuned run at a training shape, against an fp32 reference from the same bf16 inputs.
    n, h, v = 4096, 4096, 128256
    g = torch.Generator(device=dev).manual_seed(0)
    hid = torch.randn(n, h, device=dev, generator=g).to(bf)
    w = (torch.randn(v, h, device=dev, generator=g) * 2 / h**0.5).to(bf)
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    H_, W_ = hid.clone().requires_grad_(), w.clone().requires_grad_()
    lp = linear_logprobs(H_, W_, y, backend="triton", grad_filter=None)
    lp.sum().backward()
    Hf, Wf = hid.float().requires_grad_(), w.float().requires_grad_()
    ref = torch.log_softmax(Hf @ Wf.T, -1).gather(1, y[:, None])[:, 0]
    ref.sum().backward()
    ok = (
        (lp - ref).abs().max().item() < 3e-4 and rel(H_.grad, Hf.grad) < 1e-2 and rel(W_.grad, Wf.grad) < 1e-2
    )
    print(f"{'PASS' if ok else 'FAIL'} autotuned N={n} H={h} V={v} ({time.time() - t0:.0f} s)", flush=True)
    fails += not ok
    del hid, w, H_, W_, Hf, Wf, lp, ref
    torch.cuda.empty_cache()

    # 2. timings at the benchmark shape.
    n, h, v = args.n, args.h, args.v
    hid = torch.randn(n, h, device=dev, dtype=bf)
    w = torch.randn(v, h, device=dev, dtype=bf) * (4 / h**0.5)  # logits std ~4: a peaky softmax
    y = torch.randint(0, v, (n,), device=dev)
    logits = torch.empty(n, v, device=dev, dtype=bf)
    ms, _ = bench(lambda: torch.mm(hid, w.T, out=logits))
    print(f"cuBLAS hidden @ W.T: {ms:.2f} ms = {2 * n * h * v / ms / 1e9:.0f} TFLOP/s", flush=True)
    logits = None  # free it before the fused runs
    H_, W_ = hid.clone().requires_grad_(), w.clone().requires_grad_()
    runs = {
        "eager": lambda a, b: linear_logprobs_reference(a, b, y),
        "triton exact": lambda a, b: linear_logprobs(a, b, y, backend="triton", grad_filter=None),
        "triton filter auto": lambda a, b: linear_logprobs(a, b, y, backend="triton"),
        "triton validate=False": lambda a, b: linear_logprobs(a, b, y, backend="triton", validate=False),
    }
    for name, fn in runs.items():
        with torch.no_grad():
            f_ms, f_mem = bench(lambda fn=fn: fn(hid, w))

        def step(fn=fn):
            H_.grad = W_.grad = None
            fn(H_, W_).sum().backward()

        fb_ms, fb_mem = bench(step, reps=3)
        print(
            f"{name}: fwd {f_ms:.1f} ms ({2 * n * h * v / f_ms / 1e9:.0f} TFLOP/s, +{f_mem:.2f} GiB); "
            f"fwd+bwd {fb_ms:.1f} ms (6NHV: {6 * n * h * v / fb_ms / 1e9:.0f} TFLOP/s, +{fb_mem:.2f} GiB)",
            flush=True,
        )
    with llmod.grad_filter_stats() as stats:
        step(runs["triton filter auto"])
    if stats:
        print(
            f"filter auto: skipped {stats[0]['skipped_fraction']:.3f} of the (row, block) pairs", flush=True
        )
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step(runs["triton filter auto"])
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12))
    print(f"gpu_timing done in {time.time() - t0:.0f} s; failed: {fails}", flush=True)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
