#!/usr/bin/env python
"""Benchmark of FusedLinearPreferenceLoss (DPO) against the unfused eager path and Liger-Kernel.

    python benchmarks/bench_losses.py --quick                # < 1 min on a 2-core CPU (no Liger)
    python benchmarks/bench_losses.py --quick --gate         # ... then the CI regression gate
    python benchmarks/bench_losses.py --out benchmarks/results/cpu-losses-2025-01-01.csv   # full

One case is the DPO sigmoid loss (beta 0.1), forward + backward, fp32 on CPU, on B pairs:
`hidden` (2B, T, H) (chosen rows first), lm_head `weight` (V, H), labels (2B, T) with the first
quarter of every row (the "prompt") at ignore_index, and the reference model's `ref_hidden`
(2B, T, H) / `ref_weight` (V, H), from which every backend computes the reference log-probs
under no_grad (Liger only takes reference inputs, not precomputed reference log-probs):

    eager           logits = hidden @ weight.T, log_softmax + gather, summed sequence log-probs,
                    the reference the same way under no_grad, then fastalign's dpo_loss
    fastalign       FusedLinearPreferenceLoss("dpo", beta=0.1)(hidden, weight, labels,
                    ref_hidden=..., ref_weight=...)
    liger           LigerFusedLinearDPOLoss(beta=0.1, compiled=False)(weight, hidden, labels,
                    ref_input=..., ref_weight=...)  [needs liger-kernel: the `bench` extra]
    liger_compiled  the same with compiled=True (torch.compile; one full-size call compiles it
                    before anything is measured)

The machinery (a fresh subprocess per case, peak memory via /proc clear_refs + VmHWM, timing in
pairs with eager, the long-format CSV, the gate) is benchlib.py's; see benchmarks/README.md.
Without liger-kernel the peer cases are skipped with a note. Only eager / fastalign figures go
into the gate's baselines (benchmarks/baselines/<cpu>/losses_quick.csv): CI has no Liger.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/ is not a package

import benchlib  # noqa: E402
from benchlib import REPO  # noqa: E402

OP = "dpo_fused_linear"
MODE = "fwd+bwd"
DTYPE = "fp32"
BACKENDS = ("eager", "fastalign", "liger", "liger_compiled")
PEERS = ("liger", "liger_compiled")
BETA = 0.1
# (B pairs, T, H, V). On CPU the Llama-3 vocabulary runs at T=128 to keep a full run ~10 min.
SHAPES = {"quick": [(4, 64, 576, 32768)], "full": [(4, 512, 576, 49152), (4, 128, 576, 128256)]}
TIMING = {
    "quick": {"target_s": 3.0, "min_reps": 5, "max_reps": 20, "timeout_s": 180},
    "full": {"target_s": 20.0, "min_reps": 3, "max_reps": 10, "timeout_s": 900},
}


def shape_label(shape) -> str:
    b, t, h, v = shape
    return f"B={b} T={t} H={h} V={v}"


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


# ---------------------------------------------------------------------------------------------
# child
# ---------------------------------------------------------------------------------------------
def _make_inputs(shape, seed: int = 0) -> dict:
    """Inputs created in place (no temporaries: no high-water mark above the inputs)."""
    import torch

    b, t, h, v = shape
    gen = torch.Generator().manual_seed(seed)
    x = {
        "hidden": torch.empty(2 * b, t, h).normal_(0.0, 1.0, generator=gen),
        "weight": torch.empty(v, h).normal_(0.0, 2.0 / h**0.5, generator=gen),
        "ref_hidden": torch.empty(2 * b, t, h).normal_(0.0, 1.0, generator=gen),
        "ref_weight": torch.empty(v, h).normal_(0.0, 2.0 / h**0.5, generator=gen),
        "labels": torch.randint(0, v, (2 * b, t), generator=gen),
    }
    x["labels"][:, : max(1, t // 4)] = -100  # the prompt
    x["hidden"].requires_grad_(True)
    x["weight"].requires_grad_(True)
    return x


def _eager_seq_logps(hidden, weight, labels):
    import torch

    from fastalign.losses.preference import sequence_logps

    mask = labels != -100
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return sequence_logps(tok, mask)


def _make_loss(backend: str, x: dict):
    """-> loss(): one forward of `backend` on the inputs x, returning the 0-d loss."""
    import torch

    if backend == "eager":
        from fastalign.losses.preference import dpo_loss

        def loss():
            seq = _eager_seq_logps(x["hidden"], x["weight"], x["labels"])
            with torch.no_grad():
                ref = _eager_seq_logps(x["ref_hidden"], x["ref_weight"], x["labels"])
            b = seq.shape[0] // 2
            losses, _, _ = dpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], beta=BETA, loss_type="sigmoid")
            return losses.mean()

    elif backend == "fastalign":
        from fastalign.losses.fused_linear import FusedLinearPreferenceLoss

        fn = FusedLinearPreferenceLoss("dpo", beta=BETA)

        def loss():
            out, _ = fn(
                x["hidden"], x["weight"], x["labels"], ref_hidden=x["ref_hidden"], ref_weight=x["ref_weight"]
            )
            return out

    elif backend in PEERS:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        fn = LigerFusedLinearDPOLoss(beta=BETA, compiled=backend == "liger_compiled")

        def loss():
            out = fn(
                x["weight"], x["hidden"], x["labels"], ref_input=x["ref_hidden"], ref_weight=x["ref_weight"]
            )
            return out[0] if isinstance(out, tuple) else out

    else:
        raise ValueError(f"unknown backend {backend!r}")
    return loss


def _make_step(backend: str, x: dict, repeat: int = 1):
    """One forward + backward of `backend` (grads set to None first); `repeat` times per step
    for --inject-slowdown."""
    loss = _make_loss(backend, x)

    def step():
        for _ in range(repeat):
            x["hidden"].grad = x["weight"].grad = None
            loss().backward()

    return step


def _run_one(case: dict) -> dict:
    backend, shape = case["backend"], tuple(case["shape"])
    res = dict(op=OP, backend=backend, mode=MODE, shape=shape_label(shape), dtype=DTYPE)
    paired = backend != "eager"
    # 1. warm the code paths on a small problem (both backends of the pair).
    x = _make_inputs((1, 16, 64, 2048))
    for b in (backend, "eager") if paired else (backend,):
        step = _make_step(b, x)
        for _ in range(2):
            step()
    del step, x
    # 2. full-size inputs; a compiled backend compiles for this shape before anything is measured.
    x = _make_inputs(shape, seed=1)
    step = _make_step(backend, x, repeat=case.get("slowdown", 1))
    if backend == "liger_compiled":
        t0 = time.perf_counter()
        step()
        res["compile_call_ms"] = (time.perf_counter() - t0) * 1e3
    x["hidden"].grad = x["weight"].grad = None
    gc.collect()
    # 3. peak extra memory of one call; 4. timings, in pairs with eager.
    res["peak_mem_mb"], first_s, res["mem_method"] = benchlib.measure_peak_cpu(step)
    res["first_call_ms"] = first_s * 1e3
    steps = {backend: step}
    if paired:
        steps["eager"] = _make_step("eager", x)
    res.update(benchlib.time_steps(steps, backend, first_s, case, "cpu"))
    return res


def child_main(case: dict) -> int:
    import torch

    if case.get("check"):  # the parent's agreement check, in its own process
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print("\n".join(check_agreement(case.get("cpp_so"), case["backends"])), flush=True)
        return 0
    torch.set_num_threads(case["threads"])
    try:
        if case.get("cpp_so"):
            benchlib.pin_cpp(case["cpp_so"])
        res = _run_one(case)
    except Exception as exc:
        traceback.print_exc()
        res = dict(op=OP, backend=case["backend"], mode=MODE, shape=shape_label(case["shape"]), dtype=DTYPE)
        res["error"] = benchlib.error_message(exc)
    print(benchlib.RESULT_TAG + json.dumps(res), flush=True)
    return 0


def check_agreement(cpp_so: str | None, backends: list[str]) -> list[str]:
    """Small case: the backends' losses and grads against eager's. Returns the printed lines."""
    if cpp_so:
        benchlib.pin_cpp(cpp_so)
    lines = []
    ref = None
    for backend in ["eager"] + [b for b in backends if b != "eager"]:
        x = _make_inputs((2, 32, 64, 1024), seed=3)
        loss = _make_loss(backend, x)()
        loss.backward()
        got = (loss.item(), x["hidden"].grad.clone(), x["weight"].grad.clone())
        if ref is None:
            ref = got
        dh = (got[1] - ref[1]).abs().max().item()
        dw = (got[2] - ref[2]).abs().max().item()
        lines.append(
            f"  {backend:<15} loss {got[0]:.8f}  |loss - eager| {abs(got[0] - ref[0]):.2e}  "
            f"max|dhidden - eager| {dh:.2e}  max|dweight - eager| {dw:.2e}"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------
def run_case(case: dict, timeout_s: float, threads: int) -> dict:
    """One case in a fresh subprocess."""
    printed, stderr, how = benchlib.run_case_process(Path(__file__), case, timeout_s, threads)
    if printed:
        r = printed[0]
        if "error" in r and stderr.strip():
            r["stderr_tail"] = benchlib.stderr_tail(stderr)
        return r
    key = dict(op=OP, backend=case["backend"], mode=MODE, shape=shape_label(case["shape"]), dtype=DTYPE)
    return benchlib.died(key, stderr, how)


def derive(results: list[dict]) -> None:
    eager = {r["shape"]: r for r in results if r["backend"] == "eager" and "error" not in r}
    for r in results:
        if "error" in r:
            continue
        dims = dict(kv.split("=") for kv in r["shape"].split())
        n, h, v = 2 * int(dims["B"]) * int(dims["T"]), int(dims["H"]), int(dims["V"])
        # useful FLOPs: policy fwd+bwd 6NVH + reference fwd 2NVH (all tokens, prompt included)
        r["gflops"] = 8 * n * v * h / (r["time_ms_median"] / 1e3) / 1e9
        base = eager.get(r["shape"])
        if base is not None and r["backend"] != "eager" and base["peak_mem_mb"] > 0:
            r["mem_ratio_vs_eager"] = r["peak_mem_mb"] / base["peak_mem_mb"]


def print_table(results: list[dict], skipped: dict, device_name: str, threads: int, loads) -> None:
    fmt = benchlib.fmt
    print()
    print("=" * 100)
    print(f"RESULTS  ({device_name}, {threads} threads; 1-min load average before / after: {loads})")
    print("  DPO sigmoid (beta 0.1), fwd+bwd, fp32; reference log-probs from ref_hidden/ref_weight")
    print("  under no_grad in every backend. time: median [p20 - p80] over the reps; vs eager: median")
    print("  over back-to-back pairs of eager time / this time (>1: faster); peak MB: peak extra")
    print("  memory of one call above the inputs (grads included); GFLOP/s: 8*N*V*H / median.")
    print("=" * 100)
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    for shape in shapes:
        print()
        print(f"{OP}  {shape}  {DTYPE}  {MODE}")
        print(
            f"  {'backend':<15} {'median ms':>10} {'[p20 - p80]':>23} {'vs eager':>9} {'(eager ms)':>10} "
            f"{'peak MB':>9} {'mem/eager':>9} {'GFLOP/s':>8}"
        )
        for r in (r for r in results if r["shape"] == shape):
            if "error" in r:
                print(f"  {r['backend']:<15} FAILED: {r['error'][:160]}")
                continue
            spread = f"[{fmt(r['time_ms_p20'])} - {fmt(r['time_ms_p80'])}]"
            sp = r.get("speedup_vs_eager")
            print(
                f"  {r['backend']:<15} {fmt(r['time_ms_median']):>10} {spread:>23} "
                f"{(fmt(sp, '.2f') + 'x') if sp is not None else '-':>9} "
                f"{fmt(r.get('eager_paired_ms_median')):>10} {fmt(r['peak_mem_mb']):>9} "
                f"{fmt(r.get('mem_ratio_vs_eager'), '.2f'):>9} {fmt(r.get('gflops')):>8}"
            )
        for backend, why in skipped.items():
            print(f"  {backend:<15} skipped: {why}")
    print()


def print_targets(results: list[dict]) -> None:
    """fastalign against Liger (both variants): is its peak memory <= Liger's, its time <= Liger's?
    Time is compared two ways: the ratio of the medians (separate processes) and the ratio of the
    two paired speedups vs eager (liger's / fastalign's; robust to load changes between them)."""
    ok_rows = {(r["shape"], r["backend"]): r for r in results if "error" not in r}
    print("fastalign vs Liger-Kernel (CPU, fp32; reported, not gated): peak memory, time <= Liger's")
    any_peer = False
    for shape in dict.fromkeys(r["shape"] for r in results):
        fa = ok_rows.get((shape, "fastalign"))
        for peer in PEERS:
            p = ok_rows.get((shape, peer))
            if fa is None or p is None:
                continue
            any_peer = True
            mem_ok = fa["peak_mem_mb"] <= p["peak_mem_mb"]
            t_med = fa["time_ms_median"] / p["time_ms_median"]
            t_pair = p["speedup_vs_eager"] / fa["speedup_vs_eager"]
            verdict = "MET" if max(t_med, t_pair) <= 1.0 else "MET (paired)" if t_pair <= 1.0 else "MISSED"
            print(
                f"  {shape} vs {peer}: peak {fa['peak_mem_mb']:.1f} vs {p['peak_mem_mb']:.1f} MB "
                f"{'MET' if mem_ok else 'MISSED'};  time fastalign/{peer} {t_med:.2f} (medians), "
                f"{t_pair:.2f} (paired speedups) {verdict}"
            )
    if not any_peer:
        print("  not checked: no Liger figures in this run (liger-kernel not installed, or its cases failed)")
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shape, few reps (CI gate run)")
    ap.add_argument("--backends", default=",".join(BACKENDS[1:]), help="comma list (eager always runs)")
    ap.add_argument("--shapes", default=None, help="BxTxHxV list, e.g. 4x512x576x49152")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--target-s", type=float, default=None, help="timing budget per case")
    ap.add_argument("--min-reps", type=int, default=None)
    ap.add_argument("--case-timeout", type=float, default=None)
    ap.add_argument("--out", type=Path, default=None, help="CSV path (default benchmarks/results/local/...)")
    benchlib.add_baseline_args(ap, "losses", "the fastalign loss")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case is not None:
        return child_main(json.loads(args.case))

    bad = benchlib.check_baseline_args(args)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    import torch

    kind = "quick" if args.quick else "full"
    threads = args.threads or benchlib.cpu_count()
    torch.set_num_threads(threads)
    backends = ["eager"] + [b.strip() for b in args.backends.split(",") if b.strip() and b.strip() != "eager"]
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        print(f"error: unknown backend(s) {bad}; choose from {list(BACKENDS)}", file=sys.stderr)
        return 2
    shapes = SHAPES[kind]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        if any(len(s) != 4 for s in shapes):
            print("error: --shapes takes BxTxHxV items", file=sys.stderr)
            return 2
    timing = dict(TIMING[kind])
    for key, val in (
        ("target_s", args.target_s),
        ("min_reps", args.min_reps),
        ("timeout_s", args.case_timeout),
    ):
        if val is not None:
            timing[key] = val
    device_name = benchlib.cpu_model()
    commit = benchlib.git_commit()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "benchmarks" / "results" / "local" / f"cpu-losses-{kind}-{stamp}.csv"
    skipped: dict[str, str] = {}
    if not liger_available():
        for b in backends:
            if b in PEERS:
                skipped[b] = "liger-kernel is not installed (pip install -c constraints.txt liger-kernel)"
        backends = [b for b in backends if b not in skipped]
    liger_ver = "not installed"
    if liger_available():
        from importlib.metadata import version

        liger_ver = version("liger-kernel")

    print(
        f"fastalign loss benchmarks ({kind} mode) -- commit {commit}, torch {torch.__version__}, "
        f"liger-kernel {liger_ver}"
    )
    print(
        f"device: cpu ({device_name}); torch.set_num_threads({threads}) "
        f"[OMP_NUM_THREADS={threads} in the cases]"
    )
    print(f"backends {backends}  shapes {', '.join(shape_label(s) for s in shapes)}  {MODE} {DTYPE}")
    for b, why in skipped.items():
        print(f"note: {b} cases skipped: {why}")
    if args.inject_slowdown != 1:
        k = args.inject_slowdown
        print(f"INJECTED SLOWDOWN: the fastalign loss runs {k} times per call (eager once)")

    print("cpp backend (used by fastalign's auto dispatch): building / loading ...", flush=True)
    ok, msg, cpp_so = benchlib.build_cpp()
    print(f"cpp backend: {msg if ok else 'UNAVAILABLE (fastalign falls back to its torch backend): ' + msg}")

    print("agreement check (B=2 T=32 H=64 V=1024, loss and grads vs eager):", flush=True)
    env_threads = {"OMP_NUM_THREADS": str(threads)}
    chk = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--case",
            json.dumps({"check": True, "cpp_so": cpp_so, "backends": backends}),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, **env_threads),
        cwd=REPO,
    )
    print(chk.stdout.rstrip() or f"  check failed: {chk.stderr.strip()[-500:]}", flush=True)

    loads = [benchlib.load_average()]
    results: list[dict] = []

    def save() -> None:
        derive(results)
        rows = [("machine", "-", "-", "-", "-", "loadavg_1min_max", max(loads))]
        benchlib.write_csv(out, results, rows, device_name, commit)

    print(
        f"running {len(backends) * len(shapes)} cases (one subprocess each); results go to {out}", flush=True
    )
    for shape in shapes:
        for backend in backends:
            case = dict(backend=backend, shape=list(shape), threads=threads, cpp_so=cpp_so, **timing)
            if backend == "fastalign":
                case["slowdown"] = args.inject_slowdown
            t0 = time.perf_counter()
            r = run_case(case, timing["timeout_s"], threads)
            wall = time.perf_counter() - t0
            tag = f"  {backend:<15} {shape_label(shape):<28}"
            if "error" in r:
                print(f"{tag} FAILED: {r['error'][:300]}", flush=True)
                if "stderr_tail" in r:
                    print("    " + r["stderr_tail"].replace("\n", "\n    "), flush=True)
            else:
                print(
                    f"{tag} median {r['time_ms_median']:9.1f} ms ({r['reps']} reps)"
                    + f"  peak {r['peak_mem_mb']:8.1f} MB"
                    + (f"  {r['speedup_vs_eager']:5.2f}x eager" if "speedup_vs_eager" in r else "")
                    + (f"  compile call {r['compile_call_ms'] / 1e3:.1f} s" if "compile_call_ms" in r else "")
                    + f"  [{wall:.0f} s]",
                    flush=True,
                )
            results.append(r)
            save()
    loads.append(benchlib.load_average())
    save()
    print_table(results, skipped, device_name, threads, " / ".join(f"{x:.2f}" for x in loads))
    print_targets(results)
    for m in sorted({r["mem_method"] for r in results if "mem_method" in r}):
        print(f"peak memory method: {m}")
    failed = [r for r in results if "error" in r]
    if failed:
        print(f"WARNING: {len(failed)} of {len(results)} cases failed (see FAILED above).")
    print(f"wrote {out}  ({len(results)} cases, total wall time {time.perf_counter() - t_start:.0f} s)")

    # Only eager / fastalign rows go into a baseline: CI has no Liger.
    keep = lambda row: row[1] not in PEERS
    return benchlib.baseline_and_gate(args, out, device_name, f"losses_{kind}", len(failed), keep_row=keep)


if __name__ == "__main__":
    sys.exit(main())
