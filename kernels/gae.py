"""Triton kernel for `fastalign.ops.gae`: generalised advantage estimation on (B, T) tensors.

    delta_t = r_t + γ·V_{t+1}·m_{t+1} − V_t
    A_t     = delta_t + γλ·m_{t+1}·A_{t+1}          (nothing beyond T: m_T = 0)
    R_t     = A_t + V_t;   A_t = R_t = 0 where m_t = 0

The recurrence is sequential in t, independent across rows: one program per block of BLOCK_B
rows walks t = T−1 … 0 carrying (V_{t+1}·m_{t+1}, A_{t+1}·m_{t+1}) in registers, so each element
is read once and written once. The launcher hands the kernel time-major (T, B) copies so the
BLOCK_B loads / stores of one time step are contiguous (coalesced on a GPU); B·T is small
(one scalar per token), so the transposes cost little next to the policy forward. Masked
positions are selected away with `tl.where` (garbage in the padding never leaks). fp32 or fp64
(the caller casts; γ and γλ travel as fp32 hi + lo pairs so fp64 keeps full precision);
offsets are int64. Not yet run on a GPU (CPU interpreter tests only).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from fastalign.kernels._common import _split_scalar

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gae_kernel(
    r_ptr,  # (T, B) rewards, time-major, contiguous
    v_ptr,  # (T, B) values
    m_ptr,  # (T, B) mask (same float dtype, nonzero = valid)
    adv_ptr,  # (T, B) out
    ret_ptr,  # (T, B) out
    B,
    T,
    g_hi,  # γ as an fp32 pair (hi, lo): scalar float args are fp32, fp64 needs the rest
    g_lo,
    gl_hi,  # γλ, likewise
    gl_lo,
    F64: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    if F64:
        gamma = tl.cast(g_hi, tl.float64) + tl.cast(g_lo, tl.float64)
        gamma_lam = tl.cast(gl_hi, tl.float64) + tl.cast(gl_lo, tl.float64)
    else:
        gamma = g_hi
        gamma_lam = gl_hi
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_b = rows < B
    rows64 = rows.to(tl.int64)
    zero = tl.zeros((BLOCK_B,), dtype=adv_ptr.dtype.element_ty)
    next_v = zero  # V_{t+1}·m_{t+1}
    next_a = zero  # A_{t+1}·m_{t+1}
    for i in range(0, T):
        t64 = tl.zeros((BLOCK_B,), tl.int64) + (T - 1 - i)  # int64 whether T is an arg or constexpr
        offs = t64 * B + rows64
        m = tl.load(m_ptr + offs, mask=in_b, other=0.0)
        valid = m != 0.0
        r = tl.load(r_ptr + offs, mask=in_b & valid, other=0.0)
        v = tl.load(v_ptr + offs, mask=in_b & valid, other=0.0)
        a = r + gamma * next_v - v + gamma_lam * next_a
        a = tl.where(valid, a, 0.0)
        v = tl.where(valid, v, 0.0)
        tl.store(adv_ptr + offs, a, mask=in_b)
        tl.store(ret_ptr + offs, tl.where(valid, a + v, 0.0), mask=in_b)
        next_v = v
        next_a = a


def gae_forward(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, values, mask: (B, T), one float dtype (fp32 / fp64) -> advantages, returns (B, T)."""
    if values.dim() != 2 or values.dtype not in (torch.float32, torch.float64):
        raise ValueError("gae (triton): values must be a 2-D float32 / float64 tensor")
    for name, t in (("rewards", rewards), ("mask", mask)):
        if t.shape != values.shape or t.dtype != values.dtype:
            raise ValueError(f"gae (triton): {name} must match values in shape and dtype")
    b, t = values.shape
    if b == 0 or t == 0:
        return torch.empty_like(values), torch.empty_like(values)
    r_tm, v_tm, m_tm = (x.t().contiguous() for x in (rewards, values, mask))  # (T, B)
    adv_tm, ret_tm = torch.empty_like(v_tm), torch.empty_like(v_tm)
    block_b = 16 if _INTERPRET else min(256, max(32, triton.next_power_of_2(b)))
    grid = (triton.cdiv(b, block_b),)
    g_hi, g_lo = _split_scalar(float(gamma))
    gl_hi, gl_lo = _split_scalar(float(gamma) * float(lam))
    f64 = values.dtype == torch.float64
    _gae_kernel[grid](
        r_tm, v_tm, m_tm, adv_tm, ret_tm, b, t, g_hi, g_lo, gl_hi, gl_lo, F64=f64, BLOCK_B=block_b
    )
    return adv_tm.t().contiguous(), ret_tm.t().contiguous()
