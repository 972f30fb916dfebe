"""The figures of `fastalign plot` (see fastalign/plot.py for what they show and why): panels,
scales, legends and warning marks, drawn with `matplotlib.figure.Figure` (Agg; no global pyplot
state). Split from plot.py, which reads the runs and decides what goes in which figure."""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

_BANDS = {"reward/mean": "reward/std", "reward/raw_mean": "reward/raw_std"}  # mean key -> its std key
_SECONDARY_AXIS = ("kl_coef",)  # a coefficient next to the quantity it controls, on its own scale
# 0–1 quantities that get their own panel when their group also holds unbounded ones
_FRACTION = re.compile(r"(accuracy|accuracies|_frac|clipfrac|_rate)$")
_LINESTYLES = ("-", "--", ":", "-.")
_LOG_SPREAD = 100.0  # series medians this many times apart: log scale (see the module docstring)
WARNINGS_FILE = "warnings.log"  # written beside metrics.jsonl by the online recipes' watch
_WATCH_COLOURS = {"length drift": "tab:orange", "KL over threshold": "tab:red"}
_WATCH_COLOURS["reward up while KL grows"] = "tab:purple"

# (group -> key -> split -> (steps, values)); a None value (non-finite when logged) leaves a gap
Series = dict[str, dict[str, dict[str, tuple[list[int], list[float]]]]]


@dataclass(frozen=True)
class WatchWarning:
    """One reward-hacking warning of a run's warnings.log."""

    step: int
    kind: str
    message: str


def _draw(ax, steps: list[int], values: list[float], split: str, **style):
    if split != "train":
        return ax.plot(steps, values, marker="o", markersize=4, linewidth=1.0, alpha=0.9, **style)[0]
    line = ax.plot(steps, values, linewidth=1.4, **style)[0]
    # a finite value between gaps (NaN steps) or alone has no segment to draw: give it a dot
    finite = [math.isfinite(v) for v in values]
    alone = [
        i for i, ok in enumerate(finite)
        if ok and not (i > 0 and finite[i - 1]) and not (i + 1 < len(finite) and finite[i + 1])
    ]  # fmt: skip
    if alone:
        ax.plot([steps[i] for i in alone], [values[i] for i in alone], linestyle="none", marker="o",
                markersize=3, color=line.get_color(), label="_nolegend_")  # fmt: skip
    return line


def _band(ax, mean: tuple[list[int], list[float]], std: tuple[list[int], list[float]], color) -> None:
    """Shade mean ± std over the steps where both were logged."""
    std_at = dict(zip(*std, strict=True))
    pts = [(x, m, std_at[x]) for x, m in zip(*mean, strict=True) if x in std_at]
    if pts:
        xs, ms, ss = zip(*pts, strict=True)
        lo = [m - s for m, s in zip(ms, ss, strict=True)]
        hi = [m + s for m, s in zip(ms, ss, strict=True)]
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)


def _splits(by_split: dict) -> list[tuple[str, tuple[list[int], list[float]]]]:
    return sorted(by_split.items(), key=lambda kv: (kv[0] != "train", kv[0]))


@dataclass
class _Panels:
    """How a group's keys are laid out: `main` keys on the top axes, `fractions` (0–1) on a panel
    below, `secondary` (kl_coef) on a twin axis (single run) or a panel of its own (overlay);
    std keys drawn as bands are in none of them."""

    main: list[str]
    fractions: list[str]
    secondary: list[str]


def _panels(keys: list[str], overlay: bool) -> _Panels:
    banded = {std for mean, std in _BANDS.items() if mean in keys}
    keys = [k for k in keys if k not in banded]
    secondary = [k for k in keys if k in _SECONDARY_AXIS]
    rest = [k for k in keys if k not in secondary]
    fractions = [k for k in rest if _FRACTION.search(k)]
    main = [k for k in rest if k not in fractions]
    if not main:  # only fractions (e.g. eos_rate): they are the main panel
        main, fractions = fractions, []
    if not main:  # only kl_coef logged
        main, secondary = secondary, []
    return _Panels(main, fractions, secondary)


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _choose_scale(ax, series: list[list[float]], label: str) -> str:
    """Linear, or log / symlog when the panel's series are ≥ _LOG_SPREAD apart (their median
    magnitudes); returns the scale name and writes it into the y label."""
    typical = [statistics.median(abs(v) for v in vals) for vals in map(_finite, series) if vals]
    typical = [t for t in typical if t > 0]
    scale = "linear"
    if len(typical) >= 2 and max(typical) / min(typical) >= _LOG_SPREAD:
        positive = all(v > 0 for vals in series for v in _finite(vals))
        if positive:
            scale = "log"
            ax.set_yscale("log")
        else:  # a zero or negative value: linear within ± the smallest series' typical size
            scale = "symlog"  # (rounded down to a power of ten, so the axis ticks stay round)
            ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(min(typical))))
        label = f"{label} ({scale} scale)"
    ax.set_ylabel(label)
    return scale


def _figure(n_panels: int, fractions: bool, legend_chars: int):
    """A figure with `n_panels` stacked axes sharing the step axis (the fraction panel, when there
    is one, is last and shorter), wide enough for a legend of `legend_chars` characters outside."""
    from matplotlib.figure import Figure

    legend_width = min(4.5, 0.075 * legend_chars + 0.8)
    heights = [3.0] + [1.6] * (n_panels - 1)
    if fractions and n_panels > 1:
        heights[-1] = 1.3
    fig = Figure(figsize=(7.0 + legend_width, 1.0 + sum(heights)), layout="constrained")
    axes = fig.subplots(n_panels, 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    return fig, list(axes)


def _colour_axis(ax, colour: str, side: str = "left") -> None:
    ax.yaxis.label.set_color(colour)
    ax.tick_params(axis="y", colors=colour)
    ax.spines[side].set_color(colour)


@dataclass
class Run:
    name: str
    by_key: dict[str, dict[str, tuple[list[int], list[float]]]]  # this run's keys of the group
    warnings: list[WatchWarning] | None
    colour: str = "C0"  # an overlay's run colour, the same in every figure of the comparison


def render(group: str, runs: list[Run], title: str, overlay: bool):
    """One figure of `group` for one run (`overlay=False`) or several."""
    from matplotlib.lines import Line2D

    keys = sorted({k for r in runs for k in r.by_key}, key=lambda k: (k in _SECONDARY_AXIS, k))
    layout = _panels(keys, overlay)
    # colour: per key for one run (train and eval of a key share it), per run in an overlay
    key_colour = {k: f"C{i % 10}" for i, k in enumerate(layout.main + layout.fractions + layout.secondary)}
    run_colour = {r.name: r.colour for r in runs}
    rows = [("main", layout.main)]
    if layout.fractions:
        rows.append(("fractions", layout.fractions))
    if overlay and layout.secondary:
        rows.insert(1, ("secondary", layout.secondary))
    labels_guess = [f"{r.name} " for r in runs] + [f"eval/{k} ± x" for k in keys]
    fig, axes = _figure(len(rows), bool(layout.fractions), max(map(len, labels_guess)))
    axes[0].set_title(title)  # over the axes, so it never runs under the legend at the right
    axis_of = {name: ax for (name, _), ax in zip(rows, axes, strict=True)}
    if not overlay and layout.secondary:
        axis_of["secondary"] = axes[0].twinx()
        rows.insert(1, ("secondary", layout.secondary))
    handles, values_on = [], {name: [] for name, _ in rows}
    for name, panel_keys in rows:
        ax = axis_of[name]
        for key in panel_keys:
            std_key = _BANDS.get(key)
            for run in runs:
                if key not in run.by_key:
                    continue
                if overlay:
                    colour = run_colour[run.name]
                    style = _LINESTYLES[panel_keys.index(key) % len(_LINESTYLES)]
                else:  # a twin axis's line is dashed too: two rising curves often coincide
                    colour, style = key_colour[key], "--" if name == "secondary" else "-"
                for split, (steps, values) in _splits(run.by_key[key]):
                    banded = std_key in run.by_key and split in run.by_key[std_key]
                    label = f"{split}/{key}" + (f" ± {std_key}" if banded else "")
                    if overlay:
                        label = f"{run.name} {label}"
                    line = _draw(ax, steps, values, split, color=colour, linestyle=style, label=label)
                    values_on[name].append(values)
                    if banded:
                        _band(ax, (steps, values), run.by_key[std_key][split], colour)
                    if not overlay:
                        handles.append(line)
        ylabel = group if name == "main" else ", ".join(panel_keys)
        if name == "main" and len(panel_keys) == 1 and panel_keys[0] != group:
            ylabel = panel_keys[0]
        _choose_scale(ax, values_on[name], ylabel)
        if name == "fractions":
            ax.set_ylim(-0.03, 1.03)
        if not overlay and len(panel_keys) == 1:  # one line family per axis: the axis takes its colour
            _colour_axis(ax, key_colour[panel_keys[0]], "right" if name == "secondary" else "left")
        if group == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if group == "watch":
        top = max((v for vals in values_on["main"] for v in _finite(vals)), default=1.0)
        axes[0].set_ylim(0, max(1.0, top) * 1.9)  # head room above the spikes for the labels
        axes[0].yaxis.get_major_locator().set_params(integer=True)  # a count of warnings
        _mark_warnings(axes[0], runs, overlay)
    if overlay:  # runs by colour, series by line style: runs + series entries, not their product
        handles = [Line2D([], [], color=run_colour[r.name], linewidth=2, label=r.name) for r in runs]
        for _name, panel_keys in rows:
            if len(panel_keys) < 2:
                continue  # a panel of one key: its y label names it, every line of it is solid
            for key in panel_keys:
                style = _LINESTYLES[panel_keys.index(key) % len(_LINESTYLES)]
                std = _BANDS.get(key)
                label = f"{key} ± {std}" if any(std in r.by_key for r in runs) else key
                handles.append(Line2D([], [], color="0.25", linestyle=style, label=label))
        if any(split != "train" for r in runs for by_split in r.by_key.values() for split in by_split):
            handles.append(Line2D([], [], color="0.25", marker="o", markersize=4, label="eval (markers)"))
    if group == "watch":
        handles += _warning_handles(runs)
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    return fig


def _mark_warnings(ax, runs: list[Run], overlay: bool) -> None:
    """A vertical line at each step where a warning fired, labelled with its kind (in an overlay
    followed by the runs it fired in, so runs warning at the same step share one label), in the
    kind's colour (black for several kinds at one step); a note when a run has no warnings.log."""
    at_step: dict[int, dict[str, list[str]]] = {}
    for run in runs:
        for w in run.warnings or []:
            at_step.setdefault(w.step, {}).setdefault(w.kind, []).append(run.name)
    for step, kinds in sorted(at_step.items()):
        colour = _WATCH_COLOURS.get(next(iter(kinds)), "tab:brown") if len(kinds) == 1 else "black"
        text = " + ".join(
            f"{kind} ({', '.join(names)})" if overlay else kind for kind, names in kinds.items()
        )
        ax.axvline(step, color=colour, linestyle=":", linewidth=1.2, alpha=0.8)
        ax.annotate(text, xy=(step, 0.98), xycoords=("data", "axes fraction"),
                    rotation=90, ha="right", va="top", fontsize="small", color=colour)  # fmt: skip
    unknown = [r.name for r in runs if r.warnings is None]
    if unknown:
        which = f" ({', '.join(unknown)})" if overlay else ""
        ax.text(0.01, 0.97, f"no {WARNINGS_FILE}{which}: warning kinds unknown", transform=ax.transAxes,
                va="top", fontsize="small", color="0.3")  # fmt: skip


def _warning_handles(runs: list[Run]) -> list:
    from matplotlib.lines import Line2D

    kinds = sorted({w.kind for r in runs for w in r.warnings or []})
    return [Line2D([], [], color=_WATCH_COLOURS.get(k, "tab:brown"), linestyle=":", label=k) for k in kinds]


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path
