"""MetricsLogger / read_metrics: JSONL per step, fsync'd, crash-tolerant, truncatable on resume,
mirrored to TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import numpy as np
import pytest
import torch

from fastalign.trainers.metrics import METRICS_FILE, MetricsLogger, read_metrics


def lines(run_dir) -> list[str]:
    return (run_dir / METRICS_FILE).read_text().splitlines()


def test_log_writes_one_json_line_per_call(tmp_path):
    t0 = time.time()
    with MetricsLogger(tmp_path / "run", tensorboard=False) as logger:
        logger.log(1, {"loss": torch.tensor(0.5), "rewards/accuracies": 1, "lr": 1e-5})
        logger.log(1, {"loss": 0.25, "nll": np.float32(2.0)}, split="eval")
        # visible on disk before close: written and flushed per line
        assert len(lines(tmp_path / "run")) == 2
    first, second = (json.loads(s) for s in lines(tmp_path / "run"))
    assert first["step"] == 1 and first["split"] == "train" and t0 <= first["time"] <= time.time()
    assert first["loss"] == 0.5 and first["rewards/accuracies"] == 1 and first["lr"] == 1e-5
    assert list(first)[:3] == ["step", "split", "time"]
    assert second == {"step": 1, "split": "eval", "time": second["time"], "loss": 0.25, "nll": 2.0}
    assert read_metrics(tmp_path / "run") == [first, second]
    assert read_metrics(tmp_path / "run" / METRICS_FILE) == [first, second]


def test_each_line_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(3):
            logger.log(step, {"loss": 1.0})
    assert len(synced) == 3


def test_non_finite_values_are_null(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(
            1, {"loss": float("nan"), "grad_norm": torch.tensor(float("inf")), "lr": -math.inf, "ok": 1.0}
        )
    text = (tmp_path / METRICS_FILE).read_text()
    assert "NaN" not in text and "Infinity" not in text
    rec = json.loads(text)  # strict JSON
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["lr"] is None and rec["ok"] == 1.0


def test_bad_metric_values(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(
            ValueError, match=r"metric 'loss': expected a scalar, got a tensor of shape \(2,\)"
        ):
            logger.log(1, {"loss": torch.ones(2)})
        with pytest.raises(ValueError, match="metric 'name': expected a number"):
            logger.log(1, {"name": "abc"})
        with pytest.raises(ValueError, match="clash"):
            logger.log(1, {"step": 3})
    assert read_metrics(tmp_path) == []  # nothing half-written
    with pytest.raises(ValueError, match="closed"):
        logger.log(2, {"loss": 1.0})


def test_disabled_logger_is_a_no_op(tmp_path):
    logger = MetricsLogger(tmp_path / "rank1", enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.truncate_after(0)
    logger.close()
    assert not (tmp_path / "rank1").exists()


def test_appends_to_existing_log(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": 1.0})
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(2, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_torn_last_line_is_skipped_and_repaired(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": 1.0})
        logger.log(2, {"loss": 0.9})
    with open(tmp_path / METRICS_FILE, "a") as f:  # a crash mid-write
        f.write('{"step": 3, "split": "train", "ti')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    # reopening cuts the torn tail, so the next record is not glued onto it
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(3, {"loss": 0.8})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert all(json.loads(s) for s in lines(tmp_path))


def test_corrupt_middle_line_is_an_error(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        read_metrics(tmp_path)
    (tmp_path / METRICS_FILE).write_text('{"loss": 1}\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r'line 1: expected an object with an integer "step"'):
        read_metrics(tmp_path)


def test_read_metrics_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="No metrics file"):
        read_metrics(tmp_path)


def test_truncate_after_drops_later_steps(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": 1.0 / step})
            if step % 2 == 0:
                logger.log(step, {"loss": 2.0}, split="eval")
    with MetricsLogger(tmp_path, tensorboard=False) as logger:  # resume from a checkpoint at step 3
        logger.truncate_after(3)
        assert [(r["step"], r["split"]) for r in read_metrics(tmp_path)] == [
            (1, "train"),
            (2, "train"),
            (2, "eval"),
            (3, "train"),
        ]
        logger.log(4, {"loss": 0.1})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 2, 3, 4]
    with MetricsLogger(tmp_path, tensorboard=False) as logger:  # a fresh run in the same folder
        logger.truncate_after(-1)
        logger.log(1, {"loss": 5.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 5.0)]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_truncate_after_on_a_new_dir(tmp_path):
    with MetricsLogger(tmp_path / "new", tensorboard=False) as logger:
        logger.truncate_after(10)
        logger.log(11, {"loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "new")] == [11]


def _tb_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": float(step), "rewards/chosen": torch.tensor(0.5)})
        logger.log(3, {"loss": 9.0}, split="eval")
    scalars = _tb_scalars(tmp_path)
    assert scalars["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert scalars["train/rewards/chosen"] == [(1, 0.5), (2, 0.5), (3, 0.5)]
    assert scalars["eval/loss"] == [(3, 9.0)]
    with MetricsLogger(tmp_path) as logger:  # resume from step 1: steps 2.. replayed
        logger.truncate_after(1)
        logger.log(2, {"loss": 20.0})
    assert _tb_scalars(tmp_path)["train/loss"] == [(1, 1.0), (2, 20.0)]


def test_without_tensorboard_package_jsonl_only(tmp_path, monkeypatch, caplog):
    # make `from torch.utils.tensorboard import SummaryWriter` fail as it does without the package
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with caplog.at_level(logging.INFO, logger="fastalign.trainers.metrics"):
        with MetricsLogger(tmp_path) as logger:
            logger.log(1, {"loss": 1.0})
            logger.log(2, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert not (tmp_path / "tensorboard").exists()
    assert sum("TensorBoard logging disabled" in r.message for r in caplog.records) == 1
