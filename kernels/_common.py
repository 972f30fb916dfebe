"""Triton helpers shared by the op kernels (fp64-safe temperature scaling, lse splitting)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scale(x, inv_t_hi, inv_t_lo, F64: tl.constexpr):
    """x * inv_T; for fp64 the fp32 pair (hi, lo) restores the factor to ~2^-48 (one multiply,
    so x = -inf stays -inf)."""
    if F64:
        return x * (tl.cast(inv_t_hi, tl.float64) + tl.cast(inv_t_lo, tl.float64))
    else:
        return x * inv_t_hi


@triton.jit
def _split_lse(lse):
    """fp64 lse -> fp32 (hi, lo) with hi + lo = lse to ~2^-48 relative; lo = 0 where lse is
    ±inf (the operands are zeroed first: no inf - inf, not even in a discarded branch)."""
    hi = lse.to(tl.float32)
    hi64 = hi.to(tl.float64)
    rest = lse != hi64  # False at ±inf (and where hi is already exact)
    lo = (tl.where(rest, lse, 0.0) - tl.where(rest, hi64, 0.0)).to(tl.float32)
    return hi, lo


def _split_scalar(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo exactly representable in fp32 (fp32 kernel args)."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    lo = float(torch.tensor(x - hi, dtype=torch.float32))
    return hi, lo


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, bool, tl.dtype]:
    if dtype == torch.float64:
        return torch.float64, True, tl.float64
    return torch.float32, False, tl.float32
