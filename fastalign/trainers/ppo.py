"""PPO with policy, reference, reward and value models (Ouyang et al. 2022, InstructGPT stage 3).

Each iteration (`fastalign.trainers.rollout_loop`): sample one response per prompt, score it
(`RewardScorer`), per-token reward r_t = −β·k1_t plus the score on the last response token
(`kl_penalty_rewards`, β from the fixed or adaptive KL controller), critic values V_t, GAE
(`fastalign.ops.gae`, γ, λ) → advantages (whitened over the global batch) and returns, then
`ppo.epochs` × `ppo.minibatches` updates: the clipped surrogate + entropy bonus on the fused path
(`FusedLinearPolicyLoss`, same temperature as sampling) and the clipped value loss. The epoch loop
stops early when the policy's approx KL (mean over ranks) passes `ppo.target_kl`. The controller
is then updated with the batch's mean sequence KL.

Value model (`ppo.value_model`): "separate" — a `ValueHeadModel` (backbone + Linear(H, 1)) with its
own optimizer / DeepSpeed engine; "shared" — a Linear(H, 1) head on the policy's last hidden
states, trained with the policy in one backward (loss = policy + vf_coef · value). Under ZeRO-3
the policy and value are trainable engines, the reference and reward models frozen engines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from fastalign.config import PPORecipe
from fastalign.engine.forward import fused_head_loss, shifted_hidden_states
from fastalign.engine.gather import gathered_params
from fastalign.losses import FusedLinearPolicyLoss
from fastalign.losses.policy import value_loss
from fastalign.models import ValueHeadModel, resolve_model_path, unwrap_model
from fastalign.models.export import VALUE_HEAD_FILE
from fastalign.ops import gae
from fastalign.rollout.experience import make_experience, select, value_predictions
from fastalign.rollout.kl_control import kl_penalty_rewards, make_kl_controller
from fastalign.trainers import rollout_loop as rl
from fastalign.trainers.runtime import Runtime, Trainable, update
from fastalign.trainers.setup import OnlineSetup, export_fn, setup_online


def whiten(x: torch.Tensor, mask: torch.Tensor, rt: Runtime | None = None, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the valid tokens of the GLOBAL batch (sums all-reduced across ranks
    under a launcher), 0 elsewhere: every rank then scales its advantages identically."""
    m = mask.to(torch.float64)
    xd = torch.where(mask, x, 0.0).to(torch.float64)
    stats = torch.stack([m.sum(), xd.sum(), (xd * xd).sum()])  # (3,)
    if rt is not None and rt.distributed:
        dist.all_reduce(stats)
    n, s, ss = stats.tolist()
    n = max(n, 1.0)
    mean = s / n
    var = max(ss / n - mean * mean, 0.0) * n / max(n - 1.0, 1.0)  # unbiased, as torch.var
    out = (x.to(torch.float64) - mean) / (var**0.5 + eps)
    return torch.where(mask, out, 0.0).to(x.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(returns − values) / Var(returns) over valid tokens (1: perfect critic, ≤ 0: useless)."""
    r, v = returns[mask].double(), values[mask].double()
    if r.numel() < 2:
        return 0.0
    var = r.var()
    return float(1.0 - (r - v).var() / var) if var > 0 else 0.0


def _value_model(cfg: PPORecipe, s: OnlineSetup, total: int) -> Trainable | None:
    """The separate critic: ValueHeadModel from ppo.value_path / the first reward-model folder /
    the policy's folder, with its own optimizer (ZeRO: its own engine). None for a shared head."""
    if cfg.ppo.value_model != "separate":
        return None
    path = cfg.ppo.value_path
    if path is None:
        path = next((m for m in cfg.reward.models if not m.startswith("pypi:")), cfg.model.path)
    rt = s.rt
    folder, _ = resolve_model_path(path)
    with rt.init_models():
        vm = ValueHeadModel.from_pretrained(
            folder,
            dtype=cfg.model.dtype,
            attn_implementation=cfg.model.attn_implementation,
            device=str(s.device),
        )
    saved = Path(folder) / VALUE_HEAD_FILE
    init_value_head(vm.value_head, cfg.train.seed + 17, load_file(str(saved)) if saved.is_file() else None)
    return rl.make_trainable("value", vm, rt, cfg.train, total, cfg.ppo.value_lr or cfg.train.lr)


def init_value_head(head: torch.nn.Linear, seed: int, state: dict | None = None) -> None:
    """Set a value head to `state` (a saved head) or to a seeded N(0, 1/(H+1)) weight and zero bias
    (ValueHeadModel's init). Done here, under a gather, because inside `zero.Init` a submodule's
    parameters are already partitioned when the parent's __init__ would initialise them; so the
    same seed gives the same head with and without ZeRO-3 (collective under ZeRO-3)."""
    h = head.in_features
    with gathered_params([head.weight, head.bias], modifier_rank=0), torch.no_grad():
        if state is not None:
            w, b = state["weight"], state["bias"]
        else:
            w = torch.randn(1, h, generator=torch.Generator().manual_seed(seed)) / (h + 1)
            b = torch.zeros(1)
        head.weight.copy_(w.reshape(head.weight.shape).to(head.weight.dtype))
        head.bias.copy_(b.reshape(head.bias.shape).to(head.bias.dtype))


def _shared_head(cfg: PPORecipe, s: OnlineSetup) -> None:
    """Attach `value_head` (Linear(H, 1)) to the policy: values from its last hidden states."""
    with s.rt.init_models():
        head = torch.nn.Linear(s.model.config.hidden_size, 1, device=s.device)
    init_value_head(head, cfg.train.seed + 17)
    if not hasattr(head.weight, "ds_id"):
        head.to(next(s.model.parameters()).dtype)
    s.model.add_module("value_head", head)


def _policy_forward(fwd, mb: dict[str, Any], loss_fn, adv: torch.Tensor, shared: bool):
    """(policy loss, stats, values or None) for a minibatch; values from the shared head."""
    labels = mb["labels"][:, 1:]

    def losses(hidden, weight, bias):  # hidden (b, T-1, H)
        loss, stats = loss_fn(hidden, weight, labels, mb["old_logps"], adv, mb["mask"], bias=bias)
        values = None
        if shared:
            head = unwrap_model(fwd).value_head
            values = head(hidden.to(head.weight.dtype)).squeeze(-1).float()  # (b, T-1)
        return loss, stats, values

    return fused_head_loss(fwd, mb, losses)


def build(cfg: PPORecipe) -> rl.RolloutAlgo:
    p = cfg.ppo
    s = setup_online(cfg, "ppo", p.reference)
    shared = p.value_model == "shared"
    if shared:
        _shared_head(cfg, s)
    iters = rl.total_iterations(cfg.train, len(s.prompts), s.rt.world)
    total = iters * p.epochs * min(p.minibatches, cfg.train.batch_size)
    policy = rl.make_trainable("policy", s.model, s.rt, cfg.train, total, cfg.train.lr)
    value = _value_model(cfg, s, total)
    trainables = [policy] if value is None else [policy, value]
    ctl = make_kl_controller(cfg.kl)
    loss_fn = FusedLinearPolicyLoss(
        clip_eps=p.clip_eps,
        entropy_coef=p.entropy_coef,
        temperature=cfg.generation.temperature,
        grad_filter=cfg.train.grad_filter,
    )
    seed = cfg.train.seed

    def critic(batch) -> torch.Tensor:
        if shared:
            hidden = shifted_hidden_states(policy.fwd, batch)
            head = s.model.value_head
            return head(hidden.to(head.weight.dtype)).squeeze(-1).float()
        return value_predictions(value.fwd, batch)

    def iteration(it: int, rows: list[dict]) -> dict[str, float]:
        exp = make_experience(
            policy.fwd, s.tok, rows, cfg.generation, s.scorer, ref=s.ref,
            seed=rl.generation_seed(seed, it, s.rt.rank), device=s.device,
        )  # fmt: skip
        with torch.no_grad():
            exp.values = torch.where(exp.mask, critic(exp.batch), 0.0)  # (B, T-1)
            rewards = kl_penalty_rewards(
                exp.old_logps, exp.ref_logps, exp.mask, ctl.value, cfg.kl.estimator, exp.scores
            )
            adv, returns = gae(rewards, exp.values, exp.mask, gamma=p.gamma, lam=p.lam)
            if p.whiten_advantages:
                adv = whiten(adv, exp.mask, s.rt)
        acc: list[dict[str, Any]] = []
        epochs_done = 0
        for epoch in range(p.epochs):
            epoch_acc = []
            for idx in rl.minibatch_indices(len(exp), p.minibatches, seed + 7919 * it + epoch):
                mb = select(exp, idx)
                width = mb["mask"].shape[1]
                mb_adv, mb_ret = adv[idx][:, :width], returns[idx][:, :width]
                pg, st, v_new = _policy_forward(policy.fwd, mb, loss_fn, mb_adv, shared)
                if not shared:
                    v_new = value_predictions(value.fwd, mb)
                vf, vst = value_loss(v_new, mb["values"], mb_ret, mb["mask"], clip_eps=p.value_clip)
                if shared:
                    gn = update(policy, pg + p.vf_coef * vf)
                else:
                    gn = update(policy, pg)
                    update(value, p.vf_coef * vf)
                epoch_acc.append({
                    "loss": pg.detach() + p.vf_coef * vf.detach(), "policy/loss": pg.detach(),
                    "policy/clipfrac": st["clipfrac"], "policy/approx_kl": st["approx_kl"],
                    "value/loss": vf.detach(), "value/clipfrac": vst["clipfrac"], "grad_norm": gn,
                })  # fmt: skip
            acc.extend(epoch_acc)
            epochs_done += 1
            if p.target_kl is not None:
                akl = rl.mean_metrics(epoch_acc)["policy/approx_kl"]
                if rl.global_mean(s.rt, {"k": akl}, 1.0)["k"] > p.target_kl:
                    break
        seq_kl = rl.global_mean(s.rt, {"kl": exp.metrics["kl"]}, float(len(exp)))["kl"]
        kl_coef = ctl.value
        ctl.update(seq_kl, len(exp) * s.rt.world)
        return {
            **exp.metrics,
            **rl.mean_metrics(acc),
            "kl_coef": kl_coef,
            "value/explained_var": explained_variance(exp.values, returns, exp.mask),
            "ppo/epochs": float(epochs_done),
            "lr": policy.lr,
        }

    def export(out_dir, dtype=None):
        head = s.model._modules.pop("value_head", None)  # the exported policy is a plain causal LM
        try:
            export_fn(s.model, s.tok, s.rt)(out_dir, dtype=dtype)
        finally:
            if head is not None:
                s.model.add_module("value_head", head)

    return rl.RolloutAlgo(
        name="ppo",
        rt=s.rt,
        trainables=trainables,
        prompts=s.prompts,
        iteration=iteration,
        watch=s.watch,
        state={"kl_controller": ctl, "scorer": s.scorer, "watch": s.watch},
        export=export,
        peak_lrs={"value": cfg.ppo.value_lr or cfg.train.lr},
    )
