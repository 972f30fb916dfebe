#!/usr/bin/env python
"""CI regression gate: compare a benchmark run (bench_ops.py / bench_losses.py CSV) with a
baseline; exit 1 on a regression.

    python benchmarks/gate.py --current run.csv                              # per-CPU baselines
    python benchmarks/gate.py --current run.csv --suite losses_quick
    python benchmarks/gate.py --current run.csv --baseline some/baseline.csv  # one explicit file

Baselines are per CPU model: `benchmarks/baselines/<cpu-slug>/<suite>.csv`, where the slug is
the `device` column of the CSV (the CPU model name from /proc/cpuinfo) in lower case with
"(R)", "(TM)", the clock frequency and punctuation dropped (`cpu_slug`). Speed-ups depend on the
CPU (its vector units, caches and the BLAS kernels PyTorch picks for it), so a speed-up is
gated against figures of the same CPU model. Gated figures, fused backends only:

  own CPU has a baseline (the normal case):
    speedup_vs_eager    FAIL if current < base * (1 - time_tol)                  (0.3)
    peak_mem_mb         FAIL if current > base * (1 + mem_tol) + mem_slack_mb     (0.10, 8 MB)
    mem_ratio_vs_eager  FAIL if current > base * (1 + mem_tol) + ratio_slack      (0.10, 0.02)

  CPU model without a baseline (looser, derived from every CPU that has one):
    speedup_vs_eager    FAIL if current < min over CPUs(base) * (1 - cross_time_tol)   (0.5)
    peak_mem_mb         FAIL if current > max over CPUs(base) * (1 + mem_tol) + mem_slack_mb
    mem_ratio_vs_eager  FAIL if current > max over CPUs(base) * (1 + mem_tol) + ratio_slack

Peak memory is nearly the same on every CPU (the fused ops allocate the same tiles
everywhere; only the BLAS library's scratch differs by a few MB), so it is gated hard
everywhere. cross_time_tol = 0.5 comes from measuring two CPU kinds (benchmarks/README.md,
"The gate"): the widest gap between them was 0.55x (token_logprobs cpp fwd, 6.8x eager on the
Intel Xeon under load 6 against 12.5x on the AMD EPYC). That floor only catches gross
regressions: a 2x slowdown fails it only on a CPU slower than every known one. Record a
baseline for the CPU (`--write-baseline`) to get the 30% bound, under which a 2x slowdown fails.

A figure of the baseline that the current run lacks (its case failed, e.g. the C++ extension
did not build, or the run used other shapes) is a FAIL, never a silent pass. Absolute times,
GB/s and GFLOP/s are not gated (they swing with machine load); they are in the CSV for humans.

Exit status: 0 all pass, 1 a regression or a missing figure, 2 unusable input.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_BASELINES = HERE / "baselines"
KEY = ("op", "backend", "mode", "shape", "dtype")
GATED = ("speedup_vs_eager", "peak_mem_mb", "mem_ratio_vs_eager")
TIME_TOL = 0.3
CROSS_TIME_TOL = 0.5


def cpu_slug(device: str) -> str:
    """Folder name of a device's baselines: 'Intel(R) Xeon(R) Platinum 8480+ @ 2.0GHz' ->
    'intel-xeon-platinum-8480'."""
    name = re.sub(r"\((r|tm|c)\)", " ", device, flags=re.IGNORECASE)
    name = re.sub(r"@.*$", " ", name)  # the clock frequency: same model, same speed-ups
    name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return name or "unknown-cpu"


@dataclass
class Run:
    """One benchmark CSV: figures {(op, backend, mode, shape, dtype, metric): value}, errors
    {case key: message}, the devices and commits it names."""

    path: Path
    figures: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    devices: set = field(default_factory=set)
    commits: set = field(default_factory=set)

    @property
    def device(self) -> str:
        return ", ".join(sorted(self.devices))


def load(path: Path) -> Run:
    run = Run(Path(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set((*KEY, "metric", "value")) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a benchmark CSV (missing columns {sorted(missing)})")
        for row in reader:
            key = tuple(row[k] for k in KEY)
            run.devices.add(row.get("device", ""))
            run.commits.add(row.get("commit", ""))
            if row["metric"] == "error":
                run.errors[key] = row["value"]
                continue
            try:
                run.figures[(*key, row["metric"])] = float(row["value"])
            except ValueError:
                continue
    return run


def find_baselines(root: Path, suite: str) -> dict[str, Path]:
    """{cpu slug: path} of every `<root>/<slug>/<suite>.csv`."""
    return {p.parent.name: p for p in sorted(Path(root).glob(f"*/{suite}.csv"))}


@dataclass
class Rule:
    """How one figure is gated: the reference value(s) it is compared with and the bound."""

    sign: str
    bound: float
    base: float  # the baseline value shown (own CPU's, or min / max over CPUs)

    def passes(self, current: float) -> bool:
        if math.isnan(current):
            return False
        return current >= self.bound if self.sign == ">=" else current <= self.bound


def make_rule(metric: str, values: list[float], own: bool, args) -> Rule:
    """values: the figure in the own CPU's baseline ([v]) or in every CPU's baseline that has it."""
    if metric == "speedup_vs_eager":
        base = min(values)
        tol = args.time_tol if own else args.cross_time_tol
        return Rule(">=", base * (1.0 - tol), base)
    base = max(values)
    slack = args.mem_slack_mb if metric == "peak_mem_mb" else args.ratio_slack
    return Rule("<=", base * (1.0 + args.mem_tol) + slack, base)


def gate(current: Run, baselines: list[Run], own: bool, metrics: list[str], args) -> tuple[int, int]:
    """Print the comparison; return (failed figures, gated figures)."""
    values: dict[tuple, list[float]] = {}
    errors: dict[tuple, str] = {}
    for b in baselines:
        for k, v in b.figures.items():
            if k[5] in metrics and k[1] != "eager" and not math.isnan(v):
                values.setdefault(k, []).append(v)
        errors.update(b.errors)
    if not values:
        return 0, 0
    header = f"{'op':<16} {'backend':<9} {'mode':<8} {'shape':<22} {'dtype':<5} {'metric':<19}"
    print()
    print(f"{header} {'baseline':>9} {'current':>9} {'allowed':>10}  result")
    fails = 0
    for k in sorted(values):
        op, backend, mode, shape, dtype, metric = k
        rule = make_rule(metric, values[k], own, args)
        line = f"{op:<16} {backend:<9} {mode:<8} {shape:<22} {dtype:<5} {metric:<19} {rule.base:9.3f}"
        allowed = f"{rule.sign}{rule.bound:.3f}"
        if k not in current.figures:
            fails += 1
            why = current.errors.get(k[:5], "no such figure in the current run")
            print(f"{line} {'-':>9} {allowed:>10}  FAIL (missing: {why[:300]})")
            continue
        c = current.figures[k]
        ok = rule.passes(c)
        fails += not ok
        print(f"{line} {c:9.3f} {allowed:>10}  {'PASS' if ok else 'FAIL'}")
    base_cases = {k[:5] for b in baselines for k in b.figures} | set(errors)
    new = sorted({k[:5] for k in current.figures} - base_cases)
    if new:
        print(f"\ngate: {len(new)} case(s) not in the baseline (not gated), e.g. {' '.join(new[0])}")
    for k, msg in sorted(errors.items()):
        if not any(k == v[:5] for v in values):
            print(f"gate: WARNING: not gated, the baseline has no figures for {' '.join(k)}: {msg[:200]}")
    return fails, len(values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--current", type=Path, required=True, help="CSV of the run to check")
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="one baseline CSV (own-CPU rules whatever its device), or a folder of per-CPU baselines "
        f"(default {DEFAULT_BASELINES})",
    )
    ap.add_argument(
        "--suite", default="ops_quick", help="baseline file name in each CPU's folder, without .csv"
    )
    ap.add_argument(
        "--time-tol", type=float, default=TIME_TOL, help="allowed relative drop of speedup_vs_eager"
    )
    ap.add_argument(
        "--cross-time-tol",
        type=float,
        default=CROSS_TIME_TOL,
        help="the same for a CPU without a baseline, below the slowest CPU that has one",
    )
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
        current = load(args.current)
    except (OSError, ValueError) as exc:
        print(f"gate: {exc}", file=sys.stderr)
        return 2
    if len(current.devices) != 1:
        print(f"gate: {args.current} names {len(current.devices)} devices; one expected", file=sys.stderr)
        return 2
    print(f"gate: current  {args.current} (commit {', '.join(sorted(current.commits))}; {current.device})")

    root = args.baseline if args.baseline is not None else DEFAULT_BASELINES
    try:
        if root.is_dir():
            found = find_baselines(root, args.suite)
            slug = cpu_slug(current.device)
            if not found:
                print(f"gate: FAIL: no baselines {root}/*/{args.suite}.csv")
                return 1
            own = slug in found
            paths = [found[slug]] if own else list(found.values())
        else:
            own, paths = True, [root]
        baselines = [load(p) for p in paths]
    except (OSError, ValueError) as exc:
        print(f"gate: {exc}", file=sys.stderr)
        return 2
    for b in baselines:
        print(f"gate: baseline {b.path} (commit {', '.join(sorted(b.commits))}; {b.device})")
    if own and root.is_dir():
        print(f"gate: this CPU ({current.device}) has its own baseline: speed-ups within {args.time_tol:.0%}")
    elif own:
        if {b.device for b in baselines} != {current.device}:
            print(
                "gate: WARNING: an explicit baseline from another device; its speed-ups may not hold "
                "here (the per-CPU folder applies the cross-CPU rule instead)"
            )
    else:
        print(
            f"gate: no baseline for this CPU ({current.device}; folder {root}/{cpu_slug(current.device)}/): "
            f"speed-ups are gated only at {1 - args.cross_time_tol:.2f} x the slowest of the "
            f"{len(baselines)} CPU model(s) that have one (gross regressions), memory at the largest. "
            "Record a baseline for this CPU (--write-baseline) for the 30% bound."
        )
    tol = args.time_tol if own else args.cross_time_tol
    print(
        f"gate: rules  speedup_vs_eager >= base*(1-{tol:g});  "
        f"peak_mem_mb <= base*(1+{args.mem_tol:g})+{args.mem_slack_mb:g} MB;  "
        f"mem_ratio_vs_eager <= base*(1+{args.mem_tol:g})+{args.ratio_slack:g}"
        + ("" if own else "   (base: min over CPUs for speed-ups, max for memory)")
    )

    fails, total = gate(current, baselines, own, metrics, args)
    if total == 0:
        print(f"gate: FAIL: the baseline has no gated figures ({', '.join(metrics)})")
        return 1
    print()
    if fails:
        print(f"gate: FAIL -- {fails} of {total} gated figures regressed or are missing")
        return 1
    print(f"gate: PASS -- all {total} gated figures within bounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
