"""Preference-optimisation losses on sequence log-probs: DPO (and variants), SimPO, ORPO, KTO and the
Bradley-Terry reward-model loss. Plain PyTorch, per-example outputs (reduce them yourself), no state.

Inputs are per-sequence log-probs (B,): summed over the completion tokens for DPO / KTO
(`sequence_logps(token_logps, mask)`), averaged for SimPO / ORPO (`average=True`). Every returned
reward is detached (a logged metric, never a gradient path).

The DPO variants follow the loss code of TRL >= 1 (`DPOTrainer._compute_loss`, checked against TRL
1.16.0 in tests/losses/test_trl_parity.py, which runs whenever trl is installed), with
`f_divergence_type="reverse_kl"`, no `ld_alpha`, no WPO weighting, `discopop_tau = 0.05`. TRL >= 1
changed three definitions of the TRL 0.x `DPOTrainer.dpo_loss`; the TRL 0.x forms stay available
under their own names because each has a use:

- `cdpo`: TRL 0.x `sigmoid` with `label_smoothing` (conservative DPO; fastalign's soft labels). TRL
  >= 1's `sigmoid` ignores label_smoothing; here `sigmoid` with ε > 0 still computes cDPO but
  warns (FutureWarning) until the trainer and config say `cdpo` themselves.
- `ipo_sum`: TRL 0.x `ipo`, (u − 1/(2β))² on the log-probs as given. TRL >= 1's `ipo` divides each
  log-ratio by its completion length: pass `chosen_lengths` / `rejected_lengths` with summed
  log-probs, or average log-probs (policy and reference) without lengths.
- `bco_pair_shift`: TRL 0.x `bco_pair`, with the reward shift δ (TRL's `RunningMoments` starts at
  count 1e-24, so on its first step δ is exactly the batch mean; this stateless function always
  uses the detached batch mean). TRL >= 1's `bco_pair` has no δ.

`exo_pair` keeps TRL 0.x's ε = 1e-3 substitute for label_smoothing = 0 (TRL >= 1 refuses 0).

Infinite log-probs (a completion the policy or the reference gives probability 0) have defined
limits: every loss type returns the limit of its formula, NaN-free, with the limit of its gradient
(see `dpo_loss`); only a ∞ − ∞ with no limit raises.

Size (~600 lines, over the project's ~400): the 14 DPO loss types share one input check, one
limit analysis at ±inf and one parity contract with TRL; SimPO / ORPO / KTO / Bradley-Terry reuse
those checks. Split by loss family if a second contract (another trainer's definitions) arrives.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from fastalign.losses.kl import _check_choice, _check_float, _check_inputs, _check_number

DPO_LOSS_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    # the TRL 0.x definitions that TRL >= 1 changed (see the module docstring)
    "cdpo",
    "ipo_sum",
    "bco_pair_shift",
)
DISCOPOP_TAU = 0.05  # TRL DPOConfig.discopop_tau default
EXO_DEFAULT_EPSILON = 1e-3  # TRL 0.x's substitute for label_smoothing == 0 in exo_pair
# loss types that read label_smoothing (sigmoid only through its cDPO fallback)
SMOOTHED_LOSS_TYPES = ("cdpo", "robust", "exo_pair")
# loss types that depend on the margin u = ρ_c − ρ_r (undefined when both log-ratios are +∞ or both
# −∞); the others use ρ_c and ρ_r separately and have a limit for any pair of infinite log-ratios
_MARGIN_LOSS_TYPES = frozenset(
    ("sigmoid", "cdpo", "robust", "hinge", "ipo", "ipo_sum", "exo_pair", "apo_down", "discopop")
)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence log-prob from per-token log-probs.

        sum:     s_b = Σ_t m_bt · logp_bt
        average: s_b = Σ_t m_bt · logp_bt / max(1, Σ_t m_bt)

    Args:
        token_logps: (B, T) per-token log-probs (e.g. from `fastalign.ops.token_logprobs`).
        mask: (B, T) bool, or numeric with values in {0, 1}; 1 marks completion tokens. Masked
            positions contribute nothing, even if they hold -inf.
        average: mean over the masked tokens instead of the sum (rows with no tokens give 0).

    Returns:
        (B,) in token_logps' dtype, differentiable w.r.t. token_logps.

    Raises:
        ValueError: token_logps not 2-D, mask shape differs, mask values outside {0, 1}, NaN in
            token_logps.
    """
    op = "sequence_logps"
    _check_float(op, "token_logps", token_logps)
    if token_logps.dim() != 2:
        raise ValueError(f"{op}: token_logps must be (B, T), got shape {tuple(token_logps.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.shape != token_logps.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{op}: mask shape {shape} must equal token_logps shape {tuple(token_logps.shape)}")
    if mask.dtype != torch.bool:
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError(f"{op}: mask must be bool or hold only 0 / 1 values")
        mask = mask != 0
    total = torch.where(mask, token_logps, 0.0).sum(-1)
    if not average:
        return total
    return total / mask.sum(-1).clamp_min(1).to(total.dtype)


# ---------------------------------------------------------------------------------------------
# DPO family
# ---------------------------------------------------------------------------------------------
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | torch.Tensor = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss (Rafailov et al. 2023, "Direct Preference Optimization") and variants,
    matching TRL >= 1's DPOTrainer (see the module docstring for the version and the three TRL 0.x
    forms kept under their own names).

    With ρ_c = π_c − ref_c, ρ_r = π_r − ref_r (log-ratios), u = ρ_c − ρ_r, z = βu, ε =
    label_smoothing, σ the sigmoid:

        sigmoid    −log σ(z)                                    (DPO; TRL >= 1)
        robust     (−(1−ε)·log σ(z) + ε·log σ(−z)) / (1−2ε)     (rDPO, Chowdhury et al. 2024)
        hinge      relu(1 − z)                                  (SLiC, Zhao et al. 2023)
        ipo        (ρ_c/n_c − ρ_r/n_r − 1/(2β))²                (IPO, Azar et al. 2023, eq. 17, on
                   per-token log-ratios as TRL >= 1; n = chosen_lengths / rejected_lengths, or 1
                   when they are not given: then pass average log-probs)
        exo_pair   σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε)
                   with ε = label_smoothing or 1e-3 when it is 0 (EXO, Ji et al. 2024, eq. 16)
        nca_pair   −log σ(βρ_c) − ½ log σ(−βρ_c) − ½ log σ(−βρ_r)       (NCA, Chen et al. 2024)
        bco_pair   −log σ(βρ_c) − log σ(−βρ_r)                   (BCO, Jung et al. 2024; TRL >= 1)
        sppo_hard  (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²            (SPPO hard labels, Wu et al. 2024)
        apo_zero   (1 − σ(βρ_c)) + σ(βρ_r)                      (APO-zero, D'Oosterlinck et al. 2024)
        apo_down   σ(βρ_c) + (1 − σ(z))                         (APO-down)
        discopop   m = σ(z/τ), τ = 0.05:  −log σ(z)·(1−m) + exp(−z)·m   (DiscoPOP, Chris Lu et al.
                   2024, eq. 5)
        cdpo       −(1−ε)·log σ(z) − ε·log σ(−z)   (conservative DPO, Mitchell 2023; TRL 0.x sigmoid)
        ipo_sum    (u − 1/(2β))² on the log-probs as given        (TRL 0.x ipo; lengths unused)
        bco_pair_shift  −log σ(βρ_c − δ) − log σ(−(βρ_r − δ)), δ = mean(β·[ρ_c; ρ_r]) over the
                   finite values of the batch (0 if none), detached     (TRL 0.x bco_pair)

    `sigmoid` with label_smoothing > 0 computes `cdpo` and warns (FutureWarning): TRL >= 1 ignores
    label_smoothing for sigmoid, so name the smoothed loss `cdpo`.

    Infinite log-probs: each loss is the limit of its formula as the log-ratios diverge, never
    NaN, and its gradient is the limit of the gradient. In terms of z (or βρ_c, βρ_r for the types
    that do not use u):

        sigmoid, hinge, discopop   z → +∞: 0, slope 0;      z → −∞: +∞, slope −1 (a finite push)
        cdpo (0 < ε < 1)           z → +∞: +∞, slope ε;     z → −∞: +∞, slope −(1−ε)
        robust (0 < ε < 0.5)       z → +∞: −∞, slope −ε/(1−2ε); z → −∞: +∞, slope −(1−ε)/(1−2ε)
        exo_pair                   z → +∞: −log(1−ε);       z → −∞: −log ε; slope 0
        apo_down, apo_zero         the σ terms tend to 0 or 1, slope 0
        nca_pair, bco_pair(_shift) each −log σ(±x) term tends to 0 (slope 0) or +∞ (slope ∓1)
        ipo, ipo_sum, sppo_hard    +∞ with an infinite gradient (a quadratic has no finite limit)

    (ε = 0 makes cdpo / robust equal sigmoid, ε = 1 mirrors cdpo.) A log-ratio that is ∞ − ∞ (the
    policy and the reference both give a completion log-prob ±inf), or a margin u that is ∞ − ∞
    (both log-ratios +∞, or both −∞) for a type that uses u, has no limit: ValueError naming the
    pairs. Rewards may then be ±inf.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy sequence log-probs (differentiable).
        ref_chosen_logps, ref_rejected_logps: (B,) reference sequence log-probs, same shape.
        beta: β > 0 (τ, the regularisation, for ipo / ipo_sum).
        loss_type: one of `DPO_LOSS_TYPES`.
        label_smoothing: ε, used by cdpo, robust and exo_pair (ε ∈ [0, 0.5)) and ignored by the
            others (sigmoid: see above). A (B,) tensor gives each pair its own ε (soft labels:
            ε = 1 − P(chosen preferred), e.g. from `fastalign cai label`); cdpo takes ε ∈ [0, 1]
            per pair, robust ε ∈ [0, 0.5).
        chosen_lengths, rejected_lengths: (B,) completion token counts behind summed log-probs
            (both or neither; counts < 1 count as 1, as in TRL). Used by ipo only. Leave them None
            when the log-probs are already per-token averages, or the log-ratios are divided twice.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,): per-pair losses (differentiable)
        and the detached implicit rewards β·ρ_c, β·ρ_r (of the log-probs as given). Reduce
        `losses` yourself (TRL: mean).

    Raises:
        ValueError: unknown loss_type (the message lists the valid ones), shape mismatch, NaN
            inputs, beta ≤ 0, label_smoothing or lengths out of range, ∞ − ∞ (above).
        TypeError: non-floating inputs, lengths that are not tensors.
    """
    op = "dpo_loss"
    _check_choice(op, "loss_type", loss_type, DPO_LOSS_TYPES)
    _check_inputs(
        op,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    beta = _check_number(op, "beta", beta, positive=True)
    if isinstance(label_smoothing, torch.Tensor):
        eps = _per_pair_smoothing(op, label_smoothing, policy_chosen_logps, loss_type)
        smoothed = bool((eps != 0).any()) if eps.numel() else False
    else:
        eps = _check_number(op, "label_smoothing", label_smoothing, low=0.0, high=0.5)
        smoothed = eps != 0
    if loss_type == "sigmoid" and smoothed:
        # TRL 0.x applied ε here (cDPO); TRL >= 1 silently drops it. Dropping a setting the user
        # made would be worse than either, so keep cDPO and say which name means it.
        warnings.warn(
            f"{op}: loss_type='sigmoid' with label_smoothing > 0 computes conservative DPO (TRL 0.x's "
            "sigmoid); TRL >= 1 ignores label_smoothing for sigmoid. Write loss_type='cdpo' for this "
            "loss, or label_smoothing=0 for TRL >= 1's sigmoid; sigmoid will refuse label_smoothing > 0 "
            "once the trainer and config use 'cdpo'.",
            FutureWarning,
            stacklevel=2,
        )
        loss_type = "cdpo"
    lengths = _check_lengths(op, chosen_lengths, rejected_lengths, policy_chosen_logps)

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # ρ_c
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # ρ_r
    margin = None  # what the margin types feed through β (ipo: the per-token margin, no β)
    if loss_type == "ipo" and lengths is not None:
        margin = chosen_logratios / lengths[0] - rejected_logratios / lengths[1]
    elif loss_type in _MARGIN_LOSS_TYPES:
        margin = chosen_logratios - rejected_logratios  # u
    finite = _check_limits(op, loss_type, chosen_logratios, rejected_logratios, margin)
    a, b = beta * chosen_logratios, beta * rejected_logratios
    z = beta * margin if margin is not None else None

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(z)
    elif loss_type == "cdpo":
        losses = _weighted(1 - eps, -F.logsigmoid(z)) + _weighted(eps, -F.logsigmoid(-z))
    elif loss_type == "robust":
        losses = (_weighted(1 - eps, -F.logsigmoid(z)) - _weighted(eps, -F.logsigmoid(-z))) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    elif loss_type in ("ipo", "ipo_sum"):
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        e = eps if eps > 0 else EXO_DEFAULT_EPSILON
        zs = z if finite else torch.where(torch.isinf(z), 0.0, z)  # σ·log σ at ∓∞ is 0·∞ in autograd
        losses = torch.sigmoid(zs) * (F.logsigmoid(zs) - math.log1p(-e)) + torch.sigmoid(-zs) * (
            F.logsigmoid(-zs) - math.log(e)
        )
        if not finite:  # all the mass on one side: KL([1, 0] ‖ [1−ε, ε]) or KL([0, 1] ‖ ·), slope 0
            limit = torch.where(z > 0, z.new_tensor(-math.log1p(-e)), z.new_tensor(-math.log(e)))
            losses = torch.where(torch.isinf(z), limit, losses)
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(a) - F.logsigmoid(-b)
    elif loss_type == "bco_pair_shift":
        rewards = torch.cat((a.reshape(-1), b.reshape(-1))).detach()
        if not finite:  # δ is a batch baseline: one infinite reward must not make every pair infinite
            rewards = rewards[torch.isfinite(rewards)]
        delta = rewards.mean() if rewards.numel() else a.new_zeros(())
        losses = -F.logsigmoid(a - delta) - F.logsigmoid(-(b - delta))
    elif loss_type == "sppo_hard":
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(a)) + torch.sigmoid(b)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(a) + (1 - torch.sigmoid(z))
    else:  # discopop
        zs = z if finite else torch.where(torch.isinf(z), 0.0, z)
        mod = torch.sigmoid(zs / DISCOPOP_TAU)
        # exp(−z)·m as exp(log σ(z/τ) − z): the direct product is inf · 0 = NaN once exp(−z)
        # overflows (z < −88 in float32) although the product itself tends to 0
        losses = -F.logsigmoid(zs) * (1 - mod) + torch.exp(F.logsigmoid(zs / DISCOPOP_TAU) - zs)
        if not finite:  # as z → ±∞ the loss is −log σ(z) to first order: value and slope
            losses = torch.where(torch.isinf(z), -F.logsigmoid(z), losses)

    chosen_rewards = a.detach()
    rejected_rewards = b.detach()
    return losses, chosen_rewards, rejected_rewards


def _weighted(w: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w·x with 0·(±∞) = 0: a term whose weight is 0 is absent (ε = 0 in cDPO / rDPO), however
    large the log σ it would multiply. x's entries here are −log σ(·) ≥ 0, possibly +∞."""
    if isinstance(w, torch.Tensor):
        return torch.where(w == 0, 0.0, w * x)
    return torch.zeros_like(x) if w == 0 else w * x


def _check_limits(
    op: str,
    loss_type: str,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    margin: torch.Tensor | None,
) -> bool:
    """True when the log-ratios (and the margin the loss type uses) are all finite, the common
    case, decided with one host sync. Otherwise raise where the loss has no limit (∞ − ∞) and
    return False so the caller takes the limit-safe path."""
    parts = [chosen_logratios, rejected_logratios] + ([margin] if margin is not None else [])
    if bool(torch.isfinite(torch.stack([p.reshape(-1) for p in parts])).all()):
        return True
    for name, ratio, what in (
        ("chosen", chosen_logratios, "policy_chosen_logps − ref_chosen_logps"),
        ("rejected", rejected_logratios, "policy_rejected_logps − ref_rejected_logps"),
    ):
        bad = torch.isnan(ratio).reshape(-1)
        if bad.any():
            raise ValueError(
                f"{op}: the {name} log-ratio {what} is ∞ − ∞ at pair(s) {_first(bad)}: the policy "
                "and the reference both give that completion log-prob ±inf, and no loss has a limit there"
            )
    if margin is not None:
        bad = torch.isnan(margin).reshape(-1)
        if bad.any():
            raise ValueError(
                f"{op}: the margin u = ρ_c − ρ_r is ∞ − ∞ at pair(s) {_first(bad)} (both log-ratios +inf, "
                f"or both −inf); loss_type {loss_type!r} depends on u, whose limit depends on how the two "
                "diverge (nca_pair, bco_pair, bco_pair_shift, sppo_hard and apo_zero have a limit there)"
            )
    return False


def _first(mask: torch.Tensor, k: int = 8) -> list[int]:
    return mask.nonzero().reshape(-1)[:k].tolist()


def _check_lengths(
    op: str, chosen_lengths: torch.Tensor | None, rejected_lengths: torch.Tensor | None, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Completion token counts as like's dtype, clamped to ≥ 1 (TRL: an empty completion counts as
    one token), or None when neither is given."""
    if chosen_lengths is None and rejected_lengths is None:
        return None
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError(f"{op}: pass both chosen_lengths and rejected_lengths, or neither")
    out = []
    for name, n in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if not isinstance(n, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor of token counts, got {type(n).__name__}")
        if n.shape != like.shape:
            raise ValueError(f"{op}: {name} shape {tuple(n.shape)} must equal {tuple(like.shape)}")
        if n.device != like.device:
            raise ValueError(f"{op}: {name} on {n.device} but the log-probs on {like.device}")
        n = n.detach().to(like.dtype)
        if n.numel() and not bool((torch.isfinite(n) & (n >= 0)).all()):
            raise ValueError(f"{op}: {name} must hold finite token counts ≥ 0, got {n.tolist()}")
        out.append(n.clamp_min(1))
    return out[0], out[1]


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO loss (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward"), as TRL's CPOTrainer with loss_type="simpo":

        γ = gamma_beta_ratio · β
        z = β (chosen_avg − rejected_avg) − γ
        loss = −(1−ε)·log σ(z) − ε·log σ(−z)           ε = label_smoothing

    TRL's CPOConfig parameterises the margin directly: its `simpo_gamma` is γ, i.e.
    `simpo_gamma = gamma_beta_ratio · beta` gives identical losses.

    Args:
        chosen_avg_logps, rejected_avg_logps: (B,) length-normalised (average per token) policy
            log-probs, e.g. `sequence_logps(..., average=True)`.
        beta: β > 0 (paper default 2.0).
        gamma_beta_ratio: γ/β (paper default 0.5); any finite value.
        label_smoothing: ε ∈ [0, 0.5).

    Infinite log-probs give the limits, as in `dpo_loss`'s sigmoid / cdpo: z → +∞: 0 (ε = 0) or
    +∞, z → −∞: +∞, with the finite limit slopes −(1−ε)·σ(−z) + ε·σ(z); ∞ − ∞ raises.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards β·avg logps, detached.

    Raises:
        ValueError: shape mismatch, NaN inputs, beta ≤ 0, label_smoothing outside [0, 0.5),
            both log-probs of a pair ±inf with the same sign.
    """
    op = "simpo_loss"
    _check_inputs(op, chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    beta = _check_number(op, "beta", beta, positive=True)
    ratio = _check_number(op, "gamma_beta_ratio", gamma_beta_ratio)
    eps = _check_number(op, "label_smoothing", label_smoothing, low=0.0, high=0.5)
    z = beta * (chosen_avg_logps - rejected_avg_logps) - ratio * beta
    if not bool(torch.isfinite(z).all()):  # one host sync; -inf log-probs have limits, ∞ − ∞ has none
        bad = torch.isnan(z).reshape(-1)
        if bad.any():
            raise ValueError(
                f"{op}: chosen_avg_logps − rejected_avg_logps is ∞ − ∞ at pair(s) {_first(bad)}: "
                "both completions have log-prob ±inf, and the loss has no limit there"
            )
    losses = _weighted(1 - eps, -F.logsigmoid(z)) + _weighted(eps, -F.logsigmoid(-z))
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012): log(−expm1(x)) near 0,
    log1p(−exp(x)) far below."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    lam: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ORPO loss (Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization
    without Reference Model"):

        log odds(y) = a − log(1 − exp(a))          a = average log-prob of y
        log_odds_ratio = (a_c − a_r) − (log(1 − exp(a_c)) − log(1 − exp(a_r)))
        loss = chosen_nll − λ · log σ(log_odds_ratio)

    TRL's ORPOTrainer.odds_ratio_loss returns λ·log σ(log_odds_ratio) and its caller computes
    `policy_nll_loss − mean(that)`; with a per-pair NLL this function returns the same per-pair
    combination (its mean equals TRL's loss when `chosen_nll` is TRL's NLL for every pair).

    Numerics: log(1 − exp(a)) is evaluated as log1mexp (exact near a → 0⁻ and far below), and the
    average log-probs are clamped to ≤ −eps(dtype) first, so a = 0 (p = 1) gives a large finite
    log-odds and finite gradients instead of inf / NaN.

    Args:
        chosen_avg_logps, rejected_avg_logps: (B,) average per-token log-probs (≤ 0).
        chosen_nll: (B,) per-pair SFT negative log-likelihood of the chosen response (TRL: the
            mean token cross-entropy). Pass zeros to get the odds-ratio term alone.
        lam: λ ≥ 0 (TRL's ORPOConfig.beta, default 0.1).

    Returns:
        (losses, log_odds_ratio), each (B,); log_odds_ratio is detached (a metric).

    Raises:
        ValueError: shape mismatch, NaN inputs, lam < 0.
    """
    op = "orpo_loss"
    _check_inputs(
        op, chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps, chosen_nll=chosen_nll
    )
    lam = _check_number(op, "lam", lam, low=0.0)
    hi = -torch.finfo(chosen_avg_logps.dtype).eps
    a = chosen_avg_logps.clamp(max=hi)
    b = rejected_avg_logps.clamp(max=hi)
    log_odds = (a - b) - (_log1mexp(a) - _log1mexp(b))
    losses = chosen_nll - lam * F.logsigmoid(log_odds)
    return losses, log_odds.detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_ref_point: float | torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO loss (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
    Optimization"), as TRL's KTOTrainer.kto_loss but kept in input order:

        ρ = policy_logps − ref_logps,   z0 = max(0, kl_ref_point) (detached)
        desirable:    w_d · (1 − σ(β (ρ − z0)))
        undesirable:  w_u · (1 − σ(β (z0 − ρ)))
        rewards = β ρ (detached)

    Args:
        policy_logps, ref_logps: (B,) sequence log-probs of each (unpaired) completion.
        desirable: (B,) bool (or 0/1) label, True for desirable completions.
        kl_ref_point: z0, the reference point: a float or a tensor broadcastable to (B,). TRL
            passes the batch mean of (policy − ref) log-probs on mismatched prompt/completion
            pairs, gathered over processes; it is detached and clamped at 0 here, as in TRL.
        beta: β > 0.
        desirable_weight, undesirable_weight: w_d, w_u ≥ 0.

    Returns:
        (losses, rewards), each (B,); rewards detached.

    Raises:
        ValueError: shape mismatch, NaN inputs (including kl_ref_point), bad weights / beta.
    """
    op = "kto_loss"
    _check_inputs(op, policy_logps=policy_logps, ref_logps=ref_logps)
    beta = _check_number(op, "beta", beta, positive=True)
    w_d = _check_number(op, "desirable_weight", desirable_weight, low=0.0)
    w_u = _check_number(op, "undesirable_weight", undesirable_weight, low=0.0)
    if not isinstance(desirable, torch.Tensor) or desirable.shape != policy_logps.shape:
        shape = tuple(desirable.shape) if isinstance(desirable, torch.Tensor) else type(desirable).__name__
        want = tuple(policy_logps.shape)
        raise ValueError(f"{op}: desirable shape {shape} must equal policy_logps shape {want}")
    if desirable.dtype != torch.bool:
        if desirable.is_floating_point() and torch.isnan(desirable).any():
            raise ValueError(f"{op}: desirable contains NaN")
        if ((desirable != 0) & (desirable != 1)).any():
            raise ValueError(f"{op}: desirable must be bool or hold only 0 / 1 values")
        desirable = desirable != 0
    if isinstance(kl_ref_point, torch.Tensor):
        _check_float(op, "kl_ref_point", kl_ref_point)
        z0 = kl_ref_point.detach().to(policy_logps.device)
    else:
        z0 = torch.tensor(_check_number(op, "kl_ref_point", kl_ref_point), device=policy_logps.device)
    z0 = z0.clamp(min=0)
    logratios = policy_logps - ref_logps
    chosen = w_d * (1 - torch.sigmoid(beta * (logratios - z0)))
    rejected = w_u * (1 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable, chosen, rejected)
    return losses, beta * logratios.detach()


def _per_pair_smoothing(op: str, eps: torch.Tensor, like: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Validate a (B,) per-pair ε: cdpo (soft labels; sigmoid falls back to it) is the
    cross-entropy against the soft label, so any ε ∈ [0, 1]; robust needs 1 − 2ε > 0; the others
    have no per-pair form."""
    if loss_type not in ("cdpo", "sigmoid", "robust"):
        raise ValueError(
            f"{op}: per-pair label_smoothing (a tensor) works with cdpo (and sigmoid, which then "
            f"computes cdpo) and robust, not {loss_type!r}"
        )
    _check_float(op, "label_smoothing", eps)
    if eps.shape != like.shape:
        raise ValueError(f"{op}: label_smoothing shape {tuple(eps.shape)} must equal {tuple(like.shape)}")
    high_ok = (eps < 0.5) if loss_type == "robust" else (eps <= 1)
    if eps.numel() and not bool(((eps >= 0) & high_ok).all()):
        bound = "0.5)" if loss_type == "robust" else "1]"
        raise ValueError(
            f"{op}: label_smoothing values must be in [0, {bound} for {loss_type}, got {eps.tolist()}"
        )
    return eps.detach().to(like.dtype)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair Bradley-Terry reward-model loss (as TRL's RewardTrainer; margin from Llama 2,
    Touvron et al. 2023):

        loss = −log σ(c − r − margin) + center_coef · (c + r)²

    With a soft `target` t = P(chosen preferred) per pair (AI feedback, `fastalign cai label`) the
    first term is the cross-entropy −t·log σ(d) − (1 − t)·log σ(−d), d = c − r − margin.

    The second term is TRL's `center_rewards_coefficient · mean((c + r)²)` regulariser (Eisenstein
    et al. 2023) taken per pair, so the mean of these losses equals TRL's loss.

    Args:
        chosen_rewards, rejected_rewards: (B,) (or any equal shape) scalar rewards c, r.
        margin: None (0), a float, or a tensor broadcastable to the rewards' shape.
        center_coef: ≥ 0; 0 disables the regulariser.
        target: None (hard labels, t = 1) or a tensor of t ∈ [0, 1] with the rewards' shape.

    Returns:
        (B,) per-pair losses, differentiable w.r.t. both rewards.

    Raises:
        ValueError: shape mismatch, NaN inputs (including margin), center_coef < 0.
    """
    op = "bradley_terry_loss"
    _check_inputs(op, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    coef = _check_number(op, "center_coef", center_coef, low=0.0)
    diff = chosen_rewards - rejected_rewards
    if isinstance(margin, torch.Tensor):
        _check_float(op, "margin", margin)
        try:
            torch.broadcast_shapes(margin.shape, diff.shape)
        except RuntimeError as e:
            raise ValueError(
                f"{op}: margin shape {tuple(margin.shape)} does not broadcast to {tuple(diff.shape)}"
            ) from e
        diff = diff - margin
    elif margin is not None:
        diff = diff - _check_number(op, "margin", margin)
    if target is None:
        losses = -F.logsigmoid(diff)
    else:
        _check_float(op, "target", target)
        if target.shape != diff.shape:
            raise ValueError(f"{op}: target shape {tuple(target.shape)} must equal {tuple(diff.shape)}")
        if target.numel() and not bool(((target >= 0) & (target <= 1)).all()):
            raise ValueError(f"{op}: target values must be in [0, 1], got {target.tolist()}")
        t = target.detach().to(diff.dtype)
        losses = -t * F.logsigmoid(diff) - (1 - t) * F.logsigmoid(-diff)
    if coef:
        losses = losses + coef * (chosen_rewards + rejected_rewards) ** 2
    return losses
