"""GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025) and RLOO (Ahmadian et al. 2024).

Each iteration samples `grpo.group_size` responses per prompt (one group per prompt, all on the
rank that holds the prompt), scores them, and turns each group's rewards into one advantage per
sequence — no value model:

    grpo     (r − mean) / (std + 1e-6)   agg "seq-mean-token-mean"
    dr_grpo  r − mean                    agg "seq-mean-token-sum-norm" (no length / std bias)
    rloo     r − mean of the others      agg "token-mean"

(`grpo.agg` overrides the aggregation). The KL to the reference is in the loss, not the reward:
`FusedLinearPolicyLoss(kl_coef=kl.coef, kl_kind=kl.estimator)` (k3 by default), same temperature
as sampling. `grpo.epochs` × `grpo.minibatches` = 1 is on-policy (ratio 1); more reuse the batch
with PPO clipping (`clip_eps`, `clip_eps_high`).
"""

from __future__ import annotations

from typing import Any

import torch

from fastalign.config import GRPORecipe
from fastalign.engine.forward import fused_head_loss
from fastalign.losses import FusedLinearPolicyLoss
from fastalign.losses.policy import grpo_advantages, rloo_advantages
from fastalign.rollout.experience import make_experience, select
from fastalign.trainers import rollout_loop as rl
from fastalign.trainers.runtime import update
from fastalign.trainers.setup import export_fn, setup_online

AUTO_AGG = {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm", "rloo": "token-mean"}


def group_advantages(scores: torch.Tensor, group_size: int, estimator: str) -> torch.Tensor:
    """(B·G,) advantages of consecutive groups of `group_size` scores."""
    if estimator == "rloo":
        return rloo_advantages(scores, group_size)
    return grpo_advantages(scores, group_size, scale="std" if estimator == "grpo" else "none")


def build(cfg: GRPORecipe) -> rl.RolloutAlgo:
    g = cfg.grpo
    s = setup_online(cfg, "grpo", g.reference)
    iters = rl.total_iterations(cfg.train, len(s.prompts), s.rt.world)
    n_rows = cfg.train.batch_size * g.group_size
    total = iters * g.epochs * min(g.minibatches, n_rows)
    policy = rl.make_trainable("policy", s.model, s.rt, cfg.train, total, cfg.train.lr)
    loss_fn = FusedLinearPolicyLoss(
        clip_eps=g.clip_eps,
        clip_eps_high=g.clip_eps_high,
        kl_coef=cfg.kl.coef,
        kl_kind=cfg.kl.estimator,
        entropy_coef=g.entropy_coef,
        temperature=cfg.generation.temperature,
        agg=AUTO_AGG[g.estimator] if g.agg == "auto" else g.agg,
        grad_filter=cfg.train.grad_filter,
    )
    seed = cfg.train.seed

    def policy_loss(mb: dict[str, Any], adv: torch.Tensor):
        def fn(hidden, weight, bias):
            labels, ref = mb["labels"][:, 1:], mb.get("ref_logps")
            return loss_fn(hidden, weight, labels, mb["old_logps"], adv, mb["mask"], bias=bias, ref_logps=ref)

        return fused_head_loss(policy.fwd, mb, fn)

    def iteration(it: int, rows: list[dict]) -> dict[str, float]:
        grouped = [r for r in rows for _ in range(g.group_size)]  # group i = rows [iG, (i+1)G)
        exp = make_experience(
            policy.fwd, s.tok, grouped, cfg.generation, s.scorer, ref=s.ref,
            seed=rl.generation_seed(seed, it, s.rt.rank), device=s.device,
        )  # fmt: skip
        adv = group_advantages(exp.scores, g.group_size, g.estimator).to(s.device)  # (B·G,)
        acc: list[dict[str, Any]] = []
        for epoch in range(g.epochs):
            for idx in rl.minibatch_indices(len(exp), g.minibatches, seed + 7919 * it + epoch):
                loss, st = policy_loss(select(exp, idx), adv[idx])
                gn = update(policy, loss)
                acc.append({
                    "loss": loss.detach(), "policy/clipfrac": st["clipfrac"],
                    "policy/approx_kl": st["approx_kl"], "policy/kl_loss_term": st.get("kl", 0.0),
                    "grad_norm": gn,
                })  # fmt: skip
        flat = adv.view(-1, g.group_size)
        solved = float((flat.abs().sum(-1) == 0).float().mean())  # groups with no signal
        return {
            **exp.metrics,
            **rl.mean_metrics(acc),
            "kl_coef": cfg.kl.coef,
            "grpo/zero_adv_groups": solved,
            "lr": policy.lr,
        }

    return rl.RolloutAlgo(
        name=f"grpo/{g.estimator}",
        rt=s.rt,
        trainables=[policy],
        prompts=s.prompts,
        iteration=iteration,
        watch=s.watch,
        state={"scorer": s.scorer, "watch": s.watch},
        export=export_fn(s.model, s.tok, s.rt),
    )
