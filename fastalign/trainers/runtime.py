"""Where a recipe runs: one process (`LocalRuntime`) or DeepSpeed ZeRO 0–3 on every rank of a
launcher (`ZeroRuntime`). Both implement the `Runtime` protocol; neither inherits from the other.

A runtime builds models (`init_models()`: sharded under ZeRO-3), frozen copies (`frozen`), and
`Trainable`s: a model with its optimizer and schedule, wrapped in a DeepSpeed engine under ZeRO.
The drivers and recipes talk only to these protocols, so every recipe runs unchanged under
`torchrun` / `deepspeed`:

- `Trainable.backward(loss)` / `micro_step()` / `step() -> grad norm`: Local divides by
  grad_accum, clips and steps AdamW; DeepSpeed scales by its gradient_accumulation_steps, clips and
  steps itself at the accumulation boundary, so the loss is *not* pre-divided there.
- `Trainable.save(folder)` / `load(folder)`: this trainable's part of a checkpoint (Local:
  `model.safetensors` + `optimizer.pt`; ZeRO: the engine's sharded tag folder, collective). The
  checkpoint layout around them belongs to `fastalign.trainers.checkpoint`.
- `rows_of(global_rows)` (each rank's disjoint slice), `mean_over_ranks`, `barrier`, `export`.

`make_runtime(cfg)` picks one from `engine.backend` ("auto": ZeRO when the launcher set WORLD_SIZE > 1).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model

from fastalign import engine
from fastalign.config import TrainConfig
from fastalign.models import save_pretrained


def say(msg: str) -> None:
    """A stderr line from rank 0 only (every rank would print it under a launcher)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    if mixed_precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


class Trainable(Protocol):
    """A trained model with its optimizer and schedule (and engine under ZeRO)."""

    name: str
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any

    @property
    def fwd(self) -> torch.nn.Module:
        """What to call for a forward: the DeepSpeed engine under ZeRO, else the model."""

    @property
    def lr(self) -> float: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def micro_step(self) -> None:
        """After every micro-batch's backward (DeepSpeed counts micro-batches itself)."""

    def step(self, guard: Callable[[torch.Tensor], None] | None = None) -> float:
        """Clip, optimizer step, zero grads, scheduler step; the pre-clip gradient norm. `guard`
        sees the gradient norm before the optimizer step and may raise to stop it (one process;
        under ZeRO the engine has stepped already)."""

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...


def update(t: Trainable, loss: torch.Tensor) -> float:
    """One whole optimizer step on `loss` (grad_accum 1): backward, micro step, step."""
    t.backward(loss)
    t.micro_step()
    return t.step()


class Runtime(Protocol):
    distributed: bool
    rank: int
    world: int
    is_main: bool

    def device(self, cfg_device: str) -> torch.device: ...

    def init_models(self) -> AbstractContextManager: ...

    def frozen(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def trainable(
        self, name: str, model, optimizer, scheduler, *, grad_accum: int, max_grad_norm, scaler=None
    ) -> Trainable: ...

    def forward_module(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def rows_of(self, rows: list[int], batch_size: int) -> tuple[list[int], bool]: ...

    def export(self, model, tokenizer, out_dir: Path, dtype: str | None = None) -> None: ...

    def mean_over_ranks(self, metrics: Mapping[str, float], weight: float) -> dict[str, float]: ...

    def barrier(self) -> None: ...


def make_runtime(cfg) -> Runtime:
    """The runtime of a recipe config (`cfg.engine`, `cfg.train`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.engine.backend == "none" and world > 1:
        raise ValueError(
            f"engine.backend=none under a launcher (WORLD_SIZE={world}): every rank would train alone "
            "and write the same files; use engine.backend=auto or deepspeed, or run without the launcher"
        )
    wants = world > 1 if cfg.engine.backend == "auto" else cfg.engine.backend == "deepspeed"
    if resolve_device(cfg.train.device).type == "cpu":
        # DeepSpeed (imported by transformers' save_pretrained too) warns "Setting accelerator to CPU"
        # on every CPU run unless told; it is what we want, not news
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return ZeroRuntime(cfg) if wants else LocalRuntime()


# ---------------------------------------------------------------------------------------------
# one process
# ---------------------------------------------------------------------------------------------
class LocalTrainable:
    def __init__(self, name, model, optimizer, scheduler, grad_accum: int, max_grad_norm, scaler=None):
        self.name, self.model, self.optimizer, self.scheduler = name, model, optimizer, scheduler
        self.grad_accum, self.max_grad_norm, self.scaler = grad_accum, max_grad_norm, scaler
        self.params = [p for p in model.parameters() if p.requires_grad]

    @property
    def fwd(self) -> torch.nn.Module:
        return self.model

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def backward(self, loss: torch.Tensor) -> None:
        scaled = loss / self.grad_accum
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def micro_step(self) -> None:
        pass

    def step(self, guard: Callable[[torch.Tensor], None] | None = None) -> float:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if guard is not None:
            guard(grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(grad_norm)

    def save(self, folder: Path) -> None:

        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(folder / "model.safetensors"))  # handles tied (shared) tensors
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        torch.save(state, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:

        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(
                f"{folder}: no model.safetensors; the checkpoint was written by a run under a launcher "
                "(resume it with the same launcher and number of ranks)"
            )
        device = next(self.model.parameters()).device
        load_model(self.model, str(weights), strict=True, device=str(device))
        state = torch.load(folder / "optimizer.pt", map_location=device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])


class LocalRuntime:
    """Single process: the loop's behaviour (and numerics) without DeepSpeed."""

    distributed = False
    rank, world, is_main = 0, 1, True

    def device(self, cfg_device: str) -> torch.device:
        return resolve_device(cfg_device)

    def init_models(self) -> AbstractContextManager:
        return nullcontext()

    def frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def trainable(self, name, model, optimizer, scheduler, *, grad_accum, max_grad_norm, scaler=None):
        return LocalTrainable(name, model, optimizer, scheduler, grad_accum, max_grad_norm, scaler)

    def forward_module(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def rows_of(self, rows: list[int], batch_size: int) -> tuple[list[int], bool]:
        return rows, True

    def export(self, model, tokenizer, out_dir: Path, dtype: str | None = None) -> None:
        save_pretrained(model, tokenizer, out_dir, dtype=dtype)
        say(f"saved the trained model to {out_dir} (loads with transformers .from_pretrained)")

    def mean_over_ranks(self, metrics: Mapping[str, float], weight: float) -> dict[str, float]:
        return dict(metrics)

    def barrier(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO on every rank
# ---------------------------------------------------------------------------------------------
class ZeroTrainable:
    def __init__(self, name, model, engine_, optimizer, scheduler):
        self.name, self.model, self.engine = name, model, engine_
        self.optimizer, self.scheduler = optimizer, scheduler

    @property
    def fwd(self) -> torch.nn.Module:
        return self.engine

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself

    def micro_step(self) -> None:
        self.engine.step()  # a real optimizer step only at the accumulation boundary

    def step(self, guard: Callable[[torch.Tensor], None] | None = None) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, folder: Path) -> None:
        # collective; DeepSpeed writes <parent>/<tag>/ (model states + every rank's shards)
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        if not folder.is_dir() or (folder / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"{folder}: no DeepSpeed checkpoint here; it was written by a single-process run "
                "(resume it without the launcher, or start over with train.resume=never)"
            )
        loaded, _ = self.engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise FileNotFoundError(f"{folder}: DeepSpeed found no checkpoint to load")


class ZeroRuntime:
    """DeepSpeed ZeRO 0–3 on every rank (gloo on CPU, nccl on CUDA)."""

    distributed = True

    def __init__(self, cfg) -> None:
        engine.init_distributed()
        self.rank, self.world = engine.rank(), engine.world_size()
        self.is_main = self.rank == 0
        e, t = cfg.engine, cfg.train
        if t.mixed_precision == "fp16":
            raise ValueError(
                "train.mixed_precision=fp16 is not supported with engine.backend=deepspeed; use bf16 or no"
            )
        self.stage = int(e.zero_stage)
        self.ds = engine.build_ds_config(
            e.ds_config,
            stage=self.stage,
            batch_size=t.batch_size,
            grad_accum=t.grad_accum if isinstance(t, TrainConfig) else 1,  # rollout: 1 step per minibatch
            max_grad_norm=t.max_grad_norm,
            bf16=t.mixed_precision == "bf16",
            offload_optimizer=e.offload_optimizer,
            offload_param=e.offload_param,
            lr=t.lr,
            weight_decay=t.weight_decay,
            betas=tuple(t.adam_betas),
            world=self.world,
            hidden_size=_hidden_size(cfg.model),
        )
        engine.preflight(cfg, self.ds, self.world)  # model states vs memory, before any weight is loaded
        self._engines: dict[int, Any] = {}  # id(model) -> its trainable engine

    def device(self, cfg_device: str) -> torch.device:
        if cfg_device not in ("auto", "cpu") and not cfg_device.startswith("cuda"):
            raise ValueError(f"train.device={cfg_device!r}: DeepSpeed runs on 'cpu' or 'cuda'")
        if cfg_device != "cpu" and torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")

    def init_models(self) -> AbstractContextManager:
        return engine.zero_init(self.stage, self.ds)

    def frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.stage != 3:
            return model  # every rank holds the full frozen model anyway
        return engine.build_frozen(model, self.ds)

    def trainable(self, name, model, optimizer, scheduler, *, grad_accum, max_grad_norm, scaler=None):
        # offload_optimizer: cpu -> DeepSpeedCPUAdam over the same parameter groups and schedule
        eng, optimizer, scheduler = engine.build_trainable(model, self.ds, optimizer, scheduler)
        self._engines[id(model)] = eng
        return ZeroTrainable(name, model, eng, optimizer, scheduler)

    def forward_module(self, model: torch.nn.Module) -> torch.nn.Module:
        return self._engines.get(id(model), model)

    def rows_of(self, rows: list[int], batch_size: int) -> tuple[list[int], bool]:
        """This rank's contiguous slice of a global micro-batch of `batch_size × world` rows.

        Rank r gets rows [r·b, (r+1)·b): the 2-rank run sees exactly the micro-batches 2j, 2j+1 of
        a one-process run with grad_accum × 2. A short last batch is split as evenly as possible;
        a rank left with no row repeats the batch's first one with weight 0 (every rank must run
        the same forward calls under ZeRO-3), returned as `real=False`."""
        n, w = len(rows), self.world
        if n >= w * batch_size:
            mine = rows[self.rank * batch_size : (self.rank + 1) * batch_size]
        else:
            base, extra = divmod(n, w)
            start = self.rank * base + min(self.rank, extra)
            mine = rows[start : start + base + (1 if self.rank < extra else 0)]
        return (mine, True) if mine else (rows[:1], False)

    def export(self, model, tokenizer, out_dir: Path, dtype: str | None = None) -> None:
        if hasattr(model, "peft_config"):
            raise ValueError("engine.backend=deepspeed: exporting a LoRA model is not supported yet")
        engine.export_hf(self.forward_module(model), tokenizer, out_dir, dtype=dtype)  # collective
        say(f"saved the trained model to {out_dir} (loads with transformers .from_pretrained)")

    def mean_over_ranks(self, metrics: Mapping[str, float], weight: float) -> dict[str, float]:
        """Weighted mean over ranks (weight: this rank's examples; 0 for a padding slice)."""
        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) * weight for k in keys] + [float(weight)], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}

    def barrier(self) -> None:
        engine.barrier()


def _hidden_size(mcfg) -> int | None:
    """hidden_size of the model's config.json (fills the "auto" ZeRO-3 bucket sizes); None if unknown."""
    f = Path(mcfg.path) / "config.json"
    try:
        return int(json.loads(f.read_text()).get("hidden_size") or 0) or None
    except (OSError, ValueError):
        return None
