"""The outer loop of the online recipes (PPO, GRPO, online DPO): iterations of rollout → update.

A recipe builds a `RolloutAlgo`: its trainable models (each with its own runtime: optimizer,
scheduler, DeepSpeed engine), its prompts and `iteration(it, rows) -> metrics`, which samples from
the current policy, scores, and takes its optimizer steps. `run` does the rest, with the pieces
of the supervised loop (`loop.lr_lambda`, `MetricsLogger`, the runtimes, checkpoint folders):

- iteration `it` takes prompts [it·N, (it+1)·N) of a stream of seeded permutations (epoch e is
  permutation `seed + e`), N = train.batch_size × world; rank r gets its slice (`rows_of`); so the
  prompts of an iteration are a pure function of (seed, it) and a resumed run continues exactly;
- metrics are this rank's, averaged over ranks (weighted by rows), logged by rank 0 at step `it+1`,
  with the reward-hacking watch's warnings (stderr, `warnings.log`, counted as `watch/warnings`);
- checkpoints every train.save_every iterations: every trainable (Local: `<name>.safetensors` +
  `<name>_optimizer.pt`; ZeRO: the engine's `<name>/` tag folder), per-rank RNG, and the recipe's
  `state` objects (KL controller, reward normaliser, watch) in `rollout_state.pt`; `train.resume`
  as in the supervised loop.

Iterations: train.max_steps, else ceil(prompts × train.epochs / N). The lr schedule runs over the
optimizer steps of the whole run (iterations × `updates_per_iteration`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastalign.trainers.checkpoint import (
    _rng_state,
    _set_rng_state,
    checkpoint_root,
    commit_checkpoint,
    find_resume_point,
    list_checkpoints,
    prepare_checkpoint,
)
from fastalign.trainers.loop import RunResult, lr_lambda


@dataclass
class Trainable:
    """A trainable model and the runtime that owns its optimizer / scheduler / engine."""

    name: str
    model: torch.nn.Module
    rt: Any  # runtime.Local | runtime.ZeRO, `prepare`d for this model

    @property
    def fwd(self):
        """What to call for a forward: the DeepSpeed engine under ZeRO, else the model."""
        return self.rt.forward_module(self.model)

    def step(self, loss: torch.Tensor) -> float:
        """backward + optimizer step + scheduler step; the pre-clip gradient norm."""
        self.rt.backward(loss)
        self.rt.micro_step()
        return self.rt.step()

    @property
    def lr(self) -> float:
        return float(self.rt.scheduler.get_last_lr()[0])


def _ndim(p: torch.Tensor) -> int:
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()


def make_trainable(name: str, model: torch.nn.Module, rt, tcfg, total_updates: int, lr: float) -> Trainable:
    """AdamW (no decay on 1-D parameters) + the train.schedule over `total_updates` steps, prepared
    on `rt` (ZeRO: wrapped in its own engine)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{name}: the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if _ndim(p) >= 2], "weight_decay": tcfg.weight_decay},
        {"params": [p for p in params if _ndim(p) < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(tcfg.adam_betas))
    warmup = tcfg.warmup_steps or int(tcfg.warmup_ratio * total_updates)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(tcfg.schedule, warmup, total_updates, tcfg.min_lr_ratio)
    )
    rt.prepare(model, opt, sched, grad_accum=1, max_grad_norm=tcfg.max_grad_norm)
    return Trainable(name, model, rt)


@dataclass
class RolloutAlgo:
    name: str
    rt: Any  # the policy's runtime: rank, world, barrier, mean_over_ranks
    trainables: list[Trainable]
    prompts: Sequence[dict]
    iteration: Callable[[int, list[dict]], dict[str, float]]
    watch: Any  # RewardHackingWatch
    state: dict[str, Any] = field(default_factory=dict)  # name -> object with state_dict / load_state_dict
    export: Callable[..., None] | None = None


def total_iterations(tcfg, n_prompts: int, world: int = 1) -> int:
    if tcfg.max_steps is not None:
        return int(tcfg.max_steps)
    return max(1, math.ceil(n_prompts * tcfg.epochs / (tcfg.batch_size * world)))


def iteration_rows(n: int, size: int, seed: int, it: int) -> list[int]:
    """Global prompt indices of iteration `it`: positions [it·size, (it+1)·size) of the stream of
    permutations perm(seed + 0) ++ perm(seed + 1) ++ ... (always `size` rows)."""
    out: list[int] = []
    pos = it * size
    while len(out) < size:
        epoch, j = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        take = perm[j : j + size - len(out)]
        out.extend(take)
        pos += len(take)
    return out


def check_train(tcfg, name: str) -> None:
    if tcfg.grad_accum != 1:
        raise ValueError(
            f"train.grad_accum: {name} takes one optimizer step per minibatch (set the minibatches of its "
            f"section instead); expected 1, got {tcfg.grad_accum}"
        )
    if tcfg.mixed_precision == "fp16":
        raise ValueError(f"train.mixed_precision: {name} supports 'auto', 'no' or 'bf16', not 'fp16'")


# ---------------------------------------------------------------------------------------------
# checkpoints: several trainables side by side
# ---------------------------------------------------------------------------------------------
def _save_trainable(t: Trainable, folder: Path) -> None:
    if t.rt.distributed:
        t.rt.engine.save_checkpoint(str(folder), tag=t.name, save_latest=False)  # collective
        return
    from safetensors.torch import save_model

    save_model(t.model, str(folder / f"{t.name}.safetensors"))
    state = {"optimizer": t.rt.optimizer.state_dict(), "scheduler": t.rt.scheduler.state_dict()}
    torch.save(state, folder / f"{t.name}_optimizer.pt")


def _load_trainable(t: Trainable, folder: Path) -> None:
    if t.rt.distributed:
        loaded, _ = t.rt.engine.load_checkpoint(
            str(folder), tag=t.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise FileNotFoundError(f"{folder}/{t.name}: DeepSpeed found no checkpoint to load")
        return
    from safetensors.torch import load_model

    weights = folder / f"{t.name}.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no {weights.name}; was it written by a run under a launcher?")
    device = next(t.model.parameters()).device
    load_model(t.model, str(weights), strict=True, device=str(device))
    state = torch.load(folder / f"{t.name}_optimizer.pt", map_location=device, weights_only=True)
    t.rt.optimizer.load_state_dict(state["optimizer"])
    t.rt.scheduler.load_state_dict(state["scheduler"])


def save(algo: RolloutAlgo, out: Path, it: int, info: dict, keep_last: int) -> Path:
    rt = algo.rt
    tmp = prepare_checkpoint(out, it) if rt.is_main else None
    rt.barrier()
    tmp = tmp or checkpoint_root(out) / f"step-{it:08d}.tmp"
    for t in algo.trainables:
        _save_trainable(t, tmp)
    torch.save(_rng_state(), tmp / f"rng_rank{rt.rank}.pt")
    final = checkpoint_root(out) / f"step-{it:08d}"
    if rt.is_main:
        torch.save({k: v.state_dict() for k, v in algo.state.items()}, tmp / "rollout_state.pt")
        final = commit_checkpoint(out, it, tmp, {**info, "world_size": rt.world}, keep_last)
    rt.barrier()
    return final


def load(algo: RolloutAlgo, path: Path) -> dict:
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size", 1) != algo.rt.world:
        raise ValueError(
            f"{path}: written by {state.get('world_size')} ranks, now {algo.rt.world}; exact resume needs "
            "the same number of ranks (the prompt slices differ)"
        )
    for t in algo.trainables:
        _load_trainable(t, path)
    extra = torch.load(path / "rollout_state.pt", weights_only=True)
    for k, obj in algo.state.items():
        if k in extra:
            obj.load_state_dict(extra[k])
    rng = path / f"rng_rank{algo.rt.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return state


def _resume_point(tcfg, out: Path, rt, say) -> Path | None:
    resumed = None
    if rt.is_main:
        resumed = find_resume_point(out, tcfg.resume)
        if tcfg.resume == "never" and list_checkpoints(out):
            say(f"train.resume=never: replacing the old checkpoints in {out}")
            shutil.rmtree(checkpoint_root(out))
    rt.barrier()
    if not rt.is_main:
        resumed = find_resume_point(out, tcfg.resume)
    return resumed


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def run(tcfg, algo: RolloutAlgo) -> RunResult:
    """Run `algo` for its iterations with the `train:` section `tcfg`; see the module doc."""
    from fastalign.trainers.metrics import MetricsLogger

    rt = algo.rt
    say = (lambda m: print(f"[{algo.name}] {m}", file=sys.stderr)) if rt.is_main else (lambda m: None)
    out = Path(tcfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(algo.prompts)
    iterations = total_iterations(tcfg, n, rt.world)
    info = {"seed": tcfg.seed, "batch_size": tcfg.batch_size, "n_prompts": n, "iterations": iterations}

    start, resumed = 0, _resume_point(tcfg, out, rt, say)
    if resumed is not None:
        state = load(algo, resumed)
        changed = [k for k in ("seed", "batch_size", "n_prompts") if k in state and state[k] != info[k]]
        if changed:
            raise ValueError(
                f"train.resume: {resumed} was written with "
                + ", ".join(f"{k}={state[k]} (now {info[k]})" for k in changed)
                + "; the prompt order would differ. Restore those settings, or start over with "
                "train.resume=never (or another train.output_dir)."
            )
        start = int(state["step"])
        say(f"resumed from {resumed} at iteration {start}")

    logger = MetricsLogger(out, tensorboard=tcfg.tensorboard, enabled=rt.is_main)
    if resumed is not None:
        logger.truncate_after(start)
    elif (out / "metrics.jsonl").exists():
        logger.truncate_after(-1)
    last: dict[str, float] = {}
    try:
        for it in range(start, iterations):
            global_rows = iteration_rows(n, tcfg.batch_size * rt.world, tcfg.seed, it)
            idx, _ = rt.rows_of(global_rows, tcfg.batch_size)
            metrics = algo.iteration(it, [algo.prompts[i] for i in idx])
            last = rt.mean_over_ranks(metrics, float(len(idx))) if rt.distributed else dict(metrics)
            _global_std(last, "reward", metrics.get("_rows", len(idx)) * rt.world)
            warnings = algo.watch.update(it + 1, last)
            last["watch/warnings"] = float(len(warnings))
            if warnings and rt.is_main:  # also kept beside the metrics (the watch printed them)
                with open(out / "warnings.log", "a") as f:
                    f.writelines(w + "\n" for w in warnings)
            if (it + 1) % tcfg.log_every == 0 or it + 1 == iterations:
                logger.log(it + 1, last)
            if tcfg.progress:
                say(f"iteration {it + 1}/{iterations}: " + _summary(last))
            if tcfg.save_every and (it + 1) % tcfg.save_every == 0 and it + 1 != iterations:
                save(algo, out, it + 1, info, tcfg.keep_last)
        if tcfg.save_every or resumed is not None:
            save(algo, out, iterations, info, tcfg.keep_last)
        if tcfg.export and algo.export is not None:
            algo.export(out / "final", dtype=None if tcfg.export_dtype == "auto" else tcfg.export_dtype)
    finally:
        logger.close()
    return RunResult(iterations, out, last, {}, resumed)


def _global_std(m: dict[str, float], name: str, n: float) -> None:
    """`<name>/std` (unbiased, over all ranks' rows) from the global means of x and x²."""
    sq = m.pop(f"{name}/_sq", None)
    m.pop("_rows", None)
    if sq is not None:
        var = max(sq - m[f"{name}/mean"] ** 2, 0.0) * n / max(n - 1.0, 1.0)
        m[f"{name}/std"] = var**0.5


def _summary(m: Mapping[str, float]) -> str:
    keys = ("reward/mean", "kl", "loss", "response/length")
    return ", ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


# ---------------------------------------------------------------------------------------------
# helpers the recipes share
# ---------------------------------------------------------------------------------------------
def global_mean(rt, values: Mapping[str, float], weight: float) -> dict[str, float]:
    """Weighted mean over ranks (collective under ZeRO; identity in one process)."""
    return rt.mean_over_ranks(values, weight) if rt.distributed else dict(values)


def minibatch_indices(n: int, minibatches: int, seed: int) -> list[list[int]]:
    """`minibatches` disjoint chunks of a seeded permutation of range(n) (equal sizes ±1; the same
    chunk sizes on every rank, so the collective forwards line up)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(minibatches, n)
    base, extra = divmod(n, k)
    out, pos = [], 0
    for j in range(k):
        size = base + (1 if j < extra else 0)
        out.append(perm[pos : pos + size])
        pos += size
    return out


def mean_metrics(acc: list[Mapping[str, Any]]) -> dict[str, float]:
    """Plain mean of per-minibatch metric dicts (tensors or floats)."""
    keys = {k for m in acc for k in m}
    out = {}
    for k in keys:
        vals = [
            float(m[k].detach().float().mean()) if torch.is_tensor(m[k]) else float(m[k])
            for m in acc
            if k in m
        ]
        out[k] = sum(vals) / len(vals)
    return out


def generation_seed(seed: int, it: int, rank: int) -> int:
    """Seed of iteration `it`'s sampling on `rank` (generate() adds the batch index)."""
    return (seed + 1) * 1_000_003 + it * 10_007 + rank * 1_009


@dataclass
class Setup:
    """What every online recipe loads: runtime, device, tokenizer, policy, prompts, frozen reference
    (or None), reward scorer and the watch."""

    rt: Any
    device: torch.device
    tok: Any
    model: torch.nn.Module
    prompts: list[dict]
    ref: Any
    scorer: Any
    watch: Any


def setup(cfg, name: str, reference: str | None, *, with_ref: bool = True) -> Setup:
    """Load the pieces in a fixed order (every rank builds the same ZeRO-3 engines in the same
    order: policy, reference, reward models)."""
    from fastalign.data.prompts import load_prompts
    from fastalign.rollout.rewards import RewardScorer
    from fastalign.rollout.watch import RewardHackingWatch
    from fastalign.trainers import common
    from fastalign.trainers.runtime import log

    check_train(cfg.train, name)
    torch.manual_seed(cfg.train.seed)
    rt, device, tok, model = common.setup(cfg)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not cfg.data.train:
        raise ValueError(
            "data.train: no prompt file given (JSONL / JSON / parquet / CSV with a 'prompt' column)"
        )
    prompts, report = load_prompts(
        cfg.data.train,
        tok,
        max_prompt_length=cfg.data.max_prompt_length,
        columns=dict(cfg.data.columns) or None,
        chat_template=cfg.data.chat_template,
        strict=cfg.data.strict,
        max_rows=cfg.data.max_rows,
        split=cfg.data.split,
    )
    log(f"[{name}] prompts {cfg.data.train}: {report.summary()}")
    ref = common.load_frozen_lm(reference or cfg.model.path, cfg.model, device, rt) if with_ref else None
    scorer = RewardScorer(cfg.reward, device=device, runtime=rt, seed=cfg.train.seed)
    return Setup(rt, device, tok, model, prompts, ref, scorer, RewardHackingWatch(cfg.watch))
