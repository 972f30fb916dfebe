"""Supervised fine-tuning as a `Task`: token-mean negative log-likelihood of the completion tokens
(labels are −100 on prompt tokens unless `sft.completion_only: false`; plain `text` rows train on
every token). Fused path: `linear_logprobs(hidden, lm_head weight)`, no (B, T, V) logits."""

from __future__ import annotations

from typing import Any

from fastalign.config import SFTRecipe
from fastalign.constants import IGNORE_INDEX
from fastalign.data import SFTCollator
from fastalign.engine.forward import token_logps
from fastalign.trainers.datasets import AllTokens, load_datasets
from fastalign.trainers.loop import Task
from fastalign.trainers.setup import setup


def build(cfg: SFTRecipe) -> Task:
    rt, _, tok, model = setup(cfg)
    train, evals, _ = load_datasets("sft", cfg.data, tok, cfg.train.seed, "sft")
    if not cfg.sft.completion_only:
        train, evals = AllTokens(train), (AllTokens(evals) if evals else None)
    collate = SFTCollator(tok.pad_token_id, packing=cfg.data.packing)
    fused, grad_filter = cfg.train.fused, cfg.train.grad_filter

    def loss_step(batch: dict[str, Any]):
        logp, labels = token_logps(
            rt.forward_module(model), batch, fused=fused, grad_filter=grad_filter
        )  # (R, T-1)
        mask = labels != IGNORE_INDEX
        n = mask.sum().clamp(min=1)
        nll = -(logp * mask).sum() / n
        return nll, {"nll": nll.detach(), "tokens": mask.sum().float()}

    return Task("sft", model, tok, rt, train, evals, collate, loss_step)
