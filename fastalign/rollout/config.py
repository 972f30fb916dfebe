"""Config sections of the online recipes' reward, KL and reward-hacking-watch pieces.

Plain dataclasses, no torch: `fastalign.config` (imported by the CLI at startup) embeds them in the
PPO / GRPO / online-DPO recipes. `validate()` follows the loader's convention: keys relative to the
section, the loader prefixes the section name (`reward.clip: must be > 0 ...`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal


def _require(ok: bool, key: str, msg: str) -> None:
    # imported on call: fastalign.config imports this module, so a top-level import would be circular
    from fastalign.config import _require as require

    require(ok, key, msg)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass
class RewardConfig:
    """Where rewards come from and how they are shaped.

    total = model_weight · RM + function_weight · fn − length_penalty · tokens − missing_eos_penalty
    (each term only when configured); then optionally normalised by running mean / std and clipped.
    Several reward models form an ensemble aggregated by `ensemble` ("min" is the conservative choice
    against reward hacking: the policy must please every model). Each model scores with its own
    tokenizer (responses are decoded text, re-encoded), in the format of fastalign's RM recipe, or with
    its chat template (`template`)."""

    models: list[str] = field(default_factory=list)
    ensemble: Literal["min", "mean"] = "min"
    function: str | None = None
    function_kwargs: dict[str, Any] = field(default_factory=dict)
    model_weight: float = 1.0
    function_weight: float = 1.0
    normalize: bool = False
    clip: float | None = None
    length_penalty: float = 0.0
    missing_eos_penalty: float | None = None
    batch_size: int = 16
    max_length: int = 512
    template: Literal["auto", "chat", "plain"] = "auto"

    def validate(self) -> None:
        _require(
            bool(self.models) or self.function is not None,
            "models",
            "no reward source: give reward.models (reward model folders) and/or "
            "reward.function ('package.module:function' or 'path/to/file.py:function')",
        )
        _require(
            all(isinstance(m, str) and m.strip() for m in self.models), "models", "must be non-empty paths"
        )
        if self.function is not None:
            mod, _, name = self.function.rpartition(":")
            _require(
                bool(mod.strip()) and bool(name.strip()),
                "function",
                f"expected 'package.module:function' or 'path/to/file.py:function', got {self.function!r}",
            )
        for key in ("model_weight", "function_weight", "length_penalty"):
            _require(_finite(getattr(self, key)), key, f"must be a finite number, got {getattr(self, key)}")
        _require(self.length_penalty >= 0, "length_penalty", f"must be >= 0, got {self.length_penalty}")
        if self.clip is not None:
            _require(_finite(self.clip) and self.clip > 0, "clip", f"must be > 0 (or null), got {self.clip}")
        if self.missing_eos_penalty is not None:
            _require(
                _finite(self.missing_eos_penalty) and self.missing_eos_penalty >= 0,
                "missing_eos_penalty",
                f"must be a finite number >= 0 (or null), got {self.missing_eos_penalty}",
            )
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.max_length >= 2, "max_length", f"must be >= 2, got {self.max_length}")


@dataclass
class KLConfig:
    """KL(π ‖ π_ref) penalty: coefficient (fixed, or adapted towards `target` as in Ziegler et al.
    2019) and estimator (k1 in the per-token reward as InstructGPT; k2 / k3 in the loss as GRPO)."""

    coef: float = 0.05
    estimator: Literal["k1", "k2", "k3"] = "k1"
    adaptive: bool = False
    target: float = 6.0  # nats per sequence (summed over response tokens)
    horizon: int = 10000

    def validate(self) -> None:
        _require(
            _finite(self.coef) and self.coef >= 0, "coef", f"must be a finite number >= 0, got {self.coef}"
        )
        _require(_finite(self.target) and self.target > 0, "target", f"must be > 0, got {self.target}")
        _require(self.horizon >= 1, "horizon", f"must be >= 1, got {self.horizon}")
        _require(
            not self.adaptive or self.coef > 0,
            "coef",
            "must be > 0 with adaptive: true (the controller scales it multiplicatively)",
        )


@dataclass
class WatchConfig:
    """Reward-hacking warnings (printed once per onset, see `fastalign.rollout.watch`).

    - length drift: mean response length moves more than `length_drift` (a fraction) away from its
      mean over the first `length_window` steps;
    - KL above `kl_threshold` (nats per sequence);
    - reward rising while KL blows up: over the last `reward_kl_window` steps the reward rose and KL
      grew more than `kl_blowup` × max(KL then, `kl_floor`) (the floor keeps a start from KL ≈ 0
      from counting as an explosion)."""

    length_drift: float = 1.0
    length_window: int = 10
    kl_threshold: float = 20.0
    reward_kl_window: int = 10
    kl_blowup: float = 4.0
    kl_floor: float = 1.0

    def validate(self) -> None:
        _require(self.length_drift > 0, "length_drift", f"must be > 0, got {self.length_drift}")
        _require(self.length_window >= 1, "length_window", f"must be >= 1, got {self.length_window}")
        _require(self.kl_threshold > 0, "kl_threshold", f"must be > 0, got {self.kl_threshold}")
        _require(self.reward_kl_window >= 1, "reward_kl_window", f"must be >= 1, got {self.reward_kl_window}")
        _require(self.kl_blowup > 1, "kl_blowup", f"must be > 1, got {self.kl_blowup}")
        _require(self.kl_floor > 0, "kl_floor", f"must be > 0, got {self.kl_floor}")
