"""Reward modelling (Bradley–Terry) as a `Task`: a sequence-classification head (one logit) on a
causal-LM or encoder backbone scores prompt+chosen and prompt+rejected; the loss is
−log σ(r_c − r_r − margin) (margin from the data with `rm.use_margin`, Llama 2) plus optional reward
centring. `rewards/accuracies` on the eval split is the held-out preference accuracy."""

from __future__ import annotations

from typing import Any

from fastalign.config import RMRecipe
from fastalign.data import PreferenceCollator
from fastalign.losses import bradley_terry_loss
from fastalign.trainers.datasets import load_datasets
from fastalign.trainers.loop import Task
from fastalign.trainers.setup import setup


def build(cfg: RMRecipe) -> Task:
    rt, _, tok, model = setup(cfg, reward=True)
    train, evals, _ = load_datasets("preference", cfg.data, tok, cfg.train.seed, "rm")
    if cfg.rm.use_margin and "margin" not in train[0]:
        raise ValueError(
            "rm.use_margin: true needs a margin column in the data (map it with data.columns.margin=...)"
        )
    if cfg.rm.soft_labels and not all("p_chosen" in ex for ex in train):
        raise ValueError(
            "rm.soft_labels: true needs a p_chosen number on every training row (as written by "
            "`fastalign cai label`; map another column with data.columns.p_chosen=...)"
        )
    collate = PreferenceCollator(tok.pad_token_id, packing=False)

    def loss_step(batch: dict[str, Any]):
        fwd = rt.forward_module(model)
        out = fwd(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        rewards = out.logits[:, 0].float()
        b = rewards.shape[0] // 2
        chosen, rejected = rewards[:b], rewards[b:]
        margin = batch.get("margin") if cfg.rm.use_margin else None
        target = batch.get("p_chosen") if cfg.rm.soft_labels else None  # soft Bradley-Terry target
        loss = bradley_terry_loss(
            chosen, rejected, margin=margin, center_coef=cfg.rm.center_coef, target=target
        ).mean()
        d = (chosen - rejected).detach()
        return loss, {
            "rewards/chosen": chosen.detach().mean(),
            "rewards/rejected": rejected.detach().mean(),
            "rewards/accuracies": (d > 0).float().mean(),
            "rewards/margins": d.mean(),
        }

    tokens = lambda b: int(b["attention_mask"].sum())  # prompt + both responses
    return Task("rm", model, tok, rt, train, evals, collate, loss_step, count_tokens=tokens)
