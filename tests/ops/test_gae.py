import pytest
import torch
from helpers import cpu_backends

from fastalign.ops import gae, gae_reference

NAN = float("nan")


def hand_case():
    """γ = 0.9, λ = 0.8 (γλ = 0.72). Row 0 full, row 1 right-padded with NaN garbage.

    row 0: r = [0, 0, 0, 1], V = [0.5, 0.4, 0.3, 0.2]
        t3: A = 1 - 0.2                              = 0.8
        t2: A = 0.9·0.2 - 0.3 + 0.72·0.8             = 0.456
        t1: A = 0.9·0.3 - 0.4 + 0.72·0.456           = 0.19832
        t0: A = 0.9·0.4 - 0.5 + 0.72·0.19832         = 0.0027904
    row 1: r = [0, 2, ·, ·], V = [1.0, 0.5, ·, ·], mask [1, 1, 0, 0]
        t1: A = 2 - 0.5 (nothing beyond the last valid token) = 1.5
        t0: A = 0.9·0.5 - 1.0 + 0.72·1.5             = 0.53
    """
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 2.0, NAN, 9.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.4, 0.3, 0.2], [1.0, 0.5, 7.0, NAN]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([[0.0027904, 0.19832, 0.456, 0.8], [0.53, 1.5, 0.0, 0.0]], dtype=torch.float64)
    ret = torch.tensor([[0.5027904, 0.59832, 0.756, 1.0], [1.53, 2.0, 0.0, 0.0]], dtype=torch.float64)
    return r, v, m, adv, ret


@pytest.mark.parametrize("backend", ["reference", *cpu_backends()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_hand_values(backend, dtype):
    r, v, m, want_adv, want_ret = hand_case()
    fn = gae_reference if backend == "reference" else lambda *a, **k: gae(*a, backend=backend, **k)
    adv, ret = fn(r.to(dtype), v.to(dtype), m, gamma=0.9, lam=0.8)
    assert adv.dtype == (torch.float64 if backend == "reference" else dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(adv.double(), want_adv, atol=tol, rtol=0)
    assert torch.allclose(ret.double(), want_ret, atol=tol, rtol=0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_special_cases_of_gamma_and_lambda(backend):
    b, t = 3, 6
    r, v = torch.randn(b, t, dtype=torch.float64), torch.randn(b, t, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 1])
    m = torch.arange(t) < lengths.unsqueeze(1)
    # γ = λ = 1: returns are the reward-to-go within the valid prefix (Monte Carlo).
    _, ret = gae(r, v, m, gamma=1.0, lam=1.0, backend=backend)
    rm = torch.where(m, r, 0.0)
    to_go = rm.flip(1).cumsum(1).flip(1)
    assert torch.allclose(ret, torch.where(m, to_go, 0.0), atol=1e-12)
    # λ = 0: A is the one-step TD error.
    adv, _ = gae(r, v, m, gamma=0.7, lam=0.0, backend=backend)
    next_v = torch.cat([torch.where(m, v, 0.0)[:, 1:], torch.zeros(b, 1, dtype=v.dtype)], 1)
    assert torch.allclose(adv, torch.where(m, r + 0.7 * next_v - v, 0.0), atol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (5, 17), (37, 64)], ids=str)
def test_matches_float64_reference(backend, dtype, shape):
    b, t = shape
    r, v = torch.randn(b, t).to(dtype), torch.randn(b, t).to(dtype)
    m = torch.arange(t) < torch.randint(0, t + 1, (b, 1))  # right padding, empty rows included
    if t > 2:
        m[0] = True
        m[0, t // 2] = False  # an interior hole cuts the recursion too
    adv, ret = gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
    want_adv, want_ret = gae_reference(r, v, m, gamma=0.99, lam=0.95)
    assert adv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 2e-5 * t
    assert torch.allclose(adv.double(), want_adv, atol=tol, rtol=0)
    assert torch.allclose(ret.double(), want_ret, atol=tol, rtol=0)
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_backends_agree_and_no_grad(backend):
    r = torch.randn(8, 33)
    v = torch.randn(8, 33, requires_grad=True)
    m = torch.rand(8, 33) > 0.2  # float mask with holes
    adv, ret = gae(r, v, m.float(), gamma=0.95, lam=0.9, backend=backend)
    assert not adv.requires_grad and not ret.requires_grad
    want_adv, want_ret = gae(r, v, m, gamma=0.95, lam=0.9, backend="torch")
    assert torch.allclose(adv, want_adv, atol=1e-5) and torch.allclose(ret, want_ret, atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_batch(backend):
    adv, ret = gae(torch.zeros(0, 5), torch.zeros(0, 5), torch.ones(0, 5), backend=backend)
    assert adv.shape == (0, 5) and ret.shape == (0, 5)


def test_errors():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="rewards"):
        gae(torch.zeros(2, 4), x, m)
    with pytest.raises(ValueError, match="mask"):
        gae(x, x, torch.ones(3, 2))
    with pytest.raises(ValueError, match="values"):
        gae(torch.zeros(6), torch.zeros(6), torch.ones(6))
    with pytest.raises(ValueError, match="gamma"):
        gae(x, x, m, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        gae(x, x, m, lam=-0.1)
    with pytest.raises(ValueError, match="backend"):
        gae(x, x, m, backend="cuda")
    with pytest.raises(TypeError, match="values"):
        gae(x, x.long(), m)
