"""Training metrics: one JSON line per log call in run_dir/metrics.jsonl, mirrored to TensorBoard.

Each line is `{"step": int, "split": "train" | "eval" | ..., "time": unix seconds, **metrics}`;
the keys the trainers write are loss, nll, rewards/{chosen,rejected,accuracies,margins},
logps/{chosen,rejected}, grad_norm, lr, tokens_per_s, peak_mem_mb and epoch.

Why JSONL with a flush + fsync per line: a crash (OOM kill, pre-emption) loses at most the line
being written, and that torn line is skipped by `read_metrics` and cut off when the log is opened
again. On resume, `truncate_after(step)` drops the lines logged after the checkpoint, so the
replayed steps are not written twice (and TensorBoard purges them too).

Non-finite values (NaN, ±inf) are written as JSON `null`, never as the non-standard `NaN` /
`Infinity` tokens that strict JSON parsers (jq, JavaScript) reject; `read_metrics` returns them as
None and the plots leave a gap. TensorBoard gets the real float (it draws NaN / inf itself).

TensorBoard is optional: without the `tensorboard` package the logger writes JSONL only and says
so once (logging.INFO). `enabled=False` makes every method a no-op (ranks other than 0).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "split", "time")

log = logging.getLogger(__name__)


def _to_number(key: str, value: Any) -> int | float:
    """A Python int / float from an int, float, bool, 0-d / one-element tensor or numpy scalar."""
    if hasattr(value, "detach"):  # torch.Tensor: checked by duck type so torch is not imported here
        if value.numel() != 1:
            raise ValueError(f"metric {key!r}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().item()
    elif hasattr(value, "item") and not isinstance(value, (int, float)):  # numpy scalar / 1-element array
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    raise ValueError(f"metric {key!r}: expected a number or a scalar tensor, got {type(value).__name__}")


def _json_value(x: int | float) -> int | float | None:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _cut_torn_tail(path: Path) -> None:
    """Drop a partial last line (no trailing newline), left by a crash mid-write, so the next
    append does not glue a new record onto it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


class MetricsLogger:
    """Appends metrics to run_dir/metrics.jsonl (and TensorBoard scalars "{split}/{key}")."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self._want_tb = tensorboard
        self._tb: Any = None  # SummaryWriter, created on the first log (after any truncate_after)
        self._tb_failed = False
        self._purge_step: int | None = None
        self._file = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _cut_torn_tail(self.path)
            self._file = open(self.path, "a", encoding="utf-8")

    # -- TensorBoard ---------------------------------------------------------------------------
    def _writer(self) -> Any:
        if self._tb is not None or self._tb_failed or not self._want_tb:
            return self._tb
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard not installed: JSONL only
            self._tb_failed = True
            log.info("TensorBoard logging disabled (%s); metrics go to %s only", exc, self.path)
            return None
        self._tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=self._purge_step)
        self._purge_step = None
        return self._tb

    # -- public API ----------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        """Write one record for `step`; flushed and fsync'd before returning."""
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError(f"MetricsLogger for {self.path} is closed")
        clash = [k for k in metrics if k in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} clash with the record fields {list(_RESERVED)}")
        values = {str(k): _to_number(str(k), v) for k, v in metrics.items()}
        record = {"step": int(step), "split": split, "time": time.time()}
        record.update({k: _json_value(v) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        writer = self._writer()
        if writer is not None:
            for k, v in values.items():
                writer.add_scalar(f"{split}/{k}", float(v), int(step))
            writer.flush()

    def truncate_after(self, step: int) -> None:
        """Drop every record with step > `step` (resume from a checkpoint at `step`; -1 drops all)."""
        if not self.enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step] if self.path.exists() else []
        if self._file is not None:
            self._file.close()
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        # TensorBoard: reopen with purge_step so readers discard the events after `step`
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if step < 0:
            for old in (self.run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"):
                old.unlink()
            self._purge_step = None
        else:
            self._purge_step = step + 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Records of run_dir/metrics.jsonl (or of that file given directly), in file order.

    A torn last line (crash mid-write, or a writer still running) is skipped; a bad line anywhere
    else is an error naming the file and line, since that is corruption, not a crash."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No metrics file: {path}")
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = i == len(lines) - 1  # no newline after it: possibly torn
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if last:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            if last:
                break
            raise ValueError(f'{path}: line {i + 1}: expected an object with an integer "step"')
        records.append(record)
    return records
