"""PNG training curves from a run's metrics.jsonl (one figure per metric group).

Groups: "loss" (loss + nll), the rollout recipes' curves (PPO / GRPO / online DPO): "reward"
(reward/*: reward/mean with a ±reward/std band, reward/raw_mean with ±reward/raw_std, the other
reward/* lines), "kl" (kl and kl_coef), entropy, response_length, eos_rate, clipfrac, approx_kl,
value_loss, explained_var; then "rewards" (rewards/*), "logps" (logps/*), grad_norm, lr,
tokens_per_s, peak_mem_mb, and every other numeric key grouped by its prefix before "/" (a key
without "/" is its own group), e.g. "watch" (watch/warnings). Absent metrics draw nothing (no empty
figures). Train series are lines; eval series are lines with markers. `plot_runs` overlays
several runs per group (e.g. fused vs unfused, or one run per loss type).

What makes the figures readable rather than merely correct:
- Scales that differ are never on one axis. A fraction (`rewards/accuracies`,
  `reward/clipped_frac`, ...: 0–1) drawn beside other keys gets its own panel under them (rewards
  run to ±12). kl_coef (a coefficient ~0.05 next to a KL of tens of nats) is on a twin axis in a
  single-run figure, in its own colour, each y axis labelled and ticked in its line's colour; in
  an overlay, where colour means the run, it gets its own panel instead.
- When the series of a panel differ by two orders of magnitude or more (IPO's losses in the
  hundreds to thousands next to SimPO's ~1) the panel's y axis is logarithmic (symlog when a value
  is ≤ 0, e.g. PPO's loss), and its label says so. Log rather than per-run normalisation: the axis
  keeps the real values (a user reading "IPO eval loss 823" finds 823), and equal relative
  progress looks the same at any level, which is what comparing loss curves across methods asks.
- Legends sit outside the axes, to the right, so they never cover data. An overlay's legend
  names each run once (its colour) and each series of a multi-series panel once (its line
  style), instead of one entry per run × series.
- `watch.png` marks every reward-hacking warning (read from the run's `warnings.log`) with a
  vertical line at its step labelled with the warning's kind (length drift, KL over threshold,
  reward up while KL grows).

matplotlib is imported inside the functions (the CLI imports this module at startup) and used
through `matplotlib.figure.Figure`, which renders with Agg and touches no global pyplot state.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path

from fastalign.plot_figures import WARNINGS_FILE, Series, WatchWarning
from fastalign.plot_figures import Run as _Run
from fastalign.plot_figures import render as _render
from fastalign.plot_figures import save as _save
from fastalign.trainers.metrics import METRICS_FILE, read_metrics

_FIXED_GROUPS = {"loss": "loss", "nll": "loss", "grad_norm": "grad_norm", "lr": "lr"}
_FIXED_GROUPS.update(tokens_per_s="tokens_per_s", peak_mem_mb="peak_mem_mb")
_FIXED_GROUPS.update(
    {
        "kl_coef": "kl",
        "response/length": "response_length",
        "response/eos_rate": "eos_rate",
        "policy/clipfrac": "clipfrac",
        "policy/approx_kl": "approx_kl",
        "value/loss": "value_loss",
        "value/explained_var": "explained_var",
    }
)
_ROLLOUT_GROUPS = ("reward", "kl", "entropy", "response_length", "eos_rate", "clipfrac", "approx_kl")
_ROLLOUT_GROUPS += ("value_loss", "explained_var")
_GROUP_ORDER = (
    "loss",
    *_ROLLOUT_GROUPS,
    "rewards",
    "logps",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "peak_mem_mb",
)
_NOT_METRICS = ("step", "split", "time")
# The watch's warning lines start with these phrases (fastalign/rollout/watch.py); a line that
# names its kind itself (`[watch:KIND] step N: ...`) is taken at its word.
_WATCH_KINDS = (
    ("mean response length", "length drift"),
    ("KL to the reference", "KL over threshold"),
    ("reward rose", "reward up while KL grows"),
)
_WATCH_LINE = re.compile(r"^\[watch(?::(?P<kind>[\w-]+))?\] step (?P<step>\d+): (?P<msg>.*)$")


def metric_group(key: str) -> str:
    """The figure a metric is drawn in: see the module docstring."""
    if key in _FIXED_GROUPS:
        return _FIXED_GROUPS[key]
    return key.split("/", 1)[0]


def _load(run_dir: str | Path) -> Series:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run directory not found: {run_dir}")
    if not (run_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"No {METRICS_FILE} in {run_dir} (has the run logged anything yet?)")
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir / METRICS_FILE} is empty: nothing to plot")
    series: Series = {}
    for r in records:
        split = str(r.get("split", "train"))
        for key, value in r.items():
            if key in _NOT_METRICS or isinstance(value, bool):
                continue
            if value is not None and not isinstance(value, (int, float)):
                continue  # not a numeric metric
            steps, values = (
                series.setdefault(metric_group(key), {}).setdefault(key, {}).setdefault(split, ([], []))
            )
            steps.append(r["step"])
            values.append(math.nan if value is None else float(value))
    # drop series that are all gaps
    for group in list(series):
        for key in list(series[group]):
            for split in list(series[group][key]):
                if all(math.isnan(v) for v in series[group][key][split][1]):
                    del series[group][key][split]
            if not series[group][key]:
                del series[group][key]
        if not series[group]:
            del series[group]
    if not series:
        raise ValueError(f"{run_dir / METRICS_FILE} has no numeric metrics to plot")
    return series


def read_watch_warnings(run_dir: str | Path) -> list[WatchWarning] | None:
    """The warnings of run_dir/warnings.log in step order, None when the run has no such file.

    A warning repeated at the same step (a resumed run replays the steps after its checkpoint and
    appends their warnings again) is kept once; lines that are not watch warnings are skipped."""
    path = Path(run_dir) / WARNINGS_FILE
    if not path.is_file():
        return None
    found: dict[tuple[int, str], WatchWarning] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _WATCH_LINE.match(line.strip())
        if m is None:
            continue
        msg = m.group("msg")
        kind = m.group("kind") or next((k for start, k in _WATCH_KINDS if msg.startswith(start)), None)
        if kind is None:  # an unknown warning: its first words say what it is
            kind = " ".join(msg.split()[:3])
        step = int(m.group("step"))
        found[(step, kind)] = WatchWarning(step, kind, msg)
    return sorted(found.values(), key=lambda w: (w.step, w.kind))


def _ordered(groups: set[str]) -> list[str]:
    return [g for g in _GROUP_ORDER if g in groups] + sorted(groups - set(_GROUP_ORDER))


def _filename(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", group) + ".png"


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """One PNG per metric group of `run_dir`, into `out_dir` (default run_dir/plots/).
    Returns the written paths in group order."""
    series = _load(run_dir)
    warnings = read_watch_warnings(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    name = Path(run_dir).resolve().name
    written = []
    for group in _ordered(set(series)):
        fig = _render(group, [_Run(name, series[group], warnings)], f"{name}: {group}", overlay=False)
        written.append(_save(fig, out / _filename(group)))
    return written


def _run_names(runs: Sequence[Path]) -> list[str]:
    """Each run's folder name; when two share it (a/run, b/run), the fewest trailing path parts
    that tell them apart ("a/run", "b/run"), not whole absolute paths that crowd the legend."""
    parts = [d.resolve().parts for d in runs]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in runs]  # the same folder given twice


def overlay_dir(run_dirs: Sequence[str | Path]) -> Path:
    """Where `plot_runs` writes without an `out_dir`: plots/<run>_vs_<run>... under the current
    folder, one folder per comparison so that a second comparison never mixes its PNGs with the
    first's (long names are cut and made unique with a hash)."""
    names = [
        re.sub(r"[^A-Za-z0-9_.-]+", "_", n).strip("_.") or "run"
        for n in _run_names(list(map(Path, run_dirs)))
    ]
    leaf = "_vs_".join(names)
    if len(leaf) > 80:
        digest = hashlib.sha1("\0".join(str(Path(d).resolve()) for d in run_dirs).encode()).hexdigest()[:8]
        leaf = (
            f"{leaf[:60]}_and_{len(names) - 1}_more_{digest}" if len(names) > 1 else f"{leaf[:70]}_{digest}"
        )
    return Path("plots") / leaf


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Overlay several runs, one PNG per metric group found in any of them, into `out_dir`
    (default `overlay_dir(run_dirs)`). Each run has one colour (labelled by its directory name),
    each metric one line style. All runs are read before anything is written."""
    if not run_dirs:
        raise ValueError("plot_runs: no run directories given")
    runs = [Path(d) for d in run_dirs]
    names = _run_names(runs)
    loaded = [_load(d) for d in runs]
    warnings = [read_watch_warnings(d) for d in runs]
    out = Path(out_dir) if out_dir is not None else overlay_dir(runs)
    written = []
    for group in _ordered(set().union(*loaded)):
        members = [
            _Run(name, series[group], w, f"C{i % 10}")
            for i, (name, series, w) in enumerate(zip(names, loaded, warnings, strict=True))
            if group in series
        ]
        title = f"{group}: {' vs '.join(names)}"
        if len(title) > 70:  # the legend names the runs
            title = f"{group}: {len(names)} runs"
        written.append(_save(_render(group, members, title, overlay=True), out / _filename(group)))
    return written


def plot(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """`fastalign plot RUN_DIR...`: one run → `plot_run` (default RUN_DIR/plots), several →
    `plot_runs` (default `overlay_dir`). Returns the written paths."""
    if len(run_dirs) == 1:
        return plot_run(run_dirs[0], out_dir)
    return plot_runs(run_dirs, out_dir)


def describe_written(paths: Sequence[Path]) -> str:
    """What `fastalign plot` prints: the absolute folder(s) the PNGs went to, then each file."""
    folders: dict[Path, list[str]] = {}
    for p in paths:
        folders.setdefault(Path(p).resolve().parent, []).append(Path(p).name)
    if not folders:
        return "no plots written (no numeric metrics)"
    lines = []
    for folder, files in folders.items():
        lines.append(f"wrote {len(files)} plot{'s' if len(files) != 1 else ''} to {folder}/:")
        lines.extend(f"  {f}" for f in files)
    return "\n".join(lines)
