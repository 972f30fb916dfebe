#!/usr/bin/env python
"""CI regression gate: compare a bench_ops.py run with a baseline CSV; exit 1 on a regression.

    python benchmarks/gate.py --baseline benchmarks/baseline_quick.csv --current run.csv

Gated (only figures that are stable on a noisy, shared machine):

  speedup_vs_eager    fused backends; a ratio of two timings from the same run.
                      FAIL if current < baseline * (1 - time_tol)            (time_tol 0.3)
  peak_mem_mb         fused backends (not eager: that is PyTorch's own memory).
                      FAIL if current > baseline * (1 + mem_tol) + mem_slack_mb   (0.10, 8 MB)
  mem_ratio_vs_eager  fused backends.
                      FAIL if current > baseline * (1 + mem_tol) + ratio_slack    (0.10, 0.02)

A figure of the baseline that the current run lacks (its case failed, e.g. the C++ extension
did not build, or the run used other shapes) is a FAIL, never a silent pass. Absolute times,
GB/s and GFLOP/s are not gated (they swing with machine load); they are in the CSV for humans.

Exit status: 0 all pass, 1 a regression or a missing figure, 2 unusable input.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

KEY = ("op", "backend", "mode", "shape", "dtype")
GATED = ("speedup_vs_eager", "peak_mem_mb", "mem_ratio_vs_eager")


def load(path: Path) -> tuple[dict, dict, set, set]:
    """-> (figures {(op, backend, mode, shape, dtype, metric): value}, errors {case key: message},
    devices, commits)."""
    figures, errors, devices, commits = {}, {}, set(), set()
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set((*KEY, "metric", "value")) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a bench_ops.py CSV (missing columns {sorted(missing)})")
        for row in reader:
            key = tuple(row[k] for k in KEY)
            devices.add(row.get("device", ""))
            commits.add(row.get("commit", ""))
            if row["metric"] == "error":
                errors[key] = row["value"]
                continue
            try:
                figures[(*key, row["metric"])] = float(row["value"])
            except ValueError:
                continue
    return figures, errors, devices, commits


def rule(metric: str, base: float, args) -> tuple[str, float, callable]:
    """-> (comparison sign, allowed bound, passes(current))."""
    if metric == "speedup_vs_eager":
        bound = base * (1.0 - args.time_tol)
        return ">=", bound, lambda cur: cur >= bound
    slack = args.mem_slack_mb if metric == "peak_mem_mb" else args.ratio_slack
    bound = base * (1.0 + args.mem_tol) + slack
    return "<=", bound, lambda cur: cur <= bound


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("--current", type=Path, required=True)
    ap.add_argument("--time-tol", type=float, default=0.3, help="allowed relative drop of speedup_vs_eager")
    ap.add_argument(
        "--mem-tol", type=float, default=0.10, help="allowed relative growth of peak memory / ratio"
    )
    ap.add_argument("--mem-slack-mb", type=float, default=8.0, help="absolute slack on peak_mem_mb")
    ap.add_argument("--ratio-slack", type=float, default=0.02, help="absolute slack on mem_ratio_vs_eager")
    ap.add_argument("--metrics", default=",".join(GATED), help=f"comma list, subset of {','.join(GATED)}")
    args = ap.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if set(metrics) - set(GATED):
        print(f"gate: unknown metric(s) {sorted(set(metrics) - set(GATED))}", file=sys.stderr)
        return 2

    try:
        base, base_err, base_dev, base_commit = load(args.baseline)
        cur, cur_err, cur_dev, cur_commit = load(args.current)
    except (OSError, ValueError) as exc:
        print(f"gate: {exc}", file=sys.stderr)
        return 2
    for name, path, commits, devices in (
        ("baseline", args.baseline, base_commit, base_dev),
        ("current ", args.current, cur_commit, cur_dev),
    ):
        print(f"gate: {name} {path} (commit {', '.join(sorted(commits))}; {', '.join(sorted(devices))})")
    if base_dev != cur_dev:
        print("gate: WARNING: different devices; ratios are comparable only roughly, memory should match.")
    print(
        f"gate: rules  speedup_vs_eager >= base*(1-{args.time_tol:g});  "
        f"peak_mem_mb <= base*(1+{args.mem_tol:g})+{args.mem_slack_mb:g} MB;  "
        f"mem_ratio_vs_eager <= base*(1+{args.mem_tol:g})+{args.ratio_slack:g}"
    )

    gated = sorted(k for k in base if k[5] in metrics and k[1] != "eager" and not math.isnan(base[k]))
    if not gated:
        print(f"gate: FAIL: the baseline {args.baseline} has no gated figures ({', '.join(metrics)})")
        return 1

    header = f"{'op':<16} {'backend':<7} {'mode':<8} {'shape':<22} {'dtype':<5} {'metric':<19}"
    print()
    print(f"{header} {'baseline':>9} {'current':>9} {'allowed':>10}  result")
    fails = 0
    for k in gated:
        op, backend, mode, shape, dtype, metric = k
        b = base[k]
        sign, bound, ok = rule(metric, b, args)
        line = f"{op:<16} {backend:<7} {mode:<8} {shape:<22} {dtype:<5} {metric:<19} {b:9.3f}"
        if k not in cur:
            fails += 1
            why = cur_err.get(k[:5], "no such figure in the current run")
            print(f"{line} {'-':>9} {sign + format(bound, '.3f'):>10}  FAIL (missing: {why[:300]})")
            continue
        c = cur[k]
        passed = ok(c) and not math.isnan(c)
        fails += not passed
        print(f"{line} {c:9.3f} {sign + format(bound, '.3f'):>10}  {'PASS' if passed else 'FAIL'}")

    base_cases = {k[:5] for k in base} | set(base_err)
    new = sorted({k[:5] for k in cur} - base_cases)
    if new:
        print(f"\ngate: {len(new)} case(s) not in the baseline (not gated), e.g. {new[0]}")
    for k, msg in sorted(base_err.items()):
        print(f"gate: WARNING: not gated, the baseline has no figures for {' '.join(k)}: {msg[:200]}")
    print()
    if fails:
        print(f"gate: FAIL -- {fails} of {len(gated)} gated figures regressed or are missing")
        return 1
    print(f"gate: PASS -- all {len(gated)} gated figures within bounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
