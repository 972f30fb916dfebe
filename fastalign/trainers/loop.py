"""The one training loop every recipe runs on.

A recipe builds a `Task` (model, data, collator and its batch → (loss, metrics) step); `run`
does the rest: deterministic data order, gradient accumulation, AdamW with warmup + cosine /
linear / constant schedule, gradient clipping, mixed precision (bf16 autocast on CUDA), periodic
evaluation, JSONL/TensorBoard metrics with a progress bar, atomic checkpoints and exact resume.

Exact resume: micro-batch k of the whole run is a pure function of (seed, k) — epoch e uses the
permutation drawn from `seed + e` — and the optimizer step count fixes k, so a run restored from a
checkpoint (model, optimizer, scheduler, RNG) sees the same batches and computes the same losses
as one that was never interrupted.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastalign.trainers.checkpoint import checkpoint_root, find_resume_point, list_checkpoints

LossStep = Callable[[dict[str, Any]], tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]]


@dataclass
class Task:
    """What a recipe hands to `run`.

    loss_step(batch) gets a collated batch already on the device and returns the scalar loss and
    per-batch metrics (scalar tensors or floats, means over the batch). It runs under autocast;
    the loop calls it with gradients for training and under `torch.no_grad()` for evaluation.
    """

    name: str
    model: torch.nn.Module
    train_data: Sequence[dict]
    collate: Callable[[list[dict]], dict[str, Any]]
    loss_step: LossStep
    eval_data: Sequence[dict] | None = None
    export: Callable[..., None] | None = None  # export(out_dir, dtype=None): the final HF folder
    count_tokens: Callable[[dict[str, Any]], int] = field(default=lambda b: int(b["labels"].ne(-100).sum()))
    on_train_start: Callable[[], None] | None = None
    extras: dict[str, Any] = field(
        default_factory=dict
    )  # recipe objects callers may want (tokenizer, caches)
    runtime: Any = None  # fastalign.trainers.runtime.Local (None) or ZeRO: where the steps run


@dataclass
class RunResult:
    steps: int
    output_dir: Path
    final_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    resumed_from: Path | None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    if mixed_precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step s: linear warmup, then cosine/linear/constant
    decay to `min_ratio` at `total`."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return f


def micro_batch_indices(n: int, batch_size: int, seed: int, k: int) -> list[int]:
    """Rows of micro-batch k (0-based over the whole run); the last one of an epoch may be short."""
    per_epoch = math.ceil(n / batch_size)
    epoch, j = divmod(k, per_epoch)
    g = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[j * batch_size : (j + 1) * batch_size].tolist()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # high-water resident set of this process (Linux)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory window here (not at model loading, whose transient peak would hide the
    training step's): CUDA's allocator stats, or Linux's VmHWM via /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _mean_metrics(acc: dict[str, list[tuple[float, int]]]) -> dict[str, float]:
    return {k: sum(v * w for v, w in xs) / max(1, sum(w for _, w in xs)) for k, xs in acc.items()}


def _add(acc: dict[str, list[tuple[float, int]]], metrics: Mapping[str, Any], weight: int) -> None:
    for k, v in metrics.items():
        v = float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)
        acc.setdefault(k, []).append((v, weight))


def _weight(acc: dict[str, list[tuple[float, int]]]) -> int:
    """Examples behind this rank's step metrics (0 when every slice was padding)."""
    return sum(w for _, w in acc.get("loss", []))


def _batch_size(batch: dict[str, Any]) -> int:
    return int(batch["index"].numel()) if "index" in batch else 1


def evaluate(task: Task, batch_size: int, device: torch.device, amp: torch.dtype | None) -> dict[str, float]:
    """Mean metrics over the eval data (weighted by examples per batch), no gradients."""
    acc: dict[str, list[tuple[float, int]]] = {}
    data = task.eval_data or []
    was_training = task.model.training
    task.model.eval()
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            rows = [data[i] for i in range(start, min(len(data), start + batch_size))]
            batch = to_device(task.collate(rows), device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, metrics = task.loss_step(batch)
            _add(acc, {"loss": loss, **metrics}, _batch_size(batch))
    task.model.train(was_training)
    return _mean_metrics(acc)


def _position(cfg, done: int, steps: int, n_train: int) -> dict[str, Any]:
    """The data position, for people reading trainer_state.json (resume derives it from `step`)."""
    micro = done * cfg.grad_accum
    per_epoch = math.ceil(n_train / cfg.batch_size)
    return {"total_steps": steps, "micro_batches_done": micro, "epoch": micro // per_epoch,
            "batch_in_epoch": micro % per_epoch, "seed": cfg.seed, "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "n_train": n_train}  # fmt: skip


def total_steps(cfg, n_train: int, world: int = 1) -> int:
    """Optimizer steps of the run (`world` ranks each take `batch_size` rows per micro-batch)."""
    if cfg.max_steps is not None:
        return int(cfg.max_steps)
    micro = math.ceil(n_train / (cfg.batch_size * world)) * cfg.epochs
    return max(1, math.ceil(micro / cfg.grad_accum))


def _ndim(p: torch.Tensor) -> int:
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()  # ZeRO-3: p itself is a 0-size shard


def run(cfg, task: Task, *, logger=None) -> RunResult:
    """Train `task` with the `train:` section `cfg` (fastalign.config.TrainConfig).

    Under a `ZeRO` runtime (`task.runtime`) every rank runs this same loop: micro-batch k is the
    global batch of `batch_size × world` rows and each rank trains on its slice (`rows_of`);
    logged metrics are means over ranks, written by rank 0 only."""
    from fastalign.trainers.metrics import MetricsLogger
    from fastalign.trainers.runtime import Local

    rt = task.runtime or Local()
    say = (lambda msg: print(msg, file=sys.stderr)) if rt.is_main else (lambda msg: None)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = rt.device(cfg.device)
    amp = autocast_dtype(cfg.mixed_precision, device)
    if len(task.train_data) == 0:
        raise ValueError(f"{task.name}: the training set is empty")
    torch.manual_seed(cfg.seed)

    model = task.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{task.name}: the model has no trainable parameters")
    decay = [p for p in params if _ndim(p) >= 2]
    no_decay = [p for p in params if _ndim(p) < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=tuple(cfg.adam_betas),
    )
    steps = total_steps(cfg, len(task.train_data), rt.world)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.schedule, warmup, steps, cfg.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    rt.prepare(model, optimizer, scheduler, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
               scaler=scaler)  # fmt: skip

    start_step, resumed = 0, None
    if rt.is_main:  # rank 0 cleans torn / old checkpoints first; the others look after it
        resumed = find_resume_point(out, cfg.resume)
        if cfg.resume == "never" and list_checkpoints(out):
            say(f"[{task.name}] train.resume=never: replacing the old checkpoints in {out}")
            shutil.rmtree(checkpoint_root(out))
    rt.barrier()
    if not rt.is_main:
        resumed = find_resume_point(out, cfg.resume)
    if resumed is not None:
        state = rt.load(resumed)
        start_step = int(state["step"])
        now = _position(cfg, start_step, steps, len(task.train_data))
        changed = [
            k for k in ("seed", "batch_size", "grad_accum", "n_train") if k in state and state[k] != now[k]
        ]
        if changed:
            raise ValueError(
                f"train.resume: {resumed} was written with "
                + ", ".join(f"{k}={state[k]} (now {now[k]})" for k in changed)
                + "; the data order would differ, so the run cannot continue exactly. Restore those "
                "settings, or start over with train.resume=never (or another train.output_dir)."
            )
        say(f"[{task.name}] resumed from {resumed} at step {start_step}")

    owns_logger = logger is None
    if logger is None:
        logger = MetricsLogger(out, tensorboard=cfg.tensorboard, enabled=rt.is_main)
    if resumed is not None:
        logger.truncate_after(start_step)
    elif start_step == 0 and (out / "metrics.jsonl").exists():
        logger.truncate_after(-1)  # a fresh run replaces an old log in the same folder

    if task.on_train_start is not None:
        task.on_train_start()

    bar = None
    show = (cfg.progress and sys.stderr.isatty()) or os.environ.get("FASTALIGN_PROGRESS") == "1"
    if show and rt.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start_step, desc=task.name, dynamic_ncols=True)

    eval_bs = cfg.eval_batch_size or cfg.batch_size
    last: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    t_last, tokens = time.perf_counter(), 0
    reset_peak_memory(device)
    try:
        for step in range(start_step, steps):
            acc: dict[str, list[tuple[float, int]]] = {}
            lr = rt.scheduler.get_last_lr()[0]
            for j in range(cfg.grad_accum):
                k = step * cfg.grad_accum + j
                n_rows = cfg.batch_size * rt.world  # the global micro-batch; each rank takes its slice
                global_rows = micro_batch_indices(len(task.train_data), n_rows, cfg.seed, k)
                rows_idx, real = rt.rows_of(global_rows, cfg.batch_size)
                batch = to_device(task.collate([task.train_data[i] for i in rows_idx]), device)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss, metrics = task.loss_step(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"[{task.name}] non-finite loss {float(loss)} at step {step + 1} "
                        f"(rows {rows_idx[:8]})"
                    )
                rt.backward(loss if real else loss * 0.0)  # a padding slice (short last batch) adds 0
                rt.micro_step()
                _add(acc, {"loss": loss, **metrics}, _batch_size(batch) if real else 0)
                tokens += task.count_tokens(batch) if real else 0
            grad_norm = rt.step()
            done = step + 1

            last = _mean_metrics(acc)
            if rt.distributed:
                last = rt.mean_over_ranks(last, _weight(acc))
            last.update(grad_norm=float(grad_norm), lr=lr)
            if done % cfg.log_every == 0 or done == steps:
                now = time.perf_counter()
                if rt.distributed:  # tokens of all ranks
                    tokens = rt.mean_over_ranks({"t": float(tokens)}, 1.0)["t"] * rt.world
                last.update(
                    tokens_per_s=tokens / max(now - t_last, 1e-9),
                    peak_mem_mb=peak_memory_mb(device),
                    epoch=done * cfg.grad_accum * cfg.batch_size * rt.world / len(task.train_data),
                )
                t_last, tokens = now, 0
                logger.log(done, last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
            if task.eval_data and cfg.eval_every and done % cfg.eval_every == 0 and done != steps:
                eval_metrics = evaluate(task, eval_bs, device, amp)
                logger.log(done, eval_metrics, split="eval")
            if cfg.save_every and done % cfg.save_every == 0 and done != steps:
                state = _position(cfg, done, steps, len(task.train_data))
                rt.save(out, done, state, cfg.keep_last)
        if task.eval_data:
            eval_metrics = evaluate(task, eval_bs, device, amp)
            logger.log(steps, eval_metrics, split="eval")
        if cfg.save_every or resumed is not None:
            state = _position(cfg, steps, steps, len(task.train_data))
            rt.save(out, steps, state, cfg.keep_last)
        if cfg.export and task.export is not None:
            task.export(out / "final", dtype=None if cfg.export_dtype == "auto" else cfg.export_dtype)
    finally:
        if bar is not None:
            bar.close()
        if owns_logger:
            logger.close()
    return RunResult(steps, out, last, eval_metrics, resumed)
