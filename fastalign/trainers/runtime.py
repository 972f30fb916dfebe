"""Where a recipe runs: one process (`Local`) or a DeepSpeed engine on every rank (`ZeRO`).

The loop and the recipes talk to the same few methods, so the recipes run unchanged under
`torchrun` / `deepspeed`:

- `init_models()`: context in which models are built (ZeRO-3: `deepspeed.zero.Init`, sharded).
- `prepare(model, optimizer, scheduler)`: ZeRO wraps the policy in `deepspeed.initialize`;
  `frozen(model)`: a reference model (ZeRO-3: a frozen sharded engine).
- `forward_module(model)`: what to call for a forward (the engine that owns `model`, or `model`).
- `backward(loss)` / `step() -> grad norm`: Local divides by grad_accum, clips and steps AdamW
  exactly as before; DeepSpeed scales by its gradient_accumulation_steps, clips and steps itself
  (at the accumulation boundary), so the loss is *not* pre-divided there.
- `save(...)` / `load(...)`: same `step-N` folder layout; the ZeRO shards go in a `zero/` tag
  folder written collectively, rank 0 writes trainer_state.json.
- `export(model, tokenizer, out)`, `rows_of(global_rows)` (each rank's disjoint slice),
  `mean_over_ranks(metrics, weight)`, `barrier()`, `is_main`.

`make(cfg)` picks one from `engine.backend` ("auto": ZeRO when the launcher set WORLD_SIZE > 1).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import torch


def wants_deepspeed(ecfg) -> bool:
    if ecfg.backend == "auto":
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    return ecfg.backend == "deepspeed"


def make(cfg) -> Local | ZeRO:
    """The runtime of a recipe config (`cfg.engine`, `cfg.train`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.engine.backend == "none" and world > 1:
        raise ValueError(
            f"engine.backend=none under a launcher (WORLD_SIZE={world}): every rank would train alone "
            "and write the same files; use engine.backend=auto or deepspeed, or run without the launcher"
        )
    return ZeRO(cfg) if wants_deepspeed(cfg.engine) else Local()


def log(msg: str) -> None:
    """stderr line from rank 0 only (every rank prints under a launcher otherwise)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr)


class Local:
    """Single process: the behaviour (and numerics) of the loop before ZeRO existed."""

    distributed = False
    rank, world, is_main = 0, 1, True

    def init_models(self):
        return nullcontext()

    def frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def forward_module(self, model):
        return model

    def rows_of(self, rows: list[int], batch_size: int) -> tuple[list[int], bool]:
        return rows, True

    def device(self, cfg_device: str) -> torch.device:
        from fastalign.trainers.loop import resolve_device

        return resolve_device(cfg_device)

    def prepare(self, model, optimizer, scheduler, *, grad_accum: int, max_grad_norm, scaler=None) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_accum, self.max_grad_norm = grad_accum, max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        scaled = loss / self.grad_accum
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def step(self) -> float:
        """Clip, optimizer step, zero grads, scheduler step; the pre-clip gradient norm."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(grad_norm)

    def micro_step(self) -> None:
        """Called after every micro-batch's backward (DeepSpeed counts micro-batches itself)."""

    def save(self, out: Path, step: int, state: dict, keep_last: int) -> Path:
        from fastalign.trainers.checkpoint import save_checkpoint

        return save_checkpoint(
            out, step, self.model, self.optimizer, self.scheduler, state, keep_last, self.scaler
        )

    def load(self, path: Path) -> dict:
        from fastalign.trainers.checkpoint import load_checkpoint

        return load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.scaler)

    def export(self, model, tokenizer, out_dir: Path, dtype: str | None = None) -> None:
        from fastalign.models import save_pretrained

        save_pretrained(model, tokenizer, out_dir, dtype=dtype)
        print(
            f"saved the trained model to {out_dir} (loads with transformers .from_pretrained)",
            file=sys.stderr,
        )

    def mean_over_ranks(self, metrics: Mapping[str, float], weight: float) -> dict[str, float]:
        return dict(metrics)

    def barrier(self) -> None:
        pass


class ZeRO(Local):
    """DeepSpeed ZeRO 0–3 on every rank (gloo on CPU, nccl on CUDA)."""

    distributed = True

    def __init__(self, cfg) -> None:
        from fastalign.engine import build_ds_config, init_distributed, rank, world_size

        init_distributed()
        self.rank, self.world = rank(), world_size()
        self.is_main = self.rank == 0
        e, t = cfg.engine, cfg.train
        if t.mixed_precision == "fp16":
            raise ValueError(
                "train.mixed_precision=fp16 is not supported with engine.backend=deepspeed; use bf16 or no"
            )
        self.stage = int(e.zero_stage)
        self.ds = build_ds_config(
            e.ds_config,
            stage=self.stage,
            batch_size=t.batch_size,
            grad_accum=t.grad_accum,
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
        from fastalign.engine import preflight

        preflight(cfg, self.ds, self.world)  # model states vs memory, before any weight is loaded
        self.engine = None

    def device(self, cfg_device: str) -> torch.device:
        if cfg_device not in ("auto", "cpu") and not cfg_device.startswith("cuda"):
            raise ValueError(f"train.device={cfg_device!r}: DeepSpeed runs on 'cpu' or 'cuda'")
        if cfg_device != "cpu" and torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")

    def init_models(self):
        from fastalign.engine import zero_init

        return zero_init(self.stage, self.ds)

    def frozen(self, model: torch.nn.Module):
        from fastalign.engine import build_frozen

        if self.stage != 3:
            return model  # every rank holds the full frozen model anyway
        return build_frozen(model, self.ds)

    def forward_module(self, model):
        if self.engine is not None and model is self.engine.module:
            return self.engine
        return model

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

    def prepare(self, model, optimizer, scheduler, *, grad_accum: int, max_grad_norm, scaler=None) -> None:
        from fastalign.engine import build_trainable

        # offload_optimizer: cpu -> DeepSpeedCPUAdam over the same parameter groups and schedule
        self.engine, optimizer, scheduler = build_trainable(model, self.ds, optimizer, scheduler)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself

    def micro_step(self) -> None:
        self.engine.step()  # a real optimizer step only at the accumulation boundary

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, out: Path, step: int, state: dict, keep_last: int) -> Path:
        from fastalign.trainers.checkpoint import commit_checkpoint, prepare_checkpoint

        tmp = prepare_checkpoint(out, step) if self.is_main else None
        self.barrier()
        tmp = tmp or Path(out) / "checkpoints" / f"step-{step:08d}.tmp"
        self.engine.save_checkpoint(str(tmp), tag="zero", save_latest=False)  # collective
        torch.save(_rng(), tmp / f"rng_rank{self.rank}.pt")
        self.barrier()
        final = Path(out) / "checkpoints" / f"step-{step:08d}"
        if self.is_main:
            final = commit_checkpoint(out, step, tmp, {**state, "world_size": self.world}, keep_last)
        self.barrier()
        return final

    def load(self, path: Path) -> dict:
        import json

        from fastalign.trainers.checkpoint import _set_rng_state

        path = Path(path)
        if not (path / "zero").is_dir():
            raise FileNotFoundError(
                f"{path}: no DeepSpeed checkpoint (zero/) in it; it was written by a single-process run "
                "(resume it without the launcher, or start over with train.resume=never)"
            )
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("world_size") != self.world:
            raise ValueError(
                f"{path}: written by {state.get('world_size')} ranks, now {self.world}; exact resume needs "
                "the same number of ranks (the data slices differ)"
            )
        loaded, _ = self.engine.load_checkpoint(
            str(path), tag="zero", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise FileNotFoundError(f"{path}/zero: DeepSpeed found no checkpoint to load")
        rng = path / f"rng_rank{self.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=True))
        return state

    def export(self, model, tokenizer, out_dir: Path, dtype: str | None = None) -> None:
        from fastalign.engine import export_hf

        if hasattr(model, "peft_config"):
            raise ValueError("engine.backend=deepspeed: exporting a LoRA model is not supported yet")
        export_hf(self.forward_module(model), tokenizer, out_dir, dtype=dtype)  # collective; rank 0 writes
        log(f"saved the trained model to {out_dir} (loads with transformers .from_pretrained)")

    def mean_over_ranks(self, metrics: Mapping[str, float], weight: float) -> dict[str, float]:
        """Weighted mean over ranks (weight: this rank's examples; 0 for a padding slice)."""
        import torch.distributed as dist

        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) * weight for k in keys] + [float(weight)], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}

    def barrier(self) -> None:
        from fastalign.engine import barrier

        barrier()


def _rng() -> dict:
    from fastalign.trainers.checkpoint import _rng_state

    return _rng_state()


def _hidden_size(mcfg) -> int | None:
    """hidden_size of the model's config.json (fills the "auto" ZeRO-3 bucket sizes); None if unknown."""
    import json

    f = Path(mcfg.path) / "config.json"
    try:
        return int(json.loads(f.read_text()).get("hidden_size") or 0) or None
    except (OSError, ValueError):
        return None
