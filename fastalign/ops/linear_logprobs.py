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
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastalign.ops._backend import (
    FLOAT_DTYPES,
    check_labels,
    check_temperature,
    out_dtype,
    require_tensor,
    resolve_backend,
)
from fastalign.ops.token_logprobs import _p_log_p, split_lse, token_logprobs_reference

_OP = "linear_logprobs"
_TILE_BYTES = 32 * 2**20  # default fp32 (N, chunk) tile size for the torch / cpp backends


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
def _logits_tile(hidden, weight, bias, v0, v1, inv_temperature, acc):
    z = hidden @ weight[v0:v1].T  # (N, Vc) in the input dtype, like eager
    if bias is not None:
        z = z + bias[v0:v1]
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    n, vocab = hidden.shape[0], weight.shape[0]
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
        z = _logits_tile(hidden, weight, bias, v0, v1, inv_temperature, acc)  # (N, Vc)
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
    return logp, lse, entropy


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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    vocab = weight.shape[0]
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
        logp = _logits_tile(hidden, weight, bias, v0, v1, inv_temperature, acc).sub_(lse_hi).sub_(lse_lo)
        p = logp.exp()
        dz = -g * p
        if gh is not None:
            dz -= gh * _p_log_p(p, logp + h_plus)
        hit = valid & (labels >= v0) & (labels < v1)
        dz.scatter_add_(
            1, torch.where(hit, labels - v0, 0).unsqueeze(1), torch.where(hit.unsqueeze(1), g, 0.0)
        )
        dz.mul_(inv_temperature)  # d/d(raw logits)
        if d_hidden is not None:
            d_hidden.addmm_(dz, weight[v0:v1].to(acc))
        if d_weight is not None:
            d_weight[v0:v1] = dz.T @ hidden_acc
        if d_bias is not None:
            d_bias[v0:v1] = dz.sum(0)
    return (d_hidden.to(hidden.dtype) if d_hidden is not None else None), d_weight, d_bias


# ---------------------------------------------------------------------------------------------
# dispatch + autograd
# ---------------------------------------------------------------------------------------------
def _kernels(backend: str) -> tuple[Callable, Callable]:
    if backend == "torch":
        return linear_logprobs_forward_torch, linear_logprobs_backward_torch
    if backend == "cpp":
        from fastalign.ops import _cpp

        ext = _cpp.load()
        return ext.linear_logprobs_fwd, ext.linear_logprobs_bwd
    from fastalign.kernels import linear_logprobs as k

    return k.linear_logprobs_forward, k.linear_logprobs_backward


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, ignore_index, inv_temperature, return_entropy, chunk_size, backend
    ):
        fwd, _ = _kernels(backend)
        logp, lse, entropy = fwd(
            hidden, weight, bias, labels, ignore_index, inv_temperature, return_entropy, chunk_size
        )
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.ignore_index, ctx.inv_temperature, ctx.backend = ignore_index, inv_temperature, backend
        ctx.return_entropy, ctx.chunk_size = return_entropy, chunk_size
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        _, bwd = _kernels(ctx.backend)
        d_hidden, d_weight, d_bias = bwd(
            hidden,
            weight,
            bias,
            labels,
            lse,
            entropy if ctx.return_entropy else None,
            grad_logp.contiguous(),
            grad_entropy.contiguous() if ctx.return_entropy else None,
            ctx.ignore_index,
            ctx.inv_temperature,
            ctx.chunk_size,
            need_h,
            need_w,
            bool(need_b and bias is not None),
        )
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None


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
        backend: "auto" | "triton" | "cpp" | "torch".

    Returns:
        logp (...) float32 (float64 for float64 inputs), ≤ 0; with `return_entropy`, the tuple
        (logp, entropy). Differentiable w.r.t. hidden, weight and bias.
    """
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{_OP}: {name} must be a float32/bfloat16/float16/float64 tensor")
    if weight.dim() != 2 or hidden.dim() < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{_OP}: weight must be (V, H) with H = hidden.shape[-1]; got weight {tuple(weight.shape)}, "
            f"hidden {tuple(hidden.shape)}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"{_OP}: hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, {weight.device}) "
            "must share dtype and device"
        )
    require_tensor(labels, "labels", _OP)
    if bias is not None:
        require_tensor(bias, "bias", _OP)
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
    if vocab < 1:
        raise ValueError(f"{_OP}: vocabulary size must be ≥ 1")
    t = check_temperature(temperature, _OP)
    check_labels(labels, vocab, ignore_index, _OP)
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"{_OP}: chunk_size must be ≥ 1 or None, got {chunk_size!r}")
    concrete = resolve_backend(backend, hidden.device, _OP)

    batch_shape = labels.shape
    hidden2d = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # (N, H)
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()  # (N,)
    n = hidden2d.shape[0]
    if n == 0:
        zero = hidden.sum() * 0 + weight.sum() * 0
        empty = hidden.new_zeros(batch_shape, dtype=out_dtype(hidden.dtype)) + zero
        return (empty, empty.clone()) if return_entropy else empty
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(n, vocab)
    chunk = min(chunk, vocab)
    out = LinearLogprobsFunction.apply(
        hidden2d,
        weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        labels1d,
        int(ignore_index),
        1.0 / t,
        bool(return_entropy),
        chunk,
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
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.ignore_index, self.temperature, self.return_entropy = ignore_index, temperature, return_entropy
        self.chunk_size, self.backend = chunk_size, backend

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
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, temperature={self.temperature}, backend={self.backend!r}"
