"""KL controllers (Ziegler et al. 2019) and the InstructGPT per-token KL-penalised rewards."""

from __future__ import annotations

import math

import pytest
import torch

from fastalign.config import KLConfig
from fastalign.rollout.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    kl_penalty_rewards,
    make_kl_controller,
)


def test_adaptive_controller_follows_its_formula():
    coef, target, horizon = 0.1, 6.0, 1000
    ctl = make_kl_controller(KLConfig(coef=coef, adaptive=True, target=target, horizon=horizon))
    assert isinstance(ctl, AdaptiveKLController)
    kls = [0.0, 3.0, 6.0, 6.6, 7.5, 30.0, 5.0, 12.0, 1e-3, 6.3]
    ns = [16, 16, 32, 8, 64, 16, 16, 100, 16, 1]
    expected = coef
    for kl, n in zip(kls, ns, strict=True):
        err = min(max(kl / target - 1.0, -0.2), 0.2)
        expected *= 1.0 + err * n / horizon
        ctl.update(kl, n)
        assert ctl.value == pytest.approx(expected, rel=1e-14, abs=0)
    # above target it grew, at target it stayed: check two points against their meaning too
    up = AdaptiveKLController(1.0, 6.0, 10)
    up.update(100.0, 5)  # error clipped to +0.2 -> ×1.1
    assert up.value == pytest.approx(1.1)
    same = AdaptiveKLController(1.0, 6.0, 10)
    same.update(6.0, 5)
    assert same.value == 1.0
    resumed = AdaptiveKLController(coef, target, horizon)
    resumed.load_state_dict(ctl.state_dict())
    ctl.update(9.0, 10)
    resumed.update(9.0, 10)
    assert resumed.value == ctl.value


def test_fixed_controller_and_errors():
    ctl = make_kl_controller(KLConfig(coef=0.2))
    assert isinstance(ctl, FixedKLController)
    ctl.update(1e3, 100)
    assert ctl.value == 0.2 and ctl.state_dict() == {"value": 0.2}
    with pytest.raises(ValueError, match="current_kl must be finite"):
        ctl.update(math.nan, 1)
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, 0.0, 10)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (KLConfig(coef=-1.0), "coef: must be a finite number >= 0"),
        (KLConfig(target=0.0), "target: must be > 0"),
        (KLConfig(horizon=0), "horizon: must be >= 1"),
        (KLConfig(coef=0.0, adaptive=True), "coef: must be > 0 with adaptive"),
    ],
)
def test_kl_config_validate(cfg, match):
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def reference_rewards(logps, ref, mask, coef, estimator, score):
    """Float64 loop: per token −coef·kl where the mask is set, score on each row's last such token."""
    B, T = logps.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        last = max(t for t in range(T) if mask[b, t])
        for t in range(T):
            if not mask[b, t]:
                continue
            log_r = float(ref[b, t]) - float(logps[b, t])
            kl = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.expm1(log_r) - log_r}[estimator]
            out[b, t] = -coef * kl + (float(score[b]) if t == last else 0.0)
    return out


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_penalty_rewards_matches_float64_loop(estimator, dtype):
    g = torch.Generator().manual_seed(3)
    B, T = 4, 7
    logps = (-torch.rand(B, T, generator=g) * 3).to(dtype)
    ref = (-torch.rand(B, T, generator=g) * 3).to(dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False  # right padding
    mask[1, 1:] = False  # a one-token response
    mask[3, :2] = False  # left padding (response starts later)
    score = torch.tensor([1.5, -2.0, 0.25, 3.0], dtype=dtype)
    got = kl_penalty_rewards(logps, ref, mask, 0.07, estimator, score)
    want = reference_rewards(logps.double(), ref.double(), mask, 0.07, estimator, score.double())
    assert got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert (got[~mask] == 0).all()
    # the float mask form gives the same answer
    torch.testing.assert_close(kl_penalty_rewards(logps, ref, mask.float(), 0.07, estimator, score), got)


def test_kl_penalty_rewards_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rows \[1\] have no response token"):
        kl_penalty_rewards(x, x, torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1, "k1", torch.zeros(2))
    with pytest.raises(ValueError, match=r"score \(3,\) must be \(2,\)"):
        kl_penalty_rewards(x, x, torch.ones(2, 3), 0.1, "k1", torch.zeros(3))
    with pytest.raises(ValueError, match="unknown kind"):
        kl_penalty_rewards(x, x, torch.ones(2, 3), 0.1, "k9", torch.zeros(2))
