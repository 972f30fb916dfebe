"""The gradient filter of `linear_logprobs` (grad_filter): the keep rule, the documented error
bound against float64, the numerics rule with the filter on, and that every backend (and both
row-compaction modes of the C++ one) computes the same filtered gradient."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from helpers import assert_within_rule, cpu_backends

from fastalign.ops import linear_logprobs, linear_logprobs_reference
from fastalign.ops.linear_logprobs import (
    FILTER_BLOCK,
    grad_filter_keep,
    grad_filter_stats,
    resolve_grad_filter,
)

# The module itself (fastalign.ops re-exports a function of the same name).
llmod = importlib.import_module("fastalign.ops.linear_logprobs")


def peaky_case(n, h, v, dtype, *, bias=True, scale=8.0, seed=0, ignore_frac=0.2):
    """Logits with a spread like a language model's (std ~ scale): most blocks of 256 columns
    hold a negligible share of each row's probability."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (scale / h**0.5)
    b = torch.randn(v, generator=gen) * 2.0 if bias else None
    # Labels: mostly probable tokens (as in real text), some improbable ones.
    z = hidden @ weight.T + (b if b is not None else 0)
    labels = torch.where(
        torch.rand(n, generator=gen) < 0.7, z.argmax(1), torch.randint(0, v, (n,), generator=gen)
    )
    labels[torch.rand(n, generator=gen) < ignore_frac] = -100
    cast = lambda x: x.to(dtype) if x is not None else None
    return cast(hidden), cast(weight), cast(b), labels


def grads(fn, hidden, weight, bias, labels, g, gh, **kw):
    leaves = [
        t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)
    ]
    out = fn(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True, **kw)
    ((out[0] * g).sum() + (out[1] * gh).sum()).backward()
    return [out[0].detach(), out[1].detach()] + [t.grad if t is not None else None for t in leaves]


def filtered_run(n, h, v, dtype, *, seed=0, **kw):
    """A peaky case, random output gradients, and the fused op's (logp, entropy, grads) run on them
    with the gradient filter's stats recorded: (case, g, gh, fused, stats)."""
    case = peaky_case(n, h, v, dtype, seed=seed)
    g, gh = torch.randn(n), torch.randn(n)
    with grad_filter_stats() as stats:
        fused = grads(linear_logprobs, *case, g, gh, **kw)
    return case, g, gh, fused, stats


def drop_mask(keep: torch.Tensor, order: torch.Tensor | None, v: int) -> torch.Tensor:
    """(N, V) bool: the entries the filter dropped, in vocabulary columns. The blocks follow
    `order` (the backend's vocabulary order) when there is one."""
    drop = (keep == 0).repeat_interleave(FILTER_BLOCK, 1)[:, :v]  # by position
    if order is None:
        return drop
    out = torch.empty_like(drop)
    out[:, order] = drop  # position j holds vocabulary row order[j]
    return out


def label_blocks(labels: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    if order is None:
        return labels // FILTER_BLOCK
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel())
    return pos[labels] // FILTER_BLOCK


def masked_reference(hidden, weight, bias, labels, g, gh, keep, temperature, order=None):
    """float64 gradients with dz = 0 on the (row, block) pairs that keep drops: what a filtered
    backward must compute (up to its dtype's rounding)."""
    h64, w64 = hidden.double(), weight.double()
    b64 = bias.double() if bias is not None else None
    z = (h64 @ w64.T + (b64 if b64 is not None else 0)) / temperature
    logp = torch.log_softmax(z, 1)
    p = logp.exp()
    valid = labels != -100
    ent = -(p * logp).sum(1)
    gg = torch.where(valid, g.double(), 0.0)[:, None]
    hh = torch.where(valid, gh.double(), 0.0)[:, None]
    dz = -gg * p - hh * p * (logp + ent[:, None])
    dz[valid, labels[valid]] += gg[valid, 0]
    dz /= temperature
    drop = drop_mask(keep, order, weight.shape[0])
    dz = dz.masked_fill(drop, 0.0)
    return dz @ w64, dz.T @ h64, dz.sum(0) if bias is not None else None, p, ent


def test_resolve_grad_filter():
    assert resolve_grad_filter("auto", torch.bfloat16) == 2.0**-8
    assert resolve_grad_filter("auto", torch.float16) == 2.0**-11
    assert resolve_grad_filter("auto", torch.float32) == 0.0
    assert resolve_grad_filter("auto", torch.float64) == 0.0
    assert resolve_grad_filter(None, torch.bfloat16) == 0.0
    assert resolve_grad_filter(0, torch.bfloat16) == 0.0
    assert resolve_grad_filter(1e-3, torch.float32) == 1e-3
    for bad in ("on", -0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="grad_filter"):
            resolve_grad_filter(bad, torch.float32)
    for bad in (True, [0.1]):
        with pytest.raises(TypeError, match="grad_filter"):
            resolve_grad_filter(bad, torch.float32)


def test_keep_rule_drops_least_mass_within_budget_and_never_the_label_block():
    # Row 0: block shares 0.5, 0.3, 1e-3, 2e-3, 5e-4, rest in block 5 (label in block 2).
    shares = torch.tensor(
        [[0.5, 0.3, 1e-3, 2e-3, 5e-4, 0.1965], [0.25] * 4 + [1e-9, 1e-9]], dtype=torch.float64
    )
    lse = torch.tensor([1.5, -2.0], dtype=torch.float64)
    lmass = (shares.log() + lse[:, None]).float()
    labels = torch.tensor([2 * FILTER_BLOCK + 7, 0])
    keep = grad_filter_keep(lmass, lse, labels, -100, budget=3e-3, block=FILTER_BLOCK)
    # Row 0: 5e-4 then 2e-3 fit in 3e-3 (total 2.5e-3); block 2 (1e-3) would fit too but holds the label.
    assert keep[0].tolist() == [1, 1, 1, 0, 0, 1]
    assert keep[1].tolist() == [1, 1, 1, 1, 0, 0]
    ignored = grad_filter_keep(lmass, lse, torch.tensor([-100, 0]), -100, budget=3e-3, block=FILTER_BLOCK)
    assert ignored[0].sum() == 0 and ignored[1].tolist() == keep[1].tolist()
    # A NaN statistic keeps the whole row; nothing is dropped with budget 0 unless its mass is 0.
    nan_row = grad_filter_keep(
        torch.full((1, 3), float("nan")), lse[:1], labels[:1] * 0, -100, 0.5, FILTER_BLOCK
    )
    assert nan_row.tolist() == [[1, 1, 1]]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_fp32_auto_is_exact(backend):
    hidden, weight, b, labels = peaky_case(24, 32, 1300, torch.float32)
    g, gh = torch.randn(24), torch.randn(24)
    with grad_filter_stats() as stats:
        auto = grads(linear_logprobs, hidden, weight, b, labels, g, gh, backend=backend)
    off = grads(linear_logprobs, hidden, weight, b, labels, g, gh, backend=backend, grad_filter=None)
    assert stats == []  # no filter ran
    for a, o in zip(auto, off, strict=True):
        assert torch.equal(a, o)


def _bound_check(backend, dtype, budget, temperature, chunk=None):
    n, h, v = 40, 48, 2000
    (hidden, weight, b, labels), g, gh, fused, stats = filtered_run(
        n, h, v, dtype, backend=backend, grad_filter=budget, temperature=temperature, chunk_size=chunk
    )
    assert len(stats) == 1 and stats[0]["budget"] == budget
    st = stats[0]
    assert 0.1 < st["skipped_fraction"] < 1.0, st["skipped_fraction"]  # the filter really acts
    assert st["max_dropped_mass"] <= budget * (1 + 1e-5)
    keep = st["keep"]
    valid = labels != -100
    lab_block = label_blocks(labels[valid], st["order"])
    assert keep[valid].gather(1, lab_block[:, None]).all()  # the label's block is always kept
    assert (keep[~valid] == 0).all()

    truth = grads(
        linear_logprobs_reference,
        hidden.double(),
        weight.double(),
        b.double(),
        labels,
        g.double(),
        gh.double(),
        temperature=temperature,
    )
    # Values are never filtered.
    assert torch.allclose(fused[0].double(), truth[0], atol=1e-5) and torch.allclose(
        fused[1].double(), truth[1], atol=1e-4
    )
    # The documented bound: ||Δ dz_i||_1 <= δ (|g_i| + |h_i| (ln(V/δ) + H_i)) / T.
    ent = truth[1]
    row = budget * (g.double().abs() + gh.double().abs() * (math.log(v / budget) + ent)) / temperature
    row = torch.where(valid, row, 0.0)
    w_inf = weight.double().abs().max()
    slack = 1e-9 if dtype == torch.float64 else 2e-5 * max(1.0, truth[2].abs().max().item())
    err_h = (fused[2].double() - truth[2]).abs().max(1).values
    assert (err_h <= row * w_inf + slack).all(), (err_h - row * w_inf).max()
    err_w = (fused[3].double() - truth[3]).abs()
    bound_w = row[:, None].mul(hidden.double().abs()).sum(0)  # (H,): Σ_i row_i |hidden_ik|
    assert (err_w <= bound_w[None, :] + slack * max(1.0, truth[3].abs().max().item())).all()
    err_b = (fused[4].double() - truth[4]).abs()
    assert (err_b <= row.sum() + slack).all()
    # ... and the filter did change the gradient (a bound that held because nothing was dropped
    # would test nothing).
    assert (fused[3].double() - truth[3]).abs().max() > 0
    return fused, truth, keep, (hidden, weight, b, labels, g, gh)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_error_bound_against_float64(backend, temperature):
    _bound_check(backend, torch.float64, 2.0**-10, temperature)


@pytest.mark.parametrize("backend", cpu_backends())
def test_error_bound_fp32_explicit_budget(backend):
    _bound_check(backend, torch.float32, 2.0**-12, 1.0, chunk=500)  # chunk rounded up to 512


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_numerics_rule_holds_with_auto_filter(backend, dtype):
    """The project's rule (error vs float64 <= 2x plain PyTorch's in the same dtype + atol) with
    the default filter on, on peaky logits where it drops blocks."""
    n, h, v = 48, 64, 3000
    (hidden, weight, b, labels), g, gh, fused, stats = filtered_run(
        n, h, v, dtype, seed=1, backend=backend, temperature=1.2
    )
    assert (
        stats
        and stats[0]["skipped_fraction"] > 0.1
        and stats[0]["budget"] == resolve_grad_filter("auto", dtype)
    )
    plain = grads(linear_logprobs_reference, hidden, weight, b, labels, g, gh, temperature=1.2)
    truth = grads(
        linear_logprobs_reference,
        hidden.double(),
        weight.double(),
        b.double(),
        labels,
        g.double(),
        gh.double(),
        temperature=1.2,
    )
    for name, f, p, t in zip(
        ("logp", "entropy", "d_hidden", "d_weight", "d_bias"), fused, plain, truth, strict=True
    ):
        assert_within_rule(f"{backend}/{name}", f, p, t, dtype)


@pytest.mark.parametrize(
    "backend,compact",
    [("torch", None), ("cpp", 0), ("cpp", 1), ("cpp", 2)]
    + ([("triton", None)] if "triton" in cpu_backends() else []),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_filtered_gradient_equals_masked_float64(backend, compact, dtype, monkeypatch):
    """Every backend (every row-compaction mode of the C++ one) computes exactly the gradient with
    dz = 0 on the dropped blocks, to its dtype's rounding."""
    if compact is not None:
        monkeypatch.setattr(llmod, "_CPP_COMPACT", compact)
    # V = 1100, not a multiple of the block: a partial last block; chunk_size 256: several tiles,
    # so that the C++ row compaction has tiles to compact
    n, h, v = 37, 40, 1100
    (hidden, weight, b, labels), g, gh, fused, stats = filtered_run(
        n, h, v, dtype, seed=2, backend=backend, grad_filter=2.0**-9, temperature=0.9, chunk_size=256
    )
    st = stats[0]
    if compact is not None:
        assert st["compact"] == compact
    assert 0 < st["skipped_fraction"] < 1
    d_h, d_w, d_b, _, _ = masked_reference(hidden, weight, b, labels, g, gh, st["keep"], 0.9, st["order"])
    plain = grads(linear_logprobs_reference, hidden, weight, b, labels, g, gh, temperature=0.9)
    truth = grads(
        linear_logprobs_reference,
        hidden.double(),
        weight.double(),
        b.double(),
        labels,
        g.double(),
        gh.double(),
        temperature=0.9,
    )
    # Against the masked float64 gradient, with the plain error budget of the unfiltered op.
    for name, f, p, t, m in zip(
        ("d_hidden", "d_weight", "d_bias"), fused[2:], plain[2:], truth[2:], (d_h, d_w, d_b), strict=True
    ):
        plain_err = (p.double() - t).abs().max().item()
        err = (f.double() - m).abs().max().item()
        atol = (2e-5 if dtype == torch.float32 else 2e-3) * max(1.0, m.abs().max().item())
        assert err <= 2 * plain_err + atol, f"{backend}/{name}: {err:.3e} vs plain {plain_err:.3e}"
    # Blocks that no row keeps get exactly zero weight / bias gradient.
    unused = drop_mask(st["keep"], st["order"], v).all(0)  # columns no row keeps
    if unused.any():
        assert (fused[3][unused] == 0).all() and (fused[4][unused] == 0).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_label_in_a_negligible_block_keeps_its_gradient(backend):
    """A label the model finds improbable (its block holds ~0 mass) still gets its +g term."""
    n, h, v = 6, 16, 1024
    hidden, weight, b, _ = peaky_case(n, h, v, torch.float32, seed=3)
    z = hidden @ weight.T + b
    labels = z.argmin(1)  # the least probable token of every row
    g = torch.ones(n)
    with grad_filter_stats() as stats:
        out = grads(
            linear_logprobs, hidden, weight, b, labels, g, torch.zeros(n), backend=backend, grad_filter=0.01
        )
    keep = stats[0]["keep"]
    assert keep.gather(1, label_blocks(labels, stats[0]["order"])[:, None]).all()
    # d_bias_v = Σ_i (1[v = label_i] − p_iv): without the label's +1 the error would be ~1; the
    # filter may drop at most 0.01 of probability per row.
    want = torch.zeros(v, dtype=torch.float64).index_add_(0, labels, torch.ones(n, dtype=torch.float64))
    want -= torch.softmax(z.double(), 1).sum(0)
    assert torch.allclose(out[4].double()[labels], want[labels], atol=0.01 * n)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_no_block_masses_without_a_gradient(backend, monkeypatch):
    seen = []
    real = llmod._kernels

    def spy(name):
        fwd, bwd = real(name)

        def fwd_spy(*args):
            seen.append(args[-2])  # filter_block (then the vocabulary order)
            return fwd(*args)

        return fwd_spy, bwd

    monkeypatch.setattr(llmod, "_kernels", spy)
    hidden, weight, b, labels = peaky_case(8, 16, 600, torch.bfloat16)
    with torch.no_grad():
        linear_logprobs(hidden, weight, labels, bias=b, backend=backend)
    linear_logprobs(hidden, weight, labels, bias=b, backend=backend)  # no input requires grad
    linear_logprobs(hidden.requires_grad_(), weight, labels, bias=b, backend=backend)
    assert seen == [0, 0, FILTER_BLOCK]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_cpu_backends_walk_the_vocabulary_by_mean_logit(backend):
    """With the filter on, the CPU backends order the blocks by the batch's mean logit (probable
    tokens first), and the gradient still lands on the right vocabulary rows."""
    hidden, weight, b, labels = peaky_case(30, 32, 1500, torch.float32, seed=5)
    g, gh = torch.randn(30), torch.randn(30)
    with grad_filter_stats() as stats:
        fused = grads(
            linear_logprobs, hidden, weight, b, labels, g, gh, backend=backend, grad_filter=2.0**-10
        )
    order = stats[0]["order"]
    valid = hidden[labels != -100]  # the mean over the computed (valid) rows
    want = (torch.mv(weight, valid.mean(0)) + b).argsort(descending=True)
    assert torch.equal(order, want)
    d_h, d_w, d_b, _, _ = masked_reference(hidden, weight, b, labels, g, gh, stats[0]["keep"], 1.0, order)
    assert (fused[3].double() - d_w).abs().max() < 1e-4 and (fused[4].double() - d_b).abs().max() < 1e-5
    assert (fused[2].double() - d_h).abs().max() < 1e-4
    # Without the filter nothing is reordered (and no stats are recorded).
    with grad_filter_stats() as stats:
        grads(linear_logprobs, hidden, weight, b, labels, g, gh, backend=backend, grad_filter=None)
    assert stats == []


def test_fused_losses_pass_the_filter_through():
    from fastalign.losses.fused_linear import (
        FusedLinearKTOLoss,
        FusedLinearPolicyLoss,
        FusedLinearPreferenceLoss,
    )

    hidden, weight, _, labels = peaky_case(8 * 6, 16, 700, torch.float32, bias=False, seed=6)
    h = hidden.view(4, 12, 16).requires_grad_()
    y = labels.view(4, 12)
    ref = torch.zeros(2)
    with grad_filter_stats() as stats:
        loss, _ = FusedLinearPreferenceLoss("dpo", grad_filter=2.0**-6)(
            h, weight, y, ref_chosen_logps=ref, ref_rejected_logps=ref
        )
        loss.backward()
        kto = FusedLinearKTOLoss(grad_filter=2.0**-7)
        out, _ = kto(
            h, weight, y, torch.tensor([True, False, True, False]), kl_ref_point=0.0, ref_logps=torch.zeros(4)
        )
        out.backward()
        pol = FusedLinearPolicyLoss(grad_filter=2.0**-5)
        z = torch.zeros(4, 12)
        out, _ = pol(h, weight, y, z, torch.randn(4, 12), torch.ones(4, 12))
        out.backward()
    assert [r["budget"] for r in stats] == [2.0**-6, 2.0**-7, 2.0**-5]
    with grad_filter_stats() as stats:  # the default: "auto", exact in fp32
        loss, _ = FusedLinearPreferenceLoss("dpo")(h, weight, y, ref_chosen_logps=ref, ref_rejected_logps=ref)
        loss.backward()
    assert stats == []
    with pytest.raises(ValueError, match="grad_filter"):
        FusedLinearPreferenceLoss("dpo", grad_filter="fast")
