"""AdamW and the lr schedule, the same for every trainable of every recipe."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from fastalign.config import LoopConfig


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


def _ndim(p: torch.Tensor) -> int:
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()  # ZeRO-3: p itself is a 0-size shard


def _fused_ok(params: list[torch.Tensor]) -> bool | None:
    """AdamW's fused kernel (one pass over each parameter, multi-threaded on CPU) for a model trained
    in one process. Measured on SmolLM2-135M (docs/performance.md): torch's default on CPU is the
    per-parameter loop, which makes full-size temporaries of the largest parameter (216 MB at
    peak for the 113 MB tied embedding) and reads and writes the state several times per step;
    `foreach` is worse (408 MB of temporaries). Under DeepSpeed (a process group exists) the
    engine steps its own flat partitions: the client optimizer is left as torch builds it."""
    if dist.is_available() and dist.is_initialized():
        return None
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


def warmup_steps(tcfg: LoopConfig, total: int) -> int:
    return tcfg.warmup_steps or int(tcfg.warmup_ratio * total)


def make_optimizer(
    model: torch.nn.Module, tcfg: LoopConfig, total_steps: int, lr: float | None = None, name: str = "model"
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters (no weight decay on 1-D ones: norms, biases) and the
    `train.schedule` over `total_steps` optimizer steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{name}: the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if _ndim(p) >= 2], "weight_decay": tcfg.weight_decay},
        {"params": [p for p in params if _ndim(p) < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=tcfg.lr if lr is None else lr, betas=tuple(tcfg.adam_betas), fused=_fused_ok(params)
    )
    schedule = lr_lambda(tcfg.schedule, warmup_steps(tcfg, total_steps), total_steps, tcfg.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def rebase_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer, peak_lr: float) -> None:
    """After a resume: the schedule follows the *current* config. `load_state_dict` restored the
    checkpoint's base lrs and the optimizer's last lr, which would ignore a changed train.lr and
    keep an ended schedule at its final lr when max_steps is extended; the lambdas are this run's
    (built for its horizon), so recompute every group's lr at the restored step."""
    scheduler.base_lrs = [peak_lr for _ in scheduler.base_lrs]
    step = scheduler.last_epoch
    lrs = [base * lam(step) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
