"""Per-token KL estimators between a policy and a reference model, from sampled log-probs.

With tokens sampled from the policy π and log r = log π_ref(x) − log π(x) (`ref_logps − logps`):

    k1  = −log r                     unbiased, high variance, can be negative
    k2  = ½ (log r)²                 biased, low variance, ≥ 0
    k3  = (exp(log r) − 1) − log r   unbiased, low variance, ≥ 0 (the GRPO / "k3" penalty)
    abs = |log r|                    ≥ 0

Each is an estimate of KL(π ‖ π_ref) when averaged over tokens sampled from π.
Reference: J. Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.

Also holds the small input checks shared by `fastalign.losses` (floating tensors, equal shapes,
no NaN), each raising an error that names the offending argument.
"""

from __future__ import annotations

import math

import torch

KL_KINDS = ("k1", "k2", "k3", "abs")


# ---------------------------------------------------------------------------------------------
# input checks shared by the losses
# ---------------------------------------------------------------------------------------------
def _check_float(op: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {type(x).__name__}")
    if torch.isnan(x).any():
        raise ValueError(f"{op}: {name} contains NaN")
    return x


def _check_inputs(op: str, **tensors: torch.Tensor) -> tuple[int, ...]:
    """Every tensor floating point, NaN-free and of one shape (that of the first); returns it."""
    items = list(tensors.items())
    first_name, first = items[0]
    _check_float(op, first_name, first)
    for name, x in items[1:]:
        _check_float(op, name, x)
        if x.shape != first.shape:
            raise ValueError(
                f"{op}: {name} shape {tuple(x.shape)} must equal {first_name} shape {tuple(first.shape)}"
            )
        if x.device != first.device:
            raise ValueError(f"{op}: {name} on {x.device} but {first_name} on {first.device}")
    return tuple(first.shape)


def _check_choice(op: str, name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{op}: unknown {name} {value!r}; valid: {', '.join(valid)}")


def _check_number(op: str, name: str, value: float, *, positive: bool = False, low=None, high=None) -> float:
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if positive and v <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value}")
    if low is not None and v < low:
        raise ValueError(f"{op}: {name} must be ≥ {low}, got {value}")
    if high is not None and v >= high:
        raise ValueError(f"{op}: {name} must be < {high}, got {value}")
    return v


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------
def kl_estimate(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kind: str = "k1",
    clamp: float | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the sampled tokens' log-probs (Schulman's k1/k2/k3).

        log r = ref_logps − logps
        k1 = −log r,   k2 = ½ (log r)²,   k3 = (exp(log r) − 1) − log r,   abs = |log r|

    Args:
        logps: (...) policy log-probs of the sampled tokens (differentiable).
        ref_logps: (...) reference log-probs of the same tokens, same shape (usually no grad;
            gradients flow through both if both require them).
        kind: "k1" | "k2" | "k3" | "abs".
        clamp: if given (c > 0), the result is clamped to [−c, c] (k2, k3 and abs are ≥ 0, so
            effectively [0, c]); clamped positions get zero gradient. None: no clamping.

    In k3 the exponent is capped at log(max float) − 1 so that exp never overflows: the value
    stays finite (and gradients NaN-free under `clamp`) for any finite input; below the cap it is
    exact.

    Returns:
        (...) per-token estimate, in the promoted dtype of the inputs. Mask / sum it yourself
        (e.g. with `sequence_logps`).

    Raises:
        ValueError: unknown kind (the message lists the valid ones), shape mismatch, NaN in
            `logps` / `ref_logps`, clamp ≤ 0 or not finite.
        TypeError: non-floating inputs.
    """
    op = "kl_estimate"
    _check_choice(op, "kind", kind, KL_KINDS)
    _check_inputs(op, logps=logps, ref_logps=ref_logps)
    if clamp is not None:
        clamp = _check_number(op, "clamp", clamp, positive=True)
    log_r = ref_logps - logps
    if kind == "k1":
        out = -log_r
    elif kind == "k2":
        out = 0.5 * log_r.square()
    elif kind == "k3":
        cap = math.log(torch.finfo(log_r.dtype).max) - 1.0
        out = torch.expm1(log_r.clamp(max=cap)) - log_r
    else:
        out = log_r.abs()
    if clamp is not None:
        out = out.clamp(-clamp, clamp)
    return out
