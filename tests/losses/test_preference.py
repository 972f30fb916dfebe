import math

import pytest
import torch

from fastalign.losses import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(*v, dtype=torch.float32):
    return torch.tensor(v, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# float64 ground truth, written from the formulas (naive log σ, no shared code with the losses)
# ---------------------------------------------------------------------------------------------
def naive_dpo(pc, pr, rc, rr, beta, loss_type, ls, lengths=None):
    pc, pr, rc, rr = (x.double() for x in (pc, pr, rc, rr))
    lsig = lambda x: torch.log(torch.sigmoid(x))
    a, b = pc - rc, pr - rr
    u = a - b
    z = beta * u
    if loss_type == "sigmoid":
        return -lsig(z)
    if loss_type == "cdpo":
        return -(1 - ls) * lsig(z) - ls * lsig(-z)
    if loss_type == "robust":
        return (-(1 - ls) * lsig(z) + ls * lsig(-z)) / (1 - 2 * ls)
    if loss_type == "hinge":
        return torch.clamp(1 - z, min=0)
    if loss_type == "ipo":
        n_c, n_r = (torch.ones_like(a), torch.ones_like(b)) if lengths is None else lengths
        return (a / n_c - b / n_r - 1 / (2 * beta)) ** 2
    if loss_type == "ipo_sum":
        return (u - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        e = ls or 1e-3
        return torch.sigmoid(z) * (lsig(z) - math.log(1 - e)) + torch.sigmoid(-z) * (lsig(-z) - math.log(e))
    if loss_type == "nca_pair":
        return -lsig(beta * a) - 0.5 * lsig(-beta * a) - 0.5 * lsig(-beta * b)
    if loss_type == "bco_pair":
        return -lsig(beta * a) - lsig(-beta * b)
    if loss_type == "bco_pair_shift":
        delta = (beta * torch.cat([a, b]).mean()).detach()
        return -lsig(beta * a - delta) - lsig(-(beta * b - delta))
    if loss_type == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * a) + torch.sigmoid(beta * b)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * a) + 1 - torch.sigmoid(z)
    if loss_type == "discopop":
        m = torch.sigmoid(z / 0.05)
        return -lsig(z) * (1 - m) + torch.exp(-z) * m
    raise AssertionError(loss_type)


def make_pairs(n=16, dtype=torch.float32, requires_grad=False):
    pc, pr = -torch.rand(n) * 40, -torch.rand(n) * 40
    rc, rr = pc + torch.randn(n) * 3, pr + torch.randn(n) * 3
    out = [x.to(dtype) for x in (pc, pr, rc, rr)]
    for x in out[:2]:
        x.requires_grad_(requires_grad)
    return out


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------
# beta = 0.1, policy chosen -1, rejected -2, reference -1.5 / -1.5:
# ρ_c = 0.5, ρ_r = -0.5, u = ρ_c - ρ_r = 1, z = βu = 0.1
HAND = {
    "sigmoid": -math.log(sig(0.1)),  # 0.6444
    "cdpo": -math.log(sig(0.1)),  # label_smoothing 0: plain DPO
    "hinge": 0.9,
    "ipo": (1 - 5) ** 2,  # 16 (no lengths: the log-probs are taken as per-token averages)
    "ipo_sum": (1 - 5) ** 2,
    "exo_pair": sig(0.1) * (math.log(sig(0.1)) - math.log(1 - 1e-3))
    + sig(-0.1) * (math.log(sig(-0.1)) - math.log(1e-3)),
    "nca_pair": -math.log(sig(0.05)) - 0.5 * math.log(sig(-0.05)) - 0.5 * math.log(sig(0.05)),
    "bco_pair": -math.log(sig(0.05)) - math.log(sig(0.05)),
    # δ = mean(0.05, -0.05) = 0
    "bco_pair_shift": -math.log(sig(0.05)) - math.log(sig(0.05)),
    "sppo_hard": (0.5 - 5) ** 2 + (-0.5 + 5) ** 2,  # 40.5
    "apo_zero": (1 - sig(0.05)) + sig(-0.05),
    "apo_down": sig(0.05) + (1 - sig(0.1)),
    "discopop": -math.log(sig(0.1)) * (1 - sig(2.0)) + math.exp(-0.1) * sig(2.0),
    "robust": -math.log(sig(0.1)),  # label_smoothing 0: plain DPO
}


def test_hand_table_covers_every_loss_type():
    assert set(HAND) == set(DPO_LOSS_TYPES)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_hand_computed(loss_type):
    losses, cr, rr = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1, loss_type=loss_type)
    assert losses.item() == pytest.approx(HAND[loss_type], rel=1e-6)
    assert cr.item() == pytest.approx(0.05) and rr.item() == pytest.approx(-0.05)


def test_dpo_label_smoothing_hand_computed():
    args = (t(-1.0), t(-2.0), t(-1.5), t(-1.5))
    cdpo = dpo_loss(*args, beta=0.1, loss_type="cdpo", label_smoothing=0.2)[0].item()
    assert cdpo == pytest.approx(-0.8 * math.log(sig(0.1)) - 0.2 * math.log(sig(-0.1)), rel=1e-6)
    robust = dpo_loss(*args, beta=0.1, loss_type="robust", label_smoothing=0.2)[0].item()
    assert robust == pytest.approx((-0.8 * math.log(sig(0.1)) + 0.2 * math.log(sig(-0.1))) / 0.6, rel=1e-6)


def test_sigmoid_with_label_smoothing_warns_and_computes_cdpo():
    """TRL >= 1's sigmoid ignores label_smoothing; fastalign keeps TRL 0.x's cDPO for it (the
    trainer's dpo.label_smoothing and soft labels rely on it) and says to write `cdpo`."""
    pc, pr, rc, rr = make_pairs(n=6, dtype=torch.float64)
    with pytest.warns(FutureWarning, match="loss_type='cdpo'"):
        smoothed = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.2)[0]
    torch.testing.assert_close(
        smoothed, dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="cdpo", label_smoothing=0.2)[0]
    )
    torch.testing.assert_close(smoothed, naive_dpo(pc, pr, rc, rr, 0.3, "cdpo", 0.2))
    assert not torch.allclose(smoothed, dpo_loss(pc, pr, rc, rr, beta=0.3)[0])
    with pytest.warns(FutureWarning, match="cdpo"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=torch.full((6,), 0.3, dtype=torch.float64))


@pytest.mark.filterwarnings("error")
def test_zero_label_smoothing_is_plain_sigmoid_bit_for_bit():
    """Soft labels with p_chosen = 1 (ε = 0 per pair) must equal plain DPO exactly, with no
    warning: the trainer's "p = 1 equals the hard-label run" relies on it."""
    pc, pr, rc, rr = make_pairs(n=8, requires_grad=True)
    plain = dpo_loss(pc, pr, rc, rr, beta=0.2)[0]
    g_plain = torch.autograd.grad(plain.sum(), (pc, pr))
    for lt in ("sigmoid", "cdpo"):
        soft = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=lt, label_smoothing=torch.zeros(8))[0]
        assert torch.equal(soft, plain)
        g_soft = torch.autograd.grad(soft.sum(), (pc, pr))
        assert all(torch.equal(a, b) for a, b in zip(g_soft, g_plain, strict=True))
        assert torch.equal(dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=lt)[0], plain)


def test_bco_pair_has_no_shift_and_bco_pair_shift_uses_batch_mean():
    # ρ_c = [1, 3], ρ_r = [-1, 1], β = 1: δ = mean(1, 3, -1, 1) = 1
    args = (t(1.0, 3.0), t(-1.0, 1.0), t(0.0, 0.0), t(0.0, 0.0))
    shifted = dpo_loss(*args, beta=1.0, loss_type="bco_pair_shift")[0]
    want = [-math.log(sig(0.0)) - math.log(sig(2.0)), -math.log(sig(2.0)) - math.log(sig(0.0))]
    assert shifted.tolist() == pytest.approx(want, rel=1e-6)
    plain = dpo_loss(*args, beta=1.0, loss_type="bco_pair")[0]
    want = [-math.log(sig(1.0)) - math.log(sig(1.0)), -math.log(sig(3.0)) - math.log(sig(-1.0))]
    assert plain.tolist() == pytest.approx(want, rel=1e-6)


def test_ipo_divides_each_log_ratio_by_its_length():
    # β = 0.1: ρ_c = 0.5 over 2 tokens, ρ_r = -0.5 over 4 tokens: margin 0.25 + 0.125 = 0.375
    args = (t(-1.0), t(-2.0), t(-1.5), t(-1.5))
    lengths = {"chosen_lengths": torch.tensor([2]), "rejected_lengths": torch.tensor([4])}
    ipo, cr, rr = dpo_loss(*args, beta=0.1, loss_type="ipo", **lengths)
    assert ipo.item() == pytest.approx((0.375 - 5) ** 2, rel=1e-6)
    assert cr.item() == pytest.approx(0.05) and rr.item() == pytest.approx(-0.05)  # rewards: summed ρ
    # ipo_sum never normalises; an empty completion counts as one token (as in TRL)
    assert dpo_loss(*args, beta=0.1, loss_type="ipo_sum", **lengths)[0].item() == pytest.approx(16.0)
    zero = dpo_loss(*args, beta=0.1, loss_type="ipo", chosen_lengths=t(0.0), rejected_lengths=t(1.0))[0]
    assert zero.item() == pytest.approx(16.0, rel=1e-6)
    # summed log-probs with lengths == the same pairs' average log-probs without lengths
    pc, pr, rc, rr = make_pairs(n=6, dtype=torch.float64)
    n_c, n_r = torch.tensor([1, 2, 3, 4, 5, 9]), torch.tensor([7, 1, 2, 8, 3, 3])
    summed = dpo_loss(pc, pr, rc, rr, beta=0.4, loss_type="ipo", chosen_lengths=n_c, rejected_lengths=n_r)[0]
    averaged = dpo_loss(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta=0.4, loss_type="ipo")[0]
    torch.testing.assert_close(summed, averaged, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(summed, naive_dpo(pc, pr, rc, rr, 0.4, "ipo", 0.0, (n_c, n_r)))


def test_dpo_lengths_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="both chosen_lengths and rejected_lengths"):
        dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=torch.ones(3))
    with pytest.raises(ValueError, match="rejected_lengths shape"):
        dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(2))
    with pytest.raises(ValueError, match="chosen_lengths must hold finite token counts"):
        dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=-torch.ones(3), rejected_lengths=torch.ones(3))
    with pytest.raises(TypeError, match="chosen_lengths must be a tensor"):
        dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=[1, 1, 1], rejected_lengths=torch.ones(3))


def _maybe_cdpo(loss_type, ls):
    """sigmoid with ε > 0 is cdpo (with a FutureWarning); everything else is itself."""
    return "cdpo" if loss_type == "sigmoid" and ls else loss_type


@pytest.mark.filterwarnings("ignore:dpo_loss. loss_type='sigmoid' with label_smoothing:FutureWarning")
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("beta,ls", [(0.1, 0.0), (0.5, 0.1)])
def test_dpo_fp32_matches_float64(loss_type, beta, ls):
    pc, pr, rc, rr = make_pairs()
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls)
    want = naive_dpo(pc, pr, rc, rr, beta, _maybe_cdpo(loss_type, ls), ls)
    assert losses.dtype == torch.float32 and losses.shape == (16,)
    assert torch.allclose(losses.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(cr.double(), beta * (pc.double() - rc.double()), rtol=1e-5, atol=1e-6)
    assert torch.allclose(rj.double(), beta * (pr.double() - rr.double()), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:dpo_loss. loss_type='sigmoid' with label_smoothing:FutureWarning")
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_gradient_to_policy_not_rewards(loss_type):
    pc, pr, rc, rr = make_pairs(n=5, dtype=torch.float64, requires_grad=True)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=0.1)
    assert losses.requires_grad and not cr.requires_grad and not rj.requires_grad
    gp = torch.autograd.grad(losses.sum(), (pc, pr))
    assert all(torch.isfinite(g).all() for g in gp)
    # ... and the gradient is the float64 formula's gradient (bco_pair_shift's δ is detached in both).
    pc2, pr2 = pc.detach().clone().requires_grad_(), pr.detach().clone().requires_grad_()
    want = naive_dpo(pc2, pr2, rc, rr, 0.3, _maybe_cdpo(loss_type, 0.1), 0.1)
    gw = torch.autograd.grad(want.sum(), (pc2, pr2))
    for g, w in zip(gp, gw, strict=True):
        assert torch.allclose(g, w, rtol=1e-8, atol=1e-10)


def test_dpo_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"loss_type 'kto_pair'; valid: sigmoid, robust, hinge"):
        dpo_loss(x, x, x, x, loss_type="kto_pair")
    with pytest.raises(ValueError, match="ref_rejected_logps shape"):
        dpo_loss(x, x, x, torch.zeros(4))
    with pytest.raises(ValueError, match="policy_rejected_logps contains NaN"):
        dpo_loss(x, t(0.0, math.nan, 0.0), x, x)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        dpo_loss([0.0], x, x, x)


# ---------------------------------------------------------------------------------------------
# SimPO, ORPO, KTO, Bradley-Terry
# ---------------------------------------------------------------------------------------------
def test_simpo_hand_computed_and_float64():
    # β = 2, γ/β = 0.5: z = 2·(-0.5 - (-1.0)) - 1 = 0
    losses, cr, rr = simpo_loss(t(-0.5), t(-1.0))
    assert losses.item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert cr.item() == pytest.approx(-1.0) and rr.item() == pytest.approx(-2.0)
    ls = simpo_loss(t(-0.5), t(-2.0), beta=1.0, gamma_beta_ratio=0.25, label_smoothing=0.1)[0]
    z = 1.0 * 1.5 - 0.25
    assert ls.item() == pytest.approx(-0.9 * math.log(sig(z)) - 0.1 * math.log(sig(-z)), rel=1e-6)

    c = (-torch.rand(32) * 3).requires_grad_()
    r = -torch.rand(32) * 3
    losses, cr, rr = simpo_loss(c, r, beta=2.5, gamma_beta_ratio=0.3, label_smoothing=0.05)
    z = 2.5 * (c.double() - r.double()) - 0.3 * 2.5
    want = -0.95 * torch.log(torch.sigmoid(z)) - 0.05 * torch.log(torch.sigmoid(-z))
    assert torch.allclose(losses.double(), want, rtol=1e-5, atol=1e-6)
    assert not cr.requires_grad and not rr.requires_grad
    losses.sum().backward()
    assert torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0


def test_orpo_hand_computed_and_float64():
    a, b = math.log(0.5), math.log(0.25)
    # odds(0.5) = 1, odds(0.25) = 1/3: log odds ratio = log 3
    losses, lor = orpo_loss(t(a), t(b), t(2.0), lam=0.1)
    assert lor.item() == pytest.approx(math.log(3.0), rel=1e-6)
    assert losses.item() == pytest.approx(2.0 - 0.1 * math.log(sig(math.log(3.0))), rel=1e-6)

    c = (-torch.rand(32) * 4 - 1e-3).requires_grad_()
    r = -torch.rand(32) * 4 - 1e-3
    nll = torch.rand(32, requires_grad=True)
    losses, lor = orpo_loss(c, r, nll, lam=0.2)
    cd, rd = c.double(), r.double()
    want_lor = (cd - rd) - (torch.log1p(-torch.exp(cd)) - torch.log1p(-torch.exp(rd)))
    want = nll.double() - 0.2 * torch.log(torch.sigmoid(want_lor))
    assert torch.allclose(lor.double(), want_lor, rtol=1e-4, atol=1e-4)
    assert torch.allclose(losses.double(), want, rtol=1e-5, atol=1e-5)
    assert not lor.requires_grad
    losses.sum().backward()
    assert torch.isfinite(c.grad).all() and torch.equal(nll.grad, torch.ones(32))


def test_orpo_is_finite_near_zero_logps():
    c = t(0.0, -1e-12, -1e-6, -1e-3).requires_grad_()
    r = t(-1.0, -1e-3, 0.0, -1e-12)
    losses, lor = orpo_loss(c, r, torch.zeros(4))
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(lor).all() and torch.isfinite(c.grad).all()
    assert lor[0] > 10 and lor[2] < 0 < lor[1]  # p → 1 gives a very large (finite) odds
    # float64 keeps tiny log-probs exact: log(1 - exp(-1e-12)) ≈ log(1e-12)
    f64 = torch.float64
    lor64 = orpo_loss(t(-1e-12, dtype=f64), t(-1.0, dtype=f64), t(0.0, dtype=f64))[1]
    want = (-1e-12 + 1.0) - (math.log(1e-12) - math.log1p(-math.exp(-1.0)))
    assert lor64.item() == pytest.approx(want, rel=1e-9)


def test_kto_hand_computed_and_float64():
    # ρ = [0.5, -0.5, 2.0], z0 = 1, β = 0.1, labels [D, U, D]
    pol, ref = t(-1.0, -2.0, 0.0), t(-1.5, -1.5, -2.0)
    des = torch.tensor([True, False, True])
    losses, rewards = kto_loss(pol, ref, des, 1.0, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    want = [2.0 * (1 - sig(0.1 * (0.5 - 1))), 0.5 * (1 - sig(0.1 * (1 + 0.5))), 2.0 * (1 - sig(0.1))]
    assert losses.tolist() == pytest.approx(want, rel=1e-6)
    assert rewards.tolist() == pytest.approx([0.05, -0.05, 0.2], rel=1e-6)
    # a negative reference point is clamped to 0; a tensor one is detached
    z = torch.tensor(-3.0, requires_grad=True)
    neg = kto_loss(pol, ref, des, z, beta=0.1)[0]
    assert neg.tolist() == pytest.approx([1 - sig(0.05), 1 - sig(0.05), 1 - sig(0.2)], rel=1e-6)

    p = (-torch.rand(24) * 30).requires_grad_()
    r = p.detach() + torch.randn(24) * 2
    d = torch.rand(24) < 0.5
    losses, rewards = kto_loss(p, r, d.long(), torch.tensor(0.7), beta=0.3)
    rho = p.double() - r.double()
    want = torch.where(d, 1 - torch.sigmoid(0.3 * (rho - 0.7)), 1 - torch.sigmoid(0.3 * (0.7 - rho)))
    assert torch.allclose(losses.double(), want, rtol=1e-5, atol=1e-6)
    assert not rewards.requires_grad
    losses.sum().backward()
    assert (p.grad[d] < 0).all() and (p.grad[~d] > 0).all()


def test_bradley_terry_hand_computed_and_float64():
    c, r = t(1.0, 0.0), t(-1.0, 0.5)
    assert bradley_terry_loss(c, r).tolist() == pytest.approx([-math.log(sig(2.0)), -math.log(sig(-0.5))])
    got = bradley_terry_loss(c, r, margin=t(1.0, 0.5), center_coef=0.01)
    want = [-math.log(sig(1.0)) + 0.01 * 0.0, -math.log(sig(-1.0)) + 0.01 * 0.25]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    assert bradley_terry_loss(c, r, margin=1.0).tolist() == pytest.approx(
        [-math.log(sig(1.0)), -math.log(sig(-1.5))], rel=1e-6
    )

    c = torch.randn(32, requires_grad=True)
    r = torch.randn(32, requires_grad=True)
    m = torch.rand(32)
    losses = bradley_terry_loss(c, r, margin=m, center_coef=0.05)
    cd, rd = c.double(), r.double()
    want = -torch.log(torch.sigmoid(cd - rd - m.double())) + 0.05 * (cd + rd) ** 2
    assert torch.allclose(losses.double(), want, rtol=1e-5, atol=1e-6)
    losses.sum().backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()


def test_other_losses_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="rejected_avg_logps shape"):
        simpo_loss(x, torch.zeros(2))
    with pytest.raises(ValueError, match="chosen_avg_logps contains NaN"):
        simpo_loss(t(math.nan, 0.0, 0.0), x)
    with pytest.raises(ValueError, match="chosen_nll shape"):
        orpo_loss(x, x, torch.zeros(2))
    with pytest.raises(ValueError, match="chosen_nll contains NaN"):
        orpo_loss(x, x, t(0.0, math.nan, 0.0))
    with pytest.raises(ValueError, match="lam"):
        orpo_loss(x, x, x, lam=-1.0)
    with pytest.raises(ValueError, match="desirable shape"):
        kto_loss(x, x, torch.ones(2, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="kl_ref_point"):
        kto_loss(x, x, torch.ones(3, dtype=torch.bool), math.nan)
    with pytest.raises(ValueError, match="kl_ref_point contains NaN"):
        kto_loss(x, x, torch.ones(3, dtype=torch.bool), torch.tensor(math.nan))
    with pytest.raises(ValueError, match="ref_logps contains NaN"):
        kto_loss(x, t(0.0, math.nan, 0.0), torch.ones(3, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="rejected_rewards shape"):
        bradley_terry_loss(x, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="margin contains NaN"):
        bradley_terry_loss(x, x, margin=t(0.0, math.nan, 0.0))
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(x, x, center_coef=-0.1)


@pytest.mark.parametrize("loss_type", ["cdpo", "robust"])
def test_dpo_per_pair_label_smoothing_equals_scalar_per_row(loss_type):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4))
    eps = torch.tensor([0.0, 0.1, 0.25, 0.4, 0.49], dtype=torch.float64)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=eps)
    for i in range(5):
        one, _, _ = dpo_loss(
            pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1], beta=0.3, loss_type=loss_type,
            label_smoothing=float(eps[i]),
        )  # fmt: skip
        assert losses[i].item() == pytest.approx(one.item(), rel=1e-12)
    # cdpo at ε = 0.5 (no preference) is symmetric in chosen/rejected; robust refuses it
    half = torch.full((5,), 0.5, dtype=torch.float64)
    if loss_type == "cdpo":
        a, _, _ = dpo_loss(pc, pr, rc, rr, loss_type="cdpo", label_smoothing=half)
        b, _, _ = dpo_loss(pr, pc, rr, rc, loss_type="cdpo", label_smoothing=half)
        torch.testing.assert_close(a, b)
        # ε = 1 per pair (p_chosen = 0) is the flipped preference
        flipped, _, _ = dpo_loss(
            pc, pr, rc, rr, loss_type="cdpo", label_smoothing=torch.ones(5, dtype=torch.float64)
        )
        torch.testing.assert_close(flipped, dpo_loss(pr, pc, rr, rc)[0])
    else:
        with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
            dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=half)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=eps[:3])
    with pytest.raises(ValueError, match="must be in"):
        dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=eps + 0.7)
    with pytest.raises(ValueError, match=r"works with cdpo .* and robust, not 'ipo'"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", label_smoothing=eps)


def test_bradley_terry_soft_target():
    c = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.0, 0.5, 2.5], dtype=torch.float64)
    t = torch.tensor([1.0, 0.3, 0.5], dtype=torch.float64)
    losses = bradley_terry_loss(c, r, target=t)
    d = (c - r).detach()
    sig = lambda x: 1 / (1 + math.exp(-x))
    pairs = zip(t.tolist(), d.tolist(), strict=True)
    expect = [-(ti * math.log(sig(di)) + (1 - ti) * math.log(sig(-di))) for ti, di in pairs]
    assert losses.tolist() == pytest.approx(expect, rel=1e-12)
    hard = bradley_terry_loss(c, r)
    assert losses[0].item() == pytest.approx(hard[0].item(), rel=1e-12)
    losses.sum().backward()  # d/dc = σ(d) − t
    assert c.grad.tolist() == pytest.approx((torch.sigmoid(d) - t).tolist(), rel=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bradley_terry_loss(c, r, target=torch.tensor([1.0, 1.2, 0.0], dtype=torch.float64))
