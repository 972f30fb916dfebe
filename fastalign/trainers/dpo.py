"""DPO and its family (every `dpo_loss` type, IPO, reference-free SimPO and ORPO) as a `Task`.

Fused path (default): the policy's last hidden states and lm_head weight go to
`FusedLinearPreferenceLoss`, so (2B, T, V) logits never exist. `train.fused: false` computes full
logits and feeds their per-token log-probs to the same module's `loss_from_token_logps`, so both
paths share every line of the loss math. The reference model is frozen; with
`dpo.precompute_ref_logps: true` its sequence log-probs are computed once, cached in
`<output_dir>/ref_logps.safetensors` (reused while data and reference are unchanged), and the
reference model is freed before training. With LoRA and no separate `dpo.reference`, the
reference is the base model (adapters disabled), so no second copy is loaded.
"""

from __future__ import annotations

from typing import Any

import torch

from fastalign.config import DPOConfig, DPORecipe
from fastalign.constants import IGNORE_INDEX
from fastalign.data import PreferenceCollator
from fastalign.engine.forward import fused_head_loss, shifted_labels, token_logps
from fastalign.losses import FusedLinearPreferenceLoss
from fastalign.trainers.datasets import load_datasets
from fastalign.trainers.loop import Task
from fastalign.trainers.reference import cached_reference, from_cache, reference_scorer
from fastalign.trainers.setup import setup


def make_loss_module(dcfg: DPOConfig, grad_filter: float | str | None = "auto") -> FusedLinearPreferenceLoss:
    kwargs: dict[str, float] = {}
    if dcfg.method == "simpo":
        kwargs["gamma_beta_ratio"] = dcfg.simpo_gamma_beta_ratio
    if dcfg.method == "orpo":
        kwargs["lam"] = dcfg.orpo_lambda
    loss_type = dcfg.loss_type
    if loss_type == "sigmoid" and (dcfg.label_smoothing > 0 or dcfg.soft_labels):
        loss_type = "cdpo"  # sigmoid with label smoothing is conservative DPO (TRL 1.x ignores ε there)
    return FusedLinearPreferenceLoss(
        dcfg.method,
        beta=dcfg.beta,
        loss_type=loss_type,
        label_smoothing=dcfg.label_smoothing,
        average_log_prob=dcfg.average_log_prob,
        grad_filter=grad_filter,
        **kwargs,
    )


def metrics_from(loss_mod, m: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    b = labels.shape[0] // 2
    n_chosen = (labels[:b] != IGNORE_INDEX).sum(1).clamp(min=1)
    chosen = m["chosen_logps"]
    per_token = chosen if loss_mod.average_log_prob else chosen / n_chosen
    out = {
        "rewards/chosen": m["chosen_rewards"].mean(),
        "rewards/rejected": m["rejected_rewards"].mean(),
        "rewards/accuracies": m["accuracy"],
        "rewards/margins": m["margin"],
        "logps/chosen": chosen.mean(),
        "logps/rejected": m["rejected_logps"].mean(),
        "nll": -per_token.mean(),
    }
    if "log_odds_ratio" in m:
        out["log_odds_ratio"] = m["log_odds_ratio"].mean()
    return out


def build(cfg: DPORecipe) -> Task:
    rt, device, tok, model = setup(cfg)
    train, evals, _ = load_datasets("preference", cfg.data, tok, cfg.train.seed, "dpo")
    collate = PreferenceCollator(tok.pad_token_id, packing=cfg.data.packing)
    loss_mod = make_loss_module(cfg.dpo, cfg.train.grad_filter)
    fused, avg = cfg.train.fused, loss_mod.average_log_prob

    if cfg.dpo.soft_labels and not all("p_chosen" in ex for ex in train):
        raise ValueError(
            "dpo.soft_labels: true needs a p_chosen number on every training row (as written by "
            "`fastalign cai label`; map another column with data.columns.p_chosen=...)"
        )
    score_ref = reference_scorer(cfg, model, device, avg, rt) if loss_mod.needs_reference else None
    cache: dict[int, torch.Tensor] | None = None
    if score_ref is not None and cfg.dpo.precompute_ref_logps:
        keys = ("prompt_ids", "chosen_ids", "rejected_ids")
        cache = cached_reference(cfg, score_ref, (train, evals), collate, device, keys, 2, avg, rt)
        score_ref = None  # frees the reference model: training needs no reference forward

    def loss_step(batch: dict[str, Any]):
        ref_c = ref_r = None
        if cache is not None:
            ref = from_cache(cache, batch, device)
            ref_c, ref_r = ref[:, 0], ref[:, 1]
        elif score_ref is not None:
            ref = score_ref(batch)
            b = ref.shape[0] // 2
            ref_c, ref_r = ref[:b], ref[b:]
        labels = shifted_labels(batch)
        fwd = rt.forward_module(model)  # the DeepSpeed engine under a launcher
        soft = 1 - batch["p_chosen"] if cfg.dpo.soft_labels and "p_chosen" in batch else None  # ε per pair
        if fused:
            kw = {"ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r} if loss_mod.needs_reference else {}
            loss, m = fused_head_loss(
                fwd, batch, lambda h, w, b: loss_mod(h, w, labels, bias=b, label_smoothing=soft, **kw)
            )
        else:
            logp, labels = token_logps(fwd, batch, fused=False)
            loss, m = loss_mod.loss_from_token_logps(logp, labels, ref_c, ref_r, label_smoothing=soft)
        return loss, metrics_from(loss_mod, m, labels)

    name = f"dpo/{cfg.dpo.method}" if cfg.dpo.method != "dpo" else f"dpo/{cfg.dpo.loss_type}"
    tokens = lambda b: int(b["input_ids"].numel() if "seq_id" in b else b["attention_mask"].sum())
    extras = {"loss_module": loss_mod, "ref_cache": cache, "device": device}
    return Task(name, model, tok, rt, train, evals, collate, loss_step, count_tokens=tokens, extras=extras)
