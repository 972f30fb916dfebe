"""Fused-linear losses against the unfused path: logits = hidden @ weight.T + bias →
token_logprobs_reference → the same plain loss. fp32: tight; bf16: the 2x-plain rule against a
float64 unfused run. Gradients w.r.t. hidden, weight and bias; two chunk sizes; error cases."""

import pytest
import torch
from helpers import assert_within_rule

from fastalign.losses import (
    FusedLinearKTOLoss,
    FusedLinearPolicyLoss,
    FusedLinearPreferenceLoss,
    dpo_loss,
    kl_estimate,
    kto_loss,
    orpo_loss,
    ppo_policy_loss,
    sequence_logps,
    simpo_loss,
)
from fastalign.losses.policy import aggregate
from fastalign.ops import linear_logprobs, token_logprobs_reference

IGN = -100
T, H, V = 10, 24, 257
GRADS = ("d_hidden", "d_weight", "d_bias")


def make_labels(rows, t=T, v=V):
    labels = torch.randint(0, v, (rows, t))
    for r in range(rows):
        p = int(torch.randint(1, 4, ()))  # prompt
        pad = int(torch.randint(0, 4, ()))  # right padding
        labels[r, :p] = IGN
        if pad:
            labels[r, t - pad :] = IGN
    return labels


def make_hidden(rows, t=T, h=H):
    return torch.randn(rows, t, h)


def make_head(v=V, h=H, scale=2.0):
    return torch.randn(v, h) / h**0.5 * scale, torch.randn(v) * 0.5


def unfused(hidden, weight, labels, bias=None, **kw):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return token_logprobs_reference(logits, labels, ignore_index=IGN, **kw)


def leaves(dtype, hidden, weight, bias):
    return [x.detach().to(dtype).clone().requires_grad_(True) for x in (hidden, weight, bias)]


def loss_and_grads(fn, dtype, hidden, weight, bias):
    h, w, b = leaves(dtype, hidden, weight, bias)
    loss = fn(h, w, b)
    loss.backward()
    return [loss.detach(), h.grad, w.grad, b.grad]


def compare(fused_fn, plain_fn, dtype, hidden, weight, bias):
    """fp32: fused vs unfused fp32, tight; bf16: 2x-plain rule vs a float64 unfused run. Inputs
    are rounded to `dtype` first so that all three runs see the same values."""
    hidden, weight, bias = (x.to(dtype) for x in (hidden, weight, bias))
    fused = loss_and_grads(fused_fn, dtype, hidden, weight, bias)
    plain = loss_and_grads(plain_fn, dtype, hidden, weight, bias)
    for name, f in zip(("loss", *GRADS), fused, strict=True):
        assert torch.isfinite(f).all(), name
    if dtype == torch.float32:
        for name, f, p in zip(("loss", *GRADS), fused, plain, strict=True):
            torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-5, msg=name)
    else:
        truth = loss_and_grads(plain_fn, torch.float64, hidden, weight, bias)
        for name, f, p, t in zip(("loss", *GRADS), fused, plain, truth, strict=True):
            assert_within_rule(name, f, p, t, dtype)
    return fused


# ---------------------------------------------------------------------------------------------
# preference
# ---------------------------------------------------------------------------------------------
PREF_CASES = [  # (method, constructor kwargs)
    ("dpo", {}),
    ("dpo", {"loss_type": "hinge", "beta": 0.5}),
    ("dpo", {"label_smoothing": 0.1, "average_log_prob": True}),
    ("ipo", {"beta": 0.5}),
    ("simpo", {"beta": 2.0, "gamma_beta_ratio": 0.3}),
    ("orpo", {"lam": 0.2}),
]


def plain_preference(mod, h, w, b, labels, ref_h=None, ref_w=None):
    bsz = h.shape[0] // 2
    mask = labels != IGN
    tok = unfused(h, w, labels, b)
    seq = sequence_logps(tok, mask, average=mod.average_log_prob)
    c, r = seq[:bsz], seq[bsz:]
    if mod.method in ("dpo", "ipo"):
        with torch.no_grad():
            ref = sequence_logps(unfused(ref_h, ref_w, labels), mask, average=mod.average_log_prob)
        losses = dpo_loss(
            c,
            r,
            ref[:bsz],
            ref[bsz:],
            beta=mod.beta,
            loss_type=mod.loss_type,
            label_smoothing=mod.label_smoothing,
        )[0]
    elif mod.method == "simpo":
        losses = simpo_loss(c, r, beta=mod.beta, label_smoothing=mod.label_smoothing, **mod.method_kwargs)[0]
    else:
        nll = -sequence_logps(tok[:bsz], mask[:bsz], average=True)
        losses = orpo_loss(c, r, nll, **mod.method_kwargs)[0]
    return losses.mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("method", "kw"), PREF_CASES)
def test_preference_matches_unfused(method, kw, dtype):
    bsz = 3
    hidden, labels = make_hidden(2 * bsz), make_labels(2 * bsz)
    weight, bias = make_head()
    ref_h = (hidden + 0.3 * torch.randn_like(hidden)).to(dtype)
    ref_w = (weight + 0.05 * torch.randn_like(weight)).to(dtype)
    mod = FusedLinearPreferenceLoss(method, chunk_size=64, **kw)
    ref_kw = dict(ref_hidden=ref_h, ref_weight=ref_w) if mod.needs_reference else {}

    def fused(h, w, b):
        rk = {k: v.to(h.dtype) for k, v in ref_kw.items()}
        return mod(h, w, labels, bias=b, **rk)[0]

    def plain(h, w, b):
        return plain_preference(mod, h, w, b, labels, ref_h.to(h.dtype), ref_w.to(h.dtype))

    compare(fused, plain, dtype, hidden, weight, bias)


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo"])
def test_preference_chunk_sizes_and_metrics(method):
    bsz = 2
    hidden, labels = make_hidden(2 * bsz), make_labels(2 * bsz)
    weight, bias = make_head()
    ref_h, ref_w = hidden + 0.2 * torch.randn_like(hidden), weight.clone()
    outs = []
    for chunk in (7, 100):
        mod = FusedLinearPreferenceLoss(method, chunk_size=chunk)
        ref_kw = dict(ref_hidden=ref_h, ref_weight=ref_w) if mod.needs_reference else {}
        outs.append(
            loss_and_grads(
                lambda h, w, b, mod=mod, ref_kw=ref_kw: mod(h, w, labels, bias=b, **ref_kw)[0],
                torch.float32,
                hidden,
                weight,
                bias,
            )
        )
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    h = hidden.clone().requires_grad_(True)
    loss, m = mod(h, weight, labels, bias=bias, **ref_kw)
    assert loss.dim() == 0 and loss.requires_grad
    for k in ("chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"):
        assert m[k].shape == (bsz,) and not m[k].requires_grad, k
    assert not m["accuracy"].requires_grad and not m["margin"].requires_grad
    diff = m["chosen_rewards"] - m["rejected_rewards"]
    torch.testing.assert_close(m["accuracy"], (diff > 0).float().mean())
    torch.testing.assert_close(m["margin"], diff.mean())
    avg = method != "dpo"
    assert mod.average_log_prob is avg
    seq = sequence_logps(linear_logprobs(hidden, weight, labels, bias=bias), labels != IGN, average=avg)
    torch.testing.assert_close(m["chosen_logps"], seq[:bsz])
    torch.testing.assert_close(m["rejected_logps"], seq[bsz:])


@pytest.mark.parametrize("method", ["dpo", "ipo"])
def test_preference_ref_hidden_equals_precomputed(method):
    bsz = 2
    hidden, labels = make_hidden(2 * bsz), make_labels(2 * bsz)
    weight, bias = make_head()
    ref_h, ref_w = torch.randn_like(hidden), weight + 0.1 * torch.randn_like(weight)
    mod = FusedLinearPreferenceLoss(method, chunk_size=50)
    ref_tok = linear_logprobs(ref_h, ref_w, labels, chunk_size=50)
    ref = sequence_logps(ref_tok, labels != IGN, average=mod.average_log_prob)
    a = loss_and_grads(
        lambda h, w, b: mod(h, w, labels, bias=b, ref_hidden=ref_h, ref_weight=ref_w)[0],
        torch.float32,
        hidden,
        weight,
        bias,
    )
    b_ = loss_and_grads(
        lambda h, w, b: mod(h, w, labels, bias=b, ref_chosen_logps=ref[:bsz], ref_rejected_logps=ref[bsz:])[
            0
        ],
        torch.float32,
        hidden,
        weight,
        bias,
    )
    for x, y in zip(a, b_, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # the reference inputs get no gradient
    rh, rw = ref_h.clone().requires_grad_(True), ref_w.clone().requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    mod(h, weight, labels, ref_hidden=rh, ref_weight=rw)[0].backward()
    assert rh.grad is None and rw.grad is None and h.grad is not None


def test_preference_errors():
    hidden, labels = make_hidden(4), make_labels(4)
    weight, _ = make_head()
    with pytest.raises(ValueError, match="method"):
        FusedLinearPreferenceLoss("kto")
    with pytest.raises(ValueError, match="loss_type"):
        FusedLinearPreferenceLoss("dpo", loss_type="nope")
    with pytest.raises(ValueError, match="unexpected keyword"):
        FusedLinearPreferenceLoss("dpo", lam=0.1)
    with pytest.raises(ValueError, match="beta"):
        FusedLinearPreferenceLoss("simpo", beta=0.0)
    dpo = FusedLinearPreferenceLoss("dpo")
    with pytest.raises(ValueError, match="needs reference"):
        dpo(hidden, weight, labels)
    with pytest.raises(ValueError, match="together"):
        dpo(hidden, weight, labels, ref_chosen_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="together"):
        dpo(hidden, weight, labels, ref_hidden=hidden)
    with pytest.raises(ValueError, match="not both"):
        dpo(hidden, weight, labels, ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2),
            ref_hidden=hidden, ref_weight=weight)  # fmt: skip
    with pytest.raises(ValueError, match=r"\(2,\)"):
        dpo(hidden, weight, labels, ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="ref_hidden shape"):
        dpo(hidden, weight, labels, ref_hidden=hidden[:, :-1], ref_weight=weight)
    with pytest.raises(ValueError, match="B chosen then B rejected"):
        dpo(hidden[:3], weight, labels[:3], ref_hidden=hidden[:3], ref_weight=weight)
    with pytest.raises(ValueError, match=r"\(B, T, H\)"):
        dpo(hidden[0], weight, labels[0], ref_hidden=hidden[0], ref_weight=weight)
    with pytest.raises(ValueError, match="reference-free"):
        FusedLinearPreferenceLoss("simpo")(hidden, weight, labels, ref_hidden=hidden, ref_weight=weight)
    bad = labels.clone()
    bad[0, -1] = V
    with pytest.raises(ValueError):
        FusedLinearPreferenceLoss("orpo")(hidden, weight, bad)


# ---------------------------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------------------------
def plain_kto(mod, h, w, b, labels, desirable, ref_h, ref_w, kl_h, kl_labels, kl_ref_h):
    seq = lambda tok, y: sequence_logps(tok, y != IGN)
    policy = seq(unfused(h, w, labels, b), labels)
    with torch.no_grad():
        ref = seq(unfused(ref_h, ref_w, labels), labels)
        z0 = seq(unfused(kl_h, w, kl_labels, b), kl_labels) - seq(
            unfused(kl_ref_h, ref_w, kl_labels), kl_labels
        )
        z0 = z0.mean()
    losses = kto_loss(
        policy,
        ref,
        desirable,
        z0,
        beta=mod.beta,
        desirable_weight=mod.desirable_weight,
        undesirable_weight=mod.undesirable_weight,
    )[0]
    return losses.mean()


def kto_case(bsz=3):
    hidden, labels = make_hidden(bsz), make_labels(bsz)
    weight, bias = make_head()
    ref_h = hidden + 0.3 * torch.randn_like(hidden)
    ref_w = weight + 0.05 * torch.randn_like(weight)
    # mismatched pairs: completions rolled by one (the KTO paper / TRL's KL dataset)
    kl_h, kl_labels = torch.roll(hidden, 1, 0) + 0.1 * torch.randn_like(hidden), torch.roll(labels, 1, 0)
    kl_ref_h = kl_h + 0.5 * torch.randn_like(kl_h)
    desirable = torch.tensor([True, False, True][:bsz])
    return hidden, labels, weight, bias, ref_h, ref_w, kl_h, kl_labels, kl_ref_h, desirable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kto_matches_unfused(dtype):
    hidden, labels, weight, bias, ref_h, ref_w, kl_h, kl_labels, kl_ref_h, desirable = kto_case()
    mod = FusedLinearKTOLoss(beta=0.5, desirable_weight=1.0, undesirable_weight=1.3, chunk_size=64)
    ref_h, ref_w, kl_ref_h = (x.to(dtype) for x in (ref_h, ref_w, kl_ref_h))
    kl_h = kl_h.to(dtype)

    def fused(h, w, b):
        cast = lambda x: x.to(h.dtype)
        return mod(h, w, labels, desirable, bias=b, ref_hidden=cast(ref_h), ref_weight=cast(ref_w),
                   kl_hidden=cast(kl_h), kl_labels=kl_labels, kl_ref_hidden=cast(kl_ref_h))[0]  # fmt: skip

    def plain(h, w, b):
        cast = lambda x: x.to(h.dtype)
        return plain_kto(mod, h, w, b, labels, desirable, cast(ref_h), cast(ref_w), cast(kl_h), kl_labels,
                         cast(kl_ref_h))  # fmt: skip

    compare(fused, plain, dtype, hidden, weight, bias)


def test_kto_chunks_precomputed_and_metrics():
    hidden, labels, weight, bias, ref_h, ref_w, kl_h, kl_labels, kl_ref_h, desirable = kto_case()
    kw = dict(ref_hidden=ref_h, ref_weight=ref_w, kl_hidden=kl_h, kl_labels=kl_labels, kl_ref_hidden=kl_ref_h)
    runs = []
    for chunk in (7, 100):
        mod = FusedLinearKTOLoss(beta=0.3, chunk_size=chunk)
        runs.append(
            loss_and_grads(
                lambda h, w, b, mod=mod: mod(h, w, labels, desirable, bias=b, **kw)[0],
                torch.float32,
                hidden,
                weight,
                bias,
            )
        )
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    seq = lambda hh, ww, y, bb=None: sequence_logps(
        linear_logprobs(hh, ww, y, bias=bb, chunk_size=100), y != IGN
    )
    ref = seq(ref_h, ref_w, labels)
    z0 = (seq(kl_h, weight, kl_labels, bias) - seq(kl_ref_h, ref_w, kl_labels)).mean()
    pre = loss_and_grads(
        lambda h, w, b: mod(h, w, labels, desirable, bias=b, ref_logps=ref, kl_ref_point=z0)[0],
        torch.float32,
        hidden,
        weight,
        bias,
    )
    for a, b in zip(runs[1], pre, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    m = mod(hidden, weight, labels, desirable, bias=bias, **kw)[1]
    torch.testing.assert_close(m["kl_ref_point"], z0.clamp(min=0))
    torch.testing.assert_close(m["rewards"], 0.3 * (m["logps"] - ref))
    torch.testing.assert_close(m["rewards_desirable"], m["rewards"][desirable].mean())
    torch.testing.assert_close(m["rewards_undesirable"], m["rewards"][~desirable].mean())
    assert all(not v.requires_grad for v in m.values())
    # the KL and reference inputs get no gradient; a negative reference point is clamped to 0
    kh = kl_h.clone().requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    mod(h, weight, labels, desirable, ref_logps=ref, kl_hidden=kh, kl_labels=kl_labels,
        kl_ref_hidden=kl_ref_h, ref_weight=ref_w)[0].backward()  # fmt: skip
    assert kh.grad is None and h.grad is not None
    a = mod(hidden, weight, labels, desirable, ref_logps=ref, kl_ref_point=-5.0)[0]
    b = mod(hidden, weight, labels, desirable, ref_logps=ref, kl_ref_point=0.0)[0]
    assert a.item() == b.item()


def test_kto_errors():
    hidden, labels, weight, _, ref_h, ref_w, kl_h, kl_labels, kl_ref_h, desirable = kto_case()
    mod = FusedLinearKTOLoss()
    ref = torch.zeros(3)
    with pytest.raises(ValueError, match="needs reference"):
        mod(hidden, weight, labels, desirable, kl_ref_point=0.0)
    with pytest.raises(ValueError, match="not both"):
        mod(
            hidden,
            weight,
            labels,
            desirable,
            ref_logps=ref,
            ref_hidden=ref_h,
            ref_weight=ref_w,
            kl_ref_point=0.0,
        )
    with pytest.raises(ValueError, match="KL reference point"):
        mod(hidden, weight, labels, desirable, ref_logps=ref)
    with pytest.raises(ValueError, match="KL reference point"):
        mod(
            hidden,
            weight,
            labels,
            desirable,
            ref_logps=ref,
            kl_hidden=kl_h,
            kl_labels=kl_labels,
            ref_weight=ref_w,
        )
    with pytest.raises(ValueError, match="not both"):
        mod(hidden, weight, labels, desirable, ref_logps=ref, kl_ref_point=0.0, kl_hidden=kl_h)
    with pytest.raises(ValueError, match="ref_weight"):
        mod(hidden, weight, labels, desirable, ref_hidden=ref_h, kl_ref_point=0.0)
    with pytest.raises(ValueError, match="ref_weight"):
        mod(hidden, weight, labels, desirable, ref_logps=ref, kl_hidden=kl_h, kl_labels=kl_labels,
            kl_ref_hidden=kl_ref_h)  # fmt: skip
    with pytest.raises(ValueError, match=r"\(3,\)"):
        mod(hidden, weight, labels, desirable, ref_logps=torch.zeros(2), kl_ref_point=0.0)
    with pytest.raises(ValueError, match="desirable"):
        mod(hidden, weight, labels, desirable[:2], ref_logps=ref, kl_ref_point=0.0)
    with pytest.raises(ValueError, match="beta"):
        FusedLinearKTOLoss(beta=-1.0)
    with pytest.raises(ValueError, match="undesirable_weight"):
        FusedLinearKTOLoss(undesirable_weight=-1.0)


# ---------------------------------------------------------------------------------------------
# PPO / GRPO
# ---------------------------------------------------------------------------------------------
POLICY_CASES = [
    {},
    {"kl_coef": 0.1, "kl_kind": "k3", "entropy_coef": 0.01, "temperature": 0.7},
    {"kl_coef": 0.05, "kl_kind": "k1", "agg": "seq-mean-token-mean", "clip_eps_high": 0.28},
    {
        "kl_kind": "k2",
        "kl_coef": 0.2,
        "entropy_coef": 0.05,
        "agg": "seq-mean-token-sum-norm",
        "dual_clip": 3.0,
    },
    {"entropy_coef": 0.02, "agg": "seq-mean-token-sum"},
]


def policy_case(bsz=3):
    hidden, labels = make_hidden(bsz), make_labels(bsz)
    weight, bias = make_head()
    with torch.no_grad():
        base = unfused(hidden.double(), weight.double(), labels, bias.double()).float()
    old = base + 0.3 * torch.randn_like(base)  # ratios spread across the clip range
    ref = base + 0.3 * torch.randn_like(base)
    adv = torch.randn(bsz, T)
    mask = labels != IGN
    mask[0, -1] = True  # a mask = 1 on an ignored label is dropped by the module
    mask[1, 4] = False
    return hidden, labels, weight, bias, old, ref, adv, mask


def plain_policy(mod, h, w, b, labels, old, adv, mask, ref):
    want_ent = mod.entropy_coef > 0
    out = unfused(h, w, labels, b, temperature=mod.temperature, return_entropy=want_ent)
    logps, ent = out if want_ent else (out, None)
    valid = mask & (labels != IGN)
    loss, _ = ppo_policy_loss(
        logps, old, adv, valid, clip_eps=mod.clip_eps, clip_eps_high=mod.clip_eps_high,
        dual_clip=mod.dual_clip, agg=mod.agg,
    )  # fmt: skip
    if mod.kl_coef > 0:
        loss = loss + mod.kl_coef * aggregate(
            kl_estimate(logps, ref.to(logps.dtype), mod.kl_kind), valid, mod.agg
        )
    if want_ent:
        loss = loss - mod.entropy_coef * aggregate(ent, valid, mod.agg)
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", POLICY_CASES)
def test_policy_matches_unfused(kw, dtype):
    hidden, labels, weight, bias, old, ref, adv, mask = policy_case()
    mod = FusedLinearPolicyLoss(chunk_size=64, **kw)

    def fused(h, w, b):
        return mod(h, w, labels, old, adv, mask, bias=b, ref_logps=ref)[0]

    def plain(h, w, b):
        return plain_policy(mod, h, w, b, labels, old, adv, mask, ref)

    compare(fused, plain, dtype, hidden, weight, bias)


def test_policy_chunks_and_stats():
    hidden, labels, weight, bias, old, ref, adv, mask = policy_case()
    kw = {"kl_coef": 0.1, "entropy_coef": 0.01, "temperature": 1.3}
    runs = []
    for chunk in (7, 100):
        mod = FusedLinearPolicyLoss(chunk_size=chunk, **kw)
        runs.append(
            loss_and_grads(
                lambda h, w, b, mod=mod: mod(h, w, labels, old, adv[:, 0], mask, bias=b, ref_logps=ref)[0],
                torch.float32,
                hidden,
                weight,
                bias,
            )
        )
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    s = mod(hidden, weight, labels, old, adv, mask, bias=bias, ref_logps=ref)[1]
    valid = mask & (labels != IGN)
    logps, ent = linear_logprobs(hidden, weight, labels, bias=bias, temperature=1.3, return_entropy=True)
    torch.testing.assert_close(s["logps"], logps)
    torch.testing.assert_close(s["entropy_tokens"], ent)
    torch.testing.assert_close(s["entropy"], ent[valid].mean())
    torch.testing.assert_close(s["kl"], kl_estimate(logps, ref, "k3")[valid].mean())
    for k in ("clipfrac", "approx_kl", "ratio_mean", "ratio_max"):
        assert s[k].dim() == 0, k
    assert all(not v.requires_grad for v in s.values())
    # no entropy computed or reported without an entropy bonus; kl is still logged with ref_logps
    _, s0 = FusedLinearPolicyLoss()(hidden, weight, labels, old, adv, mask, bias=bias, ref_logps=ref)
    assert "entropy" not in s0 and "kl" in s0
    _, s1 = FusedLinearPolicyLoss()(hidden, weight, labels, old, adv, mask, bias=bias)
    assert "kl" not in s1


def test_policy_errors():
    hidden, labels, weight, _, old, ref, adv, mask = policy_case()
    with pytest.raises(ValueError, match="needs ref_logps"):
        FusedLinearPolicyLoss(kl_coef=0.1)(hidden, weight, labels, old, adv, mask)
    with pytest.raises(ValueError, match="kl_kind"):
        FusedLinearPolicyLoss(kl_kind="k4")
    with pytest.raises(ValueError, match="agg"):
        FusedLinearPolicyLoss(agg="mean")
    with pytest.raises(ValueError, match="entropy_coef"):
        FusedLinearPolicyLoss(entropy_coef=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearPolicyLoss(temperature=0.0)
    with pytest.raises(ValueError, match="mask"):
        FusedLinearPolicyLoss()(hidden, weight, labels, old, adv, mask[:, :-1])
    with pytest.raises(ValueError, match="ref_logps shape"):
        FusedLinearPolicyLoss(kl_coef=0.1)(hidden, weight, labels, old, adv, mask, ref_logps=ref[:, :-1])
    with pytest.raises(ValueError, match="old_logps"):
        FusedLinearPolicyLoss()(hidden, weight, labels, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="dual_clip"):
        FusedLinearPolicyLoss(dual_clip=0.5)(hidden, weight, labels, old, adv, mask)


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, fastalign.losses; print('triton' in sys.modules, 'fastalign.ops' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
