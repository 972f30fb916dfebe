"""One training run's life, the same under every recipe and both drivers.

A `RunSession` owns the run folder and the run's identity:

- `open()` (before any model is loaded): the folder's lock (one run per folder), the resume point,
  and the check that the checkpoint belongs to this run — its fingerprint (resolved config, model
  weights, data files; `identity.py`) against the new one. A change outside the resume-free keys
  is refused with a list of what changed, unless accepted with `train.accept_changes`. A fresh run
  writes `config.yaml` + `fingerprint.json`; a resumed run never rewrites them and appends what
  changed, with the step it took effect at, to `config_history.jsonl`.
- `begin(rt, trainables, total, ...)`: load the checkpoint (the one checkpoint format of
  `checkpoint.py`), recompute the lr schedule for the current horizon, open the metrics log,
  progress output and the divergence guard.
- then `log`, `step_done`, `maybe_save`, `finish` (final checkpoint + export), `close`.

The trainables are named ("policy"; PPO also "value"); the recipe's other stateful objects (KL
controller, reward normaliser, watch) ride along in `extra`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastalign.config import save_config
from fastalign.errors import ResumeRefusedError, RunLockedError
from fastalign.files import writing
from fastalign.trainers import checkpoint, identity
from fastalign.trainers.guard import DivergenceGuard
from fastalign.trainers.metrics import MetricsLogger
from fastalign.trainers.optim import rebase_lr
from fastalign.trainers.runtime import Runtime, Trainable

LOCK_FILE = ".lock"
HISTORY_FILE = "config_history.jsonl"
# metrics shown in progress output, the first few a run has (loss always first)
PROGRESS_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "nll", "reward/mean", "kl")


@dataclass
class RunResult:
    steps: int
    output_dir: Path
    final_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    resumed_from: Path | None


class RunLock:
    """An exclusive `fcntl` lock on `<run>/.lock`. The kernel drops it when the process dies
    (even SIGKILL), so a crashed run never leaves a stale lock; the file keeps the holder's PID
    and host for the message a second run prints."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to finish, or "
                "give this run another train.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


class Progress:
    """A tqdm bar on a terminal; otherwise one plain line per `log_every` steps (step/steps, the
    key metrics, tokens/s, elapsed, ETA), as HF Trainer and torchtune print into log files."""

    def __init__(self, name: str, total: int, start: int, enabled: bool, unit: str = "step") -> None:
        self.name, self.total, self.start, self.unit = name, total, start, unit
        self.t0 = time.perf_counter()
        self.bar = None
        self.lines = False
        if not enabled:
            return
        if sys.stderr.isatty() or os.environ.get("FASTALIGN_PROGRESS") == "1":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)
        else:
            self.lines = True

    def update(self, done: int, metrics: Mapping[str, float], logged: bool) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if "loss" in metrics:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        elif self.lines and logged:
            print(self.line(done, metrics), file=sys.stderr, flush=True)

    def line(self, done: int, metrics: Mapping[str, float]) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        shown = [k for k in PROGRESS_KEYS if k in metrics][:3]
        parts = [f"[{self.name}] {self.unit} {done}/{self.total}"]
        parts += [f"{k} {metrics[k]:.4g}" for k in shown]
        if "tokens_per_s" in metrics:
            parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
        parts += [f"elapsed {_clock(elapsed)}", f"ETA {_clock(eta)}"]
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RunSession:
    """See the module doc. `cfg`: the recipe config (its `train` section drives the session)."""

    def __init__(self, cfg: Any, name: str) -> None:
        self.cfg, self.tcfg, self.name = cfg, cfg.train, name
        self.out = Path(self.tcfg.output_dir)
        self.is_main = int(os.environ.get("RANK", "0")) == 0  # before any process group exists
        self.rt: Runtime | None = None
        self.trainables: Sequence[Trainable] = ()
        self.extra: Mapping[str, checkpoint.Stateful] = {}
        self.state: dict[str, Any] = {}
        self.describe: Callable[[int], dict[str, Any]] | None = None
        self.resumed_from: Path | None = None
        self.resume_state: dict[str, Any] | None = None
        self.changes: list[identity.Change] = []
        self.fingerprint: dict[str, Any] = {}
        self.logger: MetricsLogger | None = None
        self.progress: Progress | None = None
        self.guard: DivergenceGuard | None = None
        self._lock = RunLock(self.out)
        self._saved_step: int | None = None
        self._history: dict[str, Any] | None = None  # config changes of a resumed run, not yet saved
        self._opened = False

    def say(self, msg: str) -> None:
        if self.is_main:
            print(f"[{self.name}] {msg}", file=sys.stderr, flush=True)

    # -----------------------------------------------------------------------------------------
    def open(self) -> RunSession:
        """Lock the folder and decide where the run starts, before anything expensive is loaded."""
        if self._opened:
            return self
        self.out.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            self._lock.acquire()
        try:
            self.fingerprint = identity.fingerprint(self.cfg)
            resume = self.tcfg.resume
            if self.is_main and resume == "never" and checkpoint.list_checkpoints(self.out):
                self.say(f"train.resume=never: replacing the old checkpoints in {self.out}")
                checkpoint.remove_all(self.out)
            path = (
                None
                if resume == "never"
                else checkpoint.find_resume_point(self.out, resume, clean=self.is_main)
            )
            if path is not None:
                self._check_resume(path)
            elif self.is_main:
                save_config(self.cfg, self.out / "config.yaml")
                (self.out / "fingerprint.json").write_text(json.dumps(self.fingerprint, indent=1))
                (self.out / HISTORY_FILE).unlink(missing_ok=True)
        except BaseException:
            self._lock.release()
            raise
        self._opened = True
        return self

    def _check_resume(self, path: Path) -> None:
        state = checkpoint.check_loadable(path, int(os.environ.get("WORLD_SIZE", "1")))
        step = int(state["step"])
        if self.tcfg.max_steps is not None and self.tcfg.max_steps < step:
            raise ResumeRefusedError(
                f"train.max_steps={self.tcfg.max_steps} is below the step of the checkpoint to resume, "
                f"{path} (step {step}): the run has gone past it. Start over with train.resume=never (or "
                "another train.output_dir), or resume an earlier checkpoint with train.resume=<its folder>."
            )
        self.changes = identity.compare(state.get("fingerprint", {}), self.fingerprint)
        refused = identity.refused(self.changes, list(self.tcfg.accept_changes))
        if refused:
            names = ",".join(dict.fromkeys(c.key.removeprefix("file:") for c in refused))
            listing = "\n".join(f"  {c.describe()}" for c in refused)
            raise ResumeRefusedError(
                f"train.resume: {path} was written by a run with other settings, weights or data:\n"
                f"{listing}\n"
                f"Start fresh with train.resume=never (or another train.output_dir), or accept the change on "
                f"purpose with train.accept_changes=[{names}] (recorded in {self.out / HISTORY_FILE})."
            )
        self.resumed_from, self.resume_state = path, state
        for c in self.changes:
            kind = "accepted" if not c.free else "allowed on resume"
            self.say(f"resuming with a change ({kind}) from step {step + 1}: {c.describe()}")
        if self.changes and self.is_main:
            # written with the first checkpoint that holds the changed run: an attempt that dies
            # before it leaves nothing behind, and the next resume compares against the same state
            self._history = {"step": step + 1, "changes": {c.key: [c.old, c.new] for c in self.changes},
                             "accepted": list(self.tcfg.accept_changes)}  # fmt: skip

    # -----------------------------------------------------------------------------------------
    def begin(
        self,
        rt: Runtime,
        trainables: Sequence[Trainable],
        total: int,
        *,
        position: Mapping[str, Any],
        extra: Mapping[str, checkpoint.Stateful] | None = None,
        describe: Callable[[int], dict[str, Any]] | None = None,
        peak_lrs: Mapping[str, float] | None = None,
        unit: str = "step",
    ) -> int:
        """Load the checkpoint chosen by `open()` (checked against this run's data position and
        horizon), open the metrics log, progress output and divergence guard; the first step.
        `peak_lrs`: each trainable's peak lr, so a resumed schedule follows the current config."""
        self.open()
        self.rt, self.trainables, self.extra = rt, list(trainables), dict(extra or {})
        self.state, self.describe = {**position, "fingerprint": self.fingerprint}, describe
        rt.barrier()
        start = 0
        if self.resumed_from is not None:
            changed = [k for k, v in position.items() if self.resume_state.get(k, v) != v]
            if changed:
                raise ResumeRefusedError(
                    f"train.resume: {self.resumed_from} was written with "
                    + ", ".join(f"{k}={self.resume_state[k]} (now {position[k]})" for k in changed)
                    + "; the data order would differ, so the run cannot continue exactly. Restore those "
                    "settings, or start over with train.resume=never (or another train.output_dir)."
                )
            start = int(checkpoint.load(self.resumed_from, rt, self.trainables, self.extra)["step"])
            if start > total:
                raise ResumeRefusedError(
                    f"{self.resumed_from} is at {unit} {start}, past this run's {total} {unit}s; start over "
                    "with "
                    "train.resume=never or resume an earlier checkpoint with train.resume=<its folder>"
                )
            self._saved_step = start
            for t in self.trainables:
                rebase_lr(t.scheduler, t.optimizer, (peak_lrs or {}).get(t.name, self.tcfg.lr))
            self.say(f"resumed from {self.resumed_from} at {unit} {start} of {total}")
            if any(c.key in ("train.max_steps", "train.epochs") for c in self.changes) and start < total:
                lr = self.trainables[0].lr
                self.say(
                    f"the lr schedule is recomputed for {total} {unit}s: {unit} {start + 1} trains at "
                    f"lr {lr:.4g}"
                )
        self.logger = MetricsLogger(self.out, tensorboard=self.tcfg.tensorboard, enabled=rt.is_main)
        if self.resumed_from is not None:
            self.logger.truncate_after(start)
        elif (self.out / "metrics.jsonl").exists():
            self.logger.truncate_after(-1)  # a fresh run replaces an old log in the same folder
        self.progress = Progress(self.name, total, start, self.tcfg.progress and rt.is_main, unit)
        self.guard = DivergenceGuard(self.name, rt, self.trainables, self.last_checkpoint)
        self.guard.start()
        return start

    def last_checkpoint(self) -> Path | None:
        found = checkpoint.list_checkpoints(self.out)
        return found[-1] if found else None

    # -----------------------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        self.logger.log(step, metrics, split=split)

    def step_done(self, done: int, metrics: Mapping[str, float], logged: bool) -> None:
        """Progress output for a finished step (`logged`: its metrics were written this step)."""
        self.progress.update(done, metrics, logged)

    def maybe_save(self, done: int, total: int) -> None:
        """A checkpoint every `save_every` steps (the last one is `finish`'s)."""
        every = self.tcfg.save_every
        if every and done % every == 0 and done != total:
            self.save(done)

    def save(self, step: int) -> Path:
        self.guard.check(step)  # never a checkpoint of non-finite or exploded weights
        state = {**(self.describe(step) if self.describe else {}), **self.state}
        path = checkpoint.save(
            self.out, step, self.rt, self.trainables, state, self.tcfg.keep_last, self.extra
        )
        self._saved_step = step
        if self._history is not None:
            record = {**self._history, "saved_at_step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            with open(self.out / HISTORY_FILE, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
            self._history = None
        return path

    def finish(self, total: int, export: Callable[..., None] | None) -> None:
        """The last checkpoint (when the run saves, or was resumed and may be again) and the export."""
        if (self.tcfg.save_every or self.resumed_from is not None) and self._saved_step != total:
            self.save(total)
        if self.tcfg.export and export is not None:
            self.guard.check(total)
            dtype = None if self.tcfg.export_dtype == "auto" else self.tcfg.export_dtype
            last = self.last_checkpoint()
            with writing(self.out / "final", f" (the checkpoint {last} is intact)" if last else ""):
                export(self.out / "final", dtype=dtype)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.logger is not None:
            self.logger.close()
        self._lock.release()
