"""Triton kernels for `fastalign.ops.linear_logprobs`: per-token log-probs (and entropy) from
hidden states and the lm_head weight, with the (N, V) logits never written to global memory.

    z    = (hidden @ weight.T + bias) * inv_T       (N, V): one (BLOCK_N, BLOCK_V) tile at a time
    logp = min(z[label] − lse, 0),   lse = logsumexp(z),   H = −Σ p log p
    dz   = inv_T · ( g·(1[v = label] − p) − h·p·(log p + H) )      (g, h = 0 on ignored rows)
    d hidden = dz @ weight,   d weight = dzᵀ @ hidden,   d bias = Σ_rows dz

Forward (`_linear_logprobs_fwd_kernel` + `_linear_logprobs_combine_kernel`): a 1-D grid of
(row block, vocabulary range) programs. Each program computes its logits tiles with `tl.dot` over
H in BLOCK_K steps (fp32 accumulator; fp64 for fp64 inputs), adds the bias, scales by inv_T and
folds the tile into online per-row statistics (running max m, s = Σ e^{z−m},
t = Σ e^{z−m}(z−m), the label logit), then writes them as partials (4, SPLIT, N). The combine
kernel merges the SPLIT partials per row (same rescaling rule) into logp, lse, entropy; the saved
lse is float64 for every input dtype (M + log S formed in fp64, so the exact max is not rounded
away) and the backward splits it once per row into fp32 hi + lo, forming z − lse as
(z − hi) − lo with the tile math in fp32.
Why split the vocabulary (Hopper): at N = 8k tokens there are only 64 row blocks of 128, half
the H200's 132 SMs. Splitting V into SPLIT ≥ 16 ranges gives ≥ 4 waves of programs, and ordering
the programs row-block-major means the ~132 programs resident at once touch only ~132/SPLIT row
blocks of `hidden` (≈ 8 MiB at H = 4096) — these stay in the 50 MB L2 across all their vocabulary
tiles — while each weight tile fetched from HBM is shared by the programs of its range: the same
L2 grouping a good GEMM schedule uses. No gradient work happens in the forward; when the op's
gradient filter is on (and a gradient is needed) it also stores, per row, the log-mass
log Σ e^{z} of every block of FB = 256 vocabulary columns (ranges and tiles divide FB).

Backward: materialising dz in registers and scattering both weight-gradient products with
atomics (the ml-cross-entropy way) would issue (BLOCK_N+BLOCK_V)·H fp32 atomics per tile:
N·H·V/BLOCK_V + V·H·N/BLOCK_N adds — ~270 GB of L2 atomics for N = 8k, V = 256k, H = 4k against
~53 ms of bf16 tensor-core work, i.e. atomic-bound by several times on an H200. Instead the
vocabulary is walked in chunks of C columns (C picked so the chunk buffer is ~128 MiB, 1k-8k
columns): `_linear_logprobs_bwd_kernel` recomputes each (BLOCK_N, BLOCK_V) logits tile with
`tl.dot`, forms dz in registers and stores it once, in the input dtype, into an (N, C) buffer
(plus exact fp32 column sums for d bias). The two products then read that buffer:

- exact (no gradient filter): both are dense GEMMs, so both go to cuBLAS — d weight[chunk] =
  dzᵀ @ hidden written straight into the gradient, and d hidden += dz @ weight[chunk] as
  `torch.addmm(..., out_dtype=float32)` into the fp32 accumulator (bf16 operands, fp32
  accumulation and result, no rounded partial product). cuBLAS is at least as fast as a Triton
  GEMM on these shapes, needs no autotuning, and so nothing re-tunes when the valid-row count
  (hence C) changes from step to step.
- filtered (`keep` mask from the op's grad filter, blocks of FB = 256 columns): the dz kernel
  skips — recompute included — every tile whose rows all dropped its block (it stores zeros),
  and zeroes the dropped rows of the others; `_linear_logprobs_bwd_dh_kernel` (d hidden += dz @
  weight, each program owning its output tile: no atomics) and `_linear_logprobs_bwd_dw_kernel`
  (d weight = dzᵀ @ hidden) skip every K step whose block all their rows dropped. Their
  autotune key is the model shape (H, V) and an N bucket, never C.

The dz round trip is ~3·N·V·2 bytes, ~13 GB at the shape above (~3 ms of HBM time against
~53 ms of matmul), every matmul runs on tensor cores at GEMM tile sizes, nothing is atomic and the
result is deterministic. The full logits and the full dz never exist; peak extra memory is one
(N, C) dz chunk plus the fp32 d hidden buffer. The chunk is stored C_PAD wide (whole multiples of
256 columns, zeros past the vocabulary), so the last chunk of an odd vocabulary (50257) keeps
unmasked, vectorised dz loads. `chunk_size` from the op is honoured as a lower bound on C on a
GPU (exactly, under the interpreter, so tests can cover several chunks).

The op (fastalign/ops/linear_logprobs.py) drops ignored rows before calling the launchers when
it validates the labels (one host sync for both); the launchers themselves never sync, and with
`validate=False` the kernels compute every row and zero the ignored ones (their labels mask
them). Every launch runs under `torch.cuda.device(hidden.device)`.

Tiles (Hopper): 128×128 tiles (128×256 for the dz kernel) with BLOCK_K = 64, 8 warps (two
warpgroups issuing wgmma), 3-4 cp.async pipeline stages (4·(128+128)·64·2 B = 128 KiB of shared
memory for bf16; 3·(128+256)·64·2 B = 144 KiB), plus 64-row tiles for small N. Every bf16/fp16
config was compiled offline for sm_90 (triton.compile with a GPUTarget, no GPU needed): HGMMA in
the SASS, 181-255 registers, no spills (before the gradient filter: the filtered branches and
`_linear_logprobs_bwd_dw_kernel` have not been compiled for sm_90 yet). Configs whose operand
tiles exceed the shared-memory
budget are pruned per dtype, and 4-/8-byte dtypes (FMA / DMMA dots) keep only the 64×64 tile.
Autotuned per (V, H, N bucket, dtype): N varies every step, so only its rough size is part of
the key. bf16 / fp16 operands go to tl.dot as they are, with fp32 accumulation; fp32 operands
use TF32 only when torch allows it (`torch.backends.cuda.matmul.allow_tf32`), otherwise
full-precision "ieee" dots; fp64 inputs use fp64 dots and fp64 statistics. All row /
vocabulary / hidden offsets are int64.

Size (~1000 lines, over the project's ~400): one op per file — the forward, combine, dz, filtered
d_hidden / d_weight kernels and their launchers share tile constants and autotune keys.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl
from fastalign.kernels._common import _acc, _scale, _split_lse, _split_scalar

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# FASTALIGN_TRITON_AUTOTUNE=0: skip autotuning, use the last (64×64, any-dtype) config of each
# list. For GPU test suites, where tuning every small test shape would dominate the run time.
_AUTOTUNE = os.environ.get("FASTALIGN_TRITON_AUTOTUNE", "1") != "0"
_SMEM_BUDGET = 200 * 1024  # of the 227 KiB a Hopper block may use; the rest for epilogue scratch
_MIN_SPLIT = 16  # vocabulary ranges in the forward (see the module docstring)
_DZ_CHUNK_BYTES = 128 * 2**20  # target size of the backward's (N, C) dz chunk
_MIN_CHUNK, _MAX_CHUNK = 1024, 8192  # clamp on C (GPU), columns


def _cfg(bn: int, bv: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def _fwd_configs(every: bool = False) -> list[triton.Config]:
    """Forward: logits tiles of (BLOCK_N, BLOCK_V), K loop over H, then the online-statistics
    epilogue. 128×256 is left out: with the loop-carried row statistics it spills at 255
    registers (checked in the sm_90 cubin); 128×128 with 8 warps fits in 255 without spills."""
    if _INTERPRET:
        return [_cfg(16, 32, 16, 1, 1)]
    configs = [
        _cfg(128, 128, 64, 8, 4),
        _cfg(128, 128, 64, 8, 3),
        _cfg(64, 128, 64, 4, 4),
        _cfg(64, 64, 32, 4, 3),  # small N; the only one kept for fp32 / fp64 operands
    ]
    return configs if _AUTOTUNE or every else configs[-1:]  # every: the GPU tests force each one


def _dz_configs(every: bool = False) -> list[triton.Config]:
    """Backward dz tiles: no loop-carried statistics, so 128×256 fits (255 registers, no spill)."""
    if _INTERPRET:
        return [_cfg(16, 32, 16, 1, 1)]
    configs = [
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 128, 64, 8, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(64, 64, 32, 4, 3),
    ]
    return configs if _AUTOTUNE or every else configs[-1:]  # every: the GPU tests force each one


def _dh_configs(every: bool = False) -> list[triton.Config]:
    """d hidden GEMM: output tiles of (BLOCK_N, BLOCK_V = hidden columns), K loop over the chunk.
    128×256 is left out: the fp32 running-sum tile makes it spill (64 B of stack on sm_90)."""
    if _INTERPRET:
        return [_cfg(16, 32, 16, 1, 1)]
    configs = [
        _cfg(128, 128, 64, 8, 4),
        _cfg(128, 128, 64, 8, 3),
        _cfg(64, 128, 64, 4, 4),
        _cfg(64, 64, 32, 4, 3),
    ]
    return configs if _AUTOTUNE or every else configs[-1:]  # every: the GPU tests force each one


# Vocabulary ranges of the forward split are multiples of this (every BLOCK_V divides it), and so
# is the gradient filter's block (fastalign.ops.linear_logprobs.FILTER_BLOCK): a block never
# straddles two ranges.
_V_GRANULE = 256
# The backward's dz chunk is stored in whole multiples of this many columns (zeros past the
# vocabulary): the readers' tiles (≤ 256 columns on a GPU, ≤ 32 in the interpreter) need no
# column mask, and an odd vocabulary (50257) keeps vectorised loads in its last chunk.
_PAD = 32 if _INTERPRET else 256


def _prune(configs, named_args, **kwargs):
    """Keep the configs whose pipelined operand tiles fit in shared memory for this dtype. fp32
    ("ieee") and fp64 dots run on FMA / DMMA with operands in registers: only the 64×64 tile
    stays free of spills there, so 4- and 8-byte dtypes get only that one."""
    x = named_args.get("h_ptr", named_args.get("dz_ptr"))
    size = x.element_size() if isinstance(x, torch.Tensor) else 2
    fits = [
        c
        for c in configs
        if c.num_stages * (c.kwargs["BLOCK_N"] + c.kwargs["BLOCK_V"]) * c.kwargs["BLOCK_K"] * size
        <= _SMEM_BUDGET
        and (size <= 2 or c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_V"] <= 64 * 64)
    ]
    return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_V"])]


_PRUNE = {"early_config_prune": _prune}
_EVEN_K = {"EVEN_K": lambda args: args["H"] % args["BLOCK_K"] == 0}


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,  # (BLOCK_N,) int32 row ids, already wrapped into [0, N)
    cols,  # (BLOCK_V,) int32 vocabulary ids, already wrapped into [0, V)
    H,
    stride_hn,
    stride_wv,
    inv_t_hi,
    inv_t_lo,
    HAS_BIAS: tl.constexpr,
    F64: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(hidden[rows] @ weight[cols].T + bias[cols]) * inv_T as a (BLOCK_N, BLOCK_V) ACC tile."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hn + offs_k[None, :]  # (BLOCK_N, BLOCK_K)
    b_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wv + offs_k[:, None]  # (BLOCK_K, BLOCK_V)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < H - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if DOT_UPCAST:  # interpreter only: its bf16 tl.dot is wrong
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=ACC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(ACC)[None, :]
    return _scale(acc, inv_t_hi, inv_t_lo, F64)


@triton.autotune(configs=_fwd_configs(), key=["V", "H", "N_BUCKET"], prune_configs_by=_PRUNE)
@triton.heuristics(_EVEN_K)
@triton.jit
def _linear_logprobs_fwd_kernel(
    h_ptr,  # (N, H), unit column stride
    w_ptr,  # (V, H), unit column stride
    b_ptr,  # (V,) or a dummy
    lab_ptr,  # (N,) int64
    part_ptr,  # (4, SPLIT, N) ACC out: m, s, label logit, t
    N,
    V,
    H,
    V_RANGE,  # vocabulary columns per split, a multiple of BLOCK_V
    SPLIT,
    stride_hn,
    stride_wv,
    inv_t_hi,
    inv_t_lo,
    ignore_index,
    N_BUCKET,  # autotune key only
    lmass_ptr,  # (N, NB) fp32 out, used if WITH_MASS: log Σ e^{z} of each block of FB columns
    NB,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_MASS: tl.constexpr,
    FB: tl.constexpr,
    F64: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = pid // SPLIT  # row-block-major: resident programs share few row blocks (L2)
    pid_s = pid % SPLIT
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(lab_ptr + rows, mask=row_ok, other=ignore_index)
    rows_ld = rows % N  # tail rows re-read valid rows; their stats are never stored
    v_lo = pid_s * V_RANGE
    v_hi = tl.minimum(v_lo + V_RANGE, V)
    offs_v = tl.arange(0, BLOCK_V)

    m = tl.full((BLOCK_N,), float("-inf"), ACC)
    s = tl.zeros((BLOCK_N,), ACC)
    t = tl.zeros((BLOCK_N,), ACC)
    z_lab = tl.zeros((BLOCK_N,), ACC)
    cell_s = tl.zeros((BLOCK_N,), ACC)  # Σ e^{z - m_ref} over the current block of FB columns
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + offs_v
        col_ok = cols < v_hi
        z = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows_ld,
            cols % V,
            H,
            stride_hn,
            stride_wv,
            inv_t_hi,
            inv_t_lo,
            HAS_BIAS,
            F64,
            ACC,
            DOT_PREC,
            DOT_UPCAST,
            EVEN_K,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
        )
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
        alpha = tl.exp(m - m_ref)
        d = z - m_ref[:, None]
        e = tl.exp(d)
        if WITH_ENTROPY:
            shift = (tl.where(s > 0.0, m, m_ref) - m_ref) * s
            t = alpha * (t + shift) + tl.sum(e * tl.where(e > 0.0, d, 0.0), 1)
        s = s * alpha + tl.sum(e, 1)
        m = m_new
        z_lab += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
        if WITH_MASS:  # ranges and BLOCK_V divide FB: a block lies in one program, tiles in order
            cell_s = cell_s * alpha + tl.sum(e, 1)
            if ((v0 + BLOCK_V) % FB == 0) | (v0 + BLOCK_V >= v_hi):
                lm = (m_ref + tl.log(cell_s)).to(tl.float32)  # -inf for a block without mass
                tl.store(lmass_ptr + rows.to(tl.int64) * NB + v0 // FB, lm, mask=row_ok)
                cell_s = tl.zeros((BLOCK_N,), ACC)

    out = part_ptr + pid_s.to(tl.int64) * N + rows
    stat = tl.cast(SPLIT, tl.int64) * N
    tl.store(out, m, mask=row_ok)
    tl.store(out + stat, s, mask=row_ok)
    tl.store(out + 2 * stat, z_lab, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(out + 3 * stat, t, mask=row_ok)


@triton.jit
def _linear_logprobs_combine_kernel(
    part_ptr,  # (4, SPLIT, N) ACC
    lab_ptr,
    logp_ptr,
    lse_ptr,  # (N,) fp64
    ent_ptr,
    N,
    SPLIT,
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Merge the SPLIT partial (m, s, t, label logit) of each row: M = max m_j,
    S = Σ e^{m_j−M} s_j, T = Σ e^{m_j−M} (t_j + (m_j−M) s_j)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    stat = tl.cast(SPLIT, tl.int64) * N
    big_m = tl.full((BLOCK,), float("-inf"), ACC)
    big_s = tl.zeros((BLOCK,), ACC)
    big_t = tl.zeros((BLOCK,), ACC)
    z_lab = tl.zeros((BLOCK,), ACC)
    for j in range(0, SPLIT):
        p = part_ptr + tl.cast(j, tl.int64) * N + rows
        mj = tl.load(p, mask=ok, other=float("-inf"))
        sj = tl.load(p + stat, mask=ok, other=0.0)
        z_lab += tl.load(p + 2 * stat, mask=ok, other=0.0)
        m_new = tl.maximum(big_m, mj)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp(big_m - ref)
        b = tl.exp(mj - ref)
        if WITH_ENTROPY:
            tj = tl.load(p + 3 * stat, mask=ok, other=0.0)
            ta = (tl.where(big_s > 0.0, big_m, ref) - ref) * big_s
            tb = (tl.where(sj > 0.0, mj, ref) - ref) * sj
            big_t = a * (big_t + ta) + b * (tj + tb)
        big_s = a * big_s + b * sj
        big_m = m_new
    labels = tl.load(lab_ptr + rows, mask=ok, other=ignore_index)
    valid = labels != ignore_index
    big_s = tl.where(valid, big_s, 1.0)
    log_s = tl.log(big_s)
    logp = tl.minimum((z_lab - big_m) - log_s, 0.0)  # z - max is exact near the max, as in eager
    tl.store(logp_ptr + rows, tl.where(valid, logp, 0.0), mask=ok)
    # Saved lse: the sum formed in fp64, so the exact fp32 max is not rounded away.
    lse64 = tl.cast(big_m, tl.float64) + tl.cast(log_s, tl.float64)
    tl.store(lse_ptr + rows, tl.where(valid, lse64, 0.0), mask=ok)
    if WITH_ENTROPY:
        ent = tl.maximum(log_s - big_t / big_s, 0.0)
        tl.store(ent_ptr + rows, tl.where(valid, ent, 0.0), mask=ok)


@triton.autotune(configs=_dz_configs(), key=["V", "H", "N_BUCKET"], prune_configs_by=_PRUNE)
@triton.heuristics(_EVEN_K)
@triton.jit
def _linear_logprobs_bwd_kernel(
    h_ptr,  # (N, H)
    w_ptr,  # (V, H)
    b_ptr,  # (V,) or a dummy
    lab_ptr,  # (N,) int64
    lse_ptr,  # (N,) fp64
    ent_ptr,  # (N,) ACC, used if WITH_ENTROPY
    glogp_ptr,  # (N,)
    gent_ptr,  # (N,), used if WITH_ENTROPY
    dz_ptr,  # (N, ≥ C_PAD) out, input dtype: dL/dlogits for vocabulary columns [c0, c0 + C)
    dbp_ptr,  # (cdiv(N, BLOCK_N), ≥ C) ACC out: per-row-block column sums of dz (d bias)
    keep_ptr,  # (N, NB) uint8, used if HAS_KEEP: 0 = the row drops that block of FB columns
    N,
    V,
    H,
    c0,
    C,
    C_PAD,  # columns stored: C rounded up (zeros past C), so that readers load whole tiles
    NB,
    stride_hn,
    stride_wv,
    stride_dz,
    stride_dbp,
    inv_t_hi,
    inv_t_lo,
    ignore_index,
    N_BUCKET,  # autotune key only
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    FB: tl.constexpr,
    F64: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # Grouped order: GROUP_N row blocks sweep the chunk together, so resident programs share
    # a few row blocks of hidden and each weight tile in L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(C_PAD, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group
    pid_v = (pid % per_group) // group

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    cols = c0 + local
    row_ok = rows < N
    col_ok = local < C
    labels = tl.load(lab_ptr + rows, mask=row_ok, other=ignore_index)
    valid = (labels != ignore_index) & row_ok
    dz = tl.zeros((BLOCK_N, BLOCK_V), ACC)
    if HAS_KEEP:  # c0 and BLOCK_V divide FB: the tile lies in one block
        kept = tl.load(keep_ptr + rows.to(tl.int64) * NB + (c0 + pid_v * BLOCK_V) // FB, mask=row_ok, other=0)
        valid = valid & (kept != 0)
        run = tl.max(valid.to(tl.int32), 0) > 0  # a tile every row dropped: no recompute at all
    else:
        run = True
    if run:
        z = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows % N,
            cols % V,
            H,
            stride_hn,
            stride_wv,
            inv_t_hi,
            inv_t_lo,
            HAS_BIAS,
            F64,
            ACC,
            DOT_PREC,
            DOT_UPCAST,
            EVEN_K,
            BLOCK_N,
            BLOCK_V,
            BLOCK_K,
        )
        g = tl.where(valid, tl.load(glogp_ptr + rows, mask=row_ok, other=0.0).to(ACC), 0.0)
        lse = tl.load(lse_ptr + rows, mask=valid, other=float("inf"))  # fp64; p = 0 off rows
        if F64:
            logp = z - lse[:, None]
        else:
            lse_hi, lse_lo = _split_lse(lse)  # per row; the (BLOCK_N, BLOCK_V) math stays fp32
            logp = (z - lse_hi[:, None]) - lse_lo[:, None]
        p = tl.exp(logp)
        d = -g[:, None] * p
        if WITH_ENTROPY:
            gh = tl.where(valid, tl.load(gent_ptr + rows, mask=row_ok, other=0.0).to(ACC), 0.0)
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0).to(ACC)
            d -= gh[:, None] * p * tl.where(p > 0.0, logp + ent[:, None], 0.0)
        d = tl.where(cols[None, :] == labels[:, None], d + g[:, None], d)
        d = _scale(d, inv_t_hi, inv_t_lo, F64)
        dz = tl.where(valid[:, None] & col_ok[None, :], d, 0.0)

    dz_ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + local[None, :]
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & (local < C_PAD)[None, :])
    if NEED_DBIAS:
        tl.store(dbp_ptr + pid_n.to(tl.int64) * stride_dbp + local, tl.sum(dz, 0), mask=col_ok)


@triton.autotune(
    configs=_dh_configs(),
    key=["H", "V", "N_BUCKET"],  # not the chunk width: it follows the valid-row count every step
    prune_configs_by=_PRUNE,
    restore_value=["dh_ptr"],
)
@triton.jit
def _linear_logprobs_bwd_dh_kernel(
    dz_ptr,  # (N, ≥ C_PAD) input dtype, row stride stride_dz, zeros past C
    w_ptr,  # (V, H); rows c0 .. c0 + C are used
    dh_ptr,  # (N, H) ACC, accumulated in place
    keep_ptr,  # (N, NB) uint8, used if HAS_KEEP
    N,
    H,
    V,  # autotune key only
    C,
    C_PAD,  # a multiple of BLOCK_K: the dz loads need no mask
    c0,
    NB,
    stride_dz,
    stride_wv,
    stride_dh,
    N_BUCKET,  # autotune key only
    HAS_KEEP: tl.constexpr,
    FB: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,  # hidden columns per output tile
    BLOCK_K: tl.constexpr,  # chunk columns per step
):
    """d_hidden[:, :] += dz @ weight[c0 : c0 + C]: a tiled GEMM; each program owns its
    (BLOCK_N, BLOCK_V) output tile, so the fp32 read-modify-write needs no atomics. With HAS_KEEP
    (the gradient filter) a K step whose block every row of the tile dropped is skipped."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_h = tl.cdiv(H, BLOCK_V)
    per_group = GROUP_N * num_h
    first_n = (pid // per_group) * GROUP_N
    group = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group
    pid_h = (pid % per_group) // group

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    hcols = pid_h * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    out_mask = row_ok[:, None] & (hcols < H)[None, :]
    # Start from the running sum: only one (BLOCK_N, BLOCK_V) tile is ever live in registers.
    acc = tl.load(dh_ptr + rows.to(tl.int64)[:, None] * stride_dh + hcols[None, :], mask=out_mask, other=0.0)
    a_ptrs = dz_ptr + (rows % N).to(tl.int64)[:, None] * stride_dz + offs_k[None, :]
    b_ptrs = w_ptr + (c0 + offs_k).to(tl.int64)[:, None] * stride_wv + (hcols % H)[None, :]
    for k0 in range(0, C_PAD, BLOCK_K):
        if HAS_KEEP:  # BLOCK_K and c0 divide FB: the step lies in one block
            kept = tl.load(keep_ptr + rows.to(tl.int64) * NB + (c0 + k0) // FB, mask=row_ok, other=0)
            run = tl.max(kept.to(tl.int32), 0) > 0
        else:
            run = True
        if run:
            a = tl.load(a_ptrs)  # whole rows of dz: C_PAD columns were stored, zeros past C
            b = tl.load(b_ptrs, mask=(offs_k < C - k0)[:, None], other=0.0)  # weight rows < V only
            if DOT_UPCAST:  # interpreter only: its bf16 tl.dot is wrong
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=ACC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * tl.cast(stride_wv, tl.int64)
    tl.store(dh_ptr + rows.to(tl.int64)[:, None] * stride_dh + hcols[None, :], acc, mask=out_mask)


@triton.autotune(configs=_dh_configs(), key=["H", "V", "N_BUCKET"], prune_configs_by=_PRUNE)
@triton.jit
def _linear_logprobs_bwd_dw_kernel(
    dz_ptr,  # (N, ≥ C_PAD) input dtype, zeros past C
    h_ptr,  # (N, H)
    dw_ptr,  # (V, H) out, input dtype: rows c0 .. c0 + C written
    keep_ptr,  # (N, NB) uint8, used if HAS_KEEP
    N,
    H,
    V,  # autotune key only
    C,
    c0,
    NB,
    stride_dz,
    stride_hn,
    stride_dw,
    N_BUCKET,  # autotune key only
    HAS_KEEP: tl.constexpr,
    FB: tl.constexpr,
    ACC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr,  # vocabulary rows of d_weight per output tile (divides FB)
    BLOCK_V: tl.constexpr,  # hidden columns per output tile
    BLOCK_K: tl.constexpr,  # token rows per step
):
    """d_weight[c0 : c0 + C] = dz.T @ hidden for the filtered backward: token-row steps whose
    rows all dropped this tile's block are skipped (the dense backward uses cuBLAS instead)."""
    pid = tl.program_id(0)
    num_v = tl.cdiv(C, BLOCK_N)
    num_h = tl.cdiv(H, BLOCK_V)
    per_group = GROUP_N * num_h
    first_v = (pid // per_group) * GROUP_N
    group = tl.minimum(num_v - first_v, GROUP_N)
    pid_v = first_v + (pid % per_group) % group
    pid_h = (pid % per_group) // group

    vrows = pid_v * BLOCK_N + tl.arange(0, BLOCK_N)  # column of dz = row of d_weight - c0
    hcols = pid_h * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_V), ACC)
    block = (c0 + pid_v * BLOCK_N) // FB
    a_ptrs = dz_ptr + offs_k.to(tl.int64)[None, :] * stride_dz + vrows[:, None]  # (BLOCK_N, BLOCK_K)
    b_ptrs = h_ptr + offs_k.to(tl.int64)[:, None] * stride_hn + (hcols % H)[None, :]  # (BLOCK_K, BLOCK_V)
    for k0 in range(0, N, BLOCK_K):
        tok_ok = offs_k < N - k0
        if HAS_KEEP:
            kept = tl.load(keep_ptr + (k0 + offs_k).to(tl.int64) * NB + block, mask=tok_ok, other=0)
            run = tl.max(kept.to(tl.int32), 0) > 0
        else:
            run = True
        if run:
            a = tl.load(a_ptrs, mask=tok_ok[None, :] & (vrows < C)[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=tok_ok[:, None], other=0.0)
            if DOT_UPCAST:  # interpreter only: its bf16 tl.dot is wrong
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=ACC)
        a_ptrs += BLOCK_K * tl.cast(stride_dz, tl.int64)
        b_ptrs += BLOCK_K * tl.cast(stride_hn, tl.int64)
    out = dw_ptr + (c0 + vrows).to(tl.int64)[:, None] * stride_dw + hcols[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=(vrows < C)[:, None] & (hcols < H)[None, :])


# ---------------------------------------------------------------------------------------------
# launchers (same signatures as linear_logprobs_forward_torch / linear_logprobs_backward_torch)
# ---------------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dot_precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 operands only where torch itself would use it; ignored for 16-bit dtypes."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _dot_upcast(dtype: torch.dtype) -> bool:
    """Interpreter only: its bf16 tl.dot gives wrong results, so bf16 tiles are upcast to fp32
    before the dot (loads, stores and all other math keep the real dtypes). Never on a GPU."""
    return _INTERPRET and dtype == torch.bfloat16


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _n_bucket(n: int) -> int:
    """Coarse N for the autotune key (N changes every step; a re-tune per N would be costly)."""
    return 0 if n <= 256 else (1 if n <= 2048 else 2)


def _check(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"linear_logprobs (triton): unsupported dtype {hidden.dtype}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError("linear_logprobs (triton): hidden must be (N, H) and weight (V, H)")
    if hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("linear_logprobs (triton): hidden and weight need unit column stride")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError("linear_logprobs (triton): hidden, weight and bias must share a dtype")


def _device_guard(t: torch.Tensor):
    """Every launch runs on the tensor's GPU, not the current one (`train.device: cuda:1`)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    inv_temperature: float,
    with_entropy: bool,
    chunk_size: int,
    filter_block: int = 0,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """hidden (N, H), weight (V, H), bias (V,) | None, labels (N,) int64 -> logp, lse,
    entropy-or-None, lmass-or-None: logp and entropy (N,) fp32 (fp64 for fp64 inputs), lse (N,)
    fp64 for every dtype (0 on ignored rows); with filter_block = B > 0, lmass (N, ceil(V / B))
    fp32, the log Σ e^{z} of each block of B vocabulary columns (B a multiple of 256).
    `chunk_size` is not used: the forward picks its own tiles (autotuned) and splits. Every row
    is computed (the op drops ignored rows beforehand when it may sync); no host sync here.
    `order` (a vocabulary order for the filter's blocks) is not supported: the kernels walk the
    vocabulary in its own order, and the op never asks for another."""
    del chunk_size
    _check(hidden, weight, bias)
    if order is not None:
        raise ValueError("linear_logprobs (triton): `order` must be None (the kernels keep the vocab order)")
    if filter_block and filter_block % _V_GRANULE:
        raise ValueError(f"linear_logprobs (triton): filter_block must be a multiple of {_V_GRANULE}")
    with _device_guard(hidden):
        y = labels.contiguous()
        return _forward(hidden, weight, bias, y, ignore_index, inv_temperature, with_entropy, filter_block)


def _forward(hidden, weight, bias, labels, ignore_index, inv_temperature, with_entropy, filter_block):
    n, h = hidden.shape
    v = weight.shape[0]
    acc, f64, tl_acc = _acc(hidden.dtype)
    dev = hidden.device
    logp = torch.empty(n, dtype=acc, device=dev)
    lse = torch.empty(n, dtype=torch.float64, device=dev)
    entropy = torch.empty(n, dtype=acc, device=dev) if with_entropy else None
    nb = triton.cdiv(v, filter_block) if filter_block else 0
    lmass = torch.empty((n, nb), dtype=torch.float32, device=dev) if filter_block else None
    if n == 0:
        return logp, lse, entropy, lmass
    # Vocabulary split: ≥ _MIN_SPLIT ranges, and ≥ ~4 programs per SM at BLOCK_N = 128.
    split = max(_MIN_SPLIT, triton.cdiv(4 * _num_sms(dev), triton.cdiv(n, 128)))
    v_range = triton.cdiv(triton.cdiv(v, split), _V_GRANULE) * _V_GRANULE
    split = triton.cdiv(v, v_range)
    part = torch.empty((4, split, n), dtype=acc, device=dev)
    hi, lo = _split_scalar(inv_temperature)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * split,)
    _linear_logprobs_fwd_kernel[grid](
        hidden,
        weight,
        bias if bias is not None else weight,
        labels,
        part,
        n,
        v,
        h,
        v_range,
        split,
        hidden.stride(0),
        weight.stride(0),
        hi,
        lo,
        int(ignore_index),
        _n_bucket(n),
        lmass if lmass is not None else part,
        nb,
        HAS_BIAS=bias is not None,
        WITH_ENTROPY=bool(with_entropy),
        WITH_MASS=lmass is not None,
        FB=filter_block or _V_GRANULE,
        F64=f64,
        ACC=tl_acc,
        DOT_PREC=_dot_precision(hidden.dtype),
        DOT_UPCAST=_dot_upcast(hidden.dtype),
    )
    block = 64 if _INTERPRET else 256
    _linear_logprobs_combine_kernel[(triton.cdiv(n, block),)](
        part,
        labels,
        logp,
        lse,
        entropy if entropy is not None else lse,
        n,
        split,
        int(ignore_index),
        WITH_ENTROPY=bool(with_entropy),
        ACC=tl_acc,
        BLOCK=block,
        num_warps=1 if _INTERPRET else 4,
    )
    return logp, lse, entropy, lmass


def _chunk_columns(n: int, v: int, itemsize: int, chunk_size: int) -> int:
    """Vocabulary columns per backward chunk. GPU: the larger of `chunk_size` and a ~128 MiB
    dz buffer (clamped to 1k-8k columns, a multiple of 256), so each GEMM stays large.
    Interpreter: `chunk_size` as given, so tests can cover several chunks."""
    if _INTERPRET:
        return max(1, min(int(chunk_size), v))
    target = _DZ_CHUNK_BYTES // max(1, n * itemsize)
    target = min(_MAX_CHUNK, max(_MIN_CHUNK, target))
    c = max(int(chunk_size), target)
    c = triton.cdiv(c, 256) * 256
    return min(c, v)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32 / fp64) += a @ b for a, b in the input dtype. CUDA: one cuBLAS GEMM with fp32
    output (bf16 / fp16 operands, fp32 accumulation and result, no rounded partial product).
    Interpreter (CPU): the same product in acc's dtype."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    ignore_index: int,
    inv_temperature: float,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    keep: torch.Tensor | None = None,
    filter_block: int = 0,
    compact: int = 0,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """-> (d_hidden (N, H) | None, d_weight (V, H) | None, d_bias (V,) | None), input dtypes.
    `lse` is the forward's fp64 (N,) tensor. keep (N, ceil(V / filter_block)) uint8 | None: the
    gradient filter's mask (dz = 0 where 0; tiles every row of which dropped their block are not
    computed, and the d_hidden / d_weight GEMMs skip them). `compact` is the cpp backend's and is
    ignored; `order` is not supported (see linear_logprobs_forward). No host sync."""
    del compact
    _check(hidden, weight, bias)
    if order is not None:
        raise ValueError("linear_logprobs (triton): `order` must be None (the kernels keep the vocab order)")
    assert lse.dtype == torch.float64, f"linear_logprobs (triton): lse must be float64, got {lse.dtype}"
    need_bias = bool(need_bias and bias is not None)
    with_entropy = grad_entropy is not None
    if with_entropy and entropy is None:
        raise ValueError("linear_logprobs (triton): grad_entropy given without the saved entropy")
    if keep is not None and (filter_block <= 0 or filter_block % _V_GRANULE):
        raise ValueError(f"linear_logprobs (triton): keep needs filter_block, a multiple of {_V_GRANULE}")
    with _device_guard(hidden):
        return _backward(
            hidden,
            weight,
            bias,
            labels.contiguous(),
            lse,
            entropy,
            grad_logp,
            grad_entropy,
            ignore_index,
            inv_temperature,
            chunk_size,
            need_hidden,
            need_weight,
            need_bias,
            keep.contiguous() if keep is not None else None,
            filter_block,
        )


def _backward(
    hidden,
    weight,
    bias,
    labels,
    lse,
    entropy,
    grad_logp,
    grad_entropy,
    ignore_index,
    inv_temperature,
    chunk_size,
    need_hidden,
    need_weight,
    need_bias,
    keep,
    filter_block,
):
    n, h = hidden.shape
    v = weight.shape[0]
    acc, f64, tl_acc = _acc(hidden.dtype)
    dev = hidden.device
    d_weight = (torch.zeros_like(weight) if n == 0 else torch.empty_like(weight)) if need_weight else None
    d_bias = torch.zeros_like(bias) if need_bias else None
    if n == 0 or not (need_hidden or need_weight or need_bias):
        return (torch.zeros_like(hidden) if need_hidden else None), d_weight, d_bias
    with_entropy = grad_entropy is not None
    has_keep = keep is not None
    nb = keep.shape[1] if has_keep else 0
    dh_acc = torch.zeros((n, h), dtype=acc, device=dev) if need_hidden else None
    c = _chunk_columns(n, v, hidden.element_size(), chunk_size)
    if has_keep and c < v and c % filter_block:
        raise ValueError("linear_logprobs (triton): the chunk must be a multiple of filter_block")
    # Stored width: whole tiles for the readers (the last chunk of an odd vocabulary too).
    dz = torch.empty((n, triton.cdiv(c, _PAD) * _PAD), dtype=hidden.dtype, device=dev)
    max_row_blocks = triton.cdiv(n, min(cfg.kwargs["BLOCK_N"] for cfg in _dz_configs()))
    dbp = torch.empty((max_row_blocks, c), dtype=acc, device=dev) if need_bias else lse
    hi, lo = _split_scalar(inv_temperature)
    prec = _dot_precision(hidden.dtype)
    upcast = _dot_upcast(hidden.dtype)
    lse = lse.contiguous()
    grad_logp = grad_logp.contiguous()
    ent_arg = entropy.contiguous() if with_entropy else lse
    gent_arg = grad_entropy.contiguous() if with_entropy else grad_logp
    keep_arg = keep if has_keep else labels
    fb = filter_block or _V_GRANULE
    group = 1 if _INTERPRET else 8
    for c0 in range(0, v, c):
        cw = min(c, v - c0)
        cp = triton.cdiv(cw, _PAD) * _PAD
        grid = lambda meta, cp=cp: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(cp, meta["BLOCK_V"]),)
        _linear_logprobs_bwd_kernel[grid](
            hidden,
            weight,
            bias if bias is not None else weight,
            labels,
            lse,
            ent_arg,
            grad_logp,
            gent_arg,
            dz,
            dbp,
            keep_arg,
            n,
            v,
            h,
            c0,
            cw,
            cp,
            nb,
            hidden.stride(0),
            weight.stride(0),
            dz.stride(0),
            dbp.stride(0),
            hi,
            lo,
            int(ignore_index),
            _n_bucket(n),
            HAS_BIAS=bias is not None,
            WITH_ENTROPY=with_entropy,
            NEED_DBIAS=need_bias,
            HAS_KEEP=has_keep,
            FB=fb,
            F64=f64,
            ACC=tl_acc,
            DOT_PREC=prec,
            DOT_UPCAST=upcast,
            GROUP_N=group,
        )
        dz_c = dz[:, :cw]
        if need_bias:
            block_n = _linear_logprobs_bwd_kernel.best_config.kwargs["BLOCK_N"]
            d_bias[c0 : c0 + cw] = dbp[: triton.cdiv(n, block_n), :cw].sum(0)
        if need_weight:
            if has_keep:  # skip the dropped tiles
                grid_w = lambda meta, cw=cw: (
                    triton.cdiv(cw, meta["BLOCK_N"]) * triton.cdiv(h, meta["BLOCK_V"]),
                )
                _linear_logprobs_bwd_dw_kernel[grid_w](
                    dz,
                    hidden,
                    d_weight,
                    keep_arg,
                    n,
                    h,
                    v,
                    cw,
                    c0,
                    nb,
                    dz.stride(0),
                    hidden.stride(0),
                    d_weight.stride(0),
                    _n_bucket(n),
                    HAS_KEEP=True,
                    FB=fb,
                    ACC=tl_acc,
                    DOT_PREC=prec,
                    DOT_UPCAST=upcast,
                    GROUP_N=group,
                )
            else:  # dense: one cuBLAS GEMM, fp32 accumulation inside, written in place
                torch.mm(dz_c.t(), hidden, out=d_weight[c0 : c0 + cw])
        if need_hidden:
            if has_keep:
                grid_h = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(h, meta["BLOCK_V"]),)
                _linear_logprobs_bwd_dh_kernel[grid_h](
                    dz,
                    weight,
                    dh_acc,
                    keep_arg,
                    n,
                    h,
                    v,
                    cw,
                    cp,
                    c0,
                    nb,
                    dz.stride(0),
                    weight.stride(0),
                    dh_acc.stride(0),
                    _n_bucket(n),
                    HAS_KEEP=True,
                    FB=fb,
                    ACC=tl_acc,
                    DOT_PREC=prec,
                    DOT_UPCAST=upcast,
                    GROUP_N=group,
                )
            else:  # dense: cuBLAS with an fp32 result (see _addmm_fp32)
                _addmm_fp32(dh_acc, dz_c, weight[c0 : c0 + cw])
    d_hidden = dh_acc.to(hidden.dtype) if need_hidden else None
    return d_hidden, d_weight, d_bias
