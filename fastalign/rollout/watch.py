"""Reward-hacking warnings for the online recipes, from the per-step metrics they log.

A policy that games its reward usually shows it before the reward curve does: responses grow (or
collapse) in length, the KL to the reference runs away, or the reward keeps rising only because the
policy moves far from the reference. `RewardHackingWatch.update` checks three conditions each step
and returns a warning line when one *starts* (printed once to stderr, rank 0 only); it re-arms when
the condition clears. Reads "reward/raw_mean" (the reward before normalisation) when present, else
"reward/mean"; "kl" (per sequence); "response/length". A missing or non-finite metric skips its check.
"""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastalign.config import WatchConfig


def _value(metrics: Mapping[str, float], *keys: str) -> float | None:
    for key in keys:
        v = metrics.get(key)
        if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    return None


class RewardHackingWatch:
    """Edge-triggered checks on length drift, KL level and reward-up-while-KL-explodes."""

    def __init__(self, cfg: WatchConfig) -> None:
        self.cfg = cfg
        self.baseline: list[float] = []  # response lengths of the first `length_window` steps
        self.history: deque[tuple[float, float]] = deque(maxlen=cfg.reward_kl_window + 1)  # (reward, kl)
        self.active = {"length": False, "kl": False, "reward_kl": False}

    def update(self, step: int, metrics: Mapping[str, float]) -> list[str]:
        """Warning lines for the conditions that started at this step (usually none)."""
        found = {
            "length": self._length(metrics),
            "kl": self._kl(metrics),
            "reward_kl": self._reward_kl(metrics),
        }
        lines = []
        for name, msg in found.items():
            if msg is not None and not self.active[name]:
                lines.append(f"[watch] step {step}: {msg}")
            self.active[name] = msg is not None
        if lines and int(os.environ.get("RANK", "0")) == 0:
            for line in lines:
                print(line, file=sys.stderr)
        return lines

    def _length(self, metrics: Mapping[str, float]) -> str | None:
        length = _value(metrics, "response/length")
        if length is None:
            return None
        if len(self.baseline) < self.cfg.length_window:
            self.baseline.append(length)
            return None
        base = sum(self.baseline) / len(self.baseline)
        if base <= 0 or abs(length / base - 1.0) <= self.cfg.length_drift:
            return None
        return (
            f"mean response length {length:.1f} drifted {length / base - 1.0:+.0%} from its start "
            f"({base:.1f} over the first {len(self.baseline)} steps; limit ±{self.cfg.length_drift:.0%}): "
            "the policy may be exploiting a length bias of the reward"
        )

    def _kl(self, metrics: Mapping[str, float]) -> str | None:
        kl = _value(metrics, "kl")
        if kl is None or kl <= self.cfg.kl_threshold:
            return None
        return (
            f"KL to the reference {kl:.3g} nats/sequence passed kl_threshold={self.cfg.kl_threshold:g}: "
            "raise the KL coefficient or lower the learning rate"
        )

    def _reward_kl(self, metrics: Mapping[str, float]) -> str | None:
        reward, kl = _value(metrics, "reward/raw_mean", "reward/mean"), _value(metrics, "kl")
        if reward is None or kl is None:
            return None
        self.history.append((reward, kl))
        if len(self.history) < self.history.maxlen:
            return None
        (r0, kl0), (r1, kl1) = self.history[0], self.history[-1]
        limit = self.cfg.kl_blowup * max(kl0, self.cfg.kl_floor)
        if r1 <= r0 or kl1 <= limit:
            return None
        return (
            f"reward rose {r0:.3g} → {r1:.3g} over {self.cfg.reward_kl_window} steps while KL grew "
            f"{kl0:.3g} → {kl1:.3g} (> {self.cfg.kl_blowup:g}× ): possible reward hacking"
        )

    def state_dict(self) -> dict:
        return {"baseline": list(self.baseline), "history": [list(h) for h in self.history], **self.active}

    def load_state_dict(self, d: dict) -> None:
        self.baseline = [float(x) for x in d["baseline"]]
        self.history.clear()
        self.history.extend((float(r), float(k)) for r, k in d["history"])
        self.active = {name: bool(d[name]) for name in self.active}
