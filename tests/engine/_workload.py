"""The 2-rank ZeRO-3 workload and its single-process replay, shared by the torchrun worker and
the pytest process: same batches, same losses, same optimizer, so any difference is ZeRO-3's."""

from __future__ import annotations

import json

import torch
from repo_assets import ASSETS

MODEL = ASSETS / "models" / "stories260k"
DATA = ASSETS / "data" / "preferences" / "oasst_en_100_tree_pairs.jsonl"
WORLD = 2
PAIRS_PER_RANK = 2  # DPO: 2 pairs -> 4 rows; SFT: 2 rows
MAX_LEN = 40
PROMPT_MAX = 16
LR, WEIGHT_DECAY, MAX_GRAD_NORM, BETA = 1e-3, 0.01, 1.0, 0.1
STEPS = ("dpo", "sft", "dpo", "sft")  # step i: its kind of loss on rank-specific rows; DPO first
SAVE_AFTER = 2  # checkpoint after this many steps; the resume run replays the rest
IGNORE = -100


def rows() -> list[dict]:
    with DATA.open() as f:
        return [json.loads(line) for line in f]


def _encode(tok, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    p = tok(prompt, add_special_tokens=False)["input_ids"][-PROMPT_MAX:]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    ids = [tok.bos_token_id, *p, *c][:MAX_LEN]
    labels = [IGNORE] * (1 + len(p)) + c
    return ids, labels[:MAX_LEN]


def _pad(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    t = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, (a, b) in enumerate(seqs):
        ids[i, : len(a)], labels[i, : len(b)], mask[i, : len(a)] = torch.tensor(a), torch.tensor(b), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch(tok, data: list[dict], step: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s micro-batch of step `step` (distinct rows per rank and step)."""
    start = (step * WORLD + rank) * PAIRS_PER_RANK
    picked = data[start : start + PAIRS_PER_RANK]
    if STEPS[step] == "sft":
        return _pad([_encode(tok, r["prompt"], r["chosen"]) for r in picked], tok.pad_token_id)
    chosen = [_encode(tok, r["prompt"], r["chosen"]) for r in picked]
    rejected = [_encode(tok, r["prompt"], r["rejected"]) for r in picked]
    return _pad(chosen + rejected, tok.pad_token_id)


def step_loss(kind: str, hidden, weight, b, ref_hidden=None, ref_weight=None) -> torch.Tensor:
    """The fused loss of one micro-batch from (B, T, H) hidden states and the (V, H) head weight."""
    from fastalign.losses import FusedLinearPreferenceLoss
    from fastalign.ops import linear_logprobs

    labels = b["labels"][:, 1:]
    if kind == "sft":
        logp = linear_logprobs(hidden[:, :-1], weight, labels)  # (B, T-1)
        mask = labels != IGNORE
        return -(logp * mask).sum() / mask.sum().clamp(min=1)
    loss, _ = FusedLinearPreferenceLoss("dpo", beta=BETA)(
        hidden[:, :-1], weight, labels, ref_hidden=ref_hidden[:, :-1], ref_weight=ref_weight
    )
    return loss


def make_optimizer(model):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    return opt, sched


def reference_run(steps: int = len(STEPS)) -> dict:
    """Single process, no DeepSpeed: per step the mean of the ranks' losses, its gradients,
    clipping, AdamW and the schedule -> {"losses", "grads" (per step), "model"}."""
    from fastalign.models import decoder_hidden_states, load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(MODEL))
    data = rows()
    model = load_causal_lm(str(MODEL), dtype="float32", attn_implementation="sdpa")
    ref = load_causal_lm(str(MODEL), dtype="float32", attn_implementation="sdpa").requires_grad_(False)
    model.train()
    opt, sched = make_optimizer(model)
    losses, grads = [], []
    for step in range(steps):
        kind = STEPS[step]
        total = 0.0
        opt.zero_grad()
        for r in range(WORLD):
            b = batch(tok, data, step, r)
            h = decoder_hidden_states(model, b["input_ids"], b["attention_mask"])
            rh = None
            if kind == "dpo":
                with torch.no_grad():
                    rh = decoder_hidden_states(ref, b["input_ids"], b["attention_mask"])
            loss = step_loss(kind, h, model.lm_head.weight, b, rh, ref.lm_head.weight) / WORLD
            loss.backward()
            total += loss.item()
        losses.append(total)
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        sched.step()
    return {"losses": losses, "grads": grads, "model": model, "tokenizer": tok}
