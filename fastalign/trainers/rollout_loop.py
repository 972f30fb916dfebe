"""The rollout-iteration driver of the online recipes (PPO, GRPO, online DPO): iterations of
rollout → update, on the same `RunSession` as the gradient-step driver (`loop.py`).

A recipe builds a `RolloutAlgo`: its trainables (each with its optimizer, schedule, DeepSpeed
engine), its prompts and `iteration(it, rows) -> metrics`, which samples from the current policy,
scores, and takes its optimizer steps. `run` does the rest:

- iteration `it` takes prompts [it·N, (it+1)·N) of a stream of seeded permutations (epoch e is
  permutation `seed + e`), N = train.batch_size × world; rank r gets its slice (`rows_of`); so the
  prompts of an iteration are a pure function of (seed, it) and a resumed run continues exactly;
- metrics are this rank's, averaged over ranks (weighted by rows), logged by rank 0 at step `it+1`,
  with the reward-hacking watch's warnings (stderr, `warnings.log`, counted as `watch/warnings`);
- the session checkpoints every train.save_every iterations: every trainable, per-rank RNG and the
  recipe's stateful objects (KL controller, reward normaliser, watch).

Iterations: train.max_steps, else ceil(prompts × train.epochs / N). The lr schedule runs over the
optimizer steps of the whole run (iterations × `updates_per_iteration`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastalign.config import RolloutTrainConfig
from fastalign.rollout.watch import RewardHackingWatch
from fastalign.trainers.checkpoint import Stateful
from fastalign.trainers.optim import make_optimizer
from fastalign.trainers.runtime import Runtime, Trainable
from fastalign.trainers.session import RunResult, RunSession


def make_trainable(
    name: str, model: torch.nn.Module, rt: Runtime, tcfg: RolloutTrainConfig, total_updates: int, lr: float
) -> Trainable:
    """AdamW + the train.schedule over `total_updates` steps, one optimizer step per update (ZeRO:
    wrapped in its own engine)."""
    model.train()
    optimizer, scheduler = make_optimizer(model, tcfg, total_updates, lr=lr, name=name)
    return rt.trainable(name, model, optimizer, scheduler, grad_accum=1, max_grad_norm=tcfg.max_grad_norm)


@dataclass
class RolloutAlgo:
    name: str
    rt: Runtime  # rank, world, barrier, mean_over_ranks
    trainables: list[Trainable]
    prompts: Sequence[dict]
    iteration: Callable[[int, list[dict]], dict[str, float]]
    watch: RewardHackingWatch
    state: dict[str, Stateful] = field(default_factory=dict)  # checkpointed beside the trainables
    export: Callable[..., None] | None = None
    peak_lrs: dict[str, float] = field(default_factory=dict)  # trainable name -> its peak lr


def total_iterations(tcfg: RolloutTrainConfig, n_prompts: int, world: int = 1) -> int:
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


def run(recipe_cfg: Any, algo: RolloutAlgo, session: RunSession | None = None) -> RunResult:
    """Run `algo` for its iterations with the recipe config `recipe_cfg` (its `train:` section
    drives the loop) on `session` (opened here when not given); see the module doc."""
    tcfg: RolloutTrainConfig = recipe_cfg.train
    rt = algo.rt
    n = len(algo.prompts)
    iterations = total_iterations(tcfg, n, rt.world)
    session = session or RunSession(recipe_cfg, algo.name)
    position = {"seed": tcfg.seed, "batch_size": tcfg.batch_size, "n_prompts": n}
    last: dict[str, float] = {}
    try:
        start = session.begin(rt, algo.trainables, iterations, position=position, extra=algo.state,
                              describe=lambda it: {"iterations": iterations}, peak_lrs=algo.peak_lrs,
                              unit="iteration")  # fmt: skip
        for it in range(start, iterations):
            global_rows = iteration_rows(n, tcfg.batch_size * rt.world, tcfg.seed, it)
            idx, _ = rt.rows_of(global_rows, tcfg.batch_size)
            try:
                metrics = algo.iteration(it, [algo.prompts[i] for i in idx])
            except Exception:
                session.guard.check(it + 1)  # a failure on diverged weights is reported as such
                raise
            session.guard.weights_updated(it + 1)
            session.guard.check(it + 1, metrics.get("loss"))
            last = rt.mean_over_ranks(metrics, float(len(idx))) if rt.distributed else dict(metrics)
            _global_std(last, "reward", metrics.get("_rows", len(idx)) * rt.world)
            warnings = algo.watch.update(it + 1, last)
            last["watch/warnings"] = float(len(warnings))
            if warnings and rt.is_main:  # also kept beside the metrics (the watch printed them)
                with open(session.out / "warnings.log", "a") as f:
                    f.writelines(w + "\n" for w in warnings)
            logged = (it + 1) % tcfg.log_every == 0 or it + 1 == iterations
            if logged:
                session.log(it + 1, last)
            session.step_done(it + 1, last, logged)
            session.maybe_save(it + 1, iterations)
        session.finish(iterations, algo.export)
    finally:
        session.close()
    return RunResult(iterations, session.out, last, {}, session.resumed_from)


def _global_std(m: dict[str, float], name: str, n: float) -> None:
    """`<name>/std` (unbiased, over all ranks' rows) from the global means of x and x²."""
    sq = m.pop(f"{name}/_sq", None)
    m.pop("_rows", None)
    if sq is not None:
        var = max(sq - m[f"{name}/mean"] ** 2, 0.0) * n / max(n - 1.0, 1.0)
        m[f"{name}/std"] = var**0.5


# ---------------------------------------------------------------------------------------------
# helpers the recipes share
# ---------------------------------------------------------------------------------------------
def global_mean(rt: Runtime, values: Mapping[str, float], weight: float) -> dict[str, float]:
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
