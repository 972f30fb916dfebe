import math

import pytest
import torch

from fastalign.losses import KL_KINDS, kl_estimate, sequence_logps


def naive_kl(logps, ref_logps, kind):
    """Float64 ground truth straight from Schulman's definitions."""
    log_r = ref_logps.double() - logps.double()
    return {
        "k1": -log_r,
        "k2": 0.5 * log_r**2,
        "k3": (torch.exp(log_r) - 1) - log_r,
        "abs": log_r.abs(),
    }[kind]


def test_hand_computed_values():
    logps, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    # log r = ref - logps = [-0.5, 1.0]
    want = {
        "k1": [0.5, -1.0],
        "k2": [0.125, 0.5],
        "k3": [math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1.0],
        "abs": [0.5, 1.0],
    }
    for kind, w in want.items():
        got = kl_estimate(logps, ref, kind=kind)
        assert torch.allclose(got, torch.tensor(w), atol=1e-6), kind
    assert kl_estimate(logps, ref).tolist() == pytest.approx([0.5, -1.0])  # default k1


@pytest.mark.parametrize("kind", KL_KINDS)
def test_fp32_matches_float64(kind):
    logps = -torch.rand(4, 33) * 5
    ref = logps + torch.randn(4, 33)
    got = kl_estimate(logps, ref, kind=kind)
    assert got.dtype == torch.float32 and got.shape == (4, 33)
    assert torch.allclose(got.double(), naive_kl(logps, ref, kind), rtol=1e-5, atol=1e-6)
    if kind != "k1":
        assert (got >= 0).all()


@pytest.mark.parametrize("kind", KL_KINDS)
def test_clamp_bounds_result_and_gradients_stay_finite(kind):
    logps = torch.tensor([-1.0, -1.0, -300.0, -1.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.2, -0.5, -400.0])
    out = kl_estimate(logps, ref, kind=kind, clamp=2.0)
    assert (out >= -2.0).all() and (out <= 2.0).all()
    out.sum().backward()
    assert torch.isfinite(logps.grad).all()
    assert logps.grad[2] == 0  # clamped (k3's exp(299.5) would overflow float32)


def test_gradient_flows_to_policy_logps():
    logps = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    for kind in KL_KINDS:
        assert torch.autograd.gradcheck(lambda x, kind=kind: kl_estimate(x, ref, kind=kind), (logps,))


def test_errors():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=r"kind 'k4'; valid: k1, k2, k3, abs"):
        kl_estimate(x, x, kind="k4")
    with pytest.raises(ValueError, match="ref_logps shape"):
        kl_estimate(x, torch.zeros(4))
    with pytest.raises(ValueError, match="logps contains NaN"):
        kl_estimate(torch.tensor([0.0, math.nan]), torch.zeros(2))
    with pytest.raises(ValueError, match="ref_logps contains NaN"):
        kl_estimate(torch.zeros(2), torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="clamp"):
        kl_estimate(x, x, clamp=0.0)
    with pytest.raises(TypeError, match="logps"):
        kl_estimate(torch.zeros(3, dtype=torch.long), x)


def test_sequence_logps_sum_and_mean():
    tok = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, float("-inf"), -4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sequence_logps(tok, mask).tolist() == [-3.0, -0.5]  # -inf under the mask is ignored
    assert sequence_logps(tok, mask.bool(), average=True).tolist() == [-1.5, -0.5]
    sequence_logps(tok, mask, average=True).sum().backward()
    assert tok.grad.tolist() == [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]
    empty = sequence_logps(torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.bool), average=True)
    assert empty.tolist() == [0.0]


def test_sequence_logps_errors():
    tok = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask shape"):
        sequence_logps(tok, torch.ones(2, 4))
    with pytest.raises(ValueError, match="0 / 1"):
        sequence_logps(tok, torch.full((2, 3), 2))
    with pytest.raises(ValueError, match=r"token_logps must be \(B, T\)"):
        sequence_logps(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="token_logps contains NaN"):
        sequence_logps(torch.full((2, 3), math.nan), torch.ones(2, 3))


def test_import_losses_is_light():
    import subprocess
    import sys

    mods = "('triton', 'fastalign.ops', 'fastalign.kernels')"
    code = f"import sys, fastalign.losses; print(sorted(m for m in {mods} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
