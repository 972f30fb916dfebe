"""Generalised advantage estimation (GAE, Schulman et al. 2016) on right-padded (B, T) batches.

With mask m (1 on valid tokens; m_T = 0, i.e. nothing beyond the last column):

    δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t
    A_t = δ_t + γλ·m_{t+1}·A_{t+1}
    R_t = A_t + V_t                      (the value targets, "returns")
    A_t = R_t = 0 where m_t = 0

So the value after a row's last valid token is 0 (the episode ends there) and padding
contributes nothing; reward, value, even NaN / inf stored at masked positions are never read
into the result. A 0 inside a row also cuts the recursion there (each maximal valid run is its
own episode), which for right padding is the same thing.

Not differentiable: advantages and returns are regression / policy-gradient *targets*, so every
backend runs under torch.no_grad() and the outputs never require grad (gradients with respect
to rewards or values are deliberately not provided).

Backends ("auto" picks triton on CUDA, cpp on CPU): torch (reverse loop over T, vectorised over
B), cpp (one reverse scan per row, rows across OpenMP threads), triton (one program per block
of rows, reverse loop over T). Each computes in float32 (float64 for float64 values).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fastalign.ops import _cpp
from fastalign.ops._backend import FLOAT_DTYPES, out_dtype, resolve_backend

_OP = "gae"


def gae_reference(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-by-element float64 recursion (slow, obvious): the ground truth for tests."""
    r, v = rewards.detach().double().cpu(), values.detach().double().cpu()
    m = (mask.detach() != 0).cpu()
    b, t = v.shape
    adv = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        next_v = next_a = 0.0
        for j in reversed(range(t)):
            if not m[i, j]:
                next_v = next_a = 0.0
                continue
            a = float(r[i, j]) + gamma * next_v - float(v[i, j]) + gamma * lam * next_a
            adv[i, j] = a
            next_v, next_a = float(v[i, j]), a
    ret = torch.where(m, adv + torch.where(m, v, 0.0), 0.0)
    return adv, ret


def gae_forward_torch(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature as the cpp / triton launchers: (B, T) in one float dtype -> adv, returns."""
    valid = mask != 0
    r = torch.where(valid, rewards, 0.0)
    v = torch.where(valid, values, 0.0)
    adv = torch.empty_like(v)
    b, t = v.shape
    next_v = v.new_zeros(b)
    next_a = v.new_zeros(b)
    gl = gamma * lam
    for j in range(t - 1, -1, -1):
        a = torch.where(valid[:, j], r[:, j] + gamma * next_v - v[:, j] + gl * next_a, 0.0)
        adv[:, j] = a
        next_v, next_a = v[:, j], a
    return adv, torch.where(valid, adv + v, 0.0)


def _kernel(backend: str) -> Callable:
    if backend == "torch":
        return gae_forward_torch
    if backend == "cpp":
        return _cpp.load().gae_fwd
    from fastalign.kernels import gae as k  # triton is imported only for the triton backend

    return k.gae_forward


def _check_scalar(x, name: str) -> float:
    f = float(x)
    if not (math.isfinite(f) and 0.0 <= f <= 1.0):
        raise ValueError(f"{_OP}: {name} must be a number in [0, 1], got {x!r}")
    return f


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns for a right-padded batch (see module doc).

    Args:
        rewards: (B, T) per-token rewards (e.g. the KL penalty with the score on the last token).
        values: (B, T) value predictions V_t, float32 / bfloat16 / float16 / float64.
        mask: (B, T) bool or 0/1, 1 on the response tokens.
        gamma: discount γ in [0, 1]; lam: GAE λ in [0, 1].
        backend: "auto" | "triton" | "cpp" | "torch".

    Returns:
        (advantages, returns), each (B, T), float32 (float64 for float64 values), 0 where the
        mask is 0; computed under no_grad (targets, never differentiated).

    Raises:
        ValueError: shapes differ or are not 2-D, gamma / lam outside [0, 1], bad backend.
        TypeError: non-float values / rewards.
    """
    for name, x in (("rewards", rewards), ("values", values), ("mask", mask)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in (("rewards", rewards), ("values", values)):
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{_OP}: {name} must be a float32/bfloat16/float16/float64 tensor, got {x.dtype}")
    if values.dim() != 2:
        raise ValueError(f"{_OP}: values must be 2-D (B, T), got shape {tuple(values.shape)}")
    for name, x in (("rewards", rewards), ("mask", mask)):
        if x.shape != values.shape:
            raise ValueError(
                f"{_OP}: {name} shape {tuple(x.shape)} must equal values shape {tuple(values.shape)}"
            )
        if x.device != values.device:
            raise ValueError(f"{_OP}: {name} on {x.device} but values on {values.device}")
    g, lm = _check_scalar(gamma, "gamma"), _check_scalar(lam, "lam")
    concrete = resolve_backend(backend, values.device, _OP)
    acc = out_dtype(values.dtype)
    with torch.no_grad():
        r = rewards.detach().to(acc).contiguous()
        v = values.detach().to(acc).contiguous()
        m = (mask.detach() != 0).to(acc).contiguous()
        if v.numel() == 0:
            return torch.zeros_like(v), torch.zeros_like(v)
        adv, ret = _kernel(concrete)(r, v, m, g, lm)
    return adv, ret
