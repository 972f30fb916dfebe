"""PNG training curves from a run's metrics.jsonl (one figure per metric group).

Groups: "loss" (loss + nll), "rewards" (rewards/*), "logps" (logps/*), then grad_norm, lr,
tokens_per_s, peak_mem_mb, and every other numeric key grouped by its prefix before "/" (a key
without "/" is its own group). Train series are lines; eval series are lines with markers.
`plot_runs` overlays several runs per group (e.g. fused vs unfused), one colour per run.

matplotlib is imported inside the functions (the CLI imports this module at startup) and used
through `matplotlib.figure.Figure`, which renders with Agg and touches no global pyplot state.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from fastalign.trainers.metrics import METRICS_FILE, read_metrics

_FIXED_GROUPS = {"loss": "loss", "nll": "loss", "grad_norm": "grad_norm", "lr": "lr"}
_FIXED_GROUPS.update(tokens_per_s="tokens_per_s", peak_mem_mb="peak_mem_mb")
_GROUP_ORDER = ("loss", "rewards", "logps", "grad_norm", "lr", "tokens_per_s", "peak_mem_mb")
_NOT_METRICS = ("step", "split", "time")
_LINESTYLES = ("-", "--", ":", "-.")

# (group -> key -> split -> (steps, values)); a None value (non-finite when logged) leaves a gap
Series = dict[str, dict[str, dict[str, tuple[list[int], list[float]]]]]


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


def _ordered(groups: set[str]) -> list[str]:
    return [g for g in _GROUP_ORDER if g in groups] + sorted(groups - set(_GROUP_ORDER))


def _filename(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", group) + ".png"


def _draw(ax, steps: list[int], values: list[float], split: str, **style) -> None:
    if split == "train":
        ax.plot(steps, values, linewidth=1.2, **style)
    else:
        ax.plot(steps, values, marker="o", markersize=4, linewidth=1.0, alpha=0.9, **style)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


def _figure(group: str, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(group)
    ax.grid(True, alpha=0.3)
    if group == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig, ax


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """One PNG per metric group of `run_dir`, into `out_dir` (default run_dir/plots/).
    Returns the written paths in group order."""
    series = _load(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    written = []
    for group in _ordered(set(series)):
        fig, ax = _figure(group, f"{Path(run_dir).name}: {group}")
        for key, by_split in series[group].items():
            for split, (steps, values) in sorted(by_split.items(), key=lambda kv: kv[0] != "train"):
                _draw(ax, steps, values, split, label=f"{split}/{key}")
        ax.legend(fontsize="small")
        written.append(_save(fig, out / _filename(group)))
    return written


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Overlay several runs, one PNG per metric group found in any of them, into `out_dir`.
    Each run has one colour (labelled by its directory name), each metric one line style."""
    if not run_dirs:
        raise ValueError("plot_runs: no run directories given")
    runs = [Path(d) for d in run_dirs]
    names = [d.name for d in runs]
    if len(set(names)) < len(names):  # same leaf name (e.g. a/run, b/run): use the full paths
        names = [str(d) for d in runs]
    loaded = [_load(d) for d in runs]
    written = []
    for group in _ordered(set().union(*loaded)):
        fig, ax = _figure(group, f"{group}: {' vs '.join(names)}")
        keys = sorted({k for s in loaded for k in s.get(group, {})})
        for i, (name, series) in enumerate(zip(names, loaded, strict=True)):
            for j, key in enumerate(keys):
                for split, (steps, values) in series.get(group, {}).get(key, {}).items():
                    style = {"color": f"C{i % 10}", "linestyle": _LINESTYLES[j % len(_LINESTYLES)]}
                    _draw(ax, steps, values, split, label=f"{name} {split}/{key}", **style)
        ax.legend(fontsize="small")
        written.append(_save(fig, Path(out_dir) / _filename(group)))
    return written
