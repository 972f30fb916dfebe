"""KL coefficient control and the InstructGPT per-token KL-penalised reward.

- `FixedKLController`: β stays as configured.
- `AdaptiveKLController` (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
  §2.2): after a batch with measured KL (per sequence), with e = clip(KL / target − 1, −0.2, 0.2),
  β ← β · (1 + e · n_steps / horizon). β grows when the policy drifts past the target and shrinks
  when it stays close, so the KL settles near the target whatever the reward scale.
- `kl_penalty_rewards`: r_t = −β · kl_t on each response token, plus the sequence score on the last
  one (Ouyang et al. 2022), the input to GAE.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fastalign.losses.kl import kl_estimate

if TYPE_CHECKING:
    import torch

    from fastalign.config import KLConfig


def _finite(name: str, x: float) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"KL controller: {name} must be finite, got {x}")
    return x


class FixedKLController:
    """A constant coefficient; `update` does nothing (kept so recipes treat both kinds alike)."""

    def __init__(self, coef: float) -> None:
        self.value = _finite("coef", coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        _finite("current_kl", current_kl)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. (2019) driving the per-sequence KL towards `target`."""

    def __init__(self, coef: float, target: float, horizon: int) -> None:
        self.value = _finite("coef", coef)
        self.target = _finite("target", target)
        if self.target <= 0 or horizon < 1:
            raise ValueError(f"KL controller: need target > 0 and horizon >= 1, got {target}, {horizon}")
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """`current_kl`: mean KL per sequence of the last batch; `n_steps`: samples (or steps) it covers."""
        err = min(max(_finite("current_kl", current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


def make_kl_controller(cfg: KLConfig) -> FixedKLController | AdaptiveKLController:
    if cfg.adaptive:
        return AdaptiveKLController(cfg.coef, cfg.target, cfg.horizon)
    return FixedKLController(cfg.coef)


def kl_penalty_rewards(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    estimator: str,
    score: torch.Tensor,
) -> torch.Tensor:
    """Per-token rewards (B, T): −coef · kl_t on response tokens (mask true), `score` (B,) added on
    each row's last response token, 0 on padding. Inputs are detached (rewards are targets).

    Args:
        logps, ref_logps: (B, T) policy / reference log-probs of the sampled response tokens.
        mask: (B, T) bool or 0/1, true on response tokens; every row needs at least one.
        estimator: "k1" | "k2" | "k3" (`fastalign.losses.kl.kl_estimate`).
        score: (B,) sequence rewards.
    Returns (B, T) in float32 (float64 when the log-probs are float64).
    """

    if logps.dim() != 2 or mask.shape != logps.shape:
        raise ValueError(
            f"kl_penalty_rewards: logps {tuple(logps.shape)} must be (B, T) and mask "
            f"{tuple(mask.shape)} the same"
        )
    if score.shape != logps.shape[:1]:
        raise ValueError(f"kl_penalty_rewards: score {tuple(score.shape)} must be ({logps.shape[0]},)")
    dtype = torch.float64 if logps.dtype == torch.float64 else torch.float32
    on = mask.detach() > 0  # (B, T)
    empty = (~on.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"kl_penalty_rewards: rows {empty} have no response token to put the score on")
    kl = kl_estimate(logps.detach().to(dtype), ref_logps.detach().to(dtype), estimator)  # (B, T)
    rewards = torch.where(on, -float(coef) * kl, torch.zeros_like(kl))  # (B, T)
    positions = torch.arange(on.shape[1], device=on.device).expand_as(on)
    last = torch.where(on, positions, -1).amax(dim=1)  # (B,) last response token
    rows = torch.arange(on.shape[0], device=on.device)
    rewards[rows, last] += score.detach().to(device=rewards.device, dtype=dtype)
    return rewards
