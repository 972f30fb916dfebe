"""Preference-optimisation losses on sequence log-probs: DPO (and variants), SimPO, ORPO, KTO and the
Bradley-Terry reward-model loss. Plain PyTorch, per-example outputs (reduce them yourself), no state.

Inputs are per-sequence log-probs (B,): summed over the completion tokens for DPO / KTO
(`sequence_logps(token_logps, mask)`), averaged for SimPO / ORPO (`average=True`). Every returned
reward is detached (a logged metric, never a gradient path).

The DPO variants follow TRL's `DPOTrainer.dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps,
ref_rejected_logps, loss_type, model_output)` of the TRL 0.x releases that have all eleven loss
types (apo_* and discopop arrived around v0.11 / v0.12; the method lasts until the trainer rewrite):
`label_smoothing` for sigmoid / robust / exo_pair, `RunningMoments` δ for bco_pair, `DPOConfig.
discopop_tau = 0.05`, with `f_divergence_type="reverse_kl"` and `reference_free=False`. Compared
number for number against TRL 0.19.1 (all eleven types, plus SimPO/CPO, ORPO and KTO: identical
per-example losses and rewards) and TRL 1.16.0 in tests/losses/test_trl_parity.py, which runs
whenever trl is installed. The later rewrite (`_compute_loss`, per-sequence
"scores") differs: sigmoid drops label_smoothing, bco_pair drops δ, ipo divides by the completion
length, exo_pair uses ε as given. Differences from the 0.x method, all because this is stateless:

- bco_pair: TRL subtracts δ = running mean of the batch reward mean(β·[chosen_logratios,
  rejected_logratios]). Its `RunningMoments` starts at count 1e-24, so on the first step δ is
  exactly that batch mean; here δ is always the (detached) batch mean, i.e. TRL's first step.
- exo_pair: TRL replaces label_smoothing = 0 by 1e-3 (mutating its config); here ε =
  label_smoothing if > 0 else 1e-3, per call.
- ipo: the un-normalised TRL v0.x form (logits − 1/(2β))²; pass average log-probs to get the
  length-normalised variant used by later TRL releases.
"""

from __future__ import annotations

import math

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
)
DISCOPOP_TAU = 0.05  # TRL DPOConfig.discopop_tau default
EXO_DEFAULT_EPSILON = 1e-3  # TRL's substitute for label_smoothing == 0 in exo_pair


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss (Rafailov et al. 2023, "Direct Preference Optimization") and variants,
    matching TRL's `DPOTrainer.dpo_loss` (see the module docstring for the version and the three
    stateless differences).

    With ρ_c = π_c − ref_c, ρ_r = π_r − ref_r (log-ratios), u = ρ_c − ρ_r, ε = label_smoothing,
    σ the sigmoid:

        sigmoid    −(1−ε)·log σ(βu) − ε·log σ(−βu)            (ε > 0: conservative DPO, cDPO)
        robust     (−(1−ε)·log σ(βu) + ε·log σ(−βu)) / (1−2ε)   (rDPO, Chowdhury et al. 2024)
        hinge      relu(1 − βu)                                (SLiC, Zhao et al. 2023)
        ipo        (u − 1/(2β))²                               (IPO, Azar et al. 2023, eq. 17)
        exo_pair   σ(βu)(log σ(βu) − log(1−ε)) + σ(−βu)(log σ(−βu) − log ε)
                   with ε = label_smoothing or 1e-3 when it is 0 (EXO, Ji et al. 2024, eq. 16)
        nca_pair   −log σ(βρ_c) − ½ log σ(−βρ_c) − ½ log σ(−βρ_r)       (NCA, Chen et al. 2024)
        bco_pair   −log σ(βρ_c − δ) − log σ(−(βρ_r − δ)),
                   δ = mean(β·[ρ_c; ρ_r]) over the batch, detached (BCO, Jung et al. 2024)
        sppo_hard  (ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²            (SPPO hard labels, Wu et al. 2024)
        apo_zero   (1 − σ(βρ_c)) + σ(βρ_r)                      (APO-zero, D'Oosterlinck et al. 2024)
        apo_down   σ(βρ_c) + (1 − σ(βu))                        (APO-down)
        discopop   z = βu, m = σ(z/τ), τ = 0.05:  −log σ(z)·(1−m) + exp(−z)·m   (DiscoPOP, Chris Lu
                   et al. 2024, eq. 5)

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy sequence log-probs (differentiable).
        ref_chosen_logps, ref_rejected_logps: (B,) reference sequence log-probs, same shape.
        beta: β > 0 (τ, the regularisation, for ipo).
        loss_type: one of `DPO_LOSS_TYPES`.
        label_smoothing: ε ∈ [0, 0.5); used by sigmoid, robust and exo_pair, ignored otherwise.
            A (B,) tensor gives each pair its own ε (soft labels: ε = 1 − P(chosen preferred),
            e.g. from `fastalign cai label`); sigmoid takes ε ∈ [0, 1], robust ε ∈ [0, 0.5).

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,): per-pair losses (differentiable)
        and the detached implicit rewards β·ρ_c, β·ρ_r. Reduce `losses` yourself (TRL: mean).

    Raises:
        ValueError: unknown loss_type (the message lists the valid ones), shape mismatch, NaN
            inputs, beta ≤ 0, label_smoothing outside [0, 0.5).
        TypeError: non-floating inputs.
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
    else:
        eps = _check_number(op, "label_smoothing", label_smoothing, low=0.0, high=0.5)

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # ρ_c
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # ρ_r
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # u
    z = beta * logits

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
    elif loss_type == "robust":
        losses = (-F.logsigmoid(z) * (1 - eps) + F.logsigmoid(-z) * eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        e = eps if eps > 0 else EXO_DEFAULT_EPSILON
        losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-e)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(e)
        )
    elif loss_type == "nca_pair":
        c, r = beta * chosen_logratios, beta * rejected_logratios
        losses = -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    elif loss_type == "bco_pair":
        c, r = beta * chosen_logratios, beta * rejected_logratios
        delta = torch.cat((c, r)).mean().detach() if c.numel() else c.new_zeros(())
        losses = -F.logsigmoid(c - delta) - F.logsigmoid(-(r - delta))
    elif loss_type == "sppo_hard":
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(z))
    else:  # discopop
        mod = torch.sigmoid(z / DISCOPOP_TAU)
        losses = -F.logsigmoid(z) * (1 - mod) + torch.exp(-z) * mod

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


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

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards β·avg logps, detached.

    Raises:
        ValueError: shape mismatch, NaN inputs, beta ≤ 0, label_smoothing outside [0, 0.5).
    """
    op = "simpo_loss"
    _check_inputs(op, chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    beta = _check_number(op, "beta", beta, positive=True)
    ratio = _check_number(op, "gamma_beta_ratio", gamma_beta_ratio)
    eps = _check_number(op, "label_smoothing", label_smoothing, low=0.0, high=0.5)
    z = beta * (chosen_avg_logps - rejected_avg_logps) - ratio * beta
    losses = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
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
    """Validate a (B,) per-pair ε: sigmoid (cDPO with soft labels) is the cross-entropy against
    the soft label, so any ε ∈ [0, 1]; robust needs 1 − 2ε > 0; the others have no per-pair form."""
    if loss_type not in ("sigmoid", "robust"):
        raise ValueError(
            f"{op}: per-pair label_smoothing (a tensor) works with sigmoid and robust, not {loss_type!r}"
        )
    _check_float(op, "label_smoothing", eps)
    if eps.shape != like.shape:
        raise ValueError(f"{op}: label_smoothing shape {tuple(eps.shape)} must equal {tuple(like.shape)}")
    high_ok = (eps <= 1) if loss_type == "sigmoid" else (eps < 0.5)
    if eps.numel() and not bool(((eps >= 0) & high_ok).all()):
        bound = "1]" if loss_type == "sigmoid" else "0.5)"
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
