"""Triton kernels for `fastalign.ops.token_logprobs`: per-token log-probs (and entropy) from
(N, V) logits with one online log-sum-exp pass per row, and the matching one-pass backward.

Math (z = logits * inv_T, computed in fp32, fp64 for fp64 logits):

    lse    = m + log s,        m = max_v z_v,  s = Σ_v e^{z_v − m},  t = Σ_v e^{z_v − m}(z_v − m)
    logp   = min(z[label] − lse, 0)            (the label logit is re-read with the same z formula)
    H      = log s − t / s                     (= −Σ p log p, clamped at ≥ 0)
    dL/dlogits_v = inv_T · ( g·(1[v = label] − p_v) − h·p_v·(log p_v + H) ),   p_v = e^{z_v − lse}

m, s, t are updated block by block; when the running max moves m → m2:
s ← s·e^{m−m2} + Σ e^{z−m2}, t ← e^{m−m2}·(t + (m−m2)·s) + Σ e^{z−m2}(z−m2).
The saved lse is float64 for every input dtype: m and log s are fp32 statistics, but their sum is
formed and stored in fp64, so m stays exact (|lse| reaches 30-300 with large logits, where an fp32
lse is off by up to ~1e-5). The backward splits it once per row into fp32 hi + lo and forms
z_v − lse as (z_v − hi) − lo, so the per-element math stays fp32.
Rows whose label equals `ignore_index` give exactly 0 (logp, entropy, lse) and a zero gradient,
and their logits are never read (zero-trip loop in the forward, predicated-off loads in the
backward): prompt tokens cost no bandwidth.

Tiles, for Hopper (H100 / H200): the op is purely memory-bound (a bf16 element is 2 bytes read
and, in the backward, 2 bytes written, against ~10 flops and 1 exp), so the kernels are built to
stream: one program per row in the forward (N ≥ a few thousand rows in training fills the 132
SMs many times over), BLOCK_V of 2k-8k columns per step so each thread issues several 16-byte
loads per iteration, 8-16 warps (16-byte vectors need 16-byte aligned rows, i.e. V a multiple
of 8 for bf16 — checked in the sm_90 PTX; an odd vocabulary such as 50257 gets 2-byte loads).
The per-step max/sum reductions cost a few shared-memory round trips per block, amortised over
thousands of elements. The backward has no row dependency, so it uses a 2-D grid (row, column
block) for full parallelism even at small N. The configs are autotuned per (V, dtype). Exactly
one exp per element in each direction keeps the MUFU (exp) rate below the HBM rate
(~4.8 TB/s = 2.4 G bf16 elements/ms vs ~4 G exp/ms).

Offsets are int64 (row * stride exceeds 2^31 at V = 256k). Under TRITON_INTERPRET=1 a single
small config is used so CPU tests stay fast. fp64 logits are supported (fp64 math throughout; the
temperature is passed as an fp32 hi + lo pair so fp64 keeps its precision).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from fastalign.kernels._common import _acc, _scale, _split_lse, _split_scalar

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# FASTALIGN_TRITON_AUTOTUNE=0: skip autotuning and use the first config (GPU test suites).
_AUTOTUNE = os.environ.get("FASTALIGN_TRITON_AUTOTUNE", "1") != "0"


def _fwd_configs(every: bool = False) -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_V": 64}, num_warps=1)]
    configs = [
        triton.Config({"BLOCK_V": 2048}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_V": 4096}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_V": 4096}, num_warps=16, num_stages=2),
        triton.Config({"BLOCK_V": 8192}, num_warps=16, num_stages=2),
    ]
    return configs if _AUTOTUNE or every else configs[:1]  # every: the GPU tests force each one


def _bwd_configs(every: bool = False) -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_V": 64}, num_warps=1)]
    configs = [
        triton.Config({"BLOCK_V": 1024}, num_warps=4),
        triton.Config({"BLOCK_V": 2048}, num_warps=8),
        triton.Config({"BLOCK_V": 4096}, num_warps=8),
        triton.Config({"BLOCK_V": 8192}, num_warps=16),
    ]
    return configs if _AUTOTUNE or every else configs[:1]  # every: the GPU tests force each one


@triton.autotune(configs=_fwd_configs(), key=["V"])
@triton.jit
def _token_logprobs_fwd_kernel(
    x_ptr,  # (N, V) logits, any float dtype, row stride stride_x, unit column stride
    lab_ptr,  # (N,) int64
    logp_ptr,  # (N,) ACC
    lse_ptr,  # (N,) fp64
    ent_ptr,  # (N,) ACC (unused unless WITH_ENTROPY)
    V,
    stride_x,
    inv_t_hi,
    inv_t_lo,
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    F64: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(lab_ptr + row)
    valid = label != ignore_index
    x_row = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK_V)

    m = tl.full((), float("-inf"), ACC)  # running max (true max, may stay -inf)
    s = tl.zeros((), ACC)  # Σ e^{z - m}
    t = tl.zeros((), ACC)  # Σ e^{z - m} (z - m)
    v_end = tl.where(valid, V, 0)  # ignored rows: zero-trip loop, no bytes read
    for v0 in range(0, v_end, BLOCK_V):
        cols = v0 + offs
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(ACC)
        z = _scale(x, inv_t_hi, inv_t_lo, F64)
        m_new = tl.maximum(m, tl.max(z, 0))
        # Reference point for the exponentials: m_new, or 0 while everything seen is -inf
        # (avoids -inf - -inf = nan; s and t are still 0 then).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)  # 0 on the first block (m = -inf)
        d = z - m_ref
        e = tl.exp(d)
        if WITH_ENTROPY:
            # (m - m_ref) * s and e * d with the -inf factors replaced by 0 where the other
            # factor is 0 (no -inf * 0 = nan, even transiently).
            shift = (tl.where(s > 0.0, m, m_ref) - m_ref) * s
            t = alpha * (t + shift) + tl.sum(e * tl.where(e > 0.0, d, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new

    s = tl.where(valid, s, 1.0)  # ignored rows: s = 0, keep log / division finite
    log_s = tl.log(s)
    x_lab = tl.load(x_row + tl.where(valid, label, 0), mask=valid, other=0.0).to(ACC)
    z_lab = _scale(x_lab, inv_t_hi, inv_t_lo, F64)  # the same z as in the loop
    logp = tl.minimum((z_lab - m) - log_s, 0.0)  # z - max is exact near the max, as in eager
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    # Saved lse: the sum formed in fp64, so the exact fp32 max is not rounded away.
    lse64 = tl.cast(m, tl.float64) + tl.cast(log_s, tl.float64)
    tl.store(lse_ptr + row, tl.where(valid, lse64, 0.0))
    if WITH_ENTROPY:
        ent = tl.maximum(log_s - t / s, 0.0)
        tl.store(ent_ptr + row, tl.where(valid, ent, 0.0))


@triton.autotune(configs=_bwd_configs(), key=["V"])
@triton.jit
def _token_logprobs_bwd_kernel(
    x_ptr,  # (N, V) logits
    lab_ptr,  # (N,) int64
    lse_ptr,  # (N,) fp64
    ent_ptr,  # (N,) ACC (unused unless WITH_ENTROPY)
    glogp_ptr,  # (N,) dL/dlogp
    gent_ptr,  # (N,) dL/dentropy (unused unless WITH_ENTROPY)
    dx_ptr,  # (N, V) out, logits dtype
    V,
    stride_x,
    stride_dx,
    inv_t_hi,
    inv_t_lo,
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    F64: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = cols < V
    label = tl.load(lab_ptr + row)
    valid = label != ignore_index
    v_lim = tl.where(valid, V, 0)  # read bound: 0 on ignored rows

    g = tl.where(valid, tl.load(glogp_ptr + row).to(ACC), 0.0)
    lse = tl.load(lse_ptr + row)  # fp64
    # Ignored rows: loads predicated off (no bytes read), gradient written as exact zeros.
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < v_lim, other=0.0).to(ACC)
    if F64:
        logp = _scale(x, inv_t_hi, inv_t_lo, F64) - lse
    else:
        lse_hi, lse_lo = _split_lse(lse)  # once per row; the (BLOCK_V,) math stays fp32
        logp = (_scale(x, inv_t_hi, inv_t_lo, F64) - lse_hi) - lse_lo
    p = tl.exp(logp)
    dz = -g * p
    if WITH_ENTROPY:
        gh = tl.where(valid, tl.load(gent_ptr + row).to(ACC), 0.0)
        ent = tl.load(ent_ptr + row).to(ACC)
        dz -= gh * p * tl.where(p > 0.0, logp + ent, 0.0)  # p = 0 at z = -inf: no 0 * inf
    dz = tl.where(cols == label, dz + g, dz)
    dz = _scale(dz, inv_t_hi, inv_t_lo, F64)
    dz = tl.where(valid, dz, 0.0)
    tl.store(dx_ptr + row * stride_dx + cols, dz.to(dx_ptr.dtype.element_ty), mask=in_row)


# ---------------------------------------------------------------------------------------------
# launchers (same signatures as token_logprobs_forward_torch / token_logprobs_backward_torch)
# ---------------------------------------------------------------------------------------------
def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("token_logprobs (triton): logits must be 2-D (N, V) with unit column stride")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"token_logprobs (triton): unsupported logits dtype {logits.dtype}")


def token_logprobs_forward(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, inv_temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logits (N, V), labels (N,) int64 -> logp, lse, entropy-or-None, each (N,): logp and
    entropy fp32 (fp64 for fp64 logits), lse fp64 for every dtype. lse is 0 on ignored rows
    (never used there)."""
    _check_logits(logits)
    n, v = logits.shape
    acc, f64, tl_acc = _acc(logits.dtype)
    labels = labels.contiguous()
    logp = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=torch.float64, device=logits.device)
    entropy = torch.empty(n, dtype=acc, device=logits.device) if with_entropy else None
    if n == 0:
        return logp, lse, entropy
    hi, lo = _split_scalar(inv_temperature)
    _token_logprobs_fwd_kernel[(n,)](
        logits,
        labels,
        logp,
        lse,
        entropy if entropy is not None else lse,
        v,
        logits.stride(0),
        hi,
        lo,
        int(ignore_index),
        WITH_ENTROPY=bool(with_entropy),
        F64=f64,
        ACC=tl_acc,
    )
    return logp, lse, entropy


def token_logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    ignore_index: int,
    inv_temperature: float,
) -> torch.Tensor:
    """-> grad_logits (N, V) in the logits dtype. `lse` is the forward's fp64 (N,) tensor.
    `entropy` and `grad_entropy` are both given (return_entropy) or both None."""
    _check_logits(logits)
    assert lse.dtype == torch.float64, f"token_logprobs (triton): lse must be float64, got {lse.dtype}"
    n, v = logits.shape
    _, f64, tl_acc = _acc(logits.dtype)
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if n == 0:
        return grad_logits
    with_entropy = grad_entropy is not None
    if with_entropy and entropy is None:
        raise ValueError("token_logprobs (triton): grad_entropy given without the saved entropy")
    hi, lo = _split_scalar(inv_temperature)
    grid = lambda meta: (n, triton.cdiv(v, meta["BLOCK_V"]))
    _token_logprobs_bwd_kernel[grid](
        logits,
        labels.contiguous(),
        lse.contiguous(),
        entropy.contiguous() if with_entropy else lse,
        grad_logp.contiguous(),
        grad_entropy.contiguous() if with_entropy else grad_logp,
        grad_logits,
        v,
        logits.stride(0),
        grad_logits.stride(0),
        hi,
        lo,
        int(ignore_index),
        WITH_ENTROPY=with_entropy,
        F64=f64,
        ACC=tl_acc,
    )
    return grad_logits
