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

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastalign.trainers import common
from fastalign.trainers.loop import Task, autocast_dtype


def make_loss_module(dcfg):
    from fastalign.losses import FusedLinearPreferenceLoss

    kwargs: dict[str, float] = {}
    if dcfg.method == "simpo":
        kwargs["gamma_beta_ratio"] = dcfg.simpo_gamma_beta_ratio
    if dcfg.method == "orpo":
        kwargs["lam"] = dcfg.orpo_lambda
    return FusedLinearPreferenceLoss(
        dcfg.method,
        beta=dcfg.beta,
        loss_type=dcfg.loss_type,
        label_smoothing=dcfg.label_smoothing,
        average_log_prob=dcfg.average_log_prob,
        **kwargs,
    )


def reference_scorer(cfg, model, device, average: bool, rt=None) -> Callable[[dict[str, Any]], torch.Tensor]:
    """batch -> (rows,) reference sequence log-probs, without gradients.

    With `precompute_ref_logps` and no separate reference, the policy itself scores the data
    before its first step (it *is* the reference then), so no second copy is ever loaded.
    Under ZeRO-3 the policy cannot run before its engine exists, and LoRA's disabled-adapter
    forward bypasses the engine: the reference is always a frozen sharded engine there."""
    fused = cfg.train.fused
    section = getattr(cfg, cfg.method)
    reference = section.reference
    if getattr(rt, "stage", None) == 3:
        ref = common.load_frozen_lm(reference or cfg.model.path, cfg.model, device, rt)

        def score_frozen(batch):
            with torch.no_grad():
                return common.sequence_logps_of(ref, batch, fused, average)

        return score_frozen
    if reference is None and section.precompute_ref_logps and not cfg.model.lora.r:

        def score_initial(batch):
            was = model.training
            model.eval()
            with torch.no_grad():
                out = common.sequence_logps_of(model, batch, fused, average)
            model.train(was)
            return out

        return score_initial
    if reference is None and cfg.model.lora.r:

        def score_base(batch):  # LoRA: the frozen base model is the reference
            with torch.no_grad(), model.disable_adapter():
                return common.sequence_logps_of(model, batch, fused, average)

        return score_base
    ref = common.load_frozen_lm(reference or cfg.model.path, cfg.model, device)

    def score(batch):
        with torch.no_grad():
            return common.sequence_logps_of(ref, batch, fused, average)

    return score


def cached_reference(
    cfg, score, data_sets, collate, device, keys, rows_per_example, average, rt=None
) -> dict[int, torch.Tensor]:
    extra = {
        "reference": getattr(cfg, cfg.method).reference or cfg.model.path,
        "gguf": cfg.model.gguf_file,
        "average": average,
        "fused": cfg.train.fused,
        "lora": cfg.model.lora.r,
        "rows": rows_per_example,
        "mixed_precision": cfg.train.mixed_precision,
    }
    amp = autocast_dtype(cfg.train.mixed_precision, device)
    data = common.Concat([d for d in data_sets if d])
    main = rt is None or rt.is_main
    if rt is not None:
        rt.barrier()  # every rank sees the same cache file (or none) before deciding to score
    cache = common.precompute_sequence_logps(
        data,
        collate,
        score,
        cache_file=Path(cfg.train.output_dir) / "ref_logps.safetensors",
        keys=keys,
        extra=extra,
        batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
        device=device,
        rows_per_example=rows_per_example,
        desc="reference log-probs",
        amp=amp,
        write=main,
    )
    if rt is not None:
        rt.barrier()
    return cache


def from_cache(cache: dict[int, torch.Tensor], batch: dict[str, Any], device) -> torch.Tensor:
    """(B, rows_per_example) cached reference log-probs of the batch's examples."""
    return torch.stack([cache[int(i)] for i in batch["index"].tolist()]).to(device)


def metrics_from(loss_mod, m: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    b = labels.shape[0] // 2
    n_chosen = (labels[:b] != common.IGNORE).sum(1).clamp(min=1)
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


def build(cfg) -> Task:
    """A DPO-family Task from a `fastalign.config.DPORecipe`."""
    from fastalign.data import PreferenceCollator

    rt, device, tok, model = common.setup(cfg)
    train, evals, _ = common.load_datasets("preference", cfg.data, tok, cfg.train.seed, "dpo")
    collate = PreferenceCollator(tok.pad_token_id, packing=cfg.data.packing)
    loss_mod = make_loss_module(cfg.dpo)
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
        labels = common.shifted_labels(batch)
        fwd = rt.forward_module(model)  # the DeepSpeed engine under a launcher
        soft = 1 - batch["p_chosen"] if cfg.dpo.soft_labels and "p_chosen" in batch else None  # ε per pair
        if fused:
            kw = {"ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r} if loss_mod.needs_reference else {}
            hidden = common.hidden_states(fwd, batch)
            with common.head_params(fwd) as (weight, bias):
                loss, m = loss_mod(hidden, weight, labels, bias=bias, label_smoothing=soft, **kw)
        else:
            logp, labels = common.token_logps(fwd, batch, fused=False)
            loss, m = loss_mod.loss_from_token_logps(logp, labels, ref_c, ref_r, label_smoothing=soft)
        return loss, metrics_from(loss_mod, m, labels)

    return Task(
        name=f"dpo/{cfg.dpo.method}" if cfg.dpo.method != "dpo" else f"dpo/{cfg.dpo.loss_type}",
        model=model,
        train_data=train,
        eval_data=evals,
        collate=collate,
        loss_step=loss_step,
        export=common.export_fn(model, tok, rt),
        runtime=rt,
        count_tokens=lambda b: int(b["input_ids"].numel() if "seq_id" in b else b["attention_mask"].sum()),
        extras={"tokenizer": tok, "loss_module": loss_mod, "ref_cache": cache, "device": device},
    )
