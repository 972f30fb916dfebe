"""PNG training curves from a run's metrics.jsonl (one figure per metric group).

Groups: "loss" (loss + nll), the rollout recipes' curves (PPO / GRPO / online DPO): "reward"
(reward/*: reward/mean with a ±reward/std band, reward/raw_mean with ±reward/raw_std, the other
reward/* lines), "kl" (kl, with kl_coef on a second y axis), entropy, response_length, eos_rate,
clipfrac, approx_kl, value_loss, explained_var; then "rewards" (rewards/*), "logps" (logps/*),
grad_norm, lr, tokens_per_s, peak_mem_mb, and every other numeric key grouped by its prefix before
"/" (a key without "/" is its own group). Absent metrics draw nothing (no empty figures). Train
series are lines; eval series are lines with markers. `plot_runs` overlays several runs per group
(e.g. fused vs unfused), one colour per run.

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
_BANDS = {"reward/mean": "reward/std", "reward/raw_mean": "reward/raw_std"}  # mean key -> its std key
_SECONDARY_AXIS = ("kl_coef",)  # a coefficient next to the quantity it controls, on its own scale
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


def _draw(ax, steps: list[int], values: list[float], split: str, **style):
    if split == "train":
        return ax.plot(steps, values, linewidth=1.2, **style)[0]
    return ax.plot(steps, values, marker="o", markersize=4, linewidth=1.0, alpha=0.9, **style)[0]


def _band(ax, mean: tuple[list[int], list[float]], std: tuple[list[int], list[float]], color) -> None:
    """Shade mean ± std over the steps where both were logged."""
    std_at = dict(zip(*std, strict=True))
    pts = [(x, m, std_at[x]) for x, m in zip(*mean, strict=True) if x in std_at]
    if pts:
        xs, ms, ss = zip(*pts, strict=True)
        lo = [m - s for m, s in zip(ms, ss, strict=True)]
        hi = [m + s for m, s in zip(ms, ss, strict=True)]
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)


def _draw_group(axes: dict, by_key: dict, label: str = "", style_of=lambda key: {}) -> None:
    """One run's series of a group: std keys as bands around their means, kl_coef on a twin axis
    (created once per figure in `axes["twin"]`)."""
    drawn_as_band = {std for mean, std in _BANDS.items() if mean in by_key}
    for key in [k for k in by_key if k not in drawn_as_band]:
        ax = axes["main"]
        if key in _SECONDARY_AXIS:
            if axes.get("twin") is None:
                axes["twin"] = axes["main"].twinx()
                axes["twin"].set_ylabel(key)
            ax = axes["twin"]
        std_key = _BANDS.get(key) if _BANDS.get(key) in by_key else None
        for split, series in sorted(by_key[key].items(), key=lambda kv: kv[0] != "train"):
            name = f"{label}{split}/{key}" + (f" ± {std_key}" if std_key and split in by_key[std_key] else "")
            line = _draw(ax, *series, split, label=name, **style_of(key))
            if std_key and split in by_key[std_key]:
                _band(ax, series, by_key[std_key][split], line.get_color())


def _legend(axes: dict) -> None:
    lines = axes["main"].get_lines() + (axes["twin"].get_lines() if axes.get("twin") is not None else [])
    axes["main"].legend(lines, [ln.get_label() for ln in lines], fontsize="small")


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
        axes = {"main": ax}
        _draw_group(axes, series[group])
        _legend(axes)
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
        axes = {"main": ax}
        keys = sorted({k for s in loaded for k in s.get(group, {})})
        for i, (name, series) in enumerate(zip(names, loaded, strict=True)):
            by_key = {k: series[group][k] for k in keys if k in series.get(group, {})}
            style = lambda key, i=i, keys=keys: {
                "color": f"C{i % 10}",
                "linestyle": _LINESTYLES[keys.index(key) % len(_LINESTYLES)],
            }
            _draw_group(axes, by_key, f"{name} ", style)
        _legend(axes)
        written.append(_save(fig, Path(out_dir) / _filename(group)))
    return written
