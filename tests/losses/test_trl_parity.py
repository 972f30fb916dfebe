"""Parity of `fastalign.losses` with TRL's trainers on the same random inputs.

Needs `trl` (the `bench` extra); skipped without it. The trainers are never constructed (that
needs a model, a tokenizer and a dataset): a bare instance is made with `object.__new__` and given
just the attributes the loss code reads, and the model is a stub whose forward returns the
per-token log-probs chosen by the test (TRL >= 1 computes log-probs with a fused LM head and reads
`outputs.log_probs`). The loss code that runs is TRL's own.

- DPO: TRL >= 1 computes the loss inside `DPOTrainer._compute_loss` (the trainer rewrite), which
  `dpo_loss` follows. Every loss type is compared: the batch-mean loss, the gradient w.r.t. the
  per-token log-probs, and the reward metrics. Where TRL >= 1 has no name for a fastalign loss,
  the case states TRL's equivalent: `sigmoid` with label_smoothing (TRL ignores ε), `cdpo` (TRL's
  own sigmoid and robust code combined with loss_weights), ipo on average log-probs, exo_pair's
  default ε. TRL 0.x had `DPOTrainer.dpo_loss`, whose three changed definitions fastalign keeps as
  `cdpo`, `ipo_sum` and `bco_pair_shift`; that test runs when TRL 0.x is installed.
- SimPO: `CPOTrainer.cpo_loss` with loss_type="simpo" (per example).
- ORPO: `ORPOTrainer.odds_ratio_loss` (per example).
- KTO: `KTOTrainer._compute_loss` (batch mean).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")

from fastalign.losses import DPO_LOSS_TYPES, dpo_loss, kto_loss, orpo_loss, sequence_logps, simpo_loss  # noqa: E402
from fastalign.losses.preference import DISCOPOP_TAU, EXO_DEFAULT_EPSILON  # noqa: E402

TRL_VERSION = trl.__version__
DPOTrainer = trl.DPOTrainer
# TRL 0.x: DPOTrainer.dpo_loss (fastalign's reference); TRL >= 1: the loss lives in _compute_loss.
TRL_HAS_LEGACY_DPO_LOSS = hasattr(DPOTrainer, "dpo_loss")
TRL_HAS_COMPUTE_LOSS = hasattr(DPOTrainer, "_compute_loss") and not TRL_HAS_LEGACY_DPO_LOSS

ATOL = RTOL = 1e-6
B, T = 6, 9  # pairs, sequence length (prompt + completion)


def _config_default(config_cls, name):
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            return f.default
    raise AttributeError(name)


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)


def _batch(rows: int, generator: torch.Generator):
    """Random right-padded batch: input_ids / attention_mask / completion_mask (rows, T) and
    per-token log-probs (rows, T-1) for the shifted positions, 0 outside the completion."""
    prompt = torch.randint(1, 4, (rows,), generator=generator)
    length = torch.randint(2, T - 3, (rows,), generator=generator)
    pos = torch.arange(T)
    completion_mask = ((pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])).long()
    attention_mask = (pos < (prompt + length)[:, None]).long()
    input_ids = torch.randint(0, 100, (rows, T), generator=generator)
    shift_mask = completion_mask[:, 1:].bool()
    token_logps = -torch.rand(rows, T - 1, generator=generator, dtype=torch.float64) * 3
    token_logps = torch.where(shift_mask, token_logps, 0.0)
    return input_ids, attention_mask, completion_mask, token_logps


def _stub_model(token_logps: torch.Tensor):
    """Stands in for the model's fused-LM-head forward: `log_probs` holds the given per-token
    log-probs at the completion positions (labels != -100 after the shift) and 0, with no
    gradient, elsewhere, as TRL's fused head returns for ignored labels."""

    def forward(**kwargs):
        n = token_logps.shape[0]
        valid = kwargs["labels"][:, 1:] != -100
        return SimpleNamespace(
            log_probs=torch.where(valid, token_logps, 0.0),
            entropy=torch.zeros_like(token_logps),
            mean_logits=torch.zeros_like(token_logps),
            is_top1=torch.zeros(n, token_logps.shape[1], dtype=torch.bool),
            aux_loss=None,
        )

    return forward


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------
def _dpo_trainer(loss_type: str | tuple[str, ...], label_smoothing: float, beta: float, weights=None):
    trainer = object.__new__(DPOTrainer)
    discopop_tau = _config_default(trl.DPOConfig, "discopop_tau")
    trainer.args = SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None)
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = _accelerator()
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer.loss_weights = [1.0] if weights is None else list(weights)
    trainer.f_divergence_type = "reverse_kl"
    trainer.f_alpha_divergence_coef = 1.0
    trainer.ld_alpha = None
    trainer.use_weighting = False
    trainer.precompute_ref_logps = True
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    return trainer


def _trl_dpo(loss_type, label_smoothing, beta, batch, ref_chosen, ref_rejected, weights=None):
    """TRL >= 1: the batch-mean loss, d loss / d token_logps, and the logged mean rewards."""
    input_ids, attention_mask, completion_mask, token_logps = batch
    token_logps = token_logps.clone().requires_grad_()
    trainer = _dpo_trainer(loss_type, label_smoothing, beta, weights)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = trainer._compute_loss(_stub_model(token_logps), inputs, return_outputs=False)
    loss.backward()
    metrics = trainer._metrics["train"]
    return loss.detach(), token_logps.grad, metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]


def _fastalign_dpo(loss_type, label_smoothing, beta, batch, ref_chosen, ref_rejected, inputs="summed"):
    """inputs: "summed" log-probs, "summed+lengths" (with the completion lengths), or "average"
    log-probs (policy and reference divided by the completion length)."""
    _, _, completion_mask, token_logps = batch
    token_logps = token_logps.clone().requires_grad_()
    mask = completion_mask[:, 1:]
    seq = sequence_logps(token_logps, mask)
    ref_c, ref_r = ref_chosen, ref_rejected
    n = mask.sum(-1)
    kw = {}
    if inputs == "average":  # length-normalised scores: divide policy and reference by the completion length
        seq = seq / n.clamp_min(1).to(seq.dtype)
        ref_c, ref_r = ref_c / n[:B].clamp_min(1), ref_r / n[B:].clamp_min(1)
    elif inputs == "summed+lengths":
        kw = {"chosen_lengths": n[:B], "rejected_lengths": n[B:]}
    losses, cr, rr = dpo_loss(
        seq[:B], seq[B:], ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, **kw
    )
    loss = losses.mean()
    loss.backward()
    return loss.detach(), token_logps.grad, cr.mean().item(), rr.mean().item()


def _cdpo_weights(eps):
    """cDPO = (1−ε)·A + ε·B with A = −log σ(z), B = −log σ(−z); TRL >= 1 has A (sigmoid) and
    robust_ε = ((1−ε)·A − ε·B)/(1−2ε), so cDPO = 2(1−ε)·sigmoid − (1−2ε)·robust_ε."""
    return (2 * (1 - eps), -(1 - 2 * eps))


# (id, fastalign loss_type, label_smoothing, fastalign inputs, TRL loss_type(s), TRL label_smoothing,
#  TRL loss_weights)
DPO_CASES = [
    ("sigmoid", "sigmoid", 0.0, "summed", "sigmoid", 0.0, None),
    # TRL >= 1's sigmoid ignores label_smoothing: its result is fastalign's sigmoid with ε = 0
    ("sigmoid-trl-ls0.1-is-plain-dpo", "sigmoid", 0.0, "summed", "sigmoid", 0.1, None),
    # cDPO (TRL 0.x's sigmoid with label smoothing) from TRL >= 1's own sigmoid and robust code
    ("cdpo-ls0.1", "cdpo", 0.1, "summed", ("sigmoid", "robust"), 0.1, _cdpo_weights(0.1)),
    ("cdpo-ls0.3", "cdpo", 0.3, "summed", ("sigmoid", "robust"), 0.3, _cdpo_weights(0.3)),
    ("robust", "robust", 0.0, "summed", "robust", 0.0, None),
    ("robust-ls0.1", "robust", 0.1, "summed", "robust", 0.1, None),
    ("hinge", "hinge", 0.0, "summed", "hinge", 0.0, None),
    ("ipo-summed-with-lengths", "ipo", 0.0, "summed+lengths", "ipo", 0.0, None),
    ("ipo-average", "ipo", 0.0, "average", "ipo", 0.0, None),
    ("exo_pair-ls0.1", "exo_pair", 0.1, "summed", "exo_pair", 0.1, None),
    # fastalign substitutes ε = 1e-3 for label_smoothing 0 (TRL 0.x did the same; TRL >= 1 refuses 0)
    ("exo_pair-default-eps", "exo_pair", 0.0, "summed", "exo_pair", EXO_DEFAULT_EPSILON, None),
    ("nca_pair", "nca_pair", 0.0, "summed", "nca_pair", 0.0, None),
    ("bco_pair", "bco_pair", 0.0, "summed", "bco_pair", 0.0, None),
    ("sppo_hard", "sppo_hard", 0.0, "summed", "sppo_hard", 0.0, None),
    ("apo_zero", "apo_zero", 0.0, "summed", "apo_zero", 0.0, None),
    ("apo_down", "apo_down", 0.0, "summed", "apo_down", 0.0, None),
    ("discopop", "discopop", 0.0, "summed", "discopop", 0.0, None),
    # TRL >= 1 "sigmoid_norm" is DPO on length-normalised log-ratios = fastalign sigmoid on averages
    ("sigmoid_norm-vs-sigmoid-average", "sigmoid", 0.0, "average", "sigmoid_norm", 0.0, None),
]


def test_every_trl_definition_has_a_case():
    """Each fastalign loss type whose definition is TRL >= 1's is compared with TRL under its own
    name (cdpo through TRL's combination); the TRL 0.x forms are checked by the legacy test."""
    covered = {case[1] for case in DPO_CASES}
    assert covered == set(DPO_LOSS_TYPES) - set(FASTALIGN_FOR_TRL0.values()) | {"cdpo"}


@pytest.mark.skipif(not TRL_HAS_COMPUTE_LOSS, reason=f"TRL {TRL_VERSION} has no DPOTrainer._compute_loss")
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize(
    ("fa_type", "fa_ls", "inputs", "trl_type", "trl_ls", "weights"),
    [case[1:] for case in DPO_CASES],
    ids=[case[0] for case in DPO_CASES],
)
def test_dpo_matches_trl(fa_type, fa_ls, inputs, trl_type, trl_ls, weights, beta):
    if trl_type == "discopop":
        assert _config_default(trl.DPOConfig, "discopop_tau") == DISCOPOP_TAU
    g = torch.Generator().manual_seed(1234)
    batch = _batch(2 * B, g)
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 3 * (T - 4)
    ref_chosen, ref_rejected = ref[:B], ref[B:]

    trl_loss, trl_grad, trl_cr, trl_rr = _trl_dpo(
        trl_type, trl_ls, beta, batch, ref_chosen, ref_rejected, weights
    )
    fa_loss, fa_grad, fa_cr, fa_rr = _fastalign_dpo(
        fa_type, fa_ls, beta, batch, ref_chosen, ref_rejected, inputs
    )
    torch.testing.assert_close(fa_loss, trl_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(fa_grad, trl_grad, rtol=RTOL, atol=ATOL)
    if inputs != "average":  # TRL logs rewards of the summed log-ratios
        assert fa_cr == pytest.approx(trl_cr, rel=1e-9, abs=1e-9)
        assert fa_rr == pytest.approx(trl_rr, rel=1e-9, abs=1e-9)


def test_cdpo_differs_from_trl_sigmoid():
    """The cdpo case is not vacuous: with ε > 0 it differs from TRL >= 1's plain sigmoid."""
    if not TRL_HAS_COMPUTE_LOSS:
        pytest.skip(f"TRL {TRL_VERSION} has no DPOTrainer._compute_loss")
    g = torch.Generator().manual_seed(1234)
    batch = _batch(2 * B, g)
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 3 * (T - 4)
    trl_loss = _trl_dpo("sigmoid", 0.1, 0.1, batch, ref[:B], ref[B:])[0]
    fa_loss = _fastalign_dpo("cdpo", 0.1, 0.1, batch, ref[:B], ref[B:])[0]
    assert abs(fa_loss - trl_loss) > 1e-3


# TRL 0.x: DPOTrainer.dpo_loss. Every type must match exactly, per example, including label
# smoothing, bco_pair's δ (first RunningMoments step) and exo_pair's ε = 1e-3 substitute; the three
# definitions TRL >= 1 changed are fastalign's cdpo, ipo_sum and bco_pair_shift.
FASTALIGN_FOR_TRL0 = {"sigmoid": "cdpo", "ipo": "ipo_sum", "bco_pair": "bco_pair_shift"}
TRL0_LOSS_TYPES = DPO_LOSS_TYPES[: DPO_LOSS_TYPES.index("discopop") + 1]  # TRL 0.x's eleven names
LEGACY_CASES = [(lt, 0.0) for lt in TRL0_LOSS_TYPES] + [(lt, 0.1) for lt in ("sigmoid", "robust", "exo_pair")]


def _legacy_dpo_trainer(loss_type: str, label_smoothing: float, beta: float):
    from trl.trainer.utils import RunningMoments

    trainer = object.__new__(DPOTrainer)
    accelerator = _accelerator()
    accelerator.use_distributed = False
    trainer.accelerator = accelerator
    trainer.args = SimpleNamespace(discopop_tau=_config_default(trl.DPOConfig, "discopop_tau"))
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.loss_type = loss_type
    trainer.reference_free = False
    trainer.f_divergence_type = "reverse_kl"
    trainer.f_divergence_params = {}
    trainer.use_weighting = False
    trainer.ld_alpha = None
    trainer.running = RunningMoments(accelerator)
    return trainer


@pytest.mark.skipif(not TRL_HAS_LEGACY_DPO_LOSS, reason=f"TRL {TRL_VERSION} has no DPOTrainer.dpo_loss")
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), LEGACY_CASES, ids=[f"{a}-ls{b}" for a, b in LEGACY_CASES]
)
def test_dpo_matches_trl_legacy_dpo_loss(loss_type, label_smoothing, beta):
    import inspect

    trainer = _legacy_dpo_trainer(loss_type, label_smoothing, beta)
    g = torch.Generator().manual_seed(1234)
    pc, pr, rc, rr = (-torch.rand(B, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    args = (pc, pr, rc, rr)
    if "loss_type" in inspect.signature(DPOTrainer.dpo_loss).parameters:
        t_losses, t_cr, t_rr = trainer.dpo_loss(*args, loss_type=loss_type)
    else:
        t_losses, t_cr, t_rr = trainer.dpo_loss(*args)
    fa_type = FASTALIGN_FOR_TRL0.get(loss_type, loss_type)
    f_losses, f_cr, f_rr = dpo_loss(*args, beta=beta, loss_type=fa_type, label_smoothing=label_smoothing)
    torch.testing.assert_close(f_losses, t_losses, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(f_cr, t_cr)
    torch.testing.assert_close(f_rr, t_rr)


# ---------------------------------------------------------------------------------------------
# SimPO (CPOTrainer.cpo_loss, loss_type="simpo")
# ---------------------------------------------------------------------------------------------
def _import_experimental(module: str, name: str):
    try:
        mod = __import__(module, fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError):
        try:
            return getattr(trl, name)
        except AttributeError:
            pytest.skip(f"TRL {TRL_VERSION} has no {name}")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize(("beta", "gamma_beta_ratio"), [(2.0, 0.5), (2.5, 0.3)])
def test_simpo_matches_trl_cpo(beta, gamma_beta_ratio, label_smoothing):
    CPOTrainer = _import_experimental("trl.experimental.cpo", "CPOTrainer")
    trainer = object.__new__(CPOTrainer)
    trainer.alpha = 0.0
    trainer.loss_type = "simpo"
    trainer.beta = beta
    trainer.simpo_gamma = gamma_beta_ratio * beta  # TRL's γ
    trainer.label_smoothing = label_smoothing
    trainer.accelerator = _accelerator()
    g = torch.Generator().manual_seed(7)
    c = -torch.rand(B, generator=g, dtype=torch.float64) * 2
    r = -torch.rand(B, generator=g, dtype=torch.float64) * 2
    t_losses, t_cr, t_rr = trainer.cpo_loss(c, r)
    f_losses, f_cr, f_rr = simpo_loss(
        c, r, beta=beta, gamma_beta_ratio=gamma_beta_ratio, label_smoothing=label_smoothing
    )
    torch.testing.assert_close(f_losses, t_losses, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(f_cr, t_cr)
    torch.testing.assert_close(f_rr, t_rr)


# ---------------------------------------------------------------------------------------------
# ORPO (ORPOTrainer.odds_ratio_loss returns λ·log σ(log odds ratio); fastalign: nll − that)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_orpo_matches_trl(lam):
    ORPOTrainer = _import_experimental("trl.experimental.orpo", "ORPOTrainer")
    trainer = object.__new__(ORPOTrainer)
    trainer.beta = lam
    trainer.accelerator = _accelerator()
    g = torch.Generator().manual_seed(11)
    c = -torch.rand(B, generator=g) * 2 - 1e-3  # average log-probs (< 0); TRL computes in float32
    r = -torch.rand(B, generator=g) * 2 - 1e-3
    t_losses, _, _, _, t_log_odds = trainer.odds_ratio_loss(c, r)
    f_losses, f_log_odds = orpo_loss(c, r, torch.zeros_like(c), lam=lam)
    torch.testing.assert_close(f_losses, -t_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_log_odds.mean(), t_log_odds, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# KTO (KTOTrainer._compute_loss with precomputed reference log-probs and a stubbed KL pass)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kl_shift", [-1.0, 0.7], ids=["kl-clamped-to-0", "kl-positive"])
@pytest.mark.parametrize(("beta", "w_d", "w_u"), [(0.1, 1.0, 1.0), (0.3, 1.3, 0.8)])
def test_kto_matches_trl(beta, w_d, w_u, kl_shift):
    KTOTrainer = getattr(trl, "KTOTrainer", None) or _import_experimental(
        "trl.experimental.kto", "KTOTrainer"
    )
    if not hasattr(KTOTrainer, "_compute_loss"):
        pytest.skip(f"TRL {TRL_VERSION} KTOTrainer has no _compute_loss")
    n = 2 * B
    g = torch.Generator().manual_seed(3)
    input_ids, attention_mask, completion_mask, token_logps = _batch(n, g)
    ref_logps = -torch.rand(n, generator=g, dtype=torch.float64) * 3 * (T - 4)
    label = torch.rand(n, generator=g) < 0.5
    label[0], label[1] = True, False
    kl_logps = -torch.rand(n, generator=g, dtype=torch.float64) * 5
    ref_kl_logps = kl_logps - kl_shift - 0.1 * torch.rand(n, generator=g, dtype=torch.float64)

    trainer = object.__new__(KTOTrainer)
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = _accelerator()
    trainer.args = SimpleNamespace(gradient_checkpointing_kwargs=None)
    trainer.loss_type = "kto"
    trainer.beta = beta
    trainer.desirable_weight = w_d
    trainer.undesirable_weight = w_u
    trainer.calculate_KL = True
    trainer.precompute_ref_logps = True
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer._compute_kl_logps = lambda model, batch: kl_logps
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "label": label,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    t_tok = token_logps.clone().requires_grad_()
    t_loss = trainer._compute_loss(_stub_model(t_tok), inputs, return_outputs=False)
    t_loss.backward()

    f_tok = token_logps.clone().requires_grad_()
    policy = sequence_logps(f_tok, completion_mask[:, 1:])
    z0 = (kl_logps - ref_kl_logps).mean()
    f_losses, f_rewards = kto_loss(
        policy, ref_logps, label, z0, beta=beta, desirable_weight=w_d, undesirable_weight=w_u
    )
    f_loss = f_losses.mean()
    f_loss.backward()
    torch.testing.assert_close(f_loss, t_loss.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(f_tok.grad, t_tok.grad, rtol=RTOL, atol=ATOL)
    metrics = trainer._metrics["train"]
    assert metrics["kl"][-1] == pytest.approx(max(0.0, z0.item()), abs=1e-12)
    assert metrics["rewards/chosen"][-1] == pytest.approx(f_rewards[label].mean().item(), rel=1e-9)
    assert metrics["rewards/rejected"][-1] == pytest.approx(f_rewards[~label].mean().item(), rel=1e-9)


@pytest.mark.parametrize("kl_shift", [-1.0, 0.7], ids=["kl-clamped-to-0", "kl-positive"])
@pytest.mark.parametrize(("beta", "w_d", "w_u"), [(0.1, 1.0, 1.0), (0.3, 1.3, 0.8)])
def test_kto_matches_trl_legacy_kto_loss(beta, w_d, w_u, kl_shift):
    """TRL 0.x: KTOTrainer.kto_loss, per example (TRL orders them chosen first, then rejected)."""
    KTOTrainer = getattr(trl, "KTOTrainer", None)
    if KTOTrainer is None or not hasattr(KTOTrainer, "kto_loss"):
        pytest.skip(f"TRL {TRL_VERSION} has no KTOTrainer.kto_loss")
    g = torch.Generator().manual_seed(5)
    n = 2 * B
    policy = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    ref = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    label = torch.rand(n, generator=g) < 0.5
    label[0], label[1] = True, False
    kl_logps = -torch.rand(n, generator=g, dtype=torch.float64) * 5
    ref_kl_logps = kl_logps - kl_shift - 0.1 * torch.rand(n, generator=g, dtype=torch.float64)

    trainer = object.__new__(KTOTrainer)
    trainer.accelerator = _accelerator()
    trainer.calculate_KL = True
    trainer.loss_type = "kto"
    trainer.beta = beta
    trainer.desirable_weight = w_d
    trainer.undesirable_weight = w_u
    t_losses, t_cr, t_rr, t_kl = trainer.kto_loss(
        policy[label], policy[~label], kl_logps, ref[label], ref[~label], ref_kl_logps
    )
    z0 = (kl_logps - ref_kl_logps).mean()
    f_losses, f_rewards = kto_loss(
        policy, ref, label, z0, beta=beta, desirable_weight=w_d, undesirable_weight=w_u
    )
    torch.testing.assert_close(f_losses[torch.cat((label.nonzero(), (~label).nonzero())).view(-1)], t_losses)
    torch.testing.assert_close(f_rewards[label], t_cr)
    torch.testing.assert_close(f_rewards[~label], t_rr)
    assert t_kl.item() == pytest.approx(max(0.0, z0.item()), abs=1e-12)
