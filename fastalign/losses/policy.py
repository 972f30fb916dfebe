"""Policy-gradient losses and advantage estimators for PPO / GRPO / RLOO (plain PyTorch).

All per-token tensors are (B, T) with right padding described by `mask` (bool or 0/1 float);
positions where the mask is 0 contribute nothing (they are excluded with `torch.where`, so
garbage such as -inf log-probs in the padding cannot turn the loss into NaN).

    ppo_policy_loss   clipped surrogate (PPO, Schulman et al. 2017), asymmetric clip
                      (clip_eps_high, "clip-higher" of DAPO) and dual clip (Ye et al. 2020)
    value_loss        clipped value loss, ½·max((V − R)², (clip(V, V_old ± ε) − R)²)
    grpo_advantages   group-normalised rewards (GRPO; scale="none" is Dr. GRPO)
    rloo_advantages   leave-one-out baseline (RLOO, Ahmadian et al. 2024)

Aggregation (`agg`) of a per-token loss L (B, T) with mask m:

    "token-mean"               Σ L·m / Σ m                     (every valid token weighs the same)
    "seq-mean-token-sum"       mean_b Σ_t L·m                  (per-sequence sum, then mean)
    "seq-mean-token-mean"      mean_b (Σ_t L·m / Σ_t m)        (per-sequence mean, then mean)
    "seq-mean-token-sum-norm"  mean_b (Σ_t L·m / T)            (Dr. GRPO: a constant
                               normaliser, T = the padded length of this batch, mask.shape[-1],
                               so no length bias; the constant only rescales the gradient)

The mean over sequences runs over all B rows (as in verl); an all-padding row contributes 0
(its token count is clamped to 1). An all-padding batch gives a loss of exactly 0.
"""

from __future__ import annotations

import math

import torch

AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
SCALES = ("std", "none")
# Log-ratios are clamped to ±_MAX_LOG_RATIO before exp, so a stale / diverged token gives a
# large but finite ratio (e^20 ≈ 5e8) instead of inf (and inf · 0 = NaN when A = 0).
_MAX_LOG_RATIO = 20.0


# ---------------------------------------------------------------------------------------------
# validation + masked helpers
# ---------------------------------------------------------------------------------------------
def _check_tensor(x, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() and bool(torch.isnan(x).any()):
        raise ValueError(f"{op}: {name} contains NaN")
    return x


def _check_same_shape(ref_name: str, ref: torch.Tensor, op: str, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.shape != ref.shape:
            raise ValueError(
                f"{op}: {name} shape {tuple(t.shape)} must equal {ref_name} shape {tuple(ref.shape)}"
            )


def _check_mask(mask, shape: torch.Size, op: str) -> torch.Tensor:
    mask = _check_tensor(mask, "mask", op)
    if mask.shape != shape:
        raise ValueError(f"{op}: mask shape {tuple(mask.shape)} must equal {tuple(shape)}")
    return mask != 0


def _check_agg(agg: str, op: str) -> None:
    if agg not in AGGS:
        raise ValueError(f"{op}: agg must be one of {AGGS}, got {agg!r}")


def _check_eps(value, name: str, op: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"{op}: {name} must be a finite number ≥ 0, got {value!r}")
    return v


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of x over valid positions; 0 when there are none."""
    return torch.where(valid, x, 0.0).sum() / valid.sum().clamp_min(1)


def aggregate(loss: torch.Tensor, valid: torch.Tensor, agg: str) -> torch.Tensor:
    """Reduce a per-token loss (B, T) over the valid positions with one of AGGS (see module doc)."""
    _check_agg(agg, "aggregate")
    per_token = torch.where(valid, loss, 0.0)
    if agg == "token-mean":
        return per_token.sum() / valid.sum().clamp_min(1)
    seq_sum = per_token.sum(-1)  # (B,)
    if agg == "seq-mean-token-sum":
        seq = seq_sum
    elif agg == "seq-mean-token-mean":
        seq = seq_sum / valid.sum(-1).clamp_min(1)
    else:  # seq-mean-token-sum-norm
        seq = seq_sum / max(loss.shape[-1], 1)
    return seq.mean() if seq.numel() else seq.sum()


def _check_2d(x: torch.Tensor, name: str, op: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D (B, T), got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# PPO policy loss
# ---------------------------------------------------------------------------------------------
def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate loss.

    With ρ = exp(logps − old_logps) (log-ratio clamped to ±20, 0 on padding):

        L_t = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε_high))
        dual clip (c > 1), for A < 0 only:  L_t = min(L_t, −A·c)

    Args:
        logps: (B, T) log-probs of the taken tokens under the current policy (differentiable).
        old_logps: (B, T) log-probs under the policy that sampled the tokens (treated as data).
        advantages: (B, T), or (B,) for one advantage per sequence (GRPO / RLOO), broadcast.
        mask: (B, T) bool or 0/1, 1 on the response tokens to train on.
        clip_eps: ε, the lower (and by default upper) clip range.
        clip_eps_high: ε_high for the upper clip (DAPO "clip-higher"); defaults to clip_eps.
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by −A·c (Ye et al. 2020).
        agg: "token-mean" | "seq-mean-token-sum" | "seq-mean-token-mean" |
            "seq-mean-token-sum-norm" (see the module docstring).

    Returns:
        (loss, stats): a 0-d loss, and detached 0-d tensors `clipfrac` (fraction of valid tokens
        where the clipped term is the active one), `approx_kl` (k3 estimate of KL(old ‖ new),
        (ρ − 1) − log ρ, masked mean), `ratio_mean`, `ratio_max` (masked; 0 with no valid
        token), plus `dual_clipfrac` when dual_clip is set.

    Raises:
        ValueError: unknown agg, shape mismatch, NaN in an input, bad clip settings.
    """
    op = "ppo_policy_loss"
    _check_tensor(logps, "logps", op)
    _check_tensor(old_logps, "old_logps", op)
    _check_tensor(advantages, "advantages", op)
    _check_2d(logps, "logps", op)
    _check_same_shape("logps", logps, op, old_logps=old_logps)
    valid = _check_mask(mask, logps.shape, op)
    if advantages.shape == logps.shape[:1]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != logps.shape:
        raise ValueError(
            f"{op}: advantages shape {tuple(advantages.shape)} must be {tuple(logps.shape)} "
            f"or ({logps.shape[0]},)"
        )
    _check_agg(agg, op)
    eps_low = _check_eps(clip_eps, "clip_eps", op)
    eps_high = eps_low if clip_eps_high is None else _check_eps(clip_eps_high, "clip_eps_high", op)
    if dual_clip is not None and not (math.isfinite(float(dual_clip)) and float(dual_clip) > 1.0):
        raise ValueError(f"{op}: dual_clip must be a finite number > 1, got {dual_clip!r}")

    adv = advantages.detach().to(logps.dtype)
    log_ratio = torch.where(valid, logps - old_logps.detach().to(logps.dtype), 0.0)
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(pg1, pg2)
    stats: dict[str, torch.Tensor] = {}
    if dual_clip is not None:
        pg3 = -adv * float(dual_clip)
        negative = (adv < 0).expand_as(per_token)
        stats["dual_clipfrac"] = _masked_mean((negative & (per_token > pg3)).to(logps.dtype), valid).detach()
        per_token = torch.where(negative, torch.minimum(per_token, pg3), per_token)
    loss = aggregate(per_token, valid, agg)

    with torch.no_grad():
        r, lr = ratio.detach(), log_ratio.detach()
        stats["clipfrac"] = _masked_mean((pg2 > pg1).to(r.dtype), valid)
        stats["approx_kl"] = _masked_mean((r - 1.0) - lr, valid)
        stats["ratio_mean"] = _masked_mean(r, valid)
        stats["ratio_max"] = torch.where(valid, r, 0.0).amax() if r.numel() else r.new_zeros(())
    return loss, stats


# ---------------------------------------------------------------------------------------------
# value loss
# ---------------------------------------------------------------------------------------------
def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ½·max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²), aggregated
    over the valid tokens with `agg` (see the module docstring).

    Args:
        values: (B, T) current value predictions (differentiable).
        old_values: (B, T) predictions at rollout time; returns: (B, T) targets (both data).
        mask: (B, T) bool or 0/1.

    Returns:
        (loss, stats) with detached 0-d `clipfrac` (fraction of valid tokens where the clipped
        term is the larger) and `value_mean` (masked mean of values).

    Raises:
        ValueError: unknown agg, shape mismatch, NaN in an input, bad clip_eps.
    """
    op = "value_loss"
    _check_tensor(values, "values", op)
    _check_tensor(old_values, "old_values", op)
    _check_tensor(returns, "returns", op)
    _check_2d(values, "values", op)
    _check_same_shape("values", values, op, old_values=old_values, returns=returns)
    valid = _check_mask(mask, values.shape, op)
    _check_agg(agg, op)
    eps = _check_eps(clip_eps, "clip_eps", op)

    old = old_values.detach().to(values.dtype)
    ret = returns.detach().to(values.dtype)
    clipped = old + (values - old).clamp(-eps, eps)
    vf1 = (values - ret).square()
    vf2 = (clipped - ret).square()
    loss = aggregate(0.5 * torch.maximum(vf1, vf2), valid, agg)
    with torch.no_grad():
        stats = {
            "clipfrac": _masked_mean((vf2 > vf1).to(values.dtype), valid),
            "value_mean": _masked_mean(values.detach(), valid),
        }
    return loss, stats


# ---------------------------------------------------------------------------------------------
# advantages from per-sequence rewards
# ---------------------------------------------------------------------------------------------
def _grouped(rewards, group_size, op: str) -> torch.Tensor:
    rewards = _check_tensor(rewards, "rewards", op)
    if rewards.dim() != 1:
        raise ValueError(f"{op}: rewards must be 1-D (B·G,), got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{op}: group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{op}: rewards length {rewards.numel()} is not divisible by group_size {group_size}"
        )
    r = rewards if rewards.is_floating_point() else rewards.float()
    return r.view(-1, group_size)


def grpo_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "std") -> torch.Tensor:
    """GRPO advantages from one scalar reward per completion.

    `rewards` (B·G,) holds B groups of G = group_size completions of the same prompt,
    consecutively. Within each group:

        scale="std":  (r − mean) / (std + 1e-6), std unbiased (torch.std, as TRL's GRPOTrainer)
        scale="none": r − mean  (Dr. GRPO, Liu et al. 2025: no per-group std scaling)

    A group whose rewards are all equal gets advantages 0. Returns (B·G,) in the rewards' float
    dtype (float32 for integer rewards); no gradient flows (computed under no_grad).

    Raises:
        ValueError: unknown scale, rewards not 1-D, length not divisible by group_size,
            group_size < 2 with scale="std" (the unbiased std of one sample is undefined), NaN.
    """
    op = "grpo_advantages"
    if scale not in SCALES:
        raise ValueError(f"{op}: scale must be one of {SCALES}, got {scale!r}")
    with torch.no_grad():
        r = _grouped(rewards, group_size, op)
        if scale == "std" and group_size < 2:
            raise ValueError(f"{op}: group_size must be ≥ 2 with scale='std', got {group_size}")
        adv = r - r.mean(-1, keepdim=True)
        if scale == "std":
            adv = adv / (r.std(-1, keepdim=True) + 1e-6)
        return adv.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantages: each reward minus the mean of the other G − 1 rewards of its group,
    r_i − (Σ_j r_j − r_i)/(G − 1) = G/(G − 1)·(r_i − mean). `rewards` (B·G,) is grouped
    consecutively as in `grpo_advantages`. Returns (B·G,); no gradient flows.

    Raises:
        ValueError: rewards not 1-D, length not divisible by group_size, group_size < 2, NaN.
    """
    op = "rloo_advantages"
    with torch.no_grad():
        r = _grouped(rewards, group_size, op)
        if group_size < 2:
            raise ValueError(f"{op}: group_size must be ≥ 2 (leave-one-out needs another sample)")
        baseline = (r.sum(-1, keepdim=True) - r) / (group_size - 1)
        return (r - baseline).reshape(-1)


__all__ = ["AGGS", "aggregate", "grpo_advantages", "ppo_policy_loss", "rloo_advantages", "value_loss"]
