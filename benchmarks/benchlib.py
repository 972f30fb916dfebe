"""Shared machinery of the benchmark scripts (bench_ops.py, bench_losses.py): machine
information, peak memory of one call, paired timing, the fresh-subprocess-per-case runner, the
long-format CSV, and the baseline / gate options. The scripts keep only what is theirs (cases,
inputs, tables); see benchmarks/README.md for the method and the CSV format.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BASELINES = HERE / "baselines"  # per CPU model: baselines/<cpu slug>/<suite>.csv (see gate.py)
RESULT_TAG = "@@BENCH_RESULT "
CSV_COLUMNS = ("op", "backend", "mode", "shape", "dtype", "metric", "value", "device", "commit")
# Per-case figures written to the CSV, in this order (those a result has).
CSV_METRICS = (
    "time_ms_median",
    "time_ms_p20",
    "time_ms_p80",
    "reps",
    "peak_mem_mb",
    "speedup_vs_eager",
    "eager_paired_ms_median",
    "mem_ratio_vs_eager",
    "gbps",
    "gflops",
    "frac_of_limit",
    "skipped_fraction",  # linear_logprobs with a gradient filter: (row, block) pairs dropped
    "max_dropped_mass",  # ... and the largest probability mass dropped from one row
)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# ---------------------------------------------------------------------------------------------
# process / machine information
# ---------------------------------------------------------------------------------------------
def proc_status_mb() -> dict[str, float]:
    """VmRSS / VmHWM of this process in MiB, from /proc/self/status (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    return out


def reset_hwm() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0: clear_refs '5')."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short HEAD commit: $BENCH_COMMIT, else read from .git, else `git rev-parse`, else 'unknown'."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        gitdir = REPO / ".git"
        if gitdir.is_file():  # worktree / submodule: "gitdir: <path>"
            gitdir = (REPO / gitdir.read_text().split(":", 1)[1].strip()).resolve()
        common = gitdir
        if (gitdir / "commondir").is_file():
            common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
        head = (gitdir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:7]
        ref = head[4:].strip()
        for base in (gitdir, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()[:7]
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0][:7]
    except (OSError, IndexError):
        pass
    try:
        res = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        if res.returncode == 0 and res.stdout.strip():
            return res.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


# ---------------------------------------------------------------------------------------------
# machine limits, peak memory, timing
# ---------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure_membw(device: str, nbytes: int, reps: int) -> float:
    """Best copy bandwidth in GB/s (bytes read + bytes written, as in STREAM 'copy')."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(reps + 1):  # the first copy faults `dst` in: not counted
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        dt = time.perf_counter() - t0
        best = max(best, 2 * src.numel() * 4 / dt / 1e9)
    return best


def measure_matmul(device: str, n: int, h: int, v: int, dtype: str, reps: int) -> float:
    """Best GFLOP/s of torch.mm over the three products of a linear layer's forward and backward
    (hidden @ weight.T, dlogits @ weight, dlogits.T @ hidden), into preallocated outputs."""
    import torch

    tdtype = getattr(torch, DTYPES[dtype])
    a = torch.empty(n, h, dtype=tdtype, device=device).normal_()
    w = torch.empty(v, h, dtype=tdtype, device=device).normal_()
    dz = torch.empty(n, v, dtype=tdtype, device=device).normal_()
    products = (
        (a, w.T, torch.empty(n, v, dtype=tdtype, device=device)),
        (dz, w, torch.empty(n, h, dtype=tdtype, device=device)),
        (dz.T, a, torch.empty(v, h, dtype=tdtype, device=device)),
    )
    best = 0.0
    for x, y, out in products:
        for i in range(reps + 1):  # the first product of each layout is a warmup
            sync(device)
            t0 = time.perf_counter()
            torch.mm(x, y, out=out)
            sync(device)
            dt = time.perf_counter() - t0
            if i > 0:
                best = max(best, 2 * n * h * v / dt / 1e9)
    return best


def measure_peak_cpu(step) -> tuple[float, float, str]:
    """Peak extra RSS of one call of step() above the RSS before it (MiB), on CPU.
    Returns (peak_mb, seconds the call took, description of the method)."""
    if reset_hwm():
        before = proc_status_mb()["VmRSS"]
        t0 = time.perf_counter()
        step()
        first_s = time.perf_counter() - t0
        peak = max(0.0, proc_status_mb()["VmHWM"] - before)
        return peak, first_s, "VmHWM after the call - VmRSS before it (peak reset via /proc/self/clear_refs)"
    before = proc_status_mb()["VmRSS"]
    floor = maxrss_mb()
    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    method = "ru_maxrss after the call - RSS before it"
    if floor > before + 1.0:
        method += f" (UNRELIABLE: high-water mark was already {floor - before:.0f} MB above)"
    return max(0.0, maxrss_mb() - before), first_s, method


def time_steps(steps: dict, backend: str, first_s: float, case: dict, device: str) -> dict:
    """Time steps[backend], in pairs with steps["eager"] when that is there (same inputs, one
    process, alternating which goes first). The number of reps (pairs) is
    clamp(case["target_s"] / time of the first one, case["min_reps"], case["max_reps"]).
    Returns time_ms_median / _p20 / _p80, reps and, when paired, speedup_vs_eager (median of the
    per-pair ratios, so that a change of machine load during the run cancels out of it) and
    eager_paired_ms_median."""
    import numpy as np

    target, lo, hi = case["target_s"], case["min_reps"], case["max_reps"]
    paired = "eager" in steps and backend != "eager"
    if first_s < 1.0:  # warm-up (the memory call served as one for slow cases)
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {b: [] for b in steps}
    i = reps = 0
    while i == 0 or i < reps:
        for b in list(steps)[:: 1 if i % 2 == 0 else -1]:
            sync(device)
            t0 = time.perf_counter()
            steps[b]()
            sync(device)
            times[b].append((time.perf_counter() - t0) * 1e3)
        if i == 0:
            rep_s = sum(t[0] for t in times.values()) / 1e3
            reps = int(min(hi, max(lo, round(target / max(rep_s, 1e-6)))))
        i += 1
    p20, med, p80 = np.percentile(np.array(times[backend]), [20, 50, 80]).tolist()
    res = dict(time_ms_median=med, time_ms_p20=p20, time_ms_p80=p80, reps=reps)
    if paired:
        ratios = np.array(times["eager"]) / np.array(times[backend])
        res["speedup_vs_eager"] = float(np.median(ratios))
        res["eager_paired_ms_median"] = float(np.median(times["eager"]))
    return res


# ---------------------------------------------------------------------------------------------
# subprocesses, the C++ extension, output
# ---------------------------------------------------------------------------------------------
def run_case_process(script: Path, payload, timeout_s: float, threads: int) -> tuple[list[dict], str, str]:
    """Run `script --case JSON(payload)` in a fresh Python process (so that its peak memory is
    its own) with OMP_NUM_THREADS = threads. Returns (the result dicts it printed after
    RESULT_TAG, its stderr, how it ended: "" when it exited 0, else "exit status N", "signal N"
    or "timeout after N s"). A killed process still returns what it printed before dying."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(Path(script).resolve()), "--case", json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        how = "" if rc == 0 else (f"signal {-rc}" if rc < 0 else f"exit status {rc}")
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        how = f"timeout after {timeout_s:.0f} s"
    results = [
        json.loads(line[len(RESULT_TAG) :]) for line in stdout.splitlines() if line.startswith(RESULT_TAG)
    ]
    return results, stderr, how


def died(key: dict, stderr: str, how: str) -> dict:
    """The result of a case whose subprocess printed none: `key` plus an error naming why."""
    tail = " | ".join(stderr.strip().splitlines()[-3:])
    return dict(key, error=f"case subprocess died ({how or 'exit status 0'}): {tail}"[:600])


def stderr_tail(stderr: str, lines: int = 15) -> str:
    return "\n".join(stderr.strip().splitlines()[-lines:])


def error_message(exc: BaseException) -> str:
    """One line (at most 600 characters) for the CSV's `error` figure."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:600]


def build_cpp() -> tuple[bool, str, str | None]:
    """Build (or load from the cache) the C++ extension once, in the parent, so that no timed
    subprocess pays for the JIT build. Returns (ok, message, path of the built module)."""
    t0 = time.perf_counter()
    try:
        from fastalign.ops import _cpp

        mod = _cpp.load()
    except Exception as exc:
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())
        return False, msg[:1500], None
    path = getattr(mod, "__file__", None)
    return True, f"built / loaded in {time.perf_counter() - t0:.1f} s ({path})", path


def pin_cpp(path: str) -> None:
    """Child: use exactly the extension the parent built, even if csrc/ changed since (the cases
    of one run must measure one build, and never pay for a JIT build)."""
    import importlib.machinery
    import importlib.util

    from fastalign.ops import _cpp

    name = Path(path).name.split(".")[0]
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    _cpp.load = lambda: mod


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write_csv(
    path: Path, results: list[dict], machine_rows: list[tuple], device_name: str, commit: str
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for op, backend, mode, shape, dtype, metric, value in machine_rows:
            w.writerow((op, backend, mode, shape, dtype, metric, f"{value:.6g}", device_name, commit))
        for r in results:
            key = (r["op"], r["backend"], r["mode"], r["shape"], r["dtype"])
            if "error" in r:
                w.writerow((*key, "error", r["error"], device_name, commit))
                continue
            for m in CSV_METRICS:
                if m in r:
                    w.writerow((*key, m, f"{r[m]:.6g}", device_name, commit))


# ---------------------------------------------------------------------------------------------
# baselines and the gate (gate.py)
# ---------------------------------------------------------------------------------------------
def add_baseline_args(ap: argparse.ArgumentParser, suite_prefix: str, what: str) -> None:
    """--gate, --time-tol, --write-baseline, --inject-slowdown; `what` names the fused calls that
    --inject-slowdown repeats."""
    rel = BASELINES.relative_to(REPO)
    ap.add_argument(
        "--gate",
        nargs="?",
        const=str(BASELINES),
        default=None,
        metavar="BASELINE",
        help="after the run, gate it (gate.py) against BASELINE: a CSV, or a folder of per-CPU "
        f"baselines (default {rel}/<cpu slug>/{suite_prefix}_<quick|full>.csv)",
    )
    ap.add_argument("--time-tol", type=float, default=None, help="gate: speedup tolerance (default 0.3)")
    ap.add_argument(
        "--write-baseline",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help=f"write this run's CSV to PATH (default {rel}/<cpu slug>/{suite_prefix}_<quick|full>.csv)",
    )
    ap.add_argument(
        "--inject-slowdown",
        type=int,
        default=1,
        metavar="K",
        help=f"run {what} K times per timed call (eager once): a deliberate K-fold slowdown, "
        "to check that the gate fails on it",
    )


def check_baseline_args(args: argparse.Namespace) -> str | None:
    """An error message for a contradicting combination, else None."""
    if args.inject_slowdown < 1:
        return "--inject-slowdown takes an integer >= 1"
    if args.inject_slowdown != 1 and args.write_baseline is not None:
        return "--write-baseline with --inject-slowdown would record the slowdown"
    return None


def baseline_and_gate(
    args: argparse.Namespace,
    out: Path,
    device_name: str,
    suite: str,
    n_failed: int,
    keep_row: Callable[[list[str]], bool] | None = None,
) -> int:
    """--write-baseline (the CSV rows keep_row accepts; all by default), then --gate. Returns
    the gate's exit status (0 without --gate)."""
    sys.path.insert(0, str(HERE))
    import gate

    if args.write_baseline is not None:
        dest = Path(args.write_baseline or BASELINES / gate.cpu_slug(device_name) / f"{suite}.csv")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if keep_row is None:
            shutil.copyfile(out, dest)
        else:
            with open(out, newline="") as src, open(dest, "w", newline="") as dst:
                rows = csv.reader(src)
                w = csv.writer(dst)
                w.writerow(next(rows))
                w.writerows(r for r in rows if keep_row(r))
        print(
            f"baseline written: {dest}"
            + (f"  (WARNING: {n_failed} cases missing from it)" if n_failed else "")
        )
    if not args.gate:
        return 0
    gate_args = ["--baseline", args.gate, "--suite", suite, "--current", str(out)]
    if args.time_tol is not None:
        gate_args += ["--time-tol", str(args.time_tol)]
    print()
    return gate.main(gate_args)


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def unique(xs: Iterable) -> list:
    return list(dict.fromkeys(xs))
