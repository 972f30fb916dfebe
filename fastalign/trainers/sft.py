"""Supervised fine-tuning as a `Task`: token-mean negative log-likelihood of the completion tokens
(labels are −100 on prompt tokens unless `sft.completion_only: false`; plain `text` rows train on
every token). Fused path: `linear_logprobs(hidden, lm_head weight)`, no (B, T, V) logits."""

from __future__ import annotations

from typing import Any

from fastalign.trainers import common
from fastalign.trainers.loop import Task


def build(cfg) -> Task:
    """An SFT Task from a `fastalign.config.SFTRecipe`."""
    from fastalign.data import SFTCollator

    rt, _, tok, model = common.setup(cfg)
    train, evals, _ = common.load_datasets("sft", cfg.data, tok, cfg.train.seed, "sft")
    if not cfg.sft.completion_only:
        train, evals = common.AllTokens(train), (common.AllTokens(evals) if evals else None)
    collate = SFTCollator(tok.pad_token_id, packing=cfg.data.packing)
    fused = cfg.train.fused

    def loss_step(batch: dict[str, Any]):
        logp, labels = common.token_logps(rt.forward_module(model), batch, fused)  # (R, T-1)
        mask = labels != common.IGNORE
        n = mask.sum().clamp(min=1)
        nll = -(logp * mask).sum() / n
        return nll, {"nll": nll.detach(), "tokens": mask.sum().float()}

    return Task(
        name="sft",
        model=model,
        train_data=train,
        eval_data=evals,
        collate=collate,
        loss_step=loss_step,
        export=common.export_fn(model, tok, rt),
        runtime=rt,
    )
