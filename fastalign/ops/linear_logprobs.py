"""Per-token log-probs (and entropy) straight from hidden states and the lm_head weight.

    z      = (hidden @ weight.T + bias) / temperature    (N, V) -- never held in memory
    logp   = z[label] - logsumexp(z)                      (N,)
    H      = -sum_v p_v log p_v

The forward walks the vocabulary tile by tile, keeping only per-row statistics (running max,
sum of exponentials, entropy term, label logit). The backward recomputes each logits tile and
turns it into dz (see token_logprobs.py for the formula), then accumulates

    d hidden += dz @ weight[tile]        d weight[tile] = dz.T @ hidden      d bias[tile] = dz.sum(0)

in fp32. No gradient work happens in the forward, so a no-grad call (reference model) costs
exactly one forward. Peak extra memory is a few (N, chunk) fp32 tiles instead of (N, V).

Gradient filter (`grad_filter`, a per-row budget δ of probability mass): when a gradient is
needed, the forward also keeps the log-mass of every block of FILTER_BLOCK vocabulary columns
per row, log Σ_{v ∈ block} e^{z_v} ((N, V / 256) floats, a by-product of the online pass). The
backward drops, per row, the blocks of least mass for as long as their summed probability stays
within δ (never the label's block) and sets dz = 0 there; the backends skip the work of dropped
blocks (C++: each vocabulary tile only for the rows that keep one of its blocks; Triton: every
(rows × columns) tile all of whose rows dropped its block, recompute included). With the filter
on, the CPU backends walk the vocabulary sorted by the batch's mean logit (`_vocab_order`), so that
tokens probable for many rows share blocks and more (row, tile) pairs can be left out.
Dropping mass S ≤ δ of row i changes its logit gradient by at most, in L1,

    ‖Δ dz_i‖₁ ≤ δ · (|g_i| + |h_i| · (ln(V / δ) + H_i)) / T

(the softmax part is |g_i|·S; the entropy part Σ p_v |log p_v + H| over the dropped entries is at
most S·(ln(M / S) + H) for M ≤ V entries, increasing in S), hence
‖Δ d_hidden_i‖∞ ≤ that · max_v ‖W_v‖∞ and |Δ d_W_vk| ≤ Σ_i (that)_i · |hidden_ik|.
"auto" is δ = the unit roundoff of the compute dtype for bfloat16 (2⁻⁸) and float16 (2⁻¹¹) —
no more than one rounding of the gradient entries themselves — and 0 (exact) for float32 and
float64: the mass fp32 could drop within its rounding (~2⁻²⁴) covers too few blocks to pay
(1-2 % of the blocks on SmolLM2-135M activations; see docs/ops.md).

Size (~780 lines, over the project's ~400): one op per file, as every op of this package — the
float64 reference, the torch backend (tiles, gradient filter), the custom-op registration (fake
kernels for torch.compile), the autograd Function and the public function belong together.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from fastalign.ops import _cpp
from fastalign.ops._backend import (
    FLOAT_DTYPES,
    check_backend_name,
    check_labels,
    check_temperature,
    out_dtype,
    require_tensor,
    resolve_backend,
)
from fastalign.ops.token_logprobs import _p_log_p, split_lse, token_logprobs_reference

_OP = "linear_logprobs"
_TILE_BYTES = 32 * 2**20  # default fp32 (N, chunk) tile size for the torch / cpp backends
FILTER_BLOCK = 256  # vocabulary columns per block of the gradient filter (every backend)
# Unit roundoff of the compute dtype: the "auto" grad filter budget (0: exact).
_AUTO_FILTER = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0, torch.float64: 0.0}
# cpp backend's row compaction of the filtered backward (csrc/linear_logprobs.cpp): 2 = per tile,
# when at most 85 % of the rows keep one of its blocks; 1 = whenever a row can be left out; 0 = off.
_CPP_COMPACT = 2


def default_chunk_size(n: int, vocab: int) -> int:
    """Vocabulary columns per tile: a ~32 MiB fp32 tile, at least 256 columns, a multiple of 256."""
    cols = _TILE_BYTES // (4 * max(n, 1))
    cols = max(256, (cols // 256) * 256)
    return min(cols, vocab)


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eager PyTorch: full logits, then log_softmax + gather (the benchmark's baseline; the
    ground truth when called in float64)."""
    logits = hidden @ weight.T  # (..., V)
    if bias is not None:
        logits = logits + bias
    return token_logprobs_reference(
        logits, labels, ignore_index=ignore_index, temperature=temperature, return_entropy=return_entropy
    )


# ---------------------------------------------------------------------------------------------
# torch backend: vocabulary tiles, online statistics; same signature as the cpp / triton ones.
# ---------------------------------------------------------------------------------------------
def _tile_rows(order, v0, v1):
    """Vocabulary rows of tile positions [v0, v1): a slice, or order[v0:v1] (see `order`)."""
    return slice(v0, v1) if order is None else order[v0:v1]


def _logits_tile(hidden, weight, bias, v0, v1, inv_temperature, acc, order=None):
    rows = _tile_rows(order, v0, v1)
    z = hidden @ weight[rows].T  # (N, Vc) in the input dtype, like eager
    if bias is not None:
        z = z + bias[rows]
    return z.to(acc).mul_(inv_temperature)


def linear_logprobs_forward_torch(
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
    """-> logp, lse (fp64), entropy | None, lmass (N, ceil(V / filter_block)) fp32 | None: the
    log-mass log Σ e^{z} of each block of filter_block columns (chunk_size is a multiple).
    order (V,) int64 | None: walk the vocabulary in this order (labels and lmass are then in
    positions of that order; the op maps them)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    lmass = None
    if filter_block:
        nb = -(-vocab // filter_block)
        lmass = torch.empty((n, nb), dtype=torch.float32, device=hidden.device)
    acc = out_dtype(hidden.dtype)
    dev = hidden.device
    m = torch.full((n,), float("-inf"), dtype=acc, device=dev)  # running max
    s = torch.zeros(n, dtype=acc, device=dev)  # sum exp(z - m)
    t = torch.zeros(n, dtype=acc, device=dev)  # sum exp(z - m) * (z - m), for the entropy
    z_label = torch.zeros(n, dtype=acc, device=dev)
    valid = labels != ignore_index
    rows = torch.arange(n, device=dev)
    for v0 in range(0, vocab, chunk_size):
        v1 = min(vocab, v0 + chunk_size)
        z = _logits_tile(hidden, weight, bias, v0, v1, inv_temperature, acc, order)  # (N, Vc)
        if lmass is not None:
            for b0 in range(v0, v1, filter_block):
                lmass[:, b0 // filter_block] = z[:, b0 - v0 : min(v1, b0 + filter_block) - v0].logsumexp(1)
        hit = valid & (labels >= v0) & (labels < v1)
        z_label = torch.where(hit, z[rows, torch.where(hit, labels - v0, 0)], z_label)
        m_new = torch.maximum(m, z.amax(1))
        # Shift by the running max, or by 0 while a row's logits so far are all -inf (masked
        # vocabulary): never -inf - -inf.
        m_ref = torch.where(m_new == float("-inf"), 0.0, m_new)
        scale = torch.exp(m - m_ref)  # 0 while m = -inf (s is still 0 then)
        z.sub_(m_ref.unsqueeze(1))
        e = z.exp()
        if with_entropy:
            # t' = e^{m-m'} (t + (m - m') s): guard the (-inf * 0) while s = 0.
            shift = torch.where(s > 0, (m - m_ref) * s, 0.0)
            t = scale * (t + shift) + _p_log_p(e, z).sum(1)
        s = s * scale + e.sum(1)
        m = m_new
    log_s = torch.log(s)
    lse = m.double() + log_s.double()  # float64: see split_lse
    logp = torch.where(valid, (z_label - m) - log_s, 0.0)
    entropy = torch.where(valid, log_s - t / s, 0.0) if with_entropy else None
    return logp, lse, entropy, lmass


def linear_logprobs_backward_torch(
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
    """keep (N, ceil(V / filter_block)) uint8 | None: dz is 0 on the blocks a row does not keep
    (the same gradient as the other backends; no work is saved here). `compact` is the cpp
    backend's row compaction and is ignored."""
    del compact
    vocab = weight.shape[0]
    drop = None if keep is None else (keep == 0).repeat_interleave(filter_block, dim=1)[:, :vocab]
    acc = out_dtype(hidden.dtype)
    valid = labels != ignore_index
    g = torch.where(valid, grad_logp.to(acc), 0.0).unsqueeze(1)  # (N, 1)
    gh = None
    if grad_entropy is not None:
        gh = torch.where(valid, grad_entropy.to(acc), 0.0).unsqueeze(1)
        h_plus = entropy.unsqueeze(1)
    hidden_acc = hidden.to(acc)
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
    d_weight = torch.empty_like(weight) if need_weight else None
    d_bias = torch.empty_like(bias) if need_bias else None
    lse_hi, lse_lo = split_lse(lse, acc)
    for v0 in range(0, vocab, chunk_size):
        v1 = min(vocab, v0 + chunk_size)
        logp = _logits_tile(hidden, weight, bias, v0, v1, inv_temperature, acc, order)
        logp.sub_(lse_hi).sub_(lse_lo)
        p = logp.exp()
        dz = -g * p
        if gh is not None:
            dz -= gh * _p_log_p(p, logp + h_plus)
        hit = valid & (labels >= v0) & (labels < v1)
        dz.scatter_add_(
            1, torch.where(hit, labels - v0, 0).unsqueeze(1), torch.where(hit.unsqueeze(1), g, 0.0)
        )
        dz.mul_(inv_temperature)  # d/d(raw logits)
        if drop is not None:
            dz.masked_fill_(drop[:, v0:v1], 0.0)
        if d_hidden is not None:
            d_hidden.addmm_(dz, weight[_tile_rows(order, v0, v1)].to(acc))
        if d_weight is not None:
            d_weight[_tile_rows(order, v0, v1)] = (dz.T @ hidden_acc).to(d_weight.dtype)
        if d_bias is not None:
            d_bias[_tile_rows(order, v0, v1)] = dz.sum(0).to(d_bias.dtype)
    return (d_hidden.to(hidden.dtype) if d_hidden is not None else None), d_weight, d_bias


# ---------------------------------------------------------------------------------------------
# gradient filter: which (row, block) pairs the backward may drop
# ---------------------------------------------------------------------------------------------
def resolve_grad_filter(grad_filter: float | str | None, dtype: torch.dtype) -> float:
    """The per-row probability budget δ of the gradient filter; 0.0 means exact (no filter).
    "auto": the unit roundoff of the compute dtype for bfloat16 / float16, 0 for float32 /
    float64 (see the module docstring); None or 0: off; a float in [0, 1): that budget."""
    if grad_filter is None:
        return 0.0
    if isinstance(grad_filter, str):
        if grad_filter != "auto":
            raise ValueError(
                f"{_OP}: grad_filter must be 'auto', None or a float in [0, 1), got {grad_filter!r}"
            )
        return _AUTO_FILTER[dtype]
    if isinstance(grad_filter, bool) or not isinstance(grad_filter, (int, float)):
        raise TypeError(
            f"{_OP}: grad_filter must be 'auto', None or a float, got {type(grad_filter).__name__}"
        )
    delta = float(grad_filter)
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"{_OP}: grad_filter must be in [0, 1), got {grad_filter!r}")
    return delta


def grad_filter_keep(
    lmass: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, ignore_index: int, budget: float, block: int
) -> torch.Tensor:
    """(N, nb) uint8 keep mask: per row, the blocks of least probability mass are dropped for as
    long as their summed mass stays ≤ budget; the label's block is always kept; ignored rows keep
    nothing (their gradient is 0). lmass (N, nb) is the forward's log Σ_{v ∈ block} e^{z_v},
    lse (N,) its log-sum-exp. A row with a NaN statistic keeps everything."""
    frac = torch.exp(lmass.double() - lse.double().unsqueeze(1))  # each block's share of the row
    valid = labels != ignore_index
    lab_block = torch.where(valid, labels, 0) // block
    frac.scatter_(1, lab_block.unsqueeze(1), float("inf"))  # the label's block: never dropped
    frac = torch.nan_to_num(frac, nan=float("inf"))
    ordered, order = frac.sort(dim=1)
    dropped = ordered.cumsum(dim=1) <= budget
    keep = torch.ones_like(frac, dtype=torch.uint8).scatter_(1, order, (~dropped).to(torch.uint8))
    return keep * valid.unsqueeze(1).to(torch.uint8)


_stats_sink = threading.local()


@contextmanager
def grad_filter_stats() -> Iterator[list[dict]]:
    """Collect what the gradient filter did in the backward passes run inside the block (this
    thread), one dict per `linear_logprobs` backward with a filter on:
    {"pairs": valid rows × blocks, "kept": kept pairs, "skipped_fraction": 1 − kept / pairs,
    "max_dropped_mass": the largest probability mass dropped from one row, "budget": δ,
    "compact": the cpp backend's row-compaction mode (0 elsewhere), "keep": the (N, nb) mask over
    all N rows, 0 on ignored ones, "order": None, or the vocabulary order the blocks follow
    (block j holds vocabulary rows order[256 j : 256 (j + 1)])}.
    For benchmarks and tests: recording costs a host sync per backward."""
    previous = getattr(_stats_sink, "records", None)
    records: list[dict] = []
    _stats_sink.records = records
    try:
        yield records
    finally:
        _stats_sink.records = previous


def _record_stats(keep, lmass, lse, valid, budget, compact, rows, n, order) -> None:
    """keep, lmass, lse, valid: over the computed rows; rows / n place them among all n rows."""
    records = getattr(_stats_sink, "records", None)
    if records is None:
        return
    frac = torch.exp(lmass.double() - lse.double().unsqueeze(1))
    kept_valid = keep[valid]
    pairs = kept_valid.numel()
    kept = int(kept_valid.sum())
    dropped_mass = torch.where(keep == 0, frac, 0.0)[valid].sum(1)
    records.append(
        {
            "pairs": pairs,
            "kept": kept,
            "skipped_fraction": 1.0 - kept / pairs if pairs else 0.0,
            "max_dropped_mass": float(dropped_mass.max()) if pairs else 0.0,
            "budget": budget,
            "compact": int(compact),
            "keep": _spread(keep, rows, n).clone(),
            "order": order,
        }
    )


# Backends that walk the vocabulary in the filter's order (the Triton kernels keep theirs).
_ORDERED_BACKENDS = ("cpp", "torch")


def _vocab_order(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Vocabulary rows sorted by the batch's mean logit, most probable first: tokens that are
    probable for many rows share blocks, so more (row, tile) pairs can be left out by the filter
    (on SmolLM2 activations at δ = 2⁻⁸ the rows a 2048-column tile must compute fall from 59 % to
    38 %). One matrix-vector product and a sort."""
    with torch.no_grad():
        mean_logit = torch.mv(weight, hidden.mean(0).to(weight.dtype))
        if bias is not None:
            mean_logit = mean_logit + bias
        return mean_logit.float().argsort(descending=True)


def _positions(labels: torch.Tensor, order: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Labels as positions in `order` (ignore_index kept; out-of-range labels, possible only with
    validate=False, are clamped so that nothing is read out of bounds)."""
    if order is None:
        return labels
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    ignored = labels == ignore_index
    return torch.where(ignored, labels, pos[labels.clamp(0, order.numel() - 1)])


# ---------------------------------------------------------------------------------------------
# backends as custom ops (opaque to torch.compile, which traces the rest of the op)
# ---------------------------------------------------------------------------------------------
def _kernels(backend: str) -> tuple[Callable, Callable]:
    if backend == "torch":
        return linear_logprobs_forward_torch, linear_logprobs_backward_torch
    if backend == "cpp":
        ext = _cpp.load()
        return ext.linear_logprobs_fwd, ext.linear_logprobs_bwd
    from fastalign.kernels import linear_logprobs as k  # triton is imported only for the triton backend

    return k.linear_logprobs_forward, k.linear_logprobs_backward


def _empty(like: torch.Tensor, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


@torch.library.custom_op("fastalign::linear_logprobs_fwd", mutates_args=())
def _fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    inv_temperature: float,
    with_entropy: bool,
    chunk_size: int,
    filter_block: int,
    backend: str,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> logp (N,), lse (N,) fp64, entropy (N,) or (0,), lmass (N, nb) fp32 or (N, 0).
    `backend` may still be "auto" (under torch.compile): it is resolved here, at run time."""
    fwd, _ = _kernels(resolve_backend(backend, hidden.device, _OP))
    args = (ignore_index, inv_temperature, with_entropy, chunk_size, filter_block, order)
    logp, lse, entropy, lmass = fwd(hidden, weight, bias, labels, *args)
    n = hidden.shape[0]
    entropy = entropy if entropy is not None else _empty(logp, 0)
    lmass = lmass if lmass is not None else _empty(logp, n, 0, dtype=torch.float32)
    return logp, lse, entropy, lmass


@_fwd_op.register_fake
def _(
    hidden,
    weight,
    bias,
    labels,
    ignore_index,
    inv_temperature,
    with_entropy,
    chunk_size,
    filter_block,
    backend,
):
    n, acc = hidden.shape[0], out_dtype(hidden.dtype)
    nb = -(-weight.shape[0] // filter_block) if filter_block else 0
    return (
        _empty(hidden, n, dtype=acc),
        _empty(hidden, n, dtype=torch.float64),
        _empty(hidden, n if with_entropy else 0, dtype=acc),
        _empty(hidden, n, nb, dtype=torch.float32),
    )


@torch.library.custom_op("fastalign::linear_logprobs_bwd", mutates_args=())
def _bwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    keep: torch.Tensor | None,
    ignore_index: int,
    inv_temperature: float,
    chunk_size: int,
    filter_block: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    compact: int,
    backend: str,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> d_hidden, d_weight, d_bias; a gradient that is not needed comes back as an empty (0,)."""
    _, bwd = _kernels(resolve_backend(backend, hidden.device, _OP))
    out = bwd(
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
        compact,
        order,
    )
    return tuple(g if g is not None else _empty(hidden, 0) for g in out)


@_bwd_op.register_fake
def _(hidden, weight, bias, labels, lse, entropy, grad_logp, grad_entropy, keep, *args):
    need_hidden, need_weight, need_bias = args[4:7]  # after ignore_index .. filter_block
    return (
        torch.empty_like(hidden) if need_hidden else _empty(hidden, 0),
        torch.empty_like(weight) if need_weight else _empty(hidden, 0),
        torch.empty_like(bias) if need_bias else _empty(hidden, 0),
    )


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------
def _pick(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def _spread(x: torch.Tensor, rows: torch.Tensor | None, n: int) -> torch.Tensor:
    """Rows of x back at their positions in an n-row tensor of zeros (ignored rows)."""
    if rows is None:
        return x
    return x.new_zeros((n, *x.shape[1:])).index_copy_(0, rows, x)


class LinearLogprobsFunction(torch.autograd.Function):
    """rows: the valid rows (labels != ignore_index) or None for all; only they are computed. The
    forward's block log-masses (filter_budget > 0) are saved for the backward's keep mask."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        labels,
        rows,
        ignore_index,
        inv_temperature,
        return_entropy,
        chunk_size,
        filter_budget,
        backend,
    ):
        n = hidden.shape[0]
        h_c, y_c = _pick(hidden, rows), _pick(labels, rows)
        block = FILTER_BLOCK if filter_budget > 0 else 0
        order = _vocab_order(h_c, weight, bias) if block and backend in _ORDERED_BACKENDS else None
        y_pos = _positions(y_c, order, ignore_index)
        logp, lse, entropy, lmass = _fwd_op(
            h_c,
            weight,
            bias,
            y_pos,
            ignore_index,
            inv_temperature,
            return_entropy,
            chunk_size,
            block,
            backend,
            order,
        )
        saved_entropy = entropy if return_entropy else None
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse, saved_entropy, lmass, order)
        ctx.ignore_index, ctx.inv_temperature, ctx.backend = ignore_index, inv_temperature, backend
        ctx.return_entropy, ctx.chunk_size, ctx.filter_budget = return_entropy, chunk_size, filter_budget
        logp = _spread(logp, rows, n)
        return (logp, _spread(entropy, rows, n)) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, labels, rows, lse, entropy, lmass, order = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = bool(need_b and bias is not None)
        h_c, y_c = _pick(hidden, rows), _positions(_pick(labels, rows), order, ctx.ignore_index)
        g_c = _pick(grad_logp, rows).contiguous()
        gh_c = _pick(grad_entropy, rows).contiguous() if ctx.return_entropy else None
        keep, compact, block = None, 0, 0
        if ctx.filter_budget > 0 and lmass.shape[1] > 0:
            block = FILTER_BLOCK
            keep = grad_filter_keep(lmass, lse, y_c, ctx.ignore_index, ctx.filter_budget, block)
            compact = _CPP_COMPACT  # the other backends ignore it
            valid_c = y_c != ctx.ignore_index
            _record_stats(keep, lmass, lse, valid_c, ctx.filter_budget, compact, rows, hidden.shape[0], order)
        d_h, d_w, d_b = _bwd_op(
            h_c,
            weight,
            bias,
            y_c,
            lse,
            entropy,
            g_c,
            gh_c,
            keep,
            ctx.ignore_index,
            ctx.inv_temperature,
            ctx.chunk_size,
            block,
            need_h,
            need_w,
            need_b,
            compact,
            ctx.backend,
            order,
        )
        d_hidden = _spread(d_h, rows, hidden.shape[0]) if need_h else None
        return (
            d_hidden,
            d_w if need_w else None,
            d_b if need_b else None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def _valid_rows(labels: torch.Tensor, vocab: int, ignore_index: int, validate: bool) -> torch.Tensor | None:
    """The label check and the rows to compute, with one host sync at most: validate=True reads
    (bad labels, valid rows) in one transfer and gathers the valid rows with nonzero_static (no
    second sync); validate=False reads nothing and computes every row (ignored rows give 0).
    Under torch.compile the check is a device-side assert and every row is computed."""
    if not validate:
        return None
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"{_OP}: a label outside [0, {vocab}) and not ignore_index")
        return None
    n_bad, n_valid = torch.stack([bad.sum(), valid.sum()]).tolist()
    if n_bad:
        check_labels(labels, vocab, ignore_index, _OP)  # raises, naming the first bad position
    if n_valid == labels.numel():
        return None
    return torch.nonzero_static(valid, size=n_valid).squeeze(1)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype when autocast is on for this device type (the op then runs in it, as
    torch.amp.custom_fwd(cast_inputs=...) would), else None."""
    kind = device.type
    if kind not in ("cuda", "cpu", "xpu") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    grad_filter: float | str | None = "auto",
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs(hidden @ weight.T + bias, labels, ...)` without ever holding the logits.

    Args:
        hidden: (..., H) last hidden states, float32 / bfloat16 / float16 (float64 accepted).
        weight: (V, H) lm_head weight, same dtype and device as `hidden`.
        labels: (...) integer ids aligned with `hidden`; `ignore_index` rows give 0.0.
        bias: optional (V,) lm_head bias.
        temperature: divides the logits before the softmax.
        return_entropy: also return the per-position entropy.
        chunk_size: vocabulary columns per tile (torch / cpp backends; the Triton kernels pick
            their own tiles). None: a ~32 MiB fp32 tile.
        grad_filter: per-row probability budget δ the backward may drop (blocks of 256 vocabulary
            columns of least mass, never the label's): "auto" = 2⁻⁸ for bfloat16, 2⁻¹¹ for
            float16, exact for float32 / float64; None or 0 = exact; a float in [0, 1) = that δ.
            The logit gradient of a row changes by at most δ·(|g| + |h|·(ln(V/δ) + H))/T in L1
            (g, h: the row's incoming gradients of logp and entropy). Values are never filtered.
        validate: check the labels (a ValueError naming the first bad one) and skip ignored rows,
            with one host sync; False: no check, no sync, ignored rows computed (and 0).
        backend: "auto" | "triton" | "cpp" | "torch".

    Returns:
        logp (...) float32 (float64 for float64 inputs), ≤ 0; with `return_entropy`, the tuple
        (logp, entropy). Differentiable w.r.t. hidden, weight and bias.

    Under autocast (CUDA or CPU) float32 inputs run in the autocast dtype, as a matmul would.
    """
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{_OP}: {name} must be a float32/bfloat16/float16/float64 tensor")
    require_tensor(labels, "labels", _OP)
    if bias is not None:
        require_tensor(bias, "bias", _OP)
    if weight.dim() != 2 or hidden.dim() < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{_OP}: weight must be (V, H) with H = hidden.shape[-1]; got weight {tuple(weight.shape)}, "
            f"hidden {tuple(hidden.shape)}"
        )
    cast = _autocast_dtype(hidden.device)
    if cast is not None:
        hidden, weight = hidden.to(cast), weight.to(cast)  # no-ops for tensors already in it
        bias = bias.to(cast) if bias is not None else None
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"{_OP}: hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, {weight.device}) "
            "must share dtype and device"
        )
    vocab = weight.shape[0]
    if bias is not None and (
        bias.shape != (vocab,) or bias.dtype != weight.dtype or bias.device != weight.device
    ):
        raise ValueError(f"{_OP}: bias must be ({vocab},) with the weight's dtype and device")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{_OP}: labels shape {tuple(labels.shape)} must equal hidden shape without the hidden dim "
            f"{tuple(hidden.shape[:-1])}"
        )
    if labels.device != hidden.device:
        raise ValueError(f"{_OP}: labels on {labels.device} but hidden on {hidden.device}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{_OP}: labels must be an integer tensor, got {labels.dtype}")
    if vocab < 1:
        raise ValueError(f"{_OP}: vocabulary size must be ≥ 1")
    t = check_temperature(temperature, _OP)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"{_OP}: chunk_size must be ≥ 1 or None, got {chunk_size!r}")
    budget = resolve_grad_filter(grad_filter, hidden.dtype)
    if torch.compiler.is_compiling():  # resolved inside the custom ops, at run time (no tracing of
        concrete = check_backend_name(backend, _OP)  # the C++ build / cache look-up)
    else:
        concrete = resolve_backend(backend, hidden.device, _OP)

    batch_shape = labels.shape
    hidden2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # (N, H)
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()  # (N,)
    n = hidden2d.shape[0]
    if n == 0:
        zero = hidden.sum() * 0 + weight.sum() * 0
        empty = hidden.new_zeros(batch_shape, dtype=out_dtype(hidden.dtype)) + zero
        return (empty, empty.clone()) if return_entropy else empty
    rows = _valid_rows(labels1d, vocab, int(ignore_index), validate)
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(n, vocab)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias)
    )
    if not needs_grad:
        budget = 0.0  # the filter acts in the backward only: no block masses to keep
    if budget > 0:  # blocks never straddle two tiles
        chunk = -(-chunk // FILTER_BLOCK) * FILTER_BLOCK
    chunk = min(chunk, vocab)
    guard = torch.autocast(hidden.device.type, enabled=False) if cast is not None else nullcontext()
    with guard:
        out = LinearLogprobsFunction.apply(
            hidden2d,
            weight.contiguous(),
            bias.contiguous() if bias is not None else None,
            labels1d,
            rows,
            int(ignore_index),
            1.0 / t,
            bool(return_entropy),
            chunk,
            budget,
            concrete,
        )
    if return_entropy:
        return out[0].view(batch_shape), out[1].view(batch_shape)
    return out.view(batch_shape)


class LinearLogprobs(torch.nn.Module):
    """`linear_logprobs` as a module: forward(hidden, weight, labels, bias=None). The lm_head
    weight is an argument, not a parameter of this module, so the model keeps owning it (tied
    embeddings, ZeRO-3 sharding)."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        return_entropy: bool = False,
        chunk_size: int | None = None,
        grad_filter: float | str | None = "auto",
        validate: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.ignore_index, self.temperature, self.return_entropy = ignore_index, temperature, return_entropy
        self.chunk_size, self.backend = chunk_size, backend
        self.grad_filter, self.validate = grad_filter, validate

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return linear_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            return_entropy=self.return_entropy,
            chunk_size=self.chunk_size,
            grad_filter=self.grad_filter,
            validate=self.validate,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, temperature={self.temperature}, "
            f"grad_filter={self.grad_filter!r}, backend={self.backend!r}"
        )
