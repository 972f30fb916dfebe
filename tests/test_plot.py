"""fastalign.plot: PNG curves per metric group from metrics.jsonl, single run and overlays, and
what makes them readable (issue 16): kl / kl_coef in distinct colours with matching axes,
accuracy on its own 0–1 panel, a log axis when overlaid losses differ by orders of magnitude, the
legend outside the data, the watch's warnings labelled with their kind, where the PNGs went.

The synthetic runs below have the shapes and magnitudes real runs log (DPO rewards to ±12,
IPO losses in the thousands next to SimPO's ~1, a PPO KL of tens of nats with an adaptive
kl_coef ~0.05, warnings written by the real RewardHackingWatch)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastalign.plot import (
    describe_written,
    metric_group,
    overlay_dir,
    plot,
    plot_run,
    plot_runs,
    read_watch_warnings,
)
from fastalign.rollout.watch import RewardHackingWatch
from fastalign.trainers.metrics import MetricsLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def figures(monkeypatch) -> dict:
    """{png file name: the Figure saved there} for every plot written during the test (the PNGs
    are still written), so a test checks what is drawn, not only that a file exists."""
    from matplotlib.figure import Figure

    seen: dict = {}
    real_savefig = Figure.savefig

    def spy(fig, path, **kw):
        seen[Path(path).name] = fig
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


def _lines(ax) -> dict[str, object]:
    """The labelled lines of `ax` (not the dots of isolated points, nor the warning markers)."""
    return {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}


def write_run(run_dir, steps: int = 6, scale: float = 1.0) -> None:
    """A small DPO-like run: every key the trainers log, eval every 3 steps, one NaN."""
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        for step in range(1, steps + 1):
            m = {
                "loss": scale / step,
                "nll": 2.0 * scale / step,
                "rewards/chosen": 0.1 * step,
                "rewards/rejected": -0.1 * step,
                "rewards/accuracies": min(1.0, 0.5 + 0.1 * step),
                "rewards/margins": 0.2 * step,
                "logps/chosen": -50.0 + step,
                "logps/rejected": -60.0 - step,
                "grad_norm": float("nan") if step == 2 else 1.0 / step,
                "lr": 1e-5 * step / steps,
                "tokens_per_s": 1000.0 + step,
                "peak_mem_mb": 512.0,
                "epoch": step / steps,
                "kl/mean": 0.01 * step,
                "kl/max": 0.02 * step,
            }
            logger.log(step, m)
            if step % 3 == 0:
                logger.log(
                    step, {k: v for k, v in m.items() if k.split("/")[0] in ("loss", "rewards")}, "eval"
                )


# loss at step 1 and at the end of a 40-step run, per DPO loss type (IPO's squared summed-log-prob
# margin is in the thousands; SimPO's length-normalised one ~1)
LOSS_TYPES = {
    "sigmoid": (0.693, 0.25),
    "hinge": (1.0, 0.3),
    "ipo": (2500.0, 180.0),
    "robust": (0.75, 0.3),
    "bco_pair": (0.7, 0.35),
    "sppo_hard": (40.0, 9.0),
    "simpo": (1.4, 0.45),
    "apo_zero": (0.9, 0.5),
}


def write_dpo_run(run_dir, loss_type: str = "sigmoid", steps: int = 40, seed: int = 0) -> None:
    """A DPO run of `loss_type` with realistic magnitudes: rewards to about +2 / −10, margins to
    12, accuracy 0.5 → 0.95, eval every 10 steps."""
    rng = random.Random(seed)
    start, end = LOSS_TYPES[loss_type]
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        for step in range(1, steps + 1):
            t = step / steps
            loss = start * (end / start) ** t * (1 + 0.08 * rng.uniform(-1, 1))
            chosen, rejected = 2.0 * t + rng.uniform(-0.3, 0.3), -10.0 * t + rng.uniform(-0.5, 0.5)
            m = {
                "loss": loss,
                "rewards/chosen": chosen,
                "rewards/rejected": rejected,
                "rewards/margins": chosen - rejected,
                "rewards/accuracies": min(1.0, 0.5 + 0.45 * t + rng.uniform(-0.05, 0.05)),
            }
            logger.log(step, m)
            if step % 10 == 0:
                logger.log(step, {k: v * 1.05 for k, v in m.items() if k != "rewards/accuracies"}, "eval")


WATCH = SimpleNamespace(  # fastalign's WatchConfig fields, smaller windows for a 30-step run
    length_drift=0.5, length_window=5, kl_threshold=20.0, reward_kl_window=5, kl_blowup=4.0, kl_floor=1.0
)


def write_ppo_run(run_dir, steps: int = 30, warnings_log: bool = True) -> list[str]:
    """A PPO run whose policy drifts: KL climbs to ~50 nats/sequence, the adaptive kl_coef follows
    (0.05 → ~0.2), responses grow, reward rises. The real watch decides which warnings fire and
    its lines go to warnings.log the way the rollout loop writes them; returns those lines."""
    watch, fired = RewardHackingWatch(WATCH), []
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        for step in range(1, steps + 1):
            kl = 0.5 if step <= 8 else 0.5 + 2.2 * (step - 8)  # quiet, then running away
            m = {
                "loss": 0.3 / step - 0.05,  # PPO's clipped objective goes negative
                "reward/mean": 0.1 + 0.025 * step,
                "reward/std": 0.1,
                "reward/raw_mean": 0.2 + 0.03 * step,
                "reward/raw_std": 0.15,
                "reward/clipped_frac": min(1.0, 0.01 * step),
                "kl": kl,
                "kl_coef": 0.05 * (1 + 0.05 * step),
                "response/length": 20.0 if step < 22 else 20.0 + 4 * (step - 21),
            }
            lines = watch.update(step, m)
            m["watch/warnings"] = float(len(lines))
            fired += lines
            logger.log(step, m)
    if warnings_log:
        (Path(run_dir) / "warnings.log").write_text("".join(f"{w}\n" for w in fired))
    return fired


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 1000, path


EXPECTED = ["loss", "kl", "rewards", "logps", "grad_norm", "lr", "tokens_per_s", "peak_mem_mb", "epoch"]


def test_metric_group():
    assert metric_group("loss") == metric_group("nll") == "loss"
    assert metric_group("rewards/margins") == "rewards" and metric_group("logps/chosen") == "logps"
    assert metric_group("grad_norm") == "grad_norm" and metric_group("epoch") == "epoch"
    assert metric_group("kl/mean") == "kl" and metric_group("a/b/c") == "a"


def test_plot_run_writes_one_png_per_group(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    paths = plot_run(run)
    assert [p.stem for p in paths] == EXPECTED
    assert all(p.parent == run / "plots" for p in paths)
    for p in paths:
        assert_png(p)
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(f"{g}.png" for g in EXPECTED)


def test_plot_run_draws_train_and_eval(tmp_path, figures):
    write_run(tmp_path)
    plot_run(tmp_path, tmp_path / "out")
    loss = _lines(figures["loss.png"].axes[0])
    assert set(loss) == {"train/loss", "train/nll", "eval/loss"}
    eval_loss = loss["eval/loss"]
    assert list(eval_loss.get_xdata()) == [3, 6] and list(eval_loss.get_ydata()) == pytest.approx(
        [1 / 3, 1 / 6]
    )
    assert eval_loss.get_marker() == "o" and loss["train/loss"].get_marker() in ("None", "", None)
    # train and eval of one key share its colour (the marker tells them apart)
    assert eval_loss.get_color() == loss["train/loss"].get_color() != loss["train/nll"].get_color()
    rewards = figures["rewards.png"].axes
    assert set(_lines(rewards[0])) == {
        f"{s}/rewards/{k}" for s in ("train", "eval") for k in ("chosen", "rejected", "margins")
    }
    assert set(_lines(rewards[1])) == {"train/rewards/accuracies", "eval/rewards/accuracies"}
    assert set(_lines(figures["kl.png"].axes[0])) == {"train/kl/mean", "train/kl/max"}
    xs = list(_lines(figures["grad_norm.png"].axes[0])["train/grad_norm"].get_xdata())
    ys = list(_lines(figures["grad_norm.png"].axes[0])["train/grad_norm"].get_ydata())
    assert xs == [1, 2, 3, 4, 5, 6] and math.isnan(ys[1])  # a NaN logged as null: a gap, not dropped
    # step 1 sits alone before the gap: a line draws nothing there, so it gets a dot
    dots = [ln for ln in figures["grad_norm.png"].axes[0].get_lines() if ln.get_label() == "_nolegend_"]
    assert [(list(d.get_xdata()), list(d.get_ydata())) for d in dots] == [([1], [1.0])]


def test_kl_and_kl_coef_have_distinct_colours_and_axes_labelled_in_them(tmp_path, figures):
    write_ppo_run(tmp_path / "ppo")
    plot_run(tmp_path / "ppo")
    fig = figures["kl.png"]
    main, twin = fig.axes  # kl on the left axis, kl_coef on a twin axis sharing the steps
    kl, coef = _lines(main)["train/kl"], _lines(twin)["train/kl_coef"]
    assert kl.get_color() != coef.get_color()
    for ax, line, side in ((main, kl, "left"), (twin, coef, "right")):
        assert ax.yaxis.label.get_color() == line.get_color()
        assert ax.yaxis.get_ticklabels()[0].get_color() == line.get_color()
        assert ax.spines[side].get_edgecolor()[:3] == pytest.approx(_rgb(line.get_color()))
    assert main.get_ylabel() == "kl" and twin.get_ylabel() == "kl_coef"
    assert max(kl.get_ydata()) > 20 and max(coef.get_ydata()) < 0.5  # why they need two axes


def _rgb(colour) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(colour)


def test_accuracy_is_on_its_own_0_to_1_panel_not_on_the_rewards_axis(tmp_path, figures):
    write_dpo_run(tmp_path / "dpo")
    plot_run(tmp_path / "dpo")
    rewards, accuracy = figures["rewards.png"].axes
    assert not any("accuracies" in label for label in _lines(rewards))
    assert set(_lines(accuracy)) == {"train/rewards/accuracies"}
    assert accuracy.get_ylim() == pytest.approx((-0.03, 1.03))
    lo, hi = rewards.get_ylim()
    assert lo < -9 and hi > 11  # rewards/rejected to −10, margins to 12
    assert accuracy.get_shared_x_axes().joined(accuracy, rewards)
    # the PPO reward figure: the clipped fraction is a fraction panel too, the means keep their bands
    write_ppo_run(tmp_path / "ppo")
    plot_run(tmp_path / "ppo")
    reward, frac = figures["reward.png"].axes[:2]
    assert set(_lines(frac)) == {"train/reward/clipped_frac"}
    assert len(reward.collections) == 2  # ±std bands of reward/mean and reward/raw_mean


def test_overlaid_losses_orders_of_magnitude_apart_get_a_log_axis_and_an_outside_legend(tmp_path, figures):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    runs = [tmp_path / name for name in LOSS_TYPES]
    for i, run in enumerate(runs):
        write_dpo_run(run, run.name, seed=i)
    plot_runs(runs, tmp_path / "cmp")
    ax = figures["loss.png"].axes[0]
    assert ax.get_yscale() == "log" and "log scale" in ax.get_ylabel()
    lines = _lines(ax)
    assert len(lines) == 16  # 8 runs × (train, eval)
    # on the log axis SimPO's curve spans a visible height, not a flat line at 0
    lo, hi = (math.log10(v) for v in ax.get_ylim())
    simpo = [math.log10(v) for v in lines["simpo train/loss"].get_ydata()]
    assert (max(simpo) - min(simpo)) / (hi - lo) > 0.1
    # the rewards figure (similar magnitudes in every run) stays linear
    assert figures["rewards.png"].axes[0].get_yscale() == "linear"
    # the legend (8 runs × train/eval lines) sits outside the axes and names runs and series once
    for name in ("loss.png", "rewards.png"):
        fig = figures[name]
        assert not any(ax.get_legend() for ax in fig.axes)  # no legend inside any axes
        (legend,) = fig.legends
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), name
    labels = [t.get_text() for t in figures["loss.png"].legends[0].get_texts()]
    assert labels == [*LOSS_TYPES, "eval (markers)"]  # 9 entries, not 16 (the y label says "loss")
    rewards_labels = [t.get_text() for t in figures["rewards.png"].legends[0].get_texts()]
    assert rewards_labels[len(LOSS_TYPES) :] == [
        "rewards/chosen", "rewards/margins", "rewards/rejected", "eval (markers)"
    ]  # fmt: skip
    # each run's lines have its legend colour
    colours = {h.get_label(): h.get_color() for h in figures["loss.png"].legends[0].legend_handles}
    for label, line in _lines(figures["loss.png"].axes[0]).items():
        assert line.get_color() == colours[label.split(" ")[0]]
    # two runs of similar loss scale: linear
    plot_runs(runs[:2], tmp_path / "two")
    assert figures["loss.png"].axes[0].get_yscale() == "linear"


def test_symlog_when_a_series_crosses_zero(tmp_path, figures):
    """PPO's loss goes negative: a log axis cannot show it, a symlog one can."""
    write_ppo_run(tmp_path / "ppo")
    with MetricsLogger(tmp_path / "big", tensorboard=False) as logger:
        for step in range(1, 31):
            logger.log(step, {"loss": 5000.0 / step})
    plot_runs([tmp_path / "ppo", tmp_path / "big"], tmp_path / "cmp")
    ax = figures["loss.png"].axes[0]
    assert ax.get_yscale() == "symlog" and "symlog scale" in ax.get_ylabel()
    assert min(_lines(ax)["ppo train/loss"].get_ydata()) < 0


def test_overlay_kl_coef_gets_its_own_panel(tmp_path, figures):
    """In an overlay colour means the run, so kl_coef cannot be told from kl by colour: a panel."""
    write_ppo_run(tmp_path / "a")
    write_ppo_run(tmp_path / "b", steps=20)
    plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    kl, coef = figures["kl.png"].axes
    assert set(_lines(kl)) == {"a train/kl", "b train/kl"}
    assert set(_lines(coef)) == {"a train/kl_coef", "b train/kl_coef"}
    assert coef.get_ylabel() == "kl_coef"
    # both runs warned at steps 10 and 17 (run b stops at 20): one label per step, naming the runs
    texts = sorted(t.get_text() for t in figures["watch.png"].axes[0].texts)
    assert texts == ["KL over threshold (a, b)", "length drift (a)", "reward up while KL grows (a, b)"]


def test_watch_spikes_are_labelled_with_the_warning_kind(tmp_path, figures):
    fired = write_ppo_run(tmp_path / "ppo")
    warnings = read_watch_warnings(tmp_path / "ppo")
    kinds = {w.kind for w in warnings}
    assert kinds == {"length drift", "KL over threshold", "reward up while KL grows"}, fired
    assert len(warnings) == len(fired)
    plot_run(tmp_path / "ppo")
    ax = figures["watch.png"].axes[0]
    texts = {t.get_text(): t for t in ax.texts}
    for w in warnings:  # a vertical line at each warning's step, labelled with its kind
        assert any(w.kind in text for text in texts), (w, list(texts))
        assert any(list(ln.get_xdata()) == [w.step, w.step] for ln in ax.get_lines())
    spikes = [s for s, c in zip(*_lines(ax)["train/watch/warnings"].get_data(), strict=True) if c > 0]
    assert sorted(spikes) == sorted({w.step for w in warnings})
    legend_labels = {t.get_text() for t in figures["watch.png"].legends[0].get_texts()}
    assert kinds <= legend_labels
    # a resumed run appends the replayed steps' warnings again: each is drawn once
    log = tmp_path / "ppo" / "warnings.log"
    log.write_text(log.read_text() + "".join(f"{w}\n" for w in fired[-1:]) + "unrelated line\n")
    assert read_watch_warnings(tmp_path / "ppo") == warnings
    # without warnings.log the figure says the kinds are unknown instead of guessing
    write_ppo_run(tmp_path / "bare", warnings_log=False)
    assert read_watch_warnings(tmp_path / "bare") is None
    plot_run(tmp_path / "bare")
    assert any("no warnings.log" in t.get_text() for t in figures["watch.png"].axes[0].texts)


def test_watch_lines_that_name_their_kind_and_unknown_ones(tmp_path):
    (tmp_path / "warnings.log").write_text(
        "[watch:entropy-collapse] step 7: entropy fell below 0.1\n"
        "[watch] step 3: something new happened here\n"
    )
    got = [(w.step, w.kind) for w in read_watch_warnings(tmp_path)]
    assert got == [(3, "something new happened"), (7, "entropy-collapse")]


def test_custom_out_dir(tmp_path):
    write_run(tmp_path / "run")
    paths = plot_run(tmp_path / "run", tmp_path / "elsewhere" / "plots")
    assert all(p.parent == tmp_path / "elsewhere" / "plots" for p in paths)
    assert not (tmp_path / "run" / "plots").exists()


def test_only_some_groups(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": 1.0, "lr": 1e-5})
        logger.log(2, {"loss": 0.5, "lr": 2e-5, "all_nan": float("nan")})
    assert [p.stem for p in plot_run(tmp_path)] == ["loss", "lr"]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Run directory not found"):
        plot_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"No metrics\.jsonl in"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty: nothing to plot"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "time": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no numeric metrics"):
        plot_run(tmp_path)
    with pytest.raises(ValueError, match="no run directories"):
        plot_runs([], tmp_path / "cmp")
    write_run(tmp_path / "good")
    with pytest.raises(FileNotFoundError, match="Run directory not found"):
        plot_runs([tmp_path / "good", tmp_path / "nope"], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()  # all runs are read before anything is written


def test_plot_runs_overlays(tmp_path, figures):
    write_run(tmp_path / "fused", scale=1.0)
    write_run(tmp_path / "unfused", steps=4, scale=1.1)
    with MetricsLogger(tmp_path / "extra", tensorboard=False) as logger:
        logger.log(1, {"loss": 1.0, "only_here": 3.0})
    paths = plot_runs([tmp_path / "fused", tmp_path / "unfused", tmp_path / "extra"], tmp_path / "cmp")
    assert [p.stem for p in paths] == [*EXPECTED, "only_here"]
    for p in paths:
        assert_png(p)
        assert p.parent == tmp_path / "cmp"
    labels = set(_lines(figures["loss.png"].axes[0]))
    assert {"fused train/loss", "unfused train/loss", "extra train/loss", "fused eval/loss"} <= labels
    assert set(_lines(figures["only_here.png"].axes[0])) == {"extra train/only_here"}


def test_plot_runs_same_leaf_names(tmp_path, figures):
    write_run(tmp_path / "a" / "run")
    write_run(tmp_path / "b" / "run")
    paths = plot_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"], tmp_path / "cmp")
    assert [p.stem for p in paths] == EXPECTED
    labels = [t.get_text() for t in figures["loss.png"].legends[0].get_texts()]
    assert labels[:2] == ["a/run", "b/run"]  # the parts that tell them apart, not absolute paths


def test_plot_picks_the_folder_and_describe_written_says_where(tmp_path, monkeypatch):
    """What `fastalign plot` needs: one call for one or several runs, and the message naming the
    absolute folder (an overlay's default folder is under the current directory)."""
    for name in ("a", "b"):  # two groups each: this test is about folders, not figures
        with MetricsLogger(tmp_path / name, tensorboard=False) as logger:
            logger.log(1, {"loss": 1.0, "lr": 1e-5})
            logger.log(2, {"loss": 0.5, "lr": 2e-5})
    one = plot([tmp_path / "a"])
    assert {p.parent for p in one} == {tmp_path / "a" / "plots"}
    monkeypatch.chdir(tmp_path)
    both = plot(["a", "b"])
    assert overlay_dir(["a", "b"]) == Path("plots") / "a_vs_b"
    assert {p.parent for p in both} == {Path("plots") / "a_vs_b"}
    text = describe_written(both)
    assert text.splitlines() == [
        f"wrote 2 plots to {tmp_path / 'plots' / 'a_vs_b'}/:",
        "  loss.png",
        "  lr.png",
    ]
    assert plot(["b", "a"], tmp_path / "mine")[0].parent == tmp_path / "mine"
    long = [f"run_with_a_rather_long_name_{i}" for i in range(6)]
    assert len(overlay_dir(long).name) <= 90 and overlay_dir(long) != overlay_dir(long[:5])


ROLLOUT_GROUPS = [
    "loss",
    "reward",
    "kl",
    "entropy",
    "response_length",
    "eos_rate",
    "clipfrac",
    "approx_kl",
    "value_loss",
    "explained_var",
    "grad_norm",
    "lr",
]


def write_rollout_run(run_dir, steps: int = 8, value: bool = True) -> None:
    """Synthetic PPO metrics with every rollout name of the shared contract (GRPO: value=False)."""
    with MetricsLogger(run_dir, tensorboard=False) as logger:
        for step in range(1, steps + 1):
            m = {
                "loss": 1.0 / step,
                "reward/mean": 0.1 * step,
                "reward/std": 0.05,
                "reward/raw_mean": 0.2 * step,
                "reward/raw_std": 0.1,
                "kl": 0.3 * step,
                "kl_coef": 0.05 * (1 + 0.01 * step),
                "entropy": 2.0 - 0.1 * step,
                "response/length": 10.0 + step,
                "response/eos_rate": min(1.0, 0.1 * step),
                "policy/clipfrac": 0.01 * step,
                "policy/approx_kl": 0.001 * step,
                "lr": 1e-6,
                "grad_norm": 1.0,
            }
            if value:
                m |= {"value/loss": 2.0 / step, "value/explained_var": 0.1 * step}
            logger.log(step, m)


def test_plot_rollout_metrics(tmp_path, figures):
    """The rollout curves get their own figures: reward mean with a ±std band, KL with kl_coef on a
    second axis, and one PNG each for entropy, length, EOS rate, clipfrac, approx_kl, value metrics."""
    write_rollout_run(tmp_path / "ppo")
    paths = plot_run(tmp_path / "ppo")
    assert [p.stem for p in paths] == ROLLOUT_GROUPS
    for p in paths:
        assert_png(p)
    reward = figures["reward.png"].axes[0]
    assert set(_lines(reward)) == {
        "train/reward/mean ± reward/std",
        "train/reward/raw_mean ± reward/raw_std",
    }  # std keys are bands, not lines
    assert len(reward.collections) == 2
    kl, coef = figures["kl.png"].axes
    assert set(_lines(kl)) == {"train/kl"} and set(_lines(coef)) == {"train/kl_coef"}
    assert list(_lines(coef)["train/kl_coef"].get_ydata()) == pytest.approx(
        [0.05 * (1 + 0.01 * s) for s in range(1, 9)]
    )
    assert set(_lines(figures["response_length.png"].axes[0])) == {"train/response/length"}
    explained = _lines(figures["explained_var.png"].axes[0])["train/value/explained_var"]
    assert list(explained.get_ydata()) == pytest.approx([0.1 * s for s in range(1, 9)])
    assert len(figures["eos_rate.png"].axes) == 1  # a fraction alone is the main panel

    # GRPO: no value model -> no value figures; overlay of both runs keeps the band per run
    write_rollout_run(tmp_path / "grpo", steps=5, value=False)
    assert [p.stem for p in plot_run(tmp_path / "grpo")] == [
        g for g in ROLLOUT_GROUPS if g not in ("value_loss", "explained_var")
    ]
    paths = plot_runs([tmp_path / "ppo", tmp_path / "grpo"], tmp_path / "cmp")
    assert [p.stem for p in paths] == ROLLOUT_GROUPS
    assert len(figures["reward.png"].axes[0].collections) == 4
    legend = [t.get_text() for t in figures["reward.png"].legends[0].get_texts()]
    assert legend == ["ppo", "grpo", "reward/mean ± reward/std", "reward/raw_mean ± reward/raw_std"]
    assert set(_lines(figures["kl.png"].axes[1])) == {"ppo train/kl_coef", "grpo train/kl_coef"}
    # a run keeps its colour in a figure the other run is missing from
    (value_loss,) = _lines(figures["value_loss.png"].axes[0]).values()
    assert value_loss.get_color() == _lines(figures["loss.png"].axes[0])["ppo train/loss"].get_color()
    write_rollout_run(tmp_path / "first", steps=3, value=False)
    plot_runs([tmp_path / "first", tmp_path / "ppo"], tmp_path / "cmp2")
    ppo_loss = _lines(figures["loss.png"].axes[0])["ppo train/loss"]
    (value_loss,) = _lines(figures["value_loss.png"].axes[0]).values()
    assert value_loss.get_color() == ppo_loss.get_color() == "C1"


def test_metric_group_rollout():
    assert metric_group("reward/mean") == metric_group("reward/std") == "reward"
    assert metric_group("kl") == metric_group("kl_coef") == "kl"
    assert metric_group("response/length") == "response_length"
    assert metric_group("response/eos_rate") == "eos_rate"
    assert metric_group("policy/clipfrac") == "clipfrac" and metric_group("policy/approx_kl") == "approx_kl"
    assert (
        metric_group("value/loss") == "value_loss" and metric_group("value/explained_var") == "explained_var"
    )
