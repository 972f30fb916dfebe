"""Alignment losses straight from the last hidden states and the lm_head weight, never holding logits.

Each module runs `fastalign.ops.linear_logprobs` (per-token fp32 log-probs, 0 at ignored
positions, vocabulary tiles of `chunk_size` columns, no (N, V) tensor) and then the *plain* losses
of this package on the result — nothing is re-implemented, so a fused loss equals

    logits = hidden @ weight.T + bias  →  token_logprobs_reference  →  the same plain loss

up to floating-point rounding (tested in fp32 and bf16 against that unfused path).

    FusedLinearPreferenceLoss   DPO / IPO / SimPO / ORPO on (chosen; rejected) stacked rows
    FusedLinearKTOLoss          KTO on unpaired completions, KL reference point estimated or given
    FusedLinearPolicyLoss       clipped PPO surrogate + k1/k2/k3/abs KL penalty + entropy bonus

Conventions: labels are already aligned with the hidden states (the caller shifts:
`hidden[:, :-1]`, `labels = input_ids[:, 1:]`) and hold `ignore_index` on prompt and padding
tokens. The lm_head weight (and bias) are forward arguments, not parameters of these modules, so
the model keeps owning them (tied embeddings, sharding). Reference-model quantities are computed
under `torch.no_grad()` (one fused forward, no backward). The op (and with it any compiled
backend) is imported on the first forward, so `import fastalign.losses` stays torch-only.

Size (~590 lines, over the project's ~400): three modules with the same shape and the same
input checks (each is forward + the loss from token log-probs, shared with the unfused path);
separate files would repeat the checks three times.
"""

from __future__ import annotations

import torch

from fastalign.losses.kl import KL_KINDS, _check_number, kl_estimate
from fastalign.losses.policy import AGGS, _masked_mean, aggregate, ppo_policy_loss
from fastalign.losses.preference import (
    DPO_LOSS_TYPES,
    dpo_loss,
    kto_loss,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)

PREFERENCE_METHODS = ("dpo", "ipo", "simpo", "orpo")
_METHOD_KWARGS = {"dpo": (), "ipo": (), "simpo": ("gamma_beta_ratio",), "orpo": ("lam",)}
_AVERAGE_DEFAULT = {"dpo": False, "ipo": True, "simpo": True, "orpo": True}


def _check_grad_filter(op: str, grad_filter):
    """'auto', None or a float in [0, 1): the `grad_filter` of fastalign.ops.linear_logprobs."""
    ok = grad_filter is None or grad_filter == "auto"
    if not ok and isinstance(grad_filter, (int, float)) and not isinstance(grad_filter, bool):
        ok = 0.0 <= float(grad_filter) < 1.0
    if not ok:
        raise ValueError(f"{op}: grad_filter must be 'auto', None or a float in [0, 1), got {grad_filter!r}")
    return grad_filter


def _token_logps(hidden, weight, labels, bias, ignore_index, chunk_size, **kw):
    from fastalign.ops import linear_logprobs  # lazy: keeps `import fastalign.losses` light

    return linear_logprobs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, chunk_size=chunk_size, **kw
    )


def _check_3d(op: str, hidden, labels, name: str = "hidden") -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"{op}: {name} must be (B, T, H), got {shape}")
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:2]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{op}: labels for {name} must be {tuple(hidden.shape[:2])}, got {shape}")


def _check_seq(op: str, name: str, x, n: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.shape != (n,):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: {name} must be a ({n},) tensor, got {shape}")
    return x


# ---------------------------------------------------------------------------------------------
# DPO / IPO / SimPO / ORPO
# ---------------------------------------------------------------------------------------------
class FusedLinearPreferenceLoss(torch.nn.Module):
    """Pairwise preference loss from hidden states: DPO, IPO, SimPO or ORPO without logits.

    Rows 0..B-1 of `hidden` / `labels` are the chosen completions, rows B..2B-1 the rejected ones
    (pair b = rows b and B + b). With t the per-token log-probs of `linear_logprobs` and m the
    mask `labels != ignore_index`:

        π_b   = Σ_t m·t            (average_log_prob=False)   or   Σ_t m·t / Σ_t m   (True)
        dpo   dpo_loss(π_c, π_r, ref_c, ref_r, beta, loss_type, label_smoothing)
              (Rafailov et al. 2023; loss_type: any of DPO_LOSS_TYPES)
        ipo   dpo with loss_type="ipo" on averaged log-probs: ((π_c − ref_c) − (π_r − ref_r)
              − 1/(2β))² (Azar et al. 2023, length-normalised as in later TRL)
        simpo simpo_loss(π_c, π_r, beta, gamma_beta_ratio, label_smoothing)   (Meng et al. 2024)
        orpo  orpo_loss(π_c, π_r, nll_c, lam) with nll_c = −(mean token log-prob of the chosen
              row)   (Hong et al. 2024; lam defaults to beta, TRL's ORPOConfig.beta)

        loss = mean over the B pairs

    The reference log-probs (dpo / ipo only) are either given, `ref_chosen_logps` /
    `ref_rejected_logps` (B,) with the same averaging, or computed under no_grad from the
    reference model's hidden states `ref_hidden` (2B, T, H) and lm_head `ref_weight` (V, H) with
    the same fused op, labels and averaging. SimPO / ORPO are reference-free.

    Args:
        method: "dpo" | "ipo" | "simpo" | "orpo".
        beta: β > 0 (for orpo it only scales the logged rewards unless `lam` is not given).
        loss_type: DPO variant (method="dpo" only; "ipo" forces "ipo").
        label_smoothing: ε for dpo (sigmoid / robust / exo_pair) and simpo.
        average_log_prob: None → method default (False for dpo except loss_type ipo, True for ipo /
            simpo / orpo).
        ignore_index: label of prompt / padding positions.
        chunk_size: vocabulary columns per tile of the fused op (None: ~32 MiB tiles).
        grad_filter: the fused op's gradient filter ("auto": on for bf16 / fp16, exact in fp32;
            None: exact; a float: that per-row probability budget; see docs/ops.md).
        **method_kwargs: `gamma_beta_ratio` (simpo), `lam` (orpo).

    forward(hidden, weight, labels, *, bias=None, ref_chosen_logps=None, ref_rejected_logps=None,
    ref_hidden=None, ref_weight=None) -> (loss, metrics): loss is 0-d; metrics (all detached)
    holds chosen_rewards, rejected_rewards, chosen_logps, rejected_logps (B,), accuracy (mean of
    chosen_rewards > rejected_rewards), margin (mean of chosen_rewards − rejected_rewards), plus
    log_odds_ratio (B,) and nll (0-d) for orpo.

    Example::

        loss_fn = FusedLinearPreferenceLoss("dpo", beta=0.1)
        h = policy.model(input_ids).last_hidden_state[:, :-1]           # (2B, T-1, H)
        with torch.no_grad():
            rh = ref.model(input_ids).last_hidden_state[:, :-1]
        loss, m = loss_fn(h, policy.lm_head.weight, labels, ref_hidden=rh, ref_weight=ref.lm_head.weight)
    """

    def __init__(
        self,
        method: str = "dpo",
        *,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        average_log_prob: bool | None = None,
        ignore_index: int = -100,
        chunk_size: int | None = None,
        grad_filter: float | str | None = "auto",
        **method_kwargs,
    ) -> None:
        super().__init__()
        op = type(self).__name__
        if method not in PREFERENCE_METHODS:
            raise ValueError(f"{op}: method must be one of {PREFERENCE_METHODS}, got {method!r}")
        unknown = sorted(set(method_kwargs) - set(_METHOD_KWARGS[method]))
        if unknown:
            raise ValueError(
                f"{op}: unexpected keyword(s) {unknown} for method {method!r} "
                f"(accepted: {list(_METHOD_KWARGS[method]) or 'none'})"
            )
        if method == "ipo":
            loss_type = "ipo"
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"{op}: loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"{op}: chunk_size must be ≥ 1 or None, got {chunk_size!r}")
        self.method, self.loss_type = method, loss_type
        self.beta = _check_number(op, "beta", beta, positive=True)
        self.label_smoothing = _check_number(op, "label_smoothing", label_smoothing, low=0.0, high=0.5)
        # IPO works on per-token log-ratios (TRL >= 1): loss_type ipo under method dpo averages too,
        # unless the caller asks for sums, in which case the lengths go to dpo_loss (same loss)
        default = _AVERAGE_DEFAULT[method] or loss_type == "ipo"
        avg = default if average_log_prob is None else bool(average_log_prob)
        self.average_log_prob = avg
        self.ignore_index, self.chunk_size = int(ignore_index), chunk_size
        self.grad_filter = _check_grad_filter(op, grad_filter)
        self.method_kwargs = dict(method_kwargs)

    @property
    def needs_reference(self) -> bool:
        return self.method in ("dpo", "ipo")

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        label_smoothing: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        op = type(self).__name__
        _check_3d(op, hidden, labels)
        if hidden.shape[0] % 2:
            raise ValueError(
                f"{op}: hidden must stack B chosen then B rejected rows, got {hidden.shape[0]} rows"
            )
        b = hidden.shape[0] // 2
        given = (ref_chosen_logps is not None, ref_rejected_logps is not None)
        computed = (ref_hidden is not None, ref_weight is not None)
        if not self.needs_reference and (any(given) or any(computed)):
            raise ValueError(f"{op}: method {self.method!r} is reference-free; do not pass reference inputs")
        if self.needs_reference:
            if any(given) and any(computed):
                raise ValueError(f"{op}: pass either ref_*_logps or ref_hidden/ref_weight, not both")
            if any(given) and not all(given):
                raise ValueError(f"{op}: ref_chosen_logps and ref_rejected_logps must be given together")
            if any(computed) and not all(computed):
                raise ValueError(f"{op}: ref_hidden and ref_weight must be given together")
            if not any(given) and not any(computed):
                raise ValueError(
                    f"{op}: method {self.method!r} needs reference log-probs: pass ref_chosen_logps and "
                    "ref_rejected_logps (B,), or ref_hidden (2B, T, H) and ref_weight (V, H)"
                )

        token_logps = _token_logps(
            hidden, weight, labels, bias, self.ignore_index, self.chunk_size, grad_filter=self.grad_filter
        )
        if self.needs_reference and not all(given):
            if ref_hidden.shape != hidden.shape:
                raise ValueError(
                    f"{op}: ref_hidden shape {tuple(ref_hidden.shape)} must equal hidden shape "
                    f"{tuple(hidden.shape)}"
                )
            with torch.no_grad():
                ref_tok = _token_logps(
                    ref_hidden, ref_weight, labels, None, self.ignore_index, self.chunk_size
                )
                ref_seq = sequence_logps(ref_tok, labels != self.ignore_index, average=self.average_log_prob)
            ref_chosen_logps, ref_rejected_logps = ref_seq[:b], ref_seq[b:]
        return self.loss_from_token_logps(
            token_logps, labels, ref_chosen_logps, ref_rejected_logps, label_smoothing=label_smoothing
        )

    def loss_from_token_logps(
        self,
        token_logps: torch.Tensor,
        labels: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        *,
        label_smoothing: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The same loss from per-token log-probs (2B, T) already computed (e.g. from full logits with
        `fastalign.ops.token_logprobs`): the unfused path shares every line of the loss math.
        `label_smoothing` (B,) overrides the module's ε per pair (soft labels; dpo sigmoid/robust)."""
        op = type(self).__name__
        if label_smoothing is not None and self.method != "dpo":
            raise ValueError(f"{op}: per-pair label_smoothing works with method 'dpo', not {self.method!r}")
        eps = self.label_smoothing if label_smoothing is None else label_smoothing
        b = token_logps.shape[0] // 2
        mask = labels != self.ignore_index
        avg = self.average_log_prob
        seq = sequence_logps(token_logps, mask, average=avg)
        chosen, rejected = seq[:b], seq[b:]
        metrics: dict[str, torch.Tensor] = {}

        if self.needs_reference:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError(
                    f"{op}: method {self.method!r} needs ref_chosen_logps and ref_rejected_logps"
                )
            ref_c = _check_seq(op, "ref_chosen_logps", ref_chosen_logps, b).detach().to(seq.dtype)
            ref_r = _check_seq(op, "ref_rejected_logps", ref_rejected_logps, b).detach().to(seq.dtype)
            lengths = {}
            if self.loss_type == "ipo" and not avg:  # sums: dpo_loss divides by the lengths itself
                lengths = {"chosen_lengths": mask[:b].sum(-1), "rejected_lengths": mask[b:].sum(-1)}
            losses, c_rew, r_rew = dpo_loss(
                chosen,
                rejected,
                ref_c,
                ref_r,
                beta=self.beta,
                loss_type=self.loss_type,
                label_smoothing=eps,
                **lengths,
            )
        elif self.method == "simpo":
            losses, c_rew, r_rew = simpo_loss(
                chosen,
                rejected,
                beta=self.beta,
                gamma_beta_ratio=self.method_kwargs.get("gamma_beta_ratio", 0.5),
                label_smoothing=self.label_smoothing,
            )
        else:  # orpo
            chosen_nll = -sequence_logps(token_logps[:b], mask[:b], average=True)
            lam = self.method_kwargs.get("lam", self.beta)
            losses, log_odds = orpo_loss(chosen, rejected, chosen_nll, lam=lam)
            c_rew, r_rew = self.beta * chosen.detach(), self.beta * rejected.detach()
            metrics["log_odds_ratio"] = log_odds
            metrics["nll"] = chosen_nll.detach().mean() if b else chosen_nll.detach().sum()

        loss = losses.mean() if b else losses.sum()
        with torch.no_grad():
            metrics.update(
                chosen_rewards=c_rew.detach(),
                rejected_rewards=r_rew.detach(),
                chosen_logps=chosen.detach(),
                rejected_logps=rejected.detach(),
                accuracy=(c_rew > r_rew).to(seq.dtype).mean() if b else seq.new_zeros(()),
                margin=(c_rew - r_rew).mean() if b else seq.new_zeros(()),
            )
        return loss, metrics

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, beta={self.beta}, loss_type={self.loss_type!r}, "
            f"average_log_prob={self.average_log_prob}, chunk_size={self.chunk_size}"
        )


# ---------------------------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------------------------
class FusedLinearKTOLoss(torch.nn.Module):
    """KTO loss (Ethayarajh et al. 2024) from hidden states, as TRL's KTOTrainer, without logits.

    With π_b, ref_b the summed completion log-probs of the policy and the reference (mask
    `labels != ignore_index`), ρ = π − ref:

        z0 = max(0, mean_j(π(x_j, y'_j) − ref(x_j, y'_j)))   on mismatched (prompt, completion)
             pairs, no gradient (TRL: the `KL_*` inputs; here without the cross-process gather)
        desirable:    w_d · (1 − σ(β (ρ − z0)))
        undesirable:  w_u · (1 − σ(β (z0 − ρ)))
        loss = mean over the B examples    (`kto_loss`, which detaches and clamps z0)

    Reference log-probs: `ref_logps` (B,) given, or computed under no_grad from `ref_hidden`
    (B, T, H) and `ref_weight`. Reference point: `kl_ref_point` (float or 0-d tensor; 0.0
    disables it) or estimated from `kl_hidden` (policy) / `kl_ref_hidden` (reference) on the
    mismatched pairs, with labels `kl_labels` (B', T'), which needs `ref_weight`.

    forward(hidden, weight, labels, desirable, *, bias=None, ref_logps=None, ref_hidden=None,
    ref_weight=None, kl_ref_point=None, kl_hidden=None, kl_labels=None, kl_ref_hidden=None)
    -> (loss, metrics): metrics (detached) holds rewards, logps, ref_logps (B,), kl_ref_point
    (0-d, after the clamp), rewards_desirable / rewards_undesirable (means; 0 if none).

    Example::

        loss_fn = FusedLinearKTOLoss(beta=0.1)
        h, kl_h = body(ids)[:, :-1], body(kl_ids)[:, :-1]     # kl_ids: mismatched pairs
        with torch.no_grad():
            rh, kl_rh = ref_body(ids)[:, :-1], ref_body(kl_ids)[:, :-1]
        loss, m = loss_fn(h, W, labels, desirable, ref_hidden=rh, ref_weight=W_ref,
                          kl_hidden=kl_h, kl_labels=kl_labels, kl_ref_hidden=kl_rh)
    """

    def __init__(
        self,
        *,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        ignore_index: int = -100,
        chunk_size: int | None = None,
        grad_filter: float | str | None = "auto",
    ) -> None:
        super().__init__()
        op = type(self).__name__
        self.beta = _check_number(op, "beta", beta, positive=True)
        self.desirable_weight = _check_number(op, "desirable_weight", desirable_weight, low=0.0)
        self.undesirable_weight = _check_number(op, "undesirable_weight", undesirable_weight, low=0.0)
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"{op}: chunk_size must be ≥ 1 or None, got {chunk_size!r}")
        self.ignore_index, self.chunk_size = int(ignore_index), chunk_size
        self.grad_filter = _check_grad_filter(op, grad_filter)

    def _seq(self, hidden, weight, labels, bias=None) -> torch.Tensor:
        tok = _token_logps(
            hidden, weight, labels, bias, self.ignore_index, self.chunk_size, grad_filter=self.grad_filter
        )
        return sequence_logps(tok, labels != self.ignore_index)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        desirable: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        kl_ref_point: float | torch.Tensor | None = None,
        kl_hidden: torch.Tensor | None = None,
        kl_labels: torch.Tensor | None = None,
        kl_ref_hidden: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        op = type(self).__name__
        _check_3d(op, hidden, labels)
        b = hidden.shape[0]
        if ref_logps is not None and ref_hidden is not None:
            raise ValueError(f"{op}: pass either ref_logps or ref_hidden/ref_weight, not both")
        if ref_logps is None and ref_hidden is None:
            raise ValueError(
                f"{op}: needs reference log-probs: pass ref_logps (B,), or ref_hidden and ref_weight"
            )
        kl_given = (kl_hidden is not None, kl_labels is not None, kl_ref_hidden is not None)
        if kl_ref_point is not None and any(kl_given):
            raise ValueError(f"{op}: pass either kl_ref_point or kl_hidden/kl_labels/kl_ref_hidden, not both")
        if kl_ref_point is None and not all(kl_given):
            raise ValueError(
                f"{op}: needs the KL reference point: pass kl_ref_point (0.0 disables it), or kl_hidden, "
                "kl_labels and kl_ref_hidden (mismatched prompt/completion pairs) with ref_weight"
            )
        if (ref_hidden is not None or kl_ref_hidden is not None) and ref_weight is None:
            raise ValueError(f"{op}: ref_hidden / kl_ref_hidden need ref_weight (the reference lm_head)")

        policy = self._seq(hidden, weight, labels, bias)
        with torch.no_grad():
            if ref_logps is not None:
                ref = _check_seq(op, "ref_logps", ref_logps, b).detach().to(policy.dtype)
            else:
                if ref_hidden.shape != hidden.shape:
                    raise ValueError(
                        f"{op}: ref_hidden shape {tuple(ref_hidden.shape)} must equal {tuple(hidden.shape)}"
                    )
                ref = self._seq(ref_hidden, ref_weight, labels).to(policy.dtype)
            if kl_ref_point is None:
                _check_3d(op, kl_hidden, kl_labels, "kl_hidden")
                if kl_ref_hidden.shape != kl_hidden.shape:
                    raise ValueError(
                        f"{op}: kl_ref_hidden shape {tuple(kl_ref_hidden.shape)} must equal kl_hidden "
                        f"shape {tuple(kl_hidden.shape)}"
                    )
                kl_pol = self._seq(kl_hidden, weight, kl_labels, bias)
                kl_ref = self._seq(kl_ref_hidden, ref_weight, kl_labels)
                diff = (kl_pol - kl_ref).to(policy.dtype)
                kl_ref_point = diff.mean() if diff.numel() else diff.new_zeros(())

        losses, rewards = kto_loss(
            policy,
            ref,
            desirable,
            kl_ref_point,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        loss = losses.mean() if b else losses.sum()
        with torch.no_grad():
            d = desirable != 0
            z0 = torch.as_tensor(kl_ref_point, dtype=policy.dtype, device=policy.device).detach().clamp(min=0)
            metrics = {
                "rewards": rewards,
                "logps": policy.detach(),
                "ref_logps": ref,
                "kl_ref_point": z0,
                "rewards_desirable": _masked_mean(rewards, d),
                "rewards_undesirable": _masked_mean(rewards, ~d),
            }
        return loss, metrics

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, desirable_weight={self.desirable_weight}, "
            f"undesirable_weight={self.undesirable_weight}, chunk_size={self.chunk_size}"
        )


# ---------------------------------------------------------------------------------------------
# PPO / GRPO policy loss
# ---------------------------------------------------------------------------------------------
class FusedLinearPolicyLoss(torch.nn.Module):
    """Clipped policy-gradient loss (PPO, GRPO, DAPO, Dr. GRPO) from hidden states, no logits.

    One `linear_logprobs(..., temperature, return_entropy=entropy_coef > 0)` call gives the
    per-token log-probs t (and entropy H); with v = mask ∧ (labels ≠ ignore_index):

        loss = ppo_policy_loss(t, old_logps, A, v; clip_eps, clip_eps_high, dual_clip, agg)
               + kl_coef · agg_v(kl_estimate(t, ref_logps, kl_kind))
               − entropy_coef · agg_v(H)

    (Schulman et al. 2017 "Proximal Policy Optimization"; the k3 penalty of GRPO, Shao et al.
    2024; clip-higher of DAPO, Yu et al. 2025; agg="seq-mean-token-sum-norm" is Dr. GRPO), where
    agg_v is `fastalign.losses.policy.aggregate` with the same `agg` as the surrogate.

    forward(hidden (B, T, H), weight (V, H), labels (B, T), old_logps (B, T), advantages (B, T)
    or (B,), mask (B, T), *, bias=None, ref_logps=None (B, T)) -> (loss, stats): loss 0-d; stats
    = ppo_policy_loss's (clipfrac, approx_kl, ratio_mean, ratio_max[, dual_clipfrac]) plus
    `logps` (B, T, detached) and, when ref_logps is given, `kl` (masked mean of the estimate);
    when entropy_coef > 0, `entropy` (masked mean) and `entropy_tokens` (B, T, detached).

    Example::

        loss_fn = FusedLinearPolicyLoss(clip_eps=0.2, kl_coef=0.04, kl_kind="k3")
        h = policy.model(seqs).last_hidden_state[:, :-1]                   # (B, T-1, H)
        labels = seqs[:, 1:].masked_fill(~response_mask, -100)
        loss, stats = loss_fn(h, policy.lm_head.weight, labels, old_logps, adv, response_mask, ref_logps=ref)
        loss.backward()
    """

    def __init__(
        self,
        *,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        dual_clip: float | None = None,
        kl_coef: float = 0.0,
        kl_kind: str = "k3",
        entropy_coef: float = 0.0,
        temperature: float = 1.0,
        agg: str = "token-mean",
        ignore_index: int = -100,
        chunk_size: int | None = None,
        grad_filter: float | str | None = "auto",
    ) -> None:
        super().__init__()
        op = type(self).__name__
        if kl_kind not in KL_KINDS:
            raise ValueError(f"{op}: kl_kind must be one of {KL_KINDS}, got {kl_kind!r}")
        if agg not in AGGS:
            raise ValueError(f"{op}: agg must be one of {AGGS}, got {agg!r}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"{op}: chunk_size must be ≥ 1 or None, got {chunk_size!r}")
        self.clip_eps, self.clip_eps_high, self.dual_clip = clip_eps, clip_eps_high, dual_clip
        self.kl_coef = _check_number(op, "kl_coef", kl_coef, low=0.0)
        self.entropy_coef = _check_number(op, "entropy_coef", entropy_coef, low=0.0)
        self.temperature = _check_number(op, "temperature", temperature, positive=True)
        self.kl_kind, self.agg = kl_kind, agg
        self.ignore_index, self.chunk_size = int(ignore_index), chunk_size
        self.grad_filter = _check_grad_filter(op, grad_filter)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        old_logps: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        op = type(self).__name__
        _check_3d(op, hidden, labels)
        if self.kl_coef > 0 and ref_logps is None:
            raise ValueError(f"{op}: kl_coef = {self.kl_coef} > 0 needs ref_logps (B, T)")
        if not isinstance(mask, torch.Tensor) or mask.shape != labels.shape:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{op}: mask must be {tuple(labels.shape)}, got {shape}")
        with_entropy = self.entropy_coef > 0
        out = _token_logps(
            hidden,
            weight,
            labels,
            bias,
            self.ignore_index,
            self.chunk_size,
            temperature=self.temperature,
            return_entropy=with_entropy,
            grad_filter=self.grad_filter,
        )
        logps, entropy = out if with_entropy else (out, None)
        valid = (mask != 0) & (labels != self.ignore_index)
        loss, stats = ppo_policy_loss(
            logps,
            old_logps,
            advantages,
            valid,
            clip_eps=self.clip_eps,
            clip_eps_high=self.clip_eps_high,
            dual_clip=self.dual_clip,
            agg=self.agg,
        )
        if ref_logps is not None:
            if ref_logps.shape != logps.shape:
                raise ValueError(
                    f"{op}: ref_logps shape {tuple(ref_logps.shape)} must be {tuple(logps.shape)}"
                )
            kl = kl_estimate(logps, ref_logps.detach().to(logps.dtype), self.kl_kind)
            if self.kl_coef > 0:
                loss = loss + self.kl_coef * aggregate(kl, valid, self.agg)
            stats["kl"] = _masked_mean(kl.detach(), valid)
        if with_entropy:
            loss = loss - self.entropy_coef * aggregate(entropy, valid, self.agg)
            stats["entropy"] = _masked_mean(entropy.detach(), valid)
            stats["entropy_tokens"] = entropy.detach()
        stats["logps"] = logps.detach()
        return loss, stats

    def extra_repr(self) -> str:
        return (
            f"clip_eps={self.clip_eps}, clip_eps_high={self.clip_eps_high}, dual_clip={self.dual_clip}, "
            f"kl_coef={self.kl_coef}, kl_kind={self.kl_kind!r}, entropy_coef={self.entropy_coef}, "
            f"temperature={self.temperature}, agg={self.agg!r}"
        )


__all__ = ["PREFERENCE_METHODS", "FusedLinearKTOLoss", "FusedLinearPolicyLoss", "FusedLinearPreferenceLoss"]
