"""The gradient-step driver of the offline recipes (SFT, RM, DPO family, KTO).

A recipe builds a `Task` (model, data, collator and its batch → (loss, metrics) step); `run`
does the rest on a `RunSession` (folder, lock, resume, metrics, progress, checkpoints, export):
deterministic data order, gradient accumulation, AdamW with warmup + cosine / linear / constant
schedule (`optim.py`), gradient clipping, mixed precision (bf16 autocast on CUDA), periodic
evaluation. The rollout recipes' driver is `rollout_loop.py`, on the same session.

Exact resume: micro-batch k of the whole run is a pure function of (seed, k) — epoch e uses the
permutation drawn from `seed + e` — and the optimizer step count fixes k, so a run restored from a
checkpoint (model, optimizer, scheduler, RNG) sees the same batches and computes the same losses
as one that was never interrupted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from fastalign.config import TrainConfig
from fastalign.constants import IGNORE_INDEX
from fastalign.trainers.optim import make_optimizer
from fastalign.trainers.runtime import Runtime, autocast_dtype
from fastalign.trainers.session import RunResult, RunSession

LossStep = Callable[[dict[str, Any]], tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]]


@dataclass
class Task:
    """What an offline recipe hands to `run`.

    loss_step(batch) gets a collated batch already on the device and returns the scalar loss and
    per-batch metrics (scalar tensors or floats, means over the batch). It runs under autocast;
    the loop calls it with gradients for training and under `torch.no_grad()` for evaluation.
    The final export (`train.export`) is `runtime.export(model, tokenizer, ...)`.
    """

    name: str
    model: torch.nn.Module
    tokenizer: Any
    runtime: Runtime
    train_data: Sequence[dict]
    eval_data: Sequence[dict] | None
    collate: Callable[[list[dict]], dict[str, Any]]
    loss_step: LossStep
    count_tokens: Callable[[dict[str, Any]], int] = field(
        default=lambda b: int(b["labels"].ne(IGNORE_INDEX).sum())
    )
    on_train_start: Callable[[], None] | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # objects callers may want (loss module, caches)

    def export(self, out_dir, dtype: str | None = None) -> None:
        self.runtime.export(self.model, self.tokenizer, out_dir, dtype=dtype)


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


def _describe(cfg: TrainConfig, steps: int, n_train: int) -> Callable[[int], dict[str, Any]]:
    """The data position after `done` steps, for people reading trainer_state.json (resume derives
    it from `step`)."""

    def describe(done: int) -> dict[str, Any]:
        micro = done * cfg.grad_accum
        per_epoch = math.ceil(n_train / cfg.batch_size)
        return {"total_steps": steps, "micro_batches_done": micro, "epoch": micro // per_epoch,
                "batch_in_epoch": micro % per_epoch}  # fmt: skip

    return describe


def total_steps(cfg, n_train: int, world: int = 1) -> int:
    """Optimizer steps of the run (`world` ranks each take `batch_size` rows per micro-batch)."""
    if cfg.max_steps is not None:
        return int(cfg.max_steps)
    micro = math.ceil(n_train / (cfg.batch_size * world)) * cfg.epochs
    return max(1, math.ceil(micro / cfg.grad_accum))


def run(recipe_cfg: Any, task: Task, session: RunSession | None = None) -> RunResult:
    """Train `task` with the recipe config `recipe_cfg` (its `train:` section drives the loop) on
    `session` (opened here when not given: the registry opens it before the model is loaded).

    Under a ZeRO runtime (`task.runtime`) every rank runs this same loop: micro-batch k is the
    global batch of `batch_size × world` rows and each rank trains on its slice (`rows_of`);
    logged metrics are means over ranks, written by rank 0 only."""
    cfg: TrainConfig = recipe_cfg.train
    rt = task.runtime
    session = session or RunSession(recipe_cfg, task.name)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = rt.device(cfg.device)
    amp = autocast_dtype(cfg.mixed_precision, device)
    n_train = len(task.train_data)
    if n_train == 0:
        raise ValueError(f"{task.name}: the training set is empty")
    if cfg.batch_size * rt.world > n_train:
        session.say(
            f"train.batch_size={cfg.batch_size} x {rt.world} rank(s) is more than the {n_train} training "
            "rows: every step sees the whole set"
        )
    torch.manual_seed(cfg.seed)
    task.model.train()
    steps = total_steps(cfg, n_train, rt.world)
    optimizer, scheduler = make_optimizer(task.model, cfg, steps, name=task.name)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    policy = rt.trainable("policy", task.model, optimizer, scheduler, grad_accum=cfg.grad_accum,
                          max_grad_norm=cfg.max_grad_norm, scaler=scaler)  # fmt: skip
    position = {"seed": cfg.seed, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "n_train": n_train}  # fmt: skip
    try:
        start = session.begin(rt, [policy], steps, position=position, describe=_describe(cfg, steps, n_train))
        if task.on_train_start is not None:
            task.on_train_start()
        last, eval_metrics = _train(cfg, task, rt, policy, session, start, steps, device, amp)
        if task.eval_data:
            eval_metrics = evaluate(task, cfg.eval_batch_size or cfg.batch_size, device, amp)
            session.log(steps, eval_metrics, split="eval")
        session.finish(steps, task.export)
    finally:
        session.close()
    return RunResult(steps, session.out, last, eval_metrics, session.resumed_from)


def _train(cfg, task, rt, policy, session, start, steps, device, amp):
    n_train = len(task.train_data)
    guard = session.guard
    last: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    t_last, tokens = time.perf_counter(), 0
    reset_peak_memory(device)
    for step in range(start, steps):
        acc: dict[str, list[tuple[float, int]]] = {}
        lr = policy.lr
        loss_sum = torch.zeros((), dtype=torch.float64)
        for j in range(cfg.grad_accum):
            k = step * cfg.grad_accum + j
            n_rows = cfg.batch_size * rt.world  # the global micro-batch; each rank takes its slice
            global_rows = micro_batch_indices(n_train, n_rows, cfg.seed, k)
            rows_idx, real = rt.rows_of(global_rows, cfg.batch_size)
            batch = to_device(task.collate([task.train_data[i] for i in rows_idx]), device)
            try:
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss, metrics = task.loss_step(batch)
            except Exception:
                guard.check(step + 1)  # a forward that failed on diverged weights is reported as such
                raise
            loss_sum = loss_sum + loss.detach().double().cpu()
            if j == cfg.grad_accum - 1 and rt.distributed:
                guard.check(step + 1, loss_sum)  # before DeepSpeed's optimizer step (micro_step)
            policy.backward(loss if real else loss * 0.0)  # a padding slice (short last batch) adds 0
            policy.micro_step()
            _add(acc, {"loss": loss, **metrics}, _batch_size(batch) if real else 0)
            tokens += task.count_tokens(batch) if real else 0
        check = None if rt.distributed else partial(guard.check, step + 1, loss_sum)  # before the update
        grad_norm = policy.step(guard=check)
        guard.weights_updated(step + 1)
        done = step + 1
        last = _mean_metrics(acc)
        if rt.distributed:
            last = rt.mean_over_ranks(last, _weight(acc))
        last.update(grad_norm=float(grad_norm), lr=lr)
        logged = done % cfg.log_every == 0 or done == steps
        if logged:
            now = time.perf_counter()
            if rt.distributed:  # tokens of all ranks
                tokens = rt.mean_over_ranks({"t": float(tokens)}, 1.0)["t"] * rt.world
            last.update(
                tokens_per_s=tokens / max(now - t_last, 1e-9),
                peak_mem_mb=peak_memory_mb(device),
                epoch=done * cfg.grad_accum * cfg.batch_size * rt.world / n_train,
            )
            t_last, tokens = now, 0
            session.log(done, last)
        session.step_done(done, last, logged)
        if task.eval_data and cfg.eval_every and done % cfg.eval_every == 0 and done != steps:
            eval_metrics = evaluate(task, cfg.eval_batch_size or cfg.batch_size, device, amp)
            session.log(done, eval_metrics, split="eval")
        session.maybe_save(done, steps)
    return last, eval_metrics
