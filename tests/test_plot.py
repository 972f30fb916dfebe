"""fastalign.plot: PNG curves per metric group from metrics.jsonl, single run and overlays."""

from __future__ import annotations

import json
import math

import pytest

from fastalign.plot import metric_group, plot_run, plot_runs
from fastalign.trainers.metrics import MetricsLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, steps: int = 6, scale: float = 1.0) -> None:
    """A synthetic DPO-like run: every key the trainers log, eval every 3 steps, one NaN."""
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


EXPECTED = [
    "loss",
    "kl",
    "rewards",
    "logps",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "peak_mem_mb",
    "epoch",
]


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 1000, path


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


def test_plot_run_draws_train_and_eval(tmp_path, monkeypatch):
    """Check what is drawn (not just that a file exists): capture the Axes before saving."""
    from matplotlib.figure import Figure

    drawn: dict[str, dict[str, tuple]] = {}
    real_savefig = Figure.savefig

    def spy(fig, path, **kw):
        ax = fig.axes[0]
        drawn[str(path).rsplit("/", 1)[-1]] = {
            line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_marker())
            for line in ax.get_lines()
        }
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    write_run(tmp_path)
    plot_run(tmp_path, tmp_path / "out")
    assert set(drawn["loss.png"]) == {"train/loss", "train/nll", "eval/loss"}
    xs, ys, marker = drawn["loss.png"]["eval/loss"]
    assert xs == [3, 6] and ys == pytest.approx([1 / 3, 1 / 6]) and marker == "o"
    assert drawn["loss.png"]["train/loss"][2] in ("None", "", None)  # train: plain line
    assert set(drawn["rewards.png"]) == {
        f"{s}/rewards/{k}" for s in ("train", "eval") for k in ("chosen", "rejected", "accuracies", "margins")
    }
    assert set(drawn["kl.png"]) == {"train/kl/mean", "train/kl/max"}
    xs, ys, _ = drawn["grad_norm.png"]["train/grad_norm"]
    assert xs == [1, 2, 3, 4, 5, 6] and math.isnan(ys[1])  # a NaN logged as null: a gap, not dropped


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


def test_plot_runs_overlays(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    labels: dict[str, list[str]] = {}
    real_savefig = Figure.savefig

    def spy(fig, path, **kw):
        labels[str(path).rsplit("/", 1)[-1]] = [line.get_label() for line in fig.axes[0].get_lines()]
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    write_run(tmp_path / "fused", scale=1.0)
    write_run(tmp_path / "unfused", steps=4, scale=1.1)
    with MetricsLogger(tmp_path / "extra", tensorboard=False) as logger:
        logger.log(1, {"loss": 1.0, "only_here": 3.0})
    paths = plot_runs([tmp_path / "fused", tmp_path / "unfused", tmp_path / "extra"], tmp_path / "cmp")
    assert [p.stem for p in paths] == [*EXPECTED, "only_here"]
    for p in paths:
        assert_png(p)
        assert p.parent == tmp_path / "cmp"
    assert {"fused train/loss", "unfused train/loss", "extra train/loss", "fused eval/loss"} <= set(
        labels["loss.png"]
    )
    assert labels["only_here.png"] == ["extra train/only_here"]


def test_plot_runs_same_leaf_names(tmp_path):
    write_run(tmp_path / "a" / "run")
    write_run(tmp_path / "b" / "run")
    paths = plot_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"], tmp_path / "cmp")
    assert [p.stem for p in paths] == EXPECTED


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


def test_plot_rollout_metrics(tmp_path, monkeypatch):
    """The rollout curves get their own figures: reward mean with a ±std band, KL with kl_coef on a
    second axis, and one PNG each for entropy, length, EOS rate, clipfrac, approx_kl, value metrics."""
    from matplotlib.figure import Figure

    seen: dict[str, dict] = {}
    real_savefig = Figure.savefig

    def spy(fig, path, **kw):
        seen[str(path).rsplit("/", 1)[-1]] = {
            "lines": [{ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()} for ax in fig.axes],
            "bands": len(fig.axes[0].collections),
        }
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    write_rollout_run(tmp_path / "ppo")
    paths = plot_run(tmp_path / "ppo")
    assert [p.stem for p in paths] == ROLLOUT_GROUPS
    for p in paths:
        assert_png(p)
    reward = seen["reward.png"]
    assert set(reward["lines"][0]) == {
        "train/reward/mean ± reward/std",
        "train/reward/raw_mean ± reward/raw_std",
    }  # std keys are bands, not lines
    assert reward["bands"] == 2
    kl = seen["kl.png"]["lines"]
    assert len(kl) == 2 and set(kl[0]) == {"train/kl"} and set(kl[1]) == {"train/kl_coef"}
    assert kl[1]["train/kl_coef"] == pytest.approx([0.05 * (1 + 0.01 * s) for s in range(1, 9)])
    assert set(seen["response_length.png"]["lines"][0]) == {"train/response/length"}
    assert seen["explained_var.png"]["lines"][0]["train/value/explained_var"] == pytest.approx(
        [0.1 * s for s in range(1, 9)]
    )

    # GRPO: no value model -> no value figures; overlay of both runs keeps the band per run
    write_rollout_run(tmp_path / "grpo", steps=5, value=False)
    assert [p.stem for p in plot_run(tmp_path / "grpo")] == [
        g for g in ROLLOUT_GROUPS if g not in ("value_loss", "explained_var")
    ]
    paths = plot_runs([tmp_path / "ppo", tmp_path / "grpo"], tmp_path / "cmp")
    assert [p.stem for p in paths] == ROLLOUT_GROUPS
    assert seen["reward.png"]["bands"] == 4
    assert {"ppo train/kl_coef", "grpo train/kl_coef"} == set(seen["kl.png"]["lines"][1])


def test_metric_group_rollout():
    assert metric_group("reward/mean") == metric_group("reward/std") == "reward"
    assert metric_group("kl") == metric_group("kl_coef") == "kl"
    assert metric_group("response/length") == "response_length"
    assert metric_group("response/eos_rate") == "eos_rate"
    assert metric_group("policy/clipfrac") == "clipfrac" and metric_group("policy/approx_kl") == "approx_kl"
    assert (
        metric_group("value/loss") == "value_loss" and metric_group("value/explained_var") == "explained_var"
    )
