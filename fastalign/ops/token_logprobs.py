"""Per-token log-probs (and entropy) from logits: one online log-sum-exp pass per row.

    z      = logits / temperature                       (..., V)
    logp   = z[label] - logsumexp(z)                    (...)   0 where label == ignore_index
    H      = -sum_v p_v log p_v,  p = softmax(z)        (...)   0 where label == ignore_index

Backward, with g = dL/dlogp and h = dL/dH (both zero on ignored rows):

    dL/dlogits_v = (g * (1[v == label] - p_v) - h * p_v * (log p_v + H)) / temperature

Only per-row statistics (log-sum-exp, entropy) are saved; the backward re-reads the logits,
so no (N, V) log_softmax or probability tensor is ever materialised.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastalign.ops import _cpp
from fastalign.ops._backend import (
    FLOAT_DTYPES,
    check_labels,
    check_temperature,
    out_dtype,
    require_tensor,
    resolve_backend,
)

_OP = "token_logprobs"
# Rows per chunk in the torch backend keep its fp32 temporaries near this many bytes.
_TORCH_CHUNK_BYTES = 32 * 2**20


def token_logprobs_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain eager PyTorch (full log_softmax), in the input's dtype. The ground truth for tests
    when called on float64 inputs; the eager baseline in benchmarks otherwise."""
    z = logits / temperature
    logp_all = torch.log_softmax(z, dim=-1)  # (..., V)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, 0.0).to(out_dtype(logits.dtype))
    if not return_entropy:
        return logp
    entropy = -_p_log_p(logp_all.exp(), logp_all).sum(-1)
    entropy = torch.where(valid, entropy, 0.0).to(out_dtype(logits.dtype))
    return logp, entropy


# ---------------------------------------------------------------------------------------------
# torch backend: chunked over rows, fp32 math, same signature as the cpp / triton launchers.
# ---------------------------------------------------------------------------------------------
def split_lse(lse: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 log-sum-exp saved by every forward, as (hi, lo) columns in `acc` with
    hi + lo = lse to ~2^-48. The backwards form z - lse as (z - hi) - lo: z - hi is exact for
    the logits that matter (Sterbenz), so large logits lose no precision to a rounded lse."""
    hi = lse.to(acc)
    lo = (lse - hi.double()).to(acc)
    return hi.unsqueeze(1), lo.unsqueeze(1)


def _p_log_p(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p * x with 0 where p == 0, so -inf logits (masked vocabulary) give 0, not NaN."""
    return torch.where(p > 0, p * x, 0.0)


def _row_chunk(n: int, v: int) -> int:
    return max(1, min(n, _TORCH_CHUNK_BYTES // (4 * max(v, 1))))


def token_logprobs_forward_torch(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, inv_temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    n, v = logits.shape
    acc = out_dtype(logits.dtype)
    logp = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=torch.float64, device=logits.device)  # see split_lse
    entropy = torch.empty(n, dtype=acc, device=logits.device) if with_entropy else None
    step = _row_chunk(n, v)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        z = logits[r0:r1].to(acc) * inv_temperature  # (n_c, V)
        lab = labels[r0:r1]
        valid = lab != ignore_index
        m = z.amax(1).clamp_min(torch.finfo(acc).min)  # finite even for an all -inf row
        z.sub_(m.unsqueeze(1))  # z - max: exact where it matters, as in eager log_softmax
        log_s = z.exp().sum(1).log()
        z_lab = z.gather(1, torch.where(valid, lab, 0).unsqueeze(1)).squeeze(1)
        lse[r0:r1] = m.double() + log_s.double()
        logp[r0:r1] = torch.where(valid, z_lab - log_s, 0.0)
        if entropy is not None:
            z.sub_(log_s.unsqueeze(1))  # log p, in place
            h = -_p_log_p(z.exp(), z).sum(1)
            entropy[r0:r1] = torch.where(valid, h, 0.0)
    return logp, lse, entropy


def token_logprobs_backward_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    ignore_index: int,
    inv_temperature: float,
) -> torch.Tensor:
    n, v = logits.shape
    acc = out_dtype(logits.dtype)
    grad_logits = torch.empty_like(logits)
    step = _row_chunk(n, v)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        lab = labels[r0:r1]
        valid = lab != ignore_index
        g = torch.where(valid, grad_logp[r0:r1].to(acc), 0.0).unsqueeze(1)  # (n_c, 1)
        hi, lo = split_lse(lse[r0:r1], acc)
        logp_all = (logits[r0:r1].to(acc) * inv_temperature).sub_(hi).sub_(lo)  # (n_c, V)
        p = logp_all.exp()
        dz = -g * p
        if grad_entropy is not None:
            gh = torch.where(valid, grad_entropy[r0:r1].to(acc), 0.0).unsqueeze(1)
            dz -= gh * _p_log_p(p, logp_all + entropy[r0:r1].unsqueeze(1))
        dz.scatter_add_(1, torch.where(valid, lab, 0).unsqueeze(1), g)
        grad_logits[r0:r1] = dz * inv_temperature
    return grad_logits


# ---------------------------------------------------------------------------------------------
# dispatch + autograd
# ---------------------------------------------------------------------------------------------
def _kernels(backend: str) -> tuple[Callable, Callable]:
    if backend == "torch":
        return token_logprobs_forward_torch, token_logprobs_backward_torch
    if backend == "cpp":
        ext = _cpp.load()
        return ext.token_logprobs_fwd, ext.token_logprobs_bwd
    from fastalign.kernels import token_logprobs as k  # triton is imported only for the triton backend

    return k.token_logprobs_forward, k.token_logprobs_backward


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, inv_temperature, return_entropy, backend):
        fwd, _ = _kernels(backend)
        logp, lse, entropy = fwd(logits, labels, ignore_index, inv_temperature, return_entropy)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.ignore_index, ctx.inv_temperature, ctx.backend = ignore_index, inv_temperature, backend
        ctx.return_entropy = return_entropy
        return (logp, entropy) if return_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, labels, lse, entropy = ctx.saved_tensors
        _, bwd = _kernels(ctx.backend)
        grad_logits = bwd(
            logits,
            labels,
            lse,
            entropy if ctx.return_entropy else None,
            grad_logp.contiguous(),
            grad_entropy.contiguous() if ctx.return_entropy else None,
            ctx.ignore_index,
            ctx.inv_temperature,
        )
        return grad_logits, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under softmax(logits / temperature), and optionally the
    entropy of that distribution, without materialising a log_softmax tensor.

    Args:
        logits: (..., V) float32 / bfloat16 / float16 (float64 accepted, e.g. for gradcheck).
        labels: (...) integer class ids, already aligned with `logits` (the caller shifts).
            Positions equal to `ignore_index` give exactly 0.0 and no gradient.
        temperature: divides the logits before the softmax (sampling temperature).
        return_entropy: also return the per-position entropy (0 where ignored).
        backend: "auto" | "triton" | "cpp" | "torch".

    Returns:
        logp (...) float32 (float64 for float64 logits), each ≤ 0; with `return_entropy`,
        the tuple (logp, entropy). Differentiable w.r.t. `logits` through both outputs.

    Raises:
        ValueError: a label outside [0, V) that is not `ignore_index`, shape mismatch, bad
            temperature or backend.
    """
    if not isinstance(logits, torch.Tensor) or logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_OP}: logits must be a float32/bfloat16/float16/float64 tensor")
    require_tensor(labels, "labels", _OP)
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{_OP}: labels shape {tuple(labels.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    if labels.device != logits.device:
        raise ValueError(f"{_OP}: labels on {labels.device} but logits on {logits.device}")
    vocab = logits.shape[-1]
    if vocab < 1:
        raise ValueError(f"{_OP}: vocabulary size must be ≥ 1")
    t = check_temperature(temperature, _OP)
    check_labels(labels, vocab, ignore_index, _OP)
    concrete = resolve_backend(backend, logits.device, _OP)

    batch_shape = labels.shape
    logits2d = logits.reshape(-1, vocab).contiguous()  # (N, V)
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()  # (N,)
    if logits2d.shape[0] == 0:
        empty = logits.new_zeros(batch_shape, dtype=out_dtype(logits.dtype)) + 0 * logits.sum()
        return (empty, empty.clone()) if return_entropy else empty
    out = TokenLogprobsFunction.apply(
        logits2d, labels1d, int(ignore_index), 1.0 / t, bool(return_entropy), concrete
    )
    if return_entropy:
        return out[0].view(batch_shape), out[1].view(batch_shape)
    return out.view(batch_shape)


class TokenLogprobs(torch.nn.Module):
    """`token_logprobs` as a module (settings fixed at construction): forward(logits, labels)."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        return_entropy: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.ignore_index, self.temperature = ignore_index, temperature
        self.return_entropy, self.backend = return_entropy, backend

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return token_logprobs(
            logits,
            labels,
            ignore_index=self.ignore_index,
            temperature=self.temperature,
            return_entropy=self.return_entropy,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, temperature={self.temperature}, backend={self.backend!r}"
