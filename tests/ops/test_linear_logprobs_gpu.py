"""GPU checks of the Triton kernels that the CPU suite cannot make (skipped without CUDA):
every autotune config forced in turn, against an fp32 reference built from the same bf16 inputs
at tight tolerances (a dropped vocabulary tile or a wrong mask would show: logp / entropy ≤ 3e-4
absolute, gradients ≤ 1e-2 relative norm), EVEN_K=False (H = 1040), no bias, no entropy, a
frozen weight, N = 1, the gradient filter, determinism, offsets past 2^31 elements, the GAE
kernel, and launches on a second GPU. `benchmarks/gpu_check.sh` runs them with the rest."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from fastalign.ops import gae, gae_reference, linear_logprobs, token_logprobs

pytestmark = pytest.mark.gpu
DEV = "cuda"
BF = torch.bfloat16


def _kernels():
    return importlib.import_module("fastalign.kernels.linear_logprobs")


@contextlib.contextmanager
def forced(kernel, config):
    """Run `kernel` with exactly one config (its autotuner's list and cache swapped)."""
    saved = (kernel.configs, kernel.cache)
    kernel.configs, kernel.cache = [config], {}
    try:
        yield
    finally:
        kernel.configs, kernel.cache = saved


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / (b.norm() + 1e-6)).item()


def make(n, h, v, bias=True, ignore=0.25, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    hid = torch.randn(n, h, device=DEV, generator=g).to(BF)
    w = (torch.randn(v, h, device=DEV, generator=g) * 2 / h**0.5).to(BF)
    b = (torch.randn(v, device=DEV, generator=g) * 0.5).to(BF) if bias else None
    y = torch.randint(0, v, (n,), device=DEV, generator=g)
    y[torch.rand(n, device=DEV, generator=g) < ignore] = -100
    return hid, w, b, y


def reference(h, w, b, y, temp, g, gh, keep=None, block=256):
    """fp32 truth from the same bf16 inputs (the fused path never rounds logits to bf16); with
    keep, dz = 0 on the dropped (row, block) pairs, as the filtered backward computes."""
    H, W = h.float().requires_grad_(), w.float().requires_grad_()
    B = b.float().requires_grad_() if b is not None else None
    z = (H @ W.T + (B if B is not None else 0)) / temp
    ok = y != -100
    lp = torch.log_softmax(z, -1)
    logp = torch.where(ok, lp.gather(-1, y.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(ok, -(lp.exp() * torch.where(lp > -float("inf"), lp, 0.0)).sum(-1), 0.0)
    if keep is None:
        (logp * g + ent * gh).sum().backward()
        return logp.detach(), ent.detach(), H.grad, W.grad, B.grad if B is not None else None
    p = lp.exp().detach()
    gg, hh = torch.where(ok, g, 0.0)[:, None], torch.where(ok, gh, 0.0)[:, None]
    dz = -gg * p - hh * p * (lp.detach() + ent.detach()[:, None])
    dz[ok, y[ok]] += gg[ok, 0]
    dz = (dz / temp).masked_fill((keep == 0).repeat_interleave(block, 1)[:, : w.shape[0]], 0.0)
    return (
        logp.detach(),
        ent.detach(),
        dz @ W.detach(),
        dz.T @ H.detach(),
        dz.sum(0) if B is not None else None,
    )


def fused(h, w, b, y, temp, g, gh, ent=True, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (h, w, b)]
    out = linear_logprobs(
        leaves[0], leaves[1], y, bias=leaves[2], temperature=temp, return_entropy=ent, backend="triton", **kw
    )
    lp, e = out if ent else (out, None)
    ((lp * g).sum() + ((e * gh).sum() if ent else 0)).backward()
    return lp.detach(), e, *[t.grad if t is not None else None for t in leaves]


def check(n, h, v, bias=True, temp=0.7, ent=True, ignore=0.25, **kw):
    hid, w, b, y = make(n, h, v, bias, ignore)
    g = torch.randn(n, device=DEV)
    gh = torch.randn(n, device=DEV) if ent else torch.zeros(n, device=DEV)
    f = fused(hid, w, b, y, temp, g, gh, ent, grad_filter=None, **kw)
    t = reference(hid, w, b, y, temp, g, gh)
    assert (f[0] - t[0]).abs().max() < 3e-4
    assert rel(f[2], t[2]) < 1e-2 and rel(f[3], t[3]) < 1e-2 and torch.isfinite(f[2]).all()
    if ent:
        assert (f[1] - t[1]).abs().max() < 3e-4
    if bias:
        assert rel(f[4], t[4]) < 1e-2


def _config_ids():
    k = importlib.import_module("fastalign.kernels.linear_logprobs") if torch.cuda.is_available() else None
    return list(range(len(k._fwd_configs(every=True)))) if k else [0]


@pytest.mark.parametrize("i", _config_ids())
def test_every_linear_config_forced(i):
    k = _kernels()
    lists = [
        (k._linear_logprobs_fwd_kernel, k._fwd_configs(every=True)),
        (k._linear_logprobs_bwd_kernel, k._dz_configs(every=True)),
        (k._linear_logprobs_bwd_dh_kernel, k._dh_configs(every=True)),
        (k._linear_logprobs_bwd_dw_kernel, k._dh_configs(every=True)),
    ]
    with contextlib.ExitStack() as stack:
        for kernel, cfgs in lists:
            stack.enter_context(forced(kernel, cfgs[min(i, len(cfgs) - 1)]))
        check(1500, 1024, 50257)  # odd vocabulary: the padded last chunk
        check(700, 1040, 32000, bias=False, ent=False)  # EVEN_K=False
        # The filtered kernels (dz with skipped tiles, d_hidden / d_weight with skipped steps).
        hid, w, b, y = make(1024, 512, 32000, True)
        w = (w.float() * 6).to(BF)  # peaky logits: the filter drops blocks
        g, gh = torch.randn(1024, device=DEV), torch.randn(1024, device=DEV)
        llmod = importlib.import_module("fastalign.ops.linear_logprobs")
        with llmod.grad_filter_stats() as stats:
            f = fused(hid, w, b, y, 1.0, g, gh, grad_filter=2.0**-8)
        assert stats[0]["skipped_fraction"] > 0.1
        t = reference(hid, w, b, y, 1.0, g, gh, keep=stats[0]["keep"])
        assert rel(f[2], t[2]) < 1e-2 and rel(f[3], t[3]) < 1e-2 and rel(f[4], t[4]) < 1e-2


@pytest.mark.parametrize("i", range(4))
def test_every_token_config_forced(i):
    kt = importlib.import_module("fastalign.kernels.token_logprobs")
    fwd, bwd = kt._fwd_configs(every=True), kt._bwd_configs(every=True)
    if i >= max(len(fwd), len(bwd)):
        pytest.skip("fewer configs")
    with forced(kt._token_logprobs_fwd_kernel, fwd[min(i, len(fwd) - 1)]):
        with forced(kt._token_logprobs_bwd_kernel, bwd[min(i, len(bwd) - 1)]):
            for n, v in ((300, 128256), (300, 50257)):
                x = (torch.randn(n, v, device=DEV) * 3).to(BF)
                x[:, 5:40] = float("-inf")
                y = torch.randint(40, v, (n,), device=DEV)
                y[::4] = -100
                g, gh = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
                X = x.clone().requires_grad_()
                lp, e = token_logprobs(X, y, temperature=0.8, return_entropy=True, backend="triton")
                ((lp * g).sum() + (e * gh).sum()).backward()
                R = x.float().requires_grad_()
                l2 = torch.log_softmax(R / 0.8, -1)
                ok = y != -100
                rl = torch.where(ok, l2.gather(-1, y.clamp(min=0)[:, None])[:, 0], 0.0)
                re_ = torch.where(ok, -(l2.exp() * torch.where(l2 > -float("inf"), l2, 0.0)).sum(-1), 0.0)
                ((rl * g).sum() + (re_ * gh).sum()).backward()
                assert (lp - rl).abs().max() < 3e-4 and (e - re_).abs().max() < 3e-4
                assert rel(X.grad, R.grad) < 1e-2


def test_edges_n1_one_valid_row_frozen_inputs_and_all_ignored():
    check(1, 256, 1000, ignore=0.0)
    check(300, 256, 200)  # V < 256: one vocabulary range
    check(5, 64, 1, bias=False, ignore=0.0)  # V = 1
    for frozen in ("weight", "hidden"):
        hid, w, _, y = make(256, 512, 8000, False)
        H_, W_ = hid.clone().requires_grad_(frozen != "hidden"), w.clone().requires_grad_(frozen != "weight")
        linear_logprobs(H_, W_, y, backend="triton").sum().backward()
        t = reference(hid, w, None, y, 1.0, torch.ones(256, device=DEV), torch.zeros(256, device=DEV))
        got, want = (H_.grad, t[2]) if frozen == "weight" else (W_.grad, t[3])
        assert rel(got, want) < 1e-2
        assert (W_.grad is None) if frozen == "weight" else (H_.grad is None)
    hid, w, _, y = make(64, 256, 5000, False, ignore=1.0)
    H_ = hid.clone().requires_grad_()
    lp = linear_logprobs(H_, w, y, backend="triton")
    lp.sum().backward()
    assert (lp == 0).all() and (H_.grad == 0).all()


def test_deterministic_backward():
    hid, w, b, y = make(2048, 1024, 32768, True)
    g = torch.randn(2048, device=DEV)
    r1, r2 = fused(hid, w, b, y, 1.0, g, g), fused(hid, w, b, y, 1.0, g, g)
    assert all(torch.equal(a, c) for a, c in zip(r1, r2, strict=True) if a is not None)


def test_autocast_bf16_on_gpu():
    hid, w, _, y = make(512, 1024, 32000, False)
    h32, w32 = hid.float().requires_grad_(), w.float().requires_grad_()
    with torch.autocast("cuda", dtype=BF):
        lp = linear_logprobs(h32, w32, y, backend="triton")
    lp.sum().backward()
    want = linear_logprobs(hid, w, y, backend="triton")
    assert (lp - want).abs().max() < 1e-5 and w32.grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensors_on_the_second_gpu():
    torch.cuda.set_device(0)
    hid, w, b, y = (t.to("cuda:1") if t is not None else None for t in make(300, 256, 5000, True))
    g = torch.randn(300, device="cuda:1")
    f = fused(hid, w, b, y, 1.0, g, g)
    t = reference(hid, w, b, y, 1.0, g, g)
    assert f[2].device == torch.device("cuda:1") and rel(f[2], t[2]) < 1e-2


def test_gae_kernel():
    for bb, tt in ((1, 1), (7, 1000), (300, 64), (1000, 512)):
        for dt in (torch.float32, torch.float64):
            r, v = torch.randn(bb, tt, device=DEV, dtype=dt), torch.randn(bb, tt, device=DEV, dtype=dt)
            m = (torch.arange(tt, device=DEV)[None] < torch.randint(0, tt + 1, (bb, 1), device=DEV)).to(dt)
            if tt > 2:
                m[:, tt // 2] = 0  # an interior hole
            a, ret = gae(r, v, m, gamma=0.99, lam=0.95, backend="triton")
            ra, rr = gae_reference(r, v, m, gamma=0.99, lam=0.95)
            err = max(
                (a.cpu().double() - ra.cpu()).abs().max().item(),
                (ret.cpu().double() - rr.cpu()).abs().max().item(),
            )
            assert err < (1e-9 if dt == torch.float64 else 1e-4 * max(1, rr.abs().max().item()))


@pytest.mark.slow
def test_offsets_past_2_to_the_31():
    """> 2^31 elements in the logits (token op), the weight (V·H) and the hidden states (N·H):
    int64 offsets everywhere; checks the far rows."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs ~40 GiB of free GPU memory")
    n, v = 16640, 131072  # 2.18e9 logits
    x = torch.randn(n, v, device=DEV, dtype=BF)
    y = torch.randint(0, v, (n,), device=DEV)
    X = x.requires_grad_()
    lp = token_logprobs(X, y, backend="triton")
    lp.sum().backward()
    rows = torch.tensor([0, n - 2, n - 1], device=DEV)
    l2 = torch.log_softmax(x.detach()[rows].float(), -1)
    gr = (
        torch.softmax(x.detach()[rows].float(), -1)
        .neg()
        .scatter_add(1, y[rows, None], torch.ones(3, 1, device=DEV))
    )
    assert (lp[rows] - l2.gather(1, y[rows, None])[:, 0]).abs().max() < 5e-4 and rel(X.grad[rows], gr) < 1e-2
    del x, X, lp
    torch.cuda.empty_cache()
    for tag, (n, h, v) in {"weight": (64, 8192, 262400), "hidden": (262400, 8192, 256)}.items():
        hid, w, _, y = make(n, h, v, False, ignore=0.0)
        if tag == "weight":
            y[::2] = torch.randint(262144, v, (n // 2,), device=DEV)
        H_, W_ = hid.clone().requires_grad_(), w.clone().requires_grad_()
        lp = linear_logprobs(H_, W_, y, backend="triton")
        lp.sum().backward()
        rows = torch.arange(n - 64, n, device=DEV)
        z = torch.cat([hid[rows].float() @ w[i : i + 32768].float().T for i in range(0, v, 32768)], 1)
        p = torch.softmax(z, -1)
        dz = torch.zeros_like(p).scatter_(1, y[rows, None], 1.0) - p
        dh = sum(dz[:, i : i + 32768] @ w[i : i + 32768].float() for i in range(0, v, 32768))
        assert (lp[rows] - torch.log_softmax(z, -1).gather(1, y[rows, None])[:, 0]).abs().max() < 5e-4
        assert rel(H_.grad[rows], dh) < 1e-2
        if tag == "weight":
            top = slice(262144, v)
            assert rel(W_.grad[top], dz[:, top].T @ hid[rows].float()) < 1e-2
        del hid, w, H_, W_, lp
        torch.cuda.empty_cache()
