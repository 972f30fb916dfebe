"""Alignment losses in plain PyTorch, on (sequence or token) log-probs; import-light (torch only).

- `kl_estimate(logps, ref_logps, kind)`: per-token KL(π ‖ π_ref) estimators k1 / k2 / k3 / abs.
- `sequence_logps(token_logps, mask, average)`: (B, T) → (B,) summed or averaged log-probs.
- `dpo_loss` (TRL >= 1's loss types, plus TRL 0.x's changed ones as cdpo / ipo_sum /
  bco_pair_shift; defined limits for −inf log-probs), `simpo_loss`, `orpo_loss`, `kto_loss`:
  preference losses, per example, with detached rewards.
- `bradley_terry_loss`: the pairwise reward-model loss (margin, reward centring).
- `ppo_policy_loss`, `value_loss`: clipped PPO surrogate (asymmetric / dual clip) and clipped value
  loss with token- or sequence-level aggregation; `grpo_advantages`, `rloo_advantages`: group
  baselines for GRPO / Dr. GRPO / RLOO. (GAE is a fused op: `fastalign.ops.gae`.)
- `FusedLinearPreferenceLoss` (dpo / ipo / simpo / orpo), `FusedLinearKTOLoss`,
  `FusedLinearPolicyLoss`: the same losses from hidden states + lm_head weight via
  `fastalign.ops.linear_logprobs` (never holding logits; the op is imported on first forward).
"""

from fastalign.losses.fused_linear import FusedLinearKTOLoss, FusedLinearPolicyLoss, FusedLinearPreferenceLoss
from fastalign.losses.kl import KL_KINDS, kl_estimate
from fastalign.losses.policy import AGGS, grpo_advantages, ppo_policy_loss, rloo_advantages, value_loss
from fastalign.losses.preference import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)

__all__ = [
    "AGGS",
    "DPO_LOSS_TYPES",
    "KL_KINDS",
    "FusedLinearKTOLoss",
    "FusedLinearPolicyLoss",
    "FusedLinearPreferenceLoss",
    "bradley_terry_loss",
    "dpo_loss",
    "grpo_advantages",
    "kl_estimate",
    "kto_loss",
    "orpo_loss",
    "ppo_policy_loss",
    "rloo_advantages",
    "sequence_logps",
    "simpo_loss",
    "value_loss",
]
