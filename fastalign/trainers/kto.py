"""KTO (Ethayarajh et al. 2024) on unpaired (prompt, completion, desirable?) rows as a `Task`.

The KL reference point z0 = max(0, mean(π − ref)) is estimated, as TRL does, on mismatched
(prompt, completion) pairs and detached. The mismatch partner of example i is fixed at the
dataset level (the completion of the previous example in dataset order), not per batch, so the
reference's KL log-probs can be cached with `kto.precompute_ref_logps` like the main ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastalign.config import KTORecipe
from fastalign.constants import IGNORE_INDEX
from fastalign.data import FormatUndetectedError, SFTCollator
from fastalign.engine.forward import fused_head_loss, shifted_labels, token_logps
from fastalign.losses import FusedLinearKTOLoss, kto_loss, sequence_logps
from fastalign.ops import linear_logprobs
from fastalign.trainers.datasets import load_datasets
from fastalign.trainers.loop import Task
from fastalign.trainers.reference import cached_reference, from_cache, reference_scorer
from fastalign.trainers.runtime import say
from fastalign.trainers.setup import setup


class Unpaired(Sequence):
    """Preference pairs as KTO rows (TRL's `unpair_preference_dataset`): pair i gives row 2i
    (prompt, chosen, desirable) and row 2i+1 (prompt, rejected, undesirable)."""

    def __init__(self, pairs: Sequence[dict]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i // 2]
        chosen = i % 2 == 0
        return {
            "prompt_ids": pair["prompt_ids"],
            "completion_ids": pair["chosen_ids"] if chosen else pair["rejected_ids"],
            "label": chosen,
            "index": 2 * int(pair["index"]) + (0 if chosen else 1),
        }


def load_kto_data(cfg: KTORecipe, tok):
    """KTO rows (prompt, completion, label); a preference file is unpaired (held-out split by pair)."""
    if cfg.data.format in ("auto", "kto"):
        try:
            return load_datasets("kto", cfg.data, tok, cfg.train.seed, "kto")[:2]
        except FormatUndetectedError:
            if cfg.data.format == "kto":
                raise
    # data.format preference / hh / chat name a pair format: unpair it
    train, evals, _ = load_datasets("preference", cfg.data, tok, cfg.train.seed, "kto")
    say("[kto] preference pairs unpaired: chosen -> desirable, rejected -> undesirable")
    return Unpaired(train), (Unpaired(evals) if evals else None)


class WithPartner(Sequence):
    """KTO examples carrying `kl_completion_ids`: the completion of the previous example."""

    def __init__(self, base: Sequence[dict]) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        row = dict(self.base[i])
        row["kl_completion_ids"] = self.base[(i - 1) % len(self.base)]["completion_ids"]
        return row


class KTOBatches:
    """Collates main rows then mismatched KL rows into one (2B, T) batch (one forward for both)."""

    def __init__(self, pad_token_id: int) -> None:
        self.inner = SFTCollator(pad_token_id, packing=False)

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        def sft_row(r, completion):
            ids = list(r["prompt_ids"]) + list(completion)
            return {
                "input_ids": ids,
                "labels": [IGNORE_INDEX] * len(r["prompt_ids"]) + list(completion),
                "index": r["index"],
            }

        main = [sft_row(r, r["completion_ids"]) for r in rows]
        kl = [sft_row(r, r["kl_completion_ids"]) for r in rows]
        batch = self.inner(main + kl)
        batch["index"] = torch.tensor([int(r["index"]) for r in rows])
        batch["desirable"] = torch.tensor([bool(r["label"]) for r in rows])
        return batch


def build(cfg: KTORecipe) -> Task:
    rt, device, tok, model = setup(cfg)
    train, evals = load_kto_data(cfg, tok)
    train, evals = WithPartner(train), (WithPartner(evals) if evals else None)
    collate = KTOBatches(tok.pad_token_id)
    kcfg, fused = cfg.kto, cfg.train.fused
    loss_mod = FusedLinearKTOLoss(
        beta=kcfg.beta,
        desirable_weight=kcfg.desirable_weight,
        undesirable_weight=kcfg.undesirable_weight,
        grad_filter=cfg.train.grad_filter,
    )

    score_ref = reference_scorer(cfg, model, device, average=False, rt=rt)
    cache = None
    if kcfg.precompute_ref_logps:
        keys = ("prompt_ids", "completion_ids", "kl_completion_ids")
        cache = cached_reference(cfg, score_ref, (train, evals), collate, device, keys, 2, False, rt)
        score_ref = None

    def loss_step(batch: dict[str, Any]):
        b = batch["desirable"].shape[0]
        if cache is not None:
            ref = from_cache(cache, batch, device)  # (B, 2): main, KL
            ref_main, ref_kl = ref[:, 0], ref[:, 1]
        else:
            ref = score_ref(batch)
            ref_main, ref_kl = ref[:b], ref[b:]
        labels = shifted_labels(batch)
        desirable = batch["desirable"]
        fwd = rt.forward_module(model)  # the DeepSpeed engine under a launcher
        if fused:

            def loss_fn(hidden, weight, bias):  # hidden (2B, T-1, H): main rows, then KL rows
                with torch.no_grad():
                    kl_tok = linear_logprobs(hidden[b:], weight, labels[b:], bias=bias)
                    kl_pol = sequence_logps(kl_tok, labels[b:] != IGNORE_INDEX)
                    z0 = (kl_pol - ref_kl.to(kl_pol.dtype)).mean().clamp(min=0)
                loss, m = loss_mod(
                    hidden[:b], weight, labels[:b], desirable, bias=bias, ref_logps=ref_main, kl_ref_point=z0
                )
                return loss, m, z0

            loss, m, z0 = fused_head_loss(fwd, batch, loss_fn)
            rewards, policy = m["rewards"], m["logps"]
        else:
            logp, labels = token_logps(fwd, batch, fused=False)
            seq = sequence_logps(logp, labels != IGNORE_INDEX)
            policy = seq[:b]
            z0 = (seq[b:].detach() - ref_kl.to(seq.dtype)).mean().clamp(min=0)
            losses, rewards = kto_loss(
                policy,
                ref_main.to(policy.dtype),
                desirable,
                z0,
                beta=kcfg.beta,
                desirable_weight=kcfg.desirable_weight,
                undesirable_weight=kcfg.undesirable_weight,
            )
            loss = losses.mean()
        d = desirable.bool()
        zero = rewards.new_zeros(())
        r_des = rewards[d].mean() if d.any() else zero
        r_und = rewards[~d].mean() if (~d).any() else zero
        return loss, {
            "rewards/chosen": r_des,
            "rewards/rejected": r_und,
            "rewards/margins": r_des - r_und,
            "logps/policy": policy.detach().mean(),
            "kl": z0.detach(),
        }

    tokens = lambda b: int(b["attention_mask"][: b["desirable"].shape[0]].sum())  # not the KL rows
    return Task("kto", model, tok, rt, train, evals, collate, loss_step, count_tokens=tokens)
