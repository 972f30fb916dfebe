"""Infinite log-probs in `dpo_loss` / `simpo_loss` (issue 14 §5): a completion the policy or the
reference gives probability 0 has log-prob −inf, so a log-ratio is ±∞. Every loss type must return
the limit of its formula (never NaN) with the limit of its gradient, and raise where no limit
exists (∞ − ∞).

The reference for "the limit" is the float64 formula (tests/losses/test_preference.py's naive_dpo,
which shares no code with the losses) evaluated with each infinity replaced by a large finite
log-prob ±L: a finite limit must agree with it, an infinite one must show up as a value that keeps
growing with that sign from ±L to ±2L, and the same for every gradient."""

import math

import pytest
import torch
from test_preference import naive_dpo

from fastalign.losses import DPO_LOSS_TYPES, dpo_loss, sequence_logps, simpo_loss

INF = math.inf
BETA = 0.5
L = 400.0  # |z| ≈ β·L = 200: σ(−200) ≈ 1e-87, so naive_dpo at ±L sits on the limit in float64
GROWTH = 1.0  # an infinite limit: the value at ±2L is beyond the value at ±L by at least this

# (id, which input, value): pair 0 of the batch gets the infinity, pair 1 stays finite
SCENARIOS = [
    ("policy-rejected--inf", "pr", -INF),  # the case: ρ_r = −∞, u = +∞
    ("policy-chosen--inf", "pc", -INF),  # ρ_c = −∞, u = −∞
    ("ref-rejected--inf", "rr", -INF),  # ρ_r = +∞, u = −∞
    ("ref-chosen--inf", "rc", -INF),  # ρ_c = +∞, u = +∞
    ("policy-chosen-+inf", "pc", INF),  # not a log-prob, but the same limits: ρ_c = +∞
]
BASE = {"pc": (-3.0, -5.0), "pr": (-4.0, -4.5), "rc": (-3.5, -5.5), "rr": (-3.2, -4.0)}
TYPES = [*DPO_LOSS_TYPES, "ipo+lengths"]
LENGTHS = (torch.tensor([3.0, 5.0]), torch.tensor([4.0, 2.0]))


def _inputs(overrides, dtype, base=BASE):
    out = {}
    for k, (v0, v1) in base.items():
        v0 = overrides.get(k, v0)
        out[k] = torch.tensor([v0, v1], dtype=dtype, requires_grad=True)
    return out


def _loss(loss_type, x, ls=0.0):
    kw = {}
    if loss_type == "ipo+lengths":
        loss_type = "ipo"
        kw = {"chosen_lengths": LENGTHS[0], "rejected_lengths": LENGTHS[1]}
    return dpo_loss(
        x["pc"], x["pr"], x["rc"], x["rr"], beta=BETA, loss_type=loss_type, label_smoothing=ls, **kw
    )[0]


def _naive(loss_type, x, ls, delta=None):
    pc, pr, rc, rr = x["pc"], x["pr"], x["rc"], x["rr"]
    if loss_type == "ipo+lengths":
        return naive_dpo(pc, pr, rc, rr, BETA, "ipo", ls, LENGTHS)
    if loss_type == "bco_pair_shift":  # δ over the finite rewards only (see dpo_loss)
        lsig = lambda v: torch.log(torch.sigmoid(v))
        a, b = BETA * (pc - rc), BETA * (pr - rr)
        return -lsig(a - delta) - lsig(-(b - delta))
    return naive_dpo(pc, pr, rc, rr, BETA, loss_type, ls)


def _grads(losses, x, keys=BASE):
    return torch.autograd.grad(losses.sum(), [x[k] for k in keys])


def _assert_limit(got: torch.Tensor, at_l: torch.Tensor, at_2l: torch.Tensor, what: str):
    got, at_l, at_2l = got.double(), at_l.double(), at_2l.double()
    assert not torch.isnan(got).any(), f"{what}: NaN {got.tolist()}"
    fin = torch.isfinite(got)
    torch.testing.assert_close(got[fin], at_l[fin], rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")
    for g, w1, w2 in zip(got[~fin].tolist(), at_l[~fin].tolist(), at_2l[~fin].tolist(), strict=True):
        assert math.copysign(1, g) * (w2 - w1) > GROWTH, f"{what}: {g} but {w1} at ±L, {w2} at ±2L"


def _reference(loss_type, overrides, ls, delta, base=BASE, keys=BASE):
    """naive_dpo (float64) and its gradients with each infinity replaced by ±L and by ±2L."""
    out = []
    for scale in (L, 2 * L):
        x = _inputs({k: math.copysign(scale, v) for k, v in overrides.items()}, torch.float64, base)
        want = _naive(loss_type, x, ls, delta)
        out.append((want.detach(), _grads(want, x, keys)))
    return out


# sigmoid with ε > 0 is cdpo (with a FutureWarning), covered as cdpo
TYPE_EPS = [(lt, ls) for lt in TYPES for ls in (0.0, 0.1) if not (lt == "sigmoid" and ls)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("key", "value"), [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
@pytest.mark.parametrize(("loss_type", "ls"), TYPE_EPS, ids=[f"{lt}-eps{ls}" for lt, ls in TYPE_EPS])
def test_infinite_log_prob_gives_the_limit_and_its_gradient(loss_type, ls, key, value, dtype):
    x = _inputs({key: value}, dtype)
    losses = _loss(loss_type, x, ls)
    grads = _grads(losses, x)

    finite_rewards = BETA * torch.cat([(x["pc"] - x["rc"]).detach(), (x["pr"] - x["rr"]).detach()]).double()
    delta = finite_rewards[torch.isfinite(finite_rewards)].mean()
    (w1, g1), (w2, g2) = _reference(loss_type, {key: value}, ls, delta)

    _assert_limit(losses, w1, w2, f"{loss_type} loss")
    for k, g, a, b in zip(BASE, grads, g1, g2, strict=True):
        _assert_limit(g, a, b, f"{loss_type} d/d{k}")
    # the finite pair is untouched by its neighbour's infinity
    assert torch.isfinite(losses[1]) and all(torch.isfinite(g[1]) for g in grads)


def test_sigmoid_limits_by_hand():
    """The issue's case: a rejected log-prob of −inf makes the pair infinitely well separated:
    loss 0 and gradient 0. A chosen log-prob of −inf: loss +inf, but a finite push of −β on it."""
    pc, pr = torch.tensor([-2.0, -INF]), torch.tensor([-INF, -3.0])
    for x in (pc, pr):
        x.requires_grad_(True)
    rc, rr = torch.tensor([-2.5, -2.0]), torch.tensor([-3.0, -3.5])
    losses, cr, rw = dpo_loss(pc, pr, rc, rr, beta=0.25)
    assert losses.tolist() == [0.0, INF]
    assert rw[0].item() == -INF and cr[1].item() == -INF  # rewards keep the infinities
    g_pc, g_pr = torch.autograd.grad(losses.sum(), (pc, pr))
    assert g_pc.tolist() == [0.0, -0.25] and g_pr.tolist() == [0.0, 0.25]


def test_ipo_limit_is_infinite_with_infinite_gradient():
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-INF], requires_grad=True)
    losses = dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), loss_type="ipo")[0]
    g_pc, g_pr = torch.autograd.grad(losses.sum(), (pc, pr))
    assert losses.item() == INF and g_pc.item() == INF and g_pr.item() == -INF


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_log_ratio_inf_minus_inf_raises(loss_type):
    """Policy and reference both give the chosen completion probability 0: ρ_c = −inf − (−inf)."""
    x = torch.tensor([-1.0, -INF])
    with pytest.raises(ValueError, match=r"chosen log-ratio .* is ∞ − ∞ at pair\(s\) \[1\]"):
        dpo_loss(x, torch.tensor([-2.0, -2.0]), x.clone(), torch.tensor([-2.0, -2.0]), loss_type=loss_type)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_margin_inf_minus_inf_raises_only_where_the_loss_uses_it(loss_type):
    """The policy gives both completions probability 0: ρ_c = ρ_r = −∞ and u = ∞ − ∞. Types that
    use u raise; those that use ρ_c and ρ_r separately have a limit (checked against ±L)."""
    pc = torch.tensor([-INF, -1.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-INF, -2.0], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-1.0, -1.5], dtype=torch.float64)
    rr = torch.tensor([-2.0, -1.5], dtype=torch.float64)
    uses_margin = loss_type not in ("nca_pair", "bco_pair", "bco_pair_shift", "sppo_hard", "apo_zero")
    if uses_margin:
        with pytest.raises(ValueError, match=r"margin u = ρ_c − ρ_r is ∞ − ∞ at pair\(s\) \[0\]"):
            dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type)
        return
    losses = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type)[0]
    g = torch.autograd.grad(losses.sum(), (pc, pr))
    delta = BETA * torch.tensor([-1.0 + 1.5, -2.0 + 1.5], dtype=torch.float64).mean()  # the finite pair
    base = {"pc": (-INF, -1.0), "pr": (-INF, -2.0), "rc": (-1.0, -1.5), "rr": (-2.0, -1.5)}
    (w1, g1), (w2, g2) = _reference(loss_type, {"pc": -INF, "pr": -INF}, 0.0, delta, base, keys=("pc", "pr"))
    _assert_limit(losses, w1, w2, loss_type)
    for a, b1, b2 in zip(g, g1, g2, strict=True):
        _assert_limit(a, b1, b2, f"{loss_type} grad")


def test_bco_pair_shift_baseline_ignores_infinite_rewards():
    """δ is a statistic of the batch: one −inf log-prob must not make every other pair infinite."""
    pc, pr = torch.tensor([-1.0, -2.0, -INF]), torch.tensor([-2.0, -1.0, -3.0])
    rc, rr = torch.tensor([-1.5, -1.5, -1.0]), torch.tensor([-1.5, -1.5, -2.0])
    losses = dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="bco_pair_shift")[0]
    # finite rewards: βρ_c = [0.5, -0.5], βρ_r = [-0.5, 0.5, -1.0] → δ = -0.2
    d = -0.2
    lsig = lambda v: math.log(1 / (1 + math.exp(-v)))
    want = [-lsig(0.5 - d) - lsig(-(-0.5 - d)), -lsig(-0.5 - d) - lsig(-(0.5 - d)), INF]
    assert losses.tolist() == pytest.approx(want, rel=1e-6)


def test_discopop_is_finite_for_large_finite_margins():
    """exp(−z)·σ(z/τ) overflowed to inf · 0 = NaN for z < −88 in float32 (before any infinity)."""
    u = torch.tensor(
        [-700.0, -250.0, -100.0, 0.3, 100.0, 1000.0], requires_grad=True
    )  # float64 ref: |z| ≤ 700
    zero = torch.zeros(6)
    losses = dpo_loss(u, zero, zero, zero, beta=1.0, loss_type="discopop")[0]
    (g,) = torch.autograd.grad(losses.sum(), (u,))
    ud = u.detach().double()
    want = naive_dpo(ud, zero, zero, zero, 1.0, "discopop", 0.0)
    torch.testing.assert_close(losses.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(g).all() and g[:3].tolist() == pytest.approx([-1.0] * 3, rel=1e-6)


def test_masked_vocabulary_token_gives_finite_logit_gradients():
    """End to end: the rejected completion contains a token whose logit is masked to −inf (so its
    log-prob is −inf); DPO's loss for that pair is 0 and every logit gradient is finite. The
    same token in the chosen completion pushes its (masked) logit's log-prob up with slope β."""
    torch.manual_seed(0)
    V, T = 7, 4
    logits = torch.randn(4, T, V)
    labels = torch.randint(0, V - 1, (4, T))
    labels[2, 1] = V - 1  # rejected row of pair 0
    labels[1, 2] = V - 1  # chosen row of pair 1
    logits[..., V - 1] = -INF
    logits.requires_grad_(True)
    token_logps = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    seq = sequence_logps(token_logps, torch.ones(4, T, dtype=torch.bool))
    ref = torch.tensor([-8.0, -9.0, -8.5, -7.5])
    losses = dpo_loss(seq[:2], seq[2:], ref[:2], ref[2:], beta=0.1)[0]
    assert losses[0].item() == 0.0 and losses[1].item() == INF
    losses[0].backward(retain_graph=True)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0
    logits.grad = None
    losses[1].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() > 0


def test_simpo_limits():
    c = torch.tensor([-1.0, -INF, -1.0], requires_grad=True)
    r = torch.tensor([-INF, -1.0, -2.0])
    losses = simpo_loss(c, r, beta=2.0, gamma_beta_ratio=0.5)[0]
    (g,) = torch.autograd.grad(losses.sum(), (c,))
    assert losses[0].item() == 0.0 and losses[1].item() == INF and torch.isfinite(losses[2])
    assert g[0].item() == 0.0 and g[1].item() == pytest.approx(-2.0)  # slope −β
    smoothed = simpo_loss(c, r, beta=2.0, label_smoothing=0.1)[0]
    assert smoothed[:2].tolist() == [INF, INF] and not torch.isnan(smoothed).any()
    with pytest.raises(ValueError, match=r"∞ − ∞ at pair\(s\) \[0\]"):
        simpo_loss(torch.tensor([-INF]), torch.tensor([-INF]))


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", TYPES)
def test_limits_on_cuda_equal_cpu(loss_type):
    """CUDA's logsigmoid / sigmoid / where kernels must give the same limits and slopes (no NaN)."""
    results = []
    ls = 0.0 if loss_type == "sigmoid" else 0.1  # sigmoid with ε > 0 is cdpo, covered as cdpo
    for device in ("cpu", "cuda"):
        for key, value in [s[1:] for s in SCENARIOS]:
            x = {
                k: v.detach().to(device).requires_grad_()
                for k, v in _inputs({key: value}, torch.float32).items()
            }
            kw = {}
            lt = loss_type
            if loss_type == "ipo+lengths":
                lt, kw = (
                    "ipo",
                    {"chosen_lengths": LENGTHS[0].to(device), "rejected_lengths": LENGTHS[1].to(device)},
                )
            losses = dpo_loss(
                x["pc"], x["pr"], x["rc"], x["rr"], beta=BETA, loss_type=lt, label_smoothing=ls, **kw
            )[0]
            grads = torch.autograd.grad(losses.sum(), list(x.values()))
            results.append([t.detach().cpu() for t in (losses, *grads)])
    n = len(SCENARIOS)
    for cpu, cuda in zip(results[:n], results[n:], strict=True):
        for a, b in zip(cpu, cuda, strict=True):
            assert not torch.isnan(b).any()
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, equal_nan=False)
