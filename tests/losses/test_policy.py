import math

import pytest
import torch

from fastalign.losses.policy import (
    AGGS,
    grpo_advantages,
    ppo_policy_loss,
    rloo_advantages,
    value_loss,
)

INF = float("inf")


def hand_case():
    """Two rows, right padding. Ratios chosen so each branch of the clipped objective shows up:
    row 0: ρ = 1.5 (A=1, upper clip), 0.5 (A=-1, lower clip), 1.1 (A=2, inside), 5 (A=-1,
    dual-clip region); row 1: ρ = 0.9 (A=1, inside), 2 (A=1, upper clip), then 2 padding tokens
    whose log-probs are -inf (must not leak into the loss or its gradient)."""
    ratios = torch.tensor([[1.5, 0.5, 1.1, 5.0], [0.9, 2.0, 1.0, 1.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.2, 0.0, 0.0]], dtype=torch.float64)
    logps = old + ratios.log()
    logps[1, 2:] = -INF
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    return logps, old, adv, mask


# Per-token losses written out by hand (ε = 0.2):
#   row 0: max(-1.5, -1.2) = -1.2;  max(0.5, 0.8) = 0.8;  -2.2;  max(5, 1.2) = 5   -> sum 2.4
#   row 1: -0.9;  max(-2, -1.2) = -1.2                                           -> sum -2.1
HAND = {
    "token-mean": (2.4 - 2.1) / 6,
    "seq-mean-token-sum": (2.4 - 2.1) / 2,
    "seq-mean-token-mean": (2.4 / 4 - 2.1 / 2) / 2,
    "seq-mean-token-sum-norm": (2.4 / 4 - 2.1 / 4) / 2,  # Dr. GRPO: T = 4 for both rows
}


@pytest.mark.parametrize("agg", AGGS)
def test_ppo_hand_values_every_agg(agg):
    logps, old, adv, mask = hand_case()
    x = logps.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(x, old, adv, mask, agg=agg)
    assert loss.item() == pytest.approx(HAND[agg], abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(3 / 6)
    assert stats["ratio_mean"].item() == pytest.approx(11.0 / 6)
    assert stats["ratio_max"].item() == pytest.approx(5.0)
    k3 = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 5.0, 0.9, 2.0)) / 6
    assert stats["approx_kl"].item() == pytest.approx(k3)
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    g = x.grad
    assert torch.isfinite(g).all() and (g[1, 2:] == 0).all()
    # Clipped tokens get no gradient; unclipped ones get -A·ρ times the agg weight.
    assert g[0, 0] == 0 and g[0, 1] == 0 and g[1, 1] == 0
    if agg == "token-mean":
        assert g[0, 2].item() == pytest.approx(-2 * 1.1 / 6)
        assert g[0, 3].item() == pytest.approx(5.0 / 6)


def test_ppo_dual_clip_and_clip_higher_hand_values():
    logps, old, adv, mask = hand_case()
    # dual clip c = 3: the A=-1, ρ=5 token's loss 5 becomes min(5, 3) = 3 -> row 0 sum 0.4.
    loss, stats = ppo_policy_loss(logps, old, adv, mask, dual_clip=3.0)
    assert loss.item() == pytest.approx((0.4 - 2.1) / 6)
    assert stats["dual_clipfrac"].item() == pytest.approx(1 / 6)
    # c above the loss leaves it unchanged.
    loss_big, _ = ppo_policy_loss(logps, old, adv, mask, dual_clip=10.0)
    assert loss_big.item() == pytest.approx(HAND["token-mean"])
    # ε_high = 0.5: ρ = 1.5 is no longer clipped (-1.5), ρ = 2 clips at 1.5 (-1.5).
    loss_hi, stats_hi = ppo_policy_loss(logps, old, adv, mask, clip_eps_high=0.5)
    assert loss_hi.item() == pytest.approx((2.1 - 2.4) / 6)
    assert stats_hi["clipfrac"].item() == pytest.approx(2 / 6)


def ppo_reference(logps, old, adv, mask, eps, eps_high, dual, agg):
    """Element-by-element float64 loop (independent of the vectorised code)."""
    b, t = logps.shape
    rows = []
    for i in range(b):
        terms = []
        for j in range(t):
            if not mask[i, j]:
                continue
            a = float(adv[i, j])
            r = math.exp(float(logps[i, j]) - float(old[i, j]))
            loss = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps_high))
            if dual is not None and a < 0:
                loss = min(loss, -a * dual)
            terms.append(loss)
        rows.append(terms)
    if agg == "token-mean":
        n = sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / max(n, 1)
    if agg == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / b
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / max(len(r), 1) for r in rows) / b
    return sum(sum(r) / t for r in rows) / b


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual", [None, 2.5])
def test_ppo_fp32_matches_float64_loop(agg, dual):
    b, t = 5, 9
    old = -torch.rand(b, t) * 3
    logps = old + torch.randn(b, t) * 0.4
    adv = torch.randn(b, t)
    lengths = torch.tensor([9, 1, 4, 0, 7])  # includes an all-padding row
    mask = torch.arange(t) < lengths.unsqueeze(1)
    loss, _ = ppo_policy_loss(
        logps, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28, dual_clip=dual, agg=agg
    )
    want = ppo_reference(logps.double(), old.double(), adv.double(), mask, 0.2, 0.28, dual, agg)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want, abs=1e-5)
    # Gradients: the float32 op against float64 autograd of the same op (itself checked above).
    x32, x64 = logps.clone().requires_grad_(True), logps.double().requires_grad_(True)
    ppo_policy_loss(x32, old, adv, mask, dual_clip=dual, agg=agg)[0].backward()
    ppo_policy_loss(x64, old.double(), adv.double(), mask, dual_clip=dual, agg=agg)[0].backward()
    assert torch.allclose(x32.grad.double(), x64.grad, atol=1e-6)


def test_ppo_per_sequence_advantages_broadcast_and_float_mask():
    logps, old, _, mask = hand_case()
    seq_adv = torch.tensor([0.5, -2.0], dtype=torch.float64)
    got, _ = ppo_policy_loss(logps, old, seq_adv, mask.double())
    want, _ = ppo_policy_loss(logps, old, seq_adv.unsqueeze(1).expand(2, 4), mask)
    assert got.item() == pytest.approx(want.item())


def test_ppo_all_padding_gives_zero():
    logps = torch.zeros(2, 3, requires_grad=True)
    loss, stats = ppo_policy_loss(logps, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0.0 and stats["clipfrac"].item() == 0.0 and stats["ratio_max"].item() == 0.0
    loss.backward()
    assert (logps.grad == 0).all()


def test_ppo_errors():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="agg"):
        ppo_policy_loss(x, x, x, m, agg="sum")
    with pytest.raises(ValueError, match="old_logps"):
        ppo_policy_loss(x, torch.zeros(2, 4), x, m)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(x, x, torch.zeros(3), m)
    with pytest.raises(ValueError, match="mask"):
        ppo_policy_loss(x, x, x, torch.ones(3, 2))
    with pytest.raises(ValueError, match="logps"):
        ppo_policy_loss(torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.ones(6))
    nan = torch.full((2, 3), float("nan"))
    for i, name in enumerate(("logps", "old_logps", "advantages", "mask")):
        args = [x, x, x, m]
        args[i] = nan
        with pytest.raises(ValueError, match=name):
            ppo_policy_loss(*args)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(x, x, x, m, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_policy_loss(x, x, x, m, clip_eps=-0.1)
    with pytest.raises(ValueError, match="clip_eps_high"):
        ppo_policy_loss(x, x, x, m, clip_eps_high=float("inf"))


# ---------------------------------------------------------------------------------------------
# value loss
# ---------------------------------------------------------------------------------------------
def test_value_loss_hand_values():
    # ε = 0.2:  t0: V=1.0, V_old=0.8, R=1.5 -> clip 1.0, both 0.25 -> 0.125
    #           t1: V=2.0, V_old=1.0, R=0   -> clip 1.2, max(4, 1.44) = 4 -> 2.0
    #           t2: V=1.0, V_old=2.0, R=0   -> clip 1.8, max(1, 3.24) = 3.24 -> 1.62 (clipped)
    #           t3: padding (NaN-free garbage)
    v = torch.tensor([[1.0, 2.0, 1.0, 1e6]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.8, 1.0, 2.0, -1e6]], dtype=torch.float64)
    ret = torch.tensor([[1.5, 0.0, 0.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(v, old, ret, mask)
    assert loss.item() == pytest.approx((0.125 + 2.0 + 1.62) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["value_mean"].item() == pytest.approx(4 / 3)
    loss.backward()
    # d/dV: t0 (V - R)/3, t1 (V - R)/3, t2 clipped -> 0, padding 0.
    assert torch.allclose(v.grad, torch.tensor([[-0.5 / 3, 2.0 / 3, 0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("agg", AGGS)
def test_value_loss_fp32_matches_float64_loop(agg):
    b, t, eps = 4, 6, 0.3
    v, old, ret = torch.randn(b, t), torch.randn(b, t), torch.randn(b, t)
    mask = torch.arange(t) < torch.tensor([[6], [2], [5], [1]])
    loss, _ = value_loss(v, old, ret, mask, clip_eps=eps, agg=agg)
    rows = []
    for i in range(b):
        terms = []
        for j in range(t):
            if mask[i, j]:
                vv, oo, rr = float(v[i, j]), float(old[i, j]), float(ret[i, j])
                vc = oo + min(max(vv - oo, -eps), eps)
                terms.append(0.5 * max((vv - rr) ** 2, (vc - rr) ** 2))
        rows.append(terms)
    want = {
        "token-mean": sum(map(sum, rows)) / sum(map(len, rows)),
        "seq-mean-token-sum": sum(map(sum, rows)) / b,
        "seq-mean-token-mean": sum(sum(r) / len(r) for r in rows) / b,
        "seq-mean-token-sum-norm": sum(sum(r) / t for r in rows) / b,
    }[agg]
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_value_loss_errors():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="agg"):
        value_loss(x, x, x, m, agg="mean")
    with pytest.raises(ValueError, match="returns"):
        value_loss(x, x, torch.zeros(2, 2), m)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(x, torch.full((2, 3), float("nan")), x, m)
    with pytest.raises(ValueError, match="clip_eps"):
        value_loss(x, x, x, m, clip_eps=float("nan"))


# ---------------------------------------------------------------------------------------------
# group advantages
# ---------------------------------------------------------------------------------------------
def test_grpo_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # Group 1: mean 0.5, unbiased std sqrt(1/3) -> ±0.5·sqrt(3); group 2: constant -> 0.
    s = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    want = torch.tensor([s, -s, -s, s, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(grpo_advantages(rewards, 4), want, atol=1e-7)
    want_none = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(grpo_advantages(rewards, 4, scale="none"), want_none)


def test_grpo_matches_trl_formula_float64():
    rewards = torch.randn(6 * 5, dtype=torch.float64)
    g = rewards.view(-1, 5)
    mean = g.mean(1).repeat_interleave(5)
    std = g.std(1).repeat_interleave(5)
    assert torch.allclose(
        grpo_advantages(rewards.float(), 5).double(), (rewards - mean) / (std + 1e-6), atol=1e-5
    )
    assert grpo_advantages(torch.tensor([1, 0, 3, 3]), 2).dtype == torch.float32  # integer rewards


def test_rloo_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0])
    # G = 3: [1, 0, 0] -> 1 - 0, 0 - 0.5, 0 - 0.5; [1, 3, 1] -> 1 - 2, 3 - 1, 1 - 2
    want = torch.tensor([1.0, -0.5, -0.5, -1.0, 2.0, -1.0])
    assert torch.allclose(rloo_advantages(rewards, 3), want)
    # = G/(G-1)·(r - mean)
    r = torch.randn(20, dtype=torch.float64)
    gm = r.view(-1, 4).mean(1).repeat_interleave(4)
    assert torch.allclose(rloo_advantages(r, 4), 4 / 3 * (r - gm))


def test_advantage_errors():
    r = torch.zeros(6)
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(r, 3, scale="batch")
    with pytest.raises(ValueError, match="divisible"):
        grpo_advantages(r, 4)
    with pytest.raises(ValueError, match="divisible"):
        rloo_advantages(r, 4)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(r, 1)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(r, 1)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(r, 0, scale="none")
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="rewards"):
        rloo_advantages(torch.tensor([1.0, float("nan")]), 2)
    assert torch.equal(grpo_advantages(torch.tensor([1.0, 2.0]), 1, scale="none"), torch.zeros(2))
